//! The guest half, run by vstream-agent: AppSocket/JetDirect listeners. One accepted connection
//! is one job: the agent opens a `printer` channel, sends `Job`, the client's bytes as `Data`
//! records, and `End` when the client has finished sending (half-close or close), then waits
//! for the host's `Done` before closing the client's connection (so a client that waits for the
//! close knows the job is safe on the host). If the host refuses the job (quota, no spool) the
//! channel is reset with the reason, which is logged, and the client's connection is closed.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_link::Mux;
use vstream_transport::{bind_retrying, Address, Connection};

use super::{Decoder, Message, Record, CHANNEL_NAME, CLASS, MAX_DATA, VERSION};

/// Where the agent listens by default: raw printing on TCP 9100 of the loopback interface, and
/// a Unix socket.
pub fn default_listeners() -> Vec<Address> {
    vec![
        Address::TcpListen {
            host: "127.0.0.1".into(),
            port: 9100,
        },
        Address::UnixListen("/run/vstream/printer.sock".into()),
    ]
}

/// How long the agent waits for the host to accept a job's channel.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts print jobs on `address` forever (binding retried every 5 s until it works).
pub async fn listen(mux: Mux, address: Address) {
    let make_dir = || {
        if let Address::UnixListen(path) = &address {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
    };
    make_dir();
    let mut endpoint = bind_retrying(&address, Duration::from_secs(5), |e| {
        tracing::warn!(%address, "printer: cannot listen: {e}; retrying in 5 s");
        make_dir();
    })
    .await;
    if let Address::UnixListen(path) = &address {
        // Any local user may print, as with a printer's socket.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    }
    let source = endpoint.address().to_string();
    tracing::info!(address = %source, "printer: accepting jobs");
    loop {
        match endpoint.next().await {
            Ok(conn) => {
                let mux = mux.clone();
                let source = source.clone();
                tokio::spawn(async move {
                    let peer = conn.peer.clone();
                    match job(&mux, conn, &source).await {
                        Ok(done) => {
                            tracing::info!(%source, %peer, "printer: job spooled on the host: {done}")
                        }
                        Err(e) => tracing::warn!(%source, %peer, "printer: job not spooled: {e}"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(address = %source, "printer: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Sends one job (the bytes of `conn` until it stops sending) to the host. Returns the host's
/// `Done` as text.
pub async fn job(mux: &Mux, conn: Connection, source: &str) -> io::Result<String> {
    let mut client = conn.stream;
    let mut chan = tokio::time::timeout(OPEN_TIMEOUT, mux.open(CLASS, CHANNEL_NAME))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the host did not take the job within 30 s",
            )
        })??;
    let mut out = Vec::with_capacity(MAX_DATA + 16);
    let header = Record::Job(vec![
        ("version".into(), VERSION.to_string()),
        ("source".into(), source.to_owned()),
        ("peer".into(), conn.peer.clone()),
    ]);
    header.encode(&mut out).map_err(io::Error::other)?;
    chan.write_all(&out).await?;
    let mut buf = vec![0u8; MAX_DATA];
    let mut probe = [0u8; 256];
    let mut total: u64 = 0;
    loop {
        tokio::select! {
            n = client.read(&mut buf) => {
                let n = match n {
                    Ok(n) => n,
                    Err(e) => {
                        let why = format!("the printing client's connection failed after {total} bytes: {e}");
                        chan.reset(&why);
                        return Err(io::Error::new(e.kind(), why));
                    }
                };
                if n == 0 {
                    break;
                }
                out.clear();
                Record::Data(bytes::Bytes::copy_from_slice(&buf[..n]))
                    .encode(&mut out)
                    .map_err(io::Error::other)?;
                chan.write_all(&out).await?;
                total += n as u64;
            }
            // The host sends nothing before Done: anything here is a refusal (reset) or a bug.
            r = chan.read(&mut probe) => {
                return Err(match r {
                    Ok(_) => io::Error::new(io::ErrorKind::InvalidData, "the host answered before the job was complete"),
                    Err(e) => e,
                });
            }
        }
    }
    out.clear();
    Record::End(total)
        .encode(&mut out)
        .map_err(io::Error::other)?;
    chan.write_all(&out).await?;
    chan.shutdown().await?;
    // Wait for Done (or the reason the host did not keep the job).
    let mut dec = Decoder::new();
    loop {
        if let Some(r) = dec
            .next_message()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        {
            let _ = client.shutdown().await;
            return match r {
                Record::Done(meta) => Ok(meta
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected record from the host",
                )),
            };
        }
        let n = chan.read(&mut probe).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the host closed the job's channel without confirming it",
            ));
        }
        dec.push(&probe[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    }
}
