//! End-to-end check of the lab's own parts, with no vstreamd: the image boots, `/init` loads every
//! module, names the PCI 16550 and the virtio port as the agent expects, starts the agent, and runs a
//! shell on hvc0; QMP answers. The test talks to the guest's sockets itself since no daemon does.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use xtask::lab::{self, Lab, LabOptions};
use xtask::qemu::{MUX_PORT_NAME, PCI_SERIAL_TTY};

/// Types `line` into the hvc0 chardev socket until `expect` comes back.
fn hvc0_roundtrip(socket: &Path, line: &str, expect: &str, timeout: Duration) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to hvc0");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut last_typed: Option<Instant> = None;
    while Instant::now() < deadline {
        let retype = match last_typed {
            None => true,
            Some(t) => t.elapsed() > Duration::from_secs(5),
        };
        if retype {
            stream.write_all(format!("{line}\r").as_bytes()).unwrap();
            last_typed = Some(Instant::now());
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading hvc0: {e}"),
        }
        let text = String::from_utf8_lossy(&seen);
        if text.contains(expect) {
            return text.into_owned();
        }
    }
    panic!(
        "{expect:?} did not come back from hvc0 within {timeout:?}; it showed:\n{}",
        String::from_utf8_lossy(&seen)
    );
}

#[test]
fn guest_boots_with_its_devices() {
    if !lab::e2e_enabled("guest_boots_with_its_devices") {
        return;
    }
    let options = LabOptions {
        start_daemon: false,
        ..LabOptions::default().named("image-check")
    };
    let lab = Lab::boot(options).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "booted in {:.1} s with {} ({})",
        lab.boot_time().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        lab.accel(),
        lab.accel_reason()
    );

    let log = lab.raw_console_log();
    let modules = log
        .lines()
        .find(|l| l.contains("vstream-lab: modules: "))
        .expect("init reports its modules");
    assert!(modules.contains(" 0 failed"), "{modules}");
    assert!(
        log.lines()
            .any(|l| l.contains("vstream-lab: virtio port vport")
                && l.contains(&format!("name={MUX_PORT_NAME}"))),
        "{log}"
    );
    assert!(
        log.contains(&format!("vstream-lab: pci serial {PCI_SERIAL_TTY} at ")),
        "{log}"
    );
    assert!(log.contains("vstream-lab: vstream-agent started"), "{log}");

    let status = lab.qmp("query-status", None).expect("QMP answers");
    assert_eq!(status["status"], "running", "{status}");

    let shown = hvc0_roundtrip(
        &lab.paths().sockets.hvc0,
        "echo vs-$((6*7)) $(hostname) $(cat /sys/class/virtio-ports/*/name)",
        "vs-42 image-check org.vstream.0",
        Duration::from_secs(60),
    );
    assert!(shown.contains("vs-42"));
}
