//! The address syntax: one string form for every transport, on the host and in the guest.
//!
//! `Address::from_str` parses it and `Display` prints it back; printing then parsing gives the
//! same `Address` (for addresses that were parsed from a string, or built with UTF-8 paths and a
//! serial device name without a comma).

use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;

/// Every address form, for error messages.
pub const SYNTAX: &str = "unix:PATH, unix-listen:PATH, tcp:HOST:PORT, tcp-listen:HOST:PORT, \
vsock:CID:PORT, vsock-listen:PORT, hvsock:PATH:PORT, \
vhost-user-vsock:SOCKET,cid=N,port=N[,uds=PATH], serial:DEVICE[,baud=N][,rtscts], port:NAME, \
fd:N or stdio";

/// The baud rate a serial line gets when its address names none.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Where a byte stream comes from: a socket to connect to or listen on, a device, or a descriptor.
///
/// | form | meaning |
/// | --- | --- |
/// | `unix:PATH` | connect to the Unix stream socket at PATH |
/// | `unix-listen:PATH` | listen on a Unix socket at PATH (a stale socket file is replaced) |
/// | `tcp:HOST:PORT` | connect over TCP; HOST may be a name, an IPv4 address or `[IPv6]` |
/// | `tcp-listen:HOST:PORT` | listen on TCP; port 0 picks a free port |
/// | `vsock:CID:PORT` | connect over AF_VSOCK (CID 2 is the host, 1 this machine) |
/// | `vsock-listen:PORT` | listen on AF_VSOCK on every CID |
/// | `hvsock:PATH:PORT` | Firecracker / Cloud Hypervisor hybrid vsock: the VMM's Unix socket PATH, guest port PORT |
/// | `vhost-user-vsock:SOCKET,cid=N,port=N[,uds=PATH]` | vstreamd is the guest's virtio-vsock device (vhost-user on SOCKET); guest connections to vsock port `port` are the connections; `uds=` adds a hybrid socket for host programs |
/// | `serial:DEVICE[,baud=N][,rtscts]` | a serial line in raw 8N1 mode, 115200 baud unless told |
/// | `port:NAME` | the virtio-serial port named NAME (guest side) |
/// | `fd:N` | descriptor N, inherited from the parent (socket, tty, pipe) |
/// | `stdio` | standard input and output as one stream |
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `unix:PATH`: connect to a Unix stream socket.
    Unix(PathBuf),
    /// `unix-listen:PATH`: bind a Unix stream socket and accept connections on it.
    UnixListen(PathBuf),
    /// `tcp:HOST:PORT`: connect over TCP. `host` is kept without IPv6 brackets.
    Tcp {
        /// Host name or IP address (an IPv6 literal without its brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// `tcp-listen:HOST:PORT`: bind a TCP socket and accept connections on it.
    TcpListen {
        /// Address to bind (an IPv6 literal without its brackets), e.g. `127.0.0.1` or `::`.
        host: String,
        /// TCP port; 0 lets the kernel choose, and the endpoint's address then shows the choice.
        port: u16,
    },
    /// `vsock:CID:PORT`: connect over AF_VSOCK.
    Vsock {
        /// Context id of the peer: 2 is the host, 1 this machine (loopback), 3 and up guests.
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// `vsock-listen:PORT`: listen on AF_VSOCK on any CID.
    VsockListen {
        /// vsock port.
        port: u32,
    },
    /// `hvsock:PATH:PORT`: hybrid vsock through the VMM's Unix socket at `path`, to guest port `port`.
    HybridVsock {
        /// The VMM's Unix socket (Firecracker `uds_path`, Cloud Hypervisor `socket=`).
        path: PathBuf,
        /// The vsock port the guest listens on.
        port: u32,
    },
    /// `vhost-user-vsock:SOCKET,cid=N,port=N[,uds=PATH]`: vstreamd serves the guest's
    /// virtio-vsock device itself over vhost-user; see [`VhostVsockConfig`].
    VhostUserVsock(VhostVsockConfig),
    /// `serial:DEVICE[,baud=N][,rtscts]`: a serial line.
    Serial(SerialConfig),
    /// `port:NAME`: a virtio-serial port, found by its name.
    Port(String),
    /// `fd:N`: an inherited descriptor. The endpoint takes ownership of it: nothing else in the
    /// process may use or close descriptor N afterwards.
    Fd(RawFd),
    /// `stdio`: standard input for reading and standard output for writing.
    Stdio,
}

/// How to open and set up a serial line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SerialConfig {
    /// The tty device, e.g. `/dev/ttyS1` or `/dev/ttyUSB0`. It cannot contain a comma.
    pub device: PathBuf,
    /// Line speed in baud ([`DEFAULT_BAUD`] unless the address says `baud=N`).
    pub baud: u32,
    /// Hardware (RTS/CTS) flow control.
    pub rtscts: bool,
}

impl SerialConfig {
    /// A line on `device` at [`DEFAULT_BAUD`], without hardware flow control.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        SerialConfig {
            device: device.into(),
            baud: DEFAULT_BAUD,
            rtscts: false,
        }
    }
}

/// A virtio-vsock device served by vstream over vhost-user (`vhost-user-vsock:` addresses).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VhostVsockConfig {
    /// The vhost-user socket the VMM connects to (QEMU `-chardev socket,path=`).
    pub socket: PathBuf,
    /// The guest's CID (the device tells the guest; it is the guest's identity on this device).
    pub cid: u32,
    /// The vsock port on the host (CID 2) where the guest's agent connects: those connections
    /// are this transport's connections.
    pub port: u32,
    /// The hybrid socket for host programs (`CONNECT <port>\n`; guest connections to other
    /// ports go to `<uds>_<port>`), as Firecracker and Cloud Hypervisor have it.
    pub uds: Option<PathBuf>,
}

/// Why a string is not an [`Address`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The string was empty.
    #[error("empty transport address; expected one of: {SYNTAX}")]
    Empty,
    /// The part before the first `:` names no transport.
    #[error("unknown transport {kind:?} in address {input:?}; expected one of: {SYNTAX}")]
    UnknownKind {
        /// The whole input.
        input: String,
        /// The part that names no transport.
        kind: String,
    },
    /// The transport is known but the rest does not fit its syntax.
    #[error("bad address {input:?}: {problem}; expected {expected}")]
    Invalid {
        /// The whole input.
        input: String,
        /// What is wrong with it.
        problem: AddressProblem,
        /// The syntax this transport expects.
        expected: &'static str,
    },
}

/// What is wrong with the part of an address after its transport's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    /// A required part (a path, a device, a name) is empty.
    #[error("the {0} is empty")]
    Empty(&'static str),
    /// A required part is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// `HOST` without `:PORT`.
    #[error("missing ':PORT'")]
    MissingPort,
    /// `vsock:` without the `:` between its two numbers.
    #[error("missing ':' between CID and PORT")]
    MissingCidColon,
    /// A number that is not made of decimal digits.
    #[error("{what} {text:?} is not a decimal number")]
    NotDecimal {
        /// Which number.
        what: &'static str,
        /// What came.
        text: String,
    },
    /// A number too large for its field.
    #[error("{what} {text} is out of range")]
    OutOfRange {
        /// Which number.
        what: &'static str,
        /// What came.
        text: String,
    },
    /// An unbracketed host with a `:` in it.
    #[error("too many ':' (write an IPv6 address in brackets, e.g. [::1]:5555)")]
    TooManyColons,
    /// `[` without `]`.
    #[error("'[' without a closing ']'")]
    UnclosedBracket,
    /// A bracketed host that is not an IPv6 literal.
    #[error("[{0}] is not an IPv6 address")]
    NotIpv6(String),
    /// A path or a bracketed host not followed by `:PORT`.
    #[error("missing ':PORT' after {0}")]
    MissingPortAfter(String),
    /// An empty host.
    #[error("the host is empty (use 0.0.0.0 or [::] for every address)")]
    EmptyHost,
    /// A port name that would name another file.
    #[error("{0:?} is not a port name (it would name another file)")]
    NotPortName(String),
    /// `baud=0`.
    #[error("baud must be more than 0")]
    ZeroBaud,
    /// An option given twice.
    #[error("{0} given twice")]
    Twice(String),
    /// An option the transport does not have.
    #[error("unknown {kind} {option:?} (the options are {known})")]
    UnknownOption {
        /// "option" or "serial option".
        kind: &'static str,
        /// What came.
        option: String,
        /// The options there are.
        known: &'static str,
    },
    /// A CID that is not a guest's.
    #[error("cid {0} is not a guest CID")]
    NotGuestCid(u32),
}

impl Address {
    /// True for the forms that wait for peers to connect (`unix-listen`, `tcp-listen`,
    /// `vsock-listen`, `vhost-user-vsock`); false for those that connect out or open a device or descriptor.
    pub fn is_listener(&self) -> bool {
        matches!(
            self,
            Address::UnixListen(_)
                | Address::TcpListen { .. }
                | Address::VsockListen { .. }
                | Address::VhostUserVsock(_)
        )
    }
}

/// The syntax of each form, shown when the rest of an address does not fit.
mod expect {
    pub const UNIX: &str = "unix:PATH";
    pub const UNIX_LISTEN: &str = "unix-listen:PATH";
    pub const TCP: &str = "tcp:HOST:PORT (HOST a name, an IPv4 address or [IPv6], PORT 0-65535)";
    pub const TCP_LISTEN: &str =
        "tcp-listen:HOST:PORT (HOST a name, an IPv4 address or [IPv6], PORT 0-65535)";
    pub const VSOCK: &str = "vsock:CID:PORT (both decimal 32-bit numbers)";
    pub const VSOCK_LISTEN: &str = "vsock-listen:PORT (a decimal 32-bit number)";
    pub const HVSOCK: &str = "hvsock:PATH:PORT (PORT a decimal 32-bit number)";
    pub const SERIAL: &str = "serial:DEVICE[,baud=N][,rtscts]";
    pub const VHOST_VSOCK: &str = "vhost-user-vsock:SOCKET,cid=N,port=N[,uds=PATH] (CID 3 or more)";
    pub const PORT: &str = "port:NAME (a virtio-serial port name, without '/')";
    pub const FD: &str = "fd:N (a descriptor number, 0 or more)";
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(AddressError::Empty);
        }
        if input == "stdio" {
            return Ok(Address::Stdio);
        }
        let invalid = |problem: AddressProblem, expected: &'static str| AddressError::Invalid {
            input: input.to_owned(),
            problem,
            expected,
        };
        let Some((kind, rest)) = input.split_once(':') else {
            return Err(AddressError::UnknownKind {
                input: input.to_owned(),
                kind: input.to_owned(),
            });
        };
        let path = |expected: &'static str| {
            if rest.is_empty() {
                Err(invalid(AddressProblem::Empty("path"), expected))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        match kind {
            "unix" => path(expect::UNIX).map(Address::Unix),
            "unix-listen" => path(expect::UNIX_LISTEN).map(Address::UnixListen),
            "tcp" => {
                let (host, port) =
                    parse_host_port(rest).map_err(|problem| invalid(problem, expect::TCP))?;
                Ok(Address::Tcp { host, port })
            }
            "tcp-listen" => {
                let (host, port) = parse_host_port(rest)
                    .map_err(|problem| invalid(problem, expect::TCP_LISTEN))?;
                Ok(Address::TcpListen { host, port })
            }
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid(AddressProblem::MissingCidColon, expect::VSOCK))?;
                let cid = parse_number(cid, "CID").map_err(|p| invalid(p, expect::VSOCK))?;
                let port = parse_number(port, "PORT").map_err(|p| invalid(p, expect::VSOCK))?;
                Ok(Address::Vsock { cid, port })
            }
            "vsock-listen" => {
                let port =
                    parse_number(rest, "PORT").map_err(|p| invalid(p, expect::VSOCK_LISTEN))?;
                Ok(Address::VsockListen { port })
            }
            "hvsock" => {
                let (path, port) = rest.rsplit_once(':').ok_or_else(|| {
                    invalid(
                        AddressProblem::MissingPortAfter("the path".into()),
                        expect::HVSOCK,
                    )
                })?;
                if path.is_empty() {
                    return Err(invalid(AddressProblem::Empty("path"), expect::HVSOCK));
                }
                let port = parse_number(port, "PORT").map_err(|p| invalid(p, expect::HVSOCK))?;
                Ok(Address::HybridVsock {
                    path: PathBuf::from(path),
                    port,
                })
            }
            "vhost-user-vsock" => parse_vhost_vsock(rest)
                .map(Address::VhostUserVsock)
                .map_err(|p| invalid(p, expect::VHOST_VSOCK)),
            "serial" => parse_serial(rest)
                .map(Address::Serial)
                .map_err(|p| invalid(p, expect::SERIAL)),
            "port" => {
                if rest.is_empty() {
                    Err(invalid(AddressProblem::Empty("port name"), expect::PORT))
                } else if rest.contains('/') || rest == "." || rest == ".." {
                    Err(invalid(
                        AddressProblem::NotPortName(rest.to_owned()),
                        expect::PORT,
                    ))
                } else {
                    Ok(Address::Port(rest.to_owned()))
                }
            }
            "fd" => {
                let fd: RawFd = parse_number(rest, "N").map_err(|p| invalid(p, expect::FD))?;
                Ok(Address::Fd(fd))
            }
            _ => Err(AddressError::UnknownKind {
                input: input.to_owned(),
                kind: kind.to_owned(),
            }),
        }
    }
}

/// Parses a decimal number made of ASCII digits only (no sign, no spaces).
fn parse_number<T: FromStr>(text: &str, what: &'static str) -> Result<T, AddressProblem> {
    if text.is_empty() {
        return Err(AddressProblem::Missing(what));
    }
    let text = text.to_owned();
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressProblem::NotDecimal { what, text });
    }
    text.parse()
        .map_err(|_| AddressProblem::OutOfRange { what, text })
}

/// Parses `HOST:PORT` where HOST is a name, an IPv4 address or a bracketed IPv6 literal.
/// The host is returned without brackets.
fn parse_host_port(text: &str) -> Result<(String, u16), AddressProblem> {
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or(AddressProblem::UnclosedBracket)?;
        if !host.contains(':') {
            return Err(AddressProblem::NotIpv6(host.to_owned()));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| AddressProblem::MissingPortAfter(format!("[{host}]")))?;
        (host, port)
    } else {
        let (host, port) = text.split_once(':').ok_or(AddressProblem::MissingPort)?;
        if port.contains(':') {
            return Err(AddressProblem::TooManyColons);
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(AddressProblem::EmptyHost);
    }
    let port = parse_number(port, "PORT")?;
    Ok((host.to_owned(), port))
}

/// Parses `DEVICE[,baud=N][,rtscts]`.
fn parse_serial(text: &str) -> Result<SerialConfig, AddressProblem> {
    let mut parts = text.split(',');
    let device = parts.next().unwrap_or_default();
    if device.is_empty() {
        return Err(AddressProblem::Empty("device"));
    }
    let mut config = SerialConfig::new(device);
    let (mut saw_baud, mut saw_rtscts) = (false, false);
    for option in parts {
        if let Some(value) = option.strip_prefix("baud=") {
            if saw_baud {
                return Err(AddressProblem::Twice("baud".into()));
            }
            saw_baud = true;
            config.baud = parse_number(value, "baud")?;
            if config.baud == 0 {
                return Err(AddressProblem::ZeroBaud);
            }
        } else if option == "rtscts" {
            if saw_rtscts {
                return Err(AddressProblem::Twice("rtscts".into()));
            }
            saw_rtscts = true;
            config.rtscts = true;
        } else {
            return Err(AddressProblem::UnknownOption {
                kind: "serial option",
                option: option.to_owned(),
                known: "baud=N and rtscts",
            });
        }
    }
    Ok(config)
}

/// Parses `SOCKET,cid=N,port=N[,uds=PATH]`.
fn parse_vhost_vsock(text: &str) -> Result<VhostVsockConfig, AddressProblem> {
    let mut parts = text.split(',');
    let socket = parts.next().unwrap_or_default();
    if socket.is_empty() {
        return Err(AddressProblem::Empty("socket path"));
    }
    let (mut cid, mut port, mut uds) = (None, None, None);
    for option in parts {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let slot_taken = match key {
            "cid" => cid.replace(parse_number::<u32>(value, "cid")?).is_some(),
            "port" => port.replace(parse_number::<u32>(value, "port")?).is_some(),
            "uds" if !value.is_empty() => uds.replace(PathBuf::from(value)).is_some(),
            _ => {
                return Err(AddressProblem::UnknownOption {
                    kind: "option",
                    option: option.to_owned(),
                    known: "cid=N, port=N and uds=PATH",
                })
            }
        };
        if slot_taken {
            return Err(AddressProblem::Twice(key.to_owned()));
        }
    }
    let cid = cid.ok_or(AddressProblem::Missing("cid=N"))?;
    // 0-2 are the hypervisor, loopback and the host; u32::MAX is "any".
    if cid < 3 || cid == u32::MAX {
        return Err(AddressProblem::NotGuestCid(cid));
    }
    Ok(VhostVsockConfig {
        socket: PathBuf::from(socket),
        cid,
        port: port.ok_or(AddressProblem::Missing("port=N"))?,
        uds,
    })
}

/// Writes `host:port`, bracketing an IPv6 literal.
fn fmt_host_port(f: &mut fmt::Formatter<'_>, host: &str, port: u16) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]:{port}")
    } else {
        write!(f, "{host}:{port}")
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::UnixListen(path) => write!(f, "unix-listen:{}", path.display()),
            Address::Tcp { host, port } => {
                f.write_str("tcp:")?;
                fmt_host_port(f, host, *port)
            }
            Address::TcpListen { host, port } => {
                f.write_str("tcp-listen:")?;
                fmt_host_port(f, host, *port)
            }
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Address::VsockListen { port } => write!(f, "vsock-listen:{port}"),
            Address::HybridVsock { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
            Address::VhostUserVsock(c) => {
                write!(
                    f,
                    "vhost-user-vsock:{},cid={},port={}",
                    c.socket.display(),
                    c.cid,
                    c.port
                )?;
                if let Some(uds) = &c.uds {
                    write!(f, ",uds={}", uds.display())?;
                }
                Ok(())
            }
            Address::Serial(config) => {
                write!(f, "serial:{}", config.device.display())?;
                if config.baud != DEFAULT_BAUD {
                    write!(f, ",baud={}", config.baud)?;
                }
                if config.rtscts {
                    f.write_str(",rtscts")?;
                }
                Ok(())
            }
            Address::Port(name) => write!(f, "port:{name}"),
            Address::Fd(fd) => write!(f, "fd:{fd}"),
            Address::Stdio => f.write_str("stdio"),
        }
    }
}

/// Addresses appear in config files as their one-line syntax.
impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Written back in the same syntax.
impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests;
