//! Device: fastnet. A guest network whose packets cross a shared memory segment, with the
//! session's stream as the control path and the interrupt line (issue 10).
//!
//! - [`ring`]: the segment's layout and its two single-producer/single-consumer packet rings
//!   (host-to-guest and guest-to-host), sans-io and safe against a hostile peer.
//! - [`segment`]: the memory the rings live in (a shared file mapping, or the heap in tests).
//! - [`guest`]: the agent's end: finding the ivshmem segment, choosing the mode.
//! - [`host`]: vstreamd's end of a link, between the host TAP and the guest.
//! - [`link`]: the packet loops both ends run (through the rings, or on the channel).
//! - [`tap`]: the TAP interface with vnet headers and offloads that each end attaches.
//! - [`port`]: what the packet loops move frames to and from (a TAP, or a switch port).
//! - [`switch`]: the host's built-in L2 switch joining several guests' links.
//! - [`vnet`]: the checks of the vnet header on every frame the host takes from a guest.
//! - This module: the messages of the `fastnet` channel (setup, the answer, doorbells, and the
//!   packets themselves in channel-only mode) as records of the shared codec
//!   ([`crate::record`], [`record::Layout::Long`]: type byte, u32 LE length, payload), and the choice
//!   between the two modes.
//!
//! See docs/devices/fastnet.md for the layout, the ordering rules and the doorbell protocol.

pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
pub mod link;
pub mod port;
pub mod ring;
pub mod segment;
pub mod switch;
#[cfg(test)]
mod switch_tests;
pub mod tap;
#[cfg(test)]
mod tests;
pub mod vnet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::record::{self, put, Limit};
pub use crate::record::{read_message, Decoder, Message, ReadError, RecordError};

/// The device class.
pub const CLASS: &str = "fastnet";

/// The name of the link's channel (one per guest).
pub const CHANNEL_NAME: &str = "link";

/// The channel protocol's version (in [`Setup`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest packet in either mode: a 64 KiB GSO frame, its Ethernet header and a 12-byte
/// `virtio_net_hdr_v1`, rounded up.
pub const MAX_PACKET: u32 = 65536 + 64;

/// Largest `Setup`, `Ready` or `Reset` payload.
pub const MAX_CONTROL: usize = 4096;

/// Largest slice the drivers hand to [`Decoder::push`] at once (their read buffer).
pub const READ_CHUNK: usize = 64 * 1024;

/// Message type bytes: host to guest with the high bit clear, guest to host set.
mod kind {
    pub const SETUP: u8 = 0x01;
    pub const DOORBELL: u8 = 0x02;
    pub const PACKET: u8 = 0x03;
    pub const RESET: u8 = 0x04;
    pub const READY: u8 = 0x81;
    pub const GUEST_DOORBELL: u8 = 0x82;
    pub const GUEST_PACKET: u8 = 0x83;
    pub const GUEST_RESET: u8 = 0x84;
}

/// How a link carries its packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// In the shared segment's rings; the channel carries doorbells only.
    SharedMemory,
    /// On the channel itself, one `Packet` message each (no segment on this transport).
    Channel,
}

/// The host's first message: the link's parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The size of the segment the host mapped for this guest (an `ivshmem-plain` device's
    /// BAR 2 in the guest); 0: none, channel-only.
    pub segment_size: u64,
    /// MTU of the guest's interface (without the Ethernet header).
    pub mtu: u16,
    /// The guest interface's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub guest_mac: String,
    /// The host interface's MAC address.
    pub host_mac: String,
    /// The guest's IPv4 address and prefix (`10.0.0.2/24`), if the host assigns one.
    // Left out when absent: a decoded message never re-encodes longer than it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_address: Option<String>,
    /// Packets start with a 12-byte `virtio_net_hdr_v1` and may be up to 64 KiB GSO frames
    /// with partial checksums (TAP `IFF_VNET_HDR` and `TUNSETOFFLOAD` on both ends).
    pub vnet_hdr: bool,
}

/// The guest's answer to [`Setup`]: the mode it runs the link in, and why, if not the one the
/// host offered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The mode both sides now use.
    pub mode: Mode,
    /// Why shared memory was not used, for the host's log and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Host-to-guest messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMsg {
    /// The link's parameters; the first message, and again after a reset.
    Setup(Setup),
    /// Look at the rings: the host published packets or released space the guest waits for.
    Doorbell,
    /// Channel-only mode: one packet for the guest.
    Packet(Bytes),
    /// The host stopped using the segment (a bad index, length or header); a new `Setup`
    /// follows.
    Reset(String),
}

/// Guest-to-host messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestMsg {
    /// The answer to `Setup`.
    Ready(Ready),
    /// Look at the rings.
    Doorbell,
    /// Channel-only mode: one packet from the guest.
    Packet(Bytes),
    /// The guest stopped using the segment.
    Reset(String),
}

/// The limits of every type, either direction.
fn limit(kind: u8) -> Result<Limit, RecordError> {
    match kind {
        kind::SETUP => Ok(Limit::range("Setup", 0, MAX_CONTROL)),
        kind::READY => Ok(Limit::range("Ready", 0, MAX_CONTROL)),
        kind::DOORBELL | kind::GUEST_DOORBELL => Ok(Limit::exactly("Doorbell", 0)),
        kind::PACKET | kind::GUEST_PACKET => Ok(Limit::range("Packet", 0, MAX_PACKET as usize)),
        kind::RESET | kind::GUEST_RESET => Ok(Limit::range("Reset", 0, MAX_CONTROL)),
        other => Err(RecordError::UnknownType(other)),
    }
}

fn json<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    payload: &[u8],
) -> Result<T, RecordError> {
    serde_json::from_slice(payload).map_err(|_| RecordError::Malformed {
        kind,
        what: "not the JSON object docs/devices/fastnet.md describes",
    })
}

fn text(payload: &[u8]) -> Result<String, RecordError> {
    String::from_utf8(payload.to_vec()).map_err(|_| RecordError::Malformed {
        kind: "Reset",
        what: "reason is not UTF-8",
    })
}

fn put_json<M: Message>(
    out: &mut Vec<u8>,
    kind: u8,
    value: &impl Serialize,
) -> Result<(), RecordError> {
    let body = serde_json::to_vec(value).expect("plain structs serialize");
    put::<M>(out, kind, 0, &body)
}

/// Packets are not checked further: they go to a TAP device as they are, and the kernel parses
/// them (as it does a packet from any NIC).
impl Message for HostMsg {
    const LAYOUT: record::Layout = record::Layout::Long;
    const MAX_PAYLOAD: usize = MAX_PACKET as usize;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(kind: u8) -> Result<Limit, RecordError> {
        match kind {
            kind::SETUP | kind::DOORBELL | kind::PACKET | kind::RESET => limit(kind),
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn decode(kind: u8, _flags: u8, payload: Bytes) -> Result<HostMsg, RecordError> {
        match kind {
            kind::SETUP => Ok(HostMsg::Setup(json("Setup", &payload)?)),
            kind::DOORBELL => Ok(HostMsg::Doorbell),
            kind::PACKET => Ok(HostMsg::Packet(payload)),
            kind::RESET => Ok(HostMsg::Reset(text(&payload)?)),
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let put = |out: &mut Vec<u8>, kind, payload: &[u8]| put::<HostMsg>(out, kind, 0, payload);
        match self {
            HostMsg::Setup(s) => put_json::<HostMsg>(out, kind::SETUP, s),
            HostMsg::Doorbell => put(out, kind::DOORBELL, &[]),
            HostMsg::Packet(p) => put(out, kind::PACKET, p),
            HostMsg::Reset(r) => put(out, kind::RESET, r.as_bytes()),
        }
    }
}

impl Message for GuestMsg {
    const LAYOUT: record::Layout = record::Layout::Long;
    const MAX_PAYLOAD: usize = MAX_PACKET as usize;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(kind: u8) -> Result<Limit, RecordError> {
        match kind {
            kind::READY | kind::GUEST_DOORBELL | kind::GUEST_PACKET | kind::GUEST_RESET => {
                limit(kind)
            }
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn decode(kind: u8, _flags: u8, payload: Bytes) -> Result<GuestMsg, RecordError> {
        match kind {
            kind::READY => Ok(GuestMsg::Ready(json("Ready", &payload)?)),
            kind::GUEST_DOORBELL => Ok(GuestMsg::Doorbell),
            kind::GUEST_PACKET => Ok(GuestMsg::Packet(payload)),
            kind::GUEST_RESET => Ok(GuestMsg::Reset(text(&payload)?)),
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let put = |out: &mut Vec<u8>, kind, payload: &[u8]| put::<GuestMsg>(out, kind, 0, payload);
        match self {
            GuestMsg::Ready(r) => put_json::<GuestMsg>(out, kind::READY, r),
            GuestMsg::Doorbell => put(out, kind::GUEST_DOORBELL, &[]),
            GuestMsg::Packet(p) => put(out, kind::GUEST_PACKET, p),
            GuestMsg::Reset(r) => put(out, kind::GUEST_RESET, r.as_bytes()),
        }
    }
}

/// What the guest found where the host's segment should be.
#[derive(Debug)]
pub enum Found {
    /// No `ivshmem-plain` device (PCI 1af4:1110), or its BAR 2 could not be mapped: why.
    Nothing(String),
    /// A segment of this many bytes whose header read as this (or failed to).
    Segment(u64, Result<ring::Layout, ring::RingError>),
}

/// The guest's choice of mode for `setup`, given what it found: shared memory only if the host
/// offers a segment, the guest found one of the same size, its header is valid and its packets
/// are big enough for the MTU; otherwise the channel, with the reason (reported to the host,
/// which logs it and shows it in `vstreamctl status`).
pub fn choose_mode(setup: &Setup, found: Found) -> Ready {
    let channel = |reason: String| Ready {
        mode: Mode::Channel,
        reason: Some(reason),
    };
    if setup.segment_size == 0 {
        return channel("the host offers no shared segment on this transport".into());
    }
    match found {
        Found::Nothing(why) => channel(why),
        Found::Segment(size, _) if size != setup.segment_size => channel(format!(
            "the shared segment has {size} bytes, the host mapped {}",
            setup.segment_size
        )),
        Found::Segment(_, Err(e)) => channel(format!("the shared segment is not usable: {e}")),
        Found::Segment(_, Ok(layout)) if layout.max_packet < u32::from(setup.mtu) + 14 + 12 => {
            channel(format!(
                "the segment's max_packet {} is too small for MTU {}",
                layout.max_packet, setup.mtu
            ))
        }
        Found::Segment(_, Ok(_)) => Ready {
            mode: Mode::SharedMemory,
            reason: None,
        },
    }
}
