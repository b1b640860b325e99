//! vstream's developer tasks and its real-guest lab.
//!
//! - [`image`]: the guest kernel and initramfs (`cargo xtask image`);
//! - [`deb`]: the Debian packages (`cargo xtask deb`), the agent's also the lab's;
//! - [`accel`]: KVM when it works, TCG otherwise;
//! - [`qemu`]: the guest's devices and their host sockets;
//! - [`lab`]: vstreamd + a QEMU guest for end-to-end tests (`xtask/tests/`);
//! - [`demo`]: `cargo xtask demo`, one entry per device;
//! - [`hostile`]: a hostile guest beside a good one (`cargo xtask bench-hostile`).

pub mod accel;
pub mod cpio;
pub mod deb;
pub mod demo;
pub mod elf;
pub mod hostile;
pub mod image;
pub mod lab;
pub mod paths;
pub mod process;
pub mod pty;
pub mod qemu;
pub mod qga_lab;
pub mod qmp;
