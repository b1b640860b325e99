//! Helpers the end-to-end tests (xtask/tests) share: they panic with the reason (and dump the
//! lab's logs where that helps) instead of returning errors.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{strip_ansi, Lab};

/// `len` incompressible bytes (xorshift64), the same for the same `seed` every run.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Writes a file of `len` pseudo-random bytes (see [`pseudo_random`]).
pub fn write_random_file(path: &Path, len: usize) {
    std::fs::write(path, pseudo_random(len, 0x9E37_79B9_7F4A_7C15)).expect("write");
}

/// Runs `vstreamctl ARGS` with `input` on its stdin within `timeout`; on a timeout dumps the
/// lab's logs and panics.
pub fn ctl(lab: &Lab, args: &[&str], input: &[u8], timeout: Duration) -> Output {
    lab.ctl_within(args, input, timeout).unwrap_or_else(|e| {
        lab.dump_logs("vstreamctl did not finish");
        panic!("vstreamctl {args:?}: {e}")
    })
}

/// Runs `vstreamctl ARGS` (stdin empty) within `timeout`; it must succeed (else the lab's logs
/// are dumped). Its stdout.
pub fn ctl_ok(lab: &Lab, args: &[&str], timeout: Duration) -> String {
    let out = ctl(lab, args, &[], timeout);
    if !out.status.success() {
        lab.dump_logs("vstreamctl failed");
        panic!(
            "vstreamctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sh -c SCRIPT` in the guest through the agent (`vstreamctl exec`); it must succeed.
/// Its stdout.
pub fn exec_sh(lab: &Lab, script: &str) -> String {
    exec_sh_within(lab, script, super::CTL_TIMEOUT)
}

/// [`exec_sh`] for commands that may take longer than the usual `vstreamctl` timeout.
pub fn exec_sh_within(lab: &Lab, script: &str, timeout: Duration) -> String {
    let out = lab
        .ctl_within(["exec", lab.name(), "--", "sh", "-c", script], &[], timeout)
        .unwrap_or_else(|e| panic!("vstreamctl exec: {e}"));
    assert!(
        out.status.success(),
        "`{script}` in the guest failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a short, idempotent command in the guest's shell on hvc0 and returns its output
/// (between two markers). The console helper types the line again if its answer is slow, so
/// anything that must run once goes through [`bg`].
pub fn sh(lab: &Lab, cmd: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(1000);
    let n = N.fetch_add(2, Ordering::SeqCst);
    // The markers appear computed only in the output, never in the echo of the typed line.
    let line = format!("echo B-$(({n}+1)); {cmd}; echo E-$(({n}+2))");
    let (b, e) = (format!("B-{}", n + 1), format!("E-{}", n + 2));
    let shown = lab
        .console_roundtrip("hvc0", &line, &e, Duration::from_secs(120))
        .unwrap_or_else(|err| panic!("{err}"));
    let text = strip_ansi(&shown);
    let end = text.rfind(&e).unwrap_or(text.len());
    let start = text[..end].rfind(&b).map(|i| i + b.len()).unwrap_or(0);
    text[start.min(end)..end].trim().to_owned()
}

/// Starts `cmd` in the background in the guest, exactly once (a marker file guards against the
/// line being typed twice); its output and then `DONE-rc=N` go to /tmp/ID.out.
pub fn bg(lab: &Lab, id: &str, cmd: &str) {
    sh(
        lab,
        &format!(
            "[ -e /tmp/{id}.started ] || {{ touch /tmp/{id}.started; ( {cmd} ) > /tmp/{id}.out 2>&1; echo DONE-rc=$? >> /tmp/{id}.out; }} & true"
        ),
    );
}

/// Waits until /tmp/ID.out of a [`bg`] command contains `needle`; returns it.
pub fn wait_out(lab: &Lab, id: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = sh(lab, &format!("cat /tmp/{id}.out"));
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "/tmp/{id}.out never showed {needle:?}: {text}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// The SHA-256 of bytes, hex (`sha256sum`).
pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let writer = thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().expect("sha256sum");
    writer.join().expect("writer").expect("write");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The SHA-256 of a host file, hex (`sha256sum`).
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `vstreamctl jobs GUEST --json`: the guest's print jobs.
pub fn print_jobs(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lab
        .ctl(["jobs", lab.name(), "--json"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("jobs JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls [`print_jobs`] (at most 120 s) until `pred` holds; returns the jobs then.
pub fn wait_print_jobs(
    lab: &Lab,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = print_jobs(lab);
        if pred(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {j:#?}"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// A network namespace made with `ip netns add` (needs root), deleted on drop: where vstreamd's
/// PPP backend puts the host end of a guest's link in the ppp tests.
pub struct NetNs(pub String);

impl NetNs {
    /// `ip netns add vs-ppp-TAG-PID`.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vs-ppp-{tag}-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed: {} (the test needs root)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        NetNs(name)
    }

    /// Runs `cmd` inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs `f` on a short-lived thread inside the namespace: the sockets it makes keep the
    /// namespace.
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(format!("/run/netns/{}", self.0)).expect("open the namespace");
        thread::spawn(move || {
            // SAFETY: setns takes an open descriptor (kept open by `file` for the call) and a
            // namespace type; it moves only this short-lived thread into the namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A listening TCP socket made inside the namespace.
    pub fn listen(&self, addr: Ipv4Addr) -> TcpListener {
        self.inside(move || TcpListener::bind((addr, 0)).expect("bind in the namespace"))
    }

    /// A TCP connection made from inside the namespace.
    pub fn connect(&self, addr: Ipv4Addr, port: u16) -> std::io::Result<std::net::TcpStream> {
        self.inside(move || std::net::TcpStream::connect((addr, port)))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Accepts one connection on `listener` and reads it to the end, on a thread; returns the bytes
/// and the time from the connection to the end.
pub fn receive_one(listener: TcpListener) -> thread::JoinHandle<(Vec<u8>, Duration)> {
    thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let start = Instant::now();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        (got, start.elapsed())
    })
}

/// Bytes (received, sent) by vstreamd on the guest's `qga` channels.
pub fn qga_bytes(lab: &Lab, status: &serde_json::Value) -> (u64, u64) {
    super::guest_status(status, lab.name())
        .and_then(|g| g["channels"].as_array())
        .into_iter()
        .flatten()
        .filter(|c| c["class"] == "qga")
        .fold((0, 0), |(i, o), c| {
            (
                i + c["bytes_in"].as_u64().unwrap_or(0),
                o + c["bytes_out"].as_u64().unwrap_or(0),
            )
        })
}
