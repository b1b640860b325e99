//! The TAP interface at either end of a fastnet link: Ethernet frames with a 12-byte
//! `virtio_net_hdr_v1` in front and the offloads on, so that a 64 KiB TCP segment crosses the
//! rings as one packet (the kernel segments or checksums it where needed).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::tun::Tun;

/// Bytes of `struct virtio_net_hdr_v1` before each frame.
pub const VNET_HDR_LEN: usize = 12;

/// `TUNSETOFFLOAD` flags (linux/if_tun.h): checksum offload, TSO for IPv4 and IPv6, ECN.
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Creates TAP interface `name` in the namespace at `ns` with vnet headers of
/// [`VNET_HDR_LEN`] bytes and checksum and TSO offloads.
pub fn create(ns: Option<&Path>, name: &str) -> io::Result<Tun> {
    Tun::create_with(
        ns,
        name,
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        |fd: &OwnedFd| {
            let len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `len`,
            // alive for the call; `fd` is an open TAP descriptor.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) } != 0 {
                return Err(with_context("TUNSETVNETHDRSZ"));
            }
            let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
            // SAFETY: TUNSETOFFLOAD takes the flags by value; `fd` is an open TAP descriptor.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, offloads) } != 0 {
                return Err(with_context("TUNSETOFFLOAD"));
            }
            Ok(())
        },
    )
}

fn with_context(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("TAP {what}: {e}"))
}
