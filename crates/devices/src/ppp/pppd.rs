//! Runs `pppd` on a pseudo-terminal bridged to a byte stream: how both halves carry a PPP link
//! over a channel (or a raw transport) with the real pppd.
//!
//! pppd needs a terminal (it sets the PPP line discipline on it), and `notty` is not usable here:
//! it makes pppd allocate its own pty and talk to it through its stdin/stdout with a child, which
//! would leave our side of the stream in pppd's hands. So we open the pty ourselves, put the slave
//! in raw mode (nothing is echoed back before pppd takes the line), and start
//! `pppd /dev/pts/N OPTIONS...` in a new session (pppd makes the pty its controlling terminal and
//! gets `SIGHUP` when we close the master), optionally inside a network namespace (`setns` in the
//! child before `exec`). pppd's log goes to its stdout (`nodetach`), which we read line by line.
//!
//! The bridge ends when pppd exits or the stream ends; then pppd is hung up (master closed),
//! sent `SIGTERM`, and killed after [`KILL_GRACE`].

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::ioctl::{ioctl, Getter, Opcode};
use rustix::process::{Pid, Signal};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::term::{open_pty, PtyMaster, WindowSize};

/// How long pppd may take to exit after a hang-up and `SIGTERM` before it is killed.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Bytes moved per read in each direction.
const CHUNK: usize = 64 * 1024;

/// How to start pppd.
#[derive(Debug, Clone)]
pub struct PppdCommand {
    /// The pppd binary.
    pub program: PathBuf,
    /// Options after the device name.
    pub options: Vec<String>,
    /// A network namespace to run it in (a file such as `/run/netns/NAME`).
    pub netns: Option<PathBuf>,
}

/// Why a bridge ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeEnd {
    /// pppd exited (its status as text).
    PppdExited(String),
    /// The stream ended or failed (why).
    StreamEnded(String),
}

impl std::fmt::Display for BridgeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeEnd::PppdExited(s) => write!(f, "pppd exited ({s})"),
            BridgeEnd::StreamEnded(s) => write!(f, "the link's stream ended ({s})"),
        }
    }
}

/// A started pppd and the master side of its terminal.
struct Pppd {
    child: Child,
    pid: Pid,
    master: Arc<PtyMaster>,
    /// A copy of the slave, to see when pppd has put the PPP line discipline on it.
    probe: OwnedFd,
}

/// The PPP line discipline (`N_PPP` of `<linux/tty.h>`).
const N_PPP: libc::c_int = 3;

/// How long the bridge holds the peer's bytes back while pppd sets up its terminal.
const LDISC_WAIT: Duration = Duration::from_secs(10);

/// Waits until pppd has switched its terminal to the PPP line discipline (or [`LDISC_WAIT`]).
/// Until then the terminal is in its ordinary discipline, which pppd flushes when it switches:
/// bytes written before would be lost (and the peer's first Configure-Request with them,
/// costing a 3 s retransmission).
async fn wait_for_ppp_ldisc(probe: &OwnedFd) {
    let deadline = tokio::time::Instant::now() + LDISC_WAIT;
    while tokio::time::Instant::now() < deadline {
        // SAFETY: TIOCGETD writes one int, the Getter's output type; `probe` is an open
        // terminal descriptor.
        let ldisc = unsafe {
            ioctl(
                probe,
                Getter::<{ libc::TIOCGETD as Opcode }, libc::c_int>::new(),
            )
        };
        if ldisc.is_err() || ldisc == Ok(N_PPP) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn(cmd: &PppdCommand) -> io::Result<(Pppd, tokio::process::ChildStdout)> {
    let size = WindowSize { rows: 24, cols: 80 };
    let (master, slave) = open_pty(size)?;
    let tty = rustix::pty::ptsname(&master, Vec::new())?;
    let tty = PathBuf::from(OsString::from_vec(tty.into_bytes()));
    // Raw before pppd sees it: the line discipline would otherwise echo the peer's first frames.
    let mut termios = rustix::termios::tcgetattr(&slave)?;
    termios.make_raw();
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &termios)?;
    let netns = match &cmd.netns {
        Some(path) => Some(File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("network namespace {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    let probe = slave.try_clone()?;
    let mut c = Command::new(&cmd.program);
    crate::spawn::undo_inherited(c.as_std_mut());
    c.arg(&tty)
        .args(&cmd.options)
        .stdin(slave)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let ns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: setsid and setns are raw system calls (no allocation, no locks), and
    // `ns_fd` is a descriptor opened above and kept open by `netns` until after the spawn (it is
    // close-on-exec, so pppd does not inherit it). Errors become `io::Error::from_raw_os_error`,
    // which does not allocate.
    unsafe {
        c.pre_exec(move || {
            rustix::process::setsid()?;
            if let Some(fd) = ns_fd {
                // SAFETY: `fd` stays open in the child until exec (see above).
                let fd = BorrowedFd::borrow_raw(fd);
                move_into_link_name_space(fd, Some(LinkNameSpaceType::Network))?;
            }
            Ok(())
        });
    }
    let mut child = c.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run {}: {e}", cmd.program.display()),
        )
    })?;
    drop(c);
    drop(netns);
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::other("pppd has no pid"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("pppd's stdout is missing"))?;
    let master = Arc::new(PtyMaster::new(master)?);
    Ok((
        Pppd {
            child,
            pid,
            master,
            probe,
        },
        stdout,
    ))
}

/// Runs pppd (as `cmd` says) on a new pty and moves bytes between the pty and `stream` until
/// either ends; `log` gets every line pppd prints. pppd is stopped before this returns.
pub async fn run<S>(
    cmd: &PppdCommand,
    stream: S,
    mut log: impl FnMut(&str) + Send,
) -> io::Result<BridgeEnd>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (pppd, stdout) = spawn(cmd)?;
    let Pppd {
        mut child,
        pid,
        master,
        probe,
    } = pppd;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut to_pppd = {
        let master = master.clone();
        Box::pin(async move {
            wait_for_ppp_ldisc(&probe).await;
            drop(probe);
            let mut buf = vec![0u8; CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => return "closed by the peer".to_owned(),
                    Ok(n) => {
                        if let Err(e) = master.write_all(&buf[..n]).await {
                            return format!("writing to pppd's terminal failed: {e}");
                        }
                    }
                    Err(e) => return e.to_string(),
                }
            }
        })
    };
    let mut from_pppd = {
        let master = master.clone();
        Box::pin(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match master.read(&mut buf).await {
                    // pppd closed its terminal: it is exiting; its status says why.
                    Ok(0) => std::future::pending::<()>().await,
                    Ok(n) => {
                        if let Err(e) = wr.write_all(&buf[..n]).await {
                            return e.to_string();
                        }
                    }
                    Err(e) => return format!("reading pppd's terminal failed: {e}"),
                }
            }
        })
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut logger = Box::pin(async {
        while let Ok(Some(line)) = lines.next_line().await {
            log(&line);
        }
    });
    let mut logged = false;
    let end = loop {
        tokio::select! {
            why = &mut to_pppd => break BridgeEnd::StreamEnded(why),
            why = &mut from_pppd => break BridgeEnd::StreamEnded(why),
            status = child.wait() => break BridgeEnd::PppdExited(match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            }),
            () = &mut logger, if !logged => logged = true,
        }
    };
    // Hang up: pppd gets SIGHUP once the master is closed; the bridge futures hold the other
    // references (and the stream, which is closed with them).
    drop(to_pppd);
    drop(from_pppd);
    drop(master);
    if let BridgeEnd::StreamEnded(_) = end {
        let _ = rustix::process::kill_process(pid, Signal::TERM);
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
            let _ = child.wait().await;
        }
    }
    // pppd's last words (why it exited) may still be in the pipe.
    if !logged {
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut logger).await;
    }
    Ok(end)
}
