//! Frames: the unit on the wire, and the decoder that finds them again after garbage.
//!
//! Layout (little-endian), see docs/PROTOCOL.md:
//!
//! ```text
//! 0  magic   2  A9 5C
//! 2  kind    1
//! 3  flags   1  (0; receivers ignore unknown bits)
//! 4  channel 4
//! 8  seq     4  sequence number of a sequenced frame, 0 otherwise
//! 12 ack     4  next sequence number the sender expects from its peer
//! 16 len     4  payload length
//! 20 hcrc    4  CRC-32C of bytes 0..20
//! 24 payload len bytes
//! .. pcrc    4  CRC-32C of the payload
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
    /// The checked payload (a view into the receive buffer, no copy).
    pub payload: Bytes,
}

/// Appends one encoded frame to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, channel: u32, seq: u32, ack: u32, payload: &[u8]) {
    // Payloads are bounded by the negotiated frame size (<= MAX_PAYLOAD_LIMIT), so this fits.
    let len = payload.len() as u32;
    let start = out.len();
    out.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&channel.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ack.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let hcrc = crc32c::crc32c(&out[start..start + 20]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
}

/// Bytes one frame with this payload length occupies on the wire.
pub fn wire_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len + TRAILER_LEN
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
/// oversized frame is skipped without being buffered.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    limit: u32,
    /// Bytes of an oversized frame still to skip.
    discard: usize,
    stats: DecodeStats,
}

impl Decoder {
    /// A decoder accepting payloads up to `limit` bytes (clamped to [`MAX_PAYLOAD_LIMIT`]).
    pub fn new(limit: u32) -> Decoder {
        Decoder {
            buf: BytesMut::with_capacity(wire_len(limit.min(MAX_PAYLOAD_LIMIT) as usize)),
            limit: limit.min(MAX_PAYLOAD_LIMIT),
            discard: 0,
            stats: DecodeStats::default(),
        }
    }

    /// Changes the payload limit (after a handshake negotiated it).
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit.min(MAX_PAYLOAD_LIMIT);
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

    /// Counters so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
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
                self.buf.advance(skip);
                return self.garbage(skip);
            }
        };
        if at > 0 {
            self.buf.advance(at);
            return self.garbage(at);
        }
        let head = self.buf.get(..HEADER_LEN)?;
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(head);
        let Some(header) = Header::parse(&raw) else {
            // Not a real header (or a garbled one): resynchronise one byte further on.
            self.buf.advance(1);
            self.stats.crc_errors += 1;
            return Some(Err(DecodeError::BadHeader));
        };
        if header.len > self.limit {
            let total = wire_len(header.len as usize);
            let have = self.buf.len().min(total);
            self.buf.advance(have);
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
        let t = &self.buf[end..total];
        let pcrc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        if crc32c::crc32c(&self.buf[HEADER_LEN..end]) != pcrc {
            // The length may be wrong because bytes were lost inside the payload, so the next
            // frame can start inside what we thought was this one: rescan from the next byte.
            self.buf.advance(1);
            self.stats.crc_errors += 1;
            return Some(Err(DecodeError::BadPayload {
                kind: header.kind,
                channel: header.channel,
                seq: header.seq,
                len: header.len,
            }));
        }
        let mut frame = self.buf.split_to(total);
        frame.advance(HEADER_LEN);
        frame.truncate(header.len as usize);
        self.stats.frames += 1;
        Some(Ok(Frame {
            header,
            payload: frame.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder) -> (Vec<Frame>, Vec<DecodeError>) {
        let (mut ok, mut err) = (Vec::new(), Vec::new());
        for r in d.by_ref() {
            match r {
                Ok(f) => ok.push(f),
                Err(e) => err.push(e),
            }
        }
        (ok, err)
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Data as u8, 7, 3, 9, b"hello");
        encode(&mut wire, Kind::Ack as u8, 0, 0, 4, b"");
        let mut d = Decoder::new(1024);
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            got.extend(frames(&mut d).0);
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, &b"hello"[..]);
        assert_eq!(
            (got[0].header.channel, got[0].header.seq, got[0].header.ack),
            (7, 3, 9)
        );
        assert_eq!(got[1].header.kind, Kind::Ack as u8);
        assert_eq!(got[1].header.ack, 4);
    }

    #[test]
    fn garbage_before_and_between_is_skipped() {
        let mut wire = b"login: \xA9garbage".to_vec();
        encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"a");
        wire.extend_from_slice(b"\xA9\x5Cxx");
        encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"b");
        let mut d = Decoder::new(1024);
        d.push(&wire);
        let (ok, err) = frames(&mut d);
        assert_eq!(
            ok.iter().map(|f| f.payload.clone()).collect::<Vec<_>>(),
            [&b"a"[..], b"b"]
        );
        assert!(err.contains(&DecodeError::BadHeader));
        assert_eq!(d.stats().frames, 2);
    }

    #[test]
    fn corrupted_payload_is_dropped_and_next_frame_found() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"first frame");
        let second = wire.len();
        encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"second");
        wire[HEADER_LEN + 2] ^= 0x40;
        let mut d = Decoder::new(1024);
        d.push(&wire);
        let (ok, err) = frames(&mut d);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].header.seq, 1);
        assert!(matches!(err[0], DecodeError::BadPayload { seq: 0, .. }));
        assert!(second > 0);
    }

    #[test]
    fn lost_bytes_inside_payload_resync_at_next_frame() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Data as u8, 1, 0, 0, &[7u8; 100]);
        encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"after");
        wire.drain(40..60);
        // More traffic must arrive for the truncated frame's claimed length to be reached.
        encode(&mut wire, Kind::Ping as u8, 0, 0, 0, &[0u8; 100]);
        let mut d = Decoder::new(1024);
        d.push(&wire);
        let (ok, _) = frames(&mut d);
        assert_eq!(ok[0].payload, &b"after"[..]);
        assert_eq!(ok[1].header.kind, Kind::Ping as u8);
    }

    #[test]
    fn oversized_frame_is_skipped_without_buffering() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Data as u8, 5, 0, 0, &[1u8; 5000]);
        encode(&mut wire, Kind::Data as u8, 5, 1, 0, b"ok");
        let mut d = Decoder::new(1000);
        d.push(&wire[..100]);
        match d.next() {
            Some(Err(DecodeError::Oversized {
                header,
                len: 5000,
                limit: 1000,
            })) => {
                assert_eq!(header.channel, 5)
            }
            other => panic!("expected oversized, got {other:?}"),
        }
        assert_eq!(d.buffered(), 0);
        d.push(&wire[100..]);
        let (ok, _) = frames(&mut d);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].payload, &b"ok"[..]);
    }

    #[test]
    fn huge_claimed_length_in_garbled_header_is_not_trusted() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"x");
        wire[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"y");
        let mut d = Decoder::new(1024);
        d.push(&wire);
        let (ok, err) = frames(&mut d);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].payload, &b"y"[..]);
        assert!(err.contains(&DecodeError::BadHeader));
    }
}
