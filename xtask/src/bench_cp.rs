//! `cargo xtask bench-cp`: `vstreamctl cp` in one guest against what moves the same bytes
//! otherwise, all in one run:
//! - a file of `--mib N` MiB (incompressible) each way, against the channel's own speed
//!   (`vstreamctl open GUEST diag echo`, the same bytes both ways at once through the agent's
//!   echo service) and against `vstreamctl cp --via qga` (the QGA file commands, base64 in JSON);
//! - `cp -r` of a tree of `--files N` small files each way, against `tar c | vstreamctl exec
//!   GUEST -- tar x` (and `exec -- tar c | tar x`), what users of other guest agents reach for.
//!
//! Every copy is checked: a file's sha256, a tree's manifest (entry count and every file's
//! sha256) on both sides. Times are the host's wall clock around the whole command. Ratios last.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_port::echo;
use xtask::lab::testing::{exec_sh_within, pseudo_random, sha256_file, write_random_file};
use xtask::lab::{Lab, LabOptions};

/// Room for the file and a tree in the guest's RAM-backed /tmp.
const GUEST_MIB: u32 = 1024;

/// The longest any single copy may take (the QGA path is the slow one).
const COPY_TIMEOUT: Duration = Duration::from_secs(1800);

/// Files per directory of the tree.
const PER_DIR: usize = 100;

/// What a tree is to a user: the number of entries, and every file's path and sha256 (hashed
/// into one line). The same script on both sides (busybox in the guest).
const TREE_MANIFEST: &str =
    "cd \"$1\" && echo \"$(find . | wc -l) $(find . -type f -exec sha256sum {} + | LC_ALL=C sort | sha256sum)\"";

/// One measured transfer.
struct Row {
    what: String,
    mib_s: f64,
    files_s: Option<f64>,
    took: Duration,
    /// The guest's side: the agent's CPU seconds per MiB, and the share of the wall time the
    /// guest's vCPU was busy (near 1: the guest's CPU is the limit).
    guest: Option<(f64, f64)>,
}

fn row(what: &str, bytes: u64, files: Option<usize>, took: Duration) -> Row {
    let secs = took.as_secs_f64();
    Row {
        what: what.to_owned(),
        mib_s: bytes as f64 / (1u64 << 20) as f64 / secs,
        files_s: files.map(|n| n as f64 / secs),
        took,
        guest: None,
    }
}

/// The guest's clock ticks per second in /proc (USER_HZ on x86 Linux).
const TICKS: f64 = 100.0;

/// The guest's CPU counters in ticks: all CPUs busy (user, nice, system, irq, softirq), and
/// the agent's user + system time. Read through exec: its own small cost falls into both.
fn guest_ticks(lab: &Lab) -> Result<[f64; 2]> {
    let out = exec_sh_within(
        lab,
        "read -r _ u n s _ _ i q _ < /proc/stat; a=$(cat /run/vstream-agent.pid); \
         echo $((u + n + s + i + q)) $(sed 's/.*) //' /proc/$a/stat | cut -d' ' -f12,13 | tr ' ' +)",
        COPY_TIMEOUT,
    );
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|w| w.split('+').map(str::parse::<f64>).sum::<Result<f64, _>>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("guest CPU counters: {out:?}"))?;
    match v[..] {
        [busy, agent] => Ok([busy, agent]),
        _ => bail!("guest CPU counters: {out:?}"),
    }
}

/// Runs `vstreamctl ARGS` (see [`timed_ctl`]) and measures the guest's side of it.
fn measured_ctl(lab: &Lab, what: String, bytes: u64, args: &[&str]) -> Result<Row> {
    let before = guest_ticks(lab)?;
    let took = timed_ctl(lab, args)?;
    let after = guest_ticks(lab)?;
    let mut r = row(&what, bytes, None, took);
    let mib = bytes as f64 / (1u64 << 20) as f64;
    r.guest = Some((
        (after[1] - before[1]) / TICKS / mib,
        (after[0] - before[0]) / TICKS / took.as_secs_f64(),
    ));
    Ok(r)
}

/// `files` small files (0 to 4 KiB, incompressible) in directories of [`PER_DIR`]; their bytes.
fn make_tree(root: &Path, files: usize) -> Result<u64> {
    let mut bytes = 0;
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / PER_DIR));
        if i % PER_DIR == 0 {
            fs::create_dir_all(&dir)?;
        }
        let data = pseudo_random((i * 7919) % 4097, i as u64);
        bytes += data.len() as u64;
        fs::write(dir.join(format!("f{i:05}")), data)?;
    }
    Ok(bytes)
}

fn host_manifest(dir: &Path) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", TREE_MANIFEST, "sh"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "manifest of {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn guest_manifest(lab: &Lab, dir: &str) -> String {
    let script = format!("set -- {dir}; {TREE_MANIFEST}");
    exec_sh_within(lab, &script, COPY_TIMEOUT).trim().to_owned()
}

fn guest_sha256(lab: &Lab, path: &str) -> String {
    let out = exec_sh_within(lab, &format!("sha256sum {path}"), COPY_TIMEOUT);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// Runs `vstreamctl ARGS`; it must succeed. How long it took.
fn timed_ctl(lab: &Lab, args: &[&str]) -> Result<Duration> {
    let started = Instant::now();
    let out = lab.ctl_within(args, &[], COPY_TIMEOUT)?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "vstreamctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// Runs `from | to`; both must succeed. How long the pipeline took.
fn timed_pipe(mut from: Command, mut to: Command) -> Result<Duration> {
    let started = Instant::now();
    let mut first = from.stdout(Stdio::piped()).spawn().context("spawn")?;
    let pipe = first.stdout.take().context("stdout")?;
    let second = to.stdin(Stdio::from(pipe)).status().context("spawn")?;
    let first = first.wait()?;
    let took = started.elapsed();
    if !first.success() || !second.success() {
        bail!("{from:?} ({first}) | {to:?} ({second}) failed");
    }
    Ok(took)
}

/// `vstreamctl exec GUEST -- sh -c SCRIPT`.
fn exec_command(lab: &Lab, script: &str) -> Command {
    let mut c = lab.ctl_command();
    c.args(["exec", lab.name(), "--", "sh", "-c", script]);
    c
}

/// A file copied `GUEST:path` <-> `local` both ways with `via` (`[]` or `["--via", "qga"]`),
/// sha256 checked at each end; the rows.
fn file_both_ways(
    lab: &Lab,
    via: &[&str],
    local: &Path,
    want: &str,
    what: &str,
) -> Result<[Row; 2]> {
    let bytes = fs::metadata(local)?.len();
    let remote = format!("{}:/tmp/big", lab.name());
    exec_sh_within(lab, "rm -f /tmp/big", COPY_TIMEOUT);
    let local_s = local.to_str().context("utf-8")?;
    let args = [&["cp"], via, &[local_s, &remote]].concat();
    let h2g = measured_ctl(lab, format!("{what} h->g"), bytes, &args)?;
    if guest_sha256(lab, "/tmp/big") != want {
        bail!("{what}: the guest's copy differs");
    }
    let back = local.with_extension("back");
    let _ = fs::remove_file(&back);
    let back_s = back.to_str().context("utf-8")?;
    let args = [&["cp"], via, &[&remote, back_s]].concat();
    let g2h = measured_ctl(lab, format!("{what} g->h"), bytes, &args)?;
    if sha256_file(&back) != want {
        bail!("{what}: the host's copy differs");
    }
    fs::remove_file(&back)?;
    Ok([h2g, g2h])
}

/// The tree copied into the guest and back, by `cp -r` and by tar through exec, each checked
/// against `want`; the rows.
fn tree_both_ways(
    lab: &Lab,
    tree: &Path,
    bytes: u64,
    files: usize,
    want: &str,
) -> Result<[Row; 4]> {
    let scratch = tree.with_extension("back");
    let tree_s = tree.to_str().context("utf-8")?;
    let back_s = scratch.to_str().context("utf-8")?;
    let check_guest = |dir: &str, what: &str| -> Result<()> {
        let got = guest_manifest(lab, dir);
        if got != want {
            bail!("{what}: the guest's tree differs: {got} vs {want}");
        }
        Ok(())
    };
    let check_host = |what: &str| -> Result<()> {
        let got = host_manifest(&scratch)?;
        if got != want {
            bail!("{what}: the host's tree differs: {got} vs {want}");
        }
        fs::remove_dir_all(&scratch)?;
        Ok(())
    };
    exec_sh_within(
        lab,
        "rm -rf /tmp/big /tmp/cptree /tmp/tartree",
        COPY_TIMEOUT,
    );

    let remote = format!("{}:/tmp/cptree", lab.name());
    let cp_h2g = timed_ctl(lab, &["cp", "-r", tree_s, &remote])?;
    check_guest("/tmp/cptree", "cp -r h->g")?;
    let _ = fs::remove_dir_all(&scratch);
    let cp_g2h = timed_ctl(lab, &["cp", "-r", &remote, back_s])?;
    check_host("cp -r g->h")?;

    let mut tar_c = Command::new("tar");
    tar_c.args(["c", "-C", tree_s, "."]);
    let tar_h2g = timed_pipe(
        tar_c,
        exec_command(lab, "mkdir /tmp/tartree && tar x -C /tmp/tartree"),
    )?;
    check_guest("/tmp/tartree", "tar h->g")?;
    fs::create_dir(&scratch)?;
    let mut tar_x = Command::new("tar");
    tar_x.args(["x", "-C", back_s]);
    let tar_g2h = timed_pipe(exec_command(lab, "tar c -C /tmp/cptree ."), tar_x)?;
    check_host("tar g->h")?;
    Ok([
        row("cp -r h->g", bytes, Some(files), cp_h2g),
        row("cp -r g->h", bytes, Some(files), cp_g2h),
        row("tar | exec tar x h->g", bytes, Some(files), tar_h2g),
        row("exec tar c | tar g->h", bytes, Some(files), tar_g2h),
    ])
}

/// Runs the benchmark; `args`: `--mib N` (default 256) the file, `--files N` (default 10000)
/// the tree.
pub fn run(args: &[String]) -> Result<()> {
    let (mut mib, mut files) = (256usize, 10_000usize);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mib" => mib = crate::positive_arg(&mut it, "--mib")?,
            "--files" => files = crate::positive_arg(&mut it, "--files")?,
            other => bail!("bench-cp: unknown option {other:?} (options: --mib N --files N)"),
        }
    }
    let bytes = mib << 20;
    let dir = crate::bench_setup("cp")?;
    let big = dir.join("big");
    write_random_file(&big, bytes);
    let want = sha256_file(&big);
    let tree = dir.join("tree");
    let tree_bytes = make_tree(&tree, files)?;
    let tree_want = host_manifest(&tree)?;

    let options = LabOptions {
        memory_mib: GUEST_MIB,
        ..LabOptions::virtio_port_only().named("benchcp")
    };
    let lab = Lab::boot(options)?;
    lab.wait_for("the mux over the port", Duration::from_secs(180), |s| {
        lab.mux_transports_up(s)
    })?;

    eprintln!("bench-cp: diag echo");
    let echo_row = row(
        "diag echo (both at once)",
        bytes as u64,
        None,
        echo(&lab, bytes)?,
    );
    eprintln!("bench-cp: cp");
    let cp = file_both_ways(&lab, &[], &big, &want, "cp")?;
    eprintln!("bench-cp: cp --via qga");
    let qga = file_both_ways(&lab, &["--via", "qga"], &big, &want, "cp --via qga")?;
    eprintln!("bench-cp: trees");
    let trees = tree_both_ways(&lab, &tree, tree_bytes, files, &tree_want)?;
    let accel = lab.accel().to_string();
    lab.shutdown()?;
    let _ = fs::remove_dir_all(&dir);

    println!(
        "bench-cp: one run, guest {accel}, 1 vCPU, {mib} MiB file, tree of {files} files ({:.1} MiB) in directories of {PER_DIR}; sha256 and manifests checked",
        tree_bytes as f64 / (1u64 << 20) as f64
    );
    println!(
        "{:<26} {:>9} {:>9} {:>8} {:>14} {:>10}",
        "transfer", "seconds", "MiB/s", "files/s", "agent ms/MiB", "guest busy"
    );
    let all: Vec<&Row> = std::iter::once(&echo_row)
        .chain(&cp)
        .chain(&qga)
        .chain(&trees)
        .collect();
    for r in &all {
        let files_s = r.files_s.map(|f| format!("{f:.0}")).unwrap_or_default();
        let (agent, busy) = r.guest.map_or_else(Default::default, |(a, b)| {
            (format!("{:.1}", a * 1000.0), format!("{:.0}%", b * 100.0))
        });
        println!(
            "{:<26} {:>9.2} {:>9.1} {:>8} {agent:>14} {busy:>10}",
            r.what,
            r.took.as_secs_f64(),
            r.mib_s,
            files_s
        );
    }
    let e = echo_row.mib_s;
    println!("ratios (throughput; aims: cp >= 0.8x echo):");
    println!(
        "  cp / diag echo: h->g {:.2}x, g->h {:.2}x",
        cp[0].mib_s / e,
        cp[1].mib_s / e
    );
    println!(
        "  cp / cp --via qga: h->g {:.2}x, g->h {:.2}x",
        cp[0].mib_s / qga[0].mib_s,
        cp[1].mib_s / qga[1].mib_s
    );
    println!(
        "  cp -r / tar through exec: h->g {:.2}x, g->h {:.2}x",
        trees[0].mib_s / trees[2].mib_s,
        trees[1].mib_s / trees[3].mib_s
    );
    Ok(())
}
