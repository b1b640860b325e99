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

use crate::frame::{self, BufferPool, DecodeError, Decoder, Frame, Kind, Sink, Transmit};
use crate::hello::{caps, Hello, Role, VERSION};
use crate::limit::ReportLimit;

mod snapshot;
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
    /// Receive window of each channel: bytes the peer may send before we grant more.
    pub channel_window: u32,
    /// Bytes an application may queue on one channel before `send` accepts no more.
    pub channel_send_buffer: usize,
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
        let w = self.channel_window as usize;
        w + w / 4 + self.channel_send_buffer
    }

    /// What `peer_buffer_limit` sets aside before any channel, with `links` transport
    /// connections: the retransmission queue, the control queue, spare buffers and, per link,
    /// a decoder's buffer (one frame plus one read of at most [`MAX_INPUT`] bytes) and one
    /// write batch of at most [`MAX_INPUT`] bytes being written.
    pub fn fixed_charge(&self, links: usize) -> usize {
        let frame = frame::wire_len(self.max_frame.min(frame::MAX_PAYLOAD_LIMIT) as usize);
        self.max_unacked
            + CONTROL_QUEUE_LIMIT
            + frame::POOL_BYTES.max(frame::POOL_MIN_BUFFERS * frame)
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

/// Why a channel was reset, as carried in RESET frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ResetCode {
    /// No service for this class/name, or the application refused it.
    Refused = 1,
    /// The peer sent more than its credit.
    FlowControl = 2,
    /// The peer broke the protocol on this channel (bad frame, unknown channel...).
    Protocol = 3,
    /// A configured limit was reached (channels, buffer).
    Resource = 4,
    /// The session was replaced by a new one (the peer restarted).
    SessionLost = 5,
    /// The application aborted the channel.
    Aborted = 6,
}

impl ResetCode {
    fn from_u16(v: u16) -> ResetCode {
        match v {
            1 => ResetCode::Refused,
            2 => ResetCode::FlowControl,
            3 => ResetCode::Protocol,
            4 => ResetCode::Resource,
            5 => ResetCode::SessionLost,
            _ => ResetCode::Aborted,
        }
    }
}

/// Kinds of protocol violation, counted and rate-limited separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// Bytes that were not frames.
    Garbage,
    /// A header that failed its CRC.
    BadHeader,
    /// A payload that failed its CRC.
    BadPayload,
    /// A frame above the size limit.
    Oversized,
    /// A bad HELLO.
    Hello,
    /// A frame for a channel that never existed.
    UnknownChannel,
    /// DATA beyond credit.
    CreditExceeded,
    /// A malformed or out-of-place frame.
    BadFrame,
    /// An acknowledgement of something never sent.
    BadAck,
}

impl ErrorKind {
    /// Every kind, in the order of [`SessionStats::errors`].
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Garbage,
        ErrorKind::BadHeader,
        ErrorKind::BadPayload,
        ErrorKind::Oversized,
        ErrorKind::Hello,
        ErrorKind::UnknownChannel,
        ErrorKind::CreditExceeded,
        ErrorKind::BadFrame,
        ErrorKind::BadAck,
    ];

    /// The name in status displays and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Garbage => "garbage",
            ErrorKind::BadHeader => "bad-header",
            ErrorKind::BadPayload => "bad-payload",
            ErrorKind::Oversized => "oversized",
            ErrorKind::Hello => "bad-hello",
            ErrorKind::UnknownChannel => "unknown-channel",
            ErrorKind::CreditExceeded => "credit-exceeded",
            ErrorKind::BadFrame => "bad-frame",
            ErrorKind::BadAck => "bad-ack",
        }
    }
}

/// A protocol violation, reported as an event; the session carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The decoder threw bytes away.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A HELLO that cannot be accepted.
    #[error("bad HELLO: {0}")]
    Hello(String),
    /// A frame for a channel that never existed.
    #[error("frame {kind:#04x} for unknown channel {channel}")]
    UnknownChannel {
        /// Kind byte.
        kind: u8,
        /// Channel id.
        channel: u32,
    },
    /// More data than the credit granted.
    #[error("channel {channel}: peer sent {sent} bytes beyond its credit of {credit}")]
    CreditExceeded {
        /// Channel id.
        channel: u32,
        /// Bytes received in total (including this frame).
        sent: u64,
        /// Bytes granted in total.
        credit: u64,
    },
    /// A malformed or out-of-place session frame.
    #[error("channel {channel}: {what}")]
    BadFrame {
        /// Channel id.
        channel: u32,
        /// What was wrong.
        what: String,
    },
    /// An acknowledgement of something never sent.
    #[error("peer acknowledged sequence {ack}, but only {sent} was sent")]
    BadAck {
        /// The ack value.
        ack: u32,
        /// Our next sequence number.
        sent: u32,
    },
}

impl ProtocolError {
    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::Decode(DecodeError::Garbage(_)) => ErrorKind::Garbage,
            ProtocolError::Decode(DecodeError::BadHeader) => ErrorKind::BadHeader,
            ProtocolError::Decode(DecodeError::BadPayload { .. }) => ErrorKind::BadPayload,
            ProtocolError::Decode(DecodeError::Oversized { .. }) => ErrorKind::Oversized,
            ProtocolError::Hello(_) => ErrorKind::Hello,
            ProtocolError::UnknownChannel { .. } => ErrorKind::UnknownChannel,
            ProtocolError::CreditExceeded { .. } => ErrorKind::CreditExceeded,
            ProtocolError::BadFrame { .. } => ErrorKind::BadFrame,
            ProtocolError::BadAck { .. } => ErrorKind::BadAck,
        }
    }
}

/// What happened; drained with [`Session::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A link finished its handshake.
    LinkUp {
        /// The link.
        link: LinkId,
        /// The peer's name.
        peer: String,
        /// Whether the existing session continued (else a new session started).
        resumed: bool,
    },
    /// A link must be closed by the caller (timeout, bad handshake, superseded).
    LinkDown {
        /// The link.
        link: LinkId,
        /// Why.
        reason: String,
    },
    /// The peer opened a channel.
    ChannelOpened {
        /// Channel id.
        id: ChannelId,
        /// Device class ("console", "qga", ...).
        class: String,
        /// Name within the class.
        name: String,
    },
    /// A channel we opened was accepted.
    ChannelReady(ChannelId),
    /// Data (or end of data) is ready to `recv`.
    Readable(ChannelId),
    /// `send` can accept more.
    Writable(ChannelId),
    /// The channel is finished: both directions closed and all data read.
    ChannelClosed(ChannelId),
    /// The channel was aborted (by the peer or by us because of an error).
    ChannelReset {
        /// Channel id.
        id: ChannelId,
        /// Reason code.
        code: ResetCode,
        /// Human-readable reason.
        reason: String,
    },
    /// The peer broke the protocol; counted, logged by the caller, the session carries on.
    /// At most [`crate::limit::REPORTS_PER_INTERVAL`] of a kind per second are reported;
    /// the rest are counted and reported as [`Event::ErrorsSuppressed`].
    ProtocolError {
        /// Link it came from, if any.
        link: Option<LinkId>,
        /// The violation.
        error: ProtocolError,
    },
    /// This many violations of one kind were counted but not reported as events.
    ErrorsSuppressed {
        /// Their kind.
        kind: ErrorKind,
        /// How many.
        count: u64,
    },
}

/// Errors returned to the local application.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// No such channel (never opened, or already closed or reset).
    #[error("channel {0} does not exist")]
    Unknown(ChannelId),
    /// `send` after `close`.
    #[error("channel {0} is closed for sending")]
    Closed(ChannelId),
    /// A configured limit forbids another channel.
    #[error("cannot open channel: {0}")]
    Limit(&'static str),
    /// Class or name too long.
    #[error("channel class or name too long (max 255 bytes each)")]
    NameTooLong,
}

/// Result of [`Session::recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing buffered yet.
    WouldBlock,
    /// The peer closed its direction and everything was read.
    Eof,
}

/// Per-channel facts for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Channel id.
    pub id: ChannelId,
    /// Device class.
    pub class: String,
    /// Name.
    pub name: String,
    /// Whether we opened it.
    pub local: bool,
    /// Bytes received from the peer.
    pub bytes_in: u64,
    /// Bytes sent to the peer.
    pub bytes_out: u64,
    /// Bytes received and not yet read by the application.
    pub rx_buffered: usize,
    /// Bytes queued by the application and not yet sent.
    pub tx_buffered: usize,
}

/// Session counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    pub errors: [u64; ErrorKind::ALL.len()],
    /// Of those, the ones not reported as events (rate limit), by kind.
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

/// Per-link counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes received from the transport.
    pub bytes_in: u64,
    /// Bytes handed to the transport.
    pub bytes_out: u64,
    /// Decoder counters (frames, garbage, CRC errors, oversized).
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

#[derive(Debug)]
struct Channel {
    class: String,
    name: String,
    local: bool,
    /// Our OPEN is not yet answered.
    opening: bool,
    /// (Peer-opened channels) our application accepted it and OPEN_OK is queued or sent.
    accepted: bool,
    send_buf: SendQueue,
    credit: u64,
    fin_queued: bool,
    fin_sent: bool,
    rx: VecDeque<Bytes>,
    /// Small payloads received after those in `rx`, coalesced (see [`RX_SMALL`]).
    rx_tail: BytesMut,
    rx_len: usize,
    rx_received: u64,
    rx_granted: u64,
    rx_unreported: u32,
    remote_fin: bool,
    eof_read: bool,
    bytes_in: u64,
    bytes_out: u64,
}

impl Channel {
    fn new(class: String, name: String, local: bool, window: u32) -> Channel {
        Channel {
            class,
            name,
            local,
            opening: local,
            accepted: false,
            send_buf: SendQueue::default(),
            credit: 0,
            fin_queued: false,
            fin_sent: false,
            rx: VecDeque::new(),
            rx_tail: BytesMut::new(),
            rx_len: 0,
            rx_received: 0,
            rx_granted: u64::from(window),
            rx_unreported: 0,
            remote_fin: false,
            eof_read: false,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Both ends agreed the channel exists.
    fn can_send(&self) -> bool {
        !self.opening && (self.local || self.accepted)
    }

    fn finished(&self) -> bool {
        self.fin_sent && self.eof_read
    }
}

/// Smallest chunk a [`SendQueue`] allocates (unless frames are smaller still).
const MIN_SEND_CHUNK: usize = 4096;

/// Bytes an application queued on a channel, in chunks that are never reallocated.
///
/// A frame's payload is a zero-copy view into its chunk, kept until acknowledged. With one
/// growing buffer (as before), those views pinned the buffer, so appending moved it to a fresh
/// allocation (copying what was queued and page-faulting new memory) about every window; the
/// profile of a 64 KiB bulk transfer showed a fifth of all CPU time there. Chunks are only ever
/// appended to within their capacity, and frames never span two chunks, so neither happens.
#[derive(Debug, Default)]
struct SendQueue {
    chunks: VecDeque<BytesMut>,
    len: usize,
    /// Capacity of the last chunk allocated: chunks double up to the frame size, so that an
    /// idle console holds little memory and a bulk channel fills whole frames.
    chunk: usize,
}

impl SendQueue {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`. Chunks need be no larger than a frame payload, the pool's buffer size.
    fn push(&mut self, mut data: &[u8], pool: &mut BufferPool) {
        let max = pool.size();
        self.len += data.len();
        while !data.is_empty() {
            let room = self.chunks.back().map_or(0, |c| c.capacity() - c.len());
            if room == 0 {
                self.chunk = (self.chunk * 2)
                    .max(data.len().min(max))
                    .clamp(MIN_SEND_CHUNK.min(max), max);
                self.chunks.push_back(if self.chunk == max {
                    pool.take()
                } else {
                    BytesMut::with_capacity(self.chunk)
                });
                continue;
            }
            let Some(tail) = self.chunks.back_mut() else {
                break;
            };
            let k = room.min(data.len());
            // Within the capacity: never reallocates, even while frames share the chunk.
            tail.extend_from_slice(&data[..k]);
            data = &data[k..];
        }
    }

    /// Up to `n` (> 0) queued bytes, without copying. A frame stops at the end of a chunk, so
    /// frame boundaries may differ from the old single buffer; the byte stream does not.
    fn take(&mut self, n: usize) -> Bytes {
        let Some(front) = self.chunks.front_mut() else {
            return Bytes::new();
        };
        let k = n.min(front.len());
        let payload = front.split_to(k).freeze();
        if front.is_empty() && (front.capacity() == 0 || self.chunks.len() > 1) {
            self.chunks.pop_front();
        }
        self.len -= k;
        payload
    }
}

/// Spare buffers unused for about this long are freed (at the next timer event after it).
const POOL_TRIM_INTERVAL: Duration = Duration::from_secs(1);

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

    // ---- receiving ------------------------------------------------------------------------

    /// Feeds bytes received on `link`.
    pub fn handle_input(&mut self, link: LinkId, data: &[u8], now: Instant) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.state == LinkState::Dead {
            return;
        }
        l.stats.bytes_in += data.len() as u64;
        self.now = now;
        // `next_from` decodes the same frames as `push` + `next` with fewer copies.
        let mut input = data;
        loop {
            let pause = self.control_bytes >= CONTROL_QUEUE_LIMIT && self.control_can_drain();
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            if l.state == LinkState::Dead {
                return;
            }
            if pause {
                // The rest waits until the peer reads our replies: kept, undecoded, in the
                // decoder (one read), and decoded by the next call, even with no new input.
                l.decoder.push(input);
                return;
            }
            let Some(item) = l.decoder.next_from(&mut input, &mut self.pool) else {
                break;
            };
            match item {
                Ok(frame) => {
                    l.last_rx = now;
                    self.handle_frame(link, frame, now);
                }
                Err(DecodeError::Oversized { header, len, limit }) => {
                    l.last_rx = now;
                    self.handle_oversized(link, header, len, limit);
                }
                Err(DecodeError::Garbage(_)) => {
                    // Garbage before the first HELLO is normal on a console-like line (a
                    // getty prompt, boot noise); counted in the decoder stats, not an event.
                    if l.state == LinkState::Up {
                        self.protocol_error(Some(link), DecodeError::Garbage(0).into());
                    }
                }
                Err(e) => self.protocol_error(Some(link), e.into()),
            }
        }
    }

    fn protocol_error(&mut self, link: Option<LinkId>, error: ProtocolError) {
        // Garbage is reported once per run of skipped bytes with its size in the decoder stats.
        let kind = error.kind();
        self.stats.protocol_errors += 1;
        self.stats.errors[kind as usize] += 1;
        let (report, suppressed) = self.reports.check(kind, self.now);
        if suppressed > 0 {
            self.events.push_back(Event::ErrorsSuppressed {
                kind,
                count: suppressed,
            });
        }
        if report {
            self.events.push_back(Event::ProtocolError { link, error });
        } else {
            self.stats.suppressed[kind as usize] += 1;
        }
    }

    fn handle_oversized(&mut self, link: LinkId, header: frame::Header, len: u32, limit: u32) {
        self.protocol_error(
            Some(link),
            DecodeError::Oversized { header, len, limit }.into(),
        );
        // The header was genuine: if it was the next sequenced frame, consume its number and
        // reset its channel, so the peer's retransmissions do not loop on it.
        if Kind::is_sequenced(header.kind) && header.seq == self.recv_next && self.link_is_up(link)
        {
            self.recv_next = self.recv_next.wrapping_add(1);
            self.mark_ack_due(link);
            self.reset_with_error(
                header.channel,
                ResetCode::Protocol,
                format!("frame of {len} bytes exceeds the limit of {limit}"),
            );
        }
    }

    fn mark_ack_due(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(&link) {
            l.ack_due = true;
        }
    }

    fn handle_frame(&mut self, link: LinkId, frame: Frame, now: Instant) {
        let h = frame.header;
        let up = self.link_is_up(link);
        if h.kind == Kind::Hello as u8 {
            match Hello::decode(&frame.payload) {
                Ok(hello) => self.handle_hello(link, hello, now),
                Err(e) => {
                    self.protocol_error(Some(link), ProtocolError::Hello(e.to_string()));
                    self.kill_link(link, format!("bad HELLO: {e}"));
                }
            }
            return;
        }
        if h.kind == Kind::Refuse as u8 {
            // Valid before the handshake too: it is how a peer says why it will not have us.
            let reason = String::from_utf8_lossy(&frame.payload[..frame.payload.len().min(256)]);
            self.kill_link(link, format!("{REFUSED_BY_PEER}: {reason}"));
            return;
        }
        if !up {
            return; // Nothing counts before the handshake (stale bytes from a previous peer).
        }
        self.handle_ack(h.ack, now);
        match Kind::from_u8(h.kind) {
            Some(Kind::Ping) => {
                if let (Some(l), Ok(nonce)) = (
                    self.links.get_mut(&link),
                    <[u8; 8]>::try_from(&frame.payload[..]),
                ) {
                    l.pong = Some(u64::from_le_bytes(nonce));
                }
            }
            Some(Kind::Pong) => {
                if let Some(l) = self.links.get_mut(&link) {
                    l.ping = None;
                }
            }
            Some(Kind::Ack) | Some(Kind::Hello) | Some(Kind::Refuse) => {}
            Some(Kind::Nack) => self.handle_nack(h.ack),
            _ if Kind::is_sequenced(h.kind) && self.control_bytes >= CONTROL_QUEUE_LIMIT => {
                // Its answer could not be queued: not processed, not acknowledged.
                self.stats.deferred += 1;
            }
            _ if Kind::is_sequenced(h.kind) => self.handle_sequenced(link, frame, now),
            _ => {} // Unknown link frame kinds are ignored (forward compatibility).
        }
    }

    fn handle_hello(&mut self, link: LinkId, hello: Hello, now: Instant) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if hello.my_session == self.my_session && hello.link == l.nonce {
            // Our own HELLO came back: the line echoes (a guest tty not yet in raw mode).
            // Ignore it; the real peer's HELLO follows once its end is set up.
            l.stats.echoed_hellos += 1;
            return;
        }
        if hello.echo != l.nonce {
            l.hello_due = true; // The peer has not heard our HELLO yet.
        }
        if l.state == LinkState::Up && hello.link == l.peer_nonce {
            return; // A retransmitted HELLO of a handshake already done.
        }
        // Either the first HELLO on this link, or the peer restarted its end of the byte
        // stream (a serial line never "disconnects"): handshake again.
        let restarted_end = l.state == LinkState::Up;
        l.state = LinkState::AwaitHello;
        l.peer_nonce = hello.link;
        if hello.version != VERSION {
            let reason = format!(
                "peer speaks protocol version {}, we speak {VERSION}",
                hello.version
            );
            self.protocol_error(Some(link), ProtocolError::Hello(reason.clone()));
            self.kill_link(link, reason);
            return;
        }
        if hello.role == self.cfg.role {
            let reason = format!("peer has our own role {:?}", hello.role);
            self.protocol_error(Some(link), ProtocolError::Hello(reason.clone()));
            self.kill_link(link, reason);
            return;
        }
        // The same peer incarnation (same session id) never lost its state, whatever its HELLO
        // says of ours: a HELLO sent on a slow line before that peer learned our id (on another
        // link) arrives with `your_session` 0 after the session is established, and must not
        // be taken for a restart. A restarted peer always comes with a new id.
        let resumed = self.peer_session != 0
            && hello.my_session == self.peer_session
            && hello.caps & caps::RESUME != 0;
        if !resumed && self.peer_session != 0 {
            self.restart(link);
        }
        if resumed {
            self.handle_ack(hello.recv_next, now);
        }
        self.peer_session = hello.my_session;
        self.peer_name = Some(hello.name.clone());
        if let Some(l) = self.links.get_mut(&link) {
            l.state = LinkState::Up;
            l.frame_size = l.frame_size.min(hello.max_frame).max(1);
            // Both sides decide alike: each offered it from its own transport's kind. Our HELLO
            // precedes our first flagged frame on this byte stream, so the peer has decided too.
            let no_pcrc = l.params.checksummed && hello.caps & caps::NO_PAYLOAD_CRC != 0;
            l.decoder.set_no_pcrc(no_pcrc);
            l.flags = if no_pcrc { frame::flags::NO_PCRC } else { 0 };
            l.peer = hello.name.clone();
            l.ack_due = true;
        }
        self.events.push_back(Event::LinkUp {
            link,
            peer: hello.name,
            resumed,
        });
        self.choose_active();
        if restarted_end && self.active == Some(link) {
            // What was in flight on the old incarnation of this link is lost.
            self.resend = 0;
            self.inflight = 0;
        }
    }

    /// The peer started a new session: everything of the old one is gone.
    fn restart(&mut self, keep: LinkId) {
        self.stats.session_restarts += 1;
        self.drop_state("the peer restarted; the session was replaced");
        let others: Vec<LinkId> = self.links.keys().copied().filter(|l| *l != keep).collect();
        for other in others {
            self.kill_link(other, "superseded by a new peer session".into());
        }
    }

    /// No link came back within `resume_timeout`: free everything the peer made us hold. We
    /// take a new session id, so that a peer coming back sees a restart and does not resume.
    fn expire(&mut self) {
        self.stats.expired += 1;
        self.drop_state("the peer went away; the session expired");
        self.my_session = link_nonce(self.my_session, self.next_link) as u64
            | (u64::from(link_nonce(self.my_session, !self.next_link)) << 32);
        self.peer_session = 0;
        self.alone_since = None;
        self.pool.trim();
        self.pool.trim();
    }

    fn drop_state(&mut self, reason: &str) {
        let ids: Vec<ChannelId> = self.channels.keys().copied().collect();
        for id in ids {
            self.events.push_back(Event::ChannelReset {
                id,
                code: ResetCode::SessionLost,
                reason: reason.into(),
            });
        }
        self.channels.clear();
        self.charged = 0;
        self.control.clear();
        self.control_bytes = 0;
        self.unacked.clear();
        self.unacked_bytes = 0;
        self.resend = 0;
        self.inflight = 0;
        self.send_next = 0;
        self.recv_next = 0;
        self.nack_at = None;
        self.peer_next_channel = match self.cfg.role {
            Role::Host => 1,
            Role::Guest => 2,
        };
    }

    /// Whether a peer that was there made us hold anything. (Before any peer came, what the
    /// application queued waits for the first one, however long.)
    fn holds_state(&self) -> bool {
        self.peer_session != 0
            && (!self.channels.is_empty() || !self.unacked.is_empty() || !self.control.is_empty())
    }

    fn handle_ack(&mut self, ack: u32, now: Instant) {
        if seq_lt(self.send_next, ack) {
            let sent = self.send_next;
            self.protocol_error(None, ProtocolError::BadAck { ack, sent });
            return;
        }
        let mut progressed = false;
        while let Some(front) = self.unacked.front() {
            if !seq_lt(front.seq, ack) {
                break;
            }
            let len = frame::wire_len(front.payload.len());
            self.unacked_bytes -= len;
            if self.resend > 0 {
                self.resend -= 1;
                self.inflight = self.inflight.saturating_sub(len);
            }
            if let Some(sent) = self.unacked.pop_front() {
                self.pool.recycle(sent.payload);
            }
            progressed = true;
        }
        if progressed {
            self.last_progress = now;
            self.backoff = 1;
        }
    }

    fn handle_nack(&mut self, from: u32) {
        // Rewind to `from` if it is still held and we already sent past it.
        let Some(front) = self.unacked.front() else {
            return;
        };
        let idx = from.wrapping_sub(front.seq) as usize;
        if idx < self.resend {
            self.inflight = self
                .unacked
                .iter()
                .take(idx)
                .map(|s| frame::wire_len(s.payload.len()))
                .sum();
            self.resend = idx;
        }
    }

    fn handle_sequenced(&mut self, link: LinkId, frame: Frame, now: Instant) {
        let seq = frame.header.seq;
        self.mark_ack_due(link);
        if seq != self.recv_next {
            if seq_lt(seq, self.recv_next) {
                self.stats.duplicates += 1;
            } else {
                self.stats.out_of_order += 1;
                // Ask for a retransmission, at most once per round-trip-ish interval.
                let rto = self
                    .links
                    .get(&link)
                    .map_or(Duration::from_secs(1), |l| l.params.rto);
                if self
                    .nack_at
                    .is_none_or(|t| now.duration_since(t) >= rto / 2)
                {
                    self.nack_at = Some(now);
                    if let Some(l) = self.links.get_mut(&link) {
                        l.nack_due = true;
                    }
                }
            }
            return;
        }
        self.recv_next = self.recv_next.wrapping_add(1);
        self.nack_at = None;
        self.stats.frames_received += 1;
        let ch = frame.header.channel;
        match Kind::from_u8(frame.header.kind) {
            Some(Kind::Open) => self.on_open(ch, &frame.payload),
            Some(Kind::OpenOk) => self.on_open_ok(ch, &frame.payload),
            Some(Kind::Data) => self.on_data(ch, frame.payload),
            Some(Kind::Credit) => self.on_credit(ch, &frame.payload),
            Some(Kind::Close) => self.on_close(ch),
            Some(Kind::Reset) => self.on_reset(ch, &frame.payload),
            _ => self.protocol_error(
                Some(link),
                ProtocolError::BadFrame {
                    channel: ch,
                    what: format!("unknown frame kind {:#04x}", frame.header.kind),
                },
            ),
        }
    }

    fn is_peer_id(&self, id: ChannelId) -> bool {
        id % 2 == self.peer_next_channel % 2
    }

    /// Whether `id` belonged to a channel that existed earlier in this session.
    fn was_known(&self, id: ChannelId) -> bool {
        if self.is_peer_id(id) {
            id < self.peer_next_channel
        } else {
            id < self.next_channel
        }
    }

    /// A frame for a channel we do not have: late frames for a channel that was reset are
    /// dropped quietly; frames for a channel that never existed are an error answered by RESET.
    fn unknown_channel(&mut self, kind: Kind, id: ChannelId) {
        if self.was_known(id) || id == 0 {
            return;
        }
        self.protocol_error(
            None,
            ProtocolError::UnknownChannel {
                kind: kind as u8,
                channel: id,
            },
        );
        if kind != Kind::Reset {
            self.queue_reset(id, ResetCode::Protocol, "no such channel");
        }
    }

    fn on_open(&mut self, id: ChannelId, p: &Bytes) {
        let parsed = parse_open(p);
        let bad = |what: &str| ProtocolError::BadFrame {
            channel: id,
            what: what.to_owned(),
        };
        let Some((class, name, window)) = parsed else {
            self.protocol_error(None, bad("malformed OPEN"));
            self.queue_reset(id, ResetCode::Protocol, "malformed OPEN");
            return;
        };
        if !self.is_peer_id(id) || id < self.peer_next_channel {
            self.protocol_error(None, bad("OPEN with an id the peer may not use now"));
            self.queue_reset(
                id,
                ResetCode::Protocol,
                "channel id out of order or wrong parity",
            );
            return;
        }
        self.peer_next_channel = id.saturating_add(2);
        if let Err(e) = self.reserve_window() {
            self.queue_reset(id, ResetCode::Resource, e);
            self.events.push_back(Event::ChannelReset {
                id,
                code: ResetCode::Resource,
                reason: format!("refused {class}/{name}: {e}"),
            });
            return;
        }
        let mut ch = Channel::new(class.clone(), name.clone(), false, self.cfg.channel_window);
        ch.credit = u64::from(window);
        self.channels.insert(id, ch);
        // OPEN_OK waits for the application's `accept`, so that a service that refuses the
        // channel answers with a RESET the opener sees as a failed open, with its reason.
        self.events
            .push_back(Event::ChannelOpened { id, class, name });
    }

    fn reserve_window(&mut self) -> Result<(), &'static str> {
        if self.channels.len() >= self.cfg.max_channels {
            return Err("too many channels");
        }
        let fixed = self.cfg.fixed_charge(self.links.len());
        let charge = self.cfg.channel_charge();
        if fixed + self.charged + charge > self.cfg.peer_buffer_limit {
            return Err("peer buffer limit reached");
        }
        self.charged += charge;
        Ok(())
    }

    fn on_open_ok(&mut self, id: ChannelId, p: &Bytes) {
        let window = <[u8; 4]>::try_from(&p[..]).map(u32::from_le_bytes);
        match (self.channels.get_mut(&id), window) {
            (Some(ch), Ok(w)) if ch.opening => {
                ch.opening = false;
                ch.credit = u64::from(w);
                self.events.push_back(Event::ChannelReady(id));
                self.events.push_back(Event::Writable(id));
            }
            (Some(_), _) => {
                self.reset_with_error(id, ResetCode::Protocol, "unexpected OPEN_OK".into())
            }
            (None, _) => self.unknown_channel(Kind::OpenOk, id),
        }
    }

    fn on_data(&mut self, id: ChannelId, payload: Bytes) {
        let Some(ch) = self.channels.get_mut(&id) else {
            self.unknown_channel(Kind::Data, id);
            return;
        };
        let len = payload.len() as u64;
        if ch.remote_fin {
            self.reset_with_error(id, ResetCode::Protocol, "DATA after CLOSE".into());
            return;
        }
        if ch.rx_received + len > ch.rx_granted {
            let (sent, credit) = (ch.rx_received + len, ch.rx_granted);
            self.protocol_error(
                None,
                ProtocolError::CreditExceeded {
                    channel: id,
                    sent,
                    credit,
                },
            );
            self.reset_with_error(
                id,
                ResetCode::FlowControl,
                format!("{sent} bytes sent against a credit of {credit}"),
            );
            return;
        }
        ch.rx_received += len;
        ch.bytes_in += len;
        if payload.is_empty() {
            return;
        }
        let was_empty = ch.rx_len == 0;
        ch.rx_len += payload.len();
        if payload.len() < RX_SMALL {
            if ch.rx_tail.capacity() - ch.rx_tail.len() < payload.len() {
                if !ch.rx_tail.is_empty() {
                    ch.rx.push_back(ch.rx_tail.split().freeze());
                }
                ch.rx_tail = BytesMut::with_capacity(RX_COALESCE);
            }
            ch.rx_tail.extend_from_slice(&payload);
            self.pool.recycle(payload);
        } else {
            if !ch.rx_tail.is_empty() {
                ch.rx.push_back(ch.rx_tail.split().freeze());
            }
            ch.rx.push_back(payload);
        }
        if was_empty {
            self.events.push_back(Event::Readable(id));
        }
    }

    fn on_credit(&mut self, id: ChannelId, p: &Bytes) {
        let Ok(inc) = <[u8; 4]>::try_from(&p[..]).map(u32::from_le_bytes) else {
            self.reset_with_error(id, ResetCode::Protocol, "malformed CREDIT".into());
            return;
        };
        match self.channels.get_mut(&id) {
            Some(ch) => {
                let was_blocked = ch.credit == 0;
                ch.credit = ch.credit.saturating_add(u64::from(inc));
                if was_blocked {
                    self.events.push_back(Event::Writable(id));
                }
            }
            None => self.unknown_channel(Kind::Credit, id),
        }
    }

    fn on_close(&mut self, id: ChannelId) {
        match self.channels.get_mut(&id) {
            Some(ch) => {
                ch.remote_fin = true;
                self.events.push_back(Event::Readable(id));
                self.maybe_finish(id);
            }
            None => self.unknown_channel(Kind::Close, id),
        }
    }

    fn on_reset(&mut self, id: ChannelId, p: &Bytes) {
        if self.remove_channel(id).is_none() {
            self.unknown_channel(Kind::Reset, id);
            return;
        }
        let code = p.get(..2).map_or(ResetCode::Aborted, |c| {
            ResetCode::from_u16(u16::from_le_bytes([c[0], c[1]]))
        });
        let reason = p
            .get(2..)
            .map(|r| String::from_utf8_lossy(&r[..r.len().min(256)]).into_owned());
        if code != ResetCode::Aborted && code != ResetCode::Refused {
            self.stats.channel_resets += 1;
        }
        self.events.push_back(Event::ChannelReset {
            id,
            code,
            reason: reason.unwrap_or_default(),
        });
    }

    fn remove_channel(&mut self, id: ChannelId) -> Option<Channel> {
        let ch = self.channels.remove(&id)?;
        self.charged = self.charged.saturating_sub(self.cfg.channel_charge());
        Some(ch)
    }

    fn maybe_finish(&mut self, id: ChannelId) {
        if self.channels.get(&id).is_some_and(Channel::finished) {
            self.remove_channel(id);
            self.events.push_back(Event::ChannelClosed(id));
        }
    }

    fn queue_reset(&mut self, id: ChannelId, code: ResetCode, reason: &str) {
        let mut p = Vec::with_capacity(2 + reason.len());
        p.extend_from_slice(&(code as u16).to_le_bytes());
        p.extend_from_slice(reason.as_bytes());
        self.push_control(Kind::Reset, id, Bytes::from(p));
    }

    fn push_control(&mut self, kind: Kind, id: ChannelId, payload: Bytes) {
        self.control_bytes += frame::wire_len(payload.len()) + CONTROL_ENTRY_OVERHEAD;
        self.control.push_back((kind, id, payload));
    }

    /// Resets a channel because of a peer error: tell the peer, tell the application.
    fn reset_with_error(&mut self, id: ChannelId, code: ResetCode, reason: String) {
        self.stats.channel_resets += 1;
        if self.remove_channel(id).is_some() {
            self.events.push_back(Event::ChannelReset {
                id,
                code,
                reason: reason.clone(),
            });
        }
        self.queue_reset(id, code, &reason);
    }

    // ---- local application -----------------------------------------------------------------

    /// Opens a channel to the peer's service `class`/`name`. Data may be sent once
    /// [`Event::ChannelReady`] arrives (`send` buffers before that).
    pub fn open_channel(&mut self, class: &str, name: &str) -> Result<ChannelId, ChannelError> {
        if class.len() > 255 || name.len() > 255 {
            return Err(ChannelError::NameTooLong);
        }
        self.reserve_window().map_err(ChannelError::Limit)?;
        let id = self.next_channel;
        self.next_channel = self.next_channel.wrapping_add(2);
        self.channels.insert(
            id,
            Channel::new(class.into(), name.into(), true, self.cfg.channel_window),
        );
        let mut p = Vec::with_capacity(3 + class.len() + name.len() + 4);
        p.push(class.len() as u8);
        p.extend_from_slice(class.as_bytes());
        p.push(name.len() as u8);
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&self.cfg.channel_window.to_le_bytes());
        self.push_control(Kind::Open, id, Bytes::from(p));
        Ok(id)
    }

    /// Accepts a channel the peer opened ([`Event::ChannelOpened`]): the peer may now send.
    /// Accepting twice is harmless.
    pub fn accept(&mut self, id: ChannelId) -> Result<(), ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        if ch.local || ch.accepted {
            return Ok(());
        }
        ch.accepted = true;
        let w = self.cfg.channel_window.to_le_bytes();
        self.push_control(Kind::OpenOk, id, Bytes::copy_from_slice(&w));
        Ok(())
    }

    /// Queues bytes; returns how many were accepted (0 when the send buffer is full: wait for
    /// [`Event::Writable`]).
    pub fn send(&mut self, id: ChannelId, data: &[u8]) -> Result<usize, ChannelError> {
        let limit = self.cfg.channel_send_buffer;
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        if ch.fin_queued {
            return Err(ChannelError::Closed(id));
        }
        let n = data.len().min(limit.saturating_sub(ch.send_buf.len()));
        ch.send_buf.push(&data[..n], &mut self.pool);
        Ok(n)
    }

    /// Room left in the send buffer.
    pub fn send_capacity(&self, id: ChannelId) -> Result<usize, ChannelError> {
        let ch = self.channels.get(&id).ok_or(ChannelError::Unknown(id))?;
        Ok(self
            .cfg
            .channel_send_buffer
            .saturating_sub(ch.send_buf.len()))
    }

    /// Copies received bytes into `buf`.
    pub fn recv(&mut self, id: ChannelId, buf: &mut [u8]) -> Result<Recv, ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = ch.rx.front_mut() else {
                break;
            };
            let take = front.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&front[..take]);
            n += take;
            if take == front.len() {
                if let Some(done) = ch.rx.pop_front() {
                    self.pool.recycle(done);
                }
            } else {
                front.advance(take);
            }
        }
        if n < buf.len() && ch.rx.is_empty() && !ch.rx_tail.is_empty() {
            let take = ch.rx_tail.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&ch.rx_tail[..take]);
            n += take;
            if take == ch.rx_tail.len() {
                ch.rx_tail = BytesMut::new(); // Frees it: an idle channel holds nothing.
            } else {
                ch.rx_tail.advance(take);
            }
        }
        if n == 0 {
            if ch.remote_fin && ch.rx_len == 0 {
                ch.eof_read = true;
                self.maybe_finish(id);
                return Ok(Recv::Eof);
            }
            return Ok(Recv::WouldBlock);
        }
        ch.rx_len -= n;
        // n <= buffered bytes <= channel window (a u32).
        ch.rx_unreported += n as u32;
        let window = self.cfg.channel_window;
        if ch.rx_unreported >= window / 4 || (ch.rx_len == 0 && ch.rx_unreported >= window / 16) {
            let inc = std::mem::take(&mut ch.rx_unreported);
            ch.rx_granted += u64::from(inc);
            self.push_control(Kind::Credit, id, Bytes::copy_from_slice(&inc.to_le_bytes()));
        }
        Ok(Recv::Data(n))
    }

    /// Ends our direction of the channel once queued data is sent (half close).
    pub fn close(&mut self, id: ChannelId) -> Result<(), ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        ch.fin_queued = true;
        Ok(())
    }

    /// Aborts a channel: queued data is dropped, the peer is told why.
    pub fn reset(
        &mut self,
        id: ChannelId,
        code: ResetCode,
        reason: &str,
    ) -> Result<(), ChannelError> {
        self.remove_channel(id).ok_or(ChannelError::Unknown(id))?;
        self.queue_reset(id, code, reason);
        Ok(())
    }

    /// Open channels, for status displays.
    pub fn channels(&self) -> impl Iterator<Item = ChannelInfo> + '_ {
        self.channels.iter().map(|(id, ch)| ChannelInfo {
            id: *id,
            class: ch.class.clone(),
            name: ch.name.clone(),
            local: ch.local,
            bytes_in: ch.bytes_in,
            bytes_out: ch.bytes_out,
            rx_buffered: ch.rx_len,
            tx_buffered: ch.send_buf.len(),
        })
    }

    /// Whether the channel exists.
    pub fn has_channel(&self, id: ChannelId) -> bool {
        self.channels.contains_key(&id)
    }

    // ---- transmitting ----------------------------------------------------------------------

    /// Appends frames for `link` to `out`, stopping once roughly `max` bytes were added.
    /// Returns the number of bytes added (0 = nothing to send now).
    pub fn poll_transmit(
        &mut self,
        link: LinkId,
        now: Instant,
        out: &mut Vec<u8>,
        max: usize,
    ) -> usize {
        self.transmit(link, now, out, max)
    }

    /// [`Session::poll_transmit`] for a vectored write: the same frames, the same bytes, but
    /// large payloads are not copied (they are shared with the retransmission queue). On a
    /// 64 KiB bulk transfer that copy was a twentieth of the CPU time, all of it spent holding
    /// the driver's lock.
    pub fn poll_transmit_vectored(
        &mut self,
        link: LinkId,
        now: Instant,
        out: &mut Transmit,
        max: usize,
    ) -> usize {
        self.transmit(link, now, out, max)
    }

    fn transmit<S: Sink>(&mut self, link: LinkId, now: Instant, out: &mut S, max: usize) -> usize {
        let start = out.encoded();
        let ack = self.recv_next;
        let Some(l) = self.links.get_mut(&link) else {
            return 0;
        };
        if l.state == LinkState::Dead {
            return 0;
        }
        let hello_retry = l.state == LinkState::AwaitHello
            && l.hello_at
                .is_some_and(|t| now.duration_since(t) >= HELLO_RETRY);
        if l.hello_due || hello_retry {
            l.hello_due = false;
            l.hello_at = Some(now);
            let hello = Hello {
                version: VERSION,
                role: self.cfg.role,
                caps: caps::RESUME
                    | if l.params.checksummed {
                        caps::NO_PAYLOAD_CRC
                    } else {
                        0
                    },
                my_session: self.my_session,
                your_session: self.peer_session,
                recv_next: self.recv_next,
                max_frame: self.cfg.max_frame,
                link: l.nonce,
                echo: l.peer_nonce,
                name: self.cfg.name.clone(),
            };
            // Always with its CRC: the peer may have restarted and forgotten the negotiation.
            out.small(0, Kind::Hello as u8, 0, 0, 0, &hello.encode());
        }
        if l.state != LinkState::Up {
            return self.account(link, out.encoded() - start);
        }
        let flags = l.flags;
        if let Some(nonce) = l.pong.take() {
            out.small(flags, Kind::Pong as u8, 0, 0, ack, &nonce.to_le_bytes());
        }
        if l.ping.is_none() && now.duration_since(l.last_rx) >= self.cfg.keepalive_interval {
            self.ping_nonce = self.ping_nonce.wrapping_add(1);
            l.ping = Some((self.ping_nonce, now));
            out.small(
                flags,
                Kind::Ping as u8,
                0,
                0,
                ack,
                &self.ping_nonce.to_le_bytes(),
            );
        }
        if std::mem::take(&mut l.nack_due) {
            out.small(flags, Kind::Nack as u8, 0, 0, ack, &[]);
        }
        let frame_size = l.frame_size as usize;
        let max_inflight = l.params.max_inflight;
        let had_ack_due = std::mem::take(&mut l.ack_due);
        if self.active == Some(link) {
            self.transmit_sequenced(out, flags, start, max, frame_size, max_inflight, now);
        }
        if had_ack_due && out.encoded() == start {
            out.small(flags, Kind::Ack as u8, 0, 0, ack, &[]);
        }
        self.account(link, out.encoded() - start)
    }

    fn account(&mut self, link: LinkId, n: usize) -> usize {
        if let Some(l) = self.links.get_mut(&link) {
            l.stats.bytes_out += n as u64;
        }
        n
    }

    #[allow(clippy::too_many_arguments)]
    fn transmit_sequenced<S: Sink>(
        &mut self,
        out: &mut S,
        flags: u8,
        start: usize,
        max: usize,
        frame_size: usize,
        max_inflight: usize,
        now: Instant,
    ) {
        let ack = self.recv_next;
        let room =
            |out: &S, inflight: usize| out.encoded() - start < max && inflight < max_inflight;
        // Retransmissions first, in order.
        while self.resend < self.unacked.len() && room(out, self.inflight) {
            let s = &self.unacked[self.resend];
            out.frame(flags, s.kind as u8, s.channel, s.seq, ack, &s.payload);
            self.inflight += frame::wire_len(s.payload.len());
            self.resend += 1;
            self.stats.frames_retransmitted += 1;
        }
        if self.resend < self.unacked.len() {
            return;
        }
        if self.unacked.is_empty() {
            self.last_progress = now;
        }
        // Control frames, then data round-robin over channels with credit.
        while room(out, self.inflight) && self.unacked_bytes < self.cfg.max_unacked {
            if let Some((kind, ch, payload)) = self.control.pop_front() {
                self.control_bytes -= frame::wire_len(payload.len()) + CONTROL_ENTRY_OVERHEAD;
                self.push_new(out, flags, kind, ch, payload, ack);
                continue;
            }
            if !self.next_data_frame(out, flags, frame_size, ack) {
                break;
            }
        }
    }

    fn push_new<S: Sink>(
        &mut self,
        out: &mut S,
        flags: u8,
        kind: Kind,
        channel: u32,
        payload: Bytes,
        ack: u32,
    ) {
        let seq = self.send_next;
        self.send_next = self.send_next.wrapping_add(1);
        out.frame(flags, kind as u8, channel, seq, ack, &payload);
        let len = frame::wire_len(payload.len());
        self.unacked_bytes += len;
        self.inflight += len;
        self.unacked.push_back(Sent {
            seq,
            kind,
            channel,
            payload,
        });
        self.resend = self.unacked.len();
        self.stats.frames_sent += 1;
    }

    /// Sends one DATA (or CLOSE) frame from the next channel that has something to send.
    fn next_data_frame<S: Sink>(
        &mut self,
        out: &mut S,
        flags: u8,
        frame_size: usize,
        ack: u32,
    ) -> bool {
        let pick = self
            .channels
            .range(self.rr_cursor..)
            .chain(self.channels.range(..self.rr_cursor))
            .find(|(_, ch)| {
                ch.can_send()
                    && ((!ch.send_buf.is_empty() && ch.credit > 0)
                        || (ch.send_buf.is_empty() && ch.fin_queued && !ch.fin_sent))
            })
            .map(|(id, _)| *id);
        let Some(id) = pick else { return false };
        self.rr_cursor = id.wrapping_add(1);
        let Some(ch) = self.channels.get_mut(&id) else {
            return false;
        };
        if ch.send_buf.is_empty() {
            ch.fin_sent = true;
            self.push_new(out, flags, Kind::Close, id, Bytes::new(), ack);
            self.maybe_finish(id);
            return true;
        }
        let credit = usize::try_from(ch.credit).unwrap_or(usize::MAX);
        let n = ch.send_buf.len().min(credit).min(frame_size);
        let was_full = ch.send_buf.len() >= self.cfg.channel_send_buffer;
        let payload = ch.send_buf.take(n);
        let n = payload.len();
        ch.credit -= n as u64;
        ch.bytes_out += n as u64;
        if was_full {
            self.events.push_back(Event::Writable(id));
        }
        self.push_new(out, flags, Kind::Data, id, payload, ack);
        true
    }

    // ---- time ------------------------------------------------------------------------------

    /// When [`Session::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut earliest = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(at) = self.reports.next_flush() {
            earliest(at);
        }
        if let Some(since) = self.alone_since.filter(|_| self.holds_state()) {
            // A configured "never" must not overflow the clock.
            if let Some(at) = since.checked_add(self.cfg.resume_timeout) {
                earliest(at);
            }
        }
        for l in self.links.values() {
            match l.state {
                LinkState::Dead => {}
                LinkState::AwaitHello => {
                    earliest(l.since + self.cfg.keepalive_timeout);
                    if let Some(t) = l.hello_at {
                        earliest(t + HELLO_RETRY);
                    }
                }
                LinkState::Up => {
                    earliest(l.last_rx + self.cfg.keepalive_timeout);
                    if l.ping.is_none() {
                        earliest(l.last_rx + self.cfg.keepalive_interval);
                    }
                }
            }
        }
        if let Some(l) = self.active.and_then(|a| self.links.get(&a)) {
            if self.resend > 0 {
                earliest(self.last_progress + l.params.rto * self.backoff);
            }
        }
        t
    }

    /// Runs timers: keepalive, dead links, retransmission.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        for (kind, count) in self.reports.flush(now) {
            self.events
                .push_back(Event::ErrorsSuppressed { kind, count });
        }
        if self
            .alone_since
            .is_some_and(|t| now.duration_since(t) >= self.cfg.resume_timeout)
            && self.holds_state()
        {
            self.expire();
        }
        if now.duration_since(self.pool_trimmed) >= POOL_TRIM_INTERVAL {
            self.pool_trimmed = now;
            self.pool.trim();
        }
        let mut dead = Vec::new();
        for (id, l) in &self.links {
            let limit = self.cfg.keepalive_timeout;
            match l.state {
                LinkState::AwaitHello if now.duration_since(l.since) >= limit => {
                    dead.push((*id, format!("no handshake within {limit:?}")))
                }
                LinkState::Up if now.duration_since(l.last_rx) >= limit => dead.push((
                    *id,
                    format!("peer silent for {limit:?} (keepalive timeout)"),
                )),
                _ => {}
            }
        }
        for (id, reason) in dead {
            self.kill_link(id, reason);
        }
        if let Some(l) = self.active.and_then(|a| self.links.get(&a)) {
            if self.resend > 0
                && now.duration_since(self.last_progress) >= l.params.rto * self.backoff
            {
                self.stats.timeouts += 1;
                self.resend = 0;
                self.inflight = 0;
                self.backoff = (self.backoff * 2).min(8);
                self.last_progress = now;
            }
        }
    }

    /// True when something is waiting to be sent on `link` right now.
    pub fn wants_transmit(&self, link: LinkId, now: Instant) -> bool {
        let Some(l) = self.links.get(&link) else {
            return false;
        };
        if l.state == LinkState::Dead {
            return false;
        }
        if l.hello_due {
            return true;
        }
        if l.state != LinkState::Up {
            return l
                .hello_at
                .is_some_and(|t| now.duration_since(t) >= HELLO_RETRY);
        }
        if l.pong.is_some() || l.nack_due || l.ack_due {
            return true;
        }
        if l.ping.is_none() && now.duration_since(l.last_rx) >= self.cfg.keepalive_interval {
            return true;
        }
        if self.active != Some(link) || self.inflight >= l.params.max_inflight {
            return false;
        }
        self.resend < self.unacked.len()
            || (self.unacked_bytes < self.cfg.max_unacked
                && (!self.control.is_empty()
                    || self.channels.values().any(|ch| {
                        ch.can_send()
                            && ((!ch.send_buf.is_empty() && ch.credit > 0)
                                || (ch.send_buf.is_empty() && ch.fin_queued && !ch.fin_sent))
                    })))
    }
}

/// A well-mixed, non-zero link id derived from the session id (splitmix64 finaliser).
fn link_nonce(session: u64, link: u32) -> u32 {
    let mut z = session.wrapping_add(u64::from(link).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32 | 1
}

fn parse_open(p: &[u8]) -> Option<(String, String, u32)> {
    let clen = usize::from(*p.first()?);
    let class = p.get(1..1 + clen)?;
    let nlen = usize::from(*p.get(1 + clen)?);
    let name = p.get(2 + clen..2 + clen + nlen)?;
    let w = p.get(2 + clen + nlen..2 + clen + nlen + 4)?;
    if p.len() != 6 + clen + nlen {
        return None;
    }
    Some((
        std::str::from_utf8(class).ok()?.to_owned(),
        std::str::from_utf8(name).ok()?.to_owned(),
        u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
    ))
}
