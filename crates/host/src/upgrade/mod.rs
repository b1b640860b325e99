//! Live upgrade: vstreamd hands its control socket, the control connections bridged to guest
//! channels (shells, `open`, `cp`), console viewers, the consoles' own connections and every
//! configured guest's session to its successor, a new vstreamd exec'd in the same process
//! (same pid, so a service manager's `$MAINPID` stays right). See docs/ARCHITECTURE.md,
//! "Live upgrade".
//!
//! Order: the control socket stops accepting (new clients wait in its backlog); every bridge
//! and viewer stops at a point where it holds no byte that is not in its carried state; every
//! console's capture stops between two reads (then what viewers have not yet been sent is
//! taken from their queues into their state); every guest's session is frozen and written
//! down; the state goes into a memfd; the descriptors to keep lose FD_CLOEXEC; then `exec`.
//! Guest links are not carried: they close with the old process and the agents resume the
//! same session on their next link, as after any transport cut (nothing is lost:
//! unacknowledged frames are in the state). If `exec` fails, the frozen sessions and consoles
//! and the stopped bridges simply go on: an upgrade never loses a session.

//!
//! [`bridge`] holds the connections that are carried ([`Pump`], [`ConsoleView`]); [`state`]
//! what is written down for the successor and checked when it takes over.

mod bridge;
mod state;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::sync::{oneshot, watch, Notify};
use vstream_devices::console::{Carried as CarriedConsole, Console, Frozen};
use vstream_link::{Incoming, Mux};
use vstream_wire::{ChannelId, Config};

use crate::control::{push_line, Reply};
use crate::error::UpgradeError;

use bridge::{Bridges, Parked};
pub use bridge::{Carry, ConsoleView, Pump};
use state::{
    read_state, take_over, unix_stream, write_state, Blob, BridgeState, ConsoleState, Inherited,
    State, ViewState,
};

/// The environment variable that names the state's memfd in the successor.
pub const STATE_ENV: &str = "VSTREAMD_UPGRADE_FD";

/// First bytes of the state; the last one is the format version.
const MAGIC: &[u8; 8] = b"VSUPGR\0\x01";

/// Largest header (the JSON part) of a state accepted.
const MAX_HEADER: usize = 16 * 1024 * 1024;

/// How long the bridges may take to stop before the upgrade is given up.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

/// A bridge's read size in each direction.
const PUMP_BUF: usize = 64 * 1024;

/// What a console viewer is shown where output was skipped because it read too slowly.
const SKIPPED: &[u8] = b"\r\n[vstream: output skipped, viewer too slow]\r\n";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What this daemon says about itself (status, and the answer to `daemon upgrade`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonInfo {
    /// Process id (the same after an upgrade: the successor is exec'd in place).
    pub pid: u32,
    /// The binary's version.
    pub version: String,
    /// Upgrades since the daemon was first started.
    pub generation: u64,
    /// Unix milliseconds when this generation started.
    pub started_ms: u64,
    /// For a successor: milliseconds from the upgrade request until it served again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_ms: Option<u64>,
}

/// The daemon's side of live upgrades (one per daemon).
pub struct Handover {
    stop: watch::Sender<bool>,
    bridges: Mutex<Bridges>,
    changed: Notify,
    running: tokio::sync::Mutex<()>,
    /// The path vstreamd was started from: exec'ing it again runs a binary replaced on disk.
    binary: PathBuf,
    info: Mutex<DaemonInfo>,
    /// The control listener's descriptor while it is served.
    control: Mutex<Option<RawFd>>,
    inherited: Mutex<Inherited>,
}

impl Handover {
    /// A first daemon's handover, or a successor's from the state named by [`STATE_ENV`].
    pub fn from_env() -> Arc<Handover> {
        let binary = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let mut info = DaemonInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            generation: 0,
            started_ms: now_ms(),
            handover_ms: None,
        };
        let mut inherited = Inherited::default();
        if let Some(fd) = std::env::var_os(STATE_ENV) {
            std::env::remove_var(STATE_ENV);
            // A state that does not check out is refused whole: the guests start new sessions
            // and the control socket is bound afresh, but the daemon serves.
            let taken = read_state(&fd).and_then(|(state, blobs)| {
                let generation = state.generation + 1;
                take_over(state, &blobs).map(|inh| (generation, inh))
            });
            match taken {
                Ok((generation, inh)) => {
                    info.generation = generation;
                    inherited = inh;
                    tracing::info!(
                        generation,
                        sessions = inherited.sessions.len(),
                        bridges = inherited.bridges.len(),
                        viewers = inherited.views.len(),
                        consoles = inherited.consoles.len(),
                        "took over from the previous vstreamd"
                    );
                }
                Err(e) => tracing::error!("upgrade state refused, starting afresh: {e}"),
            }
        }
        Arc::new(Handover {
            stop: watch::channel(false).0,
            bridges: Mutex::default(),
            changed: Notify::new(),
            running: tokio::sync::Mutex::new(()),
            binary,
            info: Mutex::new(info),
            control: Mutex::new(None),
            inherited: Mutex::new(inherited),
        })
    }

    /// This daemon's identity, for status.
    pub fn info(&self) -> DaemonInfo {
        lock(&self.info).clone()
    }

    /// The session of guest `name` as the predecessor left it (with the channels of its
    /// bridges), or `None` for a new one. A state that does not restore is logged and the
    /// guest starts a new session (its agent sees a restart, nothing worse).
    pub fn restore_session(
        &self,
        name: &str,
        cfg: Config,
    ) -> Option<(Mux, tokio::sync::mpsc::UnboundedReceiver<Incoming>)> {
        let mut inh = lock(&self.inherited);
        let state = inh.sessions.remove(name)?;
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut inh.bridges)
            .into_iter()
            .partition(|b| b.state.guest == name);
        inh.bridges = others;
        let claimed: Vec<ChannelId> = mine.iter().map(|b| b.state.channel).collect();
        match Mux::restore(cfg, &state, &claimed) {
            Ok((mux, rx, streams)) => {
                inh.ready.extend(mine.into_iter().zip(streams));
                Some((mux, rx))
            }
            Err(e) => {
                tracing::error!(
                    guest = name,
                    "cannot resume the session after the upgrade: {e}"
                );
                None
            }
        }
    }

    /// The connection of guest `guest`'s console `name` as the predecessor left it, or `None`
    /// (the console connects afresh). Its capture waits for [`Handover::take_control`] to
    /// attach the carried viewers first.
    pub fn take_console(&self, guest: &str, name: &str) -> Option<CarriedConsole> {
        let mut inh = lock(&self.inherited);
        let at = inh
            .consoles
            .iter()
            .position(|(c, _, _)| c.guest == guest && c.console == name)?;
        let (state, fd, tail) = inh.consoles.swap_remove(at);
        let (gate, go) = oneshot::channel();
        inh.console_gates.push(gate);
        Some(CarriedConsole {
            fd,
            position: state.position,
            tail,
            go,
        })
    }

    /// For a successor: the inherited control listener. Also puts the inherited bridges back
    /// to work and answers the client that asked for the upgrade.
    /// `consoles` finds a guest's console by name, for the carried viewers.
    pub fn take_control(
        self: &Arc<Self>,
        consoles: impl Fn(&str, &str) -> Option<Arc<Console>>,
    ) -> io::Result<Option<tokio::net::UnixListener>> {
        let (control, reply, ready, left, views, requested) = {
            let mut inh = lock(&self.inherited);
            for (c, _, _) in std::mem::take(&mut inh.consoles) {
                tracing::warn!(guest = %c.guest, console = %c.console, "a carried console is no longer configured; its connection is closed");
            }
            (
                inh.control.take(),
                inh.reply.take(),
                std::mem::take(&mut inh.ready),
                std::mem::take(&mut inh.bridges),
                std::mem::take(&mut inh.views),
                inh.requested_ms,
            )
        };
        // Dropped after the loop below has attached every carried viewer: only then do the
        // adopted consoles read again, so that no viewer misses a byte.
        let gates = std::mem::take(&mut lock(&self.inherited).console_gates);
        for (v, fd, typed, pending) in views {
            let Some(console) = consoles(&v.guest, &v.console) else {
                tracing::warn!(guest = %v.guest, console = %v.console, "a console viewer's console is gone; closed");
                continue;
            };
            let (r, w) = unix_stream(fd)?.into_split();
            let viewer = console.attach(v.attach);
            let me = self.clone();
            tokio::spawn(async move {
                if !typed.is_empty() && viewer.is_writer() {
                    let _ = viewer.type_bytes(Bytes::from(typed)).await;
                }
                let view = ConsoleView {
                    guest: v.guest,
                    console,
                    viewer,
                    r: BufReader::new(r),
                    w,
                    attach: v.attach,
                    pending,
                };
                if let Err(e) = me.view(view).await {
                    tracing::debug!("console viewer after the upgrade: {e}");
                }
            });
        }
        drop(gates);
        for b in &left {
            let (guest, channel) = (&b.state.guest, b.state.channel);
            tracing::warn!(
                guest,
                channel,
                "a bridged connection's guest did not come back; closed"
            );
        }
        for (b, chan) in ready {
            let (r, w) = unix_stream(b.fd)?.into_split();
            let [up_eof, up_closed, down_eof, down_closed] = b.state.flags;
            let (up, down) = (b.up, b.down);
            let pump = Pump {
                guest: b.state.guest,
                r,
                w,
                chan,
                up,
                down,
                up_eof,
                up_closed,
                down_eof,
                down_closed,
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.bridge(pump).await {
                    tracing::debug!("bridged connection after the upgrade: {e}");
                }
            });
        }
        if requested > 0 {
            lock(&self.info).handover_ms = Some(now_ms().saturating_sub(requested));
        }
        if let Some(fd) = reply {
            let mut line = Vec::new();
            let reply = Reply {
                daemon: Some(self.info()),
                ..Reply::ok()
            };
            push_line(&mut line, &reply)?;
            // A client that went away does not hold the successor up.
            let mut s = std::os::unix::net::UnixStream::from(fd);
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(&line);
        }
        let Some(fd) = control else {
            return Ok(None);
        };
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(std).map(Some)
    }

    /// Notes the control listener being served (it is handed over).
    pub fn serving_control(&self, fd: BorrowedFd<'_>) {
        *lock(&self.control) = Some(fd.as_raw_fd());
    }

    /// Waits while an upgrade is under way (the control socket takes no client meanwhile:
    /// they wait in its backlog for whichever daemon serves next).
    pub async fn wait_until_open(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| !*s).await;
    }

    /// Resolves when an upgrade starts.
    pub async fn closing(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Runs a bridge (a control connection joined to a channel) until either end is done;
    /// across upgrades if need be.
    pub async fn bridge(self: &Arc<Self>, pump: Pump) -> io::Result<()> {
        self.carry(Parked::Pump(pump)).await
    }

    /// Runs a console viewer until the client or the console is done; across upgrades if
    /// need be.
    pub async fn view(self: &Arc<Self>, view: ConsoleView) -> io::Result<()> {
        self.carry(Parked::View(view)).await
    }

    async fn carry(&self, mut conn: Parked) -> io::Result<()> {
        lock(&self.bridges).active += 1;
        let _count = ActiveBridge(self);
        let mut stop = self.stop.subscribe();
        loop {
            let stopped = match conn {
                Parked::Pump(p) => p.run(&mut stop).await?.map(Parked::Pump),
                Parked::View(v) => v.run(&mut stop).await?.map(Parked::View),
            };
            let Some(stopped) = stopped else {
                return Ok(());
            };
            let (tx, rx) = oneshot::channel();
            lock(&self.bridges).parked.push((stopped, tx));
            self.changed.notify_waiters();
            match rx.await {
                Ok(back) => conn = back, // The upgrade failed: go on.
                Err(_) => return Ok(()),
            }
        }
    }

    /// Hands everything to a new vstreamd (`binary`, or the path this one was started from):
    /// each guest's session and consoles. Returns only if that failed; then everything goes
    /// on as before.
    pub async fn upgrade(
        &self,
        sessions: Vec<(String, Mux, Vec<Arc<Console>>)>,
        binary: Option<PathBuf>,
        reply: Option<BorrowedFd<'_>>,
    ) -> Result<std::convert::Infallible, UpgradeError> {
        let _one = self.running.lock().await;
        let requested = now_ms();
        let binary = binary.unwrap_or_else(|| self.binary.clone());
        tracing::info!(binary = %binary.display(), "upgrade: handing over");
        self.stop.send_replace(true);
        let parked = self.quiesce().await;
        // After the viewers: none of them types into a console once it is frozen.
        let frozen = match parked {
            Ok(()) => freeze_consoles(&sessions).await,
            Err(e) => Err(e),
        };
        // Still here after `exec`: the upgrade failed. Everything goes on, the consoles first
        // (they thaw when dropped).
        let Err(e) =
            frozen.and_then(|consoles| self.exec(&sessions, &consoles, &binary, reply, requested));
        self.stop.send_replace(false);
        let parked = std::mem::take(&mut lock(&self.bridges).parked);
        for (pump, tx) in parked {
            let _ = tx.send(pump);
        }
        tracing::error!("upgrade failed, this vstreamd goes on serving: {e}");
        Err(e)
    }

    /// Waits until every bridge has stopped.
    async fn quiesce(&self) -> Result<(), UpgradeError> {
        let all_parked = async {
            loop {
                let changed = self.changed.notified();
                {
                    let b = lock(&self.bridges);
                    if b.parked.len() >= b.active {
                        return;
                    }
                }
                changed.await;
            }
        };
        tokio::time::timeout(QUIESCE_TIMEOUT, all_parked)
            .await
            .map_err(|_| UpgradeError::Quiesce)
    }

    /// Freezes the sessions, writes the state, and execs. Returns only on failure.
    fn exec(
        &self,
        sessions: &[(String, Mux, Vec<Arc<Console>>)],
        consoles: &[(String, String, Frozen)],
        binary: &PathBuf,
        reply: Option<BorrowedFd<'_>>,
        requested: u64,
    ) -> Result<std::convert::Infallible, UpgradeError> {
        let mut bridges = lock(&self.bridges);
        let control = *lock(&self.control);
        // From here to exec nothing moves a byte of any guest: the sessions are locked and the
        // consoles frozen.
        let mut frozen: Vec<_> = sessions.iter().map(|(n, m, _)| (n, m.freeze())).collect();
        let mut blobs = Vec::new();
        let mut blob = |bytes: &[u8]| {
            let b = Blob {
                at: blobs.len() as u64,
                len: bytes.len() as u64,
            };
            blobs.extend_from_slice(bytes);
            b
        };
        let sessions: Vec<(String, Blob)> = frozen
            .iter_mut()
            .map(|(n, f)| ((*n).clone(), blob(&f.snapshot())))
            .collect();
        let mut keep: Vec<RawFd> = control.into_iter().collect();
        keep.extend(reply.map(|r| r.as_raw_fd()));
        let (mut carried, mut views) = (Vec::new(), Vec::new());
        for (parked, _) in &mut bridges.parked {
            match parked {
                Parked::Pump(p) => {
                    let fd = p.r.as_ref().as_raw_fd();
                    keep.push(fd);
                    carried.push(BridgeState {
                        guest: p.guest.clone(),
                        fd,
                        channel: p.chan.id(),
                        up: blob(&p.up),
                        down: blob(&p.down),
                        flags: [p.up_eof, p.up_closed, p.down_eof, p.down_closed],
                    });
                }
                Parked::View(v) => {
                    // What its console sent it before freezing; nothing more comes.
                    while let Some(out) = v.viewer.try_next_output() {
                        v.pending
                            .extend_from_slice(out.as_deref().unwrap_or(SKIPPED));
                    }
                    let fd = v.r.get_ref().as_ref().as_raw_fd();
                    keep.push(fd);
                    views.push(ViewState {
                        guest: v.guest.clone(),
                        console: v.console.name().to_owned(),
                        fd,
                        attach: v.attach,
                        typed: blob(v.r.buffer()),
                        pending: blob(&v.pending),
                    });
                }
            }
        }
        let mut carried_consoles = Vec::new();
        for (guest, console, f) in consoles {
            // A console without a connection to keep connects afresh in the successor.
            let Some(fd) = &f.fd else { continue };
            keep.push(fd.as_raw_fd());
            carried_consoles.push(ConsoleState {
                guest: guest.clone(),
                console: console.clone(),
                fd: fd.as_raw_fd(),
                position: f.position.clone(),
                tail: blob(&f.tail),
            });
        }
        let state = State {
            generation: self.info().generation,
            requested_ms: requested,
            control,
            reply: reply.map(|r| r.as_raw_fd()),
            sessions,
            bridges: carried,
            views,
            consoles: carried_consoles,
        };
        let memfd = write_state(&state, &blobs).map_err(UpgradeError::State)?;
        keep.push(memfd.as_raw_fd());
        let inherit = |on: bool| {
            for fd in &keep {
                // SAFETY: every descriptor in `keep` is open and owned by a live object here
                // (the control listener, the requester's and the parked bridges' sockets, the
                // frozen consoles' duplicates, the memfd); only its close-on-exec flag changes.
                let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
                let flags = if on {
                    rustix::io::FdFlags::empty()
                } else {
                    rustix::io::FdFlags::CLOEXEC
                };
                let _ = rustix::io::fcntl_setfd(fd, flags);
            }
        };
        inherit(true);
        let err = std::process::Command::new(binary)
            .args(std::env::args_os().skip(1))
            .env(STATE_ENV, memfd.as_raw_fd().to_string())
            .exec();
        inherit(false);
        drop(frozen);
        Err(UpgradeError::Exec {
            binary: binary.clone(),
            error: err,
        })
    }
}

/// Stops every console's capture (see [`Console::freeze`]).
async fn freeze_consoles(
    sessions: &[(String, Mux, Vec<Arc<Console>>)],
) -> Result<Vec<(String, String, Frozen)>, UpgradeError> {
    let all = async {
        let mut frozen = Vec::new();
        for (guest, _, consoles) in sessions {
            for c in consoles {
                let f = c.freeze().await.map_err(UpgradeError::Console)?;
                frozen.push((guest.clone(), c.name().to_owned(), f));
            }
        }
        Ok(frozen)
    };
    tokio::time::timeout(QUIESCE_TIMEOUT, all)
        .await
        .map_err(|_| UpgradeError::ConsoleTimeout)?
}

/// Counts a running bridge while it lives.
struct ActiveBridge<'a>(&'a Handover);

impl Drop for ActiveBridge<'_> {
    fn drop(&mut self) {
        lock(&self.0.bridges).active -= 1;
        self.0.changed.notify_waiters();
    }
}
