//! The fastnet ring reader and writer against arbitrary segment contents (header, indexes,
//! records) and arbitrary concurrent changes: before every load from the segment the input may
//! overwrite any word, as a hostile peer on another CPU could. No panic (the segment's own
//! bounds check panics on any access outside it), every failure is a `RingError`, and a side
//! stops at its first error as the link would.
#![no_main]
use std::cell::Cell;
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use vstream_devices::fastnet::ring::{
    Consumer, Direction, Layout, Memory, Producer, RingError, Segment,
};

const SIZE: usize = 4096 + 2 * 4096;

/// A segment the input changes while the rings use it.
struct Hostile<'a> {
    seg: Segment,
    script: Cell<&'a [u8]>,
}

impl Hostile<'_> {
    fn take(&self, n: usize) -> Option<&[u8]> {
        let s = self.script.get();
        if s.len() < n {
            return None;
        }
        self.script.set(&s[n..]);
        Some(&s[..n])
    }

    /// One input byte per load: its top bit asks for a change, then 2 bytes of offset and 8
    /// of value.
    fn maybe_change(&self, near: usize) {
        let Some(&[b]) = self.take(1) else { return };
        if b & 0x80 == 0 {
            return;
        }
        let Some(c) = self.take(10) else { return };
        let off = if b & 0x40 != 0 {
            near & !7
        } else {
            usize::from(u16::from_le_bytes([c[0], c[1]])) % SIZE & !7
        };
        let value = u64::from_le_bytes(c[2..10].try_into().unwrap());
        self.seg.store_u64(off, value, Ordering::Relaxed);
    }
}

impl Memory for Hostile<'_> {
    fn size(&self) -> usize {
        self.seg.size()
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.maybe_change(off);
        self.seg.load_u32(off, order)
    }
    fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        self.maybe_change(off);
        self.seg.load_u64(off, order)
    }
    fn store_u32(&self, off: usize, value: u32, order: Ordering) {
        self.seg.store_u32(off, value, order)
    }
    fn store_u64(&self, off: usize, value: u64, order: Ordering) {
        self.seg.store_u64(off, value, order)
    }
    fn read(&self, off: usize, dst: &mut [u8]) {
        self.maybe_change(off);
        self.seg.read(off, dst)
    }
    fn write(&self, off: usize, src: &[u8]) {
        self.seg.write(off, src)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (contents, script) = rest.split_at(rest.len().min(usize::from(mode & 0x3f) * 256));
    let mem = Hostile {
        seg: Segment::heap(SIZE),
        script: Cell::new(script),
    };
    // Arbitrary contents over the start of the segment; then, mostly, a valid header so that
    // the rings get to run (the rest stays arbitrary: indexes, records).
    mem.seg.write(0, contents);
    if mode & 0x80 == 0 {
        let layout = Layout {
            segment_size: SIZE as u64,
            ring_size: 4096,
            max_packet: 1500,
        };
        layout.initialize(&mem.seg).expect("a valid layout");
        mem.seg.write(4096, contents);
    }
    let Ok(layout) = Layout::read(&mem) else { return };
    let mut rx = Consumer::new(&mem, layout, Direction::GuestToHost);
    let mut tx = Producer::new(&mem, layout, Direction::HostToGuest);
    let mut buf = vec![0u8; layout.max_packet as usize];
    let (mut rx_ok, mut tx_ok) = (true, true);
    while rx_ok || tx_ok {
        let Some(&[op, len]) = mem.take(2) else { return };
        match op % 7 {
            0 if rx_ok => rx_ok = rx.refresh().is_ok(),
            1 if rx_ok => rx_ok = rx.recv(&mut buf).is_ok(),
            2 if rx_ok => {
                let _ = rx.release();
                rx_ok = rx.prepare_sleep().is_ok();
            }
            3 if tx_ok => {
                let n = usize::from(len) * 6 % (layout.max_packet as usize + 1);
                tx_ok = tx.push(&buf[..n]).is_ok();
            }
            4 if tx_ok => {
                let _ = tx.publish();
            }
            5 if tx_ok => tx_ok = tx.prepare_wait().is_ok(),
            6 if rx_ok => {
                // Take everything there, as the host's receive loop does.
                rx_ok = rx
                    .drain(|mem, at, n| {
                        mem.read(at, &mut buf[..n]);
                        Ok::<_, RingError>(())
                    })
                    .is_ok();
            }
            _ => {}
        }
    }
});
