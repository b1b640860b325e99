//! vstreamd: guests, their transports, their sessions, and the control socket.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use vstream_devices::console::{Console, ConsoleSettings};
use vstream_devices::printer::host::{PrinterService, Spool, SpoolConfig};
use vstream_devices::random::host::Limiter;
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
use crate::identity::{Admission, LogLimit, Owner, Policy, Rules};
use crate::upgrade::{ConsoleView, Handover, Pump};

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

/// One configured or announced way to reach a guest.
#[derive(Debug, Clone, Serialize)]
struct TransportState {
    kind: &'static str,
    name: String,
    address: String,
    state: &'static str,
    since: u64,
    peer: String,
    connects: u64,
    errors: u64,
    last_error: Option<String>,
    /// Bytes written by vstreamd itself (random-raw ports; mux transports show their link's).
    bytes_out: u64,
}

impl TransportState {
    fn new(kind: &'static str, name: String, address: String) -> TransportState {
        TransportState {
            kind,
            name,
            address,
            state: "down",
            since: now_secs(),
            peer: String::new(),
            connects: 0,
            errors: 0,
            last_error: None,
            bytes_out: 0,
        }
    }
}

/// A guest: one multiplexer session, any number of transports, its consoles.
pub struct Guest {
    name: String,
    mux: Mux,
    qmp: Option<Address>,
    /// Raw QGA transport (a real qemu-ga), if configured.
    qga: std::sync::OnceLock<Address>,
    transports: Mutex<Vec<TransportState>>,
    consoles: Vec<Arc<Console>>,
    /// The printer spool, if the guest has one.
    printer: Option<Arc<Spool>>,
    /// The host halves of the devices (for their status).
    services: Vec<Arc<dyn Service>>,
    /// Where this guest's events go.
    events: EventSink,
    /// The guest's entropy budget (shared with its random-raw transports).
    random: Arc<Limiter>,
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

/// The device sections of a guest's config (defaults for guests that announce themselves).
#[derive(Debug, Clone, Default)]
struct DeviceSettings {
    random: vstream_devices::random::Settings,
    watchdog: Option<vstream_devices::watchdog::Settings>,
    ppp: Option<vstream_devices::ppp::host::PppConfig>,
}

impl Guest {
    fn transports(&self) -> MutexGuard<'_, Vec<TransportState>> {
        self.transports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut TransportState)) {
        if let Some(t) = self.transports().get_mut(idx) {
            f(t);
        }
    }

    fn add_transport(&self, t: TransportState) -> usize {
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

    /// Emits `transport-up` / `transport-down` for one of this guest's transports.
    fn transport_event(&self, up: bool, kind: &str, name: &str, address: &str, detail: &str) {
        let (event, key) = if up {
            ("transport-up", "peer")
        } else {
            ("transport-down", "reason")
        };
        self.events.emit(
            event,
            json!({ "kind": kind, "transport": name, "address": address, key: detail }),
        );
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
                // Other kinds (random-raw) keep their own state.
                _ if t.kind != "mux" => {}
                Some(l) => {
                    v["state"] = json!(if l.up { "up" } else { "connecting" });
                    v["link"] = serde_json::to_value(l).unwrap_or_default();
                    v["active"] = json!(mux.active_link == Some(l.id));
                }
                None => v["state"] = json!("down"),
            }
            transports.push(v);
        }
        for c in &self.consoles {
            let s = c.status();
            transports.push(json!({
                "kind": "console", "name": s.name, "address": s.address, "state": s.state,
                "since": s.since, "peer": s.peer, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                "errors": s.errors, "last_error": s.last_error, "log": s.log, "viewers": s.viewers,
            }));
        }
        let devices: serde_json::Map<String, serde_json::Value> = self
            .services
            .iter()
            .filter_map(|s| Some((s.class().to_owned(), s.status()?)))
            .collect();
        json!({
            "name": self.name,
            "connected": self.mux.is_connected(),
            "peer": mux.peer,
            "transports": transports,
            "channels": mux.channels,
            "stats": mux.stats,
            "printer": self.printer.as_ref().map(|p| p.status()),
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
    /// Printer spools of configured guests, by guest name.
    printers: Mutex<BTreeMap<String, Arc<Spool>>>,
    /// Who may be which guest on shared listeners.
    policy: Policy,
    /// Refusals of names that no guest has.
    refused_unknown: Mutex<Refusals>,
    /// Events of the start (print jobs a killed vstreamd left incomplete), from before anyone
    /// could listen: every `events` client gets them first, marked `replayed`.
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
            printers: Mutex::new(BTreeMap::new()),
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

    /// A guest with its session and device halves running; the caller puts it in `guests`.
    fn new_guest(
        self: &Arc<Self>,
        name: &str,
        qmp: Option<Address>,
        consoles: Vec<Arc<Console>>,
        devices: DeviceSettings,
        identity: (Rules, Option<Key>, Option<Owner>),
    ) -> Arc<Guest> {
        let cfg = self.limits.wire_config(Role::Host, name);
        let (mux, incoming) = self
            .handover
            .restore_session(name, cfg.clone())
            .unwrap_or_else(|| Mux::new(cfg, vstream_link::session_id()));
        let printer = self
            .printers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let ctx = HostContext {
            guest: name.to_owned(),
            qmp: qmp.clone(),
            events: self.event_sink(name),
            random: Arc::new(Limiter::new(devices.random)),
            watchdog: devices.watchdog,
            ppp: devices.ppp,
        };
        let mut services = vstream_devices::host_services(&ctx);
        services.push(Arc::new(PrinterService::new(name, printer.clone())));
        let dispatch = tokio::spawn(vstream_devices::dispatch(services.clone(), incoming));
        let forward = tokio::spawn(forward_mux_events(mux.clone(), ctx.events.clone()));
        let (rules, key, owner) = identity;
        let guest = Arc::new(Guest {
            name: name.to_owned(),
            mux: mux.clone(),
            qmp,
            qga: std::sync::OnceLock::new(),
            transports: Mutex::new(Vec::new()),
            consoles,
            printer,
            services,
            events: ctx.events.clone(),
            random: ctx.random.clone(),
            rules,
            key,
            owner,
            refusals: Mutex::new(Refusals::default()),
            last_seen: Mutex::new(Instant::now()),
            forget_pending: std::sync::atomic::AtomicBool::new(false),
            tasks: vec![dispatch.abort_handle(), forward.abort_handle()],
            hold_off: Mutex::new(HoldOff::default()),
        });
        for console in &guest.consoles {
            tokio::spawn(watch_console(Arc::downgrade(&guest), Arc::clone(console)));
        }
        guest
    }

    fn add_configured_guest(self: &Arc<Self>, g: &GuestConfig) -> anyhow::Result<()> {
        let mut consoles = Vec::new();
        for t in g
            .transport
            .iter()
            .filter(|t| t.kind == TransportKind::Console)
        {
            let name = t.display_name();
            let log = t
                .log
                .clone()
                .unwrap_or_else(|| self.state_dir.join(&g.name).join(format!("{name}.log")));
            let carried = self.handover.take_console(&g.name, &name);
            let settings = ConsoleSettings {
                name,
                address: t.address.clone(),
                log,
                log_max_bytes: t.log_max_bytes,
                log_keep: t.log_keep,
            };
            let console = Console::start(settings, carried).map_err(|e| {
                anyhow::anyhow!("guest {}: console {}: {e}", g.name, t.display_name())
            })?;
            consoles.push(console);
        }
        if g.printer.enabled {
            let p = &g.printer;
            let events = self.events.clone();
            let gname = g.name.clone();
            let opening = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let (at_start, still_opening) = (self.start_events.clone(), opening.clone());
            let spool = Spool::open(
                &g.name,
                SpoolConfig {
                    dir: p
                        .spool
                        .clone()
                        .unwrap_or_else(|| self.state_dir.join(&g.name).join("spool")),
                    quota_bytes: p.quota_bytes,
                    hook: p.hook.clone(),
                    hook_timeout: Duration::from_secs(p.hook_timeout_secs),
                },
                Arc::new(move |mut v| {
                    v["guest"] = json!(gname);
                    v["time"] = json!(now_secs());
                    if still_opening.load(std::sync::atomic::Ordering::Relaxed) {
                        v["replayed"] = json!(true);
                        at_start.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                    } else {
                        let _ = events.send(v);
                    }
                }),
            )
            .map_err(|e| anyhow::anyhow!("guest {}: printer: {e}", g.name))?;
            opening.store(false, std::sync::atomic::Ordering::Relaxed);
            self.printers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(g.name.clone(), spool);
        }
        let devices = DeviceSettings {
            random: g.random,
            watchdog: g.watchdog.clone(),
            ppp: g.ppp.clone(),
        };
        let key = g
            .key()
            .map_err(|e| anyhow::anyhow!("guest {}: {e}", g.name))?;
        let guest = self.new_guest(
            &g.name,
            g.qmp.clone(),
            consoles,
            devices,
            (Rules::of(g), key, None),
        );
        self.guests().insert(g.name.clone(), guest.clone());
        if let Some(t) = g.transport.iter().find(|t| t.kind == TransportKind::Qga) {
            let _ = guest.qga.set(t.address.clone());
        }
        for (prio, t) in g
            .transport
            .iter()
            .filter(|t| t.kind == TransportKind::Mux)
            .enumerate()
        {
            let idx = guest.add_transport(TransportState::new(
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
        for t in g
            .transport
            .iter()
            .filter(|t| t.kind == TransportKind::RandomRaw)
        {
            let idx = guest.add_transport(TransportState::new(
                "random-raw",
                t.display_name(),
                t.address.to_string(),
            ));
            tokio::spawn(run_random_raw(guest.clone(), t.clone(), idx));
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
                let idx = guest.add_transport(TransportState::new(
                    "mux",
                    name.clone(),
                    listen.to_string(),
                ));
                guest.update(idx, |t| {
                    t.state = "up";
                    t.since = now_secs();
                    t.peer = peer.clone();
                    t.connects = 1;
                });
                let address = listen.to_string();
                guest.transport_event(true, "mux", &name, &address, &peer);
                let params = link_params(&listen, None, 100);
                let reason = guest.mux.run_link(stream, params, &name, &prefix).await;
                tracing::info!(guest = %guest.name, transport = %name, "agent connection ended: {reason}");
                guest.link_ended(&reason);
                guest.transport_event(false, "mux", &name, &address, &reason);
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
                Ok(Admission::Announced { name, owner }) => Ok(guests
                    .entry(name.clone())
                    .or_insert_with(|| {
                        self.new_guest(
                            &name,
                            None,
                            Vec::new(),
                            DeviceSettings::default(),
                            (Rules::default(), None, Some(owner)),
                        )
                    })
                    .clone()),
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

    /// Serves the control socket forever: mode 0600, or 0660 owned by the read-only group. A
    /// successor of a live upgrade serves the socket it inherited.
    pub async fn serve_control(self: Arc<Self>, path: &Path) -> io::Result<()> {
        let consoles = |guest: &str, name: &str| {
            let g = self.guest(guest)?;
            let found = g.consoles.iter().find(|c| c.name() == name);
            found.cloned()
        };
        let listener = match self.handover.take_control(consoles)? {
            Some(l) => l,
            None => self.bind_control(path)?,
        };
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

    fn bind_control(&self, path: &Path) -> io::Result<UnixListener> {
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
            .map(|g| (g.name.clone(), g.mux.clone(), g.consoles.clone()))
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
            return write_line(&mut w, &Reply::error(why)).await;
        }
        match req {
            Request::Status { guest } => {
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
            Request::Console {
                guest,
                name,
                tail,
                follow,
                attach,
            } => {
                let Some(g) = self.guest(&guest) else {
                    return write_line(&mut w, &Reply::error(format!("no guest named {guest:?}")))
                        .await;
                };
                let console = match &name {
                    Some(n) => g.consoles.iter().find(|c| c.name() == n),
                    None => g.consoles.first(),
                };
                let Some(console) = console.cloned() else {
                    let have: Vec<_> = g.consoles.iter().map(|c| c.name().to_owned()).collect();
                    return write_line(
                        &mut w,
                        &Reply::error(format!(
                            "guest {guest:?} has no console {name:?} (has {have:?})"
                        )),
                    )
                    .await;
                };
                // Subscribe before reading the tail so nothing falls between the two.
                let viewer = console.attach(attach);
                let reply = Reply {
                    ok: true,
                    writer: Some(viewer.is_writer()),
                    ..Reply::default()
                };
                write_line(&mut w, &reply).await?;
                if let Some(n) = tail {
                    w.write_all(&console.tail(n)).await?;
                }
                if !follow && !attach {
                    return w.shutdown().await;
                }
                let watch = ConsoleView {
                    guest,
                    console,
                    viewer,
                    r,
                    w,
                    attach,
                    pending: Vec::new(),
                };
                self.handover.view(watch).await
            }
            Request::Open { guest, class, name } => {
                let Some(g) = self.guest(&guest) else {
                    return write_line(&mut w, &Reply::error(format!("no guest named {guest:?}")))
                        .await;
                };
                let opened =
                    tokio::time::timeout(Duration::from_secs(30), g.mux.open(&class, &name)).await;
                let chan = match opened {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        return write_line(&mut w, &Reply::error(format!("{guest}: {class}/{name}: {e}"))).await
                    }
                    Err(_) => {
                        return write_line(
                            &mut w,
                            &Reply::error(format!("{guest}: {class}/{name}: no answer within 30 s (is the agent connected?)")),
                        )
                        .await
                    }
                };
                write_line(&mut w, &Reply::ok()).await?;
                // A terminal session is an event users watch for; other channels too, by class.
                let (opened, closed) = if class == "tty" {
                    ("shell-opened", "shell-closed")
                } else {
                    ("channel-opened", "channel-closed")
                };
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
            Request::Agent { guest } => {
                let Some(g) = self.guest(&guest) else {
                    return write_line(&mut w, &Reply::error(format!("no guest named {guest:?}")))
                        .await;
                };
                match qga_stream(&g).await {
                    Ok(QgaStream::Raw(stream)) => {
                        write_line(&mut w, &Reply::ok()).await?;
                        pipe(r, w, stream).await
                    }
                    // A channel of vstream-agent: carried across live upgrades.
                    Ok(QgaStream::Channel(chan)) => {
                        write_line(&mut w, &Reply::ok()).await?;
                        self.handover.bridge(Pump::new(&guest, r, w, chan)).await
                    }
                    Err(e) => write_line(&mut w, &Reply::error(format!("{guest}: {e}"))).await,
                }
            }
            Request::Upgrade { binary } => {
                let reply = std::os::fd::AsFd::as_fd(w.as_ref());
                let Err(e) = self.upgrade(binary, Some(reply)).await;
                write_line(&mut w, &Reply::error(format!("upgrade: {e}"))).await
            }
            Request::Jobs { guest } => {
                let Some(g) = self.guest(&guest) else {
                    return write_line(&mut w, &Reply::error(format!("no guest named {guest:?}")))
                        .await;
                };
                let Some(spool) = g.printer.clone() else {
                    return write_line(
                        &mut w,
                        &Reply::error(format!("guest {guest:?} has no printer spool")),
                    )
                    .await;
                };
                let reply = match tokio::task::spawn_blocking(move || spool.jobs()).await {
                    Ok(Ok(jobs)) => Reply {
                        ok: true,
                        jobs: Some(serde_json::to_value(jobs).unwrap_or_default()),
                        ..Reply::default()
                    },
                    Ok(Err(e)) => Reply::error(format!("{guest}: printer spool: {e}")),
                    Err(e) => Reply::error(format!("{guest}: printer spool: {e}")),
                };
                write_line(&mut w, &reply).await
            }
            Request::Events { guest } => {
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
    }
}

/// A QGA byte stream to a guest.
enum QgaStream {
    /// Its raw `qga` transport (a real qemu-ga).
    Raw(vstream_transport::BoxStream),
    /// A `qga` channel of vstream-agent.
    Channel(vstream_link::ChannelStream),
}

/// A QGA byte stream to a guest: its raw `qga` transport if configured (a real qemu-ga), else
/// a `qga` channel of vstream-agent.
async fn qga_stream(g: &Guest) -> Result<QgaStream, String> {
    let wait = Duration::from_secs(30);
    match g.qga.get() {
        Some(address) => {
            let connect = async { Endpoint::bind(address.clone()).await?.next().await };
            match tokio::time::timeout(wait, connect).await {
                Ok(Ok(c)) => Ok(QgaStream::Raw(c.stream)),
                Ok(Err(e)) => Err(format!("qga transport: {e}")),
                Err(_) => Err(format!(
                    "qga transport {address}: no connection within 30 s"
                )),
            }
        }
        None => {
            let class = vstream_devices::qga::CLASS;
            match tokio::time::timeout(wait, g.mux.open(class, "")).await {
                Ok(Ok(c)) => Ok(QgaStream::Channel(c)),
                Ok(Err(e)) => Err(format!("{class}: {e}")),
                Err(_) => Err(format!(
                    "{class}: no answer within 30 s (is the agent connected?)"
                )),
            }
        }
    }
}

/// Joins a control connection to a stream, both directions until both ends are done; EOF is
/// passed on as a half close.
async fn pipe<S: AsyncRead + AsyncWrite>(
    mut r: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    stream: S,
) -> io::Result<()> {
    let (mut sr, mut sw) = tokio::io::split(stream);
    let up = async {
        tokio::io::copy(&mut r, &mut sw).await?;
        sw.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut sr, &mut w).await?;
        w.shutdown().await
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
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
    let address = t.address.to_string();
    let (guest, name, address, t) = (&guest, &name, &address, &t);
    keep_transport(guest, t, idx, "mux", |conn| async move {
        let peer = conn.peer.clone();
        let reason = match prove_own(guest, conn, &t.address, insecure_tcp).await {
            Ok((stream, prefix)) => {
                let reason = guest
                    .mux
                    .run_link(stream, t.link_params(priority), name, &prefix)
                    .await;
                guest.link_ended(&reason);
                reason
            }
            Err(reason) => {
                lock(&guest.refusals).record(&guest.name, &peer, &reason);
                format!("refused: {reason}")
            }
        };
        tracing::info!(guest = %guest.name, transport = %name, "transport down: {reason}");
        guest.transport_event(false, "mux", name, address, &reason);
        guest.update(idx, |s| {
            s.state = "down";
            s.since = now_secs();
            s.last_error = Some(reason);
        });
    })
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

/// Keeps one configured transport's endpoint bound and accepting, forever. A failed bind is
/// retried every second; a failed accept after a backoff (100 ms, doubling to 2 s, back to
/// 100 ms on a connection); both count as errors in the transport's status. Each connection is
/// marked up (status, and a `transport-up` event of `kind`) and handed to `serve`, which runs
/// it and reports it down; the next accept follows after the backoff.
async fn keep_transport<F, Fut>(
    guest: &Guest,
    t: &TransportConfig,
    idx: usize,
    kind: &str,
    mut serve: F,
) where
    F: FnMut(vstream_transport::Connection) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let name = t.display_name();
    let address = t.address.to_string();
    let mut backoff = Duration::from_millis(100);
    let mut endpoint = loop {
        match Endpoint::bind(t.address.clone()).await {
            Ok(ep) => break ep,
            Err(e) => {
                guest.update(idx, |s| {
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        // A guest held off for protocol violations is neither accepted nor connected to.
        if let Some(wait) = guest.held_off() {
            tokio::time::sleep(wait).await;
        }
        let conn = match endpoint.next().await {
            Ok(c) => c,
            Err(e) => {
                guest.update(idx, |s| {
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        guest.update(idx, |s| {
            s.state = "up";
            s.since = now_secs();
            s.peer = conn.peer.clone();
            s.connects += 1;
        });
        guest.transport_event(true, kind, &name, &address, &conn.peer);
        serve(conn).await;
        tokio::time::sleep(backoff).await;
    }
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
                    let restarts = mux.status().stats.session_restarts;
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

/// Emits `transport-up` / `transport-down` when a console's connection changes (consoles keep
/// their own state; this sleeps until it changes). Ends with the guest.
async fn watch_console(guest: std::sync::Weak<Guest>, console: Arc<Console>) {
    let mut was_up = false;
    let mut changes = console.watch_up();
    while changes.changed().await.is_ok() {
        let up = *changes.borrow_and_update();
        let Some(g) = guest.upgrade() else {
            return;
        };
        let s = console.status();
        if up != was_up {
            let detail = if up {
                s.peer.clone()
            } else {
                s.last_error.clone().unwrap_or_else(|| s.state.to_owned())
            };
            g.transport_event(up, "console", &s.name, &s.address, &detail);
            was_up = up;
        }
    }
}

/// Keeps one random-raw transport connected and writes entropy into it within the guest's
/// budget (docs/devices/random.md).
async fn run_random_raw(guest: Arc<Guest>, t: TransportConfig, idx: usize) {
    let name = t.display_name();
    let address = t.address.to_string();
    let (guest, name, address) = (&guest, &name, &address);
    keep_transport(guest, &t, idx, "random-raw", |conn| async move {
        let mut stream = CountingWriter {
            inner: conn.stream,
            guest,
            idx,
        };
        let error = vstream_devices::random::host::serve_raw(&mut stream, &guest.random).await;
        let reason = error.to_string();
        tracing::info!(guest = %guest.name, transport = %name, "random-raw transport down: {reason}");
        guest.update(idx, |s| {
            s.state = "down";
            s.since = now_secs();
            s.last_error = Some(reason.clone());
        });
        guest.transport_event(false, "random-raw", name, address, &reason);
    })
    .await
}

/// Counts the bytes written to a random-raw transport into its status.
struct CountingWriter<'a> {
    inner: vstream_transport::BoxStream,
    guest: &'a Guest,
    idx: usize,
}

impl tokio::io::AsyncWrite for CountingWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let n = *n as u64;
            self.guest.update(self.idx, |s| s.bytes_out += n);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
