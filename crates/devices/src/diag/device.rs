//! The diag device's descriptor: an echo service on both halves.

use std::sync::Arc;

#[cfg(feature = "guest")]
use vstream_link::Mux;

use super::Echo;
use crate::registry::Device;
#[cfg(feature = "guest")]
use crate::registry::{GuestHalf, GuestOptions};
#[cfg(feature = "host")]
use crate::registry::{HostContext, HostHalf, SettingsError};

/// `diag`.
pub struct Diag;

impl Device for Diag {
    fn class(&self) -> &'static str {
        "diag"
    }

    #[cfg(feature = "host")]
    fn host(&self, _ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        Ok(HostHalf::services(vec![Arc::new(Echo)]))
    }

    #[cfg(feature = "guest")]
    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(Echo)],
            ..GuestHalf::default()
        }
    }
}
