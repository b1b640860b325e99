//! The watchdog device's descriptor: `[guest.watchdog]` (without it the guest's watchdog is
//! refused), the host half's watchdog service, the guest half's heartbeats.

use std::sync::Arc;

use super::CLASS;
use crate::registry::{Device, SettingsError};

#[cfg(feature = "guest")]
use {
    super::guest::{GuestSettings, Heartbeat},
    super::{parse_duration, WatchdogError},
    crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions},
    std::sync::Mutex,
    std::time::Duration,
    vstream_link::Mux,
};
#[cfg(feature = "host")]
use {
    super::host::WatchdogService,
    super::Settings,
    crate::registry::{section, valid_section, GuestFacts, HostContext, HostHalf},
    serde_json::Value,
};

/// `watchdog`.
pub struct WatchdogDevice;

#[cfg(feature = "host")]
fn settings(s: Option<&Value>, guest: &GuestFacts) -> Result<Option<Settings>, SettingsError> {
    valid_section(CLASS, s, |s: &Settings| s.validate(guest.has_qmp))
}

impl Device for WatchdogDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    crate::registry::status_type!(super::host::WatchdogStatus);

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        match guest {
            None => section::<Settings>(CLASS, s).map(drop),
            Some(g) => settings(s, g).map(drop),
        }
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let facts = GuestFacts {
            has_qmp: ctx.qmp.is_some(),
            ..GuestFacts::default()
        };
        let s = settings(ctx.section.as_ref(), &facts)?;
        Ok(HostHalf::services(vec![Arc::new(WatchdogService::new(
            ctx, s,
        ))]))
    }

    #[cfg(feature = "guest")]
    fn agent_args(&self) -> Vec<clap::Arg> {
        vec![
            clap::Arg::new("watchdog-interval")
                .value_name("WATCHDOG_INTERVAL")
                .long("watchdog-interval")
                .value_parser(parse_interval)
                .help("Send watchdog heartbeats this often, e.g. 500ms, 2s (also `vstream.watchdog=`)"),
            clap::Arg::new("watchdog-check")
                .value_name("WATCHDOG_CHECK")
                .long("watchdog-check")
                .requires("watchdog-interval")
                .help("Health check run by `sh -c` before each heartbeat: no heartbeat unless it exits 0 within the interval"),
        ]
    }

    #[cfg(feature = "guest")]
    fn agent_options(
        &self,
        args: &AgentArgs<'_>,
        options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        let mut interval = args
            .matches
            .get_one::<Duration>("watchdog-interval")
            .copied();
        if args.from_kernel && interval.is_none() {
            if let Some(w) = cmdline_values(args.cmdline, "watchdog").last() {
                interval = Some(parse_interval(w).map_err(|e| {
                    SettingsError::new(CLASS, format!("vstream.watchdog={w}: {e}"))
                })?);
            }
        }
        if let Some(interval) = interval {
            let check = args.matches.get_one::<String>("watchdog-check").cloned();
            options.set(CLASS, GuestSettings { interval, check });
        }
        Ok(())
    }

    #[cfg(feature = "guest")]
    fn guest(&self, mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let Some(w) = options.get::<GuestSettings>(CLASS) else {
            return GuestHalf::default();
        };
        tracing::info!(interval_ms = w.interval.as_millis() as u64, check = ?w.check, "watchdog heartbeats on");
        let heartbeat = Arc::new(Mutex::new(Some(Heartbeat::start(mux.clone(), w.clone()))));
        GuestHalf {
            // A clean stop disarms the watchdog (waiting for the host to confirm, a few seconds
            // at most); dropping the agent instead stops without one, as a crash would.
            on_stop: Some(Box::new(move |reason: String| {
                Box::pin(async move {
                    let h = heartbeat.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(h) = h {
                        h.disarm(&reason).await;
                    }
                })
            })),
            ..GuestHalf::default()
        }
    }
}

/// A heartbeat interval: a duration that is not 0.
#[cfg(feature = "guest")]
pub fn parse_interval(text: &str) -> Result<Duration, WatchdogError> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(WatchdogError::ZeroInterval);
    }
    Ok(d)
}
