//! The host half, run by vstreamd: terminates each guest's PPP link with the settings of its
//! `[guest.ppp]` section ([`PppConfig`]).
//!
//! The link arrives as a `ppp` channel the agent opens ([`PppService`]) or, if the section names
//! a `transport`, on that raw transport (a virtio-serial port's chardev socket, kept connected by
//! [`keep_transport`]). One link per guest: a new channel replaces the link of an older one (an
//! agent that restarted has a new session; the old link is dead anyway).
//!
//! Backends: `pppd` runs the configured pppd on a pseudo-terminal ([`super::pppd`]) with
//! `LOCAL:REMOTE`, `mtu`/`mru`, `ifname` and the LCP echo settings, inside `netns` if set;
//! `tun` terminates PPP in this process ([`super::proto`]) and hands the IP packets to a TUN
//! device in `netns`. Either way the configured routes are added through the interface once IPCP
//! is up (the kernel removes them with the interface).

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use vstream_link::ChannelStream;
use vstream_transport::bind_retrying;

use super::net::NetConfig;
use super::pppd::{self, PppdCommand};
use super::proto::{Endpoint, EndpointConfig, Event, MAX_MRU};
use super::{link_backoff, next_pause, CHANNEL_NAME, CLASS};
use crate::status::{DeviceStatus, Sample};
use crate::tun::Tun;
use crate::{EventSink, HostContext, ServeFuture, Service};

pub use super::config::{default_interface, Backend, InvalidConfig, PppConfig, Route};

/// What [`run_link`] reports while a link runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// IPCP is up: IP flows through `interface`.
    Up {
        /// The host interface.
        interface: String,
        /// The host end's address.
        local: Ipv4Addr,
        /// The guest end's address.
        remote: Ipv4Addr,
        /// The negotiated MTU, where known (the userspace endpoint knows it; pppd does not say).
        mtu: Option<u16>,
    },
}

/// The link's state, for `vstreamctl status` (`devices.ppp`).
#[derive(Debug, Clone, Default)]
struct LinkState {
    state: &'static str,
    since: u64,
    interface: Option<String>,
    links: u64,
    last_end: Option<String>,
}

struct Shared {
    guest: String,
    config: Option<Arc<PppConfig>>,
    events: EventSink,
    state: Mutex<LinkState>,
    /// The generation of the newest link; older links end when it changes.
    current: watch::Sender<u64>,
}

impl Shared {
    fn set(&self, f: &dyn Fn(&mut LinkState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
    }

    /// Runs one link on `stream`, keeping the status and the events up to date, until it ends
    /// or a newer link replaces it. Only the newest link writes the status.
    async fn run(&self, config: &PppConfig, stream: impl LinkStream, on: &str) {
        let guest = &self.guest;
        self.current.send_modify(|g| *g += 1);
        let link = *self.current.borrow();
        let mut newer = self.current.subscribe();
        let set = |f: &dyn Fn(&mut LinkState)| {
            if *self.current.borrow() == link {
                self.set(f);
            }
        };
        tracing::info!(%guest, link, backend = ?config.backend, on, "ppp: link starting");
        set(&|st| {
            st.state = "negotiating";
            st.since = now_secs();
            st.links = link;
            st.interface = None;
        });
        let running = run_link(guest, config, stream, |ev| match ev {
            LinkEvent::Up {
                interface,
                local,
                remote,
                mtu,
            } => {
                set(&|st| {
                    st.state = "up";
                    st.since = now_secs();
                    st.interface = Some(interface.clone());
                });
                self.events.emit(
                    "ppp-up",
                    json!({"link": link, "interface": interface, "local": local.to_string(),
                           "remote": remote.to_string(), "mtu": mtu}),
                );
            }
        });
        let replaced = async {
            while newer.changed().await.is_ok() {
                if *newer.borrow() != link {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        let why = tokio::select! {
            why = running => why,
            () = replaced => "replaced by a newer link".to_owned(),
        };
        tracing::info!(%guest, link, on, "ppp: link ended: {why}");
        set(&|st| {
            st.state = "down";
            st.since = now_secs();
            st.last_end = Some(why.clone());
        });
        self.events
            .emit("ppp-down", json!({ "link": link, "reason": why }));
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `ppp` service of one guest. If its `[guest.ppp]` names a `transport`, creating the
/// service (inside a tokio runtime) also starts keeping the link up on that transport.
pub struct PppService {
    shared: Arc<Shared>,
}

impl PppService {
    /// The service of the guest of `ctx`, with its `[guest.ppp]` section (if any).
    pub fn new(ctx: &HostContext, config: Option<PppConfig>) -> PppService {
        let shared = Arc::new(Shared {
            guest: ctx.guest.clone(),
            config: config.map(Arc::new),
            events: ctx.events.clone(),
            state: Mutex::new(LinkState {
                state: "down",
                since: now_secs(),
                ..LinkState::default()
            }),
            current: watch::channel(0).0,
        });
        let on_transport = shared
            .config
            .as_ref()
            .is_some_and(|c| c.transport.is_some());
        if on_transport {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(keep_transport(Arc::downgrade(&shared)));
                }
                Err(_) => tracing::warn!(
                    guest = %shared.guest,
                    "ppp: no runtime to keep the link's transport connected"
                ),
            }
        }
        PppService { shared }
    }
}

impl Service for PppService {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let shared = self.shared.clone();
        Box::pin(async move {
            let guest = &shared.guest;
            if name != CHANNEL_NAME {
                stream.reset(&format!(
                    "ppp has no {name:?} (its channel has an empty name)"
                ));
                return;
            }
            let Some(config) = shared.config.clone() else {
                stream.reset(&format!(
                    "guest {guest:?} has no [guest.ppp] section in vstreamd's config: no PPP link"
                ));
                return;
            };
            if let Some(t) = &config.transport {
                stream.reset(&format!(
                    "guest {guest:?}'s PPP link is configured on transport {t}, not on a channel"
                ));
                return;
            }
            shared.run(&config, stream, "channel").await;
        })
    }

    fn status(&self) -> Option<DeviceStatus> {
        let config = self.shared.config.as_ref()?;
        let st = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(DeviceStatus::new(PppStatus {
            state: st.state.to_owned(),
            since: st.since,
            backend: config.backend,
            on: config
                .transport
                .as_ref()
                .map_or("channel".to_owned(), |t| t.to_string()),
            local: config.local.to_string(),
            remote: config.remote.to_string(),
            mtu: config.mtu,
            netns: config.netns.clone(),
            interface: st
                .interface
                .unwrap_or_else(|| config.interface_name(&self.shared.guest)),
            links: st.links,
            last_end: st.last_end,
        }))
    }
}

/// The PPP link's status (`devices.ppp` in `vstreamctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PppStatus {
    /// `down`, `connecting`, `up`.
    pub state: String,
    /// Since when (Unix seconds).
    pub since: u64,
    /// How the host end is terminated.
    pub backend: Backend,
    /// The transport it runs on (`channel`: a mux channel).
    pub on: String,
    /// The host's address.
    pub local: String,
    /// The guest's address.
    pub remote: String,
    /// The link's MTU.
    pub mtu: u16,
    /// The network namespace of the host end, if any.
    pub netns: Option<String>,
    /// The host end's interface.
    pub interface: String,
    /// Links made.
    pub links: u64,
    /// Why the last link ended.
    pub last_end: Option<String>,
}

impl crate::status::Samples for PppStatus {
    fn samples(&self) -> Vec<Sample> {
        vec![
            Sample::flag("up", "Whether the PPP link is up.", self.state == "up"),
            Sample::counter("links", "PPP links made.", self.links),
        ]
    }
}

/// Keeps the guest's PPP link up on its configured transport: connects (or accepts), runs the
/// link until it ends, and again after a pause; stops when the service is gone.
async fn keep_transport(shared: Weak<Shared>) {
    let Some((guest, config)) = shared
        .upgrade()
        .and_then(|s| Some((s.guest.clone(), s.config.clone()?)))
    else {
        return;
    };
    let Some(address) = config.transport.clone() else {
        return;
    };
    let mut endpoint = bind_retrying(&address, Duration::from_secs(5), |e| {
        tracing::warn!(%guest, %address, "ppp: cannot use the transport: {e}; retrying");
    })
    .await;
    let on = address.to_string();
    let mut backoff = link_backoff();
    loop {
        let pause = match endpoint.next().await {
            Ok(conn) => {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let started = Instant::now();
                shared.run(&config, conn.stream, &on).await;
                next_pause(&mut backoff, started.elapsed())
            }
            Err(e) => {
                tracing::debug!(%guest, %address, "ppp: transport: {e}");
                next_pause(&mut backoff, Duration::ZERO)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// What a PPP link runs over: a channel, a raw transport, a test's pipe.
pub trait LinkStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin> LinkStream for S {}

/// Runs one link on `stream` with the guest's settings until it ends; returns why. `report`
/// hears when IP is up.
pub async fn run_link(
    guest: &str,
    config: &PppConfig,
    stream: impl LinkStream,
    report: impl FnMut(LinkEvent) + Send,
) -> String {
    let result = match config.backend {
        Backend::Pppd => run_pppd(guest, config, stream, report).await,
        Backend::Tun => {
            let link = UserspaceLink {
                label: guest.to_owned(),
                local: config.local,
                remote: config.remote,
                mtu: config.mtu,
                netns: config.netns_path(),
                interface: config.interface_name(guest),
                routes: config.routes.clone(),
                echo_interval: Duration::from_secs(u64::from(config.echo_interval_secs)),
                echo_failures: config.echo_failures,
            };
            run_userspace(&link, stream, report).await
        }
    };
    result.unwrap_or_else(|e| format!("error: {e}"))
}

async fn run_pppd(
    guest: &str,
    config: &PppConfig,
    stream: impl LinkStream,
    mut report: impl FnMut(LinkEvent) + Send,
) -> io::Result<String> {
    let netns = config.netns_path();
    let routes = config.routes.clone();
    // The socket for routes is made now, in the namespace, so the log callback only does ioctls.
    let net = if routes.is_empty() {
        None
    } else {
        let ns = netns.clone();
        Some(tokio::task::spawn_blocking(move || NetConfig::open(ns.as_deref())).await??)
    };
    let cmd = PppdCommand {
        program: config.pppd.clone(),
        options: config.pppd_options(guest),
        netns,
    };
    let mut interface = config.interface_name(guest);
    let mut local = config.local;
    let label = guest.to_owned();
    let end = pppd::run(&cmd, stream, move |line| {
        tracing::info!(guest = %label, "pppd: {line}");
        // pppd's words once IPCP is up: "Using interface ppp0", "local  IP address A",
        // "remote IP address B" (in that order).
        if let Some(i) = line.strip_prefix("Using interface ") {
            interface = i.trim().to_owned();
        } else if let Some(a) = line.strip_prefix("local  IP address ") {
            local = a.trim().parse().unwrap_or(local);
        } else if let Some(a) = line.strip_prefix("remote IP address ") {
            if let Some(net) = &net {
                add_routes(&label, net, &interface, &routes);
            }
            report(LinkEvent::Up {
                interface: interface.clone(),
                local,
                remote: a.trim().parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                mtu: None,
            });
        }
    })
    .await?;
    Ok(end.to_string())
}

fn add_routes(guest: &str, net: &NetConfig, interface: &str, routes: &[Route]) {
    for r in routes {
        match net.add_route(interface, r.net, r.prefix) {
            Ok(()) => tracing::info!(%guest, "ppp: route {r} via {interface}"),
            Err(e) => tracing::warn!(%guest, "ppp: cannot add route {r} via {interface}: {e}"),
        }
    }
}

/// A link terminated in this process with a TUN device (backend `tun`; also the guest end of
/// the host tests).
#[derive(Debug, Clone)]
pub struct UserspaceLink {
    /// For logs.
    pub label: String,
    /// Our address.
    pub local: Ipv4Addr,
    /// The peer's address (given to it through IPCP).
    pub remote: Ipv4Addr,
    /// MTU and MRU.
    pub mtu: u16,
    /// The namespace of the TUN device.
    pub netns: Option<PathBuf>,
    /// The TUN device's name.
    pub interface: String,
    /// Routes through it once up.
    pub routes: Vec<Route>,
    /// LCP echo interval (zero: none).
    pub echo_interval: Duration,
    /// Unanswered echoes before the link is dead.
    pub echo_failures: u32,
}

/// IP packets read from the TUN device per turn before the frames are written out.
const TUN_BATCH: usize = 64;

/// Runs a userspace PPP endpoint on `stream`, with its IP side on a new TUN device, until the
/// link ends; returns why.
pub async fn run_userspace(
    link: &UserspaceLink,
    stream: impl LinkStream,
    mut report: impl FnMut(LinkEvent) + Send,
) -> io::Result<String> {
    let ns = link.netns.clone();
    let name = link.interface.clone();
    let (tun, net) = tokio::task::spawn_blocking(move || {
        let tun = Tun::create(ns.as_deref(), &name)?;
        let net = NetConfig::open(ns.as_deref())?;
        Ok::<_, io::Error>((tun, net))
    })
    .await??;
    let mut cfg = EndpointConfig::new(link.local, link.remote, link.mtu, random_magic());
    cfg.echo_interval = link.echo_interval;
    cfg.echo_failures = link.echo_failures;
    let mut ep = Endpoint::new(cfg, Instant::now());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = vec![0u8; 64 * 1024];
    let mut packet = vec![0u8; usize::from(MAX_MRU)];
    let mut out = Vec::new();
    let label = &link.label;
    loop {
        ep.poll_transmit(&mut out);
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                return Ok(format!("writing the link failed: {e}"));
            }
            out.clear();
        }
        while let Some(ev) = ep.poll_event() {
            match ev {
                Event::Packet(p) => {
                    if let Err(e) = tun.send(&p) {
                        tracing::debug!(%label, "ppp: {}: {e}", tun.name());
                    }
                }
                Event::Up { local, remote, mtu } => {
                    net.configure_ptp(tun.name(), local, remote, mtu)?;
                    tracing::info!(%label, interface = tun.name(), %local, %remote, mtu, "ppp: link up");
                    add_routes(label, &net, tun.name(), &link.routes);
                    report(LinkEvent::Up {
                        interface: tun.name().to_owned(),
                        local,
                        remote,
                        mtu: Some(mtu),
                    });
                }
                Event::Down(why) => {
                    ep.poll_transmit(&mut out);
                    // The Terminate-Request, best effort.
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
                    let _ = wr.shutdown().await;
                    return Ok(why);
                }
            }
        }
        let deadline = ep
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            n = rd.read(&mut inbuf) => match n {
                Ok(0) => ep.close("the link's stream ended", Instant::now()),
                Ok(n) => ep.handle_input(&inbuf[..n], Instant::now()),
                Err(e) => ep.close(&format!("reading the link failed: {e}"), Instant::now()),
            },
            n = tun.recv(&mut packet), if ep.is_up() => {
                let n = n?;
                ep.send_ip(&packet[..n]);
                // More packets already queued go out in the same write.
                for _ in 1..TUN_BATCH {
                    match tun.try_recv(&mut packet) {
                        Some(n) => { ep.send_ip(&packet[..n]); }
                        None => break,
                    }
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => ep.handle_timeout(Instant::now()),
        }
    }
}

/// A magic number for LCP: random enough to tell two ends (and a looped-back line) apart.
fn random_magic() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() as u32) | 1
}
