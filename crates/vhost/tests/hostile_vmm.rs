//! A VMM that sends what the vhost-user protocol does not allow, as hand-built frames on the
//! real server's socket: the server drops that connection, never panics, never allocates what a
//! header claims, closes every descriptor it was sent, and serves the next VMM.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

mod common;
use common::{Fixed, FEATURE};

/// The system allocator, remembering the largest single request: a server that trusted a
/// header's size field would ask for gigabytes here.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, with the caller's
// guarantees; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout (the caller's guarantee).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's pointer, layout and size, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// Set by the panic hook: a panic on the server's threads would not fail the test by itself.
static PANICKED: AtomicBool = AtomicBool::new(false);

/// A vhost-user header: request code, flags (version 1 unless told), claimed body size.
fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    [code, flags, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn code(req: FrontendReq) -> u32 {
    req.into()
}

/// A request with body `body` (its true length in the header).
fn request(req: FrontendReq, body: &[u8]) -> Vec<u8> {
    let mut frame = header(code(req), 1, body.len() as u32);
    frame.extend_from_slice(body);
    frame
}

/// Sends `frame` with `fds` attached to its first byte, as a VMM passes descriptors.
fn send(stream: &UnixStream, frame: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(
            control.push(SendAncillaryMessage::ScmRights(fds)),
            "cmsg space"
        );
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[std::io::IoSlice::new(frame)],
        &mut control,
        SendFlags::empty(),
    )
    .expect("sendmsg");
    assert_eq!(sent, frame.len());
}

/// Whether the server closed the connection (within a few seconds) rather than waiting for more.
fn dropped(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A reply before the close is allowed; keep reading.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A pipe whose write end is sent to the server: the read end sees EOF only once every copy of
/// the write end (ours and the server's) is closed.
fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe().expect("pipe")
}

fn closed_everywhere(read_end: &OwnedFd) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut file = std::fs::File::from(read_end.try_clone().expect("dup"));
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::NONBLOCK).expect("nonblock");
    let mut byte = [0; 1];
    loop {
        match file.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => panic!("nothing is written to the pipe"),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return false,
        }
    }
}

/// A bad frame: what it is, its bytes, how many descriptors go with it, and whether the
/// connection is half-closed after it (a VMM that stops in the middle of a message).
struct Case {
    what: &'static str,
    frame: Vec<u8>,
    fds: usize,
    then_close: bool,
}

fn cases() -> Vec<Case> {
    let u64_body = 0u64.to_le_bytes();
    // VhostUserMemory { num_regions, padding } and one region (addr, size, user addr, offset).
    let mut one_region: Vec<u8> = [1u32, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    one_region.extend([0u64, 4096, 0, 0].iter().flat_map(|v| v.to_le_bytes()));
    let case = |what, frame, fds, then_close| Case {
        what,
        frame,
        fds,
        then_close,
    };
    vec![
        case(
            "a header that claims a 4 GiB body",
            header(code(FrontendReq::SET_FEATURES), 1, 0xFFFF_FF00),
            0,
            false,
        ),
        case(
            "a header that claims one byte more than the largest message",
            header(code(FrontendReq::SET_FEATURES), 1, 0x1001),
            0,
            false,
        ),
        case(
            "a body shorter than its header says, then a hang-up",
            [header(code(FrontendReq::SET_FEATURES), 1, 8), vec![0; 4]].concat(),
            0,
            true,
        ),
        case(
            "a body of the wrong size for its request",
            request(FrontendReq::SET_FEATURES, &[0; 4]),
            0,
            false,
        ),
        case("an unknown request", header(9999, 1, 0), 0, false),
        case(
            "protocol version 2",
            header(code(FrontendReq::SET_OWNER), 2, 0),
            0,
            false,
        ),
        case(
            "a reply where a request belongs",
            header(code(FrontendReq::SET_OWNER), 1 | 4, 0),
            0,
            false,
        ),
        case(
            "descriptors on a request that takes none",
            request(FrontendReq::SET_OWNER, &[]),
            3,
            false,
        ),
        case(
            "two descriptors where one is expected",
            request(FrontendReq::SET_VRING_KICK, &u64_body),
            2,
            false,
        ),
        case(
            "no descriptor where one is expected",
            request(FrontendReq::SET_VRING_CALL, &u64_body),
            0,
            false,
        ),
        case(
            "a memory table with more descriptors than regions",
            request(FrontendReq::SET_MEM_TABLE, &one_region),
            2,
            false,
        ),
        case(
            "more descriptors than one message may carry (32)",
            request(FrontendReq::SET_MEM_TABLE, &one_region),
            40,
            false,
        ),
    ]
}

#[test]
fn a_hostile_vmm_is_dropped_and_the_next_one_is_served() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        default_hook(info);
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.sock");
    let _server = vstream_vhost::serve("fixed", &path, Fixed).expect("serve");
    for case in cases() {
        let what = case.what;
        let mut vmm = UnixStream::connect(&path).expect("connect");
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..case.fds).map(|_| pipe()).collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send(&vmm, &case.frame, &fds);
        if case.then_close {
            vmm.shutdown(std::net::Shutdown::Write).expect("shutdown");
        }
        assert!(dropped(&mut vmm), "{what}: the connection is dropped");
        for (read_end, write_end) in pipes {
            drop(write_end);
            assert!(
                closed_everywhere(&read_end),
                "{what}: the server closed the descriptors it was sent"
            );
        }
        // The next VMM, a well-behaved one, is served at once (the listening socket stays open
        // between connections).
        let good = Frontend::connect(&path, 2).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        good.set_owner()
            .unwrap_or_else(|e| panic!("{what}: set_owner: {e}"));
        let features = good
            .get_features()
            .unwrap_or_else(|e| panic!("{what}: get_features: {e}"));
        assert_ne!(features & FEATURE, 0, "{what}: the next VMM is served");
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 1 << 20,
        "the largest allocation was {largest} bytes: a claimed size was believed"
    );
    assert!(!PANICKED.load(Ordering::SeqCst), "a server thread panicked");
}
