//! A session's state as bytes, for a successor process (vstreamd's live upgrade): everything
//! the peer may still ask for again (unacknowledged frames, queued control frames, sequence
//! numbers) and everything the applications have not taken yet (channel buffers, credit).
//!
//! Links are not part of it: a snapshot is the session as if every link had just gone down,
//! and the peer resumes it on its next link exactly as after a transport cut. The state comes
//! from another process, so [`Session::restore`] checks it like any input: every length
//! against what is left and against the new configuration's limits, every sequence number
//! against its neighbours, and says what is wrong.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use super::{Channel, Config, Sent, Session, SessionStats, CONTROL_QUEUE_LIMIT};
use crate::frame::{self, Kind, MAX_PAYLOAD_LIMIT};
use crate::hello::Role;

/// First bytes of a snapshot; the last byte is the format version.
const MAGIC: &[u8; 8] = b"VSSNAP\0\x01";

/// Longest class, name or peer name carried (the protocol allows 255).
const MAX_NAME: usize = 255;

/// Why a snapshot cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session state: {0}")]
pub struct SnapshotError(String);

impl SnapshotError {
    /// An error saying `what` is wrong with the state (for the layers that wrap a snapshot).
    pub fn new(what: impl Into<String>) -> SnapshotError {
        SnapshotError(what.into())
    }
}

fn bad<T>(what: impl Into<String>) -> Result<T, SnapshotError> {
    Err(SnapshotError(what.into()))
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(v.into());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
}

struct In<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        match self.data.get(self.at..).and_then(|r| r.get(..n)) {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => bad(format!("truncated at byte {} reading {what}", self.at)),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bool(&mut self, what: &str) -> Result<bool, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => bad(format!("{what}: {v} is not a boolean")),
        }
    }
    /// A length-prefixed byte string of at most `max` bytes.
    fn bytes(&mut self, max: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        let len = self.u64(what)?;
        if len > max as u64 {
            return bad(format!("{what}: {len} bytes, at most {max} allowed"));
        }
        self.take(len as usize, what)
    }
    fn string(&mut self, what: &str) -> Result<String, SnapshotError> {
        let b = self.bytes(MAX_NAME, what)?;
        String::from_utf8(b.to_vec()).or_else(|_| bad(format!("{what} is not UTF-8")))
    }
    /// A count of items that each take at least `min_size` bytes, at most `max`.
    fn count(&mut self, max: usize, min_size: usize, what: &str) -> Result<usize, SnapshotError> {
        let n = self.u64(what)?;
        let left = (self.data.len() - self.at) / min_size.max(1);
        if n > max as u64 || n > left as u64 {
            return bad(format!("{what}: {n} entries, at most {max} allowed"));
        }
        Ok(n as usize)
    }
}

const STATS: usize = 10;

fn stats_fields(s: &mut SessionStats) -> [&mut u64; STATS] {
    [
        &mut s.frames_sent,
        &mut s.frames_retransmitted,
        &mut s.frames_received,
        &mut s.duplicates,
        &mut s.out_of_order,
        &mut s.protocol_errors,
        &mut s.expired,
        &mut s.deferred,
        &mut s.channel_resets,
        &mut s.session_restarts,
    ]
}

impl Session {
    /// The session's state, as if every link had gone down. Events not yet taken with
    /// [`Session::poll_event`] are not part of it: take them first.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(1024 + self.unacked_bytes));
        o.0.extend_from_slice(MAGIC);
        o.u8(self.cfg.role as u8);
        o.u64(self.my_session);
        o.u64(self.peer_session);
        o.bytes(self.peer_name.as_deref().unwrap_or("").as_bytes());
        o.bool(self.peer_name.is_some());
        o.u32(self.next_link);
        o.u32(self.send_next);
        o.u32(self.recv_next);
        o.u32(self.next_channel);
        o.u32(self.peer_next_channel);
        o.u32(self.rr_cursor);
        o.u64(self.ping_nonce);
        o.u32(self.backoff);
        let mut stats = self.stats;
        for v in stats_fields(&mut stats) {
            o.u64(*v);
        }
        o.u64(self.stats.timeouts);
        o.u64(self.unacked.len() as u64);
        for s in &self.unacked {
            o.u32(s.seq);
            o.u8(s.kind as u8);
            o.u32(s.channel);
            o.bytes(&s.payload);
        }
        o.u64(self.control.len() as u64);
        for (kind, id, payload) in &self.control {
            o.u8(*kind as u8);
            o.u32(*id);
            o.bytes(payload);
        }
        o.u64(self.channels.len() as u64);
        for (id, ch) in &self.channels {
            o.u32(*id);
            o.bytes(ch.class.as_bytes());
            o.bytes(ch.name.as_bytes());
            for b in [
                ch.local,
                ch.opening,
                ch.accepted,
                ch.fin_queued,
                ch.fin_sent,
                ch.remote_fin,
                ch.eof_read,
            ] {
                o.bool(b);
            }
            o.u64(ch.credit);
            o.u64(ch.rx_received);
            o.u64(ch.rx_granted);
            o.u32(ch.rx_unreported);
            o.u64(ch.bytes_in);
            o.u64(ch.bytes_out);
            o.u64(ch.rx_len as u64);
            for b in ch.rx.iter() {
                o.0.extend_from_slice(b);
            }
            o.0.extend_from_slice(&ch.rx_tail);
            o.u64(ch.send_buf.len() as u64);
            for c in &ch.send_buf.chunks {
                o.0.extend_from_slice(c);
            }
        }
        o.0
    }

    /// A session from a [`Session::snapshot`], under `cfg` (the successor's configuration,
    /// whose limits the state must fit). No link is up; the peer resumes on its next link.
    pub fn restore(cfg: Config, state: &[u8], now: Instant) -> Result<Session, SnapshotError> {
        let mut i = In { data: state, at: 0 };
        if i.take(MAGIC.len(), "the header")? != MAGIC {
            return bad("not a session snapshot of this version");
        }
        let role = match i.u8("the role")? {
            r if r == cfg.role as u8 => cfg.role,
            r => return bad(format!("role {r} is not ours ({:?})", cfg.role)),
        };
        let mut s = Session::new(cfg, 1, now);
        s.my_session = i.u64("our session id")?;
        if s.my_session == 0 {
            return bad("our session id is 0");
        }
        s.peer_session = i.u64("the peer's session id")?;
        let peer_name = i.string("the peer's name")?;
        s.peer_name = i.bool("whether the peer is known")?.then_some(peer_name);
        s.next_link = i.u32("the next link id")?;
        s.send_next = i.u32("the send sequence")?;
        s.recv_next = i.u32("the receive sequence")?;
        s.next_channel = i.u32("the next channel id")?;
        s.peer_next_channel = i.u32("the peer's next channel id")?;
        let (ours, theirs) = match role {
            Role::Host => (0, 1),
            Role::Guest => (1, 0),
        };
        if s.next_channel % 2 != ours || s.peer_next_channel % 2 != theirs {
            return bad("channel ids of the wrong parity");
        }
        s.rr_cursor = i.u32("the channel cursor")?;
        s.ping_nonce = i.u64("the ping nonce")?;
        s.backoff = i.u32("the backoff")?.clamp(1, 8);
        for v in stats_fields(&mut s.stats) {
            *v = i.u64("a counter")?;
        }
        s.stats.timeouts = i.u64("a counter")?;
        let max_payload = s.cfg.max_frame.min(MAX_PAYLOAD_LIMIT) as usize;
        let n = i.count(s.cfg.max_unacked, 17, "unacknowledged frames")?;
        let mut unacked = VecDeque::with_capacity(n);
        let mut unacked_bytes = 0usize;
        for k in 0..n {
            let seq = i.u32("a frame's sequence")?;
            let expect = s.send_next.wrapping_sub((n - k) as u32);
            if seq != expect {
                return bad(format!("unacknowledged frame {seq} where {expect} belongs"));
            }
            let kind = sequenced_kind(i.u8("a frame's kind")?)?;
            let channel = i.u32("a frame's channel")?;
            let payload = i.bytes(max_payload, "a frame's payload")?;
            unacked_bytes += frame::wire_len(payload.len());
            if unacked_bytes > s.cfg.max_unacked + frame::wire_len(max_payload) {
                return bad(format!(
                    "more unacknowledged bytes than max_unacked ({})",
                    s.cfg.max_unacked
                ));
            }
            unacked.push_back(Sent {
                seq,
                kind,
                channel,
                payload: Bytes::copy_from_slice(payload),
            });
        }
        s.unacked = unacked;
        s.unacked_bytes = unacked_bytes;
        let n = i.count(CONTROL_QUEUE_LIMIT, 13, "queued control frames")?;
        for _ in 0..n {
            let kind = sequenced_kind(i.u8("a control frame's kind")?)?;
            let id = i.u32("a control frame's channel")?;
            let payload = i.bytes(MAX_NAME * 2 + 16, "a control frame's payload")?;
            s.push_control(kind, id, Bytes::copy_from_slice(payload));
            if s.control_bytes > 2 * CONTROL_QUEUE_LIMIT {
                return bad("too many queued control frames");
            }
        }
        let n = i.count(s.cfg.max_channels, 60, "channels")?;
        let mut channels = BTreeMap::new();
        for _ in 0..n {
            let id = i.u32("a channel id")?;
            let (next, what) = match id % 2 == ours {
                true => (s.next_channel, "ours"),
                false => (s.peer_next_channel, "the peer's"),
            };
            if id == 0 || id >= next || channels.contains_key(&id) {
                return bad(format!("channel {id} ({what}) cannot exist"));
            }
            let class = i.string("a channel's class")?;
            let name = i.string("a channel's name")?;
            let mut ch = Channel::new(class, name, false, &s.cfg);
            for b in [
                &mut ch.local,
                &mut ch.opening,
                &mut ch.accepted,
                &mut ch.fin_queued,
                &mut ch.fin_sent,
                &mut ch.remote_fin,
                &mut ch.eof_read,
            ] {
                *b = i.bool("a channel flag")?;
            }
            if ch.local != (id % 2 == ours) {
                return bad(format!("channel {id}: wrong side"));
            }
            ch.credit = i.u64("a channel's credit")?;
            ch.rx_received = i.u64("a channel's received count")?;
            ch.rx_granted = i.u64("a channel's granted count")?;
            ch.rx_unreported = i.u32("a channel's unreported count")?;
            ch.bytes_in = i.u64("a channel's byte count")?;
            ch.bytes_out = i.u64("a channel's byte count")?;
            // A window may have grown (up to channel_window_max): what it is now follows from
            // the counts, as every byte of it is unused credit, buffered, or read and not yet
            // granted again.
            let max = s.cfg.channel_window_max.max(s.cfg.channel_window) as usize;
            let rx = i.bytes(max, "a channel's received bytes")?;
            let Some(unused) = ch.rx_granted.checked_sub(ch.rx_received) else {
                return bad(format!("channel {id}: received more than granted"));
            };
            let window = unused + rx.len() as u64 + u64::from(ch.rx_unreported);
            if window > max as u64 {
                return bad(format!(
                    "channel {id}: a window of {window} bytes, more than channel_window_max"
                ));
            }
            ch.rx_len = rx.len();
            if !rx.is_empty() {
                ch.rx.push_back(Bytes::copy_from_slice(rx));
            }
            let tx = i.bytes(
                max.max(s.cfg.channel_send_buffer),
                "a channel's queued bytes",
            )?;
            ch.tx_limit = tx.len().max(s.cfg.channel_send_buffer);
            ch.send_buf.push(tx, &mut s.pool);
            ch.charge = Config::window_charge(ch.rx_window()) + ch.tx_limit;
            channels.insert(id, ch);
        }
        if i.at != state.len() {
            return bad(format!("{} bytes after the end", state.len() - i.at));
        }
        s.charged = channels.values().map(|ch| ch.charge).sum();
        if s.cfg.fixed_charge(0) + s.charged > s.cfg.peer_buffer_limit {
            return bad(format!(
                "{} channels do not fit in peer_buffer_limit ({})",
                channels.len(),
                s.cfg.peer_buffer_limit
            ));
        }
        s.channels = channels;
        Ok(s)
    }
}

/// A frame kind that may be queued for the peer.
fn sequenced_kind(raw: u8) -> Result<Kind, SnapshotError> {
    match Kind::from_u8(raw) {
        Some(k) if Kind::is_sequenced(raw) => Ok(k),
        _ => bad(format!("frame kind {raw:#04x} is not a sequenced kind")),
    }
}
