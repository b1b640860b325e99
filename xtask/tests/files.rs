//! End-to-end test of the files device in a real guest: `vstreamctl cp -r -p` of a tree with a
//! sparse file, symlinks, odd modes and old timestamps into the guest and back arrives
//! identical, compared with a manifest (type, mode, size, mtime, link target, sha256) made
//! on both sides; the hole stays a hole in the guest.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use xtask::lab::testing::{ctl_ok, exec_sh_within};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);
const COPY_TIMEOUT: Duration = Duration::from_secs(900);

/// One line per path under `$1`: what a user compares after a copy (type, mode, size, mtime,
/// link target, sha256). Shared with crates/host/tests/files.rs.
const MANIFEST: &str = include_str!("data/files-manifest.sh");

/// Makes a tree at `$1` with a sparse file, symlinks (one dangling), setuid, odd modes and old
/// times.
const TREE: &str = include_str!("data/files-tree.sh");

fn host_sh(script: &str, dir: &Path) -> String {
    let out = Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn guest_manifest(lab: &Lab, dir: &str) -> String {
    let script = format!("set -- {dir}; {MANIFEST}");
    exec_sh_within(lab, &script, COPY_TIMEOUT)
}

#[test]
fn a_tree_with_holes_links_modes_and_times_goes_round_trip_identical() {
    if !lab::e2e_enabled("a_tree_with_holes_links_modes_and_times_goes_round_trip_identical") {
        return;
    }
    let lab =
        Lab::boot(LabOptions::virtio_port_only().named("files")).unwrap_or_else(|e| panic!("{e}"));
    lab.wait_for("the mux transports to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    host_sh(TREE, &src);
    let want = host_manifest(&src);
    assert!(want.contains("./sparse 81a4 134217728 "), "{want}");

    let remote = format!("{}:/tmp/tree", lab.name());
    let src_arg = src.to_str().expect("utf-8");
    ctl_ok(&lab, &["cp", "-r", "-p", src_arg, &remote], COPY_TIMEOUT);
    assert_eq!(guest_manifest(&lab, "/tmp/tree"), want, "in the guest");
    let blocks = exec_sh_within(&lab, "stat -c %b /tmp/tree/sparse", COPY_TIMEOUT);
    let blocks: u64 = blocks.trim().parse().expect("blocks");
    assert!(
        blocks * 512 < 1 << 20,
        "the hole was filled in the guest: {blocks} blocks"
    );

    let back = dir.path().join("back");
    ctl_ok(
        &lab,
        &["cp", "-rp", &remote, back.to_str().expect("utf-8")],
        COPY_TIMEOUT,
    );
    assert_eq!(host_manifest(&back), want, "back on the host");
}

fn host_manifest(dir: &Path) -> String {
    host_sh(MANIFEST, dir)
}
