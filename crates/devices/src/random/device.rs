//! The random device's descriptor: the guest's entropy budget (`[guest.random]`), the `random`
//! channels and `random-raw` ports of the host half, the kernel-pool feeder of the guest half.

use super::CLASS;
use crate::registry::{Device, SettingsError};

#[cfg(feature = "guest")]
use {
    super::guest::{run_feeder, FeedSettings, Feeder, KernelPool},
    crate::registry::{cmdline_values, AgentArgs, GuestHalf, GuestOptions},
    clap::ArgAction,
    vstream_link::Mux,
};
#[cfg(feature = "host")]
use {
    super::host::{serve_raw, Entropy, Limiter},
    super::vhost::RngDevice,
    super::Settings,
    crate::keep::{keep, now_secs, Kept, Slot},
    crate::registry::{section, GuestFacts, HostContext, HostHalf, HostState, TransportStatus},
    crate::ServeFuture,
    serde_json::Value,
    std::sync::{Arc, Mutex},
};

/// `random`.
pub struct RandomDevice;

/// The raw transport kind: vstreamd writes entropy into it within the budget, e.g. a
/// virtio-serial port that the guest's `rngd -r /dev/vportNpM` reads.
pub const RAW_KIND: &str = "random-raw";

/// The virtio-rng kind: vstreamd serves the guest's `vhost-user-rng` device on the
/// `unix-listen:` socket the VMM connects to.
pub const VHOST_KIND: &str = "random-vhost-user";

#[cfg(feature = "host")]
fn settings(s: Option<&Value>) -> Result<Settings, SettingsError> {
    let s: Settings = section(CLASS, s)?.unwrap_or_default();
    s.validate().map_err(|e| SettingsError::new(CLASS, e))?;
    Ok(s)
}

impl Device for RandomDevice {
    fn class(&self) -> &'static str {
        CLASS
    }

    crate::registry::status_type!(super::host::RandomStatus);

    fn raw_kinds(&self) -> &'static [&'static str] {
        &[RAW_KIND, VHOST_KIND]
    }

    #[cfg(feature = "host")]
    fn check(&self, s: Option<&Value>, guest: Option<&GuestFacts>) -> Result<(), SettingsError> {
        match guest {
            None => section::<Settings>(CLASS, s).map(drop),
            Some(g) => {
                for t in g.transports.iter().filter(|t| t.kind == VHOST_KIND) {
                    t.vhost_user_socket(CLASS)?;
                }
                settings(s).map(drop)
            }
        }
    }

    #[cfg(feature = "host")]
    fn host(&self, ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        let limiter = Arc::new(Limiter::new(settings(ctx.section.as_ref())?));
        let state = Arc::new(RandomState {
            limiter: limiter.clone(),
            raw: ctx
                .transports
                .iter()
                .map(|t| {
                    let s = TransportStatus::new(&t.kind, t.name.clone(), t.address.to_string());
                    Mutex::new(s)
                })
                .collect(),
            vhost: Mutex::new(Vec::new()),
        });
        let mut vhost = Vec::new();
        let mut tasks: Vec<ServeFuture> = Vec::new();
        for (i, t) in ctx.transports.iter().enumerate() {
            if t.kind != VHOST_KIND {
                tasks.push(Box::pin(run_raw(ctx.clone(), state.clone(), i)));
                continue;
            }
            // Served from now on, one VMM connection after another, on a thread of its own.
            let path = t.vhost_user_socket(CLASS)?;
            let failed = |e: std::io::Error| {
                SettingsError::new(CLASS, format!("transport {:?}: {e}", t.name))
            };
            let device = RngDevice::new(limiter.clone()).map_err(failed)?;
            vhost.push(vstream_vhost::serve("rng", path, device).map_err(failed)?);
            state.raw[i].update(&mut |s| {
                s.state = "listening".into();
                s.since = now_secs();
            });
        }
        state
            .vhost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(vhost);
        Ok(HostHalf {
            services: vec![Arc::new(Entropy::new(&ctx.guest, limiter))],
            tasks,
            state,
        })
    }

    #[cfg(feature = "guest")]
    fn agent_args(&self) -> Vec<clap::Arg> {
        vec![clap::Arg::new("no-random")
            .long("no-random")
            .action(ArgAction::SetTrue)
            .help("Do not feed the kernel's entropy pool from the host (also `vstream.random=0`)")]
    }

    #[cfg(feature = "guest")]
    fn agent_options(
        &self,
        args: &AgentArgs<'_>,
        options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        let mut on = args.matches.get_flag("no-random").then_some(false);
        if args.from_kernel && on.is_none() {
            if let Some(r) = cmdline_values(args.cmdline, "random").last() {
                on = Some(feed_word(r)?);
            }
        }
        if on != Some(false) {
            options.set(CLASS, FeedSettings::default());
        }
        Ok(())
    }

    #[cfg(feature = "guest")]
    fn guest(&self, mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let Some(feed) = options.get::<FeedSettings>(CLASS) else {
            return GuestHalf::default();
        };
        match KernelPool::open() {
            Ok(pool) => GuestHalf {
                tasks: vec![Box::pin(run_feeder(
                    mux.clone(),
                    Feeder::new(pool, feed.clone()),
                ))],
                ..GuestHalf::default()
            },
            Err(e) => {
                tracing::warn!("random: not feeding the kernel's entropy pool: {e}");
                GuestHalf::default()
            }
        }
    }
}

#[cfg(feature = "guest")]
/// `vstream.random=`: whether to feed the kernel's pool.
pub fn feed_word(r: &str) -> Result<bool, SettingsError> {
    match r {
        "1" | "on" | "yes" => Ok(true),
        "0" | "off" | "no" => Ok(false),
        _ => Err(SettingsError::new(
            CLASS,
            format!("vstream.random={r}: expected 0 or 1"),
        )),
    }
}

#[cfg(feature = "host")]
struct RandomState {
    limiter: Arc<Limiter>,
    raw: Vec<Mutex<TransportStatus>>,
    /// The served virtio-rng devices.
    vhost: Mutex<Vec<vstream_vhost::Server>>,
}

#[cfg(feature = "host")]
impl HostState for RandomState {
    fn transports(&self) -> Vec<TransportStatus> {
        self.raw
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

#[cfg(feature = "host")]
/// Keeps one random-raw transport connected and writes entropy into it within the guest's
/// budget (docs/devices/random.md).
async fn run_raw(ctx: HostContext, state: Arc<RandomState>, i: usize) {
    let t = &ctx.transports[i];
    let slot = &state.raw[i];
    let kept = Kept {
        kind: RAW_KIND,
        name: &t.name,
        address: &t.address,
        slot,
        events: &ctx.events,
    };
    let kept = &kept;
    let (limiter, guest) = (&state.limiter, &ctx.guest);
    keep(kept, || None, |conn| async move {
        let mut stream = CountingWriter {
            inner: conn.stream,
            slot,
        };
        let reason = serve_raw(&mut stream, limiter).await.to_string();
        tracing::info!(guest = %guest, transport = %kept.name, "random-raw transport down: {reason}");
        kept.down(&reason);
    })
    .await
}

#[cfg(feature = "host")]
/// Counts the bytes written to a random-raw transport into its status.
struct CountingWriter<'a> {
    inner: vstream_transport::BoxStream,
    slot: &'a Mutex<TransportStatus>,
}

#[cfg(feature = "host")]
impl tokio::io::AsyncWrite for CountingWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let n = *n as u64;
            self.slot.update(&mut |s| s.bytes_out += n);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
