//! A console's capture loop: the one task per console that owns its connection.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use vstream_transport::{Address, BoxStream, Connection, Endpoint};

use super::host::{Carried, Console, Frozen, Position, TAIL_BYTES};
use super::log::RotatingLog;

/// Captures a console until its input queue closes: reconnects with backoff, logs, keeps the
/// tail, fans output out to viewers, types their input, and parks for a live upgrade.
pub(super) async fn capture(
    console: Arc<Console>,
    mut log: RotatingLog,
    mut input: mpsc::Receiver<Bytes>,
    mut freezes: mpsc::Receiver<oneshot::Sender<Frozen>>,
    mut carried: Option<Carried>,
) {
    let name = console.settings.name.clone();
    let mut endpoint = None;
    let mut backoff = Duration::from_millis(100);
    let mut delay = Duration::ZERO;
    // Since when output may have gone uncaptured: the log's last write by an earlier vstreamd
    // (stopped or killed), then each disconnection. A connection carried over a live upgrade
    // lost nothing.
    let mut interrupted = log.last_write();
    loop {
        let conn = match carried.take() {
            Some(c) => {
                let _ = c.go.await;
                match Connection::adopt(c.fd, c.position.peer) {
                    Ok(conn) => {
                        interrupted = None;
                        conn
                    }
                    Err(e) => {
                        console.record_error(&e);
                        continue;
                    }
                }
            }
            None => {
                let connecting = connect(&console.settings.address, &mut endpoint, delay);
                tokio::select! {
                    conn = connecting => match conn {
                        Ok(conn) => conn,
                        Err(e) => {
                            console.record_error(&e);
                            delay = backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            continue;
                        }
                    },
                    Some(reply) = freezes.recv() => {
                        park(&console, None, reply).await;
                        continue;
                    }
                }
            }
        };
        backoff = Duration::from_millis(100);
        if let Some(since) = interrupted.take() {
            let line = format!(
                "[vstreamd: console capture interrupted at {}, resumed at {}; output in between, if any, was not captured]",
                utc(since),
                utc(SystemTime::now())
            );
            if let Err(e) = log.mark(&line) {
                tracing::warn!(console = %name, "log write failed: {e}");
            }
        }
        tracing::info!(console = %name, peer = %conn.peer, "console connected");
        console.set_connected(true, &conn.peer);
        let mut stream = conn.stream;
        let mut buf = vec![0u8; 16 * 1024];
        let why = loop {
            // Bytes read are logged, kept and sent in the same step: at every await point here,
            // no byte from the guest is held only in `buf` (a freeze relies on it).
            tokio::select! {
                n = stream.read(&mut buf) => match n {
                    Ok(0) => break "closed".to_owned(),
                    Ok(n) => {
                        let data = &buf[..n];
                        // Under the lock a viewer joins with: its history (the log up to its
                        // length then) and its live output neither overlap nor leave a gap.
                        let mut st = console.lock();
                        if let Err(e) = log.write(data) {
                            tracing::warn!(console = %name, "log write failed: {e}");
                        }
                        st.bytes_in += n as u64;
                        st.tail.extend(data);
                        let excess = st.tail.len().saturating_sub(TAIL_BYTES);
                        st.tail.drain(..excess);
                        let _ = console.output.send(Bytes::copy_from_slice(data));
                    }
                    Err(e) => break e.to_string(),
                },
                typed = input.recv() => match typed {
                    Some(data) => {
                        if let Err(e) = type_into(&console, &mut stream, &data).await {
                            break e.to_string();
                        }
                    }
                    None => return,
                },
                Some(reply) = freezes.recv() => {
                    // Typed bytes still queued are in no carried state: they go to the guest now.
                    let flushed = async {
                        while let Ok(data) = input.try_recv() {
                            type_into(&console, &mut stream, &data).await?;
                        }
                        io::Result::Ok(())
                    };
                    if let Err(e) = flushed.await {
                        break e.to_string();
                    }
                    park(&console, stream.descriptor(), reply).await;
                }
            }
        };
        tracing::info!(console = %name, "console disconnected: {why}");
        interrupted = Some(SystemTime::now());
        console.set_connected(false, "");
        delay = backoff;
    }
}

/// Waits `delay`, then connects (binding the endpoint first if that has not succeeded yet).
async fn connect(
    address: &Address,
    endpoint: &mut Option<Endpoint>,
    delay: Duration,
) -> io::Result<Connection> {
    tokio::time::sleep(delay).await;
    let endpoint = match endpoint {
        Some(ep) => ep,
        None => endpoint.insert(Endpoint::bind(address.clone()).await?),
    };
    endpoint.next().await
}

/// Writes bytes a viewer typed to the guest.
async fn type_into(console: &Console, stream: &mut BoxStream, data: &[u8]) -> io::Result<()> {
    stream.write_all(data).await?;
    console.lock().bytes_out += data.len() as u64;
    Ok(())
}

/// Answers a freeze with the capture's position and a duplicate of `fd`, then waits until the
/// [`Frozen`] is dropped: the upgrade failed (had it not, this process would be gone).
async fn park(console: &Console, fd: Option<BorrowedFd<'_>>, reply: oneshot::Sender<Frozen>) {
    let fd = fd.map(|fd| fd.try_clone_to_owned()).transpose();
    let fd = fd.unwrap_or_else(|e| {
        // The successor reconnects instead, as after any cut (with a marker in the log).
        tracing::warn!(console = %console.name(), "cannot keep the console's connection: {e}");
        None
    });
    let (hold, held) = oneshot::channel();
    let frozen = {
        let st = console.lock();
        Frozen {
            fd,
            position: Position {
                peer: st.peer.clone(),
                bytes_in: st.bytes_in,
                bytes_out: st.bytes_out,
                errors: st.errors,
            },
            tail: st.tail.iter().copied().collect(),
            _hold: hold,
        }
    };
    if reply.send(frozen).is_ok() {
        let _ = held.await;
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = crate::civil::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}
