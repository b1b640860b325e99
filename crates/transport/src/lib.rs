//! Transports: every way vstream can carry a byte stream, behind one address syntax.
//!
//! An [`Address`] is parsed from one string form, the same on the host and in the guest
//! (`unix:PATH`, `tcp-listen:[::1]:5555`, `vsock:2:1024`, `hvsock:/run/fc.sock:1024`,
//! `serial:/dev/ttyS1,baud=921600`, `port:org.vstream.0`, `fd:3`, `stdio`...; the table is on
//! [`Address`]). [`Endpoint::bind`] makes it live and [`Endpoint::next`] gives one
//! [`Connection`] at a time: a [`BoxStream`] of bytes and a description of the peer. The
//! multiplexer above neither knows nor cares which transport it runs on.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use vstream_transport::{Address, Endpoint};
//!
//! let dir = std::env::temp_dir().join(format!("vstream-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("s.sock");
//! let address: Address = format!("unix-listen:{}", path.display()).parse().expect("address");
//! let mut server = Endpoint::bind(address).await?;
//! let mut client = Endpoint::bind(format!("unix:{}", path.display()).parse().expect("address")).await?;
//!
//! let (mut outgoing, mut incoming) = tokio::try_join!(client.next(), server.next())?;
//! outgoing.stream.write_all(b"hello").await?;
//! let mut got = [0; 5];
//! incoming.stream.read_exact(&mut got).await?;
//! assert_eq!(&got, b"hello");
//! # drop(server);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! Everything here is Linux-only (AF_VSOCK, termios, virtio-serial sysfs).

#![deny(missing_docs)]

mod address;
mod endpoint;
mod fd;
mod hvsock;
mod port;
mod retry;
mod serial;
mod tcp;
mod unix;
// The vhost-user vsock device needs the vhost-user crates: vstreamd serves it, the agent never
// does, so it is a feature (on by default; the agent builds without it).
#[cfg(feature = "vhost-user")]
pub mod vhost_vsock;
mod vsock;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::{AsyncRead, AsyncWrite};

pub use address::{
    Address, AddressError, AddressProblem, SerialConfig, VhostVsockConfig, DEFAULT_BAUD, SYNTAX,
};
pub(crate) use endpoint::with_context;
pub use endpoint::Endpoint;
pub use retry::{bind_retrying, Backoff};

/// What the kernel, not the peer, says about who is at the other end of a connection: the
/// ground a guest's identity stands on (docs/THREAT-MODEL.md). Nothing in it was sent by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A peer that connected to a Unix socket we listen on: its credentials when it connected
    /// (`SO_PEERCRED`).
    Unix {
        /// Effective user id.
        uid: u32,
        /// Effective group id.
        gid: u32,
        /// Process id, where the kernel gives one.
        pid: Option<i32>,
    },
    /// A peer that connected over AF_VSOCK: its context id (which VM it is).
    Vsock {
        /// The peer's CID.
        cid: u32,
    },
    /// A peer that connected over TCP: its address, which proves nothing by itself (a key
    /// handshake does; docs/PROTOCOL.md, "Authentication").
    Tcp(std::net::SocketAddr),
    /// A connection this side made, or a device it opened (serial line, virtio-serial port,
    /// inherited descriptor, stdio, in-process pair): the configured address is the proof.
    Opened,
}

/// A byte stream in both directions; every transport's connections are one.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The one descriptor the stream reads and writes, if it has one: what a live upgrade
    /// keeps open across `exec` so that the connection outlives the process (see
    /// [`Connection::adopt`]). `None` for in-process streams and for stdio (two descriptors).
    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Stream for tokio::net::UnixStream {
    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Stream for tokio::net::TcpStream {
    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Stream for tokio_vsock::VsockStream {
    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Stream for tokio::io::DuplexStream {}

/// Two halves joined (e.g. a control connection after its request line): two descriptors, or
/// none, so nothing a live upgrade could keep as one.
impl<R, W> Stream for tokio::io::Join<R, W>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
}

/// A connection's stream, whatever the transport.
pub type BoxStream = Box<dyn Stream>;

/// One connection from an [`Endpoint`].
pub struct Connection {
    /// The bytes.
    pub stream: BoxStream,
    /// Who is at the other end, for people: `unix:/run/x.sock (pid 42, uid 0)`,
    /// `tcp:127.0.0.1:5555`, `vsock:3:1234`, `/dev/ttyS1`, `port:NAME (/dev/vport0p1)`...
    pub peer: String,
    /// Who is at the other end, as the kernel proves it.
    pub identity: PeerIdentity,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Two connected in-process streams (for tests): what one writes the other reads. `capacity` is
/// how many bytes each direction buffers before a writer waits. The peers are `"pair:a"` and
/// `"pair:b"` (each connection's `peer` names the other end).
pub fn pair(capacity: usize) -> (Connection, Connection) {
    let (a, b) = tokio::io::duplex(capacity);
    (
        Connection {
            stream: Box::new(a),
            peer: "pair:b".to_owned(),
            identity: PeerIdentity::Opened,
        },
        Connection {
            stream: Box::new(b),
            peer: "pair:a".to_owned(),
            identity: PeerIdentity::Opened,
        },
    )
}
