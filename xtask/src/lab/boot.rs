//! Starting a lab: vstreamd, the vsock backend and QEMU, then waiting for the guest's init.

use std::fs::{self, File};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::accel;
use crate::image::{self, INIT_DONE_MARKER};
use crate::qemu::{self, HybridVsockSockets, QemuSpec, HYBRID_VSOCK_CID, PCI_SERIAL_TTY};
use crate::{paths, process};

use super::safety::{install_safety_nets, live_labs, make_lab_dir, tail, LabShared};
use super::{io_err, vstreamd_config, Lab, LabOptions, LabPaths, LabVsock};

fn vsock_cid() -> u32 {
    // CIDs 0-2 are reserved; derive one from the pid so parallel test binaries do not collide.
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    3 + (std::process::id() % 0x00ff_ffff) * 16 + COUNTER.fetch_add(1, Ordering::SeqCst) % 16
}

impl Lab {
    /// Builds the image if needed, starts vstreamd and the guest, and waits for the guest's init.
    pub fn boot(options: LabOptions) -> io::Result<Lab> {
        let qemu_bin = accel::qemu_binary().map_err(io_err)?;
        let image = image::ensure_image().map_err(io_err)?;
        let verdict = accel::detect(&image).map_err(io_err)?;
        if options.start_daemon {
            for name in ["vstreamd", "vstreamctl"] {
                let bin = paths::host_bin(name);
                if !paths::is_executable(&bin) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "{} not found: build it with `cargo build --workspace` (./x.sh test does)",
                            bin.display()
                        ),
                    ));
                }
            }
        }
        install_safety_nets();

        let dir = make_lab_dir(&options.name)?;
        let paths = LabPaths::new(dir, &options);
        let spec = QemuSpec {
            qemu: qemu_bin,
            image,
            accel: verdict.accel,
            cpu: options.cpu.clone(),
            virtio_rng: options.virtio_rng,
            name: options.name.clone(),
            memory_mib: options.memory_mib,
            sockets: paths.sockets.clone(),
            vsock_cid: match options.vsock {
                LabVsock::VhostDeviceVsock | LabVsock::Vstreamd => Some(HYBRID_VSOCK_CID),
                LabVsock::None => qemu::vhost_vsock_available().then(vsock_cid),
            },
            extra_kernel_args: with_env_words(
                &options.extra_kernel_args,
                "VSTREAM_LAB_KERNEL_ARGS",
            ),
            extra_qemu_args: with_env_words(&options.extra_qemu_args, "VSTREAM_LAB_QEMU_ARGS"),
            user_net: options.user_net,
            ivshmem: options.ivshmem.clone(),
        };
        let shared = Arc::new(LabShared {
            name: options.name.clone(),
            paths: paths.clone(),
            dumped: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        if let Ok(mut labs) = live_labs().lock() {
            labs.push(Arc::clone(&shared));
        }
        let lab = Lab {
            options,
            paths,
            verdict,
            spec,
            daemon: Mutex::new(None),
            vsock_backend: Mutex::new(None),
            qemu: Mutex::new(None),
            qmp_lock: Mutex::new(()),
            shared,
            boot_time: Mutex::new(None),
        };
        // On error `lab` is dropped here: children killed, logs printed.
        lab.start().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "booting lab {:?} ({}): {e}",
                    lab.options.name,
                    lab.paths.dir.display()
                ),
            )
        })?;
        Ok(lab)
    }

    fn start(&self) -> io::Result<()> {
        if self.options.start_daemon {
            self.start_daemon()?;
        }
        let s = &self.paths.sockets;
        for socket in [&s.vhost_rng, &s.vhost_keyboard].into_iter().flatten() {
            self.wait_for_vhost_user(socket)?;
        }
        match &self.paths.sockets.hybrid_vsock {
            Some(hybrid) if hybrid.vstreamd => self.wait_for_vhost_user(&hybrid.vhost_user)?,
            Some(hybrid) => self.start_vsock_backend(hybrid)?,
            None => {}
        }
        self.start_qemu()?;
        if self.options.wait_for_init {
            self.wait_for_init()?;
        }
        Ok(())
    }

    pub(super) fn start_daemon(&self) -> io::Result<()> {
        let p = &self.paths;
        fs::create_dir_all(&p.state_dir)?;
        let mut config = vstreamd_config(&self.options.name, &p.sockets);
        config.push_str(&self.options.extra_config);
        fs::write(&p.config, config)?;
        // Appended: a restarted vstreamd's log follows the one it replaces.
        let log = File::options()
            .create(true)
            .append(true)
            .open(&p.daemon_log)?;
        let mut command = p.vstreamd_command(log)?;
        // vstreamd's filter is VSTREAM_LOG. By default the transports' connection events too:
        // they tell why a guest never came up, and cost little.
        if std::env::var_os("VSTREAM_LOG").is_none() {
            command.env("VSTREAM_LOG", "info,vstream_transport=debug");
        }
        // Ready when the control socket accepts a connection.
        self.start_child(
            &self.daemon,
            command,
            "vstreamd",
            &p.control,
            &p.daemon_log,
            || p.control.exists() && UnixStream::connect(&p.control).is_ok(),
        )
    }

    /// Waits for one of vstreamd's vhost-user sockets, which QEMU needs at start.
    fn wait_for_vhost_user(&self, socket: &Path) -> io::Result<()> {
        if process::wait_for_path(socket, Duration::from_secs(30)) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "vstreamd did not open {} within 30 s; its log:\n{}",
                socket.display(),
                tail(&self.paths.daemon_log, 30)
            ),
        ))
    }

    /// Starts vhost-device-vsock with only the hybrid Unix-socket backend (`uds-path`: nothing
    /// is forwarded to the host's own vsock) and waits for its vhost-user socket, which QEMU
    /// needs at start.
    fn start_vsock_backend(&self, hybrid: &HybridVsockSockets) -> io::Result<()> {
        let bin = paths::vhost_device_vsock().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "vhost-device-vsock not found (in PATH or $CARGO_HOME/bin): run ./x.sh setup, \
                     which installs version {}",
                    paths::VHOST_DEVICE_VSOCK_VERSION
                ),
            )
        })?;
        let log = File::create(&self.paths.vsock_backend_log)?;
        let mut command = Command::new(&bin);
        command
            .arg("--vm")
            .arg(format!(
                "guest-cid={HYBRID_VSOCK_CID},socket={},uds-path={}",
                hybrid.vhost_user.display(),
                hybrid.uds.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        self.start_child(
            &self.vsock_backend,
            command,
            &bin.display().to_string(),
            &hybrid.vhost_user,
            &self.paths.vsock_backend_log,
            || hybrid.vhost_user.exists(),
        )
    }

    /// Spawns `command` as the child of `slot` and waits up to 30 s until `ready` (it opened
    /// `opens`). `name` and the tail of `log` (its output) tell what failed.
    fn start_child(
        &self,
        slot: &Mutex<Option<Child>>,
        command: Command,
        name: &str,
        opens: &Path,
        log: &Path,
        ready: impl Fn() -> bool,
    ) -> io::Result<()> {
        let child = process::spawn(command)?;
        *slot
            .lock()
            .map_err(|_| io::Error::other("lab lock poisoned"))? = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.child_exited(slot)? {
                return Err(io::Error::other(format!(
                    "{name} exited ({status}) before opening {}; its output:\n{}",
                    opens.display(),
                    tail(log, 30)
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{name} did not open {} within 30 s", opens.display()),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_qemu(&self) -> io::Result<()> {
        let mut command = self.spec.command().map_err(io_err)?;
        let log = File::create(&self.paths.qemu_log)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = process::spawn(command)?;
        *self
            .qemu
            .lock()
            .map_err(|_| io::Error::other("lab lock poisoned"))? = Some(child);
        Ok(())
    }

    pub(super) fn child_exited(
        &self,
        slot: &Mutex<Option<Child>>,
    ) -> io::Result<Option<std::process::ExitStatus>> {
        let mut guard = slot
            .lock()
            .map_err(|_| io::Error::other("lab lock poisoned"))?;
        match guard.as_mut() {
            Some(child) => child.try_wait(),
            None => Ok(None),
        }
    }

    /// The error to report if QEMU is no longer running.
    pub(super) fn check_qemu(&self) -> io::Result<()> {
        if let Some(status) = self.child_exited(&self.qemu)? {
            return Err(io::Error::other(format!(
                "QEMU exited ({status}); its output:\n{}",
                tail(&self.paths.qemu_log, 20)
            )));
        }
        Ok(())
    }

    fn wait_for_init(&self) -> io::Result<()> {
        let started = Instant::now();
        let deadline = started + self.options.boot_timeout;
        loop {
            let log = self.raw_console_log();
            if let Some(panic_at) = log.find("Kernel panic") {
                let line = log[panic_at..].lines().next().unwrap_or("").to_string();
                return Err(io::Error::other(format!(
                    "the guest kernel panicked: {line}"
                )));
            }
            if log.contains(INIT_DONE_MARKER) {
                if let Ok(mut t) = self.boot_time.lock() {
                    *t = Some(started.elapsed());
                }
                return self.check_boot_report(&log);
            }
            self.check_qemu()?;
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the guest did not print {INIT_DONE_MARKER:?} within {} s ({} accelerator)",
                        self.options.boot_timeout.as_secs(),
                        self.verdict.accel
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Checks what `/init` reported: every module loaded, the PCI serial is where the agent looks.
    fn check_boot_report(&self, log: &str) -> io::Result<()> {
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("vstream-lab: module "))
            .collect();
        if !failed.is_empty() {
            return Err(io::Error::other(format!(
                "guest modules failed to load:\n{}",
                failed.join("\n")
            )));
        }
        if self.options.pci_serial {
            let reported = log
                .lines()
                .find_map(|l| l.split("vstream-lab: pci serial ").nth(1))
                .and_then(|rest| rest.split_whitespace().next());
            if reported != Some(PCI_SERIAL_TTY) {
                return Err(io::Error::other(format!(
                    "the PCI 16550 is {} in the guest, but the agent was told /dev/{PCI_SERIAL_TTY}",
                    reported.unwrap_or("not found")
                )));
            }
        }
        Ok(())
    }
}

/// `args`, then the words of environment variable `var`: what a person adds to every guest of a
/// run, e.g. `VSTREAM_LAB_QEMU_ARGS="-gdb tcp::1234"` and `VSTREAM_LAB_KERNEL_ARGS=nokaslr` to
/// sample where a guest spends its time (`cargo xtask guest-profile`).
fn with_env_words(args: &[String], var: &str) -> Vec<String> {
    let extra = std::env::var(var).unwrap_or_default();
    args.iter()
        .cloned()
        .chain(extra.split_whitespace().map(str::to_owned))
        .collect()
}
