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

use bytes::{Buf, Bytes, BytesMut};

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
    fn parse(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let field = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if crc32c::crc32c(&b[..20]) != field(20) {
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
    encode_header(out, flags, kind, channel, seq, ack, payload.len());
    out.extend_from_slice(payload);
    encode_trailer(out, flags, payload);
}

/// Appends the header of a frame with a payload of `payload_len` bytes.
fn encode_header(
    out: &mut Vec<u8>,
    flags: u8,
    kind: u8,
    channel: u32,
    seq: u32,
    ack: u32,
    payload_len: usize,
) {
    // Payloads are bounded by the negotiated frame size (<= MAX_PAYLOAD_LIMIT), so this fits.
    let len = payload_len as u32;
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&channel.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ack.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let hcrc = crc32c::crc32c(&out[start..start + 20]);
    out.extend_from_slice(&hcrc.to_le_bytes());
}

/// Appends the trailer (payload CRC) of a frame.
fn encode_trailer(out: &mut Vec<u8>, flags: u8, payload: &[u8]) {
    let pcrc = if flags & flags::NO_PCRC != 0 {
        0
    } else {
        crc32c::crc32c(payload)
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
            encode_header(
                &mut self.inline,
                flags,
                kind,
                channel,
                seq,
                ack,
                payload.len(),
            );
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
#[derive(Debug)]
pub(crate) struct BufferPool {
    spare: Vec<BytesMut>,
    size: usize,
    max: usize,
    /// Fewest spare buffers since the last trim: that many were not needed.
    unused: usize,
}

impl BufferPool {
    /// A pool of buffers of `size` bytes (the largest frame payload).
    pub(crate) fn new(size: usize) -> BufferPool {
        let size = size.max(1);
        BufferPool {
            spare: Vec::new(),
            size,
            max: (POOL_BYTES / size).max(POOL_MIN_BUFFERS),
            unused: 0,
        }
    }

    /// The size of a pooled buffer.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer of [`BufferPool::size`] bytes of capacity.
    pub(crate) fn take(&mut self) -> BytesMut {
        let b = self.spare.pop();
        self.unused = self.unused.min(self.spare.len());
        b.unwrap_or_else(|| BytesMut::with_capacity(self.size))
    }

    /// `data` in a buffer of its own.
    pub(crate) fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.len() < self.size - self.size / 8 || data.len() > self.size {
            return Bytes::copy_from_slice(data);
        }
        let mut b = self.take();
        b.extend_from_slice(data);
        b.freeze()
    }

    /// Takes `payload`'s buffer back if this was the last view of a pool-sized buffer.
    pub(crate) fn recycle(&mut self, payload: Bytes) {
        if self.spare.len() >= self.max {
            return;
        }
        if let Ok(mut b) = payload.try_into_mut() {
            b.clear();
            // Moves the (empty) view back to the start of its allocation; no copy, no allocation.
            if b.try_reclaim(self.size) && b.capacity() == self.size {
                self.spare.push(b);
            }
        }
    }

    /// Frees the spare buffers that were not needed since the last call.
    pub(crate) fn trim(&mut self) {
        let keep = self.spare.len() - self.unused.min(self.spare.len());
        self.spare.truncate(keep);
        self.unused = self.spare.len();
    }

    /// Spare buffers held.
    #[cfg(test)]
    pub(crate) fn spare(&self) -> usize {
        self.spare.len()
    }

    /// Bytes held in spare buffers.
    pub(crate) fn held(&self) -> usize {
        self.spare.len() * self.size
    }
}

/// How a byte sequence begins, for [`Decoder::next_from`].
enum Start {
    /// A marker, a header whose CRC matches and a length within the limit; the whole frame
    /// (`.1` bytes) is there.
    Complete(Header, usize),
    /// Such a frame (or at least the marker) has begun; this many more bytes complete it (or
    /// its header).
    Incomplete(usize),
    /// Anything else (empty, garbage, a bad header, an oversized frame).
    Unclean,
}

fn start_of(b: &[u8], limit: u32) -> Start {
    if b.len() < MAGIC.len() || b[..2] != MAGIC {
        return Start::Unclean;
    }
    let Some(head) = b.first_chunk::<HEADER_LEN>() else {
        return Start::Incomplete(HEADER_LEN - b.len());
    };
    match Header::parse(head) {
        Some(h) if h.len <= limit => {
            let total = wire_len(h.len as usize);
            match total.checked_sub(b.len()) {
                Some(need) if need > 0 => Start::Incomplete(need),
                _ => Start::Complete(h, total),
            }
        }
        _ => Start::Unclean,
    }
}

/// Something the decoder had to throw away. None of these stop the decoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Bytes that were not part of any frame were skipped.
    #[error("skipped {0} bytes of garbage before a frame")]
    Garbage(usize),
    /// A header failed its CRC; the decoder resynchronised at the next marker.
    #[error("frame header failed its CRC")]
    BadHeader,
    /// A payload failed its CRC; the frame was dropped.
    #[error(
        "payload of a {kind:#04x} frame (channel {channel}, seq {seq}, {len} bytes) failed its CRC"
    )]
    BadPayload {
        /// Kind byte.
        kind: u8,
        /// Channel.
        channel: u32,
        /// Sequence number.
        seq: u32,
        /// Claimed length.
        len: u32,
    },
    /// A well-formed header announced a payload above the limit; its bytes are skipped.
    #[error("frame of {len} bytes on channel {} exceeds the limit of {limit} bytes", header.channel)]
    Oversized {
        /// The header (its CRC matched, so the peer really sent this).
        header: Header,
        /// The announced length.
        len: u32,
        /// The limit in force.
        limit: u32,
    },
}

/// Counters kept by a decoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Frames delivered.
    pub frames: u64,
    /// Bytes skipped while looking for a frame.
    pub garbage_bytes: u64,
    /// Headers or payloads that failed their CRC.
    pub crc_errors: u64,
    /// Frames above the size limit.
    pub oversized: u64,
}

/// Finds frames in a byte stream; survives garbage, cuts and corruption.
///
/// Memory is bounded: at most one frame (`limit` + overhead) plus one read is buffered, and an
/// oversized frame is skipped without being buffered. Work is bounded too: every input byte
/// costs at most a few bytes of CRC, whatever the input (see [`Decoder::suspect`]).
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    limit: u32,
    /// Bytes of an oversized frame (or of a suspect span, see below) still to skip.
    discard: usize,
    /// Bytes from the start of `buf` to the end of the last frame whose payload CRC failed,
    /// while the scan is inside it (0 otherwise). After a payload CRC failure the scan goes on
    /// one byte further, because lost bytes may have moved the next frame inside the claimed
    /// length; but a second failure inside that span skips to the further of the two claimed
    /// ends. Without this, back-to-back genuine headers claiming 64 KiB with no payload made
    /// the decoder CRC 64 KiB per 24 bytes of input; with it, failed checks cost at most twice
    /// the bytes skipped.
    suspect: usize,
    /// Whether frames flagged [`flags::NO_PCRC`] are accepted unchecked (negotiated per link).
    no_pcrc: bool,
    stats: DecodeStats,
}

impl Decoder {
    /// A decoder accepting payloads up to `limit` bytes (clamped to [`MAX_PAYLOAD_LIMIT`]).
    pub fn new(limit: u32) -> Decoder {
        Decoder {
            // Empty until a frame arrives split across reads (whole frames are decoded straight
            // from the input): a daemon holds one decoder per link, thousands of them idle.
            buf: BytesMut::new(),
            limit: limit.min(MAX_PAYLOAD_LIMIT),
            discard: 0,
            suspect: 0,
            no_pcrc: false,
            stats: DecodeStats::default(),
        }
    }

    /// Changes the payload limit (after a handshake negotiated it).
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit.min(MAX_PAYLOAD_LIMIT);
    }

    /// Accepts (or, with `false`, stops accepting) frames flagged [`flags::NO_PCRC`] without a
    /// payload check. Only for a link whose handshake negotiated it: elsewhere such a frame is
    /// checked like any other, and its zero `pcrc` fails unless the payload is empty.
    pub fn set_no_pcrc(&mut self, on: bool) {
        self.no_pcrc = on;
    }

    /// Whether the payload of `header`'s frame is sound: `trailer` is its `pcrc` field.
    fn payload_ok(&self, header: &Header, payload: &[u8], trailer: &[u8]) -> bool {
        let pcrc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        if self.no_pcrc && header.flags & flags::NO_PCRC != 0 && pcrc == 0 {
            return true;
        }
        crc32c::crc32c(payload) == pcrc
    }

    /// Feeds received bytes.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.discard > 0 {
            let n = self.discard.min(data.len());
            self.discard -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
    }

    /// Drops `n` bytes from the front of the buffer (the scan moves past them).
    fn advance(&mut self, n: usize) {
        self.buf.advance(n);
        self.suspect = self.suspect.saturating_sub(n);
    }

    /// Counters so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Decodes from the buffered bytes followed by `input`, consuming `input` as it goes: calling
    /// this until it returns `None` yields exactly what `push(input)` and then draining the
    /// iterator would, and leaves `input` empty.
    ///
    /// It exists for speed. `push` copies everything into the buffer, and since delivered frames
    /// keep views into it, the next `push` had to move the buffer to a fresh allocation (copying
    /// and page-faulting) almost every time. Here a sound frame at the start of `input` is taken
    /// straight from it (its payload copied once into an allocation of its own), and a frame
    /// split across two reads is completed with only the bytes it lacks. Anything unusual
    /// (garbage, a bad CRC, an oversized frame) falls back to `push` + `next`, so
    /// resynchronisation and every counter behave exactly as before.
    pub(crate) fn next_from(
        &mut self,
        input: &mut &[u8],
        pool: &mut BufferPool,
    ) -> Option<Result<Frame, DecodeError>> {
        if self.discard == 0 && self.buf.is_empty() {
            match start_of(input, self.limit) {
                Start::Complete(header, total) => {
                    if let Some(frame) = self.verified(header, &input[..total], pool) {
                        *input = &input[total..];
                        self.suspect = self.suspect.saturating_sub(total);
                        return Some(Ok(frame));
                    }
                }
                Start::Incomplete(_) => {
                    self.buf.extend_from_slice(input);
                    *input = &[];
                    return None;
                }
                Start::Unclean => {}
            }
        } else if self.discard == 0 {
            // The buffer starts with a sound header: what `next` does then depends on that
            // frame's own bytes only, so adding just the bytes it lacks changes nothing.
            while let Start::Incomplete(need) = start_of(&self.buf, self.limit) {
                let k = need.min(input.len());
                self.buf.extend_from_slice(&input[..k]);
                *input = &input[k..];
                if k < need {
                    return None;
                }
            }
            if let Start::Complete(..) = start_of(&self.buf, self.limit) {
                return self.next();
            }
        }
        // The general case, on the whole stream as `push` would have buffered it.
        if !input.is_empty() {
            self.push(input);
            *input = &[];
        }
        self.next()
    }

    /// The frame, if its payload CRC matches.
    fn verified(&mut self, header: Header, frame: &[u8], pool: &mut BufferPool) -> Option<Frame> {
        let end = HEADER_LEN + header.len as usize;
        if !self.payload_ok(
            &header,
            &frame[HEADER_LEN..end],
            &frame[end..end + TRAILER_LEN],
        ) {
            return None;
        }
        self.stats.frames += 1;
        Some(Frame {
            header,
            payload: pool.copy(&frame[HEADER_LEN..end]),
        })
    }

    fn garbage(&mut self, n: usize) -> Option<Result<Frame, DecodeError>> {
        if n == 0 {
            return None;
        }
        self.stats.garbage_bytes += n as u64;
        Some(Err(DecodeError::Garbage(n)))
    }
}

impl Iterator for Decoder {
    type Item = Result<Frame, DecodeError>;

    /// The next frame, or what was thrown away on the way to it; `None` when more input is
    /// needed (the iterator resumes after the next `push`).
    fn next(&mut self) -> Option<Result<Frame, DecodeError>> {
        // Find the marker; everything before it is garbage.
        let at = match self.buf.windows(2).position(|w| w == MAGIC) {
            Some(at) => at,
            None => {
                // Keep a trailing first marker byte: it may be the start of a split marker.
                let keep = usize::from(self.buf.last() == Some(&MAGIC[0]));
                let skip = self.buf.len() - keep;
                self.advance(skip);
                return self.garbage(skip);
            }
        };
        if at > 0 {
            self.advance(at);
            return self.garbage(at);
        }
        let head = self.buf.get(..HEADER_LEN)?;
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(head);
        let Some(header) = Header::parse(&raw) else {
            // Not a real header (or a garbled one): resynchronise one byte further on.
            self.advance(1);
            self.stats.crc_errors += 1;
            return Some(Err(DecodeError::BadHeader));
        };
        if header.len > self.limit {
            let total = wire_len(header.len as usize);
            let have = self.buf.len().min(total);
            self.advance(have);
            self.discard = total - have;
            self.stats.oversized += 1;
            return Some(Err(DecodeError::Oversized {
                header,
                len: header.len,
                limit: self.limit,
            }));
        }
        let total = wire_len(header.len as usize);
        if self.buf.len() < total {
            return None;
        }
        let end = HEADER_LEN + header.len as usize;
        if !self.payload_ok(&header, &self.buf[HEADER_LEN..end], &self.buf[end..total]) {
            self.stats.crc_errors += 1;
            let error = DecodeError::BadPayload {
                kind: header.kind,
                channel: header.channel,
                seq: header.seq,
                len: header.len,
            };
            if self.suspect == 0 {
                // The length may be wrong because bytes were lost inside the payload, so the
                // next frame can start inside what we thought was this one: rescan from the
                // next byte, but remember how far this frame claimed to reach.
                self.suspect = total;
                self.advance(1);
            } else {
                // A second failure inside a suspect span: skip both claimed frames.
                let skip = self.suspect.max(total);
                let have = self.buf.len().min(skip);
                self.advance(have);
                self.discard = skip - have;
                self.suspect = 0;
                self.stats.garbage_bytes += skip as u64;
            }
            return Some(Err(error));
        }
        let frame = self.buf.split_to(total);
        self.suspect = self.suspect.saturating_sub(total);
        self.stats.frames += 1;
        // A copy, not a view: a view would keep the whole read buffer alive for as long as
        // the application leaves this (maybe one-byte) payload unread.
        Some(Ok(Frame {
            header,
            payload: Bytes::copy_from_slice(&frame[HEADER_LEN..end]),
        }))
    }
}

#[cfg(test)]
mod tests;
