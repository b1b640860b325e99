//! End-to-end tests of the watchdog in a real guest: the agent sends heartbeats every 500 ms
//! (`vstream.watchdog=500ms` on the kernel command line); killing it with SIGKILL from the guest's
//! shell fires vstreamd's action within the timeout, a clean stop (SIGTERM) disarms it, and with
//! `action = "reset"` the guest reboots through QMP and the agent comes back by itself. Never
//! skipped silently: without QEMU they fail, unless VSTREAM_SKIP_E2E=1 is set.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::image::INIT_DONE_MARKER;
use xtask::lab::{self, guest_status, Lab, LabOptions};
use xtask::process;

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const TIMEOUT_MS: u64 = 5000;
const PRETIMEOUT_MS: u64 = 2000;

fn boot(name: &str, watchdog: &str) -> Lab {
    let options = LabOptions {
        extra_kernel_args: vec!["vstream.watchdog=500ms".into()],
        extra_config: format!("\n[guest.watchdog]\ntimeout_ms = {TIMEOUT_MS}\n{watchdog}"),
        ..LabOptions::virtio_port_only().named(name)
    };
    let lab = Lab::boot(options).unwrap_or_else(|e| panic!("{e}"));
    wait_armed(&lab);
    lab
}

fn watchdog_status(status: &Value, guest: &str) -> Value {
    guest_status(status, guest).map_or(Value::Null, |g| g["devices"]["watchdog"].clone())
}

fn wait_armed(lab: &Lab) {
    lab.wait_for("the agent up and its watchdog armed", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s) && watchdog_status(s, lab.name())["state"] == "armed"
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// `vstreamctl events GUEST --json`, read by a thread; each event with when it arrived.
struct Events {
    child: Child,
    rx: mpsc::Receiver<(Instant, Value)>,
    seen: Vec<Value>,
}

impl Drop for Events {
    fn drop(&mut self) {
        process::terminate(&mut self.child, Duration::from_millis(200));
    }
}

impl Events {
    fn start(lab: &Lab) -> Events {
        let mut command = lab.ctl_command();
        command
            .args(["events", lab.name(), "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = process::spawn(command).expect("vstreamctl events");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        });
        // The subscription is made as soon as vstreamctl connects; give it that moment.
        thread::sleep(Duration::from_secs(1));
        Events {
            child,
            rx,
            seen: Vec::new(),
        }
    }

    fn next(&mut self, kind: &str, within: Duration) -> (Instant, Value) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, v)) => {
                    self.seen.push(v.clone());
                    if v["event"] == kind {
                        return (t, v);
                    }
                }
                Err(_) => panic!(
                    "no {kind} event within {within:?}; events seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    fn none(&mut self, kind: &str, period: Duration) {
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            if let Ok((_, v)) = self.rx.recv_timeout(left) {
                assert_ne!(v["event"], kind, "unexpected {kind}: {v}");
                self.seen.push(v);
            }
        }
    }
}

/// Types `command` into the guest's shell on hvc0 (which does not depend on the agent) and
/// waits for its marker; `n` makes the marker unique.
fn guest_shell(lab: &Lab, command: &str, n: u32) {
    let line = format!("{command}; echo done-$((1000+{n}))");
    let marker = format!("done-{}", 1000 + n);
    lab.console_roundtrip("hvc0", &line, &marker, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn sigkill_fires_the_hook_within_the_timeout_and_a_clean_stop_does_not() {
    if !lab::e2e_enabled("sigkill_fires_the_hook_within_the_timeout_and_a_clean_stop_does_not") {
        return;
    }
    let out_dir = std::env::temp_dir().join(format!("vs-wd-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("dir");
    let hook_out = out_dir.join("hook.out");
    let lab = boot(
        "wdog",
        &format!(
            "pretimeout_ms = {PRETIMEOUT_MS}\naction = \"hook\"\n\
             hook = \"echo fired $GUEST >> {}\"\n",
            hook_out.display()
        ),
    );
    let mut ev = Events::start(&lab);

    // A clean stop: SIGTERM, with init told not to restart the agent. It disarms; nothing fires.
    guest_shell(
        &lab,
        "touch /run/vstream-agent.norespawn; kill -TERM $(cat /run/vstream-agent.pid)",
        1,
    );
    let (_, disarmed) = ev.next("watchdog-disarmed", Duration::from_secs(30));
    println!("clean stop: {disarmed}");
    ev.none(
        "watchdog-pretimeout",
        Duration::from_millis(TIMEOUT_MS + 3000),
    );
    let s = lab.status().unwrap_or_else(|e| panic!("{e}"));
    let w = watchdog_status(&s, lab.name());
    assert_eq!(w["state"], "disarmed", "{w}");
    assert_eq!(w["fired"], 0, "{w}");
    assert!(!hook_out.exists(), "the hook ran after a clean stop");

    // The agent comes back (init restarts it): the watchdog re-arms.
    guest_shell(&lab, "rm -f /run/vstream-agent.norespawn", 2);
    let (_, armed) = ev.next("watchdog-armed", Duration::from_secs(60));
    assert_eq!(armed["rearmed"], true, "{armed}");

    // SIGKILL: no disarm; the watchdog fires within the timeout.
    let before = Instant::now();
    guest_shell(
        &lab,
        "touch /run/vstream-agent.norespawn; kill -KILL $(cat /run/vstream-agent.pid)",
        3,
    );
    let typed = Instant::now();
    let (t_pre, pre) = ev.next("watchdog-pretimeout", Duration::from_secs(30));
    let (t_fire, fired) = ev.next("watchdog-fired", Duration::from_secs(30));
    let (_, action) = ev.next("watchdog-action", Duration::from_secs(30));
    let since = fired["since_heartbeat_ms"]
        .as_u64()
        .expect("since_heartbeat_ms");
    println!(
        "SIGKILL in the guest: timeout {TIMEOUT_MS} ms; vstreamd fired {since} ms after the last \
         heartbeat it received (pre-timeout at {} ms); on the host, the fired event came \
         {} ms after the kill command was typed and {} ms after its echo; action: {action}",
        pre["since_heartbeat_ms"],
        (t_fire - before).as_millis(),
        (t_fire - typed).as_millis()
    );
    assert!(
        since <= TIMEOUT_MS + 1000,
        "fired {since} ms after the last heartbeat"
    );
    assert!(t_pre <= t_fire);
    assert_eq!(action["ok"], true, "{action}");
    let hook = std::fs::read_to_string(&hook_out).expect("the hook ran");
    assert_eq!(hook, "fired wdog\n");
    let s = lab.status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(watchdog_status(&s, lab.name())["state"], "fired");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn a_reset_reboots_the_guest_through_qmp_and_the_agent_comes_back() {
    if !lab::e2e_enabled("a_reset_reboots_the_guest_through_qmp_and_the_agent_comes_back") {
        return;
    }
    let lab = boot("wdreset", "action = \"reset\"\n");
    let boots = |lab: &Lab| lab.raw_console_log().matches(INIT_DONE_MARKER).count();
    assert_eq!(boots(&lab), 1);
    let mut ev = Events::start(&lab);

    // SIGKILL, and init must not restart the agent: only the reset brings it back.
    guest_shell(
        &lab,
        "touch /run/vstream-agent.norespawn; kill -KILL $(cat /run/vstream-agent.pid)",
        1,
    );
    let (_, fired) = ev.next("watchdog-fired", Duration::from_secs(30));
    let (t_action, action) = ev.next("watchdog-action", Duration::from_secs(30));
    let since = fired["since_heartbeat_ms"].as_u64().expect("since");
    println!("reset: fired {since} ms after the last heartbeat; {action}");
    assert!(since <= TIMEOUT_MS + 1000, "{fired}");
    assert_eq!(action["action"], "reset");
    assert_eq!(action["ok"], true, "{action}");

    // The guest reboots: /init runs a second time...
    let deadline = Instant::now() + Duration::from_secs(180);
    while boots(&lab) < 2 {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot again after the reset"
        );
        thread::sleep(Duration::from_millis(250));
    }
    // ...and its agent reconnects by itself and re-arms the watchdog.
    let (_, armed) = ev.next("watchdog-armed", UP_TIMEOUT);
    assert_eq!(armed["rearmed"], true, "{armed}");
    let s = lab
        .wait_for("the agent up again", UP_TIMEOUT, |s| {
            lab.mux_transports_up(s)
                && guest_status(s, lab.name()).is_some_and(|g| g["connected"] == true)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let w = watchdog_status(&s, lab.name());
    assert_eq!(w["state"], "armed", "{w}");
    assert_eq!(w["fired"], 1, "{w}");
    let out = lab
        .ctl(["exec", lab.name(), "--", "cat", "/proc/uptime"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uptime: f64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .expect("uptime");
    let since_reset = t_action.elapsed().as_secs_f64();
    println!(
        "after the reset: boot {} of the guest, uptime {uptime:.1} s, {since_reset:.1} s since the \
         reset",
        boots(&lab)
    );
    assert!(
        uptime <= since_reset + 1.0,
        "uptime {uptime} s: the guest did not reboot at the reset {since_reset} s ago"
    );
}
