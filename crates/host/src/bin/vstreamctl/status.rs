//! `vstreamctl status`: every guest on one line, or one guest in detail.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;
use vstream_devices::cli::{bytes, table, Align};
use vstream_host::control::{read_reply, Request};

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
        let daemon = reply.daemon.unwrap_or_default();
        writeln!(out, "{{\"daemon\": {daemon},")?;
        writeln!(out, "\"refused_unknown\": {refused},")?;
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
