//! The tty codec (unit and property tests), and both halves talking over an in-memory stream:
//! exit statuses, pipes and ptys, resizes, hang-up, and hostile peers on each side.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::host::{escape_controls, run_session, Local, Report, SessionError, MAX_GUEST_ERRORS};
use super::*;

fn start(command: &[&str], pty: bool) -> Start {
    Start {
        command: command.iter().map(OsString::from).collect(),
        term: OsString::new(),
        pty,
        size: WindowSize { rows: 24, cols: 80 },
    }
}

fn encode_all<M: Message>(msgs: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out).expect("encodable");
    }
    out
}

fn decode_all<M: Message>(bytes: &[u8], chunk: usize) -> Result<Vec<M>, RecordError> {
    let mut dec = Decoder::<M>::new();
    let mut msgs = Vec::new();
    for part in bytes.chunks(chunk.max(1)) {
        dec.push(part)?;
        while let Some(m) = dec.next_message()? {
            msgs.push(m);
        }
    }
    dec.finish()?;
    Ok(msgs)
}

// ---- codec ----

#[test]
fn every_message_round_trips() {
    let host = vec![
        HostMsg::Start(Start {
            command: vec![
                "sh".into(),
                "-c".into(),
                OsString::from_vec(vec![0xff, b'x']),
            ],
            term: "xterm-256color".into(),
            pty: true,
            size: WindowSize {
                rows: 50,
                cols: 132,
            },
        }),
        HostMsg::Start(start(&[], false)),
        HostMsg::Stdin(Bytes::from_static(b"\x00\x01binary\xff")),
        HostMsg::Stdin(Bytes::new()),
        HostMsg::Resize(WindowSize {
            rows: u16::MAX,
            cols: 0,
        }),
        HostMsg::StdinEof,
    ];
    assert_eq!(decode_all::<HostMsg>(&encode_all(&host), 3), Ok(host));
    let guest = vec![
        GuestMsg::Stdout(Bytes::from(vec![7u8; MAX_DATA])),
        GuestMsg::Stderr(Bytes::from_static(b"oops\n")),
        GuestMsg::Error("cannot run \"x\"".into()),
        GuestMsg::Exit(Exit::Code(255)),
        GuestMsg::Exit(Exit::Signal(MAX_SIGNAL)),
    ];
    assert_eq!(decode_all::<GuestMsg>(&encode_all(&guest), 1000), Ok(guest));
}

#[test]
fn the_wire_format_is_as_documented() {
    // docs/devices/tty.md, "Examples".
    let mut out = Vec::new();
    HostMsg::Start(Start {
        command: vec!["ls".into(), "-l".into()],
        term: "vt100".into(),
        pty: true,
        size: WindowSize { rows: 24, cols: 80 },
    })
    .encode(&mut out)
    .expect("encode");
    let expected: &[u8] = &[
        0x01, 26, 0, 0, 0, // Start, 26 bytes
        0x01, 24, 0, 80, 0, // pty, 24 rows, 80 columns
        5, 0, b'v', b't', b'1', b'0', b'0', // TERM
        2, 0, // two arguments
        2, 0, 0, 0, b'l', b's', 2, 0, 0, 0, b'-', b'l',
    ];
    assert_eq!(out, expected);
    out.clear();
    GuestMsg::Exit(Exit::Signal(9))
        .encode(&mut out)
        .expect("encode");
    assert_eq!(out, [0x83, 2, 0, 0, 0, 1, 9]);
    out.clear();
    HostMsg::Resize(WindowSize {
        rows: 40,
        cols: 120,
    })
    .encode(&mut out)
    .expect("encode");
    assert_eq!(out, [0x04, 4, 0, 0, 0, 40, 0, 120, 0]);
}

#[test]
fn an_oversized_length_fails_at_the_header_before_any_payload() {
    let mut dec = Decoder::<GuestMsg>::new();
    let len = (MAX_DATA as u32 + 1).to_le_bytes();
    dec.push(&[0x81, len[0], len[1], len[2], len[3]])
        .expect("push");
    assert_eq!(
        dec.next_message(),
        Err(RecordError::TooLong {
            kind: "Stdout",
            len: MAX_DATA + 1,
            max: MAX_DATA
        })
    );
    // u32::MAX is refused the same way, with nothing buffered past the header.
    let mut dec = Decoder::<HostMsg>::new();
    dec.push(&[0x01, 0xff, 0xff, 0xff, 0xff]).expect("push");
    assert!(matches!(
        dec.next_message(),
        Err(RecordError::TooLong { .. })
    ));
    assert_eq!(dec.buffered(), HEADER_LEN);
}

#[test]
fn malformed_messages_are_distinct_errors() {
    let guest = |bytes: &[u8]| decode_all::<GuestMsg>(bytes, 64);
    let host = |bytes: &[u8]| decode_all::<HostMsg>(bytes, 64);
    // Types of the other direction, and unknown ones.
    assert_eq!(
        guest(&[0x02, 0, 0, 0, 0]),
        Err(RecordError::UnknownType(0x02))
    );
    assert_eq!(
        host(&[0x81, 0, 0, 0, 0]),
        Err(RecordError::UnknownType(0x81))
    );
    assert_eq!(
        host(&[0x7f, 0, 0, 0, 0]),
        Err(RecordError::UnknownType(0x7f))
    );
    // Fixed sizes.
    assert!(matches!(
        host(&[0x04, 5, 0, 0, 0, 1, 2, 3, 4, 5]),
        Err(RecordError::TooLong { kind: "Resize", .. })
    ));
    assert!(matches!(
        host(&[0x04, 2, 0, 0, 0, 1, 2]),
        Err(RecordError::WrongLength { kind: "Resize", .. })
    ));
    assert!(matches!(
        host(&[0x03, 1, 0, 0, 0, 0]),
        Err(RecordError::TooLong {
            kind: "StdinEof",
            ..
        })
    ));
    assert!(matches!(
        guest(&[0x83, 1, 0, 0, 0, 0]),
        Err(RecordError::WrongLength { kind: "Exit", .. })
    ));
    // Exit values.
    for bad in [[1u8, 0], [1, MAX_SIGNAL + 1], [2, 0]] {
        let mut m = vec![0x83, 2, 0, 0, 0];
        m.extend_from_slice(&bad);
        assert!(
            matches!(guest(&m), Err(RecordError::Malformed { kind: "Exit", .. })),
            "{bad:?}"
        );
    }
    // Error text must be UTF-8.
    assert!(matches!(
        guest(&[0x84, 2, 0, 0, 0, 0xc3, 0x28]),
        Err(RecordError::Malformed { kind: "Error", .. })
    ));
    // Start: flags, truncation, NUL, trailing bytes, TERM limit.
    let mut good = Vec::new();
    HostMsg::Start(start(&["ls"], false))
        .encode(&mut good)
        .expect("encode");
    let payload = good[HEADER_LEN..].to_vec();
    let frame = |p: &[u8]| {
        let mut f = vec![0x01];
        f.extend_from_slice(&(p.len() as u32).to_le_bytes());
        f.extend_from_slice(p);
        f
    };
    let mut flags = payload.clone();
    flags[0] = 0x02;
    assert!(matches!(
        host(&frame(&flags)),
        Err(RecordError::Malformed {
            what: "unknown flags",
            ..
        })
    ));
    for cut in 0..payload.len() {
        assert!(
            matches!(
                host(&frame(&payload[..cut])),
                Err(RecordError::Malformed { kind: "Start", .. })
            ),
            "cut at {cut}"
        );
    }
    let mut nul = payload.clone();
    *nul.last_mut().expect("byte") = 0;
    assert!(matches!(
        host(&frame(&nul)),
        Err(RecordError::Malformed {
            what: "a string contains NUL",
            ..
        })
    ));
    let mut trailing = payload.clone();
    trailing.push(0);
    assert!(matches!(
        host(&frame(&trailing)),
        Err(RecordError::Malformed {
            what: "bytes after the last argument",
            ..
        })
    ));
    let mut long_term = vec![0, 24, 0, 80, 0];
    long_term.extend_from_slice(&((MAX_TERM + 1) as u16).to_le_bytes());
    long_term.extend(std::iter::repeat_n(b'x', MAX_TERM + 1));
    long_term.extend_from_slice(&[0, 0]);
    assert!(matches!(
        host(&frame(&long_term)),
        Err(RecordError::TooLong {
            kind: "TERM in Start",
            ..
        })
    ));
    // A huge argument count with no arguments behind it: an error, not a huge allocation.
    let count = [0, 24, 0, 80, 0, 0, 0, 0xff, 0xff];
    assert!(matches!(
        host(&frame(&count)),
        Err(RecordError::Malformed { kind: "Start", .. })
    ));
}

#[test]
fn a_stream_cut_inside_a_message_is_truncated_not_clean() {
    let bytes = encode_all(&[GuestMsg::Stdout(Bytes::from_static(b"hello"))]);
    for cut in 1..bytes.len() {
        assert_eq!(
            decode_all::<GuestMsg>(&bytes[..cut], 2),
            Err(RecordError::Truncated(cut))
        );
    }
    assert_eq!(decode_all::<GuestMsg>(&[], 1), Ok(vec![]));
}

#[test]
fn the_decoder_refuses_to_buffer_past_its_bound() {
    let mut dec = Decoder::<GuestMsg>::new();
    let limit = Decoder::<GuestMsg>::LIMIT;
    assert_eq!(limit, HEADER_LEN + MAX_DATA + READ_CHUNK);
    let big = vec![0u8; limit];
    dec.push(&big[..limit - 1]).expect("under the bound");
    assert_eq!(
        dec.push(&big[..2]),
        Err(RecordError::Overflow {
            buffered: limit - 1,
            pushed: 2,
            limit
        })
    );
}

#[test]
fn encoding_checks_the_limits() {
    let mut out = Vec::new();
    let too_big = Bytes::from(vec![0u8; MAX_DATA + 1]);
    assert!(matches!(
        GuestMsg::Stdout(too_big.clone()).encode(&mut out),
        Err(RecordError::TooLong { kind: "Stdout", .. })
    ));
    assert!(matches!(
        HostMsg::Stdin(too_big).encode(&mut out),
        Err(RecordError::TooLong { kind: "Stdin", .. })
    ));
    assert!(GuestMsg::Exit(Exit::Signal(0)).encode(&mut out).is_err());
    let huge_arg = OsString::from("x".repeat(MAX_START));
    let s = Start {
        command: vec![huge_arg],
        ..start(&[], false)
    };
    assert!(matches!(
        HostMsg::Start(s).encode(&mut out),
        Err(RecordError::TooLong { kind: "Start", .. })
    ));
    let s = Start {
        command: vec![OsString::from("a\0b")],
        ..start(&[], false)
    };
    assert!(HostMsg::Start(s).encode(&mut out).is_err());
    assert!(out.is_empty(), "failed encodings append nothing");
    // Error texts are cut at a character boundary.
    let long = "é".repeat(MAX_ERROR);
    match GuestMsg::error(&long) {
        GuestMsg::Error(t) => {
            assert!(t.len() <= MAX_ERROR && t.len() >= MAX_ERROR - 1);
            assert!(t.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn guest_error_texts_cannot_drive_the_terminal() {
    assert_eq!(
        escape_controls("bad\x1b[2Jthing\r\u{202e}x"),
        "bad\\u{1b}[2Jthing\\u{d}\\u{202e}x"
    );
    assert_eq!(escape_controls("plain: é"), "plain: é");
}

#[test]
fn shell_statuses() {
    assert_eq!(Exit::Code(7).shell_status(), 7);
    assert_eq!(Exit::Signal(9).shell_status(), 137);
}

fn os_string() -> impl Strategy<Value = OsString> {
    proptest::collection::vec(1u8..=255, 0..20).prop_map(OsString::from_vec)
}

fn size() -> impl Strategy<Value = WindowSize> {
    (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| WindowSize { rows, cols })
}

fn host_msg() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        (
            proptest::collection::vec(os_string(), 0..6),
            os_string(),
            any::<bool>(),
            size()
        )
            .prop_map(|(command, term, pty, size)| HostMsg::Start(Start {
                command,
                term,
                pty,
                size
            })),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| HostMsg::Stdin(b.into())),
        Just(HostMsg::StdinEof),
        size().prop_map(HostMsg::Resize),
    ]
}

fn guest_msg() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| GuestMsg::Stdout(b.into())),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| GuestMsg::Stderr(b.into())),
        any::<u8>().prop_map(|c| GuestMsg::Exit(Exit::Code(c))),
        (1..=MAX_SIGNAL).prop_map(|s| GuestMsg::Exit(Exit::Signal(s))),
        ".{0,40}".prop_map(GuestMsg::Error),
    ]
}

/// A stream that hands out its bytes in reads of the given sizes, in turn (a channel's reads
/// end wherever its frames ended).
struct Chunked {
    bytes: Bytes,
    sizes: Vec<usize>,
    turn: usize,
}

impl tokio::io::AsyncRead for Chunked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let size = self.sizes[self.turn % self.sizes.len()];
        self.turn += 1;
        let n = size.min(buf.remaining()).min(self.bytes.len());
        let part = self.bytes.split_to(n);
        buf.put_slice(&part);
        std::task::Poll::Ready(Ok(()))
    }
}

/// Output of every size up to the largest record, and the other messages.
fn bulk_guest_msg() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        guest_msg(),
        (0..=MAX_DATA, any::<u8>()).prop_map(|(n, b)| GuestMsg::Stdout(vec![b; n].into())),
    ]
}

proptest! {
    #[test]
    fn host_messages_round_trip_at_any_split(
        msgs in proptest::collection::vec(host_msg(), 0..12),
        chunk in 1usize..40,
    ) {
        prop_assert_eq!(decode_all::<HostMsg>(&encode_all(&msgs), chunk), Ok(msgs));
    }

    #[test]
    fn guest_messages_round_trip_at_any_split(
        msgs in proptest::collection::vec(guest_msg(), 0..12),
        chunk in 1usize..40,
    ) {
        prop_assert_eq!(decode_all::<GuestMsg>(&encode_all(&msgs), chunk), Ok(msgs));
    }

    /// `read_message` reads into the decoder itself, as much as the record being received
    /// lacks: whatever sizes the reads come in, every record arrives whole and in order, and
    /// the decoder never holds more than its limit.
    #[test]
    fn read_message_delivers_records_of_any_size_across_any_reads(
        msgs in proptest::collection::vec(bulk_guest_msg(), 0..6),
        sizes in proptest::collection::vec(1usize..200_000, 1..5),
    ) {
        let mut r = Chunked { bytes: encode_all(&msgs).into(), sizes, turn: 0 };
        let mut dec = Decoder::<GuestMsg>::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut got = Vec::new();
        while let Some(m) = rt.block_on(read_message(&mut r, &mut dec)).expect("valid stream") {
            prop_assert!(dec.buffered() <= Decoder::<GuestMsg>::LIMIT);
            got.push(m);
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn garbage_gives_messages_or_errors_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        chunk in 1usize..64,
    ) {
        let mut g = Decoder::<GuestMsg>::new();
        let mut h = Decoder::<HostMsg>::new();
        for part in bytes.chunks(chunk) {
            // After an error the decoder keeps returning it; stop at the first.
            if g.push(part).is_ok() {
                while let Ok(Some(m)) = g.next_message() {
                    let mut re = Vec::new();
                    prop_assert!(m.encode(&mut re).is_ok(), "decoded messages re-encode");
                }
            }
            if h.push(part).is_ok() {
                while let Ok(Some(m)) = h.next_message() {
                    let mut re = Vec::new();
                    prop_assert!(m.encode(&mut re).is_ok(), "decoded messages re-encode");
                }
            }
            prop_assert!(g.buffered() <= Decoder::<GuestMsg>::LIMIT);
            prop_assert!(h.buffered() <= Decoder::<HostMsg>::LIMIT);
        }
    }

    #[test]
    fn a_corrupted_stream_never_yields_a_message_it_did_not_contain(
        msgs in proptest::collection::vec(guest_msg(), 1..6),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut bytes = encode_all(&msgs);
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        // Either an error, or messages that re-encode to exactly the corrupted bytes.
        if let Ok(decoded) = decode_all::<GuestMsg>(&bytes, 7) {
            prop_assert_eq!(encode_all(&decoded), bytes);
        }
    }
}

// ---- both halves over an in-memory stream ----

struct Outcome {
    report: Report,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `start` through a guest half and a host half joined by an in-memory stream.
async fn session(start: Start, stdin: &[u8], resizes: &[WindowSize]) -> Outcome {
    let (host_end, guest_end) = tokio::io::duplex(256 * 1024);
    let guest = tokio::spawn(guest::serve(guest_end));
    let (r, w) = tokio::io::split(host_end);
    let (tx, rx) = mpsc::unbounded_channel();
    for s in resizes {
        tx.send(*s).expect("queue");
    }
    drop(tx);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let local = Local {
        stdin,
        stdout: &mut stdout,
        stderr: &mut stderr,
    };
    let report = tokio::time::timeout(Duration::from_secs(30), run_session(r, w, start, local, rx))
        .await
        .expect("session within 30 s");
    tokio::time::timeout(Duration::from_secs(10), guest)
        .await
        .expect("guest half ends")
        .expect("guest half");
    Outcome {
        report,
        stdout,
        stderr,
    }
}

fn exit(o: &Outcome) -> Exit {
    match &o.report.result {
        Ok(e) => *e,
        Err(e) => panic!(
            "no exit status: {e}; errors {:?}; stdout {:?}",
            o.report.guest_errors,
            String::from_utf8_lossy(&o.stdout)
        ),
    }
}

#[tokio::test]
async fn exit_codes_and_signals_come_back() {
    let o = session(start(&["sh", "-c", "exit 7"], false), b"", &[]).await;
    assert_eq!(exit(&o), Exit::Code(7));
    let o = session(start(&["sh", "-c", "kill -9 $$"], false), b"", &[]).await;
    assert_eq!(exit(&o), Exit::Signal(9));
    let o = session(start(&["sh", "-c", "kill -TERM $$"], true), b"", &[]).await;
    assert_eq!(exit(&o), Exit::Signal(15));
}

#[tokio::test]
async fn pipes_keep_stdout_stderr_and_binary_stdin_apart() {
    let o = session(
        start(&["sh", "-c", "echo out; echo err >&2; exit 3"], false),
        b"",
        &[],
    )
    .await;
    assert_eq!(exit(&o), Exit::Code(3));
    assert_eq!(o.stdout, b"out\n");
    assert_eq!(o.stderr, b"err\n");
    // Every byte value, 1 MiB, through cat: unchanged; cat ends because StdinEof closed its
    // stdin.
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let o = session(start(&["cat"], false), &data, &[]).await;
    assert_eq!(exit(&o), Exit::Code(0));
    assert!(o.stdout == data, "{} bytes back", o.stdout.len());
    assert!(o.stderr.is_empty());
}

#[tokio::test]
async fn a_command_that_cannot_run_reports_127_with_the_reason() {
    let o = session(start(&["/nonexistent/command"], false), b"", &[]).await;
    assert_eq!(exit(&o), Exit::Code(127));
    assert_eq!(o.report.guest_errors.len(), 1);
    assert!(
        o.report.guest_errors[0].contains("cannot run \"/nonexistent/command\""),
        "{:?}",
        o.report.guest_errors
    );
    let o = session(start(&["/"], false), b"", &[]).await;
    assert_eq!(exit(&o), Exit::Code(126));
}

#[tokio::test]
async fn a_pty_is_the_controlling_terminal_with_the_size_and_term_given() {
    let s = Start {
        term: "vt100".into(),
        size: WindowSize {
            rows: 33,
            cols: 101,
        },
        ..start(
            &[
                "sh",
                "-c",
                "tty; stty size; echo TERM=$TERM; test -t 0 && echo tty0",
            ],
            true,
        )
    };
    let o = session(s, b"", &[]).await;
    assert_eq!(exit(&o), Exit::Code(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("33 101\r\n"), "{text}");
    assert!(text.contains("TERM=vt100\r\n"), "{text}");
    assert!(text.contains("tty0"), "{text}");
    // Without a TERM, the command gets none (not the agent's).
    let o = session(
        start(&["sh", "-c", "echo TERM=${TERM-unset}"], false),
        b"",
        &[],
    )
    .await;
    assert_eq!(o.stdout, b"TERM=unset\n");
}

#[tokio::test]
async fn a_resize_reaches_the_pty_before_later_input() {
    let o = session(
        start(&["sh"], true),
        b"stty size; exit 4\n",
        &[WindowSize {
            rows: 50,
            cols: 132,
        }],
    )
    .await;
    assert_eq!(exit(&o), Exit::Code(4));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("50 132\r\n"), "{text}");
}

#[tokio::test]
async fn a_background_process_holding_the_output_does_not_hold_the_session() {
    let t = Instant::now();
    let o = session(
        start(&["sh", "-c", "sleep 60 & echo started"], false),
        b"",
        &[],
    )
    .await;
    assert_eq!(exit(&o), Exit::Code(0));
    assert_eq!(o.stdout, b"started\n");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // One that never stops writing: at most DRAIN_MAX more bytes, then the end.
    let t = Instant::now();
    let o = session(start(&["sh", "-c", "yes & exit 5"], false), b"", &[]).await;
    assert_eq!(exit(&o), Exit::Code(5));
    assert!(o.stdout.len() <= 2 * guest::DRAIN_MAX, "{}", o.stdout.len());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

async fn read_guest_msg(r: &mut DuplexStream, dec: &mut Decoder<GuestMsg>) -> Option<GuestMsg> {
    read_message(r, dec).await.expect("valid stream")
}

#[tokio::test]
async fn closing_the_channel_kills_the_process_group() {
    for pty in [false, true] {
        let (mut host_end, guest_end) = tokio::io::duplex(64 * 1024);
        let guest = tokio::spawn(guest::serve(guest_end));
        let mut frame = Vec::new();
        // The shell and a child of it, in the shell's process group, both printed.
        HostMsg::Start(start(
            &["sh", "-c", "sleep 1000 & echo pids $$ $! end; wait"],
            pty,
        ))
        .encode(&mut frame)
        .expect("encode");
        host_end.write_all(&frame).await.expect("write");
        let mut dec = Decoder::<GuestMsg>::new();
        let mut text = String::new();
        while !text.contains(" end") {
            match read_guest_msg(&mut host_end, &mut dec).await {
                Some(GuestMsg::Stdout(b)) => text.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("unexpected {other:?} after {text:?}"),
            }
        }
        let pids: Vec<i32> = text
            .split_whitespace()
            .skip_while(|w| *w != "pids")
            .skip(1)
            .take(2)
            .map(|p| p.parse().expect("pid"))
            .collect();
        assert_eq!(pids.len(), 2, "{text}");
        assert!(pids.iter().all(|p| alive(*p)));
        drop(host_end);
        tokio::time::timeout(Duration::from_secs(10), guest)
            .await
            .expect("the guest half ends")
            .expect("guest half");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|p| alive(*p)) {
            assert!(Instant::now() < deadline, "pty={pty}: {pids:?} still run");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn a_host_that_breaks_the_protocol_gets_an_error_and_the_end() {
    let cases: [(&[u8], &str); 3] = [
        (&[0x02, 1, 0, 0, 0, b'x'], "the first message must be Start"),
        (&[0x7e, 0, 0, 0, 0], "unknown record type 0x7e"),
        (&[0x01, 0xff, 0xff, 0xff, 0x7f], "exceeds its limit"),
    ];
    for (bytes, expected) in cases {
        let (mut host_end, guest_end) = tokio::io::duplex(64 * 1024);
        let guest = tokio::spawn(guest::serve(guest_end));
        host_end.write_all(bytes).await.expect("write");
        let mut dec = Decoder::<GuestMsg>::new();
        match read_guest_msg(&mut host_end, &mut dec).await {
            Some(GuestMsg::Error(t)) => assert!(t.contains(expected), "{t}"),
            other => panic!("expected an Error, got {other:?}"),
        }
        assert_eq!(read_guest_msg(&mut host_end, &mut dec).await, None);
        guest.await.expect("guest half");
    }
    // After Start, a second Start ends the session (and the command).
    let (mut host_end, guest_end) = tokio::io::duplex(64 * 1024);
    let guest = tokio::spawn(guest::serve(guest_end));
    let s = HostMsg::Start(start(&["sleep", "1000"], false));
    host_end
        .write_all(&encode_all(&[s.clone(), s]))
        .await
        .expect("write");
    let mut dec = Decoder::<GuestMsg>::new();
    match read_guest_msg(&mut host_end, &mut dec).await {
        Some(GuestMsg::Error(t)) => assert_eq!(t, "a second Start"),
        other => panic!("expected an Error, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(10), guest)
        .await
        .expect("the guest half ends")
        .expect("guest half");
}

/// The host half against a scripted (hostile) guest that writes `bytes` then closes.
async fn against_guest(bytes: Vec<u8>) -> Report {
    let (host_end, mut guest_end) = tokio::io::duplex(1024 * 1024);
    let fake = tokio::spawn(async move {
        let mut start = [0u8; 64];
        let _ = guest_end.read(&mut start).await;
        let _ = guest_end.write_all(&bytes).await;
        let _ = guest_end.shutdown().await;
        // Keep reading so the host's writes never block, until it hangs up.
        let mut sink = vec![0u8; 4096];
        while matches!(guest_end.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let (r, w) = tokio::io::split(host_end);
    let (_tx, rx) = mpsc::unbounded_channel();
    let local = Local {
        stdin: tokio::io::empty(),
        stdout: tokio::io::sink(),
        stderr: tokio::io::sink(),
    };
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        run_session(r, w, start(&["x"], false), local, rx),
    )
    .await
    .expect("the host half ends");
    fake.abort();
    report
}

#[tokio::test]
async fn a_hostile_guest_gets_an_error_not_a_panic_or_a_buffer() {
    let r = against_guest(vec![0x81, 0xff, 0xff, 0xff, 0xff]).await;
    assert!(
        matches!(
            r.result,
            Err(SessionError::Protocol(RecordError::TooLong { .. }))
        ),
        "{r:?}"
    );
    let r = against_guest(vec![0x01, 0, 0, 0, 0]).await;
    assert!(
        matches!(
            r.result,
            Err(SessionError::Protocol(RecordError::UnknownType(1)))
        ),
        "{r:?}"
    );
    let r = against_guest(vec![0x83, 2, 0, 0, 0, 1, 200]).await;
    assert!(
        matches!(
            r.result,
            Err(SessionError::Protocol(RecordError::Malformed { .. }))
        ),
        "{r:?}"
    );
    let r = against_guest(encode_all(&[GuestMsg::Stdout(Bytes::from_static(b"hi"))])).await;
    assert!(matches!(r.result, Err(SessionError::NoExit)), "{r:?}");
    let mut cut = encode_all(&[GuestMsg::Stdout(Bytes::from_static(b"hi"))]);
    cut.pop();
    let r = against_guest(cut).await;
    assert!(
        matches!(
            r.result,
            Err(SessionError::Protocol(RecordError::Truncated(6)))
        ),
        "{r:?}"
    );
    // A flood of errors: the first MAX_GUEST_ERRORS are kept, then the exit status counts.
    let mut flood: Vec<GuestMsg> = (0..1000)
        .map(|i| GuestMsg::Error(format!("e{i}")))
        .collect();
    flood.push(GuestMsg::Exit(Exit::Code(9)));
    let r = against_guest(encode_all(&flood)).await;
    assert_eq!(r.result.expect("exit"), Exit::Code(9));
    assert_eq!(r.guest_errors.len(), MAX_GUEST_ERRORS);
    assert_eq!(r.guest_errors[0], "e0");
}

/// Reads `out` until it holds `want` (or fails after 30 s with what came).
async fn read_until(out: &mut DuplexStream, text: &mut Vec<u8>, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(text).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, out.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => text.extend_from_slice(&buf[..n]),
            _ => panic!(
                "{want:?} never came; the terminal shows {:?}",
                String::from_utf8_lossy(text)
            ),
        }
    }
}

#[tokio::test]
async fn the_registry_offers_this_device_s_login_shell_for_a_page_terminal() {
    let (class, run) = crate::registry::registry()
        .terminal()
        .expect("a device offers shells");
    assert_eq!(class, CLASS);
    let (host_end, guest_end) = tokio::io::duplex(256 * 1024);
    let guest = tokio::spawn(guest::serve(guest_end));
    let (r, w) = tokio::io::split(host_end);
    let (mut keys, keys_r) = tokio::io::duplex(1024);
    let (out_w, mut out) = tokio::io::duplex(256 * 1024);
    let (resize, resizes) = mpsc::unbounded_channel();
    let page = crate::registry::PageTerminal {
        size: WindowSize { rows: 30, cols: 90 },
        keys: Box::new(keys_r),
        stdout: Box::new(out_w),
        stderr: Box::new(tokio::io::sink()),
        resizes,
    };
    let session = tokio::spawn(run(Box::new(r), Box::new(w), page));
    let mut text = Vec::new();
    keys.write_all(b"stty size; echo T=$TERM\n")
        .await
        .expect("keys");
    read_until(&mut out, &mut text, "30 90\r\n").await;
    read_until(&mut out, &mut text, "T=xterm-256color\r\n").await;
    resize
        .send(WindowSize {
            rows: 41,
            cols: 117,
        })
        .expect("resize");
    keys.write_all(b"stty size; exit 5\n").await.expect("keys");
    read_until(&mut out, &mut text, "41 117\r\n").await;
    let ended = tokio::time::timeout(Duration::from_secs(30), session)
        .await
        .expect("the shell ends within 30 s")
        .expect("session task");
    assert_eq!(ended, "the shell exited with status 5");
    tokio::time::timeout(Duration::from_secs(10), guest)
        .await
        .expect("guest half ends")
        .expect("guest half");
}

proptest! {
    /// A batch of stdin payloads goes out whole and in order however the writer takes it: in
    /// pieces of any size, through `chunk` or `chunks_vectored` (empty payloads included).
    #[test]
    fn a_stdin_batch_writes_its_payloads_in_order(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        steps in proptest::collection::vec((1usize..500, any::<bool>()), 1..64),
    ) {
        use bytes::Buf;
        let expected: Vec<u8> = payloads.concat();
        let mut batch = guest::Batch::default();
        for p in payloads {
            batch.push(Bytes::from(p));
        }
        prop_assert_eq!(batch.remaining(), expected.len());
        let mut out = Vec::new();
        let mut steps = steps.into_iter().cycle();
        while batch.has_remaining() {
            let (most, vectored) = steps.next().unwrap_or((1, false));
            let taken: Vec<u8> = if vectored {
                let mut slices = [std::io::IoSlice::new(&[]); 4];
                let n = batch.chunks_vectored(&mut slices);
                prop_assert!(n > 0);
                slices[..n].iter().flat_map(|s| s.iter().copied()).take(most).collect()
            } else {
                batch.chunk().iter().copied().take(most).collect()
            };
            prop_assert!(!taken.is_empty());
            batch.advance(taken.len());
            out.extend_from_slice(&taken);
            prop_assert_eq!(batch.remaining(), expected.len() - out.len());
        }
        prop_assert_eq!(out, expected);
    }
}

#[tokio::test]
async fn output_read_in_one_go_goes_out_as_records_of_max_data_in_order() {
    // Three and a half records' worth, as one read of a full pipe returns it.
    let data: Vec<u8> = (0..(3 * MAX_DATA + MAX_DATA / 2) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut wire = Vec::new();
    guest::write_output(&mut wire, &data, true)
        .await
        .expect("write");
    let mut r = &wire[..];
    let mut dec = Decoder::<GuestMsg>::new();
    let mut back = Vec::new();
    while let Some(m) = read_message(&mut r, &mut dec).await.expect("valid stream") {
        let GuestMsg::Stderr(piece) = m else {
            panic!("not stderr: {m:?}");
        };
        assert!(piece.len() <= MAX_DATA && !piece.is_empty());
        back.extend_from_slice(&piece);
    }
    assert!(back == data, "{} of {} bytes back", back.len(), data.len());
    assert_eq!(wire.len(), data.len() + 4 * HEADER_LEN, "four records");
}
