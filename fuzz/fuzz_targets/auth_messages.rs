//! The key handshake's parsers (docs/PROTOCOL.md §9) on arbitrary bytes: errors or "need more",
//! never panics; a message never claims more bytes than it was given, and every parsed message
//! encodes back to the bytes it came from (refusal reasons are read lossily, so only their
//! length is checked).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_wire::auth::{parse_verdict, Challenge, Claim};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((claim, n))) = Claim::parse(data) {
        assert!(n <= data.len());
        assert_eq!(claim.encode(), &data[..n]);
    }
    match Challenge::parse(data) {
        Ok(Some((c @ Challenge::Accept { .. }, n))) => {
            assert!(n <= data.len());
            assert_eq!(c.encode(), &data[..n]);
        }
        Ok(Some((Challenge::Refuse(_), n))) => assert!(n <= data.len()),
        _ => {}
    }
    if let Ok(Some((_, n))) = parse_verdict(data) {
        assert!(n <= data.len());
    }
});
