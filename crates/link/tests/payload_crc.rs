//! The payload-CRC mode is chosen per link from the transport's address kind: a Unix socket
//! link leaves the CRC out, a virtio-serial port or a serial line keeps it, and so does a
//! socket link to a peer that does not offer it. Bytes arrive intact in every case.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vstream_link::{link_params, Mux};
use vstream_transport::Address;
use vstream_wire::{Config, LinkParams, Role};

/// Joins a host and a guest over one real Unix socket pair, each side with the link
/// parameters its address gives, sends 1 MiB through a channel and returns whether each
/// side's link carries the payload CRC.
async fn payload_crc_on(host: LinkParams, guest: LinkParams) -> (bool, bool) {
    let (h, mut incoming) = Mux::new(Config::new(Role::Host, "host"), 11);
    let (g, _none) = Mux::new(Config::new(Role::Guest, "guest"), 22);
    let (a, b) = UnixStream::pair().expect("socketpair");
    let hl = tokio::spawn({
        let h = h.clone();
        async move { h.run_link(a, host, "a", &[]).await }
    });
    let gl = tokio::spawn({
        let g = g.clone();
        async move { g.run_link(b, guest, "b", &[]).await }
    });
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
    let sender = tokio::spawn({
        let (g, data) = (g.clone(), data.clone());
        async move {
            let mut s = g.open("bulk", "x").await.expect("open");
            s.write_all(&data).await.expect("write");
            s.shutdown().await.expect("shutdown");
            s
        }
    });
    let mut s = incoming.recv().await.expect("channel").stream;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert!(got == data, "the bytes arrive intact");
    drop(sender.await.expect("sender"));
    let crc = |m: &Mux| {
        let st = m.status();
        assert_eq!(st.links.len(), 1);
        assert!(st.links[0].up);
        assert_eq!(st.links[0].stats.decode.crc_errors, 0);
        st.links[0].payload_crc
    };
    let out = (crc(&h), crc(&g));
    hl.abort();
    gl.abort();
    out
}

fn params(address: &str) -> LinkParams {
    link_params(&address.parse::<Address>().expect("address"), None, 0)
}

#[tokio::test]
async fn a_unix_link_leaves_the_payload_crc_out() {
    let p = params("unix:/run/vstream/lab.sock");
    assert_eq!(payload_crc_on(p, p).await, (false, false));
}

#[tokio::test]
async fn port_and_serial_links_keep_the_payload_crc() {
    let port = params("port:org.vstream.0");
    let serial = params("serial:/dev/ttyS1,baud=115200");
    let serial_socket = link_params(
        &"unix:/tmp/qemu-serial".parse().expect("address"),
        Some(115_200),
        0,
    );
    for (host, guest) in [
        (port, port),
        (serial, serial),
        (serial_socket, serial_socket),
    ] {
        assert_eq!(payload_crc_on(host, guest).await, (true, true));
    }
}

/// A peer that does not offer the capability (as every peer before it) keeps the CRC, even
/// though our side of the link is a socket.
#[tokio::test]
async fn a_peer_without_the_capability_keeps_the_payload_crc() {
    let unix = params("unix:/run/vstream/lab.sock");
    let port = params("port:org.vstream.0");
    assert_eq!(payload_crc_on(unix, port).await, (true, true));
    assert_eq!(payload_crc_on(port, unix).await, (true, true));
}
