//! Device: tty. Interactive terminal sessions and remote commands on a guest, like `ssh` and
//! `docker exec`: `vstreamctl shell GUEST` and `vstreamctl exec GUEST -- CMD ARGS...`.
//!
//! One session is one channel of class `tty` (name `""`). The host half ([`host`], run by
//! vstreamctl through vstreamd's control socket) sends a [`Start`]; the guest half ([`guest`],
//! run by vstream-agent) starts the login shell or the command in its own session, on a
//! pseudo-terminal or on plain pipes, and the two exchange framed messages until the guest sends
//! the [`Exit`] status. The wire format is specified in docs/devices/tty.md; this module is its
//! reference implementation: the messages and a sans-io [`Decoder`] with bounded buffering. The
//! guest is untrusted, so decoding checks every length and value and never panics.
//!
//! Frame: `u8 type`, `u32 length` (little-endian), `length` bytes of payload.

pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
#[cfg(test)]
mod tests;
#[cfg(feature = "host")]
pub mod verbs;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use bytes::{Buf, Bytes};

use crate::record::{fixed, put, write_header, Layout, Limit};
pub use crate::record::{read_message, Decoder, Message, ReadError, RecordError};
pub use crate::term::WindowSize;

/// The device class (the channel class vstreamctl opens on the guest).
pub const CLASS: &str = "tty";

/// Bytes of a frame header: type and length.
pub const HEADER_LEN: usize = Layout::Long.header_len();

/// Largest payload of a `Stdin`, `Stdout` or `Stderr` message.
pub const MAX_DATA: usize = 64 * 1024;

/// Largest payload of a `Start` message (flags, size, TERM and the whole command line).
pub const MAX_START: usize = 256 * 1024;

/// Largest `TERM` value in a `Start` message.
pub const MAX_TERM: usize = 256;

/// Largest payload of an `Error` message.
pub const MAX_ERROR: usize = 4096;

/// Highest signal number an `Exit` may report (Linux `SIGRTMAX`).
pub const MAX_SIGNAL: u8 = 64;

/// Most bytes one read adds to the decoder.
pub use crate::record::BULK_READ_CHUNK as READ_CHUNK;

/// Message type bytes. Host-to-guest types have the high bit clear, guest-to-host types set.
mod kind {
    pub const START: u8 = 0x01;
    pub const STDIN: u8 = 0x02;
    pub const STDIN_EOF: u8 = 0x03;
    pub const RESIZE: u8 = 0x04;
    pub const STDOUT: u8 = 0x81;
    pub const STDERR: u8 = 0x82;
    pub const EXIT: u8 = 0x83;
    pub const ERROR: u8 = 0x84;
}

/// `Start` flag: run the command on a pseudo-terminal.
const FLAG_PTY: u8 = 0x01;

/// `Exit` kinds.
const EXIT_CODE: u8 = 0;
const EXIT_SIGNAL: u8 = 1;

/// How to start a session: the first message on every channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The command and its arguments; empty: the login shell (`$SHELL -l`, else `/bin/sh -l`).
    pub command: Vec<OsString>,
    /// `TERM` for the command; empty: `TERM` is removed from its environment.
    pub term: OsString,
    /// Run the command on a pseudo-terminal (else on three pipes).
    pub pty: bool,
    /// The terminal's initial size (used with `pty`).
    pub size: WindowSize,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(u8),
    /// A signal killed it (1 ..= [`MAX_SIGNAL`]).
    Signal(u8),
}

impl Exit {
    /// The status a shell would report: the code, or 128 + the signal number.
    pub fn shell_status(self) -> i32 {
        match self {
            Exit::Code(c) => i32::from(c),
            Exit::Signal(s) => 128 + i32::from(s),
        }
    }
}

/// Messages of the host half (vstreamctl) to the guest half (the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    /// Start the session (first message, exactly once).
    Start(Start),
    /// Bytes for the command's standard input (or the terminal's keyboard).
    Stdin(Bytes),
    /// No more `Stdin`: pipes: the command's stdin is closed; pty: nothing more is typed.
    StdinEof,
    /// The terminal was resized.
    Resize(WindowSize),
}

/// Messages of the guest half (the agent) to the host half (vstreamctl).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMsg {
    /// Output: the command's stdout, or everything the pseudo-terminal shows.
    Stdout(Bytes),
    /// The command's stderr (pipes only).
    Stderr(Bytes),
    /// The command ended (last message).
    Exit(Exit),
    /// Something went wrong (UTF-8 text for the user).
    Error(String),
}

impl GuestMsg {
    /// The header of a `Stdout` or (`stderr`) `Stderr` message of `len` bytes of output, as
    /// encoding one would write it: the output is sent after it from where it was read.
    pub fn output_header(len: usize, stderr: bool) -> Result<[u8; HEADER_LEN], RecordError> {
        let kind = if stderr { kind::STDERR } else { kind::STDOUT };
        let mut header = [0; HEADER_LEN];
        write_header::<GuestMsg>(&mut header, kind, 0, len)?;
        Ok(header)
    }

    /// An `Error` with `text` cut to [`MAX_ERROR`] bytes at a character boundary.
    pub fn error(text: &str) -> GuestMsg {
        let mut end = text.len().min(MAX_ERROR);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        GuestMsg::Error(text[..end].to_owned())
    }
}

fn size_bytes(size: WindowSize) -> [u8; 4] {
    let [r0, r1] = size.rows.to_le_bytes();
    let [c0, c1] = size.cols.to_le_bytes();
    [r0, r1, c0, c1]
}

/// Reads fields of a `Start` payload; every read is checked.
struct Fields {
    payload: Bytes,
}

impl Fields {
    fn malformed(what: &'static str) -> RecordError {
        RecordError::Malformed {
            kind: "Start",
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, RecordError> {
        if self.payload.remaining() < n {
            return Err(Fields::malformed(what));
        }
        Ok(self.payload.split_to(n))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, RecordError> {
        Ok(self.take(1, what)?.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, RecordError> {
        Ok(self.take(2, what)?.get_u16_le())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, RecordError> {
        Ok(self.take(4, what)?.get_u32_le())
    }

    /// A string of `len` bytes without NUL (it becomes a C string in the guest).
    fn c_string(&mut self, len: usize, what: &'static str) -> Result<OsString, RecordError> {
        let b = self.take(len, what)?;
        if b.contains(&0) {
            return Err(Fields::malformed("a string contains NUL"));
        }
        Ok(OsString::from_vec(b.to_vec()))
    }
}

fn check_c_string(s: &OsStr) -> Result<&[u8], RecordError> {
    let b = s.as_bytes();
    if b.contains(&0) {
        return Err(Fields::malformed("a string contains NUL"));
    }
    Ok(b)
}

fn encode_start(s: &Start, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let term = check_c_string(&s.term)?;
    if term.len() > MAX_TERM {
        return Err(RecordError::TooLong {
            kind: "TERM in Start",
            len: term.len(),
            max: MAX_TERM,
        });
    }
    let argc = u16::try_from(s.command.len()).map_err(|_| RecordError::TooLong {
        kind: "argument list of Start",
        len: s.command.len(),
        max: usize::from(u16::MAX),
    })?;
    let mut p = Vec::with_capacity(64);
    p.push(if s.pty { FLAG_PTY } else { 0 });
    p.extend_from_slice(&size_bytes(s.size));
    // Both fit: MAX_TERM < u16::MAX; each argument is checked against MAX_START below.
    p.extend_from_slice(&(term.len() as u16).to_le_bytes());
    p.extend_from_slice(term);
    p.extend_from_slice(&argc.to_le_bytes());
    for arg in &s.command {
        let a = check_c_string(arg)?;
        if p.len() + 4 + a.len() > MAX_START {
            return Err(RecordError::TooLong {
                kind: "Start",
                len: p.len() + 4 + a.len(),
                max: MAX_START,
            });
        }
        p.extend_from_slice(&(a.len() as u32).to_le_bytes());
        p.extend_from_slice(a);
    }
    put::<HostMsg>(out, kind::START, 0, &p)
}

fn decode_start(payload: Bytes) -> Result<Start, RecordError> {
    let mut f = Fields { payload };
    let flags = f.u8("no flags")?;
    if flags & !FLAG_PTY != 0 {
        return Err(Fields::malformed("unknown flags"));
    }
    let rows = f.u16("no window size")?;
    let cols = f.u16("no window size")?;
    let term_len = usize::from(f.u16("no TERM length")?);
    if term_len > MAX_TERM {
        return Err(RecordError::TooLong {
            kind: "TERM in Start",
            len: term_len,
            max: MAX_TERM,
        });
    }
    let term = f.c_string(term_len, "TERM is cut short")?;
    let argc = usize::from(f.u16("no argument count")?);
    // Each argument takes at least its 4-byte length: no more than that can follow.
    let mut command = Vec::with_capacity(argc.min(f.payload.remaining() / 4));
    for _ in 0..argc {
        let len = f.u32("an argument length is cut short")? as usize;
        command.push(f.c_string(len, "an argument is cut short")?);
    }
    if f.payload.has_remaining() {
        return Err(Fields::malformed("bytes after the last argument"));
    }
    Ok(Start {
        command,
        term,
        pty: flags & FLAG_PTY != 0,
        size: WindowSize { rows, cols },
    })
}

impl Message for HostMsg {
    const LAYOUT: Layout = Layout::Long;
    const MAX_PAYLOAD: usize = MAX_START;
    const BULK_PAYLOAD: usize = MAX_DATA;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(kind: u8) -> Result<Limit, RecordError> {
        match kind {
            kind::START => Ok(Limit::range("Start", 0, MAX_START)),
            kind::STDIN => Ok(Limit::range("Stdin", 0, MAX_DATA)),
            kind::STDIN_EOF => Ok(Limit::exactly("StdinEof", 0)),
            kind::RESIZE => Ok(Limit::exactly("Resize", 4)),
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn decode(kind: u8, _flags: u8, payload: Bytes) -> Result<HostMsg, RecordError> {
        match kind {
            kind::START => Ok(HostMsg::Start(decode_start(payload)?)),
            kind::STDIN => Ok(HostMsg::Stdin(payload)),
            kind::STDIN_EOF => {
                fixed::<0>("StdinEof", &payload)?;
                Ok(HostMsg::StdinEof)
            }
            kind::RESIZE => {
                let [r0, r1, c0, c1] = fixed("Resize", &payload)?;
                Ok(HostMsg::Resize(WindowSize {
                    rows: u16::from_le_bytes([r0, r1]),
                    cols: u16::from_le_bytes([c0, c1]),
                }))
            }
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        match self {
            HostMsg::Start(s) => encode_start(s, out),
            HostMsg::Stdin(b) => put::<HostMsg>(out, kind::STDIN, 0, b),
            HostMsg::StdinEof => put::<HostMsg>(out, kind::STDIN_EOF, 0, &[]),
            HostMsg::Resize(size) => put::<HostMsg>(out, kind::RESIZE, 0, &size_bytes(*size)),
        }
    }
}

impl Message for GuestMsg {
    const LAYOUT: Layout = Layout::Long;
    const MAX_PAYLOAD: usize = MAX_DATA;
    const READ_CHUNK: usize = READ_CHUNK;

    fn limit(kind: u8) -> Result<Limit, RecordError> {
        match kind {
            kind::STDOUT => Ok(Limit::range("Stdout", 0, MAX_DATA)),
            kind::STDERR => Ok(Limit::range("Stderr", 0, MAX_DATA)),
            kind::EXIT => Ok(Limit::exactly("Exit", 2)),
            kind::ERROR => Ok(Limit::range("Error", 0, MAX_ERROR)),
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn decode(kind: u8, _flags: u8, payload: Bytes) -> Result<GuestMsg, RecordError> {
        match kind {
            kind::STDOUT => Ok(GuestMsg::Stdout(payload)),
            kind::STDERR => Ok(GuestMsg::Stderr(payload)),
            kind::EXIT => {
                let bad = |what| RecordError::Malformed { kind: "Exit", what };
                match fixed("Exit", &payload)? {
                    [EXIT_CODE, code] => Ok(GuestMsg::Exit(Exit::Code(code))),
                    [EXIT_SIGNAL, sig] if (1..=MAX_SIGNAL).contains(&sig) => {
                        Ok(GuestMsg::Exit(Exit::Signal(sig)))
                    }
                    [EXIT_SIGNAL, _] => Err(bad("signal number out of range")),
                    _ => Err(bad("unknown exit kind")),
                }
            }
            kind::ERROR => String::from_utf8(payload.to_vec())
                .map(GuestMsg::Error)
                .map_err(|_| RecordError::Malformed {
                    kind: "Error",
                    what: "text is not UTF-8",
                }),
            other => Err(RecordError::UnknownType(other)),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let put = |out: &mut Vec<u8>, kind, payload: &[u8]| put::<GuestMsg>(out, kind, 0, payload);
        match self {
            GuestMsg::Stdout(b) => put(out, kind::STDOUT, b),
            GuestMsg::Stderr(b) => put(out, kind::STDERR, b),
            GuestMsg::Exit(Exit::Code(c)) => put(out, kind::EXIT, &[EXIT_CODE, *c]),
            GuestMsg::Exit(Exit::Signal(s)) => {
                if !(1..=MAX_SIGNAL).contains(s) {
                    return Err(RecordError::Malformed {
                        kind: "Exit",
                        what: "signal number out of range",
                    });
                }
                put(out, kind::EXIT, &[EXIT_SIGNAL, *s])
            }
            GuestMsg::Error(t) => put(out, kind::ERROR, t.as_bytes()),
        }
    }
}
