//! The guest image: `build/guest/vmlinuz` and `build/guest/initramfs.cpio.gz`.
//!
//! The kernel is Debian's (`linux-image-amd64`, newest 6.1 in `/boot`); the initramfs holds busybox, the
//! modules the lab's devices need (with their dependencies), the static `vstream-agent` as the
//! `vstream-agent` Debian package installs it (built and unpacked by [`crate::deb`]), the guest tools
//! of [`GUEST_TOOLS`] with their shared libraries, and the `/init` script of `guest/init.sh`.
//!
//! The image is rebuilt only when an input changed: every input (its path, size and mtime, or the hash of
//! generated content) is listed in `build/guest/manifest.txt`, and an identical list means up to date.

mod kernel;
mod tools;

pub use kernel::{find_kernel, normalize_module_name, Kernel, ModuleIndex};
pub use tools::{parse_ldd, shared_libraries};

use std::fmt::Write as _;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use crate::cpio::{Entry, Source, Tree};
use crate::elf::{self};
use crate::paths;
use kernel::{module_source, uncompressed_name};
use tools::{busybox_applets, find_busybox};

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
