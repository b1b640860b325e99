//! The diag device's descriptor: an echo service on both halves.

use std::sync::Arc;

use vstream_link::Mux;

use super::Echo;
use crate::registry::{Device, GuestHalf, GuestOptions, HostContext, HostHalf, SettingsError};

/// `diag`.
pub struct Diag;

impl Device for Diag {
    fn class(&self) -> &'static str {
        "diag"
    }

    fn host(&self, _ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        Ok(HostHalf::services(vec![Arc::new(Echo)]))
    }

    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(Echo)],
            ..GuestHalf::default()
        }
    }
}
