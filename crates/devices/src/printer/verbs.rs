//! `vstreamctl jobs`: the print jobs in a guest's spool.

use clap::{FromArgMatches, Subcommand};
use serde_json::Value;

use super::device::JOBS_OP;
use crate::cli;
use crate::registry::VerbContext;

/// The printer's verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// The print jobs in a guest's spool: size, type, state (done, partial, refused).
    Jobs {
        /// Guest name.
        guest: String,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the verb.
pub async fn run(ctx: VerbContext<'_>) -> anyhow::Result<i32> {
    let Verb::Jobs { guest, json } = Verb::from_arg_matches(ctx.matches)?;
    jobs(&ctx, &guest, json).await?;
    Ok(0)
}

async fn jobs(ctx: &VerbContext<'_>, guest: &str, json: bool) -> anyhow::Result<()> {
    let req = serde_json::json!({ "op": JOBS_OP, "guest": guest });
    let (reply, _) = ctx.control.call(req).await?;
    let jobs = reply["jobs"].clone();
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    let empty = Vec::new();
    let list = jobs.as_array().unwrap_or(&empty);
    if list.is_empty() {
        crate::outln!("{guest}: no print jobs");
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
            cli::bytes(&j["size"]),
            text(&j["file"], "-"),
            text(&j["title"], "-"),
            text(&j["reason"], ""),
        ]);
    }
    use cli::Align::{Left as L, Right as R};
    cli::out(format_args!(
        "{}",
        cli::table(&[R, L, L, R, L, L, L], &rows)
    ));
    Ok(())
}
