//! The printer record decoder and the job type detector on arbitrary bytes split at arbitrary
//! points: no panic, and every decoded record re-encodes to an equal record.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::printer::{sanitize, Decoder, JobType, Record};

fuzz_target!(|data: &[u8]| {
    let _ = JobType::detect(data);
    let _ = sanitize(&String::from_utf8_lossy(data));
    let step = 1 + usize::from(data.first().copied().unwrap_or(0) % 251);
    let mut d = Decoder::new();
    for chunk in data.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_record() {
                Ok(Some(r)) => {
                    let bytes = r.to_bytes().expect("a decoded record encodes");
                    let mut again = Decoder::new();
                    again.push(&bytes);
                    assert_eq!(again.next_record().expect("re-decode"), Some(r));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = d.finish();
});
