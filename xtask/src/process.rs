//! Child processes that cannot outlive the lab.
//!
//! Every child is spawned
//! - in its own process group, so killing the group also ends whatever it started;
//! - with `PR_SET_PDEATHSIG(SIGKILL)`, so it dies when this process dies, even on `SIGKILL` or
//!   `std::process::exit` where no destructor runs (a `static` lab shared by tests is never dropped).
//!
//! The death signal fires when the *thread* that forked the child exits, not the process. Test harness
//! threads end after each test, so all children are forked from one spawner thread that lives as long
//! as the process.
//!
//! The pids of live children are kept in a registry, so the hard-timeout watchdog can kill them all.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

type Reply = mpsc::Sender<io::Result<Child>>;

fn spawner() -> io::Result<&'static Mutex<mpsc::Sender<(Command, Reply)>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Command, Reply)>>> = OnceLock::new();
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<(Command, Reply)>();
    let started = thread::Builder::new()
        .name("lab-spawner".into())
        .spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
    match started {
        Ok(_) => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("starting the spawner thread: {e}"),
            ))
        }
    }
    // A concurrent caller may have won the race; its spawner is used and ours ends with its channel.
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

fn registry() -> &'static Mutex<BTreeSet<u32>> {
    static PIDS: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    PIDS.get_or_init(|| Mutex::new(BTreeSet::new()))
}

/// Spawns `command` in its own process group, with SIGKILL as parent-death signal, and registers it.
pub fn spawn(command: Command) -> io::Result<Child> {
    spawn_inner(command, Grouping::ProcessGroup)
}

/// Like [`spawn`], but the child starts a new session (hence its own process group too). With
/// `controlling_tty`, its stdin (a terminal) becomes its controlling terminal.
pub fn spawn_in_session(command: Command, controlling_tty: bool) -> io::Result<Child> {
    spawn_inner(command, Grouping::Session { controlling_tty })
}

#[derive(Clone, Copy)]
enum Grouping {
    ProcessGroup,
    Session { controlling_tty: bool },
}

fn spawn_inner(mut command: Command, grouping: Grouping) -> io::Result<Child> {
    let parent = std::process::id();
    if let Grouping::ProcessGroup = grouping {
        command.process_group(0);
    }
    // SAFETY: the closure runs in the forked child before exec. It only calls async-signal-safe
    // functions (prctl, getppid, setsid, ioctl) and allocates nothing: its errors are built from raw
    // errno values.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would ever signal us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Grouping::Session { controlling_tty } = grouping {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let program = command.get_program().to_string_lossy().into_owned();
    let (reply_tx, reply_rx) = mpsc::channel();
    {
        let sender = spawner()?
            .lock()
            .map_err(|_| io::Error::other("the spawner lock is poisoned"))?;
        sender
            .send((command, reply_tx))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    }
    let child = reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread did not answer"))?
        .map_err(|e| io::Error::new(e.kind(), format!("starting {program}: {e}")))?;
    if let Ok(mut pids) = registry().lock() {
        pids.insert(child.id());
    }
    Ok(child)
}

/// Sends `signal` to the process group of a child spawned by [`spawn`] (its pid is the group id).
pub fn signal_group(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions; a negative pid addresses the process group.
    unsafe {
        libc::kill(-pid, signal);
    }
}

/// Ends a child: SIGTERM to its group, then SIGKILL after `grace`; reaps it and unregisters it.
pub fn terminate(child: &mut Child, grace: Duration) {
    let pid = child.id();
    if matches!(child.try_wait(), Ok(None)) {
        signal_group(pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    // Also ends anything left in the group after the leader exited.
    signal_group(pid, libc::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
    forget(pid);
}

/// Removes a pid from the registry (the child was reaped).
pub fn forget(pid: u32) {
    if let Ok(mut pids) = registry().lock() {
        pids.remove(&pid);
    }
}

/// SIGKILLs the process group of every registered child (watchdog and exit paths). Never blocks on a
/// lock held by a panicking thread.
pub fn kill_all() {
    let pids: Vec<u32> = match registry().try_lock() {
        Ok(pids) => pids.iter().copied().collect(),
        Err(_) => return,
    };
    for pid in pids {
        signal_group(pid, libc::SIGKILL);
    }
}

/// Waits up to `timeout` for `path` to exist (a socket or file another process creates);
/// false if it did not.
pub fn wait_for_path(path: &std::path::Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Waits up to `timeout` for a child to exit.
pub fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            forget(child.id());
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}
