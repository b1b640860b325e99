//! The files device's records on arbitrary bytes split at arbitrary points, as a malicious
//! agent would send them to `vstreamctl cp`: errors, never panics; memory within the decoder's
//! bound; every decoded record encodes and decodes back to itself; and the records, applied to
//! a receiving tree, never create anything outside its root.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::files::tree::Sink;
use vstream_devices::files::{check_name, Decoder, Message, Record};

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let scratch = std::env::temp_dir().join(format!("vstream-fuzz-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("into")).expect("scratch");
    let mut sink = Sink::tree(scratch.join("into").join("root"), false, false);
    let mut dec = Decoder::new();
    let mut failed = false;
    'feed: for chunk in rest.chunks(1 + usize::from(*first)) {
        if dec.push(chunk).is_err() {
            break;
        }
        assert!(dec.buffered() <= Decoder::LIMIT);
        loop {
            let record = match dec.next_message() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => break 'feed,
            };
            let wire = record.to_bytes().expect("a decoded record encodes");
            let mut again = Decoder::new();
            again.push(&wire).expect("within bounds");
            assert_eq!(again.next_message().expect("decodes"), Some(record.clone()));
            if let Record::Entry(e) = &record {
                assert!(check_name(&e.name).is_ok());
            }
            if !failed && sink.apply(record).is_err() {
                sink.abandon(false);
                failed = true;
            }
        }
    }
    let names: Vec<_> = std::fs::read_dir(&scratch)
        .expect("scratch")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["into"], "something was written outside the root");
    let _ = std::fs::remove_dir_all(&scratch);
});
