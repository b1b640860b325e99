//! Descriptor chains, walked and checked by us rather than by virtio-queue's iterator (which
//! ends a chain silently on a bad descriptor): an error here is distinct from the end.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError,
};

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

    /// Reads from `src` straight into the writable buffers, from byte `skip` of them on, at
    /// most `max` bytes: no copy through a buffer of ours. One read per buffer (per piece of a
    /// buffer that spans two memory regions), stopping at the first short one, so a
    /// non-blocking `src` is never read past what it holds. `WouldBlock` only if nothing was
    /// read; bytes already read are never lost to a later error.
    pub fn read_into<R: ReadVolatile>(
        &self,
        mem: &GuestMemoryMmap,
        skip: usize,
        max: usize,
        src: &mut R,
    ) -> io::Result<usize> {
        let mut skip = skip as u64;
        let mut total = 0;
        for r in &self.writable {
            let len = u64::from(r.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            // Within a checked region: `addr + len` neither overflows nor leaves memory.
            let mut at = r.addr.unchecked_add(skip);
            let mut left = (len - skip).min((max - total) as u64);
            skip = 0;
            while left > 0 {
                let mut piece = mem
                    .find_region(at)
                    .and_then(|region| {
                        let start = region.to_region_addr(at)?;
                        let n = left.min(region.len() - start.raw_value());
                        region.get_slice(start, n as usize).ok()
                    })
                    .ok_or_else(|| io::Error::other(ChainError::Write))?;
                let n = piece.len();
                let got = match src.read_volatile(&mut piece) {
                    Ok(got) => got,
                    Err(VolatileMemoryError::IOError(e)) if total == 0 => return Err(e),
                    Err(VolatileMemoryError::IOError(_)) => return Ok(total),
                    Err(e) => return Err(io::Error::other(e)),
                };
                total += got;
                if got < n || total == max {
                    return Ok(total);
                }
                at = at.unchecked_add(n as u64);
                left -= n as u64;
            }
        }
        Ok(total)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rig, INDIRECT, MEM_SIZE, NEXT, WRITE};

    const A: u64 = 0x20_0000;

    fn one(rig: &mut Rig) -> Result<Chain, ChainError> {
        let mut got = rig.pop_all(0);
        assert_eq!(got.len(), 1, "{got:?}");
        got.remove(0)
    }

    #[test]
    fn a_well_formed_chain_is_read_and_written() {
        let mut rig = Rig::new(1, 16);
        rig.mem.write_slice(b"hello", GuestAddress(A)).unwrap();
        rig.write_desc(0, 0, A, 5, NEXT, 1);
        rig.write_desc(0, 1, A + 0x100, 8, WRITE, 0);
        rig.make_available(0, 0);
        let chain = one(&mut rig).expect("chain");
        assert_eq!(chain.read_all(&rig.mem, 64).unwrap(), b"hello");
        assert_eq!(chain.writable_len(), 8);
        assert_eq!(chain.write(&rig.mem, &[b"ab", b"cdef"]).unwrap(), 6);
        let mut back = [0; 6];
        rig.mem
            .read_slice(&mut back, GuestAddress(A + 0x100))
            .unwrap();
        assert_eq!(&back, b"abcdef");
        assert_eq!(
            chain.write(&rig.mem, &[b"123456789"]),
            Err(ChainError::Write),
            "more than the buffers hold is an error, not an overrun"
        );
        assert_eq!(
            chain.read_all(&rig.mem, 4),
            Err(ChainError::TooLong { len: 5, max: 4 })
        );
    }

    /// A Linux 6.1 driver's RX buffer: a header descriptor and a data one. The device reads a
    /// host socket straight into the data, after the header's place, no more than asked and no
    /// more than the socket holds.
    #[test]
    fn a_socket_is_read_straight_into_the_buffers_after_skip() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;

        let mut rig = Rig::new(1, 16);
        rig.write_desc(0, 0, A, 44, WRITE | NEXT, 1);
        rig.write_desc(0, 1, A + 0x1000, 4096, WRITE, 0);
        rig.make_available(0, 0);
        let chain = one(&mut rig).expect("chain");
        let (mut host, mut dev) = UnixStream::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        assert_eq!(
            chain
                .read_into(&rig.mem, 44, 4096, &mut dev)
                .map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "nothing to read is not a zero-length read (end of file)"
        );
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        host.write_all(&data[..100]).unwrap();
        assert_eq!(chain.read_into(&rig.mem, 44, 4096, &mut dev).unwrap(), 100);
        host.write_all(&data[100..]).unwrap();
        assert_eq!(
            chain.read_into(&rig.mem, 44, 1000, &mut dev).unwrap(),
            1000,
            "no more than asked"
        );
        assert_eq!(
            chain.read_into(&rig.mem, 44, 9999, &mut dev).unwrap(),
            4096,
            "no more than the buffers hold"
        );
        let mut back = vec![0; 4096];
        rig.mem
            .read_slice(&mut back, GuestAddress(A + 0x1000))
            .unwrap();
        assert_eq!(back, data[1100..5196]);
        let mut header = [1u8; 44];
        rig.mem.read_slice(&mut header, GuestAddress(A)).unwrap();
        assert_eq!(header, [0; 44], "the header's place is left alone");
        // One descriptor for header and data (later drivers): the data goes after the skip.
        rig.write_desc(0, 2, A + 0x3000, 44 + 8, WRITE, 0);
        rig.make_available(0, 2);
        let chain = one(&mut rig).expect("chain");
        assert_eq!(chain.read_into(&rig.mem, 44, 4096, &mut dev).unwrap(), 8);
        let mut back = [0; 8];
        rig.mem
            .read_slice(&mut back, GuestAddress(A + 0x3000 + 44))
            .unwrap();
        assert_eq!(back, data[5196..5204]);
        drop(host);
        let mut rest = 0;
        loop {
            match chain.read_into(&rig.mem, 44, 4096, &mut dev).unwrap() {
                0 => break, // end of file
                n => rest += n,
            }
        }
        assert_eq!(rest, data.len() - 5204);
    }

    /// Each malformed chain is refused with its reason, returned to the guest with length 0,
    /// and the queue goes on with the next chain.
    #[test]
    fn malformed_chains_are_refused_returned_and_the_queue_goes_on() {
        /// addr, len, flags, next
        type Desc = (u64, u32, u16, u16);
        let cases: Vec<(&str, Vec<Desc>, ChainError)> = vec![
            (
                "loop",
                vec![(A, 8, NEXT, 1), (A, 8, NEXT, 0)],
                ChainError::Loop { size: 16 },
            ),
            (
                "self loop",
                vec![(A, 8, NEXT, 0)],
                ChainError::Loop { size: 16 },
            ),
            (
                "next beyond the queue",
                vec![(A, 8, NEXT, 200)],
                ChainError::IndexOutOfRange {
                    index: 200,
                    size: 16,
                },
            ),
            (
                "outside memory",
                vec![(MEM_SIZE, 8, 0, 0)],
                ChainError::OutsideMemory {
                    addr: MEM_SIZE,
                    len: 8,
                },
            ),
            (
                "straddles the end of memory",
                vec![(MEM_SIZE - 4, 8, 0, 0)],
                ChainError::OutsideMemory {
                    addr: MEM_SIZE - 4,
                    len: 8,
                },
            ),
            (
                "addr + len overflows",
                vec![(u64::MAX - 2, 8, 0, 0)],
                ChainError::OutsideMemory {
                    addr: u64::MAX - 2,
                    len: 8,
                },
            ),
            (
                "readable after writable",
                vec![(A, 8, WRITE | NEXT, 1), (A + 64, 8, 0, 0)],
                ChainError::ReadableAfterWritable,
            ),
            ("indirect", vec![(A, 32, INDIRECT, 0)], ChainError::Indirect),
        ];
        for (what, descs, error) in cases {
            let mut rig = Rig::new(1, 16);
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                rig.write_desc(0, i as u16, *addr, *len, *flags, *next);
            }
            rig.make_available(0, 0);
            // A good chain after the bad one.
            rig.write_desc(0, 10, A + 0x1000, 4, 0, 0);
            rig.make_available(0, 10);
            let got = rig.pop_all(0);
            assert_eq!(got.len(), 2, "{what}: {got:?}");
            assert_eq!(got[0], Err(error), "{what}");
            assert!(got[1].is_ok(), "{what}: the next chain is still served");
            assert_eq!(
                rig.take_used(0),
                vec![(0, 0)],
                "{what}: returned, not leaked"
            );
            assert!(!rig.broken, "{what}");
        }
    }

    #[test]
    fn a_head_index_beyond_the_queue_is_refused() {
        let mut rig = Rig::new(1, 16);
        rig.make_available(0, 999);
        assert_eq!(
            one(&mut rig),
            Err(ChainError::IndexOutOfRange {
                index: 999,
                size: 16
            })
        );
    }

    #[test]
    fn zero_length_descriptors_carry_nothing_and_overlapping_ones_are_harmless() {
        let mut rig = Rig::new(1, 16);
        rig.mem.write_slice(b"abcd", GuestAddress(A)).unwrap();
        rig.write_desc(0, 0, A, 0, NEXT, 1);
        rig.write_desc(0, 1, A, 4, NEXT, 2);
        // Overlaps the readable one: what was read was copied first.
        rig.write_desc(0, 2, A + 2, 4, WRITE | NEXT, 3);
        rig.write_desc(0, 3, u64::MAX, 0, WRITE, 0);
        rig.make_available(0, 0);
        let chain = one(&mut rig).expect("chain");
        assert_eq!(chain.readable.len(), 1);
        assert_eq!(
            chain.writable.len(),
            1,
            "zero-length descriptors are skipped"
        );
        let bytes = chain.read_all(&rig.mem, 64).unwrap();
        chain.write(&rig.mem, &[b"WXYZ"]).unwrap();
        assert_eq!(bytes, b"abcd");
    }

    #[test]
    fn an_avail_index_jumping_ahead_marks_the_device_needs_reset() {
        let mut rig = Rig::new(1, 16);
        rig.write_desc(0, 0, A, 4, 0, 0);
        rig.make_available(0, 0);
        rig.set_avail_idx(0, 1000);
        assert!(rig.pop_all(0).is_empty());
        assert!(rig.broken, "NEEDS_RESET");
        // Nothing more is touched until a reset, even once the index is sane again.
        rig.set_avail_idx(0, 1);
        assert!(rig.pop_all(0).is_empty());
        assert!(rig.take_used(0).is_empty());
    }
}
