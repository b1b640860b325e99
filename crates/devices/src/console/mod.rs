//! Device: console. The host half captures a guest's raw console stream (the chardev of a
//! virtconsole/hvc0 or of a 16550 ttyS0) into a rotated log and an in-memory tail, and lets
//! viewers attach: every viewer sees the output, one at a time may type.
//!
//! A live upgrade of vstreamd carries the capture's connection: [`Console::freeze`] stops the
//! capture between two reads (every byte read is then in the log, the tail and the viewers'
//! queues) and gives a duplicate of the connection's descriptor, which the successor adopts
//! with [`Console::start`] and a [`Carried`]: no reconnection, no byte lost, no marker in the log.
//!
//! The guest half is the guest kernel's own console driver: nothing of ours runs in the guest,
//! so a console works even when the agent does not.

pub mod device;
mod log;
pub mod verbs;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use vstream_transport::{Address, BoxStream, Connection, Endpoint};

pub use self::log::RotatingLog;

/// Bytes of recent output kept in memory for `--tail`.
const TAIL_BYTES: usize = 256 * 1024;

/// How a console is set up (from vstreamd's config).
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// Console name within the guest ("hvc0", "ttyS0").
    pub name: String,
    /// Where the raw stream is (usually `unix:` to a QEMU chardev socket).
    pub address: Address,
    /// Log file.
    pub log: PathBuf,
    /// Rotate when the log would grow past this.
    pub log_max_bytes: u64,
    /// Rotated files kept.
    pub log_keep: usize,
}

#[derive(Debug)]
struct State {
    connected: bool,
    since: SystemTime,
    peer: String,
    bytes_in: u64,
    bytes_out: u64,
    errors: u64,
    last_error: Option<String>,
    tail: VecDeque<u8>,
    writer: Option<u64>,
    next_viewer: u64,
    viewers: usize,
}

/// A captured console.
#[derive(Debug)]
pub struct Console {
    settings: ConsoleSettings,
    state: Mutex<State>,
    output: broadcast::Sender<Bytes>,
    input: mpsc::Sender<Bytes>,
    /// Whether the console's stream is connected, for whoever waits for a change.
    up: watch::Sender<bool>,
    /// Asks the capture to stop for a live upgrade; it answers on the enclosed sender.
    freeze: mpsc::Sender<oneshot::Sender<Frozen>>,
}

/// Where a console's capture stands: what a live upgrade hands to the successor along with the
/// connection, so that the status counts on and the log goes on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Position {
    /// Who is connected.
    pub peer: String,
    /// Bytes received from the guest.
    pub bytes_in: u64,
    /// Bytes typed into the guest.
    pub bytes_out: u64,
    /// Connection errors so far.
    pub errors: u64,
}

/// A console whose capture is stopped for a live upgrade: it reads nothing more from the
/// guest while this lives. Dropping it lets the capture go on (the upgrade failed).
#[derive(Debug)]
pub struct Frozen {
    /// A duplicate of the connection's descriptor, to keep open across `exec`; `None` when the
    /// console is not connected or its transport has no single descriptor.
    pub fd: Option<OwnedFd>,
    /// The capture's position.
    pub position: Position,
    /// The in-memory tail (for `--tail` after the upgrade).
    pub tail: Vec<u8>,
    /// Dropped, it wakes the stopped capture.
    _hold: oneshot::Sender<()>,
}

/// A frozen console's connection as a successor takes it over (see [`Console::start`]).
#[derive(Debug)]
pub struct Carried {
    /// The connection's descriptor, inherited across `exec`.
    pub fd: OwnedFd,
    /// Where the predecessor's capture stood.
    pub position: Position,
    /// Its tail.
    pub tail: Vec<u8>,
    /// The capture reads nothing until this resolves or its sender is dropped: the carried
    /// viewers attach first, so that they miss no output.
    pub go: oneshot::Receiver<()>,
}

/// What `vstreamctl status` shows of a console.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleStatus {
    /// Console name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// "up" or "down".
    pub state: &'static str,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Who is connected.
    pub peer: String,
    /// Bytes received from the guest.
    pub bytes_in: u64,
    /// Bytes typed into the guest.
    pub bytes_out: u64,
    /// Connection errors so far.
    pub errors: u64,
    /// The last one.
    pub last_error: Option<String>,
    /// Log file.
    pub log: String,
    /// Attached viewers.
    pub viewers: usize,
}

impl Console {
    /// Opens the log and starts capturing (reconnecting forever with backoff), first on the
    /// connection a live upgrade `carried` over if there is one.
    pub fn start(settings: ConsoleSettings, carried: Option<Carried>) -> io::Result<Arc<Console>> {
        let log = RotatingLog::open(&settings.log, settings.log_max_bytes, settings.log_keep)?;
        let (output, _) = broadcast::channel(1024);
        let (input, input_rx) = mpsc::channel(64);
        let (freeze, freezes) = mpsc::channel(1);
        let mut state = State {
            connected: false,
            since: SystemTime::now(),
            peer: String::new(),
            bytes_in: 0,
            bytes_out: 0,
            errors: 0,
            last_error: None,
            tail: VecDeque::new(),
            writer: None,
            next_viewer: 0,
            viewers: 0,
        };
        if let Some(c) = &carried {
            state.bytes_in = c.position.bytes_in;
            state.bytes_out = c.position.bytes_out;
            state.errors = c.position.errors;
            // The state is input (docs/THREAT-MODEL.md): the tail stays bounded.
            let from = c.tail.len().saturating_sub(TAIL_BYTES);
            state.tail.extend(&c.tail[from..]);
        }
        let console = Arc::new(Console {
            settings,
            state: Mutex::new(state),
            output,
            input,
            up: watch::Sender::new(false),
            freeze,
        });
        tokio::spawn(capture(console.clone(), log, input_rx, freezes, carried));
        Ok(console)
    }

    /// Stops the capture for a live upgrade, between two reads: every byte read from the
    /// guest is by then in the log, the tail and the viewers' queues, and typed bytes queued
    /// for the guest are written. Fails if the capture has stopped for good.
    pub async fn freeze(&self) -> io::Result<Frozen> {
        let (tx, rx) = oneshot::channel();
        let gone = || io::Error::other(format!("console {}: capture stopped", self.name()));
        self.freeze.send(tx).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The console's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The last `lines` lines of output (from memory; the log file has more).
    pub fn tail(&self, lines: usize) -> Vec<u8> {
        let st = self.lock();
        let (a, b) = st.tail.as_slices();
        let all: Vec<u8> = [a, b].concat();
        let mut seen = 0;
        let mut start = 0;
        // Count newlines from the end; a trailing partial line counts as one.
        for (i, c) in all.iter().enumerate().rev() {
            if *c == b'\n' && i + 1 != all.len() {
                seen += 1;
                if seen == lines {
                    start = i + 1;
                    break;
                }
            }
        }
        if lines == 0 {
            return Vec::new();
        }
        all[start..].to_vec()
    }

    /// Attaches a viewer. It becomes the writer if it asks to and nobody else is.
    pub fn attach(self: &Arc<Self>, want_write: bool) -> Viewer {
        let mut st = self.lock();
        let id = st.next_viewer;
        st.next_viewer += 1;
        st.viewers += 1;
        let writer = want_write && st.writer.is_none();
        if writer {
            st.writer = Some(id);
        }
        Viewer {
            console: self.clone(),
            id,
            writer,
            output: self.output.subscribe(),
        }
    }

    /// Follows the console's connection: `true` while its stream is connected. Waiting on it
    /// costs nothing until the state changes.
    pub fn watch_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Status for `vstreamctl status`.
    pub fn status(&self) -> ConsoleStatus {
        let st = self.lock();
        ConsoleStatus {
            name: self.settings.name.clone(),
            address: self.settings.address.to_string(),
            state: if st.connected { "up" } else { "down" },
            since: st
                .since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            peer: st.peer.clone(),
            bytes_in: st.bytes_in,
            bytes_out: st.bytes_out,
            errors: st.errors,
            last_error: st.last_error.clone(),
            log: self.settings.log.display().to_string(),
            viewers: st.viewers,
        }
    }

    fn set_connected(&self, connected: bool, peer: &str) {
        {
            let mut st = self.lock();
            st.connected = connected;
            st.since = SystemTime::now();
            st.peer = peer.to_owned();
        }
        // After the state: a watcher woken by this sees the new status.
        self.up.send_replace(connected);
    }

    fn record_error(&self, e: &io::Error) {
        let mut st = self.lock();
        st.errors += 1;
        st.last_error = Some(e.to_string());
    }
}

/// An attached viewer: receives all output; may type if it holds the writer role.
#[derive(Debug)]
pub struct Viewer {
    console: Arc<Console>,
    id: u64,
    writer: bool,
    output: broadcast::Receiver<Bytes>,
}

impl Viewer {
    /// Whether this viewer may type.
    pub fn is_writer(&self) -> bool {
        self.writer
    }

    /// Next output chunk; `Ok(None)` if this viewer fell behind and output was skipped.
    pub async fn next_output(&mut self) -> Result<Option<Bytes>, broadcast::error::RecvError> {
        match self.output.recv().await {
            Ok(b) => Ok(Some(b)),
            Err(broadcast::error::RecvError::Lagged(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Output already sent to this viewer and not yet taken, without waiting: `None` when there
    /// is none; `Some(None)` if output was skipped, as with [`Viewer::next_output`].
    pub fn try_next_output(&mut self) -> Option<Option<Bytes>> {
        match self.output.try_recv() {
            Ok(b) => Some(Some(b)),
            Err(broadcast::error::TryRecvError::Lagged(_)) => Some(None),
            Err(_) => None,
        }
    }

    /// Types `data` into the guest console. Fails for read-only viewers.
    pub async fn type_bytes(&self, data: Bytes) -> io::Result<()> {
        if !self.writer {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "another viewer holds the console's input",
            ));
        }
        self.console
            .input
            .send(data)
            .await
            .map_err(|_| io::Error::other("console capture stopped"))
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let mut st = self.console.lock();
        st.viewers = st.viewers.saturating_sub(1);
        if st.writer == Some(self.id) {
            st.writer = None;
        }
    }
}

async fn capture(
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
                        if let Err(e) = log.write(data) {
                            tracing::warn!(console = %name, "log write failed: {e}");
                        }
                        {
                            let mut st = console.lock();
                            st.bytes_in += n as u64;
                            st.tail.extend(data);
                            let excess = st.tail.len().saturating_sub(TAIL_BYTES);
                            st.tail.drain(..excess);
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn captures_logs_and_round_trips_typed_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("con.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let console = Console::start(
            ConsoleSettings {
                name: "hvc0".into(),
                address: format!("unix:{}", sock.display()).parse().expect("address"),
                log: dir.path().join("hvc0.log"),
                log_max_bytes: 1 << 20,
                log_keep: 2,
            },
            None,
        )
        .expect("start");
        let (mut guest, _) = listener.accept().await.expect("accept");
        let mut writer = console.attach(true);
        let reader = console.attach(true);
        assert!(
            writer.is_writer() && !reader.is_writer(),
            "one writer at a time"
        );
        guest
            .write_all(b"Linux version 6.1\nlogin: ")
            .await
            .expect("write");
        let mut seen = Vec::new();
        while !seen.ends_with(b"login: ") {
            if let Ok(Some(b)) = writer.next_output().await {
                seen.extend_from_slice(&b);
            }
        }
        writer
            .type_bytes(Bytes::from_static(b"root\n"))
            .await
            .expect("type");
        let mut typed = [0u8; 5];
        guest.read_exact(&mut typed).await.expect("read");
        assert_eq!(&typed, b"root\n");
        assert!(reader.type_bytes(Bytes::from_static(b"x")).await.is_err());
        assert_eq!(console.tail(1), b"login: ");
        assert_eq!(console.tail(5), b"Linux version 6.1\nlogin: ");
        let log = std::fs::read(dir.path().join("hvc0.log")).expect("log");
        assert_eq!(log, b"Linux version 6.1\nlogin: ");
        drop(writer);
        assert!(
            console.attach(true).is_writer(),
            "the writer role is released on detach"
        );
    }

    #[tokio::test]
    async fn a_restarted_capture_continues_the_log_after_a_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("con.sock");
        let log = dir.path().join("hvc0.log");
        // What an earlier vstreamd captured before it was killed, mid-line.
        std::fs::write(&log, b"boot ok\nhalf a li").expect("old log");
        let listener = UnixListener::bind(&sock).expect("bind");
        let console = Console::start(
            ConsoleSettings {
                name: "hvc0".into(),
                address: format!("unix:{}", sock.display()).parse().expect("address"),
                log: log.clone(),
                log_max_bytes: 1 << 20,
                log_keep: 2,
            },
            None,
        )
        .expect("start");
        let (mut guest, _) = listener.accept().await.expect("accept");
        let mut viewer = console.attach(false);
        guest.write_all(b"after\n").await.expect("write");
        let mut seen = Vec::new();
        while !seen.ends_with(b"after\n") {
            if let Ok(Some(b)) = viewer.next_output().await {
                seen.extend_from_slice(&b);
            }
        }
        let text = String::from_utf8(std::fs::read(&log).expect("log")).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(&lines[..2], ["boot ok", "half a li"]);
        assert!(
            lines[2].starts_with("[vstreamd: console capture interrupted at ")
                && lines[2].contains(" UTC, resumed at "),
            "{text}"
        );
        assert_eq!(lines[3], "after");
        assert_eq!(seen, b"after\n", "viewers see only the guest's output");
    }

    /// Reads a viewer's output until it ends with `end`.
    async fn read_until(viewer: &mut Viewer, end: &[u8]) -> Vec<u8> {
        let mut seen = Vec::new();
        while !seen.ends_with(end) {
            match viewer.next_output().await {
                Ok(Some(b)) => seen.extend_from_slice(&b),
                other => panic!(
                    "viewer: {other:?} after {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
        seen
    }

    #[tokio::test]
    async fn a_frozen_capture_is_adopted_by_a_successor_with_no_byte_lost_and_no_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("con.sock");
        let log = dir.path().join("hvc0.log");
        let listener = UnixListener::bind(&sock).expect("bind");
        let settings = ConsoleSettings {
            name: "hvc0".into(),
            address: format!("unix:{}", sock.display()).parse().expect("address"),
            log: log.clone(),
            log_max_bytes: 1 << 20,
            log_keep: 2,
        };
        let first = Console::start(settings.clone(), None).expect("start");
        let (mut guest, _) = listener.accept().await.expect("accept");
        let mut viewer = first.attach(false);
        guest.write_all(b"one\n").await.expect("write");
        read_until(&mut viewer, b"one\n").await;

        // A freeze that is dropped (a failed upgrade): the capture goes on.
        drop(first.freeze().await.expect("freeze"));
        guest.write_all(b"two\n").await.expect("write");
        read_until(&mut viewer, b"two\n").await;

        // Frozen for good: what the guest writes now waits in the connection.
        let frozen = first.freeze().await.expect("freeze");
        guest.write_all(b"three\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            viewer.try_next_output().is_none(),
            "a frozen capture reads nothing"
        );
        assert_eq!(frozen.position.bytes_in, 8);
        assert_eq!(frozen.tail, b"one\ntwo\n");

        // The successor adopts the descriptor; it reads once its viewers are attached.
        let fd = frozen.fd.as_ref().expect("a unix socket has a descriptor");
        let (gate, go) = oneshot::channel();
        let carried = Carried {
            fd: fd.try_clone().expect("dup"),
            position: frozen.position.clone(),
            tail: frozen.tail.clone(),
            go,
        };
        let second = Console::start(settings, Some(carried)).expect("start successor");
        let mut after = second.attach(false);
        drop(gate);
        assert_eq!(read_until(&mut after, b"three\n").await, b"three\n");
        guest.write_all(b"four\n").await.expect("write");
        assert_eq!(read_until(&mut after, b"four\n").await, b"four\n");
        assert_eq!(second.status().bytes_in, 19, "the count goes on");
        assert_eq!(second.tail(10), b"one\ntwo\nthree\nfour\n");
        assert_eq!(
            std::fs::read(&log).expect("log"),
            b"one\ntwo\nthree\nfour\n",
            "every byte once, no marker"
        );
        // Nothing reconnected: the guest's side saw one connection.
        let again = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(again.is_err(), "the successor reconnected");
    }
}
