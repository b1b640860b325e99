//! The guest half, run by vstream-agent: keeps the guest's PPP link up.
//!
//! In the default mode the agent opens a `ppp` channel as soon as its session with vstreamd is
//! up, runs pppd on a pseudo-terminal bridged to it ([`super::pppd`]), and when the link ends
//! (pppd exited, the channel was reset, the session restarted) does it again, after a pause
//! that grows while links fail at once. If vstreamd refuses the channel (the guest has no
//! `[guest.ppp]` section) the agent says so once and tries again only in a new session (a
//! restarted vstreamd may have a new config). With `vstream.ppp=port:NAME` the link runs on
//! that virtio-serial port instead, reopened whenever it ends.
//!
//! The guest's pppd takes its address from the host (`noipdefault`, IPCP), offers an MRU of
//! [`GUEST_MRU`] so that the host's configured MTU decides, adds no default route, and watches
//! the link with LCP echoes.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use vstream_link::{Mux, MuxEvent};
use vstream_transport::{bind_retrying, Address};

use super::pppd::{self, PppdCommand};
use super::{link_backoff, next_pause, CHANNEL_NAME, CLASS, COMMON_PPPD_OPTIONS, GUEST_MRU};

/// Where the guest's PPP link runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// On a `ppp` channel of the agent's session (the default).
    Channel,
    /// On a raw transport, e.g. `port:org.vstream.ppp`.
    Transport(Address),
    /// No PPP link.
    Off,
}

impl FromStr for Mode {
    type Err = NotAMode;

    fn from_str(s: &str) -> Result<Mode, NotAMode> {
        match s {
            "off" => Ok(Mode::Off),
            "on" | "channel" => Ok(Mode::Channel),
            a => a
                .parse()
                .map(Mode::Transport)
                .map_err(|e| NotAMode(a.to_owned(), e.to_string())),
        }
    }
}

/// A `--ppp` / `vstream.ppp=` value that is none of the modes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not on, off, channel or a transport address: {1}")]
pub struct NotAMode(pub String, pub String);

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Channel => f.write_str("channel"),
            Mode::Transport(a) => write!(f, "{a}"),
            Mode::Off => f.write_str("off"),
        }
    }
}

/// The guest's pppd.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the link runs.
    pub mode: Mode,
    /// The pppd binary.
    pub pppd: PathBuf,
    /// Options appended to [`guest_pppd_options`].
    pub options: Vec<String>,
}

impl Settings {
    /// The defaults for `mode`: `/usr/sbin/pppd`, no extra options.
    pub fn new(mode: Mode) -> Settings {
        Settings {
            mode,
            pppd: PathBuf::from("/usr/sbin/pppd"),
            options: Vec::new(),
        }
    }

    fn command(&self) -> PppdCommand {
        let mut options = guest_pppd_options();
        options.extend(self.options.iter().cloned());
        PppdCommand {
            program: self.pppd.clone(),
            options,
            netns: None,
        }
    }
}

/// The guest's pppd options (after the device).
pub fn guest_pppd_options() -> Vec<String> {
    let mut o: Vec<String> = COMMON_PPPD_OPTIONS.iter().map(|s| s.to_string()).collect();
    for (k, v) in [
        ("mtu", GUEST_MRU.to_string()),
        ("mru", GUEST_MRU.to_string()),
        ("lcp-echo-interval", "5".into()),
        ("lcp-echo-failure", "4".into()),
        ("ipparam", "vstream".into()),
    ] {
        o.push(k.into());
        o.push(v);
    }
    for flag in [
        "noipdefault",
        "ipcp-accept-local",
        "ipcp-accept-remote",
        "nodefaultroute",
    ] {
        o.push(flag.into());
    }
    o
}

/// Keeps the PPP link up as `settings` say, forever (returns at once if the mode is `Off`).
pub async fn run(mux: Mux, settings: Settings) {
    match settings.mode.clone() {
        Mode::Off => {}
        Mode::Channel => run_on_channels(mux, &settings).await,
        Mode::Transport(address) => run_on_transport(address, &settings).await,
    }
}

async fn run_on_channels(mux: Mux, settings: &Settings) {
    let mut events = mux.subscribe();
    let mut backoff = link_backoff();
    let mut refused = String::new();
    loop {
        // Only events from now on tell of a new session.
        while !matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
        ) {}
        match mux.open(CLASS, CHANNEL_NAME).await {
            Ok(channel) => {
                refused.clear();
                tracing::info!(pppd = %settings.pppd.display(), "ppp: link starting on a channel");
                let started = Instant::now();
                let why = run_link(settings, channel).await;
                tracing::info!("ppp: link ended: {why}");
                tokio::time::sleep(next_pause(&mut backoff, started.elapsed())).await;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let why = e.to_string();
                if why != refused {
                    tracing::info!(
                        "ppp: vstreamd did not take the link: {why}; trying again in a new session"
                    );
                    refused = why;
                }
                wait_for_new_session(&mut events, Duration::from_secs(600)).await;
            }
            Err(e) => {
                tracing::debug!("ppp: opening the channel failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Waits until a link comes up without resuming the session (vstreamd or this agent
/// restarted), or `limit`.
async fn wait_for_new_session(events: &mut broadcast::Receiver<MuxEvent>, limit: Duration) {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(MuxEvent::LinkUp { resumed: false, .. }) => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    };
    let _ = tokio::time::timeout(limit, wait).await;
}

async fn run_on_transport(address: Address, settings: &Settings) {
    let mut endpoint = bind_retrying(&address, Duration::from_secs(5), |e| {
        tracing::warn!(%address, "ppp: cannot use the transport: {e}; retrying");
    })
    .await;
    let mut backoff = link_backoff();
    loop {
        let pause = match endpoint.next().await {
            Ok(conn) => {
                tracing::info!(%address, "ppp: link starting on a transport");
                let started = Instant::now();
                let why = run_link(settings, conn.stream).await;
                tracing::info!(%address, "ppp: link ended: {why}");
                next_pause(&mut backoff, started.elapsed())
            }
            Err(e) => {
                tracing::debug!(%address, "ppp: transport: {e}");
                next_pause(&mut backoff, Duration::ZERO)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

async fn run_link<S>(settings: &Settings, stream: S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
{
    let cmd = settings.command();
    match pppd::run(&cmd, stream, |line| tracing::info!("pppd: {line}")).await {
        Ok(end) => end.to_string(),
        Err(e) => format!("pppd did not start: {e}"),
    }
}
