//! vstream-agent: runs in the guest (or on any Linux host for tests and containers).

use std::path::PathBuf;

use clap::Parser;
use vstream_agent::{from_kernel_cmdline, Settings};
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
    /// Kernel command line to read settings from.
    #[arg(long, default_value = "/proc/cmdline", hide = true)]
    cmdline: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSTREAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut settings = Settings {
        connect: args.connect.clone(),
        name: args.name.clone(),
    };
    if settings.connect.is_empty() {
        let text = std::fs::read_to_string(&args.cmdline).map_err(|e| {
            anyhow::anyhow!(
                "no --connect given and cannot read {}: {e}",
                args.cmdline.display()
            )
        })?;
        let k = from_kernel_cmdline(&text).map_err(anyhow::Error::msg)?;
        settings.connect = k.connect;
        settings.name = settings.name.or(k.name);
    }
    if settings.connect.is_empty() {
        anyhow::bail!("nothing to connect to: give --connect ADDR or vstream.connect= on the kernel command line");
    }
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
            let agent = vstream_agent::Agent::start(&name, settings.connect);
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("vstream-agent stopping");
            drop(agent);
            Ok(())
        })
}
