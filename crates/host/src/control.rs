//! The control socket protocol between vstreamctl and vstreamd (docs/CONTROL.md, for other
//! tools that speak it).
//!
//! The client writes one JSON request on one line (at most [`MAX_REQUEST`] bytes); the daemon
//! answers with one JSON reply line. What follows depends on the request:
//!
//! - `status`: the reply says how many guests follow (`{"ok":true,"guests":N}`), then one line
//!   per guest (its status object), then the daemon closes the connection. With `guest` set,
//!   N is 1 (or the reply is an error naming the unknown guest). Nothing in the reply grows
//!   with the fleet, so replies carry no length limit: a reader takes lines of any length
//!   ([`read_reply`]); only requests, which come from clients, are bounded.
//! - `open`: raw bytes both ways.
//! - a device's op (`console`, `agent`, `jobs`...): the device's host half answers and may
//!   turn the connection into raw bytes.
//! - `events`: one JSON event per line.
//! - `upgrade`: one reply line, written by the successor daemon (or an error by this one).
//! - `attach`, `detach`: one reply line, once the guest is added (its transports connect in
//!   the background) or removed.
//!
//! Who may ask what: the daemon reads every connection's peer credentials (SO_PEERCRED). The
//! owner (root, and the daemon's own uid) may do everything; members of the optional read-only
//! group (`[daemon] control_read_group`) may only watch (see [`Request::read_only`]); a refused
//! request is answered with an error reply that says why.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request line accepted (the control socket is 0600, but still: bounded).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request: the daemon's own ops, or a device's (`Device::control_ops`, e.g. a console's
/// log or the guest agent), which the daemon hands to the device's host half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Every guest's status, one line each (or one guest's).
    Status {
        /// Only this guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest: Option<String>,
    },
    /// Open a channel to a guest service and turn this connection into its byte stream.
    Open {
        /// Guest name.
        guest: String,
        /// Device class.
        class: String,
        /// Name within the class.
        name: String,
    },
    /// Stream lifecycle events.
    Events {
        /// Only this guest's.
        guest: Option<String>,
    },
    /// Hand everything to a new vstreamd exec'd in place (`binary`, default: the path this one
    /// was started from). The reply comes from the successor (`daemon`), or is an error from
    /// this daemon, which then goes on serving.
    Upgrade {
        /// The binary to run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
    /// A token for the web console (`vstreamd --http`): the owner gets one that may type
    /// (unless it asks for `read_only`), a member of the read-only group one that may only
    /// watch.
    WebToken {
        /// A token that may only watch, whoever asks.
        #[serde(default)]
        read_only: bool,
    },
    /// Add a guest at run time (the libvirt hook, when a domain starts): a guest named
    /// `guest`, reached on `transports` as a configured guest would be. Which guest a
    /// connection is comes from these transports, never from what its agent announces. A guest
    /// attached under the same name before is replaced; a guest of the config file is not.
    Attach {
        /// Guest name (for libvirt: the domain's name).
        guest: String,
        /// What the guest is outside vstream (for libvirt: the domain's UUID), for its events.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uuid: Option<String>,
        /// Its transports, as `[[guest.transport]]` in the config.
        transports: Vec<AttachTransport>,
    },
    /// Remove a guest added by `attach` (the libvirt hook, when the domain stops): its session,
    /// transports and devices' host halves end.
    Detach {
        /// Guest name.
        guest: String,
    },
    /// An op of a device's (on the wire: the device's request object as it is).
    #[serde(untagged)]
    Device(DeviceRequest),
}

/// One transport of an `attach` request: the keys of `[[guest.transport]]` that a VMM's
/// sockets need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachTransport {
    /// `mux`, or a device's raw kind.
    pub kind: String,
    /// Where (e.g. `unix:/run/libvirt/qemu/channel/...`).
    pub address: String,
    /// Name in status (consoles: `ttyS0`, `hvc0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A device's request: the whole request object, with `op` (one of a device's
/// `Device::control_ops`) and `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    /// The op.
    pub op: String,
    /// Guest name.
    pub guest: String,
    /// The request object (the device reads its own fields).
    pub request: serde_json::Value,
}

impl Serialize for DeviceRequest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.request.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DeviceRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DeviceRequest, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let op = v.get("op").and_then(|o| o.as_str()).unwrap_or_default();
        if vstream_devices::registry().owner_of_op(op).is_none() {
            return Err(D::Error::custom(format!("unknown op {op:?}")));
        }
        let guest = v.get("guest").and_then(|g| g.as_str());
        let guest = guest.ok_or_else(|| D::Error::custom(format!("{op}: no guest")))?;
        Ok(DeviceRequest {
            op: op.to_owned(),
            guest: guest.to_owned(),
            request: v,
        })
    }
}

impl Request {
    /// A device's request: `fields` (an object) plus `op` and `guest`.
    pub fn device(op: &str, guest: &str, fields: serde_json::Value) -> Request {
        let mut request = match fields {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        };
        request.insert("op".into(), op.into());
        request.insert("guest".into(), guest.into());
        Request::Device(DeviceRequest {
            op: op.to_owned(),
            guest: guest.to_owned(),
            request: request.into(),
        })
    }
}

/// The first reply line (for `status`, [`crate::status::GuestStatus`] lines follow).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was accepted.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For console attach: whether this client may type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<bool>,
    /// For status: how many guest lines follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guests: Option<usize>,
    /// For status: connections refused for names that no guest has (count and the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_unknown: Option<crate::status::Refusals>,
    /// For status and upgrade: the daemon's pid, version and generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<crate::upgrade::DaemonInfo>,
    /// For web-token: the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// What a device's op adds to its reply (e.g. the list of print jobs).
    #[serde(flatten)]
    pub device: serde_json::Map<String, serde_json::Value>,
}

impl Reply {
    /// An error reply.
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
            ..Reply::default()
        }
    }

    /// A plain success.
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }
}

impl Request {
    /// The verb, as in error messages ("open needs the owner").
    pub fn verb(&self) -> String {
        match self {
            Request::Status { .. } => "status".into(),
            Request::Open { .. } => "open".into(),
            Request::Events { .. } => "events".into(),
            Request::Upgrade { .. } => "daemon upgrade".into(),
            Request::WebToken { .. } => "web-token".into(),
            Request::Attach { .. } => "attach".into(),
            Request::Detach { .. } => "detach".into(),
            Request::Device(d) => device_access(&d.op, &d.request).0,
        }
    }

    /// Whether a member of the read-only group may make this request: it only watches (status,
    /// events, and what a device says only watches, such as a console's log). Channels
    /// (`open`: shells, files, input) act on the guest.
    pub fn read_only(&self) -> bool {
        match self {
            Request::Status { .. } | Request::Events { .. } | Request::WebToken { .. } => true,
            Request::Open { .. }
            | Request::Upgrade { .. }
            | Request::Attach { .. }
            | Request::Detach { .. } => false,
            Request::Device(d) => device_access(&d.op, &d.request).1,
        }
    }
}

fn device_access(op: &str, request: &serde_json::Value) -> (String, bool) {
    match vstream_devices::registry().owner_of_op(op) {
        Some(d) => d.control_access(op, request),
        None => (op.to_owned(), false),
    }
}

/// Reads one JSON request line of at most [`MAX_REQUEST`] bytes.
pub async fn read_line<R: AsyncBufRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::io::Result<T> {
    read_bounded(r, Some(MAX_REQUEST)).await
}

/// Reads one JSON line of the daemon's (a reply, a guest's status, an event): of any length,
/// since what the daemon says grows with its guests and the client trusts its daemon.
pub async fn read_reply<R: AsyncBufRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::io::Result<T> {
    read_bounded(r, None).await
}

async fn read_bounded<R: AsyncBufRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
    limit: Option<usize>,
) -> std::io::Result<T> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a full line",
            ));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if limit.is_some_and(|max| line.len() > max) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        if done {
            return serde_json::from_slice(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
    }
}

/// Writes one JSON line.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> std::io::Result<()> {
    let mut line = Vec::new();
    push_line(&mut line, value)?;
    w.write_all(&line).await?;
    w.flush().await
}

/// Appends one JSON line to `out` (to batch many lines into one write).
pub fn push_line<T: Serialize>(out: &mut Vec<u8>, value: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(std::io::Error::other)?;
    out.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_round_trip_as_json_lines() {
        let req = Request::device(
            "console",
            "lab",
            serde_json::json!({ "name": "hvc0", "tail": 10, "follow": true, "attach": false }),
        );
        let mut wire = Vec::new();
        write_line(&mut wire, &req).await.expect("write");
        let line: serde_json::Value = serde_json::from_slice(&wire).expect("json");
        assert_eq!(
            (&line["op"], &line["guest"]),
            (&"console".into(), &"lab".into())
        );
        let back: Request = read_line(&mut &wire[..]).await.expect("read");
        assert_eq!(back, req);
    }

    #[test]
    fn only_the_owner_may_upgrade_the_daemon() {
        let req = Request::Upgrade { binary: None };
        assert!(!req.read_only());
        assert_eq!(req.verb(), "daemon upgrade");
    }

    #[tokio::test]
    async fn oversized_and_malformed_lines_are_errors() {
        let long = vec![b'x'; MAX_REQUEST + 10];
        assert!(read_line::<_, Request>(&mut &long[..]).await.is_err());
        assert!(read_line::<_, Request>(&mut &b"{\"op\":\"nope\"}\n"[..])
            .await
            .is_err());
    }

    #[tokio::test]
    async fn replies_have_no_length_limit() {
        let big = serde_json::json!({ "name": "x".repeat(4 * MAX_REQUEST) });
        let mut wire = Vec::new();
        write_line(&mut wire, &big).await.expect("write");
        assert!(read_line::<_, serde_json::Value>(&mut &wire[..])
            .await
            .is_err());
        let back: serde_json::Value = read_reply(&mut &wire[..]).await.expect("read");
        assert_eq!(back, big);
    }

    #[tokio::test]
    async fn a_status_request_without_a_guest_is_the_old_one() {
        let old: Request = read_line(&mut &b"{\"op\":\"status\"}\n"[..])
            .await
            .expect("read");
        assert_eq!(old, Request::Status { guest: None });
        assert!(old.read_only());
        let open = Request::Open {
            guest: "g".into(),
            class: "tty".into(),
            name: String::new(),
        };
        assert!(!open.read_only());
    }
}
