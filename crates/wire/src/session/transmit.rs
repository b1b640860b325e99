//! The sending half: HELLOs, control frames, retransmissions and new data, per link.

use super::*;

impl Session {
    /// Appends frames for `link` to `out`, stopping once roughly `max` bytes were added.
    /// Returns the number of bytes added (0 = nothing to send now).
    pub fn poll_transmit(
        &mut self,
        link: LinkId,
        now: Instant,
        out: &mut Vec<u8>,
        max: usize,
    ) -> usize {
        self.transmit(link, now, out, max)
    }

    /// [`Session::poll_transmit`] for a vectored write: the same frames, the same bytes, but
    /// large payloads are not copied (they are shared with the retransmission queue). On a
    /// 64 KiB bulk transfer that copy was a twentieth of the CPU time, all of it spent holding
    /// the driver's lock.
    pub fn poll_transmit_vectored(
        &mut self,
        link: LinkId,
        now: Instant,
        out: &mut Transmit,
        max: usize,
    ) -> usize {
        self.transmit(link, now, out, max)
    }

    fn transmit<S: Sink>(&mut self, link: LinkId, now: Instant, out: &mut S, max: usize) -> usize {
        let start = out.encoded();
        let ack = self.recv_next;
        let Some(l) = self.links.get_mut(&link) else {
            return 0;
        };
        if l.state == LinkState::Dead {
            return 0;
        }
        let hello_retry = l.state == LinkState::AwaitHello
            && l.hello_at
                .is_some_and(|t| now.duration_since(t) >= HELLO_RETRY);
        if l.hello_due || hello_retry {
            l.hello_due = false;
            l.hello_at = Some(now);
            let hello = Hello {
                version: VERSION,
                role: self.cfg.role,
                caps: caps::RESUME
                    | if l.params.checksummed {
                        caps::NO_PAYLOAD_CRC
                    } else {
                        0
                    },
                my_session: self.my_session,
                your_session: self.peer_session,
                recv_next: self.recv_next,
                max_frame: self.cfg.max_frame,
                link: l.nonce,
                echo: l.peer_nonce,
                name: self.cfg.name.clone(),
            };
            // Always with its CRC: the peer may have restarted and forgotten the negotiation.
            out.small(0, Kind::Hello as u8, 0, 0, 0, &hello.encode());
        }
        if l.state != LinkState::Up {
            return self.account(link, out.encoded() - start);
        }
        let flags = l.flags;
        if let Some(nonce) = l.pong.take() {
            out.small(flags, Kind::Pong as u8, 0, 0, ack, &nonce.to_le_bytes());
        }
        if l.ping.is_none() && now.duration_since(l.last_rx) >= self.cfg.keepalive_interval {
            self.ping_nonce = self.ping_nonce.wrapping_add(1);
            l.ping = Some((self.ping_nonce, now));
            out.small(
                flags,
                Kind::Ping as u8,
                0,
                0,
                ack,
                &self.ping_nonce.to_le_bytes(),
            );
        }
        if std::mem::take(&mut l.nack_due) {
            out.small(flags, Kind::Nack as u8, 0, 0, ack, &[]);
        }
        let frame_size = l.frame_size as usize;
        let max_inflight = l.params.max_inflight;
        let had_ack_due = std::mem::take(&mut l.ack_due);
        // Every frame sent below carries the acknowledgement.
        l.ack_at = None;
        l.ack_debt = 0;
        if self.active == Some(link) {
            self.transmit_sequenced(out, flags, start, max, frame_size, max_inflight, now);
        }
        if had_ack_due && out.encoded() == start {
            out.small(flags, Kind::Ack as u8, 0, 0, ack, &[]);
        }
        self.account(link, out.encoded() - start)
    }

    fn account(&mut self, link: LinkId, n: usize) -> usize {
        if let Some(l) = self.links.get_mut(&link) {
            l.stats.bytes_out += n as u64;
        }
        n
    }

    #[allow(clippy::too_many_arguments)]
    fn transmit_sequenced<S: Sink>(
        &mut self,
        out: &mut S,
        flags: u8,
        start: usize,
        max: usize,
        frame_size: usize,
        max_inflight: usize,
        now: Instant,
    ) {
        let ack = self.recv_next;
        let room =
            |out: &S, inflight: usize| out.encoded() - start < max && inflight < max_inflight;
        // Retransmissions first, in order.
        while self.resend < self.unacked.len() && room(out, self.inflight) {
            let s = &self.unacked[self.resend];
            out.frame(flags, s.kind as u8, s.channel, s.seq, ack, &s.payload);
            self.inflight += frame::wire_len(s.payload.len());
            self.resend += 1;
            self.stats.frames_retransmitted += 1;
        }
        if self.resend < self.unacked.len() {
            return;
        }
        if self.unacked.is_empty() {
            self.last_progress = now;
        }
        // Control frames, then data round-robin over channels with credit.
        while room(out, self.inflight) && self.unacked_bytes < self.cfg.max_unacked {
            if let Some((kind, ch, payload)) = self.control.pop_front() {
                self.control_bytes -= frame::wire_len(payload.len()) + CONTROL_ENTRY_OVERHEAD;
                self.push_new(out, flags, kind, ch, payload, ack);
                continue;
            }
            if !self.next_data_frame(out, flags, frame_size, ack) {
                break;
            }
        }
    }

    fn push_new<S: Sink>(
        &mut self,
        out: &mut S,
        flags: u8,
        kind: Kind,
        channel: u32,
        payload: Bytes,
        ack: u32,
    ) {
        let seq = self.send_next;
        self.send_next = self.send_next.wrapping_add(1);
        out.frame(flags, kind as u8, channel, seq, ack, &payload);
        let len = frame::wire_len(payload.len());
        self.unacked_bytes += len;
        self.inflight += len;
        self.unacked.push_back(Sent {
            seq,
            kind,
            channel,
            payload,
        });
        self.resend = self.unacked.len();
        self.stats.frames_sent += 1;
    }

    /// Sends one DATA (or CLOSE) frame from the next channel that has something to send.
    fn next_data_frame<S: Sink>(
        &mut self,
        out: &mut S,
        flags: u8,
        frame_size: usize,
        ack: u32,
    ) -> bool {
        let pick = self
            .channels
            .range(self.rr_cursor..)
            .chain(self.channels.range(..self.rr_cursor))
            .find(|(_, ch)| {
                ch.can_send()
                    && ((!ch.send_buf.is_empty() && ch.credit > 0)
                        || (ch.send_buf.is_empty() && ch.fin_queued && !ch.fin_sent))
            })
            .map(|(id, _)| *id);
        let Some(id) = pick else { return false };
        self.rr_cursor = id.wrapping_add(1);
        let Some(ch) = self.channels.get_mut(&id) else {
            return false;
        };
        if ch.send_buf.is_empty() {
            ch.fin_sent = true;
            self.push_new(out, flags, Kind::Close, id, Bytes::new(), ack);
            self.maybe_finish(id);
            return true;
        }
        let credit = usize::try_from(ch.credit).unwrap_or(usize::MAX);
        let n = ch.send_buf.len().min(credit).min(frame_size);
        let was_full = ch.send_buf.len() >= ch.tx_limit;
        let payload = ch.send_buf.take(n);
        let n = payload.len();
        ch.credit -= n as u64;
        ch.bytes_out += n as u64;
        if was_full {
            self.events.push_back(Event::Writable(id));
        }
        self.push_new(out, flags, Kind::Data, id, payload, ack);
        true
    }
}
