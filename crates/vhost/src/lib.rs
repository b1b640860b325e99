//! The vhost-user plumbing vstreamd's virtio devices share.
//!
//! A VMM that speaks vhost-user (QEMU's `vhost-user-*-pci`, Cloud Hypervisor's
//! `--user-device`) hands a device's queues and the guest's memory to another process over a
//! Unix socket. This crate is that other process's side, once for every device: the server loop
//! (rust-vmm's vhost-user-backend, one worker thread per device), guest memory (vm-memory),
//! checked descriptor chains ([`Chain`], [`Vq`]), interrupt suppression with event index, and
//! the [`Device`] trait for a virtio device whose logic lives elsewhere (with the transport or
//! device it serves).
//!
//! The guest is untrusted: a malformed chain is returned with length 0 and reported, an
//! impossible queue state marks the device NEEDS_RESET (its queues are left alone until the
//! driver resets it); nothing the guest writes can make the server panic.

#![deny(missing_docs)]

mod chain;
mod server;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use chain::{Chain, ChainError, Region, Vq};
pub use server::{serve, Server};
pub use vm_memory::{GuestAddress, GuestMemoryMmap};

use std::os::fd::BorrowedFd;

/// What woke the device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest kicked queue `n`.
    Queue(usize),
    /// The device's own descriptor ([`Device::backend_fd`]) is readable.
    Backend,
}

/// A virtio device whose logic lives elsewhere: the server calls it on the worker thread, with
/// the device's queues, whenever the guest kicks a queue or the device's own descriptor is
/// readable.
pub trait Device: Send + 'static {
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Device-specific feature bits (VERSION_1 and EVENT_IDX are added by the server).
    fn features(&self) -> u64 {
        0
    }
    /// The device's configuration space.
    fn config(&self) -> Vec<u8>;
    /// The driver wrote `data` at `offset` of the configuration space (the VMM forwards it
    /// with VHOST_USER_SET_CONFIG; virtio-input's driver selects what to read this way).
    /// Unchecked guest values: the device keeps only the fields it knows. Ignored by default.
    fn set_config(&mut self, _offset: u32, _data: &[u8]) {}
    /// A descriptor that becomes readable when the device has work of its own (an epoll
    /// descriptor of host sockets, an eventfd); it must not stay readable once handled (edge
    /// triggered sources, or drained in [`Device::handle`]), or the worker would spin.
    fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// The driver reset the device, or the VMM went away: drop all state tied to the guest.
    fn reset(&mut self);
    /// Handles `event`; `queues[n]` is queue `n`. `queues` is empty for a [`Event::Backend`]
    /// that comes before the VMM gave the guest's memory.
    fn handle(&mut self, event: Event, queues: &mut [Vq<'_>]);
}
