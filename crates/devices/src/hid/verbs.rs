//! `vstreamctl input`: keyboard, mouse and tablet input into a guest.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{FromArgMatches, Subcommand};
use vstream_transport::BoxStream;

use crate::registry::VerbContext;

/// The input verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
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
        // Its help is the subcommands' own.
        #[allow(missing_docs)]
        #[command(subcommand)]
        action: Option<InputCmd>,
    },
}

/// Runs the verb.
pub async fn run(ctx: VerbContext<'_>) -> anyhow::Result<i32> {
    let Verb::Input {
        guest,
        forward,
        grab,
        action,
    } = Verb::from_arg_matches(ctx.matches)?;
    input(&ctx, &guest, forward, grab, action).await?;
    Ok(0)
}

/// `vstreamctl input GUEST ...`.
#[derive(Subcommand, Debug)]
pub enum InputCmd {
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
        #[allow(missing_docs)]
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
pub enum MouseCmd {
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

/// The host end of the hid protocol for `guest`'s `kind` device, through vstreamd.
async fn hid_channel(
    ctx: &VerbContext<'_>,
    guest: &str,
    kind: super::Kind,
) -> std::io::Result<BoxStream> {
    // vstreamd answers with its own virtio-input device of that kind, or the agent's channel.
    let req =
        serde_json::json!({ "op": super::device::INPUT_OP, "guest": guest, "kind": kind.name() });
    ctx.control
        .call(req)
        .await
        .map(|(_, stream)| stream)
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
}

async fn input(
    ctx: &VerbContext<'_>,
    guest: &str,
    forward: Option<PathBuf>,
    grab: bool,
    action: Option<InputCmd>,
) -> anyhow::Result<()> {
    use super::{forward as fwd, host::Action, host::Button, host::Client, Kind};
    let button = |b: &str| b.parse::<Button>().map_err(anyhow::Error::msg);
    let action = match (forward, action) {
        (Some(device), None) => {
            let open = |kind: Kind| hid_channel(ctx, guest, kind);
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
            let chan = hid_channel(ctx, guest, Kind::Mouse).await?;
            let mut client = Client::new(chan);
            let stats = super::host::latency(&mut client, count, Duration::from_millis(gap_ms))
                .await
                .with_context(|| format!("{guest}: hid/mouse"))?;
            if json {
                crate::outln!("{}", serde_json::to_string(&stats)?);
            } else {
                crate::outln!(
                    "{guest}: {} probes, {} read back from evdev; round trip p50 {} us, p90 {} us, p99 {} us, max {} us, mean {} us",
                    stats.count, stats.seen, stats.p50_us, stats.p90_us, stats.p99_us, stats.max_us, stats.mean_us
                );
            }
            return client.close().await.map_err(Into::into);
        }
    };
    let (kind, reports) = action.reports()?;
    let chan = hid_channel(ctx, guest, kind).await?;
    let mut client = Client::new(chan);
    client
        .send_all(reports)
        .await
        .with_context(|| format!("{guest}: hid/{kind}"))?;
    client.close().await?;
    Ok(())
}
