//! `cargo xtask bench-fastnet`: fastnet against the other ways a guest gets a network, in one
//! guest, one run: TCP throughput each way and ping latency between the guest and an address on
//! the host side of each path.
//!
//! One guest has all of them at once:
//! - **fastnet shm**: fastnet's rings in an `ivshmem-plain` segment (`mode = "auto"`); host TAP
//!   `vsfn0` (10.78.0.1) in a network namespace;
//! - **virtio-net TAP**: QEMU's `virtio-net-pci` on a TAP (vnet headers, the guest's offloads),
//!   created before QEMU attaches it and then moved into the namespace (10.79.0.1);
//! - **virtio-net user**: QEMU's `virtio-net-pci` on user networking (slirp): the guest reaches
//!   the host's loopback at 10.0.2.2, the host the guest through a `hostfwd` port;
//! - **ppp**: pppd in the guest on a vstream channel, vstreamd's userspace PPP and a TUN
//!   (10.77.0.1) in the namespace;
//! - **fastnet channel**: last, the guest removes its ivshmem device and its agent is restarted:
//!   the new link finds no segment and carries the packets on the channel (virtio-serial).
//!
//! Per path: 20 pings 0.2 s apart (p50 of busybox ping's times); `--mib` MiB (default 64) guest
//! to host (busybox nc from the guest's tmpfs to a listener here) and host to guest (this
//! process connects to busybox `nc -l` in the guest), SHA-256 equal at both ends, timed here
//! from the connection to its end. For fastnet, vstreamd's doorbell counters (both ways) per MiB.
//! During each transfer, the CPU QEMU (the guest's vCPU and QEMU's own device backends) and
//! vstreamd used, in % of one core: a guest at 100% is bound by its CPU, one well below by
//! waiting (latency).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use xtask::lab::testing::{self, receive_one, NetNs};
use xtask::lab::{self, Lab, LabOptions};
use xtask::qemu::Ivshmem;

const UP_TIMEOUT: Duration = Duration::from_secs(180);
/// Writing, hashing or moving tens of MiB in a TCG guest takes minutes.
const EXEC_TIMEOUT: Duration = Duration::from_secs(900);
const PINGS: usize = 20;
/// Where busybox `nc -l` listens in the guest.
const GUEST_PORT: u16 = 7070;
const FASTNET_TAP: &str = "vsfn0";
const SEGMENT_SIZE: u64 = 16 << 20;
const TAP_MAC: &str = "52:54:00:fb:00:01";
const USER_MAC: &str = "52:54:00:fb:00:02";

/// One way from the guest to the host.
struct Route {
    name: &'static str,
    /// The host side's address, as the guest reaches it.
    host: Ipv4Addr,
    /// Where the host connects for host -> guest.
    guest: (Ipv4Addr, u16),
    /// The namespace the host side is in (`None`: this process's, for user networking).
    in_ns: bool,
    /// Count fastnet's doorbells.
    fastnet: bool,
}

/// One route's figures.
struct Figures {
    name: &'static str,
    ping_p50_ms: f64,
    g2h_mib_s: f64,
    h2g_mib_s: f64,
    /// CPU use of QEMU (the guest and its device backends) and of vstreamd during each
    /// transfer, guest -> host and host -> guest, in % of one core.
    cpu: [[f64; 2]; 2],
    /// Doorbells (both ways), packets from the guest and packets to it, per MiB moved, guest
    /// -> host and host -> guest (fastnet only). Packets per MiB the sender's way show its
    /// frame size: 16 would be 64 KiB GSO frames, about 730 one MSS each.
    per_mib: Option<[[f64; 3]; 2]>,
}

fn exec(lab: &Lab, script: &str) -> String {
    testing::exec_sh_within(lab, script, EXEC_TIMEOUT)
}

fn ns_ok(ns: &NetNs, cmd: &[&str]) -> Result<()> {
    let out = ns.exec(cmd);
    if !out.status.success() {
        bail!(
            "{cmd:?} in the namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn host_ok(cmd: &[&str]) -> Result<()> {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The median of busybox ping's `time=X ms` values.
fn ping_p50(output: &str) -> Option<f64> {
    let mut times: Vec<f64> = output
        .split("time=")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}

fn mib_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// Doorbells (both ways), packets from the guest, packets to it, so far (vstreamd's fastnet
/// counters).
fn counters(lab: &Lab) -> Result<[u64; 3]> {
    let status = lab.status()?;
    let s = &lab::guest_status(&status, lab.name()).context("no such guest")?["devices"]["fastnet"];
    let get = |k: &str| s[k].as_u64().unwrap_or(0);
    Ok([
        get("doorbells_out") + get("doorbells_in"),
        get("packets_in"),
        get("packets_out"),
    ])
}

fn fastnet_mode(lab: &Lab, status: &Value) -> Value {
    lab::guest_status(status, lab.name())
        .map(|g| g["devices"]["fastnet"]["mode"].clone())
        .unwrap_or(Value::Null)
}

/// Waits until the guest's fn0 has its address (the link is set up).
fn wait_fn0(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        let out = lab.ctl(["exec", lab.name(), "--", "sh", "-c", "ip addr show dev fn0"])?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("10.78.0.2/24") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the guest's fn0 never got its address");
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Host -> guest: `nc -l` in the guest, this process connects, writes `data`, and waits for the
/// guest to close; the guest's SHA-256 must match. Returns the time and the CPU use (see
/// [`Cpu::since`]).
fn host_to_guest(
    lab: &Lab,
    ns: &NetNs,
    route: &Route,
    id: &str,
    data: &[u8],
) -> Result<(Duration, [f64; 2])> {
    // nc reads stdin too: from the console it would be stopped (SIGTTIN) as a background job.
    testing::bg(
        lab,
        id,
        &format!("nc -l -p {GUEST_PORT} < /dev/null > /tmp/in"),
    );
    // Listening (state 0A; busybox nc takes an IPv6 socket) before the host connects: user
    // networking would accept the connection and drop it.
    exec(
        lab,
        &format!(
            "while ! cat /proc/net/tcp /proc/net/tcp6 | grep -qE ':{GUEST_PORT:04X} [0-9A-F]+:0000 0A'; \
             do sleep 0.2; done"
        ),
    );
    let (addr, port) = route.guest;
    let mut conn = if route.in_ns {
        ns.connect(addr, port)?
    } else {
        TcpStream::connect((addr, port))?
    };
    let (start, cpu0) = (Instant::now(), Cpu::now(lab)?);
    conn.write_all(data)?;
    conn.shutdown(Shutdown::Write)?;
    // The guest's nc closes once it has everything.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    let (took, cpu) = (start.elapsed(), cpu0.since(lab)?);
    testing::wait_out(lab, id, "DONE-rc=0", Duration::from_secs(120));
    let sum = exec(lab, "sha256sum /tmp/in && rm -f /tmp/in");
    if sum.split_whitespace().next() != Some(testing::sha256(data).as_str()) {
        bail!("{}: the bytes changed, host to guest", route.name);
    }
    Ok((took, cpu))
}

/// Measures one route: ping, guest -> host (the guest's /tmp/blob of `data.len()` bytes, SHA-256
/// `sum`), host -> guest (`data`).
fn measure(lab: &Lab, ns: &NetNs, route: &Route, sum: &str, data: &[u8]) -> Result<Figures> {
    let ping = exec(lab, &format!("ping -c {PINGS} -i 0.2 {}", route.host));
    let ping_p50_ms = ping_p50(&ping).with_context(|| format!("{}: {ping}", route.name))?;

    let listener = if route.in_ns {
        ns.listen(route.host)
    } else {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
    };
    let port = listener.local_addr()?.port();
    let rx = receive_one(listener);
    let before = route.fastnet.then(|| counters(lab)).transpose()?;
    let cpu0 = Cpu::now(lab)?;
    exec(lab, &format!("nc {} {port} < /tmp/blob", route.host));
    let (got, up) = rx.join().map_err(|_| anyhow::anyhow!("receiver"))?;
    let cpu_up = cpu0.since(lab)?;
    if got.len() != data.len() || testing::sha256(&got) != sum {
        bail!(
            "{}: guest -> host: {} bytes arrived of {}, or they changed",
            route.name,
            got.len(),
            data.len()
        );
    }
    drop(got);
    let middle = route.fastnet.then(|| counters(lab)).transpose()?;
    let (down, cpu_down) = host_to_guest(
        lab,
        ns,
        route,
        &format!("h2g-{}", route.name.replace(' ', "-")),
        data,
    )?;
    let after = route.fastnet.then(|| counters(lab)).transpose()?;
    let mib = data.len() as f64 / (1 << 20) as f64;
    let per = |a: [u64; 3], b: [u64; 3]| [0, 1, 2].map(|i| (b[i] - a[i]) as f64 / mib);
    let per_mib = match (before, middle, after) {
        (Some(a), Some(b), Some(c)) => Some([per(a, b), per(b, c)]),
        _ => None,
    };
    let f = Figures {
        name: route.name,
        ping_p50_ms,
        g2h_mib_s: mib_s(data.len(), up),
        h2g_mib_s: mib_s(data.len(), down),
        cpu: [cpu_up, cpu_down],
        per_mib,
    };
    eprintln!(
        "{}: ping p50 {:.2} ms, guest->host {:.1} MiB/s (QEMU {:.0}%, vstreamd {:.0}% CPU), \
         host->guest {:.1} MiB/s (QEMU {:.0}%, vstreamd {:.0}%){}",
        f.name,
        f.ping_p50_ms,
        f.g2h_mib_s,
        f.cpu[0][0],
        f.cpu[0][1],
        f.h2g_mib_s,
        f.cpu[1][0],
        f.cpu[1][1],
        f.per_mib
            .map(|[u, d]| format!(
                ", per MiB guest->host {:.1} doorbells, packets {:.0} from the guest {:.0} to it; \
                 host->guest {:.1} doorbells, packets {:.0} from the guest {:.0} to it",
                u[0], u[1], u[2], d[0], d[1], d[2]
            ))
            .unwrap_or_default()
    );
    Ok(f)
}

/// QEMU's and vstreamd's CPU time at one moment.
struct Cpu {
    at: Instant,
    seconds: [f64; 2],
}

impl Cpu {
    fn now(lab: &Lab) -> Result<Cpu> {
        let (qemu, daemon) = lab.pids();
        let get = |pid: Option<u32>| crate::bench_vsock::cpu_seconds(pid.context("not running")?);
        Ok(Cpu {
            at: Instant::now(),
            seconds: [get(qemu)?, get(daemon)?],
        })
    }

    /// % of one core each used since `self`.
    fn since(&self, lab: &Lab) -> Result<[f64; 2]> {
        let now = Cpu::now(lab)?;
        let wall = now.at.duration_since(self.at).as_secs_f64();
        Ok([0, 1].map(|i| 100.0 * (now.seconds[i] - self.seconds[i]) / wall))
    }
}

/// Figure `k` of [`Figures::per_mib`] in direction `i` (0: guest -> host), or `-`.
fn per_mib(f: &Figures, i: usize, k: usize) -> String {
    f.per_mib
        .map(|p| format!("{:.1}", p[i][k]))
        .unwrap_or_else(|| "-".into())
}

/// The guest's interface with MAC `mac`, given `addr` and up.
fn guest_nic(lab: &Lab, mac: &str, addr: &str) {
    exec(
        lab,
        &format!(
            "IF=$(grep -l {mac} /sys/class/net/*/address | cut -d/ -f5) && \
             ip addr add {addr} dev $IF && ip link set $IF up && sleep 1"
        ),
    );
}

/// Runs the benchmark; `args`: `--mib N` (default 64) per transfer.
pub fn run(args: &[String]) -> Result<()> {
    let mut mib = 64usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mib" => mib = crate::positive_arg(&mut it, "--mib")?,
            other => bail!("bench-fastnet: unknown option {other:?} (options: --mib N)"),
        }
    }
    let size = mib << 20;
    // Release vstreamd and vstreamctl; the guest's agent is the image's static build.
    let bin = crate::release_build_of(&["vstream-host"])?;
    std::env::set_var("VSTREAM_BIN_DIR", &bin);

    let ns = NetNs::new("fnbench");
    let pid = std::process::id();
    // QEMU opens the TAP by name in this namespace; it moves into `ns` once attached.
    let qemu_tap = format!("vsbt{}", pid % 100_000);
    host_ok(&[
        "ip", "tuntap", "add", "dev", &qemu_tap, "mode", "tap", "vnet_hdr",
    ])?;
    let result = bench(&ns, &qemu_tap, size);
    // Gone with the namespace if it moved there; otherwise here.
    let _ = host_ok(&["ip", "link", "del", &qemu_tap]);
    let (accel, rows) = result?;

    println!(
        "bench-fastnet: {mib} MiB of TCP each way per path, {PINGS} pings, one guest, one run ({accel})"
    );
    println!(
        "{:<18} {:>10} {:>12} {:>12} {:>16} {:>16} {:>16} {:>16} {:>15} {:>15}",
        "path",
        "ping p50",
        "g->h MiB/s",
        "h->g MiB/s",
        "bells/MiB g->h",
        "bells/MiB h->g",
        "CPU% g->h Q/d",
        "CPU% h->g Q/d",
        "pkts/MiB g->h",
        "pkts/MiB h->g"
    );
    for f in &rows {
        println!(
            "{:<18} {:>7.2} ms {:>12.1} {:>12.1} {:>16} {:>16} {:>16} {:>16} {:>15} {:>15}",
            f.name,
            f.ping_p50_ms,
            f.g2h_mib_s,
            f.h2g_mib_s,
            per_mib(f, 0, 0),
            per_mib(f, 1, 0),
            format!("{:.0}/{:.0}", f.cpu[0][0], f.cpu[0][1]),
            format!("{:.0}/{:.0}", f.cpu[1][0], f.cpu[1][1]),
            // The sender's frames: their size is 1 MiB / this.
            per_mib(f, 0, 1),
            per_mib(f, 1, 2)
        );
    }
    let shm = &rows[0];
    println!("ratios, fastnet shm / each (throughput: >1 is better; ping: <1 is better):");
    for f in &rows[1..] {
        println!(
            "  vs {:<16} g->h {:.2}x, h->g {:.2}x, ping p50 {:.2}x",
            f.name,
            shm.g2h_mib_s / f.g2h_mib_s,
            shm.h2g_mib_s / f.h2g_mib_s,
            shm.ping_p50_ms / f.ping_p50_ms
        );
    }
    Ok(())
}

/// Boots the guest with every path and measures each; returns the accelerator and the rows,
/// fastnet's shared-memory mode first.
fn bench(ns: &NetNs, qemu_tap: &str, size: usize) -> Result<(String, Vec<Figures>)> {
    ns_ok(
        ns,
        &[
            "ip",
            "tuntap",
            "add",
            "dev",
            FASTNET_TAP,
            "mode",
            "tap",
            "vnet_hdr",
        ],
    )?;
    ns_ok(
        ns,
        &["ip", "addr", "add", "10.78.0.1/24", "dev", FASTNET_TAP],
    )?;
    ns_ok(ns, &["ip", "link", "set", "dev", FASTNET_TAP, "up"])?;
    let hostfwd = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let segment =
        std::path::PathBuf::from(format!("/dev/shm/vstream-fnbench-{}", std::process::id()));
    let options = LabOptions {
        ivshmem: Some(Ivshmem {
            path: segment.clone(),
            size: SEGMENT_SIZE,
        }),
        // The blob and what arrives stay in the guest's RAM (tmpfs).
        memory_mib: 512 + 2 * (size >> 20) as u32,
        extra_kernel_args: vec!["vstream.fastnet=fn0".into()],
        extra_qemu_args: [
            "-netdev",
            &format!("tap,id=bt0,ifname={qemu_tap},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-pci,netdev=bt0,mac={TAP_MAC}"),
            "-netdev",
            &format!("user,id=bu0,ipv6=off,hostfwd=tcp:127.0.0.1:{hostfwd}-10.0.2.15:{GUEST_PORT}"),
            "-device",
            &format!("virtio-net-pci,netdev=bu0,mac={USER_MAC}"),
        ]
        .map(String::from)
        .to_vec(),
        extra_config: format!(
            "\n[guest.fastnet]\ntap = \"{FASTNET_TAP}\"\nnetns = \"{ns}\"\n\
             guest_address = \"10.78.0.2/24\"\nmtu = 1500\nmode = \"auto\"\n\
             segment = \"{seg}\"\nsegment_size = {SEGMENT_SIZE}\n\
             \n[guest.ppp]\nlocal = \"10.77.0.1\"\nremote = \"10.77.0.2\"\nmtu = 1500\n\
             backend = \"tun\"\nnetns = \"{ns}\"\n",
            ns = ns.0,
            seg = segment.display()
        ),
        ..LabOptions::virtio_port_only().named("fnbench")
    };
    let lab = Lab::boot(options)?;
    // QEMU holds the TAP now: move it to the namespace and give it its address there.
    host_ok(&["ip", "link", "set", qemu_tap, "netns", &ns.0])?;
    ns_ok(ns, &["ip", "addr", "add", "10.79.0.1/24", "dev", qemu_tap])?;
    ns_ok(ns, &["ip", "link", "set", "dev", qemu_tap, "up"])?;
    guest_nic(&lab, TAP_MAC, "10.79.0.2/24");
    guest_nic(&lab, USER_MAC, "10.0.2.15/24");
    wait_fn0(&lab)?;
    let status = lab.status()?;
    if fastnet_mode(&lab, &status) != "shared-memory" {
        bail!("fastnet did not take shared memory: {status}");
    }
    lab.wait_for("the PPP link to be up", UP_TIMEOUT, |s| {
        lab::guest_status(s, lab.name()).map(|g| g["devices"]["ppp"]["state"] == "up") == Some(true)
    })?;

    let sum = exec(
        &lab,
        &format!("head -c {size} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"),
    );
    let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
    // What the host sends: made here, so the host needs no copy of the guest's blob.
    let data = testing::pseudo_random(size, 0x9e37_79b9_7f4a_7c15);
    let fastnet = |name| Route {
        name,
        host: Ipv4Addr::new(10, 78, 0, 1),
        guest: (Ipv4Addr::new(10, 78, 0, 2), GUEST_PORT),
        in_ns: true,
        fastnet: true,
    };
    let routes = [
        fastnet("fastnet shm"),
        Route {
            name: "virtio-net TAP",
            host: Ipv4Addr::new(10, 79, 0, 1),
            guest: (Ipv4Addr::new(10, 79, 0, 2), GUEST_PORT),
            in_ns: true,
            fastnet: false,
        },
        Route {
            name: "virtio-net user",
            host: Ipv4Addr::new(10, 0, 2, 2),
            guest: (Ipv4Addr::LOCALHOST, hostfwd),
            in_ns: false,
            fastnet: false,
        },
        Route {
            name: "ppp",
            host: Ipv4Addr::new(10, 77, 0, 1),
            guest: (Ipv4Addr::new(10, 77, 0, 2), GUEST_PORT),
            in_ns: true,
            fastnet: false,
        },
    ];
    let mut rows = Vec::new();
    for route in &routes {
        rows.push(measure(&lab, ns, route, &sum, &data)?);
    }

    // Channel-only: without its ivshmem device the restarted agent's link takes the channel.
    exec(
        &lab,
        "for d in /sys/bus/pci/devices/*; do \
         [ \"$(cat $d/vendor):$(cat $d/device)\" = 0x1af4:0x1110 ] && echo 1 > $d/remove; done; true",
    );
    lab.console_roundtrip(
        "hvc0",
        "kill $(cat /run/vstream-agent.pid) && echo agent-$((6*7))",
        "agent-42",
        Duration::from_secs(30),
    )?;
    lab.wait_for("fastnet's channel-only link", UP_TIMEOUT, |s| {
        fastnet_mode(&lab, s) == "channel" && lab.mux_transports_up(s)
    })?;
    wait_fn0(&lab)?;
    rows.push(measure(&lab, ns, &fastnet("fastnet channel"), &sum, &data)?);
    let accel = format!("{} accelerator", lab.accel());
    lab.shutdown()?;
    Ok((accel, rows))
}
