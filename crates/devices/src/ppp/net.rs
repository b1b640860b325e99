//! Host networking for the PPP link: interface addresses and routes, set with ioctls on a
//! socket created inside the target namespace (so nothing depends on iproute2). The namespaces
//! and the TUN device are in [`crate::tun`], shared with fastnet.

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::tun::{ifreq, in_netns};

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data C structs; the kernel reads
    // a sockaddr of family AF_INET as a sockaddr_in. transmute_copy reads size_of::<sockaddr>()
    // bytes from a sockaddr_in of the same size.
    unsafe { mem::transmute_copy::<libc::sockaddr_in, libc::sockaddr>(&sin) }
}

/// Issues a socket ioctl that takes a `struct ifreq`.
fn ifreq_ioctl(sock: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `sock` is an open socket; every request passed here (SIOC[GS]IF*) reads or writes
    // exactly one `struct ifreq`, which `req` is, valid and exclusively borrowed for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn udp_socket() -> io::Result<OwnedFd> {
    use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
    Ok(socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A socket in some network namespace, for configuring its interfaces and routes.
#[derive(Debug)]
pub struct NetConfig {
    sock: OwnedFd,
}

/// `struct rtentry` of `<net/route.h>` (not in the libc crate for glibc targets).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_HOST: libc::c_ushort = 0x0004;

impl NetConfig {
    /// A configuration socket in the namespace at `ns` (the daemon's own if `None`).
    pub fn open(ns: Option<&Path>) -> io::Result<NetConfig> {
        let sock = in_netns(ns, udp_socket)?;
        Ok(NetConfig { sock })
    }

    /// Gives a point-to-point interface its addresses and MTU and brings it up.
    pub fn configure_ptp(
        &self,
        ifname: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        mtu: u16,
    ) -> io::Result<()> {
        let at = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{ifname}: setting the {what}: {e}"))
        };
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(local);
        ifreq_ioctl(&self.sock, libc::SIOCSIFADDR as libc::Ioctl, &mut req)
            .map_err(|e| at("address", e))?;
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_dstaddr = sockaddr_in(remote);
        ifreq_ioctl(&self.sock, libc::SIOCSIFDSTADDR as libc::Ioctl, &mut req)
            .map_err(|e| at("peer address", e))?;
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::BROADCAST);
        ifreq_ioctl(&self.sock, libc::SIOCSIFNETMASK as libc::Ioctl, &mut req)
            .map_err(|e| at("netmask", e))?;
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        ifreq_ioctl(&self.sock, libc::SIOCSIFMTU as libc::Ioctl, &mut req)
            .map_err(|e| at("MTU", e))?;
        let mut req = ifreq(ifname)?;
        ifreq_ioctl(&self.sock, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req)
            .map_err(|e| at("flags", e))?;
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ifreq_ioctl(&self.sock, libc::SIOCSIFFLAGS as libc::Ioctl, &mut req)
            .map_err(|e| at("flags", e))?;
        Ok(())
    }

    /// Adds a route to `net/prefix` through interface `ifname` (replacing nothing: an existing
    /// identical route is not an error).
    pub fn add_route(&self, ifname: &str, net: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let _ = ifreq(ifname)?;
        let prefix = prefix.min(32);
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        let mut dev: Vec<libc::c_char> = ifname.bytes().map(|b| b as libc::c_char).collect();
        dev.push(0);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::from(u32::from(net) & mask)),
            rt_gateway: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_genmask: sockaddr_in(Ipv4Addr::from(mask)),
            rt_flags: RTF_UP | if prefix == 32 { RTF_HOST } else { 0 },
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry`, which `rt` is (same layout as the C
        // struct); `rt_dev` points to a NUL-terminated name in `dev`, alive for the call.
        let r = unsafe {
            libc::ioctl(
                self.sock.as_raw_fd(),
                libc::SIOCADDRT as libc::Ioctl,
                &mut rt as *mut RtEntry,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(());
            }
            return Err(io::Error::new(
                e.kind(),
                format!("route {net}/{prefix} via {ifname}: {e}"),
            ));
        }
        Ok(())
    }
}
