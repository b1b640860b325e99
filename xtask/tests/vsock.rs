//! End-to-end tests of AF_VSOCK in a real guest, run twice: the host side served by a peer
//! vstream did not write (QEMU's `vhost-user-vsock-pci` with rust-vmm's vhost-device-vsock,
//! hybrid Unix-socket backend, `./x.sh setup` installs it; tests `vhost_device_vsock::*`), and
//! by vstreamd itself (its `vhost-user-vsock:` transport; tests `vstreamd::*`). The guest has no virtio-serial mux port and no PCI
//! serial: the mux session runs over vsock only, both ways at once (the agent connects to
//! `vsock:2:5000`, which vstreamd accepts on `unix-listen:<uds>_5000`, and listens on
//! `vsock-listen:5001`, which vstreamd reaches with `hvsock:<uds>:5001`).
//!
//! Checked over it: the consoles (separate chardevs, still there), exec with 4 MiB through `cat`,
//! QGA on a mux channel, a print job landing in the spool, and a host program talking to a guest
//! listener (the agent's raw QGA on `vsock-listen:6000`) through the hybrid socket's `CONNECT`,
//! and the session going on over `hvsock:` alone. One guest for all of them, plus one for PPP
//! over the vsock session (root: a network namespace). They never skip silently: without QEMU or vhost-device-vsock they
//! fail, unless VSTREAM_SKIP_E2E=1 is set.

use std::net::Ipv4Addr;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xtask::lab::testing::{bg, ctl, ctl_ok, receive_one, sh, sha256_file, wait_print_jobs, NetNs};
use xtask::lab::{guest_status, transport_state, Lab, LabOptions, LabVsock};
use xtask::qemu::{HYBRID_VSOCK_CID, VSOCK_MUX_PORT};
use xtask::qga_lab::{self, QgaConn};

/// From QEMU's start to both vsock transports being up, under TCG.
const UP_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest port of the agent's raw QGA listener (`vstream.qga=vsock-listen:6000`).
const QGA_VSOCK_PORT: u32 = 6000;

/// The guest's name with each backend.
fn guest_name(backend: LabVsock) -> &'static str {
    match backend {
        LabVsock::Vstreamd => "vsockd",
        _ => "vsock",
    }
}

/// The test that cuts a link runs alone (write); the others share the guest (read).
static GATE: RwLock<()> = RwLock::new(());

fn shared_lab(backend: LabVsock) -> &'static Lab {
    static LABS: [OnceLock<Result<Lab, String>>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = &LABS[usize::from(backend == LabVsock::Vstreamd)];
    let lab = slot.get_or_init(|| {
        let options = LabOptions {
            extra_kernel_args: vec![format!("vstream.qga=vsock-listen:{QGA_VSOCK_PORT}")],
            vsock: backend,
            ..LabOptions::vsock_only().named(guest_name(backend))
        };
        let lab = Lab::boot(options).map_err(|e| e.to_string())?;
        lab.wait_for("both vsock transports to be up", UP_TIMEOUT, |s| {
            lab.mux_transports_up(s)
        })
        .map_err(|e| e.to_string())?;
        Ok(lab)
    });
    match lab {
        Ok(lab) => lab,
        Err(e) => panic!("the vsock lab guest did not boot: {e}"),
    }
}

/// `vstreamctl exec lab.name() -- sh -c SCRIPT`; it must exit 0. Its stdout.
fn exec(lab: &Lab, script: &str) -> String {
    ctl_ok(
        lab,
        &["exec", lab.name(), "--", "sh", "-c", script],
        Duration::from_secs(120),
    )
}

/// The first word of the line of `sha256sum` output that names `path`.
fn digest_of(output: &str, path: &str) -> String {
    output
        .lines()
        .find(|l| l.contains(path))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no sha256sum of {path} in {output:?}"))
        .to_owned()
}

fn the_mux_runs_over_vsock_both_ways_and_over_hvsock_alone(backend: LabVsock) {
    let lab = shared_lab(backend);
    // It cuts a link: the other tests wait.
    let _alone = GATE.write().unwrap_or_else(|e| e.into_inner());
    assert_eq!(lab.vsock_cid(), Some(HYBRID_VSOCK_CID));
    let status = lab.status().unwrap_or_else(|e| panic!("{e}"));
    let guest = guest_status(&status, lab.name()).expect("the guest in status");
    let mux: Vec<(&str, &str)> = guest["transports"]
        .as_array()
        .expect("transports")
        .iter()
        .filter(|t| t["kind"] == "mux")
        .map(|t| {
            (
                t["address"].as_str().unwrap_or(""),
                t["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let hybrid = lab
        .paths()
        .sockets
        .hybrid_vsock
        .clone()
        .expect("a hybrid vsock socket");
    // vhost-device-vsock: `unix-listen:<uds>_5000`; vstreamd's own device:
    // `vhost-user-vsock:...,port=5000,uds=<uds>`.
    let listen = lab.mux_addresses()[0].clone();
    let connect = format!("hvsock:{}:5001", hybrid.uds.display());
    assert_eq!(
        mux,
        [(listen.as_str(), "up"), (connect.as_str(), "up")],
        "{guest:#}"
    );
    // Each link finished its handshake on frames that crossed it intact.
    for t in guest["transports"].as_array().expect("transports") {
        if t["kind"] != "mux" {
            continue;
        }
        let link = &t["link"];
        eprintln!(
            "vsock: {} active={} bytes_in={} bytes_out={} frames_in={}",
            t["address"], t["active"], link["bytes_in"], link["bytes_out"], link["frames_in"]
        );
        assert!(link["frames_in"].as_u64() > Some(0), "{t:#}");
        assert_eq!(link["crc_errors"], 0, "{t:#}");
    }
    // The guest's side: its agent was told only vsock addresses, and the kernel's virtio
    // vsock transport is there.
    let cmdline = lab.kernel_cmdline();
    let connects: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| w.starts_with("vstream.connect="))
        .collect();
    assert_eq!(
        connects,
        [
            "vstream.connect=vsock:2:5000",
            "vstream.connect=vsock-listen:5001"
        ]
    );
    let drivers = exec(lab, "ls /sys/bus/virtio/drivers/");
    assert!(drivers.contains("vmw_vsock_virtio_transport"), "{drivers}");

    if backend == LabVsock::Vstreamd {
        return agent_restarts_over_vstreamds_device(lab, &listen, &connect);
    }
    // Then the host-initiated direction alone carries the session: unlinking vstreamd's
    // listening path leaves its live link but makes the backend's connections for host port
    // 5000 fail, so a restarted agent is reached only through `CONNECT 5001`.
    let link_id = |s: &Value, address: &str| -> Option<u64> {
        guest_status(s, lab.name())?["transports"]
            .as_array()?
            .iter()
            .find(|t| t["address"] == address)?["link"]["id"]
            .as_u64()
    };
    let before = link_id(&status, &connect).expect("the hvsock link");
    std::fs::remove_file(hybrid.host_port(VSOCK_MUX_PORT)).expect("unlink the _5000 path");
    bg(lab, "kill-agent", "kill -9 $(cat /run/vstream-agent.pid)");
    lab.wait_for("the session back over hvsock alone", UP_TIMEOUT, |s| {
        transport_state(s, lab.name(), &connect) == Some("up")
            && link_id(s, &connect).is_some_and(|id| id != before)
            && transport_state(s, lab.name(), &listen) != Some("up")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    round_trip_4_mib(lab, "hvsock-only");
    let status = lab.status().unwrap_or_else(|e| panic!("{e}"));
    let guest = guest_status(&status, lab.name()).expect("the guest in status");
    let hvsock = guest["transports"]
        .as_array()
        .expect("transports")
        .iter()
        .find(|t| t["address"] == connect.as_str())
        .expect("the hvsock transport");
    assert_eq!(hvsock["active"], true, "{guest:#}");
    assert!(
        hvsock["link"]["bytes_in"].as_u64() >= Some(4 << 20)
            && hvsock["link"]["bytes_out"].as_u64() >= Some(4 << 20),
        "the 4 MiB did not cross the hvsock link: {hvsock:#}"
    );
    assert_ne!(
        transport_state(&status, lab.name(), &listen),
        Some("up"),
        "{guest:#}"
    );
}

/// With vstreamd as the device: the guest's connection is known by the device's CID, and a
/// killed agent (its sockets reset by the guest kernel) comes back over both directions and
/// moves 4 MiB each way.
fn agent_restarts_over_vstreamds_device(lab: &Lab, listen: &str, connect: &str) {
    let link_id = |s: &Value, address: &str| -> Option<u64> {
        guest_status(s, lab.name())?["transports"]
            .as_array()?
            .iter()
            .find(|t| t["address"] == address)?["link"]["id"]
            .as_u64()
    };
    let status = lab.status().unwrap_or_else(|e| panic!("{e}"));
    let guest = guest_status(&status, lab.name()).expect("the guest in status");
    let device = guest["transports"]
        .as_array()
        .expect("transports")
        .iter()
        .find(|t| t["address"] == listen)
        .expect("the vhost-user-vsock transport");
    let peer = device["peer"].as_str().unwrap_or("");
    assert!(
        peer.starts_with(&format!("vsock:{HYBRID_VSOCK_CID}:")),
        "the peer is the device's CID: {device:#}"
    );
    let before = (
        link_id(&status, listen).expect("the device's link"),
        link_id(&status, connect).expect("the hvsock link"),
    );
    bg(lab, "kill-agent", "kill -9 $(cat /run/vstream-agent.pid)");
    lab.wait_for(
        "both links back after the agent restarted",
        UP_TIMEOUT,
        |s| {
            lab.mux_transports_up(s)
                && link_id(s, listen).is_some_and(|id| id != before.0)
                && link_id(s, connect).is_some_and(|id| id != before.1)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    round_trip_4_mib(lab, "vstreamd-device");
}

fn the_consoles_still_work_beside_a_vsock_session(backend: LabVsock) {
    let lab = shared_lab(backend);
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    // hvc0 is its own chardev: a typed line comes back computed.
    assert_eq!(
        sh(lab, "echo $((6 * 7))-$(hostname)"),
        format!("42-{}", lab.name())
    );
    // ttyS0 (kernel console) is recorded by vstreamd.
    lab.wait_for_console("ttyS0", "vstream-lab: init done", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Sends 4 MiB through `tee` in the guest and back with `vstreamctl exec`; the guest hashes
/// what it received, so both directions are checked. Returns how long it took.
fn round_trip_4_mib(lab: &Lab, tag: &str) -> Duration {
    // xorshift64*: incompressible, reproducible bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..4 * 1024 * 1024 / 8)
        .flat_map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
        })
        .collect();
    let guest_file = format!("/tmp/{tag}.bin");
    let started = Instant::now();
    let out = ctl(
        lab,
        &[
            "exec",
            lab.name(),
            "--",
            "sh",
            "-c",
            &format!("tee {guest_file}; sha256sum {guest_file} >&2"),
        ],
        &data,
        Duration::from_secs(300),
    );
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = lab.paths().dir.join(format!("{tag}.bin"));
    std::fs::write(&sent, &data).expect("write");
    let guest = digest_of(&String::from_utf8_lossy(&out.stderr), &guest_file);
    assert_eq!(guest, sha256_file(&sent), "the guest received other bytes");
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "the bytes came back changed");
    eprintln!(
        "vsock ({tag}): 4 MiB through tee in the guest ({}) and back: {took:?}, {:.2} MiB/s each way",
        lab.accel(),
        4.0 / took.as_secs_f64()
    );
    took
}

fn exec_moves_4_mib_through_cat_intact(backend: LabVsock) {
    let lab = shared_lab(backend);
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    let t = Duration::from_secs(60);
    let out = ctl(
        lab,
        &["exec", lab.name(), "--", "sh", "-c", "exit 7"],
        b"",
        t,
    );
    assert_eq!(out.status.code(), Some(7));
    round_trip_4_mib(lab, "exec");
}

fn qga_through_the_mux_pings_and_reads_a_file(backend: LabVsock) {
    let lab = shared_lab(backend);
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    let ping = ctl_ok(
        lab,
        &["agent", lab.name(), r#"{"execute":"guest-ping"}"#],
        Duration::from_secs(60),
    );
    let reply: Value = serde_json::from_str(&ping).expect("a JSON reply");
    assert_eq!(reply, json!({"return": {}}));

    let made = exec(
        lab,
        "head -c 1048576 /dev/urandom > /tmp/qga.bin && sha256sum /tmp/qga.bin",
    );
    let want = digest_of(&made, "/tmp/qga.bin");
    let mut conn =
        QgaConn::via_control(&lab.paths().control, lab.name()).unwrap_or_else(|e| panic!("{e}"));
    let mut data = Vec::new();
    conn.read_file("/tmp/qga.bin", 64 << 10, 4, &mut data)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data.len(), 1 << 20);
    let local = lab.paths().dir.join("qga.bin");
    std::fs::write(&local, &data).expect("write");
    assert_eq!(
        sha256_file(&local),
        want,
        "guest-file-read changed the bytes"
    );
    qga_lab::check_common_commands(lab.name(), lab.name(), &mut |cmd| {
        conn.request(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"))
    });
}

fn a_print_job_lands_in_the_spool_intact(backend: LabVsock) {
    let lab = shared_lab(backend);
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    let printed = exec(
        lab,
        "{ printf '%%PDF-1.4\\n'; head -c 2097152 /dev/urandom; printf '\\n%%%%EOF\\n'; } > /tmp/job.pdf \
         && sha256sum /tmp/job.pdf && nc 127.0.0.1 9100 < /tmp/job.pdf",
    );
    let want = digest_of(&printed, "/tmp/job.pdf");
    let jobs = wait_print_jobs(lab, "the job to be done", |j| {
        j.iter().any(|j| j["state"] == "done")
    });
    let job = jobs.iter().find(|j| j["state"] == "done").expect("a job");
    assert_eq!(job["type"], "pdf", "{job}");
    assert_eq!(job["source"], "tcp-listen:127.0.0.1:9100", "{job}");
    let file = lab
        .paths()
        .spool_dir(lab.name())
        .join(job["file"].as_str().expect("file"));
    assert_eq!(
        std::fs::metadata(&file).expect("the spooled job").len(),
        2_097_152 + 9 + 7
    );
    assert_eq!(sha256_file(&file), want, "the spooled job differs");
}

fn a_host_program_reaches_a_guest_listener_through_the_hybrid_socket(backend: LabVsock) {
    let lab = shared_lab(backend);
    let _shared = GATE.read().unwrap_or_else(|e| e.into_inner());
    // Nobody listens on 6001 in the guest: the backend hangs up without an answer.
    let (_closed, answer) = lab
        .hybrid_vsock_connect(QGA_VSOCK_PORT + 1)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer, "", "CONNECT to a port without a listener");

    exec(lab, "printf 'over the hybrid socket\\n' > /tmp/hybrid.txt");
    let (stream, answer) = lab
        .hybrid_vsock_connect(QGA_VSOCK_PORT)
        .unwrap_or_else(|e| panic!("{e}"));
    let host_port: u32 = answer
        .strip_prefix("OK ")
        .and_then(|a| a.strip_suffix('\n'))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("CONNECT {QGA_VSOCK_PORT} was answered {answer:?}"));
    eprintln!("vsock: CONNECT {QGA_VSOCK_PORT} answered OK {host_port}");
    let mut conn = QgaConn::over(stream).unwrap_or_else(|e| panic!("guest-sync-delimited: {e}"));
    let ping = conn
        .request(&json!({"execute": "guest-ping"}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ping, json!({"return": {}}));
    let text = conn
        .read_small("/tmp/hybrid.txt")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text, b"over the hybrid socket\n");
    // 4 MiB from the guest through the hybrid socket, checked end to end.
    let made = exec(
        lab,
        "head -c 4194304 /dev/urandom > /tmp/hybrid.bin && sha256sum /tmp/hybrid.bin",
    );
    let want = digest_of(&made, "/tmp/hybrid.bin");
    let started = Instant::now();
    let mut data = Vec::new();
    conn.read_file("/tmp/hybrid.bin", 1 << 20, 4, &mut data)
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    assert_eq!(data.len(), 4 << 20);
    let local = lab.paths().dir.join("hybrid.bin");
    std::fs::write(&local, &data).expect("write");
    assert_eq!(
        sha256_file(&local),
        want,
        "the bytes through the hybrid socket changed"
    );
    eprintln!(
        "vsock: 4 MiB guest-file-read through the hybrid socket (base64, {}): {took:.2?}",
        lab.accel()
    );
}

/// PPP over a session that runs over vsock only: pppd in the guest on a `ppp` channel, the host
/// end in a network namespace (backend `tun`, as in ppp.rs; needs root). Its own guest, so that
/// the shared one keeps no network namespace alive.
fn ppp_runs_over_the_vsock_session(backend: LabVsock) {
    let ns = NetNs::new(guest_name(backend));
    let options = LabOptions {
        extra_config: format!(
            "\n[guest.ppp]\nlocal = \"10.78.0.1\"\nremote = \"10.78.0.2\"\nmtu = 1500\n\
             backend = \"tun\"\nnetns = \"{}\"\n",
            ns.0
        ),
        vsock: backend,
        ..LabOptions::vsock_only().named(&format!("{}ppp", guest_name(backend)))
    };
    let lab = Lab::boot(options).unwrap_or_else(|e| panic!("{e}"));
    lab.wait_for("the PPP link to be up over vsock", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
            && guest_status(s, lab.name()).is_some_and(|g| g["devices"]["ppp"]["state"] == "up")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ping = exec(&lab, "ping -c 5 -i 0.2 10.78.0.1");
    assert!(ping.contains("5 packets received"), "{ping}");

    let made = exec(
        &lab,
        "head -c 4194304 /dev/urandom > /tmp/blob && sha256sum /tmp/blob",
    );
    let want = digest_of(&made, "/tmp/blob");
    let listener = ns.listen(Ipv4Addr::new(10, 78, 0, 1));
    let port = listener.local_addr().expect("port").port();
    let rx = receive_one(listener);
    exec(&lab, &format!("nc 10.78.0.1 {port} < /tmp/blob"));
    let (got, took) = rx.join().expect("receiver");
    assert_eq!(got.len(), 4 << 20, "bytes through ppp");
    let local = lab.paths().dir.join("ppp-blob.bin");
    std::fs::write(&local, &got).expect("write");
    assert_eq!(sha256_file(&local), want, "the bytes through ppp changed");
    eprintln!(
        "vsock: 4 MiB guest -> host TCP through ppp over vsock ({}): {took:.2?}, {:.2} MiB/s; {}",
        lab.accel(),
        4.0 / took.as_secs_f64(),
        ping.lines()
            .find(|l| l.contains("round-trip"))
            .unwrap_or("")
    );
    lab.shutdown().unwrap_or_else(|e| panic!("{e}"));
}

/// Every test above, once per backend: `vhost_device_vsock::NAME` (rust-vmm's backend) and
/// `vstreamd::NAME` (vstreamd serves the device itself).
macro_rules! on_each_backend {
    ($($test:ident),* $(,)?) => {
        mod vhost_device_vsock {
            $(
                #[test]
                fn $test() {
                    if xtask::lab::e2e_enabled(stringify!($test)) {
                        super::$test(xtask::lab::LabVsock::VhostDeviceVsock);
                    }
                }
            )*
        }
        mod vstreamd {
            $(
                #[test]
                fn $test() {
                    if xtask::lab::e2e_enabled(stringify!($test)) {
                        super::$test(xtask::lab::LabVsock::Vstreamd);
                    }
                }
            )*
        }
    };
}

on_each_backend!(
    the_mux_runs_over_vsock_both_ways_and_over_hvsock_alone,
    the_consoles_still_work_beside_a_vsock_session,
    exec_moves_4_mib_through_cat_intact,
    qga_through_the_mux_pings_and_reads_a_file,
    a_print_job_lands_in_the_spool_intact,
    a_host_program_reaches_a_guest_listener_through_the_hybrid_socket,
    ppp_runs_over_the_vsock_session,
);
