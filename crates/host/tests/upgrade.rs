//! Live upgrade with real processes: `vstreamctl daemon upgrade` while a vstream-agent process
//! takes a copy into the guest and gives one out of it, a `vstreamctl exec ... cat` echoes
//! random data and a `vstreamctl open ... diag echo` echoes more: everything completes with
//! every byte once and in order (sha256 equal), the guest's session is resumed (no restart),
//! the status shows the new generation in the same pid, and the shell is still usable. An
//! upgrade to a binary that cannot run fails with the reason and the old daemon goes on.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use common::{agent_binary, ctl_async, ok, sha256, AgentProcess, Daemon, Options};

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
"#;

/// Size of each copy: large enough to be in flight during the upgrade.
const BIG: usize = 64 * 1024 * 1024;

fn start_agent(d: &Daemon) -> AgentProcess {
    let arg = |name: &str| d.path(name).display().to_string();
    let child = Command::new(agent_binary())
        .args(["--name", "g", "--no-random", "--ppp", "off"])
        .args(["--connect", &format!("unix:{}", arg("up.sock"))])
        .args(["--connect", &format!("unix-listen:{}", arg("down.sock"))])
        .env("VSTREAM_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(d.path("agent.log")).expect("agent log"))
        .spawn()
        .expect("spawn vstream-agent");
    AgentProcess(child)
}

fn spawn_ctl(control: &Path, args: &[&str], stdin: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstreamctl")
}

/// A vstreamctl whose stdin gets random data, 4 KiB every 2 ms, until told to stop, and
/// whose stdout is collected: an echo through the guest.
struct Echo {
    what: &'static str,
    child: Child,
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<Vec<u8>>,
    reader: std::thread::JoinHandle<(Vec<u8>, Duration)>,
}

impl Echo {
    fn start(what: &'static str, control: &Path, args: &[&str], seed: u64) -> Echo {
        let mut child = spawn_ctl(control, args, Stdio::piped());
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut sent = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let mut chunk = vec![0u8; 4 * 1024];
                rng.fill(&mut chunk[..]);
                if stdin.write_all(&chunk).is_err() {
                    break;
                }
                sent.extend_from_slice(&chunk);
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        });
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut last: Option<Instant> = None;
            let mut longest = Duration::ZERO;
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let now = Instant::now();
                        if let Some(l) = last {
                            longest = longest.max(now - l);
                        }
                        last = Some(now);
                        got.extend_from_slice(&buf[..n]);
                    }
                }
            }
            (got, longest)
        });
        Echo {
            what,
            child,
            stop,
            writer,
            reader,
        }
    }

    /// Stops writing, closes stdin, and checks that what came back is what was sent (by
    /// sha256, both written to `dir`) and that vstreamctl succeeded; the longest pause
    /// between two reads of the echo.
    fn finish(self, dir: &Path) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.writer.join().expect("writer");
        let (got, longest) = self.reader.join().expect("reader");
        let out = self.child.wait_with_output().expect("vstreamctl");
        assert!(
            out.status.success(),
            "{}: {}",
            self.what,
            String::from_utf8_lossy(&out.stderr)
        );
        let (a, b) = (dir.join("sent"), dir.join("echoed"));
        std::fs::write(&a, &sent).expect("sent");
        std::fs::write(&b, &got).expect("echoed");
        assert!(
            sent.len() > 1 << 20,
            "{}: only {} bytes",
            self.what,
            sent.len()
        );
        assert_eq!(
            sha256(&a),
            sha256(&b),
            "{}: {} bytes sent, {} echoed",
            self.what,
            sent.len(),
            got.len()
        );
        longest
    }
}

/// QEMU's side of a console: accepts vstreamd's connection (again after it goes) and writes
/// `line N` every 5 ms; the last N written.
fn console_guest(listener: std::os::unix::net::UnixListener) -> Arc<std::sync::atomic::AtomicU64> {
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let written = last.clone();
    std::thread::spawn(move || {
        let mut n = 0u64;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            loop {
                n += 1;
                if conn.write_all(format!("line {n}\n").as_bytes()).is_err() {
                    break;
                }
                written.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    last
}

/// The numbers of the `line N` a console viewer printed.
fn viewed_lines(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok())
        .collect()
}

fn session_restarts(s: &serde_json::Value) -> u64 {
    s["guests"][0]["stats"]["session_restarts"]
        .as_u64()
        .expect("session_restarts")
}

/// Waits until a copy's temporary file (`NAME.vstream-partial...`) holds at least `n` bytes.
async fn copying(d: &Daemon, name: &str, n: u64) {
    let started = Instant::now();
    let prefix = format!("{name}.vstream-partial");
    let size = || -> u64 {
        let files = std::fs::read_dir(d.dir.path())
            .expect("dir")
            .filter_map(|e| e.ok());
        files
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    while size() < n {
        assert!(
            started.elapsed() < common::WAIT,
            "{prefix} did not grow\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_mid_copy_loses_and_repeats_nothing_and_the_session_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let console = std::os::unix::net::UnixListener::bind(dir.path().join("hvc0.sock"))
        .expect("console socket");
    let d = Options::config(&CONFIG.replace(
        "DIR/hvc0.sock",
        &dir.path().join("hvc0.sock").display().to_string(),
    ))
    .start();
    let written = console_guest(console);
    let _agent = start_agent(&d);
    let before = d.wait_connected("g").await;
    let pid = before["daemon"]["pid"].as_u64().expect("pid");
    assert_eq!(before["daemon"]["generation"], 0);

    // Work in flight: copies both ways, a cat on pipes, a channel echo.
    let data: Vec<u8> = (0..BIG as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let src = d.path("src.bin");
    std::fs::write(&src, &data).expect("source");
    let (guest_dst, host_dst) = (d.path("in-guest.bin"), d.path("on-host.bin"));
    let into_guest = format!("g:{}", guest_dst.display());
    let cp_in = spawn_ctl(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &src.display().to_string(),
            &into_guest,
        ],
        Stdio::null(),
    );
    let from_guest = format!("g:{}", src.display());
    let cp_out = spawn_ctl(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &from_guest,
            &host_dst.display().to_string(),
        ],
        Stdio::null(),
    );
    let cat = Echo::start("exec cat", &d.control, &["exec", "g", "--", "cat"], 1);
    let echo = Echo::start(
        "open diag echo",
        &d.control,
        &["open", "g", "diag", "echo"],
        2,
    );
    let mut viewer = spawn_ctl(&d.control, &["console", "g", "--follow"], Stdio::null());
    let mut viewer_out = viewer.stdout.take().expect("viewer stdout");
    let viewed = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = viewer_out.read_to_string(&mut text);
        text
    });
    copying(&d, "in-guest.bin", 4 << 20).await;
    copying(&d, "on-host.bin", 4 << 20).await;

    // An upgrade to a binary that cannot run: refused with the reason, nothing stops.
    let out = ctl_async(
        &d.control,
        &["daemon", "upgrade", "--binary", "/nonexistent/vstreamd"],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot run /nonexistent/vstreamd"), "{err}");
    let s = d.status().await;
    assert_eq!(s["daemon"]["generation"], 0, "{s:#}");

    // The upgrade itself, to the same binary.
    let before_upgrade = written.load(Ordering::Relaxed);
    let asked = Instant::now();
    let args = ["daemon", "upgrade"];
    let said = ok(&args, ctl_async(&d.control, &args).await);
    let took = asked.elapsed();
    assert!(
        said.contains(&format!("pid {pid}")) && said.contains("generation 1"),
        "{said}"
    );
    println!("upgrade: `vstreamctl daemon upgrade` answered by the successor after {took:?}");

    // Everything goes on: the copies complete whole, the echoes lose and repeat nothing.
    let (cp_in, cp_out) = common::blocking(move || {
        (
            cp_in.wait_with_output().expect("cp in"),
            cp_out.wait_with_output().expect("cp out"),
        )
    })
    .await;
    for (what, out) in [
        ("cp into the guest", &cp_in),
        ("cp out of the guest", &cp_out),
    ] {
        assert!(
            out.status.success(),
            "{what}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log()
        );
    }
    let sum = sha256(&src);
    assert_eq!(sha256(&guest_dst), sum, "the copy into the guest");
    assert_eq!(sha256(&host_dst), sum, "the copy out of the guest");
    // Some more echo after the upgrade, then the ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().expect("tmp");
    let (cat_dir, echo_dir) = (dir.path().join("cat"), dir.path().join("echo"));
    std::fs::create_dir_all(&cat_dir).expect("dir");
    std::fs::create_dir_all(&echo_dir).expect("dir");
    let (gap_cat, gap_echo) =
        common::blocking(move || (cat.finish(&cat_dir), echo.finish(&echo_dir))).await;
    println!(
        "upgrade: longest pause seen by the echoes: exec cat {} ms, diag echo {} ms",
        gap_cat.as_millis(),
        gap_echo.as_millis()
    );

    // The console viewer is still attached: it prints every line the guest writes, across the
    // upgrade, in order, with nothing twice and nothing missing (the console's own connection
    // is carried, not reconnected).
    let after = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        viewer.try_wait().expect("viewer").is_none(),
        "the console viewer ended"
    );
    viewer.kill().expect("kill viewer");
    let _ = viewer.wait();
    let lines = viewed_lines(&viewed.join().expect("viewer"));
    assert!(
        lines.windows(2).all(|w| w[0] < w[1]),
        "out of order or twice: {lines:?}"
    );
    assert!(
        lines.first().is_some_and(|f| *f <= before_upgrade)
            && lines.last().is_some_and(|l| *l > after),
        "the viewer saw {:?}..{:?}, the upgrade was at line {before_upgrade}, over at {after}",
        lines.first(),
        lines.last()
    );
    let missing = (lines[0]..=lines[lines.len() - 1]).count() - lines.len();
    println!(
        "upgrade: the console viewer missed {missing} of {} lines",
        lines.len() + missing
    );
    let gaps: Vec<_> = lines.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert_eq!(
        missing, 0,
        "the console viewer skipped lines between {gaps:?}"
    );
    // The log holds every line from the first, and no mark of an interrupted capture.
    let log = std::fs::read_to_string(d.path("state/g/hvc0.log")).expect("console log");
    assert!(!log.contains("capture interrupted"), "{log}");
    let complete = &log[..log.rfind('\n').map_or(0, |end| end + 1)];
    let logged = viewed_lines(complete);
    let first_wrong = logged.iter().zip(1..).find(|(n, i)| **n != *i);
    assert!(
        first_wrong.is_none() && logged.len() as u64 >= after,
        "the console log is not every line from 1 to at least {after}: first wrong (line, place) {first_wrong:?} of {}",
        logged.len()
    );

    // The session was resumed, not restarted; the same pid runs the next generation; and a
    // new command works.
    let s = d.wait_connected("g").await;
    assert_eq!(session_restarts(&s), 0, "{s:#}");
    assert_eq!(s["daemon"]["pid"].as_u64(), Some(pid));
    assert_eq!(s["daemon"]["generation"], 1);
    let args = ["exec", "g", "--", "echo", "still here"];
    assert_eq!(
        ok(&args, ctl_async(&d.control, &args).await),
        "still here\n"
    );
    assert!(
        d.log().contains("took over from the previous vstreamd"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn a_state_that_does_not_check_out_is_refused_and_the_daemon_serves() {
    for state in ["999", "not a number"] {
        let d = Options::new()
            .env(vstream_host::upgrade::STATE_ENV, state)
            .start();
        let s = d.status().await;
        assert_eq!(s["daemon"]["generation"], 0, "{s:#}");
        assert!(
            d.log().contains("upgrade state refused, starting afresh"),
            "{}",
            d.log()
        );
    }
}

/// What `systemctl reload` does with `ExecReload=/bin/kill -HUP $MAINPID`.
#[tokio::test]
async fn sighup_upgrades_in_place() {
    let d = Options::new().start();
    let pid = d.pid().to_string();
    let sent = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let s = d
        .wait_for("generation 1", |s| s["daemon"]["generation"] == 1)
        .await;
    assert_eq!(s["daemon"]["pid"].to_string(), pid);
}
