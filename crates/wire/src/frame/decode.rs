//! The decoder: finds frames in a byte stream again after garbage, bounded by a length limit.

use bytes::BufMut;

use super::*;

/// A link's first read buffer, and its reads until one fills it: an idle link only carries
/// keepalives, and a daemon holds thousands of them.
const READ_MIN: usize = 4 * 1024;

/// Smallest payload read into a buffer of its own when it is too small for a pool buffer
/// ([`BufferPool::fits`]): the buffer is sized to the frame, so its payload leaves as a view
/// of it (no copy) and holds no more memory than it carries. Below this, a copy costs less
/// than an allocation. Senders cut frames short where credit or their queue ran out, so a
/// bulk transfer brings many of these.
const OWN_BUFFER_MIN: usize = 4 * 1024;

/// How a byte sequence begins, for [`Decoder::next_in`].
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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DecodeStats {
    /// Frames delivered.
    #[cfg_attr(feature = "serde", serde(rename = "frames_in"))]
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
        crate::crc::crc32c(payload) == pcrc
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
    /// this until it returns `None` yields exactly what `push` of `input`'s bytes and then
    /// draining the iterator would. It leaves in `input` only the start of a sound frame whose
    /// rest has not been read yet; [`Decoder::prepare`] then readies `input` for that rest.
    ///
    /// It exists for speed. `push` copies everything into the decoder's buffer; here a sound
    /// frame in `input` is taken from it directly. A large payload that was read into a buffer
    /// of its own (a pool buffer, or one sized to its frame) leaves as a view of that buffer,
    /// with no copy at all; other payloads are copied once, so that no view pins a read buffer
    /// shared with other frames (a peer could then make us hold more than the window it was
    /// granted). A frame split across reads is
    /// completed in `input` by the next read. Anything unusual (garbage, a bad CRC, an oversized
    /// frame) falls back to `push` + `next`, so resynchronisation and every counter behave
    /// exactly as there.
    pub fn next_in(
        &mut self,
        input: &mut InputBuf,
        pool: &mut BufferPool,
    ) -> Option<Result<Frame, DecodeError>> {
        if self.discard == 0 && self.buf.is_empty() {
            match start_of(&input.buf, self.limit) {
                Start::Complete(header, total) => {
                    let end = HEADER_LEN + header.len as usize;
                    let b = &input.buf;
                    if self.payload_ok(&header, &b[HEADER_LEN..end], &b[end..total]) {
                        self.suspect = self.suspect.saturating_sub(total);
                        self.stats.frames += 1;
                        let payload =
                            if input.framed && input.pooled && pool.fits(header.len as usize) {
                                // The pool buffer holds this frame alone: hand it out.
                                let frame = input.buf.split_to(total);
                                pool.adopt(frame).slice(HEADER_LEN..end)
                            } else if input.framed
                                && !input.pooled
                                && input.buf.capacity() <= total + HEADER_LEN
                            {
                                // A buffer sized to this frame holds it: hand it out.
                                input.buf.split_to(total).freeze().slice(HEADER_LEN..end)
                            } else {
                                let payload = pool.copy(&input.buf[HEADER_LEN..end]);
                                input.buf.advance(total);
                                payload
                            };
                        input.framed = false;
                        return Some(Ok(Frame { header, payload }));
                    }
                }
                // The next read completes it, in place.
                Start::Incomplete(_) => return None,
                Start::Unclean => {}
            }
        } else if self.discard == 0 {
            // The buffer starts with a sound header: what `next` does then depends on that
            // frame's own bytes only, so adding just the bytes it lacks changes nothing.
            while let Start::Incomplete(need) = start_of(&self.buf, self.limit) {
                let k = need.min(input.len());
                self.buf.extend_from_slice(&input.buf[..k]);
                input.consume(k);
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
            self.push(&input.buf);
            input.consume(input.len());
        }
        self.next()
    }

    /// Readies `input` (what [`Decoder::next_in`] left of it) for the next read, and sets how
    /// much that read may take ([`InputBuf::unfilled`]).
    ///
    /// Once the header of a large frame (one that [`BufferPool`] gives a buffer of its own, or
    /// of at least [`OWN_BUFFER_MIN`] bytes, which gets a buffer sized to it) is in, its bytes
    /// move to the start of such a buffer if they are not there already, and the
    /// read is limited to the rest of that frame and the next header: the frame then fills the
    /// buffer alone and its payload can leave without a copy, and the next header is all that
    /// is copied to the next buffer. Otherwise reads take what the buffer has room for: 4 KiB
    /// at first (a daemon has thousands of idle links), pool buffers once a read filled its
    /// room. Nothing is allocated for a header before its CRC matched and its length was
    /// found within the limit.
    pub fn prepare(&self, input: &mut InputBuf, pool: &mut BufferPool) {
        let need = match start_of(&input.buf, self.limit) {
            Start::Incomplete(need) if self.discard == 0 && self.buf.is_empty() => need,
            _ => 0,
        };
        let total = input.len() + need;
        let payload = total.saturating_sub(wire_len(0));
        let large = need > 0 && input.len() >= HEADER_LEN && payload >= OWN_BUFFER_MIN;
        if large {
            let fits = pool.fits(payload);
            if !input.framed || input.pooled != fits {
                if fits {
                    input.refill(pool.take(), true, pool);
                } else {
                    // Room for the next header too, as a pool buffer has.
                    input.refill(BytesMut::with_capacity(total + HEADER_LEN), false, pool);
                    input.framed = true;
                }
            }
            input.window = need + HEADER_LEN;
        } else {
            let size = if input.grown || total > READ_MIN {
                pool.capacity()
            } else {
                READ_MIN
            };
            if input.room() < need.max(size / 4) {
                if input.is_empty() && input.buf.try_reclaim(size) {
                    input.framed = input.pooled;
                } else if size == pool.capacity() && total <= size {
                    input.refill(pool.take(), true, pool);
                } else {
                    input.refill(BytesMut::with_capacity(size.max(total)), false, pool);
                }
            }
            input.window = if need > 0 && input.len() >= HEADER_LEN && input.grown {
                // In a bulk transfer, the rest of a small frame and the next header only: a
                // large frame after it then starts a buffer of its own, where it had been read
                // in behind the small one and copied out (a sender's acknowledgements and
                // short frames come between large ones).
                need + HEADER_LEN
            } else {
                input.room()
            };
        }
        input.held = input.len();
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

/// A link's read buffer, owned by the caller of [`Decoder::next_in`] (in a session,
/// [`crate::Session::handle_read`]): reads go into [`InputBuf::unfilled`], the decoder takes
/// frames out of it and [`Decoder::prepare`] readies it for the next read.
#[derive(Debug, Default)]
pub struct InputBuf {
    buf: BytesMut,
    /// `buf` is a pool buffer, or one sized to the frame it was made for ([`OWN_BUFFER_MIN`]),
    /// and its view starts where the buffer does: a frame that arrives here has the buffer to
    /// itself, and its payload may leave as a view of it.
    framed: bool,
    /// `buf` is a pool buffer.
    pooled: bool,
    /// Most bytes the next read may add.
    window: usize,
    /// Bytes held when the window was set: what is beyond was read since.
    held: usize,
    /// A read filled its window: reads go into pool buffers from now on.
    grown: bool,
}

impl InputBuf {
    /// An empty buffer; allocates nothing until [`Decoder::prepare`].
    pub fn new() -> InputBuf {
        InputBuf::default()
    }

    /// Where the next read goes: the spare capacity, limited to the window the decoder set.
    pub fn unfilled(&mut self) -> bytes::buf::Limit<&mut BytesMut> {
        let window = self.window.min(self.room());
        (&mut self.buf).limit(window)
    }

    /// Copies as much of `data` as the window takes, as a read would; returns how much. For
    /// bytes that arrived elsewhere, and tests.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let mut room = self.unfilled();
        let n = room.remaining_mut().min(data.len());
        room.put_slice(&data[..n]);
        n
    }

    /// The bytes added since the window was set (call once after each read, before decoding;
    /// [`crate::Session::handle_read`] does); notes whether they filled the window.
    pub fn received(&mut self) -> usize {
        let n = self.len().saturating_sub(self.held);
        if self.window > 0 && n >= self.window {
            self.grown = true;
        }
        self.held = self.len();
        n
    }

    /// Bytes held, read and not yet decoded.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes held.
    pub fn filled(&self) -> &[u8] {
        &self.buf
    }

    fn room(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    /// Drops `n` bytes from the front.
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.framed &= n == 0;
    }

    /// Moves the bytes held to the start of `fresh`, and gives the old buffer back to the pool
    /// if no payload still uses it.
    fn refill(&mut self, mut fresh: BytesMut, pooled: bool, pool: &mut BufferPool) {
        fresh.extend_from_slice(&self.buf);
        let old = std::mem::replace(&mut self.buf, fresh);
        if self.pooled {
            pool.recycle(old.freeze());
        }
        self.pooled = pooled;
        self.framed = pooled;
    }
}

impl From<&[u8]> for InputBuf {
    /// Bytes already read (not in a pool buffer: their payloads are copied).
    fn from(data: &[u8]) -> InputBuf {
        InputBuf {
            buf: BytesMut::from(data),
            ..InputBuf::default()
        }
    }
}
