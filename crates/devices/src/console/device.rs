//! The console device's descriptor: `console` transports captured by the host half (logs,
//! viewers, `transport-up`/`-down` events), the `console` control op, the `console` verb.

#[cfg(feature = "host")]
use std::sync::Arc;

use serde::Deserialize;
#[cfg(feature = "host")]
use serde_json::{json, Value};
#[cfg(feature = "host")]
use tokio::io::AsyncWriteExt;

#[cfg(feature = "host")]
use super::{Console, ConsoleSettings, Role};
use crate::registry::Device;
#[cfg(feature = "host")]
use crate::registry::{
    ConsoleViewer, ControlConn, HostContext, HostHalf, HostState, SettingsError, TransportStatus,
};
#[cfg(feature = "host")]
use crate::ServeFuture;

/// `console`.
pub struct ConsoleDevice;

/// The class, op and transport kind.
pub const CLASS: &str = "console";

/// A `console` control request: its tail, its log as it grows, or an interactive attach.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ConsoleRequest {
    /// Guest name.
    pub guest: String,
    /// Console name (default: the guest's first console).
    pub name: Option<String>,
    /// Send the last N lines first.
    pub tail: Option<usize>,
    /// Keep sending output.
    #[serde(default)]
    pub follow: bool,
    /// Also accept input (one writer at a time).
    #[serde(default)]
    pub attach: bool,
    /// Attach and take the writer role from whoever holds it.
    #[serde(default)]
    pub take: bool,
}

impl Device for ConsoleDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn raw_kinds(&self) -> &'static [&'static str] {
        &[CLASS]
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let mut consoles = Vec::new();
        for t in &ctx.transports {
            let log = match (&t.log, &ctx.state_dir) {
                (Some(log), _) => log.clone(),
                (None, Some(dir)) => dir.join(format!("{}.log", t.name)),
                (None, None) => {
                    return Err(SettingsError::new(
                        CLASS,
                        format!("{}: no log file", t.name),
                    ))
                }
            };
            let settings = ConsoleSettings {
                name: t.name.clone(),
                address: t.address.clone(),
                log,
                log_max_bytes: t.log_max_bytes,
                log_keep: t.log_keep,
            };
            let carried = (ctx.carried_console)(&t.name);
            let console = Console::start(settings, carried)
                .map_err(|e| SettingsError::new(CLASS, format!("{}: {e}", t.name)))?;
            consoles.push(console);
        }
        let tasks = consoles
            .iter()
            .map(|c| -> ServeFuture { Box::pin(watch(ctx.events.clone(), c.clone())) })
            .collect();
        Ok(HostHalf {
            services: Vec::new(),
            tasks,
            state: Arc::new(Consoles(consoles)),
        })
    }

    #[cfg(feature = "host")]
    fn control_ops(&self) -> &'static [&'static str] {
        &[CLASS]
    }

    #[cfg(feature = "host")]
    crate::registry::verbs_in!(super::verbs);

    #[cfg(feature = "host")]
    fn control_access(&self, op: &str, request: &Value) -> (String, bool) {
        match request["attach"] == true || request["take"] == true {
            true => (format!("{op} attach"), false),
            false => (op.to_owned(), true),
        }
    }
}

#[cfg(feature = "host")]
/// Emits `transport-up` / `transport-down` when a console's connection changes (consoles keep
/// their own state; this sleeps until it changes).
async fn watch(events: crate::EventSink, console: Arc<Console>) {
    let mut was_up = false;
    let mut changes = console.watch_up();
    while changes.changed().await.is_ok() {
        let up = *changes.borrow_and_update();
        let s = console.status();
        if up != was_up {
            let detail = if up {
                s.peer.clone()
            } else {
                s.last_error.clone().unwrap_or_else(|| s.state.to_owned())
            };
            events.transport(up, CLASS, &s.name, &s.address, &detail);
            was_up = up;
        }
    }
}

#[cfg(feature = "host")]
struct Consoles(Vec<Arc<Console>>);

#[cfg(feature = "host")]
impl HostState for Consoles {
    fn consoles(&self) -> Vec<Arc<Console>> {
        self.0.clone()
    }

    fn transports(&self) -> Vec<TransportStatus> {
        self.0
            .iter()
            .map(|c| {
                let s = c.status();
                let mut extra = serde_json::Map::new();
                extra.insert("log".into(), json!(s.log));
                extra.insert("viewers".into(), json!(s.viewers));
                TransportStatus {
                    kind: CLASS.into(),
                    name: s.name,
                    address: s.address,
                    state: s.state.into(),
                    since: s.since,
                    peer: s.peer,
                    connects: 0,
                    errors: s.errors,
                    last_error: s.last_error,
                    bytes_in: Some(s.bytes_in),
                    bytes_out: s.bytes_out,
                    extra,
                }
            })
            .collect()
    }

    fn control(&self, _op: &str, request: Value, mut conn: ControlConn) -> ServeFuture {
        let consoles = self.0.clone();
        Box::pin(async move {
            let req: ConsoleRequest = match serde_json::from_value(request) {
                Ok(r) => r,
                Err(e) => {
                    let _ = conn.refuse(format!("bad request: {e}")).await;
                    return;
                }
            };
            if let Err(e) = serve(&consoles, req, conn).await {
                tracing::debug!("console viewer: {e}");
            }
        })
    }
}

#[cfg(feature = "host")]
/// Serves one viewer: the tail, then output as it comes and (attached) input.
async fn serve(
    consoles: &[Arc<Console>],
    req: ConsoleRequest,
    mut conn: ControlConn,
) -> std::io::Result<()> {
    let console = match &req.name {
        Some(n) => consoles.iter().find(|c| c.name() == n),
        None => consoles.first(),
    };
    let Some(console) = console.cloned() else {
        let have: Vec<_> = consoles.iter().map(|c| c.name().to_owned()).collect();
        let (guest, name) = (&req.guest, &req.name);
        return conn
            .refuse(format!(
                "guest {guest:?} has no console {name:?} (has {have:?})"
            ))
            .await;
    };
    let attach = req.attach || req.take;
    let role = match (req.take, attach) {
        (true, _) => Role::TakeOver,
        (false, true) => Role::Write,
        (false, false) => Role::Watch,
    };
    let (viewer, history) = console.join(role, req.tail);
    conn.reply(json!({ "writer": viewer.is_writer() })).await?;
    if let Some(history) = history {
        let read = tokio::task::spawn_blocking(move || history.read()).await;
        let bytes = read.map_err(std::io::Error::other).and_then(|r| r);
        match bytes {
            Ok(bytes) => conn.write_all(&bytes).await?,
            // The live output still comes: a viewer is better off without history than without
            // its console.
            Err(e) => tracing::warn!(console = %console.name(), "console history: {e}"),
        }
    }
    if !req.follow && !attach {
        return conn.into_stream().shutdown().await;
    }
    // vstreamd runs the viewer, so that a live upgrade carries it.
    conn.view(ConsoleViewer {
        console,
        viewer,
        attach,
    })
    .await
}
