//! Just enough ELF reading to tell whether a binary is static and, if not, which interpreter it needs.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;

/// How a binary is linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// No interpreter and no dynamic section: runs with nothing else in the image.
    Static,
    /// Static-pie: no interpreter, relocates itself (what `+crt-static` gives with glibc).
    StaticPie,
    /// Needs this ELF interpreter (e.g. `/lib64/ld-linux-x86-64.so.2`) and shared libraries.
    Dynamic {
        /// The `PT_INTERP` path.
        interpreter: String,
    },
}

impl Linkage {
    /// True for the two static kinds.
    pub fn is_static(&self) -> bool {
        !matches!(self, Linkage::Dynamic { .. })
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    let v = u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?);
    usize::try_from(v).ok()
}

/// Reads the program headers of a little-endian ELF64 file and tells how it is linked.
pub fn linkage(path: &Path) -> Result<Linkage> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    linkage_of(&data).with_context(|| format!("{} is not a usable x86-64 ELF file", path.display()))
}

fn linkage_of(b: &[u8]) -> Result<Linkage> {
    if b.get(..4) != Some(b"\x7fELF") {
        bail!("no ELF magic");
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        bail!("not a little-endian 64-bit ELF");
    }
    let short = || anyhow::anyhow!("truncated ELF header");
    let phoff = u64_at(b, 0x20).ok_or_else(short)?;
    let phentsize = usize::from(u16_at(b, 0x36).ok_or_else(short)?);
    let phnum = usize::from(u16_at(b, 0x38).ok_or_else(short)?);
    let mut dynamic = false;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(b, ph).ok_or_else(short)?;
        if p_type == PT_INTERP {
            let off = u64_at(b, ph + 8).ok_or_else(short)?;
            let size = u64_at(b, ph + 32).ok_or_else(short)?;
            let raw = b.get(off..off + size).ok_or_else(short)?;
            let interpreter = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_string();
            return Ok(Linkage::Dynamic { interpreter });
        }
        if p_type == PT_DYNAMIC {
            dynamic = true;
        }
    }
    Ok(if dynamic {
        Linkage::StaticPie
    } else {
        Linkage::Static
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_binary_itself_is_dynamic() {
        let exe = std::env::current_exe().unwrap();
        match linkage(&exe).unwrap() {
            Linkage::Dynamic { interpreter } => assert!(interpreter.contains("ld-linux")),
            other => panic!("expected a dynamic test binary, got {other:?}"),
        }
    }

    #[test]
    fn rejects_non_elf() {
        assert!(linkage_of(b"#!/bin/sh\n").is_err());
    }
}
