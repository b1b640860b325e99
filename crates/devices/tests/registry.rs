//! The registry with one more device from a single folder (tests/upper, the worked example of
//! docs/ARCHITECTURE.md), driven end to end over a real multiplexer pair.

mod upper;

use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_devices::registry::{
    registry, GuestFacts, GuestOptions, HostContext, HostState, Registry,
};
use vstream_devices::EventSink;
use vstream_link::Mux;
use vstream_wire::{Config, Role};

/// Starts every device's host half for guest "g" as vstreamd does (with `section` as
/// `[guest.upper]`), and every guest half as vstream-agent does; returns the host's and the
/// guest's sessions (linked over a socket pair) and the upper host half's state.
fn start(
    reg: &Registry,
    section: Option<serde_json::Value>,
) -> (Mux, Mux, Option<Arc<dyn HostState>>) {
    let (host, host_in) = Mux::new(Config::new(Role::Host, "h"), 1);
    let (guest, guest_in) = Mux::new(Config::new(Role::Guest, "g"), 2);
    let (events, _) = tokio::sync::broadcast::channel(16);
    let events = EventSink::new("g", events);
    let mut services = Vec::new();
    let mut state = None;
    for d in reg.iter() {
        let ctx = HostContext {
            guest: "g".into(),
            qmp: None,
            mux: host.clone(),
            events: events.clone(),
            start_events: events.clone(),
            state_dir: None,
            section: (d.class() == upper::CLASS)
                .then(|| section.clone())
                .flatten(),
            transports: Vec::new(),
            carried_console: Arc::new(|_: &str| None),
        };
        let half = d.host(&ctx).expect("host half");
        services.extend(half.services);
        if d.class() == upper::CLASS {
            state = Some(half.state);
        }
    }
    tokio::spawn(vstream_devices::dispatch(services, host_in));
    let half = reg.start_guest(&guest, &GuestOptions::default());
    tokio::spawn(vstream_devices::dispatch(half.services, guest_in));
    let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
    let params = vstream_wire::LinkParams::stream(0);
    let (h2, g2) = (host.clone(), guest.clone());
    tokio::spawn(async move { h2.run_link(Box::new(a), params, "pair", &[]).await });
    tokio::spawn(async move { g2.run_link(Box::new(b), params, "pair", &[]).await });
    (host, guest, state)
}

#[tokio::test]
async fn a_device_added_from_one_folder_is_served_end_to_end() {
    let reg = registry().clone().with(Arc::new(upper::Upper));
    assert!(reg.get(upper::CLASS).is_some());
    let (host, guest, state) = start(&reg, Some(json!({ "max_bytes": 100 })));
    let state = state.expect("the upper host half");

    // The guest half answers the host ...
    let mut chan = host.open(upper::CLASS, "").await.expect("open upper");
    chan.write_all(b"hello, guest").await.expect("write");
    chan.shutdown().await.expect("half close");
    let mut back = String::new();
    chan.read_to_string(&mut back).await.expect("read");
    assert_eq!(back, "HELLO, GUEST");

    // ... and the host half the guest, within its [guest.upper] limit.
    let mut chan = guest.open(upper::CLASS, "").await.expect("open upper");
    chan.write_all(b"hello, host").await.expect("write");
    chan.shutdown().await.expect("half close");
    let mut back = String::new();
    chan.read_to_string(&mut back).await.expect("read");
    assert_eq!(back, "HELLO, HOST");
    let status = state.status().expect("status");
    let typed = upper::UpperStatus {
        max_bytes: 100,
        channels: 1,
    };
    assert_eq!(status.get::<upper::UpperStatus>(), Some(&typed));
    assert_eq!(status.to_json(), json!({ "max_bytes": 100, "channels": 1 }));
    // vstreamctl reads the JSON back as the device's own type, through the registry.
    let back = reg
        .get(upper::CLASS)
        .expect("upper registered")
        .read_status(status.to_json())
        .expect("read back");
    assert_eq!(back.get::<upper::UpperStatus>(), Some(&typed));
    let mut chan = guest.open(upper::CLASS, "").await.expect("open upper");
    chan.write_all(&[b'x'; 101]).await.expect("write");
    let mut rest = Vec::new();
    let e = chan
        .read_to_end(&mut rest)
        .await
        .expect_err("reset past max_bytes");
    assert!(e.to_string().contains("max_bytes"), "{e}");

    // Without the device, the same channel is refused with the reason.
    let (host, _guest, _) = start(registry(), None);
    let e = host
        .open(upper::CLASS, "")
        .await
        .expect_err("no upper device");
    assert!(e.to_string().contains("upper"), "{e}");
}

#[test]
fn the_device_checks_its_own_section() {
    let reg = registry().clone().with(Arc::new(upper::Upper));
    let d = reg.get(upper::CLASS).expect("upper");
    let facts = GuestFacts::default();
    assert!(d.check(None, Some(&facts)).is_ok());
    let e = d
        .check(Some(&json!({ "max_bytes": 0 })), Some(&facts))
        .expect_err("0 bytes");
    assert_eq!(e.to_string(), "[guest.upper]: max_bytes must be at least 1");
    let e = d
        .check(Some(&json!({ "max": 1 })), None)
        .expect_err("unknown key");
    assert!(
        e.to_string()
            .starts_with("[guest.upper]: unknown field `max`"),
        "{e}"
    );
}

/// The agent's options as vstream-agent reads them: `args` on its command line (with every
/// device's options), `cmdline` as the kernel command line.
fn agent_options(args: &[&str], cmdline: &str) -> Result<GuestOptions, String> {
    let cmd = registry()
        .iter()
        .fold(clap::Command::new("vstream-agent"), |c, d| {
            c.args(d.agent_args())
        });
    let matches = cmd
        .try_get_matches_from(std::iter::once("vstream-agent").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    let args = vstream_devices::registry::AgentArgs {
        matches: &matches,
        cmdline,
        from_kernel: true,
    };
    let mut options = GuestOptions::default();
    for d in registry().iter() {
        d.agent_options(&args, &mut options)
            .map_err(|e| e.to_string())?;
    }
    Ok(options)
}

#[test]
fn ppp_mode_from_the_kernel_command_line() {
    use vstream_devices::ppp::device::kernel_mode;
    use vstream_devices::ppp::guest::Mode;
    assert_eq!(kernel_mode("quiet").expect("none"), None);
    assert_eq!(
        kernel_mode("vstream.ppp=off").expect("off"),
        Some(Mode::Off)
    );
    let m = kernel_mode("vstream.ppp=off vstream.ppp=port:org.vstream.ppp").expect("port");
    assert_eq!(
        m.map(|m| m.to_string()).as_deref(),
        Some("port:org.vstream.ppp")
    );
    assert!(kernel_mode("vstream.ppp=bogus:1").is_err());
}

#[test]
fn printer_listeners_from_the_kernel_command_line() {
    use vstream_devices::printer::device::kernel_listeners;
    assert_eq!(kernel_listeners("quiet").expect("none"), None);
    assert_eq!(
        kernel_listeners("vstream.printer=off").expect("off"),
        Some(vec![])
    );
    let l = kernel_listeners(
        "vstream.printer=tcp-listen:127.0.0.1:9101 vstream.printer=unix-listen:/run/p.sock",
    )
    .expect("two")
    .expect("some");
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].to_string(), "tcp-listen:127.0.0.1:9101");
    assert!(kernel_listeners("vstream.printer=bogus:1").is_err());
}

#[test]
fn reads_the_device_settings_from_the_kernel_command_line() {
    use vstream_devices::qga::device::RawPort;
    use vstream_devices::random::guest::FeedSettings;
    use vstream_devices::watchdog::guest::GuestSettings;
    let o = agent_options(&[], "vstream.random=0 vstream.watchdog=500ms").expect("parse");
    assert!(o.get::<FeedSettings>("random").is_none());
    let w = o.get::<GuestSettings>("watchdog").expect("heartbeats");
    assert_eq!(w.interval, std::time::Duration::from_millis(500));
    let none = agent_options(&[], "quiet").expect("parse");
    assert!(none.get::<FeedSettings>("random").is_some());
    assert!(none.get::<GuestSettings>("watchdog").is_none());
    assert!(agent_options(&[], "vstream.watchdog=0s").is_err());
    assert!(agent_options(&[], "vstream.random=maybe").is_err());
    let q = agent_options(&[], "vstream.qga=port:org.qemu.guest_agent.0").expect("qga");
    assert_eq!(
        q.get::<RawPort>("qga").map(|p| p.0.to_string()).as_deref(),
        Some("port:org.qemu.guest_agent.0")
    );
    // The agent's own options win over the kernel command line.
    let o = agent_options(
        &["--no-random", "--watchdog-interval", "2s"],
        "vstream.watchdog=500ms",
    )
    .expect("parse");
    assert!(o.get::<FeedSettings>("random").is_none());
    let w = o.get::<GuestSettings>("watchdog").expect("heartbeats");
    assert_eq!(w.interval, std::time::Duration::from_secs(2));
    assert!(agent_options(&["--watchdog-interval", "0s"], "").is_err());
}

#[test]
fn fastnet_interface_from_the_agent_and_kernel_command_lines() {
    use vstream_devices::fastnet::device::Interface;
    let name = |args: &[&str], cmdline: &str| {
        agent_options(args, cmdline).map(|o| {
            o.get::<Interface>(vstream_devices::fastnet::CLASS)
                .and_then(|i| i.0.clone())
        })
    };
    assert_eq!(name(&[], "quiet"), Ok(None));
    assert_eq!(name(&[], "vstream.fastnet=fn0"), Ok(Some("fn0".into())));
    assert_eq!(
        name(&[], "vstream.fastnet=fn0 vstream.fastnet=off"),
        Ok(None)
    );
    assert_eq!(
        name(&["--fastnet", "eth9"], "vstream.fastnet=fn0"),
        Ok(Some("eth9".into()))
    );
    let e = name(&[], "vstream.fastnet=a/b").expect_err("a bad name");
    assert!(
        e.starts_with("[guest.fastnet]: --fastnet / vstream.fastnet=:"),
        "{e}"
    );
}

#[test]
fn fastnet_section_is_checked() {
    let d = registry().get("fastnet").expect("fastnet registered");
    assert!(d.check(None, None).is_ok());
    assert!(d
        .check(
            Some(&json!({ "tap": "vsfn0", "guest_address": "10.0.0.2/24" })),
            None
        )
        .is_ok());
    let e = d
        .check(Some(&json!({ "tap": "vsfn0", "mode": "shm" })), None)
        .expect_err("shm without a segment");
    assert!(e.to_string().contains("needs segment"), "{e}");
    assert!(d
        .check(
            Some(&json!({ "tap": "vsfn0", "mode": "shm", "segment": "/dev/shm/vsfn-g" })),
            None
        )
        .is_ok());
    let e = d
        .check(Some(&json!({ "tap": "much-too-long-name" })), None)
        .expect_err("a bad TAP name");
    assert!(e.to_string().starts_with("[guest.fastnet]: tap:"), "{e}");
    assert!(d
        .check(Some(&json!({ "tap": "t", "mtu": 10 })), None)
        .is_err());
}
