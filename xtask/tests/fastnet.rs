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

/// [`boot_link`] in shared-memory mode: a `segment_size` segment in /dev/shm (named after the
/// lab) as the guest's ivshmem device, and guest RAM for a tmpfs blob of `blob` bytes. Returns
/// the lab and the segment file's path.
fn boot_shm_link(ns: &NetNs, name: &str, segment_size: u64, blob: usize) -> (Lab, PathBuf) {
    let segment = PathBuf::from(format!("/dev/shm/vstream-{name}-{}", std::process::id()));
    let config = format!(
        "mode = \"shm\"\nsegment = \"{}\"\nsegment_size = {segment_size}\n",
        segment.display()
    );
    let base = LabOptions {
        ivshmem: Some(Ivshmem {
            path: segment.clone(),
            size: segment_size,
        }),
        // The guest keeps the blob in RAM (tmpfs).
        memory_mib: 512 + 2 * (blob >> 20) as u32,
        ..LabOptions::virtio_port_only().named(name)
    };
    (boot_link(ns, base, &config), segment)
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

/// The guest's TCP and fn0 counters: what its TCP sent (segments) against the frames fn0
/// passed to the agent, and how often TCP held writes back to merge them (autocorking).
#[derive(Default)]
struct GuestTcp {
    out_segs: u64,
    frames: u64,
    frame_bytes: u64,
    autocorked: u64,
}

impl GuestTcp {
    fn delta(&self, before: &GuestTcp) -> GuestTcp {
        GuestTcp {
            out_segs: self.out_segs - before.out_segs,
            frames: self.frames - before.frames,
            frame_bytes: self.frame_bytes - before.frame_bytes,
            autocorked: self.autocorked - before.autocorked,
        }
    }
}

impl std::fmt::Display for GuestTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tcp OutSegs {}, fn0 tx frames {} ({:.2} segments and {} bytes a frame), TcpExt TCPAutoCorking {}",
            self.out_segs,
            self.frames,
            self.out_segs as f64 / self.frames.max(1) as f64,
            self.frame_bytes / self.frames.max(1),
            self.autocorked
        )
    }
}

/// `name`'s value in the guest's /proc/net/snmp or /proc/net/netstat text: a line of names
/// after `prefix`, then a line of values.
fn proc_net_value(text: &str, prefix: &str, name: &str) -> u64 {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn guest_tcp_counters(lab: &Lab) -> GuestTcp {
    let text = exec(
        lab,
        "cat /proc/net/snmp /proc/net/netstat; echo fn0: \
         $(cat /sys/class/net/fn0/statistics/tx_packets /sys/class/net/fn0/statistics/tx_bytes)",
    );
    let mut fn0 = text
        .lines()
        .find_map(|l| l.strip_prefix("fn0: "))
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0));
    GuestTcp {
        out_segs: proc_net_value(&text, "Tcp:", "OutSegs"),
        frames: fn0.next().unwrap_or(0),
        frame_bytes: fn0.next().unwrap_or(0),
        autocorked: proc_net_value(&text, "TcpExt:", "TCPAutoCorking"),
    }
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
    let segment_size: u64 = 16 << 20;
    let (lab, _) = boot_shm_link(&ns, "fastnet-shm", segment_size, size);
    let status = link_status(&lab);
    assert_eq!(status["mode"], "shared-memory", "{status}");

    let rtt = ping(&lab, 20);

    let sum = guest_blob(&lab, size);
    let before = doorbells(&lab);
    let tcp_before = guest_tcp_counters(&lab);
    // The sending socket's line of /proc/net/tcp (send queue, cwnd, ssthresh) 3 and 6 s in.
    testing::bg(
        &lab,
        "tcpsnap",
        "for i in 1 2; do sleep 3; grep ' 01004E0A:' /proc/net/tcp; done",
    );
    let (got, up) = guest_to_host(&lab, &ns);
    let up_bells = doorbells(&lab) - before;
    let tcp = guest_tcp_counters(&lab).delta(&tcp_before);
    let snap = exec(&lab, "cat /tmp/tcpsnap.out");
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
         link counters: {status}\n  \
         guest -> host, the guest's view: {tcp}\n  \
         the sender in /proc/net/tcp 3 and 6 s in: {snap}\n",
        segment_size >> 20,
        lab.accel(),
        n / up.as_secs_f64(),
        up_bells as f64 / n,
        n / down.as_secs_f64(),
        down_bells as f64 / n,
    );
}

/// One way a hostile guest breaks the segment, written into the /dev/shm file from the host
/// side while traffic flows, and the rule the link's error must name.
struct Corruption {
    what: &'static str,
    /// Writes the fault once; called again until the link resets (the guest's own producer
    /// may overwrite an index or a record before vstreamd reads it).
    write: fn(&std::fs::File, &Rings),
    rule: &'static str,
    /// The transfer runs host to guest (vstreamd reads the agent's consumer index only when
    /// its ring is full), else guest to host.
    down: bool,
}

/// The rings' size, from the segment's header (offsets in docs/devices/fastnet.md).
struct Rings {
    ring_size: u32,
}

const H2G_PROD: u64 = 128;
const H2G_CONS: u64 = 256;
const DOWN_PORT: u16 = 7071;
const G2H_PROD: u64 = 384;
const G2H_CONS: u64 = 512;
const DATA_OFFSET: u64 = 4096;

fn pread_u32(f: &std::fs::File, off: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).expect("read the segment");
    u32::from_le_bytes(b)
}

fn pwrite(f: &std::fs::File, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    f.write_all_at(bytes, off).expect("write the segment");
}

impl Rings {
    /// The file offset of position `pos` on the guest-to-host ring.
    fn g2h(&self, pos: u32) -> u64 {
        DATA_OFFSET + u64::from(self.ring_size) + u64::from(pos & (self.ring_size - 1))
    }

    /// The last packet record the guest published and vstreamd has not released, if any.
    fn last_pending_record(&self, f: &std::fs::File) -> Option<u32> {
        let (mut pos, prod) = (pread_u32(f, G2H_CONS), pread_u32(f, G2H_PROD));
        let mut last = None;
        // Bounded walk: the records may change under it.
        for _ in 0..4096 {
            if prod.wrapping_sub(pos) == 0 || prod.wrapping_sub(pos) > self.ring_size {
                break;
            }
            let (len, kind) = (pread_u32(f, self.g2h(pos)), pread_u32(f, self.g2h(pos) + 4));
            if kind == 0 {
                last = Some(pos);
            }
            pos = pos.wrapping_add(8 + ((len.min(self.ring_size) + 7) & !7));
        }
        last
    }
}

fn bad_record_len(f: &std::fs::File, r: &Rings, len: u32) {
    if let Some(pos) = r.last_pending_record(f) {
        pwrite(f, r.g2h(pos), &len.to_le_bytes());
    }
}

/// A producer index more than a ring ahead: two rings past the published consumer index (the
/// reader's own consumer index may be up to a ring past the one it published).
fn prod_ahead(f: &std::fs::File, r: &Rings, prod: u64, cons: u64) {
    let cons = pread_u32(f, cons);
    pwrite(
        f,
        prod,
        &cons.wrapping_add(2 * r.ring_size + 8).to_le_bytes(),
    );
}

fn corruptions() -> Vec<Corruption> {
    vec![
        Corruption {
            what: "guest-to-host producer index more than a ring ahead",
            write: |f, r| prod_ahead(f, r, G2H_PROD, G2H_CONS),
            rule: "more than a ring ahead",
            down: false,
        },
        // vstreamd never reads this index: the agent finds the fault and resets the link.
        Corruption {
            what: "host-to-guest producer index more than a ring ahead (the agent's check)",
            write: |f, r| prod_ahead(f, r, H2G_PROD, H2G_CONS),
            rule: "the guest reset the link: host-to-guest ring: producer index",
            down: false,
        },
        Corruption {
            what: "a record longer than its ring",
            write: |f, r| bad_record_len(f, r, r.ring_size + 8),
            rule: "longer than max_packet",
            down: false,
        },
        Corruption {
            what: "a record longer than the segment",
            write: |f, r| bad_record_len(f, r, u32::MAX - 7),
            rule: "longer than max_packet",
            down: false,
        },
        Corruption {
            what: "the header's magic",
            write: |f, _| pwrite(f, 0, b"hostile!"),
            rule: "header changed",
            down: false,
        },
        Corruption {
            what: "the header's version",
            write: |f, _| pwrite(f, 8, &7u32.to_le_bytes()),
            rule: "header changed",
            down: false,
        },
        Corruption {
            what: "the header's ring_size",
            write: |f, r| pwrite(f, 24, &(r.ring_size / 2).to_le_bytes()),
            rule: "ring_size changed",
            down: false,
        },
        Corruption {
            what: "host-to-guest consumer index past the producer (vstreamd's ring full)",
            write: |f, _| {
                let prod = pread_u32(f, H2G_PROD);
                pwrite(f, H2G_CONS, &prod.wrapping_add(4096).to_le_bytes());
            },
            rule: "host-to-guest ring: consumer index",
            down: true,
        },
    ]
}

/// vstreamd's CPU time (user + system) and resident set, from /proc.
fn cpu_and_rss(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("vstreamd is alive");
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = Duration::from_millis((f[11] + f[12]) * 1000 / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss_kib)
}

/// Waits until the guest's ping over the link works again (the agent set the link up anew).
fn wait_ping(lab: &Lab) -> Duration {
    let start = Instant::now();
    loop {
        let out = testing::sh(
            lab,
            "ping -c 1 -W 2 10.78.0.1 >/dev/null 2>&1 && echo PING-OK",
        );
        if out.contains("PING-OK") {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < UP_TIMEOUT,
            "the link never came back after a reset\n{}",
            lab.daemon_log()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// A hostile guest's writes into the shared segment while a TCP transfer runs: for each way
/// of breaking the segment, vstreamd resets the link with an error naming the broken rule,
/// keeps answering `vstreamctl status`, stays within its memory and goes idle; the agent sets
/// the link up again (fresh header, zeroed indexes) and a ping works. At the end, a transfer
/// over the restarted link arrives intact.
#[test]
fn fastnet_hostile_segment_resets_and_the_link_restarts() {
    if !lab::e2e_enabled("fastnet_hostile_segment_resets_and_the_link_restarts") {
        return;
    }
    let ns = NetNs::new("fnbad");
    let (lab, segment) = boot_shm_link(&ns, "fastnet-hostile", 4 << 20, SIZE);
    assert_eq!(link_status(&lab)["mode"], "shared-memory");
    let pid = lab.pids().1.expect("vstreamd's pid");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .expect("open the segment file");
    let rings = Rings {
        ring_size: pread_u32(&file, 24),
    };
    let sum = guest_blob(&lab, SIZE);
    let (_, rss_start) = cpu_and_rss(pid);
    let resets = |lab: &Lab| link_status(lab)["resets"].as_u64().unwrap_or(0);

    for (i, c) in corruptions().into_iter().enumerate() {
        let before = resets(&lab);
        let log_before = lab.daemon_log().matches("fastnet: link reset").count();
        let id = format!("flood{i}");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if c.down {
            // The host writes to a guest nc until the reset (or the round's end).
            testing::bg(
                &lab,
                &id,
                &format!("nc -l -p {DOWN_PORT} < /dev/null > /dev/null"),
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut conn = loop {
                match ns.connect(Ipv4Addr::new(10, 78, 0, 2), DOWN_PORT) {
                    Ok(c) => break c,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "connect to the guest: {e}");
                        thread::sleep(Duration::from_millis(500));
                    }
                }
            };
            let _ = conn.set_write_timeout(Some(Duration::from_secs(60)));
            let stop = stop.clone();
            thread::spawn(move || {
                let data = pattern(1 << 20, 0x5eed);
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && conn.write_all(&data).is_ok()
                {}
            });
        } else {
            // The guest sends its blob again and again; the receiver drains what arrives.
            let listener = ns.listen(Ipv4Addr::new(10, 78, 0, 1));
            let port = listener.local_addr().expect("port").port();
            thread::spawn(move || {
                for mut s in listener.incoming().flatten() {
                    thread::spawn(move || {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                        let _ = std::io::copy(&mut s, &mut std::io::sink());
                    });
                }
            });
            testing::bg(
                &lab,
                &id,
                &format!("while [ ! -e /tmp/{id}.stop ]; do nc 10.78.0.1 {port} < /tmp/blob; done"),
            );
        }
        // Corrupt once the transfer moves packets, until vstreamd logs the reset.
        let packets = |lab: &Lab| {
            let s = link_status(lab);
            s["packets_in"].as_u64().unwrap_or(0) + s["packets_out"].as_u64().unwrap_or(0)
        };
        let p0 = packets(&lab);
        let deadline = Instant::now() + Duration::from_secs(120);
        while packets(&lab) < p0 + 200 {
            assert!(Instant::now() < deadline, "{}: no traffic", c.what);
            thread::sleep(Duration::from_millis(200));
        }
        let start = Instant::now();
        let mut writes = 0u32;
        loop {
            (c.write)(&file, &rings);
            writes += 1;
            if writes.is_multiple_of(16)
                && lab.daemon_log().matches("fastnet: link reset").count() > log_before
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{}: {writes} writes and no reset\n{}",
                c.what,
                lab.daemon_log()
            );
            thread::sleep(Duration::from_millis(2));
        }
        let detected = start.elapsed();
        // vstreamd answers, counts the reset and names the rule.
        let status = link_status(&lab);
        assert!(resets(&lab) > before, "{}: {status}", c.what);
        let why = status["last_reset"].as_str().unwrap_or_default().to_owned();
        assert!(
            why.contains(c.rule),
            "{}: the error {why:?} does not name {:?}",
            c.what,
            c.rule
        );
        // Stop the guest's sender (its connection may hang on the old link).
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        testing::sh(
            &lab,
            &format!("touch /tmp/{id}.stop; killall nc 2>/dev/null; true"),
        );
        let back = wait_ping(&lab);
        assert_eq!(link_status(&lab)["mode"], "shared-memory");
        // Idle: no thread spins once the link is reset and set up again.
        let (cpu0, _) = cpu_and_rss(pid);
        thread::sleep(Duration::from_secs(3));
        let (cpu1, rss) = cpu_and_rss(pid);
        let idle_cpu = cpu1 - cpu0;
        eprintln!(
            "{}: reset after {detected:.2?} ({writes} writes): {why}\n  \
             link back (ping) after {back:.2?}; vstreamd CPU over 3 s after: {idle_cpu:.2?}; VmRSS {rss} KiB",
            c.what
        );
        assert!(
            idle_cpu < Duration::from_millis(600),
            "{}: vstreamd used {idle_cpu:?} of CPU in 3 s of an idle link",
            c.what
        );
        assert!(
            rss < rss_start + 64 * 1024,
            "{}: vstreamd's VmRSS grew from {rss_start} to {rss} KiB",
            c.what
        );
    }

    // The link set up again carries traffic intact: a ping and the blob, equal SHA-256.
    ping(&lab, 5);
    let (got, took) = guest_to_host(&lab, &ns);
    assert_eq!(got.len(), SIZE, "bytes through the restarted link");
    assert_eq!(
        testing::sha256(&got),
        sum,
        "the bytes changed after the restarts"
    );
    let status = link_status(&lab);
    eprintln!(
        "after {} resets: 16 MiB guest -> host intact in {took:.2?}; link: {status}",
        status["resets"]
    );
}
