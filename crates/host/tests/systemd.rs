//! vstreamd as systemd runs it: the control socket passed as descriptor 3 (LISTEN_FDS, as
//! vstreamd.socket does), READY=1 and STATUS= on NOTIFY_SOCKET, WATCHDOG=1 with WATCHDOG_USEC.

mod common;

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills vstreamd when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// vstreamd started the way systemd starts it: `listener` as descriptor 3 named `control`,
/// `LISTEN_PID` its own pid (the shell's `$$`, kept by `exec`), `NOTIFY_SOCKET` and
/// `WATCHDOG_USEC` from `env`. `--control` is `DIR/control.sock`, unused when a socket is passed.
fn start_activated(dir: &Path, listener: Option<&UnixListener>, env: &[(&str, String)]) -> Killed {
    let log = std::fs::File::create(dir.join("vstreamd.log")).expect("log");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"[ -n "$FDS" ] && export LISTEN_PID=$$ LISTEN_FDS=$FDS LISTEN_FDNAMES=control; unset FDS; exec "$@""#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_vstreamd"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(log);
    if let Some(listener) = listener {
        cmd.env("FDS", "1");
        let fd = listener.as_raw_fd();
        // SAFETY: between fork and exec this only makes system calls (fcntl, dup2) that are
        // async-signal-safe, on descriptors the child owns; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                // SAFETY: `fd` is the listener's descriptor, open in the child (a copy of ours).
                let listener = BorrowedFd::borrow_raw(fd);
                if fd == 3 {
                    rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty())?;
                } else {
                    // SAFETY: descriptor 3 becomes the listener's copy; never closed here
                    // (ManuallyDrop), exec hands it to vstreamd.
                    let mut three = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(3));
                    rustix::io::dup2(listener, &mut three)?;
                }
                Ok(())
            });
        }
    }
    Killed(cmd.spawn().expect("spawn vstreamd"))
}

/// The datagrams on `socket` until one contains `want`, or a failure after 10 s with what came.
fn wait_message(socket: &UnixDatagram, want: &str, dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.lines().any(|l| l == want);
            got.push(text);
            if done {
                return got;
            }
        }
    }
    panic!(
        "no {want:?} on NOTIFY_SOCKET within 10 s; got {got:?}; vstreamd's log:\n{}",
        std::fs::read_to_string(dir.join("vstreamd.log")).unwrap_or_default()
    );
}

#[test]
fn serves_the_control_socket_systemd_passes_and_says_ready() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&control).unwrap();
    let notify = UnixDatagram::bind(dir.path().join("notify")).unwrap();
    let _vstreamd = start_activated(
        dir.path(),
        Some(&listener),
        &[(
            "NOTIFY_SOCKET",
            dir.path().join("notify").display().to_string(),
        )],
    );
    // The daemon has its own copy; ours must not take connections meant for it.
    drop(listener);

    let messages = wait_message(&notify, "READY=1", dir.path());
    let ready = messages.last().unwrap();
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=") && l.contains("0 guests")),
        "READY=1 comes with the guest count: {ready:?}"
    );

    // A request on the inherited socket is answered: vstreamd serves it, not a socket of its own.
    let status = common::status(&control);
    assert!(
        status["guests"].is_array(),
        "status through the passed socket: {status}"
    );
    assert!(
        !dir.path().join("control.sock").exists(),
        "vstreamd bound --control although systemd passed the control socket"
    );
}

#[test]
fn pets_the_watchdog_and_binds_its_own_socket_without_activation() {
    let dir = tempfile::tempdir().unwrap();
    let notify = UnixDatagram::bind(dir.path().join("notify")).unwrap();
    let _vstreamd = start_activated(
        dir.path(),
        None,
        &[
            (
                "NOTIFY_SOCKET",
                dir.path().join("notify").display().to_string(),
            ),
            // 400 ms: WATCHDOG=1 every 200 ms.
            ("WATCHDOG_USEC", "400000".into()),
        ],
    );
    wait_message(&notify, "READY=1", dir.path());
    let started = Instant::now();
    wait_message(&notify, "WATCHDOG=1", dir.path());
    wait_message(&notify, "WATCHDOG=1", dir.path());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "two watchdog pings took {:?} with WatchdogSec=400ms",
        started.elapsed()
    );
    let status = common::status(&dir.path().join("control.sock"));
    assert!(status["guests"].is_array(), "status: {status}");
}
