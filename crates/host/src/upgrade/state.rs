//! The state handed to the successor: a JSON header naming descriptors and byte strings,
//! then the byte strings, in a memfd; and the checks a successor makes before it takes any of
//! it.

use std::collections::HashMap;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use vstream_devices::console::Position;
use vstream_link::ChannelStream;
use vstream_wire::ChannelId;

use super::{MAGIC, MAX_HEADER, STATE_ENV};

/// A console viewer's carried state.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ViewState {
    pub(super) guest: String,
    pub(super) console: String,
    pub(super) fd: RawFd,
    pub(super) attach: bool,
    /// Typed bytes read from the client, not yet handled.
    pub(super) typed: Blob,
    /// Output not yet written to the client.
    #[serde(default)]
    pub(super) pending: Blob,
}

/// A console's carried capture: its connection and where it stood.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ConsoleState {
    pub(super) guest: String,
    pub(super) console: String,
    pub(super) fd: RawFd,
    pub(super) position: Position,
    pub(super) tail: Blob,
}

/// A bridge's carried state.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BridgeState {
    pub(super) guest: String,
    pub(super) fd: RawFd,
    pub(super) channel: ChannelId,
    pub(super) up: Blob,
    pub(super) down: Blob,
    pub(super) flags: [bool; 4],
}

/// Where a byte string lies in the state, after the header.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct Blob {
    pub(super) at: u64,
    pub(super) len: u64,
}

/// The state handed to the successor (the header of the memfd; byte strings follow it).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) generation: u64,
    pub(super) requested_ms: u64,
    pub(super) control: Option<RawFd>,
    pub(super) reply: Option<RawFd>,
    pub(super) sessions: Vec<(String, Blob)>,
    pub(super) bridges: Vec<BridgeState>,
    pub(super) views: Vec<ViewState>,
    /// Connected consoles (a predecessor without this field carried none).
    #[serde(default)]
    pub(super) consoles: Vec<ConsoleState>,
}

/// What a successor took over and has not yet put back to work.
#[derive(Default)]
pub(super) struct Inherited {
    pub(super) requested_ms: u64,
    pub(super) control: Option<OwnedFd>,
    pub(super) reply: Option<OwnedFd>,
    pub(super) sessions: HashMap<String, Vec<u8>>,
    pub(super) bridges: Vec<Carried>,
    /// Bridges whose guest session is restored, with their channel.
    pub(super) ready: Vec<(Carried, ChannelStream)>,
    /// Viewers: their state, connection, typed bytes and pending output.
    pub(super) views: Vec<(ViewState, OwnedFd, Vec<u8>, Vec<u8>)>,
    /// Consoles' connections, until their console starts: state, descriptor, tail.
    pub(super) consoles: Vec<(ConsoleState, OwnedFd, Vec<u8>)>,
    /// Hold the adopted consoles' captures until the carried viewers are attached.
    pub(super) console_gates: Vec<oneshot::Sender<()>>,
}

/// A bridge taken over: its state, its client's connection, the bytes it held.
pub(super) struct Carried {
    pub(super) state: BridgeState,
    pub(super) fd: OwnedFd,
    pub(super) up: Vec<u8>,
    pub(super) down: Vec<u8>,
}

/// The state in a new memfd (inherited across exec: no close-on-exec).
pub(super) fn write_state(state: &State, blobs: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("vstreamd-upgrade", rustix::fs::MemfdFlags::empty())?;
    let header = serde_json::to_vec(state).map_err(io::Error::other)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(MAGIC)?;
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    file.write_all(blobs)?;
    file.rewind()?;
    Ok(file.into())
}

/// Takes ownership of an inherited descriptor after checking that it is open and not one
/// already taken; it is made close-on-exec again.
pub(super) fn adopt_fd(fd: RawFd) -> anyhow::Result<OwnedFd> {
    if fd <= 2 {
        anyhow::bail!("descriptor {fd} cannot be inherited state");
    }
    // SAFETY: only to ask whether the number is open; no ownership is taken here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)
        .map_err(|e| anyhow::anyhow!("inherited descriptor {fd}: {e}"))?;
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)?;
    // SAFETY: the descriptor is open (checked above), was passed to this process by its
    // predecessor for exactly this use, and the caller checked that no other object owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// [`adopt_fd`] for a descriptor that must be a socket.
pub(super) fn adopt_socket(fd: RawFd) -> anyhow::Result<OwnedFd> {
    let owned = adopt_fd(fd)?;
    let mode = rustix::fs::fstat(&owned)?.st_mode;
    if rustix::fs::FileType::from_raw_mode(mode) != rustix::fs::FileType::Socket {
        anyhow::bail!("upgrade state: descriptor {fd} is not a socket");
    }
    Ok(owned)
}

/// A carried connection, for tokio.
pub(super) fn unix_stream(fd: OwnedFd) -> io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

/// Reads and checks the state file named by [`STATE_ENV`]: its header and its byte strings.
pub(super) fn read_state(fd: &std::ffi::OsStr) -> anyhow::Result<(State, Vec<u8>)> {
    let fd: RawFd = fd
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{STATE_ENV}: not a descriptor number"))?;
    let mut file = std::fs::File::from(adopt_fd(fd)?);
    let mut head = [0u8; 16];
    file.read_exact(&mut head)
        .map_err(|e| anyhow::anyhow!("upgrade state: {e}"))?;
    if &head[..8] != MAGIC {
        anyhow::bail!("upgrade state: not a state of this version");
    }
    let len = u64::from_le_bytes(head[8..].try_into()?);
    if len > MAX_HEADER as u64 {
        anyhow::bail!("upgrade state: header of {len} bytes (at most {MAX_HEADER})");
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| anyhow::anyhow!("upgrade state: header: {e}"))?;
    let state: State = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("upgrade state: header: {e}"))?;
    let mut blobs = Vec::new();
    file.read_to_end(&mut blobs)?;
    Ok((state, blobs))
}

/// Checks a state against itself (byte strings inside the file, each descriptor once) and
/// takes its descriptors.
pub(super) fn take_over(state: State, blobs: &[u8]) -> anyhow::Result<Inherited> {
    let bytes = |b: Blob| -> anyhow::Result<Vec<u8>> {
        b.at.checked_add(b.len)
            .filter(|end| *end <= blobs.len() as u64)
            .map(|end| blobs[b.at as usize..end as usize].to_vec())
            .ok_or_else(|| anyhow::anyhow!("upgrade state: a byte string lies outside it"))
    };
    let mut fds: Vec<RawFd> = state.control.into_iter().chain(state.reply).collect();
    fds.extend(state.bridges.iter().map(|b| b.fd));
    fds.extend(state.views.iter().map(|v| v.fd));
    fds.extend(state.consoles.iter().map(|c| c.fd));
    let mut seen = fds.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != fds.len() {
        anyhow::bail!("upgrade state: a descriptor is named twice");
    }
    let mut inh = Inherited {
        requested_ms: state.requested_ms,
        control: state.control.map(adopt_fd).transpose()?,
        reply: state.reply.map(adopt_fd).transpose()?,
        ..Inherited::default()
    };
    for (name, b) in state.sessions {
        inh.sessions.insert(name, bytes(b)?);
    }
    for v in state.views {
        let fd = adopt_socket(v.fd)?;
        let (typed, pending) = (bytes(v.typed)?, bytes(v.pending)?);
        inh.views.push((v, fd, typed, pending));
    }
    for c in state.consoles {
        // A socket, a tty or a port device: any descriptor a console's transport reads.
        let fd = adopt_fd(c.fd)?;
        let tail = bytes(c.tail)?;
        inh.consoles.push((c, fd, tail));
    }
    for b in state.bridges {
        let fd = adopt_socket(b.fd)?;
        let (up, down) = (bytes(b.up)?, bytes(b.down)?);
        inh.bridges.push(Carried {
            state: b,
            fd,
            up,
            down,
        });
    }
    Ok(inh)
}
