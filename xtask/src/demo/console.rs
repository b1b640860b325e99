//! The consoles: the guest's kernel console recorded on the host, a shell typed into hvc0.

use std::time::Duration;

use anyhow::Result;

use crate::image;
use crate::lab::{strip_ansi, Lab};

pub(super) fn demo_kernel_console(lab: &Lab) -> Result<String> {
    lab.wait_for_console("ttyS0", "Linux version", Duration::from_secs(30))?;
    lab.wait_for_console("ttyS0", image::INIT_DONE_MARKER, Duration::from_secs(30))?;
    let log = lab.guest_console_log();
    let mut out = format!(
        "{} ({} bytes), selected lines:\n",
        lab.paths().console_log(lab.name(), "ttyS0").display(),
        log.len()
    );
    for line in log
        .lines()
        .filter(|l| l.contains("Linux version") || l.contains("vstream-lab:"))
    {
        out.push_str("  ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    Ok(out)
}

pub(super) fn demo_hvc0_shell(lab: &Lab) -> Result<String> {
    let line = "echo vs-$((6*7)); uname -r; hostname";
    let shown = lab.console_roundtrip("hvc0", line, "vs-42", Duration::from_secs(60))?;
    let mut out = format!("typed: {line}\nthe terminal showed:\n");
    for l in strip_ansi(&shown).lines().filter(|l| !l.trim().is_empty()) {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    Ok(out)
}
