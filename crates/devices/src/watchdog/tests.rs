use std::time::{Duration, Instant};

use super::qmp::{classify, LineReader, QmpMessage};
use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn messages_round_trip_in_both_directions() {
    let guest = [
        GuestMsg::Hello { interval_ms: 500 },
        GuestMsg::Heartbeat { seq: u64::MAX },
        GuestMsg::CheckFailed {
            detail: "disk full".into(),
        },
        GuestMsg::Disarm {
            reason: "SIGTERM".into(),
        },
    ];
    let mut wire = Vec::new();
    for m in &guest {
        m.encode(&mut wire).expect("encode");
    }
    // Fed one byte at a time: every split point works.
    let mut d = Decoder::<GuestMsg>::new();
    let mut back = Vec::new();
    for b in &wire {
        d.push(std::slice::from_ref(b)).expect("push");
        while let Some(m) = d.next_message().expect("valid") {
            back.push(m);
        }
    }
    assert_eq!(back, guest);
    assert_eq!(d.buffered(), 0);

    let host = [
        HostMsg::Armed {
            timeout_ms: 3000,
            pretimeout_ms: 1000,
        },
        HostMsg::Disarmed,
    ];
    let mut d = Decoder::<HostMsg>::new();
    for m in &host {
        d.push(&m.to_bytes()).expect("push");
    }
    assert_eq!(d.next_message(), Ok(Some(host[0].clone())));
    assert_eq!(d.next_message(), Ok(Some(HostMsg::Disarmed)));
    assert_eq!(d.next_message(), Ok(None));
}

#[test]
fn hostile_frames_are_errors_not_panics() {
    let mut d = Decoder::<GuestMsg>::new();
    d.push(&[0x7f, 0, 0]).expect("push");
    assert_eq!(d.next_message(), Err(RecordError::UnknownType(0x7f)));

    let mut d = Decoder::<GuestMsg>::new();
    d.push(&[0x04, 0xff, 0xff]).expect("push");
    assert_eq!(
        d.next_message(),
        Err(RecordError::TooLong {
            kind: "disarm",
            len: 0xffff,
            max: MAX_PAYLOAD
        })
    );

    let mut d = Decoder::<GuestMsg>::new();
    d.push(&[0x02, 3, 0, 1, 2, 3]).expect("push");
    assert!(matches!(
        d.next_message(),
        Err(RecordError::WrongLength {
            kind: "heartbeat",
            len: 3,
            expected: 8
        })
    ));

    // A host message type is not a guest message.
    let mut d = Decoder::<GuestMsg>::new();
    d.push(&HostMsg::Disarmed.to_bytes()).expect("push");
    assert_eq!(d.next_message(), Err(RecordError::UnknownType(0x82)));

    // At most one partial frame plus one read is held.
    let mut d = Decoder::<GuestMsg>::new();
    let limit = Decoder::<GuestMsg>::LIMIT;
    assert_eq!(limit, HEADER_LEN + MAX_PAYLOAD + READ_CHUNK);
    assert_eq!(
        d.push(&vec![0; limit + 1]),
        Err(RecordError::Overflow {
            buffered: 0,
            pushed: limit + 1,
            limit
        })
    );

    // Text is cleaned: no escape sequences reach logs.
    let mut d = Decoder::<GuestMsg>::new();
    d.push(&[0x03, 6, 0, 0x1b, b'[', b'2', b'J', 0xff, b'x'])
        .expect("push");
    assert_eq!(
        d.next_message(),
        Ok(Some(GuestMsg::CheckFailed {
            detail: " [2J\u{fffd}x".into()
        }))
    );
}

#[test]
fn long_texts_are_cut_on_a_character_boundary() {
    let text = "é".repeat(MAX_PAYLOAD);
    let bytes = GuestMsg::Disarm { reason: text }.to_bytes();
    let len = usize::from(u16::from_le_bytes([bytes[1], bytes[2]]));
    assert!(len <= MAX_PAYLOAD && len % 2 == 0, "{len}");
    let mut d = Decoder::<GuestMsg>::new();
    d.push(&bytes).expect("push");
    assert!(matches!(
        d.next_message(),
        Ok(Some(GuestMsg::Disarm { .. }))
    ));
}

#[test]
fn heartbeats_hold_off_the_deadline_and_silence_fires_it() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(ms(3000), Some(ms(1000)));
    assert_eq!(w.phase(), Phase::Idle);
    assert_eq!(w.poll_timeout(), None, "an idle watchdog has no deadline");
    assert!(w.hello(t0, ms(500)));
    assert_eq!(w.poll_timeout(), Some(t0 + ms(2000)));
    // Heartbeats every 500 ms for 10 s: nothing expires.
    let mut t = t0;
    for _ in 0..20 {
        t += ms(500);
        assert_eq!(w.handle_timeout(t), None);
        assert!(!w.heartbeat(t), "already armed");
    }
    assert_eq!(w.heartbeats(), 20);
    // Silence: the warning at 2 s, the action at 3 s, once.
    assert_eq!(w.handle_timeout(t + ms(1999)), None);
    assert_eq!(
        w.handle_timeout(t + ms(2000)),
        Some(Expiry::PreTimeout {
            since_heartbeat: ms(2000)
        })
    );
    assert_eq!(w.poll_timeout(), Some(t + ms(3000)));
    assert_eq!(w.handle_timeout(t + ms(2500)), None);
    assert_eq!(
        w.handle_timeout(t + ms(3000)),
        Some(Expiry::Fired {
            since_heartbeat: ms(3000)
        })
    );
    assert_eq!(w.phase(), Phase::Fired);
    assert_eq!(w.handle_timeout(t + ms(60_000)), None, "fires once");
    assert_eq!(w.poll_timeout(), None);
    // The agent comes back: re-armed, and it can fire again.
    let t2 = t + ms(10_000);
    assert!(w.hello(t2, ms(500)));
    assert_eq!(w.phase(), Phase::Armed);
    assert!(w.handle_timeout(t2 + ms(2000)).is_some());
    assert!(matches!(
        w.handle_timeout(t2 + ms(3000)),
        Some(Expiry::Fired { .. })
    ));
    assert_eq!(w.fires(), 2);
}

#[test]
fn a_late_timer_gets_the_warning_then_the_action() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(ms(1000), Some(ms(300)));
    w.heartbeat(t0);
    let late = t0 + ms(5000);
    assert!(matches!(
        w.handle_timeout(late),
        Some(Expiry::PreTimeout { .. })
    ));
    assert_eq!(
        w.handle_timeout(late),
        Some(Expiry::Fired {
            since_heartbeat: ms(5000)
        })
    );
    assert_eq!(w.handle_timeout(late), None);
}

#[test]
fn disarm_stops_the_deadline_until_the_next_heartbeat() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(ms(1000), None);
    assert!(!w.disarm(), "an idle watchdog was not armed");
    w.hello(t0, ms(100));
    assert!(w.disarm());
    assert_eq!(w.phase(), Phase::Disarmed);
    assert_eq!(w.poll_timeout(), None);
    assert_eq!(w.handle_timeout(t0 + ms(10_000)), None);
    assert!(w.heartbeat(t0 + ms(10_000)), "a heartbeat re-arms");
    assert_eq!(w.poll_timeout(), Some(t0 + ms(11_000)));
}

#[test]
fn settings_validation_names_the_key() {
    let ok = Settings {
        timeout_ms: 3000,
        pretimeout_ms: 1000,
        action: Action::Reset,
        hook: None,
    };
    assert!(ok.validate(true).is_ok());
    assert!(ok.validate(false).unwrap_err().to_string().contains("qmp"));
    let pre = Settings {
        pretimeout_ms: 3000,
        ..ok.clone()
    };
    assert!(pre
        .validate(true)
        .unwrap_err()
        .to_string()
        .contains("pretimeout_ms"));
    let short = Settings {
        timeout_ms: 10,
        pretimeout_ms: 0,
        ..ok.clone()
    };
    assert!(short
        .validate(true)
        .unwrap_err()
        .to_string()
        .contains("timeout_ms"));
    let hook = Settings {
        action: Action::Hook,
        ..ok.clone()
    };
    assert!(hook
        .validate(false)
        .unwrap_err()
        .to_string()
        .contains("watchdog.hook"));
    let hook = Settings {
        hook: Some("logger fired".into()),
        ..hook
    };
    assert!(hook.validate(false).is_ok());
    let parsed: Settings =
        serde_json::from_str(r#"{"timeout_ms": 5000, "action": "nmi"}"#).expect("parse");
    assert_eq!(parsed.action.qmp_command(), Some("inject-nmi"));
    assert_eq!(parsed.pretimeout(), None);
    assert!(serde_json::from_str::<Settings>(r#"{"action": "explode"}"#).is_err());
    assert!(serde_json::from_str::<Settings>(r#"{"timeout": 5}"#).is_err());
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("500ms"), Ok(ms(500)));
    assert_eq!(parse_duration("2s"), Ok(ms(2000)));
    assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
    assert_eq!(parse_duration("1m"), Ok(ms(60_000)));
    assert_eq!(parse_duration("3"), Ok(ms(3000)));
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("1e30s").is_err());
}

#[test]
fn qmp_lines_are_split_bounded_and_classified() {
    let mut r = LineReader::default();
    r.push(b"{\"QMP\": {\"version\": {}}}\r\n{\"return\": {}}\n{\"event\": \"RESET\", \"data\": {}}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n{\"ret");
    let mut got = Vec::new();
    while let Some(line) = r.next_line().expect("line") {
        got.push(classify(&line).expect("classify"));
    }
    assert_eq!(
        got,
        [
            QmpMessage::Greeting,
            QmpMessage::Return(serde_json::json!({})),
            QmpMessage::Event("RESET".into()),
            QmpMessage::Error {
                class: "GenericError".into(),
                desc: "nope".into()
            }
        ]
    );
    assert!(classify(b"[1,2]").is_err());
    assert!(classify(b"{\"what\": 1}").is_err());
    assert!(classify(b"\xff\xfe").is_err());
    let mut r = LineReader::default();
    r.push(&vec![b'x'; qmp::MAX_LINE + 1]);
    assert!(r.next_line().is_err());
}
