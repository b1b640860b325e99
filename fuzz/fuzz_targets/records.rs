//! The shared record codec with every device's record set (hid, printer, tty and watchdog, both
//! directions) on arbitrary bytes split at arbitrary points: errors, never panics; memory within
//! the decoder's bound; every decoded record encodes to bytes that decode and encode back to the
//! same bytes (to the very bytes it came from where decoding keeps everything: hid, printer,
//! tty). The per-device checks that ride on decoded data run too: hid's capability check,
//! printer job type detection and metadata sanitising, the random device's request parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::random::{Request, MAX_REQUEST, REQUEST_LEN};
use vstream_devices::record::{Decoder, Message};
use vstream_devices::{hid, printer, tty, watchdog};

/// How much of a record survives decoding.
#[derive(Clone, Copy, PartialEq)]
enum Kept {
    /// Everything: re-encoding gives the input bytes back.
    Bytes,
    /// Its meaning: re-decoding its encoding gives an equal record (printer metadata drops
    /// empty lines).
    Record,
    /// Its second encoding only (watchdog texts are cleaned, then cut to fit).
    Encoding,
}

/// Decodes `data` in `step`-byte pushes and checks every record. Returns the decoded records.
fn run<M: Message + PartialEq + std::fmt::Debug>(data: &[u8], step: usize, kept: Kept) -> Vec<M> {
    let header = M::LAYOUT.header_len();
    let mut d = Decoder::<M>::new();
    let mut out = Vec::new();
    let mut consumed = 0;
    for chunk in data.chunks(step.clamp(1, M::READ_CHUNK)) {
        if d.push(chunk).is_err() {
            return out;
        }
        loop {
            let before = d.buffered();
            match d.next_message() {
                Ok(Some(m)) => {
                    let used = before - d.buffered();
                    assert!(used >= header);
                    let bytes = m.to_bytes().expect("a decoded record encodes");
                    if kept == Kept::Bytes {
                        assert_eq!(bytes, data[consumed..consumed + used]);
                    }
                    consumed += used;
                    let mut again = Decoder::<M>::new();
                    again.push(&bytes).expect("one record fits the bound");
                    let back = again.next_message().expect("valid").expect("complete");
                    assert_eq!(back.to_bytes().expect("encodes"), bytes);
                    if kept != Kept::Encoding {
                        assert_eq!(back, m);
                    }
                    out.push(m);
                }
                Ok(None) => break,
                Err(_) => return out,
            }
        }
        assert!(d.buffered() <= Decoder::<M>::LIMIT);
        assert!(d.buffered() <= header + M::MAX_PAYLOAD + chunk.len());
    }
    let _ = d.finish();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = 1 + usize::from(first) * 17;
    for m in run::<hid::Message>(rest, step, Kept::Bytes) {
        if let hid::Message::Batch { events, .. } = &m {
            for e in events {
                for k in hid::Kind::ALL {
                    let _ = k.allows(e);
                }
            }
        }
    }
    let _ = printer::JobType::detect(rest);
    let _ = printer::sanitize(&String::from_utf8_lossy(rest));
    run::<printer::Record>(rest, step, Kept::Record);
    run::<tty::HostMsg>(rest, step, Kept::Bytes);
    run::<tty::GuestMsg>(rest, step, Kept::Bytes);
    run::<watchdog::GuestMsg>(rest, step, Kept::Encoding);
    run::<watchdog::HostMsg>(rest, step, Kept::Bytes);
    for c in rest.chunks_exact(REQUEST_LEN) {
        let raw = [c[0], c[1], c[2], c[3]];
        if let Ok(r) = Request::decode(raw) {
            assert!(r.len >= 1 && r.len <= MAX_REQUEST);
            assert_eq!(r.encode(), raw);
        }
    }
});
