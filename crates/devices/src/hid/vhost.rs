//! The guest's virtio-input devices, served over vhost-user (vstreamd transports of kind
//! `hid-vhost-user`, one per keyboard, mouse or tablet): the guest kernel's own `virtio_input`
//! driver is the peer, so `vstreamctl input` reaches a guest with no agent at all.
//!
//! Each device has exactly the capabilities of its [`Kind`] (the same keys, axes and properties
//! as the agent's uinput devices), plus the keyboard's three LEDs, which the guest sets through
//! the status queue. Reports come in through an [`Injector`] (a [`Sink`], so the hid protocol
//! is served by the same code as in the agent, [`super::guest::serve_stream`]) and wait in a
//! bounded queue until the driver has buffers for them:
//! - eventq (0, device -> driver): one 8-byte `virtio_input_event` per buffer, each report
//!   followed by its `SYN_REPORT`, in order;
//! - statusq (1, driver -> device): LED changes, recorded in the device's status.
//!
//! Configuration space (virtio 1.2, 5.8.4): the driver writes `select` and `subsel`, then reads
//! `size` and the answer. Nothing the guest writes there is trusted: unknown selects answer
//! size 0.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use rustix::event::{eventfd, EventfdFlags};
use vstream_vhost::{Device, Event as VhostEvent, Vq};

use super::codes::*;
use super::guest::{Sink, PROBE_TIMEOUT};
use super::{Event, Kind, ABS_MAX, EVENT_LEN, MAX_EVENTS};

/// Events (`SYN_REPORT`s included) that may wait for the driver's buffers: 64 full reports. A
/// report that does not fit is refused whole, with the reason.
pub const MAX_QUEUED: usize = 64 * (MAX_EVENTS + 1);

/// The queues.
const EVENTQ: usize = 0;
const STATUSQ: usize = 1;

/// `virtio_input_config_select`.
mod select {
    pub const ID_NAME: u8 = 0x01;
    pub const ID_SERIAL: u8 = 0x02;
    pub const ID_DEVIDS: u8 = 0x03;
    pub const PROP_BITS: u8 = 0x10;
    pub const EV_BITS: u8 = 0x11;
    pub const ABS_INFO: u8 = 0x12;
}

/// Bytes of `struct virtio_input_config`: select, subsel, size, 5 reserved, a 128-byte union.
pub const CONFIG_LEN: usize = 8 + 128;

/// The keyboard's LEDs (the guest's Num, Caps and Scroll Lock state).
const LEDS: [u16; 3] = [LED_NUML, LED_CAPSL, LED_SCROLLL];

/// What the device and its injectors share.
struct Shared {
    kind: Kind,
    state: Mutex<State>,
    /// Signalled when reports reach the driver (probes wait for theirs).
    delivered: Condvar,
    /// Readable when reports were queued: the device's own descriptor in the vhost-user loop.
    wake: OwnedFd,
}

#[derive(Default)]
struct State {
    queued: VecDeque<Event>,
    /// Reports queued, and done with (delivered, or dropped by a reset), since the start: a
    /// probe waits for its number.
    reports_queued: u64,
    reports_done: u64,
    /// The last report number a reset dropped (or delivered just before it).
    dropped_through: u64,
    reports_delivered: u64,
    events_delivered: u64,
    /// Reports refused because the queue was full.
    refused: u64,
    /// Malformed chains from the driver (returned empty).
    bad_chains: u64,
    /// LED state the guest set (bit n: LED n).
    leds: u16,
    status_events: u64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The virtio-input device of one guest and kind.
pub struct InputDevice {
    shared: Arc<Shared>,
    /// The driver's `select` and `subsel`.
    select: u8,
    subsel: u8,
}

/// Puts reports into an [`InputDevice`]; cheap to clone.
#[derive(Clone)]
pub struct Injector {
    shared: Arc<Shared>,
}

impl InputDevice {
    /// A device of `kind` and the injector that feeds it.
    pub fn new(kind: Kind) -> io::Result<(InputDevice, Injector)> {
        let wake = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        let shared = Arc::new(Shared {
            kind,
            state: Mutex::new(State::default()),
            delivered: Condvar::new(),
            wake,
        });
        let device = InputDevice {
            shared: shared.clone(),
            select: 0,
            subsel: 0,
        };
        Ok((device, Injector { shared }))
    }

    /// The answer to the current `select`/`subsel`: its bytes (at most 128).
    fn answer(&self) -> Vec<u8> {
        let kind = self.shared.kind;
        match (self.select, self.subsel) {
            (select::ID_NAME, 0) => kind.device_name().as_bytes().to_vec(),
            (select::ID_SERIAL, 0) => format!("vstream-{}", kind.name()).into_bytes(),
            (select::ID_DEVIDS, 0) => kind
                .input_id()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            (select::PROP_BITS, 0) => bitmap(kind.props()),
            (select::EV_BITS, t) => match u16::from(t) {
                EV_KEY => bitmap(&kind.keys()),
                EV_REL => bitmap(kind.rel_axes()),
                EV_ABS => bitmap(kind.abs_axes()),
                EV_LED if kind == Kind::Keyboard => bitmap(&LEDS),
                _ => Vec::new(),
            },
            (select::ABS_INFO, axis) if kind.abs_axes().contains(&u16::from(axis)) => {
                // min, max, fuzz, flat, res
                [0, ABS_MAX, 0, 0, 0]
                    .iter()
                    .flat_map(|v: &i32| v.to_le_bytes())
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Hands queued events to the driver's eventq buffers, in order, while it has buffers.
    fn deliver(&self, q: &mut Vq<'_>) {
        let mut st = self.shared.state();
        let before = st.reports_done;
        while let Some(ev) = st.queued.front().copied() {
            let chain = match q.pop() {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    st.bad_chains += 1;
                    tracing::warn!(kind = %self.shared.kind, "virtio-input: bad eventq buffer dropped: {e}");
                    continue;
                }
            };
            if chain.writable_len() < EVENT_LEN as u64 {
                st.bad_chains += 1;
                tracing::debug!(kind = %self.shared.kind, "virtio-input: an eventq buffer too small for an event; returned");
                q.add_used(chain.head, 0);
                continue;
            }
            let bytes = encode(&ev);
            let written = chain.write(q.mem(), &[&bytes]).unwrap_or(0);
            q.add_used(chain.head, written);
            if written as usize != EVENT_LEN {
                // Guest memory changed under us: the event is tried again in the next buffer.
                st.bad_chains += 1;
                continue;
            }
            st.queued.pop_front();
            st.events_delivered += 1;
            if ev.type_ == EV_SYN && ev.code == SYN_REPORT {
                st.reports_delivered += 1;
                st.reports_done += 1;
            }
        }
        if st.reports_done != before {
            self.shared.delivered.notify_all();
        }
    }

    /// Takes the driver's status events (LEDs); every buffer goes back empty.
    fn status(&self, q: &mut Vq<'_>) {
        while let Some(chain) = q.pop() {
            let mut st = self.shared.state();
            let chain = match chain {
                Ok(c) => c,
                Err(e) => {
                    st.bad_chains += 1;
                    tracing::warn!(kind = %self.shared.kind, "virtio-input: bad statusq buffer dropped: {e}");
                    continue;
                }
            };
            match chain.read_all(q.mem(), EVENT_LEN) {
                Ok(b) if b.len() == EVENT_LEN => {
                    let ev = Event::new(
                        u16::from_le_bytes([b[0], b[1]]),
                        u16::from_le_bytes([b[2], b[3]]),
                        i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                    );
                    st.status_events += 1;
                    if ev.type_ == EV_LED
                        && self.shared.kind == Kind::Keyboard
                        && LEDS.contains(&ev.code)
                    {
                        if ev.value != 0 {
                            st.leds |= 1 << ev.code;
                        } else {
                            st.leds &= !(1 << ev.code);
                        }
                    } else {
                        tracing::debug!(kind = %self.shared.kind, "virtio-input: status event {ev} ignored");
                    }
                }
                Ok(_) | Err(_) => {
                    st.bad_chains += 1;
                    tracing::debug!(kind = %self.shared.kind, "virtio-input: a status buffer that is not one event; returned");
                }
            }
            q.add_used(chain.head, 0);
        }
    }
}

/// A `virtio_input_event`: le16 type, le16 code, le32 value.
fn encode(ev: &Event) -> [u8; EVENT_LEN] {
    let mut b = [0; EVENT_LEN];
    b[..2].copy_from_slice(&ev.type_.to_le_bytes());
    b[2..4].copy_from_slice(&ev.code.to_le_bytes());
    b[4..].copy_from_slice(&ev.value.to_le_bytes());
    b
}

/// A bitmap of `bits`, as long as its highest set byte (codes beyond the 128-byte union are
/// not representable and left out; the hid kinds have none).
fn bitmap(bits: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in bits {
        let byte = usize::from(b / 8);
        if byte >= 128 {
            continue;
        }
        if out.len() <= byte {
            out.resize(byte + 1, 0);
        }
        out[byte] |= 1 << (b % 8);
    }
    out
}

impl Device for InputDevice {
    fn num_queues(&self) -> usize {
        2
    }

    fn config(&self) -> Vec<u8> {
        let answer = self.answer();
        let mut c = vec![0; CONFIG_LEN];
        c[0] = self.select;
        c[1] = self.subsel;
        // At most 128 by construction.
        c[2] = answer.len().min(128) as u8;
        let n = answer.len().min(128);
        c[8..8 + n].copy_from_slice(&answer[..n]);
        c
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) {
        // Only select (byte 0) and subsel (byte 1) are the driver's to write.
        for (i, b) in data.iter().enumerate() {
            match u64::from(offset) + i as u64 {
                0 => self.select = *b,
                1 => self.subsel = *b,
                _ => break,
            }
        }
    }

    fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.shared.wake.as_fd())
    }

    fn reset(&mut self) {
        self.select = 0;
        self.subsel = 0;
        // Nothing queued survives the driver it was meant for; probes waiting for it learn
        // that it was not delivered.
        let mut st = self.shared.state();
        st.queued.clear();
        st.reports_done = st.reports_queued;
        st.dropped_through = st.reports_queued;
        st.leds = 0;
        drop(st);
        self.shared.delivered.notify_all();
    }

    fn handle(&mut self, event: VhostEvent, queues: &mut [Vq<'_>]) {
        if event == VhostEvent::Backend {
            // Drained, or the level-triggered eventfd would wake the worker again and again.
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&self.shared.wake, &mut counter);
        }
        if let Some(q) = queues.get_mut(STATUSQ) {
            self.status(q);
        }
        if let Some(q) = queues.get_mut(EVENTQ) {
            self.deliver(q);
        }
    }
}

impl Injector {
    /// The device's kind.
    pub fn kind(&self) -> Kind {
        self.shared.kind
    }

    /// Counters and LED state, for `vstreamctl status`.
    pub fn status(&self) -> InputStatus {
        let st = self.shared.state();
        let leds: Vec<&str> = LEDS
            .iter()
            .zip(["num", "caps", "scroll"])
            .filter(|(l, _)| st.leds & (1 << **l) != 0)
            .map(|(_, n)| n)
            .collect();
        InputStatus {
            queued: st.queued.len(),
            reports_delivered: st.reports_delivered,
            events_delivered: st.events_delivered,
            refused: st.refused,
            bad_chains: st.bad_chains,
            status_events: st.status_events,
            leds: leds.into_iter().map(str::to_owned).collect(),
        }
    }
}

/// One virtio-input device's status (`devices.hid.virtio_input.KIND` in `vstreamctl status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputStatus {
    /// Events waiting for the driver's buffers.
    pub queued: usize,
    /// Reports the driver took.
    pub reports_delivered: u64,
    /// Events the driver took.
    pub events_delivered: u64,
    /// Reports refused (the queue was full).
    pub refused: u64,
    /// Buffers returned empty because they were bad.
    pub bad_chains: u64,
    /// Events the driver sent (LEDs).
    pub status_events: u64,
    /// The LEDs the driver has on (`num`, `caps`, `scroll`).
    pub leds: Vec<String>,
}

impl Sink for Injector {
    /// Queues the report and its `SYN_REPORT` for the driver. With `probe`, waits (at most
    /// [`PROBE_TIMEOUT`]) until the driver has taken it: `true` if it did.
    fn emit(&mut self, events: &[Event], probe: bool) -> io::Result<bool> {
        let mut st = self.shared.state();
        if st.queued.len() + events.len() + 1 > MAX_QUEUED {
            st.refused += 1;
            return Err(io::Error::other(format!(
                "the guest's virtio-input {} is not taking events ({} queued, at most {MAX_QUEUED}): report refused",
                self.shared.kind,
                st.queued.len()
            )));
        }
        st.queued.extend(events.iter().copied());
        st.queued.push_back(Event::new(EV_SYN, SYN_REPORT, 0));
        st.reports_queued += 1;
        let mine = st.reports_queued;
        rustix::io::write(&self.shared.wake, &1u64.to_ne_bytes())?;
        if !probe {
            return Ok(false);
        }
        let deadline = Instant::now() + PROBE_TIMEOUT;
        while st.reports_done < mine {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            st = self
                .shared
                .delivered
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(mine > st.dropped_through)
    }

    fn node(&self) -> String {
        // The guest names it; the host cannot know.
        String::new()
    }
}
