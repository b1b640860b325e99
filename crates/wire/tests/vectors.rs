//! The test vectors printed in docs/PROTOCOL.md: a second implementation can check its
//! encoder against the same bytes.

use vstream_wire::frame::encode;

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn data_frame_vector() {
    let mut out = Vec::new();
    encode(&mut out, 0x12, 1, 7, 3, b"hi");
    assert_eq!(
        hex(&out),
        "a9 5c 12 00 01 00 00 00 07 00 00 00 03 00 00 00 02 00 00 00 a1 05 37 b0 68 69 c2 d9 9d f5"
    );
}

#[test]
fn ack_frame_vector() {
    let mut out = Vec::new();
    encode(&mut out, 0x04, 0, 0, 42, b"");
    assert_eq!(
        hex(&out),
        "a9 5c 04 00 00 00 00 00 00 00 00 00 2a 00 00 00 00 00 00 00 60 35 e8 b8 00 00 00 00"
    );
}

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
}
