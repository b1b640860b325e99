//! A lab guest with three QGA routes, shared by `xtask/tests/qga.rs` and `cargo xtask
//! bench-qga`, plus a small blocking QGA client for them.
//!
//! | vstreamd guest | route | guest side |
//! |---|---|---|
//! | `qga` | a `qga` channel of the multiplexer (virtio port `org.vstream.0`) | vstream-agent |
//! | `qga-raw` | raw `qga` transport, virtio port `org.vstream.qga.0` | vstream-agent (`vstream.qga=`) |
//! | `qga-ga` | raw `qga` transport, virtio port `org.qemu.guest_agent.0` | Debian's qemu-ga |
//! | - (its chardev only) | virtio port `org.vstream.qga.floor` | `cat`, when started ([`QgaLab::start_floor`]) |
//!
//! The three extra virtio ports are added with `LabOptions::extra_qemu_args`; this runs its own
//! vstreamd (the lab's config plus the two raw transports) on the lab's control socket. qemu-ga
//! is started in the guest through vstream-agent's `guest-exec` ([`QgaLab::start_qemu_ga`]).
//! The third port measures the route itself: `cat` echoing every request back is what no agent
//! can beat.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::lab::{self, Lab, LabOptions};
use crate::process;
use crate::qemu::extra_virtio_port;

/// The virtio port QGA clients (libvirt, QEMU's own tools) use.
pub const QGA_PORT: &str = "org.qemu.guest_agent.0";

/// From QEMU's start to the agent's transport being up, under TCG.
pub const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// The shell line that starts qemu-ga on its port (busybox has no udev: the port is found by
/// name).
pub const START_QEMU_GA: &str = "for p in /sys/class/virtio-ports/*; do \
     [ \"$(cat $p/name)\" = org.qemu.guest_agent.0 ] && \
     exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/${p##*/} -d -f /run/qemu-ga.pid -t /run; \
     done; exit 9";

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        process::terminate(&mut self.0, Duration::from_millis(500));
    }
}

/// The guest and its vstreamd. Dropping it stops vstreamd, then the guest.
pub struct QgaLab {
    // Declared first: dropped (vstreamd stopped) before the lab.
    _daemon: Guard,
    /// The lab (its vstreamd is the one started here).
    pub lab: Lab,
    /// Directory of the two extra chardev sockets.
    pub dir: PathBuf,
    /// QEMU's chardev of `org.qemu.guest_agent.0` (qemu-ga).
    pub ga_sock: PathBuf,
    /// QEMU's chardev of `org.vstream.qga.0` (vstream-agent's raw QGA port).
    pub raw_sock: PathBuf,
    /// QEMU's chardev of [`FLOOR_PORT`].
    pub floor_sock: PathBuf,
}

/// The port on which [`QgaLab::start_floor`] runs `cat`.
pub const FLOOR_PORT: &str = "org.vstream.qga.floor";

impl QgaLab {
    /// Boots guest `name` with `memory_mib` MiB and the three extra ports, starts vstreamd and
    /// waits for the agent's mux transport.
    pub fn boot(name: &str, memory_mib: u32) -> io::Result<QgaLab> {
        // The extra chardevs live in a directory of ours (the lab's own is made during boot).
        let dir = std::env::temp_dir().join(format!("vstream-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ga_sock = dir.join("ga.sock");
        let raw_sock = dir.join("raw.sock");
        let floor_sock = dir.join("floor.sock");
        let mut qemu_args = Vec::new();
        for (id, sock, nr, port) in [
            ("qgaga", &ga_sock, 2, QGA_PORT),
            ("qgaraw", &raw_sock, 3, "org.vstream.qga.0"),
            ("qgafloor", &floor_sock, 4, FLOOR_PORT),
        ] {
            qemu_args.extend(extra_virtio_port(id, sock, nr, port).map_err(io::Error::other)?);
        }
        let options = LabOptions {
            memory_mib,
            start_daemon: false,
            extra_qemu_args: qemu_args,
            extra_kernel_args: vec!["vstream.qga=port:org.vstream.qga.0".to_owned()],
            ..LabOptions::virtio_port_only().named(name)
        };
        let lab = Lab::boot(options)?;

        // vstreamd: the lab's guest plus two guests reached through raw qga transports.
        let p = lab.paths();
        let mut config = lab::vstreamd_config(name, &p.sockets);
        for (guest, sock) in [("qga-ga", &ga_sock), ("qga-raw", &raw_sock)] {
            config.push_str(&format!(
                "\n[[guest]]\nname = \"{guest}\"\n[[guest.transport]]\nkind = \"qga\"\naddress = \"unix:{}\"\n",
                sock.display()
            ));
        }
        std::fs::create_dir_all(&p.state_dir)?;
        std::fs::write(&p.config, config)?;
        let log = std::fs::File::create(&p.daemon_log)?;
        let daemon = Guard(process::spawn(p.vstreamd_command(log)?)?);
        lab.wait_for("the agent's transport to be up", UP_TIMEOUT, |s| {
            lab.mux_transports_up(s)
        })?;
        Ok(QgaLab {
            _daemon: daemon,
            lab,
            dir,
            ga_sock,
            raw_sock,
            floor_sock,
        })
    }

    /// A QGA connection through vstreamd (`{"op":"agent"}`, as `vstreamctl agent`) to `guest`
    /// (`qga`, `qga-raw` or `qga-ga`), synchronised.
    pub fn connect(&self, guest: &str) -> io::Result<QgaConn> {
        QgaConn::via_control(&self.lab.paths().control, guest)
    }

    /// Connects to [`FLOOR_PORT`]'s chardev, then starts `cat` on the port in the guest (it
    /// would read the end of its input if it opened the port before the host side was
    /// connected), and returns the connection: what is written on it comes back.
    pub fn start_floor(&self) -> io::Result<UnixStream> {
        let stream = UnixStream::connect(&self.floor_sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let line = format!(
            "for p in /sys/class/virtio-ports/*; do \
             [ \"$(cat $p/name)\" = {FLOOR_PORT} ] && \
             {{ setsid sh -c 'exec cat <&3 >&3' 3<>/dev/${{p##*/}} </dev/null >/dev/null 2>&1 & exit 0; }}; \
             done; exit 9"
        );
        let mut conn = self.connect(self.lab.name())?;
        let (code, _) = conn.exec("sh", &["-c", &line])?;
        if code != 0 {
            return Err(io::Error::other(format!(
                "cat did not start on {FLOOR_PORT} (exit {code})"
            )));
        }
        Ok(stream)
    }

    /// Starts qemu-ga in the guest through vstream-agent's `guest-exec` (mux channel).
    pub fn start_qemu_ga(&self) -> io::Result<()> {
        let mut conn = self.connect(self.lab.name())?;
        let (code, _) = conn.exec("sh", &["-c", START_QEMU_GA])?;
        if code != 0 {
            return Err(io::Error::other(format!(
                "qemu-ga did not start in the guest (exit {code})"
            )));
        }
        Ok(())
    }
}

/// A blocking QGA client on one stream: requests and replies are JSON objects, each reply
/// ends with `\n`; the reply to `guest-sync-delimited` is preceded by 0xFF.
pub struct QgaConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
}

impl QgaConn {
    /// A raw QGA stream through vstreamd's control socket (`{"op":"agent","guest":G}`).
    pub fn via_control(control: &Path, guest: &str) -> io::Result<QgaConn> {
        let stream = UnixStream::connect(control)?;
        let mut conn = QgaConn::new(stream)?;
        let req = json!({"op": "agent", "guest": guest});
        conn.writer.write_all(format!("{req}\n").as_bytes())?;
        let mut line = String::new();
        conn.reader.read_line(&mut line)?;
        let reply: Value = serde_json::from_str(&line)
            .map_err(|e| io::Error::other(format!("vstreamd agent {guest}: {e}: {line:?}")))?;
        if reply["ok"] != true {
            return Err(io::Error::other(format!("vstreamd agent {guest}: {line}")));
        }
        conn.sync()?;
        Ok(conn)
    }

    /// A raw QGA stream on a QEMU chardev socket (one client at a time).
    pub fn direct(sock: &Path) -> io::Result<QgaConn> {
        QgaConn::over(UnixStream::connect(sock)?)
    }

    /// A raw QGA stream on a connected socket (e.g. one a hybrid vsock `CONNECT` opened),
    /// synchronised.
    pub fn over(stream: UnixStream) -> io::Result<QgaConn> {
        let mut conn = QgaConn::new(stream)?;
        conn.sync()?;
        Ok(conn)
    }

    fn new(stream: UnixStream) -> io::Result<QgaConn> {
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let writer = stream.try_clone()?;
        Ok(QgaConn {
            reader: BufReader::with_capacity(1 << 20, stream),
            writer,
            line: Vec::new(),
        })
    }

    /// 0xFF plus `guest-sync-delimited` with a fresh id; drops everything up to its reply.
    pub fn sync(&mut self) -> io::Result<()> {
        let id = i64::from(std::process::id()) << 20
            | i64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_micros()),
            );
        let req = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        let mut bytes = vec![0xFF];
        bytes.extend_from_slice(req.to_string().as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        for _ in 0..1000 {
            let v = self.recv_raw()?;
            if v.as_ref()
                .and_then(|v| v.get("return"))
                .and_then(Value::as_i64)
                == Some(id)
            {
                return Ok(());
            }
        }
        Err(io::Error::other("no reply to guest-sync-delimited"))
    }

    /// Sends one request without waiting for its reply.
    pub fn send(&mut self, request: &Value) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(request).map_err(io::Error::other)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)
    }

    /// The next reply line as JSON (`None`: not JSON, e.g. stale bytes before a sync).
    fn recv_raw(&mut self) -> io::Result<Option<Value>> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest agent closed the stream",
            ));
        }
        let start = self.line.iter().position(|b| *b != 0xFF).unwrap_or(n);
        Ok(serde_json::from_slice(&self.line[start..]).ok())
    }

    /// Sends `request` and returns the whole reply object (`return` or `error`).
    pub fn request(&mut self, request: &Value) -> io::Result<Value> {
        self.send(request)?;
        self.recv_raw()?
            .ok_or_else(|| io::Error::other(format!("{request}: the reply is not JSON")))
    }

    /// The next reply: its `return` value, or an error carrying the guest's error.
    pub fn recv(&mut self) -> io::Result<Value> {
        match self.recv_raw()? {
            Some(Value::Object(mut m)) => match m.remove("return") {
                Some(v) => Ok(v),
                None => Err(io::Error::other(format!(
                    "guest agent error: {}",
                    Value::Object(m)
                ))),
            },
            other => Err(io::Error::other(format!("not a QGA reply: {other:?}"))),
        }
    }

    /// Sends `request` and returns its `return` value.
    pub fn call(&mut self, request: &Value) -> io::Result<Value> {
        self.send(request)?;
        self.recv()
    }

    /// Runs a program in the guest with `guest-exec`; its exit code and stdout.
    pub fn exec(&mut self, path: &str, args: &[&str]) -> io::Result<(i64, Vec<u8>)> {
        let r = self.call(&json!({"execute": "guest-exec", "arguments": {
            "path": path, "arg": args, "capture-output": true}}))?;
        let pid = r["pid"]
            .as_i64()
            .ok_or_else(|| io::Error::other(format!("guest-exec: {r}")))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let st =
                self.call(&json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}))?;
            if st["exited"] == true {
                let out = match st["out-data"].as_str() {
                    Some(s) => base64_decode(s.as_bytes())
                        .ok_or_else(|| io::Error::other("out-data is not base64"))?,
                    None => Vec::new(),
                };
                return Ok((st["exitcode"].as_i64().unwrap_or(-1), out));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("{path} never finished")));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads a whole guest file with `guest-file-open`/`-read`/`-close`: `chunk` bytes per read,
    /// `depth` reads in flight (replies come in order); appends the data to `out`.
    pub fn read_file(
        &mut self,
        path: &str,
        chunk: usize,
        depth: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.read_file_b64(path, chunk, depth, &mut |b64| {
            let data = base64_decode(b64)
                .ok_or_else(|| io::Error::other("guest-file-read: not base64"))?;
            out.extend_from_slice(&data);
            Ok(())
        })
        .map(drop)
    }

    /// As [`QgaConn::read_file`], but hands each reply's `buf-b64` (checked to be base64 of
    /// `count` bytes, at most `chunk`) to `sink` undecoded; returns the bytes read. The big
    /// string is cut out of the reply without a JSON parser (base64 needs no escapes; one
    /// with a backslash falls back to serde_json), so the client costs little per byte even
    /// in a debug build.
    pub fn read_file_b64(
        &mut self,
        path: &str,
        chunk: usize,
        depth: usize,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<u64> {
        let handle = self.call(&json!({"execute": "guest-file-open",
            "arguments": {"path": path, "mode": "r"}}))?;
        let handle = handle
            .as_i64()
            .ok_or_else(|| io::Error::other(format!("guest-file-open: {handle}")))?;
        let read = json!({"execute": "guest-file-read",
            "arguments": {"handle": handle, "count": chunk}});
        let mut in_flight = 0;
        let mut eof = false;
        let mut total = 0u64;
        loop {
            while !eof && in_flight < depth.max(1) {
                self.send(&read)?;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the guest agent closed the stream",
                ));
            }
            in_flight -= 1;
            let line = std::mem::take(&mut self.line);
            let (count, at_eof) = file_read_reply(&line, chunk, sink)?;
            self.line = line;
            total += count;
            eof |= at_eof || count == 0;
        }
        self.call(&json!({"execute": "guest-file-close", "arguments": {"handle": handle}}))?;
        Ok(total)
    }

    /// A small guest file, read whole (64 KiB per read).
    pub fn read_small(&mut self, path: &str) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_file(path, 64 << 10, 1, &mut out)?;
        Ok(out)
    }
}

/// Sends one QGA command and returns the whole reply object (`return` or `error`), through
/// whichever route a test checks (`vstreamctl agent`, a [`QgaConn`]).
pub type Request<'a> = dyn FnMut(&Value) -> Value + 'a;

/// The `return` value of the reply to `cmd`; panics with the reply if it is an error.
pub fn expect_return(guest: &str, request: &mut Request<'_>, cmd: Value) -> Value {
    let reply = request(&cmd);
    match reply.get("return") {
        Some(v) => v.clone(),
        None => panic!("{guest} {cmd}: {reply}"),
    }
}

/// Runs a program in the guest with `guest-exec` and polls `guest-exec-status` (at most 120 s):
/// its exit code and stdout. Panics on an error reply.
pub fn exec_via(
    guest: &str,
    request: &mut Request<'_>,
    path: &str,
    args: &[&str],
) -> (i64, Vec<u8>) {
    let started = expect_return(
        guest,
        request,
        json!({"execute": "guest-exec", "arguments": {
            "path": path, "arg": args, "capture-output": true}}),
    );
    let pid = started["pid"].as_i64().expect("pid");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = expect_return(
            guest,
            request,
            json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        );
        if st["exited"] == true {
            let out = st["out-data"].as_str().map_or_else(Vec::new, |s| {
                base64_decode(s.as_bytes()).expect("out-data is base64")
            });
            return (st["exitcode"].as_i64().unwrap_or(-1), out);
        }
        assert!(Instant::now() < deadline, "{guest}: {path} never finished");
        thread::sleep(Duration::from_millis(200));
    }
}

/// The QGA checks every route into a guest passes (`xtask/tests/qga.rs`, and
/// `xtask/tests/entropy.rs` in a guest without entropy): ping, sync, info, host name, OS info,
/// network interfaces, the errors of an unknown command and of a bad handle, and `guest-exec`
/// with its output and exit code. `host_name` is the guest's. Panics with the command and the
/// reply that were wrong.
pub fn check_common_commands(guest: &str, host_name: &str, request: &mut Request<'_>) {
    assert_eq!(
        expect_return(guest, request, json!({"execute": "guest-ping"})),
        json!({})
    );
    assert_eq!(
        expect_return(
            guest,
            request,
            json!({"execute": "guest-sync", "arguments": {"id": 4_242_424_242i64}})
        ),
        json!(4_242_424_242i64)
    );
    let info = expect_return(guest, request, json!({"execute": "guest-info"}));
    assert!(info["supported_commands"]
        .as_array()
        .expect("commands")
        .iter()
        .any(|c| c["name"] == "guest-file-open"));
    let host = expect_return(guest, request, json!({"execute": "guest-get-host-name"}));
    assert_eq!(host["host-name"], host_name, "{guest}");
    let os = expect_return(guest, request, json!({"execute": "guest-get-osinfo"}));
    assert_eq!(os["machine"], "x86_64", "{guest}: {os}");
    assert!(
        os["kernel-release"]
            .as_str()
            .is_some_and(|r| r.starts_with("6.1.")),
        "{guest}: {os}"
    );
    let ifs = expect_return(
        guest,
        request,
        json!({"execute": "guest-network-get-interfaces"}),
    );
    assert!(
        ifs.as_array()
            .expect("list")
            .iter()
            .any(|i| i["name"] == "lo"),
        "{guest}: {ifs}"
    );
    let e = request(&json!({"execute": "guest-no-such-command"}));
    assert_eq!(e["error"]["class"], "CommandNotFound", "{guest}: {e}");
    let e = request(&json!({"execute": "guest-file-close", "arguments": {"handle": 31_337}}));
    assert_eq!(
        e["error"]["desc"], "handle '31337' has not been found",
        "{guest}: {e}"
    );
    let (code, out) = exec_via(guest, request, "sh", &["-c", "echo $((6 * 7)); exit 3"]);
    assert_eq!((code, out), (3, b"42\n".to_vec()), "{guest}");
}

/// One `guest-file-read` reply line: `(count, eof)`; its `buf-b64` goes to `sink`.
fn file_read_reply(
    line: &[u8],
    chunk: usize,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<(u64, bool)> {
    let bad = |what: &str| io::Error::other(format!("guest-file-read: {what}"));
    let text = std::str::from_utf8(line).map_err(|_| bad("reply is not UTF-8"))?;
    const KEY: &str = "\"buf-b64\"";
    // The big string's bounds: after `"buf-b64"`, optional blanks, `:`, blanks, `"`.
    let cut = text.find(KEY).and_then(|k| {
        let rest = &text[k + KEY.len()..];
        let rest_trim = rest.trim_start().strip_prefix(':')?.trim_start();
        let start = text.len() - rest_trim.len() + 1;
        rest_trim.strip_prefix('"')?;
        let len = text[start..].find('"')?;
        Some((k, start, start + len))
    });
    let (meta, b64): (Value, std::borrow::Cow<'_, [u8]>) = match cut {
        Some((k, start, end)) if !text[start..end].contains('\\') => {
            // The reply without the big string, for the small fields.
            let small = format!("{}\"\":\"\"{}", &text[..k], &text[end + 1..]);
            let v = serde_json::from_str(&small).map_err(|e| bad(&format!("{e}")))?;
            (v, line[start..end].into())
        }
        _ => {
            let v: Value = serde_json::from_str(text).map_err(|e| bad(&format!("{e}")))?;
            let b64 = v["return"]["buf-b64"]
                .as_str()
                .unwrap_or("")
                .as_bytes()
                .to_vec();
            (v, b64.into())
        }
    };
    let Some(ret) = meta.get("return") else {
        return Err(bad(&format!("error reply {meta}")));
    };
    let count = ret["count"].as_u64().ok_or_else(|| bad("no count"))?;
    let len = b64.len();
    let pad = b64.iter().rev().take_while(|c| **c == b'=').count();
    let decoded = (len / 4 * 3).checked_sub(pad);
    if len % 4 != 0 || pad > 2 || decoded != Some(count as usize) || count as usize > chunk {
        return Err(bad(&format!(
            "asked for at most {chunk} bytes, got {len} base64 characters claiming {count}"
        )));
    }
    sink(&b64)?;
    Ok((count, ret["eof"] == true))
}

/// Standard base64 (with padding) to bytes; `None` if malformed.
pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64() {
        assert_eq!(base64_decode(b"").unwrap(), b"");
        assert_eq!(base64_decode(b"Zg==").unwrap(), b"f");
        assert_eq!(base64_decode(b"Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode(b"Zm9v").unwrap(), b"foo");
        assert_eq!(base64_decode(b"Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(base64_decode(b"Zm9vYg==").unwrap(), b"foob");
        assert!(base64_decode(b"Zm9").is_none());
        assert!(base64_decode(b"Z!9v").is_none());
        assert!(base64_decode(b"Z===").is_none());
    }
}
