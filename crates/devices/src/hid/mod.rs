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
//! implementation: the messages and a sans-io [`Decoder`] whose buffer is bounded by one
//! message ([`HEADER_LEN`] + [`MAX_PAYLOAD`]).
//!
//! Message: `u8 type`, `u8 flags`, `u16 length` (little-endian), `length` bytes of payload.

pub mod device;
pub mod forward;
pub mod guest;
pub mod host;
pub mod keymap;
#[cfg(test)]
mod tests;
pub mod verbs;

use std::fmt;

/// The device class.
pub const CLASS: &str = "hid";

/// Version carried by `Ready`.
pub const VERSION: u8 = 1;

/// Bytes of a message header: type, flags, length.
pub const HEADER_LEN: usize = 4;

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

    /// Whether the device has this capability and the value is in range; `Err` says why not.
    pub fn allows(self, ev: &Event) -> Result<(), String> {
        let ok = match (self, ev.type_) {
            (_, EV_KEY) => {
                let known = match self {
                    Kind::Keyboard => keymap::is_keyboard_key(ev.code),
                    Kind::Mouse | Kind::Tablet => BUTTONS.contains(&ev.code),
                };
                if !known {
                    return Err(format!(
                        "key code {} is not a key of the {}",
                        ev.code,
                        self.name()
                    ));
                }
                // 2 is autorepeat, which only keyboards have.
                (0..=1).contains(&ev.value) || (self == Kind::Keyboard && ev.value == 2)
            }
            (Kind::Mouse, EV_REL) => {
                if ![REL_X, REL_Y, REL_WHEEL].contains(&ev.code) {
                    return Err(format!(
                        "relative axis {} is not an axis of the mouse",
                        ev.code
                    ));
                }
                (REL_MIN..=REL_MAX).contains(&ev.value)
            }
            (Kind::Tablet, EV_ABS) => {
                if ![ABS_X, ABS_Y].contains(&ev.code) {
                    return Err(format!(
                        "absolute axis {} is not an axis of the tablet",
                        ev.code
                    ));
                }
                (0..=ABS_MAX).contains(&ev.value)
            }
            (_, EV_SYN) => {
                return Err(
                    "EV_SYN inside a batch (each batch ends with an implicit SYN_REPORT)".into(),
                )
            }
            (k, t) => {
                return Err(format!(
                    "event type {t} is not supported by the {}",
                    k.name()
                ))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!("value {} out of range for {ev}", ev.value))
        }
    }
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

/// Why bytes are not a valid message stream, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A type byte that is not a message.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// A payload of the wrong size for its type.
    #[error("{kind} message with a {len}-byte payload: {what}")]
    BadLength {
        /// Message type.
        kind: &'static str,
        /// Length found.
        len: usize,
        /// What was expected.
        what: &'static str,
    },
    /// Flags this message type does not define.
    #[error("{kind} message with unknown flags 0x{flags:02x}")]
    BadFlags {
        /// Message type.
        kind: &'static str,
        /// The flags.
        flags: u8,
    },
    /// A field with an impossible value.
    #[error("malformed {kind} message: {what}")]
    Malformed {
        /// Message type.
        kind: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The stream ended in the middle of a message.
    #[error("the stream ended inside a message ({0} bytes of it received)")]
    Truncated(usize),
}

impl Message {
    /// Appends the encoded message to `out`. Fails for a batch of 0 or more than
    /// [`MAX_EVENTS`] events, or a node name longer than [`MAX_NODE`].
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let (kind, flags) = match self {
            Message::Batch { flags, .. } => (kind::BATCH, *flags),
            Message::Ready { .. } => (kind::READY, 0),
            Message::Ack { flags, .. } => (kind::ACK, *flags),
        };
        let mut payload = Vec::with_capacity(MAX_PAYLOAD);
        match self {
            Message::Batch { seq, events, .. } => {
                if events.is_empty() || events.len() > MAX_EVENTS {
                    return Err(CodecError::BadLength {
                        kind: "batch",
                        len: 4 + events.len() * EVENT_LEN,
                        what: "a batch has 1 to 64 events",
                    });
                }
                payload.extend_from_slice(&seq.to_le_bytes());
                for e in events {
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
                if node.len() > MAX_NODE {
                    return Err(CodecError::BadLength {
                        kind: "ready",
                        len: 2 + node.len(),
                        what: "the node name has at most 32 bytes",
                    });
                }
                payload.push(*version);
                payload.push(k.number());
                payload.extend_from_slice(node.as_bytes());
            }
            Message::Ack { seq, .. } => payload.extend_from_slice(&seq.to_le_bytes()),
        }
        out.push(kind);
        out.push(flags);
        // Bounded by MAX_PAYLOAD (< 65536) above.
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(())
    }

    /// The encoded message.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    fn decode(kind_byte: u8, flags: u8, p: &[u8]) -> Result<Message, CodecError> {
        let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        match kind_byte {
            kind::BATCH => {
                if flags & !(FLAG_ACK | FLAG_PROBE) != 0 {
                    return Err(CodecError::BadFlags {
                        kind: "batch",
                        flags,
                    });
                }
                if p.len() < 4 + EVENT_LEN
                    || p.len() > MAX_PAYLOAD
                    || !p[4..].chunks_exact(EVENT_LEN).remainder().is_empty()
                {
                    return Err(CodecError::BadLength {
                        kind: "batch",
                        len: p.len(),
                        what: "4 + 8 * N bytes with N from 1 to 64",
                    });
                }
                let events = p[4..]
                    .chunks_exact(EVENT_LEN)
                    .map(|c| Event {
                        type_: u16::from_le_bytes([c[0], c[1]]),
                        code: u16::from_le_bytes([c[2], c[3]]),
                        value: i32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    })
                    .collect();
                Ok(Message::Batch {
                    seq: u32_at(0),
                    flags,
                    events,
                })
            }
            kind::READY => {
                if flags != 0 {
                    return Err(CodecError::BadFlags {
                        kind: "ready",
                        flags,
                    });
                }
                if p.len() < 2 || p.len() > 2 + MAX_NODE {
                    return Err(CodecError::BadLength {
                        kind: "ready",
                        len: p.len(),
                        what: "2 to 34 bytes",
                    });
                }
                let k = Kind::from_number(p[1]).ok_or_else(|| CodecError::Malformed {
                    kind: "ready",
                    what: format!("unknown device kind {}", p[1]),
                })?;
                let node = &p[2..];
                if !node.iter().all(u8::is_ascii_alphanumeric) {
                    return Err(CodecError::Malformed {
                        kind: "ready",
                        what: "the node name is not ASCII letters and digits".into(),
                    });
                }
                Ok(Message::Ready {
                    version: p[0],
                    kind: k,
                    // Checked ASCII above.
                    node: String::from_utf8_lossy(node).into_owned(),
                })
            }
            kind::ACK => {
                if flags & !FLAG_SEEN != 0 {
                    return Err(CodecError::BadFlags { kind: "ack", flags });
                }
                if p.len() != 4 {
                    return Err(CodecError::BadLength {
                        kind: "ack",
                        len: p.len(),
                        what: "exactly 4 bytes",
                    });
                }
                Ok(Message::Ack {
                    seq: u32_at(0),
                    flags,
                })
            }
            other => Err(CodecError::UnknownType(other)),
        }
    }
}

/// Sans-io decoder: bytes in ([`Decoder::push`]), messages out ([`Decoder::next_message`]).
/// It never holds more than one message's worth of bytes beyond what was pushed; a bad header
/// is an error at once, before its payload arrives.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds received bytes. Callers push at most what they read in one call (a bounded
    /// buffer) and drain with [`Decoder::next_message`] before the next push.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, `None` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, CodecError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let (k, flags) = (self.buf[0], self.buf[1]);
        let len = usize::from(u16::from_le_bytes([self.buf[2], self.buf[3]]));
        if !matches!(k, kind::BATCH | kind::READY | kind::ACK) {
            return Err(CodecError::UnknownType(k));
        }
        if len > MAX_PAYLOAD {
            return Err(CodecError::BadLength {
                kind: "any",
                len,
                what: "longer than the largest message (516 bytes)",
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = Message::decode(k, flags, &self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        msg.map(Some)
    }

    /// Call at end of stream: an error if a message was cut.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Truncated(self.buf.len()))
        }
    }

    /// Bytes held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
