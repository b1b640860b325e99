//! vstream-agent: runs in the guest (or on any Linux host for tests and containers).

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use vstream_agent::{from_kernel_cmdline, AgentOptions, Settings};
use vstream_devices::registry::{registry, AgentArgs, GuestOptions};
use vstream_transport::Address;

/// The vstream guest agent. Each device adds its own options (and hidden helper subcommands)
/// from the registry.
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
    /// The guest's key, for TCP links: a file of at least 16 bytes that vstreamd's config also
    /// names (`key_file`); proven in a handshake, never sent (also `vstream.key_file=`).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Kernel command line to read settings from.
    #[arg(long, default_value = "/proc/cmdline", hide = true)]
    cmdline: PathBuf,
}

/// How long an idle spawn_blocking thread waits for more work before it exits (tokio's default
/// is 10 s): a burst of QGA requests reuses it, an idle agent keeps no such thread.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the agent hands the kernel back the heap pages freed since: what a burst
/// allocated (frame buffers the session keeps for a few seconds, a `guest-file-read` reply)
/// is freed among longer-lived allocations, where glibc's own trimming (the top of the heap
/// only) does not reach it. Rare enough to cost an idle agent nothing it would notice.
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Gives freed heap memory back every [`TRIM_INTERVAL`].
async fn trim_freed_memory() {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        vstream_link::release_freed_memory();
    }
}

/// The agent's command line: its own options, and each device's.
fn command() -> clap::Command {
    registry().iter().fold(Args::command(), |cmd, d| {
        cmd.args(d.agent_args()).subcommands(d.agent_tools())
    })
}

fn main() -> anyhow::Result<()> {
    // A guest agent should give memory back once a burst is over (a 16 MiB `guest-file-read`
    // reply, a big exec capture). One arena: the runtime has one thread, and the few others
    // (a QGA port's, the blocking pool's) seldom allocate at the same time; a second arena kept
    // about 130 KiB more resident.
    vstream_link::return_memory_eagerly(1);
    // Nor keep a 2 MiB huge page for a few KiB of heap (the guest's THP setting may be
    // `always`); the programs it starts get THP back. A kernel without the switch (before 3.15)
    // leaves things as they were, which is no reason not to run.
    let _ = vstream_devices::spawn::keep_huge_pages_out();
    // VSTREAM_LOG as `target=level,...,level` (what vstreamd's filter takes, without its span
    // and field filters): their regex engine would double the agent's logging code.
    let filter = std::env::var("VSTREAM_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let matches = command().get_matches();
    if let Some((tool, m)) = matches.subcommand() {
        let device = registry()
            .owner_of_tool(tool)
            .ok_or_else(|| anyhow::anyhow!("no tool {tool:?}"))?;
        return device.run_agent_tool(tool, m);
    }
    let args = Args::from_arg_matches(&matches)?;
    let mut settings = Settings {
        connect: args.connect.clone(),
        name: args.name.clone(),
        key_file: args.key_file.clone(),
    };
    // Settings come from the kernel command line when the command line gives nothing to serve:
    // no --connect, and no device transport of its own (such as --qga).
    let options = |cmdline: &str, from_kernel: bool| -> anyhow::Result<GuestOptions> {
        let mut devices = GuestOptions::default();
        let device_args = AgentArgs {
            matches: &matches,
            cmdline,
            from_kernel,
        };
        for d in registry().iter() {
            d.agent_options(&device_args, &mut devices)?;
        }
        Ok(devices)
    };
    let standalone =
        |devices: &GuestOptions| registry().iter().any(|d| d.serves_without_connect(devices));
    let from_kernel = settings.connect.is_empty() && !standalone(&options("", false)?);
    let cmdline = std::fs::read_to_string(&args.cmdline);
    if from_kernel {
        let text = cmdline.as_ref().map_err(|e| {
            anyhow::anyhow!(
                "no --connect given and cannot read {}: {e}",
                args.cmdline.display()
            )
        })?;
        let k = from_kernel_cmdline(text).map_err(anyhow::Error::msg)?;
        settings.connect = k.connect;
        settings.name = settings.name.or(k.name);
        settings.key_file = settings.key_file.or(k.key_file);
    }
    // Devices read the kernel command line too (their `vstream.KEY=` words).
    let devices = options(cmdline.as_deref().unwrap_or_default(), from_kernel)?;
    for d in registry().iter() {
        if d.agent_prepare(&devices)?.is_break() {
            return Ok(());
        }
    }
    let key = match &settings.key_file {
        Some(path) => Some(vstream_link::auth::read_key_file(path)?),
        None => None,
    };
    if settings.connect.is_empty() && !standalone(&devices) {
        anyhow::bail!("nothing to connect to: give --connect ADDR (or a device's own transport) or vstream.connect= on the kernel command line");
    }
    let name = settings.name.unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    });
    // One thread runs every task: a guest often has one vCPU, where a second worker only adds
    // hand-offs between threads (a futex wake-up and a context switch each), and a stack and
    // an allocator arena of its own. No device needs a second one: blocking work goes to
    // spawn_blocking's threads, started on demand and gone soon after.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()?
        .block_on(async move {
            let options = AgentOptions { devices, key };
            let agent = vstream_agent::Agent::start_with(&name, settings.connect, options);
            tokio::spawn(trim_freed_memory());
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
