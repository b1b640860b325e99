use super::*;

fn frames(d: &mut Decoder) -> (Vec<Frame>, Vec<DecodeError>) {
    let (mut ok, mut err) = (Vec::new(), Vec::new());
    for r in d.by_ref() {
        match r {
            Ok(f) => ok.push(f),
            Err(e) => err.push(e),
        }
    }
    (ok, err)
}

#[test]
fn round_trip_byte_by_byte() {
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Data as u8, 7, 3, 9, b"hello");
    encode(&mut wire, Kind::Ack as u8, 0, 0, 4, b"");
    let mut d = Decoder::new(1024);
    let mut got = Vec::new();
    for b in &wire {
        d.push(std::slice::from_ref(b));
        got.extend(frames(&mut d).0);
    }
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].payload, &b"hello"[..]);
    assert_eq!(
        (got[0].header.channel, got[0].header.seq, got[0].header.ack),
        (7, 3, 9)
    );
    assert_eq!(got[1].header.kind, Kind::Ack as u8);
    assert_eq!(got[1].header.ack, 4);
}

#[test]
fn garbage_before_and_between_is_skipped() {
    let mut wire = b"login: \xA9garbage".to_vec();
    encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"a");
    wire.extend_from_slice(b"\xA9\x5Cxx");
    encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"b");
    let mut d = Decoder::new(1024);
    d.push(&wire);
    let (ok, err) = frames(&mut d);
    assert_eq!(
        ok.iter().map(|f| f.payload.clone()).collect::<Vec<_>>(),
        [&b"a"[..], b"b"]
    );
    assert!(err.contains(&DecodeError::BadHeader));
    assert_eq!(d.stats().frames, 2);
}

#[test]
fn corrupted_payload_is_dropped_and_next_frame_found() {
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"first frame");
    let second = wire.len();
    encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"second");
    wire[HEADER_LEN + 2] ^= 0x40;
    let mut d = Decoder::new(1024);
    d.push(&wire);
    let (ok, err) = frames(&mut d);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].header.seq, 1);
    assert!(matches!(err[0], DecodeError::BadPayload { seq: 0, .. }));
    assert!(second > 0);
}

#[test]
fn lost_bytes_inside_payload_resync_at_next_frame() {
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Data as u8, 1, 0, 0, &[7u8; 100]);
    encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"after");
    wire.drain(40..60);
    // More traffic must arrive for the truncated frame's claimed length to be reached.
    encode(&mut wire, Kind::Ping as u8, 0, 0, 0, &[0u8; 100]);
    let mut d = Decoder::new(1024);
    d.push(&wire);
    let (ok, _) = frames(&mut d);
    assert_eq!(ok[0].payload, &b"after"[..]);
    assert_eq!(ok[1].header.kind, Kind::Ping as u8);
}

#[test]
fn oversized_frame_is_skipped_without_buffering() {
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Data as u8, 5, 0, 0, &[1u8; 5000]);
    encode(&mut wire, Kind::Data as u8, 5, 1, 0, b"ok");
    let mut d = Decoder::new(1000);
    d.push(&wire[..100]);
    match d.next() {
        Some(Err(DecodeError::Oversized {
            header,
            len: 5000,
            limit: 1000,
        })) => {
            assert_eq!(header.channel, 5)
        }
        other => panic!("expected oversized, got {other:?}"),
    }
    assert_eq!(d.buffered(), 0);
    d.push(&wire[100..]);
    let (ok, _) = frames(&mut d);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].payload, &b"ok"[..]);
}

/// `next_from` is only a faster way to `push` and drain: on streams full of garbage, cut and
/// corrupted frames, oversized frames and split markers, read in random pieces, both must
/// give the same items in the same order and the same counters.
#[test]
fn next_from_decodes_exactly_like_push_and_next() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..3000 {
        let limit = [64u32, 300, 4096][case % 3];
        let mut wire = Vec::new();
        for seq in 0..rng.random_range(0..12u32) {
            match rng.random_range(0..10) {
                0 => wire.extend((0..rng.random_range(1..40)).map(|_| rng.random::<u8>())),
                1 => wire.extend_from_slice(&MAGIC[..rng.random_range(1..=2)]),
                _ => {
                    let len = rng.random_range(0..(limit as usize * 5 / 4).max(1));
                    let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    let at = wire.len();
                    encode(&mut wire, Kind::Data as u8, 1, seq, 0, &payload);
                    if rng.random_range(0..6) == 0 {
                        let i = rng.random_range(at..wire.len());
                        wire[i] ^= 1 << rng.random_range(0..8);
                    }
                    if rng.random_range(0..8) == 0 {
                        let i = rng.random_range(at..wire.len());
                        wire.truncate(i);
                    }
                }
            }
        }
        let mut cuts: Vec<usize> = (0..rng.random_range(0..6))
            .map(|_| rng.random_range(0..=wire.len()))
            .collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let (mut classic, mut fast) = (Decoder::new(limit), Decoder::new(limit));
        let mut pool = BufferPool::new(limit as usize);
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut from = 0;
        for to in cuts {
            classic.push(&wire[from..to]);
            want.extend(classic.by_ref());
            let mut input = &wire[from..to];
            while let Some(item) = fast.next_from(&mut input, &mut pool) {
                got.push(item);
            }
            assert!(input.is_empty());
            from = to;
        }
        assert_eq!(got, want, "case {case}");
        assert_eq!(fast.stats(), classic.stats(), "case {case}");
        assert_eq!(fast.buffered(), classic.buffered(), "case {case}");
    }
}

#[test]
fn buffer_pool_reuses_buffers_and_frees_what_idles() {
    let mut pool = BufferPool::new(1000);
    let payloads: Vec<Bytes> = (0..20).map(|_| pool.copy(&[7u8; 900])).collect();
    let last = payloads[19].as_ptr();
    assert_eq!(
        pool.copy(&[1u8; 10]).len(),
        10,
        "small payloads are not pooled"
    );
    let shared = payloads[1].clone();
    for p in payloads {
        pool.recycle(p);
    }
    assert_eq!(
        pool.spare(),
        19,
        "a payload still referenced is not recycled"
    );
    let again = pool.copy(&[9u8; 1000]);
    assert_eq!(&again[..], &[9u8; 1000][..]);
    assert_eq!(
        again.as_ptr(),
        last,
        "the last buffer recycled is reused first"
    );
    assert_eq!(pool.spare(), 18);
    // As `recv_bytes` hands a payload to the application, whose task drops it later.
    drop(shared);
    assert_eq!(
        pool.spare(),
        19,
        "a received payload's buffer returns when its last view is dropped"
    );
    pool.trim(); // Every buffer was in use at some point of this period: all stay.
    assert_eq!(pool.spare(), 19);
    pool.trim(); // None was needed during the last period.
    assert_eq!(pool.spare(), 0);
    pool.recycle(again);
    let taken = pool.copy(&[2u8; 900]);
    pool.recycle(taken);
    assert_eq!(pool.spare(), 1);
    pool.trim(); // Taken during the period: stays.
    assert_eq!(pool.spare(), 1);
    pool.trim();
    assert_eq!(pool.spare(), 0);
    // A payload that outlives its session's pool is simply freed.
    let orphan = pool.copy(&[4u8; 900]);
    drop(pool);
    assert_eq!(&orphan[..], &[4u8; 900][..]);
}

/// A genuine data header claiming a payload of `len` bytes.
fn claiming(len: usize) -> Header {
    Header {
        kind: Kind::Data as u8,
        flags: 0,
        channel: 1,
        seq: 0,
        ack: 0,
        len: len as u32,
    }
}

/// Back-to-back genuine headers claiming the largest payload, with none following: each
/// failed payload check costs up to `limit` bytes of CRC, so there must be about two per
/// `limit` bytes of input, not one per header (24 bytes) as before.
#[test]
fn crc_bomb_headers_cost_linear_work() {
    let limit = 64 * 1024;
    let mut header = Vec::new();
    claiming(limit).encode(&mut header);
    let wire: Vec<u8> = header.iter().copied().cycle().take(64 * limit).collect();
    for fast in [false, true] {
        let mut d = Decoder::new(limit as u32);
        let mut pool = BufferPool::new(limit);
        let mut failed = 0;
        for piece in wire.chunks(4096) {
            if fast {
                let mut input = piece;
                while let Some(item) = d.next_from(&mut input, &mut pool) {
                    failed += usize::from(matches!(item, Err(DecodeError::BadPayload { .. })));
                }
            } else {
                d.push(piece);
                failed += d
                    .by_ref()
                    .filter(|r| matches!(r, Err(DecodeError::BadPayload { .. })))
                    .count();
            }
        }
        let checked = failed * limit;
        assert!(
            checked <= 2 * wire.len() + 2 * limit,
            "{failed} failed payload checks ({checked} bytes of CRC) for {} bytes of input",
            wire.len()
        );
        assert!(failed >= 64, "the bad frames are still reported: {failed}");
    }
}

/// After a bombardment of bad frames, the decoder still finds the next good one.
#[test]
fn good_frame_after_crc_bomb_is_found() {
    let limit = 4096;
    let mut wire = Vec::new();
    for _ in 0..500 {
        claiming(limit).encode(&mut wire);
    }
    wire.extend_from_slice(&[0u8; 4096 + 4]);
    encode(&mut wire, Kind::Data as u8, 1, 9, 0, b"after the bomb");
    let mut d = Decoder::new(limit as u32);
    d.push(&wire);
    let (ok, _) = frames(&mut d);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].payload, &b"after the bomb"[..]);
}

#[test]
fn huge_claimed_length_in_garbled_header_is_not_trusted() {
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"x");
    wire[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"y");
    let mut d = Decoder::new(1024);
    d.push(&wire);
    let (ok, err) = frames(&mut d);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].payload, &b"y"[..]);
    assert!(err.contains(&DecodeError::BadHeader));
}
