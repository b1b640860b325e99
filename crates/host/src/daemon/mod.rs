//! vstreamd: guests, their transports, their sessions, and the control socket.
//!
//! [`Daemon`] holds the guests ([`guest`]); [`connect`] keeps their transports up and admits
//! connections on shared listeners; [`requests`] serves the control socket, one function per
//! request.

mod connect;
mod guest;
mod requests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::broadcast;
use vstream_devices::registry::{registry, TransportStatus};
use vstream_devices::{EventSink, HostContext};
use vstream_link::{Mux, MuxEvent};
use vstream_wire::Role;

use crate::access::Access;
use crate::config::{Config, GuestConfig, Limits, TransportKind};
use crate::error::{DeviceFailed, StartError, UpgradeError};
use crate::identity::{Owner, Policy, Rules};
use crate::upgrade::Handover;
use vstream_wire::auth::Key;

use connect::run_transport;
pub use guest::Guest;
use guest::{HoldOff, Refusals};

/// How long a new connection on a shared listener may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections on one shared listener that may be in their handshake at once (each may buffer
/// up to 1 MiB while looking for its HELLO).
const MAX_PENDING_HANDSHAKES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest added at run time: its transports' addresses (what `attach` compares) and tasks.
type Attached = (Vec<String>, Vec<tokio::task::AbortHandle>);

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
    /// Guests added at run time (`attach`), by name.
    attached: Mutex<BTreeMap<String, Attached>>,
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
            attached: Mutex::new(BTreeMap::new()),
        });
        for g in &cfg.guest {
            // Configured guests' transports run as long as the daemon.
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

    /// Every guest, by name (each one's status line: [`Guest::status`]).
    pub fn all_guests(&self) -> Vec<Arc<Guest>> {
        self.guests().values().cloned().collect()
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
    ) -> Result<Arc<Guest>, DeviceFailed> {
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
            let half = dev.host(&ctx).map_err(|e| DeviceFailed {
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

    /// Adds a guest as the config describes it; returns its transports' tasks.
    fn add_configured_guest(
        self: &Arc<Self>,
        g: &GuestConfig,
    ) -> Result<Vec<tokio::task::AbortHandle>, StartError> {
        let key = g.key().map_err(|e| StartError::Key {
            guest: g.name.clone(),
            error: e,
        })?;
        let guest = self.new_guest(&g.name, Some(g), (Rules::of(g), key, None))?;
        self.guests().insert(g.name.clone(), guest.clone());
        let mut tasks = Vec::new();
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
            let task = tokio::spawn(run_transport(
                guest.clone(),
                t.clone(),
                idx,
                prio as u32,
                self.policy.insecure_tcp,
            ));
            tasks.push(task.abort_handle());
        }
        Ok(tasks)
    }

    /// Adds guest `g` at run time (`attach`): it replaces a guest attached or announced under
    /// the same name (a domain that started again), never one of the config file. A guest
    /// attached with the same transports stays as it is (libvirtd restarted, the domain did
    /// not): its session goes on.
    pub fn attach(self: &Arc<Self>, g: &GuestConfig) -> Result<(), String> {
        g.check_name()?;
        g.validate().map_err(|e| e.to_string())?;
        let addresses: Vec<String> = g.transport.iter().map(|t| t.address.to_string()).collect();
        if lock(&self.attached)
            .get(&g.name)
            .is_some_and(|(a, _)| *a == addresses)
        {
            return Ok(());
        }
        let configured = self
            .guest(&g.name)
            .is_some_and(|old| old.owner.is_none() && !lock(&self.attached).contains_key(&g.name));
        if configured {
            return Err(format!("guest {:?} is in the config file", g.name));
        }
        self.detach(&g.name);
        let tasks = self.add_configured_guest(g).map_err(|e| e.to_string())?;
        lock(&self.attached).insert(g.name.clone(), (addresses, tasks));
        Ok(())
    }

    /// The web console's tokens (`vstreamd --http`), from the key in the state directory
    /// (made on first use).
    pub fn web_tokens(&self) -> std::io::Result<crate::web::Tokens> {
        crate::web::Tokens::load_or_create(&self.state_dir)
    }

    /// Removes a guest added by [`Self::attach`] (or announced): its transports, session and
    /// devices' host halves end. Whether there was one.
    pub fn detach(&self, name: &str) -> bool {
        let transports = lock(&self.attached).remove(name);
        let mut guests = self.guests();
        let Some(guest) = guests.get(name).cloned() else {
            return false;
        };
        if transports.is_none() && guest.owner.is_none() {
            // A guest of the config file stays.
            return false;
        }
        guests.remove(name);
        for t in transports.iter().flat_map(|(_, t)| t).chain(&guest.tasks) {
            t.abort();
        }
        true
    }

    /// How many guests the daemon knows, and how many of them are connected (systemd's
    /// `STATUS=` line).
    pub fn guest_counts(&self) -> (usize, usize) {
        let guests = self.guests();
        let connected = guests.values().filter(|g| g.mux.is_connected()).count();
        (guests.len(), connected)
    }

    /// Hands everything to a new vstreamd (see crate::upgrade); returns only if that failed,
    /// and then this daemon goes on serving. `reply` is the requester's connection, which the
    /// successor answers.
    pub async fn upgrade(
        &self,
        binary: Option<PathBuf>,
        reply: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<std::convert::Infallible, UpgradeError> {
        // Announced and attached guests are not carried: their names, owners and transports
        // live only here.
        let attached = lock(&self.attached).keys().cloned().collect::<Vec<_>>();
        let sessions = self
            .guests()
            .values()
            .filter(|g| g.owner.is_none() && !attached.contains(&g.name))
            .map(|g| {
                let consoles = g.devices.iter().flat_map(|(_, d)| d.consoles());
                (g.name.clone(), g.mux.clone(), consoles.collect())
            })
            .collect();
        self.handover.upgrade(sessions, binary, reply).await
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
