//! [`Endpoint`]: an [`Address`] made live.

use std::fmt;
use std::io;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio_vsock::VsockListener;

use crate::address::{Address, SerialConfig};
use crate::fd::InheritedFd;
use crate::port::PortDevice;
use crate::{fd, hvsock, serial, tcp, unix, vsock, Connection};

/// An [`Address`] made live: the source of a transport's connections.
///
/// [`Endpoint::bind`] prepares, [`Endpoint::next`] gives one [`Connection`] per call:
///
/// | address | `bind` | each `next` |
/// | --- | --- | --- |
/// | `unix:`, `tcp:`, `vsock:`, `hvsock:` | nothing | one connection attempt, no retry (the caller has its own backoff) |
/// | `unix-listen:`, `tcp-listen:`, `vsock-listen:` | binds and listens | accepts one connection |
/// | `vhost-user-vsock:` | serves the device (vhost-user socket, hybrid socket) | accepts one guest connection to the mux port |
/// | `serial:` | nothing | opens and sets up the tty afresh |
/// | `port:` | nothing | opens the virtio-serial port and waits until the host side is connected (see below) |
/// | `fd:N` | takes ownership of descriptor N (fails if it is not open) | the first call hands it out, later calls fail |
/// | `stdio` | nothing | the first call hands out stdin+stdout, later calls fail |
///
/// For `port:NAME`, a connection ends (reads end of file) when the host side closes the port;
/// drop it and call `next` again, which waits (checking every 200 ms, without spinning) until the
/// host opens the port again. `next` fails if no port has that name.
///
/// Errors say which address failed and why, and keep the underlying [`io::ErrorKind`].
///
/// Dropping a `next` future loses nothing for listeners (no connection is accepted and then
/// dropped); for the others it abandons the attempt and closes what it had opened.
pub struct Endpoint {
    address: Address,
    state: State,
}

/// What `next` does, with what it needs.
enum State {
    ConnectUnix(PathBuf),
    ConnectTcp {
        host: String,
        port: u16,
    },
    ConnectVsock {
        cid: u32,
        port: u32,
    },
    ConnectHybridVsock {
        path: PathBuf,
        port: u32,
    },
    OpenSerial(SerialConfig),
    OpenPort(PortDevice),
    AcceptUnix(unix::Listener),
    AcceptTcp(TcpListener),
    AcceptVsock(VsockListener),
    #[cfg(feature = "vhost-user")]
    ServeVhostVsock(crate::vhost_vsock::VhostVsock),
    Inherited(InheritedFd),
    Stdio {
        used: bool,
    },
}

impl Endpoint {
    /// Makes `addr` live: listeners bind here, `fd:N` takes its descriptor, the rest only note
    /// the address.
    ///
    /// For `tcp-listen:HOST:0` and `vsock-listen:4294967295` the kernel picks the port, and
    /// [`Endpoint::address`] shows which.
    pub async fn bind(addr: Address) -> io::Result<Endpoint> {
        let (address, state) = match &addr {
            Address::Unix(path) => (addr.clone(), State::ConnectUnix(path.clone())),
            Address::Tcp { host, port } => (
                addr.clone(),
                State::ConnectTcp {
                    host: host.clone(),
                    port: *port,
                },
            ),
            Address::Vsock { cid, port } => (
                addr.clone(),
                State::ConnectVsock {
                    cid: *cid,
                    port: *port,
                },
            ),
            Address::HybridVsock { path, port } => (
                addr.clone(),
                State::ConnectHybridVsock {
                    path: path.clone(),
                    port: *port,
                },
            ),
            Address::Serial(config) => (addr.clone(), State::OpenSerial(config.clone())),
            Address::Port(name) => (addr.clone(), State::OpenPort(PortDevice::new(name))),
            Address::UnixListen(path) => {
                let listener = unix::Listener::bind(&addr, path).await?;
                (addr.clone(), State::AcceptUnix(listener))
            }
            Address::TcpListen { host, port } => {
                let (listener, bound) = tcp::bind(&addr, host, *port).await?;
                (bound, State::AcceptTcp(listener))
            }
            Address::VsockListen { port } => {
                let (listener, bound) = vsock::bind(&addr, *port)?;
                (bound, State::AcceptVsock(listener))
            }
            #[cfg(feature = "vhost-user")]
            Address::VhostUserVsock(config) => (
                addr.clone(),
                State::ServeVhostVsock(crate::vhost_vsock::bind(&addr, config)?),
            ),
            #[cfg(not(feature = "vhost-user"))]
            Address::VhostUserVsock(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{addr}: this program is built without vhost-user devices"),
                ))
            }
            Address::Fd(number) => (
                addr.clone(),
                State::Inherited(InheritedFd::claim(&addr, *number)?),
            ),
            Address::Stdio => (addr.clone(), State::Stdio { used: false }),
        };
        tracing::debug!(%address, "endpoint ready");
        Ok(Endpoint { address, state })
    }

    /// The next connection: connects once, accepts one, or (re)opens the device; see the table
    /// on [`Endpoint`].
    pub async fn next(&mut self) -> io::Result<Connection> {
        let Endpoint { address, state } = self;
        let connection = match state {
            State::ConnectUnix(path) => unix::connect(address, path).await?,
            State::ConnectTcp { host, port } => tcp::connect(address, host, *port).await?,
            State::ConnectVsock { cid, port } => vsock::connect(address, *cid, *port).await?,
            State::ConnectHybridVsock { path, port } => {
                hvsock::connect(address, path, *port).await?
            }
            State::OpenSerial(config) => serial::open(address, config)?,
            State::OpenPort(device) => device.open(address).await?,
            State::AcceptUnix(listener) => listener.accept(address).await?,
            State::AcceptTcp(listener) => tcp::accept(address, listener).await?,
            State::AcceptVsock(listener) => vsock::accept(address, listener).await?,
            #[cfg(feature = "vhost-user")]
            State::ServeVhostVsock(device) => device.accept(address).await?,
            State::Inherited(inherited) => inherited.take(address)?,
            State::Stdio { used } => {
                if *used {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "stdio: standard input and output were already used; stdio gives one connection only",
                    ));
                }
                *used = true;
                fd::stdio(address)?
            }
        };
        tracing::debug!(%address, peer = %connection.peer, "connected");
        Ok(connection)
    }

    /// The address this endpoint serves, with the port the kernel picked if it picked one.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// A `port:` endpoint whose device is looked up under other roots than /sys and /dev.
    #[cfg(test)]
    pub(crate) fn with_port_device(address: Address, device: PortDevice) -> Endpoint {
        Endpoint {
            address,
            state: State::OpenPort(device),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &format_args!("{}", self.address))
            .finish_non_exhaustive()
    }
}

/// Wraps an error with the address and what was being done, keeping its kind:
/// `"{addr}: {what}: {error}"`.
pub(crate) fn with_context<'a>(
    addr: &'a Address,
    what: &'a str,
) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("{addr}: {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[tokio::test]
    async fn endpoints_and_their_futures_can_move_between_threads() {
        let mut endpoint = Endpoint::bind(Address::Unix("/nonexistent/x.sock".into()))
            .await
            .expect("bind does nothing for a connector");
        assert_send(&endpoint);
        let next = endpoint.next();
        assert_send(&next);
        let error = next.await.expect_err("nothing there");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            format!("{endpoint:?}"),
            "Endpoint { address: unix:/nonexistent/x.sock, .. }"
        );
    }

    #[test]
    fn context_keeps_the_kind() {
        let addr = Address::Tcp {
            host: "::1".into(),
            port: 9,
        };
        let error = with_context(&addr, "cannot connect")(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ));
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            error
                .to_string()
                .starts_with("tcp:[::1]:9: cannot connect: "),
            "{error}"
        );
    }
}
