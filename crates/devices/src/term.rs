//! Terminals, shared by the devices that run programs on one (tty's sessions, ppp's pppd) and by
//! host programs that put the user's terminal in raw mode (`vstreamctl shell`, `console`).

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A new pseudo-terminal of `size`: (master, slave).
pub fn open_pty(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::OpenptFlags;
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    // The slave straight from the master (Linux >= 4.13): no path lookup in /dev/pts.
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    Ok((master, slave))
}

fn winsize(size: WindowSize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// The master side of a pseudo-terminal, non-blocking, read and written from different tasks.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    /// Wraps a master descriptor from [`open_pty`] (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<PtyMaster> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        // SAFETY: `fd` is an open descriptor, owned from here on by the AsyncFd: it stays open
        // until the AsyncFd is dropped, and `OwnedFd::as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(PtyMaster { fd })
    }

    /// Reads output; 0 once every slave descriptor is closed (the master then reads EIO).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            let result = ready.try_io(|fd| match rustix::io::read(fd.get_ref(), &mut *buf) {
                Err(rustix::io::Errno::IO) => Ok(0),
                r => r.map_err(io::Error::from),
            });
            if let Ok(r) = result {
                return r;
            }
        }
    }

    /// Types `data` into the terminal.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut ready = self.fd.writable().await?;
            let result =
                ready.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(io::Error::from));
            if let Ok(r) = result {
                data = &data[r?..];
            }
        }
        Ok(())
    }

    /// Sets the terminal size; the kernel signals `SIGWINCH` to its foreground process group.
    pub fn resize(&self, size: WindowSize) -> io::Result<()> {
        rustix::termios::tcsetwinsize(self.fd.get_ref(), winsize(size))?;
        Ok(())
    }
}

/// The local terminal in raw mode for the life of the value.
pub struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    /// Puts standard input's terminal in raw mode until the value is dropped.
    pub fn enter() -> io::Result<RawMode> {
        let stdin = rustix::stdio::stdin();
        let saved = rustix::termios::tcgetattr(stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            rustix::stdio::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
