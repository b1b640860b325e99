//! The system: power, time, and facts (OS, users, load, CPUs).

use std::mem::{offset_of, size_of};

use rustix::ioctl::{ioctl, opcode, Getter, Opcode, Setter};
use rustix::process::{Pid, Signal};
use rustix::system::{RebootCommand, Uname};
use rustix::time::{ClockId, Timespec};

use super::*;

// ---------------------------------------------------------------------------------------------
// Power.

/// The usual system directories, where the agent looks for the programs it runs.
pub(super) const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// A program in the usual system directories.
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    find_program_in(SYSTEM_DIRS.iter().map(Path::new), name)
}

/// The first executable file `name` in `dirs`.
fn find_program_in<'a>(dirs: impl IntoIterator<Item = &'a Path>, name: &str) -> Option<PathBuf> {
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Runs `program ARGS` with no input or output, and waits for it.
pub(super) fn run_quietly(program: &Path, args: &[&str]) -> io::Result<std::process::ExitStatus> {
    crate::spawn::undo_inherited(&mut std::process::Command::new(program))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

pub(super) fn run_program(program: &Path, args: &[&str]) -> Result<(), QgaError> {
    let status = run_quietly(program, args).map_err(|e| {
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
pub(super) fn pid1_is_busybox_init() -> bool {
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
    pub(super) fn shutdown(&self, mode: ShutdownMode) -> Result<(), QgaError> {
        tracing::info!(mode = mode.as_str(), "guest-shutdown");
        if let Some(program) = &self.settings.shutdown_command {
            return run_program(program, &[mode.as_str()]);
        }
        rustix::fs::sync();
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
                ShutdownMode::Powerdown => Signal::USR2,
                ShutdownMode::Reboot => Signal::TERM,
                ShutdownMode::Halt => Signal::USR1,
            };
            if rustix::process::kill_process(Pid::INIT, sig).is_ok() {
                return Ok(());
            }
        }
        // 4. No init to ask (a script as PID 1, as in a busybox initramfs): file systems were
        // synced above; stop the machine now.
        let cmd = match mode {
            ShutdownMode::Powerdown => RebootCommand::PowerOff,
            ShutdownMode::Reboot => RebootCommand::Restart,
            ShutdownMode::Halt => RebootCommand::Halt,
        };
        // Again for writes since the first; reboot(2) returns only on failure.
        rustix::fs::sync();
        let e = rustix::system::reboot(cmd)
            .err()
            .unwrap_or(rustix::io::Errno::INVAL);
        Err(QgaError::generic(format!(
            "reboot(2) failed: {}",
            errstr(&e.into())
        )))
    }
}

/// `guest-suspend-*`'s mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SuspendMode {
    /// Hibernate (`guest-suspend-disk`).
    Disk,
    /// Suspend to RAM, S3 (`guest-suspend-ram`).
    Ram,
    /// Both (`guest-suspend-hybrid`).
    Hybrid,
}

/// How each of the three ways suspends in one mode.
struct SuspendWays {
    /// systemd's unit, checked with `systemctl status`.
    systemd_unit: &'static str,
    /// The `systemctl` verb.
    systemctl_verb: &'static str,
    /// `pm-is-supported`'s option.
    pm_option: &'static str,
    /// The pm-utils program.
    pm_program: &'static str,
    /// The word written to /sys/power/state. None for hybrid: qemu-ga 7.2 has no kernel path
    /// for it (a guest without systemd or pm-utils is told it is not supported).
    sys_state: Option<&'static str>,
}

impl SuspendMode {
    fn ways(self) -> SuspendWays {
        match self {
            SuspendMode::Disk => SuspendWays {
                systemd_unit: "systemd-hibernate",
                systemctl_verb: "hibernate",
                pm_option: "--hibernate",
                pm_program: "pm-hibernate",
                sys_state: Some("disk"),
            },
            SuspendMode::Ram => SuspendWays {
                systemd_unit: "systemd-suspend",
                systemctl_verb: "suspend",
                pm_option: "--suspend",
                pm_program: "pm-suspend",
                sys_state: Some("mem"),
            },
            SuspendMode::Hybrid => SuspendWays {
                systemd_unit: "systemd-hybrid-sleep",
                systemctl_verb: "hybrid-sleep",
                pm_option: "--suspend-hybrid",
                pm_program: "pm-suspend-hybrid",
                sys_state: None,
            },
        }
    }
}

impl GuestAgent {
    /// Suspends the system as qemu-ga 7.2 does: systemd if it has the mode's unit, else pm-utils
    /// if `pm-is-supported` says yes, else the kernel's /sys/power/state. A way that fails
    /// passes to the next one, and only the last way's failure is reported. Returns once the
    /// system has resumed (the write to /sys/power/state, or the helper, blocks until then).
    pub(super) fn suspend(&self, mode: SuspendMode) -> Result<(), QgaError> {
        tracing::info!(?mode, "guest-suspend");
        let ways = mode.ways();
        let mut supported = false;
        // `systemctl status` exits 1 to 3 (LSB codes: stopped) for a unit that exists, and 4
        // for one that does not.
        if matches!(
            self.run_helper("systemctl", &["status", ways.systemd_unit]),
            Some(1..=3)
        ) {
            supported = true;
            if self.run_helper("systemctl", &[ways.systemctl_verb]) == Some(0) {
                return Ok(());
            }
        }
        if self.run_helper("pm-is-supported", &[ways.pm_option]) == Some(0) {
            supported = true;
            if self.run_helper(ways.pm_program, &[]) == Some(0) {
                return Ok(());
            }
        }
        let last = match ways.sys_state {
            None => Err(QgaError::generic("unknown guest suspend mode")),
            Some(word) if self.sys_state_offers(word) => {
                supported = true;
                self.write_sys_state(word)
            }
            Some(_) => Ok(()),
        };
        if !supported {
            return Err(QgaError::generic(
                "the requested suspend mode is not supported by the guest",
            ));
        }
        // As in qemu-ga: when an earlier way was supported but failed and the kernel offers
        // nothing, this is a success (and no reply).
        last
    }

    /// qemu-ga's `run_process_child`: the exit code of `name ARGS`, or None when there is no
    /// such program or it cannot start.
    fn run_helper(&self, name: &str, args: &[&str]) -> Option<i32> {
        let program =
            find_program_in(self.settings.helper_dirs.iter().map(PathBuf::as_path), name)?;
        let status = run_quietly(&program, args).ok()?;
        // WEXITSTATUS, which is 0 for a child killed by a signal, as qemu-ga reads it.
        Some(status.code().unwrap_or(0))
    }

    fn sys_power_state(&self) -> PathBuf {
        self.settings.sysfs.join("power/state")
    }

    /// Whether /sys/power/state lists `word` (qemu-ga reads its first 31 bytes).
    fn sys_state_offers(&self, word: &str) -> bool {
        read_text(&self.sys_power_state(), 31).is_ok_and(|s| s.contains(word))
    }

    /// Writes `word` to /sys/power/state. qemu-ga 7.2 writes from a child and waits for it;
    /// this worker thread blocks the same way (and qemu-ga 9 writes in place too).
    fn write_sys_state(&self, word: &str) -> Result<(), QgaError> {
        OpenOptions::new()
            .write(true)
            .open(self.sys_power_state())
            .and_then(|mut f| f.write_all(word.as_bytes()))
            .map_err(|_| QgaError::generic("child process has failed to suspend"))
    }
}

// ---------------------------------------------------------------------------------------------
// Time.

/// `struct rtc_time` of linux/rtc.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RtcTime {
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

const RTC_RD_TIME: Opcode = opcode::read::<RtcTime>(b'p', 0x09);
const RTC_SET_TIME: Opcode = opcode::write::<RtcTime>(b'p', 0x0a);

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

pub(super) fn rtc_to_unix(t: &RtcTime) -> Option<i64> {
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

pub(super) fn unix_to_rtc(secs: i64) -> RtcTime {
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

pub(super) fn get_time() -> Result<i64, QgaError> {
    let ts = rustix::time::clock_gettime(ClockId::Realtime);
    ts.tv_sec
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(ts.tv_nsec))
        .ok_or_else(|| QgaError::generic("Time is out of range"))
}

pub(super) fn set_clock(ns: i64) -> Result<(), QgaError> {
    let ts = Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    rustix::time::clock_settime(ClockId::Realtime, ts).map_err(|e| {
        QgaError::generic(format!(
            "Failed to set time to guest: {}",
            errstr(&e.into())
        ))
    })
}

impl GuestAgent {
    pub(super) fn rtc_path(&self) -> Option<&PathBuf> {
        self.settings.rtc.iter().find(|p| p.exists())
    }

    /// With a time: sets the system clock, then the RTC (UTC) if there is one. Without: sets the
    /// system clock from the RTC (`hwclock --hctosys --utc`).
    pub(super) fn set_time(&self, time: Option<i64>) -> Result<(), QgaError> {
        match time {
            Some(ns) => {
                set_clock(ns)?;
                if let Some(rtc) = self.rtc_path() {
                    let file = File::open(rtc).map_err(|e| QgaError::io(rtc.display(), &e))?;
                    let t = unix_to_rtc(ns.div_euclid(1_000_000_000));
                    // SAFETY: RTC_SET_TIME reads one struct rtc_time, the Setter's input type.
                    unsafe { ioctl(&file, Setter::<RTC_SET_TIME, RtcTime>::new(t)) }.map_err(
                        |e| {
                            QgaError::io(
                                format!("cannot set the hardware clock {}", rtc.display()),
                                &e.into(),
                            )
                        },
                    )?;
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
                // SAFETY: RTC_RD_TIME writes one struct rtc_time, the Getter's output type.
                let t = unsafe { ioctl(&file, Getter::<RTC_RD_TIME, RtcTime>::new()) }.map_err(
                    |e| {
                        QgaError::io(
                            format!("cannot read the hardware clock {}", rtc.display()),
                            &e.into(),
                        )
                    },
                )?;
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
    pub(super) fn tzset();
}

pub(super) fn timezone() -> GuestTimezone {
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
pub(super) fn uname_field(f: impl Fn(&Uname) -> &CStr) -> String {
    f(&rustix::system::uname()).to_string_lossy().into_owned()
}

/// The value of an os-release(5) assignment: quotes removed, backslash escapes resolved.
pub(super) fn os_release_value(raw: &str) -> String {
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

/// Size of one utmp record: the C library's `struct utmpx`. Every offset below comes from its
/// layout in the libc crate, so that the agent reads utmp right on every ABI it is built for.
pub(crate) const UTMP_RECORD: usize = size_of::<libc::utmpx>();
pub(super) const UT_USER_PROCESS: i16 = libc::USER_PROCESS;
const UT_TYPE: usize = offset_of!(libc::utmpx, ut_type);
const UT_USER: usize = offset_of!(libc::utmpx, ut_user);
const UT_USER_LEN: usize = offset_of!(libc::utmpx, ut_host) - UT_USER;
const UT_SEC: usize = offset_of!(libc::utmpx, ut_tv.tv_sec);
const UT_USEC: usize = offset_of!(libc::utmpx, ut_tv.tv_usec);
/// `tv_sec` and `tv_usec` have one width (4 bytes where glibc keeps 32-bit compat times).
const UT_TV_FIELD: usize = UT_USEC - UT_SEC;

/// The native-endian signed integer of `len` (4 or 8) bytes at `at` in `rec`; 0 if it is not
/// there.
fn int_at(rec: &[u8], at: usize, len: usize) -> i64 {
    let field = rec.get(at..at + len).unwrap_or_default();
    if let Ok(b) = <[u8; 4]>::try_from(field) {
        i64::from(i32::from_ne_bytes(b))
    } else if let Ok(b) = <[u8; 8]>::try_from(field) {
        i64::from_ne_bytes(b)
    } else {
        0
    }
}

/// Logged-in users from utmp records: one entry per user, with their earliest login. Partial
/// trailing records are ignored; at most `UTMP_RECORD * 16384` bytes are read by the caller.
pub(crate) fn parse_utmp(data: &[u8]) -> Vec<GuestUser> {
    let mut users: Vec<GuestUser> = Vec::new();
    for rec in data.chunks_exact(UTMP_RECORD) {
        let ut_type = i16::from_ne_bytes([rec[UT_TYPE], rec[UT_TYPE + 1]]);
        if ut_type != UT_USER_PROCESS {
            continue;
        }
        let user_field = &rec[UT_USER..UT_USER + UT_USER_LEN];
        let len = user_field
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(UT_USER_LEN);
        if len == 0 {
            continue;
        }
        let user = String::from_utf8_lossy(&user_field[..len]).into_owned();
        let sec = int_at(rec, UT_SEC, UT_TV_FIELD);
        let usec = int_at(rec, UT_USEC, UT_TV_FIELD);
        let login = sec as f64 + usec.clamp(0, 999_999) as f64 / 1e6;
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

pub(super) fn load() -> Result<GuestLoadAverage, QgaError> {
    let text = read_text(Path::new("/proc/loadavg"), 4096)
        .map_err(|e| QgaError::io("cannot read /proc/loadavg", &e))?;
    parse_loadavg(&text)
        .ok_or_else(|| QgaError::generic(format!("cannot parse /proc/loadavg: {text:?}")))
}

impl GuestAgent {
    pub(super) fn osinfo(&self) -> GuestOsInfo {
        let mut info = GuestOsInfo {
            kernel_release: Some(uname_field(Uname::release)),
            kernel_version: Some(uname_field(Uname::version)),
            machine: Some(uname_field(Uname::machine)),
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

    pub(super) fn users(&self) -> Result<Vec<GuestUser>, QgaError> {
        match read_bounded(&self.settings.utmp, (UTMP_RECORD * 16_384) as u64) {
            Ok(data) => Ok(parse_utmp(&data)),
            // No utmp (no login manager, as in an initramfs): nobody is logged in.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(QgaError::io(self.settings.utmp.display(), &e)),
        }
    }
}
