//! The `vhost-user-vsock:` transport: vstreamd is the guest's virtio-vsock device.
//!
//! The VMM (QEMU's `vhost-user-vsock-pci`, or any vhost-user frontend) connects to the
//! vhost-user socket and hands over the device's queues; [`device::VsockDevice`] runs on the
//! shared plumbing of `vstream-vhost`. Guest connections to the configured host port are this
//! transport's connections, with the configured CID as the peer's identity: the VM is known by
//! the socket its device is served on, never by anything the guest says. Host programs reach
//! guest ports through the hybrid socket, as with Firecracker and Cloud Hypervisor.

mod conn;
pub mod device;
mod hybrid;
pub mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};

use tokio::sync::mpsc;

use crate::address::{Address, VhostVsockConfig};
use crate::{with_context, Connection, PeerIdentity};

/// A served device, and the guest connections to its mux port as they come.
pub(crate) struct VhostVsock {
    config: VhostVsockConfig,
    incoming: mpsc::Receiver<(UnixStream, u32)>,
    _server: vstream_vhost::Server,
}

/// Starts serving the device described by `config` (`addr` is for error messages).
pub(crate) fn bind(addr: &Address, config: &VhostVsockConfig) -> io::Result<VhostVsock> {
    let uds = match &config.uds {
        Some(path) => {
            // A stale socket file from an earlier run is replaced, as for unix-listen.
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .map_err(with_context(addr, "cannot listen on the hybrid socket"))?;
            Some((path.clone(), listener))
        }
        None => None,
    };
    // One guest connection may wait while the previous one is still being served; more are
    // refused (RST) and the agent tries again.
    let (tx, incoming) = mpsc::channel(1);
    let device = device::VsockDevice::new(config.cid, config.port, uds, tx)
        .map_err(with_context(addr, "cannot create the device"))?;
    let server = vstream_vhost::serve("vsock", &config.socket, device)
        .map_err(with_context(addr, "cannot serve vhost-user"))?;
    Ok(VhostVsock {
        config: config.clone(),
        incoming,
        _server: server,
    })
}

impl VhostVsock {
    /// The next guest connection to the mux port.
    pub(crate) async fn accept(&mut self, addr: &Address) -> io::Result<Connection> {
        let (stream, guest_port) = self.incoming.recv().await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::BrokenPipe, format!("{addr}: device stopped"))
        })?;
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        Ok(Connection {
            stream: Box::new(stream),
            peer: format!(
                "vsock:{}:{guest_port} (vhost-user {})",
                self.config.cid,
                self.config.socket.display()
            ),
            identity: PeerIdentity::Vsock {
                cid: self.config.cid,
            },
        })
    }
}
