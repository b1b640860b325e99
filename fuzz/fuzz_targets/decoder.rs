//! The frame decoder and HELLO parser on arbitrary bytes, split at arbitrary points, through
//! both input APIs: `push` + `next`, and reads into an `InputBuf` in the windows the decoder
//! sets (`prepare` + `next_in`, the link's path), which must agree item for item.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_wire::{frame::Decoder, BufferPool, DecodeError, Hello, InputBuf};

fuzz_target!(|data: &[u8]| {
    let (limit, rest) = match data.split_first() {
        Some((l, r)) => (u32::from(*l) * 64, r),
        None => return,
    };
    let mut d = Decoder::new(limit);
    let mut fast = Decoder::new(limit);
    let mut pool = BufferPool::new(limit as usize);
    let mut input = InputBuf::new();
    let (mut fed, mut failed_crc) = (0u64, 0u64);
    for chunk in rest.chunks(1 + usize::from(rest.first().copied().unwrap_or(0) % 61)) {
        let mut piece = chunk;
        while !piece.is_empty() {
            fast.prepare(&mut input, &mut pool);
            let n = input.fill_from(piece);
            assert!(n > 0, "the decoder leaves room for a read");
            input.received();
            d.push(&piece[..n]);
            piece = &piece[n..];
            fed += n as u64;
            while let Some(item) = d.next() {
                assert_eq!(fast.next_in(&mut input, &mut pool), Some(item.clone()));
                match item {
                    Ok(frame) => {
                        assert!(frame.payload.len() <= limit as usize);
                        let _ = Hello::decode(&frame.payload);
                    }
                    Err(DecodeError::BadPayload { len, .. }) => failed_crc += u64::from(len),
                    Err(_) => {}
                }
            }
            assert_eq!(fast.next_in(&mut input, &mut pool), None);
            assert_eq!(fast.stats(), d.stats());
            assert_eq!(fast.buffered() + input.len(), d.buffered());
        }
        // Memory stays bounded by one frame plus one chunk, and a read buffer by one frame
        // and the next header.
        assert!(d.buffered() <= 24 + limit as usize + 4 + chunk.len());
        assert!(input.len() <= 24 + limit as usize + 4 + 24);
        // Work too: payloads checked in vain cost at most twice the input (docs/PROTOCOL.md
        // §1.1), whatever the input, so no input makes the decoder quadratic.
        assert!(
            failed_crc <= 2 * (fed + u64::from(limit) + 28),
            "{failed_crc} bytes of failed payload checks for {fed} bytes of input"
        );
    }
});
