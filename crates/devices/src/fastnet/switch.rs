//! The built-in L2 switch that joins several guests' fastnet links (`switch = "NAME"` in each
//! guest's `[guest.fastnet]`).
//!
//! [`Switch`] is the sans-io core: a frame and the current time go in ([`Switch::input`]), the
//! frame lands in the queues of the ports it is for, each port takes its frames out
//! ([`Switch::pop`]). It learns MAC addresses (with ageing), floods broadcast, multicast and
//! unknown unicast, drops a frame whose source MAC is not the port's own (unless the port allows
//! spoofing), and bounds everything a guest can make it hold: each port's queue (frames and
//! bytes: a port that does not drain loses frames, no sender waits) and the MAC table (per port
//! and in all). [`SwitchPort`] (host only) is one link's attachment: the async side the packet
//! loops use in place of a TAP.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// Parses `xx:xx:xx:xx:xx:xx` (hex, either case).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

/// What the switch may hold; every bound is per switch, whatever its guests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frames waiting for one port; more are dropped for that port.
    pub queue_frames: usize,
    /// Bytes waiting for one port; more are dropped for that port.
    pub queue_bytes: usize,
    /// MACs learned behind one port (a port that may spoof learns no more than this).
    pub macs_per_port: usize,
    /// MACs in the table, in all.
    pub macs: usize,
    /// A learned MAC not seen as a source for this long is forgotten (its frames flood).
    pub ageing: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue_frames: 256,
            queue_bytes: 4 << 20,
            macs_per_port: 64,
            macs: 4096,
            ageing: Duration::from_secs(300),
        }
    }
}

/// `switch_limits` in `[guest.fastnet]`: the switch's [`Limits`], each one left out keeping
/// its default. Every guest that names the switch gives the same values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// [`Limits::queue_frames`].
    pub queue_frames: Option<usize>,
    /// [`Limits::queue_bytes`].
    pub queue_bytes: Option<usize>,
    /// [`Limits::macs_per_port`].
    pub macs_per_port: Option<usize>,
    /// [`Limits::macs`].
    pub macs: Option<usize>,
    /// [`Limits::ageing`], in seconds.
    pub ageing_secs: Option<u64>,
}

impl LimitsConfig {
    /// The limits, or which value is out of range and what it may be.
    pub fn limits(&self) -> Result<Limits, String> {
        let d = Limits::default();
        let pick = |name: &str,
                    v: Option<usize>,
                    default: usize,
                    range: std::ops::RangeInclusive<usize>| {
            let v = v.unwrap_or(default);
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(format!(
                    "switch_limits.{name} = {v}: {} to {}",
                    range.start(),
                    range.end()
                ))
            }
        };
        let macs = pick("macs", self.macs, d.macs, 1..=1 << 20)?;
        let limits = Limits {
            queue_frames: pick(
                "queue_frames",
                self.queue_frames,
                d.queue_frames,
                1..=1 << 16,
            )?,
            // A queue must hold the largest frame a link carries.
            queue_bytes: pick(
                "queue_bytes",
                self.queue_bytes,
                d.queue_bytes,
                super::MAX_PACKET as usize..=1 << 30,
            )?,
            macs_per_port: pick(
                "macs_per_port",
                self.macs_per_port,
                d.macs_per_port,
                1..=macs,
            )?,
            macs,
            ageing: Duration::from_secs(pick(
                "ageing_secs",
                self.ageing_secs
                    .map(|s| usize::try_from(s).unwrap_or(usize::MAX)),
                d.ageing.as_secs() as usize,
                1..=86_400,
            )? as u64),
        };
        Ok(limits)
    }
}

/// A port's identity on its switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId(u64);

/// How a port may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortConfig {
    /// The port's own MAC (the guest's `guest_mac`): always known to be behind this port.
    /// `None` (the host's TAP): the port has no MAC of its own and learns what it sends from.
    pub mac: Option<Mac>,
    /// Frames with another source MAC are forwarded (and the MAC learned) instead of dropped.
    pub allow_mac_spoofing: bool,
}

/// A port's counters, shared with whoever reports them (they outlive the port).
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames the port sent into the switch.
    pub frames_in: AtomicU64,
    /// Frames queued for the port.
    pub frames_out: AtomicU64,
    /// Frames the port sent with a source MAC not its own (and spoofing not allowed).
    pub dropped_spoofed: AtomicU64,
    /// Frames the port sent that are too short for an Ethernet header, or with a multicast
    /// source MAC.
    pub dropped_invalid: AtomicU64,
    /// Frames for the port dropped because its queue was full.
    pub dropped_queue_full: AtomicU64,
}

impl PortCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, for `vstreamctl status`.
    pub fn snapshot(&self, switch: &str) -> SwitchStatus {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SwitchStatus {
            switch: switch.to_owned(),
            frames_in: get(&self.frames_in),
            frames_out: get(&self.frames_out),
            dropped_spoofed: get(&self.dropped_spoofed),
            dropped_invalid: get(&self.dropped_invalid),
            dropped_queue_full: get(&self.dropped_queue_full),
        }
    }
}

/// A guest's port on a switch, in `vstreamctl status` (`devices.fastnet.switch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchStatus {
    /// The switch's name.
    pub switch: String,
    /// Frames the guest sent into the switch.
    pub frames_in: u64,
    /// Frames the switch queued for the guest.
    pub frames_out: u64,
    /// Frames the guest sent with a source MAC not its own: dropped.
    pub dropped_spoofed: u64,
    /// Frames the guest sent that are not Ethernet frames or have a multicast source: dropped.
    pub dropped_invalid: u64,
    /// Frames for the guest dropped because it did not take them fast enough.
    pub dropped_queue_full: u64,
}

struct Port {
    config: PortConfig,
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    /// Entries in the table that this port learned (not its own MAC).
    learned: usize,
    counters: Arc<PortCounters>,
}

struct Entry {
    port: PortId,
    /// `None`: the port's own MAC, never aged nor moved.
    seen: Option<Instant>,
}

/// Where a frame went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Queued for these ports (empty: for none, e.g. its destination is behind its own port,
    /// or every destination's queue was full).
    Forwarded(Vec<PortId>),
    /// Its source MAC is not the sender's own.
    Spoofed,
    /// Too short, or a multicast source MAC.
    Invalid,
    /// The sender is not on the switch.
    NoSuchPort,
}

/// The switch's state: ports, their queues, the MAC table. No I/O, no clock of its own.
pub struct Switch {
    limits: Limits,
    /// Bytes in front of each frame's Ethernet header (the vnet header).
    header: usize,
    ports: BTreeMap<PortId, Port>,
    table: HashMap<Mac, Entry>,
    next_id: u64,
    last_purge: Option<Instant>,
}

impl Switch {
    /// An empty switch for frames that carry `header` bytes before their Ethernet header.
    pub fn new(limits: Limits, header: usize) -> Switch {
        Switch {
            limits,
            header,
            ports: BTreeMap::new(),
            table: HashMap::new(),
            next_id: 0,
            last_purge: None,
        }
    }

    /// The bounds it keeps.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds a port; its own MAC is known at once (a later port with the same MAC takes it).
    pub fn add_port(&mut self, config: PortConfig) -> (PortId, Arc<PortCounters>) {
        let id = PortId(self.next_id);
        self.next_id += 1;
        if let Some(mac) = config.mac {
            self.forget(&mac);
            self.table.insert(
                mac,
                Entry {
                    port: id,
                    seen: None,
                },
            );
        }
        let counters = Arc::new(PortCounters::default());
        self.ports.insert(
            id,
            Port {
                config,
                queue: VecDeque::new(),
                queued_bytes: 0,
                learned: 0,
                counters: counters.clone(),
            },
        );
        (id, counters)
    }

    /// Removes a port, its queue and every MAC behind it.
    pub fn remove_port(&mut self, id: PortId) {
        if self.ports.remove(&id).is_some() {
            self.table.retain(|_, e| e.port != id);
        }
    }

    /// The ports on the switch.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.keys().copied()
    }

    /// MACs in the table.
    pub fn macs(&self) -> usize {
        self.table.len()
    }

    /// Frames waiting for `port`.
    pub fn queued(&self, port: PortId) -> usize {
        self.ports.get(&port).map_or(0, |p| p.queue.len())
    }

    /// The next frame for `port`.
    pub fn pop(&mut self, port: PortId) -> Option<Bytes> {
        let p = self.ports.get_mut(&port)?;
        let frame = p.queue.pop_front()?;
        p.queued_bytes -= frame.len();
        Some(frame)
    }

    /// Removes the table's entry for `mac`, keeping its port's learned count right.
    fn forget(&mut self, mac: &Mac) {
        if let Some(old) = self.table.remove(mac) {
            if old.seen.is_some() {
                if let Some(p) = self.ports.get_mut(&old.port) {
                    p.learned -= 1;
                }
            }
        }
    }

    /// Forgets learned MACs not seen for the ageing time, at most once a second (a scan of
    /// the bounded table; lookups ignore stale entries in between).
    fn purge(&mut self, now: Instant) {
        let due = self
            .last_purge
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if !due {
            return;
        }
        self.last_purge = Some(now);
        let ageing = self.limits.ageing;
        let ports = &mut self.ports;
        self.table.retain(|_, e| match e.seen {
            Some(seen) if now.saturating_duration_since(seen) >= ageing => {
                if let Some(p) = ports.get_mut(&e.port) {
                    p.learned -= 1;
                }
                false
            }
            _ => true,
        });
    }

    /// Learns that `mac` is behind `from` (a port that may spoof): a port's own MAC never
    /// moves; a learned one moves to the port it was last seen on; a new one is learned only
    /// within the limits.
    fn learn(&mut self, mac: Mac, from: PortId, now: Instant) {
        if let Some(e) = self.table.get_mut(&mac) {
            match e.seen {
                None => return,
                Some(_) if e.port == from => {
                    e.seen = Some(now);
                    return;
                }
                Some(_) => self.forget(&mac),
            }
        }
        let Some(port) = self.ports.get_mut(&from) else {
            return;
        };
        if port.learned >= self.limits.macs_per_port || self.table.len() >= self.limits.macs {
            return;
        }
        port.learned += 1;
        self.table.insert(
            mac,
            Entry {
                port: from,
                seen: Some(now),
            },
        );
    }

    /// The port behind `mac`, if known and not aged out.
    fn lookup(&self, mac: &Mac, now: Instant) -> Option<PortId> {
        let e = self.table.get(mac)?;
        match e.seen {
            Some(seen) if now.saturating_duration_since(seen) >= self.limits.ageing => None,
            _ => Some(e.port),
        }
    }

    /// Queues `frame` for `to` unless its queue is full (then it is dropped for `to` only).
    fn enqueue(&mut self, to: PortId, frame: &Bytes) -> bool {
        let limits = self.limits;
        let Some(p) = self.ports.get_mut(&to) else {
            return false;
        };
        if p.queue.len() >= limits.queue_frames || p.queued_bytes + frame.len() > limits.queue_bytes
        {
            PortCounters::bump(&p.counters.dropped_queue_full);
            return false;
        }
        p.queued_bytes += frame.len();
        p.queue.push_back(frame.clone());
        PortCounters::bump(&p.counters.frames_out);
        true
    }

    /// A frame `from` sent at `now`: checked, its source learned, and queued for the ports it
    /// is for.
    pub fn input(&mut self, from: PortId, frame: Bytes, now: Instant) -> Verdict {
        let Some(port) = self.ports.get(&from) else {
            return Verdict::NoSuchPort;
        };
        let (config, counters) = (port.config, port.counters.clone());
        PortCounters::bump(&counters.frames_in);
        self.purge(now);
        let h = self.header;
        let mac_at = |at: usize| -> Option<Mac> { frame.get(at..at + 6)?.try_into().ok() };
        let (Some(dst), Some(src)) = (mac_at(h), mac_at(h + 6)) else {
            PortCounters::bump(&counters.dropped_invalid);
            return Verdict::Invalid;
        };
        // The EtherType must be there too: a shorter frame is no Ethernet frame.
        if frame.len() < h + 14 || is_multicast(&src) {
            PortCounters::bump(&counters.dropped_invalid);
            return Verdict::Invalid;
        }
        if config.mac != Some(src) {
            if !config.allow_mac_spoofing {
                PortCounters::bump(&counters.dropped_spoofed);
                return Verdict::Spoofed;
            }
            self.learn(src, from, now);
        }
        let targets: Vec<PortId> = match self.lookup(&dst, now).filter(|_| !is_multicast(&dst)) {
            Some(to) if to == from => Vec::new(),
            Some(to) => vec![to],
            None => self.ports.keys().copied().filter(|&p| p != from).collect(),
        };
        let queued = targets
            .into_iter()
            .filter(|&to| self.enqueue(to, &frame))
            .collect();
        Verdict::Forwarded(queued)
    }
}

#[cfg(feature = "host")]
pub use attach::{bridge_tap, join, SwitchPort};

#[cfg(feature = "host")]
mod attach {
    //! Switches by name, shared by every guest's link that names one, and a link's port.

    use std::collections::HashMap;
    use std::io;
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    use std::time::Instant;

    use bytes::Bytes;
    use tokio::sync::Notify;

    use super::{Limits, PortConfig, PortCounters, PortId, SwitchStatus, Verdict};
    use crate::fastnet::port::Port as LinkPort;
    use crate::fastnet::tap::VNET_HDR_LEN;
    use crate::fastnet::MAX_PACKET;
    use crate::tun::Tun;

    struct Inner {
        core: super::Switch,
        /// Wakes the port's link when a frame is queued for it.
        wake: HashMap<PortId, Arc<Notify>>,
    }

    struct Shared {
        name: String,
        inner: Mutex<Inner>,
    }

    /// vstreamd's switches: one per name while a link is on it.
    fn switches() -> &'static Mutex<HashMap<String, Weak<Shared>>> {
        static SWITCHES: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
        SWITCHES.get_or_init(Default::default)
    }

    /// Puts a link on switch `name` (created with the first link and its `limits`, gone with
    /// the last); a link that gives other limits than the switch has is refused.
    pub fn join(name: &str, limits: Limits, config: PortConfig) -> io::Result<SwitchPort> {
        let shared = {
            let mut all = switches().lock().unwrap_or_else(|e| e.into_inner());
            all.retain(|_, s| s.strong_count() > 0);
            match all.get(name).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    let s = Arc::new(Shared {
                        name: name.to_owned(),
                        inner: Mutex::new(Inner {
                            core: super::Switch::new(limits, VNET_HDR_LEN),
                            wake: HashMap::new(),
                        }),
                    });
                    all.insert(name.to_owned(), Arc::downgrade(&s));
                    s
                }
            }
        };
        let existing = *shared.lock().core.limits();
        if existing != limits {
            return Err(io::Error::other(format!(
                "switch {name} runs with {existing:?}; this guest's switch_limits give {limits:?} (guests on one switch give the same)"
            )));
        }
        let notify = Arc::new(Notify::new());
        let (id, counters) = {
            let mut inner = shared.lock();
            let (id, counters) = inner.core.add_port(config);
            inner.wake.insert(id, notify.clone());
            (id, counters)
        };
        Ok(SwitchPort {
            shared,
            id,
            notify,
            counters,
        })
    }

    impl Shared {
        fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
            // The core's state stays consistent whatever panicked while holding it.
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// A link's port on a switch: frames the guest sends go in with [`LinkPort::send`], frames
    /// for the guest come out of [`LinkPort::recv`]. Dropping it takes the port off the switch.
    pub struct SwitchPort {
        shared: Arc<Shared>,
        id: PortId,
        notify: Arc<Notify>,
        counters: Arc<PortCounters>,
    }

    impl SwitchPort {
        /// The switch's name.
        pub fn switch(&self) -> &str {
            &self.shared.name
        }

        /// The port's counters (they stay readable after the port is gone).
        pub fn counters(&self) -> Arc<PortCounters> {
            self.counters.clone()
        }

        /// The port's status now.
        pub fn status(&self) -> SwitchStatus {
            self.counters.snapshot(&self.shared.name)
        }
    }

    impl Drop for SwitchPort {
        fn drop(&mut self) {
            let mut inner = self.shared.lock();
            inner.core.remove_port(self.id);
            inner.wake.remove(&self.id);
        }
    }

    /// Puts the host's TAP on the switch as one more port (it may send from any MAC: the host
    /// routes or bridges for others) and moves frames both ways until the TAP fails: its error.
    pub async fn bridge_tap(switch: &str, limits: Limits, tap: &Tun) -> io::Error {
        let port = join(
            switch,
            limits,
            PortConfig {
                mac: None,
                allow_mac_spoofing: true,
            },
        );
        let port = match port {
            Ok(p) => p,
            Err(e) => return e,
        };
        let mut up = vec![0u8; MAX_PACKET as usize];
        let mut down = vec![0u8; MAX_PACKET as usize];
        loop {
            let r = tokio::select! {
                n = tap.recv(&mut up) => n.and_then(|n| port.send(&up[..n])),
                n = LinkPort::recv(&port, &mut down) => n.and_then(|n| tap.send(&down[..n])),
            };
            if let Err(e) = r {
                return e;
            }
        }
    }

    impl LinkPort for SwitchPort {
        async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                if let Some(n) = self.try_recv(buf) {
                    return Ok(n);
                }
                // A frame queued since the check left a permit: this returns at once.
                self.notify.notified().await;
            }
        }

        fn try_recv(&self, buf: &mut [u8]) -> Option<usize> {
            let mut inner = self.shared.lock();
            // Frames come from links that cap them at MAX_PACKET, the size of every link's
            // buffer; a larger one is dropped rather than cut.
            while let Some(frame) = inner.core.pop(self.id) {
                if let Some(dst) = buf.get_mut(..frame.len()) {
                    dst.copy_from_slice(&frame);
                    return Some(frame.len());
                }
            }
            None
        }

        fn send(&self, packet: &[u8]) -> io::Result<()> {
            let frame = Bytes::copy_from_slice(packet);
            let mut inner = self.shared.lock();
            if let Verdict::Forwarded(to) = inner.core.input(self.id, frame, Instant::now()) {
                for port in to {
                    if let Some(n) = inner.wake.get(&port) {
                        n.notify_one();
                    }
                }
            }
            Ok(())
        }
    }
}
