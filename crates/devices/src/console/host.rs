//! The console's host half: a captured console, its state and its viewers (the capture loop
//! itself is in `capture`).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use vstream_transport::Address;

use super::history::{last_lines, read_tail, HISTORY_BYTES};
use super::log::{rotated, RotatingLog};

/// Bytes of recent output kept in memory for `--tail`.
pub(super) const TAIL_BYTES: usize = 256 * 1024;

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
pub(super) struct State {
    pub(super) connected: bool,
    pub(super) since: SystemTime,
    pub(super) peer: String,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) errors: u64,
    pub(super) last_error: Option<String>,
    pub(super) tail: VecDeque<u8>,
    pub(super) writer: Option<u64>,
    pub(super) next_viewer: u64,
    pub(super) viewers: usize,
}

/// A captured console.
#[derive(Debug)]
pub struct Console {
    pub(super) settings: ConsoleSettings,
    pub(super) state: Mutex<State>,
    pub(super) output: broadcast::Sender<Bytes>,
    pub(super) input: mpsc::Sender<Bytes>,
    /// Whether the console's stream is connected, for whoever waits for a change.
    pub(super) up: watch::Sender<bool>,
    /// Asks the capture to stop for a live upgrade; it answers on the enclosed sender.
    pub(super) freeze: mpsc::Sender<oneshot::Sender<Frozen>>,
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
    pub(super) _hold: oneshot::Sender<()>,
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
        tokio::spawn(super::capture::capture(
            console.clone(),
            log,
            input_rx,
            freezes,
            carried,
        ));
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

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The console's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The last `lines` lines of output kept in memory (a viewer's history comes from the log
    /// file, which has more: [`Console::join`]).
    pub fn tail(&self, lines: usize) -> Vec<u8> {
        let st = self.lock();
        let (a, b) = st.tail.as_slices();
        last_lines(&[a, b].concat(), lines).to_vec()
    }

    /// Attaches a viewer. It becomes the writer if it asks to and nobody else is.
    pub fn attach(self: &Arc<Self>, want_write: bool) -> Viewer {
        let role = if want_write { Role::Write } else { Role::Watch };
        self.join(role, None).0
    }

    /// Attaches a viewer that takes the writer role from whoever holds it (an explicit
    /// take-over, as `virsh console --force`, except that the old writer stays as a viewer).
    pub fn take_over(self: &Arc<Self>) -> Viewer {
        self.join(Role::TakeOver, None).0
    }

    /// Attaches a viewer in `role` and, if it asks for `history` lines, cuts them: the log up
    /// to where the viewer starts receiving output, so that the two neither overlap nor leave
    /// a gap (the capture logs and sends under the same lock).
    pub fn join(self: &Arc<Self>, role: Role, history: Option<usize>) -> (Viewer, Option<History>) {
        let mut st = self.lock();
        let id = st.next_viewer;
        st.next_viewer += 1;
        st.viewers += 1;
        match role {
            Role::Watch => {}
            Role::Write if st.writer.is_some() => {}
            Role::Write | Role::TakeOver => st.writer = Some(id),
        }
        let history = history.map(|lines| {
            let open = |path: &Path| File::open(path).and_then(|f| Ok((f.metadata()?.len(), f)));
            let source = match open(&self.settings.log) {
                Ok(current) => {
                    // The rotated file too: just after a rotation the current one is short.
                    let rotated = rotated(&self.settings.log, 1);
                    let previous = (self.settings.log_keep > 0).then(|| open(&rotated).ok());
                    Source::Log(previous.flatten().into_iter().chain([current]).collect())
                }
                // No log to read (deleted, or not readable): what memory has.
                Err(e) => {
                    tracing::debug!(console = %self.name(), "history from memory: {e}");
                    Source::Memory(st.tail.iter().copied().collect())
                }
            };
            History { source, lines }
        });
        let viewer = Viewer {
            console: self.clone(),
            id,
            output: self.output.subscribe(),
        };
        (viewer, history)
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

    pub(super) fn set_connected(&self, connected: bool, peer: &str) {
        {
            let mut st = self.lock();
            st.connected = connected;
            st.since = SystemTime::now();
            st.peer = peer.to_owned();
        }
        // After the state: a watcher woken by this sees the new status.
        self.up.send_replace(connected);
    }

    pub(super) fn record_error(&self, e: &io::Error) {
        let mut st = self.lock();
        st.errors += 1;
        st.last_error = Some(e.to_string());
    }
}

/// How a viewer joins a console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees the output only.
    Watch,
    /// Also types, if no other viewer does.
    Write,
    /// Types, taking the role from whoever holds it.
    TakeOver,
}

/// A viewer's history, cut when it joined; read it with [`History::read`].
#[derive(Debug)]
pub struct History {
    source: Source,
    lines: usize,
}

#[derive(Debug)]
enum Source {
    /// The log files open when the viewer joined (the rotated one first), with their lengths
    /// then.
    Log(Vec<(u64, File)>),
    /// The in-memory tail then.
    Memory(Vec<u8>),
}

impl History {
    /// The history's last lines, from at most the last 1 MiB of the log. Reads files: call it
    /// where blocking is allowed.
    pub fn read(self) -> io::Result<Vec<u8>> {
        match self.source {
            Source::Log(files) => {
                let parts: Vec<_> = files.iter().map(|(end, f)| (f, *end)).collect();
                read_tail(&parts, self.lines, HISTORY_BYTES)
            }
            Source::Memory(all) => Ok(last_lines(&all, self.lines).to_vec()),
        }
    }
}

/// An attached viewer: receives all output; may type if it holds the writer role.
#[derive(Debug)]
pub struct Viewer {
    console: Arc<Console>,
    id: u64,
    output: broadcast::Receiver<Bytes>,
}

impl Viewer {
    /// Whether this viewer may type (now: another viewer may have taken the role over).
    pub fn is_writer(&self) -> bool {
        self.console.lock().writer == Some(self.id)
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
        if !self.is_writer() {
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
