//! One vsock connection's state: its host socket, the guest bytes it holds, its credit counters
//! and the control packets it owes the guest.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use super::device::{Counters, BUF_ALLOC};

/// A credit update is sent once the guest has not been told about this many consumed bytes
/// (and on request): not after every read, yet the guest never waits for credit it could have.
const CREDIT_UPDATE_AFTER: u32 = BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// We sent REQUEST for a hybrid-socket client; waiting for RESPONSE or RST.
    Connecting,
    Established,
}

/// One vsock connection.
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) host_port: u32,
    pub(super) guest_port: u32,
    pub(super) state: State,
    /// Guest bytes the host socket did not take yet (at most BUF_ALLOC: the guest's credit).
    pub(super) pending: VecDeque<u8>,
    /// Bytes received from the guest, written to the host socket, and last told to the guest.
    pub(super) rx_cnt: u32,
    pub(super) fwd_cnt: u32,
    pub(super) told_fwd_cnt: u32,
    /// Bytes sent to the guest, and the guest's last buf_alloc / fwd_cnt.
    pub(super) tx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// The host socket had data when last looked at (edge triggered: remembered).
    pub(super) readable: bool,
    pub(super) host_eof: bool,
    pub(super) guest_sent_all: bool,
    /// The host socket's write side was shut down (the guest's SHUTDOWN, all bytes forwarded).
    host_write_shut: bool,
    pub(super) asked_credit: bool,
    /// Control packets owed to the guest.
    pub(super) owe: Owe,
    pub(super) in_ready: bool,
    pub(super) in_control: bool,
}

#[derive(Default, Clone, Copy)]
pub(super) struct Owe {
    pub(super) request: bool,
    pub(super) response: bool,
    pub(super) shutdown: bool,
    pub(super) credit_update: bool,
    pub(super) credit_request: bool,
    pub(super) rst: bool,
}

impl Owe {
    pub(super) fn any(&self) -> bool {
        self.request
            || self.response
            || self.shutdown
            || self.credit_update
            || self.credit_request
            || self.rst
    }
}

impl Conn {
    pub(super) fn new(stream: UnixStream, host_port: u32, guest_port: u32, state: State) -> Conn {
        Conn {
            stream,
            host_port,
            guest_port,
            state,
            pending: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: false,
            host_eof: false,
            guest_sent_all: false,
            host_write_shut: false,
            asked_credit: false,
            owe: Owe::default(),
            in_ready: false,
            in_control: false,
        }
    }

    /// What the guest lets us send now.
    pub(super) fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Both sides are done and every guest byte reached the host socket: the connection ends
    /// (RST to the guest, as the virtio-vsock spec's clean close; the guest would otherwise
    /// wait for it).
    pub(super) fn finished(&self) -> bool {
        self.host_eof && self.guest_sent_all && self.pending.is_empty()
    }

    pub(super) fn wants_to_send(&self) -> bool {
        self.state == State::Established && self.readable && !self.host_eof && self.credit() > 0
    }

    /// Writes pending guest bytes to the host socket; `Err` if the host side is gone.
    pub(super) fn flush(&mut self, counters: &mut Counters) -> io::Result<()> {
        self.forward(&[], counters)
    }

    /// Writes pending guest bytes, then `fresh` ones, to the host socket, and keeps what it
    /// does not take: fresh bytes are copied only when the host is behind.
    pub(super) fn forward(&mut self, mut fresh: &[u8], counters: &mut Counters) -> io::Result<()> {
        loop {
            let pending = self.pending.as_slices().0;
            let (front, from_pending) = if pending.is_empty() {
                (fresh, false)
            } else {
                (pending, true)
            };
            if front.is_empty() {
                break;
            }
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    counters.host_writes += 1;
                    counters.host_bytes += n as u64;
                    if from_pending {
                        self.pending.drain(..n);
                    } else {
                        fresh = &fresh[n..];
                    }
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    counters.host_full += 1;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.pending.extend(fresh);
        // Once only: every shutdown(2) wakes the socket's waiters, so repeating it on each
        // (edge-triggered) write-ready event would make the device's descriptor ready for ever.
        if self.pending.is_empty() && self.guest_sent_all && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        if self.fwd_cnt.wrapping_sub(self.told_fwd_cnt) >= CREDIT_UPDATE_AFTER {
            self.owe.credit_update = true;
        }
        Ok(())
    }
}
