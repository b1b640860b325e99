//! vstreamd's virtio-vsock device on arbitrary packets from the guest: the parser never
//! panics and what it accepts is consistent with its header; the device's state machine (real
//! socketpairs behind the mux port) never panics and stays within its bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_transport::vhost_vsock::device::{VsockDevice, BUF_ALLOC, MAX_CONNECTIONS};
use vstream_transport::vhost_vsock::packet::{self, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let mut dev = VsockDevice::new(3, 5000, None, tx).expect("device");
    // Packets are length-prefixed (2 bytes) so one input is a whole conversation.
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let bytes = &rest[2..2 + len];
        rest = &rest[2 + len..];
        if let Ok(p) = packet::parse(bytes, 3) {
            assert_eq!(p.payload.len(), p.header.len as usize);
            assert_eq!(p.payload.len() + HEADER_LEN, bytes.len());
            assert_eq!(p.op as u16, p.header.op);
        }
        dev.on_packet(bytes);
        // Take the mux connection, as vstreamd would, so later connects can succeed.
        let _ = rx.try_recv();
        assert!(dev.connections() <= MAX_CONNECTIONS);
        assert!(dev.buffered() <= MAX_CONNECTIONS * BUF_ALLOC as usize);
    }
});
