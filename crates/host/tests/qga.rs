//! The qga device end to end on the host: vstreamd and vstreamctl as processes, vstream-agent
//! in-process (its QGA served on a `qga` mux channel and on a raw socket, as `--qga` does), and
//! a real qemu-ga behind a raw `qga` transport when it is installed. The same host-side checks
//! run against every route; xtask/tests/qga.rs runs them in a real guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vstream_agent::Agent;
use vstream_devices::qga::guest::{GuestAgent, Settings};

use common::{ctl_async, ok, sha256, start_daemon};

async fn ctl_ok(control: &Path, args: &[&str]) -> String {
    ok(args, ctl_async(control, args).await)
}

/// `vstreamctl agent GUEST JSON`: the reply object.
async fn agent(control: &Path, guest: &str, cmd: Value) -> Value {
    let out = ctl_async(control, &["agent", guest, &cmd.to_string()]).await;
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{guest} {cmd}: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(
        out.status.success(),
        reply.get("return").is_some(),
        "exit status follows the reply: {reply}"
    );
    reply
}

/// What our agent answers to `cmd` (no arguments), through the same request text a client
/// sends; panics on an error reply.
fn our_return(agent: &GuestAgent, cmd: &str) -> Value {
    let text = json!({ "execute": cmd }).to_string();
    let reply = agent.handle_text(text.as_bytes()).expect("a reply");
    let v: Value = serde_json::from_slice(&reply).expect("a JSON reply");
    v.get("return")
        .cloned()
        .unwrap_or_else(|| panic!("{cmd}: {v}"))
}

async fn ret(control: &Path, guest: &str, cmd: Value) -> Value {
    let reply = agent(control, guest, cmd.clone()).await;
    reply
        .get("return")
        .cloned()
        .unwrap_or_else(|| panic!("{guest} {cmd}: {reply}"))
}

/// A file of `len` pseudo-random bytes.
fn make_file(path: &Path, len: usize) {
    let mut data = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("write");
}

/// The in-process agent's state must never power this machine off: its guest-shutdown runs a
/// script that logs the mode instead. Every test calls this before starting an agent.
fn test_global_agent() -> (Arc<GuestAgent>, PathBuf) {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR
        .get_or_init(|| {
            let d = std::env::temp_dir().join(format!("vstream-qga-test-{}", std::process::id()));
            std::fs::create_dir_all(&d).expect("dir");
            let script = d.join("shutdown.sh");
            std::fs::write(
                &script,
                format!("#!/bin/sh\necho \"$1\" >> {}/shutdown.log\n", d.display()),
            )
            .expect("script");
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
            d
        })
        .clone();
    let agent = GuestAgent::global_with(|| Settings {
        shutdown_command: Some(dir.join("shutdown.sh")),
        ..Settings::default()
    });
    assert_eq!(
        agent.settings().shutdown_command.as_deref(),
        Some(dir.join("shutdown.sh").as_path()),
        "the process-wide agent was made elsewhere: guest-shutdown could power off this machine"
    );
    (agent, dir.join("shutdown.log"))
}

/// The checks every route must pass (vstream-agent by channel or raw socket, real qemu-ga).
async fn common_checks(control: &Path, guest: &str, dir: &Path) {
    assert_eq!(
        ret(control, guest, json!({"execute": "guest-ping"})).await,
        json!({})
    );
    let id = 7_777_777_777i64;
    assert_eq!(
        ret(
            control,
            guest,
            json!({"execute": "guest-sync", "arguments": {"id": id}})
        )
        .await,
        json!(id)
    );
    let info = ret(control, guest, json!({"execute": "guest-info"})).await;
    let names: Vec<&str> = info["supported_commands"]
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for must in [
        "guest-sync-delimited",
        "guest-file-open",
        "guest-exec",
        "guest-shutdown",
    ] {
        assert!(
            names.contains(&must),
            "{guest}: {must} missing from {names:?}"
        );
    }
    let host = ret(control, guest, json!({"execute": "guest-get-host-name"})).await;
    let want = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(host["host-name"], want.trim());

    // Errors in QGA's shape, with a failing exit status and the agent still serving.
    let e = agent(control, guest, json!({"execute": "guest-no-such-thing"})).await;
    assert_eq!(e["error"]["class"], "CommandNotFound", "{e}");
    let e = agent(
        control,
        guest,
        json!({"execute": "guest-file-read", "arguments": {"handle": 987_654}}),
    )
    .await;
    assert_eq!(
        e["error"],
        json!({"class": "GenericError", "desc": "handle '987654' has not been found"})
    );
    let out = ctl_async(control, &["agent", guest, "{not json"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not JSON"));

    // guest-exec, then guest-exec-status until it exits.
    let pid = ret(
        control,
        guest,
        json!({"execute": "guest-exec", "arguments": {
            "path": "sh", "arg": ["-c", "printf hello; printf oops >&2; exit 4"],
            "capture-output": true}}),
    )
    .await["pid"]
        .as_i64()
        .expect("pid");
    let deadline = Instant::now() + Duration::from_secs(15);
    let st = loop {
        let st = ret(
            control,
            guest,
            json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        )
        .await;
        if st["exited"] == true {
            break st;
        }
        assert!(Instant::now() < deadline, "{guest}: exec never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st["exitcode"], 4);
    assert_eq!(st["out-data"], "aGVsbG8="); // "hello"
    assert_eq!(st["err-data"], "b29wcw=="); // "oops"

    // cp both ways, small and with an odd size, and to stdout.
    let src = dir.join(format!("{guest}-small.src"));
    make_file(&src, 1_234_567);
    let remote = dir.join(format!("{guest}-small.remote"));
    let back = dir.join(format!("{guest}-small.back"));
    ctl_ok(
        control,
        &[
            "cp",
            "--via",
            "qga",
            src.to_str().expect("utf-8"),
            &format!("{guest}:{}", remote.display()),
        ],
    )
    .await;
    ctl_ok(
        control,
        &[
            "cp",
            "--via",
            "qga",
            &format!("{guest}:{}", remote.display()),
            back.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert_eq!(sha256(&src), sha256(&back));
    let out = ctl_async(
        control,
        &[
            "cp",
            "--via",
            "qga",
            &format!("{guest}:{}", remote.display()),
            "-",
        ],
    )
    .await;
    assert!(out.status.success());
    assert!(out.stdout == std::fs::read(&src).expect("src"));
    // A missing guest file: an error naming it, and no partial file left behind.
    let missing = dir.join(format!("{guest}-missing.back"));
    let out = ctl_async(
        control,
        &[
            "cp",
            "--via",
            "qga",
            &format!("{guest}:/nonexistent/file"),
            missing.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(!missing.exists());
    assert!(!dir
        .join(format!("{guest}-missing.back.vstream-partial"))
        .exists());
}

const CONFIG: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/g.sock"

[[guest]]
name = "raw"
[[guest.transport]]
kind = "qga"
address = "unix:DIR/vqga.sock"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vstream_agent_by_channel_and_raw_socket() {
    let (_global, shutdown_log) = test_global_agent();
    let d = start_daemon(CONFIG);
    let dir = d.dir.path().to_owned();
    let mut a = Agent::start(
        "g",
        vec![format!("unix:{}/g.sock", dir.display())
            .parse()
            .expect("addr")],
    );
    a.start_device(
        vstream_devices::qga::CLASS,
        vstream_devices::qga::device::RawPort(
            format!("unix-listen:{}/vqga.sock", dir.display())
                .parse()
                .expect("addr"),
        ),
    );
    d.wait_connected("g").await;
    for guest in ["g", "raw"] {
        common_checks(&d.control, guest, &dir).await;
    }

    // An exec that floods its output: captured up to 16 MiB, marked truncated, agent fine.
    let pid = ret(
        &d.control,
        "g",
        json!({"execute": "guest-exec", "arguments": {
            "path": "sh", "arg": ["-c", "head -c 40000000 /dev/zero"], "capture-output": true}}),
    )
    .await["pid"]
        .as_i64()
        .expect("pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = ret(
            &d.control,
            "g",
            json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        )
        .await;
        if st["exited"] == true {
            break st;
        }
        assert!(Instant::now() < deadline, "flood never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(st["out-truncated"], true);
    let out = vstream_devices::qga::base64_decode(st["out-data"].as_str().expect("data"))
        .expect("base64");
    assert_eq!(out.len(), vstream_devices::qga::MAX_EXEC_OUTPUT);
    assert_eq!(
        ret(&d.control, "g", json!({"execute": "guest-ping"})).await,
        json!({})
    );

    // 256 MiB both ways through the multiplexer, with equal checksums.
    let big = dir.join("big.src");
    make_file(&big, 256 << 20);
    let remote = dir.join("big.remote");
    let back = dir.join("big.back");
    let t = Instant::now();
    ctl_ok(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            big.to_str().expect("utf-8"),
            &format!("g:{}", remote.display()),
        ],
    )
    .await;
    let up = t.elapsed();
    let t = Instant::now();
    ctl_ok(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &format!("g:{}", remote.display()),
            back.to_str().expect("utf-8"),
        ],
    )
    .await;
    let down = t.elapsed();
    let sum = sha256(&big);
    assert_eq!(sha256(&remote), sum);
    assert_eq!(sha256(&back), sum);
    eprintln!(
        "cp 256 MiB through vstreamd and the mux: host->guest {:.1} s ({:.0} MiB/s), guest->host {:.1} s ({:.0} MiB/s)",
        up.as_secs_f64(),
        256.0 / up.as_secs_f64(),
        down.as_secs_f64(),
        256.0 / down.as_secs_f64()
    );
    for f in [&big, &remote, &back] {
        let _ = std::fs::remove_file(f);
    }

    // time-sync: sets the clock to the host's (the same machine here: off by microseconds).
    let out = ctl_ok(&d.control, &["time-sync", "g"]).await;
    assert!(out.starts_with("g: clock was "), "{out}");

    // shutdown and reboot: no reply on success; the agent ran its shutdown command.
    let _ = std::fs::remove_file(&shutdown_log);
    ctl_ok(&d.control, &["shutdown", "g"]).await;
    ctl_ok(&d.control, &["reboot", "raw"]).await;
    ctl_ok(&d.control, &["shutdown", "g", "--mode", "halt"]).await;
    assert_eq!(
        std::fs::read_to_string(&shutdown_log).expect("log"),
        "powerdown\nreboot\nhalt\n"
    );

    // A guest that does not exist, and one without an agent: clear errors.
    let out = ctl_async(
        &d.control,
        &["agent", "nope", r#"{"execute":"guest-ping"}"#],
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guest named \"nope\""));
    drop(a);
}

/// Our agent's and qemu-ga's answers to the same questions about this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_ga_behind_a_qga_transport() {
    let qemu_ga = Path::new("/usr/sbin/qemu-ga");
    if !qemu_ga.exists() {
        eprintln!("!!! SKIPPED real_qemu_ga_behind_a_qga_transport: no /usr/sbin/qemu-ga (apt-get install qemu-guest-agent)");
        return;
    }
    let d = start_daemon(
        r#"
[[guest]]
name = "real"
[[guest.transport]]
kind = "qga"
address = "unix:DIR/qemu-ga.sock"
"#,
    );
    let dir = d.dir.path().to_owned();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _qga = Kill(
        Command::new(qemu_ga)
            .arg("-m")
            .arg("unix-listen")
            .arg("-p")
            .arg(dir.join("qemu-ga.sock"))
            .arg("-t")
            .arg(&dir)
            .arg("-f")
            .arg(dir.join("qemu-ga.pid"))
            .stderr(std::fs::File::create(dir.join("qemu-ga.log")).expect("log"))
            .spawn()
            .expect("qemu-ga"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("qemu-ga.sock").exists() {
        assert!(Instant::now() < deadline, "qemu-ga did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common_checks(&d.control, "real", &dir).await;

    // Same answers as our agent (never asked to shut down: this is the test machine).
    let ours = GuestAgent::new(Settings::default());
    for cmd in [
        "guest-get-osinfo",
        "guest-get-host-name",
        "guest-get-timezone",
    ] {
        let theirs = ret(&d.control, "real", json!({ "execute": cmd })).await;
        let mine = our_return(&ours, cmd);
        assert_eq!(mine, theirs, "{cmd}");
    }
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .expect("list")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_owned())
            .collect();
        n.sort();
        n
    };
    let theirs = ret(
        &d.control,
        "real",
        json!({"execute": "guest-network-get-interfaces"}),
    )
    .await;
    let mine = our_return(&ours, "guest-network-get-interfaces");
    assert_eq!(names(&mine), names(&theirs));
    let fs_points = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|f| f["mountpoint"].as_str().expect("mp").to_owned())
            .collect()
    };
    let theirs = ret(&d.control, "real", json!({"execute": "guest-get-fsinfo"})).await;
    let mine = our_return(&ours, "guest-get-fsinfo");
    assert_eq!(
        fs_points(&mine),
        fs_points(&theirs),
        "the same file systems (qemu-ga lists them in reverse)"
    );

    // 32 MiB both ways through qemu-ga.
    let src = dir.join("mid.src");
    make_file(&src, 32 << 20);
    let remote = dir.join("mid.remote");
    let back = dir.join("mid.back");
    let t = Instant::now();
    ctl_ok(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            src.to_str().expect("utf-8"),
            &format!("real:{}", remote.display()),
        ],
    )
    .await;
    ctl_ok(
        &d.control,
        &[
            "cp",
            "--via",
            "qga",
            &format!("real:{}", remote.display()),
            back.to_str().expect("utf-8"),
        ],
    )
    .await;
    eprintln!(
        "cp 32 MiB both ways through a real qemu-ga: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(sha256(&src), sha256(&back));
}
