//! The real-guest lab: vstreamd and a QEMU guest wired together, for end-to-end tests and the demo.
//!
//! ```no_run
//! use std::time::Duration;
//! use xtask::lab::{Lab, LabOptions};
//!
//! let lab = Lab::boot(LabOptions::default())?;
//! let status = lab.wait_for("both mux transports up", Duration::from_secs(60), |s| lab.mux_transports_up(s))?;
//! println!("{status:#}");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! [`Lab::boot`] builds the guest image if needed, picks KVM or TCG, starts
//! `vstreamd --control <dir>/control.sock --config <dir>/vstreamd.toml --state-dir <dir>/state` and then
//! QEMU (see [`crate::qemu`] for the devices), and waits until the guest's `/init` reports it is done.
//! Everything lives in a fresh temporary directory.
//!
//! Safety nets, so that a broken test never leaves a guest running or fails without saying why:
//! - children die with this process (`PR_SET_PDEATHSIG`, see [`crate::process`]), and on drop;
//! - a hard timeout per test binary (`VSTREAM_LAB_TIMEOUT` seconds, default 600) kills the guests, prints
//!   their logs and exits the process;
//! - on drop and on any panic, the tail of the guest console and of the vstreamd log go to stderr
//!   (shown by `cargo test` for failing tests). The directory of a lab that saw a panic is kept.
//!
//! Environment: `VSTREAM_LAB_TIMEOUT`, `VSTREAM_LAB_BOOT_TIMEOUT` (seconds), `VSTREAM_LAB_KEEP=1` (keep
//! the directory), `VSTREAM_LAB_ACCEL=kvm|tcg`, `VSTREAM_LAB_QEMU_ARGS` and `VSTREAM_LAB_KERNEL_ARGS`
//! (words added to every guest's QEMU command and kernel command line), `VSTREAM_SKIP_E2E=1` (see [`e2e_enabled`]), `VSTREAM_LOG`
//! (vstreamd's log filter, default `info,vstream_transport=debug`), plus the paths of [`crate::paths`].

mod boot;
mod config;
mod control;
mod safety;
pub mod testing;

pub use config::{mux_addresses, vstreamd_config, LabOptions, LabPaths, LabVsock};
pub use control::{guest_status, transport_state};
pub use safety::strip_ansi;

use std::fs;
use std::io::{self, Write};
use std::process::Child;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::accel::{Accel, Verdict};
use crate::image::GuestImage;
use crate::process;
use crate::qemu::QemuSpec;
use safety::{keep_dirs, live_labs, LabShared};

/// Default hard timeout of a test binary that boots labs.
pub const DEFAULT_HARD_TIMEOUT: Duration = Duration::from_secs(600);

/// Default time a guest may take from QEMU's start to `/init`'s marker. TCG needs ~8 s alone; several
/// guests booting at once on two cores need more.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How long one `vstreamctl` run may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

const TAIL_LINES: usize = 80;

fn io_err(e: anyhow::Error) -> io::Error {
    io::Error::other(format!("{e:#}"))
}

fn env_secs(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// True when the end-to-end tests should run. They always run, and fail if QEMU is missing, unless a
/// person sets `VSTREAM_SKIP_E2E=1`: then this prints a loud notice (past `cargo test`'s capture) and
/// returns false.
pub fn e2e_enabled(test: &str) -> bool {
    let skip = std::env::var("VSTREAM_SKIP_E2E")
        .map(|v| v == "1")
        .unwrap_or(false);
    if skip {
        // Written to the stderr handle directly, not with eprintln!, so the test harness does not hide it.
        let _ = writeln!(
            io::stderr(),
            "\n!!!!!!!! VSTREAM_SKIP_E2E=1: end-to-end test {test} was SKIPPED (no guest booted) !!!!!!!!\n"
        );
    }
    !skip
}

/// A running lab: vstreamd plus one QEMU guest. Dropping it stops both.
pub struct Lab {
    options: LabOptions,
    paths: LabPaths,
    verdict: Verdict,
    spec: QemuSpec,
    daemon: Mutex<Option<Child>>,
    vsock_backend: Mutex<Option<Child>>,
    qemu: Mutex<Option<Child>>,
    qmp_lock: Mutex<()>,
    shared: Arc<LabShared>,
    boot_time: Mutex<Option<Duration>>,
}

impl Lab {
    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The options it was booted with.
    pub fn options(&self) -> &LabOptions {
        &self.options
    }

    /// Its files and sockets.
    pub fn paths(&self) -> &LabPaths {
        &self.paths
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> Accel {
        self.verdict.accel
    }

    /// Why that accelerator.
    pub fn accel_reason(&self) -> &str {
        &self.verdict.reason
    }

    /// The kernel command line of the guest.
    pub fn kernel_cmdline(&self) -> String {
        self.spec.kernel_cmdline()
    }

    /// The image the guest booted.
    pub fn image(&self) -> &GuestImage {
        &self.spec.image
    }

    /// The process that serves the guest's vsock device: vhost-device-vsock, or vstreamd.
    pub fn vsock_backend_pid(&self) -> Option<u32> {
        let slot = match self.options.vsock {
            LabVsock::VhostDeviceVsock => &self.vsock_backend,
            LabVsock::Vstreamd => &self.daemon,
            LabVsock::None => return None,
        };
        slot.lock().ok()?.as_ref().map(Child::id)
    }

    /// QEMU's and vstreamd's process ids (the benchmarks read their CPU time).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        let pid = |slot: &Mutex<Option<Child>>| slot.lock().ok()?.as_ref().map(Child::id);
        (pid(&self.qemu), pid(&self.daemon))
    }

    /// The vsock CID of the guest, if it has a vhost-vsock or vhost-user-vsock device.
    pub fn vsock_cid(&self) -> Option<u32> {
        self.spec.vsock_cid
    }

    /// Time from QEMU's start to `/init`'s marker.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.lock().ok().and_then(|t| *t)
    }

    /// The addresses of the mux transports, as in vstreamd's config and status (see
    /// [`mux_addresses`]).
    pub fn mux_addresses(&self) -> Vec<String> {
        mux_addresses(&self.paths.sockets)
    }

    /// True while QEMU runs.
    pub fn is_running(&self) -> bool {
        matches!(self.child_exited(&self.qemu), Ok(None))
    }

    /// Prints the tail of the guest console and of the vstreamd log to stderr.
    pub fn dump_logs(&self, why: &str) {
        eprint!("{}", self.shared.report(why));
    }

    /// Kills vstreamd with SIGKILL, as a crash would (no cleanup: its sockets stay), and reaps it.
    pub fn kill_daemon(&self) -> io::Result<()> {
        let mut guard = self
            .daemon
            .lock()
            .map_err(|_| io::Error::other("lab lock poisoned"))?;
        let mut child = guard
            .take()
            .ok_or_else(|| io::Error::other("vstreamd is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts vstreamd again after [`Lab::kill_daemon`], with the same config and state
    /// directory; returns once its control socket accepts a connection.
    pub fn restart_daemon(&self) -> io::Result<()> {
        self.start_daemon()
    }

    /// Stops the guest (QMP `quit`) and vstreamd (SIGTERM), then removes the directory. Unlike a drop,
    /// prints no logs.
    pub fn shutdown(self) -> io::Result<()> {
        self.shared.dumped.store(true, Ordering::SeqCst);
        let quit = self.qmp("quit", None);
        if let Ok(mut guard) = self.qemu.lock() {
            if let Some(child) = guard.as_mut() {
                if quit.is_err() || process::wait_timeout(child, Duration::from_secs(10))?.is_none()
                {
                    process::terminate(child, Duration::from_secs(2));
                }
            }
        }
        Ok(())
        // Drop stops vstreamd and removes the directory.
    }

    fn stop_children(&self) {
        for slot in [&self.qemu, &self.vsock_backend, &self.daemon] {
            if let Ok(mut guard) = slot.lock() {
                if let Some(mut child) = guard.take() {
                    process::terminate(&mut child, Duration::from_secs(3));
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let why = if thread::panicking() {
            "dropped while panicking"
        } else {
            "stopped"
        };
        self.shared.dump(why);
        self.stop_children();
        if let Some(shm) = &self.options.ivshmem {
            let _ = fs::remove_file(&shm.path);
        }
        if let Ok(mut labs) = live_labs().lock() {
            labs.retain(|l| !Arc::ptr_eq(l, &self.shared));
        }
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if keep_dirs() || thread::panicking() {
            eprintln!(
                "vstream-lab: kept {} for inspection",
                self.paths.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.paths.dir);
        }
    }
}
