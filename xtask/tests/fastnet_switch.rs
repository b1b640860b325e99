//! End-to-end test of fastnet's built-in switch: two real guests on one vstreamd, each with a
//! fastnet link (`switch = "sw0"` in both `[guest.fastnet]`; the first in shared-memory mode
//! with an `ivshmem-plain` segment, the second in channel-only mode), talk to each other
//! through the switch; the host's TAP (in a namespace the test creates) is a port of the same
//! switch. Shown: they ping each other, the second pings the host's address; N MiB of TCP
//! from one to the other (busybox nc), SHA-256 equal at both ends, and its rate; a frame with
//! a spoofed source MAC never reaches the other guest and is counted in `vstreamctl status`
//! (`devices.fastnet.switch.dropped_spoofed`). N is `VSTREAM_FASTNET_SWITCH_MIB` (default 64).
//!
//! Needs root (`ip netns add`, TAP devices, `setns`). Never skips silently: without QEMU it
//! fails, unless VSTREAM_SKIP_E2E=1 is set.

use std::fs::File;
use std::path::PathBuf;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::lab::testing::NetNs;
use xtask::lab::{self, Lab, LabOptions};
use xtask::process;
use xtask::qemu::Ivshmem;

const UP_TIMEOUT: Duration = Duration::from_secs(180);
/// Generous: writing, hashing and sending tens of MiB between two TCG guests takes minutes.
const EXEC_TIMEOUT: Duration = Duration::from_secs(900);
const PORT: u16 = 7071;

/// Stops the shared vstreamd first (declared before the labs).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        process::terminate(&mut self.0, Duration::from_millis(500));
    }
}

/// The guests and the vstreamd that serves both (its control socket is `labs[0]`'s).
struct Pair {
    _daemon: Daemon,
    /// Holds the host's TAP, a port of the switch too.
    _ns: NetNs,
    labs: [Lab; 2],
}

impl Pair {
    /// Runs `script` in guest `g` (0 or 1) through the shared vstreamd; its output, and
    /// whether it succeeded.
    fn try_exec(&self, g: usize, script: &str) -> (bool, String) {
        let out = self.labs[0]
            .ctl_within(
                ["exec", self.labs[g].name(), "--", "sh", "-c", script],
                &[],
                EXEC_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("vstreamctl exec: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn exec(&self, g: usize, script: &str) -> String {
        let (ok, text) = self.try_exec(g, script);
        assert!(ok, "`{script}` in guest {g} failed: {text}");
        text
    }

    /// Guest `g`'s link (`devices.fastnet`), from vstreamd's status.
    fn link_status(&self, g: usize) -> Value {
        let status = self.labs[0].status().expect("vstreamctl status");
        lab::guest_status(&status, self.labs[g].name())
            .map(|s| s["devices"]["fastnet"].clone())
            .unwrap_or(Value::Null)
    }

    /// Guest `g`'s port on the switch.
    fn port_status(&self, g: usize) -> Value {
        self.link_status(g)["switch"].clone()
    }
}

fn address(g: usize) -> String {
    format!("10.79.0.{}", g + 2)
}

fn mac(g: usize) -> String {
    format!("02:76:73:00:01:{:02x}", g + 2)
}

/// Guest 0's segment (an `ivshmem-plain` device): its link runs in shared-memory mode, guest
/// 1's on the channel, so one run puts both modes on the switch.
fn segment() -> Ivshmem {
    Ivshmem {
        path: PathBuf::from(format!("/dev/shm/vstream-fnsw-{}", std::process::id())),
        size: 16 << 20,
    }
}

/// The host's TAP on the switch (with guest 0's link), in a network namespace.
const HOST_TAP: &str = "vsfnsw0";
const HOST_ADDRESS: &str = "10.79.0.1";

/// The `[guest.fastnet]` of guest `g`, on switch sw0; guest 0's brings the host's TAP in `ns`.
fn fastnet_section(g: usize, ns: &NetNs) -> String {
    let mode = match g {
        0 => {
            let seg = segment();
            format!(
                "mode = \"shm\"\nsegment = \"{}\"\nsegment_size = {}\n\
                 tap = \"{HOST_TAP}\"\nnetns = \"{}\"\n",
                seg.path.display(),
                seg.size,
                ns.0
            )
        }
        _ => "mode = \"channel\"\n".to_owned(),
    };
    format!(
        "\n[guest.fastnet]\nswitch = \"sw0\"\n{mode}guest_mac = \"{}\"\n\
         guest_address = \"{}/24\"\nmtu = 1500\n",
        mac(g),
        address(g)
    )
}

/// Boots two guests (no vstreamd of their own), then one vstreamd for both, and waits until
/// each guest's fn0 has its address and MAC.
fn boot_pair(memory_mib: u32) -> Pair {
    let labs: Vec<Lab> = thread::scope(|s| {
        let boots: Vec<_> = ["fnsw-a", "fnsw-b"]
            .into_iter()
            .enumerate()
            .map(|(g, name)| {
                s.spawn(move || {
                    Lab::boot(LabOptions {
                        start_daemon: false,
                        memory_mib,
                        ivshmem: (g == 0).then(segment),
                        extra_kernel_args: vec!["vstream.fastnet=fn0".into()],
                        ..LabOptions::virtio_port_only().named(name)
                    })
                    .expect("boot a lab guest")
                })
            })
            .collect();
        boots
            .into_iter()
            .map(|b| b.join().expect("boot thread"))
            .collect()
    });
    let labs: [Lab; 2] = labs.try_into().unwrap_or_else(|_| unreachable!());
    // The host's TAP, persistent and addressed, as an administrator would make it.
    let ns = NetNs::new("fnsw");
    for cmd in [
        &[
            "ip", "tuntap", "add", "dev", HOST_TAP, "mode", "tap", "vnet_hdr",
        ][..],
        // No IPv6 chatter from the host: guest 1 must get nothing while guest 0 spoofs.
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{HOST_TAP}.disable_ipv6=1"),
        ],
        &[
            "ip",
            "addr",
            "add",
            &format!("{HOST_ADDRESS}/24"),
            "dev",
            HOST_TAP,
        ],
        &["ip", "link", "set", "dev", HOST_TAP, "up"],
    ] {
        let out = ns.exec(cmd);
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }
    let mut config = String::new();
    for (g, l) in labs.iter().enumerate() {
        config.push_str(&lab::vstreamd_config(l.name(), &l.paths().sockets));
        config.push_str(&fastnet_section(g, &ns));
    }
    let p = labs[0].paths();
    std::fs::create_dir_all(&p.state_dir).expect("state dir");
    std::fs::write(&p.config, config).expect("config");
    let log = File::create(&p.daemon_log).expect("daemon log");
    let mut command = p.vstreamd_command(log).expect("vstreamd command");
    command.env("RUST_LOG", "info");
    let daemon = Daemon(process::spawn(command).expect("start vstreamd"));
    let pair = Pair {
        _daemon: daemon,
        _ns: ns,
        labs,
    };
    for g in 0..2 {
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            let (ok, text) = pair.try_exec(g, "ip addr show dev fn0");
            if ok && text.contains(&format!("{}/24", address(g))) {
                assert!(text.contains(&mac(g)), "{text}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "guest {g}'s fn0 never got its address: {text}\n{}",
                pair.labs[g].guest_console_log()
            );
            thread::sleep(Duration::from_millis(500));
        }
    }
    pair
}

fn sha(text: &str) -> String {
    let sum = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(sum.len(), 64, "not a sha256sum line: {text}");
    sum
}

fn counter(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

#[test]
fn two_guests_on_the_fastnet_switch_ping_and_move_data_and_spoofing_is_dropped() {
    if !lab::e2e_enabled("two_guests_on_the_fastnet_switch") {
        return;
    }
    let mib = std::env::var("VSTREAM_FASTNET_SWITCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(64);
    let size = mib << 20;
    // Each guest keeps its blob in RAM (tmpfs).
    let pair = boot_pair(512 + 2 * mib as u32);

    // The guest may set its address before it answers with its mode.
    for (g, mode) in [(0, "shared-memory"), (1, "channel")] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = pair.link_status(g);
            if s["mode"] == mode {
                break;
            }
            assert!(Instant::now() < deadline, "guest {g}: {s}");
            thread::sleep(Duration::from_millis(500));
        }
    }

    // Each pings the other: ARP broadcasts flood, the answers go to their port.
    let mut rtts = Vec::new();
    for (g, other) in [(0, 1), (1, 0)] {
        let out = pair.exec(g, &format!("ping -c 5 -i 0.2 {}", address(other)));
        assert!(out.contains("5 packets received"), "{out}");
        rtts.push(
            out.lines()
                .find(|l| l.contains("round-trip"))
                .unwrap_or("")
                .to_owned(),
        );
    }

    // Guest 1 reaches the host's TAP, which is on the switch with guest 0's link.
    let out = pair.exec(1, &format!("ping -c 3 -i 0.2 {HOST_ADDRESS}"));
    assert!(out.contains("3 packets received"), "{out}");

    // N MiB from guest 0 to guest 1's listener, through the switch.
    let sent = sha(&pair.exec(
        0,
        &format!("head -c {size} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"),
    ));
    let (received, took) = thread::scope(|s| {
        // busybox nc half-closes when its stdin ends, and the sender's nc quits when it sees
        // that: the receiver's stdin is a FIFO nobody writes (opened read-write: no wait).
        let rx = s.spawn(|| {
            pair.exec(
                1,
                &format!(
                    "rm -f /tmp/nofin && mkfifo /tmp/nofin && \
                     nc -l -p {PORT} 0<>/tmp/nofin > /tmp/in; sha256sum /tmp/in; wc -c < /tmp/in"
                ),
            )
        });
        let start = Instant::now();
        // Until guest 1's nc listens, the connection is refused: try again.
        pair.exec(
            0,
            &format!(
                "for i in $(seq 60); do nc {} {PORT} < /tmp/blob && exit 0; sleep 1; done; exit 1",
                address(1)
            ),
        );
        let received = rx.join().expect("receiver");
        (received, start.elapsed())
    });
    assert_eq!(
        sha(&received),
        sent,
        "the bytes through the switch changed (sha256sum, bytes: {received})"
    );
    pair.exec(1, "rm /tmp/in");

    let before = [pair.port_status(0), pair.port_status(1)];
    for s in &before {
        assert_eq!(s["switch"], "sw0", "{s}");
        assert_eq!(counter(s, "dropped_spoofed"), 0, "{s}");
    }
    // At most 64 KiB a frame (GSO): the sender's frames carried all of it.
    assert!(
        counter(&before[0], "frames_in") >= (size / 65536) as u64,
        "{}",
        before[0]
    );
    assert!(
        counter(&before[1], "frames_out") >= (size / 65536) as u64,
        "{}",
        before[1]
    );

    // Guest 0 takes another MAC: its frames are dropped at its port, guest 1 sees none.
    pair.exec(0, "ip link set dev fn0 address 02:76:73:00:01:99");
    let (ok, out) = pair.try_exec(0, &format!("ping -c 3 -W 2 {}", address(1)));
    assert!(!ok && out.contains("0 packets received"), "{out}");
    let after = [pair.port_status(0), pair.port_status(1)];
    assert!(
        counter(&after[0], "dropped_spoofed") >= 3,
        "the spoofed pings were not counted: {}",
        after[0]
    );
    assert_eq!(
        counter(&after[1], "frames_out"),
        counter(&before[1], "frames_out"),
        "a frame from guest 0 reached guest 1 after it changed its MAC: {}",
        after[1]
    );

    eprintln!(
        "\nfastnet switch, two guests on one vstreamd: guest 0 in shared-memory mode, guest 1 in \
         channel-only mode ({} accelerator)\n  \
         ping 0 -> 1: {}\n  ping 1 -> 0: {}\n  \
         {mib} MiB guest 0 -> guest 1 over TCP: {took:.2?} = {:.1} MiB/s\n  \
         ports after the spoofed pings: {}\n  {}\n",
        pair.labs[0].accel(),
        rtts[0],
        rtts[1],
        mib as f64 / took.as_secs_f64(),
        after[0],
        after[1]
    );
}
