//! End-to-end test of a live upgrade in a real guest: `vstreamctl daemon upgrade` in the middle
//! of a 256 MiB `vstreamctl cp` into the guest, while `vstreamctl exec GUEST -- cat` echoes
//! random data and `vstreamctl console GUEST --follow` watches hvc0. The copy must complete
//! with the same sha256 in the guest, the echo must return exactly what was sent, the console
//! viewer must go on (every tick, in order, nothing twice; no marker in the console log), the guest's session must be resumed (no
//! restart), and commands must work afterwards. Before it, an upgrade to a binary that cannot
//! run must fail with the reason and disturb nothing.

use std::io::Read;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use xtask::lab::testing::{self, bg, ctl, ctl_ok, qga_bytes, sh};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const BIG: usize = 256 << 20;
/// The upgrade comes once this much of the copy went through vstreamd.
const UPGRADE_AFTER: u64 = 16 << 20;
/// Echoed through `cat` in the guest.
const ECHO: usize = 4 << 20;

fn spawn(lab: &Lab, args: &[&str]) -> Child {
    lab.ctl_command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstreamctl")
}

/// The numbers of the `tick-N` lines a console viewer printed. Anywhere in a line: the echo of
/// commands typed into the same console interleaves with them (`echotick-582`).
fn ticks(text: &str) -> Vec<u64> {
    text.split("tick-")
        .skip(1)
        .filter_map(|rest| {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..digits].parse().ok()
        })
        .collect()
}

#[test]
fn a_live_upgrade_during_a_copy_a_shell_and_a_console_viewer() {
    if !lab::e2e_enabled("a_live_upgrade_during_a_copy_a_shell_and_a_console_viewer") {
        return;
    }
    // The copy lives in the guest's RAM (tmpfs).
    let lab = Lab::boot(LabOptions {
        memory_mib: 1024,
        ..LabOptions::default()
    })
    .expect("boot");
    lab.wait_for("the agent", UP_TIMEOUT, |s| lab.mux_transports_up(s))
        .expect("agent up");
    let name = lab.name().to_owned();
    let dir = lab.paths().dir.join("files");
    std::fs::create_dir_all(&dir).expect("dir");
    let src = dir.join("big.src");
    testing::write_random_file(&src, BIG);
    let sum = testing::sha256_file(&src);
    let remote = format!("{name}:/tmp/big.bin");

    // The guest writes a numbered line to hvc0 every 100 ms; a viewer follows the console.
    bg(
        &lab,
        "ticks",
        "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo tick-$i > /dev/hvc0; sleep 0.1; done",
    );
    let mut viewer = spawn(&lab, &["console", &name, "--follow"]);
    let mut viewer_out = viewer.stdout.take().expect("viewer stdout");
    let viewed = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = viewer_out.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });

    // The copy, then the echo once the copy is under way.
    let cp = spawn(
        &lab,
        &["cp", "--via", "qga", src.to_str().expect("utf-8"), &remote],
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while qga_bytes(&lab, &lab.status().expect("status")).1 < UPGRADE_AFTER {
        assert!(Instant::now() < deadline, "the copy did not get going");
        thread::sleep(Duration::from_millis(20));
    }
    let input: Vec<u8> = {
        let path = dir.join("echo.src");
        testing::write_random_file(&path, ECHO);
        std::fs::read(&path).expect("echo input")
    };
    let mut cat = lab.ctl_command();
    cat.args(["exec", &name, "--", "cat"]);
    let echo = {
        let input = input.clone();
        thread::spawn(move || {
            let mut child = cat
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn exec cat");
            let mut stdin = child.stdin.take().expect("stdin");
            let writer = thread::spawn(move || {
                use std::io::Write;
                // Paced, so that the echo is still going when the upgrade comes.
                for chunk in input.chunks(64 * 1024) {
                    if stdin.write_all(chunk).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            });
            let out = child.wait_with_output().expect("exec cat");
            writer.join().expect("writer");
            out
        })
    };
    thread::sleep(Duration::from_millis(500));

    // An upgrade to a binary that cannot run: refused with the reason; nothing stops.
    let out = ctl(
        &lab,
        &["daemon", "upgrade", "--binary", "/nonexistent/vstreamd"],
        &[],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot run /nonexistent/vstreamd"), "{err}");

    // The upgrade.
    let status = lab.status().expect("status");
    let pid = status["daemon"]["pid"].as_u64().expect("pid");
    let log_before = lab.console_log("hvc0");
    let at_tick = ticks(&log_before).last().copied().unwrap_or(0);
    let asked = Instant::now();
    let said = ctl_ok(&lab, &["daemon", "upgrade"], Duration::from_secs(60));
    let answered = asked.elapsed();
    assert!(
        said.contains(&format!("pid {pid}")) && said.contains("generation 1"),
        "{said}"
    );
    let mut back = None;
    while back.is_none() {
        if lab.status().is_ok_and(|s| lab.mux_transports_up(&s)) {
            back = Some(asked.elapsed());
        }
        assert!(asked.elapsed() < UP_TIMEOUT, "the guest did not come back");
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "upgrade e2e: the successor answered after {} ms; every transport up again after {} ms",
        answered.as_millis(),
        back.unwrap_or_default().as_millis()
    );

    // Everything completes whole.
    let cp = cp.wait_with_output().expect("cp");
    assert!(
        cp.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&cp.stderr)
    );
    let in_guest = sh(&lab, "sha256sum /tmp/big.bin");
    assert!(
        in_guest.contains(&format!("{sum}  /tmp/big.bin")),
        "in the guest: {in_guest}"
    );
    let echoed = echo.join().expect("echo");
    assert!(
        echoed.status.success(),
        "exec cat: {}",
        String::from_utf8_lossy(&echoed.stderr)
    );
    assert!(
        echoed.stdout == input,
        "exec cat returned {} bytes of {}",
        echoed.stdout.len(),
        input.len()
    );

    // The viewer went on past the upgrade, in order, nothing twice.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ticks(&lab.console_log("hvc0")).last().copied().unwrap_or(0) < at_tick + 30 {
        assert!(Instant::now() < deadline, "no ticks after the upgrade");
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    assert!(
        viewer.try_wait().expect("viewer").is_none(),
        "the viewer ended"
    );
    let _ = viewer.kill();
    let _ = viewer.wait();
    let seen = ticks(&viewed.join().expect("viewer"));
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order or twice: {seen:?}"
    );
    assert!(
        seen.first().is_some_and(|f| *f <= at_tick)
            && seen.last().is_some_and(|l| *l > at_tick + 20),
        "the viewer saw {:?}..{:?}; the upgrade was at tick {at_tick}",
        seen.first(),
        seen.last()
    );
    let missing = (seen[0]..=seen[seen.len() - 1]).count() - seen.len();
    eprintln!(
        "upgrade e2e: the console viewer missed {missing} of {} ticks",
        seen.len() + missing
    );
    let gaps: Vec<_> = seen.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert_eq!(missing, 0, "the viewer skipped ticks between {gaps:?}");
    // The console's connection was carried: the log got no mark of an interrupted capture.
    let marks = |log: &str| log.matches("console capture interrupted").count();
    let log_after = lab.console_log("hvc0");
    assert_eq!(marks(&log_after), marks(&log_before), "{log_after}");

    // Resumed, not restarted; the same pid at the next generation; the shell works.
    let status = lab.status().expect("status");
    let g = lab::guest_status(&status, &name).expect("guest");
    assert_eq!(g["stats"]["session_restarts"], 0, "{g:#}");
    assert_eq!(status["daemon"]["generation"], 1);
    assert_eq!(status["daemon"]["pid"].as_u64(), Some(pid));
    let out = ctl_ok(
        &lab,
        &["exec", &name, "--", "echo", "still here"],
        Duration::from_secs(60),
    );
    assert_eq!(out, "still here\n");
    let _ = std::fs::remove_dir_all(&dir);
}
