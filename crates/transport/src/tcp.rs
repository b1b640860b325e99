//! The `tcp:HOST:PORT` and `tcp-listen:HOST:PORT` transports. Both set `TCP_NODELAY`: vstream
//! sends small frames and does its own batching.

use std::io;

use tokio::net::{TcpListener, TcpStream};

use crate::address::Address;
use crate::{with_context, Connection, PeerIdentity};

/// Connects to `host:port` (a name is resolved first; every address it has is tried in turn).
pub(crate) async fn connect(addr: &Address, host: &str, port: u16) -> io::Result<Connection> {
    let stream = connect_stream(addr, host, port).await?;
    let peer = match stream.peer_addr() {
        Ok(peer) => format!("tcp:{peer}"),
        Err(_) => addr.to_string(),
    };
    Ok(Connection {
        stream: Box::new(stream),
        peer,
        identity: PeerIdentity::Opened,
    })
}

async fn connect_stream(addr: &Address, host: &str, port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(with_context(addr, "cannot connect"))?;
    stream
        .set_nodelay(true)
        .map_err(with_context(addr, "cannot set TCP_NODELAY"))?;
    Ok(stream)
}

/// Binds `host:port`; returns the listener and the address with the port actually bound
/// (which differs when `port` is 0).
pub(crate) async fn bind(
    addr: &Address,
    host: &str,
    port: u16,
) -> io::Result<(TcpListener, Address)> {
    let listener = TcpListener::bind((host, port))
        .await
        .map_err(with_context(addr, "cannot listen"))?;
    let bound = listener
        .local_addr()
        .map_err(with_context(addr, "cannot read the bound address"))?;
    let address = Address::TcpListen {
        host: host.to_owned(),
        port: bound.port(),
    };
    Ok((listener, address))
}

/// Accepts one connection.
pub(crate) async fn accept(addr: &Address, listener: &TcpListener) -> io::Result<Connection> {
    let (stream, peer) = accept_stream(addr, listener).await?;
    Ok(Connection {
        stream: Box::new(stream),
        peer: format!("tcp:{peer}"),
        identity: PeerIdentity::Tcp(peer),
    })
}

async fn accept_stream(
    addr: &Address,
    listener: &TcpListener,
) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    let (stream, peer) = listener
        .accept()
        .await
        .map_err(with_context(addr, "cannot accept"))?;
    stream
        .set_nodelay(true)
        .map_err(with_context(addr, "cannot set TCP_NODELAY"))?;
    Ok((stream, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_set_nodelay() {
        let listen = Address::TcpListen {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let (listener, bound) = bind(&listen, "127.0.0.1", 0).await.expect("bind");
        let Address::TcpListen { port, .. } = bound else {
            panic!("bind changed the address kind: {bound}");
        };
        let target = Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let (client, accepted) = tokio::join!(
            connect_stream(&target, "127.0.0.1", port),
            accept_stream(&bound, &listener)
        );
        let client = client.expect("connect");
        let (server, peer) = accepted.expect("accept");
        assert!(client.nodelay().expect("nodelay"));
        assert!(server.nodelay().expect("nodelay"));
        assert_eq!(peer, client.local_addr().expect("local_addr"));
    }
}
