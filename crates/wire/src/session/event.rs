//! What a session reports to its caller: events, errors, reset codes, channel facts.

use super::{ChannelId, LinkId};
use crate::frame::DecodeError;

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
    pub(super) fn from_u16(v: u16) -> ResetCode {
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

/// Result of [`Session::recv`] (`Recv<usize>`) and [`Session::recv_bytes`] (`Recv<Bytes>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv<T = usize> {
    /// This many bytes were copied ([`Session::recv`]), or these bytes were taken
    /// ([`Session::recv_bytes`]).
    Data(T),
    /// Nothing buffered yet.
    WouldBlock,
    /// The peer closed its direction and everything was read.
    Eof,
}

/// Per-channel facts for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// Our receive window now (it grows from `channel_window` while the window limits the
    /// channel).
    pub rx_window: u32,
    /// How many unsent bytes the application may queue now (grows with the peer's window).
    pub tx_limit: usize,
}
