//! The printer device's descriptor: `[guest.printer]` (the spool), the host half's spool and
//! `jobs` control op, the guest half's AppSocket listeners (`--printer`, `vstream.printer=`).

use std::path::PathBuf;

use serde::Deserialize;
use vstream_transport::Address;

use super::CLASS;
use crate::registry::{Device, SettingsError};
use crate::ServeFuture;

#[cfg(feature = "guest")]
use {
    super::guest::{default_listeners, listen},
    crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions},
    clap::ArgAction,
    vstream_link::Mux,
};
#[cfg(feature = "host")]
use {
    super::host::{PrinterService, Spool, SpoolConfig},
    crate::registry::{section, ControlConn, GuestFacts, HostContext, HostHalf, HostState},
    crate::status::DeviceStatus,
    serde_json::{json, Value},
    std::sync::atomic::{AtomicBool, Ordering},
    std::sync::Arc,
    std::time::Duration,
};

/// `printer`.
pub struct PrinterDevice;

/// `[guest.printer]`: where the guest's print jobs go (default: enabled, in
/// `STATE_DIR/GUEST/spool`, 1 GiB).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrinterConfig {
    /// Accept print jobs from this guest.
    pub enabled: bool,
    /// Spool directory (default `STATE_DIR/GUEST/spool`).
    pub spool: Option<PathBuf>,
    /// Most bytes the spool may hold; further jobs are refused.
    pub quota_bytes: u64,
    /// Program and arguments run after each finished job; the job file's path and its type
    /// are appended (and set in `VSTREAM_JOB_FILE`, `VSTREAM_JOB_TYPE`, ...).
    pub hook: Vec<String>,
    /// The hook is killed after this many seconds.
    pub hook_timeout_secs: u64,
}

impl Default for PrinterConfig {
    fn default() -> PrinterConfig {
        PrinterConfig {
            enabled: true,
            spool: None,
            quota_bytes: 1 << 30,
            hook: Vec::new(),
            hook_timeout_secs: 60,
        }
    }
}

/// The control op that lists a guest's print jobs (reply: `jobs`).
pub const JOBS_OP: &str = "jobs";

/// The agent's listeners (empty: no print jobs).
#[derive(Debug, Clone)]
pub struct Listeners(pub Vec<Address>);

impl Device for PrinterDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    crate::registry::status_type!(super::host::PrinterStatus);

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, _guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        section::<PrinterConfig>(CLASS, s).map(drop)
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let p: PrinterConfig = section(CLASS, ctx.section.as_ref())?.unwrap_or_default();
        // Guests that announced themselves get no spool on this host.
        let spool = match &ctx.state_dir {
            Some(state) if p.enabled => Some(open_spool(ctx, state, &p)?),
            _ => None,
        };
        Ok(HostHalf {
            services: vec![Arc::new(PrinterService::new(&ctx.guest, spool.clone()))],
            tasks: Vec::new(),
            state: Arc::new(PrinterState {
                guest: ctx.guest.clone(),
                spool,
            }),
        })
    }

    #[cfg(feature = "host")]
    crate::registry::verbs_in!(super::verbs);

    #[cfg(feature = "host")]
    fn control_ops(&self) -> &'static [&'static str] {
        &[JOBS_OP]
    }

    #[cfg(feature = "guest")]
    fn agent_args(&self) -> Vec<clap::Arg> {
        vec![
            clap::Arg::new("printer")
                .value_name("PRINTER")
                .long("printer")
                .action(ArgAction::Append)
                .value_parser(|s: &str| s.parse::<Address>())
                .help("Accept raw print jobs here (repeatable), e.g. tcp-listen:127.0.0.1:9100, unix-listen:/run/vstream/printer.sock (default: vstream.printer= on the kernel command line, else those two)"),
            clap::Arg::new("no-printer")
                .long("no-printer")
                .action(ArgAction::SetTrue)
                .conflicts_with("printer")
                .help("Do not accept print jobs"),
        ]
    }

    #[cfg(feature = "guest")]
    fn agent_options(
        &self,
        args: &AgentArgs<'_>,
        options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        let given: Vec<Address> = args
            .matches
            .get_many::<Address>("printer")
            .map(|v| v.cloned().collect())
            .unwrap_or_default();
        let listeners = if args.matches.get_flag("no-printer") {
            Vec::new()
        } else if !given.is_empty() {
            given
        } else {
            kernel_listeners(args.cmdline)?.unwrap_or_else(default_listeners)
        };
        options.set(CLASS, Listeners(listeners));
        Ok(())
    }

    #[cfg(feature = "guest")]
    fn guest(&self, mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let listeners = options.get::<Listeners>(CLASS).map_or(&[][..], |l| &l.0);
        GuestHalf {
            tasks: listeners
                .iter()
                .map(|a| -> ServeFuture { Box::pin(listen(mux.clone(), a.clone())) })
                .collect(),
            ..GuestHalf::default()
        }
    }
}

#[cfg(feature = "host")]
/// Opens the guest's spool; the jobs a killed vstreamd left incomplete are reported as events
/// of the start.
fn open_spool(
    ctx: &HostContext,
    state: &std::path::Path,
    p: &PrinterConfig,
) -> Result<Arc<Spool>, SettingsError> {
    let opening = Arc::new(AtomicBool::new(true));
    let (live, start, still_opening) = (
        ctx.events.clone(),
        ctx.start_events.clone(),
        opening.clone(),
    );
    let spool = Spool::open(
        &ctx.guest,
        SpoolConfig {
            dir: p.spool.clone().unwrap_or_else(|| state.join("spool")),
            quota_bytes: p.quota_bytes,
            hook: p.hook.clone(),
            hook_timeout: Duration::from_secs(p.hook_timeout_secs),
        },
        Arc::new(move |v| {
            let sink = if still_opening.load(Ordering::Relaxed) {
                &start
            } else {
                &live
            };
            sink.emit("print-job", v);
        }),
    )
    .map_err(|e| SettingsError::new(CLASS, e))?;
    opening.store(false, Ordering::Relaxed);
    Ok(spool)
}

#[cfg(feature = "guest")]
/// The printer listeners a kernel command line asks for: `vstream.printer=ADDR` (repeatable)
/// or `vstream.printer=off`; `None` if it says nothing (then the defaults apply).
pub fn kernel_listeners(cmdline: &str) -> Result<Option<Vec<Address>>, SettingsError> {
    let mut out: Option<Vec<Address>> = None;
    for a in cmdline_values(cmdline, "printer") {
        let list = out.get_or_insert_with(Vec::new);
        if a != "off" {
            let addr = a.parse();
            list.push(
                addr.map_err(|e| SettingsError::new(CLASS, format!("vstream.printer={a}: {e}")))?,
            );
        }
    }
    Ok(out)
}

#[cfg(feature = "host")]
struct PrinterState {
    guest: String,
    spool: Option<Arc<Spool>>,
}

#[cfg(feature = "host")]
impl HostState for PrinterState {
    fn status(&self) -> Option<DeviceStatus> {
        self.spool.as_ref().map(|s| DeviceStatus::new(s.status()))
    }

    fn control(&self, _op: &str, _request: Value, mut conn: ControlConn) -> ServeFuture {
        let (guest, spool) = (self.guest.clone(), self.spool.clone());
        Box::pin(async move {
            let Some(spool) = spool else {
                let _ = conn
                    .refuse(format!("guest {guest:?} has no printer spool"))
                    .await;
                return;
            };
            let _ = match tokio::task::spawn_blocking(move || spool.jobs()).await {
                Ok(Ok(jobs)) => conn.reply(json!({ "jobs": jobs })).await,
                Ok(Err(e)) => conn.refuse(format!("{guest}: printer spool: {e}")).await,
                Err(e) => conn.refuse(format!("{guest}: printer spool: {e}")).await,
            };
        })
    }
}
