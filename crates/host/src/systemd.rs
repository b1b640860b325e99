//! vstreamd under systemd: readiness, status and the service watchdog sent to `$NOTIFY_SOCKET`
//! (sd_notify(3)), and the control listener taken from socket activation (sd_listen_fds(3)).
//!
//! Both protocols are a few environment variables and one datagram of `KEY=VALUE` lines, so they
//! are written here rather than taken from a crate: nothing to link, and without those variables
//! (not run by systemd) nothing happens at all.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::Daemon;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// More descriptors than any socket unit of ours passes: a bigger `LISTEN_FDS` is not systemd's.
const LISTEN_FDS_MAX: RawFd = 64;

/// The `FileDescriptorName=` of the control socket in `vstreamd.socket`.
pub const CONTROL_FD_NAME: &str = "control";

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// The control listener systemd passed, if it passed one: the descriptor named
/// [`CONTROL_FD_NAME`], or the only one. Takes the `LISTEN_*` variables out of the environment
/// (children must not believe the sockets are theirs) and closes descriptors it does not use.
///
/// Call it before any other thread runs: it changes the environment.
pub fn control_listener() -> Option<UnixListener> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    // Variables inherited from a parent that was socket-activated name its descriptors, not ours.
    if pid.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let count: RawFd = match count?.parse() {
        Ok(n) if (1..=LISTEN_FDS_MAX).contains(&n) => n,
        _ => {
            tracing::warn!("ignoring LISTEN_FDS: not a number from 1 to {LISTEN_FDS_MAX}");
            return None;
        }
    };
    let names: Vec<&str> = names.split(':').collect();
    let mut fds: Vec<(OwnedFd, &str)> = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        // SAFETY: with LISTEN_PID naming this process, systemd promises descriptors 3..3+LISTEN_FDS
        // are open; borrowed only for this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC).is_err() {
            tracing::warn!(fd, "LISTEN_FDS names a descriptor that is not open");
            continue;
        }
        // SAFETY: the descriptor is open (just checked) and systemd hands it to this process; the
        // LISTEN_* variables are gone, so nothing else in the process takes it a second time.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names
            .get((fd - LISTEN_FDS_START) as usize)
            .copied()
            .unwrap_or("");
        fds.push((owned, name));
    }
    let chosen = match fds.iter().position(|(_, n)| *n == CONTROL_FD_NAME) {
        Some(i) => i,
        None if fds.len() == 1 => 0,
        None => {
            tracing::warn!(
                "systemd passed {} sockets and none is named {CONTROL_FD_NAME:?}: binding --control",
                fds.len()
            );
            return None;
        }
    };
    let (fd, _) = fds.swap_remove(chosen);
    Some(UnixListener::from(fd))
}

/// Where vstreamd reports to systemd (`NOTIFY_SOCKET`, with `Type=notify`).
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// The notify socket systemd gave, if any (a path, or `@name` in the abstract namespace).
    /// Takes `NOTIFY_SOCKET` out of the environment, so that programs vstreamd starts do not
    /// report in its name.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        std::env::remove_var("NOTIFY_SOCKET");
        let bytes = path.as_encoded_bytes();
        let to = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(&path),
        };
        let made = to.and_then(|to| Ok((UnixDatagram::unbound()?, to)));
        match made {
            Ok((socket, to)) => Some(Notifier { socket, to }),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={}: {e}", path.to_string_lossy());
                None
            }
        }
    }

    /// Sends `state` (lines of `KEY=VALUE`). A lost message costs systemd's view, never the
    /// daemon: errors are logged.
    pub fn notify(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.to) {
            tracing::warn!("telling systemd {state:?}: {e}");
        }
    }
}

/// How often systemd wants `WATCHDOG=1` (half its `WatchdogSec=`, as sd_watchdog_enabled(3)
/// advises), if it wants it from this process.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Tells systemd the daemon is ready (its control socket is listening), then keeps `STATUS=`
/// up to date with the guests and pets the watchdog, for as long as the daemon runs. The
/// watchdog is fed from the daemon's runtime: a runtime that stops running tasks stops it.
pub async fn report(notifier: Notifier, daemon: Arc<Daemon>, watchdog: Option<Duration>) {
    let status = |daemon: &Daemon| {
        let (guests, connected) = daemon.guest_counts();
        format!("STATUS={guests} guests, {connected} connected")
    };
    let mut last = status(&daemon);
    notifier.notify(&format!("READY=1\nMAINPID={}\n{last}", std::process::id()));
    let mut tick = tokio::time::interval(watchdog.map_or(STATUS_PERIOD, |w| w.min(STATUS_PERIOD)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = status(&daemon);
        let mut message = String::new();
        if watchdog.is_some() {
            message.push_str("WATCHDOG=1\n");
        }
        if now != last {
            message.push_str(&now);
            last = now;
        }
        if !message.is_empty() {
            notifier.notify(&message);
        }
    }
}
