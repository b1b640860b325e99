//! The tty device end to end on the host: vstreamd and vstreamctl as processes, the agent
//! in-process. Exit statuses, pipes (binary, 16 MiB), an interactive session on a real pty
//! (raw mode, typing, resize, restore), and many sessions at once.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use vstream_agent::Agent;

use common::{ctl_input, ctl_input_async, Daemon, Options};

/// vstreamd accepting agents on DIR/agents.sock, and an agent named `g` connected to it.
async fn daemon_and_agent() -> (Daemon, Agent) {
    let d = Options::new()
        .arg("--listen")
        .arg("unix-listen:DIR/agents.sock")
        .arg("--allow-announced")
        .wait_for_file("DIR/agents.sock")
        .start();
    let agent = Agent::start("g", vec![d.unix("agents.sock")]);
    d.wait_for("the agent to connect", |s| {
        s["guests"][0]["connected"] == true
    })
    .await;
    (d, agent)
}

fn status(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "vstreamctl died of signal {:?}: {}",
            out.status.signal(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses_pipes_and_errors() {
    let (d, _agent) = daemon_and_agent().await;
    let c = &d.control;

    let out = ctl_input_async(c, &["exec", "g", "--", "sh", "-c", "exit 7"], b"").await;
    assert_eq!(status(&out), 7, "{}", String::from_utf8_lossy(&out.stderr));
    let out = ctl_input_async(c, &["shell", "g", "--", "sh", "-c", "kill -9 $$"], b"").await;
    assert_eq!(status(&out), 137);

    let out = ctl_input_async(c, &["shell", "g", "--", "cat"], b"x").await;
    assert_eq!(status(&out), 0);
    assert_eq!(out.stdout, b"x");

    let out = ctl_input_async(
        c,
        &["exec", "g", "--", "sh", "-c", "echo out; echo err >&2"],
        b"",
    )
    .await;
    assert_eq!(status(&out), 0);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = ctl_input_async(c, &["exec", "g", "--", "/nonexistent/cmd"], b"").await;
    assert_eq!(status(&out), 127);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vstreamctl: g: cannot run \"/nonexistent/cmd\""),
        "{err}"
    );

    // Without a terminal, -t still gives the command a pty; -T refuses one.
    let out = ctl_input_async(c, &["shell", "g", "-t", "--", "tty"], b"").await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"));
    let out = ctl_input_async(c, &["shell", "g", "-T", "--", "tty"], b"").await;
    assert_eq!(out.stdout, b"not a tty\n");
    assert_eq!(status(&out), 1);

    // A guest that does not exist: vstreamctl's own error, status 1.
    let out = ctl_input_async(c, &["exec", "nope", "--", "true"], b"").await;
    assert_eq!(status(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guest named \"nope\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_of_random_bytes_round_trip_through_cat() {
    let (d, _agent) = daemon_and_agent().await;
    let mut data = vec![0u8; 16 * 1024 * 1024];
    rand::rng().fill_bytes(&mut data);
    let t = Instant::now();
    let out = ctl_input_async(&d.control, &["exec", "g", "--", "cat"], &data).await;
    let took = t.elapsed();
    assert_eq!(status(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "the bytes came back changed");
    eprintln!(
        "16 MiB through vstreamctl exec cat and back: {took:?} ({:.0} MiB/s each way)",
        16.0 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_at_once() {
    let (d, _agent) = daemon_and_agent().await;
    const SESSIONS: usize = 32;
    let t = Instant::now();
    let runs: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let control = d.control.clone();
            tokio::task::spawn_blocking(move || {
                let input: Vec<u8> = (0..64 * 1024).map(|j| (i * 7 + j) as u8).collect();
                let code = (i % 100).to_string();
                let script = format!("cat; exit {code}");
                let out = ctl_input(&control, &["exec", "g", "--", "sh", "-c", &script], &input);
                (i, input, out)
            })
        })
        .collect();
    for run in runs {
        let (i, input, out) = run.await.expect("session");
        assert_eq!(status(&out), (i % 100) as i32, "session {i}");
        assert!(out.stdout == input, "session {i}: output differs");
    }
    eprintln!(
        "{SESSIONS} concurrent sessions of 64 KiB each: {:?}",
        t.elapsed()
    );
}

/// A pseudo-terminal played by the test: what the program writes is collected by a thread.
struct Terminal {
    master: File,
    screen: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl Terminal {
    /// A new pty of the given size: (terminal, slave).
    fn open(rows: u16, cols: u16) -> (Terminal, OwnedFd) {
        use rustix::pty::OpenptFlags;
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master = rustix::pty::openpt(flags).expect("openpt");
        rustix::pty::grantpt(&master).expect("grantpt");
        rustix::pty::unlockpt(&master).expect("unlockpt");
        let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags).expect("slave");
        let master = File::from(master);
        let t = Terminal {
            master,
            screen: Arc::default(),
        };
        t.resize(rows, cols);
        let mut reader = t.master.try_clone().expect("dup");
        let screen = t.screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every slave descriptor is closed.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                let (lock, cv) = &*screen;
                lock.lock().expect("screen").extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
        });
        (t, slave)
    }

    /// Sets the size; the kernel sends SIGWINCH to the terminal's foreground process group.
    fn resize(&self, rows: u16, cols: u16) {
        let ws = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.master, ws).expect("TIOCSWINSZ");
    }

    fn type_keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).expect("type");
    }

    fn mark(&self) -> usize {
        self.screen.0.lock().expect("screen").len()
    }

    /// Waits until `needle` appears after `mark`; returns everything after `mark`.
    fn expect(&self, mark: usize, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (lock, cv) = &*self.screen;
        let mut screen = lock.lock().expect("screen");
        loop {
            let text = String::from_utf8_lossy(&screen[mark.min(screen.len())..]).into_owned();
            if text.contains(needle) {
                return text;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{needle:?} did not appear; the terminal shows:\n{text}"
            );
            screen = cv.wait_timeout(screen, deadline - now).expect("screen").0;
        }
    }
}

/// Starts vstreamctl on the pty `slave` as its controlling terminal, as a login shell would.
fn ctl_on_terminal(control: &Path, args: &[&str], slave: OwnedFd) -> Child {
    let slave = File::from(slave);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vstreamctl"));
    cmd.arg("--control")
        .arg(control)
        .args(args)
        .env("TERM", "xterm-vstream-test")
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave);
    // SAFETY: runs in the child between fork and exec; it makes two raw system calls through
    // rustix (setsid, then TIOCSCTTY on fd 0, the pty slave), which allocate nothing and take
    // no locks, so they are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            Ok(())
        });
    }
    cmd.spawn().expect("spawn vstreamctl")
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vstreamctl did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until vstreamctl has put the terminal in raw mode (before that, keys are echoed
/// locally).
fn wait_raw(term: &Terminal) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cooked(&term.master) {
        assert!(Instant::now() < deadline, "the terminal never went raw");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the terminal of `fd` is in cooked mode (echo and line editing on).
fn cooked(fd: impl AsFd) -> bool {
    use rustix::termios::LocalModes;
    let t = rustix::termios::tcgetattr(fd).expect("tcgetattr");
    t.local_modes
        .contains(LocalModes::ECHO | LocalModes::ICANON)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_shell_on_a_real_terminal() {
    let (d, _agent) = daemon_and_agent().await;
    let control = d.control.clone();
    tokio::task::spawn_blocking(move || {
        let (mut term, slave) = Terminal::open(30, 100);
        let mut ctl = ctl_on_terminal(&control, &["shell", "g"], slave);
        wait_raw(&term);
        let m = term.mark();
        term.type_keys("echo $((6*7))\r");
        term.expect(m, "42\r\n");
        let m = term.mark();
        term.type_keys("stty size; echo $TERM\r");
        let text = term.expect(m, "xterm-vstream-test\r\n");
        assert!(text.contains("30 100\r\n"), "{text}");
        // Resize the terminal: vstreamctl gets SIGWINCH from the kernel and sends the size.
        term.resize(50, 132);
        let m = term.mark();
        term.type_keys("stty size\r");
        term.expect(m, "50 132\r\n");
        term.type_keys("exit 3\r");
        let st = wait_exit(&mut ctl);
        assert_eq!(st.code(), Some(3));
        assert!(cooked(&term.master), "the terminal was not restored");
    })
    .await
    .expect("interactive session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_to_vstreamctl_restores_the_terminal_and_hangs_up_the_guest() {
    let (d, _agent) = daemon_and_agent().await;
    let control = d.control.clone();
    tokio::task::spawn_blocking(move || {
        let (mut term, slave) = Terminal::open(24, 80);
        let mut ctl = ctl_on_terminal(&control, &["shell", "g", "--", "sh"], slave);
        wait_raw(&term);
        let m = term.mark();
        // The quotes keep the echoed keys from matching what the command prints.
        term.type_keys("echo pid=$$ e''nd\r");
        let text = term.expect(m, " end\r\n");
        let pid: i32 = text
            .rsplit("pid=")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {text:?}"));
        let remote = rustix::process::Pid::from_raw(pid).expect("pid");
        assert!(rustix::process::test_kill_process(remote).is_ok());
        let local = rustix::process::Pid::from_child(&ctl);
        rustix::process::kill_process(local, rustix::process::Signal::TERM).expect("kill");
        let st = wait_exit(&mut ctl);
        assert_eq!(st.code(), Some(128 + 15));
        assert!(cooked(&term.master), "the terminal was not restored");
        // The guest's shell was hung up when the channel closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::process::test_kill_process(remote).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the guest shell {pid} still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("signal");
}
