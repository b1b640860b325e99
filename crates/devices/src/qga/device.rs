//! The qga device's descriptor: the guest half's QEMU guest agent (on `qga` channels, and on a
//! raw transport with `--qga`), the host half's `agent` control op (to a `qga` transport with a
//! real qemu-ga behind it if the guest has one, else to a `qga` channel of vstream-agent).

use std::sync::Arc;

use vstream_link::Mux;
use vstream_transport::Address;

use super::CLASS;
use crate::registry::{Device, SettingsError};
use crate::ServeFuture;

#[cfg(feature = "guest")]
use {
    super::guest::{serve_address, GuestAgent, QgaService, Settings},
    super::{qemu_ga, QemuGaConfig},
    crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions},
    std::ops::ControlFlow,
    std::path::PathBuf,
};
#[cfg(feature = "host")]
use {
    crate::registry::{ControlConn, GuestFacts, HostContext, HostHalf, HostState},
    serde_json::Value,
    std::time::Duration,
    vstream_transport::{BoxStream, Endpoint},
};

/// `qga`.
pub struct QgaDevice;

/// The control op that turns a control connection into a raw QGA stream to the guest.
pub const AGENT_OP: &str = "agent";

/// The raw transport the agent serves QGA on (`--qga`, `vstream.qga=`).
#[derive(Debug, Clone)]
pub struct RawPort(pub Address);

impl Device for QgaDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    /// A raw QEMU guest agent stream (e.g. the chardev of `org.qemu.guest_agent.0` with a real
    /// qemu-ga behind it): `vstreamctl agent` and its verbs go there instead of to a `qga`
    /// channel of vstream-agent. At most one per guest.
    fn raw_kinds(&self) -> &'static [&'static str] {
        &[CLASS]
    }

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        if s.is_some() {
            return Err(SettingsError::new(CLASS, "this device has no settings"));
        }
        if guest.is_some_and(|g| g.transports.len() > 1) {
            return Err(SettingsError::new(CLASS, "more than one qga transport"));
        }
        Ok(())
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        Ok(HostHalf {
            services: Vec::new(),
            tasks: Vec::new(),
            state: Arc::new(QgaHost {
                raw: ctx.transports.first().map(|t| t.address.clone()),
                mux: ctx.mux.clone(),
            }),
        })
    }

    #[cfg(feature = "host")]
    crate::registry::verbs_in!(super::verbs);

    #[cfg(feature = "host")]
    fn control_ops(&self) -> &'static [&'static str] {
        &[AGENT_OP]
    }

    #[cfg(feature = "guest")]
    fn agent_args(&self) -> Vec<clap::Arg> {
        let mut args = vec![clap::Arg::new("qga")
            .value_name("QGA")
            .long("qga")
            .value_parser(|s: &str| s.parse::<Address>())
            .help("Also serve the QEMU guest agent protocol here, for existing QGA clients, e.g. port:org.qemu.guest_agent.0 (default: vstream.qga= when settings come from the kernel command line)")];
        args.extend(qemu_ga::args());
        args
    }

    #[cfg(feature = "guest")]
    fn agent_options(
        &self,
        args: &AgentArgs<'_>,
        options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        let mut port = args.matches.get_one::<Address>("qga").cloned();
        if args.from_kernel && port.is_none() {
            for a in cmdline_values(args.cmdline, "qga") {
                let addr = a.parse();
                port = Some(
                    addr.map_err(|e| SettingsError::new(CLASS, format!("vstream.qga={a}: {e}")))?,
                );
            }
        }
        let program = std::env::args_os().next();
        if qemu_ga::wanted(args.matches, program.as_deref()) {
            let conf_env = std::env::var("QGA_CONF").ok().filter(|v| !v.is_empty());
            let config = qemu_ga::from_matches(args.matches, conf_env.as_deref(), read_conf)
                .map_err(|e| SettingsError::new(CLASS, e))?;
            if port.is_none() {
                port = Some(config.address().map_err(|e| SettingsError::new(CLASS, e))?);
            }
            options.set(QEMU_GA, config);
        }
        if let Some(p) = port {
            options.set(CLASS, RawPort(p));
        }
        Ok(())
    }

    #[cfg(feature = "guest")]
    fn serves_without_connect(&self, options: &GuestOptions) -> bool {
        options.get::<RawPort>(CLASS).is_some()
    }

    #[cfg(feature = "guest")]
    fn agent_prepare(&self, options: &GuestOptions) -> anyhow::Result<ControlFlow<()>> {
        match options.get::<QemuGaConfig>(QEMU_GA) {
            Some(config) => prepare_as_qemu_ga(config),
            None => Ok(ControlFlow::Continue(())),
        }
    }

    #[cfg(feature = "guest")]
    fn guest(&self, _mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let config = options.get::<QemuGaConfig>(QEMU_GA);
        let agent = GuestAgent::global_with(|| Settings {
            filter: config.map(QemuGaConfig::filter).unwrap_or_default(),
            fsfreeze_hook: config.and_then(|c| c.fsfreeze_hook.as_ref().map(PathBuf::from)),
            ..Settings::from_env()
        });
        GuestHalf {
            services: vec![Arc::new(QgaService::new(agent.clone()))],
            tasks: options
                .get::<RawPort>(CLASS)
                .map(|p| -> ServeFuture { Box::pin(serve_address(agent, p.0.clone())) })
                .into_iter()
                .collect(),
            on_stop: None,
        }
    }
}

#[cfg(feature = "guest")]
/// Where the agent keeps its qemu-ga configuration among the [`GuestOptions`] (next to
/// [`RawPort`] under [`CLASS`]).
const QEMU_GA: &str = "qga/qemu-ga";

#[cfg(feature = "guest")]
/// A configuration file's text, `None` if there is none.
fn read_conf(path: &str) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(feature = "guest")]
/// What qemu-ga does before it serves: answer `-D` or `-b help`, move its log, become a daemon,
/// take its pid file (locked, so a second agent on the same file refuses to start).
fn prepare_as_qemu_ga(config: &QemuGaConfig) -> anyhow::Result<ControlFlow<()>> {
    use std::io::Write;
    if config.list_rpcs {
        for c in super::COMMANDS {
            crate::outln!("{}", c.name);
        }
        return Ok(ControlFlow::Break(()));
    }
    if config.dump_conf {
        let text = config.dump().map_err(anyhow::Error::msg)?;
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(ControlFlow::Break(()));
    }
    if let Some(path) = &config.logfile {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("Error opening logfile {path}: {e}"))?;
        rustix::stdio::dup2_stderr(&log)?;
    }
    if config.daemonize {
        // Keeps stderr when a log file took its place (daemon(3) would point it at /dev/null).
        nix::unistd::daemon(false, config.logfile.is_some())
            .map_err(|e| anyhow::anyhow!("failed to daemonize: {e}"))?;
    }
    let mut pidfile = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&config.pidfile)
        .map_err(|e| anyhow::anyhow!("failed to open pid file {}: {e}", config.pidfile))?;
    rustix::fs::flock(
        &pidfile,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .map_err(|e| anyhow::anyhow!("Cannot lock pid file {}: {e}", config.pidfile))?;
    pidfile.set_len(0)?;
    writeln!(pidfile, "{}", std::process::id())?;
    // The lock lasts as long as the process: the file stays open until it exits.
    std::mem::forget(pidfile);
    Ok(ControlFlow::Continue(()))
}

#[cfg(feature = "host")]
struct QgaHost {
    raw: Option<Address>,
    mux: Mux,
}

#[cfg(feature = "host")]
impl HostState for QgaHost {
    fn control(&self, _op: &str, request: Value, mut conn: ControlConn) -> ServeFuture {
        let (raw, mux) = (self.raw.clone(), self.mux.clone());
        Box::pin(async move {
            let guest = request["guest"].as_str().unwrap_or("?").to_owned();
            match qga_stream(raw, &mux).await {
                Ok(stream) => {
                    if conn.reply(Value::Null).await.is_ok() {
                        let _ = match stream {
                            QgaStream::Raw(stream) => conn.relay(stream).await,
                            // A channel of vstream-agent: carried across live upgrades.
                            QgaStream::Channel(chan) => conn.bridge(chan).await,
                        };
                    }
                }
                Err(e) => {
                    let _ = conn.refuse(format!("{guest}: {e}")).await;
                }
            }
        })
    }
}

#[cfg(feature = "host")]
/// A QGA byte stream to a guest.
enum QgaStream {
    /// Its raw `qga` transport (a real qemu-ga).
    Raw(BoxStream),
    /// A `qga` channel of vstream-agent.
    Channel(vstream_link::ChannelStream),
}

#[cfg(feature = "host")]
/// A QGA byte stream to a guest: its raw `qga` transport if configured (a real qemu-ga), else
/// a `qga` channel of vstream-agent.
async fn qga_stream(raw: Option<Address>, mux: &Mux) -> Result<QgaStream, Unreached> {
    let wait = Duration::from_secs(30);
    match raw {
        Some(address) => {
            let connect = async { Endpoint::bind(address.clone()).await?.next().await };
            match tokio::time::timeout(wait, connect).await {
                Ok(Ok(c)) => Ok(QgaStream::Raw(c.stream)),
                Ok(Err(e)) => Err(Unreached::Transport(e)),
                Err(_) => Err(Unreached::TransportTimeout(address)),
            }
        }
        None => match tokio::time::timeout(wait, mux.open(CLASS, "")).await {
            Ok(Ok(c)) => Ok(QgaStream::Channel(c)),
            Ok(Err(e)) => Err(Unreached::Channel(e)),
            Err(_) => Err(Unreached::ChannelTimeout),
        },
    }
}

/// Why there is no QGA stream to a guest.
#[cfg(feature = "host")]
#[derive(Debug, thiserror::Error)]
enum Unreached {
    /// Its `qga` transport failed.
    #[error("qga transport: {0}")]
    Transport(std::io::Error),
    /// Nothing answered on its `qga` transport.
    #[error("qga transport {0}: no connection within 30 s")]
    TransportTimeout(Address),
    /// The agent refused the channel, or the session ended.
    #[error("{CLASS}: {0}")]
    Channel(std::io::Error),
    /// The agent did not answer.
    #[error("{CLASS}: no answer within 30 s (is the agent connected?)")]
    ChannelTimeout,
}
