//! The guest's end of a fastnet link: finding the segment, choosing the mode, and the link
//! itself (a guest TAP whose packets go through the rings or on the channel). QEMU's
//! `ivshmem-plain` device is PCI 1af4:1110; its BAR 2 is the shared segment, which the agent
//! maps through sysfs (`resource2`) with no kernel driver.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::link::{next, pump, rings, send, LinkError, Stats};
use super::ring::{Layout, Memory, Segment};
use super::{choose_mode, Decoder, Found, GuestMsg, HostMsg, Mode, Setup};
use super::{PROTOCOL_VERSION, READ_CHUNK};

/// Where the kernel lists PCI devices.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// PCI vendor and device id of QEMU's `ivshmem-plain` (Red Hat, Inc.).
pub const IVSHMEM_ID: (u16, u16) = (0x1af4, 0x1110);

fn read_id(dir: &Path, file: &str) -> Option<u16> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The `resource2` files of the ivshmem devices under `devices` (normally
/// [`SYSFS_PCI_DEVICES`]), in address order.
pub fn ivshmem_bars(devices: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|d| {
            read_id(d, "vendor") == Some(IVSHMEM_ID.0) && read_id(d, "device") == Some(IVSHMEM_ID.1)
        })
        .map(|d| d.join("resource2"))
        .collect();
    found.sort();
    found
}

/// Maps the first ivshmem device's BAR 2 and reads its header: what [`super::choose_mode`]
/// needs, and the mapping if there is one.
pub fn find_segment(devices: &Path) -> (Found, Option<Segment>) {
    let Some(bar) = ivshmem_bars(devices).into_iter().next() else {
        return (
            Found::Nothing(format!(
                "no ivshmem-plain device (PCI {:04x}:{:04x}) in {}",
                IVSHMEM_ID.0,
                IVSHMEM_ID.1,
                devices.display()
            )),
            None,
        );
    };
    if let Err(e) = enable(bar.parent().unwrap_or(devices)) {
        return (Found::Nothing(e), None);
    }
    match Segment::open_file(&bar) {
        Ok(seg) => {
            let size = seg.size() as u64;
            (Found::Segment(size, Layout::read(&seg)), Some(seg))
        }
        Err(e) => (
            Found::Nothing(format!("cannot map {}: {e}", bar.display())),
            None,
        ),
    }
}

/// Turns on the device's memory decoding (no driver did) if its `enable` file says it is
/// off; a directory without the file (not sysfs) is left as it is.
fn enable(dev: &Path) -> Result<(), String> {
    let file = dev.join("enable");
    match std::fs::read_to_string(&file) {
        Ok(v) if v.trim() == "0" => {
            std::fs::write(&file, "1").map_err(|e| format!("cannot enable {}: {e}", dev.display()))
        }
        _ => Ok(()),
    }
}

/// Runs one link on `stream` (a `fastnet` channel the agent opened): waits for the host's
/// `Setup`, creates TAP `ifname` with the address and MTU it gives, looks for the segment if
/// the host offers one (in `devices`, normally [`SYSFS_PCI_DEVICES`]), answers `Ready` with
/// the mode it chose and moves packets until an error or the host's reset.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    ifname: &str,
    devices: &Path,
    stats: &Stats,
) -> Result<(), LinkError> {
    let mut dec = Decoder::<HostMsg>::new();
    let mut rbuf = vec![0u8; READ_CHUNK];
    let setup = loop {
        match next(&mut stream, &mut dec).await? {
            HostMsg::Setup(s) => break s,
            HostMsg::Reset(why) => return Err(LinkError::HostReset(why)),
            _ => {}
        }
    };
    if setup.version != PROTOCOL_VERSION || !setup.vnet_hdr {
        let why = format!(
            "this agent speaks version {PROTOCOL_VERSION} with vnet headers; the host sent version {} (vnet_hdr {})",
            setup.version, setup.vnet_hdr
        );
        send(&mut stream, &GuestMsg::Reset(why.clone())).await?;
        return Err(LinkError::GuestReset(why));
    }
    let tap = super::tap::create(None, ifname)?;
    configure(ifname, &setup).await?;
    // No segment offered: the PCI devices are not even looked at.
    let (found, seg) = if setup.segment_size == 0 {
        (Found::Nothing(String::new()), None)
    } else {
        find_segment(devices)
    };
    let layout = match &found {
        Found::Segment(_, Ok(layout)) => Some(*layout),
        _ => None,
    };
    let ready = choose_mode(&setup, found);
    tracing::info!(
        %ifname,
        mode = ?ready.mode,
        reason = ready.reason.as_deref().unwrap_or(""),
        "fastnet: link up"
    );
    stats.set_ready(&ready);
    send(&mut stream, &GuestMsg::Ready(ready.clone())).await?;
    match (ready.mode, seg, layout) {
        (Mode::SharedMemory, Some(seg), Some(layout)) => {
            // The guest never polls: its vCPU is what the link is short of.
            let poll_for = std::time::Duration::ZERO;
            let segment = (Arc::new(seg), layout);
            rings(&mut stream, &tap, segment, dec, &mut rbuf, stats, poll_for).await
        }
        _ => pump(&mut stream, &tap, dec, stats).await,
    }
}

/// Sets the interface's MAC, MTU and address from `setup` and brings it up, with `ip` (the
/// guest's iproute2 or busybox applet): values from the host are passed as arguments, never
/// through a shell.
async fn configure(ifname: &str, setup: &Setup) -> std::io::Result<()> {
    let mtu = setup.mtu.to_string();
    let mut steps: Vec<Vec<&str>> = vec![vec![
        "link",
        "set",
        "dev",
        ifname,
        "address",
        &setup.guest_mac,
        "mtu",
        &mtu,
        "up",
    ]];
    if let Some(addr) = &setup.guest_address {
        steps.push(vec!["addr", "add", addr, "dev", ifname]);
    }
    for args in steps {
        let mut ip = tokio::process::Command::new("ip");
        crate::spawn::undo_inherited(ip.as_std_mut());
        let out = ip
            .args(&args)
            .output()
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("running ip: {e}")))?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}
