//! The guest half: runs QGA commands for vstream-agent, on mux channels of class `qga` and on a
//! raw stream such as the virtio-serial port `org.qemu.guest_agent.0`.
//!
//! [`GuestAgent::handle_text`] is the whole protocol for one request text, synchronous and
//! testable without sockets; [`serve`] moves bytes between a stream and it (one request at a
//! time per stream, each in a blocking-pool thread so a slow disk never stalls the runtime);
//! [`serve_address`] keeps a raw transport served forever.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vstream_link::ChannelStream;
use vstream_transport::{Address, Endpoint};

use super::*;
use crate::{ServeFuture, Service};

/// Where the agent looks for things, and how it powers off. [`Settings::default`] is the real
/// system; tests point the files elsewhere.
#[derive(Debug, Clone)]
pub struct Settings {
    /// When set, `guest-shutdown` runs `PROGRAM MODE` (`powerdown`, `reboot` or `halt`) instead
    /// of shutting the system down itself: for containers and tests, where the agent must not
    /// power off the machine it shares. From `VSTREAM_QGA_SHUTDOWN_COMMAND`.
    pub shutdown_command: Option<PathBuf>,
    /// The user database (`guest-ssh-*`).
    pub passwd: PathBuf,
    /// The login records (`guest-get-users`).
    pub utmp: PathBuf,
    /// os-release(5) files, the first readable one is used.
    pub os_release: Vec<PathBuf>,
    /// The mount table (`guest-get-fsinfo`, `guest-fsfreeze-*`).
    pub mountinfo: PathBuf,
    /// Real-time clock devices, the first present one is used (`guest-set-time`).
    pub rtc: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            shutdown_command: None,
            passwd: "/etc/passwd".into(),
            utmp: "/var/run/utmp".into(),
            os_release: vec!["/etc/os-release".into(), "/usr/lib/os-release".into()],
            mountinfo: "/proc/self/mountinfo".into(),
            rtc: vec!["/dev/rtc0".into(), "/dev/rtc".into()],
        }
    }
}

impl Settings {
    /// The defaults, with `VSTREAM_QGA_SHUTDOWN_COMMAND` if set.
    pub fn from_env() -> Settings {
        Settings {
            shutdown_command: std::env::var_os("VSTREAM_QGA_SHUTDOWN_COMMAND")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ..Settings::default()
        }
    }
}

/// The agent's state, shared by every connection: open files, started processes, freeze state.
pub struct GuestAgent {
    settings: Settings,
    state: Mutex<State>,
    /// Captured exec output held, for all processes (bounded by [`EXEC_OUTPUT_BUDGET`]).
    captured: Arc<AtomicUsize>,
    /// Held while freezing or thawing.
    freezing: Mutex<()>,
}

struct State {
    files: BTreeMap<i64, OpenFile>,
    next_handle: i64,
    procs: HashMap<i64, Arc<Proc>>,
    frozen: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one command must not take the agent down for the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `strerror` text of an I/O error, without Rust's " (os error N)" suffix (qemu-ga's wording).
fn errstr(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn to_value<T: Serialize>(v: T) -> Result<Option<Value>, QgaError> {
    serde_json::to_value(v)
        .map(Some)
        .map_err(|e| QgaError::generic(format!("cannot encode the reply: {e}")))
}

/// Reads at most `limit` bytes of a file.
fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    read_bounded(path, limit).map(|b| String::from_utf8_lossy(&b).into_owned())
}

impl GuestAgent {
    /// An agent with these settings (one per process is the rule; see [`GuestAgent::global`]).
    pub fn new(settings: Settings) -> GuestAgent {
        GuestAgent {
            settings,
            state: Mutex::new(State {
                files: BTreeMap::new(),
                next_handle: 1000,
                procs: HashMap::new(),
                frozen: false,
            }),
            captured: Arc::new(AtomicUsize::new(0)),
            freezing: Mutex::new(()),
        }
    }

    /// The process-wide agent (settings from the environment), shared by the mux service and
    /// the raw port, as qemu-ga shares its state between clients.
    pub fn global() -> Arc<GuestAgent> {
        GuestAgent::global_with(Settings::from_env)
    }

    /// The process-wide agent, made with `settings` if this is the first use (an embedding
    /// program or a test that must not let `guest-shutdown` power the machine off calls this
    /// before anything else; check [`GuestAgent::settings`] to be sure).
    pub fn global_with(settings: impl FnOnce() -> Settings) -> Arc<GuestAgent> {
        static GLOBAL: OnceLock<Arc<GuestAgent>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Arc::new(GuestAgent::new(settings())))
            .clone()
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether file systems were frozen by this agent.
    pub fn is_frozen(&self) -> bool {
        lock(&self.state).frozen
    }

    /// Answers one request text: the reply bytes (with the 0xFF prefix for
    /// `guest-sync-delimited` and a final newline), or `None` when the command sends no reply.
    pub fn handle_text(&self, text: &[u8]) -> Option<Vec<u8>> {
        let (id, result, delimited) = match Request::parse(text) {
            Err((id, e)) => (id, Err(e), false),
            Ok(req) => {
                let delimited = req.execute == "guest-sync-delimited";
                match self.run(&req.execute, req.arguments) {
                    Ok(None) => return None,
                    Ok(Some(v)) => (req.id, Ok(v), delimited),
                    Err(e) => (req.id, Err(e), false),
                }
            }
        };
        Some(encode_reply(&reply(id, result), delimited))
    }

    /// Runs one command by name: `Ok(None)` means no reply is due.
    pub fn run(
        &self,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<Option<Value>, QgaError> {
        let Some(spec) = command_spec(name) else {
            return Err(QgaError::command_not_found(name));
        };
        if !spec.allowed_frozen && self.is_frozen() {
            return Err(QgaError::disabled(name, "the agent is in frozen state"));
        }
        let cmd = Command::parse(name, arguments)?;
        self.execute(cmd)
    }

    /// Runs a parsed command.
    pub fn execute(&self, cmd: Command) -> Result<Option<Value>, QgaError> {
        match cmd {
            Command::Sync { id } | Command::SyncDelimited { id } => to_value(id),
            Command::Ping => to_value(Map::new()),
            Command::Info => to_value(self.info()),
            Command::Shutdown { mode } => self.shutdown(mode).map(|()| None),
            Command::GetTime => to_value(get_time()?),
            Command::SetTime { time } => {
                self.set_time(time)?;
                to_value(Map::new())
            }
            Command::GetOsinfo => to_value(self.osinfo()),
            Command::GetHostName => to_value(GuestHostName {
                host_name: uname_field(|u| &u.nodename).unwrap_or_default(),
            }),
            Command::GetTimezone => to_value(timezone()),
            Command::GetUsers => to_value(self.users()?),
            Command::GetLoad => to_value(load()?),
            Command::GetVcpus => to_value(vcpus()?),
            Command::NetworkGetInterfaces => to_value(interfaces()?),
            Command::GetFsinfo => to_value(self.fsinfo()?),
            Command::FsfreezeStatus => to_value(if self.is_frozen() { "frozen" } else { "thawed" }),
            Command::FsfreezeFreeze => to_value(self.freeze(None)?),
            Command::FsfreezeFreezeList { mountpoints } => {
                to_value(self.freeze(Some(mountpoints.unwrap_or_default()))?)
            }
            Command::FsfreezeThaw => to_value(self.thaw()?),
            Command::Exec(args) => to_value(self.exec(args)?),
            Command::ExecStatus { pid } => to_value(self.exec_status(pid)?),
            Command::FileOpen { path, mode } => to_value(self.file_open(&path, mode.as_deref())?),
            Command::FileClose { handle } => {
                self.file_close(handle)?;
                to_value(Map::new())
            }
            Command::FileRead { handle, count } => to_value(self.file_read(handle, count)?),
            Command::FileWrite {
                handle,
                buf_b64,
                count,
            } => to_value(self.file_write(handle, &buf_b64, count)?),
            Command::FileSeek {
                handle,
                offset,
                whence,
            } => to_value(self.file_seek(handle, offset, whence)?),
            Command::FileFlush { handle } => {
                self.file(handle)?;
                // Writes go straight to the kernel: there is no user-space buffer to flush.
                to_value(Map::new())
            }
            Command::SshGetAuthorizedKeys { username } => to_value(GuestAuthorizedKeys {
                keys: self.ssh_keys(&username)?.1,
            }),
            Command::SshAddAuthorizedKeys {
                username,
                keys,
                reset,
            } => {
                self.ssh_add(&username, &keys, reset)?;
                to_value(Map::new())
            }
            Command::SshRemoveAuthorizedKeys { username, keys } => {
                self.ssh_remove(&username, &keys)?;
                to_value(Map::new())
            }
        }
    }

    fn info(&self) -> GuestAgentInfo {
        let frozen = self.is_frozen();
        GuestAgentInfo {
            version: AGENT_VERSION.to_owned(),
            supported_commands: COMMANDS
                .iter()
                .map(|c| GuestAgentCommandInfo {
                    name: c.name.to_owned(),
                    enabled: !frozen || c.allowed_frozen,
                    success_response: c.success_response,
                })
                .collect(),
        }
    }
}

/// The bytes of a reply: 0xFF first if `delimited`, the JSON, a newline.
pub fn encode_reply(value: &Value, delimited: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if delimited {
        out.push(DELIMITER);
    }
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    out.push(b'\n');
    out
}

// ---------------------------------------------------------------------------------------------
// Power.

/// A program in the usual system directories.
fn find_program(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn run_program(program: &Path, args: &[&str]) -> Result<(), QgaError> {
    let status = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            QgaError::generic(format!("cannot run {}: {}", program.display(), errstr(&e)))
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(QgaError::generic(format!(
            "child process has failed to shutdown: {} {} ({status})",
            program.display(),
            args.join(" ")
        )))
    }
}

/// Whether PID 1 is busybox's init, which shuts down cleanly on a signal (what busybox's
/// `poweroff` sends). A shell script as PID 1 (`#!/bin/sh` /init) is not.
fn pid1_is_busybox_init() -> bool {
    let Ok(cmdline) = read_bounded(Path::new("/proc/1/cmdline"), 4096) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let base = Path::new(OsStr::from_bytes(argv0)).file_name();
    let exe = std::fs::read_link("/proc/1/exe").unwrap_or_default();
    matches!(base.and_then(OsStr::to_str), Some("init" | "linuxrc"))
        && exe.file_name().and_then(OsStr::to_str) == Some("busybox")
}

impl GuestAgent {
    /// Shuts the system down; returns only on failure (or after the configured command ran).
    fn shutdown(&self, mode: ShutdownMode) -> Result<(), QgaError> {
        tracing::info!(mode = mode.as_str(), "guest-shutdown");
        if let Some(program) = &self.settings.shutdown_command {
            return run_program(program, &[mode.as_str()]);
        }
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        // 1. systemd: let it stop the services.
        if Path::new("/run/systemd/system").is_dir() {
            if let Some(systemctl) = find_program("systemctl") {
                let verb = match mode {
                    ShutdownMode::Powerdown => "poweroff",
                    ShutdownMode::Reboot => "reboot",
                    ShutdownMode::Halt => "halt",
                };
                return run_program(&systemctl, &[verb]);
            }
        }
        // 2. A System V style shutdown(8) (busybox has none; a busybox symlink is not one).
        if let Some(shutdown) = find_program("shutdown") {
            let target = std::fs::canonicalize(&shutdown).unwrap_or_default();
            if target.file_name().and_then(OsStr::to_str) != Some("busybox") {
                let flag = match mode {
                    ShutdownMode::Powerdown => "-P",
                    ShutdownMode::Reboot => "-r",
                    ShutdownMode::Halt => "-H",
                };
                return run_program(&shutdown, &[flag, "+0", "hypervisor initiated shutdown"]);
            }
        }
        // 3. busybox init: the signal its poweroff/reboot/halt applets send.
        if pid1_is_busybox_init() {
            let sig = match mode {
                ShutdownMode::Powerdown => libc::SIGUSR2,
                ShutdownMode::Reboot => libc::SIGTERM,
                ShutdownMode::Halt => libc::SIGUSR1,
            };
            // SAFETY: kill(2) with a valid signal number; it only fails, it has no UB.
            if unsafe { libc::kill(1, sig) } == 0 {
                return Ok(());
            }
        }
        // 4. No init to ask (a script as PID 1, as in a busybox initramfs): file systems were
        // synced above; stop the machine now.
        let cmd = match mode {
            ShutdownMode::Powerdown => libc::RB_POWER_OFF,
            ShutdownMode::Reboot => libc::RB_AUTOBOOT,
            ShutdownMode::Halt => libc::RB_HALT_SYSTEM,
        };
        // SAFETY: sync(2) again for writes since the first; reboot(2) with a valid command; it
        // returns only on failure.
        let rc = unsafe {
            libc::sync();
            libc::reboot(cmd)
        };
        debug_assert!(rc != 0);
        Err(QgaError::generic(format!(
            "reboot(2) failed: {}",
            errstr(&io::Error::last_os_error())
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Time.

/// `struct rtc_time` of linux/rtc.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RtcTime {
    tm_sec: libc::c_int,
    tm_min: libc::c_int,
    tm_hour: libc::c_int,
    tm_mday: libc::c_int,
    tm_mon: libc::c_int,
    tm_year: libc::c_int,
    tm_wday: libc::c_int,
    tm_yday: libc::c_int,
    tm_isdst: libc::c_int,
}

/// Linux `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const RTC_RD_TIME: u32 = ioc(IOC_READ, b'p', 0x09, std::mem::size_of::<RtcTime>());
const RTC_SET_TIME: u32 = ioc(IOC_WRITE, b'p', 0x0a, std::mem::size_of::<RtcTime>());
const FIFREEZE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    b'X',
    119,
    std::mem::size_of::<libc::c_int>(),
);
const FITHAW: u32 = ioc(
    IOC_READ | IOC_WRITE,
    b'X',
    120,
    std::mem::size_of::<libc::c_int>(),
);

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1-12).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month 1-12, day) of a day number since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn rtc_to_unix(t: &RtcTime) -> Option<i64> {
    let ok = (0..=60).contains(&t.tm_sec)
        && (0..60).contains(&t.tm_min)
        && (0..24).contains(&t.tm_hour)
        && (1..=31).contains(&t.tm_mday)
        && (0..12).contains(&t.tm_mon);
    if !ok {
        return None;
    }
    let days = days_from_civil(
        i64::from(t.tm_year) + 1900,
        t.tm_mon as u32 + 1,
        t.tm_mday as u32,
    );
    Some(
        days * 86_400
            + i64::from(t.tm_hour) * 3600
            + i64::from(t.tm_min) * 60
            + i64::from(t.tm_sec),
    )
}

fn unix_to_rtc(secs: i64) -> RtcTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    RtcTime {
        tm_sec: (rem % 60) as i32,
        tm_min: (rem / 60 % 60) as i32,
        tm_hour: (rem / 3600) as i32,
        tm_mday: d as i32,
        tm_mon: m as i32 - 1,
        tm_year: (y - 1900) as i32,
        tm_wday: (days + 4).rem_euclid(7) as i32,
        tm_yday: (days - days_from_civil(y, 1, 1)) as i32,
        tm_isdst: 0,
    }
}

fn get_time() -> Result<i64, QgaError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return Err(QgaError::io(
            "Failed to get time",
            &io::Error::last_os_error(),
        ));
    }
    ts.tv_sec
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(ts.tv_nsec))
        .ok_or_else(|| QgaError::generic("Time is out of range"))
}

fn set_clock(ns: i64) -> Result<(), QgaError> {
    let ts = libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(QgaError::generic(format!(
            "Failed to set time to guest: {}",
            errstr(&io::Error::last_os_error())
        )));
    }
    Ok(())
}

impl GuestAgent {
    fn rtc_path(&self) -> Option<&PathBuf> {
        self.settings.rtc.iter().find(|p| p.exists())
    }

    /// With a time: sets the system clock, then the RTC (UTC) if there is one. Without: sets the
    /// system clock from the RTC (`hwclock --hctosys --utc`).
    fn set_time(&self, time: Option<i64>) -> Result<(), QgaError> {
        match time {
            Some(ns) => {
                set_clock(ns)?;
                if let Some(rtc) = self.rtc_path() {
                    let file = File::open(rtc).map_err(|e| QgaError::io(rtc.display(), &e))?;
                    let t = unix_to_rtc(ns.div_euclid(1_000_000_000));
                    // SAFETY: RTC_SET_TIME reads one struct rtc_time from the pointer.
                    let rc =
                        unsafe { libc::ioctl(file.as_raw_fd(), RTC_SET_TIME as libc::Ioctl, &t) };
                    if rc != 0 {
                        return Err(QgaError::io(
                            format!("cannot set the hardware clock {}", rtc.display()),
                            &io::Error::last_os_error(),
                        ));
                    }
                }
                Ok(())
            }
            None => {
                let Some(rtc) = self.rtc_path() else {
                    return Err(QgaError::generic(
                        "no hardware clock (/dev/rtc0) to read the time from; pass 'time'",
                    ));
                };
                let file = File::open(rtc).map_err(|e| QgaError::io(rtc.display(), &e))?;
                let mut t = RtcTime::default();
                // SAFETY: RTC_RD_TIME writes one struct rtc_time to the pointer.
                let rc =
                    unsafe { libc::ioctl(file.as_raw_fd(), RTC_RD_TIME as libc::Ioctl, &mut t) };
                if rc != 0 {
                    return Err(QgaError::io(
                        format!("cannot read the hardware clock {}", rtc.display()),
                        &io::Error::last_os_error(),
                    ));
                }
                let secs = rtc_to_unix(&t).ok_or_else(|| {
                    QgaError::generic(format!("the hardware clock holds an invalid time: {t:?}"))
                })?;
                set_clock(secs.saturating_mul(1_000_000_000))
            }
        }
    }
}

extern "C" {
    /// POSIX tzset(3) (not in the libc crate): loads TZ or /etc/localtime.
    fn tzset();
}

fn timezone() -> GuestTimezone {
    // SAFETY: time(NULL) is always valid; tzset reads TZ and /etc/localtime; localtime_r
    // writes into our tm; tm_zone then points into static storage of the C library (or is
    // null), valid until the next tzset, and is copied at once.
    unsafe {
        tzset();
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return GuestTimezone {
                zone: None,
                offset: 0,
            };
        }
        let zone = (!tm.tm_zone.is_null())
            .then(|| CStr::from_ptr(tm.tm_zone).to_string_lossy().into_owned());
        GuestTimezone {
            zone,
            offset: tm.tm_gmtoff,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Facts: OS, users, load, CPUs.

/// One field of uname(2).
fn uname_field(f: impl Fn(&libc::utsname) -> &[libc::c_char]) -> Option<String> {
    // SAFETY: utsname is plain data; uname fills it with NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is valid and writable.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let field = f(&u);
    let bytes: Vec<u8> = field
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The value of an os-release(5) assignment: quotes removed, backslash escapes resolved.
fn os_release_value(raw: &str) -> String {
    let raw = raw.trim();
    let (body, quote) = match raw.as_bytes().first() {
        Some(&q @ (b'"' | b'\'')) if raw.len() >= 2 && raw.ends_with(q as char) => {
            (&raw[1..raw.len() - 1], Some(q))
        }
        _ => (raw, None),
    };
    if quote == Some(b'\'') {
        return body.to_owned();
    }
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses os-release(5) text into the fields QGA reports.
pub(crate) fn parse_os_release(text: &str, info: &mut GuestOsInfo) {
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let slot = match key.trim() {
            "ID" => &mut info.id,
            "NAME" => &mut info.name,
            "PRETTY_NAME" => &mut info.pretty_name,
            "VERSION" => &mut info.version,
            "VERSION_ID" => &mut info.version_id,
            "VARIANT" => &mut info.variant,
            "VARIANT_ID" => &mut info.variant_id,
            _ => continue,
        };
        *slot = Some(os_release_value(value));
    }
}

/// Size of glibc's `struct utmp` on x86-64 (and the other 64-bit ABIs with 32-bit `ut_tv`).
pub(crate) const UTMP_RECORD: usize = 384;
const UT_USER_PROCESS: i16 = 7;

/// Logged-in users from utmp records: one entry per user, with their earliest login. Partial
/// trailing records are ignored; at most `UTMP_RECORD * 16384` bytes are read by the caller.
pub(crate) fn parse_utmp(data: &[u8]) -> Vec<GuestUser> {
    let mut users: Vec<GuestUser> = Vec::new();
    for rec in data.chunks_exact(UTMP_RECORD) {
        let ut_type = i16::from_ne_bytes([rec[0], rec[1]]);
        if ut_type != UT_USER_PROCESS {
            continue;
        }
        let user_field = &rec[44..76];
        let len = user_field.iter().position(|b| *b == 0).unwrap_or(32);
        if len == 0 {
            continue;
        }
        let user = String::from_utf8_lossy(&user_field[..len]).into_owned();
        let sec = i32::from_ne_bytes([rec[340], rec[341], rec[342], rec[343]]);
        let usec = i32::from_ne_bytes([rec[344], rec[345], rec[346], rec[347]]);
        let login = f64::from(sec) + f64::from(usec.clamp(0, 999_999)) / 1e6;
        match users.iter_mut().find(|u| u.user == user) {
            Some(u) => u.login_time = u.login_time.min(login),
            None => users.push(GuestUser {
                user,
                login_time: login,
                domain: None,
            }),
        }
    }
    users
}

/// /proc/loadavg's first three fields.
pub(crate) fn parse_loadavg(text: &str) -> Option<GuestLoadAverage> {
    let mut f = text.split_ascii_whitespace().map(str::parse::<f64>);
    Some(GuestLoadAverage {
        load1m: f.next()?.ok()?,
        load5m: f.next()?.ok()?,
        load15m: f.next()?.ok()?,
    })
}

fn load() -> Result<GuestLoadAverage, QgaError> {
    let text = read_text(Path::new("/proc/loadavg"), 4096)
        .map_err(|e| QgaError::io("cannot read /proc/loadavg", &e))?;
    parse_loadavg(&text)
        .ok_or_else(|| QgaError::generic(format!("cannot parse /proc/loadavg: {text:?}")))
}

fn vcpus() -> Result<Vec<GuestLogicalProcessor>, QgaError> {
    let dir = Path::new("/sys/devices/system/cpu");
    let entries = std::fs::read_dir(dir).map_err(|e| QgaError::io(dir.display(), &e))?;
    let mut cpus = Vec::new();
    for entry in entries.flatten().take(65_536) {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cpu"))
            .and_then(|n| n.parse::<i64>().ok())
        else {
            continue;
        };
        let online_file = entry.path().join("online");
        let (online, can_offline) = match read_text(&online_file, 16) {
            Ok(s) => (s.trim() == "1", true),
            Err(_) => (true, false), // cpu0 often has no "online": it cannot go offline.
        };
        cpus.push(GuestLogicalProcessor {
            logical_id: id,
            online,
            can_offline: Some(can_offline),
        });
    }
    cpus.sort_by_key(|c| c.logical_id);
    Ok(cpus)
}

impl GuestAgent {
    fn osinfo(&self) -> GuestOsInfo {
        let mut info = GuestOsInfo {
            kernel_release: uname_field(|u| &u.release),
            kernel_version: uname_field(|u| &u.version),
            machine: uname_field(|u| &u.machine),
            ..GuestOsInfo::default()
        };
        if let Some(text) = self
            .settings
            .os_release
            .iter()
            .find_map(|p| read_text(p, 64 * 1024).ok())
        {
            parse_os_release(&text, &mut info);
        }
        info
    }

    fn users(&self) -> Result<Vec<GuestUser>, QgaError> {
        match read_bounded(&self.settings.utmp, (UTMP_RECORD * 16_384) as u64) {
            Ok(data) => Ok(parse_utmp(&data)),
            // No utmp (no login manager, as in an initramfs): nobody is logged in.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(QgaError::io(self.settings.utmp.display(), &e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network interfaces.

fn prefix_len(mask: &[u8]) -> i64 {
    mask.iter().map(|b| i64::from(b.count_ones())).sum()
}

/// /proc/net/dev counters by interface.
pub(crate) fn parse_net_dev(text: &str) -> HashMap<String, GuestNetworkInterfaceStat> {
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_ascii_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() < 12 {
            continue;
        }
        out.insert(
            name.trim().to_owned(),
            GuestNetworkInterfaceStat {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errs: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errs: v[10],
                tx_dropped: v[11],
            },
        );
    }
    out
}

/// Frees the getifaddrs list when dropped.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(self.0) }
    }
}

fn interfaces() -> Result<Vec<GuestNetworkInterface>, QgaError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores a list head in `head`; it is freed by IfAddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(QgaError::io(
            "getifaddrs failed",
            &io::Error::last_os_error(),
        ));
    }
    let list = IfAddrs(head);
    let stats = read_text(Path::new("/proc/net/dev"), 1024 * 1024)
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default();
    let mut out: Vec<GuestNetworkInterface> = Vec::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list, valid until `list` is dropped below.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let idx = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                out.push(GuestNetworkInterface {
                    statistics: stats.get(&name).cloned(),
                    name,
                    hardware_address: None,
                    ip_addresses: None,
                });
                out.len() - 1
            }
        };
        let iface = &mut out[idx];
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr at least as large as its family's type, as
        // getifaddrs guarantees for AF_PACKET, AF_INET and AF_INET6; netmask likewise.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_PACKET => {
                // SAFETY: see above: an AF_PACKET address is a sockaddr_ll.
                let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
                let n = usize::from(ll.sll_halen).min(ll.sll_addr.len());
                if n > 0 {
                    iface.hardware_address = Some(
                        ll.sll_addr[..n]
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    );
                }
                None
            }
            libc::AF_INET => {
                // SAFETY: see above: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: the netmask has the address's family.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                    prefix_len(&m.sin_addr.s_addr.to_ne_bytes())
                };
                Some(GuestIpAddress {
                    ip_address: ip.to_string(),
                    ip_address_type: "ipv4".into(),
                    prefix,
                })
            }
            libc::AF_INET6 => {
                // SAFETY: see above: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: the netmask has the address's family.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                    prefix_len(&m.sin6_addr.s6_addr)
                };
                Some(GuestIpAddress {
                    ip_address: ip.to_string(),
                    ip_address_type: "ipv6".into(),
                    prefix,
                })
            }
            _ => None,
        };
        if let Some(a) = addr {
            iface.ip_addresses.get_or_insert_with(Vec::new).push(a);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// File systems.

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mountpoint: String,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 3 {
            continue;
        }
        let Some((maj, min)) = fields[2].split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else {
            continue;
        };
        out.push(Mount {
            major,
            minor,
            mountpoint: unescape_mount(fields[4]),
            fs_type: unescape_mount(fields[sep + 1]),
            source: unescape_mount(fields[sep + 2]),
        });
    }
    out
}

const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "ceph",
    "glusterfs",
    "9p",
    "afs",
    "ncpfs",
    "fuse.sshfs",
    "virtiofs",
];

/// File systems on a block device (not virtual, not network): what fsinfo lists and freeze
/// freezes, as in qemu-ga.
pub(crate) fn is_disk_mount(m: &Mount) -> bool {
    (m.major != 0 || m.source.starts_with("/dev/")) && !NETWORK_FS.contains(&m.fs_type.as_str())
}

/// A PCI address `DDDD:BB:SS.F` in a sysfs path component.
fn parse_pci(s: &str) -> Option<GuestPciAddress> {
    let (dom, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    if dom.len() != 4 || bus.len() != 2 || slot.len() != 2 || func.len() != 1 {
        return None;
    }
    Some(GuestPciAddress {
        domain: i64::from_str_radix(dom, 16).ok()?,
        bus: i64::from_str_radix(bus, 16).ok()?,
        slot: i64::from_str_radix(slot, 16).ok()?,
        function: i64::from_str_radix(func, 16).ok()?,
    })
}

/// The disk address of a whole-disk sysfs device path such as
/// `/sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda`.
pub(crate) fn disk_address(sys_path: &str, dev_name: &str) -> Option<GuestDiskAddress> {
    let parts: Vec<&str> = sys_path.split('/').collect();
    let pci = parts.iter().rev().find_map(|p| parse_pci(p))?;
    let scsi = parts.iter().rev().find_map(|p| {
        let n: Vec<i64> = p.split(':').map_while(|x| x.parse().ok()).collect();
        (n.len() == 4 && p.split(':').count() == 4).then(|| (n[1], n[2], n[3]))
    });
    let has = |needle: &str| parts.iter().any(|p| p.starts_with(needle));
    let bus_type = if has("usb") {
        "usb"
    } else if has("ata") {
        "sata"
    } else if scsi.is_some() {
        "scsi"
    } else if has("virtio") {
        "virtio"
    } else if has("ide") {
        "ide"
    } else {
        "unknown"
    };
    let (bus, target, unit) = scsi.unwrap_or((0, 0, 0));
    Some(GuestDiskAddress {
        pci_controller: pci,
        bus_type: bus_type.into(),
        bus,
        target,
        unit,
        serial: None,
        dev: Some(format!("/dev/{dev_name}")),
    })
}

/// The disks under a block device (following device-mapper and md slaves), at most 16.
fn disks_of(sys: &Path, depth: u32, out: &mut Vec<GuestDiskAddress>) {
    if depth > 4 || out.len() >= 16 {
        return;
    }
    // A partition's disk is its parent directory.
    let disk = if sys.join("partition").exists() {
        sys.parent().unwrap_or(sys).to_path_buf()
    } else {
        sys.to_path_buf()
    };
    if let Ok(slaves) = std::fs::read_dir(disk.join("slaves")) {
        let slaves: Vec<PathBuf> = slaves
            .flatten()
            .filter_map(|e| std::fs::canonicalize(e.path()).ok())
            .take(16)
            .collect();
        if !slaves.is_empty() {
            for s in slaves {
                disks_of(&s, depth + 1, out);
            }
            return;
        }
    }
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(mut addr) = disk_address(&disk.to_string_lossy(), &name) {
        addr.serial = ["serial", "device/serial"]
            .iter()
            .find_map(|f| read_text(&disk.join(f), 256).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        out.push(addr);
    }
}

fn statvfs(path: &str) -> Option<libc::statvfs> {
    let c = CString::new(path).ok()?;
    // SAFETY: statvfs is plain data, filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, st writable.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then_some(st)
}

impl GuestAgent {
    fn mounts(&self) -> Result<Vec<Mount>, QgaError> {
        let text = read_text(&self.settings.mountinfo, 16 * 1024 * 1024)
            .map_err(|e| QgaError::io(self.settings.mountinfo.display(), &e))?;
        Ok(parse_mountinfo(&text)
            .into_iter()
            .filter(is_disk_mount)
            .collect())
    }

    fn fsinfo(&self) -> Result<Vec<GuestFilesystemInfo>, QgaError> {
        let mut out = Vec::new();
        for m in self.mounts()? {
            let sys = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", m.major, m.minor)).ok();
            let name = sys
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{}:{}", m.major, m.minor));
            let mut disk = Vec::new();
            if let Some(sys) = &sys {
                disks_of(sys, 0, &mut disk);
            }
            let (used, total, total_priv) = match statvfs(&m.mountpoint) {
                Some(st) => {
                    let frsize = st.f_frsize;
                    let used = st.f_blocks.saturating_sub(st.f_bfree);
                    (
                        Some(used.saturating_mul(frsize)),
                        Some(used.saturating_add(st.f_bavail).saturating_mul(frsize)),
                        Some(st.f_blocks.saturating_mul(frsize)),
                    )
                }
                None => (None, None, None),
            };
            out.push(GuestFilesystemInfo {
                name,
                mountpoint: m.mountpoint,
                fs_type: m.fs_type,
                used_bytes: used,
                total_bytes: total,
                total_bytes_privileged: total_priv,
                disk,
            });
        }
        Ok(out)
    }

    /// FIFREEZE on the disk file systems (all, or those in `only`), deepest mounts first.
    /// On an error, thaws what it froze and reports the error.
    fn freeze(&self, only: Option<Vec<String>>) -> Result<i64, QgaError> {
        let _busy = lock(&self.freezing);
        if self.is_frozen() {
            return Err(QgaError::generic(
                "The command guest-fsfreeze-freeze has been disabled: file systems are already frozen",
            ));
        }
        let mounts = self.mounts()?;
        let mut frozen: Vec<String> = Vec::new();
        for m in mounts.iter().rev() {
            if let Some(only) = &only {
                if !only.iter().any(|p| p == &m.mountpoint) {
                    continue;
                }
            }
            if frozen.contains(&m.mountpoint) {
                continue;
            }
            match fs_ioctl(&m.mountpoint, FIFREEZE) {
                Ok(()) => frozen.push(m.mountpoint.clone()),
                // Not freezable, or frozen by someone else already: qemu-ga skips both.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EBUSY)) => {}
                Err(e) => {
                    for p in &frozen {
                        let _ = fs_ioctl(p, FITHAW);
                    }
                    return Err(QgaError::generic(format!(
                        "failed to freeze {}: {}",
                        m.mountpoint,
                        errstr(&e)
                    )));
                }
            }
        }
        if !frozen.is_empty() {
            lock(&self.state).frozen = true;
            tracing::info!(count = frozen.len(), "file systems frozen: {frozen:?}");
        }
        Ok(frozen.len() as i64)
    }

    /// FITHAW on every disk file system (frozen by us or not, as qemu-ga: a restarted agent
    /// can still thaw); returns how many were thawed.
    fn thaw(&self) -> Result<i64, QgaError> {
        let _busy = lock(&self.freezing);
        let mut count = 0;
        for m in self.mounts()? {
            if fs_ioctl(&m.mountpoint, FITHAW).is_ok() {
                count += 1;
            }
        }
        lock(&self.state).frozen = false;
        Ok(count)
    }
}

fn fs_ioctl(mountpoint: &str, request: u32) -> io::Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mountpoint)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument; the fd is an open directory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as libc::Ioctl, &mut arg) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Exec.

struct Proc {
    state: Mutex<ProcState>,
}

#[derive(Default)]
struct ProcState {
    status: Option<std::process::ExitStatus>,
    out: Output,
    err: Output,
    /// Output readers still running.
    readers: u8,
    /// Bytes counted against the agent's budget.
    held: usize,
}

#[derive(Default)]
struct Output {
    enabled: bool,
    data: Vec<u8>,
    truncated: bool,
}

#[derive(Clone, Copy)]
enum Which {
    Out,
    Err,
}

/// Takes up to `want` bytes from the shared budget; returns how many it got.
fn reserve(budget: &AtomicUsize, want: usize) -> usize {
    let mut cur = budget.load(Ordering::Relaxed);
    loop {
        let got = want.min(EXEC_OUTPUT_BUDGET.saturating_sub(cur));
        if got == 0 {
            return 0;
        }
        match budget.compare_exchange_weak(cur, cur + got, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return got,
            Err(now) => cur = now,
        }
    }
}

/// Reads a child's pipe to its end, keeping what the limits allow.
fn capture(proc: Arc<Proc>, budget: Arc<AtomicUsize>, mut pipe: impl Read, which: Which) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut st = lock(&proc.state);
        let out = match which {
            Which::Out => &mut st.out,
            Which::Err => &mut st.err,
        };
        let room = MAX_EXEC_OUTPUT.saturating_sub(out.data.len());
        let got = reserve(&budget, n.min(room));
        out.data.extend_from_slice(&buf[..got]);
        if got < n {
            out.truncated = true;
        }
        st.held += got;
    }
    lock(&proc.state).readers -= 1;
}

impl GuestAgent {
    fn exec(&self, a: ExecArgs) -> Result<GuestExec, QgaError> {
        if lock(&self.state).procs.len() >= MAX_PROCESSES {
            return Err(QgaError::generic(format!(
                "too many processes: {MAX_PROCESSES} started by guest-exec are running or not yet \
                 collected with guest-exec-status"
            )));
        }
        let input = match &a.input_data {
            Some(b64) => Some(
                base64_decode(b64)
                    .ok_or_else(|| QgaError::invalid_value("input-data", "base64 data"))?,
            ),
            None => None,
        };
        let mut cmd = std::process::Command::new(&a.path);
        cmd.args(&a.arg);
        if let Some(env) = &a.env {
            cmd.env_clear();
            for (i, kv) in env.iter().enumerate() {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(QgaError::invalid_value(&format!("env[{i}]"), "KEY=VALUE"));
                };
                cmd.env(k, v);
            }
        }
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let (out_on, err_on) = match a.capture {
            Capture::None => (false, false),
            Capture::Stdout => (true, false),
            Capture::Stderr => (false, true),
            Capture::Separated => (true, true),
            Capture::Merged => (true, false),
        };
        let mut merged_reader = None;
        if a.capture == Capture::Merged {
            let (r, w) = io::pipe().map_err(|e| QgaError::io("cannot create a pipe", &e))?;
            let w2 = w
                .try_clone()
                .map_err(|e| QgaError::io("cannot create a pipe", &e))?;
            cmd.stdout(w).stderr(w2);
            merged_reader = Some(r);
        } else {
            cmd.stdout(if out_on {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stderr(if err_on {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        }
        let spawned = cmd.spawn();
        drop(cmd); // Closes our copies of the merged pipe's write end.
        let mut child = spawned.map_err(|e| {
            QgaError::generic(format!(
                "Guest agent command failed, error was 'Failed to execute child process \u{201c}{}\u{201d} ({})'",
                a.path,
                errstr(&e)
            ))
        })?;
        let pid = i64::from(child.id());
        let proc = Arc::new(Proc {
            state: Mutex::new(ProcState {
                out: Output {
                    enabled: out_on,
                    ..Output::default()
                },
                err: Output {
                    enabled: err_on,
                    ..Output::default()
                },
                ..ProcState::default()
            }),
        });
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f)
        };
        let mut readers: Vec<(Box<dyn Read + Send>, Which)> = Vec::new();
        if let Some(r) = merged_reader {
            readers.push((Box::new(r), Which::Out));
        }
        if let Some(o) = child.stdout.take() {
            readers.push((Box::new(o), Which::Out));
        }
        if let Some(e) = child.stderr.take() {
            readers.push((Box::new(e), Which::Err));
        }
        lock(&proc.state).readers = readers.len() as u8;
        for (pipe, which) in readers {
            let (p, b) = (proc.clone(), self.captured.clone());
            if let Err(e) = spawn(
                format!("qga-out-{pid}"),
                Box::new(move || capture(p, b, pipe, which)),
            ) {
                // The pipe went down with the closure: the child sees EPIPE, we see no data.
                lock(&proc.state).readers -= 1;
                tracing::warn!("guest-exec {pid}: cannot start an output reader: {e}");
            }
        }
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            let _ = spawn(
                format!("qga-in-{pid}"),
                Box::new(move || {
                    // A child that exits without reading its input is not an error.
                    let _ = stdin.write_all(&data);
                }),
            );
        }
        let p = proc.clone();
        let waiter = spawn(
            format!("qga-wait-{pid}"),
            Box::new(move || {
                let status = child.wait();
                let mut st = lock(&p.state);
                st.status = Some(status.unwrap_or_else(|_| ExitStatusExt::from_raw(255 << 8)));
            }),
        );
        if let Err(e) = waiter {
            // Cannot happen short of thread exhaustion; the child is then never reaped by us,
            // which init does when the agent exits.
            tracing::warn!("guest-exec {pid}: cannot start a waiter: {e}");
        }
        lock(&self.state).procs.insert(pid, proc);
        tracing::debug!(pid, path = %a.path, "guest-exec");
        Ok(GuestExec { pid })
    }

    fn exec_status(&self, pid: i64) -> Result<GuestExecStatus, QgaError> {
        let proc = lock(&self.state)
            .procs
            .get(&pid)
            .cloned()
            .ok_or_else(|| QgaError::invalid_parameter("pid"))?;
        let mut st = lock(&proc.state);
        let done = st.status.is_some() && st.readers == 0;
        if !done {
            return Ok(GuestExecStatus {
                exited: false,
                ..GuestExecStatus::default()
            });
        }
        let status = st.status.unwrap_or_else(|| ExitStatusExt::from_raw(0));
        let data = |o: &mut Output| {
            o.enabled
                .then(|| base64_encode(&std::mem::take(&mut o.data)))
        };
        let result = GuestExecStatus {
            exited: true,
            exitcode: status.code().map(i64::from),
            signal: status.signal().map(i64::from),
            out_data: data(&mut st.out),
            err_data: data(&mut st.err),
            out_truncated: (st.out.enabled && st.out.truncated).then_some(true),
            err_truncated: (st.err.enabled && st.err.truncated).then_some(true),
        };
        self.captured.fetch_sub(st.held, Ordering::AcqRel);
        st.held = 0;
        drop(st);
        lock(&self.state).procs.remove(&pid);
        Ok(result)
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

/// An open handle. A file opened with mode `w` is written under a temporary name and renamed
/// over its path by `guest-file-close` (`commit`), so that a copy cut short (the host gone, the
/// channel reset) never looks complete under the final name.
struct OpenFile {
    file: Arc<Mutex<File>>,
    commit: Option<Commit>,
}

/// Where a `w` handle's temporary file goes on `guest-file-close`.
struct Commit {
    temp: PathBuf,
    path: PathBuf,
}

/// The temporary name of handle `handle`'s file for `path`: next to it (so the rename stays
/// within one file system), and saying what it is if a cut copy leaves it behind.
fn partial_name(path: &Path, handle: i64) -> Option<PathBuf> {
    let mut name = path.file_name()?.to_owned();
    name.push(format!(".vstream-partial-{handle}"));
    Some(path.with_file_name(name))
}

/// Opens `path` for mode `w` as a temporary file to be renamed over it on close; `None` when
/// that cannot keep the meaning of writing to `path` (a symbolic link, a device, a FIFO, a file
/// with other hard links) or the directory refuses a new file: then the caller opens `path`
/// itself, as qemu-ga does.
fn open_for_commit(path: &Path, handle: i64, opts: &OpenOptions) -> Option<(File, Commit)> {
    use std::os::unix::fs::MetadataExt;
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() && m.nlink() == 1 => Some(m),
        Ok(_) => return None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => return None,
    };
    let temp = partial_name(path, handle)?;
    // Created exclusively, so a name planted in a shared directory (a symbolic link to some
    // other file) is never followed; a leftover of an earlier agent is replaced.
    let mut excl = opts.clone();
    excl.create_new(true);
    let file = match excl.open(&temp) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&temp).ok()?;
            excl.open(&temp).ok()?
        }
        r => r.ok()?,
    };
    if let Some(m) = existing {
        // The replacement keeps the file's owner and permissions (best effort: only root
        // may give a file away).
        let _ = rustix::fs::fchown(
            &file,
            Some(rustix::fs::Uid::from_raw(m.uid())),
            Some(rustix::fs::Gid::from_raw(m.gid())),
        );
        let _ = file.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777));
    }
    let path = path.to_owned();
    Some((file, Commit { temp, path }))
}

/// open(2) options for an fopen(3) mode.
fn open_options(mode: &str) -> Option<OpenOptions> {
    let mut o = OpenOptions::new();
    match mode {
        "r" | "rb" => o.read(true),
        "w" | "wb" => o.write(true).create(true).truncate(true),
        "a" | "ab" => o.append(true).create(true),
        "r+" | "rb+" | "r+b" => o.read(true).write(true),
        "w+" | "wb+" | "w+b" => o.read(true).write(true).create(true).truncate(true),
        "a+" | "ab+" | "a+b" => o.read(true).append(true).create(true),
        _ => return None,
    };
    // New files are private to their owner (qemu-ga 7.2 gives 0666 less the umask);
    // non-blocking, so a FIFO or a device cannot stall a command.
    o.mode(0o600).custom_flags(libc::O_NONBLOCK);
    Some(o)
}

impl GuestAgent {
    fn file(&self, handle: i64) -> Result<Arc<Mutex<File>>, QgaError> {
        lock(&self.state)
            .files
            .get(&handle)
            .map(|f| f.file.clone())
            .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))
    }

    fn file_open(&self, path: &str, mode: Option<&str>) -> Result<i64, QgaError> {
        let mode = mode.unwrap_or("r");
        let opts = open_options(mode)
            .ok_or_else(|| QgaError::generic(format!("invalid file open mode '{mode}'")))?;
        if lock(&self.state).files.len() >= MAX_OPEN_FILES {
            return Err(QgaError::generic(format!(
                "too many open files ({MAX_OPEN_FILES}); close some with guest-file-close"
            )));
        }
        // Taken before the open, for the temporary name; never reused, even if the open fails.
        let handle = {
            let mut st = lock(&self.state);
            st.next_handle += 1;
            st.next_handle - 1
        };
        let staged = matches!(mode, "w" | "wb")
            .then(|| open_for_commit(Path::new(path), handle, &opts))
            .flatten();
        let (file, commit) = match staged {
            Some((file, commit)) => (file, Some(commit)),
            None => {
                let file = opts.open(path).map_err(|e| {
                    QgaError::generic(format!(
                        "failed to open file '{path}' (mode: '{mode}'): {}",
                        errstr(&e)
                    ))
                })?;
                (file, None)
            }
        };
        let mut st = lock(&self.state);
        if st.files.len() >= MAX_OPEN_FILES {
            if let Some(c) = commit {
                let _ = std::fs::remove_file(c.temp);
            }
            return Err(QgaError::generic(format!(
                "too many open files ({MAX_OPEN_FILES}); close some with guest-file-close"
            )));
        }
        st.files.insert(
            handle,
            OpenFile {
                file: Arc::new(Mutex::new(file)),
                commit,
            },
        );
        tracing::debug!(handle, path, mode, "guest-file-open");
        Ok(handle)
    }

    fn file_close(&self, handle: i64) -> Result<(), QgaError> {
        let open = lock(&self.state)
            .files
            .remove(&handle)
            .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))?;
        let Some(c) = open.commit else {
            return Ok(());
        };
        std::fs::rename(&c.temp, &c.path).map_err(|e| {
            let _ = std::fs::remove_file(&c.temp);
            QgaError::generic(format!(
                "failed to close file '{}': cannot rename {} to it: {}",
                c.path.display(),
                c.temp.display(),
                errstr(&e)
            ))
        })
    }

    fn file_read(&self, handle: i64, count: Option<i64>) -> Result<GuestFileRead, QgaError> {
        let file = self.file(handle)?;
        let count = match count {
            None => DEFAULT_READ_COUNT,
            Some(n) if n < 0 => {
                return Err(QgaError::generic(format!(
                    "value '{n}' is invalid for argument count"
                )))
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(MAX_READ_COUNT),
        };
        let mut buf = vec![0u8; count];
        let mut got = 0;
        let mut eof = false;
        let mut f = lock(&file);
        while got < count {
            match f.read(&mut buf[got..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(QgaError::io("failed to read file", &e)),
            }
        }
        buf.truncate(got);
        Ok(GuestFileRead {
            count: got as u64,
            buf_b64: base64_encode(&buf),
            eof,
        })
    }

    fn file_write(
        &self,
        handle: i64,
        b64: &str,
        count: Option<i64>,
    ) -> Result<GuestFileWrite, QgaError> {
        let file = self.file(handle)?;
        let data =
            base64_decode(b64).ok_or_else(|| QgaError::generic("Base64 data is not valid"))?;
        let count = match count {
            None => data.len(),
            Some(n) if n < 0 || n as u64 > data.len() as u64 => {
                return Err(QgaError::generic(format!(
                    "value '{n}' is invalid for argument count"
                )))
            }
            Some(n) => n as usize,
        };
        let mut f = lock(&file);
        let mut done = 0;
        while done < count {
            match f.write(&data[done..count]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(QgaError::io("failed to write to file", &e)),
            }
        }
        Ok(GuestFileWrite {
            count: done as u64,
            eof: false,
        })
    }

    fn file_seek(
        &self,
        handle: i64,
        offset: i64,
        whence: Whence,
    ) -> Result<GuestFileSeek, QgaError> {
        let file = self.file(handle)?;
        let pos = match whence {
            Whence::Set => {
                let off = u64::try_from(offset)
                    .map_err(|_| QgaError::generic("failed to seek file: Invalid argument"))?;
                SeekFrom::Start(off)
            }
            Whence::Cur => SeekFrom::Current(offset),
            Whence::End => SeekFrom::End(offset),
        };
        let position = lock(&file)
            .seek(pos)
            .map_err(|e| QgaError::io("failed to seek file", &e))?;
        Ok(GuestFileSeek {
            position,
            eof: false,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// SSH authorized keys.

/// A user's entry in the passwd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Passwd {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Finds `user` in passwd(5) text.
pub(crate) fn parse_passwd(text: &str, user: &str) -> Option<Passwd> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && f[0] == user).then_some(())?;
        Some(Passwd {
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(f[5]),
        })
    })
}

fn check_key(key: &str) -> Result<(), QgaError> {
    let k = key.trim();
    if k.is_empty() || k.starts_with('#') || key.contains(['\n', '\r', '\0']) || !k.contains(' ') {
        return Err(QgaError::generic(format!(
            "invalid OpenSSH public key: '{key}'"
        )));
    }
    Ok(())
}

impl GuestAgent {
    fn passwd(&self, user: &str) -> Result<Passwd, QgaError> {
        let text = read_text(&self.settings.passwd, 16 * 1024 * 1024)
            .map_err(|e| QgaError::io(self.settings.passwd.display(), &e))?;
        parse_passwd(&text, user).ok_or_else(|| {
            QgaError::generic(format!(
                "failed to get passwd entry for user '{user}' ({})",
                self.settings.passwd.display()
            ))
        })
    }

    /// The user's entry and their keys (non-empty, non-comment lines).
    fn ssh_keys(&self, user: &str) -> Result<(Passwd, Vec<String>), QgaError> {
        let pw = self.passwd(user)?;
        let path = pw.home.join(".ssh/authorized_keys");
        let keys = match read_text(&path, 16 * 1024 * 1024) {
            Ok(t) => t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(QgaError::io(path.display(), &e)),
        };
        Ok((pw, keys))
    }

    fn ssh_add(&self, user: &str, keys: &[String], reset: bool) -> Result<(), QgaError> {
        for k in keys {
            check_key(k)?;
        }
        let (pw, mut have) = self.ssh_keys(user)?;
        if reset {
            have.clear();
        }
        for k in keys {
            let k = k.trim().to_owned();
            if !have.contains(&k) {
                have.push(k);
            }
        }
        write_authorized_keys(&pw, &have)
    }

    fn ssh_remove(&self, user: &str, keys: &[String]) -> Result<(), QgaError> {
        for k in keys {
            check_key(k)?;
        }
        let (pw, have) = self.ssh_keys(user)?;
        let keep: Vec<String> = have
            .into_iter()
            .filter(|h| !keys.iter().any(|k| k.trim() == h))
            .collect();
        write_authorized_keys(&pw, &keep)
    }
}

/// Writes `~/.ssh/authorized_keys` (0600, in `~/.ssh` 0700, both owned by the user) through a
/// new file renamed over the old one; never follows a symlink planted by the user.
fn write_authorized_keys(pw: &Passwd, keys: &[String]) -> Result<(), QgaError> {
    let dir = pw.home.join(".ssh");
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(QgaError::generic(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(&dir).map_err(|e| QgaError::io(dir.display(), &e))?;
            std::os::unix::fs::chown(&dir, Some(pw.uid), Some(pw.gid))
                .map_err(|e| QgaError::io(format!("cannot chown {}", dir.display()), &e))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| QgaError::io(dir.display(), &e))?;
        }
        Err(e) => return Err(QgaError::io(dir.display(), &e)),
    }
    let path = dir.join("authorized_keys");
    let tmp = dir.join(format!(".authorized_keys.vstream-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut text = keys.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::os::unix::fs::fchown(&f, Some(pw.uid), Some(pw.gid))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(QgaError::io(path.display(), &e));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Serving.

/// Serves QGA on one byte stream until the peer closes it: requests in, replies out, in order.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    agent: Arc<GuestAgent>,
    stream: S,
) -> io::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut framer = Framer::new(MAX_REQUEST);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        framer.push(&buf[..n]);
        while let Some(frame) = framer.next_frame() {
            let out = match frame {
                Frame::Text(text) => {
                    let a = agent.clone();
                    match tokio::task::spawn_blocking(move || a.handle_text(&text)).await {
                        Ok(reply) => reply,
                        Err(e) => Some(encode_reply(
                            &reply(None, Err(QgaError::generic(format!("internal error: {e}")))),
                            false,
                        )),
                    }
                }
                Frame::TooLarge { size } => Some(encode_reply(
                    &reply(
                        None,
                        Err(QgaError::generic(format!(
                            "request too large: {size} bytes (at most {MAX_REQUEST})"
                        ))),
                    ),
                    false,
                )),
                Frame::Delimiter { .. } => None,
            };
            if let Some(out) = out {
                w.write_all(&out).await?;
                w.flush().await?;
            }
        }
    }
}

/// The guest half as a mux service (class `qga`).
pub struct QgaService {
    agent: Arc<GuestAgent>,
}

impl QgaService {
    /// Serves channels with this agent.
    pub fn new(agent: Arc<GuestAgent>) -> QgaService {
        QgaService { agent }
    }

    /// Serves channels with the process-wide agent ([`GuestAgent::global`]).
    pub fn global() -> QgaService {
        QgaService::new(GuestAgent::global())
    }
}

impl Service for QgaService {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let agent = self.agent.clone();
        Box::pin(async move {
            if let Err(e) = serve(agent, stream).await {
                tracing::debug!(channel = %name, "qga channel ended: {e}");
            }
        })
    }
}

/// Serves QGA on a raw transport forever (`vstream-agent --qga ADDR`): a device such as
/// `port:org.qemu.guest_agent.0` is reopened after each client; listeners accept clients
/// concurrently. Errors are logged once per change and retried.
pub async fn serve_address(agent: Arc<GuestAgent>, address: Address) {
    let listener = matches!(
        address,
        Address::UnixListen(_) | Address::TcpListen { .. } | Address::VsockListen { .. }
    );
    let mut last_error = String::new();
    let mut note = |e: &io::Error| {
        let e = e.to_string();
        if e != last_error {
            tracing::warn!(%address, "qga: {e}");
            last_error = e;
        }
    };
    let mut endpoint = loop {
        match Endpoint::bind(address.clone()).await {
            Ok(ep) => break ep,
            Err(e) => {
                note(&e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!(%address, "serving QGA");
    loop {
        match endpoint.next().await {
            Ok(conn) => {
                tracing::debug!(%address, peer = %conn.peer, "qga client");
                let a = agent.clone();
                let job = async move {
                    if let Err(e) = serve(a, conn.stream).await {
                        tracing::debug!("qga client ended: {e}");
                    }
                };
                if listener {
                    tokio::spawn(job);
                } else {
                    job.await;
                    // A device reports end of file while the host side is closed; do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Err(e) => {
                note(&e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
