//! The one server loop: rust-vmm's vhost-user-backend around any [`Device`].

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

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
/// Binding errors are returned here; later ones are logged and retried every second.
pub fn serve<D: Device>(name: &str, path: &Path, device: D) -> io::Result<Server> {
    let listener = Listener::new(path, true)
        .map_err(|e| io::Error::other(format!("{}: cannot listen: {e}", path.display())))?;
    let backend = Backend {
        queues: device.num_queues(),
        inner: Arc::new(Mutex::new(Inner {
            device,
            mem: None,
            broken: false,
        })),
    };
    let (name, owned) = (name.to_owned(), path.to_owned());
    std::thread::Builder::new()
        .name(format!("vhost-{name}"))
        .spawn(move || {
            let mut listener = Some(listener);
            loop {
                let l = match listener.take() {
                    Some(l) => l,
                    None => match Listener::new(&owned, true) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(path = %owned.display(), "cannot listen: {e}");
                            std::thread::sleep(Duration::from_secs(1));
                            continue;
                        }
                    },
                };
                if let Err(e) = backend.serve_one(&name, l) {
                    tracing::warn!(path = %owned.display(), "vhost-user connection failed: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                backend.inner().reset();
                tracing::info!(path = %owned.display(), "VMM disconnected; device reset");
            }
        })?;
    Ok(Server {
        path: path.to_owned(),
    })
}

/// `EFD_NONBLOCK` (`O_NONBLOCK` on Linux); vmm-sys-util takes the raw flag.
const EFD_NONBLOCK: i32 = 0o4000;

struct Inner<D> {
    device: D,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    broken: bool,
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
    fn serve_one(&self, name: &str, listener: Listener) -> Result<(), String> {
        let mut daemon = VhostUserDaemon::new(
            name.to_owned(),
            self.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| e.to_string())?;
        let token = self.backend_token();
        // Not registered while the device is locked: registering asks the backend questions.
        let fd = self.inner().device.backend_fd().map(|fd| fd.as_raw_fd());
        if let (Some(handler), Some(fd)) = (daemon.get_epoll_handlers().first(), fd) {
            handler
                .register_listener(fd, EventSet::IN, token)
                .map_err(|e| e.to_string())?;
        }
        daemon.start(listener).map_err(|e| e.to_string())?;
        let result = daemon.wait();
        // The worker threads end with the connection.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("disconnect") => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The epoll token of the device's own descriptor: past the queues and the exit event.
    fn backend_token(&self) -> u64 {
        self.queues as u64 + 1
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
        self.inner().mem = Some(mem);
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
        let event = if u64::from(device_event) == token {
            Event::Backend
        } else {
            Event::Queue(usize::from(device_event))
        };
        let Some(atomic) = &inner.mem else {
            // No memory table yet: no queue can be touched (a kick is not lost: the driver's
            // buffers stay available), but the device's own sources are drained, or the
            // worker would wake up for them again and again.
            if event == Event::Backend {
                inner.device.handle(event, &mut []);
            }
            return Ok(());
        };
        let mem = atomic.memory();
        let mut guards: Vec<_> = vrings.iter().map(|v| v.get_mut()).collect();
        let mut broken = inner.broken;
        let used: Vec<bool> = {
            // One `broken` flag per queue view, merged after: any queue going bad breaks the device.
            let mut flags = vec![broken; guards.len()];
            let mut vqs: Vec<Vq<'_>> = guards
                .iter_mut()
                .zip(flags.iter_mut())
                .map(|(g, b)| Vq::new(g.get_queue_mut(), &mem, b))
                .collect();
            inner.device.handle(event, &mut vqs);
            let used = vqs.iter().map(Vq::used).collect();
            drop(vqs);
            broken |= flags.iter().any(|b| *b);
            used
        };
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
