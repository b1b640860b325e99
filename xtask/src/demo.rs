//! `cargo xtask demo`: boots the default lab guest and shows each device working, one entry per device.
//!
//! A new device adds a [`DeviceDemo`] to [`DEVICE_DEMOS`]: a name, a sentence, and a function that
//! exercises it through vstreamd/vstreamctl and returns what a person should see.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image;
use crate::lab::{strip_ansi, transport_state, Lab, LabOptions};

/// One device's demonstration.
pub struct DeviceDemo {
    /// Short name, shown in the summary.
    pub name: &'static str,
    /// What it shows.
    pub what: &'static str,
    /// Runs it; the text is printed under the demo's heading.
    pub run: fn(&Lab) -> Result<String>,
}

/// The demos, in order. A new device adds a line.
pub const DEVICE_DEMOS: &[DeviceDemo] = &[
    DeviceDemo {
        name: "mux transports",
        what:
            "the guest agent reaches vstreamd over the virtio port org.vstream.0 and the PCI 16550",
        run: demo_transports,
    },
    DeviceDemo {
        name: "kernel console",
        what: "the guest's ttyS0 (kernel console) is recorded by vstreamd on the host",
        run: demo_kernel_console,
    },
    DeviceDemo {
        name: "hvc0 shell",
        what: "a command typed into hvc0 through `vstreamctl console`, and its output",
        run: demo_hvc0_shell,
    },
    DeviceDemo {
        name: "diag echo",
        what: "1 MiB through a multiplexer channel to the guest agent's echo service and back",
        run: demo_diag_echo,
    },
];

fn demo_diag_echo(lab: &Lab) -> Result<String> {
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

fn demo_transports(lab: &Lab) -> Result<String> {
    let status = lab.wait_for("every mux transport up", Duration::from_secs(90), |s| {
        lab.mux_transports_up(s)
    })?;
    let mut out = String::new();
    for address in lab.mux_addresses() {
        let state = transport_state(&status, lab.name(), &address).unwrap_or("?");
        out.push_str(&format!("transport {address}: {state}\n"));
    }
    out.push_str("vstreamctl status --json:\n");
    out.push_str(&serde_json::to_string_pretty(&status)?);
    out.push('\n');
    Ok(out)
}

fn demo_kernel_console(lab: &Lab) -> Result<String> {
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

fn demo_hvc0_shell(lab: &Lab) -> Result<String> {
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

/// Builds the image, boots the default guest, runs every demo, prints a summary and shuts down.
pub fn run() -> Result<()> {
    let image = image::ensure_image().context("building the guest image")?;
    println!(
        "vstream demo: guest image {} + {} (kernel {})",
        image.vmlinuz.display(),
        image.initramfs.display(),
        image.kernel.version
    );
    let started = Instant::now();
    let lab = Lab::boot(LabOptions::default()).context("booting the lab guest")?;
    println!(
        "vstream demo: guest {:?} booted in {:.1} s with {} ({})\n  kernel command line: {}\n  files: {}",
        lab.name(),
        lab.boot_time().unwrap_or_else(|| started.elapsed()).as_secs_f64(),
        lab.accel(),
        lab.accel_reason(),
        lab.kernel_cmdline(),
        lab.paths().dir.display()
    );

    let mut results = Vec::new();
    for demo in DEVICE_DEMOS {
        println!("\n=== {}: {} ===", demo.name, demo.what);
        let t = Instant::now();
        let result = (demo.run)(&lab);
        match &result {
            Ok(text) => print!("{text}"),
            Err(e) => println!("FAILED: {e:#}"),
        }
        results.push((demo.name, result.is_ok(), t.elapsed()));
    }

    println!("\n=== summary ===");
    for (name, ok, took) in &results {
        println!(
            "  {:<6} {name} ({:.1} s)",
            if *ok { "ok" } else { "FAILED" },
            took.as_secs_f64()
        );
    }
    let failed = results.iter().filter(|(_, ok, _)| !ok).count();
    if failed > 0 {
        lab.dump_logs("the demo failed");
        // Dropping the lab stops the guest and keeps nothing running.
        drop(lab);
        bail!("{failed} of {} device demos failed", results.len());
    }
    lab.shutdown().context("shutting the guest down")?;
    println!(
        "  all {} device demos passed; the guest is shut down",
        results.len()
    );
    Ok(())
}
