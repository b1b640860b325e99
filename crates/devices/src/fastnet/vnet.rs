//! The `virtio_net_hdr_v1` in front of every frame a link carries, checked on the host before
//! a guest's frame reaches the host TAP or the switch. The host kernel checks the header too,
//! but the switch does not, and a guest must not be able to make the host's kernel segment a
//! frame into thousands of pieces or checksum outside it.

use super::tap::VNET_HDR_LEN;

/// `flags`: the checksum at `csum_start + csum_offset` is partial (the receiver finishes it).
const NEEDS_CSUM: u8 = 0x01;
/// `flags`: the sender checked the checksums (the guest's TAP sets it on some frames).
const DATA_VALID: u8 = 0x02;
/// `gso_type` values the TAPs' offloads allow (`TUN_F_TSO4`, `TUN_F_TSO6`, `TUN_F_TSO_ECN`).
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// Bytes of an Ethernet header (no VLAN tag).
const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 2] = [0x8100, 0x88a8];
/// Most segments one GSO frame may become: a 64 KiB frame cut at an MSS of 64 bytes. Bounds
/// the work one frame costs the host's kernel (Linux's own limit is 65535).
pub const MAX_GSO_SEGMENTS: usize = 1024;

/// Why a frame from the guest was dropped. `len` is the Ethernet frame's length (the bytes
/// after the vnet header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // the fields are the header's, named as in virtio_net_hdr_v1
pub enum VnetError {
    /// Shorter than the vnet header and an Ethernet header.
    #[error("frame of {0} bytes: shorter than its vnet and Ethernet headers")]
    Short(usize),
    /// A flag other than NEEDS_CSUM and DATA_VALID.
    #[error("vnet header flags {0:#04x}: only NEEDS_CSUM and DATA_VALID are allowed")]
    Flags(u8),
    /// A GSO type the offloads do not allow, or one that does not match the frame's ethertype.
    #[error("vnet header gso_type {gso_type:#04x} on ethertype {ethertype:#06x}")]
    GsoType { gso_type: u8, ethertype: u16 },
    /// `gso_size` 0, or so small that the frame would become too many segments.
    #[error(
        "vnet header gso_size {gso_size} for {len} bytes (at most {MAX_GSO_SEGMENTS} segments)"
    )]
    GsoSize { gso_size: u16, len: usize },
    /// A GSO frame without a partial checksum (the segments' checksums could not be made).
    #[error("GSO frame without NEEDS_CSUM")]
    GsoWithoutCsum,
    /// `hdr_len` beyond the frame.
    #[error("vnet header hdr_len {hdr_len} beyond the {len}-byte frame")]
    HdrLen { hdr_len: u16, len: usize },
    /// The checksum's place is in the Ethernet header or beyond the frame.
    #[error("vnet header csum_start {start} + csum_offset {offset} outside the {len}-byte frame")]
    Csum { start: u16, offset: u16, len: usize },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Checks the vnet header of `packet` (the header, then the Ethernet frame) field by field;
/// the frame's bytes are not changed. `num_buffers` is not checked: a TAP ignores it on write.
pub fn check(packet: &[u8]) -> Result<(), VnetError> {
    if packet.len() < VNET_HDR_LEN + ETH_LEN {
        return Err(VnetError::Short(packet.len()));
    }
    let (hdr, frame) = packet.split_at(VNET_HDR_LEN);
    let len = frame.len();
    let (flags, gso_type) = (hdr[0], hdr[1]);
    let (hdr_len, gso_size) = (le16(hdr, 2), le16(hdr, 4));
    let (start, offset) = (le16(hdr, 6), le16(hdr, 8));
    if flags & !(NEEDS_CSUM | DATA_VALID) != 0 {
        return Err(VnetError::Flags(flags));
    }
    if usize::from(hdr_len) > len {
        return Err(VnetError::HdrLen { hdr_len, len });
    }
    if flags & NEEDS_CSUM != 0 {
        // The checksum field (2 bytes) lies past the Ethernet header and inside the frame.
        let end = usize::from(start) + usize::from(offset) + 2;
        if usize::from(start) < ETH_LEN || end > len {
            return Err(VnetError::Csum { start, offset, len });
        }
    }
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ETHERTYPE_VLAN.contains(&ethertype) && len >= ETH_LEN + 4 {
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
    }
    let gso_ok = match gso_type & !GSO_ECN {
        GSO_NONE => gso_type == GSO_NONE,
        GSO_TCPV4 => ethertype == ETHERTYPE_IPV4,
        GSO_TCPV6 => ethertype == ETHERTYPE_IPV6,
        _ => false,
    };
    if !gso_ok {
        return Err(VnetError::GsoType {
            gso_type,
            ethertype,
        });
    }
    if gso_type == GSO_NONE {
        return Ok(());
    }
    if flags & NEEDS_CSUM == 0 {
        return Err(VnetError::GsoWithoutCsum);
    }
    if gso_size == 0 || len.div_ceil(usize::from(gso_size)) > MAX_GSO_SEGMENTS {
        return Err(VnetError::GsoSize { gso_size, len });
    }
    Ok(())
}
