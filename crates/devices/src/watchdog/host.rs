//! The host half: one [`Watchdog`] per guest, fed by the guest's `watchdog` channels, a timer
//! task that runs it, and the actions.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use vstream_link::ChannelStream;
use vstream_transport::Address;

use super::{
    qmp, Action, Decoder, Expiry, GuestMsg, HostMsg, Phase, Settings, Watchdog, READ_CHUNK,
};
use crate::channel::read_repoll;
use crate::status::{DeviceStatus, Sample};
use crate::{EventSink, HostContext, ServeFuture, Service};

/// How long a QMP action may take.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Most bytes of a hook's output kept for the log.
const HOOK_OUTPUT: usize = 2048;

/// At most one `watchdog-check-failed` event per this period (the guest controls the rate).
const CHECK_EVENT_PERIOD: Duration = Duration::from_secs(1);

struct Shared {
    guest: String,
    settings: Settings,
    qmp: Option<Address>,
    events: EventSink,
    core: Mutex<Watchdog>,
    wake: Notify,
    timer_started: AtomicBool,
    last_check_event: Mutex<Option<Instant>>,
    check_failures: AtomicU64,
    actions_failed: AtomicU64,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Watchdog> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_timer(self: &Arc<Self>) {
        if !self.timer_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(run_timer(self.clone()));
        }
    }

    fn armed_event(&self, interval: Option<Duration>, rearmed: bool) {
        let s = &self.settings;
        let interval_ms = interval.map(|d| d.as_millis() as u64);
        let warning = interval_ms
            .filter(|i| i.saturating_mul(2) > s.timeout_ms)
            .map(|i| {
                format!(
                    "the agent's heartbeat interval ({i} ms) is more than half the timeout ({} ms): \
                     one late heartbeat fires the watchdog",
                    s.timeout_ms
                )
            });
        if let Some(w) = &warning {
            tracing::warn!(guest = %self.guest, "watchdog: {w}");
        }
        tracing::info!(guest = %self.guest, timeout_ms = s.timeout_ms, ?interval_ms, rearmed, "watchdog armed");
        self.events.emit(
            "watchdog-armed",
            json!({
                "timeout_ms": s.timeout_ms,
                "pretimeout_ms": s.pretimeout_ms,
                "action": s.action.as_str(),
                "interval_ms": interval_ms,
                "rearmed": rearmed,
                "warning": warning,
            }),
        );
    }

    /// Applies one guest message; returns the reply, if any.
    fn handle(&self, msg: GuestMsg) -> Option<HostMsg> {
        let now = Instant::now();
        match msg {
            GuestMsg::Hello { interval_ms } => {
                let interval = Duration::from_millis(u64::from(interval_ms));
                let (armed, rearmed) = {
                    let mut c = self.core();
                    let before = c.phase();
                    (c.hello(now, interval), before != Phase::Idle)
                };
                self.wake.notify_one();
                // A Hello on an armed watchdog (a new channel of a live agent) is not news.
                if armed {
                    self.armed_event(Some(interval), rearmed);
                }
                Some(HostMsg::Armed {
                    timeout_ms: self.settings.timeout_ms.min(u64::from(u32::MAX)) as u32,
                    pretimeout_ms: self.settings.pretimeout_ms.min(u64::from(u32::MAX)) as u32,
                })
            }
            GuestMsg::Heartbeat { .. } => {
                let (armed, interval) = {
                    let mut c = self.core();
                    (c.heartbeat(now), c.interval())
                };
                self.wake.notify_one();
                if armed {
                    self.armed_event(interval, true);
                }
                None
            }
            GuestMsg::CheckFailed { detail } => {
                self.check_failures.fetch_add(1, Ordering::Relaxed);
                let mut last = self
                    .last_check_event
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|t| now.duration_since(t) >= CHECK_EVENT_PERIOD) {
                    *last = Some(now);
                    tracing::warn!(guest = %self.guest, "watchdog: the guest's health check failed: {detail}");
                    self.events
                        .emit("watchdog-check-failed", json!({ "detail": detail }));
                }
                None
            }
            GuestMsg::Disarm { reason } => {
                let was = self.core().disarm();
                self.wake.notify_one();
                if was {
                    tracing::info!(guest = %self.guest, "watchdog disarmed: {reason}");
                    self.events
                        .emit("watchdog-disarmed", json!({ "reason": reason }));
                }
                Some(HostMsg::Disarmed)
            }
        }
    }

    fn status(&self) -> WatchdogStatus {
        let c = self.core();
        let now = Instant::now();
        WatchdogStatus {
            state: c.phase(),
            timeout_ms: self.settings.timeout_ms,
            pretimeout_ms: self.settings.pretimeout_ms,
            action: self.settings.action.as_str().to_owned(),
            interval_ms: c.interval().map(|d| d.as_millis() as u64),
            since_heartbeat_ms: c.since_heartbeat(now).map(|d| d.as_millis() as u64),
            heartbeats: c.heartbeats(),
            fired: c.fires(),
            check_failures: self.check_failures.load(Ordering::Relaxed),
            actions_failed: self.actions_failed.load(Ordering::Relaxed),
        }
    }
}

/// The watchdog's status (`devices.watchdog` in `vstreamctl status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchdogStatus {
    /// Where it is in its cycle.
    pub state: Phase,
    /// The configured timeout.
    pub timeout_ms: u64,
    /// The configured pretimeout.
    pub pretimeout_ms: u64,
    /// What firing does.
    pub action: String,
    /// The guest's heartbeat interval, once known.
    pub interval_ms: Option<u64>,
    /// Since the last heartbeat.
    pub since_heartbeat_ms: Option<u64>,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Times it fired.
    pub fired: u64,
    /// Health checks that failed.
    pub check_failures: u64,
    /// Actions that failed.
    pub actions_failed: u64,
}

impl crate::status::Samples for WatchdogStatus {
    fn samples(&self) -> Vec<Sample> {
        vec![
            Sample::flag(
                "armed",
                "Whether the watchdog expects heartbeats.",
                self.state == Phase::Armed,
            ),
            Sample::counter("fires", "Times the watchdog fired.", self.fired),
            Sample::counter("heartbeats", "Heartbeats received.", self.heartbeats),
            Sample::counter(
                "check_failures",
                "Health checks that failed.",
                self.check_failures,
            ),
            Sample::counter(
                "action_failures",
                "Watchdog actions that failed.",
                self.actions_failed,
            ),
            Sample::gauge(
                "timeout_seconds",
                "The configured timeout.",
                self.timeout_ms as f64 / 1000.0,
            ),
        ]
    }
}

/// Runs the guest's watchdog deadlines forever.
async fn run_timer(shared: Arc<Shared>) {
    loop {
        let deadline = shared.core().poll_timeout();
        match deadline {
            None => shared.wake.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = shared.wake.notified() => continue,
                }
                loop {
                    let expiry = shared.core().handle_timeout(Instant::now());
                    match expiry {
                        None => break,
                        Some(Expiry::PreTimeout { since_heartbeat }) => {
                            let ms = since_heartbeat.as_millis() as u64;
                            tracing::warn!(guest = %shared.guest, since_heartbeat_ms = ms, "watchdog pre-timeout");
                            shared.events.emit(
                                "watchdog-pretimeout",
                                json!({
                                    "since_heartbeat_ms": ms,
                                    "timeout_ms": shared.settings.timeout_ms,
                                    "pretimeout_ms": shared.settings.pretimeout_ms,
                                }),
                            );
                        }
                        Some(Expiry::Fired { since_heartbeat }) => {
                            let ms = since_heartbeat.as_millis() as u64;
                            let action = shared.settings.action;
                            tracing::error!(guest = %shared.guest, since_heartbeat_ms = ms, action = action.as_str(), "watchdog fired");
                            shared.events.emit(
                                "watchdog-fired",
                                json!({
                                    "since_heartbeat_ms": ms,
                                    "timeout_ms": shared.settings.timeout_ms,
                                    "action": action.as_str(),
                                }),
                            );
                            // Actions run on their own: a slow QMP socket or hook never delays
                            // the next deadline.
                            tokio::spawn(run_actions(shared.clone(), since_heartbeat));
                        }
                    }
                }
            }
        }
    }
}

async fn run_actions(shared: Arc<Shared>, since: Duration) {
    let action = shared.settings.action;
    if action != Action::Hook {
        report(&shared, action.as_str(), run_action(&shared, action).await).await;
    }
    if let Some(hook) = shared.settings.hook.clone() {
        let result = run_hook(&shared, &hook, since).await;
        report(&shared, "hook", result).await;
    }
}

/// Why a watchdog action failed.
#[derive(Debug, thiserror::Error)]
enum ActionFailed {
    /// A QMP action on a guest without a QMP socket.
    #[error("{command}: guest {guest:?} has no qmp address")]
    NoQmp {
        command: &'static str,
        guest: String,
    },
    /// QEMU did not do it.
    #[error(transparent)]
    Qmp(std::io::Error),
    /// The hook could not be started or waited for.
    #[error("hook {0:?}: {1}")]
    Hook(String, std::io::Error),
    /// The hook ran too long.
    #[error("hook {0:?} still running after {secs} s; killed", secs = HOOK_TIMEOUT.as_secs())]
    HookTooLong(String),
    /// The hook exited with a failure; `said` is its output, cleaned (with a leading ": ").
    #[error("hook {hook:?} {status}{said}")]
    HookExit {
        hook: String,
        status: std::process::ExitStatus,
        said: String,
    },
}

/// What an action did, or why it failed, and how long it took.
type Outcome = (Duration, Result<String, ActionFailed>);

async fn report(shared: &Shared, action: &str, result: Outcome) {
    let (took, outcome) = result;
    let took_ms = took.as_millis() as u64;
    match &outcome {
        Ok(detail) => {
            tracing::info!(guest = %shared.guest, action, took_ms, "watchdog action done: {detail}")
        }
        Err(e) => {
            shared.actions_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(guest = %shared.guest, action, took_ms, "watchdog action failed: {e}")
        }
    }
    shared.events.emit(
        "watchdog-action",
        json!({
            "action": action,
            "ok": outcome.is_ok(),
            "detail": match &outcome { Ok(d) => d.clone(), Err(e) => e.to_string() },
            "took_ms": took_ms,
        }),
    );
}

async fn run_action(shared: &Shared, action: Action) -> Outcome {
    let start = Instant::now();
    let outcome = match action.qmp_command() {
        None => Ok("logged".to_owned()),
        Some(command) => match &shared.qmp {
            None => Err(ActionFailed::NoQmp {
                command,
                guest: shared.guest.clone(),
            }),
            Some(address) => qmp::execute(address, command, None, QMP_TIMEOUT)
                .await
                .map(|_| format!("QMP {command} done"))
                .map_err(ActionFailed::Qmp),
        },
    };
    (start.elapsed(), outcome)
}

async fn run_hook(shared: &Shared, hook: &str, since: Duration) -> Outcome {
    let start = Instant::now();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(hook)
        .env("GUEST", &shared.guest)
        .env("WATCHDOG_ACTION", shared.settings.action.as_str())
        .env("WATCHDOG_SINCE_MS", since.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let outcome = async {
        let failed = |e| ActionFailed::Hook(hook.to_owned(), e);
        let mut child = cmd.spawn().map_err(failed)?;
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let run = async { tokio::join!(read_bounded(out), read_bounded(err), child.wait()) };
        let (o, e, status) = tokio::time::timeout(HOOK_TIMEOUT, run)
            .await
            .map_err(|_| ActionFailed::HookTooLong(hook.to_owned()))?;
        let status = status.map_err(failed)?;
        let said = super::said(&[o, e].concat());
        if status.success() {
            Ok(format!("hook exited 0{said}"))
        } else {
            Err(ActionFailed::HookExit {
                hook: hook.to_owned(),
                status,
                said,
            })
        }
    }
    .await;
    (start.elapsed(), outcome)
}

/// Reads a pipe to its end, keeping the first [`HOOK_OUTPUT`] bytes.
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    let mut kept = Vec::new();
    if let Some(mut p) = pipe {
        let mut buf = [0u8; 1024];
        while let Ok(n) = p.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = HOOK_OUTPUT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
    }
    kept
}

/// The service of class `watchdog`.
pub struct WatchdogService {
    shared: Option<Arc<Shared>>,
    guest: String,
}

impl WatchdogService {
    /// The watchdog of the guest of `ctx` with its `[guest.watchdog]` (without one it refuses
    /// channels).
    pub fn new(ctx: &HostContext, settings: Option<Settings>) -> WatchdogService {
        let shared = settings.map(|settings| {
            Arc::new(Shared {
                guest: ctx.guest.clone(),
                qmp: ctx.qmp.clone(),
                events: ctx.events.clone(),
                core: Mutex::new(Watchdog::new(settings.timeout(), settings.pretimeout())),
                settings,
                wake: Notify::new(),
                timer_started: AtomicBool::new(false),
                last_check_event: Mutex::new(None),
                check_failures: AtomicU64::new(0),
                actions_failed: AtomicU64::new(0),
            })
        });
        WatchdogService {
            shared,
            guest: ctx.guest.clone(),
        }
    }
}

impl Service for WatchdogService {
    fn class(&self) -> &'static str {
        super::CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let shared = self.shared.clone();
        let guest = self.guest.clone();
        Box::pin(async move {
            let Some(shared) = shared else {
                stream.reset(&format!(
                    "no watchdog for guest {guest:?}: add [guest.watchdog] to vstreamd's config"
                ));
                return;
            };
            shared.start_timer();
            let mut stream = stream;
            let mut decoder = Decoder::<GuestMsg>::new();
            let mut buf = [0u8; READ_CHUNK];
            let why = loop {
                let n = match read_repoll(&mut stream, &mut buf).await {
                    Ok(0) => break "closed".to_owned(),
                    Ok(n) => n,
                    Err(e) => break e.to_string(),
                };
                if let Err(e) = decoder.push(&buf[..n]) {
                    stream.reset(&e.to_string());
                    break e.to_string();
                }
                let mut failed = None;
                loop {
                    match decoder.next_message() {
                        Ok(Some(msg)) => {
                            if let Some(reply) = shared.handle(msg) {
                                if let Err(e) = stream.write_all(&reply.to_bytes()).await {
                                    failed = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%guest, channel = %name, "watchdog: {e}; channel reset");
                            stream.reset(&e.to_string());
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                if let Some(f) = failed {
                    break f;
                }
            };
            // Not a disarm: the deadline keeps running (a killed agent must fire).
            let phase = shared.core().phase();
            tracing::info!(%guest, channel = %name, ?phase, "watchdog channel ended: {why}");
        })
    }

    fn status(&self) -> Option<DeviceStatus> {
        self.shared.as_ref().map(|s| DeviceStatus::new(s.status()))
    }
}
