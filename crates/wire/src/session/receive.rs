//! The receiving half: bytes from a link become frames, HELLOs, acknowledgements and
//! sequenced frames handed to the channels.

use super::*;

impl Session {
    /// Feeds bytes received on `link`. The same as [`Session::handle_read`] with the bytes in
    /// a read buffer of their own, for callers that read elsewhere (payloads are copied).
    pub fn handle_input(&mut self, link: LinkId, data: &[u8], now: Instant) {
        let mut input = InputBuf::from(data);
        self.decode(link, &mut input, now);
        if let Some(l) = self.links.get_mut(&link) {
            // The start of a frame: kept by the decoder until the next call.
            l.decoder.push(input.filled());
        }
    }

    /// Decodes what was read into `input` on `link` since the last call (or, after a pause,
    /// what was left undecoded), then readies `input` for the next read: reads go into
    /// [`InputBuf::unfilled`]. Large payloads leave as views of the buffers they were read
    /// into, with no copy (see [`Decoder::next_in`]).
    pub fn handle_read(&mut self, link: LinkId, input: &mut InputBuf, now: Instant) {
        self.decode(link, input, now);
        match self.links.get(&link) {
            Some(l) if l.state != LinkState::Dead => l.decoder.prepare(input, &mut self.pool),
            // Nothing more is decoded on this link; reads only need somewhere to go.
            _ => Decoder::new(0).prepare(input, &mut self.pool),
        }
    }

    fn decode(&mut self, link: LinkId, input: &mut InputBuf, now: Instant) {
        let received = input.received();
        let Some(l) = self.links.get_mut(&link) else {
            input.consume(input.len());
            return;
        };
        if l.state == LinkState::Dead {
            input.consume(input.len());
            return;
        }
        l.stats.bytes_in += received as u64;
        self.now = now;
        loop {
            let pause = self.control_bytes >= CONTROL_QUEUE_LIMIT && self.control_can_drain();
            let Some(l) = self.links.get_mut(&link) else {
                input.consume(input.len());
                return;
            };
            if l.state == LinkState::Dead {
                input.consume(input.len());
                return;
            }
            if pause {
                // The rest waits until the peer reads our replies: kept, undecoded, in the
                // decoder (one read), and decoded by the next call, even with no new input.
                l.decoder.push(input.filled());
                input.consume(input.len());
                return;
            }
            let Some(item) = l.decoder.next_in(input, &mut self.pool) else {
                break;
            };
            match item {
                Ok(frame) => {
                    l.last_rx = now;
                    self.handle_frame(link, frame, now);
                }
                Err(DecodeError::Oversized { header, len, limit }) => {
                    l.last_rx = now;
                    self.handle_oversized(link, header, len, limit);
                }
                Err(DecodeError::Garbage(_)) => {
                    // Garbage before the first HELLO is normal on a console-like line (a
                    // getty prompt, boot noise); counted in the decoder stats, not an event.
                    if l.state == LinkState::Up {
                        self.protocol_error(Some(link), DecodeError::Garbage(0).into());
                    }
                }
                Err(e) => self.protocol_error(Some(link), e.into()),
            }
        }
    }

    pub(super) fn protocol_error(&mut self, link: Option<LinkId>, error: ProtocolError) {
        // Garbage is reported once per run of skipped bytes with its size in the decoder stats.
        let kind = error.kind();
        self.stats.protocol_errors += 1;
        self.stats.errors[kind as usize] += 1;
        let (report, suppressed) = self.reports.check(kind, self.now);
        if suppressed > 0 {
            self.events.push_back(Event::ErrorsSuppressed {
                kind,
                count: suppressed,
            });
        }
        if report {
            self.events.push_back(Event::ProtocolError { link, error });
        } else {
            self.stats.suppressed[kind as usize] += 1;
        }
    }

    fn handle_oversized(&mut self, link: LinkId, header: frame::Header, len: u32, limit: u32) {
        self.protocol_error(
            Some(link),
            DecodeError::Oversized { header, len, limit }.into(),
        );
        // The header was genuine: if it was the next sequenced frame, consume its number and
        // reset its channel, so the peer's retransmissions do not loop on it.
        if Kind::is_sequenced(header.kind) && header.seq == self.recv_next && self.link_is_up(link)
        {
            self.recv_next = self.recv_next.wrapping_add(1);
            self.mark_ack_due(link, len as usize, self.now);
            self.reset_with_error(
                header.channel,
                ResetCode::Protocol,
                format!("frame of {len} bytes exceeds the limit of {limit}"),
            );
        }
    }

    /// A sequenced frame of `bytes` was received: acknowledge it within [`ACK_DELAY`], or at
    /// once when a quarter of what the peer may have in flight waits for it.
    fn mark_ack_due(&mut self, link: LinkId, bytes: usize, now: Instant) {
        if let Some(l) = self.links.get_mut(&link) {
            l.ack_debt += bytes;
            let urgent = l.ack_debt >= l.params.max_inflight / 4;
            l.ack_at = match (l.ack_due, l.ack_at) {
                _ if urgent => None,
                (false, _) => Some(now + ACK_DELAY),
                (true, at) => at,
            };
            l.ack_due = true;
        }
    }

    fn handle_frame(&mut self, link: LinkId, frame: Frame, now: Instant) {
        let h = frame.header;
        let up = self.link_is_up(link);
        if h.kind == Kind::Hello as u8 {
            match Hello::decode(&frame.payload) {
                Ok(hello) => self.handle_hello(link, hello, now),
                Err(e) => {
                    self.protocol_error(Some(link), ProtocolError::Hello(e.to_string()));
                    self.kill_link(link, format!("bad HELLO: {e}"));
                }
            }
            return;
        }
        if h.kind == Kind::Refuse as u8 {
            // Valid before the handshake too: it is how a peer says why it will not have us.
            let reason = String::from_utf8_lossy(&frame.payload[..frame.payload.len().min(256)]);
            self.kill_link(link, format!("{REFUSED_BY_PEER}: {reason}"));
            return;
        }
        if !up {
            return; // Nothing counts before the handshake (stale bytes from a previous peer).
        }
        self.handle_ack(h.ack, now);
        match Kind::from_u8(h.kind) {
            Some(Kind::Ping) => {
                if let (Some(l), Ok(nonce)) = (
                    self.links.get_mut(&link),
                    <[u8; 8]>::try_from(&frame.payload[..]),
                ) {
                    l.pong = Some(u64::from_le_bytes(nonce));
                }
            }
            Some(Kind::Pong) => {
                if let Some(l) = self.links.get_mut(&link) {
                    l.ping = None;
                }
            }
            Some(Kind::Ack) | Some(Kind::Hello) | Some(Kind::Refuse) => {}
            Some(Kind::Nack) => self.handle_nack(h.ack),
            _ if Kind::is_sequenced(h.kind) && self.control_bytes >= CONTROL_QUEUE_LIMIT => {
                // Its answer could not be queued: not processed, not acknowledged.
                self.stats.deferred += 1;
            }
            _ if Kind::is_sequenced(h.kind) => self.handle_sequenced(link, frame, now),
            _ => {} // Unknown link frame kinds are ignored (forward compatibility).
        }
    }

    fn handle_hello(&mut self, link: LinkId, hello: Hello, now: Instant) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if hello.my_session == self.my_session && hello.link == l.nonce {
            // Our own HELLO came back: the line echoes (a guest tty not yet in raw mode).
            // Ignore it; the real peer's HELLO follows once its end is set up.
            l.stats.echoed_hellos += 1;
            return;
        }
        if hello.echo != l.nonce {
            l.hello_due = true; // The peer has not heard our HELLO yet.
        }
        if l.state == LinkState::Up && hello.link == l.peer_nonce {
            return; // A retransmitted HELLO of a handshake already done.
        }
        // Either the first HELLO on this link, or the peer restarted its end of the byte
        // stream (a serial line never "disconnects"): handshake again.
        let restarted_end = l.state == LinkState::Up;
        l.state = LinkState::AwaitHello;
        l.peer_nonce = hello.link;
        if hello.version != VERSION {
            let reason = format!(
                "peer speaks protocol version {}, we speak {VERSION}",
                hello.version
            );
            self.protocol_error(Some(link), ProtocolError::Hello(reason.clone()));
            self.kill_link(link, reason);
            return;
        }
        if hello.role == self.cfg.role {
            let reason = format!("peer has our own role {:?}", hello.role);
            self.protocol_error(Some(link), ProtocolError::Hello(reason.clone()));
            self.kill_link(link, reason);
            return;
        }
        // The same peer incarnation (same session id) never lost its state, whatever its HELLO
        // says of ours: a HELLO sent on a slow line before that peer learned our id (on another
        // link) arrives with `your_session` 0 after the session is established, and must not
        // be taken for a restart. A restarted peer always comes with a new id.
        let resumed = self.peer_session != 0
            && hello.my_session == self.peer_session
            && hello.caps & caps::RESUME != 0;
        if !resumed && self.peer_session != 0 {
            self.restart(link);
        }
        if resumed {
            self.handle_ack(hello.recv_next, now);
        }
        self.peer_session = hello.my_session;
        self.peer_name = Some(hello.name.clone());
        if let Some(l) = self.links.get_mut(&link) {
            l.state = LinkState::Up;
            l.frame_size = l.frame_size.min(hello.max_frame).max(1);
            // Both sides decide alike: each offered it from its own transport's kind. Our HELLO
            // precedes our first flagged frame on this byte stream, so the peer has decided too.
            let no_pcrc = l.params.checksummed && hello.caps & caps::NO_PAYLOAD_CRC != 0;
            l.decoder.set_no_pcrc(no_pcrc);
            l.flags = if no_pcrc { frame::flags::NO_PCRC } else { 0 };
            l.peer = hello.name.clone();
            l.ack_due = true;
            l.ack_at = None;
        }
        self.events.push_back(Event::LinkUp {
            link,
            peer: hello.name,
            resumed,
        });
        self.choose_active();
        if restarted_end && self.active == Some(link) {
            // What was in flight on the old incarnation of this link is lost.
            self.resend = 0;
            self.inflight = 0;
        }
    }

    /// The peer started a new session: everything of the old one is gone.
    fn restart(&mut self, keep: LinkId) {
        self.stats.session_restarts += 1;
        self.drop_state("the peer restarted; the session was replaced");
        let others: Vec<LinkId> = self.links.keys().copied().filter(|l| *l != keep).collect();
        for other in others {
            self.kill_link(other, "superseded by a new peer session".into());
        }
    }

    /// No link came back within `resume_timeout`: free everything the peer made us hold. We
    /// take a new session id, so that a peer coming back sees a restart and does not resume.
    pub(super) fn expire(&mut self) {
        self.stats.expired += 1;
        self.drop_state("the peer went away; the session expired");
        self.my_session = link_nonce(self.my_session, self.next_link) as u64
            | (u64::from(link_nonce(self.my_session, !self.next_link)) << 32);
        self.peer_session = 0;
        self.alone_since = None;
        self.pool.trim();
        self.pool.trim();
    }

    fn drop_state(&mut self, reason: &str) {
        let ids: Vec<ChannelId> = self.channels.keys().copied().collect();
        for id in ids {
            self.events.push_back(Event::ChannelReset {
                id,
                code: ResetCode::SessionLost,
                reason: reason.into(),
            });
        }
        self.channels.clear();
        self.charged = 0;
        self.control.clear();
        self.control_bytes = 0;
        self.unacked.clear();
        self.unacked_bytes = 0;
        self.resend = 0;
        self.inflight = 0;
        self.send_next = 0;
        self.recv_next = 0;
        self.nack_at = None;
        self.peer_next_channel = match self.cfg.role {
            Role::Host => 1,
            Role::Guest => 2,
        };
    }

    /// Whether a peer that was there made us hold anything. (Before any peer came, what the
    /// application queued waits for the first one, however long.)
    pub(super) fn holds_state(&self) -> bool {
        self.peer_session != 0
            && (!self.channels.is_empty() || !self.unacked.is_empty() || !self.control.is_empty())
    }

    fn handle_ack(&mut self, ack: u32, now: Instant) {
        if seq_lt(self.send_next, ack) {
            let sent = self.send_next;
            self.protocol_error(None, ProtocolError::BadAck { ack, sent });
            return;
        }
        let mut progressed = false;
        while let Some(front) = self.unacked.front() {
            if !seq_lt(front.seq, ack) {
                break;
            }
            let len = frame::wire_len(front.payload.len());
            self.unacked_bytes -= len;
            if self.resend > 0 {
                self.resend -= 1;
                self.inflight = self.inflight.saturating_sub(len);
            }
            if let Some(sent) = self.unacked.pop_front() {
                self.pool.recycle(sent.payload);
            }
            progressed = true;
        }
        if progressed {
            self.last_progress = now;
            self.backoff = 1;
        }
    }

    fn handle_nack(&mut self, from: u32) {
        // Rewind to `from` if it is still held and we already sent past it.
        let Some(front) = self.unacked.front() else {
            return;
        };
        let idx = from.wrapping_sub(front.seq) as usize;
        if idx < self.resend {
            self.inflight = self
                .unacked
                .iter()
                .take(idx)
                .map(|s| frame::wire_len(s.payload.len()))
                .sum();
            self.resend = idx;
        }
    }

    fn handle_sequenced(&mut self, link: LinkId, frame: Frame, now: Instant) {
        let seq = frame.header.seq;
        self.mark_ack_due(link, frame::wire_len(frame.payload.len()), now);
        if seq != self.recv_next {
            if seq_lt(seq, self.recv_next) {
                self.stats.duplicates += 1;
            } else {
                self.stats.out_of_order += 1;
                // Ask for a retransmission, at most once per round-trip-ish interval.
                let rto = self
                    .links
                    .get(&link)
                    .map_or(Duration::from_secs(1), |l| l.params.rto);
                if self
                    .nack_at
                    .is_none_or(|t| now.duration_since(t) >= rto / 2)
                {
                    self.nack_at = Some(now);
                    if let Some(l) = self.links.get_mut(&link) {
                        l.nack_due = true;
                    }
                }
            }
            return;
        }
        self.recv_next = self.recv_next.wrapping_add(1);
        self.nack_at = None;
        self.stats.frames_received += 1;
        let ch = frame.header.channel;
        match Kind::from_u8(frame.header.kind) {
            Some(Kind::Open) => self.on_open(ch, &frame.payload),
            Some(Kind::OpenOk) => self.on_open_ok(ch, &frame.payload),
            Some(Kind::Data) => self.on_data(ch, frame.payload),
            Some(Kind::Credit) => self.on_credit(ch, &frame.payload),
            Some(Kind::Close) => self.on_close(ch),
            Some(Kind::Reset) => self.on_reset(ch, &frame.payload),
            _ => self.protocol_error(
                Some(link),
                ProtocolError::BadFrame {
                    channel: ch,
                    what: format!("unknown frame kind {:#04x}", frame.header.kind),
                },
            ),
        }
    }
}
