//! Status snapshots for `vstreamctl status`.

use super::*;

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
                .map(|(id, e)| {
                    let st = s.link_stats(*id).unwrap_or_default();
                    LinkStatus {
                        id: id.0,
                        transport: e.transport.clone(),
                        up: e.up && s.link_is_up(*id),
                        since: unix_secs(e.since),
                        bytes_in: st.bytes_in,
                        bytes_out: st.bytes_out,
                        frames_in: st.decode.frames,
                        crc_errors: st.decode.crc_errors,
                        garbage_bytes: st.decode.garbage_bytes,
                        oversized: st.decode.oversized,
                        payload_crc: !s.link_skips_payload_crc(*id),
                    }
                })
                .collect(),
            channels: s
                .channels()
                .map(|c| ChannelStatus {
                    id: c.id,
                    class: c.class,
                    name: c.name,
                    local: c.local,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                    rx_buffered: c.rx_buffered,
                    tx_buffered: c.tx_buffered,
                })
                .collect(),
            stats: {
                let st = s.stats();
                SessionCounters {
                    frames_sent: st.frames_sent,
                    frames_received: st.frames_received,
                    frames_retransmitted: st.frames_retransmitted,
                    duplicates: st.duplicates,
                    out_of_order: st.out_of_order,
                    protocol_errors: st.protocol_errors,
                    channel_resets: st.channel_resets,
                    session_restarts: st.session_restarts,
                    timeouts: st.timeouts,
                    expired: st.expired,
                    deferred: st.deferred,
                    errors: by_kind(&st.errors),
                    errors_not_logged: by_kind(&st.suppressed),
                    held_bytes: s.held_bytes(),
                }
            },
        }
    }
}

/// Status of one session, as shown by `vstreamctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct MuxStatus {
    /// Peer's name.
    pub peer: Option<String>,
    /// Link data is sent on.
    pub active_link: Option<u32>,
    /// Links.
    pub links: Vec<LinkStatus>,
    /// Open channels.
    pub channels: Vec<ChannelStatus>,
    /// Counters.
    pub stats: SessionCounters,
}

/// Status of one link.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// Link id.
    pub id: u32,
    /// Transport description.
    pub transport: String,
    /// Handshake done and alive.
    pub up: bool,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Frames decoded.
    pub frames_in: u64,
    /// CRC failures.
    pub crc_errors: u64,
    /// Bytes skipped while resynchronising.
    pub garbage_bytes: u64,
    /// Frames above the size limit.
    pub oversized: u64,
    /// Frames carry a payload CRC (false once both sides agreed to leave it out).
    pub payload_crc: bool,
}

/// Status of one channel.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelStatus {
    /// Channel id.
    pub id: u32,
    /// Device class.
    pub class: String,
    /// Name.
    pub name: String,
    /// Opened by this side.
    pub local: bool,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Received, not yet read.
    pub rx_buffered: usize,
    /// Queued, not yet sent.
    pub tx_buffered: usize,
}

/// Session counters.
#[derive(Debug, Clone, Serialize)]
pub struct SessionCounters {
    /// Frames sent once.
    pub frames_sent: u64,
    /// Frames accepted.
    pub frames_received: u64,
    /// Frames sent again.
    pub frames_retransmitted: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Frames after a gap dropped.
    pub out_of_order: u64,
    /// Peer protocol violations.
    pub protocol_errors: u64,
    /// Channels reset on errors.
    pub channel_resets: u64,
    /// Peer restarts.
    pub session_restarts: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Times the session was forgotten because the peer stayed away.
    pub expired: u64,
    /// Peer frames dropped unprocessed while our control queue was full.
    pub deferred: u64,
    /// Protocol errors by kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// Of those, the ones not logged (rate limit), by kind.
    pub errors_not_logged: BTreeMap<&'static str, u64>,
    /// Bytes the session holds because of the peer now (bounded by `peer_buffer_limit`).
    pub held_bytes: usize,
}

/// Non-zero counts by kind name.
fn by_kind(counts: &[u64; ErrorKind::ALL.len()]) -> BTreeMap<&'static str, u64> {
    ErrorKind::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (k.name(), *n))
        .collect()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
