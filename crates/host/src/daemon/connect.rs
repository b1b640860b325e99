//! Guests' connections: their own transports, kept up, and shared listeners, where each
//! connection must prove which guest it is (crate::identity).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vstream_devices::keep::{keep, now_secs, Kept, Slot};
use vstream_devices::registry::TransportStatus;
use vstream_link::auth as link_auth;
use vstream_link::link_params;
use vstream_transport::{Address, Endpoint, PeerIdentity};
use vstream_wire::auth::{self, Key};
use vstream_wire::frame::{encode, Kind};

use super::{lock, Daemon, Guest, HELLO_TIMEOUT, MAX_PENDING_HANDSHAKES};
use crate::config::TransportConfig;
use crate::error::Refused;
use crate::identity::{Admission, Rules};

/// Tells a connection why it is refused (a REFUSE frame, docs/PROTOCOL.md §2), then closes it.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, reason: &Refused) {
    let mut frame = Vec::new();
    let reason = reason.to_string();
    encode(&mut frame, Kind::Refuse as u8, 0, 0, 0, reason.as_bytes());
    let send = async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    };
    // A peer that does not read gets nothing more from us.
    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
}

impl Daemon {
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
                    self.key_for(name).map_err(|e| e.to_string())
                };
                let handshake = link_auth::acceptor(&mut stream, prefix, keys, HELLO_TIMEOUT).await;
                match handshake {
                    Ok((name, rest)) => {
                        proven = Some(name);
                        prefix = rest;
                    }
                    Err(e) => {
                        self.record_refusal(
                            claimed.as_deref(),
                            &peer,
                            &Refused::Handshake(e.to_string()),
                        );
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
                Ok(Admission::Configured(name)) => {
                    guests.get(&name).cloned().ok_or(Refused::NotRunning(name))
                }
                Ok(Admission::Announced { name, owner }) => match guests.get(&name) {
                    Some(g) => Ok(g.clone()),
                    None => self
                        .new_guest(&name, None, (Rules::default(), None, Some(owner)))
                        .map(|g| guests.entry(name).or_insert(g).clone())
                        .map_err(Refused::from),
                },
                Err(reason) => Err(reason),
            }
        };
        let admitted = admitted.and_then(|g| match g.held_off() {
            Some(d) => Err(Refused::HeldOff {
                guest: g.name.clone(),
                secs: d.as_secs() + 1,
            }),
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
    fn key_for(&self, name: &str) -> Result<Key, Refused> {
        self.guest(name)
            .and_then(|g| g.key.clone())
            .ok_or_else(|| Refused::NoKey(name.to_owned()))
    }

    /// Counts and (rate-limited) logs a refused connection: on the guest it claimed if there is
    /// one, else daemon-wide. The guest itself is not disturbed.
    fn record_refusal(&self, claimed: Option<&str>, peer: &str, reason: &Refused) {
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
}

/// One of a guest's mux transports, as a place for its state.
struct GuestSlot<'a>(&'a Guest, usize);

impl Slot for GuestSlot<'_> {
    fn update(&self, f: &mut dyn FnMut(&mut TransportStatus)) {
        self.0.update(self.1, f);
    }
}

/// Keeps one configured mux transport connected, forever, with backoff.
pub(super) async fn run_transport(
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
) -> Result<(vstream_transport::BoxStream, Vec<u8>), Refused> {
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
                false => Err(Refused::NotThisGuest {
                    guest: guest.name.clone(),
                    claimed: n.to_owned(),
                }
                .to_string()),
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
            let reason = Refused::PlainTcp;
            if accepted {
                refuse(&mut stream, &reason).await;
            }
            return Err(reason);
        }
    };
    handshake
        .map(|rest| (stream, rest))
        .map_err(|e| Refused::Handshake(e.to_string()))
}
