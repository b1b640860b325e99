//! The guest half: heartbeats every interval, each gated by an optional health check, and a
//! disarm on a clean stop.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use vstream_link::{ChannelStream, Mux};

use vstream_transport::Backoff;

use super::{Decoder, GuestMsg, HostMsg, CLASS, READ_CHUNK};
use crate::channel::{open_with_backoff, REOPEN_PAUSE};

/// How long a clean stop waits for the host to confirm the disarm.
pub const DISARM_TIMEOUT: Duration = Duration::from_secs(3);

/// What the agent was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSettings {
    /// Time between heartbeats.
    pub interval: Duration,
    /// A command run by `sh -c` before each heartbeat; the heartbeat is sent only if it exits 0
    /// within the interval.
    pub check: Option<String>,
}

/// The running heartbeat task. [`Heartbeat::disarm`] stops it cleanly; dropping it stops it
/// without a disarm (as a crash would).
pub struct Heartbeat {
    stop: Option<oneshot::Sender<(String, oneshot::Sender<bool>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Starts sending heartbeats on `mux` (reopening the channel whenever it fails).
    pub fn start(mux: Mux, settings: GuestSettings) -> Heartbeat {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(run(mux, settings, rx));
        Heartbeat {
            stop: Some(tx),
            task,
        }
    }

    /// Sends a disarm with `reason` and waits (at most [`DISARM_TIMEOUT`]) for the host to
    /// confirm it; true if it did.
    pub async fn disarm(mut self, reason: &str) -> bool {
        let Some(stop) = self.stop.take() else {
            return false;
        };
        let (ack_tx, ack_rx) = oneshot::channel();
        if stop.send((reason.to_owned(), ack_tx)).is_err() {
            return false;
        }
        tokio::time::timeout(DISARM_TIMEOUT + Duration::from_millis(500), ack_rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type StopRx = oneshot::Receiver<(String, oneshot::Sender<bool>)>;

enum Ended {
    /// The channel failed: reopen.
    Channel(String),
    /// A clean stop happened.
    Stopped,
}

async fn run(mux: Mux, settings: GuestSettings, mut stop: StopRx) {
    // The first failure waits 2 s, doubling to 30 s; a channel that ended is reopened after 1 s.
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(30));
    loop {
        let stream = tokio::select! {
            s = open_with_backoff(&mux, CLASS, "", &mut backoff) => s,
            s = &mut stop => {
                // Not connected: nothing armed on the host by this session; say so.
                if let Ok((_, ack)) = s {
                    let _ = ack.send(false);
                }
                return;
            }
        };
        match session(&mux, stream, &settings, &mut stop).await {
            Ended::Stopped => return,
            Ended::Channel(e) => tracing::info!("watchdog: channel ended ({e}); reopening"),
        }
        tokio::select! {
            () = tokio::time::sleep(REOPEN_PAUSE) => {}
            s = &mut stop => {
                if let Ok((_, ack)) = s {
                    let _ = ack.send(false);
                }
                return;
            }
        }
    }
}

async fn send(stream: &mut ChannelStream, msg: &GuestMsg) -> Result<(), Ended> {
    stream
        .write_all(&msg.to_bytes())
        .await
        .map_err(|e| Ended::Channel(e.to_string()))
}

async fn session(
    mux: &Mux,
    mut stream: ChannelStream,
    settings: &GuestSettings,
    stop: &mut StopRx,
) -> Ended {
    match session_inner(mux, &mut stream, settings, stop).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    mux: &Mux,
    stream: &mut ChannelStream,
    settings: &GuestSettings,
    stop: &mut StopRx,
) -> Result<std::convert::Infallible, Ended> {
    let interval_ms = settings.interval.as_millis().min(u128::from(u32::MAX)) as u32;
    send(stream, &GuestMsg::Hello { interval_ms }).await?;
    let mut decoder = Decoder::<HostMsg>::new();
    let mut buf = [0u8; READ_CHUNK];
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Heartbeats queued while no link is up would arrive in a burst later and
                // vouch for a past: send only what can go now.
                if !mux.is_connected() {
                    continue;
                }
                match run_check(settings).await {
                    Ok(()) => {
                        seq += 1;
                        send(stream, &GuestMsg::Heartbeat { seq }).await?;
                    }
                    Err(e) => {
                        let detail = e.to_string();
                        tracing::warn!("watchdog: health check failed, no heartbeat: {detail}");
                        send(stream, &GuestMsg::CheckFailed { detail }).await?;
                    }
                }
            }
            n = stream.read(&mut buf) => {
                let n = n.map_err(|e| Ended::Channel(e.to_string()))?;
                if n == 0 {
                    return Err(Ended::Channel("closed by the host".into()));
                }
                decoder.push(&buf[..n]).map_err(|e| Ended::Channel(e.to_string()))?;
                while let Some(msg) = decoder.next_message().map_err(|e| Ended::Channel(e.to_string()))? {
                    if let HostMsg::Armed { timeout_ms, pretimeout_ms } = msg {
                        tracing::info!(interval_ms, timeout_ms, pretimeout_ms, "watchdog armed by the host");
                    }
                }
            }
            s = &mut *stop => {
                let Ok((reason, ack)) = s else {
                    return Err(Ended::Stopped);
                };
                let confirmed = disarm(stream, &mut decoder, &reason).await;
                if confirmed {
                    tracing::info!("watchdog disarmed ({reason})");
                } else {
                    tracing::warn!("watchdog: the host did not confirm the disarm");
                }
                let _ = ack.send(confirmed);
                return Err(Ended::Stopped);
            }
        }
    }
}

async fn disarm(stream: &mut ChannelStream, decoder: &mut Decoder<HostMsg>, reason: &str) -> bool {
    let msg = GuestMsg::Disarm {
        reason: reason.to_owned(),
    };
    let wait = async {
        stream.write_all(&msg.to_bytes()).await.ok()?;
        let mut buf = [0u8; READ_CHUNK];
        loop {
            while let Some(m) = decoder.next_message().ok()? {
                if m == HostMsg::Disarmed {
                    return Some(());
                }
            }
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            decoder.push(&buf[..n]).ok()?;
        }
    };
    matches!(
        tokio::time::timeout(DISARM_TIMEOUT, wait).await,
        Ok(Some(()))
    )
}

/// Why the health check vouched for nothing.
#[derive(Debug, thiserror::Error)]
enum CheckFailed {
    /// It could not be started or waited for.
    #[error("{0:?}: {1}")]
    Run(String, std::io::Error),
    /// It ran past the heartbeat interval.
    #[error("{0:?} did not finish within {1} ms")]
    TooLong(String, u128),
    /// It exited with a failure; `said` is its stderr, cleaned (with a leading ": ").
    #[error("{check:?} {status}{said}")]
    Exit {
        check: String,
        status: std::process::ExitStatus,
        said: String,
    },
}

/// Runs the health check, if any: `Ok` if it exits 0 within the interval.
async fn run_check(settings: &GuestSettings) -> Result<(), CheckFailed> {
    let Some(check) = &settings.check else {
        return Ok(());
    };
    let mut cmd = tokio::process::Command::new("/bin/sh");
    crate::spawn::undo_inherited(cmd.as_std_mut());
    cmd.arg("-c")
        .arg(check)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| CheckFailed::Run(check.clone(), e))?;
    let mut err = child.stderr.take();
    let run = async {
        let mut kept = Vec::new();
        if let Some(p) = err.as_mut() {
            let mut buf = [0u8; 512];
            while let Ok(n) = p.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let room = 512usize.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
        (kept, child.wait().await)
    };
    match tokio::time::timeout(settings.interval, run).await {
        Err(_) => Err(CheckFailed::TooLong(
            check.clone(),
            settings.interval.as_millis(),
        )),
        Ok((_, Err(e))) => Err(CheckFailed::Run(check.clone(), e)),
        Ok((_, Ok(st))) if st.success() => Ok(()),
        Ok((stderr, Ok(status))) => Err(CheckFailed::Exit {
            check: check.clone(),
            status,
            said: super::said(&stderr),
        }),
    }
}
