//! `cargo xtask demo`: boots the default lab guest and shows each device working, one entry per device.
//!
//! A new device adds a [`DeviceDemo`] to [`DEVICE_DEMOS`]: a name, a sentence, and a function that
//! exercises it through vstreamd/vstreamctl and returns what a person should see. What a device
//! needs in the guest (vstreamd config sections, extra virtio ports, kernel arguments) goes into
//! [`demo_options`]: one guest carries every device. Each demo checks what it shows and returns an
//! error when it did not happen.
//!
//! Order matters: demos that disturb the guest (the watchdog kills and restarts the agent) come
//! last, and the events demo summarises what `vstreamctl events --json`, started before the first
//! demo, saw during all of them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::lab::{guest_status, strip_ansi, transport_state, Lab, LabOptions};
use crate::{image, process};

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
        what:
            "the guest agent reaches vstreamd over the virtio port org.vstream.0 and the PCI 16550",
        run: demo_transports,
    },
    DeviceDemo {
        name: "kernel console",
        what: "the guest's ttyS0 (kernel console) is recorded by vstreamd on the host",
        run: demo_kernel_console,
    },
    DeviceDemo {
        name: "hvc0 shell",
        what: "a command typed into hvc0 through `vstreamctl console`, and its output",
        run: demo_hvc0_shell,
    },
    DeviceDemo {
        name: "diag echo",
        what: "1 MiB through a multiplexer channel to the guest agent's echo service and back",
        run: demo_diag_echo,
    },
    DeviceDemo {
        name: "tty",
        what:
            "commands run with `vstreamctl exec` and `vstreamctl shell`: output, exit status, pty",
        run: demo_tty,
    },
    DeviceDemo {
        name: "qga",
        what: "QEMU guest agent commands with `vstreamctl agent`, an 8 MiB `vstreamctl cp` round \
               trip, `vstreamctl time-sync`",
        run: demo_qga,
    },
    DeviceDemo {
        name: "random",
        what: "host entropy: the agent fed the guest's pool; a raw virtio port read in the guest \
               within the configured rate",
        run: demo_random,
    },
    DeviceDemo {
        name: "hid",
        what:
            "text typed with `vstreamctl input lab type`, read back from the guest's evdev device",
        run: demo_hid,
    },
    DeviceDemo {
        name: "printer",
        what: "a small PDF printed with busybox nc in the guest lands in the host's spool \
               (`vstreamctl jobs`)",
        run: demo_printer,
    },
    DeviceDemo {
        name: "ppp",
        what: "a PPP link (pppd in the guest, backend tun on the host): ping through ppp0, 1 MiB \
               over TCP",
        run: demo_ppp,
    },
    DeviceDemo {
        name: "watchdog",
        what: "armed by the agent's heartbeats; a clean agent stop disarms it; kill -9 fires it \
               (action log) and init's respawned agent re-arms it",
        run: demo_watchdog,
    },
    DeviceDemo {
        name: "events",
        what: "what `vstreamctl events --json`, started before the first demo, saw meanwhile",
        run: demo_events,
    },
];

/// The guest's budget for the random device, bytes per second.
const RANDOM_RATE: u64 = 32 * 1024;
/// The name of the raw random port in the guest.
const RANDOM_PORT: &str = "org.vstream.random.0";
/// Watchdog: the agent's heartbeat interval (kernel command line), vstreamd's timeouts.
const WATCHDOG_INTERVAL: &str = "1s";
const WATCHDOG_TIMEOUT_MS: u64 = 5000;
const WATCHDOG_PRETIMEOUT_MS: u64 = 2000;
/// PPP addresses: the host end (in the demo's network namespace) and the guest's ppp0.
const PPP_LOCAL: &str = "10.77.0.1";
const PPP_REMOTE: &str = "10.77.0.2";
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
/// `[guest.random]`, `[guest.watchdog]`, `[guest.printer]` and `[guest.ppp]`, the agent's
/// heartbeat interval. The mux runs on both transports (virtio port and PCI 16550), as by default.
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
        ..LabOptions::default()
    }
}

fn demo_diag_echo(lab: &Lab) -> Result<String> {
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let started = Instant::now();
    let out = lab.ctl_with_input(["open", lab.name(), "diag", "echo"], &data)?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "vstreamctl open failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if out.stdout != data {
        bail!(
            "echo returned {} bytes that differ from the {} sent",
            out.stdout.len(),
            data.len()
        );
    }
    Ok(format!(
        "vstreamctl open {} diag echo: {} bytes sent, the same {} bytes back in {:.0} ms ({:.1} MB/s each way)\n",
        lab.name(),
        data.len(),
        out.stdout.len(),
        took.as_secs_f64() * 1000.0,
        data.len() as f64 / took.as_secs_f64() / 1e6
    ))
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

fn demo_kernel_console(lab: &Lab) -> Result<String> {
    lab.wait_for_console("ttyS0", "Linux version", Duration::from_secs(30))?;
    lab.wait_for_console("ttyS0", image::INIT_DONE_MARKER, Duration::from_secs(30))?;
    let log = lab.guest_console_log();
    let mut out = format!(
        "{} ({} bytes), selected lines:\n",
        lab.paths().console_log(lab.name(), "ttyS0").display(),
        log.len()
    );
    for line in log
        .lines()
        .filter(|l| l.contains("Linux version") || l.contains("vstream-lab:"))
    {
        out.push_str("  ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    Ok(out)
}

fn demo_hvc0_shell(lab: &Lab) -> Result<String> {
    let line = "echo vs-$((6*7)); uname -r; hostname";
    let shown = lab.console_roundtrip("hvc0", line, "vs-42", Duration::from_secs(60))?;
    let mut out = format!("typed: {line}\nthe terminal showed:\n");
    for l in strip_ansi(&shown).lines().filter(|l| !l.trim().is_empty()) {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
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

/// Incompressible, reproducible bytes (xorshift64).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

fn device_status(status: &Value, guest: &str, device: &str) -> Value {
    guest_status(status, guest).map_or(Value::Null, |g| g["devices"][device].clone())
}

// ---- Events: `vstreamctl events --json` for the whole demo ------------------------------------

/// `vstreamctl events --json`, read by a thread from before the first demo to the last; each
/// event with when it arrived.
struct EventLog {
    child: Mutex<Option<Child>>,
    seen: Arc<Mutex<Vec<(Instant, Value)>>>,
    started: Instant,
}

static EVENTS: OnceLock<EventLog> = OnceLock::new();

impl EventLog {
    fn start(lab: &Lab) -> Result<EventLog> {
        let mut command = lab.ctl_command();
        command
            .args(["events", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = process::spawn(command).context("starting vstreamctl events --json")?;
        let out = child
            .stdout
            .take()
            .context("vstreamctl events: no stdout")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Ok(mut seen) = sink.lock() {
                    seen.push((Instant::now(), v));
                }
            }
        });
        // The subscription is made as soon as vstreamctl connects.
        thread::sleep(Duration::from_millis(500));
        Ok(EventLog {
            child: Mutex::new(Some(child)),
            seen,
            started: Instant::now(),
        })
    }

    fn snapshot(&self) -> Vec<(Instant, Value)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The first event of `kind` at index `from` or later (waiting up to `timeout`), with its
    /// index and arrival time.
    fn wait(&self, from: usize, kind: &str, timeout: Duration) -> Result<(usize, Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.snapshot();
            if let Some((i, (t, v))) = seen
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, (_, v))| v["event"] == kind)
            {
                return Ok((i, *t, v.clone()));
            }
            if Instant::now() >= deadline {
                let kinds: Vec<String> = seen
                    .iter()
                    .skip(from)
                    .map(|(_, v)| v["event"].as_str().unwrap_or("?").to_owned())
                    .collect();
                bail!(
                    "no {kind} event within {} s; events meanwhile: {kinds:?}",
                    timeout.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// True while vstreamctl events runs.
    fn running(&self) -> bool {
        self.child
            .lock()
            .ok()
            .and_then(|mut c| c.as_mut().map(|c| matches!(c.try_wait(), Ok(None))))
            .unwrap_or(false)
    }

    fn stop(&self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut child) = child.take() {
                process::terminate(&mut child, Duration::from_millis(300));
            }
        }
    }
}

fn events() -> Result<&'static EventLog> {
    EVENTS
        .get()
        .ok_or_else(|| anyhow!("`vstreamctl events --json` was not started before the demos"))
}

// ---- tty ---------------------------------------------------------------------------------------

fn demo_tty(lab: &Lab) -> Result<String> {
    let t = Duration::from_secs(60);
    let name = lab.name();
    let mut out = String::new();

    let uname = ctl(lab, &["exec", name, "--", "uname", "-a"], &[], t)?;
    let text = String::from_utf8_lossy(&uname.stdout).into_owned();
    ensure!(
        uname.status.success() && text.starts_with(&format!("Linux {name} ")),
        "uname -a ({}): {text:?} {}",
        uname.status,
        String::from_utf8_lossy(&uname.stderr)
    );
    out.push_str(&format!("$ vstreamctl exec {name} -- uname -a\n{text}"));

    let exit = ctl(lab, &["exec", name, "--", "sh", "-c", "exit 3"], &[], t)?;
    ensure!(
        exit.status.code() == Some(3),
        "`sh -c 'exit 3'` gave {} (stderr {:?})",
        exit.status,
        String::from_utf8_lossy(&exit.stderr)
    );
    out.push_str(&format!(
        "$ vstreamctl exec {name} -- sh -c 'exit 3'; echo $?\n{}\n",
        exit.status.code().unwrap_or(-1)
    ));

    let split = ctl(
        lab,
        &[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2",
        ],
        &[],
        t,
    )?;
    ensure!(
        split.stdout == b"to-stdout\n" && split.stderr == b"to-stderr\n",
        "stdout {:?}, stderr {:?}",
        String::from_utf8_lossy(&split.stdout),
        String::from_utf8_lossy(&split.stderr)
    );
    out.push_str("stdout and stderr arrive apart: stdout \"to-stdout\", stderr \"to-stderr\"\n");

    let data = pseudo_random(1 << 20, 7);
    let started = Instant::now();
    let cat = ctl(lab, &["exec", name, "--", "cat"], &data, t)?;
    ensure!(
        cat.status.success() && cat.stdout == data,
        "1 MiB through cat came back as {} different bytes ({})",
        cat.stdout.len(),
        cat.status
    );
    out.push_str(&format!(
        "1 MiB through `vstreamctl exec {name} -- cat` and back, identical, in {:.2} s\n",
        started.elapsed().as_secs_f64()
    ));

    let pty = ctl(lab, &["shell", name, "-t", "--", "tty"], &[], t)?;
    let text = String::from_utf8_lossy(&pty.stdout).trim().to_owned();
    ensure!(
        pty.status.success() && text.starts_with("/dev/pts/"),
        "`vstreamctl shell -t -- tty` ({}): {text:?} {}",
        pty.status,
        String::from_utf8_lossy(&pty.stderr)
    );
    out.push_str(&format!("$ vstreamctl shell {name} -t -- tty\n{text}\n"));
    Ok(out)
}

// ---- qga ---------------------------------------------------------------------------------------

/// `vstreamctl agent lab JSON`: the `return` of the reply.
fn qga(lab: &Lab, command: &Value) -> Result<Value> {
    let text = ctl_ok(lab, &["agent", lab.name(), &command.to_string()])?;
    let reply: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("{command}: the reply is not JSON: {text:?}"))?;
    reply
        .get("return")
        .cloned()
        .ok_or_else(|| anyhow!("{command}: {reply}"))
}

fn demo_qga(lab: &Lab) -> Result<String> {
    let name = lab.name();
    let mut out = String::new();

    let info = qga(lab, &json!({"execute": "guest-info"}))?;
    let version = info["version"].as_str().unwrap_or("?");
    let commands = info["supported_commands"]
        .as_array()
        .ok_or_else(|| anyhow!("guest-info without supported_commands: {info}"))?;
    let enabled = commands.iter().filter(|c| c["enabled"] == true).count();
    ensure!(
        commands.iter().any(|c| c["name"] == "guest-file-open"),
        "guest-info lists no guest-file-open: {info}"
    );
    out.push_str(&format!(
        "$ vstreamctl agent {name} '{{\"execute\":\"guest-info\"}}'\n  version {version}, {} commands ({enabled} enabled)\n",
        commands.len()
    ));

    let os = qga(lab, &json!({"execute": "guest-get-osinfo"}))?;
    let kernel = os["kernel-release"].as_str().unwrap_or("");
    ensure!(
        os["machine"] == "x86_64" && kernel == lab.image().kernel.version,
        "guest-get-osinfo: {os} (the guest runs {})",
        lab.image().kernel.version
    );
    out.push_str(&format!(
        "$ vstreamctl agent {name} '{{\"execute\":\"guest-get-osinfo\"}}'\n  {}\n",
        serde_json::to_string(&os)?
    ));
    let host = qga(lab, &json!({"execute": "guest-get-host-name"}))?;
    ensure!(host["host-name"] == name, "guest-get-host-name: {host}");

    // cp both ways, checksums on both sides.
    let dir = &demo_host()?.dir;
    let (src, back) = (dir.join("cp.src"), dir.join("cp.back"));
    let len = 8 << 20;
    std::fs::write(&src, pseudo_random(len, 42)).context("writing the file to copy")?;
    let remote = "/tmp/vstream-demo.bin";
    let dest = format!("{name}:{remote}");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let t = Instant::now();
    ctl_ok(lab, &["cp", &path(&src), &dest])?;
    let up = t.elapsed();
    let sum = sha256_host(Some(&src), &[])?;
    let guest_sum = first_word(&guest_sh(lab, &format!("sha256sum {remote}"))?)?;
    ensure!(
        guest_sum == sum,
        "in the guest {remote} has SHA-256 {guest_sum}, the host's file {sum}"
    );
    let t = Instant::now();
    ctl_ok(lab, &["cp", &dest, &path(&back)])?;
    let down = t.elapsed();
    let back_sum = sha256_host(Some(&back), &[])?;
    ensure!(
        back_sum == sum,
        "the copy back has SHA-256 {back_sum}, the original {sum}"
    );
    let _ = guest_sh(lab, &format!("rm -f {remote}"));
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&back);
    let mib = (len >> 20) as f64;
    out.push_str(&format!(
        "$ vstreamctl cp cp.src {dest}    # {mib} MiB in {:.2} s ({:.1} MiB/s)\n\
         $ vstreamctl cp {dest} cp.back   # in {:.2} s ({:.1} MiB/s)\n\
         sha256: host file, guest file (sha256sum via exec) and the copy back all {}\n",
        up.as_secs_f64(),
        mib / up.as_secs_f64(),
        down.as_secs_f64(),
        mib / down.as_secs_f64(),
        &sum[..16]
    ));

    let sync = ctl_ok(lab, &["time-sync", name])?;
    ensure!(
        sync.starts_with(&format!("{name}: clock was ")),
        "time-sync said {sync:?}"
    );
    out.push_str(&format!("$ vstreamctl time-sync {name}\n{sync}"));
    Ok(out)
}

// ---- random ------------------------------------------------------------------------------------

fn raw_random(status: &Value, guest: &str) -> Option<Value> {
    guest_status(status, guest)?["transports"]
        .as_array()?
        .iter()
        .find(|t| t["kind"] == "random-raw")
        .cloned()
}

fn raw_random_bytes(lab: &Lab) -> Result<u64> {
    let s = lab.status()?;
    raw_random(&s, lab.name())
        .and_then(|t| t["bytes_out"].as_u64())
        .ok_or_else(|| anyhow!("no random-raw transport with bytes_out in {s}"))
}

fn demo_random(lab: &Lab) -> Result<String> {
    let mut out = String::new();
    // 1. The channel: the agent credited host entropy to the guest kernel's pool at start.
    let fed = "random: fed the kernel's pool at start";
    lab.wait_for_console("ttyS0", fed, Duration::from_secs(60))?;
    let log = lab.guest_console_log();
    ensure!(
        !log.contains("cannot feed the kernel's entropy pool"),
        "the agent could not feed the kernel's pool"
    );
    let line = log.lines().find(|l| l.contains(fed)).unwrap_or_default();
    out.push_str(&format!("agent (ttyS0): {}\n", strip_ansi(line).trim()));
    let status = lab.status()?;
    let dev = device_status(&status, lab.name(), "random");
    ensure!(
        dev["rate"] == RANDOM_RATE && dev["channel_bytes"].as_u64().unwrap_or(0) >= 64,
        "status devices.random: {dev}"
    );
    out.push_str(&format!("vstreamctl status: devices.random = {dev}\n"));
    let pool = guest_sh(
        lab,
        "cat /proc/sys/kernel/random/entropy_avail /proc/sys/kernel/random/poolsize",
    )?;
    let nums: Vec<u64> = pool
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        nums.len() == 2 && nums[0] >= nums[1] && nums[1] > 0,
        "the guest's pool is not full: entropy_avail, poolsize = {pool:?}"
    );
    out.push_str(&format!(
        "guest: entropy_avail {} of poolsize {} bits\n",
        nums[0], nums[1]
    ));

    // 2. The raw port: vstreamd writes to it as fast as the budget allows while the guest reads.
    lab.wait_for("the random-raw transport to be up", UP_TIMEOUT, |s| {
        raw_random(s, lab.name()).is_some_and(|t| t["state"] == "up")
    })?;
    let script = format!("timeout 7 cat /dev/virtio-ports/{RANDOM_PORT} | wc -c");
    let (rate, read) = thread::scope(|scope| -> Result<(f64, u64)> {
        let reader = scope.spawn(|| guest_sh(lab, &script));
        // The socket's backlog and the burst go in the first seconds; then the rate shows.
        thread::sleep(Duration::from_millis(2500));
        let (t0, b0) = (Instant::now(), raw_random_bytes(lab)?);
        thread::sleep(Duration::from_secs(3));
        let (t1, b1) = (Instant::now(), raw_random_bytes(lab)?);
        let text = reader
            .join()
            .map_err(|_| anyhow!("the reader thread panicked"))??;
        let read = text.trim().parse::<u64>().unwrap_or(0);
        Ok(((b1 - b0) as f64 / (t1 - t0).as_secs_f64(), read))
    })?;
    let error = (rate - RANDOM_RATE as f64) / RANDOM_RATE as f64;
    out.push_str(&format!(
        "guest: `timeout 7 cat /dev/virtio-ports/{RANDOM_PORT} | wc -c` read {read} bytes\n\
         vstreamd wrote {rate:.0} B/s to the raw port over 3 s of that (configured rate \
         {RANDOM_RATE} B/s, {:+.1}%)\n",
        error * 100.0
    ));
    ensure!(
        error.abs() < 0.15,
        "{rate:.0} B/s delivered against a rate of {RANDOM_RATE} B/s"
    );
    ensure!(
        read >= 3 * RANDOM_RATE,
        "the guest read only {read} bytes in 7 s"
    );
    Ok(out)
}

// ---- hid ---------------------------------------------------------------------------------------

/// The US-layout character of key `code` (linux/input-event-codes.h), with or without Shift.
fn key_char(code: u16, shift: bool) -> Option<char> {
    let pick = |row: &str, shifted: &str, i: usize| {
        let s = if shift { shifted } else { row };
        s.chars().nth(i)
    };
    match code {
        2..=11 => pick("1234567890", "!@#$%^&*()", usize::from(code - 2)),
        12 => pick("-", "_", 0),
        13 => pick("=", "+", 0),
        15 => Some('\t'),
        16..=25 => pick("qwertyuiop", "QWERTYUIOP", usize::from(code - 16)),
        26 => pick("[", "{", 0),
        27 => pick("]", "}", 0),
        28 => Some('\n'),
        30..=38 => pick("asdfghjkl", "ASDFGHJKL", usize::from(code - 30)),
        39 => pick(";", ":", 0),
        40 => pick("'", "\"", 0),
        41 => pick("`", "~", 0),
        43 => pick("\\", "|", 0),
        44..=50 => pick("zxcvbnm", "ZXCVBNM", usize::from(code - 44)),
        51 => pick(",", "<", 0),
        52 => pick(".", ">", 0),
        53 => pick("/", "?", 0),
        57 => Some(' '),
        _ => None,
    }
}

/// Turns evtest's `EV_KEY code value` lines back into the text they type.
fn decode_keys(evtest: &str) -> String {
    let mut shift = false;
    let mut text = String::new();
    for line in evtest.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ["EV_KEY", code, value] = f[..] else {
            continue;
        };
        let (Ok(code), Ok(value)) = (code.parse::<u16>(), value.parse::<i32>()) else {
            continue;
        };
        match (code, value) {
            (42 | 54, v) => shift = v != 0,
            (c, 1) => text.extend(key_char(c, shift).or(Some('\u{fffd}'))),
            _ => {}
        }
    }
    text
}

fn demo_hid(lab: &Lab) -> Result<String> {
    let name = lab.name();
    let text = "Hello, vstream 42!\n";
    // Two reports a character, four with Shift.
    let reports: usize = text
        .chars()
        .map(|c| {
            if c.is_ascii_uppercase() || "!@#$%^&*()_+{}|:\"<>?~".contains(c) {
                4
            } else {
                2
            }
        })
        .sum();
    let mut out = String::new();
    // The first keyboard report creates the guest's uinput keyboard.
    ctl_ok(lab, &["input", name, "key", "shift"])?;
    let devices = guest_sh(lab, "cat /sys/class/input/*/name")?;
    ensure!(
        devices.lines().any(|l| l == "vstream keyboard"),
        "no \"vstream keyboard\" in the guest's input devices: {devices:?}"
    );
    // An evdev reader in the guest, in its own session (the tty device hangs up a command's
    // session when the command exits); this returns once it listens.
    let listening = guest_sh(
        lab,
        &format!(
            "rm -f /tmp/hid.out; setsid vstream-agent evtest 'vstream keyboard' --reports {reports} \
             --timeout 90 </dev/null >/tmp/hid.out 2>&1 & \
             i=0; until grep -q listening /tmp/hid.out; do i=$((i+1)); \
             [ $i -lt 300 ] || {{ cat /tmp/hid.out; exit 1; }}; sleep 0.1; done; cat /tmp/hid.out"
        ),
    )?;
    out.push_str(&format!(
        "guest: vstream-agent evtest 'vstream keyboard': {}\n",
        listening.trim()
    ));
    let started = Instant::now();
    ctl_ok(lab, &["input", name, "type", text])?;
    let took = started.elapsed();
    out.push_str(&format!(
        "$ vstreamctl input {name} type {text:?}   # returned in {:.0} ms, once the guest wrote the last report\n",
        took.as_secs_f64() * 1000.0
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = guest_sh(lab, "cat /tmp/hid.out")?;
        if seen.contains("done:") {
            break seen;
        }
        ensure!(
            Instant::now() < deadline,
            "the reader in the guest did not finish: {seen}"
        );
        thread::sleep(Duration::from_millis(300));
    };
    let keys = seen.lines().filter(|l| l.starts_with("EV_KEY")).count();
    let typed = decode_keys(&seen);
    let done = seen
        .lines()
        .find(|l| l.starts_with("done:"))
        .unwrap_or_default();
    out.push_str(&format!(
        "guest evdev reader: {done}, {keys} key events, which type {typed:?}\n"
    ));
    ensure!(
        done == format!("done: {reports} reports"),
        "expected {reports} reports: {seen}"
    );
    ensure!(
        typed == text,
        "the guest read {typed:?}, {text:?} was typed:\n{seen}"
    );
    Ok(out)
}

// ---- printer -----------------------------------------------------------------------------------

/// A one-page PDF that says `text`, with a correct cross-reference table.
fn tiny_pdf(text: &str) -> Vec<u8> {
    let content = format!("BT /F1 24 Tf 72 720 Td ({text}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_owned(),
        format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        pdf.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    pdf
}

fn demo_printer(lab: &Lab) -> Result<String> {
    let name = lab.name();
    let pdf = tiny_pdf("Hello from the vstream demo");
    let mut out = String::new();
    // The PDF goes into the guest on the command's stdin, then busybox nc prints it.
    let script = "cat > /tmp/demo.pdf && nc 127.0.0.1 9100 < /tmp/demo.pdf; echo nc-rc=$?; \
                  sha256sum /tmp/demo.pdf";
    let printed = ctl(
        lab,
        &["exec", name, "--", "sh", "-c", script],
        &pdf,
        Duration::from_secs(90),
    )?;
    let stdout = String::from_utf8_lossy(&printed.stdout).into_owned();
    ensure!(
        printed.status.success() && stdout.contains("nc-rc=0"),
        "printing with nc in the guest: {stdout} {}",
        String::from_utf8_lossy(&printed.stderr)
    );
    out.push_str(&format!(
        "guest: nc 127.0.0.1 9100 < /tmp/demo.pdf ({} bytes) -> {}",
        pdf.len(),
        stdout.lines().next().unwrap_or_default()
    ));
    out.push('\n');
    let guest_sum = stdout
        .lines()
        .find(|l| l.contains("/tmp/demo.pdf"))
        .map(first_word)
        .transpose()?
        .unwrap_or_default();

    let jobs: Value = serde_json::from_str(&ctl_ok(lab, &["jobs", name, "--json"])?)
        .context("vstreamctl jobs --json")?;
    let job = jobs
        .as_array()
        .and_then(|j| j.iter().rev().find(|j| j["size"] == pdf.len()))
        .cloned()
        .ok_or_else(|| anyhow!("no job of {} bytes in {jobs}", pdf.len()))?;
    ensure!(
        job["state"] == "done" && job["type"] == "pdf",
        "the job is not a finished PDF: {job}"
    );
    let file = job["file"]
        .as_str()
        .ok_or_else(|| anyhow!("job without a file: {job}"))?;
    let spooled = lab.paths().state_dir.join(name).join("spool").join(file);
    let data = std::fs::read(&spooled).with_context(|| format!("reading {}", spooled.display()))?;
    ensure!(
        data == pdf,
        "{} differs from the PDF printed ({} bytes vs {})",
        spooled.display(),
        data.len(),
        pdf.len()
    );
    let host_sum = sha256_host(Some(&spooled), &[])?;
    ensure!(
        host_sum == guest_sum,
        "SHA-256 in the guest {guest_sum}, in the spool {host_sum}"
    );
    out.push_str(&format!("$ vstreamctl jobs {name}\n"));
    out.push_str(&ctl_ok(lab, &["jobs", name])?);
    out.push_str(&format!(
        "spool: {} is byte-identical to the guest's file (sha256 {})\n",
        spooled.display(),
        &host_sum[..16]
    ));
    Ok(out)
}

// ---- ppp ---------------------------------------------------------------------------------------

/// A listening TCP socket made inside network namespace `netns` (a socket keeps its namespace).
fn listen_in_netns(netns: &str, addr: Ipv4Addr) -> Result<TcpListener> {
    let file = File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    thread::spawn(move || -> Result<TcpListener> {
        // SAFETY: setns takes an open descriptor (kept open by `file` for the call) and a
        // namespace type; it moves only this short-lived thread into the namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(TcpListener::bind((addr, 0))?)
    })
    .join()
    .map_err(|_| anyhow!("the namespace thread panicked"))?
}

/// Accepts one connection within `timeout` and reads it to the end.
fn receive_one(listener: TcpListener, timeout: Duration) -> thread::JoinHandle<Result<Vec<u8>>> {
    thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(anyhow!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut data = Vec::new();
        stream.read_to_end(&mut data)?;
        Ok(data)
    })
}

fn demo_ppp(lab: &Lab) -> Result<String> {
    let netns = demo_host()?.netns.clone().map_err(|e| anyhow!(e))?;
    let mut out = String::new();
    let status = lab.wait_for("the PPP link to be up", UP_TIMEOUT, |s| {
        device_status(s, lab.name(), "ppp")["state"] == "up"
    })?;
    let ppp = device_status(&status, lab.name(), "ppp");
    let iface = ppp["interface"].as_str().unwrap_or("?").to_owned();
    out.push_str(&format!(
        "vstreamctl status: devices.ppp state {}, interface {iface} in netns {netns}, links {}\n",
        ppp["state"], ppp["links"]
    ));
    let host_addr = Command::new("ip")
        .args([
            "netns", "exec", &netns, "ip", "-4", "addr", "show", "dev", &iface,
        ])
        .output()
        .context("ip netns exec")?;
    let host_addr = String::from_utf8_lossy(&host_addr.stdout).into_owned();
    let want = format!("{PPP_LOCAL} peer {PPP_REMOTE}/32");
    ensure!(
        host_addr.contains(&want),
        "the host end {iface} has no {want}: {host_addr}"
    );
    let guest_addr = guest_sh(lab, "ip -4 addr show dev ppp0")?;
    ensure!(
        guest_addr.contains(&format!("inet {PPP_REMOTE} peer {PPP_LOCAL}")),
        "ppp0 in the guest: {guest_addr}"
    );
    let inet = |t: &str| {
        t.lines()
            .find(|l| l.trim_start().starts_with("inet "))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    out.push_str(&format!(
        "host  {iface}: {}\nguest ppp0: {}\n",
        inet(&host_addr),
        inet(&guest_addr)
    ));

    let ping = guest_sh(lab, &format!("ping -c 5 -i 0.2 {PPP_LOCAL}"))?;
    ensure!(ping.contains("5 packets received"), "{ping}");
    out.push_str(&format!("guest: ping -c 5 -i 0.2 {PPP_LOCAL}\n"));
    for line in ping
        .lines()
        .filter(|l| l.contains("packets") || l.contains("round-trip"))
    {
        out.push_str(&format!("  {line}\n"));
    }

    // 1 MiB of TCP from the guest to a listener on the host end of the link.
    let len = 1 << 20;
    let made = guest_sh(
        lab,
        &format!("head -c {len} /dev/urandom > /tmp/ppp.bin && sha256sum /tmp/ppp.bin"),
    )?;
    let sum = first_word(&made)?;
    let listener = listen_in_netns(&netns, PPP_LOCAL.parse()?)?;
    let port = listener.local_addr()?.port();
    let rx = receive_one(listener, Duration::from_secs(60));
    let started = Instant::now();
    let sent = guest_sh(lab, &format!("nc {PPP_LOCAL} {port} < /tmp/ppp.bin"));
    let got = rx
        .join()
        .map_err(|_| anyhow!("the receiver panicked"))?
        .context("receiving on the host end")?;
    let took = started.elapsed();
    sent?;
    ensure!(got.len() == len, "{} of {len} bytes arrived", got.len());
    ensure!(
        sha256_host(None, &got)? == sum,
        "the bytes changed on the way"
    );
    out.push_str(&format!(
        "guest: nc {PPP_LOCAL} {port} < /tmp/ppp.bin: 1 MiB arrived on the host end intact \
         (sha256 {}) in {:.2} s ({:.2} MiB/s)\n",
        &sum[..16],
        took.as_secs_f64(),
        1.0 / took.as_secs_f64()
    ));
    Ok(out)
}

// ---- watchdog ----------------------------------------------------------------------------------

fn agent_pid(lab: &Lab) -> Result<String> {
    Ok(guest_sh(lab, "cat /run/vstream-agent.pid")?
        .trim()
        .to_owned())
}

fn demo_watchdog(lab: &Lab) -> Result<String> {
    let ev = events()?;
    let name = lab.name();
    let mut out = String::new();
    // Heartbeats on: the agent reads `vstream.watchdog=` from /proc/cmdline; give it a command
    // line with the setting and restart it (init respawns it).
    let from = ev.len();
    hvc0_once(
        lab,
        "wd-on",
        &format!(
            "tr -d '\\n' </proc/cmdline >/run/cmdline; \
             echo ' vstream.watchdog={WATCHDOG_INTERVAL}' >>/run/cmdline; \
             mount -o bind /run/cmdline /proc/cmdline; kill -TERM $(cat /run/vstream-agent.pid)"
        ),
    )?;
    let (_, _, armed) = ev.wait(from, "watchdog-armed", UP_TIMEOUT)?;
    out.push_str(&format!(
        "hvc0: vstream.watchdog={WATCHDOG_INTERVAL} added to the agent's command line, agent \
         restarted  ->  event watchdog-armed, interval {} ms\n",
        armed["interval_ms"]
    ));
    let status = lab.wait_for("the watchdog armed", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s) && device_status(s, name, "watchdog")["state"] == "armed"
    })?;
    let w = device_status(&status, name, "watchdog");
    ensure!(
        w["fired"] == 0 && w["heartbeats"].as_u64().unwrap_or(0) > 0,
        "before the demo: {w}"
    );
    out.push_str(&format!(
        "vstreamctl status: devices.watchdog state {}, timeout {} ms, action {}, interval {} ms, \
         {} heartbeats, fired {}\n",
        w["state"], w["timeout_ms"], w["action"], w["interval_ms"], w["heartbeats"], w["fired"]
    ));

    // 1. A clean stop (SIGTERM; init told not to restart the agent): disarmed, nothing fires.
    let pid = agent_pid(lab)?;
    let from = ev.len();
    hvc0_once(
        lab,
        "wd-term",
        "touch /run/vstream-agent.norespawn; kill -TERM $(cat /run/vstream-agent.pid)",
    )?;
    let (i, _, disarmed) = ev.wait(from, "watchdog-disarmed", Duration::from_secs(30))?;
    out.push_str(&format!(
        "hvc0: kill -TERM {pid} (the agent)  ->  event watchdog-disarmed, reason {}\n",
        disarmed["reason"]
    ));
    let quiet = Duration::from_millis(WATCHDOG_TIMEOUT_MS + 2000);
    thread::sleep(quiet);
    let fired: Vec<Value> = ev
        .snapshot()
        .into_iter()
        .skip(i)
        .map(|(_, v)| v)
        .filter(|v| v["event"] == "watchdog-pretimeout" || v["event"] == "watchdog-fired")
        .collect();
    ensure!(
        fired.is_empty(),
        "a clean stop fired the watchdog: {fired:?}"
    );
    let w = device_status(&lab.status()?, name, "watchdog");
    ensure!(
        w["state"] == "disarmed" && w["fired"] == 0,
        "after a clean stop: {w}"
    );
    out.push_str(&format!(
        "no agent for {:.0} s (timeout {WATCHDOG_TIMEOUT_MS} ms): nothing fired, state {}\n",
        quiet.as_secs_f64(),
        w["state"]
    ));

    // Init starts the agent again: re-armed.
    let from = ev.len();
    hvc0_once(lab, "wd-back1", "rm -f /run/vstream-agent.norespawn")?;
    let (_, _, armed) = ev.wait(from, "watchdog-armed", UP_TIMEOUT)?;
    ensure!(armed["rearmed"] == true, "{armed}");
    out.push_str("init restarted the agent  ->  event watchdog-armed, rearmed true\n");

    // 2. kill -9: no disarm; with action "log" vstreamd fires within the timeout.
    lab.wait_for("the agent up again", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })?;
    let pid = agent_pid(lab)?;
    let from = ev.len();
    let typed = Instant::now();
    hvc0_once(
        lab,
        "wd-kill",
        "touch /run/vstream-agent.norespawn; kill -KILL $(cat /run/vstream-agent.pid)",
    )?;
    let (_, t_pre, pre) = ev.wait(from, "watchdog-pretimeout", Duration::from_secs(30))?;
    let (_, t_fired, fired) = ev.wait(from, "watchdog-fired", Duration::from_secs(30))?;
    let (_, _, action) = ev.wait(from, "watchdog-action", Duration::from_secs(30))?;
    let since = fired["since_heartbeat_ms"]
        .as_u64()
        .ok_or_else(|| anyhow!("watchdog-fired without since_heartbeat_ms: {fired}"))?;
    out.push_str(&format!(
        "hvc0: kill -KILL {pid}  ->  watchdog-pretimeout at {} ms, watchdog-fired {since} ms after \
         the last heartbeat ({} ms after the kill was typed), watchdog-action {} ok={}: {}\n",
        pre["since_heartbeat_ms"],
        t_fired.duration_since(typed).as_millis(),
        action["action"],
        action["ok"],
        action["detail"]
    ));
    ensure!(
        (WATCHDOG_TIMEOUT_MS..=WATCHDOG_TIMEOUT_MS + 1000).contains(&since),
        "fired {since} ms after the last heartbeat (timeout {WATCHDOG_TIMEOUT_MS} ms)"
    );
    ensure!(t_pre <= t_fired, "the pre-timeout came after the firing");
    ensure!(
        action["action"] == "log" && action["ok"] == true,
        "{action}"
    );
    let w = device_status(&lab.status()?, name, "watchdog");
    ensure!(w["state"] == "fired" && w["fired"] == 1, "{w}");

    // The agent comes back through init's respawn and re-arms the watchdog.
    let from = ev.len();
    hvc0_once(lab, "wd-back2", "rm -f /run/vstream-agent.norespawn")?;
    let (_, _, armed) = ev.wait(from, "watchdog-armed", UP_TIMEOUT)?;
    ensure!(armed["rearmed"] == true, "{armed}");
    let (_, _, up) = ev.wait(from, "agent-up", UP_TIMEOUT)?;
    let status = lab.wait_for("the agent's transports up again", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s) && device_status(s, name, "watchdog")["state"] == "armed"
    })?;
    let new_pid = agent_pid(lab)?;
    ensure!(new_pid != pid, "the agent's pid is still {pid}");
    let w = device_status(&status, name, "watchdog");
    out.push_str(&format!(
        "init respawned the agent (pid {new_pid})  ->  agent-up new_session {}, watchdog-armed \
         rearmed true; status: state {}, fired {}\n",
        up["new_session"], w["state"], w["fired"]
    ));
    Ok(out)
}

// ---- events ------------------------------------------------------------------------------------

fn demo_events(_lab: &Lab) -> Result<String> {
    let ev = events()?;
    let alive = ev.running();
    // Let the last events (the agent's return) arrive.
    thread::sleep(Duration::from_millis(500));
    ev.stop();
    ensure!(alive, "`vstreamctl events --json` ended early");
    let seen = ev.snapshot();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (_, v) in &seen {
        *kinds
            .entry(v["event"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let mut out = format!(
        "vstreamctl events --json: {} events in {:.0} s of demos\n",
        seen.len(),
        ev.started.elapsed().as_secs_f64()
    );
    for (kind, n) in &kinds {
        out.push_str(&format!("  {n:>4}  {kind}\n"));
    }
    for kind in ["shell-closed", "print-job", "ppp-up", "watchdog-fired"] {
        if let Some((_, v)) = seen.iter().find(|(_, v)| v["event"] == kind) {
            out.push_str(&format!("e.g. {v}\n"));
        }
    }
    // What the demos above did must have been reported.
    let expected = [
        "shell-opened",
        "shell-closed",
        "channel-opened",
        "channel-closed",
        "print-job",
        "ppp-up",
        "watchdog-disarmed",
        "watchdog-armed",
        "watchdog-pretimeout",
        "watchdog-fired",
        "watchdog-action",
        "agent-up",
    ];
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|k| !kinds.contains_key(*k))
        .collect();
    ensure!(
        missing.is_empty(),
        "events the demos caused but vstreamctl events did not show: {missing:?}"
    );
    ensure!(
        !kinds.contains_key("lagged"),
        "vstreamctl events lagged and missed events"
    );
    Ok(out)
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
