//! qemu-ga's command line and configuration file, so that a unit or init script written for
//! qemu-ga starts vstream-agent unchanged (checked against Debian's qemu-ga 7.2: `--help`, `-D`).
//!
//! The file (`-c PATH`, else `$QGA_CONF`, else [`DEFAULT_CONF`]) is read first, then the command
//! line overrides it, as qemu-ga does; a missing default file is not an error. `-a`/`--allow-rpcs`
//! and `-c` come from later qemu-ga releases (Debian's 7.2 lacks them).

use vstream_transport::{Address, SerialConfig};

use super::{class, QgaError};

/// qemu-ga's configuration file.
pub const DEFAULT_CONF: &str = "/etc/qemu/qemu-ga.conf";
/// The fsfreeze hook `-F` without a value names.
pub const DEFAULT_FSFREEZE_HOOK: &str = "/etc/qemu/fsfreeze-hook";
/// The virtio-serial port qemu-ga opens by default.
pub const DEFAULT_VIRTIO_PATH: &str = "/dev/virtio-ports/org.qemu.guest_agent.0";
/// qemu-ga's line speed on an isa-serial port (`GA_CHANNEL_BAUDRATE_DEFAULT`).
const ISA_SERIAL_BAUD: u32 = 38400;

/// qemu-ga's settings: what `-D` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuGaConfig {
    /// `daemon` / `-d`.
    pub daemonize: bool,
    /// `method` / `-m`.
    pub method: String,
    /// `path` / `-p` (the method's default when not given).
    pub path: Option<String>,
    /// `logfile` / `-l`: where the log goes instead of standard error.
    pub logfile: Option<String>,
    /// `pidfile` / `-f`.
    pub pidfile: String,
    /// `fsfreeze-hook` / `-F`.
    pub fsfreeze_hook: Option<String>,
    /// `statedir` / `-t`.
    pub statedir: String,
    /// `verbose` / `-v`.
    pub verbose: bool,
    /// `retry-path` / `-r` (vstream-agent always reopens its port).
    pub retry_path: bool,
    /// `block-rpcs` / `-b`, in qemu-ga's order (each list is reversed as qemu-ga splits it).
    pub block_rpcs: Vec<String>,
    /// `allow-rpcs` / `-a`: when not empty, every other command is disabled.
    pub allow_rpcs: Vec<String>,
    /// `-D`: print the configuration and exit.
    pub dump_conf: bool,
    /// `-b help`: list the commands and exit.
    pub list_rpcs: bool,
}

impl Default for QemuGaConfig {
    fn default() -> QemuGaConfig {
        QemuGaConfig {
            daemonize: false,
            method: "virtio-serial".into(),
            path: None,
            logfile: None,
            pidfile: "/var/run/qemu-ga.pid".into(),
            fsfreeze_hook: None,
            statedir: "/var/run".into(),
            verbose: false,
            retry_path: false,
            block_rpcs: Vec::new(),
            allow_rpcs: Vec::new(),
            dump_conf: false,
            list_rpcs: false,
        }
    }
}

/// qemu-ga's `split_list`: it prepends each item, so a list comes out reversed.
fn split_list(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(',').rev().map(str::to_owned).collect()
}

/// A GKeyFile boolean.
fn key_bool(key: &str, value: &str) -> Result<bool, String> {
    match value.trim_end() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!(
            "Key file contains key “{key}” which has a value that cannot be interpreted."
        )),
    }
}

/// A GKeyFile string value with its escapes (`\s`, `\n`, `\t`, `\r`, `\\`) undone.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('s') => out.push(' '),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

impl QemuGaConfig {
    /// Applies a configuration file's text (GKeyFile syntax, group `[general]`), with glib's
    /// messages for what it refuses.
    pub fn load(&mut self, text: &str) -> Result<(), String> {
        let mut group: Option<&str> = None;
        let (mut has_block, mut has_allow) = (false, false);
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line
                .strip_prefix('[')
                .and_then(|l| l.trim_end().strip_suffix(']'))
            {
                group = Some(name);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!(
                    "Key file contains line “{line}” which is not a key-value pair, group, or comment"
                ));
            };
            let Some(group) = group else {
                return Err("Key file does not start with a group".into());
            };
            if group != "general" {
                continue;
            }
            let (key, value) = (key.trim_end(), unescape(value.trim_start()));
            match key {
                "daemon" => self.daemonize = key_bool(key, &value)?,
                "method" => self.method = value,
                "path" => self.path = Some(value),
                "logfile" => self.logfile = Some(value),
                "pidfile" => self.pidfile = value,
                "fsfreeze-hook" => self.fsfreeze_hook = Some(value),
                "statedir" => self.statedir = value,
                "verbose" => self.verbose = key_bool(key, &value)?,
                "retry-path" => self.retry_path = key_bool(key, &value)?,
                // `blacklist` is the deprecated name qemu-ga still reads.
                "block-rpcs" | "blacklist" => {
                    has_block = true;
                    self.block_rpcs.extend(split_list(&value));
                }
                "allow-rpcs" => {
                    has_allow = true;
                    self.allow_rpcs.extend(split_list(&value));
                }
                _ => {}
            }
        }
        if has_block && has_allow {
            return Err(
                "wrong config, using 'block-rpcs' and 'allow-rpcs' keys at the same time is not allowed"
                    .into(),
            );
        }
        Ok(())
    }

    /// The path, or the method's default; qemu-ga's error when the method has none.
    pub fn path(&self) -> Result<String, String> {
        match (&self.path, self.method.as_str()) {
            (Some(p), _) => Ok(p.clone()),
            (None, "virtio-serial") => Ok(DEFAULT_VIRTIO_PATH.into()),
            (None, "isa-serial") => Ok("/dev/ttyS0".into()),
            (None, _) => Err("must specify a path for this channel".into()),
        }
    }

    /// The transport the agent serves QGA on.
    pub fn address(&self) -> Result<Address, String> {
        let path = self.path()?;
        match self.method.as_str() {
            // vstream-agent finds a virtio-serial port by name (in sysfs when udev made no link).
            "virtio-serial" => match path.strip_prefix("/dev/virtio-ports/") {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    Ok(Address::Port(name.to_owned()))
                }
                _ => Err(format!(
                    "virtio-serial path {path}: give the port as /dev/virtio-ports/NAME"
                )),
            },
            "isa-serial" => Ok(Address::Serial(SerialConfig {
                baud: ISA_SERIAL_BAUD,
                ..SerialConfig::new(path)
            })),
            "unix-listen" => Ok(Address::UnixListen(path.into())),
            "vsock-listen" => {
                // `<cid>:<port>`; vstream-agent listens on every CID.
                let port = path.rsplit_once(':').map_or(path.as_str(), |(_, p)| p);
                port.parse()
                    .map(|port| Address::VsockListen { port })
                    .map_err(|_| format!("invalid vsock address: {path}"))
            }
            other => Err(format!("invalid channel method: {other}")),
        }
    }

    /// What `-D` prints: qemu-ga 7.2's keys in its order (`allow-rpcs` only when set).
    pub fn dump(&self) -> Result<String, String> {
        let mut out = String::from("[general]\n");
        let mut line = |k: &str, v: &str| {
            out.push_str(k);
            out.push('=');
            out.push_str(v);
            out.push('\n');
        };
        line("daemon", &self.daemonize.to_string());
        line("method", &self.method);
        line("path", &self.path()?);
        if let Some(l) = &self.logfile {
            line("logfile", l);
        }
        line("pidfile", &self.pidfile);
        if let Some(h) = &self.fsfreeze_hook {
            line("fsfreeze-hook", h);
        }
        line("statedir", &self.statedir);
        line("verbose", &self.verbose.to_string());
        line("retry-path", &self.retry_path.to_string());
        line("block-rpcs", &self.block_rpcs.join(","));
        if !self.allow_rpcs.is_empty() {
            line("allow-rpcs", &self.allow_rpcs.join(","));
        }
        Ok(out)
    }

    /// Which commands run.
    pub fn filter(&self) -> CommandFilter {
        CommandFilter {
            block: self.block_rpcs.clone(),
            allow: self.allow_rpcs.clone(),
        }
    }
}

/// qemu-ga's command options, as clap arguments of vstream-agent (ids prefixed `qemu-ga-`).
pub fn args() -> Vec<clap::Arg> {
    use clap::{Arg, ArgAction};
    let value = |id: &'static str, short: char, long: &'static str, help: &'static str| {
        Arg::new(id)
            .short(short)
            .long(long)
            .value_name("VALUE")
            .action(ArgAction::Append)
            .help(help)
    };
    let flag = |id: &'static str, short: char, long: &'static str, help: &'static str| {
        Arg::new(id)
            .short(short)
            .long(long)
            .action(ArgAction::SetTrue)
            .help(help)
    };
    vec![
        value(ID_METHOD, 'm', "method", "qemu-ga: transport method: virtio-serial (default), isa-serial, unix-listen or vsock-listen"),
        value(ID_PATH, 'p', "path", "qemu-ga: device or socket path (vsock-listen: <cid>:<port>)"),
        value(ID_LOGFILE, 'l', "logfile", "qemu-ga: log to this file instead of standard error"),
        value(ID_PIDFILE, 'f', "pidfile", "qemu-ga: pid file (default /var/run/qemu-ga.pid)"),
        Arg::new(ID_FSFREEZE_HOOK)
            .short('F')
            .long("fsfreeze-hook")
            .value_name("HOOK")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value(DEFAULT_FSFREEZE_HOOK)
            .help("qemu-ga: run HOOK freeze/thaw around a freeze (default /etc/qemu/fsfreeze-hook)"),
        value(ID_STATEDIR, 't', "statedir", "qemu-ga: state directory (default /var/run)"),
        flag(ID_VERBOSE, 'v', "verbose", "qemu-ga: log extra debugging information"),
        flag(ID_DAEMONIZE, 'd', "daemonize", "qemu-ga: become a daemon"),
        value(ID_BLOCK, 'b', "block-rpcs", "qemu-ga: comma-separated commands to disable (\"help\" lists them)"),
        value(ID_ALLOW, 'a', "allow-rpcs", "qemu-ga: comma-separated commands to allow, all others disabled"),
        flag(ID_DUMP, 'D', "dump-conf", "qemu-ga: print the configuration (file and options) and exit"),
        flag(ID_RETRY, 'r', "retry-path", "qemu-ga: reopen the path when it goes away (vstream-agent always does)"),
        value(ID_CONFIG, 'c', "config", "qemu-ga: configuration file (default $QGA_CONF or /etc/qemu/qemu-ga.conf)"),
    ]
}

const ID_METHOD: &str = "qemu-ga-method";
const ID_PATH: &str = "qemu-ga-path";
const ID_LOGFILE: &str = "qemu-ga-logfile";
const ID_PIDFILE: &str = "qemu-ga-pidfile";
const ID_FSFREEZE_HOOK: &str = "qemu-ga-fsfreeze-hook";
const ID_STATEDIR: &str = "qemu-ga-statedir";
const ID_VERBOSE: &str = "qemu-ga-verbose";
const ID_DAEMONIZE: &str = "qemu-ga-daemonize";
const ID_BLOCK: &str = "qemu-ga-block-rpcs";
const ID_ALLOW: &str = "qemu-ga-allow-rpcs";
const ID_DUMP: &str = "qemu-ga-dump-conf";
const ID_RETRY: &str = "qemu-ga-retry-path";
const ID_CONFIG: &str = "qemu-ga-config";
const IDS: &[&str] = &[
    ID_METHOD,
    ID_PATH,
    ID_LOGFILE,
    ID_PIDFILE,
    ID_FSFREEZE_HOOK,
    ID_STATEDIR,
    ID_VERBOSE,
    ID_DAEMONIZE,
    ID_BLOCK,
    ID_ALLOW,
    ID_DUMP,
    ID_RETRY,
    ID_CONFIG,
];

/// Whether the agent runs as qemu-ga: started under that name (a unit's `ExecStart=` pointing
/// at a link to it) or given any of qemu-ga's options.
pub fn wanted(matches: &clap::ArgMatches, program: Option<&std::ffi::OsStr>) -> bool {
    let named = program
        .and_then(|p| std::path::Path::new(p).file_name())
        .is_some_and(|n| n == "qemu-ga");
    named
        || IDS
            .iter()
            .any(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
}

/// The configuration from the file and the command line. `read` reads a file (`Ok(None)` if it
/// does not exist); `conf_env` is `$QGA_CONF`.
pub fn from_matches(
    matches: &clap::ArgMatches,
    conf_env: Option<&str>,
    read: impl Fn(&str) -> std::io::Result<Option<String>>,
) -> Result<QemuGaConfig, String> {
    let last = |id: &str| {
        matches
            .get_many::<String>(id)
            .and_then(|mut v| v.next_back().cloned())
    };
    let mut config = QemuGaConfig::default();
    let given = last(ID_CONFIG);
    let path = given.clone().or(conf_env.map(str::to_owned));
    let path = path.as_deref().unwrap_or(DEFAULT_CONF);
    let text = read(path).and_then(|t| match (t, &given) {
        (None, Some(_)) => Err(std::io::ErrorKind::NotFound.into()),
        (t, _) => Ok(t),
    });
    let fail = |e: String| format!("error loading configuration from path: {path}, {e}");
    match text {
        Ok(Some(text)) => config.load(&text).map_err(fail)?,
        Ok(None) => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let set = |field: &mut String, id: &str| {
        if let Some(v) = last(id) {
            *field = v;
        }
    };
    set(&mut config.method, ID_METHOD);
    set(&mut config.pidfile, ID_PIDFILE);
    set(&mut config.statedir, ID_STATEDIR);
    let opt = |field: &mut Option<String>, id: &str| {
        if let Some(v) = last(id) {
            *field = Some(v);
        }
    };
    opt(&mut config.path, ID_PATH);
    opt(&mut config.logfile, ID_LOGFILE);
    opt(&mut config.fsfreeze_hook, ID_FSFREEZE_HOOK);
    config.verbose |= matches.get_flag(ID_VERBOSE);
    config.daemonize |= matches.get_flag(ID_DAEMONIZE);
    config.retry_path |= matches.get_flag(ID_RETRY);
    config.dump_conf = matches.get_flag(ID_DUMP);
    for (list, id) in [
        (&mut config.block_rpcs, ID_BLOCK),
        (&mut config.allow_rpcs, ID_ALLOW),
    ] {
        for v in matches.get_many::<String>(id).into_iter().flatten() {
            list.extend(split_list(v));
        }
    }
    config.list_rpcs = matches
        .get_many::<String>(ID_BLOCK)
        .into_iter()
        .flatten()
        .any(|v| v == "help" || v == "?");
    // Checked here, before anything starts, as qemu-ga does.
    config.path()?;
    Ok(config)
}

/// Which commands may run: qemu-ga's block and allow lists. A command on the block list is
/// disabled; when the allow list is not empty, so is every command not on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandFilter {
    /// Disabled commands.
    pub block: Vec<String>,
    /// If not empty, the only enabled commands.
    pub allow: Vec<String>,
}

impl CommandFilter {
    /// Whether `name` is enabled.
    pub fn allows(&self, name: &str) -> bool {
        let listed = |l: &[String]| l.iter().any(|n| n == name);
        (self.allow.is_empty() || listed(&self.allow)) && !listed(&self.block)
    }

    /// qemu-ga's answer to a disabled command, or `Ok`.
    pub fn check(&self, name: &str) -> Result<(), QgaError> {
        if self.allows(name) {
            return Ok(());
        }
        Err(QgaError {
            class: class::COMMAND_NOT_FOUND.to_owned(),
            desc: format!("Command {name} has been disabled"),
        })
    }
}
