//! Tests of the sans-io PPP endpoint (two endpoints, a scripted pppd-like peer, loss, dead
//! peers, hostile bytes), the framing, and the configuration.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::guest::{guest_pppd_options, Mode};
use super::host::{default_interface, Backend, PppConfig, Route};
use super::proto::{
    encode_frame, protocol, Deframer, Endpoint, EndpointConfig, Event, Frame, FrameError,
};
use super::{link_backoff, next_pause};

const A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn frames(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
    let mut d = Deframer::new(16384);
    let mut out = Vec::new();
    d.push(bytes, |f| out.push(f));
    out
}

/// CRC-16/X-25 bit by bit (RFC 1662's FCS-16), independent of the table in `proto`.
fn x25(data: &[u8]) -> u16 {
    let mut f: u16 = 0xffff;
    for &b in data {
        f ^= u16::from(b);
        for _ in 0..8 {
            f = if f & 1 != 0 {
                (f >> 1) ^ 0x8408
            } else {
                f >> 1
            };
        }
    }
    !f
}

#[test]
fn the_fcs_is_the_x25_crc() {
    assert_eq!(x25(b"123456789"), 0x906e, "the standard check value");
    let mut raw = Vec::new();
    encode_frame(&mut raw, protocol::IPV4, b"123456789", 0);
    // Nothing needs escaping here: flag, header, info, FCS low byte first, flag.
    let fcs = x25(b"\xff\x03\x00\x21123456789").to_le_bytes();
    let mut expected = b"\x7e\xff\x03\x00\x21123456789".to_vec();
    expected.extend_from_slice(&fcs);
    expected.push(0x7e);
    assert_eq!(raw, expected);
    assert_eq!(
        frames(&raw),
        vec![Ok(Frame {
            protocol: protocol::IPV4,
            info: b"123456789".to_vec()
        })]
    );
    let mut bad = raw.clone();
    bad[6] ^= 0x01;
    assert_eq!(frames(&bad), vec![Err(FrameError::BadFcs)]);
}

#[test]
fn framing_escapes_what_the_accm_says_and_survives_garbage() {
    let info: Vec<u8> = (0..=255u8).collect();
    for accm in [0, u32::MAX, 0x000a_0000] {
        let mut raw = Vec::new();
        encode_frame(&mut raw, protocol::IPV4, &info, accm);
        let inner = &raw[1..raw.len() - 1];
        assert!(!inner.contains(&0x7e));
        for b in 0..0x20u8 {
            if accm & (1 << b) != 0 {
                assert!(
                    !inner.contains(&b),
                    "{b:#x} not escaped with accm {accm:#x}"
                );
            }
        }
        // Garbage before, a flag-delimited frame, garbage after, split at every byte.
        let mut stream = vec![0x55, 0x7e, 0x12, 0x34, 0x7e];
        stream.extend_from_slice(&raw);
        stream.extend_from_slice(&[0x7d, 0x7e, 0x01]);
        let mut d = Deframer::new(1500);
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b), |f| got.push(f));
        }
        let good: Vec<_> = got.into_iter().filter_map(Result::ok).collect();
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].info, info);
    }
}

#[test]
fn compressed_headers_are_read() {
    // ACFC and PFC: no ff 03, a one-byte protocol.
    let fcs = x25(&[0x21, 0x45, 0x00]).to_le_bytes();
    let raw = [0x7e, 0x21, 0x45, 0x00, fcs[0], fcs[1], 0x7e];
    assert_eq!(
        frames(&raw),
        vec![Ok(Frame {
            protocol: 0x21,
            info: vec![0x45, 0x00]
        })]
    );
}

#[test]
fn oversized_frames_are_dropped_and_the_next_one_is_read() {
    let mut raw = Vec::new();
    encode_frame(&mut raw, protocol::IPV4, &[0u8; 5000], 0);
    encode_frame(&mut raw, protocol::IPV4, b"ok", 0);
    let mut d = Deframer::new(1500);
    let mut got = Vec::new();
    d.push(&raw, |f| got.push(f));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], Err(FrameError::TooLong));
    assert_eq!(got[1].as_ref().map(|f| f.info.clone()), Ok(b"ok".to_vec()));
}

/// Moves bytes between two endpoints (each `drop` says whether to lose a batch) until both are
/// quiet; returns the events each saw.
fn pump(
    a: &mut Endpoint,
    b: &mut Endpoint,
    now: Instant,
    mut lose: impl FnMut(bool) -> bool,
) -> (Vec<Event>, Vec<Event>) {
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let mut ab = Vec::new();
        a.poll_transmit(&mut ab);
        let mut ba = Vec::new();
        b.poll_transmit(&mut ba);
        if ab.is_empty() && ba.is_empty() {
            break;
        }
        if !ab.is_empty() && !lose(true) {
            b.handle_input(&ab, now);
        }
        if !ba.is_empty() && !lose(false) {
            a.handle_input(&ba, now);
        }
        ea.extend(std::iter::from_fn(|| a.poll_event()));
        eb.extend(std::iter::from_fn(|| b.poll_event()));
    }
    (ea, eb)
}

fn pair(now: Instant, mru_a: u16, mru_b: u16) -> (Endpoint, Endpoint) {
    (
        Endpoint::new(EndpointConfig::new(A, B, mru_a, 0x1111_1111), now),
        Endpoint::new(EndpointConfig::new(B, A, mru_b, 0x2222_2222), now),
    )
}

#[test]
fn two_endpoints_come_up_and_carry_packets() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now, 1500, 1400);
    let (ea, eb) = pump(&mut a, &mut b, now, |_| false);
    assert!(ea.contains(&Event::Up {
        local: A,
        remote: B,
        mtu: 1400
    }));
    assert!(eb.contains(&Event::Up {
        local: B,
        remote: A,
        mtu: 1400
    }));
    let packet: Vec<u8> = (0..1400).map(|i| (i * 7) as u8).collect();
    assert!(a.send_ip(&packet));
    assert!(!a.send_ip(&[0u8; 1401]), "larger than the peer's MRU");
    let (_, eb) = pump(&mut a, &mut b, now, |_| false);
    assert_eq!(eb, vec![Event::Packet(packet)]);
    assert_eq!(b.stats().packets_in, 1);
}

#[test]
fn lost_requests_are_sent_again() {
    let start = Instant::now();
    let (mut a, mut b) = pair(start, 1500, 1500);
    // Everything A sends at first is lost.
    let (_, eb) = pump(&mut a, &mut b, start, |from_a| from_a);
    assert!(eb.is_empty());
    let mut now = start;
    let mut up = (false, false);
    for _ in 0..10 {
        now = a
            .poll_timeout()
            .into_iter()
            .chain(b.poll_timeout())
            .min()
            .expect("a timer");
        a.handle_timeout(now);
        b.handle_timeout(now);
        let (ea, eb) = pump(&mut a, &mut b, now, |_| false);
        up.0 |= ea.iter().any(|e| matches!(e, Event::Up { .. }));
        up.1 |= eb.iter().any(|e| matches!(e, Event::Up { .. }));
        if up == (true, true) {
            break;
        }
    }
    assert_eq!(up, (true, true));
    assert!(now - start <= Duration::from_secs(10));
}

#[test]
fn a_silent_peer_is_given_up_on() {
    let start = Instant::now();
    let mut a = Endpoint::new(EndpointConfig::new(A, B, 1500, 7), start);
    let mut now = start;
    let mut down = None;
    for _ in 0..20 {
        let Some(t) = a.poll_timeout() else { break };
        now = t;
        a.handle_timeout(now);
        let mut sink = Vec::new();
        a.poll_transmit(&mut sink);
        if let Some(Event::Down(why)) = a.poll_event() {
            down = Some(why);
            break;
        }
    }
    let why = down.expect("down");
    assert!(why.contains("Configure-Requests"), "{why}");
    assert_eq!(
        now - start,
        Duration::from_secs(30),
        "10 requests, 3 s apart"
    );
    assert!(a.is_down());
}

#[test]
fn a_peer_that_stops_answering_echoes_is_declared_dead() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now, 1500, 1500);
    pump(&mut a, &mut b, now, |_| false);
    assert!(a.is_up());
    // B answers two echoes, then is gone.
    let mut t;
    for _ in 0..2 {
        t = a.poll_timeout().expect("echo timer");
        a.handle_timeout(t);
        pump(&mut a, &mut b, t, |_| false);
    }
    assert!(a.is_up());
    let mut down = None;
    for _ in 0..10 {
        t = a.poll_timeout().expect("echo timer");
        a.handle_timeout(t);
        let mut sink = Vec::new();
        a.poll_transmit(&mut sink);
        if let Some(Event::Down(why)) = a.poll_event() {
            down = Some((t, why));
            break;
        }
    }
    let (t_down, why) = down.expect("down");
    assert!(why.contains("echo"), "{why}");
    // 4 unanswered echoes 5 s apart, declared dead at the 5th interval.
    assert_eq!(t_down - now, Duration::from_secs(2 * 5 + 5 * 5));
}

/// A frame as pppd would send it: LCP/IPCP packet with options.
fn control(proto: u16, code: u8, id: u8, options: &[u8]) -> Vec<u8> {
    let mut info = vec![code, id];
    info.extend_from_slice(&((options.len() + 4) as u16).to_be_bytes());
    info.extend_from_slice(options);
    let mut raw = Vec::new();
    encode_frame(&mut raw, proto, &info, u32::MAX);
    raw
}

fn control_replies(e: &mut Endpoint) -> Vec<(u16, u8, Vec<u8>)> {
    let mut out = Vec::new();
    e.poll_transmit(&mut out);
    frames(&out)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|f| f.protocol != protocol::IPV4)
        .map(|f| (f.protocol, f.info[0], f.info[4..].to_vec()))
        .collect()
}

#[test]
fn pppd_style_requests_get_the_answers_pppd_expects() {
    let now = Instant::now();
    let mut e = Endpoint::new(EndpointConfig::new(A, B, 1500, 0x1234_5678), now);
    let first = control_replies(&mut e);
    assert_eq!(first.len(), 1, "one LCP Configure-Request");
    let (proto, code, opts) = &first[0];
    assert_eq!((*proto, *code), (protocol::LCP, 1));
    // MRU 1500, ACCM 0, magic.
    assert_eq!(
        opts,
        &[1, 4, 5, 220, 2, 6, 0, 0, 0, 0, 5, 6, 0x12, 0x34, 0x56, 0x78]
    );
    // pppd asks for PAP authentication (type 3): rejected, and only that.
    let req = [1, 4, 5, 220, 3, 4, 0xc0, 0x23, 5, 6, 9, 9, 9, 9, 7, 2, 8, 2];
    e.handle_input(&control(protocol::LCP, 1, 1, &req), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::LCP, 4, vec![3, 4, 0xc0, 0x23])]
    );
    // Without it: acknowledged as sent.
    let req = [1, 4, 5, 220, 5, 6, 9, 9, 9, 9, 7, 2, 8, 2];
    e.handle_input(&control(protocol::LCP, 1, 2, &req), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::LCP, 2, req.to_vec())]
    );
    // Our request acknowledged: LCP open, IPCP starts with our address.
    let ack = &first[0].2;
    e.handle_input(&control(protocol::LCP, 2, 1, ack), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::IPCP, 1, vec![3, 6, 10, 77, 0, 1])]
    );
    // noipdefault: the peer asks for 0.0.0.0 and VJ compression: VJ is rejected first...
    let req = [2, 6, 0, 0x2d, 0x0f, 0x01, 3, 6, 0, 0, 0, 0];
    e.handle_input(&control(protocol::IPCP, 1, 1, &req), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::IPCP, 4, vec![2, 6, 0, 0x2d, 0x0f, 0x01])]
    );
    // ...then 0.0.0.0 gets a Nak with the configured address...
    e.handle_input(&control(protocol::IPCP, 1, 2, &[3, 6, 0, 0, 0, 0]), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::IPCP, 3, vec![3, 6, 10, 77, 0, 2])]
    );
    // ...which the peer then asks for and gets; with our request acknowledged the link is up.
    e.handle_input(&control(protocol::IPCP, 1, 3, &[3, 6, 10, 77, 0, 2]), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::IPCP, 2, vec![3, 6, 10, 77, 0, 2])]
    );
    e.handle_input(&control(protocol::IPCP, 2, 1, &[3, 6, 10, 77, 0, 1]), now);
    assert_eq!(
        e.poll_event(),
        Some(Event::Up {
            local: A,
            remote: B,
            mtu: 1500
        })
    );
    // IPv6CP and CCP get a Protocol-Reject; an echo request an echo reply with our magic.
    e.handle_input(
        &control(0x8057, 1, 1, &[1, 10, 0, 0, 0, 0, 0, 0, 0, 1]),
        now,
    );
    let r = control_replies(&mut e);
    assert_eq!((r[0].0, r[0].1), (protocol::LCP, 8));
    assert_eq!(&r[0].2[..2], &[0x80, 0x57]);
    e.handle_input(&control(protocol::LCP, 9, 7, &[9, 9, 9, 9, 1, 2]), now);
    assert_eq!(
        control_replies(&mut e),
        vec![(protocol::LCP, 10, vec![0x12, 0x34, 0x56, 0x78, 1, 2])]
    );
    // A Terminate-Request is acknowledged and ends the link.
    e.handle_input(&control(protocol::LCP, 5, 3, b""), now);
    assert_eq!(control_replies(&mut e), vec![(protocol::LCP, 6, vec![])]);
    assert!(matches!(e.poll_event(), Some(Event::Down(_))));
    assert!(e.is_down());
}

#[test]
fn a_looped_back_line_is_noticed() {
    let now = Instant::now();
    let mut e = Endpoint::new(EndpointConfig::new(A, B, 1500, 0x0bad_cafe), now);
    let mut out = Vec::new();
    e.poll_transmit(&mut out);
    // Our own request comes back: its magic number is ours, so it is refused with a Nak.
    e.handle_input(&out, now);
    let r = control_replies(&mut e);
    assert_eq!((r[0].0, r[0].1), (protocol::LCP, 3));
}

proptest! {
    #[test]
    fn hostile_bytes_never_panic_and_output_stays_bounded(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..40)
    ) {
        let now = Instant::now();
        let mut e = Endpoint::new(EndpointConfig::new(A, B, 1500, 5), now);
        let mut out = Vec::new();
        for c in &chunks {
            e.handle_input(c, now);
            out.clear();
            e.poll_transmit(&mut out);
            // Every reply is at most one frame per input frame, each bounded by the peer's MRU.
            prop_assert!(out.len() <= 2 * (c.len() + 16) * 3 + 64);
            while e.poll_event().is_some() {}
        }
    }

    #[test]
    fn framing_round_trips(info in proptest::collection::vec(any::<u8>(), 0..2000), accm in any::<u32>()) {
        let mut raw = Vec::new();
        encode_frame(&mut raw, protocol::IPV4, &info, accm);
        prop_assert_eq!(frames(&raw), vec![Ok(Frame { protocol: protocol::IPV4, info })]);
    }
}

fn config(extra: &str) -> Result<PppConfig, String> {
    let text = format!("local = \"10.77.0.1\"\nremote = \"10.77.0.2\"\n{extra}");
    let c: PppConfig = toml_like(&text)?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// The devices crate has no TOML parser; the section is JSON-shaped for these tests.
fn toml_like(text: &str) -> Result<PppConfig, String> {
    let mut map = serde_json::Map::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line.split_once('=').ok_or("no =")?;
        let v: serde_json::Value = serde_json::from_str(v.trim()).map_err(|e| e.to_string())?;
        map.insert(k.trim().to_owned(), v);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

#[test]
fn the_config_section_has_defaults_and_checks() {
    let c = config("").expect("minimal");
    assert_eq!(
        (c.mtu, c.backend, c.echo_interval_secs),
        (1500, Backend::Pppd, 5)
    );
    assert_eq!(c.pppd.to_str(), Some("/usr/sbin/pppd"));
    assert_eq!(c.interface_name("lab"), "ppp-lab");
    let o = c.pppd_options("lab");
    for w in [
        ["10.77.0.1:10.77.0.2"].as_slice(),
        &["mtu", "1500"],
        &["mru", "1500"],
        &["ifname", "ppp-lab"],
        &["asyncmap", "0"],
        &["lcp-echo-interval", "5"],
    ] {
        assert!(o.windows(w.len()).any(|x| x == w), "{w:?} not in {o:?}");
    }
    for flag in ["nodetach", "noauth", "local", "nocrtscts", "nodefaultroute"] {
        assert!(o.iter().any(|x| x == flag), "{flag}");
    }
    let c = config(
        "backend = \"tun\"\nmtu = 576\nroutes = [\"10.78.0.0/24\", \"10.79.1.1\"]\noptions = [\"debug\"]\nnetns = \"vs\"",
    )
    .expect("full");
    assert_eq!(c.backend, Backend::Tun);
    assert_eq!(
        c.routes,
        vec![
            Route {
                net: Ipv4Addr::new(10, 78, 0, 0),
                prefix: 24
            },
            Route {
                net: Ipv4Addr::new(10, 79, 1, 1),
                prefix: 32
            }
        ]
    );
    assert_eq!(
        c.pppd_options("g").last().map(String::as_str),
        Some("debug")
    );
    for (bad, why) in [
        ("mtu = 100", "mtu"),
        ("mtu = 20000", "mtu"),
        ("interface = \"a very long interface name\"", "interface"),
        ("interface = \"a/b\"", "interface"),
        ("routes = [\"10.0.0.0/33\"]", "prefix"),
        ("routes = [\"ten/8\"]", "IPv4"),
        ("bogus = 1", "unknown field"),
        ("options = [\"a\\nb\"]", "newline"),
    ] {
        let e = config(bad).expect_err(bad);
        assert!(e.contains(why), "{bad}: {e}");
    }
    let same: Result<PppConfig, _> = toml_like("local = \"10.1.1.1\"\nremote = \"10.1.1.1\"");
    assert!(same.expect("parses").validate().is_err());
}

#[test]
fn interface_names_fit_the_kernel() {
    assert_eq!(default_interface("lab"), "ppp-lab");
    assert_eq!(default_interface("a guest/with:odd"), "ppp-a_guest_wit");
    assert!(default_interface(&"x".repeat(64)).len() <= 15);
}

#[test]
fn guest_settings() {
    assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
    assert_eq!("on".parse::<Mode>(), Ok(Mode::Channel));
    assert!(matches!(
        "port:org.vstream.ppp".parse::<Mode>(),
        Ok(Mode::Transport(_))
    ));
    assert!("bogus:1".parse::<Mode>().is_err());
    let o = guest_pppd_options();
    for flag in [
        "noipdefault",
        "nodetach",
        "noauth",
        "local",
        "nodefaultroute",
    ] {
        assert!(o.iter().any(|x| x == flag), "{flag}");
    }
    assert!(o.windows(2).any(|w| w == ["mru", "16384"]));
}

#[test]
fn failing_links_back_off() {
    let mut b = link_backoff();
    let mut seen = Vec::new();
    for _ in 0..8 {
        seen.push(next_pause(&mut b, Duration::from_secs(1)).as_secs());
    }
    assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(
        next_pause(&mut b, Duration::from_secs(600)),
        Duration::from_secs(1)
    );
}
