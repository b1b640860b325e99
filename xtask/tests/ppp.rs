//! End-to-end test of the ppp device in a real guest: Debian's pppd in the guest (started by the
//! agent on a `ppp` channel), vstreamd terminating the link on the host in a network namespace
//! this test creates. Shown: the link comes up by itself when the agent starts; `ping` from the
//! guest to the host end through ppp0; 16 MiB of TCP from the guest to a listener on the host
//! side of the link, intact (SHA-256), and its throughput next to QEMU's virtio-net (slirp) in
//! the same run; the link comes back after the agent is killed and respawned.
//!
//! The host end uses backend `tun` (vstreamd's userspace PPP endpoint and a TUN device): this
//! machine's kernel has no PPP driver, so no pppd can run on the host side here; with
//! `ppp_generic` on the host, backend `pppd` runs Debian's pppd there the same way. Needs root
//! (`ip netns add`, TUN devices, `setns`). Never skips silently: without QEMU it fails, unless
//! VSTREAM_SKIP_E2E=1 is set.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use xtask::lab::testing::{self, exec_sh, receive_one, NetNs};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const SIZE: usize = 16 * 1024 * 1024;

/// One guest at a time: the throughput figures must not share the two cores with another guest.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn ppp_status(lab: &Lab, status: &Value) -> Value {
    lab::guest_status(status, lab.name())
        .map(|g| g["devices"]["ppp"].clone())
        .unwrap_or(Value::Null)
}

/// Sends the guest's /tmp/blob to HOST:PORT with busybox nc; returns what the host received and
/// how long it took.
fn transfer(lab: &Lab, listener: TcpListener, host: &str) -> (Vec<u8>, Duration) {
    let port = listener.local_addr().expect("port").port();
    let rx = receive_one(listener);
    exec_sh(lab, &format!("nc {host} {port} < /tmp/blob"));
    rx.join().expect("receiver")
}

fn mib_s(d: Duration) -> f64 {
    (SIZE as f64 / (1024.0 * 1024.0)) / d.as_secs_f64()
}

#[test]
fn ppp_link_in_a_real_guest() {
    if !lab::e2e_enabled("ppp_link_in_a_real_guest") {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("e2e");
    let options = LabOptions {
        user_net: true,
        extra_config: format!(
            "\n[guest.ppp]\nlocal = \"10.77.0.1\"\nremote = \"10.77.0.2\"\nmtu = 1500\n\
             backend = \"tun\"\nnetns = \"{}\"\n",
            ns.0
        ),
        ..LabOptions::virtio_port_only().named("ppp")
    };
    let lab = Lab::boot(options).expect("boot the lab guest");

    // Up by itself: nobody asked for the link, the agent opens it when its session is up.
    let status = lab
        .wait_for("the PPP link to be up", UP_TIMEOUT, |s| {
            ppp_status(&lab, s)["state"] == "up"
        })
        .expect("ppp up");
    let ppp = ppp_status(&lab, &status);
    assert_eq!(ppp["interface"], "ppp-ppp");
    let addr = ns.exec(&["ip", "-4", "addr", "show", "dev", "ppp-ppp"]);
    let addr = String::from_utf8_lossy(&addr.stdout);
    assert!(addr.contains("10.77.0.1 peer 10.77.0.2/32"), "{addr}");
    // In the guest it is pppd's ppp0, with the address the host gave it.
    let guest_addr = exec_sh(&lab, "ip -4 addr show dev ppp0");
    assert!(guest_addr.contains("10.77.0.2"), "{guest_addr}");
    let guest_link = exec_sh(&lab, "ip link show dev ppp0");
    assert!(guest_link.contains("mtu 1500"), "{guest_link}");
    assert!(
        lab.guest_console_log()
            .contains("pppd: local  IP address 10.77.0.2"),
        "the guest's pppd did not report its address"
    );

    let ping = exec_sh(&lab, "ping -c 10 -i 0.2 10.77.0.1");
    assert!(ping.contains("10 packets received"), "{ping}");
    let ppp_rtt = ping
        .lines()
        .find(|l| l.contains("round-trip"))
        .unwrap_or("")
        .to_owned();

    // The same 16 MiB through both paths, guest to host.
    let sum = exec_sh(
        &lab,
        &format!("head -c {SIZE} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"),
    );
    let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(sum.len(), 64, "{sum}");

    let (got, ppp_time) = transfer(&lab, ns.listen(Ipv4Addr::new(10, 77, 0, 1)), "10.77.0.1");
    assert_eq!(got.len(), SIZE, "bytes through ppp");
    assert_eq!(testing::sha256(&got), sum, "the bytes through ppp changed");

    exec_sh(
        &lab,
        "ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && sleep 1",
    );
    let net_ping = exec_sh(&lab, "ping -c 10 -i 0.2 10.0.2.2");
    let net_rtt = net_ping
        .lines()
        .find(|l| l.contains("round-trip"))
        .unwrap_or("")
        .to_owned();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let (got, net_time) = transfer(&lab, listener, "10.0.2.2");
    assert_eq!(got.len(), SIZE, "bytes through virtio-net");
    assert_eq!(
        testing::sha256(&got),
        sum,
        "the bytes through virtio-net changed"
    );

    let (ppp_rate, net_rate) = (mib_s(ppp_time), mib_s(net_time));
    eprintln!(
        "\n16 MiB guest -> host over TCP, same run ({} accelerator):\n  \
         ppp (pppd in the guest, vstream channel on virtio-serial, userspace PPP + TUN on the host): \
         {ppp_time:.2?} = {ppp_rate:.1} MiB/s\n  \
         virtio-net (QEMU user-mode network): {net_time:.2?} = {net_rate:.1} MiB/s\n  \
         ppp / virtio-net = {:.2}\n  ping ppp: {ppp_rtt}\n  ping virtio-net (slirp): {net_rtt}\n",
        lab.accel(),
        ppp_rate / net_rate
    );

    // The agent dies and init respawns it: a new session, a new pppd, the link comes back.
    let links = ppp["links"].as_u64().unwrap_or(0);
    lab.console_roundtrip(
        "hvc0",
        "kill $(cat /run/vstream-agent.pid) && echo agent-$((6*7))",
        "agent-42",
        Duration::from_secs(30),
    )
    .expect("kill the agent");
    lab.wait_for("the PPP link to come back", UP_TIMEOUT, |s| {
        let p = ppp_status(&lab, s);
        p["state"] == "up" && p["links"].as_u64() > Some(links)
    })
    .expect("ppp up again");
    lab.wait_for("the agent's transport to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .expect("agent back");
    let ping = exec_sh(&lab, "ping -c 3 10.77.0.1");
    assert!(ping.contains("3 packets received"), "{ping}");
}

/// The other way to carry the link: a named virtio-serial port of its own (`vstream.ppp=port:NAME`
/// in the guest, `transport = "unix:..."` in `[guest.ppp]`), no multiplexer involved.
#[test]
fn ppp_link_on_a_virtio_serial_port() {
    if !lab::e2e_enabled("ppp_link_on_a_virtio_serial_port") {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new("port");
    let dir = std::env::temp_dir().join(format!("vs-ppp-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket dir");
    let sock = dir.join("ppp.sock");
    let options = LabOptions {
        extra_kernel_args: vec!["vstream.ppp=port:org.vstream.ppp".into()],
        extra_qemu_args: vec![
            "-chardev".into(),
            format!(
                "socket,id=pppport,path={},server=on,wait=off",
                sock.display()
            ),
            "-device".into(),
            "virtserialport,bus=vser0.0,nr=2,chardev=pppport,id=pppport,name=org.vstream.ppp"
                .into(),
        ],
        extra_config: format!(
            "\n[guest.ppp]\nlocal = \"10.77.1.1\"\nremote = \"10.77.1.2\"\nmtu = 1400\n\
             backend = \"tun\"\nnetns = \"{}\"\ntransport = \"unix:{}\"\n",
            ns.0,
            sock.display()
        ),
        ..LabOptions::virtio_port_only().named("pppport")
    };
    let lab = Lab::boot(options).expect("boot the lab guest");
    let status = lab
        .wait_for("the PPP link to be up", UP_TIMEOUT, |s| {
            ppp_status(&lab, s)["state"] == "up"
        })
        .expect("ppp up");
    let ppp = ppp_status(&lab, &status);
    assert_eq!(ppp["on"], format!("unix:{}", sock.display()));
    let guest_link = exec_sh(&lab, "ip link show dev ppp0 && ip -4 addr show dev ppp0");
    assert!(guest_link.contains("mtu 1400"), "{guest_link}");
    assert!(guest_link.contains("10.77.1.2"), "{guest_link}");
    let ping = exec_sh(&lab, "ping -c 5 -i 0.2 10.77.1.1");
    assert!(ping.contains("5 packets received"), "{ping}");
    // The agent runs the link on the port, not on a channel.
    assert!(lab
        .guest_console_log()
        .contains("ppp: link starting on a transport"));
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
