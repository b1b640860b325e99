//! `cargo xtask bench-port`: a channel through vstream-agent over the lab's virtio-serial port
//! against the raw port, in one guest, with 64 KiB writes.
//!
//! The guest has the mux port `org.vstream.0` (vstreamd <-> vstream-agent) and a second port,
//! [`RAW_PORT`], whose QEMU chardev this process holds directly. Each direction is measured
//! both ways, one after the other, the same number of bytes:
//! - **raw port**: `dd bs=65536` in the guest straight into (or out of) the second port; this
//!   process reads (or writes) the chardev socket;
//! - **agent**: `vstreamctl exec GUEST -- dd bs=65536` (guest -> host: dd's stdout; host ->
//!   guest: dd's stdin), so the bytes cross the tty device's pipes, the agent, the mux and the
//!   port, then vstreamd and vstreamctl;
//! - **agent, echo**: `vstreamctl open GUEST diag echo`, both directions at once through the
//!   agent's echo service (no process or pipe in the guest): the agent's mux path alone.
//!
//! Throughput is timed on the host: from the first byte (guest -> host), or from the guest's
//! "ready" byte to its "done" byte (host -> guest). CPU comes from the guest's own counters,
//! read in the guest right before and after its `dd`: the agent's utime + stime
//! (`/proc/PID/stat`) and the whole guest's busy time (`/proc/stat`), in seconds per GiB moved,
//! and the agent's read and write calls and context switches per MiB (see [`SNAP`]). Every
//! transfer runs `--repeats` times; the medians are printed, ratios last.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdout, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_vsock::{figure, Figure};
use xtask::lab::testing::{bg, sh, wait_out};
use xtask::lab::{Lab, LabOptions};
use xtask::qemu::extra_virtio_port;

/// The second virtio-serial port, read and written by nothing but `dd` and this process.
const RAW_PORT: &str = "org.vstream.bench.0";

/// Every write (and `dd` block) of the benchmark.
const WRITE: usize = 64 * 1024;

/// The guest's clock ticks per second in `/proc` (`USER_HZ`, 100 on x86 Linux).
const USER_HZ: f64 = 100.0;

/// A guest shell function: `snap` prints `SNAP <guest busy ticks> <agent utime+stime ticks>
/// <agent read calls> <agent write calls> <agent context switches> <agent minor faults>`. Busy = user + nice +
/// system + irq + softirq + steal of /proc/stat's `cpu` line; the calls are `syscr`/`syscw` of
/// /proc/PID/io; the switches (voluntary and not) are summed over the agent's threads. The
/// counts do not depend on how busy the host is, the times do (see [`Row`]).
const SNAP: &str = "snap() { set -- $(head -n1 /proc/stat); b=$(( $2 + $3 + $4 + $7 + $8 + $9 )); \
     a=$(cat /run/vstream-agent.pid); set -- $(cut -d')' -f2 /proc/$a/stat); \
     f=$8; echo \"SNAP $b $(( ${12} + ${13} )) $(awk '/^syscr/ {r=$2} /^syscw/ {w=$2} END {print r, w}' /proc/$a/io) \
     $(awk '/ctxt_switches/ {s+=$2} END {print s}' /proc/$a/task/*/status) $f\"; }";

/// The raw port's device node, found by name (no udev in the lab guest), on fd 3.
fn open_raw_port() -> String {
    format!(
        "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = {RAW_PORT} ] && P=/dev/${{p##*/}}; done; exec 3<>$P"
    )
}

/// One transfer's figures. Under TCG the guest's clock is the host's: while the host's cores
/// are contended, the guest charges the time it was not running to whatever it was running,
/// so the CPU times rise with the host's load; the counts per MiB do not.
struct Row {
    path: &'static str,
    dir: &'static str,
    fig: Figure,
    /// The whole guest's busy CPU per GiB.
    guest_s_per_gib: f64,
    /// The agent's read calls, write calls, context switches and minor page faults per MiB.
    counts_per_mib: [f64; 4],
}

/// What the guest's counters moved by between the first and last `SNAP` line of `out`: guest
/// busy seconds, agent seconds, agent reads, writes, context switches and minor faults.
fn snap_delta(out: &str) -> Result<[f64; 6]> {
    let snaps: Vec<[f64; 6]> = out
        .lines()
        .filter_map(|l| {
            let w = l.trim().strip_prefix("SNAP ")?.split_whitespace();
            let v: Vec<f64> = w.map(str::parse).collect::<Result<_, _>>().ok()?;
            v.try_into().ok()
        })
        .collect();
    match (snaps.first(), snaps.last()) {
        (Some(a), Some(b)) if snaps.len() >= 2 => {
            let d = |i: usize| b[i] - a[i];
            Ok([d(0) / USER_HZ, d(1) / USER_HZ, d(2), d(3), d(4), d(5)])
        }
        _ => bail!("no counter snapshots in the guest's output: {out:?}"),
    }
}

fn row(
    path: &'static str,
    dir: &'static str,
    bytes: usize,
    took: Duration,
    out: &str,
) -> Result<Row> {
    let [guest, agent, reads, writes, switches, faults] = snap_delta(out)?;
    let fig = figure(bytes, took, agent);
    let mib = bytes as f64 / (1u64 << 20) as f64;
    Ok(Row {
        path,
        dir,
        fig,
        guest_s_per_gib: guest / mib * 1024.0,
        counts_per_mib: [reads / mib, writes / mib, switches / mib, faults / mib],
    })
}

/// Reads exactly `bytes` from `r`; the time from the first byte to the last.
fn receive(r: &mut impl Read, bytes: usize) -> Result<Duration> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = r.read(&mut buf)?;
    let started = Instant::now();
    while got < bytes {
        match r.read(&mut buf[..(bytes - got).min(1 << 20)])? {
            0 => bail!("end of stream after {got} of {bytes} bytes"),
            n => got += n,
        }
    }
    if got != bytes {
        bail!("{got} bytes arrived, {bytes} were sent");
    }
    Ok(started.elapsed())
}

/// Reads `r` until it has seen `byte`.
fn wait_byte(r: &mut impl Read, byte: u8) -> Result<()> {
    let mut b = [0u8];
    loop {
        if r.read(&mut b)? == 0 {
            bail!("end of stream before {:?}", byte as char);
        }
        if b[0] == byte {
            return Ok(());
        }
    }
}

/// Writes `bytes` in [`WRITE`]-sized writes.
fn send(w: &mut impl Write, bytes: usize) -> Result<()> {
    let chunk = vec![0x5a; WRITE];
    for _ in 0..bytes / WRITE {
        w.write_all(&chunk)?;
    }
    Ok(())
}

fn raw_guest_to_host(lab: &Lab, port: &mut UnixStream, bytes: usize, rep: usize) -> Result<Row> {
    // bg runs a command once per id.
    let id = &format!("raw-g2h-{rep}");
    bg(
        lab,
        id,
        &format!(
            "{SNAP}; {}; snap; dd if=/dev/zero bs={WRITE} count={} >&3 2>/dev/null; snap",
            open_raw_port(),
            bytes / WRITE
        ),
    );
    let took = receive(port, bytes)?;
    let out = wait_out(lab, id, "DONE-rc=0", Duration::from_secs(120));
    row("raw port, dd", "g->h", bytes, took, &out)
}

fn raw_host_to_guest(lab: &Lab, port: &mut UnixStream, bytes: usize, rep: usize) -> Result<Row> {
    let id = &format!("raw-h2g-{rep}");
    // fullblock: dd counts whole 64 KiB blocks however the port splits them.
    bg(
        lab,
        id,
        &format!(
            "{SNAP}; {}; snap; printf R >&3; dd of=/dev/null bs={WRITE} count={} iflag=fullblock <&3; snap; printf D >&3",
            open_raw_port(),
            bytes / WRITE
        ),
    );
    wait_byte(port, b'R')?;
    let started = Instant::now();
    send(port, bytes)?;
    wait_byte(port, b'D')?;
    let took = started.elapsed();
    let out = wait_out(lab, id, "DONE-rc=0", Duration::from_secs(120));
    if !out.contains(&format!("{}+0 records in", bytes / WRITE)) {
        bail!("the guest's dd did not read every block: {out}");
    }
    row("raw port, dd", "h->g", bytes, took, &out)
}

/// `vstreamctl exec GUEST -- sh -c SCRIPT`, stdin and stdout piped, stderr collected.
fn exec(lab: &Lab, script: &str) -> Result<(Child, ChildStdout, thread::JoinHandle<String>)> {
    let mut child = lab
        .ctl_command()
        .args(["exec", lab.name(), "--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("vstreamctl exec")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    Ok((child, stdout, err))
}

/// Waits for `child` and returns its stderr, which must hold the guest's snapshots.
fn finish(mut child: Child, err: thread::JoinHandle<String>) -> Result<String> {
    let status = child.wait()?;
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("vstreamctl exec failed ({status}): {err}");
    }
    Ok(err)
}

fn agent_guest_to_host(lab: &Lab, bytes: usize) -> Result<Row> {
    let script = format!(
        "{SNAP}; snap >&2; dd if=/dev/zero bs={WRITE} count={} 2>/dev/null; snap >&2",
        bytes / WRITE
    );
    let (child, mut stdout, err) = exec(lab, &script)?;
    let took = receive(&mut stdout, bytes)?;
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        bail!("{} bytes more than sent arrived", rest.len());
    }
    let out = finish(child, err)?;
    row("agent, exec dd", "g->h", bytes, took, &out)
}

fn agent_host_to_guest(lab: &Lab, bytes: usize) -> Result<Row> {
    // As on the raw port: whole 64 KiB blocks, counted (busybox's dd reports records only).
    let blocks = bytes / WRITE;
    let script = format!(
        "{SNAP}; snap >&2; echo R; dd of=/dev/null bs={WRITE} count={blocks} iflag=fullblock; snap >&2; echo D"
    );
    let (mut child, stdout, err) = exec(lab, &script)?;
    let mut stdout = BufReader::new(stdout);
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "R" {
        bail!("the guest's command did not start: {line:?}");
    }
    let started = Instant::now();
    send(&mut stdin, bytes)?;
    drop(stdin);
    wait_byte(&mut stdout, b'D')?;
    let took = started.elapsed();
    let out = finish(child, err)?;
    let copied = format!("{blocks}+0 records in");
    if !out.contains(&copied) {
        bail!("the guest's dd did not read {blocks} blocks: {out}");
    }
    row("agent, exec dd", "h->g", bytes, took, &out)
}

/// `bytes` both ways at once through the agent's echo service: the channel's own speed.
pub(crate) fn echo(lab: &Lab, bytes: usize) -> Result<Duration> {
    let mut child = lab
        .ctl_command()
        .args(["open", lab.name(), "diag", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("vstreamctl open")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let started = Instant::now();
    let writer = thread::spawn(move || send(&mut stdin, bytes));
    receive(&mut stdout, bytes)?;
    let took = started.elapsed();
    writer.join().map_err(|_| anyhow::anyhow!("writer"))??;
    child.wait()?;
    Ok(took)
}

fn agent_echo(lab: &Lab, bytes: usize) -> Result<Row> {
    let snap = || sh(lab, &format!("{SNAP}; snap"));
    let before = snap();
    let took = echo(lab, bytes)?;
    let after = snap();
    row(
        "agent, diag echo",
        "both",
        bytes,
        took,
        &format!("{before}\n{after}"),
    )
}

/// `VmRSS` and `RssAnon` of the agent, in KiB, read over the console.
fn agent_memory(lab: &Lab) -> String {
    sh(
        lab,
        "grep -E '^(VmRSS|RssAnon)' /proc/$(cat /run/vstream-agent.pid)/status | tr -s ' \\t' ' ' | tr '\\n' ' '",
    )
}

/// The median of each figure of row `i` over `runs`.
fn median_row(runs: &[Vec<Row>], i: usize) -> Row {
    let median = |f: &dyn Fn(&Row) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(|r| f(&r[i])).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Row {
        path: runs[0][i].path,
        dir: runs[0][i].dir,
        fig: Figure {
            mib_s: median(&|r| r.fig.mib_s),
            cpu_s_per_gib: median(&|r| r.fig.cpu_s_per_gib),
        },
        guest_s_per_gib: median(&|r| r.guest_s_per_gib),
        counts_per_mib: [0, 1, 2, 3].map(|k| median(&|r| r.counts_per_mib[k])),
    }
}

/// Runs the benchmark; `args`: `--mib N` (default 256) per transfer, `--repeats R` (default 3)
/// rounds of every transfer, raw and agent alternating; medians are printed.
pub fn run(args: &[String]) -> Result<()> {
    let (mut mib, mut repeats) = (256usize, 3usize);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mib" => mib = crate::positive_arg(&mut it, "--mib")?,
            "--repeats" => repeats = crate::positive_arg(&mut it, "--repeats")?,
            other => bail!("bench-port: unknown option {other:?} (options: --mib N --repeats R)"),
        }
    }
    let bytes = mib << 20;
    let dir = crate::bench_setup("port")?;
    let raw_sock = dir.join("raw.sock");
    let options = LabOptions {
        extra_qemu_args: extra_virtio_port("rawport", &raw_sock, 2, RAW_PORT)?,
        ..LabOptions::virtio_port_only().named("benchport")
    };
    let lab = Lab::boot(options)?;
    lab.wait_for("the mux over the port", Duration::from_secs(180), |s| {
        lab.mux_transports_up(s)
    })?;
    let mut port = UnixStream::connect(&raw_sock).context("the raw port's chardev")?;
    let idle = agent_memory(&lab);

    let mut runs = Vec::new();
    for rep in 0..repeats {
        eprintln!("bench-port: round {} of {repeats}", rep + 1);
        runs.push(vec![
            raw_guest_to_host(&lab, &mut port, bytes, rep)?,
            agent_guest_to_host(&lab, bytes)?,
            raw_host_to_guest(&lab, &mut port, bytes, rep)?,
            agent_host_to_guest(&lab, bytes)?,
            agent_echo(&lab, bytes)?,
        ]);
    }
    let rows: Vec<Row> = (0..runs[0].len()).map(|i| median_row(&runs, i)).collect();
    let after = agent_memory(&lab);
    // What an agent keeps once a burst is over: the session frees spare buffers after seconds,
    // the agent hands freed heap pages back every 30 s.
    thread::sleep(Duration::from_secs(40));
    let settled = agent_memory(&lab);
    let accel = lab.accel().to_string();
    lab.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "bench-port: {mib} MiB per transfer, {} KiB writes, one run, median of {repeats} rounds, guest {accel}, 1 vCPU",
        WRITE / 1024
    );
    println!("agent memory: idle {idle}; after the transfers {after}; 40 s later {settled}");
    println!("spread: (fastest - slowest) / median MiB/s over the rounds; agent reads, writes, context switches and minor page faults per MiB from /proc/PID/io, /proc/PID/task/*/status and /proc/PID/stat");
    println!(
        "{:<18} {:>5} {:>8} {:>7} {:>11} {:>11} {:>10} {:>10} {:>8} {:>10}",
        "path",
        "dir",
        "MiB/s",
        "spread",
        "agent s/GiB",
        "guest s/GiB",
        "reads/MiB",
        "writes/MiB",
        "csw/MiB",
        "faults/MiB"
    );
    for (i, r) in rows.iter().enumerate() {
        let rates: Vec<f64> = runs.iter().map(|run| run[i].fig.mib_s).collect();
        let spread = (rates.iter().copied().fold(f64::MIN, f64::max)
            - rates.iter().copied().fold(f64::MAX, f64::min))
            / r.fig.mib_s;
        let [reads, writes, switches, faults] = r.counts_per_mib;
        println!(
            "{:<18} {:>5} {:>8.1} {:>6.0}% {:>11.2} {:>11.2} {:>10.1} {:>10.1} {:>8.1} {:>10.1}",
            r.path,
            r.dir,
            r.fig.mib_s,
            spread * 100.0,
            r.fig.cpu_s_per_gib,
            r.guest_s_per_gib,
            reads,
            writes,
            switches,
            faults
        );
    }
    let ratio = |a: usize, b: usize| rows[a].fig.mib_s / rows[b].fig.mib_s;
    let (g2h, h2g) = (ratio(1, 0), ratio(3, 2));
    let echo = rows[4].fig.mib_s / rows[0].fig.mib_s.min(rows[2].fig.mib_s);
    println!("ratios, agent / raw port (throughput; aim >= 0.5x):");
    println!("  g->h {g2h:.3}x; h->g {h2g:.3}x; echo (both at once) vs the slower raw direction {echo:.3}x");
    Ok(())
}
