//! The test vectors printed in docs/PROTOCOL.md: a second implementation can check its
//! encoder against the same bytes.

use vstream_wire::frame::{encode, encode_flagged, flags, DecodeError, Decoder};

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

/// The same DATA frame on a link that negotiated NO_PAYLOAD_CRC (§3): flags 01, a new `hcrc`,
/// `pcrc` 0.
const DATA_NO_PCRC: &str =
    "a9 5c 12 01 01 00 00 00 07 00 00 00 03 00 00 00 02 00 00 00 fe d9 d3 ef 68 69 00 00 00 00";

#[test]
fn data_frame_without_payload_crc_vector() {
    let mut out = Vec::new();
    encode_flagged(&mut out, flags::NO_PCRC, 0x12, 1, 7, 3, b"hi");
    assert_eq!(hex(&out), DATA_NO_PCRC);

    // A receiver that negotiated the mode takes it as it is.
    let mut d = Decoder::new(1024);
    d.set_no_pcrc(true);
    d.push(&out);
    let frame = d.next().expect("a frame").expect("sound");
    assert_eq!((frame.header.flags, &frame.payload[..]), (1, &b"hi"[..]));

    // One that did not (an old peer, or a serial line) checks it and drops it: the zero is no
    // CRC of "hi". That is why the mode is used only when both sides offered it.
    let mut d = Decoder::new(1024);
    d.push(&out);
    assert!(matches!(
        d.next(),
        Some(Err(DecodeError::BadPayload { .. }))
    ));

    // Flagged frames still carry a header CRC: a flipped header bit is caught in both modes.
    let mut bad = out.clone();
    bad[16] ^= 1;
    let mut d = Decoder::new(1024);
    d.set_no_pcrc(true);
    d.push(&bad);
    assert!(matches!(d.next(), Some(Err(DecodeError::BadHeader))));
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

#[test]
fn refuse_frame_vector() {
    let mut out = Vec::new();
    encode(&mut out, 0x06, 0, 0, 0, b"no");
    assert_eq!(&out[..4], &[0xa9, 0x5c, 0x06, 0x00]);
    assert_eq!(
        hex(&out),
        "a9 5c 06 00 00 00 00 00 00 00 00 00 00 00 00 00 02 00 00 00 ba 89 1e c4 6e 6f 18 6f f3 ba"
    );
}

/// docs/PROTOCOL.md §9: key `0123456789abcdef0123456789abcdef`, name `lab`, connector nonce 32
/// bytes of 01, acceptor nonce 32 bytes of 02.
#[test]
fn key_handshake_vectors() {
    use vstream_wire::auth::{Claim, Key, Side};
    let key = Key::new(*b"0123456789abcdef0123456789abcdef").expect("key");
    let (c, a) = ([1u8; 32], [2u8; 32]);
    assert_eq!(
        hex(&key.proof(Side::Acceptor, "lab", &c, &a)).replace(' ', ""),
        "d64bb06d844e566326afb8e67b9cbefc0811378c46692dd9a37b670a6e6973d6"
    );
    assert_eq!(
        hex(&key.proof(Side::Connector, "lab", &c, &a)).replace(' ', ""),
        "09a5d0dc6c5d2bb9ca87b88df1cc050948b93b2dd3c837dfc6de79f50c84c75e"
    );
    let claim = Claim {
        name: "lab".into(),
        nonce: c,
    };
    assert_eq!(
        hex(&claim.encode()[..12]),
        "56 53 41 55 54 48 31 0a 03 6c 61 62"
    );
}
