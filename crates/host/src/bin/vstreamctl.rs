//! vstreamctl: the command line of vstreamd.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vstream_host::control::{read_line, write_line, Reply, Request};

/// Talk to vstreamd: status, consoles, channels, events.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// vstreamd's control socket.
    #[arg(long, env = "VSTREAM_CONTROL", default_value = vstream_host::DEFAULT_CONTROL)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Guests, their transports (up/down, since when), channels, bytes, errors.
    Status {
        /// Machine-readable output.
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
    /// Stream lifecycle events (agent and transport up/down, resets, errors).
    Events {
        /// Only this guest's.
        guest: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
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
    let stream = UnixStream::connect(control).await.with_context(|| {
        format!(
            "cannot reach vstreamd at {} (is it running? --control / VSTREAM_CONTROL)",
            control.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    write_line(&mut w, req).await?;
    let reply: Reply = read_line(&mut r)
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
        Cmd::Status { json } => {
            let (_, _, reply) = request(&args.control, &Request::Status).await?;
            let status = reply.status.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
            Ok(())
        }
        Cmd::Console {
            guest,
            name,
            tail,
            follow,
            linger,
        } => {
            let interactive = tail.is_none() && !follow;
            let req = Request::Console {
                guest,
                name,
                tail,
                follow,
                attach: interactive,
            };
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
        Cmd::Events { guest, json } => {
            let (mut r, _w, _) = request(&args.control, &Request::Events { guest }).await?;
            loop {
                let ev: Value = read_line(&mut r).await?;
                if json {
                    println!("{ev}");
                } else {
                    println!("{}", render_event(&ev));
                }
            }
        }
    }
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

fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let guests = status["guests"].as_array().unwrap_or(&empty);
    if guests.is_empty() {
        out.push_str("no guests\n");
    }
    for g in guests {
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
        for t in g["transports"].as_array().unwrap_or(&empty) {
            let (bin, bout) = if t["link"].is_object() {
                (&t["link"]["bytes_in"], &t["link"]["bytes_out"])
            } else {
                (&t["bytes_in"], &t["bytes_out"])
            };
            out.push_str(&format!(
                "  {:<8} {:<10} {:<11} {:<44} since {:>5}  in {:>7}  out {:>7}{}{}\n",
                t["kind"].as_str().unwrap_or("?"),
                t["state"].as_str().unwrap_or("?"),
                t["name"].as_str().unwrap_or(""),
                t["address"].as_str().unwrap_or(""),
                ago(t["since"].as_u64().unwrap_or(0)),
                bytes(bin),
                bytes(bout),
                if t["active"].as_bool() == Some(true) {
                    "  [active]"
                } else {
                    ""
                },
                match t["last_error"].as_str() {
                    Some(e) if t["state"] != "up" => format!("  ({e})"),
                    _ => String::new(),
                },
            ));
        }
        for c in g["channels"].as_array().unwrap_or(&empty) {
            out.push_str(&format!(
                "  channel  {:>4} {}/{}  in {:>7}  out {:>7}\n",
                c["id"],
                c["class"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or(""),
                bytes(&c["bytes_in"]),
                bytes(&c["bytes_out"]),
            ));
        }
    }
    out
}

fn render_event(ev: &Value) -> String {
    let mut rest = ev.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("event");
        o.remove("guest");
        o.remove("time");
    }
    format!(
        "{} {} {}",
        ev["guest"].as_str().unwrap_or("-"),
        ev["event"].as_str().unwrap_or("?"),
        rest
    )
}
