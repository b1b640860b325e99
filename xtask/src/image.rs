//! The guest image: `build/guest/vmlinuz` and `build/guest/initramfs.cpio.gz`.
//!
//! The kernel is Debian's (`linux-image-amd64`, newest 6.1 in `/boot`); the initramfs holds busybox, the
//! modules the lab's devices need (with their dependencies), the static `vstream-agent` as the
//! `vstream-agent` Debian package installs it (built and unpacked by [`crate::deb`]), the guest tools
//! of [`GUEST_TOOLS`] with their shared libraries, and the `/init` script of `guest/init.sh`.
//!
//! The image is rebuilt only when an input changed: every input (its path, size and mtime, or the hash of
//! generated content) is listed in `build/guest/manifest.txt`, and an identical list means up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use crate::cpio::{Entry, Source, Tree};
use crate::elf::{self, Linkage};
use crate::paths;

/// Bumped when the image layout changes in a way the manifest does not see.
const LAYOUT_VERSION: u32 = 2;

/// The guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("guest/init.sh");

/// The line `/init` prints to the kernel console once the guest is up.
pub const INIT_DONE_MARKER: &str = "vstream-lab: init done";

/// What `/init` logs (to the kernel log, hence ttyS0) just before it starts the agent.
pub const AGENT_START_MARKER: &str = "vstream-lab: starting vstream-agent";

/// A kernel module the lab's devices need. Dependencies come from `modules.dep`; a module built into the
/// kernel needs nothing.
#[derive(Debug, Clone, Copy)]
pub struct GuestModule {
    /// Module name as `modprobe` takes it (`-` and `_` are the same).
    pub name: &'static str,
    /// Why the lab needs it.
    pub why: &'static str,
}

/// The modules of the lab guest. A new device adds a line.
pub const GUEST_MODULES: &[GuestModule] = &[
    GuestModule {
        name: "virtio_pci",
        why: "virtio devices on the PCI bus",
    },
    GuestModule {
        name: "virtio_console",
        why: "hvc0 and the virtio-serial mux port",
    },
    GuestModule {
        name: "virtio_rng",
        why: "virtio-rng entropy device",
    },
    GuestModule {
        name: "vsock",
        why: "AF_VSOCK sockets",
    },
    GuestModule {
        name: "vmw_vsock_virtio_transport",
        why: "vsock over virtio (vhost-vsock, or vhost-device-vsock behind vhost-user-vsock-pci)",
    },
    GuestModule {
        name: "ppp_generic",
        why: "ppp device",
    },
    GuestModule {
        name: "ppp_async",
        why: "ppp over a tty (pppd)",
    },
    GuestModule {
        name: "tun",
        why: "tun/tap network interfaces",
    },
    GuestModule {
        name: "virtio_net",
        why: "virtio-net NIC (the lab's user_net option: the fast path ppp is compared with)",
    },
    GuestModule {
        name: "uinput",
        why: "input device injection",
    },
    GuestModule {
        name: "virtio_input",
        why: "virtio-input devices (vstreamd's vhost-user-input keyboard, mouse, tablet)",
    },
    GuestModule {
        name: "evdev",
        why: "/dev/input/eventN nodes, read by the hid tests and desktops",
    },
    GuestModule {
        name: "8250",
        why: "16550 UARTs (ISA ttyS0)",
    },
    GuestModule {
        name: "8250_pci",
        why: "the PCI 16550 carrying the mux",
    },
];

/// A host program copied into the guest together with its shared libraries and ELF interpreter.
#[derive(Debug, Clone, Copy)]
pub struct GuestTool {
    /// Short name.
    pub name: &'static str,
    /// Where it is on the host.
    pub host_path: &'static str,
    /// Where it goes in the guest.
    pub guest_path: &'static str,
    /// The Debian package that provides it (`./x.sh setup` installs it).
    pub apt_package: &'static str,
}

/// Guest tools. A new device that needs a program adds a line (and its package to `x.sh`).
pub const GUEST_TOOLS: &[GuestTool] = &[
    GuestTool {
        name: "pppd",
        host_path: "/usr/sbin/pppd",
        guest_path: "/usr/sbin/pppd",
        apt_package: "ppp",
    },
    GuestTool {
        name: "qemu-ga",
        host_path: "/usr/sbin/qemu-ga",
        guest_path: "/usr/sbin/qemu-ga",
        apt_package: "qemu-guest-agent",
    },
    GuestTool {
        // Raw AF_VSOCK streams for bench-vsock (nothing of vstream's in the data path).
        name: "socat",
        host_path: "/usr/bin/socat",
        guest_path: "/usr/bin/socat",
        apt_package: "socat",
    },
    GuestTool {
        name: "rngd",
        host_path: "/usr/sbin/rngd",
        guest_path: "/usr/sbin/rngd",
        apt_package: "rng-tools5",
    },
];

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

/// A built image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel it was built for.
    pub kernel: Kernel,
    /// `build/guest/vmlinuz`.
    pub vmlinuz: PathBuf,
    /// `build/guest/initramfs.cpio.gz`.
    pub initramfs: PathBuf,
    /// False when the existing image was up to date.
    pub rebuilt: bool,
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

fn uncompressed_name(path: &str) -> String {
    for (suffix, _) in MODULE_COMPRESSION {
        if let Some(stem) = path.strip_suffix(suffix) {
            return format!("{stem}.ko");
        }
    }
    path.to_string()
}

fn module_source(host: &Path) -> Result<Source> {
    let name = host.to_string_lossy();
    for (suffix, tool) in MODULE_COMPRESSION {
        if name.ends_with(suffix) {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(host)
                .output()
                .with_context(|| format!("running {tool} -dc {}", host.display()))?;
            if !out.status.success() {
                bail!(
                    "{tool} -dc {} failed: {}",
                    host.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            return Ok(Source::Bytes(out.stdout));
        }
    }
    Ok(Source::Host(host.to_path_buf()))
}

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
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs = parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("shared libraries of {}", binary.display()))?;
    let interpreter = PathBuf::from(interpreter);
    if !libs.contains(&interpreter) {
        libs.push(interpreter);
    }
    Ok(libs)
}

fn find_busybox() -> Result<PathBuf> {
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

fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
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

const ETC_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const ETC_GROUP: &str = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";
const ETC_PROFILE: &str = "export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n\
export TERM=${TERM:-linux}\n\
PS1='\\u@\\h:\\w\\$ '\n\
cd /root 2>/dev/null\n";

/// Builds the guest file tree (everything but the agent's stripping, see [`ensure_image`]).
fn guest_tree(kernel: &Kernel, agent: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    for dir in [
        "/proc", "/sys", "/dev", "/run", "/mnt", "/etc", "/var/log", "/usr/lib", "/lib64",
    ] {
        tree.dir(dir, 0o755);
    }
    tree.dir("/tmp", 0o1777);
    tree.dir("/root", 0o700);
    tree.symlink("/var/run", "../run");
    tree.char_dev("/dev/console", 0o600, 5, 1);
    tree.char_dev("/dev/null", 0o666, 1, 3);

    // busybox and its applets (real tools below replace an applet of the same path).
    let busybox = find_busybox()?;
    tree.host_file("/bin/busybox", 0o755, &busybox);
    for applet in busybox_applets(&busybox)? {
        let guest = format!("/{applet}");
        if guest != "/bin/busybox" {
            tree.symlink(&guest, "/bin/busybox");
        }
    }

    // Kernel modules, dependencies resolved on the host.
    let index = ModuleIndex::load(&kernel.modules_dir)?;
    let names: Vec<&str> = GUEST_MODULES.iter().map(|m| m.name).collect();
    let order = index.load_order(&names)?;
    let modroot = format!("/lib/modules/{}", kernel.version);
    for rel in &order {
        let host = kernel.modules_dir.join(rel);
        let source = module_source(&host)?;
        tree.insert(
            &format!("{modroot}/{}", uncompressed_name(rel)),
            Entry::File {
                mode: 0o644,
                source,
            },
        );
    }
    tree.bytes(
        &format!("{modroot}/modules.dep"),
        0o644,
        index.filtered_dep(&order),
    );
    let builtin = kernel.modules_dir.join("modules.builtin");
    if builtin.is_file() {
        tree.host_file(&format!("{modroot}/modules.builtin"), 0o644, &builtin);
    }
    let load_list: String = order
        .iter()
        .map(|p| format!("{}\n", uncompressed_name(p)))
        .collect();
    tree.bytes("/etc/vstream-lab/modules", 0o644, load_list);

    // Guest tools with their libraries.
    for tool in GUEST_TOOLS {
        let host = Path::new(tool.host_path);
        if !host.is_file() {
            bail!(
                "guest tool {} ({}) is missing: run ./x.sh setup (package {})",
                tool.name,
                tool.host_path,
                tool.apt_package
            );
        }
        tree.host_file(tool.guest_path, 0o755, host);
        for lib in shared_libraries(host).with_context(|| format!("guest tool {}", tool.name))? {
            let real =
                fs::canonicalize(&lib).with_context(|| format!("resolving {}", lib.display()))?;
            tree.host_file(&lib.to_string_lossy(), 0o755, &real);
        }
    }

    // The agent, as its package installs it.
    let linkage = elf::linkage(agent)?;
    if !linkage.is_static() {
        bail!(
            "the guest agent {} is dynamically linked ({linkage:?}); build it with RUSTFLAGS=\"{}\" \
             --target {} (`cargo xtask agent`)",
            agent.display(),
            paths::AGENT_RUSTFLAGS,
            paths::AGENT_TARGET
        );
    }
    tree.host_file("/usr/bin/vstream-agent", 0o755, agent);

    tree.bytes("/etc/passwd", 0o644, ETC_PASSWD);
    tree.bytes("/etc/group", 0o644, ETC_GROUP);
    tree.bytes("/etc/profile", 0o644, ETC_PROFILE);
    tree.bytes(
        "/etc/ppp/options",
        0o644,
        "# Options come from the pppd command line.\n",
    );
    tree.bytes("/init", 0o755, INIT_SCRIPT);
    Ok(tree)
}

/// A file's path, size and mtime: a changed stamp means a changed input.
pub fn file_stamp(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{} {} {}", path.display(), m.len(), mtime)
        }
        Err(e) => format!("{} missing ({e})", path.display()),
    }
}

fn bytes_hash(data: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// One line per input: a changed line means the image must be rebuilt.
pub fn manifest(kernel: &Kernel, tree: &Tree) -> String {
    let mut out = format!(
        "vstream lab image, layout {LAYOUT_VERSION}\nkernel {}\n",
        file_stamp(&kernel.vmlinuz)
    );
    for (path, entry) in tree.iter() {
        let _ = match entry {
            Entry::Dir { mode } => writeln!(out, "dir {path} {mode:o}"),
            Entry::Symlink { target } => writeln!(out, "symlink {path} -> {target}"),
            Entry::CharDev { mode, major, minor } => {
                writeln!(out, "chardev {path} {mode:o} {major}:{minor}")
            }
            Entry::File {
                mode,
                source: Source::Host(host),
            } => {
                writeln!(out, "file {path} {mode:o} {}", file_stamp(host))
            }
            Entry::File {
                mode,
                source: Source::Bytes(data),
            } => {
                writeln!(
                    out,
                    "file {path} {mode:o} {} bytes hash {:016x}",
                    data.len(),
                    bytes_hash(data)
                )
            }
        };
    }
    out
}

/// An exclusive `flock` on a file, released on drop: serializes image builds across test processes.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if needed) is ours.
    pub fn exclusive(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        loop {
            // SAFETY: flock takes a valid open descriptor (owned by `file`, alive for this call) and flags;
            // it touches no memory of ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("locking {}", path.display()));
            }
        }
        Ok(Self { _file: file })
    }
}

/// Writes `tree` as gzip-compressed newc to `dest` (through a temporary file, renamed at the end).
fn write_initramfs(tree: &Tree, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut gzip = Command::new("gzip")
        .args(["-6", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("running gzip (package gzip)")?;
    let stdin = gzip
        .stdin
        .take()
        .ok_or_else(|| anyhow!("gzip has no stdin"))?;
    let written = tree.write_newc(BufWriter::with_capacity(1 << 20, stdin));
    // Close gzip's stdin (drop the writer) before waiting for it.
    let written = written.and_then(|w| w.into_inner().map_err(|e| e.into_error()).map(drop));
    let status = gzip.wait().context("waiting for gzip")?;
    written.context("writing the initramfs")?;
    if !status.success() {
        bail!("gzip failed ({status})");
    }
    fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}

/// The agent the image gets: `usr/bin/vstream-agent` of the `vstream-agent` package (built from
/// [`paths::agent_bin`], stripped) unpacked with `dpkg-deb -x` into `dir/agent-package`, so every
/// lab guest runs what the package installs.
fn packaged_agent(dir: &Path) -> Result<PathBuf> {
    let agent = paths::agent_bin();
    if !agent.is_file() {
        bail!(
            "the guest agent {} is missing: build it with `cargo xtask agent` (or ./x.sh build), \
             or point VSTREAM_AGENT at a static binary",
            agent.display()
        );
    }
    let deb = crate::deb::agent_package(&agent)?;
    let unpacked = dir.join("agent-package");
    crate::deb::unpack(&deb, &unpacked)?;
    Ok(unpacked.join("usr/bin/vstream-agent"))
}

/// The directory of the guest image.
pub fn image_dir() -> PathBuf {
    paths::build_dir().join("guest")
}

/// Builds the guest image if any input changed, and returns where it is.
pub fn ensure_image() -> Result<GuestImage> {
    let dir = image_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = FileLock::exclusive(&dir.join(".lock"))?;

    let kernel = find_kernel()?;
    let agent = packaged_agent(&dir)?;
    let tree = guest_tree(&kernel, &agent)?;
    let manifest = manifest(&kernel, &tree);

    let vmlinuz = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.cpio.gz");
    let manifest_path = dir.join("manifest.txt");
    let old = fs::read_to_string(&manifest_path).unwrap_or_default();
    if old == manifest && vmlinuz.is_file() && initramfs.is_file() {
        return Ok(GuestImage {
            kernel,
            vmlinuz,
            initramfs,
            rebuilt: false,
        });
    }

    let started = Instant::now();
    // A half-written image must not look up to date.
    let _ = fs::remove_file(&manifest_path);

    let vmlinuz_tmp = dir.join("vmlinuz.tmp");
    fs::copy(&kernel.vmlinuz, &vmlinuz_tmp).with_context(|| {
        format!(
            "copying {} to {}",
            kernel.vmlinuz.display(),
            vmlinuz_tmp.display()
        )
    })?;
    fs::rename(&vmlinuz_tmp, &vmlinuz)?;
    write_initramfs(&tree, &initramfs)?;
    fs::write(&manifest_path, &manifest)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    let size = fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "xtask: built guest image for kernel {} in {:.1} s ({} entries, initramfs {:.1} MiB) in {}",
        kernel.version,
        started.elapsed().as_secs_f64(),
        tree.iter().count(),
        size as f64 / (1024.0 * 1024.0),
        dir.display()
    );
    Ok(GuestImage {
        kernel,
        vmlinuz,
        initramfs,
        rebuilt: true,
    })
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

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64"]);
    }
}
