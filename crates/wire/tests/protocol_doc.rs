//! Statements of docs/PROTOCOL.md that a second implementation relies on, checked against the
//! reference, so that the document and the code cannot drift apart silently. Each test names
//! the section it pins.

use std::time::Instant;

use vstream_wire::frame::{encode, flags, Decoder, HEADER_LEN};
use vstream_wire::hello::{caps, HelloError};
use vstream_wire::{
    ChannelError, Config, DecodeError, Event, Frame, Hello, Kind, LinkId, LinkParams,
    ProtocolError, ResetCode, Role, Session,
};

/// A hand-driven guest talking to a reference host over one link.
struct Peer {
    host: Session,
    link: LinkId,
    now: Instant,
    /// The guest's next session frame number.
    seq: u32,
}

fn guest_hello(my_session: u64, link: u32, echo: u32) -> Hello {
    Hello {
        version: 1,
        role: Role::Guest,
        caps: caps::RESUME,
        my_session,
        your_session: 0,
        recv_next: 0,
        max_frame: 65536,
        link,
        echo,
        name: "g".into(),
    }
}

fn decode_all(wire: &[u8]) -> Vec<Frame> {
    let mut d = Decoder::new(1 << 20);
    d.push(wire);
    d.by_ref()
        .map(|r| r.expect("the reference sends sound frames"))
        .collect()
}

impl Peer {
    fn new() -> Peer {
        Peer::on(LinkParams::stream(0))
    }

    /// A peer on a link of the given kind.
    fn on(params: LinkParams) -> Peer {
        let now = Instant::now();
        let mut host = Session::new(Config::new(Role::Host, "h"), 99, now);
        let link = host.add_link(params, now);
        Peer {
            host,
            link,
            now,
            seq: 0,
        }
    }

    fn hello(&mut self, hello: &Hello) {
        self.send(Kind::Hello, 0, 0, &hello.encode());
    }

    /// One frame with the given `seq` (and `ack` 0).
    fn send(&mut self, kind: Kind, channel: u32, seq: u32, payload: &[u8]) {
        let mut wire = Vec::new();
        encode(&mut wire, kind as u8, channel, seq, 0, payload);
        self.host.handle_input(self.link, &wire, self.now);
    }

    /// A session frame with the next sequence number.
    fn session(&mut self, kind: Kind, channel: u32, payload: &[u8]) {
        self.seq += 1;
        self.send(kind, channel, self.seq - 1, payload);
    }

    fn open(&mut self, channel: u32, class: &[u8], name: &[u8], window: u32) {
        let mut p = vec![class.len() as u8];
        p.extend_from_slice(class);
        p.push(name.len() as u8);
        p.extend_from_slice(name);
        p.extend_from_slice(&window.to_le_bytes());
        self.session(Kind::Open, channel, &p);
    }

    /// What the host writes on `link` now.
    fn transmit_on(&mut self, link: LinkId) -> Vec<Frame> {
        let mut out = Vec::new();
        self.host.poll_transmit(link, self.now, &mut out, 1 << 20);
        decode_all(&out)
    }

    fn transmit(&mut self) -> Vec<Frame> {
        self.transmit_on(self.link)
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.host.poll_event()).collect()
    }

    /// Completes the handshake as a well-behaved guest (session 42, link 7) that heard the
    /// host's HELLO. Returns the host's `link` value.
    fn up(&mut self) -> u32 {
        let sent = self.transmit();
        let host_link = Hello::decode(&sent[0].payload).expect("host HELLO").link;
        self.hello(&guest_hello(42, 7, host_link));
        assert!(self.host.link_is_up(self.link));
        self.events();
        host_link
    }
}

fn kinds(frames: &[Frame]) -> Vec<u8> {
    frames.iter().map(|f| f.header.kind).collect()
}

/// §1: `hcrc` is the CRC-32C of bytes 0 to 19, the 20 bytes before it.
#[test]
fn hcrc_covers_the_first_20_bytes() {
    let mut f = Vec::new();
    encode(&mut f, Kind::Data as u8, 1, 7, 3, b"hi");
    let hcrc = u32::from_le_bytes(f[20..24].try_into().expect("4 bytes"));
    assert_eq!(crc32c::crc32c(&f[..20]), hcrc);
    // A CRC over 21 bytes (`0..=20`) is not a header.
    let wrong = crc32c::crc32c(&f[..21]);
    f[20..HEADER_LEN].copy_from_slice(&wrong.to_le_bytes());
    let mut d = Decoder::new(1024);
    d.push(&f);
    assert_eq!(d.next(), Some(Err(DecodeError::BadHeader)));
}

/// §3: a 40-byte fixed part, then `name_len` at offset 40 and the name; bytes after the name
/// are ignored.
#[test]
fn hello_fixed_part_is_40_bytes_then_name_len_and_name() {
    let h = Hello {
        name: "ab".into(),
        ..guest_hello(42, 7, 0)
    };
    let p = h.encode();
    assert_eq!(p.len(), 41 + 2);
    assert_eq!((p[40], &p[41..]), (2, &b"ab"[..]));
    assert_eq!(Hello::decode(&p[..40]), Err(HelloError::Truncated(40)));
    let mut longer = p.clone();
    longer.extend_from_slice(b"future fields");
    assert_eq!(Hello::decode(&longer), Ok(h));
}

/// §3: a HELLO carries `seq` and `ack` 0 even when the sender has received session frames; the
/// payload's `recv_next` says how far.
#[test]
fn hello_frames_carry_seq_and_ack_0() {
    let mut p = Peer::new();
    p.up();
    p.open(1, b"diag", b"echo", 1000);
    let second = p.host.add_link(LinkParams::stream(1), p.now);
    let sent = p.transmit_on(second);
    assert_eq!(sent[0].header.kind, Kind::Hello as u8);
    assert_eq!((sent[0].header.seq, sent[0].header.ack), (0, 0));
    assert_eq!(Hello::decode(&sent[0].payload).expect("HELLO").recv_next, 1);
}

/// §3: the link is up once the peer's HELLO is accepted, even before the peer echoed our `link`
/// value; session frames follow at once. A repeated HELLO with the same `link` is not a new
/// handshake, but while its `echo` differs from our `link` value we send our HELLO again.
#[test]
fn link_up_on_the_peers_hello_and_hello_repeated_while_echo_differs() {
    let mut p = Peer::new();
    let host_link = Hello::decode(&p.transmit()[0].payload).expect("HELLO").link;
    p.host.open_channel("diag", "echo").expect("open");
    p.hello(&guest_hello(42, 7, 0));
    assert!(p.host.link_is_up(p.link));
    let sent = p.transmit();
    assert_eq!(kinds(&sent), [Kind::Hello as u8, Kind::Open as u8]);
    assert_eq!(Hello::decode(&sent[0].payload).expect("HELLO").echo, 7);

    p.events();
    p.hello(&guest_hello(42, 7, 0));
    assert_eq!(p.events(), [], "a repeated HELLO is no new handshake");
    assert_eq!(
        kinds(&p.transmit()),
        [Kind::Hello as u8],
        "echo differs: HELLO again"
    );
    p.hello(&guest_hello(42, 7, host_link));
    assert_eq!(p.events(), []);
    assert_eq!(p.transmit().len(), 0, "echo matches: nothing to say");
}

/// §3: when a session starts, `recv_next` and `your_session` are ignored (no bad
/// acknowledgement), and both sides number from 0, also after a peer restart.
#[test]
fn a_new_session_ignores_recv_next_and_your_session() {
    let mut p = Peer::new();
    p.transmit();
    p.hello(&Hello {
        recv_next: 5,
        your_session: 12345,
        ..guest_hello(42, 7, 0)
    });
    let ev = p.events();
    assert!(
        matches!(ev[..], [Event::LinkUp { resumed: false, .. }]),
        "{ev:?}"
    );
    p.host.open_channel("diag", "echo").expect("open");
    let sent = p.transmit();
    assert_eq!(sent[1].header.seq, 0);

    // The guest restarts: new session id, and a `recv_next` that would acknowledge the OPEN.
    p.hello(&Hello {
        recv_next: 1,
        your_session: 99,
        ..guest_hello(43, 8, 0)
    });
    assert!(p.events().iter().any(|e| matches!(
        e,
        Event::ChannelReset {
            code: ResetCode::SessionLost,
            ..
        }
    )));
    p.host.open_channel("diag", "echo").expect("open");
    let sent = p.transmit();
    assert_eq!(kinds(&sent), [Kind::Hello as u8, Kind::Open as u8]);
    assert_eq!(sent[1].header.seq, 0, "numbering restarts at 0");
}

/// §3: `max_frame` may equal 1 MiB; one byte more is oversized, whatever the configuration.
#[test]
fn max_frame_of_1_mib_is_accepted() {
    let mib = 1u32 << 20;
    for limit in [mib, u32::MAX] {
        let mut wire = Vec::new();
        encode(
            &mut wire,
            Kind::Data as u8,
            1,
            0,
            0,
            &vec![5u8; mib as usize],
        );
        encode(
            &mut wire,
            Kind::Data as u8,
            1,
            1,
            0,
            &vec![6u8; mib as usize + 1],
        );
        let mut d = Decoder::new(limit);
        d.push(&wire);
        assert_eq!(
            d.next().expect("frame").expect("sound").payload.len(),
            1 << 20
        );
        assert!(matches!(
            d.next(),
            Some(Err(DecodeError::Oversized { limit: 1048576, .. }))
        ));
    }
}

/// §3: a HELLO announcing more than 1 MiB is not refused (it only caps what we send); an
/// announced 0 is treated as 1.
#[test]
fn announced_max_frame_above_1_mib_is_accepted_and_0_means_1() {
    for (announced, largest) in [(u32::MAX, 64 * 1024), (0, 1)] {
        let mut p = Peer::new();
        p.transmit();
        p.hello(&Hello {
            max_frame: announced,
            ..guest_hello(42, 7, 0)
        });
        assert!(p.host.link_is_up(p.link), "max_frame {announced}");
        p.open(1, b"diag", b"echo", 1 << 20);
        p.host.accept(1).expect("accept");
        assert_eq!(p.host.send(1, &[9u8; 100_000]).expect("send"), 100_000);
        let sent = p.transmit();
        let data: Vec<usize> = sent
            .iter()
            .filter(|f| f.header.kind == Kind::Data as u8)
            .map(|f| f.payload.len())
            .collect();
        assert!(!data.is_empty());
        assert_eq!(data.iter().max(), Some(&largest), "max_frame {announced}");
    }
}

/// §1.1 step 3: an oversized frame is skipped whole, `24 + len + 4` bytes from its magic: the
/// next frame is found with no garbage in between.
#[test]
fn an_oversized_frame_is_skipped_header_included() {
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Data as u8, 1, 0, 0, &[1u8; 5000]);
    encode(&mut wire, Kind::Data as u8, 1, 1, 0, b"next");
    for piece in [wire.len(), 1] {
        let mut d = Decoder::new(1000);
        let mut items = Vec::new();
        for chunk in wire.chunks(piece) {
            d.push(chunk);
            items.extend(d.by_ref());
        }
        assert!(matches!(
            items[0],
            Err(DecodeError::Oversized { len: 5000, .. })
        ));
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[1].as_ref().expect("frame").payload, &b"next"[..]);
        assert_eq!(d.stats().garbage_bytes, 0);
    }
}

/// §4: no delay or threshold: frames received (in order or duplicates) make one standalone ACK
/// due with the next write, unless another frame carries `ack`; a link coming up does too.
#[test]
fn a_standalone_ack_is_due_after_each_batch_of_session_frames() {
    let mut p = Peer::new();
    p.up();
    let sent = p.transmit();
    assert_eq!(kinds(&sent), [Kind::Ack as u8], "link up");

    p.open(1, b"diag", b"echo", 1000);
    p.open(3, b"diag", b"echo", 1000);
    let sent = p.transmit();
    assert_eq!(kinds(&sent), [Kind::Ack as u8]);
    assert_eq!(sent[0].header.ack, 2);
    assert_eq!(p.transmit().len(), 0, "one ACK per batch");

    p.send(Kind::Open, 1, 0, b"a duplicate, acknowledged again");
    assert_eq!(kinds(&p.transmit()), [Kind::Ack as u8]);

    p.session(Kind::Credit, 1, &100u32.to_le_bytes());
    p.host.accept(3).expect("accept");
    let sent = p.transmit();
    assert_eq!(
        kinds(&sent),
        [Kind::OpenOk as u8],
        "OPEN_OK carries the ack"
    );
    assert_eq!(sent[0].header.ack, 3);
}

/// §5: class and name of up to 255 bytes each; the payload length must be exact; a RESET
/// reason may be empty.
#[test]
fn open_names_reach_255_bytes_and_reset_reasons_may_be_empty() {
    let mut p = Peer::new();
    p.up();
    assert_eq!(
        p.host.open_channel(&"c".repeat(256), "n"),
        Err(ChannelError::NameTooLong)
    );
    p.host
        .open_channel(&"c".repeat(255), &"n".repeat(255))
        .expect("255 bytes each");
    let open = p.transmit().remove(0);
    assert_eq!(open.header.kind, Kind::Open as u8);
    assert_eq!(open.payload.len(), 1 + 255 + 1 + 255 + 4);

    p.open(1, &[b'c'; 255], &[b'n'; 255], 1000);
    let ev = p.events();
    assert!(
        matches!(&ev[..], [Event::ChannelOpened { id: 1, class, name }]
            if class.len() == 255 && name.len() == 255),
        "{ev:?}"
    );

    let mut trailing = vec![4];
    trailing.extend_from_slice(b"diag\x04echo");
    trailing.extend_from_slice(&1000u32.to_le_bytes());
    trailing.push(0);
    p.session(Kind::Open, 3, &trailing);
    assert!(p.events().iter().any(|e| matches!(
        e,
        Event::ProtocolError {
            error: ProtocolError::BadFrame { channel: 3, .. },
            ..
        }
    )));

    p.session(Kind::Reset, 1, &(ResetCode::Resource as u16).to_le_bytes());
    assert_eq!(
        p.events(),
        [Event::ChannelReset {
            id: 1,
            code: ResetCode::Resource,
            reason: String::new()
        }]
    );
}

/// §3 NO_PAYLOAD_CRC: offered only on transports that check integrity; used only when both
/// HELLOs carry it. A peer without the bit (any implementation before it) gets frames with
/// their payload CRC, which its decoder checks as always.
#[test]
fn payload_crc_is_left_out_only_when_both_offer_it() {
    let caps_of = |p: &mut Peer| Hello::decode(&p.transmit()[0].payload).expect("HELLO").caps;
    // A virtio-serial port does not offer it.
    assert_eq!(caps_of(&mut Peer::new()) & caps::NO_PAYLOAD_CRC, 0);

    for (host_params, guest_caps, expect) in [
        (LinkParams::socket(0), caps::RESUME, false), // an old guest
        (
            LinkParams::socket(0),
            caps::RESUME | caps::NO_PAYLOAD_CRC,
            true,
        ),
        (
            LinkParams::stream(0),
            caps::RESUME | caps::NO_PAYLOAD_CRC,
            false,
        ), // a port
    ] {
        let mut p = Peer::on(host_params);
        let sent = p.transmit();
        let host = Hello::decode(&sent[0].payload).expect("host HELLO");
        assert_eq!(
            host.caps & caps::NO_PAYLOAD_CRC != 0,
            host_params.checksummed
        );
        p.hello(&Hello {
            caps: guest_caps,
            echo: host.link,
            ..guest_hello(42, 7, 0)
        });
        assert!(p.host.link_is_up(p.link));
        assert_eq!(p.host.link_skips_payload_crc(p.link), expect);
        p.host.open_channel("diag", "echo").expect("open");
        let read = |p: &mut Peer| {
            let mut out = Vec::new();
            p.host.poll_transmit(p.link, p.now, &mut out, 1 << 20);
            let mut d = Decoder::new(1 << 20);
            d.set_no_pcrc(expect);
            d.push(&out);
            let frames: Vec<Frame> = d.by_ref().map(|r| r.expect("sound")).collect();
            (out, frames)
        };
        let (out, frames) = read(&mut p);
        assert_eq!(kinds(&frames), [Kind::Open as u8]);
        if expect {
            assert_eq!(frames[0].header.flags, flags::NO_PCRC);
            assert_eq!(out[out.len() - 4..], [0; 4], "pcrc is present and 0");
        } else {
            // Exactly what a decoder that knows nothing of the mode accepts.
            assert_eq!(frames[0].header.flags, 0);
            assert_eq!(decode_all(&out).len(), 1);
        }
        // The peer's frames in the negotiated mode are accepted and answered.
        let mut wire = Vec::new();
        let f = if expect { flags::NO_PCRC } else { 0 };
        vstream_wire::frame::encode_flagged(&mut wire, f, Kind::Ping as u8, 0, 0, 0, &[9; 8]);
        p.host.handle_input(p.link, &wire, p.now);
        assert_eq!(
            p.host.link_stats(p.link).expect("link").decode.crc_errors,
            0
        );
        let (_, frames) = read(&mut p);
        assert_eq!(kinds(&frames), [Kind::Pong as u8]);
        assert_eq!(&frames[0].payload[..], &[9; 8]);
    }
}
