//! The `unix:PATH` and `unix-listen:PATH` transports.
//!
//! Listening replaces a stale socket file (one nobody accepts on any more, left by a process that
//! died) but refuses to touch a socket that answers or a file that is not a socket. The endpoint
//! removes its socket file when dropped, unless the file has been replaced by then.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use crate::address::Address;
use crate::{with_context, Connection, PeerIdentity};

/// How long probing an existing socket file may take before it counts as in use.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to the Unix socket at `path`.
pub(crate) async fn connect(addr: &Address, path: &Path) -> io::Result<Connection> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(with_context(addr, "cannot connect"))?;
    Ok(Connection {
        stream: Box::new(stream),
        peer: addr.to_string(),
        identity: PeerIdentity::Opened,
    })
}

/// A bound Unix socket, and which file it made.
#[derive(Debug)]
pub(crate) struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this listener created.
    file_id: (u64, u64),
}

impl Listener {
    /// Binds `path`, replacing a stale socket file there.
    pub(crate) async fn bind(addr: &Address, path: &Path) -> io::Result<Self> {
        remove_stale(addr, path).await?;
        let listener = UnixListener::bind(path).map_err(with_context(addr, "cannot listen"))?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(with_context(addr, "cannot stat the new socket"))?;
        Ok(Listener {
            listener,
            path: path.to_owned(),
            file_id: (meta.dev(), meta.ino()),
        })
    }

    /// Accepts one connection; the peer is described with its process and user ids.
    pub(crate) async fn accept(&self, addr: &Address) -> io::Result<Connection> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(with_context(addr, "cannot accept"))?;
        // Without credentials there is nothing to know the peer by: refuse rather than guess.
        let cred = stream
            .peer_cred()
            .map_err(with_context(addr, "cannot read the peer's credentials"))?;
        let peer = match cred.pid() {
            Some(pid) => format!(
                "unix:{} (pid {pid}, uid {})",
                self.path.display(),
                cred.uid()
            ),
            None => format!("unix:{} (uid {})", self.path.display(), cred.uid()),
        };
        Ok(Connection {
            stream: Box::new(stream),
            peer,
            identity: PeerIdentity::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one this listener made.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Removes a socket file at `path` that nothing listens on; leaves everything else alone.
async fn remove_stale(addr: &Address, path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_context(addr, "cannot inspect the socket path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{addr}: {} exists and is not a socket; not removing it",
                path.display()
            ),
        ));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::debug!(%addr, "removing a stale socket file");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(with_context(addr, "cannot remove the stale socket file")(e)),
            }
        }
        Ok(Ok(_)) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{addr}: another process is listening on {}", path.display()),
        )),
        Ok(Err(e)) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{addr}: {} exists and cannot be probed ({e}); not removing it",
                path.display()
            ),
        )),
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{addr}: {} exists and does not answer in time; not removing it",
                path.display()
            ),
        )),
    }
}
