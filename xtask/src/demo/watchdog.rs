//! The watchdog device: armed by heartbeats, disarmed by a clean stop, fired by a kill.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use serde_json::Value;

use super::{device_status, events::events, guest_sh, hvc0_once, UP_TIMEOUT};
use crate::lab::Lab;

/// Watchdog: the agent's heartbeat interval (kernel command line), vstreamd's timeouts.
const WATCHDOG_INTERVAL: &str = "1s";
pub(super) const WATCHDOG_TIMEOUT_MS: u64 = 5000;
pub(super) const WATCHDOG_PRETIMEOUT_MS: u64 = 2000;

fn agent_pid(lab: &Lab) -> Result<String> {
    Ok(guest_sh(lab, "cat /run/vstream-agent.pid")?
        .trim()
        .to_owned())
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let ev = events()?;
    let name = lab.name();
    let mut out = String::new();
    // Heartbeats on: the agent reads `vstream.watchdog=` from /proc/cmdline; give it a command
    // line with the setting and restart it (init respawns it).
    let from = ev.len();
    hvc0_once(
        lab,
        "wd-on",
        &format!(
            "tr -d '\\n' </proc/cmdline >/run/cmdline; \
             echo ' vstream.watchdog={WATCHDOG_INTERVAL}' >>/run/cmdline; \
             mount -o bind /run/cmdline /proc/cmdline; kill -TERM $(cat /run/vstream-agent.pid)"
        ),
    )?;
    let (_, _, armed) = ev.wait(from, "watchdog-armed", UP_TIMEOUT)?;
    out.push_str(&format!(
        "hvc0: vstream.watchdog={WATCHDOG_INTERVAL} added to the agent's command line, agent \
         restarted  ->  event watchdog-armed, interval {} ms\n",
        armed["interval_ms"]
    ));
    let status = lab.wait_for("the watchdog armed", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s) && device_status(s, name, "watchdog")["state"] == "armed"
    })?;
    let w = device_status(&status, name, "watchdog");
    ensure!(
        w["fired"] == 0 && w["heartbeats"].as_u64().unwrap_or(0) > 0,
        "before the demo: {w}"
    );
    out.push_str(&format!(
        "vstreamctl status: devices.watchdog state {}, timeout {} ms, action {}, interval {} ms, \
         {} heartbeats, fired {}\n",
        w["state"], w["timeout_ms"], w["action"], w["interval_ms"], w["heartbeats"], w["fired"]
    ));

    // 1. A clean stop (SIGTERM; init told not to restart the agent): disarmed, nothing fires.
    let pid = agent_pid(lab)?;
    let from = ev.len();
    hvc0_once(
        lab,
        "wd-term",
        "touch /run/vstream-agent.norespawn; kill -TERM $(cat /run/vstream-agent.pid)",
    )?;
    let (i, _, disarmed) = ev.wait(from, "watchdog-disarmed", Duration::from_secs(30))?;
    out.push_str(&format!(
        "hvc0: kill -TERM {pid} (the agent)  ->  event watchdog-disarmed, reason {}\n",
        disarmed["reason"]
    ));
    let quiet = Duration::from_millis(WATCHDOG_TIMEOUT_MS + 2000);
    thread::sleep(quiet);
    let fired: Vec<Value> = ev
        .snapshot()
        .into_iter()
        .skip(i)
        .map(|(_, v)| v)
        .filter(|v| v["event"] == "watchdog-pretimeout" || v["event"] == "watchdog-fired")
        .collect();
    ensure!(
        fired.is_empty(),
        "a clean stop fired the watchdog: {fired:?}"
    );
    let w = device_status(&lab.status()?, name, "watchdog");
    ensure!(
        w["state"] == "disarmed" && w["fired"] == 0,
        "after a clean stop: {w}"
    );
    out.push_str(&format!(
        "no agent for {:.0} s (timeout {WATCHDOG_TIMEOUT_MS} ms): nothing fired, state {}\n",
        quiet.as_secs_f64(),
        w["state"]
    ));

    // Init starts the agent again: re-armed.
    let from = ev.len();
    hvc0_once(lab, "wd-back1", "rm -f /run/vstream-agent.norespawn")?;
    let (_, _, armed) = ev.wait(from, "watchdog-armed", UP_TIMEOUT)?;
    ensure!(armed["rearmed"] == true, "{armed}");
    out.push_str("init restarted the agent  ->  event watchdog-armed, rearmed true\n");

    // 2. kill -9: no disarm; with action "log" vstreamd fires within the timeout.
    lab.wait_for("the agent up again", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })?;
    let pid = agent_pid(lab)?;
    let from = ev.len();
    let typed = Instant::now();
    hvc0_once(
        lab,
        "wd-kill",
        "touch /run/vstream-agent.norespawn; kill -KILL $(cat /run/vstream-agent.pid)",
    )?;
    let (_, t_pre, pre) = ev.wait(from, "watchdog-pretimeout", Duration::from_secs(30))?;
    let (_, t_fired, fired) = ev.wait(from, "watchdog-fired", Duration::from_secs(30))?;
    let (_, _, action) = ev.wait(from, "watchdog-action", Duration::from_secs(30))?;
    let since = fired["since_heartbeat_ms"]
        .as_u64()
        .ok_or_else(|| anyhow!("watchdog-fired without since_heartbeat_ms: {fired}"))?;
    out.push_str(&format!(
        "hvc0: kill -KILL {pid}  ->  watchdog-pretimeout at {} ms, watchdog-fired {since} ms after \
         the last heartbeat ({} ms after the kill was typed), watchdog-action {} ok={}: {}\n",
        pre["since_heartbeat_ms"],
        t_fired.duration_since(typed).as_millis(),
        action["action"],
        action["ok"],
        action["detail"]
    ));
    ensure!(
        (WATCHDOG_TIMEOUT_MS..=WATCHDOG_TIMEOUT_MS + 1000).contains(&since),
        "fired {since} ms after the last heartbeat (timeout {WATCHDOG_TIMEOUT_MS} ms)"
    );
    ensure!(t_pre <= t_fired, "the pre-timeout came after the firing");
    ensure!(
        action["action"] == "log" && action["ok"] == true,
        "{action}"
    );
    let w = device_status(&lab.status()?, name, "watchdog");
    ensure!(w["state"] == "fired" && w["fired"] == 1, "{w}");

    // The agent comes back through init's respawn and re-arms the watchdog.
    let from = ev.len();
    hvc0_once(lab, "wd-back2", "rm -f /run/vstream-agent.norespawn")?;
    let (_, _, armed) = ev.wait(from, "watchdog-armed", UP_TIMEOUT)?;
    ensure!(armed["rearmed"] == true, "{armed}");
    let (_, _, up) = ev.wait(from, "agent-up", UP_TIMEOUT)?;
    let status = lab.wait_for("the agent's transports up again", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s) && device_status(s, name, "watchdog")["state"] == "armed"
    })?;
    let new_pid = agent_pid(lab)?;
    ensure!(new_pid != pid, "the agent's pid is still {pid}");
    let w = device_status(&status, name, "watchdog");
    out.push_str(&format!(
        "init respawned the agent (pid {new_pid})  ->  agent-up new_session {}, watchdog-armed \
         rearmed true; status: state {}, fired {}\n",
        up["new_session"], w["state"], w["fired"]
    ));
    Ok(out)
}
