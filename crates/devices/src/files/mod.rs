//! Device: files. A binary file channel for `vstreamctl cp`: files, symlinks and directory
//! trees streamed between host and guest at the speed of the channel, with holes, modes, owners
//! and timestamps, written atomically and checked end to end.
//!
//! The host (vstreamctl) opens a channel of class `files` (name `cp`) and sends one `Request`.
//! For a get, the guest answers with the tree: `Entry`, then for a regular file its `Data`
//! records and `FileEnd`, for each file, then `Done`. For a put, the guest answers `Ready`
//! (where to resume), the host sends the tree the same way and the guest answers `Ok`. Either
//! side may send `Error` instead and end the channel. The receiver writes every file under a
//! temporary name in its directory, makes it durable (a tree's files in batches) and renames it; it checks every name against the
//! tree it is building, so that a sender cannot place anything outside the destination
//! ([`tree::Sink`]). The wire format is specified in docs/devices/files.md; this module is its
//! reference implementation, framed by the shared record codec ([`crate::record`]).
//!
//! Record: `u8 type`, `u32 length` (little-endian), `length` bytes of payload.

pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(test)]
mod tests;
pub mod transfer;
pub mod tree;
#[cfg(feature = "host")]
pub mod verbs;

use bytes::Bytes;

use crate::record::{fixed, put, Layout, Limit};
pub use crate::record::{Message, RecordError};

/// The device class.
pub const CLASS: &str = "files";

/// The channel name vstreamctl opens.
pub const CHANNEL_NAME: &str = "cp";

/// Largest `Data` payload after its offset: large enough that the per-record cost vanishes,
/// small enough that the memory each end holds stays small.
pub const MAX_DATA: usize = 128 * 1024;

/// Longest path, name or symlink target (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Longest `Error` message.
pub const MAX_MESSAGE: usize = 1024;

/// Bytes of an `Entry` before its name.
const ENTRY_FIXED: usize = 1 + 4 * 3 + (8 + 4) * 2 + 8 + 2;

mod kind {
    pub const REQUEST: u8 = 0x01;
    pub const READY: u8 = 0x02;
    pub const ENTRY: u8 = 0x03;
    pub const DATA: u8 = 0x04;
    pub const FILE_END: u8 = 0x05;
    pub const DONE: u8 = 0x06;
    pub const ERROR: u8 = 0x07;
    pub const OK: u8 = 0x08;
}

/// Request flags.
pub mod flags {
    /// Copy a directory and everything under it.
    pub const RECURSIVE: u8 = 1 << 0;
    /// Keep mode (with setuid/setgid/sticky), owner and timestamps.
    pub const PRESERVE: u8 = 1 << 1;
    /// The source can start mid-file: the receiver may keep a partial file and say where it
    /// ends (`Ready`).
    pub const RESUME: u8 = 1 << 2;
    /// Every flag defined.
    pub const ALL: u8 = RECURSIVE | PRESERVE | RESUME;
}

/// Which way a request moves the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Guest to host.
    Get,
    /// Host to guest.
    Put,
}

/// The host's request, first on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Get or put.
    pub op: Op,
    /// [`flags`].
    pub flags: u8,
    /// Get: the byte where the guest starts sending the (single) file's data; the checksum
    /// still covers the whole file.
    pub offset: u64,
    /// The guest's path: the source of a get, the destination of a put.
    pub path: Vec<u8>,
    /// Put: the source's own name, used when `path` is a directory (empty for a get).
    pub name: Vec<u8>,
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file: `Data` records and a `FileEnd` follow.
    File,
    /// A directory: its entries follow (names under it).
    Dir,
    /// A symbolic link, copied as a link.
    Symlink,
}

/// A timestamp: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    /// Seconds (negative before 1970).
    pub secs: i64,
    /// Nanoseconds, below 1e9.
    pub nanos: u32,
}

/// One file, directory or symlink of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Its path under the copied root, components joined by `/`; empty for the root itself.
    pub name: Vec<u8>,
    /// Permission bits, with setuid, setgid and sticky (at most 0o7777).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification.
    pub mtime: Time,
    /// Last access.
    pub atime: Time,
    /// A file's size when it was listed (progress only: `FileEnd` has the real one).
    pub size: u64,
    /// A symlink's target (empty otherwise).
    pub target: Vec<u8>,
}

/// Why a transfer failed, as `Error` carries it; each maps to an exit status of `vstreamctl
/// cp` ([`ErrorCode::exit_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Anything else.
    Other,
    /// A path does not exist.
    NotFound,
    /// Permission denied.
    Permission,
    /// The data did not match its checksum, or the records made no sense.
    Corrupt,
}

impl ErrorCode {
    fn from_u8(b: u8) -> ErrorCode {
        match b {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::Permission,
            3 => ErrorCode::Corrupt,
            // An unknown code from a newer peer is still an error.
            _ => ErrorCode::Other,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            ErrorCode::Other => 0,
            ErrorCode::NotFound => 1,
            ErrorCode::Permission => 2,
            ErrorCode::Corrupt => 3,
        }
    }

    /// The code of a local I/O error.
    pub fn of(e: &std::io::Error) -> ErrorCode {
        match e.kind() {
            std::io::ErrorKind::NotFound => ErrorCode::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorCode::Permission,
            _ => ErrorCode::Other,
        }
    }

    /// `vstreamctl cp`'s exit status for it (docs/devices/files.md).
    pub fn exit_status(self) -> i32 {
        match self {
            ErrorCode::Other => 1,
            ErrorCode::NotFound => 2,
            ErrorCode::Permission => 3,
            ErrorCode::Corrupt => 4,
        }
    }
}

/// A record on a `files` channel (both directions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Host to guest, first.
    Request(Request),
    /// Guest to host, answering a put: where the file's data should start.
    Ready(u64),
    /// The next file, directory or symlink.
    Entry(Entry),
    /// Bytes of the current file at `offset`; a gap before it is a hole.
    Data {
        /// Where they go.
        offset: u64,
        /// The bytes (1 ..= [`MAX_DATA`]).
        bytes: Bytes,
    },
    /// The current file is complete: its size (a gap up to it is a hole) and the CRC-32C of
    /// all its bytes, holes read as zeros.
    FileEnd {
        /// Its size.
        size: u64,
        /// Its checksum.
        crc: u32,
    },
    /// The tree is complete: it had this many entries.
    Done(u64),
    /// The transfer failed; the channel ends.
    Error(ErrorCode, String),
    /// Guest to host, after a put's `Done`: everything is in place.
    Ok,
}

/// Why `name` is not a path under the copied root: it must be empty (the root) or normal
/// components joined by single slashes, without NUL.
pub fn check_name(name: &[u8]) -> Result<(), RecordError> {
    let bad = |what| {
        Err(RecordError::Malformed {
            kind: "entry name",
            what,
        })
    };
    if name.len() > MAX_PATH {
        return bad("longer than PATH_MAX");
    }
    if name.is_empty() {
        return Ok(());
    }
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" => return bad("an empty component (leading, trailing or double slash)"),
            b"." | b".." => return bad("a . or .. component"),
            c if c.contains(&0) => return bad("a NUL byte"),
            _ => {}
        }
    }
    Ok(())
}

/// Why `path` cannot name a file: empty, too long, or with a NUL.
fn check_path(kind: &'static str, path: &[u8]) -> Result<(), RecordError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains(&0) {
        return Err(RecordError::Malformed {
            kind,
            what: "empty, longer than PATH_MAX, or with a NUL byte",
        });
    }
    Ok(())
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(p[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().unwrap_or_default())
}

fn time_at(kind: &'static str, p: &[u8], at: usize) -> Result<Time, RecordError> {
    let t = Time {
        secs: u64_at(p, at) as i64,
        nanos: u32_at(p, at + 8),
    };
    if t.nanos >= 1_000_000_000 {
        return Err(RecordError::Malformed {
            kind,
            what: "nanoseconds above 999999999",
        });
    }
    Ok(t)
}

fn decode_request(p: &[u8]) -> Result<Request, RecordError> {
    let malformed = |what| RecordError::Malformed {
        kind: "request",
        what,
    };
    let op = match p[0] {
        0 => Op::Get,
        1 => Op::Put,
        _ => return Err(malformed("unknown operation")),
    };
    if p[1] & !flags::ALL != 0 {
        return Err(RecordError::BadFlags {
            kind: "request",
            flags: p[1],
        });
    }
    let rest = &p[10..];
    let (path, name) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    check_path("request path", path)?;
    if !name.is_empty() && (name.contains(&b'/') || check_name(name).is_err()) {
        return Err(malformed("the source name is not one normal component"));
    }
    Ok(Request {
        op,
        flags: p[1],
        offset: u64_at(p, 2),
        path: path.to_vec(),
        name: name.to_vec(),
    })
}

fn decode_entry(p: &[u8]) -> Result<Entry, RecordError> {
    let malformed = |what| RecordError::Malformed {
        kind: "entry",
        what,
    };
    let kind = match p[0] {
        0 => Kind::File,
        1 => Kind::Dir,
        2 => Kind::Symlink,
        _ => return Err(malformed("unknown kind")),
    };
    let mode = u32_at(p, 1);
    if mode > 0o7777 {
        return Err(malformed("mode has bits above 0o7777"));
    }
    let name_len = usize::from(u16::from_le_bytes([p[ENTRY_FIXED - 2], p[ENTRY_FIXED - 1]]));
    let name = p
        .get(ENTRY_FIXED..ENTRY_FIXED + name_len)
        .ok_or(malformed("name longer than the record"))?;
    check_name(name)?;
    let target = &p[ENTRY_FIXED + name_len..];
    match kind {
        Kind::Symlink => check_path("symlink target", target)?,
        _ if !target.is_empty() => return Err(malformed("a target on a non-symlink")),
        _ => {}
    }
    Ok(Entry {
        kind,
        name: name.to_vec(),
        mode,
        uid: u32_at(p, 5),
        gid: u32_at(p, 9),
        mtime: time_at("entry mtime", p, 13)?,
        atime: time_at("entry atime", p, 25)?,
        size: u64_at(p, 37),
        target: target.to_vec(),
    })
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut p = Vec::with_capacity(ENTRY_FIXED + e.name.len() + e.target.len());
    p.push(match e.kind {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
    });
    for v in [e.mode, e.uid, e.gid] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    for t in [e.mtime, e.atime] {
        p.extend_from_slice(&t.secs.to_le_bytes());
        p.extend_from_slice(&t.nanos.to_le_bytes());
    }
    p.extend_from_slice(&e.size.to_le_bytes());
    // A name longer than u16 is refused by the limit check on the whole record below.
    p.extend_from_slice(&(e.name.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    p.extend_from_slice(&e.name);
    p.extend_from_slice(&e.target);
    p
}

impl Message for Record {
    const LAYOUT: Layout = Layout::Long;
    const MAX_PAYLOAD: usize = 8 + MAX_DATA;
    const READ_CHUNK: usize = crate::record::BULK_READ_CHUNK;

    fn limit(k: u8) -> Result<Limit, RecordError> {
        Ok(match k {
            kind::REQUEST => Limit::range("request", 10 + 1, 10 + 2 * MAX_PATH + 1),
            kind::READY => Limit::exactly("ready", 8),
            kind::ENTRY => Limit::range("entry", ENTRY_FIXED, ENTRY_FIXED + 2 * MAX_PATH),
            kind::DATA => Limit::range("data", 8 + 1, 8 + MAX_DATA),
            kind::FILE_END => Limit::exactly("file end", 12),
            kind::DONE => Limit::exactly("done", 8),
            kind::ERROR => Limit::range("error", 1, 1 + MAX_MESSAGE),
            kind::OK => Limit::exactly("ok", 0),
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn decode(k: u8, _flags: u8, p: Bytes) -> Result<Record, RecordError> {
        // Called with lengths outside the limits too (the fuzz target does): check first.
        Self::limit(k)?.check(p.len())?;
        Ok(match k {
            kind::REQUEST => Record::Request(decode_request(&p)?),
            kind::READY => Record::Ready(u64::from_le_bytes(fixed("ready", &p)?)),
            kind::ENTRY => Record::Entry(decode_entry(&p)?),
            kind::DATA => Record::Data {
                offset: u64_at(&p, 0),
                bytes: p.slice(8..),
            },
            kind::FILE_END => {
                let p: [u8; 12] = fixed("file end", &p)?;
                Record::FileEnd {
                    size: u64_at(&p, 0),
                    crc: u32_at(&p, 8),
                }
            }
            kind::DONE => Record::Done(u64::from_le_bytes(fixed("done", &p)?)),
            kind::ERROR => Record::Error(
                ErrorCode::from_u8(p[0]),
                String::from_utf8_lossy(&p[1..]).into_owned(),
            ),
            kind::OK => Record::Ok,
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let (k, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Record::Request(r) => {
                let mut p = vec![
                    match r.op {
                        Op::Get => 0,
                        Op::Put => 1,
                    },
                    r.flags,
                ];
                p.extend_from_slice(&r.offset.to_le_bytes());
                p.extend_from_slice(&r.path);
                if !r.name.is_empty() {
                    p.push(0);
                    p.extend_from_slice(&r.name);
                }
                (kind::REQUEST, p.into())
            }
            Record::Ready(n) => (kind::READY, n.to_le_bytes().to_vec().into()),
            Record::Entry(e) => {
                if e.name.len() > MAX_PATH || e.target.len() > MAX_PATH {
                    return Err(RecordError::TooLong {
                        kind: "entry name or target",
                        len: e.name.len().max(e.target.len()),
                        max: MAX_PATH,
                    });
                }
                (kind::ENTRY, encode_entry(e).into())
            }
            Record::Data { offset, bytes } => {
                // Straight into `out`: this is the bulk path, one copy only.
                let limit = Self::limit(kind::DATA)?;
                limit.check(8 + bytes.len())?;
                out.reserve(5 + 8 + bytes.len());
                out.push(kind::DATA);
                out.extend_from_slice(&((8 + bytes.len()) as u32).to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(bytes);
                return Ok(());
            }
            Record::FileEnd { size, crc } => {
                let mut p = size.to_le_bytes().to_vec();
                p.extend_from_slice(&crc.to_le_bytes());
                (kind::FILE_END, p.into())
            }
            Record::Done(n) => (kind::DONE, n.to_le_bytes().to_vec().into()),
            Record::Error(code, message) => {
                let mut p = vec![code.to_u8()];
                // Cut at a character boundary so that the peer reads what we meant.
                let mut end = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&message.as_bytes()[..end]);
                (kind::ERROR, p.into())
            }
            Record::Ok => (kind::OK, Vec::new().into()),
        };
        put::<Record>(out, k, 0, &payload)
    }
}

/// The decoder of a `files` channel (both directions).
pub type Decoder = crate::record::Decoder<Record>;
