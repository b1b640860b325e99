//! Device: printer. A raw AppSocket/JetDirect printer in the guest whose jobs land in a spool
//! directory on the host.
//!
//! The guest half ([`guest`], run by vstream-agent) listens on TCP `127.0.0.1:9100` and on a
//! Unix socket (configurable); one connection is one job, the job is the bytes. For each job it
//! opens a channel of class `printer` (name `job`) to vstreamd and sends framed records: `Job`
//! (metadata), `Data`..., `End` (the total length). The host half ([`host`], run by vstreamd)
//! writes the job into the guest's spool directory under a name it makes itself, atomically
//! (temporary file, fsync, rename), detects its type ([`JobType`]), enforces the spool quota, and
//! answers `Done`. A job whose channel ends without a matching `End` is kept as
//! `job-NNNNNN.EXT.partial` and reported; it is never passed off as complete.
//!
//! The wire format is specified in docs/devices/printer.md; this module is its reference
//! implementation: the records, framed by the shared record codec ([`crate::record`]): a
//! sans-io [`Decoder`] bounded by one partial record plus one read.
//!
//! Record: `u8 type`, `u32 length` (little-endian), `length` bytes of payload.

pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
#[cfg(feature = "host")]
mod spool;
#[cfg(test)]
mod tests;
#[cfg(feature = "host")]
pub mod verbs;

use bytes::Bytes;
use serde::Serialize;

use crate::record::{fixed, put, Layout, Limit};
pub use crate::record::{Message, RecordError};

/// The device class.
pub const CLASS: &str = "printer";

/// The channel name the agent opens.
pub const CHANNEL_NAME: &str = "job";

/// Version carried in `Job`.
pub const VERSION: u32 = 1;

/// Bytes of a record header.
pub const HEADER_LEN: usize = Layout::Long.header_len();

/// Largest `Data` payload.
pub const MAX_DATA: usize = 64 * 1024;

/// Largest slice the drivers read at once.
pub use crate::record::BULK_READ_CHUNK as READ_CHUNK;

/// Largest `Job` or `Done` payload.
pub const MAX_META: usize = 4096;

/// Longest metadata value kept by the host (characters), after sanitising.
pub const MAX_VALUE: usize = 256;

/// Bytes of the job's start kept for type detection.
pub const HEAD_LEN: usize = 4096;

mod kind {
    pub const JOB: u8 = 0x01;
    pub const DATA: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const DONE: u8 = 0x81;
}

/// A record on a `printer` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Guest to host, first: metadata as `key=value` lines (UTF-8).
    Job(Vec<(String, String)>),
    /// Guest to host: the next bytes of the job (1 ..= [`MAX_DATA`]).
    Data(Bytes),
    /// Guest to host, last: the job is complete and has this many bytes.
    End(u64),
    /// Host to guest, after `End`: the job is spooled; `key=value` lines (`id`, `file`, `type`,
    /// `size`).
    Done(Vec<(String, String)>),
}

fn meta_bytes(meta: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in meta {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

fn parse_meta(kind: &'static str, p: &[u8]) -> Result<Vec<(String, String)>, RecordError> {
    let bad = RecordError::Malformed {
        kind,
        what: "not UTF-8 key=value lines",
    };
    let text = std::str::from_utf8(p).map_err(|_| bad.clone())?;
    // Split on '\n' only (not `lines()`, which also eats a '\r'), so that decoding and
    // encoding are inverse.
    text.split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| bad.clone())
        })
        .collect()
}

impl Record {
    /// The encoded record (also without [`Message`] in scope, for callers outside the crate).
    pub fn to_bytes(&self) -> Result<Vec<u8>, RecordError> {
        Message::to_bytes(self)
    }

    /// A metadata value by key.
    pub fn meta<'a>(meta: &'a [(String, String)], key: &str) -> Option<&'a str> {
        meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl Message for Record {
    const LAYOUT: Layout = Layout::Long;
    const MAX_PAYLOAD: usize = MAX_DATA;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(k: u8) -> Result<Limit, RecordError> {
        Ok(match k {
            kind::JOB => Limit::range("job", 0, MAX_META),
            kind::DATA => Limit::range("data", 1, MAX_DATA),
            kind::END => Limit::exactly("end", 8),
            kind::DONE => Limit::range("done", 0, MAX_META),
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn decode(k: u8, _flags: u8, p: Bytes) -> Result<Record, RecordError> {
        Ok(match k {
            kind::JOB => Record::Job(parse_meta("job metadata", &p)?),
            kind::DATA => Record::Data(p),
            kind::END => Record::End(u64::from_le_bytes(fixed("end", &p)?)),
            kind::DONE => Record::Done(parse_meta("done metadata", &p)?),
            other => return Err(RecordError::UnknownType(other)),
        })
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let (k, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Record::Job(m) => (kind::JOB, meta_bytes(m).into()),
            Record::Data(d) => (kind::DATA, d.as_ref().into()),
            Record::End(n) => (kind::END, n.to_le_bytes().to_vec().into()),
            Record::Done(m) => (kind::DONE, meta_bytes(m).into()),
        };
        put::<Record>(out, k, 0, &payload)
    }
}

/// The decoder of a `printer` channel (both directions).
pub type Decoder = crate::record::Decoder<Record>;

/// What a job is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// `%PDF-` (within the first 1024 bytes, as PDF readers accept), or PJL entering PDF.
    Pdf,
    /// `%!` (optionally after a ^D), or PJL entering PostScript.
    Postscript,
    /// PCL (`ESC E`) or PJL (`ESC %-12345X`) with any other language.
    Pcl,
    /// UTF-8 text without NUL and with few control characters.
    Text,
    /// Anything else.
    Unknown,
}

impl JobType {
    /// The spool file extension.
    pub fn extension(self) -> &'static str {
        match self {
            JobType::Pdf => "pdf",
            JobType::Postscript => "ps",
            JobType::Pcl => "pcl",
            JobType::Text => "txt",
            JobType::Unknown => "bin",
        }
    }

    /// The name shown in listings and passed to hooks.
    pub fn name(self) -> &'static str {
        match self {
            JobType::Pdf => "pdf",
            JobType::Postscript => "postscript",
            JobType::Pcl => "pcl",
            JobType::Text => "text",
            JobType::Unknown => "unknown",
        }
    }

    /// The type of an extension ([`JobType::extension`]).
    pub fn from_extension(ext: &str) -> Option<JobType> {
        [
            JobType::Pdf,
            JobType::Postscript,
            JobType::Pcl,
            JobType::Text,
            JobType::Unknown,
        ]
        .into_iter()
        .find(|t| t.extension() == ext)
    }

    /// Detects the type from the first bytes of a job (up to [`HEAD_LEN`]).
    pub fn detect(head: &[u8]) -> JobType {
        let head = &head[..head.len().min(HEAD_LEN)];
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
        if head.starts_with(b"\x1b%-12345X") {
            let upper: Vec<u8> = head.iter().map(u8::to_ascii_uppercase).collect();
            if let Some(i) = find(&upper, b"@PJL ENTER LANGUAGE") {
                let rest = &upper[i + 19..];
                let rest = rest
                    .iter()
                    .position(|b| *b == b'=')
                    .map(|j| &rest[j + 1..])
                    .unwrap_or(rest);
                let lang: Vec<u8> = rest
                    .iter()
                    .copied()
                    .skip_while(|b| *b == b' ')
                    .take_while(u8::is_ascii_alphanumeric)
                    .collect();
                return match lang.as_slice() {
                    b"PDF" => JobType::Pdf,
                    b"POSTSCRIPT" => JobType::Postscript,
                    _ => JobType::Pcl,
                };
            }
            return JobType::Pcl;
        }
        if head.starts_with(b"\x1bE") {
            return JobType::Pcl;
        }
        let ps = head.strip_prefix(b"\x04").unwrap_or(head);
        if ps.starts_with(b"%!") {
            return JobType::Postscript;
        }
        if find(&head[..head.len().min(1024)], b"%PDF-").is_some() {
            return JobType::Pdf;
        }
        if head.is_empty() {
            return JobType::Unknown;
        }
        let text = match std::str::from_utf8(head) {
            Ok(t) => t,
            // A multi-byte character cut at the end of the head is still text.
            Err(e) if e.error_len().is_none() => {
                std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(_) => return JobType::Unknown,
        };
        let controls = text
            .chars()
            .filter(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\x0c' | '\x1b'))
            .count();
        if text.contains('\0') || controls * 100 > text.chars().count().max(1) {
            JobType::Unknown
        } else {
            JobType::Text
        }
    }
}

/// Makes a guest-supplied metadata value safe to show and log: control and format characters
/// (including bidi overrides) become `?`, and it is cut to [`MAX_VALUE`] characters. The host
/// never builds a path from metadata.
pub fn sanitize(value: &str) -> String {
    value
        .chars()
        .take(MAX_VALUE)
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi || c == '\u{feff}' {
                '?'
            } else {
                c
            }
        })
        .collect()
}
