//! Device: qga, system management speaking the QEMU guest agent's JSON protocol.
//!
//! The guest half ([`guest::GuestAgent`]) answers QGA commands (the ones qemu-ga has that make
//! sense here: sync, ping, info, shutdown, suspend, time, OS and host facts, users, load, vCPUs, network
//! interfaces, file systems and their freezing, exec, files, SSH keys) on two kinds of stream:
//!
//! - multiplexer channels of class `qga` (any name), opened by vstreamd for `vstreamctl agent`;
//! - a raw byte stream such as the virtio-serial port `org.qemu.guest_agent.0` (`vstream-agent
//!   --qga ADDR` or `vstream.qga=ADDR`), where existing QGA clients (libvirt's
//!   `virsh qemu-agent-command`, QEMU's own) talk to it unchanged.
//!
//! Both share one state: file handles, processes started by `guest-exec` and the freeze state
//! belong to the agent, not to a connection, as in qemu-ga.
//!
//! The host half ([`host::Client`]) is what vstreamctl uses, through vstreamd, to talk to either
//! this agent or a real qemu-ga; it treats every byte from the guest as hostile.
//!
//! # Protocol
//!
//! A request is one JSON object `{"execute": NAME, "arguments": {...}}` (an `"id"` member is
//! echoed back); requests may be concatenated with or without whitespace, newlines are not
//! needed. A reply is `{"return": VALUE}` or `{"error": {"class": CLASS, "desc": TEXT}}` followed
//! by a newline; `guest-shutdown` and `guest-suspend-*` send none on success. A 0xFF byte from the client drops any
//! partial request; the reply to `guest-sync-delimited` is preceded by 0xFF. Limits (see
//! docs/devices/qga.md): [`MAX_REQUEST`], [`MAX_READ_COUNT`], [`MAX_OPEN_FILES`],
//! [`MAX_PROCESSES`], [`MAX_EXEC_OUTPUT`], [`EXEC_OUTPUT_BUDGET`].
//!
//! Layout: `codec.rs` frames bytes (sans-io), this file has the messages and their parsing
//! (sans-io), `guest.rs` runs the commands, `host.rs` is the client.

pub mod codec;
mod command;
pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
pub mod host;
pub mod qemu_ga;
mod replies;
#[cfg(test)]
mod tests;
#[cfg(feature = "host")]
pub mod verbs;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub use codec::{base64_decode, base64_encode, base64_encode_into, Frame, Framer, DELIMITER};
pub use command::*;
#[cfg(feature = "guest")]
pub use guest::QgaService;
pub use qemu_ga::{CommandFilter, QemuGaConfig};
pub use replies::*;

/// The device class of the multiplexer channels served by the guest half.
pub const CLASS: &str = "qga";

/// Largest request text accepted (bytes of JSON). Larger ones are answered with an error and
/// skipped up to their end. qemu-ga's own lexer stops at 64 MiB; 16 MiB keeps a small guest
/// safe with several connections, and still carries a 12 MiB `guest-file-write`.
pub const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// Most bytes one `guest-file-read` returns (a larger `count` is served in part, as `read(2)`
/// would; qemu-ga refuses counts above 48 MB instead).
pub const MAX_READ_COUNT: usize = 16 * 1024 * 1024;

/// Default `count` of `guest-file-read`, as in qemu-ga.
pub const DEFAULT_READ_COUNT: usize = 4096;

/// Most file handles open at once (for all clients together).
pub const MAX_OPEN_FILES: usize = 64;

/// Most processes started by `guest-exec` that are running or not yet reported by
/// `guest-exec-status`.
pub const MAX_PROCESSES: usize = 64;

/// Most bytes of one stream (stdout or stderr) captured per process, as qemu-ga's
/// `GUEST_EXEC_MAX_OUTPUT`; the rest is read and dropped, and `out-truncated` is set.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;

/// Most captured bytes held for all processes together; beyond it, output is dropped and marked
/// truncated as above.
pub const EXEC_OUTPUT_BUDGET: usize = 64 * 1024 * 1024;

/// What vstream-agent's `guest-info` reports as its version. Its prefix tells a client that the
/// agent takes pipelined requests (qemu-ga 7.2 on a virtio-serial port loses some).
pub const AGENT_VERSION: &str = concat!("vstream-agent ", env!("CARGO_PKG_VERSION"));

/// The error classes this agent sends (qemu-ga's own; a peer may send others).
pub mod class {
    /// Anything but an unknown or disabled command.
    pub const GENERIC: &str = "GenericError";
    /// The command does not exist, or is disabled (e.g. while file systems are frozen).
    pub const COMMAND_NOT_FOUND: &str = "CommandNotFound";
}

/// A QGA error: `{"class": ..., "desc": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QgaError {
    /// Error class, e.g. `GenericError`.
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

impl std::fmt::Display for QgaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QgaError {}

impl QgaError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> QgaError {
        QgaError {
            class: class::GENERIC.to_owned(),
            desc: desc.into(),
        }
    }

    /// A `GenericError` for a failed system call: `"{what}: {error}"`.
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> QgaError {
        QgaError::generic(format!("{what}: {e}"))
    }

    /// Unknown command, worded as qemu-ga does.
    pub fn command_not_found(name: &str) -> QgaError {
        QgaError {
            class: class::COMMAND_NOT_FOUND.to_owned(),
            desc: format!("The command {name} has not been found"),
        }
    }

    /// A command refused in the current state, worded as qemu-ga does.
    pub fn disabled(name: &str, reason: &str) -> QgaError {
        QgaError {
            class: class::COMMAND_NOT_FOUND.to_owned(),
            desc: format!("Command {name} has been disabled: {reason}"),
        }
    }

    /// QEMU's `QERR_INVALID_PARAMETER`: `Invalid parameter 'NAME'`.
    pub fn invalid_parameter(name: &str) -> QgaError {
        QgaError::generic(format!("Invalid parameter '{name}'"))
    }

    /// QEMU's `QERR_INVALID_PARAMETER_VALUE`: `Parameter 'NAME' expects WHAT`.
    pub fn invalid_value(name: &str, expects: &str) -> QgaError {
        QgaError::generic(format!("Parameter '{name}' expects {expects}"))
    }
}

/// A parsed request: which command, its arguments, and the optional `id` to echo. It borrows
/// from the request's text, and only `arguments` become values: a request without them (most
/// are: `guest-ping`, `guest-info`, ...) allocates nothing, and one with them is read in one
/// pass, as before (`guest-file-write`'s data is not scanned twice).
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `execute`.
    pub execute: Cow<'a, str>,
    /// `arguments` (empty if absent).
    pub arguments: Map<String, Value>,
    /// `id`, as it is in the text, echoed in the reply.
    pub id: Option<&'a RawValue>,
}

impl<'a> Request<'a> {
    /// Parses one JSON text into a request, with QEMU's error messages. On error, returns the
    /// `id` if one could be read, to echo it.
    ///
    /// A bad member is reported as a parse into a map of values would find it first: by the
    /// order of the members' names, a later duplicate replacing an earlier one.
    pub fn parse(text: &'a [u8]) -> Result<Request<'a>, (Option<&'a RawValue>, QgaError)> {
        let parse_error =
            |e: serde_json::Error| (None, QgaError::generic(format!("JSON parse error, {e}")));
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            // Not an object: either not JSON at all, or some other JSON value.
            serde_json::from_slice::<&RawValue>(text).map_err(parse_error)?;
            return Err((None, QgaError::generic("QMP input must be a JSON object")));
        }
        let mut de = serde_json::Deserializer::from_slice(text);
        let members = Members::deserialize(&mut de).map_err(parse_error)?;
        de.end().map_err(parse_error)?;
        let Members {
            execute,
            arguments,
            id,
            unexpected,
        } = members;
        // The bad member a walk over a map of values would meet first: by name.
        let mut first = unexpected.map(|name| {
            let e = QgaError::generic(format!("QMP input member '{name}' is unexpected"));
            (name, e)
        });
        let mut bad = |name: &'static str, desc: &str| {
            if first.as_ref().is_none_or(|(f, _)| name < f.as_ref()) {
                first = Some((Cow::Borrowed(name), QgaError::generic(desc)));
            }
        };
        let execute = match execute {
            Some(raw) => {
                let s = json_string(raw);
                if s.is_none() {
                    bad("execute", "QMP input member 'execute' must be a string");
                }
                s
            }
            None => None,
        };
        let arguments = match arguments {
            None => Map::new(),
            Some(Value::Object(a)) => a,
            Some(_) => {
                bad(
                    "arguments",
                    "QMP input member 'arguments' must be an object",
                );
                Map::new()
            }
        };
        if let Some((_, e)) = first {
            return Err((id, e));
        }
        match execute {
            Some(execute) => Ok(Request {
                execute,
                arguments,
                id,
            }),
            None => Err((id, QgaError::generic("QMP input lacks member 'execute'"))),
        }
    }
}

/// A JSON string's contents: borrowed from the text unless it has escapes. `None` if `raw` is
/// not a string.
fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        // A string the parser accepted without escapes is its own contents.
        Some(Cow::Borrowed(inner))
    }
}

/// The top-level members of a request, `execute` and `id` as they are in the text; the
/// smallest name of those that QMP does not have.
#[derive(Default)]
struct Members<'a> {
    execute: Option<&'a RawValue>,
    arguments: Option<Value>,
    id: Option<&'a RawValue>,
    unexpected: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut m = Members::default();
                while let Some(Name(name)) = map.next_key()? {
                    match &*name {
                        "execute" => m.execute = Some(map.next_value()?),
                        "arguments" => m.arguments = Some(map.next_value()?),
                        "id" => m.id = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            if m.unexpected.as_ref().is_none_or(|u| name < *u) {
                                m.unexpected = Some(name);
                            }
                        }
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(V)
    }
}

/// A member's name, borrowed from the text unless it has escapes (serde's own `Cow<str>`
/// always copies).
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Writes a reply: `{"return": ...}` or `{"error": ...}`, with `id` if the request had one, its
/// members in name order (`error`, `id`, `return`), as a map of values would write them.
pub fn write_reply(out: &mut Vec<u8>, id: Option<&RawValue>, result: Result<&Value, &QgaError>) {
    // Serializing into a Vec cannot fail.
    match result {
        Ok(v) => {
            begin_return(out, id);
            let _ = serde_json::to_writer(&mut *out, v);
        }
        Err(e) => {
            out.extend_from_slice(b"{\"error\":");
            let _ = serde_json::to_writer(&mut *out, e);
            if let Some(id) = id {
                out.push(b',');
                write_id(out, id);
            }
        }
    }
    out.push(b'}');
}

/// The start of a successful reply, up to its value: `{"id":ID,"return":`.
pub(crate) fn begin_return(out: &mut Vec<u8>, id: Option<&RawValue>) {
    out.push(b'{');
    if let Some(id) = id {
        write_id(out, id);
        out.push(b',');
    }
    out.extend_from_slice(b"\"return\":");
}

/// A reply's `"id":ID` member: the request's id as the client wrote it.
fn write_id(out: &mut Vec<u8>, id: &RawValue) {
    out.extend_from_slice(b"\"id\":");
    out.extend_from_slice(id.get().as_bytes());
}
