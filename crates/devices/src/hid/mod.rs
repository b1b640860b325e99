//! Device: hid. Keyboard, mouse and absolute pointer ("tablet") input from the host into the
//! guest: `vstreamctl input GUEST type|key|mouse|tablet ...` and `--forward /dev/input/eventN`.
//!
//! One channel of class `hid` per device kind, named `keyboard`, `mouse` or `tablet`. The host
//! half ([`host`], run by vstreamctl through vstreamd's control socket) sends batches of input
//! events; each batch is one evdev report: the guest half ([`guest`], run by vstream-agent)
//! writes the batch's events to its uinput device of that kind, followed by one `SYN_REPORT`,
//! so report boundaries are kept exactly. The guest half checks every event against the
//! capabilities of its device ([`Kind::allows`]) and refuses the channel (reset with the reason)
//! on anything else.
//!
//! The wire format is specified in docs/devices/hid.md; this module is its reference
//! implementation: the messages, framed by the shared record codec ([`crate::record`]): a
//! sans-io [`Decoder`] that holds at most one partial message ([`HEADER_LEN`] + [`MAX_PAYLOAD`])
//! plus one read ([`READ_CHUNK`]).
//!
//! Message: `u8 type`, `u8 flags`, `u16 length` (little-endian), `length` bytes of payload.

pub mod device;
pub mod forward;
// The host half's virtio-input devices serve the same protocol as the agent ([`guest::serve_stream`]).
#[cfg(any(feature = "guest", feature = "host"))]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
pub mod keymap;
#[cfg(test)]
mod tests;
#[cfg(feature = "host")]
pub mod verbs;
#[cfg(feature = "host")]
pub mod vhost;

use std::fmt;

use bytes::Bytes;

use crate::record::{self, Layout, Limit};
pub use crate::record::{Message as _, RecordError};

/// The device class.
pub const CLASS: &str = "hid";

/// Version carried by `Ready`.
pub const VERSION: u8 = 1;

/// Bytes of a message header: type, flags, length.
pub const HEADER_LEN: usize = Layout::ShortWithFlags.header_len();

/// Largest slice the drivers read at once.
pub const READ_CHUNK: usize = 4096;

/// Most events in one batch (one evdev report, `SYN_REPORT` not counted).
pub const MAX_EVENTS: usize = 64;

/// Bytes of one event on the wire: `u16 type`, `u16 code`, `i32 value`.
pub const EVENT_LEN: usize = 8;

/// Largest payload of any message (a full `Batch`).
pub const MAX_PAYLOAD: usize = 4 + MAX_EVENTS * EVENT_LEN;

/// Longest evdev node name in `Ready` (`event123`).
pub const MAX_NODE: usize = 32;

/// Largest coordinate of the tablet's `ABS_X`/`ABS_Y` (the smallest is 0), as QEMU's usb-tablet.
pub const ABS_MAX: i32 = 32767;

/// Range of a relative axis value in one event (the host splits larger moves).
pub const REL_MIN: i32 = -32768;
/// See [`REL_MIN`].
pub const REL_MAX: i32 = 32767;

/// Linux input event types and codes used here (linux/input-event-codes.h).
pub mod codes {
    /// Synchronisation events.
    pub const EV_SYN: u16 = 0x00;
    /// Keys and buttons.
    pub const EV_KEY: u16 = 0x01;
    /// Relative axes.
    pub const EV_REL: u16 = 0x02;
    /// Absolute axes.
    pub const EV_ABS: u16 = 0x03;
    /// Miscellaneous (scan codes).
    pub const EV_MSC: u16 = 0x04;
    /// End of a report.
    pub const SYN_REPORT: u16 = 0;
    /// The reader's buffer overflowed: events were lost.
    pub const SYN_DROPPED: u16 = 3;
    /// Horizontal motion.
    pub const REL_X: u16 = 0x00;
    /// Vertical motion.
    pub const REL_Y: u16 = 0x01;
    /// Horizontal wheel.
    pub const REL_HWHEEL: u16 = 0x06;
    /// Vertical wheel.
    pub const REL_WHEEL: u16 = 0x08;
    /// Absolute X.
    pub const ABS_X: u16 = 0x00;
    /// Absolute Y.
    pub const ABS_Y: u16 = 0x01;
    /// Left button.
    pub const BTN_LEFT: u16 = 0x110;
    /// Right button.
    pub const BTN_RIGHT: u16 = 0x111;
    /// Middle button.
    pub const BTN_MIDDLE: u16 = 0x112;
    /// Touch contact (touchscreens).
    pub const BTN_TOUCH: u16 = 0x14a;
    /// The device is a pointer (not a touchscreen).
    pub const INPUT_PROP_POINTER: u16 = 0x00;
    /// LEDs (keyboards; the guest sets them).
    pub const EV_LED: u16 = 0x11;
    /// Num Lock LED.
    pub const LED_NUML: u16 = 0x00;
    /// Caps Lock LED.
    pub const LED_CAPSL: u16 = 0x01;
    /// Scroll Lock LED.
    pub const LED_SCROLLL: u16 = 0x02;
    /// `BUS_VIRTUAL` (linux/input.h).
    pub const BUS_VIRTUAL: u16 = 0x06;
}

use codes::*;

/// Message type bytes. Host-to-guest types have the high bit clear, guest-to-host types set.
mod kind {
    pub const BATCH: u8 = 0x01;
    pub const READY: u8 = 0x81;
    pub const ACK: u8 = 0x82;
}

/// `Batch` flag: answer with an `Ack` once the events are written to the uinput device.
pub const FLAG_ACK: u8 = 0x01;
/// `Batch` flag: answer with an `Ack` once the report was read back from the device's evdev
/// node (implies [`FLAG_ACK`]); for latency measurements.
pub const FLAG_PROBE: u8 = 0x02;
/// `Ack` flag: the report was read back from the evdev node.
pub const FLAG_SEEN: u8 = 0x01;

/// The three devices, one channel name each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Keys of the [`keymap`] (letters, digits, symbols, function and editing keys, modifiers).
    Keyboard,
    /// Relative pointer: `REL_X`, `REL_Y`, `REL_WHEEL`, three buttons.
    Mouse,
    /// Absolute pointer: `ABS_X`, `ABS_Y` in 0..=[`ABS_MAX`], three buttons.
    Tablet,
}

/// Mouse and tablet buttons.
pub const BUTTONS: [u16; 3] = [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE];

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 3] = [Kind::Keyboard, Kind::Mouse, Kind::Tablet];

    /// The channel name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Keyboard => "keyboard",
            Kind::Mouse => "mouse",
            Kind::Tablet => "tablet",
        }
    }

    /// The kind of a channel name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Wire number in `Ready`.
    fn number(self) -> u8 {
        match self {
            Kind::Keyboard => 1,
            Kind::Mouse => 2,
            Kind::Tablet => 3,
        }
    }

    fn from_number(n: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.number() == n)
    }

    /// The name of the uinput device the guest creates.
    pub fn device_name(self) -> &'static str {
        match self {
            Kind::Keyboard => "vstream keyboard",
            Kind::Mouse => "vstream mouse",
            Kind::Tablet => "vstream tablet",
        }
    }

    /// The `EV_KEY` codes of the device.
    pub fn keys(self) -> Vec<u16> {
        match self {
            Kind::Keyboard => keymap::keyboard_keys(),
            Kind::Mouse | Kind::Tablet => BUTTONS.to_vec(),
        }
    }

    /// The `EV_REL` axes of the device.
    pub fn rel_axes(self) -> &'static [u16] {
        match self {
            Kind::Mouse => &[REL_X, REL_Y, REL_WHEEL],
            Kind::Keyboard | Kind::Tablet => &[],
        }
    }

    /// The `EV_ABS` axes of the device, each 0 ..= [`ABS_MAX`].
    pub fn abs_axes(self) -> &'static [u16] {
        match self {
            Kind::Tablet => &[ABS_X, ABS_Y],
            Kind::Keyboard | Kind::Mouse => &[],
        }
    }

    /// The `INPUT_PROP_*` bits of the device (a tablet is a pointer, not a touchscreen).
    pub fn props(self) -> &'static [u16] {
        match self {
            Kind::Tablet => &[INPUT_PROP_POINTER],
            Kind::Keyboard | Kind::Mouse => &[],
        }
    }

    /// The device's identity, `struct input_id`: bus type (`BUS_VIRTUAL`), vendor, product
    /// (one per kind), version.
    pub fn input_id(self) -> [u16; 4] {
        [BUS_VIRTUAL, 0x5653, u16::from(self.number()), 1]
    }

    /// Whether the device has this capability and the value is in range; `Err` says why not.
    pub fn allows(self, ev: &Event) -> Result<(), NotAllowed> {
        let ok = match (self, ev.type_) {
            (_, EV_KEY) => {
                let known = match self {
                    Kind::Keyboard => keymap::is_keyboard_key(ev.code),
                    Kind::Mouse | Kind::Tablet => BUTTONS.contains(&ev.code),
                };
                if !known {
                    return Err(NotAllowed::Key(ev.code, self));
                }
                // 2 is autorepeat, which only keyboards have.
                (0..=1).contains(&ev.value) || (self == Kind::Keyboard && ev.value == 2)
            }
            (Kind::Mouse, EV_REL) => {
                if !self.rel_axes().contains(&ev.code) {
                    return Err(NotAllowed::RelativeAxis(ev.code));
                }
                (REL_MIN..=REL_MAX).contains(&ev.value)
            }
            (Kind::Tablet, EV_ABS) => {
                if !self.abs_axes().contains(&ev.code) {
                    return Err(NotAllowed::AbsoluteAxis(ev.code));
                }
                (0..=ABS_MAX).contains(&ev.value)
            }
            (_, EV_SYN) => return Err(NotAllowed::Syn),
            (k, t) => return Err(NotAllowed::Type(t, k)),
        };
        if ok {
            Ok(())
        } else {
            Err(NotAllowed::Value(*ev))
        }
    }
}

/// Why a device kind refuses an event ([`Kind::allows`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    /// A key or button the device does not have.
    #[error("key code {0} is not a key of the {1}")]
    Key(u16, Kind),
    /// A relative axis other than the mouse's.
    #[error("relative axis {0} is not an axis of the mouse")]
    RelativeAxis(u16),
    /// An absolute axis other than the tablet's.
    #[error("absolute axis {0} is not an axis of the tablet")]
    AbsoluteAxis(u16),
    /// A SYN event: batches end with an implicit one.
    #[error("EV_SYN inside a batch (each batch ends with an implicit SYN_REPORT)")]
    Syn,
    /// An event type the device does not take.
    #[error("event type {0} is not supported by the {1}")]
    Type(u16, Kind),
    /// A value out of the capability's range.
    #[error("value {value} out of range for {0}", value = .0.value)]
    Value(Event),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One input event, as in `struct input_event` without the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event {
    /// `EV_*`.
    pub type_: u16,
    /// Key, axis or button code.
    pub code: u16,
    /// 0/1/2 for keys (release, press, repeat), the motion or the position for axes.
    pub value: i32,
}

impl Event {
    /// An event.
    pub const fn new(type_: u16, code: u16, value: i32) -> Event {
        Event { type_, code, value }
    }

    /// A key or button event.
    pub const fn key(code: u16, pressed: bool) -> Event {
        Event::new(EV_KEY, code, pressed as i32)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = match self.type_ {
            EV_SYN => "EV_SYN",
            EV_KEY => "EV_KEY",
            EV_REL => "EV_REL",
            EV_ABS => "EV_ABS",
            EV_MSC => "EV_MSC",
            _ => {
                return write!(
                    f,
                    "type {} code {} value {}",
                    self.type_, self.code, self.value
                )
            }
        };
        write!(f, "{t} code {} value {}", self.code, self.value)
    }
}

/// A message on a `hid` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Host to guest: one report. `flags`: [`FLAG_ACK`], [`FLAG_PROBE`].
    Batch {
        /// Chosen by the host, echoed in the `Ack`.
        seq: u32,
        /// Flags.
        flags: u8,
        /// 1 ..= [`MAX_EVENTS`] events, no `EV_SYN`.
        events: Vec<Event>,
    },
    /// Guest to host, first message: the device exists.
    Ready {
        /// Protocol version ([`VERSION`]).
        version: u8,
        /// The device kind.
        kind: Kind,
        /// The evdev node in /dev/input (`event3`), empty if unknown.
        node: String,
    },
    /// Guest to host: the batch `seq` was written (and with [`FLAG_SEEN`], read back).
    Ack {
        /// The batch's `seq`.
        seq: u32,
        /// Flags.
        flags: u8,
    },
}

impl record::Message for Message {
    const LAYOUT: Layout = Layout::ShortWithFlags;
    const MAX_PAYLOAD: usize = MAX_PAYLOAD;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(k: u8) -> Result<Limit, RecordError> {
        Ok(match k {
            kind::BATCH => Limit::range("batch", 4 + EVENT_LEN, MAX_PAYLOAD),
            kind::READY => Limit::range("ready", 2, 2 + MAX_NODE),
            kind::ACK => Limit::exactly("ack", 4),
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn decode(kind_byte: u8, flags: u8, p: Bytes) -> Result<Message, RecordError> {
        let seq = |p: &[u8]| -> Result<u32, RecordError> {
            let b = p.get(..4).ok_or(RecordError::Malformed {
                kind: "message",
                what: "no sequence number",
            })?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind_byte {
            kind::BATCH => {
                if flags & !(FLAG_ACK | FLAG_PROBE) != 0 {
                    return Err(RecordError::BadFlags {
                        kind: "batch",
                        flags,
                    });
                }
                let seq = seq(&p)?;
                let events = p[4..].chunks_exact(EVENT_LEN);
                if !events.remainder().is_empty() || events.len() == 0 {
                    return Err(RecordError::Malformed {
                        kind: "batch",
                        what: "not 4 + 8 * N bytes with N from 1 to 64",
                    });
                }
                let events = events
                    .map(|c| Event {
                        type_: u16::from_le_bytes([c[0], c[1]]),
                        code: u16::from_le_bytes([c[2], c[3]]),
                        value: i32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    })
                    .collect();
                Ok(Message::Batch { seq, flags, events })
            }
            kind::READY => {
                if flags != 0 {
                    return Err(RecordError::BadFlags {
                        kind: "ready",
                        flags,
                    });
                }
                let malformed = |what| RecordError::Malformed {
                    kind: "ready",
                    what,
                };
                let [version, k] = p
                    .get(..2)
                    .and_then(|h| <[u8; 2]>::try_from(h).ok())
                    .ok_or(malformed("too short"))?;
                let node = &p[2..];
                let k = Kind::from_number(k).ok_or(malformed("unknown device kind"))?;
                if !node.iter().all(u8::is_ascii_alphanumeric) {
                    return Err(malformed("the node name is not ASCII letters and digits"));
                }
                Ok(Message::Ready {
                    version,
                    kind: k,
                    // Checked ASCII above.
                    node: String::from_utf8_lossy(node).into_owned(),
                })
            }
            kind::ACK => {
                if flags & !FLAG_SEEN != 0 {
                    return Err(RecordError::BadFlags { kind: "ack", flags });
                }
                Ok(Message::Ack {
                    seq: u32::from_le_bytes(record::fixed("ack", &p)?),
                    flags,
                })
            }
            other => Err(RecordError::UnknownType(other)),
        }
    }

    /// Fails for a batch of 0 or more than [`MAX_EVENTS`] events, or a node name longer than
    /// [`MAX_NODE`].
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let (kind, flags) = match self {
            Message::Batch { flags, .. } => (kind::BATCH, *flags),
            Message::Ready { .. } => (kind::READY, 0),
            Message::Ack { flags, .. } => (kind::ACK, *flags),
        };
        let mut payload = Vec::with_capacity(MAX_PAYLOAD);
        match self {
            Message::Batch { seq, events, .. } => {
                payload.extend_from_slice(&seq.to_le_bytes());
                // A batch over MAX_EVENTS is refused by the length check in `put`.
                for e in events.iter().take(MAX_EVENTS + 1) {
                    payload.extend_from_slice(&e.type_.to_le_bytes());
                    payload.extend_from_slice(&e.code.to_le_bytes());
                    payload.extend_from_slice(&e.value.to_le_bytes());
                }
            }
            Message::Ready {
                version,
                kind: k,
                node,
            } => {
                payload.push(*version);
                payload.push(k.number());
                payload.extend_from_slice(node.as_bytes());
            }
            Message::Ack { seq, .. } => payload.extend_from_slice(&seq.to_le_bytes()),
        }
        record::put::<Message>(out, kind, flags, &payload)
    }
}

/// The decoder of a `hid` channel (both directions).
pub type Decoder = record::Decoder<Message>;
