//! `cargo xtask bench-qga`: vstream-agent against Debian's qemu-ga in one guest, on the same
//! kind of route (a raw virtio-serial port each, see [`xtask::qga_lab`]): guest-ping latency,
//! guest-file-read throughput and resident memory. Prints one table; see docs/PERFORMANCE.md.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use xtask::qga_lab::{QgaConn, QgaLab};

const FILE: &str = "/tmp/qga-bench.bin";

struct Options {
    count: usize,
    repeats: usize,
    size_mib: usize,
    chunk_mib: usize,
    depth: usize,
    big_chunk_mib: usize,
    direct: bool,
}

fn usage() -> &'static str {
    "bench-qga [--count N] [--repeats R] [--size MIB] [--chunk MIB] [--depth D] [--big-chunk MIB] [--direct]
  --count      sequential guest-pings per agent and repeat (500)
  --repeats    repeats of every measurement; the median is reported (3)
  --size       size of the guest file read (64 MiB)
  --chunk      guest-file-read count, the same for both agents (4 MiB)
  --depth      reads in flight for vstream-agent's pipelined figure (4)
  --big-chunk  qemu-ga's larger read for its best figure (16 MiB; qemu-ga refuses > 48 MB)
  --direct     talk to QEMU's chardev sockets instead of going through vstreamd"
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        count: 500,
        repeats: 3,
        size_mib: 64,
        chunk_mib: 4,
        depth: 4,
        big_chunk_mib: 16,
        direct: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut num = |name: &str| crate::positive_arg(&mut it, name);
        match arg.as_str() {
            "--count" => o.count = num("--count")?,
            "--repeats" => o.repeats = num("--repeats")?,
            "--size" => o.size_mib = num("--size")?,
            "--chunk" => o.chunk_mib = num("--chunk")?,
            "--depth" => o.depth = num("--depth")?,
            "--big-chunk" => o.big_chunk_mib = num("--big-chunk")?,
            "--direct" => o.direct = true,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("bench-qga: unknown option {other:?}\n{}", usage()),
        }
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// p50, p99 and mean of one series, in µs.
#[derive(Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn pings(conn: &mut QgaConn, n: usize) -> Result<Lat> {
    let ping = json!({"execute": "guest-ping"});
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = conn.call(&ping)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if r != json!({}) {
            bail!("guest-ping returned {r}");
        }
    }
    Ok(latency(us))
}

/// `n` guest-ping requests through `cat` echoing them back ([`QgaLab::start_floor`]): the
/// route without an agent.
fn echo_pings(s: &mut UnixStream, n: usize) -> Result<Lat> {
    let ping = b"{\"execute\":\"guest-ping\"}\n";
    let mut back = [0u8; 64];
    let back = &mut back[..ping.len()];
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(ping)?;
        s.read_exact(back)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if back != ping {
            bail!("the echo returned {:?}", String::from_utf8_lossy(back));
        }
    }
    Ok(latency(us))
}

/// [`Lat`] of `n` (> 0) round trips in µs.
fn latency(mut us: Vec<f64>) -> Lat {
    let n = us.len();
    let mean = us.iter().sum::<f64>() / n as f64;
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us[((n as f64 * p).ceil() as usize).clamp(1, n) - 1];
    Lat {
        p50: pct(0.50),
        p99: pct(0.99),
        mean,
    }
}

/// Decodes and hashes base64 off the measuring thread: a writer thread feeds GNU
/// `base64 -d | sha256sum` (it accepts padded pieces back to back), on the other core.
struct Checker {
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    thread: Option<thread::JoinHandle<Result<String>>>,
}

impl Checker {
    fn new() -> Result<Checker> {
        let mut child = Command::new("sh")
            .args(["-c", "base64 -d | sha256sum"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("base64 -d | sha256sum")?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(64);
        let thread = thread::spawn(move || -> Result<String> {
            for piece in rx {
                stdin.write_all(&piece)?;
            }
            drop(stdin);
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("base64 -d | sha256sum failed: {}", out.status);
            }
            Ok(text(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned())
        });
        Ok(Checker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn push(&self, b64: &[u8]) -> std::io::Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(b64.to_vec()).ok())
            .ok_or_else(|| std::io::Error::other("the checker ended early"))
    }

    /// The SHA-256 of everything decoded.
    fn finish(mut self) -> Result<String> {
        drop(self.tx.take());
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => bail!("the checker thread failed"),
        }
    }
}

/// Reads the bench file once: MiB/s (open to close), after checking the data.
fn read_once(
    conn: &mut QgaConn,
    o: &Options,
    chunk: usize,
    depth: usize,
    digest: &str,
) -> Result<f64> {
    let checker = Checker::new()?;
    let t = Instant::now();
    let n = conn.read_file_b64(FILE, chunk, depth, &mut |b64| checker.push(b64))?;
    let secs = t.elapsed().as_secs_f64();
    if n != (o.size_mib as u64) << 20 {
        bail!("read {n} bytes of {}", o.size_mib << 20);
    }
    if checker.finish()? != digest {
        bail!("the data read differs from the guest's file (sha256)");
    }
    Ok(o.size_mib as f64 / secs)
}

/// `VmRSS`, `VmHWM`, `RssAnon` (the process's own heap and stacks, without the pages of its
/// binary and libraries) and `AnonHugePages` (the part of `RssAnon` in transparent huge pages:
/// the guest kernel's THP setting is `always`, so one 2 MiB page can stand for a few KiB
/// used) of a process, in KiB.
type Memory = [f64; 4];

/// [`Memory`] of guest process `pid`, read through `conn`.
fn memory(conn: &mut QgaConn, pid: u32) -> Result<Memory> {
    let mut field = |file: &str, name: &str| -> Result<f64> {
        let path = format!("/proc/{pid}/{file}");
        let text = conn.read_small(&path)?;
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok([
        field("status", "VmRSS:")?,
        field("status", "VmHWM:")?,
        field("status", "RssAnon:")?,
        field("smaps_rollup", "AnonHugePages:")?,
    ])
}

/// CPU seconds (user + system, all its threads, those gone included) guest process `pid` has
/// used, from `/proc/PID/stat` read through `conn` (clock ticks of 1/100 s).
fn cpu_seconds(conn: &mut QgaConn, pid: u32) -> Result<f64> {
    let stat = conn.read_small(&format!("/proc/{pid}/stat"))?;
    let stat = String::from_utf8_lossy(&stat);
    // Fields after the command name (which may hold spaces), from the state on: utime is the
    // 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    if ticks.len() != 2 {
        bail!("no utime/stime in /proc/{pid}/stat");
    }
    Ok((ticks[0] + ticks[1]) / 100.0)
}

/// [`read_once`], and the agent's CPU milliseconds per MiB read (`pid`, read through `aux`).
fn read_with_cpu(
    conn: &mut QgaConn,
    aux: &mut QgaConn,
    pid: u32,
    o: &Options,
    chunk: usize,
    digest: &str,
) -> Result<(f64, f64)> {
    let before = cpu_seconds(aux, pid)?;
    let rate = read_once(conn, o, chunk, 1, digest)?;
    let used = cpu_seconds(aux, pid)? - before;
    Ok((rate, used * 1000.0 / o.size_mib as f64))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim().to_owned()
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

/// Boots the guest, measures, prints the table.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    // vstreamd is on the route of both agents: the release build users run, not a debug one.
    crate::bench_binaries()?;
    let chunk = o.chunk_mib << 20;
    let big_chunk = o.big_chunk_mib << 20;
    let started = Instant::now();
    eprintln!("bench-qga: booting the guest (TCG takes a while)...");
    let q = QgaLab::boot("qga-bench", 1024).context("booting the lab")?;
    let mut aux = q.connect(q.lab.name()).context("mux channel")?;
    q.start_qemu_ga()?;
    let mut floor = q.start_floor().context("cat on the floor port")?;
    let (mut vs, mut ga, path) = if o.direct {
        (
            QgaConn::direct(&q.raw_sock).context("vstream-agent's chardev")?,
            QgaConn::direct(&q.ga_sock).context("qemu-ga's chardev")?,
            "directly on QEMU's chardev sockets of the two virtio-serial ports",
        )
    } else {
        (
            q.connect("qga-raw").context("vstreamd -> vstream-agent")?,
            q.connect("qga-ga").context("vstreamd -> qemu-ga")?,
            "vstreamd control socket {\"op\":\"agent\"} (as `vstreamctl agent`) -> raw `qga` transport -> QEMU chardev -> virtio-serial port",
        )
    };
    let info = json!({"execute": "guest-info"});
    let vs_version = vs.call(&info)?["version"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let ga_version = ga.call(&info)?["version"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    if !vs_version.starts_with("vstream-agent ") || ga_version.starts_with("vstream-agent") {
        bail!("wrong agents: {vs_version:?} on the vstream port, {ga_version:?} on qemu-ga's");
    }

    // The file, its digest, the two PIDs.
    let (code, out) = aux.exec(
        "sh",
        &[
            "-c",
            &format!(
                "head -c {} /dev/urandom > {FILE} && sha256sum {FILE}",
                o.size_mib << 20
            ),
        ],
    )?;
    if code != 0 {
        bail!("creating {FILE} in the guest failed: {}", text(&out));
    }
    let digest = text(&out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    let (_, out) = aux.exec("sh", &["-c", "echo $PPID; cat /proc/$PPID/comm"])?;
    let out = text(&out);
    let mut lines = out.lines();
    let vs_pid: u32 = lines.next().unwrap_or("").trim().parse()?;
    if lines.next().map(str::trim) != Some("vstream-agent") {
        bail!("the parent of guest-exec's process is not vstream-agent: {out}");
    }
    let ga_pid: u32 = text(&aux.read_small("/run/qemu-ga.pid")?).parse()?;
    let (_, kernel) = aux.exec("uname", &["-r"])?;
    let vs_mem_before = memory(&mut aux, vs_pid)?;
    let ga_mem_before = memory(&mut aux, ga_pid)?;

    // Warm up both (first requests, page cache of the file).
    pings(&mut vs, 20)?;
    pings(&mut ga, 20)?;
    echo_pings(&mut floor, 20)?;
    read_once(&mut vs, &o, chunk, 1, &digest)?;

    let (mut vs_lat, mut ga_lat, mut floor_lat) = (Vec::new(), Vec::new(), Vec::new());
    let (mut vs_seq, mut ga_seq, mut vs_pipe, mut ga_big) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut vs_mem, mut ga_mem) = (Vec::new(), Vec::new());
    let (mut vs_cpu, mut ga_cpu) = (Vec::new(), Vec::new());
    for rep in 0..o.repeats {
        eprintln!("bench-qga: repeat {} of {}", rep + 1, o.repeats);
        // Alternate who goes first.
        let order: [bool; 2] = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for ours in order {
            if ours {
                vs_lat.push(pings(&mut vs, o.count)?);
            } else {
                ga_lat.push(pings(&mut ga, o.count)?);
            }
        }
        floor_lat.push(echo_pings(&mut floor, o.count)?);
        for ours in order {
            if ours {
                let (rate, cpu) = read_with_cpu(&mut vs, &mut aux, vs_pid, &o, chunk, &digest)?;
                vs_seq.push(rate);
                vs_cpu.push(cpu);
                vs_pipe.push(read_once(&mut vs, &o, chunk, o.depth, &digest)?);
            } else {
                let (rate, cpu) = read_with_cpu(&mut ga, &mut aux, ga_pid, &o, chunk, &digest)?;
                ga_seq.push(rate);
                ga_cpu.push(cpu);
                ga_big.push(read_once(&mut ga, &o, big_chunk, 1, &digest)?);
            }
        }
        vs_mem.push(memory(&mut aux, vs_pid)?);
        ga_mem.push(memory(&mut aux, ga_pid)?);
    }
    let _ = aux.exec("rm", &["-f", FILE]);
    let accel = q.lab.accel();
    drop((vs, ga, aux, floor));
    q.lab.shutdown().ok();
    let _ = std::fs::remove_dir_all(&q.dir);

    let lat = |v: &[Lat], f: fn(&Lat) -> f64| median(v.iter().map(f).collect());
    // Field `k` of [`Memory`], the median over the repeats.
    let mem = |v: &[Memory], k: usize| median(v.iter().map(|m| m[k]).collect());
    let (vs_seq_m, ga_seq_m) = (median(vs_seq), median(ga_seq));
    let (vs_pipe_m, ga_big_m) = (median(vs_pipe), median(ga_big));
    let vs_best = vs_pipe_m.max(vs_seq_m);
    let (ga_best, ga_best_how) = if ga_big_m > ga_seq_m {
        (ga_big_m, format!("{} MiB/read", o.big_chunk_mib))
    } else {
        (ga_seq_m, format!("{} MiB/read", o.chunk_mib))
    };
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();

    println!("# QGA: vstream-agent vs qemu-ga (one guest, same route for both)");
    println!(
        "date (UTC):  {date}; host nproc {}, load average at the end {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.join(" ")
    );
    println!(
        "guest:       QEMU {accel} (no KVM on this machine), 1 vCPU, 1024 MiB, kernel {}",
        text(&kernel)
    );
    println!("agents:      {vs_version} (raw port org.vstream.qga.0) vs qemu-ga {ga_version} (org.qemu.guest_agent.0)");
    println!(
        "route:       {path}; vstreamd and vstreamctl from {}",
        xtask::paths::host_bin_dir().display()
    );
    println!(
        "method:      {} repeats, median reported; ping = {} sequential guest-pings per repeat; \
         read = {} MiB random file in tmpfs, open..close (base64 decoded and sha256-checked by a helper on the host)",
        o.repeats, o.count, o.size_mib
    );
    println!();
    println!(
        "{:<48} {:>14} {:>14} {:>8}  aim",
        "measure", "vstream-agent", "qemu-ga", "ratio"
    );
    let row = |name: &str, a: f64, b: f64, unit: &str, aim: &str| {
        // No ratio to nothing (a process without huge pages).
        let ratio = if b == 0.0 {
            "-".to_owned()
        } else {
            format!("{:.2}x", a / b)
        };
        println!(
            "{:<48} {:>14} {:>14} {:>8}  {aim}",
            name,
            format!("{a:.0} {unit}"),
            format!("{b:.0} {unit}"),
            ratio
        );
    };
    let row1 = |name: &str, a: f64, b: f64, unit: &str, aim: &str| {
        let cell = |v: f64| {
            if v.is_nan() {
                "-".to_owned()
            } else {
                format!("{v:.1} {unit}")
            }
        };
        let ratio = if (a / b).is_nan() {
            "-".to_owned()
        } else {
            format!("{:.2}x", a / b)
        };
        println!(
            "{:<48} {:>14} {:>14} {:>8}  {aim}",
            name,
            cell(a),
            cell(b),
            ratio
        );
    };
    let (vp50, gp50) = (lat(&vs_lat, |l| l.p50), lat(&ga_lat, |l| l.p50));
    let fp50 = lat(&floor_lat, |l| l.p50);
    row("guest-ping p50", vp50, gp50, "us", "<= 0.4x");
    let tail = |name: &str, f: fn(&Lat) -> f64| {
        row(name, lat(&vs_lat, f), lat(&ga_lat, f), "us", "");
    };
    tail("guest-ping p99", |l| l.p99);
    tail("guest-ping mean", |l| l.mean);
    row1(
        &format!(
            "read, {} MiB/read, 1 in flight (like for like)",
            o.chunk_mib
        ),
        vs_seq_m,
        ga_seq_m,
        "MiB/s",
        ">= 4x",
    );
    row1(
        &format!("agent CPU in the guest per MiB, {} MiB/read", o.chunk_mib),
        median(vs_cpu),
        median(ga_cpu),
        "ms",
        "",
    );
    row1(
        &format!(
            "read, {} MiB/read, {} in flight (vstream only)",
            o.chunk_mib, o.depth
        ),
        vs_pipe_m,
        f64::NAN,
        "MiB/s",
        "",
    );
    row1(
        &format!(
            "read, {} MiB/read, 1 in flight (qemu-ga only)",
            o.big_chunk_mib
        ),
        f64::NAN,
        ga_big_m,
        "MiB/s",
        "",
    );
    row1(
        &format!("read, best of each (qemu-ga: {ga_best_how})"),
        vs_best,
        ga_best,
        "MiB/s",
        "",
    );
    let (vrss, grss) = (mem(&vs_mem, 0), mem(&ga_mem, 0));
    row(
        "VmRSS before the workload",
        vs_mem_before[0],
        ga_mem_before[0],
        "KiB",
        "",
    );
    row(
        "RssAnon before the workload",
        vs_mem_before[2],
        ga_mem_before[2],
        "KiB",
        "",
    );
    row(
        "AnonHugePages before the workload",
        vs_mem_before[3],
        ga_mem_before[3],
        "KiB",
        "",
    );
    row("VmRSS after the workload", vrss, grss, "KiB", "<= 0.5x");
    for (name, k) in [
        ("RssAnon after the workload", 2),
        ("AnonHugePages after the workload", 3),
        ("VmHWM (peak RSS) after the workload", 1),
    ] {
        row(name, mem(&vs_mem, k), mem(&ga_mem, k), "KiB", "");
    }
    println!();
    println!(
        "aim guest-ping p50 <= 0.4x qemu-ga:        {} ({:.2}x)",
        verdict(vp50 <= 0.4 * gp50),
        vp50 / gp50
    );
    println!(
        "aim file read >= 4x qemu-ga, like for like: {} ({:.2}x; best of each {:.2}x)",
        verdict(vs_seq_m >= 4.0 * ga_seq_m),
        vs_seq_m / ga_seq_m,
        vs_best / ga_best
    );
    println!(
        "aim VmRSS <= 0.5x qemu-ga:                 {} ({:.2}x)",
        verdict(vrss <= 0.5 * grss),
        vrss / grss
    );
    println!(
        "the route alone: guest-ping echoed by `cat` on a third port, straight on its chardev: \
         p50 {fp50:.0} us, {:.2}x qemu-ga's p50{}; vstream-agent's p50 is {:.0} us above it, qemu-ga's {:.0} us",
        fp50 / gp50,
        if o.direct { "" } else { " (which has vstreamd on its route, the echo not)" },
        vp50 - fp50,
        gp50 - fp50
    );
    println!("(whole run {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}
