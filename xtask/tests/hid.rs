//! End-to-end tests of the hid device in real guests: an evdev reader in the guest (the
//! agent's hidden `evtest`) sees exactly the reports `vstreamctl input` sent, in order, with
//! their SYN_REPORT boundaries; and a forwarded evdev device arrives intact.
//!
//! This host has no /dev/uinput (and no /dev/input), so the "host" evdev device of the
//! forwarding test is made in a second guest ("src"): `vstreamctl input src type ...` creates
//! and drives src's uinput keyboard; in src, `vstream-agent hid-forward` (the same
//! `vstream_devices::hid::forward::forward` that `vstreamctl input --forward` runs) reads that
//! real evdev device (grabbed) and writes hid messages to an extra virtio-serial port; the
//! test pipes that port into `vstreamctl open dst hid keyboard` on the host; an evdev reader in
//! "dst" checks what arrives.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use xtask::lab::testing::{self, bg, sh, wait_out};
use xtask::lab::{self, Lab, LabOptions};

const UP_TIMEOUT: Duration = Duration::from_secs(120);

fn up(lab: &Lab) {
    lab.wait_for("the mux transports to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

fn ctl_ok(lab: &Lab, args: &[&str]) -> String {
    testing::ctl_ok(lab, args, lab::CTL_TIMEOUT)
}

/// Starts an evtest in the guest on the device `name` (output /tmp/ID.out) and waits until
/// it listens.
fn start_reader(lab: &Lab, name: &str, id: &str, reports: usize, timeout: u64) {
    bg(
        lab,
        id,
        &format!("vstream-agent evtest '{name}' --reports {reports} --timeout {timeout}"),
    );
    wait_out(lab, id, "listening on", Duration::from_secs(90));
}

fn wait_done(lab: &Lab, id: &str) -> String {
    wait_out(lab, id, "DONE-rc=", Duration::from_secs(150))
}

/// The event lines of an evtest output (after its "listening" line, before "done").
fn events(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("EV_") || *l == "SYN_REPORT" || *l == "SYN_DROPPED")
        .map(str::to_owned)
        .collect()
}

/// Expected lines: one report per inner slice.
fn expect(reports: &[&[&str]]) -> Vec<String> {
    let mut out = Vec::new();
    for r in reports {
        out.extend(r.iter().map(|s| s.to_string()));
        out.push("SYN_REPORT".into());
    }
    out
}

fn key(code: u16, v: i32) -> String {
    format!("EV_KEY {code} {v}")
}

fn typed_hi() -> Vec<String> {
    // "Hi!\n": shift+h, i, shift+1, enter; then ctrl+alt+f2.
    let k = |c: u16, v: i32| key(c, v);
    let mut lines = Vec::new();
    let reports: Vec<Vec<String>> = vec![
        vec![k(42, 1)],
        vec![k(35, 1)],
        vec![k(35, 0)],
        vec![k(42, 0)],
        vec![k(23, 1)],
        vec![k(23, 0)],
        vec![k(42, 1)],
        vec![k(2, 1)],
        vec![k(2, 0)],
        vec![k(42, 0)],
        vec![k(28, 1)],
        vec![k(28, 0)],
        vec![k(29, 1)],
        vec![k(56, 1)],
        vec![k(60, 1)],
        vec![k(60, 0)],
        vec![k(56, 0)],
        vec![k(29, 0)],
    ];
    for r in reports {
        lines.extend(r);
        lines.push("SYN_REPORT".into());
    }
    lines
}

#[test]
fn guest_evdev_readers_see_exactly_the_events_sent_and_forwarding_arrives_intact() {
    if !lab::e2e_enabled("guest_evdev_readers_see_exactly_the_events_sent") {
        return;
    }
    let dst =
        Lab::boot(LabOptions::virtio_port_only().named("dst")).unwrap_or_else(|e| panic!("{e}"));
    up(&dst);

    // Create the three devices (the first report of each kind creates it), then listen.
    ctl_ok(&dst, &["input", "dst", "key", "shift"]);
    ctl_ok(&dst, &["input", "dst", "mouse", "move", "1", "0"]);
    ctl_ok(&dst, &["input", "dst", "tablet", "0.5", "0.5"]);
    let devices = sh(&dst, "cat /sys/class/input/*/name");
    for n in ["vstream keyboard", "vstream mouse", "vstream tablet"] {
        assert!(devices.contains(n), "{n} missing in the guest: {devices}");
    }
    start_reader(&dst, "vstream keyboard", "kbd", 18, 90);
    start_reader(&dst, "vstream mouse", "mouse", 4, 90);
    start_reader(&dst, "vstream tablet", "tablet", 4, 90);

    ctl_ok(&dst, &["input", "dst", "type", "Hi!\n"]);
    ctl_ok(&dst, &["input", "dst", "key", "ctrl+alt+f2"]);
    ctl_ok(&dst, &["input", "dst", "mouse", "move", "5", "-3"]);
    ctl_ok(&dst, &["input", "dst", "mouse", "click", "right"]);
    ctl_ok(&dst, &["input", "dst", "mouse", "wheel", "-1"]);
    ctl_ok(
        &dst,
        &["input", "dst", "tablet", "0.25", "0.75", "--click", "left"],
    );
    ctl_ok(&dst, &["input", "dst", "tablet", "1", "0"]);

    let kbd = wait_done(&dst, "kbd");
    assert_eq!(events(&kbd), typed_hi(), "keyboard reader saw:\n{kbd}");
    assert!(kbd.contains("done: 18 reports"), "{kbd}");
    let mouse = wait_done(&dst, "mouse");
    assert_eq!(
        events(&mouse),
        expect(&[
            &["EV_REL 0 5", "EV_REL 1 -3"],
            &["EV_KEY 273 1"],
            &["EV_KEY 273 0"],
            &["EV_REL 8 -1"],
        ]),
        "mouse reader saw:\n{mouse}"
    );
    let tablet = wait_done(&dst, "tablet");
    assert_eq!(
        events(&tablet),
        expect(&[
            &["EV_ABS 0 8192", "EV_ABS 1 24575"],
            &["EV_KEY 272 1"],
            &["EV_KEY 272 0"],
            &["EV_ABS 0 32767", "EV_ABS 1 0"],
        ]),
        "tablet reader saw:\n{tablet}"
    );

    // Latency probes in the real guest: each report is read back from the evdev node.
    let out = ctl_ok(
        &dst,
        &["input", "dst", "latency", "--count", "50", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("latency JSON");
    assert_eq!(v["seen"], 50, "{v}");
    eprintln!("hid latency in the dst guest (50 probes): {v}");

    // Forwarding: the source device is src's uinput keyboard, read in src by the forwarder.
    let tmp = tempfile_dir();
    let fwd_sock = tmp.join("fwd.sock");
    let src_opts = LabOptions {
        extra_qemu_args: vec![
            "-chardev".into(),
            format!(
                "socket,id=fwd,path={},server=on,wait=off",
                fwd_sock.display()
            ),
            "-device".into(),
            "virtserialport,bus=vser0.0,chardev=fwd,id=fwdport,name=org.vstream.test.fwd".into(),
        ],
        ..LabOptions::virtio_port_only().named("src")
    };
    let src = Lab::boot(src_opts).unwrap_or_else(|e| panic!("{e}"));
    up(&src);
    ctl_ok(&src, &["input", "src", "key", "shift"]);

    // The host side of the forwarder's port goes into dst's hid keyboard channel.
    let port = UnixStream::connect(&fwd_sock).expect("forward port socket");
    let mut bridge = dst
        .ctl_command()
        .args(["open", "dst", "hid", "keyboard"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vstreamctl open");
    let mut to_dst = bridge.stdin.take().expect("stdin");
    let mut from_dst = bridge.stdout.take().expect("stdout");
    let mut port_r = port.try_clone().expect("clone");
    let mut port_w = port.try_clone().expect("clone");
    let up_pump = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        while let Ok(n) = port_r.read(&mut buf) {
            if n == 0 || to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
            total += n;
        }
        total
    });
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_dst.read(&mut buf) {
            if n == 0 || port_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });

    start_reader(&dst, "vstream keyboard", "fwd", 8, 120);
    bg(
        &src,
        "forwarder",
        "VSTREAM_LOG=info vstream-agent hid-forward 'vstream keyboard' --grab --to keyboard=port:org.vstream.test.fwd",
    );
    // The forwarder has grabbed the device once it logged that it forwards.
    wait_out(&src, "forwarder", "forwarding", Duration::from_secs(60));
    thread::sleep(Duration::from_millis(500));
    // A second reader on the source sees nothing: the forwarder holds the grab.
    start_reader(&src, "vstream keyboard", "grab", 1, 15);

    ctl_ok(&src, &["input", "src", "type", "Ok\n"]);
    let fwd = wait_done(&dst, "fwd");
    assert_eq!(
        events(&fwd),
        expect(&[
            &["EV_KEY 42 1"],
            &["EV_KEY 24 1"],
            &["EV_KEY 24 0"],
            &["EV_KEY 42 0"],
            &["EV_KEY 37 1"],
            &["EV_KEY 37 0"],
            &["EV_KEY 28 1"],
            &["EV_KEY 28 0"],
        ]),
        "the dst reader saw, forwarded from src:\n{fwd}"
    );
    let grabbed = wait_done(&src, "grab");
    assert!(
        grabbed.contains("done: 0 reports"),
        "the source was not grabbed: {grabbed}"
    );
    let _ = bridge.kill();
    let _ = bridge.wait();
    // The forwarder in src still holds the port open: end the pumps from this side.
    let _ = port.shutdown(std::net::Shutdown::Both);
    assert!(
        up_pump.join().unwrap_or(0) > 0,
        "nothing came through the forwarder's port"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vstream-hid-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
