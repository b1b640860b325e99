//! `cargo xtask guest-profile`: where a lab guest's one vCPU spends its time, by sampling its
//! instruction pointer through QEMU's gdb stub. Under TCG no profiler runs inside the guest
//! (no perf in a busybox guest, and the cost that matters is the emulated instruction), so the
//! guest is stopped `--hz` times a second, its `rip` read and the guest let go again.
//!
//! A lab guest started with `VSTREAM_LAB_QEMU_ARGS="-gdb tcp::1234"` and
//! `VSTREAM_LAB_KERNEL_ARGS="nokaslr norandmaps"` has its kernel where `System.map` says and its
//! static-pie agent at the same address in every boot (`cat /proc/PID/maps` in the guest
//! gives it: `--elf-base`). Addresses are named from the guest's `/proc/kallsyms` (or
//! System.map, which lacks the modules) and `nm` of the unstripped agent; the rest is counted
//! as "other user space" (dd, busybox) or an unnamed kernel address.
//!
//! The stop requests are served by QEMU's main thread: when every host core is busy it gets
//! one mostly while the vCPU thread sleeps, so time in the idle loop is over-counted then.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Options {
    gdb: String,
    seconds: u64,
    hz: u64,
    system_map: Option<PathBuf>,
    elf: Option<PathBuf>,
    elf_base: u64,
    top: usize,
}

fn usage() -> &'static str {
    "guest-profile --gdb HOST:PORT [--seconds S] [--hz H] [--system-map FILE] [--elf FILE --elf-base HEX] [--top N]
  --gdb         QEMU's gdb stub (VSTREAM_LAB_QEMU_ARGS=\"-gdb tcp::1234\" for lab guests)
  --seconds     how long to sample (10)
  --hz          samples a second (100); each stops the guest for a moment
  --system-map  the guest's /proc/kallsyms, or its kernel's System.map (no modules); boot with nokaslr
  --elf         an unstripped static-pie binary running in the guest (the agent), named with nm
  --elf-base    where the guest loaded it (first line of /proc/PID/maps; boot with norandmaps)
  --top         symbols to print (30)"
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        gdb: String::new(),
        seconds: 10,
        hz: 100,
        system_map: None,
        elf: None,
        elf_base: 0,
        top: 30,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--gdb" => o.gdb = value()?.clone(),
            "--seconds" => o.seconds = value()?.parse().context("--seconds")?,
            "--hz" => o.hz = value()?.parse().context("--hz")?,
            "--system-map" => o.system_map = Some(value()?.into()),
            "--elf" => o.elf = Some(value()?.into()),
            "--elf-base" => {
                let v = value()?;
                o.elf_base = u64::from_str_radix(v.trim_start_matches("0x"), 16)
                    .context("--elf-base (hex)")?;
            }
            "--top" => o.top = value()?.parse().context("--top")?,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?}\n{}", usage()),
        }
    }
    if o.gdb.is_empty() || o.hz == 0 {
        bail!("--gdb is required and --hz must be at least 1\n{}", usage());
    }
    Ok(o)
}

/// A gdb remote-protocol connection to QEMU's stub, with acknowledgements on.
struct Stub {
    s: TcpStream,
}

impl Stub {
    fn send(&mut self, data: &str) -> Result<()> {
        let sum = data.bytes().fold(0u8, u8::wrapping_add);
        write!(self.s, "${data}#{sum:02x}")?;
        let mut ack = [0u8];
        loop {
            self.s.read_exact(&mut ack)?;
            match ack[0] {
                b'+' => return Ok(()),
                // A stop reply the stub sent on its own (QEMU does on attach): taken, and acked.
                b'$' => {
                    self.rest_of_packet()?;
                }
                other => bail!("the stub refused {data:?} ({:?})", other as char),
            }
        }
    }

    /// The next packet's data (stray acknowledgements before it skipped), acknowledged.
    fn packet(&mut self) -> Result<String> {
        let mut b = [0u8];
        loop {
            self.s.read_exact(&mut b)?;
            if b[0] == b'$' {
                break;
            }
        }
        self.rest_of_packet()
    }

    /// A packet's data after its `$`, acknowledged.
    fn rest_of_packet(&mut self) -> Result<String> {
        let mut b = [0u8];
        let mut data = Vec::new();
        loop {
            self.s.read_exact(&mut b)?;
            if b[0] == b'#' {
                break;
            }
            data.push(b[0]);
        }
        let mut sum = [0u8; 2];
        self.s.read_exact(&mut sum)?;
        self.s.write_all(b"+")?;
        Ok(String::from_utf8_lossy(&data).into_owned())
    }

    /// `rip` of the stopped vCPU: in the `g` reply (all registers, little-endian hex), after
    /// the sixteen 64-bit general registers. (QEMU answers `p`, one register, only to a client
    /// that read its target description.)
    fn rip(&mut self) -> Result<u64> {
        self.send("g")?;
        let regs = self.packet()?;
        let hex = regs
            .get(16 * 16..17 * 16)
            .with_context(|| format!("register reply {regs:?}"))?;
        let mut arr = [0u8; 8];
        for (i, b) in arr.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .with_context(|| format!("register reply {regs:?}"))?;
        }
        Ok(u64::from_le_bytes(arr))
    }

    fn stop(&mut self) -> Result<()> {
        self.s.write_all(&[0x03])?;
        let reply = self.packet()?;
        if !reply.starts_with('T') && !reply.starts_with('S') {
            bail!("unexpected stop reply {reply:?}");
        }
        Ok(())
    }

    /// Lets the guest run on (no reply until it stops again).
    fn resume(&mut self) -> Result<()> {
        self.send("c")
    }
}

/// Sorted (address, name) pairs.
type Symbols = Vec<(u64, String)>;

fn system_map(path: &PathBuf) -> Result<Symbols> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut syms: Symbols = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let addr = u64::from_str_radix(w.next()?, 16).ok()?;
            let kind = w.next()?;
            let name = w.next()?;
            "tTwW".contains(kind).then(|| (addr, name.to_owned()))
        })
        .collect();
    syms.sort();
    Ok(syms)
}

fn elf_symbols(path: &PathBuf, base: u64) -> Result<Symbols> {
    let out = Command::new("nm")
        .args(["-C", "--defined-only"])
        .arg(path)
        .output()
        .context("running nm (binutils)")?;
    if !out.status.success() {
        bail!("nm {} failed", path.display());
    }
    let mut syms: Symbols = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let addr = u64::from_str_radix(l.get(..16)?, 16).ok()?;
            let kind = l.get(17..18)?;
            let name = l.get(19..)?;
            "tTwW"
                .contains(kind)
                .then(|| (addr + base, name.to_owned()))
        })
        .collect();
    syms.sort();
    Ok(syms)
}

/// The symbol `addr` is in: the last one at or below it, if within `limit` bytes.
fn name_of(syms: &Symbols, addr: u64) -> Option<&str> {
    let i = syms.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
    let (start, name) = &syms[i];
    (addr - start < 1 << 20).then_some(name.as_str())
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let kernel = o.system_map.as_ref().map(system_map).transpose()?;
    let elf = o
        .elf
        .as_ref()
        .map(|p| elf_symbols(p, o.elf_base))
        .transpose()?;
    let s = TcpStream::connect(&o.gdb).with_context(|| format!("connecting to {}", o.gdb))?;
    s.set_nodelay(true)?;
    let mut stub = Stub { s };
    // QEMU stops the guest when a debugger attaches; ask why, then let it go.
    stub.send("?")?;
    stub.packet()?;
    stub.resume()?;

    let period = Duration::from_micros(1_000_000 / o.hz);
    let end = Instant::now() + Duration::from_secs(o.seconds);
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut areas = [0u64; 4]; // kernel, the ELF, other user space, unknown kernel
    let mut samples = 0u64;
    while Instant::now() < end {
        std::thread::sleep(period);
        stub.stop()?;
        let rip = stub.rip();
        stub.resume()?;
        let rip = rip?;
        samples += 1;
        let (area, name) = if rip >= 0xffff_8000_0000_0000 {
            match kernel.as_ref().and_then(|k| name_of(k, rip)) {
                Some(n) => (0, format!("[k] {n}")),
                None => (3, "[k] ?".to_owned()),
            }
        } else {
            match elf.as_ref().and_then(|e| name_of(e, rip)) {
                Some(n) if rip >= o.elf_base => (1, n.to_owned()),
                _ => (2, "[user, other]".to_owned()),
            }
        };
        areas[area] += 1;
        *counts.entry(name).or_default() += 1;
    }
    let pct = |n: u64| 100.0 * n as f64 / samples.max(1) as f64;
    println!(
        "guest-profile: {samples} samples over {} s; kernel {:.1}% (unnamed {:.1}%), {} {:.1}%, other user space {:.1}%",
        o.seconds,
        pct(areas[0] + areas[3]),
        pct(areas[3]),
        o.elf
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or("the ELF".into(), |n| n.to_string_lossy()),
        pct(areas[1]),
        pct(areas[2]),
    );
    let mut top: Vec<(String, u64)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (name, n) in top.into_iter().take(o.top) {
        println!("{:>6.1}% {:>6}  {name}", pct(n), n);
    }
    Ok(())
}
