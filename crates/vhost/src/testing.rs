//! A guest driver in a test: guest memory, queues laid out as a driver would,
//! and hand-written descriptors, so that tests can offer anything a hostile driver could.

use std::collections::HashMap;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Device, Event, Vq};

/// Guest memory size.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where buffers start (the rings live below).
const BUFFERS: u64 = 1 << 20;

/// `VRING_DESC_F_NEXT`.
pub const NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const INDIRECT: u16 = 4;

struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
}

/// A test driver: memory, queues, and the bookkeeping to offer buffers and read results.
pub struct Rig {
    /// The guest's memory.
    pub mem: GuestMemoryMmap,
    /// The device's queues.
    pub queues: Vec<Queue>,
    /// NEEDS_RESET, as the server keeps it.
    pub broken: bool,
    layout: Vec<Layout>,
    size: u16,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    next_buf: u64,
    writable: HashMap<(usize, u16), (GuestAddress, u32)>,
}

impl Rig {
    /// `queues` queues of `size` entries each.
    pub fn new(queues: usize, size: u16) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let mut layout = Vec::new();
        let mut qs = Vec::new();
        for q in 0..queues {
            // Laid out here, not by `MockSplitQueue`: virtio-queue 0.16's mock puts the used
            // ring `size` bytes after the avail ring's start, over the avail ring's upper
            // slots, so a driver that goes round the ring reads used.idx as a head.
            let desc = q as u64 * 0x4000;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
            let mut queue = Queue::new(size).expect("queue");
            queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
            queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
            queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            queue.set_ready(true);
            assert!(queue.is_valid(&mem), "queue layout");
            qs.push(queue);
            layout.push(Layout { desc, avail, used });
        }
        Rig {
            mem,
            queues: qs,
            broken: false,
            layout,
            size,
            next_desc: vec![0; queues],
            avail_idx: vec![0; queues],
            used_seen: vec![0; queues],
            next_buf: BUFFERS,
            writable: HashMap::new(),
        }
    }

    /// Enables event index on every queue (as a Linux driver negotiates it).
    pub fn with_event_idx(mut self) -> Rig {
        for q in &mut self.queues {
            q.set_event_idx(true);
        }
        self
    }

    /// Writes descriptor `index` of queue `q` as given (nothing checked).
    pub fn write_desc(&mut self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(
                raw,
                GuestAddress(self.layout[q].desc + u64::from(index) * 16),
            )
            .expect("descriptor table");
    }

    /// Offers the chain starting at `head` on queue `q`.
    pub fn make_available(&mut self, q: usize, head: u16) {
        let slot = self.avail_idx[q] % self.size;
        let ring = self.layout[q].avail + 4 + u64::from(slot) * 2;
        self.mem.write_obj(head, GuestAddress(ring)).expect("ring");
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.set_avail_idx(q, self.avail_idx[q]);
    }

    /// Writes queue `q`'s avail.idx, whatever it is.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.layout[q].avail + 2))
            .expect("avail idx");
    }

    /// A fresh buffer of `len` bytes in guest memory.
    pub fn alloc(&mut self, len: u32) -> GuestAddress {
        if self.next_buf + u64::from(len) > MEM_SIZE {
            self.next_buf = BUFFERS;
        }
        let at = self.next_buf;
        self.next_buf += u64::from(len).max(1).next_multiple_of(64);
        GuestAddress(at)
    }

    fn take_desc(&mut self, q: usize) -> u16 {
        let d = self.next_desc[q];
        self.next_desc[q] = (d + 1) % self.size;
        d
    }

    /// Offers `bytes` in one device-readable descriptor on queue `q`; returns its head.
    pub fn add_readable(&mut self, q: usize, bytes: &[u8]) -> u16 {
        let addr = self.alloc(bytes.len() as u32);
        self.mem.write_slice(bytes, addr).expect("buffer");
        let d = self.take_desc(q);
        self.write_desc(q, d, addr.0, bytes.len() as u32, 0, 0);
        self.make_available(q, d);
        d
    }

    /// Offers a device-writable buffer of `len` bytes on queue `q`; returns its head.
    pub fn add_writable(&mut self, q: usize, len: u32) -> u16 {
        let addr = self.alloc(len);
        let d = self.take_desc(q);
        self.write_desc(q, d, addr.0, len, WRITE, 0);
        self.writable.insert((q, d), (addr, len));
        self.make_available(q, d);
        d
    }

    /// Lets `device` handle `event` with the rig's queues.
    pub fn run<D: Device>(&mut self, device: &mut D, event: Event) {
        let mem = &self.mem;
        let mut flags = vec![self.broken; self.queues.len()];
        let mut vqs: Vec<Vq<'_>> = self
            .queues
            .iter_mut()
            .zip(flags.iter_mut())
            .map(|(q, b)| Vq::new(q, mem, b))
            .collect();
        device.handle(event, &mut vqs);
        drop(vqs);
        self.broken |= flags.iter().any(|b| *b);
    }

    /// Pops every chain queue `q` offers, as a device would.
    pub fn pop_all(&mut self, q: usize) -> Vec<Result<crate::Chain, crate::ChainError>> {
        let mut broken = self.broken;
        let mut out = Vec::new();
        {
            let mut vq = Vq::new(&mut self.queues[q], &self.mem, &mut broken);
            while let Some(c) = vq.pop() {
                out.push(c);
            }
        }
        self.broken = broken;
        out
    }

    /// The chains the device returned on queue `q` since last asked: (head, length).
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = self.layout[q].used;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let slot = u64::from(self.used_seen[q] % self.size);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used + 4 + slot * 8))
                .expect("used");
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(used + 8 + slot * 8))
                .expect("used");
            out.push((id as u16, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// What the device wrote into the buffers it returned on queue `q` since last asked (each
    /// offered with [`Rig::add_writable`]).
    pub fn take_written(&mut self, q: usize) -> Vec<Vec<u8>> {
        self.take_used(q)
            .into_iter()
            .map(|(id, len)| {
                let (addr, size) = self.writable.get(&(q, id)).copied().unwrap_or_default();
                let mut buf = vec![0; len.min(size) as usize];
                self.mem.read_slice(&mut buf, addr).expect("buffer");
                buf
            })
            .collect()
    }
}
