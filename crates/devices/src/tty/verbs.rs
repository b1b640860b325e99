//! `vstreamctl shell` and `vstreamctl exec`.

use clap::{FromArgMatches, Subcommand};

use super::host::{run as run_session, PtyMode, FAILURE_STATUS};
use super::CLASS;
use crate::registry::VerbContext;

/// The terminal sessions' verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
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
}

/// Runs the verb; returns the remote command's status.
pub async fn run(ctx: VerbContext<'_>) -> anyhow::Result<i32> {
    let (guest, command, mode) = match Verb::from_arg_matches(ctx.matches)? {
        Verb::Shell {
            guest,
            tty,
            no_tty,
            command,
        } => {
            let mode = match (tty, no_tty) {
                (true, _) => PtyMode::Always,
                (_, true) => PtyMode::Never,
                _ => PtyMode::Auto,
            };
            (guest, command, mode)
        }
        Verb::Exec { guest, command } => (guest, command, PtyMode::Never),
    };
    let stream = ctx.open(&guest, CLASS, "").await?;
    let (r, w) = tokio::io::split(stream);
    let status = run_session(&guest, r, w, command, mode).await;
    // A session that failed without a status of its own: say so if vstreamd went away under it.
    if status == FAILURE_STATUS {
        if let Some(why) = ctx.control.lost().await {
            eprintln!("vstreamctl: {why}");
        }
    }
    Ok(status)
}
