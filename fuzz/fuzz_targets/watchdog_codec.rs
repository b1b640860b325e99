//! The watchdog's message decoder (both directions) and the random device's request parser on
//! arbitrary bytes, split at arbitrary points: errors, never panics, bounded memory, and every
//! decoded message encodes back to the bytes it came from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::random::{Request, MAX_REQUEST, REQUEST_LEN};
use vstream_devices::watchdog::{
    Decoder, GuestMsg, HostMsg, Message, HEADER_LEN, MAX_PAYLOAD, READ_CHUNK,
};

fn run<M: Message + PartialEq + std::fmt::Debug>(data: &[u8], step: usize) {
    let mut d = Decoder::<M>::new();
    for chunk in data.chunks(step.clamp(1, READ_CHUNK)) {
        if d.push(chunk).is_err() {
            return;
        }
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    // Text is cleaned on decode, so re-encoding is stable after one round.
                    let bytes = m.to_bytes();
                    let mut again = Decoder::<M>::new();
                    again.push(&bytes).expect("one message fits a chunk");
                    let back = again.next_message().expect("valid").expect("complete");
                    assert_eq!(back.to_bytes(), bytes);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= HEADER_LEN + MAX_PAYLOAD + chunk.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = 1 + usize::from(first % 64) * 17;
    run::<GuestMsg>(rest, step);
    run::<HostMsg>(rest, step);
    for c in rest.chunks_exact(REQUEST_LEN) {
        let raw = [c[0], c[1], c[2], c[3]];
        if let Ok(r) = Request::decode(raw) {
            assert!(r.len >= 1 && r.len <= MAX_REQUEST);
            assert_eq!(r.encode(), raw);
        }
    }
});
