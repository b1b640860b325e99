//! The vstream devices. Each device is one folder with its messages, its host half (run by
//! vstreamd) and its guest half (run by vstream-agent); see docs/devices/.
//!
//! Devices reached through the multiplexer implement [`Service`]: a peer opens a channel of the
//! device's class and the service gets the channel's byte stream. Adding a device means adding
//! its folder and one line in [`guest_services`] or [`host_services`].
#![deny(missing_docs)]

pub mod console;
pub mod diag;
pub mod hid;
pub mod printer;
pub mod qga;
pub mod tty;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use vstream_link::{ChannelStream, Incoming};

/// What a service runs per channel.
pub type ServeFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One half of a device, serving the channels of its class that the peer opens.
pub trait Service: Send + Sync {
    /// The device class (the channel class the peer opens).
    fn class(&self) -> &'static str;
    /// Serves one channel named `name` until it ends.
    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture;
}

/// The guest halves run by vstream-agent.
pub fn guest_services() -> Vec<Arc<dyn Service>> {
    vec![
        Arc::new(diag::Echo),
        Arc::new(hid::guest::Hid::uinput()),
        Arc::new(tty::guest::Tty),
        Arc::new(qga::QgaService::global()),
    ]
}

/// The host halves run by vstreamd for channels a guest opens.
pub fn host_services() -> Vec<Arc<dyn Service>> {
    vec![Arc::new(diag::Echo)]
}

/// Hands each incoming channel to the service of its class; channels of unknown classes are
/// reset with a clear reason. Runs until the session is dropped.
pub async fn dispatch(
    services: Vec<Arc<dyn Service>>,
    mut incoming: mpsc::UnboundedReceiver<Incoming>,
) {
    while let Some(inc) = incoming.recv().await {
        match services.iter().find(|s| s.class() == inc.class) {
            Some(s) => {
                tracing::debug!(class = %inc.class, name = %inc.name, "channel opened");
                tokio::spawn(s.serve(inc.name, inc.stream));
            }
            None => {
                tracing::warn!(class = %inc.class, name = %inc.name, "no service for this class");
                inc.stream
                    .reset(&format!("no service for device class {:?}", inc.class));
            }
        }
    }
}
