//! Two sessions joined by simulated links: random cuts, corruption, byte loss, many channels.
//! Every test checks that each channel's bytes arrive intact, in order, exactly once.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use vstream_wire::{
    ChannelId, Config, Event, InputBuf, LinkId, LinkParams, Recv, ResetCode, Role, Session,
    Transmit,
};

/// A fast stream in both payload-CRC modes: kept (a virtio-serial port) and negotiated away
/// (a socket). Tests of fault-free links run in both.
fn both_modes() -> [LinkParams; 2] {
    [LinkParams::stream(0), LinkParams::socket(0)]
}

/// Deterministic content of channel `k` at offset `i`.
fn byte_at(k: usize, i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9).wrapping_add(k as u64 * 7919);
    (x ^ (x >> 13)) as u8
}

#[derive(Default)]
struct Writer {
    sent: u64,
    total: u64,
    closed: bool,
}

#[derive(Default)]
struct Reader {
    got: u64,
    eof: bool,
}

/// One direction of a link: bytes in flight, with faults applied on delivery.
#[derive(Default)]
struct Pipe {
    bytes: VecDeque<u8>,
}

struct LinkPair {
    host: LinkId,
    guest: LinkId,
    h2g: Pipe,
    g2h: Pipe,
    /// The host's read buffer: the host reads as a link does (`handle_read`, large payloads
    /// handed out in the buffers they were read into), the guest with `handle_input`, so
    /// every run covers both input APIs.
    host_in: InputBuf,
}

#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    /// Probability per delivered chunk of flipping one bit.
    flip: f64,
    /// Probability per delivered chunk of dropping a few bytes (a UART overrun).
    drop: f64,
}

struct Sim {
    now: Instant,
    host: Session,
    guest: Session,
    links: Vec<LinkPair>,
    rng: StdRng,
    faults: Faults,
    /// Channel index -> (host side id, guest side id).
    ids: Vec<(Option<ChannelId>, Option<ChannelId>)>,
    writers: Vec<Writer>,
    readers: Vec<Reader>,
    resets: Vec<(ChannelId, ResetCode, String)>,
    params: LinkParams,
    /// Transmit with `poll_transmit_vectored` instead of `poll_transmit`.
    vectored: bool,
    /// Write with `send_bytes` and read with `recv_bytes` instead of `send` and `recv`.
    bytes_api: bool,
    /// Digest of every byte put on the wire, both directions.
    wire: DefaultHasher,
}

/// What the session sends on `link` now, by either transmit call.
fn transmit(s: &mut Session, link: LinkId, now: Instant, vectored: bool) -> Vec<u8> {
    let max = 256 * 1024;
    if !vectored {
        let mut out = Vec::new();
        let n = s.poll_transmit(link, now, &mut out, max);
        assert_eq!(n, out.len());
        return out;
    }
    let mut tx = Transmit::default();
    let n = s.poll_transmit_vectored(link, now, &mut tx, max);
    assert_eq!(n, tx.len());
    let out = tx.to_vec();
    assert_eq!(out.len(), n);
    // What a short `writev` leaves to write next: the same bytes from any offset.
    let skip = n / 3 + 1;
    let mut rest = Vec::new();
    tx.slices(skip, &mut rest);
    let rest: Vec<u8> = rest.iter().flat_map(|s| s.iter().copied()).collect();
    assert_eq!(rest, out.get(skip..).unwrap_or_default());
    out
}

impl Sim {
    fn new(seed: u64, channels: usize, bytes: u64, faults: Faults, params: LinkParams) -> Sim {
        let now = Instant::now();
        let mut hc = Config::new(Role::Host, "host");
        hc.channel_window = 64 * 1024;
        hc.channel_send_buffer = 64 * 1024;
        let mut gc = Config::new(Role::Guest, "guest");
        gc.channel_window = 48 * 1024;
        gc.channel_send_buffer = 16 * 1024;
        let mut sim = Sim {
            now,
            host: Session::new(hc, seed | 1, now),
            guest: Session::new(gc, (seed << 1) | 1, now),
            links: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            faults,
            ids: vec![(None, None); channels],
            writers: (0..channels)
                .map(|_| Writer {
                    total: bytes,
                    ..Default::default()
                })
                .collect(),
            readers: (0..channels).map(|_| Reader::default()).collect(),
            resets: Vec::new(),
            params,
            vectored: false,
            bytes_api: false,
            wire: DefaultHasher::new(),
        };
        sim.add_link();
        for k in 0..channels {
            let id = sim
                .guest
                .open_channel("test", &format!("ch{k}"))
                .expect("open");
            sim.ids[k].1 = Some(id);
        }
        sim
    }

    fn add_link(&mut self) {
        let host = self.host.add_link(self.params, self.now);
        let guest = self.guest.add_link(self.params, self.now);
        self.links.push(LinkPair {
            host,
            guest,
            h2g: Pipe::default(),
            g2h: Pipe::default(),
            host_in: InputBuf::new(),
        });
    }

    /// Closes every link (bytes in flight are lost) and opens a new one: a transport cut.
    fn cut(&mut self) {
        for l in self.links.drain(..) {
            self.host.remove_link(l.host);
            self.guest.remove_link(l.guest);
        }
        self.add_link();
    }

    /// Replaces one side's session by a restore of its snapshot (a live upgrade of that
    /// process): its links go away with it, bytes in flight are lost, and a new link follows.
    fn upgrade(&mut self, guest_side: bool) {
        self.drain_events();
        let side = if guest_side {
            &mut self.guest
        } else {
            &mut self.host
        };
        let state = side.snapshot();
        let restored = Session::restore(side.config().clone(), &state, self.now).expect("restore");
        assert_eq!(
            restored.snapshot(),
            state,
            "a restore keeps every byte of the state"
        );
        *side = restored;
        // The restored session has no link; the peer's links die with the old process.
        for l in std::mem::take(&mut self.links) {
            let peer = if guest_side {
                &mut self.host
            } else {
                &mut self.guest
            };
            peer.remove_link(if guest_side { l.host } else { l.guest });
        }
        self.add_link();
    }

    fn step(&mut self) {
        // Guest writes (the writer side in these tests), host reads.
        for k in 0..self.writers.len() {
            let Some(id) = self.ids[k].1 else { continue };
            let w = &mut self.writers[k];
            if w.sent < w.total {
                let n = ((w.total - w.sent) as usize).min(self.rng.random_range(1..20_000));
                let chunk: Vec<u8> = (0..n as u64).map(|i| byte_at(k, w.sent + i)).collect();
                let accepted = if self.bytes_api {
                    let mut data = Bytes::from(chunk);
                    let len = data.len();
                    let acc = self.guest.send_bytes(id, &mut data);
                    // What was not taken is what is left.
                    if let Ok(acc) = acc {
                        assert_eq!(data.len(), len - acc);
                    }
                    acc
                } else {
                    self.guest.send(id, &chunk)
                };
                if let Ok(acc) = accepted {
                    w.sent += acc as u64;
                }
            } else if !w.closed {
                w.closed = self.guest.close(id).is_ok();
            }
        }
        let mut buf = vec![0u8; 30_000];
        for k in 0..self.readers.len() {
            let Some(id) = self.ids[k].0 else { continue };
            let r = &mut self.readers[k];
            loop {
                let want = self.rng.random_range(1..buf.len());
                let got = if self.bytes_api {
                    self.host.recv_bytes(id, want).map(|r| match r {
                        Recv::Data(b) => {
                            assert!(!b.is_empty() && b.len() <= want);
                            buf[..b.len()].copy_from_slice(&b);
                            Recv::Data(b.len())
                        }
                        Recv::Eof => Recv::Eof,
                        Recv::WouldBlock => Recv::WouldBlock,
                    })
                } else {
                    self.host.recv(id, &mut buf[..want])
                };
                match got {
                    Ok(Recv::Data(n)) => {
                        for (i, b) in buf[..n].iter().enumerate() {
                            assert_eq!(
                                *b,
                                byte_at(k, r.got + i as u64),
                                "channel {k} corrupted at {}",
                                r.got + i as u64
                            );
                        }
                        r.got += n as u64;
                    }
                    Ok(Recv::Eof) => {
                        r.eof = true;
                        if self.host.has_channel(id) {
                            let _ = self.host.close(id);
                        }
                        break;
                    }
                    _ => break,
                }
            }
        }
        // Move bytes.
        let now = self.now;
        for i in 0..self.links.len() {
            let out = transmit(&mut self.host, self.links[i].host, now, self.vectored);
            self.wire.write(&out);
            self.links[i].h2g.bytes.extend(out);
            let out = transmit(&mut self.guest, self.links[i].guest, now, self.vectored);
            self.wire.write(&out);
            self.links[i].g2h.bytes.extend(out);
            let chunk = self.deliver_chunk(i, true);
            self.guest.handle_input(self.links[i].guest, &chunk, now);
            let chunk = self.deliver_chunk(i, false);
            let l = &mut self.links[i];
            let mut rest = &chunk[..];
            loop {
                // In the windows the session sets (none before the first call).
                rest = &rest[l.host_in.fill_from(rest)..];
                self.host.handle_read(l.host, &mut l.host_in, now);
                if rest.is_empty() {
                    break;
                }
            }
        }
        self.now += Duration::from_millis(self.rng.random_range(0..20));
        self.host.handle_timeout(self.now);
        self.guest.handle_timeout(self.now);
        self.drain_events();
        // Both sides offer the same here, so an up link leaves the CRC out iff they offered it.
        for l in &self.links {
            for (s, id) in [(&self.host, l.host), (&self.guest, l.guest)] {
                if s.link_is_up(id) {
                    assert_eq!(s.link_skips_payload_crc(id), self.params.checksummed);
                }
            }
        }
    }

    fn deliver_chunk(&mut self, i: usize, h2g: bool) -> Vec<u8> {
        let pipe = if h2g {
            &mut self.links[i].h2g
        } else {
            &mut self.links[i].g2h
        };
        let n = pipe.bytes.len().min(self.rng.random_range(1..200_000));
        let mut chunk: Vec<u8> = pipe.bytes.drain(..n).collect();
        if !chunk.is_empty() && self.rng.random_bool(self.faults.flip) {
            let at = self.rng.random_range(0..chunk.len());
            chunk[at] ^= 1 << self.rng.random_range(0..8);
        }
        if chunk.len() > 8 && self.rng.random_bool(self.faults.drop) {
            let at = self.rng.random_range(0..chunk.len() - 8);
            chunk.drain(at..at + self.rng.random_range(1..8));
        }
        chunk
    }

    fn drain_events(&mut self) {
        while let Some(ev) = self.host.poll_event() {
            match ev {
                Event::ChannelOpened { id, name, .. } => {
                    let k: usize = name.trim_start_matches("ch").parse().expect("name");
                    self.ids[k].0 = Some(id);
                    self.host.accept(id).expect("accept");
                }
                Event::ChannelReset { id, code, reason } => self.resets.push((id, code, reason)),
                Event::LinkDown { link, .. } => {
                    // The driver closes the transport; the test reconnects.
                    self.links.retain(|l| l.host != link);
                    self.host.remove_link(link);
                }
                _ => {}
            }
        }
        while let Some(ev) = self.guest.poll_event() {
            if let Event::ChannelReset { id, code, reason } = ev {
                self.resets.push((id, code, reason));
            }
        }
        if self.links.is_empty() {
            self.add_link();
        }
    }

    fn done(&self) -> bool {
        self.readers
            .iter()
            .zip(&self.writers)
            .all(|(r, w)| r.eof && r.got == w.total)
    }

    fn run(&mut self, max_steps: usize, mut cut_at: Vec<usize>) -> usize {
        cut_at.sort_unstable();
        let mut cuts = cut_at.into_iter().peekable();
        for step in 0..max_steps {
            while cuts.peek() == Some(&step) {
                cuts.next();
                self.cut();
            }
            self.step();
            if self.done() {
                return step;
            }
        }
        let progress: Vec<_> = self.readers.iter().map(|r| (r.got, r.eof)).collect();
        panic!(
            "not done after {max_steps} steps: readers {progress:?}, resets {:?}, host {:?}, guest {:?}",
            self.resets,
            self.host.stats(),
            self.guest.stats()
        );
    }
}

#[test]
fn clean_transfer_many_channels() {
    for params in both_modes() {
        let mut sim = Sim::new(1, 8, 300_000, Faults::default(), params);
        sim.run(5_000, vec![]);
        assert!(sim.resets.is_empty(), "{:?}", sim.resets);
        assert_eq!(sim.host.stats().frames_retransmitted, 0);
        let decode = sim.host.link_stats(sim.links[0].host).expect("link").decode;
        assert_eq!(decode.crc_errors, 0, "{params:?}");
    }
}

#[test]
fn one_hundred_cuts_at_random_offsets() {
    let mut rng = StdRng::seed_from_u64(100);
    let mut cuts: Vec<usize> = (0..100).map(|_| rng.random_range(0..700)).collect();
    cuts.sort_unstable();
    let last_cut = *cuts.last().expect("100 cuts");
    for params in both_modes() {
        let mut sim = Sim::new(7, 4, 8_000_000, Faults::default(), params);
        let finished = sim.run(20_000, cuts.clone());
        assert!(
            finished > last_cut,
            "every cut must land mid-transfer ({finished} <= {last_cut})"
        );
        assert!(sim.guest.stats().frames_retransmitted > 0);
        assert!(sim.resets.is_empty(), "{:?}", sim.resets);
        assert!(sim.host.stats().session_restarts == 0 && sim.guest.stats().session_restarts == 0);
    }
}

#[test]
fn lossy_serial_line_delivers_everything() {
    let faults = Faults {
        flip: 0.05,
        drop: 0.05,
    };
    let mut sim = Sim::new(3, 3, 200_000, faults, LinkParams::serial(0, 115_200));
    sim.run(200_000, vec![]);
    let decode = sim.host.link_stats(sim.links[0].host).expect("link").decode;
    assert!(
        decode.crc_errors > 0,
        "faults were injected, the decoder must have seen them"
    );
    assert!(sim.resets.is_empty(), "{:?}", sim.resets);
}

#[test]
fn stalled_reader_does_not_block_other_channels() {
    let mut sim = Sim::new(5, 2, 1_000_000, Faults::default(), LinkParams::stream(0));
    // Channel 0's reader never reads: forget its host id so `step` skips it.
    for _ in 0..50 {
        sim.step();
    }
    let stalled = sim.ids[0].0.take().expect("opened");
    for _ in 0..5_000 {
        sim.step();
        if sim.readers[1].eof {
            break;
        }
    }
    assert!(
        sim.readers[1].eof && sim.readers[1].got == 1_000_000,
        "channel 1 must finish"
    );
    let info = sim
        .host
        .channels()
        .find(|c| c.id == stalled)
        .expect("still open");
    assert!(
        info.rx_buffered <= 64 * 1024,
        "buffered {} beyond the window",
        info.rx_buffered
    );
}

#[test]
fn peer_restart_resets_channels_instead_of_resuming() {
    for params in both_modes() {
        let mut sim = Sim::new(9, 1, 100_000_000, Faults::default(), params);
        for _ in 0..5 {
            sim.step();
        }
        // The guest process restarts: a brand-new session with another id.
        let mut gc = Config::new(Role::Guest, "guest");
        gc.channel_window = 48 * 1024;
        sim.guest = Session::new(gc, 0xDEAD_BEEF, sim.now);
        for l in std::mem::take(&mut sim.links) {
            sim.host.remove_link(l.host);
        }
        sim.add_link();
        for _ in 0..20 {
            sim.step();
        }
        assert_eq!(sim.host.stats().session_restarts, 1);
        assert!(sim
            .resets
            .iter()
            .any(|(_, code, _)| *code == ResetCode::SessionLost));
    }
}

/// `poll_transmit_vectored` only saves a copy: the same run (same cuts, same faults) puts the
/// very same bytes on the wire as with `poll_transmit`.
#[test]
fn vectored_transmit_sends_the_same_bytes() {
    let lossy = Faults {
        flip: 0.05,
        drop: 0.05,
    };
    let runs = [
        (
            11,
            4,
            3_000_000,
            Faults::default(),
            LinkParams::stream(0),
            vec![3, 40, 41, 90],
        ),
        (
            13,
            4,
            3_000_000,
            Faults::default(),
            LinkParams::socket(0),
            vec![3, 40, 41, 90],
        ),
        (
            12,
            3,
            100_000,
            lossy,
            LinkParams::serial(0, 115_200),
            vec![500],
        ),
    ];
    for (seed, channels, bytes, faults, params, cuts) in runs {
        let run = |vectored: bool| {
            let mut sim = Sim::new(seed, channels, bytes, faults, params);
            sim.vectored = vectored;
            let steps = sim.run(200_000, cuts.clone());
            (
                steps,
                sim.wire.finish(),
                sim.host.stats(),
                sim.guest.stats(),
            )
        };
        assert_eq!(run(true), run(false), "seed {seed}");
    }
}

/// Snapshot and restore at random points of a transfer (either side, as a live upgrade of
/// vstreamd or of an agent would): every byte arrives exactly once and in order, and the
/// session resumes instead of restarting.
fn run_with_upgrades(
    seed: u64,
    channels: usize,
    bytes: u64,
    upgrades: &[(usize, bool)],
    params: LinkParams,
    bytes_api: bool,
) {
    let mut sim = Sim::new(seed, channels, bytes, Faults::default(), params);
    sim.bytes_api = bytes_api;
    let mut steps = 0;
    for &(at, guest_side) in upgrades {
        while steps < at && !sim.done() {
            sim.step();
            steps += 1;
        }
        sim.upgrade(guest_side);
    }
    sim.run(200_000, vec![]);
    assert!(sim.resets.is_empty(), "{:?}", sim.resets);
    assert_eq!(sim.host.stats().session_restarts, 0);
    assert_eq!(sim.guest.stats().session_restarts, 0);
    assert!(sim.readers.iter().all(|r| r.got == bytes && r.eof));
}

#[test]
fn snapshots_mid_transfer_lose_and_repeat_nothing() {
    let upgrades: Vec<(usize, bool)> = (0..40).map(|i| (i * 7 + 3, i % 3 == 0)).collect();
    for params in both_modes() {
        for bytes_api in [false, true] {
            run_with_upgrades(21, 4, 3_000_000, &upgrades, params, bytes_api);
        }
    }
}

#[test]
fn a_damaged_or_foreign_snapshot_is_refused_with_a_reason() {
    let mut sim = Sim::new(23, 3, 1_000_000, Faults::default(), LinkParams::stream(0));
    for _ in 0..30 {
        sim.step();
    }
    sim.drain_events();
    let cfg = sim.guest.config().clone();
    let state = sim.guest.snapshot();
    assert!(state.len() > 16 * 1024, "the snapshot holds queued data");
    let now = sim.now;
    // Every truncation is an error, never a panic or a short session.
    for len in (0..state.len()).step_by(97).chain([state.len() - 1]) {
        assert!(
            Session::restore(cfg.clone(), &state[..len], now).is_err(),
            "{len}"
        );
    }
    let mut longer = state.clone();
    longer.push(0);
    let e = Session::restore(cfg.clone(), &longer, now).expect_err("trailing byte");
    assert!(e.to_string().contains("after the end"), "{e}");
    // Flipped bytes: an error or a session within the limits, never a panic.
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..2_000 {
        let mut bad = state.clone();
        let at = rng.random_range(0..bad.len().min(4096));
        bad[at] ^= 1 << rng.random_range(0..8);
        if let Ok(s) = Session::restore(cfg.clone(), &bad, now) {
            assert!(s.held_bytes() <= cfg.peer_buffer_limit);
        }
    }
    // The other role's state, and limits the queued data does not fit.
    let host = Config::new(Role::Host, "host");
    let e = Session::restore(host, &state, now).expect_err("role");
    assert!(e.to_string().contains("role"), "{e}");
    let mut small = cfg.clone();
    small.max_channels = 2;
    let e = Session::restore(small, &state, now).expect_err("limits");
    assert!(e.to_string().contains("3 entries, at most 2"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn snapshots_at_random_points(
        seed in any::<u64>(),
        channels in 1usize..6,
        bytes in 1u64..400_000,
        upgrades in proptest::collection::vec((0usize..300, any::<bool>()), 1..6),
        socket in any::<bool>(),
        bytes_api in any::<bool>(),
    ) {
        let mut upgrades = upgrades;
        upgrades.sort_unstable();
        let params = if socket { LinkParams::socket(0) } else { LinkParams::stream(0) };
        run_with_upgrades(seed, channels, bytes, &upgrades, params, bytes_api);
    }

    #[test]
    fn random_cuts_corruption_and_interleavings(
        seed in any::<u64>(),
        channels in 1usize..8,
        bytes in 1u64..150_000,
        cuts in proptest::collection::vec(0usize..600, 0..6),
        flip in 0.0f64..0.1,
        drop in 0.0f64..0.1,
        kind in 0u8..3,
        vectored in any::<bool>(),
        bytes_api in any::<bool>(),
    ) {
        // A socket does not garble bytes (that is why it may leave the CRC out): no faults there.
        let (params, faults) = match kind {
            0 => (LinkParams::serial(0, 921_600), Faults { flip, drop }),
            1 => (LinkParams::stream(0), Faults { flip, drop }),
            _ => (LinkParams::socket(0), Faults::default()),
        };
        let mut sim = Sim::new(seed, channels, bytes, faults, params);
        sim.vectored = vectored;
        sim.bytes_api = bytes_api;
        sim.run(200_000, cuts);
        prop_assert!(sim.resets.is_empty(), "{:?}", sim.resets);
        let totals: HashMap<usize, u64> = sim.readers.iter().enumerate().map(|(k, r)| (k, r.got)).collect();
        prop_assert!(totals.values().all(|t| *t == bytes));
    }
}
