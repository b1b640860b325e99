//! `cargo xtask <task>`: see `usage()`.

use std::io::BufRead;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use xtask::lab::{Lab, LabOptions};
use xtask::{accel, deb, demo, hostile, image, paths};

mod agent_order;
mod bench_cp;
mod bench_fastnet;
mod bench_port;
mod bench_qga;
mod bench_scale;
mod bench_vsock;
mod guest_profile;

fn usage() -> &'static str {
    "usage: cargo xtask <task>

tasks:
  image     build build/guest/{vmlinuz,initramfs.cpio.gz} (only if an input changed)
  agent     build the static guest agent (target/x86_64-unknown-linux-gnu/agent/vstream-agent)
  agent-order  the link order of that agent's code (crates/agent/symbol-order.txt): what it
            runs at start, at rest and serving QGA, profiled with valgrind's callgrind on the
            host, plus the code pages it touches in a lab guest; rebuild the agent afterwards
  deb       the Debian packages vstream and vstream-agent in build/deb/, from the release
            binaries and the static agent (./x.sh deb builds those first) [--bin-dir DIR]
  accel     tell which accelerator the lab uses (probes KVM once, cached in build/)
  demo      boot a guest and show each device working, then shut it down (demo --help lists them)
  boot      boot a guest (vstreamd + QEMU) and keep it until Enter or Ctrl-C
            [--name NAME] [--virtio-port-only | --pci-serial-only] [--no-daemon]
  bench-hid hid latency: host inject -> guest evdev read -> ack, p50/p99, per mux transport
            [--count N] (default 2000)
  bench-qga vstream-agent vs qemu-ga in one guest: guest-ping latency, guest-file-read
            throughput, resident memory; prints a table with ratios (bench-qga --help)
  bench-hostile  a hostile guest beside a good one (vstream-agent), no QEMU: vstreamd's
            memory, log, the good guest's echo and stalls, status time, per attack
            [--seconds N] (20) [--attack NAME]... (churn fill garbage crc-bomb credit-lie)
  bench-vsock vstreamd's own virtio-vsock device vs vhost-device-vsock, same guest: guest->host
            and host->guest, 4 KiB and 64 KiB writes, MiB/s and backend CPU s/GiB, ratios last
            (bench-vsock --mib N)
  bench-port a channel through vstream-agent vs the raw virtio-serial port, same guest: both
            directions, 64 KiB writes, MiB/s and the agent's CPU s/GiB, ratios last
            (bench-port --mib N --repeats R)
  bench-cp  vstreamctl cp vs the diag echo channel and cp --via qga (a file each way), and
            cp -r of many small files vs tar through vstreamctl exec, one guest, ratios last
            (bench-cp --mib N --files N)
  bench-fastnet fastnet (shared memory, channel-only) vs QEMU virtio-net (TAP, user) and ppp,
            one guest: TCP MiB/s each way, ping p50, doorbells/MiB, ratios last (--mib N,
            --poll-us N: vstreamd's poll_us)
            [--trace-agent: the guest agent's syscalls and switches on the shared-memory rows]
  guest-profile where a lab guest's vCPU spends its time: samples its instruction pointer
            through QEMU's gdb stub, names kernel and agent symbols (guest-profile --help)
  bench-scale 1000 vstream-agent processes on one vstreamd, no VM: status time, memory
            per idle guest, idle CPU and wake-ups, exec latency (bench-scale --help)

./x.sh setup installs the Debian packages the lab needs; ./x.sh test runs everything."
}

fn build_agent() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--profile",
            paths::AGENT_PROFILE,
            "--target",
            paths::AGENT_TARGET,
            "-p",
            "vstream-agent",
        ])
        .env("RUSTFLAGS", paths::AGENT_RUSTFLAGS)
        .current_dir(paths::workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("the static agent build failed ({status})");
    }
    println!("{}", paths::agent_bin().display());
    Ok(())
}

fn deb_task(args: &[String]) -> Result<()> {
    let mut bin_dir = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bin-dir" => bin_dir = Some(it.next().context("--bin-dir needs a value")?.into()),
            other => bail!("deb: unknown option {other:?}\n\n{}", usage()),
        }
    }
    for deb in deb::build_all(bin_dir)? {
        println!("{}", deb.display());
    }
    Ok(())
}

/// Builds vstreamd, vstreamctl and vstream-agent (release) and runs the hostile-guest benchmark.
fn bench_hostile(args: &[String]) -> Result<()> {
    let mut opts = hostile::Options {
        duration: std::time::Duration::from_secs(20),
        attacks: Vec::new(),
        bin_dir: paths::target_dir().join("release"),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                let s: f64 = it.next().context("--seconds needs a value")?.parse()?;
                opts.duration = std::time::Duration::from_secs_f64(s);
            }
            "--attack" => {
                let name = it.next().context("--attack needs a name")?;
                let attack =
                    hostile::Attack::parse(name).with_context(|| format!("no attack {name:?}"))?;
                opts.attacks.push(attack);
            }
            other => bail!("bench-hostile: unknown option {other:?}\n\n{}", usage()),
        }
    }
    if opts.attacks.is_empty() {
        opts.attacks = hostile::Attack::ALL.to_vec();
    }
    opts.bin_dir = release_build()?;
    let report = hostile::run(&opts)?;
    hostile::print(&report, &opts);
    Ok(())
}

fn image_task() -> Result<()> {
    let image = image::ensure_image()?;
    println!(
        "{}{}\n{}\nkernel {}",
        image.vmlinuz.display(),
        if image.rebuilt { "" } else { " (up to date)" },
        image.initramfs.display(),
        image.kernel.version
    );
    Ok(())
}

fn accel_task() -> Result<()> {
    let image = image::ensure_image()?;
    let verdict = accel::detect(&image)?;
    println!("{}: {}", verdict.accel, verdict.reason);
    Ok(())
}

fn boot_task(args: &[String]) -> Result<()> {
    let mut options = LabOptions::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--name" => options.name = it.next().context("--name needs a value")?.clone(),
            "--virtio-port-only" => options.pci_serial = false,
            "--pci-serial-only" => options.virtio_port = false,
            "--no-daemon" => options.start_daemon = false,
            other => bail!("boot: unknown option {other:?}\n\n{}", usage()),
        }
    }
    let lab = Lab::boot(options)?;
    let p = lab.paths();
    println!(
        "guest {:?} is up ({}, booted in {:.1} s)\n  files:       {}\n  control:     {}\n  \
         attach:      {} --control {} console {} --name hvc0   (Ctrl-] detaches)\n  \
         status:      {} --control {} status --json\n  raw console: {}\n  cmdline:     {}",
        lab.name(),
        lab.accel(),
        lab.boot_time().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        p.dir.display(),
        p.control.display(),
        paths::host_bin("vstreamctl").display(),
        p.control.display(),
        lab.name(),
        paths::host_bin("vstreamctl").display(),
        p.control.display(),
        p.sockets.ttys0_logfile.display(),
        lab.kernel_cmdline(),
    );
    println!("press Enter to shut the guest down");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    lab.shutdown()?;
    Ok(())
}

/// Boots one guest per mux transport and measures `vstreamctl input GUEST latency` there.
fn bench_hid(args: &[String]) -> Result<()> {
    let mut count = 2000usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--count" => count = it.next().context("--count needs a value")?.parse()?,
            other => bail!("bench-hid: unknown option {other:?}"),
        }
    }
    for (label, options) in [
        (
            "virtio-serial port",
            LabOptions::virtio_port_only().named("bench-port"),
        ),
        (
            "PCI 16550 at 115200 baud",
            LabOptions::pci_serial_only().named("bench-serial"),
        ),
    ] {
        let lab = Lab::boot(options)?;
        lab.wait_for(
            "the mux transport",
            std::time::Duration::from_secs(120),
            |s| lab.mux_transports_up(s),
        )?;
        // The first probe creates the device (and waits for it to settle): warm up first.
        let warm = lab.ctl(["input", lab.name(), "latency", "--count", "20"])?;
        if !warm.status.success() {
            bail!("{}", String::from_utf8_lossy(&warm.stderr));
        }
        let n = count.to_string();
        let out = lab.ctl([
            "input",
            lab.name(),
            "latency",
            "--count",
            n.as_str(),
            "--json",
        ])?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        println!(
            "{label} ({}): {} probes, {} read back; p50 {} us, p90 {} us, p99 {} us, max {} us, mean {} us",
            lab.accel(),
            v["count"], v["seen"], v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"], v["mean_us"]
        );
        lab.shutdown()?;
    }
    Ok(())
}

/// `cargo xtask demo [--help]`: `--help` lists the demos instead of booting a guest.
fn demo_task(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        None => demo::run(),
        Some("-h" | "--help") => {
            println!("usage: cargo xtask demo\n\nboots a guest and runs, in order:");
            for d in demo::DEVICE_DEMOS {
                println!("  {:<15} {}", d.name, d.what);
            }
            Ok(())
        }
        Some(other) => bail!("demo takes no arguments, got {other:?} (cargo xtask demo --help)"),
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        println!("{}", usage());
        return Ok(());
    };
    match task.as_str() {
        "image" => image_task(),
        "agent" => build_agent(),
        "agent-order" => agent_order::run(&args[1..]),
        "deb" => deb_task(&args[1..]),
        "accel" => accel_task(),
        "demo" => demo_task(&args[1..]),
        "boot" => boot_task(&args[1..]),
        "bench-hid" => bench_hid(&args[1..]),
        "bench-port" => bench_port::run(&args[1..]),
        "bench-qga" => bench_qga::run(&args[1..]),
        "bench-hostile" => bench_hostile(&args[1..]),
        "bench-scale" => bench_scale::run(&args[1..]),
        "bench-vsock" => bench_vsock::run(&args[1..]),
        "bench-fastnet" => bench_fastnet::run(&args[1..]),
        "bench-cp" => bench_cp::run(&args[1..]),
        "guest-profile" => guest_profile::run(&args[1..]),
        "help" | "-h" | "--help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown task {other:?}\n\n{}", usage()),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds vstreamd, vstreamctl and vstream-agent as users run them (release) for a benchmark;
/// returns their directory.
fn release_build() -> Result<std::path::PathBuf> {
    release_build_of(&["vstream-host", "vstream-agent"])
}

/// What every lab benchmark needs first: the agent in the image, the host binaries as users run
/// them (release), and a lab timeout long enough for big transfers.
fn bench_binaries() -> Result<()> {
    build_agent()?;
    let bin = release_build_of(&["vstream-host"])?;
    std::env::set_var("VSTREAM_BIN_DIR", &bin);
    if std::env::var_os("VSTREAM_LAB_TIMEOUT").is_none() {
        std::env::set_var("VSTREAM_LAB_TIMEOUT", "3600");
    }
    Ok(())
}

/// [`bench_binaries`], and a scratch directory `vstream-bench-NAME-PID`, which it returns.
fn bench_setup(name: &str) -> Result<std::path::PathBuf> {
    bench_binaries()?;
    let dir = std::env::temp_dir().join(format!("vstream-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Builds `packages` in release; returns the directory of their binaries.
fn release_build_of(packages: &[&str]) -> Result<std::path::PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release"]);
    for p in packages {
        command.args(["-p", p]);
    }
    let status = command
        .current_dir(paths::workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("the release build of {packages:?} failed ({status})");
    }
    Ok(paths::target_dir().join("release"))
}

/// A benchmark option's value: the next argument, a number of at least 1.
fn positive_arg(it: &mut std::slice::Iter<'_, String>, name: &str) -> Result<usize> {
    let v: usize = it
        .next()
        .with_context(|| format!("{name} needs a value"))?
        .parse()
        .with_context(|| name.to_owned())?;
    if v == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(v)
}
