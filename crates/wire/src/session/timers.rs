//! Time: when the caller should call back, and what happens when it does.

use super::*;

impl Session {
    /// When [`Session::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut earliest = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(at) = self.reports.next_flush() {
            earliest(at);
        }
        if let Some(since) = self.alone_since.filter(|_| self.holds_state()) {
            // A configured "never" must not overflow the clock.
            if let Some(at) = since.checked_add(self.cfg.resume_timeout) {
                earliest(at);
            }
        }
        for l in self.links.values() {
            match l.state {
                LinkState::Dead => {}
                LinkState::AwaitHello => {
                    earliest(l.since + self.cfg.keepalive_timeout);
                    if let Some(t) = l.hello_at {
                        earliest(t + HELLO_RETRY);
                    }
                }
                LinkState::Up => {
                    earliest(l.last_rx + self.cfg.keepalive_timeout);
                    if l.ping.is_none() {
                        earliest(l.last_rx + self.cfg.keepalive_interval);
                    }
                    if let Some(at) = l.ack_at.filter(|_| l.ack_due) {
                        earliest(at);
                    }
                }
            }
        }
        if let Some(l) = self.active.and_then(|a| self.links.get(&a)) {
            if self.resend > 0 {
                earliest(self.last_progress + l.params.rto * self.backoff);
            }
        }
        t
    }

    /// Runs timers: keepalive, dead links, retransmission.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        for (kind, count) in self.reports.flush(now) {
            self.events
                .push_back(Event::ErrorsSuppressed { kind, count });
        }
        if self
            .alone_since
            .is_some_and(|t| now.duration_since(t) >= self.cfg.resume_timeout)
            && self.holds_state()
        {
            self.expire();
        }
        if now.duration_since(self.pool_trimmed) >= POOL_TRIM_INTERVAL {
            self.pool_trimmed = now;
            self.pool.trim();
        }
        let mut dead = Vec::new();
        for l in self.links.values_mut() {
            // Due now: wanted by `wants_transmit`, and no longer a deadline to wake for.
            if l.ack_at.is_some_and(|t| now >= t) {
                l.ack_at = None;
            }
        }
        for (id, l) in &self.links {
            let limit = self.cfg.keepalive_timeout;
            match l.state {
                LinkState::AwaitHello if now.duration_since(l.since) >= limit => {
                    dead.push((*id, format!("no handshake within {limit:?}")))
                }
                LinkState::Up if now.duration_since(l.last_rx) >= limit => dead.push((
                    *id,
                    format!("peer silent for {limit:?} (keepalive timeout)"),
                )),
                _ => {}
            }
        }
        for (id, reason) in dead {
            self.kill_link(id, reason);
        }
        if let Some(l) = self.active.and_then(|a| self.links.get(&a)) {
            if self.resend > 0
                && now.duration_since(self.last_progress) >= l.params.rto * self.backoff
            {
                self.stats.timeouts += 1;
                self.resend = 0;
                self.inflight = 0;
                self.backoff = (self.backoff * 2).min(8);
                self.last_progress = now;
            }
        }
    }

    /// True when something is waiting to be sent on `link` right now.
    pub fn wants_transmit(&self, link: LinkId, now: Instant) -> bool {
        let Some(l) = self.links.get(&link) else {
            return false;
        };
        if l.state == LinkState::Dead {
            return false;
        }
        if l.hello_due {
            return true;
        }
        if l.state != LinkState::Up {
            return l
                .hello_at
                .is_some_and(|t| now.duration_since(t) >= HELLO_RETRY);
        }
        if l.pong.is_some() || l.nack_due || (l.ack_due && l.ack_at.is_none_or(|t| now >= t)) {
            return true;
        }
        if l.ping.is_none() && now.duration_since(l.last_rx) >= self.cfg.keepalive_interval {
            return true;
        }
        if self.active != Some(link) || self.inflight >= l.params.max_inflight {
            return false;
        }
        self.resend < self.unacked.len()
            || (self.unacked_bytes < self.cfg.max_unacked
                && (!self.control.is_empty()
                    || self.channels.values().any(|ch| {
                        ch.can_send()
                            && ((!ch.send_buf.is_empty() && ch.credit > 0)
                                || (ch.send_buf.is_empty() && ch.fin_queued && !ch.fin_sent))
                    })))
    }
}
