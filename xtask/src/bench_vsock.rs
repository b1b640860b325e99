//! `cargo xtask bench-vsock`: vstreamd's own virtio-vsock device against rust-vmm's
//! vhost-device-vsock, in the same guest image, with the same transfers.
//!
//! For each backend one guest boots (`LabVsock::Vstreamd`, then `LabVsock::VhostDeviceVsock`);
//! raw AF_VSOCK streams (socat in the guest, nothing of vstream's in the data path but the
//! device) move `--mib` MiB each way with 4 KiB and 64 KiB writes:
//! - guest -> host: `socat` connects to host port 7000; the device hands the connection to the
//!   Unix socket `<uds>_7000`, where this process counts the bytes;
//! - host -> guest: this process connects through the hybrid socket (`CONNECT 7001`) to a
//!   `socat` listening in the guest and writes; the guest closes after end of file.
//!
//! Throughput is measured on the host from the first byte to the end; CPU is the backend
//! process's user + system time over the transfer (for vstreamd, the whole daemon), per GiB.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use xtask::lab::testing::{bg, wait_out};
use xtask::lab::{Lab, LabOptions, LabVsock};

const G2H_PORT: u32 = 7000;
const H2G_PORT: u32 = 7001;
const SIZES: [usize; 2] = [4096, 65536];

/// One transfer's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figure {
    pub(crate) mib_s: f64,
    pub(crate) cpu_s_per_gib: f64,
}

/// CPU seconds (user + system) process `pid` has used.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}"))
}

/// CPU seconds (user + system) in `dir/stat` (a process's or a thread's).
fn stat_cpu_seconds(dir: &str) -> Result<f64> {
    let stat = fs::read_to_string(format!("{dir}/stat"))?;
    // Fields after the command name (which may contain spaces): state is field 3.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Each thread of `pid`: its name and CPU seconds so far.
fn thread_cpu(pid: u32) -> HashMap<String, (String, f64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path().display().to_string();
        let name = fs::read_to_string(format!("{dir}/comm")).unwrap_or_default();
        if let Ok(cpu) = stat_cpu_seconds(&dir) {
            let tid = task.file_name().to_string_lossy().into_owned();
            out.insert(tid, (name.trim().to_owned(), cpu));
        }
    }
    out
}

/// The thread of `pid` that used the most CPU since `before` (from [`thread_cpu`]): its name
/// and seconds (the device's worker, for both backends, as both run on vhost-user-backend).
fn busiest_thread(pid: u32, before: &HashMap<String, (String, f64)>) -> (String, f64) {
    thread_cpu(pid)
        .into_iter()
        .map(|(tid, (name, cpu))| {
            let was = before.get(&tid).map_or(0.0, |(_, c)| *c);
            (name, cpu - was)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}

pub(crate) fn figure(bytes: usize, took: Duration, cpu: f64) -> Figure {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Figure {
        mib_s: bytes as f64 / (1 << 20) as f64 / took.as_secs_f64(),
        cpu_s_per_gib: cpu / gib,
    }
}

/// What a guest -> host transfer cost, besides its [`Figure`].
#[derive(Debug, Clone, Default)]
struct G2hCost {
    guest: GuestCost,
    /// The backend's busiest thread over the transfer: name, CPU seconds.
    worker: (String, f64),
    /// QEMU's CPU seconds per second of transfer (its vCPU thread is the TCG guest's CPU).
    qemu: f64,
    /// The guest's idle seconds per second of transfer.
    guest_idle: f64,
    /// MiB/s of the same guest pipeline into /dev/null instead of the vsock: what any device
    /// could reach at most with this guest, at this moment.
    ceiling: f64,
    /// vstreamd's device counters over the transfer (from its log; none for the other backend).
    device: Option<DeviceCounters>,
}

/// The line vstreamd's vsock device logs (at debug) when a connection ends, with its counters.
const CONN_ENDED: &str = "vsock: connection ended";

/// The device's counters named in a [`CONN_ENDED`] line (`name: N` pairs).
type DeviceCounters = HashMap<String, u64>;

fn device_counters(line: &str) -> DeviceCounters {
    let Some((_, rest)) = line.split_once("Counters {") else {
        return DeviceCounters::new();
    };
    let body = rest.split_once('}').map_or(rest, |(b, _)| b);
    body.split(',')
        .filter_map(|pair| {
            let (name, n) = pair.split_once(':')?;
            Some((name.trim().to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}

/// The counters of the last [`CONN_ENDED`] line of `log`, and how many such lines it has.
fn last_counters(log: &str) -> (usize, DeviceCounters) {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(CONN_ENDED)).collect();
    let last = lines.last().map(|l| device_counters(l)).unwrap_or_default();
    (lines.len(), last)
}

/// The guest side of a guest -> host transfer, `sink` standing for where socat writes.
fn guest_pipeline(size: usize, bytes: usize, sink: &str) -> String {
    format!(
        "dd if=/dev/zero bs={size} count={} 2>/dev/null | socat -b {size} -u - {sink}",
        bytes / size
    )
}

/// MiB/s of [`guest_pipeline`] into /dev/null, timed by the guest (its uptime: 10 ms ticks).
fn guest_ceiling(lab: &Lab, size: usize, bytes: usize) -> Result<f64> {
    let id = format!("ceiling-{size}");
    bg(
        lab,
        &id,
        &format!(
            "t0=$(cut -d' ' -f1 /proc/uptime); {}; echo \"uptime $t0 $(cut -d' ' -f1 /proc/uptime)\"",
            guest_pipeline(size, bytes, "/dev/null")
        ),
    );
    let out = wait_out(lab, &id, "DONE-rc=0", Duration::from_secs(120));
    let times: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("uptime "))
        .context("the guest's timing")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let took = match times[..] {
        [t0, t1] => (t1 - t0).max(0.01),
        _ => bail!("the guest's timing: {out:?}"),
    };
    Ok(bytes as f64 / (1 << 20) as f64 / took)
}

fn guest_to_host(
    lab: &Lab,
    pid: u32,
    ours: bool,
    size: usize,
    bytes: usize,
) -> Result<(Figure, G2hCost)> {
    let hybrid = lab
        .paths()
        .sockets
        .hybrid_vsock
        .clone()
        .context("no vsock")?;
    let path = hybrid.host_port(G2H_PORT);
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let id = format!("g2h-{size}");
    let ceiling = guest_ceiling(lab, size, bytes)?;
    let (ended_before, counters_before) = last_counters(&lab.daemon_log());
    bg(
        lab,
        &id,
        &format!(
            "{GUEST_COUNTERS} {COUNT_START} {}; {COUNT_END}",
            guest_pipeline(size, bytes, &format!("VSOCK-CONNECT:2:{G2H_PORT}"))
        ),
    );
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0; 1 << 20];
    let mut got = stream.read(&mut buf)?;
    let qemu_pid = lab.pids().0.context("QEMU's pid")?;
    let (started, cpu0, threads0) = (Instant::now(), cpu_seconds(pid)?, thread_cpu(pid));
    let qemu0 = cpu_seconds(qemu_pid)?;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let (took, cpu) = (started.elapsed(), cpu_seconds(pid)? - cpu0);
    let qemu = (cpu_seconds(qemu_pid)? - qemu0) / took.as_secs_f64();
    let worker = busiest_thread(pid, &threads0);
    drop(stream);
    if got != bytes {
        bail!("guest -> host: {got} bytes arrived, {bytes} were sent");
    }
    let out = wait_out(lab, &id, "DONE-rc=0", Duration::from_secs(60));
    // The device logs its counters once the connection is gone (both sides closed).
    let mut device = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours && device.is_none() && Instant::now() < deadline {
        let (ended, after) = last_counters(&lab.daemon_log());
        if ended > ended_before {
            device = Some(
                after
                    .iter()
                    .map(|(k, v)| (k.clone(), v - counters_before.get(k).copied().unwrap_or(0)))
                    .collect(),
            );
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let guest = GuestCost::parse(&out)?;
    let cost = G2hCost {
        guest,
        worker,
        qemu,
        guest_idle: guest.idle as f64 / 100.0 / took.as_secs_f64(),
        ceiling,
        device,
    };
    Ok((figure(bytes, took, cpu), cost))
}

fn host_to_guest(lab: &Lab, pid: u32, size: usize, bytes: usize) -> Result<(Figure, GuestCost)> {
    let uds = lab
        .paths()
        .sockets
        .hybrid_vsock
        .clone()
        .context("no vsock")?
        .uds;
    let id = format!("h2g-{size}");
    // Around the transfer the guest also counts its vsock RX interrupts and its context
    // switches: what one received packet costs the guest, whichever device sends it.
    bg(
        lab,
        &id,
        &format!(
            "{GUEST_COUNTERS} {COUNT_START} \
             socat -b {size} -u VSOCK-LISTEN:{H2G_PORT} - | wc -c; \
             {COUNT_END}"
        ),
    );
    // Connect once the guest listens.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        let mut s = UnixStream::connect(&uds)?;
        s.write_all(format!("CONNECT {H2G_PORT}\n").as_bytes())?;
        let mut answer = Vec::new();
        let mut byte = [0u8];
        while answer.len() < 64 && s.read(&mut byte)? == 1 && byte[0] != b'\n' {
            answer.push(byte[0]);
        }
        if answer.starts_with(b"OK ") {
            break s;
        }
        if Instant::now() > deadline {
            bail!("nothing listens on guest port {H2G_PORT}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let chunk = vec![0x5a; size];
    let (started, cpu0) = (Instant::now(), cpu_seconds(pid)?);
    for _ in 0..bytes / size {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // The guest closes once it has read everything.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    let (took, cpu) = (started.elapsed(), cpu_seconds(pid)? - cpu0);
    let out = wait_out(lab, &id, "DONE-rc=0", Duration::from_secs(60));
    if !out.contains(&bytes.to_string()) {
        bail!("host -> guest: the guest counted {out:?}, {bytes} were sent");
    }
    let guest = GuestCost::parse(&out)?;
    Ok((figure(bytes, took, cpu), guest))
}

/// Shell functions for the guest: `irqs`, the interrupts of the virtio-vsock device (its
/// queues share one vector in the lab's guest, so RX and TX cannot be told apart); `ctxt`,
/// context switches so far; `idle`, the CPUs' idle time so far (USER_HZ ticks).
const GUEST_COUNTERS: &str = r#"d=$(basename $(ls -d /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio* | head -n 1)); irqs() { awk -v d="$d" 'index($NF, d"-") == 1 { n += $2 } END { print n + 0 }' /proc/interrupts; }; ctxt() { awk '/^ctxt/ { print $2 }' /proc/stat; }; idle() { awk '/^cpu / { print $5 }' /proc/stat; };"#;
/// Guest shell around a transfer: the counters before, and their growth printed after.
const COUNT_START: &str = "i0=$(irqs); c0=$(ctxt); z0=$(idle);";
const COUNT_END: &str = r#"echo "guest-cost irqs $(( $(irqs) - i0 )) ctxt $(( $(ctxt) - c0 )) idle $(( $(idle) - z0 ))""#;

/// What a transfer cost the guest: its vsock interrupts, its context switches, and how long
/// its CPUs were idle (USER_HZ ticks: 1/100 s).
#[derive(Debug, Clone, Copy, Default)]
struct GuestCost {
    irqs: u64,
    ctxt: u64,
    idle: u64,
}

impl GuestCost {
    /// From the `guest-cost` line [`COUNT_END`] printed.
    fn parse(out: &str) -> Result<GuestCost> {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("guest-cost "))
            .context("the guest's interrupt and context switch counts")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let count = |what: &str| -> Result<u64> {
            let at = words
                .iter()
                .position(|w| *w == what)
                .context(what.to_owned())?;
            Ok(words.get(at + 1).context(what.to_owned())?.parse()?)
        };
        Ok(GuestCost {
            irqs: count("irqs")?,
            ctxt: count("ctxt")?,
            idle: count("idle")?,
        })
    }
}

/// Runs the benchmark; `args`: `--mib N` (default 32) per transfer.
pub fn run(args: &[String]) -> Result<()> {
    let mut mib = 32usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mib" => mib = crate::positive_arg(&mut it, "--mib")?,
            other => bail!("bench-vsock: unknown option {other:?} (options: --mib N)"),
        }
    }
    let bytes = mib << 20;
    // Release builds of vstreamd and vstreamctl (vhost-device-vsock is a release build too),
    // and the static agent the image takes.
    crate::bench_binaries()?;
    // The vsock device's counters come with its debug line for each connection that ends.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info,vstream_transport::vhost_vsock=debug");
    }
    let backends = [
        ("vstreamd", LabVsock::Vstreamd),
        ("vhost-device-vsock", LabVsock::VhostDeviceVsock),
    ];
    // [backend][direction][size]
    let mut results = Vec::new();
    for (name, backend) in backends {
        let options = LabOptions {
            vsock: backend,
            ..LabOptions::vsock_only().named(&format!("bench{}", results.len()))
        };
        let lab = Lab::boot(options)?;
        lab.wait_for("the vsock session", Duration::from_secs(180), |s| {
            lab.mux_transports_up(s)
        })?;
        let pid = lab
            .vsock_backend_pid()
            .context("the backend process's pid")?;
        let mut rows = Vec::new();
        for size in SIZES {
            let ours = backend == LabVsock::Vstreamd;
            let (g2h, g2h_cost) = guest_to_host(&lab, pid, ours, size, bytes)?;
            let (h2g, guest) = host_to_guest(&lab, pid, size, bytes)?;
            eprintln!(
                "{name}: {size} B writes: guest->host {:.1} MiB/s, host->guest {:.1} MiB/s",
                g2h.mib_s, h2g.mib_s
            );
            rows.push((size, g2h, h2g, guest, g2h_cost));
        }
        let accel = lab.accel().to_string();
        lab.shutdown()?;
        results.push((name, accel, rows));
    }
    println!(
        "bench-vsock: {mib} MiB per transfer, one run, guest {}",
        results[0].1
    );
    println!(
        "{:<20} {:>7} {:>14} {:>14} {:>14} {:>14}",
        "backend", "write", "g->h MiB/s", "g->h CPU s/GiB", "h->g MiB/s", "h->g CPU s/GiB"
    );
    for (name, _, rows) in &results {
        for (size, g2h, h2g, _, _) in rows {
            println!(
                "{:<20} {:>7} {:>14.1} {:>14.2} {:>14.1} {:>14.2}",
                name,
                format!("{} KiB", size / 1024),
                g2h.mib_s,
                g2h.cpu_s_per_gib,
                h2g.mib_s,
                h2g.cpu_s_per_gib
            );
        }
    }
    // A Linux guest offers 4 KiB RX buffers: one packet per 4 KiB, whatever the host writes.
    let packets = bytes.div_ceil(4096) as f64;
    println!("guest's cost per 4 KiB packet received (h->g): vsock interrupts, context switches:");
    for (name, _, rows) in &results {
        for (size, _, _, guest, _) in rows {
            println!(
                "  {:<20} {:>7} {:>8.3} {:>8.2}",
                name,
                format!("{} KiB", size / 1024),
                guest.irqs as f64 / packets,
                guest.ctxt as f64 / packets
            );
        }
    }
    println!(
        "guest -> host, per MiB: the guest's vsock interrupts and context switches; per second: \
         the guest's idle time, QEMU's CPU; the backend's busiest thread (CPU s/GiB); the guest's \
         ceiling (its pipeline into /dev/null, MiB/s)"
    );
    let per_mib = |n: u64| n as f64 / mib as f64;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    for (name, _, rows) in &results {
        for (size, _, _, _, cost) in rows {
            println!(
                "  {:<20} {:>7} irqs {:>6.1} ctxt {:>7.1}; idle {:.2} s/s, QEMU {:.2} s/s; {} {:.2}; \
                 ceiling {:.1}",
                name,
                format!("{} KiB", size / 1024),
                per_mib(cost.guest.irqs),
                per_mib(cost.guest.ctxt),
                cost.guest_idle,
                cost.qemu,
                cost.worker.0,
                cost.worker.1 / gib,
                cost.ceiling
            );
        }
    }
    println!("vstreamd's device, guest -> host, per MiB (from its counters):");
    for (_, _, rows) in results.iter().filter(|r| r.0 == "vstreamd") {
        for (size, _, _, _, cost) in rows {
            let Some(d) = &cost.device else {
                println!(
                    "  {:>2} KiB: no counters (no debug line in the log)",
                    size / 1024
                );
                continue;
            };
            let n = |k: &str| d.get(k).copied().unwrap_or(0);
            println!(
                "  {:>2} KiB: TX kicks {:.1}, chains {:.1} ({:.0} B each), credit updates {:.1}, \
                 host writes {:.1} ({:.0} B each), host socket full {:.1}",
                size / 1024,
                per_mib(n("tx_kicks")),
                per_mib(n("tx_chains")),
                n("tx_bytes") as f64 / n("tx_chains").max(1) as f64,
                per_mib(n("credit_updates")),
                per_mib(n("host_writes")),
                n("host_bytes") as f64 / n("host_writes").max(1) as f64,
                per_mib(n("host_full")),
            );
        }
    }
    println!(
        "ratios, vstreamd / vhost-device-vsock (throughput: >1 is better; CPU: <1 is better):"
    );
    for (i, size) in SIZES.iter().enumerate() {
        let (a, b) = (&results[0].2[i], &results[1].2[i]);
        println!(
            "  {:>2} KiB: g->h throughput {:.2}x, CPU {:.2}x; h->g throughput {:.2}x, CPU {:.2}x",
            size / 1024,
            a.1.mib_s / b.1.mib_s,
            a.1.cpu_s_per_gib / b.1.cpu_s_per_gib,
            a.2.mib_s / b.2.mib_s,
            a.2.cpu_s_per_gib / b.2.cpu_s_per_gib
        );
    }
    Ok(())
}
