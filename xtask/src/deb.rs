//! The Debian packages, built with `dpkg-deb` from the workspace's binaries and `packaging/`:
//!
//! - `vstream` (hosts): vstreamd, vstreamctl, their systemd units, `/etc/vstream/vstreamd.toml`
//!   (a conffile), the example config, man pages and shell completions generated from the clap
//!   definitions by the binaries themselves;
//! - `vstream-agent` (guests): the static agent, its unit, the udev rule that starts it when the
//!   `org.vstream.0` port appears, and the drop-in that gives it qemu-ga's port.
//!
//! `cargo xtask deb` builds both into `build/deb/`; the lab takes its agent from the agent
//! package ([`agent_package`], [`unpack`]), so every end-to-end test runs the packaged binary.
//! Plain dpkg-deb rather than a packaging tool to install: the layout is a few dozen files and
//! every step is visible here.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use crate::image::FileLock;
use crate::paths;

/// The packages' version: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Who answers for the packages (lintian wants an address; `.invalid` says there is no list yet).
const MAINTAINER: &str = "vstream developers <maintainers@vstream.invalid>";

/// Where the packages go.
pub fn deb_dir() -> PathBuf {
    paths::build_dir().join("deb")
}

/// The `packaging/` directory of the workspace.
fn packaging() -> PathBuf {
    paths::workspace_root().join("packaging")
}

fn packaging_file(name: &str) -> Result<Vec<u8>> {
    let path = packaging().join(name);
    fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// Runs `cmd` to its end (stdin empty): its stdout, or an error with its stderr. The image
/// build uses it too.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// A package's tree being assembled under `build/deb/NAME/`.
struct Stage {
    name: &'static str,
    root: PathBuf,
    conffiles: Vec<String>,
}

impl Stage {
    fn new(name: &'static str) -> Result<Stage> {
        let root = deb_dir().join(name);
        match fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", root.display()))
            }
            _ => {}
        }
        fs::create_dir_all(root.join("DEBIAN"))?;
        Ok(Stage {
            name,
            root,
            conffiles: Vec::new(),
        })
    }

    fn path(&self, dest: &str) -> Result<PathBuf> {
        let path = self.root.join(dest.trim_start_matches('/'));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(path)
    }

    fn file(&mut self, dest: &str, mode: u32, data: &[u8]) -> Result<()> {
        let path = self.path(dest)?;
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// A file from `packaging/`.
    fn packaged(&mut self, dest: &str, mode: u32, name: &str) -> Result<()> {
        self.file(dest, mode, &packaging_file(name)?)
    }

    /// A file under `/etc` that dpkg keeps when its user changed it.
    fn conffile(&mut self, dest: &str, name: &str) -> Result<()> {
        self.conffile_mode(dest, 0o644, name)
    }

    /// A conffile with mode `mode` (a script).
    fn conffile_mode(&mut self, dest: &str, mode: u32, name: &str) -> Result<()> {
        self.packaged(dest, mode, name)?;
        self.conffiles.push(dest.to_string());
        Ok(())
    }

    /// `data` compressed as Debian wants documentation (gzip -9n: no name, no time).
    fn gzipped(&mut self, dest: &str, data: &[u8]) -> Result<()> {
        let path = self.path(dest)?;
        let mut gzip = Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(fs::File::create(&path)?)
            .spawn()
            .context("running gzip")?;
        let mut stdin = gzip.stdin.take().ok_or_else(|| anyhow!("gzip: no stdin"))?;
        std::io::Write::write_all(&mut stdin, data)?;
        drop(stdin);
        if !gzip.wait()?.success() {
            bail!("gzip of {dest} failed");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        Ok(())
    }

    /// An executable, stripped as dh_strip does (the symbols are not shipped).
    fn binary(&mut self, dest: &str, src: &Path) -> Result<()> {
        if !src.is_file() {
            bail!("{} is missing: build it first (./x.sh deb)", src.display());
        }
        let path = self.path(dest)?;
        run(Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
                "-o",
            ])
            .arg(&path)
            .arg(src))
        .context("strip (package binutils)")?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// The copyright file and the changelog every package has.
    fn doc_files(&mut self) -> Result<()> {
        let changelog = packaging_file("changelog")?;
        let top = String::from_utf8_lossy(&changelog)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if !top.starts_with(&format!("vstream ({VERSION})")) {
            bail!("packaging/changelog begins with {top:?}: add an entry for version {VERSION}");
        }
        let doc = format!("/usr/share/doc/{}", self.name);
        self.packaged(&format!("{doc}/copyright"), 0o644, "copyright")?;
        // A native package's Debian changelog is changelog.gz.
        self.gzipped(&format!("{doc}/changelog.gz"), &changelog)
    }

    /// Writes DEBIAN/ (control with `fields`, md5sums, conffiles) and builds the .deb.
    fn build(self, fields: &str) -> Result<PathBuf> {
        let mut files = Vec::new();
        let mut dirs = BTreeSet::new();
        walk(&self.root, &self.root, &mut files, &mut dirs)?;
        let mut size = 0u64;
        let mut md5sums = String::new();
        for rel in &files {
            let path = self.root.join(rel);
            size += fs::metadata(&path)?.len().div_ceil(1024);
            let sum = run(Command::new("md5sum").arg(&path))?;
            let sum = String::from_utf8_lossy(&sum);
            let sum = sum.split_whitespace().next().unwrap_or_default();
            let _ = writeln!(md5sums, "{sum}  {rel}");
        }
        for dir in &dirs {
            fs::set_permissions(self.root.join(dir), fs::Permissions::from_mode(0o755))?;
        }
        let control = format!(
            "Package: {}\nVersion: {VERSION}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
             Installed-Size: {size}\nSection: admin\nPriority: optional\n{fields}",
            self.name
        );
        self.file_in_debian("control", &control)?;
        self.file_in_debian("md5sums", &md5sums)?;
        if !self.conffiles.is_empty() {
            let list: String = self.conffiles.iter().map(|c| format!("{c}\n")).collect();
            self.file_in_debian("conffiles", &list)?;
        }
        let deb = deb_dir().join(format!("{}_{VERSION}_amd64.deb", self.name));
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&self.root)
            .arg(&deb))?;
        Ok(deb)
    }

    fn file_in_debian(&self, name: &str, text: &str) -> Result<()> {
        let path = self.root.join("DEBIAN").join(name);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        Ok(())
    }
}

/// The files (for md5sums) and directories under `dir`, relative to `root`, DEBIAN/ excluded.
fn walk(
    root: &Path,
    dir: &Path,
    files: &mut Vec<String>,
    dirs: &mut BTreeSet<String>,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
        if rel == "DEBIAN" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            dirs.insert(rel);
            walk(root, &path, files, dirs)?;
        } else {
            files.push(rel);
        }
    }
    Ok(())
}

/// The `Depends:` of dynamically linked `binaries`, as dpkg-shlibdeps computes it (it insists on
/// a source tree with debian/control, so it gets a throwaway one).
fn shlib_depends(binaries: &[PathBuf]) -> Result<String> {
    let tmp = deb_dir().join("shlibdeps");
    fs::create_dir_all(tmp.join("debian"))?;
    fs::write(
        tmp.join("debian/control"),
        "Source: vstream\n\nPackage: vstream\nArchitecture: amd64\n",
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.arg("-O").current_dir(&tmp);
    for b in binaries {
        cmd.arg(format!("-e{}", b.display()));
    }
    let out = run(&mut cmd).context("dpkg-shlibdeps (package dpkg-dev)")?;
    let out = String::from_utf8_lossy(&out);
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("dpkg-shlibdeps printed no shlibs:Depends: {out}"))
}

/// Builds `vstream-agent_VERSION_amd64.deb` from the static agent `agent`.
pub fn build_agent_package(agent: &Path) -> Result<PathBuf> {
    let mut s = Stage::new("vstream-agent")?;
    s.binary("/usr/bin/vstream-agent", agent)?;
    s.packaged(
        "/lib/systemd/system/vstream-agent.service",
        0o644,
        "vstream-agent.service",
    )?;
    s.packaged(
        "/lib/udev/rules.d/60-vstream-agent.rules",
        0o644,
        "60-vstream-agent.rules",
    )?;
    s.conffile("/etc/default/vstream-agent", "vstream-agent.default")?;
    s.packaged(
        "/usr/share/doc/vstream-agent/examples/vstream-agent-qga.conf",
        0o644,
        "vstream-agent-qga.conf",
    )?;
    s.packaged(
        "/usr/share/lintian/overrides/vstream-agent",
        0o644,
        "vstream-agent.lintian-overrides",
    )?;
    s.doc_files()?;
    s.build(
        "Suggests: ppp, rng-tools5\n\
         Description: guest agent of vstream\n \
         The guest half of vstream: console sessions, terminals, a QEMU guest agent\n \
         (QGA) compatible service, entropy, watchdog, input, printer and PPP, all on\n \
         one multiplexed byte stream to the host's vstreamd over virtio-serial, a\n \
         serial line, vsock or a socket.\n \
         .\n \
         The binary is static, so the same package serves any amd64 guest. A udev\n \
         rule starts it when the host gives the guest the org.vstream.0 port.\n",
    )
}

/// Where the host package puts libvirt's hook (packaging/libvirt-hook).
pub const LIBVIRT_HOOK: &str = "/etc/libvirt/hooks/qemu.d/vstream";

/// Builds `vstream_VERSION_amd64.deb` from `vstreamd` and `vstreamctl` in `bin_dir`.
pub fn build_host_package(bin_dir: &Path) -> Result<PathBuf> {
    let vstreamd = bin_dir.join("vstreamd");
    let vstreamctl = bin_dir.join("vstreamctl");
    let mut s = Stage::new("vstream")?;
    s.binary("/usr/bin/vstreamd", &vstreamd)?;
    s.binary("/usr/bin/vstreamctl", &vstreamctl)?;
    for unit in ["vstreamd.service", "vstreamd.socket"] {
        s.packaged(&format!("/lib/systemd/system/{unit}"), 0o644, unit)?;
    }
    s.conffile("/etc/vstream/vstreamd.toml", "vstreamd.toml")?;
    // libvirt runs every script in qemu.d: the admin's own /etc/libvirt/hooks/qemu stays theirs.
    s.conffile_mode(LIBVIRT_HOOK, 0o755, "libvirt-hook")?;
    let example = paths::workspace_root().join("docs/vstreamd.example.toml");
    s.file(
        "/usr/share/doc/vstream/examples/vstreamd.example.toml",
        0o644,
        &fs::read(&example).with_context(|| format!("reading {}", example.display()))?,
    )?;

    // Man pages and completions come from the binaries' own clap definitions.
    let man = deb_dir().join("man");
    let _ = fs::remove_dir_all(&man);
    fs::create_dir_all(&man)?;
    run(Command::new(&vstreamctl).arg("man").arg(&man))?;
    run(Command::new(&vstreamd).arg("--man").arg(&man))?;
    let mut pages: Vec<_> = fs::read_dir(&man)?.collect::<Result<_, _>>()?;
    pages.sort_by_key(|e| e.file_name());
    for page in pages {
        let name = page.file_name().to_string_lossy().into_owned();
        s.gzipped(
            &format!("/usr/share/man/man1/{name}.gz"),
            &fs::read(page.path())?,
        )?;
    }
    for (program, subcommand) in [(&vstreamctl, true), (&vstreamd, false)] {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (shell, dest) in [
            (
                "bash",
                format!("/usr/share/bash-completion/completions/{name}"),
            ),
            ("zsh", format!("/usr/share/zsh/vendor-completions/_{name}")),
            (
                "fish",
                format!("/usr/share/fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            let mut cmd = Command::new(program);
            if subcommand {
                cmd.args(["completions", shell]);
            } else {
                cmd.args(["--completions", shell]);
            }
            s.file(&dest, 0o644, &run(&mut cmd)?)?;
        }
    }
    s.doc_files()?;
    let depends = shlib_depends(&[vstreamd, vstreamctl])?;
    s.build(&format!(
        "Depends: {depends}\n\
         Suggests: qemu-system-x86, ppp\n\
         Description: host daemon and command line of vstream\n \
         vstreamd keeps a session with the vstream agent of each virtual machine over\n \
         whatever transport the hypervisor offers (virtio-serial, a serial line,\n \
         vsock, sockets) and gives every guest the same devices: consoles with\n \
         history and many viewers, terminal sessions, QGA-compatible management,\n \
         entropy, watchdog, input, printer and PPP. vstreamctl is its command line.\n \
         .\n \
         Sessions survive a transport cut; after a daemon restart every guest is\n \
         back within seconds.\n"
    ))
}

/// The agent package for the lab, rebuilt only when the agent or `packaging/` changed (the
/// packages are built under `build/deb/.lock`, so tests and `cargo xtask deb` do not collide).
pub fn agent_package(agent: &Path) -> Result<PathBuf> {
    fs::create_dir_all(deb_dir())?;
    let _lock = FileLock::exclusive(&deb_dir().join(".lock"))?;
    let deb = deb_dir().join(format!("vstream-agent_{VERSION}_amd64.deb"));
    let stamp_path = deb_dir().join("vstream-agent.inputs");
    let mut stamp = crate::image::file_stamp(agent);
    let mut names: Vec<_> = fs::read_dir(packaging())?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let _ = writeln!(stamp, "\n{}", crate::image::file_stamp(&entry.path()));
    }
    if deb.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(deb);
    }
    let _ = fs::remove_file(&stamp_path);
    let deb = build_agent_package(agent)?;
    fs::write(&stamp_path, stamp)?;
    Ok(deb)
}

/// Unpacks `deb` into `dir` (emptied first) as dpkg would install it, with `dpkg-deb -x`.
pub fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    Ok(())
}

/// `cargo xtask deb [--bin-dir DIR]`: both packages from the release binaries (default
/// `target/release`) and the static agent.
pub fn build_all(bin_dir: Option<PathBuf>) -> Result<Vec<PathBuf>> {
    let bin_dir = bin_dir.unwrap_or_else(|| paths::target_dir().join("release"));
    fs::create_dir_all(deb_dir())?;
    let host = {
        let _lock = FileLock::exclusive(&deb_dir().join(".lock"))?;
        build_host_package(&bin_dir)?
    };
    let agent = agent_package(&paths::agent_bin())?;
    Ok(vec![host, agent])
}
