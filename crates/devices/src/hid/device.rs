//! The hid device's descriptor: the guest half's virtual keyboard, mouse and tablet (uinput).

#[cfg(feature = "guest")]
use std::path::PathBuf;
#[cfg(feature = "guest")]
use std::sync::Arc;

#[cfg(feature = "guest")]
use vstream_link::Mux;

use super::CLASS;
use crate::registry::Device;
#[cfg(feature = "guest")]
use crate::registry::{GuestHalf, GuestOptions};

/// `hid`.
pub struct HidDevice;

impl Device for HidDevice {
    fn class(&self) -> &'static str {
        CLASS
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
