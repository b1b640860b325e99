//! The `vsock:CID:PORT` and `vsock-listen:PORT` transports (AF_VSOCK through tokio-vsock).
//!
//! Listening binds `VMADDR_CID_ANY`. The kernel gives up on a connection attempt after its
//! connect timeout (2 s by default) when nothing answers, e.g. CID 1 without the
//! `vsock_loopback` module.

use std::io;

use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::address::Address;
use crate::{with_context, Connection, PeerIdentity};

/// Connects to `cid:port`.
pub(crate) async fn connect(addr: &Address, cid: u32, port: u32) -> io::Result<Connection> {
    let stream = VsockStream::connect(VsockAddr::new(cid, port))
        .await
        .map_err(with_context(addr, "cannot connect"))?;
    Ok(Connection {
        stream: Box::new(stream),
        peer: format!("vsock:{cid}:{port}"),
        identity: PeerIdentity::Opened,
    })
}

/// Binds `port` on every CID; returns the listener and the address with the port actually bound
/// (which differs when `port` is `VMADDR_PORT_ANY`, 4294967295).
pub(crate) fn bind(addr: &Address, port: u32) -> io::Result<(VsockListener, Address)> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(with_context(addr, "cannot listen"))?;
    let bound = listener
        .local_addr()
        .map_err(with_context(addr, "cannot read the bound address"))?;
    Ok((listener, Address::VsockListen { port: bound.port() }))
}

/// Accepts one connection.
pub(crate) async fn accept(addr: &Address, listener: &VsockListener) -> io::Result<Connection> {
    let (stream, peer) = listener
        .accept()
        .await
        .map_err(with_context(addr, "cannot accept"))?;
    Ok(Connection {
        stream: Box::new(stream),
        peer: format!("vsock:{}:{}", peer.cid(), peer.port()),
        identity: PeerIdentity::Vsock { cid: peer.cid() },
    })
}
