//! Unit tests of the printer device: records, type detection, sanitising, and the spool over a
//! real multiplexer pair (done, partial, refused, hostile metadata, crash recovery).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::host::{is_spool_name, JobState, PrinterService, Spool, SpoolConfig};
use super::*;

#[test]
fn records_round_trip_byte_by_byte() {
    let recs = vec![
        Record::Job(vec![
            ("version".into(), "1".into()),
            ("title".into(), "a=b c".into()),
        ]),
        Record::Data(Bytes::from_static(b"%PDF-1.4\n")),
        Record::Data(Bytes::from(vec![7u8; MAX_DATA])),
        Record::End(9 + MAX_DATA as u64),
        Record::Done(vec![("id".into(), "3".into())]),
    ];
    let mut wire = Vec::new();
    for r in &recs {
        r.encode(&mut wire).expect("encode");
    }
    assert_eq!(&wire[..5], &[0x01, 22, 0, 0, 0], "type, u32 LE length");
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for chunk in wire.chunks(7) {
        dec.push(chunk).expect("push");
        while let Some(r) = dec.next_message().expect("decode") {
            out.push(r);
        }
    }
    assert_eq!(out, recs);
    dec.finish().expect("clean end");
}

#[test]
fn bad_records_are_errors() {
    for (bytes, want) in [
        (vec![0x09, 0, 0, 0, 0], "unknown record type"),
        (vec![0x02, 0, 0, 0, 0], "data record of 0 bytes"),
        (vec![0x02, 1, 0, 1, 0], "data record of 65537 bytes"),
        (vec![0x02, 0xff, 0xff, 0xff, 0xff], "data record"),
        (vec![0x03, 4, 0, 0, 0, 1, 2, 3, 4], "end record of 4 bytes"),
        (vec![0x01, 1, 0x10, 0, 0], "job record of 4097 bytes"),
        (
            vec![0x01, 3, 0, 0, 0, b'a', b'b', b'\n'],
            "malformed job metadata",
        ),
        (vec![0x01, 2, 0, 0, 0, 0xff, b'='], "malformed job metadata"),
    ] {
        let mut d = Decoder::new();
        d.push(&bytes).expect("push");
        let e = d.next_message().expect_err("must fail");
        assert!(e.to_string().contains(want), "{bytes:?}: {e}");
    }
    assert!(Record::Data(Bytes::new()).to_bytes().is_err());
    let mut d = Decoder::new();
    d.push(&[0x02, 3, 0, 0, 0, 1]).expect("push");
    assert_eq!(d.next_message().expect("partial"), None);
    assert_eq!(d.finish(), Err(RecordError::Truncated(6)));
}

#[test]
fn types_are_detected() {
    assert_eq!(JobType::detect(b"%PDF-1.7\n%\xe2\xe3"), JobType::Pdf);
    assert_eq!(JobType::detect(b"\n\n%PDF-1.4"), JobType::Pdf);
    assert_eq!(JobType::detect(b"%!PS-Adobe-3.0\n"), JobType::Postscript);
    assert_eq!(JobType::detect(b"\x04%!PS"), JobType::Postscript);
    assert_eq!(JobType::detect(b"\x1bE\x1b&l0O"), JobType::Pcl);
    assert_eq!(
        JobType::detect(
            b"\x1b%-12345X@PJL JOB NAME=\"x\"\r\n@PJL ENTER LANGUAGE = PDF\r\n%PDF-1.4"
        ),
        JobType::Pdf
    );
    assert_eq!(
        JobType::detect(b"\x1b%-12345X@PJL\r\n@pjl enter language=postscript\r\n%!"),
        JobType::Postscript
    );
    assert_eq!(
        JobType::detect(b"\x1b%-12345X@PJL\r\n@PJL ENTER LANGUAGE=PCLXL\r\n"),
        JobType::Pcl
    );
    assert_eq!(
        JobType::detect(b"\x1b%-12345X@PJL INFO STATUS\r\n"),
        JobType::Pcl
    );
    assert_eq!(
        JobType::detect("Hello, wörld\r\n\x0cpage 2\n".as_bytes()),
        JobType::Text
    );
    assert_eq!(
        JobType::detect(b"caf\xc3"),
        JobType::Text,
        "a cut character is still text"
    );
    assert_eq!(JobType::detect(b"\x00\x01\x02binary"), JobType::Unknown);
    assert_eq!(JobType::detect(b"\xff\xfe\xfd"), JobType::Unknown);
    assert_eq!(JobType::detect(b""), JobType::Unknown);
    for t in [
        JobType::Pdf,
        JobType::Postscript,
        JobType::Pcl,
        JobType::Text,
        JobType::Unknown,
    ] {
        assert_eq!(JobType::from_extension(t.extension()), Some(t));
    }
}

#[test]
fn metadata_is_sanitised() {
    assert_eq!(
        sanitize("../../etc/passwd"),
        "../../etc/passwd",
        "shown, never a path"
    );
    assert_eq!(sanitize("a\nb\0c\x1b[31m\u{202e}d"), "a?b?c?[31m?d");
    assert_eq!(sanitize(&"x".repeat(10_000)).chars().count(), MAX_VALUE);
}

type Events = Arc<Mutex<Vec<serde_json::Value>>>;

fn spool(dir: &std::path::Path, quota: u64) -> (Arc<Spool>, Events) {
    let events: Events = Arc::default();
    let sink = events.clone();
    let spool = Spool::open(
        "g",
        SpoolConfig {
            dir: dir.to_owned(),
            quota_bytes: quota,
            hook: Vec::new(),
            hook_timeout: Duration::from_secs(5),
        },
        Arc::new(move |v| sink.lock().expect("events").push(v)),
    )
    .expect("spool");
    (spool, events)
}

async fn pair(spool: Arc<Spool>) -> vstream_link::Mux {
    use vstream_wire::{Config, Role};
    let (host, hin) = vstream_link::Mux::new(Config::new(Role::Host, "h"), 1);
    let (guest, _gin) = vstream_link::Mux::new(Config::new(Role::Guest, "g"), 2);
    let svc: Arc<dyn crate::Service> = Arc::new(PrinterService::new("g", Some(spool)));
    tokio::spawn(crate::dispatch(vec![svc], hin));
    let (a, b) = vstream_transport::pair(1 << 16);
    let params = vstream_wire::LinkParams::stream(0);
    let (h2, g2) = (host.clone(), guest.clone());
    tokio::spawn(async move { h2.run_link(a.stream, params, "pair", &[]).await });
    tokio::spawn(async move { g2.run_link(b.stream, params, "pair", &[]).await });
    guest
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends records on a fresh printer channel; returns the channel.
async fn send(guest: &vstream_link::Mux, recs: &[Record]) -> vstream_link::ChannelStream {
    let mut chan = guest.open(CLASS, CHANNEL_NAME).await.expect("open");
    for r in recs {
        chan.write_all(&r.to_bytes().expect("encode"))
            .await
            .expect("write");
    }
    chan
}

#[tokio::test]
async fn a_complete_job_is_renamed_only_after_its_end() {
    let dir = tempfile::tempdir().expect("tmp");
    let (sp, events) = spool(dir.path(), 1 << 30);
    let guest = pair(sp.clone()).await;
    let body: Vec<u8> = b"%PDF-1.4\n"
        .iter()
        .copied()
        .chain((0..200_000u32).map(|i| (i * 7) as u8))
        .collect();
    let mut recs = vec![Record::Job(vec![
        ("version".into(), "1".into()),
        ("title".into(), "t".into()),
    ])];
    recs.extend(
        body.chunks(MAX_DATA)
            .map(|c| Record::Data(Bytes::copy_from_slice(c))),
    );
    let mut chan = send(&guest, &recs).await;
    // Everything sent but the End: only the temporary file exists.
    wait_for("the data to arrive", || {
        sp.used_bytes() == body.len() as u64
    })
    .await;
    assert_eq!(names(dir.path()), [".job-000001.tmp"]);
    chan.write_all(&Record::End(body.len() as u64).to_bytes().expect("end"))
        .await
        .expect("end");
    chan.shutdown().await.expect("shutdown");
    let mut reply = Vec::new();
    chan.read_to_end(&mut reply).await.expect("done");
    let mut dec = Decoder::new();
    dec.push(&reply).expect("push");
    let Some(Record::Done(meta)) = dec.next_message().expect("record") else {
        panic!("no done")
    };
    assert_eq!(Record::meta(&meta, "file"), Some("job-000001.pdf"));
    assert_eq!(Record::meta(&meta, "type"), Some("pdf"));
    assert_eq!(names(dir.path()), ["job-000001.pdf"]);
    assert_eq!(
        std::fs::read(dir.path().join("job-000001.pdf")).expect("file"),
        body
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("job-000001.pdf"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let jobs = sp.jobs().expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Done);
    assert_eq!(jobs[0].title.as_deref(), Some("t"));
    let ev = events.lock().expect("ev").clone();
    assert_eq!(ev.last().expect("event")["state"], "done");
    assert_eq!(ev.last().expect("event")["event"], "print-job");
}

#[tokio::test]
async fn a_cut_job_is_kept_as_partial_and_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let (sp, events) = spool(dir.path(), 1 << 30);
    let guest = pair(sp.clone()).await;
    let chan = send(
        &guest,
        &[
            Record::Job(vec![]),
            Record::Data(Bytes::from_static(b"%!PS-Adobe\n")),
        ],
    )
    .await;
    wait_for("data", || sp.used_bytes() == 11).await;
    chan.reset("client went away");
    wait_for("the partial job", || {
        names(dir.path()) == ["job-000001.ps.partial"]
    })
    .await;
    let jobs = sp.jobs().expect("jobs");
    assert_eq!(jobs[0].state, JobState::Partial);
    assert_eq!(jobs[0].size, 11);
    assert!(
        jobs[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("client went away"),
        "{jobs:?}"
    );
    wait_for("the event", || {
        events
            .lock()
            .expect("ev")
            .iter()
            .any(|e| e["state"] == "partial")
    })
    .await;

    // A lying End is a protocol error: partial, not done.
    let mut chan = send(
        &guest,
        &[
            Record::Job(vec![]),
            Record::Data(Bytes::from_static(b"abc")),
            Record::End(4),
        ],
    )
    .await;
    let mut sink = Vec::new();
    let e = chan.read_to_end(&mut sink).await.expect_err("reset");
    assert!(
        e.to_string().contains("end record says 4 bytes, 3 arrived"),
        "{e}"
    );
    wait_for("second partial", || {
        names(dir.path()).contains(&"job-000002.txt.partial".to_owned())
    })
    .await;
}

#[tokio::test]
async fn over_quota_jobs_are_refused_and_nothing_else_is_touched() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("keep.me"), vec![1u8; 1000]).expect("other file");
    let (sp, events) = spool(dir.path(), 5000);
    let guest = pair(sp.clone()).await;
    let mut chan = send(
        &guest,
        &[
            Record::Job(vec![]),
            Record::Data(Bytes::from(vec![b'a'; 3000])),
            Record::Data(Bytes::from(vec![b'a'; 3000])),
        ],
    )
    .await;
    let mut sink = Vec::new();
    let e = chan.read_to_end(&mut sink).await.expect_err("refused");
    assert!(
        e.to_string().contains("spool quota exceeded for guest g"),
        "{e}"
    );
    wait_for("refusal", || {
        sp.jobs()
            .map(|j| j.iter().any(|j| j.state == JobState::Refused))
            .unwrap_or(false)
    })
    .await;
    assert_eq!(names(dir.path()), ["keep.me"]);
    assert_eq!(
        std::fs::read(dir.path().join("keep.me")).expect("kept"),
        vec![1u8; 1000]
    );
    assert!(events
        .lock()
        .expect("ev")
        .iter()
        .any(|e| e["state"] == "refused"));
    // A job that fits still works, and then the spool is full: the next is refused at once.
    let mut chan = send(
        &guest,
        &[
            Record::Job(vec![]),
            Record::Data(Bytes::from(vec![b'x'; 4000])),
            Record::End(4000),
        ],
    )
    .await;
    chan.shutdown().await.expect("shutdown");
    let mut reply = Vec::new();
    chan.read_to_end(&mut reply).await.expect("done");
    let mut chan = send(&guest, &[Record::Job(vec![])]).await;
    let e = chan.read_to_end(&mut reply).await.expect_err("full");
    assert!(e.to_string().contains("5000 of 5000 bytes used"), "{e}");
    assert_eq!(names(dir.path()), ["job-000002.txt", "keep.me"]);
}

#[tokio::test]
async fn hostile_metadata_never_names_a_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let spool_dir = dir.path().join("spool");
    let (sp, _events) = spool(&spool_dir, 1 << 20);
    let guest = pair(sp.clone()).await;
    let hostile = [
        "../../../../tmp/pwned",
        "/etc/passwd",
        "..",
        "job-000001.pdf",
        ".job-000009.tmp",
        "a/b\\c",
        "\u{202e}fdp.exe",
    ];
    for (i, title) in hostile.iter().enumerate() {
        let meta = vec![
            ("version".into(), "1".into()),
            ("title".into(), (*title).into()),
            ("file".into(), (*title).into()),
            ("name".into(), (*title).into()),
            ("source".into(), format!("{title}\u{0}")),
        ];
        let mut chan = send(
            &guest,
            &[
                Record::Job(meta),
                Record::Data(Bytes::from_static(b"%PDF-1.4\n%%EOF\n")),
                Record::End(15),
            ],
        )
        .await;
        chan.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        chan.read_to_end(&mut reply).await.expect("done");
        assert_eq!(names(&spool_dir).len(), i + 1);
    }
    for n in names(&spool_dir) {
        assert!(is_spool_name(&n), "{n}");
        assert!(n.starts_with("job-") && n.ends_with(".pdf"), "{n}");
    }
    // Nothing appeared next to the spool.
    assert_eq!(names(dir.path()), ["spool"]);
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    let jobs = sp.jobs().expect("jobs");
    assert_eq!(jobs[0].title.as_deref(), Some("../../../../tmp/pwned"));
    assert_eq!(jobs[6].title.as_deref(), Some("?fdp.exe"));
    assert!(jobs
        .iter()
        .all(|j| !j.source.as_deref().unwrap_or("").contains('\0')));
}

#[test]
fn a_crash_leaves_partial_jobs_not_temporary_files() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join(".job-000007.tmp"), b"%PDF-1.4 half").expect("tmp");
    std::fs::write(dir.path().join("job-000003.pdf"), b"%PDF-1.4 whole").expect("done");
    let (sp, events) = spool(dir.path(), 1 << 20);
    assert_eq!(
        names(dir.path()),
        ["job-000003.pdf", "job-000007.pdf.partial"]
    );
    let jobs = sp.jobs().expect("jobs");
    assert_eq!(
        jobs.iter().map(|j| (j.id, j.state)).collect::<Vec<_>>(),
        [(3, JobState::Done), (7, JobState::Partial)]
    );
    assert_eq!(events.lock().expect("ev").len(), 1);
    assert_eq!(sp.used_bytes(), 27);
}
