//! The `port:NAME` transport: a virtio-serial port, seen from the guest.
//!
//! # Finding the device
//! udev names ports `/dev/virtio-ports/NAME`; a guest without udev has only
//! `/sys/class/virtio-ports/vportNpM/name` (holding NAME) and `/dev/vportNpM`. The endpoint tries
//! the first, then scans the second.
//!
//! # Host connected or not
//! A virtio-serial port exists as long as the VM has the device, whether or not anything on the
//! host has the other end open. While nothing does, the guest's `poll` reports `POLLHUP` and
//! `read` returns 0 (end of file). So:
//!
//! - `Endpoint::next` opens the port and, while the host side is not connected, waits, checking
//!   every [`POLL_INTERVAL`] (a `POLLHUP` state would make epoll spin, so this is a timed poll);
//!   it returns once the host is connected.
//! - When the host goes away the connection reads end of file. The caller drops the connection
//!   and calls `next` again, which waits for the host to come back.
//!
//! The kernel lets one process hold a port open at a time, so drop the old connection before
//! calling `next` again: opening a port that is still open fails with "busy".
//! `next` fails at once (and the caller's backoff takes over) if no port has the name, or the port
//! goes away while `next` waits.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};

use crate::address::Address;
use crate::fd::FdStream;
use crate::{with_context, Connection, PeerIdentity};

/// How often a waiting endpoint looks whether the host side has connected.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A virtio-serial port found by name, under a sysfs root and a /dev root.
#[derive(Debug)]
pub(crate) struct PortDevice {
    name: String,
    sysfs_root: PathBuf,
    dev_root: PathBuf,
    poll_interval: Duration,
}

impl PortDevice {
    /// The port called `name` on this machine.
    pub(crate) fn new(name: &str) -> Self {
        Self::with_roots(name, "/sys", "/dev")
    }

    /// The port called `name`, looking in `sysfs_root/class/virtio-ports` and `dev_root` instead
    /// of `/sys/...` and `/dev` (tests build fake trees).
    pub(crate) fn with_roots(
        name: &str,
        sysfs_root: impl Into<PathBuf>,
        dev_root: impl Into<PathBuf>,
    ) -> Self {
        PortDevice {
            name: name.to_owned(),
            sysfs_root: sysfs_root.into(),
            dev_root: dev_root.into(),
            poll_interval: POLL_INTERVAL,
        }
    }

    /// The device node of the port, by udev's name or through sysfs.
    pub(crate) fn resolve(&self) -> io::Result<PathBuf> {
        let by_name = self.dev_root.join("virtio-ports").join(&self.name);
        if by_name.exists() {
            return Ok(by_name);
        }
        let class = self.sysfs_root.join("class").join("virtio-ports");
        let entries = match std::fs::read_dir(&class) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.not_found(&by_name, &class, "no virtio-serial devices"))
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot list {}: {e}", class.display()),
                ))
            }
        };
        for entry in entries {
            let entry = entry?;
            // A port without a name file (or an unreadable one) is simply not ours.
            let Ok(name) = std::fs::read_to_string(entry.path().join("name")) else {
                continue;
            };
            if name.trim_end_matches('\n') == self.name {
                return Ok(self.dev_root.join(entry.file_name()));
            }
        }
        Err(self.not_found(&by_name, &class, "no port has this name"))
    }

    fn not_found(&self, by_name: &Path, class: &Path, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{why}: looked for {} and in {}/*/name",
                by_name.display(),
                class.display()
            ),
        )
    }

    /// Opens the port and waits until the host side is connected.
    pub(crate) async fn open(&self, addr: &Address) -> io::Result<Connection> {
        let path = self
            .resolve()
            .map_err(with_context(addr, "cannot find the virtio-serial port"))?;
        let fd = open_device(&path).map_err(|e| {
            let what = if e.raw_os_error() == Some(libc::EBUSY) {
                format!(
                    "cannot open {} (already open: by a connection not yet dropped, or by another process)",
                    path.display()
                )
            } else {
                format!("cannot open {}", path.display())
            };
            with_context(addr, &what)(e)
        })?;
        self.wait_for_host(&fd, &path)
            .await
            .map_err(with_context(addr, "while waiting for the host side"))?;
        let stream = FdStream::new(fd, true)
            .map_err(with_context(addr, "cannot use the port device"))?
            .filling_reads();
        tracing::debug!(%addr, device = %path.display(), "virtio-serial port connected");
        Ok(Connection {
            stream: Box::new(stream),
            peer: format!("{addr} ({})", path.display()),
            identity: PeerIdentity::Opened,
        })
    }

    /// Returns once `fd` no longer reports a hang-up, checking every `poll_interval`; fails if
    /// the device at `path` disappears meanwhile.
    pub(crate) async fn wait_for_host(&self, fd: &OwnedFd, path: &Path) -> io::Result<()> {
        let mut logged = false;
        loop {
            let events = poll_now(fd)?;
            if events.contains(PollFlags::NVAL) || events.contains(PollFlags::ERR) {
                return Err(io::Error::other(format!(
                    "the port device reports an error (poll events {events:?})"
                )));
            }
            if !events.contains(PollFlags::HUP) {
                return Ok(());
            }
            if !logged {
                tracing::info!(port = %self.name, "waiting for the host to open the virtio-serial port");
                logged = true;
            }
            tokio::time::sleep(self.poll_interval).await;
            if !path.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} went away", path.display()),
                ));
            }
        }
    }
}

/// The port device, opened for nonblocking reading and writing.
fn open_device(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The poll events `fd` has right now (without waiting).
fn poll_now(fd: impl AsFd) -> io::Result<PollFlags> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => return Ok(fds[0].revents()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A new pty: its master, and the path of its slave.
    fn new_pty() -> (OwnedFd, PathBuf) {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        (
            master,
            PathBuf::from(name.into_string().expect("utf-8 pts name")),
        )
    }

    fn make_raw(tty: &OwnedFd) {
        let mut termios = rustix::termios::tcgetattr(tty).expect("tcgetattr");
        termios.make_raw();
        rustix::termios::tcsetattr(tty, rustix::termios::OptionalActions::Now, &termios)
            .expect("tcsetattr");
    }

    /// A pty standing in for a port: the master is the host side, the slave (in raw mode, so
    /// that the line discipline passes bytes unchanged) the guest's port device.
    struct FakePort {
        host: FdStream,
        device: PathBuf,
        /// Keeps the slave's raw settings while the endpoint opens and closes it.
        _slave: OwnedFd,
    }

    fn fake_port() -> FakePort {
        let (master, device) = new_pty();
        let slave = open_device(&device).expect("open slave");
        make_raw(&slave);
        FakePort {
            host: FdStream::new(master, true).expect("master stream"),
            device,
            _slave: slave,
        }
    }

    /// A fake /sys and /dev: ports `org.other` (vport0p1) and `org.vstream.0` (vport0p2), and
    /// vport0p0 without a name file. No device nodes yet.
    fn fake_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        for (port, name) in [("vport0p1", "org.other\n"), ("vport0p2", "org.vstream.0\n")] {
            let class = sys.join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&class).expect("mkdir");
            std::fs::write(class.join("name"), name).expect("write name");
        }
        std::fs::create_dir_all(sys.join("class/virtio-ports/vport0p0")).expect("mkdir");
        std::fs::create_dir_all(&dev).expect("mkdir");
        (dir, sys, dev)
    }

    fn port_endpoint(name: &str, sys: &Path, dev: &Path) -> Endpoint {
        Endpoint::with_port_device(
            Address::Port(name.to_owned()),
            PortDevice::with_roots(name, sys, dev),
        )
    }

    /// Bytes both ways, including ones a tty would act on, arrive unchanged.
    async fn exchange(connection: &mut Connection, host: &mut FdStream) {
        let to_guest = b"hello guest \x03\x04\r\n\x11\x13\xff";
        host.write_all(to_guest).await.expect("host write");
        let mut got = [0u8; 19];
        connection
            .stream
            .read_exact(&mut got)
            .await
            .expect("guest read");
        assert_eq!(&got, to_guest);
        connection
            .stream
            .write_all(b"hello host\n")
            .await
            .expect("guest write");
        let mut got = [0u8; 11];
        host.read_exact(&mut got).await.expect("host read");
        assert_eq!(&got, b"hello host\n");
    }

    #[tokio::test]
    async fn finds_the_port_through_sysfs_and_reconnects() {
        let (_dir, sys, dev) = fake_tree();
        let mut first = fake_port();
        std::os::unix::fs::symlink(&first.device, dev.join("vport0p2")).expect("symlink");
        let mut endpoint = port_endpoint("org.vstream.0", &sys, &dev);

        let mut connection = endpoint.next().await.expect("next");
        let expected_peer = format!("port:org.vstream.0 ({})", dev.join("vport0p2").display());
        assert_eq!(connection.peer, expected_peer);
        exchange(&mut connection, &mut first.host).await;

        // The host side goes away: the connection reads end of file.
        drop(first);
        let mut rest = [0u8; 8];
        let n = connection
            .stream
            .read(&mut rest)
            .await
            .expect("read at hang-up");
        assert_eq!(n, 0);
        drop(connection);

        // While the device node is gone, next() fails and names it.
        std::fs::remove_file(dev.join("vport0p2")).expect("unlink");
        let error = endpoint.next().await.expect_err("no device");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let message = error.to_string();
        assert!(
            message.starts_with("port:org.vstream.0: cannot open "),
            "{message}"
        );
        assert!(message.contains("dev/vport0p2"), "{message}");

        // The device is back with a new host side: the caller's next() works again.
        let mut second = fake_port();
        std::os::unix::fs::symlink(&second.device, dev.join("vport0p2")).expect("symlink");
        let mut connection = endpoint.next().await.expect("next after reconnect");
        exchange(&mut connection, &mut second.host).await;
    }

    #[tokio::test]
    async fn prefers_the_udev_name() {
        let (_dir, sys, dev) = fake_tree();
        let mut port = fake_port();
        std::fs::create_dir_all(dev.join("virtio-ports")).expect("mkdir");
        let link = dev.join("virtio-ports/org.vstream.0");
        std::os::unix::fs::symlink(&port.device, &link).expect("symlink");
        // There is no dev/vport0p2: only the udev name leads to the device.
        let device = PortDevice::with_roots("org.vstream.0", &sys, &dev);
        assert_eq!(device.resolve().expect("resolve"), link);
        let mut endpoint = port_endpoint("org.vstream.0", &sys, &dev);
        let mut connection = endpoint.next().await.expect("next");
        exchange(&mut connection, &mut port.host).await;
    }

    #[tokio::test]
    async fn an_unknown_name_is_not_found() {
        let (_dir, sys, dev) = fake_tree();
        let device = PortDevice::with_roots("org.missing", &sys, &dev);
        let error = device.resolve().expect_err("no such port");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains("no port has this name"),
            "{error}"
        );

        let bare = tempfile::tempdir().expect("tempdir");
        let device = PortDevice::with_roots("org.missing", bare.path(), bare.path());
        let error = device.resolve().expect_err("no sysfs class");
        assert!(
            error.to_string().contains("no virtio-serial devices"),
            "{error}"
        );

        let mut endpoint = port_endpoint("org.missing", &sys, &dev);
        let error = endpoint.next().await.expect_err("no such port");
        assert!(
            error.to_string().starts_with("port:org.missing: "),
            "{error}"
        );
    }

    fn thread_cpu_time() -> Duration {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    /// A pty master whose slave has been opened and closed: it reports POLLHUP, as a port does
    /// while the host side is away, until the slave (the "host") opens again.
    fn hung_up_master() -> (OwnedFd, PathBuf) {
        let (master, slave_path) = new_pty();
        drop(open_device(&slave_path).expect("open slave"));
        assert!(poll_now(&master).expect("poll").contains(PollFlags::HUP));
        (master, slave_path)
    }

    #[tokio::test]
    async fn waits_without_spinning_until_the_host_connects() {
        let (device_fd, host_path) = hung_up_master();
        let dir = tempfile::tempdir().expect("tempdir");
        let device = PortDevice {
            poll_interval: Duration::from_millis(50),
            ..PortDevice::with_roots("p", dir.path(), dir.path())
        };
        let start = Instant::now();
        let host_fd = {
            let cpu_start = thread_cpu_time();
            let wait = device.wait_for_host(&device_fd, dir.path());
            tokio::pin!(wait);
            // Still waiting after 600 ms, and hardly using the CPU meanwhile.
            tokio::select! {
                result = &mut wait => panic!("returned while the host was away: {result:?}"),
                () = tokio::time::sleep(Duration::from_millis(600)) => {}
            }
            let cpu = thread_cpu_time() - cpu_start;
            assert!(
                cpu < Duration::from_millis(100),
                "used {cpu:?} of CPU while waiting"
            );

            // The host side opens: the wait ends within about one poll interval.
            let host_fd = open_device(&host_path).expect("reopen slave");
            let opened = Instant::now();
            wait.await.expect("wait");
            assert!(
                opened.elapsed() < Duration::from_millis(500),
                "{:?}",
                opened.elapsed()
            );
            host_fd
        };
        assert!(start.elapsed() >= Duration::from_millis(600));

        // And bytes flow through the "port".
        make_raw(&host_fd);
        let mut guest = FdStream::new(device_fd, true).expect("stream");
        let mut host = FdStream::new(host_fd, true).expect("stream");
        host.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        guest.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_vanished_device_ends_the_wait() {
        let (device_fd, _host_path) = hung_up_master();
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("vport0p1");
        std::fs::write(&node, b"").expect("fake node");
        let device = PortDevice {
            poll_interval: Duration::from_millis(20),
            ..PortDevice::with_roots("p", dir.path(), dir.path())
        };
        let remover = {
            let node = node.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::fs::remove_file(node).expect("unlink");
            })
        };
        let error = device
            .wait_for_host(&device_fd, &node)
            .await
            .expect_err("device went away");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(error.to_string().contains("went away"), "{error}");
        remover.await.expect("join");
    }
}
