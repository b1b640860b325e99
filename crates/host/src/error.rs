//! vstreamd's errors.

use vstream_devices::registry::SettingsError;

/// Why a configured guest could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A device's host half refused to start (its settings, its spool, its log file).
    #[error("guest {guest}: {error}")]
    Device {
        /// The guest.
        guest: String,
        /// What the device said.
        error: SettingsError,
    },
    /// The guest's key file.
    #[error("guest {guest}: {error}")]
    Key {
        /// The guest.
        guest: String,
        /// What is wrong with it.
        error: std::io::Error,
    },
}
