//! The fastnet device's descriptor: `[guest.fastnet]` (the host TAP, the guest's address and
//! MTU, the mode), the host half serving the guest's `fastnet` channel, the guest half's link
//! (`--fastnet IFNAME`, `vstream.fastnet=IFNAME`).

use super::link::Stats;
use super::{CHANNEL_NAME, CLASS};
use crate::registry::{Device, SettingsError};
use crate::ServeFuture;

#[cfg(feature = "host")]
use {
    super::ring::{Layout, Memory, Segment},
    super::switch::{parse_mac, Limits, LimitsConfig, Mac, PortConfig, PortCounters},
    super::{Setup, MAX_PACKET, PROTOCOL_VERSION},
    crate::registry::{section, GuestFacts, HostContext, HostHalf, HostState},
    crate::status::DeviceStatus,
    crate::tun::netns_path,
    crate::Service,
    serde::Deserialize,
    serde_json::Value,
    std::path::PathBuf,
    std::sync::Arc,
    vstream_link::ChannelStream,
};
#[cfg(feature = "guest")]
use {
    crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions},
    vstream_link::Mux,
};

/// `fastnet`.
pub struct FastnetDevice;

/// The agent's wait before it sets up a link again after one ended; doubled, up to
/// [`RESTART_MAX`], while the links end before they come up.
#[cfg(feature = "guest")]
const RESTART_MIN: std::time::Duration = std::time::Duration::from_millis(500);
#[cfg(feature = "guest")]
const RESTART_MAX: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(feature = "host")]
/// How a link carries its packets (`mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeSetting {
    /// Shared memory when the guest has the segment, else the channel.
    #[default]
    Auto,
    /// Always on the channel.
    Channel,
    /// Shared memory only.
    Shm,
}

#[cfg(feature = "host")]
/// `[guest.fastnet]`: the guest's network link (absent: none).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastnetConfig {
    /// The host's TAP interface (created, or attached if it exists as a persistent TAP with
    /// vnet headers, e.g. `ip tuntap add dev NAME mode tap vnet_hdr`, already addressed).
    /// With `switch`: the TAP is a port of the switch while this guest's link is up.
    #[serde(default)]
    pub tap: Option<String>,
    /// The built-in switch the link joins (any name; the guests that name the same switch
    /// share it).
    #[serde(default)]
    pub switch: Option<String>,
    /// On a switch: forward frames whose source MAC is not `guest_mac` (dropped and counted
    /// otherwise).
    #[serde(default)]
    pub allow_mac_spoofing: bool,
    /// On a switch: its bounds (`[guest.fastnet.switch_limits]`; defaults for those left out).
    #[serde(default)]
    pub switch_limits: Option<LimitsConfig>,
    /// The network namespace of the TAP (a name under /run/netns or a path); vstreamd's own if
    /// absent.
    #[serde(default)]
    pub netns: Option<String>,
    /// The guest interface's IPv4 address and prefix, e.g. `10.0.0.2/24`.
    #[serde(default)]
    pub guest_address: Option<String>,
    /// The guest interface's MAC address.
    #[serde(default = "default_mac")]
    pub guest_mac: String,
    /// MTU of both interfaces.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// `auto`, `channel` or `shm`.
    #[serde(default)]
    pub mode: ModeSetting,
    /// The shared segment's file in /dev/shm (an `ivshmem-plain` device's
    /// `memory-backend-file`): created, or mapped if the VMM created it first.
    #[serde(default)]
    pub segment: Option<PathBuf>,
    /// The segment's size in bytes: a power of two, at least 1 MiB (the VMM's `size=`).
    #[serde(default = "default_segment_size")]
    pub segment_size: u64,
    /// Shared memory: for this many microseconds after traffic, vstreamd looks at the rings
    /// every 100 us instead of asking the guest for a doorbell (0, the default: never). Fewer
    /// doorbells cost the guest's vCPU less, the timer costs vstreamd's CPU more.
    #[serde(default)]
    pub poll_us: u64,
}

#[cfg(feature = "host")]
fn default_segment_size() -> u64 {
    4 << 20
}

#[cfg(feature = "host")]
fn default_mac() -> String {
    // Locally administered, unicast.
    "02:76:73:00:00:02".into()
}

#[cfg(feature = "host")]
fn default_mtu() -> u16 {
    1500
}

#[cfg(feature = "host")]
impl FastnetConfig {
    /// `guest_mac`: a unicast address.
    fn mac(&self) -> Result<Mac, SettingsError> {
        parse_mac(&self.guest_mac)
            .filter(|m| m[0] & 1 == 0)
            .ok_or_else(|| {
                SettingsError::new(
                    CLASS,
                    format!(
                        "guest_mac {:?}: a unicast xx:xx:xx:xx:xx:xx",
                        self.guest_mac
                    ),
                )
            })
    }

    /// The switch's bounds: `switch_limits`, only with a switch.
    pub(crate) fn limits(&self) -> Result<Limits, SettingsError> {
        match (&self.switch_limits, &self.switch) {
            (None, _) => Ok(Limits::default()),
            (Some(_), None) => Err(SettingsError::new(
                CLASS,
                "switch_limits is for a switch port",
            )),
            (Some(l), Some(_)) => l.limits().map_err(|e| SettingsError::new(CLASS, e)),
        }
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if self.tap.is_none() && self.switch.is_none() {
            return Err(SettingsError::new(
                CLASS,
                "one of tap = \"IFNAME\" (a host TAP) or switch = \"NAME\" (the built-in switch)",
            ));
        }
        if let Some(tap) = &self.tap {
            crate::tun::ifreq(tap).map_err(|e| SettingsError::new(CLASS, format!("tap: {e}")))?;
        } else if self.netns.is_some() {
            return Err(SettingsError::new(CLASS, "netns is for a tap"));
        }
        if let Some(name) = &self.switch {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(SettingsError::new(
                    CLASS,
                    "switch: a name of 1 to 64 characters",
                ));
            }
        }
        self.limits()?;
        if self.allow_mac_spoofing && self.switch.is_none() {
            return Err(SettingsError::new(
                CLASS,
                "allow_mac_spoofing is for a switch port",
            ));
        }
        self.mac()?;
        if !(68..=65535 - 14).contains(&self.mtu) {
            return Err(SettingsError::new(CLASS, "mtu: 68 to 65521"));
        }
        match (self.mode, &self.segment) {
            (ModeSetting::Shm, None) => return Err(SettingsError::new(
                CLASS,
                "mode = \"shm\" needs segment = \"/dev/shm/FILE\" (the VMM's memory-backend-file)",
            )),
            (ModeSetting::Channel, Some(_)) => return Err(SettingsError::new(
                CLASS,
                "segment is unused with mode = \"channel\": remove it or use \"auto\" or \"shm\"",
            )),
            _ => {}
        }
        // ivshmem BARs are powers of two; the rings must hold the largest packet.
        if !self.segment_size.is_power_of_two()
            || Layout::for_segment(self.segment_size, MAX_PACKET).is_err()
        {
            return Err(SettingsError::new(
                CLASS,
                format!(
                    "segment_size {}: a power of two of at least 1 MiB (1048576)",
                    self.segment_size
                ),
            ));
        }
        Ok(())
    }
}

/// The agent's interface name for the link (`None`: no link).
#[derive(Debug, Clone)]
pub struct Interface(pub Option<String>);

impl Device for FastnetDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    crate::registry::status_type!(super::link::FastnetStatus);

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, _guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        match section::<FastnetConfig>(CLASS, s)? {
            Some(c) => c.validate(),
            None => Ok(()),
        }
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let Some(config) = section::<FastnetConfig>(CLASS, ctx.section.as_ref())? else {
            return Ok(HostHalf::services(Vec::new()));
        };
        config.validate()?;
        let state = Arc::new(LinkState::default());
        Ok(HostHalf {
            state: state.clone(),
            ..HostHalf::services(vec![Arc::new(FastnetService {
                guest: ctx.guest.clone(),
                config,
                state,
            })])
        })
    }

    #[cfg(feature = "guest")]
    fn agent_args(&self) -> Vec<clap::Arg> {
        vec![clap::Arg::new("fastnet")
            .long("fastnet")
            .value_name("IFNAME")
            .help("Open the host's fastnet link as TAP interface IFNAME (default: vstream.fastnet=IFNAME on the kernel command line, else no link)")]
    }

    #[cfg(feature = "guest")]
    fn agent_options(
        &self,
        args: &AgentArgs<'_>,
        options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        let name = match args.matches.get_one::<String>("fastnet") {
            Some(n) => Some(n.clone()),
            None => cmdline_values(args.cmdline, "fastnet")
                .last()
                .filter(|v| *v != "off")
                .map(str::to_owned),
        };
        if let Some(n) = &name {
            crate::tun::ifreq(n).map_err(|e| {
                SettingsError::new(CLASS, format!("--fastnet / vstream.fastnet=: {e}"))
            })?;
        }
        options.set(CLASS, Interface(name));
        Ok(())
    }

    #[cfg(feature = "guest")]
    fn guest(&self, mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let Some(Interface(Some(ifname))) = options.get::<Interface>(CLASS).cloned() else {
            return GuestHalf::default();
        };
        let mux = mux.clone();
        let task: ServeFuture = Box::pin(async move {
            let devices = std::path::Path::new(super::guest::SYSFS_PCI_DEVICES);
            let mut delay = RESTART_MIN;
            // A link that ends (a reset by either side) is set up again on a new channel: the
            // host writes a fresh header and zeroed indexes before its new `Setup`.
            loop {
                let chan = match mux.open(CLASS, CHANNEL_NAME).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("fastnet: the host refused the link: {e}");
                        return;
                    }
                };
                let stats = Stats::default();
                if let Err(e) = super::guest::run(chan, &ifname, devices, &stats).await {
                    tracing::warn!(%ifname, ?stats, "fastnet: link ended: {e}; again in {delay:?}");
                }
                tokio::time::sleep(delay).await;
                // A link that never came up (no TAP, a refused setup) backs off further.
                let came_up = stats.ready.lock().is_ok_and(|r| r.is_some());
                delay = if came_up {
                    RESTART_MIN
                } else {
                    (delay * 2).min(RESTART_MAX)
                };
            }
        });
        GuestHalf {
            tasks: vec![task],
            ..GuestHalf::default()
        }
    }
}

#[cfg(feature = "host")]
/// Serves the guest's link: one at a time, on the configured TAP.
struct FastnetService {
    guest: String,
    config: FastnetConfig,
    state: Arc<LinkState>,
}

#[cfg(feature = "host")]
/// The guest's current (or last) link, for `vstreamctl status`.
#[derive(Default)]
struct LinkState {
    link: std::sync::Mutex<Option<Arc<Stats>>>,
    /// Held while a link runs: a new link (the guest's agent sets one up after a reset)
    /// initialises the segment only once the last one stopped using it.
    running: tokio::sync::Mutex<()>,
    /// Links that ended, and why the last one did.
    resets: std::sync::atomic::AtomicU64,
    last_reset: std::sync::Mutex<Option<String>>,
    /// The link's switch and its port's counters, if it is on a switch.
    switch: std::sync::Mutex<Option<(String, Arc<PortCounters>)>>,
}

#[cfg(feature = "host")]
impl HostState for LinkState {
    fn status(&self) -> Option<DeviceStatus> {
        let link = self.link.lock().ok()?.clone()?;
        let mut status = link.snapshot();
        status.resets = self.resets.load(std::sync::atomic::Ordering::Relaxed);
        status.last_reset = self.last_reset.lock().ok()?.clone();
        if let Some((name, counters)) = self.switch.lock().ok()?.as_ref() {
            status.switch = Some(counters.snapshot(name));
        }
        Some(DeviceStatus::new(status))
    }
}

#[cfg(feature = "host")]
impl FastnetService {
    /// The segment to offer: none in channel mode; in auto mode none if it cannot be mapped
    /// (logged; the link runs on the channel), in shm mode that is the link's error.
    fn segment(&self) -> Result<Option<Arc<Segment>>, String> {
        let c = &self.config;
        let Some(path) = c
            .segment
            .as_ref()
            .filter(|_| c.mode != ModeSetting::Channel)
        else {
            return Ok(None);
        };
        match Segment::create_file(path, c.segment_size) {
            Ok(seg) => Ok(Some(Arc::new(seg))),
            Err(e) if c.mode == ModeSetting::Shm => Err(format!(
                "the host cannot map its segment {}: {e}",
                path.display()
            )),
            Err(e) => {
                tracing::warn!(guest = %self.guest, "fastnet: segment {}: {e}; offering none", path.display());
                Ok(None)
            }
        }
    }
}

#[cfg(feature = "host")]
impl Service for FastnetService {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        if name != CHANNEL_NAME {
            stream.reset(&format!("fastnet has no {name:?} (only {CHANNEL_NAME:?})"));
            return Box::pin(async {});
        }
        let (guest, c) = (self.guest.clone(), self.config.clone());
        let segment = match self.segment() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%guest, "fastnet: {e}");
                stream.reset(&e);
                return Box::pin(async {});
            }
        };
        let state = self.state.clone();
        Box::pin(async move {
            let _one_link = state.running.lock().await;
            let stats = Arc::new(Stats::default());
            if let Ok(mut link) = state.link.lock() {
                *link = Some(stats.clone());
            }
            let setup = Setup {
                version: PROTOCOL_VERSION,
                segment_size: segment.as_ref().map_or(0, |s| s.size() as u64),
                mtu: c.mtu,
                guest_mac: c.guest_mac.clone(),
                host_mac: String::new(),
                guest_address: c.guest_address.clone(),
                vnet_hdr: true,
            };
            let shm_only = c.mode == ModeSetting::Shm;
            let poll_for = std::time::Duration::from_micros(c.poll_us);
            let (r, on) = match (&c.switch, &c.tap) {
                (Some(name), _) => {
                    // Checked by `validate` when the config was read.
                    let limits = c.limits().unwrap_or_default();
                    let port = super::switch::join(
                        name,
                        limits,
                        PortConfig {
                            mac: c.mac().ok(),
                            allow_mac_spoofing: c.allow_mac_spoofing,
                        },
                    );
                    let port = match port {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(%guest, "fastnet: {e}");
                            stream.reset(&e.to_string());
                            return;
                        }
                    };
                    if let Ok(mut sw) = state.switch.lock() {
                        *sw = Some((name.clone(), port.counters()));
                    }
                    let link =
                        super::host::run(stream, &port, setup, segment, shm_only, &stats, poll_for);
                    let r = match &c.tap {
                        // The host's TAP is on the switch while this guest's link is up.
                        Some(tap_name) => {
                            let ns = c.netns.as_deref().map(netns_path);
                            match super::tap::create(ns.as_deref(), tap_name) {
                                Ok(tap) => tokio::select! {
                                    r = link => r,
                                    e = super::switch::bridge_tap(name, limits, &tap) => Err(e.into()),
                                },
                                Err(e) => {
                                    tracing::warn!(%guest, "fastnet: TAP {tap_name}: {e}; switch {name} without it");
                                    link.await
                                }
                            }
                        }
                        None => link.await,
                    };
                    (r, format!("switch {name}"))
                }
                (None, Some(tap_name)) => {
                    let ns = c.netns.as_deref().map(netns_path);
                    let tap = match super::tap::create(ns.as_deref(), tap_name) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!(%guest, "fastnet: TAP {tap_name}: {e}");
                            stream.reset(&format!("the host cannot open its TAP: {e}"));
                            return;
                        }
                    };
                    let r =
                        super::host::run(stream, &tap, setup, segment, shm_only, &stats, poll_for)
                            .await;
                    (r, format!("TAP {tap_name}"))
                }
                (None, None) => return,
            };
            match r {
                Ok(()) => {
                    tracing::info!(%guest, %on, stats = ?stats.snapshot(), "fastnet: link ended")
                }
                Err(e) => {
                    tracing::warn!(%guest, %on, stats = ?stats.snapshot(), "fastnet: link reset: {e}");
                    state
                        .resets
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut last) = state.last_reset.lock() {
                        *last = Some(e.to_string());
                    }
                }
            }
        })
    }
}
