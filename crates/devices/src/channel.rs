//! Channel plumbing shared by the devices: opening a channel again and again with backoff (the
//! guest halves that open their channel and keep it open: random, watchdog), and reads that
//! survive a lost wake-up.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use vstream_link::{ChannelStream, Mux};
use vstream_transport::Backoff;

/// How long a guest half waits before it reopens a channel that ended (the host may be
/// restarting).
pub const REOPEN_PAUSE: Duration = Duration::from_secs(1);

/// Opens a channel of `class` named `name` on `mux`, waiting `backoff` between failed attempts
/// (reset once it opens). A failure is logged when it differs from the one before, so an agent
/// waiting for its host does not fill the log.
pub async fn open_with_backoff(
    mux: &Mux,
    class: &str,
    name: &str,
    backoff: &mut Backoff,
) -> ChannelStream {
    let mut last_error = String::new();
    loop {
        match mux.open(class, name).await {
            Ok(stream) => {
                backoff.reset();
                return stream;
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    tracing::warn!("{class}: cannot open the {class} channel: {msg}; retrying");
                    last_error = msg;
                }
                backoff.wait().await;
            }
        }
    }
}

/// How often a read of a channel is polled again without a wake-up.
pub const REPOLL: Duration = Duration::from_secs(1);

/// `read`, polled again every [`REPOLL`]: a wake-up lost by the stream must not leave a reader
/// deaf (the watchdog's host half, the random device's raw ports). (vstream-link's
/// `ChannelStream::drop` removes the wakers registered under its channel id even when the stream
/// belongs to a replaced session and a new channel of the new session reuses the id; the read
/// here is cancel-safe.)
pub async fn read_repoll<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        if let Ok(result) = tokio::time::timeout(REPOLL, r.read(buf)).await {
            return result;
        }
    }
}
