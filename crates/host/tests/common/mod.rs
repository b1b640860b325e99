//! The harness every host integration test shares: a vstreamd (a process running the built
//! binary, or a daemon in this test's process) in a temporary directory, vstreamctl runs
//! against its control socket, and polling of `vstreamctl status --json`.
//!
//! Config text, arguments and file names may say `DIR`: it stands for the daemon's directory.

// Each test binary uses a subset of this module.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod metrics;

/// How long `wait_for` and friends poll before failing.
pub const WAIT: Duration = Duration::from_secs(15);

/// A running vstreamd in its own temporary directory: killed (or stopped serving) on drop.
pub struct Daemon {
    run: Run,
    /// The control socket.
    pub control: PathBuf,
    /// The daemon's directory (`DIR`): config, state, log, and the tests' sockets.
    pub dir: tempfile::TempDir,
}

enum Run {
    Process {
        child: Child,
        /// The arguments and environment it was started with, for `restart`.
        cmd: (Vec<OsString>, Vec<(String, String)>),
    },
    InProcess {
        daemon: Arc<vstream_host::daemon::Daemon>,
        serving: tokio::task::JoinHandle<()>,
    },
}

impl Drop for Daemon {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::InProcess { serving, .. } => serving.abort(),
        }
    }
}

impl Daemon {
    /// A path in the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `unix:DIR/NAME` parsed as an address (for `Agent::start`).
    pub fn unix<T: FromStr>(&self, name: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        format!("unix:{}", self.path(name).display())
            .parse()
            .expect("address")
    }

    /// The vstreamd process's id.
    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Process { child, .. } => child.id(),
            Run::InProcess { .. } => std::process::id(),
        }
    }

    /// What vstreamd has logged so far (empty for an in-process daemon).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("vstreamd.log")).unwrap_or_default()
    }

    /// The in-process daemon, to emit events or reach its guests.
    pub fn inner(&self) -> &Arc<vstream_host::daemon::Daemon> {
        match &self.run {
            Run::InProcess { daemon, .. } => daemon,
            Run::Process { .. } => panic!("vstreamd runs as a process"),
        }
    }

    /// Kills vstreamd with SIGKILL (a crash: no cleanup, its socket files stay) and reaps it.
    pub fn kill9(&mut self) {
        let Run::Process { child, .. } = &mut self.run else {
            panic!("only a vstreamd process can be killed");
        };
        child.kill().expect("SIGKILL vstreamd");
        child.wait().expect("reap vstreamd");
    }

    /// Starts vstreamd again as it was started, on the same directory (its log continues in
    /// `DIR/vstreamd.log`); returns as soon as the process is spawned, so that the caller can
    /// time what follows from the new daemon's start.
    pub fn restart(&mut self) {
        let Run::Process { child, cmd } = &mut self.run else {
            panic!("only a vstreamd process can be restarted");
        };
        assert!(
            child.try_wait().expect("vstreamd state").is_some(),
            "vstreamd is still running"
        );
        *child = spawn_vstreamd(&cmd.0, &cmd.1, &self.dir.path().join("vstreamd.log"));
    }

    /// `vstreamctl status --json`, which must succeed.
    pub async fn status(&self) -> Value {
        status_async(&self.control).await
    }

    /// Polls the status until `pred` holds (for up to `WAIT`).
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_within(what, WAIT, pred).await
    }

    /// Polls the status until `pred` holds; on timeout shows the status and vstreamd's log.
    pub async fn wait_for_within(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:#}\nvstreamd log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until guest `guest` is connected.
    pub async fn wait_connected(&self, guest: &str) -> Value {
        self.wait_for(&format!("{guest} to connect"), |s| connected(s, guest))
            .await
    }
}

/// Whether `status` shows guest `guest` connected.
pub fn connected(status: &Value, guest: &str) -> bool {
    status["guests"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|g| g["name"] == guest && g["connected"] == true)
}

/// How to start a daemon: `Options::config(TEXT).start()`, `Options::new().arg(..)...`.
pub struct Options {
    config: Option<String>,
    state_dir: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    wait: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            config: None,
            state_dir: "DIR/state".into(),
            args: Vec::new(),
            env: Vec::new(),
            wait: Vec::new(),
        }
    }
}

/// vstreamd (a process) with this config text.
pub fn start_daemon(config: &str) -> Daemon {
    Options::config(config).start()
}

impl Options {
    /// No config file.
    pub fn new() -> Options {
        Options::default()
    }

    /// Config text, written to `DIR/vstreamd.toml`.
    pub fn config(text: &str) -> Options {
        Options {
            config: Some(text.into()),
            ..Options::default()
        }
    }

    /// The state directory (default `DIR/state`).
    pub fn state_dir(mut self, path: &str) -> Options {
        self.state_dir = path.into();
        self
    }

    /// One more vstreamd argument.
    pub fn arg(mut self, arg: &str) -> Options {
        self.args.push(arg.into());
        self
    }

    /// An environment variable for vstreamd.
    pub fn env(mut self, key: &str, value: &str) -> Options {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Another file (besides the control socket) that must exist before `start` returns.
    pub fn wait_for_file(mut self, path: &str) -> Options {
        self.wait.push(path.into());
        self
    }

    /// Starts vstreamd as a process (stderr to `DIR/vstreamd.log`) and waits for its control
    /// socket and the `wait_for_file` files.
    pub fn start(self) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |s: &str| s.replace("DIR", &dir.path().display().to_string());
        let control = dir.path().join("control.sock");
        let mut args: Vec<OsString> = vec!["--control".into(), control.clone().into()];
        if let Some(text) = &self.config {
            let path = dir.path().join("vstreamd.toml");
            std::fs::write(&path, at(text)).expect("config");
            args.extend(["--config".into(), path.into()]);
        }
        args.extend(["--state-dir".into(), at(&self.state_dir).into()]);
        args.extend(self.args.iter().map(|a| OsString::from(at(a))));
        let env: Vec<(String, String)> = self.env.iter().map(|(k, v)| (k.clone(), at(v))).collect();
        let child = spawn_vstreamd(&args, &env, &dir.path().join("vstreamd.log"));
        let waits: Vec<PathBuf> = self.wait.iter().map(|w| PathBuf::from(at(w))).collect();
        let d = Daemon {
            run: Run::Process {
                child,
                cmd: (args, env),
            },
            control,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.control.exists() || !waits.iter().all(|w| w.exists()) {
            assert!(
                Instant::now() < deadline,
                "vstreamd did not start (no control socket or {waits:?}); its log:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Starts the daemon in this process (`vstream_host::daemon::Daemon`) serving its control
    /// socket; needs a config. Arguments and environment do not apply.
    pub async fn start_in_process(self) -> Daemon {
        assert!(
            self.args.is_empty() && self.env.is_empty(),
            "an in-process daemon takes no arguments or environment"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |s: &str| s.replace("DIR", &dir.path().display().to_string());
        let path = dir.path().join("vstreamd.toml");
        let text = self
            .config
            .as_deref()
            .expect("an in-process daemon needs a config");
        std::fs::write(&path, at(text)).expect("config");
        let cfg = vstream_host::config::Config::load(&path).expect("config loads");
        let daemon = vstream_host::daemon::Daemon::start(&cfg, at(&self.state_dir).into())
            .await
            .expect("daemon");
        let control = dir.path().join("control.sock");
        let serving = {
            let daemon = daemon.clone();
            let control = control.clone();
            tokio::spawn(async move {
                let _ = daemon.serve_control(&control).await;
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() || !self.wait.iter().all(|w| Path::new(&at(w)).exists()) {
            assert!(Instant::now() < deadline, "the daemon did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Daemon {
            run: Run::InProcess { daemon, serving },
            control,
            dir,
        }
    }
}

/// vstreamd with `args` and `env`, its stderr appended to `log`.
fn spawn_vstreamd(args: &[OsString], env: &[(String, String)], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    Command::new(env!("CARGO_BIN_EXE_vstreamd"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(log)
        .spawn()
        .expect("spawn vstreamd")
}

fn vstreamctl(control: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vstreamctl"));
    cmd.arg("--control").arg(control).args(args);
    cmd
}

/// Runs vstreamctl with no stdin.
pub fn ctl(control: &Path, args: &[&str]) -> Output {
    vstreamctl(control, args)
        .stdin(Stdio::null())
        .output()
        .expect("vstreamctl")
}

/// Runs vstreamctl with no stdin as another user: uid `uid`, primary group `gid`, no
/// supplementary groups (the tests run as root).
pub fn ctl_as(control: &Path, uid: u32, gid: u32, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    vstreamctl(control, args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("vstreamctl")
}

/// `ctl_as` on a blocking thread.
pub async fn ctl_as_async(control: &Path, uid: u32, gid: u32, args: &[&str]) -> Output {
    let (control, args) = (control.to_owned(), owned(args));
    blocking(move || ctl_as(&control, uid, gid, &borrowed(&args))).await
}

/// vstreamctl as another user (see `ctl_as`) with stdout on a pipe, for commands that stream.
pub fn spawn_ctl_as(control: &Path, uid: u32, gid: u32, args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    vstreamctl(control, args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstreamctl")
}

/// Runs vstreamctl with `stdin` on a pipe; collects stdout and stderr. The command may exit
/// without reading all of its input.
pub fn ctl_input(control: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let (out, _written) = ctl_piped(control, args, stdin);
    out
}

/// As `ctl_input`, and vstreamctl must read all of `stdin`.
pub fn ctl_input_all(control: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let (out, written) = ctl_piped(control, args, stdin);
    written.expect("stdin write");
    out
}

fn ctl_piped(control: &Path, args: &[&str], stdin: &[u8]) -> (Output, std::io::Result<()>) {
    let mut child = vstreamctl(control, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstreamctl");
    let input = stdin.to_vec();
    let mut pipe = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || pipe.write_all(&input));
    let out = child.wait_with_output().expect("vstreamctl");
    (out, writer.join().expect("writer"))
}

/// Runs `f` on a blocking thread (the agent may run on this test's runtime).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("join")
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn borrowed(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `ctl` on a blocking thread.
pub async fn ctl_async(control: &Path, args: &[&str]) -> Output {
    let (control, args) = (control.to_owned(), owned(args));
    blocking(move || ctl(&control, &borrowed(&args))).await
}

/// `ctl_input` on a blocking thread.
pub async fn ctl_input_async(control: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let (control, args, stdin) = (control.to_owned(), owned(args), stdin.to_vec());
    blocking(move || ctl_input(&control, &borrowed(&args), &stdin)).await
}

/// `ctl_input_all` on a blocking thread.
pub async fn ctl_input_all_async(control: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let (control, args, stdin) = (control.to_owned(), owned(args), stdin.to_vec());
    blocking(move || ctl_input_all(&control, &borrowed(&args), &stdin)).await
}

/// Asserts vstreamctl succeeded; its stdout.
pub fn ok(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "vstreamctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `vstreamctl status --json`, which must succeed.
pub fn status(control: &Path) -> Value {
    let args = ["status", "--json"];
    let out = ok(&args, ctl(control, &args));
    serde_json::from_str(&out).expect("status JSON")
}

/// `status` on a blocking thread.
pub async fn status_async(control: &Path) -> Value {
    let control = control.to_owned();
    blocking(move || status(&control)).await
}

/// A guest that speaks the protocol itself instead of running the agent, for tests that send
/// what the agent would not: a mux announcing `name`, connected to `unix:DIR/SOCKET`; keep the
/// receiver of incoming channels alive as long as the guest.
pub fn raw_guest(
    d: &Daemon,
    name: &str,
    socket: &str,
) -> (
    vstream_link::Mux,
    tokio::sync::mpsc::UnboundedReceiver<vstream_link::Incoming>,
) {
    raw_guest_at(name, d.unix(socket))
}

/// As `raw_guest`, on the first connection of `addr` (`unix-listen:` where QEMU would listen).
pub fn raw_guest_at(
    name: &str,
    addr: vstream_transport::Address,
) -> (
    vstream_link::Mux,
    tokio::sync::mpsc::UnboundedReceiver<vstream_link::Incoming>,
) {
    let (mux, incoming) = vstream_link::Mux::new(
        vstream_wire::Config::new(vstream_wire::Role::Guest, name),
        5,
    );
    let m = mux.clone();
    tokio::spawn(async move {
        // vstreamd binds its guests' listeners after its control socket answers: on a busy
        // machine the first tries may find no socket yet.
        let deadline = Instant::now() + WAIT;
        let c = loop {
            let mut ep = vstream_transport::Endpoint::bind(addr.clone())
                .await
                .expect("bind");
            match ep.next().await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("{addr}: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connect: {e:?}"),
            }
        };
        m.run_link(
            c.stream,
            vstream_link::link_params(&addr, None, 0),
            "t",
            &[],
        )
        .await;
    });
    (mux, incoming)
}

/// Prints one job from a `raw_guest`, with metadata `meta` (title, source, ...) and body
/// `body`, and waits until the host has taken it.
pub async fn raw_print(mux: &vstream_link::Mux, meta: Vec<(String, String)>, body: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vstream_devices::printer::{Record, CHANNEL_NAME, CLASS};
    let mut chan = mux.open(CLASS, CHANNEL_NAME).await.expect("open");
    for r in [
        Record::Job(meta),
        Record::Data(bytes::Bytes::copy_from_slice(body)),
        Record::End(body.len() as u64),
    ] {
        chan.write_all(&r.to_bytes().expect("encode"))
            .await
            .expect("write");
    }
    chan.shutdown().await.expect("shutdown");
    let mut reply = Vec::new();
    chan.read_to_end(&mut reply).await.expect("done");
}

/// `vstreamctl jobs GUEST --json`, which must succeed.
pub async fn jobs(control: &Path, guest: &str) -> Vec<serde_json::Value> {
    let out = ctl_async(control, &["jobs", guest, "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `jobs` until `pred` holds (for up to 20 s).
pub async fn wait_jobs(
    control: &Path,
    guest: &str,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = jobs(control, guest).await;
        if pred(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {j:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The vstream-agent binary, built next to vstreamd (cargo builds only this package's
/// binaries for its tests; this is a no-op when the agent is up to date).
pub fn agent_binary() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_vstreamd"))
        .parent()
        .expect("target dir");
    let mut build = Command::new(env!("CARGO"));
    build.args([
        "build",
        "--quiet",
        "-p",
        "vstream-agent",
        "--bin",
        "vstream-agent",
    ]);
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo build -p vstream-agent");
    assert!(status.success(), "cargo build -p vstream-agent failed");
    dir.join("vstream-agent")
}

/// A vstream-agent process (killed on drop), logging to `DIR/agent.log`.
pub struct AgentProcess(pub Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The SHA-256 of a file, by sha256sum.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}
