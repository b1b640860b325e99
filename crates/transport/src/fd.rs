//! Streams over plain descriptors: the `fd:N` and `stdio` transports, and [`FdStream`], the async
//! stream that serial lines and virtio-serial ports use as well.
//!
//! [`FdStream`] drives a nonblocking descriptor through tokio's [`AsyncFd`] (epoll), so it works for
//! sockets, ttys, ptys, pipes and FIFOs; it does not work for regular files, which epoll cannot
//! watch.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use rustix::fs::{fcntl_getfl, fcntl_setfl, fstat, FileType, OFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::address::Address;
use crate::{with_context, Connection, PeerIdentity};

/// An async byte stream over one descriptor, or over a pair (one to read, one to write).
pub(crate) struct FdStream {
    read: AsyncFd<OwnedFd>,
    /// The descriptor to write to, when it is not `read`.
    write: Option<AsyncFd<OwnedFd>>,
    /// Report `EIO` from read as the end of the stream: a tty whose other side hung up (a closed
    /// pty master, an unplugged USB serial adapter) fails reads with `EIO`.
    eio_is_eof: bool,
    /// Fill the caller's buffer with as many reads as return data at once (see
    /// [`FdStream::filling_reads`]).
    fill_reads: bool,
    /// Released after `read` and `write` are closed (fields drop in declaration order).
    _claim: Option<FdClaim>,
    /// Puts back the flags of descriptors shared with the rest of the process (stdio).
    _restore: Vec<RestoreFlags>,
}

impl FdStream {
    /// Wraps `fd` (made nonblocking here) for reading and writing.
    pub(crate) fn new(fd: OwnedFd, eio_is_eof: bool) -> io::Result<Self> {
        Ok(FdStream {
            read: register(fd)?,
            write: None,
            eio_is_eof,
            fill_reads: false,
            _claim: None,
            _restore: Vec::new(),
        })
    }

    /// Makes one `poll_read` go on reading while the descriptor has data and the buffer room,
    /// for devices that hand out little per read: a virtio-serial port returns one receive
    /// buffer (a page, 4 KiB) per `read`, a tty what its line discipline holds. The reader
    /// then takes in a bulk transfer in large pieces, each locking the session, decoding and
    /// waking the link's writer once, instead of once per 4 KiB.
    pub(crate) fn filling_reads(mut self) -> Self {
        self.fill_reads = true;
        self
    }
}

impl crate::Stream for FdStream {
    fn descriptor(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // A pair (stdio) is two descriptors: not one connection to hand on.
        match self.write {
            None => Some(self.read.get_ref().as_fd()),
            Some(_) => None,
        }
    }
}

impl Connection {
    /// A connection over `fd`, a stream's [`descriptor`](crate::Stream::descriptor) that an
    /// earlier vstreamd kept open across `exec` (a live upgrade): the connection goes on where
    /// it was, without reconnecting. Works for sockets, ttys and virtio-serial ports alike.
    pub fn adopt(fd: OwnedFd, peer: String) -> io::Result<Connection> {
        // A tty's hang-up reads as EIO: the end of the stream, as for a serial line opened here.
        Ok(Connection {
            stream: Box::new(FdStream::new(fd, true)?),
            peer,
            identity: PeerIdentity::Opened,
        })
    }
}

/// Sets `O_NONBLOCK` on `fd` and registers it with the tokio reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    set_nonblocking(&fd)?;
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and is the same descriptor
    // from every `as_raw_fd` call, until the `OwnedFd` is dropped, which the `AsyncFd` that owns
    // it does only when it is dropped itself.
    let registered = unsafe { AsyncFd::register(fd) };
    registered.map_err(|e| {
        let e = io::Error::from(e);
        if e.raw_os_error() == Some(libc::EPERM) {
            io::Error::new(
                e.kind(),
                format!("epoll cannot watch this descriptor (a regular file or /dev/null?): {e}"),
            )
        } else {
            e
        }
    })
}

fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let flags = fcntl_getfl(&fd)?;
    if !flags.contains(OFlags::NONBLOCK) {
        fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
    }
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        loop {
            let mut guard = ready!(this.read.poll_read_ready(cx))?;
            loop {
                let got = buf.filled().len() > start;
                // Read into the spare room as it is: zeroing it first (`initialize_unfilled`)
                // cost a pass over every received byte, a large part of an emulated guest's
                // receive path.
                // SAFETY: the slice is only handed to read(2) or readv(2), which write into it
                // and never de-initialise anything.
                let unfilled = unsafe { buf.unfilled_mut() };
                let read = guard.try_io(|fd| {
                    if this.fill_reads {
                        read_pages(fd.get_ref(), unfilled)
                    } else {
                        Ok(rustix::io::read(fd.get_ref(), &mut *unfilled)?.0.len())
                    }
                });
                match read {
                    Ok(Ok(n)) => {
                        // SAFETY: the read initialised the first `n` bytes of the spare room.
                        unsafe { buf.assume_init(n) };
                        buf.advance(n);
                        if n == 0 || !this.fill_reads || buf.remaining() == 0 {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    // What was read goes up first; the error (or the end) comes again on the
                    // next read.
                    Ok(Err(_)) if got => return Poll::Ready(Ok(())),
                    Ok(Err(e)) if this.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) if got => return Poll::Ready(Ok(())),
                    Err(_would_block) => break,
                }
            }
        }
    }
}

/// Most pages one [`read_pages`] asks for (256 KiB, a link reader's largest buffer).
const READ_PAGES: usize = 64;

/// Reads into `room` with one `readv` of page-sized pieces. A virtio-serial port gives at most
/// one of its receive buffers (a page) per `read`; the kernel serves a `readv` on it as one
/// `read` per piece for as long as each fills its piece, so a bulk transfer takes in up to
/// [`READ_PAGES`] buffers per system call instead of one (under TCG every system call costs
/// thousands of emulated instructions). Descriptors that read whole iovecs at once (ttys,
/// sockets, pipes) read as they would with `read`. Stops at the first short piece, as `read`
/// would: what is left comes with the next call.
fn read_pages(fd: &OwnedFd, room: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    const PAGE: usize = 4096;
    let pieces = room.len().div_ceil(PAGE).min(READ_PAGES);
    let base = room.as_mut_ptr().cast::<libc::c_void>();
    let iov: [libc::iovec; READ_PAGES] = std::array::from_fn(|i| {
        let start = (i * PAGE).min(room.len());
        libc::iovec {
            // SAFETY: `start` is within `room` (or its end), so the pointer stays in (or one
            // past) the same allocation.
            iov_base: unsafe { base.add(start) },
            iov_len: PAGE.min(room.len() - start),
        }
    });
    // libc, not rustix: rustix's readv takes initialised slices (`IoSliceMut`), and this reads
    // into the buffer's uninitialised spare room, which it must not zero first (a pass over
    // every received byte).
    // SAFETY: each of the first `pieces` iovecs describes a disjoint part of `room`, which is
    // valid for writes for its whole length and outlives the call; readv(2) only writes
    // received bytes there. `pieces` is at most READ_PAGES (64), within IOV_MAX.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), pieces as libc::c_int) };
    // A negative return is -1 with errno set; anything else is the count.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let fd = this.write.as_ref().unwrap_or(&this.read);
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the kernel; there is nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.write.as_ref().unwrap_or(&this.read);
        // A socket can tell its peer that no more data comes; a tty or pipe cannot, short of
        // closing, which happens when the stream is dropped.
        match rustix::net::shutdown(fd.get_ref(), rustix::net::Shutdown::Write) {
            Err(rustix::io::Errno::NOTSOCK) | Err(rustix::io::Errno::NOTCONN) | Ok(()) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

/// Descriptor numbers taken by `fd:N` endpoints and still open.
static CLAIMED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Marks a descriptor number as owned by an `fd:N` endpoint; dropping it releases the number.
/// Drop it only after the descriptor itself is closed.
#[derive(Debug)]
pub(crate) struct FdClaim(RawFd);

impl Drop for FdClaim {
    fn drop(&mut self) {
        CLAIMED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// An inherited descriptor taken by an `fd:N` endpoint, until `next()` hands it out.
#[derive(Debug)]
pub(crate) struct InheritedFd {
    /// `None` once handed out. Declared before `claim` so that it closes first.
    fd: Option<OwnedFd>,
    claim: Option<FdClaim>,
}

impl InheritedFd {
    /// Takes ownership of descriptor `number` for `addr` (an `fd:N` address).
    ///
    /// Fails if the descriptor is not open or another `fd:N` endpoint already owns it.
    pub(crate) fn claim(addr: &Address, number: RawFd) -> io::Result<Self> {
        if number < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr}: {number} is not a descriptor number"),
            ));
        }
        let mut claimed = CLAIMED.lock().unwrap_or_else(PoisonError::into_inner);
        if claimed.contains(&number) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{addr}: descriptor {number} is already owned by another fd:{number} endpoint"
                ),
            ));
        }
        // SAFETY: F_GETFD only reads the calling process's descriptor table; any integer is an
        // acceptable argument, an unused one just fails with EBADF.
        if unsafe { libc::fcntl(number, libc::F_GETFD) } == -1 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{addr}: descriptor {number} is not open (was it passed to this process?): {e}"
                ),
            ));
        }
        claimed.insert(number);
        // SAFETY: descriptor `number` is open (checked just above). `Address::Fd` documents that
        // the endpoint takes ownership of it, so nothing else in the process uses or closes it,
        // and the CLAIMED registry (locked here) guarantees that no other `fd:N` endpoint owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(number) };
        Ok(InheritedFd {
            fd: Some(fd),
            claim: Some(FdClaim(number)),
        })
    }

    /// Hands out the descriptor as a connection; only once.
    pub(crate) fn take(&mut self, addr: &Address) -> io::Result<Connection> {
        let Some(fd) = self.fd.take() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("{addr}: the inherited descriptor was already used; fd:N gives one connection only"),
            ));
        };
        let peer = format!("{addr} ({})", describe(&fd));
        let mut stream =
            FdStream::new(fd, false).map_err(with_context(addr, "cannot use the descriptor"))?;
        stream._claim = self.claim.take();
        Ok(Connection {
            stream: Box::new(stream),
            peer,
            identity: PeerIdentity::Opened,
        })
    }
}

/// What kind of file a descriptor is, for people.
fn describe(fd: impl AsFd) -> &'static str {
    match fstat(&fd) {
        Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
            FileType::Socket => "socket",
            FileType::Fifo => "pipe",
            FileType::CharacterDevice if rustix::termios::isatty(&fd) => "tty",
            FileType::CharacterDevice => "character device",
            FileType::RegularFile => "regular file",
            _ => "descriptor",
        },
        Err(_) => "descriptor",
    }
}

/// Puts a shared open file description's flags back when dropped.
struct RestoreFlags {
    fd: OwnedFd,
    flags: OFlags,
}

impl Drop for RestoreFlags {
    fn drop(&mut self) {
        if let Err(e) = fcntl_setfl(&self.fd, self.flags) {
            tracing::warn!(
                fd = self.fd.as_raw_fd(),
                "cannot restore descriptor flags: {e}"
            );
        }
    }
}

/// Duplicates a standard descriptor for async use; returns the duplicate and a guard that puts
/// back the original flags (`O_NONBLOCK` is shared by every descriptor of the open file).
fn dup_std(fd: impl AsFd) -> io::Result<(OwnedFd, RestoreFlags)> {
    let flags = fcntl_getfl(&fd)?;
    let restore = RestoreFlags {
        fd: rustix::io::fcntl_dupfd_cloexec(&fd, 3)?,
        flags,
    };
    let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 3)?;
    Ok((dup, restore))
}

/// Standard input and output as one stream.
///
/// Works when they are pipes, sockets or ttys (a tty is left in whatever mode it is in); fails
/// for regular files. `O_NONBLOCK` is set on them while the stream lives (other processes sharing
/// them see it too) and cleared when it is dropped.
pub(crate) fn stdio(addr: &Address) -> io::Result<Connection> {
    let (input, restore_in) =
        dup_std(rustix::stdio::stdin()).map_err(with_context(addr, "cannot duplicate stdin"))?;
    let (output, restore_out) =
        dup_std(rustix::stdio::stdout()).map_err(with_context(addr, "cannot duplicate stdout"))?;
    let read = register(input).map_err(with_context(addr, "cannot use stdin"))?;
    let write = register(output).map_err(with_context(addr, "cannot use stdout"))?;
    let stream = FdStream {
        read,
        write: Some(write),
        eio_is_eof: true,
        fill_reads: false,
        _claim: None,
        _restore: vec![restore_in, restore_out],
    };
    Ok(Connection {
        stream: Box::new(stream),
        peer: "stdio".to_owned(),
        identity: PeerIdentity::Opened,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn fd_stream_moves_bytes_over_a_pipe_pair() {
        let (r1, w1) = rustix::pipe::pipe().expect("pipe");
        let (r2, w2) = rustix::pipe::pipe().expect("pipe");
        let mut a = FdStream {
            read: register(r1).expect("register"),
            write: Some(register(w2).expect("register")),
            eio_is_eof: false,
            fill_reads: false,
            _claim: None,
            _restore: Vec::new(),
        };
        let mut b = FdStream {
            read: register(r2).expect("register"),
            write: Some(register(w1).expect("register")),
            eio_is_eof: false,
            fill_reads: false,
            _claim: None,
            _restore: Vec::new(),
        };
        // More than a pipe buffer (64 KiB), so the writer must wait for the reader.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.expect("write");
            a
        });
        let mut got = vec![0; data.len()];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(got, data);
        let mut a = writer.await.expect("join");
        b.write_all(b"back").await.expect("write back");
        let mut back = [0; 4];
        a.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"back");
        // Closing b's write end gives a the end of the stream.
        drop(b);
        assert_eq!(a.read(&mut back).await.expect("read eof"), 0);
    }

    /// A seqpacket socket hands out one packet per `read`, as a virtio-serial port hands out
    /// one receive buffer: a filling stream takes every packet waiting in one `read` call (up
    /// to the buffer's size), a plain one a packet at a time; the end still reads as 0.
    #[tokio::test]
    async fn a_filling_stream_reads_everything_waiting_at_once() {
        use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
        let pair = || {
            socketpair(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )
            .expect("socketpair")
        };
        for fill in [false, true] {
            let (ours, theirs) = pair();
            let mut stream = FdStream::new(ours, false).expect("stream");
            if fill {
                stream = stream.filling_reads();
            }
            for i in 0..5u8 {
                rustix::io::write(&theirs, &[i; 100]).expect("packet");
            }
            let mut buf = vec![0u8; 300];
            let n = stream.read(&mut buf).await.expect("read");
            let expected: Vec<u8> = (0..5u8).flat_map(|i| [i; 100]).take(n).collect();
            assert_eq!(&buf[..n], &expected[..]);
            if !fill {
                assert_eq!(n, 100, "one packet per read without filling");
                continue;
            }
            assert_eq!(n, 300, "a full buffer ends the read");
            let n = stream.read(&mut buf).await.expect("read the rest");
            assert_eq!(&buf[..n], &[[3u8; 100], [4u8; 100]].concat()[..]);
            drop(theirs);
            assert_eq!(stream.read(&mut buf).await.expect("end"), 0);
        }
    }

    #[test]
    fn a_regular_file_is_refused_with_a_reason() {
        let file = tempfile::tempfile().expect("tempfile");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let error = match FdStream::new(file.into(), false) {
            Ok(_) => panic!("a regular file should be refused"),
            Err(e) => e,
        };
        assert!(error.to_string().contains("epoll cannot watch"), "{error}");
    }

    #[tokio::test]
    async fn claiming_checks_the_descriptor() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let number = a.into_raw_fd();
        let addr = Address::Fd(number);
        let mut first = InheritedFd::claim(&addr, number).expect("first claim");
        let error = InheritedFd::claim(&addr, number).expect_err("second claim must fail");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            error.to_string().contains(&format!("fd:{number}")),
            "{error}"
        );
        // Handing it out and dropping the connection closes it and frees the number.
        let connection = first.take(&addr).expect("take");
        assert!(connection.peer.contains("socket"), "{}", connection.peer);
        drop(connection);
        assert!(!CLAIMED.lock().expect("lock").contains(&number));
        drop(first);

        let closed = Address::Fd(1_000_000);
        let error = InheritedFd::claim(&closed, 1_000_000).expect_err("not open");
        assert!(error.to_string().contains("fd:1000000"), "{error}");
        assert!(error.to_string().contains("not open"), "{error}");
    }
}
