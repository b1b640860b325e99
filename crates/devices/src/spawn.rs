//! What every program a device starts inherits from the process that starts it, and must not.
//!
//! The agent keeps transparent huge pages out of its own memory ([`keep_huge_pages_out`]): with
//! the guest kernel's THP setting `always`, one 2 MiB huge page in its heap doubled its resident
//! memory for a few KiB in use. The kernel passes that setting on to children and keeps it
//! across `execve`, so each spawn path hands its command to [`undo_inherited`], which turns it
//! back on between fork and exec: the programs `guest-exec` and the devices run keep the
//! guest's THP policy.
//!
//! The hook makes std fork and exec instead of using `posix_spawn` (vfork). The agent is a few
//! MiB, so the copied page tables cost little; a process that never called
//! [`keep_huge_pages_out`] (vstreamd) gets no hook and keeps `posix_spawn`.

use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process turned THP off itself, so its children must turn it back on.
static THP_TURNED_OFF: AtomicBool = AtomicBool::new(false);

/// Turns transparent huge pages off for this process, unless they already were (then children
/// inherit that, as they would have anyway).
pub fn keep_huge_pages_out() -> std::io::Result<()> {
    if rustix::thread::transparent_huge_pages_are_disabled()? {
        return Ok(());
    }
    rustix::thread::disable_transparent_huge_pages(true)?;
    THP_TURNED_OFF.store(true, Ordering::Relaxed);
    Ok(())
}

/// Makes `cmd`'s child start with the THP setting this process started with. Tokio commands:
/// pass `as_std_mut()`.
pub fn undo_inherited(cmd: &mut std::process::Command) -> &mut std::process::Command {
    if !THP_TURNED_OFF.load(Ordering::Relaxed) {
        return cmd;
    }
    // SAFETY: the closure runs in the child between fork and exec; it is one prctl system call
    // through rustix (async-signal-safe, no allocation, no locks), and its error converts to an
    // io::Error without allocating.
    unsafe {
        cmd.pre_exec(|| {
            rustix::thread::disable_transparent_huge_pages(false)?;
            Ok(())
        })
    }
}
