//! The link driver: a reader, a writer and a timer per link, moving bytes between one transport
//! stream and the session.

use super::*;

/// Most bytes handed to a transport in one write: large enough to batch many small frames
/// into one syscall, small enough to keep latency of other links' acknowledgements low (and
/// counted in what a guest can make us hold).
const WRITE_BATCH: usize = MAX_INPUT;

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

/// See [`Mux::run_link`]: its link leaves the session when the guard drops.
struct LinkGuard<'a> {
    mux: &'a Mux,
    link: LinkId,
    /// Why the link ended; `None` while it runs (a drop then means the task was cancelled).
    reason: Option<String>,
}

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        let reason = self
            .reason
            .take()
            .unwrap_or_else(|| "the link's task was cancelled".to_owned());
        self.mux.remove_link(self.link, &reason);
    }
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
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let wake = Arc::new(Notify::new());
        let out = Arc::new(Mutex::new(LinkOut::new(Box::pin(w), wake.clone())));
        let (link, down, timer) = {
            let mut inner = self.shared.lock();
            let link = inner.session.add_link(params, Instant::now());
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
                    out: out.clone(),
                },
            );
            if !prefix.is_empty() {
                inner.session.handle_input(link, prefix, Instant::now());
                inner.dispatch(&self.shared);
            }
            (link, down, timer)
        };
        // Removes the link from the session however this future ends: also when its task is
        // aborted, or the write half kept in the link's entry would hold the stream open and
        // the session would count a link that nobody reads.
        let mut guard = LinkGuard {
            mux: self,
            link,
            reason: None,
        };
        let mut r = r;
        let ended = tokio::select! {
            e = self.reader(link, &mut r) => e,
            e = self.writer(link, &out, &wake) => e,
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
        let _ = std::future::poll_fn(|cx| lock_out(&out).w.as_mut().poll_shutdown(cx)).await;
        guard.reason = Some(reason.to_string());
        drop(guard);
        reason
    }

    /// Takes `link` out of the session and tells whoever listens why.
    fn remove_link(&self, link: LinkId, reason: &str) {
        let mut inner = self.shared.lock();
        inner.session.remove_link(link);
        if let Some(e) = inner.links.remove(&link) {
            tracing::info!(peer = %self.shared.label, transport = %e.transport, %reason, "link down");
            let _ = inner.events.send(MuxEvent::LinkDown {
                link: link.0,
                transport: e.transport,
                reason: reason.to_owned(),
            });
        }
        inner.dispatch(&self.shared);
        inner.kick();
        if inner.links.is_empty() {
            // Not from a runtime that is going away (a drop at shutdown): nothing to run then.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.clone().linger());
            }
        }
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
        // Sized and replaced by the session (`Decoder::prepare`): small for an idle link, and
        // frame-sized pool buffers that large payloads leave in, without a copy.
        let mut input = InputBuf::new();
        self.shared
            .lock()
            .session
            .handle_read(link, &mut input, Instant::now());
        let mut budget = ViolationBudget::new(Instant::now());
        loop {
            // Decode what was left undecoded when the session paused, or what comes next.
            if !self.input_wanted().await {
                match r.read_buf(&mut input.unfilled()).await {
                    Ok(0) => return LinkEnded::ClosedByPeer,
                    Ok(_) => {}
                    Err(e) => return LinkEnded::Read(e),
                }
            }
            {
                let mut inner = self.shared.lock();
                let now = Instant::now();
                let before = inner.session.stats().protocol_errors;
                inner.session.handle_read(link, &mut input, now);
                let committed = inner.session.stats().protocol_errors.saturating_sub(before);
                inner.dispatch(&self.shared);
                inner.kick_if_wanted();
                if let Some(reason) = budget.add(committed, now) {
                    return reason;
                }
            }
        }
    }

    /// Sends what the session has for `link` whenever woken. Application tasks may also write
    /// to the link while it is idle ([`LinkOut::write_now`]); what they could not finish is
    /// left in `out` for this task.
    async fn writer(&self, link: LinkId, out: &Mutex<LinkOut>, wake: &Notify) -> LinkEnded {
        loop {
            let sent = std::future::poll_fn(|cx| {
                let mut out = lock_out(out);
                if out.is_idle() {
                    let mut inner = self.shared.lock();
                    out.fill(link, &mut inner, &self.shared);
                    if out.is_idle() {
                        return Poll::Ready(Ok(false));
                    }
                }
                out.poll_write_out(cx).map_ok(|()| true)
            })
            .await;
            match sent {
                Ok(true) => {}
                Ok(false) => wake.notified().await,
                Err(e) => return e,
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

/// A link's write half and the frames being written to it, shared by the link's writer task
/// and application tasks that write straight to an idle link: a large write then costs no
/// wake-up of the writer task, one of the four task hand-offs a frame otherwise passes
/// (each an inter-processor interrupt when the tasks run on different CPUs).
pub(crate) struct LinkOut {
    w: Pin<Box<dyn AsyncWrite + Send>>,
    /// Where the transport takes vectored writes (sockets), large payloads go to the kernel
    /// straight from the session's queues: one copy fewer, and the lock is held only to encode
    /// headers. A bulk transfer spent a twentieth of its CPU time in that copy.
    vectored: bool,
    tx: Transmit,
    /// What non-vectored transports get instead of `tx`.
    flat: Vec<u8>,
    /// Bytes of `tx` or `flat` already written.
    done: usize,
    /// The link's writer task.
    wake: Arc<Notify>,
}

impl LinkOut {
    fn new(w: Pin<Box<dyn AsyncWrite + Send>>, wake: Arc<Notify>) -> LinkOut {
        LinkOut {
            wake,
            vectored: w.is_write_vectored(),
            w,
            tx: Transmit::default(),
            flat: Vec::new(),
            done: 0,
        }
    }

    fn len(&self) -> usize {
        if self.vectored {
            self.tx.len()
        } else {
            self.flat.len()
        }
    }

    /// Nothing is being written.
    pub(crate) fn is_idle(&self) -> bool {
        self.done >= self.len()
    }

    /// Takes what the session has to send on `link` (the last write is complete).
    pub(crate) fn fill(&mut self, link: LinkId, inner: &mut Inner, shared: &Arc<Shared>) {
        self.tx.clear();
        self.flat.clear();
        self.done = 0;
        let now = Instant::now();
        if self.vectored {
            inner
                .session
                .poll_transmit_vectored(link, now, &mut self.tx, WRITE_BATCH);
        } else {
            inner
                .session
                .poll_transmit(link, now, &mut self.flat, WRITE_BATCH);
        }
        inner.dispatch(shared);
        if inner.session.wants_input() {
            shared.input.notify_waiters();
        }
        // What was just sent may need a retransmission timer.
        inner.rearm();
    }

    /// Writes what was taken, with as few `writev` calls as the transport allows, then flushes.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LinkEnded>> {
        let mut slices = Vec::new();
        while self.done < self.len() {
            let n = if self.vectored {
                slices.clear();
                self.tx.slices(self.done, &mut slices);
                ready!(self.w.as_mut().poll_write_vectored(cx, &slices))
            } else {
                ready!(self.w.as_mut().poll_write(cx, &self.flat[self.done..]))
            };
            match n {
                Ok(0) => {
                    return Poll::Ready(Err(LinkEnded::Write(io::ErrorKind::WriteZero.into())))
                }
                Ok(n) => self.done += n,
                Err(e) => return Poll::Ready(Err(LinkEnded::Write(e))),
            }
        }
        self.w.as_mut().poll_flush(cx).map_err(LinkEnded::Flush)
    }

    /// From an application task, with the session (`inner`) locked and the link idle: takes
    /// what there is to send and writes it now, without waiting for the transport. The link's
    /// writer task is woken only if there is more to send than one batch, or if the transport
    /// was full or failed (the writer finishes the write, or sees the error again and ends
    /// the link; what was taken stays queued for retransmission, as any frame until
    /// acknowledged).
    pub(crate) fn write_now(
        &mut self,
        link: LinkId,
        mut inner: MutexGuard<'_, Inner>,
        shared: &Arc<Shared>,
    ) {
        self.fill(link, &mut inner, shared);
        let more = inner.session.wants_transmit(link, Instant::now());
        drop(inner);
        let mut cx = Context::from_waker(Waker::noop());
        if more || !matches!(self.poll_write_out(&mut cx), Poll::Ready(Ok(()))) {
            self.wake.notify_one();
        }
    }
}

/// Locks a link's output; a panic while it was held left a consistent state (a partly
/// written transmit is finished or the link fails).
pub(crate) fn lock_out(out: &Mutex<LinkOut>) -> MutexGuard<'_, LinkOut> {
    out.lock().unwrap_or_else(|e| e.into_inner())
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
