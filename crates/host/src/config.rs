//! vstreamd's TOML configuration (see docs/vstreamd.example.toml).

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use serde::Deserialize;
use vstream_devices::registry::{registry, Device, GuestFacts, RawTransport, SettingsError};
use vstream_link::link_params;
use vstream_transport::Address;
use vstream_wire::{Config as WireConfig, LinkParams, Role};

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Daemon-wide settings.
    #[serde(default)]
    pub daemon: DaemonSection,
    /// Guests known in advance.
    #[serde(default)]
    pub guest: Vec<GuestConfig>,
}

/// `[daemon]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Control socket path (the command line wins).
    pub control: Option<PathBuf>,
    /// A group (name or gid) whose members may watch through the control socket (status,
    /// events, console logs) and do nothing else; the socket becomes 0660 with this group.
    pub control_read_group: Option<crate::access::GroupRef>,
    /// Where console logs and spools go (the command line wins).
    pub state_dir: Option<PathBuf>,
    /// Serve the web console here (`127.0.0.1:8080` or a Unix socket path; the command
    /// line's `--http` wins).
    pub http: Option<crate::web::HttpAddr>,
    /// Where to serve Prometheus metrics over HTTP (`127.0.0.1:9464`; the command line wins).
    pub metrics: Option<std::net::SocketAddr>,
    /// Shared listeners: addresses where the agents of many guests connect. Which guest a
    /// connection is comes from what its transport proves (crates/host/src/identity.rs).
    #[serde(default)]
    pub listen: Vec<Address>,
    /// `[daemon.announced]`: guests that are not configured but announce a name.
    #[serde(default)]
    pub announced: AnnouncedConfig,
    /// Accept plain TCP (no key handshake) on shared listeners, trusting the announced name.
    /// Only for networks where every peer is trusted.
    #[serde(default)]
    pub insecure_tcp: bool,
    /// Multiplexer limits.
    #[serde(default)]
    pub limits: Limits,
}

/// `[daemon.announced]`: guests not in the config that connect to a shared listener and
/// announce a name.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AnnouncedConfig {
    /// Accept them at all (default false: only configured guests).
    pub allow: bool,
    /// The most at once; further names are refused.
    pub max: usize,
    /// Forgotten (session, status, name) this long after their last connection ended.
    pub forget_after_secs: u64,
}

impl Default for AnnouncedConfig {
    fn default() -> AnnouncedConfig {
        AnnouncedConfig {
            allow: false,
            max: 64,
            forget_after_secs: 600,
        }
    }
}

/// `[daemon.limits]`: bounds on what one guest can make the daemon buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Receive window per channel, bytes.
    pub channel_window: u32,
    /// Send buffer per channel, bytes.
    pub channel_send_buffer: usize,
    /// Largest receive window and send buffer a channel grows to while its window limits it,
    /// bytes (each growth counts against `peer_buffer_limit`); at most the two above: no growth.
    pub channel_window_max: u32,
    /// Largest frame payload accepted, bytes.
    pub max_frame: u32,
    /// Channels per guest.
    pub max_channels: usize,
    /// The most one guest can make the daemon hold, bytes: windows, send buffers,
    /// unacknowledged data, queued control frames, decoder and spare buffers, all included.
    pub peer_buffer_limit: usize,
    /// Unacknowledged bytes kept for retransmission per guest.
    pub max_unacked: usize,
    /// Keepalive probe interval, milliseconds.
    pub keepalive_interval_ms: u64,
    /// A link is declared dead after this much silence, milliseconds.
    pub keepalive_timeout_ms: u64,
    /// A guest's session (its channels and buffers) is forgotten after this long without a
    /// link, milliseconds.
    pub resume_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        let d = WireConfig::new(Role::Host, "");
        Limits {
            channel_window: d.channel_window,
            channel_send_buffer: d.channel_send_buffer,
            channel_window_max: d.channel_window_max,
            max_frame: d.max_frame,
            max_channels: d.max_channels,
            peer_buffer_limit: d.peer_buffer_limit,
            max_unacked: d.max_unacked,
            keepalive_interval_ms: d.keepalive_interval.as_millis() as u64,
            keepalive_timeout_ms: d.keepalive_timeout.as_millis() as u64,
            resume_timeout_ms: d.resume_timeout.as_millis() as u64,
        }
    }
}

impl Limits {
    /// The session configuration these limits describe.
    pub fn wire_config(&self, role: Role, name: &str) -> WireConfig {
        WireConfig {
            channel_window: self.channel_window,
            channel_send_buffer: self.channel_send_buffer,
            channel_window_max: self.channel_window_max,
            max_frame: self.max_frame,
            max_channels: self.max_channels,
            peer_buffer_limit: self.peer_buffer_limit,
            max_unacked: self.max_unacked,
            keepalive_interval: Duration::from_millis(self.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(self.keepalive_timeout_ms),
            resume_timeout: Duration::from_millis(self.resume_timeout_ms),
            ..WireConfig::new(role, name)
        }
    }

    /// Whether `peer_buffer_limit` leaves room for a few channels after its fixed parts.
    fn validate(&self) -> Result<(), NoRoomForChannels> {
        let cfg = self.wire_config(Role::Host, "");
        // One link, and room for the channels every guest has (console, agent, devices).
        let least = cfg.fixed_charge(1) + 16 * cfg.channel_charge();
        if self.peer_buffer_limit < least {
            return Err(NoRoomForChannels {
                limit: self.peer_buffer_limit,
                least,
            });
        }
        Ok(())
    }
}

/// `[daemon.limits]` whose `peer_buffer_limit` leaves no room for channels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "peer_buffer_limit = {limit} leaves no room for channels: with these windows, buffers and \
     max_unacked it must be at least {least}"
)]
pub struct NoRoomForChannels {
    /// The configured limit.
    pub limit: usize,
    /// The least that fits one link and a few channels.
    pub least: usize,
}

/// `[[guest]]`.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The guest's name (what its agent announces).
    pub name: String,
    /// The guest's QMP socket, for actions such as a watchdog reset.
    pub qmp: Option<Address>,
    /// The guest's AF_VSOCK context id: vsock connections from this CID are this guest, and
    /// from no other CID.
    pub cid: Option<u32>,
    /// Unix connections to a shared listener (and to the guest's own listening sockets) must
    /// come from this user (`SO_PEERCRED`).
    pub uid: Option<u32>,
    /// ... and/or this group.
    pub gid: Option<u32>,
    /// The guest's key for TCP: a file of at least 16 bytes (trailing white space is ignored),
    /// proven by both ends in a challenge-response, never sent (docs/PROTOCOL.md §9).
    pub key_file: Option<PathBuf>,
    /// Ways to reach the guest.
    pub transport: Vec<TransportConfig>,
    /// The devices' `[guest.CLASS]` sections, by class, as parsed (each device reads its own
    /// typed settings from its section; docs/devices/CLASS.md).
    pub devices: BTreeMap<String, serde_json::Value>,
}

/// The keys of `[[guest]]` that are not device sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestKeys {
    name: String,
    qmp: Option<Address>,
    cid: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    transport: Vec<TransportConfig>,
}

impl<'de> Deserialize<'de> for GuestConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GuestConfig, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let mut devices = BTreeMap::new();
        for dev in registry().iter() {
            let Some(section) = table.remove(dev.class()) else {
                continue;
            };
            let section = serde_json::to_value(section).map_err(D::Error::custom)?;
            dev.check(Some(&section), None).map_err(D::Error::custom)?;
            devices.insert(dev.class().to_owned(), section);
        }
        let keys = GuestKeys::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)?;
        Ok(GuestConfig {
            name: keys.name,
            qmp: keys.qmp,
            cid: keys.cid,
            uid: keys.uid,
            gid: keys.gid,
            key_file: keys.key_file,
            transport: keys.transport,
            devices,
        })
    }
}

/// What a transport carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportKind {
    /// The multiplexer (to vstream-agent).
    Mux,
    /// A raw stream owned by a device (`Device::raw_kinds`: a console, a real qemu-ga, an
    /// entropy port...).
    Raw(String),
}

impl<'de> Deserialize<'de> for TransportKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TransportKind, D::Error> {
        let kind = String::deserialize(d)?;
        if kind == "mux" {
            return Ok(TransportKind::Mux);
        }
        if registry().owner_of_kind(&kind).is_some() {
            return Ok(TransportKind::Raw(kind));
        }
        let known: Vec<&str> = std::iter::once("mux")
            .chain(
                registry()
                    .iter()
                    .flat_map(|d| d.raw_kinds().iter().copied()),
            )
            .collect();
        Err(serde::de::Error::custom(format!(
            "unknown transport kind {kind:?}, expected one of {}",
            known.join(", ")
        )))
    }
}

/// `[[guest.transport]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// What it carries.
    pub kind: TransportKind,
    /// Where.
    pub address: Address,
    /// Name (consoles: "hvc0", "ttyS0"; defaults to the address).
    pub name: Option<String>,
    /// The line behind the address is a serial line at this speed (tunes frame size and timers).
    pub baud: Option<u32>,
    /// Console log file (default `STATE_DIR/GUEST/NAME.log`).
    pub log: Option<PathBuf>,
    /// Console log size before rotation.
    #[serde(default = "default_log_max")]
    pub log_max_bytes: u64,
    /// Rotated console logs kept.
    #[serde(default = "default_log_keep")]
    pub log_keep: usize,
}

fn default_log_max() -> u64 {
    16 * 1024 * 1024
}

fn default_log_keep() -> usize {
    3
}

impl TransportConfig {
    /// Link parameters for a mux transport; `priority` is its position in the config.
    pub fn link_params(&self, priority: u32) -> LinkParams {
        link_params(&self.address, self.baud, priority)
    }

    /// Name shown in status.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.address.to_string())
    }
}

impl GuestConfig {
    /// The guest's key, read from `key_file`, if it has one.
    pub fn key(&self) -> std::io::Result<Option<vstream_wire::auth::Key>> {
        self.key_file
            .as_deref()
            .map(vstream_link::auth::read_key_file)
            .transpose()
    }

    /// The guest's transports of `device`'s raw kinds.
    pub fn raw_transports(&self, device: &dyn Device) -> Vec<RawTransport> {
        self.transport
            .iter()
            .filter(|t| matches!(&t.kind, TransportKind::Raw(k) if device.raw_kinds().contains(&k.as_str())))
            .map(|t| RawTransport {
                kind: match &t.kind {
                    TransportKind::Raw(k) => k.clone(),
                    TransportKind::Mux => "mux".into(),
                },
                name: t.display_name(),
                address: t.address.clone(),
                log: t.log.clone(),
                log_max_bytes: t.log_max_bytes,
                log_keep: t.log_keep,
            })
            .collect()
    }

    /// Checks that the guest's name fits in a HELLO.
    pub fn check_name(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > vstream_wire::hello::MAX_NAME {
            return Err(format!("guest name {:?} must be 1-64 bytes", self.name));
        }
        Ok(())
    }

    /// Checks the device sections against the rest of the guest's config.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for dev in registry().iter() {
            let facts = GuestFacts {
                has_qmp: self.qmp.is_some(),
                transports: self.raw_transports(dev.as_ref()),
            };
            dev.check(self.devices.get(dev.class()), Some(&facts))?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg.daemon
            .limits
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: [daemon.limits]: {e}", path.display()))?;
        let mut names = std::collections::HashSet::new();
        let mut cids = std::collections::HashSet::new();
        for g in &cfg.guest {
            if let Some(cid) = g.cid {
                if !cids.insert(cid) {
                    anyhow::bail!("{}: CID {cid} is given to two guests", path.display());
                }
            }
            if !names.insert(&g.name) {
                anyhow::bail!("{}: guest {:?} is defined twice", path.display(), g.name);
            }
            g.check_name()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            g.validate()
                .map_err(|e| anyhow::anyhow!("{}: guest {:?}: {e}", path.display(), g.name))?;
            g.key()
                .map_err(|e| anyhow::anyhow!("{}: guest {:?}: {e}", path.display(), g.name))?;
            for t in &g.transport {
                if let Address::VhostUserVsock(v) = &t.address {
                    // The device's CID is the guest's identity on it: one CID, one guest.
                    match g.cid {
                        Some(cid) if cid != v.cid => anyhow::bail!(
                            "{}: guest {:?} is CID {cid} but its transport {} gives CID {}",
                            path.display(),
                            g.name,
                            t.address,
                            v.cid
                        ),
                        None if !cids.insert(v.cid) => anyhow::bail!(
                            "{}: CID {} is given to two guests",
                            path.display(),
                            v.cid
                        ),
                        _ => {}
                    }
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `g`'s `[guest.CLASS]` as the device reads it.
    fn section<T: serde::de::DeserializeOwned>(g: &GuestConfig, class: &'static str) -> Option<T> {
        vstream_devices::registry::section(class, g.devices.get(class)).expect("a valid section")
    }

    fn raw(kind: &str) -> TransportKind {
        TransportKind::Raw(kind.into())
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../../docs/vstreamd.example.toml");
        let cfg: Config = toml::from_str(text).expect("example config");
        assert_eq!(cfg.guest[0].name, "lab");
        assert_eq!(cfg.guest[0].transport[0].kind, TransportKind::Mux);
        assert!(cfg.guest[0]
            .transport
            .iter()
            .any(|t| t.kind == raw("console")));
        assert_eq!(cfg.daemon.limits.channel_window, 256 * 1024);
    }

    #[test]
    fn the_ppp_section_parses_and_is_checked() {
        let text = include_str!("../../../docs/vstreamd.example.toml");
        let cfg: Config = toml::from_str(text).expect("example config");
        let ppp: vstream_devices::ppp::host::PppConfig =
            section(&cfg.guest[0], "ppp").expect("[guest.ppp] in the example");
        assert_eq!(ppp.remote.to_string(), "10.77.0.2");
        assert_eq!(ppp.routes.len(), 1);
        cfg.guest[0].validate().expect("the example is valid");
        let bad: Config = toml::from_str(
            "[[guest]]\nname = \"a\"\n[guest.ppp]\nlocal = \"10.0.0.1\"\nremote = \"10.0.0.2\"\nmtu = 64\n",
        )
        .expect("parses");
        let e = bad.guest[0].validate().expect_err("mtu 64");
        let e = e.to_string();
        assert!(e.contains("[guest.ppp]") && e.contains("mtu"), "{e}");
        assert!(toml::from_str::<Config>(
            "[[guest]]\nname = \"a\"\n[guest.ppp]\nlocal = \"10.0.0.1\"\n"
        )
        .is_err());
    }

    #[test]
    fn a_peer_buffer_limit_with_no_room_for_channels_is_refused() {
        let dir = std::env::temp_dir().join(format!("vstream-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vstreamd.toml");
        std::fs::write(&path, "[daemon.limits]\npeer_buffer_limit = 16777216\n").expect("write");
        let e = Config::load(&path).expect_err("16 MiB is less than max_unacked alone");
        assert!(e.to_string().contains("peer_buffer_limit"), "{e}");
        let example = include_str!("../../../docs/vstreamd.example.toml");
        let cfg: Config = toml::from_str(example).expect("example config");
        cfg.daemon
            .limits
            .validate()
            .expect("the example's limits fit");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_qga_transport_parses() {
        let cfg: Config = toml::from_str(
            "[[guest]]\nname = \"a\"\n[[guest.transport]]\nkind = \"qga\"\naddress = \"unix:/run/qga.sock\"\n",
        )
        .expect("qga transport");
        assert_eq!(cfg.guest[0].transport[0].kind, raw("qga"));
    }

    #[test]
    fn a_printer_section_parses() {
        let cfg: Config = toml::from_str(
            "[[guest]]\nname = \"a\"\n[guest.printer]\nspool = \"/var/spool/a\"\nquota_bytes = 1000\nhook = [\"/bin/echo\", \"x\"]\n",
        )
        .expect("printer");
        let p: vstream_devices::printer::device::PrinterConfig =
            section(&cfg.guest[0], "printer").expect("printer");
        assert_eq!(p.spool.as_deref(), Some(Path::new("/var/spool/a")));
        assert_eq!((p.quota_bytes, p.enabled, p.hook.len()), (1000, true, 2));
        assert!(
            toml::from_str::<Config>("[[guest]]\nname = \"a\"\n[guest.printer]\nquota = 1\n")
                .is_err()
        );
        let d: Config = toml::from_str("[[guest]]\nname = \"a\"\n").expect("default");
        let p: Option<vstream_devices::printer::device::PrinterConfig> =
            section(&d.guest[0], "printer");
        assert_eq!(p.unwrap_or_default().quota_bytes, 1 << 30);
    }

    #[test]
    fn device_sections_parse_and_are_checked() {
        let text = include_str!("../../../docs/vstreamd.example.toml");
        let cfg: Config = toml::from_str(text).expect("example config");
        let g = &cfg.guest[0];
        let r: vstream_devices::random::Settings = section(g, "random").expect("random");
        assert_eq!(r.rate, 65536);
        let w: vstream_devices::watchdog::Settings =
            section(g, "watchdog").expect("the example has a watchdog");
        assert_eq!(w.action, vstream_devices::watchdog::Action::Reset);
        assert!(g.validate().is_ok());
        assert!(g.transport.iter().any(|t| t.kind == raw("random-raw")));

        let no_qmp: Config = toml::from_str(
            "[[guest]]\nname = \"a\"\n[guest.watchdog]\ntimeout_ms = 1000\naction = \"reset\"\n",
        )
        .expect("parse");
        let e = no_qmp.guest[0].validate().expect_err("reset needs qmp");
        assert!(e.to_string().contains("qmp"), "{e}");
        let defaults: Config = toml::from_str("[[guest]]\nname = \"a\"\n").expect("parse");
        let w: Option<vstream_devices::watchdog::Settings> =
            section(&defaults.guest[0], "watchdog");
        assert!(w.is_none());
        let r: Option<vstream_devices::random::Settings> = section(&defaults.guest[0], "random");
        assert_eq!(
            r.unwrap_or_default(),
            vstream_devices::random::Settings::default()
        );
        assert!(
            toml::from_str::<Config>("[[guest]]\nname = \"a\"\n[guest.random]\nrat = 1\n").is_err()
        );
    }

    #[test]
    fn identity_settings_parse_and_are_checked() {
        let text = include_str!("../../../docs/vstreamd.example.toml");
        let cfg: Config = toml::from_str(text).expect("example config");
        assert_eq!((cfg.guest[0].cid, cfg.guest[0].uid), (Some(3), Some(0)));
        assert!(!cfg.daemon.announced.allow && !cfg.daemon.insecure_tcp);
        assert_eq!(cfg.daemon.announced.max, 64);
        let dir = tempfile::tempdir().expect("tempdir");
        let load = |text: &str| {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).expect("write");
            Config::load(&path)
        };
        let e = load("[[guest]]\nname = \"a\"\ncid = 3\n[[guest]]\nname = \"b\"\ncid = 3\n")
            .expect_err("one CID, two guests");
        assert!(e.to_string().contains("CID 3"), "{e}");
        std::fs::write(dir.path().join("short.key"), "short\n").expect("key");
        let e = load(&format!(
            "[[guest]]\nname = \"a\"\nkey_file = \"{}\"\n",
            dir.path().join("short.key").display()
        ))
        .expect_err("short key");
        assert!(e.to_string().contains("at least 16 bytes"), "{e}");
    }

    #[test]
    fn a_vhost_user_vsock_transport_must_carry_the_guests_cid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = |text: &str| {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).expect("write");
            Config::load(&path)
        };
        let guest = |cid: &str, address_cid: u32| {
            format!(
                "[[guest]]\nname = \"a\"\n{cid}[[guest.transport]]\nkind = \"mux\"\n\
                 address = \"vhost-user-vsock:/run/a.sock,cid={address_cid},port=5000\"\n"
            )
        };
        load(&guest("cid = 3\n", 3)).expect("the same CID");
        load(&guest("", 3)).expect("the guest's CID from its device");
        let e = load(&guest("cid = 3\n", 4)).expect_err("another CID");
        assert!(e.to_string().contains("gives CID 4"), "{e}");
        let two = format!("{}\n[[guest]]\nname = \"b\"\ncid = 3\n", guest("", 3));
        let e = load(&two).expect_err("two guests, one CID");
        assert!(e.to_string().contains("CID 3"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[[guest]]\nname = \"a\"\nbogus = 1\n").is_err());
    }
}
