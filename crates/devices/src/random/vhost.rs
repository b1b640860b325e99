//! The guest's virtio-rng device, served over vhost-user (a vstreamd transport of kind
//! `random-vhost-user`): the guest kernel's own virtio_rng driver is the peer, and every byte
//! comes out of the guest's [`Limiter`], the budget its channels and raw ports share.
//!
//! One request queue; each chain's writable buffers are filled with fresh entropy as the budget
//! allows. When the budget is spent the chain is held (at most one: the others stay in the
//! queue, the guest's) and a timer wakes the device when enough tokens have come back: no
//! polling, no worker spinning.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use vstream_vhost::{Chain, Device, Event, Vq};

use super::host::{fill, Grant, Limiter, CHUNK};

/// The virtio-rng device of one guest.
pub struct RngDevice {
    limiter: Arc<Limiter>,
    /// Fires when the budget has tokens again for the held chain.
    timer: OwnedFd,
    /// The chain waiting for the budget.
    held: Option<Chain>,
    buf: Box<[u8; CHUNK]>,
}

impl RngDevice {
    /// A device drawing from `limiter`.
    pub fn new(limiter: Arc<Limiter>) -> std::io::Result<RngDevice> {
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(RngDevice {
            limiter,
            timer,
            held: None,
            buf: Box::new([0; CHUNK]),
        })
    }

    /// Arms the timer to fire once after `after` (0 would disarm it: at least 1 µs).
    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_micros(1));
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: zero,
            it_value: Timespec {
                tv_sec: after.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: after.subsec_nanos().into(),
            },
        };
        if let Err(e) = timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec) {
            tracing::warn!("virtio-rng: cannot arm the budget timer: {e}");
        }
    }

    /// The next chain with room for bytes; chains with none (only device-readable or
    /// zero-length descriptors) and malformed ones go back to the guest empty.
    fn next_chain(q: &mut Vq<'_>) -> Option<Chain> {
        loop {
            match q.pop()? {
                Ok(c) if c.writable_len() > 0 => return Some(c),
                Ok(c) => {
                    tracing::debug!("virtio-rng: a request with no writable buffer; returned");
                    q.add_used(c.head, 0);
                }
                Err(e) => tracing::warn!("virtio-rng: bad request dropped: {e}"),
            }
        }
    }

    /// Fills chains while the budget lasts; the first that does not fit is held.
    fn serve(&mut self, q: &mut Vq<'_>) {
        loop {
            let chain = match self.held.take() {
                Some(c) => c,
                None => match Self::next_chain(q) {
                    Some(c) => c,
                    None => return,
                },
            };
            let want = chain.writable_len().min(CHUNK as u64);
            let n = match self.limiter.try_grant(want) {
                Grant::Now(n) => n as usize,
                Grant::After(d) => {
                    self.held = Some(chain);
                    self.arm(d);
                    return;
                }
                Grant::Never => {
                    // A budget of 0: the guest's reads wait, as on a source that has nothing.
                    self.held = Some(chain);
                    return;
                }
            };
            let buf = &mut self.buf[..n];
            let written = match fill(buf) {
                Ok(()) => chain.write(q.mem(), &[buf]).unwrap_or(0),
                Err(e) => {
                    tracing::warn!("virtio-rng: getrandom failed: {e}");
                    0
                }
            };
            buf.fill(0);
            self.limiter.count_vhost(u64::from(written));
            q.add_used(chain.head, written);
        }
    }
}

impl Device for RngDevice {
    fn num_queues(&self) -> usize {
        1
    }

    fn config(&self) -> Vec<u8> {
        // virtio-rng has no configuration space.
        Vec::new()
    }

    fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.timer.as_fd())
    }

    fn reset(&mut self) {
        self.held = None;
        // Disarmed: a zero value.
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: zero,
            it_value: zero,
        };
        let _ = timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec);
    }

    fn handle(&mut self, event: Event, queues: &mut [Vq<'_>]) {
        if event == Event::Backend {
            // Drained, or the level-triggered timer would wake the worker again and again.
            let mut expirations = [0u8; 8];
            let _ = rustix::io::read(&self.timer, &mut expirations);
        }
        if let Some(q) = queues.first_mut() {
            self.serve(q);
        }
    }
}
