//! The server loop against a real vhost-user frontend (rust-vmm's, as a VMM would use it).

use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

mod common;
use common::{Fixed, FEATURE};

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
