//! HDLC-like framing (RFC 1662): flag-delimited frames with byte stuffing and an FCS-16, as
//! pppd sends them over a serial line or a pty.

/// Frame overhead beyond the information field: address, control, protocol, FCS.
pub(super) const FRAME_OVERHEAD: usize = 6;

/// The FCS-16 table (RFC 1662, appendix C.2), built at compile time.
pub(super) const FCS_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        let mut v = b as u16;
        let mut i = 0;
        while i < 8 {
            v = if v & 1 != 0 {
                (v >> 1) ^ 0x8408
            } else {
                v >> 1
            };
            i += 1;
        }
        table[b] = v;
        b += 1;
    }
    table
};
pub(super) const FCS_INIT: u16 = 0xffff;
pub(super) const FCS_GOOD: u16 = 0xf0b8;

pub(super) fn fcs16(mut fcs: u16, data: &[u8]) -> u16 {
    for &b in data {
        fcs = (fcs >> 8) ^ FCS_TABLE[usize::from((fcs ^ u16::from(b)) as u8)];
    }
    fcs
}

pub(super) const FLAG: u8 = 0x7e;
pub(super) const ESCAPE: u8 = 0x7d;

/// Appends one frame (address, control, protocol, `info`, FCS) to `out`, escaping flag and escape
/// bytes and the control characters set in `accm`.
pub fn encode_frame(out: &mut Vec<u8>, protocol: u16, info: &[u8], accm: u32) {
    let header = [0xff, 0x03, (protocol >> 8) as u8, protocol as u8];
    let fcs = !fcs16(fcs16(FCS_INIT, &header), info);
    let trailer = fcs.to_le_bytes();
    out.reserve(info.len() + info.len() / 8 + 16);
    out.push(FLAG);
    for &b in header.iter().chain(info).chain(&trailer) {
        if b == FLAG || b == ESCAPE || (b < 0x20 && accm & (1 << b) != 0) {
            out.push(ESCAPE);
            out.push(b ^ 0x20);
        } else {
            out.push(b);
        }
    }
    out.push(FLAG);
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// Its protocol.
    pub protocol: u16,
    /// Its information field.
    pub info: Vec<u8>,
}

/// Splits the byte stream into frames, checking the FCS; bounded by `max_frame` bytes.
#[derive(Debug)]
pub struct Deframer {
    buf: Vec<u8>,
    escaped: bool,
    /// The current frame is too long or was aborted: skip to the next flag.
    discarding: bool,
    max_frame: usize,
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Longer than the receiver's limit.
    TooLong,
    /// The frame check sequence is wrong.
    BadFcs,
    /// Too short, or the address, control or protocol field is invalid.
    BadHeader,
}

impl Deframer {
    /// A deframer for frames whose information field is at most `max_info` bytes.
    pub fn new(max_info: usize) -> Deframer {
        Deframer {
            buf: Vec::new(),
            escaped: false,
            discarding: false,
            max_frame: max_info + FRAME_OVERHEAD,
        }
    }

    /// Feeds `data`; calls `sink` for every complete frame or dropped frame, in order.
    pub fn push(&mut self, data: &[u8], mut sink: impl FnMut(Result<Frame, FrameError>)) {
        for &b in data {
            match b {
                FLAG => {
                    let aborted = std::mem::take(&mut self.escaped);
                    if std::mem::take(&mut self.discarding) {
                        sink(Err(FrameError::TooLong));
                    } else if !self.buf.is_empty() && !aborted {
                        sink(parse_frame(&self.buf));
                    }
                    self.buf.clear();
                }
                _ if self.discarding => {}
                ESCAPE => self.escaped = true,
                _ => {
                    let b = if std::mem::take(&mut self.escaped) {
                        b ^ 0x20
                    } else {
                        b
                    };
                    if self.buf.len() >= self.max_frame {
                        self.discarding = true;
                        self.buf.clear();
                    } else {
                        self.buf.push(b);
                    }
                }
            }
        }
    }
}

pub(super) fn parse_frame(raw: &[u8]) -> Result<Frame, FrameError> {
    if raw.len() < 4 {
        return Err(FrameError::BadHeader);
    }
    if fcs16(FCS_INIT, raw) != FCS_GOOD {
        return Err(FrameError::BadFcs);
    }
    let body = &raw[..raw.len() - 2];
    // Address and control may be compressed away (ACFC).
    let body = match body {
        [0xff, 0x03, rest @ ..] => rest,
        [0xff, ..] => return Err(FrameError::BadHeader),
        _ => body,
    };
    // The protocol field may be one byte (PFC): its low bit is set.
    let (protocol, info) = match body {
        [p, rest @ ..] if p & 1 == 1 => (u16::from(*p), rest),
        [hi, lo, rest @ ..] if lo & 1 == 1 => (u16::from_be_bytes([*hi, *lo]), rest),
        _ => return Err(FrameError::BadHeader),
    };
    Ok(Frame {
        protocol,
        info: info.to_vec(),
    })
}
