//! Freezing a session for a snapshot and restoring one (vstreamd's live upgrade).

use super::*;

/// A session held still (its lock taken) for a snapshot: while it lives no link, timer or
/// channel stream of this session moves a byte. Dropping it lets everything go on as before,
/// so a snapshot that is not used (a failed upgrade) costs nothing but the pause.
pub struct Frozen<'a> {
    shared: &'a Arc<Shared>,
    inner: MutexGuard<'a, Inner>,
}

impl Mux {
    /// Holds the session still; see [`Frozen`].
    pub fn freeze(&self) -> Frozen<'_> {
        Frozen {
            shared: &self.shared,
            inner: self.shared.lock(),
        }
    }

    /// A session from a [`Frozen::snapshot`] of another process, with no link yet (the peer
    /// resumes it on its next one). `claimed` are the channels the caller carries on: a
    /// stream for each comes back, in that order. Every other channel is reset (the service
    /// that held it did not come along), except those whose stream was already dropped.
    pub fn restore(
        cfg: Config,
        state: &[u8],
        claimed: &[ChannelId],
    ) -> Result<(Mux, mpsc::UnboundedReceiver<Incoming>, Vec<ChannelStream>), SnapshotError> {
        let (detached, session) = split_state(state, cfg.max_channels)?;
        let session = Session::restore(cfg.clone(), session, Instant::now())?;
        let (mux, rx) = Mux::new(cfg, 1);
        let streams = {
            let mut inner = mux.shared.lock();
            inner.session = session;
            let epoch = inner.epoch();
            let streams = claimed
                .iter()
                .map(|&id| {
                    inner.wakers.insert(id, Wakers::default());
                    ChannelStream::new(mux.shared.clone(), id, epoch)
                })
                .collect();
            let unclaimed: Vec<ChannelId> = inner
                .session
                .channels()
                .map(|c| c.id)
                .filter(|id| !claimed.contains(id) && !detached.contains(id))
                .collect();
            for id in unclaimed {
                let reason = "vstreamd was upgraded; this service's state was not carried over";
                let _ = inner.session.reset(id, ResetCode::Aborted, reason);
            }
            inner.detached = detached;
            streams
        };
        // No link runs the timers yet (the resume timeout among them).
        tokio::spawn(mux.clone().linger());
        Ok((mux, rx, streams))
    }
}

impl Frozen<'_> {
    /// The session's state as bytes, as if every link had gone down: what
    /// [`Mux::restore`] takes. Events pending in the session are handed out first.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.inner.dispatch(self.shared);
        let mut out = Vec::new();
        out.extend_from_slice(&(self.inner.detached.len() as u64).to_le_bytes());
        for id in &self.inner.detached {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&self.inner.session.snapshot());
        out
    }
}

/// The detached channels and the session's own state of a [`Frozen::snapshot`].
fn split_state(state: &[u8], max: usize) -> Result<(HashSet<ChannelId>, &[u8]), SnapshotError> {
    let short = || SnapshotError::new("truncated before the session");
    let n = state.get(..8).ok_or_else(short)?;
    let n = u64::from_le_bytes(n.try_into().map_err(|_| short())?);
    if n > max as u64 {
        return Err(SnapshotError::new(format!(
            "{n} detached channels, at most {max} allowed"
        )));
    }
    let end = 8 + 4 * n as usize;
    let ids = state.get(8..end).ok_or_else(short)?;
    let detached = ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((detached, &state[end..]))
}
