//! Status snapshots for `vstreamctl status`.

use super::*;
use serde::Deserialize;
use vstream_wire::{ChannelInfo, LinkStats, SessionStats};

impl Mux {
    /// A snapshot for status displays.
    pub fn status(&self) -> MuxStatus {
        let inner = self.shared.lock();
        let s = &inner.session;
        MuxStatus {
            peer: s.peer_name().map(str::to_owned),
            active_link: s.active_link().map(|l| l.0),
            links: inner
                .links
                .iter()
                .map(|(id, e)| LinkStatus {
                    id: id.0,
                    transport: e.transport.clone(),
                    up: e.up && s.link_is_up(*id),
                    since: unix_secs(e.since),
                    payload_crc: !s.link_skips_payload_crc(*id),
                    stats: s.link_stats(*id).unwrap_or_default(),
                })
                .collect(),
            channels: s.channels().collect(),
            stats: SessionCounters {
                session: s.stats(),
                held_bytes: s.held_bytes(),
            },
        }
    }
}

/// Status of one session, as shown by `vstreamctl status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MuxStatus {
    /// Peer's name.
    pub peer: Option<String>,
    /// Link data is sent on.
    pub active_link: Option<u32>,
    /// Links.
    pub links: Vec<LinkStatus>,
    /// Open channels.
    pub channels: Vec<ChannelInfo>,
    /// Counters.
    pub stats: SessionCounters,
}

/// Status of one link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Link id.
    pub id: u32,
    /// Transport description.
    pub transport: String,
    /// Handshake done and alive.
    pub up: bool,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Frames carry a payload CRC (false once both sides agreed to leave it out).
    pub payload_crc: bool,
    /// Bytes and frames in and out (serialized flat, beside the fields above).
    #[serde(flatten)]
    pub stats: LinkStats,
}

/// Session counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionCounters {
    /// The session's own counters (serialized flat, beside `held_bytes`).
    #[serde(flatten)]
    pub session: SessionStats,
    /// Bytes the session holds because of the peer now (bounded by `peer_buffer_limit`).
    pub held_bytes: usize,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
