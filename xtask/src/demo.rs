//! `cargo xtask demo`: boots the default lab guest and shows each device working, one entry per device.
//!
//! A new device adds a file `demo/<device>.rs` with a `demo` function that exercises it through
//! vstreamd/vstreamctl and returns what a person should see, and a [`DeviceDemo`] (a name, a
//! sentence, that function) to [`DEVICE_DEMOS`]. What a device
//! needs in the guest (vstreamd config sections, extra virtio ports, kernel arguments) goes into
//! `demo_options`: one guest carries every device. Each demo checks what it shows and returns an
//! error when it did not happen.
//!
//! Order matters: demos that disturb the guest (the watchdog kills and restarts the agent) come
//! last, and the events demo summarises what `vstreamctl events --json`, started before the first
//! demo, saw during all of them.

mod console;
mod diag;
mod events;
mod hid;
mod ppp;
mod printer;
mod qga;
mod random;
mod tty;
mod vsock;
mod watchdog;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::image;
use crate::lab::{guest_status, transport_state, Lab, LabOptions, LabVsock};
use events::{EventLog, EVENTS};
use ppp::{PPP_LOCAL, PPP_REMOTE};
use random::{RANDOM_PORT, RANDOM_RATE};
use vsock::QGA_VSOCK_PORT;
use watchdog::{WATCHDOG_PRETIMEOUT_MS, WATCHDOG_TIMEOUT_MS};

/// One device's demonstration.
pub struct DeviceDemo {
    /// Short name, shown in the summary.
    pub name: &'static str,
    /// What it shows.
    pub what: &'static str,
    /// Runs it; the text is printed under the demo's heading.
    pub run: fn(&Lab) -> Result<String>,
}

/// The demos, in order. A new device adds a line.
pub const DEVICE_DEMOS: &[DeviceDemo] = &[
    DeviceDemo {
        name: "mux transports",
        what: "the guest agent reaches vstreamd over the virtio port org.vstream.0, the PCI 16550 \
             and vsock, one session over all of them",
        run: demo_transports,
    },
    DeviceDemo {
        name: "vsock",
        what: "vstreamd serves the guest's virtio-vsock device: the mux over it both ways, and a \
               host program reaching the guest's QGA listener through the hybrid socket",
        run: vsock::demo,
    },
    DeviceDemo {
        name: "kernel console",
        what: "the guest's ttyS0 (kernel console) is recorded by vstreamd on the host",
        run: console::demo_kernel_console,
    },
    DeviceDemo {
        name: "hvc0 shell",
        what: "a command typed into hvc0 through `vstreamctl console`, and its output",
        run: console::demo_hvc0_shell,
    },
    DeviceDemo {
        name: "diag echo",
        what: "1 MiB through a multiplexer channel to the guest agent's echo service and back",
        run: diag::demo,
    },
    DeviceDemo {
        name: "tty",
        what:
            "commands run with `vstreamctl exec` and `vstreamctl shell`: output, exit status, pty",
        run: tty::demo,
    },
    DeviceDemo {
        name: "qga",
        what: "QEMU guest agent commands with `vstreamctl agent`, an 8 MiB `vstreamctl cp` round \
               trip, `vstreamctl time-sync`",
        run: qga::demo,
    },
    DeviceDemo {
        name: "random",
        what: "host entropy: the agent fed the guest's pool; a raw virtio port read in the guest \
               within the configured rate",
        run: random::demo,
    },
    DeviceDemo {
        name: "virtio-rng",
        what: "vstreamd serves the guest's virtio-rng device: the guest kernel's /dev/hwrng draws \
               from the same per-guest budget",
        run: random::demo_hwrng,
    },
    DeviceDemo {
        name: "hid",
        what:
            "text typed with `vstreamctl input lab type`, read back from the guest's evdev device",
        run: hid::demo,
    },
    DeviceDemo {
        name: "printer",
        what: "a small PDF printed with busybox nc in the guest lands in the host's spool \
               (`vstreamctl jobs`)",
        run: printer::demo,
    },
    DeviceDemo {
        name: "ppp",
        what: "a PPP link (pppd in the guest, backend tun on the host): ping through ppp0, 1 MiB \
               over TCP",
        run: ppp::demo,
    },
    DeviceDemo {
        name: "watchdog",
        what: "armed by the agent's heartbeats; a clean agent stop disarms it; kill -9 fires it \
               (action log) and init's respawned agent re-arms it",
        run: watchdog::demo,
    },
    DeviceDemo {
        name: "events",
        what: "what `vstreamctl events --json`, started before the first demo, saw meanwhile",
        run: events::demo,
    },
];

/// How long an agent (re)start or a guest command may take under TCG.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// What the demo made on the host besides the lab: a directory for the raw random port's socket
/// and the files copied with `cp`, and the network namespace of the PPP link's host end.
/// [`HostCleanup`] removes both.
struct DemoHost {
    dir: PathBuf,
    /// The namespace's name, or why there is none (then the guest has no `[guest.ppp]`).
    netns: std::result::Result<String, String>,
}

impl DemoHost {
    fn prepare() -> Result<DemoHost> {
        // Unix socket paths are limited to 107 bytes: a short directory of our own (the lab's is
        // made while it boots).
        let dir = std::env::temp_dir().join(format!("vs-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!("vs-demo-{}", std::process::id());
        let netns = match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => Ok(name),
            Ok(out) => Err(format!(
                "`ip netns add {name}` failed: {} (the PPP link's host end needs root)",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run `ip netns add`: {e}")),
        };
        Ok(DemoHost { dir, netns })
    }
}

/// Dropped at the end of [`run`] (after the lab): deletes the namespace and the directory.
struct HostCleanup;

impl Drop for HostCleanup {
    fn drop(&mut self) {
        if let Some(host) = DEMO_HOST.get() {
            if let Ok(name) = &host.netns {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
            let _ = std::fs::remove_dir_all(&host.dir);
        }
    }
}

/// Set once by [`run`] before the lab boots; the demos read it.
static DEMO_HOST: OnceLock<DemoHost> = OnceLock::new();

fn demo_host() -> Result<&'static DemoHost> {
    DEMO_HOST
        .get()
        .ok_or_else(|| anyhow!("the demo's host setup is missing (run through `cargo xtask demo`)"))
}

/// The default lab guest plus what every device needs: the raw random port, vstreamd's
/// `[guest.random]`, `[guest.watchdog]`, `[guest.printer]` and `[guest.ppp]`, vsock and
/// virtio-rng devices served by vstreamd. The mux runs on every transport: virtio port, PCI
/// 16550 and vsock (both ways).
fn demo_options(host: &DemoHost) -> LabOptions {
    let random_sock = host.dir.join("random.sock");
    let mut config = format!(
        "\n[[guest.transport]]\nkind = \"random-raw\"\nname = \"rng\"\naddress = \"unix:{}\"\n\n\
         [guest.random]\nrate = {RANDOM_RATE}\nburst = {RANDOM_RATE}\n\n\
         [guest.watchdog]\ntimeout_ms = {WATCHDOG_TIMEOUT_MS}\npretimeout_ms = {WATCHDOG_PRETIMEOUT_MS}\n\
         action = \"log\"\n\n\
         [guest.printer]\nquota_bytes = 67108864\n",
        random_sock.display()
    );
    if let Ok(netns) = &host.netns {
        // This machine's kernel has no PPP driver: the host end is vstreamd's own PPP endpoint on
        // a TUN device (backend tun), in a namespace of ours.
        config.push_str(&format!(
            "\n[guest.ppp]\nlocal = \"{PPP_LOCAL}\"\nremote = \"{PPP_REMOTE}\"\nmtu = 1500\n\
             backend = \"tun\"\nnetns = \"{netns}\"\n"
        ));
    }
    LabOptions {
        // No `vstream.watchdog=` here: with it the agent's start shifts so that its first HELLO on
        // the slow PCI serial (sent before it knew vstreamd's session) arrives after the virtio
        // port's handshake, and vstreamd wrongly restarts the session (crates/wire/src/session.rs,
        // handle_hello: `your_session == 0` is taken for a new peer session). The watchdog demo
        // turns the heartbeats on in the guest instead.
        extra_qemu_args: vec![
            "-chardev".into(),
            format!(
                "socket,id=rndraw,path={},server=on,wait=off",
                random_sock.display()
            ),
            "-device".into(),
            format!("virtserialport,bus=vser0.0,nr=2,chardev=rndraw,id=rndraw,name={RANDOM_PORT}"),
        ],
        extra_config: config,
        // vsock and virtio-rng served by vstreamd itself; QEMU's own virtio-rng off, so that the
        // guest's only hwrng is vstreamd's. The agent also serves raw QGA on a vsock port.
        vsock: LabVsock::Vstreamd,
        vhost_rng: true,
        virtio_rng: false,
        extra_kernel_args: vec![format!("vstream.qga=vsock-listen:{QGA_VSOCK_PORT}")],
        ..LabOptions::default()
    }
}

fn demo_transports(lab: &Lab) -> Result<String> {
    let status = lab.wait_for("every mux transport up", Duration::from_secs(90), |s| {
        lab.mux_transports_up(s)
    })?;
    let mut out = String::new();
    for address in lab.mux_addresses() {
        let state = transport_state(&status, lab.name(), &address).unwrap_or("?");
        out.push_str(&format!("transport {address}: {state}\n"));
    }
    out.push_str("vstreamctl status --json:\n");
    out.push_str(&serde_json::to_string_pretty(&status)?);
    out.push('\n');
    Ok(out)
}

// ---- Helpers --------------------------------------------------------------------------------

/// Runs `vstreamctl ARGS` with `input` on stdin, at most `timeout`.
fn ctl(lab: &Lab, args: &[&str], input: &[u8], timeout: Duration) -> Result<Output> {
    lab.ctl_within(args, input, timeout)
        .with_context(|| format!("vstreamctl {}", args.join(" ")))
}

/// Runs `vstreamctl ARGS`; it must succeed. Its stdout.
fn ctl_ok(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = ctl(lab, args, &[], Duration::from_secs(90))?;
    if !out.status.success() {
        bail!(
            "vstreamctl {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `vstreamctl exec lab -- sh -c SCRIPT`; it must exit 0. Its stdout.
fn guest_sh(lab: &Lab, script: &str) -> Result<String> {
    let out = ctl(
        lab,
        &["exec", lab.name(), "--", "sh", "-c", script],
        &[],
        Duration::from_secs(90),
    )?;
    if !out.status.success() {
        bail!(
            "`{script}` in the guest failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Types `cmd` into the guest's shell on hvc0 (which does not depend on the agent), once: the
/// console helper types a line again when its answer is slow, so a marker file guards `cmd`.
fn hvc0_once(lab: &Lab, id: &str, cmd: &str) -> Result<()> {
    let line = format!(
        "[ -e /tmp/{id}.typed ] || {{ touch /tmp/{id}.typed; {cmd}; }}; echo {id}-$((40+2))"
    );
    lab.console_roundtrip("hvc0", &line, &format!("{id}-42"), Duration::from_secs(60))
        .with_context(|| format!("typing {cmd:?} into hvc0"))?;
    Ok(())
}

/// The first word of `sha256sum`'s output for `path` (a host file) or for stdin data.
fn sha256_host(path: Option<&Path>, data: &[u8]) -> Result<String> {
    let mut command = Command::new("sha256sum");
    if let Some(path) = path {
        command.arg(path);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    let mut stdin = child.stdin.take().context("sha256sum stdin")?;
    let data = data.to_vec();
    let writer = thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&data)
    });
    let out = child.wait_with_output().context("sha256sum")?;
    let _ = writer.join();
    first_word(&String::from_utf8_lossy(&out.stdout))
}

fn first_word(text: &str) -> Result<String> {
    let word = text.split_whitespace().next().unwrap_or_default();
    ensure!(word.len() == 64, "not a SHA-256 digest: {text:?}");
    Ok(word.to_owned())
}

fn device_status(status: &Value, guest: &str, device: &str) -> Value {
    guest_status(status, guest).map_or(Value::Null, |g| g["devices"][device].clone())
}

/// Builds the image, boots the default guest, runs every demo, prints a summary and shuts down.
pub fn run() -> Result<()> {
    let image = image::ensure_image().context("building the guest image")?;
    println!(
        "vstream demo: guest image {} + {} (kernel {})",
        image.vmlinuz.display(),
        image.initramfs.display(),
        image.kernel.version
    );
    if DEMO_HOST.set(DemoHost::prepare()?).is_err() {
        bail!("the demo runs once per process");
    }
    let host = demo_host()?;
    if let Err(why) = &host.netns {
        println!("vstream demo: no PPP link: {why}");
    }
    // Removes the namespace and the directory at the end, also when the demo fails.
    let _cleanup = HostCleanup;
    let started = Instant::now();
    let lab = Lab::boot(demo_options(host)).context("booting the lab guest")?;
    println!(
        "vstream demo: guest {:?} booted in {:.1} s with {} ({})\n  kernel command line: {}\n  files: {}",
        lab.name(),
        lab.boot_time().unwrap_or_else(|| started.elapsed()).as_secs_f64(),
        lab.accel(),
        lab.accel_reason(),
        lab.kernel_cmdline(),
        lab.paths().dir.display()
    );

    match EventLog::start(&lab) {
        Ok(log) => {
            let _ = EVENTS.set(log);
            println!("vstream demo: recording `vstreamctl events --json` for the events demo");
        }
        Err(e) => println!("vstream demo: could not start `vstreamctl events --json`: {e:#}"),
    }

    let mut results = Vec::new();
    for demo in DEVICE_DEMOS {
        println!("\n=== {}: {} ===", demo.name, demo.what);
        let t = Instant::now();
        let result = (demo.run)(&lab);
        match &result {
            Ok(text) => print!("{text}"),
            Err(e) => println!("FAILED: {e:#}"),
        }
        results.push((demo.name, result.is_ok(), t.elapsed()));
    }

    if let Some(ev) = EVENTS.get() {
        ev.stop();
    }

    println!("\n=== summary ===");
    for (name, ok, took) in &results {
        println!(
            "  {:<6} {name} ({:.1} s)",
            if *ok { "ok" } else { "FAILED" },
            took.as_secs_f64()
        );
    }
    let failed = results.iter().filter(|(_, ok, _)| !ok).count();
    if failed > 0 {
        lab.dump_logs("the demo failed");
        // Dropping the lab stops the guest and keeps nothing running.
        drop(lab);
        bail!("{failed} of {} device demos failed", results.len());
    }
    lab.shutdown().context("shutting the guest down")?;
    println!(
        "  all {} device demos passed; the guest is shut down",
        results.len()
    );
    Ok(())
}
