//! vstream-agent: runs in the guest (or on any Linux host for tests and containers).

use std::path::PathBuf;

use clap::Parser;
use vstream_agent::{from_kernel_cmdline, AgentOptions, Settings};
use vstream_devices::random::guest::FeedSettings;
use vstream_devices::watchdog::guest::GuestSettings;
use vstream_devices::watchdog::parse_duration;
use vstream_transport::Address;

/// The vstream guest agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A transport to the host (repeatable; the first is preferred), e.g. port:org.vstream.0,
    /// serial:/dev/ttyS4,baud=115200, vsock:2:5000. Without any, read vstream.connect= from
    /// the kernel command line.
    #[arg(long)]
    connect: Vec<Address>,
    /// The guest name announced to the host (default: vstream.name= or the host name).
    #[arg(long)]
    name: Option<String>,
    /// Also serve the QEMU guest agent protocol here, for existing QGA clients, e.g.
    /// port:org.qemu.guest_agent.0 (default: vstream.qga= when settings come from the kernel
    /// command line).
    #[arg(long)]
    qga: Option<Address>,
    /// Accept raw print jobs here (repeatable), e.g. tcp-listen:127.0.0.1:9100,
    /// unix-listen:/run/vstream/printer.sock (default: vstream.printer= on the kernel command
    /// line, else those two).
    #[arg(long)]
    printer: Vec<Address>,
    /// Do not accept print jobs.
    #[arg(long, conflicts_with = "printer")]
    no_printer: bool,
    /// The PPP link: `on` (pppd on a `ppp` channel), `off`, or a transport such as
    /// port:org.vstream.ppp (default: vstream.ppp= on the kernel command line, else `on` if
    /// /usr/sbin/pppd exists).
    #[arg(long)]
    ppp: Option<vstream_devices::ppp::guest::Mode>,
    /// The guest's key, for TCP links: a file of at least 16 bytes that vstreamd's config also
    /// names (`key_file`); proven in a handshake, never sent (also `vstream.key_file=`).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Do not feed the kernel's entropy pool from the host (also `vstream.random=0`).
    #[arg(long)]
    no_random: bool,
    /// Send watchdog heartbeats this often, e.g. 500ms, 2s (also `vstream.watchdog=`).
    #[arg(long, value_parser = parse_interval)]
    watchdog_interval: Option<std::time::Duration>,
    /// Health check run by `sh -c` before each heartbeat: no heartbeat unless it exits 0 within
    /// the interval.
    #[arg(long, requires = "watchdog_interval")]
    watchdog_check: Option<String>,
    /// Kernel command line to read settings from.
    #[arg(long, default_value = "/proc/cmdline", hide = true)]
    cmdline: PathBuf,
    #[command(subcommand)]
    tool: Option<Tool>,
}

/// Helpers for tests and diagnosis (hidden).
#[derive(clap::Subcommand, Debug)]
enum Tool {
    /// Print the events of an input device (by name or /dev/input path) until N reports.
    #[command(hide = true)]
    Evtest {
        /// Device name (as in /sys/class/input/*/name) or node path.
        device: String,
        /// Stop after this many reports.
        #[arg(long, default_value = "1000000")]
        reports: usize,
        /// Stop after this many seconds.
        #[arg(long, default_value = "60")]
        timeout: u64,
        /// Grab the device.
        #[arg(long)]
        grab: bool,
    },
    /// Forward an evdev device into hid channel streams reached at transport addresses
    /// (`--to keyboard=port:NAME`): the forwarding half of `vstreamctl input --forward`.
    #[command(hide = true)]
    HidForward {
        /// The evdev node, or a device name.
        device: String,
        /// Grab the device.
        #[arg(long)]
        grab: bool,
        /// KIND=ADDRESS for each guest device kind the source feeds.
        #[arg(long, required = true)]
        to: Vec<String>,
    },
}

fn run_tool(tool: Tool) -> anyhow::Result<()> {
    use vstream_devices::hid::{self, forward};
    match tool {
        Tool::Evtest {
            device,
            reports,
            timeout,
            grab,
        } => {
            let mut out = std::io::stdout().lock();
            hid::guest::evtest(
                &device,
                reports,
                std::time::Duration::from_secs(timeout),
                grab,
                &mut out,
            )?;
            Ok(())
        }
        Tool::HidForward { device, grab, to } => {
            let device = if device.starts_with('/') {
                PathBuf::from(&device)
            } else {
                hid::guest::find_device(&device)
                    .ok_or_else(|| anyhow::anyhow!("no input device named {device:?}"))?
            };
            let mut targets = std::collections::BTreeMap::new();
            for t in &to {
                let (k, a) = t
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--to {t}: expected KIND=ADDRESS"))?;
                let kind = hid::Kind::from_name(k).ok_or_else(|| {
                    anyhow::anyhow!("--to {t}: {k:?} is not keyboard, mouse or tablet")
                })?;
                let addr: Address = a.parse().map_err(|e| anyhow::anyhow!("--to {t}: {e}"))?;
                targets.insert(kind, addr);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let open = |kind: hid::Kind| {
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
    }
}

fn main() -> anyhow::Result<()> {
    // A guest agent should give memory back once a burst is over (a 16 MiB `guest-file-read`
    // reply, a big exec capture).
    vstream_link::return_memory_eagerly();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSTREAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    if let Some(tool) = args.tool.take() {
        return run_tool(tool);
    }
    let mut settings = Settings {
        connect: args.connect.clone(),
        name: args.name.clone(),
        qga: args.qga.clone(),
        random: args.no_random.then_some(false),
        watchdog_interval: args.watchdog_interval,
        key_file: args.key_file.clone(),
    };
    if settings.connect.is_empty() && settings.qga.is_none() {
        let text = std::fs::read_to_string(&args.cmdline).map_err(|e| {
            anyhow::anyhow!(
                "no --connect given and cannot read {}: {e}",
                args.cmdline.display()
            )
        })?;
        let k = from_kernel_cmdline(&text).map_err(anyhow::Error::msg)?;
        settings.connect = k.connect;
        settings.name = settings.name.or(k.name);
        settings.qga = k.qga;
        settings.random = settings.random.or(k.random);
        settings.watchdog_interval = settings.watchdog_interval.or(k.watchdog_interval);
        settings.key_file = settings.key_file.or(k.key_file);
    }
    let key = match &settings.key_file {
        Some(path) => Some(vstream_link::auth::read_key_file(path)?),
        None => None,
    };
    if settings.connect.is_empty() && settings.qga.is_none() {
        anyhow::bail!("nothing to connect to: give --connect ADDR (or --qga ADDR) or vstream.connect= on the kernel command line");
    }
    let printer = if args.no_printer {
        Vec::new()
    } else if !args.printer.is_empty() {
        args.printer.clone()
    } else {
        let text = std::fs::read_to_string(&args.cmdline).unwrap_or_default();
        vstream_agent::printer_listeners(&text)
            .map_err(anyhow::Error::msg)?
            .unwrap_or_else(vstream_devices::printer::guest::default_listeners)
    };
    let ppp = match args.ppp.clone() {
        Some(mode) => mode,
        None => {
            use vstream_devices::ppp::guest::{Mode, Settings as PppSettings};
            let text = std::fs::read_to_string(&args.cmdline).unwrap_or_default();
            let has_pppd = PppSettings::new(Mode::Channel).pppd.exists();
            vstream_agent::ppp_mode(&text)
                .map_err(anyhow::Error::msg)?
                .unwrap_or(if has_pppd { Mode::Channel } else { Mode::Off })
        }
    };
    let name = settings.name.unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async move {
            let options = AgentOptions {
                random: (settings.random != Some(false)).then(FeedSettings::default),
                watchdog: settings.watchdog_interval.map(|interval| GuestSettings {
                    interval,
                    check: args.watchdog_check.clone(),
                }),
                key,
            };
            let mut agent = vstream_agent::Agent::start_with(&name, settings.connect, options);
            if let Some(qga) = settings.qga {
                agent.serve_qga(qga);
            }
            for address in printer {
                agent.serve_printer(address);
            }
            agent.serve_ppp(vstream_devices::ppp::guest::Settings::new(ppp));
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("vstream-agent stopping");
            agent.shutdown("vstream-agent stopped by a signal").await;
            Ok(())
        })
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("the interval must not be 0".into());
    }
    Ok(d)
}
