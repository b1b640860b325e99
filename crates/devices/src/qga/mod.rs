//! Device: qga, system management speaking the QEMU guest agent's JSON protocol.
//!
//! The guest half ([`guest::GuestAgent`]) answers QGA commands (the ones qemu-ga has that make
//! sense here: sync, ping, info, shutdown, time, OS and host facts, users, load, vCPUs, network
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
//! by a newline; `guest-shutdown` sends none on success. A 0xFF byte from the client drops any
//! partial request; the reply to `guest-sync-delimited` is preceded by 0xFF. Limits (see
//! docs/devices/qga.md): [`MAX_REQUEST`], [`MAX_READ_COUNT`], [`MAX_OPEN_FILES`],
//! [`MAX_PROCESSES`], [`MAX_EXEC_OUTPUT`], [`EXEC_OUTPUT_BUDGET`].
//!
//! Layout: `codec.rs` frames bytes (sans-io), this file has the messages and their parsing
//! (sans-io), `guest.rs` runs the commands, `host.rs` is the client.

pub mod codec;
pub mod device;
pub mod guest;
pub mod host;
#[cfg(test)]
mod tests;
pub mod verbs;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use codec::{base64_decode, base64_encode, Frame, Framer, DELIMITER};
pub use guest::QgaService;

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

/// What `guest-info` says about a command, and whether it may run while frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// QGA name.
    pub name: &'static str,
    /// Whether it replies on success (only `guest-shutdown` does not).
    pub success_response: bool,
    /// Allowed while file systems are frozen (qemu-ga's list).
    pub allowed_frozen: bool,
}

const fn spec(name: &'static str, allowed_frozen: bool) -> CommandSpec {
    CommandSpec {
        name,
        success_response: true,
        allowed_frozen,
    }
}

/// Every command the guest half serves.
pub const COMMANDS: &[CommandSpec] = &[
    spec("guest-sync-delimited", true),
    spec("guest-sync", true),
    spec("guest-ping", true),
    spec("guest-info", true),
    CommandSpec {
        name: "guest-shutdown",
        success_response: false,
        allowed_frozen: false,
    },
    spec("guest-get-time", false),
    spec("guest-set-time", false),
    spec("guest-get-osinfo", false),
    spec("guest-get-host-name", false),
    spec("guest-get-timezone", false),
    spec("guest-get-users", false),
    spec("guest-get-load", false),
    spec("guest-get-vcpus", false),
    spec("guest-network-get-interfaces", false),
    spec("guest-get-fsinfo", false),
    spec("guest-fsfreeze-status", true),
    spec("guest-fsfreeze-freeze", false),
    spec("guest-fsfreeze-freeze-list", false),
    spec("guest-fsfreeze-thaw", true),
    spec("guest-exec", false),
    spec("guest-exec-status", false),
    spec("guest-file-open", false),
    spec("guest-file-close", false),
    spec("guest-file-read", false),
    spec("guest-file-write", false),
    spec("guest-file-seek", false),
    spec("guest-file-flush", false),
    spec("guest-ssh-get-authorized-keys", false),
    spec("guest-ssh-add-authorized-keys", false),
    spec("guest-ssh-remove-authorized-keys", false),
];

/// The table entry of a command.
pub fn command_spec(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// `guest-shutdown`'s mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Power off (the default).
    Powerdown,
    /// Restart.
    Reboot,
    /// Stop without powering off.
    Halt,
}

impl ShutdownMode {
    /// The QGA word.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Powerdown => "powerdown",
            ShutdownMode::Reboot => "reboot",
            ShutdownMode::Halt => "halt",
        }
    }
}

/// What `guest-exec` captures (QGA's `capture-output`: a boolean, or since QEMU 8.1 a mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// Nothing (`false`, `"none"`): output goes to /dev/null.
    None,
    /// Standard output only.
    Stdout,
    /// Standard error only.
    Stderr,
    /// Both, separately (`true`, `"separated"`).
    Separated,
    /// Both into `out-data`.
    Merged,
}

/// `guest-file-seek`'s `whence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whence {
    /// From the start (0, `"set"`).
    Set,
    /// From the current position (1, `"cur"`).
    Cur,
    /// From the end (2, `"end"`).
    End,
}

/// Arguments of `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecArgs {
    /// Program (searched in PATH).
    pub path: String,
    /// Arguments after argv\[0\].
    pub arg: Vec<String>,
    /// Environment (`KEY=VALUE`); when given it replaces the agent's.
    pub env: Option<Vec<String>>,
    /// Standard input, base64.
    pub input_data: Option<String>,
    /// What to capture.
    pub capture: Capture,
}

/// A QGA command with typed arguments. [`Command::parse`] reads one from a request (with
/// QEMU's wording for bad arguments); [`Command::to_request`] writes one (host side).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // The fields are QGA's, documented in docs/devices/qga.md.
pub enum Command {
    Sync {
        id: i64,
    },
    SyncDelimited {
        id: i64,
    },
    Ping,
    Info,
    Shutdown {
        mode: ShutdownMode,
    },
    GetTime,
    SetTime {
        time: Option<i64>,
    },
    GetOsinfo,
    GetHostName,
    GetTimezone,
    GetUsers,
    GetLoad,
    GetVcpus,
    NetworkGetInterfaces,
    GetFsinfo,
    FsfreezeStatus,
    FsfreezeFreeze,
    FsfreezeFreezeList {
        mountpoints: Option<Vec<String>>,
    },
    FsfreezeThaw,
    Exec(ExecArgs),
    ExecStatus {
        pid: i64,
    },
    FileOpen {
        path: String,
        mode: Option<String>,
    },
    FileClose {
        handle: i64,
    },
    FileRead {
        handle: i64,
        count: Option<i64>,
    },
    FileWrite {
        handle: i64,
        buf_b64: String,
        count: Option<i64>,
    },
    FileSeek {
        handle: i64,
        offset: i64,
        whence: Whence,
    },
    FileFlush {
        handle: i64,
    },
    SshGetAuthorizedKeys {
        username: String,
    },
    SshAddAuthorizedKeys {
        username: String,
        keys: Vec<String>,
        reset: bool,
    },
    SshRemoveAuthorizedKeys {
        username: String,
        keys: Vec<String>,
    },
}

/// Reads typed members out of `arguments`, with QEMU's messages; [`Args::finish`] rejects the
/// members left over.
struct Args(Map<String, Value>);

fn type_error(name: &str, expected: &str) -> QgaError {
    QgaError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Args {
    /// An optional member; `null` counts as absent.
    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn required<T>(
        &mut self,
        name: &str,
        f: fn(&mut Args, &str) -> Result<Option<T>, QgaError>,
    ) -> Result<T, QgaError> {
        f(self, name)?.ok_or_else(|| QgaError::generic(format!("Parameter '{name}' is missing")))
    }

    fn opt_int(&mut self, name: &str) -> Result<Option<i64>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| type_error(name, "integer")),
        }
    }

    fn int(&mut self, name: &str) -> Result<i64, QgaError> {
        self.required(name, Args::opt_int)
    }

    fn opt_str(&mut self, name: &str) -> Result<Option<String>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(name, "string")),
        }
    }

    fn str(&mut self, name: &str) -> Result<String, QgaError> {
        self.required(name, Args::opt_str)
    }

    fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(name, "boolean")),
        }
    }

    fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(type_error(&format!("{name}[{i}]"), "string")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(type_error(name, "array")),
        }
    }

    fn str_list(&mut self, name: &str) -> Result<Vec<String>, QgaError> {
        self.required(name, Args::opt_str_list)
    }

    fn finish(self) -> Result<(), QgaError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(QgaError::generic(format!("Parameter '{k}' is unexpected"))),
        }
    }
}

impl Command {
    /// Reads a command from a request's name and arguments.
    pub fn parse(execute: &str, arguments: Map<String, Value>) -> Result<Command, QgaError> {
        let mut a = Args(arguments);
        let cmd = match execute {
            "guest-sync" => Command::Sync { id: a.int("id")? },
            "guest-sync-delimited" => Command::SyncDelimited { id: a.int("id")? },
            "guest-ping" => Command::Ping,
            "guest-info" => Command::Info,
            "guest-shutdown" => Command::Shutdown {
                mode: match a.opt_str("mode")?.as_deref() {
                    None | Some("powerdown") => ShutdownMode::Powerdown,
                    Some("reboot") => ShutdownMode::Reboot,
                    Some("halt") => ShutdownMode::Halt,
                    Some(_) => {
                        return Err(QgaError::invalid_value("mode", "halt|powerdown|reboot"))
                    }
                },
            },
            "guest-get-time" => Command::GetTime,
            "guest-set-time" => Command::SetTime {
                time: a.opt_int("time")?,
            },
            "guest-get-osinfo" => Command::GetOsinfo,
            "guest-get-host-name" => Command::GetHostName,
            "guest-get-timezone" => Command::GetTimezone,
            "guest-get-users" => Command::GetUsers,
            "guest-get-load" => Command::GetLoad,
            "guest-get-vcpus" => Command::GetVcpus,
            "guest-network-get-interfaces" => Command::NetworkGetInterfaces,
            "guest-get-fsinfo" => Command::GetFsinfo,
            "guest-fsfreeze-status" => Command::FsfreezeStatus,
            "guest-fsfreeze-freeze" => Command::FsfreezeFreeze,
            "guest-fsfreeze-freeze-list" => Command::FsfreezeFreezeList {
                mountpoints: a.opt_str_list("mountpoints")?,
            },
            "guest-fsfreeze-thaw" => Command::FsfreezeThaw,
            "guest-exec" => {
                let path = a.str("path")?;
                let arg = a.opt_str_list("arg")?.unwrap_or_default();
                let env = a.opt_str_list("env")?;
                let input_data = a.opt_str("input-data")?;
                let capture = match a.take("capture-output") {
                    None | Some(Value::Bool(false)) => Capture::None,
                    Some(Value::Bool(true)) => Capture::Separated,
                    Some(Value::String(s)) => match s.as_str() {
                        "none" => Capture::None,
                        "stdout" => Capture::Stdout,
                        "stderr" => Capture::Stderr,
                        "separated" => Capture::Separated,
                        "merged" => Capture::Merged,
                        _ => {
                            return Err(QgaError::generic(format!(
                                "Parameter 'capture-output' does not accept value '{s}'"
                            )))
                        }
                    },
                    Some(_) => {
                        return Err(type_error(
                            "capture-output",
                            "boolean or GuestExecCaptureOutputMode",
                        ))
                    }
                };
                Command::Exec(ExecArgs {
                    path,
                    arg,
                    env,
                    input_data,
                    capture,
                })
            }
            "guest-exec-status" => Command::ExecStatus { pid: a.int("pid")? },
            "guest-file-open" => Command::FileOpen {
                path: a.str("path")?,
                mode: a.opt_str("mode")?,
            },
            "guest-file-close" => Command::FileClose {
                handle: a.int("handle")?,
            },
            "guest-file-read" => Command::FileRead {
                handle: a.int("handle")?,
                count: a.opt_int("count")?,
            },
            "guest-file-write" => Command::FileWrite {
                handle: a.int("handle")?,
                buf_b64: a.str("buf-b64")?,
                count: a.opt_int("count")?,
            },
            "guest-file-seek" => {
                let handle = a.int("handle")?;
                let offset = a.int("offset")?;
                let whence = match a.take("whence") {
                    None => return Err(QgaError::generic("Parameter 'whence' is missing")),
                    Some(Value::String(s)) => match s.as_str() {
                        "set" => Whence::Set,
                        "cur" => Whence::Cur,
                        "end" => Whence::End,
                        _ => {
                            return Err(QgaError::generic(format!(
                                "Parameter 'whence' does not accept value '{s}'"
                            )))
                        }
                    },
                    Some(v) => match v.as_i64() {
                        Some(0) => Whence::Set,
                        Some(1) => Whence::Cur,
                        Some(2) => Whence::End,
                        Some(n) => {
                            return Err(QgaError::generic(format!("invalid whence code {n}")))
                        }
                        None => return Err(type_error("whence", "integer or QGASeek")),
                    },
                };
                Command::FileSeek {
                    handle,
                    offset,
                    whence,
                }
            }
            "guest-file-flush" => Command::FileFlush {
                handle: a.int("handle")?,
            },
            "guest-ssh-get-authorized-keys" => Command::SshGetAuthorizedKeys {
                username: a.str("username")?,
            },
            "guest-ssh-add-authorized-keys" => Command::SshAddAuthorizedKeys {
                username: a.str("username")?,
                keys: a.str_list("keys")?,
                reset: a.opt_bool("reset")?.unwrap_or(false),
            },
            "guest-ssh-remove-authorized-keys" => Command::SshRemoveAuthorizedKeys {
                username: a.str("username")?,
                keys: a.str_list("keys")?,
            },
            other => return Err(QgaError::command_not_found(other)),
        };
        a.finish()?;
        Ok(cmd)
    }

    /// The QGA name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Sync { .. } => "guest-sync",
            Command::SyncDelimited { .. } => "guest-sync-delimited",
            Command::Ping => "guest-ping",
            Command::Info => "guest-info",
            Command::Shutdown { .. } => "guest-shutdown",
            Command::GetTime => "guest-get-time",
            Command::SetTime { .. } => "guest-set-time",
            Command::GetOsinfo => "guest-get-osinfo",
            Command::GetHostName => "guest-get-host-name",
            Command::GetTimezone => "guest-get-timezone",
            Command::GetUsers => "guest-get-users",
            Command::GetLoad => "guest-get-load",
            Command::GetVcpus => "guest-get-vcpus",
            Command::NetworkGetInterfaces => "guest-network-get-interfaces",
            Command::GetFsinfo => "guest-get-fsinfo",
            Command::FsfreezeStatus => "guest-fsfreeze-status",
            Command::FsfreezeFreeze => "guest-fsfreeze-freeze",
            Command::FsfreezeFreezeList { .. } => "guest-fsfreeze-freeze-list",
            Command::FsfreezeThaw => "guest-fsfreeze-thaw",
            Command::Exec(_) => "guest-exec",
            Command::ExecStatus { .. } => "guest-exec-status",
            Command::FileOpen { .. } => "guest-file-open",
            Command::FileClose { .. } => "guest-file-close",
            Command::FileRead { .. } => "guest-file-read",
            Command::FileWrite { .. } => "guest-file-write",
            Command::FileSeek { .. } => "guest-file-seek",
            Command::FileFlush { .. } => "guest-file-flush",
            Command::SshGetAuthorizedKeys { .. } => "guest-ssh-get-authorized-keys",
            Command::SshAddAuthorizedKeys { .. } => "guest-ssh-add-authorized-keys",
            Command::SshRemoveAuthorizedKeys { .. } => "guest-ssh-remove-authorized-keys",
        }
    }

    /// The arguments object, if the command has arguments.
    pub fn arguments(&self) -> Option<Value> {
        let whence = |w: &Whence| match w {
            Whence::Set => "set",
            Whence::Cur => "cur",
            Whence::End => "end",
        };
        let mut a = match self {
            Command::Sync { id } | Command::SyncDelimited { id } => json!({ "id": id }),
            Command::Shutdown { mode } => json!({ "mode": mode.as_str() }),
            Command::SetTime { time } => json!({ "time": time }),
            Command::FsfreezeFreezeList { mountpoints } => json!({ "mountpoints": mountpoints }),
            Command::Exec(e) => json!({
                "path": e.path,
                "arg": e.arg,
                "env": e.env,
                "input-data": e.input_data,
                "capture-output": match e.capture {
                    Capture::None => json!(false),
                    Capture::Separated => json!(true),
                    Capture::Stdout => json!("stdout"),
                    Capture::Stderr => json!("stderr"),
                    Capture::Merged => json!("merged"),
                },
            }),
            Command::ExecStatus { pid } => json!({ "pid": pid }),
            Command::FileOpen { path, mode } => json!({ "path": path, "mode": mode }),
            Command::FileClose { handle } | Command::FileFlush { handle } => {
                json!({ "handle": handle })
            }
            Command::FileRead { handle, count } => json!({ "handle": handle, "count": count }),
            Command::FileWrite {
                handle,
                buf_b64,
                count,
            } => json!({ "handle": handle, "buf-b64": buf_b64, "count": count }),
            Command::FileSeek {
                handle,
                offset,
                whence: w,
            } => json!({ "handle": handle, "offset": offset, "whence": whence(w) }),
            Command::SshGetAuthorizedKeys { username } => json!({ "username": username }),
            Command::SshAddAuthorizedKeys {
                username,
                keys,
                reset,
            } => json!({ "username": username, "keys": keys, "reset": reset }),
            Command::SshRemoveAuthorizedKeys { username, keys } => {
                json!({ "username": username, "keys": keys })
            }
            _ => return None,
        };
        // Absent optional members are left out rather than sent as null (older qemu-ga
        // versions reject null).
        if let Value::Object(m) = &mut a {
            m.retain(|_, v| !v.is_null());
        }
        Some(a)
    }

    /// The request object.
    pub fn to_request(&self) -> Value {
        let mut m = Map::new();
        m.insert("execute".into(), Value::String(self.name().into()));
        if let Some(a) = self.arguments() {
            m.insert("arguments".into(), a);
        }
        Value::Object(m)
    }
}

/// `guest-info`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// Agent version.
    pub version: String,
    /// Every command (QGA spells this member with an underscore).
    pub supported_commands: Vec<GuestAgentCommandInfo>,
}

/// One command in `guest-info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestAgentCommandInfo {
    /// Name.
    pub name: String,
    /// Usable now.
    pub enabled: bool,
    /// Replies on success.
    pub success_response: bool,
}

/// `guest-file-read`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFileRead {
    /// Bytes read (before base64).
    pub count: u64,
    /// The bytes, base64.
    pub buf_b64: String,
    /// End of file reached.
    pub eof: bool,
}

/// `guest-file-write`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestFileWrite {
    /// Bytes written.
    pub count: u64,
    /// End of file (always false for writes).
    pub eof: bool,
}

/// `guest-file-seek`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestFileSeek {
    /// New position.
    pub position: u64,
    /// End of file (false after a seek).
    pub eof: bool,
}

/// `guest-exec`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestExec {
    /// The process id.
    pub pid: i64,
}

/// `guest-exec-status`'s reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExecStatus {
    /// The process ended and its output was read to the end.
    pub exited: bool,
    /// Exit code, if it exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    /// Signal number, if killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    /// Captured standard output, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_data: Option<String>,
    /// Captured standard error, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_data: Option<String>,
    /// Standard output was cut at the capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_truncated: Option<bool>,
    /// Standard error was cut at the capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_truncated: Option<bool>,
}

/// `guest-get-osinfo`'s reply: uname and os-release(5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // uname(2) and os-release(5) fields of the same names.
pub struct GuestOsInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant_id: Option<String>,
}

/// `guest-get-host-name`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestHostName {
    /// The host name.
    pub host_name: String,
}

/// `guest-get-timezone`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTimezone {
    /// Zone abbreviation, e.g. `UTC`, `CET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Seconds east of UTC.
    pub offset: i64,
}

/// One logged-in user in `guest-get-users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestUser {
    /// User name.
    pub user: String,
    /// Earliest login of this user, seconds since the epoch.
    pub login_time: f64,
    /// Logon domain (Windows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `guest-get-load`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)] // The three load averages.
pub struct GuestLoadAverage {
    pub load1m: f64,
    pub load5m: f64,
    pub load15m: f64,
}

/// One CPU in `guest-get-vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestLogicalProcessor {
    /// CPU number.
    pub logical_id: i64,
    /// Online.
    pub online: bool,
    /// Can be taken offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// One interface in `guest-network-get-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterface {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_addresses: Option<Vec<GuestIpAddress>>,
    /// Counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<GuestNetworkInterfaceStat>,
}

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestIpAddress {
    /// The address.
    pub ip_address: String,
    /// `ipv4` or `ipv6`.
    pub ip_address_type: String,
    /// Prefix length.
    pub prefix: i64,
}

/// Interface counters (/proc/net/dev).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // /proc/net/dev's columns.
pub struct GuestNetworkInterfaceStat {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_dropped: u64,
}

/// One file system in `guest-get-fsinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFilesystemInfo {
    /// Block device name (`vda1`, `dm-0`) or `MAJOR:MINOR`.
    pub name: String,
    /// Mount point.
    pub mountpoint: String,
    /// File system type.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Bytes usable by unprivileged users (used + available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Size of the file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes_privileged: Option<u64>,
    /// Disks it lives on.
    pub disk: Vec<GuestDiskAddress>,
}

/// A disk under a file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskAddress {
    /// PCI address of its controller (-1s if none).
    pub pci_controller: GuestPciAddress,
    /// `virtio`, `scsi`, `sata`, `ide`, `usb`, ... or `unknown`.
    pub bus_type: String,
    /// SCSI bus (channel).
    pub bus: i64,
    /// SCSI target.
    pub target: i64,
    /// SCSI unit (LUN).
    pub unit: i64,
    /// Serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Device node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// A PCI address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // domain:bus:slot.function.
pub struct GuestPciAddress {
    pub domain: i64,
    pub bus: i64,
    pub slot: i64,
    pub function: i64,
}

/// `guest-ssh-get-authorized-keys`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAuthorizedKeys {
    /// The keys, one per line of the file.
    pub keys: Vec<String>,
}
