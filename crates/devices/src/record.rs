//! The record codec shared by every device that frames its channel's bytes (hid, printer, tty,
//! watchdog): a record is a type byte, for some devices a flags byte, a little-endian length and
//! that many bytes of payload. Each device declares its header [`Layout`], its record types and
//! their length limits ([`Message`]); [`Decoder`] does the rest, sans-io and bounded.
//!
//! Everything here handles bytes from an untrusted peer: a header is judged as soon as it is
//! complete (an unknown type, or a length outside its type's limits, is an error before any of
//! its payload is buffered), the decoder never holds more than [`Decoder::LIMIT`] bytes, and no
//! input makes it panic. After an error the stream cannot be resynchronised: the channel ends.

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How a device lays out its record header (every length is little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `u8 type`, `u16 length` (watchdog).
    Short,
    /// `u8 type`, `u8 flags`, `u16 length` (hid).
    ShortWithFlags,
    /// `u8 type`, `u32 length` (printer, tty).
    Long,
}

impl Layout {
    /// Bytes of the header.
    pub const fn header_len(self) -> usize {
        match self {
            Layout::Short => 3,
            Layout::ShortWithFlags => 4,
            Layout::Long => 5,
        }
    }

    /// Type, flags and length of the header at the start of `buf`, if it is all there.
    fn parse(self, buf: &[u8]) -> Option<(u8, u8, usize)> {
        let h = buf.get(..self.header_len())?;
        Some(match self {
            Layout::Short => (h[0], 0, usize::from(u16::from_le_bytes([h[1], h[2]]))),
            Layout::ShortWithFlags => (h[0], h[1], usize::from(u16::from_le_bytes([h[2], h[3]]))),
            // Saturates on 16-bit targets; the limit check then refuses it.
            Layout::Long => (
                h[0],
                0,
                usize::try_from(u32::from_le_bytes([h[1], h[2], h[3], h[4]])).unwrap_or(usize::MAX),
            ),
        })
    }
}

/// The length limits of one record type, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The type's name in errors.
    pub name: &'static str,
    /// Shortest payload.
    pub min: usize,
    /// Longest payload.
    pub max: usize,
}

impl Limit {
    /// A type whose payload has `min..=max` bytes.
    pub const fn range(name: &'static str, min: usize, max: usize) -> Limit {
        Limit { name, min, max }
    }

    /// A type whose payload has exactly `len` bytes.
    pub const fn exactly(name: &'static str, len: usize) -> Limit {
        Limit {
            name,
            min: len,
            max: len,
        }
    }

    /// Why a payload of `len` bytes is not one of this type, if it is not.
    pub fn check(&self, len: usize) -> Result<(), RecordError> {
        let kind = self.name;
        if len > self.max {
            Err(RecordError::TooLong {
                kind,
                len,
                max: self.max,
            })
        } else if len < self.min && self.min == self.max {
            Err(RecordError::WrongLength {
                kind,
                len,
                expected: self.min,
            })
        } else if len < self.min {
            Err(RecordError::TooShort {
                kind,
                len,
                min: self.min,
            })
        } else {
            Ok(())
        }
    }
}

/// Why bytes are not a valid record stream, or a record cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A type byte that this direction does not carry.
    #[error("unknown record type 0x{0:02x}")]
    UnknownType(u8),
    /// A length above the limit of its type.
    #[error("{kind} record of {len} bytes exceeds its limit of {max} bytes")]
    TooLong {
        /// Record type.
        kind: &'static str,
        /// Length found or wanted.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A length below the minimum of its type.
    #[error("{kind} record of {len} bytes is below its minimum of {min} bytes")]
    TooShort {
        /// Record type.
        kind: &'static str,
        /// Length found or wanted.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A fixed-size record of another size.
    #[error("{kind} record of {len} bytes, expected exactly {expected}")]
    WrongLength {
        /// Record type.
        kind: &'static str,
        /// Length found.
        len: usize,
        /// Its only valid length.
        expected: usize,
    },
    /// Flags this record type does not define.
    #[error("{kind} record with unknown flags 0x{flags:02x}")]
    BadFlags {
        /// Record type.
        kind: &'static str,
        /// The flags.
        flags: u8,
    },
    /// A payload whose fields are inconsistent.
    #[error("malformed {kind}: {what}")]
    Malformed {
        /// Record type (or the part of it that is wrong).
        kind: &'static str,
        /// What is wrong.
        what: &'static str,
    },
    /// More input than the decoder's bound (the caller did not drain it).
    #[error("decoder holds {buffered} bytes and was given {pushed} more; its bound is {limit}")]
    Overflow {
        /// Bytes held.
        buffered: usize,
        /// Bytes offered.
        pushed: usize,
        /// The bound.
        limit: usize,
    },
    /// The stream ended in the middle of a record.
    #[error("the stream ended inside a record ({0} bytes of it received)")]
    Truncated(usize),
}

/// The read buffer of the devices that move bulk data (terminal output, print jobs): 64 KiB
/// per read keeps syscalls few without holding much per channel.
pub const BULK_READ_CHUNK: usize = 64 * 1024;

/// The records of one direction of one device.
pub trait Message: Sized {
    /// The header layout.
    const LAYOUT: Layout;
    /// Largest payload of any record of this set.
    const MAX_PAYLOAD: usize;
    /// Largest payload of the records that carry the bulk of the bytes (data, not setup): what
    /// [`Decoder::read_from`] makes room for before it knows a record's length. Larger records
    /// (a command line with its environment) are moved once to a buffer that fits them.
    const BULK_PAYLOAD: usize = Self::MAX_PAYLOAD;
    /// Most bytes one read adds to the decoder ([`read_message`]'s reads, or a slice a driver
    /// hands to [`Decoder::push`]).
    const READ_CHUNK: usize;
    /// The limits of record type `kind`, or [`RecordError::UnknownType`] if this set does not
    /// have it.
    fn limit(kind: u8) -> Result<Limit, RecordError>;
    /// Parses the payload of a record of type `kind` (its length is within [`Message::limit`]).
    fn decode(kind: u8, flags: u8, payload: Bytes) -> Result<Self, RecordError>;
    /// Appends the whole record to `out` (with [`put`]); fails, appending nothing, if it breaks
    /// a limit.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError>;
    /// The encoded record.
    fn to_bytes(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Appends a record of type `kind` of set `M` to `out`, after checking its payload's length
/// against the type's limits (nothing is appended if it is out of them).
pub fn put<M: Message>(
    out: &mut Vec<u8>,
    kind: u8,
    flags: u8,
    payload: &[u8],
) -> Result<(), RecordError> {
    M::limit(kind)?.check(payload.len())?;
    let start = out.len();
    out.resize(start + M::LAYOUT.header_len(), 0);
    out.extend_from_slice(payload);
    seal::<M>(&mut out[start..], kind, flags).inspect_err(|_| out.truncate(start))
}

/// Writes the header of a record of type `kind` of set `M` at the start of `record`, whose
/// payload is already in place after the header's room. Checks the payload's length against
/// the type's limits as [`put`] does (`record` is left as it was if it is out of them, or
/// shorter than a header).
pub fn seal<M: Message>(record: &mut [u8], kind: u8, flags: u8) -> Result<(), RecordError> {
    let header_len = M::LAYOUT.header_len();
    let len = record
        .len()
        .checked_sub(header_len)
        .ok_or(RecordError::Truncated(record.len()))?;
    write_header::<M>(&mut record[..header_len], kind, flags, len)
}

/// Writes into `header` (the layout's header length) the header of a record of type `kind`
/// of set `M` whose payload of `len` bytes is kept elsewhere: output is sent from the buffer
/// it was read into, the header written before it, without being copied into a record.
/// Checks `len` against the type's limits as [`put`] does (`header` is left as it was if it
/// is out of them, or if `header` has not the layout's length).
pub fn write_header<M: Message>(
    header: &mut [u8],
    kind: u8,
    flags: u8,
    len: usize,
) -> Result<(), RecordError> {
    let limit = M::limit(kind)?;
    let header_len = M::LAYOUT.header_len();
    if header.len() != header_len {
        return Err(RecordError::Truncated(header.len()));
    }
    limit.check(len)?;
    // Only reached if a device declares a limit its layout cannot carry.
    let too_long = |_| RecordError::TooLong {
        kind: limit.name,
        len,
        max: limit.max,
    };
    match M::LAYOUT {
        Layout::Short | Layout::ShortWithFlags => {
            let len = u16::try_from(len).map_err(too_long)?;
            header[header_len - 2..].copy_from_slice(&len.to_le_bytes());
            if M::LAYOUT == Layout::ShortWithFlags {
                header[1] = flags;
            }
        }
        Layout::Long => {
            let len = u32::try_from(len).map_err(too_long)?;
            header[1..].copy_from_slice(&len.to_le_bytes());
        }
    }
    header[0] = kind;
    Ok(())
}

/// Splits a byte stream into the records of set `M`, sans-io: [`push`](Decoder::push) bytes as
/// they arrive, then call [`next_message`](Decoder::next_message) until it returns `Ok(None)`.
pub struct Decoder<M> {
    buf: BytesMut,
    _set: PhantomData<M>,
}

impl<M: Message> Default for Decoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> std::fmt::Debug for Decoder<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl<M: Message> Decoder<M> {
    /// Most bytes held at once: one partial record and one read.
    pub const LIMIT: usize = M::LAYOUT.header_len() + M::MAX_PAYLOAD + M::READ_CHUNK;

    /// An empty decoder.
    pub fn new() -> Decoder<M> {
        Decoder {
            buf: BytesMut::new(),
            _set: PhantomData,
        }
    }

    /// Appends received bytes. Fails if the decoder would hold more than [`Self::LIMIT`], which
    /// cannot happen when every push of at most [`Message::READ_CHUNK`] bytes is followed by
    /// draining [`next_message`](Self::next_message).
    pub fn push(&mut self, data: &[u8]) -> Result<(), RecordError> {
        if self.buf.len() + data.len() > Self::LIMIT {
            return Err(RecordError::Overflow {
                buffered: self.buf.len(),
                pushed: data.len(),
                limit: Self::LIMIT,
            });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete record; `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<M>, RecordError> {
        let Some((kind, flags, len)) = M::LAYOUT.parse(&self.buf) else {
            return Ok(None);
        };
        M::limit(kind)?.check(len)?;
        let header = M::LAYOUT.header_len();
        if self.buf.len() < header + len {
            return Ok(None);
        }
        self.buf.advance(header);
        let payload = self.buf.split_to(len).freeze();
        M::decode(kind, flags, payload).map(Some)
    }

    /// Reads once from `r` straight into the decoder (no bounce buffer): at most what the
    /// record being received still lacks once its header is known, else up to
    /// [`Message::READ_CHUNK`] into room for the largest record that can start in it. So a
    /// record is completed where its first byte landed, never moved to a larger buffer, and
    /// its payload is handed on by [`next_message`](Self::next_message) without a copy: for a
    /// bulk transfer, one user-space copy of each byte fewer than a read into a buffer and a
    /// [`push`](Self::push), and none of the partial records a reallocation would move.
    ///
    /// Called only when `next_message` has nothing complete. Returns the bytes read (0: the
    /// end of the stream). Cancel-safe; never holds more than [`Self::LIMIT`].
    async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        let (want, room) = match M::LAYOUT.parse(&self.buf) {
            // Room was made when the record's first byte was read (below); a no-op then.
            Some((_, _, len)) => {
                let want = (M::LAYOUT.header_len() + len).saturating_sub(self.buf.len());
                (want, want)
            }
            // Free when the buffer is empty or holds a partial header (the usual case:
            // records end where reads end); the partial header is what may move. Room for a
            // bulk record, not for LIMIT: while the last payload is still in use this is a
            // fresh allocation, and one of LIMIT (over 128 KiB for some sets) came from mmap,
            // so every record cost its pages' faults (a page's zeroing and a trap each, dear
            // in an emulated guest); one sized to the record comes from the heap, reused.
            None => {
                let room = (M::LAYOUT.header_len() + M::BULK_PAYLOAD).min(Self::LIMIT);
                (M::READ_CHUNK, room.saturating_sub(self.buf.len()))
            }
        };
        self.buf.reserve(room);
        (&mut *r).take(want as u64).read_buf(&mut self.buf).await
    }

    /// Bytes received but not yet returned as records.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Checks that the stream ended between records.
    pub fn finish(&self) -> Result<(), RecordError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(RecordError::Truncated(n)),
        }
    }
}

/// Why [`read_message`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The byte stream failed (a reset channel, a broken connection).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid record stream.
    #[error("{0}")]
    Record(#[from] RecordError),
}

/// Reads the next record of `r` through `dec` ([`Decoder::read_from`]); `Ok(None)` at a clean
/// end of the stream (between records). Cancel-safe: bytes read are kept in `dec`.
pub async fn read_message<R, M>(r: &mut R, dec: &mut Decoder<M>) -> Result<Option<M>, ReadError>
where
    R: AsyncRead + Unpin,
    M: Message,
{
    loop {
        if let Some(m) = dec.next_message()? {
            return Ok(Some(m));
        }
        if dec.read_from(r).await? == 0 {
            dec.finish()?;
            return Ok(None);
        }
    }
}

/// The payload of a fixed-size record type as an array (a wrong size is an error, never a
/// panic, even when [`Message::decode`] is called without the decoder's length check).
pub fn fixed<const N: usize>(kind: &'static str, payload: &[u8]) -> Result<[u8; N], RecordError> {
    payload.try_into().map_err(|_| RecordError::WrongLength {
        kind,
        len: payload.len(),
        expected: N,
    })
}
