//! End-to-end test: the agent never waits for entropy (vstream issue 7). The guest has no
//! virtio-rng, a CPU without RDRAND (`-cpu qemu64`) and no random device of ours (no
//! `random-raw` port, `vstream.random=0`), so its kernel's CRNG stays uninitialised long after
//! boot, as on many real hosts. `/init` starts the agent first; it must answer on the raw QGA port
//! `org.qemu.guest_agent.0` within 1 s, answer the usual QGA commands, and bring its mux session
//! to vstreamd up, all while the CRNG is provably not initialised. Never skipped silently:
//! without QEMU it fails, unless VSTREAM_SKIP_E2E=1 is set.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xtask::image::AGENT_START_MARKER;
use xtask::lab::testing::ctl_ok;
use xtask::lab::{self, Lab, LabOptions};
use xtask::qemu::extra_virtio_port;
use xtask::qga_lab::{self, QgaConn, QGA_PORT, UP_TIMEOUT};

const GUEST: &str = "noentropy";

/// What the guest kernel logs once its CRNG is initialised.
const CRNG_DONE: &str = "crng init done";

/// The promise: the agent's first QGA answer, counted from its start.
const FIRST_ANSWER: Duration = Duration::from_secs(1);

/// Waits for `needle` in QEMU's copy of ttyS0, polling often: returns when it was seen.
fn seen_on_console(lab: &Lab, needle: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let log = lab.raw_console_log();
        if log.contains(needle) {
            return Instant::now();
        }
        assert!(!log.contains("Kernel panic"), "the guest kernel panicked");
        assert!(lab.is_running(), "QEMU ended before {needle:?}");
        assert!(
            Instant::now() < deadline,
            "{needle:?} never showed up on ttyS0"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Polls vstreamd's status until the agent's mux session is up (handshake done, not merely a
/// connected socket): how long after `since`.
fn mux_session_up(lab: &Lab, since: Instant) -> Duration {
    let deadline = since + UP_TIMEOUT;
    loop {
        if lab.status().is_ok_and(|s| lab.mux_transports_up(&s)) {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the agent's mux session was not up within {UP_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads `count` bytes of `/dev/random` through the agent. Its `guest-file-open` opens with
/// O_NONBLOCK, and the kernel refuses such a read with EAGAIN (0 bytes here) exactly while the
/// CRNG is not initialised; once it is, the read returns bytes.
fn dev_random_bytes(conn: &mut QgaConn) -> u64 {
    let handle = conn
        .call(&json!({"execute": "guest-file-open",
            "arguments": {"path": "/dev/random", "mode": "r"}}))
        .expect("guest-file-open /dev/random");
    let read = conn
        .call(&json!({"execute": "guest-file-read",
            "arguments": {"handle": handle, "count": 16}}))
        .expect("guest-file-read /dev/random");
    conn.call(&json!({"execute": "guest-file-close", "arguments": {"handle": handle}}))
        .expect("guest-file-close");
    read["count"].as_u64().expect("count")
}

/// The kernel's `entropy_avail` (256 once the CRNG is initialised), through the agent.
fn entropy_avail(conn: &mut QgaConn) -> u32 {
    let text = conn
        .read_small("/proc/sys/kernel/random/entropy_avail")
        .expect("entropy_avail");
    String::from_utf8_lossy(&text)
        .trim()
        .parse()
        .expect("a number")
}

/// The kernel log line saying the CRNG is ready, if it was printed.
fn crng_done_line(lab: &Lab) -> Option<String> {
    lab.raw_console_log()
        .lines()
        .find(|l| l.contains(CRNG_DONE))
        .map(|l| lab::strip_ansi(l).trim().to_owned())
}

#[test]
fn the_agent_answers_at_once_in_a_guest_whose_crng_is_not_initialised() {
    if !lab::e2e_enabled("the_agent_answers_at_once_in_a_guest_whose_crng_is_not_initialised") {
        return;
    }
    // The QGA port's socket lives in a directory of this test (the lab's own is made inside
    // `Lab::boot`).
    let dir = std::env::temp_dir().join(format!("vs-noent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ga_sock = dir.join("ga.sock");
    let options = LabOptions {
        cpu: Some("qemu64".into()),
        virtio_rng: false,
        // The agent's start is watched here, not after /init is done.
        wait_for_init: false,
        extra_qemu_args: extra_virtio_port("qga", &ga_sock, 2, QGA_PORT).expect("port"),
        extra_kernel_args: vec![
            "vstream.random=0".into(),
            format!("vstream.qga=port:{QGA_PORT}"),
        ],
        ..LabOptions::virtio_port_only().named(GUEST)
    };
    let lab = Lab::boot(options).unwrap_or_else(|e| panic!("{e}"));

    // From /init's line just before it starts the agent (seen within a few ms) to the agent's
    // answers to guest-sync-delimited and then guest-ping on the raw port.
    let started = seen_on_console(&lab, AGENT_START_MARKER, lab.options().boot_timeout);
    // The mux session's handshake with vstreamd, watched from the same start while the QGA
    // checks run.
    let (mut conn, mux_up, commands_done) = thread::scope(|scope| {
        let mux_watch = scope.spawn(|| mux_session_up(&lab, started));
        let no_answer = |e: std::io::Error| -> ! {
            panic!(
                "no answer on the raw QGA port {:?} after the agent's start: {e}",
                started.elapsed()
            )
        };
        let mut conn = QgaConn::direct(&ga_sock).unwrap_or_else(|e| no_answer(e));
        let pong = conn
            .call(&json!({"execute": "guest-ping"}))
            .unwrap_or_else(|e| no_answer(e));
        let first_answer = started.elapsed();
        let console_at_answer = lab.raw_console_log();
        assert_eq!(pong, json!({}));

        // The CRNG was not initialised when the agent answered: the kernel had not said so, and it
        // still refuses a non-blocking read of /dev/random (its readiness never goes back).
        let crng_ready_at_answer = console_at_answer.contains(CRNG_DONE);
        let random_bytes = dev_random_bytes(&mut conn);
        let avail = entropy_avail(&mut conn);
        eprintln!(
            "entropy e2e ({} accelerator, -cpu qemu64, no virtio-rng): agent start -> guest-ping answered on \
             {QGA_PORT} in {} ms; then /dev/random O_NONBLOCK read gave {random_bytes} bytes, entropy_avail {avail}",
            lab.accel(),
            first_answer.as_millis()
        );
        assert!(
            first_answer < FIRST_ANSWER,
            "the agent took {first_answer:?} from its start to answer guest-ping (at most {FIRST_ANSWER:?})"
        );
        assert!(
            !crng_ready_at_answer,
            "the kernel said {CRNG_DONE:?} before the agent answered: the test proves nothing"
        );
        assert_eq!(
            random_bytes, 0,
            "the guest's CRNG is initialised (entropy_avail {avail}): the test proves nothing"
        );

        // The same agent answers the usual QGA commands there, and its clock and files too.
        qga_lab::check_common_commands(GUEST, GUEST, &mut |cmd| {
            conn.request(cmd)
                .unwrap_or_else(|e| panic!("{GUEST} {cmd}: {e}"))
        });
        let guest_ns = conn
            .call(&json!({"execute": "guest-get-time"}))
            .expect("guest-get-time")
            .as_i64()
            .expect("nanoseconds");
        assert!(guest_ns > 0, "guest-get-time: {guest_ns}");
        let uptime = conn.read_small("/proc/uptime").expect("/proc/uptime");
        assert!(
            String::from_utf8_lossy(&uptime)
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok())
                .is_some_and(|s| s > 0.0),
            "/proc/uptime through guest-file-read: {uptime:?}"
        );
        let commands_done = started.elapsed();

        let mux_up = mux_watch.join().expect("the mux watcher panicked");
        (conn, mux_up, commands_done)
    });
    assert!(
        mux_up < FIRST_ANSWER,
        "the agent's mux session was up {mux_up:?} after its start (at most {FIRST_ANSWER:?})"
    );

    // The session answers through a qga channel.
    let reply: Value = serde_json::from_str(&ctl_ok(
        &lab,
        &["agent", GUEST, r#"{"execute":"guest-ping"}"#],
        Duration::from_secs(60),
    ))
    .expect("vstreamctl agent prints JSON");
    assert_eq!(reply, json!({"return": {}}), "guest-ping through the mux");

    // Nothing of ours fed the pool, and the agent never restarted.
    let console = lab.raw_console_log();
    assert!(
        !console.contains("random: fed the kernel's pool"),
        "the agent fed the pool despite vstream.random=0"
    );
    assert!(
        !console.contains("vstream-agent exited"),
        "the agent exited:\n{console}"
    );
    let still_unready = dev_random_bytes(&mut conn) == 0;
    eprintln!(
        "entropy e2e: QGA commands done {} ms, mux session up {} ms after the agent's start; \
         CRNG still not initialised then: {still_unready}; kernel log: {}",
        commands_done.as_millis(),
        mux_up.as_millis(),
        crng_done_line(&lab).unwrap_or_else(|| format!("no {CRNG_DONE:?} yet"))
    );
    drop(conn);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
