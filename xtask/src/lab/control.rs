//! Talking to a running lab: vstreamctl, its status, the consoles and QMP.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pty::PtyProcess;
use crate::{paths, process, qmp};

use super::{Lab, CTL_TIMEOUT};

impl Lab {
    /// A `vstreamctl --control <socket>` command, for callers that run it themselves (e.g. on a pty).
    pub fn ctl_command(&self) -> Command {
        let mut command = Command::new(paths::host_bin("vstreamctl"));
        command.arg("--control").arg(&self.paths.control);
        command
    }

    /// Runs `vstreamctl --control <socket> ARGS` (stdin empty, at most [`CTL_TIMEOUT`]).
    pub fn ctl<I, S>(&self, args: I) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctl_with_input(args, &[])
    }

    /// Runs `vstreamctl --control <socket> ARGS` with `input` on its stdin (then EOF), at most
    /// [`CTL_TIMEOUT`].
    pub fn ctl_with_input<I, S>(&self, args: I, input: &[u8]) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctl_within(args, input, CTL_TIMEOUT)
    }

    /// Runs `vstreamctl --control <socket> ARGS` with `input` on its stdin (then EOF; the command
    /// may exit without reading it all), at most `timeout`.
    pub fn ctl_within<I, S>(&self, args: I, input: &[u8], timeout: Duration) -> io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.ctl_command();
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = format!("{command:?}");
        let mut child = process::spawn(command)?;
        let stdin = child.stdin.take();
        let input = input.to_vec();
        // Fed from a thread: the child's stdout must be drained at the same time.
        let in_writer = thread::spawn(move || {
            if let Some(mut s) = stdin {
                let _ = s.write_all(&input);
            }
        });
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let out_reader = thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        });
        let err_reader = thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        });
        let status = process::wait_timeout(&mut child, timeout)?;
        let Some(status) = status else {
            process::terminate(&mut child, Duration::from_millis(200));
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{shown} did not finish within {timeout:?}"),
            ));
        };
        let _ = in_writer.join();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// `vstreamctl status --json`, parsed.
    pub fn status(&self) -> io::Result<Value> {
        let out = self.ctl(["status", "--json"])?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "vstreamctl status --json failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "vstreamctl status --json printed no JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                ),
            )
        })
    }

    /// Polls `status --json` until `predicate` holds; the error tells what was last seen.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut predicate: impl FnMut(&Value) -> bool,
    ) -> io::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status() {
                Ok(status) if predicate(&status) => return Ok(status),
                Ok(status) => format!("last status: {status}"),
                Err(e) => format!("last error: {e}"),
            };
            self.check_qemu()?;
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "timed out after {} s waiting for {what}; {last}\n{}",
                        timeout.as_secs(),
                        self.shared.short_report()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Opens a hybrid vsock connection to guest port `port` the way any host program does
    /// (Firecracker's and Cloud Hypervisor's protocol): `CONNECT <port>\n` on the guest's hybrid
    /// socket. Returns the stream and the answer line, `OK <host port>\n`, or empty if the
    /// backend hung up without one (nobody listens on that port in the guest).
    pub fn hybrid_vsock_connect(&self, port: u32) -> io::Result<(UnixStream, String)> {
        let uds = &self
            .paths
            .sockets
            .hybrid_vsock
            .as_ref()
            .ok_or_else(|| io::Error::other("this lab guest has no vsock device"))?
            .uds;
        let mut stream = UnixStream::connect(uds)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", uds.display())))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // One byte at a time: what follows the answer is the guest's.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while answer.len() < 64 && stream.read(&mut byte)? == 1 {
            answer.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        Ok((stream, String::from_utf8_lossy(&answer).into_owned()))
    }

    /// True if every mux transport of this guest is `"up"` in `status`.
    pub fn mux_transports_up(&self, status: &Value) -> bool {
        let addresses = self.mux_addresses();
        !addresses.is_empty()
            && addresses
                .iter()
                .all(|a| transport_state(status, self.name(), a) == Some("up"))
    }

    /// What vstreamd recorded of console `name` (`"ttyS0"`, `"hvc0"`), lossy text.
    pub fn console_log(&self, name: &str) -> String {
        let data = fs::read(self.paths.console_log(self.name(), name)).unwrap_or_default();
        String::from_utf8_lossy(&data).into_owned()
    }

    /// vstreamd's log of the kernel console (ttyS0).
    pub fn guest_console_log(&self) -> String {
        self.console_log("ttyS0")
    }

    /// QEMU's own copy of ttyS0 (independent of vstreamd).
    pub fn raw_console_log(&self) -> String {
        let data = fs::read(&self.paths.sockets.ttys0_logfile).unwrap_or_default();
        String::from_utf8_lossy(&data).into_owned()
    }

    /// vstreamd's stdout and stderr so far.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(&self.paths.daemon_log).unwrap_or_default()
    }

    /// Waits until vstreamd's log of console `name` contains `needle`.
    pub fn wait_for_console(&self, name: &str, needle: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console_log(name).contains(needle) {
                return Ok(());
            }
            self.check_qemu()?;
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{needle:?} did not appear in vstreamd's {name} log {} within {} s",
                        self.paths.console_log(self.name(), name).display(),
                        timeout.as_secs()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Attaches `vstreamctl console <guest> --name <console>` on a pty, types `line` and Enter until
    /// `expect` shows up (input typed before vstreamd has attached the console is lost, so the line is
    /// typed again every 5 s), then detaches with Ctrl-]. Returns everything the terminal showed.
    pub fn console_roundtrip(
        &self,
        console: &str,
        line: &str,
        expect: &str,
        timeout: Duration,
    ) -> io::Result<String> {
        let mut command = self.ctl_command();
        command.args(["console", self.name(), "--name", console]);
        let mut pty = PtyProcess::spawn(command)?;
        let deadline = Instant::now() + timeout;
        // Until vstreamctl has put the terminal in raw mode, the pty itself would echo what we type:
        // wait for its first words (or 3 s) before typing.
        let first_words = Instant::now() + Duration::from_secs(3);
        while pty.mark() == 0 && Instant::now() < first_words {
            thread::sleep(Duration::from_millis(20));
        }
        loop {
            let mark = pty.mark();
            pty.send(format!("{line}\r").as_bytes())?;
            let left = deadline.saturating_duration_since(Instant::now());
            match pty.expect_after(mark, expect, left.min(Duration::from_secs(5))) {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline && pty.wait_timeout(Duration::ZERO)?.is_none() => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "typing {line:?} into {console} of {}: {expect:?} never showed up within {} s; \
                             the terminal showed:\n{}",
                            self.name(),
                            timeout.as_secs(),
                            pty.output_text()
                        ),
                    ))
                }
            }
        }
        // Let the rest of the output (and the next prompt) arrive before detaching.
        pty.wait_quiet(Duration::from_millis(300), Duration::from_secs(3));
        let shown = pty.output_text();
        pty.send(b"\x1d")?;
        if pty.wait_timeout(Duration::from_secs(10))?.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`vstreamctl console` did not detach within 10 s of Ctrl-]; the terminal showed:\n{shown}"),
            ));
        }
        Ok(shown)
    }

    /// Runs a QMP command on the lab's own monitor (vstreamd has another one).
    pub fn qmp(&self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let _guard = self
            .qmp_lock
            .lock()
            .map_err(|_| io::Error::other("QMP lock poisoned"))?;
        qmp::execute(
            &self.paths.sockets.qmp_lab,
            command,
            arguments,
            Duration::from_secs(10),
        )
    }
}

/// The entry of guest `guest` in a `status --json` document.
pub fn guest_status<'a>(status: &'a Value, guest: &str) -> Option<&'a Value> {
    status
        .get("guests")?
        .as_array()?
        .iter()
        .find(|g| g.get("name").and_then(Value::as_str) == Some(guest))
}

/// The `state` of the transport with `address` of guest `guest` in a `status --json` document.
pub fn transport_state<'a>(status: &'a Value, guest: &str, address: &str) -> Option<&'a str> {
    guest_status(status, guest)?
        .get("transports")?
        .as_array()?
        .iter()
        .find(|t| t.get("address").and_then(Value::as_str) == Some(address))?
        .get("state")?
        .as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn transport_state_lookup() {
        let status = json!({"guests": [{"name": "lab", "transports": [
            {"kind": "mux", "address": "unix:/a", "state": "up", "since": 1},
            {"kind": "mux", "address": "unix:/b", "state": "down", "since": 1}]}]});
        assert_eq!(transport_state(&status, "lab", "unix:/a"), Some("up"));
        assert_eq!(transport_state(&status, "lab", "unix:/b"), Some("down"));
        assert_eq!(transport_state(&status, "other", "unix:/a"), None);
    }
}
