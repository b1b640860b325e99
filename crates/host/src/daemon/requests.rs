//! The control socket: who may connect, and one function per request (crate::control).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use vstream_devices::registry::{registry, ControlConn};

use super::{lock, Daemon, Guest};
use crate::access::Role;
use crate::config::{GuestConfig, TransportConfig};
use crate::control::{
    push_line, read_line, write_line, AttachTransport, DeviceRequest, Reply, Request,
};
use crate::upgrade::Pump;

/// Bytes of guest status lines gathered before a write to a control connection.
const STATUS_BATCH: usize = 64 * 1024;

impl Daemon {
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
            Ok(Role::Owner)
        } else {
            // Group membership may ask the group database (files, or a directory service).
            let access = self.access.clone();
            tokio::task::spawn_blocking(move || access.role(uid, gid))
                .await
                .map_err(io::Error::other)?
        };
        let role = match role.and_then(|role| self.access.check(uid, role, &req).map(|()| role)) {
            Ok(role) => role,
            Err(why) => {
                tracing::info!(
                    uid,
                    gid,
                    request = req.verb(),
                    "control request refused: {why}"
                );
                return write_line(&mut w, &Reply::error(why.to_string())).await;
            }
        };
        self.serve_request(req, role, r, w).await
    }

    /// Serves a control connection made inside the daemon (the web console's) on behalf of a
    /// client whose `role` the caller established: the same requests, refused the same way.
    pub(crate) async fn serve_local(
        self: Arc<Self>,
        role: Role,
        stream: UnixStream,
    ) -> io::Result<()> {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let req: Request = match read_line(&mut r).await {
            Ok(req) => req,
            Err(e) => return write_line(&mut w, &Reply::error(format!("bad request: {e}"))).await,
        };
        if role == Role::ReadOnly && !req.read_only() {
            let why = format!(
                "a read-only token may only watch; {} needs the owner's",
                req.verb()
            );
            return write_line(&mut w, &Reply::error(why)).await;
        }
        self.serve_request(req, role, r, w).await
    }

    async fn serve_request(
        self: Arc<Self>,
        req: Request,
        role: Role,
        r: BufReader<OwnedReadHalf>,
        mut w: OwnedWriteHalf,
    ) -> io::Result<()> {
        match req {
            Request::Status { guest } => self.control_status(guest, w).await,
            Request::Device(DeviceRequest { op, guest, request }) => {
                self.control_device(op, guest, request, r, w).await
            }
            Request::Open { guest, class, name } => {
                self.control_open(guest, class, name, r, w).await
            }
            Request::Events { guest } => self.control_events(guest, w).await,
            Request::Attach {
                guest,
                uuid,
                transports,
            } => {
                let reply = self.control_attach(&guest, uuid, transports);
                write_line(&mut w, &reply).await
            }
            Request::Detach { guest } => {
                let reply = match self.detach(&guest) {
                    true => {
                        tracing::info!(guest, "detached");
                        self.emit(&guest, "guest-detached", json!({}));
                        Reply::ok()
                    }
                    false => Reply::error(format!("no attached guest named {guest:?}")),
                };
                write_line(&mut w, &reply).await
            }
            Request::Upgrade { binary } => {
                let reply = std::os::fd::AsFd::as_fd(w.as_ref());
                let Err(e) = self.upgrade(binary, Some(reply)).await;
                write_line(&mut w, &Reply::error(format!("upgrade: {e}"))).await
            }
            Request::WebToken { read_only } => {
                let role = if read_only { Role::ReadOnly } else { role };
                let reply = match self.web_tokens() {
                    Ok(tokens) => Reply {
                        token: Some(tokens.for_role(role).to_owned()),
                        ..Reply::ok()
                    },
                    Err(e) => Reply::error(format!("web token: {e}")),
                };
                write_line(&mut w, &reply).await
            }
        }
    }

    /// `attach`: the guest is added as if configured with these transports.
    fn control_attach(
        self: &Arc<Self>,
        guest: &str,
        uuid: Option<String>,
        transports: Vec<AttachTransport>,
    ) -> Reply {
        let transports: Result<Vec<TransportConfig>, _> = transports
            .iter()
            .map(|t| serde_json::from_value(serde_json::to_value(t)?))
            .collect();
        let transports = match transports {
            Ok(t) => t,
            Err(e) => return Reply::error(format!("attach {guest}: {e}")),
        };
        let cfg = GuestConfig {
            name: guest.to_owned(),
            qmp: None,
            cid: None,
            uid: None,
            gid: None,
            key_file: None,
            transport: transports,
            devices: Default::default(),
        };
        match self.attach(&cfg) {
            Ok(()) => {
                let addresses: Vec<String> = cfg
                    .transport
                    .iter()
                    .map(|t| t.address.to_string())
                    .collect();
                tracing::info!(guest, ?uuid, ?addresses, "attached");
                self.emit(
                    guest,
                    "guest-attached",
                    json!({ "uuid": uuid, "transports": addresses }),
                );
                Reply::ok()
            }
            Err(e) => Reply::error(format!("attach {guest}: {e}")),
        }
    }

    /// `status`: a count line, then one line per guest.
    async fn control_status(&self, guest: Option<String>, mut w: OwnedWriteHalf) -> io::Result<()> {
        let guests: Vec<Arc<Guest>> = match &guest {
            None => self.all_guests(),
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
            refused_unknown: Some(lock(&self.refused_unknown).seen.clone()),
            daemon: Some(self.handover.info()),
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
