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
//! Per path: 20 pings 0.2 s apart (p50 of busybox ping's times), then three transfers of `--mib`
//! MiB (default 64), SHA-256 equal at both ends, timed here from the connection to its end:
//! - guest to host by busybox nc (from the guest's tmpfs to a listener here): it writes 1 KiB at
//!   a time, a small-write sender;
//! - guest to host by busybox httpd (serving the same tmpfs file with sendfile(2)), fetched here
//!   over HTTP/1.0: a bulk sender, as scp or a web server are;
//! - host to guest: this process writes everything at once (already a bulk sender) to busybox
//!   `nc -l` in the guest. A guest wget would change the receiver only, so it is not a row.
//!
//! Around each transfer: the CPU QEMU (the guest's vCPU and QEMU's own device backends) and
//! vstreamd used, in % of one core (a guest at 100% is bound by its CPU, one well below by
//! waiting); the guest's own CPU per MiB (its /proc/stat: user, system, softirq, idle) and its
//! agent's (/proc/PID/stat), with the agent's sleeps and involuntary context switches per MiB
//! (/proc/PID/status: its wake-ups, and the times another task took its CPU); the frames the
//! guest's interface sent per MiB and the TCP segments it sent again per MiB (a frame lost on
//! any path: a full queue drops); for fastnet, vstreamd's doorbells (both ways) and packets
//! per MiB.
//!
//! `--trace-agent` also traces the guest agent's syscalls and context switches (tracefs)
//! during each transfer of the shared-memory route and prints, on stderr, where its time went:
//! user space, and each syscall by descriptor (the TAP, the virtio-serial port, epoll). The
//! tracing slows that route, so its throughput in such a run is not comparable.

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
/// Where busybox httpd serves the guest's /tmp.
const HTTP_PORT: u16 = 8080;
const FASTNET_TAP: &str = "vsfn0";
const SEGMENT_SIZE: u64 = 16 << 20;
const TAP_MAC: &str = "52:54:00:fb:00:01";
const USER_MAC: &str = "52:54:00:fb:00:02";

/// One way from the guest to the host.
struct Route {
    name: &'static str,
    /// The host side's address, as the guest reaches it.
    host: Ipv4Addr,
    /// The guest as the host reaches it, and the ports there of `nc -l` and of httpd.
    guest: (Ipv4Addr, u16, u16),
    /// The namespace the host side is in (`None`: this process's, for user networking).
    in_ns: bool,
    /// Count fastnet's doorbells.
    fastnet: bool,
    /// The guest's interface of this route (a shell word).
    guest_if: String,
    /// Trace the guest's agent during each transfer (`--trace-agent`).
    trace: bool,
}

impl Route {
    fn connect(&self, ns: &NetNs, port: u16) -> std::io::Result<TcpStream> {
        if self.in_ns {
            ns.connect(self.guest.0, port)
        } else {
            TcpStream::connect((self.guest.0, port))
        }
    }
}

/// The three transfers of a route, in the order of [`Figures::legs`].
const LEGS: [&str; 3] = ["g->h nc 1K", "g->h httpd", "h->g"];

/// One transfer's figures.
struct Leg {
    mib_s: f64,
    /// CPU use of QEMU (the guest and its device backends) and of vstreamd, in % of one core.
    cpu: [f64; 2],
    /// The guest's CPU per MiB, in ms: user, system, softirq, idle (its /proc/stat), and its
    /// agent's (user + system, its /proc/PID/stat).
    guest_ms: [f64; 5],
    /// Frames the guest's interface of the route sent per MiB (its sysfs `tx_packets`).
    guest_frames: f64,
    /// TCP segments the guest sent again per MiB (its /proc/net/snmp `RetransSegs`).
    guest_retrans: f64,
    /// The agent's sleeps and involuntary context switches per MiB.
    agent_switches: [f64; 2],
    /// Doorbells (both ways), packets from the guest and packets to it, per MiB (fastnet only).
    /// The sender's packets per MiB show its frames: 16 would be 64 KiB GSO frames, about 730
    /// one MSS each.
    per_mib: Option<[f64; 3]>,
}

/// One route's figures.
struct Figures {
    name: &'static str,
    ping_p50_ms: f64,
    legs: [Leg; 3],
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

/// The shell expression naming the guest's interface with MAC `mac`.
fn mac_if(mac: &str) -> String {
    format!("$(grep -l {mac} /sys/class/net/*/address | cut -d/ -f5)")
}

/// The guest's CPU ticks (USER_HZ, 100 a second) so far: user, system, softirq, idle (its
/// /proc/stat), its agent's user + system, the frames interface `dev` (a shell word) sent,
/// the TCP segments the guest sent again, and the agent's voluntary and involuntary context
/// switches (its sleeps, and the times another task took its CPU).
fn guest_ticks(lab: &Lab, dev: &str) -> Result<[u64; 9]> {
    let out = exec(
        lab,
        &format!(
            "head -1 /proc/stat; P=$(cat /run/vstream-agent.pid); cat /proc/$P/stat; \
             cat /sys/class/net/{dev}/statistics/tx_packets; \
             awk '/^Tcp:/ {{ if (!c) {{ for (i = 1; i <= NF; i++) if ($i == \"RetransSegs\") c = i }} \
             else print $c }}' /proc/net/snmp; \
             awk '/ctxt_switches/ {{ print $2 }}' /proc/$P/status"
        ),
    );
    let mut lines = out.lines();
    let num = |s: &str| {
        s.parse::<u64>()
            .with_context(|| format!("guest counters: {out}"))
    };
    // cpu user nice system idle iowait irq softirq
    let cpu: Vec<u64> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(7)
        .map(num)
        .collect::<Result<_>>()?;
    // Fields after the command name (which may hold spaces): utime and stime are 12 and 13.
    let agent: Vec<&str> = lines
        .next()
        .and_then(|l| l.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let (
        Some(utime),
        Some(stime),
        Some(tx),
        Some(retrans),
        Some(voluntary),
        Some(involuntary),
        &[user, nice, system, idle, iowait, irq, softirq],
    ) = (
        agent.get(11),
        agent.get(12),
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
        &cpu[..],
    )
    else {
        bail!("guest counters: {out}");
    };
    Ok([
        user + nice,
        system + irq,
        softirq,
        idle + iowait,
        num(utime)? + num(stime)?,
        num(tx.trim())?,
        num(retrans.trim())?,
        num(voluntary.trim())?,
        num(involuntary.trim())?,
    ])
}

/// `--trace-agent`: starts tracing the agent's syscalls and context switches in the guest
/// (tracefs, `raw_syscalls` and `sched_switch` of the agent's main thread, which runs every
/// packet loop).
const AGENT_TRACE_START: &str = "T=/sys/kernel/tracing; mount -t tracefs nodev $T 2>/dev/null; \
    echo 0 > $T/tracing_on; echo > $T/trace; echo 16384 > $T/buffer_size_kb; \
    cat /run/vstream-agent.pid > $T/set_event_pid; echo 1 > $T/events/raw_syscalls/enable; \
    echo 1 > $T/events/sched/sched_switch/enable; echo 1 > $T/tracing_on";

/// Stops the trace and sums it up in the guest: the time traced, the agent's time in user space
/// (between a syscall's exit and the next entry, less the time another task had the CPU), its
/// sleeps and preemptions; per syscall number and first argument (the descriptor, in hex) the
/// calls and the time on and off the CPU inside them; last, the agent's descriptors, to name
/// them.
const AGENT_TRACE_STOP: &str = r#"T=/sys/kernel/tracing; echo 0 > $T/tracing_on; echo 0 > $T/events/raw_syscalls/enable; echo 0 > $T/events/sched/sched_switch/enable; cat $T/trace | awk '
/^#/ { next }
{ for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) + 0; e = $(i + 1); break }
  if (!t0) t0 = t; t1 = t
  if (e == "sys_enter:") { a = $(i + 4); sub(/^\(/, "", a); sub(/,$/, "", a); k = $(i + 3) "/" a; st = t; cur = k; if (ux) user += t - ux; ux = 0 }
  else if (e == "sys_exit:") { if (st) { n[cur]++; d[cur] += t - st } st = 0; ux = t }
  else if (e == "sched_switch:") {
    if ($0 ~ /prev_comm=vstream-agent/) { offs = t; if ($0 ~ /prev_state=S/) sl++; else pr++; if (!st && ux) { user += t - ux; ux = 0; uoff = 1 } }
    else if ($0 ~ /next_comm=vstream-agent/ && offs) { off = t - offs; offs = 0; if (st) { d[cur] -= off; o[cur] += off } else if (uoff) { ux = t; uoff = 0 } }
  }
}
END { printf "span %.1f ms, user %.1f ms, sleeps %d, preempted %d\n", (t1 - t0) * 1000, user * 1000, sl, pr
  for (k in n) printf "  nr/fd %s: %d calls, %.2f ms on cpu, %.2f ms off cpu\n", k, n[k], d[k] * 1000, o[k] * 1000 }' | sort -k5 -rn | head -12; ls -l /proc/$(cat /run/vstream-agent.pid)/fd | awk 'NF >= 11 { printf "%s=%s ", $9, $11 } END { print "" }'"#;

/// Runs one transfer of `bytes` (`what`, one of [`LEGS`]): `go` moves them and returns the time
/// that took and what it received. Around it, the CPU of QEMU, vstreamd, the guest and its
/// agent, and fastnet's counters; the agent's trace if the route has `trace`.
fn leg<T>(
    lab: &Lab,
    route: &Route,
    what: &str,
    bytes: usize,
    go: impl FnOnce() -> Result<(Duration, T)>,
) -> Result<(Leg, T)> {
    // The trace spans the counters' reads too (two short execs), so that its own start and its
    // summary, which the guest computes, stay out of the guest's CPU per MiB.
    if route.trace {
        exec(lab, AGENT_TRACE_START);
    }
    let before = route.fastnet.then(|| counters(lab)).transpose()?;
    let guest0 = guest_ticks(lab, &route.guest_if)?;
    let cpu0 = Cpu::now(lab)?;
    let (took, got) = go()?;
    let cpu = cpu0.since(lab)?;
    let guest1 = guest_ticks(lab, &route.guest_if)?;
    let after = route.fastnet.then(|| counters(lab)).transpose()?;
    if route.trace {
        let summary = exec(lab, AGENT_TRACE_STOP);
        eprintln!("{} {what}: the agent's trace\n{summary}", route.name);
    }
    let mib = bytes as f64 / (1 << 20) as f64;
    let per_mib = match (before, after) {
        (Some(a), Some(b)) => Some([0, 1, 2].map(|i| (b[i] - a[i]) as f64 / mib)),
        _ => None,
    };
    let leg = Leg {
        mib_s: mib / took.as_secs_f64(),
        cpu,
        guest_ms: [0, 1, 2, 3, 4].map(|i| (guest1[i] - guest0[i]) as f64 * 10.0 / mib),
        guest_frames: (guest1[5] - guest0[5]) as f64 / mib,
        guest_retrans: (guest1[6] - guest0[6]) as f64 / mib,
        agent_switches: [7, 8].map(|i| (guest1[i] - guest0[i]) as f64 / mib),
        per_mib,
    };
    Ok((leg, got))
}

/// Host -> guest: `nc -l` in the guest, this process connects, writes `data`, and waits for the
/// guest to close; the guest's SHA-256 must match.
fn host_to_guest(lab: &Lab, ns: &NetNs, route: &Route, id: &str, data: &[u8]) -> Result<Leg> {
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
    let (down, ()) = leg(lab, route, LEGS[2], data.len(), || {
        let mut conn = route.connect(ns, route.guest.1)?;
        let start = Instant::now();
        conn.write_all(data)?;
        conn.shutdown(Shutdown::Write)?;
        // The guest's nc closes once it has everything.
        conn.read_to_end(&mut Vec::new())?;
        Ok((start.elapsed(), ()))
    })?;
    testing::wait_out(lab, id, "DONE-rc=0", Duration::from_secs(120));
    let sum = exec(lab, "sha256sum /tmp/in && rm -f /tmp/in");
    if sum.split_whitespace().next() != Some(testing::sha256(data).as_str()) {
        bail!("{}: the bytes changed, host to guest", route.name);
    }
    Ok(down)
}

/// The body of an HTTP response with status 200.
fn http_body(response: &[u8]) -> Option<&[u8]> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = response[..end].split(|&b| b == b'\r').next()?;
    (status.starts_with(b"HTTP/1.") && status.windows(5).any(|w| w == b" 200 "))
        .then(|| &response[end + 4..])
}

/// Measures one route: ping, guest -> host twice (the guest's /tmp/blob of `data.len()` bytes,
/// SHA-256 `sum`: busybox nc, then busybox httpd's sendfile), host -> guest (`data`).
fn measure(lab: &Lab, ns: &NetNs, route: &Route, sum: &str, data: &[u8]) -> Result<Figures> {
    let ping = exec(lab, &format!("ping -c {PINGS} -i 0.2 {}", route.host));
    let ping_p50_ms = ping_p50(&ping).with_context(|| format!("{}: {ping}", route.name))?;
    let check = |how: &str, got: &[u8]| {
        if got.len() != data.len() || testing::sha256(got) != sum {
            bail!(
                "{}: guest -> host by {how}: {} bytes arrived of {}, or they changed",
                route.name,
                got.len(),
                data.len()
            );
        }
        Ok(())
    };

    let listener = if route.in_ns {
        ns.listen(route.host)
    } else {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
    };
    let port = listener.local_addr()?.port();
    let rx = receive_one(listener);
    let (nc, got) = leg(lab, route, LEGS[0], data.len(), || {
        exec(lab, &format!("nc {} {port} < /tmp/blob", route.host));
        let (got, took) = rx.join().map_err(|_| anyhow::anyhow!("receiver"))?;
        Ok((took, got))
    })?;
    check("nc", &got)?;
    drop(got);

    let (http, response) = leg(lab, route, LEGS[1], data.len(), || {
        let mut conn = route.connect(ns, route.guest.2)?;
        let start = Instant::now();
        conn.write_all(b"GET /blob HTTP/1.0\r\n\r\n")?;
        let mut response = Vec::with_capacity(data.len() + 4096);
        conn.read_to_end(&mut response)?;
        Ok((start.elapsed(), response))
    })?;
    check("httpd", http_body(&response).unwrap_or_default())?;
    drop(response);

    let down = host_to_guest(
        lab,
        ns,
        route,
        &format!("h2g-{}", route.name.replace(' ', "-")),
        data,
    )?;
    let f = Figures {
        name: route.name,
        ping_p50_ms,
        legs: [nc, http, down],
    };
    eprintln!("{}: ping p50 {:.2} ms", f.name, f.ping_p50_ms);
    for (name, l) in LEGS.iter().zip(&f.legs) {
        eprintln!("  {name}: {}", leg_line(l));
    }
    Ok(f)
}

/// A transfer's figures after its MiB/s: CPU, the guest's CPU and frames per MiB, and fastnet's
/// doorbells and packets (both ways) per MiB.
fn leg_line(l: &Leg) -> String {
    let [usr, sys, sirq, idle, agent] = l.guest_ms;
    format!(
        "{:>7.1} {:>9} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>9} {:>10.1} {:>6.1} {:>11}",
        l.mib_s,
        format!("{:.0}/{:.0}", l.cpu[0], l.cpu[1]),
        usr,
        sys,
        sirq,
        idle,
        agent,
        format!("{:.0}/{:.0}", l.agent_switches[0], l.agent_switches[1]),
        l.guest_frames,
        l.guest_retrans,
        l.per_mib
            .map(|[bells, from, to]| format!("{bells:.1} {from:.0}/{to:.0}"))
            .unwrap_or_else(|| "-".into())
    )
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

/// The guest's interface with MAC `mac`, given `addr` and up.
fn guest_nic(lab: &Lab, mac: &str, addr: &str) {
    exec(
        lab,
        &format!(
            "IF={} && ip addr add {addr} dev $IF && ip link set $IF up && sleep 1",
            mac_if(mac)
        ),
    );
}

/// Runs the benchmark; `args`: `--mib N` (default 64) per transfer, `--poll-us N` (vstreamd's
/// `poll_us` for the link, default 0), `--trace-agent`.
pub fn run(args: &[String]) -> Result<()> {
    let mut mib = 64usize;
    let mut poll_us = 0usize;
    let mut trace = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mib" => mib = crate::positive_arg(&mut it, "--mib")?,
            "--poll-us" => poll_us = crate::positive_arg(&mut it, "--poll-us")?,
            "--trace-agent" => trace = true,
            other => bail!(
                "bench-fastnet: unknown option {other:?} (options: --mib N, --poll-us N, \
                 --trace-agent)"
            ),
        }
    }
    let size = mib << 20;
    // Release vstreamd and vstreamctl, and the static agent the image takes.
    crate::bench_binaries()?;

    let ns = NetNs::new("fnbench");
    let pid = std::process::id();
    // QEMU opens the TAP by name in this namespace; it moves into `ns` once attached.
    let qemu_tap = format!("vsbt{}", pid % 100_000);
    host_ok(&[
        "ip", "tuntap", "add", "dev", &qemu_tap, "mode", "tap", "vnet_hdr",
    ])?;
    let result = bench(&ns, &qemu_tap, size, poll_us, trace);
    // Gone with the namespace if it moved there; otherwise here.
    let _ = host_ok(&["ip", "link", "del", &qemu_tap]);
    let (accel, rows) = result?;

    println!(
        "bench-fastnet: {mib} MiB of TCP per transfer, {PINGS} pings, one guest, one run ({accel}); \
         vstreamd's poll_us {poll_us}"
    );
    println!(
        "guest -> host by busybox nc (1 KiB writes) and by busybox httpd (sendfile of the file); \
         host -> guest: this process writes it all at once to busybox nc -l"
    );
    println!(
        "{:<16} {:<11} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>6} {:>11}",
        "path",
        "transfer",
        "MiB/s",
        "CPU% Q/d",
        "usr ms",
        "sys ms",
        "sirq ms",
        "idle ms",
        "agent ms",
        "agent v/n",
        "frames tx",
        "retx",
        "bells pkts"
    );
    println!(
        "{:<28} {:>7} {:>9} {:>55} {:>17} {:>11}",
        "",
        "",
        "",
        "(the guest's CPU and agent's switches per MiB)",
        "(guest per MiB)",
        "(fastnet)"
    );
    for f in &rows {
        for (name, l) in LEGS.iter().zip(&f.legs) {
            println!("{:<16} {name:<11} {}", f.name, leg_line(l));
        }
    }
    println!("ping p50:");
    for f in &rows {
        println!("  {:<16} {:.2} ms", f.name, f.ping_p50_ms);
    }
    let shm = &rows[0];
    println!("ratios, fastnet shm / each (throughput: >1 is better; ping: <1 is better):");
    for f in &rows[1..] {
        let r = |i: usize| shm.legs[i].mib_s / f.legs[i].mib_s;
        println!(
            "  vs {:<16} g->h nc {:.2}x, g->h httpd {:.2}x, h->g {:.2}x, ping p50 {:.2}x",
            f.name,
            r(0),
            r(1),
            r(2),
            shm.ping_p50_ms / f.ping_p50_ms
        );
    }
    for (name, l) in LEGS.iter().zip(&shm.legs) {
        if let Some([bells, from, to]) = l.per_mib {
            println!(
                "  fastnet shm {name:<11} per MiB: {bells:.1} doorbells, {from:.0} packets from \
                 the guest, {to:.0} to it"
            );
        }
    }
    Ok(())
}

/// Boots the guest with every path and measures each; returns the accelerator and the rows,
/// fastnet's shared-memory mode first.
fn bench(
    ns: &NetNs,
    qemu_tap: &str,
    size: usize,
    poll_us: usize,
    trace: bool,
) -> Result<(String, Vec<Figures>)> {
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
    // Two free ports at once (both bound while asked), for nc and httpd.
    let free = [(); 2].map(|()| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)));
    let [hostfwd, hostfwd_http] = [&free[0], &free[1]].map(|l| {
        l.as_ref()
            .ok()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port())
    });
    if hostfwd == 0 || hostfwd_http == 0 {
        bail!("no free port on the loopback for user networking's hostfwd");
    }
    drop(free);
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
            &format!(
                "user,id=bu0,ipv6=off,hostfwd=tcp:127.0.0.1:{hostfwd}-10.0.2.15:{GUEST_PORT},\
                 hostfwd=tcp:127.0.0.1:{hostfwd_http}-10.0.2.15:{HTTP_PORT}"
            ),
            "-device",
            &format!("virtio-net-pci,netdev=bu0,mac={USER_MAC}"),
        ]
        .map(String::from)
        .to_vec(),
        extra_config: format!(
            "\n[guest.fastnet]\ntap = \"{FASTNET_TAP}\"\nnetns = \"{ns}\"\n\
             guest_address = \"10.78.0.2/24\"\nmtu = 1500\nmode = \"auto\"\n\
             segment = \"{seg}\"\nsegment_size = {SEGMENT_SIZE}\npoll_us = {poll_us}\n\
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
        // busybox httpd (daemonized) serves it with sendfile(2).
        &format!(
            "head -c {size} /dev/urandom > /tmp/blob && httpd -p {HTTP_PORT} -h /tmp && \
             sha256sum /tmp/blob"
        ),
    );
    let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
    // What the host sends: made here, so the host needs no copy of the guest's blob.
    let data = testing::pseudo_random(size, 0x9e37_79b9_7f4a_7c15);
    let fastnet = |name, trace| Route {
        name,
        host: Ipv4Addr::new(10, 78, 0, 1),
        guest: (Ipv4Addr::new(10, 78, 0, 2), GUEST_PORT, HTTP_PORT),
        in_ns: true,
        fastnet: true,
        guest_if: "fn0".into(),
        trace,
    };
    let routes = [
        fastnet("fastnet shm", trace),
        Route {
            name: "virtio-net TAP",
            host: Ipv4Addr::new(10, 79, 0, 1),
            guest: (Ipv4Addr::new(10, 79, 0, 2), GUEST_PORT, HTTP_PORT),
            in_ns: true,
            fastnet: false,
            guest_if: mac_if(TAP_MAC),
            trace: false,
        },
        Route {
            name: "virtio-net user",
            host: Ipv4Addr::new(10, 0, 2, 2),
            guest: (Ipv4Addr::LOCALHOST, hostfwd, hostfwd_http),
            in_ns: false,
            fastnet: false,
            guest_if: mac_if(USER_MAC),
            trace: false,
        },
        Route {
            name: "ppp",
            host: Ipv4Addr::new(10, 77, 0, 1),
            guest: (Ipv4Addr::new(10, 77, 0, 2), GUEST_PORT, HTTP_PORT),
            in_ns: true,
            fastnet: false,
            guest_if: "ppp0".into(),
            trace: false,
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
    rows.push(measure(
        &lab,
        ns,
        &fastnet("fastnet channel", false),
        &sum,
        &data,
    )?);
    let accel = format!("{} accelerator", lab.accel());
    lab.shutdown()?;
    Ok((accel, rows))
}
