//! Printing through the real agent (in-process, on its Unix socket) into a real vstreamd's
//! spool: a complete job with its hook, a job cut by an agent restart, a job over quota, and
//! hostile job metadata from a guest that speaks the protocol itself.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_agent::Agent;
use vstream_devices::printer::device::Listeners;
use vstream_devices::printer::{self, CHANNEL_NAME, CLASS};

use common::{ctl_async, jobs, raw_guest, raw_print, start_daemon, wait_jobs};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn pdf(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = b"%PDF-1.4\n".to_vec();
    v.extend((0..len).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    v.extend_from_slice(b"\n%%EOF\n");
    v
}

/// Prints `data` on the agent's Unix socket like `nc -U`; returns what the connection did
/// after the data: Ok when the agent closed it (the job is on the host).
async fn print(socket: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    Ok(())
}

const CONFIG: &str = r#"
[[guest]]
name = "p"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/p.sock"
[guest.printer]
spool = "DIR/spool"
quota_bytes = 12000000
hook = ["/bin/sh", "-c", "echo \"$VSTREAM_GUEST $VSTREAM_JOB_ID $VSTREAM_JOB_TYPE $1 $2\" >> DIR/hook.log", "hook"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_arrive_whole_cut_jobs_are_partial_and_the_quota_holds() {
    let d = start_daemon(CONFIG);
    let dir = d.dir.path().to_owned();
    let spool = dir.join("spool");
    let socket = dir.join("printer.sock");
    let connect: vstream_transport::Address = format!("unix:{}/p.sock", dir.display())
        .parse()
        .expect("addr");
    let listen: vstream_transport::Address = format!("unix-listen:{}", socket.display())
        .parse()
        .expect("addr");
    let mut agent = Agent::start("p", vec![connect.clone()]);
    agent.start_device(printer::CLASS, Listeners(vec![listen.clone()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(socket.exists() && agent.mux().is_connected()) {
        assert!(Instant::now() < deadline, "agent not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. A 5 MB PDF arrives byte-identical, typed pdf, and the hook runs with path and type.
    let job = pdf(5_000_000, 1);
    print(&socket, &job).await.expect("print");
    assert_eq!(names(&spool), ["job-000001.pdf"]);
    assert!(std::fs::read(spool.join("job-000001.pdf")).expect("job") == job);
    let j = jobs(&d.control, "p").await;
    assert_eq!(j.len(), 1);
    assert_eq!(
        (j[0]["state"].as_str(), j[0]["type"].as_str()),
        (Some("done"), Some("pdf"))
    );
    assert_eq!(j[0]["size"], job.len());
    let hook_log = dir.join("hook.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hook_log.exists() {
        assert!(Instant::now() < deadline, "the hook did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = std::fs::read_to_string(&hook_log).expect("hook log");
    assert_eq!(
        line.trim(),
        format!("p 1 pdf {} pdf", spool.join("job-000001.pdf").display())
    );

    // 2. A job cut in the middle by an agent restart (a new session) ends as partial.
    let mut s = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect");
    s.write_all(b"%!PS-Adobe-3.0\n").await.expect("write");
    s.write_all(&vec![b'x'; 200_000]).await.expect("write");
    wait_jobs(&d.control, "p", "job 2 receiving", |j| {
        j.iter()
            .any(|j| j["id"] == 2 && j["state"] == "receiving" && j["size"] == 200_015)
    })
    .await;
    drop(agent);
    drop(s);
    let mut agent = Agent::start("p", vec![connect]);
    let j = wait_jobs(&d.control, "p", "job 2 partial", |j| {
        j.iter().any(|j| j["id"] == 2 && j["state"] == "partial")
    })
    .await;
    let p = j.iter().find(|j| j["id"] == 2).expect("job 2");
    assert_eq!(p["file"], "job-000002.ps.partial");
    assert_eq!(p["type"], "postscript");
    assert_eq!(p["size"], 200_015);
    assert!(
        p["reason"].as_str().unwrap_or("").contains("restarted"),
        "{p}"
    );
    assert_eq!(names(&spool), ["job-000001.pdf", "job-000002.ps.partial"]);
    let out = ctl_async(&d.control, &["status", "--json"]).await;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    assert_eq!(st["guests"][0]["devices"]["printer"]["jobs"]["partial"], 1);

    // 3. Over quota: refused, the client's connection is closed, nothing else touched.
    std::fs::remove_file(&socket).ok();
    agent.start_device(printer::CLASS, Listeners(vec![listen]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(socket.exists() && agent.mux().is_connected()) {
        assert!(Instant::now() < deadline, "agent not ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<(String, std::fs::Metadata)> = names(&spool)
        .into_iter()
        .map(|n| {
            let m = std::fs::metadata(spool.join(&n)).expect("meta");
            (n, m)
        })
        .collect();
    let big = pdf(8_000_000, 2);
    // The client sees its connection closed: a write error, or the end of the stream while it
    // waits for the agent to close; either way this returns instead of hanging.
    let closed = tokio::time::timeout(Duration::from_secs(30), print(&socket, &big)).await;
    assert!(
        closed.is_ok(),
        "the agent did not close the refused client's connection"
    );
    let j = wait_jobs(&d.control, "p", "a refused job", |j| {
        j.iter().any(|j| j["state"] == "refused")
    })
    .await;
    let refused = j.iter().find(|j| j["state"] == "refused").expect("refused");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or("")
            .contains("spool quota exceeded for guest p"),
        "{refused}"
    );
    assert_eq!(names(&spool), ["job-000001.pdf", "job-000002.ps.partial"]);
    for (n, m) in before {
        let now = std::fs::metadata(spool.join(&n)).expect("meta");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (now.ino(), now.len(), now.mtime()),
            (m.ino(), m.len(), m.mtime()),
            "{n} was touched"
        );
    }
    assert!(std::fs::read(spool.join("job-000001.pdf")).expect("job") == job);
    let out = ctl_async(&d.control, &["jobs", "p"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused") && text.contains("partial") && text.contains("done"),
        "{text}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_job_metadata_cannot_make_the_host_write_outside_the_spool() {
    let d = start_daemon(CONFIG);
    let dir = d.dir.path().to_owned();
    let spool = dir.join("spool");
    // A guest that speaks the printer protocol itself.
    let (mux, _incoming) = raw_guest(&d, "p", "p.sock");
    let outside = dir.join("outside");
    let hostile = [
        format!("{}", outside.display()),
        "../../outside".into(),
        "../outside".into(),
        "/etc/passwd".into(),
        "job-000001.pdf".into(),
        ".job-000003.tmp".into(),
        "a\0b".into(),
        "x".repeat(5000),
    ];
    for (i, h) in hostile.iter().enumerate() {
        let mut h = h.clone();
        h.truncate(600);
        let meta = ["title", "source", "peer", "file", "name", "path"]
            .iter()
            .map(|k| (k.to_string(), h.clone()))
            .collect();
        raw_print(&mux, meta, b"%PDF-1.4\nhostile\n%%EOF\n").await;
        assert_eq!(names(&spool).len(), i + 1);
    }
    // A channel name and a bogus record stream are refused, not written.
    let e = mux
        .open(CLASS, "../../outside")
        .await
        .expect_err("bad name");
    assert!(e.to_string().contains("printer has no"), "{e}");
    let mut chan = mux.open(CLASS, CHANNEL_NAME).await.expect("open");
    chan.write_all(&[0x02, 0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let mut sink = Vec::new();
    let e = chan.read_to_end(&mut sink).await.expect_err("reset");
    assert!(e.to_string().contains("printer protocol error"), "{e}");

    for n in names(&spool) {
        assert!(
            n.starts_with("job-")
                && n.ends_with(".pdf")
                && vstream_devices::printer::host::is_spool_name(&n),
            "unexpected spool entry {n:?}"
        );
    }
    assert!(!outside.exists());
    assert_eq!(
        names(&dir).iter().filter(|n| n.contains("outside")).count(),
        0
    );
    let j = jobs(&d.control, "p").await;
    assert_eq!(j.len(), hostile.len());
    assert_eq!(j[6]["title"], "a?b");
    assert_eq!(j[7]["title"].as_str().map(|t| t.chars().count()), Some(256));
}
