//! End-to-end test of a vstreamd crash in a real guest: vstreamd is killed with SIGKILL during a
//! 64 MiB `vstreamctl cp` into the guest, then during one out of it, and started again. Each
//! time the guest (vstream-agent on the virtio-serial port, whose QEMU chardev the new vstreamd
//! reopens, and on the PCI 16550) must be connected again within 2 s of the new daemon's start;
//! the copy must fail with a clear error and a non-zero status and leave no short file under
//! its destination's name; the console log must go on after a marker; new copies both ways must
//! come through with equal sha256.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::lab::testing::{self, ctl_ok, qga_bytes, sh};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const BIG: usize = 64 << 20;
/// The copy is cut once this much of it went through vstreamd.
const CUT_AFTER: u64 = 4 << 20;

fn sha256_host(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

fn connected(lab: &Lab, status: &Value) -> bool {
    lab::guest_status(status, lab.name()).is_some_and(|g| g["connected"] == true)
}

/// Starts `vstreamctl cp FROM TO`, waits until `moved(status)` says enough went through, and
/// kills vstreamd; the copy's outcome.
fn cut_copy(lab: &Lab, from: &str, to: &str, moved: impl Fn(&Value) -> bool) -> Output {
    let mut cp: Child = lab
        .ctl_command()
        .args(["cp", "--via", "qga", from, to])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstreamctl cp");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = lab.status().expect("status");
        if moved(&status) {
            break;
        }
        assert!(
            cp.try_wait().expect("cp").is_none(),
            "cp {from} {to} ended before vstreamd was killed"
        );
        assert!(
            Instant::now() < deadline,
            "cp {from} {to} did not get going"
        );
        thread::sleep(Duration::from_millis(20));
    }
    lab.kill_daemon().expect("kill -9 vstreamd");
    let out = cp.wait_with_output().expect("cp");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("crash e2e: cp {from} {to} after kill -9: {}", err.trim());
    assert!(!out.status.success(), "cp must fail: {err}");
    assert!(
        err.contains("vstreamd stopped during the command"),
        "the error must say why: {err}"
    );
    out
}

/// Restarts vstreamd; the time until the guest is connected and until every mux transport is
/// up, from the new daemon's start.
fn restart(lab: &Lab) -> (Duration, Duration) {
    let start = Instant::now();
    lab.restart_daemon().expect("restart vstreamd");
    let mut connected_after = None;
    loop {
        if let Ok(s) = lab.status() {
            if connected(lab, &s) {
                connected_after.get_or_insert(start.elapsed());
            }
            if lab.mux_transports_up(&s) {
                let all = start.elapsed();
                return (connected_after.unwrap_or(all), all);
            }
        }
        assert!(
            start.elapsed() < UP_TIMEOUT,
            "the guest did not come back after the restart"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn assert_back_within_2s(lab: &Lab, what: &str) {
    let (connected, all) = restart(lab);
    eprintln!(
        "crash e2e: {what}: guest connected {} ms after the new vstreamd's start, every transport up after {} ms",
        connected.as_millis(),
        all.as_millis()
    );
    assert!(
        connected < Duration::from_secs(2),
        "{what}: guest back after {connected:?}"
    );
}

#[test]
fn a_killed_vstreamd_during_copies_in_a_guest() {
    if !lab::e2e_enabled("a_killed_vstreamd_during_copies_in_a_guest") {
        return;
    }
    // The copies live in the guest's RAM (tmpfs): 64 MiB in, a partial one, one back.
    let lab = Lab::boot(LabOptions {
        memory_mib: 768,
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
    let sum = sha256_host(&src);
    let src_arg = src.to_str().expect("utf-8");
    let remote = format!("{name}:/tmp/big.bin");
    // sha256sum's line (the console may also show the typed command again).
    let guest_sum = format!("{sum}  /tmp/big.bin");

    // 1. Into the guest.
    cut_copy(&lab, src_arg, &remote, |s| {
        qga_bytes(&lab, s).1 >= CUT_AFTER
    });
    assert_back_within_2s(&lab, "cut copy into the guest");
    let listing = sh(&lab, "ls /tmp");
    assert!(
        !listing.split_whitespace().any(|f| f == "big.bin"),
        "a short file under the destination's name in the guest: {listing}"
    );
    assert!(
        listing.contains("big.bin.vstream-partial-"),
        "the cut copy is named partial in the guest: {listing}"
    );
    sh(&lab, "rm -f /tmp/big.bin.vstream-partial-*");
    let console = lab.console_log("hvc0");
    assert!(
        console.contains("[vstreamd: console capture interrupted at "),
        "no marker in the console log:\n{console}"
    );

    // A whole copy in, for the copy out.
    ctl_ok(
        &lab,
        &["cp", "--via", "qga", src_arg, &remote],
        Duration::from_secs(600),
    );
    let in_guest = sh(&lab, "sha256sum /tmp/big.bin");
    assert!(in_guest.contains(&guest_sum), "in the guest: {in_guest}");

    // 2. Out of the guest.
    let back = dir.join("big.back");
    let back_arg = back.to_str().expect("utf-8");
    cut_copy(&lab, &remote, back_arg, |s| {
        qga_bytes(&lab, s).0 >= CUT_AFTER
    });
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("big.back"))
        .collect();
    assert!(leftovers.is_empty(), "left on the host: {leftovers:?}");
    assert_back_within_2s(&lab, "cut copy out of the guest");

    // New copies both ways are whole.
    ctl_ok(
        &lab,
        &["cp", "--via", "qga", &remote, back_arg],
        Duration::from_secs(600),
    );
    assert_eq!(sha256_host(&back), sum, "back on the host");
    sh(&lab, "rm -f /tmp/big.bin");
    ctl_ok(
        &lab,
        &["cp", "--via", "qga", src_arg, &remote],
        Duration::from_secs(600),
    );
    let in_guest = sh(&lab, "sha256sum /tmp/big.bin");
    assert!(in_guest.contains(&guest_sum), "in the guest: {in_guest}");
    let _ = std::fs::remove_dir_all(&dir);
}
