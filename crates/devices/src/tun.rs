//! Host interfaces shared by the network devices (ppp's TUN, fastnet's TAP): network namespaces
//! and the `/dev/net/tun` device.
//!
//! A descriptor keeps the namespace it was created in: a socket made in namespace N configures
//! the interfaces and routes of N, and `/dev/net/tun` opened in N makes its device in N. So the
//! few calls that create descriptors run on a short-lived thread that has joined N (`setns`
//! changes only the calling thread's namespace), and the rest of the daemon never leaves its own.

use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
        .name("netns".into())
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
pub(crate) fn ifreq(name: &str) -> io::Result<libc::ifreq> {
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

/// A TUN device (IPv4 packets, no packet information header) or another kind from
/// [`Tun::create_with`] (a TAP), non-blocking. The interface disappears when this is
/// dropped.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

impl Tun {
    /// Creates interface `name` in the namespace at `ns` (the daemon's own if `None`).
    pub fn create(ns: Option<&Path>, name: &str) -> io::Result<Tun> {
        Tun::create_with(ns, name, libc::IFF_TUN | libc::IFF_NO_PI, |_| Ok(()))
    }

    /// Creates interface `name` in the namespace at `ns` with the `TUNSETIFF` `flags`, then
    /// runs `configure` on the descriptor (more ioctls) before it becomes non-blocking.
    pub fn create_with<F>(
        ns: Option<&Path>,
        name: &str,
        flags: libc::c_int,
        configure: F,
    ) -> io::Result<Tun>
    where
        F: FnOnce(&OwnedFd) -> io::Result<()> + Send + 'static,
    {
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
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, valid and
            // exclusively borrowed for the call; `fd` is an open /dev/net/tun descriptor.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut _) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating TUN interface {owned}: {e}"),
                ));
            }
            configure(&fd)?;
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

/// The descriptor, for reads and writes that must not go through a slice (fastnet's rings in
/// shared memory).
impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
