//! Descriptor chains, walked and checked by us rather than by virtio-queue's iterator (which
//! ends a chain silently on a bad descriptor): an error here is distinct from the end.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Why a chain the guest offered was refused. The chain is still returned to the guest (used
/// length 0): a malformed chain is dropped, never leaked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A `next` field or head index at or beyond the queue size.
    #[error("descriptor index {index} is beyond the queue size {size}")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// More descriptors than the queue has: the chain loops.
    #[error("the chain has more descriptors than the queue ({size}): it loops")]
    Loop {
        /// The queue size.
        size: u16,
    },
    /// An indirect table (VIRTIO_F_INDIRECT_DESC is not offered).
    #[error("indirect descriptor, which the device does not offer")]
    Indirect,
    /// A device-readable descriptor after a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// `addr + len` overflows or leaves guest memory.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The descriptor table itself could not be read.
    #[error("the descriptor table is outside guest memory")]
    Table,
    /// The chain's readable part is longer than the device accepts.
    #[error("the chain's readable part is {len} bytes, more than the {max} accepted")]
    TooLong {
        /// Its length.
        len: u64,
        /// The most accepted.
        max: usize,
    },
    /// Writing the reply went wrong (only if memory changed under us).
    #[error("guest memory write failed")]
    Write,
}

/// One guest buffer: an address range already checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start.
    pub addr: GuestAddress,
    /// Length (never 0: zero-length descriptors carry nothing and are skipped).
    pub len: u32,
}

/// A checked chain: its head (to return it) and its buffers, readable ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The head index, for `add_used`.
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Region>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Region>,
}

impl Chain {
    /// Walks the chain starting at `head` in `queue`'s descriptor table, checking every
    /// descriptor before anything is read from its buffer.
    pub fn walk(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> Result<Chain, ChainError> {
        let size = queue.size();
        let table = GuestAddress(queue.desc_table());
        let mut chain = Chain {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut index = head;
        for _ in 0..size {
            if index >= size {
                return Err(ChainError::IndexOutOfRange { index, size });
            }
            let at = table
                .0
                .checked_add(u64::from(index) * 16)
                .ok_or(ChainError::Table)?;
            let raw: RawDescriptor = mem
                .read_obj(GuestAddress(at))
                .map_err(|_| ChainError::Table)?;
            // Copied out of guest memory: the guest cannot change it between check and use.
            let desc = Descriptor::from(raw);
            let flags = u32::from(desc.flags());
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let (addr, len) = (desc.addr(), desc.len());
            if len > 0 {
                let end = addr.0.checked_add(u64::from(len) - 1);
                let inside = end.is_some_and(|end| {
                    mem.address_in_range(addr)
                        && mem.address_in_range(GuestAddress(end))
                        && mem.check_range(addr, len as usize)
                });
                if !inside {
                    return Err(ChainError::OutsideMemory { addr: addr.0, len });
                }
                let region = Region { addr, len };
                if flags & VRING_DESC_F_WRITE != 0 {
                    chain.writable.push(region);
                } else if chain.writable.is_empty() {
                    chain.readable.push(region);
                } else {
                    return Err(ChainError::ReadableAfterWritable);
                }
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = desc.next();
        }
        Err(ChainError::Loop { size })
    }

    /// The readable bytes, copied out (so the guest cannot change them after we check them), if
    /// there are at most `max`.
    pub fn read_all(&self, mem: &GuestMemoryMmap, max: usize) -> Result<Vec<u8>, ChainError> {
        let total: u64 = self.readable.iter().map(|r| u64::from(r.len)).sum();
        if total > max as u64 {
            return Err(ChainError::TooLong { len: total, max });
        }
        let mut out = vec![0; total as usize];
        let mut at = 0;
        for r in &self.readable {
            let len = r.len as usize;
            mem.read_slice(&mut out[at..at + len], r.addr)
                .map_err(|_| ChainError::Table)?;
            at += len;
        }
        Ok(out)
    }

    /// How many bytes the writable buffers hold.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|r| u64::from(r.len)).sum()
    }

    /// Writes `parts` one after the other into the writable buffers; returns the bytes written.
    /// The caller checks [`Chain::writable_len`] first; bytes that do not fit are an error.
    pub fn write(&self, mem: &GuestMemoryMmap, parts: &[&[u8]]) -> Result<u32, ChainError> {
        let mut regions = self.writable.iter();
        let mut current: Option<(Region, u32)> = None;
        let mut written: u32 = 0;
        for part in parts {
            let mut part: &[u8] = part;
            while !part.is_empty() {
                let (region, used) = match current {
                    Some((r, used)) if used < r.len => (r, used),
                    _ => (*regions.next().ok_or(ChainError::Write)?, 0),
                };
                let room = (region.len - used) as usize;
                let n = room.min(part.len());
                let at = region
                    .addr
                    .checked_add(u64::from(used))
                    .ok_or(ChainError::Write)?;
                mem.write_slice(&part[..n], at)
                    .map_err(|_| ChainError::Write)?;
                part = &part[n..];
                current = Some((region, used + n as u32));
                written += n as u32;
            }
        }
        Ok(written)
    }
}

/// One of the device's queues while an event is handled: pops checked chains, returns used ones,
/// and remembers whether the guest should be told.
pub struct Vq<'a> {
    queue: &'a mut Queue,
    mem: &'a GuestMemoryMmap,
    broken: &'a mut bool,
    used: bool,
}

impl<'a> Vq<'a> {
    /// Wraps a queue and the guest memory its addresses refer to. `broken` is the device's
    /// NEEDS_RESET state: once set, the queue is left alone until the device is reset.
    pub fn new(queue: &'a mut Queue, mem: &'a GuestMemoryMmap, broken: &'a mut bool) -> Self {
        Vq {
            queue,
            mem,
            broken,
            used: false,
        }
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem
    }

    /// The next chain the guest made available: `None` when there is none (notifications are
    /// enabled again then, and a chain that raced with that is still returned);
    /// `Some(Err(..))` for a malformed chain, which has already been returned to the guest with
    /// length 0. A queue whose available index is impossible (more new entries than its size)
    /// or unreadable marks the device NEEDS_RESET and yields nothing more.
    pub fn pop(&mut self) -> Option<Result<Chain, ChainError>> {
        if *self.broken || !self.queue.ready() {
            return None;
        }
        loop {
            let head = match self.queue.iter(self.mem) {
                Ok(mut iter) => iter.next().map(|c| c.head_index()),
                Err(e) => {
                    tracing::warn!("virtqueue unusable, device needs a reset: {e}");
                    *self.broken = true;
                    return None;
                }
            };
            if let Some(head) = head {
                return Some(match Chain::walk(self.queue, self.mem, head) {
                    Ok(chain) => Ok(chain),
                    Err(e) => {
                        self.add_used(head, 0);
                        Err(e)
                    }
                });
            }
            // Event index: re-arm, and look again if the guest added buffers meanwhile.
            match self.queue.enable_notification(self.mem) {
                Ok(true) => continue,
                Ok(false) => return None,
                Err(_) => {
                    *self.broken = true;
                    return None;
                }
            }
        }
    }

    /// Whether a chain is available, without taking it.
    pub fn has_available(&mut self) -> bool {
        if *self.broken || !self.queue.ready() {
            return false;
        }
        match self.queue.avail_idx(self.mem, Ordering::Acquire) {
            Ok(idx) => idx != Wrapping(self.queue.next_avail()),
            Err(_) => false,
        }
    }

    /// Returns a chain to the guest with `len` bytes written into it.
    pub fn add_used(&mut self, head: u16, len: u32) {
        if *self.broken {
            return;
        }
        if self.queue.add_used(self.mem, head, len).is_err() {
            *self.broken = true;
            return;
        }
        self.used = true;
    }

    /// Whether chains were returned since this view was made (the server then decides, with
    /// event index, whether to interrupt the guest).
    pub fn used(&self) -> bool {
        self.used
    }
}
