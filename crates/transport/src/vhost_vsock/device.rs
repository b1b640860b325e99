//! The virtio-vsock device logic: guest packets in, host sockets out, and back.
//!
//! Every connection has a host Unix socket: a hybrid-socket client's, one to `<uds>_<port>`,
//! or, for the mux port, one end of a socketpair whose other end becomes the transport's
//! connection. Host sockets are watched edge-triggered on the device's own epoll descriptor, so
//! a socket that stays readable while the guest has no RX buffers or no credit costs nothing:
//! its readiness is remembered, and it is read when the guest makes room (no busy loop).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use rustix::event::epoll;
use tokio::sync::mpsc;
use vstream_vhost::{Chain, Device, Event, Vq};

use super::conn::{Conn, Owe, State};
use super::hybrid::{connect_port, parse_connect, Handshake};
use super::packet::{
    self, Header, Op, HEADER_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// The receive buffer the device offers the guest per connection (its `buf_alloc`): the most
/// guest bytes one connection can make it hold while the host side does not read.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Connections per guest; with [`BUF_ALLOC`], the most one guest can make the device buffer
/// is 16 MiB.
pub const MAX_CONNECTIONS: usize = 64;
/// Hybrid-socket clients that have not yet sent their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 16;
/// RSTs waiting for RX buffers (answers to packets for unknown connections); more are dropped
/// (the guest's connect then times out).
pub const MAX_RESETS: usize = 256;
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First host port given to a hybrid-socket client (as Firecracker does).
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Guest bytes (its wrapping count) after which a connection's end is logged with the
/// device's counters (a transfer, not a connect or a flood, which a host socket that does not
/// read caps at [`BUF_ALLOC`]).
const LOG_AFTER: u32 = 4 * BUF_ALLOC;

const RX: usize = 0;
const TX: usize = 1;
const LISTENER: u64 = 0;

/// Counters, for tests and status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Chains or packets dropped as malformed.
    pub malformed: u64,
    /// RSTs sent.
    pub resets: u64,
    /// Credit updates sent.
    pub credit_updates: u64,
    /// Connections whose guest overran the credit it was given (reset).
    pub credit_violations: u64,
    /// TX queue kicks handled.
    pub tx_kicks: u64,
    /// TX chains taken.
    pub tx_chains: u64,
    /// Guest payload bytes received (RW packets).
    pub tx_bytes: u64,
    /// Writes to host sockets that took bytes.
    pub host_writes: u64,
    /// Bytes written to host sockets.
    pub host_bytes: u64,
    /// Times a host socket was full while guest bytes were waiting (the host reader behind).
    pub host_full: u64,
}

/// The device.
pub struct VsockDevice {
    cid: u64,
    mux_port: u32,
    uds: Option<PathBuf>,
    epoll: OwnedFd,
    listener: Option<UnixListener>,
    mux: mpsc::Sender<(UnixStream, u32)>,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    next_host_port: u32,
    control: VecDeque<u64>,
    resets: VecDeque<Header>,
    ready: VecDeque<u64>,
    /// An RX chain taken but not filled (its work vanished): used first next time.
    spare: Option<Chain>,
    counters: Counters,
}

impl VsockDevice {
    /// A device for guest `cid`: guest connections to host port `mux_port` are sent to `mux`;
    /// (with the guest's port) `listener` is the hybrid socket (`uds`), whose `<uds>_<port>` paths take guest
    /// connections to other ports.
    pub fn new(
        cid: u32,
        mux_port: u32,
        uds: Option<(PathBuf, UnixListener)>,
        mux: mpsc::Sender<(UnixStream, u32)>,
    ) -> io::Result<VsockDevice> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let (uds, listener) = match uds {
            Some((path, l)) => {
                l.set_nonblocking(true)?;
                epoll::add(
                    &epoll,
                    &l,
                    epoll::EventData::new_u64(LISTENER),
                    epoll::EventFlags::IN | epoll::EventFlags::ET,
                )?;
                (Some(path), Some(l))
            }
            None => (None, None),
        };
        Ok(VsockDevice {
            cid: u64::from(cid),
            mux_port,
            uds,
            epoll,
            listener,
            mux,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: LISTENER + 1,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            resets: VecDeque::new(),
            ready: VecDeque::new(),
            spare: None,
            counters: Counters::default(),
        })
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes held for host sockets that do not read, over all connections.
    pub fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.pending.len()).sum()
    }

    fn header(&self, conn: &Conn, op: Op, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: conn.host_port,
            dst_port: conn.guest_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
        }
    }

    /// Queues a RST answering `to` (a guest packet naming no connection of ours).
    fn reset_unknown(&mut self, to: &Header) {
        if self.resets.len() >= MAX_RESETS {
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn register(&mut self, stream: &UnixStream) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        epoll::add(
            &self.epoll,
            stream,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN
                | epoll::EventFlags::OUT
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::ET,
        )?;
        Ok(token)
    }

    fn add_conn(&mut self, conn: Conn) -> Option<u64> {
        let token = self.register(&conn.stream).ok()?;
        self.by_ports
            .insert((conn.host_port, conn.guest_port), token);
        self.conns.insert(token, conn);
        Some(token)
    }

    fn remove(&mut self, token: u64) -> Option<Conn> {
        let conn = self.conns.remove(&token)?;
        if conn.rx_cnt >= LOG_AFTER {
            self.log_end(&conn);
        }
        self.by_ports.remove(&(conn.host_port, conn.guest_port));
        self.ready.retain(|t| *t != token);
        self.control.retain(|t| *t != token);
        // Closing the socket removes it from the epoll set.
        Some(conn)
    }

    /// The running totals, so that a benchmark can tell where a transfer's time went. Only for
    /// connections that carried [`LOG_AFTER`] guest bytes, and out of line: a guest that churns
    /// connections (the misbehaving-guest test) was measurably slowed by it otherwise.
    #[cold]
    #[inline(never)]
    fn log_end(&self, conn: &Conn) {
        tracing::debug!(
            cid = self.cid,
            host_port = conn.host_port,
            guest_port = conn.guest_port,
            "vsock: connection ended; {:?}",
            self.counters
        );
    }

    /// Ends a connection and tells the guest.
    fn abort(&mut self, token: u64) {
        if let Some(conn) = self.remove(token) {
            let h = self.header(&conn, Op::Rst, 0, 0);
            if self.resets.len() < MAX_RESETS {
                self.resets.push_back(h);
            }
        }
    }

    fn owe(&mut self, token: u64, f: impl FnOnce(&mut Owe)) {
        if let Some(conn) = self.conns.get_mut(&token) {
            f(&mut conn.owe);
            if !conn.in_control && conn.owe.any() {
                conn.in_control = true;
                self.control.push_back(token);
            }
        }
    }

    fn maybe_ready(&mut self, token: u64) {
        if self.conns.get(&token).is_some_and(Conn::finished) {
            return self.abort(token);
        }
        if let Some(conn) = self.conns.get_mut(&token) {
            if conn.owe.credit_update && !conn.in_control {
                conn.in_control = true;
                self.control.push_back(token);
            }
            if conn.wants_to_send() && !conn.in_ready {
                conn.in_ready = true;
                self.ready.push_back(token);
            } else if conn.state == State::Established
                && conn.readable
                && !conn.host_eof
                && conn.credit() == 0
                && !conn.asked_credit
            {
                conn.asked_credit = true;
                self.owe(token, |o| o.credit_request = true);
            }
        }
    }

    /// One packet from the guest's TX queue.
    pub fn on_packet(&mut self, bytes: &[u8]) {
        let pkt = match packet::parse(bytes, self.cid) {
            Ok(p) => p,
            Err((header, e)) => {
                self.counters.malformed += 1;
                tracing::debug!(
                    cid = self.cid,
                    "vsock: dropped a packet from the guest: {e}"
                );
                if let (Some(h), true) = (header, e.answer_rst()) {
                    if h.op != Op::Rst as u16 {
                        self.reset_unknown(&h);
                    }
                }
                return;
            }
        };
        let h = pkt.header;
        let token = self.by_ports.get(&(h.dst_port, h.src_port)).copied();
        if let Some(conn) = token.and_then(|t| self.conns.get_mut(&t)) {
            if (conn.peer_buf_alloc, conn.peer_fwd_cnt) != (h.buf_alloc, h.fwd_cnt) {
                conn.asked_credit = false;
            }
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
        }
        match (pkt.op, token) {
            (Op::Rst, Some(t)) => {
                self.remove(t);
            }
            (Op::Rst, None) => {}
            (Op::Request, Some(t)) => {
                // A second connect on a live pair of ports: both are void.
                self.remove(t);
                self.reset_unknown(&h);
            }
            (Op::Request, None) => self.guest_connects(&h),
            (Op::Response, Some(t)) => self.connected(t),
            (Op::Shutdown, Some(t)) => {
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.abort(t);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    if let Some(conn) = self.conns.get_mut(&t) {
                        conn.guest_sent_all = true;
                        if conn.flush(&mut self.counters).is_err() {
                            self.abort(t);
                        }
                    }
                }
            }
            (Op::Rw, Some(t)) => self.guest_data(t, pkt.payload),
            (Op::CreditUpdate, Some(_)) => {}
            (Op::CreditRequest, Some(t)) => self.owe(t, |o| o.credit_update = true),
            (_, None) => self.reset_unknown(&h),
        }
        if let Some(t) = token {
            self.maybe_ready(t);
        }
    }

    fn guest_connects(&mut self, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.reset_unknown(h);
        }
        let stream = if h.dst_port == self.mux_port {
            let Ok((ours, theirs)) = UnixStream::pair() else {
                return self.reset_unknown(h);
            };
            if self.mux.try_send((theirs, h.src_port)).is_err() {
                tracing::debug!(
                    cid = self.cid,
                    "vsock: mux connection refused: one is waiting"
                );
                return self.reset_unknown(h);
            }
            ours
        } else {
            match self.uds.as_ref().map(|uds| connect_port(uds, h.dst_port)) {
                Some(Ok(s)) => s,
                _ => return self.reset_unknown(h),
            }
        };
        if stream.set_nonblocking(true).is_err() {
            return self.reset_unknown(h);
        }
        let mut conn = Conn::new(stream, h.dst_port, h.src_port, State::Established);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match self.add_conn(conn) {
            Some(t) => self.owe(t, |o| o.response = true),
            None => self.reset_unknown(h),
        }
    }

    fn connected(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.state != State::Connecting {
            return self.abort(token);
        }
        conn.state = State::Established;
        let ok = format!("OK {}\n", conn.host_port);
        // A fresh socket's buffer takes a short line whole; if not, the client is broken.
        if conn.stream.write(ok.as_bytes()).ok() != Some(ok.len()) {
            self.abort(token);
        }
    }

    fn guest_data(&mut self, token: u64, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let room = BUF_ALLOC as usize - conn.pending.len();
        if conn.state != State::Established || conn.guest_sent_all || payload.len() > room {
            // Sent beyond the credit we gave (or after saying it would not): the guest is
            // broken or hostile; the connection ends, the device and other connections do not.
            self.counters.credit_violations += 1;
            return self.abort(token);
        }
        conn.rx_cnt = conn.rx_cnt.wrapping_add(payload.len() as u32);
        self.counters.tx_bytes += payload.len() as u64;
        if conn.forward(payload, &mut self.counters).is_err() {
            self.abort(token);
        }
    }

    /// Drains the device's epoll descriptor.
    fn on_backend(&mut self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        loop {
            events.clear();
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&zero),
            ) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            for ev in &events {
                let (token, flags) = (ev.data.u64(), ev.flags);
                if token == LISTENER {
                    self.accept();
                } else if self.handshakes.contains_key(&token) {
                    self.handshake(token);
                } else if let Some(conn) = self.conns.get_mut(&token) {
                    if flags.intersects(
                        epoll::EventFlags::IN
                            | epoll::EventFlags::RDHUP
                            | epoll::EventFlags::HUP
                            | epoll::EventFlags::ERR,
                    ) {
                        conn.readable = true;
                    }
                    if flags.contains(epoll::EventFlags::OUT)
                        && conn.flush(&mut self.counters).is_err()
                    {
                        self.abort(token);
                        continue;
                    }
                    self.maybe_ready(token);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.handshakes.len() >= MAX_HANDSHAKES
                || self.conns.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                continue; // dropped: the client sees the socket close
            }
            let Ok(token) = self.register(&stream) else {
                continue;
            };
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            self.handshake(token);
        }
    }

    /// Reads a hybrid client's `CONNECT <port>\n`, a byte at a time so that nothing after the
    /// line is taken from the socket.
    fn handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8];
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(1) if hs.line.len() < MAX_CONNECT_LINE => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let _ = epoll::delete(&self.epoll, &hs.stream);
        let Some(guest_port) = port else {
            return;
        };
        let mut host_port = self.next_host_port;
        while self.by_ports.contains_key(&(host_port, guest_port)) {
            host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let conn = Conn::new(hs.stream, host_port, guest_port, State::Connecting);
        if let Some(t) = self.add_conn(conn) {
            self.owe(t, |o| o.request = true);
        }
    }

    /// Fills the guest's RX buffers: control packets first, then data, round robin over the
    /// connections that have some and credit for it.
    fn fill_rx(&mut self, rx: &mut Vq<'_>) {
        loop {
            if self.resets.is_empty() && self.control.is_empty() && self.ready.is_empty() {
                return;
            }
            let chain = match self.spare.take() {
                Some(c) => c,
                None => match rx.pop() {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        self.counters.malformed += 1;
                        tracing::debug!(cid = self.cid, "vsock: bad RX chain: {e}");
                        continue;
                    }
                    // No buffer: the work waits for the guest's next RX kick.
                    None => return,
                },
            };
            if chain.writable_len() < HEADER_LEN as u64 {
                self.counters.malformed += 1;
                rx.add_used(chain.head, 0);
                continue;
            }
            match self.next_packet(&chain, rx) {
                Some(len) => rx.add_used(chain.head, len),
                None => self.spare = Some(chain),
            }
        }
    }

    /// Writes the next packet into `chain`; `None` if there was nothing after all.
    fn next_packet(&mut self, chain: &Chain, rx: &Vq<'_>) -> Option<u32> {
        let mem = rx.mem();
        if let Some(h) = self.resets.pop_front() {
            self.counters.resets += 1;
            return chain.write(mem, &[&h.encode()]).ok();
        }
        if let Some(token) = self.control.pop_front() {
            let conn = self.conns.get_mut(&token)?;
            conn.in_control = false;
            let o = &mut conn.owe;
            let (op, flags) = if o.request {
                o.request = false;
                (Op::Request, 0)
            } else if o.response {
                o.response = false;
                (Op::Response, 0)
            } else if o.shutdown {
                o.shutdown = false;
                (Op::Shutdown, SHUTDOWN_SEND)
            } else if o.credit_update {
                o.credit_update = false;
                self.counters.credit_updates += 1;
                (Op::CreditUpdate, 0)
            } else if o.credit_request {
                o.credit_request = false;
                (Op::CreditRequest, 0)
            } else {
                return None;
            };
            let more = conn.owe.any();
            conn.told_fwd_cnt = conn.fwd_cnt;
            let conn = &self.conns[&token];
            let h = self.header(conn, op, 0, flags);
            if more {
                self.owe(token, |_| {});
            }
            return chain.write(mem, &[&h.encode()]).ok();
        }
        let token = self.ready.pop_front()?;
        let room = usize::try_from(chain.writable_len())
            .unwrap_or(usize::MAX)
            .saturating_sub(HEADER_LEN);
        let conn = self.conns.get_mut(&token)?;
        conn.in_ready = false;
        if !conn.wants_to_send() || room == 0 {
            return None;
        }
        let want = room.min(MAX_PAYLOAD).min(conn.credit() as usize);
        // Straight into the guest's buffer, after the header's place (written once the
        // length is known): the bytes are not copied through the device.
        match chain.read_into(mem, HEADER_LEN, want, &mut conn.stream) {
            Ok(0) => {
                conn.host_eof = true;
                if conn.finished() {
                    self.abort(token);
                } else {
                    self.owe(token, |o| o.shutdown = true);
                }
                None
            }
            Ok(n) => {
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                // The data's header tells the guest fwd_cnt: no separate update needed.
                conn.told_fwd_cnt = conn.fwd_cnt;
                conn.owe.credit_update = false;
                let conn = &self.conns[&token];
                let h = self.header(conn, Op::Rw, n as u32, 0);
                let written = chain.write(mem, &[&h.encode()]).ok();
                self.maybe_ready(token);
                written.map(|_| (HEADER_LEN + n) as u32)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.readable = false;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.maybe_ready(token);
                None
            }
            Err(_) => {
                self.abort(token);
                None
            }
        }
    }
}

impl Device for VsockDevice {
    fn num_queues(&self) -> usize {
        // rx, tx, event
        3
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        self.cid.to_le_bytes().to_vec()
    }

    fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }

    fn reset(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove(t);
        }
        for (_, hs) in self.handshakes.drain() {
            let _ = epoll::delete(&self.epoll, &hs.stream);
        }
        self.resets.clear();
        self.spare = None;
    }

    fn handle(&mut self, event: Event, queues: &mut [Vq<'_>]) {
        match event {
            // Host sockets are served even before the guest's memory is known (no queues then):
            // their readiness is remembered for when the guest has buffers.
            Event::Backend => self.on_backend(),
            Event::Queue(TX) if queues.len() > TX => {
                self.counters.tx_kicks += 1;
                let tx = &mut queues[TX];
                while let Some(chain) = tx.pop() {
                    self.counters.tx_chains += 1;
                    let chain = match chain {
                        Ok(c) => c,
                        Err(e) => {
                            self.counters.malformed += 1;
                            tracing::debug!(cid = self.cid, "vsock: bad TX chain: {e}");
                            continue;
                        }
                    };
                    match chain.read_all(tx.mem(), HEADER_LEN + MAX_PAYLOAD) {
                        Ok(bytes) => self.on_packet(&bytes),
                        Err(e) => {
                            self.counters.malformed += 1;
                            tracing::debug!(cid = self.cid, "vsock: bad TX chain: {e}");
                        }
                    }
                    tx.add_used(chain.head, 0);
                }
            }
            // RX: buffers arrived; event queue: nothing to do (no transport reset events).
            Event::Queue(_) => {}
        }
        if let Some(rx) = queues.get_mut(RX) {
            self.fill_rx(rx);
        }
    }
}
