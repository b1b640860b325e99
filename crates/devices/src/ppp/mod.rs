//! Device: ppp. A slow-path IPv4 network between a guest and its host, made of nothing but a
//! byte stream: PPP (RFC 1661) in async HDLC-like framing (RFC 1662), as `pppd` speaks it on a
//! serial line.
//!
//! - The guest half ([`guest`], run by vstream-agent) runs Debian's `pppd` on a pseudo-terminal
//!   and bridges the terminal to a channel of class `ppp` (name `""`) that it opens as soon as the
//!   session is up, and again whenever the link ends (pppd exited, the host restarted, the agent
//!   restarted). Or, with `vstream.ppp=port:NAME`, to a named virtio-serial port.
//! - The host half ([`host`], run by vstreamd) accepts that channel if the guest has a
//!   `[guest.ppp]` section in vstreamd's config (and refuses it with that reason otherwise),
//!   and terminates the link with the addresses, MTU, routes and network namespace configured
//!   there: with `pppd` on a pseudo-terminal ([`pppd`], backend `pppd`, the default), or in
//!   userspace with a TUN device ([`proto`], [`net`] and [`crate::tun`], backend `tun`) where the host kernel has
//!   no PPP driver.
//!
//! The channel carries the PPP byte stream unchanged: no framing of ours, no handshake. pppd on
//! each side negotiates the link (LCP), the addresses (IPCP: the host side assigns the guest's)
//! and the MTU (the host's MRU; the guest accepts up to [`GUEST_MRU`]). See docs/devices/ppp.md.

#[cfg(feature = "host")]
pub mod config;
pub mod device;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(feature = "host")]
mod hdlc;
#[cfg(feature = "host")]
pub mod host;
#[cfg(feature = "host")]
pub mod net;
#[cfg(feature = "host")]
mod packet;
pub mod pppd;
#[cfg(feature = "host")]
pub mod proto;
#[cfg(test)]
mod tests;

use std::time::Duration;

use vstream_transport::Backoff;

/// The device class.
pub const CLASS: &str = "ppp";

/// The channel name the agent opens.
pub const CHANNEL_NAME: &str = "";

/// The MRU and MTU ceiling the guest's pppd offers (pppd's maximum): the host's configured MTU
/// then decides both directions.
pub const GUEST_MRU: u16 = 16384;

/// Options both pppd ends get: a pty is an 8-bit clean line without modem control lines, so no
/// escaping of control characters, no carrier detection, no hardware flow control; no
/// compression negotiation (the kernel modules are usually absent and the link is not the
/// bottleneck); no authentication (the channel already belongs to this guest).
pub const COMMON_PPPD_OPTIONS: &[&str] = &[
    "nodetach",
    "noauth",
    "local",
    "nocrtscts",
    "asyncmap",
    "0",
    "noccp",
];

/// Backoff between links: 1 s after a link that lasted, doubling up to 60 s after links that
/// fail at once (a pppd that cannot start, a peer that answers nothing).
pub fn link_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
}

/// The pause after a link that lasted `lasted`: a link of 30 s or more starts the backoff over.
pub fn next_pause(backoff: &mut Backoff, lasted: Duration) -> Duration {
    if lasted >= Duration::from_secs(30) {
        backoff.reset();
    }
    backoff.next_pause()
}
