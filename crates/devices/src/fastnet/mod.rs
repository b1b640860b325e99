//! Device: fastnet. A guest network whose packets cross a shared memory segment, with the
//! session's stream as the control path and the interrupt line (issue 10).
//!
//! - [`ring`]: the segment's layout and its two single-producer/single-consumer packet rings
//!   (host-to-guest and guest-to-host), sans-io and safe against a hostile peer.
//!
//! See docs/devices/fastnet.md for the layout, the ordering rules and the doorbell protocol.

pub mod ring;
#[cfg(test)]
mod tests;

/// The device class.
pub const CLASS: &str = "fastnet";
