//! A hand-written hostile peer: every violation resets only the offending channel; other
//! channels keep flowing, and each violation is reported as a clear error.

use std::time::Instant;

use vstream_wire::frame::{encode, Decoder};
use vstream_wire::{
    Config, ErrorKind, Event, Hello, Kind, LinkParams, ProtocolError, Recv, ResetCode, Role,
    Session, CONTROL_QUEUE_LIMIT,
};

struct Evil {
    seq: u32,
    /// The `ack` field of its frames.
    ack: u32,
    wire: Vec<u8>,
}

/// The hostile guest's HELLO (session 42) for the link with id `link`.
fn hello_frame(link: u32) -> Vec<u8> {
    let hello = Hello {
        version: 1,
        role: Role::Guest,
        caps: 1,
        my_session: 42,
        your_session: 0,
        recv_next: 0,
        max_frame: 65536,
        link,
        echo: 0,
        name: "evil".into(),
    };
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Hello as u8, 0, 0, 0, &hello.encode());
    wire
}

impl Evil {
    fn new() -> Evil {
        Evil {
            seq: 0,
            ack: 0,
            wire: hello_frame(7),
        }
    }

    fn frame(&mut self, kind: Kind, channel: u32, payload: &[u8]) {
        encode(
            &mut self.wire,
            kind as u8,
            channel,
            self.seq,
            self.ack,
            payload,
        );
        self.seq += 1;
    }

    fn open(&mut self, channel: u32, window: u32) {
        let mut p = vec![4];
        p.extend_from_slice(b"test");
        p.push(1);
        p.push(b'x');
        p.extend_from_slice(&window.to_le_bytes());
        self.frame(Kind::Open, channel, &p);
    }
}

fn host() -> (Session, vstream_wire::LinkId, Instant) {
    let now = Instant::now();
    let mut cfg = Config::new(Role::Host, "host");
    cfg.channel_window = 1000;
    cfg.max_frame = 4096;
    let mut s = Session::new(cfg, 99, now);
    let link = s.add_link(LinkParams::stream(0), now);
    (s, link, now)
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn read_all(s: &mut Session, ch: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Recv::Data(n)) = s.recv(ch, &mut buf) {
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Frames the host sends back, decoded.
fn replies(s: &mut Session, link: vstream_wire::LinkId, now: Instant) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    s.poll_transmit(link, now, &mut out, 1 << 20);
    let mut d = Decoder::new(1 << 20);
    d.push(&out);
    std::iter::from_fn(|| d.next())
        .filter_map(Result::ok)
        .map(|f| (f.header.kind, f.header.channel, f.payload.to_vec()))
        .collect()
}

#[test]
fn credit_overrun_resets_only_that_channel() {
    let (mut s, link, now) = host();
    let mut e = Evil::new();
    e.open(1, 5000);
    e.open(3, 5000);
    e.frame(Kind::Data, 1, &[1u8; 900]);
    e.frame(Kind::Data, 1, &[2u8; 200]); // 1100 > window of 1000
    e.frame(Kind::Data, 3, b"still fine");
    s.handle_input(link, &e.wire, now);
    let ev = events(&mut s);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::ProtocolError {
                error: ProtocolError::CreditExceeded {
                    channel: 1,
                    sent: 1100,
                    credit: 1000
                },
                ..
            }
        )),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ChannelReset {
            id: 1,
            code: ResetCode::FlowControl,
            ..
        }
    )));
    assert!(!s.has_channel(1));
    assert_eq!(read_all(&mut s, 3), b"still fine");
    let r = replies(&mut s, link, now);
    let reset = r
        .iter()
        .find(|(k, ch, _)| *k == Kind::Reset as u8 && *ch == 1)
        .expect("RESET sent to the peer");
    assert_eq!(
        u16::from_le_bytes([reset.2[0], reset.2[1]]),
        ResetCode::FlowControl as u16
    );
}

#[test]
fn unknown_channel_is_answered_with_reset() {
    let (mut s, link, now) = host();
    let mut e = Evil::new();
    e.open(1, 5000);
    e.frame(Kind::Data, 99, b"who am I");
    e.frame(Kind::Data, 1, b"ok");
    s.handle_input(link, &e.wire, now);
    let ev = events(&mut s);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::ProtocolError {
                error: ProtocolError::UnknownChannel { channel: 99, .. },
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(read_all(&mut s, 1), b"ok");
    assert!(replies(&mut s, link, now)
        .iter()
        .any(|(k, ch, _)| *k == Kind::Reset as u8 && *ch == 99));
}

#[test]
fn oversized_frame_resets_its_channel_and_the_stream_continues() {
    let (mut s, link, now) = host();
    let mut e = Evil::new();
    e.open(1, 5000);
    e.open(3, 5000);
    e.frame(Kind::Data, 1, &vec![0u8; 100_000]); // limit is 4096
    e.frame(Kind::Data, 3, b"after the giant");
    s.handle_input(link, &e.wire, now);
    let ev = events(&mut s);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::ProtocolError {
                error: ProtocolError::Decode(vstream_wire::DecodeError::Oversized {
                    len: 100_000,
                    ..
                }),
                ..
            }
        )),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ChannelReset {
            id: 1,
            code: ResetCode::Protocol,
            ..
        }
    )));
    assert_eq!(read_all(&mut s, 3), b"after the giant");
}

#[test]
fn garbage_and_malformed_frames_are_survived() {
    let (mut s, link, now) = host();
    let mut e = Evil::new();
    e.wire.extend_from_slice(&[0xA9, 0x5C, 0xFF, 0xFF, 1, 2, 3]);
    e.wire.extend_from_slice(b"random noise \x00\xff");
    e.frame(Kind::Open, 5, b"\x09short"); // malformed OPEN
    e.open(7, 5000);
    e.wire.extend(std::iter::repeat_n(0xA9u8, 50));
    e.frame(Kind::Data, 7, b"survived");
    s.handle_input(link, &e.wire, now);
    let ev = events(&mut s);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::ProtocolError {
                error: ProtocolError::BadFrame { channel: 5, .. },
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(read_all(&mut s, 7), b"survived");
    let stats = s.link_stats(link).expect("link");
    assert!(stats.decode.garbage_bytes > 0 && stats.decode.crc_errors > 0);
}

#[test]
fn wrong_parity_and_reused_ids_are_refused() {
    let (mut s, link, now) = host();
    let mut e = Evil::new();
    e.open(2, 5000); // even ids belong to the host
    e.open(9, 5000);
    e.open(9, 5000); // reuse
    s.handle_input(link, &e.wire, now);
    let opened: Vec<_> = events(&mut s)
        .into_iter()
        .filter_map(|e| match e {
            Event::ChannelOpened { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(opened, [9]);
}

#[test]
fn acknowledging_the_future_is_an_error_not_a_crash() {
    let (mut s, link, now) = host();
    let mut e = Evil::new();
    encode(&mut e.wire, Kind::Ack as u8, 0, 0, 1_000_000, &[]);
    s.handle_input(link, &e.wire, now);
    assert!(events(&mut s).iter().any(|e| matches!(
        e,
        Event::ProtocolError {
            error: ProtocolError::BadAck { ack: 1_000_000, .. },
            ..
        }
    )));
    assert!(s.link_is_up(link));
}

#[test]
fn an_echoing_line_does_not_kill_the_link() {
    // A guest tty with echo on sends our own HELLO back before the agent sets raw mode.
    let (mut s, link, now) = host();
    let mut ours = Vec::new();
    s.poll_transmit(link, now, &mut ours, 1 << 16);
    s.handle_input(link, &ours, now);
    let ev = events(&mut s);
    assert!(
        ev.is_empty(),
        "an echoed HELLO is neither an error nor a handshake: {ev:?}"
    );
    assert_eq!(s.link_stats(link).expect("link").echoed_hellos, 1);
    // The real peer then completes the handshake on the same link.
    let e = Evil::new();
    s.handle_input(link, &e.wire, now);
    assert!(s.link_is_up(link));
}

#[test]
fn a_late_hello_from_before_the_session_was_known_is_not_a_restart() {
    // The agent sent its HELLO on a slow serial line before it learned the host's session on
    // the virtio port; it arrives after the session is up on the port.
    let (mut s, port, now) = host();
    let mut e = Evil::new();
    e.open(1, 5000);
    s.handle_input(port, &e.wire, now);
    assert!(s.link_is_up(port));
    let serial = s.add_link(vstream_wire::LinkParams::serial(1, 115_200), now);
    // Same session id, your_session still 0: sent before the session was known.
    s.handle_input(serial, &hello_frame(8), now);
    assert_eq!(s.stats().session_restarts, 0);
    assert!(
        s.link_is_up(port) && s.link_is_up(serial),
        "both links stay up"
    );
    assert!(s.has_channel(1), "the session's channels survive");
}

/// A small host session whose limits a test can fill quickly.
fn bounded_host(now: Instant) -> (Session, vstream_wire::LinkId) {
    let mut cfg = Config::new(Role::Host, "host");
    cfg.channel_window = 16 * 1024;
    cfg.channel_send_buffer = 16 * 1024;
    cfg.max_frame = 4096;
    cfg.max_unacked = 64 * 1024;
    cfg.peer_buffer_limit = cfg.fixed_charge(1) + 8 * cfg.channel_charge();
    let mut s = Session::new(cfg, 99, now);
    let link = s.add_link(LinkParams::stream(0), now);
    (s, link)
}

/// Opens channels in a loop (each refused) and stops reading what we answer, though it
/// acknowledges it: the refusals stop piling up once the control queue is full, because the
/// session then asks for no more input until the guest reads.
#[test]
fn open_churn_from_a_peer_that_never_reads_is_bounded() {
    let now = Instant::now();
    let (mut s, link) = bounded_host(now);
    let mut evil = Evil::new();
    // The guest's socket takes this much, then the writer blocks.
    let mut socket = Vec::new();
    let mut ch = 1;
    while ch < 200_000 && s.wants_input() {
        for _ in 0..100 {
            evil.open(ch, 1 << 20);
            ch += 2;
        }
        evil.ack = s.stats().frames_sent as u32;
        s.handle_input(link, &std::mem::take(&mut evil.wire), now);
        while let Some(ev) = s.poll_event() {
            if let Event::ChannelOpened { id, .. } = ev {
                let _ = s.reset(id, ResetCode::Refused, "no service");
            }
        }
        if socket.len() < 256 * 1024 {
            s.poll_transmit(link, now, &mut socket, 64 * 1024);
        }
        assert!(s.held_bytes() <= s.config().peer_buffer_limit);
    }
    assert!(
        !s.wants_input(),
        "after {ch} opens the session still asks for input"
    );
    assert!(s.held_bytes() < 2 * CONTROL_QUEUE_LIMIT + 256 * 1024);
    // Once the guest reads (and acknowledges), every open is answered: what was not decoded
    // waited in the decoder, nothing was dropped.
    let opened = (ch - 1) / 2;
    let mut refused = 0;
    let mut read = socket;
    for _ in 0..10_000 {
        s.poll_transmit(link, now, &mut read, 1 << 20);
        let mut d = Decoder::new(1 << 20);
        d.push(&read);
        refused += d
            .filter_map(Result::ok)
            .filter(|f| f.header.kind == Kind::Reset as u8)
            .count() as u32;
        read.clear();
        if refused == opened {
            break;
        }
        let mut ack = Vec::new();
        encode(
            &mut ack,
            Kind::Ack as u8,
            0,
            0,
            s.stats().frames_sent as u32,
            &[],
        );
        s.handle_input(link, &ack, now);
        while let Some(ev) = s.poll_event() {
            if let Event::ChannelOpened { id, .. } = ev {
                let _ = s.reset(id, ResetCode::Refused, "no service");
            }
        }
    }
    assert_eq!(refused, opened, "every open answered");
    assert!(s.wants_input(), "a reading guest is served again");
    assert_eq!(s.stats().deferred, 0);
}

/// The same churn from a guest that reads everything but acknowledges nothing: the control
/// queue cannot be sent (unacknowledged data at its limit), so input is still read (for the
/// acknowledgements) but its sequenced frames are dropped: nothing grows.
#[test]
fn open_churn_from_a_peer_that_never_acknowledges_is_bounded() {
    let now = Instant::now();
    let (mut s, link) = bounded_host(now);
    let mut evil = Evil::new();
    let mut most = 0;
    for round in 0..2000u32 {
        for i in 0..100 {
            evil.open(1 + 2 * (round * 100 + i), 1 << 20);
        }
        s.handle_input(link, &std::mem::take(&mut evil.wire), now);
        while let Some(ev) = s.poll_event() {
            if let Event::ChannelOpened { id, .. } = ev {
                let _ = s.reset(id, ResetCode::Refused, "no service");
            }
        }
        let mut read = Vec::new();
        s.poll_transmit(link, now, &mut read, 1 << 20);
        assert!(s.wants_input(), "acknowledgements can only come with input");
        most = most.max(s.held_bytes());
    }
    assert!(s.stats().deferred > 0);
    assert!(
        most < 2 * CONTROL_QUEUE_LIMIT + s.config().max_unacked + 64 * 1024,
        "{most} bytes held"
    );
}

/// Whatever a guest sends (channels filled to credit, credit lies, never-acknowledged data,
/// one-byte frames, garbage), while our application fills every send buffer and reads nothing,
/// the session never holds more than `peer_buffer_limit`.
#[test]
fn a_hostile_guest_never_makes_the_session_hold_more_than_its_limit() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    for seed in 0..20 {
        let mut rng = StdRng::seed_from_u64(seed);
        let now = Instant::now();
        let (mut s, link) = bounded_host(now);
        let limit = s.config().peer_buffer_limit;
        let mut evil = Evil::new();
        let mut opened: Vec<(u32, u64)> = Vec::new();
        let mut next = 1;
        let mut most = 0;
        for _ in 0..400 {
            match rng.random_range(0..10) {
                0 | 1 => {
                    evil.open(next, u32::MAX);
                    opened.push((next, 0));
                    next += 2;
                }
                2..=5 if !opened.is_empty() => {
                    let i = rng.random_range(0..opened.len());
                    let (id, sent) = &mut opened[i];
                    let room = (16 * 1024u64).saturating_sub(*sent);
                    let len = [1, 7, 300, 600, 4096][rng.random_range(0..5)].min(room as usize);
                    for _ in 0..rng.random_range(1..50) {
                        if *sent + len as u64 > 16 * 1024 {
                            break;
                        }
                        *sent += len as u64;
                        let payload = vec![0x55; len];
                        evil.frame(Kind::Data, *id, &payload);
                    }
                }
                6 if !opened.is_empty() => {
                    let id = opened[rng.random_range(0..opened.len())].0;
                    evil.frame(Kind::Credit, id, &u32::MAX.to_le_bytes());
                }
                7 => evil
                    .wire
                    .extend((0..rng.random_range(1..2000)).map(|_| rng.random::<u8>())),
                _ => {}
            }
            s.handle_input(link, &std::mem::take(&mut evil.wire), now);
            while let Some(ev) = s.poll_event() {
                if let Event::ChannelOpened { id, .. } = ev {
                    s.accept(id).expect("accept");
                }
            }
            let ids: Vec<u32> = s.channels().map(|c| c.id).collect();
            for id in ids {
                while s.send(id, &[0xAA; 8192]).unwrap_or(0) > 0 {}
            }
            // The guest takes everything we send and never acknowledges it.
            let mut out = Vec::new();
            s.poll_transmit(link, now, &mut out, 1 << 20);
            most = most.max(s.held_bytes());
            assert!(
                most <= limit,
                "seed {seed}: {most} bytes held, limit {limit}"
            );
        }
        let channels = limit - s.config().fixed_charge(1);
        assert!(
            most > channels / 2,
            "seed {seed}: the test filled too little ({most} of {channels})"
        );
    }
}

/// A guest that goes away leaves nothing behind once `resume_timeout` has passed.
#[test]
fn a_guest_that_went_away_is_forgotten_after_the_resume_timeout() {
    let t0 = Instant::now();
    let (mut s, link) = bounded_host(t0);
    let mut evil = Evil::new();
    for ch in [1, 3, 5] {
        evil.open(ch, 1 << 20);
        evil.frame(Kind::Data, ch, &[1; 4000]);
    }
    s.handle_input(link, &evil.wire, t0);
    while let Some(ev) = s.poll_event() {
        if let Event::ChannelOpened { id, .. } = ev {
            s.accept(id).expect("accept");
            s.send(id, &[2; 10_000]).expect("send");
        }
    }
    let mut out = Vec::new();
    s.poll_transmit(link, t0, &mut out, 1 << 20);
    assert!(s.held_bytes() > 30_000);
    s.remove_link(link);
    let timeout = s.config().resume_timeout;
    s.handle_timeout(t0 + timeout / 2);
    assert_eq!(s.channels().count(), 3, "kept for a resume at first");
    let expiry = s.poll_timeout().expect("a timer for the expiry");
    assert!(expiry <= t0 + timeout);
    s.handle_timeout(expiry);
    assert_eq!(s.channels().count(), 0);
    assert_eq!(s.held_bytes(), 0);
    assert_eq!(s.stats().expired, 1);
    let lost = events(&mut s)
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::ChannelReset {
                    code: ResetCode::SessionLost,
                    ..
                }
            )
        })
        .count();
    assert_eq!(lost, 3);
}

/// A flood of violations gives a few events per kind and second plus one count of the rest;
/// every violation is counted in the stats.
#[test]
fn protocol_error_reports_are_rate_limited_per_kind() {
    let t0 = Instant::now();
    let (mut s, link) = bounded_host(t0);
    s.handle_input(link, &hello_frame(7), t0);
    let mut flood = Vec::new();
    for i in 0..10_000u32 {
        flood.extend_from_slice(&[0xA9, 0x5C]); // a marker with no header: bad-header
        encode(&mut flood, Kind::Ack as u8, 0, 0, 1000 + i, &[]); // acknowledges the future
    }
    s.handle_input(link, &flood, t0);
    let reported = |evs: &[Event], kind: ErrorKind| {
        evs.iter()
            .filter(|e| matches!(e, Event::ProtocolError { error, .. } if error.kind() == kind))
            .count()
    };
    let evs = events(&mut s);
    assert_eq!(reported(&evs, ErrorKind::BadHeader), 3);
    assert_eq!(reported(&evs, ErrorKind::BadAck), 3);
    let stats = s.stats();
    assert_eq!(stats.errors[ErrorKind::BadHeader as usize], 10_000);
    assert_eq!(stats.errors[ErrorKind::BadAck as usize], 10_000);
    assert_eq!(stats.suppressed[ErrorKind::BadAck as usize], 9_997);
    let flush = s.poll_timeout().expect("a timer for the summary");
    s.handle_timeout(flush);
    let evs = events(&mut s);
    assert!(evs.contains(&Event::ErrorsSuppressed {
        kind: ErrorKind::BadAck,
        count: 9_997
    }));
    assert!(evs.contains(&Event::ErrorsSuppressed {
        kind: ErrorKind::BadHeader,
        count: 9_997
    }));
}

/// What the application queued before any guest came waits for the first one, however long.
#[test]
fn nothing_expires_before_a_guest_was_ever_there() {
    let t0 = Instant::now();
    let (mut s, link) = bounded_host(t0);
    let id = s.open_channel("diag", "echo").expect("open");
    let later = t0 + 10 * s.config().resume_timeout;
    s.remove_link(link);
    s.handle_timeout(later);
    assert!(s.has_channel(id));
    assert_eq!(s.stats().expired, 0);
}
