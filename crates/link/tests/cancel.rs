//! A link whose task is aborted (a daemon dropping a transport, an in-process agent dropped)
//! leaves the session at once: the stream closes, so the peer sees the link end, and the
//! session no longer counts it, while the mux itself lives on.

use std::time::Duration;

use tokio::net::UnixStream;
use vstream_link::{LinkEnded, Mux};
use vstream_wire::{Config, LinkParams, Role};

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_link_task_closes_its_stream_and_leaves_the_session() {
    let (host, _incoming) = Mux::new(Config::new(Role::Host, "host"), 11);
    let (guest, _none) = Mux::new(Config::new(Role::Guest, "guest"), 22);
    let (a, b) = UnixStream::pair().expect("socketpair");
    let h = host.clone();
    let host_link =
        tokio::spawn(async move { h.run_link(a, LinkParams::stream(0), "host end", &[]).await });
    let g = guest.clone();
    let guest_link =
        tokio::spawn(async move { g.run_link(b, LinkParams::stream(0), "guest end", &[]).await });
    until("both ends up", || {
        host.is_connected() && guest.is_connected()
    })
    .await;

    guest_link.abort();
    // The host's link ends because the stream closed, not by a keepalive timeout.
    let ended = tokio::time::timeout(Duration::from_secs(5), host_link)
        .await
        .expect("the host's link ended within 5 s")
        .expect("the host's link task");
    assert!(
        matches!(ended, LinkEnded::ClosedByPeer),
        "the host's link ended with {ended:?}"
    );
    until("the guest's session without the link", || {
        !guest.is_connected()
    })
    .await;
    assert!(
        guest.status().links.is_empty(),
        "{:?}",
        guest.status().links
    );
}
