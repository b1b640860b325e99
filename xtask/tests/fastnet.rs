//! End-to-end tests of the fastnet device in a real guest. The agent opens the link
//! (`vstream.fastnet=fn0`), creates TAP fn0 with the address and MTU the host's setup gives;
//! vstreamd attaches the host TAP in a network namespace the test creates.
//!
//! - Channel-only mode: Ethernet frames on the `fastnet` channel over the virtio-serial port.
//!   Shown: the guest pings the host; 16 MiB of TCP from the guest to a listener in the
//!   namespace, intact (SHA-256), and its throughput.
//! - Shared-memory mode: the segment is a /dev/shm file vstreamd maps and QEMU gives the guest
//!   as an `ivshmem-plain` device; frames go through its rings, the channel carries only
//!   doorbells. Shown: the mode in `vstreamctl status`; 20 pings, none lost; N MiB of TCP each
//!   way, intact (SHA-256), with the rate and the doorbells per MiB (vstreamd's counters).
//!   N is `VSTREAM_FASTNET_MIB` (default 256).
//!
//! Needs root (`ip netns add`, TAP devices, `setns`). Never skips silently: without QEMU it
//! fails, unless VSTREAM_SKIP_E2E=1 is set.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::lab::testing::{self, receive_one, NetNs};
use xtask::lab::{self, Lab, LabOptions};
use xtask::qemu::Ivshmem;

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const SIZE: usize = 16 * 1024 * 1024;
const HOST_TAP: &str = "vsfn0";

/// Generous: writing, hashing or sending hundreds of MiB in a TCG guest takes minutes.
const EXEC_TIMEOUT: Duration = Duration::from_secs(900);

fn exec(lab: &Lab, script: &str) -> String {
    testing::exec_sh_within(lab, script, EXEC_TIMEOUT)
}

fn ns_ok(ns: &NetNs, cmd: &[&str]) -> String {
    let out = ns.exec(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} in the namespace failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates the host TAP (persistent, addressed, as an administrator would) in `ns`, boots the
/// lab (`base`: the mux on the virtio-serial port) with the link and `config` appended to
/// `[guest.fastnet]`, and waits until the guest's fn0 has the host's address, MAC and MTU.
fn boot_link(ns: &NetNs, base: LabOptions, config: &str) -> Lab {
    ns_ok(
        ns,
        &[
            "ip", "tuntap", "add", "dev", HOST_TAP, "mode", "tap", "vnet_hdr",
        ],
    );
    ns_ok(ns, &["ip", "addr", "add", "10.78.0.1/24", "dev", HOST_TAP]);
    ns_ok(ns, &["ip", "link", "set", "dev", HOST_TAP, "up"]);
    let options = LabOptions {
        extra_kernel_args: vec!["vstream.fastnet=fn0".into()],
        extra_config: format!(
            "\n[guest.fastnet]\ntap = \"{HOST_TAP}\"\nnetns = \"{}\"\n\
             guest_address = \"10.78.0.2/24\"\nmtu = 1500\n{config}",
            ns.0
        ),
        ..base
    };
    let lab = Lab::boot(options).expect("boot the lab guest");

    // The guest's interface appears with the host's address and MTU once the link is set up.
    let deadline = Instant::now() + UP_TIMEOUT;
    let link = loop {
        let out = lab
            .ctl(["exec", lab.name(), "--", "sh", "-c", "ip addr show dev fn0"])
            .expect("vstreamctl exec");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("10.78.0.2/24") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's fn0 never got its address: {text}\n{}",
            lab.guest_console_log()
        );
        thread::sleep(Duration::from_millis(500));
    };
    assert!(link.contains("mtu 1500"), "{link}");
    assert!(link.contains("02:76:73:00:00:02"), "{link}");
    lab
}

/// The guest pings the host `count` times (the host may have no ping program): all answered;
/// returns the round-trip line.
fn ping(lab: &Lab, count: u32) -> String {
    let ping = exec(lab, &format!("ping -c {count} -i 0.2 10.78.0.1"));
    assert!(
        ping.contains(&format!("{count} packets received")),
        "{ping}"
    );
    ping.lines()
        .find(|l| l.contains("round-trip"))
        .unwrap_or("")
        .to_owned()
}

/// Writes `size` random bytes to the guest's /tmp/blob; returns their SHA-256.
fn guest_blob(lab: &Lab, size: usize) -> String {
    let sum = exec(
        lab,
        &format!("head -c {size} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"),
    );
    let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(sum.len(), 64, "{sum}");
    sum
}

/// Sends the guest's /tmp/blob to a listener in the namespace with busybox nc; returns the
/// bytes received and how long they took.
fn guest_to_host(lab: &Lab, ns: &NetNs) -> (Vec<u8>, Duration) {
    let listener = ns.listen(Ipv4Addr::new(10, 78, 0, 1));
    let port = listener.local_addr().expect("port").port();
    let rx = receive_one(listener);
    exec(lab, &format!("nc 10.78.0.1 {port} < /tmp/blob"));
    rx.join().expect("receiver")
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[test]
fn fastnet_channel_link_in_a_real_guest() {
    if !lab::e2e_enabled("fastnet_channel_link_in_a_real_guest") {
        return;
    }
    let ns = NetNs::new("fn");
    let base = LabOptions::virtio_port_only().named("fastnet");
    let lab = boot_link(&ns, base, "mode = \"channel\"\n");
    let rtt = ping(&lab, 10);
    let sum = guest_blob(&lab, SIZE);
    let (got, took) = guest_to_host(&lab, &ns);
    assert_eq!(got.len(), SIZE, "bytes through fastnet");
    assert_eq!(
        testing::sha256(&got),
        sum,
        "the bytes through fastnet changed"
    );
    eprintln!(
        "\n16 MiB guest -> host over TCP, fastnet channel-only mode on virtio-serial ({} accelerator): \
         {took:.2?} = {:.1} MiB/s\n  ping guest -> host: {rtt}\n",
        lab.accel(),
        mib(SIZE) / took.as_secs_f64()
    );
}

/// vstreamd's view of the link: `devices.fastnet` in `vstreamctl status`.
fn link_status(lab: &Lab) -> Value {
    let status = lab.status().expect("vstreamctl status");
    lab::guest_status(&status, lab.name())
        .map(|g| g["devices"]["fastnet"].clone())
        .unwrap_or(Value::Null)
}

/// Doorbells both ways so far (vstreamd's counters).
fn doorbells(lab: &Lab) -> u64 {
    let s = link_status(lab);
    s["doorbells_out"].as_u64().unwrap_or(0) + s["doorbells_in"].as_u64().unwrap_or(0)
}

/// Pseudo-random bytes (xorshift), so the host needs no random source of that size.
fn pattern(len: usize, mut x: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn fastnet_shared_memory_link_in_a_real_guest() {
    if !lab::e2e_enabled("fastnet_shared_memory_link_in_a_real_guest") {
        return;
    }
    let size = std::env::var("VSTREAM_FASTNET_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20;
    let ns = NetNs::new("fnshm");
    let segment = PathBuf::from(format!("/dev/shm/vstream-fastnet-{}", std::process::id()));
    let segment_size: u64 = 16 << 20;
    let config = format!(
        "mode = \"shm\"\nsegment = \"{}\"\nsegment_size = {segment_size}\n",
        segment.display()
    );
    let base = LabOptions {
        ivshmem: Some(Ivshmem {
            path: segment,
            size: segment_size,
        }),
        // The guest keeps the blob in RAM (tmpfs).
        memory_mib: 512 + 2 * (size >> 20) as u32,
        ..LabOptions::virtio_port_only().named("fastnet-shm")
    };
    let lab = boot_link(&ns, base, &config);
    let status = link_status(&lab);
    assert_eq!(status["mode"], "shared-memory", "{status}");

    let rtt = ping(&lab, 20);

    let sum = guest_blob(&lab, size);
    let before = doorbells(&lab);
    let (got, up) = guest_to_host(&lab, &ns);
    let up_bells = doorbells(&lab) - before;
    assert_eq!(got.len(), size, "bytes through fastnet, guest to host");
    assert_eq!(
        testing::sha256(&got),
        sum,
        "the bytes changed, guest to host"
    );
    drop(got);

    // Host to guest: busybox nc listens in the guest, the host connects from the namespace.
    // nc reads stdin too: from the console it would be stopped (SIGTTIN) as a background job.
    exec(&lab, "rm -f /tmp/blob");
    let data = pattern(size, 0x9e37_79b9_7f4a_7c15);
    let port = 7070;
    testing::bg(
        &lab,
        "fnrx",
        &format!("nc -l -p {port} < /dev/null > /tmp/in"),
    );
    let before = doorbells(&lab);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match ns.connect(Ipv4Addr::new(10, 78, 0, 2), port) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect to the guest: {e}");
                thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let start = Instant::now();
    conn.write_all(&data).expect("send to the guest");
    drop(conn);
    testing::wait_out(&lab, "fnrx", "DONE-rc=0", Duration::from_secs(1800));
    let down = start.elapsed();
    let down_bells = doorbells(&lab) - before;
    let got = exec(&lab, "sha256sum /tmp/in && rm -f /tmp/in");
    assert_eq!(
        got.split_whitespace().next().unwrap_or_default(),
        testing::sha256(&data),
        "the bytes changed, host to guest"
    );
    let status = link_status(&lab);
    assert_eq!(status["mode"], "shared-memory", "{status}");

    let n = mib(size);
    eprintln!(
        "\nfastnet shared-memory mode (ivshmem-plain, {} MiB segment; {} accelerator)\n  \
         ping guest -> host (20, none lost): {rtt}\n  \
         {n:.0} MiB guest -> host over TCP: {up:.2?} = {:.1} MiB/s, {:.1} doorbells/MiB\n  \
         {n:.0} MiB host -> guest over TCP: {down:.2?} = {:.1} MiB/s, {:.1} doorbells/MiB\n  \
         link counters: {status}\n",
        segment_size >> 20,
        lab.accel(),
        n / up.as_secs_f64(),
        up_bells as f64 / n,
        n / down.as_secs_f64(),
        down_bells as f64 / n,
    );
}
