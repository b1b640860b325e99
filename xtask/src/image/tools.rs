//! The host programs copied into the guest: busybox and its applets, and a tool's shared libraries.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::deb;
use crate::elf::{self, Linkage};
use crate::paths;

/// Parses `ldd` output into the absolute paths of the libraries (and the interpreter) it names.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.is_empty()
            || line.contains("statically linked")
            || line.contains("not a dynamic executable")
        {
            continue;
        }
        if line.contains("=> not found") {
            bail!("missing shared library: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(" (").next().unwrap_or("").trim(),
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
        // Anything else (linux-vdso.so.1) is provided by the kernel.
    }
    Ok(libs)
}

/// The shared libraries and the ELF interpreter of a dynamic binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let linkage = elf::linkage(binary)?;
    let Linkage::Dynamic { interpreter } = linkage else {
        return Ok(Vec::new());
    };
    let out = deb::run(Command::new("ldd").arg(binary))?;
    let mut libs = parse_ldd(&String::from_utf8_lossy(&out))
        .with_context(|| format!("shared libraries of {}", binary.display()))?;
    let interpreter = PathBuf::from(interpreter);
    if !libs.contains(&interpreter) {
        libs.push(interpreter);
    }
    Ok(libs)
}

pub(super) fn find_busybox() -> Result<PathBuf> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox"].map(PathBuf::from);
    let path = candidates
        .into_iter()
        .find(|p| paths::is_executable(p))
        .ok_or_else(|| anyhow!("busybox not found: run ./x.sh setup (package busybox-static)"))?;
    if !elf::linkage(&path)?.is_static() {
        bail!(
            "{} is dynamically linked: install busybox-static instead of busybox (./x.sh setup)",
            path.display()
        );
    }
    Ok(path)
}

pub(super) fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list-full failed", busybox.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
\tlibgcrypt.so.20 => /lib/x86_64-linux-gnu/libgcrypt.so.20 (0x00007f0f)\n\
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0fd8bfe000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcrypt.so.20"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }
}
