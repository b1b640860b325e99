//! `vstreamctl agent`, `cp`, `shutdown`, `reboot` and `time-sync`: the QEMU guest agent's verbs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{FromArgMatches, Subcommand};
use serde_json::Value;
use tokio::io::AsyncRead;
use vstream_transport::BoxStream;

use super::device::AGENT_OP;
use crate::cli::{remote_path, Progress};
use crate::registry::{Unreachable, VerbContext};

/// The guest agent's verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
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
    /// Copy a file to or from a guest through the QEMU guest agent's file commands
    /// (guest-file-read/write, base64 in JSON): `qga-cp FILE GUEST:PATH` or `qga-cp GUEST:PATH
    /// FILE` (`-` is stdin or stdout). For a guest that has only qemu-ga; `cp --via qga` runs it.
    QgaCp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
        /// Bytes per guest-file-read/write request.
        #[arg(long, default_value_t = super::host::DEFAULT_CHUNK)]
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
}

/// Runs the verb.
pub async fn run(ctx: VerbContext<'_>) -> anyhow::Result<i32> {
    let ctx = &ctx;
    match Verb::from_arg_matches(ctx.matches)? {
        Verb::Agent {
            guest,
            command,
            timeout,
            pretty,
        } => qga_raw(ctx, &guest, &command, timeout, pretty).await?,
        Verb::QgaCp { src, dst, chunk } => match qga_cp(ctx, &src, &dst, chunk).await {
            Err(e) if e.downcast_ref::<Unreachable>().is_some() => return Err(e),
            Err(e) => {
                return Err(match ctx.control.lost().await {
                    Some(why) => e.context(why),
                    None => e,
                })
            }
            Ok(()) => {}
        },
        Verb::Shutdown { guest, mode } => qga_shutdown(ctx, &guest, &mode).await?,
        Verb::Reboot { guest } => qga_shutdown(ctx, &guest, "reboot").await?,
        Verb::TimeSync { guest } => qga_time_sync(ctx, &guest).await?,
    }
    Ok(0)
}

type QgaClient = super::host::Client<BoxStream>;

/// A QGA client through vstreamd to `guest`, synchronised.
async fn qga_client(
    ctx: &VerbContext<'_>,
    guest: &str,
    timeout: Duration,
) -> anyhow::Result<QgaClient> {
    let req = serde_json::json!({ "op": AGENT_OP, "guest": guest });
    let (_, stream) = ctx.control.call(req).await?;
    let mut client = super::host::Client::new(stream);
    client.set_timeout(timeout);
    client
        .sync()
        .await
        .with_context(|| format!("{guest}: synchronising with the guest agent"))?;
    Ok(client)
}

async fn qga_raw(
    ctx: &VerbContext<'_>,
    guest: &str,
    command: &str,
    timeout: f64,
    pretty: bool,
) -> anyhow::Result<()> {
    use super::{command_spec, host::check_reply};
    let request: Value = serde_json::from_str(command).context("the command is not JSON")?;
    let execute = request.get("execute").and_then(Value::as_str).unwrap_or("");
    let timeout = Duration::from_secs_f64(timeout.clamp(0.1, 86_400.0));
    let mut client = qga_client(ctx, guest, timeout).await?;
    if command_spec(execute).is_some_and(|c| !c.success_response) {
        // No reply on success (guest-shutdown, guest-suspend-*): wait briefly for an error only.
        let cmd = super::Command::parse(
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
        crate::outln!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        crate::outln!("{reply}");
    }
    match check_reply(reply) {
        Ok(_) => Ok(()),
        Err(e) => bail!("{guest}: {execute}: {e}"),
    }
}

async fn qga_cp(ctx: &VerbContext<'_>, src: &str, dst: &str, chunk: usize) -> anyhow::Result<()> {
    use super::host::{copy_from_guest, copy_to_guest};
    let timeout = Duration::from_secs(60);
    let connect = |guest: &str| {
        let guest = guest.to_owned();
        async move {
            let mut client = qga_client(ctx, &guest, timeout).await?;
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

async fn qga_shutdown(ctx: &VerbContext<'_>, guest: &str, mode: &str) -> anyhow::Result<()> {
    use super::{Command, ShutdownMode};
    let mode = match mode {
        "reboot" => ShutdownMode::Reboot,
        "halt" => ShutdownMode::Halt,
        _ => ShutdownMode::Powerdown,
    };
    let mut client = qga_client(ctx, guest, Duration::from_secs(30)).await?;
    client
        .call_no_reply(&Command::Shutdown { mode }, Duration::from_secs(3))
        .await
        .with_context(|| format!("{guest}: guest-shutdown"))?;
    Ok(())
}

async fn qga_time_sync(ctx: &VerbContext<'_>, guest: &str) -> anyhow::Result<()> {
    fn host_ns() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
    }
    let mut client = qga_client(ctx, guest, Duration::from_secs(30)).await?;
    let before = host_ns();
    let guest_ns = client.get_time().await?;
    let after = host_ns();
    // The guest read its clock somewhere in [before, after]: compare with the middle.
    let skew = guest_ns as i128 - (before as i128 + after as i128) / 2;
    client.set_time(Some(host_ns())).await?;
    let ms = skew as f64 / 1e6;
    crate::outln!(
        "{guest}: clock was {:.3} ms {} the host's; set to the host's time",
        ms.abs(),
        if skew >= 0 { "ahead of" } else { "behind" }
    );
    Ok(())
}
