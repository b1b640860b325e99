//! The host half: a QGA client over any byte stream, for vstreamctl (through vstreamd, to
//! vstream-agent or to a real qemu-ga), and the file copy built on `guest-file-*`.
//!
//! Everything from the guest is hostile: a reply is at most [`MAX_REPLY`] bytes, must be a
//! JSON object with `return` or a well-formed `error`, and typed results are checked (a read
//! returns no more than asked, its `count` matches its data); every wait has a deadline.

use std::hash::BuildHasher;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::*;

/// Largest reply accepted. The largest legitimate one is a `guest-exec-status` with 16 MiB of
/// stdout and 16 MiB of stderr, about 43 MiB once base64-encoded.
pub const MAX_REPLY: usize = 64 * 1024 * 1024;

/// Default chunk of a file copy: 1 MiB of data (about 1.4 MB of JSON per request).
pub const DEFAULT_CHUNK: usize = 1024 * 1024;

/// Most stale replies skipped while synchronising before giving up.
const MAX_STALE: usize = 1000;

/// Requests a file copy keeps in flight with vstream-agent: the guest works on one while the
/// host encodes the next (replies come back in order, so they need no ids). Other agents get
/// one at a time: qemu-ga 7.2 on a virtio-serial port loses requests that arrive while it is
/// busy with a large one (seen in the lab: a reply missing, a write cut short).
pub const PIPELINE: usize = 4;

/// Why a call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The stream failed.
    Io(io::Error),
    /// The guest answered with an error.
    Guest(QgaError),
    /// The guest's answer is not what QGA allows.
    Protocol(String),
    /// No answer in time.
    Timeout(String),
    /// The stream ended.
    Closed,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Guest(e) => write!(f, "guest agent error: {}", e.desc),
            ClientError::Protocol(e) => write!(f, "bad reply from the guest agent: {e}"),
            ClientError::Timeout(what) => write!(f, "no reply from the guest agent to {what}"),
            ClientError::Closed => write!(f, "the connection to the guest agent ended"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

/// A random positive id for `guest-sync-delimited`.
fn sync_id() -> i64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let h = std::collections::hash_map::RandomState::new().hash_one(nanos);
    (h & (i64::MAX as u64)) as i64
}

/// Checks a reply object: `Ok(return value)`, or the guest's error.
pub fn check_reply(reply: Value) -> Result<Value, ClientError> {
    let Value::Object(mut m) = reply else {
        return Err(ClientError::Protocol(format!(
            "expected an object, got {}",
            short(&reply)
        )));
    };
    if let Some(v) = m.remove("return") {
        return Ok(v);
    }
    match m.remove("error") {
        Some(e) => match serde_json::from_value::<QgaError>(e.clone()) {
            Ok(err) => Err(ClientError::Guest(err)),
            Err(_) => Err(ClientError::Protocol(format!(
                "malformed error {}",
                short(&e)
            ))),
        },
        None => Err(ClientError::Protocol(format!(
            "neither 'return' nor 'error' in {}",
            short(&Value::Object(m))
        ))),
    }
}

/// A value for an error message, cut to 200 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// A QGA client over one stream.
pub struct Client<S> {
    stream: S,
    framer: Framer,
    buf: Vec<u8>,
    timeout: Duration,
    pipeline: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client; call [`Client::sync`] before the first command on a stream that others may
    /// have used (a virtio-serial port, a QEMU chardev).
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream,
            framer: Framer::new(MAX_REPLY),
            buf: vec![0u8; 256 * 1024],
            timeout: Duration::from_secs(30),
            pipeline: 1,
        }
    }

    /// Requests a copy keeps in flight (1 unless set, or found by
    /// [`Client::detect_pipelining`]).
    pub fn set_pipeline(&mut self, depth: usize) {
        self.pipeline = depth.max(1);
    }

    /// Asks `guest-info` who the agent is: [`PIPELINE`] requests in flight for vstream-agent,
    /// one for any other. Returns the depth chosen.
    pub async fn detect_pipelining(&mut self) -> Result<usize, ClientError> {
        let info = self.info().await?;
        let ours = info.version.starts_with("vstream-agent ");
        self.set_pipeline(if ours { PIPELINE } else { 1 });
        Ok(self.pipeline)
    }

    /// How long one reply may take (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }

    async fn send(&mut self, prefix: &[u8], request: &Value) -> Result<(), ClientError> {
        let mut bytes = prefix.to_vec();
        serde_json::to_writer(&mut bytes, request)
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        bytes.push(b'\n');
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next frame from the guest, waiting until `deadline`.
    async fn frame(
        &mut self,
        deadline: tokio::time::Instant,
        what: &str,
    ) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = self.framer.next_frame() {
                return Ok(f);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf))
                .await
                .map_err(|_| ClientError::Timeout(what.to_owned()))??;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.framer.push(&self.buf[..n]);
        }
    }

    /// Resynchronises the stream: sends 0xFF and `guest-sync-delimited` with a random id, then
    /// drops everything up to the reply carrying that id (stale replies of an earlier client).
    pub async fn sync(&mut self) -> Result<(), ClientError> {
        let id = sync_id();
        let req = Command::SyncDelimited { id }.to_request();
        self.send(&[DELIMITER], &req).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut stale = 0;
        while stale < MAX_STALE {
            match self.frame(deadline, "guest-sync-delimited").await? {
                Frame::Text(t) => {
                    let v: Option<Value> = serde_json::from_slice(&t).ok();
                    match v.map(check_reply) {
                        Some(Ok(v)) if v.as_i64() == Some(id) => return Ok(()),
                        // qemu-ga before the sync (or a client's leftover) may say anything.
                        // An agent without guest-sync-delimited says so.
                        Some(Err(ClientError::Guest(e)))
                            if e.desc.contains("guest-sync-delimited") =>
                        {
                            return Err(ClientError::Guest(e))
                        }
                        _ => stale += 1,
                    }
                }
                Frame::TooLarge { .. } | Frame::Delimiter { .. } => stale += 1,
            }
        }
        Err(ClientError::Protocol(format!(
            "no reply to guest-sync-delimited among {MAX_STALE} stale ones"
        )))
    }

    /// Sends a raw request object and returns the whole reply object.
    pub async fn request(&mut self, request: &Value) -> Result<Value, ClientError> {
        let what = request
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("the request")
            .to_owned();
        self.send(&[], request).await?;
        self.reply(&what, tokio::time::Instant::now() + self.timeout)
            .await
    }

    async fn reply(
        &mut self,
        what: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Value, ClientError> {
        loop {
            match self.frame(deadline, what).await? {
                Frame::Text(t) => {
                    return serde_json::from_slice(&t)
                        .map_err(|e| ClientError::Protocol(format!("{what}: not JSON ({e})")))
                }
                Frame::TooLarge { size } => {
                    return Err(ClientError::Protocol(format!(
                        "{what}: reply of {size} bytes, more than {MAX_REPLY}"
                    )))
                }
                // A delimiter before a reply (guest-sync-delimited) is not a reply.
                Frame::Delimiter { .. } => {}
            }
        }
    }

    /// Sends a command without waiting; collect its reply later with [`Client::next_reply`]
    /// (replies come in the order of the commands).
    pub async fn send_command(&mut self, cmd: &Command) -> Result<(), ClientError> {
        self.send(&[], &cmd.to_request()).await
    }

    /// The next reply: its return value, or the guest's error.
    pub async fn next_reply(&mut self, what: &str) -> Result<Value, ClientError> {
        check_reply(
            self.reply(what, tokio::time::Instant::now() + self.timeout)
                .await?,
        )
    }

    /// Runs a command: its return value, or the guest's error.
    pub async fn call(&mut self, cmd: &Command) -> Result<Value, ClientError> {
        check_reply(self.request(&cmd.to_request()).await?)
    }

    /// Runs a command and decodes its return value as `T`.
    pub async fn call_as<T: DeserializeOwned>(&mut self, cmd: &Command) -> Result<T, ClientError> {
        let v = self.call(cmd).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("{}: {e}", cmd.name())))
    }

    /// Sends a command that replies only on failure (`guest-shutdown`): waits up to `wait` for
    /// an error; silence or the stream ending counts as success.
    pub async fn call_no_reply(
        &mut self,
        cmd: &Command,
        wait: Duration,
    ) -> Result<(), ClientError> {
        self.send(&[], &cmd.to_request()).await?;
        match self
            .reply(cmd.name(), tokio::time::Instant::now() + wait)
            .await
        {
            Ok(v) => check_reply(v).map(drop),
            Err(ClientError::Timeout(_) | ClientError::Closed) => Ok(()),
            Err(ClientError::Io(e)) if e.kind() != io::ErrorKind::InvalidData => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `guest-info`.
    pub async fn info(&mut self) -> Result<GuestAgentInfo, ClientError> {
        self.call_as(&Command::Info).await
    }

    /// `guest-get-time`: nanoseconds since the epoch.
    pub async fn get_time(&mut self) -> Result<i64, ClientError> {
        self.call_as(&Command::GetTime).await
    }

    /// `guest-set-time`.
    pub async fn set_time(&mut self, time: Option<i64>) -> Result<(), ClientError> {
        self.call(&Command::SetTime { time }).await.map(drop)
    }

    /// `guest-file-open`: a handle.
    pub async fn file_open(&mut self, path: &str, mode: &str) -> Result<i64, ClientError> {
        self.call_as(&Command::FileOpen {
            path: path.to_owned(),
            mode: Some(mode.to_owned()),
        })
        .await
    }

    /// `guest-file-close`.
    pub async fn file_close(&mut self, handle: i64) -> Result<(), ClientError> {
        self.call(&Command::FileClose { handle }).await.map(drop)
    }

    /// `guest-file-read`: the bytes (checked against `count` and the request) and end of file.
    pub async fn file_read(
        &mut self,
        handle: i64,
        count: usize,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        let r: GuestFileRead = self
            .call_as(&Command::FileRead {
                handle,
                count: Some(count as i64),
            })
            .await?;
        Ok((read_data(&r, count)?, r.eof))
    }

    /// `guest-file-write`: bytes written (at most `data.len()`).
    pub async fn file_write(&mut self, handle: i64, data: &[u8]) -> Result<usize, ClientError> {
        let w: GuestFileWrite = self
            .call_as(&Command::FileWrite {
                handle,
                buf_b64: base64_encode(data),
                count: None,
            })
            .await?;
        usize::try_from(w.count)
            .ok()
            .filter(|n| *n <= data.len())
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "guest-file-write: sent {} bytes, guest claims {}",
                    data.len(),
                    w.count
                ))
            })
    }

    /// `guest-file-seek`: the new position.
    pub async fn file_seek(
        &mut self,
        handle: i64,
        offset: i64,
        whence: Whence,
    ) -> Result<u64, ClientError> {
        let s: GuestFileSeek = self
            .call_as(&Command::FileSeek {
                handle,
                offset,
                whence,
            })
            .await?;
        Ok(s.position)
    }
}

/// The bytes of a `guest-file-read` reply to a read of at most `count`: valid base64 whose
/// length is the one the guest claims and no more than was asked for.
fn read_data(r: &GuestFileRead, count: usize) -> Result<Vec<u8>, ClientError> {
    let data = base64_decode(&r.buf_b64)
        .ok_or_else(|| ClientError::Protocol("guest-file-read: buf-b64 is not base64".into()))?;
    if data.len() as u64 != r.count || data.len() > count {
        return Err(ClientError::Protocol(format!(
            "guest-file-read: asked for at most {count} bytes, got {} claiming {}",
            data.len(),
            r.count
        )));
    }
    Ok(data)
}

fn decode<T: DeserializeOwned>(what: &str, v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("{what}: {e}")))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]).await? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// Ends a transfer of `total` bytes on `handle`: closes the file when `result` is `Ok`, else
/// [`abandon`]s it (closed only if `close_on_error`) and returns the transfer's error.
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    handle: i64,
    result: Result<(), ClientError>,
    total: u64,
    in_flight: usize,
    close_on_error: bool,
) -> Result<u64, ClientError> {
    if let Err(e) = result {
        abandon(client, handle, in_flight, close_on_error).await;
        return Err(e);
    }
    client.file_close(handle).await?;
    Ok(total)
}

/// After a failure: collects the replies still due, then closes the handle (best effort) if
/// `close`.
async fn abandon<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    handle: i64,
    in_flight: usize,
    close: bool,
) {
    for _ in 0..in_flight {
        if let Err(ClientError::Io(_) | ClientError::Closed | ClientError::Timeout(_)) =
            client.next_reply("a pipelined request").await
        {
            return;
        }
    }
    if close {
        let _ = client.file_close(handle).await;
    }
}

/// Copies `reader` into the guest file `path` (created or truncated), `chunk` bytes per
/// `guest-file-write`, as many requests in flight as the client allows; `progress` gets the bytes copied so
/// far. Returns the total.
pub async fn copy_to_guest<S, R>(
    client: &mut Client<S>,
    mut reader: R,
    path: &str,
    chunk: usize,
    mut progress: impl FnMut(u64),
) -> Result<u64, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let chunk = chunk.clamp(1, MAX_REQUEST / 2);
    let handle = client.file_open(path, "w").await?;
    let mut buf = vec![0u8; chunk];
    let mut in_flight: std::collections::VecDeque<usize> = Default::default();
    let mut input_done = false;
    let mut total = 0u64;
    let result: Result<(), ClientError> = async {
        loop {
            while !input_done && in_flight.len() < client.pipeline {
                let n = fill(&mut reader, &mut buf).await?;
                if n == 0 {
                    input_done = true;
                    break;
                }
                let cmd = Command::FileWrite {
                    handle,
                    buf_b64: base64_encode(&buf[..n]),
                    count: None,
                };
                client.send_command(&cmd).await?;
                in_flight.push_back(n);
            }
            let Some(&sent) = in_flight.front() else {
                return Ok(());
            };
            let w: GuestFileWrite = decode(
                "guest-file-write",
                client.next_reply("guest-file-write").await?,
            )?;
            in_flight.pop_front();
            if w.count != sent as u64 {
                return Err(ClientError::Protocol(format!(
                    "guest-file-write on {path}: {} of {sent} bytes written (disk full?)",
                    w.count
                )));
            }
            total += sent as u64;
            progress(total);
        }
    }
    .await;
    // Not closed on an error: vstream-agent puts a `w` file in place on guest-file-close, and
    // this one is incomplete (it stays under a `.vstream-partial-N` name in the guest).
    finish(client, handle, result, total, in_flight.len(), false).await
}

/// Copies the guest file `path` into `writer`, `chunk` bytes per `guest-file-read`,
/// as many requests in flight as the client allows; `progress` gets (bytes so far, file size if the guest could
/// tell it). Returns the total.
pub async fn copy_from_guest<S, W>(
    client: &mut Client<S>,
    path: &str,
    mut writer: W,
    chunk: usize,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<u64, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let chunk = chunk.clamp(1, MAX_READ_COUNT);
    let handle = client.file_open(path, "r").await?;
    let mut in_flight = 0usize;
    let mut total = 0u64;
    let result: Result<(), ClientError> = async {
        // The size, for progress only (a pipe or a device cannot seek: unknown).
        let size = match client.file_seek(handle, 0, Whence::End).await {
            Ok(end) => {
                client.file_seek(handle, 0, Whence::Set).await?;
                Some(end)
            }
            Err(ClientError::Guest(_)) => None,
            Err(e) => return Err(e),
        };
        let mut eof = false;
        loop {
            while !eof && in_flight < client.pipeline {
                let cmd = Command::FileRead {
                    handle,
                    count: Some(chunk as i64),
                };
                client.send_command(&cmd).await?;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let r: GuestFileRead = decode(
                "guest-file-read",
                client.next_reply("guest-file-read").await?,
            )?;
            in_flight -= 1;
            let data = read_data(&r, chunk)?;
            // Replies come in file order, so data after an end of file (a growing file) is
            // still the next data.
            writer.write_all(&data).await?;
            total += data.len() as u64;
            progress(total, size);
            eof |= r.eof;
            if data.is_empty() && !r.eof && in_flight == 0 {
                // A non-blocking source with nothing yet (a FIFO): ask again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        writer.flush().await?;
        Ok(())
    }
    .await;
    finish(client, handle, result, total, in_flight, true).await
}
