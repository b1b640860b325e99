//! The hid device's descriptor: the guest half's virtual keyboard, mouse and tablet (uinput),
//! and the host half's virtio-input devices (vhost-user, [`super::vhost`]) that reach a guest
//! with no agent.

use std::sync::Arc;

use vstream_link::Mux;

use super::CLASS;
use crate::registry::Device;

#[cfg(feature = "host")]
use {
    super::guest::SharedSink,
    super::vhost::{Injector, InputDevice, InputStatus},
    super::Kind,
    crate::keep::now_secs,
    crate::registry::{
        ControlConn, GuestFacts, HostContext, HostHalf, HostState, RawTransport, SettingsError,
        TransportStatus,
    },
    crate::status::DeviceStatus,
    crate::ServeFuture,
    serde_json::{json, Value},
    std::collections::BTreeMap,
    std::sync::Mutex,
    std::time::Duration,
};
#[cfg(feature = "guest")]
use {
    crate::registry::{GuestHalf, GuestOptions},
    std::path::PathBuf,
};

/// `hid`.
pub struct HidDevice;

/// The virtio-input kind: vstreamd serves the guest's `vhost-user-input` device of the
/// transport's name (`keyboard`, `mouse` or `tablet`) on the `unix-listen:` socket the VMM
/// connects to.
pub const VHOST_KIND: &str = "hid-vhost-user";

/// The control op of `vstreamctl input`: `{"op":"input","guest":G,"kind":"keyboard"}` makes
/// the connection the host end of the hid protocol for that device: vstreamd's own
/// virtio-input device if the guest has one of that kind, else the agent's `hid` channel.
pub const INPUT_OP: &str = "input";

#[cfg(feature = "host")]
/// The device kind of a `hid-vhost-user` transport: its name.
fn vhost_kind(t: &RawTransport) -> Result<Kind, SettingsError> {
    Kind::from_name(&t.name).ok_or_else(|| {
        SettingsError::new(
            CLASS,
            format!(
                "transport {:?} of kind {VHOST_KIND}: its name must be the device, keyboard, mouse or tablet",
                t.name
            ),
        )
    })
}

impl Device for HidDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn raw_kinds(&self) -> &'static [&'static str] {
        &[VHOST_KIND]
    }

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        if s.is_some() {
            return Err(SettingsError::new(CLASS, "this device has no settings"));
        }
        let mut seen = Vec::new();
        for t in guest.map(|g| g.transports.as_slice()).unwrap_or_default() {
            t.vhost_user_socket(CLASS)?;
            let kind = vhost_kind(t)?;
            if seen.contains(&kind) {
                return Err(SettingsError::new(
                    CLASS,
                    format!("two {VHOST_KIND} transports named {kind:?}: one device of each kind"),
                ));
            }
            seen.push(kind);
        }
        Ok(())
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let mut devices = BTreeMap::new();
        let mut transports = Vec::new();
        let mut servers = Vec::new();
        for t in &ctx.transports {
            let kind = vhost_kind(t)?;
            let path = t.vhost_user_socket(CLASS)?;
            let failed = |e: std::io::Error| {
                SettingsError::new(CLASS, format!("transport {:?}: {e}", t.name))
            };
            let (device, injector) = InputDevice::new(kind).map_err(failed)?;
            // Served from now on, one VMM connection after another, on a thread of its own.
            servers.push(
                vstream_vhost::serve(&format!("input-{kind}"), path, device).map_err(failed)?,
            );
            let mut status = TransportStatus::new(&t.kind, t.name.clone(), t.address.to_string());
            status.state = "listening".into();
            status.since = now_secs();
            transports.push(Mutex::new(status));
            let sink: SharedSink = Arc::new(Mutex::new(Box::new(injector.clone())));
            devices.insert(kind, (injector, sink));
        }
        Ok(HostHalf {
            services: Vec::new(),
            tasks: Vec::new(),
            state: Arc::new(HidState {
                mux: ctx.mux.clone(),
                devices,
                transports,
                _servers: servers,
            }),
        })
    }

    crate::registry::status_type!(HidStatus);

    #[cfg(feature = "host")]
    fn control_ops(&self) -> &'static [&'static str] {
        &[INPUT_OP]
    }

    #[cfg(feature = "guest")]
    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(super::guest::Hid::uinput())],
            ..GuestHalf::default()
        }
    }

    #[cfg(feature = "host")]
    crate::registry::verbs_in!(super::verbs);

    #[cfg(feature = "guest")]
    fn agent_tools(&self) -> Vec<clap::Command> {
        use clap::{value_parser, Arg, ArgAction, Command};
        vec![
            Command::new("evtest")
                .hide(true)
                .about("Print the events of an input device (by name or /dev/input path) until N reports")
                .arg(Arg::new("device").required(true).help("Device name (as in /sys/class/input/*/name) or node path"))
                .arg(Arg::new("reports").long("reports").default_value("1000000").value_parser(value_parser!(usize)).help("Stop after this many reports"))
                .arg(Arg::new("timeout").long("timeout").default_value("60").value_parser(value_parser!(u64)).help("Stop after this many seconds"))
                .arg(Arg::new("grab").long("grab").action(ArgAction::SetTrue).help("Grab the device")),
            Command::new("hid-forward")
                .hide(true)
                .about("Forward an evdev device into hid channel streams reached at transport addresses (`--to keyboard=port:NAME`): the forwarding half of `vstreamctl input --forward`")
                .arg(Arg::new("device").required(true).help("The evdev node, or a device name"))
                .arg(Arg::new("grab").long("grab").action(ArgAction::SetTrue).help("Grab the device"))
                .arg(Arg::new("to").long("to").required(true).action(ArgAction::Append).help("KIND=ADDRESS for each guest device kind the source feeds")),
        ]
    }

    #[cfg(feature = "guest")]
    fn run_agent_tool(&self, name: &str, m: &clap::ArgMatches) -> anyhow::Result<()> {
        let device = m.get_one::<String>("device").cloned().unwrap_or_default();
        let grab = m.get_flag("grab");
        match name {
            "evtest" => {
                let mut out = std::io::stdout().lock();
                super::guest::evtest(
                    &device,
                    m.get_one::<usize>("reports").copied().unwrap_or(1_000_000),
                    std::time::Duration::from_secs(
                        m.get_one::<u64>("timeout").copied().unwrap_or(60),
                    ),
                    grab,
                    &mut out,
                )?;
                Ok(())
            }
            _ => {
                let to: Vec<String> = m
                    .get_many::<String>("to")
                    .map(|v| v.cloned().collect())
                    .unwrap_or_default();
                forward_tool(device, grab, to)
            }
        }
    }
}

#[cfg(feature = "guest")]
/// `vstream-agent hid-forward`: forwards an evdev device into streams at transport addresses.
fn forward_tool(device: String, grab: bool, to: Vec<String>) -> anyhow::Result<()> {
    use super::{forward, Kind};
    use vstream_transport::Address;
    let device = if device.starts_with('/') {
        PathBuf::from(&device)
    } else {
        super::guest::find_device(&device)
            .ok_or_else(|| anyhow::anyhow!("no input device named {device:?}"))?
    };
    let mut targets = std::collections::BTreeMap::new();
    for t in &to {
        let (k, a) = t
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--to {t}: expected KIND=ADDRESS"))?;
        let kind = Kind::from_name(k)
            .ok_or_else(|| anyhow::anyhow!("--to {t}: {k:?} is not keyboard, mouse or tablet"))?;
        let addr: Address = a.parse().map_err(|e| anyhow::anyhow!("--to {t}: {e}"))?;
        targets.insert(kind, addr);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let open = |kind: Kind| {
            let addr = targets.get(&kind).cloned();
            async move {
                let addr = addr.ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("the device also feeds the guest {kind}: give --to {kind}=ADDRESS"),
                    )
                })?;
                let mut ep = vstream_transport::Endpoint::bind(addr).await?;
                Ok(ep.next().await?.stream)
            }
        };
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let opts = forward::ForwardOptions {
            grab,
            ..Default::default()
        };
        let stats = forward::forward(&device, &opts, open, stop).await?;
        eprintln!("forwarded: {stats:?}");
        Ok(())
    })
}

/// The hid device's status (`devices.hid` in `vstreamctl status`): vstreamd's own virtio-input
/// devices of the guest, by kind.
#[cfg(feature = "host")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HidStatus {
    /// Each device's counters, by kind name.
    pub virtio_input: BTreeMap<String, InputStatus>,
}

#[cfg(feature = "host")]
impl crate::status::Samples for HidStatus {
    fn samples(&self) -> Vec<crate::status::Sample> {
        use crate::status::Sample;
        self.virtio_input
            .iter()
            .flat_map(|(kind, s)| {
                [
                    Sample::counter(
                        "reports_delivered",
                        "Input reports the guest's driver took.",
                        s.reports_delivered,
                    ),
                    Sample::counter(
                        "reports_refused",
                        "Input reports refused (the queue was full).",
                        s.refused,
                    ),
                    Sample::counter(
                        "bad_chains",
                        "Buffers from the guest's driver returned empty because they were bad.",
                        s.bad_chains,
                    ),
                    Sample::gauge(
                        "queued_events",
                        "Input events waiting for the driver's buffers.",
                        s.queued as f64,
                    ),
                ]
                .map(|sample| sample.label("device", kind.clone()))
            })
            .collect()
    }
}

/// The host half of one guest: its virtio-input devices, if any.
#[cfg(feature = "host")]
struct HidState {
    mux: Mux,
    devices: BTreeMap<Kind, (Injector, SharedSink)>,
    transports: Vec<Mutex<TransportStatus>>,
    /// Served for the guest's life.
    _servers: Vec<vstream_vhost::Server>,
}

#[cfg(feature = "host")]
impl HostState for HidState {
    fn status(&self) -> Option<DeviceStatus> {
        if self.devices.is_empty() {
            return None;
        }
        Some(DeviceStatus::new(HidStatus {
            virtio_input: self
                .devices
                .values()
                .map(|(i, _)| (i.kind().name().to_owned(), i.status()))
                .collect(),
        }))
    }

    fn transports(&self) -> Vec<TransportStatus> {
        self.transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn control(&self, _op: &str, request: Value, mut conn: ControlConn) -> ServeFuture {
        let guest = request["guest"].as_str().unwrap_or("?").to_owned();
        let kind = request["kind"].as_str().and_then(Kind::from_name);
        let vhost = kind
            .and_then(|k| self.devices.get(&k))
            .map(|(_, s)| s.clone());
        let mux = self.mux.clone();
        Box::pin(async move {
            let Some(kind) = kind else {
                let _ = conn
                    .refuse(format!(
                        "{guest}: {:?} is not keyboard, mouse or tablet",
                        request["kind"]
                    ))
                    .await;
                return;
            };
            if let Some(sink) = vhost {
                // vstreamd's own virtio-input device: the guest's driver is the peer.
                if conn.reply(json!({ "via": VHOST_KIND })).await.is_ok() {
                    let mut stream = conn.into_stream();
                    if let Err(e) = super::guest::serve_stream(kind, &sink, &mut stream).await {
                        tracing::info!(%guest, %kind, "virtio-input injection ended: {e}");
                    }
                }
                return;
            }
            // The agent's uinput device, over its hid channel (carried across live upgrades).
            let opened =
                tokio::time::timeout(Duration::from_secs(30), mux.open(CLASS, kind.name())).await;
            match opened {
                Ok(Ok(chan)) => {
                    if conn.reply(json!({ "via": "agent" })).await.is_ok() {
                        let _ = conn.bridge(chan).await;
                    }
                }
                Ok(Err(e)) => {
                    let _ = conn.refuse(format!("{guest}: {CLASS}/{kind}: {e}")).await;
                }
                Err(_) => {
                    let _ = conn
                        .refuse(format!(
                            "{guest}: {CLASS}/{kind}: no answer from the guest's agent within 30 s, and vstreamd serves no virtio-input {kind} for it"
                        ))
                        .await;
                }
            }
        })
    }
}
