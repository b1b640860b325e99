//! The vstream multiplexer, sans-io.
//!
//! Many channels (each a bidirectional byte stream opened by device class and name) share one
//! transport byte stream. The wire format is specified in docs/PROTOCOL.md; this crate is its
//! reference implementation as plain state machines: bytes and the current time go in, bytes
//! and events come out. It does no I/O, spawns nothing and reads no clock, so every behaviour
//! (cuts, corruption, resume, flow control) is testable deterministically.
#![deny(missing_docs)]

pub mod auth;
pub mod crc;
pub mod frame;
pub mod hello;
pub mod limit;
pub mod session;

pub use frame::{BufferPool, DecodeError, Decoder, Frame, InputBuf, Kind, Transmit};
pub use hello::{peek_hello, Hello, Role};
pub use session::{
    ChannelError, ChannelId, ChannelInfo, Config, ErrorKind, Event, LinkId, LinkParams, LinkStats,
    ProtocolError, Recv, ResetCode, Session, SessionStats, SnapshotError, CONTROL_QUEUE_LIMIT,
    MAX_INPUT, REFUSED_BY_PEER, SHARE_MIN,
};
