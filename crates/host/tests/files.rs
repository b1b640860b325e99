//! The files device end to end on the host: vstreamd and vstreamctl as processes, vstream-agent
//! in-process (its guest half writes the same file system), `vstreamctl cp` both ways.
//! xtask/tests/files.rs runs the tree round trip in a real guest.

mod common;

use std::path::Path;
use std::process::Command;

use vstream_agent::Agent;

use common::{ctl_async, ctl_input_async, ok, sha256, start_daemon};

const CONFIG: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/g.sock"
"#;

/// One line per path under `dir`: type, mode, size, mtime (ns), link target, and a sha256 per
/// regular file: what a user compares after a copy (the script the lab's test runs in a guest).
fn manifest(dir: &Path) -> String {
    sh(
        include_str!("../../../xtask/tests/data/files-manifest.sh"),
        dir,
    )
}

/// A tree with a sparse file, symlinks (one dangling, one absolute), odd modes, old times.
fn make_tree(root: &Path) {
    sh(
        include_str!("../../../xtask/tests/data/files-tree.sh"),
        root,
    );
}

fn sh(script: &str, dir: &Path) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_moves_trees_and_files_both_ways_identically() {
    let d = start_daemon(CONFIG);
    let dir = d.dir.path().to_owned();
    let _agent = Agent::start(
        "g",
        vec![format!("unix:{}/g.sock", dir.display())
            .parse()
            .expect("addr")],
    );
    d.wait_connected("g").await;
    let path = |p: &str| dir.join(p).display().to_string();

    // A tree into the guest and back, with -r -p: identical to the byte, the mode, the ns.
    make_tree(&dir.join("src"));
    let into = format!("g:{}", path("in-guest"));
    ok(
        &[],
        ctl_async(&d.control, &["cp", "-r", "-p", &path("src"), &into]).await,
    );
    ok(
        &[],
        ctl_async(&d.control, &["cp", "-rp", &into, &path("back")]).await,
    );
    let want = manifest(&dir.join("src"));
    assert!(
        want.contains("./link a1ff ") && want.contains("./sparse 81a4 134217728 "),
        "{want}"
    );
    assert_eq!(manifest(&dir.join("in-guest")), want);
    assert_eq!(manifest(&dir.join("back")), want);
    let sparse = std::fs::metadata(dir.join("back/sparse")).expect("sparse");
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&sparse) * 512 < 1 << 20,
        "the hole was filled in"
    );
    // Into an existing directory: under the source's name.
    std::fs::create_dir(dir.join("existing")).expect("mkdir");
    ok(
        &[],
        ctl_async(&d.control, &["cp", "-r", &into, &path("existing")]).await,
    );
    assert!(dir.join("existing/in-guest/sub/deeper/big").is_file());

    // A single file both ways, and through stdout and stdin.
    let big = path("src/sub/deeper/big");
    ok(
        &[],
        ctl_async(&d.control, &["cp", &big, &format!("g:{}", path("one"))]).await,
    );
    ok(
        &[],
        ctl_async(
            &d.control,
            &["cp", &format!("g:{}", path("one")), &path("two")],
        )
        .await,
    );
    assert_eq!(sha256(&dir.join("two")), sha256(Path::new(&big)));
    let out = ctl_async(&d.control, &["cp", &format!("g:{big}"), "-"]).await;
    assert!(out.status.success());
    assert!(out.stdout == std::fs::read(&big).expect("big"));
    let out = ctl_input_async(
        &d.control,
        &["cp", "-", &format!("g:{}", path("three"))],
        b"piped\n",
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.join("three")).expect("three"), b"piped\n");

    // 64 MiB each way by both paths, timed (printed: docs/devices/files.md has a run's figures).
    let mib = 64;
    let data: Vec<u8> = (0..mib << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(dir.join("timed"), &data).expect("timed");
    let mut rates = Vec::new();
    for via in ["files", "qga"] {
        let remote = format!("g:{}", path(&format!("timed.{via}")));
        let back = path(&format!("timed.{via}.back"));
        let t = std::time::Instant::now();
        ok(
            &[],
            ctl_async(&d.control, &["cp", "--via", via, &path("timed"), &remote]).await,
        );
        let up = mib as f64 / t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        ok(
            &[],
            ctl_async(&d.control, &["cp", "--via", via, &remote, &back]).await,
        );
        let down = mib as f64 / t.elapsed().as_secs_f64();
        assert!(
            std::fs::read(&back).expect("back") == data,
            "{via}: the copy differs"
        );
        rates.push((via, up, down));
    }
    for (via, up, down) in &rates {
        eprintln!(
            "cp --via {via}, {mib} MiB: host->guest {up:.0} MiB/s, guest->host {down:.0} MiB/s"
        );
    }
    eprintln!(
        "files / qga: host->guest {:.1}x, guest->host {:.1}x",
        rates[0].1 / rates[1].1,
        rates[0].2 / rates[1].2
    );

    // The QGA path is still there.
    ok(
        &[],
        ctl_async(
            &d.control,
            &["cp", "--via", "qga", &big, &format!("g:{}", path("four"))],
        )
        .await,
    );
    assert_eq!(sha256(&dir.join("four")), sha256(Path::new(&big)));

    // A missing file: status 2, the path named, nothing left behind.
    let out = ctl_async(&d.control, &["cp", "g:/nonexistent/file", &path("missing")]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("/nonexistent/file") && err.contains("No such file"),
        "{err}"
    );
    let out = ctl_async(&d.control, &["cp", &path("nope"), &into]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.join("missing").exists() && !dir.join(".missing.vstream-partial").exists());
    // A directory without -r: refused, status 1.
    let out = ctl_async(&d.control, &["cp", &into, &path("flat")]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("use -r"), "{err}");
}
