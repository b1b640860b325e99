//! End-to-end tests of the foundation: a real guest (QEMU, Debian kernel), the real static agent in it,
//! the real vstreamd and vstreamctl on the host.
//!
//! One guest with both mux transports and both consoles is shared by the tests that fit it; the tests
//! of a single transport boot their own. They never skip silently: without QEMU they fail, unless
//! VSTREAM_SKIP_E2E=1 is set (then they say loudly that they were skipped).

use std::sync::OnceLock;
use std::time::Duration;

use xtask::lab::{self, guest_status, transport_state, Lab, LabOptions};

/// From QEMU's start to the agent's transports being up, under TCG with other guests booting.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

fn shared_lab() -> &'static Lab {
    static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();
    match LAB.get_or_init(|| Lab::boot(LabOptions::default()).map_err(|e| e.to_string())) {
        Ok(lab) => lab,
        Err(e) => panic!("the shared lab guest did not boot: {e}"),
    }
}

/// Waits until every mux transport of `lab` is up and checks the guest lists exactly those.
fn assert_mux_up(lab: &Lab) {
    let status = lab
        .wait_for("the agent's mux transports to be up", UP_TIMEOUT, |s| {
            lab.mux_transports_up(s)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let guest = guest_status(&status, lab.name()).expect("the guest is in the status");
    let mux: Vec<&str> = guest["transports"]
        .as_array()
        .expect("transports is an array")
        .iter()
        .filter(|t| t["kind"] == "mux")
        .filter_map(|t| t["address"].as_str())
        .collect();
    let mut expected = lab.mux_addresses();
    expected.sort();
    let mut seen: Vec<String> = mux.iter().map(|s| s.to_string()).collect();
    seen.sort();
    assert_eq!(
        seen,
        expected,
        "mux transports of {} in {status:#}",
        lab.name()
    );
    for address in &expected {
        assert_eq!(
            transport_state(&status, lab.name(), address),
            Some("up"),
            "{address}"
        );
    }
}

#[test]
fn agent_reaches_vstreamd_over_the_virtio_port_only() {
    if !lab::e2e_enabled("agent_reaches_vstreamd_over_the_virtio_port_only") {
        return;
    }
    let lab = Lab::boot(LabOptions::virtio_port_only().named("port-only"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(lab
        .kernel_cmdline()
        .contains("vstream.connect=port:org.vstream.0"));
    assert!(!lab.kernel_cmdline().contains("vstream.connect=serial:"));
    assert_mux_up(&lab);
}

#[test]
fn agent_reaches_vstreamd_over_the_pci_serial_only() {
    if !lab::e2e_enabled("agent_reaches_vstreamd_over_the_pci_serial_only") {
        return;
    }
    let lab = Lab::boot(LabOptions::pci_serial_only().named("serial-only"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(lab
        .kernel_cmdline()
        .contains("vstream.connect=serial:/dev/ttyS4,baud=115200"));
    assert!(!lab.kernel_cmdline().contains("vstream.connect=port:"));
    assert_mux_up(&lab);
    // The multiplexer really carries channels over the emulated 16550 (a slow line).
    assert_echo(&lab, 64 * 1024);
}

/// Sends `len` pseudo-random bytes through the guest agent's diag/echo service and checks that
/// exactly the same bytes come back.
fn assert_echo(lab: &Lab, len: usize) {
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let out = lab
        .ctl_with_input(["open", lab.name(), "diag", "echo"], &data)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "vstreamctl open failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len(), "echoed length");
    assert!(out.stdout == data, "echoed bytes differ");
}

#[test]
fn channels_round_trip_through_the_guest_agent() {
    if !lab::e2e_enabled("channels_round_trip_through_the_guest_agent") {
        return;
    }
    let lab = shared_lab();
    assert_mux_up(lab);
    assert_echo(lab, 4 * 1024 * 1024);
}

#[test]
fn agent_reaches_vstreamd_over_both_transports_at_once() {
    if !lab::e2e_enabled("agent_reaches_vstreamd_over_both_transports_at_once") {
        return;
    }
    let lab = shared_lab();
    assert_eq!(lab.mux_addresses().len(), 2);
    assert_mux_up(lab);
}

#[test]
fn guest_kernel_console_reaches_the_host_log() {
    if !lab::e2e_enabled("guest_kernel_console_reaches_the_host_log") {
        return;
    }
    let lab = shared_lab();
    lab.wait_for_console("ttyS0", "Linux version", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    lab.wait_for_console("ttyS0", "vstream-lab: init done", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn typed_command_round_trips_through_vstreamctl_console_hvc0() {
    if !lab::e2e_enabled("typed_command_round_trips_through_vstreamctl_console_hvc0") {
        return;
    }
    let lab = shared_lab();
    // The echo of the typed line shows `vs-$((6*7))`; only the shell's output shows `vs-42`.
    let shown = lab
        .console_roundtrip("hvc0", "echo vs-$((6*7))", "vs-42", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(shown.contains("vs-42"), "{shown}");
}
