//! One channel as an async byte stream.

use super::*;

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

impl AsyncRead for ChannelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        Self::accept_if_pending(&mut this.pending_accept, this.id, this.epoch, &mut inner);
        if inner.epoch() != this.epoch {
            return Poll::Ready(Err(this.gone(&inner, ChannelError::Unknown(this.id))));
        }
        match inner.session.recv(this.id, buf.initialize_unfilled()) {
            Ok(Recv::Data(n)) => {
                buf.advance(n);
                inner.kick();
                Poll::Ready(Ok(()))
            }
            Ok(Recv::Eof) => Poll::Ready(Ok(())),
            Ok(Recv::WouldBlock) => {
                inner.wakers.entry(this.id).or_default().reader = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(e) => {
                if inner.ended.contains_key(&this.id) {
                    Poll::Ready(Err(this.gone(&inner, e)))
                } else {
                    Poll::Ready(Ok(())) // Closed cleanly in both directions: EOF.
                }
            }
        }
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        Self::accept_if_pending(&mut this.pending_accept, this.id, this.epoch, &mut inner);
        if inner.epoch() != this.epoch {
            return Poll::Ready(Err(this.gone(&inner, ChannelError::Unknown(this.id))));
        }
        match inner.session.send(this.id, data) {
            Ok(0) if !data.is_empty() => {
                inner.wakers.entry(this.id).or_default().writer = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(n) => {
                inner.kick();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(this.gone(&inner, e))),
        }
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
