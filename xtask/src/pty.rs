//! Running a program on a pseudo-terminal, as a person at a terminal would: type bytes, read the screen.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::process;

#[derive(Default)]
struct Screen {
    bytes: Vec<u8>,
    closed: bool,
}

/// A child process whose stdin, stdout and stderr are the slave side of a pty, and its controlling
/// terminal. Output is collected by a reader thread.
pub struct PtyProcess {
    master: File,
    child: Child,
    screen: Arc<(Mutex<Screen>, Condvar)>,
}

fn cvt(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    let master = cvt(master, "posix_openpt")?;
    // SAFETY: `master` was just returned by posix_openpt and is owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: grantpt takes a valid pty master descriptor, which `master` is while alive.
    let rc = unsafe { libc::grantpt(master.as_raw_fd()) };
    cvt(rc, "grantpt")?;
    // SAFETY: as above.
    let rc = unsafe { libc::unlockpt(master.as_raw_fd()) };
    cvt(rc, "unlockpt")?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is a writable buffer of the length passed; ptsname_r NUL-terminates on success.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: `path` is a valid C string; open returns a new descriptor or -1.
    let slave = unsafe { libc::open(path.as_ptr(), flags) };
    let slave = cvt(slave, "opening the pty slave")?;
    // SAFETY: `slave` was just returned by open and is owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    cvt(rc, "TIOCSWINSZ")?;
    Ok((File::from(master), File::from(slave)))
}

impl PtyProcess {
    /// Starts `command` on a new 40x120 pty, in a new session with the pty as controlling terminal.
    pub fn spawn(mut command: Command) -> io::Result<Self> {
        let (master, slave) = open_pty(40, 120)?;
        command
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        let child = process::spawn_in_session(command, true)?;
        // Our copies of the slave are gone now (moved into `command`, dropped with it), so reads on
        // the master end with EIO once the child and its descendants close the terminal.
        let screen = Arc::new((Mutex::new(Screen::default()), Condvar::new()));
        let reader_screen = Arc::clone(&screen);
        let mut reader = master.try_clone()?;
        thread::Builder::new()
            .name("pty-reader".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => 0,
                        Ok(n) => n,
                    };
                    let (lock, cvar) = &*reader_screen;
                    let Ok(mut s) = lock.lock() else { return };
                    if n == 0 {
                        s.closed = true;
                        cvar.notify_all();
                        return;
                    }
                    s.bytes.extend_from_slice(&buf[..n]);
                    cvar.notify_all();
                }
            })?;
        Ok(Self {
            master,
            child,
            screen,
        })
    }

    /// Types `bytes` (use `\r` for Enter, `\x1d` for Ctrl-]).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.master.write_all(bytes)?;
        self.master.flush()
    }

    /// Everything the program wrote so far.
    pub fn output(&self) -> Vec<u8> {
        self.screen
            .0
            .lock()
            .map(|s| s.bytes.clone())
            .unwrap_or_default()
    }

    /// [`Self::output`] as text (lossy).
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output()).into_owned()
    }

    /// How many bytes were written so far: pass it to [`Self::expect_after`] to look only at later output.
    pub fn mark(&self) -> usize {
        self.screen.0.lock().map(|s| s.bytes.len()).unwrap_or(0)
    }

    /// Waits until `needle` appears in the output after byte `mark`.
    pub fn expect_after(&self, mark: usize, needle: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.screen;
        let mut s = lock
            .lock()
            .map_err(|_| io::Error::other("pty screen lock poisoned"))?;
        loop {
            let from = mark.min(s.bytes.len());
            if String::from_utf8_lossy(&s.bytes[from..]).contains(needle) {
                return Ok(());
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                let why = if s.closed {
                    "the terminal closed"
                } else {
                    "timed out"
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{why} after {:.1} s waiting for {needle:?}; the terminal showed:\n{}",
                        timeout.as_secs_f64(),
                        String::from_utf8_lossy(&s.bytes[from..])
                    ),
                ));
            }
            s = cvar
                .wait_timeout(s, deadline - now)
                .map_err(|_| io::Error::other("pty screen lock poisoned"))?
                .0;
        }
    }

    /// Waits until the program has written nothing for `quiet`, or `max` has passed.
    pub fn wait_quiet(&self, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        let mut last_len = self.mark();
        let mut last_change = Instant::now();
        while Instant::now() < deadline && last_change.elapsed() < quiet {
            thread::sleep(Duration::from_millis(20));
            let len = self.mark();
            if len != last_len {
                last_len = len;
                last_change = Instant::now();
            }
        }
    }

    /// Waits up to `timeout` for the program to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        process::wait_timeout(&mut self.child, timeout)
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PtyProcess {
    fn drop(&mut self) {
        process::terminate(&mut self.child, Duration::from_millis(500));
    }
}
