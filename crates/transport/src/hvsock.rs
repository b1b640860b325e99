//! The `hvsock:PATH:PORT` transport: hybrid vsock, as Firecracker, Cloud Hypervisor and
//! vhost-device-vsock offer it.
//!
//! The VMM listens on a Unix socket. A host program connects to it, writes `CONNECT <port>\n` and
//! reads one line back: `OK <assigned host port>\n` means the VMM has connected the socket to the
//! guest's vsock port `<port>`, and from then on the socket carries the guest's bytes. A VMM with
//! no guest listener on that port closes the socket without answering.
//!
//! The answer is read one byte at a time, so that guest bytes that follow it in the same segment
//! stay in the socket for the caller. It is bounded: at most [`MAX_ANSWER`] bytes within
//! [`ANSWER_TIMEOUT`].
//!
//! Connections the guest opens go the other way: the VMM connects to `<PATH>_<port>`, which is a
//! plain `unix-listen:` address for vstream.

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::address::Address;
use crate::{with_context, Connection, PeerIdentity};

/// The longest answer line accepted, newline included.
pub(crate) const MAX_ANSWER: usize = 64;

/// How long the VMM gets to answer `CONNECT`.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects through the VMM's socket at `path` to guest vsock port `port`.
pub(crate) async fn connect(addr: &Address, path: &Path, port: u32) -> io::Result<Connection> {
    connect_within(addr, path, port, ANSWER_TIMEOUT).await
}

/// [`connect`], with the time the VMM gets to answer as a parameter.
pub(crate) async fn connect_within(
    addr: &Address,
    path: &Path,
    port: u32,
    answer_timeout: Duration,
) -> io::Result<Connection> {
    let mut stream = UnixStream::connect(path).await.map_err(with_context(
        addr,
        "cannot connect to the VMM's hybrid vsock socket",
    ))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(with_context(addr, "cannot send CONNECT to the VMM"))?;
    let line = match tokio::time::timeout(answer_timeout, read_answer(&mut stream)).await {
        Ok(line) => line.map_err(with_context(addr, "no answer to CONNECT"))?,
        Err(_elapsed) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{addr}: the VMM did not answer CONNECT {port} within {} ms",
                    answer_timeout.as_millis()
                ),
            ))
        }
    };
    let host_port = parse_answer(&line).ok_or_else(|| {
        if line.is_empty() {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "{addr}: the VMM closed the connection without answering CONNECT {port} \
                     (is anything in the guest listening on vsock port {port}?)"
                ),
            )
        } else {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{addr}: the VMM answered CONNECT {port} with {:?}, expected \"OK <port>\\n\"",
                    String::from_utf8_lossy(&line)
                ),
            )
        }
    })?;
    tracing::debug!(%addr, host_port, "hybrid vsock connected");
    Ok(Connection {
        stream: Box::new(stream),
        peer: format!("{addr} (host port {host_port})"),
        identity: PeerIdentity::Opened,
    })
}

/// Reads up to and including the first newline, at most [`MAX_ANSWER`] bytes, without reading
/// past it. Returns fewer bytes, without a newline, if the VMM closes the socket first.
async fn read_answer(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(MAX_ANSWER);
    while line.len() < MAX_ANSWER {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Ok(line);
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(line);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the answer is longer than {MAX_ANSWER} bytes without a newline: {:?}",
            String::from_utf8_lossy(&line)
        ),
    ))
}

/// The assigned host port in an `OK <n>\n` line.
fn parse_answer(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"OK ")?.strip_suffix(b"\n")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::net::UnixListener;

    #[test]
    fn answers() {
        assert_eq!(parse_answer(b"OK 1073741824\n"), Some(1_073_741_824));
        assert_eq!(parse_answer(b"OK 0\n"), Some(0));
        for bad in [
            &b"OK\n"[..],
            b"OK \n",
            b"OK 12",
            b"OK 12\r\n",
            b"OK -1\n",
            b"OK 4294967296\n",
            b"ok 5\n",
            b"ERR 5\n",
            b"",
        ] {
            assert_eq!(
                parse_answer(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A VMM that reads the CONNECT line and then sends `reply` and keeps the socket open.
    async fn vmm_replying(reply: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut line = [0u8; 10];
            socket.read_exact(&mut line).await.expect("read CONNECT");
            assert_eq!(&line, b"CONNECT 7\n");
            socket.write_all(reply).await.expect("reply");
            // Keep the socket open until the client goes away.
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out() {
        let (_dir, path) = vmm_replying(b"").await;
        let addr = Address::HybridVsock {
            path: path.clone(),
            port: 7,
        };
        let start = Instant::now();
        let error = match connect_within(&addr, &path, 7, Duration::from_millis(200)).await {
            Ok(_) => panic!("a silent VMM must not give a connection"),
            Err(e) => e,
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
        assert!(
            error.to_string().contains("did not answer CONNECT 7"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_at_64_bytes() {
        let (_dir, path) = vmm_replying(&[b'x'; 100]).await;
        let addr = Address::HybridVsock {
            path: path.clone(),
            port: 7,
        };
        let error = match connect_within(&addr, &path, 7, Duration::from_secs(5)).await {
            Ok(_) => panic!("an endless answer must not give a connection"),
            Err(e) => e,
        };
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let message = error.to_string();
        assert!(message.contains("longer than 64 bytes"), "{message}");
        assert!(message.contains(&"x".repeat(64)), "{message}");
        assert!(!message.contains(&"x".repeat(65)), "{message}");
    }
}
