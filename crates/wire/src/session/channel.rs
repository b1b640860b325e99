//! Channels: their state, their send queues, the frames that change them and the calls the
//! application makes on them.

use super::*;

#[derive(Debug)]
pub(super) struct Channel {
    pub(super) class: String,
    pub(super) name: String,
    pub(super) local: bool,
    /// Our OPEN is not yet answered.
    pub(super) opening: bool,
    /// (Peer-opened channels) our application accepted it and OPEN_OK is queued or sent.
    pub(super) accepted: bool,
    pub(super) send_buf: SendQueue,
    pub(super) credit: u64,
    pub(super) fin_queued: bool,
    pub(super) fin_sent: bool,
    pub(super) rx: VecDeque<Bytes>,
    /// Small payloads received after those in `rx`, coalesced (see [`RX_SMALL`]).
    pub(super) rx_tail: BytesMut,
    pub(super) rx_len: usize,
    pub(super) rx_received: u64,
    pub(super) rx_granted: u64,
    pub(super) rx_unreported: u32,
    /// Within the current round of one window's worth of reads (`rx_round` bytes so far):
    /// the peer used (nearly) all its credit ...
    pub(super) rx_peer_waited: bool,
    /// ... and the application read everything we held. Both: the window limits the channel.
    pub(super) rx_app_drained: bool,
    pub(super) rx_round: u64,
    /// How many unsent bytes the application may queue now: `channel_send_buffer`, grown (up
    /// to `channel_window_max`) to the credit the peer grants once it exceeds it.
    pub(super) tx_limit: usize,
    /// What this channel takes from `peer_buffer_limit` ([`Config::channel_charge`] with its
    /// grown window and send buffer).
    pub(super) charge: usize,
    pub(super) remote_fin: bool,
    pub(super) eof_read: bool,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
}

impl Channel {
    pub(super) fn new(class: String, name: String, local: bool, cfg: &Config) -> Channel {
        Channel {
            class,
            name,
            local,
            opening: local,
            accepted: false,
            send_buf: SendQueue::default(),
            credit: 0,
            fin_queued: false,
            fin_sent: false,
            rx: VecDeque::new(),
            rx_tail: BytesMut::new(),
            rx_len: 0,
            rx_received: 0,
            rx_granted: u64::from(cfg.channel_window),
            rx_unreported: 0,
            rx_peer_waited: false,
            rx_app_drained: false,
            rx_round: 0,
            tx_limit: cfg.channel_send_buffer,
            charge: cfg.channel_charge(),
            remote_fin: false,
            eof_read: false,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Our receive window now: every byte of it is credit the peer has not used, received and
    /// not read, or read and not granted again. `channel_window` at first; it grows when a
    /// CREDIT grants more ([`Session::grow_window`]).
    pub(super) fn rx_window(&self) -> u32 {
        let w = self.rx_granted.saturating_sub(self.rx_received)
            + self.rx_len as u64
            + u64::from(self.rx_unreported);
        // At most channel_window_max (a u32) by construction.
        u32::try_from(w).unwrap_or(u32::MAX)
    }

    /// Both ends agreed the channel exists.
    pub(super) fn can_send(&self) -> bool {
        !self.opening && (self.local || self.accepted)
    }

    pub(super) fn finished(&self) -> bool {
        self.fin_sent && self.eof_read
    }
}

/// Smallest payload [`Session::send_bytes`] sends from the application's buffer rather than
/// copying: below it, a frame header per write costs more than the copy it saves.
pub const SHARE_MIN: usize = 4096;

/// Smallest chunk a [`SendQueue`] allocates (unless frames are smaller still).
const MIN_SEND_CHUNK: usize = 4096;

/// Bytes an application queued on a channel, in chunks that are never reallocated.
///
/// A frame's payload is a zero-copy view into its chunk, kept until acknowledged. With one
/// growing buffer (as before), those views pinned the buffer, so appending moved it to a fresh
/// allocation (copying what was queued and page-faulting new memory) about every window; the
/// profile of a 64 KiB bulk transfer showed a fifth of all CPU time there. Chunks are only ever
/// appended to within their capacity, and frames never span two chunks, so neither happens.
#[derive(Debug, Default)]
pub(super) struct SendQueue {
    pub(super) chunks: VecDeque<Chunk>,
    pub(super) len: usize,
    /// Capacity of the last chunk allocated: chunks double up to the frame size, so that an
    /// idle console holds little memory and a bulk channel fills whole frames.
    pub(super) chunk: usize,
}

/// One piece of a [`SendQueue`].
#[derive(Debug)]
pub(super) enum Chunk {
    /// Copied bytes; appended to while it has room.
    Filled(BytesMut),
    /// The application's own buffer ([`Session::send_bytes`]): frames are views of it, so
    /// large writes are never copied in user space.
    Shared(Bytes),
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Filled(b) => b,
            Chunk::Shared(b) => b,
        }
    }
}

impl SendQueue {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`. Chunks need be no larger than a frame payload, the pool's buffer size.
    pub(super) fn push(&mut self, mut data: &[u8], pool: &mut BufferPool) {
        let max = pool.size();
        self.len += data.len();
        while !data.is_empty() {
            let room = match self.chunks.back() {
                Some(Chunk::Filled(c)) => c.capacity() - c.len(),
                _ => 0,
            };
            if room == 0 {
                self.chunk = (self.chunk * 2)
                    .max(data.len().min(max))
                    .clamp(MIN_SEND_CHUNK.min(max), max);
                self.chunks.push_back(Chunk::Filled(if self.chunk == max {
                    pool.take()
                } else {
                    BytesMut::with_capacity(self.chunk)
                }));
                continue;
            }
            let Some(Chunk::Filled(tail)) = self.chunks.back_mut() else {
                break;
            };
            let k = room.min(data.len());
            // Within the capacity: never reallocates, even while frames share the chunk.
            tail.extend_from_slice(&data[..k]);
            data = &data[k..];
        }
    }

    /// Appends `data` without copying it.
    pub(super) fn push_shared(&mut self, data: Bytes) {
        self.len += data.len();
        self.chunks.push_back(Chunk::Shared(data));
    }

    /// Up to `n` (> 0) queued bytes, without copying. A frame stops at the end of a chunk, so
    /// frame boundaries may differ from the old single buffer; the byte stream does not.
    pub(super) fn take(&mut self, n: usize) -> Bytes {
        let last = self.chunks.len() == 1;
        let Some(front) = self.chunks.front_mut() else {
            return Bytes::new();
        };
        let (payload, drop_front) = match front {
            Chunk::Filled(c) => {
                let payload = c.split_to(n.min(c.len())).freeze();
                // The last filled chunk stays, to be appended to.
                (payload, c.is_empty() && (c.capacity() == 0 || !last))
            }
            Chunk::Shared(b) => {
                let payload = b.split_to(n.min(b.len()));
                (payload, b.is_empty())
            }
        };
        if drop_front {
            self.chunks.pop_front();
        }
        self.len -= payload.len();
        payload
    }
}

impl Session {
    fn is_peer_id(&self, id: ChannelId) -> bool {
        id % 2 == self.peer_next_channel % 2
    }

    /// Whether `id` belonged to a channel that existed earlier in this session.
    fn was_known(&self, id: ChannelId) -> bool {
        if self.is_peer_id(id) {
            id < self.peer_next_channel
        } else {
            id < self.next_channel
        }
    }

    /// A frame for a channel we do not have: late frames for a channel that was reset are
    /// dropped quietly; frames for a channel that never existed are an error answered by RESET.
    fn unknown_channel(&mut self, kind: Kind, id: ChannelId) {
        if self.was_known(id) || id == 0 {
            return;
        }
        self.protocol_error(
            None,
            ProtocolError::UnknownChannel {
                kind: kind as u8,
                channel: id,
            },
        );
        if kind != Kind::Reset {
            self.queue_reset(id, ResetCode::Protocol, "no such channel");
        }
    }

    pub(super) fn on_open(&mut self, id: ChannelId, p: &Bytes) {
        let parsed = parse_open(p);
        let bad = |what: &str| ProtocolError::BadFrame {
            channel: id,
            what: what.to_owned(),
        };
        let Some((class, name, window)) = parsed else {
            self.protocol_error(None, bad("malformed OPEN"));
            self.queue_reset(id, ResetCode::Protocol, "malformed OPEN");
            return;
        };
        if !self.is_peer_id(id) || id < self.peer_next_channel {
            self.protocol_error(None, bad("OPEN with an id the peer may not use now"));
            self.queue_reset(
                id,
                ResetCode::Protocol,
                "channel id out of order or wrong parity",
            );
            return;
        }
        self.peer_next_channel = id.saturating_add(2);
        if let Err(e) = self.reserve_window() {
            self.queue_reset(id, ResetCode::Resource, e);
            self.events.push_back(Event::ChannelReset {
                id,
                code: ResetCode::Resource,
                reason: format!("refused {class}/{name}: {e}"),
            });
            return;
        }
        let mut ch = Channel::new(class.clone(), name.clone(), false, &self.cfg);
        ch.credit = u64::from(window);
        self.channels.insert(id, ch);
        // OPEN_OK waits for the application's `accept`, so that a service that refuses the
        // channel answers with a RESET the opener sees as a failed open, with its reason.
        self.events
            .push_back(Event::ChannelOpened { id, class, name });
    }

    fn reserve_window(&mut self) -> Result<(), &'static str> {
        if self.channels.len() >= self.cfg.max_channels {
            return Err("too many channels");
        }
        let fixed = self.cfg.fixed_charge(self.links.len());
        let charge = self.cfg.channel_charge();
        if fixed + self.charged + charge > self.cfg.peer_buffer_limit {
            return Err("peer buffer limit reached");
        }
        self.charged += charge;
        Ok(())
    }

    pub(super) fn on_open_ok(&mut self, id: ChannelId, p: &Bytes) {
        let window = <[u8; 4]>::try_from(&p[..]).map(u32::from_le_bytes);
        match (self.channels.get_mut(&id), window) {
            (Some(ch), Ok(w)) if ch.opening => {
                ch.opening = false;
                ch.credit = u64::from(w);
                self.events.push_back(Event::ChannelReady(id));
                self.events.push_back(Event::Writable(id));
            }
            (Some(_), _) => {
                self.reset_with_error(id, ResetCode::Protocol, "unexpected OPEN_OK".into())
            }
            (None, _) => self.unknown_channel(Kind::OpenOk, id),
        }
    }

    pub(super) fn on_data(&mut self, id: ChannelId, payload: Bytes) {
        let Some(ch) = self.channels.get_mut(&id) else {
            self.unknown_channel(Kind::Data, id);
            return;
        };
        let len = payload.len() as u64;
        if ch.remote_fin {
            self.reset_with_error(id, ResetCode::Protocol, "DATA after CLOSE".into());
            return;
        }
        if ch.rx_received + len > ch.rx_granted {
            let (sent, credit) = (ch.rx_received + len, ch.rx_granted);
            self.protocol_error(
                None,
                ProtocolError::CreditExceeded {
                    channel: id,
                    sent,
                    credit,
                },
            );
            self.reset_with_error(
                id,
                ResetCode::FlowControl,
                format!("{sent} bytes sent against a credit of {credit}"),
            );
            return;
        }
        if ch.rx_granted - (ch.rx_received + len) < u64::from(ch.rx_window() / 16) {
            ch.rx_peer_waited = true;
        }
        ch.rx_received += len;
        ch.bytes_in += len;
        if payload.is_empty() {
            return;
        }
        let was_empty = ch.rx_len == 0;
        ch.rx_len += payload.len();
        if payload.len() < RX_SMALL {
            if ch.rx_tail.capacity() - ch.rx_tail.len() < payload.len() {
                if !ch.rx_tail.is_empty() {
                    ch.rx.push_back(ch.rx_tail.split().freeze());
                }
                ch.rx_tail = BytesMut::with_capacity(RX_COALESCE);
            }
            ch.rx_tail.extend_from_slice(&payload);
            self.pool.recycle(payload);
        } else {
            if !ch.rx_tail.is_empty() {
                ch.rx.push_back(ch.rx_tail.split().freeze());
            }
            ch.rx.push_back(payload);
        }
        if was_empty {
            self.events.push_back(Event::Readable(id));
        }
    }

    pub(super) fn on_credit(&mut self, id: ChannelId, p: &Bytes) {
        let Ok(inc) = <[u8; 4]>::try_from(&p[..]).map(u32::from_le_bytes) else {
            self.reset_with_error(id, ResetCode::Protocol, "malformed CREDIT".into());
            return;
        };
        match self.channels.get_mut(&id) {
            Some(ch) => {
                let was_blocked = ch.credit == 0;
                ch.credit = ch.credit.saturating_add(u64::from(inc));
                let was_full = ch.send_buf.len() >= ch.tx_limit;
                let grew = self.grow_send_buffer(id);
                if was_blocked || (grew && was_full) {
                    self.events.push_back(Event::Writable(id));
                }
            }
            None => self.unknown_channel(Kind::Credit, id),
        }
    }

    pub(super) fn on_close(&mut self, id: ChannelId) {
        match self.channels.get_mut(&id) {
            Some(ch) => {
                ch.remote_fin = true;
                self.events.push_back(Event::Readable(id));
                self.maybe_finish(id);
            }
            None => self.unknown_channel(Kind::Close, id),
        }
    }

    pub(super) fn on_reset(&mut self, id: ChannelId, p: &Bytes) {
        if self.remove_channel(id).is_none() {
            self.unknown_channel(Kind::Reset, id);
            return;
        }
        let code = p.get(..2).map_or(ResetCode::Aborted, |c| {
            ResetCode::from_u16(u16::from_le_bytes([c[0], c[1]]))
        });
        let reason = p
            .get(2..)
            .map(|r| String::from_utf8_lossy(&r[..r.len().min(256)]).into_owned());
        if code != ResetCode::Aborted && code != ResetCode::Refused {
            self.stats.channel_resets += 1;
        }
        self.events.push_back(Event::ChannelReset {
            id,
            code,
            reason: reason.unwrap_or_default(),
        });
    }

    fn remove_channel(&mut self, id: ChannelId) -> Option<Channel> {
        let ch = self.channels.remove(&id)?;
        self.charged = self.charged.saturating_sub(ch.charge);
        Some(ch)
    }

    /// Charges `extra` more bytes to channel `id` if `peer_buffer_limit` has room for them.
    fn charge_more(&mut self, id: ChannelId, extra: usize) -> bool {
        let fixed = self.cfg.fixed_charge(self.links.len());
        if fixed + self.charged + extra > self.cfg.peer_buffer_limit {
            return false;
        }
        let Some(ch) = self.channels.get_mut(&id) else {
            return false;
        };
        self.charged += extra;
        ch.charge += extra;
        true
    }

    /// Lets the application queue as much as the peer lets us send at once (its window, as
    /// its credit shows), up to `channel_window_max`: with a send buffer smaller than the
    /// peer's window, the application would wait for room while credit is left. True if the
    /// limit grew.
    fn grow_send_buffer(&mut self, id: ChannelId) -> bool {
        let max = self.cfg.channel_window_max as usize;
        let Some(ch) = self.channels.get(&id) else {
            return false;
        };
        let credit = usize::try_from(ch.credit).unwrap_or(usize::MAX);
        if credit <= ch.tx_limit || ch.tx_limit >= max {
            return false;
        }
        let new = credit.max(ch.tx_limit.saturating_mul(2)).min(max);
        let old = ch.tx_limit;
        if !self.charge_more(id, new - old) {
            return false;
        }
        if let Some(ch) = self.channels.get_mut(&id) {
            ch.tx_limit = new;
        }
        true
    }

    /// Doubles channel `id`'s receive window (up to `channel_window_max`) when the window, not
    /// the application, limits the channel: within one window's worth of reads, the peer used
    /// (nearly) all of its credit, and the application read everything we held. A slow
    /// application never empties the buffer while the peer has data; a fast one empties it
    /// while the credit is on its way, as TCP's receive-buffer autotuning reasons. Returns
    /// the extra credit to grant (0: no growth).
    fn grow_window(&mut self, id: ChannelId) -> u32 {
        let max = self.cfg.channel_window_max;
        let Some(ch) = self.channels.get_mut(&id) else {
            return 0;
        };
        let old = ch.rx_window();
        let limited = ch.rx_peer_waited && ch.rx_app_drained;
        if limited || ch.rx_round >= u64::from(old) {
            // A new round.
            (ch.rx_peer_waited, ch.rx_app_drained, ch.rx_round) = (false, false, 0);
        }
        if !limited || old >= max {
            return 0;
        }
        let new = old.saturating_mul(2).min(max);
        let charge = |w: u32| Config::window_charge(w);
        if !self.charge_more(id, charge(new) - charge(old)) {
            return 0;
        }
        // The window is new once the caller grants the difference.
        new - old
    }

    pub(super) fn maybe_finish(&mut self, id: ChannelId) {
        if self.channels.get(&id).is_some_and(Channel::finished) {
            self.remove_channel(id);
            self.events.push_back(Event::ChannelClosed(id));
        }
    }

    fn queue_reset(&mut self, id: ChannelId, code: ResetCode, reason: &str) {
        let mut p = Vec::with_capacity(2 + reason.len());
        p.extend_from_slice(&(code as u16).to_le_bytes());
        p.extend_from_slice(reason.as_bytes());
        self.push_control(Kind::Reset, id, Bytes::from(p));
    }

    pub(super) fn push_control(&mut self, kind: Kind, id: ChannelId, payload: Bytes) {
        self.control_bytes += frame::wire_len(payload.len()) + CONTROL_ENTRY_OVERHEAD;
        self.control.push_back((kind, id, payload));
    }

    /// Resets a channel because of a peer error: tell the peer, tell the application.
    pub(super) fn reset_with_error(&mut self, id: ChannelId, code: ResetCode, reason: String) {
        self.stats.channel_resets += 1;
        if self.remove_channel(id).is_some() {
            self.events.push_back(Event::ChannelReset {
                id,
                code,
                reason: reason.clone(),
            });
        }
        self.queue_reset(id, code, &reason);
    }

    // ---- local application -----------------------------------------------------------------

    /// Opens a channel to the peer's service `class`/`name`. Data may be sent once
    /// [`Event::ChannelReady`] arrives (`send` buffers before that).
    pub fn open_channel(&mut self, class: &str, name: &str) -> Result<ChannelId, ChannelError> {
        if class.len() > 255 || name.len() > 255 {
            return Err(ChannelError::NameTooLong);
        }
        self.reserve_window().map_err(ChannelError::Limit)?;
        let id = self.next_channel;
        self.next_channel = self.next_channel.wrapping_add(2);
        self.channels
            .insert(id, Channel::new(class.into(), name.into(), true, &self.cfg));
        let mut p = Vec::with_capacity(3 + class.len() + name.len() + 4);
        p.push(class.len() as u8);
        p.extend_from_slice(class.as_bytes());
        p.push(name.len() as u8);
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&self.cfg.channel_window.to_le_bytes());
        self.push_control(Kind::Open, id, Bytes::from(p));
        Ok(id)
    }

    /// Accepts a channel the peer opened ([`Event::ChannelOpened`]): the peer may now send.
    /// Accepting twice is harmless.
    pub fn accept(&mut self, id: ChannelId) -> Result<(), ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        if ch.local || ch.accepted {
            return Ok(());
        }
        ch.accepted = true;
        let w = self.cfg.channel_window.to_le_bytes();
        self.push_control(Kind::OpenOk, id, Bytes::copy_from_slice(&w));
        Ok(())
    }

    /// Queues bytes; returns how many were accepted (0 when the send buffer is full: wait for
    /// [`Event::Writable`]).
    pub fn send(&mut self, id: ChannelId, data: &[u8]) -> Result<usize, ChannelError> {
        let (ch, n) = Self::sendable(&mut self.channels, id, data.len())?;
        ch.send_buf.push(&data[..n], &mut self.pool);
        Ok(n)
    }

    /// Channel `id` if it may still send, and how many of `len` bytes its send buffer takes.
    /// (Fields, not `self`: the caller pushes with `self.pool` while holding the channel.)
    fn sendable(
        channels: &mut std::collections::BTreeMap<ChannelId, Channel>,
        id: ChannelId,
        len: usize,
    ) -> Result<(&mut Channel, usize), ChannelError> {
        let ch = channels.get_mut(&id).ok_or(ChannelError::Unknown(id))?;
        if ch.fin_queued {
            return Err(ChannelError::Closed(id));
        }
        let n = len.min(ch.tx_limit.saturating_sub(ch.send_buf.len()));
        Ok((ch, n))
    }

    /// [`Session::send`] of the application's own buffer: payloads of at least
    /// [`SHARE_MIN`] bytes are sent from it and kept (for retransmission) without a copy;
    /// smaller ones are copied, to be coalesced with their neighbours into full frames.
    pub fn send_bytes(&mut self, id: ChannelId, data: &mut Bytes) -> Result<usize, ChannelError> {
        if data.len() < SHARE_MIN {
            let n = self.send(id, data)?;
            data.advance(n);
            return Ok(n);
        }
        let (ch, n) = Self::sendable(&mut self.channels, id, data.len())?;
        if n > 0 {
            ch.send_buf.push_shared(data.split_to(n));
        }
        Ok(n)
    }

    /// Room left in the send buffer.
    pub fn send_capacity(&self, id: ChannelId) -> Result<usize, ChannelError> {
        let ch = self.channels.get(&id).ok_or(ChannelError::Unknown(id))?;
        Ok(ch.tx_limit.saturating_sub(ch.send_buf.len()))
    }

    /// Copies received bytes into `buf`.
    pub fn recv(&mut self, id: ChannelId, buf: &mut [u8]) -> Result<Recv, ChannelError> {
        let mut n = 0;
        self.recv_with(id, buf.len(), |part| {
            buf[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        })
    }

    /// Hands up to `max` received bytes to `put`, in order, as slices of the buffers they
    /// arrived in: for a destination that need not be initialised first (an `AsyncRead`'s
    /// `ReadBuf`), which a `&mut [u8]` would have to be, a memset of every byte read.
    pub fn recv_with(
        &mut self,
        id: ChannelId,
        max: usize,
        mut put: impl FnMut(&[u8]),
    ) -> Result<Recv, ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        let mut n = 0;
        while n < max {
            let Some(front) = ch.rx.front_mut() else {
                break;
            };
            let take = front.len().min(max - n);
            put(&front[..take]);
            n += take;
            if take == front.len() {
                if let Some(done) = ch.rx.pop_front() {
                    self.pool.recycle(done);
                }
            } else {
                front.advance(take);
            }
        }
        if n < max && ch.rx.is_empty() && !ch.rx_tail.is_empty() {
            let take = ch.rx_tail.len().min(max - n);
            put(&ch.rx_tail[..take]);
            n += take;
            if take == ch.rx_tail.len() {
                ch.rx_tail = BytesMut::new(); // Frees it: an idle channel holds nothing.
            } else {
                ch.rx_tail.advance(take);
            }
        }
        Ok(self.consumed(id, n, n))
    }

    /// Takes up to `max` (> 0) received bytes without copying them: the buffer a frame's
    /// payload was received into, or a part of it. The credit for them goes back to the peer
    /// as [`Session::recv`]'s does, so what the peer can make us hold stays its window; what
    /// the application keeps afterwards is its own memory.
    pub fn recv_bytes(&mut self, id: ChannelId, max: usize) -> Result<Recv<Bytes>, ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        let data = match ch.rx.front_mut() {
            Some(front) if front.len() > max => front.split_to(max),
            Some(_) => ch.rx.pop_front().unwrap_or_default(),
            None if ch.rx_tail.len() > max => ch.rx_tail.split_to(max).freeze(),
            // Takes the whole buffer: an idle channel holds nothing.
            None => std::mem::take(&mut ch.rx_tail).freeze(),
        };
        let n = data.len();
        Ok(self.consumed(id, n, data))
    }

    /// Accounts for `n` bytes the application took (`data`): EOF, credit for the peer.
    fn consumed<T>(&mut self, id: ChannelId, n: usize, data: T) -> Recv<T> {
        let Some(ch) = self.channels.get_mut(&id) else {
            return Recv::WouldBlock;
        };
        if n == 0 {
            if ch.remote_fin && ch.rx_len == 0 {
                ch.eof_read = true;
                self.maybe_finish(id);
                return Recv::Eof;
            }
            return Recv::WouldBlock;
        }
        ch.rx_len -= n;
        ch.rx_app_drained |= ch.rx_len == 0;
        ch.rx_round += n as u64;
        // n <= buffered bytes <= receive window (a u32).
        ch.rx_unreported += n as u32;
        let window = ch.rx_window();
        if ch.rx_unreported >= window / 4 || (ch.rx_len == 0 && ch.rx_unreported >= window / 16) {
            let grown = self.grow_window(id);
            let Some(ch) = self.channels.get_mut(&id) else {
                return Recv::Data(data);
            };
            // unreported + grown <= the new window (a u32).
            let inc = std::mem::take(&mut ch.rx_unreported) + grown;
            ch.rx_granted += u64::from(inc);
            self.push_control(Kind::Credit, id, Bytes::copy_from_slice(&inc.to_le_bytes()));
        }
        Recv::Data(data)
    }

    /// Ends our direction of the channel once queued data is sent (half close).
    pub fn close(&mut self, id: ChannelId) -> Result<(), ChannelError> {
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        ch.fin_queued = true;
        Ok(())
    }

    /// Aborts a channel: queued data is dropped, the peer is told why.
    pub fn reset(
        &mut self,
        id: ChannelId,
        code: ResetCode,
        reason: &str,
    ) -> Result<(), ChannelError> {
        self.remove_channel(id).ok_or(ChannelError::Unknown(id))?;
        self.queue_reset(id, code, reason);
        Ok(())
    }

    /// Open channels, for status displays.
    pub fn channels(&self) -> impl Iterator<Item = ChannelInfo> + '_ {
        self.channels.iter().map(|(id, ch)| ChannelInfo {
            id: *id,
            class: ch.class.clone(),
            name: ch.name.clone(),
            local: ch.local,
            bytes_in: ch.bytes_in,
            bytes_out: ch.bytes_out,
            rx_buffered: ch.rx_len,
            tx_buffered: ch.send_buf.len(),
            rx_window: ch.rx_window(),
            tx_limit: ch.tx_limit,
        })
    }

    /// Whether the channel exists.
    pub fn has_channel(&self, id: ChannelId) -> bool {
        self.channels.contains_key(&id)
    }
}

fn parse_open(p: &[u8]) -> Option<(String, String, u32)> {
    let clen = usize::from(*p.first()?);
    let class = p.get(1..1 + clen)?;
    let nlen = usize::from(*p.get(1 + clen)?);
    let name = p.get(2 + clen..2 + clen + nlen)?;
    let w = p.get(2 + clen + nlen..2 + clen + nlen + 4)?;
    if p.len() != 6 + clen + nlen {
        return None;
    }
    Some((
        std::str::from_utf8(class).ok()?.to_owned(),
        std::str::from_utf8(name).ok()?.to_owned(),
        u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
    ))
}
