//! `vstreamctl libvirt-hook` against a real vstreamd, with sockets standing where QEMU would
//! listen under libvirt: at `started` vstreamd attaches to the domain's `org.vstream.0` channel
//! and its Unix-socket console, as guest DOMAIN whatever the agent announces; at `reconnect` the
//! session goes on untouched; at `stopped` the guest is gone. (xtask/tests/libvirt.rs does the
//! same under a real libvirtd.)

mod common;

use std::io::Write;

use common::{ctl_async, ctl_input_async, ok, raw_guest_at, start_daemon};
use serde_json::Value;

/// A domain XML as libvirt hands it to a hook at `started`, its sockets in `dir`.
fn domain_xml(name: &str, dir: &std::path::Path) -> String {
    format!(
        "<domain type='qemu' id='3'>
  <name>{name}</name>
  <uuid>0b6e2a4c-8d1f-4e3a-9c5b-7a2d4f6e8b10</uuid>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='{dir}/ttyS0.sock'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <console type='unix'>
      <source mode='bind' path='{dir}/ttyS0.sock'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='{dir}/org.vstream.0'/>
      <target type='virtio' name='org.vstream.0' state='disconnected'/>
    </channel>
  </devices>
</domain>",
        dir = dir.display()
    )
}

fn guest<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["guests"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_attaches_a_started_domain_and_lets_go_when_it_stops() {
    let d = start_daemon(
        r#"
[[guest]]
name = "fixed"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/fixed.sock"
"#,
    );
    // QEMU's side, listening as under libvirt: the channel, with an agent behind it that
    // announces another name, and ttyS0.
    let channel = format!("unix-listen:{}", d.path("org.vstream.0").display());
    let (mux, _incoming) = raw_guest_at("not-the-domain", channel.parse().expect("address"));
    let serial = std::os::unix::net::UnixListener::bind(d.path("ttyS0.sock")).expect("ttyS0");
    std::thread::spawn(move || {
        let (mut s, _) = serial.accept().expect("vstreamd on ttyS0");
        s.write_all(b"Debian GNU/Linux 12 web-1 ttyS0\r\n")
            .expect("write");
        // Held open as QEMU would.
        std::thread::sleep(std::time::Duration::from_secs(60));
    });
    let xml = domain_xml("web-1", d.dir.path());
    let hook = |op: &'static str| {
        let (control, xml) = (d.control.clone(), xml.clone());
        async move {
            let args = ["libvirt-hook", "web-1", op, "begin", "-"];
            ctl_input_async(&control, &args, xml.as_bytes()).await
        }
    };

    // Nothing to do before the domain runs.
    let args = ["libvirt-hook", "web-1", "prepare", "begin", "-"];
    ok(&args, hook("prepare").await);
    assert!(guest(&d.status().await, "web-1").is_none());

    ok(&["started"], hook("started").await);
    let s = d.wait_connected("web-1").await;
    assert!(guest(&s, "not-the-domain").is_none(), "{s:#}");
    let web = guest(&s, "web-1").expect("web-1");
    let transports = web["transports"].as_array().expect("transports");
    assert!(
        transports
            .iter()
            .any(|t| t["kind"] == "mux" && t["name"] == "org.vstream.0"),
        "{web:#}"
    );
    assert!(transports.iter().any(|t| t["name"] == "ttyS0"), "{web:#}");
    // The console is captured like a configured guest's.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let args = ["console", "web-1", "--name", "ttyS0", "--tail", "5"];
        let out = ctl_async(&d.control, &args).await;
        if String::from_utf8_lossy(&out.stdout).contains("web-1 ttyS0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ttyS0 output: {out:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let session = web["peer"].clone();

    // libvirtd restarted while the domain runs: the same guest, the same session.
    ok(&["reconnect"], hook("reconnect").await);
    let s = d.status().await;
    let web = guest(&s, "web-1").expect("web-1 still");
    assert_eq!(web["connected"], true, "{web:#}");
    assert_eq!(web["peer"], session, "{web:#}");

    // A domain may not take a configured guest's name.
    let fixed = domain_xml("fixed", d.dir.path());
    let args = ["libvirt-hook", "fixed", "started", "begin", "-"];
    let out = ctl_input_async(&d.control, &args, fixed.as_bytes()).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config file"),
        "{out:?}"
    );

    // `events --json` (one object per line) tells a watcher the guest went.
    let mut events = std::process::Command::new(env!("CARGO_BIN_EXE_vstreamctl"))
        .arg("--control")
        .arg(&d.control)
        .args(["events", "web-1", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("vstreamctl events");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(
        events.stdout.take().expect("stdout"),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            let ev: Value = serde_json::from_str(&line.expect("a line")).expect("JSON");
            if ev["event"] == "guest-detached" {
                let _ = tx.send(ev);
            }
        }
    });
    // vstreamctl subscribes as it starts: time for that on a loaded machine.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    ok(&["stopped"], hook("stopped").await);
    let ev = common::blocking(move || rx.recv_timeout(common::WAIT))
        .await
        .expect("a guest-detached event");
    assert_eq!(ev["guest"], "web-1", "{ev}");
    let _ = events.kill();
    let _ = events.wait();
    let s = d.status().await;
    assert!(guest(&s, "web-1").is_none(), "{s:#}");
    assert!(guest(&s, "fixed").is_some(), "{s:#}");
    // vstreamd let go of the channel: the agent's side sees its link end.
    let deadline = std::time::Instant::now() + common::WAIT;
    while mux.is_connected() {
        assert!(std::time::Instant::now() < deadline, "the link stays up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[test]
fn the_hook_does_nothing_without_vstreamd_and_refuses_a_mismatched_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    let xml = domain_xml("web-1", dir.path());
    let args = ["libvirt-hook", "web-1", "started", "begin", "-"];
    let out = common::ctl_input(&control, &args, xml.as_bytes());
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vstreamd is not running"),
        "{out:?}"
    );
    // A vstreamd that stopped and left its socket file behind.
    drop(std::os::unix::net::UnixListener::bind(&control).expect("bind"));
    let out = common::ctl_input(&control, &args, xml.as_bytes());
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vstreamd is not running"),
        "{out:?}"
    );
    let args = ["libvirt-hook", "other", "started", "begin", "-"];
    let out = common::ctl_input(&control, &args, xml.as_bytes());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
