//! The control socket protocol between vstreamctl and vstreamd.
//!
//! The client writes one JSON request on one line; the daemon answers with one JSON reply on
//! one line. For `console` (attach), `open` and `agent`, the connection then carries raw bytes
//! both ways; for `events` it carries one JSON event per line.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request line accepted (the control socket is 0600, but still: bounded).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Everything about every guest.
    Status,
    /// A console: its tail, its log as it grows, or an interactive attach.
    Console {
        /// Guest name.
        guest: String,
        /// Console name (default: the guest's first console).
        name: Option<String>,
        /// Send the last N lines first.
        tail: Option<usize>,
        /// Keep sending output.
        follow: bool,
        /// Also accept input (one writer at a time).
        attach: bool,
    },
    /// Open a channel to a guest service and turn this connection into its byte stream.
    Open {
        /// Guest name.
        guest: String,
        /// Device class.
        class: String,
        /// Name within the class.
        name: String,
    },
    /// Turn this connection into a raw QEMU guest agent stream to a guest: its `qga` transport
    /// (a real qemu-ga) if it has one, else a `qga` channel of vstream-agent. The client speaks
    /// QGA itself (see `vstream_devices::qga::host`).
    Agent {
        /// Guest name.
        guest: String,
    },
    /// The print jobs in a guest's spool (reply: `jobs`).
    Jobs {
        /// Guest name.
        guest: String,
    },
    /// Stream lifecycle events.
    Events {
        /// Only this guest's.
        guest: Option<String>,
    },
}

/// The first reply line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was accepted.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For console attach: whether this client may type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<bool>,
    /// For status: the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// For jobs: the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<serde_json::Value>,
}

impl Reply {
    /// An error reply.
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
            ..Reply::default()
        }
    }

    /// A plain success.
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }
}

/// Reads one JSON line of at most [`MAX_REQUEST`] bytes.
pub async fn read_line<R: AsyncBufRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::io::Result<T> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a full line",
            ));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        if done {
            return serde_json::from_slice(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
    }
}

/// Writes one JSON line.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_round_trip_as_json_lines() {
        let req = Request::Console {
            guest: "lab".into(),
            name: Some("hvc0".into()),
            tail: Some(10),
            follow: true,
            attach: false,
        };
        let mut wire = Vec::new();
        write_line(&mut wire, &req).await.expect("write");
        assert!(wire.starts_with(br#"{"op":"console","guest":"lab""#));
        let back: Request = read_line(&mut &wire[..]).await.expect("read");
        assert_eq!(back, req);
    }

    #[tokio::test]
    async fn oversized_and_malformed_lines_are_errors() {
        let long = vec![b'x'; MAX_REQUEST + 10];
        assert!(read_line::<_, Request>(&mut &long[..]).await.is_err());
        assert!(read_line::<_, Request>(&mut &b"{\"op\":\"nope\"}\n"[..])
            .await
            .is_err());
    }
}
