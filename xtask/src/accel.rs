//! Choosing QEMU's accelerator: KVM when it really boots our kernel, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: on some hosts it is a nested, paravirtual KVM on which
//! `-accel kvm` aborts or hangs with a stock kernel. So the lab boots the guest kernel once under KVM
//! with a tiny initramfs that prints a marker and powers off, with a hard timeout. The verdict is cached
//! in `build/accel-verdict.txt`, keyed by the QEMU version, the guest kernel and the host kernel, so the
//! probe runs once per combination. `VSTREAM_LAB_ACCEL=kvm|tcg` skips the probe.

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cpio::Tree;
use crate::image::{FileLock, GuestImage};
use crate::{paths, process};

/// How long the KVM probe may take before KVM is declared unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

const PROBE_MARKER: &str = "vstream-lab: kvm probe ok";

const PROBE_INIT: &str = "#!/bin/busybox sh\n\
/bin/busybox mount -t devtmpfs devtmpfs /dev\n\
echo 'vstream-lab: kvm probe ok' >/dev/kmsg\n\
/bin/busybox poweroff -f\n";

/// The TCG guest's CPU: QEMU's `max` without ERMS and FSRM. With them the guest kernel copies
/// to and from user space with `rep movsb`, which TCG emulates a byte per step; without them
/// it copies 8 bytes per step or with plain moves. Every TCP transfer of bench-fastnet ran
/// 2.3-7.1x faster that way,
/// whatever its NIC (docs/PERFORMANCE.md, bench-fastnet run 8 against run 7).
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's binary translator: slow (the guest boots in ~8 s) but works everywhere.
    Tcg,
}

impl Accel {
    /// The QEMU arguments selecting this accelerator and a CPU model: `cpu`, else the one that
    /// matches the accelerator (`host` under KVM, [`TCG_CPU`] under TCG; both have RDRAND).
    pub fn qemu_args(self, cpu: Option<&str>) -> Vec<String> {
        let (accel, default_cpu) = match self {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", TCG_CPU),
        };
        ["-accel", accel, "-cpu", cpu.unwrap_or(default_cpu)]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The chosen accelerator and why.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The accelerator to use.
    pub accel: Accel,
    /// A sentence for logs.
    pub reason: String,
}

/// The QEMU system emulator, or an error that says how to install it.
pub fn qemu_binary() -> Result<PathBuf> {
    paths::which("qemu-system-x86_64").ok_or_else(|| {
        anyhow::anyhow!(
            "qemu-system-x86_64 not found: run ./x.sh setup (package qemu-system-x86), \
             or set VSTREAM_SKIP_E2E=1 to skip the end-to-end tests"
        )
    })
}

fn qemu_version(qemu: &Path) -> Result<String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", qemu.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

fn host_kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn kvm_accessible() -> std::result::Result<(), String> {
    match File::options().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("/dev/kvm is not usable ({e})")),
    }
}

/// Picks the accelerator for `image`, probing KVM once per QEMU/kernel/host combination.
pub fn detect(image: &GuestImage) -> Result<Verdict> {
    if let Ok(forced) = std::env::var("VSTREAM_LAB_ACCEL") {
        if !forced.is_empty() {
            let Some(accel) = Accel::parse(&forced) else {
                bail!("VSTREAM_LAB_ACCEL={forced:?}: expected kvm or tcg");
            };
            return Ok(Verdict {
                accel,
                reason: format!("forced by VSTREAM_LAB_ACCEL={accel}"),
            });
        }
    }
    if let Err(reason) = kvm_accessible() {
        return Ok(Verdict {
            accel: Accel::Tcg,
            reason,
        });
    }
    let qemu = qemu_binary()?;
    let key = format!(
        "{} | guest kernel {} ({} bytes) | host kernel {}",
        qemu_version(&qemu)?,
        image.kernel.version,
        fs::metadata(&image.vmlinuz).map(|m| m.len()).unwrap_or(0),
        host_kernel()
    );
    let dir = paths::build_dir().join("kvm-probe");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = FileLock::exclusive(&dir.join(".lock"))?;
    let cache = paths::build_dir().join("accel-verdict.txt");
    if let Some(verdict) = read_cache(&cache, &key) {
        return Ok(verdict);
    }
    let verdict = probe_kvm(&qemu, image, &dir)?;
    let text = format!(
        "key: {key}\naccel: {}\nreason: {}\n",
        verdict.accel, verdict.reason
    );
    fs::write(&cache, text).with_context(|| format!("writing {}", cache.display()))?;
    Ok(verdict)
}

fn read_cache(path: &Path, key: &str) -> Option<Verdict> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()?.strip_prefix("key: ")? != key {
        return None;
    }
    let accel = Accel::parse(lines.next()?.strip_prefix("accel: ")?)?;
    let reason = lines.next()?.strip_prefix("reason: ")?;
    Some(Verdict {
        accel,
        reason: format!("{reason} (cached in {})", path.display()),
    })
}

fn probe_initramfs(dir: &Path) -> Result<PathBuf> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| paths::is_executable(p))
        .context("busybox not found: run ./x.sh setup (package busybox-static)")?;
    let mut tree = Tree::new();
    tree.host_file("/bin/busybox", 0o755, &busybox);
    tree.bytes("/init", 0o755, PROBE_INIT);
    tree.dir("/dev", 0o755);
    tree.char_dev("/dev/console", 0o600, 5, 1);
    let path = dir.join("initramfs.cpio");
    let out = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    tree.write_newc(std::io::BufWriter::new(out))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Boots the guest kernel under KVM with a marker-printing initramfs; KVM is good if the marker shows up
/// within [`PROBE_TIMEOUT`].
fn probe_kvm(qemu: &Path, image: &GuestImage, dir: &Path) -> Result<Verdict> {
    let initrd = probe_initramfs(dir)?;
    let console = dir.join("console.log");
    let qemu_log = dir.join("qemu.log");
    let _ = fs::remove_file(&console);
    let mut command = Command::new(qemu);
    command
        .args([
            "-machine",
            "q35",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot"])
        .args(Accel::Kvm.qemu_args(None))
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 printk.devkmsg=on"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(File::create(&qemu_log)?)
        .stderr(File::create(qemu_log.with_extension("stderr.log"))?);
    let started = Instant::now();
    eprintln!(
        "xtask: probing KVM (a guest boot with a {} s limit)...",
        PROBE_TIMEOUT.as_secs()
    );
    let mut child = process::spawn(command).context("starting the KVM probe")?;
    let verdict = loop {
        let log = fs::read_to_string(&console).unwrap_or_default();
        if log.contains(PROBE_MARKER) {
            break Verdict {
                accel: Accel::Kvm,
                reason: format!(
                    "KVM booted the guest kernel in {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Give a last look at the log: the guest may have printed and powered off in one go.
            if fs::read_to_string(&console)
                .unwrap_or_default()
                .contains(PROBE_MARKER)
            {
                continue;
            }
            let stderr =
                fs::read_to_string(qemu_log.with_extension("stderr.log")).unwrap_or_default();
            let last = stderr.lines().last().unwrap_or("").trim().to_string();
            break Verdict {
                accel: Accel::Tcg,
                reason: format!(
                    "QEMU with KVM exited ({status}) before the guest reached userspace: {last}"
                ),
            };
        }
        if started.elapsed() >= PROBE_TIMEOUT {
            break Verdict {
                accel: Accel::Tcg,
                reason: format!(
                    "QEMU with KVM did not boot the guest within {} s (nested KVM that hangs)",
                    PROBE_TIMEOUT.as_secs()
                ),
            };
        }
        thread::sleep(Duration::from_millis(50));
    };
    process::terminate(&mut child, Duration::from_millis(200));
    eprintln!("xtask: accelerator {}: {}", verdict.accel, verdict.reason);
    Ok(verdict)
}
