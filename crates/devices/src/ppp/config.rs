//! The host half's settings: a guest's `[guest.ppp]` section ([`PppConfig`]), checked when
//! vstreamd reads its configuration.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use vstream_transport::Address;

use super::proto::{MAX_MRU, MIN_MRU};
use super::COMMON_PPPD_OPTIONS;
use crate::tun::netns_path;

/// How the host end of the link is terminated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// The configured pppd on a pseudo-terminal (needs the kernel's PPP driver, `/dev/ppp`).
    #[default]
    Pppd,
    /// vstreamd itself speaks PPP and forwards IP packets to a TUN device (`/dev/net/tun`).
    Tun,
}

/// An IPv4 route: `NET/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Route {
    /// The network.
    pub net: Ipv4Addr,
    /// The prefix length, 0-32.
    pub prefix: u8,
}

impl TryFrom<String> for Route {
    type Error = InvalidConfig;

    fn try_from(s: String) -> Result<Route, InvalidConfig> {
        let (net, prefix) = s.split_once('/').unwrap_or((&s, "32"));
        let Ok(net) = net.parse::<Ipv4Addr>() else {
            return Err(InvalidConfig::RouteAddress(s.clone(), net.to_owned()));
        };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or(InvalidConfig::RoutePrefix(s.clone()))?;
        Ok(Route { net, prefix })
    }
}

/// A `[guest.ppp]` value that is wrong; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConfig {
    /// A route whose network is not an IPv4 address.
    #[error("route {0:?}: {1:?} is not an IPv4 address")]
    RouteAddress(String, String),
    /// A route with a prefix length over 32.
    #[error("route {0:?}: the prefix length must be 0-32")]
    RoutePrefix(String),
    /// An MTU pppd would not take.
    #[error("mtu = {0}: must be {MIN_MRU}-{MAX_MRU}")]
    Mtu(u16),
    /// Both ends with one address.
    #[error("local and remote are both {0}: the two ends need different addresses")]
    SameAddress(Ipv4Addr),
    /// An address no link end can have.
    #[error("{0} cannot be the address of a link end")]
    Address(Ipv4Addr),
    /// An interface name the kernel would refuse.
    #[error("interface = {0:?}: 1-15 letters, digits, '-', '_' or '.'")]
    Interface(String),
    /// An option that would break pppd's options file.
    #[error("options: {0:?} contains a newline or NUL")]
    Option(String),
    /// Echoes that could never declare the link dead.
    #[error("echo_failures must be at least 1 when echo_interval_secs is set")]
    EchoFailures,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn default_mtu() -> u16 {
    1500
}

fn default_pppd() -> PathBuf {
    PathBuf::from("/usr/sbin/pppd")
}

fn default_echo_interval() -> u32 {
    5
}

fn default_echo_failures() -> u32 {
    4
}

/// `[guest.ppp]`: the guest's PPP link (docs/devices/ppp.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PppConfig {
    /// The host end's address.
    pub local: Ipv4Addr,
    /// The guest end's address (assigned to the guest through IPCP).
    pub remote: Ipv4Addr,
    /// MTU and MRU of the link, 128-16384.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// A network namespace for the host end: a name from `ip netns add` (in /run/netns) or a
    /// path such as /proc/PID/ns/net. Default: vstreamd's own.
    pub netns: Option<String>,
    /// Routes to add on the host through the link once it is up, e.g. "10.78.0.0/24".
    #[serde(default)]
    pub routes: Vec<Route>,
    /// How the host end is terminated.
    #[serde(default)]
    pub backend: Backend,
    /// The pppd binary (backend `pppd`).
    #[serde(default = "default_pppd")]
    pub pppd: PathBuf,
    /// More pppd options, appended to those vstreamd gives (backend `pppd`).
    #[serde(default)]
    pub options: Vec<String>,
    /// The host interface's name (default `ppp-GUEST`, cut to 15 bytes).
    pub interface: Option<String>,
    /// Carry the link on this raw transport (e.g. the chardev socket of a virtio-serial port
    /// the guest's agent bridges with `vstream.ppp=port:NAME`) instead of a `ppp` channel.
    pub transport: Option<Address>,
    /// Seconds between LCP echo requests (0: none).
    #[serde(default = "default_echo_interval")]
    pub echo_interval_secs: u32,
    /// Unanswered echo requests after which the link is declared dead.
    #[serde(default = "default_echo_failures")]
    pub echo_failures: u32,
}

impl PppConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !(MIN_MRU..=MAX_MRU).contains(&self.mtu) {
            return Err(InvalidConfig::Mtu(self.mtu));
        }
        if self.local == self.remote {
            return Err(InvalidConfig::SameAddress(self.local));
        }
        for a in [self.local, self.remote] {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(InvalidConfig::Address(a));
            }
        }
        if let Some(i) = &self.interface {
            if i.is_empty() || i.len() > 15 || !i.bytes().all(ifname_byte) {
                return Err(InvalidConfig::Interface(i.clone()));
            }
        }
        if let Some(o) = self.options.iter().find(|o| o.contains(['\n', '\0'])) {
            return Err(InvalidConfig::Option(o.clone()));
        }
        if self.echo_interval_secs > 0 && self.echo_failures == 0 {
            return Err(InvalidConfig::EchoFailures);
        }
        Ok(())
    }

    /// The host interface's name.
    pub fn interface_name(&self, guest: &str) -> String {
        match &self.interface {
            Some(i) => i.clone(),
            None => default_interface(guest),
        }
    }

    pub(super) fn netns_path(&self) -> Option<PathBuf> {
        self.netns.as_deref().map(netns_path)
    }

    /// The pppd command line of the host end (after the device): the common options, the
    /// addresses, MTU, interface name, echo settings, then the configured extras.
    pub fn pppd_options(&self, guest: &str) -> Vec<String> {
        let mut o: Vec<String> = COMMON_PPPD_OPTIONS.iter().map(|s| s.to_string()).collect();
        o.push(format!("{}:{}", self.local, self.remote));
        for (k, v) in [
            ("mtu", self.mtu.to_string()),
            ("mru", self.mtu.to_string()),
            ("ifname", self.interface_name(guest)),
            ("ipparam", format!("vstream:{guest}")),
        ] {
            o.push(k.into());
            o.push(v);
        }
        o.push("nodefaultroute".into());
        if self.echo_interval_secs > 0 {
            o.push("lcp-echo-interval".into());
            o.push(self.echo_interval_secs.to_string());
            o.push("lcp-echo-failure".into());
            o.push(self.echo_failures.to_string());
        }
        o.extend(self.options.iter().cloned());
        o
    }
}

fn ifname_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// `ppp-GUEST`, with bytes an interface name cannot hold replaced, cut to 15 bytes.
pub fn default_interface(guest: &str) -> String {
    let mut name: String = format!("ppp-{guest}")
        .bytes()
        .map(|b| if ifname_byte(b) { b as char } else { '_' })
        .collect();
    name.truncate(15);
    name
}
