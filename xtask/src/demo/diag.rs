//! The diag device: bytes through a multiplexer channel to the agent's echo service and back.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::lab::Lab;

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let started = Instant::now();
    let out = lab.ctl_with_input(["open", lab.name(), "diag", "echo"], &data)?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "vstreamctl open failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if out.stdout != data {
        bail!(
            "echo returned {} bytes that differ from the {} sent",
            out.stdout.len(),
            data.len()
        );
    }
    Ok(format!(
        "vstreamctl open {} diag echo: {} bytes sent, the same {} bytes back in {:.0} ms ({:.1} MB/s each way)\n",
        lab.name(),
        data.len(),
        out.stdout.len(),
        took.as_secs_f64() * 1000.0,
        data.len() as f64 / took.as_secs_f64() / 1e6
    ))
}
