//! End-to-end test of the random device in a real guest: the agent feeds the guest kernel's pool
//! through the `random` channel, and a stock `rngd -r` reads a raw virtio-serial port whose host
//! side is a vstreamd transport of kind `random-raw`, within the guest's budget. Never skipped
//! silently: without QEMU it fails, unless VSTREAM_SKIP_E2E=1 is set.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::lab::testing::exec_sh;
use xtask::lab::{self, guest_status, Lab, LabOptions};

/// From QEMU's start to the agent's transport being up, under TCG.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// The raw port's name in the guest (`/sys/class/virtio-ports/*/name`).
const RAW_PORT: &str = "org.vstream.random.0";

/// The guest's budget in this test.
const RATE: u64 = 32 * 1024;

fn raw_transport(status: &Value, guest: &str) -> Option<Value> {
    guest_status(status, guest)?["transports"]
        .as_array()?
        .iter()
        .find(|t| t["kind"] == "random-raw")
        .cloned()
}

fn raw_bytes(lab: &Lab) -> u64 {
    let s = lab.status().unwrap_or_else(|e| panic!("{e}"));
    raw_transport(&s, lab.name())
        .and_then(|t| t["bytes_out"].as_u64())
        .unwrap_or_else(|| panic!("no random-raw transport in {s:#}"))
}

#[test]
fn the_agent_feeds_the_kernel_and_rngd_reads_the_raw_port() {
    if !lab::e2e_enabled("the_agent_feeds_the_kernel_and_rngd_reads_the_raw_port") {
        return;
    }
    // The raw port: one more virtserialport on the lab's virtio-serial bus, its chardev a
    // socket vstreamd connects to. (The lab's own directory is made inside `Lab::boot`, so the
    // socket lives in a directory of this test.)
    let dir = tempfile_dir();
    let sock = dir.join("random.sock");
    let options = LabOptions {
        extra_qemu_args: vec![
            "-chardev".into(),
            format!("socket,id=rndraw,path={},server=on,wait=off", sock.display()),
            "-device".into(),
            format!("virtserialport,bus=vser0.0,chardev=rndraw,id=rndraw,name={RAW_PORT}"),
        ],
        extra_config: format!(
            "\n[[guest.transport]]\nkind = \"random-raw\"\nname = \"rng\"\naddress = \"unix:{}\"\n\n\
             [guest.random]\nrate = {RATE}\nburst = {RATE}\n",
            sock.display()
        ),
        ..LabOptions::virtio_port_only().named("random")
    };
    let lab = Lab::boot(options).unwrap_or_else(|e| panic!("{e}"));
    lab.wait_for("the agent's transport to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // 1. The agent fed the guest kernel through the channel (RNDADDENTROPY succeeded: it logs
    //    the pool's level afterwards, and would log an error and stop otherwise).
    lab.wait_for_console(
        "ttyS0",
        "random: fed the kernel's pool at start",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let log = lab.guest_console_log();
    assert!(
        !log.contains("cannot feed the kernel's entropy pool"),
        "the agent could not feed the pool:\n{log}"
    );
    let s = lab.status().unwrap_or_else(|e| panic!("{e}"));
    let dev = &guest_status(&s, lab.name()).expect("guest")["devices"]["random"];
    assert!(dev["channel_bytes"].as_u64().unwrap_or(0) >= 64, "{dev}");
    assert_eq!(dev["rate"], RATE, "{dev}");
    let line = log
        .lines()
        .find(|l| l.contains("random: fed the kernel's pool at start"))
        .unwrap_or_default();
    println!("agent: {}", lab::strip_ansi(line).trim());

    // 2. Nobody reads the raw port yet: vstreamd's writes stop once the socket's buffer is full
    //    (QEMU takes nothing from a port the guest has not opened).
    lab.wait_for("the random-raw transport to be up", UP_TIMEOUT, |s| {
        raw_transport(s, lab.name()).is_some_and(|t| t["state"] == "up")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = raw_bytes(&lab);
    let plateau = loop {
        thread::sleep(Duration::from_secs(3));
        let now = raw_bytes(&lab);
        if now == last {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the raw port kept taking bytes with no reader ({now} bytes)"
        );
        last = now;
    };
    println!("raw port without a reader: stalled at {plateau} bytes (the socket buffer)");

    // 3. A plain reader as fast as the guest can: the budget holds end to end. Measured on the
    //    host side (what vstreamd writes while the guest drains the port) over 10 s, from 2 s
    //    into the read, when the socket's backlog and the burst are gone.
    let port_of = format!(
        "for p in /sys/class/virtio-ports/*; do \
           [ \"$(cat $p/name)\" = {RAW_PORT} ] && dev=/dev/${{p##*/}}; done; \
         [ -c \"$dev\" ] || {{ echo no port {RAW_PORT} >&2; exit 1; }}; "
    );
    let reader = {
        let script = format!("{port_of} timeout 14 cat $dev | wc -c");
        let lab = &lab;
        thread::scope(|scope| {
            let cat = scope.spawn(move || exec_sh(lab, &script));
            thread::sleep(Duration::from_secs(3));
            let (t0, b0) = (Instant::now(), raw_bytes(lab));
            thread::sleep(Duration::from_secs(10));
            let (t1, b1) = (Instant::now(), raw_bytes(lab));
            let out = cat.join().expect("reader");
            let read: u64 = out.trim().parse().unwrap_or(0);
            ((b1 - b0) as f64 / (t1 - t0).as_secs_f64(), read)
        })
    };
    let (rate, read) = reader;
    let error = (rate - RATE as f64) / RATE as f64;
    println!(
        "cat in the guest: read {read} bytes in 14 s; vstreamd wrote {rate:.0} B/s meanwhile \
         (budget {RATE} B/s, {:+.1}%)",
        error * 100.0
    );
    assert!(
        error.abs() < 0.10,
        "{rate:.0} B/s against a budget of {RATE}"
    );

    // 4. A stock rngd reads the port and feeds the kernel. (It runs in its own session, and the
    //    command waits a moment: the tty device ends what is left of a command's session when
    //    the command exits.)
    let before = raw_bytes(&lab);
    let out = exec_sh(
        &lab,
        &format!(
            "{port_of} setsid rngd -f -r $dev -n 1 -d 1 </dev/null >/tmp/rngd.log 2>&1 & \
             echo $! >/run/rngd.pid; \
             sleep 1; kill -0 $(cat /run/rngd.pid) || {{ cat /tmp/rngd.log >&2; exit 1; }}; \
             echo $dev"
        ),
    );
    let port = out.trim().to_owned();
    println!("rngd -r {port} started in the guest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while raw_bytes(&lab) < before + 2 * RATE {
        assert!(
            Instant::now() < deadline,
            "rngd read nothing from {port}: still {} bytes",
            raw_bytes(&lab)
        );
        thread::sleep(Duration::from_millis(250));
    }
    let (t0, b0) = (Instant::now(), raw_bytes(&lab));
    thread::sleep(Duration::from_secs(10));
    let (t1, b1) = (Instant::now(), raw_bytes(&lab));
    let rate = (b1 - b0) as f64 / (t1 - t0).as_secs_f64();
    // rngd takes what it can check and credit (FIPS 140-2 on every 2500-byte block, one
    // RNDADDENTROPY per 64 bytes): under TCG that is below the budget, and never above it.
    println!(
        "rngd in the guest took {rate:.0} B/s from the raw port over {:.1} s (budget {RATE} B/s)",
        (t1 - t0).as_secs_f64()
    );
    assert!(
        rate >= 1024.0 && rate <= RATE as f64 * 1.1,
        "rngd's rate {rate:.0} B/s against a budget of {RATE} B/s"
    );

    // rngd is still running (it exits when its source fails FIPS 140-2 too often or cannot
    // write to the kernel) and said nothing alarming.
    let out = exec_sh(
        &lab,
        "kill -0 $(cat /run/rngd.pid) && echo alive; cat /proc/sys/kernel/random/entropy_avail; \
         cat /tmp/rngd.log",
    );
    let text = out;
    println!("guest: {}", text.replace('\n', " | "));
    assert!(text.starts_with("alive\n"), "rngd is gone: {text}");
    for bad in ["failed", "exiting", "disabling", "can't open"] {
        assert!(!text.contains(bad), "rngd says {bad:?}: {text}");
    }
    let _ = exec_sh(&lab, "kill $(cat /run/rngd.pid)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short private directory (Unix socket paths are limited to 107 bytes).
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vs-rnd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
