//! The QGA request path on arbitrary bytes, split at arbitrary points: framing (concatenated
//! texts, 0xFF resync, size bound), request and argument parsing, the command round trip, and
//! the client's reply checks. Nothing is executed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::qga::{
    base64_decode, base64_encode, host::check_reply, Command, Frame, Framer, Request,
};

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let mut framer = Framer::new(LIMIT);
    for chunk in rest.chunks(1 + usize::from(*first % 97)) {
        framer.push(chunk);
        // Memory stays bounded by the limit.
        assert!(framer.buffered() <= LIMIT);
        while let Some(frame) = framer.next_frame() {
            let Frame::Text(text) = frame else { continue };
            assert!(!text.is_empty() && text.len() <= LIMIT);
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) {
                let _ = check_reply(value);
            }
            if let Ok(s) = std::str::from_utf8(&text) {
                if let Some(bytes) = base64_decode(s) {
                    assert_eq!(base64_decode(&base64_encode(&bytes)), Some(bytes));
                }
            }
            let Ok(req) = Request::parse(&text) else {
                continue;
            };
            let Ok(cmd) = Command::parse(&req.execute, req.arguments) else {
                continue;
            };
            // What parses writes back to a request that parses to the same command.
            let wire = serde_json::to_vec(&cmd.to_request()).expect("encode");
            let again = Request::parse(&wire).expect("own request");
            assert_eq!(
                Command::parse(&again.execute, again.arguments).as_ref(),
                Ok(&cmd)
            );
        }
    }
});
