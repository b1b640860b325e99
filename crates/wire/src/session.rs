//! The multiplexer session: channels, credit, acknowledgements, retransmission, resume.
//!
//! A [`Session`] is one conversation between a host and a guest. It outlives transport
//! connections: each connection is a *link* ([`LinkId`]); frames are sequenced per session, so
//! when a link is cut the session resumes on the next link (or on another link that is already
//! up) and retransmits what the peer has not acknowledged. No I/O, no clock: the caller feeds
//! bytes and the current time in, and takes bytes and events out.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::{self, BufferPool, DecodeError, Decoder, Frame, InputBuf, Kind, Sink, Transmit};
use crate::hello::{caps, Hello, Role, VERSION};
use crate::limit::ReportLimit;

mod channel;
mod event;
mod receive;
mod snapshot;
mod timers;
mod transmit;

use channel::Channel;
pub use channel::SHARE_MIN;
pub use event::{ChannelError, ChannelInfo, ErrorKind, Event, ProtocolError, Recv, ResetCode};
pub use snapshot::SnapshotError;

/// Identifies a link (one transport connection) within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u32);

/// Identifies a channel within a session. Host-opened channels are even, guest-opened odd.
pub type ChannelId = u32;

/// Session-wide settings. Defaults are safe for a daemon serving many guests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our name, sent in HELLO (the guest's name for an agent).
    pub name: String,
    /// Host or guest.
    pub role: Role,
    /// Largest payload we accept in one frame.
    pub max_frame: u32,
    /// Receive window each channel starts with: bytes the peer may send before we grant more.
    pub channel_window: u32,
    /// Bytes an application may queue on one channel before `send` accepts no more, at first.
    pub channel_send_buffer: usize,
    /// Largest receive window and send buffer a channel grows to (window autotuning: see
    /// docs/PROTOCOL.md, "Flow control"), each growth charged to `peer_buffer_limit`. Equal
    /// to both of the above, nothing grows.
    pub channel_window_max: u32,
    /// Most channels open at once.
    pub max_channels: usize,
    /// The most this peer can make us hold, all included: receive windows, send buffers,
    /// unacknowledged frames, queued control frames, decoder buffers and spare buffers (see
    /// [`Session::held_bytes`]). Fixed parts are set aside first ([`Config::fixed_charge`]);
    /// each channel then takes [`Config::channel_charge`] of the rest, and a channel that does
    /// not fit is refused (RESET Resource).
    pub peer_buffer_limit: usize,
    /// Most bytes of sent-but-unacknowledged frames kept for retransmission.
    pub max_unacked: usize,
    /// Forget the session (channels, queues) once no link was up for this long: a peer that
    /// went away must not pin what it made us buffer. A peer coming back later starts anew.
    pub resume_timeout: Duration,
    /// Send a keepalive probe after this long without hearing from the peer on a link.
    pub keepalive_interval: Duration,
    /// Declare a link dead after this long without hearing from the peer.
    pub keepalive_timeout: Duration,
}

impl Config {
    /// Defaults for `role` and `name`.
    pub fn new(role: Role, name: impl Into<String>) -> Config {
        Config {
            name: name.into(),
            role,
            max_frame: 64 * 1024,
            channel_window: 256 * 1024,
            channel_send_buffer: 256 * 1024,
            channel_window_max: 4 * 1024 * 1024,
            max_channels: 1024,
            peer_buffer_limit: 64 * 1024 * 1024,
            max_unacked: 16 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(15),
            resume_timeout: Duration::from_secs(60),
        }
    }

    /// What one channel takes from `peer_buffer_limit`: its receive window with a quarter more
    /// for allocation slack (payloads are stored in buffers up to 8/7 of their size, small
    /// ones coalesced), and its send buffer.
    pub fn channel_charge(&self) -> usize {
        Config::window_charge(self.channel_window) + self.channel_send_buffer
    }

    /// What a receive window of `w` bytes takes from `peer_buffer_limit`, slack included.
    pub(crate) fn window_charge(w: u32) -> usize {
        let w = w as usize;
        w + w / 4
    }

    /// What `peer_buffer_limit` sets aside before any channel, with `links` transport
    /// connections: the retransmission queue, the control queue, spare buffers and, per link,
    /// a decoder's buffer (one frame plus one read of at most [`MAX_INPUT`] bytes) and one
    /// write batch of at most [`MAX_INPUT`] bytes being written.
    pub fn fixed_charge(&self, links: usize) -> usize {
        let frame = frame::wire_len(self.max_frame.min(frame::MAX_PAYLOAD_LIMIT) as usize);
        self.max_unacked
            + CONTROL_QUEUE_LIMIT
            // A pool buffer also holds the next frame's header (`BufferPool::capacity`).
            + frame::POOL_BYTES.max(frame::POOL_MIN_BUFFERS * (frame + frame::HEADER_LEN))
            + links.max(1) * (2 * frame + 2 * MAX_INPUT)
    }
}

/// Most bytes of control frames (OPEN_OK, CREDIT, RESET...) queued for the peer. Beyond it the
/// session takes no more input ([`Session::wants_input`]) until the peer reads: a peer that
/// opens channels in a loop and never reads the refusals cannot make the queue grow.
pub const CONTROL_QUEUE_LIMIT: usize = 64 * 1024;
/// Largest `data` a caller should pass to [`Session::handle_input`] at once, and largest batch
/// it should take from `poll_transmit`: both are counted in [`Config::fixed_charge`].
pub const MAX_INPUT: usize = 256 * 1024;

/// How the reason of a link the peer refused (a REFUSE frame) starts.
pub const REFUSED_BY_PEER: &str = "refused by the peer";
/// What a queued control frame costs beyond its wire bytes (queue entry, allocation).
const CONTROL_ENTRY_OVERHEAD: usize = 64;
/// Received payloads shorter than this are copied into a shared per-channel buffer, so that a
/// window's worth of one-byte frames takes a window's worth of memory, not 50 times as much.
const RX_SMALL: usize = 512;
/// Capacity of those shared buffers.
const RX_COALESCE: usize = 4096;

/// Settings of one link, chosen by the caller from what the transport is.
#[derive(Debug, Clone, Copy)]
pub struct LinkParams {
    /// Lower is preferred: the session sends on the up link with the lowest priority.
    pub priority: u32,
    /// Largest payload we put in a new frame on this link (small on slow lines so that a
    /// retransmission costs little).
    pub frame_size: u32,
    /// Most bytes sent and not yet acknowledged on this link.
    pub max_inflight: usize,
    /// Retransmission timeout: resend everything unacknowledged after this long without progress.
    pub rto: Duration,
    /// The transport delivers every byte once, in order and checked (a Unix or TCP socket,
    /// vsock): we offer to leave out the payload CRC on this link
    /// ([`crate::hello::caps::NO_PAYLOAD_CRC`]). Never for serial lines or virtio-serial
    /// ports, which lose bytes when a guest's driver resets.
    pub checksummed: bool,
}

impl LinkParams {
    /// A fast byte stream that may still lose or garble bytes (a virtio-serial port, a
    /// descriptor of unknown kind).
    pub fn stream(priority: u32) -> LinkParams {
        LinkParams {
            priority,
            frame_size: 64 * 1024,
            max_inflight: 8 * 1024 * 1024,
            rto: Duration::from_secs(2),
            checksummed: false,
        }
    }

    /// A fast stream whose transport checks integrity itself (Unix or TCP socket, vsock): as
    /// [`LinkParams::stream`], and the payload CRC is left out if the peer agrees.
    pub fn socket(priority: u32) -> LinkParams {
        LinkParams {
            checksummed: true,
            ..LinkParams::stream(priority)
        }
    }

    /// A serial line at `baud` bits per second: small frames, little in flight, patient timer.
    pub fn serial(priority: u32, baud: u32) -> LinkParams {
        let bytes_per_sec = (baud / 10).max(100);
        let inflight = (bytes_per_sec as usize).clamp(1024, 64 * 1024);
        LinkParams {
            priority,
            frame_size: 4096,
            max_inflight: inflight,
            // Time to drain the inflight window three times, at least one second.
            rto: Duration::from_millis(
                (3000 * inflight as u64 / u64::from(bytes_per_sec)).max(1000),
            ),
            checksummed: false,
        }
    }
}

/// Session counters. With the `serde` feature they serialize as `vstreamctl status` shows
/// them: the per-kind arrays as maps of the non-zero counts by kind name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct SessionStats {
    /// Sequenced frames sent for the first time.
    pub frames_sent: u64,
    /// Sequenced frames sent again.
    pub frames_retransmitted: u64,
    /// Sequenced frames accepted in order.
    pub frames_received: u64,
    /// Sequenced frames received twice (dropped).
    pub duplicates: u64,
    /// Sequenced frames received after a gap (dropped, retransmission requested).
    pub out_of_order: u64,
    /// Protocol violations.
    pub protocol_errors: u64,
    /// Protocol violations by kind (indexed like [`ErrorKind::ALL`]).
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "by_kind", deserialize_with = "from_kind")
    )]
    pub errors: [u64; ErrorKind::ALL.len()],
    /// Of those, the ones not reported as events (rate limit), by kind.
    #[cfg_attr(
        feature = "serde",
        serde(
            rename = "errors_not_logged",
            serialize_with = "by_kind",
            deserialize_with = "from_kind"
        )
    )]
    pub suppressed: [u64; ErrorKind::ALL.len()],
    /// Times the session was forgotten because no link came back within `resume_timeout`.
    pub expired: u64,
    /// Sequenced frames dropped unprocessed because the control queue was full.
    pub deferred: u64,
    /// Channels reset because of an error (either side).
    pub channel_resets: u64,
    /// Times the peer started a new session and our channels were dropped.
    pub session_restarts: u64,
    /// Retransmission timer expiries.
    pub timeouts: u64,
}

/// Non-zero counts by kind name.
#[cfg(feature = "serde")]
fn by_kind<S: serde::Serializer>(
    counts: &[u64; ErrorKind::ALL.len()],
    s: S,
) -> Result<S::Ok, S::Error> {
    let named: BTreeMap<&str, u64> = ErrorKind::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (k.name(), *n))
        .collect();
    s.collect_map(named)
}

/// The inverse of [`by_kind`]; names this version does not know are left out.
#[cfg(feature = "serde")]
fn from_kind<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<[u64; ErrorKind::ALL.len()], D::Error> {
    let named: BTreeMap<String, u64> = serde::Deserialize::deserialize(d)?;
    let mut counts = [0; ErrorKind::ALL.len()];
    for (name, n) in named {
        if let Some(i) = ErrorKind::ALL.iter().position(|k| k.name() == name) {
            counts[i] = n;
        }
    }
    Ok(counts)
}

/// Per-link counters. With the `serde` feature they serialize flat (the decoder's counters
/// beside the byte counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct LinkStats {
    /// Bytes received from the transport.
    pub bytes_in: u64,
    /// Bytes handed to the transport.
    pub bytes_out: u64,
    /// Decoder counters (frames, garbage, CRC errors, oversized).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub decode: frame::DecodeStats,
    /// Our own HELLOs that came back (the line echoes); not an error.
    pub echoed_hellos: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum LinkState {
    AwaitHello,
    Up,
    Dead,
}

#[derive(Debug)]
struct Link {
    params: LinkParams,
    decoder: Decoder,
    state: LinkState,
    /// Our random id for this link, and the peer's once heard.
    nonce: u32,
    peer_nonce: u32,
    /// Send our HELLO with the next transmit (first time, or the peer has not heard it).
    hello_due: bool,
    hello_at: Option<Instant>,
    frame_size: u32,
    since: Instant,
    last_rx: Instant,
    ping: Option<(u64, Instant)>,
    pong: Option<u64>,
    ack_due: bool,
    /// When a pending acknowledgement is sent on its own, if no frame carried it before;
    /// `None` with `ack_due`: now. Acknowledgements ride on every frame we send, so a receiver
    /// that answers with credit anyway needs no ACK frame of its own, and each one saved is a
    /// wake-up of the link's writer (an inter-processor interrupt when tasks spread over CPUs).
    ack_at: Option<Instant>,
    /// Bytes of sequenced frames received since we last acknowledged.
    ack_debt: usize,
    nack_due: bool,
    /// Header flags of the frames we send once up ([`frame::flags::NO_PCRC`] if negotiated).
    flags: u8,
    peer: String,
    stats: LinkStats,
}

#[derive(Debug)]
struct Sent {
    seq: u32,
    kind: Kind,
    channel: u32,
    payload: Bytes,
}

/// Spare buffers unused for about this long are freed (at the next timer event after it).
const POOL_TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Longest an acknowledgement waits for a frame to ride on: far below any retransmission
/// timeout ([`LinkParams::rto`], a second or more), so the peer never resends for it.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// How often a HELLO is repeated until the peer answers (bytes on a serial line can be lost).
const HELLO_RETRY: Duration = Duration::from_secs(1);

/// Serial-number comparison (RFC 1982) for wrapping 32-bit sequence numbers.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The multiplexer state machine. See the module documentation.
#[derive(Debug)]
pub struct Session {
    cfg: Config,
    my_session: u64,
    peer_session: u64,
    peer_name: Option<String>,
    links: BTreeMap<LinkId, Link>,
    next_link: u32,
    active: Option<LinkId>,

    send_next: u32,
    unacked: VecDeque<Sent>,
    unacked_bytes: usize,
    /// Index into `unacked` of the next frame to (re)send on the active link.
    resend: usize,
    inflight: usize,
    last_progress: Instant,
    backoff: u32,
    control: VecDeque<(Kind, u32, Bytes)>,
    /// What `control` holds, counted as in [`Session::held_bytes`].
    control_bytes: usize,

    recv_next: u32,
    nack_at: Option<Instant>,

    channels: BTreeMap<ChannelId, Channel>,
    next_channel: ChannelId,
    peer_next_channel: ChannelId,
    /// Sum of the channels' [`Config::channel_charge`].
    charged: usize,
    rr_cursor: ChannelId,
    ping_nonce: u64,

    events: VecDeque<Event>,
    stats: SessionStats,
    /// Frame-sized buffers for received payloads and send queues, reused.
    pool: BufferPool,
    /// When the pool last freed the buffers it did not need.
    pool_trimmed: Instant,
    /// Which protocol errors are reported as events.
    reports: ReportLimit<ErrorKind>,
    /// The latest time the caller gave us.
    now: Instant,
    /// Since when no link has been up (None while one is).
    alone_since: Option<Instant>,
}

impl Session {
    /// A new session. `session_id` must be random and non-zero (it tells a resumed session from
    /// a restarted peer); `now` is the caller's clock.
    pub fn new(cfg: Config, session_id: u64, now: Instant) -> Session {
        let first_channel = match cfg.role {
            Role::Host => 2,
            Role::Guest => 1,
        };
        let peer_first = 3 - first_channel;
        Session {
            my_session: session_id.max(1),
            peer_session: 0,
            peer_name: None,
            links: BTreeMap::new(),
            next_link: 0,
            active: None,
            send_next: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            resend: 0,
            inflight: 0,
            last_progress: now,
            backoff: 1,
            control: VecDeque::new(),
            control_bytes: 0,
            recv_next: 0,
            nack_at: None,
            channels: BTreeMap::new(),
            next_channel: first_channel,
            peer_next_channel: peer_first,
            charged: 0,
            rr_cursor: 0,
            ping_nonce: session_id,
            events: VecDeque::new(),
            stats: SessionStats::default(),
            pool: BufferPool::new(cfg.max_frame as usize),
            pool_trimmed: now,
            reports: ReportLimit::default(),
            now,
            alone_since: Some(now),
            cfg,
        }
    }

    /// Bytes this session holds because of the peer: received and unread, queued to send,
    /// sent and unacknowledged, queued control frames, decoder buffers and spare buffers.
    /// Never more than `peer_buffer_limit` (a property the tests check).
    pub fn held_bytes(&self) -> usize {
        let channels: usize = self
            .channels
            .values()
            .map(|ch| {
                let rx: usize = ch.rx.iter().map(Bytes::len).sum();
                rx + ch.rx_tail.capacity() + ch.send_buf.len()
            })
            .sum();
        let decoders: usize = self.links.values().map(|l| l.decoder.buffered()).sum();
        channels + self.unacked_bytes + self.control_bytes + decoders + self.pool.held()
    }

    /// Whether the caller should read more input now. False while the control queue is over
    /// [`CONTROL_QUEUE_LIMIT`] and could be sent: then only the peer reading it can help, so
    /// the caller stops reading until it has sent some (a guest that does not read is not
    /// read from), and then calls [`Session::handle_input`] (with no data if need be) to
    /// decode what was left undecoded. While the queue cannot be sent (unacknowledged data at
    /// its limit), input is wanted, for the acknowledgements in it; sequenced frames in it are
    /// then dropped unprocessed (the peer retransmits them), so that nothing more is queued.
    pub fn wants_input(&self) -> bool {
        self.control_bytes < CONTROL_QUEUE_LIMIT || !self.control_can_drain()
    }

    fn control_can_drain(&self) -> bool {
        self.active
            .and_then(|a| self.links.get(&a))
            .is_some_and(|l| self.inflight < l.params.max_inflight)
            && self.unacked_bytes < self.cfg.max_unacked
    }

    /// Changes each time the session's channels are all dropped (the peer restarted, or the
    /// session expired): a channel id from before names another channel now.
    pub fn epoch(&self) -> u64 {
        self.stats.session_restarts + self.stats.expired
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The peer's name once a handshake completed.
    pub fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Whether at least one link is up.
    pub fn is_connected(&self) -> bool {
        self.active.is_some()
    }

    /// The link data is sent on.
    pub fn active_link(&self) -> Option<LinkId> {
        self.active
    }

    /// Counters of one link.
    pub fn link_stats(&self, link: LinkId) -> Option<LinkStats> {
        self.links.get(&link).map(|l| LinkStats {
            decode: l.decoder.stats(),
            ..l.stats
        })
    }

    /// Whether frames on `link` leave out the payload CRC (both sides offered it; §3).
    pub fn link_skips_payload_crc(&self, link: LinkId) -> bool {
        self.links
            .get(&link)
            .is_some_and(|l| l.flags & frame::flags::NO_PCRC != 0)
    }

    /// Whether the link completed its handshake and is alive.
    pub fn link_is_up(&self, link: LinkId) -> bool {
        self.links
            .get(&link)
            .is_some_and(|l| l.state == LinkState::Up)
    }

    /// Adds a transport connection. The HELLO goes out with the next `poll_transmit`.
    pub fn add_link(&mut self, params: LinkParams, now: Instant) -> LinkId {
        let id = LinkId(self.next_link);
        self.next_link = self.next_link.wrapping_add(1);
        self.links.insert(
            id,
            Link {
                params,
                decoder: Decoder::new(self.cfg.max_frame),
                state: LinkState::AwaitHello,
                nonce: link_nonce(self.my_session, id.0),
                peer_nonce: 0,
                hello_due: true,
                hello_at: None,
                frame_size: params.frame_size.min(self.cfg.max_frame),
                since: now,
                last_rx: now,
                ping: None,
                pong: None,
                ack_due: false,
                ack_at: None,
                ack_debt: 0,
                nack_due: false,
                flags: 0,
                peer: String::new(),
                stats: LinkStats::default(),
            },
        );
        id
    }

    /// Forgets a link whose transport is gone. Unacknowledged data stays queued for the next link.
    pub fn remove_link(&mut self, link: LinkId) {
        self.links.remove(&link);
        self.choose_active();
    }

    fn kill_link(&mut self, link: LinkId, reason: String) {
        if let Some(l) = self.links.get_mut(&link) {
            if l.state != LinkState::Dead {
                l.state = LinkState::Dead;
                self.events.push_back(Event::LinkDown { link, reason });
            }
        }
        self.choose_active();
    }

    fn choose_active(&mut self) {
        let best = self
            .links
            .iter()
            .filter(|(_, l)| l.state == LinkState::Up)
            .min_by_key(|(id, l)| (l.params.priority, **id))
            .map(|(id, _)| *id);
        if best.is_none() {
            self.alone_since.get_or_insert(self.now);
        } else {
            self.alone_since = None;
        }
        if best != self.active {
            self.active = best;
            // The new link never carried what the old one had in flight: resend it all.
            self.resend = 0;
            self.inflight = 0;
        }
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// A well-mixed, non-zero link id derived from the session id (splitmix64 finaliser).
fn link_nonce(session: u64, link: u32) -> u32 {
    let mut z = session.wrapping_add(u64::from(link).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32 | 1
}
