//! The process-wide safety nets: whatever a test does, its guests die with it and their logs get shown.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use crate::process;

use super::{env_secs, LabPaths, DEFAULT_HARD_TIMEOUT, TAIL_LINES};

/// The part of a lab the process-wide safety nets (panic hook, watchdog, exit) need.
pub(super) struct LabShared {
    pub(super) name: String,
    pub(super) paths: LabPaths,
    pub(super) dumped: AtomicBool,
    pub(super) closed: AtomicBool,
}

pub(super) fn live_labs() -> &'static Mutex<Vec<Arc<LabShared>>> {
    static LABS: OnceLock<Mutex<Vec<Arc<LabShared>>>> = OnceLock::new();
    LABS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Set once any thread panicked: lab directories are then kept for inspection.
static PANICKED: AtomicBool = AtomicBool::new(false);

pub(super) fn keep_dirs() -> bool {
    PANICKED.load(Ordering::SeqCst)
        || std::env::var("VSTREAM_LAB_KEEP")
            .map(|v| v == "1")
            .unwrap_or(false)
}

/// Removes `\r` and ANSI escape sequences (colours, cursor queries), so a dump reads as plain text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters and intermediates, then one final byte in '@'..='~'.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

pub(super) fn tail(path: &Path, lines: usize) -> String {
    let mut data = Vec::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .is_err()
    {
        return format!("({} does not exist)\n", path.display());
    }
    let text = strip_ansi(&String::from_utf8_lossy(&data));
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return format!("({} is empty)\n", path.display());
    }
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    for line in &all[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl LabShared {
    /// The last lines of this lab's guest console and vsock backend, for an error message: when
    /// several labs fail at once, CI may keep only the panic messages of the full reports.
    pub(super) fn short_report(&self) -> String {
        let p = &self.paths;
        let mut out = format!(
            "---- lab {:?}: guest console ttyS0, last 30 lines ----\n",
            self.name
        );
        out.push_str(&tail(&p.sockets.ttys0_logfile, 30));
        if p.vsock_backend_log.exists() {
            out.push_str("---- vhost-device-vsock, last 10 lines ----\n");
            out.push_str(&tail(&p.vsock_backend_log, 10));
        }
        out
    }

    pub(super) fn report(&self, why: &str) -> String {
        let p = &self.paths;
        let mut out = format!(
            "\n==== vstream lab {:?}: {why}; its files are in {} ====\n",
            self.name,
            p.dir.display()
        );
        out.push_str(&format!(
            "---- guest console ttyS0, last {TAIL_LINES} lines (QEMU's copy {}) ----\n",
            p.sockets.ttys0_logfile.display()
        ));
        out.push_str(&tail(&p.sockets.ttys0_logfile, TAIL_LINES));
        let hvc0 = p.console_log(&self.name, "hvc0");
        if hvc0.exists() {
            out.push_str(&format!(
                "---- guest console hvc0, last 20 lines ({}) ----\n",
                hvc0.display()
            ));
            out.push_str(&tail(&hvc0, 20));
        }
        out.push_str(&format!(
            "---- vstreamd log, last {TAIL_LINES} lines ({}) ----\n",
            p.daemon_log.display()
        ));
        out.push_str(&tail(&p.daemon_log, TAIL_LINES));
        let backend = fs::read_to_string(&p.vsock_backend_log).unwrap_or_default();
        if !backend.trim().is_empty() {
            out.push_str(&format!(
                "---- vhost-device-vsock output ({}) ----\n",
                p.vsock_backend_log.display()
            ));
            out.push_str(&tail(&p.vsock_backend_log, 20));
        }
        let qemu = fs::read_to_string(&p.qemu_log).unwrap_or_default();
        if !qemu.trim().is_empty() {
            out.push_str(&format!(
                "---- QEMU output ({}) ----\n",
                p.qemu_log.display()
            ));
            out.push_str(&tail(&p.qemu_log, 20));
        }
        out.push_str(&format!("==== end of vstream lab {:?} ====\n", self.name));
        out
    }

    /// Prints the report once.
    pub(super) fn dump(&self, why: &str) {
        if !self.dumped.swap(true, Ordering::SeqCst) {
            eprint!("{}", self.report(why));
        }
    }
}

/// Panic hook, exit handler and watchdog, installed once per process.
pub(super) fn install_safety_nets() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            PANICKED.store(true, Ordering::SeqCst);
            // try_lock: the panic may have happened while the list was locked.
            if let Ok(labs) = live_labs().try_lock() {
                for lab in labs.iter() {
                    lab.dump("a test panicked");
                }
            }
        }));
        // SAFETY: atexit registers a plain `extern "C" fn()` that lives for the whole program.
        unsafe {
            libc::atexit(at_exit);
        }
        let limit = env_secs("VSTREAM_LAB_TIMEOUT").unwrap_or(DEFAULT_HARD_TIMEOUT);
        let _ = thread::Builder::new()
            .name("lab-watchdog".into())
            .spawn(move || {
                thread::sleep(limit);
                let _ = writeln!(
                    io::stderr(),
                    "\nvstream-lab: HARD TIMEOUT: this test binary has run labs for {} s \
                 (VSTREAM_LAB_TIMEOUT); killing the guests and exiting",
                    limit.as_secs()
                );
                PANICKED.store(true, Ordering::SeqCst);
                if let Ok(labs) = live_labs().try_lock() {
                    for lab in labs.iter() {
                        let _ = io::stderr().write_all(lab.report("hard timeout").as_bytes());
                    }
                }
                process::kill_all();
                std::process::exit(3);
            });
    });
}

/// At process exit (a `static` lab is never dropped): kill what is left and remove the directories.
extern "C" fn at_exit() {
    process::kill_all();
    let Ok(labs) = live_labs().try_lock() else {
        return;
    };
    for lab in labs.iter() {
        if lab.closed.swap(true, Ordering::SeqCst) {
            continue;
        }
        if keep_dirs() {
            let _ = writeln!(
                io::stderr(),
                "vstream-lab: kept {}",
                lab.paths.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&lab.paths.dir);
        }
    }
}

pub(super) fn make_lab_dir(name: &str) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vstream-lab-{safe}-{}-{n}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m x\r\n# \x1b[6n"),
            "2026  INFO x\n# "
        );
    }
}
