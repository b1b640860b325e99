//! The tty device's decoders (both directions) on arbitrary bytes split at arbitrary points:
//! no panic, memory within the bound, and every decoded message re-encodes to the bytes it
//! came from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::tty::{Decoder, GuestMsg, HostMsg, Message, HEADER_LEN};

fn run<M: Message>(data: &[u8], chunk: usize) {
    let mut dec = Decoder::<M>::new();
    let mut consumed = 0;
    for part in data.chunks(chunk) {
        if dec.push(part).is_err() {
            return;
        }
        loop {
            let before = dec.buffered();
            match dec.next_message() {
                Ok(Some(msg)) => {
                    let mut again = Vec::new();
                    msg.encode(&mut again)
                        .expect("a decoded message re-encodes");
                    let used = before - dec.buffered();
                    assert!(used >= HEADER_LEN);
                    assert_eq!(again, data[consumed..consumed + used]);
                    consumed += used;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.buffered() <= Decoder::<M>::LIMIT);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(*first % 97);
    run::<HostMsg>(rest, chunk);
    run::<GuestMsg>(rest, chunk);
});
