//! The hybrid socket's side of a connection (Firecracker's and Cloud Hypervisor's protocol): a
//! host client's `CONNECT <port>` line, and guest connections to `<uds>_<port>`.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// A hybrid-socket client that has not said which guest port it wants.
pub(super) struct Handshake {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
}

/// `CONNECT <port>` (the newline already removed).
pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to `<uds>_<port>` without blocking (a full backlog is a refusal, not a stall of
/// every other connection).
pub(super) fn connect_port(uds: &std::path::Path, port: u32) -> io::Result<UnixStream> {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(PathBuf::from(path))?)?;
    Ok(UnixStream::from(fd))
}
