//! The async driver of a multiplexer [`Session`]: it moves bytes between transport streams
//! (links) and the session, runs its timers, and gives applications one [`ChannelStream`]
//! (AsyncRead + AsyncWrite) per channel.
//!
//! Shape (as in quinn): the protocol lives in `vstream-wire`; here a `Mutex<Inner>` holds the
//! session plus the wakers of the tasks waiting on it. Each link runs a reader, a writer and a
//! timer future; an application's read or write locks the session for a few microseconds and
//! never waits on the network.
#![deny(missing_docs)]

pub mod auth;
mod driver;
mod shared;
mod status;
mod stream;
mod upgrade;

use driver::LinkOut;
pub use driver::{read_hello, LinkEnded};
use shared::{Inner, LinkEntry, Shared, ViolationBudget, Wakers};
pub use status::{LinkStatus, MuxStatus, SessionCounters};
pub use stream::ChannelStream;
pub use upgrade::Frozen;
/// A channel's line in [`MuxStatus`] (wire's own type).
pub use vstream_wire::ChannelInfo;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use vstream_transport::Address;
use vstream_wire::frame::Decoder;
use vstream_wire::limit::ReportLimit;
use vstream_wire::{
    peek_hello, ChannelError, ChannelId, Config, Event, Hello, InputBuf, LinkId, LinkParams, Recv,
    ResetCode, Session, SnapshotError, Transmit, MAX_INPUT,
};

/// A channel the peer opened, waiting for the application.
pub struct Incoming {
    /// The stream.
    pub stream: ChannelStream,
    /// Device class.
    pub class: String,
    /// Name within the class.
    pub name: String,
}

/// Lifecycle notifications, for logs and `vstreamctl events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum MuxEvent {
    /// A link completed its handshake.
    LinkUp {
        /// Link id.
        link: u32,
        /// Transport description.
        transport: String,
        /// Peer name.
        peer: String,
        /// Whether the session resumed.
        resumed: bool,
    },
    /// A link ended.
    LinkDown {
        /// Link id.
        link: u32,
        /// Transport description.
        transport: String,
        /// Why.
        reason: String,
    },
    /// A channel was reset because of an error.
    ChannelReset {
        /// Channel id.
        channel: u32,
        /// Why.
        reason: String,
    },
    /// A protocol violation by the peer.
    ProtocolError {
        /// What.
        error: String,
    },
}

/// A link whose peer commits more protocol violations than this within
/// [`VIOLATION_WINDOW`] is closed (the reason starts with [`DROPPED_FOR_VIOLATIONS`]): a noisy
/// serial line at 115200 baud carries about 11 KB a second and does not come near it, a hostile
/// peer makes a violation per frame, a million a second.
pub const MAX_VIOLATIONS: u64 = 1000;

/// See [`MAX_VIOLATIONS`].
pub const VIOLATION_WINDOW: Duration = Duration::from_secs(10);

/// How the reason of a link closed for [`MAX_VIOLATIONS`] starts, so that its owner can hold
/// the peer off.
pub const DROPPED_FOR_VIOLATIONS: &str = "too many protocol violations";

/// One multiplexer session with a peer, shared by its links and channel streams.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl Mux {
    /// A session; peer-opened channels arrive on the returned receiver.
    pub fn new(cfg: Config, session_id: u64) -> (Mux, mpsc::UnboundedReceiver<Incoming>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let label = cfg.name.clone();
        // Lifecycle events are rare and their one reader (vstreamd's forwarder) is always
        // waiting; every slot is allocated up front, for each of thousands of sessions.
        let (events, _) = broadcast::channel(64);
        let inner = Inner {
            session: Session::new(cfg, session_id, Instant::now()),
            wakers: HashMap::new(),
            ended: HashMap::new(),
            detached: HashSet::new(),
            opening: HashMap::new(),
            incoming: Some(tx),
            links: BTreeMap::new(),
            events,
            reset_logs: ReportLimit::default(),
            timer_at: None,
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            label,
            input: Notify::new(),
        });
        (Mux { shared }, rx)
    }

    /// Lifecycle events of this session.
    pub fn subscribe(&self) -> broadcast::Receiver<MuxEvent> {
        self.shared.lock().events.subscribe()
    }

    /// Opens a channel to the peer's `class`/`name` service and waits until it is accepted
    /// (which needs a link to be up).
    pub async fn open(&self, class: &str, name: &str) -> io::Result<ChannelStream> {
        let (stream, rx) = {
            let mut inner = self.shared.lock();
            let id = inner
                .session
                .open_channel(class, name)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let (tx, rx) = oneshot::channel();
            inner.opening.insert(id, tx);
            inner.wakers.insert(id, Wakers::default());
            let epoch = inner.epoch();
            inner.kick();
            (ChannelStream::new(self.shared.clone(), id, epoch), rx)
        };
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(reason)) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, reason)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session ended",
            )),
        }
    }

    /// The peer's name, once known.
    pub fn peer_name(&self) -> Option<String> {
        self.shared.lock().session.peer_name().map(str::to_owned)
    }

    /// Whether some link is up.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().session.is_connected()
    }
}

/// A new session id for [`Mux::new`]: non-zero, different for every session, and available at
/// once, even early in a guest's boot.
///
/// A session id needs uniqueness, not secrecy: it tells a resumed session from a restarted peer,
/// and the peer learns it in our first HELLO anyway. So it never waits for the kernel's CRNG,
/// which in a guest without virtio-rng or RDRAND may stay uninitialised for a minute after boot
/// (a blocking `getrandom` there held the agent up for 40 s): `getrandom(GRND_INSECURE)`
/// (Linux 5.6 and later), else `GRND_NONBLOCK` (fails only while the CRNG is not ready), else a
/// hash of the clock, the pid, a stack address and a per-process counter.
pub fn session_id() -> u64 {
    use rustix::rand::{getrandom, GetRandomFlags};
    let mut buf = [0u8; 8];
    let from_kernel = [GetRandomFlags::INSECURE, GetRandomFlags::NONBLOCK]
        .into_iter()
        .any(|flags| matches!(getrandom(&mut buf[..], flags), Ok(8)));
    let id = if from_kernel {
        u64::from_ne_bytes(buf)
    } else {
        fallback_session_id(&buf)
    };
    id.max(1)
}

/// The last resort of [`session_id`]: unique enough (a restarted process has a new pid or a
/// later clock; ASLR moves the stack), never random.
fn fallback_session_id(local: &[u8; 8]) -> u64 {
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::hash::DefaultHasher::new();
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .hash(&mut h);
    std::process::id().hash(&mut h);
    (local.as_ptr() as usize).hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    h.finish()
}

/// Link parameters for a transport address: serial lines (named as such, or declared with a
/// `baud` because a socket stands for one, as QEMU's chardev of a 16550 does) get small frames
/// and patient timers; everything else is a fast stream. Sockets and vsock check integrity
/// themselves, so they offer to leave out the payload CRC; virtio-serial ports (which lose
/// bytes when the guest's driver resets), inherited descriptors and stdio (of unknown kind)
/// keep it. Lower `priority` is preferred.
pub fn link_params(address: &Address, baud: Option<u32>, priority: u32) -> LinkParams {
    match (address, baud) {
        (Address::Serial(s), _) => LinkParams::serial(priority, s.baud),
        (_, Some(b)) => LinkParams::serial(priority, b),
        (
            Address::Unix(_)
            | Address::UnixListen(_)
            | Address::Tcp { .. }
            | Address::TcpListen { .. }
            | Address::Vsock { .. }
            | Address::VsockListen { .. }
            | Address::HybridVsock { .. }
            | Address::VhostUserVsock(_),
            None,
        ) => LinkParams::socket(priority),
        (Address::Port(_) | Address::Fd(_) | Address::Stdio, None) => LinkParams::stream(priority),
    }
}

/// Gives the kernel back the free pages inside the allocator's heaps, not just at their top:
/// buffers a guest made us allocate are spread among long-lived allocations, so without it
/// most of them stayed resident after being freed.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim has no preconditions; it only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes glibc give freed memory back to the kernel soon: large buffers come from mmap (freed
/// at once), the heap is trimmed eagerly, and threads share `arenas` arenas instead of one each
/// (each holds its own free pages; a process whose threads seldom allocate at once needs one).
/// Without it, what a burst (or a hostile guest) made a process allocate stayed resident after
/// it was freed. Call at the start of `main`, before any thread exists.
pub fn return_memory_eagerly(arenas: i32) {
    // SAFETY: mallopt only changes glibc allocator tunables; called at the start of main,
    // before any other thread exists, with documented parameters and in-range values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn a_link_over_its_violation_budget_is_closed_and_the_budget_renews() {
        use super::{ViolationBudget, MAX_VIOLATIONS, VIOLATION_WINDOW};
        let t0 = std::time::Instant::now();
        let mut b = ViolationBudget::new(t0);
        assert!(b.add(MAX_VIOLATIONS, t0).is_none());
        let reason = b.add(1, t0).expect("over the budget").to_string();
        assert!(
            reason.starts_with(super::DROPPED_FOR_VIOLATIONS),
            "{reason}"
        );
        // A noisy line spreads its errors out: a new window starts afresh.
        let mut b = ViolationBudget::new(t0);
        let later = t0 + VIOLATION_WINDOW + std::time::Duration::from_millis(1);
        assert!(b.add(MAX_VIOLATIONS, t0).is_none());
        assert!(b.add(MAX_VIOLATIONS, later).is_none());
    }

    #[test]
    fn session_ids_are_non_zero_and_distinct_even_without_the_kernel() {
        let ids: HashSet<u64> = (0..1000).map(|_| super::session_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
        let fallback: HashSet<u64> = (0..1000)
            .map(|_| super::fallback_session_id(&[0; 8]))
            .collect();
        assert_eq!(fallback.len(), 1000, "the clock-and-pid ids repeat");
    }
}
