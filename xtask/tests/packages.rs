//! The Debian packages (`cargo xtask deb`, `./x.sh deb`): what an operator finds in them, and
//! `systemd-analyze verify` on every unit as installed, the agent's qemu-ga drop-in included.
//! Needs the release vstreamd and vstreamctl and the static agent (`./x.sh deb` builds them);
//! lintian runs in `./x.sh deb`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use xtask::{deb, elf};

/// Both packages, built once per test binary: (vstream, vstream-agent).
fn packages() -> &'static (PathBuf, PathBuf) {
    static DEBS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DEBS.get_or_init(|| {
        let debs = deb::build_all(None).expect("cargo xtask deb (run ./x.sh deb first)");
        (debs[0].clone(), debs[1].clone())
    })
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "dpkg-deb {args:?} {}: {}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The paths a package installs (`./usr/bin/x` as `/usr/bin/x`).
fn contents(deb: &Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -t")
        .arg("sh")
        .arg(deb)
        .output()
        .expect("tar");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches('.').trim_end_matches('/').to_string())
        .collect()
}

fn assert_has(files: &[String], want: &[&str], package: &str) {
    for w in want {
        assert!(
            files.iter().any(|f| f == w),
            "{package} lacks {w}; it has:\n{}",
            files.join("\n")
        );
    }
}

#[test]
fn the_host_package_has_daemon_cli_units_config_manuals_and_completions() {
    let (host, _) = packages();
    let files = contents(host);
    assert_has(
        &files,
        &[
            "/usr/bin/vstreamd",
            "/usr/bin/vstreamctl",
            "/lib/systemd/system/vstreamd.service",
            "/lib/systemd/system/vstreamd.socket",
            "/etc/vstream/vstreamd.toml",
            deb::LIBVIRT_HOOK,
            "/usr/share/doc/vstream/examples/vstreamd.example.toml",
            "/usr/share/doc/vstream/copyright",
            "/usr/share/doc/vstream/changelog.gz",
            "/usr/share/man/man1/vstreamd.1.gz",
            "/usr/share/man/man1/vstreamctl.1.gz",
            "/usr/share/man/man1/vstreamctl-status.1.gz",
            "/usr/share/man/man1/vstreamctl-console.1.gz",
            "/usr/share/bash-completion/completions/vstreamctl",
            "/usr/share/bash-completion/completions/vstreamd",
            "/usr/share/zsh/vendor-completions/_vstreamctl",
            "/usr/share/zsh/vendor-completions/_vstreamd",
            "/usr/share/fish/vendor_completions.d/vstreamctl.fish",
            "/usr/share/fish/vendor_completions.d/vstreamd.fish",
        ],
        "vstream",
    );
    let control = dpkg_deb(&["-f"], host);
    assert!(
        control.contains("Depends: libc6"),
        "the dynamic binaries depend on libc6: {control}"
    );
    let root = tempfile::tempdir().unwrap();
    deb::unpack(host, root.path()).unwrap();
    // The conffile is a config vstreamd accepts: the service starts with it.
    let mut child = Command::new(root.path().join("usr/bin/vstreamd"))
        .arg("--config")
        .arg(root.path().join("etc/vstream/vstreamd.toml"))
        .arg("--control")
        .arg(root.path().join("control.sock"))
        .arg("--state-dir")
        .arg(root.path().join("state"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.path().join("control.sock").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("vstreamd exits ({status}) with the packaged config: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "vstreamd did not start with the packaged config"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let conffiles = Command::new("dpkg-deb")
        .arg("-I")
        .arg(host)
        .arg("conffiles")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout),
        "/etc/vstream/vstreamd.toml\n/etc/libvirt/hooks/qemu.d/vstream\n",
        "dpkg keeps an operator's config, and the libvirt hook they may have edited or disabled, on upgrades"
    );
}

#[test]
fn the_agent_package_has_the_static_agent_its_unit_and_the_udev_rule() {
    let (_, agent) = packages();
    let files = contents(agent);
    assert_has(
        &files,
        &[
            "/usr/bin/vstream-agent",
            "/lib/systemd/system/vstream-agent.service",
            "/lib/udev/rules.d/60-vstream-agent.rules",
            "/etc/default/vstream-agent",
            "/usr/share/doc/vstream-agent/examples/vstream-agent-qga.conf",
            "/usr/share/doc/vstream-agent/copyright",
        ],
        "vstream-agent",
    );
    let root = tempfile::tempdir().unwrap();
    deb::unpack(agent, root.path()).unwrap();
    let bin = root.path().join("usr/bin/vstream-agent");
    assert!(
        elf::linkage(&bin).unwrap().is_static(),
        "the packaged agent must run in any guest: static"
    );
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains(deb::VERSION),
        "vstream-agent --version: {version:?}"
    );
    let rule =
        fs::read_to_string(root.path().join("lib/udev/rules.d/60-vstream-agent.rules")).unwrap();
    for want in [
        "SUBSYSTEM==\"virtio-ports\"",
        "ATTR{name}==\"org.vstream.0\"",
        "TAG+=\"systemd\"",
        "ENV{SYSTEMD_WANTS}+=\"vstream-agent.service\"",
    ] {
        assert!(rule.contains(want), "the udev rule lacks {want}: {rule}");
    }
}

/// `systemd-analyze verify` in a root holding the host's systemd units (the targets ours name),
/// `/bin/kill` and both packages unpacked, so the check sees the units and binaries as installed.
#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let (host, agent) = packages();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    fs::create_dir_all(r.join("lib/systemd")).unwrap();
    fs::create_dir_all(r.join("bin")).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg("/lib/systemd/system")
        .arg(r.join("lib/systemd/"))
        .status()
        .unwrap();
    assert!(
        copied.success(),
        "copying /lib/systemd/system (package systemd)"
    );
    fs::copy("/bin/kill", r.join("bin/kill")).expect("/bin/kill");
    for deb in [host, agent] {
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(r)
            .status()
            .unwrap();
        assert!(out.success());
    }
    // The drop-in as docs/INSTALL.md installs it.
    let dropins = r.join("etc/systemd/system/vstream-agent.service.d");
    fs::create_dir_all(&dropins).unwrap();
    fs::copy(
        r.join("usr/share/doc/vstream-agent/examples/vstream-agent-qga.conf"),
        dropins.join("qga.conf"),
    )
    .unwrap();
    for unit in [
        "vstreamd.service",
        "vstreamd.socket",
        "vstream-agent.service",
    ] {
        let out = Command::new("systemd-analyze")
            // Man pages are checked by the package test, not through the host's man database.
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", r.display()))
            .arg(r.join("lib/systemd/system").join(unit))
            .output()
            .expect("systemd-analyze (package systemd)");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit} ({}): {said}",
            out.status
        );
    }
}

/// The lab's guest image takes its agent from the agent package, byte for byte, where the
/// package installs it: every end-to-end test runs the packaged agent.
#[test]
fn the_lab_image_runs_the_packaged_agent() {
    let (_, agent) = packages();
    let image = xtask::image::ensure_image().expect("guest image");
    let manifest = fs::read_to_string(xtask::image::image_dir().join("manifest.txt")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.starts_with("file usr/bin/vstream-agent "))
        .unwrap_or_else(|| panic!("no /usr/bin/vstream-agent in the image: {manifest}"));
    let unpacked = xtask::image::image_dir().join("agent-package/usr/bin/vstream-agent");
    assert!(
        line.contains(&unpacked.display().to_string()),
        "the image's agent is not the unpacked package's: {line}"
    );
    let root = tempfile::tempdir().unwrap();
    deb::unpack(agent, root.path()).unwrap();
    assert_eq!(
        fs::read(root.path().join("usr/bin/vstream-agent")).unwrap(),
        fs::read(&unpacked).unwrap(),
        "the image's agent differs from the package's"
    );
    assert!(image.initramfs.is_file());
}
