//! vstreamd: the host daemon.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use vstream_host::config::Config;
use vstream_host::daemon::Daemon;
use vstream_transport::Address;

/// The vstream host daemon: sessions with guests' agents, consoles, devices.
#[derive(Parser, Debug)]
#[command(name = "vstreamd", version)]
struct Args {
    /// Control socket for vstreamctl (mode 0600; 0660 with `[daemon] control_read_group`).
    /// Unused when systemd passes the socket (vstreamd.socket, LISTEN_FDS). Default: `[daemon]
    /// control` in the config, else /run/vstream/control.sock.
    #[arg(long, env = "VSTREAM_CONTROL")]
    control: Option<PathBuf>,
    /// A shared listener for the agents of many guests (repeatable), e.g. vsock-listen:5000.
    /// Which guest a connection is comes from what its transport proves: the CID on vsock, the
    /// peer's uid/gid on Unix sockets, the key handshake on TCP (docs/THREAT-MODEL.md).
    #[arg(long)]
    listen: Vec<Address>,
    /// Also accept guests that are not in the config, by the name they announce (as
    /// `[daemon.announced] allow = true`): each name is owned by the uid or CID that announced
    /// it first.
    #[arg(long)]
    allow_announced: bool,
    /// TOML configuration (see docs/vstreamd.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where console logs and spools go.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve the web console (guests, consoles in xterm.js, events) at ADDR: HOST:PORT (keep
    /// it on loopback: plain HTTP) or a Unix socket path. Access needs `vstreamctl web-token`.
    /// Default: `[daemon] http` in the config, else no web console.
    #[arg(long, value_name = "ADDR")]
    http: Option<vstream_host::web::HttpAddr>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464; docs/METRICS.md).
    /// Default: `[daemon] metrics` in the config, else none.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Print a shell completion script and exit.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Write the man page (vstreamd.1) into DIR and exit.
    #[arg(long, value_name = "DIR", exclusive = true)]
    man: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    // What a guest made us allocate must be given back when it is freed (see docs/THREAT-MODEL.md).
    vstream_link::return_memory_eagerly(2);
    let args = Args::parse();
    if let Some(shell) = args.completions {
        let mut out = std::io::stdout();
        clap_complete::generate(shell, &mut Args::command(), "vstreamd", &mut out);
        return Ok(());
    }
    if let Some(dir) = &args.man {
        return clap_mangen::generate_to(Args::command(), dir)
            .map_err(|e| anyhow::anyhow!("writing the man page to {}: {e}", dir.display()));
    }
    // Colours in the log only on a terminal (not in a log file or the journal), and never with
    // NO_COLOR set (no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSTREAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();
    // Before the runtime's threads exist: these take variables out of the environment.
    let activated = vstream_host::systemd::control_listener();
    let notifier = vstream_host::systemd::Notifier::from_env();
    let service_watchdog = vstream_host::systemd::watchdog_period();
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    cfg.daemon.announced.allow |= args.allow_announced;
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| cfg.daemon.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/vstream"));
    let control_path = args
        .control
        .clone()
        .or_else(|| cfg.daemon.control.clone())
        .unwrap_or_else(|| PathBuf::from(vstream_host::DEFAULT_CONTROL));
    let http = args.http.clone().or_else(|| cfg.daemon.http.clone());
    let metrics = args.metrics.or(cfg.daemon.metrics);
    let mut listen = cfg.daemon.listen.clone();
    listen.extend(args.listen.iter().cloned());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            // Before anything is served: a SIGHUP must never find the default action (exit).
            let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            let daemon = Daemon::start(&cfg, state_dir).await?;
            for address in listen {
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = d.listen(address.clone()).await {
                        tracing::error!(%address, "cannot accept agents: {e}");
                    }
                });
            }
            if let Some(addr) = http {
                let web = vstream_host::web::bind(&daemon, &addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("--http {addr:?}: {e}"))?;
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = vstream_host::web::serve(d, web).await {
                        tracing::error!("--http: {e}");
                    }
                });
            }
            if let Some(addr) = metrics {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("metrics on {addr}: {e}"))?;
                tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = vstream_host::metrics::serve(d, listener).await {
                        tracing::error!("metrics: {e}");
                    }
                });
            }
            let activated = match activated {
                Some(listener) => {
                    tracing::info!("control socket passed by systemd");
                    listener.set_nonblocking(true)?;
                    Some(tokio::net::UnixListener::from_std(listener)?)
                }
                None => None,
            };
            let listener = daemon
                .control_listener(activated, &control_path)
                .map_err(|e| anyhow::anyhow!("control socket {}: {e}", control_path.display()))?;
            if let Some(notifier) = notifier {
                tokio::spawn(vstream_host::systemd::report(notifier, daemon.clone(), service_watchdog));
            }
            let control = daemon.clone().serve_control_on(listener);
            tokio::select! {
                r = control => r.map_err(|e| anyhow::anyhow!("control socket {}: {e}", control_path.display())),
                _ = tokio::signal::ctrl_c() => Ok(()),
                _ = sigterm() => Ok(()),
                () = upgrade_on_hangup(daemon.clone(), hangups.ok()) => Ok(()),
            }
        })
}

/// Every guest holds descriptors (its transports' listeners and connections, console logs):
/// the usual soft limit of 1024 would stop a daemon at a few hundred guests, so take the hard
/// limit, as servers do.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the open-file limit: {e}");
        }
    }
}

/// SIGHUP (what `systemctl reload` sends with `ExecReload=/bin/kill -HUP $MAINPID`): a live
/// upgrade to the binary at the path vstreamd was started from. A failed one is logged and
/// this daemon goes on.
async fn upgrade_on_hangup(
    daemon: std::sync::Arc<Daemon>,
    hangups: Option<tokio::signal::unix::Signal>,
) {
    let Some(mut hangups) = hangups else {
        return std::future::pending().await;
    };
    while hangups.recv().await.is_some() {
        let Err(_logged) = daemon.upgrade(None, None).await;
    }
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
