//! End-to-end test of the fastnet device in a real guest, channel-only mode: the agent opens the
//! link (`vstream.fastnet=fn0`), creates TAP fn0 with the address and MTU the host's setup
//! gives, and moves Ethernet frames on the `fastnet` channel over the virtio-serial port;
//! vstreamd attaches the host TAP in a network namespace this test creates. Shown: the guest
//! pings the host; 16 MiB of TCP from the guest to a listener in the namespace, intact
//! (SHA-256), and its throughput.
//!
//! Needs root (`ip netns add`, TAP devices, `setns`). Never skips silently: without QEMU it
//! fails, unless VSTREAM_SKIP_E2E=1 is set.

use std::net::Ipv4Addr;

use std::thread;
use std::time::{Duration, Instant};

use xtask::lab::testing::{self, receive_one, NetNs};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const SIZE: usize = 16 * 1024 * 1024;
const HOST_TAP: &str = "vsfn0";

fn exec(lab: &Lab, script: &str) -> String {
    let out = lab
        .ctl(["exec", lab.name(), "--", "sh", "-c", script])
        .expect("vstreamctl exec");
    assert!(
        out.status.success(),
        "`{script}` in the guest failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

#[test]
fn fastnet_channel_link_in_a_real_guest() {
    if !lab::e2e_enabled("fastnet_channel_link_in_a_real_guest") {
        return;
    }
    let ns = NetNs::new("fn");
    // A persistent TAP the administrator addressed; vstreamd attaches to it.
    ns_ok(
        &ns,
        &[
            "ip", "tuntap", "add", "dev", HOST_TAP, "mode", "tap", "vnet_hdr",
        ],
    );
    ns_ok(&ns, &["ip", "addr", "add", "10.78.0.1/24", "dev", HOST_TAP]);
    ns_ok(&ns, &["ip", "link", "set", "dev", HOST_TAP, "up"]);
    let options = LabOptions {
        extra_kernel_args: vec!["vstream.fastnet=fn0".into()],
        extra_config: format!(
            "\n[guest.fastnet]\ntap = \"{HOST_TAP}\"\nnetns = \"{}\"\n\
             guest_address = \"10.78.0.2/24\"\nmtu = 1500\nmode = \"channel\"\n",
            ns.0
        ),
        ..LabOptions::virtio_port_only().named("fastnet")
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

    // The guest pings (the host may have no ping program): echo out, reply back.
    let ping = exec(&lab, "ping -c 10 -i 0.2 10.78.0.1");
    assert!(ping.contains("10 packets received"), "{ping}");
    let rtt = ping
        .lines()
        .find(|l| l.contains("round-trip"))
        .unwrap_or("")
        .to_owned();

    let sum = exec(
        &lab,
        &format!("head -c {SIZE} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"),
    );
    let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(sum.len(), 64, "{sum}");
    let listener = ns.listen(Ipv4Addr::new(10, 78, 0, 1));
    let port = listener.local_addr().expect("port").port();
    let rx = receive_one(listener);
    exec(&lab, &format!("nc 10.78.0.1 {port} < /tmp/blob"));
    let (got, took) = rx.join().expect("receiver");
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
        (SIZE as f64 / (1024.0 * 1024.0)) / took.as_secs_f64()
    );
}
