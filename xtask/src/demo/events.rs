//! `vstreamctl events --json`, recorded from before the first demo to the last, and what it saw.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::lab::Lab;
use crate::process;

/// `vstreamctl events --json`, read by a thread from before the first demo to the last; each
/// event with when it arrived.
pub(super) struct EventLog {
    child: Mutex<Option<Child>>,
    seen: Arc<Mutex<Vec<(Instant, Value)>>>,
    started: Instant,
}

pub(super) static EVENTS: OnceLock<EventLog> = OnceLock::new();

impl EventLog {
    pub(super) fn start(lab: &Lab) -> Result<EventLog> {
        let mut command = lab.ctl_command();
        command
            .args(["events", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = process::spawn(command).context("starting vstreamctl events --json")?;
        let out = child
            .stdout
            .take()
            .context("vstreamctl events: no stdout")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Ok(mut seen) = sink.lock() {
                    seen.push((Instant::now(), v));
                }
            }
        });
        // The subscription is made as soon as vstreamctl connects.
        thread::sleep(Duration::from_millis(500));
        Ok(EventLog {
            child: Mutex::new(Some(child)),
            seen,
            started: Instant::now(),
        })
    }

    pub(super) fn snapshot(&self) -> Vec<(Instant, Value)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(super) fn len(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The first event of `kind` at index `from` or later (waiting up to `timeout`), with its
    /// index and arrival time.
    pub(super) fn wait(
        &self,
        from: usize,
        kind: &str,
        timeout: Duration,
    ) -> Result<(usize, Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.snapshot();
            if let Some((i, (t, v))) = seen
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, (_, v))| v["event"] == kind)
            {
                return Ok((i, *t, v.clone()));
            }
            if Instant::now() >= deadline {
                let kinds: Vec<String> = seen
                    .iter()
                    .skip(from)
                    .map(|(_, v)| v["event"].as_str().unwrap_or("?").to_owned())
                    .collect();
                bail!(
                    "no {kind} event within {} s; events meanwhile: {kinds:?}",
                    timeout.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// True while vstreamctl events runs.
    fn running(&self) -> bool {
        self.child
            .lock()
            .ok()
            .and_then(|mut c| c.as_mut().map(|c| matches!(c.try_wait(), Ok(None))))
            .unwrap_or(false)
    }

    pub(super) fn stop(&self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut child) = child.take() {
                process::terminate(&mut child, Duration::from_millis(300));
            }
        }
    }
}

pub(super) fn events() -> Result<&'static EventLog> {
    EVENTS
        .get()
        .ok_or_else(|| anyhow!("`vstreamctl events --json` was not started before the demos"))
}

pub(super) fn demo(_lab: &Lab) -> Result<String> {
    let ev = events()?;
    let alive = ev.running();
    // Let the last events (the agent's return) arrive.
    thread::sleep(Duration::from_millis(500));
    ev.stop();
    ensure!(alive, "`vstreamctl events --json` ended early");
    let seen = ev.snapshot();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (_, v) in &seen {
        *kinds
            .entry(v["event"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let mut out = format!(
        "vstreamctl events --json: {} events in {:.0} s of demos\n",
        seen.len(),
        ev.started.elapsed().as_secs_f64()
    );
    for (kind, n) in &kinds {
        out.push_str(&format!("  {n:>4}  {kind}\n"));
    }
    for kind in ["shell-closed", "print-job", "ppp-up", "watchdog-fired"] {
        if let Some((_, v)) = seen.iter().find(|(_, v)| v["event"] == kind) {
            out.push_str(&format!("e.g. {v}\n"));
        }
    }
    // What the demos above did must have been reported.
    let expected = [
        "shell-opened",
        "shell-closed",
        "channel-opened",
        "channel-closed",
        "print-job",
        "ppp-up",
        "watchdog-disarmed",
        "watchdog-armed",
        "watchdog-pretimeout",
        "watchdog-fired",
        "watchdog-action",
        "agent-up",
    ];
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|k| !kinds.contains_key(*k))
        .collect();
    ensure!(
        missing.is_empty(),
        "events the demos caused but vstreamctl events did not show: {missing:?}"
    );
    ensure!(
        !kinds.contains_key("lagged"),
        "vstreamctl events lagged and missed events"
    );
    Ok(out)
}
