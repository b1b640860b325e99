//! The files device's descriptor: the `files` service in the agent, `vstreamctl cp` on the host.

#[cfg(feature = "guest")]
use {
    crate::registry::{GuestHalf, GuestOptions},
    std::sync::Arc,
    vstream_link::Mux,
};

use super::CLASS;
use crate::registry::Device;

/// `files`.
pub struct FilesDevice;

impl Device for FilesDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    #[cfg(feature = "guest")]
    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(super::guest::FilesService)],
            ..GuestHalf::default()
        }
    }

    #[cfg(feature = "host")]
    crate::registry::verbs_in!(super::verbs);
}
