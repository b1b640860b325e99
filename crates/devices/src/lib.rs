//! The vstream devices. Each device is one folder with its messages, its host half (run by
//! vstreamd) and its guest half (run by vstream-agent); see docs/devices/.
//!
//! Each device declares everything the rest of the system needs in one [`registry::Device`]
//! value (`device.rs` in its folder): its class, its `[guest.CLASS]` settings, its host half,
//! its guest half, its vstreamctl verbs. Devices reached through the multiplexer implement
//! [`Service`]: a peer opens a channel of the device's class and the service gets the channel's
//! byte stream. Adding a device means adding its folder and one line in
//! [`registry::registry`]; see docs/ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod channel;
pub mod civil;
pub mod cli;
pub mod console;
pub mod diag;
pub mod fastnet;
pub mod files;
pub mod hid;
pub mod keep;
pub mod ppp;
pub mod printer;
pub mod qga;
pub mod random;
pub mod record;
pub mod registry;
pub mod spawn;
pub mod status;
pub mod term;
pub mod thread;
pub mod tty;
pub mod tun;
pub mod watchdog;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc};
use vstream_link::{ChannelStream, Incoming};

pub use registry::{registry, Device, HostContext};

/// What a service runs per channel.
pub type ServeFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One half of a device, serving the channels of its class that the peer opens.
pub trait Service: Send + Sync {
    /// The device class (the channel class the peer opens).
    fn class(&self) -> &'static str;
    /// Serves one channel named `name` until it ends.
    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture;
    /// The device's state for `vstreamctl status` (under `devices.CLASS`), if it has one.
    fn status(&self) -> Option<status::DeviceStatus> {
        None
    }
}

/// Where host halves report events for `vstreamctl events` (docs/devices/events.md). Cheap to
/// clone; sending never waits (a slow reader misses events and is told how many).
#[derive(Clone)]
pub struct EventSink {
    guest: Arc<str>,
    tx: broadcast::Sender<serde_json::Value>,
    /// While set: events kept for every `events` client to get first, marked `replayed` (events
    /// of vstreamd's start, from before anyone could listen).
    replay: Option<Arc<std::sync::Mutex<Vec<serde_json::Value>>>>,
}

impl EventSink {
    /// Events of `guest`, sent on `tx` (vstreamd's event channel).
    pub fn new(guest: &str, tx: broadcast::Sender<serde_json::Value>) -> EventSink {
        EventSink {
            guest: guest.into(),
            tx,
            replay: None,
        }
    }

    /// The same sink, but keeping its events in `log` (marked `replayed`) instead of sending
    /// them: for what a device reports while vstreamd starts.
    pub fn replayed(&self, log: Arc<std::sync::Mutex<Vec<serde_json::Value>>>) -> EventSink {
        EventSink {
            replay: Some(log),
            ..self.clone()
        }
    }

    /// The guest these events are about.
    pub fn guest(&self) -> &str {
        &self.guest
    }

    /// Sends event `kind` with `fields` (a JSON object; anything else is put under `"data"`).
    pub fn emit(&self, kind: &str, fields: serde_json::Value) {
        let mut ev = event(&self.guest, kind, fields);
        match &self.replay {
            Some(log) => {
                ev["replayed"] = true.into();
                log.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
            }
            None => {
                let _ = self.tx.send(ev);
            }
        }
    }

    /// Emits `transport-up` (with the peer) or `transport-down` (with the reason) for one of
    /// the guest's transports.
    pub fn transport(&self, up: bool, kind: &str, name: &str, address: &str, detail: &str) {
        let (event, key) = if up {
            ("transport-up", "peer")
        } else {
            ("transport-down", "reason")
        };
        self.emit(
            event,
            serde_json::json!({ "kind": kind, "transport": name, "address": address, key: detail }),
        );
    }
}

/// One event as `vstreamctl events --json` prints it: `fields` plus `event` (the kind),
/// `guest`, `time` (Unix seconds) and `time_ms` (Unix milliseconds).
pub fn event(guest: &str, kind: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut v = match fields {
        serde_json::Value::Object(map) => serde_json::Value::Object(map),
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        other => serde_json::json!({ "data": other }),
    };
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    v["event"] = kind.into();
    v["guest"] = guest.into();
    v["time"] = (ms / 1000).into();
    v["time_ms"] = ms.into();
    v
}

/// Hands each incoming channel to the service of its class; channels of unknown classes are
/// reset with a clear reason. Runs until the session is dropped.
pub async fn dispatch(
    services: Vec<Arc<dyn Service>>,
    mut incoming: mpsc::UnboundedReceiver<Incoming>,
) {
    // A guest can open channels of unknown classes in a loop: a few lines a second, then a count.
    let mut refusals = vstream_wire::limit::ReportLimit::default();
    while let Some(inc) = incoming.recv().await {
        match services.iter().find(|s| s.class() == inc.class) {
            Some(s) => {
                tracing::debug!(class = %inc.class, name = %inc.name, "channel opened");
                tokio::spawn(s.serve(inc.name, inc.stream));
            }
            None => {
                let (log, held) = refusals.check((), std::time::Instant::now());
                if held > 0 {
                    tracing::warn!("{held} more channels of unknown classes refused, not logged");
                }
                if log {
                    tracing::warn!(class = %inc.class, name = %inc.name, "no service for this class");
                }
                inc.stream
                    .reset(&format!("no service for device class {:?}", inc.class));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Devices share code through the crate's shared modules (record, term, channel, civil, tun),
    /// never through each other: no `crate::<device>::` path in another device's folder.
    #[test]
    fn no_device_imports_another() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let devices: Vec<String> = std::fs::read_dir(&src)
            .expect("src")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_dir())
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert!(devices.len() >= 9, "{devices:?}");
        let mut found = Vec::new();
        for device in &devices {
            let mut files = Vec::new();
            let mut dirs = vec![src.join(device)];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(dir).expect("device folder") {
                    let path = entry.expect("entry").path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else {
                        files.push(path);
                    }
                }
            }
            for path in files {
                let text = std::fs::read_to_string(&path).expect("source");
                for other in devices.iter().filter(|o| *o != device) {
                    for needle in [format!("crate::{other}::"), format!("crate::{other};")] {
                        if text.contains(&needle) {
                            found.push(format!("{}: {needle}", path.display()));
                        }
                    }
                }
                if text.contains("super::super::") {
                    found.push(format!("{}: super::super::", path.display()));
                }
            }
        }
        assert!(found.is_empty(), "devices import each other: {found:#?}");
    }
}
