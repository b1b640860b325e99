//! virtio-vsock packets (VIRTIO 1.2 §5.10.6): a 44-byte little-endian header and its payload.
//!
//! [`parse`] takes bytes already copied out of guest memory, so what is checked is what is used.

/// Header length.
pub const HEADER_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only type the device offers (no F_SEQPACKET).
pub const TYPE_STREAM: u16 = 1;
/// The largest payload one packet may carry (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// `op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connect.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or ended.
    Rst = 3,
    /// Half or full close (`flags`: [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's buf_alloc/fwd_cnt changed.
    CreditUpdate = 6,
    /// Asks for a credit update.
    CreditRequest = 7,
}

impl Op {
    fn from_u16(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation (raw: [`parse`] checks it).
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Reads the header at the start of `bytes`.
    pub fn read(bytes: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// The header's 44 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A checked packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Its header.
    pub header: Header,
    /// Its operation.
    pub op: Op,
    /// Its payload (empty unless `op` is [`Op::Rw`]).
    pub payload: &'a [u8],
}

/// Why bytes from the guest are not a packet the device takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than 44 bytes.
    #[error("{0} bytes, shorter than a header")]
    Truncated(usize),
    /// The source is not the guest's CID (a guest cannot speak for another VM).
    #[error("source CID {0} is not the guest's")]
    WrongSource(u64),
    /// The destination is not the host.
    #[error("destination CID {0} is not the host")]
    WrongDestination(u64),
    /// Not a stream packet: the device answers RST.
    #[error("socket type {0} is not stream")]
    WrongType(u16),
    /// An op the spec does not define: the device answers RST.
    #[error("unknown op {0}")]
    UnknownOp(u16),
    /// `len` is not the payload's length, or more than [`MAX_PAYLOAD`].
    #[error("header says {said} payload bytes, the buffer holds {have}")]
    BadLength {
        /// The header's `len`.
        said: u32,
        /// The bytes after the header.
        have: usize,
    },
}

impl PacketError {
    /// Whether the guest gets a RST for it (the header is sound enough to name a connection).
    pub fn answer_rst(&self) -> bool {
        matches!(self, PacketError::WrongType(_) | PacketError::UnknownOp(_))
    }
}

/// Parses one packet the guest `guest_cid` sent (header and payload in one buffer).
pub fn parse(bytes: &[u8], guest_cid: u64) -> Result<Packet<'_>, (Option<Header>, PacketError)> {
    let header = Header::read(bytes).ok_or((None, PacketError::Truncated(bytes.len())))?;
    let fail = |e| Err((Some(header), e));
    if header.src_cid != guest_cid {
        return fail(PacketError::WrongSource(header.src_cid));
    }
    if header.dst_cid != HOST_CID {
        return fail(PacketError::WrongDestination(header.dst_cid));
    }
    let payload = &bytes[HEADER_LEN..];
    if header.len as usize != payload.len() || payload.len() > MAX_PAYLOAD {
        return fail(PacketError::BadLength {
            said: header.len,
            have: payload.len(),
        });
    }
    if header.type_ != TYPE_STREAM {
        return fail(PacketError::WrongType(header.type_));
    }
    let Some(op) = Op::from_u16(header.op) else {
        return fail(PacketError::UnknownOp(header.op));
    };
    if op != Op::Rw && !payload.is_empty() {
        return fail(PacketError::BadLength {
            said: header.len,
            have: payload.len(),
        });
    }
    Ok(Packet {
        header,
        op,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn bytes(h: Header, payload: &[u8]) -> Vec<u8> {
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_header_round_trips_and_data_parses() {
        let h = header(5, 3);
        assert_eq!(Header::read(&h.encode()), Some(h));
        let b = bytes(h, b"abc");
        let p = parse(&b, 3).expect("packet");
        assert_eq!((p.op, p.payload), (Op::Rw, &b"abc"[..]));
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        assert_eq!(
            parse(&[0; 43], 3).unwrap_err().1,
            PacketError::Truncated(43)
        );
        let e = |h: Header, payload: &[u8]| parse(&bytes(h, payload), 3).unwrap_err().1;
        assert_eq!(
            e(header(5, 10), b"abc"),
            PacketError::BadLength { said: 10, have: 3 }
        );
        assert_eq!(
            e(header(5, u32::MAX), b""),
            PacketError::BadLength {
                said: u32::MAX,
                have: 0
            }
        );
        assert_eq!(e(header(99, 0), b""), PacketError::UnknownOp(99));
        assert!(e(header(99, 0), b"").answer_rst());
        assert_eq!(
            e(
                Header {
                    type_: 2,
                    ..header(1, 0)
                },
                b""
            ),
            PacketError::WrongType(2)
        );
        assert_eq!(
            e(
                Header {
                    src_cid: 4,
                    ..header(1, 0)
                },
                b""
            ),
            PacketError::WrongSource(4)
        );
        assert_eq!(
            e(
                Header {
                    dst_cid: 5,
                    ..header(1, 0)
                },
                b""
            ),
            PacketError::WrongDestination(5)
        );
        assert!(!PacketError::WrongSource(4).answer_rst());
        assert_eq!(
            e(header(1, 2), b"xy"),
            PacketError::BadLength { said: 2, have: 2 }
        );
        let big = vec![0; MAX_PAYLOAD + 1];
        assert!(matches!(
            e(header(5, big.len() as u32), &big),
            PacketError::BadLength { .. }
        ));
    }
}
