//! The qga device: QEMU guest agent commands, `vstreamctl cp` and `vstreamctl time-sync`.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::{json, Value};

use super::{ctl_ok, demo_host, first_word, guest_sh, sha256_host};
use crate::lab::testing::pseudo_random;
use crate::lab::Lab;

/// `vstreamctl agent lab JSON`: the `return` of the reply.
fn qga(lab: &Lab, command: &Value) -> Result<Value> {
    let text = ctl_ok(lab, &["agent", lab.name(), &command.to_string()])?;
    let reply: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("{command}: the reply is not JSON: {text:?}"))?;
    reply
        .get("return")
        .cloned()
        .ok_or_else(|| anyhow!("{command}: {reply}"))
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let name = lab.name();
    let mut out = String::new();

    let info = qga(lab, &json!({"execute": "guest-info"}))?;
    let version = info["version"].as_str().unwrap_or("?");
    let commands = info["supported_commands"]
        .as_array()
        .ok_or_else(|| anyhow!("guest-info without supported_commands: {info}"))?;
    let enabled = commands.iter().filter(|c| c["enabled"] == true).count();
    ensure!(
        commands.iter().any(|c| c["name"] == "guest-file-open"),
        "guest-info lists no guest-file-open: {info}"
    );
    out.push_str(&format!(
        "$ vstreamctl agent {name} '{{\"execute\":\"guest-info\"}}'\n  version {version}, {} commands ({enabled} enabled)\n",
        commands.len()
    ));

    let os = qga(lab, &json!({"execute": "guest-get-osinfo"}))?;
    let kernel = os["kernel-release"].as_str().unwrap_or("");
    ensure!(
        os["machine"] == "x86_64" && kernel == lab.image().kernel.version,
        "guest-get-osinfo: {os} (the guest runs {})",
        lab.image().kernel.version
    );
    out.push_str(&format!(
        "$ vstreamctl agent {name} '{{\"execute\":\"guest-get-osinfo\"}}'\n  {}\n",
        serde_json::to_string(&os)?
    ));
    let host = qga(lab, &json!({"execute": "guest-get-host-name"}))?;
    ensure!(host["host-name"] == name, "guest-get-host-name: {host}");

    // cp both ways, checksums on both sides.
    let dir = &demo_host()?.dir;
    let (src, back) = (dir.join("cp.src"), dir.join("cp.back"));
    let len = 8 << 20;
    std::fs::write(&src, pseudo_random(len, 42)).context("writing the file to copy")?;
    let remote = "/tmp/vstream-demo.bin";
    let dest = format!("{name}:{remote}");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let t = Instant::now();
    ctl_ok(lab, &["cp", "--via", "qga", &path(&src), &dest])?;
    let up = t.elapsed();
    let sum = sha256_host(Some(&src), &[])?;
    let guest_sum = first_word(&guest_sh(lab, &format!("sha256sum {remote}"))?)?;
    ensure!(
        guest_sum == sum,
        "in the guest {remote} has SHA-256 {guest_sum}, the host's file {sum}"
    );
    let t = Instant::now();
    ctl_ok(lab, &["cp", "--via", "qga", &dest, &path(&back)])?;
    let down = t.elapsed();
    let back_sum = sha256_host(Some(&back), &[])?;
    ensure!(
        back_sum == sum,
        "the copy back has SHA-256 {back_sum}, the original {sum}"
    );
    let _ = guest_sh(lab, &format!("rm -f {remote}"));
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&back);
    let mib = (len >> 20) as f64;
    out.push_str(&format!(
        "$ vstreamctl cp cp.src {dest}    # {mib} MiB in {:.2} s ({:.1} MiB/s)\n\
         $ vstreamctl cp {dest} cp.back   # in {:.2} s ({:.1} MiB/s)\n\
         sha256: host file, guest file (sha256sum via exec) and the copy back all {}\n",
        up.as_secs_f64(),
        mib / up.as_secs_f64(),
        down.as_secs_f64(),
        mib / down.as_secs_f64(),
        &sum[..16]
    ));

    let sync = ctl_ok(lab, &["time-sync", name])?;
    ensure!(
        sync.starts_with(&format!("{name}: clock was ")),
        "time-sync said {sync:?}"
    );
    out.push_str(&format!("$ vstreamctl time-sync {name}\n{sync}"));
    Ok(out)
}
