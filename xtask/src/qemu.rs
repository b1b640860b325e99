//! The QEMU command line of a lab guest.
//!
//! Devices (q35, 512 MiB, no default devices, no display):
//!
//! | guest device                          | QEMU                                         | host side (chardev)         |
//! |---------------------------------------|----------------------------------------------|-----------------------------|
//! | ttyS0, ISA 16550, kernel console      | `-serial chardev:ttyS0`                      | `ttyS0.sock` + QEMU logfile |
//! | hvc0, virtio console (shell)          | `virtio-serial-pci` + `virtconsole`          | `hvc0.sock`                 |
//! | virtio port `org.vstream.0` (mux)     | `virtserialport name=org.vstream.0`          | `port.sock`                 |
//! | ttyS4, PCI 16550 (mux)                | `pci-serial`                                 | `serial.sock`               |
//! | hwrng (unless `virtio_rng` is off)    | `virtio-rng-pci`                             |                             |
//! | hwrng (`LabOptions::vhost_rng`)       | `vhost-user-rng-pci` + shared memfd RAM      | vstreamd's `rng.sock`       |
//! | keyboard (`LabOptions::vhost_input`)  | `vhost-user-input-pci` + shared memfd RAM    | vstreamd's `keyboard.sock`  |
//! | vsock                                 | `vhost-vsock-pci` (if `/dev/vhost-vsock`)    |                             |
//! | vsock (`LabVsock::VhostDeviceVsock`)  | `vhost-user-vsock-pci` + shared memfd RAM    | vhost-device-vsock's `vsock.sock` (hybrid) |
//! | eth0, virtio-net (`user_net` only)    | `virtio-net-pci` + `-netdev user` (slirp)    | 10.0.2.2:P = 127.0.0.1:P    |
//! | shared segment (`ivshmem` only)       | `ivshmem-plain` + `memory-backend-file` share=on | a file in /dev/shm       |
//! | QMP (two monitors: vstreamd, the lab) | `-qmp unix:...`                              | `qmp.sock`, `qmp-lab.sock`  |
//!
//! Every chardev is a Unix socket server with `wait=off`: QEMU starts at once, and vstreamd connects
//! as a client (`unix:PATH`) whenever it likes, and again after a disconnect.
//!
//! Reboots: there is no `-no-reboot`, so a guest reboot, `system_reset` over QMP or a watchdog reset
//! reboots the guest inside the same QEMU (the console logs go on). `panic=-1` makes a panicking guest
//! reboot at once; the lab reports a panic it sees in the console log. A guest `poweroff` ends QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::accel::Accel;
use crate::image::GuestImage;

/// The ttyS name the guest gives the PCI 16550: ttyS0-3 are the legacy ISA ports the 8250 driver
/// always registers, so the first PCI UART is ttyS4 (checked at boot against `/init`'s report).
pub const PCI_SERIAL_TTY: &str = "ttyS4";

/// The name of the virtio-serial port that carries the multiplexer.
pub const MUX_PORT_NAME: &str = "org.vstream.0";

/// Baud rate of the PCI serial line.
pub const SERIAL_BAUD: u32 = 115_200;

/// The guest's CID behind vhost-device-vsock. Each backend process has its own CIDs, so every
/// lab guest can be 3.
pub const HYBRID_VSOCK_CID: u32 = 3;

/// The host vsock port the agent connects to over vhost-device-vsock (`vsock:2:5000`); vstreamd
/// listens on the hybrid socket's `<path>_5000`.
pub const VSOCK_MUX_PORT: u32 = 5000;

/// The guest vsock port the agent listens on (`vsock-listen:5001`); vstreamd reaches it with
/// `hvsock:<path>:5001`.
pub const VSOCK_LISTEN_PORT: u32 = 5001;

/// Where a guest's sockets and logs are (all in the lab's temporary directory).
#[derive(Debug, Clone)]
pub struct GuestSockets {
    /// Host side of hvc0.
    pub hvc0: PathBuf,
    /// Host side of ttyS0 (the kernel console).
    pub ttys0: PathBuf,
    /// QEMU's own copy of everything the guest wrote to ttyS0.
    pub ttys0_logfile: PathBuf,
    /// Host side of the virtio port `org.vstream.0`, if attached.
    pub mux_port: Option<PathBuf>,
    /// Host side of the PCI 16550, if attached.
    pub mux_serial: Option<PathBuf>,
    /// vhost-device-vsock, if attached: its vhost-user socket (QEMU connects) and its hybrid
    /// vsock socket (host programs connect).
    pub hybrid_vsock: Option<HybridVsockSockets>,
    /// vstreamd's vhost-user-rng socket (a `random-vhost-user` transport), if attached.
    pub vhost_rng: Option<PathBuf>,
    /// vstreamd's vhost-user-input keyboard socket (a `hid-vhost-user` transport), if attached.
    pub vhost_keyboard: Option<PathBuf>,
    /// QMP monitor for vstreamd.
    pub qmp_daemon: PathBuf,
    /// QMP monitor for the lab harness.
    pub qmp_lab: PathBuf,
}

/// The two sockets of a vhost-user vsock backend (vhost-device-vsock, or vstreamd's own).
#[derive(Debug, Clone)]
pub struct HybridVsockSockets {
    /// vstreamd serves the device itself (its `vhost-user-vsock:` transport) instead of
    /// vhost-device-vsock.
    pub vstreamd: bool,
    /// vhost-user control socket (the backend listens, QEMU connects).
    pub vhost_user: PathBuf,
    /// Hybrid vsock socket: `CONNECT <port>` reaches a guest listener; the guest's connections
    /// to host port P arrive at `<uds>_<P>`.
    pub uds: PathBuf,
}

impl HybridVsockSockets {
    /// Where the guest's connections to host port `port` arrive (a host program listens there).
    pub fn host_port(&self, port: u32) -> PathBuf {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }
}

/// Everything that decides the QEMU command line.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    /// qemu-system-x86_64.
    pub qemu: PathBuf,
    /// Kernel and initramfs.
    pub image: GuestImage,
    /// KVM or TCG.
    pub accel: Accel,
    /// CPU model instead of the accelerator's (e.g. `qemu64`: no RDRAND).
    pub cpu: Option<String>,
    /// A virtio-rng device (the guest kernel's hwrng, which seeds its CRNG at boot).
    pub virtio_rng: bool,
    /// Guest name (`vstream.name=`, hostname).
    pub name: String,
    /// RAM in MiB.
    pub memory_mib: u32,
    /// Sockets and logs.
    pub sockets: GuestSockets,
    /// vsock CID when a vhost-vsock or vhost-user-vsock device is attached.
    pub vsock_cid: Option<u32>,
    /// More kernel arguments, appended.
    pub extra_kernel_args: Vec<String>,
    /// More QEMU arguments, appended (devices added by later tests).
    pub extra_qemu_args: Vec<String>,
    /// A virtio-net NIC on QEMU's user-mode network (slirp): the guest's `eth0`, with no
    /// address until the test gives it one (10.0.2.15/24; 10.0.2.2 is the host's loopback).
    pub user_net: bool,
    /// An `ivshmem-plain` PCI device (1af4:1110) whose BAR 2 maps this file.
    pub ivshmem: Option<Ivshmem>,
}

/// A shared-memory segment for the guest: a file (in /dev/shm) that QEMU maps shared, so a
/// host process mapping the same file sees the guest's writes.
#[derive(Debug, Clone)]
pub struct Ivshmem {
    /// The file; QEMU creates it if it does not exist.
    pub path: PathBuf,
    /// Its size in bytes: a power of two (a PCI BAR).
    pub size: u64,
}

fn check_path(path: &Path) -> Result<String> {
    let s = path.to_string_lossy().into_owned();
    if s.contains(',') {
        bail!("{s}: QEMU option values cannot contain ','");
    }
    // sun_path is 108 bytes including the NUL.
    if s.len() > 107 {
        bail!(
            "{s}: too long for a Unix socket path ({} bytes, at most 107)",
            s.len()
        );
    }
    Ok(s)
}

fn socket_chardev(id: &str, path: &Path, logfile: Option<&Path>) -> Result<String> {
    let mut arg = format!(
        "socket,id={id},path={},server=on,wait=off",
        check_path(path)?
    );
    if let Some(log) = logfile {
        arg.push_str(&format!(",logfile={}", check_path(log)?));
    }
    Ok(arg)
}

/// QEMU arguments (for [`QemuSpec::extra_qemu_args`]) of one more port `name` on the lab's
/// virtio-serial bus, at port number `nr` (2 and up: 0 is hvc0, 1 the mux port), its host side a
/// Unix socket server at `socket`.
pub fn extra_virtio_port(id: &str, socket: &Path, nr: u32, name: &str) -> Result<Vec<String>> {
    Ok(vec![
        "-chardev".to_owned(),
        socket_chardev(id, socket, None)?,
        "-device".to_owned(),
        format!("virtserialport,bus=vser0.0,nr={nr},chardev={id},id={id},name={name}"),
    ])
}

impl QemuSpec {
    /// The `vstream.connect=` addresses the agent gets, in the order of the kernel command line.
    pub fn agent_connect_addresses(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.sockets.mux_port.is_some() {
            out.push(format!("port:{MUX_PORT_NAME}"));
        }
        if self.sockets.mux_serial.is_some() {
            out.push(format!("serial:/dev/{PCI_SERIAL_TTY},baud={SERIAL_BAUD}"));
        }
        if self.sockets.hybrid_vsock.is_some() {
            out.push(format!("vsock:2:{VSOCK_MUX_PORT}"));
            out.push(format!("vsock-listen:{VSOCK_LISTEN_PORT}"));
        }
        out
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut args = vec![
            "console=ttyS0".to_string(),
            "console=hvc0".to_string(),
            "panic=-1".to_string(),
            "8250.nr_uarts=8".to_string(),
            "printk.devkmsg=on".to_string(),
            format!("vstream.name={}", self.name),
        ];
        args.extend(
            self.agent_connect_addresses()
                .into_iter()
                .map(|a| format!("vstream.connect={a}")),
        );
        args.extend(self.extra_kernel_args.iter().cloned());
        args.join(" ")
    }

    /// The QEMU command (not started).
    pub fn command(&self) -> Result<Command> {
        let s = &self.sockets;
        let mut c = Command::new(&self.qemu);
        c.arg("-name")
            .arg(format!("guest={},debug-threads=on", self.name));
        c.args([
            "-machine",
            "q35",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ]);
        c.arg("-m").arg(self.memory_mib.to_string());
        c.args(self.accel.qemu_args(self.cpu.as_deref()));
        c.arg("-kernel").arg(check_path(&self.image.vmlinuz)?);
        c.arg("-initrd").arg(check_path(&self.image.initramfs)?);
        c.arg("-append").arg(self.kernel_cmdline());

        // ttyS0: the ISA UART and kernel console, with QEMU's own log of the guest's output.
        c.arg("-chardev")
            .arg(socket_chardev("ttyS0", &s.ttys0, Some(&s.ttys0_logfile))?);
        c.args(["-serial", "chardev:ttyS0"]);

        // virtio-serial: hvc0 always (the shell), the mux port when asked for.
        c.args(["-device", "virtio-serial-pci,id=vser0,max_ports=31"]);
        c.arg("-chardev")
            .arg(socket_chardev("hvc0", &s.hvc0, None)?);
        c.args([
            "-device",
            "virtconsole,bus=vser0.0,nr=0,chardev=hvc0,id=hvc0",
        ]);
        if let Some(port) = &s.mux_port {
            c.arg("-chardev")
                .arg(socket_chardev("muxport", port, None)?);
            c.arg("-device").arg(format!(
                "virtserialport,bus=vser0.0,nr=1,chardev=muxport,id=muxport,name={MUX_PORT_NAME}"
            ));
        }

        // The PCI 16550 carrying the mux.
        if let Some(serial) = &s.mux_serial {
            c.arg("-chardev")
                .arg(socket_chardev("muxserial", serial, None)?);
            c.args(["-device", "pci-serial,chardev=muxserial,id=muxserial"]);
        }

        if self.virtio_rng {
            c.args(["-device", "virtio-rng-pci,id=rng0"]);
        }
        if self.user_net {
            // No host forwards and no DNS the guest would use: the guest reaches the host's
            // loopback at 10.0.2.2 (slirp connects to 127.0.0.1), and nothing else is routed
            // unless the guest adds a default route.
            c.args(["-netdev", "user,id=net0,ipv6=off"]);
            c.args(["-device", "virtio-net-pci,netdev=net0,id=net0"]);
        }
        if let Some(shm) = &self.ivshmem {
            c.arg("-object").arg(format!(
                "memory-backend-file,id=fnshm,mem-path={},size={},share=on",
                check_path(&shm.path)?,
                shm.size
            ));
            c.args(["-device", "ivshmem-plain,memdev=fnshm,id=ivshmem0"]);
        }
        if s.hybrid_vsock.is_some() || s.vhost_rng.is_some() || s.vhost_keyboard.is_some() {
            // vhost-user needs guest RAM the backend can map: a shared memfd as the only NUMA
            // node.
            c.arg("-object").arg(format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.memory_mib
            ));
            c.args(["-numa", "node,memdev=mem"]);
        }
        if let Some(rng) = &s.vhost_rng {
            c.arg("-chardev")
                .arg(format!("socket,id=vhostrng,path={}", check_path(rng)?));
            // QEMU 7.2's vhost-user-rng hands the backend every feature the guest acked, not
            // only those the backend offered: the two the backend does not offer are turned off.
            c.args([
                "-device",
                "vhost-user-rng-pci,chardev=vhostrng,id=vhostrng,indirect_desc=off,queue_reset=off",
            ]);
        }
        if let Some(kbd) = &s.vhost_keyboard {
            c.arg("-chardev")
                .arg(format!("socket,id=vhostkbd,path={}", check_path(kbd)?));
            // As vhost-user-rng: QEMU 7.2 passes the guest's features through unfiltered.
            c.args([
                "-device",
                "vhost-user-input-pci,chardev=vhostkbd,id=vhostkbd,indirect_desc=off,queue_reset=off",
            ]);
        }
        if let Some(hybrid) = &s.hybrid_vsock {
            // The CID is the backend's (QEMU 7.2's device has no guest-cid property).
            c.arg("-chardev").arg(format!(
                "socket,id=vsockchr,path={}",
                check_path(&hybrid.vhost_user)?
            ));
            c.args(["-device", "vhost-user-vsock-pci,chardev=vsockchr,id=vsock0"]);
        } else if let Some(cid) = self.vsock_cid {
            c.arg("-device")
                .arg(format!("vhost-vsock-pci,id=vsock0,guest-cid={cid}"));
        }

        c.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            check_path(&s.qmp_daemon)?
        ));
        c.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            check_path(&s.qmp_lab)?
        ));
        c.args(&self.extra_qemu_args);
        Ok(c)
    }
}

/// True if the host can give the guest a vhost-vsock device.
pub fn vhost_vsock_available() -> bool {
    Path::new("/dev/vhost-vsock").exists()
}
