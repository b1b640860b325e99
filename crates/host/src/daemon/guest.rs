//! A guest: its session, transports, devices' host halves, and what it has been refused.

use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use vstream_devices::registry::{registry, HostState, TransportStatus};
use vstream_devices::{EventSink, Service};
use vstream_link::{Mux, MuxStatus};
use vstream_transport::Address;
use vstream_wire::auth::Key;

use super::lock;
use crate::error::Refused;
use crate::identity::{LogLimit, Owner, Rules};
use crate::status::{self, GuestStatus, TransportLine};
use vstream_devices::status::Devices;

/// A guest: one multiplexer session, any number of transports, its devices' host halves.
pub struct Guest {
    pub(super) name: String,
    pub(super) mux: Mux,
    pub(super) qmp: Option<Address>,
    /// Its mux transports.
    pub(super) transports: Mutex<Vec<TransportStatus>>,
    /// The devices' channel services (for their status).
    pub(super) services: Vec<Arc<dyn Service>>,
    /// The devices' running host halves, by class (status, raw transports, control ops).
    pub(super) devices: Vec<(&'static str, Arc<dyn HostState>)>,
    /// Where this guest's events go.
    pub(super) events: EventSink,
    /// What proves a connection is this guest (configured guests).
    pub(super) rules: Rules,
    /// The guest's key for TCP links.
    pub(super) key: Option<Key>,
    /// Who owns the name of an announced guest; `None` for configured guests.
    pub(super) owner: Option<Owner>,
    /// Connections refused because they claimed this guest without proving it.
    pub(super) refusals: Mutex<Refusals>,
    /// When the last connection of an announced guest ended (it is forgotten some time later).
    pub(super) last_seen: Mutex<Instant>,
    /// Whether a timer to forget it runs.
    pub(super) forget_pending: std::sync::atomic::AtomicBool,
    /// The guest's own tasks (session dispatch, event forwarding), ended when it is forgotten.
    pub(super) tasks: Vec<tokio::task::AbortHandle>,
    /// Held off after its links were dropped for protocol violations.
    pub(super) hold_off: Mutex<HoldOff>,
}

/// Back-off for a guest whose links keep being dropped for protocol violations
/// (`vstream_link::MAX_VIOLATIONS`): no connection of it is taken until `until`.
#[derive(Debug, Default)]
pub(super) struct HoldOff {
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
    pub(super) fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until
            .map(|u| u.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }
}

/// A guest whose links were dropped for violations this long ago starts afresh.
const HOLD_OFF_MEMORY: Duration = Duration::from_secs(600);
/// The longest hold-off.
const HOLD_OFF_MAX: Duration = Duration::from_secs(300);

/// Refused claims to one guest (or, daemon-wide, to names no guest has), and the rate of
/// their log lines.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    pub(super) seen: status::Refusals,
    log: Option<LogLimit>,
}

impl Refusals {
    /// Counts one refusal and logs it unless that kind of line is over its rate.
    pub(super) fn record(&mut self, guest: &str, peer: &str, reason: &Refused) {
        self.seen.count += 1;
        self.seen.last = Some(format!("{peer}: {reason}"));
        // A line a second per guest, bursts of 5: a stuck agent is seen, a flood is not logged.
        let limit = self
            .log
            .get_or_insert_with(|| LogLimit::new(Duration::from_secs(1), 5));
        if let Some(suppressed) = limit.allow(Instant::now()) {
            tracing::warn!(
                guest,
                peer,
                suppressed,
                total = self.seen.count,
                "refused a connection: {reason}"
            );
        }
    }
}

impl Guest {
    pub(super) fn transports(&self) -> MutexGuard<'_, Vec<TransportStatus>> {
        self.transports.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn update(&self, idx: usize, f: impl FnOnce(&mut TransportStatus)) {
        if let Some(t) = self.transports().get_mut(idx) {
            f(t);
        }
    }

    pub(super) fn add_transport(&self, t: TransportStatus) -> usize {
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
    pub(super) fn link_ended(&self, reason: &str) {
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
    pub(super) fn held_off(&self) -> Option<Duration> {
        lock(&self.hold_off).remaining(Instant::now())
    }

    /// The guest's consoles, each with the control op that serves its viewers (an op of the
    /// device that holds it), as (op, console name): what the web console lists.
    pub fn consoles(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (class, d) in &self.devices {
            let ops = registry().get(class).map(|dev| dev.control_ops());
            if let Some(op) = ops.and_then(|ops| ops.first()) {
                out.extend(d.consoles().iter().map(|c| (*op, c.name().to_owned())));
            }
        }
        out
    }

    /// The guest's line in the `status` reply.
    pub fn status(&self) -> GuestStatus {
        let mux: MuxStatus = self.mux.status();
        let hold_off = lock(&self.hold_off);
        let mut transports = Vec::new();
        for t in self.transports().iter() {
            let mut line = TransportLine {
                transport: t.clone(),
                link: None,
                active: None,
            };
            // Merge the live link's counters into the transport that carries it.
            // "up" means the handshake is done on a live link, not just a connected socket.
            match mux.links.iter().find(|l| l.transport == t.name) {
                Some(l) => {
                    line.transport.state = if l.up { "up" } else { "connecting" }.into();
                    line.active = Some(mux.active_link == Some(l.id));
                    line.link = Some(l.clone());
                }
                None => line.transport.state = "down".into(),
            }
            transports.push(line);
        }
        // The devices' raw transports keep their own state.
        for (_, d) in &self.devices {
            transports.extend(d.transports().into_iter().map(|transport| TransportLine {
                transport,
                link: None,
                active: None,
            }));
        }
        let devices = self
            .services
            .iter()
            .filter_map(|s| Some((s.class().to_owned(), s.status()?)))
            .chain(
                self.devices
                    .iter()
                    .filter_map(|(class, d)| Some(((*class).to_owned(), d.status()?))),
            )
            .collect();
        GuestStatus {
            name: self.name.clone(),
            connected: self.mux.is_connected(),
            peer: mux.peer,
            transports,
            channels: mux.channels,
            stats: mux.stats,
            devices: Devices(devices),
            owner: self.owner.map(|o| o.to_string()),
            held_off: status::HeldOff {
                drops: hold_off.drops,
                remaining_ms: hold_off
                    .remaining(Instant::now())
                    .map(|d| d.as_millis() as u64),
            },
            refusals: lock(&self.refusals).seen.clone(),
        }
    }
}
