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

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

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

/// A parsed request: which command, its arguments, and the optional `id` to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `execute`.
    pub execute: String,
    /// `arguments` (empty if absent).
    pub arguments: Map<String, Value>,
    /// `id`, echoed in the reply.
    pub id: Option<Value>,
}

impl Request {
    /// Parses one JSON text into a request, with QEMU's error messages. On error, returns the
    /// `id` if one could be read, to echo it.
    pub fn parse(text: &[u8]) -> Result<Request, (Option<Value>, QgaError)> {
        let value: Value = serde_json::from_slice(text)
            .map_err(|e| (None, QgaError::generic(format!("JSON parse error, {e}"))))?;
        let Value::Object(map) = value else {
            return Err((None, QgaError::generic("QMP input must be a JSON object")));
        };
        let id = map.get("id").cloned();
        let mut execute = None;
        let mut arguments = Map::new();
        for (key, v) in map {
            match (key.as_str(), v) {
                ("execute", Value::String(s)) => execute = Some(s),
                ("execute", _) => {
                    return Err((
                        id,
                        QgaError::generic("QMP input member 'execute' must be a string"),
                    ))
                }
                ("arguments", Value::Object(a)) => arguments = a,
                ("arguments", _) => {
                    return Err((
                        id,
                        QgaError::generic("QMP input member 'arguments' must be an object"),
                    ))
                }
                ("id", _) => {}
                (other, _) => {
                    return Err((
                        id,
                        QgaError::generic(format!("QMP input member '{other}' is unexpected")),
                    ))
                }
            }
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

/// A reply object: `{"return": ...}` or `{"error": ...}`, with `id` if the request had one.
pub fn reply(id: Option<Value>, result: Result<Value, QgaError>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => m.insert("return".into(), v),
        Err(e) => m.insert("error".into(), json!({"class": e.class, "desc": e.desc})),
    };
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}
