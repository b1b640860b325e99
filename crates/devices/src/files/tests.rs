use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::prelude::*;

use super::transfer::{self, Error};
use super::tree::{self, partial_path, Failure, Sink};
use super::*;

fn entry(kind: Kind, name: &str) -> Entry {
    Entry {
        kind,
        name: name.as_bytes().to_vec(),
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: Time {
            secs: 1_700_000_000,
            nanos: 5,
        },
        atime: Time::default(),
        size: 0,
        target: if kind == Kind::Symlink {
            b"/etc".to_vec()
        } else {
            Vec::new()
        },
    }
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Record>, RecordError> {
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(1000) {
        dec.push(chunk)?;
        while let Some(r) = dec.next_message()? {
            out.push(r);
        }
    }
    dec.finish()?;
    Ok(out)
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![Just(&b"a"[..]), Just(&b"b"[..]), Just(&b"c d"[..])],
        0..4,
    )
    .prop_map(|cs| cs.join(&b'/'))
}

fn arb_record() -> impl Strategy<Value = Record> {
    let time = (any::<i64>(), 0u32..1_000_000_000).prop_map(|(secs, nanos)| Time { secs, nanos });
    let entry = (
        prop_oneof![Just(Kind::File), Just(Kind::Dir), Just(Kind::Symlink)],
        arb_name(),
        0u32..=0o7777,
        any::<u32>(),
        any::<u32>(),
        time.clone(),
        time,
        any::<u64>(),
    )
        .prop_map(|(kind, name, mode, uid, gid, mtime, atime, size)| {
            Record::Entry(Entry {
                kind,
                name,
                mode,
                uid,
                gid,
                mtime,
                atime,
                size,
                target: if kind == Kind::Symlink {
                    b"../x".to_vec()
                } else {
                    Vec::new()
                },
            })
        });
    prop_oneof![
        (
            any::<bool>(),
            0u8..8,
            any::<u64>(),
            "[a-z/]{1,40}",
            "[a-z]{0,8}"
        )
            .prop_map(|(get, flags, offset, path, name)| Record::Request(Request {
                op: if get { Op::Get } else { Op::Put },
                flags,
                offset,
                path: path.into_bytes(),
                name: name.into_bytes(),
            })),
        any::<u64>().prop_map(Record::Ready),
        entry,
        (any::<u64>(), prop::collection::vec(any::<u8>(), 1..3000)).prop_map(|(offset, b)| {
            Record::Data {
                offset,
                bytes: Bytes::from(b),
            }
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(size, crc)| Record::FileEnd { size, crc }),
        any::<u64>().prop_map(Record::Done),
        (
            prop_oneof![
                Just(ErrorCode::Other),
                Just(ErrorCode::NotFound),
                Just(ErrorCode::Permission),
                Just(ErrorCode::Corrupt)
            ],
            ".{0,50}"
        )
            .prop_map(|(c, m)| Record::Error(c, m)),
        Just(Record::Ok),
    ]
}

proptest! {
    /// Every record survives encoding and decoding, whatever the read boundaries.
    #[test]
    fn records_round_trip(records in prop::collection::vec(arb_record(), 0..20)) {
        let mut wire = Vec::new();
        for r in &records {
            r.encode(&mut wire).expect("encode");
        }
        prop_assert_eq!(decode_all(&wire).expect("decode"), records);
    }

    /// Arbitrary bytes give records or an error, never a panic, and the decoder stays bounded.
    #[test]
    fn decoder_survives_garbage(bytes in prop::collection::vec(any::<u8>(), 0..4000)) {
        let mut dec = Decoder::new();
        for chunk in bytes.chunks(97) {
            if dec.push(chunk).is_err() {
                break;
            }
            prop_assert!(dec.buffered() <= Decoder::LIMIT);
            loop {
                match dec.next_message() {
                    Ok(Some(Record::Entry(e))) => prop_assert!(check_name(&e.name).is_ok()),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// Whatever records a sender makes up, nothing appears outside the destination root.
    #[test]
    fn sink_stays_under_its_root(records in prop::collection::vec(arb_record(), 0..30)) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("x")).expect("x");
        let root = dir.path().join("x").join("root");
        let mut sink = Sink::tree(root, true, false);
        for r in records {
            if sink.apply(r).is_err() {
                sink.abandon(false);
                break;
            }
        }
        let outside: Vec<_> = std::fs::read_dir(dir.path()).expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        prop_assert_eq!(outside, vec![std::ffi::OsString::from("x")]);
    }
}

#[test]
fn names_outside_the_root_are_refused() {
    for bad in [
        &b"/etc/passwd"[..],
        b"../x",
        b"a/../../x",
        b"a//b",
        b"a/",
        b"./a",
        b"a\0b",
    ] {
        assert!(
            check_name(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        let mut e = entry(Kind::File, "a");
        e.name = bad.to_vec();
        let wire = Record::Entry(e).to_bytes().expect("encode");
        assert!(decode_all(&wire).is_err(), "decoded {bad:?}");
    }
    assert!(check_name(b"a/b c/.d").is_ok());
    assert!(check_name(b"").is_ok());
}

/// Applies `records`; the first error.
fn feed(sink: &mut Sink, records: Vec<Record>) -> Result<(), Failure> {
    for r in records {
        sink.apply(r)?;
    }
    Ok(())
}

fn data(offset: u64, b: &[u8]) -> Record {
    Record::Data {
        offset,
        bytes: Bytes::copy_from_slice(b),
    }
}

#[test]
fn a_symlink_of_the_stream_is_never_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    let mut link = entry(Kind::Symlink, "a");
    link.target = outside.as_os_str().as_encoded_bytes().to_vec();
    let mut sink = Sink::tree(dir.path().join("root"), false, false);
    let err = feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::Dir, "")),
            Record::Entry(link),
            Record::Entry(entry(Kind::File, "a/evil")),
        ],
    )
    .expect_err("a file under a symlink");
    assert_eq!(err.code, ErrorCode::Corrupt);
    assert!(err.message.contains("not under a directory"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0);
    // A name sent twice (a directory replaced by a symlink) is refused too.
    let mut sink = Sink::tree(dir.path().join("root2"), false, false);
    let err = feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::Dir, "")),
            Record::Entry(entry(Kind::Dir, "d")),
            Record::Entry(entry(Kind::Symlink, "d")),
        ],
    )
    .expect_err("twice");
    assert!(err.message.contains("sent twice"), "{err}");
    assert!(dir.path().join("root2/d").is_dir());
}

#[test]
fn a_bad_checksum_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("f");
    let mut sink = Sink::tree(root.clone(), false, false);
    let err = feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::File, "")),
            data(0, b"hello"),
            Record::FileEnd {
                size: 5,
                crc: crc32c::crc32c(b"hellO"),
            },
        ],
    )
    .expect_err("checksum");
    assert_eq!(err.code, ErrorCode::Corrupt);
    assert!(err.message.contains("checksum mismatch"), "{err}");
    sink.abandon(false);
    assert!(!root.exists());
    assert!(!partial_path(&root).exists());
}

#[test]
fn records_out_of_order_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(Vec<Record>, &str)> = vec![
        (vec![data(0, b"x")], "data outside a file"),
        (
            vec![Record::Entry(entry(Kind::File, "a"))],
            "first entry is not the root",
        ),
        (
            vec![
                Record::Entry(entry(Kind::File, "")),
                data(10, b"x"),
                data(5, b"x"),
            ],
            "goes back",
        ),
        (
            vec![Record::Entry(entry(Kind::File, "")), data(u64::MAX, b"xy")],
            "beyond 2^64",
        ),
        (
            vec![
                Record::Entry(entry(Kind::File, "")),
                data(0, b"xyz"),
                Record::FileEnd { size: 2, crc: 0 },
            ],
            "below its data",
        ),
        (
            vec![
                Record::Entry(entry(Kind::File, "")),
                Record::FileEnd {
                    size: 0,
                    crc: crc32c::crc32c(b""),
                },
                Record::Done(3),
            ],
            "Done says 3",
        ),
        (
            vec![
                Record::Entry(entry(Kind::File, "")),
                Record::FileEnd { size: 0, crc: 0 },
                Record::Entry(entry(Kind::File, "b")),
            ],
            "not under a directory",
        ),
    ];
    for (i, (records, want)) in cases.into_iter().enumerate() {
        let mut sink = Sink::tree(dir.path().join(format!("r{i}")), false, false);
        let err = feed(&mut sink, records).expect_err(want);
        assert!(err.message.contains(want), "case {i}: {err}");
    }
}

#[test]
fn holes_of_any_size_are_checksummed_cheaply() {
    let zeros = vec![0u8; 300_000];
    let crc = crc32c::crc32c(b"abc");
    // The CRC a sink computes over a hole is the CRC of the zeros.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("sparse");
    let mut sink = Sink::tree(root.clone(), false, false);
    let mut all = b"abc".to_vec();
    all.extend_from_slice(&zeros);
    all.extend_from_slice(b"z");
    feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::File, "")),
            data(0, b"abc"),
            data(3 + zeros.len() as u64, b"z"),
            Record::FileEnd {
                size: all.len() as u64 + (1 << 20),
                crc: {
                    let mut padded = all.clone();
                    padded.resize(all.len() + (1 << 20), 0);
                    crc32c::crc32c(&padded)
                },
            },
            Record::Done(1),
        ],
    )
    .expect("sparse file");
    assert_ne!(crc, 0);
    let got = std::fs::read(&root).expect("read");
    assert_eq!(&got[..all.len()], &all[..]);
    assert_eq!(got.len(), all.len() + (1 << 20));
    // A claimed size of 2^60 is checked in no time (and then refused by the file system or
    // the checksum, not by a hang).
    let t = std::time::Instant::now();
    let mut sink = Sink::tree(dir.path().join("huge"), false, false);
    let _ = feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::File, "")),
            Record::FileEnd {
                size: 1 << 60,
                crc: 0,
            },
        ],
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

/// What a user compares after a copy: per path, type, mode, size, mtime, content, link target.
fn manifest(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        let rel = p.strip_prefix(root).expect("under").to_owned();
        let line = if m.file_type().is_symlink() {
            format!("link {:?}", std::fs::read_link(&p).expect("readlink"))
        } else if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("entry").path());
            }
            format!("dir {:o} {}", m.mode() & 0o7777, m.mtime())
        } else {
            format!(
                "file {:o} {} {}.{} {:08x}",
                m.mode() & 0o7777,
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                crc32c::crc32c(&std::fs::read(&p).expect("read"))
            )
        };
        out.insert(rel, line);
    }
    out
}

/// A tree with a sparse file, a symlink, odd modes and old timestamps.
fn make_tree(root: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    std::fs::create_dir_all(root.join("sub/deeper")).expect("dirs");
    std::fs::write(root.join("small"), b"hello\n").expect("small");
    std::fs::write(root.join("sub/empty"), b"").expect("empty");
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("sub/deeper/big"), &big).expect("big");
    let mut sparse = std::fs::File::create(root.join("sparse")).expect("sparse");
    sparse.write_all(b"start").expect("w");
    sparse.seek(SeekFrom::Start(64 << 20)).expect("seek");
    sparse.write_all(b"middle").expect("w");
    sparse.set_len(128 << 20).expect("len");
    std::os::unix::fs::symlink("sub/deeper/big", root.join("link")).expect("link");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("sub/dangling")).expect("link");
    std::fs::set_permissions(root.join("small"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::set_permissions(
        root.join("sub/deeper/big"),
        std::fs::Permissions::from_mode(0o751),
    )
    .expect("chmod");
    let old = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    for f in ["small", "sparse", "sub/deeper/big", "sub/empty"] {
        std::fs::File::options()
            .write(true)
            .open(root.join(f))
            .expect("open")
            .set_modified(old)
            .expect("mtime");
    }
    std::fs::set_permissions(root.join("sub"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
}

/// Copies `src` to `dst` (`cp -r -p`) through an in-memory byte stream; both ends must
/// succeed and the sink must have the whole tree.
async fn copy_tree(src: &Path, dst: &Path) {
    // A small pipe: the sender waits for the receiver, memory stays bounded.
    let (mut a, mut b) = tokio::io::duplex(8192);
    let from = src.to_owned();
    let sending = transfer::send(
        &mut a,
        move |emit| tree::send_path(&from, true, 0, emit),
        |_| {},
    );
    let mut dec = Decoder::new();
    let sink = Sink::tree(dst.to_owned(), true, false);
    let receiving = transfer::receive(&mut b, &mut dec, sink, |_, _| {});
    let (sent, (sink, received)) = tokio::join!(sending, receiving);
    sent.expect("sent");
    received.expect("received");
    assert!(sink.expect("sink").is_done());
}

#[tokio::test]
async fn a_tree_arrives_identical_through_a_byte_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    make_tree(&src);
    let dst = dir.path().join("dst");
    copy_tree(&src, &dst).await;
    assert_eq!(manifest(&src), manifest(&dst));
    // The hole stayed a hole: 128 MiB long, a few blocks on disk.
    let m = std::fs::metadata(dst.join("sparse")).expect("sparse");
    assert_eq!(m.len(), 128 << 20);
    assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
    // No partial file left anywhere.
    assert!(partials(&dst).is_empty());
}

#[tokio::test]
async fn a_cut_copy_resumes_from_its_partial_file_and_a_stranger_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.bin");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &content).expect("src");
    let dst = dir.path().join("dst.bin");
    // What a cut left: the first 1.2 MB.
    std::fs::write(partial_path(&dst), &content[..1_200_000]).expect("partial");
    let copy = |resume_from: Option<u64>| {
        let (src, dst) = (src.clone(), dst.clone());
        async move {
            let sink = Sink::tree(dst, false, true);
            let offset = resume_from.unwrap_or(sink.resume_offset());
            let (mut a, mut b) = tokio::io::duplex(65536);
            let mut sent_data = 0u64;
            let mut dec = Decoder::new();
            let (sent, (sink, received)) = tokio::join!(
                transfer::send(
                    &mut a,
                    move |emit| tree::send_path(&src, false, offset, emit),
                    |_| {}
                ),
                transfer::receive(&mut b, &mut dec, sink, |n, _| sent_data = n)
            );
            (offset, sent_data, sent, sink, received)
        }
    };
    let (offset, moved, sent, _, received) = copy(None).await;
    assert_eq!(offset, 1_200_000);
    assert_eq!(moved, 1_800_000, "only the rest is sent");
    sent.expect("sent");
    received.expect("received");
    assert_eq!(std::fs::read(&dst).expect("dst"), content);
    assert!(!partial_path(&dst).exists());

    // A partial file that is not this file's start fails the checksum: nothing is renamed.
    std::fs::remove_file(&dst).expect("rm");
    std::fs::write(partial_path(&dst), vec![9u8; 1000]).expect("partial");
    let (_, _, _, sink, received) = copy(None).await;
    match received {
        Err(Error::Failed(f)) => assert_eq!(f.code, ErrorCode::Corrupt, "{f}"),
        other => panic!("a stranger partial file was accepted: {other:?}"),
    }
    sink.expect("sink").abandon(false);
    assert!(!dst.exists());
    assert!(!partial_path(&dst).exists());
}

#[tokio::test]
async fn a_missing_source_is_reported_to_the_peer_as_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = tokio::io::duplex(8192);
    let mut dec = Decoder::new();
    let sink = Sink::tree(dir.path().join("out"), false, false);
    let (sent, (_, received)) = tokio::join!(
        transfer::send(
            &mut a,
            |emit| tree::send_path(Path::new("/nonexistent/file"), false, 0, emit),
            |_| {}
        ),
        transfer::receive(&mut b, &mut dec, sink, |_, _| {})
    );
    for result in [sent, received] {
        match result {
            Err(Error::Failed(f)) => {
                assert_eq!(f.code, ErrorCode::NotFound);
                assert_eq!(f.code.exit_status(), 2);
                assert!(f.message.contains("/nonexistent/file"), "{f}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!dir.path().join("out").exists());
}

/// The partial files left anywhere under `root`.
fn partials(root: &Path) -> Vec<PathBuf> {
    manifest(root)
        .into_keys()
        .filter(|p| p.to_string_lossy().contains("vstream-partial"))
        .collect()
}

#[test]
fn a_trees_files_appear_under_their_names_only_once_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("t");
    let mut sink = Sink::tree(root.clone(), false, false);
    feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::Dir, "")),
            Record::Entry(entry(Kind::File, "a")),
            data(0, b"hello"),
            Record::FileEnd {
                size: 5,
                crc: crc32c::crc32c(b"hello"),
            },
        ],
    )
    .expect("a file");
    // Complete and checked, but its batch is not synced yet: not under its name.
    assert!(!root.join("a").exists());
    assert!(partial_path(&root.join("a")).exists());
    feed(&mut sink, vec![Record::Done(2)]).expect("done");
    assert!(sink.is_done());
    assert_eq!(std::fs::read(root.join("a")).expect("a"), b"hello");
    assert!(partials(&root).is_empty());
}

#[test]
fn a_failed_tree_keeps_its_checked_files_and_no_partial_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("t");
    let mut sink = Sink::tree(root.clone(), false, false);
    let err = feed(
        &mut sink,
        vec![
            Record::Entry(entry(Kind::Dir, "")),
            Record::Entry(entry(Kind::File, "good")),
            data(0, b"fine"),
            Record::FileEnd {
                size: 4,
                crc: crc32c::crc32c(b"fine"),
            },
            Record::Entry(entry(Kind::File, "bad")),
            data(0, b"hello"),
            Record::FileEnd {
                size: 5,
                crc: crc32c::crc32c(b"hellO"),
            },
        ],
    )
    .expect_err("checksum");
    assert!(err.message.contains("checksum mismatch"), "{err}");
    sink.abandon(false);
    assert_eq!(std::fs::read(root.join("good")).expect("good"), b"fine");
    assert!(!root.join("bad").exists());
    assert!(partials(&root).is_empty(), "{:?}", partials(&root));
}

#[tokio::test]
async fn a_tree_of_many_small_files_arrives_in_several_durable_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    // More files than one batch holds, some empty, in directories of 100.
    let files = 2500;
    for i in 0..files {
        let d = src.join(format!("d{}", i / 100));
        std::fs::create_dir_all(&d).expect("dir");
        let body = format!("{i}").repeat(i % 7);
        std::fs::write(d.join(format!("f{i}")), body).expect("file");
    }
    let dst = dir.path().join("dst");
    copy_tree(&src, &dst).await;
    let (want, got) = (manifest(&src), manifest(&dst));
    assert_eq!(got.len(), files + files / 100 + 1);
    assert_eq!(want, got);
}
