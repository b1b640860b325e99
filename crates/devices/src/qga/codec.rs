//! QGA's byte-level framing, sans-io: where one JSON text ends in a stream of concatenated texts,
//! the 0xFF resynchronisation byte, and a bound on the size of one text; plus base64, the encoding
//! of every byte buffer in the protocol (`buf-b64`, `input-data`, `out-data`).
//!
//! QGA texts are not newline-delimited: a client may send `{"execute":"guest-ping"}{"execute":...}`
//! in one write, or one text over many writes, with any whitespace between. [`Framer`] finds the
//! end of each text with a small structural scanner (nesting depth, strings and escapes) in one
//! pass, so a large request that arrives in small pieces is scanned once, not re-parsed per piece;
//! the complete text is then parsed once with serde_json. The same framer reads replies on the
//! host side.

use std::collections::VecDeque;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

/// The resynchronisation byte: never valid in JSON (nor in UTF-8). A client sends it before
/// `guest-sync-delimited` to make the agent drop a partial request; the agent sends it before
/// the reply to `guest-sync-delimited` so the client can drop a partial reply.
pub const DELIMITER: u8 = 0xFF;

/// Texts up to this size are copied out of the framer's buffer, which it keeps
/// ([`Framer::finish`]); a request over it is handed over with the buffer.
const KEEP_BUFFER: usize = 4096;

/// What the framer found in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete top-level JSON text (an object, an array, a string or a bare token such as
    /// a number or garbage), not yet parsed.
    Text(Vec<u8>),
    /// A text grew beyond the limit; its bytes were dropped up to its end. `size` is how many
    /// bytes it had.
    TooLarge {
        /// Bytes the dropped text had.
        size: usize,
    },
    /// A [`DELIMITER`] byte; `dropped` bytes of an unfinished text before it were discarded.
    Delimiter {
        /// Bytes of a partial text dropped.
        dropped: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Between texts: whitespace is skipped.
    Between,
    /// Inside an object or array.
    Nested {
        depth: u32,
        in_string: bool,
        escape: bool,
    },
    /// Inside a top-level string.
    TopString { escape: bool },
    /// Inside a top-level bare token (number, keyword, garbage).
    Bare,
}

/// Splits a byte stream into JSON texts; see the module docs.
#[derive(Debug)]
pub struct Framer {
    limit: usize,
    scan: Scan,
    buf: Vec<u8>,
    /// Set while an oversized text is being skipped: its size so far.
    skipping: Option<usize>,
    out: VecDeque<Frame>,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Framer {
    /// A framer that drops texts longer than `limit` bytes (reporting [`Frame::TooLarge`]).
    pub fn new(limit: usize) -> Framer {
        Framer {
            limit,
            scan: Scan::Between,
            buf: Vec::new(),
            skipping: None,
            out: VecDeque::new(),
        }
    }

    /// Bytes of an unfinished text held (at most the limit).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    /// Feeds bytes; complete frames are then available from [`Framer::next_frame`].
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let b = data[0];
            if b == DELIMITER {
                let dropped = self.skipping.take().unwrap_or(0) + self.buf.len();
                self.buf.clear();
                self.scan = Scan::Between;
                self.out.push_back(Frame::Delimiter { dropped });
                data = &data[1..];
                continue;
            }
            match self.scan {
                Scan::Between => {
                    data = &data[1..];
                    if is_space(b) {
                        continue;
                    }
                    self.scan = match b {
                        b'{' | b'[' => Scan::Nested {
                            depth: 1,
                            in_string: false,
                            escape: false,
                        },
                        b'"' => Scan::TopString { escape: false },
                        _ => Scan::Bare,
                    };
                    self.keep(&[b]);
                }
                Scan::Nested {
                    in_string: true, ..
                }
                | Scan::TopString { .. } => {
                    // Fast path through string contents: nothing matters but quotes, escapes
                    // and the delimiter.
                    let (mut escape, top) = match self.scan {
                        Scan::Nested { escape, .. } => (escape, false),
                        Scan::TopString { escape } => (escape, true),
                        _ => unreachable!("matched above"),
                    };
                    let mut i = 0;
                    let mut closed = false;
                    while i < data.len() {
                        let c = data[i];
                        if escape {
                            escape = false;
                        } else if c == b'\\' {
                            escape = true;
                        } else if c == b'"' {
                            closed = true;
                            i += 1;
                            break;
                        } else if c == DELIMITER {
                            break;
                        } else {
                            // Skip a run of ordinary bytes at once.
                            let run = data[i..]
                                .iter()
                                .position(|&c| c == b'"' || c == b'\\' || c == DELIMITER)
                                .unwrap_or(data.len() - i);
                            i += run;
                            continue;
                        }
                        i += 1;
                    }
                    self.keep(&data[..i]);
                    data = &data[i..];
                    self.scan = match (self.scan, closed, top) {
                        (_, true, true) => {
                            self.finish();
                            Scan::Between
                        }
                        (Scan::Nested { depth, .. }, closed, false) => Scan::Nested {
                            depth,
                            in_string: !closed,
                            escape,
                        },
                        (_, false, true) => Scan::TopString { escape },
                        _ => unreachable!("string states only"),
                    };
                }
                Scan::Nested {
                    mut depth,
                    in_string: false,
                    ..
                } => {
                    // A run of structure at once, up to the end of the text, the start of a
                    // string or the delimiter: kept with one copy, not a call per byte.
                    let mut i = 0;
                    let mut in_string = false;
                    while i < data.len() {
                        match data[i] {
                            DELIMITER => break,
                            b'{' | b'[' => depth = depth.saturating_add(1),
                            // Never below 1 here: a text ends when its depth reaches 0.
                            b'}' | b']' => depth -= 1,
                            b'"' => in_string = true,
                            _ => {}
                        }
                        i += 1;
                        if depth == 0 || in_string {
                            break;
                        }
                    }
                    self.keep(&data[..i]);
                    data = &data[i..];
                    self.scan = if depth == 0 {
                        self.finish();
                        Scan::Between
                    } else {
                        Scan::Nested {
                            depth,
                            in_string,
                            escape: false,
                        }
                    };
                }
                Scan::Bare => {
                    if is_space(b) || matches!(b, b'{' | b'[' | b'"') {
                        // The token ended; this byte starts what follows.
                        self.finish();
                        self.scan = Scan::Between;
                    } else {
                        self.keep(&[b]);
                        data = &data[1..];
                    }
                }
            }
        }
    }

    /// Appends bytes of the current text, or counts them once it is over the limit.
    fn keep(&mut self, bytes: &[u8]) {
        if let Some(size) = &mut self.skipping {
            *size += bytes.len();
        } else if self.buf.len() + bytes.len() > self.limit {
            self.skipping = Some(self.buf.len() + bytes.len());
            self.buf = Vec::new(); // Give the memory back, not just the length.
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn finish(&mut self) {
        match self.skipping.take() {
            Some(size) => self.out.push_back(Frame::TooLarge { size }),
            // A short text is copied out and the buffer kept: the next text does not grow a
            // new one from nothing, a reallocation every few bytes. A long one is handed over
            // whole, and its memory with it.
            None if self.buf.len() <= KEEP_BUFFER => {
                let text = self.buf.clone();
                self.buf.clear();
                self.out.push_back(Frame::Text(text));
            }
            None => self
                .out
                .push_back(Frame::Text(std::mem::take(&mut self.buf))),
        }
    }
}

/// Standard base64 with padding on output; on input padding is optional, but a padded text
/// must come in whole quanta and no bits may be left over in the last character (as qemu-ga).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    B64.encode(data)
}

/// Appends the base64 of `data` (padded) to `out`. Pieces whose lengths are multiples of 3
/// concatenate into the base64 of the whole.
pub fn base64_encode_into(data: &[u8], out: &mut Vec<u8>) {
    /// Input per step: a multiple of 3, so only the last step pads.
    const STEP: usize = 3 * 1024;
    // Through a small buffer, appended with one copy each: growing `out` first (zero-filled)
    // wrote every byte twice, and in the agent's size-optimised build that fill was a byte
    // loop costing as many instructions as the encoding (callgrind, docs/PERFORMANCE.md).
    let mut buf = [0u8; STEP / 3 * 4];
    for step in data.chunks(STEP) {
        let written = B64.encode_slice(step, &mut buf).unwrap_or(0);
        out.extend_from_slice(&buf[..written]);
    }
}

/// Decodes standard base64; padding is optional, anything outside the alphabet (including
/// whitespace) or bits left over in the last character make it invalid.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    if text.ends_with('=') && !text.len().is_multiple_of(4) {
        return None; // Padding only completes a quantum.
    }
    B64.decode(text).ok()
}
