//! vstream-agent's settings: from its command line or, when it runs as a guest's helper
//! started by init, from the kernel command line (`vstream.connect=ADDR`, repeatable,
//! `vstream.name=NAME`, `vstream.qga=ADDR`, `vstream.random=0` to leave the kernel's entropy
//! pool alone, and `vstream.watchdog=INTERVAL` to send watchdog heartbeats).
#![deny(missing_docs)]

use std::time::Duration;

use vstream_devices::random::guest::{FeedSettings, Feeder, KernelPool};
use vstream_devices::watchdog::guest::{GuestSettings as WatchdogSettings, Heartbeat};
use vstream_link::{link_params, Mux};
use vstream_transport::{Address, Endpoint};
use vstream_wire::auth::Key;
use vstream_wire::{Config, Role};

/// The guest-initiated devices an agent runs besides its services.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Feed the kernel's entropy pool from the host (`random` device); needs `CAP_SYS_ADMIN`.
    pub random: Option<FeedSettings>,
    /// Send watchdog heartbeats (`watchdog` device).
    pub watchdog: Option<WatchdogSettings>,
    /// The guest's key: TCP links prove it in a key handshake (docs/PROTOCOL.md §9) before the
    /// mux starts, in whichever direction they connect.
    pub key: Option<Key>,
}

/// A running agent: one session with the host over any number of transports.
pub struct Agent {
    mux: Mux,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    heartbeat: Option<Heartbeat>,
}

impl Agent {
    /// Starts serving the guest devices, keeping every transport connected (the first is
    /// preferred). Must be called inside a tokio runtime.
    pub fn start(name: &str, connect: Vec<Address>) -> Agent {
        Agent::start_with(name, connect, AgentOptions::default())
    }

    /// [`Agent::start`], plus the guest-initiated devices of `options`.
    pub fn start_with(name: &str, connect: Vec<Address>, options: AgentOptions) -> Agent {
        let (mux, incoming) = Mux::new(Config::new(Role::Guest, name), vstream_link::session_id());
        let mut tasks = vec![tokio::spawn(vstream_devices::dispatch(
            vstream_devices::guest_services(),
            incoming,
        ))];
        tracing::info!(%name, "vstream-agent starting");
        for (prio, address) in connect.into_iter().enumerate() {
            tasks.push(tokio::spawn(keep_connected(
                mux.clone(),
                address,
                prio as u32,
                (name.to_owned(), options.key.clone()),
            )));
        }
        if let Some(feed) = options.random {
            match KernelPool::open() {
                Ok(pool) => tasks.push(tokio::spawn(vstream_devices::random::guest::run_feeder(
                    mux.clone(),
                    Feeder::new(pool, feed),
                ))),
                Err(e) => tracing::warn!("random: not feeding the kernel's entropy pool: {e}"),
            }
        }
        let heartbeat = options.watchdog.map(|w| {
            tracing::info!(interval_ms = w.interval.as_millis() as u64, check = ?w.check, "watchdog heartbeats on");
            Heartbeat::start(mux.clone(), w)
        });
        Agent {
            mux,
            tasks,
            heartbeat,
        }
    }

    /// A clean stop: disarms the watchdog (waiting for the host to confirm, a few seconds at
    /// most), then stops everything. Dropping the agent instead stops without a disarm, as a
    /// crash would.
    pub async fn shutdown(mut self, reason: &str) {
        if let Some(h) = self.heartbeat.take() {
            h.disarm(reason).await;
        }
    }

    /// The session with the host.
    pub fn mux(&self) -> &Mux {
        &self.mux
    }

    /// Also accepts raw print jobs (AppSocket/JetDirect) on a listening address, e.g.
    /// `tcp-listen:127.0.0.1:9100` or `unix-listen:/run/vstream/printer.sock`; each connection
    /// is one job, sent to the host's spool.
    pub fn serve_printer(&mut self, address: Address) {
        self.tasks
            .push(tokio::spawn(vstream_devices::printer::guest::listen(
                self.mux.clone(),
                address,
            )));
    }

    /// Also serves the QEMU guest agent protocol on a raw transport, e.g.
    /// `port:org.qemu.guest_agent.0`, for existing QGA clients (same state as the `qga`
    /// channels).
    pub fn serve_qga(&mut self, address: Address) {
        let agent = vstream_devices::qga::guest::GuestAgent::global();
        self.tasks
            .push(tokio::spawn(vstream_devices::qga::guest::serve_address(
                agent, address,
            )));
    }

    /// Also keeps the guest's PPP link up (pppd on a `ppp` channel, or on a raw transport), as
    /// `settings` say; see docs/devices/ppp.md.
    pub fn serve_ppp(&mut self, settings: vstream_devices::ppp::guest::Settings) {
        self.tasks
            .push(tokio::spawn(vstream_devices::ppp::guest::run(
                self.mux.clone(),
                settings,
            )));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Longest wait between two attempts to reach the host. Short, so that a guest is back within
/// 2 s of a restarted vstreamd's start however long the daemon was gone; an attempt on a dead
/// socket or an unconnected port costs next to nothing.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// How long a transport waits after the host refused it (REFUSE, or a key handshake it lost):
/// the host's mind changes only with its config or a hold-off, so retrying twice a second only
/// fills both logs.
const REFUSED_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps one transport connected forever, with backoff; errors are logged once per change.
async fn keep_connected(mux: Mux, address: Address, priority: u32, who: (String, Option<Key>)) {
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    let mut endpoint = loop {
        match Endpoint::bind(address.clone()).await {
            Ok(ep) => break ep,
            Err(e) => {
                log_change(&mut last_error, &address, &e.to_string());
                tokio::time::sleep(MAX_BACKOFF).await;
            }
        }
    };
    let params = link_params(&address, None, priority);
    loop {
        match endpoint.next().await {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                tracing::info!(%address, peer = %conn.peer, "transport connected");
                let (reason, refused) = match prove(conn, &address, &who).await {
                    Ok((stream, prefix)) => {
                        let reason = mux
                            .run_link(stream, params, &address.to_string(), &prefix)
                            .await;
                        let refused = reason.starts_with(vstream_wire::REFUSED_BY_PEER);
                        (reason, refused)
                    }
                    Err(e) => (
                        e.to_string(),
                        e.kind() == std::io::ErrorKind::PermissionDenied,
                    ),
                };
                if refused {
                    // Said once while the same refusal repeats.
                    log_change(&mut last_error, &address, &reason);
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                    continue;
                }
                last_error.clear();
                tracing::info!(%address, "transport down: {reason}");
            }
            Err(e) => log_change(&mut last_error, &address, &e.to_string()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs the key handshake on a TCP link when the agent has a key (as the connector on `tcp:`,
/// as the acceptor on `tcp-listen:`); other links pass as they are. Returns the stream and the
/// bytes read past the handshake.
async fn prove(
    conn: vstream_transport::Connection,
    address: &Address,
    (name, key): &(String, Option<Key>),
) -> std::io::Result<(vstream_transport::BoxStream, Vec<u8>)> {
    let mut stream = conn.stream;
    let Some(key) = key else {
        return Ok((stream, Vec::new()));
    };
    const T: Duration = Duration::from_secs(10);
    let rest = match (address, conn.identity) {
        (Address::Tcp { .. }, _) => {
            vstream_link::auth::connector(&mut stream, name, key, T).await?
        }
        (_, vstream_transport::PeerIdentity::Tcp(_)) => {
            let key_for = |n: &str| match n == name {
                true => Ok(key.clone()),
                false => Err(format!("this is guest {name:?}, not {n:?}")),
            };
            vstream_link::auth::acceptor(&mut stream, Vec::new(), key_for, T)
                .await?
                .1
        }
        _ => Vec::new(),
    };
    Ok((stream, rest))
}

fn log_change(last: &mut String, address: &Address, error: &str) {
    if last != error {
        tracing::warn!(%address, "{error}");
        *last = error.to_owned();
    }
}

/// What the agent was asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// Transports to keep connected, in order of preference.
    pub connect: Vec<Address>,
    /// The guest name announced to the host.
    pub name: Option<String>,
    /// A raw transport on which to serve the QEMU guest agent protocol.
    pub qga: Option<Address>,
    /// `Some(false)`: do not feed the kernel's entropy pool (`vstream.random=0`).
    pub random: Option<bool>,
    /// Watchdog heartbeat interval (`vstream.watchdog=500ms`).
    pub watchdog_interval: Option<Duration>,
    /// The guest's key file for TCP links (`vstream.key_file=PATH`).
    pub key_file: Option<std::path::PathBuf>,
}

/// Reads `vstream.connect=`, `vstream.name=` and `vstream.qga=` from a kernel command line.
pub fn from_kernel_cmdline(cmdline: &str) -> Result<Settings, String> {
    let mut s = Settings::default();
    for word in cmdline.split_ascii_whitespace() {
        if let Some(a) = word.strip_prefix("vstream.connect=") {
            s.connect
                .push(a.parse().map_err(|e| format!("vstream.connect={a}: {e}"))?);
        } else if let Some(k) = word.strip_prefix("vstream.key_file=") {
            s.key_file = Some(k.into());
        } else if let Some(n) = word.strip_prefix("vstream.name=") {
            s.name = Some(n.to_owned());
        } else if let Some(a) = word.strip_prefix("vstream.qga=") {
            s.qga = Some(a.parse().map_err(|e| format!("vstream.qga={a}: {e}"))?);
        } else if let Some(r) = word.strip_prefix("vstream.random=") {
            s.random = Some(match r {
                "1" | "on" | "yes" => true,
                "0" | "off" | "no" => false,
                _ => return Err(format!("vstream.random={r}: expected 0 or 1")),
            });
        } else if let Some(w) = word.strip_prefix("vstream.watchdog=") {
            let d = vstream_devices::watchdog::parse_duration(w)
                .map_err(|e| format!("vstream.watchdog={w}: {e}"))?;
            if d.is_zero() {
                return Err(format!("vstream.watchdog={w}: the interval must not be 0"));
            }
            s.watchdog_interval = Some(d);
        }
    }
    Ok(s)
}

/// The printer listeners a kernel command line asks for: `vstream.printer=ADDR` (repeatable)
/// or `vstream.printer=off`; `None` if it says nothing (then the defaults apply).
pub fn printer_listeners(cmdline: &str) -> Result<Option<Vec<Address>>, String> {
    let mut out: Option<Vec<Address>> = None;
    for word in cmdline.split_ascii_whitespace() {
        if let Some(a) = word.strip_prefix("vstream.printer=") {
            let list = out.get_or_insert_with(Vec::new);
            if a != "off" {
                list.push(a.parse().map_err(|e| format!("vstream.printer={a}: {e}"))?);
            }
        }
    }
    Ok(out)
}

/// The PPP link a kernel command line asks for: `vstream.ppp=on|off|ADDR` (the last one
/// wins); `None` if it says nothing.
pub fn ppp_mode(cmdline: &str) -> Result<Option<vstream_devices::ppp::guest::Mode>, String> {
    let mut out = None;
    for word in cmdline.split_ascii_whitespace() {
        if let Some(m) = word.strip_prefix("vstream.ppp=") {
            out = Some(m.parse().map_err(|e| format!("vstream.ppp={m}: {e}"))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ppp_mode_from_the_kernel_command_line() {
        use vstream_devices::ppp::guest::Mode;
        assert_eq!(super::ppp_mode("quiet").expect("none"), None);
        assert_eq!(
            super::ppp_mode("vstream.ppp=off").expect("off"),
            Some(Mode::Off)
        );
        let m = super::ppp_mode("vstream.ppp=off vstream.ppp=port:org.vstream.ppp").expect("port");
        assert_eq!(
            m.map(|m| m.to_string()).as_deref(),
            Some("port:org.vstream.ppp")
        );
        assert!(super::ppp_mode("vstream.ppp=bogus:1").is_err());
    }

    #[test]
    fn printer_listeners_from_the_kernel_command_line() {
        assert_eq!(super::printer_listeners("quiet").expect("none"), None);
        assert_eq!(
            super::printer_listeners("vstream.printer=off").expect("off"),
            Some(vec![])
        );
        let l = super::printer_listeners(
            "vstream.printer=tcp-listen:127.0.0.1:9101 vstream.printer=unix-listen:/run/p.sock",
        )
        .expect("two")
        .expect("some");
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].to_string(), "tcp-listen:127.0.0.1:9101");
        assert!(super::printer_listeners("vstream.printer=bogus:1").is_err());
    }

    use super::*;

    #[test]
    fn reads_repeated_connects_and_the_name() {
        let s = from_kernel_cmdline(
            "console=ttyS0 vstream.connect=port:org.vstream.0 quiet vstream.connect=serial:/dev/ttyS4,baud=115200 vstream.name=lab vstream.qga=port:org.qemu.guest_agent.0",
        )
        .expect("parse");
        assert_eq!(s.name.as_deref(), Some("lab"));
        assert_eq!(
            s.qga.map(|a| a.to_string()).as_deref(),
            Some("port:org.qemu.guest_agent.0")
        );
        assert_eq!(s.connect.len(), 2);
        assert_eq!(s.connect[0].to_string(), "port:org.vstream.0");
        assert!(matches!(&s.connect[1], Address::Serial(c) if c.baud == 115_200));
    }

    #[test]
    fn reads_the_device_settings() {
        let s = from_kernel_cmdline("vstream.random=0 vstream.watchdog=500ms").expect("parse");
        assert_eq!(s.random, Some(false));
        assert_eq!(s.watchdog_interval, Some(Duration::from_millis(500)));
        let none = from_kernel_cmdline("quiet").expect("parse");
        assert_eq!((none.random, none.watchdog_interval), (None, None));
        assert!(from_kernel_cmdline("vstream.watchdog=0s").is_err());
        assert!(from_kernel_cmdline("vstream.random=maybe").is_err());
    }

    #[test]
    fn a_bad_address_is_an_error_that_names_it() {
        let e = from_kernel_cmdline("vstream.connect=bogus:1").expect_err("bad");
        assert!(e.contains("vstream.connect=bogus:1"), "{e}");
    }
}
