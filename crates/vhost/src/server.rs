//! The one server loop: rust-vmm's vhost-user-backend around any [`Device`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use smallvec::{smallvec, SmallVec};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::{
    Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::{Device, Event, Vq};

/// The largest queue the driver may set up.
const MAX_QUEUE_SIZE: usize = 256;

/// A device being served; it is served until the process ends, one VMM connection after another.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// The vhost-user socket the VMM connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Listens for the VMM on `path` (a stale socket file is replaced) and serves `device` on a
/// thread of its own, one VMM connection after another; the device is reset between them.
/// Binding errors are returned here. One listening socket serves every connection, so a VMM
/// that connects while another is served waits in its backlog instead of being refused or
/// reset (vhost's own `Listener` unlinks its path once it has accepted one connection).
pub fn serve<D: Device>(name: &str, path: &Path, device: D) -> io::Result<Server> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::other(format!("{}: cannot listen: {e}", path.display())))?;
    let backend = Backend {
        queues: device.num_queues(),
        inner: Arc::new(Mutex::new(Inner {
            device,
            mem: None,
            broken: false,
            rescan: TimerFd::new()?,
            rescans_left: 0,
        })),
    };
    let (name, owned) = (name.to_owned(), path.to_owned());
    std::thread::Builder::new()
        .name(format!("vhost-{name}"))
        .spawn(move || loop {
            let result = match listener.as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    // SAFETY: `fd` is a fresh duplicate of the listening socket, owned by nothing
                    // else; the `Listener` takes it over (with no path, so it unlinks nothing).
                    let one = unsafe { Listener::from_raw_fd(fd.into_raw_fd()) };
                    backend.serve_one(&name, one)
                }
                Err(e) => Err(ConnectionError::Watch(e)),
            };
            match result {
                Ok(()) => tracing::info!(path = %owned.display(), "VMM disconnected; device reset"),
                // The VMM broke the protocol: it is dropped, and the next one is served at once.
                Err(e @ ConnectionError::Protocol(_)) => {
                    tracing::warn!(path = %owned.display(), "VMM dropped: {e}; device reset")
                }
                // Setting up may fail again at once: do not spin.
                Err(e) => {
                    tracing::warn!(path = %owned.display(), "vhost-user connection failed: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            backend.inner().reset();
        })?;
    Ok(Server {
        path: path.to_owned(),
    })
}

/// Why one VMM connection ended badly (the server goes on with the next one).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    /// vhost-user-backend could not be set up for the connection.
    #[error("cannot set up the vhost-user daemon: {0}")]
    Setup(DaemonError),
    /// A descriptor for the connection or the device's own could not be made or watched.
    #[error("cannot set up a descriptor: {0}")]
    Watch(io::Error),
    /// The VMM sent something the protocol does not allow (the connection is dropped).
    #[error("{0}")]
    Protocol(DaemonError),
}

/// `EFD_NONBLOCK` (`O_NONBLOCK` on Linux); vmm-sys-util takes the raw flag.
const EFD_NONBLOCK: i32 = 0o4000;

struct Inner<D> {
    device: D,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    broken: bool,
    /// Fires a few times after a VMM maps guest memory, to look at every queue then.
    /// vhost-user-backend 0.20 reads and drops a kick that arrives before SET_VRING_ENABLE
    /// (rust-vmm/vhost issue 247), and tells the backend nothing when the ring is enabled:
    /// QEMU's first kick can come in that window, and a driver with one request in flight
    /// (virtio-rng) would then wait for ever.
    rescan: TimerFd,
    /// Times `rescan` is armed again after it fires.
    rescans_left: u32,
}

/// When the first rescan fires after guest memory is mapped; each next one is 10 times later
/// (20 ms, 200 ms, 2 s): the enables follow the memory table within milliseconds.
const FIRST_RESCAN: Duration = Duration::from_millis(20);
const RESCANS: u32 = 2;

/// Queues kept on the stack per kick: vsock has 3, input 2, rng 1.
const QUEUES_INLINE: usize = 4;

/// What one wake-up of the worker asks the device to handle.
#[derive(Clone, Copy)]
enum Events {
    One(Event),
    /// A rescan: every one of this many queues, as if kicked.
    AllQueues(usize),
}

impl<D: Device> Inner<D> {
    fn reset(&mut self) {
        self.device.reset();
        self.broken = false;
    }
}

/// vhost-user-backend's view of a [`Device`].
struct Backend<D> {
    /// Fixed for the device's life; kept here because vhost-user-backend asks for it while
    /// the device is locked.
    queues: usize,
    inner: Arc<Mutex<Inner<D>>>,
}

impl<D> Clone for Backend<D> {
    fn clone(&self) -> Self {
        Backend {
            queues: self.queues,
            inner: self.inner.clone(),
        }
    }
}

impl<D: Device> Backend<D> {
    fn inner(&self) -> MutexGuard<'_, Inner<D>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one VMM connection to its end.
    fn serve_one(&self, name: &str, listener: Listener) -> Result<(), ConnectionError> {
        let mut daemon = VhostUserDaemon::new(
            name.to_owned(),
            self.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(ConnectionError::Setup)?;
        let token = self.backend_token();
        // Not registered while the device is locked: registering asks the backend questions.
        let (fd, rescan) = {
            let inner = self.inner();
            let fd = inner.device.backend_fd().map(|fd| fd.as_raw_fd());
            (fd, inner.rescan.as_raw_fd())
        };
        if let Some(handler) = daemon.get_epoll_handlers().first() {
            if let Some(fd) = fd {
                handler
                    .register_listener(fd, EventSet::IN, token)
                    .map_err(ConnectionError::Watch)?;
            }
            handler
                .register_listener(rescan, EventSet::IN, self.rescan_token())
                .map_err(ConnectionError::Watch)?;
        }
        daemon.start(listener).map_err(ConnectionError::Setup)?;
        let result = daemon.wait();
        // The worker threads end with the connection.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match result {
            Ok(())
            | Err(DaemonError::HandleRequest(
                ProtocolError::Disconnected | ProtocolError::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(ConnectionError::Protocol(e)),
        }
    }

    /// The epoll token of the device's own descriptor: past the queues and the exit event.
    fn backend_token(&self) -> u64 {
        self.queues as u64 + 1
    }

    /// The epoll token of [`Inner::rescan`].
    fn rescan_token(&self) -> u64 {
        self.queues as u64 + 2
    }
}

impl<D: Device> VhostUserBackend for Backend<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | self.inner().device.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        self.inner().reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues know (set_queue_event_idx); Vq asks them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.inner().device.config();
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= config.len() => config[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.inner().device.set_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let mut inner = self.inner();
        inner.mem = Some(mem);
        inner.rescans_left = RESCANS;
        inner
            .rescan
            .reset(FIRST_RESCAN, None)
            .map_err(io::Error::from)?;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<EventFd> {
        // A fresh one for each VMM connection's worker: a shared one would still be signalled
        // from the last connection and stop the next worker at once.
        EventFd::new(EFD_NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let token = self.backend_token();
        let mut inner = self.inner();
        let inner = &mut *inner;
        // What woke the worker. A rescan stands for a kick on every queue (a device looks and
        // finds nothing where nothing waits).
        let events = if u64::from(device_event) == self.rescan_token() {
            // Readable, so this does not block.
            let _ = inner.rescan.wait();
            if inner.rescans_left > 0 {
                inner.rescans_left -= 1;
                let next = FIRST_RESCAN * 10u32.pow(RESCANS - inner.rescans_left);
                let _ = inner.rescan.reset(next, None);
            }
            Events::AllQueues(self.queues)
        } else if u64::from(device_event) == token {
            Events::One(Event::Backend)
        } else {
            Events::One(Event::Queue(usize::from(device_event)))
        };
        let Some(atomic) = &inner.mem else {
            // No memory table yet: no queue can be touched (a kick is not lost: the driver's
            // buffers stay available), but the device's own sources are drained, or the
            // worker would wake up for them again and again.
            if let Events::One(Event::Backend) = events {
                inner.device.handle(Event::Backend, &mut []);
            }
            return Ok(());
        };
        let mem = atomic.memory();
        // Per-kick state on the stack (vsock kicks on every packet): a device has at most
        // `QUEUES_INLINE` queues, more spill to the heap.
        let mut guards: SmallVec<[_; QUEUES_INLINE]> = vrings.iter().map(|v| v.get_mut()).collect();
        let mut broken = inner.broken;
        let used: SmallVec<[bool; QUEUES_INLINE]> = {
            // One `broken` flag per queue view, merged after: any queue going bad breaks the device.
            let mut flags: SmallVec<[bool; QUEUES_INLINE]> = smallvec![broken; guards.len()];
            let mut vqs: SmallVec<[Vq<'_>; QUEUES_INLINE]> = guards
                .iter_mut()
                .zip(flags.iter_mut())
                .map(|(g, b)| Vq::new(g.get_queue_mut(), &mem, b))
                .collect();
            match events {
                Events::One(event) => inner.device.handle(event, &mut vqs),
                Events::AllQueues(n) => {
                    for q in 0..n {
                        inner.device.handle(Event::Queue(q), &mut vqs);
                    }
                }
            }
            let used = vqs.iter().map(Vq::used).collect();
            drop(vqs);
            broken |= flags.iter().any(|b| *b);
            used
        };
        if broken && !inner.broken {
            // Said once, loudly: the driver is not told (vhost 0.14's backend can neither set
            // the status register nor send CONFIG_CHANGE_MSG), so its own timeouts and this
            // line are what show the device stopped.
            tracing::error!("the driver broke a queue; device needs a reset, queues left alone");
        }
        inner.broken = broken;
        for (guard, used) in guards.iter_mut().zip(used) {
            // Event index: interrupt only when the driver asked to be told about this entry.
            if used && guard.needs_notification().unwrap_or(true) {
                let _ = guard.signal_used_queue();
            }
        }
        Ok(())
    }
}
