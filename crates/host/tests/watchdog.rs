//! The watchdog through vstreamd and an in-process agent, with short timeouts: silence fires the
//! action within the timeout, heartbeats and a clean stop do not, a closed channel is not a
//! disarm, the watchdog re-arms when the agent comes back, QMP actions reach the monitor, a
//! failing health check withholds heartbeats.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use vstream_agent::{Agent, AgentOptions};
use vstream_devices::registry::GuestOptions;
use vstream_devices::watchdog::guest::GuestSettings;
use vstream_devices::watchdog::GuestMsg;

use common::{start_daemon, status, Daemon};

const TIMEOUT_MS: u64 = 1500;
const PRETIMEOUT_MS: u64 = 500;
const INTERVAL: Duration = Duration::from_millis(200);

fn config(action: &str, extra: &str) -> String {
    format!(
        r#"
[[guest]]
name = "g"
qmp = "unix:DIR/qmp.sock"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/a.sock"
[guest.watchdog]
timeout_ms = {TIMEOUT_MS}
pretimeout_ms = {PRETIMEOUT_MS}
action = "{action}"
{extra}
"#
    )
}

/// The daemon's event stream, subscribed through the control socket before the test acts.
struct Events {
    rx: mpsc::UnboundedReceiver<(Instant, Value)>,
    seen: Vec<(Instant, Value)>,
}

impl Events {
    async fn subscribe(control: &Path) -> Events {
        let stream = tokio::net::UnixStream::connect(control)
            .await
            .expect("control socket");
        let (r, mut w) = stream.into_split();
        w.write_all(b"{\"op\":\"events\",\"guest\":\"g\"}\n")
            .await
            .expect("request");
        let mut lines = BufReader::new(r).lines();
        let reply = lines.next_line().await.expect("reply").expect("reply line");
        assert!(reply.contains("\"ok\":true"), "{reply}");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep = w;
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).expect("event JSON");
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        });
        Events {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next event of `kind` (later than any already returned), with when it arrived.
    async fn next(&mut self, kind: &str, within: Duration) -> (Instant, Value) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((t, v))) => {
                    self.seen.push((t, v.clone()));
                    if v["event"] == kind {
                        return (t, v);
                    }
                }
                _ => panic!(
                    "no {kind} event within {within:?}; seen: {:#?}",
                    self.seen.iter().map(|(_, v)| v).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Asserts no event of `kind` arrives for `period`.
    async fn none(&mut self, kind: &str, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        while let Ok(Some((t, v))) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            assert_ne!(v["event"], kind, "unexpected {kind}: {v}");
            self.seen.push((t, v));
        }
    }
}

fn agent(d: &Daemon, check: Option<String>) -> Agent {
    let a = d.unix("a.sock");
    Agent::start_with(
        "g",
        vec![a],
        AgentOptions {
            devices: {
                let mut o = GuestOptions::default();
                o.set(
                    vstream_devices::watchdog::CLASS,
                    GuestSettings {
                        interval: INTERVAL,
                        check,
                    },
                );
                o
            },
            ..AgentOptions::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_fires_within_the_timeout_and_the_watchdog_rearms_when_the_agent_returns() {
    let d = start_daemon(&config(
        "hook",
        "hook = \"echo fired $GUEST $WATCHDOG_ACTION >> DIR/hook.out\"",
    ));
    let mut ev = Events::subscribe(&d.control).await;
    let a = agent(&d, None);
    let (_, armed) = ev.next("watchdog-armed", Duration::from_secs(10)).await;
    assert_eq!(armed["rearmed"], false, "{armed}");
    assert_eq!(armed["interval_ms"], INTERVAL.as_millis() as u64);
    assert_eq!(armed["timeout_ms"], TIMEOUT_MS);

    // Heartbeats hold it off for several timeouts.
    ev.none("watchdog-pretimeout", Duration::from_millis(3 * TIMEOUT_MS))
        .await;
    let s = status(&d.control);
    let w = &s["guests"][0]["devices"]["watchdog"];
    assert_eq!(w["state"], "armed", "{w}");
    assert!(w["heartbeats"].as_u64().unwrap_or(0) >= 10, "{w}");

    // The agent dies without a word (as with SIGKILL): its socket closes, no disarm.
    let killed = Instant::now();
    drop(a);
    let (t_pre, pre) = ev
        .next("watchdog-pretimeout", Duration::from_secs(10))
        .await;
    let (t_fire, fired) = ev.next("watchdog-fired", Duration::from_secs(10)).await;
    let (_, action) = ev.next("watchdog-action", Duration::from_secs(10)).await;
    let pre_ms = (t_pre - killed).as_millis() as u64;
    let fire_ms = (t_fire - killed).as_millis() as u64;
    println!(
        "watchdog: timeout {TIMEOUT_MS} ms, pre-timeout {PRETIMEOUT_MS} ms, heartbeat every {} ms; \
         after the kill: pre-timeout at {pre_ms} ms, fired at {fire_ms} ms \
         (vstreamd: {} ms since the last heartbeat); action: {action}",
        INTERVAL.as_millis(),
        fired["since_heartbeat_ms"]
    );
    assert!(
        fire_ms <= TIMEOUT_MS + 1000,
        "fired {fire_ms} ms after the kill"
    );
    assert!(
        fire_ms + INTERVAL.as_millis() as u64 + 50 >= TIMEOUT_MS,
        "fired too early: {fire_ms} ms"
    );
    assert!(
        pre_ms + PRETIMEOUT_MS <= fire_ms + 100,
        "pre {pre_ms}, fired {fire_ms}"
    );
    let since = fired["since_heartbeat_ms"].as_u64().expect("since");
    assert!((TIMEOUT_MS..=TIMEOUT_MS + 1000).contains(&since), "{fired}");
    assert_eq!(pre["event"], "watchdog-pretimeout");
    assert_eq!(fired["action"], "hook");
    assert_eq!(action["ok"], true, "{action}");
    let hook = std::fs::read_to_string(d.path("hook.out")).expect("hook ran");
    assert_eq!(hook, "fired g hook\n");
    // It fires once per silence.
    ev.none("watchdog-fired", Duration::from_millis(2 * TIMEOUT_MS))
        .await;

    // The agent comes back: re-armed, and silence fires again.
    let a = agent(&d, None);
    let (_, armed) = ev.next("watchdog-armed", Duration::from_secs(10)).await;
    assert_eq!(armed["rearmed"], true, "{armed}");
    let s = status(&d.control);
    assert_eq!(s["guests"][0]["devices"]["watchdog"]["state"], "armed");
    assert_eq!(s["guests"][0]["devices"]["watchdog"]["fired"], 1);
    drop(a);
    ev.next("watchdog-fired", Duration::from_secs(10)).await;
    ev.next("watchdog-action", Duration::from_secs(10)).await;
    let hook = std::fs::read_to_string(d.path("hook.out")).expect("hook ran");
    assert_eq!(hook.lines().count(), 2, "{hook}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_disarms_and_nothing_fires() {
    let d = start_daemon(&config("log", ""));
    let mut ev = Events::subscribe(&d.control).await;
    let a = agent(&d, None);
    ev.next("watchdog-armed", Duration::from_secs(10)).await;
    tokio::time::sleep(INTERVAL * 3).await;
    a.shutdown("test: clean stop").await;
    let (_, disarmed) = ev.next("watchdog-disarmed", Duration::from_secs(5)).await;
    assert_eq!(disarmed["reason"], "test: clean stop");
    ev.none("watchdog-pretimeout", Duration::from_millis(3 * TIMEOUT_MS))
        .await;
    let s = status(&d.control);
    let w = &s["guests"][0]["devices"]["watchdog"];
    assert_eq!(w["state"], "disarmed", "{w}");
    assert_eq!(w["fired"], 0, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_without_disarm_still_fires() {
    let d = start_daemon(&config("log", ""));
    let mut ev = Events::subscribe(&d.control).await;
    // An agent without heartbeats; the test speaks the protocol itself.
    let a = Agent::start("g", vec![d.unix("a.sock")]);
    let mut ch = a.mux().open("watchdog", "").await.expect("open");
    ch.write_all(&GuestMsg::Hello { interval_ms: 100 }.to_bytes())
        .await
        .expect("hello");
    ch.write_all(&GuestMsg::Heartbeat { seq: 1 }.to_bytes())
        .await
        .expect("heartbeat");
    ev.next("watchdog-armed", Duration::from_secs(10)).await;
    let closed = Instant::now();
    ch.shutdown().await.expect("close");
    drop(ch);
    let (t, fired) = ev.next("watchdog-fired", Duration::from_secs(10)).await;
    let ms = (t - closed).as_millis() as u64;
    println!("channel closed without disarm: fired after {ms} ms: {fired}");
    assert!(ms <= TIMEOUT_MS + 1000);
    let (_, action) = ev.next("watchdog-action", Duration::from_secs(5)).await;
    assert_eq!(action["action"], "log");
    assert_eq!(action["ok"], true);
    // The session itself is fine.
    assert!(a.mux().is_connected());
    drop(a);
}

/// A QMP monitor that answers like QEMU and records the commands; `fail` makes it refuse the
/// action command.
async fn fake_qmp(path: PathBuf, fail: bool) -> mpsc::UnboundedReceiver<String> {
    let listener = tokio::net::UnixListener::bind(&path).expect("bind qmp");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(
                b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7}}, \"capabilities\": []}}\r\n",
            )
            .await
            .expect("greeting");
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).expect("QMP request is JSON");
                let cmd = v["execute"].as_str().unwrap_or("?").to_owned();
                let _ = tx.send(cmd.clone());
                // An event before the reply, as QEMU may send.
                w.write_all(b"{\"event\": \"RESET\", \"data\": {}, \"timestamp\": {}}\r\n")
                    .await
                    .expect("event");
                let reply = if fail && cmd != "qmp_capabilities" {
                    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"not today\"}}\r\n"
                } else {
                    "{\"return\": {}}\r\n"
                };
                w.write_all(reply.as_bytes()).await.expect("reply");
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_actions_reach_the_monitor_and_failures_are_reported() {
    let d = start_daemon(&config("reset", ""));
    let mut qmp = fake_qmp(d.path("qmp.sock"), false).await;
    let mut ev = Events::subscribe(&d.control).await;
    let a = agent(&d, None);
    ev.next("watchdog-armed", Duration::from_secs(10)).await;
    drop(a);
    ev.next("watchdog-fired", Duration::from_secs(10)).await;
    let (_, action) = ev.next("watchdog-action", Duration::from_secs(15)).await;
    assert_eq!(action["action"], "reset");
    assert_eq!(action["ok"], true, "{action}");
    assert_eq!(qmp.recv().await.as_deref(), Some("qmp_capabilities"));
    assert_eq!(qmp.recv().await.as_deref(), Some("system_reset"));

    // A monitor that refuses: the failure is an event, with QEMU's words.
    std::fs::remove_file(d.path("qmp.sock")).expect("rm");
    let _qmp = fake_qmp(d.path("qmp.sock"), true).await;
    let a = agent(&d, None);
    ev.next("watchdog-armed", Duration::from_secs(10)).await;
    drop(a);
    let (_, action) = ev.next("watchdog-action", Duration::from_secs(15)).await;
    assert_eq!(action["ok"], false, "{action}");
    assert!(
        action["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not today (GenericError)"),
        "{action}"
    );
    let s = status(&d.control);
    assert_eq!(s["guests"][0]["devices"]["watchdog"]["actions_failed"], 1);

    // No monitor at all: a clear error, quickly.
    std::fs::remove_file(d.path("qmp.sock")).expect("rm");
    let a = agent(&d, None);
    ev.next("watchdog-armed", Duration::from_secs(10)).await;
    drop(a);
    let (_, action) = ev.next("watchdog-action", Duration::from_secs(15)).await;
    assert_eq!(action["ok"], false, "{action}");
    assert!(
        action["detail"].as_str().unwrap_or("").contains("qmp.sock"),
        "{action}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_withholds_heartbeats() {
    let d = start_daemon(&config("log", ""));
    let healthy = d.path("healthy");
    std::fs::write(&healthy, b"").expect("touch");
    let mut ev = Events::subscribe(&d.control).await;
    let check = format!(
        "test -e {} || {{ echo sick >&2; exit 3; }}",
        healthy.display()
    );
    let a = agent(&d, Some(check));
    ev.next("watchdog-armed", Duration::from_secs(10)).await;
    ev.none("watchdog-pretimeout", Duration::from_millis(2 * TIMEOUT_MS))
        .await;
    // The agent is alive and connected, but unhealthy: no heartbeats, so it fires.
    let sick = Instant::now();
    std::fs::remove_file(&healthy).expect("rm");
    let (_, failed) = ev
        .next("watchdog-check-failed", Duration::from_secs(5))
        .await;
    assert!(
        failed["detail"].as_str().unwrap_or("").contains("sick"),
        "{failed}"
    );
    let (t, _) = ev.next("watchdog-fired", Duration::from_secs(10)).await;
    assert!((t - sick).as_millis() as u64 <= TIMEOUT_MS + 1000);
    assert!(a.mux().is_connected());
    // Healthy again: heartbeats re-arm it.
    std::fs::write(&healthy, b"").expect("touch");
    let (_, armed) = ev.next("watchdog-armed", Duration::from_secs(5)).await;
    assert_eq!(armed["rearmed"], true);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_a_watchdog_section_is_refused_with_the_reason() {
    let d = start_daemon(
        "[[guest]]\nname = \"g\"\n[[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:DIR/a.sock\"\n",
    );
    let a = Agent::start("g", vec![d.unix("a.sock")]);
    let e = a.mux().open("watchdog", "").await.expect_err("refused");
    assert!(e.to_string().contains("[guest.watchdog]"), "{e}");
    drop(a);
}
