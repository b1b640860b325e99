//! Keeping a configured transport bound and accepting: one loop for vstreamd's mux transports
//! and the raw transports that devices own.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vstream_transport::{Address, Connection, Endpoint};

use crate::registry::TransportStatus;
use crate::EventSink;

/// Where a kept transport's state goes (vstreamd's list of a guest's transports, or a device's
/// own).
pub trait Slot: Sync {
    /// Changes the transport's state.
    fn update(&self, f: &mut dyn FnMut(&mut TransportStatus));
}

impl Slot for std::sync::Mutex<TransportStatus> {
    fn update(&self, f: &mut dyn FnMut(&mut TransportStatus)) {
        f(&mut self.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TransportStatus {
    /// A transport that is not connected yet.
    pub fn new(kind: &str, name: String, address: String) -> TransportStatus {
        TransportStatus {
            kind: kind.to_owned(),
            name,
            address,
            state: "down".into(),
            since: now_secs(),
            peer: String::new(),
            connects: 0,
            errors: 0,
            last_error: None,
            bytes_in: None,
            bytes_out: 0,
            extra: Default::default(),
        }
    }
}

/// What [`keep`] needs to know about one transport.
pub struct Kept<'a> {
    /// Its kind (`mux`, or a device's raw kind), for events.
    pub kind: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Where.
    pub address: &'a Address,
    /// Its state.
    pub slot: &'a dyn Slot,
    /// Where `transport-up` goes.
    pub events: &'a EventSink,
}

impl Kept<'_> {
    /// Marks the transport down with `reason` and emits `transport-down`.
    pub fn down(&self, reason: &str) {
        self.slot.update(&mut |s| {
            s.state = "down".into();
            s.since = now_secs();
            s.last_error = Some(reason.to_owned());
        });
        let address = self.address.to_string();
        self.events
            .transport(false, self.kind, self.name, &address, reason);
    }
}

/// Keeps one configured transport's endpoint bound and accepting, forever. A failed bind is
/// retried every second; a failed accept after a backoff (100 ms, doubling to 2 s, back to
/// 100 ms on a connection); both count as errors in the transport's status. Each connection is
/// marked up (status, and a `transport-up` event) and handed to `serve`, which runs it and
/// reports it down; the next accept follows after the backoff. While `held_off` says so, no
/// connection is taken.
pub async fn keep<F, Fut>(t: &Kept<'_>, held_off: impl Fn() -> Option<Duration>, mut serve: F)
where
    F: FnMut(Connection) -> Fut,
    Fut: Future<Output = ()>,
{
    let address = t.address.to_string();
    let error = |e: &std::io::Error| {
        t.slot.update(&mut |s| {
            s.errors += 1;
            s.last_error = Some(e.to_string());
        })
    };
    let mut backoff = Duration::from_millis(100);
    let mut endpoint = loop {
        match Endpoint::bind(t.address.clone()).await {
            Ok(ep) => break ep,
            Err(e) => {
                error(&e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        // A guest held off for protocol violations is neither accepted nor connected to.
        if let Some(wait) = held_off() {
            tokio::time::sleep(wait).await;
        }
        let conn = match endpoint.next().await {
            Ok(c) => c,
            Err(e) => {
                error(&e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        t.slot.update(&mut |s| {
            s.state = "up".into();
            s.since = now_secs();
            s.peer = conn.peer.clone();
            s.connects += 1;
        });
        t.events
            .transport(true, t.kind, t.name, &address, &conn.peer);
        serve(conn).await;
        tokio::time::sleep(backoff).await;
    }
}
