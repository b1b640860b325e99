//! End-to-end tests of the qga device in a real guest: the same host-side checks (vstreamctl
//! agent, cp with checksums, exec, errors) against three routes into one guest:
//!
//! | vstreamd guest | route | guest side |
//! |---|---|---|
//! | `qga` | a `qga` channel of the multiplexer (virtio port `org.vstream.0`) | vstream-agent |
//! | `qga-raw` | raw `qga` transport, virtio port `org.vstream.qga.0` | vstream-agent (`vstream.qga=`) |
//! | `qga-ga` | raw `qga` transport, virtio port `org.qemu.guest_agent.0` | Debian's qemu-ga |
//!
//! The guest, its two extra virtio ports, vstreamd with the two raw transports and qemu-ga
//! come from `xtask::qga_lab` (shared with `cargo xtask bench-qga`). Then the guest is
//! rebooted and powered off through the agent. They never skip silently: without QEMU they
//! fail, unless VSTREAM_SKIP_E2E=1 is set.

use std::path::Path;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xtask::lab::testing::{self, ctl_ok};
use xtask::lab::{self, Lab};
use xtask::qga_lab::{self, QgaLab, UP_TIMEOUT};

/// Size of the big copy through vstream-agent (the qemu-ga copy is smaller: its JSON lexer
/// is slow under TCG).
const BIG: usize = 256 << 20;
const QEMU_GA_COPY: usize = 4 << 20;

/// Runs `vstreamctl ARGS` (stdin empty) within `timeout`.
fn ctl(lab: &Lab, args: &[&str], timeout: Duration) -> Output {
    testing::ctl(lab, args, &[], timeout)
}

/// `vstreamctl agent GUEST JSON`: the reply object.
fn agent(lab: &Lab, guest: &str, cmd: &Value) -> Value {
    let out = ctl(
        lab,
        &["agent", guest, &cmd.to_string()],
        Duration::from_secs(60),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        lab.dump_logs("no reply");
        panic!(
            "{guest} {cmd}: {e}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ret(lab: &Lab, guest: &str, cmd: Value) -> Value {
    let reply = agent(lab, guest, &cmd);
    match reply.get("return") {
        Some(v) => v.clone(),
        None => {
            lab.dump_logs("error reply");
            panic!("{guest} {cmd}: {reply}")
        }
    }
}

/// Runs a program in the guest through `guest-exec`; its exit code and stdout.
fn guest_exec(lab: &Lab, guest: &str, path: &str, args: &[&str]) -> (i64, Vec<u8>) {
    qga_lab::exec_via(guest, &mut |cmd| agent(lab, guest, cmd), path, args)
}

fn sha256_guest(lab: &Lab, guest: &str, path: &str) -> String {
    let (code, out) = guest_exec(lab, guest, "sha256sum", &[path]);
    assert_eq!(code, 0, "sha256sum {path} in the guest");
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

/// The agent's CPU time so far (user + system ticks of all its threads), read through the
/// mux channel's agent.
fn agent_ticks(lab: &Lab) -> u64 {
    let (code, out) = guest_exec(
        lab,
        "qga",
        "sh",
        &["-c", "cat /proc/$(cat /run/vstream-agent.pid)/stat"],
    );
    assert_eq!(code, 0, "the agent's /proc stat");
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let stat = String::from_utf8_lossy(&out);
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// A client of the agent's raw QGA port (QEMU's chardev, straight) asks for 32 MiB and hangs
/// up before the reply: the agent must neither spin on the port, which refuses writes and polls
/// as hung up while no client is connected, nor stop answering the next client.
fn a_client_that_hangs_up_before_its_reply_costs_the_guest_nothing(qga: &QgaLab) {
    let lab = &qga.lab;
    let (code, _) = guest_exec(
        lab,
        "qga",
        "dd",
        &["if=/dev/urandom", "of=/tmp/hangup.bin", "bs=1M", "count=32"],
    );
    assert_eq!(code, 0, "dd in the guest");
    let mut conn = qga_lab::QgaConn::direct(&qga.raw_sock).expect("the raw port");
    let handle = conn
        .call(&json!({"execute": "guest-file-open", "arguments": {"path": "/tmp/hangup.bin"}}))
        .expect("guest-file-open");
    conn.send(&json!({"execute": "guest-file-read",
        "arguments": {"handle": handle, "count": 32 << 20}}))
        .expect("guest-file-read");
    drop(conn);
    thread::sleep(Duration::from_secs(2));
    let before = agent_ticks(lab);
    thread::sleep(Duration::from_secs(5));
    let used = agent_ticks(lab) - before;
    // 100 ticks a second on one vCPU: a spinning thread takes about 500 here, the idle agent
    // (and the two guest-execs measuring it) a few.
    assert!(
        used < 100,
        "the agent used {used} ticks of CPU in 5 s after its client hung up"
    );
    let mut next = qga_lab::QgaConn::direct(&qga.raw_sock).expect("the next client is answered");
    assert_eq!(
        next.call(&json!({"execute": "guest-file-close", "arguments": {"handle": handle}}))
            .expect("guest-file-close"),
        json!({}),
        "the handle outlives the client that opened it"
    );
}

/// Copies `len` bytes host -> guest -> host through `guest`; checksums equal on both sides.
fn cp_both_ways(
    lab: &Lab,
    guest: &str,
    dir: &Path,
    len: usize,
    chunk: usize,
) -> (Duration, Duration) {
    let src = dir.join(format!("{guest}.src"));
    let back = dir.join(format!("{guest}.back"));
    testing::write_random_file(&src, len);
    let remote = format!("/tmp/{guest}.bin");
    let limit = Duration::from_secs(600);
    let t = Instant::now();
    ctl_ok(
        lab,
        &[
            "cp",
            "--via",
            "qga",
            src.to_str().expect("utf-8"),
            &format!("{guest}:{remote}"),
            "--chunk",
            &chunk.to_string(),
        ],
        limit,
    );
    let up = t.elapsed();
    let sum = testing::sha256_file(&src);
    assert_eq!(
        sha256_guest(lab, guest, &remote),
        sum,
        "{guest}: in the guest"
    );
    let t = Instant::now();
    ctl_ok(
        lab,
        &[
            "cp",
            "--via",
            "qga",
            &format!("{guest}:{remote}"),
            back.to_str().expect("utf-8"),
            "--chunk",
            &chunk.to_string(),
        ],
        limit,
    );
    let down = t.elapsed();
    assert_eq!(
        testing::sha256_file(&back),
        sum,
        "{guest}: back on the host"
    );
    let _ = guest_exec(lab, guest, "rm", &["-f", &remote]);
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&back);
    eprintln!(
        "qga e2e: cp {} MiB through {guest}: host->guest {:.1} s ({:.1} MiB/s), guest->host {:.1} s ({:.1} MiB/s)",
        len >> 20,
        up.as_secs_f64(),
        (len >> 20) as f64 / up.as_secs_f64(),
        down.as_secs_f64(),
        (len >> 20) as f64 / down.as_secs_f64()
    );
    (up, down)
}

#[test]
fn qga_through_vstream_agent_and_qemu_ga_in_a_guest() {
    if !lab::e2e_enabled("qga_through_vstream_agent_and_qemu_ga_in_a_guest") {
        return;
    }
    // The 256 MiB copy lives in the guest's RAM (tmpfs).
    let qga = QgaLab::boot("qga", 1024).expect("boot");
    let lab = &qga.lab;
    let dir = qga.dir.clone();

    // qemu-ga, started through vstream-agent.
    qga.start_qemu_ga().expect("qemu-ga");

    for guest in ["qga", "qga-raw", "qga-ga"] {
        qga_lab::check_common_commands(guest, "qga", &mut |cmd| agent(lab, guest, cmd));
    }
    let info = ret(lab, "qga-ga", json!({"execute": "guest-info"}));
    assert!(
        info["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.")),
        "the real qemu-ga answers on qga-ga: {info}"
    );

    // Copies with equal checksums on both sides.
    let host_dir = dir.join("files");
    std::fs::create_dir_all(&host_dir).expect("dir");
    cp_both_ways(lab, "qga-ga", &host_dir, QEMU_GA_COPY, 64 << 10);
    cp_both_ways(lab, "qga", &host_dir, BIG, 1 << 20);
    cp_both_ways(lab, "qga-raw", &host_dir, 16 << 20, 1 << 20);
    a_client_that_hangs_up_before_its_reply_costs_the_guest_nothing(&qga);

    // Time: the guest clock set to the host's (then within a second of it), and from the RTC.
    let out = ctl_ok(lab, &["time-sync", "qga"], Duration::from_secs(60));
    assert!(out.starts_with("qga: clock was "), "{out}");
    let guest_ns = ret(lab, "qga", json!({"execute": "guest-get-time"}))
        .as_i64()
        .expect("time");
    let host_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    assert!(
        (guest_ns - host_ns).abs() < 2_000_000_000,
        "guest clock {guest_ns} vs host {host_ns} after time-sync"
    );
    assert_eq!(
        ret(lab, "qga-raw", json!({"execute": "guest-set-time"})),
        json!({}),
        "hwclock --hctosys semantics through /dev/rtc0"
    );

    // Reboot through vstream-agent: the guest comes back in the same QEMU (PID 1 is a script:
    // the agent syncs and calls reboot(2)).
    let booted_before = lab
        .raw_console_log()
        .matches("vstream-lab: init done")
        .count();
    ctl_ok(lab, &["reboot", "qga"], Duration::from_secs(30));
    let deadline = Instant::now() + UP_TIMEOUT;
    while lab
        .raw_console_log()
        .matches("vstream-lab: init done")
        .count()
        <= booted_before
    {
        assert!(lab.is_running(), "QEMU ended on a reboot");
        assert!(
            Instant::now() < deadline,
            "the guest did not come back after reboot"
        );
        thread::sleep(Duration::from_millis(250));
    }
    lab.wait_for("the agent after the reboot", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .expect("agent back");
    assert_eq!(
        ret(lab, "qga-raw", json!({"execute": "guest-ping"})),
        json!({})
    );

    // Power off through the raw port: QEMU exits.
    ctl_ok(lab, &["shutdown", "qga-raw"], Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab.is_running() {
        assert!(
            Instant::now() < deadline,
            "QEMU still runs after guest-shutdown"
        );
        thread::sleep(Duration::from_millis(250));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
