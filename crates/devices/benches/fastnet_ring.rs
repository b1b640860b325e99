//! Throughput of one fastnet ring between two threads against a plain memcpy of the same bytes,
//! in one run on this machine, so that the ratio ring/memcpy is meaningful (absolute figures are
//! not).
//!
//! `cargo bench -p vstream-devices --bench fastnet_ring` (about half a minute). Options after
//! `--`: `--scale F` (messages per cell times F), `--repeats N` (default 3, the best run counts),
//! `--only SIZE` (one message size: 64, 1500 or 65536).
//!
//! - ring: a producer thread pushes messages of one size and publishes every 64 messages or
//!   64 KiB (batching); a consumer thread takes every record the producer index shows
//!   (`Consumer::drain`: one refresh, one release), copies each out, checks its length and
//!   sequence number. A side with nothing to do
//!   spins briefly, then says it sleeps (`prepare_sleep`/`prepare_wait`) and parks; the other
//!   side unparks it only when the ring says so (the doorbell). Doorbells are counted.
//! - 1-thread: one thread pushes a batch, publishes it and drains it (the same checks): the
//!   ring's own cost per message, which scheduling on a loaded machine does not hide.
//! - memcpy: one thread copies the same number of messages of the same size from a source
//!   buffer into a destination buffer as large as the ring, as a one-copy path would.
//!
//! The ring copies every byte twice (into the segment, out of it) on two cores; memcpy once on
//! one core.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vstream_devices::fastnet::ring::{
    Consumer, Direction, Doorbell, Layout, Memory, Producer, RingError, Segment,
};

const RING: u32 = 4 << 20;
const MAX_PACKET: u32 = 65536 + 16;
const BATCH: u64 = 64;
const BATCH_BYTES: u64 = 64 << 10;
/// How often a side with nothing to do looks again before it sleeps.
const SPINS: u32 = 2000;

struct Run {
    elapsed: Duration,
    doorbells: u64,
}

/// The consumer's work per message: copy it out, check its length and sequence number.
struct Check {
    size: usize,
    seq: u64,
    buf: Vec<u8>,
}

impl Check {
    fn new(size: usize) -> Check {
        Check {
            size,
            seq: 0,
            buf: vec![0u8; MAX_PACKET as usize],
        }
    }

    #[inline]
    fn take(&mut self, mem: &Arc<Segment>, at: usize, n: usize) -> Result<(), RingError> {
        assert_eq!(n, self.size, "message {} size", self.seq);
        mem.read(at, &mut self.buf[..n]);
        let got = u64::from_le_bytes(self.buf[..8].try_into().unwrap());
        assert_eq!(got, self.seq, "message order");
        self.seq += 1;
        Ok(())
    }
}

/// Both ends of one ring in a fresh 4 MiB heap segment.
fn ring_pair() -> (Producer<Arc<Segment>>, Consumer<Arc<Segment>>) {
    let layout = Layout::for_segment(4096 + 2 * u64::from(RING), MAX_PACKET).expect("layout");
    let seg = Arc::new(Segment::heap(layout.segment_size as usize));
    layout.initialize(&seg).expect("initialize");
    let dir = Direction::GuestToHost;
    (
        Producer::new(seg.clone(), layout, dir),
        Consumer::new(seg, layout, dir),
    )
}

/// Whether a batch of `n` messages of `size` bytes is complete.
fn batch_full(n: u64, size: usize) -> bool {
    n >= BATCH || n * size as u64 >= BATCH_BYTES
}

/// The ring's own cost per message, without a second core: one thread pushes a batch,
/// publishes it and drains it, and so on.
fn ring_one_thread(size: usize, count: u64) -> Run {
    let (mut tx, mut rx) = ring_pair();
    let mut check = Check::new(size);
    let mut msg = vec![0x5au8; size];
    let start = Instant::now();
    let mut seq = 0;
    while seq < count {
        let mut n = 0;
        while seq < count && !batch_full(n, size) {
            msg[..8].copy_from_slice(&seq.to_le_bytes());
            assert!(tx.push(&msg).expect("push"), "a batch fits the ring");
            (seq, n) = (seq + 1, n + 1);
        }
        let _ = tx.publish();
        let drained = rx
            .drain(|mem, at, n| check.take(mem, at, n))
            .expect("drain");
        assert_eq!(drained.packets as u64, n, "the whole batch arrives");
    }
    Run {
        elapsed: start.elapsed(),
        doorbells: 0,
    }
}

fn ring_run(size: usize, count: u64) -> Run {
    let (mut tx, mut rx) = ring_pair();
    let producer_thread = thread::current();
    let start = Instant::now();
    let consumer = thread::spawn(move || {
        let mut check = Check::new(size);
        let mut doorbells = 0u64;
        let mut idle = 0;
        while check.seq < count {
            let drained = rx
                .drain(|mem, at, n| check.take(mem, at, n))
                .expect("drain");
            if drained.doorbell == Doorbell::Ring {
                doorbells += 1;
                producer_thread.unpark();
            }
            if drained.packets > 0 {
                idle = 0;
            } else if idle < SPINS {
                idle += 1;
                std::hint::spin_loop();
            } else if rx.prepare_sleep().expect("prepare_sleep") {
                thread::park();
            }
        }
        doorbells
    });
    let consumer_thread = consumer.thread().clone();
    let mut doorbells = 0u64;
    let mut msg = vec![0x5au8; size];
    let mut unpublished = 0;
    let publish = |tx: &mut Producer<Arc<Segment>>, doorbells: &mut u64| {
        if tx.publish() == Doorbell::Ring {
            *doorbells += 1;
            consumer_thread.unpark();
        }
    };
    for seq in 0..count {
        msg[..8].copy_from_slice(&seq.to_le_bytes());
        let mut idle = 0;
        while !tx.push(&msg).expect("push") {
            publish(&mut tx, &mut doorbells);
            unpublished = 0;
            if idle < SPINS {
                idle += 1;
                std::hint::spin_loop();
            } else if tx.prepare_wait().expect("prepare_wait") {
                thread::park();
            }
        }
        unpublished += 1;
        if batch_full(unpublished, size) {
            publish(&mut tx, &mut doorbells);
            unpublished = 0;
        }
    }
    publish(&mut tx, &mut doorbells);
    let consumer_doorbells = consumer.join().expect("consumer");
    Run {
        elapsed: start.elapsed(),
        doorbells: doorbells + consumer_doorbells,
    }
}

fn memcpy_run(size: usize, count: u64) -> Run {
    let src = vec![0x5au8; MAX_PACKET as usize];
    let mut dst = vec![0u8; RING as usize];
    let mut at = 0;
    let start = Instant::now();
    for _ in 0..count {
        if at + size > dst.len() {
            at = 0;
        }
        dst[at..at + size].copy_from_slice(std::hint::black_box(&src[..size]));
        at += size;
    }
    std::hint::black_box(&dst);
    Run {
        elapsed: start.elapsed(),
        doorbells: 0,
    }
}

fn main() {
    let mut scale = 1.0f64;
    let mut repeats = 3;
    let mut only: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scale" => scale = args.next().and_then(|v| v.parse().ok()).expect("--scale F"),
            "--repeats" => {
                repeats = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--repeats N")
            }
            "--only" => {
                only = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--only SIZE"),
                )
            }
            "--bench" => {}
            other => panic!("unknown option {other} (--scale F, --repeats N, --only SIZE)"),
        }
    }
    // Messages per cell: about 2 GB for the large sizes, 100 M small messages.
    let cells: [(usize, u64); 3] = [(64, 100_000_000), (1500, 1_500_000), (65536, 32_000)];
    println!("fastnet ring (two threads, {RING} B ring, batches of {BATCH} or {BATCH_BYTES} B) vs memcpy; best of {repeats}");
    println!("(1-thread: one thread pushes a batch, publishes it, drains it: the ring's cost without a second core)");
    println!(
        "{:>7} {:>12} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "size",
        "messages",
        "ring M/s",
        "ring GB/s",
        "1-thread M/s",
        "memcpy M/s",
        "bells/MiB",
        "ratio"
    );
    let mut ratios = Vec::new();
    for (size, count) in cells {
        if only.is_some_and(|o| o != size) {
            continue;
        }
        let count = ((count as f64 * scale) as u64).max(1000);
        let best = |f: &dyn Fn() -> Run| {
            (0..repeats)
                .map(|_| f())
                .min_by_key(|r| r.elapsed)
                .expect("repeats >= 1")
        };
        let ring = best(&|| ring_run(size, count));
        let one = best(&|| ring_one_thread(size, count));
        let copy = best(&|| memcpy_run(size, count));
        let per_s = |r: &Run| count as f64 / r.elapsed.as_secs_f64();
        let bytes = (size as u64 * count) as f64;
        let ratio = per_s(&ring) / per_s(&copy);
        println!(
            "{size:>7} {count:>12} {:>10.1} {:>10.2} {:>12.1} {:>12.1} {:>10.3} {ratio:>9.2}x",
            per_s(&ring) / 1e6,
            per_s(&ring) * size as f64 / 1e9,
            per_s(&one) / 1e6,
            per_s(&copy) / 1e6,
            ring.doorbells as f64 / (bytes / 1048576.0),
        );
        ratios.push((size, ratio, per_s(&one) / per_s(&copy), per_s(&ring) / 1e6));
    }
    println!();
    for (size, ratio, one, mps) in ratios {
        let aim = if size == 64 {
            format!("{mps:.0} M msg/s (aim >= 150)")
        } else {
            "aim >= 0.5x".to_string()
        };
        println!(
            "ratio ring/memcpy {size:>6} B: 1-thread {one:.2}x, two threads {ratio:.2}x  {aim}"
        );
    }
}
