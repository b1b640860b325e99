//! The tty device's descriptor: the guest half's terminal sessions; `shell-opened` and
//! `shell-closed` events when vstreamd opens one; the web console's shell.

#[cfg(feature = "guest")]
use std::sync::Arc;

#[cfg(feature = "guest")]
use vstream_link::Mux;

use super::CLASS;
use crate::registry::Device;
#[cfg(feature = "guest")]
use crate::registry::{GuestHalf, GuestOptions};

/// `tty`.
pub struct TtyDevice;

impl Device for TtyDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    #[cfg(feature = "host")]
    crate::registry::verbs_in!(super::verbs);

    // A terminal session is an event users watch for.
    #[cfg(feature = "host")]
    fn channel_events(&self) -> (&'static str, &'static str) {
        ("shell-opened", "shell-closed")
    }

    // The web console's shell.
    #[cfg(feature = "host")]
    fn terminal(&self) -> Option<crate::registry::TerminalFn> {
        Some(super::host::page_shell)
    }

    #[cfg(feature = "guest")]
    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(super::guest::Tty)],
            ..GuestHalf::default()
        }
    }
}
