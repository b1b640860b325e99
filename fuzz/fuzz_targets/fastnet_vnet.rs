//! The host's check of the vnet header in front of every frame from a guest, on arbitrary
//! bytes: no panic, and a frame it accepts is one the host may hand to its TAP or switch
//! (longer than both headers; a GSO frame has a partial checksum inside it and a segment count
//! within the bound).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::fastnet::tap::VNET_HDR_LEN;
use vstream_devices::fastnet::vnet::{check, MAX_GSO_SEGMENTS};

fuzz_target!(|packet: &[u8]| {
    if check(packet).is_err() {
        return;
    }
    assert!(packet.len() >= VNET_HDR_LEN + 14);
    let frame_len = packet.len() - VNET_HDR_LEN;
    let gso_type = packet[1] & !0x80;
    if gso_type != 0 {
        assert_eq!(packet[0] & 0x01, 0x01, "a GSO frame needs NEEDS_CSUM");
        let gso_size = usize::from(u16::from_le_bytes([packet[4], packet[5]]));
        assert!(gso_size > 0 && frame_len.div_ceil(gso_size) <= MAX_GSO_SEGMENTS);
    }
    if packet[0] & 0x01 != 0 {
        let start = usize::from(u16::from_le_bytes([packet[6], packet[7]]));
        let offset = usize::from(u16::from_le_bytes([packet[8], packet[9]]));
        assert!(start + offset + 2 <= frame_len, "the checksum lies inside the frame");
    }
});
