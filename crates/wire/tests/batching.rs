//! What the data path saves: large `send_bytes` payloads leave from the application's own
//! buffer, an acknowledgement with nothing to ride on waits a few milliseconds instead of
//! costing a frame (and a wake-up of the link's writer) per read, without ever being lost, and
//! a channel whose window limits it grows the window (and the sender its send buffer) instead
//! of waiting for credit every quarter window.

use std::time::{Duration, Instant};

use bytes::Bytes;
use vstream_wire::{
    ChannelId, Config, Event, LinkId, LinkParams, Recv, Role, Session, Transmit, SHARE_MIN,
};

struct Pair {
    now: Instant,
    host: Session,
    guest: Session,
    hl: LinkId,
    gl: LinkId,
}

impl Pair {
    /// Two sessions on one socket-like link, handshake done, one guest-opened channel
    /// accepted: (host id, guest id).
    fn new() -> (Pair, ChannelId) {
        Pair::with_host(Config::new(Role::Host, "host"))
    }

    /// [`Pair::new`] with the host's configuration `host`.
    fn with_host(host: Config) -> (Pair, ChannelId) {
        let now = Instant::now();
        let mut host = Session::new(host, 3, now);
        let mut guest = Session::new(Config::new(Role::Guest, "guest"), 5, now);
        let hl = host.add_link(LinkParams::socket(0), now);
        let gl = guest.add_link(LinkParams::socket(0), now);
        let mut p = Pair {
            now,
            host,
            guest,
            hl,
            gl,
        };
        let id = p.guest.open_channel("test", "ch").expect("open");
        for _ in 0..4 {
            p.exchange();
            while let Some(ev) = p.host.poll_event() {
                if let Event::ChannelOpened { id, .. } = ev {
                    p.host.accept(id).expect("accept");
                }
            }
        }
        (p, id)
    }

    /// Everything each side has to send now, delivered; returns the bytes host -> guest.
    fn exchange(&mut self) -> usize {
        let mut h2g = Vec::new();
        self.host
            .poll_transmit(self.hl, self.now, &mut h2g, 1 << 20);
        let mut g2h = Vec::new();
        self.guest
            .poll_transmit(self.gl, self.now, &mut g2h, 1 << 20);
        self.guest.handle_input(self.gl, &h2g, self.now);
        self.host.handle_input(self.hl, &g2h, self.now);
        h2g.len()
    }
}

#[test]
fn large_send_bytes_payloads_are_sent_from_the_application_buffer() {
    let (mut p, id) = Pair::new();
    let app = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>());
    let mut data = app.clone();
    assert_eq!(p.guest.send_bytes(id, &mut data).expect("send"), 100_000);
    assert!(data.is_empty());
    let mut tx = Transmit::default();
    p.guest
        .poll_transmit_vectored(p.gl, p.now, &mut tx, 1 << 20);
    let mut slices = Vec::new();
    tx.slices(0, &mut slices);
    let range = app.as_ptr_range();
    let shared: usize = slices
        .iter()
        .filter(|s| range.contains(&s.as_ptr()))
        .map(|s| s.len())
        .sum();
    assert_eq!(
        shared, 100_000,
        "every payload byte is a view of the application's buffer"
    );
    // And it arrives intact, taken without a copy by the reader too.
    p.host.handle_input(p.hl, &tx.to_vec(), p.now);
    let mut got = Vec::new();
    while let Ok(Recv::Data(b)) = p.host.recv_bytes(id, 70_000) {
        assert!(b.len() <= 70_000);
        got.extend_from_slice(&b);
    }
    assert_eq!(got, app);
}

#[test]
fn small_send_bytes_writes_are_coalesced_like_send() {
    let (mut p, id) = Pair::new();
    for _ in 0..100 {
        let mut data = Bytes::from_static(&[7u8; 64]);
        assert_eq!(p.guest.send_bytes(id, &mut data).expect("send"), 64);
    }
    const { assert!(SHARE_MIN > 64) };
    let mut out = Vec::new();
    p.guest.poll_transmit(p.gl, p.now, &mut out, 1 << 20);
    p.host.handle_input(p.hl, &out, p.now);
    // 100 writes arrive in a frame or two (chunks grow from 4 KiB), not 100 frames.
    let mut pieces = Vec::new();
    while let Ok(Recv::Data(b)) = p.host.recv_bytes(id, 1 << 20) {
        pieces.push(b);
    }
    assert!(pieces.len() <= 2, "{} pieces", pieces.len());
    assert_eq!(pieces.iter().map(|b| b.len()).sum::<usize>(), 6400);
    assert!(pieces.iter().all(|b| b.iter().all(|&x| x == 7)));
}

#[test]
fn a_lone_acknowledgement_waits_at_most_a_few_milliseconds_and_is_never_lost() {
    let (mut p, id) = Pair::new();
    // Settle: nothing left to acknowledge either way.
    p.now += Duration::from_millis(10);
    p.host.handle_timeout(p.now);
    p.guest.handle_timeout(p.now);
    p.exchange();
    p.exchange();
    assert!(!p.host.wants_transmit(p.hl, p.now));

    let mut data = Bytes::from_static(b"hello");
    p.guest.send_bytes(id, &mut data).expect("send");
    let mut out = Vec::new();
    p.guest.poll_transmit(p.gl, p.now, &mut out, 1 << 20);
    p.host.handle_input(p.hl, &out, p.now);
    // Received, not yet read: no credit to send, so the acknowledgement waits for a frame
    // to ride on, but not past its deadline.
    assert!(!p.host.wants_transmit(p.hl, p.now), "no ACK frame at once");
    let due = p.host.poll_timeout().expect("a deadline for the ACK");
    assert!(due <= p.now + Duration::from_millis(5), "{:?}", due - p.now);
    p.now = due;
    p.host.handle_timeout(p.now);
    assert!(p.host.wants_transmit(p.hl, p.now), "the ACK is due");
    let before = p.guest.held_bytes();
    assert!(p.exchange() > 0, "an ACK frame went out");
    assert!(
        p.guest.held_bytes() < before,
        "the guest freed what was acknowledged"
    );
    assert!(!p.host.wants_transmit(p.hl, p.now));
}

impl Pair {
    /// One round of a bulk transfer guest -> host: the guest queues all it may, everything
    /// is delivered, the host reads up to `read` bytes, credits go back. Returns the bytes the
    /// host read, each checked against the running position `pos`.
    fn bulk_round(&mut self, id: ChannelId, pos: &mut (u64, u64), read: usize) -> usize {
        let chunk: Vec<u8> = (0..64 * 1024u64).map(|i| i as u8).collect();
        loop {
            let at = (pos.0 % chunk.len() as u64) as usize;
            let n = self.guest.send(id, &chunk[at..]).expect("send");
            if n == 0 {
                break;
            }
            pos.0 += n as u64;
        }
        // One poll moves at most 1 MiB each way.
        for _ in 0..5 {
            self.exchange();
        }
        let mut got = 0;
        while got < read {
            match self.host.recv_bytes(id, read - got).expect("recv") {
                Recv::Data(b) => {
                    for (i, byte) in b.iter().enumerate() {
                        assert_eq!(*byte, (pos.1 + i as u64) as u8, "byte {}", pos.1 + i as u64);
                    }
                    pos.1 += b.len() as u64;
                    got += b.len();
                }
                Recv::WouldBlock | Recv::Eof => break,
            }
        }
        self.exchange();
        got
    }

    fn info(s: &Session, id: ChannelId) -> vstream_wire::ChannelInfo {
        s.channels().find(|c| c.id == id).expect("channel")
    }
}

#[test]
fn a_reader_that_keeps_up_grows_the_window_to_its_maximum_and_the_send_buffer_follows() {
    let (mut p, id) = Pair::new();
    let cfg = Config::new(Role::Host, "");
    let mut pos = (0, 0);
    let mut windows = vec![Pair::info(&p.host, id).rx_window];
    for _ in 0..64 {
        p.bulk_round(id, &mut pos, usize::MAX);
        let w = Pair::info(&p.host, id).rx_window;
        if windows.last() != Some(&w) {
            windows.push(w);
        }
        assert!(p.host.held_bytes() <= cfg.peer_buffer_limit);
    }
    // Doubling from the initial window to the maximum, never beyond.
    let max = cfg.channel_window_max;
    let expected: Vec<u32> = std::iter::successors(Some(cfg.channel_window), |w| {
        (*w < max).then(|| (w * 2).min(max))
    })
    .collect();
    assert_eq!(windows, expected);
    assert_eq!(Pair::info(&p.guest, id).tx_limit, max as usize);
    // What arrived came in order (checked byte by byte).
    assert!(pos.1 > 16 * u64::from(max), "{} bytes moved", pos.1);
}

#[test]
fn a_reader_that_falls_behind_keeps_its_window() {
    let (mut p, id) = Pair::new();
    let cfg = Config::new(Role::Host, "");
    let mut pos = (0, 0);
    for _ in 0..64 {
        // Reads less than a quarter window per round: its buffer never empties.
        p.bulk_round(id, &mut pos, cfg.channel_window as usize / 8);
        assert_eq!(Pair::info(&p.host, id).rx_window, cfg.channel_window);
        assert!(Pair::info(&p.host, id).rx_buffered > 0);
    }
    assert_eq!(Pair::info(&p.guest, id).tx_limit, cfg.channel_send_buffer);
}

#[test]
fn a_window_grows_only_within_peer_buffer_limit_and_survives_a_snapshot() {
    // Room for the one channel and one doubling of its window, no more.
    let mut cfg = Config::new(Role::Host, "host");
    let w = cfg.channel_window;
    cfg.peer_buffer_limit = cfg.fixed_charge(1) + cfg.channel_charge() + (w + w / 4) as usize;
    let (mut p, id) = Pair::with_host(cfg.clone());
    let mut pos = (0, 0);
    for _ in 0..32 {
        p.bulk_round(id, &mut pos, usize::MAX);
        assert!(p.host.held_bytes() <= cfg.peer_buffer_limit);
    }
    assert_eq!(Pair::info(&p.host, id).rx_window, 2 * w);
    // A successor process restores the grown window from the channel's counts.
    p.guest.send(id, &[1; 1000]).expect("send");
    p.exchange();
    let restored = Session::restore(cfg, &p.host.snapshot(), p.now).expect("restore");
    let before = Pair::info(&p.host, id);
    let after = Pair::info(&restored, id);
    assert_eq!(
        (after.rx_window, after.rx_buffered),
        (before.rx_window, before.rx_buffered)
    );
}
