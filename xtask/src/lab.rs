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
//! the directory), `VSTREAM_LAB_ACCEL=kvm|tcg`, `VSTREAM_SKIP_E2E=1` (see [`e2e_enabled`]), `RUST_LOG`
//! (passed to vstreamd, default `debug`), plus the paths of [`crate::paths`].

pub mod testing;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::accel::{self, Accel, Verdict};
use crate::image::{self, GuestImage, INIT_DONE_MARKER};
use crate::pty::PtyProcess;
use crate::qemu::{
    self, GuestSockets, HybridVsockSockets, QemuSpec, HYBRID_VSOCK_CID, PCI_SERIAL_TTY,
    VSOCK_LISTEN_PORT, VSOCK_MUX_PORT,
};
use crate::{paths, process, qmp};

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

/// The guest's vsock device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabVsock {
    /// In-kernel vhost-vsock when the host has `/dev/vhost-vsock` (nothing carries the mux
    /// over it), else none.
    #[default]
    None,
    /// QEMU's `vhost-user-vsock-pci` served by rust-vmm's vhost-device-vsock (started by the
    /// lab, CID [`HYBRID_VSOCK_CID`]) with its hybrid Unix-socket backend. The mux runs over it
    /// both ways: the agent connects to `vsock:2:5000` (vstreamd listens on
    /// `unix-listen:<uds>_5000`) and listens on `vsock-listen:5001` (vstreamd connects with
    /// `hvsock:<uds>:5001`).
    VhostDeviceVsock,
    /// The same QEMU device served by vstreamd itself (`vhost-user-vsock:` transport, CID
    /// [`HYBRID_VSOCK_CID`]): the agent's `vsock:2:5000` ends in vstreamd directly, and
    /// `hvsock:<uds>:5001` goes through vstreamd's own hybrid socket.
    Vstreamd,
}

/// How a lab guest is wired.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Guest name: vstreamd's `[[guest]] name`, `vstream.name=`, the hostname.
    pub name: String,
    /// Carry the mux over the virtio-serial port `org.vstream.0`.
    pub virtio_port: bool,
    /// Carry the mux over the PCI 16550 (`/dev/ttyS4` in the guest).
    pub pci_serial: bool,
    /// Start vstreamd (false: the sockets are left for the test to connect to).
    pub start_daemon: bool,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Wait for `/init`'s marker in [`Lab::boot`].
    pub wait_for_init: bool,
    /// Limit for reaching the marker.
    pub boot_timeout: Duration,
    /// Appended to the kernel command line.
    pub extra_kernel_args: Vec<String>,
    /// Appended to the QEMU command line.
    pub extra_qemu_args: Vec<String>,
    /// Appended to the generated vstreamd config (TOML), e.g. a `[guest.printer]` table of
    /// the lab guest.
    pub extra_config: String,
    /// Also give the guest a virtio-net NIC on QEMU's user-mode network (see
    /// [`crate::qemu::QemuSpec::user_net`]).
    pub user_net: bool,
    /// QEMU CPU model instead of the accelerator's default (`host` or `max`), e.g. `qemu64`
    /// for a CPU without RDRAND.
    pub cpu: Option<String>,
    /// Give the guest a virtio-rng device. Without it and without RDRAND (see [`Self::cpu`])
    /// the guest kernel's CRNG stays uninitialised long after boot, as on many real hosts.
    pub virtio_rng: bool,
    /// The guest's vsock device, and whether the mux runs over it.
    pub vsock: LabVsock,
    /// Give the guest a `vhost-user-rng-pci` device served by vstreamd (a `random-vhost-user`
    /// transport named `hwrng`, drawing from the guest's `[guest.random]` budget).
    pub vhost_rng: bool,
    /// Give the guest a `vhost-user-input-pci` keyboard served by vstreamd (a `hid-vhost-user`
    /// transport named `keyboard`): `vstreamctl input` reaches it with no agent. QEMU 7.2's
    /// device needs KVM (under TCG QEMU exits: "vhost initialization failed: requires kvm").
    pub vhost_input: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            name: "lab".to_string(),
            virtio_port: true,
            pci_serial: true,
            start_daemon: true,
            memory_mib: 512,
            wait_for_init: true,
            boot_timeout: env_secs("VSTREAM_LAB_BOOT_TIMEOUT").unwrap_or(DEFAULT_BOOT_TIMEOUT),
            extra_kernel_args: Vec::new(),
            extra_qemu_args: Vec::new(),
            extra_config: String::new(),
            user_net: false,
            cpu: None,
            virtio_rng: true,
            vsock: LabVsock::None,
            vhost_rng: false,
            vhost_input: false,
        }
    }
}

impl LabOptions {
    /// The mux over the virtio-serial port only.
    pub fn virtio_port_only() -> Self {
        Self {
            pci_serial: false,
            ..Self::default()
        }
    }

    /// The mux over the PCI 16550 only.
    pub fn pci_serial_only() -> Self {
        Self {
            virtio_port: false,
            ..Self::default()
        }
    }

    /// The mux over vsock only (vhost-device-vsock, both directions).
    pub fn vsock_only() -> Self {
        Self {
            virtio_port: false,
            pci_serial: false,
            vsock: LabVsock::VhostDeviceVsock,
            ..Self::default()
        }
    }

    /// Sets the guest name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
}

/// The files of one lab, all inside [`LabPaths::dir`].
#[derive(Debug, Clone)]
pub struct LabPaths {
    /// The lab's temporary directory.
    pub dir: PathBuf,
    /// vstreamd's control socket (`vstreamctl --control`).
    pub control: PathBuf,
    /// The generated vstreamd config.
    pub config: PathBuf,
    /// vstreamd's `--state-dir`.
    pub state_dir: PathBuf,
    /// vstreamd's stdout and stderr.
    pub daemon_log: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
    /// vhost-device-vsock's stdout and stderr (with [`LabVsock::VhostDeviceVsock`]).
    pub vsock_backend_log: PathBuf,
    /// The guest's chardev and QMP sockets, and QEMU's ttyS0 logfile.
    pub sockets: GuestSockets,
}

impl LabPaths {
    fn new(dir: PathBuf, options: &LabOptions) -> Self {
        let sockets = GuestSockets {
            hvc0: dir.join("hvc0.sock"),
            ttys0: dir.join("ttyS0.sock"),
            ttys0_logfile: dir.join("ttyS0.raw.log"),
            mux_port: options.virtio_port.then(|| dir.join("port.sock")),
            mux_serial: options.pci_serial.then(|| dir.join("serial.sock")),
            hybrid_vsock: (options.vsock != LabVsock::None).then(|| HybridVsockSockets {
                vstreamd: options.vsock == LabVsock::Vstreamd,
                vhost_user: dir.join("vhost-user-vsock.sock"),
                uds: dir.join("vsock.sock"),
            }),
            vhost_rng: options.vhost_rng.then(|| dir.join("rng.sock")),
            vhost_keyboard: options.vhost_input.then(|| dir.join("keyboard.sock")),
            qmp_daemon: dir.join("qmp.sock"),
            qmp_lab: dir.join("qmp-lab.sock"),
        };
        Self {
            control: dir.join("control.sock"),
            config: dir.join("vstreamd.toml"),
            state_dir: dir.join("state"),
            daemon_log: dir.join("vstreamd.log"),
            qemu_log: dir.join("qemu.log"),
            vsock_backend_log: dir.join("vhost-device-vsock.log"),
            sockets,
            dir,
        }
    }

    /// Where vstreamd spools the print jobs of guest `guest`.
    pub fn spool_dir(&self, guest: &str) -> PathBuf {
        self.state_dir.join(guest).join("spool")
    }

    /// Where vstreamd records console `name` of guest `guest`.
    pub fn console_log(&self, guest: &str, name: &str) -> PathBuf {
        self.state_dir.join(guest).join(format!("{name}.log"))
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The vstreamd config of one lab guest: its QMP socket, the mux transports and both consoles.
pub fn vstreamd_config(guest: &str, sockets: &GuestSockets) -> String {
    let unix = |p: &Path| toml_string(&format!("unix:{}", p.display()));
    let mut out = format!(
        "# Generated by the vstream lab (xtask/src/lab.rs).\n[[guest]]\nname = {}\nqmp = {}\n",
        toml_string(guest),
        unix(&sockets.qmp_daemon)
    );
    let mut transport = |kind: &str, name: Option<&str>, address: String| {
        out.push_str(&format!(
            "\n[[guest.transport]]\nkind = {}\n",
            toml_string(kind)
        ));
        if let Some(name) = name {
            out.push_str(&format!("name = {}\n", toml_string(name)));
        }
        out.push_str(&format!("address = {address}\n"));
    };
    for address in mux_addresses(sockets) {
        transport("mux", None, toml_string(&address));
    }
    transport("console", Some("hvc0"), unix(&sockets.hvc0));
    transport("console", Some("ttyS0"), unix(&sockets.ttys0));
    if let Some(rng) = &sockets.vhost_rng {
        let address = toml_string(&format!("unix-listen:{}", rng.display()));
        transport("random-vhost-user", Some("hwrng"), address);
    }
    if let Some(kbd) = &sockets.vhost_keyboard {
        let address = toml_string(&format!("unix-listen:{}", kbd.display()));
        transport("hid-vhost-user", Some("keyboard"), address);
    }
    out
}

/// The addresses of a guest's mux transports as vstreamd's config and status have them. Over
/// vhost-device-vsock these are a per-guest listener on the hybrid socket's `_<port>` path (the
/// path is the guest's identity: its peer is the backend process, whatever the guest) and the
/// hybrid socket itself.
pub fn mux_addresses(sockets: &GuestSockets) -> Vec<String> {
    let mut out: Vec<String> = [&sockets.mux_port, &sockets.mux_serial]
        .into_iter()
        .flatten()
        .map(|p| format!("unix:{}", p.display()))
        .collect();
    if let Some(hybrid) = &sockets.hybrid_vsock {
        if hybrid.vstreamd {
            out.push(format!(
                "vhost-user-vsock:{},cid={HYBRID_VSOCK_CID},port={VSOCK_MUX_PORT},uds={}",
                hybrid.vhost_user.display(),
                hybrid.uds.display()
            ));
        } else {
            out.push(format!(
                "unix-listen:{}",
                hybrid.host_port(VSOCK_MUX_PORT).display()
            ));
        }
        out.push(format!(
            "hvsock:{}:{VSOCK_LISTEN_PORT}",
            hybrid.uds.display()
        ));
    }
    out
}

/// The part of a lab the process-wide safety nets (panic hook, watchdog, exit) need.
struct LabShared {
    name: String,
    paths: LabPaths,
    dumped: AtomicBool,
    closed: AtomicBool,
}

fn live_labs() -> &'static Mutex<Vec<Arc<LabShared>>> {
    static LABS: OnceLock<Mutex<Vec<Arc<LabShared>>>> = OnceLock::new();
    LABS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Set once any thread panicked: lab directories are then kept for inspection.
static PANICKED: AtomicBool = AtomicBool::new(false);

fn keep_dirs() -> bool {
    PANICKED.load(Ordering::SeqCst)
        || std::env::var("VSTREAM_LAB_KEEP")
            .map(|v| v == "1")
            .unwrap_or(false)
}

/// Removes `\r` and ANSI escape sequences (colours, cursor queries), so a dump reads as plain text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters and intermediates, then one final byte in '@'..='~'.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    let mut data = Vec::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .is_err()
    {
        return format!("({} does not exist)\n", path.display());
    }
    let text = strip_ansi(&String::from_utf8_lossy(&data));
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return format!("({} is empty)\n", path.display());
    }
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    for line in &all[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl LabShared {
    fn report(&self, why: &str) -> String {
        let p = &self.paths;
        let mut out = format!(
            "\n==== vstream lab {:?}: {why}; its files are in {} ====\n",
            self.name,
            p.dir.display()
        );
        out.push_str(&format!(
            "---- guest console ttyS0, last {TAIL_LINES} lines (QEMU's copy {}) ----\n",
            p.sockets.ttys0_logfile.display()
        ));
        out.push_str(&tail(&p.sockets.ttys0_logfile, TAIL_LINES));
        let hvc0 = p.console_log(&self.name, "hvc0");
        if hvc0.exists() {
            out.push_str(&format!(
                "---- guest console hvc0, last 20 lines ({}) ----\n",
                hvc0.display()
            ));
            out.push_str(&tail(&hvc0, 20));
        }
        out.push_str(&format!(
            "---- vstreamd log, last {TAIL_LINES} lines ({}) ----\n",
            p.daemon_log.display()
        ));
        out.push_str(&tail(&p.daemon_log, TAIL_LINES));
        let backend = fs::read_to_string(&p.vsock_backend_log).unwrap_or_default();
        if !backend.trim().is_empty() {
            out.push_str(&format!(
                "---- vhost-device-vsock output ({}) ----\n",
                p.vsock_backend_log.display()
            ));
            out.push_str(&tail(&p.vsock_backend_log, 20));
        }
        let qemu = fs::read_to_string(&p.qemu_log).unwrap_or_default();
        if !qemu.trim().is_empty() {
            out.push_str(&format!(
                "---- QEMU output ({}) ----\n",
                p.qemu_log.display()
            ));
            out.push_str(&tail(&p.qemu_log, 20));
        }
        out.push_str(&format!("==== end of vstream lab {:?} ====\n", self.name));
        out
    }

    /// Prints the report once.
    fn dump(&self, why: &str) {
        if !self.dumped.swap(true, Ordering::SeqCst) {
            eprint!("{}", self.report(why));
        }
    }
}

/// Panic hook, exit handler and watchdog, installed once per process.
fn install_safety_nets() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            PANICKED.store(true, Ordering::SeqCst);
            // try_lock: the panic may have happened while the list was locked.
            if let Ok(labs) = live_labs().try_lock() {
                for lab in labs.iter() {
                    lab.dump("a test panicked");
                }
            }
        }));
        // SAFETY: atexit registers a plain `extern "C" fn()` that lives for the whole program.
        unsafe {
            libc::atexit(at_exit);
        }
        let limit = env_secs("VSTREAM_LAB_TIMEOUT").unwrap_or(DEFAULT_HARD_TIMEOUT);
        let _ = thread::Builder::new()
            .name("lab-watchdog".into())
            .spawn(move || {
                thread::sleep(limit);
                let _ = writeln!(
                    io::stderr(),
                    "\nvstream-lab: HARD TIMEOUT: this test binary has run labs for {} s \
                 (VSTREAM_LAB_TIMEOUT); killing the guests and exiting",
                    limit.as_secs()
                );
                PANICKED.store(true, Ordering::SeqCst);
                if let Ok(labs) = live_labs().try_lock() {
                    for lab in labs.iter() {
                        let _ = io::stderr().write_all(lab.report("hard timeout").as_bytes());
                    }
                }
                process::kill_all();
                std::process::exit(3);
            });
    });
}

/// At process exit (a `static` lab is never dropped): kill what is left and remove the directories.
extern "C" fn at_exit() {
    process::kill_all();
    let Ok(labs) = live_labs().try_lock() else {
        return;
    };
    for lab in labs.iter() {
        if lab.closed.swap(true, Ordering::SeqCst) {
            continue;
        }
        if keep_dirs() {
            let _ = writeln!(
                io::stderr(),
                "vstream-lab: kept {}",
                lab.paths.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&lab.paths.dir);
        }
    }
}

fn make_lab_dir(name: &str) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vstream-lab-{safe}-{}-{n}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

fn vsock_cid() -> u32 {
    // CIDs 0-2 are reserved; derive one from the pid so parallel test binaries do not collide.
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    3 + (std::process::id() % 0x00ff_ffff) * 16 + COUNTER.fetch_add(1, Ordering::SeqCst) % 16
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
            extra_kernel_args: options.extra_kernel_args.clone(),
            extra_qemu_args: options.extra_qemu_args.clone(),
            user_net: options.user_net,
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

    fn start_daemon(&self) -> io::Result<()> {
        let p = &self.paths;
        fs::create_dir_all(&p.state_dir)?;
        let mut config = vstreamd_config(&self.options.name, &p.sockets);
        config.push_str(&self.options.extra_config);
        fs::write(&p.config, config)?;
        let bin = paths::host_bin("vstreamd");
        // Appended: a restarted vstreamd's log follows the one it replaces.
        let log = File::options()
            .create(true)
            .append(true)
            .open(&p.daemon_log)?;
        let mut command = Command::new(&bin);
        command
            .arg("--control")
            .arg(&p.control)
            .arg("--config")
            .arg(&p.config)
            .arg("--state-dir")
            .arg(&p.state_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "debug");
        }
        // Its log is a file: no colour codes.
        command.env("NO_COLOR", "1");
        let child = process::spawn(command)?;
        *self
            .daemon
            .lock()
            .map_err(|_| io::Error::other("lab lock poisoned"))? = Some(child);

        // Ready when the control socket accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if p.control.exists() && UnixStream::connect(&p.control).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child_exited(&self.daemon)? {
                return Err(io::Error::other(format!(
                    "vstreamd exited ({status}) before opening its control socket; its log:\n{}",
                    tail(&p.daemon_log, 30)
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("vstreamd did not open {} within 30 s", p.control.display()),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for one of vstreamd's vhost-user sockets, which QEMU needs at start.
    fn wait_for_vhost_user(&self, socket: &Path) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "vstreamd did not open {} within 30 s; its log:\n{}",
                        socket.display(),
                        tail(&self.paths.daemon_log, 30)
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
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
        let child = process::spawn(command)?;
        *self
            .vsock_backend
            .lock()
            .map_err(|_| io::Error::other("lab lock poisoned"))? = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if hybrid.vhost_user.exists() {
                return Ok(());
            }
            if let Some(status) = self.child_exited(&self.vsock_backend)? {
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before opening {}; its output:\n{}",
                    bin.display(),
                    hybrid.vhost_user.display(),
                    tail(&self.paths.vsock_backend_log, 30)
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not open {} within 30 s",
                        bin.display(),
                        hybrid.vhost_user.display()
                    ),
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

    fn child_exited(
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
    fn check_qemu(&self) -> io::Result<()> {
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

    /// A `vstreamctl --control <socket>` command, for callers that run it themselves (e.g. on a pty).
    pub fn ctl_command(&self) -> Command {
        let mut command = Command::new(paths::host_bin("vstreamctl"));
        command.arg("--control").arg(&self.paths.control);
        command
    }

    /// Runs `vstreamctl --control <socket> ARGS` (stdin empty, at most [`CTL_TIMEOUT`]).
    pub fn ctl<I, S>(&self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctl_with_input(args, &[])
    }

    /// Runs `vstreamctl --control <socket> ARGS` with `input` on its stdin (then EOF), at most
    /// [`CTL_TIMEOUT`].
    pub fn ctl_with_input<I, S>(&self, args: I, input: &[u8]) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctl_within(args, input, CTL_TIMEOUT)
    }

    /// Runs `vstreamctl --control <socket> ARGS` with `input` on its stdin (then EOF; the command
    /// may exit without reading it all), at most `timeout`.
    pub fn ctl_within<I, S>(&self, args: I, input: &[u8], timeout: Duration) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.ctl_command();
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = format!("{command:?}");
        let mut child = process::spawn(command)?;
        let stdin = child.stdin.take();
        let input = input.to_vec();
        // Fed from a thread: the child's stdout must be drained at the same time.
        let in_writer = thread::spawn(move || {
            if let Some(mut s) = stdin {
                let _ = s.write_all(&input);
            }
        });
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let out_reader = thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        });
        let err_reader = thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        });
        let status = process::wait_timeout(&mut child, timeout)?;
        let Some(status) = status else {
            process::terminate(&mut child, Duration::from_millis(200));
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{shown} did not finish within {timeout:?}"),
            ));
        };
        let _ = in_writer.join();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// `vstreamctl status --json`, parsed.
    pub fn status(&self) -> io::Result<Value> {
        let out = self.ctl(["status", "--json"])?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "vstreamctl status --json failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "vstreamctl status --json printed no JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                ),
            )
        })
    }

    /// Polls `status --json` until `predicate` holds; the error tells what was last seen.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut predicate: impl FnMut(&Value) -> bool,
    ) -> io::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status() {
                Ok(status) if predicate(&status) => return Ok(status),
                Ok(status) => format!("last status: {status}"),
                Err(e) => format!("last error: {e}"),
            };
            self.check_qemu()?;
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "timed out after {} s waiting for {what}; {last}",
                        timeout.as_secs()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// True if every mux transport of this guest is `"up"` in `status`.
    pub fn mux_transports_up(&self, status: &Value) -> bool {
        let addresses = self.mux_addresses();
        !addresses.is_empty()
            && addresses
                .iter()
                .all(|a| transport_state(status, self.name(), a) == Some("up"))
    }

    /// What vstreamd recorded of console `name` (`"ttyS0"`, `"hvc0"`), lossy text.
    pub fn console_log(&self, name: &str) -> String {
        let data = fs::read(self.paths.console_log(self.name(), name)).unwrap_or_default();
        String::from_utf8_lossy(&data).into_owned()
    }

    /// vstreamd's log of the kernel console (ttyS0).
    pub fn guest_console_log(&self) -> String {
        self.console_log("ttyS0")
    }

    /// QEMU's own copy of ttyS0 (independent of vstreamd).
    pub fn raw_console_log(&self) -> String {
        let data = fs::read(&self.paths.sockets.ttys0_logfile).unwrap_or_default();
        String::from_utf8_lossy(&data).into_owned()
    }

    /// vstreamd's stdout and stderr so far.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(&self.paths.daemon_log).unwrap_or_default()
    }

    /// Waits until vstreamd's log of console `name` contains `needle`.
    pub fn wait_for_console(&self, name: &str, needle: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console_log(name).contains(needle) {
                return Ok(());
            }
            self.check_qemu()?;
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{needle:?} did not appear in vstreamd's {name} log {} within {} s",
                        self.paths.console_log(self.name(), name).display(),
                        timeout.as_secs()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Attaches `vstreamctl console <guest> --name <console>` on a pty, types `line` and Enter until
    /// `expect` shows up (input typed before vstreamd has attached the console is lost, so the line is
    /// typed again every 5 s), then detaches with Ctrl-]. Returns everything the terminal showed.
    pub fn console_roundtrip(
        &self,
        console: &str,
        line: &str,
        expect: &str,
        timeout: Duration,
    ) -> io::Result<String> {
        let mut command = self.ctl_command();
        command.args(["console", self.name(), "--name", console]);
        let mut pty = PtyProcess::spawn(command)?;
        let deadline = Instant::now() + timeout;
        // Until vstreamctl has put the terminal in raw mode, the pty itself would echo what we type:
        // wait for its first words (or 3 s) before typing.
        let first_words = Instant::now() + Duration::from_secs(3);
        while pty.mark() == 0 && Instant::now() < first_words {
            thread::sleep(Duration::from_millis(20));
        }
        loop {
            let mark = pty.mark();
            pty.send(format!("{line}\r").as_bytes())?;
            let left = deadline.saturating_duration_since(Instant::now());
            match pty.expect_after(mark, expect, left.min(Duration::from_secs(5))) {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline && pty.wait_timeout(Duration::ZERO)?.is_none() => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "typing {line:?} into {console} of {}: {expect:?} never showed up within {} s; \
                             the terminal showed:\n{}",
                            self.name(),
                            timeout.as_secs(),
                            pty.output_text()
                        ),
                    ))
                }
            }
        }
        // Let the rest of the output (and the next prompt) arrive before detaching.
        pty.wait_quiet(Duration::from_millis(300), Duration::from_secs(3));
        let shown = pty.output_text();
        pty.send(b"\x1d")?;
        if pty.wait_timeout(Duration::from_secs(10))?.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`vstreamctl console` did not detach within 10 s of Ctrl-]; the terminal showed:\n{shown}"),
            ));
        }
        Ok(shown)
    }

    /// Runs a QMP command on the lab's own monitor (vstreamd has another one).
    pub fn qmp(&self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let _guard = self
            .qmp_lock
            .lock()
            .map_err(|_| io::Error::other("QMP lock poisoned"))?;
        qmp::execute(
            &self.paths.sockets.qmp_lab,
            command,
            arguments,
            Duration::from_secs(10),
        )
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

/// The entry of guest `guest` in a `status --json` document.
pub fn guest_status<'a>(status: &'a Value, guest: &str) -> Option<&'a Value> {
    status
        .get("guests")?
        .as_array()?
        .iter()
        .find(|g| g.get("name").and_then(Value::as_str) == Some(guest))
}

/// The `state` of the transport with `address` of guest `guest` in a `status --json` document.
pub fn transport_state<'a>(status: &'a Value, guest: &str, address: &str) -> Option<&'a str> {
    guest_status(status, guest)?
        .get("transports")?
        .as_array()?
        .iter()
        .find(|t| t.get("address").and_then(Value::as_str) == Some(address))?
        .get("state")?
        .as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sockets(dir: &Path, port: bool, serial: bool) -> GuestSockets {
        LabPaths::new(
            dir.to_path_buf(),
            &LabOptions {
                virtio_port: port,
                pci_serial: serial,
                ..LabOptions::default()
            },
        )
        .sockets
    }

    #[test]
    fn config_has_the_contract_shape() {
        let cfg = vstreamd_config("lab", &sockets(Path::new("/tmp/x"), true, true));
        let expected = "[[guest]]\nname = \"lab\"\nqmp = \"unix:/tmp/x/qmp.sock\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"unix:/tmp/x/port.sock\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"unix:/tmp/x/serial.sock\"\n\n\
[[guest.transport]]\nkind = \"console\"\nname = \"hvc0\"\naddress = \"unix:/tmp/x/hvc0.sock\"\n\n\
[[guest.transport]]\nkind = \"console\"\nname = \"ttyS0\"\naddress = \"unix:/tmp/x/ttyS0.sock\"\n";
        assert!(cfg.ends_with(expected), "{cfg}");
        let only_serial = vstreamd_config("g", &sockets(Path::new("/t"), false, true));
        assert!(!only_serial.contains("port.sock"));
        assert!(only_serial.contains("serial.sock"));
    }

    #[test]
    fn a_vsock_guest_has_both_hybrid_transports_and_no_other_mux() {
        let sockets = LabPaths::new(PathBuf::from("/tmp/v"), &LabOptions::vsock_only()).sockets;
        let cfg = vstreamd_config("v", &sockets);
        let expected = "[[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:/tmp/v/vsock.sock_5000\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"hvsock:/tmp/v/vsock.sock:5001\"\n\n\
[[guest.transport]]\nkind = \"console\"";
        assert!(cfg.contains(expected), "{cfg}");
        assert!(
            !cfg.contains("port.sock") && !cfg.contains("serial.sock"),
            "{cfg}"
        );
    }

    #[test]
    fn a_guest_served_by_vstreamd_has_its_device_as_transport() {
        let options = LabOptions {
            vsock: LabVsock::Vstreamd,
            ..LabOptions::vsock_only()
        };
        let sockets = LabPaths::new(PathBuf::from("/tmp/v"), &options).sockets;
        let cfg = vstreamd_config("v", &sockets);
        let expected = "[[guest.transport]]\nkind = \"mux\"\naddress = \"vhost-user-vsock:/tmp/v/vhost-user-vsock.sock,cid=3,port=5000,uds=/tmp/v/vsock.sock\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"hvsock:/tmp/v/vsock.sock:5001\"\n\n";
        assert!(cfg.contains(expected), "{cfg}");
        assert!(
            !cfg.contains("_5000"),
            "no listener of vhost-device-vsock's: {cfg}"
        );
    }

    #[test]
    fn a_vhost_rng_guest_has_its_random_vhost_user_transport() {
        let options = LabOptions {
            vhost_rng: true,
            ..LabOptions::default()
        };
        let sockets = LabPaths::new(PathBuf::from("/tmp/r"), &options).sockets;
        let cfg = vstreamd_config("r", &sockets);
        let expected = "[[guest.transport]]\nkind = \"random-vhost-user\"\nname = \"hwrng\"\naddress = \"unix-listen:/tmp/r/rng.sock\"\n";
        assert!(cfg.ends_with(expected), "{cfg}");
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m x\r\n# \x1b[6n"),
            "2026  INFO x\n# "
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn transport_state_lookup() {
        let status = json!({"guests": [{"name": "lab", "transports": [
            {"kind": "mux", "address": "unix:/a", "state": "up", "since": 1},
            {"kind": "mux", "address": "unix:/b", "state": "down", "since": 1}]}]});
        assert_eq!(transport_state(&status, "lab", "unix:/a"), Some("up"));
        assert_eq!(transport_state(&status, "lab", "unix:/b"), Some("down"));
        assert_eq!(transport_state(&status, "other", "unix:/a"), None);
    }
}
