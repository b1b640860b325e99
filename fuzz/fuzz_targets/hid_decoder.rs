//! The hid message decoder on arbitrary bytes split at arbitrary points: no panic, memory
//! bounded by one message plus one chunk, every decoded message re-encodes to the same bytes,
//! and the guest's capability check never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::hid::{Decoder, Kind, Message, HEADER_LEN, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let step = 1 + usize::from(data.first().copied().unwrap_or(0) % 37);
    let mut d = Decoder::new();
    for chunk in data.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    let bytes = m.to_bytes().expect("a decoded message encodes");
                    let mut again = Decoder::new();
                    again.push(&bytes);
                    assert_eq!(again.next_message().expect("re-decode"), Some(m.clone()));
                    if let Message::Batch { events, .. } = &m {
                        for e in events {
                            for k in Kind::ALL {
                                let _ = k.allows(e);
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() < HEADER_LEN + MAX_PAYLOAD + chunk.len());
    }
    let _ = d.finish();
});
