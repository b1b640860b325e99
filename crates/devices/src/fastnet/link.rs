//! The packet loops both ends of a link run once the mode is chosen: through the segment's
//! rings with doorbells on the channel ([`rings`]), or on the channel itself ([`pump`]). The
//! host and the guest run the same code; [`LinkMessage`] says which ring a side produces on
//! and how its peer's messages read.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::port::Port;
use super::ring::{
    Consumer, Direction, Doorbell, Filled, Layout, Memory, Producer, RingError, Segment,
};
use super::vnet;
use super::MAX_PACKET;
use super::{read_message, Decoder, GuestMsg, HostMsg, Message, ReadError, Ready, RecordError};

/// Packets taken from the TAP per batch before the producer index is published.
const BATCH: usize = 64;

/// Frames published to a sleeping peer before its doorbell is rung even though this side is
/// still busy: bounds how long a doorbell waits for this side to run dry.
const DOORBELL_AFTER: usize = 4 * BATCH;

/// How often a side that polls after traffic (`poll_for` of [`rings`]) looks at its rings.
const POLL_EVERY: Duration = Duration::from_micros(100);

/// How a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The segment broke a rule (the peer was told with a `Reset`).
    #[error("{0}")]
    Ring(#[from] RingError),
    /// The channel carried something that is not a fastnet message.
    #[error("fastnet channel: {0}")]
    Codec(#[from] RecordError),
    /// The guest reset the link.
    #[error("the guest reset the link: {0}")]
    GuestReset(String),
    /// The host reset the link (the guest's end).
    #[error("the host reset the link: {0}")]
    HostReset(String),
    /// The channel or the TAP failed, or the channel ended.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A link's mode and counters, updated while it runs (`vstreamctl status`, the benchmarks).
#[derive(Debug, Default)]
pub struct Stats {
    /// The guest's answer: the mode, and why not shared memory.
    pub ready: std::sync::Mutex<Option<Ready>>,
    /// Packets to the peer.
    pub packets_out: AtomicU64,
    /// Packets from the peer.
    pub packets_in: AtomicU64,
    /// Doorbells sent to the peer.
    pub doorbells_out: AtomicU64,
    /// Doorbells received.
    pub doorbells_in: AtomicU64,
    /// Frames from the guest dropped for a bad vnet header (host only).
    pub dropped_invalid: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the mode the guest chose.
    pub fn set_ready(&self, ready: &Ready) {
        if let Ok(mut r) = self.ready.lock() {
            *r = Some(ready.clone());
        }
    }

    /// The mode and the counters (status).
    pub fn snapshot(&self) -> FastnetStatus {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let ready = self.ready.lock().ok().and_then(|r| r.clone());
        FastnetStatus {
            mode: ready.as_ref().map(|r| r.mode),
            reason: ready.and_then(|r| r.reason),
            packets_out: get(&self.packets_out),
            packets_in: get(&self.packets_in),
            doorbells_out: get(&self.doorbells_out),
            doorbells_in: get(&self.doorbells_in),
            dropped_invalid: get(&self.dropped_invalid),
            resets: 0,
            last_reset: None,
            switch: None,
        }
    }
}

/// The fastnet device's status (`devices.fastnet` in `vstreamctl status`): the current (or
/// last) link's mode and counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FastnetStatus {
    /// The mode the guest chose; `None` before its answer.
    pub mode: Option<super::Mode>,
    /// Why not shared memory, if the guest said.
    pub reason: Option<String>,
    /// Packets to the peer.
    pub packets_out: u64,
    /// Packets from the peer.
    pub packets_in: u64,
    /// Doorbells sent to the peer.
    pub doorbells_out: u64,
    /// Doorbells received.
    pub doorbells_in: u64,
    /// Frames from the guest dropped for a bad vnet header ([`super::vnet::check`]).
    #[serde(default)]
    pub dropped_invalid: u64,
    /// Links of this guest that ended (a reset by either side, or the channel's end); the
    /// guest's agent sets up a new one each time, after a back-off.
    #[serde(default)]
    pub resets: u64,
    /// Why the last link ended, naming the rule the segment broke if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reset: Option<String>,
    /// The guest's port, if the link is on the built-in switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<super::switch::SwitchStatus>,
}

#[cfg(feature = "host")]
impl crate::status::Samples for FastnetStatus {
    fn samples(&self) -> Vec<crate::status::Sample> {
        use crate::status::Sample;
        const PACKETS: &str = "Packets on the link, by direction.";
        const DOORBELLS: &str = "Doorbells on the link, by direction.";
        vec![
            Sample::flag(
                "shared_memory",
                "Whether the link carries its packets in shared memory.",
                self.mode == Some(super::Mode::SharedMemory),
            ),
            Sample::counter("packets", PACKETS, self.packets_out).label("direction", "out"),
            Sample::counter("packets", PACKETS, self.packets_in).label("direction", "in"),
            Sample::counter("doorbells", DOORBELLS, self.doorbells_out).label("direction", "out"),
            Sample::counter("doorbells", DOORBELLS, self.doorbells_in).label("direction", "in"),
            Sample::counter(
                "resets",
                "Links of this guest that ended and were set up again.",
                self.resets,
            ),
            Sample::counter(
                "dropped_invalid",
                "Frames from the guest dropped for a bad vnet header.",
                self.dropped_invalid,
            ),
        ]
    }
}

/// What a message from the peer means to the packet loops.
pub enum Incoming {
    /// A packet (channel-only mode).
    Packet(Bytes),
    /// Look at the rings.
    Doorbell,
    /// Nothing for the loops (a late `Setup` or `Ready`).
    Other,
}

/// Whether a side trusts the peer that writes the ring it consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The host's end: the guest may write anything into the segment at any moment. Each
    /// frame is copied out, and its vnet header checked on the copy ([`vnet::check`]) before
    /// it reaches the TAP or the switch; nothing is read twice from shared memory.
    Untrusted,
    /// The guest's end: the host can already do anything to the guest, so a frame goes to the
    /// TAP straight out of the segment (the kernel's copy only), unchecked.
    Trusted,
}

/// The messages one side receives, seen from the packet loops.
pub trait LinkMessage: Message {
    /// What this side sends back.
    type Answer: Message;
    /// The ring this side consumes (its peer produces on it).
    const RING: Direction;
    /// Whether this side trusts the peer: how the peer's frames reach the TAP.
    const PEER: Peer;
    /// The message's meaning; the peer's `Reset` ends the link with its reason.
    fn incoming(self) -> Result<Incoming, LinkError>;
    /// A packet for the peer (channel-only mode).
    fn packet(p: Bytes) -> Self::Answer;
    /// The peer's doorbell.
    fn doorbell() -> Self::Answer;
    /// Tells the peer this side stopped using the segment, and why.
    fn reset(why: String) -> Self::Answer;
}

impl LinkMessage for GuestMsg {
    type Answer = HostMsg;
    const RING: Direction = Direction::GuestToHost;
    const PEER: Peer = Peer::Untrusted;
    fn incoming(self) -> Result<Incoming, LinkError> {
        match self {
            GuestMsg::Packet(p) => Ok(Incoming::Packet(p)),
            GuestMsg::Doorbell => Ok(Incoming::Doorbell),
            GuestMsg::Reset(why) => Err(LinkError::GuestReset(why)),
            GuestMsg::Ready(_) => Ok(Incoming::Other),
        }
    }
    fn packet(p: Bytes) -> HostMsg {
        HostMsg::Packet(p)
    }
    fn doorbell() -> HostMsg {
        HostMsg::Doorbell
    }
    fn reset(why: String) -> HostMsg {
        HostMsg::Reset(why)
    }
}

impl LinkMessage for HostMsg {
    type Answer = GuestMsg;
    const RING: Direction = Direction::HostToGuest;
    const PEER: Peer = Peer::Trusted;
    fn incoming(self) -> Result<Incoming, LinkError> {
        match self {
            HostMsg::Packet(p) => Ok(Incoming::Packet(p)),
            HostMsg::Doorbell => Ok(Incoming::Doorbell),
            HostMsg::Reset(why) => Err(LinkError::HostReset(why)),
            HostMsg::Setup(_) => Ok(Incoming::Other),
        }
    }
    fn packet(p: Bytes) -> GuestMsg {
        GuestMsg::Packet(p)
    }
    fn doorbell() -> GuestMsg {
        GuestMsg::Doorbell
    }
    fn reset(why: String) -> GuestMsg {
        GuestMsg::Reset(why)
    }
}

/// Encodes `msg` and writes it.
pub(super) async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &impl Message,
) -> Result<(), LinkError> {
    let mut out = Vec::new();
    msg.encode(&mut out)?;
    stream.write_all(&out).await?;
    Ok(())
}

/// The next whole message from the peer.
pub(super) async fn next<S: AsyncRead + Unpin, In: Message>(
    stream: &mut S,
    dec: &mut Decoder<In>,
) -> Result<In, LinkError> {
    match read_message(stream, dec).await {
        Ok(Some(m)) => Ok(m),
        // A peer ends a link with a `Reset`, never by closing the channel.
        Ok(None) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
        Err(ReadError::Io(e)) => Err(e.into()),
        Err(ReadError::Record(e)) => Err(e.into()),
    }
}

/// Feeds the `n` bytes a channel read returned to the decoder; 0 is the channel's end, which
/// a peer never chooses (it ends a link with a `Reset`).
fn received<In: Message>(dec: &mut Decoder<In>, rbuf: &[u8], n: usize) -> Result<(), LinkError> {
    if n == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    dec.push(&rbuf[..n])?;
    Ok(())
}

/// Hands a frame from the peer to `tap`; on the host, one whose vnet header breaks a rule is
/// dropped and counted instead (a bad frame is the guest's loss, not the link's end).
fn deliver<In: LinkMessage>(tap: &impl Port, frame: &[u8], stats: &Stats) -> Result<(), LinkError> {
    Stats::bump(&stats.packets_in);
    if In::PEER == Peer::Untrusted {
        if let Err(e) = vnet::check(frame) {
            tracing::debug!("fastnet: dropped a frame from the guest: {e}");
            Stats::bump(&stats.dropped_invalid);
            return Ok(());
        }
    }
    tap.send(frame)?;
    Ok(())
}

/// Channel-only mode at either end: packets from the peer go to `tap`, packets from `tap` go
/// to the peer as `Packet` messages, until an error or the peer's reset. The channel is read
/// straight into the decoder ([`next`]), so a packet's bytes are copied once on their way
/// from the channel to `tap`, not through a read buffer first.
pub(super) async fn pump<S: AsyncRead + AsyncWrite + Unpin, In: LinkMessage>(
    stream: &mut S,
    tap: &impl Port,
    mut dec: Decoder<In>,
    stats: &Stats,
) -> Result<(), LinkError> {
    let mut pkt = vec![0u8; MAX_PACKET as usize];
    let mut out = Vec::new();
    loop {
        tokio::select! {
            // Cancel-safe: what a cancelled read took in stays in `dec`.
            m = next(stream, &mut dec) => {
                if let Incoming::Packet(p) = m?.incoming()? {
                    deliver::<In>(tap, &p, stats)?;
                }
            }
            n = tap.recv(&mut pkt) => {
                let mut n = n?;
                out.clear();
                // More queued frames go in the same write.
                loop {
                    In::packet(Bytes::copy_from_slice(&pkt[..n])).encode(&mut out)?;
                    Stats::bump(&stats.packets_out);
                    match tap.try_recv(&mut pkt) {
                        Some(m) => n = m,
                        None => break,
                    }
                }
                stream.write_all(&out).await?;
            }
        }
    }
}

/// Shared-memory mode at either end: packets from `tap` go into the ring this side produces
/// on, packets from the peer's ring go to `tap`; the channel carries doorbells only. A
/// [`RingError`] (the peer broke a rule) is sent to the peer as a `Reset` before the link ends
/// with it. For `poll_for` after its last traffic this side looks at its rings every
/// [`POLL_EVERY`] instead of saying it sleeps, so that the peer rings no doorbell for what it
/// publishes meanwhile (an answer, an ACK); zero: never.
pub(super) async fn rings<S: AsyncRead + AsyncWrite + Unpin, In: LinkMessage>(
    stream: &mut S,
    tap: &impl Port,
    segment: (Arc<Segment>, Layout),
    dec: Decoder<In>,
    rbuf: &mut [u8],
    stats: &Stats,
    poll_for: Duration,
) -> Result<(), LinkError> {
    let result = ring_loop(stream, tap, segment, dec, rbuf, stats, poll_for).await;
    if let Err(LinkError::Ring(e)) = &result {
        // Best effort: the peer learns why before the channel goes.
        let _ = send(stream, &In::reset(e.to_string())).await;
    }
    result
}

/// Rings the peer's doorbell.
async fn ring<S: AsyncWrite + Unpin, In: LinkMessage>(
    stream: &mut S,
    stats: &Stats,
) -> Result<(), LinkError> {
    Stats::bump(&stats.doorbells_out);
    send(stream, &In::doorbell()).await
}

async fn ring_loop<S: AsyncRead + AsyncWrite + Unpin, In: LinkMessage>(
    stream: &mut S,
    tap: &impl Port,
    (seg, layout): (Arc<Segment>, Layout),
    mut dec: Decoder<In>,
    rbuf: &mut [u8],
    stats: &Stats,
    poll_for: Duration,
) -> Result<(), LinkError> {
    let tx_ring = match In::RING {
        Direction::HostToGuest => Direction::GuestToHost,
        Direction::GuestToHost => Direction::HostToGuest,
    };
    let mut tx = TapToRing {
        ring: Producer::new(seg.clone(), layout, tx_ring),
        // The TAP's largest frame (a GSO frame and its vnet header), whatever the header's
        // max_packet says: a smaller buffer would cut frames.
        pkt: vec![0u8; MAX_PACKET as usize],
        held: None,
    };
    let mut rx = Consumer::new(seg, layout, In::RING);
    let mut from_peer = vec![0u8; layout.max_packet as usize];
    // Frames published since the sleeping peer became owed a doorbell (None: none owed).
    let mut owed: Option<usize> = None;
    let poller = if poll_for.is_zero() {
        None
    } else {
        Some(Poller::new()?)
    };
    let mut last_traffic = Instant::now();
    loop {
        // Take everything the peer published, and release it with one store.
        let drained =
            rx.drain(|mem, off, len| ring_to_tap::<In>(mem, off, len, &mut from_peer, tap, stats))?;
        let mut moved = drained.packets;
        if drained.doorbell == Doorbell::Ring {
            ring::<S, In>(stream, stats).await?;
        }
        // Then what the TAP already queued, without waiting.
        let pushed = tx.take(tap, None, stats)?;
        moved += pushed;
        owed = tx.publish(owed, pushed);
        if owed.is_some_and(|n| n >= DOORBELL_AFTER || moved == 0) {
            // The peer sleeps: one doorbell for everything published since, rung when this
            // side runs dry (or after DOORBELL_AFTER frames), not one per batch.
            owed = None;
            ring::<S, In>(stream, stats).await?;
        }
        if moved > 0 {
            last_traffic = Instant::now();
            // Busy: go round again without telling the peer we sleep, so that it does not
            // ring (a doorbell costs both sides a trip through the channel). Yield: the
            // channel's own tasks may share this thread.
            tokio::task::yield_now().await;
            continue;
        }
        // Nothing moved: say we sleep on both rings (or, polling, only on the producer's),
        // then wait for a doorbell, the TAP or the poll timer.
        if tx.held.is_some() && !tx.ring.prepare_wait()? {
            continue;
        }
        let polling = match &poller {
            Some(p) if last_traffic.elapsed() < poll_for => {
                p.arm(POLL_EVERY)?;
                true
            }
            _ => false,
        };
        if !polling && !rx.prepare_sleep()? {
            continue;
        }
        while let Some(m) = dec.next_message()? {
            if let Incoming::Doorbell = m.incoming()? {
                Stats::bump(&stats.doorbells_in);
            }
        }
        tokio::select! {
            n = stream.read(rbuf) => received(&mut dec, rbuf, n?)?,
            n = tap.recv(&mut tx.pkt), if tx.held.is_none() => {
                let pushed = tx.take(tap, Some(n?), stats)?;
                // The doorbell, if owed, goes at the end of the next turn that moves nothing.
                owed = tx.publish(owed, pushed);
            }
            r = async { poller.as_ref().expect("polling has a poller").expired().await }, if polling => r?,
        }
    }
}

/// Hands the peer's frame of `len` bytes at `off` in the segment (a validated record) to
/// `tap`: copied out through `buf` (`max_packet` bytes, which `len` never exceeds) and checked
/// ([`deliver`]) from an untrusted peer; from a trusted one, written to the TAP straight out of
/// the segment when the port is a descriptor.
fn ring_to_tap<In: LinkMessage>(
    mem: &Arc<Segment>,
    off: usize,
    len: usize,
    buf: &mut [u8],
    tap: &impl Port,
    stats: &Stats,
) -> Result<(), LinkError> {
    if let (Peer::Trusted, Some(fd)) = (In::PEER, tap.fd()) {
        Stats::bump(&stats.packets_in);
        return match mem.write_to_fd(off, len, fd) {
            // A full queue drops the frame, as Tun::send does.
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let frame = &mut buf[..len];
    mem.read(off, frame);
    deliver::<In>(tap, frame, stats)
}

/// The ring this side produces on, fed from its TAP.
struct TapToRing {
    ring: Producer<Arc<Segment>>,
    /// Where frames are read from the TAP.
    pkt: Vec<u8>,
    /// The length of a frame in `pkt` that did not fit: the TAP is not read until it does.
    held: Option<usize>,
}

impl TapToRing {
    /// Publishes what [`TapToRing::take`] pushed; returns the frames published since the
    /// peer became owed a doorbell (`owed` before this batch), or None if it is awake.
    fn publish(&mut self, owed: Option<usize>, pushed: usize) -> Option<usize> {
        match (self.ring.publish(), owed) {
            (_, Some(n)) => Some(n + pushed),
            (Doorbell::Ring, None) => Some(pushed),
            (Doorbell::Quiet, None) => None,
        }
    }

    /// Pushes the held frame, then `first` (a frame already read into `pkt`), then frames
    /// the TAP has queued, up to [`BATCH`] in all, without publishing; stops at a frame that
    /// does not fit (held). Returns the frames pushed.
    fn take(
        &mut self,
        tap: &impl Port,
        first: Option<usize>,
        stats: &Stats,
    ) -> Result<usize, LinkError> {
        let max_packet = self.ring.max_packet() as usize;
        let mut next = self.held.take().or(first);
        let mut pushed = 0;
        for _ in 0..BATCH {
            let n = match next.take() {
                Some(n) => n,
                None => match self.read_into_ring(tap)? {
                    Some(Filled::Pushed(0) | Filled::Failed(_)) => break,
                    Some(Filled::Pushed(_)) => {
                        Stats::bump(&stats.packets_out);
                        pushed += 1;
                        continue;
                    }
                    // No room for a frame of the largest size: read it here, it may fit.
                    Some(Filled::Full) | None => match tap.try_recv(&mut self.pkt) {
                        Some(n) => n,
                        None => break,
                    },
                },
            };
            if n > max_packet {
                // Only a header with a small max_packet lets this happen; a cut frame would be
                // worse than a lost one.
                tracing::debug!("fastnet: dropped a {n}-byte frame (max_packet {max_packet})");
            } else if self.ring.push(&self.pkt[..n])? {
                Stats::bump(&stats.packets_out);
                pushed += 1;
            } else {
                self.held = Some(n);
                break;
            }
        }
        Ok(pushed)
    }

    /// Reads the TAP's next frame straight into the ring (no copy through `pkt`), if the port
    /// is a descriptor and the ring takes its largest frame. `None`: it cannot. A read error
    /// (nothing queued: EAGAIN) is `Failed` and leaves the ring as it was, as `try_recv` would.
    fn read_into_ring(&mut self, tap: &impl Port) -> Result<Option<Filled<io::Error>>, RingError> {
        let Some(fd) = tap.fd() else {
            return Ok(None);
        };
        if self.ring.max_packet() < MAX_PACKET {
            return Ok(None);
        }
        self.ring
            .push_with(MAX_PACKET, |mem, off, len| mem.read_from_fd(off, len, fd))
            .map(Some)
    }
}

/// A timer of sub-millisecond grain for a side that polls its rings (tokio's timers count
/// whole milliseconds): a timerfd on the runtime's reactor.
struct Poller(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl Poller {
    fn new() -> io::Result<Poller> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: the poller owns the descriptor, just created, and keeps it open for as
        // long as it is registered; nothing else closes or registers it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }?;
        Ok(Poller(fd))
    }

    /// Expires once, `after` from now (replacing an earlier arming).
    fn arm(&self, after: Duration) -> io::Result<()> {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let value = Timespec {
            tv_sec: after.as_secs().try_into().unwrap_or(0),
            tv_nsec: after.subsec_nanos().into(),
        };
        timerfd_settime(
            self.0.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )?;
        Ok(())
    }

    /// Waits until the timer has expired (at once if it expired unread before).
    async fn expired(&self) -> io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            let mut count = [0u8; 8];
            match rustix::io::read(ready.get_inner(), &mut count) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
