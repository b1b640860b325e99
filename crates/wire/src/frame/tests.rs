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

/// What a link does with a piece of the stream that arrived: reads it into `input` in the
/// windows the decoder sets, decoding after each read; `on_read` sees what each read took and
/// what was decoded after it.
fn read_piece(
    d: &mut Decoder,
    input: &mut InputBuf,
    pool: &mut BufferPool,
    mut piece: &[u8],
    out: &mut Vec<Result<Frame, DecodeError>>,
    mut on_read: impl FnMut(&[u8], &[Result<Frame, DecodeError>]),
) {
    loop {
        d.prepare(input, pool);
        let k = input.fill_from(piece);
        assert!(k > 0 || piece.is_empty(), "a window to read into");
        input.received();
        let before = out.len();
        while let Some(item) = d.next_in(input, pool) {
            out.push(item);
        }
        on_read(&piece[..k], &out[before..]);
        piece = &piece[k..];
        if piece.is_empty() {
            return;
        }
    }
}

/// `next_in` is only a faster way to `push` and drain: on streams full of garbage, cut and
/// corrupted frames, oversized frames and split markers, arriving in random pieces and read in
/// the windows `prepare` sets, both must give the same items after each read, the same
/// counters, and hold the same bytes.
#[test]
fn next_in_decodes_exactly_like_push_and_next() {
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
        let mut input = InputBuf::new();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut from = 0;
        for to in cuts {
            let piece = &wire[from..to];
            read_piece(
                &mut fast,
                &mut input,
                &mut pool,
                piece,
                &mut got,
                |read, items| {
                    classic.push(read);
                    let n = want.len();
                    want.extend(classic.by_ref());
                    assert_eq!(items, &want[n..], "case {case}");
                },
            );
            from = to;
        }
        assert_eq!(got, want, "case {case}");
        assert_eq!(fast.stats(), classic.stats(), "case {case}");
        assert_eq!(
            fast.buffered() + input.len(),
            classic.buffered(),
            "case {case}"
        );
        // What a peer can make us hold: one frame and the next header, or one read.
        assert!(input.filled().len() <= pool.capacity(), "case {case}");
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
        let mut input = InputBuf::new();
        let mut failed = 0;
        for piece in wire.chunks(4096) {
            if fast {
                let mut items = Vec::new();
                read_piece(&mut d, &mut input, &mut pool, piece, &mut items, |_, _| {});
                failed += items
                    .iter()
                    .filter(|r| matches!(r, Err(DecodeError::BadPayload { .. })))
                    .count();
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

/// DATA frames on channel 1 with sequence numbers 0, 1, ..., frame `seq` carrying `lens[seq]`
/// bytes of the value `seq`.
fn data_frames(lens: &[usize]) -> Vec<u8> {
    let mut wire = Vec::new();
    for (seq, &len) in lens.iter().enumerate() {
        encode(
            &mut wire,
            Kind::Data as u8,
            1,
            seq as u32,
            0,
            &vec![seq as u8; len],
        );
    }
    wire
}

/// Decodes `wire` (frames of up to the pool's size) as reads of at most `max_read` bytes
/// into what the decoder prepares; returns each frame with whether its payload is a view of
/// the memory its read wrote (no copy), and how many were.
fn decode_counting_views(
    wire: &[u8],
    pool: &mut BufferPool,
    max_read: usize,
) -> (Vec<(Frame, bool)>, usize) {
    let mut d = Decoder::new(pool.capacity() as u32);
    let mut input = InputBuf::new();
    let mut rest = wire;
    let (mut got, mut in_place) = (Vec::new(), 0);
    while !rest.is_empty() {
        d.prepare(&mut input, pool);
        let k = input.fill_from(&rest[..rest.len().min(max_read)]);
        // The buffer this read went to.
        let at = input.filled().as_ptr() as usize;
        let read = at..at + input.len();
        rest = &rest[k..];
        input.received();
        while let Some(item) = d.next_in(&mut input, pool) {
            let frame = item.unwrap();
            let view = read.contains(&(frame.payload.as_ptr() as usize));
            in_place += usize::from(view);
            got.push((frame, view));
        }
    }
    (got, in_place)
}

/// Large frames read in the decoder's windows leave without a copy: each payload is the very
/// memory the read wrote it to, and its buffer returns to the pool when the payload is
/// dropped. Small payloads are copies, so that none pins a read buffer.
#[test]
fn large_payloads_leave_in_the_buffer_they_were_read_into() {
    let limit = 64 * 1024;
    let lens: Vec<usize> = (0..6).map(|i| if i == 3 { 100 } else { limit }).collect();
    let mut pool = BufferPool::new(limit);
    let (got, in_place) = decode_counting_views(&data_frames(&lens), &mut pool, usize::MAX);
    assert!(
        got.iter()
            .filter(|(_, view)| *view)
            .all(|(f, _)| f.payload.len() == limit),
        "only large payloads are views"
    );
    let got: Vec<Frame> = got.into_iter().map(|(f, _)| f).collect();
    assert_eq!(got.len(), 6);
    for (seq, f) in got.iter().enumerate() {
        assert!(f.payload.iter().all(|&b| b == seq as u8));
    }
    // The first frame arrives in the 4 KiB first buffer and is copied; once the decoder knows
    // a large frame is coming, the rest of it goes where it will be handed out.
    assert!(in_place >= 3, "{in_place} of 5 large payloads in place");
    let spare = pool.spare();
    drop(got);
    assert!(pool.spare() > spare, "the buffers came back to the pool");
}

/// Frames too small for a pool buffer, cut short where the sender's credit or queue ran out,
/// leave without a copy too when they carry at least `OWN_BUFFER_MIN` (4 KiB): each is read
/// into a buffer sized to it. Smaller ones are copies. The reads are a virtio-serial port's,
/// 4 KiB at most.
#[test]
fn mid_sized_payloads_leave_in_buffers_sized_to_them() {
    let limit = 64 * 1024;
    let sizes = [28 * 1024, 37 * 1024, 100, 5000, 28 * 1024];
    let mut pool = BufferPool::new(limit);
    let (got, in_place) = decode_counting_views(&data_frames(&sizes), &mut pool, 4096);
    assert!(
        got.iter()
            .filter(|(_, view)| *view)
            .all(|(f, _)| f.payload.len() >= 4096),
        "only large payloads are views"
    );
    assert_eq!(got.len(), sizes.len());
    for (seq, (f, _)) in got.iter().enumerate() {
        assert_eq!(f.payload.len(), sizes[seq]);
        assert!(f.payload.iter().all(|&b| b == seq as u8));
    }
    assert_eq!(in_place, 4, "every payload of 4 KiB or more in place");
}

/// In a bulk transfer a small frame between large ones (an acknowledgement, a short frame) is
/// read up to the next header only: the large frame after it starts a buffer of its own and
/// leaves without a copy, instead of being read in behind the small one and copied out.
#[test]
fn a_small_frame_between_large_ones_costs_them_no_copy() {
    let limit = 64 * 1024;
    let lens: Vec<usize> = (0..8)
        .map(|i| if i % 2 == 1 { 30 } else { limit })
        .collect();
    let wire = data_frames(&lens);
    let mut d = Decoder::new(limit as u32);
    let mut pool = BufferPool::new(limit);
    let mut input = InputBuf::new();
    // Where each read put its bytes: (offset in the stream, address, length).
    let mut reads = Vec::new();
    let mut got = Vec::new();
    let mut off = 0;
    while off < wire.len() {
        d.prepare(&mut input, &mut pool);
        let at = input.filled().as_ptr() as usize + input.len();
        // As a socket would: all that the window takes.
        let k = input.fill_from(&wire[off..]);
        reads.push((off, at, k));
        off += k;
        input.received();
        while let Some(item) = d.next_in(&mut input, &mut pool) {
            got.push(item.unwrap());
        }
    }
    assert_eq!(got.len(), lens.len());
    // A payload left in place if its first byte is where the read that took it wrote it.
    let mut in_place = 0;
    let mut start = 0;
    for (seq, f) in got.iter().enumerate() {
        assert!(f.payload.iter().all(|&b| b == seq as u8));
        let first = start + HEADER_LEN;
        let &(r_off, r_at, _) = reads
            .iter()
            .find(|&&(o, _, n)| (o..o + n).contains(&first))
            .unwrap();
        if f.payload.as_ptr() as usize == r_at + (first - r_off) {
            in_place += 1;
            assert_eq!(f.payload.len(), limit, "only large payloads are views");
        }
        start += wire_len(lens[seq]);
    }
    // The first arrives in the 4 KiB first buffer and is copied; every later one in place.
    assert_eq!(in_place, 3, "large payloads in place");
}

/// A sound header claiming more than the limit allocates nothing: the read buffer stays at
/// its first size while the frame's bytes are skipped.
#[test]
fn oversized_header_allocates_nothing() {
    let mut wire = Vec::new();
    claiming(200_000).encode(&mut wire);
    wire.resize(wire_len(200_000), 0);
    encode(&mut wire, Kind::Data as u8, 1, 0, 0, b"after");
    let mut d = Decoder::new(4096);
    let mut pool = BufferPool::new(4096);
    let mut input = InputBuf::new();
    let mut items = Vec::new();
    for piece in wire.chunks(1000) {
        read_piece(&mut d, &mut input, &mut pool, piece, &mut items, |_, _| {});
        assert!(input.filled().len() <= 1000 && d.buffered() <= 1000);
    }
    assert!(matches!(items[0], Err(DecodeError::Oversized { .. })));
    assert_eq!(
        items.last().unwrap().as_ref().unwrap().payload,
        &b"after"[..]
    );
}
