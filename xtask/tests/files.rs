//! End-to-end test of the files device in a real guest: `vstreamctl cp -r -p` of a tree with a
//! sparse file, symlinks, odd modes and old timestamps into the guest and back arrives
//! identical, compared with a manifest (type, mode, size, mtime, link target, sha256) made
//! on both sides; the hole stays a hole in the guest. And a large copy whose virtio-serial link
//! is cut while it runs (the session fails over to the serial line, then back) completes intact.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xtask::lab::testing::{ctl, ctl_ok, exec_sh_within, sha256_file, write_random_file};
use xtask::lab::{self, guest_status, Lab, LabOptions};

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
    wait_mux_up(&lab);
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

/// The lab's mux transport on the virtio-serial port in `status`.
fn port_transport<'a>(lab: &Lab, status: &'a Value) -> &'a Value {
    let port = lab
        .paths()
        .sockets
        .mux_port
        .as_ref()
        .expect("a virtio port");
    let address = format!("unix:{}", port.display());
    guest_status(status, lab.name()).expect("the guest")["transports"]
        .as_array()
        .expect("transports")
        .iter()
        .find(|t| t["address"] == address.as_str())
        .unwrap_or_else(|| panic!("no {address} in {status}"))
}

/// Bytes the open `files` channel has carried (in + out), if one is open.
fn files_channel_bytes(lab: &Lab, status: &Value) -> Option<u64> {
    guest_status(status, lab.name())?["channels"]
        .as_array()?
        .iter()
        .find(|c| c["class"] == "files")
        .map(|c| c["bytes_in"].as_u64().unwrap_or(0) + c["bytes_out"].as_u64().unwrap_or(0))
}

/// Cuts the port's link from QEMU's side: its chardev is swapped for a new socket server, which
/// closes vstreamd's connection; the new socket is then renamed to the port's path (QEMU unlinks
/// the old server's path as it closes it), where vstreamd reconnects.
fn cut_port_link(lab: &Lab) {
    let port = lab
        .paths()
        .sockets
        .mux_port
        .as_ref()
        .expect("a virtio port");
    let side = port.with_extension("cut.sock");
    let backend = json!({"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": side.to_str().expect("utf-8")}},
        "server": true, "wait": false}});
    lab.qmp(
        "chardev-change",
        Some(json!({"id": "muxport", "backend": backend})),
    )
    .unwrap_or_else(|e| panic!("chardev-change: {e}"));
    std::fs::rename(&side, port).expect("the new chardev socket in place");
}

/// Runs `vstreamctl ARGS` (a copy of `len` bytes) in the background, cuts the port's link once
/// the files channel has moved an eighth of it, and checks that the cut fell inside the copy and that the port's link
/// came back (its connection count moved).
fn cp_cut_by_failover(lab: &Lab, args: &[&str], len: u64) {
    let before = lab.status().expect("status");
    let connects = port_transport(lab, &before)["connects"]
        .as_u64()
        .expect("connects");
    thread::scope(|s| {
        let copy = s.spawn(|| ctl(lab, args, &[], COPY_TIMEOUT));
        let deadline = Instant::now() + COPY_TIMEOUT;
        let moved = loop {
            let status = lab.status().expect("status");
            match files_channel_bytes(lab, &status) {
                Some(n) if n >= len / 8 => break n,
                _ => {}
            }
            assert!(!copy.is_finished(), "the copy ended before the cut");
            assert!(Instant::now() < deadline, "the copy never got going");
            thread::sleep(Duration::from_millis(50));
        };
        cut_port_link(lab);
        assert!(!copy.is_finished(), "the copy ended before the cut");
        assert!(moved < len, "the cut came after the data: {moved} of {len}");
        let out = copy.join().expect("cp thread");
        assert!(
            out.status.success(),
            "cp across the failover failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("cut the port's link at {moved} of {len} bytes: the copy went on");
    });
    let after = lab.status().expect("status");
    let port = port_transport(lab, &after);
    assert!(
        port["connects"].as_u64().expect("connects") > connects,
        "the port's link was not reconnected: {port}"
    );
}

#[test]
fn a_large_copy_cut_by_a_transport_failover_completes_intact() {
    if !lab::e2e_enabled("a_large_copy_cut_by_a_transport_failover_completes_intact") {
        return;
    }
    let lab =
        Lab::boot(LabOptions::default().named("cp-failover")).unwrap_or_else(|e| panic!("{e}"));
    wait_mux_up(&lab);
    const LEN: usize = 32 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("big");
    write_random_file(&src, LEN);
    let want = sha256_file(&src);

    let remote = format!("{}:/tmp/big", lab.name());
    cp_cut_by_failover(
        &lab,
        &["cp", src.to_str().expect("utf-8"), &remote],
        LEN as u64,
    );
    wait_mux_up(&lab);
    let got = exec_sh_within(&lab, "sha256sum /tmp/big", COPY_TIMEOUT);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "in the guest"
    );
    // And back, over the port that was swapped.
    let back = dir.path().join("back");
    ctl_ok(
        &lab,
        &["cp", &remote, back.to_str().expect("utf-8")],
        COPY_TIMEOUT,
    );
    assert_eq!(sha256_file(&back), want, "back on the host");
}

fn wait_mux_up(lab: &Lab) {
    lab.wait_for("the mux transports to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}
