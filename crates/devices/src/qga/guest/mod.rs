//! The guest half: runs QGA commands for vstream-agent, on mux channels of class `qga` and on a
//! raw stream such as the virtio-serial port `org.qemu.guest_agent.0`.
//!
//! [`GuestAgent::handle_text`] is the whole protocol for one request text, synchronous and
//! testable without sockets; [`serve`] moves bytes between a stream and it (one request at a
//! time per stream, each in a blocking-pool thread so a slow disk never stalls the runtime,
//! except the pings and syncs that cannot wait);
//! [`serve_address`] keeps a raw transport served forever.

mod exec;
mod file;
mod fs;
mod memory;
mod network;
mod ssh;
mod system;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vstream_link::ChannelStream;
use vstream_transport::{Address, Endpoint};

use self::{exec::*, file::*};
pub(crate) use self::{network::*, system::*};
// Parsers the tests reach through `guest::*`.
#[cfg(test)]
pub(crate) use self::{fs::*, ssh::*};
use super::*;
use crate::civil::civil_from_days;
use crate::{ServeFuture, Service};

/// Where the agent looks for things, and how it powers off. [`Settings::default`] is the real
/// system; tests point the files elsewhere.
#[derive(Debug, Clone)]
pub struct Settings {
    /// When set, `guest-shutdown` runs `PROGRAM MODE` (`powerdown`, `reboot` or `halt`) instead
    /// of shutting the system down itself: for containers and tests, where the agent must not
    /// power off the machine it shares. From `VSTREAM_QGA_SHUTDOWN_COMMAND`.
    pub shutdown_command: Option<PathBuf>,
    /// The user database (`guest-ssh-*`).
    pub passwd: PathBuf,
    /// The login records (`guest-get-users`).
    pub utmp: PathBuf,
    /// os-release(5) files, the first readable one is used.
    pub os_release: Vec<PathBuf>,
    /// The mount table (`guest-get-fsinfo`, `guest-fsfreeze-*`).
    pub mountinfo: PathBuf,
    /// Real-time clock devices, the first present one is used (`guest-set-time`).
    pub rtc: Vec<PathBuf>,
    /// Commands disabled by qemu-ga's block and allow lists.
    pub filter: CommandFilter,
    /// Where sysfs is mounted (`guest-get-vcpus`, the memory blocks, the disks).
    pub sysfs: PathBuf,
    /// qemu-ga's fsfreeze hook: run with `freeze` before a freeze and `thaw` after a thaw.
    pub fsfreeze_hook: Option<PathBuf>,
    /// Where `guest-suspend-*` looks for systemd's `systemctl` and pm-utils' programs.
    pub helper_dirs: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            shutdown_command: None,
            passwd: "/etc/passwd".into(),
            utmp: "/var/run/utmp".into(),
            os_release: vec!["/etc/os-release".into(), "/usr/lib/os-release".into()],
            mountinfo: "/proc/self/mountinfo".into(),
            rtc: vec!["/dev/rtc0".into(), "/dev/rtc".into()],
            filter: CommandFilter::default(),
            sysfs: "/sys".into(),
            fsfreeze_hook: None,
            helper_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

impl Settings {
    /// The defaults, with `VSTREAM_QGA_SHUTDOWN_COMMAND` if set, and qemu-ga's
    /// `QGA_OS_RELEASE` (the os-release file `guest-get-osinfo` reads).
    pub fn from_env() -> Settings {
        let defaults = Settings::default();
        let os_release = match std::env::var_os("QGA_OS_RELEASE").filter(|v| !v.is_empty()) {
            Some(path) => vec![PathBuf::from(path)],
            None => defaults.os_release.clone(),
        };
        Settings {
            shutdown_command: std::env::var_os("VSTREAM_QGA_SHUTDOWN_COMMAND")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            os_release,
            ..defaults
        }
    }
}

/// The agent's state, shared by every connection: open files, started processes, freeze state.
pub struct GuestAgent {
    settings: Settings,
    state: Mutex<State>,
    /// Captured exec output held, for all processes (bounded by [`EXEC_OUTPUT_BUDGET`]).
    captured: Arc<AtomicUsize>,
    /// Held while freezing or thawing.
    freezing: Mutex<()>,
}

struct State {
    files: BTreeMap<i64, OpenFile>,
    next_handle: i64,
    procs: HashMap<i64, Arc<Proc>>,
    frozen: bool,
}

/// A request parsed and checked, not yet run ([`GuestAgent::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    /// The request's `id` as the client wrote it, echoed in the reply.
    id: Option<Box<RawValue>>,
    /// The command, or why there is none.
    command: Result<Command, QgaError>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one command must not take the agent down for the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `strerror` text of an I/O error, without Rust's " (os error N)" suffix (qemu-ga's wording).
fn errstr(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn to_value<T: Serialize>(v: T) -> Result<Option<Value>, QgaError> {
    serde_json::to_value(v)
        .map(Some)
        .map_err(|e| QgaError::generic(format!("cannot encode the reply: {e}")))
}

/// Reads at most `limit` bytes of a file.
fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    read_bounded(path, limit).map(|b| String::from_utf8_lossy(&b).into_owned())
}

impl GuestAgent {
    /// An agent with these settings (one per process is the rule; see [`GuestAgent::global`]).
    pub fn new(settings: Settings) -> GuestAgent {
        GuestAgent {
            settings,
            state: Mutex::new(State {
                files: BTreeMap::new(),
                next_handle: 1000,
                procs: HashMap::new(),
                frozen: false,
            }),
            captured: Arc::new(AtomicUsize::new(0)),
            freezing: Mutex::new(()),
        }
    }

    /// The process-wide agent (settings from the environment), shared by the mux service and
    /// the raw port, as qemu-ga shares its state between clients.
    pub fn global() -> Arc<GuestAgent> {
        GuestAgent::global_with(Settings::from_env)
    }

    /// The process-wide agent, made with `settings` if this is the first use (an embedding
    /// program or a test that must not let `guest-shutdown` power the machine off calls this
    /// before anything else; check [`GuestAgent::settings`] to be sure).
    pub fn global_with(settings: impl FnOnce() -> Settings) -> Arc<GuestAgent> {
        static GLOBAL: OnceLock<Arc<GuestAgent>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Arc::new(GuestAgent::new(settings())))
            .clone()
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether file systems were frozen by this agent.
    pub fn is_frozen(&self) -> bool {
        lock(&self.state).frozen
    }

    /// Answers one request text: the reply bytes (with the 0xFF prefix for
    /// `guest-sync-delimited` and a final newline), or `None` when the command sends no reply.
    pub fn handle_text(&self, text: &[u8]) -> Option<Vec<u8>> {
        self.answer(self.prepare(text))
    }

    /// The first half of [`GuestAgent::handle_text`]: the request parsed and checked (cheap for
    /// a small text; nothing runs yet).
    pub fn prepare(&self, text: &[u8]) -> Prepared {
        match Request::parse(text) {
            Err((id, e)) => Prepared {
                id: id.map(ToOwned::to_owned),
                command: Err(e),
            },
            Ok(req) => Prepared {
                command: self.command(&req.execute, req.arguments),
                id: req.id.map(ToOwned::to_owned),
            },
        }
    }

    /// The second half of [`GuestAgent::handle_text`]: runs the command, encodes the reply.
    pub fn answer(&self, prepared: Prepared) -> Option<Vec<u8>> {
        let Prepared { id, command } = prepared;
        let mut delimited = false;
        let result = match command {
            // Its reply is nearly all base64: written straight into the reply's bytes.
            Ok(Command::FileRead { handle, count }) => {
                match self.file_read_reply(handle, count, id.as_deref()) {
                    Ok(out) => return Some(out),
                    Err(e) => Err(e),
                }
            }
            Ok(cmd) => {
                delimited = matches!(cmd, Command::SyncDelimited { .. });
                match self.execute(cmd) {
                    Ok(None) => return None,
                    Ok(Some(v)) => Ok(v),
                    Err(e) => {
                        delimited = false;
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        Some(encode_reply(id.as_deref(), result.as_ref(), delimited))
    }

    /// `guest-file-read`'s reply bytes, as [`encode_reply`] would write them (members in the
    /// same order), but with the file's base64 encoded in place: `{"id":ID,"return":{
    /// "buf-b64":"...","count":N,"eof":B}}` and a newline.
    fn file_read_reply(
        &self,
        handle: i64,
        count: Option<i64>,
        id: Option<&RawValue>,
    ) -> Result<Vec<u8>, QgaError> {
        let mut out = Vec::new();
        begin_return(&mut out, id);
        out.extend_from_slice(b"{\"buf-b64\":\"");
        let (count, eof) = self.read_encoded(handle, count, &mut out)?;
        out.extend_from_slice(format!("\",\"count\":{count},\"eof\":{eof}}}}}\n").as_bytes());
        Ok(out)
    }

    /// Whether a prepared request is answered at once, on the caller's thread: the commands
    /// that touch no file, process or device and cannot wait, the ones a client sends to
    /// measure or check the agent (a hand-off to another thread would be most of their cost).
    pub fn answers_at_once(prepared: &Prepared) -> bool {
        matches!(
            prepared.command,
            Ok(Command::Ping | Command::Sync { .. } | Command::SyncDelimited { .. })
        )
    }

    /// Looks a command up, checks that it may run now, and parses its arguments.
    fn command(&self, name: &str, arguments: Map<String, Value>) -> Result<Command, QgaError> {
        let Some(spec) = command_spec(name) else {
            return Err(QgaError::command_not_found(name));
        };
        self.settings.filter.check(name)?;
        if !spec.allowed_frozen && self.is_frozen() {
            return Err(QgaError::disabled(name, "the agent is in frozen state"));
        }
        Command::parse(name, arguments)
    }

    /// Runs a parsed command.
    pub fn execute(&self, cmd: Command) -> Result<Option<Value>, QgaError> {
        match cmd {
            Command::Sync { id } | Command::SyncDelimited { id } => to_value(id),
            Command::Ping => to_value(Map::new()),
            Command::Info => to_value(self.info()),
            Command::Shutdown { mode } => self.shutdown(mode).map(|()| None),
            Command::SuspendDisk => self.suspend(SuspendMode::Disk).map(|()| None),
            Command::SuspendRam => self.suspend(SuspendMode::Ram).map(|()| None),
            Command::SuspendHybrid => self.suspend(SuspendMode::Hybrid).map(|()| None),
            Command::GetTime => to_value(get_time()?),
            Command::SetTime { time } => {
                self.set_time(time)?;
                to_value(Map::new())
            }
            Command::GetOsinfo => to_value(self.osinfo()),
            Command::GetHostName => to_value(GuestHostName {
                host_name: uname_field(rustix::system::Uname::nodename),
            }),
            Command::GetTimezone => to_value(timezone()),
            Command::GetUsers => to_value(self.users()?),
            Command::GetLoad => to_value(load()?),
            Command::GetVcpus => to_value(self.vcpus()?),
            Command::SetVcpus { vcpus } => to_value(self.set_vcpus(&vcpus)?),
            Command::GetMemoryBlocks => to_value(self.memory_blocks()?),
            Command::SetMemoryBlocks { blocks } => to_value(self.set_memory_blocks(blocks)),
            Command::GetMemoryBlockInfo => to_value(self.memory_block_info()?),
            Command::SetUserPassword {
                username,
                password,
                crypted,
            } => {
                self.set_user_password(&username, &password, crypted)?;
                to_value(Map::new())
            }
            Command::NetworkGetInterfaces => to_value(interfaces()?),
            Command::GetFsinfo => to_value(self.fsinfo()?),
            Command::FsfreezeStatus => to_value(if self.is_frozen() { "frozen" } else { "thawed" }),
            Command::FsfreezeFreeze => to_value(self.freeze(None)?),
            Command::FsfreezeFreezeList { mountpoints } => {
                to_value(self.freeze(Some(mountpoints.unwrap_or_default()))?)
            }
            Command::FsfreezeThaw => to_value(self.thaw()?),
            Command::Fstrim { minimum } => to_value(self.fstrim(minimum)?),
            Command::GetDisks => to_value(self.disks()?),
            Command::Exec(args) => to_value(self.exec(args)?),
            Command::ExecStatus { pid } => to_value(self.exec_status(pid)?),
            Command::FileOpen { path, mode } => to_value(self.file_open(&path, mode.as_deref())?),
            Command::FileClose { handle } => {
                self.file_close(handle)?;
                to_value(Map::new())
            }
            Command::FileRead { handle, count } => {
                let mut b64 = Vec::new();
                let (count, eof) = self.read_encoded(handle, count, &mut b64)?;
                to_value(GuestFileRead {
                    count,
                    // Base64 is ASCII.
                    buf_b64: String::from_utf8(b64).unwrap_or_default(),
                    eof,
                })
            }
            Command::FileWrite {
                handle,
                buf_b64,
                count,
            } => to_value(self.file_write(handle, &buf_b64, count)?),
            Command::FileSeek {
                handle,
                offset,
                whence,
            } => to_value(self.file_seek(handle, offset, whence)?),
            Command::FileFlush { handle } => {
                self.file(handle)?;
                // Writes go straight to the kernel: there is no user-space buffer to flush.
                to_value(Map::new())
            }
            Command::SshGetAuthorizedKeys { username } => to_value(GuestAuthorizedKeys {
                keys: self.ssh_keys(&username)?.1,
            }),
            Command::SshAddAuthorizedKeys {
                username,
                keys,
                reset,
            } => {
                self.ssh_add(&username, &keys, reset)?;
                to_value(Map::new())
            }
            Command::SshRemoveAuthorizedKeys { username, keys } => {
                self.ssh_remove(&username, &keys)?;
                to_value(Map::new())
            }
        }
    }

    fn info(&self) -> GuestAgentInfo {
        let frozen = self.is_frozen();
        GuestAgentInfo {
            version: AGENT_VERSION.to_owned(),
            supported_commands: COMMANDS
                .iter()
                .map(|c| GuestAgentCommandInfo {
                    name: c.name.to_owned(),
                    enabled: self.settings.filter.allows(c.name) && (!frozen || c.allowed_frozen),
                    success_response: c.success_response,
                })
                .collect(),
        }
    }
}

/// The bytes of a reply ([`write_reply`]): 0xFF first if `delimited`, the JSON, a newline.
pub fn encode_reply(
    id: Option<&RawValue>,
    result: Result<&Value, &QgaError>,
    delimited: bool,
) -> Vec<u8> {
    // Room for the common short replies (`{"return":{}}` and the like) at once, not grown
    // from nothing in several reallocations per request.
    let mut out = Vec::with_capacity(REPLY_ROOM);
    if delimited {
        out.push(DELIMITER);
    }
    write_reply(&mut out, id, result);
    out.push(b'\n');
    out
}

// ---------------------------------------------------------------------------------------------
// Serving.

/// Serves QGA on one byte stream until the peer closes it: requests in, replies out, in order.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    agent: Arc<GuestAgent>,
    mut stream: S,
) -> io::Result<()> {
    // Requests are answered one at a time, so reads and writes take turns on the stream: no
    // split into halves (a lock per call).
    let mut framer = Framer::new(MAX_REQUEST);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        framer.push(&buf[..n]);
        while let Some(frame) = framer.next_frame() {
            let out = match frame {
                // A small text is parsed here; a command that cannot wait is answered here too,
                // without the two thread switches a hand-off costs.
                Frame::Text(text) if text.len() <= INLINE_PARSE => {
                    let prepared = agent.prepare(&text);
                    if GuestAgent::answers_at_once(&prepared) {
                        agent.answer(prepared)
                    } else {
                        let a = agent.clone();
                        blocking(move || a.answer(prepared)).await
                    }
                }
                Frame::Text(text) => {
                    let a = agent.clone();
                    blocking(move || a.handle_text(&text)).await
                }
                Frame::TooLarge { size } => Some(too_large(size)),
                Frame::Delimiter { .. } => None,
            };
            if let Some(out) = out {
                stream.write_all(&out).await?;
                stream.flush().await?;
            }
        }
    }
}

/// A reply's first allocation.
const REPLY_ROOM: usize = 128;

/// Requests up to this size are parsed on the runtime's thread (a few microseconds); larger
/// ones (`guest-file-write`'s data, up to [`MAX_REQUEST`]) in a blocking-pool thread with
/// their command.
const INLINE_PARSE: usize = 4096;

/// Runs `job` (a command: it may wait on a disk or a process) in a blocking-pool thread, so
/// the runtime's one thread goes on serving the other devices; a panic becomes an error reply.
async fn blocking(job: impl FnOnce() -> Option<Vec<u8>> + Send + 'static) -> Option<Vec<u8>> {
    match tokio::task::spawn_blocking(job).await {
        Ok(reply) => reply,
        Err(e) => Some(encode_reply(
            None,
            Err(&QgaError::generic(format!("internal error: {e}"))),
            false,
        )),
    }
}

/// Serves QGA on `fd` on a thread of its own until the peer closes it; the descriptor closes
/// with it. A request then costs a `poll`, a `read` and a `write`, where the runtime spent three
/// `epoll_wait`s, two `readv`s and a turn of its scheduler on it. Under an emulated CPU that
/// difference was a fifth of the guest-ping latency a management stack sees (docs/PERFORMANCE.md,
/// "The raw QGA stream on a thread of its own"). The thread enters the runtime, so commands that
/// need it (`guest-exec`'s children) run as on a blocking-pool thread; it is not one of that
/// pool's, so a runtime shutting down does not wait for a thread blocked in `poll`.
pub(crate) async fn serve_on_thread(agent: Arc<GuestAgent>, fd: OwnedFd) -> io::Result<()> {
    crate::thread::on_thread("qga", move || serve_blocking(&agent, &fd)).await
}

/// [`serve`], with the thread waiting in `poll` instead of the runtime: requests in, replies
/// out, in order. The descriptor stays nonblocking: a blocking write to a virtio port whose host
/// side has gone sleeps in the driver (`wait_port_writable`); in a guest where that was tried, it
/// was still asleep after the next client connected (docs/PERFORMANCE.md, "Experiment, not kept: a
/// blocking port").
fn serve_blocking(agent: &GuestAgent, fd: &OwnedFd) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut framer = Framer::new(MAX_REQUEST);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let n = match rustix::io::read(fd, &mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
            // A tty whose other side hung up.
            Err(rustix::io::Errno::IO) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        framer.push(&buf[..n]);
        while let Some(frame) = framer.next_frame() {
            let out = match frame {
                Frame::Text(text) => agent.handle_text(&text),
                Frame::TooLarge { size } => Some(too_large(size)),
                Frame::Delimiter { .. } => None,
            };
            if let Some(out) = out {
                crate::thread::write_all_polled(fd, &out)?;
            }
        }
    }
}

/// The reply to a request over [`MAX_REQUEST`].
fn too_large(size: usize) -> Vec<u8> {
    encode_reply(
        None,
        Err(&QgaError::generic(format!(
            "request too large: {size} bytes (at most {MAX_REQUEST})"
        ))),
        false,
    )
}

/// The guest half as a mux service (class `qga`).
pub struct QgaService {
    agent: Arc<GuestAgent>,
}

impl QgaService {
    /// Serves channels with this agent.
    pub fn new(agent: Arc<GuestAgent>) -> QgaService {
        QgaService { agent }
    }

    /// Serves channels with the process-wide agent ([`GuestAgent::global`]).
    pub fn global() -> QgaService {
        QgaService::new(GuestAgent::global())
    }
}

impl Service for QgaService {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let agent = self.agent.clone();
        Box::pin(async move {
            if let Err(e) = serve(agent, stream).await {
                tracing::debug!(channel = %name, "qga channel ended: {e}");
            }
        })
    }
}

/// Serves QGA on a raw transport forever (`vstream-agent --qga ADDR`): a device such as
/// `port:org.qemu.guest_agent.0` is reopened after each client; listeners accept clients
/// concurrently. Errors are logged once per change and retried.
pub async fn serve_address(agent: Arc<GuestAgent>, address: Address) {
    let listener = matches!(
        address,
        Address::UnixListen(_) | Address::TcpListen { .. } | Address::VsockListen { .. }
    );
    let mut last_error = String::new();
    let mut note = |e: &io::Error| {
        let e = e.to_string();
        if e != last_error {
            tracing::warn!(%address, "qga: {e}");
            last_error = e;
        }
    };
    let mut endpoint = loop {
        match Endpoint::bind(address.clone()).await {
            Ok(ep) => break ep,
            Err(e) => {
                note(&e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!(%address, "serving QGA");
    loop {
        match endpoint.next().await {
            Ok(conn) => {
                tracing::debug!(%address, peer = %conn.peer, "qga client");
                let a = agent.clone();
                if listener {
                    tokio::spawn(async move {
                        if let Err(e) = serve(a, conn.stream).await {
                            tracing::debug!("qga client ended: {e}");
                        }
                    });
                    continue;
                }
                // One client at a time (a port, a serial line, a connection we made): served
                // on a thread of its own, as `cat` would, when the stream is one descriptor.
                let ended = match crate::thread::detach(conn.stream) {
                    Ok(fd) => serve_on_thread(a, fd).await,
                    Err(stream) => serve(a, stream).await,
                };
                if let Err(e) = ended {
                    tracing::debug!("qga client ended: {e}");
                }
                // A device reports end of file while the host side is closed; do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                note(&e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
