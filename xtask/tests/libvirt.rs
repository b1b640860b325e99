//! vstream-agent as a drop-in for qemu-ga under a real libvirtd: one TCG domain (the lab's kernel
//! and initramfs, a `<channel type='unix'>` on `org.qemu.guest_agent.0`) is booted twice, once
//! with Debian's qemu-ga on that port and once with vstream-agent started by the very same
//! command line (under the name `qemu-ga`). Every agent-backed virsh command runs against both;
//! the two columns are printed side by side, and vstream-agent must answer every command that
//! qemu-ga answers.
//!
//! A second test installs the host package's libvirt hook (packaging/libvirt-hook) and boots a
//! domain with an `org.vstream.0` channel: the hook attaches vstreamd to it (and its Unix-socket
//! console), `vstreamctl` reaches the guest by the domain's name, and after `virsh destroy` the
//! guest is gone from vstreamd.
//!
//! Needs libvirt-daemon, libvirt-clients and libvirt-daemon-driver-qemu (`./x.sh setup` installs
//! them and prepares libvirt for a container: see x.sh) and root. virtlogd and libvirtd are
//! started here when they are not running. Never skips silently: without them it fails, unless
//! VSTREAM_SKIP_E2E=1 is set.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use xtask::image::{ensure_image, INIT_DONE_MARKER};
use xtask::lab;
use xtask::qga_lab::QGA_PORT;

const URI: &str = "qemu:///system";
/// Boot to `/init`'s marker, under TCG on a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// From the start line typed on hvc0 to the first answered `guest-ping`.
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);
/// One virsh command.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);

/// qemu-ga's start line in the lab (xtask::qga_lab::START_QEMU_GA's options), with `{}` for the
/// program.
const START_LINE: &str = "{} -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -d -f /run/qemu-ga.pid -t /run";

/// `virsh ARGS` (within [`VIRSH_TIMEOUT`]).
fn virsh(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(VIRSH_TIMEOUT.as_secs().to_string())
        .arg("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

/// The host package's hook as these tests install it: for this vstreamctl, and for a vstreamd
/// whose control socket is [`hook_dir`]`/control.sock`.
const HOOK: &str = "/etc/libvirt/hooks/qemu.d/vstream-test";

/// Where the hook test runs its vstreamd.
fn hook_dir() -> PathBuf {
    std::env::temp_dir().join("vstream-libvirt-hook")
}

/// The tests share one libvirtd, and two TCG domains at once would only slow each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// virtlogd and libvirtd, started unless libvirtd already answers. libvirtd looks for hooks
/// only when it starts, so the hook is installed first, whichever test comes first; it stays
/// (it does nothing while no vstreamd serves its control socket).
fn ensure_libvirtd() {
    let script =
        std::fs::read_to_string(xtask::paths::workspace_root().join("packaging/libvirt-hook"))
            .expect("packaging/libvirt-hook");
    assert!(
        script.contains("exec /usr/bin/vstreamctl libvirt-hook"),
        "{script}"
    );
    let ours = format!(
        "/usr/bin/env VSTREAM_CONTROL={} {}",
        hook_dir().join("control.sock").display(),
        xtask::paths::host_bin("vstreamctl").display()
    );
    let hook = Path::new(HOOK);
    std::fs::create_dir_all(hook.parent().expect("hooks dir")).expect("libvirt's hook directory");
    std::fs::write(hook, script.replace("/usr/bin/vstreamctl", &ours)).expect("install the hook");
    std::fs::set_permissions(hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the hook");
    if virsh(&["version"]).status.success() {
        return;
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let status = Command::new(daemon).arg("-d").status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "{daemon} -d: {status:?} (./x.sh setup installs and prepares libvirt)"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !virsh(&["version"]).status.success() {
        assert!(Instant::now() < deadline, "libvirtd does not answer");
        thread::sleep(Duration::from_millis(200));
    }
}

/// A transient domain, destroyed when dropped.
struct Domain {
    name: String,
    dir: PathBuf,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

impl Domain {
    /// Boots the lab's image under libvirt and waits for `/init`.
    fn boot(tag: &str) -> Domain {
        Domain::boot_with(tag, "", "")
    }

    /// [`Domain::boot`] with more on the kernel command line and more devices (`{dir}` in
    /// `devices` is the domain's directory).
    fn boot_with(tag: &str, cmdline: &str, devices: &str) -> Domain {
        let image = ensure_image().expect("guest image");
        let name = format!("vstream-libvirt-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("domain dir");
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 console=hvc0 panic=-1 printk.devkmsg=on vstream.name={tag} {cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{dir}/ttyS0.log'/><target port='0'/></serial>
    <console type='unix'><source mode='bind' path='{dir}/hvc0.sock'/><target type='virtio' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='{dir}/qga.sock'/>
      <target type='virtio' name='{QGA_PORT}'/>
    </channel>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>
",
            kernel = image.vmlinuz.display(),
            initrd = image.initramfs.display(),
            dir = dir.display(),
            devices = devices.replace("{dir}", &dir.to_string_lossy()),
        );
        let file = dir.join("domain.xml");
        std::fs::write(&file, xml).expect("domain xml");
        let out = virsh(&["create", &file.to_string_lossy()]);
        assert!(out.status.success(), "virsh create: {}", text(&out));
        let domain = Domain { name, dir };
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !domain.serial_log().contains(INIT_DONE_MARKER) {
            assert!(
                Instant::now() < deadline,
                "{}: no {INIT_DONE_MARKER:?} within {BOOT_TIMEOUT:?}:\n{}",
                domain.name,
                domain.serial_log()
            );
            thread::sleep(Duration::from_millis(500));
        }
        domain
    }

    fn serial_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ttyS0.log")).unwrap_or_default()
    }

    /// Types a line into the guest's shell on hvc0.
    fn type_line(&self, line: &str) {
        let mut hvc0 = UnixStream::connect(self.dir.join("hvc0.sock")).expect("hvc0");
        hvc0.write_all(format!("{line}\r").as_bytes())
            .expect("type");
        // Let the shell read it before the connection goes.
        hvc0.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let _ = hvc0.read(&mut [0u8; 4096]);
    }

    /// Where the guest ends up after a suspend virsh reported as done. libvirt reports it once
    /// the agent's port closes (the guest's devices are freezing), before the guest is asleep:
    /// waits until libvirt sees the domain `pmsuspended` (S3 reached), or the agent answers a
    /// ping again (the guest thawed: the suspend failed in the guest, as S4 does with no swap).
    fn settle(&self) -> String {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let state = text(&virsh(&["domstate", &self.name])).trim().to_owned();
            if state != "running" {
                return state;
            }
            let ping = virsh(&[
                "qemu-agent-command",
                "--timeout",
                "5",
                &self.name,
                r#"{"execute":"guest-ping"}"#,
            ]);
            if ping.status.success() {
                return "running, the agent answers".to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{}: neither pmsuspended nor answering within {AGENT_TIMEOUT:?} of a suspend",
                self.name
            );
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Starts an agent with `program` and waits for libvirt to reach it.
    fn start_agent(&self, program: &str) {
        // The image's own vstream-agent has nothing to connect to here: keep it from respawning.
        let start = START_LINE.replace("{}", program);
        self.type_line(&format!("touch /run/vstream-agent.norespawn; {start}"));
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let out = virsh(&[
                "qemu-agent-command",
                &self.name,
                r#"{"execute":"guest-ping"}"#,
            ]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{program}: no answer to guest-ping within {AGENT_TIMEOUT:?}: {}\n{}",
                text(&out),
                self.serial_log()
            );
            thread::sleep(Duration::from_secs(1));
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The agent-backed virsh commands of Debian 12's virsh (9.0), `{}` for the domain and `{keys}`
/// for a file of SSH keys, in the order they run (the ones that change the guest last).
const COMMANDS: &[&str] = &[
    r#"qemu-agent-command {} {"execute":"guest-ping"}"#,
    r#"qemu-agent-command {} {"execute":"guest-get-memory-block-info"}"#,
    r#"qemu-agent-command {} {"execute":"guest-get-memory-blocks"}"#,
    "domtime {}",
    "domtime {} --pretty",
    "domhostname {} --source agent",
    "domifaddr {} --source agent",
    "domfsinfo {}",
    "guestinfo {}",
    "guestinfo {} --user",
    "guestinfo {} --os",
    "guestinfo {} --timezone",
    "guestinfo {} --hostname",
    "guestinfo {} --filesystem",
    "guestinfo {} --disk",
    "guestinfo {} --interface",
    "guestvcpus {}",
    "get-user-sshkeys {} root",
    "set-user-sshkeys {} root --file {keys}",
    "set-user-sshkeys {} root --remove --file {keys}",
    "domfsfreeze {}",
    "domfsthaw {}",
    "domfstrim {}",
    "domtime {} --now",
    "domtime {} --sync",
    "guestvcpus {} --cpulist 1 --disable",
    "guestvcpus {} --cpulist 1 --enable",
    "setvcpus {} 1 --guest",
    "set-user-password {} root vstream-secret",
    // Each suspend mode, then a wakeup and a ping (retried while the guest resumes). A suspend
    // virsh reports as done is followed until the guest has settled (see `settle`), so that the
    // wakeup never races the guest's way into S3. Under TCG S3 works and S4 fails for want of
    // swap: the rows, with where the guest settled, must come out the same for both agents.
    "dompmsuspend {} mem",
    "dompmwakeup {}",
    AFTER_WAKEUP,
    "dompmsuspend {} disk",
    "dompmwakeup {}",
    AFTER_WAKEUP,
    "dompmsuspend {} hybrid",
    "dompmwakeup {}",
    AFTER_WAKEUP,
    "shutdown {} --mode agent",
];

/// The ping after a wakeup: retried for up to [`AGENT_TIMEOUT`], as a resuming guest may take
/// a while to answer again.
const AFTER_WAKEUP: &str = r#"qemu-agent-command {} {"execute":"guest-ping"} (retried)"#;

/// Whether a row must come out the same for both agents (success, or the same error): the
/// suspend rows, where either outcome is acceptable under TCG but the agents must agree.
fn must_agree(cmd: &str) -> bool {
    cmd.starts_with("dompm") || cmd == AFTER_WAKEUP
}

/// A suspend the guest tried and gave up (S4 with no swap: the guest froze its devices, then
/// thawed and the agent answers again). What virsh reports for it is a race inside libvirtd,
/// whatever the agent: the agent's error reply ("child process has failed to suspend") arrives
/// on the agent's socket, while the closing of the port during the freeze reaches libvirtd as
/// a QMP event handled on a worker thread; whichever is handled first makes virsh report
/// failure or success. Seen with qemu-ga both ways.
fn failed_in_guest(a: &Answer) -> bool {
    settled(a).starts_with("running") && (a.ok || a.all.contains("failed to suspend"))
}

/// Whether both agents did the same for a row of [`must_agree`]: the same virsh outcome (and
/// the same error), and for a suspend the guest settled in the same place; a suspend that
/// failed in the guest with both agents agrees whatever libvirtd made of it.
fn agree(cmd: &str, q: &Answer, v: &Answer) -> bool {
    if cmd.starts_with("dompmsuspend") {
        if settled(q) != settled(v) {
            return false;
        }
        if failed_in_guest(q) && failed_in_guest(v) {
            return true;
        }
    }
    q.ok == v.ok && (q.ok || q.all == v.all)
}

/// One command's result: whether virsh succeeded, its first line of output, and all of it (the
/// domain's name replaced by `DOM`, as it differs between the two boots).
struct Answer {
    ok: bool,
    line: String,
    all: String,
}

/// Boots the domain with `program` as the agent and runs every command.
fn run_all(tag: &str, program: &str) -> Vec<Answer> {
    let domain = Domain::boot(tag);
    let keys = domain.dir.join("authorized_keys");
    std::fs::write(
        &keys,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJwzn1rOkPyP7vJv1D6lnd5qi4Bq0jRrHUQM3Qx0nKwD lab\n",
    )
    .expect("keys file");
    domain.start_agent(program);
    COMMANDS
        .iter()
        .map(|c| {
            let retried = *c == AFTER_WAKEUP;
            let line = c
                .trim_end_matches(" (retried)")
                .replace("{keys}", &keys.to_string_lossy())
                .replace("{}", &domain.name);
            let args: Vec<&str> = match line.split_once(' ') {
                // The JSON argument of qemu-agent-command is one word.
                Some((cmd, rest)) if cmd == "qemu-agent-command" => {
                    let (dom, json) = rest.split_once(' ').expect("json");
                    vec![cmd, dom, json]
                }
                _ => line.split_whitespace().collect(),
            };
            let deadline = Instant::now() + AGENT_TIMEOUT;
            let out = loop {
                let out = virsh(&args);
                if !retried || out.status.success() || Instant::now() > deadline {
                    break out;
                }
                thread::sleep(Duration::from_secs(1));
            };
            let mut raw = text(&out);
            if c.starts_with("dompmsuspend") {
                raw.push_str(&format!("\nthen: {}", domain.settle()));
            }
            eprintln!("[{tag}] virsh {c}: {}", raw.trim_end());
            let all = raw.trim().replace(&domain.name, "DOM");
            let first = all
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("---"))
                .unwrap_or("")
                .to_owned();
            Answer {
                ok: out.status.success(),
                line: first,
                all,
            }
        })
        .collect()
}

/// Where the guest settled after a suspend (the `then: ` line [`run_all`] adds).
fn settled(a: &Answer) -> &str {
    a.all
        .lines()
        .find_map(|l| l.strip_prefix("then: "))
        .unwrap_or("")
}

fn cell(a: &Answer) -> String {
    let mut line: String = a.line.chars().take(44).collect();
    if a.line.chars().count() > 44 {
        line.push('…');
    }
    format!("{} {line}", if a.ok { "ok  " } else { "FAIL" })
}

#[test]
fn virsh_answers_through_vstream_agent_as_through_qemu_ga() {
    if !lab::e2e_enabled("libvirt") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    ensure_libvirtd();
    let agent = Path::new("/usr/bin/vstream-agent");
    let qemu_ga = run_all("qemu-ga", "/usr/sbin/qemu-ga");
    // The same command line, with vstream-agent under qemu-ga's name.
    let link = format!("ln -sf {} /run/qemu-ga && /run/qemu-ga", agent.display());
    let vstream = run_all("vstream", &link);

    println!(
        "\n{:<44} | {:<50} | vstream-agent",
        "virsh (domain elided)", "Debian qemu-ga 7.2"
    );
    println!("{}", "-".repeat(160));
    let mut missing = Vec::new();
    let mut disagree = Vec::new();
    for ((raw, q), v) in COMMANDS.iter().zip(&qemu_ga).zip(&vstream) {
        let cmd = raw
            .replace("{} ", "")
            .replace(" {}", "")
            .replace("{keys}", "KEYS");
        println!("{cmd:<44} | {:<50} | {}", cell(q), cell(v));
        if q.ok && !v.ok && !(failed_in_guest(q) && failed_in_guest(v)) {
            missing.push(cmd.clone());
        }
        if must_agree(raw) && !agree(raw, q, v) {
            disagree.push(format!(
                "{cmd}: qemu-ga {:?}, vstream-agent {:?}",
                q.all, v.all
            ));
        }
    }
    for ((cmd, q), v) in COMMANDS.iter().zip(&qemu_ga).zip(&vstream) {
        if cmd.starts_with("dompmsuspend") {
            let report = |a: &Answer| if a.ok { "success" } else { "failure" };
            let outcome = format!(
                "virsh reports {} with qemu-ga, {} with vstream-agent; the guest then: {:?} / {:?}{}",
                report(q),
                report(v),
                settled(q),
                settled(v),
                if failed_in_guest(q) && failed_in_guest(v) {
                    " (the suspend failed in the guest with both)"
                } else {
                    ""
                }
            );
            println!("{}: {outcome}", cmd.replace(" {}", ""));
        }
    }
    let answered = |col: &[Answer]| col.iter().filter(|a| a.ok).count();
    println!(
        "answered: qemu-ga {}/{n}, vstream-agent {}/{n}",
        answered(&qemu_ga),
        answered(&vstream),
        n = COMMANDS.len()
    );
    assert!(
        missing.is_empty(),
        "vstream-agent failed where qemu-ga answered: {missing:?}"
    );
    assert!(
        disagree.is_empty(),
        "suspend: vstream-agent did not do what qemu-ga did: {disagree:#?}"
    );
}

/// `vstreamctl ARGS` against the control socket `control`, within [`VIRSH_TIMEOUT`].
fn vstreamctl(control: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(VIRSH_TIMEOUT.as_secs().to_string())
        .arg(xtask::paths::host_bin("vstreamctl"))
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run vstreamctl")
}

/// `vstreamctl status --json`'s guests.
fn guests(control: &Path) -> Vec<serde_json::Value> {
    let out = vstreamctl(control, &["status", "--json"]);
    assert!(out.status.success(), "vstreamctl status: {}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["guests"].as_array().cloned().unwrap_or_default()
}

/// A vstreamd process, killed when dropped.
struct Vstreamd(std::process::Child);

impl Drop for Vstreamd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_hook_attaches_vstreamd_to_a_started_domain_and_lets_go_when_it_stops() {
    if !lab::e2e_enabled("libvirt") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = hook_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let control = dir.join("control.sock");
    std::fs::write(dir.join("vstreamd.toml"), "").expect("config");
    let log = std::fs::File::create(dir.join("vstreamd.log")).expect("log");
    let _vstreamd = Vstreamd(
        Command::new(xtask::paths::host_bin("vstreamd"))
            .arg("--config")
            .arg(dir.join("vstreamd.toml"))
            .arg("--control")
            .arg(&control)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stderr(log)
            .spawn()
            .expect("vstreamd"),
    );
    ensure_libvirtd();

    let domain = Domain::boot_with(
        "hook",
        "vstream.connect=port:org.vstream.0",
        "<channel type='unix'>
      <source mode='bind' path='{dir}/vstream.sock'/>
      <target type='virtio' name='org.vstream.0'/>
    </channel>",
    );
    // The hook ran at `started`: the guest is the domain, by its name.
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let guest = loop {
        let all = guests(&control);
        if let Some(g) = all.iter().find(|g| g["name"] == domain.name.as_str()) {
            if g["connected"] == true {
                break g.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} not up in vstreamd within {AGENT_TIMEOUT:?}: {all:#?}\nvstreamd:\n{}\nguest:\n{}",
            domain.name,
            std::fs::read_to_string(dir.join("vstreamd.log")).unwrap_or_default(),
            domain.serial_log()
        );
        thread::sleep(Duration::from_secs(1));
    };
    let transports = guest["transports"].as_array().cloned().unwrap_or_default();
    assert!(
        transports.iter().any(|t| t["name"] == "hvc0"),
        "the hvc0 console is attached too: {guest:#}"
    );
    let out = vstreamctl(&control, &["status"]);
    println!("vstreamctl status:\n{}", text(&out));
    let out = vstreamctl(&control, &["exec", &domain.name, "--", "uname", "-n"]);
    assert!(out.status.success(), "exec: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hook");

    let out = virsh(&["destroy", &domain.name]);
    assert!(out.status.success(), "virsh destroy: {}", text(&out));
    // The hook runs at `stopped`, while libvirtd tears the domain down.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = guests(&control);
        if all.iter().all(|g| g["name"] != domain.name.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} still in vstreamd 30 s after virsh destroy: {all:#?}",
            domain.name
        );
        thread::sleep(Duration::from_millis(200));
    }
}
