//! The state a session's links and channel streams share: the session, the wakers waiting on
//! it, the links, and how session events reach them.

use super::*;

/// Counts one link's violations over [`VIOLATION_WINDOW`].
#[derive(Debug)]
pub(crate) struct ViolationBudget {
    since: Instant,
    count: u64,
}

impl ViolationBudget {
    pub(crate) fn new(now: Instant) -> ViolationBudget {
        ViolationBudget {
            since: now,
            count: 0,
        }
    }

    /// Adds `n` violations at `now`; the reason to close the link once over the budget.
    pub(crate) fn add(&mut self, n: u64, now: Instant) -> Option<LinkEnded> {
        if now.duration_since(self.since) > VIOLATION_WINDOW {
            *self = ViolationBudget::new(now);
        }
        self.count += n;
        (self.count > MAX_VIOLATIONS).then(|| LinkEnded::Violations {
            count: self.count,
            elapsed_ms: now.duration_since(self.since).as_millis(),
        })
    }
}

pub(crate) struct LinkEntry {
    pub(crate) transport: String,
    pub(crate) up: bool,
    pub(crate) since: SystemTime,
    pub(crate) wake: Arc<Notify>,
    pub(crate) down: Arc<Notify>,
    /// Wakes the link's timer when the session needs it sooner than it sleeps.
    pub(crate) timer: Arc<Notify>,
    pub(crate) down_reason: Option<String>,
    /// The link's write half, for direct writes by application tasks.
    pub(crate) out: Arc<Mutex<LinkOut>>,
}

#[derive(Default)]
pub(crate) struct Wakers {
    pub(crate) reader: Option<Waker>,
    pub(crate) writer: Option<Waker>,
}

pub(crate) struct Inner {
    pub(crate) session: Session,
    pub(crate) wakers: HashMap<ChannelId, Wakers>,
    /// Channels that ended with an error, for the streams still held by the application.
    pub(crate) ended: HashMap<ChannelId, String>,
    /// Channels whose stream was dropped: incoming data is discarded until the peer closes.
    pub(crate) detached: HashSet<ChannelId>,
    pub(crate) opening: HashMap<ChannelId, oneshot::Sender<Result<(), String>>>,
    pub(crate) incoming: Option<mpsc::UnboundedSender<Incoming>>,
    pub(crate) links: BTreeMap<LinkId, LinkEntry>,
    pub(crate) events: broadcast::Sender<MuxEvent>,
    /// Which channel resets by the peer are logged (the session limits its own reports).
    pub(crate) reset_logs: ReportLimit<u16>,
    /// The deadline the link timers sleep until (`None`: until woken).
    pub(crate) timer_at: Option<Instant>,
}

pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) label: String,
    /// Wakes the readers paused because the session wanted no input.
    pub(crate) input: Notify,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in this crate; the state is still consistent
        // enough to keep serving other guests, so recover the guard rather than propagate.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    pub(crate) fn epoch(&self) -> u64 {
        self.session.epoch()
    }

    /// Logs the counts of channel-reset lines held back in intervals now over.
    pub(crate) fn flush_reset_logs(&mut self, shared: &Shared) {
        for (code, n) in self.reset_logs.flush(Instant::now()) {
            tracing::warn!(peer = %shared.label, code, "{n} more channel resets not logged");
        }
    }

    /// Hands session events to whoever waits for them.
    pub(crate) fn dispatch(&mut self, shared: &Arc<Shared>) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::Readable(id) => {
                    if self.detached.contains(&id) {
                        self.discard(id);
                    } else if let Some(w) = self.wakers.get_mut(&id).and_then(|w| w.reader.take()) {
                        w.wake();
                    }
                }
                Event::Writable(id) => {
                    if let Some(w) = self.wakers.get_mut(&id).and_then(|w| w.writer.take()) {
                        w.wake();
                    }
                }
                Event::ChannelReady(id) => {
                    if let Some(tx) = self.opening.remove(&id) {
                        let _ = tx.send(Ok(()));
                    }
                }
                Event::ChannelReset { id, code, reason } => {
                    let reason = format!("channel reset ({code:?}): {reason}");
                    if code != ResetCode::Aborted {
                        let (log, held) = self.reset_logs.check(code as u16, Instant::now());
                        if held > 0 {
                            tracing::warn!(peer = %shared.label, "{held} more channel resets not logged");
                        }
                        // Expected after a peer restart, but each lost channel is said once.
                        if log && code == ResetCode::SessionLost {
                            tracing::info!(peer = %shared.label, channel = id, "{reason}");
                        } else if log {
                            tracing::warn!(peer = %shared.label, channel = id, "{reason}");
                        }
                    }
                    if code != ResetCode::SessionLost && code != ResetCode::Aborted {
                        let _ = self.events.send(MuxEvent::ChannelReset {
                            channel: id,
                            reason: reason.clone(),
                        });
                    }
                    if let Some(tx) = self.opening.remove(&id) {
                        let _ = tx.send(Err(reason.clone()));
                    }
                    self.detached.remove(&id);
                    if code == ResetCode::SessionLost {
                        // Streams of the old session see the epoch change; ids are reused.
                        self.ended.clear();
                    } else if self.wakers.contains_key(&id) {
                        self.ended.insert(id, reason);
                    }
                    self.wake_both(id);
                }
                Event::ChannelClosed(id) => {
                    self.detached.remove(&id);
                    self.wake_both(id);
                }
                Event::ChannelOpened { id, class, name } => {
                    let mut stream = ChannelStream::new(shared.clone(), id, self.epoch());
                    stream.pending_accept = true;
                    self.wakers.insert(id, Wakers::default());
                    let refused = match &self.incoming {
                        Some(tx) => tx
                            .send(Incoming {
                                stream,
                                class,
                                name,
                            })
                            .is_err(),
                        None => true,
                    };
                    if refused {
                        // The stream was dropped inside the failed send; it detached itself.
                        let _ = self.session.reset(id, ResetCode::Refused, "no service");
                    }
                }
                Event::LinkUp {
                    link,
                    peer,
                    resumed,
                } => {
                    if let Some(e) = self.links.get_mut(&link) {
                        e.up = true;
                        e.since = SystemTime::now();
                        tracing::info!(peer = %peer, transport = %e.transport, resumed, "link up");
                        let _ = self.events.send(MuxEvent::LinkUp {
                            link: link.0,
                            transport: e.transport.clone(),
                            peer,
                            resumed,
                        });
                    }
                }
                Event::LinkDown { link, reason } => {
                    if let Some(e) = self.links.get_mut(&link) {
                        e.down_reason = Some(reason);
                        e.down.notify_one();
                    }
                }
                Event::ErrorsSuppressed { kind, count } => {
                    tracing::warn!(
                        peer = %shared.label,
                        "{count} more protocol errors of kind {} not logged",
                        kind.name()
                    );
                }
                Event::ProtocolError { link, error } => {
                    let transport = link
                        .and_then(|l| self.links.get(&l))
                        .map_or("-", |e| e.transport.as_str());
                    tracing::warn!(peer = %shared.label, transport, "protocol error: {error}");
                    let _ = self.events.send(MuxEvent::ProtocolError {
                        error: error.to_string(),
                    });
                }
            }
        }
    }

    pub(crate) fn wake_both(&mut self, id: ChannelId) {
        if let Some(w) = self.wakers.get_mut(&id) {
            if let Some(r) = w.reader.take() {
                r.wake();
            }
            if let Some(wr) = w.writer.take() {
                wr.wake();
            }
        }
    }

    pub(crate) fn discard(&mut self, id: ChannelId) {
        let mut sink = [0u8; 4096];
        while let Ok(Recv::Data(_)) = self.session.recv(id, &mut sink) {}
    }

    /// Wakes every link's writer: something may be ready to send.
    pub(crate) fn kick(&mut self) {
        for e in self.links.values() {
            e.wake.notify_one();
        }
        self.rearm();
    }

    /// Wakes the writer of each link that has something to send now (and rearms the timers):
    /// after input or a read that may only have made an acknowledgement or a credit due, which
    /// the session sends later, batched, or on the next frame it sends anyway.
    pub(crate) fn kick_if_wanted(&mut self) {
        let now = Instant::now();
        for (link, e) in &self.links {
            if self.session.wants_transmit(*link, now) {
                e.wake.notify_one();
            }
        }
        self.rearm();
    }

    /// Wakes the link timers if the session's next deadline is now earlier than the one they
    /// sleep until (a retransmission after new data, a new link's handshake): timers sleep
    /// exactly until the next deadline, and an idle session wakes only for its keepalives.
    pub(crate) fn rearm(&mut self) {
        let Some(next) = self.session.poll_timeout() else {
            return;
        };
        if self.timer_at.is_none_or(|at| next < at) {
            self.timer_at = Some(next);
            for e in self.links.values() {
                e.timer.notify_one();
            }
        }
    }
}
