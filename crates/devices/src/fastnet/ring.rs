//! The packet rings in the shared segment (docs/devices/fastnet.md): layout, the producer and the
//! consumer. Sans-io: nothing here sleeps, blocks or rings a doorbell; calls say when the peer
//! must be rung and when a side may sleep, and the caller carries the doorbell on the channel.
//!
//! The peer is untrusted. Every word the peer writes (its index, a record header) is loaded once
//! into a local, validated against what this side already knows, and only then used; payload
//! bytes are copied out before anyone looks at them. A side never trusts its own index in the
//! segment either (the peer can overwrite it): it keeps the index in a local and only stores it.

use std::sync::atomic::{fence, Ordering};

use thiserror::Error;

pub use super::segment::{Memory, Segment};

/// The segment's first 8 bytes, `vsfstnet` in ASCII.
pub const MAGIC: u64 = u64::from_le_bytes(*b"vsfstnet");
/// The layout version this code speaks.
pub const VERSION: u32 = 1;
/// Where the data areas start: the header and the four index lines fit in the first page.
pub const DATA_OFFSET: usize = 4096;
/// The smallest ring (data area) size.
pub const MIN_RING_SIZE: u32 = 4096;
/// The largest ring size (indexes are 32-bit byte positions; half the space keeps the
/// wrap-around arithmetic unambiguous).
pub const MAX_RING_SIZE: u32 = 1 << 30;
/// Bytes before each record's payload: `u32 len`, `u32 kind`.
pub const RECORD_HEADER: u32 = 8;
/// Record kind: a packet of `len` bytes.
pub const KIND_PACKET: u32 = 0;
/// Record kind: padding to the end of the data area; the next record starts at offset 0.
pub const KIND_PAD: u32 = 1;

/// How far ahead of the record it hands over `Consumer::drain` asks for the published bytes.
const PREFETCH_AHEAD: u32 = 512;

/// Header field offsets.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_SEGMENT_SIZE: usize = 16;
const OFF_RING_SIZE: usize = 24;
const OFF_MAX_PACKET: usize = 28;
/// The header's reserved bytes (zero in version 1).
const HEADER_RESERVED: std::ops::Range<usize> = 32..64;

/// The two rings of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Ring 0: the host produces, the guest consumes.
    HostToGuest,
    /// Ring 1: the guest produces, the host consumes.
    GuestToHost,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::HostToGuest => 0,
            Direction::GuestToHost => 1,
        }
    }

    /// The line holding `prod` (at +0) and `cons_event` (at +4), written by the producer.
    /// 128 bytes apart so that no two lines written by different sides share an adjacent-line
    /// prefetch pair.
    pub fn producer_line(self) -> usize {
        128 + 256 * self.index()
    }

    /// The line holding `cons` (at +0) and `prod_event` (at +4), written by the consumer.
    pub fn consumer_line(self) -> usize {
        self.producer_line() + 128
    }

    /// Where this ring's data area starts in a segment with rings of `ring_size` bytes.
    pub fn data_offset(self, ring_size: u32) -> usize {
        DATA_OFFSET + self.index() * ring_size as usize
    }

    /// The name used in errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Direction::HostToGuest => "host-to-guest ring",
            Direction::GuestToHost => "guest-to-host ring",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What went wrong with a segment. Errors about the peer's writes mean the link must be reset.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The mapping cannot hold the layout.
    #[error("segment of {size} bytes is too small: the layout needs {need}")]
    SegmentTooSmall {
        /// The mapping's size.
        size: usize,
        /// What the header's sizes need.
        need: usize,
    },
    /// The first 8 bytes are not [`MAGIC`].
    #[error("segment magic is {found:#018x}, expected {MAGIC:#018x} (\"vsfstnet\")")]
    BadMagic {
        /// What the segment holds.
        found: u64,
    },
    /// A layout version this code does not speak.
    #[error("segment layout version {found}, this side speaks {VERSION}")]
    BadVersion {
        /// What the segment holds.
        found: u32,
    },
    /// A header field other than magic and version is out of range.
    #[error("segment header field {field} is {value}: {why}")]
    BadHeader {
        /// The field's name in docs/devices/fastnet.md.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What was expected.
        why: &'static str,
    },
    /// The header changed after both sides attached.
    #[error(
        "segment header changed under a running link (magic {magic:#018x}, version {version})"
    )]
    HeaderChanged {
        /// The magic now in the segment.
        magic: u64,
        /// The version now in the segment.
        version: u32,
    },
    /// A size in the header changed after both sides attached.
    #[error("segment header field {field} changed under a running link: {found}, was {expected}")]
    SizeChanged {
        /// The field's name in docs/devices/fastnet.md.
        field: &'static str,
        /// The value now in the segment.
        found: u64,
        /// The value both sides attached with.
        expected: u64,
    },
    /// The producer index the peer wrote is impossible.
    #[error("{ring}: producer index {prod} with consumer at {cons} ({why}; ring of {size} bytes)")]
    BadProducerIndex {
        /// Which ring.
        ring: Direction,
        /// The value read.
        prod: u32,
        /// This side's consumer index.
        cons: u32,
        /// The ring size.
        size: u32,
        /// Which rule it broke.
        why: &'static str,
    },
    /// The consumer index the peer wrote is impossible.
    #[error("{ring}: consumer index {cons} with producer at {prod} ({why}; ring of {size} bytes)")]
    BadConsumerIndex {
        /// Which ring.
        ring: Direction,
        /// The value read.
        cons: u32,
        /// This side's producer index.
        prod: u32,
        /// The ring size.
        size: u32,
        /// Which rule it broke.
        why: &'static str,
    },
    /// A record header the peer wrote is impossible.
    #[error("{ring}: record at position {pos} has len {len} kind {kind}: {why}")]
    BadRecord {
        /// Which ring.
        ring: Direction,
        /// The record's byte position.
        pos: u32,
        /// Its `len` field.
        len: u32,
        /// Its `kind` field.
        kind: u32,
        /// Which rule it broke.
        why: &'static str,
    },
}

/// The sizes both sides agree on, from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Total segment size in bytes.
    pub segment_size: u64,
    /// Each ring's data area, a power of two in `MIN_RING_SIZE..=MAX_RING_SIZE`.
    pub ring_size: u32,
    /// The largest packet either side may send.
    pub max_packet: u32,
}

/// Rounds `len` up to the record alignment, 8.
fn pad8(len: u32) -> u32 {
    (len + 7) & !7
}

impl Layout {
    /// The largest valid layout for a segment of `segment_size` bytes whose packets go up to
    /// `max_packet` bytes: rings as large as fit, a power of two each.
    pub fn for_segment(segment_size: u64, max_packet: u32) -> Result<Layout, RingError> {
        let per_ring = segment_size.saturating_sub(DATA_OFFSET as u64) / 2;
        let ring_size = if per_ring < u64::from(MIN_RING_SIZE) {
            0
        } else {
            1u32 << per_ring.min(u64::from(MAX_RING_SIZE)).ilog2()
        };
        let layout = Layout {
            segment_size,
            ring_size,
            max_packet,
        };
        layout.validate()?;
        Ok(layout)
    }

    /// Checks the rules of docs/devices/fastnet.md ("Header").
    pub fn validate(&self) -> Result<(), RingError> {
        let bad = |field, value, why| Err(RingError::BadHeader { field, value, why });
        let r = self.ring_size;
        if !r.is_power_of_two() || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&r) {
            return bad(
                "ring_size",
                r.into(),
                "must be a power of two from 4096 to 2^30",
            );
        }
        let need = DATA_OFFSET as u64 + 2 * u64::from(r);
        if self.segment_size < need {
            return bad(
                "segment_size",
                self.segment_size,
                "smaller than 4096 + 2 * ring_size",
            );
        }
        if self.max_packet == 0 || self.max_packet > r / 2 - RECORD_HEADER {
            return bad(
                "max_packet",
                self.max_packet.into(),
                "must be from 1 to ring_size / 2 - 8",
            );
        }
        Ok(())
    }

    /// Writes a fresh header and zeroes the four index lines (the host, before it offers the
    /// segment). The data areas are left as they are: nothing reads them before a record is
    /// published.
    pub fn initialize(&self, mem: &impl Memory) -> Result<(), RingError> {
        self.validate()?;
        self.fits(mem)?;
        for dir in [Direction::HostToGuest, Direction::GuestToHost] {
            for line in [dir.producer_line(), dir.consumer_line()] {
                mem.store_u64(line, 0, Ordering::Relaxed);
            }
        }
        for off in HEADER_RESERVED.step_by(8) {
            mem.store_u64(off, 0, Ordering::Relaxed);
        }
        mem.store_u32(OFF_FLAGS, 0, Ordering::Relaxed);
        mem.store_u64(OFF_SEGMENT_SIZE, self.segment_size, Ordering::Relaxed);
        mem.store_u32(OFF_RING_SIZE, self.ring_size, Ordering::Relaxed);
        mem.store_u32(OFF_MAX_PACKET, self.max_packet, Ordering::Relaxed);
        mem.store_u32(OFF_VERSION, VERSION, Ordering::Relaxed);
        // Magic last: a reader that sees it sees the rest.
        mem.store_u64(OFF_MAGIC, MAGIC, Ordering::Release);
        Ok(())
    }

    /// Reads and validates the header of a segment (the guest, when it attaches). Each field is
    /// read once.
    pub fn read(mem: &impl Memory) -> Result<Layout, RingError> {
        if mem.size() < DATA_OFFSET {
            return Err(RingError::SegmentTooSmall {
                size: mem.size(),
                need: DATA_OFFSET,
            });
        }
        let magic = mem.load_u64(OFF_MAGIC, Ordering::Acquire);
        if magic != MAGIC {
            return Err(RingError::BadMagic { found: magic });
        }
        let version = mem.load_u32(OFF_VERSION, Ordering::Relaxed);
        if version != VERSION {
            return Err(RingError::BadVersion { found: version });
        }
        let flags = mem.load_u32(OFF_FLAGS, Ordering::Relaxed);
        if flags != 0 {
            return Err(RingError::BadHeader {
                field: "flags",
                value: flags.into(),
                why: "must be 0 in version 1",
            });
        }
        let layout = Layout {
            segment_size: mem.load_u64(OFF_SEGMENT_SIZE, Ordering::Relaxed),
            ring_size: mem.load_u32(OFF_RING_SIZE, Ordering::Relaxed),
            max_packet: mem.load_u32(OFF_MAX_PACKET, Ordering::Relaxed),
        };
        layout.validate()?;
        layout.fits(mem)?;
        Ok(layout)
    }

    fn fits(&self, mem: &impl Memory) -> Result<(), RingError> {
        if (mem.size() as u64) < self.segment_size {
            return Err(RingError::SegmentTooSmall {
                size: mem.size(),
                need: usize::try_from(self.segment_size).unwrap_or(usize::MAX),
            });
        }
        Ok(())
    }

    /// Fails if the magic, version or sizes changed since the header was read as `self`: the
    /// peer reset the segment or is hostile. This side keeps using its own copy of the sizes
    /// either way; the check names the change. Five loads; the rings call it once per batch.
    pub fn check_unchanged(&self, mem: &impl Memory) -> Result<(), RingError> {
        let magic = mem.load_u64(OFF_MAGIC, Ordering::Relaxed);
        let version = mem.load_u32(OFF_VERSION, Ordering::Relaxed);
        if magic != MAGIC || version != VERSION {
            return Err(RingError::HeaderChanged { magic, version });
        }
        let sizes = [
            (
                "segment_size",
                mem.load_u64(OFF_SEGMENT_SIZE, Ordering::Relaxed),
                self.segment_size,
            ),
            (
                "ring_size",
                mem.load_u32(OFF_RING_SIZE, Ordering::Relaxed).into(),
                self.ring_size.into(),
            ),
            (
                "max_packet",
                mem.load_u32(OFF_MAX_PACKET, Ordering::Relaxed).into(),
                self.max_packet.into(),
            ),
        ];
        for (field, found, expected) in sizes {
            if found != expected {
                return Err(RingError::SizeChanged {
                    field,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }
}

/// virtio's `vring_need_event`: whether moving an index from `old` to `new` passes `event`,
/// the index the peer said it waits for (all wrapping).
pub fn need_event(event: u32, new: u32, old: u32) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Whether the caller must ring the peer's doorbell (send it on the channel).
#[must_use = "a doorbell that is not sent can leave the peer asleep forever"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// The peer said it sleeps until this index passes: ring it.
    Ring,
    /// The peer is awake (or was already rung): nothing to send.
    Quiet,
}

impl Doorbell {
    fn from(ring: bool) -> Doorbell {
        if ring {
            Doorbell::Ring
        } else {
            Doorbell::Quiet
        }
    }
}

/// What [`Producer::push_with`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled<E> {
    /// A record of this many bytes is committed (0: none; the filler had nothing).
    Pushed(usize),
    /// No room for a record of the largest size asked for: nothing changed.
    Full,
    /// The filler failed: nothing changed.
    Failed(E),
}

/// What [`Consumer::drain`] did.
#[must_use = "a doorbell that is not sent can leave the peer asleep forever"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Packets handed over.
    pub packets: usize,
    /// Whether the producer asked to be rung for the space released.
    pub doorbell: Doorbell,
}

/// The producing side of one ring.
pub struct Producer<M: Memory> {
    mem: M,
    dir: Direction,
    data: usize,
    size: u32,
    max_packet: u32,
    /// Where the next record goes (local; never read back from the segment).
    prod: u32,
    /// The value of `prod` last published.
    published: u32,
    /// The consumer index last read and validated.
    cons: u32,
}

impl<M: Memory> Producer<M> {
    /// The producer of ring `dir` in a segment whose header said `layout`, with both indexes
    /// at 0 (a fresh segment).
    pub fn new(mem: M, layout: Layout, dir: Direction) -> Producer<M> {
        Producer {
            mem,
            dir,
            data: dir.data_offset(layout.ring_size),
            size: layout.ring_size,
            max_packet: layout.max_packet,
            prod: 0,
            published: 0,
            cons: 0,
        }
    }

    /// Starts at `index` instead of 0 (tests of the 32-bit wrap-around).
    #[cfg(test)]
    pub(super) fn starting_at(mut self, index: u32) -> Self {
        (self.prod, self.published, self.cons) = (index, index, index);
        self
    }

    /// The largest packet [`Producer::push`] takes.
    pub fn max_packet(&self) -> u32 {
        self.max_packet
    }

    /// Reads the consumer index once and validates it: it lies between the index read before
    /// and this side's producer index.
    fn refresh(&mut self) -> Result<(), RingError> {
        let cons = self
            .mem
            .load_u32(self.dir.consumer_line(), Ordering::Acquire);
        let bad = |why| RingError::BadConsumerIndex {
            ring: self.dir,
            cons,
            prod: self.prod,
            size: self.size,
            why,
        };
        if !cons.is_multiple_of(8) {
            return Err(bad("not a multiple of 8"));
        }
        if cons.wrapping_sub(self.cons) > self.published.wrapping_sub(self.cons) {
            return Err(bad("moved backwards or past the published producer index"));
        }
        self.cons = cons;
        Ok(())
    }

    /// Copies `packet` into the ring as one record, unpublished until [`Producer::publish`].
    /// `Ok(false)`: the ring is full (try again after the consumer's doorbell; see
    /// [`Producer::prepare_wait`]).
    ///
    /// # Panics
    /// If `packet` is longer than [`Producer::max_packet`]: the caller bounds its reads (a TAP
    /// read buffer of that size), so a longer packet is a bug on this side.
    #[inline]
    pub fn push(&mut self, packet: &[u8]) -> Result<bool, RingError> {
        let len = match u32::try_from(packet.len()) {
            Ok(len) if len <= self.max_packet => len,
            _ => self.too_long(packet.len()),
        };
        let Some((pad, at)) = self.reserve(RECORD_HEADER + pad8(len))? else {
            return Ok(false);
        };
        self.mem.write(at + RECORD_HEADER as usize, packet);
        self.commit(pad, at, len);
        Ok(true)
    }

    /// The panic of [`Producer::push`], out of line so that an inlined push stays small.
    #[cold]
    #[inline(never)]
    fn too_long(&self, len: usize) -> ! {
        panic!(
            "fastnet: packet of {len} bytes exceeds max_packet {}",
            self.max_packet
        )
    }

    /// Reserves room for one record of up to `max` bytes, contiguous in the data area (after
    /// padding to the end, as [`Producer::push`] does when a record would wrap), and lets `fill`
    /// write the payload in place: it gets the memory, the payload's offset in it and `max`,
    /// and returns how many bytes it wrote. The record is committed with that length,
    /// unpublished until [`Producer::publish`]; 0 commits nothing. If there is no room or
    /// `fill` fails, the ring is left as it was. This side never reads the payload back, so a
    /// peer writing it meanwhile changes only what the peer receives.
    ///
    /// # Panics
    /// If `max` exceeds [`Producer::max_packet`] or `fill` claims more than `max` bytes (bugs on
    /// this side, as in [`Producer::push`]).
    pub fn push_with<E>(
        &mut self,
        max: u32,
        fill: impl FnOnce(&M, usize, usize) -> Result<usize, E>,
    ) -> Result<Filled<E>, RingError> {
        assert!(
            max <= self.max_packet,
            "fastnet: a record of {max} bytes exceeds max_packet {}",
            self.max_packet
        );
        let Some((pad, at)) = self.reserve(RECORD_HEADER + pad8(max))? else {
            return Ok(Filled::Full);
        };
        let n = match fill(&self.mem, at + RECORD_HEADER as usize, max as usize) {
            Ok(n) => n,
            Err(e) => return Ok(Filled::Failed(e)),
        };
        let len = match u32::try_from(n) {
            Ok(len) if len <= max => len,
            _ => panic!("fastnet: filled {n} bytes into a record of {max}"),
        };
        if len > 0 {
            self.commit(pad, at, len);
        }
        Ok(Filled::Pushed(n))
    }

    /// Finds room for a record of `rec` bytes: `Some((pad, at))` where `pad` is the padding
    /// record's length if the record must wrap to offset 0, and `at` is where the record goes.
    /// Writes nothing.
    fn reserve(&mut self, rec: u32) -> Result<Option<(Option<u32>, usize)>, RingError> {
        let off = self.prod & (self.size - 1);
        let contiguous = self.size - off;
        let need = if rec <= contiguous {
            rec
        } else {
            contiguous + rec
        };
        if need > self.size - self.prod.wrapping_sub(self.cons) {
            self.refresh()?;
            if need > self.size - self.prod.wrapping_sub(self.cons) {
                return Ok(None);
            }
        }
        Ok(Some(if rec > contiguous {
            (Some(contiguous), self.data)
        } else {
            (None, self.data + off as usize)
        }))
    }

    /// Writes the padding [`Producer::reserve`] asked for and the header of a record of `len`
    /// bytes at `at`, whose payload is in place, and moves the local index past both.
    fn commit(&mut self, pad: Option<u32>, at: usize, len: u32) {
        if let Some(contiguous) = pad {
            let here = self.data + (self.prod & (self.size - 1)) as usize;
            self.mem.store_u64(
                here,
                u64::from(contiguous - RECORD_HEADER) | u64::from(KIND_PAD) << 32,
                Ordering::Relaxed,
            );
            self.prod = self.prod.wrapping_add(contiguous);
        }
        self.mem.store_u64(
            at,
            u64::from(len) | u64::from(KIND_PACKET) << 32,
            Ordering::Relaxed,
        );
        self.prod = self.prod.wrapping_add(RECORD_HEADER + pad8(len));
    }

    /// Makes the records pushed so far visible to the consumer (one store for the whole batch)
    /// and says whether the consumer asked to be rung.
    pub fn publish(&mut self) -> Doorbell {
        if self.prod == self.published {
            return Doorbell::Quiet;
        }
        let line = self.dir.producer_line();
        self.mem.store_u32(line, self.prod, Ordering::Release);
        // Orders the index store before the event load (pairs with the consumer's fence in
        // prepare_sleep): either the consumer sees the new index, or this side sees its event.
        fence(Ordering::SeqCst);
        let event = self
            .mem
            .load_u32(self.dir.consumer_line() + 4, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.published, self.prod);
        Doorbell::from(need_event(event, self.prod, old))
    }

    /// The ring is full and the producer wants to sleep: asks the consumer to ring when it
    /// frees space. `Ok(true)`: sleep until the doorbell; `Ok(false)`: space appeared, push
    /// again.
    pub fn prepare_wait(&mut self) -> Result<bool, RingError> {
        self.mem
            .store_u32(self.dir.producer_line() + 4, self.cons, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let before = self.cons;
        self.refresh()?;
        Ok(self.cons == before)
    }

    /// Bytes of the ring in use (pushed and not yet released by the consumer, as last seen).
    pub fn in_flight(&self) -> u32 {
        self.prod.wrapping_sub(self.cons)
    }
}

/// The consuming side of one ring.
pub struct Consumer<M: Memory> {
    mem: M,
    dir: Direction,
    /// The header both sides attached with (checked unchanged once per batch).
    layout: Layout,
    data: usize,
    size: u32,
    max_packet: u32,
    /// The next record to read (local; never read back from the segment).
    cons: u32,
    /// The value of `cons` last published.
    published: u32,
    /// The producer index last read and validated.
    prod: u32,
}

impl<M: Memory> Consumer<M> {
    /// The consumer of ring `dir` in a segment whose header said `layout`, with both indexes
    /// at 0 (a fresh segment).
    pub fn new(mem: M, layout: Layout, dir: Direction) -> Consumer<M> {
        Consumer {
            mem,
            dir,
            layout,
            data: dir.data_offset(layout.ring_size),
            size: layout.ring_size,
            max_packet: layout.max_packet,
            cons: 0,
            published: 0,
            prod: 0,
        }
    }

    /// Starts at `index` instead of 0 (tests of the 32-bit wrap-around).
    #[cfg(test)]
    pub(super) fn starting_at(mut self, index: u32) -> Self {
        (self.cons, self.published, self.prod) = (index, index, index);
        self
    }

    /// The largest packet a record may hold: buffers given to [`Consumer::recv`] need this
    /// many bytes.
    pub fn max_packet(&self) -> u32 {
        self.max_packet
    }

    /// Reads the producer index once and validates it: at most a ring ahead of this side's
    /// consumer index, never behind what was read before. Also checks the header's magic,
    /// version and sizes. Returns the bytes available.
    pub fn refresh(&mut self) -> Result<u32, RingError> {
        self.layout.check_unchanged(&self.mem)?;
        let prod = self
            .mem
            .load_u32(self.dir.producer_line(), Ordering::Acquire);
        let bad = |why| RingError::BadProducerIndex {
            ring: self.dir,
            prod,
            cons: self.cons,
            size: self.size,
            why,
        };
        if !prod.is_multiple_of(8) {
            return Err(bad("not a multiple of 8"));
        }
        let avail = prod.wrapping_sub(self.cons);
        if avail > self.size {
            return Err(bad("more than a ring ahead"));
        }
        if avail < self.prod.wrapping_sub(self.cons) {
            return Err(bad("moved backwards"));
        }
        self.prod = prod;
        Ok(avail)
    }

    /// Copies the next packet into `buf` (at least [`Consumer::max_packet`] bytes) and returns
    /// its length, or `None` when the records seen at the last [`Consumer::refresh`] are all
    /// read. The record header is read once, validated, then the payload is copied.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
        let max_packet = self.max_packet;
        self.recv_with(|mem, at, n| {
            assert!(
                buf.len() >= n,
                "fastnet: receive buffer of {} bytes, smaller than max_packet {max_packet}",
                buf.len(),
            );
            mem.read(at, &mut buf[..n]);
            n
        })
    }

    /// Hands the next packet to `take` in place: the memory, the payload's offset in it and
    /// its length, once its record header is read once and validated. `None` as in
    /// [`Consumer::recv`]. The payload stays in the segment, where the peer can still write
    /// it: only a side that trusts its peer reads it more than once or hands it on unchecked
    /// (the guest's end, whose peer is the host).
    pub fn recv_with<R>(
        &mut self,
        take: impl FnOnce(&M, usize, usize) -> R,
    ) -> Result<Option<R>, RingError> {
        Ok(self
            .next_packet()?
            .map(|(at, len)| take(&self.mem, at, len)))
    }

    /// Takes every packet the producer index shows: one [`Consumer::refresh`], each packet
    /// handed to `take` in order (in place, as in [`Consumer::recv_with`]), then one
    /// [`Consumer::release`] for all of them. Each record header is read once and validated
    /// before its packet is handed over. A bad record is an error after the packets before
    /// it were taken; a failed `take` stops the batch with its error (its packet counts as
    /// taken). Either way nothing is released: the link ends.
    pub fn drain<E: From<RingError>>(
        &mut self,
        mut take: impl FnMut(&M, usize, usize) -> Result<(), E>,
    ) -> Result<Drained, E> {
        self.refresh()?;
        let mut packets = 0;
        while let Some((at, len)) = self.next_packet()? {
            if self.prod.wrapping_sub(self.cons) > PREFETCH_AHEAD {
                self.mem.prefetch(
                    self.data + (self.cons.wrapping_add(PREFETCH_AHEAD) & (self.size - 1)) as usize,
                );
            }
            take(&self.mem, at, len)?;
            packets += 1;
        }
        Ok(Drained {
            packets,
            doorbell: self.release(),
        })
    }

    /// Reads the next record header once, validates it, skips padding, and moves the local
    /// index past the packet: its payload's offset and length. `None`: the records seen at the
    /// last refresh are all read.
    #[inline]
    fn next_packet(&mut self) -> Result<Option<(usize, usize)>, RingError> {
        loop {
            let avail = self.prod.wrapping_sub(self.cons);
            if avail == 0 {
                return Ok(None);
            }
            let off = self.cons & (self.size - 1);
            let at = self.data + off as usize;
            let header = self.mem.load_u64(at, Ordering::Relaxed);
            let (len, kind) = (header as u32, (header >> 32) as u32);
            let contiguous = self.size - off;
            let bad = |why| RingError::BadRecord {
                ring: self.dir,
                pos: self.cons,
                len,
                kind,
                why,
            };
            match kind {
                KIND_PAD => {
                    if len != contiguous - RECORD_HEADER {
                        return Err(bad("padding must reach the end of the data area"));
                    }
                    if contiguous > avail {
                        return Err(bad("padding runs past the producer index"));
                    }
                    self.cons = self.cons.wrapping_add(contiguous);
                }
                KIND_PACKET => {
                    if len > self.max_packet {
                        return Err(bad("longer than max_packet"));
                    }
                    let rec = RECORD_HEADER + pad8(len);
                    if rec > contiguous {
                        return Err(bad("runs past the end of the data area"));
                    }
                    if rec > avail {
                        return Err(bad("runs past the producer index"));
                    }
                    self.cons = self.cons.wrapping_add(rec);
                    return Ok(Some((at + RECORD_HEADER as usize, len as usize)));
                }
                _ => return Err(bad("unknown kind")),
            }
        }
    }

    /// Gives the space of the records read so far back to the producer (one store for the
    /// whole batch) and says whether the producer asked to be rung.
    pub fn release(&mut self) -> Doorbell {
        if self.cons == self.published {
            return Doorbell::Quiet;
        }
        self.mem
            .store_u32(self.dir.consumer_line(), self.cons, Ordering::Release);
        // Pairs with the producer's fence in prepare_wait.
        fence(Ordering::SeqCst);
        let event = self
            .mem
            .load_u32(self.dir.producer_line() + 4, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.published, self.cons);
        Doorbell::from(need_event(event, self.cons, old))
    }

    /// Everything seen is read and the consumer wants to sleep: asks the producer to ring when
    /// it publishes more. `Ok(true)`: sleep until the doorbell; `Ok(false)`: records arrived,
    /// read them. Call [`Consumer::release`] first (its doorbell may be owed).
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        self.mem
            .store_u32(self.dir.consumer_line() + 4, self.cons, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(self.refresh()? == 0)
    }
}
