//! One channel as an async byte stream.

use super::*;

/// Writes of at least this many bytes are sent by the writing task itself when the link is
/// idle ([`LinkOut::write_now`]); smaller ones are left to the link's writer task, which
/// batches many of them into one `writev`.
const DIRECT_MIN: usize = 16 * 1024;

/// One channel as an async byte stream. Dropping it closes our direction; data the peer sends
/// afterwards is discarded.
pub struct ChannelStream {
    shared: Arc<Shared>,
    id: ChannelId,
    epoch: u64,
    /// A peer-opened channel not yet accepted: the first read or write accepts it, a `reset`
    /// before that refuses it (the opener's `open` fails with the reason).
    pub(crate) pending_accept: bool,
}

impl std::fmt::Debug for ChannelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelStream({}#{})", self.shared.label, self.id)
    }
}

impl ChannelStream {
    pub(crate) fn new(shared: Arc<Shared>, id: ChannelId, epoch: u64) -> ChannelStream {
        ChannelStream {
            shared,
            id,
            epoch,
            pending_accept: false,
        }
    }

    /// Takes the fields it needs (not `&mut self`) so that callers can hold the lock guard
    /// borrowed from `self.shared` without cloning the `Arc`: that clone and drop, two atomic
    /// operations on a line both cores touch, cost 18% of the CPU time at 64-byte writes.
    fn accept_if_pending(pending: &mut bool, id: ChannelId, epoch: u64, inner: &mut Inner) {
        if std::mem::take(pending) && inner.epoch() == epoch {
            let _ = inner.session.accept(id);
            inner.kick();
        }
    }

    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// Aborts the channel (the peer sees a reset with `reason`).
    pub fn reset(&self, reason: &str) {
        let mut inner = self.shared.lock();
        let code = if self.pending_accept {
            ResetCode::Refused
        } else {
            ResetCode::Aborted
        };
        if inner.epoch() == self.epoch && inner.session.reset(self.id, code, reason).is_ok() {
            inner.kick();
        }
    }

    /// Checks that the channel still belongs to the current session; maps errors.
    fn gone(&self, inner: &Inner, e: ChannelError) -> io::Error {
        if inner.epoch() != self.epoch {
            return io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the peer restarted; channel lost",
            );
        }
        match (e, inner.ended.get(&self.id)) {
            (_, Some(reason)) => io::Error::new(io::ErrorKind::ConnectionReset, reason.clone()),
            (ChannelError::Closed(_), None) => {
                io::Error::new(io::ErrorKind::BrokenPipe, "channel closed for sending")
            }
            (e, None) => io::Error::new(io::ErrorKind::NotConnected, e.to_string()),
        }
    }
}

impl ChannelStream {
    /// Queues all of `data`, waiting for room as `write_all` does. Payloads of
    /// [`vstream_wire::SHARE_MIN`] bytes or more are sent from `data` itself and kept until
    /// the peer acknowledges them, never copied in user space ([`AsyncWrite`] copies).
    pub async fn write_bytes(&mut self, mut data: Bytes) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_bytes(cx, &mut data)).await
    }

    /// The poll form of [`ChannelStream::write_bytes`]: ready once `data` is all queued (it
    /// is advanced past what was).
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            if let Err(e) = ready!(self.poll_send(cx, false, |s, id| s.send_bytes(id, data))) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Up to `max` (> 0) received bytes, as received: the buffer a frame arrived in, or a
    /// part of it, without the copy into a caller's buffer that [`AsyncRead`] makes. Empty at
    /// the end of the stream.
    pub async fn read_bytes(&mut self, max: usize) -> io::Result<Bytes> {
        std::future::poll_fn(|cx| self.poll_read_bytes(cx, max)).await
    }

    /// The poll form of [`ChannelStream::read_bytes`].
    pub fn poll_read_bytes(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Bytes>> {
        self.poll_recv(cx, |s, id| s.recv_bytes(id, max.max(1)))
            .map_ok(Option::unwrap_or_default)
    }

    /// A receive with `recv` under the lock: `Some` data, `None` at the end of the stream.
    fn poll_recv<T>(
        &mut self,
        cx: &mut Context<'_>,
        recv: impl FnOnce(&mut Session, ChannelId) -> Result<Recv<T>, ChannelError>,
    ) -> Poll<io::Result<Option<T>>> {
        let mut inner = self.shared.lock();
        Self::accept_if_pending(&mut self.pending_accept, self.id, self.epoch, &mut inner);
        if inner.epoch() != self.epoch {
            return Poll::Ready(Err(self.gone(&inner, ChannelError::Unknown(self.id))));
        }
        match recv(&mut inner.session, self.id) {
            Ok(Recv::Data(data)) => {
                // Only a credit the peer waits for is worth waking a link's writer for.
                inner.kick_if_wanted();
                Poll::Ready(Ok(Some(data)))
            }
            Ok(Recv::Eof) => Poll::Ready(Ok(None)),
            Ok(Recv::WouldBlock) => {
                inner.wakers.entry(self.id).or_default().reader = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(e) => {
                if inner.ended.contains_key(&self.id) {
                    Poll::Ready(Err(self.gone(&inner, e)))
                } else {
                    Poll::Ready(Ok(None)) // Closed cleanly in both directions: EOF.
                }
            }
        }
    }

    /// Queues bytes with `send` under the lock; pending (with the waker kept) while it
    /// accepts none of a write that is not `empty`.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        empty: bool,
        send: impl FnOnce(&mut Session, ChannelId) -> Result<usize, ChannelError>,
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        Self::accept_if_pending(&mut self.pending_accept, self.id, self.epoch, &mut inner);
        if inner.epoch() != self.epoch {
            return Poll::Ready(Err(self.gone(&inner, ChannelError::Unknown(self.id))));
        }
        match send(&mut inner.session, self.id) {
            Ok(0) if !empty => {
                inner.wakers.entry(self.id).or_default().writer = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(n) if n >= DIRECT_MIN => {
                Self::write_direct(inner, &self.shared);
                Poll::Ready(Ok(n))
            }
            Ok(n) => {
                inner.kick();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(self.gone(&inner, e))),
        }
    }

    /// Sends what was just queued from this task if the active link is idle, instead of
    /// waking the link's writer task; otherwise wakes it, as [`Inner::kick`] does.
    fn write_direct(mut inner: MutexGuard<'_, Inner>, shared: &Arc<Shared>) {
        let out = inner
            .session
            .active_link()
            .and_then(|link| Some((link, inner.links.get(&link)?.out.clone())));
        let Some((link, out)) = out else {
            inner.kick();
            return;
        };
        match out.try_lock() {
            Ok(mut o) if o.is_idle() => o.write_now(link, inner, shared),
            // The writer task is writing: it takes the new data when done.
            _ => inner.kick(),
        };
    }
}

impl AsyncRead for ChannelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Straight into the reader's memory, initialised or not (no memset first).
        let max = buf.remaining();
        ready!(self
            .get_mut()
            .poll_recv(cx, |s, id| s.recv_with(id, max, |part| buf.put_slice(part))))?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_send(cx, data.is_empty(), |s, id| s.send(id, data))
    }

    /// All the slices under one lock, so that a record's header and its payload written
    /// together are queued together: one wake-up of the link's writer, not one that may send
    /// the header in a frame of its own.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let empty = bufs.iter().all(|b| b.is_empty());
        self.get_mut().poll_send(cx, empty, |s, id| {
            let mut queued = 0;
            for b in bufs {
                match s.send(id, b) {
                    Ok(n) => {
                        queued += n;
                        if n < b.len() {
                            break;
                        }
                    }
                    // What was queued is reported; the error comes again with the next write.
                    Err(_) if queued > 0 => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(queued)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data is queued in the session and sent (and retransmitted) by the link tasks.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        if inner.epoch() == this.epoch {
            let _ = inner.session.close(this.id);
            inner.kick();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for ChannelStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if inner.epoch() != self.epoch {
            // A stream of a replaced session: its id may already name a new channel, whose
            // wakers and state must stay.
            return;
        }
        inner.wakers.remove(&self.id);
        inner.ended.remove(&self.id);
        if !inner.session.has_channel(self.id) {
            return;
        }
        if self.pending_accept {
            let reason = "the service did not take the channel";
            let _ = inner.session.reset(self.id, ResetCode::Refused, reason);
            inner.kick();
            return;
        }
        let _ = inner.session.close(self.id);
        inner.detached.insert(self.id);
        inner.discard(self.id);
        inner.kick();
    }
}
