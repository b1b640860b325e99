//! `cargo xtask bench-scale`: one vstreamd with many guests, each a real vstream-agent process
//! on this host connected over its own Unix socket (a `[[guest]]` with its own `unix-listen:`
//! mux transport: the guest is known by the socket it comes through). Measures what a fleet
//! costs the daemon: status of every guest, resident memory per idle guest, CPU and wake-ups of
//! an idle daemon, and `vstreamctl exec` latency under that load. See docs/PERFORMANCE.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use xtask::process;

struct Options {
    guests: usize,
    batch: usize,
    idle_secs: u64,
    execs: usize,
}

fn usage() -> &'static str {
    "bench-scale [--guests N] [--batch B] [--idle SECS] [--execs M]
  --guests  agents (one vstream-agent process each) on one vstreamd (1000)
  --batch   agents started at a time; the next batch waits until these are connected (100)
  --idle    seconds over which the idle daemon's CPU time and wake-ups are counted (60)
  --execs   `vstreamctl exec GUEST -- true` runs to random guests for the latency (200)"
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        guests: 1000,
        batch: 100,
        idle_secs: 60,
        execs: 200,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut num = |name: &str| crate::positive_arg(&mut it, name);
        match arg.as_str() {
            "--guests" => o.guests = num("--guests")?,
            "--batch" => o.batch = num("--batch")?,
            "--idle" => o.idle_secs = num("--idle")? as u64,
            "--execs" => o.execs = num("--execs")?,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("bench-scale: unknown option {other:?}\n{}", usage()),
        }
    }
    Ok(o)
}

/// A process of ours, killed (its whole group) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        process::terminate(&mut self.0, Duration::from_secs(2));
    }
}

fn start_daemon(bin: &Path, dir: &Path, name: &str, config: &str) -> Result<(Proc, PathBuf)> {
    let conf = dir.join(format!("{name}.toml"));
    std::fs::write(&conf, config)?;
    let control = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(bin.join("vstreamd"));
    cmd.arg("--control")
        .arg(&control)
        .arg("--config")
        .arg(&conf)
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-state")))
        .env("VSTREAM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?);
    let p = Proc(process::spawn(cmd)?);
    if !process::wait_for_path(&control, Duration::from_secs(30)) {
        bail!("vstreamd did not create {}", control.display());
    }
    Ok((p, control))
}

/// `VmRSS` of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// CPU seconds (user + system) of `pid` and the context switches of all its threads (each one
/// a wake-up of a thread that slept, or a preemption).
fn cpu_and_switches(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((ticks as f64 / hz, switches))
}

fn ctl(bin: &Path, control: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin.join("vstreamctl"));
    cmd.arg("--control").arg(control).args(args);
    cmd
}

/// `vstreamctl status --json`, parsed; the number of guests connected.
fn connected(bin: &Path, control: &Path) -> Result<(Value, usize)> {
    let out = ctl(bin, control, &["status", "--json"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "vstreamctl status --json failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("status --json is not JSON")?;
    let n = v["guests"]
        .as_array()
        .map_or(0, |g| g.iter().filter(|g| g["connected"] == true).count());
    Ok((v, n))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A small deterministic generator for picking guests (xorshift64*).
struct Pick(u64);

impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let bin = crate::release_build()?;
    let dir = std::env::temp_dir().join(format!("vstream-bench-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench(&o, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench(o: &Options, bin: &Path, dir: &Path) -> Result<()> {
    let mut report = String::new();
    // The daemon's own footprint: no guests at all.
    let base_rss = {
        let (d, _) = start_daemon(bin, dir, "empty", "")?;
        thread::sleep(Duration::from_secs(1));
        rss_kib(d.0.id())?
    };

    let mut config = String::new();
    for i in 0..o.guests {
        let _ = write!(
            config,
            "[[guest]]\nname = \"g{i}\"\n[[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:{}/g{i}.sock\"\n",
            dir.display()
        );
    }
    let (daemon, control) = start_daemon(bin, dir, "vstreamd", &config)?;
    let pid = daemon.0.id();
    thread::sleep(Duration::from_secs(1));
    let configured_rss = rss_kib(pid)?;

    let started = Instant::now();
    let mut agents: Vec<Proc> = Vec::with_capacity(o.guests);
    while agents.len() < o.guests {
        let upto = (agents.len() + o.batch).min(o.guests);
        for i in agents.len()..upto {
            let mut cmd = Command::new(bin.join("vstream-agent"));
            cmd.arg("--name")
                .arg(format!("g{i}"))
                .arg("--connect")
                .arg(format!("unix:{}/g{i}.sock", dir.display()))
                .args(["--no-printer", "--no-random", "--ppp", "off"])
                .env("VSTREAM_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            agents.push(Proc(process::spawn(cmd)?));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, n) = connected(bin, &control)?;
            if n >= upto {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {n} of {upto} agents connected within 120 s");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    let connect_time = started.elapsed();

    // Every guest is listed, and connected.
    let (status, n) = connected(bin, &control)?;
    let listed = status["guests"].as_array().map_or(0, Vec::len);
    if listed != o.guests || n != o.guests {
        bail!(
            "status --json lists {listed} guests, {n} connected; expected {}",
            o.guests
        );
    }

    // Settle (the agents' first keepalives, allocator caches), then measure the idle daemon.
    thread::sleep(Duration::from_secs(5));
    let idle_rss = rss_kib(pid)?;
    let (cpu0, sw0) = cpu_and_switches(pid)?;
    thread::sleep(Duration::from_secs(o.idle_secs));
    let (cpu1, sw1) = cpu_and_switches(pid)?;
    let idle_cpu = cpu1 - cpu0;
    let wakeups = (sw1 - sw0) as f64 / o.idle_secs as f64;

    // The status table and the JSON, to /dev/null: the median of five.
    let time_status = |args: &[&str]| -> Result<f64> {
        let mut t = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let st = ctl(bin, &control, args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("vstreamctl {args:?} failed");
            }
            t.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let table_ms = time_status(&["status"])?;
    let json_ms = time_status(&["status", "--json"])?;

    // exec latency to random guests, one at a time, while all the others stay connected.
    let mut pick = Pick(0x9e37_79b9_7f4a_7c15);
    let mut lat = Vec::with_capacity(o.execs);
    for _ in 0..o.execs {
        let g = format!("g{}", pick.next(o.guests));
        let start = Instant::now();
        let out = ctl(bin, &control, &["exec", &g, "--", "true"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "vstreamctl exec {g} -- true: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        lat.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);

    let per_guest = |rss: u64| rss.saturating_sub(base_rss) as f64 / o.guests as f64;
    let _ = writeln!(report, "bench-scale: {} agents on one vstreamd", o.guests);
    let _ = writeln!(
        report,
        "  all {} connected (status --json), after {:.1} s",
        o.guests,
        connect_time.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "  vstreamctl status (table)       {table_ms:>9.1} ms (median of 5)"
    );
    let _ = writeln!(
        report,
        "  vstreamctl status --json        {json_ms:>9.1} ms (median of 5)"
    );
    let _ = writeln!(
        report,
        "  vstreamd RSS                    {base_rss:>9} KiB no guests, {configured_rss} KiB configured, {idle_rss} KiB connected and idle"
    );
    let _ = writeln!(
        report,
        "  RSS per guest                   {:>9.1} KiB configured, {:.1} KiB connected and idle",
        per_guest(configured_rss),
        per_guest(idle_rss)
    );
    let _ = writeln!(
        report,
        "  idle CPU over {} s              {idle_cpu:>9.2} s ({:.2}% of one core)",
        o.idle_secs,
        idle_cpu / o.idle_secs as f64 * 100.0
    );
    let _ = writeln!(
        report,
        "  idle context switches           {wakeups:>9.1} /s ({:.3} per guest per second)",
        wakeups / o.guests as f64
    );
    let _ = writeln!(
        report,
        "  exec GUEST -- true ({} runs)    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        o.execs,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    print!("{report}");
    // All at once: terminating them one by one waits for each.
    for a in &agents {
        process::signal_group(a.0.id(), libc::SIGKILL);
    }
    drop(agents);
    drop(daemon);
    Ok(())
}
