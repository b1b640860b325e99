//! The host half: serves requests on `random` channels and writes raw entropy to `random-raw`
//! transports, both within the guest's [`Limiter`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use vstream_link::ChannelStream;

use super::{Request, Settings, TokenBucket, REQUEST_LEN};
use crate::status::{DeviceStatus, Sample};
use crate::{ServeFuture, Service};

/// Most bytes generated and written at once (the largest buffer a guest makes us hold).
pub const CHUNK: usize = 16 * 1024;

/// Smallest grant worth a write while a larger request waits for its budget, so that a slow
/// budget sends a few 1 KiB writes a second rather than thousands of tiny ones.
const MIN_GRANT: u64 = 1024;

/// What the budget allows now ([`Limiter::try_grant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// These many bytes, taken.
    Now(u64),
    /// Nothing yet; enough after this long.
    After(std::time::Duration),
    /// Never: the budget is 0.
    Never,
}

/// One guest's entropy budget and counters, shared by its channels and raw ports.
pub struct Limiter {
    settings: Settings,
    bucket: Mutex<TokenBucket>,
    channel_bytes: AtomicU64,
    raw_bytes: AtomicU64,
    vhost_bytes: AtomicU64,
    requests: AtomicU64,
    refused: AtomicU64,
}

impl Limiter {
    /// A full bucket for `settings`.
    pub fn new(settings: Settings) -> Limiter {
        Limiter {
            settings,
            bucket: Mutex::new(TokenBucket::new(
                settings.rate,
                settings.burst,
                Instant::now(),
            )),
            channel_bytes: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            vhost_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The budget.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Takes some of `want` bytes (at least `min(want, 1 KiB)`) if the budget has them now;
    /// otherwise says how long until it does, or that it never will (a budget of 0).
    pub fn try_grant(&self, want: u64) -> Grant {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match b.wait(now, want.min(MIN_GRANT)) {
            None => Grant::Never,
            Some(d) if d.is_zero() => Grant::Now(b.take(now, want)),
            Some(d) => Grant::After(d),
        }
    }

    /// Waits until some of `want` bytes (at least `min(want, 1 KiB)`) fit the budget, takes
    /// them and returns how many. Fails if the budget is 0.
    pub async fn grant(&self, want: u64) -> io::Result<u64> {
        loop {
            match self.try_grant(want) {
                Grant::Now(n) => return Ok(n),
                Grant::After(d) => tokio::time::sleep(d).await,
                Grant::Never => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the random device is off for this guest (rate = 0)",
                    ))
                }
            }
        }
    }

    /// Counts bytes handed to the guest's virtio-rng device.
    pub fn count_vhost(&self, n: u64) {
        self.vhost_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counters and budget, for `vstreamctl status`.
    pub fn status(&self) -> RandomStatus {
        RandomStatus {
            rate: self.settings.rate,
            burst: self.settings.burst,
            channel_bytes: self.channel_bytes.load(Ordering::Relaxed),
            raw_bytes: self.raw_bytes.load(Ordering::Relaxed),
            vhost_bytes: self.vhost_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// The random device's status (`devices.random` in `vstreamctl status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RandomStatus {
    /// Bytes per second allowed.
    pub rate: u64,
    /// Bytes allowed at once.
    pub burst: u64,
    /// Bytes served on channels.
    pub channel_bytes: u64,
    /// Bytes served on raw transports.
    pub raw_bytes: u64,
    /// Bytes handed to the guest's virtio-rng device.
    pub vhost_bytes: u64,
    /// Requests served.
    pub requests: u64,
    /// Requests refused (over the budget).
    pub refused: u64,
}

impl crate::status::Samples for RandomStatus {
    fn samples(&self) -> Vec<Sample> {
        const SERVED: &str = "Entropy bytes served to the guest, by way.";
        vec![
            Sample::counter("served_bytes", SERVED, self.channel_bytes).label("via", "channel"),
            Sample::counter("served_bytes", SERVED, self.raw_bytes).label("via", "raw"),
            Sample::counter("served_bytes", SERVED, self.vhost_bytes).label("via", "virtio-rng"),
            Sample::counter("requests", "Entropy requests served.", self.requests),
            Sample::counter(
                "refusals",
                "Entropy requests refused (over the guest's budget).",
                self.refused,
            ),
            Sample::gauge(
                "rate_bytes_per_second",
                "The guest's entropy budget.",
                self.rate as f64,
            ),
        ]
    }
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`, the urandom source: it never blocks
/// once the host's pool is initialised, which it is long before vstreamd runs).
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(0) => return Err(io::Error::other("getrandom returned no bytes")),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes `len` bytes of fresh entropy to `w` within the budget of `limiter`; `counter` counts
/// what was written.
async fn send_entropy<W: AsyncWrite + Unpin>(
    w: &mut W,
    limiter: &Limiter,
    len: u64,
    counter: &AtomicU64,
    buf: &mut [u8; CHUNK],
) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = limiter.grant(left.min(CHUNK as u64)).await? as usize;
        fill(&mut buf[..n])?;
        let written = w.write_all(&buf[..n]).await;
        buf[..n].fill(0);
        written?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    Ok(())
}

/// Answers requests read from `r` on `w` until the stream ends (a clean end between requests is
/// `Ok`); a bad request is an `InvalidData` error naming it.
pub async fn serve_requests<R, W>(r: &mut R, w: &mut W, limiter: &Limiter) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Box::new([0u8; CHUNK]);
    loop {
        let mut raw = [0u8; REQUEST_LEN];
        let mut got = 0;
        while got < REQUEST_LEN {
            // Cancel-safe reads, polled again now and then (see `read_repoll`).
            match crate::channel::read_repoll(r, &mut raw[got..]).await? {
                0 if got == 0 => return Ok(()),
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the guest closed the channel within a request",
                    ))
                }
                n => got += n,
            }
        }
        let req = Request::decode(raw).map_err(|e| {
            limiter.refused.fetch_add(1, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
        })?;
        limiter.requests.fetch_add(1, Ordering::Relaxed);
        send_entropy(
            w,
            limiter,
            u64::from(req.len),
            &limiter.channel_bytes,
            &mut buf,
        )
        .await?;
    }
}

/// Writes entropy to `w` as fast as the budget allows until a write fails (the reader went
/// away): the host side of a `random-raw` port. A reader that does not read simply makes the
/// writes wait; nothing is generated ahead of what the stream takes.
pub async fn serve_raw<W: AsyncWrite + Unpin>(w: &mut W, limiter: &Limiter) -> io::Error {
    let mut buf = Box::new([0u8; CHUNK]);
    loop {
        if let Err(e) = send_entropy(w, limiter, CHUNK as u64, &limiter.raw_bytes, &mut buf).await {
            return e;
        }
    }
}

/// The service of class `random`.
pub struct Entropy {
    guest: String,
    limiter: Arc<Limiter>,
}

impl Entropy {
    /// The service of `guest`, drawing from its limiter.
    pub fn new(guest: &str, limiter: Arc<Limiter>) -> Entropy {
        Entropy {
            guest: guest.to_owned(),
            limiter,
        }
    }
}

impl Service for Entropy {
    fn class(&self) -> &'static str {
        super::CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let limiter = self.limiter.clone();
        let guest = self.guest.clone();
        Box::pin(async move {
            if !limiter.settings().enabled() {
                stream.reset(&format!(
                    "the random device is off for guest {guest:?} ([guest.random] rate = 0)"
                ));
                return;
            }
            let (mut r, mut w) = tokio::io::split(stream);
            match serve_requests(&mut r, &mut w, &limiter).await {
                Ok(()) => {
                    let _ = w.shutdown().await;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(%guest, channel = %name, "random: {e}; channel reset");
                    let stream = r.unsplit(w);
                    stream.reset(&format!("random: {e}"));
                }
                Err(e) => tracing::debug!(%guest, channel = %name, "random channel ended: {e}"),
            }
        })
    }

    fn status(&self) -> Option<DeviceStatus> {
        Some(DeviceStatus::new(self.limiter.status()))
    }
}
