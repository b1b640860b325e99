//! Unit tests of the hid device: codec, keymap, actions, router, and the guest half over a
//! real multiplexer pair with a recording sink.

use std::sync::{Arc, Mutex};

use super::codes::*;
use super::forward::{AbsRange, Router, SourceCaps};
use super::guest::{Backend, Hid, Sink};
use super::host::{Action, Button, Client};
use super::keymap::{self, key};
use super::*;

fn k(code: u16, v: i32) -> Event {
    Event::new(EV_KEY, code, v)
}

#[test]
fn messages_round_trip() {
    let msgs = [
        Message::Batch {
            seq: 7,
            flags: FLAG_ACK,
            events: vec![k(30, 1), Event::new(EV_REL, REL_X, -5)],
        },
        Message::Batch {
            seq: u32::MAX,
            flags: FLAG_PROBE,
            events: vec![k(30, 0); MAX_EVENTS],
        },
        Message::Ready {
            version: VERSION,
            kind: Kind::Tablet,
            node: "event12".into(),
        },
        Message::Ack {
            seq: 9,
            flags: FLAG_SEEN,
        },
    ];
    let mut wire = Vec::new();
    for m in &msgs {
        m.encode(&mut wire).expect("encode");
    }
    // Fed one byte at a time: the same messages come out.
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for b in &wire {
        dec.push(std::slice::from_ref(b)).expect("push");
        while let Some(m) = dec.next_message().expect("decode") {
            out.push(m);
        }
    }
    assert_eq!(out, msgs);
    dec.finish().expect("nothing left");
}

#[test]
fn the_wire_format_is_the_documented_one() {
    let m = Message::Batch {
        seq: 0x0403_0201,
        flags: FLAG_ACK,
        events: vec![Event::new(EV_KEY, 30, 1)],
    };
    assert_eq!(
        m.to_bytes().expect("encode"),
        [0x01, 0x01, 12, 0, 1, 2, 3, 4, 1, 0, 30, 0, 1, 0, 0, 0]
    );
    let r = Message::Ready {
        version: 1,
        kind: Kind::Keyboard,
        node: "event3".into(),
    };
    assert_eq!(
        r.to_bytes().expect("encode"),
        [0x81, 0, 8, 0, 1, 1, b'e', b'v', b'e', b'n', b't', b'3']
    );
    let a = Message::Ack { seq: 5, flags: 1 };
    assert_eq!(a.to_bytes().expect("encode"), [0x82, 1, 4, 0, 5, 0, 0, 0]);
}

#[test]
fn bad_messages_are_errors_not_panics() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x07, 0, 0, 0], "unknown record type"),
        (vec![0x01, 0, 4, 0, 1, 2, 3, 4], "batch"),
        (
            vec![0x01, 0, 13, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            "batch",
        ),
        (
            vec![0x01, 0x80, 12, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
            "flags",
        ),
        (vec![0x01, 0, 0xff, 0xff], "exceeds its limit"),
        (vec![0x81, 0, 2, 0, 1, 9], "unknown device kind"),
        (vec![0x81, 0, 4, 0, 1, 1, b'/', b'.'], "ASCII letters"),
        (vec![0x82, 0, 3, 0, 1, 2, 3], "exactly 4"),
    ];
    for (bytes, want) in cases {
        let mut d = Decoder::new();
        d.push(&bytes).expect("push");
        let e = d.next_message().expect_err("must fail");
        assert!(e.to_string().contains(want), "{bytes:?}: {e}");
    }
    // Too many events cannot even be encoded.
    let big = Message::Batch {
        seq: 1,
        flags: 0,
        events: vec![k(30, 1); MAX_EVENTS + 1],
    };
    assert!(big.to_bytes().is_err());
    let empty = Message::Batch {
        seq: 1,
        flags: 0,
        events: vec![],
    };
    assert!(empty.to_bytes().is_err());
    // A cut message is reported at the end of the stream.
    let mut d = Decoder::new();
    d.push(&[0x82, 0, 4, 0, 1]).expect("push");
    assert_eq!(d.next_message().expect("partial"), None);
    assert_eq!(d.finish(), Err(RecordError::Truncated(5)));
}

#[test]
fn capabilities_are_checked() {
    assert!(Kind::Keyboard.allows(&k(key::ENTER, 1)).is_ok());
    assert!(Kind::Keyboard.allows(&k(key::ENTER, 2)).is_ok());
    assert!(Kind::Keyboard.allows(&k(BTN_LEFT, 1)).is_err());
    assert!(
        Kind::Keyboard.allows(&k(116, 1)).is_err(),
        "KEY_POWER is not on the keyboard"
    );
    assert!(Kind::Keyboard.allows(&k(key::ENTER, 3)).is_err());
    assert!(Kind::Mouse
        .allows(&Event::new(EV_REL, REL_WHEEL, -3))
        .is_ok());
    assert!(Kind::Mouse
        .allows(&Event::new(EV_REL, REL_HWHEEL, 1))
        .is_err());
    assert!(Kind::Mouse
        .allows(&Event::new(EV_REL, REL_X, 40_000))
        .is_err());
    assert!(Kind::Mouse.allows(&k(BTN_MIDDLE, 1)).is_ok());
    assert!(Kind::Mouse.allows(&k(BTN_LEFT, 2)).is_err());
    assert!(Kind::Mouse.allows(&Event::new(EV_ABS, ABS_X, 1)).is_err());
    assert!(Kind::Tablet
        .allows(&Event::new(EV_ABS, ABS_Y, ABS_MAX))
        .is_ok());
    assert!(Kind::Tablet
        .allows(&Event::new(EV_ABS, ABS_Y, ABS_MAX + 1))
        .is_err());
    assert!(Kind::Tablet.allows(&Event::new(EV_ABS, ABS_X, -1)).is_err());
    assert!(Kind::Tablet.allows(&Event::new(EV_REL, REL_X, 1)).is_err());
    let syn = Kind::Mouse.allows(&Event::new(EV_SYN, SYN_REPORT, 0));
    assert!(syn.expect_err("syn").to_string().contains("EV_SYN"));
}

#[test]
fn text_is_typed_with_the_us_layout() {
    let r = keymap::text_reports("aB!\n\t").expect("typeable");
    let flat: Vec<Event> = r
        .iter()
        .map(|b| {
            assert_eq!(b.len(), 1, "one transition per report");
            b[0]
        })
        .collect();
    let shift = key::LEFTSHIFT;
    assert_eq!(
        flat,
        [
            k(30, 1),
            k(30, 0),
            k(shift, 1),
            k(48, 1),
            k(48, 0),
            k(shift, 0),
            k(shift, 1),
            k(key::N1, 1),
            k(key::N1, 0),
            k(shift, 0),
            k(key::ENTER, 1),
            k(key::ENTER, 0),
            k(key::TAB, 1),
            k(key::TAB, 0),
        ]
    );
    // Every printable ASCII character has a key, and every key is on the guest keyboard.
    for c in ' '..='~' {
        let (code, _) = keymap::char_key(c).unwrap_or_else(|| panic!("{c:?}"));
        assert!(keymap::is_keyboard_key(code), "{c:?}");
    }
    // CRLF is one Enter.
    assert_eq!(keymap::text_reports("\r\n").expect("crlf").len(), 2);
    let e = keymap::text_reports("ok é").expect_err("no key");
    assert_eq!(
        e.to_string(),
        "character 'é' (U+00E9) at position 3 has no key on a US keyboard"
    );
}

#[test]
fn combos_press_in_order_and_release_in_reverse() {
    let keys = keymap::parse_combo("Ctrl+Alt+F2").expect("combo");
    assert_eq!(keys, [key::LEFTCTRL, key::LEFTALT, 60]);
    assert_eq!(
        keymap::combo_reports(&keys),
        [
            vec![k(key::LEFTCTRL, 1)],
            vec![k(key::LEFTALT, 1)],
            vec![k(60, 1)],
            vec![k(60, 0)],
            vec![k(key::LEFTALT, 0)],
            vec![k(key::LEFTCTRL, 0)],
        ]
    );
    assert_eq!(keymap::parse_combo("f12").expect("f12"), [key::F12]);
    assert_eq!(keymap::parse_combo("f13").expect("f13"), [key::F13]);
    assert_eq!(
        keymap::parse_combo("shift+/").expect("slash"),
        [key::LEFTSHIFT, key::SLASH]
    );
    assert!(keymap::parse_combo("ctrl+").is_err());
    assert!(keymap::parse_combo("f25").is_err());
    assert!(
        keymap::parse_combo("ctrl+?").is_err(),
        "shifted symbols are not key names"
    );
    let e = keymap::parse_combo("ctrl+bogus").expect_err("unknown");
    assert!(e.to_string().contains("\"bogus\" in \"ctrl+bogus\""), "{e}");
    for code in keymap::keyboard_keys() {
        assert!(keymap::is_keyboard_key(code));
    }
}

#[test]
fn pointer_actions() {
    let (kind, r) = Action::MouseMove(40_000, -3).reports().expect("move");
    assert_eq!(kind, Kind::Mouse);
    assert_eq!(
        r,
        [
            vec![
                Event::new(EV_REL, REL_X, 32767),
                Event::new(EV_REL, REL_Y, -3)
            ],
            vec![Event::new(EV_REL, REL_X, 40_000 - 32767)],
        ]
    );
    assert!(Action::MouseMove(0, 0).reports().is_err());
    let (_, r) = Action::MouseClick(Button::Right).reports().expect("click");
    assert_eq!(r, [vec![k(BTN_RIGHT, 1)], vec![k(BTN_RIGHT, 0)]]);
    let (kind, r) = Action::Tablet {
        x: 0.5,
        y: 1.0,
        click: Some(Button::Left),
    }
    .reports()
    .expect("tablet");
    assert_eq!(kind, Kind::Tablet);
    assert_eq!(
        r,
        [
            vec![
                Event::new(EV_ABS, ABS_X, 16384),
                Event::new(EV_ABS, ABS_Y, 32767)
            ],
            vec![k(BTN_LEFT, 1)],
            vec![k(BTN_LEFT, 0)],
        ]
    );
    assert!(Action::Tablet {
        x: 1.5,
        y: 0.0,
        click: None
    }
    .reports()
    .is_err());
    assert!(Action::Tablet {
        x: f64::NAN,
        y: 0.0,
        click: None
    }
    .reports()
    .is_err());
    let (_, r) = Action::MouseWheel(-2).reports().expect("wheel");
    assert_eq!(r, [vec![Event::new(EV_REL, REL_WHEEL, -2)]]);
}

#[test]
fn router_keeps_report_boundaries_and_routes_by_capability() {
    let caps = SourceCaps {
        keyboard: true,
        buttons: true,
        touch: false,
        rel: true,
        abs: None,
    };
    assert_eq!(caps.kinds(), [Kind::Keyboard, Kind::Mouse]);
    let mut r = Router::new(caps);
    let syn = Event::new(EV_SYN, SYN_REPORT, 0);
    assert!(r.push(Event::new(EV_MSC, 4, 0x70004)).is_empty());
    assert!(r.push(k(30, 1)).is_empty());
    assert!(r.push(Event::new(EV_REL, REL_X, 3)).is_empty());
    assert!(r.push(Event::new(EV_REL, REL_HWHEEL, 1)).is_empty());
    assert!(r.push(k(BTN_LEFT, 1)).is_empty());
    let out = r.push(syn);
    assert_eq!(
        out,
        [
            (Kind::Keyboard, vec![k(30, 1)]),
            (
                Kind::Mouse,
                vec![Event::new(EV_REL, REL_X, 3), k(BTN_LEFT, 1)]
            ),
        ]
    );
    assert_eq!(r.stats.dropped, 2, "MSC_SCAN and REL_HWHEEL");
    // An empty report sends nothing; a dropped report is discarded.
    assert!(r.push(syn).is_empty());
    r.push(k(31, 1));
    r.push(Event::new(EV_SYN, SYN_DROPPED, 0));
    assert!(r.push(syn).is_empty());
    // Long reports are split.
    for i in 0..(MAX_EVENTS + 3) {
        r.push(Event::new(EV_REL, REL_X, i as i32 + 1));
    }
    let out = r.push(syn);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.len(), MAX_EVENTS);
    assert_eq!(r.stats.split, 1);
}

#[test]
fn absolute_sources_are_scaled_to_the_tablet() {
    let caps = SourceCaps {
        keyboard: false,
        buttons: false,
        touch: true,
        rel: false,
        abs: Some((
            AbsRange { min: 0, max: 4095 },
            AbsRange {
                min: -100,
                max: 100,
            },
        )),
    };
    assert_eq!(caps.kinds(), [Kind::Tablet]);
    let mut r = Router::new(caps);
    r.push(Event::new(EV_ABS, ABS_X, 4095));
    r.push(Event::new(EV_ABS, ABS_Y, 0));
    r.push(k(BTN_TOUCH, 1));
    r.push(Event::new(EV_ABS, 0x35, 7)); // ABS_MT_POSITION_X: dropped
    let out = r.push(Event::new(EV_SYN, SYN_REPORT, 0));
    assert_eq!(
        out,
        [(
            Kind::Tablet,
            vec![
                Event::new(EV_ABS, ABS_X, ABS_MAX),
                Event::new(EV_ABS, ABS_Y, 16384),
                k(BTN_LEFT, 1)
            ]
        )]
    );
    assert_eq!(AbsRange { min: 0, max: 0 }.scale(5), 0);
    assert_eq!(AbsRange { min: 10, max: 20 }.scale(-5), 0);
    assert_eq!(
        AbsRange {
            min: i32::MIN,
            max: i32::MAX
        }
        .scale(i32::MAX),
        ABS_MAX
    );
}

/// Reports as written, with their device.
type Reports = Vec<(Kind, Vec<Event>)>;

/// A sink that records what the guest writes.
#[derive(Default, Clone)]
struct Recorder {
    reports: Arc<Mutex<Reports>>,
}

struct RecSink {
    kind: Kind,
    rec: Recorder,
}

impl Sink for RecSink {
    fn emit(&mut self, events: &[Event], probe: bool) -> std::io::Result<bool> {
        self.rec
            .reports
            .lock()
            .expect("rec")
            .push((self.kind, events.to_vec()));
        Ok(probe)
    }
    fn node(&self) -> String {
        format!("event{}", self.kind as u8)
    }
}

impl Backend for Recorder {
    fn create(&self, kind: Kind) -> std::io::Result<Box<dyn Sink>> {
        Ok(Box::new(RecSink {
            kind,
            rec: self.clone(),
        }))
    }
}

/// A guest with the hid service on a recorder, and a host mux to talk to it.
async fn pair(rec: &Recorder) -> (vstream_link::Mux, vstream_link::Mux) {
    use vstream_wire::{Config, Role};
    let (host, _hin) = vstream_link::Mux::new(Config::new(Role::Host, "h"), 1);
    let (guest, gin) = vstream_link::Mux::new(Config::new(Role::Guest, "g"), 2);
    let svc: Arc<dyn crate::Service> = Arc::new(Hid::with_backend(Arc::new(rec.clone())));
    tokio::spawn(crate::dispatch(vec![svc], gin));
    let (a, b) = vstream_transport::pair(1 << 16);
    let params = vstream_wire::LinkParams::stream(0);
    let (h2, g2) = (host.clone(), guest.clone());
    tokio::spawn(async move { h2.run_link(a.stream, params, "pair", &[]).await });
    tokio::spawn(async move { g2.run_link(b.stream, params, "pair", &[]).await });
    (host, guest)
}

#[tokio::test]
async fn the_guest_replays_batches_in_order_and_releases_held_keys() {
    let rec = Recorder::default();
    let (host, _guest) = pair(&rec).await;
    let chan = host.open(CLASS, "keyboard").await.expect("open");
    let mut c = Client::new(chan);
    let (_, reports) = Action::Type("Hi".into()).reports().expect("reports");
    c.send_all(reports.clone()).await.expect("sent and acked");
    assert_eq!(c.ready(), Some(&(Kind::Keyboard, "event0".to_owned())));
    let got: Vec<Vec<Event>> = rec
        .reports
        .lock()
        .expect("rec")
        .iter()
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(got, reports);
    // Press ctrl and leave: the guest releases it when the channel closes.
    c.send_all(vec![vec![k(key::LEFTCTRL, 1)]])
        .await
        .expect("press");
    c.close().await.expect("close");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let last = rec.reports.lock().expect("rec").last().cloned();
        if last == Some((Kind::Keyboard, vec![k(key::LEFTCTRL, 0)])) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ctrl was not released: {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_guest_refuses_events_outside_its_capabilities() {
    let rec = Recorder::default();
    let (host, _guest) = pair(&rec).await;
    let chan = host.open(CLASS, "mouse").await.expect("open");
    let mut c = Client::new(chan);
    c.send_all(vec![vec![Event::new(EV_REL, REL_X, 1)]])
        .await
        .expect("ok batch");
    c.send(
        vec![Event::new(EV_REL, REL_Y, 1), k(key::ENTER, 1)],
        FLAG_ACK,
    )
    .await
    .expect("write");
    let e = c.wait_ack(2).await.expect_err("refused");
    assert!(
        e.to_string()
            .contains("batch 2, event 1: key code 28 is not a key of the mouse"),
        "{e}"
    );
    // Nothing of the bad batch was written.
    assert_eq!(rec.reports.lock().expect("rec").len(), 1);
    // Unknown device names are refused at open.
    let e = host.open(CLASS, "joystick").await.expect_err("no joystick");
    assert!(
        e.to_string().contains("hid has no device \"joystick\""),
        "{e}"
    );
}

#[tokio::test]
async fn probes_are_acknowledged_as_seen() {
    let rec = Recorder::default();
    let (host, _guest) = pair(&rec).await;
    let chan = host.open(CLASS, "mouse").await.expect("open");
    let mut c = Client::new(chan);
    let stats = host::latency(&mut c, 20, std::time::Duration::ZERO)
        .await
        .expect("latency");
    assert_eq!(stats.count, 20);
    assert_eq!(stats.seen, 20);
    assert!(stats.p50_us <= stats.p99_us && stats.p99_us <= stats.max_us);
    let xs: i32 = rec
        .reports
        .lock()
        .expect("rec")
        .iter()
        .map(|(_, e)| e[0].value)
        .sum();
    assert_eq!(xs, 0, "probes alternate +1 and -1");
}

/// The virtio-input device served over vhost-user, driven by a test driver (vstream-vhost's
/// `Rig`: virtio-queue's mock queues in real memory, descriptors written by hand).
mod virtio_input {
    use std::time::{Duration, Instant};

    use vstream_vhost::testing::{Rig, MEM_SIZE, NEXT, WRITE};
    use vstream_vhost::{Device, Event as Kick};

    use crate::hid::guest::{serve_stream, SharedSink, Sink};
    use crate::hid::host::{Action, Client};
    use crate::hid::keymap::key;
    use crate::hid::tests::k;
    use crate::hid::vhost::{Injector, InputDevice, CONFIG_LEN, MAX_QUEUED};
    use crate::hid::*;

    const EVENTQ: usize = 0;
    const STATUSQ: usize = 1;

    fn device(kind: Kind) -> (InputDevice, Injector, Rig) {
        let (dev, inj) = InputDevice::new(kind).expect("device");
        (dev, inj, Rig::new(2, 64).with_event_idx())
    }

    /// What the driver reads after writing `select` and `subsel`: the answer's bytes.
    fn query(dev: &mut InputDevice, select: u8, subsel: u8) -> Vec<u8> {
        // As QEMU forwards the driver's byte writes: the whole structure at offset 0.
        let mut c = dev.config();
        c[0] = select;
        c[1] = subsel;
        dev.set_config(0, &c);
        let c = dev.config();
        assert_eq!(c.len(), CONFIG_LEN);
        assert_eq!((c[0], c[1]), (select, subsel));
        c[8..8 + usize::from(c[2])].to_vec()
    }

    fn bits(bitmap: &[u8]) -> Vec<u16> {
        (0..bitmap.len() * 8)
            .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
            .map(|i| i as u16)
            .collect()
    }

    fn decode(b: &[u8]) -> Event {
        assert_eq!(b.len(), EVENT_LEN, "{b:?}");
        Event::new(
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
            i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }

    fn syn() -> Event {
        Event::new(EV_SYN, SYN_REPORT, 0)
    }

    /// The events the device wrote into the eventq buffers it returned since last asked.
    fn delivered(rig: &mut Rig) -> Vec<Event> {
        rig.take_written(EVENTQ).iter().map(|b| decode(b)).collect()
    }

    /// `reports` as the driver sees them: each closed by its SYN_REPORT.
    fn with_syns(reports: &[Vec<Event>]) -> Vec<Event> {
        reports
            .iter()
            .flat_map(|r| r.iter().copied().chain([syn()]))
            .collect()
    }

    fn offer(rig: &mut Rig, n: usize) {
        for _ in 0..n {
            rig.add_writable(EVENTQ, EVENT_LEN as u32);
        }
    }

    /// Every config query of the virtio-input spec answers exactly the kind's capabilities:
    /// the same keys, axes and properties as the agent's uinput devices, LEDs on the keyboard
    /// only, no autorepeat (the guest would add repeats to injected keys), size 0 otherwise.
    #[test]
    fn config_queries_give_exactly_the_kinds_capabilities() {
        for kind in Kind::ALL {
            let (mut dev, _, _) = device(kind);
            assert_eq!(query(&mut dev, 0x01, 0), kind.device_name().as_bytes());
            assert_eq!(
                query(&mut dev, 0x02, 0),
                format!("vstream-{kind}").as_bytes()
            );
            let ids = query(&mut dev, 0x03, 0);
            let ids: Vec<u16> = ids
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            assert_eq!(ids, kind.input_id(), "{kind}");
            assert_eq!(bits(&query(&mut dev, 0x10, 0)), kind.props(), "{kind}");
            assert_eq!(
                bits(&query(&mut dev, 0x11, EV_KEY as u8)),
                kind.keys(),
                "{kind}"
            );
            assert_eq!(
                bits(&query(&mut dev, 0x11, EV_REL as u8)),
                kind.rel_axes(),
                "{kind}"
            );
            assert_eq!(
                bits(&query(&mut dev, 0x11, EV_ABS as u8)),
                kind.abs_axes(),
                "{kind}"
            );
            let leds = bits(&query(&mut dev, 0x11, EV_LED as u8));
            if kind == Kind::Keyboard {
                assert_eq!(leds, [LED_NUML, LED_CAPSL, LED_SCROLLL]);
            } else {
                assert!(leds.is_empty(), "{kind}: {leds:?}");
            }
            for none in [
                0x14, /* EV_REP */
                EV_MSC as u8,
                0x05, /* EV_SW */
                0x12, /* EV_SND */
            ] {
                assert!(query(&mut dev, 0x11, none).is_empty(), "{kind}: EV {none}");
            }
            for axis in 0..=0x3fu8 {
                let info = query(&mut dev, 0x12, axis);
                if kind.abs_axes().contains(&u16::from(axis)) {
                    let v: Vec<i32> = info
                        .chunks(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    assert_eq!(v, [0, ABS_MAX, 0, 0, 0], "{kind} axis {axis}");
                } else {
                    assert!(info.is_empty(), "{kind} axis {axis}");
                }
            }
            // Unknown selects and subsels, and writes past select/subsel, change nothing.
            assert!(query(&mut dev, 0x7f, 0).is_empty());
            assert!(query(&mut dev, 0x01, 9).is_empty());
            query(&mut dev, 0x01, 0);
            dev.set_config(2, &[0xff; 200]);
            dev.set_config(u32::MAX, &[0x11; 8]);
            assert_eq!(dev.config()[..3], [0x01, 0, kind.device_name().len() as u8]);
            dev.reset();
            assert_eq!(dev.config()[..3], [0, 0, 0], "a reset clears the selection");
        }
    }

    /// Injected reports reach the driver's buffers one event each, in order, each report
    /// closed by its SYN_REPORT.
    #[test]
    fn events_are_delivered_in_order_one_per_buffer() {
        let (mut dev, mut inj, mut rig) = device(Kind::Keyboard);
        let reports = [
            vec![k(30, 1)],
            vec![k(30, 0)],
            vec![k(42, 1), k(48, 1)],
            vec![k(48, 0), k(42, 0)],
        ];
        for r in &reports {
            assert!(!inj.emit(r, false).expect("queued"));
        }
        offer(&mut rig, 16);
        rig.run(&mut dev, Kick::Backend);
        let got = delivered(&mut rig);
        assert_eq!(got, with_syns(&reports));
        assert_eq!(inj.status().reports_delivered, 4);
        // The rest of the buffers stay with the device for the next reports.
        inj.emit(&[k(2, 1)], false).expect("queued");
        rig.run(&mut dev, Kick::Backend);
        assert_eq!(delivered(&mut rig), [k(2, 1), syn()]);
        assert!(!rig.broken);
    }

    /// With no buffers, reports wait in a bounded queue: a report that does not fit is refused
    /// whole with the reason; once the driver gives buffers, what waited comes out first, in
    /// order, and injection works again.
    #[test]
    fn without_buffers_reports_wait_in_a_bounded_queue() {
        let (mut dev, mut inj, mut rig) = device(Kind::Mouse);
        let report = |i: i32| vec![Event::new(EV_REL, REL_X, i), Event::new(EV_REL, REL_Y, -i)];
        let mut accepted = 0;
        let err = loop {
            match inj.emit(&report(accepted + 1), false) {
                Ok(_) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted < 100_000, "never refused");
        };
        assert_eq!(accepted as usize, MAX_QUEUED / 3);
        assert!(err.to_string().contains("not taking events"), "{err}");
        rig.run(&mut dev, Kick::Queue(EVENTQ));
        assert_eq!(inj.status().queued, MAX_QUEUED / 3 * 3);
        assert_eq!(inj.status().refused, 1);
        // The driver gives 30 buffers at a time (the queue has 64), as it would refill.
        let mut got = Vec::new();
        while got.len() < accepted as usize * 3 {
            offer(&mut rig, 30);
            rig.run(&mut dev, Kick::Queue(EVENTQ));
            got.extend(delivered(&mut rig));
        }
        let want: Vec<Event> = (1..=accepted)
            .flat_map(|i| report(i).into_iter().chain([syn()]))
            .collect();
        assert_eq!(got[..want.len()], want[..]);
        assert_eq!(inj.status().queued, 0);
        inj.emit(&report(7), false).expect("accepted again");
    }

    /// Malformed eventq buffers (read-only, too small, outside guest memory, looping) go back
    /// empty and the event goes into the next good buffer; bad status buffers are returned and
    /// counted; the device needs no reset.
    #[test]
    fn bad_chains_are_dropped_and_the_device_goes_on() {
        let (mut dev, mut inj, mut rig) = device(Kind::Keyboard);
        let a = rig.alloc(64).0;
        // Read-only, too small, outside memory, overflowing, looping.
        rig.write_desc(EVENTQ, 10, a, 8, 0, 0);
        rig.write_desc(EVENTQ, 11, a, 4, WRITE, 0);
        rig.write_desc(EVENTQ, 12, MEM_SIZE - 4, 8, WRITE, 0);
        rig.write_desc(EVENTQ, 13, u64::MAX - 4, 8, WRITE, 0);
        rig.write_desc(EVENTQ, 14, a, 8, WRITE | NEXT, 14);
        for d in 10..=14 {
            rig.make_available(EVENTQ, d);
        }
        offer(&mut rig, 2);
        inj.emit(&[k(30, 1)], false).expect("queued");
        rig.run(&mut dev, Kick::Backend);
        let written = rig.take_written(EVENTQ);
        let lens: Vec<usize> = written.iter().map(Vec::len).collect();
        assert_eq!(lens, [0, 0, 0, 0, 0, 8, 8], "bad buffers returned empty");
        assert_eq!(
            [decode(&written[5]), decode(&written[6])],
            [k(30, 1), syn()]
        );

        // Status: a Caps Lock LED on, then a short buffer and a write-only one.
        let led = |code: u16, v: i32| {
            let mut b = Vec::new();
            b.extend_from_slice(&EV_LED.to_le_bytes());
            b.extend_from_slice(&code.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
            b
        };
        rig.add_readable(STATUSQ, &led(LED_CAPSL, 1));
        rig.add_readable(STATUSQ, &led(LED_NUML, 1)[..4]);
        rig.add_writable(STATUSQ, 8);
        rig.add_readable(STATUSQ, &led(LED_NUML, 1));
        rig.add_readable(STATUSQ, &led(LED_NUML, 0));
        rig.run(&mut dev, Kick::Queue(STATUSQ));
        assert_eq!(
            rig.take_used(STATUSQ).len(),
            5,
            "every status buffer returned"
        );
        let st = inj.status();
        assert_eq!(st.leds, ["caps"], "{st:?}");
        assert_eq!(st.status_events, 3, "{st:?}");
        assert_eq!(st.bad_chains, 5 + 2, "{st:?}");
        assert!(!rig.broken);
    }

    /// A probe waits until the driver took its report; a reset drops what waits and tells the
    /// probe it was not seen.
    #[test]
    fn probes_wait_for_the_driver_and_resets_drop_the_queue() {
        let (mut dev, inj, mut rig) = device(Kind::Mouse);
        let mut probe = inj.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            (
                probe.emit(&[Event::new(EV_REL, REL_X, 1)], true),
                t.elapsed(),
            )
        });
        std::thread::sleep(Duration::from_millis(100));
        offer(&mut rig, 4);
        rig.run(&mut dev, Kick::Backend);
        let (seen, took) = waiter.join().expect("probe");
        assert!(seen.expect("probe"), "seen once delivered");
        assert!(took >= Duration::from_millis(90), "{took:?}");

        let mut probe = inj.clone();
        let waiter = std::thread::spawn(move || probe.emit(&[Event::new(EV_REL, REL_Y, 1)], true));
        std::thread::sleep(Duration::from_millis(100));
        dev.reset();
        assert!(
            !waiter.join().expect("probe").expect("probe"),
            "dropped by the reset"
        );
        assert_eq!(inj.status().queued, 0);
    }

    /// The whole host path of `vstreamctl input`: the hid protocol's client on one end of a
    /// stream, vstreamd's [`serve_stream`] into the virtio-input device on the other, and the
    /// driver reading exactly the typed keys.
    #[test]
    fn the_hid_protocol_reaches_the_driver() {
        let (mut dev, inj, mut rig) = device(Kind::Keyboard);
        let sink: SharedSink = std::sync::Arc::new(std::sync::Mutex::new(Box::new(inj.clone())));
        let (kind, reports) = Action::Type("Hi".into()).reports().expect("reports");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move { serve_stream(kind, &sink, &mut b).await });
            let mut client = Client::new(a);
            client
                .send_all(reports.clone())
                .await
                .expect("sent and acknowledged");
            client.close().await.expect("closed");
            server.await.expect("server").expect("served");
        });
        offer(&mut rig, 32);
        rig.run(&mut dev, Kick::Backend);
        let got = delivered(&mut rig);
        assert_eq!(got, with_syns(&reports));
        assert!(got.contains(&k(key::LEFTSHIFT, 1)), "{got:?}");
    }
}
