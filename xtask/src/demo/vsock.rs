//! vsock: the guest's virtio-vsock device served by vstreamd itself (QEMU's
//! `vhost-user-vsock-pci`, vstreamd's `vhost-user-vsock:` transport), the mux over it, and a host
//! program reaching a guest listener through the hybrid socket, as with Firecracker or Cloud
//! Hypervisor.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::{guest_sh, UP_TIMEOUT};
use crate::lab::{guest_status, Lab};
use crate::qga_lab::QgaConn;

/// The guest port the agent serves raw QGA on (`vstream.qga=vsock-listen:PORT`).
pub(super) const QGA_VSOCK_PORT: u32 = 6000;

fn vsock_transports(status: &Value, guest: &str) -> Vec<Value> {
    guest_status(status, guest)
        .and_then(|g| g["transports"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| {
            let address = t["address"].as_str().unwrap_or_default();
            address.starts_with("vhost-user-vsock:") || address.starts_with("hvsock:")
        })
        .collect()
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let status = lab.wait_for("the mux over vsock, both ways", UP_TIMEOUT, |s| {
        let t = vsock_transports(s, lab.name());
        t.len() == 2 && t.iter().all(|t| t["state"] == "up")
    })?;
    let mut out = String::new();
    for t in vsock_transports(&status, lab.name()) {
        out.push_str(&format!(
            "transport {}: {} (peer {})\n",
            t["address"].as_str().unwrap_or("?"),
            t["state"].as_str().unwrap_or("?"),
            t["peer"].as_str().unwrap_or("?")
        ));
    }

    // A host program (here a QGA client) through the hybrid socket to the agent's raw QGA
    // listener in the guest: `CONNECT 6000` / `OK <port>`, then plain QGA.
    let text = "over vsock, through the hybrid socket\n";
    guest_sh(
        lab,
        &format!("printf '{}\\n' > /tmp/vsock-demo.txt", text.trim_end()),
    )?;
    let (stream, answer) = lab
        .hybrid_vsock_connect(QGA_VSOCK_PORT)
        .context("connecting through the hybrid socket")?;
    ensure!(
        answer.starts_with("OK "),
        "CONNECT {QGA_VSOCK_PORT} was answered {answer:?}"
    );
    out.push_str(&format!(
        "host: CONNECT {QGA_VSOCK_PORT} on {} answered {}\n",
        lab.paths()
            .sockets
            .hybrid_vsock
            .as_ref()
            .map(|h| h.uds.display().to_string())
            .unwrap_or_default(),
        answer.trim_end()
    ));
    let mut qga = QgaConn::over(stream).context("guest-sync-delimited over vsock")?;
    let ping = qga.request(&json!({"execute": "guest-ping"}))?;
    ensure!(ping == json!({"return": {}}), "guest-ping: {ping}");
    let read = qga.read_small("/tmp/vsock-demo.txt")?;
    ensure!(
        read == text.as_bytes(),
        "guest-file-read over vsock returned {:?}",
        String::from_utf8_lossy(&read)
    );
    out.push_str(&format!(
        "host: guest-ping answered {ping}; guest-file-read returned {:?}\n",
        String::from_utf8_lossy(&read)
    ));
    Ok(out)
}
