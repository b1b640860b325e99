//! How a lab guest is wired: its options, its files and the vstreamd config that serves it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::qemu::{
    GuestSockets, HybridVsockSockets, HYBRID_VSOCK_CID, VSOCK_LISTEN_PORT, VSOCK_MUX_PORT,
};

use crate::paths;

use super::{env_secs, DEFAULT_BOOT_TIMEOUT};

/// The guest's vsock device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabVsock {
    /// In-kernel vhost-vsock when the host has `/dev/vhost-vsock` (nothing carries the mux
    /// over it), else none.
    #[default]
    None,
    /// QEMU's `vhost-user-vsock-pci` served by rust-vmm's vhost-device-vsock (started by the
    /// lab, CID [`HYBRID_VSOCK_CID`]) with its hybrid Unix-socket backend. The mux runs over it
    /// both ways: the agent connects to `vsock:2:5000` (vstreamd listens on
    /// `unix-listen:<uds>_5000`) and listens on `vsock-listen:5001` (vstreamd connects with
    /// `hvsock:<uds>:5001`).
    VhostDeviceVsock,
    /// The same QEMU device served by vstreamd itself (`vhost-user-vsock:` transport, CID
    /// [`HYBRID_VSOCK_CID`]): the agent's `vsock:2:5000` ends in vstreamd directly, and
    /// `hvsock:<uds>:5001` goes through vstreamd's own hybrid socket.
    Vstreamd,
}

/// How a lab guest is wired.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Guest name: vstreamd's `[[guest]] name`, `vstream.name=`, the hostname.
    pub name: String,
    /// Carry the mux over the virtio-serial port `org.vstream.0`.
    pub virtio_port: bool,
    /// Carry the mux over the PCI 16550 (`/dev/ttyS4` in the guest).
    pub pci_serial: bool,
    /// Start vstreamd (false: the sockets are left for the test to connect to).
    pub start_daemon: bool,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Wait for `/init`'s marker in [`Lab::boot`](super::Lab::boot).
    pub wait_for_init: bool,
    /// Limit for reaching the marker.
    pub boot_timeout: Duration,
    /// Appended to the kernel command line.
    pub extra_kernel_args: Vec<String>,
    /// Appended to the QEMU command line.
    pub extra_qemu_args: Vec<String>,
    /// Appended to the generated vstreamd config (TOML), e.g. a `[guest.printer]` table of
    /// the lab guest.
    pub extra_config: String,
    /// Also give the guest a virtio-net NIC on QEMU's user-mode network (see
    /// [`crate::qemu::QemuSpec::user_net`]).
    pub user_net: bool,
    /// QEMU CPU model instead of the accelerator's default (`host`, or
    /// [`crate::accel::TCG_CPU`]), e.g. `qemu64`
    /// for a CPU without RDRAND.
    pub cpu: Option<String>,
    /// Give the guest a virtio-rng device. Without it and without RDRAND (see [`Self::cpu`])
    /// the guest kernel's CRNG stays uninitialised long after boot, as on many real hosts.
    pub virtio_rng: bool,
    /// The guest's vsock device, and whether the mux runs over it.
    pub vsock: LabVsock,
    /// Give the guest a `vhost-user-rng-pci` device served by vstreamd (a `random-vhost-user`
    /// transport named `hwrng`, drawing from the guest's `[guest.random]` budget).
    pub vhost_rng: bool,
    /// Give the guest a `vhost-user-input-pci` keyboard served by vstreamd (a `hid-vhost-user`
    /// transport named `keyboard`): `vstreamctl input` reaches it with no agent. QEMU 7.2's
    /// device needs KVM (under TCG QEMU exits: "vhost initialization failed: requires kvm").
    pub vhost_input: bool,
    /// A shared-memory segment as an `ivshmem-plain` device; the lab removes its file when
    /// it stops.
    pub ivshmem: Option<crate::qemu::Ivshmem>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            name: "lab".to_string(),
            virtio_port: true,
            pci_serial: true,
            start_daemon: true,
            memory_mib: 512,
            wait_for_init: true,
            boot_timeout: env_secs("VSTREAM_LAB_BOOT_TIMEOUT").unwrap_or(DEFAULT_BOOT_TIMEOUT),
            extra_kernel_args: Vec::new(),
            extra_qemu_args: Vec::new(),
            extra_config: String::new(),
            user_net: false,
            cpu: None,
            virtio_rng: true,
            vsock: LabVsock::None,
            vhost_rng: false,
            vhost_input: false,
            ivshmem: None,
        }
    }
}

impl LabOptions {
    /// The mux over the virtio-serial port only.
    pub fn virtio_port_only() -> Self {
        Self {
            pci_serial: false,
            ..Self::default()
        }
    }

    /// The mux over the PCI 16550 only.
    pub fn pci_serial_only() -> Self {
        Self {
            virtio_port: false,
            ..Self::default()
        }
    }

    /// The mux over vsock only (vhost-device-vsock, both directions).
    pub fn vsock_only() -> Self {
        Self {
            virtio_port: false,
            pci_serial: false,
            vsock: LabVsock::VhostDeviceVsock,
            ..Self::default()
        }
    }

    /// Sets the guest name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
}

/// The files of one lab, all inside [`LabPaths::dir`].
#[derive(Debug, Clone)]
pub struct LabPaths {
    /// The lab's temporary directory.
    pub dir: PathBuf,
    /// vstreamd's control socket (`vstreamctl --control`).
    pub control: PathBuf,
    /// The generated vstreamd config.
    pub config: PathBuf,
    /// vstreamd's `--state-dir`.
    pub state_dir: PathBuf,
    /// vstreamd's stdout and stderr.
    pub daemon_log: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
    /// vhost-device-vsock's stdout and stderr (with [`LabVsock::VhostDeviceVsock`]).
    pub vsock_backend_log: PathBuf,
    /// The guest's chardev and QMP sockets, and QEMU's ttyS0 logfile.
    pub sockets: GuestSockets,
}

impl LabPaths {
    pub(super) fn new(dir: PathBuf, options: &LabOptions) -> Self {
        let sockets = GuestSockets {
            hvc0: dir.join("hvc0.sock"),
            ttys0: dir.join("ttyS0.sock"),
            ttys0_logfile: dir.join("ttyS0.raw.log"),
            mux_port: options.virtio_port.then(|| dir.join("port.sock")),
            mux_serial: options.pci_serial.then(|| dir.join("serial.sock")),
            hybrid_vsock: (options.vsock != LabVsock::None).then(|| HybridVsockSockets {
                vstreamd: options.vsock == LabVsock::Vstreamd,
                vhost_user: dir.join("vhost-user-vsock.sock"),
                uds: dir.join("vsock.sock"),
            }),
            vhost_rng: options.vhost_rng.then(|| dir.join("rng.sock")),
            vhost_keyboard: options.vhost_input.then(|| dir.join("keyboard.sock")),
            qmp_daemon: dir.join("qmp.sock"),
            qmp_lab: dir.join("qmp-lab.sock"),
        };
        Self {
            control: dir.join("control.sock"),
            config: dir.join("vstreamd.toml"),
            state_dir: dir.join("state"),
            daemon_log: dir.join("vstreamd.log"),
            qemu_log: dir.join("qemu.log"),
            vsock_backend_log: dir.join("vhost-device-vsock.log"),
            sockets,
            dir,
        }
    }

    /// Where vstreamd spools the print jobs of guest `guest`.
    pub fn spool_dir(&self, guest: &str) -> PathBuf {
        self.state_dir.join(guest).join("spool")
    }

    /// Where vstreamd records console `name` of guest `guest`.
    pub fn console_log(&self, guest: &str, name: &str) -> PathBuf {
        self.state_dir.join(guest).join(format!("{name}.log"))
    }

    /// `vstreamd` with this lab's control socket, config and state directory; its stdout and
    /// stderr go to `log`, without colour codes (the log is a file).
    pub fn vstreamd_command(&self, log: File) -> io::Result<Command> {
        let mut command = Command::new(paths::host_bin("vstreamd"));
        command
            .arg("--control")
            .arg(&self.control)
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The vstreamd config of one lab guest: its QMP socket, the mux transports and both consoles.
pub fn vstreamd_config(guest: &str, sockets: &GuestSockets) -> String {
    let unix = |p: &Path| toml_string(&format!("unix:{}", p.display()));
    let mut out = format!(
        "# Generated by the vstream lab (xtask/src/lab.rs).\n[[guest]]\nname = {}\nqmp = {}\n",
        toml_string(guest),
        unix(&sockets.qmp_daemon)
    );
    let mut transport = |kind: &str, name: Option<&str>, address: String| {
        out.push_str(&format!(
            "\n[[guest.transport]]\nkind = {}\n",
            toml_string(kind)
        ));
        if let Some(name) = name {
            out.push_str(&format!("name = {}\n", toml_string(name)));
        }
        out.push_str(&format!("address = {address}\n"));
    };
    for address in mux_addresses(sockets) {
        transport("mux", None, toml_string(&address));
    }
    transport("console", Some("hvc0"), unix(&sockets.hvc0));
    transport("console", Some("ttyS0"), unix(&sockets.ttys0));
    if let Some(rng) = &sockets.vhost_rng {
        let address = toml_string(&format!("unix-listen:{}", rng.display()));
        transport("random-vhost-user", Some("hwrng"), address);
    }
    if let Some(kbd) = &sockets.vhost_keyboard {
        let address = toml_string(&format!("unix-listen:{}", kbd.display()));
        transport("hid-vhost-user", Some("keyboard"), address);
    }
    out
}

/// The addresses of a guest's mux transports as vstreamd's config and status have them. Over
/// vhost-device-vsock these are a per-guest listener on the hybrid socket's `_<port>` path (the
/// path is the guest's identity: its peer is the backend process, whatever the guest) and the
/// hybrid socket itself.
pub fn mux_addresses(sockets: &GuestSockets) -> Vec<String> {
    let mut out: Vec<String> = [&sockets.mux_port, &sockets.mux_serial]
        .into_iter()
        .flatten()
        .map(|p| format!("unix:{}", p.display()))
        .collect();
    if let Some(hybrid) = &sockets.hybrid_vsock {
        if hybrid.vstreamd {
            out.push(format!(
                "vhost-user-vsock:{},cid={HYBRID_VSOCK_CID},port={VSOCK_MUX_PORT},uds={}",
                hybrid.vhost_user.display(),
                hybrid.uds.display()
            ));
        } else {
            out.push(format!(
                "unix-listen:{}",
                hybrid.host_port(VSOCK_MUX_PORT).display()
            ));
        }
        out.push(format!(
            "hvsock:{}:{VSOCK_LISTEN_PORT}",
            hybrid.uds.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockets(dir: &Path, port: bool, serial: bool) -> GuestSockets {
        LabPaths::new(
            dir.to_path_buf(),
            &LabOptions {
                virtio_port: port,
                pci_serial: serial,
                ..LabOptions::default()
            },
        )
        .sockets
    }

    #[test]
    fn config_has_the_contract_shape() {
        let cfg = vstreamd_config("lab", &sockets(Path::new("/tmp/x"), true, true));
        let expected = "[[guest]]\nname = \"lab\"\nqmp = \"unix:/tmp/x/qmp.sock\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"unix:/tmp/x/port.sock\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"unix:/tmp/x/serial.sock\"\n\n\
[[guest.transport]]\nkind = \"console\"\nname = \"hvc0\"\naddress = \"unix:/tmp/x/hvc0.sock\"\n\n\
[[guest.transport]]\nkind = \"console\"\nname = \"ttyS0\"\naddress = \"unix:/tmp/x/ttyS0.sock\"\n";
        assert!(cfg.ends_with(expected), "{cfg}");
        let only_serial = vstreamd_config("g", &sockets(Path::new("/t"), false, true));
        assert!(!only_serial.contains("port.sock"));
        assert!(only_serial.contains("serial.sock"));
    }

    #[test]
    fn a_vsock_guest_has_both_hybrid_transports_and_no_other_mux() {
        let sockets = LabPaths::new(PathBuf::from("/tmp/v"), &LabOptions::vsock_only()).sockets;
        let cfg = vstreamd_config("v", &sockets);
        let expected = "[[guest.transport]]\nkind = \"mux\"\naddress = \"unix-listen:/tmp/v/vsock.sock_5000\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"hvsock:/tmp/v/vsock.sock:5001\"\n\n\
[[guest.transport]]\nkind = \"console\"";
        assert!(cfg.contains(expected), "{cfg}");
        assert!(
            !cfg.contains("port.sock") && !cfg.contains("serial.sock"),
            "{cfg}"
        );
    }

    #[test]
    fn a_vhost_rng_guest_has_its_random_vhost_user_transport() {
        let options = LabOptions {
            vhost_rng: true,
            ..LabOptions::default()
        };
        let sockets = LabPaths::new(PathBuf::from("/tmp/r"), &options).sockets;
        let cfg = vstreamd_config("r", &sockets);
        let expected = "[[guest.transport]]\nkind = \"random-vhost-user\"\nname = \"hwrng\"\naddress = \"unix-listen:/tmp/r/rng.sock\"\n";
        assert!(cfg.ends_with(expected), "{cfg}");
    }

    #[test]
    fn a_guest_served_by_vstreamd_has_its_device_as_transport() {
        let options = LabOptions {
            vsock: LabVsock::Vstreamd,
            ..LabOptions::vsock_only()
        };
        let sockets = LabPaths::new(PathBuf::from("/tmp/v"), &options).sockets;
        let cfg = vstreamd_config("v", &sockets);
        let expected = "[[guest.transport]]\nkind = \"mux\"\naddress = \"vhost-user-vsock:/tmp/v/vhost-user-vsock.sock,cid=3,port=5000,uds=/tmp/v/vsock.sock\"\n\n\
[[guest.transport]]\nkind = \"mux\"\naddress = \"hvsock:/tmp/v/vsock.sock:5001\"\n\n";
        assert!(cfg.contains(expected), "{cfg}");
        assert!(
            !cfg.contains("_5000"),
            "no listener of vhost-device-vsock's: {cfg}"
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
