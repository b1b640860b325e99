//! Host networking for the PPP link: network namespaces, a TUN device for the userspace
//! endpoint, interface addresses and routes. Everything is done with ioctls on descriptors
//! created inside the target namespace, so nothing depends on iproute2.
//!
//! A descriptor keeps the namespace it was created in: a socket made in namespace N configures
//! the interfaces and routes of N, and `/dev/net/tun` opened in N makes its device in N. So the
//! few calls that create descriptors run on a short-lived thread that has joined N (`setns`
//! changes only the calling thread's namespace), and the rest of the daemon never leaves its own.

use std::fs::File;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use tokio::io::unix::AsyncFd;

/// Where `ip netns add NAME` puts a namespace.
pub const NETNS_DIR: &str = "/run/netns";

/// The file of a network namespace: `NAME` is looked up in [`NETNS_DIR`], a path is used as is
/// (e.g. `/proc/PID/ns/net`).
pub fn netns_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new(NETNS_DIR).join(name)
    }
}

/// Runs `f` on a new thread that has joined the network namespace at `ns` (or on the calling
/// thread if `None`). Descriptors `f` creates belong to that namespace.
pub fn in_netns<T, F>(ns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let Some(ns) = ns else {
        return f();
    };
    let file = File::open(ns).map_err(|e| {
        io::Error::new(e.kind(), format!("network namespace {}: {e}", ns.display()))
    })?;
    let shown = ns.display().to_string();
    std::thread::Builder::new()
        .name("ppp-netns".into())
        .spawn(move || {
            // Only this thread enters the namespace, and it ends when `f` returns, so no other
            // code ever runs in the namespace by accident.
            move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                |e| {
                    let e = io::Error::from(e);
                    io::Error::new(
                        e.kind(),
                        format!("cannot enter network namespace {shown}: {e}"),
                    )
                },
            )?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// `struct ifreq` with `name` filled in.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1-15 bytes)"),
        ));
    }
    // SAFETY: ifreq is plain old data (arrays, integers, a union of such and a raw pointer);
    // all zeroes is a valid value of it.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

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

/// A TUN device (IPv4 packets, no packet information header), non-blocking. The interface
/// disappears when this is dropped.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

impl Tun {
    /// Creates interface `name` in the namespace at `ns` (the daemon's own if `None`).
    pub fn create(ns: Option<&Path>, name: &str) -> io::Result<Tun> {
        ifreq(name)?;
        let owned = name.to_owned();
        let fd = in_netns(ns, move || {
            let mut req = ifreq(&owned)?;
            let file = File::options()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
            let fd = OwnedFd::from(file);
            req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, valid and
            // exclusively borrowed for the call; `fd` is an open /dev/net/tun descriptor.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut _) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating TUN interface {owned}: {e}"),
                ));
            }
            Ok(fd)
        })?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        // SAFETY: `fd` is an open descriptor, owned from here on by the AsyncFd: it stays open
        // until the AsyncFd is dropped, and `OwnedFd::as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(Tun {
            fd,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet the host's network stack sends through the interface.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            if let Ok(r) = ready.try_io(|fd| {
                rustix::io::read(fd.get_ref().as_fd(), &mut *buf).map_err(io::Error::from)
            }) {
                return r;
            }
        }
    }

    /// Reads one packet if one is queued, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<usize> {
        match rustix::io::read(self.fd.get_ref(), buf) {
            Ok(n) if n > 0 => Some(n),
            _ => None,
        }
    }

    /// Hands one packet to the host's network stack. A full queue drops it, as a congested
    /// link would (TCP will send it again).
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        match rustix::io::write(self.fd.get_ref(), packet) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
