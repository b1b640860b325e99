//! What a link's packet loops move frames to and from: the TAP at either end, or (on the host)
//! a port of the built-in switch.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::tun::Tun;

/// One end of a link's frames: `send` never waits (a full queue drops, as a congested link
/// would), `recv` waits for the next frame.
pub trait Port: Sync {
    /// The next frame, into `buf`; its length.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// The next frame if one is queued, without waiting.
    fn try_recv(&self, buf: &mut [u8]) -> Option<usize>;
    /// Hands one frame on.
    fn send(&self, packet: &[u8]) -> io::Result<()>;
    /// The non-blocking descriptor frames come from (a TAP: one frame per read), if the port
    /// is one: the rings then read frames from it straight into the segment.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Port for Tun {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        Tun::recv(self, buf)
    }

    fn try_recv(&self, buf: &mut [u8]) -> Option<usize> {
        Tun::try_recv(self, buf)
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        Tun::send(self, packet)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}
