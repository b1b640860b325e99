//! `vstreamctl console`.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{FromArgMatches, Subcommand};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::device::CLASS;
use crate::registry::VerbContext;
use crate::term::RawMode;

/// Ctrl-]: detaches an interactive console, as in telnet and virsh.
const ESCAPE: u8 = 0x1d;

/// The console's verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
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
}

/// Runs the verb.
pub async fn run(ctx: VerbContext<'_>) -> anyhow::Result<i32> {
    let Verb::Console {
        guest,
        name,
        tail,
        follow,
        linger,
    } = Verb::from_arg_matches(ctx.matches)?;
    let interactive = tail.is_none() && !follow;
    let req = json!({
        "op": CLASS, "guest": guest, "name": name, "tail": tail, "follow": follow,
        "attach": interactive,
    });
    let (reply, stream) = ctx.control.call(req).await?;
    let (r, w) = tokio::io::split(stream);
    if !interactive {
        let mut out = tokio::io::stdout();
        let mut r = r;
        tokio::io::copy(&mut r, &mut out).await?;
        out.flush().await?;
        return Ok(0);
    }
    if reply["writer"] != true {
        eprintln!("vstreamctl: another viewer is typing; this one is read-only");
    }
    attach(r, w, Duration::from_secs_f64(linger.max(0.0))).await?;
    Ok(0)
}

async fn attach<R, W>(mut r: R, mut w: W, linger: Duration) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
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
