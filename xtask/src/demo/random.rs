//! The random device: host entropy fed to the guest's pool, and the raw port within its rate.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use serde_json::Value;

use super::{device_status, guest_sh, UP_TIMEOUT};
use crate::lab::{guest_status, strip_ansi, Lab};

/// The guest's budget for the random device, bytes per second.
pub(super) const RANDOM_RATE: u64 = 32 * 1024;
/// The name of the raw random port in the guest.
pub(super) const RANDOM_PORT: &str = "org.vstream.random.0";

fn raw_random(status: &Value, guest: &str) -> Option<Value> {
    guest_status(status, guest)?["transports"]
        .as_array()?
        .iter()
        .find(|t| t["kind"] == "random-raw")
        .cloned()
}

fn raw_random_bytes(lab: &Lab) -> Result<u64> {
    let s = lab.status()?;
    raw_random(&s, lab.name())
        .and_then(|t| t["bytes_out"].as_u64())
        .ok_or_else(|| anyhow!("no random-raw transport with bytes_out in {s}"))
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let mut out = String::new();
    // 1. The channel: the agent credited host entropy to the guest kernel's pool at start.
    let fed = "random: fed the kernel's pool at start";
    lab.wait_for_console("ttyS0", fed, Duration::from_secs(60))?;
    let log = lab.guest_console_log();
    ensure!(
        !log.contains("cannot feed the kernel's entropy pool"),
        "the agent could not feed the kernel's pool"
    );
    let line = log.lines().find(|l| l.contains(fed)).unwrap_or_default();
    out.push_str(&format!("agent (ttyS0): {}\n", strip_ansi(line).trim()));
    let status = lab.status()?;
    let dev = device_status(&status, lab.name(), "random");
    ensure!(
        dev["rate"] == RANDOM_RATE && dev["channel_bytes"].as_u64().unwrap_or(0) >= 64,
        "status devices.random: {dev}"
    );
    out.push_str(&format!("vstreamctl status: devices.random = {dev}\n"));
    let pool = guest_sh(
        lab,
        "cat /proc/sys/kernel/random/entropy_avail /proc/sys/kernel/random/poolsize",
    )?;
    let nums: Vec<u64> = pool
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        nums.len() == 2 && nums[0] >= nums[1] && nums[1] > 0,
        "the guest's pool is not full: entropy_avail, poolsize = {pool:?}"
    );
    out.push_str(&format!(
        "guest: entropy_avail {} of poolsize {} bits\n",
        nums[0], nums[1]
    ));

    // 2. The raw port: vstreamd writes to it as fast as the budget allows while the guest reads.
    lab.wait_for("the random-raw transport to be up", UP_TIMEOUT, |s| {
        raw_random(s, lab.name()).is_some_and(|t| t["state"] == "up")
    })?;
    let script = format!("timeout 7 cat /dev/virtio-ports/{RANDOM_PORT} | wc -c");
    let (rate, read) = thread::scope(|scope| -> Result<(f64, u64)> {
        let reader = scope.spawn(|| guest_sh(lab, &script));
        // The socket's backlog and the burst go in the first seconds; then the rate shows.
        thread::sleep(Duration::from_millis(2500));
        let (t0, b0) = (Instant::now(), raw_random_bytes(lab)?);
        thread::sleep(Duration::from_secs(3));
        let (t1, b1) = (Instant::now(), raw_random_bytes(lab)?);
        let text = reader
            .join()
            .map_err(|_| anyhow!("the reader thread panicked"))??;
        let read = text.trim().parse::<u64>().unwrap_or(0);
        Ok(((b1 - b0) as f64 / (t1 - t0).as_secs_f64(), read))
    })?;
    let error = (rate - RANDOM_RATE as f64) / RANDOM_RATE as f64;
    out.push_str(&format!(
        "guest: `timeout 7 cat /dev/virtio-ports/{RANDOM_PORT} | wc -c` read {read} bytes\n\
         vstreamd wrote {rate:.0} B/s to the raw port over 3 s of that (configured rate \
         {RANDOM_RATE} B/s, {:+.1}%)\n",
        error * 100.0
    ));
    ensure!(
        error.abs() < 0.15,
        "{rate:.0} B/s delivered against a rate of {RANDOM_RATE} B/s"
    );
    ensure!(
        read >= 3 * RANDOM_RATE,
        "the guest read only {read} bytes in 7 s"
    );
    Ok(out)
}

/// The guest's virtio-rng device served by vstreamd (`random-vhost-user`): the guest kernel's
/// own driver reads `/dev/hwrng`, and the bytes come out of the guest's random budget.
pub(super) fn demo_hwrng(lab: &Lab) -> Result<String> {
    let mut out = String::new();
    let rng = guest_sh(
        lab,
        "cat /sys/class/misc/hw_random/rng_current /sys/class/misc/hw_random/rng_available",
    )?;
    let mut lines = rng.lines().map(str::trim);
    let (current, available) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    ensure!(
        current.starts_with("virtio_rng") && available == current,
        "the guest's hwrng is not vstreamd's virtio-rng alone: {rng:?}"
    );
    out.push_str(&format!(
        "guest: rng_current {current:?}, rng_available {available:?}\n"
    ));
    let vhost_bytes = || -> Result<u64> {
        let s = lab.status()?;
        device_status(&s, lab.name(), "random")["vhost_bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("no devices.random.vhost_bytes in {s}"))
    };
    let before = vhost_bytes()?;
    // 64 bytes per read: the size of virtio_rng's requests.
    let digest = guest_sh(
        lab,
        "dd if=/dev/hwrng bs=64 count=256 2>/dev/null | tee /tmp/hwrng.bin | wc -c; \
         od -An -tx1 -N16 /tmp/hwrng.bin",
    )?;
    let after = vhost_bytes()?;
    let read: u64 = digest
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    ensure!(
        read == 16384,
        "dd read {read} bytes of /dev/hwrng: {digest:?}"
    );
    ensure!(
        after - before >= read,
        "vstreamd's virtio-rng served {} bytes while the guest read {read}",
        after - before
    );
    out.push_str(&format!(
        "guest: `dd if=/dev/hwrng bs=64 count=256` read {read} bytes, first 16: {}\n\
         vstreamd: devices.random.vhost_bytes went from {before} to {after}\n",
        digest.lines().nth(1).unwrap_or_default().trim()
    ));
    Ok(out)
}
