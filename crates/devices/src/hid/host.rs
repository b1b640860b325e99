//! The host half, run by vstreamctl: turns `type`, `key`, `mouse`, `tablet` and `latency`
//! requests into reports and sends them on a channel opened through vstreamd; see also
//! [`super::forward`] for `--forward`.

use std::io;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codes::*;
use super::keymap::{self, KeymapError};
use super::{
    Decoder, Event, Kind, Message, ABS_MAX, FLAG_ACK, FLAG_PROBE, FLAG_SEEN, MAX_EVENTS, REL_MAX,
    REL_MIN,
};
use crate::record::Message as _;

/// A mouse or tablet button.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Button {
    /// `BTN_LEFT`.
    Left,
    /// `BTN_RIGHT`.
    Right,
    /// `BTN_MIDDLE`.
    Middle,
}

impl Button {
    /// Its key code.
    pub fn code(self) -> u16 {
        match self {
            Button::Left => BTN_LEFT,
            Button::Right => BTN_RIGHT,
            Button::Middle => BTN_MIDDLE,
        }
    }
}

impl std::str::FromStr for Button {
    type Err = NotAButton;
    fn from_str(s: &str) -> Result<Button, NotAButton> {
        match s.to_ascii_lowercase().as_str() {
            "left" => Ok(Button::Left),
            "right" => Ok(Button::Right),
            "middle" => Ok(Button::Middle),
            _ => Err(NotAButton(s.to_owned())),
        }
    }
}

/// A mouse button name that is none of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a button (left, right or middle)")]
pub struct NotAButton(pub String);

/// What `vstreamctl input` was asked to do (other than forwarding).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Type text with the US layout.
    Type(String),
    /// Press key combinations one after the other (`ctrl+alt+f2`).
    Key(Vec<String>),
    /// Move the mouse by (dx, dy).
    MouseMove(i32, i32),
    /// Click a mouse button.
    MouseClick(Button),
    /// Turn the wheel by N notches (positive: away from the user).
    MouseWheel(i32),
    /// Put the absolute pointer at (x, y), each 0.0 ..= 1.0 of the screen; optionally click.
    Tablet {
        /// Horizontal position.
        x: f64,
        /// Vertical position.
        y: f64,
        /// Click there.
        click: Option<Button>,
    },
}

/// Why an action cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Text or a combo that the keymap cannot type.
    #[error(transparent)]
    Keymap(#[from] KeymapError),
    /// Something else.
    #[error("{0}")]
    Invalid(String),
}

/// Splits `v` into steps within the relative axis range.
fn rel_steps(mut v: i64) -> Vec<i32> {
    let mut out = Vec::new();
    while v != 0 {
        let step = v.clamp(i64::from(REL_MIN), i64::from(REL_MAX));
        // In range by the clamp.
        out.push(step as i32);
        v -= step;
    }
    out
}

/// Scales a 0.0 ..= 1.0 coordinate to the tablet's range.
pub fn tablet_coordinate(v: f64, axis: &str) -> Result<i32, ActionError> {
    if !(0.0..=1.0).contains(&v) {
        return Err(ActionError::Invalid(format!(
            "tablet {axis} = {v} is outside 0.0 ..= 1.0"
        )));
    }
    // In 0 ..= ABS_MAX by the check above.
    Ok((v * f64::from(ABS_MAX)).round() as i32)
}

impl Action {
    /// The device and the reports (each one batch) of this action.
    pub fn reports(&self) -> Result<(Kind, Vec<Vec<Event>>), ActionError> {
        match self {
            Action::Type(text) => {
                let r = keymap::text_reports(text)?;
                if r.is_empty() {
                    return Err(ActionError::Invalid("nothing to type".into()));
                }
                Ok((Kind::Keyboard, r))
            }
            Action::Key(combos) => {
                if combos.is_empty() {
                    return Err(ActionError::Invalid("no key combination given".into()));
                }
                let mut out = Vec::new();
                for c in combos {
                    out.extend(keymap::combo_reports(&keymap::parse_combo(c)?));
                }
                Ok((Kind::Keyboard, out))
            }
            Action::MouseMove(dx, dy) => {
                if *dx == 0 && *dy == 0 {
                    return Err(ActionError::Invalid("a move of 0, 0 does nothing".into()));
                }
                let xs = rel_steps(i64::from(*dx));
                let ys = rel_steps(i64::from(*dy));
                let n = xs.len().max(ys.len());
                let out = (0..n)
                    .map(|i| {
                        let mut r = Vec::new();
                        if let Some(x) = xs.get(i) {
                            r.push(Event::new(EV_REL, REL_X, *x));
                        }
                        if let Some(y) = ys.get(i) {
                            r.push(Event::new(EV_REL, REL_Y, *y));
                        }
                        r
                    })
                    .collect();
                Ok((Kind::Mouse, out))
            }
            Action::MouseClick(b) => Ok((
                Kind::Mouse,
                vec![
                    vec![Event::key(b.code(), true)],
                    vec![Event::key(b.code(), false)],
                ],
            )),
            Action::MouseWheel(n) => {
                if *n == 0 {
                    return Err(ActionError::Invalid(
                        "a wheel turn of 0 does nothing".into(),
                    ));
                }
                let out = rel_steps(i64::from(*n))
                    .into_iter()
                    .map(|v| vec![Event::new(EV_REL, REL_WHEEL, v)])
                    .collect();
                Ok((Kind::Mouse, out))
            }
            Action::Tablet { x, y, click } => {
                let x = tablet_coordinate(*x, "x")?;
                let y = tablet_coordinate(*y, "y")?;
                let mut out = vec![vec![
                    Event::new(EV_ABS, ABS_X, x),
                    Event::new(EV_ABS, ABS_Y, y),
                ]];
                if let Some(b) = click {
                    out.push(vec![Event::key(b.code(), true)]);
                    out.push(vec![Event::key(b.code(), false)]);
                }
                Ok((Kind::Tablet, out))
            }
        }
    }
}

/// The host end of one `hid` channel.
pub struct Client<S> {
    stream: S,
    decoder: Decoder,
    next_seq: u32,
    ready: Option<(Kind, String)>,
    out: Vec<u8>,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client on a freshly opened channel.
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream,
            decoder: Decoder::new(),
            next_seq: 1,
            ready: None,
            out: Vec::with_capacity(4096),
        }
    }

    /// Queues one report; with `flags` ([`FLAG_ACK`], [`FLAG_PROBE`]) the guest answers.
    /// Returns its sequence number. Reports longer than [`MAX_EVENTS`] are an error.
    pub fn queue(&mut self, events: Vec<Event>, flags: u8) -> io::Result<u32> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        Message::Batch { seq, flags, events }
            .encode(&mut self.out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(seq)
    }

    /// Writes what was queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        self.stream.flush().await
    }

    /// Sends one report now.
    pub async fn send(&mut self, events: Vec<Event>, flags: u8) -> io::Result<u32> {
        let seq = self.queue(events, flags)?;
        self.flush().await?;
        Ok(seq)
    }

    /// The guest's `Ready`, once received: device kind and evdev node.
    pub fn ready(&self) -> Option<&(Kind, String)> {
        self.ready.as_ref()
    }

    /// Reads until the `Ack` of `seq`; returns its flags.
    pub async fn wait_ack(&mut self, seq: u32) -> io::Result<u8> {
        let mut buf = [0u8; 512];
        loop {
            while let Some(msg) = self
                .decoder
                .next_message()
                .map_err(|e| bad(e.to_string()))?
            {
                match msg {
                    Message::Ready {
                        version,
                        kind,
                        node,
                    } => {
                        if version != super::VERSION {
                            return Err(bad(format!(
                                "the guest speaks hid version {version}, this is version {}",
                                super::VERSION
                            )));
                        }
                        self.ready = Some((kind, node));
                    }
                    Message::Ack { seq: s, flags } if s == seq => return Ok(flags),
                    Message::Ack { .. } => {}
                    Message::Batch { .. } => {
                        return Err(bad("the guest sent a host message (batch)".into()))
                    }
                }
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the guest closed the channel before acknowledging",
                ));
            }
            self.decoder
                .push(&buf[..n])
                .map_err(|e| bad(e.to_string()))?;
        }
    }

    /// Sends `reports` in order, the last one with [`FLAG_ACK`], and waits for that ack: when
    /// this returns, the guest has written every report to its device.
    pub async fn send_all(&mut self, reports: Vec<Vec<Event>>) -> io::Result<()> {
        let n = reports.len();
        let mut last = None;
        for (i, r) in reports.into_iter().enumerate() {
            let flags = if i + 1 == n { FLAG_ACK } else { 0 };
            last = Some(self.queue(r, flags)?);
            if self.out.len() >= 3500 {
                self.flush().await?;
            }
        }
        self.flush().await?;
        if let Some(seq) = last {
            self.wait_ack(seq).await?;
        }
        Ok(())
    }

    /// Closes the channel (the guest releases anything still pressed).
    pub async fn close(mut self) -> io::Result<()> {
        self.flush().await?;
        self.stream.shutdown().await
    }

    /// The stream (the forwarder reads it for resets).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

/// Round trips of [`latency`].
#[derive(Debug, Clone, Serialize)]
pub struct LatencyStats {
    /// Probes sent.
    pub count: usize,
    /// Probes whose report the guest read back from its evdev node.
    pub seen: usize,
    /// Median, microseconds.
    pub p50_us: u64,
    /// 90th percentile, microseconds.
    pub p90_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Largest, microseconds.
    pub max_us: u64,
    /// Mean, microseconds.
    pub mean_us: u64,
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Measures host inject → guest evdev read: `count` one-event mouse reports (REL_X +1 and -1
/// in turn, so the pointer does not drift), each sent with [`FLAG_PROBE`]; the guest writes it
/// to the uinput device, reads it back from the device's evdev node as any reader would, then
/// acknowledges. One probe at a time; the time is the full round trip.
pub async fn latency<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    count: usize,
    gap: Duration,
) -> io::Result<LatencyStats> {
    let mut samples = Vec::with_capacity(count);
    let mut seen = 0;
    for i in 0..count {
        let dx = if i % 2 == 0 { 1 } else { -1 };
        let t0 = Instant::now();
        let seq = client
            .send(vec![Event::new(EV_REL, REL_X, dx)], FLAG_PROBE)
            .await?;
        let flags = client.wait_ack(seq).await?;
        samples.push(t0.elapsed());
        if flags & FLAG_SEEN != 0 {
            seen += 1;
        }
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    samples.sort();
    let us = |d: Duration| d.as_micros() as u64;
    let total: Duration = samples.iter().sum();
    Ok(LatencyStats {
        count,
        seen,
        p50_us: us(quantile(&samples, 0.50)),
        p90_us: us(quantile(&samples, 0.90)),
        p99_us: us(quantile(&samples, 0.99)),
        max_us: samples.last().map_or(0, |d| us(*d)),
        mean_us: if count == 0 {
            0
        } else {
            us(total / count as u32)
        },
    })
}

/// Checks that a report fits one batch (the forwarder splits longer ones).
pub fn fits(report: &[Event]) -> bool {
    !report.is_empty() && report.len() <= MAX_EVENTS
}
