//! A vstreamd crash, with real processes: vstreamd is killed with SIGKILL while a vstream-agent
//! process copies files both ways, runs a command, receives a print job and has a console
//! captured; a new vstreamd on the same directory must bring the guest back within 2 s of its
//! start on both transport directions (agent connects, vstreamd connects), every command cut
//! by the crash must fail with a clear error and leave no short file under its destination's
//! name, the cut print job must be `.partial` (jobs, replayed event), the console log must go
//! on in the same file after a marker, the agent's heartbeats must resume, and new copies must
//! be whole.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{agent_binary, ctl, ctl_async, ok, AgentProcess, Daemon, Options};

const CONFIG: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/up.sock"
[[guest.transport]]
kind = "mux"
address = "unix:DIR/down.sock"
[[guest.transport]]
kind = "console"
name = "hvc0"
address = "unix:DIR/hvc0.sock"
[guest.watchdog]
timeout_ms = 30000
action = "log"
"#;

/// Size of the files copied: large enough that the copies are in flight when vstreamd dies.
const BIG: usize = 64 * 1024 * 1024;

fn start_agent(d: &Daemon) -> AgentProcess {
    let arg = |name: &str| d.path(name).display().to_string();
    let child = Command::new(agent_binary())
        .args(["--name", "g", "--no-random", "--ppp", "off"])
        .args(["--connect", &format!("unix:{}", arg("up.sock"))])
        .args(["--connect", &format!("unix-listen:{}", arg("down.sock"))])
        .args(["--printer", &format!("unix-listen:{}", arg("printer.sock"))])
        .args(["--watchdog-interval", "200ms"])
        .env("VSTREAM_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(d.path("agent.log")).expect("agent log"))
        .spawn()
        .expect("spawn vstream-agent");
    AgentProcess(child)
}

/// `vstreamctl status --json` if vstreamd answers.
fn try_status(control: &Path) -> Option<serde_json::Value> {
    let out = ctl(control, &["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Whether guest g is connected with both mux transports up.
fn both_up(s: &serde_json::Value) -> bool {
    let g = &s["guests"][0];
    let up = g["transports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["kind"] == "mux" && t["state"] == "up")
        .count();
    g["connected"] == true && up == 2
}

/// Polls until `pred` holds on a status vstreamd gives (it may not answer yet); the time since
/// `start`.
async fn time_until(
    d: &Daemon,
    start: Instant,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    loop {
        let control = d.control.clone();
        let s = common::blocking(move || try_status(&control)).await;
        if s.as_ref().is_some_and(&pred) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < common::WAIT,
            "timed out waiting for {what}: {s:?}\nvstreamd log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A vstreamctl run in the background (a copy, a command) that the crash will cut.
fn spawn_ctl(control: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstreamctl")
}

/// Files in `dir` whose name starts with `prefix`, with their sizes.
fn files_like(dir: &Path, prefix: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            name.starts_with(prefix).then_some((name, len))
        })
        .collect();
    out.sort();
    out
}

fn assert_failed_clearly(what: &str, out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} must fail: {err}");
    assert!(
        err.contains("vstreamd stopped during the command"),
        "{what}: the error must say that vstreamd stopped: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vstreamd_loses_nothing_silently_and_the_guest_is_back_within_2s() {
    let mut d = Options::config(CONFIG).start();
    // QEMU's side of the console: a listening chardev socket that vstreamd connects to.
    let console = tokio::net::UnixListener::bind(d.path("hvc0.sock")).expect("console socket");
    let _agent = start_agent(&d);
    time_until(&d, Instant::now(), "the guest on both transports", both_up).await;
    let (mut con, _) = console.accept().await.expect("console connection");
    con.write_all(b"Linux version 6.1 booting\n")
        .await
        .expect("console output");

    // Work in flight: 64 MiB into the guest and out of it, a command, a print job.
    let data: Vec<u8> = (0..BIG as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let src = d.path("src.bin");
    std::fs::write(&src, &data).expect("source");
    let guest_dst = d.path("in-guest.bin");
    let host_dst = d.path("on-host.bin");
    let into_guest = format!("g:{}", guest_dst.display());
    let from_guest = format!("g:{}", src.display());
    let cp_in = spawn_ctl(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &src.display().to_string(),
            &into_guest,
        ],
    );
    let cp_out = spawn_ctl(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &from_guest,
            &host_dst.display().to_string(),
        ],
    );
    let exec = spawn_ctl(&d.control, &["exec", "g", "--", "sleep", "30"]);
    let mut job = tokio::net::UnixStream::connect(d.path("printer.sock"))
        .await
        .expect("printer");
    job.write_all(b"%!PS-Adobe-3.0\n").await.expect("job");
    job.write_all(&vec![b'x'; 256 * 1024]).await.expect("job");
    let spool = d.path("state/g/spool");

    // Kill vstreamd once both copies and the job are under way.
    let started = Instant::now();
    loop {
        let going_in = files_like(d.dir.path(), "in-guest.bin.vstream-partial")
            .iter()
            .any(|(_, n)| *n >= 2 << 20);
        let going_out = files_like(d.dir.path(), "on-host.bin.vstream-partial")
            .iter()
            .any(|(_, n)| *n >= 2 << 20);
        let printing = spool.exists() && !files_like(&spool, ".job-").is_empty();
        if going_in && going_out && printing {
            break;
        }
        assert!(
            started.elapsed() < common::WAIT,
            "the copies did not get going: {:?} {:?}\n{}",
            files_like(d.dir.path(), ""),
            spool.exists().then(|| files_like(&spool, "")),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    d.kill9();
    let partial_in = files_like(d.dir.path(), "in-guest.bin.vstream-partial");

    // Every command cut by the crash fails, saying why, with a non-zero status.
    let (cp_in, cp_out, exec) = common::blocking(move || {
        (
            cp_in.wait_with_output().expect("cp in"),
            cp_out.wait_with_output().expect("cp out"),
            exec.wait_with_output().expect("exec"),
        )
    })
    .await;
    assert_failed_clearly("cp into the guest", &cp_in);
    assert_failed_clearly("cp out of the guest", &cp_out);
    assert_failed_clearly("exec", &exec);
    // No short file under a destination's name: the host side removed its temporary file,
    // the guest side's stays under a name that says it is partial.
    assert!(
        !host_dst.exists(),
        "a short file under the destination's name"
    );
    assert!(files_like(d.dir.path(), "on-host.bin").is_empty());
    assert!(
        !guest_dst.exists(),
        "a short file under the guest destination's name"
    );
    assert_eq!(partial_in.len(), 1, "{partial_in:?}");
    assert!(partial_in[0].1 < BIG as u64, "{partial_in:?}");

    // While no vstreamd runs, a command says that it cannot reach one (not that it was lost).
    let args = ["cp", src.to_str().expect("utf-8"), into_guest.as_str()];
    let out = ctl_async(&d.control, &args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("cannot reach vstreamd")
            && !err.contains("during the command"),
        "{err}"
    );

    // A new vstreamd: the guest is back within 2 s of its start, on both transports.
    let restarted = Instant::now();
    d.restart();
    let back = time_until(&d, restarted, "the guest back on both transports", both_up).await;
    println!(
        "crash: guest back on both transports {} ms after the new vstreamd's start",
        back.as_millis()
    );
    assert!(back < Duration::from_secs(2), "guest back after {back:?}");

    // The console capture resumes in the same log, after a marker.
    let (mut con, _) = console.accept().await.expect("console reconnection");
    con.write_all(b"still running\n")
        .await
        .expect("console output");
    let log = d.path("state/g/hvc0.log");
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.ends_with("still running\n") {
            break text;
        }
        assert!(started.elapsed() < common::WAIT * 2, "console log: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "Linux version 6.1 booting");
    assert!(
        lines[1].starts_with("[vstreamd: console capture interrupted at "),
        "{text}"
    );

    // The job cut by the crash is partial: in the jobs list and in a replayed event.
    let jobs = ok(
        &["jobs"],
        ctl_async(&d.control, &["jobs", "g", "--json"]).await,
    );
    let jobs: serde_json::Value = serde_json::from_str(&jobs).expect("jobs JSON");
    let cut = &jobs.as_array().expect("jobs")[0];
    assert_eq!(cut["state"], "partial", "{jobs:#}");
    assert_eq!(cut["file"], "job-000001.ps.partial", "{jobs:#}");
    assert!(
        cut["reason"]
            .as_str()
            .is_some_and(|r| r.contains("vstreamd stopped")),
        "{jobs:#}"
    );
    assert!(!files_like(&spool, "")
        .iter()
        .any(|(n, _)| n.ends_with(".tmp")));
    let mut events = tokio::net::UnixStream::connect(&d.control)
        .await
        .expect("control");
    events
        .write_all(b"{\"op\":\"events\",\"guest\":\"g\"}\n")
        .await
        .expect("events");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"print-job\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), events.read(&mut buf))
            .await
            .expect("a replayed print-job event")
            .expect("events");
        assert!(n > 0, "events ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&seen)
        .lines()
        .find(|l| l.contains("\"print-job\""))
        .map(str::to_owned)
        .expect("event line");
    let ev: serde_json::Value = serde_json::from_str(&line).expect("event JSON");
    assert_eq!(
        (&ev["state"], &ev["replayed"]),
        (&"partial".into(), &true.into())
    );

    // The agent's side of the old session: its channels were reset with the reason, and its
    // heartbeats reopened a watchdog channel with the new daemon.
    let agent_log = std::fs::read_to_string(d.path("agent.log")).expect("agent log");
    assert!(
        agent_log.contains("the peer restarted"),
        "agent log:\n{agent_log}"
    );
    time_until(&d, Instant::now(), "heartbeats to the new vstreamd", |s| {
        let w = &s["guests"][0]["devices"]["watchdog"];
        w["state"] == "armed" && w["heartbeats"].as_u64().unwrap_or(0) > 0
    })
    .await;

    // New copies both ways are whole.
    let out = ctl_async(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &src.display().to_string(),
            &into_guest,
        ],
    )
    .await;
    ok(&["cp in"], out);
    assert!(std::fs::read(&guest_dst).expect("copied in") == data);
    let out = ctl_async(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &from_guest,
            &host_dst.display().to_string(),
        ],
    )
    .await;
    ok(&["cp out"], out);
    assert!(std::fs::read(&host_dst).expect("copied out") == data);
    drop(job);
}
