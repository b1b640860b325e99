//! The watchdog's QMP reader (line splitting and message classification) on arbitrary bytes
//! from a hostile or broken monitor: errors, never panics, lines stay bounded.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_devices::watchdog::qmp::{classify, LineReader, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut r = LineReader::default();
    for chunk in rest.chunks(1 + usize::from(first) * 13) {
        r.push(chunk);
        loop {
            match r.next_line() {
                Ok(Some(line)) => {
                    assert!(line.len() <= MAX_LINE);
                    let _ = classify(&line);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
