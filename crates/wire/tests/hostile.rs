//! A hand-written hostile peer: every violation resets only the offending channel; other
//! channels keep flowing, and each violation is reported as a clear error.

use std::time::Instant;

use vstream_wire::frame::{encode, Decoder};
use vstream_wire::{
    Config, Event, Hello, Kind, LinkParams, ProtocolError, Recv, ResetCode, Role, Session,
};

struct Evil {
    seq: u32,
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
            wire: hello_frame(7),
        }
    }

    fn frame(&mut self, kind: Kind, channel: u32, payload: &[u8]) {
        encode(&mut self.wire, kind as u8, channel, self.seq, 0, payload);
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
