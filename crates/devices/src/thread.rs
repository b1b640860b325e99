//! Latency-bound byte paths served by a thread of their own, waiting in `poll`, instead of by
//! runtime tasks. A QGA round trip is a few hundred bytes each way; on the runtime each leg
//! costs an `epoll_wait`, a task wake-up and (on vstreamd's multi-threaded runtime) often a
//! hand-off to the other worker, which is most of what the path costs when the peer answers
//! quickly (docs/PERFORMANCE.md, "The raw QGA stream on a thread of its own" and "vstreamd's
//! QGA relay on a thread of its own").

use std::io;
use std::os::fd::OwnedFd;

use vstream_transport::BoxStream;

/// Runs `job` on a new thread named `name` that has entered the current runtime (so the job may
/// spawn tasks or use timers), and waits for its result without holding a runtime thread. The
/// thread is not one of the runtime's blocking pool: a runtime shutting down does not wait for
/// a thread blocked in `poll`.
pub async fn on_thread<T: Send + 'static>(
    name: &str,
    job: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let runtime = tokio::runtime::Handle::current();
    let (done, ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _runtime = runtime.enter();
            let _ = done.send(job());
        })?;
    ended.await.unwrap_or_else(|_| {
        Err(io::Error::other(format!(
            "thread {name} ended without a result"
        )))
    })
}

/// The one descriptor `stream` reads and writes, duplicated, with the stream dropped: its
/// reactor registration goes with it (it would wake the runtime for every message as well), and
/// the thread that serves the descriptor keeps it open. The stream back if it is not one
/// descriptor or the duplicate failed.
pub fn detach(stream: BoxStream) -> Result<OwnedFd, BoxStream> {
    let fd = stream.descriptor().map(|fd| fd.try_clone_to_owned());
    match fd {
        Some(Ok(fd)) => Ok(fd),
        _ => Err(stream),
    }
}

/// Writes all of `data` to a nonblocking descriptor, waiting in `poll` while it is full. A
/// hang-up while it waits ends the write with `BrokenPipe`: a virtio port whose host side went
/// away refuses writes with `EAGAIN` and polls as hung up at once, so waiting on would spin.
pub fn write_all_polled(fd: &OwnedFd, mut data: &[u8]) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::OUT)];
                match poll(&mut fds, None) {
                    Ok(_) if hung_up(fds[0].revents()) => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the peer hung up before the reply was written",
                        ))
                    }
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether `poll` said the descriptor can no longer be written: hung up or failed, and not
/// writable.
fn hung_up(revents: rustix::event::PollFlags) -> bool {
    use rustix::event::PollFlags;
    revents.intersects(PollFlags::HUP | PollFlags::ERR) && !revents.contains(PollFlags::OUT)
}

#[cfg(feature = "host")]
/// One direction of a [`relay`]: what was read from its source and not yet written on.
struct Leg {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The source reported its end (or failed): nothing more will be read from it.
    ended: bool,
    /// The destination was told that the source ended (`shutdown` of its writing side).
    shut: bool,
}

#[cfg(feature = "host")]
impl Leg {
    /// Bounded: a leg holds at most this much; it reads again only once it is written on.
    const BUF: usize = 64 * 1024;

    fn new(pending: &[u8]) -> Leg {
        let mut buf = vec![0u8; Leg::BUF.max(pending.len())];
        buf[..pending.len()].copy_from_slice(pending);
        Leg {
            buf,
            start: 0,
            end: pending.len(),
            ended: false,
            shut: false,
        }
    }

    fn holding(&self) -> bool {
        self.start < self.end
    }

    fn wants_read(&self) -> bool {
        !self.ended && !self.holding()
    }

    fn done(&self) -> bool {
        self.shut
    }

    /// Reads from `from` if the leg is empty, writes what it holds to `to`, and passes the end
    /// on once everything before it was written. Never blocks (both descriptors are
    /// nonblocking). Returns whether anything moved.
    fn step(&mut self, from: &OwnedFd, to: &OwnedFd) -> io::Result<bool> {
        use rustix::io::Errno;
        let mut moved = false;
        if self.wants_read() {
            match rustix::io::read(from, &mut self.buf) {
                Ok(0) => self.ended = true,
                Ok(n) => (self.start, self.end) = (0, n),
                Err(Errno::AGAIN | Errno::INTR) => {}
                // A reset peer is the end of what it sends.
                Err(_) => self.ended = true,
            }
            moved |= self.ended || self.holding();
        }
        while self.holding() {
            match rustix::io::write(to, &self.buf[self.start..self.end]) {
                Ok(n) => {
                    self.start += n;
                    moved = true;
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.ended && !self.holding() && !self.shut {
            // Not connected any more is as good as shut.
            let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
            self.shut = true;
            moved = true;
        }
        Ok(moved)
    }

    /// What to wait for: readable `from` while empty, writable `to` while holding bytes.
    fn interest(&self) -> (rustix::event::PollFlags, rustix::event::PollFlags) {
        use rustix::event::PollFlags;
        let from = if self.wants_read() {
            PollFlags::IN
        } else {
            PollFlags::empty()
        };
        let to = if self.holding() {
            PollFlags::OUT
        } else {
            PollFlags::empty()
        };
        (from, to)
    }
}

#[cfg(feature = "host")]
/// Copies bytes both ways between two nonblocking sockets until each side has ended what it
/// sends (each end passed on as a `shutdown` of the other's writing side), as
/// `tokio::io::copy` both ways would, with `pending` (bytes read from `a` already) sent to `b`
/// first. A write that fails (the reader went away) ends the relay with that error. Each
/// direction holds at most 64 KiB: a side that does not read stops the other from sending.
pub fn relay(a: &OwnedFd, b: &OwnedFd, pending: &[u8]) -> io::Result<()> {
    use rustix::event::{poll, PollFd};
    let (mut ab, mut ba) = (Leg::new(pending), Leg::new(&[]));
    loop {
        // Move whatever can move before sleeping: the first turn sends `pending`.
        while ab.step(a, b)? | ba.step(b, a)? {}
        if ab.done() && ba.done() {
            return Ok(());
        }
        let (a_in, b_out) = ab.interest();
        let (b_in, a_out) = ba.interest();
        let (a_wants, b_wants) = (a_in | a_out, b_in | b_out);
        let mut fds = [PollFd::new(a, a_wants), PollFd::new(b, b_wants)];
        // Only a descriptor waited for goes in: poll reports a hang-up whether asked or not,
        // and a side that hung up after its end would wake every poll. (Never neither: a
        // leg that neither reads nor holds bytes has ended, and both ended returned above.)
        let waited = if a_wants.is_empty() {
            &mut fds[1..]
        } else if b_wants.is_empty() {
            &mut fds[..1]
        } else {
            &mut fds[..]
        };
        match poll(waited, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(all(test, feature = "host"))]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    /// A socket pair whose first end is handed to the relay (nonblocking, as the runtime leaves
    /// it) and whose second end plays the peer.
    fn pair() -> (OwnedFd, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        // A relay that loses bytes fails the test instead of hanging it.
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        (OwnedFd::from(ours), peer)
    }

    fn relay_thread(
        pending: &'static [u8],
    ) -> (
        UnixStream,
        UnixStream,
        std::thread::JoinHandle<std::io::Result<()>>,
    ) {
        let (a, client) = pair();
        let (b, raw) = pair();
        let relay = std::thread::spawn(move || super::relay(&a, &b, pending));
        (client, raw, relay)
    }

    #[test]
    fn relay_sends_pending_bytes_first_passes_each_end_on_and_ends_after_both() {
        let (mut client, mut raw, relay) = relay_thread(b"{\"execute\":");
        client.write_all(b"\"guest-ping\"}\n").unwrap();
        let mut got = [0u8; 25];
        raw.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"{\"execute\":\"guest-ping\"}\n");
        raw.write_all(b"{\"return\": {}}\n").unwrap();
        let mut reply = [0u8; 15];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"{\"return\": {}}\n");
        // The client's end reaches the raw side as an end of file, and the relay goes on
        // carrying what the raw side still sends.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(!relay.is_finished());
        raw.write_all(b"late\n").unwrap();
        drop(raw);
        let mut tail = Vec::new();
        client.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, b"late\n");
        relay.join().unwrap().unwrap();
    }

    #[test]
    fn relay_moves_four_mebibytes_each_way_at_once_intact() {
        let (client, raw, relay) = relay_thread(b"");
        let data = |seed: u32| -> Vec<u8> {
            let mut x = seed;
            (0..4 << 20)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 24) as u8
                })
                .collect()
        };
        // Each side writes all it has before it reads, so a relay that did not carry both
        // directions at once (or held more than it should) would deadlock here.
        let send = |mut s: UnixStream, bytes: Vec<u8>| {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).unwrap();
                    got
                });
                s.write_all(&bytes).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                reader.join().unwrap()
            })
        };
        let (up, down) = (data(1), data(2));
        let at_client = send(client, up.clone());
        let at_raw = send(raw, down.clone());
        assert!(at_raw.join().unwrap() == up, "client -> raw bytes differ");
        assert!(
            at_client.join().unwrap() == down,
            "raw -> client bytes differ"
        );
        relay.join().unwrap().unwrap();
    }

    #[test]
    fn relay_ends_with_an_error_when_the_reader_is_gone() {
        let (client, mut raw, relay) = relay_thread(b"");
        drop(client);
        // The client's end is passed on; what the raw side sends then has nowhere to go.
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        let _ = raw.write_all(b"reply to nobody\n");
        let ended = relay.join().unwrap();
        assert!(ended.is_err(), "{ended:?}");
    }
}
