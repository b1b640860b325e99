//! Device: watchdog. The agent sends heartbeats on a channel of class `watchdog`; vstreamd
//! notices when they stop and acts on the virtual machine: logs, runs a hook, or resets, powers
//! down, pauses the guest or injects an NMI through its QMP socket.
//!
//! - A heartbeat may be gated by a health check in the guest (`--watchdog-check CMD`): a failed
//!   check sends [`GuestMsg::CheckFailed`] instead, and the deadline keeps running.
//! - A clean agent stop sends [`GuestMsg::Disarm`] and waits for [`HostMsg::Disarmed`], like the
//!   magic close of `/dev/watchdog`. A channel or session that simply ends does not disarm: an
//!   agent killed with SIGKILL, a crashed guest or a cut transport all end in the action.
//! - After firing, the watchdog stays quiet until the agent is back: its first message re-arms it.
//!
//! The wire format and the deadline logic are sans-io here ([`Decoder`], [`Watchdog`]); [`host`]
//! and [`guest`] only move bytes and run timers. Spec: docs/devices/watchdog.md.
//!
//! Frame: `u8 type`, `u16 length` (little-endian), `length` bytes of payload (at most
//! [`MAX_PAYLOAD`]).

pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
#[cfg(feature = "host")]
pub mod qmp;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The device class.
pub const CLASS: &str = "watchdog";

use crate::record::{fixed, put, Layout, Limit};
pub use crate::record::{Decoder, Message, RecordError};

/// Bytes of a frame header.
pub const HEADER_LEN: usize = Layout::Short.header_len();

/// Largest payload of any message.
pub const MAX_PAYLOAD: usize = 1024;

/// Largest slice the drivers hand to [`Decoder::push`] at once.
pub const READ_CHUNK: usize = 4096;

/// Shortest timeout accepted.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const HEARTBEAT: u8 = 0x02;
    pub const CHECK_FAILED: u8 = 0x03;
    pub const DISARM: u8 = 0x04;
    pub const ARMED: u8 = 0x81;
    pub const DISARMED: u8 = 0x82;
}

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMsg {
    /// First message on a channel: the agent's heartbeat interval. Arms the watchdog.
    Hello {
        /// Milliseconds between heartbeats.
        interval_ms: u32,
    },
    /// "Alive and healthy". Restarts the deadline (and arms a watchdog that was not armed).
    Heartbeat {
        /// Counter, for logs.
        seq: u64,
    },
    /// The health check failed: no heartbeat this time. Informational; the deadline runs on.
    CheckFailed {
        /// What the check said (lossy UTF-8, control characters replaced).
        detail: String,
    },
    /// A clean stop: disarm until the next `Hello` or `Heartbeat`.
    Disarm {
        /// Why (lossy UTF-8, control characters replaced).
        reason: String,
    },
}

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    /// Answer to `Hello`: the deadline the host applies.
    Armed {
        /// Timeout, milliseconds.
        timeout_ms: u32,
        /// Warning before the timeout, milliseconds (0: none).
        pretimeout_ms: u32,
    },
    /// Answer to `Disarm`.
    Disarmed,
}

/// Text from the peer, safe to log: lossy UTF-8 with control characters replaced.
pub fn clean_text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What a command printed, for a one-line report: `": TEXT"` (cleaned, trimmed), or nothing.
fn said(output: &[u8]) -> String {
    let text = clean_text(output);
    match text.trim() {
        "" => String::new(),
        t => format!(": {t}"),
    }
}

/// The first `MAX_PAYLOAD` bytes of `text`, cut on a character boundary.
fn truncated(text: &str) -> &[u8] {
    let mut end = text.len().min(MAX_PAYLOAD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

impl GuestMsg {
    /// The encoded message (watchdog messages always encode: texts are cut to fit).
    pub fn to_bytes(&self) -> Vec<u8> {
        infallible(self)
    }
}

impl HostMsg {
    /// The encoded message (host messages have fixed sizes, so they always encode).
    pub fn to_bytes(&self) -> Vec<u8> {
        infallible(self)
    }
}

fn infallible<M: Message>(m: &M) -> Vec<u8> {
    let mut out = Vec::new();
    // Cannot fail: every type has a fixed size or a text cut to MAX_PAYLOAD by `truncated`.
    let _ = m.encode(&mut out);
    out
}

impl Message for GuestMsg {
    const LAYOUT: Layout = Layout::Short;
    const MAX_PAYLOAD: usize = MAX_PAYLOAD;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(k: u8) -> Result<Limit, RecordError> {
        Ok(match k {
            kind::HELLO => Limit::exactly("hello", 4),
            kind::HEARTBEAT => Limit::exactly("heartbeat", 8),
            kind::CHECK_FAILED => Limit::range("check-failed", 0, MAX_PAYLOAD),
            kind::DISARM => Limit::range("disarm", 0, MAX_PAYLOAD),
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn decode(k: u8, _flags: u8, payload: Bytes) -> Result<GuestMsg, RecordError> {
        Ok(match k {
            kind::HELLO => GuestMsg::Hello {
                interval_ms: u32::from_le_bytes(fixed("hello", &payload)?),
            },
            kind::HEARTBEAT => GuestMsg::Heartbeat {
                seq: u64::from_le_bytes(fixed("heartbeat", &payload)?),
            },
            kind::CHECK_FAILED => GuestMsg::CheckFailed {
                detail: clean_text(&payload),
            },
            kind::DISARM => GuestMsg::Disarm {
                reason: clean_text(&payload),
            },
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let put = |out: &mut Vec<u8>, kind, payload: &[u8]| put::<GuestMsg>(out, kind, 0, payload);
        match self {
            GuestMsg::Hello { interval_ms } => put(out, kind::HELLO, &interval_ms.to_le_bytes()),
            GuestMsg::Heartbeat { seq } => put(out, kind::HEARTBEAT, &seq.to_le_bytes()),
            GuestMsg::CheckFailed { detail } => put(out, kind::CHECK_FAILED, truncated(detail)),
            GuestMsg::Disarm { reason } => put(out, kind::DISARM, truncated(reason)),
        }
    }
}

impl Message for HostMsg {
    const LAYOUT: Layout = Layout::Short;
    const MAX_PAYLOAD: usize = MAX_PAYLOAD;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(k: u8) -> Result<Limit, RecordError> {
        Ok(match k {
            kind::ARMED => Limit::exactly("armed", 8),
            kind::DISARMED => Limit::exactly("disarmed", 0),
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn decode(k: u8, _flags: u8, payload: Bytes) -> Result<HostMsg, RecordError> {
        Ok(match k {
            kind::ARMED => {
                let b: [u8; 8] = fixed("armed", &payload)?;
                HostMsg::Armed {
                    timeout_ms: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    pretimeout_ms: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                }
            }
            kind::DISARMED => {
                let _: [u8; 0] = fixed("disarmed", &payload)?;
                HostMsg::Disarmed
            }
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        match self {
            HostMsg::Armed {
                timeout_ms,
                pretimeout_ms,
            } => {
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&timeout_ms.to_le_bytes());
                p[4..].copy_from_slice(&pretimeout_ms.to_le_bytes());
                put::<HostMsg>(out, kind::ARMED, 0, &p)
            }
            HostMsg::Disarmed => put::<HostMsg>(out, kind::DISARMED, 0, &[]),
        }
    }
}

/// What vstreamd does when the deadline passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log it and emit the events (nothing else).
    #[default]
    Log,
    /// Run the `hook` command.
    Hook,
    /// QMP `system_reset`: reboot the guest.
    Reset,
    /// QMP `system_powerdown`: ask the guest to power off (ACPI).
    Powerdown,
    /// QMP `stop`: pause the virtual machine (for a post-mortem; `cont` resumes it).
    Stop,
    /// QMP `inject-nmi`: the guest kernel's NMI handler (a panic or a crash dump if configured).
    Nmi,
}

impl Action {
    /// The QMP command of this action, if it is one.
    pub fn qmp_command(self) -> Option<&'static str> {
        match self {
            Action::Log | Action::Hook => None,
            Action::Reset => Some("system_reset"),
            Action::Powerdown => Some("system_powerdown"),
            Action::Stop => Some("stop"),
            Action::Nmi => Some("inject-nmi"),
        }
    }

    /// The name used in the config and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Hook => "hook",
            Action::Reset => "reset",
            Action::Powerdown => "powerdown",
            Action::Stop => "stop",
            Action::Nmi => "nmi",
        }
    }
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// `[guest.watchdog]` in vstreamd's config. Without it, the guest's watchdog channels are
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Silence after which the action runs, milliseconds (default 30000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A `watchdog-pretimeout` event this long before the timeout, milliseconds (0: none).
    #[serde(default)]
    pub pretimeout_ms: u64,
    /// What to do (default `log`).
    #[serde(default)]
    pub action: Action,
    /// A command run by `sh -c` when the watchdog fires (required for `action = "hook"`, after
    /// the action otherwise), with `GUEST`, `WATCHDOG_ACTION` and `WATCHDOG_SINCE_MS` set.
    #[serde(default)]
    pub hook: Option<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            timeout_ms: default_timeout_ms(),
            pretimeout_ms: 0,
            action: Action::Log,
            hook: None,
        }
    }
}

impl Settings {
    /// Checks the values; `has_qmp` says whether the guest has a `qmp` address.
    pub fn validate(&self, has_qmp: bool) -> Result<(), WatchdogError> {
        if self.timeout_ms < MIN_TIMEOUT.as_millis() as u64 || self.timeout_ms > u64::from(u32::MAX)
        {
            return Err(WatchdogError::Timeout(self.timeout_ms));
        }
        if self.pretimeout_ms >= self.timeout_ms {
            return Err(WatchdogError::Pretimeout {
                pretimeout_ms: self.pretimeout_ms,
                timeout_ms: self.timeout_ms,
            });
        }
        if self.action == Action::Hook && self.hook.as_deref().is_none_or(|h| h.trim().is_empty()) {
            return Err(WatchdogError::NoHook);
        }
        if self.action.qmp_command().is_some() && !has_qmp {
            return Err(WatchdogError::NeedsQmp(self.action.as_str()));
        }
        Ok(())
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The pre-timeout, if any.
    pub fn pretimeout(&self) -> Option<Duration> {
        (self.pretimeout_ms > 0).then(|| Duration::from_millis(self.pretimeout_ms))
    }
}

/// Where a watchdog is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Never armed: no agent has said hello yet.
    Idle,
    /// Heartbeats expected.
    Armed,
    /// Disarmed by a clean agent stop.
    Disarmed,
    /// Fired; waiting for the agent to come back.
    Fired,
}

/// A deadline that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The warning before the timeout.
    PreTimeout {
        /// Time since the last heartbeat (or the arming).
        since_heartbeat: Duration,
    },
    /// The timeout: run the action.
    Fired {
        /// Time since the last heartbeat (or the arming).
        since_heartbeat: Duration,
    },
}

/// The deadline logic of one guest's watchdog, sans-io: events and the current time go in,
/// expiries come out.
#[derive(Debug, Clone)]
pub struct Watchdog {
    timeout: Duration,
    pretimeout: Option<Duration>,
    phase: Phase,
    last: Option<Instant>,
    pre_warned: bool,
    heartbeats: u64,
    fires: u64,
    interval: Option<Duration>,
}

impl Watchdog {
    /// An idle watchdog with these deadlines (`pretimeout` must be below `timeout`).
    pub fn new(timeout: Duration, pretimeout: Option<Duration>) -> Watchdog {
        Watchdog {
            timeout,
            pretimeout: pretimeout.filter(|p| *p < timeout && !p.is_zero()),
            phase: Phase::Idle,
            last: None,
            pre_warned: false,
            heartbeats: 0,
            fires: 0,
            interval: None,
        }
    }

    /// Restarts the deadline; true if this armed a watchdog that was not armed.
    fn touch(&mut self, now: Instant) -> bool {
        let armed = self.phase != Phase::Armed;
        self.phase = Phase::Armed;
        self.last = Some(now);
        self.pre_warned = false;
        armed
    }

    /// A `Hello`; true if this armed the watchdog.
    pub fn hello(&mut self, now: Instant, interval: Duration) -> bool {
        self.interval = Some(interval);
        self.touch(now)
    }

    /// A heartbeat; true if this armed the watchdog.
    pub fn heartbeat(&mut self, now: Instant) -> bool {
        self.heartbeats += 1;
        self.touch(now)
    }

    /// A clean stop; true if the watchdog was armed.
    pub fn disarm(&mut self) -> bool {
        let was = self.phase == Phase::Armed;
        if was {
            self.phase = Phase::Disarmed;
        }
        was
    }

    /// When [`Watchdog::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase != Phase::Armed {
            return None;
        }
        let last = self.last?;
        match self.pretimeout {
            Some(p) if !self.pre_warned => Some(last + (self.timeout - p)),
            _ => Some(last + self.timeout),
        }
    }

    /// The deadline that passed at `now`, if any; call again until `None` (a late call may
    /// return the warning and then the timeout).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Expiry> {
        if self.phase != Phase::Armed {
            return None;
        }
        let last = self.last?;
        let since_heartbeat = now.saturating_duration_since(last);
        if let Some(p) = self.pretimeout {
            if !self.pre_warned && since_heartbeat >= self.timeout - p {
                self.pre_warned = true;
                return Some(Expiry::PreTimeout { since_heartbeat });
            }
        }
        if since_heartbeat >= self.timeout {
            self.phase = Phase::Fired;
            self.fires += 1;
            return Some(Expiry::Fired { since_heartbeat });
        }
        None
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Heartbeats seen.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// Times fired.
    pub fn fires(&self) -> u64 {
        self.fires
    }

    /// The agent's interval, from its last `Hello`.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Time since the last heartbeat (or arming).
    pub fn since_heartbeat(&self, now: Instant) -> Option<Duration> {
        self.last.map(|l| now.saturating_duration_since(l))
    }
}

/// A `[guest.watchdog]` value that is wrong, or a duration or interval that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchdogError {
    /// `timeout_ms` out of range.
    #[error("watchdog.timeout_ms = {0} (must be {min}..={max})", min = MIN_TIMEOUT.as_millis(), max = u32::MAX)]
    Timeout(u64),
    /// A pre-timeout that would never come first.
    #[error("watchdog.pretimeout_ms = {pretimeout_ms} must be below timeout_ms = {timeout_ms}")]
    Pretimeout {
        /// The configured pre-timeout.
        pretimeout_ms: u64,
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// `action = "hook"` without a hook.
    #[error("watchdog.action = \"hook\" needs watchdog.hook = \"COMMAND\"")]
    NoHook,
    /// An action done through QMP on a guest without a QMP socket.
    #[error("watchdog.action = \"{0}\" needs the guest's qmp = \"unix:PATH\"")]
    NeedsQmp(&'static str),
    /// Not a duration.
    #[error("{0:?} is not a duration (e.g. 500ms, 2s, 1m)")]
    NotADuration(String),
    /// A heartbeat interval of 0.
    #[error("the interval must not be 0")]
    ZeroInterval,
}

/// Parses a duration such as `500ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, WatchdogError> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| WatchdogError::NotADuration(text.to_owned()))?;
    if !v.is_finite() || v < 0.0 || v * scale > 86_400.0 * 365.0 {
        return Err(WatchdogError::NotADuration(text.to_owned()));
    }
    Ok(Duration::from_secs_f64(v * scale))
}
