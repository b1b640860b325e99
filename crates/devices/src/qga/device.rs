//! The qga device's descriptor: the guest half's QEMU guest agent (on `qga` channels, and on a
//! raw transport with `--qga`), the host half's `agent` control op (to a `qga` transport with a
//! real qemu-ga behind it if the guest has one, else to a `qga` channel of vstream-agent).

use std::sync::Arc;
#[cfg(feature = "host")]
use std::time::Duration;

#[cfg(feature = "host")]
use serde_json::Value;
use vstream_link::Mux;
use vstream_transport::Address;
#[cfg(feature = "host")]
use vstream_transport::{BoxStream, Endpoint};

#[cfg(feature = "guest")]
use super::guest::{serve_address, GuestAgent, QgaService};
use super::CLASS;
#[cfg(feature = "guest")]
use crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions};
#[cfg(feature = "host")]
use crate::registry::{ControlConn, GuestFacts, HostContext, HostHalf, HostState};
use crate::registry::{Device, SettingsError};
use crate::ServeFuture;

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
        vec![clap::Arg::new("qga")
                .value_name("QGA")
            .long("qga")
            .value_parser(|s: &str| s.parse::<Address>())
            .help("Also serve the QEMU guest agent protocol here, for existing QGA clients, e.g. port:org.qemu.guest_agent.0 (default: vstream.qga= when settings come from the kernel command line)")]
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
    fn guest(&self, _mux: &Mux, options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(QgaService::global())],
            tasks: options
                .get::<RawPort>(CLASS)
                .map(|p| -> ServeFuture {
                    Box::pin(serve_address(GuestAgent::global(), p.0.clone()))
                })
                .into_iter()
                .collect(),
            on_stop: None,
        }
    }
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
                            QgaStream::Raw(stream) => {
                                crate::registry::pipe(conn.into_stream(), stream).await
                            }
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
