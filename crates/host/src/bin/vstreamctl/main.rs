//! vstreamctl: the command line of vstreamd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vstream_devices::registry::{registry, BoxFuture, Control, Unreachable, VerbContext};
use vstream_host::control::{read_reply, write_line, Reply, Request};

mod status;
use vstream_transport::BoxStream;

/// Exit codes, in `--help` and the man page; README.md repeats them.
const EXIT_CODES: &str = "\
Exit status:
  0        success
  1        an error (vstreamd unreachable, unknown guest, refused request, ...)
  2        usage error (bad arguments)
  exec, shell:
    N      the remote command's status (128+N if signal N killed it)
    128+N  vstreamctl itself ended by signal N (SIGHUP, SIGINT, SIGQUIT, SIGTERM);
           141 if its output was closed
    255    the session failed, e.g. vstreamd went away (the reason is on stderr)";

/// Talk to vstreamd: status, consoles, channels, events.
#[derive(Parser, Debug)]
#[command(name = "vstreamctl", version, after_help = EXIT_CODES)]
struct Args {
    /// vstreamd's control socket.
    #[arg(long, env = "VSTREAM_CONTROL", default_value = vstream_host::DEFAULT_CONTROL)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Every guest on one line each (state, transports, bytes, channels, errors), or one
    /// guest in detail: its transports (up/down, since when), devices and channels.
    Status {
        /// Only this guest, in detail.
        guest: Option<String>,
        /// Machine-readable output: `{"guests":[...]}` (one guest per line), or with GUEST
        /// that guest's object.
        #[arg(long)]
        json: bool,
    },
    /// Open a channel to a guest service and connect it to stdin/stdout.
    Open {
        /// Guest name.
        guest: String,
        /// Device class.
        class: String,
        /// Name within the class.
        #[arg(default_value = "")]
        name: String,
    },
    /// Stream lifecycle events (agent and transport up/down, resets, errors).
    Events {
        /// Only this guest's.
        guest: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print a token for the web console (`vstreamd --http`): open
    /// http://ADDR/?token=TOKEN once, the page keeps it in a cookie. The owner's token may
    /// type; a member of the read-only group gets one that may only watch.
    WebToken {
        /// A token that may only watch (to hand to someone who should not type).
        #[arg(long)]
        read_only: bool,
    },
    /// vstreamd itself.
    Daemon {
        #[command(subcommand)]
        cmd: DaemonCmd,
    },
    /// libvirt's hook for vstreamd (/etc/libvirt/hooks/qemu.d/vstream runs it with libvirt's
    /// arguments and the domain XML on stdin): when a domain with an `org.vstream.0` channel or
    /// Unix-socket consoles has started, vstreamd attaches to them as guest DOMAIN; when it
    /// has stopped, vstreamd lets go. Does nothing (exit status 0) if vstreamd is not running.
    #[command(name = "libvirt-hook")]
    LibvirtHook {
        /// The domain's name.
        domain: String,
        /// libvirt's operation (`started`, `stopped`, ...; others are ignored).
        operation: String,
        /// libvirt's sub-operation and extra argument (ignored).
        #[arg(num_args = 0..=2)]
        rest: Vec<String>,
    },
    /// Print a shell completion script, e.g. `vstreamctl completions bash >
    /// /etc/bash_completion.d/vstreamctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for vstreamctl and each of its subcommands (vstreamctl.1,
    /// vstreamctl-status.1, ...) into DIR.
    Man {
        /// Where the pages go.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DaemonCmd {
    /// Live upgrade: vstreamd execs BINARY (default: the path it was started from, so a
    /// binary replaced on disk is the new version) and hands it the guests' sessions, the
    /// control socket and the running shells, copies and `open` channels, which go on after a
    /// pause. Waits for the new daemon and prints its pid (the same: it runs in place),
    /// version and generation. If the new binary cannot start, the old daemon goes on and
    /// this fails with the reason. `systemctl reload` does the same with SIGHUP.
    Upgrade {
        /// The binary to run instead of the one vstreamd was started from.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

/// `vstreamctl daemon upgrade`: the reply comes from the successor, on the same connection.
async fn upgrade(control: &PathBuf, binary: Option<PathBuf>) -> anyhow::Result<()> {
    // The daemon may run in another directory.
    let binary = binary
        .map(|b| std::path::absolute(&b).with_context(|| format!("{}", b.display())))
        .transpose()?;
    let started = std::time::Instant::now();
    let (_, _, reply) = request(control, &Request::Upgrade { binary }).await?;
    let d = reply
        .daemon
        .context("vstreamd's reply does not say which daemon it is")?;
    vstream_devices::outln!(
        "vstreamd upgraded: pid {}, version {}, generation {} ({} ms)",
        d.pid,
        d.version,
        d.generation,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// `vstreamctl libvirt-hook DOMAIN OPERATION ...`, with the domain XML on stdin.
async fn libvirt_hook(control: &PathBuf, domain: &str, operation: &str) -> anyhow::Result<()> {
    use std::io::Read;
    use vstream_host::libvirt::{Action, Domain, MAX_XML};
    let action = Action::of(operation);
    if action == Action::Nothing {
        return Ok(());
    }
    let mut xml = String::new();
    std::io::stdin()
        .take(MAX_XML)
        .read_to_string(&mut xml)
        .context("reading the domain XML on stdin")?;
    let d = Domain::parse(&xml).map_err(anyhow::Error::msg)?;
    if d.name != domain {
        bail!("the domain XML is {:?}'s, not {domain:?}'s", d.name);
    }
    if !d.wanted() {
        return Ok(());
    }
    // libvirtd logs a hook's stderr.
    for why in &d.skipped {
        eprintln!("vstreamctl libvirt-hook: {domain}: not attached: {why}");
    }
    let req = match action {
        Action::Attach => d.attach(),
        _ => Request::Detach {
            guest: domain.to_owned(),
        },
    };
    match request(control, &req).await {
        // No vstreamd (none installed, or stopped and its socket left behind): the domain
        // goes on without it.
        Err(e)
            if e.root_cause()
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    )
                }) =>
        {
            eprintln!(
                "vstreamctl libvirt-hook: {domain}: vstreamd is not running ({}: {})",
                control.display(),
                e.root_cause()
            );
        }
        r => {
            r?;
        }
    }
    Ok(())
}

/// vstreamctl's command line: its own verbs, and each device's (`Device::verbs`).
fn command() -> clap::Command {
    // In --help: vstreamctl's own verbs, the devices' in registry order, then the helpers.
    let verbs = registry().iter().flat_map(|d| d.verbs());
    let cmd = Args::command().subcommands(verbs.enumerate().map(|(i, v)| v.display_order(10 + i)));
    ["libvirt-hook", "completions", "man"]
        .into_iter()
        .fold(cmd, |cmd, name| {
            cmd.mut_subcommand(name, |c| c.display_order(1000))
        })
}

fn main() {
    let matches = command().get_matches();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vstreamctl: {e}");
            std::process::exit(1);
        }
    };
    let device = matches
        .subcommand_name()
        .and_then(|verb| registry().owner_of_verb(verb));
    let result = match device {
        Some(device) => {
            let path = matches
                .get_one::<PathBuf>("control")
                .cloned()
                .unwrap_or_else(|| vstream_host::DEFAULT_CONTROL.into());
            let control = Ctl {
                before: daemon_id(&path),
                path,
            };
            let ctx = VerbContext {
                matches: &matches,
                control: &control,
            };
            // Exits here: the runtime's blocking stdin reader cannot be cancelled.
            rt.block_on(device.run_verb(ctx))
                .map(|status| std::process::exit(status))
        }
        None => match Args::from_arg_matches(&matches) {
            Ok(args) => rt.block_on(run(args)),
            Err(e) => e.exit(),
        },
    };
    if let Err(e) = result {
        eprintln!("vstreamctl: {e:#}");
        std::process::exit(1);
    }
}

/// A device verb's way to vstreamd.
struct Ctl {
    path: PathBuf,
    /// Which vstreamd served the socket when the command started.
    before: Option<(u64, u64)>,
}

impl Control for Ctl {
    fn call(&self, request: Value) -> BoxFuture<'_, anyhow::Result<(Value, BoxStream)>> {
        Box::pin(async move {
            let (r, w, reply) = self::request(&self.path, &request).await?;
            let stream: BoxStream = Box::new(tokio::io::join(r, w));
            Ok((serde_json::to_value(reply)?, stream))
        })
    }

    fn lost(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(daemon_lost(&self.path, self.before))
    }
}

async fn request<T: serde::Serialize>(
    control: &PathBuf,
    req: &T,
) -> anyhow::Result<(
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
    Reply,
)> {
    let stream = UnixStream::connect(control)
        .await
        .with_context(|| Unreachable(control.clone()))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    write_line(&mut w, req).await?;
    let reply: Reply = read_reply(&mut r)
        .await
        .context("reading vstreamd's reply")?;
    if !reply.ok {
        bail!(
            "{}",
            reply.error.unwrap_or_else(|| "request refused".into())
        );
    }
    Ok((r, w, reply))
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Status { guest, json } => match status::status(&args.control, guest, json).await {
            // `vstreamctl status | head`: the reader has all it wanted.
            Err(e)
                if e.downcast_ref::<std::io::Error>().map(std::io::Error::kind)
                    == Some(std::io::ErrorKind::BrokenPipe) =>
            {
                Ok(())
            }
            r => r,
        },
        Cmd::Open { guest, class, name } => {
            let (r, mut w, _) =
                request(&args.control, &Request::Open { guest, class, name }).await?;
            let up = async {
                tokio::io::copy(&mut tokio::io::stdin(), &mut w).await?;
                w.shutdown().await
            };
            let (a, b) = tokio::join!(up, copy_out(r));
            a?;
            b
        }
        Cmd::Events { guest, json } => {
            let (mut r, _w, _) = request(&args.control, &Request::Events { guest }).await?;
            loop {
                let ev: Value = read_reply(&mut r).await?;
                if json {
                    vstream_devices::outln!("{ev}");
                } else {
                    vstream_devices::outln!("{}", render_event(&ev));
                }
            }
        }
        Cmd::WebToken { read_only } => {
            let (_, _, reply) = request(&args.control, &Request::WebToken { read_only }).await?;
            let token = reply.token.context("vstreamd's reply has no token")?;
            vstream_devices::outln!("{token}");
            Ok(())
        }
        Cmd::Daemon {
            cmd: DaemonCmd::Upgrade { binary },
        } => upgrade(&args.control, binary).await,
        Cmd::LibvirtHook {
            domain, operation, ..
        } => libvirt_hook(&args.control, &domain, &operation).await,
        Cmd::Completions { shell } => {
            // Into memory first: clap_complete panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command(), "vstreamctl", &mut script);
            vstream_devices::cli::out(format_args!("{}", String::from_utf8_lossy(&script)));
            Ok(())
        }
        Cmd::Man { dir } => clap_mangen::generate_to(command(), &dir)
            .with_context(|| format!("writing man pages to {}", dir.display())),
    }
}

/// Which vstreamd serves `control`: each one binds a new socket file, so a restarted daemon's
/// socket has another inode.
fn daemon_id(control: &PathBuf) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(control).ok().map(|m| (m.dev(), m.ino()))
}

/// After a failure: why, if vstreamd stopped or was replaced since it was `before` (whatever it
/// carried for this command, a guest channel included, is gone with it).
async fn daemon_lost(control: &PathBuf, before: Option<(u64, u64)>) -> Option<String> {
    // A request, not just a connect: a dying daemon's listening socket may still take a
    // connection that nobody will ever accept.
    let probe = request(control, &Request::Status { guest: None });
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Err(_) => Some(format!(
            "vstreamd at {} stopped answering during the command",
            control.display()
        )),
        Ok(Err(e)) => Some(format!(
            "vstreamd stopped during the command ({}: {})",
            control.display(),
            e.root_cause()
        )),
        Ok(Ok(_)) if daemon_id(control) != before => {
            Some("vstreamd restarted during the command; its channel to the guest is lost".into())
        }
        Ok(Ok(_)) => None,
    }
}

async fn copy_out<R: AsyncRead + Unpin>(mut r: R) -> anyhow::Result<()> {
    let mut out = tokio::io::stdout();
    tokio::io::copy(&mut r, &mut out).await?;
    out.flush().await?;
    Ok(())
}

fn render_event(ev: &Value) -> String {
    let mut rest = ev.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("event");
        o.remove("guest");
        o.remove("time");
        o.remove("time_ms");
    }
    format!(
        "{} {} {}",
        ev["guest"].as_str().unwrap_or("-"),
        ev["event"].as_str().unwrap_or("?"),
        rest
    )
}
