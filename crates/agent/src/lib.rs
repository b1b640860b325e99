//! vstream-agent's settings: from its command line or, when it runs as a guest's helper
//! started by init, from the kernel command line (`vstream.connect=ADDR`, repeatable,
//! `vstream.name=NAME`, `vstream.key_file=PATH`, and each device's own `vstream.KEY=` words,
//! see `vstream_devices::registry::Device::agent_options`).
#![deny(missing_docs)]

use std::time::Duration;

use vstream_devices::registry::{registry, GuestOptions};
use vstream_devices::ServeFuture;
use vstream_link::{link_params, Mux};
use vstream_transport::{Address, Endpoint};
use vstream_wire::auth::Key;
use vstream_wire::{Config, Role};

/// What an agent runs besides the devices' services.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Each device's guest options (e.g. heartbeats, listeners); a device without any starts
    /// only its services.
    pub devices: GuestOptions,
    /// The guest's key: TCP links prove it in a key handshake (docs/PROTOCOL.md §9) before the
    /// mux starts, in whichever direction they connect.
    pub key: Option<Key>,
}

/// A running agent: one session with the host over any number of transports.
pub struct Agent {
    mux: Mux,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    on_stop: Option<Box<dyn FnOnce(String) -> ServeFuture + Send>>,
}

impl Agent {
    /// Starts serving the guest devices, keeping every transport connected (the first is
    /// preferred). Must be called inside a tokio runtime.
    pub fn start(name: &str, connect: Vec<Address>) -> Agent {
        Agent::start_with(name, connect, AgentOptions::default())
    }

    /// [`Agent::start`], plus what the devices' guest options ask for.
    pub fn start_with(name: &str, connect: Vec<Address>, options: AgentOptions) -> Agent {
        let (mux, incoming) = Mux::new(Config::new(Role::Guest, name), vstream_link::session_id());
        let half = registry().start_guest(&mux, &options.devices);
        let mut tasks = vec![tokio::spawn(vstream_devices::dispatch(
            half.services,
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
        tasks.extend(half.tasks.into_iter().map(tokio::spawn));
        Agent {
            mux,
            tasks,
            on_stop: half.on_stop,
        }
    }

    /// A clean stop: tells the devices why (a watchdog disarms, waiting for the host to confirm,
    /// a few seconds at most), then stops everything. Dropping the agent instead stops without
    /// that, as a crash would.
    pub async fn shutdown(mut self, reason: &str) {
        if let Some(stop) = self.on_stop.take() {
            stop(reason.to_owned()).await;
        }
    }

    /// The session with the host.
    pub fn mux(&self) -> &Mux {
        &self.mux
    }

    /// Also starts the tasks that `options` ask of device `class`'s guest half (e.g. one more
    /// print-job listener), besides those the agent started with.
    pub fn start_device<T: std::any::Any + Send + Sync>(
        &mut self,
        class: &'static str,
        options: T,
    ) {
        let mut devices = GuestOptions::default();
        devices.set(class, options);
        if let Some(d) = registry().get(class) {
            let half = d.guest(&self.mux, &devices);
            self.tasks.extend(half.tasks.into_iter().map(tokio::spawn));
        }
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
                            .await
                            .to_string();
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
    /// The guest's key file for TCP links (`vstream.key_file=PATH`).
    pub key_file: Option<std::path::PathBuf>,
}

/// Reads `vstream.connect=`, `vstream.name=` and `vstream.key_file=` from a kernel command line.
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
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_repeated_connects_and_the_name() {
        let s = from_kernel_cmdline(
            "root=/dev/vda vstream.connect=port:org.vstream.0 quiet vstream.connect=serial:/dev/ttyS4,baud=115200 vstream.name=lab vstream.key_file=/etc/k",
        )
        .expect("parse");
        assert_eq!(s.name.as_deref(), Some("lab"));
        assert_eq!(s.key_file, Some("/etc/k".into()));
        assert_eq!(s.connect.len(), 2);
        assert_eq!(s.connect[0].to_string(), "port:org.vstream.0");
        assert!(matches!(&s.connect[1], Address::Serial(c) if c.baud == 115_200));
    }

    #[test]
    fn a_bad_address_is_an_error_that_names_it() {
        let e = from_kernel_cmdline("vstream.connect=bogus:1").expect_err("bad");
        assert!(e.contains("vstream.connect=bogus:1"), "{e}");
    }
}
