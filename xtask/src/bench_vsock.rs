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
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces): state is field 3.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

pub(crate) fn figure(bytes: usize, took: Duration, cpu: f64) -> Figure {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Figure {
        mib_s: bytes as f64 / (1 << 20) as f64 / took.as_secs_f64(),
        cpu_s_per_gib: cpu / gib,
    }
}

fn guest_to_host(lab: &Lab, pid: u32, size: usize, bytes: usize) -> Result<Figure> {
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
    bg(
        lab,
        &id,
        &format!(
            "dd if=/dev/zero bs={size} count={} 2>/dev/null | socat -b {size} -u - VSOCK-CONNECT:2:{G2H_PORT}",
            bytes / size
        ),
    );
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0; 1 << 20];
    let mut got = stream.read(&mut buf)?;
    let (started, cpu0) = (Instant::now(), cpu_seconds(pid)?);
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let (took, cpu) = (started.elapsed(), cpu_seconds(pid)? - cpu0);
    if got != bytes {
        bail!("guest -> host: {got} bytes arrived, {bytes} were sent");
    }
    wait_out(lab, &id, "DONE-rc=0", Duration::from_secs(60));
    Ok(figure(bytes, took, cpu))
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
            "{GUEST_COUNTERS} i0=$(irqs); c0=$(ctxt); \
             socat -b {size} -u VSOCK-LISTEN:{H2G_PORT} - | wc -c; \
             echo \"irqs $(( $(irqs) - i0 )) ctxt $(( $(ctxt) - c0 ))\""
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
    let count = |what: &str| -> Option<u64> {
        let line = out.lines().find(|l| l.starts_with("irqs "))?;
        let mut words = line.split_whitespace();
        words.find(|w| *w == what)?;
        words.next()?.parse().ok()
    };
    let guest = GuestCost {
        irqs: count("irqs").context("the guest's interrupt count")?,
        ctxt: count("ctxt").context("the guest's context switches")?,
    };
    Ok((figure(bytes, took, cpu), guest))
}

/// Shell functions for the guest: `irqs`, the interrupts of the virtio-vsock device's RX
/// queue (or of all its queues, if they share one vector); `ctxt`, context switches so far.
const GUEST_COUNTERS: &str = r#"d=$(basename $(ls -d /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio* | head -n 1)); irqs() { awk -v d="$d" '$NF == d"-rx" || $NF == d"-virtqueues" { n += $2 } END { print n + 0 }' /proc/interrupts; }; ctxt() { awk '/^ctxt/ { print $2 }' /proc/stat; };"#;

/// What a host -> guest transfer cost the guest.
#[derive(Debug, Clone, Copy)]
struct GuestCost {
    irqs: u64,
    ctxt: u64,
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
    // Release builds of vstreamd and vstreamctl: vhost-device-vsock is a release build too.
    // (The guest's agent is the image's static build.)
    let bin = crate::release_build_of(&["vstream-host"])?;
    std::env::set_var("VSTREAM_BIN_DIR", &bin);
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
            let g2h = guest_to_host(&lab, pid, size, bytes)?;
            let (h2g, guest) = host_to_guest(&lab, pid, size, bytes)?;
            eprintln!(
                "{name}: {size} B writes: guest->host {:.1} MiB/s, host->guest {:.1} MiB/s",
                g2h.mib_s, h2g.mib_s
            );
            rows.push((size, g2h, h2g, guest));
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
        for (size, g2h, h2g, _) in rows {
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
    println!("guest's cost per 4 KiB packet received (h->g): RX interrupts, context switches:");
    for (name, _, rows) in &results {
        for (size, _, _, guest) in rows {
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
