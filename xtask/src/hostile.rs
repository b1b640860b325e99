//! A hostile guest beside a good one, against a real vstreamd (`cargo xtask bench-hostile`,
//! and `xtask/tests/hostile.rs` with short runs). No QEMU: the good guest is a real
//! vstream-agent process, the hostile one speaks the wire format (docs/PROTOCOL.md) on its own
//! Unix socket; each has its own `unix-listen:` mux transport in vstreamd's config.
//!
//! For each attack it measures what the issue asked: vstreamd's resident memory during the
//! attack (peak) against the documented per-guest bound, after the hostile guest left against
//! before, the log vstreamd wrote, the good guest's echo throughput and longest stall, and how
//! long `vstreamctl status` takes to answer.

mod guest;

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vstream_wire::{Config, Role};

use crate::{paths, process};

use guest::hostile_guest;
/// What the hostile guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Opens channels (to a real service and to none) and aborts them in a loop, never reading.
    Churn,
    /// Opens channels, fills each to its credit with a zero window of its own, never reads.
    Fill,
    /// Random bytes and corrupted frames.
    Garbage,
    /// Back-to-back genuine headers claiming the largest payload, with no payload.
    CrcBomb,
    /// Grants unlimited credit, reads everything and never acknowledges anything.
    CreditLie,
}

impl Attack {
    /// Every attack, in the order they run.
    pub const ALL: [Attack; 5] = [
        Attack::Churn,
        Attack::Fill,
        Attack::Garbage,
        Attack::CrcBomb,
        Attack::CreditLie,
    ];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Attack::Churn => "churn",
            Attack::Fill => "fill",
            Attack::Garbage => "garbage",
            Attack::CrcBomb => "crc-bomb",
            Attack::CreditLie => "credit-lie",
        }
    }

    /// The hostile guest that runs this attack.
    fn guest(self) -> String {
        format!("evil-{}", self.name())
    }

    /// The attack called `name`.
    pub fn parse(name: &str) -> Option<Attack> {
        Attack::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long each attack (and the baseline) runs.
    pub duration: Duration,
    /// The attacks to run.
    pub attacks: Vec<Attack>,
    /// Where vstreamd, vstreamctl and vstream-agent are.
    pub bin_dir: PathBuf,
}

/// The per-guest bound vstreamd documents (`peer_buffer_limit`): the figures compare with it.
pub fn documented_bound() -> usize {
    Config::new(Role::Host, "").peer_buffer_limit
}

/// Echo throughput of the good guest and its longest stall.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo {
    /// Bytes per second echoed.
    pub bytes_per_sec: f64,
    /// Longest time without any echoed byte.
    pub longest_stall: Duration,
}

/// What one attack did to vstreamd.
#[derive(Debug, Clone)]
pub struct Figures {
    /// The attack.
    pub attack: Attack,
    /// vstreamd's resident memory before the attack.
    pub rss_start: u64,
    /// Its peak during the attack.
    pub rss_peak: u64,
    /// After the hostile guest left and its session expired.
    pub rss_after: u64,
    /// Bytes vstreamd logged during the attack and until its end was handled.
    pub log_bytes: u64,
    /// The good guest during the attack.
    pub echo: Echo,
    /// Longest `vstreamctl status` during the attack.
    pub status_max: Duration,
    /// Bytes the hostile guest wrote.
    pub hostile_bytes: u64,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The good guest beside a process burning one core (no attack).
    pub burn: Echo,
    /// One entry per attack.
    pub attacks: Vec<Figures>,
}

/// The good guest's config and one hostile guest per attack (`evil-ATTACK`), each on its own
/// mux transport: a guest whose links are dropped for protocol violations is held off for a
/// while, which must not spill over into the next attack's figures.
fn config_text() -> String {
    let mut text = String::from(
        "[daemon.limits]\nresume_timeout_ms = 2000\n\n[[guest]]\nname = \"good\"\n\
         [[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:DIR/good.sock\"\n",
    );
    for a in Attack::ALL {
        let name = a.guest();
        text.push_str(&format!(
            "\n[[guest]]\nname = \"{name}\"\n[[guest.transport]]\nkind = \"mux\"\n\
             address = \"unix-listen:DIR/{name}.sock\"\n"
        ));
    }
    text
}

/// vstreamd, the good agent and their directory; both processes are ended on drop.
struct Rig {
    dir: PathBuf,
    bin_dir: PathBuf,
    daemon: Child,
    agent: Child,
}

impl Drop for Rig {
    fn drop(&mut self) {
        process::terminate(&mut self.agent, Duration::from_secs(2));
        process::terminate(&mut self.daemon, Duration::from_secs(2));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Rig {
    fn start(bin_dir: &Path) -> Result<Rig> {
        for name in ["vstreamd", "vstreamctl", "vstream-agent"] {
            if !paths::is_executable(&bin_dir.join(name)) {
                bail!(
                    "{} not found: build it first (cargo build -p vstream-host -p vstream-agent)",
                    bin_dir.join(name).display()
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("vstream-hostile-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let config = dir.join("vstreamd.toml");
        fs::write(
            &config,
            config_text().replace("DIR", &dir.display().to_string()),
        )?;
        let mut cmd = Command::new(bin_dir.join("vstreamd"));
        cmd.arg("--config")
            .arg(&config)
            .arg("--control")
            .arg(dir.join("control.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("vstreamd.log"))?);
        let daemon = process::spawn(cmd)?;
        wait_until(Duration::from_secs(10), "vstreamd's sockets", || {
            ["control.sock".to_owned(), "good.sock".to_owned()]
                .into_iter()
                .chain(Attack::ALL.iter().map(|a| format!("{}.sock", a.guest())))
                .all(|s| dir.join(s).exists())
        })?;
        let mut cmd = Command::new(bin_dir.join("vstream-agent"));
        cmd.arg("--connect")
            .arg(format!("unix:{}", dir.join("good.sock").display()))
            .args([
                "--name",
                "good",
                "--no-printer",
                "--ppp",
                "off",
                "--no-random",
            ])
            .args(["--cmdline", "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("agent.log"))?);
        let agent = process::spawn(cmd)?;
        let rig = Rig {
            dir,
            bin_dir: bin_dir.to_owned(),
            daemon,
            agent,
        };
        wait_until(Duration::from_secs(15), "the good guest to connect", || {
            rig.guest("good").is_some_and(|g| g["connected"] == true)
        })?;
        Ok(rig)
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// One request on the control socket (what vstreamctl sends); the reply line and the
    /// connection, which carries the channel's bytes after an `open`.
    fn request(&self, req: &Value) -> Result<(Value, BufReader<UnixStream>)> {
        let mut s = UnixStream::connect(self.control())?;
        s.write_all(format!("{req}\n").as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let reply: Value = serde_json::from_str(&line).context("control reply")?;
        if reply["ok"] != true {
            bail!("{req} refused: {reply}");
        }
        Ok((reply, r))
    }

    /// One guest's status: the reply line, then the guest's own line.
    fn guest(&self, name: &str) -> Option<Value> {
        let (_, mut r) = self.request(&json!({"op": "status", "guest": name})).ok()?;
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// Time of one real `vstreamctl status --json`.
    fn vstreamctl_status(&self) -> Result<Duration> {
        let t = Instant::now();
        let out = Command::new(self.bin_dir.join("vstreamctl"))
            .arg("--control")
            .arg(self.control())
            .args(["status", "--json"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "vstreamctl status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed())
    }

    fn rss(&self) -> u64 {
        rss_of(self.daemon.id())
    }

    fn log_len(&self) -> u64 {
        fs::metadata(self.dir.join("vstreamd.log")).map_or(0, |m| m.len())
    }

    /// The good guest's echo for `duration`: bytes per second and the longest gap between two
    /// reads.
    fn echo(&self, duration: Duration) -> Result<Echo> {
        let open = json!({"op": "open", "guest": "good", "class": "diag", "name": "echo"});
        let (_, mut r) = self.request(&open)?;
        let mut w = r.get_ref().try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            thread::spawn(move || {
                let chunk = vec![0x5Au8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) && w.write_all(&chunk).is_ok() {}
                let _ = w.shutdown(std::net::Shutdown::Write);
            })
        };
        r.get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; 256 * 1024];
        let start = Instant::now();
        let (mut got, mut last, mut stall) = (0u64, start, Duration::ZERO);
        while start.elapsed() < duration {
            match r.read(&mut buf) {
                Ok(0) => bail!("the good guest's echo channel ended"),
                Ok(n) => {
                    got += n as u64;
                    stall = stall.max(last.elapsed());
                    last = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        stall = stall.max(last.elapsed());
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        // Unblocks the writer if the echo stalled with its pipe full.
        let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
        let _ = writer.join();
        Ok(Echo {
            bytes_per_sec: got as f64 / elapsed.as_secs_f64(),
            longest_stall: stall,
        })
    }
}

fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Resident memory of a process, bytes (0 once it is gone).
fn rss_of(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Runs the baseline and every attack; prints nothing.
pub fn run(opts: &Options) -> Result<Report> {
    let rig = Rig::start(&opts.bin_dir)?;
    // Warm up (first allocations, page cache) before measuring anything.
    rig.echo(Duration::from_millis(500))?;
    let burn = {
        let mut burner = process::spawn({
            let mut c = Command::new("sh");
            c.args(["-c", "while :; do :; done"]);
            c
        })?;
        let echo = rig.echo(opts.duration);
        process::terminate(&mut burner, Duration::from_secs(1));
        echo?
    };
    let mut attacks = Vec::new();
    for attack in &opts.attacks {
        attacks.push(run_attack(&rig, *attack, opts.duration)?);
    }
    Ok(Report { burn, attacks })
}

fn run_attack(rig: &Rig, attack: Attack, duration: Duration) -> Result<Figures> {
    let rss_start = rig.rss();
    let log_start = rig.log_len();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(0u64));
    let hostile = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let sock = rig.dir.join(format!("{}.sock", attack.guest()));
        thread::spawn(move || hostile_guest(&sock, attack, &stop, &sent))
    };
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = watch_stop.clone();
        let pid = rig.daemon.id();
        thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_of(pid));
                thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let status_max = Arc::new(Mutex::new(Duration::ZERO));
    let echo = thread::scope(|s| {
        let prober = s.spawn(|| -> Result<()> {
            while !watch_stop.load(Ordering::Relaxed) {
                let t = rig.vstreamctl_status()?;
                let mut m = status_max.lock().unwrap_or_else(|e| e.into_inner());
                *m = (*m).max(t);
                drop(m);
                thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        });
        // The attack starts first, so that the echo measures the good guest under it.
        thread::sleep(Duration::from_millis(200));
        let echo = rig.echo(duration);
        stop.store(true, Ordering::Relaxed);
        let _ = hostile.join();
        watch_stop.store(true, Ordering::Relaxed);
        prober.join().unwrap_or(Ok(())).map(|()| echo)
    })??;
    let rss_peak = watcher.join().unwrap_or(0);
    // The hostile guest is gone: its session expires after resume_timeout (2 s here).
    let mut rss_after = rig.rss();
    let deadline = Instant::now() + Duration::from_secs(10);
    let evil_gone = |rig: &Rig| {
        rig.guest(&attack.guest()).is_some_and(|g| {
            g["connected"] == false
                && g["channels"].as_array().is_some_and(Vec::is_empty)
                && g["stats"]["held_bytes"] == 0
        })
    };
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        rss_after = rig.rss();
        if evil_gone(rig) && rss_after <= rss_start + (1 << 20) {
            break;
        }
    }
    let hostile_bytes = *sent.lock().unwrap_or_else(|e| e.into_inner());
    let status_max = *status_max.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Figures {
        attack,
        rss_start,
        rss_peak: rss_peak.max(rss_start),
        rss_after,
        log_bytes: rig.log_len() - log_start,
        echo,
        status_max,
        hostile_bytes,
    })
}

/// Prints the report as a table, the figures the issue asked for side by side.
pub fn print(report: &Report, opts: &Options) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{} s per attack; documented per-guest bound (peer_buffer_limit) {:.0} MiB; good guest \
         beside a process burning one core: {:.1} MB/s, longest stall {} ms",
        opts.duration.as_secs_f64(),
        mib(documented_bound() as u64),
        report.burn.bytes_per_sec / 1e6,
        report.burn.longest_stall.as_millis()
    );
    println!(
        "{:<11} {:>8} {:>9} {:>9} {:>8} {:>9} {:>10} {:>10} {:>6} {:>8} {:>9}",
        "attack",
        "hostile",
        "RSS peak",
        "growth",
        "after",
        "log",
        "echo MB/s",
        "burn MB/s",
        "ratio",
        "stall",
        "status"
    );
    println!(
        "{:<11} {:>8} {:>9} {:>9} {:>8} {:>9} {:>10} {:>10} {:>6} {:>8} {:>9}",
        "", "MB", "MiB", "MiB", "KiB", "bytes", "(attack)", "(no atk)", "", "ms", "max ms"
    );
    for f in &report.attacks {
        println!(
            "{:<11} {:>8.1} {:>9.1} {:>9.1} {:>8} {:>9} {:>10.1} {:>10.1} {:>6.2} {:>8} {:>9}",
            f.attack.name(),
            f.hostile_bytes as f64 / 1e6,
            mib(f.rss_peak),
            mib(f.rss_peak - f.rss_start),
            (f.rss_after as i64 - f.rss_start as i64) / 1024,
            f.log_bytes,
            f.echo.bytes_per_sec / 1e6,
            report.burn.bytes_per_sec / 1e6,
            f.echo.bytes_per_sec / report.burn.bytes_per_sec.max(1.0),
            f.echo.longest_stall.as_millis(),
            f.status_max.as_millis()
        );
    }
}
