//! The server loop against a real vhost-user frontend (rust-vmm's, as a VMM would use it).

use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

mod common;
use common::{Fixed, FEATURE};
use vstream_vhost::{Device, Event, Vq};

fn connect(path: &std::path::Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(path, 2) {
            Ok(f) => return f,
            Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One VMM after another: the next one (after the last went away) is served like the first.
/// (The config space is read by QEMU in `xtask/tests/vsock.rs`: the guest gets its CID from it.)
#[test]
fn a_vmm_that_comes_back_is_served_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.sock");
    let _server = vstream_vhost::serve("fixed", &path, Fixed).expect("serve");
    for round in 0..3 {
        let mut vmm = connect(&path);
        vmm.set_owner().expect("set_owner");
        let features = vmm.get_features().expect("get_features");
        assert_ne!(features & FEATURE, 0, "round {round}: device feature");
        assert_ne!(features & (1 << 32), 0, "round {round}: VERSION_1");
        let protocol = vmm.get_protocol_features().expect("protocol features");
        vmm.set_protocol_features(protocol)
            .expect("set protocol features");
        drop(vmm);
    }
}

/// A device whose configuration space answers the byte the driver last wrote at offset 0, as
/// virtio-input's `select` works.
struct Selected(u8);

impl Device for Selected {
    fn num_queues(&self) -> usize {
        2
    }
    fn config(&self) -> Vec<u8> {
        vec![self.0, self.0.wrapping_mul(3), 0, 0]
    }
    fn set_config(&mut self, offset: u32, data: &[u8]) {
        if offset == 0 {
            if let Some(b) = data.first() {
                self.0 = *b;
            }
        }
    }
    fn reset(&mut self) {}
    fn handle(&mut self, _event: Event, _queues: &mut [Vq<'_>]) {}
}

/// VHOST_USER_SET_CONFIG reaches the device and the next GET_CONFIG answers from what it set:
/// the path QEMU's vhost-user-input takes for every select the guest's driver writes.
#[test]
fn config_writes_reach_the_device_and_reads_see_them() {
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.sock");
    let _server = vstream_vhost::serve("selected", &path, Selected(0)).expect("serve");
    let mut vmm = connect(&path);
    vmm.set_owner().expect("set_owner");
    let features = vmm.get_features().expect("get_features");
    vmm.set_features(features).expect("set_features");
    let protocol = vmm.get_protocol_features().expect("protocol features");
    assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG));
    vmm.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .expect("set protocol features");
    for select in [0x11u8, 0x01, 0x12] {
        vmm.set_config(0, VhostUserConfigFlags::WRITABLE, &[select, 0, 0, 0])
            .expect("set_config");
        let (_, payload) = vmm
            .get_config(0, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
            .expect("get_config");
        assert_eq!(&payload[..2], [select, select.wrapping_mul(3)]);
    }
}
