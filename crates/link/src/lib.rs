//! The async driver of a multiplexer [`Session`]: it moves bytes between transport streams
//! (links) and the session, runs its timers, and gives applications one [`ChannelStream`]
//! (AsyncRead + AsyncWrite) per channel.
//!
//! Shape (as in quinn): the protocol lives in `vstream-wire`; here a `Mutex<Inner>` holds the
//! session plus the wakers of the tasks waiting on it. Each link runs a reader, a writer and a
//! timer future; an application's read or write locks the session for a few microseconds and
//! never waits on the network.
#![deny(missing_docs)]

pub mod auth;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use vstream_transport::Address;
use vstream_wire::frame::Decoder;
use vstream_wire::limit::ReportLimit;
use vstream_wire::{
    peek_hello, ChannelError, ChannelId, Config, ErrorKind, Event, Hello, LinkId, LinkParams, Recv,
    ResetCode, Session, SnapshotError, Transmit, MAX_INPUT,
};

/// Most bytes handed to a transport in one write: large enough to batch many small frames
/// into one syscall, small enough to keep latency of other links' acknowledgements low (and
/// counted in what a guest can make us hold).
const WRITE_BATCH: usize = MAX_INPUT;

/// A channel the peer opened, waiting for the application.
pub struct Incoming {
    /// The stream.
    pub stream: ChannelStream,
    /// Device class.
    pub class: String,
    /// Name within the class.
    pub name: String,
}

/// Lifecycle notifications, for logs and `vstreamctl events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum MuxEvent {
    /// A link completed its handshake.
    LinkUp {
        /// Link id.
        link: u32,
        /// Transport description.
        transport: String,
        /// Peer name.
        peer: String,
        /// Whether the session resumed.
        resumed: bool,
    },
    /// A link ended.
    LinkDown {
        /// Link id.
        link: u32,
        /// Transport description.
        transport: String,
        /// Why.
        reason: String,
    },
    /// A channel was reset because of an error.
    ChannelReset {
        /// Channel id.
        channel: u32,
        /// Why.
        reason: String,
    },
    /// A protocol violation by the peer.
    ProtocolError {
        /// What.
        error: String,
    },
}

/// A link's first read buffer: an idle link only carries keepalives, and a daemon holds
/// thousands of them. A read that fills the buffer makes it four times larger, up to
/// [`MAX_INPUT`] (what the session takes in one piece), so a bulk transfer reaches large reads within three reads.
const READ_MIN: usize = 4 * 1024;

/// A link whose peer commits more protocol violations than this within
/// [`VIOLATION_WINDOW`] is closed (the reason starts with [`DROPPED_FOR_VIOLATIONS`]): a noisy
/// serial line at 115200 baud carries about 11 KB a second and does not come near it, a hostile
/// peer makes a violation per frame, a million a second.
pub const MAX_VIOLATIONS: u64 = 1000;

/// See [`MAX_VIOLATIONS`].
pub const VIOLATION_WINDOW: Duration = Duration::from_secs(10);

/// How the reason of a link closed for [`MAX_VIOLATIONS`] starts, so that its owner can hold
/// the peer off.
pub const DROPPED_FOR_VIOLATIONS: &str = "too many protocol violations";

/// Counts one link's violations over [`VIOLATION_WINDOW`].
#[derive(Debug)]
struct ViolationBudget {
    since: Instant,
    count: u64,
}

impl ViolationBudget {
    fn new(now: Instant) -> ViolationBudget {
        ViolationBudget {
            since: now,
            count: 0,
        }
    }

    /// Adds `n` violations at `now`; the reason to close the link once over the budget.
    fn add(&mut self, n: u64, now: Instant) -> Option<String> {
        if now.duration_since(self.since) > VIOLATION_WINDOW {
            *self = ViolationBudget::new(now);
        }
        self.count += n;
        (self.count > MAX_VIOLATIONS).then(|| {
            format!(
                "{DROPPED_FOR_VIOLATIONS}: {} in {} ms (at most {MAX_VIOLATIONS} in {} s)",
                self.count,
                now.duration_since(self.since).as_millis(),
                VIOLATION_WINDOW.as_secs()
            )
        })
    }
}

struct LinkEntry {
    transport: String,
    up: bool,
    since: SystemTime,
    wake: Arc<Notify>,
    down: Arc<Notify>,
    /// Wakes the link's timer when the session needs it sooner than it sleeps.
    timer: Arc<Notify>,
    down_reason: Option<String>,
}

#[derive(Default)]
struct Wakers {
    reader: Option<Waker>,
    writer: Option<Waker>,
}

struct Inner {
    session: Session,
    wakers: HashMap<ChannelId, Wakers>,
    /// Channels that ended with an error, for the streams still held by the application.
    ended: HashMap<ChannelId, String>,
    /// Channels whose stream was dropped: incoming data is discarded until the peer closes.
    detached: HashSet<ChannelId>,
    opening: HashMap<ChannelId, oneshot::Sender<Result<(), String>>>,
    incoming: Option<mpsc::UnboundedSender<Incoming>>,
    links: BTreeMap<LinkId, LinkEntry>,
    events: broadcast::Sender<MuxEvent>,
    /// Which channel resets by the peer are logged (the session limits its own reports).
    reset_logs: ReportLimit<u16>,
    /// The deadline the link timers sleep until (`None`: until woken).
    timer_at: Option<Instant>,
}

struct Shared {
    inner: Mutex<Inner>,
    label: String,
    /// Wakes the readers paused because the session wanted no input.
    input: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in this crate; the state is still consistent
        // enough to keep serving other guests, so recover the guard rather than propagate.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn epoch(&self) -> u64 {
        self.session.epoch()
    }

    /// Logs the counts of channel-reset lines held back in intervals now over.
    fn flush_reset_logs(&mut self, shared: &Shared) {
        for (code, n) in self.reset_logs.flush(Instant::now()) {
            tracing::warn!(peer = %shared.label, code, "{n} more channel resets not logged");
        }
    }

    /// Hands session events to whoever waits for them.
    fn dispatch(&mut self, shared: &Arc<Shared>) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::Readable(id) => {
                    if self.detached.contains(&id) {
                        self.discard(id);
                    } else if let Some(w) = self.wakers.get_mut(&id).and_then(|w| w.reader.take()) {
                        w.wake();
                    }
                }
                Event::Writable(id) => {
                    if let Some(w) = self.wakers.get_mut(&id).and_then(|w| w.writer.take()) {
                        w.wake();
                    }
                }
                Event::ChannelReady(id) => {
                    if let Some(tx) = self.opening.remove(&id) {
                        let _ = tx.send(Ok(()));
                    }
                }
                Event::ChannelReset { id, code, reason } => {
                    let reason = format!("channel reset ({code:?}): {reason}");
                    if code != ResetCode::Aborted {
                        let (log, held) = self.reset_logs.check(code as u16, Instant::now());
                        if held > 0 {
                            tracing::warn!(peer = %shared.label, "{held} more channel resets not logged");
                        }
                        // Expected after a peer restart, but each lost channel is said once.
                        if log && code == ResetCode::SessionLost {
                            tracing::info!(peer = %shared.label, channel = id, "{reason}");
                        } else if log {
                            tracing::warn!(peer = %shared.label, channel = id, "{reason}");
                        }
                    }
                    if code != ResetCode::SessionLost && code != ResetCode::Aborted {
                        let _ = self.events.send(MuxEvent::ChannelReset {
                            channel: id,
                            reason: reason.clone(),
                        });
                    }
                    if let Some(tx) = self.opening.remove(&id) {
                        let _ = tx.send(Err(reason.clone()));
                    }
                    self.detached.remove(&id);
                    if code == ResetCode::SessionLost {
                        // Streams of the old session see the epoch change; ids are reused.
                        self.ended.clear();
                    } else if self.wakers.contains_key(&id) {
                        self.ended.insert(id, reason);
                    }
                    self.wake_both(id);
                }
                Event::ChannelClosed(id) => {
                    self.detached.remove(&id);
                    self.wake_both(id);
                }
                Event::ChannelOpened { id, class, name } => {
                    let mut stream = ChannelStream::new(shared.clone(), id, self.epoch());
                    stream.pending_accept = true;
                    self.wakers.insert(id, Wakers::default());
                    let refused = match &self.incoming {
                        Some(tx) => tx
                            .send(Incoming {
                                stream,
                                class,
                                name,
                            })
                            .is_err(),
                        None => true,
                    };
                    if refused {
                        // The stream was dropped inside the failed send; it detached itself.
                        let _ = self.session.reset(id, ResetCode::Refused, "no service");
                    }
                }
                Event::LinkUp {
                    link,
                    peer,
                    resumed,
                } => {
                    if let Some(e) = self.links.get_mut(&link) {
                        e.up = true;
                        e.since = SystemTime::now();
                        tracing::info!(peer = %peer, transport = %e.transport, resumed, "link up");
                        let _ = self.events.send(MuxEvent::LinkUp {
                            link: link.0,
                            transport: e.transport.clone(),
                            peer,
                            resumed,
                        });
                    }
                }
                Event::LinkDown { link, reason } => {
                    if let Some(e) = self.links.get_mut(&link) {
                        e.down_reason = Some(reason);
                        e.down.notify_one();
                    }
                }
                Event::ErrorsSuppressed { kind, count } => {
                    tracing::warn!(
                        peer = %shared.label,
                        "{count} more protocol errors of kind {} not logged",
                        kind.name()
                    );
                }
                Event::ProtocolError { link, error } => {
                    let transport = link
                        .and_then(|l| self.links.get(&l))
                        .map_or("-", |e| e.transport.as_str());
                    tracing::warn!(peer = %shared.label, transport, "protocol error: {error}");
                    let _ = self.events.send(MuxEvent::ProtocolError {
                        error: error.to_string(),
                    });
                }
            }
        }
    }

    fn wake_both(&mut self, id: ChannelId) {
        if let Some(w) = self.wakers.get_mut(&id) {
            if let Some(r) = w.reader.take() {
                r.wake();
            }
            if let Some(wr) = w.writer.take() {
                wr.wake();
            }
        }
    }

    fn discard(&mut self, id: ChannelId) {
        let mut sink = [0u8; 4096];
        while let Ok(Recv::Data(_)) = self.session.recv(id, &mut sink) {}
    }

    /// Wakes every link's writer: something may be ready to send.
    fn kick(&mut self) {
        for e in self.links.values() {
            e.wake.notify_one();
        }
        self.rearm();
    }

    /// Wakes the link timers if the session's next deadline is now earlier than the one they
    /// sleep until (a retransmission after new data, a new link's handshake): timers sleep
    /// exactly until the next deadline, and an idle session wakes only for its keepalives.
    fn rearm(&mut self) {
        let Some(next) = self.session.poll_timeout() else {
            return;
        };
        if self.timer_at.is_none_or(|at| next < at) {
            self.timer_at = Some(next);
            for e in self.links.values() {
                e.timer.notify_one();
            }
        }
    }
}

/// One multiplexer session with a peer, shared by its links and channel streams.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl Mux {
    /// A session; peer-opened channels arrive on the returned receiver.
    pub fn new(cfg: Config, session_id: u64) -> (Mux, mpsc::UnboundedReceiver<Incoming>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let label = cfg.name.clone();
        // Lifecycle events are rare and their one reader (vstreamd's forwarder) is always
        // waiting; every slot is allocated up front, for each of thousands of sessions.
        let (events, _) = broadcast::channel(64);
        let inner = Inner {
            session: Session::new(cfg, session_id, Instant::now()),
            wakers: HashMap::new(),
            ended: HashMap::new(),
            detached: HashSet::new(),
            opening: HashMap::new(),
            incoming: Some(tx),
            links: BTreeMap::new(),
            events,
            reset_logs: ReportLimit::default(),
            timer_at: None,
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            label,
            input: Notify::new(),
        });
        (Mux { shared }, rx)
    }

    /// Lifecycle events of this session.
    pub fn subscribe(&self) -> broadcast::Receiver<MuxEvent> {
        self.shared.lock().events.subscribe()
    }

    /// Opens a channel to the peer's `class`/`name` service and waits until it is accepted
    /// (which needs a link to be up).
    pub async fn open(&self, class: &str, name: &str) -> io::Result<ChannelStream> {
        let (stream, rx) = {
            let mut inner = self.shared.lock();
            let id = inner
                .session
                .open_channel(class, name)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let (tx, rx) = oneshot::channel();
            inner.opening.insert(id, tx);
            inner.wakers.insert(id, Wakers::default());
            let epoch = inner.epoch();
            inner.kick();
            (ChannelStream::new(self.shared.clone(), id, epoch), rx)
        };
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(reason)) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, reason)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session ended",
            )),
        }
    }

    /// The peer's name, once known.
    pub fn peer_name(&self) -> Option<String> {
        self.shared.lock().session.peer_name().map(str::to_owned)
    }

    /// Whether some link is up.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().session.is_connected()
    }

    /// A snapshot for status displays.
    pub fn status(&self) -> MuxStatus {
        let inner = self.shared.lock();
        let s = &inner.session;
        MuxStatus {
            peer: s.peer_name().map(str::to_owned),
            active_link: s.active_link().map(|l| l.0),
            links: inner
                .links
                .iter()
                .map(|(id, e)| {
                    let st = s.link_stats(*id).unwrap_or_default();
                    LinkStatus {
                        id: id.0,
                        transport: e.transport.clone(),
                        up: e.up && s.link_is_up(*id),
                        since: unix_secs(e.since),
                        bytes_in: st.bytes_in,
                        bytes_out: st.bytes_out,
                        frames_in: st.decode.frames,
                        crc_errors: st.decode.crc_errors,
                        garbage_bytes: st.decode.garbage_bytes,
                        oversized: st.decode.oversized,
                        payload_crc: !s.link_skips_payload_crc(*id),
                    }
                })
                .collect(),
            channels: s
                .channels()
                .map(|c| ChannelStatus {
                    id: c.id,
                    class: c.class,
                    name: c.name,
                    local: c.local,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                    rx_buffered: c.rx_buffered,
                    tx_buffered: c.tx_buffered,
                })
                .collect(),
            stats: {
                let st = s.stats();
                SessionCounters {
                    frames_sent: st.frames_sent,
                    frames_received: st.frames_received,
                    frames_retransmitted: st.frames_retransmitted,
                    duplicates: st.duplicates,
                    out_of_order: st.out_of_order,
                    protocol_errors: st.protocol_errors,
                    channel_resets: st.channel_resets,
                    session_restarts: st.session_restarts,
                    timeouts: st.timeouts,
                    expired: st.expired,
                    deferred: st.deferred,
                    errors: by_kind(&st.errors),
                    errors_not_logged: by_kind(&st.suppressed),
                    held_bytes: s.held_bytes(),
                }
            },
        }
    }

    /// Runs one link over `stream` until it ends; returns why it ended. `prefix` holds bytes
    /// already read from the stream (see [`read_hello`]).
    pub async fn run_link<S>(
        &self,
        stream: S,
        params: LinkParams,
        transport: &str,
        prefix: &[u8],
    ) -> String
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (link, wake, down, timer) = {
            let mut inner = self.shared.lock();
            let link = inner.session.add_link(params, Instant::now());
            let wake = Arc::new(Notify::new());
            let down = Arc::new(Notify::new());
            let timer = Arc::new(Notify::new());
            inner.links.insert(
                link,
                LinkEntry {
                    transport: transport.to_owned(),
                    up: false,
                    since: SystemTime::now(),
                    wake: wake.clone(),
                    down: down.clone(),
                    timer: timer.clone(),
                    down_reason: None,
                },
            );
            if !prefix.is_empty() {
                inner.session.handle_input(link, prefix, Instant::now());
                inner.dispatch(&self.shared);
            }
            (link, wake, down, timer)
        };
        let (mut r, mut w) = tokio::io::split(stream);
        let ended = tokio::select! {
            e = self.reader(link, &mut r) => e,
            e = self.writer(link, &mut w, &wake) => e,
            e = self.timer(link, &timer) => e,
            () = down.notified() => "link closed".into(),
        };
        // Why the session closed the link (a REFUSE, a bad HELLO...) says more than the end of
        // file that may race with it.
        let reason = self
            .shared
            .lock()
            .links
            .get(&link)
            .and_then(|e| e.down_reason.clone())
            .unwrap_or(ended);
        let _ = w.shutdown().await;
        let mut inner = self.shared.lock();
        inner.session.remove_link(link);
        if let Some(e) = inner.links.remove(&link) {
            tracing::info!(peer = %self.shared.label, transport = %e.transport, %reason, "link down");
            let _ = inner.events.send(MuxEvent::LinkDown {
                link: link.0,
                transport: e.transport,
                reason: reason.clone(),
            });
        }
        inner.dispatch(&self.shared);
        inner.kick();
        if inner.links.is_empty() {
            tokio::spawn(self.clone().linger());
        }
        reason
    }

    /// Runs the session's timers while it has no link (no link task does then): reports held
    /// back, and the expiry that frees what a guest that went away left behind.
    async fn linger(self) {
        loop {
            let deadline = {
                let inner = self.shared.lock();
                if !inner.links.is_empty() {
                    return; // A link came back; its timer runs the session.
                }
                match inner.session.poll_timeout() {
                    Some(t) => t,
                    None => return,
                }
            };
            tokio::time::sleep_until(deadline.into()).await;
            let mut inner = self.shared.lock();
            if !inner.links.is_empty() {
                return;
            }
            let expired = inner.session.stats().expired;
            inner.session.handle_timeout(Instant::now());
            inner.flush_reset_logs(&self.shared);
            inner.dispatch(&self.shared);
            if inner.session.stats().expired != expired {
                drop(inner);
                // Most of what the guest made us hold was freed just now.
                release_freed_memory();
            }
        }
    }

    /// Waits until the session wants input: while a guest does not read what we send, we do
    /// not read what it sends (see `Session::wants_input`). Returns whether it waited.
    async fn input_wanted(&self) -> bool {
        let mut waited = false;
        loop {
            let resumed = self.shared.input.notified();
            let mut resumed = std::pin::pin!(resumed);
            resumed.as_mut().enable();
            if self.shared.lock().session.wants_input() {
                return waited;
            }
            resumed.await;
            waited = true;
        }
    }

    async fn reader<R: AsyncRead + Unpin>(&self, link: LinkId, r: &mut R) -> String {
        let mut buf = vec![0u8; READ_MIN];
        let mut budget = ViolationBudget::new(Instant::now());
        loop {
            // Decode what was left undecoded when the session paused, or what comes next.
            let n = if self.input_wanted().await {
                0
            } else {
                match r.read(&mut buf).await {
                    Ok(0) => return "closed by the peer".into(),
                    Ok(n) => n,
                    Err(e) => return format!("read failed: {e}"),
                }
            };
            {
                let mut inner = self.shared.lock();
                let now = Instant::now();
                let before = inner.session.stats().protocol_errors;
                inner.session.handle_input(link, &buf[..n], now);
                let committed = inner.session.stats().protocol_errors.saturating_sub(before);
                inner.dispatch(&self.shared);
                inner.kick();
                if let Some(reason) = budget.add(committed, now) {
                    return reason;
                }
            }
            if n == buf.len() && buf.len() < MAX_INPUT {
                buf.resize((buf.len() * 4).min(MAX_INPUT), 0);
            }
        }
    }

    async fn writer<W: AsyncWrite + Unpin>(
        &self,
        link: LinkId,
        w: &mut W,
        wake: &Notify,
    ) -> String {
        // Where the transport takes vectored writes (sockets), large payloads go to the kernel
        // straight from the session's queues: one copy fewer, and the lock is held only to
        // encode headers. A bulk transfer spent a twentieth of its CPU time in that copy.
        let mut tx = Transmit::default();
        let mut out = Vec::new();
        let vectored = w.is_write_vectored();
        loop {
            tx.clear();
            out.clear();
            {
                let mut inner = self.shared.lock();
                let now = Instant::now();
                if vectored {
                    inner
                        .session
                        .poll_transmit_vectored(link, now, &mut tx, WRITE_BATCH);
                } else {
                    inner
                        .session
                        .poll_transmit(link, now, &mut out, WRITE_BATCH);
                }
                inner.dispatch(&self.shared);
                if inner.session.wants_input() {
                    self.shared.input.notify_waiters();
                }
                // What was just sent may need a retransmission timer.
                inner.rearm();
            }
            if tx.is_empty() && out.is_empty() {
                wake.notified().await;
                continue;
            }
            let written = if vectored {
                write_all_vectored(w, &tx).await
            } else {
                w.write_all(&out).await
            };
            if let Err(e) = written {
                return format!("write failed: {e}");
            }
            if let Err(e) = w.flush().await {
                return format!("flush failed: {e}");
            }
        }
    }

    /// Runs the session's timers: sleeps until the next deadline, or until [`Inner::rearm`]
    /// says there is an earlier one (never polls).
    async fn timer(&self, link: LinkId, rearmed: &Notify) -> String {
        loop {
            let deadline = {
                let mut inner = self.shared.lock();
                let next = inner.session.poll_timeout();
                inner.timer_at = next;
                next
            };
            match deadline {
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = rearmed.notified() => continue,
                },
                None => {
                    rearmed.notified().await;
                    continue;
                }
            }
            let mut inner = self.shared.lock();
            inner.session.handle_timeout(Instant::now());
            inner.flush_reset_logs(&self.shared);
            inner.dispatch(&self.shared);
            inner.kick();
            if !inner.links.contains_key(&link) {
                return "link removed".into();
            }
        }
    }
}

/// A session held still (its lock taken) for a snapshot: while it lives no link, timer or
/// channel stream of this session moves a byte. Dropping it lets everything go on as before,
/// so a snapshot that is not used (a failed upgrade) costs nothing but the pause.
pub struct Frozen<'a> {
    shared: &'a Arc<Shared>,
    inner: MutexGuard<'a, Inner>,
}

impl Mux {
    /// Holds the session still; see [`Frozen`].
    pub fn freeze(&self) -> Frozen<'_> {
        Frozen {
            shared: &self.shared,
            inner: self.shared.lock(),
        }
    }

    /// A session from a [`Frozen::snapshot`] of another process, with no link yet (the peer
    /// resumes it on its next one). `claimed` are the channels the caller carries on: a
    /// stream for each comes back, in that order. Every other channel is reset (the service
    /// that held it did not come along), except those whose stream was already dropped.
    pub fn restore(
        cfg: Config,
        state: &[u8],
        claimed: &[ChannelId],
    ) -> Result<(Mux, mpsc::UnboundedReceiver<Incoming>, Vec<ChannelStream>), SnapshotError> {
        let (detached, session) = split_state(state, cfg.max_channels)?;
        let session = Session::restore(cfg.clone(), session, Instant::now())?;
        let (mux, rx) = Mux::new(cfg, 1);
        let streams = {
            let mut inner = mux.shared.lock();
            inner.session = session;
            let epoch = inner.epoch();
            let streams = claimed
                .iter()
                .map(|&id| {
                    inner.wakers.insert(id, Wakers::default());
                    ChannelStream::new(mux.shared.clone(), id, epoch)
                })
                .collect();
            let unclaimed: Vec<ChannelId> = inner
                .session
                .channels()
                .map(|c| c.id)
                .filter(|id| !claimed.contains(id) && !detached.contains(id))
                .collect();
            for id in unclaimed {
                let reason = "vstreamd was upgraded; this service's state was not carried over";
                let _ = inner.session.reset(id, ResetCode::Aborted, reason);
            }
            inner.detached = detached;
            streams
        };
        // No link runs the timers yet (the resume timeout among them).
        tokio::spawn(mux.clone().linger());
        Ok((mux, rx, streams))
    }
}

impl Frozen<'_> {
    /// The session's state as bytes, as if every link had gone down: what
    /// [`Mux::restore`] takes. Events pending in the session are handed out first.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.inner.dispatch(self.shared);
        let mut out = Vec::new();
        out.extend_from_slice(&(self.inner.detached.len() as u64).to_le_bytes());
        for id in &self.inner.detached {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&self.inner.session.snapshot());
        out
    }
}

/// The detached channels and the session's own state of a [`Frozen::snapshot`].
fn split_state(state: &[u8], max: usize) -> Result<(HashSet<ChannelId>, &[u8]), SnapshotError> {
    let short = || SnapshotError::new("truncated before the session");
    let n = state.get(..8).ok_or_else(short)?;
    let n = u64::from_le_bytes(n.try_into().map_err(|_| short())?);
    if n > max as u64 {
        return Err(SnapshotError::new(format!(
            "{n} detached channels, at most {max} allowed"
        )));
    }
    let end = 8 + 4 * n as usize;
    let ids = state.get(8..end).ok_or_else(short)?;
    let detached = ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((detached, &state[end..]))
}

/// Writes all of `tx` with as few `writev` calls as the transport allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, tx: &Transmit) -> io::Result<()> {
    let mut done = 0;
    let mut slices = Vec::new();
    while done < tx.len() {
        slices.clear();
        tx.slices(done, &mut slices);
        match w.write_vectored(&slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    Ok(())
}

/// Reads from a fresh stream until the peer's HELLO arrives (or `timeout` passes); `prefix`
/// holds bytes already read from it. Returns the HELLO and every byte read, to be passed as
/// `prefix` to [`Mux::run_link`].
pub async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    prefix: Vec<u8>,
    timeout: Duration,
) -> io::Result<(Hello, Vec<u8>)> {
    let mut decoder = Decoder::new(64 * 1024);
    decoder.push(&prefix);
    let mut seen = prefix;
    let mut buf = [0u8; 4096];
    let fut = async {
        loop {
            if let Some(hello) = peek_hello(&mut decoder) {
                return hello
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before HELLO",
                ));
            }
            if seen.len() + n > 1024 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no HELLO in the first MiB",
                ));
            }
            seen.extend_from_slice(&buf[..n]);
            decoder.push(&buf[..n]);
        }
    };
    let hello = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HELLO from the peer"))??;
    Ok((hello, seen))
}

/// A new session id for [`Mux::new`]: non-zero, different for every session, and available at
/// once, even early in a guest's boot.
///
/// A session id needs uniqueness, not secrecy: it tells a resumed session from a restarted peer,
/// and the peer learns it in our first HELLO anyway. So it never waits for the kernel's CRNG,
/// which in a guest without virtio-rng or RDRAND may stay uninitialised for a minute after boot
/// (a blocking `getrandom` there held the agent up for 40 s): `getrandom(GRND_INSECURE)`
/// (Linux 5.6 and later), else `GRND_NONBLOCK` (fails only while the CRNG is not ready), else a
/// hash of the clock, the pid, a stack address and a per-process counter.
pub fn session_id() -> u64 {
    use rustix::rand::{getrandom, GetRandomFlags};
    let mut buf = [0u8; 8];
    let from_kernel = [GetRandomFlags::INSECURE, GetRandomFlags::NONBLOCK]
        .into_iter()
        .any(|flags| matches!(getrandom(&mut buf[..], flags), Ok(8)));
    let id = if from_kernel {
        u64::from_ne_bytes(buf)
    } else {
        fallback_session_id(&buf)
    };
    id.max(1)
}

/// The last resort of [`session_id`]: unique enough (a restarted process has a new pid or a
/// later clock; ASLR moves the stack), never random.
fn fallback_session_id(local: &[u8; 8]) -> u64 {
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::hash::DefaultHasher::new();
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .hash(&mut h);
    std::process::id().hash(&mut h);
    (local.as_ptr() as usize).hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    h.finish()
}

/// Link parameters for a transport address: serial lines (named as such, or declared with a
/// `baud` because a socket stands for one, as QEMU's chardev of a 16550 does) get small frames
/// and patient timers; everything else is a fast stream. Sockets and vsock check integrity
/// themselves, so they offer to leave out the payload CRC; virtio-serial ports (which lose
/// bytes when the guest's driver resets), inherited descriptors and stdio (of unknown kind)
/// keep it. Lower `priority` is preferred.
pub fn link_params(address: &Address, baud: Option<u32>, priority: u32) -> LinkParams {
    match (address, baud) {
        (Address::Serial(s), _) => LinkParams::serial(priority, s.baud),
        (_, Some(b)) => LinkParams::serial(priority, b),
        (
            Address::Unix(_)
            | Address::UnixListen(_)
            | Address::Tcp { .. }
            | Address::TcpListen { .. }
            | Address::Vsock { .. }
            | Address::VsockListen { .. }
            | Address::HybridVsock { .. }
            | Address::VhostUserVsock(_),
            None,
        ) => LinkParams::socket(priority),
        (Address::Port(_) | Address::Fd(_) | Address::Stdio, None) => LinkParams::stream(priority),
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One channel as an async byte stream. Dropping it closes our direction; data the peer sends
/// afterwards is discarded.
pub struct ChannelStream {
    shared: Arc<Shared>,
    id: ChannelId,
    epoch: u64,
    /// A peer-opened channel not yet accepted: the first read or write accepts it, a `reset`
    /// before that refuses it (the opener's `open` fails with the reason).
    pending_accept: bool,
}

impl std::fmt::Debug for ChannelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelStream({}#{})", self.shared.label, self.id)
    }
}

impl ChannelStream {
    fn new(shared: Arc<Shared>, id: ChannelId, epoch: u64) -> ChannelStream {
        ChannelStream {
            shared,
            id,
            epoch,
            pending_accept: false,
        }
    }

    /// Takes the fields it needs (not `&mut self`) so that callers can hold the lock guard
    /// borrowed from `self.shared` without cloning the `Arc`: that clone and drop, two atomic
    /// operations on a line both cores touch, cost 18% of the CPU time at 64-byte writes.
    fn accept_if_pending(pending: &mut bool, id: ChannelId, epoch: u64, inner: &mut Inner) {
        if std::mem::take(pending) && inner.epoch() == epoch {
            let _ = inner.session.accept(id);
            inner.kick();
        }
    }

    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// Aborts the channel (the peer sees a reset with `reason`).
    pub fn reset(&self, reason: &str) {
        let mut inner = self.shared.lock();
        let code = if self.pending_accept {
            ResetCode::Refused
        } else {
            ResetCode::Aborted
        };
        if inner.epoch() == self.epoch && inner.session.reset(self.id, code, reason).is_ok() {
            inner.kick();
        }
    }

    /// Checks that the channel still belongs to the current session; maps errors.
    fn gone(&self, inner: &Inner, e: ChannelError) -> io::Error {
        if inner.epoch() != self.epoch {
            return io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the peer restarted; channel lost",
            );
        }
        match (e, inner.ended.get(&self.id)) {
            (_, Some(reason)) => io::Error::new(io::ErrorKind::ConnectionReset, reason.clone()),
            (ChannelError::Closed(_), None) => {
                io::Error::new(io::ErrorKind::BrokenPipe, "channel closed for sending")
            }
            (e, None) => io::Error::new(io::ErrorKind::NotConnected, e.to_string()),
        }
    }
}

impl AsyncRead for ChannelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        Self::accept_if_pending(&mut this.pending_accept, this.id, this.epoch, &mut inner);
        if inner.epoch() != this.epoch {
            return Poll::Ready(Err(this.gone(&inner, ChannelError::Unknown(this.id))));
        }
        match inner.session.recv(this.id, buf.initialize_unfilled()) {
            Ok(Recv::Data(n)) => {
                buf.advance(n);
                inner.kick();
                Poll::Ready(Ok(()))
            }
            Ok(Recv::Eof) => Poll::Ready(Ok(())),
            Ok(Recv::WouldBlock) => {
                inner.wakers.entry(this.id).or_default().reader = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(e) => {
                if inner.ended.contains_key(&this.id) {
                    Poll::Ready(Err(this.gone(&inner, e)))
                } else {
                    Poll::Ready(Ok(())) // Closed cleanly in both directions: EOF.
                }
            }
        }
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        Self::accept_if_pending(&mut this.pending_accept, this.id, this.epoch, &mut inner);
        if inner.epoch() != this.epoch {
            return Poll::Ready(Err(this.gone(&inner, ChannelError::Unknown(this.id))));
        }
        match inner.session.send(this.id, data) {
            Ok(0) if !data.is_empty() => {
                inner.wakers.entry(this.id).or_default().writer = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(n) => {
                inner.kick();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(this.gone(&inner, e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data is queued in the session and sent (and retransmitted) by the link tasks.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        if inner.epoch() == this.epoch {
            let _ = inner.session.close(this.id);
            inner.kick();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for ChannelStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if inner.epoch() != self.epoch {
            // A stream of a replaced session: its id may already name a new channel, whose
            // wakers and state must stay.
            return;
        }
        inner.wakers.remove(&self.id);
        inner.ended.remove(&self.id);
        if !inner.session.has_channel(self.id) {
            return;
        }
        if self.pending_accept {
            let reason = "the service did not take the channel";
            let _ = inner.session.reset(self.id, ResetCode::Refused, reason);
            inner.kick();
            return;
        }
        let _ = inner.session.close(self.id);
        inner.detached.insert(self.id);
        inner.discard(self.id);
        inner.kick();
    }
}

/// Status of one session, as shown by `vstreamctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct MuxStatus {
    /// Peer's name.
    pub peer: Option<String>,
    /// Link data is sent on.
    pub active_link: Option<u32>,
    /// Links.
    pub links: Vec<LinkStatus>,
    /// Open channels.
    pub channels: Vec<ChannelStatus>,
    /// Counters.
    pub stats: SessionCounters,
}

/// Status of one link (Deserialize too: vstreamctl reads it back from vstreamd).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Link id.
    pub id: u32,
    /// Transport description.
    pub transport: String,
    /// Handshake done and alive.
    pub up: bool,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Frames decoded.
    pub frames_in: u64,
    /// CRC failures.
    pub crc_errors: u64,
    /// Bytes skipped while resynchronising.
    pub garbage_bytes: u64,
    /// Frames above the size limit.
    pub oversized: u64,
    /// Frames carry a payload CRC (false once both sides agreed to leave it out).
    pub payload_crc: bool,
}

/// Status of one channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// Channel id.
    pub id: u32,
    /// Device class.
    pub class: String,
    /// Name.
    pub name: String,
    /// Opened by this side.
    pub local: bool,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Received, not yet read.
    pub rx_buffered: usize,
    /// Queued, not yet sent.
    pub tx_buffered: usize,
}

/// Session counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionCounters {
    /// Frames sent once.
    pub frames_sent: u64,
    /// Frames accepted.
    pub frames_received: u64,
    /// Frames sent again.
    pub frames_retransmitted: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Frames after a gap dropped.
    pub out_of_order: u64,
    /// Peer protocol violations.
    pub protocol_errors: u64,
    /// Channels reset on errors.
    pub channel_resets: u64,
    /// Peer restarts.
    pub session_restarts: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Times the session was forgotten because the peer stayed away.
    pub expired: u64,
    /// Peer frames dropped unprocessed while our control queue was full.
    pub deferred: u64,
    /// Protocol errors by kind.
    pub errors: BTreeMap<Cow<'static, str>, u64>,
    /// Of those, the ones not logged (rate limit), by kind.
    pub errors_not_logged: BTreeMap<Cow<'static, str>, u64>,
    /// Bytes the session holds because of the peer now (bounded by `peer_buffer_limit`).
    pub held_bytes: usize,
}

/// Gives the kernel back the free pages inside the allocator's heaps, not just at their top:
/// buffers a guest made us allocate are spread among long-lived allocations, so without it
/// most of them stayed resident after being freed.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim has no preconditions; it only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Non-zero counts by kind name.
fn by_kind(counts: &[u64; ErrorKind::ALL.len()]) -> BTreeMap<Cow<'static, str>, u64> {
    ErrorKind::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (Cow::Borrowed(k.name()), *n))
        .collect()
}

/// Makes glibc give freed memory back to the kernel soon: large buffers come from mmap (freed
/// at once), the heap is trimmed eagerly, and threads share two arenas instead of one each.
/// Without it, what a burst (or a hostile guest) made a process allocate stayed resident after
/// it was freed. Call at the start of `main`, before any thread exists.
pub fn return_memory_eagerly() {
    // SAFETY: mallopt only changes glibc allocator tunables; called at the start of main,
    // before any other thread exists, with documented parameters and in-range values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn a_link_over_its_violation_budget_is_closed_and_the_budget_renews() {
        use super::{ViolationBudget, MAX_VIOLATIONS, VIOLATION_WINDOW};
        let t0 = std::time::Instant::now();
        let mut b = ViolationBudget::new(t0);
        assert_eq!(b.add(MAX_VIOLATIONS, t0), None);
        let reason = b.add(1, t0).expect("over the budget");
        assert!(
            reason.starts_with(super::DROPPED_FOR_VIOLATIONS),
            "{reason}"
        );
        // A noisy line spreads its errors out: a new window starts afresh.
        let mut b = ViolationBudget::new(t0);
        let later = t0 + VIOLATION_WINDOW + std::time::Duration::from_millis(1);
        assert_eq!(b.add(MAX_VIOLATIONS, t0), None);
        assert_eq!(b.add(MAX_VIOLATIONS, later), None);
    }

    #[test]
    fn session_ids_are_non_zero_and_distinct_even_without_the_kernel() {
        let ids: HashSet<u64> = (0..1000).map(|_| super::session_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
        let fallback: HashSet<u64> = (0..1000)
            .map(|_| super::fallback_session_id(&[0; 8]))
            .collect();
        assert_eq!(fallback.len(), 1000, "the clock-and-pid ids repeat");
    }
}
