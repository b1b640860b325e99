//! Unit tests of the fastnet rings: the documented test vectors, round trips with wrap-around,
//! two threads with real doorbells, and a hostile peer's writes (errors, never panics or reads
//! outside the segment).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use proptest::prelude::*;

use super::ring::*;

const SMALL: Layout = Layout {
    segment_size: 4096 + 2 * 4096,
    ring_size: 4096,
    max_packet: 1500,
};

type Pair = (Arc<Segment>, Producer<Arc<Segment>>, Consumer<Arc<Segment>>);

fn pair(layout: Layout, dir: Direction) -> Pair {
    let seg = Arc::new(Segment::heap(layout.segment_size as usize));
    layout.initialize(&seg).expect("initialize");
    assert_eq!(Layout::read(&seg).expect("read back"), layout);
    (
        seg.clone(),
        Producer::new(seg.clone(), layout, dir),
        Consumer::new(seg, layout, dir),
    )
}

fn packet(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect()
}

fn dump(seg: &Segment, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    seg.read(off, &mut v);
    v
}

/// [`Consumer::drain`] into copies: the packets taken (those before an error too), and what
/// `drain` returned.
fn drain_copies(rx: &mut Consumer<Arc<Segment>>) -> (Vec<Vec<u8>>, Result<Drained, RingError>) {
    let mut taken = Vec::new();
    let r = rx.drain(|mem, at, n| {
        taken.push(dump(mem, at, n));
        Ok::<_, RingError>(())
    });
    (taken, r)
}

/// The hex blocks under `<!-- vector: NAME -->` in docs/devices/fastnet.md: lines of
/// `OFFSET: BYTES`, offsets and bytes in hex.
fn doc_vector(name: &str) -> Vec<(usize, Vec<u8>)> {
    let doc = include_str!("../../../../docs/devices/fastnet.md");
    let marker = format!("<!-- vector: {name} -->");
    let start = doc.find(&marker).unwrap_or_else(|| panic!("no {marker}"));
    let block = doc[start..]
        .split("```")
        .nth(1)
        .expect("a code block after the marker");
    block
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (off, bytes) = l.split_once(':').expect("OFFSET: BYTES");
            let off = usize::from_str_radix(off.trim(), 16).expect("hex offset");
            let bytes = bytes
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                .collect();
            (off, bytes)
        })
        .collect()
}

fn assert_vector(seg: &Segment, name: &str) {
    let v = doc_vector(name);
    assert!(!v.is_empty(), "vector {name} is empty");
    for (off, bytes) in v {
        assert_eq!(
            dump(seg, off, bytes.len()),
            bytes,
            "vector {name}: bytes at {off:#x}"
        );
    }
}

#[test]
fn documented_test_vectors() {
    let seg = Arc::new(Segment::heap(SMALL.segment_size as usize));
    SMALL.initialize(&seg).unwrap();
    assert_vector(&seg, "header");

    let mut tx = Producer::new(seg.clone(), SMALL, Direction::GuestToHost);
    let mut rx = Consumer::new(seg.clone(), SMALL, Direction::GuestToHost);
    assert!(tx.push(b"hello").unwrap());
    assert!(tx.push(&[0xab; 8]).unwrap());
    assert_eq!(tx.publish(), Doorbell::Ring, "a fresh consumer waits at 0");
    assert_vector(&seg, "two-packets");

    let mut buf = vec![0; 1500];
    assert!(rx.prepare_sleep().is_ok_and(|sleep| !sleep));
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(5));
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(8));
    assert_eq!(rx.recv(&mut buf).unwrap(), None);
    assert_eq!(
        rx.release(),
        Doorbell::Ring,
        "cons_event starts at 0: the first release rings"
    );
    assert_eq!(rx.prepare_sleep(), Ok(true));
    assert_vector(&seg, "consumed");

    // Three records of 1352 bytes end 8 bytes short of the data area's end: the next packet
    // pads those 8 bytes and starts again at offset 0.
    for _ in 0..3 {
        assert!(tx.push(&[1; 1344]).unwrap());
    }
    assert_eq!(tx.publish(), Doorbell::Ring, "the consumer said it sleeps");
    assert_eq!(rx.refresh(), Ok(3 * 1352));
    for _ in 0..3 {
        assert_eq!(rx.recv(&mut buf).unwrap(), Some(1344));
    }
    let _ = rx.release();
    assert!(tx.push(&[0x5a; 3]).unwrap());
    let _ = tx.publish();
    assert_vector(&seg, "wrapped");
    assert_eq!(
        rx.refresh(),
        Ok(8 + 16),
        "the padding record and the packet"
    );
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(3));
    assert_eq!(&buf[..3], &[0x5a; 3]);
}

#[test]
fn need_event_is_virtio_vring_need_event() {
    assert!(need_event(0, 8, 0));
    assert!(need_event(7, 8, 0));
    assert!(
        !need_event(8, 8, 0),
        "the event index itself is not yet passed"
    );
    assert!(!need_event(100, 8, 0));
    assert!(need_event(u32::MAX - 7, 8, u32::MAX - 7), "across the wrap");
}

#[test]
fn round_trip_with_wrap_around_and_padding() {
    let (seg, tx, rx) = pair(SMALL, Direction::HostToGuest);
    // Start 100 KiB before the 32-bit indexes wrap (the ring wraps about 60 times on the way).
    let start = 0u32.wrapping_sub(100 << 10);
    for line in [
        Direction::HostToGuest.producer_line(),
        Direction::HostToGuest.consumer_line(),
    ] {
        seg.store_u64(
            line,
            u64::from(start) | u64::from(start) << 32,
            Ordering::Relaxed,
        );
    }
    let (mut tx, mut rx) = (tx.starting_at(start), rx.starting_at(start));
    let mut buf = vec![0; 1500];
    let mut next = 0u32;
    let mut got = 0u32;
    for round in 0..2000u32 {
        let len = (round as usize * 97) % 1501;
        if !tx.push(&packet(next, len)).unwrap() {
            let _ = tx.publish();
            while let Some(n) = rx.recv(&mut buf).unwrap() {
                assert_eq!(&buf[..n], &packet(got, n)[..], "packet {got}");
                got += 1;
            }
            let _ = rx.release();
            rx.refresh().unwrap();
            while let Some(n) = rx.recv(&mut buf).unwrap() {
                assert_eq!(&buf[..n], &packet(got, n)[..], "packet {got}");
                got += 1;
            }
            let _ = rx.release();
            assert!(tx.push(&packet(next, len)).unwrap(), "room after a drain");
        }
        next += 1;
        if round % 3 == 0 {
            let _ = tx.publish();
            rx.refresh().unwrap();
        }
    }
    let _ = tx.publish();
    rx.refresh().unwrap();
    while let Some(n) = rx.recv(&mut buf).unwrap() {
        assert_eq!(&buf[..n], &packet(got, n)[..], "packet {got}");
        got += 1;
    }
    assert_eq!(got, next);
}

#[test]
fn a_full_ring_refuses_then_rings_the_waiting_producer() {
    let (_, mut tx, mut rx) = pair(SMALL, Direction::GuestToHost);
    let mut pushed = 0;
    while tx.push(&[7; 1000]).unwrap() {
        pushed += 1;
    }
    assert_eq!(pushed, 4, "4 records of 1008 bytes fit 4096");
    let _ = tx.publish();
    assert_eq!(tx.prepare_wait(), Ok(true), "nothing freed yet: sleep");
    rx.refresh().unwrap();
    let mut buf = vec![0; 1500];
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(1000));
    assert_eq!(rx.release(), Doorbell::Ring, "the producer asked");
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(1000));
    assert_eq!(rx.release(), Doorbell::Quiet, "one doorbell per wait");
    assert!(tx.push(&[7; 1000]).unwrap());
}

#[test]
fn drain_takes_every_packet_across_the_wrap_with_one_release() {
    let (seg, tx, rx) = pair(SMALL, Direction::GuestToHost);
    let dir = Direction::GuestToHost;
    // Both indexes 3 KiB before the end of the data area, and 8 KiB before the 32-bit wrap.
    let start = 0u32.wrapping_sub(8192 + 1024);
    for line in [dir.producer_line(), dir.consumer_line()] {
        seg.store_u64(line, u64::from(start), Ordering::Relaxed);
    }
    let (mut tx, mut rx) = (tx.starting_at(start), rx.starting_at(start));
    // 600 + 300 fit before the end; 700 needs padding and goes to offset 0.
    let lens = [600, 0, 300, 700, 1];
    for (i, &len) in lens.iter().enumerate() {
        assert!(tx.push(&packet(i as u32, len)).unwrap());
    }
    let _ = tx.publish();
    assert_eq!(tx.prepare_wait(), Ok(true), "the producer waits for space");
    let (got, drained) = drain_copies(&mut rx);
    let drained = drained.unwrap();
    assert_eq!(drained.packets, lens.len());
    assert_eq!(drained.doorbell, Doorbell::Ring, "the producer asked");
    for (i, &len) in lens.iter().enumerate() {
        assert_eq!(got[i], packet(i as u32, len), "packet {i}");
    }
    let end = seg.load_u32(dir.producer_line(), Ordering::Relaxed);
    assert_eq!(seg.load_u32(dir.consumer_line(), Ordering::Relaxed), end);
    let nothing = rx.drain(|_, _, _| -> Result<(), RingError> { panic!("nothing new") });
    assert_eq!(
        nothing,
        Ok(Drained {
            packets: 0,
            doorbell: Doorbell::Quiet
        })
    );
}

#[test]
fn a_hostile_record_in_the_middle_of_a_drain_stops_it_and_releases_nothing() {
    let dir = Direction::GuestToHost;
    // (the second record's header (len, kind), the rule it breaks)
    let cases: [((u32, u32), &str); 4] = [
        ((1501, KIND_PACKET), "longer than max_packet"),
        ((2000, KIND_PACKET), "longer than max_packet"),
        ((0, KIND_PAD), "padding must reach the end of the data area"),
        ((100, 9), "unknown kind"),
    ];
    for ((len, kind), expected) in cases {
        let (seg, mut tx, mut rx) = pair(SMALL, dir);
        for i in 0..3 {
            assert!(tx.push(&packet(i, 100)).unwrap());
        }
        let _ = tx.publish();
        let second = dir.data_offset(SMALL.ring_size) + 112;
        seg.store_u64(
            second,
            u64::from(len) | u64::from(kind) << 32,
            Ordering::Relaxed,
        );
        let (taken, e) = drain_copies(&mut rx);
        let e = e.unwrap_err();
        assert_eq!(why(&e), expected, "({len}, {kind}): {e}");
        assert_eq!(taken, vec![packet(0, 100)], "only the packet before it");
        assert_eq!(seg.load_u32(dir.consumer_line(), Ordering::Relaxed), 0);
    }
    // A producer index past the end of the batch makes the last record run past it.
    let (seg, mut tx, mut rx) = pair(SMALL, dir);
    for i in 0..3 {
        assert!(tx.push(&packet(i, 100)).unwrap());
    }
    let _ = tx.publish();
    seg.store_u32(dir.producer_line(), 2 * 112 + 16, Ordering::Relaxed);
    let (taken, e) = drain_copies(&mut rx);
    let e = e.unwrap_err();
    assert_eq!(why(&e), "runs past the producer index", "{e}");
    assert_eq!(taken.len(), 2);
}

#[test]
fn a_failed_take_stops_the_drain_with_its_error() {
    #[derive(Debug, PartialEq)]
    enum Failed {
        Ring(RingError),
        Tap(usize),
    }
    impl From<RingError> for Failed {
        fn from(e: RingError) -> Failed {
            Failed::Ring(e)
        }
    }
    let (seg, mut tx, mut rx) = pair(SMALL, Direction::HostToGuest);
    for i in 0..4 {
        assert!(tx.push(&packet(i, 10 + i as usize)).unwrap());
    }
    let _ = tx.publish();
    let mut calls = 0;
    let r = rx.drain(|_, _, n| {
        calls += 1;
        if n == 11 {
            return Err(Failed::Tap(n));
        }
        Ok(())
    });
    assert_eq!(r, Err(Failed::Tap(11)));
    assert_eq!(calls, 2, "no packet after the failed one");
    assert_eq!(
        seg.load_u32(Direction::HostToGuest.consumer_line(), Ordering::Relaxed),
        0,
        "nothing released"
    );
}

/// A socket pair that keeps message boundaries, as a TAP does (one frame per read); the reading
/// end is non-blocking, as the TAP is.
fn frame_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (r, w) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    (r, w)
}

/// Pushes the next frame queued on `fd` straight into the ring, as the links do with their TAP.
fn push_from_fd(
    tx: &mut Producer<Arc<Segment>>,
    max: u32,
    fd: &std::os::fd::OwnedFd,
) -> Filled<std::io::Error> {
    use std::os::fd::AsFd;
    tx.push_with(max, |mem, off, len| mem.read_from_fd(off, len, fd.as_fd()))
        .expect("a sound consumer index")
}

#[test]
fn frames_read_from_a_descriptor_into_the_ring_arrive_intact_across_wrap_arounds() {
    let (seg, tx, rx) = pair(SMALL, Direction::GuestToHost);
    // Start 64 KiB before the 32-bit indexes wrap, as round_trip_with_wrap_around_and_padding.
    let start = 0u32.wrapping_sub(64 << 10);
    let dir = Direction::GuestToHost;
    for line in [dir.producer_line(), dir.consumer_line()] {
        seg.store_u64(
            line,
            u64::from(start) | u64::from(start) << 32,
            Ordering::Relaxed,
        );
    }
    let (mut tx, mut rx) = (tx.starting_at(start), rx.starting_at(start));
    let (r, w) = frame_pipe();
    let mut buf = vec![0; 1500];
    let (mut sent, mut got, mut pads) = (0u32, 0u32, 0);
    while sent < 1000 {
        let len = 1 + (sent as usize * 97) % 1500;
        rustix::io::write(&w, &packet(sent, len)).expect("queue a frame");
        let before = tx.in_flight();
        match push_from_fd(&mut tx, SMALL.max_packet, &r) {
            Filled::Pushed(n) => {
                assert_eq!(n, len, "frame {sent} read whole");
                let rec = 8 + (len as u32).next_multiple_of(8);
                if tx.in_flight() - before > rec {
                    pads += 1;
                }
                sent += 1;
            }
            Filled::Full => {
                // No room for a 1500-byte record: the frame stays queued; drain and retry.
                let _ = tx.publish();
                rx.refresh().unwrap();
                while let Some(n) = rx.recv(&mut buf).unwrap() {
                    assert_eq!(&buf[..n], &packet(got, n)[..], "frame {got}");
                    got += 1;
                }
                let _ = rx.release();
                match push_from_fd(&mut tx, SMALL.max_packet, &r) {
                    Filled::Pushed(n) => assert_eq!(n, len),
                    other => panic!("room after a drain, got {other:?}"),
                }
                sent += 1;
            }
            Filled::Failed(e) => panic!("frame {sent}: {e}"),
        }
    }
    let _ = tx.publish();
    rx.refresh().unwrap();
    while let Some(n) = rx.recv(&mut buf).unwrap() {
        assert_eq!(&buf[..n], &packet(got, n)[..], "frame {got}");
        got += 1;
    }
    assert_eq!(got, sent);
    assert!(pads > 50, "records padded to the end of the ring: {pads}");
}

#[test]
fn a_short_read_into_the_ring_commits_only_what_was_read() {
    let (_, mut tx, mut rx) = pair(SMALL, Direction::GuestToHost);
    let (r, w) = frame_pipe();
    rustix::io::write(&w, &packet(3, 100)).unwrap();
    assert!(matches!(
        push_from_fd(&mut tx, SMALL.max_packet, &r),
        Filled::Pushed(100)
    ));
    assert_eq!(
        tx.in_flight(),
        8 + 104,
        "a 100-byte record, not a 1500-byte one"
    );
    assert_eq!(tx.publish(), Doorbell::Ring, "a fresh consumer waits at 0");
    assert_eq!(rx.refresh(), Ok(8 + 104));
    let mut buf = vec![0; 1500];
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(100));
    assert_eq!(&buf[..100], &packet(3, 100)[..]);
    assert_eq!(rx.recv(&mut buf).unwrap(), None);
}

#[test]
fn a_failed_or_refused_read_into_the_ring_leaves_it_unchanged() {
    use std::os::fd::AsFd;
    let (seg, mut tx, mut rx) = pair(SMALL, Direction::GuestToHost);
    // 3 records of 1008 bytes and one of 808: 264 bytes left before the end of the data area,
    // so a 1500-byte record needs padding there first.
    for len in [1000, 1000, 1000, 800] {
        assert!(tx.push(&[9; 1000][..len]).unwrap());
    }
    let _ = tx.publish();
    let data = Direction::GuestToHost.data_offset(SMALL.ring_size);
    let ring = |seg: &Segment| dump(seg, data, SMALL.ring_size as usize);
    let before = ring(&seg);

    // A frame is queued but nothing is released: no room for a 1500-byte record, so the
    // frame is not read.
    let (r, w) = frame_pipe();
    rustix::io::write(&w, &packet(1, 60)).unwrap();
    assert!(matches!(
        push_from_fd(&mut tx, SMALL.max_packet, &r),
        Filled::Full
    ));
    assert!(ring(&seg) == before, "a full ring: nothing written");

    // The consumer frees 3 records: room after padding. Reads that fail write neither the
    // padding nor a record.
    rx.refresh().unwrap();
    let mut buf = vec![0; 1500];
    for _ in 0..3 {
        assert_eq!(rx.recv(&mut buf).unwrap(), Some(1000));
    }
    let _ = rx.release();
    let (empty, _peer) = frame_pipe();
    match push_from_fd(&mut tx, SMALL.max_packet, &empty) {
        Filled::Failed(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        other => panic!("expected EAGAIN, got {other:?}"),
    }
    let write_only = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let failed = tx.push_with(SMALL.max_packet, |mem, off, len| {
        mem.read_from_fd(off, len, write_only.as_fd())
    });
    assert!(matches!(failed, Ok(Filled::Failed(_))), "EBADF: {failed:?}");
    assert!(ring(&seg) == before, "failed reads: nothing written");
    assert_eq!(tx.publish(), Doorbell::Quiet, "nothing to publish");
    assert_eq!(rx.refresh(), Ok(808), "only the 800-byte record is there");

    // The queued frame still arrives whole, after the padding.
    assert!(matches!(
        push_from_fd(&mut tx, SMALL.max_packet, &r),
        Filled::Pushed(60)
    ));
    let _ = tx.publish();
    assert_eq!(rx.refresh(), Ok(808 + 264 + 8 + 64));
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(800));
    assert_eq!(rx.recv(&mut buf).unwrap(), Some(60), "after the padding");
    assert_eq!(&buf[..60], &packet(1, 60)[..]);
}

#[test]
fn frames_written_from_the_ring_to_a_descriptor_arrive_intact_and_bad_records_never_do() {
    use std::os::fd::AsFd;
    let (seg, mut tx, mut rx) = pair(SMALL, Direction::HostToGuest);
    let (tap, peer) = frame_pipe();
    let mut out = vec![0; 1500];
    let (mut sent, mut got) = (0u32, 0u32);
    // Frames of 1..=1500 bytes, about 240 laps of the 4 KiB ring: records padded at the end.
    while sent < 700 {
        let len = 1 + (sent as usize * 389) % 1500;
        if tx.push(&packet(sent, len)).unwrap() {
            sent += 1;
            continue;
        }
        let _ = tx.publish();
        rx.refresh().unwrap();
        while let Some(w) = rx
            .recv_with(|mem, off, len| (len, mem.write_to_fd(off, len, tap.as_fd())))
            .unwrap()
        {
            assert_eq!(w.1.unwrap(), w.0, "one write of the whole frame");
            let n = rustix::io::read(&peer, &mut out).unwrap();
            assert_eq!(&out[..n], &packet(got, n)[..], "frame {got}");
            got += 1;
        }
        let _ = rx.release();
    }
    let _ = tx.publish();
    rx.refresh().unwrap();
    while rx
        .recv_with(|mem, off, len| mem.write_to_fd(off, len, tap.as_fd()).unwrap())
        .unwrap()
        .is_some()
    {
        let n = rustix::io::read(&peer, &mut out).unwrap();
        assert_eq!(&out[..n], &packet(got, n)[..], "frame {got}");
        got += 1;
    }
    assert_eq!(got, sent);

    // A record longer than max_packet: an error, and nothing is written.
    tx.push(&[1; 8]).unwrap();
    let at = Direction::HostToGuest.data_offset(SMALL.ring_size)
        + (rx_position(&seg) & (SMALL.ring_size - 1)) as usize;
    let _ = tx.publish();
    seg.store_u64(at, 4000, Ordering::Relaxed);
    rx.refresh().unwrap();
    let e = rx
        .recv_with(|mem, off, len| mem.write_to_fd(off, len, tap.as_fd()))
        .unwrap_err();
    assert_eq!(why(&e), "longer than max_packet");
    assert_eq!(
        rustix::io::read(&peer, &mut out)
            .map_err(std::io::Error::from)
            .map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "nothing reached the descriptor"
    );
}

/// The producer index published in ring 0, where the next record goes.
fn rx_position(seg: &Segment) -> u32 {
    seg.load_u32(Direction::HostToGuest.producer_line(), Ordering::Relaxed)
}

/// Two threads, random packet sizes, doorbells over a channel as the session would carry them.
/// A lost wake-up shows as a timeout, a wrong byte as a mismatch.
fn two_threads(layout: Layout, sizes: Vec<usize>, batch: usize) -> (u64, u64) {
    let (_, mut tx, mut rx) = pair(layout, Direction::GuestToHost);
    let (to_consumer, consumer_bell) = mpsc::channel::<()>();
    let (to_producer, producer_bell) = mpsc::channel::<()>();
    let expected = sizes.clone();
    let wait = Duration::from_secs(10);
    let consumer = std::thread::spawn(move || {
        let mut buf = vec![0; layout.max_packet as usize];
        let mut rung = 0u64;
        let mut i = 0;
        while i < expected.len() {
            let drained = rx
                .drain(|mem, at, n| {
                    mem.read(at, &mut buf[..n]);
                    assert_eq!(&buf[..n], &packet(i as u32, expected[i])[..], "packet {i}");
                    i += 1;
                    Ok::<_, RingError>(())
                })
                .unwrap();
            if drained.doorbell == Doorbell::Ring {
                rung += 1;
                let _ = to_producer.send(());
            }
            if i < expected.len() && rx.prepare_sleep().unwrap() {
                consumer_bell
                    .recv_timeout(wait)
                    .expect("consumer woken (lost doorbell?)");
            }
        }
        rung
    });
    let mut rung = 0u64;
    for (i, &len) in sizes.iter().enumerate() {
        let p = packet(i as u32, len);
        loop {
            if tx.push(&p).unwrap() {
                break;
            }
            if tx.publish() == Doorbell::Ring {
                rung += 1;
                let _ = to_consumer.send(());
            }
            if tx.prepare_wait().unwrap() {
                producer_bell
                    .recv_timeout(wait)
                    .expect("producer woken (lost doorbell?)");
            }
        }
        if (i + 1) % batch == 0 && tx.publish() == Doorbell::Ring {
            rung += 1;
            let _ = to_consumer.send(());
        }
    }
    if tx.publish() == Doorbell::Ring {
        rung += 1;
        let _ = to_consumer.send(());
    }
    (rung, consumer.join().expect("consumer thread"))
}

#[test]
fn two_threads_bulk_rings_few_doorbells() {
    let layout = Layout::for_segment(1 << 20, 9000).unwrap();
    let n = 200_000;
    let (producer_rang, consumer_rang) = two_threads(layout, vec![64; n], 64);
    // A doorbell only when a side went to sleep: far fewer than one per packet or per batch.
    assert!(
        producer_rang + consumer_rang < (n / 64) as u64,
        "{producer_rang} + {consumer_rang} doorbells for {n} packets"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn two_threads_random_sizes(
        sizes in prop::collection::vec(0usize..=1500, 1..3000),
        batch in 1usize..40,
    ) {
        two_threads(SMALL, sizes, batch);
    }

    /// A hostile peer writes anything anywhere between the operations of both sides: every
    /// call returns (an error or a value), nothing panics, nothing is read outside the segment
    /// (the segment's own bounds check would panic), and a packet delivered before the first
    /// corruption is intact.
    #[test]
    fn corruption_gives_errors_not_panics(
        ops in prop::collection::vec((0u8..7, 0usize..12288, any::<u64>()), 1..400),
    ) {
        let (mem, mut tx, mut rx) = pair(SMALL, Direction::HostToGuest);
        let mut buf = vec![0; 1500];
        let mut clean = true;
        let mut sent = 0u32;
        let mut got = 0u32;
        for (op, off, value) in ops {
            let r = match op {
                0 => tx.push(&packet(sent, (value % 1501) as usize)).map(|ok| { sent += u32::from(ok); }),
                1 => { let _ = tx.publish(); Ok(()) }
                2 => rx.refresh().map(drop),
                3 => rx.recv(&mut buf).map(|r| {
                    if let (Some(n), true) = (r, clean) {
                        assert_eq!(&buf[..n], &packet(got, n)[..]);
                        got += 1;
                    }
                }),
                4 => { let _ = rx.release(); rx.prepare_sleep().map(drop) }
                5 => rx.drain(|m, at, n| {
                    m.read(at, &mut buf[..n]);
                    if clean {
                        assert_eq!(&buf[..n], &packet(got, n)[..]);
                        got += 1;
                    }
                    Ok::<_, RingError>(())
                }).map(drop),
                _ => {
                    clean = false;
                    let off = off & !7;
                    mem.store_u64(off, value, Ordering::Relaxed);
                    Ok(())
                }
            };
            if r.is_err() {
                prop_assert!(!clean, "error without corruption: {r:?}");
                return Ok(());
            }
        }
    }
}

/// Ring 1 with `prod` and one record header written by a hostile producer, then what the
/// consumer says.
fn consume_hostile(start: u32, prod: u32, header: Option<(u32, u32)>) -> RingError {
    let (seg, _, rx) = pair(SMALL, Direction::GuestToHost);
    let dir = Direction::GuestToHost;
    let mut rx = rx.starting_at(start);
    if let Some((len, kind)) = header {
        let at = dir.data_offset(SMALL.ring_size) + (start % SMALL.ring_size) as usize;
        seg.store_u64(
            at,
            u64::from(len) | u64::from(kind) << 32,
            Ordering::Relaxed,
        );
    }
    seg.store_u32(dir.producer_line(), prod, Ordering::Release);
    let mut buf = vec![0; 1500];
    match rx.refresh() {
        Err(e) => e,
        Ok(_) => match rx.recv(&mut buf) {
            Err(e) => e,
            Ok(r) => panic!("start {start} prod {prod} {header:?}: {r:?}, not an error"),
        },
    }
}

fn why(e: &RingError) -> &'static str {
    match e {
        RingError::BadProducerIndex { why, .. }
        | RingError::BadConsumerIndex { why, .. }
        | RingError::BadRecord { why, .. }
        | RingError::BadHeader { why, .. } => why,
        _ => "",
    }
}

#[test]
fn hostile_producer_index_and_records_are_link_errors() {
    // (consumer index, producer index, record header (len, kind), expected rule)
    type Case = (u32, u32, Option<(u32, u32)>, &'static str);
    let cases: &[Case] = &[
        (0, 5, None, "not a multiple of 8"),
        (0, 4096 + 8, None, "more than a ring ahead"),
        (0, u32::MAX - 7, None, "more than a ring ahead"),
        (0, 2048, Some((1501, KIND_PACKET)), "longer than max_packet"),
        (
            0,
            2048,
            Some((u32::MAX, KIND_PACKET)),
            "longer than max_packet",
        ),
        (
            0,
            16,
            Some((100, KIND_PACKET)),
            "runs past the producer index",
        ),
        (
            4088,
            4088 + 1032,
            Some((1024, KIND_PACKET)),
            "runs past the end of the data area",
        ),
        (
            4080,
            4080 + 64,
            Some((0, KIND_PAD)),
            "padding must reach the end of the data area",
        ),
        (
            0,
            64,
            Some((4088, KIND_PAD)),
            "padding runs past the producer index",
        ),
        (0, 64, Some((8, 7)), "unknown kind"),
    ];
    for &(start, prod, header, expected) in cases {
        let e = consume_hostile(start, prod, header);
        assert_eq!(
            why(&e),
            expected,
            "start {start} prod {prod} {header:?}: {e}"
        );
        assert!(e.to_string().contains("guest-to-host ring"), "{e}");
    }
}

#[test]
fn a_producer_index_that_moves_backwards_is_an_error() {
    let (seg, mut tx, mut rx) = pair(SMALL, Direction::HostToGuest);
    tx.push(&[1; 100]).unwrap();
    tx.push(&[2; 100]).unwrap();
    let _ = tx.publish();
    assert_eq!(rx.refresh(), Ok(2 * 112));
    seg.store_u32(
        Direction::HostToGuest.producer_line(),
        112,
        Ordering::Relaxed,
    );
    assert_eq!(why(&rx.refresh().unwrap_err()), "moved backwards");
}

#[test]
fn hostile_consumer_index_is_an_error_for_the_producer() {
    for (cons, expected) in [
        (12, "not a multiple of 8"),
        (8192, "moved backwards or past the published producer index"),
        (
            u32::MAX - 7,
            "moved backwards or past the published producer index",
        ),
    ] {
        let (seg, mut tx, _) = pair(SMALL, Direction::GuestToHost);
        while tx.push(&[9; 1000]).unwrap() {}
        let _ = tx.publish();
        seg.store_u32(
            Direction::GuestToHost.consumer_line(),
            cons,
            Ordering::Relaxed,
        );
        let e = tx.push(&[9; 1000]).unwrap_err();
        assert_eq!(why(&e), expected, "cons {cons}: {e}");
    }
}

#[test]
fn a_header_changed_under_traffic_is_an_error() {
    let (seg, mut tx, mut rx) = pair(SMALL, Direction::HostToGuest);
    tx.push(b"x").unwrap();
    let _ = tx.publish();
    seg.store_u32(8, 2, Ordering::Relaxed);
    assert_eq!(
        rx.refresh(),
        Err(RingError::HeaderChanged {
            magic: MAGIC,
            version: 2
        })
    );
}

#[test]
fn a_size_changed_under_traffic_is_an_error_naming_the_field() {
    for (off, field, wide) in [
        (16, "segment_size", true),
        (24, "ring_size", false),
        (28, "max_packet", false),
    ] {
        let (seg, mut tx, mut rx) = pair(SMALL, Direction::GuestToHost);
        tx.push(b"x").unwrap();
        let _ = tx.publish();
        if wide {
            seg.store_u64(off, u64::MAX, Ordering::Relaxed);
        } else {
            seg.store_u32(off, u32::MAX, Ordering::Relaxed);
        }
        let found = if wide { u64::MAX } else { u32::MAX.into() };
        let e = rx.refresh().unwrap_err();
        assert!(
            matches!(e, RingError::SizeChanged { field: f, found: v, .. } if f == field && v == found),
            "{field}: {e}"
        );
        assert!(e.to_string().contains(field), "{e}");
    }
}

/// Small writes take word stores and larger ones memcpy; at aligned and unaligned offsets, each
/// length lands exactly: the bytes written read back, the bytes around them are untouched.
#[test]
fn segment_writes_of_every_small_length_land_exactly() {
    let seg = Segment::heap(4096);
    for off in [8usize, 64, 13, 4089 - 300] {
        for len in 0..=300usize {
            seg.write(0, &[0xee; 4096]);
            let src: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            seg.write(off, &src);
            let mut all = vec![0; 4096];
            seg.read(0, &mut all);
            assert_eq!(&all[off..off + len], &src[..], "off {off} len {len}");
            assert!(
                all[..off].iter().all(|&b| b == 0xee),
                "before: off {off} len {len}"
            );
            assert!(
                all[off + len..].iter().all(|&b| b == 0xee),
                "after: off {off} len {len}"
            );
        }
    }
}

#[test]
fn bad_headers_are_refused_when_attaching() {
    let fresh = || {
        let seg = Segment::heap(SMALL.segment_size as usize);
        SMALL.initialize(&seg).unwrap();
        seg
    };
    let seg = fresh();
    seg.store_u64(0, 0x1234, Ordering::Relaxed);
    assert_eq!(
        Layout::read(&seg),
        Err(RingError::BadMagic { found: 0x1234 })
    );
    let seg = fresh();
    seg.store_u32(8, 9, Ordering::Relaxed);
    assert_eq!(Layout::read(&seg), Err(RingError::BadVersion { found: 9 }));
    for (off, value, field) in [
        (12, 1u32, "flags"),
        (24, 6000, "ring_size"),
        (24, 2048, "ring_size"),
        (24, 8192, "segment_size"),
        (28, 0, "max_packet"),
        (28, 2041, "max_packet"),
    ] {
        let seg = fresh();
        seg.store_u32(off, value, Ordering::Relaxed);
        match Layout::read(&seg) {
            Err(RingError::BadHeader { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field} = {value}: {other:?}"),
        }
    }
    let seg = fresh();
    seg.store_u64(16, 1 << 40, Ordering::Relaxed);
    assert!(matches!(
        Layout::read(&seg),
        Err(RingError::SegmentTooSmall { .. })
    ));
    assert!(matches!(
        Layout::read(&Segment::heap(100)),
        Err(RingError::SegmentTooSmall { .. })
    ));
}

/// A segment whose data-area words turn to garbage once they have been read: a consumer that
/// read a record header or payload twice (check, then use) would see the garbage.
struct PoisonAfterRead(Segment);

impl PoisonAfterRead {
    fn poison(&self, off: usize, len: usize) {
        if off >= DATA_OFFSET {
            self.0.write(off, &vec![0xff; len]);
        }
    }
}

impl Memory for PoisonAfterRead {
    fn size(&self) -> usize {
        self.0.size()
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        let v = self.0.load_u32(off, order);
        self.poison(off, 4);
        v
    }
    fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        let v = self.0.load_u64(off, order);
        self.poison(off, 8);
        v
    }
    fn store_u32(&self, off: usize, value: u32, order: Ordering) {
        self.0.store_u32(off, value, order)
    }
    fn store_u64(&self, off: usize, value: u64, order: Ordering) {
        self.0.store_u64(off, value, order)
    }
    fn read(&self, off: usize, dst: &mut [u8]) {
        self.0.read(off, dst);
        self.poison(off, dst.len());
    }
    fn write(&self, off: usize, src: &[u8]) {
        self.0.write(off, src)
    }
}

#[test]
fn the_consumer_reads_each_record_once() {
    let seg = Arc::new(PoisonAfterRead(Segment::heap(SMALL.segment_size as usize)));
    SMALL.initialize(&seg).unwrap();
    let dir = Direction::HostToGuest;
    let mut tx = Producer::new(seg.clone(), SMALL, dir);
    let mut rx = Consumer::new(seg, SMALL, dir);
    let mut buf = vec![0; 1500];
    let mut got = 0;
    for i in 0..500u32 {
        let len = (i as usize * 131) % 1501;
        while !tx.push(&packet(i, len)).unwrap() {
            let _ = tx.publish();
            rx.refresh().unwrap();
            while let Some(n) = rx.recv(&mut buf).unwrap() {
                assert_eq!(&buf[..n], &packet(got, n)[..], "packet {got}");
                got += 1;
            }
            let _ = rx.release();
        }
    }
    let _ = tx.publish();
    rx.refresh().unwrap();
    while let Some(n) = rx.recv(&mut buf).unwrap() {
        assert_eq!(&buf[..n], &packet(got, n)[..], "packet {got}");
        got += 1;
    }
    assert_eq!(got, 500);
}

fn setup() -> super::Setup {
    super::Setup {
        version: super::PROTOCOL_VERSION,
        segment_size: SMALL.segment_size,
        // With the Ethernet and vnet headers, within SMALL's max_packet of 1500.
        mtu: 1400,
        guest_mac: "52:54:00:12:34:56".into(),
        host_mac: "52:54:00:12:34:57".into(),
        guest_address: Some("10.9.0.2/24".into()),
        vnet_hdr: true,
    }
}

#[test]
fn channel_messages_round_trip_split_anywhere() {
    use super::*;
    let host = vec![
        HostMsg::Setup(setup()),
        HostMsg::Doorbell,
        HostMsg::Packet(Bytes::from(vec![0x11; MAX_PACKET as usize])),
        HostMsg::Reset("guest-to-host ring: bad".into()),
    ];
    let guest = vec![
        GuestMsg::Ready(Ready {
            mode: Mode::Channel,
            reason: Some("no ivshmem device".into()),
        }),
        GuestMsg::Doorbell,
        GuestMsg::Packet(Bytes::from_static(b"\x00frame")),
        GuestMsg::Reset("x".into()),
    ];
    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(msgs: &[M]) {
        let mut wire = Vec::new();
        for m in msgs {
            m.encode(&mut wire).unwrap();
        }
        let mut dec = Decoder::<M>::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(4093) {
            dec.push(chunk).unwrap();
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }
    round_trip(&host);
    round_trip(&guest);
    let mut wire = Vec::new();
    GuestMsg::Doorbell.encode(&mut wire).unwrap();
    assert_eq!(wire, [0x82, 0, 0, 0, 0], "a doorbell is 5 bytes");
}

/// A `Ready` at the size limit that leaves `reason` out (allowed, docs/devices/fastnet.md)
/// decodes, and its encoding is no longer than what came: the records fuzz target re-encodes
/// every decoded message and needs that.
#[test]
fn a_ready_without_its_null_reason_re_encodes_within_the_limit() {
    use super::*;
    let mut body = br#"{"mode":"channel"}"#.to_vec();
    body.resize(MAX_CONTROL, b' ');
    let mut wire = vec![0x81];
    wire.extend_from_slice(&(body.len() as u32).to_le_bytes());
    wire.extend_from_slice(&body);
    let mut dec = Decoder::<GuestMsg>::new();
    dec.push(&wire).unwrap();
    let m = dec.next_message().unwrap().unwrap();
    assert_eq!(
        m,
        GuestMsg::Ready(Ready {
            mode: Mode::Channel,
            reason: None
        })
    );
    assert_eq!(
        m.to_bytes().unwrap(),
        b"\x81\x12\0\0\0{\"mode\":\"channel\"}"
    );
}

#[test]
fn hostile_channel_messages_are_refused_before_buffering() {
    use super::*;
    let mut dec = Decoder::<GuestMsg>::new();
    dec.push(&[0x83, 0x41, 0x00, 0x01, 0x00]).unwrap();
    assert!(matches!(
        dec.next_message(),
        Err(RecordError::TooLong { kind: "Packet", .. })
    ));
    let mut dec = Decoder::<GuestMsg>::new();
    dec.push(&[0x01, 0, 0, 0, 0]).unwrap();
    assert_eq!(
        dec.next_message(),
        Err(RecordError::UnknownType(0x01)),
        "Setup is the host's"
    );
    let mut dec = Decoder::<GuestMsg>::new();
    dec.push(&[0x82, 1, 0, 0, 0, 9]).unwrap();
    assert!(matches!(
        dec.next_message(),
        Err(RecordError::TooLong { .. })
    ));
    let mut dec = Decoder::<GuestMsg>::new();
    dec.push(&[0x81, 2, 0, 0, 0, b'{', b'x']).unwrap();
    assert!(matches!(
        dec.next_message(),
        Err(RecordError::Malformed { .. })
    ));
}

#[test]
fn the_mode_falls_back_to_the_channel_with_a_reason() {
    use super::*;
    let seg = Segment::heap(SMALL.segment_size as usize);
    SMALL.initialize(&seg).unwrap();
    let ok = choose_mode(
        &setup(),
        Found::Segment(SMALL.segment_size, Layout::read(&seg)),
    );
    assert_eq!(
        ok,
        Ready {
            mode: Mode::SharedMemory,
            reason: None
        }
    );
    let cases = [
        (
            Setup {
                segment_size: 0,
                ..setup()
            },
            Found::Segment(SMALL.segment_size, Layout::read(&seg)),
            "offers no shared segment",
        ),
        (
            setup(),
            Found::Nothing("no ivshmem device 1af4:1110".into()),
            "no ivshmem",
        ),
        (
            setup(),
            Found::Segment(1 << 20, Layout::read(&seg)),
            "has 1048576 bytes, the host mapped 12288",
        ),
        (
            setup(),
            Found::Segment(SMALL.segment_size, Err(RingError::BadMagic { found: 0 })),
            "segment magic",
        ),
        (
            Setup {
                mtu: 9000,
                ..setup()
            },
            Found::Segment(SMALL.segment_size, Layout::read(&seg)),
            "too small for MTU 9000",
        ),
    ];
    for (s, found, reason) in cases {
        let r = choose_mode(&s, found);
        assert_eq!(r.mode, Mode::Channel);
        let got = r.reason.unwrap();
        assert!(got.contains(reason), "{got:?} lacks {reason:?}");
    }
}

/// The host's segment file mapped twice, as vstreamd and QEMU (for the guest) map it: packets
/// pushed through one mapping arrive through the other, and a guest mapping that is too small
/// is refused.
#[test]
fn two_mappings_of_one_segment_file() {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let path = dir.path().join("guest.fastnet");
    let layout = Layout::for_segment(1 << 20, 9000).unwrap();
    assert_eq!(
        layout.ring_size,
        256 << 10,
        "the largest power of two that fits"
    );
    let host = Segment::create_file(&path, layout.segment_size).unwrap();
    layout.initialize(&host).unwrap();
    let guest = Segment::open_file(&path).unwrap();
    assert_eq!(Layout::read(&guest), Ok(layout));
    let mut tx = Producer::new(&guest, layout, Direction::GuestToHost);
    let mut rx = Consumer::new(&host, layout, Direction::GuestToHost);
    for i in 0..10 {
        assert!(tx.push(&packet(i, 9000)).unwrap());
    }
    let _ = tx.publish();
    rx.refresh().unwrap();
    let mut buf = vec![0; 9000];
    for i in 0..10 {
        assert_eq!(rx.recv(&mut buf).unwrap(), Some(9000));
        assert_eq!(buf, packet(i, 9000));
    }
    std::fs::write(dir.path().join("tiny"), [0u8; 100]).unwrap();
    assert!(Segment::open_file(&dir.path().join("tiny")).is_err());
    // The VMM may create the file first: the host maps it as it is, never truncated (the
    // packets published above are still there), and refuses a file of another size.
    let again = Segment::create_file(&path, layout.segment_size).unwrap();
    assert_eq!(Layout::read(&again), Ok(layout));
    let err = Segment::create_file(&path, 2 << 20)
        .err()
        .expect("size mismatch");
    assert!(err.to_string().contains("configured with 2097152"), "{err}");
}

/// A hostile peer on a third thread overwrites the index lines and the header while two
/// threads move packets: each side stops at its first error (a `RingError`, no panic), no side
/// hangs (a side that sleeps wakes on a doorbell or a timeout and looks again), and every
/// packet delivered before the first error is intact.
#[test]
fn corruption_while_traffic_flows_stops_both_sides_with_errors() {
    use std::sync::atomic::AtomicBool;
    let layout = Layout::for_segment(1 << 20, 9000).unwrap();
    for round in 0u64..8 {
        let (seg, mut tx, mut rx) = pair(layout, Direction::GuestToHost);
        let stop = Arc::new(AtomicBool::new(false));
        let consumer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0; 9000];
                let mut i = 0u32;
                loop {
                    rx.refresh()?;
                    loop {
                        match rx.recv(&mut buf) {
                            Ok(Some(n)) => {
                                // Lengths come from validated records; contents may be the
                                // attacker's once it has written the producer index.
                                assert!(n <= 9000);
                                i += 1;
                            }
                            Ok(None) => break,
                            Err(e) => return Err(e),
                        }
                    }
                    let _ = rx.release();
                    if stop.load(Ordering::Relaxed) {
                        return Ok(i);
                    }
                    std::thread::yield_now();
                }
            })
        };
        let attacker = {
            let seg = seg.clone();
            std::thread::spawn(move || {
                let dir = Direction::GuestToHost;
                let targets = [dir.producer_line(), dir.consumer_line(), 0, 8, 24];
                let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(round + 1);
                std::thread::sleep(Duration::from_millis(20));
                for _ in 0..200 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = targets[(x % targets.len() as u64) as usize];
                    seg.store_u64(off, x, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let mut seq = 0u32;
        let producer_error = loop {
            match tx.push(&packet(seq, (seq as usize * 37) % 9001)) {
                Ok(true) => seq += 1,
                Ok(false) => {
                    let _ = tx.publish();
                    match tx.prepare_wait() {
                        Ok(_) => std::thread::yield_now(),
                        Err(e) => break Some(e),
                    }
                }
                Err(e) => break Some(e),
            }
            if seq.is_multiple_of(16) {
                let _ = tx.publish();
            }
            if attacker.is_finished() {
                break None;
            }
        };
        attacker.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let consumer = consumer.join().expect("the consumer returns, no panic");
        assert!(
            producer_error.is_some() || consumer.is_err(),
            "round {round}: 200 hostile writes and neither side noticed"
        );
        if let Err(e) = consumer {
            // The message names the ring and the rule, for the log.
            let text = e.to_string();
            assert!(
                text.contains("guest-to-host ring") || text.contains("header"),
                "{text}"
            );
        }
    }
}

/// A network namespace for one test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let name = format!("{name}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip").args(args).status();
    assert!(st.is_ok_and(|s| s.success()), "ip {args:?}");
}

/// The TAP with vnet headers in a fresh namespace: an ARP request written with a 12-byte vnet
/// header in front gets the kernel's ARP reply back, also behind a vnet header. Needs root
/// (CAP_NET_ADMIN) and iproute2, as the lab's network tests do.
#[tokio::test]
async fn tap_with_vnet_headers_carries_frames_both_ways() {
    use super::tap::{self, VNET_HDR_LEN};
    let ns = Netns::new("vs-fastnet-tap");
    let path = crate::tun::netns_path(&ns.0);
    let tap = tap::create(Some(&path), "fnt0").expect("create the TAP (root?)");
    ip(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", "fnt0"]);
    ip(&["-n", &ns.0, "link", "set", "fnt0", "up"]);
    let me = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    let mut req = vec![0u8; VNET_HDR_LEN]; // no offload: flags 0, GSO none
    req.extend_from_slice(&[0xff; 6]); // to: broadcast
    req.extend_from_slice(&me);
    req.extend_from_slice(&[0x08, 0x06]); // ARP
    req.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    req.extend_from_slice(&me);
    req.extend_from_slice(&[10, 77, 0, 2]);
    req.extend_from_slice(&[0; 6]);
    req.extend_from_slice(&[10, 77, 0, 1]);
    tap.send(&req).expect("write a frame");
    let mut buf = vec![0u8; 65536 + 64];
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = tap.recv(&mut buf).await.expect("read a frame");
            let frame = &buf[VNET_HDR_LEN..n];
            // The kernel may also send IPv6 router solicitations on a new link: skip them.
            if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                return (buf[..VNET_HDR_LEN].to_vec(), frame.to_vec());
            }
        }
    })
    .await
    .expect("an ARP reply within 5 s");
    let (hdr, frame) = reply;
    assert_eq!(hdr[0], 0, "no checksum offload flags on an ARP reply");
    assert_eq!(hdr[1], 0, "GSO none");
    assert_eq!(&frame[..6], &me, "to the asker");
    assert_eq!(
        &frame[28..32],
        &[10, 77, 0, 1],
        "sender IP is the TAP's address"
    );
    assert_eq!(&frame[32..38], &me, "target MAC");
}

fn arp_request(me: [u8; 6]) -> Vec<u8> {
    let mut req = vec![0u8; super::tap::VNET_HDR_LEN];
    req.extend_from_slice(&[0xff; 6]);
    req.extend_from_slice(&me);
    req.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    req.extend_from_slice(&me);
    req.extend_from_slice(&[10, 77, 0, 2]);
    req.extend_from_slice(&[0; 6]);
    req.extend_from_slice(&[10, 77, 0, 1]);
    req
}

fn is_arp_reply(p: &[u8]) -> bool {
    let f = &p[super::tap::VNET_HDR_LEN..];
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == [10, 77, 0, 1]
}

/// vstreamd's end in a fresh namespace with a real TAP; the test plays the guest on the other
/// end of the channel (a byte pipe), in `mode`, and asks the host's kernel for its MAC (ARP).
struct FakeGuest {
    io: tokio::io::DuplexStream,
    dec: super::Decoder<super::HostMsg>,
    buf: Vec<u8>,
}

impl FakeGuest {
    async fn next(&mut self) -> super::HostMsg {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(m) = self.dec.next_message().unwrap() {
                return m;
            }
            let n = self.io.read(&mut self.buf).await.unwrap();
            assert!(n > 0, "the host ended the channel");
            self.dec.push(&self.buf[..n]).unwrap();
        }
    }
}

async fn host_end_answers_arp(mode: super::Mode) {
    use super::*;
    use tokio::io::AsyncWriteExt;
    let ns = Netns::new(&format!("vs-fastnet-{mode:?}"));
    let path = crate::tun::netns_path(&ns.0);
    let tap = tap::create(Some(&path), "fnh0").expect("create the TAP (root?)");
    ip(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", "fnh0"]);
    ip(&["-n", &ns.0, "link", "set", "fnh0", "up"]);
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let seg = Arc::new(Segment::create_file(&dir.path().join("g"), 1 << 20).unwrap());
    let s = Setup {
        segment_size: 1 << 20,
        ..setup()
    };
    let (host_side, guest) = tokio::io::duplex(1 << 20);
    let host = tokio::spawn(async move {
        let stats = host::Stats::default();
        let poll_for = Duration::from_millis(4);
        let r = host::run(host_side, &tap, s, Some(seg), false, &stats, poll_for).await;
        (r, stats)
    });
    let mut g = FakeGuest {
        io: guest,
        dec: Decoder::new(),
        buf: vec![0; 1 << 16],
    };
    let HostMsg::Setup(got) = g.next().await else {
        panic!("Setup first")
    };
    let me = [0x52, 0x54, 0, 1, 2, 3];
    let mut out = Vec::new();
    GuestMsg::Ready(Ready { mode, reason: None })
        .encode(&mut out)
        .unwrap();
    match mode {
        Mode::Channel => {
            GuestMsg::Packet(arp_request(me).into())
                .encode(&mut out)
                .unwrap();
            g.io.write_all(&out).await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if let HostMsg::Packet(p) = g.next().await {
                        if is_arp_reply(&p) {
                            return p;
                        }
                    }
                }
            })
            .await
            .expect("ARP reply on the channel");
            assert_eq!(&reply[12..18], &me);
        }
        Mode::SharedMemory => {
            let gseg = Segment::open_file(&dir.path().join("g")).unwrap();
            g.io.write_all(&out).await.unwrap();
            // The host initialised the header before it sent Setup.
            let layout = Layout::read(&gseg).unwrap();
            assert_eq!(layout.segment_size, got.segment_size);
            let mut tx = Producer::new(&gseg, layout, Direction::GuestToHost);
            let mut rx = Consumer::new(&gseg, layout, Direction::HostToGuest);
            // A frame whose vnet header would make the host's kernel cut it into 1-byte
            // segments: dropped and counted, and the link goes on.
            let mut hostile = tcp_frame(4000);
            hostile[4..6].copy_from_slice(&1u16.to_le_bytes());
            assert!(tx.push(&hostile).unwrap());
            assert!(tx.push(&arp_request(me)).unwrap());
            if tx.publish() == Doorbell::Ring {
                out.clear();
                GuestMsg::Doorbell.encode(&mut out).unwrap();
                g.io.write_all(&out).await.unwrap();
            }
            let mut p = vec![0u8; layout.max_packet as usize];
            let reply = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    assert_eq!(g.next().await, HostMsg::Doorbell);
                    rx.refresh().unwrap();
                    while let Some(n) = rx.recv(&mut p).unwrap() {
                        if is_arp_reply(&p[..n]) {
                            return p[..n].to_vec();
                        }
                    }
                    let _ = rx.release();
                    assert!(rx.prepare_sleep().unwrap());
                }
            })
            .await
            .expect("ARP reply in the ring, after a doorbell");
            assert_eq!(&reply[12..18], &me);
            // Right after traffic the host polls its rings: a request published then needs no
            // doorbell and is answered all the same. (A loaded machine may delay this side
            // past the host's polling time, so a few tries; without polling, none is quiet.)
            let mut answered_unrung = false;
            for _ in 0..20 {
                // Let the host's task (on this test's one thread) finish its turn and decide
                // between sleeping and polling before the request is published.
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                assert!(tx.push(&arp_request(me)).unwrap());
                let _ = rx.release();
                assert!(rx.prepare_sleep().unwrap(), "nothing published yet");
                let quiet = tx.publish() == Doorbell::Quiet;
                if !quiet {
                    out.clear();
                    GuestMsg::Doorbell.encode(&mut out).unwrap();
                    g.io.write_all(&out).await.unwrap();
                }
                tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        assert_eq!(g.next().await, HostMsg::Doorbell);
                        rx.refresh().unwrap();
                        while let Some(n) = rx.recv(&mut p).unwrap() {
                            if is_arp_reply(&p[..n]) {
                                return;
                            }
                        }
                        let _ = rx.release();
                        assert!(rx.prepare_sleep().unwrap());
                    }
                })
                .await
                .expect("ARP reply in the ring");
                if quiet {
                    answered_unrung = true;
                    break;
                }
            }
            assert!(answered_unrung, "the host never polled after traffic");
            // Idle past its polling time, the host sleeps: the next request rings.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = rx.release();
            assert!(tx.push(&arp_request(me)).unwrap());
            assert_eq!(tx.publish(), Doorbell::Ring, "an idle host should sleep");
            // A hostile guest: its producer index jumps beyond the ring.
            gseg.store_u32(Direction::GuestToHost.producer_line(), 3, Ordering::Release);
            out.clear();
            GuestMsg::Doorbell.encode(&mut out).unwrap();
            g.io.write_all(&out).await.unwrap();
            let reset = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if let HostMsg::Reset(why) = g.next().await {
                        return why;
                    }
                }
            })
            .await
            .expect("a Reset with the reason");
            assert!(
                reset.contains("guest-to-host ring: producer index 3"),
                "{reset}"
            );
            let (r, stats) = host.await.unwrap();
            assert!(matches!(r, Err(host::LinkError::Ring(_))), "{r:?}");
            let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            assert!(
                count(&stats.packets_in) >= 1 && count(&stats.packets_out) >= 1,
                "{stats:?}"
            );
            assert_eq!(stats.snapshot().mode, Some(Mode::SharedMemory), "{stats:?}");
            assert_eq!(stats.snapshot().dropped_invalid, 1, "{stats:?}");
            return;
        }
    }
    host.abort();
}

#[tokio::test]
async fn host_end_channel_mode_moves_frames_between_tap_and_channel() {
    host_end_answers_arp(super::Mode::Channel).await;
}

#[tokio::test]
async fn host_end_shared_memory_moves_frames_with_doorbells_and_resets_on_a_bad_index() {
    host_end_answers_arp(super::Mode::SharedMemory).await;
}

/// The agent's search for the segment, on a directory laid out as /sys/bus/pci/devices (a
/// virtio-net device, an ivshmem device whose resource2 is a real segment file) and on a tree
/// without the device.
#[test]
fn the_guest_finds_the_ivshmem_bar_by_pci_id() {
    use super::{choose_mode, guest, Mode};
    let dir = tempfile::tempdir().unwrap();
    let dev = |addr: &str, vendor: &str, device: &str| {
        let d = dir.path().join(addr);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
        d
    };
    dev("0000:00:02.0", "0x1af4", "0x1000");
    let (found, seg) = guest::find_segment(dir.path());
    assert!(seg.is_none());
    let ready = choose_mode(&setup(), found);
    assert_eq!(ready.mode, Mode::Channel);
    assert!(ready
        .reason
        .unwrap()
        .contains("no ivshmem-plain device (PCI 1af4:1110)"));

    let d = dev("0000:00:05.0", "0x1af4", "0x1110");
    let host = Segment::create_file(&d.join("resource2"), SMALL.segment_size).unwrap();
    SMALL.initialize(&host).unwrap();
    assert_eq!(guest::ivshmem_bars(dir.path()), vec![d.join("resource2")]);
    let (found, seg) = guest::find_segment(dir.path());
    assert!(seg.is_some());
    assert_eq!(
        choose_mode(&setup(), found),
        super::Ready {
            mode: Mode::SharedMemory,
            reason: None
        }
    );
}

/// `[guest.fastnet]`: shm needs a segment, a segment is refused in channel mode, and the size
/// must be a power of two that holds the largest packet; the messages say what to write.
#[test]
fn the_segment_settings_are_checked() {
    use crate::registry::Device;
    use serde_json::json;
    let check = |extra: serde_json::Value| {
        let mut value = json!({"tap": "vsfn0"});
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        super::device::FastnetDevice
            .check(Some(&value), None)
            .map_err(|e| e.to_string())
    };
    let seg = "/dev/shm/g";
    assert_eq!(check(json!({"mode": "shm", "segment": seg})), Ok(()));
    assert_eq!(
        check(json!({"segment": seg, "segment_size": 16 << 20})),
        Ok(())
    );
    let refused = [
        (json!({"mode": "shm"}), "needs segment"),
        (json!({"mode": "channel", "segment": seg}), "unused"),
        (
            json!({"segment": seg, "segment_size": 3_000_000}),
            "power of two",
        ),
        (
            json!({"segment": seg, "segment_size": 512 << 10}),
            "at least 1 MiB",
        ),
    ];
    for (extra, why) in refused {
        let err = check(extra.clone()).expect_err(&extra.to_string());
        assert!(err.contains(why), "{extra}: {err}");
    }
}

/// A TCP/IPv4 GSO frame as a guest's TAP hands it over: vnet header (NEEDS_CSUM, TCPV4,
/// gso_size 1448, checksum at the TCP header's offset 16), Ethernet, IPv4, TCP, `payload`
/// bytes.
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; super::tap::VNET_HDR_LEN];
    f[0] = 1;
    f[1] = 1;
    f[2..4].copy_from_slice(&66u16.to_le_bytes());
    f[4..6].copy_from_slice(&1448u16.to_le_bytes());
    f[6..8].copy_from_slice(&34u16.to_le_bytes());
    f[8..10].copy_from_slice(&16u16.to_le_bytes());
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00]);
    f.extend_from_slice(&[0x45; 20]);
    f.extend_from_slice(&[0; 32]);
    f.resize(f.len() + payload, 0xab);
    f
}

#[test]
fn vnet_headers_from_the_guest_are_checked_field_by_field() {
    use super::vnet::{check, VnetError};
    let good = tcp_frame(65000);
    assert_eq!(check(&good), Ok(()));
    // A plain frame (no offload) and one with DATA_VALID pass.
    let mut plain = tcp_frame(100);
    plain[..10].fill(0);
    assert_eq!(check(&plain), Ok(()));
    plain[0] = 2;
    assert_eq!(check(&plain), Ok(()));
    // A VLAN-tagged TSO frame: the ethertype behind the tag counts.
    let mut vlan = good.clone();
    vlan.splice(24..24, [0x81, 0x00, 0x00, 0x05]);
    assert_eq!(check(&vlan), Ok(()));

    let with = |at: usize, bytes: &[u8]| {
        let mut f = good.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        check(&f)
    };
    let len = good.len() - super::tap::VNET_HDR_LEN;
    assert_eq!(check(&good[..25]), Err(VnetError::Short(25)));
    assert_eq!(with(0, &[0x05]), Err(VnetError::Flags(0x05)));
    assert_eq!(with(0, &[0]), Err(VnetError::GsoWithoutCsum));
    // UDP fragmentation offload was never negotiated; TCPv6 on an IPv4 frame lies.
    for gso_type in [3u8, 5, 4, 0x83, 0x7f] {
        assert!(
            matches!(with(1, &[gso_type]), Err(VnetError::GsoType { .. })),
            "gso_type {gso_type:#x}"
        );
    }
    assert_eq!(with(1, &[0x81]), Ok(()), "TCPv4 with ECN");
    assert!(matches!(with(1, &[0x80]), Err(VnetError::GsoType { .. })));
    assert_eq!(
        with(4, &0u16.to_le_bytes()),
        Err(VnetError::GsoSize { gso_size: 0, len })
    );
    // 64 KiB in 1024 pieces at most: gso_size 63 is too small, 64 is not.
    assert!(matches!(
        with(4, &63u16.to_le_bytes()),
        Err(VnetError::GsoSize { .. })
    ));
    assert_eq!(with(4, &64u16.to_le_bytes()), Ok(()));
    assert!(matches!(
        with(2, &u16::MAX.to_le_bytes()),
        Err(VnetError::HdrLen { .. })
    ));
    // The checksum's start inside the Ethernet header, or its field beyond the frame.
    assert!(matches!(
        with(6, &13u16.to_le_bytes()),
        Err(VnetError::Csum { .. })
    ));
    let last = u16::try_from(len - 2).unwrap();
    assert_eq!(with(6, &(last - 16).to_le_bytes()), Ok(()));
    assert!(matches!(
        with(6, &(last - 15).to_le_bytes()),
        Err(VnetError::Csum { .. })
    ));
    assert!(matches!(
        with(8, &u16::MAX.to_le_bytes()),
        Err(VnetError::Csum { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Any bytes: a verdict, never a panic; a frame that passes keeps its checksum field and
    /// its GSO segments within bounds.
    #[test]
    fn vnet_check_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if super::vnet::check(&bytes).is_ok() {
            let hdr = &bytes[..super::tap::VNET_HDR_LEN];
            let len = bytes.len() - super::tap::VNET_HDR_LEN;
            let at = |i: usize| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]]));
            prop_assert!(hdr[0] & !3 == 0);
            prop_assert!(at(2) <= len);
            if hdr[0] & 1 == 1 {
                prop_assert!(at(6) >= 14 && at(6) + at(8) + 2 <= len);
            }
            if hdr[1] != 0 {
                prop_assert!(at(4) > 0 && len.div_ceil(at(4)) <= super::vnet::MAX_GSO_SEGMENTS);
            }
        }
    }
}
