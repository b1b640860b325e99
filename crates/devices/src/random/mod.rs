//! Device: random. The host gives each guest entropy from its own CSPRNG (`getrandom(2)`),
//! within a per-guest budget (a token bucket: bytes per second and burst).
//!
//! Two ways in (docs/devices/random.md):
//! - **The channel** (class `random`, any name; the agent uses `pool`): the guest half asks for
//!   `n` bytes with a 4-byte request, the host answers with exactly `n` bytes as the budget
//!   allows. The agent's guest half ([`guest::Feeder`]) credits them to the guest kernel's pool
//!   with `RNDADDENTROPY` at start and whenever the kernel asks for more.
//! - **The raw port** (a vstreamd transport of kind `random-raw`): vstreamd writes entropy to a
//!   byte stream, typically a virtio-serial port, as fast as the budget allows, and the guest's
//!   reader takes what it wants: a stock `rngd -r /dev/vportNpM` works with no agent at all.
//!
//! Both draw from the same [`host::Limiter`] of the guest, so opening more channels or ports does
//! not raise a guest's share.
//!
//! The protocol and the budget are sans-io here ([`Request`], [`TokenBucket`]); [`host`] and
//! [`guest`] only move bytes.

pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
#[cfg(test)]
mod tests;
#[cfg(feature = "host")]
pub mod vhost;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The device class.
pub const CLASS: &str = "random";

/// The channel name the agent's kernel feeder opens.
pub const POOL_CHANNEL: &str = "pool";

/// Bytes of a request.
pub const REQUEST_LEN: usize = 4;

/// Largest number of bytes one request may ask for.
pub const MAX_REQUEST: u32 = 64 * 1024;

/// Default budget: bytes per second.
pub const DEFAULT_RATE: u64 = 64 * 1024;

/// Default budget: burst, bytes.
pub const DEFAULT_BURST: u64 = 128 * 1024;

/// A guest's request: "send me `len` bytes". Encoded as a little-endian `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Bytes wanted, `1..=MAX_REQUEST`.
    pub len: u32,
}

/// A request the host refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Zero bytes asked for.
    #[error("a request for 0 bytes")]
    Empty,
    /// More than [`MAX_REQUEST`].
    #[error("a request for {0} bytes (at most {MAX_REQUEST} per request)")]
    TooLarge(u32),
}

impl Request {
    /// A request for `len` bytes (`1..=MAX_REQUEST`).
    pub fn new(len: u32) -> Result<Request, RequestError> {
        match len {
            0 => Err(RequestError::Empty),
            n if n > MAX_REQUEST => Err(RequestError::TooLarge(n)),
            n => Ok(Request { len: n }),
        }
    }

    /// The wire form.
    pub fn encode(self) -> [u8; REQUEST_LEN] {
        self.len.to_le_bytes()
    }

    /// Parses the wire form.
    pub fn decode(bytes: [u8; REQUEST_LEN]) -> Result<Request, RequestError> {
        Request::new(u32::from_le_bytes(bytes))
    }
}

/// `[guest.random]` in vstreamd's config: the guest's entropy budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bytes per second, sustained. 0 turns the device off for this guest.
    pub rate: u64,
    /// Bytes the guest may take at once after a quiet period (the bucket's size).
    pub burst: u64,
}

/// Beyond this the f64 token arithmetic loses whole bytes; nobody needs 1 TB/s of entropy.
const MAX_RATE: u64 = 1 << 40;

/// `[guest.random]` values that cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSettings {
    /// A rate without a bucket to spend it from.
    #[error("random.burst must be at least 1 byte when random.rate is not 0")]
    NoBurst,
    /// More than the token arithmetic holds exactly.
    #[error("random.rate and random.burst must be at most {MAX_RATE} bytes")]
    TooLarge,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

impl Settings {
    /// Checks the values; the error says which key is wrong and why.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        if self.rate > 0 && self.burst == 0 {
            return Err(InvalidSettings::NoBurst);
        }
        if self.rate > MAX_RATE || self.burst > MAX_RATE {
            return Err(InvalidSettings::TooLarge);
        }
        Ok(())
    }

    /// Whether the device is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0
    }
}

/// A token bucket over bytes, sans-io: the caller passes the time. It starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` bytes refilled at `rate` bytes per second.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes up to `want` bytes; returns how many were granted (possibly 0).
    pub fn take(&mut self, now: Instant, want: u64) -> u64 {
        self.refill(now);
        let n = (self.tokens.floor() as u64).min(want);
        self.tokens -= n as f64;
        n
    }

    /// How long until `want` bytes (at most a burst) can be taken at once; zero if now. `None`
    /// if never (a rate of 0).
    pub fn wait(&mut self, now: Instant, want: u64) -> Option<Duration> {
        self.refill(now);
        if self.burst < 1.0 {
            return None;
        }
        let need = (want as f64).min(self.burst);
        if self.tokens >= need {
            return Some(Duration::ZERO);
        }
        if self.rate <= 0.0 {
            return None;
        }
        // Rounded up to the next microsecond so the wake-up never comes a hair too early.
        let secs = (need - self.tokens) / self.rate;
        Some(Duration::from_micros((secs * 1e6).ceil() as u64))
    }

    /// Bytes available now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens.floor() as u64
    }
}
