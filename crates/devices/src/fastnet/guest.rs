//! The guest's end of a fastnet link (so far: finding the segment). QEMU's `ivshmem-plain`
//! device is PCI 1af4:1110; its BAR 2 is the shared segment, which the agent maps through
//! sysfs (`resource2`) with no kernel driver.

use std::path::{Path, PathBuf};

use super::ring::{Layout, Segment};
use super::Found;

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
    match Segment::open_file(&bar) {
        Ok(seg) => {
            let size = super::ring::Memory::size(&seg) as u64;
            (Found::Segment(size, Layout::read(&seg)), Some(seg))
        }
        Err(e) => (
            Found::Nothing(format!("cannot map {}: {e}", bar.display())),
            None,
        ),
    }
}
