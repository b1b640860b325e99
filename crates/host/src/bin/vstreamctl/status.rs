//! `vstreamctl status`: every guest on one line, or one guest in detail.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;
use vstream_devices::cli::{bytes, table, Align};
use vstream_host::control::{read_reply, Request};
use vstream_host::status::GuestStatus;

use crate::request;

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
pub async fn status(control: &PathBuf, guest: Option<String>, json: bool) -> anyhow::Result<()> {
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
        let daemon = serde_json::to_string(&reply.daemon)?;
        writeln!(out, "{{\"daemon\": {daemon},")?;
        writeln!(
            out,
            "\"refused_unknown\": {},",
            serde_json::to_string(&refused)?
        )?;
        writeln!(out, "\"guests\": [")?;
    } else if !json && !one && count == 0 {
        writeln!(out, "no guests")?;
    }
    for i in 0..count {
        let g: GuestStatus = read_reply(&mut r)
            .await
            .with_context(|| format!("vstreamd sent {i} of {count} guests"))?;
        match (json, one) {
            (true, true) => writeln!(out, "{}", serde_json::to_string_pretty(&g)?)?,
            (true, false) => {
                let sep = if i + 1 < count { "," } else { "" };
                writeln!(out, "  {}{sep}", serde_json::to_string(&g)?)?;
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
    } else if !one && refused.count > 0 {
        writeln!(
            out,
            "refused {} connection(s) claiming names no guest has; last: {}",
            refused.count,
            refused.last.as_deref().unwrap_or("-")
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
fn guest_row(g: &GuestStatus) -> Vec<String> {
    let links: Vec<_> = g
        .transports
        .iter()
        .filter(|t| t.transport.kind == "mux")
        .collect();
    let up = links.iter().filter(|t| t.transport.state == "up").count();
    let active = links.iter().find(|t| t.active == Some(true));
    let sum = |f: fn(&vstream_link::LinkStatus) -> u64| -> u64 {
        links.iter().filter_map(|t| t.link.as_ref()).map(f).sum()
    };
    let errors = g.stats.session.protocol_errors + g.stats.session.channel_resets;
    vec![
        g.name.clone(),
        if g.connected {
            "connected"
        } else {
            "disconnected"
        }
        .to_owned(),
        format!("{up}/{}", links.len()),
        active.map_or("-", |t| t.transport.name.as_str()).to_owned(),
        active.map_or_else(|| "-".to_owned(), |t| ago(t.transport.since)),
        bytes(&Value::from(sum(|l| l.stats.bytes_in))),
        bytes(&Value::from(sum(|l| l.stats.bytes_out))),
        g.channels.len().to_string(),
        errors.to_string(),
    ]
}

/// One guest in detail: transports, devices, channels.
fn render_guest(g: &GuestStatus) -> String {
    let mut out = String::new();
    let st = &g.stats;
    out.push_str(&format!(
        "{}  {}  errors: {} protocol, {} channel resets, {} retransmitted frames\n",
        g.name,
        if g.connected {
            "connected"
        } else {
            "disconnected"
        },
        st.session.protocol_errors,
        st.session.channel_resets,
        st.session.frames_retransmitted,
    ));
    use Align::{Left as L, Right as R};
    let transports: Vec<Vec<String>> = g
        .transports
        .iter()
        .map(|line| {
            let t = &line.transport;
            let (bin, bout) = line.bytes();
            let mut notes = Vec::new();
            if line.active == Some(true) {
                notes.push("[active]".to_owned());
            }
            if let Some(e) = t.last_error.as_ref().filter(|_| t.state != "up") {
                notes.push(format!("({e})"));
            }
            vec![
                t.kind.clone(),
                t.state.clone(),
                t.name.clone(),
                t.address.clone(),
                "since".into(),
                ago(t.since),
                "in".into(),
                bytes(&Value::from(bin.unwrap_or(0))),
                "out".into(),
                bytes(&Value::from(bout)),
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
    for (class, st) in &g.devices.0 {
        out.push_str(&format!(
            "  device   {class:<10} {}\n",
            st.words().join(" ")
        ));
    }
    let channels: Vec<Vec<String>> = g
        .channels
        .iter()
        .map(|c| {
            vec![
                "channel".into(),
                c.id.to_string(),
                format!("{}/{}", c.class, c.name),
                "in".into(),
                bytes(&Value::from(c.bytes_in)),
                "out".into(),
                bytes(&Value::from(c.bytes_out)),
            ]
        })
        .collect();
    out.push_str(&indent(table(&[L, R, L, L, R, L, R], &channels)));
    out
}
