//! The frame decoder and HELLO parser on arbitrary bytes, split at arbitrary points.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_wire::{frame::Decoder, Hello};

fuzz_target!(|data: &[u8]| {
    let (limit, rest) = match data.split_first() {
        Some((l, r)) => (u32::from(*l) * 64, r),
        None => return,
    };
    let mut d = Decoder::new(limit);
    for chunk in rest.chunks(1 + usize::from(rest.first().copied().unwrap_or(0) % 61)) {
        d.push(chunk);
        while let Some(item) = d.next() {
            if let Ok(frame) = item {
                assert!(frame.payload.len() <= limit as usize);
                let _ = Hello::decode(&frame.payload);
            }
        }
        // Memory stays bounded by one frame plus one chunk.
        assert!(d.buffered() <= 24 + limit as usize + 4 + chunk.len());
    }
});
