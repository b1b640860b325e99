//! The host half of the tty device, run by vstreamctl (`shell`, `exec`) on a connection that
//! vstreamd turned into the byte stream of a `tty` channel.
//!
//! Everything the guest sends is hostile input: messages go through the bounded [`Decoder`],
//! guest error texts are kept (at most [`MAX_GUEST_ERRORS`]) and printed with control
//! characters escaped, and no guest byte can make this side panic or buffer without bound.

use std::ffi::OsString;
use std::io::{self, IsTerminal};
use std::os::fd::BorrowedFd;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use crate::registry::{BoxFuture, PageTerminal};
use crate::term::RawMode;

use super::{
    read_message, Decoder, Exit, GuestMsg, HostMsg, Message, ReadError, RecordError, Start,
    WindowSize, MAX_DATA,
};

/// Guest `Error` messages kept for printing; later ones are dropped.
pub const MAX_GUEST_ERRORS: usize = 16;

/// The status vstreamctl exits with when the session fails (as ssh does).
pub const FAILURE_STATUS: i32 = 255;

/// The size sent when no local terminal tells it.
const DEFAULT_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// Whether the command gets a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtyMode {
    /// If vstreamctl's stdin is a terminal.
    Auto,
    /// Always (`-t`).
    Always,
    /// Never (`-T`, and `exec`).
    Never,
}

/// Why a session ended without an exit status.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The command line breaks a protocol limit.
    #[error("cannot send the command: {0}")]
    Command(RecordError),
    /// The connection to vstreamd (and the channel behind it) failed.
    #[error("connection lost: {0}")]
    Connection(io::Error),
    /// The guest sent bytes that are not valid tty messages.
    #[error("the guest broke the tty protocol: {0}")]
    Protocol(RecordError),
    /// The guest closed the channel without an `Exit`.
    #[error("the session ended without an exit status")]
    NoExit,
    /// Local stdout or stderr could not be written.
    #[error("writing local output: {0}")]
    Output(io::Error),
}

/// How a session ended.
#[derive(Debug)]
pub struct Report {
    /// The command's status, or why there is none.
    pub result: Result<Exit, SessionError>,
    /// Texts of the guest's `Error` messages, as received (unescaped).
    pub guest_errors: Vec<String>,
}

/// The local side of a session: where input comes from and output goes.
pub struct Local<I, O, E> {
    /// Read and sent as `Stdin`, then `StdinEof` at its end.
    pub stdin: I,
    /// Receives `Stdout`.
    pub stdout: O,
    /// Receives `Stderr`.
    pub stderr: E,
}

/// Runs one session on a connection to a `tty` channel: sends `start`, forwards `local.stdin`
/// and every size from `resizes`, writes the output to `local`, until the guest's `Exit`.
/// Sans terminal: [`run`] wraps it for vstreamctl; tests drive it with in-memory streams.
pub async fn run_session<R, W, I, O, E>(
    conn_r: R,
    mut conn_w: W,
    start: Start,
    local: Local<I, O, E>,
    resizes: mpsc::UnboundedReceiver<WindowSize>,
) -> Report
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let mut guest_errors = Vec::new();
    let result = async {
        let mut frame = Vec::new();
        HostMsg::Start(start)
            .encode(&mut frame)
            .map_err(SessionError::Command)?;
        conn_w
            .write_all(&frame)
            .await
            .map_err(SessionError::Connection)?;
        let input = forward_input(conn_w, local.stdin, resizes);
        let output = forward_output(conn_r, local.stdout, local.stderr, &mut guest_errors);
        tokio::select! {
            r = output => r,
            e = input => Err(e),
        }
    }
    .await;
    Report {
        result,
        guest_errors,
    }
}

/// Sends stdin and resizes; returns only when the connection fails.
async fn forward_input<W, I>(
    mut w: W,
    mut stdin: I,
    mut resizes: mpsc::UnboundedReceiver<WindowSize>,
) -> SessionError
where
    W: AsyncWrite + Unpin,
    I: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; MAX_DATA];
    let mut frame = Vec::with_capacity(MAX_DATA + 16);
    let mut stdin_open = true;
    loop {
        let msg = tokio::select! {
            // A resize that raced with typed input goes first: the keys may be a command that
            // reads the size (`stty size`).
            biased;
            Some(size) = resizes.recv() => HostMsg::Resize(size),
            n = stdin.read(&mut buf), if stdin_open => match n {
                // A failing stdin ends like a closed one.
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    HostMsg::StdinEof
                }
                Ok(n) => HostMsg::Stdin(Bytes::copy_from_slice(&buf[..n])),
            },
            else => std::future::pending().await,
        };
        frame.clear();
        if let Err(e) = msg.encode(&mut frame) {
            return SessionError::Command(e);
        }
        if let Err(e) = w.write_all(&frame).await {
            return SessionError::Connection(e);
        }
    }
}

/// Writes the guest's output locally until its `Exit`.
async fn forward_output<R, O, E>(
    mut r: R,
    mut stdout: O,
    mut stderr: E,
    guest_errors: &mut Vec<String>,
) -> Result<Exit, SessionError>
where
    R: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let mut dec = Decoder::<GuestMsg>::new();
    loop {
        match read_message(&mut r, &mut dec).await {
            Ok(Some(GuestMsg::Stdout(data))) => write_flush(&mut stdout, &data).await?,
            Ok(Some(GuestMsg::Stderr(data))) => write_flush(&mut stderr, &data).await?,
            Ok(Some(GuestMsg::Exit(exit))) => return Ok(exit),
            Ok(Some(GuestMsg::Error(text))) => {
                if guest_errors.len() < MAX_GUEST_ERRORS {
                    guest_errors.push(text);
                }
            }
            Ok(None) => return Err(SessionError::NoExit),
            Err(ReadError::Io(e)) => return Err(SessionError::Connection(e)),
            Err(ReadError::Record(e)) => return Err(SessionError::Protocol(e)),
        }
    }
}

async fn write_flush<O: AsyncWrite + Unpin>(out: &mut O, data: &[u8]) -> Result<(), SessionError> {
    out.write_all(data).await.map_err(SessionError::Output)?;
    out.flush().await.map_err(SessionError::Output)
}

/// `TERM` of a page's shell: xterm.js emulates xterm.
const PAGE_TERM: &str = "xterm-256color";

/// A login shell on a pty for a page's terminal (the web console's shell, through
/// [`crate::registry::Device::terminal`]): [`run_session`] on the channel; says how it ended.
pub fn page_shell(
    conn_r: Box<dyn AsyncRead + Send + Unpin>,
    conn_w: Box<dyn AsyncWrite + Send + Unpin>,
    page: PageTerminal,
) -> BoxFuture<'static, String> {
    Box::pin(async move {
        let start = Start {
            command: Vec::new(),
            term: PAGE_TERM.into(),
            pty: true,
            size: page.size,
        };
        let local = Local {
            stdin: page.keys,
            stdout: page.stdout,
            stderr: page.stderr,
        };
        let report = run_session(conn_r, conn_w, start, local, page.resizes).await;
        let mut ended = match report.result {
            Ok(exit) => format!("the shell exited with status {}", exit.shell_status()),
            Err(e) => format!("the shell session ended: {e}"),
        };
        for text in &report.guest_errors {
            ended.push_str(&format!("; the guest says: {}", escape_controls(text)));
        }
        ended
    })
}

/// Runs a session for vstreamctl on this process's terminal and standard streams; returns the
/// status to exit with: the command's (128 + N if signal N killed it), 128 + N if signal N
/// (SIGHUP, SIGINT, SIGQUIT, SIGTERM) ended vstreamctl, 141 if local output was closed, else
/// [`FAILURE_STATUS`] after a message on stderr.
///
/// With a pty and a terminal on stdin, the local terminal is in raw mode for the session and
/// restored before this returns; its size is sent at start and on every `SIGWINCH`.
pub async fn run<R, W>(
    guest: &str,
    conn_r: R,
    conn_w: W,
    command: Vec<OsString>,
    mode: PtyMode,
) -> i32
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stdin_is_tty = io::stdin().is_terminal();
    let pty = match mode {
        PtyMode::Auto => stdin_is_tty,
        PtyMode::Always => true,
        PtyMode::Never => false,
    };
    // Handled before the terminal goes raw, so that no signal leaves it raw.
    let mut stop = termination_signals();
    let (resize_tx, resizes) = mpsc::unbounded_channel();
    if pty {
        if let Some(term) = local_terminal() {
            // Registered before the size is read, so no resize falls between the two.
            match signal(SignalKind::window_change()) {
                Ok(winch) => {
                    tokio::spawn(watch_size(term, winch, resize_tx));
                }
                Err(e) => eprintln!("vstreamctl: window size changes will not be sent: {e}"),
            }
        }
    }
    let start = Start {
        command,
        term: if pty {
            std::env::var_os("TERM").unwrap_or_default()
        } else {
            OsString::new()
        },
        pty,
        size: local_terminal().and_then(size_of).unwrap_or(DEFAULT_SIZE),
    };
    let raw = if pty && stdin_is_tty {
        match RawMode::enter() {
            Ok(raw) => Some(raw),
            Err(e) => {
                eprintln!("vstreamctl: cannot put the terminal in raw mode: {e}");
                return FAILURE_STATUS;
            }
        }
    } else {
        None
    };
    let local = Local {
        stdin: tokio::io::stdin(),
        stdout: tokio::io::stdout(),
        stderr: tokio::io::stderr(),
    };
    let outcome = tokio::select! {
        report = run_session(conn_r, conn_w, start, local, resizes) => Ok(report),
        Some(sig) = stop.recv() => Err(sig),
    };
    drop(raw);
    let report = match outcome {
        Ok(report) => report,
        Err(sig) => return 128 + sig,
    };
    for text in &report.guest_errors {
        eprintln!("vstreamctl: {guest}: {}", escape_controls(text));
    }
    match report.result {
        Ok(exit) => exit.shell_status(),
        Err(SessionError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            128 + rustix::process::Signal::PIPE.as_raw()
        }
        Err(e) => {
            eprintln!("vstreamctl: {guest}: {e}");
            FAILURE_STATUS
        }
    }
}

/// The terminal whose size the guest's pty follows: stdin's, else stdout's.
fn local_terminal() -> Option<BorrowedFd<'static>> {
    if io::stdin().is_terminal() {
        Some(rustix::stdio::stdin())
    } else if io::stdout().is_terminal() {
        Some(rustix::stdio::stdout())
    } else {
        None
    }
}

fn size_of(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

async fn watch_size(
    term: BorrowedFd<'static>,
    mut winch: Signal,
    tx: mpsc::UnboundedSender<WindowSize>,
) {
    while winch.recv().await.is_some() {
        if let Some(size) = size_of(term) {
            if tx.send(size).is_err() {
                return;
            }
        }
    }
}

/// The signals that end vstreamctl (SIGHUP, SIGINT, SIGQUIT, SIGTERM), handled so that the
/// terminal is restored first: their numbers arrive on the returned receiver.
fn termination_signals() -> mpsc::UnboundedReceiver<i32> {
    use rustix::process::Signal as S;
    let (tx, rx) = mpsc::unbounded_channel();
    for n in [S::HUP, S::INT, S::QUIT, S::TERM].map(S::as_raw) {
        match signal(SignalKind::from_raw(n)) {
            Ok(mut s) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if s.recv().await.is_some() {
                        let _ = tx.send(n);
                    }
                });
            }
            Err(e) => eprintln!("vstreamctl: cannot handle signal {n}: {e}"),
        }
    }
    rx
}

/// `text` with control and bidirectional-override characters escaped, so that a guest's error
/// message cannot drive the local terminal.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
