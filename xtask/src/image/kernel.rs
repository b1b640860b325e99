//! The guest's kernel: which Debian kernel, and which of its modules the guest needs in what order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::cpio::Source;
use crate::deb;

/// The Debian kernel the guest boots.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` in the guest, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// `/boot/vmlinuz-<version>`.
    pub vmlinuz: PathBuf,
    /// `/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

/// Compares Debian kernel versions like `6.1.0-56-amd64` by their numbers.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Finds the newest Debian 6.1 amd64 kernel with its modules (`VSTREAM_KERNEL=<version>` picks one).
pub fn find_kernel() -> Result<Kernel> {
    let wanted = std::env::var("VSTREAM_KERNEL")
        .ok()
        .filter(|v| !v.is_empty());
    let mut versions = Vec::new();
    let entries = fs::read_dir("/boot")
        .context("listing /boot (is linux-image-amd64 installed? run ./x.sh setup)")?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(version) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let matches = match &wanted {
            Some(w) => version == w,
            None => version.starts_with("6.1.") && version.ends_with("-amd64"),
        };
        if matches
            && Path::new("/lib/modules")
                .join(version)
                .join("modules.dep")
                .is_file()
        {
            versions.push(version.to_string());
        }
    }
    versions.sort_by_key(|v| version_key(v));
    let version = versions.pop().ok_or_else(|| match &wanted {
        Some(w) => anyhow!("VSTREAM_KERNEL={w}: no /boot/vmlinuz-{w} with /lib/modules/{w}/modules.dep"),
        None => anyhow!(
            "no Debian 6.1 kernel found (/boot/vmlinuz-6.1.*-amd64 with /lib/modules/<version>/modules.dep); \
             run ./x.sh setup to install linux-image-amd64"
        ),
    })?;
    let vmlinuz = Path::new("/boot").join(format!("vmlinuz-{version}"));
    fs::File::open(&vmlinuz).with_context(|| format!("{} is not readable", vmlinuz.display()))?;
    Ok(Kernel {
        modules_dir: Path::new("/lib/modules").join(&version),
        vmlinuz,
        version,
    })
}

/// `modules.dep` and `modules.builtin` of one kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Normalized name -> (relative path, dependencies' relative paths).
    modules: BTreeMap<String, (String, Vec<String>)>,
    /// Relative path -> dependencies' relative paths.
    deps_by_path: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// `virtio-rng` and `virtio_rng` name the same module.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize_module_name(stem)
}

impl ModuleIndex {
    /// Parses the text of `modules.dep` and `modules.builtin`.
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<Self> {
        let mut index = Self::default();
        for (n, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .ok_or_else(|| anyhow!("modules.dep line {}: no ':' in {line:?}", n + 1))?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            index
                .modules
                .insert(module_name_of(path), (path.to_string(), deps.clone()));
            index.deps_by_path.insert(path.to_string(), deps);
        }
        index.builtin = modules_builtin
            .lines()
            .filter(|l| !l.is_empty())
            .map(module_name_of)
            .collect();
        Ok(index)
    }

    /// Reads the index of an installed kernel.
    pub fn load(modules_dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = modules_dir.join(name);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Self::parse(
            &read("modules.dep")?,
            &read("modules.builtin").unwrap_or_default(),
        )
    }

    /// True if the module is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize_module_name(name))
    }

    /// The relative paths to load for `names`, each after its dependencies, without duplicates. Built-in
    /// modules are skipped; an unknown module is an error.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in names {
            let key = normalize_module_name(name);
            if let Some((path, _)) = self.modules.get(&key) {
                self.visit(path, &mut seen, &mut order, 0)?;
            } else if !self.builtin.contains(&key) {
                bail!("the kernel has no module {name:?}: neither in modules.dep nor in modules.builtin");
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            bail!("modules.dep: dependency loop through {path}");
        }
        if !seen.insert(path.to_string()) {
            return Ok(());
        }
        for dep in self.deps_by_path.get(path).into_iter().flatten() {
            self.visit(dep, seen, order, depth + 1)?;
        }
        order.push(path.to_string());
        Ok(())
    }

    /// `modules.dep` restricted to `paths` (so busybox `modprobe` works in the guest).
    pub fn filtered_dep(&self, paths: &[String]) -> String {
        let mut out = String::new();
        for path in paths {
            let deps = self.deps_by_path.get(path).cloned().unwrap_or_default();
            let deps: Vec<String> = deps.iter().map(|d| uncompressed_name(d)).collect();
            let _ = writeln!(out, "{}: {}", uncompressed_name(path), deps.join(" "));
        }
        out
    }
}

/// Compressed module suffixes and the tool that decompresses them (busybox insmod reads only plain .ko).
const MODULE_COMPRESSION: &[(&str, &str)] =
    &[(".ko.xz", "xz"), (".ko.zst", "zstd"), (".ko.gz", "gzip")];

pub(super) fn uncompressed_name(path: &str) -> String {
    for (suffix, _) in MODULE_COMPRESSION {
        if let Some(stem) = path.strip_suffix(suffix) {
            return format!("{stem}.ko");
        }
    }
    path.to_string()
}

pub(super) fn module_source(host: &Path) -> Result<Source> {
    let name = host.to_string_lossy();
    for (suffix, tool) in MODULE_COMPRESSION {
        if name.ends_with(suffix) {
            let out = deb::run(Command::new(tool).arg("-dc").arg(host))?;
            return Ok(Source::Bytes(out));
        }
    }
    Ok(Source::Host(host.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/net/ppp/ppp_async.ko.xz: kernel/drivers/net/ppp/ppp_generic.ko kernel/drivers/net/slip/slhc.ko\n\
kernel/drivers/net/ppp/ppp_generic.ko: kernel/drivers/net/slip/slhc.ko\n\
kernel/drivers/net/slip/slhc.ko:\n";
    const BUILTIN: &str = "kernel/drivers/tty/serial/8250/8250.ko\n";

    #[test]
    fn load_order_puts_dependencies_first() {
        let index = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        let order = index
            .load_order(&["virtio_rng", "ppp_async", "8250", "virtio-rng"])
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/char/hw_random/virtio-rng.ko",
                "kernel/drivers/net/slip/slhc.ko",
                "kernel/drivers/net/ppp/ppp_generic.ko",
                "kernel/drivers/net/ppp/ppp_async.ko.xz",
            ]
        );
        let dep = index.filtered_dep(&order);
        assert!(dep.contains(
            "kernel/drivers/net/ppp/ppp_async.ko: kernel/drivers/net/ppp/ppp_generic.ko"
        ));
        assert!(index.load_order(&["no_such_module"]).is_err());
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64"]);
    }
}
