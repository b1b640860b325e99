//! Unit tests of the qga device: framing, parsing and formatting with no I/O, then every command
//! for real on this machine (the guest half runs on any Linux), then serving over a stream.
//! End to end through vstreamd and vstreamctl: crates/host/tests/qga.rs.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::guest::*;
use super::host::*;
use super::*;
use crate::civil::civil_from_days;

fn frames(f: &mut Framer) -> Vec<Frame> {
    std::iter::from_fn(|| f.next_frame()).collect()
}

fn text(s: &str) -> Frame {
    Frame::Text(s.as_bytes().to_vec())
}

// ---- framing -------------------------------------------------------------------------------

#[test]
fn framer_splits_concatenated_texts_with_or_without_whitespace() {
    let input = r#"{"execute":"guest-ping"}{"execute":"a","arguments":{"s":"}{\"x"}}
  [1,[2]] "top\"str{" 42 nope{"b":1}"#;
    let want = vec![
        text(r#"{"execute":"guest-ping"}"#),
        text(r#"{"execute":"a","arguments":{"s":"}{\"x"}}"#),
        text("[1,[2]]"),
        text(r#""top\"str{""#),
        text("42"),
        text("nope"),
        text(r#"{"b":1}"#),
    ];
    let mut f = Framer::new(1024);
    f.push(input.as_bytes());
    assert_eq!(frames(&mut f), want);
    // The same bytes one at a time give the same frames.
    let mut f = Framer::new(1024);
    let mut got = Vec::new();
    for b in input.as_bytes() {
        f.push(&[*b]);
        got.extend(frames(&mut f));
    }
    assert_eq!(got, want);
    assert_eq!(f.buffered(), 0);
}

proptest! {
    /// Texts of any nesting, strings holding brackets, quotes and escapes, whitespace between
    /// or none: each comes out whole and in order wherever the stream is cut.
    #[test]
    fn framer_finds_each_text_wherever_the_stream_is_cut(
        texts in prop::collection::vec(prop::sample::select(vec![
            r#"{"execute":"guest-ping"}"#, r#"{"a":{"b":[1,{"c":"}]{["}],"d":"\\\""}}"#,
            r#"[[[]],{}]"#, r#"{"s":"\\\\"}"#, r#"{ "x" : [ "]" , "\"}" ] }"#, r#""top{\"""#,
        ]), 1..8),
        gaps in prop::collection::vec(prop::sample::select(vec!["", " ", "\n", "\r\n\t"]), 8),
        cuts in prop::collection::vec(1usize..40, 1..20),
    ) {
        let mut input = Vec::new();
        for (t, g) in texts.iter().zip(&gaps) {
            input.extend_from_slice(t.as_bytes());
            input.extend_from_slice(g.as_bytes());
        }
        let mut f = Framer::new(1024);
        let mut got = Vec::new();
        let mut rest = &input[..];
        for n in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at((*n).min(rest.len()));
            f.push(piece);
            got.extend(frames(&mut f));
            rest = after;
        }
        let want: Vec<Frame> = texts.iter().map(|t| text(t)).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(f.buffered(), 0);
    }
}

#[test]
fn framer_gives_short_and_long_texts_intact_around_its_kept_buffer() {
    // Short texts are copied out of a buffer the framer keeps; a long one takes the buffer
    // with it. Either way each text comes out whole, and the next starts afresh.
    let long = format!(
        r#"{{"execute":"x","arguments":{{"d":"{}"}}}}"#,
        "a".repeat(10_000)
    );
    let input = format!(r#"{{"execute":"one"}}{long} {{"execute":"two"}}"#);
    let mut f = Framer::new(64 * 1024);
    for piece in input.as_bytes().chunks(777) {
        f.push(piece);
    }
    assert_eq!(
        frames(&mut f),
        vec![
            text(r#"{"execute":"one"}"#),
            text(&long),
            text(r#"{"execute":"two"}"#)
        ]
    );
    assert_eq!(f.buffered(), 0);
}

#[test]
fn framer_delimiter_drops_a_partial_text_and_keeps_complete_ones() {
    let mut f = Framer::new(1024);
    f.push(b"{\"execute\":\"x\"} {\"execute\":\"gue");
    f.push(&[DELIMITER]);
    f.push(b"{\"execute\":\"guest-ping\"}");
    assert_eq!(
        frames(&mut f),
        vec![
            text(r#"{"execute":"x"}"#),
            Frame::Delimiter { dropped: 15 },
            text(r#"{"execute":"guest-ping"}"#),
        ]
    );
    // Inside a string too (0xFF is never valid JSON).
    f.push(b"{\"a\":\"abc");
    f.push(&[DELIMITER, b'7', b' ']);
    assert_eq!(
        frames(&mut f),
        vec![Frame::Delimiter { dropped: 9 }, text("7")]
    );
}

#[test]
fn framer_drops_oversized_texts_with_bounded_memory_and_recovers() {
    let mut f = Framer::new(100);
    f.push(b"{\"pad\":\"");
    for _ in 0..1000 {
        f.push(&[b'x'; 1000]);
        assert!(f.buffered() <= 100);
    }
    f.push(b"\"} {\"execute\":\"guest-ping\"}");
    assert_eq!(
        frames(&mut f),
        vec![
            Frame::TooLarge {
                size: 8 + 1_000_000 + 2
            },
            text(r#"{"execute":"guest-ping"}"#),
        ]
    );
}

#[test]
fn base64_matches_the_rfc_vectors_and_rejects_bad_input() {
    for (plain, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(plain.as_bytes()), enc);
        assert_eq!(base64_decode(enc).as_deref(), Some(plain.as_bytes()));
    }
    assert_eq!(
        base64_decode("Zm8").as_deref(),
        Some(&b"fo"[..]),
        "padding is optional"
    );
    for bad in [
        "Z", "Zm9v!", "Zm 9v", "Zm=v", "Zg=", "====", "Zh==", "Zm9=", "Zm9vY",
    ] {
        assert_eq!(base64_decode(bad), None, "{bad:?}");
    }
    let all: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
}

#[test]
fn base64_appended_in_steps_is_the_base64_of_the_whole() {
    let data: Vec<u8> = (0..=255u8).cycle().take(3 * 16 * 1024 + 2).collect();
    // Around the 3 KiB steps it encodes in, and a 48 KiB piece as file reads append them.
    for len in [0, 1, 3071, 3072, 3073, 6145, 3 * 16 * 1024, data.len()] {
        let mut out = b"prefix".to_vec();
        base64_encode_into(&data[..len], &mut out);
        assert_eq!(
            out,
            [b"prefix", base64_encode(&data[..len]).as_bytes()].concat(),
            "{len}"
        );
    }
}

// ---- requests and arguments ----------------------------------------------------------------

fn parse_err(text: &str) -> String {
    Request::parse(text.as_bytes()).expect_err(text).1.desc
}

#[test]
fn request_errors_are_worded_as_qemu_does() {
    assert!(parse_err("{\"execute\":").starts_with("JSON parse error, "));
    assert_eq!(parse_err("[1]"), "QMP input must be a JSON object");
    assert_eq!(parse_err("{}"), "QMP input lacks member 'execute'");
    assert_eq!(
        parse_err(r#"{"execute":1}"#),
        "QMP input member 'execute' must be a string"
    );
    assert_eq!(
        parse_err(r#"{"execute":"x","arguments":[]}"#),
        "QMP input member 'arguments' must be an object"
    );
    assert_eq!(
        parse_err(r#"{"execute":"x","exec-oob":"y"}"#),
        "QMP input member 'exec-oob' is unexpected"
    );
    let (id, _) = Request::parse(br#"{"id":"a1","bogus":1,"execute":"x"}"#).expect_err("bogus");
    assert_eq!(id.map(RawValue::get), Some(r#""a1""#));
    let r = Request::parse(br#"{"execute":"guest-ping","id":7}"#).expect("ok");
    assert_eq!(r.execute, "guest-ping");
    assert_eq!(r.id.map(RawValue::get), Some("7"));
}

/// `execute`, `arguments` and `id` of a request read into values.
type ValueRequest = (String, Map<String, Value>, Option<Value>);

/// How requests were read before [`Request::parse`] borrowed from the text: into a map of
/// values, walked in name order. The model the borrowing parser must agree with.
fn parse_as_values(text: &[u8]) -> Result<ValueRequest, (Option<Value>, String)> {
    let value: Value = serde_json::from_slice(text).map_err(|_| (None, "parse".to_owned()))?;
    let Value::Object(map) = value else {
        return Err((None, "QMP input must be a JSON object".into()));
    };
    let id = map.get("id").cloned();
    let (mut execute, mut arguments) = (None, Map::new());
    for (key, v) in map {
        match (key.as_str(), v) {
            ("execute", Value::String(s)) => execute = Some(s),
            ("execute", _) => {
                return Err((id, "QMP input member 'execute' must be a string".into()))
            }
            ("arguments", Value::Object(a)) => arguments = a,
            ("arguments", _) => {
                return Err((id, "QMP input member 'arguments' must be an object".into()))
            }
            ("id", _) => {}
            (other, _) => return Err((id, format!("QMP input member '{other}' is unexpected"))),
        }
    }
    match execute {
        Some(e) => Ok((e, arguments, id)),
        None => Err((id, "QMP input lacks member 'execute'".into())),
    }
}

/// One member of a generated request: a name and a value, both as JSON text.
fn member() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        r#""execute""#,
        r#""arguments""#,
        r#""id""#,
        r#""exec-oob""#,
        r#""a""#,
        r#""zz""#,
        r#""\u0065xecute""#,
        r#""i\u0064""#,
        r#""""#,
    ]);
    let value = prop::sample::select(vec![
        r#""guest-ping""#,
        r#""guest-sync""#,
        r#""gu\u0065st-ping""#,
        r#""a\"b""#,
        "7",
        "-1.5e3",
        "null",
        "true",
        "[]",
        "[1,{}]",
        "{}",
        r#"{"id":3}"#,
        r#"{ "id" : 3 , "x":[ ] }"#,
        r#""""#,
    ]);
    (name, prop::sample::select(vec!["", " ", "\n\t"]), value)
        .prop_map(|(n, ws, v)| format!("{ws}{n}{ws}:{ws}{v}{ws}"))
}

proptest! {
    /// The borrowing parser reads every request as a map of values would: the same command,
    /// arguments and id, or the same error with the same id, whatever the members' order,
    /// duplicates, escapes and whitespace; and the reply it writes is the same JSON.
    #[test]
    fn requests_read_without_values_as_with_them(members in prop::collection::vec(member(), 0..6)) {
        let text = format!("{{{}}}", members.join(","));
        let got = Request::parse(text.as_bytes());
        let raw_id = |id: Option<&RawValue>| id.map(|i| serde_json::from_str::<Value>(i.get()).expect("id"));
        match (parse_as_values(text.as_bytes()), got) {
            (Ok((execute, arguments, id)), Ok(req)) => {
                prop_assert_eq!(&*req.execute, execute.as_str());
                prop_assert_eq!(&req.arguments, &arguments);
                prop_assert_eq!(raw_id(req.id), id.clone());
                let result = json!({"n": 1});
                let ours = encode_reply(req.id, Ok(&result), false);
                let theirs = serde_json::to_vec(&json!({"id": id, "return": result})).expect("json");
                let ours: Value = serde_json::from_slice(&ours).expect("reply");
                let mut theirs: Value = serde_json::from_slice(&theirs).expect("reply");
                if raw_id(req.id).is_none() {
                    theirs.as_object_mut().expect("object").remove("id");
                }
                prop_assert_eq!(ours, theirs);
            }
            (Err((id, desc)), Err((got_id, e))) => {
                prop_assert_eq!(raw_id(got_id), id);
                prop_assert_eq!(e.desc, desc);
            }
            (want, got) => prop_assert!(false, "{text}: {want:?} but {got:?}"),
        }
    }
}

#[test]
fn replies_are_written_as_a_map_of_values_would_be() {
    let id = RawValue::from_string("7".into()).expect("raw");
    let e = QgaError::generic("no");
    fn text(id: Option<&RawValue>, r: Result<&Value, &QgaError>) -> String {
        String::from_utf8(encode_reply(id, r, false)).expect("utf-8")
    }
    assert_eq!(
        text(Some(&*id), Ok(&json!({}))),
        "{\"id\":7,\"return\":{}}\n"
    );
    assert_eq!(text(None, Ok(&json!([1]))), "{\"return\":[1]}\n");
    assert_eq!(
        text(Some(&*id), Err(&e)),
        "{\"error\":{\"class\":\"GenericError\",\"desc\":\"no\"},\"id\":7}\n"
    );
    let delimited = encode_reply(None, Err(&e), true);
    assert_eq!(delimited[0], DELIMITER);
    assert_eq!(&delimited[1..], encode_reply(None, Err(&e), false));
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("object")
}

fn cmd_err(name: &str, a: Value) -> QgaError {
    Command::parse(name, args(a)).expect_err(name)
}

#[test]
fn argument_errors_name_the_parameter() {
    assert_eq!(
        cmd_err("guest-sync", json!({})).desc,
        "Parameter 'id' is missing"
    );
    assert_eq!(
        cmd_err("guest-sync", json!({"id": "1"})).desc,
        "Invalid parameter type for 'id', expected: integer"
    );
    assert_eq!(
        cmd_err("guest-sync", json!({"id": 1.5})).desc,
        "Invalid parameter type for 'id', expected: integer"
    );
    assert_eq!(
        cmd_err("guest-ping", json!({"x": 1})).desc,
        "Parameter 'x' is unexpected"
    );
    assert_eq!(
        cmd_err("guest-shutdown", json!({"mode": "explode"})).desc,
        "Parameter 'mode' expects halt|powerdown|reboot"
    );
    assert_eq!(
        cmd_err("guest-exec", json!({"path": "x", "arg": ["a", 2]})).desc,
        "Invalid parameter type for 'arg[1]', expected: string"
    );
    assert_eq!(
        cmd_err(
            "guest-file-seek",
            json!({"handle": 1, "offset": 0, "whence": 7})
        )
        .desc,
        "invalid whence code 7"
    );
    let e = cmd_err("guest-nope", json!({}));
    assert_eq!(e.class, "CommandNotFound");
    assert_eq!(e.desc, "The command guest-nope has not been found");
    // Both spellings of whence and capture-output.
    for (w, want) in [
        (json!(0), Whence::Set),
        (json!("cur"), Whence::Cur),
        (json!(2), Whence::End),
    ] {
        let c = Command::parse(
            "guest-file-seek",
            args(json!({"handle": 1, "offset": -3, "whence": w})),
        )
        .expect("seek");
        assert_eq!(
            c,
            Command::FileSeek {
                handle: 1,
                offset: -3,
                whence: want
            }
        );
    }
    for (c, want) in [
        (json!(true), Capture::Separated),
        (json!(false), Capture::None),
        (json!("merged"), Capture::Merged),
        (json!("stderr"), Capture::Stderr),
    ] {
        match Command::parse(
            "guest-exec",
            args(json!({"path": "x", "capture-output": c})),
        )
        .expect("exec")
        {
            Command::Exec(e) => assert_eq!(e.capture, want),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn every_command_round_trips_through_its_request() {
    let cmds = vec![
        Command::Sync { id: -5 },
        Command::SyncDelimited { id: i64::MAX },
        Command::Ping,
        Command::Info,
        Command::Shutdown {
            mode: ShutdownMode::Halt,
        },
        Command::GetTime,
        Command::SetTime { time: None },
        Command::SetTime { time: Some(1) },
        Command::GetOsinfo,
        Command::GetHostName,
        Command::GetTimezone,
        Command::GetUsers,
        Command::GetLoad,
        Command::GetVcpus,
        Command::NetworkGetInterfaces,
        Command::GetFsinfo,
        Command::FsfreezeStatus,
        Command::FsfreezeFreeze,
        Command::FsfreezeFreezeList {
            mountpoints: Some(vec!["/a b".into()]),
        },
        Command::FsfreezeThaw,
        Command::Exec(ExecArgs {
            path: "sh".into(),
            arg: vec!["-c".into(), "x".into()],
            env: Some(vec!["A=1".into()]),
            input_data: Some("eA==".into()),
            capture: Capture::Merged,
        }),
        Command::ExecStatus { pid: 9 },
        Command::FileOpen {
            path: "/x".into(),
            mode: Some("w+".into()),
        },
        Command::FileClose { handle: 1 },
        Command::FileRead {
            handle: 1,
            count: Some(3),
        },
        Command::FileWrite {
            handle: 1,
            buf_b64: "eA==".into(),
            count: None,
        },
        Command::FileSeek {
            handle: 1,
            offset: 5,
            whence: Whence::End,
        },
        Command::FileFlush { handle: 1 },
        Command::SshGetAuthorizedKeys {
            username: "u".into(),
        },
        Command::SshAddAuthorizedKeys {
            username: "u".into(),
            keys: vec!["ssh-ed25519 AAAA x".into()],
            reset: true,
        },
        Command::SshRemoveAuthorizedKeys {
            username: "u".into(),
            keys: vec![],
        },
        Command::SetVcpus {
            vcpus: vec![GuestLogicalProcessor {
                logical_id: 1,
                online: false,
                can_offline: None,
            }],
        },
        Command::GetMemoryBlocks,
        Command::SetMemoryBlocks {
            blocks: vec![GuestMemoryBlock {
                phys_index: 3,
                online: true,
                can_offline: Some(true),
            }],
        },
        Command::GetMemoryBlockInfo,
        Command::SetUserPassword {
            username: "u".into(),
            password: "cHc=".into(),
            crypted: false,
        },
        Command::Fstrim {
            minimum: Some(4096),
        },
        Command::GetDisks,
        Command::SuspendDisk,
        Command::SuspendRam,
        Command::SuspendHybrid,
    ];
    let names: Vec<&str> = cmds.iter().map(Command::name).collect();
    for spec in COMMANDS {
        assert!(names.contains(&spec.name), "{} has no test", spec.name);
    }
    for c in cmds {
        let wire = serde_json::to_vec(&c.to_request()).expect("json");
        let req = Request::parse(&wire).expect("request");
        let back = Command::parse(&req.execute, req.arguments).expect("command");
        assert_eq!(back, c);
        assert!(command_spec(c.name()).is_some());
    }
}

// ---- parsers of system files ---------------------------------------------------------------

#[test]
fn os_release_values_are_unquoted_and_unescaped() {
    let mut info = GuestOsInfo::default();
    parse_os_release(
        "# c\nNAME=\"Debian GNU/Linux\"\nID=debian\nPRETTY_NAME='It''s'\nVERSION=\"12 (\\\"bookworm\\\")\"\nVERSION_ID=\"12\"\nBOGUS=1\nnoequals\n",
        &mut info,
    );
    assert_eq!(info.name.as_deref(), Some("Debian GNU/Linux"));
    assert_eq!(info.id.as_deref(), Some("debian"));
    assert_eq!(info.version.as_deref(), Some("12 (\"bookworm\")"));
    assert_eq!(info.version_id.as_deref(), Some("12"));
    assert_eq!(info.pretty_name.as_deref(), Some("It''s"));
    assert_eq!(info.variant, None);
}

fn utmp_record(ut_type: i16, user: &[u8], sec: i32, usec: i32) -> Vec<u8> {
    let mut r = vec![0u8; UTMP_RECORD];
    r[0..2].copy_from_slice(&ut_type.to_ne_bytes());
    r[44..44 + user.len()].copy_from_slice(user);
    r[340..344].copy_from_slice(&sec.to_ne_bytes());
    r[344..348].copy_from_slice(&usec.to_ne_bytes());
    r
}

#[test]
fn utmp_gives_each_user_once_with_the_earliest_login() {
    let mut data = Vec::new();
    data.extend(utmp_record(7, b"alice", 2000, 500_000));
    data.extend(utmp_record(8, b"dead", 1, 0)); // DEAD_PROCESS
    data.extend(utmp_record(7, b"bob", 3000, 0));
    data.extend(utmp_record(7, b"alice", 1000, 250_000));
    data.extend(utmp_record(7, &[b'x'; 32], 5, 0)); // a full field has no NUL
    data.extend(utmp_record(7, b"", 5, 0));
    data.extend_from_slice(&[7, 0, 0]); // partial trailing record
    let users = parse_utmp(&data);
    let got: Vec<(String, f64)> = users
        .iter()
        .map(|u| (u.user.clone(), u.login_time))
        .collect();
    assert_eq!(
        got,
        vec![
            ("alice".into(), 1000.25),
            ("bob".into(), 3000.0),
            ("x".repeat(32), 5.0)
        ]
    );
}

#[test]
fn proc_and_mount_parsers() {
    let l = parse_loadavg("0.52 1.25 3.00 2/345 6789\n").expect("loadavg");
    assert_eq!((l.load1m, l.load5m, l.load15m), (0.52, 1.25, 3.0));
    assert!(parse_loadavg("x y z").is_none());

    let dev = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n  eth0: 5 6 7 8 0 0 0 0 9 10 11 12 0 0 0 0\n";
    let s = parse_net_dev(dev);
    let e = &s["eth0"];
    assert_eq!(
        (e.rx_bytes, e.rx_packets, e.rx_errs, e.rx_dropped),
        (5, 6, 7, 8)
    );
    assert_eq!(
        (e.tx_bytes, e.tx_packets, e.tx_errs, e.tx_dropped),
        (9, 10, 11, 12)
    );

    let mi = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
              28 27 0:25 / /run rw shared:5 - tmpfs tmpfs rw\n\
              29 27 7:0 / /mnt/my\\040disk rw - ext2 /dev/loop0 rw\n\
              30 27 0:40 / /srv rw - nfs4 server:/x rw\n\
              31 27 0:41 / /data rw - btrfs /dev/sdb rw\n\
              garbage line\n";
    let mounts = parse_mountinfo(mi);
    assert_eq!(mounts.len(), 5);
    assert_eq!(mounts[2].mountpoint, "/mnt/my disk");
    let disks: Vec<&str> = mounts
        .iter()
        .filter(|m| is_disk_mount(m))
        .map(|m| m.mountpoint.as_str())
        .collect();
    assert_eq!(disks, ["/", "/mnt/my disk", "/data"]);

    let a = disk_address(
        "/sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda",
        "vda",
    )
    .expect("virtio");
    assert_eq!(a.bus_type, "virtio");
    assert_eq!((a.pci_controller.bus, a.pci_controller.slot), (0, 4));
    assert_eq!(a.dev.as_deref(), Some("/dev/vda"));
    let s = disk_address(
        "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:1:3/block/sda",
        "sda",
    )
    .expect("sata");
    assert_eq!(
        (s.bus_type.as_str(), s.bus, s.target, s.unit),
        ("sata", 0, 1, 3)
    );
    assert_eq!(s.pci_controller.slot, 0x1f);
    assert!(disk_address("/sys/devices/virtual/block/loop0", "loop0").is_none());
}

#[test]
fn calendar_conversions_match_known_dates() {
    for (y, m, d, days) in [
        (1970, 1, 1, 0),
        (2000, 3, 1, 11_017),
        (2024, 2, 29, 19_782),
        (1969, 12, 31, -1),
        (2038, 1, 19, 24_855),
    ] {
        assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        assert_eq!(civil_from_days(days), (y, m, d));
    }
    for days in -1000..40_000 {
        let (y, m, d) = civil_from_days(days);
        assert_eq!(days_from_civil(y, m, d), days);
    }
}

#[test]
fn passwd_lookup() {
    let text = "root:x:0:0:root:/root:/bin/sh\nbad:line\nbob:x:1000:100:Bob:/home/bob:/bin/sh\n";
    let p = parse_passwd(text, "bob").expect("bob");
    assert_eq!(
        (p.uid, p.gid, p.home.as_path()),
        (1000, 100, Path::new("/home/bob"))
    );
    assert!(parse_passwd(text, "bad").is_none());
    assert!(parse_passwd(text, "nobody").is_none());
}

// ---- commands, for real --------------------------------------------------------------------

struct Fixture {
    agent: GuestAgent,
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = GuestAgent::new(Settings {
        shutdown_command: Some(dir.path().join("shutdown.sh")),
        passwd: dir.path().join("passwd"),
        utmp: dir.path().join("utmp"),
        rtc: vec![dir.path().join("no-rtc")],
        ..Settings::default()
    });
    Fixture { agent, dir }
}

/// Runs a request text; the reply object and whether it was 0xFF-delimited.
fn call_raw(agent: &GuestAgent, req: &str) -> Option<(Value, bool)> {
    let out = agent.handle_text(req.as_bytes())?;
    assert_eq!(out.last(), Some(&b'\n'), "replies end with a newline");
    let delimited = out[0] == DELIMITER;
    let body = if delimited { &out[1..] } else { &out[..] };
    Some((serde_json::from_slice(body).expect("reply JSON"), delimited))
}

fn call(agent: &GuestAgent, cmd: &Command) -> Result<Value, QgaError> {
    let req = cmd.to_request().to_string();
    let (reply, _) = call_raw(agent, &req).expect("a reply");
    match check_reply(reply) {
        Ok(v) => Ok(v),
        Err(ClientError::Guest(e)) => Err(e),
        Err(e) => panic!("{e}"),
    }
}

fn ok(agent: &GuestAgent, cmd: &Command) -> Value {
    call(agent, cmd).unwrap_or_else(|e| panic!("{}: {e}", cmd.name()))
}

#[test]
fn sync_ping_info_and_unknown_commands() {
    let f = fixture();
    let (v, delimited) = call_raw(
        &f.agent,
        r#"{"execute":"guest-sync-delimited","arguments":{"id":123456789012}}"#,
    )
    .expect("reply");
    assert!(delimited);
    assert_eq!(v, json!({"return": 123456789012i64}));
    let (v, delimited) = call_raw(
        &f.agent,
        r#"{"execute":"guest-sync","arguments":{"id":-1}}"#,
    )
    .expect("reply");
    assert!(!delimited);
    assert_eq!(v, json!({"return": -1}));
    // Errors are never delimited, even for guest-sync-delimited.
    let (v, delimited) =
        call_raw(&f.agent, r#"{"execute":"guest-sync-delimited"}"#).expect("reply");
    assert!(!delimited);
    assert_eq!(v["error"]["class"], "GenericError");
    let (v, _) = call_raw(&f.agent, r#"{"execute":"guest-ping","id":"x"}"#).expect("reply");
    assert_eq!(v, json!({"return": {}, "id": "x"}));
    let (v, _) = call_raw(&f.agent, r#"{"execute":"guest-launch-missiles"}"#).expect("reply");
    assert_eq!(
        v,
        json!({"error": {"class": "CommandNotFound",
            "desc": "The command guest-launch-missiles has not been found"}})
    );
    let (v, _) = call_raw(&f.agent, "{nope").expect("reply");
    assert_eq!(v["error"]["class"], "GenericError");

    let info: GuestAgentInfo = serde_json::from_value(ok(&f.agent, &Command::Info)).expect("info");
    assert_eq!(
        info.version,
        format!("vstream-agent {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(info.supported_commands.len(), COMMANDS.len());
    for c in &info.supported_commands {
        assert!(c.enabled, "{}", c.name);
        // The QAPI schema's `success-response: false` commands.
        let silent = [
            "guest-shutdown",
            "guest-suspend-disk",
            "guest-suspend-ram",
            "guest-suspend-hybrid",
        ];
        assert_eq!(
            c.success_response,
            !silent.contains(&c.name.as_str()),
            "{}",
            c.name
        );
    }
    // The raw member name QGA uses.
    assert!(ok(&f.agent, &Command::Info)["supported_commands"].is_array());
}

#[test]
fn time_host_name_osinfo_timezone_load_and_vcpus_are_this_machines() {
    let f = fixture();
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    let t = ok(&f.agent, &Command::GetTime).as_i64().expect("int");
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    assert!(before <= t && t <= after, "{before} <= {t} <= {after}");

    let host = ok(&f.agent, &Command::GetHostName);
    let want = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(host["host-name"], want.trim());

    let os: GuestOsInfo = serde_json::from_value(ok(&f.agent, &Command::GetOsinfo)).expect("os");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(os.kernel_release.as_deref(), Some(release.trim()));
    assert_eq!(os.machine.as_deref(), Some(std::env::consts::ARCH));
    let version = std::fs::read_to_string("/proc/sys/kernel/version").expect("version");
    assert_eq!(os.kernel_version.as_deref(), Some(version.trim()));
    if let Ok(text) = std::fs::read_to_string("/etc/os-release") {
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("ID="))
            .map(|v| v.trim_matches('"').to_owned());
        assert_eq!(os.id, id);
    }

    let tz: GuestTimezone =
        serde_json::from_value(ok(&f.agent, &Command::GetTimezone)).expect("tz");
    assert!(tz.offset.abs() <= 14 * 3600, "{tz:?}");
    assert!(tz.zone.is_some());

    let load: GuestLoadAverage =
        serde_json::from_value(ok(&f.agent, &Command::GetLoad)).expect("load");
    assert!(load.load1m >= 0.0 && load.load15m >= 0.0);

    let cpus: Vec<GuestLogicalProcessor> =
        serde_json::from_value(ok(&f.agent, &Command::GetVcpus)).expect("vcpus");
    let online = cpus.iter().filter(|c| c.online).count();
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(online >= n, "{online} online vCPUs, {n} usable: {cpus:?}");
    assert_eq!(cpus[0].logical_id, 0);
}

#[test]
fn users_come_from_the_utmp_file() {
    let f = fixture();
    // No utmp file: nobody.
    assert_eq!(ok(&f.agent, &Command::GetUsers), json!([]));
    let mut data = utmp_record(7, b"carol", 1_700_000_000, 125_000);
    data.extend(utmp_record(6, b"LOGIN", 1, 0));
    std::fs::write(f.dir.path().join("utmp"), data).expect("utmp");
    assert_eq!(
        ok(&f.agent, &Command::GetUsers),
        json!([{"user": "carol", "login-time": 1_700_000_000.125}])
    );
}

#[test]
fn network_interfaces_include_loopback_with_addresses_and_counters() {
    let f = fixture();
    let ifs: Vec<GuestNetworkInterface> =
        serde_json::from_value(ok(&f.agent, &Command::NetworkGetInterfaces)).expect("ifs");
    let lo = ifs.iter().find(|i| i.name == "lo").expect("lo");
    assert_eq!(lo.hardware_address.as_deref(), Some("00:00:00:00:00:00"));
    let addrs = lo.ip_addresses.as_ref().expect("lo addresses");
    assert!(
        addrs.contains(&GuestIpAddress {
            ip_address: "127.0.0.1".into(),
            ip_address_type: "ipv4".into(),
            prefix: 8
        }),
        "{addrs:?}"
    );
    assert!(lo.statistics.is_some());
    // Every interface the kernel lists is there.
    let sys: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("sysfs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in sys {
        assert!(ifs.iter().any(|i| i.name == name), "{name} missing");
    }
}

#[test]
fn fsinfo_lists_the_disk_file_systems_with_sizes() {
    let f = fixture();
    let fss: Vec<GuestFilesystemInfo> =
        serde_json::from_value(ok(&f.agent, &Command::GetFsinfo)).expect("fsinfo");
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want: Vec<String> = parse_mountinfo(&mi)
        .into_iter()
        .filter(is_disk_mount)
        .map(|m| m.mountpoint)
        .collect();
    let got: Vec<String> = fss.iter().map(|f| f.mountpoint.clone()).collect();
    assert_eq!(got, want);
    for fs in &fss {
        let total = fs.total_bytes_privileged.expect("statvfs");
        assert!(fs.used_bytes.expect("used") <= total, "{fs:?}");
        assert!(fs.total_bytes.expect("total") <= total, "{fs:?}");
        assert!(!fs.name.is_empty());
    }
}

#[test]
fn freeze_state_without_file_systems_and_unknown_mount_points() {
    let f = fixture();
    assert_eq!(ok(&f.agent, &Command::FsfreezeStatus), json!("thawed"));
    // Mount points that are not disk file systems are ignored (as qemu-ga does): nothing frozen,
    // the state stays thawed. (Freezing the real disks of the test machine is not done here;
    // see freeze_and_thaw_a_loop_mounted_file_system.)
    let n = ok(
        &f.agent,
        &Command::FsfreezeFreezeList {
            mountpoints: Some(vec!["/proc".into(), "/nonexistent".into()]),
        },
    );
    assert_eq!(n, json!(0));
    assert_eq!(ok(&f.agent, &Command::FsfreezeStatus), json!("thawed"));
}

/// A loop-mounted ext2 in a temporary directory, unmounted when dropped.
struct LoopFs {
    mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new() -> Result<LoopFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let run = |cmd: &str, args: &[&str]| -> Result<(), String> {
            let out = std::process::Command::new(cmd)
                .args(args)
                .output()
                .map_err(|e| format!("{cmd}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(8 << 20))
            .map_err(|e| e.to_string())?;
        let img_s = img.to_string_lossy().into_owned();
        let mnt_s = mnt.to_string_lossy().into_owned();
        run("mkfs.ext2", &["-q", "-F", &img_s])?;
        run("mount", &["-o", "loop", &img_s, &mnt_s])?;
        Ok(LoopFs { mnt, _dir: dir })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn freeze_and_thaw_a_loop_mounted_file_system() {
    // Needs root, loop devices and mkfs.ext2 (all there on the project's machines). Without
    // them the test says so loudly and checks nothing else.
    let fs = match LoopFs::new() {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!(
                "!!! SKIPPED freeze_and_thaw_a_loop_mounted_file_system: cannot loop-mount: {e}"
            );
            return;
        }
    };
    let f = fixture();
    let mnt = fs.mnt.to_string_lossy().into_owned();
    let fsinfo = ok(&f.agent, &Command::GetFsinfo);
    let me = fsinfo
        .as_array()
        .expect("list")
        .iter()
        .find(|x| x["mountpoint"] == mnt.as_str())
        .expect("the loop fs is listed")
        .clone();
    assert_eq!(me["type"], "ext2");
    assert!(
        me["name"].as_str().expect("name").starts_with("loop"),
        "{me}"
    );

    let n = ok(
        &f.agent,
        &Command::FsfreezeFreezeList {
            mountpoints: Some(vec![mnt.clone()]),
        },
    );
    assert_eq!(n, json!(1));
    assert_eq!(ok(&f.agent, &Command::FsfreezeStatus), json!("frozen"));
    // While frozen: only qemu-ga's short list of commands runs.
    let e = call(
        &f.agent,
        &Command::FileOpen {
            path: format!("{mnt}/x"),
            mode: Some("w".into()),
        },
    )
    .expect_err("disabled");
    assert_eq!(e.class, "CommandNotFound");
    assert_eq!(
        e.desc,
        "Command guest-file-open has been disabled: the agent is in frozen state"
    );
    let info: GuestAgentInfo = serde_json::from_value(ok(&f.agent, &Command::Info)).expect("info");
    let enabled: Vec<&str> = info
        .supported_commands
        .iter()
        .filter(|c| c.enabled)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        enabled,
        [
            "guest-sync-delimited",
            "guest-sync",
            "guest-ping",
            "guest-info",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw"
        ]
    );
    // A writer to the frozen file system blocks until the thaw.
    let path = format!("{mnt}/written-while-frozen");
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(&path).expect("create");
            file.write_all(b"after thaw").expect("write");
            file.sync_all().expect("sync");
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !writer.is_finished(),
        "a write went through a frozen file system"
    );
    let thawed = ok(&f.agent, &Command::FsfreezeThaw);
    assert!(thawed.as_i64().expect("count") >= 1, "{thawed}");
    assert_eq!(ok(&f.agent, &Command::FsfreezeStatus), json!("thawed"));
    writer.join().expect("writer");
    assert_eq!(std::fs::read(&path).expect("read"), b"after thaw");
}

fn exec_wait(agent: &GuestAgent, args: ExecArgs) -> GuestExecStatus {
    let pid = ok(agent, &Command::Exec(args))["pid"]
        .as_i64()
        .expect("pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st: GuestExecStatus =
            serde_json::from_value(ok(agent, &Command::ExecStatus { pid })).expect("status");
        if st.exited {
            // Reaped: asking again is an error.
            let e = call(agent, &Command::ExecStatus { pid }).expect_err("reaped");
            assert_eq!(e.desc, "Invalid parameter 'pid'");
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} never finished"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sh(script: &str, capture: Capture) -> ExecArgs {
    ExecArgs {
        path: "sh".into(),
        arg: vec!["-c".into(), script.into()],
        env: None,
        input_data: None,
        capture,
    }
}

fn decoded(b64: &Option<String>) -> Vec<u8> {
    base64_decode(b64.as_deref().expect("data")).expect("base64")
}

/// The `THP_enabled:` line of a `/proc/PID/status` text.
fn thp_enabled(status: &str) -> &str {
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim)
        .expect("a THP_enabled line (Linux 5.0 and later)")
}

#[test]
fn a_program_guest_exec_runs_has_the_huge_pages_the_agent_turned_off() {
    // Process-wide, as in the agent; other tests' children get THP back as the agent's do.
    crate::spawn::keep_huge_pages_out().expect("PR_SET_THP_DISABLE");
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    assert_eq!(thp_enabled(&own), "0");
    let f = fixture();
    let st = exec_wait(&f.agent, sh("cat /proc/self/status", Capture::Stdout));
    let child = String::from_utf8(decoded(&st.out_data)).expect("UTF-8 status");
    assert_eq!(thp_enabled(&child), "1");
}

#[test]
fn exec_captures_output_input_exit_codes_and_signals() {
    let f = fixture();
    let st = exec_wait(
        &f.agent,
        sh("echo out; echo err >&2; exit 3", Capture::Separated),
    );
    assert_eq!(st.exitcode, Some(3));
    assert_eq!(st.signal, None);
    assert_eq!(decoded(&st.out_data), b"out\n");
    assert_eq!(decoded(&st.err_data), b"err\n");
    assert_eq!((st.out_truncated, st.err_truncated), (None, None));

    let st = exec_wait(&f.agent, sh("echo out; echo err >&2", Capture::Merged));
    assert_eq!(decoded(&st.out_data), b"out\nerr\n");
    assert_eq!(st.err_data, None);

    let st = exec_wait(&f.agent, sh("echo hidden", Capture::None));
    assert_eq!((st.exitcode, &st.out_data), (Some(0), &None));

    let st = exec_wait(&f.agent, sh("kill -9 $$", Capture::Separated));
    assert_eq!((st.exitcode, st.signal), (None, Some(9)));

    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let st = exec_wait(
        &f.agent,
        ExecArgs {
            path: "cat".into(),
            arg: vec![],
            env: None,
            input_data: Some(base64_encode(&input)),
            capture: Capture::Stdout,
        },
    );
    assert_eq!(decoded(&st.out_data), input);

    let st = exec_wait(
        &f.agent,
        ExecArgs {
            path: "/bin/sh".into(),
            arg: vec!["-c".into(), "echo \"$ONLY:$HOME\"".into()],
            env: Some(vec!["ONLY=yes".into()]),
            input_data: None,
            capture: Capture::Separated,
        },
    );
    assert_eq!(decoded(&st.out_data), b"yes:\n", "env replaces the agent's");

    let e = call(
        &f.agent,
        &Command::Exec(ExecArgs {
            path: "/nonexistent/program".into(),
            ..sh("", Capture::None)
        }),
    )
    .expect_err("no such program");
    assert!(e.desc.contains("No such file or directory"), "{e}");
    let e = call(&f.agent, &Command::ExecStatus { pid: 1 }).expect_err("not ours");
    assert_eq!(e.desc, "Invalid parameter 'pid'");
}

#[test]
fn exec_that_floods_output_is_truncated_at_the_cap() {
    let f = fixture();
    // 20 MiB on stdout, 1 KiB on stderr: stdout stops at 16 MiB, the child still finishes.
    let st = exec_wait(
        &f.agent,
        sh(
            "head -c 20971520 /dev/zero; head -c 1024 /dev/zero >&2",
            Capture::Separated,
        ),
    );
    assert_eq!(st.exitcode, Some(0));
    assert_eq!(st.out_truncated, Some(true));
    assert_eq!(st.err_truncated, None);
    assert_eq!(decoded(&st.out_data).len(), MAX_EXEC_OUTPUT);
    assert_eq!(decoded(&st.err_data).len(), 1024);
}

#[test]
fn files_open_write_seek_read_close_with_checked_handles() {
    let f = fixture();
    let path = f.dir.path().join("data.bin").to_string_lossy().into_owned();
    let h = ok(
        &f.agent,
        &Command::FileOpen {
            path: path.clone(),
            mode: Some("w+".into()),
        },
    )
    .as_i64()
    .expect("handle");
    let mode = std::fs::metadata(&path)
        .expect("created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let w = ok(
        &f.agent,
        &Command::FileWrite {
            handle: h,
            buf_b64: base64_encode(&data),
            count: Some(9_000),
        },
    );
    assert_eq!(w, json!({"count": 9000, "eof": false}));
    let s = ok(
        &f.agent,
        &Command::FileSeek {
            handle: h,
            offset: -1000,
            whence: Whence::End,
        },
    );
    assert_eq!(s, json!({"position": 8000, "eof": false}));
    let r: GuestFileRead = serde_json::from_value(ok(
        &f.agent,
        &Command::FileRead {
            handle: h,
            count: Some(600),
        },
    ))
    .expect("read");
    assert_eq!((r.count, r.eof), (600, false));
    assert_eq!(base64_decode(&r.buf_b64).expect("b64"), &data[8000..8600]);
    // Default count: 4096, reaching the end here.
    let r: GuestFileRead = serde_json::from_value(ok(
        &f.agent,
        &Command::FileRead {
            handle: h,
            count: None,
        },
    ))
    .expect("read");
    assert_eq!((r.count, r.eof), (400, true));
    ok(&f.agent, &Command::FileFlush { handle: h });

    for (cmd, want) in [
        (
            Command::FileRead {
                handle: h,
                count: Some(-1),
            },
            "value '-1' is invalid for argument count".to_owned(),
        ),
        (
            Command::FileWrite {
                handle: h,
                buf_b64: "eA==".into(),
                count: Some(2),
            },
            "value '2' is invalid for argument count".to_owned(),
        ),
        (
            Command::FileWrite {
                handle: h,
                buf_b64: "not base64!".into(),
                count: None,
            },
            "Base64 data is not valid".to_owned(),
        ),
        (
            Command::FileSeek {
                handle: h,
                offset: -1,
                whence: Whence::Set,
            },
            "failed to seek file: Invalid argument".to_owned(),
        ),
        (
            Command::FileOpen {
                path: path.clone(),
                mode: Some("rw".into()),
            },
            "invalid file open mode 'rw'".to_owned(),
        ),
        (
            Command::FileRead {
                handle: 424242,
                count: None,
            },
            "handle '424242' has not been found".to_owned(),
        ),
    ] {
        assert_eq!(call(&f.agent, &cmd).expect_err(cmd.name()).desc, want);
    }
    let e = call(
        &f.agent,
        &Command::FileOpen {
            path: "/nonexistent/dir/x".into(),
            mode: None,
        },
    )
    .expect_err("missing");
    assert_eq!(
        e.desc,
        "failed to open file '/nonexistent/dir/x' (mode: 'r'): No such file or directory"
    );
    ok(&f.agent, &Command::FileClose { handle: h });
    assert!(call(&f.agent, &Command::FileClose { handle: h }).is_err());
}

#[test]
fn file_reads_of_any_size_echo_the_id_and_decode_to_the_file() {
    let f = fixture();
    // Sizes around the agent's 48 KiB read pieces, and not multiples of 3.
    let data: Vec<u8> = (0..300_001u32).map(|i| (i * 31 % 251) as u8).collect();
    let path = f.dir.path().join("src.bin");
    std::fs::write(&path, &data).expect("write");
    let open = json!({"execute": "guest-file-open", "arguments": {"path": path}});
    let (reply, _) = call_raw(&f.agent, &open.to_string()).expect("reply");
    let h = reply["return"].as_i64().expect("handle");
    let mut at = 0;
    for (i, count) in [0, 1, 2, 3, 49_151, 49_152, 49_153, 98_305, 200_000]
        .into_iter()
        .enumerate()
    {
        let id = if i % 2 == 0 {
            json!(format!("read \"{i}\""))
        } else {
            json!({"n": i})
        };
        let req = json!({"execute": "guest-file-read", "id": id,
            "arguments": {"handle": h, "count": count}});
        let (reply, delimited) = call_raw(&f.agent, &req.to_string()).expect("reply");
        assert!(!delimited);
        let want = (data.len() - at).min(count);
        assert_eq!(reply["id"], id, "the id is echoed");
        let r: GuestFileRead = serde_json::from_value(reply["return"].clone()).expect("read");
        assert_eq!(r.count, want as u64, "count {count}");
        assert_eq!(r.eof, want < count, "count {count}");
        assert_eq!(
            base64_decode(&r.buf_b64).expect("b64"),
            &data[at..at + want]
        );
        at += want;
    }
    assert_eq!(at, data.len(), "the whole file was read");
    // Without an id, and an error instead of data.
    let (reply, _) = call_raw(
        &f.agent,
        &json!({"execute": "guest-file-read", "arguments": {"handle": h}}).to_string(),
    )
    .expect("reply");
    assert_eq!(
        reply,
        json!({"return": {"buf-b64": "", "count": 0, "eof": true}})
    );
    let (reply, _) = call_raw(
        &f.agent,
        &json!({"execute": "guest-file-read", "id": 5, "arguments": {"handle": h + 1}}).to_string(),
    )
    .expect("reply");
    assert_eq!(reply["id"], 5);
    assert_eq!(
        reply["error"]["desc"],
        format!("handle '{}' has not been found", h + 1)
    );
}

#[test]
fn a_file_written_with_mode_w_appears_whole_on_close_only() {
    let f = fixture();
    let path = f.dir.path().join("target.bin");
    std::fs::write(&path, b"old content").expect("old");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let p = path.to_string_lossy().into_owned();
    let open = |mode: &str| {
        ok(
            &f.agent,
            &Command::FileOpen {
                path: p.clone(),
                mode: Some(mode.into()),
            },
        )
        .as_i64()
        .expect("handle")
    };
    let write = |h: i64, data: &[u8]| {
        ok(
            &f.agent,
            &Command::FileWrite {
                handle: h,
                buf_b64: base64_encode(data),
                count: None,
            },
        )
    };
    let partial = |h: i64| f.dir.path().join(format!("target.bin.vstream-partial-{h}"));

    // A copy cut short (never closed): the final name keeps its old content, the data is
    // under a name that says it is partial.
    let cut = open("w");
    write(cut, b"the first half of a ");
    assert_eq!(std::fs::read(&path).expect("final"), b"old content");
    assert_eq!(
        std::fs::read(partial(cut)).expect("partial"),
        b"the first half of a "
    );

    // A whole one: in place on close, with the file's mode.
    let whole = open("wb");
    write(whole, b"new content, all of it");
    assert_eq!(std::fs::read(&path).expect("final"), b"old content");
    ok(&f.agent, &Command::FileClose { handle: whole });
    assert_eq!(
        std::fs::read(&path).expect("final"),
        b"new content, all of it"
    );
    let mode = std::fs::metadata(&path)
        .expect("final")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert!(!partial(whole).exists());
    assert!(partial(cut).exists());

    // A link planted under the next temporary name is not followed: it is replaced.
    let victim = f.dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    let next = whole + 1;
    std::os::unix::fs::symlink(&victim, partial(next)).expect("plant");
    assert_eq!(open("w"), next);
    write(next, b"x");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    ok(&f.agent, &Command::FileClose { handle: next });
    assert_eq!(std::fs::read(&path).expect("final"), b"x");

    // Through a symbolic link: written in place, the link stays a link.
    let link = f.dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let h = ok(
        &f.agent,
        &Command::FileOpen {
            path: link.to_string_lossy().into_owned(),
            mode: Some("w".into()),
        },
    )
    .as_i64()
    .expect("handle");
    write(h, b"via the link");
    assert_eq!(std::fs::read(&path).expect("final"), b"via the link");
    ok(&f.agent, &Command::FileClose { handle: h });
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
}

#[test]
fn open_handles_and_read_counts_are_bounded() {
    let f = fixture();
    let path = f.dir.path().join("big");
    std::fs::write(&path, vec![7u8; MAX_READ_COUNT + 5]).expect("write");
    let path = path.to_string_lossy().into_owned();
    let open = || {
        call(
            &f.agent,
            &Command::FileOpen {
                path: path.clone(),
                mode: None,
            },
        )
    };
    let handles: Vec<i64> = (0..MAX_OPEN_FILES)
        .map(|_| open().expect("open").as_i64().expect("handle"))
        .collect();
    let e = open().expect_err("one too many");
    assert!(e.desc.starts_with("too many open files"), "{e}");
    // A count above the cap is served in part.
    let r: GuestFileRead = serde_json::from_value(ok(
        &f.agent,
        &Command::FileRead {
            handle: handles[0],
            count: Some(1 << 40),
        },
    ))
    .expect("read");
    assert_eq!((r.count, r.eof), (MAX_READ_COUNT as u64, false));
    for h in handles {
        ok(&f.agent, &Command::FileClose { handle: h });
    }
    open().expect("room again");
}

#[test]
fn ssh_keys_are_added_listed_and_removed_with_the_right_modes() {
    let f = fixture();
    let home = f.dir.path().join("home");
    std::fs::create_dir(&home).expect("home");
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    std::fs::write(
        f.dir.path().join("passwd"),
        format!(
            "root:x:0:0::/root:/bin/sh\ntester:x:{uid}:{gid}::{}:/bin/sh\n",
            home.display()
        ),
    )
    .expect("passwd");
    let user = || "tester".to_owned();
    let k1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne one@host".to_owned();
    let k2 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQTwo two@host".to_owned();
    assert_eq!(
        ok(
            &f.agent,
            &Command::SshGetAuthorizedKeys { username: user() }
        ),
        json!({"keys": []})
    );
    ok(
        &f.agent,
        &Command::SshAddAuthorizedKeys {
            username: user(),
            keys: vec![k1.clone(), k2.clone(), k1.clone()],
            reset: false,
        },
    );
    let dir_mode = std::fs::metadata(home.join(".ssh"))
        .expect(".ssh")
        .permissions()
        .mode();
    let file_mode = std::fs::metadata(home.join(".ssh/authorized_keys"))
        .expect("keys")
        .permissions()
        .mode();
    assert_eq!((dir_mode & 0o777, file_mode & 0o777), (0o700, 0o600));
    assert_eq!(
        ok(
            &f.agent,
            &Command::SshGetAuthorizedKeys { username: user() }
        ),
        json!({"keys": [k1, k2]})
    );
    ok(
        &f.agent,
        &Command::SshRemoveAuthorizedKeys {
            username: user(),
            keys: vec![k1.clone()],
        },
    );
    assert_eq!(
        std::fs::read_to_string(home.join(".ssh/authorized_keys")).expect("read"),
        format!("{k2}\n")
    );
    ok(
        &f.agent,
        &Command::SshAddAuthorizedKeys {
            username: user(),
            keys: vec![k1.clone()],
            reset: true,
        },
    );
    assert_eq!(
        ok(
            &f.agent,
            &Command::SshGetAuthorizedKeys { username: user() }
        ),
        json!({"keys": [k1]})
    );
    // An empty key, as virsh set-user-sshkeys sends after its file's last newline, is taken
    // (qemu-ga takes it) and adds nothing.
    ok(
        &f.agent,
        &Command::SshAddAuthorizedKeys {
            username: user(),
            keys: vec![k1.clone(), String::new()],
            reset: false,
        },
    );
    assert_eq!(
        ok(
            &f.agent,
            &Command::SshGetAuthorizedKeys { username: user() }
        ),
        json!({"keys": [k1]})
    );
    for bad in ["\n", "# comment", "ssh-rsa AAAA\nssh-rsa BBBB", "nospace"] {
        let e = call(
            &f.agent,
            &Command::SshAddAuthorizedKeys {
                username: user(),
                keys: vec![bad.into()],
                reset: false,
            },
        )
        .expect_err(bad);
        assert!(e.desc.starts_with("invalid OpenSSH public key"), "{e}");
    }
    let e = call(
        &f.agent,
        &Command::SshGetAuthorizedKeys {
            username: "ghost".into(),
        },
    )
    .expect_err("ghost");
    assert!(e.desc.contains("'ghost'"), "{e}");
}

#[test]
fn shutdown_sends_no_reply_and_runs_the_configured_command() {
    let f = fixture();
    let log = f.dir.path().join("shutdown.log");
    let script = f.dir.path().join("shutdown.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", log.display()),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert!(f
        .agent
        .handle_text(br#"{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}"#)
        .is_none());
    assert!(f
        .agent
        .handle_text(br#"{"execute":"guest-shutdown"}"#)
        .is_none());
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "reboot\npowerdown\n"
    );
    // A failing shutdown is an error reply.
    std::fs::write(&script, "#!/bin/sh\nexit 1\n").expect("script");
    let (v, _) = call_raw(
        &f.agent,
        r#"{"execute":"guest-shutdown","arguments":{"mode":"halt"}}"#,
    )
    .expect("error reply");
    assert!(
        v["error"]["desc"]
            .as_str()
            .expect("desc")
            .starts_with("child process has failed to shutdown"),
        "{v}"
    );
}

/// An agent whose /sys is `dir/sys` (with `power/state` holding `state`, if any) and whose
/// suspend helpers are looked for in `dir/bin` only.
fn suspend_agent(dir: &Path, state: Option<&str>) -> GuestAgent {
    std::fs::create_dir_all(dir.join("sys/power")).expect("sys");
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    if let Some(state) = state {
        std::fs::write(dir.join("sys/power/state"), state).expect("state");
    }
    GuestAgent::new(Settings {
        sysfs: dir.join("sys"),
        helper_dirs: vec![dir.join("bin")],
        ..Settings::default()
    })
}

/// A helper program in `dir/bin` that logs its arguments to `dir/log` and runs `body`.
fn suspend_helper(dir: &Path, name: &str, body: &str) {
    let path = dir.join("bin").join(name);
    let log = dir.join("log");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho {name} \"$@\" >> {}\n{body}\n",
            log.display()
        ),
    )
    .expect("helper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// `guest-suspend-MODE`: None when the agent sent nothing, else the error reply.
fn suspend(agent: &GuestAgent, mode: &str) -> Option<Value> {
    let req = format!(r#"{{"execute":"guest-suspend-{mode}"}}"#);
    let out = agent.handle_text(req.as_bytes())?;
    assert_eq!(out.last(), Some(&b'\n'), "replies end with a newline");
    Some(serde_json::from_slice(&out).expect("reply JSON"))
}

const NOT_SUPPORTED: &str = "the requested suspend mode is not supported by the guest";

#[test]
fn suspend_uses_the_kernel_when_it_offers_the_mode_and_replies_only_on_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let agent = suspend_agent(d, Some("freeze mem\n"));
    // Offered: written, and no reply at all (libvirt waits for QEMU's SUSPEND event instead).
    // (Written at its start, without truncating, as qemu-ga opens it.)
    assert_eq!(suspend(&agent, "ram"), None);
    assert_eq!(
        std::fs::read_to_string(d.join("sys/power/state")).expect("state"),
        "memeze mem\n"
    );
    // Not offered: qemu-ga's error, and the file is left alone.
    std::fs::write(d.join("sys/power/state"), "freeze mem\n").expect("state");
    let v = suspend(&agent, "disk").expect("an error reply");
    assert_eq!(
        v,
        json!({"error": {"class": "GenericError", "desc": NOT_SUPPORTED}})
    );
    // qemu-ga 7.2 has no kernel path for hybrid, whatever the kernel offers.
    std::fs::write(d.join("sys/power/state"), "freeze mem disk\n").expect("state");
    assert_eq!(
        suspend(&agent, "hybrid").expect("error")["error"]["desc"],
        NOT_SUPPORTED
    );
    assert_eq!(suspend(&agent, "disk"), None);
    assert_eq!(
        std::fs::read_to_string(d.join("sys/power/state")).expect("state"),
        "diskze mem disk\n"
    );
    // No /sys/power/state: nothing is supported.
    let none = tempfile::tempdir().expect("tempdir");
    let agent = suspend_agent(none.path(), None);
    for mode in ["ram", "disk", "hybrid"] {
        let v = suspend(&agent, mode).expect("error");
        assert_eq!(v["error"]["class"], "GenericError", "{mode}");
        assert_eq!(v["error"]["desc"], NOT_SUPPORTED, "{mode}");
    }
    // Not on qemu-ga's list of commands allowed while frozen, and silent on success.
    for mode in ["ram", "disk", "hybrid"] {
        let name = format!("guest-suspend-{mode}");
        let spec = command_spec(&name).expect("listed");
        assert!(!spec.allowed_frozen && !spec.success_response, "{name}");
    }
}

#[test]
fn suspend_prefers_systemd_then_pm_utils_then_the_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let agent = suspend_agent(d, Some("freeze mem disk\n"));
    let log = || std::fs::read_to_string(d.join("log")).unwrap_or_default();
    let state = || std::fs::read_to_string(d.join("sys/power/state")).expect("state");

    // systemd has the unit (`status` exits 3, stopped): `systemctl suspend`, nothing else.
    suspend_helper(d, "systemctl", r#"[ "$1" = status ] && exit 3; exit 0"#);
    suspend_helper(d, "pm-is-supported", "exit 0");
    suspend_helper(d, "pm-suspend", "exit 0");
    assert_eq!(suspend(&agent, "ram"), None);
    assert_eq!(
        log(),
        "systemctl status systemd-suspend\nsystemctl suspend\n"
    );
    assert_eq!(state(), "freeze mem disk\n");

    // No such unit (4): pm-utils.
    std::fs::remove_file(d.join("log")).expect("rm log");
    suspend_helper(d, "systemctl", "exit 4");
    assert_eq!(suspend(&agent, "ram"), None);
    assert_eq!(
        log(),
        "systemctl status systemd-suspend\npm-is-supported --suspend\npm-suspend\n"
    );
    assert_eq!(state(), "freeze mem disk\n");

    // systemd and pm-utils say yes but fail: the kernel, last.
    std::fs::remove_file(d.join("log")).expect("rm log");
    suspend_helper(d, "systemctl", r#"[ "$1" = status ] && exit 3; exit 1"#);
    suspend_helper(d, "pm-suspend", "exit 1");
    assert_eq!(suspend(&agent, "ram"), None);
    assert_eq!(
        log(),
        "systemctl status systemd-suspend\nsystemctl suspend\n\
         pm-is-supported --suspend\npm-suspend\n"
    );
    assert_eq!(state(), "memeze mem disk\n");

    // Hybrid supported by systemd but failing, no kernel path: qemu-ga's last error.
    std::fs::remove_file(d.join("log")).expect("rm log");
    suspend_helper(d, "pm-is-supported", "exit 1");
    let v = suspend(&agent, "hybrid").expect("error");
    assert_eq!(
        v,
        json!({"error": {"class": "GenericError", "desc": "unknown guest suspend mode"}})
    );
    assert!(log().starts_with(
        "systemctl status systemd-hybrid-sleep\nsystemctl hybrid-sleep\n\
         pm-is-supported --suspend-hybrid\n"
    ));
}

#[test]
fn set_time_checks_its_argument_and_needs_a_clock_to_read() {
    let f = fixture();
    let e = call(&f.agent, &Command::SetTime { time: Some(-1) }).expect_err("negative");
    assert_eq!(e.desc, "Failed to set time to guest: Invalid argument");
    let e = call(&f.agent, &Command::SetTime { time: None }).expect_err("no rtc");
    assert!(e.desc.contains("no hardware clock"), "{e}");
}

// ---- serving over a stream -----------------------------------------------------------------

#[tokio::test]
async fn a_stream_survives_garbage_oversized_requests_and_resyncs() {
    let f = fixture();
    let (client, server) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(serve(Arc::new(f.agent), server));
    survives_garbage_oversized_requests_and_resyncs(client, task).await;
}

/// The same on a descriptor served by a thread of its own (how a port is served).
#[tokio::test(flavor = "current_thread")]
async fn a_descriptor_served_on_a_thread_survives_garbage_oversized_requests_and_resyncs() {
    let f = fixture();
    let (client, server) = tokio::net::UnixStream::pair().expect("pair");
    let server = std::os::fd::OwnedFd::from(server.into_std().expect("std"));
    let task = tokio::spawn(serve_on_thread(Arc::new(f.agent), server));
    survives_garbage_oversized_requests_and_resyncs(client, task).await;
}

async fn survives_garbage_oversized_requests_and_resyncs(
    mut client: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    // Two requests in one write, garbage between them, no newlines.
    client
        .write_all(
            br#"{"execute":"guest-sync","arguments":{"id":1}}}}]garbage{"execute":"guest-ping"}"#,
        )
        .await
        .expect("write");
    // A partial request, then 0xFF + guest-sync-delimited as a resyncing client sends it.
    client
        .write_all(b"{\"execute\":\"guest-file-open\",\"argum")
        .await
        .expect("write");
    client.write_all(&[DELIMITER]).await.expect("write");
    client
        .write_all(br#"{"execute":"guest-sync-delimited","arguments":{"id":77}}"#)
        .await
        .expect("write");
    // An oversized request (beyond MAX_REQUEST), then a ping that must still be answered.
    client
        .write_all(b"{\"execute\":\"guest-file-write\",\"arguments\":{\"handle\":1,\"buf-b64\":\"")
        .await
        .expect("write");
    let chunk = vec![b'A'; 1 << 20];
    for _ in 0..(MAX_REQUEST >> 20) + 1 {
        client.write_all(&chunk).await.expect("write");
    }
    client
        .write_all(b"\"}}\n{\"execute\":\"guest-ping\"}\n")
        .await
        .expect("write");
    client.shutdown().await.expect("eof");
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.expect("read");
    task.await.expect("join").expect("serve");

    let mut f = Framer::new(1 << 20);
    f.push(&out);
    let mut replies = Vec::new();
    while let Some(fr) = f.next_frame() {
        replies.push(match fr {
            Frame::Text(t) => serde_json::from_slice::<Value>(&t).expect("json"),
            Frame::Delimiter { dropped } => json!({"delimiter": dropped}),
            Frame::TooLarge { .. } => panic!("reply too large"),
        });
    }
    let classes: Vec<String> = replies
        .iter()
        .map(|r| match (&r["return"], &r["error"]["desc"]) {
            (Value::Null, Value::String(d)) => format!("error: {d}"),
            (v, _) if !v.is_null() => format!("return {v}"),
            _ => r.to_string(),
        })
        .collect();
    assert_eq!(
        classes,
        [
            "return 1",
            "error: JSON parse error, expected value at line 1 column 1",
            "return {}",
            r#"{"delimiter":0}"#,
            "return 77",
            &format!(
                "error: request too large: {} bytes (at most {MAX_REQUEST})",
                MAX_REQUEST + (1 << 20) + 68
            ),
            "return {}",
        ]
    );
}

#[tokio::test]
async fn the_client_syncs_past_stale_replies_and_copies_files_both_ways() {
    let f = fixture();
    let agent = Arc::new(f.agent);
    let (mut client_end, server) = tokio::io::duplex(1 << 20);
    // A previous client left a request whose reply is still to come, and half a request.
    client_end
        .write_all(br#"{"execute":"guest-sync","arguments":{"id":5}} {"execute":"guest-get"#)
        .await
        .expect("write");
    tokio::spawn(serve(agent, server));
    let mut client = Client::new(client_end);
    client.sync().await.expect("sync");
    assert_eq!(client.detect_pipelining().await.expect("info"), PIPELINE);
    client.call(&Command::Ping).await.expect("ping");
    assert!(matches!(
        client.call(&Command::FileClose { handle: 1 }).await,
        Err(ClientError::Guest(e)) if e.desc == "handle '1' has not been found"
    ));

    let data: Vec<u8> = (0..3_000_001u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let path = f.dir.path().join("copied").to_string_lossy().into_owned();
    let mut seen = Vec::new();
    let n = copy_to_guest(&mut client, &data[..], &path, 1 << 20, |d| seen.push(d))
        .await
        .expect("to guest");
    assert_eq!(n, data.len() as u64);
    assert_eq!(seen, [1 << 20, 2 << 20, 3_000_001]);
    assert!(std::fs::read(&path).expect("read") == data);
    let mut back = Vec::new();
    let mut last = (0, None);
    let n = copy_from_guest(&mut client, &path, &mut back, 700_000, |d, t| last = (d, t))
        .await
        .expect("from guest");
    assert_eq!(n, data.len() as u64);
    assert_eq!(last, (data.len() as u64, Some(data.len() as u64)));
    assert!(back == data);
    let e = copy_from_guest(&mut client, "/nonexistent/x", &mut back, 10, |_, _| {})
        .await
        .expect_err("missing");
    assert!(e.to_string().contains("No such file or directory"), "{e}");
}

#[tokio::test]
async fn the_client_rejects_hostile_replies() {
    // A fake agent that answers each request with a canned reply.
    async fn against(reply: &'static [u8]) -> ClientError {
        let (client_end, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = server.read(&mut buf).await {
                if n == 0 || server.write_all(reply).await.is_err() {
                    break;
                }
            }
        });
        let mut c = Client::new(client_end);
        c.set_timeout(Duration::from_millis(300));
        c.file_read(1, 4).await.expect_err("hostile")
    }
    let e = against(br#"{"return":{"count":2,"buf-b64":"AAAAAAAA","eof":false}}"#).await;
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    let e = against(br#"{"return":{"count":6,"buf-b64":"AAAAAAAA","eof":false}}"#).await;
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    let e = against(br#"{"return":{"count":"x"}}"#).await;
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    let e = against(br#"{"error":"nope"}"#).await;
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    let e = against(br#"[]"#).await;
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    let e = against(b"   ").await;
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
}

#[tokio::test]
async fn only_vstream_agent_gets_pipelined_requests() {
    // A qemu-ga: one request at a time.
    let (client_end, mut server) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = server.read(&mut buf).await {
            let reply = br#"{"return": {"version": "7.2.22", "supported_commands": []}}"#;
            if n == 0 || server.write_all(reply).await.is_err() {
                break;
            }
        }
    });
    let mut c = Client::new(client_end);
    c.set_pipeline(9);
    assert_eq!(c.detect_pipelining().await.expect("info"), 1);
}

// ---- qemu-ga's command line, configuration file and block/allow lists ------------------------

/// qemu-ga's options as vstream-agent parses them (`argv` without the program name).
fn qemu_ga_matches(argv: &[&str]) -> clap::ArgMatches {
    clap::Command::new("vstream-agent")
        .args(qemu_ga::args())
        .try_get_matches_from(std::iter::once("vstream-agent").chain(argv.iter().copied()))
        .expect("qemu-ga options")
}

/// The configuration from `argv` and a file system holding only `files`.
fn qemu_ga_config(
    argv: &[&str],
    conf_env: Option<&str>,
    files: &[(&str, &str)],
) -> Result<QemuGaConfig, String> {
    let read = |path: &str| {
        Ok(files
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, t)| (*t).to_owned()))
    };
    qemu_ga::from_matches(&qemu_ga_matches(argv), conf_env, read)
}

#[test]
fn qemu_ga_defaults_dump_as_debian_qemu_ga_does() {
    // `/usr/sbin/qemu-ga -D` (Debian 12, qemu-ga 7.2) with no configuration file.
    let want = "[general]\ndaemon=false\nmethod=virtio-serial\n\
                path=/dev/virtio-ports/org.qemu.guest_agent.0\npidfile=/var/run/qemu-ga.pid\n\
                statedir=/var/run\nverbose=false\nretry-path=false\nblock-rpcs=\n";
    let c = qemu_ga_config(&["-D"], None, &[]).expect("defaults");
    assert!(c.dump_conf);
    assert_eq!(c.dump().expect("dump"), want);
    assert_eq!(
        c.address().expect("address").to_string(),
        "port:org.qemu.guest_agent.0"
    );
    assert!(qemu_ga::wanted(&qemu_ga_matches(&["-D"]), None));
    assert!(!qemu_ga::wanted(
        &qemu_ga_matches(&[]),
        Some("/usr/bin/vstream-agent".as_ref())
    ));
    assert!(qemu_ga::wanted(
        &qemu_ga_matches(&[]),
        Some("/usr/sbin/qemu-ga".as_ref())
    ));
}

#[test]
fn qemu_ga_options_dump_as_debian_qemu_ga_does() {
    // `qemu-ga -b guest-ping,guest-info -F -v -d -m unix-listen -p /tmp/x.sock -t /tmp
    // -f /tmp/p.pid -l /tmp/l.log -r -D`: its list comes out reversed, as qemu-ga's does.
    let argv = [
        "-b",
        "guest-ping,guest-info",
        "-F",
        "-v",
        "-d",
        "-m",
        "unix-listen",
        "-p",
        "/tmp/x.sock",
        "-t",
        "/tmp",
        "-f",
        "/tmp/p.pid",
        "-l",
        "/tmp/l.log",
        "-r",
        "-D",
    ];
    let want = "[general]\ndaemon=true\nmethod=unix-listen\npath=/tmp/x.sock\nlogfile=/tmp/l.log\n\
                pidfile=/tmp/p.pid\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\nstatedir=/tmp\n\
                verbose=true\nretry-path=true\nblock-rpcs=guest-info,guest-ping\n";
    let c = qemu_ga_config(&argv, None, &[]).expect("options");
    assert_eq!(c.dump().expect("dump"), want);
    assert_eq!(
        c.address().expect("address").to_string(),
        "unix-listen:/tmp/x.sock"
    );
    let long = qemu_ga_config(
        &[
            "--method=vsock-listen",
            "--path=3:1234",
            "--fsfreeze-hook=/h",
            "--block-rpcs=a",
        ],
        None,
        &[],
    )
    .expect("long options");
    assert_eq!(
        long.address().expect("vsock").to_string(),
        "vsock-listen:1234"
    );
    assert_eq!(long.fsfreeze_hook.as_deref(), Some("/h"));
    assert!(!long.list_rpcs);
    assert!(
        qemu_ga_config(&["-b", "help"], None, &[])
            .expect("help")
            .list_rpcs
    );
    // qemu-ga: no default path but for the two serial methods.
    assert_eq!(
        qemu_ga_config(&["-m", "unix-listen"], None, &[]).unwrap_err(),
        "must specify a path for this channel"
    );
    let isa = qemu_ga_config(&["-m", "isa-serial"], None, &[]).expect("isa");
    assert_eq!(
        isa.address().expect("serial").to_string(),
        "serial:/dev/ttyS0,baud=38400"
    );
    let bogus = qemu_ga_config(&["-m", "bogus", "-p", "/x"], None, &[]).expect("parsed");
    assert_eq!(
        bogus.address().unwrap_err(),
        "invalid channel method: bogus"
    );
}

#[test]
fn qemu_ga_reads_its_configuration_file_and_the_command_line_wins() {
    let conf = "# qemu-ga\n[general]\ndaemon=true\nmethod=unix-listen\npath=/run/ga.sock\n\
                block-rpcs=guest-exec,guest-file-open\nverbose=1\n[other]\nmethod=ignored\n";
    // The default file, `$QGA_CONF`, then `-c`.
    for (argv, env, path) in [
        (&[][..], None, qemu_ga::DEFAULT_CONF),
        (&[][..], Some("/env.conf"), "/env.conf"),
        (&["-c", "/given.conf"][..], Some("/env.conf"), "/given.conf"),
    ] {
        let c = qemu_ga_config(argv, env, &[(path, conf)]).expect("config");
        assert!(c.daemonize && c.verbose, "{path}");
        assert_eq!(
            c.address().expect("address").to_string(),
            "unix-listen:/run/ga.sock"
        );
        assert_eq!(c.block_rpcs, ["guest-file-open", "guest-exec"]);
    }
    let c = qemu_ga_config(
        &[
            "-m",
            "virtio-serial",
            "-p",
            "/dev/virtio-ports/x",
            "-b",
            "guest-ping",
        ],
        None,
        &[(qemu_ga::DEFAULT_CONF, conf)],
    )
    .expect("config");
    assert_eq!(c.address().expect("address").to_string(), "port:x");
    assert_eq!(
        c.block_rpcs,
        ["guest-file-open", "guest-exec", "guest-ping"]
    );
    // A missing default file is no error; a missing `-c` file and a bad file are, with glib's words.
    assert!(qemu_ga_config(&["-c", "/none"], None, &[])
        .unwrap_err()
        .contains("/none"));
    for (text, error) in [
        ("[general]\nverbose=yes\n", "Key file contains key “verbose” which has a value that cannot be interpreted."),
        ("garbage\n", "Key file contains line “garbage” which is not a key-value pair, group, or comment"),
        ("method=x\n", "Key file does not start with a group"),
        ("[general]\nblock-rpcs=a\nallow-rpcs=b\n", "wrong config, using 'block-rpcs' and 'allow-rpcs' keys at the same time is not allowed"),
    ] {
        assert_eq!(
            qemu_ga_config(&[], Some("/c"), &[("/c", text)]).unwrap_err(),
            format!("error loading configuration from path: /c, {error}")
        );
    }
}

#[test]
fn blocked_and_not_allowed_commands_answer_as_qemu_ga_does() {
    let blocked = |filter: CommandFilter| {
        GuestAgent::new(Settings {
            filter,
            ..Settings::default()
        })
    };
    let info_enabled = |agent: &GuestAgent, name: &str| {
        let info: GuestAgentInfo = serde_json::from_value(ok(agent, &Command::Info)).expect("info");
        info.supported_commands
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.enabled)
            .expect("listed")
    };
    let disabled = |agent: &GuestAgent, name: &str| {
        let (reply, _) = call_raw(agent, &format!(r#"{{"execute":"{name}"}}"#)).expect("reply");
        assert_eq!(
            reply,
            json!({"error": {"class": "CommandNotFound", "desc": format!("Command {name} has been disabled")}}),
            "{name}"
        );
    };
    let config =
        qemu_ga_config(&["-b", "guest-get-time,guest-get-host-name"], None, &[]).expect("b");
    let agent = blocked(config.filter());
    disabled(&agent, "guest-get-time");
    disabled(&agent, "guest-get-host-name");
    assert!(!info_enabled(&agent, "guest-get-time"));
    assert!(info_enabled(&agent, "guest-ping"));
    ok(&agent, &Command::Ping);
    // Unknown stays unknown.
    let (reply, _) = call_raw(&agent, r#"{"execute":"guest-nope"}"#).expect("reply");
    assert_eq!(
        reply["error"]["desc"],
        "The command guest-nope has not been found"
    );

    // An allow list disables everything else; the block list wins over it.
    let config = qemu_ga_config(
        &[
            "-a",
            "guest-ping,guest-info,guest-get-time",
            "-b",
            "guest-get-time",
        ],
        None,
        &[],
    )
    .expect("a");
    let agent = blocked(config.filter());
    ok(&agent, &Command::Ping);
    assert!(info_enabled(&agent, "guest-info"));
    disabled(&agent, "guest-get-time");
    disabled(&agent, "guest-get-osinfo");
    assert!(!info_enabled(&agent, "guest-get-osinfo"));
}

// ---- memory blocks, CPUs and passwords -------------------------------------------------------

/// An agent over a fake sysfs: memory blocks 0 (online, removable), 1 (offline, removable),
/// 2 (online, no `removable` file); 256 MiB blocks; cpu0 (no `online` file) and cpu1 (online).
fn sysfs_fixture() -> (GuestAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = dir.path().join("devices/system/memory");
    for (n, state, removable) in [
        (0, "online", Some("1")),
        (1, "offline", Some("1")),
        (2, "online", None),
    ] {
        let b = mem.join(format!("memory{n}"));
        std::fs::create_dir_all(&b).expect("mkdir");
        std::fs::write(b.join("state"), format!("{state}\n")).expect("state");
        if let Some(r) = removable {
            std::fs::write(b.join("removable"), format!("{r}\n")).expect("removable");
        }
    }
    std::fs::write(mem.join("block_size_bytes"), "10000000\n").expect("size");
    std::fs::create_dir_all(mem.join("power")).expect("not a block");
    let cpu = dir.path().join("devices/system/cpu");
    std::fs::create_dir_all(cpu.join("cpu0")).expect("cpu0");
    std::fs::create_dir_all(cpu.join("cpu1")).expect("cpu1");
    std::fs::write(cpu.join("cpu1/online"), "1\n").expect("online");
    let agent = GuestAgent::new(Settings {
        sysfs: dir.path().to_owned(),
        ..Settings::default()
    });
    (agent, dir)
}

#[test]
fn memory_blocks_are_read_and_set_through_sysfs() {
    let (agent, dir) = sysfs_fixture();
    let blocks = ok(&agent, &Command::GetMemoryBlocks);
    assert_eq!(
        blocks,
        json!([
            {"phys-index": 0, "online": true, "can-offline": true},
            {"phys-index": 1, "online": false, "can-offline": true},
            {"phys-index": 2, "online": true, "can-offline": false},
        ])
    );
    assert_eq!(
        ok(&agent, &Command::GetMemoryBlockInfo),
        json!({"size": 256u64 << 20})
    );
    let set = |index, online| GuestMemoryBlock {
        phys_index: index,
        online,
        can_offline: None,
    };
    let (reply, _) = call_raw(
        &agent,
        &json!({"execute": "guest-set-memory-blocks", "arguments": {"mem-blks": [
            set(1, true), set(0, true), set(2, false), set(7, true)
        ]}})
        .to_string(),
    )
    .expect("reply");
    let r = &reply["return"];
    assert_eq!(r[0], json!({"phys-index": 1, "response": "success"}));
    assert_eq!(r[1], json!({"phys-index": 0, "response": "success"}));
    assert_eq!(
        r[2],
        json!({"phys-index": 2, "response": "operation-not-supported"})
    );
    assert_eq!(r[3]["response"], "not-found");
    assert_eq!(r[3]["error-code"], libc::ENOENT);
    let state = std::fs::read_to_string(dir.path().join("devices/system/memory/memory1/state"));
    assert_eq!(state.expect("state"), "online");
    let (reply, _) = call_raw(
        &agent,
        r#"{"execute":"guest-set-memory-blocks","arguments":{"mem-blks":[{"online":true}]}}"#,
    )
    .expect("reply");
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    // No sysfs memory directory: qemu-ga's error, not CommandNotFound.
    let empty = GuestAgent::new(Settings {
        sysfs: dir.path().join("none"),
        ..Settings::default()
    });
    let e = call(&empty, &Command::GetMemoryBlocks).unwrap_err();
    assert_eq!(e.class, "GenericError");
    assert!(e.desc.starts_with("Can't open directory"), "{e}");
}

#[test]
fn vcpus_are_set_in_order_until_the_first_failure() {
    let (agent, dir) = sysfs_fixture();
    let cpu = |id, online| GuestLogicalProcessor {
        logical_id: id,
        online,
        can_offline: None,
    };
    assert_eq!(
        ok(&agent, &Command::GetVcpus),
        json!([
            {"logical-id": 0, "online": true, "can-offline": false},
            {"logical-id": 1, "online": true, "can-offline": true},
        ])
    );
    let done = ok(
        &agent,
        &Command::SetVcpus {
            vcpus: vec![cpu(1, false), cpu(0, false), cpu(1, true)],
        },
    );
    assert_eq!(done, json!(1), "stops at cpu0, which cannot go offline");
    let online = std::fs::read_to_string(dir.path().join("devices/system/cpu/cpu1/online"));
    assert_eq!(online.expect("online"), "0");
    let e = call(
        &agent,
        &Command::SetVcpus {
            vcpus: vec![cpu(0, false)],
        },
    )
    .unwrap_err();
    assert_eq!(e.desc, "logical processor #0 can't be offlined");
    assert!(call(&agent, &Command::SetVcpus { vcpus: vec![] }).is_err());
}

#[test]
fn set_user_password_refuses_what_chpasswd_cannot_take() {
    let f = fixture();
    for (user, password, want) in [
        ("root", "!!", "Base64 data is not valid"),
        (
            "root",
            &base64_encode(b"a\nb")[..],
            "forbidden characters in raw password",
        ),
        (
            "a:b",
            &base64_encode(b"pw")[..],
            "forbidden characters in user name",
        ),
    ] {
        let e = call(
            &f.agent,
            &Command::SetUserPassword {
                username: user.into(),
                password: password.into(),
                crypted: false,
            },
        )
        .unwrap_err();
        assert_eq!(e.desc, want);
    }
}

#[test]
fn disks_and_their_partitions_come_from_sys_block() {
    let (agent, dir) = sysfs_fixture();
    let block = dir.path().join("block");
    std::fs::create_dir_all(block.join("vda/vda1")).expect("vda1");
    std::fs::write(block.join("vda/vda1/partition"), "1\n").expect("partition");
    std::fs::create_dir_all(block.join("dm-0/slaves/vda1")).expect("slaves");
    std::fs::create_dir_all(block.join("dm-0/dm")).expect("dm");
    std::fs::write(block.join("dm-0/dm/name"), "vg-root\n").expect("dm name");
    assert_eq!(
        ok(&agent, &Command::GetDisks),
        json!([
            {"name": "/dev/dm-0", "partition": false, "dependencies": ["/dev/vda1"], "alias": "vg-root"},
            {"name": "/dev/vda", "partition": false, "dependencies": []},
            {"name": "/dev/vda1", "partition": true, "dependencies": ["/dev/vda"]},
        ])
    );
    // No disk file system here to trim: an empty list, as qemu-ga answers.
    let f = fixture();
    let mountinfo = f.dir.path().join("mountinfo");
    std::fs::write(&mountinfo, "22 1 0:21 / /proc rw - proc proc rw\n").expect("mountinfo");
    let agent = GuestAgent::new(Settings {
        mountinfo,
        ..Settings::default()
    });
    assert_eq!(
        ok(&agent, &Command::Fstrim { minimum: None }),
        json!({"paths": []})
    );
}

#[test]
fn the_fsfreeze_hook_runs_around_freeze_and_thaw() {
    let f = fixture();
    let log = f.dir.path().join("hook.log");
    let hook = f.dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", log.display()),
    )
    .expect("hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mountinfo = f.dir.path().join("mountinfo");
    std::fs::write(&mountinfo, "22 1 0:21 / /proc rw - proc proc rw\n").expect("mountinfo");
    let agent = GuestAgent::new(Settings {
        mountinfo: mountinfo.clone(),
        fsfreeze_hook: Some(hook),
        ..Settings::default()
    });
    assert_eq!(ok(&agent, &Command::FsfreezeFreeze), json!(0));
    assert_eq!(ok(&agent, &Command::FsfreezeThaw), json!(0));
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "freeze\nthaw\n"
    );
    let failing = GuestAgent::new(Settings {
        mountinfo,
        fsfreeze_hook: Some("/bin/false".into()),
        ..Settings::default()
    });
    let e = call(&failing, &Command::FsfreezeFreeze).unwrap_err();
    assert_eq!(e.desc, "fsfreeze hook has failed with status 1");
}
