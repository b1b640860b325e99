//! vstreamd (host daemon) and vstreamctl (its command line): the host halves of the devices,
//! the guests' sessions, and the control socket between the two programs.
#![deny(missing_docs)]

pub mod access;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod identity;
pub mod libvirt;
pub mod metrics;
pub mod status;
pub mod systemd;
pub mod upgrade;
pub mod web;

/// Default control socket path (also from `VSTREAM_CONTROL`).
pub const DEFAULT_CONTROL: &str = "/run/vstream/control.sock";
