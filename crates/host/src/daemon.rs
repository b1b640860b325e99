//! vstreamd: guests, their transports, their sessions, and the control socket.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use vstream_devices::keep::{keep, now_secs, Kept, Slot};
use vstream_devices::registry::{registry, ControlConn, HostState, TransportStatus};
use vstream_devices::{EventSink, HostContext, Service};
use vstream_link::auth as link_auth;
use vstream_link::{Mux, MuxEvent, MuxStatus};
use vstream_transport::{Address, Endpoint, PeerIdentity};
use vstream_wire::auth::{self, Key};
use vstream_wire::frame::{encode, Kind};
use vstream_wire::Role;

use vstream_link::link_params;

use crate::access::Access;
use crate::config::{Config, GuestConfig, Limits, TransportConfig, TransportKind};
use crate::control::{push_line, read_line, write_line, Reply, Request};
use crate::error::StartError;
use crate::identity::{Admission, LogLimit, Owner, Policy, Rules};
use crate::upgrade::{Handover, Pump};

/// Bytes of guest status lines gathered before a write to a control connection.
const STATUS_BATCH: usize = 64 * 1024;

/// How long a new connection on a shared listener may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections on one shared listener that may be in their handshake at once (each may buffer
/// up to 1 MiB while looking for its HELLO).
const MAX_PENDING_HANDSHAKES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tells a connection why it is refused (a REFUSE frame, docs/PROTOCOL.md §2), then closes it.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, reason: &str) {
    let mut frame = Vec::new();
    encode(&mut frame, Kind::Refuse as u8, 0, 0, 0, reason.as_bytes());
    let send = async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    };
    // A peer that does not read gets nothing more from us.
    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
}

/// A guest: one multiplexer session, any number of transports, its devices' host halves.
pub struct Guest {
    name: String,
    mux: Mux,
    qmp: Option<Address>,
    /// Its mux transports.
    transports: Mutex<Vec<TransportStatus>>,
    /// The devices' channel services (for their status).
    services: Vec<Arc<dyn Service>>,
    /// The devices' running host halves, by class (status, raw transports, control ops).
    devices: Vec<(&'static str, Arc<dyn HostState>)>,
    /// Where this guest's events go.
    events: EventSink,
    /// What proves a connection is this guest (configured guests).
    rules: Rules,
    /// The guest's key for TCP links.
    key: Option<Key>,
    /// Who owns the name of an announced guest; `None` for configured guests.
    owner: Option<Owner>,
    /// Connections refused because they claimed this guest without proving it.
    refusals: Mutex<Refusals>,
    /// When the last connection of an announced guest ended (it is forgotten some time later).
    last_seen: Mutex<Instant>,
    /// Whether a timer to forget it runs.
    forget_pending: std::sync::atomic::AtomicBool,
    /// The guest's own tasks (session dispatch, event forwarding), ended when it is forgotten.
    tasks: Vec<tokio::task::AbortHandle>,
    /// Held off after its links were dropped for protocol violations.
    hold_off: Mutex<HoldOff>,
}

/// Back-off for a guest whose links keep being dropped for protocol violations
/// (`vstream_link::MAX_VIOLATIONS`): no connection of it is taken until `until`.
#[derive(Debug, Default)]
struct HoldOff {
    until: Option<Instant>,
    last: Duration,
    drops: u64,
}

impl HoldOff {
    /// The first hold-off; each drop within [`HOLD_OFF_MEMORY`] of the last one doubles it, up
    /// to [`HOLD_OFF_MAX`].
    const FIRST: Duration = Duration::from_secs(5);

    /// Counts a link dropped for violations; returns how long the guest is held off.
    fn penalize(&mut self, now: Instant) -> Duration {
        let recent = self
            .until
            .is_some_and(|u| now.saturating_duration_since(u) < HOLD_OFF_MEMORY);
        self.last = if recent {
            (self.last * 2).min(HOLD_OFF_MAX)
        } else {
            HoldOff::FIRST
        };
        self.until = Some(now + self.last);
        self.drops += 1;
        self.last
    }

    /// How long the guest is still held off.
    fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until
            .map(|u| u.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }
}

/// A guest whose links were dropped for violations this long ago starts afresh.
const HOLD_OFF_MEMORY: Duration = Duration::from_secs(600);
/// The longest hold-off.
const HOLD_OFF_MAX: Duration = Duration::from_secs(300);

/// Refused claims to one guest (or, daemon-wide, to names no guest has).
#[derive(Debug, Default, Clone, Serialize)]
struct Refusals {
    count: u64,
    last: Option<String>,
    #[serde(skip)]
    log: Option<LogLimitSlot>,
}

/// Rate-limits the log lines of one kind of refusal.
#[derive(Debug)]
struct LogLimitSlot(LogLimit);

impl Clone for LogLimitSlot {
    fn clone(&self) -> Self {
        LogLimitSlot(refusal_log_limit())
    }
}

fn refusal_log_limit() -> LogLimit {
    // A line a second per guest, bursts of 5: a stuck agent is seen, a flood is not logged.
    LogLimit::new(Duration::from_secs(1), 5)
}

impl Refusals {
    /// Counts one refusal and logs it unless that kind of line is over its rate.
    fn record(&mut self, guest: &str, peer: &str, reason: &str) {
        self.count += 1;
        self.last = Some(format!("{peer}: {reason}"));
        let limit = &mut self
            .log
            .get_or_insert_with(|| LogLimitSlot(refusal_log_limit()))
            .0;
        if let Some(suppressed) = limit.allow(Instant::now()) {
            tracing::warn!(
                guest,
                peer,
                suppressed,
                total = self.count,
                "refused a connection: {reason}"
            );
        }
    }
}

impl Guest {
    fn transports(&self) -> MutexGuard<'_, Vec<TransportStatus>> {
        self.transports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut TransportStatus)) {
        if let Some(t) = self.transports().get_mut(idx) {
            f(t);
        }
    }

    fn add_transport(&self, t: TransportStatus) -> usize {
        let mut ts = self.transports();
        ts.push(t);
        ts.len() - 1
    }

    /// The guest's multiplexer session.
    pub fn mux(&self) -> &Mux {
        &self.mux
    }

    /// The guest's QMP address, if configured.
    pub fn qmp(&self) -> Option<&Address> {
        self.qmp.as_ref()
    }

    /// Where this guest's events go (`vstreamctl events`); see docs/devices/events.md.
    pub fn events(&self) -> &EventSink {
        &self.events
    }

    /// After one of this guest's links ended with `reason`: if it was dropped for protocol
    /// violations, the guest is held off (no connection of it is taken) for a while.
    fn link_ended(&self, reason: &str) {
        if !reason.starts_with(vstream_link::DROPPED_FOR_VIOLATIONS) {
            return;
        }
        let wait = lock(&self.hold_off).penalize(Instant::now());
        tracing::warn!(guest = %self.name, "held off for {} s: {reason}", wait.as_secs());
        self.events.emit(
            "held-off",
            json!({ "reason": reason, "seconds": wait.as_secs() }),
        );
    }

    /// How long this guest is still held off, if it is.
    fn held_off(&self) -> Option<Duration> {
        lock(&self.hold_off).remaining(Instant::now())
    }

    fn status(&self) -> serde_json::Value {
        let mux: MuxStatus = self.mux.status();
        let hold_off = lock(&self.hold_off);
        let mut transports: Vec<serde_json::Value> = Vec::new();
        for t in self.transports().iter() {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            // Merge the live link's counters into the transport that carries it.
            // "up" means the handshake is done on a live link, not just a connected socket.
            match mux.links.iter().find(|l| l.transport == t.name) {
                Some(l) => {
                    v["state"] = json!(if l.up { "up" } else { "connecting" });
                    v["link"] = serde_json::to_value(l).unwrap_or_default();
                    v["active"] = json!(mux.active_link == Some(l.id));
                }
                None => v["state"] = json!("down"),
            }
            transports.push(v);
        }
        // The devices' raw transports keep their own state.
        for (_, d) in &self.devices {
            transports.extend(d.transports().iter().map(|t| json!(t)));
        }
        let devices: serde_json::Map<String, serde_json::Value> = self
            .services
            .iter()
            .filter_map(|s| Some((s.class().to_owned(), s.status()?)))
            .chain(
                self.devices
                    .iter()
                    .filter_map(|(class, d)| Some(((*class).to_owned(), d.status()?))),
            )
            .collect();
        json!({
            "name": self.name,
            "connected": self.mux.is_connected(),
            "peer": mux.peer,
            "transports": transports,
            "channels": mux.channels,
            "stats": mux.stats,
            "devices": devices,
            "owner": self.owner.map(|o| o.to_string()),
            "held_off": {
                "drops": hold_off.drops,
                "remaining_ms": hold_off.remaining(Instant::now()).map(|d| d.as_millis() as u64),
            },
            "refusals": lock(&self.refusals).clone(),
        })
    }
}

/// The daemon's state.
pub struct Daemon {
    guests: Mutex<BTreeMap<String, Arc<Guest>>>,
    limits: Limits,
    state_dir: PathBuf,
    events: broadcast::Sender<serde_json::Value>,
    /// Who may be which guest on shared listeners.
    policy: Policy,
    /// Refusals of names that no guest has.
    refused_unknown: Mutex<Refusals>,
    /// Events of the start (what devices report while they start, e.g. print jobs a killed
    /// vstreamd left incomplete), from before anyone could listen: every `events` client gets them first, marked `replayed`.
    start_events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Who may use the control socket.
    access: Access,
    /// Live upgrades: what this daemon took over, and what it hands over.
    handover: Arc<Handover>,
}

impl Daemon {
    /// Builds the daemon from its config and starts every configured transport.
    pub async fn start(cfg: &Config, state_dir: PathBuf) -> anyhow::Result<Arc<Daemon>> {
        let (events, _) = broadcast::channel(1024);
        let policy = Policy {
            guests: cfg
                .guest
                .iter()
                .map(|g| (g.name.clone(), Rules::of(g)))
                .collect(),
            announced: cfg.daemon.announced.clone(),
            insecure_tcp: cfg.daemon.insecure_tcp,
        };
        let daemon = Arc::new(Daemon {
            guests: Mutex::new(BTreeMap::new()),
            limits: cfg.daemon.limits.clone(),
            state_dir,
            events,
            policy,
            refused_unknown: Mutex::new(Refusals::default()),
            start_events: Default::default(),
            access: Access::new(cfg.daemon.control_read_group.as_ref())
                .map_err(|e| anyhow::anyhow!("[daemon] control_read_group: {e}"))?,
            handover: Handover::from_env(),
        });
        for g in &cfg.guest {
            daemon.add_configured_guest(g)?;
        }
        Ok(daemon)
    }

    fn guests(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Guest>>> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest by name.
    pub fn guest(&self, name: &str) -> Option<Arc<Guest>> {
        self.guests().get(name).cloned()
    }

    /// Emits event `kind` about `guest` with `fields` (a JSON object) to every
    /// `vstreamctl events` client: the way for device code in the daemon to report (the fields
    /// `event`, `guest`, `time` and `time_ms` are added; see docs/devices/events.md). Host
    /// halves of devices get the same through [`HostContext::events`].
    pub fn emit(&self, guest: &str, kind: &str, fields: serde_json::Value) {
        let _ = self
            .events
            .send(vstream_devices::event(guest, kind, fields));
    }

    /// An [`EventSink`] for `guest`'s events (it need not be a known guest).
    pub fn event_sink(&self, guest: &str) -> EventSink {
        EventSink::new(guest, self.events.clone())
    }

    /// A guest with its session and device halves running (as `cfg` says, for a configured
    /// guest); the caller puts it in `guests`.
    fn new_guest(
        self: &Arc<Self>,
        name: &str,
        cfg: Option<&GuestConfig>,
        identity: (Rules, Option<Key>, Option<Owner>),
    ) -> Result<Arc<Guest>, StartError> {
        let limits = self.limits.wire_config(Role::Host, name);
        let (mux, incoming) = self
            .handover
            .restore_session(name, limits.clone())
            .unwrap_or_else(|| Mux::new(limits, vstream_link::session_id()));
        let qmp = cfg.and_then(|g| g.qmp.clone());
        let events = self.event_sink(name);
        let (mut services, mut devices, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
        for dev in registry().iter() {
            let class = dev.class();
            let ctx = HostContext {
                guest: name.to_owned(),
                qmp: qmp.clone(),
                mux: mux.clone(),
                events: events.clone(),
                start_events: events.replayed(self.start_events.clone()),
                state_dir: cfg.map(|_| self.state_dir.join(name)),
                section: cfg.and_then(|g| g.devices.get(class).cloned()),
                transports: cfg
                    .map(|g| g.raw_transports(dev.as_ref()))
                    .unwrap_or_default(),
                carried_console: {
                    let (handover, guest) = (self.handover.clone(), name.to_owned());
                    Arc::new(move |which: &str| handover.take_console(&guest, which))
                },
            };
            let half = dev.host(&ctx).map_err(|e| StartError::Device {
                guest: name.to_owned(),
                error: e,
            })?;
            services.extend(half.services);
            tasks.extend(
                half.tasks
                    .into_iter()
                    .map(|t| tokio::spawn(t).abort_handle()),
            );
            devices.push((class, half.state));
        }
        tasks.push(
            tokio::spawn(vstream_devices::dispatch(services.clone(), incoming)).abort_handle(),
        );
        tasks.push(tokio::spawn(forward_mux_events(mux.clone(), events.clone())).abort_handle());
        let (rules, key, owner) = identity;
        Ok(Arc::new(Guest {
            name: name.to_owned(),
            mux,
            qmp,
            transports: Mutex::new(Vec::new()),
            services,
            devices,
            events,
            rules,
            key,
            owner,
            refusals: Mutex::new(Refusals::default()),
            last_seen: Mutex::new(Instant::now()),
            forget_pending: std::sync::atomic::AtomicBool::new(false),
            tasks,
            hold_off: Mutex::new(HoldOff::default()),
        }))
    }

    fn add_configured_guest(self: &Arc<Self>, g: &GuestConfig) -> Result<(), StartError> {
        let key = g.key().map_err(|e| StartError::Key {
            guest: g.name.clone(),
            error: e,
        })?;
        let guest = self.new_guest(&g.name, Some(g), (Rules::of(g), key, None))?;
        self.guests().insert(g.name.clone(), guest.clone());
        for (prio, t) in g
            .transport
            .iter()
            .filter(|t| t.kind == TransportKind::Mux)
            .enumerate()
        {
            let idx = guest.add_transport(TransportStatus::new(
                "mux",
                t.display_name(),
                t.address.to_string(),
            ));
            // Priorities follow the config order: the first transport is preferred.
            tokio::spawn(run_transport(
                guest.clone(),
                t.clone(),
                idx,
                prio as u32,
                self.policy.insecure_tcp,
            ));
        }
        Ok(())
    }

    /// Accepts the agents of many guests on `address`. Which guest a connection is comes from
    /// what its transport proves (crate::identity); a connection that cannot prove the guest it
    /// claims is refused with a REFUSE frame giving the reason, and the guest it claimed sees
    /// nothing of it.
    pub async fn listen(self: Arc<Self>, address: Address) -> io::Result<()> {
        let mut ep = Endpoint::bind(address.clone()).await?;
        tracing::info!(%address, "accepting agents");
        // Connections that have not yet said who they are cost a buffer each: only so many at
        // once; the rest wait in the kernel's backlog.
        let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        loop {
            let Ok(permit) = pending.clone().acquire_owned().await else {
                return Ok(());
            };
            let conn = match ep.next().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%address, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let daemon = self.clone();
            let listen = address.clone();
            tokio::spawn(async move {
                let peer = conn.peer.clone();
                let Some((guest, stream, prefix)) = daemon.admit(conn, &listen).await else {
                    return;
                };
                drop(permit);
                let name = format!("{listen} <- {peer}");
                let idx = guest.add_transport(TransportStatus::new(
                    "mux",
                    name.clone(),
                    listen.to_string(),
                ));
                guest.update(idx, |t| {
                    t.state = "up".into();
                    t.since = now_secs();
                    t.peer = peer.clone();
                    t.connects = 1;
                });
                let address = listen.to_string();
                guest.events.transport(true, "mux", &name, &address, &peer);
                let params = link_params(&listen, None, 100);
                let reason = guest
                    .mux
                    .run_link(stream, params, &name, &prefix)
                    .await
                    .to_string();
                tracing::info!(guest = %guest.name, transport = %name, "agent connection ended: {reason}");
                guest.link_ended(&reason);
                guest
                    .events
                    .transport(false, "mux", &name, &address, &reason);
                // Accepted connections are not reconnected by us: forget them.
                guest.transports().retain(|t| t.name != name);
                daemon.forget_later(&guest);
            });
        }
    }

    /// Runs the handshakes of a new connection on a shared listener and decides which guest it
    /// is; `None` if it was refused (it has been told why) or went away.
    async fn admit(
        self: &Arc<Self>,
        conn: vstream_transport::Connection,
        listen: &Address,
    ) -> Option<(Arc<Guest>, vstream_transport::BoxStream, Vec<u8>)> {
        let mut stream = conn.stream;
        let peer = conn.peer;
        let mut proven = None;
        let mut prefix = Vec::new();
        if matches!(conn.identity, PeerIdentity::Tcp(_)) {
            // One byte tells a key handshake from a mux frame.
            let mut first = [0u8; 1];
            match tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut first)).await {
                Ok(Ok(_)) => {}
                _ => return None,
            }
            prefix.push(first[0]);
            if first[0] == auth::MAGIC[0] {
                let mut claimed = None;
                let keys = |name: &str| {
                    claimed = Some(name.to_owned());
                    self.key_for(name)
                };
                let handshake = link_auth::acceptor(&mut stream, prefix, keys, HELLO_TIMEOUT).await;
                match handshake {
                    Ok((name, rest)) => {
                        proven = Some(name);
                        prefix = rest;
                    }
                    Err(e) => {
                        self.record_refusal(claimed.as_deref(), &peer, &e.to_string());
                        return None;
                    }
                }
            }
        }
        let (hello, prefix) =
            match vstream_link::read_hello(&mut stream, prefix, HELLO_TIMEOUT).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(%peer, "no HELLO on {listen}: {e}");
                    return None;
                }
            };
        let admitted = {
            let mut guests = self.guests();
            let announced = guests.values().filter(|g| g.owner.is_some()).count();
            let verdict = self.policy.admit(
                &conn.identity,
                &hello.name,
                proven.as_deref(),
                |n| guests.get(n).and_then(|g| g.owner),
                announced,
            );
            match verdict {
                Ok(Admission::Configured(name)) => guests
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| format!("guest {name:?} is configured but not running")),
                Ok(Admission::Announced { name, owner }) => match guests.get(&name) {
                    Some(g) => Ok(g.clone()),
                    None => self
                        .new_guest(&name, None, (Rules::default(), None, Some(owner)))
                        .map(|g| guests.entry(name).or_insert(g).clone())
                        .map_err(|e| e.to_string()),
                },
                Err(reason) => Err(reason),
            }
        };
        let admitted = admitted.and_then(|g| match g.held_off() {
            Some(d) => Err(format!(
                "guest {:?} is held off for {} s more: its links were dropped for protocol violations",
                g.name,
                d.as_secs() + 1
            )),
            None => Ok(g),
        });
        match admitted {
            Ok(guest) => Some((guest, stream, prefix)),
            Err(reason) => {
                self.record_refusal(Some(&hello.name), &peer, &reason);
                refuse(&mut stream, &reason).await;
                None
            }
        }
    }

    /// The key of a configured guest, or why a key handshake for `name` is refused.
    fn key_for(&self, name: &str) -> Result<Key, String> {
        self.guest(name)
            .and_then(|g| g.key.clone())
            .ok_or_else(|| format!("no guest {name:?} has a key here"))
    }

    /// Counts and (rate-limited) logs a refused connection: on the guest it claimed if there is
    /// one, else daemon-wide. The guest itself is not disturbed.
    fn record_refusal(&self, claimed: Option<&str>, peer: &str, reason: &str) {
        match claimed.and_then(|n| self.guest(n)) {
            Some(g) => lock(&g.refusals).record(&g.name, peer, reason),
            None => lock(&self.refused_unknown).record(claimed.unwrap_or("-"), peer, reason),
        }
    }

    /// Forgets an announced guest `forget_after_secs` after its last connection ended, unless
    /// another connection came meanwhile: its session, tasks and status go.
    fn forget_later(self: &Arc<Self>, guest: &Arc<Guest>) {
        if guest.owner.is_none() {
            return;
        }
        *lock(&guest.last_seen) = Instant::now();
        // One timer per guest however often it reconnects: it sleeps again while connections
        // keep ending later.
        if guest
            .forget_pending
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let after = Duration::from_secs(self.policy.announced.forget_after_secs);
        let (daemon, guest) = (Arc::downgrade(self), Arc::downgrade(guest));
        tokio::spawn(async move {
            loop {
                let Some(due) = guest.upgrade().map(|g| *lock(&g.last_seen) + after) else {
                    return;
                };
                tokio::time::sleep_until(due.into()).await;
                let (Some(daemon), Some(guest)) = (daemon.upgrade(), guest.upgrade()) else {
                    return;
                };
                let mut guests = daemon.guests();
                if !guest.transports().is_empty() {
                    // Connected again: the end of that connection arms the timer anew.
                    guest
                        .forget_pending
                        .store(false, std::sync::atomic::Ordering::Release);
                    return;
                }
                if lock(&guest.last_seen).elapsed() < after {
                    continue;
                }
                if guests
                    .get(&guest.name)
                    .is_some_and(|g| Arc::ptr_eq(g, &guest))
                {
                    guests.remove(&guest.name);
                    for t in &guest.tasks {
                        t.abort();
                    }
                    tracing::info!(guest = %guest.name, "forgot an announced guest");
                }
                return;
            }
        });
    }

    /// Serves the control socket forever (see [`Self::control_listener`]).
    pub async fn serve_control(self: Arc<Self>, path: &Path) -> io::Result<()> {
        let listener = self.control_listener(None, path)?;
        self.serve_control_on(listener).await
    }

    /// The control listener: the one a live upgrade's predecessor handed over, else the one
    /// systemd passed (`activated`; its unit sets the mode and group), else one bound at `path`.
    pub fn control_listener(
        &self,
        activated: Option<UnixListener>,
        path: &Path,
    ) -> io::Result<UnixListener> {
        let consoles = |guest: &str, name: &str| {
            let g = self.guest(guest)?;
            let consoles = g.devices.iter().flat_map(|(_, d)| d.consoles());
            consoles.into_iter().find(|c| c.name() == name)
        };
        if let Some(listener) = self.handover.take_control(consoles)? {
            return Ok(listener);
        }
        match activated {
            Some(listener) => Ok(listener),
            None => self.bind_control(path),
        }
    }

    /// Serves control connections on `listener` forever.
    pub async fn serve_control_on(self: Arc<Self>, listener: UnixListener) -> io::Result<()> {
        self.handover
            .serving_control(std::os::fd::AsFd::as_fd(&listener));
        loop {
            self.handover.wait_until_open().await;
            let stream = tokio::select! {
                r = listener.accept() => r?.0,
                // Clients wait in the backlog for whichever daemon serves next.
                () = self.handover.closing() => continue,
            };
            let daemon = self.clone();
            tokio::spawn(async move {
                if let Err(e) = daemon.handle_control(stream).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    }

    /// How many guests the daemon knows, and how many of them are connected (systemd's
    /// `STATUS=` line).
    pub fn guest_counts(&self) -> (usize, usize) {
        let guests = self.guests();
        let connected = guests.values().filter(|g| g.mux.is_connected()).count();
        (guests.len(), connected)
    }

    /// Binds the control socket at `path`: mode 0600, or 0660 owned by the read-only group.
    pub fn bind_control(&self, path: &Path) -> io::Result<UnixListener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Bind with a restrictive umask so the socket is never reachable by others, not even
        // between bind and chmod.
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let listener = UnixListener::bind(path);
        rustix::process::umask(old);
        let listener = listener?;
        // The group first, then the mode: the group never gets access to a socket it does not
        // own yet.
        if let Some(gid) = self.access.read_gid() {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))?;
        }
        let mode = self.access.socket_mode();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        tracing::info!(path = %path.display(), mode = format!("{mode:o}"), "control socket ready");
        Ok(listener)
    }

    /// Hands everything to a new vstreamd (see crate::upgrade); returns only if that failed,
    /// and then this daemon goes on serving. `reply` is the requester's connection, which the
    /// successor answers.
    pub async fn upgrade(
        &self,
        binary: Option<PathBuf>,
        reply: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<std::convert::Infallible, String> {
        // Announced guests are not carried: their names and owners live only here.
        let sessions = self
            .guests()
            .values()
            .filter(|g| g.owner.is_none())
            .map(|g| {
                let consoles = g.devices.iter().flat_map(|(_, d)| d.consoles());
                (g.name.clone(), g.mux.clone(), consoles.collect())
            })
            .collect();
        self.handover.upgrade(sessions, binary, reply).await
    }

    async fn handle_control(self: Arc<Self>, stream: UnixStream) -> io::Result<()> {
        let cred = stream.peer_cred()?;
        let (uid, gid) = (cred.uid(), cred.gid());
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let req: Request = match read_line(&mut r).await {
            Ok(req) => req,
            Err(e) => return write_line(&mut w, &Reply::error(format!("bad request: {e}"))).await,
        };
        let role = if self.access.is_owner(uid) {
            Ok(crate::access::Role::Owner)
        } else {
            // Group membership may ask the group database (files, or a directory service).
            let access = self.access.clone();
            tokio::task::spawn_blocking(move || access.role(uid, gid))
                .await
                .map_err(io::Error::other)?
        };
        if let Err(why) = role.and_then(|role| self.access.check(uid, role, &req)) {
            tracing::info!(
                uid,
                gid,
                request = req.verb(),
                "control request refused: {why}"
            );
            return write_line(&mut w, &Reply::error(why.to_string())).await;
        }
        match req {
            Request::Status { guest } => self.control_status(guest, w).await,
            Request::Device { op, guest, request } => {
                self.control_device(op, guest, request, r, w).await
            }
            Request::Open { guest, class, name } => {
                self.control_open(guest, class, name, r, w).await
            }
            Request::Events { guest } => self.control_events(guest, w).await,
            Request::Upgrade { binary } => {
                let reply = std::os::fd::AsFd::as_fd(w.as_ref());
                let Err(e) = self.upgrade(binary, Some(reply)).await;
                write_line(&mut w, &Reply::error(format!("upgrade: {e}"))).await
            }
        }
    }

    /// `status`: a count line, then one line per guest.
    async fn control_status(&self, guest: Option<String>, mut w: OwnedWriteHalf) -> io::Result<()> {
        let guests: Vec<Arc<Guest>> = match &guest {
            None => self.guests().values().cloned().collect(),
            Some(name) => match self.guest(name) {
                Some(g) => vec![g],
                None => {
                    let msg = format!("no guest named {name:?}");
                    return write_line(&mut w, &Reply::error(msg)).await;
                }
            },
        };
        let reply = Reply {
            ok: true,
            guests: Some(guests.len()),
            refused_unknown: Some(json!(lock(&self.refused_unknown).clone())),
            daemon: Some(json!(self.handover.info())),
            ..Reply::default()
        };
        write_line(&mut w, &reply).await?;
        // One line per guest, written in batches: no line grows with the fleet, and a
        // thousand guests take a few dozen writes.
        let mut batch = Vec::with_capacity(STATUS_BATCH);
        for g in guests {
            push_line(&mut batch, &g.status())?;
            if batch.len() >= STATUS_BATCH {
                w.write_all(&batch).await?;
                batch.clear();
            }
        }
        w.write_all(&batch).await?;
        w.shutdown().await
    }

    /// A device's op: the guest's host half of that device answers.
    async fn control_device(
        &self,
        op: String,
        guest: String,
        request: serde_json::Value,
        r: BufReader<OwnedReadHalf>,
        mut w: OwnedWriteHalf,
    ) -> io::Result<()> {
        let Some(g) = self.guest(&guest) else {
            return write_line(&mut w, &Reply::error(format!("no guest named {guest:?}"))).await;
        };
        let Some(state) = registry()
            .owner_of_op(&op)
            .and_then(|d| g.devices.iter().find(|(c, _)| *c == d.class()))
            .map(|(_, s)| s.clone())
        else {
            return write_line(&mut w, &Reply::error(format!("no device serves {op:?}"))).await;
        };
        let carry = Arc::new(crate::upgrade::Carry(self.handover.clone()));
        let conn = ControlConn::new(&guest, r, w, carry);
        state.control(&op, request, conn).await;
        Ok(())
    }

    /// `open`: the connection becomes a channel's byte stream.
    async fn control_open(
        &self,
        guest: String,
        class: String,
        name: String,
        r: BufReader<OwnedReadHalf>,
        mut w: OwnedWriteHalf,
    ) -> io::Result<()> {
        let Some(g) = self.guest(&guest) else {
            return write_line(&mut w, &Reply::error(format!("no guest named {guest:?}"))).await;
        };
        let opened = tokio::time::timeout(Duration::from_secs(30), g.mux.open(&class, &name)).await;
        let chan = match opened {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return write_line(
                    &mut w,
                    &Reply::error(format!("{guest}: {class}/{name}: {e}")),
                )
                .await
            }
            Err(_) => {
                return write_line(
                    &mut w,
                    &Reply::error(format!(
                        "{guest}: {class}/{name}: no answer within 30 s (is the agent connected?)"
                    )),
                )
                .await
            }
        };
        write_line(&mut w, &Reply::ok()).await?;
        // Users watch for channels opened on a guest; a device may name its own events.
        let (opened, closed) = registry()
            .get(&class)
            .map_or(("channel-opened", "channel-closed"), |d| d.channel_events());
        let channel = chan.id();
        let started = std::time::Instant::now();
        self.emit(
            &guest,
            opened,
            json!({"class": class, "name": name, "channel": channel}),
        );
        let result = self.handover.bridge(Pump::new(&guest, r, w, chan)).await;
        let mut fields = json!({
            "class": class, "name": name, "channel": channel,
            "duration_ms": started.elapsed().as_millis() as u64,
        });
        if let Err(e) = &result {
            fields["error"] = json!(e.to_string());
        }
        self.emit(&guest, closed, fields);
        result
    }

    /// `events`: the events of the start, then each event as it comes.
    async fn control_events(&self, guest: Option<String>, mut w: OwnedWriteHalf) -> io::Result<()> {
        let mut rx = self.events.subscribe();
        write_line(&mut w, &Reply::ok()).await?;
        let replayed = self
            .start_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for ev in replayed {
            if guest.as_deref().is_none_or(|g| ev["guest"] == g) {
                write_line(&mut w, &ev).await?;
            }
        }
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if guest.as_deref().is_none_or(|g| ev["guest"] == g) {
                        write_line(&mut w, &ev).await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    write_line(&mut w, &json!({"event": "lagged", "missed": n})).await?
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

/// One of a guest's mux transports, as a place for its state.
struct GuestSlot<'a>(&'a Guest, usize);

impl Slot for GuestSlot<'_> {
    fn update(&self, f: &mut dyn FnMut(&mut TransportStatus)) {
        self.0.update(self.1, f);
    }
}

/// Keeps one configured mux transport connected, forever, with backoff.
async fn run_transport(
    guest: Arc<Guest>,
    t: TransportConfig,
    idx: usize,
    priority: u32,
    insecure_tcp: bool,
) {
    let name = t.display_name();
    let slot = GuestSlot(&guest, idx);
    let kept = Kept {
        kind: "mux",
        name: &name,
        address: &t.address,
        slot: &slot,
        events: &guest.events,
    };
    let (guest, name, t, kept) = (&guest, &name, &t, &kept);
    keep(
        kept,
        || guest.held_off(),
        |conn| async move {
            let peer = conn.peer.clone();
            let reason = match prove_own(guest, conn, &t.address, insecure_tcp).await {
                Ok((stream, prefix)) => {
                    let reason = guest
                        .mux
                        .run_link(stream, t.link_params(priority), name, &prefix)
                        .await
                        .to_string();
                    guest.link_ended(&reason);
                    reason
                }
                Err(reason) => {
                    lock(&guest.refusals).record(&guest.name, &peer, &reason);
                    format!("refused: {reason}")
                }
            };
            tracing::info!(guest = %guest.name, transport = %name, "transport down: {reason}");
            kept.down(&reason);
        },
    )
    .await
}

/// Checks that a connection on one of `guest`'s own transports is the guest (its `uid`, `gid`,
/// `cid`; on TCP the key handshake, in whichever direction we connected) and returns the stream
/// and the bytes read past the handshake. A refused connection has been told why.
async fn prove_own(
    guest: &Guest,
    conn: vstream_transport::Connection,
    address: &Address,
    insecure_tcp: bool,
) -> Result<(vstream_transport::BoxStream, Vec<u8>), String> {
    let mut stream = conn.stream;
    if let Err(reason) = guest.rules.admit_own(&guest.name, &conn.identity) {
        refuse(&mut stream, &reason).await;
        return Err(reason);
    }
    let accepted = matches!(conn.identity, PeerIdentity::Tcp(_));
    let connected = matches!(address, Address::Tcp { .. });
    if !accepted && !connected {
        return Ok((stream, Vec::new()));
    }
    let handshake = match (&guest.key, accepted) {
        (Some(key), true) => {
            let key_for = |n: &str| match n == guest.name {
                true => Ok(key.clone()),
                false => Err(format!(
                    "this transport is guest {:?}'s, not {n:?}'s",
                    guest.name
                )),
            };
            link_auth::acceptor(&mut stream, Vec::new(), key_for, HELLO_TIMEOUT)
                .await
                .map(|(_, rest)| rest)
        }
        (Some(key), false) => {
            link_auth::connector(&mut stream, &guest.name, key, HELLO_TIMEOUT).await
        }
        (None, _) if insecure_tcp => Ok(Vec::new()),
        (None, _) => {
            let reason = "plain TCP without a key is refused: give the guest a key_file, or set [daemon] insecure_tcp = true".to_owned();
            if accepted {
                refuse(&mut stream, &reason).await;
            }
            return Err(reason);
        }
    };
    handshake
        .map(|rest| (stream, rest))
        .map_err(|e| e.to_string())
}

/// Forwards the session's events, tagged with the guest, and derives `agent-up` (the first
/// link of a session, or a new agent session: a link up that did not resume) and `agent-down`
/// (no link left).
async fn forward_mux_events(mux: Mux, events: EventSink) {
    let mut rx = mux.subscribe();
    let mut up_links = std::collections::BTreeSet::new();
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                events.emit("lagged", json!({ "missed": n, "source": "session" }));
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let mut fields = serde_json::to_value(&ev).unwrap_or_default();
        let kind = fields["event"].as_str().unwrap_or("session").to_owned();
        if let Some(o) = fields.as_object_mut() {
            o.remove("event");
        }
        events.emit(&kind, fields);
        match ev {
            MuxEvent::LinkUp {
                link,
                transport,
                peer,
                resumed,
            } => {
                let first = up_links.is_empty();
                up_links.insert(link);
                if first || !resumed {
                    let restarts = mux.status().stats.session.session_restarts;
                    events.emit(
                        "agent-up",
                        json!({
                            "peer": peer,
                            "transport": transport,
                            "new_session": !resumed,
                            "session_restarts": restarts,
                        }),
                    );
                }
            }
            MuxEvent::LinkDown {
                link,
                transport,
                reason,
            } if up_links.remove(&link) && up_links.is_empty() => {
                events.emit(
                    "agent-down",
                    json!({ "transport": transport, "reason": reason }),
                );
            }
            _ => {}
        }
    }
}
