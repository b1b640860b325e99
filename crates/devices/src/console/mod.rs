//! Device: console. The host half captures a guest's raw console stream (the chardev of a
//! virtconsole/hvc0 or of a 16550 ttyS0) into a rotated log and an in-memory tail, and lets
//! viewers attach: every viewer sees the output, one at a time may type. A new viewer's history
//! is the end of the log, so it outlives vstreamd.
//!
//! A live upgrade of vstreamd carries the capture's connection: [`Console::freeze`] stops the
//! capture between two reads (every byte read is then in the log, the tail and the viewers'
//! queues) and gives a duplicate of the connection's descriptor, which the successor adopts
//! with [`Console::start`] and a [`Carried`]: no reconnection, no byte lost, no marker in the log.
//!
//! The guest half is the guest kernel's own console driver: nothing of ours runs in the guest,
//! so a console works even when the agent does not.

#[cfg(feature = "host")]
mod capture;
pub mod device;
#[cfg(feature = "host")]
mod history;
#[cfg(feature = "host")]
mod host;
#[cfg(feature = "host")]
mod log;
#[cfg(test)]
mod tests;
#[cfg(feature = "host")]
pub mod verbs;

#[cfg(feature = "host")]
pub use self::host::{
    Carried, Console, ConsoleSettings, ConsoleStatus, Frozen, History, Position, Role, Viewer,
};
#[cfg(feature = "host")]
pub use self::log::RotatingLog;
