//! The device driven by a test guest (vstream-vhost's `Rig`: virtio-queue's mock queues in real
//! guest memory) and real host sockets.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use vstream_vhost::testing::Rig;
use vstream_vhost::{Device, Event};

use super::device::{VsockDevice, BUF_ALLOC, MAX_CONNECTIONS, MAX_RESETS};
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

const CID: u32 = 3;
const MUX: u32 = 5000;
const RX: usize = 0;
const TX: usize = 1;
/// What a Linux guest offers per RX buffer.
const RX_BUF: u32 = 4096 + HEADER_LEN as u32;

struct Guest {
    rig: Rig,
    dev: VsockDevice,
    mux: mpsc::Receiver<(UnixStream, u32)>,
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

fn guest() -> Guest {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&uds).expect("hybrid socket");
    let (tx, mux) = mpsc::channel(1);
    let dev = VsockDevice::new(CID, MUX, Some((uds.clone(), listener)), tx).expect("device");
    Guest {
        rig: Rig::new(3, 256).with_event_idx(),
        dev,
        mux,
        _dir: dir,
        uds,
    }
}

fn header(op: Op, src_port: u32, dst_port: u32, len: usize) -> Header {
    Header {
        src_cid: u64::from(CID),
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: len as u32,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

fn bytes(h: Header, payload: &[u8]) -> Vec<u8> {
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

impl Guest {
    fn send(&mut self, h: Header, payload: &[u8]) {
        self.send_raw(&bytes(h, payload));
    }

    fn send_raw(&mut self, raw: &[u8]) {
        self.rig.add_readable(TX, raw);
        self.rig.run(&mut self.dev, Event::Queue(TX));
    }

    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rig.add_writable(RX, RX_BUF);
        }
        self.rig.run(&mut self.dev, Event::Queue(RX));
    }

    /// Lets the device see its host sockets, as the worker does when its descriptor is readable.
    fn backend(&mut self) -> bool {
        let ready = readable(&self.dev, 1000);
        self.rig.run(&mut self.dev, Event::Backend);
        ready
    }

    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.rig
            .take_written(RX)
            .into_iter()
            .map(|b| {
                let h = Header::read(&b).expect("a header");
                (h, b[HEADER_LEN..].to_vec())
            })
            .collect()
    }

    /// Guest port `port` connects to the mux port; returns the host end.
    fn connect_mux(&mut self, port: u32) -> UnixStream {
        self.send(header(Op::Request, port, MUX, 0), b"");
        let got = self.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, Op::Response as u16);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (MUX, port));
        let (stream, guest_port) = self.mux.try_recv().expect("a mux connection");
        assert_eq!(guest_port, port);
        stream
    }
}

/// Whether the device's own descriptor is readable within `ms`.
fn readable(dev: &VsockDevice, ms: i32) -> bool {
    let fd = dev.backend_fd().expect("backend fd");
    let fd = fd.as_fd();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::time::Timespec {
        tv_sec: i64::from(ms / 1000),
        tv_nsec: i64::from(ms % 1000) * 1_000_000,
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) > 0
}

#[test]
fn a_mux_connection_carries_bytes_both_ways() {
    let mut g = guest();
    g.give_rx(8);
    let mut host = g.connect_mux(1234);
    g.send(header(Op::Rw, 1234, MUX, 5), b"hello");
    let mut got = [0; 5];
    host.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"hello");
    host.write_all(b"world").expect("write");
    assert!(g.backend());
    let got = g.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let (h, payload) = &got[0];
    assert_eq!(h.op, Op::Rw as u16);
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, u64::from(CID)));
    assert_eq!((h.src_port, h.dst_port), (MUX, 1234));
    assert_eq!(payload, b"world");
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    assert_eq!(h.fwd_cnt, 5, "the guest learns what the host consumed");
    // The host closes: the guest is told no more will come; the guest closes: RST.
    drop(host);
    assert!(g.backend());
    let got = g.received();
    assert_eq!(got[0].0.op, Op::Shutdown as u16);
    let mut close = header(Op::Shutdown, 1234, MUX, 0);
    close.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(close, b"");
    assert_eq!(g.received()[0].0.op, Op::Rst as u16);
    assert_eq!(g.dev.connections(), 0);
}

#[test]
fn unknown_ports_and_bad_packets_get_rst_or_are_dropped_never_a_panic() {
    let mut g = guest();
    g.give_rx(16);
    // Nothing listens on port 77 (no <uds>_77) and no connection uses these ports.
    g.send(header(Op::Request, 1, 77, 0), b"");
    g.send(header(Op::Rw, 2, 78, 3), b"abc");
    let got = g.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(h, _)| h.op == Op::Rst as u16));
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (77, 1));
    // Wrong type and unknown op: RST; the header names ports, so the guest can be told.
    let mut seqpacket = header(Op::Request, 3, MUX, 0);
    seqpacket.type_ = 2;
    g.send(seqpacket, b"");
    let mut op = header(Op::Request, 4, MUX, 0);
    op.op = 42;
    g.send(op, b"");
    assert_eq!(g.received().len(), 2);
    // Length beyond the buffer, a short header, another VM's CID, a chain the device cannot
    // read (write-only on the TX queue): dropped silently.
    g.send_raw(&header(Op::Rw, 5, MUX, 1000).encode());
    g.send_raw(&[0; 20]);
    let mut spoofed = header(Op::Request, 6, MUX, 0);
    spoofed.src_cid = 4;
    g.send(spoofed, b"");
    g.rig.add_writable(TX, 64);
    g.rig.run(&mut g.dev, Event::Queue(TX));
    assert!(g.received().is_empty());
    assert!(
        g.mux.try_recv().is_err(),
        "no connection was made from any of it"
    );
    assert_eq!(g.dev.counters().malformed, 6);
    // Every TX chain was returned.
    assert_eq!(g.rig.take_used(TX).len(), 8);
    // And the device still works.
    g.connect_mux(9);
}

#[test]
fn the_guests_credit_is_honoured() {
    let mut g = guest();
    g.give_rx(64);
    let mut request = header(Op::Request, 1234, MUX, 0);
    request.buf_alloc = 10_000;
    g.send(request, b"");
    let _ = g.received();
    let (mut host, _) = g.mux.try_recv().expect("mux");
    host.write_all(&[7; 50_000]).expect("write");
    g.backend();
    let sent: usize = g.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(sent, 10_000, "no more than the guest's buf_alloc");
    // Out of credit: the device asks once, and the host socket is left alone.
    g.backend();
    // The guest consumed 6000 bytes and says so.
    let mut update = header(Op::CreditUpdate, 1234, MUX, 0);
    update.buf_alloc = 10_000;
    update.fwd_cnt = 6000;
    g.send(update, b"");
    let got = g.received();
    let data: usize = got
        .iter()
        .filter(|(h, _)| h.op == Op::Rw as u16)
        .map(|(_, p)| p.len())
        .sum();
    assert_eq!(data, 6000);
    assert!(got.iter().any(|(h, _)| h.op == Op::CreditRequest as u16));
}

#[test]
fn credit_updates_are_sent_when_needed_not_after_every_read() {
    let mut g = guest();
    g.give_rx(64);
    let mut host = g.connect_mux(1234);
    let total = 4 * BUF_ALLOC as usize;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0; total];
        host.read_exact(&mut buf).map(|_| buf.len())
    });
    let mut sent = 0;
    while sent < total {
        g.send(header(Op::Rw, 1234, MUX, 4096), &[1; 4096]);
        sent += 4096;
        // Let the host read, as it would meanwhile.
        if g.dev.buffered() > 0 {
            g.backend();
        }
    }
    assert_eq!(reader.join().expect("reader").expect("read"), total);
    let updates = g
        .received()
        .iter()
        .filter(|(h, _)| h.op == Op::CreditUpdate as u16)
        .count();
    // 256 packets; one update per BUF_ALLOC / 4 consumed.
    assert!(
        (8..=20).contains(&updates),
        "{updates} credit updates for 256 packets"
    );
    let c = g.dev.counters();
    assert_eq!(c.credit_violations, 0);
    // The counters the benchmark reports: the connect and 256 packets, one kick each; every
    // guest byte in, and out to the host socket, at least one write per packet taken whole.
    assert_eq!((c.tx_kicks, c.tx_chains), (257, 257));
    assert_eq!((c.tx_bytes, c.host_bytes), (total as u64, total as u64));
    assert!(
        (256..=256 + c.host_full).contains(&c.host_writes),
        "{} writes, {} times full",
        c.host_writes,
        c.host_full
    );
}

#[test]
fn a_guest_that_stops_reading_its_rx_queue_costs_no_wakeups() {
    let mut g = guest();
    g.give_rx(1);
    let mut host = g.connect_mux(1234);
    // The one RX buffer went to the RESPONSE; the host has lots to say.
    host.set_nonblocking(true).expect("nonblocking");
    let mut written = 0;
    while let Ok(n) = host.write(&[3; 65536]) {
        written += n;
    }
    assert!(g.backend(), "the device hears the host");
    // Nothing to put it in: the descriptor is not readable again (edge triggered), so the
    // worker sleeps, and the host socket keeps what the guest does not take.
    assert!(!readable(&g.dev, 200), "the device would spin");
    assert!(g.received().is_empty());
    // Buffers arrive: the data flows without any new host event.
    g.give_rx(4);
    let got = g.received();
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|(_, p)| p.len() == 4096));
    assert!(written > 4 * 4096);
}

#[test]
fn a_guest_that_overruns_its_credit_loses_that_connection_only() {
    let mut g = guest();
    g.give_rx(16);
    let host_a = g.connect_mux(1);
    let (_peer, b) = UnixStream::pair().expect("pair");
    drop(b);
    // The host never reads connection 1: the guest may send BUF_ALLOC bytes, no more.
    let chunk = vec![9u8; 65536];
    for _ in 0..(BUF_ALLOC as usize / chunk.len()) + 8 {
        g.send(header(Op::Rw, 1, MUX, chunk.len()), &chunk);
        assert!(g.dev.buffered() <= BUF_ALLOC as usize);
    }
    assert_eq!(g.dev.counters().credit_violations, 1);
    assert!(g.received().iter().any(|(h, _)| h.op == Op::Rst as u16));
    assert_eq!(g.dev.connections(), 0);
    assert_eq!(g.dev.buffered(), 0, "its buffer is freed");
    drop(host_a);
    g.connect_mux(2);
}

#[test]
fn the_hybrid_socket_connects_host_programs_to_guest_ports() {
    let mut g = guest();
    g.give_rx(16);
    let mut client = UnixStream::connect(&g.uds).expect("connect");
    client.write_all(b"CONNECT 4321\n").expect("write");
    assert!(g.backend());
    let got = g.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!(req.op, Op::Request as u16);
    assert_eq!(req.dst_port, 4321);
    g.send(header(Op::Response, 4321, req.src_port, 0), b"");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut line = [0; 14];
    client.read_exact(&mut line).expect("OK line");
    assert_eq!(
        std::str::from_utf8(&line).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    g.send(header(Op::Rw, 4321, req.src_port, 4), b"ping");
    let mut got = [0; 4];
    client.read_exact(&mut got).expect("data");
    assert_eq!(&got, b"ping");
    // A guest port nobody listens on: the client's socket closes without an answer.
    let mut refused = UnixStream::connect(&g.uds).expect("connect");
    refused.write_all(b"CONNECT 9\n").expect("write");
    g.backend();
    let req = g.received()[0].0;
    g.send(header(Op::Rst, 9, req.src_port, 0), b"");
    let mut rest = Vec::new();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(refused.read_to_end(&mut rest).expect("eof"), 0);
    // A line that is not CONNECT: closed, nothing sent to the guest.
    let mut junk = UnixStream::connect(&g.uds).expect("connect");
    junk.write_all(b"HELLO there\n").expect("write");
    g.backend();
    assert!(g.received().is_empty());
    let _ = junk.set_read_timeout(Some(Duration::from_secs(5)));
    assert_eq!(junk.read(&mut [0; 8]).unwrap_or(0), 0);
}

#[test]
fn guest_connections_to_other_ports_go_to_the_port_listener() {
    let mut g = guest();
    g.give_rx(8);
    let listener = UnixListener::bind(format!("{}_6000", g.uds.display())).expect("listen");
    g.send(header(Op::Request, 555, 6000, 0), b"");
    assert_eq!(g.received()[0].0.op, Op::Response as u16);
    let (mut accepted, _) = listener.accept().expect("accepted");
    g.send(header(Op::Rw, 555, 6000, 3), b"abc");
    let mut got = [0; 3];
    accepted.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"abc");
}

#[test]
fn floods_of_connects_leave_the_device_bounded() {
    let mut g = guest();
    let _listener = UnixListener::bind(format!("{}_6000", g.uds.display())).expect("listen");
    // Thousands of connects to a port nobody listens on, without reading RX: RSTs are capped.
    for port in 0..5000 {
        g.send(header(Op::Request, port, 80, 0), b"");
    }
    g.give_rx(255);
    assert!(g.received().len() <= MAX_RESETS);
    // Connections to a listening port: at most MAX_CONNECTIONS, the rest refused.
    for port in 0..(MAX_CONNECTIONS as u32 + 20) {
        g.send(header(Op::Request, 10_000 + port, 6000, 0), b"");
    }
    assert_eq!(g.dev.connections(), MAX_CONNECTIONS);
}

/// Wrong direction on the RX queue: a buffer the device can only read cannot take a packet; it
/// is returned empty and counted, and the next, writable, buffer carries the packet.
#[test]
fn a_read_only_rx_buffer_is_returned_empty_and_the_next_one_is_used() {
    let mut g = guest();
    let read_only = g.rig.add_readable(RX, &[0; RX_BUF as usize]);
    g.rig.run(&mut g.dev, Event::Queue(RX));
    // A packet for the guest: the RST for an unknown port.
    g.send(header(Op::Request, 1, 77, 0), b"");
    assert_eq!(g.rig.take_used(RX), vec![(read_only, 0)]);
    assert_eq!(g.dev.counters().malformed, 1);
    g.give_rx(1);
    let got = g.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::Rst as u16);
}

mod misbehaving;

/// Runs the device on its own descriptor's events in another thread: a device that loops on
/// its own events fails the test instead of hanging it.
fn backend_within(g: Guest, what: &str) -> Guest {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut g = g;
        g.backend();
        let _ = done.send(g);
    });
    wait.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("the device never returned from its events: {what}"))
}

#[test]
fn a_guest_half_close_is_passed_on_once_and_the_device_does_not_loop() {
    let mut g = guest();
    g.give_rx(8);
    let mut host = g.connect_mux(1234);
    g.send(header(Op::Rw, 1234, MUX, 3), b"abc");
    let mut close = header(Op::Shutdown, 1234, MUX, 0);
    close.flags = SHUTDOWN_SEND;
    g.send(close, b"");
    // The host sees the bytes, then EOF; its own direction stays open.
    let mut got = Vec::new();
    host.read_to_end(&mut got).expect("read to EOF");
    assert_eq!(got, b"abc");
    // Shutting the host socket's write side wakes the device's own descriptor: one round of
    // events, then quiet (it used to shut it down again on every event, for ever).
    let g = backend_within(g, "after the guest's SHUTDOWN(SEND)");
    assert!(
        !readable(&g.dev, 100),
        "the device's descriptor stays readable"
    );
    host.write_all(b"still open").expect("write");
    let mut g = backend_within(g, "host data after the half close");
    let got = g.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"still open");
    // The host closes too: both sides are done, the guest gets the RST that ends it.
    drop(host);
    g = backend_within(g, "the host's close");
    let ops: Vec<u16> = g.received().iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [Op::Rst as u16], "a clean close ends in RST");
    assert_eq!(g.dev.connections(), 0);
}

#[test]
fn a_host_close_then_the_guests_half_close_ends_the_connection() {
    let mut g = guest();
    g.give_rx(8);
    let host = g.connect_mux(4321);
    // vstreamd drops the link (a session superseded): the guest is told no more will come.
    drop(host);
    let mut g = backend_within(g, "the host's close");
    let ops: Vec<u16> = g.received().iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [Op::Shutdown as u16]);
    // The guest answers with its own SHUTDOWN(SEND), as Linux does on close: RST, connection
    // gone, and the device goes on serving new connections.
    let mut close = header(Op::Shutdown, 4321, MUX, 0);
    close.flags = SHUTDOWN_SEND;
    g.send(close, b"");
    let ops: Vec<u16> = g.received().iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [Op::Rst as u16]);
    assert_eq!(g.dev.connections(), 0);
    let mut g = backend_within(g, "after the close");
    assert!(
        !readable(&g.dev, 100),
        "the device's descriptor stays readable"
    );
    let _next = g.connect_mux(4322);
}
