//! Device: upper, the worked example of docs/ARCHITECTURE.md. Both halves serve channels of
//! class `upper`: what the opener sends comes back upper-cased. `[guest.upper]` sets the most
//! bytes one channel to the host may carry (the channel is reset past it); the host half's
//! status shows the limit and how many channels it served.
//!
//! A real device would be a folder in crates/devices/src with this file as its `device.rs`
//! and one line in `Registry::builtin`; here a test adds it with `Registry::with`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_devices::registry::{
    section, Device, GuestFacts, GuestHalf, GuestOptions, HostContext, HostHalf, HostState,
    SettingsError,
};
use vstream_devices::status::DeviceStatus;
use vstream_devices::{ServeFuture, Service};
use vstream_link::{ChannelStream, Mux};

/// The class.
pub const CLASS: &str = "upper";

/// `[guest.upper]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The most bytes one channel to the host carries (default 4096); past it the channel is
    /// reset.
    pub max_bytes: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { max_bytes: 4096 }
    }
}

fn settings(s: Option<&Value>) -> Result<Settings, SettingsError> {
    let s: Settings = section(CLASS, s)?.unwrap_or_default();
    if s.max_bytes == 0 {
        return Err(SettingsError::new(CLASS, "max_bytes must be at least 1"));
    }
    Ok(s)
}

/// The descriptor.
pub struct Upper;

impl Device for Upper {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn read_status(&self, json: Value) -> serde_json::Result<DeviceStatus> {
        DeviceStatus::read::<UpperStatus>(json)
    }

    fn check(&self, s: Option<&Value>, _guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        settings(s).map(drop)
    }

    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let s = settings(ctx.section.as_ref())?;
        let service = Arc::new(UpperService {
            max_bytes: s.max_bytes,
            served: AtomicU64::new(0),
        });
        Ok(HostHalf {
            services: vec![service.clone()],
            tasks: Vec::new(),
            state: service,
        })
    }

    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf {
            services: vec![Arc::new(UpperService {
                max_bytes: u64::MAX,
                served: AtomicU64::new(0),
            })],
            ..GuestHalf::default()
        }
    }
}

/// Both halves' service: upper-cases each channel's bytes back to the opener, at most
/// `max_bytes` of them.
struct UpperService {
    max_bytes: u64,
    served: AtomicU64,
}

/// The host half's status (`devices.upper` in `vstreamctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpperStatus {
    /// The limit.
    pub max_bytes: u64,
    /// Channels served.
    pub channels: u64,
}

impl HostState for UpperService {
    fn status(&self) -> Option<DeviceStatus> {
        Some(DeviceStatus::new(UpperStatus {
            max_bytes: self.max_bytes,
            channels: self.served.load(Ordering::Relaxed),
        }))
    }
}

impl Service for UpperService {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, _name: String, mut stream: ChannelStream) -> ServeFuture {
        self.served.fetch_add(1, Ordering::Relaxed);
        let mut left = self.max_bytes;
        Box::pin(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                // The peer is untrusted: a bounded amount per channel, then a reset.
                if n as u64 > left {
                    stream.reset("upper: more than max_bytes on one channel");
                    return;
                }
                left -= n as u64;
                buf[..n].make_ascii_uppercase();
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = stream.shutdown().await;
        })
    }
}
