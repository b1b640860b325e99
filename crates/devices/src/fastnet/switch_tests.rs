//! Tests of the built-in switch: the sans-io core frame by frame (learning, ageing, flooding,
//! spoofing, queue and table bounds), a property test of its invariants over arbitrary
//! traffic, two async ports moving frames, and the `switch` settings.

use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::switch::*;
use super::tap::VNET_HDR_LEN;

const BROADCAST: Mac = [0xff; 6];

fn mac(n: u8) -> Mac {
    [0x02, 0x76, 0x73, 0, 0, n]
}

/// A frame as the links carry it: a vnet header, then Ethernet `dst`, `src`, IPv4, `body`.
fn frame(dst: Mac, src: Mac, body: &[u8]) -> Bytes {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(body);
    Bytes::from(f)
}

fn port(sw: &mut Switch, n: u8, spoof: bool) -> PortId {
    sw.add_port(PortConfig {
        mac: Some(mac(n)),
        allow_mac_spoofing: spoof,
    })
    .0
}

fn drain(sw: &mut Switch, p: PortId) -> Vec<Bytes> {
    std::iter::from_fn(|| sw.pop(p)).collect()
}

fn switch() -> Switch {
    Switch::new(Limits::default(), VNET_HDR_LEN)
}

#[test]
fn unicast_to_a_known_mac_reaches_only_its_port_and_broadcast_floods_all_others() {
    let mut sw = switch();
    let t = Instant::now();
    let (a, b, c) = (
        port(&mut sw, 1, false),
        port(&mut sw, 2, false),
        port(&mut sw, 3, false),
    );
    let f = frame(mac(2), mac(1), b"to b");
    assert_eq!(sw.input(a, f.clone(), t), Verdict::Forwarded(vec![b]));
    assert_eq!(drain(&mut sw, b), vec![f]);
    assert!(drain(&mut sw, c).is_empty() && drain(&mut sw, a).is_empty());

    for dst in [
        BROADCAST,
        [0x01, 0x00, 0x5e, 0, 0, 1],
        [0x33, 0x33, 0, 0, 0, 1],
    ] {
        let f = frame(dst, mac(3), b"everyone");
        assert_eq!(sw.input(c, f.clone(), t), Verdict::Forwarded(vec![a, b]));
        assert_eq!(drain(&mut sw, a), vec![f.clone()]);
        assert_eq!(drain(&mut sw, b), vec![f]);
        assert!(
            drain(&mut sw, c).is_empty(),
            "a flood never returns to its sender"
        );
    }
}

#[test]
fn macs_behind_a_port_that_may_spoof_are_learned_and_age_out() {
    let mut sw = Switch::new(
        Limits {
            ageing: Duration::from_secs(10),
            ..Limits::default()
        },
        VNET_HDR_LEN,
    );
    let t0 = Instant::now();
    let (a, h, c) = (
        port(&mut sw, 1, false),
        port(&mut sw, 9, true),
        port(&mut sw, 3, false),
    );
    let behind = [0x02, 0, 0, 0, 0, 0x42];
    // Unknown: flooded.
    let f = frame(behind, mac(1), b"?");
    assert_eq!(sw.input(a, f, t0), Verdict::Forwarded(vec![h, c]));
    // h sends from it: learned, so the next frame goes to h only.
    let from_h = frame(mac(1), behind, b"here");
    assert_eq!(sw.input(h, from_h, t0), Verdict::Forwarded(vec![a]));
    let f = frame(behind, mac(1), b"!");
    let t1 = t0 + Duration::from_secs(9);
    assert_eq!(sw.input(a, f.clone(), t1), Verdict::Forwarded(vec![h]));
    // Not seen for the ageing time: flooded again, and purged.
    let t2 = t0 + Duration::from_secs(11);
    assert_eq!(sw.input(a, f, t2), Verdict::Forwarded(vec![h, c]));
    assert_eq!(sw.macs(), 3, "only the ports' own MACs are left");
    // A frame for a MAC behind its own sender goes nowhere.
    let back = frame(behind, [0x02, 0, 0, 0, 0, 0x43], b"");
    sw.input(h, frame(BROADCAST, behind, b""), t2);
    assert_eq!(sw.input(h, back, t2), Verdict::Forwarded(vec![]));
}

#[test]
fn a_spoofed_source_is_dropped_and_counted_unless_allowed() {
    let mut sw = switch();
    let t = Instant::now();
    let (a, ca) = sw.add_port(PortConfig {
        mac: Some(mac(1)),
        allow_mac_spoofing: false,
    });
    let b = port(&mut sw, 2, false);
    let h = port(&mut sw, 9, true);
    // a claims b's MAC, then an unknown one: neither reaches anybody.
    for src in [mac(2), mac(77)] {
        assert_eq!(
            sw.input(a, frame(BROADCAST, src, b"x"), t),
            Verdict::Spoofed
        );
    }
    assert!(drain(&mut sw, b).is_empty() && drain(&mut sw, h).is_empty());
    let status = ca.snapshot("sw0");
    assert_eq!((status.frames_in, status.dropped_spoofed), (2, 2));
    // A port that may spoof sends from b's MAC, but b's MAC stays b's.
    let v = sw.input(h, frame(mac(1), mac(2), b"y"), t);
    assert_eq!(v, Verdict::Forwarded(vec![a]));
    assert_eq!(
        sw.input(a, frame(mac(2), mac(1), b"z"), t),
        Verdict::Forwarded(vec![b])
    );
}

#[test]
fn frames_too_short_or_from_a_multicast_source_are_invalid() {
    let mut sw = switch();
    let t = Instant::now();
    let (a, ca) = sw.add_port(PortConfig {
        mac: Some(mac(1)),
        allow_mac_spoofing: true,
    });
    port(&mut sw, 2, false);
    let full = frame(BROADCAST, mac(1), b"");
    for len in [0, 5, VNET_HDR_LEN + 6, VNET_HDR_LEN + 13] {
        assert_eq!(sw.input(a, full.slice(..len), t), Verdict::Invalid, "{len}");
    }
    assert_eq!(
        sw.input(a, frame(BROADCAST, BROADCAST, b""), t),
        Verdict::Invalid
    );
    assert_eq!(ca.snapshot("s").dropped_invalid, 5);
    assert_eq!(sw.macs(), 2, "nothing learned from them");
}

#[test]
fn a_port_that_does_not_drain_loses_its_frames_and_slows_nobody() {
    let limits = Limits {
        queue_frames: 8,
        queue_bytes: 4096,
        ..Limits::default()
    };
    let mut sw = Switch::new(limits, VNET_HDR_LEN);
    let t = Instant::now();
    let a = port(&mut sw, 1, false);
    let b = port(&mut sw, 2, false);
    let (slow, cslow) = sw.add_port(PortConfig {
        mac: Some(mac(3)),
        allow_mac_spoofing: false,
    });
    let mut got_b = 0;
    for i in 0..1000u32 {
        sw.input(a, frame(BROADCAST, mac(1), &i.to_le_bytes()), t);
        got_b += drain(&mut sw, b).len();
        assert!(sw.queued(slow) <= 8);
    }
    assert_eq!(got_b, 1000, "the draining port got every frame");
    let s = cslow.snapshot("s");
    assert_eq!((s.frames_out, s.dropped_queue_full), (8, 992));
    // The byte limit holds too: big frames fill it before the frame limit.
    drain(&mut sw, slow);
    for _ in 0..8 {
        sw.input(a, frame(mac(3), mac(1), &[0u8; 1500]), t);
    }
    assert_eq!(sw.queued(slow), 2, "two 1526-byte frames fit in 4096 bytes");
}

#[test]
fn the_mac_table_is_bounded_per_port_and_in_all() {
    let limits = Limits {
        macs_per_port: 16,
        macs: 40,
        ..Limits::default()
    };
    let mut sw = Switch::new(limits, VNET_HDR_LEN);
    let t = Instant::now();
    let a = port(&mut sw, 1, false);
    let hosts: Vec<PortId> = (10..13).map(|n| port(&mut sw, n, true)).collect();
    for (n, &h) in hosts.iter().enumerate() {
        for i in 0..10_000u32 {
            let b = i.to_be_bytes();
            let src = [0x02, n as u8, b[0], b[1], b[2], b[3]];
            sw.input(h, frame(mac(1), src, b""), t);
        }
        drain(&mut sw, a);
    }
    // 4 own MACs, 16 for each of the first two, the third gets what is left of 40.
    assert_eq!(sw.macs(), 40);
    // The port that may not spoof still gets its frames directly.
    assert_eq!(
        sw.input(hosts[0], frame(mac(1), mac(10), b""), t),
        Verdict::Forwarded(vec![a])
    );
    // Removing a port forgets what it learned; its space is free for others.
    sw.remove_port(hosts[0]);
    assert_eq!(sw.macs(), 40 - 17);
    assert_eq!(
        sw.input(a, frame(mac(10), mac(1), b""), t),
        Verdict::Forwarded(hosts[1..].to_vec()),
        "the removed port's own MAC is unknown now: flooded"
    );
}

/// One step of arbitrary traffic: port `from` (of 4) sends a frame from MAC `src` to MAC
/// `dst` (indexes in a small set: the ports' own, others, broadcast), or port `pop` drains
/// some frames, or time passes.
#[derive(Debug, Clone)]
enum Step {
    Send {
        from: usize,
        dst: usize,
        src: usize,
        len: usize,
    },
    Pop {
        port: usize,
        n: usize,
    },
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..4usize, 0..12usize, 0..12usize, 0..200usize)
            .prop_map(|(from, dst, src, len)| Step::Send { from, dst, src, len }),
        2 => (0..4usize, 0..10usize).prop_map(|(port, n)| Step::Pop { port, n }),
        1 => (0..20u64).prop_map(Step::Wait),
    ]
}

/// MAC `i` of the test's set: 0-3 the ports' own, 4-10 others, 11 broadcast.
fn mac_of(i: usize) -> Mac {
    match i {
        11 => BROADCAST,
        i => mac(i as u8 + 1),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Whatever the ports send: queues and table stay within their limits; no frame goes back
    /// to its sender; a frame from a port that may not spoof, with another source, goes
    /// nowhere; a frame to another port's own MAC goes to that port only; a broadcast goes to
    /// every other port whose queue has room; every queued frame comes out intact and in order.
    #[test]
    fn the_switch_keeps_its_rules_and_bounds(steps in proptest::collection::vec(step(), 1..300)) {
        let limits = Limits {
            queue_frames: 5,
            queue_bytes: 800,
            macs_per_port: 3,
            macs: 9,
            ageing: Duration::from_secs(30),
        };
        let mut sw = Switch::new(limits, VNET_HDR_LEN);
        let mut now = Instant::now();
        // Ports 0 and 1 may not spoof, 2 and 3 may.
        let ports: Vec<PortId> = (0..4).map(|i| port(&mut sw, i as u8 + 1, i >= 2)).collect();
        let mut expect: Vec<std::collections::VecDeque<Bytes>> = vec![Default::default(); 4];
        for (seq, s) in steps.into_iter().enumerate() {
            match s {
                Step::Send { from, dst, src, len } => {
                    let mut body = (seq as u32).to_le_bytes().to_vec();
                    body.resize(len.max(4), 0xa5);
                    let f = frame(mac_of(dst), mac_of(src), &body);
                    let v = sw.input(ports[from], f.clone(), now);
                    let spoofed = src != from && from < 2;
                    if src == 11 {
                        prop_assert_eq!(v, Verdict::Invalid);
                        continue;
                    }
                    if spoofed {
                        prop_assert_eq!(v, Verdict::Spoofed);
                        continue;
                    }
                    let Verdict::Forwarded(to) = v else {
                        return Err(TestCaseError::fail(format!("{v:?}")));
                    };
                    prop_assert!(!to.contains(&ports[from]), "back to its sender");
                    if dst < 4 && dst != from {
                        prop_assert!(to.iter().all(|p| *p == ports[dst]), "{to:?} for port {dst}");
                    }
                    if dst == 11 || dst < 4 {
                        // Every port that was not full got it.
                        let wanted: Vec<usize> = (0..4)
                            .filter(|&i| i != from && (dst == 11 || i == dst))
                            .collect();
                        for i in wanted {
                            let fits = expect[i].len() < limits.queue_frames
                                && expect[i].iter().map(Bytes::len).sum::<usize>() + f.len()
                                    <= limits.queue_bytes;
                            prop_assert_eq!(to.contains(&ports[i]), fits, "port {}", i);
                        }
                    }
                    for p in to {
                        let i = ports.iter().position(|q| *q == p).unwrap();
                        expect[i].push_back(f.clone());
                    }
                }
                Step::Pop { port, n } => {
                    for _ in 0..n {
                        prop_assert_eq!(sw.pop(ports[port]), expect[port].pop_front());
                    }
                }
                Step::Wait(secs) => now += Duration::from_secs(secs),
            }
            for (i, p) in ports.iter().enumerate() {
                prop_assert!(sw.queued(*p) <= limits.queue_frames);
                prop_assert_eq!(sw.queued(*p), expect[i].len());
            }
            prop_assert!(sw.macs() <= limits.macs);
        }
    }

    /// Arbitrary bytes as frames from any port: never a panic, and only `Forwarded`,
    /// `Spoofed` or `Invalid`.
    #[test]
    fn arbitrary_bytes_never_break_the_switch(
        frames in proptest::collection::vec((0..3usize, proptest::collection::vec(any::<u8>(), 0..64)), 0..100)
    ) {
        let mut sw = switch();
        let t = Instant::now();
        let ports: Vec<PortId> = (0..3).map(|i| port(&mut sw, i as u8 + 1, i == 2)).collect();
        for (from, bytes) in frames {
            let v = sw.input(ports[from], Bytes::from(bytes), t);
            prop_assert!(v != Verdict::NoSuchPort);
        }
    }
}

/// Two links' ports on one named switch: a frame one sends is the frame the other receives;
/// a spoofed one is counted and never arrives; the switch goes with its last port.
#[tokio::test]
async fn two_ports_on_a_named_switch_move_frames_and_drop_spoofs() {
    use super::port::Port;
    let config = |n| PortConfig {
        mac: Some(mac(n)),
        allow_mac_spoofing: false,
    };
    let a = join("test-two-ports", Limits::default(), config(1)).expect("join");
    let b = join("test-two-ports", Limits::default(), config(2)).expect("join");
    let mut buf = vec![0u8; 2048];
    assert_eq!(b.try_recv(&mut buf), None);
    // b waits first: the frame wakes it.
    let f = frame(mac(2), mac(1), b"hello through the switch");
    let (n, ()) = tokio::join!(async { b.recv(&mut buf).await.expect("recv") }, async {
        tokio::task::yield_now().await;
        a.send(&f).expect("send");
    });
    assert_eq!(&buf[..n], &f[..]);
    a.send(&frame(mac(2), mac(3), b"spoofed")).expect("send");
    assert_eq!(b.try_recv(&mut buf), None);
    assert_eq!(a.status().dropped_spoofed, 1);
    assert_eq!(b.status().frames_out, 1);
    let counters = a.counters();
    drop(a);
    // Gone from the switch: b's broadcast reaches nobody, a's counters still read.
    b.send(&frame(BROADCAST, mac(2), b"")).expect("send");
    assert_eq!(counters.snapshot("x").frames_out, 0);
    assert_eq!(b.switch(), "test-two-ports");
}

/// `[guest.fastnet]` with a switch: a tap, a switch or both, not neither; netns and
/// spoofing only where they mean something; the MAC must be a unicast address.
#[test]
fn the_switch_settings_are_checked() {
    use crate::registry::Device;
    use serde_json::json;
    let check = |value: serde_json::Value| {
        super::device::FastnetDevice
            .check(Some(&value), None)
            .map_err(|e| e.to_string())
    };
    assert_eq!(check(json!({"switch": "sw0"})), Ok(()));
    // The host's TAP on the switch too.
    assert_eq!(
        check(json!({"switch": "sw0", "tap": "t0", "netns": "lab"})),
        Ok(())
    );
    assert_eq!(
        check(
            json!({"switch": "sw0", "allow_mac_spoofing": true, "guest_mac": "02:00:00:00:00:09"})
        ),
        Ok(())
    );
    let refused = [
        (json!({}), "one of tap"),
        (json!({"switch": ""}), "1 to 64"),
        (json!({"switch": "sw0", "netns": "lab"}), "netns"),
        (
            json!({"tap": "t0", "allow_mac_spoofing": true}),
            "switch port",
        ),
        (
            json!({"switch": "sw0", "guest_mac": "03:00:00:00:00:01"}),
            "unicast",
        ),
        (
            json!({"switch": "sw0", "guest_mac": "02:00:00:00:00"}),
            "unicast",
        ),
        (
            json!({"tap": "t0", "switch_limits": {"queue_frames": 8}}),
            "switch_limits is for a switch port",
        ),
        (
            json!({"switch": "sw0", "switch_limits": {"queue_frames": 0}}),
            "switch_limits.queue_frames = 0: 1 to 65536",
        ),
        (
            json!({"switch": "sw0", "switch_limits": {"queue_bytes": 1500}}),
            "switch_limits.queue_bytes = 1500",
        ),
        (
            json!({"switch": "sw0", "switch_limits": {"macs": 10, "macs_per_port": 11}}),
            "switch_limits.macs_per_port = 11: 1 to 10",
        ),
        (
            json!({"switch": "sw0", "switch_limits": {"ageing_secs": 0}}),
            "switch_limits.ageing_secs = 0",
        ),
        (
            json!({"switch": "sw0", "switch_limits": {"queue": 8}}),
            "unknown field",
        ),
    ];
    for (value, why) in refused {
        let err = check(value.clone()).expect_err(&value.to_string());
        assert!(err.contains(why), "{value}: {err}");
    }
}

/// `switch_limits` from the settings are the bounds the switch keeps: a port that does not
/// drain holds the configured number of frames, then bytes, and no more; what is left out
/// keeps its default.
#[test]
fn configured_switch_limits_are_the_ones_enforced() {
    use super::device::FastnetConfig;
    let config: FastnetConfig = serde_json::from_value(serde_json::json!({
        "switch": "sw0",
        "switch_limits": {"queue_frames": 5, "queue_bytes": 70000, "ageing_secs": 7},
    }))
    .expect("settings");
    let limits = config.limits().expect("valid limits");
    assert_eq!(
        limits,
        Limits {
            queue_frames: 5,
            queue_bytes: 70000,
            ageing: Duration::from_secs(7),
            ..Limits::default()
        }
    );
    let mut sw = Switch::new(limits, VNET_HDR_LEN);
    let t = Instant::now();
    let a = port(&mut sw, 1, false);
    let (slow, counters) = sw.add_port(PortConfig {
        mac: Some(mac(2)),
        allow_mac_spoofing: false,
    });
    for i in 0..20u32 {
        sw.input(a, frame(BROADCAST, mac(1), &i.to_le_bytes()), t);
    }
    assert_eq!(sw.queued(slow), 5, "the configured queue_frames");
    assert_eq!(counters.snapshot("s").dropped_queue_full, 15);
    drain(&mut sw, slow);
    // 20000-byte frames: three fit in 70000 bytes, the fourth does not.
    for _ in 0..5 {
        sw.input(a, frame(mac(2), mac(1), &[0u8; 20000]), t);
    }
    assert_eq!(sw.queued(slow), 3, "the configured queue_bytes");
}
