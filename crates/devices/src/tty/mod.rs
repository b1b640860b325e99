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
pub mod guest;
pub mod host;
#[cfg(test)]
mod tests;
pub mod verbs;

use std::ffi::{OsStr, OsString};
use std::marker::PhantomData;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The device class (the channel class vstreamctl opens on the guest).
pub const CLASS: &str = "tty";

/// Bytes of a frame header: type and length.
pub const HEADER_LEN: usize = 5;

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

/// Largest slice the drivers hand to [`Decoder::push`] at once (their read buffer).
pub const READ_CHUNK: usize = 64 * 1024;

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

/// Why bytes are not a valid message stream, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A type byte that this direction does not carry.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// A length above the limit of its type.
    #[error("{kind} message of {len} bytes exceeds its limit of {max} bytes")]
    TooLong {
        /// Message type.
        kind: &'static str,
        /// Length found or wanted.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A fixed-size message of another size.
    #[error("{kind} message must be {expected} bytes, got {len}")]
    WrongLength {
        /// Message type.
        kind: &'static str,
        /// Length found.
        len: usize,
        /// Its only valid length.
        expected: usize,
    },
    /// A payload whose fields are inconsistent.
    #[error("malformed {kind} message: {what}")]
    Malformed {
        /// Message type.
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
    /// The stream ended in the middle of a message.
    #[error("the stream ended inside a message ({0} bytes of it received)")]
    Truncated(usize),
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

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
    /// An `Error` with `text` cut to [`MAX_ERROR`] bytes at a character boundary.
    pub fn error(text: &str) -> GuestMsg {
        let mut end = text.len().min(MAX_ERROR);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        GuestMsg::Error(text[..end].to_owned())
    }
}

/// One direction's message set.
pub trait Message: Sized {
    /// Largest payload of any message of this direction.
    const MAX_PAYLOAD: usize;
    /// The payload limit of message type `kind`, or why it is not one of this direction.
    fn max_payload(kind: u8) -> Result<usize, CodecError>;
    /// Parses the payload of a message of type `kind` (whose length was checked).
    fn decode(kind: u8, payload: Bytes) -> Result<Self, CodecError>;
    /// Appends the framed message to `out`; fails (appending nothing) if it breaks a limit.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError>;
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        kind::START => "Start",
        kind::STDIN => "Stdin",
        kind::STDIN_EOF => "StdinEof",
        kind::RESIZE => "Resize",
        kind::STDOUT => "Stdout",
        kind::STDERR => "Stderr",
        kind::EXIT => "Exit",
        kind::ERROR => "Error",
        _ => "unknown",
    }
}

fn put_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8], max: usize) -> Result<(), CodecError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|_| payload.len() <= max)
        .ok_or(CodecError::TooLong {
            kind: kind_name(kind),
            len: payload.len(),
            max,
        })?;
    out.push(kind);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

fn fixed(kind: u8, payload: &Bytes, expected: usize) -> Result<(), CodecError> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(CodecError::WrongLength {
            kind: kind_name(kind),
            len: payload.len(),
            expected,
        })
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
    fn malformed(what: &'static str) -> CodecError {
        CodecError::Malformed {
            kind: "Start",
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, CodecError> {
        if self.payload.remaining() < n {
            return Err(Fields::malformed(what));
        }
        Ok(self.payload.split_to(n))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(self.take(2, what)?.get_u16_le())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(self.take(4, what)?.get_u32_le())
    }

    /// A string of `len` bytes without NUL (it becomes a C string in the guest).
    fn c_string(&mut self, len: usize, what: &'static str) -> Result<OsString, CodecError> {
        let b = self.take(len, what)?;
        if b.contains(&0) {
            return Err(Fields::malformed("a string contains NUL"));
        }
        Ok(OsString::from_vec(b.to_vec()))
    }
}

fn check_c_string(s: &OsStr) -> Result<&[u8], CodecError> {
    let b = s.as_bytes();
    if b.contains(&0) {
        return Err(Fields::malformed("a string contains NUL"));
    }
    Ok(b)
}

fn encode_start(s: &Start, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let term = check_c_string(&s.term)?;
    if term.len() > MAX_TERM {
        return Err(CodecError::TooLong {
            kind: "TERM in Start",
            len: term.len(),
            max: MAX_TERM,
        });
    }
    let argc = u16::try_from(s.command.len()).map_err(|_| CodecError::TooLong {
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
            return Err(CodecError::TooLong {
                kind: "Start",
                len: p.len() + 4 + a.len(),
                max: MAX_START,
            });
        }
        p.extend_from_slice(&(a.len() as u32).to_le_bytes());
        p.extend_from_slice(a);
    }
    put_frame(out, kind::START, &p, MAX_START)
}

fn decode_start(payload: Bytes) -> Result<Start, CodecError> {
    let mut f = Fields { payload };
    let flags = f.u8("no flags")?;
    if flags & !FLAG_PTY != 0 {
        return Err(Fields::malformed("unknown flags"));
    }
    let rows = f.u16("no window size")?;
    let cols = f.u16("no window size")?;
    let term_len = usize::from(f.u16("no TERM length")?);
    if term_len > MAX_TERM {
        return Err(CodecError::TooLong {
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
    const MAX_PAYLOAD: usize = MAX_START;

    fn max_payload(kind: u8) -> Result<usize, CodecError> {
        match kind {
            kind::START => Ok(MAX_START),
            kind::STDIN => Ok(MAX_DATA),
            kind::STDIN_EOF => Ok(0),
            kind::RESIZE => Ok(4),
            other => Err(CodecError::UnknownType(other)),
        }
    }

    fn decode(kind: u8, payload: Bytes) -> Result<HostMsg, CodecError> {
        match kind {
            kind::START => Ok(HostMsg::Start(decode_start(payload)?)),
            kind::STDIN => Ok(HostMsg::Stdin(payload)),
            kind::STDIN_EOF => {
                fixed(kind, &payload, 0)?;
                Ok(HostMsg::StdinEof)
            }
            kind::RESIZE => {
                fixed(kind, &payload, 4)?;
                let mut p = payload;
                Ok(HostMsg::Resize(WindowSize {
                    rows: p.get_u16_le(),
                    cols: p.get_u16_le(),
                }))
            }
            other => Err(CodecError::UnknownType(other)),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            HostMsg::Start(s) => encode_start(s, out),
            HostMsg::Stdin(b) => put_frame(out, kind::STDIN, b, MAX_DATA),
            HostMsg::StdinEof => put_frame(out, kind::STDIN_EOF, &[], 0),
            HostMsg::Resize(size) => put_frame(out, kind::RESIZE, &size_bytes(*size), 4),
        }
    }
}

impl Message for GuestMsg {
    const MAX_PAYLOAD: usize = MAX_DATA;

    fn max_payload(kind: u8) -> Result<usize, CodecError> {
        match kind {
            kind::STDOUT | kind::STDERR => Ok(MAX_DATA),
            kind::EXIT => Ok(2),
            kind::ERROR => Ok(MAX_ERROR),
            other => Err(CodecError::UnknownType(other)),
        }
    }

    fn decode(kind: u8, payload: Bytes) -> Result<GuestMsg, CodecError> {
        match kind {
            kind::STDOUT => Ok(GuestMsg::Stdout(payload)),
            kind::STDERR => Ok(GuestMsg::Stderr(payload)),
            kind::EXIT => {
                fixed(kind, &payload, 2)?;
                let bad = |what| CodecError::Malformed { kind: "Exit", what };
                match (payload[0], payload[1]) {
                    (EXIT_CODE, code) => Ok(GuestMsg::Exit(Exit::Code(code))),
                    (EXIT_SIGNAL, sig) if (1..=MAX_SIGNAL).contains(&sig) => {
                        Ok(GuestMsg::Exit(Exit::Signal(sig)))
                    }
                    (EXIT_SIGNAL, _) => Err(bad("signal number out of range")),
                    _ => Err(bad("unknown exit kind")),
                }
            }
            kind::ERROR => String::from_utf8(payload.to_vec())
                .map(GuestMsg::Error)
                .map_err(|_| CodecError::Malformed {
                    kind: "Error",
                    what: "text is not UTF-8",
                }),
            other => Err(CodecError::UnknownType(other)),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            GuestMsg::Stdout(b) => put_frame(out, kind::STDOUT, b, MAX_DATA),
            GuestMsg::Stderr(b) => put_frame(out, kind::STDERR, b, MAX_DATA),
            GuestMsg::Exit(Exit::Code(c)) => put_frame(out, kind::EXIT, &[EXIT_CODE, *c], 2),
            GuestMsg::Exit(Exit::Signal(s)) => {
                if !(1..=MAX_SIGNAL).contains(s) {
                    return Err(CodecError::Malformed {
                        kind: "Exit",
                        what: "signal number out of range",
                    });
                }
                put_frame(out, kind::EXIT, &[EXIT_SIGNAL, *s], 2)
            }
            GuestMsg::Error(t) => put_frame(out, kind::ERROR, t.as_bytes(), MAX_ERROR),
        }
    }
}

/// Splits a byte stream into messages of one direction, sans-io: [`push`](Decoder::push) bytes
/// as they arrive, then call [`next_message`](Decoder::next_message) until it returns `Ok(None)`.
///
/// Memory is bounded: a header is checked as soon as its 5 bytes are in (an unknown type or a
/// length above the type's limit is an error before any payload is buffered), and `push`
/// refuses to hold more than one partial message plus [`READ_CHUNK`] bytes. After an error the
/// stream cannot be resynchronised; the session ends.
pub struct Decoder<M> {
    buf: BytesMut,
    _direction: PhantomData<M>,
}

impl<M: Message> Default for Decoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Message> Decoder<M> {
    /// Most bytes held at once.
    pub const LIMIT: usize = HEADER_LEN + M::MAX_PAYLOAD + READ_CHUNK;

    /// An empty decoder.
    pub fn new() -> Decoder<M> {
        Decoder {
            buf: BytesMut::new(),
            _direction: PhantomData,
        }
    }

    /// Appends received bytes. Fails if the decoder would hold more than [`Self::LIMIT`], which
    /// cannot happen when every push of at most [`READ_CHUNK`] bytes is followed by draining
    /// [`next_message`](Self::next_message).
    pub fn push(&mut self, data: &[u8]) -> Result<(), CodecError> {
        if self.buf.len() + data.len() > Self::LIMIT {
            return Err(CodecError::Overflow {
                buffered: self.buf.len(),
                pushed: data.len(),
                limit: Self::LIMIT,
            });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete message; `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<M>, CodecError> {
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let kind = header[0];
        // Lossless: usize is at least 32 bits on every target the agent runs on.
        let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let max = M::max_payload(kind)?;
        if len > max {
            return Err(CodecError::TooLong {
                kind: kind_name(kind),
                len,
                max,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        M::decode(kind, payload).map(Some)
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Checks that the stream ended between messages.
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(CodecError::Truncated(n)),
        }
    }
}

/// Why [`read_message`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The byte stream failed (a reset channel, a broken connection).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid message stream.
    #[error("{0}")]
    Codec(#[from] CodecError),
}

/// Reads the next message of `r` through `dec`, reading [`READ_CHUNK`] bytes at a time into
/// `buf`; `Ok(None)` at a clean end of the stream (between messages). Cancel-safe: bytes read
/// are kept in `dec`.
pub async fn read_message<R, M>(
    r: &mut R,
    dec: &mut Decoder<M>,
    buf: &mut [u8; READ_CHUNK],
) -> Result<Option<M>, ReadError>
where
    R: AsyncRead + Unpin,
    M: Message,
{
    loop {
        if let Some(m) = dec.next_message()? {
            return Ok(Some(m));
        }
        let n = r.read(&mut buf[..]).await?;
        if n == 0 {
            dec.finish()?;
            return Ok(None);
        }
        dec.push(&buf[..n])?;
    }
}
