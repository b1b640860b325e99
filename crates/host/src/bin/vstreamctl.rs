//! vstreamctl: the command line of vstreamd.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vstream_host::control::{read_reply, write_line, Reply, Request};

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
    /// Attach to a guest console like `virsh console` (Ctrl-] detaches), or read its log.
    Console {
        /// Guest name.
        guest: String,
        /// Console name (default: the guest's first console).
        #[arg(long)]
        name: Option<String>,
        /// Print the last N lines and exit (with --follow: then keep printing).
        #[arg(long)]
        tail: Option<usize>,
        /// Print output as it arrives without attaching.
        #[arg(long)]
        follow: bool,
        /// When stdin is not a terminal: keep printing output this long after stdin ends.
        #[arg(long, default_value = "2")]
        linger: f64,
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
    /// A shell on a guest, like ssh: the login shell, or CMD; on a pty if stdin is a terminal.
    Shell {
        /// Guest name.
        guest: String,
        /// Use a pty even if stdin is not a terminal.
        #[arg(short = 't', conflicts_with = "no_tty")]
        tty: bool,
        /// Never use a pty (stdin, stdout and stderr stay separate pipes).
        #[arg(short = 'T')]
        no_tty: bool,
        /// The command and its arguments, after `--` (default: the login shell).
        #[arg(last = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Run a command on a guest on plain pipes, like `docker exec`; exits with its status.
    Exec {
        /// Guest name.
        guest: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Stream lifecycle events (agent and transport up/down, resets, errors).
    Events {
        /// Only this guest's.
        guest: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send one raw QEMU guest agent command and print the reply, like `virsh
    /// qemu-agent-command` (to the guest's qga transport if it has one, else to vstream-agent).
    Agent {
        /// Guest name.
        guest: String,
        /// The command, e.g. '{"execute":"guest-info"}'.
        command: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value = "30")]
        timeout: f64,
        /// Indent the reply.
        #[arg(long)]
        pretty: bool,
    },
    /// Copy a file to or from a guest through its agent: `cp FILE GUEST:PATH` or
    /// `cp GUEST:PATH FILE` (`-` is stdin or stdout).
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
        /// Bytes per guest-file-read/write request.
        #[arg(long, default_value_t = vstream_devices::qga::host::DEFAULT_CHUNK)]
        chunk: usize,
    },
    /// Shut a guest down through its agent (guest-shutdown).
    Shutdown {
        /// Guest name.
        guest: String,
        /// powerdown, halt or reboot.
        #[arg(long, default_value = "powerdown", value_parser = ["powerdown", "halt", "reboot"])]
        mode: String,
    },
    /// Reboot a guest through its agent (guest-shutdown mode=reboot).
    Reboot {
        /// Guest name.
        guest: String,
    },
    /// Set a guest's clock to the host's (guest-set-time) and print how far off it was.
    TimeSync {
        /// Guest name.
        guest: String,
    },
    /// Keyboard, mouse and tablet input into a guest, or forward a host input device.
    Input {
        /// Guest name.
        guest: String,
        /// Forward this evdev device (/dev/input/eventN) until Ctrl-C or until it goes away.
        #[arg(long, value_name = "DEVICE")]
        forward: Option<PathBuf>,
        /// With --forward: take the device exclusively (the host stops seeing its events).
        #[arg(long, requires = "forward")]
        grab: bool,
        #[command(subcommand)]
        action: Option<InputCmd>,
    },
    /// The print jobs in a guest's spool: size, type, state (done, partial, refused).
    Jobs {
        /// Guest name.
        guest: String,
        /// One JSON array.
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

/// `vstreamctl input GUEST ...`.
#[derive(Subcommand, Debug)]
enum InputCmd {
    /// Type text with a US keyboard layout (a newline is Enter, a tab is Tab).
    Type {
        /// The text.
        text: String,
    },
    /// Press key combinations one after the other, e.g. `ctrl+alt+f2`, `enter`.
    Key {
        /// KEY or MOD+...+KEY.
        #[arg(required = true)]
        combos: Vec<String>,
    },
    /// Relative mouse: move, click, wheel.
    Mouse {
        #[command(subcommand)]
        action: MouseCmd,
    },
    /// Put the absolute pointer at X Y, each from 0.0 to 1.0 of the screen.
    Tablet {
        /// Horizontal position.
        x: f64,
        /// Vertical position.
        y: f64,
        /// Click there: left, right or middle.
        #[arg(long)]
        click: Option<String>,
    },
    /// Measure round trips: host inject -> guest evdev read -> acknowledgement.
    Latency {
        /// Probes (mouse REL_X +1 and -1 in turn).
        #[arg(long, default_value = "200")]
        count: usize,
        /// Pause between probes, milliseconds.
        #[arg(long, default_value = "0")]
        gap_ms: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `vstreamctl input GUEST mouse ...`.
#[derive(Subcommand, Debug)]
enum MouseCmd {
    /// Move by DX DY.
    #[command(allow_negative_numbers = true)]
    Move {
        /// Horizontal motion.
        dx: i32,
        /// Vertical motion.
        dy: i32,
    },
    /// Click a button: left (default), right or middle.
    Click {
        /// The button.
        #[arg(default_value = "left")]
        button: String,
    },
    /// Turn the wheel by N notches (negative: towards the user).
    #[command(allow_negative_numbers = true)]
    Wheel {
        /// Notches.
        notches: i32,
    },
}

/// Ctrl-]: detaches an interactive console, as in telnet and virsh.
const ESCAPE: u8 = 0x1d;

fn main() {
    let args = Args::parse();
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
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("vstreamctl: {e:#}");
        std::process::exit(1);
    }
}

async fn request(
    control: &PathBuf,
    req: &Request,
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
        Cmd::Console {
            guest,
            name,
            tail,
            follow,
            linger,
        } => {
            let interactive = tail.is_none() && !follow;
            let req = Request::device(
                "console",
                &guest,
                serde_json::json!({ "name": name, "tail": tail, "follow": follow, "attach": interactive }),
            );
            let (r, w, reply) = request(&args.control, &req).await?;
            if !interactive {
                return copy_out(r).await;
            }
            if reply.writer != Some(true) {
                eprintln!("vstreamctl: another viewer is typing; this one is read-only");
            }
            attach(r, w, Duration::from_secs_f64(linger.max(0.0))).await
        }
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
        Cmd::Shell {
            guest,
            tty,
            no_tty,
            command,
        } => {
            use vstream_devices::tty::host::{run, PtyMode};
            let class = vstream_devices::tty::CLASS.into();
            let req = Request::Open {
                guest: guest.clone(),
                class,
                name: String::new(),
            };
            let daemon = daemon_id(&args.control);
            let (r, w, _) = request(&args.control, &req).await?;
            let mode = match (tty, no_tty) {
                (true, _) => PtyMode::Always,
                (_, true) => PtyMode::Never,
                _ => PtyMode::Auto,
            };
            let status = run(&guest, r, w, command, mode).await;
            // Exits here: the runtime's blocking stdin reader cannot be cancelled.
            std::process::exit(explain_failure(&args.control, daemon, status).await)
        }
        Cmd::Exec { guest, command } => {
            use vstream_devices::tty::host::{run, PtyMode};
            let class = vstream_devices::tty::CLASS.into();
            let req = Request::Open {
                guest: guest.clone(),
                class,
                name: String::new(),
            };
            let daemon = daemon_id(&args.control);
            let (r, w, _) = request(&args.control, &req).await?;
            let status = run(&guest, r, w, command, PtyMode::Never).await;
            std::process::exit(explain_failure(&args.control, daemon, status).await)
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
        Cmd::Agent {
            guest,
            command,
            timeout,
            pretty,
        } => qga_raw(&args.control, &guest, &command, timeout, pretty).await,
        Cmd::Cp { src, dst, chunk } => {
            let daemon = daemon_id(&args.control);
            match qga_cp(&args.control, &src, &dst, chunk).await {
                Err(e) if e.downcast_ref::<Unreachable>().is_some() => Err(e),
                Err(e) => Err(match daemon_lost(&args.control, daemon).await {
                    Some(why) => e.context(why),
                    None => e,
                }),
                done => done,
            }
        }
        Cmd::Shutdown { guest, mode } => qga_shutdown(&args.control, &guest, &mode).await,
        Cmd::Reboot { guest } => qga_shutdown(&args.control, &guest, "reboot").await,
        Cmd::TimeSync { guest } => qga_time_sync(&args.control, &guest).await,
        Cmd::Input {
            guest,
            forward,
            grab,
            action,
        } => input(&args.control, &guest, forward, grab, action).await,
        Cmd::Jobs { guest, json } => jobs(&args.control, &guest, json).await,
        Cmd::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(shell, &mut Args::command(), "vstreamctl", &mut out);
            Ok(())
        }
        Cmd::Man { dir } => clap_mangen::generate_to(Args::command(), &dir)
            .with_context(|| format!("writing man pages to {}", dir.display())),
    }
}

/// vstreamd did not answer at the start of a command (the error's context, so that a command
/// can tell this from losing vstreamd midway).
#[derive(Debug)]
struct Unreachable(PathBuf);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot reach vstreamd at {} (is it running? --control / VSTREAM_CONTROL)",
            self.0.display()
        )
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

/// Adds the reason to a session that failed without a status of its own (exec, shell) when
/// vstreamd went away under it; returns the status to exit with.
async fn explain_failure(control: &PathBuf, before: Option<(u64, u64)>, status: i32) -> i32 {
    if status == vstream_devices::tty::host::FAILURE_STATUS {
        if let Some(why) = daemon_lost(control, before).await {
            eprintln!("vstreamctl: {why}");
        }
    }
    status
}

async fn copy_out<R: AsyncRead + Unpin>(mut r: R) -> anyhow::Result<()> {
    let mut out = tokio::io::stdout();
    tokio::io::copy(&mut r, &mut out).await?;
    out.flush().await?;
    Ok(())
}

/// Puts the terminal in raw mode for the life of the value.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

async fn attach<R, W>(mut r: R, mut w: W, linger: Duration) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        eprint!("Connected; escape character is ^]\r\n");
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut inbuf = vec![0u8; 4096];
    let mut outbuf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let until = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
        tokio::select! {
            n = r.read(&mut outbuf) => {
                let n = n?;
                if n == 0 {
                    break;
                }
                stdout.write_all(&outbuf[..n]).await?;
                stdout.flush().await?;
            }
            n = stdin.read(&mut inbuf), if stdin_open => {
                let n = n?;
                if n == 0 {
                    stdin_open = false;
                    deadline = Some(tokio::time::Instant::now() + linger);
                    continue;
                }
                let data = &inbuf[..n];
                if tty {
                    if let Some(i) = data.iter().position(|b| *b == ESCAPE) {
                        w.write_all(&data[..i]).await?;
                        break;
                    }
                }
                w.write_all(data).await?;
            }
            () = tokio::time::sleep_until(until) => break,
        }
    }
    if tty {
        eprint!("\r\n[detached]\r\n");
    }
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

fn bytes(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0) as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1}G", n / 1024.0 / 1024.0 / 1024.0),
        n if n >= 1024.0 * 1024.0 => format!("{:.1}M", n / 1024.0 / 1024.0),
        n if n >= 1024.0 => format!("{:.1}K", n / 1024.0),
        n => format!("{n}B"),
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

/// How a column's cells sit in its width.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// `rows` (a header first, if any) as lines whose columns line up whatever the cells' widths:
/// each column as wide as its widest cell, two spaces apart, no trailing blanks.
fn table(align: &[Align], rows: &[Vec<String>]) -> String {
    let len = |cell: &String| cell.chars().count();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - len(cell));
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => line.extend([cell.as_str(), &pad]),
                Align::Right => line.extend([&pad, cell.as_str()]),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
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

// ---- The QEMU guest agent verbs: agent, cp, shutdown, reboot, time-sync. ---------------------

type QgaClient = vstream_devices::qga::host::Client<
    tokio::io::Join<BufReader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf>,
>;

/// A QGA client through vstreamd to `guest`, synchronised.
async fn qga_client(
    control: &PathBuf,
    guest: &str,
    timeout: Duration,
) -> anyhow::Result<QgaClient> {
    let req = Request::device("agent", guest, Value::Null);
    let (r, w, _) = request(control, &req).await?;
    let mut client = vstream_devices::qga::host::Client::new(tokio::io::join(r, w));
    client.set_timeout(timeout);
    client
        .sync()
        .await
        .with_context(|| format!("{guest}: synchronising with the guest agent"))?;
    Ok(client)
}

async fn qga_raw(
    control: &PathBuf,
    guest: &str,
    command: &str,
    timeout: f64,
    pretty: bool,
) -> anyhow::Result<()> {
    use vstream_devices::qga::{command_spec, host::check_reply};
    let request: Value = serde_json::from_str(command).context("the command is not JSON")?;
    let execute = request.get("execute").and_then(Value::as_str).unwrap_or("");
    let timeout = Duration::from_secs_f64(timeout.clamp(0.1, 86_400.0));
    let mut client = qga_client(control, guest, timeout).await?;
    if command_spec(execute).is_some_and(|c| !c.success_response) {
        // No reply on success (guest-shutdown): wait briefly for an error only.
        let cmd = vstream_devices::qga::Command::parse(
            execute,
            request
                .get("arguments")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        client
            .call_no_reply(&cmd, timeout.min(Duration::from_secs(3)))
            .await?;
        return Ok(());
    }
    let reply = client.request(&request).await?;
    if pretty {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        println!("{reply}");
    }
    match check_reply(reply) {
        Ok(_) => Ok(()),
        Err(e) => bail!("{guest}: {execute}: {e}"),
    }
}

/// `GUEST:PATH` (scp style: a colon before any slash), or a local path.
fn remote_path(arg: &str) -> Option<(&str, &str)> {
    let (guest, path) = arg.split_once(':')?;
    (!guest.is_empty() && !guest.contains('/')).then_some((guest, path))
}

/// Shows copy progress on stderr when it is a terminal, at most ten times a second.
struct Progress {
    label: String,
    tty: bool,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl Progress {
    fn new(label: String) -> Progress {
        Progress {
            label,
            tty: std::io::stderr().is_terminal(),
            start: std::time::Instant::now(),
            last: None,
        }
    }

    fn show(&mut self, done: u64, total: Option<u64>, last: bool) {
        if !self.tty {
            return;
        }
        let now = std::time::Instant::now();
        if !last
            && self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let rate = done as f64 / now.duration_since(self.start).as_secs_f64().max(1e-3);
        let line = match total {
            Some(t) if t > 0 => {
                let pct = (done as f64 / t as f64 * 100.0).min(100.0);
                let width = 30;
                let fill = (pct / 100.0 * width as f64) as usize;
                format!(
                    "{} [{}{}] {:>3.0}% {}/{} {}/s",
                    self.label,
                    "#".repeat(fill),
                    " ".repeat(width - fill),
                    pct,
                    bytes(&Value::from(done)),
                    bytes(&Value::from(t)),
                    bytes(&Value::from(rate as u64)),
                )
            }
            _ => format!(
                "{} {} {}/s",
                self.label,
                bytes(&Value::from(done)),
                bytes(&Value::from(rate as u64))
            ),
        };
        eprint!("\r{line}\x1b[K");
        if last {
            eprintln!();
        }
    }
}

async fn qga_cp(control: &PathBuf, src: &str, dst: &str, chunk: usize) -> anyhow::Result<()> {
    use vstream_devices::qga::host::{copy_from_guest, copy_to_guest};
    let timeout = Duration::from_secs(60);
    let connect = |guest: &str| {
        let guest = guest.to_owned();
        async move {
            let mut client = qga_client(control, &guest, timeout).await?;
            // Pipelined requests with vstream-agent only (see PIPELINE).
            client.detect_pipelining().await?;
            anyhow::Ok(client)
        }
    };
    match (remote_path(src), remote_path(dst)) {
        (None, Some((guest, path))) => {
            let mut client = connect(guest).await?;
            let (reader, total): (Box<dyn AsyncRead + Unpin>, Option<u64>) = if src == "-" {
                (Box::new(tokio::io::stdin()), None)
            } else {
                let file = tokio::fs::File::open(src)
                    .await
                    .with_context(|| format!("cannot open {src}"))?;
                let len = file.metadata().await.ok().map(|m| m.len());
                (Box::new(file), len)
            };
            let mut progress = Progress::new(format!("{src} -> {dst}"));
            let n = copy_to_guest(&mut client, reader, path, chunk, |d| {
                progress.show(d, total, false)
            })
            .await
            .with_context(|| format!("copying {src} to {dst}"))?;
            progress.show(n, total.or(Some(n)), true);
            Ok(())
        }
        (Some((guest, path)), None) => {
            let mut client = connect(guest).await?;
            let mut progress = Progress::new(format!("{src} -> {dst}"));
            let (writer, tmp): (Box<dyn tokio::io::AsyncWrite + Unpin>, Option<PathBuf>) =
                if dst == "-" {
                    (Box::new(tokio::io::stdout()), None)
                } else {
                    // Into a temporary file renamed at the end: a failed copy leaves no
                    // truncated file behind under the destination's name.
                    let tmp = PathBuf::from(format!("{dst}.vstream-partial"));
                    let file = tokio::fs::File::create(&tmp)
                        .await
                        .with_context(|| format!("cannot create {}", tmp.display()))?;
                    (Box::new(file), Some(tmp))
                };
            let result = copy_from_guest(&mut client, path, writer, chunk, |d, t| {
                progress.show(d, t, false)
            })
            .await;
            match (result, tmp) {
                (Ok(n), tmp) => {
                    if let Some(tmp) = tmp {
                        tokio::fs::rename(&tmp, dst)
                            .await
                            .with_context(|| format!("cannot rename {} to {dst}", tmp.display()))?;
                    }
                    progress.show(n, Some(n), true);
                    Ok(())
                }
                (Err(e), tmp) => {
                    if let Some(tmp) = tmp {
                        let _ = tokio::fs::remove_file(tmp).await;
                    }
                    Err(anyhow::Error::new(e).context(format!("copying {src} to {dst}")))
                }
            }
        }
        (Some(_), Some(_)) => bail!("cp: both {src} and {dst} are on guests; one must be local"),
        (None, None) => bail!("cp: neither {src} nor {dst} is GUEST:PATH"),
    }
}

async fn qga_shutdown(control: &PathBuf, guest: &str, mode: &str) -> anyhow::Result<()> {
    use vstream_devices::qga::{Command, ShutdownMode};
    let mode = match mode {
        "reboot" => ShutdownMode::Reboot,
        "halt" => ShutdownMode::Halt,
        _ => ShutdownMode::Powerdown,
    };
    let mut client = qga_client(control, guest, Duration::from_secs(30)).await?;
    client
        .call_no_reply(&Command::Shutdown { mode }, Duration::from_secs(3))
        .await
        .with_context(|| format!("{guest}: guest-shutdown"))?;
    Ok(())
}

async fn qga_time_sync(control: &PathBuf, guest: &str) -> anyhow::Result<()> {
    fn host_ns() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
    }
    let mut client = qga_client(control, guest, Duration::from_secs(30)).await?;
    let before = host_ns();
    let guest_ns = client.get_time().await?;
    let after = host_ns();
    // The guest read its clock somewhere in [before, after]: compare with the middle.
    let skew = guest_ns as i128 - (before as i128 + after as i128) / 2;
    client.set_time(Some(host_ns())).await?;
    let ms = skew as f64 / 1e6;
    println!(
        "{guest}: clock was {:.3} ms {} the host's; set to the host's time",
        ms.abs(),
        if skew >= 0 { "ahead of" } else { "behind" }
    );
    Ok(())
}

/// A `hid` channel to `guest` through vstreamd.
async fn hid_channel(
    control: &PathBuf,
    guest: &str,
    kind: vstream_devices::hid::Kind,
) -> std::io::Result<
    tokio::io::Join<BufReader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf>,
> {
    let req = Request::Open {
        guest: guest.to_owned(),
        class: vstream_devices::hid::CLASS.into(),
        name: kind.name().into(),
    };
    let (r, w, _) = request(control, &req)
        .await
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    Ok(tokio::io::join(r, w))
}

async fn input(
    control: &PathBuf,
    guest: &str,
    forward: Option<PathBuf>,
    grab: bool,
    action: Option<InputCmd>,
) -> anyhow::Result<()> {
    use vstream_devices::hid::{forward as fwd, host::Action, host::Button, host::Client, Kind};
    let button = |b: &str| b.parse::<Button>().map_err(anyhow::Error::msg);
    let action = match (forward, action) {
        (Some(device), None) => {
            let open = |kind: Kind| hid_channel(control, guest, kind);
            let stop = async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => return std::future::pending().await,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            };
            let options = fwd::ForwardOptions {
                grab,
                ..Default::default()
            };
            eprintln!(
                "vstreamctl: forwarding {} to {guest}{}; Ctrl-C stops",
                device.display(),
                if grab { " (grabbed)" } else { "" }
            );
            let stats = fwd::forward(&device, &options, open, stop).await?;
            eprintln!(
                "vstreamctl: forwarded {} events in {} reports ({} dropped: no such key or axis in the guest)",
                stats.events, stats.batches, stats.dropped
            );
            return Ok(());
        }
        (Some(_), Some(_)) => bail!("--forward and an input action exclude each other"),
        (None, None) => {
            bail!("give an action (type, key, mouse, tablet, latency) or --forward DEVICE")
        }
        (None, Some(a)) => a,
    };
    let action = match action {
        InputCmd::Type { text } => Action::Type(text),
        InputCmd::Key { combos } => Action::Key(combos),
        InputCmd::Mouse { action } => match action {
            MouseCmd::Move { dx, dy } => Action::MouseMove(dx, dy),
            MouseCmd::Click { button: b } => Action::MouseClick(button(&b)?),
            MouseCmd::Wheel { notches } => Action::MouseWheel(notches),
        },
        InputCmd::Tablet { x, y, click } => Action::Tablet {
            x,
            y,
            click: click.as_deref().map(button).transpose()?,
        },
        InputCmd::Latency {
            count,
            gap_ms,
            json,
        } => {
            let chan = hid_channel(control, guest, Kind::Mouse).await?;
            let mut client = Client::new(chan);
            let stats = vstream_devices::hid::host::latency(
                &mut client,
                count,
                Duration::from_millis(gap_ms),
            )
            .await
            .with_context(|| format!("{guest}: hid/mouse"))?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "{guest}: {} probes, {} read back from evdev; round trip p50 {} us, p90 {} us, p99 {} us, max {} us, mean {} us",
                    stats.count, stats.seen, stats.p50_us, stats.p90_us, stats.p99_us, stats.max_us, stats.mean_us
                );
            }
            return client.close().await.map_err(Into::into);
        }
    };
    let (kind, reports) = action.reports()?;
    let chan = hid_channel(control, guest, kind).await?;
    let mut client = Client::new(chan);
    client
        .send_all(reports)
        .await
        .with_context(|| format!("{guest}: hid/{kind}"))?;
    client.close().await?;
    Ok(())
}

async fn jobs(control: &PathBuf, guest: &str, json: bool) -> anyhow::Result<()> {
    let req = Request::device("jobs", guest, Value::Null);
    let (_, _, reply) = request(control, &req).await?;
    let jobs = reply.device.get("jobs").cloned().unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    let empty = Vec::new();
    let list = jobs.as_array().unwrap_or(&empty);
    if list.is_empty() {
        println!("{guest}: no print jobs");
        return Ok(());
    }
    let header = ["ID", "STATE", "TYPE", "SIZE", "FILE", "TITLE", "REASON"];
    let mut rows = vec![header.map(String::from).to_vec()];
    let text = |v: &Value, none: &str| v.as_str().unwrap_or(none).to_owned();
    for j in list {
        rows.push(vec![
            j["id"].to_string(),
            text(&j["state"], "?"),
            text(&j["type"], "-"),
            bytes(&j["size"]),
            text(&j["file"], "-"),
            text(&j["title"], "-"),
            text(&j["reason"], ""),
        ]);
    }
    use Align::{Left as L, Right as R};
    print!("{}", table(&[R, L, L, R, L, L, L], &rows));
    Ok(())
}
