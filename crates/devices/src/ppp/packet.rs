//! PPP control packets (RFC 1661 5): protocol numbers, codes, option types, and the packet
//! and option layouts LCP and IPCP share.

/// PPP protocol numbers.
pub mod protocol {
    /// Internet Protocol version 4.
    pub const IPV4: u16 = 0x0021;
    /// IP Control Protocol.
    pub const IPCP: u16 = 0x8021;
    /// Link Control Protocol.
    pub const LCP: u16 = 0xc021;
}

/// Control packet codes (LCP; IPCP uses 1-7).
pub(super) mod code {
    pub const CONFIGURE_REQUEST: u8 = 1;
    pub const CONFIGURE_ACK: u8 = 2;
    pub const CONFIGURE_NAK: u8 = 3;
    pub const CONFIGURE_REJECT: u8 = 4;
    pub const TERMINATE_REQUEST: u8 = 5;
    pub const TERMINATE_ACK: u8 = 6;
    pub const CODE_REJECT: u8 = 7;
    pub const PROTOCOL_REJECT: u8 = 8;
    pub const ECHO_REQUEST: u8 = 9;
    pub const ECHO_REPLY: u8 = 10;
    pub const DISCARD_REQUEST: u8 = 11;
}

/// LCP option types.
pub(super) mod lcp_opt {
    pub const MRU: u8 = 1;
    pub const ACCM: u8 = 2;
    pub const MAGIC: u8 = 5;
    pub const PFC: u8 = 7;
    pub const ACFC: u8 = 8;
}

/// IPCP option types.
pub(super) mod ipcp_opt {
    pub const IP_ADDRESS: u8 = 3;
}

/// A control packet: code, identifier, data.
pub(super) struct Packet<'a> {
    pub(super) code: u8,
    pub(super) id: u8,
    pub(super) data: &'a [u8],
}

pub(super) fn parse_packet(info: &[u8]) -> Option<Packet<'_>> {
    let [code, id, hi, lo, ..] = *info else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    // Bytes beyond the length are padding (RFC 1661 5); a shorter packet is invalid.
    if len < 4 || len > info.len() {
        return None;
    }
    Some(Packet {
        code,
        id,
        data: &info[4..len],
    })
}

pub(super) fn build_packet(code: u8, id: u8, data: &[u8]) -> Vec<u8> {
    let len = (data.len() + 4).min(usize::from(u16::MAX));
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&[code, id]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&data[..len - 4]);
    p
}

/// Configuration options: (type, value) pairs; `None` if malformed.
pub(super) fn parse_options(mut data: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let [t, l, ..] = *data else {
            return None;
        };
        let l = usize::from(l);
        if l < 2 || l > data.len() {
            return None;
        }
        out.push((t, &data[2..l]));
        data = &data[l..];
    }
    Some(out)
}

pub(super) fn push_option(out: &mut Vec<u8>, t: u8, value: &[u8]) {
    out.push(t);
    out.push((value.len() + 2) as u8);
    out.extend_from_slice(value);
}
