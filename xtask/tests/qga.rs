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
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xtask::lab::testing::{self, ctl_ok};
use xtask::lab::{self, Lab};
use xtask::qga_lab::{QgaLab, UP_TIMEOUT};

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
    let pid = ret(
        lab,
        guest,
        json!({"execute": "guest-exec", "arguments": {
            "path": path, "arg": args, "capture-output": true}}),
    )["pid"]
        .as_i64()
        .expect("pid");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = ret(
            lab,
            guest,
            json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        );
        if st["exited"] == true {
            let out = st["out-data"].as_str().map(decode_b64).unwrap_or_default();
            return (st["exitcode"].as_i64().unwrap_or(-1), out);
        }
        assert!(Instant::now() < deadline, "{guest}: {path} never finished");
        thread::sleep(Duration::from_millis(200));
    }
}

fn decode_b64(s: &str) -> Vec<u8> {
    let v = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let body: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for q in body.chunks(4) {
        let n = q
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (v(*c) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..q.len()]);
    }
    out
}

fn sha256_host(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
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

fn make_file(path: &Path, len: usize) {
    let mut data = Vec::with_capacity(len);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("write");
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
    make_file(&src, len);
    let remote = format!("/tmp/{guest}.bin");
    let limit = Duration::from_secs(600);
    let t = Instant::now();
    ctl_ok(
        lab,
        &[
            "cp",
            src.to_str().expect("utf-8"),
            &format!("{guest}:{remote}"),
            "--chunk",
            &chunk.to_string(),
        ],
        limit,
    );
    let up = t.elapsed();
    let sum = sha256_host(&src);
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
            &format!("{guest}:{remote}"),
            back.to_str().expect("utf-8"),
            "--chunk",
            &chunk.to_string(),
        ],
        limit,
    );
    let down = t.elapsed();
    assert_eq!(sha256_host(&back), sum, "{guest}: back on the host");
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

/// The checks every route passes.
fn common_checks(lab: &Lab, guest: &str) {
    assert_eq!(ret(lab, guest, json!({"execute": "guest-ping"})), json!({}));
    assert_eq!(
        ret(
            lab,
            guest,
            json!({"execute": "guest-sync", "arguments": {"id": 4_242_424_242i64}})
        ),
        json!(4_242_424_242i64)
    );
    let info = ret(lab, guest, json!({"execute": "guest-info"}));
    assert!(info["supported_commands"]
        .as_array()
        .expect("commands")
        .iter()
        .any(|c| c["name"] == "guest-file-open"));
    let host = ret(lab, guest, json!({"execute": "guest-get-host-name"}));
    assert_eq!(host["host-name"], "qga", "{guest}");
    let os = ret(lab, guest, json!({"execute": "guest-get-osinfo"}));
    assert_eq!(os["machine"], "x86_64", "{guest}: {os}");
    assert!(
        os["kernel-release"]
            .as_str()
            .is_some_and(|r| r.starts_with("6.1.")),
        "{guest}: {os}"
    );
    let ifs = ret(
        lab,
        guest,
        json!({"execute": "guest-network-get-interfaces"}),
    );
    assert!(
        ifs.as_array()
            .expect("list")
            .iter()
            .any(|i| i["name"] == "lo"),
        "{guest}: {ifs}"
    );
    let e = agent(lab, guest, &json!({"execute": "guest-no-such-command"}));
    assert_eq!(e["error"]["class"], "CommandNotFound", "{guest}: {e}");
    let e = agent(
        lab,
        guest,
        &json!({"execute": "guest-file-close", "arguments": {"handle": 31_337}}),
    );
    assert_eq!(
        e["error"]["desc"], "handle '31337' has not been found",
        "{guest}: {e}"
    );
    let (code, out) = guest_exec(lab, guest, "sh", &["-c", "echo $((6 * 7)); exit 3"]);
    assert_eq!((code, out), (3, b"42\n".to_vec()), "{guest}");
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
        common_checks(lab, guest);
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
