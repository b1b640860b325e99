//! QGA commands: the command table, typed commands and how they are read from and written to
//! requests.

use serde_json::{json, Map, Value};

use super::{GuestLogicalProcessor, GuestMemoryBlock, QgaError};

/// What `guest-info` says about a command, and whether it may run while frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// QGA name.
    pub name: &'static str,
    /// Whether it replies on success (`guest-shutdown` and `guest-suspend-*` do not).
    pub success_response: bool,
    /// Allowed while file systems are frozen (qemu-ga's list).
    pub allowed_frozen: bool,
}

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
    SuspendDisk,
    SuspendRam,
    SuspendHybrid,
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
    SetVcpus {
        vcpus: Vec<GuestLogicalProcessor>,
    },
    GetMemoryBlocks,
    SetMemoryBlocks {
        blocks: Vec<GuestMemoryBlock>,
    },
    GetMemoryBlockInfo,
    SetUserPassword {
        username: String,
        password: String,
        crypted: bool,
    },
    NetworkGetInterfaces,
    GetFsinfo,
    FsfreezeStatus,
    FsfreezeFreeze,
    FsfreezeFreezeList {
        mountpoints: Option<Vec<String>>,
    },
    FsfreezeThaw,
    Fstrim {
        minimum: Option<i64>,
    },
    GetDisks,
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

    fn bool(&mut self, name: &str) -> Result<bool, QgaError> {
        self.required(name, Args::opt_bool)
    }

    /// A required array of QGA objects (struct members kebab-case).
    fn objects<T: serde::de::DeserializeOwned>(&mut self, name: &str) -> Result<Vec<T>, QgaError> {
        match self.take(name) {
            None => Err(QgaError::generic(format!("Parameter '{name}' is missing"))),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    serde_json::from_value(v).map_err(|e| {
                        QgaError::generic(format!("Invalid parameter '{name}[{i}]': {e}"))
                    })
                })
                .collect(),
            Some(_) => Err(type_error(name, "array")),
        }
    }

    fn finish(self) -> Result<(), QgaError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(QgaError::generic(format!("Parameter '{k}' is unexpected"))),
        }
    }
}

impl Command {
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
            Command::SetVcpus { vcpus } => json!({ "vcpus": vcpus }),
            Command::Fstrim { minimum } => json!({ "minimum": minimum }),
            Command::SetMemoryBlocks { blocks } => json!({ "mem-blks": blocks }),
            Command::SetUserPassword {
                username,
                password,
                crypted,
            } => json!({ "username": username, "password": password, "crypted": crypted }),
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

/// The command table: each command's QGA name, its [`Command`] variant, whether it may run while
/// file systems are frozen (qemu-ga's list), whether it replies on success, and how its
/// arguments are read. [`COMMANDS`], [`Command::parse`] and [`Command::name`] are made from it,
/// so a command is named in one place.
macro_rules! commands {
    ($(
        $name:literal => $variant:ident, frozen: $frozen:literal, reply: $reply:literal,
        |$a:ident| $parse:expr;
    )*) => {
        /// Every command the guest half serves.
        pub const COMMANDS: &[CommandSpec] = &[$(
            CommandSpec { name: $name, success_response: $reply, allowed_frozen: $frozen },
        )*];

        impl Command {
            /// Reads a command from a request's name and arguments.
            pub fn parse(execute: &str, arguments: Map<String, Value>) -> Result<Command, QgaError> {
                let mut args = Args(arguments);
                let cmd = match execute {
                    $($name => {
                        #[allow(unused_variables)]
                        let $a = &mut args;
                        $parse
                    })*
                    other => return Err(QgaError::command_not_found(other)),
                };
                args.finish()?;
                Ok(cmd)
            }

            /// The QGA name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Command::$variant { .. } => $name,)*
                }
            }
        }
    };
}

commands! {
    "guest-sync-delimited" => SyncDelimited, frozen: true, reply: true,
        |a| Command::SyncDelimited { id: a.int("id")? };
    "guest-sync" => Sync, frozen: true, reply: true, |a| Command::Sync { id: a.int("id")? };
    "guest-ping" => Ping, frozen: true, reply: true, |a| Command::Ping;
    "guest-info" => Info, frozen: true, reply: true, |a| Command::Info;
    "guest-shutdown" => Shutdown, frozen: false, reply: false, |a| Command::Shutdown {
        mode: match a.opt_str("mode")?.as_deref() {
            None | Some("powerdown") => ShutdownMode::Powerdown,
            Some("reboot") => ShutdownMode::Reboot,
            Some("halt") => ShutdownMode::Halt,
            Some(_) => return Err(QgaError::invalid_value("mode", "halt|powerdown|reboot")),
        },
    };
    "guest-suspend-disk" => SuspendDisk, frozen: false, reply: false, |a| Command::SuspendDisk;
    "guest-suspend-ram" => SuspendRam, frozen: false, reply: false, |a| Command::SuspendRam;
    "guest-suspend-hybrid" => SuspendHybrid, frozen: false, reply: false,
        |a| Command::SuspendHybrid;
    "guest-get-time" => GetTime, frozen: false, reply: true, |a| Command::GetTime;
    "guest-set-time" => SetTime, frozen: false, reply: true,
        |a| Command::SetTime { time: a.opt_int("time")? };
    "guest-get-osinfo" => GetOsinfo, frozen: false, reply: true, |a| Command::GetOsinfo;
    "guest-get-host-name" => GetHostName, frozen: false, reply: true, |a| Command::GetHostName;
    "guest-get-timezone" => GetTimezone, frozen: false, reply: true, |a| Command::GetTimezone;
    "guest-get-users" => GetUsers, frozen: false, reply: true, |a| Command::GetUsers;
    "guest-get-load" => GetLoad, frozen: false, reply: true, |a| Command::GetLoad;
    "guest-get-vcpus" => GetVcpus, frozen: false, reply: true, |a| Command::GetVcpus;
    "guest-set-vcpus" => SetVcpus, frozen: false, reply: true,
        |a| Command::SetVcpus { vcpus: a.objects("vcpus")? };
    "guest-get-memory-blocks" => GetMemoryBlocks, frozen: false, reply: true,
        |a| Command::GetMemoryBlocks;
    "guest-set-memory-blocks" => SetMemoryBlocks, frozen: false, reply: true,
        |a| Command::SetMemoryBlocks { blocks: a.objects("mem-blks")? };
    "guest-get-memory-block-info" => GetMemoryBlockInfo, frozen: false, reply: true,
        |a| Command::GetMemoryBlockInfo;
    "guest-set-user-password" => SetUserPassword, frozen: false, reply: true,
        |a| Command::SetUserPassword {
            username: a.str("username")?,
            password: a.str("password")?,
            crypted: a.bool("crypted")?,
        };
    "guest-network-get-interfaces" => NetworkGetInterfaces, frozen: false, reply: true,
        |a| Command::NetworkGetInterfaces;
    "guest-get-fsinfo" => GetFsinfo, frozen: false, reply: true, |a| Command::GetFsinfo;
    "guest-fsfreeze-status" => FsfreezeStatus, frozen: true, reply: true,
        |a| Command::FsfreezeStatus;
    "guest-fsfreeze-freeze" => FsfreezeFreeze, frozen: false, reply: true,
        |a| Command::FsfreezeFreeze;
    "guest-fsfreeze-freeze-list" => FsfreezeFreezeList, frozen: false, reply: true,
        |a| Command::FsfreezeFreezeList { mountpoints: a.opt_str_list("mountpoints")? };
    "guest-fsfreeze-thaw" => FsfreezeThaw, frozen: true, reply: true, |a| Command::FsfreezeThaw;
    "guest-fstrim" => Fstrim, frozen: false, reply: true,
        |a| Command::Fstrim { minimum: a.opt_int("minimum")? };
    "guest-get-disks" => GetDisks, frozen: false, reply: true, |a| Command::GetDisks;
    "guest-exec" => Exec, frozen: false, reply: true, |a| parse_exec(a)?;
    "guest-exec-status" => ExecStatus, frozen: false, reply: true,
        |a| Command::ExecStatus { pid: a.int("pid")? };
    "guest-file-open" => FileOpen, frozen: false, reply: true, |a| Command::FileOpen {
        path: a.str("path")?,
        mode: a.opt_str("mode")?,
    };
    "guest-file-close" => FileClose, frozen: false, reply: true,
        |a| Command::FileClose { handle: a.int("handle")? };
    "guest-file-read" => FileRead, frozen: false, reply: true, |a| Command::FileRead {
        handle: a.int("handle")?,
        count: a.opt_int("count")?,
    };
    "guest-file-write" => FileWrite, frozen: false, reply: true, |a| Command::FileWrite {
        handle: a.int("handle")?,
        buf_b64: a.str("buf-b64")?,
        count: a.opt_int("count")?,
    };
    "guest-file-seek" => FileSeek, frozen: false, reply: true, |a| parse_seek(a)?;
    "guest-file-flush" => FileFlush, frozen: false, reply: true,
        |a| Command::FileFlush { handle: a.int("handle")? };
    "guest-ssh-get-authorized-keys" => SshGetAuthorizedKeys, frozen: false, reply: true,
        |a| Command::SshGetAuthorizedKeys { username: a.str("username")? };
    "guest-ssh-add-authorized-keys" => SshAddAuthorizedKeys, frozen: false, reply: true,
        |a| Command::SshAddAuthorizedKeys {
            username: a.str("username")?,
            keys: a.str_list("keys")?,
            reset: a.opt_bool("reset")?.unwrap_or(false),
        };
    "guest-ssh-remove-authorized-keys" => SshRemoveAuthorizedKeys, frozen: false, reply: true,
        |a| Command::SshRemoveAuthorizedKeys {
            username: a.str("username")?,
            keys: a.str_list("keys")?,
        };
}

fn parse_exec(a: &mut Args) -> Result<Command, QgaError> {
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
    Ok(Command::Exec(ExecArgs {
        path,
        arg,
        env,
        input_data,
        capture,
    }))
}

fn parse_seek(a: &mut Args) -> Result<Command, QgaError> {
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
            Some(n) => return Err(QgaError::generic(format!("invalid whence code {n}"))),
            None => return Err(type_error("whence", "integer or QGASeek")),
        },
    };
    Ok(Command::FileSeek {
        handle,
        offset,
        whence,
    })
}
