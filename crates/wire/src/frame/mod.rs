//! Frames: the unit on the wire, and the decoder that finds them again after garbage.
//!
//! Layout (little-endian), see docs/PROTOCOL.md:
//!
//! ```text
//! 0  magic   2  A9 5C
//! 2  kind    1
//! 3  flags   1  bit 0 NO_PCRC (negotiated, see [`flags`]); receivers ignore unknown bits
//! 4  channel 4
//! 8  seq     4  sequence number of a sequenced frame, 0 otherwise
//! 12 ack     4  next sequence number the sender expects from its peer
//! 16 len     4  payload length
//! 20 hcrc    4  CRC-32C of bytes 0..20
//! 24 payload len bytes
//! .. pcrc    4  CRC-32C of the payload, or 0 with NO_PCRC
//! ```
//!
//! The header has its own CRC so that a garbled length can never make the decoder wait for
//! (or allocate) a frame that does not exist: a header is trusted only once its CRC matches.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::{Buf, Bytes, BytesMut};

mod decode;
pub use decode::{DecodeError, DecodeStats, Decoder, InputBuf};

/// First two bytes of every frame. Chosen outside ASCII so console text rarely contains it.
pub const MAGIC: [u8; 2] = [0xA9, 0x5C];
/// Bytes before the payload.
pub const HEADER_LEN: usize = 24;
/// Bytes after the payload (its CRC).
pub const TRAILER_LEN: usize = 4;
/// Largest payload any implementation may be asked to accept (the negotiated limit is lower).
pub const MAX_PAYLOAD_LIMIT: u32 = 1 << 20;

/// Header flag bits.
pub mod flags {
    /// The `pcrc` field is 0 and carries no CRC: the link's transport checks integrity and
    /// both sides offered [`crate::hello::caps::NO_PAYLOAD_CRC`] on it. The field stays in
    /// place so that a frame's length, and resynchronisation, are the same in both modes.
    pub const NO_PCRC: u8 = 1 << 0;
}

/// What a frame means. Kinds below 0x10 are link frames (per transport connection, not
/// sequenced); kinds from 0x10 are session frames (sequenced, acknowledged, retransmitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Handshake; first frame on every link.
    Hello = 0x01,
    /// Keepalive probe; payload is an 8-byte nonce echoed by `Pong`.
    Ping = 0x02,
    /// Keepalive answer.
    Pong = 0x03,
    /// Acknowledgement only (the `ack` field of every frame also acknowledges).
    Ack = 0x04,
    /// "I lost something": retransmit from the `ack` field on.
    Nack = 0x05,
    /// "I will not accept this link": payload = UTF-8 reason. The receiver closes the link.
    Refuse = 0x06,
    /// Open a channel: payload = class, name, receive window.
    Open = 0x10,
    /// Channel accepted: payload = receive window.
    OpenOk = 0x11,
    /// Channel bytes.
    Data = 0x12,
    /// More receive window: payload = u32 increment.
    Credit = 0x13,
    /// End of data in this direction (half close).
    Close = 0x14,
    /// Abort the channel: payload = u16 code + UTF-8 reason.
    Reset = 0x15,
}

impl Kind {
    /// Decodes a kind byte; `None` for kinds this version does not know.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0x01 => Kind::Hello,
            0x02 => Kind::Ping,
            0x03 => Kind::Pong,
            0x04 => Kind::Ack,
            0x05 => Kind::Nack,
            0x06 => Kind::Refuse,
            0x10 => Kind::Open,
            0x11 => Kind::OpenOk,
            0x12 => Kind::Data,
            0x13 => Kind::Credit,
            0x14 => Kind::Close,
            0x15 => Kind::Reset,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry a sequence number and are retransmitted.
    pub fn is_sequenced(raw: u8) -> bool {
        raw >= 0x10
    }
}

/// A decoded, CRC-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Raw kind byte (may be a kind this version does not know).
    pub kind: u8,
    /// Flags (reserved).
    pub flags: u8,
    /// Channel id (0 for link frames).
    pub channel: u32,
    /// Sequence number (session frames only).
    pub seq: u32,
    /// Cumulative acknowledgement: next sequence number expected from the peer.
    pub ack: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// The header of a frame carrying `payload`.
    fn of(flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &[u8]) -> Header {
        Header {
            kind,
            flags,
            channel,
            seq,
            ack,
            // Payloads are bounded by the negotiated frame size (<= MAX_PAYLOAD_LIMIT), so this
            // fits.
            len: payload.len() as u32,
        }
    }

    /// Appends this header, with its CRC, to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.channel.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.ack.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        let hcrc = crate::crc::crc32c(&out[start..start + 20]);
        out.extend_from_slice(&hcrc.to_le_bytes());
    }

    fn parse(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let field = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if crate::crc::crc32c(&b[..20]) != field(20) {
            return None;
        }
        Some(Header {
            kind: b[2],
            flags: b[3],
            channel: field(4),
            seq: field(8),
            ack: field(12),
            len: field(16),
        })
    }
}

/// A complete frame as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The checked header.
    pub header: Header,
    /// The checked payload (its own buffer, or a view into the decoder's).
    pub payload: Bytes,
}

/// Appends one encoded frame to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, channel: u32, seq: u32, ack: u32, payload: &[u8]) {
    encode_flagged(out, 0, kind, channel, seq, ack, payload);
}

/// [`encode`] with header `flags` ([`flags::NO_PCRC`] leaves the payload CRC out).
pub fn encode_flagged(
    out: &mut Vec<u8>,
    flags: u8,
    kind: u8,
    channel: u32,
    seq: u32,
    ack: u32,
    payload: &[u8],
) {
    out.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    Header::of(flags, kind, channel, seq, ack, payload).encode(out);
    out.extend_from_slice(payload);
    encode_trailer(out, flags, payload);
}

/// Appends the trailer (payload CRC) of a frame.
fn encode_trailer(out: &mut Vec<u8>, flags: u8, payload: &[u8]) {
    let pcrc = if flags & flags::NO_PCRC != 0 {
        0
    } else {
        crate::crc::crc32c(payload)
    };
    out.extend_from_slice(&pcrc.to_le_bytes());
}

/// Payloads at least this large are not copied into a [`Transmit`] but written from where they
/// are; smaller ones cost less to copy than an extra I/O vector entry.
const SHARE_MIN: usize = 1024;

/// Encoded frames ready for one vectored write (`writev`): headers, trailers and small
/// payloads are written into one buffer, large payloads stay shared views of the session's
/// queues. The bytes are exactly those [`encode`] would produce; only the copy is saved.
#[derive(Debug, Default)]
pub struct Transmit {
    /// Headers, trailers and small payloads, back to back.
    inline: Vec<u8>,
    /// Large payloads, each with the length of `inline` when it was added (its wire position).
    shared: Vec<(usize, Bytes)>,
    len: usize,
}

impl Transmit {
    /// Appends one encoded frame with header `flags`.
    pub fn encode(
        &mut self,
        flags: u8,
        kind: u8,
        channel: u32,
        seq: u32,
        ack: u32,
        payload: &Bytes,
    ) {
        if payload.len() < SHARE_MIN {
            encode_flagged(&mut self.inline, flags, kind, channel, seq, ack, payload);
        } else {
            Header::of(flags, kind, channel, seq, ack, payload).encode(&mut self.inline);
            self.shared.push((self.inline.len(), payload.clone()));
            encode_trailer(&mut self.inline, flags, payload);
        }
        self.len += wire_len(payload.len());
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the frames (and releases the payloads), keeping the buffer for reuse.
    pub fn clear(&mut self) {
        self.inline.clear();
        self.shared.clear();
        self.len = 0;
    }

    /// Appends the bytes after the first `skip` (already written) to `out`, in wire order.
    pub fn slices<'a>(&'a self, mut skip: usize, out: &mut Vec<std::io::IoSlice<'a>>) {
        let mut push = |piece: &'a [u8]| {
            if skip >= piece.len() {
                skip -= piece.len(); // Written already (or empty).
            } else {
                out.push(std::io::IoSlice::new(&piece[skip..]));
                skip = 0;
            }
        };
        let mut from = 0;
        for (at, payload) in &self.shared {
            push(&self.inline[from..*at]);
            push(payload);
            from = *at;
        }
        push(&self.inline[from..]);
    }

    /// The bytes in one buffer (for transports without vectored writes, and tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut slices = Vec::new();
        self.slices(0, &mut slices);
        slices.iter().flat_map(|s| s.iter().copied()).collect()
    }
}

/// Where the session encodes frames: a contiguous buffer or a [`Transmit`].
pub(crate) trait Sink {
    /// Bytes added so far.
    fn encoded(&self) -> usize;
    /// Appends one frame whose payload is already shared.
    fn frame(&mut self, flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &Bytes);
    /// Appends one link frame with a small payload.
    fn small(&mut self, flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &[u8]);
}

impl Sink for Vec<u8> {
    fn encoded(&self) -> usize {
        self.len()
    }
    fn frame(&mut self, flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &Bytes) {
        encode_flagged(self, flags, kind, channel, seq, ack, payload);
    }
    fn small(&mut self, flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &[u8]) {
        encode_flagged(self, flags, kind, channel, seq, ack, payload);
    }
}

impl Sink for Transmit {
    fn encoded(&self) -> usize {
        self.len
    }
    fn frame(&mut self, flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &Bytes) {
        self.encode(flags, kind, channel, seq, ack, payload);
    }
    fn small(&mut self, flags: u8, kind: u8, channel: u32, seq: u32, ack: u32, payload: &[u8]) {
        encode_flagged(&mut self.inline, flags, kind, channel, seq, ack, payload);
        self.len += wire_len(payload.len());
    }
}

/// Bytes one frame with this payload length occupies on the wire.
pub fn wire_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len + TRAILER_LEN
}

/// Most memory a [`BufferPool`] keeps in spare buffers (but at least [`POOL_MIN_BUFFERS`]).
pub(crate) const POOL_BYTES: usize = 4 << 20;
/// Fewest spare buffers a [`BufferPool`] may keep, whatever their size.
pub(crate) const POOL_MIN_BUFFERS: usize = 8;

/// Frame-sized payload buffers, reused once their frames were read or acknowledged.
///
/// In a bulk transfer each frame allocates and frees a frame-sized buffer on both sides. The
/// allocator (glibc) hands such memory back to the kernel and takes it back page by page: at
/// 64 KiB writes, page faults took a seventh of the CPU time, and the extra latency halved
/// throughput in about half the runs. The pool must hold the working set (send buffers, credit
/// windows and frames in flight of all busy channels: dozens of buffers); eight buffers were
/// not enough. Idle memory is bounded twice: at most [`POOL_BYTES`] are kept, and
/// [`BufferPool::trim`] (called every few seconds by the session) frees what went unused since
/// the previous call. Only payloads of at least 7/8 of the size are pooled, so a pooled payload
/// takes at most 8/7 of its length (what a guest can make us hold is counted in payload bytes).
///
/// Received payloads come back by themselves when their last view is dropped, wherever that
/// is: `recv_bytes` hands them to the application, whose task drops them. Before, those
/// buffers went back to the allocator, and page faults on fresh ones took an eighth of the
/// link tasks' CPU time at 64 KiB writes.
///
/// A buffer holds a whole frame of the largest payload and the next frame's header besides
/// ([`BufferPool::capacity`]): a link reads large frames straight into pool buffers
/// ([`InputBuf`]), and their payloads leave as views of them.
#[derive(Debug)]
pub struct BufferPool {
    spare: Arc<Spare>,
    /// Fewest spare buffers since the last trim: that many were not needed.
    unused: usize,
}

/// A pool's spare buffers, shared with the received payloads that return to it.
#[derive(Debug)]
struct Spare {
    bufs: Mutex<Vec<BytesMut>>,
    /// Largest payload.
    size: usize,
    /// Capacity of every buffer.
    cap: usize,
    max: usize,
}

impl Spare {
    fn lock(&self) -> MutexGuard<'_, Vec<BytesMut>> {
        // A panic under this lock (none is expected) left a valid list.
        self.bufs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `b` (empty, at the start of its allocation) if it is pool-sized and there is room.
    fn put(&self, mut b: BytesMut) {
        b.clear();
        // Moves the (empty) view back to the start of its allocation; no copy, no allocation.
        if b.try_reclaim(self.cap) && b.capacity() == self.cap {
            let mut bufs = self.lock();
            if bufs.len() < self.max {
                bufs.push(b);
            }
        }
    }
}

/// A received payload's buffer, returned to its pool when the last view of it is dropped.
struct Pooled {
    buf: BytesMut,
    /// Weak: a session's pool is freed with it, whatever payloads outlive it.
    home: Weak<Spare>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(home) = self.home.upgrade() {
            home.put(std::mem::take(&mut self.buf));
        }
    }
}

impl BufferPool {
    /// A pool of buffers for payloads of up to `size` bytes (the largest frame payload).
    pub fn new(size: usize) -> BufferPool {
        let size = size.max(1);
        let cap = wire_len(size) + HEADER_LEN;
        BufferPool {
            spare: Arc::new(Spare {
                bufs: Mutex::new(Vec::new()),
                size,
                cap,
                max: (POOL_BYTES / cap).max(POOL_MIN_BUFFERS),
            }),
            unused: 0,
        }
    }

    /// The largest payload a pooled buffer is for.
    pub(crate) fn size(&self) -> usize {
        self.spare.size
    }

    /// The capacity of a pooled buffer: a frame of [`BufferPool::size`] bytes of payload and
    /// the next frame's header.
    pub(crate) fn capacity(&self) -> usize {
        self.spare.cap
    }

    /// Whether a payload of `len` bytes gets a pool buffer of its own: only those of at least
    /// 7/8 of the size, so that one takes at most 8/7 of its length plus the framing (what a
    /// guest can make us hold is counted in payload bytes).
    pub(crate) fn fits(&self, len: usize) -> bool {
        let size = self.spare.size;
        len >= size - size / 8 && len <= size
    }

    /// An empty buffer of [`BufferPool::capacity`] bytes of capacity.
    pub(crate) fn take(&mut self) -> BytesMut {
        let b = {
            let mut bufs = self.spare.lock();
            let b = bufs.pop();
            self.unused = self.unused.min(bufs.len());
            b
        };
        b.unwrap_or_else(|| BytesMut::with_capacity(self.spare.cap))
    }

    /// `data` in a buffer of its own, which returns to the pool when its last view is dropped.
    pub(crate) fn copy(&mut self, data: &[u8]) -> Bytes {
        if !self.fits(data.len()) {
            return Bytes::copy_from_slice(data);
        }
        let mut buf = self.take();
        buf.extend_from_slice(data);
        self.adopt(buf)
    }

    /// `buf` (a view of a buffer from [`BufferPool::take`]) as `Bytes`, which give the buffer
    /// back to the pool when their last view is dropped.
    pub(crate) fn adopt(&self, buf: BytesMut) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            home: Arc::downgrade(&self.spare),
        })
    }

    /// Takes `payload`'s buffer back if this was the last view of a pool-sized buffer (a
    /// received payload comes back by itself when its last view goes, here or later).
    pub(crate) fn recycle(&mut self, payload: Bytes) {
        if let Ok(b) = payload.try_into_mut() {
            self.spare.put(b);
        }
    }

    /// Frees the spare buffers that were not needed since the last call.
    pub(crate) fn trim(&mut self) {
        let mut bufs = self.spare.lock();
        let keep = bufs.len() - self.unused.min(bufs.len());
        bufs.truncate(keep);
        self.unused = bufs.len();
    }

    /// Spare buffers held.
    #[cfg(test)]
    pub(crate) fn spare(&self) -> usize {
        self.spare.lock().len()
    }

    /// Bytes held in spare buffers.
    pub(crate) fn held(&self) -> usize {
        self.spare.lock().len() * self.spare.cap
    }
}

#[cfg(test)]
mod tests;
