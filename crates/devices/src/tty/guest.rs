//! The guest half of the tty device, run by vstream-agent: one session per channel.
//!
//! The first message must be [`Start`]. The agent then runs the command (or the login shell) in a
//! new session (`setsid`), so that the whole session can be hung up at once:
//! - with `pty`: on a new pseudo-terminal that becomes its controlling terminal (`TIOCSCTTY`),
//!   sized from `Start` and resized (`TIOCSWINSZ`, which signals `SIGWINCH`) on every `Resize`;
//!   everything it shows comes back as `Stdout`;
//! - without: on three pipes, so stdin, stdout and stderr stay separate and binary-clean;
//!   `StdinEof` closes its stdin.
//!
//! When the command exits, its output is forwarded until every output stream ends (or stays
//! silent for [`DRAIN_IDLE`], or has given [`DRAIN_MAX`] more bytes: a background process still
//! holds it), then `Exit` is sent, the
//! process group is hung up (`SIGHUP`, `SIGCONT`) and the channel closed. When the channel ends
//! first (vstreamctl went away, the channel was reset, or the host broke the protocol) the
//! process group is hung up at once and killed (`SIGKILL`) if the command still runs after
//! [`KILL_GRACE`].

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use vstream_link::ChannelStream;

use super::{
    read_message, Decoder, Exit, GuestMsg, HostMsg, Message, ReadError, Start, CLASS, MAX_DATA,
    MAX_SIGNAL,
};
use crate::term::{open_pty, PtyMaster};
use crate::{ServeFuture, Service};

/// After the command exits, output streams silent this long are given up (a background process
/// of the session holds them open).
pub const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// After the command exits, the most output forwarded per stream: all that a pipe can hold
/// (Linux's default `pipe-max-size`), so all that the command itself can have left unread; more
/// comes from a process it left behind that keeps writing.
pub const DRAIN_MAX: usize = 1024 * 1024;

/// After a hang-up, how long the command may take to exit before its group is killed.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// Messages queued for the channel (each at most [`MAX_DATA`] bytes).
const OUT_QUEUE: usize = 8;

/// Output read from a pipe in one call at most, sent as records of [`MAX_DATA`]. Read 64 KiB
/// at a time, a command that writes faster than the channel drains (`dd bs=64k`) kept the pipe
/// full, and every read woke it: two process switches per 64 KiB, which an emulated guest pays
/// dearly (each empties TCG's software TLB). A read of half a full pipe wakes it once. The
/// buffer is allocated once per output stream and reused (a fresh one per read would be mapped
/// anew, at a page fault per 4 KiB).
const PIPE_READ: usize = 8 * MAX_DATA;

/// Output read from a pseudo-terminal in one call at most.
const PTY_READ: usize = MAX_DATA;

/// `Stdin` payloads queued for the command while it does not read; as many more may be in the
/// write under way ([`feed_stdin`]): at most 16 records of [`MAX_DATA`], 1 MiB, per session.
const STDIN_QUEUE: usize = 8;

/// The tty service: sessions on channels of class `tty`, name `""`.
pub struct Tty;

impl Service for Tty {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        Box::pin(async move {
            if !name.is_empty() {
                stream.reset(&format!(
                    "tty has no {name:?} (its channels have an empty name)"
                ));
                return;
            }
            serve(stream).await;
        })
    }
}

/// Runs one session on `stream` (a channel, or any byte stream in tests) until it ends.
pub async fn serve<S>(stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let writer = tokio::spawn(write_messages(wr, out_rx));
    let mut dec = Decoder::<HostMsg>::new();
    let start = match read_message(&mut rd, &mut dec).await {
        Ok(Some(HostMsg::Start(start))) => Some(start),
        Ok(Some(_)) => {
            let _ = out
                .send(GuestMsg::error("the first message must be Start").into())
                .await;
            None
        }
        Ok(None) | Err(ReadError::Io(_)) => None,
        Err(ReadError::Record(e)) => {
            let _ = out
                .send(GuestMsg::error(&format!("bad Start: {e}")).into())
                .await;
            None
        }
    };
    if let Some(start) = start {
        tracing::debug!(command = ?start.command, pty = start.pty, "tty session starting");
        match spawn(&start) {
            Ok(session) => session.run(&mut rd, &mut dec, &out).await,
            Err(failure) => {
                let _ = out.send(GuestMsg::error(&failure.text).into()).await;
                if let Some(exit) = failure.exit {
                    let _ = out.send(GuestMsg::Exit(exit).into()).await;
                }
            }
        }
    }
    drop(out);
    let _ = writer.await;
}

/// What the writer sends: a message, or output as it was read, which the writer hands
/// `back` once sent.
enum Outgoing {
    Msg(GuestMsg),
    Output {
        data: Vec<u8>,
        stderr: bool,
        back: oneshot::Sender<Vec<u8>>,
    },
}

impl From<GuestMsg> for Outgoing {
    fn from(msg: GuestMsg) -> Outgoing {
        Outgoing::Msg(msg)
    }
}

/// Encodes messages onto the channel in order; closes our direction when the queue ends.
async fn write_messages<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Outgoing::Output { data, stderr, back } => {
                let sent = write_output(&mut w, &data, stderr).await;
                let _ = back.send(data);
                sent
            }
            Outgoing::Msg(msg) => match msg.to_bytes() {
                Ok(record) => w.write_all(&record).await,
                Err(e) => {
                    tracing::warn!("tty: cannot encode a message: {e}");
                    continue;
                }
            },
        };
        if let Err(e) = sent {
            tracing::debug!("tty: channel write failed: {e}");
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Sends `data` as `Stdout` or (`stderr`) `Stderr` messages of [`MAX_DATA`] at most, each
/// header and its output in one vectored write (one queueing on a channel), the output never
/// copied into a record.
pub(super) async fn write_output<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    stderr: bool,
) -> io::Result<()> {
    for piece in data.chunks(MAX_DATA) {
        let header = GuestMsg::output_header(piece.len(), stderr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        w.write_all_buf(&mut Buf::chain(header.as_slice(), piece))
            .await?;
    }
    Ok(())
}

/// Why a command could not be started: text for the user, and the shell's status if the
/// command itself (not the tty service) is at fault.
struct SpawnFailure {
    text: String,
    exit: Option<Exit>,
}

/// Where `Stdin` goes.
enum Input {
    Pipe(ChildStdin),
    Pty(Arc<PtyMaster>),
}

/// Where output comes from.
enum Source {
    Pipe(Box<dyn AsyncRead + Send + Unpin>),
    Pty(Arc<PtyMaster>),
}

impl Source {
    /// The most one read takes.
    fn read_max(&self) -> usize {
        match self {
            Source::Pipe(_) => PIPE_READ,
            Source::Pty(_) => PTY_READ,
        }
    }

    /// Replaces `buf`'s contents with what one read returns (`most`, at most
    /// [`Source::read_max`]).
    async fn read_into(&mut self, buf: &mut Vec<u8>, most: usize) -> io::Result<usize> {
        buf.clear();
        let room = self.read_max().min(most);
        match self {
            // Into the spare capacity as it is, without zeroing it first.
            Source::Pipe(r) => r.read_buf(&mut (&mut *buf).limit(room)).await,
            Source::Pty(m) => {
                buf.resize(room, 0);
                let read = m.read(buf).await;
                buf.truncate(read.as_ref().map_or(0, |n| *n));
                read
            }
        }
    }
}

/// A started command.
struct Session {
    child: Child,
    /// Its pid, which is also its process group and session id.
    pid: Pid,
    input: Input,
    /// Output sources, and whether each is stderr.
    outputs: Vec<(Source, bool)>,
    pty: Option<Arc<PtyMaster>>,
}

/// How the channel's input ended before the command did.
enum InputEnd {
    /// The host closed or reset the channel.
    Closed,
    /// The host sent something invalid.
    Broken(String),
}

impl Session {
    async fn run<R: AsyncRead + Unpin>(
        self,
        rd: &mut R,
        dec: &mut Decoder<HostMsg>,
        out: &mpsc::Sender<Outgoing>,
    ) {
        let Session {
            mut child,
            pid,
            input,
            outputs,
            pty,
        } = self;
        let (exited_tx, exited_rx) = watch::channel(false);
        let mut pumps = JoinSet::new();
        for (source, stderr) in outputs {
            pumps.spawn(pump_output(source, stderr, out.clone(), exited_rx.clone()));
        }
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        let feeder = tokio::spawn(feed_stdin(input, stdin_rx));
        let host = handle_input(rd, dec, stdin_tx, pty);
        tokio::pin!(host);
        tokio::select! {
            end = &mut host => {
                if let InputEnd::Broken(why) = end {
                    tracing::warn!("tty: the host broke the protocol: {why}");
                    // Not awaited: a host that also stopped reading must not delay the hang-up.
                    let _ = out.try_send(GuestMsg::error(&why).into());
                }
                signal_running(pid, Signal::HUP);
                signal_running(pid, Signal::CONT);
                if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
                    signal_running(pid, Signal::KILL);
                    let _ = child.wait().await;
                }
                tracing::debug!("tty session hung up by the host");
            }
            status = child.wait() => {
                let _ = exited_tx.send(true);
                // Keep applying resizes while the output drains; stop if the host goes away.
                let drained = async { while pumps.join_next().await.is_some() {} };
                tokio::select! {
                    () = drained => {}
                    _ = &mut host => {}
                }
                let _ = rustix::process::kill_process_group(pid, Signal::HUP);
                let _ = rustix::process::kill_process_group(pid, Signal::CONT);
                match status {
                    Ok(status) => {
                        let exit = exit_of(status);
                        tracing::debug!(?exit, "tty session ended");
                        let _ = out.send(GuestMsg::Exit(exit).into()).await;
                    }
                    Err(e) => {
                        let text = format!("waiting for the command failed: {e}");
                        let _ = out.send(GuestMsg::error(&text).into()).await;
                    }
                }
            }
        }
        pumps.abort_all();
        feeder.abort();
    }
}

/// Signals the process group of a command not yet reaped, and the command itself (in case it
/// has not reached `setsid` yet; its pid cannot be reused before it is reaped).
fn signal_running(pid: Pid, sig: Signal) {
    let _ = rustix::process::kill_process_group(pid, sig);
    let _ = rustix::process::kill_process(pid, sig);
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    let signal = status
        .signal()
        .and_then(|s| u8::try_from(s).ok())
        .filter(|s| (1..=MAX_SIGNAL).contains(s));
    match signal {
        Some(s) => Exit::Signal(s),
        None => Exit::Code(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(255),
        ),
    }
}

/// Applies the host's messages until the channel ends.
async fn handle_input<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut Decoder<HostMsg>,
    stdin_tx: mpsc::Sender<Bytes>,
    pty: Option<Arc<PtyMaster>>,
) -> InputEnd {
    let mut stdin = Some(stdin_tx);
    loop {
        match read_message(rd, dec).await {
            Ok(None) | Err(ReadError::Io(_)) => return InputEnd::Closed,
            Err(ReadError::Record(e)) => return InputEnd::Broken(e.to_string()),
            Ok(Some(HostMsg::Start(_))) => return InputEnd::Broken("a second Start".into()),
            Ok(Some(HostMsg::Stdin(data))) => match &stdin {
                // A send fails when the command stopped reading its stdin: the bytes are dropped.
                Some(tx) => {
                    let _ = tx.send(data).await;
                }
                None => return InputEnd::Broken("Stdin after StdinEof".into()),
            },
            Ok(Some(HostMsg::StdinEof)) => {
                if stdin.take().is_none() {
                    return InputEnd::Broken("a second StdinEof".into());
                }
            }
            Ok(Some(HostMsg::Resize(size))) => {
                if let Some(master) = &pty {
                    if let Err(e) = master.resize(size) {
                        tracing::debug!("tty: resize failed: {e}");
                    }
                }
            }
        }
    }
}

/// Writes queued `Stdin` to the command. When the queue ends (`StdinEof`), dropping `input`
/// closes a pipe (the command reads EOF); a pty stays open.
///
/// A pipe gets everything queued at once, in one vectored write: in a bulk transfer the
/// command then wakes once per batch instead of once per record, and each switch between it
/// and the agent is dear in a guest.
async fn feed_stdin(mut input: Input, mut rx: mpsc::Receiver<Bytes>) {
    let mut batch = Batch::default();
    while let Some(data) = rx.recv().await {
        let written = match &mut input {
            Input::Pipe(p) => {
                batch.push(data);
                while batch.0.len() < STDIN_QUEUE {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                p.write_all_buf(&mut batch).await
            }
            Input::Pty(m) => m.write_all(&data).await,
        };
        if written.is_err() {
            return;
        }
    }
}

/// Payloads written in order as one buffer (`write_all_buf` writes its chunks vectored).
/// Holds no empty payload, so its `chunk` is empty only when nothing remains.
#[derive(Default)]
pub(super) struct Batch(std::collections::VecDeque<Bytes>);

impl Batch {
    pub(super) fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.0.push_back(data);
        }
    }
}

impl bytes::Buf for Batch {
    fn remaining(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.0.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.0.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.0.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, b) in dst.iter_mut().zip(&self.0) {
            *slot = io::IoSlice::new(b);
            n += 1;
        }
        n
    }
}

/// Forwards one output source as `Stdout`/`Stderr` messages until it ends; once the command
/// has exited, also when it stays silent for [`DRAIN_IDLE`] or has given [`DRAIN_MAX`] more
/// bytes.
async fn pump_output(
    mut source: Source,
    stderr: bool,
    out: mpsc::Sender<Outgoing>,
    mut exited: watch::Receiver<bool>,
) {
    // Bytes forwarded since the command exited, once it has.
    let mut draining: Option<usize> = None;
    // Output is sent from this buffer as read (the writer writes each record's header before
    // its piece), and the writer hands it back for the next read.
    let mut buf = Vec::with_capacity(source.read_max());
    loop {
        let read = if draining.is_some_and(|n| n >= DRAIN_MAX) {
            return;
        } else if let Some(drained) = draining {
            let most = DRAIN_MAX - drained;
            match tokio::time::timeout(DRAIN_IDLE, source.read_into(&mut buf, most)).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = source.read_into(&mut buf, usize::MAX) => r,
                // Changed, or the sender is gone: either way the command has exited.
                _ = exited.changed() => {
                    draining = Some(0);
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(after) = &mut draining {
            *after += n;
        }
        let (back, returned) = oneshot::channel();
        let output = Outgoing::Output {
            data: buf,
            stderr,
            back,
        };
        if out.send(output).await.is_err() {
            return;
        }
        buf = match returned.await {
            Ok(buf) => buf,
            Err(_) => return, // The writer stopped: the channel is gone.
        };
    }
}

/// The login shell: `$SHELL`, else `/bin/sh`.
fn login_shell() -> OsString {
    std::env::var_os("SHELL")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".into())
}

fn spawn(start: &Start) -> Result<Session, SpawnFailure> {
    let (program, args) = match start.command.split_first() {
        Some((program, args)) => (program.clone(), args.to_vec()),
        None => (login_shell(), vec!["-l".into()]),
    };
    let mut cmd = Command::new(&program);
    crate::spawn::undo_inherited(cmd.as_std_mut());
    cmd.args(&args);
    if start.term.is_empty() {
        cmd.env_remove("TERM");
    } else {
        cmd.env("TERM", &start.term);
    }
    let home = std::env::var_os("HOME").filter(|h| Path::new(h).is_dir());
    cmd.current_dir(home.as_deref().unwrap_or("/".as_ref()));
    let cannot_run = |e: io::Error| SpawnFailure {
        exit: Some(Exit::Code(if e.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        })),
        text: format!("cannot run {program:?}: {e}"),
    };
    if start.pty {
        let (master, slave) = open_pty(start.size).map_err(|e| SpawnFailure {
            text: format!("cannot open a pseudo-terminal: {e}"),
            exit: None,
        })?;
        let master = PtyMaster::new(master).map_err(|e| SpawnFailure {
            text: format!("cannot watch the pseudo-terminal: {e}"),
            exit: None,
        })?;
        let slave = std::fs::File::from(slave);
        let dup = |f: &std::fs::File| {
            f.try_clone().map_err(|e| SpawnFailure {
                text: format!("cannot duplicate the pseudo-terminal: {e}"),
                exit: None,
            })
        };
        cmd.stdin(dup(&slave)?).stdout(dup(&slave)?).stderr(slave);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe operations are allowed. It makes two raw system calls through rustix
        // (setsid, then ioctl TIOCSCTTY on fd 0, which is the pty slave), allocates nothing,
        // takes no locks and touches no state shared with other threads; errors become
        // `io::Error::from_raw_os_error`, which does not allocate either.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(cannot_run)?;
        // Our copies of the slave live in `cmd`: close them, so that reading the master ends
        // (EIO) once the command and its children have closed the terminal.
        drop(cmd);
        let pid = child_pid(&child)?;
        let master = Arc::new(master);
        Ok(Session {
            child,
            pid,
            input: Input::Pty(master.clone()),
            outputs: vec![(Source::Pty(master.clone()), false)],
            pty: Some(master),
        })
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the child between fork and exec; setsid is one raw system call through
        // rustix, async-signal-safe, with no allocation and no locks.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(cannot_run)?;
        let pid = child_pid(&child)?;
        let missing = || SpawnFailure {
            text: "the command's pipes are missing".into(),
            exit: None,
        };
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let stderr = child.stderr.take().ok_or_else(missing)?;
        widen_pipe(&stdin);
        widen_pipe(&stdout);
        Ok(Session {
            child,
            pid,
            input: Input::Pipe(stdin),
            outputs: vec![
                (Source::Pipe(Box::new(stdout)), false),
                (Source::Pipe(Box::new(stderr)), true),
            ],
            pty: None,
        })
    }
}

/// Capacity of a piped command's standard input and output (the kernel's default is 64 KiB).
const PIPE_SIZE: usize = 1 << 20;

/// Gives a command's pipe [`PIPE_SIZE`]: in a bulk transfer the command and the agent then take
/// turns once per MiB or so instead of once per 64 KiB, and in a guest each switch between them
/// is dear (under TCG it empties the software TLB). Best effort: the kernel may cap it
/// (`/proc/sys/fs/pipe-max-size` for users without CAP_SYS_RESOURCE), and a pipe left at its
/// default works the same, only slower.
fn widen_pipe(pipe: &impl std::os::fd::AsFd) {
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(pipe, PIPE_SIZE) {
        tracing::debug!("tty: pipe kept its size: {e}");
    }
}

fn child_pid(child: &Child) -> Result<Pid, SpawnFailure> {
    child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw)
        .ok_or_else(|| SpawnFailure {
            text: "the command has no pid".into(),
            exit: None,
        })
}
