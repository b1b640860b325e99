//! The frame decoder and HELLO parser on arbitrary bytes, split at arbitrary points.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_wire::{frame::Decoder, DecodeError, Hello};

fuzz_target!(|data: &[u8]| {
    let (limit, rest) = match data.split_first() {
        Some((l, r)) => (u32::from(*l) * 64, r),
        None => return,
    };
    let mut d = Decoder::new(limit);
    let (mut fed, mut failed_crc) = (0u64, 0u64);
    for chunk in rest.chunks(1 + usize::from(rest.first().copied().unwrap_or(0) % 61)) {
        d.push(chunk);
        fed += chunk.len() as u64;
        while let Some(item) = d.next() {
            match item {
                Ok(frame) => {
                    assert!(frame.payload.len() <= limit as usize);
                    let _ = Hello::decode(&frame.payload);
                }
                Err(DecodeError::BadPayload { len, .. }) => failed_crc += u64::from(len),
                Err(_) => {}
            }
        }
        // Memory stays bounded by one frame plus one chunk.
        assert!(d.buffered() <= 24 + limit as usize + 4 + chunk.len());
        // Work too: payloads checked in vain cost at most twice the input (docs/PROTOCOL.md
        // §1.1), whatever the input, so no input makes the decoder quadratic.
        assert!(
            failed_crc <= 2 * (fed + u64::from(limit) + 28),
            "{failed_crc} bytes of failed payload checks for {fed} bytes of input"
        );
    }
});
