//! vstreamctl: the command line of vstreamd.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vstream_devices::cli::{bytes, table, Align};
use vstream_devices::registry::{registry, BoxFuture, Control, Unreachable, VerbContext};
use vstream_host::control::{read_reply, write_line, Reply, Request};
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

/// vstreamctl's command line: its own verbs, and each device's (`Device::verbs`).
fn command() -> clap::Command {
    registry()
        .iter()
        .fold(Args::command(), |cmd, d| cmd.subcommands(d.verbs()))
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
        Cmd::Status { guest, json } => match status(&args.control, guest, json).await {
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
                    println!("{ev}");
                } else {
                    println!("{}", render_event(&ev));
                }
            }
        }
        Cmd::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(shell, &mut command(), "vstreamctl", &mut out);
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

fn ago(since: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(since);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// `vstreamctl status [GUEST] [--json]`: JSON is printed as the guests arrive, the table once
/// all are in.
async fn status(control: &PathBuf, guest: Option<String>, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let one = guest.is_some();
    let (mut r, _w, reply) = request(control, &Request::Status { guest }).await?;
    let count = reply.guests.unwrap_or(0);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let refused = reply.refused_unknown.unwrap_or_default();
    // The table is printed whole, once every row is in: its columns fit the widest cell.
    let mut rows = vec![GUEST_ROW_HEADER.map(String::from).to_vec()];
    if json && !one {
        writeln!(out, "{{\"refused_unknown\": {refused},")?;
        writeln!(out, "\"guests\": [")?;
    } else if !json && !one && count == 0 {
        writeln!(out, "no guests")?;
    }
    for i in 0..count {
        let g: Value = read_reply(&mut r)
            .await
            .with_context(|| format!("vstreamd sent {i} of {count} guests"))?;
        match (json, one) {
            (true, true) => writeln!(out, "{}", serde_json::to_string_pretty(&g)?)?,
            (true, false) => {
                let sep = if i + 1 < count { "," } else { "" };
                writeln!(out, "  {g}{sep}")?;
            }
            (false, true) => write!(out, "{}", render_guest(&g))?,
            (false, false) => rows.push(guest_row(&g)),
        }
    }
    if rows.len() > 1 {
        write!(out, "{}", table(&GUEST_ROW_ALIGN, &rows))?;
    }
    if json && !one {
        writeln!(out, "]}}")?;
    } else if !one && refused["count"].as_u64() > Some(0) {
        writeln!(
            out,
            "refused {} connection(s) claiming names no guest has; last: {}",
            refused["count"],
            refused["last"].as_str().unwrap_or("-")
        )?;
    }
    out.flush()?;
    Ok(())
}

const GUEST_ROW_HEADER: [&str; 9] = [
    "GUEST", "STATE", "LINKS", "ACTIVE", "SINCE", "IN", "OUT", "CHANS", "ERRORS",
];
const GUEST_ROW_ALIGN: [Align; 9] = {
    use Align::{Left as L, Right as R};
    [L, L, L, L, R, R, R, R, R]
};

/// One guest on one line: its state, how many mux transports are up, the active one (and since
/// when), bytes over all links, open channels, protocol errors plus channel resets.
fn guest_row(g: &Value) -> Vec<String> {
    let empty = Vec::new();
    let transports = g["transports"].as_array().unwrap_or(&empty);
    let links: Vec<&Value> = transports.iter().filter(|t| t["kind"] == "mux").collect();
    let up = links.iter().filter(|t| t["state"] == "up").count();
    let active = links.iter().find(|t| t["active"] == true);
    let sum = |key: &str| -> u64 { links.iter().filter_map(|t| t["link"][key].as_u64()).sum() };
    let st = &g["stats"];
    let errors =
        st["protocol_errors"].as_u64().unwrap_or(0) + st["channel_resets"].as_u64().unwrap_or(0);
    vec![
        g["name"].as_str().unwrap_or("?").to_owned(),
        if g["connected"] == true {
            "connected"
        } else {
            "disconnected"
        }
        .to_owned(),
        format!("{up}/{}", links.len()),
        active
            .and_then(|t| t["name"].as_str())
            .unwrap_or("-")
            .to_owned(),
        active.map_or_else(|| "-".to_owned(), |t| ago(t["since"].as_u64().unwrap_or(0))),
        bytes(&Value::from(sum("bytes_in"))),
        bytes(&Value::from(sum("bytes_out"))),
        g["channels"].as_array().map_or(0, Vec::len).to_string(),
        errors.to_string(),
    ]
}

/// One guest in detail: transports, devices, channels.
fn render_guest(g: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let st = &g["stats"];
    out.push_str(&format!(
        "{}  {}  errors: {} protocol, {} channel resets, {} retransmitted frames\n",
        g["name"].as_str().unwrap_or("?"),
        if g["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "disconnected"
        },
        st["protocol_errors"],
        st["channel_resets"],
        st["frames_retransmitted"],
    ));
    use Align::{Left as L, Right as R};
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let transports: Vec<Vec<String>> = g["transports"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|t| {
            let (bin, bout) = if t["link"].is_object() {
                (&t["link"]["bytes_in"], &t["link"]["bytes_out"])
            } else {
                (&t["bytes_in"], &t["bytes_out"])
            };
            let mut notes = Vec::new();
            if t["active"].as_bool() == Some(true) {
                notes.push("[active]".to_owned());
            }
            if let Some(e) = t["last_error"].as_str().filter(|_| t["state"] != "up") {
                notes.push(format!("({e})"));
            }
            vec![
                text(&t["kind"]),
                text(&t["state"]),
                t["name"].as_str().unwrap_or("").to_owned(),
                t["address"].as_str().unwrap_or("").to_owned(),
                "since".into(),
                ago(t["since"].as_u64().unwrap_or(0)),
                "in".into(),
                bytes(bin),
                "out".into(),
                bytes(bout),
                notes.join("  "),
            ]
        })
        .collect();
    let indent = |lines: String| {
        lines
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    };
    out.push_str(&indent(table(
        &[L, L, L, L, L, R, L, R, L, R, L],
        &transports,
    )));
    if let Some(devices) = g["devices"].as_object() {
        for (class, st) in devices {
            let fields: Vec<String> = st
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| match v.as_str() {
                            Some(s) => format!("{k}={s}"),
                            None => format!("{k}={v}"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push_str(&format!("  device   {class:<10} {}\n", fields.join(" ")));
        }
    }
    let channels: Vec<Vec<String>> = g["channels"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|c| {
            vec![
                "channel".into(),
                c["id"].to_string(),
                format!("{}/{}", text(&c["class"]), c["name"].as_str().unwrap_or("")),
                "in".into(),
                bytes(&c["bytes_in"]),
                "out".into(),
                bytes(&c["bytes_out"]),
            ]
        })
        .collect();
    out.push_str(&indent(table(&[L, R, L, L, R, L, R], &channels)));
    out
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
