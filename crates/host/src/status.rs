//! The `status` reply's guest lines (docs/CONTROL.md): what vstreamd writes and vstreamctl (or
//! any program in this crate, such as a metrics exporter) reads back, one type for both.
//!
//! The session's parts are vstream_link's own status types; each device's status is the
//! device's own type ([`vstream_devices::status`]), so neither side names a device.

use serde::{Deserialize, Serialize};
use vstream_devices::registry::TransportStatus;
use vstream_devices::status::Devices;
use vstream_link::{ChannelInfo, LinkStatus, SessionCounters};

/// One guest, as a line of the `status` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The guest's name.
    pub name: String,
    /// Whether a link of its session is up.
    pub connected: bool,
    /// The name its agent announced.
    pub peer: Option<String>,
    /// Its mux transports, then its devices' raw transports.
    pub transports: Vec<TransportLine>,
    /// Its session's open channels.
    pub channels: Vec<ChannelInfo>,
    /// Its session's counters.
    pub stats: SessionCounters,
    /// Its devices' statuses, by class (devices with nothing to report are absent).
    pub devices: Devices,
    /// Who owns the name of an announced guest (`uid 1000`, `CID 7`); `None` if configured.
    pub owner: Option<String>,
    /// The hold-off after links dropped for protocol violations.
    pub held_off: HeldOff,
    /// Connections refused because they claimed this guest without proving it.
    pub refusals: Refusals,
}

/// A transport of a guest: its state, and for a mux transport the link it carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransportLine {
    /// The transport (for a mux transport, `state` is the link's: `up` once its handshake is
    /// done, `connecting` before, `down` without a link).
    #[serde(flatten)]
    pub transport: TransportStatus,
    /// The link's counters, while a link runs on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
    /// Whether the session sends on this link (mux transports with a link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

impl TransportLine {
    /// Bytes in and out: the link's while one runs on it, else the transport's own.
    pub fn bytes(&self) -> (Option<u64>, u64) {
        match &self.link {
            Some(l) => (Some(l.stats.bytes_in), l.stats.bytes_out),
            None => (self.transport.bytes_in, self.transport.bytes_out),
        }
    }
}

/// How a guest is held off after its links were dropped for protocol violations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOff {
    /// Links dropped for violations so far.
    pub drops: u64,
    /// How much longer no connection of it is taken, if it is held off now.
    pub remaining_ms: Option<u64>,
}

/// Refused claims to a guest (or, in the reply's `refused_unknown`, to names no guest has).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    /// How many.
    pub count: u64,
    /// The last one: `PEER: REASON`.
    pub last: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A guest line as vstreamd writes it: a mux transport with its link, one without, a
    /// device's raw transport with fields of its own, a device status.
    fn line() -> serde_json::Value {
        let transport = |kind: &str, state: &str| {
            json!({
                "kind": kind, "name": "t", "address": "unix:/x", "state": state, "since": 5,
                "peer": "", "connects": 1, "errors": 0, "last_error": null, "bytes_out": 7,
            })
        };
        let mut up = transport("mux", "up");
        up["active"] = json!(true);
        up["link"] = json!({
            "id": 1, "transport": "t", "up": true, "since": 5, "bytes_in": 10, "bytes_out": 20,
            "frames_in": 3, "crc_errors": 0, "garbage_bytes": 0, "oversized": 0,
            "echoed_hellos": 0, "payload_crc": true,
        });
        let mut raw = transport("console", "down");
        raw["bytes_in"] = json!(4);
        raw["viewers"] = json!(2);
        json!({
            "name": "lab", "connected": true, "peer": "lab",
            "transports": [up, transport("mux", "down"), raw],
            "channels": [{"id": 3, "class": "shell", "name": "", "local": true, "bytes_in": 1,
                          "bytes_out": 2, "rx_buffered": 0, "tx_buffered": 0,
                          "rx_window": 262144, "tx_limit": 262144}],
            "stats": {"frames_sent": 1, "frames_received": 1, "frames_retransmitted": 0,
                      "duplicates": 0, "out_of_order": 0, "protocol_errors": 2,
                      "channel_resets": 1, "session_restarts": 0, "timeouts": 0, "expired": 0,
                      "deferred": 0, "errors": {"bad-payload": 2}, "errors_not_logged": {},
                      "held_bytes": 0},
            "devices": {"nosuchdevice": {"n": 1}},
            "owner": null,
            "held_off": {"drops": 0, "remaining_ms": null},
            "refusals": {"count": 1, "last": "p: r"},
        })
    }

    #[test]
    fn a_guest_line_reads_back_typed_and_writes_the_same_keys() {
        let g: GuestStatus = serde_json::from_value(line()).expect("typed");
        assert_eq!(g.transports[0].bytes(), (Some(10), 20));
        assert_eq!(g.transports[0].active, Some(true));
        assert_eq!(g.transports[2].bytes(), (Some(4), 7));
        assert_eq!(g.transports[2].transport.extra["viewers"], 2);
        assert_eq!(
            g.stats.session.protocol_errors + g.stats.session.channel_resets,
            3
        );
        assert_eq!(g.refusals.last.as_deref(), Some("p: r"));
        assert_eq!(serde_json::to_value(&g).expect("json"), line());
    }
}
