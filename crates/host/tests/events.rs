//! `vstreamctl events`: agent and transport up/down, link events, events emitted by device code
//! through `Daemon::emit`, the guest filter, JSON and human forms. The daemon runs in-process
//! so the test can emit events itself.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vstream_agent::Agent;

use common::{ctl_async, Options};

struct Ctl {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Lines of `seen` already returned by `expect`: events from different sources (a
    /// transport task, the session) are not ordered, so a later `expect` may match an earlier
    /// line.
    taken: Vec<bool>,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ctl {
    fn spawn(control: &Path, args: &[&str]) -> Ctl {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
            .arg("--control")
            .arg(control)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vstreamctl");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ctl {
            child,
            lines,
            seen: Vec::new(),
            taken: Vec::new(),
        }
    }

    /// Waits (blocking this test's thread briefly) for a line matching `pred`.
    async fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        for (i, line) in self.seen.iter().enumerate() {
            if !self.taken[i] && pred(line) {
                self.taken[i] = true;
                return line.clone();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let hit = pred(&line);
                    self.taken.push(hit);
                    if hit {
                        return line;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    assert!(
                        Instant::now() < deadline,
                        "no {what} within 15 s; seen:\n{}",
                        self.seen.join("\n")
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    panic!("vstreamctl events ended; seen:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    async fn event(&mut self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let line = self
            .expect(kind, |l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == kind && pred(&v))
            })
            .await;
        serde_json::from_str(&line).expect("JSON")
    }
}

/// vstreamd in this process with guest `g`: its agent's socket `a.sock`, a console `con.sock`.
async fn daemon() -> common::Daemon {
    Options::config(
        r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
name = "sock"
address = "unix-listen:DIR/a.sock"
[[guest.transport]]
kind = "console"
name = "hvc0"
address = "unix-listen:DIR/con.sock"
"#,
    )
    .start_in_process()
    .await
}

/// Emits probes until `ctl` shows one: then its subscription is live.
async fn synchronise(daemon: &vstream_host::daemon::Daemon, ctl: &mut Ctl) {
    let probe = async {
        loop {
            daemon.emit("g", "probe", json!({ "n": 1 }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = ctl.expect("a probe", |l| l.contains("probe")) => {}
        () = probe => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_transport_link_and_device_events_reach_vstreamctl() {
    let d = daemon().await;
    let daemon = d.inner();
    let control = d.control.clone();

    let mut json = Ctl::spawn(&control, &["events", "g", "--json"]);
    synchronise(daemon, &mut json).await;
    // Another guest's events are filtered out (checked at the end).
    daemon.emit("other", "probe", json!({ "n": 2 }));

    // The agent connects: the transport, the link, the agent.
    let agent = Agent::start("g", vec![d.unix("a.sock")]);
    let up = json.event("transport-up", |v| v["kind"] == "mux").await;
    assert_eq!(up["transport"], "sock", "{up}");
    assert_eq!(up["guest"], "g");
    assert!(up["time_ms"].as_u64().unwrap_or(0) / 1000 == up["time"].as_u64().unwrap_or(1));
    json.event("link-up", |v| v["peer"] == "g").await;
    let agent_up = json.event("agent-up", |_| true).await;
    assert_eq!(agent_up["new_session"], true, "{agent_up}");
    assert_eq!(agent_up["peer"], "g");

    // A console connection is a transport too.
    let con = tokio::net::UnixStream::connect(d.path("con.sock"))
        .await
        .expect("console");
    let up = json.event("transport-up", |v| v["kind"] == "console").await;
    assert_eq!(up["transport"], "hvc0");

    // A real shell session through vstreamctl: opened and closed, with its channel.
    let out = ctl_async(&control, &["exec", "g", "--", "sh", "-c", "exit 0"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shell = json.event("shell-opened", |_| true).await;
    assert_eq!(shell["class"], "tty", "{shell}");
    let channel = shell["channel"].clone();
    let closed = json
        .event("shell-closed", |v| v["channel"] == channel)
        .await;
    assert!(closed.get("error").is_none(), "{closed}");
    // Device code reports through the daemon the same way.
    daemon.emit("g", "probe-device", json!({ "session": 7 }));
    let dev = json.event("probe-device", |_| true).await;
    assert_eq!(dev["session"], 7);
    // Non-object fields are wrapped, not lost.
    daemon
        .guest("g")
        .expect("guest")
        .events()
        .emit("note", json!("plain text"));
    let note = json.event("note", |_| true).await;
    assert_eq!(note["data"], "plain text");

    // The agent goes away: link, agent and transport down (the transport's event and the
    // session's come from different tasks, in either order).
    drop(agent);
    json.event("link-down", |_| true).await;
    let down = json.event("agent-down", |_| true).await;
    assert_eq!(down["transport"], "sock", "{down}");
    json.event("transport-down", |v| v["kind"] == "mux").await;
    drop(con);
    json.event("transport-down", |v| v["kind"] == "console")
        .await;

    // The human form: guest, event, the rest.
    let mut human = Ctl::spawn(&control, &["events"]);
    synchronise(daemon, &mut human).await;
    daemon.emit("other", "watchdog-fired", json!({ "action": "reset" }));
    let line = human
        .expect("the human form", |l| l.starts_with("other watchdog-fired"))
        .await;
    assert!(line.contains(r#""action":"reset""#), "{line}");
    assert!(!line.contains("time_ms"), "{line}");

    assert!(
        json.seen.iter().all(|l| !l.contains("\"other\"")),
        "the guest filter let another guest through: {:#?}",
        json.seen
    );
}

/// `vstreamctl events | head -1`: once the reader has gone, the next event ends vstreamctl
/// quietly with status 0, as a Unix filter ends, not with a panic and its backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_ends_vstreamctl_events_quietly() {
    let d = daemon().await;
    let daemon = d.inner();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .arg("--control")
        .arg(&d.control)
        .args(["events", "g"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vstreamctl");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    // The first probe it prints says its subscription is live; then the reader goes.
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        out.read_line(&mut line).expect("a line");
        line
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "no event reached vstreamctl");
        daemon.emit("g", "probe", json!({ "n": 1 }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = reader.join().expect("reader");
    assert!(line.starts_with("g probe"), "{line}");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "vstreamctl outlived its reader");
        daemon.emit("g", "probe", json!({ "n": 2 }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "vstreamctl wrote to stderr: {err}");
}
