//! Real Unix sockets, cut again and again in the middle of a bulk transfer on 4 channels: every
//! byte arrives once, in order (CRC-32C and length compared at both ends). Through
//! `AsyncWrite`/`AsyncRead` (plain and vectored writes), and through `write_bytes`/`read_bytes`
//! (the zero-copy calls).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vstream_link::Mux;
use vstream_wire::{Config, LinkParams, Role};

const CHANNELS: usize = 4;

/// Fast deterministic bytes (xorshift64*), seeded per channel.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// How the applications at both ends write and read.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    /// `AsyncWrite::write_all` / `AsyncRead::read`.
    Stream,
    /// `write_all_buf` of two slices, a few bytes then the rest (as a record's header and
    /// its payload are written), which tokio writes vectored / `AsyncRead::read`.
    Vectored,
    /// `write_bytes` / `read_bytes`.
    Bytes,
}

/// How the applications write and read, and the link parameters.
#[derive(Clone, Copy)]
struct Mode {
    api: Api,
    params: LinkParams,
}

/// `AsyncWrite`/`AsyncRead` on a virtio-serial-like link (payload CRC kept).
fn streams() -> Mode {
    Mode {
        api: Api::Stream,
        params: LinkParams::stream(0),
    }
}

async fn transfer_with_cuts(per_channel: u64, cuts: usize, seed: u64, mode: Mode) {
    let (host, mut incoming) = Mux::new(Config::new(Role::Host, "host"), 11);
    let (guest, _none) = Mux::new(Config::new(Role::Guest, "guest"), 22);
    let received = Arc::new(AtomicU64::new(0));

    // Receivers on the host: count and checksum.
    let rx_received = received.clone();
    let receivers = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..CHANNELS {
            let inc = incoming.recv().await.expect("channel opened");
            let counter = rx_received.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = inc.stream;
                let mut buf = vec![0u8; 128 * 1024];
                let (mut n, mut crc) = (0u64, 0u32);
                loop {
                    let own;
                    let data = if mode.api == Api::Bytes {
                        own = s.read_bytes(buf.len()).await.expect("read");
                        &own[..]
                    } else {
                        let k = s.read(&mut buf).await.expect("read");
                        &buf[..k]
                    };
                    let k = data.len();
                    if k == 0 {
                        break;
                    }
                    crc = crc32c::crc32c_append(crc, data);
                    n += k as u64;
                    counter.fetch_add(k as u64, Ordering::Relaxed);
                }
                (inc.name, n, crc)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("receiver"));
        }
        out.sort();
        out
    });

    // Senders on the guest.
    let mut senders = Vec::new();
    for k in 0..CHANNELS {
        let guest = guest.clone();
        senders.push(tokio::spawn(async move {
            let mut s = guest.open("bulk", &format!("ch{k}")).await.expect("open");
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (k as u64 + 1);
            let mut buf = vec![0u8; 64 * 1024];
            let (mut sent, mut crc) = (0u64, 0u32);
            while sent < per_channel {
                let n = (per_channel - sent).min(buf.len() as u64) as usize;
                fill(&mut state, &mut buf[..n]);
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                match mode.api {
                    Api::Bytes => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        s.write_bytes(data).await.expect("write");
                    }
                    Api::Vectored => {
                        let head = (sent % 9) as usize % (n + 1);
                        let mut two = Buf::chain(&buf[..head], &buf[head..n]);
                        s.write_all_buf(&mut two).await.expect("write");
                    }
                    Api::Stream => s.write_all(&buf[..n]).await.expect("write"),
                }
                sent += n as u64;
            }
            s.shutdown().await.expect("shutdown");
            // Keep the stream until the peer has read everything (drop would still deliver).
            (format!("ch{k}"), sent, crc)
        }));
    }

    // The transport: a socket pair, cut at random points of the transfer.
    let total = per_channel * CHANNELS as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut offsets: Vec<u64> = (0..cuts).map(|_| rng.random_range(0..total)).collect();
    offsets.sort_unstable();
    let mut done_cuts = 0;
    let transport = tokio::spawn({
        let (host, guest, received) = (host.clone(), guest.clone(), received.clone());
        async move {
            for at in offsets.into_iter().map(Some).chain(std::iter::once(None)) {
                let (a, b) = StdUnixStream::pair().expect("socketpair");
                let cutter = a.try_clone().expect("dup");
                a.set_nonblocking(true).expect("nonblocking");
                b.set_nonblocking(true).expect("nonblocking");
                let (a, b) = (
                    UnixStream::from_std(a).expect("a"),
                    UnixStream::from_std(b).expect("b"),
                );
                let h = tokio::spawn({
                    let host = host.clone();
                    async move { host.run_link(a, mode.params, "unix:pair", &[]).await }
                });
                let g = tokio::spawn({
                    let guest = guest.clone();
                    async move { guest.run_link(b, mode.params, "unix:pair", &[]).await }
                });
                let Some(at) = at else {
                    // Last connection: stays up until the test ends.
                    return (done_cuts, h, g);
                };
                while received.load(Ordering::Relaxed) < at {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                cutter.shutdown(std::net::Shutdown::Both).expect("cut");
                let _ = h.await;
                let _ = g.await;
                done_cuts += 1;
            }
            unreachable!("the last iteration returns")
        }
    });

    let got = tokio::time::timeout(Duration::from_secs(600), receivers)
        .await
        .expect("transfer finished")
        .expect("receivers");
    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await.expect("sender"));
    }
    sent.sort();
    assert_eq!(
        got, sent,
        "every channel's length and CRC must match at both ends"
    );
    assert!(got.iter().all(|(_, n, _)| *n == per_channel));
    let (n, _h, _g) = transport.await.expect("transport");
    assert_eq!(n, cuts);
    let st = host.status();
    eprintln!(
        "{cuts} cuts, received {:?}, guest stats {:?}",
        got,
        guest.status().stats
    );
    assert_eq!(
        st.stats.session.session_restarts, 0,
        "every cut must resume, never restart"
    );
    if cuts > 0 {
        assert!(
            guest.status().stats.session.frames_retransmitted > 0,
            "cuts mid-transfer must cause retransmissions"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_channels_64_mib_each_with_100_cuts() {
    transfer_with_cuts(64 * 1024 * 1024, 100, 2026, streams()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_api_without_payload_crc_with_50_cuts() {
    let mode = Mode {
        api: Api::Bytes,
        params: LinkParams::socket(0),
    };
    transfer_with_cuts(16 * 1024 * 1024, 50, 7, mode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectored_writes_with_30_cuts() {
    let mode = Mode {
        api: Api::Vectored,
        ..streams()
    };
    transfer_with_cuts(8 * 1024 * 1024, 30, 11, mode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncut_transfer_is_intact() {
    transfer_with_cuts(8 * 1024 * 1024, 0, 1, streams()).await;
}
