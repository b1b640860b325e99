//! The ppp device's descriptor: `[guest.ppp]` (none: no link), the host half's `ppp` service,
//! the guest half's pppd (`--ppp`, `vstream.ppp=`).

use super::CLASS;
use crate::registry::{Device, SettingsError};

#[cfg(feature = "guest")]
use {
    super::guest::{run, Mode, Settings},
    crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions},
    vstream_link::Mux,
};
#[cfg(feature = "host")]
use {
    super::host::{PppConfig, PppService},
    crate::registry::{section, valid_section, GuestFacts, HostContext, HostHalf},
    serde_json::Value,
    std::sync::Arc,
};

/// `ppp`.
pub struct PppDevice;

#[cfg(feature = "host")]
fn settings(s: Option<&Value>) -> Result<Option<PppConfig>, SettingsError> {
    valid_section(CLASS, s, PppConfig::validate)
}

impl Device for PppDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    crate::registry::status_type!(super::host::PppStatus);

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        match guest {
            None => section::<PppConfig>(CLASS, s).map(drop),
            Some(_) => settings(s).map(drop),
        }
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let s = settings(ctx.section.as_ref())?;
        Ok(HostHalf::services(vec![Arc::new(PppService::new(ctx, s))]))
    }

    #[cfg(feature = "guest")]
    fn agent_args(&self) -> Vec<clap::Arg> {
        vec![clap::Arg::new("ppp")
                .value_name("PPP")
            .long("ppp")
            .value_parser(|s: &str| s.parse::<Mode>())
            .help("The PPP link: `on` (pppd on a `ppp` channel), `off`, or a transport such as port:org.vstream.ppp (default: vstream.ppp= on the kernel command line, else `on` if /usr/sbin/pppd exists)")]
    }

    #[cfg(feature = "guest")]
    fn agent_options(
        &self,
        args: &AgentArgs<'_>,
        options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        let mode = match args.matches.get_one::<Mode>("ppp") {
            Some(m) => m.clone(),
            None => match kernel_mode(args.cmdline)? {
                Some(m) => m,
                None if Settings::new(Mode::Channel).pppd.exists() => Mode::Channel,
                None => Mode::Off,
            },
        };
        options.set(CLASS, Settings::new(mode));
        Ok(())
    }

    #[cfg(feature = "guest")]
    fn guest(&self, mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let Some(s) = options.get::<Settings>(CLASS) else {
            return GuestHalf::default();
        };
        GuestHalf {
            tasks: vec![Box::pin(run(mux.clone(), s.clone()))],
            ..GuestHalf::default()
        }
    }
}

#[cfg(feature = "guest")]
/// The PPP link a kernel command line asks for: `vstream.ppp=on|off|ADDR` (the last one
/// wins); `None` if it says nothing.
pub fn kernel_mode(cmdline: &str) -> Result<Option<Mode>, SettingsError> {
    let mut out = None;
    for m in cmdline_values(cmdline, "ppp") {
        let mode = m.parse();
        out = Some(mode.map_err(|e| SettingsError::new(CLASS, format!("vstream.ppp={m}: {e}")))?);
    }
    Ok(out)
}
