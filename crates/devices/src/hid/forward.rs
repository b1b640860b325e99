//! `vstreamctl input GUEST --forward /dev/input/eventN [--grab]`: a host evdev device's events,
//! report by report, into the guest's devices.
//!
//! [`Router`] (sans-io) decides where each event goes: keys of the [`super::keymap`] to the
//! keyboard, `REL_X`/`REL_Y`/`REL_WHEEL` and the buttons of a relative device to the mouse,
//! `ABS_X`/`ABS_Y` (scaled from the source's range to 0..=[`ABS_MAX`]) and the buttons (and
//! `BTN_TOUCH`, as `BTN_LEFT`) of an absolute device to the tablet. Everything else (scan codes,
//! LEDs, other axes and keys) is counted and dropped. At each `SYN_REPORT` the events collected
//! for each guest device go out as one batch, so the guest sees the same report boundaries
//! (a report with more than [`MAX_EVENTS`] events for one device is split, and counted).
//! Lost events (`SYN_DROPPED`) are resynchronised by the evdev crate, which replays the state
//! changes it missed.
//!
//! [`forward`] drives it: it opens the device, waits until no key is held (so that grabbing
//! does not leave the Enter that started the command pressed on the host), grabs it if asked,
//! then forwards until the device goes away, a channel fails or `stop` resolves.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codes::*;
use super::{
    keymap, Decoder, Event, Kind, Message, ABS_MAX, BUTTONS, MAX_EVENTS, REL_MAX, REL_MIN,
};
use crate::record::Message as _;

/// A source axis range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbsRange {
    /// Smallest value.
    pub min: i32,
    /// Largest value.
    pub max: i32,
}

impl AbsRange {
    /// Maps `v` from this range to 0..=[`ABS_MAX`].
    pub fn scale(&self, v: i32) -> i32 {
        let span = i64::from(self.max) - i64::from(self.min);
        if span <= 0 {
            return 0;
        }
        let off = (i64::from(v) - i64::from(self.min)).clamp(0, span);
        // In 0..=ABS_MAX: off <= span.
        ((off * i64::from(ABS_MAX) + span / 2) / span) as i32
    }
}

/// What a source device can produce, as far as forwarding cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceCaps {
    /// It has keys of the guest keyboard.
    pub keyboard: bool,
    /// It has mouse buttons.
    pub buttons: bool,
    /// It has `BTN_TOUCH`.
    pub touch: bool,
    /// It has `REL_X` or `REL_Y` or `REL_WHEEL`.
    pub rel: bool,
    /// Its `ABS_X` and `ABS_Y` ranges, if it has both.
    pub abs: Option<(AbsRange, AbsRange)>,
}

impl SourceCaps {
    /// Reads the capabilities of an evdev device.
    pub fn of(dev: &evdev::Device) -> io::Result<SourceCaps> {
        let mut caps = SourceCaps::default();
        if let Some(keys) = dev.supported_keys() {
            for k in keys.iter() {
                if keymap::is_keyboard_key(k.0) {
                    caps.keyboard = true;
                }
                if BUTTONS.contains(&k.0) {
                    caps.buttons = true;
                }
                if k.0 == BTN_TOUCH {
                    caps.touch = true;
                }
            }
        }
        if let Some(rel) = dev.supported_relative_axes() {
            caps.rel = rel.iter().any(|a| [REL_X, REL_Y, REL_WHEEL].contains(&a.0));
        }
        let mut x = None;
        let mut y = None;
        if dev.supported_absolute_axes().is_some() {
            for (axis, info) in dev.get_absinfo()? {
                let r = AbsRange {
                    min: info.minimum(),
                    max: info.maximum(),
                };
                match axis.0 {
                    ABS_X => x = Some(r),
                    ABS_Y => y = Some(r),
                    _ => {}
                }
            }
        }
        caps.abs = x.zip(y);
        Ok(caps)
    }

    /// An absolute pointer (its buttons go to the tablet).
    fn absolute(&self) -> bool {
        self.abs.is_some() && !self.rel
    }

    /// The guest devices this source feeds.
    pub fn kinds(&self) -> Vec<Kind> {
        let mut out = Vec::new();
        if self.keyboard {
            out.push(Kind::Keyboard);
        }
        if self.rel || (self.buttons && !self.absolute()) {
            out.push(Kind::Mouse);
        }
        if self.absolute() {
            out.push(Kind::Tablet);
        }
        out
    }
}

/// Counters of a forwarding session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForwardStats {
    /// Events sent to the guest.
    pub events: u64,
    /// Batches sent.
    pub batches: u64,
    /// Source events that no guest device has (dropped).
    pub dropped: u64,
    /// Reports split because they had more than 64 events for one device.
    pub split: u64,
}

/// The sans-io router: evdev events in, per-device batches out.
#[derive(Debug)]
pub struct Router {
    caps: SourceCaps,
    pending: BTreeMap<Kind, Vec<Event>>,
    /// Counters.
    pub stats: ForwardStats,
}

impl Router {
    /// A router for a source with `caps`.
    pub fn new(caps: SourceCaps) -> Router {
        Router {
            caps,
            pending: BTreeMap::new(),
            stats: ForwardStats::default(),
        }
    }

    /// Where `ev` goes and as what, or `None` to drop it.
    pub fn route(&self, ev: Event) -> Option<(Kind, Event)> {
        let pointer = if self.caps.absolute() {
            Kind::Tablet
        } else {
            Kind::Mouse
        };
        match ev.type_ {
            EV_KEY if keymap::is_keyboard_key(ev.code) => {
                (0..=2).contains(&ev.value).then_some((Kind::Keyboard, ev))
            }
            EV_KEY if BUTTONS.contains(&ev.code) => {
                (0..=1).contains(&ev.value).then_some((pointer, ev))
            }
            EV_KEY if ev.code == BTN_TOUCH && self.caps.absolute() && !self.caps.buttons => (0..=1)
                .contains(&ev.value)
                .then_some((Kind::Tablet, Event::new(EV_KEY, BTN_LEFT, ev.value))),
            EV_REL if [REL_X, REL_Y, REL_WHEEL].contains(&ev.code) => Some((
                Kind::Mouse,
                Event::new(EV_REL, ev.code, ev.value.clamp(REL_MIN, REL_MAX)),
            )),
            EV_ABS if ev.code == ABS_X || ev.code == ABS_Y => {
                let (rx, ry) = self.caps.abs?;
                if !self.caps.absolute() {
                    return None;
                }
                let r = if ev.code == ABS_X { rx } else { ry };
                Some((Kind::Tablet, Event::new(EV_ABS, ev.code, r.scale(ev.value))))
            }
            _ => None,
        }
    }

    /// Takes one source event; at a `SYN_REPORT`, returns the batches to send, in device order.
    pub fn push(&mut self, ev: Event) -> Vec<(Kind, Vec<Event>)> {
        if ev.type_ == EV_SYN {
            match ev.code {
                SYN_REPORT => return self.flush(),
                SYN_DROPPED => {
                    // The rest of this report is unreliable; the evdev crate resynchronises.
                    self.pending.clear();
                }
                _ => {}
            }
            return Vec::new();
        }
        match self.route(ev) {
            Some((kind, e)) => self.pending.entry(kind).or_default().push(e),
            None => self.stats.dropped += 1,
        }
        Vec::new()
    }

    fn flush(&mut self) -> Vec<(Kind, Vec<Event>)> {
        let mut out = Vec::new();
        for (kind, events) in std::mem::take(&mut self.pending) {
            if events.is_empty() {
                continue;
            }
            if events.len() > MAX_EVENTS {
                self.stats.split += 1;
            }
            for chunk in events.chunks(MAX_EVENTS) {
                self.stats.events += chunk.len() as u64;
                self.stats.batches += 1;
                out.push((kind, chunk.to_vec()));
            }
        }
        out
    }
}

/// How to forward.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Take the device exclusively (the host no longer sees its events).
    pub grab: bool,
    /// How long to wait for held keys to be released before grabbing.
    pub release_wait: Duration,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            grab: false,
            release_wait: Duration::from_secs(5),
        }
    }
}

/// Reads a channel until it ends; returns why (the guest never sends anything but `Ready`
/// here, so any end is the end of forwarding).
async fn watch<R: AsyncRead + Unpin>(kind: Kind, mut r: R) -> String {
    let mut dec = Decoder::new();
    let mut buf = [0u8; 512];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return format!("the guest closed the {kind} channel"),
            Ok(n) => {
                if let Err(e) = dec.push(&buf[..n]) {
                    return format!("{kind} channel: {e}");
                }
                loop {
                    match dec.next_message() {
                        Ok(Some(Message::Ready { node, .. })) => {
                            tracing::info!(%kind, %node, "guest device ready");
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return format!("{kind} channel: {e}"),
                    }
                }
            }
            Err(e) => return format!("{kind} channel: {e}"),
        }
    }
}

/// Forwards the evdev device at `path` until it goes away, a channel ends, or `stop`
/// resolves; `open` opens the guest channel of a kind. Returns the counters.
pub async fn forward<S, F, Fut, Stop>(
    path: &Path,
    options: &ForwardOptions,
    mut open: F,
    stop: Stop,
) -> io::Result<ForwardStats>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: FnMut(Kind) -> Fut,
    Fut: Future<Output = io::Result<S>>,
    Stop: Future<Output = ()>,
{
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut dev = evdev::Device::open(path).map_err(ctx)?;
    let caps = SourceCaps::of(&dev).map_err(ctx)?;
    let kinds = caps.kinds();
    if kinds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} ({}) has nothing to forward: no keys of the keymap, no mouse buttons, no relative or absolute pointer axes",
                path.display(),
                dev.name().unwrap_or("?")
            ),
        ));
    }
    let (end_tx, mut end_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut writers = BTreeMap::new();
    for kind in &kinds {
        let stream = open(*kind).await?;
        let (r, w) = tokio::io::split(stream);
        let tx = end_tx.clone();
        let k = *kind;
        tokio::spawn(async move {
            let why = watch(k, r).await;
            let _ = tx.send(why);
        });
        writers.insert(*kind, w);
    }
    if options.grab {
        let deadline = Instant::now() + options.release_wait;
        loop {
            let held = dev.get_key_state().map_err(ctx)?;
            if held.iter().next().is_none() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    "keys still held after {:?}; grabbing anyway",
                    options.release_wait
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        dev.grab().map_err(ctx)?;
    }
    tracing::info!(device = %path.display(), name = dev.name().unwrap_or("?"), ?kinds, grab = options.grab, "forwarding");
    let mut router = Router::new(caps);
    let mut events = dev.into_event_stream().map_err(ctx)?;
    let mut out = Vec::with_capacity(4096);
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            ev = events.next_event() => {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => break Err(io::Error::new(e.kind(), format!("{}: {e} (device gone?)", path.display()))),
                };
                let batches = router.push(Event::new(ev.event_type().0, ev.code(), ev.value()));
                let mut failed = None;
                for (kind, batch) in batches {
                    out.clear();
                    let msg = Message::Batch { seq: router.stats.batches as u32, flags: 0, events: batch };
                    if let Err(e) = msg.encode(&mut out) {
                        failed = Some(io::Error::other(e.to_string()));
                        break;
                    }
                    if let Some(w) = writers.get_mut(&kind) {
                        if let Err(e) = w.write_all(&out).await {
                            failed = Some(io::Error::new(e.kind(), format!("{kind} channel: {e}")));
                            break;
                        }
                    }
                }
                if let Some(e) = failed {
                    break Err(e);
                }
            }
            why = end_rx.recv() => {
                break Err(io::Error::new(io::ErrorKind::ConnectionAborted, why.unwrap_or_default()));
            }
            () = &mut stop => break Ok(()),
        }
    };
    for (_, mut w) in writers {
        let _ = w.shutdown().await;
    }
    // Dropping the stream closes the device, which ends a grab.
    drop(events);
    result.map(|()| router.stats)
}
