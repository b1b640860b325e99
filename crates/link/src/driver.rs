//! The link driver: a reader, a writer and a timer per link, moving bytes between one transport
//! stream and the session.

use super::*;

/// Most bytes handed to a transport in one write: large enough to batch many small frames
/// into one syscall, small enough to keep latency of other links' acknowledgements low (and
/// counted in what a guest can make us hold).
const WRITE_BATCH: usize = MAX_INPUT;

/// A link's first read buffer: an idle link only carries keepalives, and a daemon holds
/// thousands of them. A read that fills the buffer makes it four times larger, up to
/// [`MAX_INPUT`] (what the session takes in one piece), so a bulk transfer reaches large reads within three reads.
const READ_MIN: usize = 4 * 1024;

/// Why a link ended ([`Mux::run_link`]).
#[derive(Debug, thiserror::Error)]
pub enum LinkEnded {
    /// The peer closed the stream.
    #[error("closed by the peer")]
    ClosedByPeer,
    /// Reading from the transport failed.
    #[error("read failed: {0}")]
    Read(#[source] io::Error),
    /// Writing to the transport failed.
    #[error("write failed: {0}")]
    Write(#[source] io::Error),
    /// Flushing the transport failed.
    #[error("flush failed: {0}")]
    Flush(#[source] io::Error),
    /// The peer committed more than [`MAX_VIOLATIONS`] protocol violations within
    /// [`VIOLATION_WINDOW`]; the message starts with [`DROPPED_FOR_VIOLATIONS`].
    #[error(
        "{DROPPED_FOR_VIOLATIONS}: {count} in {elapsed_ms} ms (at most {MAX_VIOLATIONS} in {window} s)",
        window = VIOLATION_WINDOW.as_secs()
    )]
    Violations {
        /// Violations counted in the current window.
        count: u64,
        /// Since the window began.
        elapsed_ms: u128,
    },
    /// The session closed the link (the peer refused it, a bad HELLO...); the session's words.
    #[error("{0}")]
    Session(String),
    /// Closed on our side.
    #[error("link closed")]
    Closed,
    /// The session no longer has the link.
    #[error("link removed")]
    Removed,
}

impl Mux {
    /// Runs one link over `stream` until it ends; returns why it ended. `prefix` holds bytes
    /// already read from the stream (see [`read_hello`]).
    pub async fn run_link<S>(
        &self,
        stream: S,
        params: LinkParams,
        transport: &str,
        prefix: &[u8],
    ) -> LinkEnded
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (link, wake, down, timer) = {
            let mut inner = self.shared.lock();
            let link = inner.session.add_link(params, Instant::now());
            let wake = Arc::new(Notify::new());
            let down = Arc::new(Notify::new());
            let timer = Arc::new(Notify::new());
            inner.links.insert(
                link,
                LinkEntry {
                    transport: transport.to_owned(),
                    up: false,
                    since: SystemTime::now(),
                    wake: wake.clone(),
                    down: down.clone(),
                    timer: timer.clone(),
                    down_reason: None,
                },
            );
            if !prefix.is_empty() {
                inner.session.handle_input(link, prefix, Instant::now());
                inner.dispatch(&self.shared);
            }
            (link, wake, down, timer)
        };
        let (mut r, mut w) = tokio::io::split(stream);
        let ended = tokio::select! {
            e = self.reader(link, &mut r) => e,
            e = self.writer(link, &mut w, &wake) => e,
            e = self.timer(link, &timer) => e,
            () = down.notified() => LinkEnded::Closed,
        };
        // Why the session closed the link (a REFUSE, a bad HELLO...) says more than the end of
        // file that may race with it.
        let reason = self
            .shared
            .lock()
            .links
            .get(&link)
            .and_then(|e| e.down_reason.clone())
            .map_or(ended, LinkEnded::Session);
        let _ = w.shutdown().await;
        let mut inner = self.shared.lock();
        inner.session.remove_link(link);
        if let Some(e) = inner.links.remove(&link) {
            tracing::info!(peer = %self.shared.label, transport = %e.transport, %reason, "link down");
            let _ = inner.events.send(MuxEvent::LinkDown {
                link: link.0,
                transport: e.transport,
                reason: reason.to_string(),
            });
        }
        inner.dispatch(&self.shared);
        inner.kick();
        if inner.links.is_empty() {
            tokio::spawn(self.clone().linger());
        }
        reason
    }

    /// Runs the session's timers while it has no link (no link task does then): reports held
    /// back, and the expiry that frees what a guest that went away left behind.
    pub(crate) async fn linger(self) {
        loop {
            let deadline = {
                let inner = self.shared.lock();
                if !inner.links.is_empty() {
                    return; // A link came back; its timer runs the session.
                }
                match inner.session.poll_timeout() {
                    Some(t) => t,
                    None => return,
                }
            };
            tokio::time::sleep_until(deadline.into()).await;
            let mut inner = self.shared.lock();
            if !inner.links.is_empty() {
                return;
            }
            let expired = inner.session.stats().expired;
            inner.session.handle_timeout(Instant::now());
            inner.flush_reset_logs(&self.shared);
            inner.dispatch(&self.shared);
            if inner.session.stats().expired != expired {
                drop(inner);
                // Most of what the guest made us hold was freed just now.
                release_freed_memory();
            }
        }
    }

    /// Waits until the session wants input: while a guest does not read what we send, we do
    /// not read what it sends (see `Session::wants_input`). Returns whether it waited.
    async fn input_wanted(&self) -> bool {
        let mut waited = false;
        loop {
            let resumed = self.shared.input.notified();
            let mut resumed = std::pin::pin!(resumed);
            resumed.as_mut().enable();
            if self.shared.lock().session.wants_input() {
                return waited;
            }
            resumed.await;
            waited = true;
        }
    }

    async fn reader<R: AsyncRead + Unpin>(&self, link: LinkId, r: &mut R) -> LinkEnded {
        let mut buf = vec![0u8; READ_MIN];
        let mut budget = ViolationBudget::new(Instant::now());
        loop {
            // Decode what was left undecoded when the session paused, or what comes next.
            let n = if self.input_wanted().await {
                0
            } else {
                match r.read(&mut buf).await {
                    Ok(0) => return LinkEnded::ClosedByPeer,
                    Ok(n) => n,
                    Err(e) => return LinkEnded::Read(e),
                }
            };
            {
                let mut inner = self.shared.lock();
                let now = Instant::now();
                let before = inner.session.stats().protocol_errors;
                inner.session.handle_input(link, &buf[..n], now);
                let committed = inner.session.stats().protocol_errors.saturating_sub(before);
                inner.dispatch(&self.shared);
                inner.kick();
                if let Some(reason) = budget.add(committed, now) {
                    return reason;
                }
            }
            if n == buf.len() && buf.len() < MAX_INPUT {
                buf.resize((buf.len() * 4).min(MAX_INPUT), 0);
            }
        }
    }

    async fn writer<W: AsyncWrite + Unpin>(
        &self,
        link: LinkId,
        w: &mut W,
        wake: &Notify,
    ) -> LinkEnded {
        // Where the transport takes vectored writes (sockets), large payloads go to the kernel
        // straight from the session's queues: one copy fewer, and the lock is held only to
        // encode headers. A bulk transfer spent a twentieth of its CPU time in that copy.
        let mut tx = Transmit::default();
        let mut out = Vec::new();
        let vectored = w.is_write_vectored();
        loop {
            tx.clear();
            out.clear();
            {
                let mut inner = self.shared.lock();
                let now = Instant::now();
                if vectored {
                    inner
                        .session
                        .poll_transmit_vectored(link, now, &mut tx, WRITE_BATCH);
                } else {
                    inner
                        .session
                        .poll_transmit(link, now, &mut out, WRITE_BATCH);
                }
                inner.dispatch(&self.shared);
                if inner.session.wants_input() {
                    self.shared.input.notify_waiters();
                }
                // What was just sent may need a retransmission timer.
                inner.rearm();
            }
            if tx.is_empty() && out.is_empty() {
                wake.notified().await;
                continue;
            }
            let written = if vectored {
                write_all_vectored(w, &tx).await
            } else {
                w.write_all(&out).await
            };
            if let Err(e) = written {
                return LinkEnded::Write(e);
            }
            if let Err(e) = w.flush().await {
                return LinkEnded::Flush(e);
            }
        }
    }

    /// Runs the session's timers: sleeps until the next deadline, or until [`Inner::rearm`]
    /// says there is an earlier one (never polls).
    async fn timer(&self, link: LinkId, rearmed: &Notify) -> LinkEnded {
        loop {
            let deadline = {
                let mut inner = self.shared.lock();
                let next = inner.session.poll_timeout();
                inner.timer_at = next;
                next
            };
            match deadline {
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = rearmed.notified() => continue,
                },
                None => {
                    rearmed.notified().await;
                    continue;
                }
            }
            let mut inner = self.shared.lock();
            inner.session.handle_timeout(Instant::now());
            inner.flush_reset_logs(&self.shared);
            inner.dispatch(&self.shared);
            inner.kick();
            if !inner.links.contains_key(&link) {
                return LinkEnded::Removed;
            }
        }
    }
}

/// Writes all of `tx` with as few `writev` calls as the transport allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, tx: &Transmit) -> io::Result<()> {
    let mut done = 0;
    let mut slices = Vec::new();
    while done < tx.len() {
        slices.clear();
        tx.slices(done, &mut slices);
        match w.write_vectored(&slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    Ok(())
}

/// Reads from a fresh stream until the peer's HELLO arrives (or `timeout` passes); `prefix`
/// holds bytes already read from it. Returns the HELLO and every byte read, to be passed as
/// `prefix` to [`Mux::run_link`].
pub async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    prefix: Vec<u8>,
    timeout: Duration,
) -> io::Result<(Hello, Vec<u8>)> {
    let mut decoder = Decoder::new(64 * 1024);
    decoder.push(&prefix);
    let mut seen = prefix;
    let mut buf = [0u8; 4096];
    let fut = async {
        loop {
            if let Some(hello) = peek_hello(&mut decoder) {
                return hello
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before HELLO",
                ));
            }
            if seen.len() + n > 1024 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no HELLO in the first MiB",
                ));
            }
            seen.extend_from_slice(&buf[..n]);
            decoder.push(&buf[..n]);
        }
    };
    let hello = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HELLO from the peer"))??;
    Ok((hello, seen))
}
