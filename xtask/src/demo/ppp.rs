//! The ppp device: a PPP link between the guest and a network namespace on the host.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::{demo_host, device_status, first_word, guest_sh, sha256_host, UP_TIMEOUT};
use crate::lab::Lab;

/// PPP addresses: the host end (in the demo's network namespace) and the guest's ppp0.
pub(super) const PPP_LOCAL: &str = "10.77.0.1";
pub(super) const PPP_REMOTE: &str = "10.77.0.2";

/// A listening TCP socket made inside network namespace `netns` (a socket keeps its namespace).
fn listen_in_netns(netns: &str, addr: Ipv4Addr) -> Result<TcpListener> {
    let file = File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    thread::spawn(move || -> Result<TcpListener> {
        // SAFETY: setns takes an open descriptor (kept open by `file` for the call) and a
        // namespace type; it moves only this short-lived thread into the namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(TcpListener::bind((addr, 0))?)
    })
    .join()
    .map_err(|_| anyhow!("the namespace thread panicked"))?
}

/// Accepts one connection within `timeout` and reads it to the end.
fn receive_one(listener: TcpListener, timeout: Duration) -> thread::JoinHandle<Result<Vec<u8>>> {
    thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(anyhow!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut data = Vec::new();
        stream.read_to_end(&mut data)?;
        Ok(data)
    })
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let netns = demo_host()?.netns.clone().map_err(|e| anyhow!(e))?;
    let mut out = String::new();
    let status = lab.wait_for("the PPP link to be up", UP_TIMEOUT, |s| {
        device_status(s, lab.name(), "ppp")["state"] == "up"
    })?;
    let ppp = device_status(&status, lab.name(), "ppp");
    let iface = ppp["interface"].as_str().unwrap_or("?").to_owned();
    out.push_str(&format!(
        "vstreamctl status: devices.ppp state {}, interface {iface} in netns {netns}, links {}\n",
        ppp["state"], ppp["links"]
    ));
    let host_addr = Command::new("ip")
        .args([
            "netns", "exec", &netns, "ip", "-4", "addr", "show", "dev", &iface,
        ])
        .output()
        .context("ip netns exec")?;
    let host_addr = String::from_utf8_lossy(&host_addr.stdout).into_owned();
    let want = format!("{PPP_LOCAL} peer {PPP_REMOTE}/32");
    ensure!(
        host_addr.contains(&want),
        "the host end {iface} has no {want}: {host_addr}"
    );
    let guest_addr = guest_sh(lab, "ip -4 addr show dev ppp0")?;
    ensure!(
        guest_addr.contains(&format!("inet {PPP_REMOTE} peer {PPP_LOCAL}")),
        "ppp0 in the guest: {guest_addr}"
    );
    let inet = |t: &str| {
        t.lines()
            .find(|l| l.trim_start().starts_with("inet "))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    out.push_str(&format!(
        "host  {iface}: {}\nguest ppp0: {}\n",
        inet(&host_addr),
        inet(&guest_addr)
    ));

    let ping = guest_sh(lab, &format!("ping -c 5 -i 0.2 {PPP_LOCAL}"))?;
    ensure!(ping.contains("5 packets received"), "{ping}");
    out.push_str(&format!("guest: ping -c 5 -i 0.2 {PPP_LOCAL}\n"));
    for line in ping
        .lines()
        .filter(|l| l.contains("packets") || l.contains("round-trip"))
    {
        out.push_str(&format!("  {line}\n"));
    }

    // 1 MiB of TCP from the guest to a listener on the host end of the link.
    let len = 1 << 20;
    let made = guest_sh(
        lab,
        &format!("head -c {len} /dev/urandom > /tmp/ppp.bin && sha256sum /tmp/ppp.bin"),
    )?;
    let sum = first_word(&made)?;
    let listener = listen_in_netns(&netns, PPP_LOCAL.parse()?)?;
    let port = listener.local_addr()?.port();
    let rx = receive_one(listener, Duration::from_secs(60));
    let started = Instant::now();
    let sent = guest_sh(lab, &format!("nc {PPP_LOCAL} {port} < /tmp/ppp.bin"));
    let got = rx
        .join()
        .map_err(|_| anyhow!("the receiver panicked"))?
        .context("receiving on the host end")?;
    let took = started.elapsed();
    sent?;
    ensure!(got.len() == len, "{} of {len} bytes arrived", got.len());
    ensure!(
        sha256_host(None, &got)? == sum,
        "the bytes changed on the way"
    );
    out.push_str(&format!(
        "guest: nc {PPP_LOCAL} {port} < /tmp/ppp.bin: 1 MiB arrived on the host end intact \
         (sha256 {}) in {:.2} s ({:.2} MiB/s)\n",
        &sum[..16],
        took.as_secs_f64(),
        1.0 / took.as_secs_f64()
    ));
    Ok(out)
}
