//! End-to-end test of the web console (`vstreamd --http`) in a real headless browser: Debian's
//! chromium driven through chromedriver (WebDriver, plain HTTP and JSON), a real guest (QEMU,
//! the static agent in it), the real vstreamd and vstreamctl. The page is opened with the
//! token `vstreamctl web-token` prints, a command is typed into the guest's hvc0 through
//! xterm.js and its output read back from the page's terminal buffer; a second viewer sees the
//! same output, takes the typing over, and a read-only token watches without typing. A shell
//! opened from the page runs on a pty of the page terminal's size, follows its resize and ends
//! with the shell's exit; a read-only token cannot open one. The screenshot goes to
//! docs/devices/console-web.png. It never skips silently: without QEMU or
//! chromium it fails, unless VSTREAM_SKIP_E2E=1 is set.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use xtask::lab::testing::ctl_ok;
use xtask::lab::{self, Lab, LabOptions};

/// WebDriver's key code for Enter.
const ENTER: &str = "\u{E007}";

/// Sends keys on the page's console WebSocket directly, as a page that ignored its role would.
const SEND_AROUND_THE_PAGE: &str =
    "window.vstream.state.ws.send(new TextEncoder().encode('KEYS\\r')); return true";

/// From QEMU's start to the agent's transport being up, under TCG.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// A free TCP port on loopback (it may be taken again before it is used: unlikely enough).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// chromedriver, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; ./x.sh setup installs it)");
        let driver = Driver { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while driver
            .call("GET", "/status", None)
            .map(|v| v["ready"] == true)
            != Ok(true)
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within 30 s"
            );
            thread::sleep(Duration::from_millis(200));
        }
        driver
    }

    /// One WebDriver command: its `value`, or the error WebDriver gave.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        s.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
        // chromedriver may keep the connection open: read the header, then Content-Length bytes.
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let mut more = |raw: &mut Vec<u8>| {
            let mut chunk = [0u8; 64 * 1024];
            match s.read(&mut chunk) {
                Ok(0) => Err(format!("{method} {path}: connection closed mid-reply")),
                Ok(n) => {
                    raw.extend_from_slice(&chunk[..n]);
                    Ok(())
                }
                Err(e) => Err(format!("{method} {path}: {e}")),
            }
        };
        let split = loop {
            more(&mut raw)?;
            if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break split;
            }
        };
        let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let len = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("{method} {path}: no Content-Length in {headers}"))?;
        while raw.len() < split + 4 + len {
            more(&mut raw)?;
        }
        let body = &raw[split + 4..split + 4 + len];
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("{e}: {body:?}"))?;
        match v["value"].get("error") {
            Some(e) => Err(format!("{method} {path}: {e}: {}", v["value"]["message"])),
            None => Ok(v["value"].clone()),
        }
    }

    /// A browser session with its own profile (cookies).
    fn session(&self) -> Session<'_> {
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1100,700",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let v = self
            .call("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("a chromium session: {e}"));
        Session {
            driver: self,
            id: v["sessionId"].as_str().expect("sessionId").to_owned(),
            _profile: profile,
        }
    }
}

/// One browser (a WebDriver session), closed when dropped.
struct Session<'a> {
    driver: &'a Driver,
    id: String,
    _profile: tempfile::TempDir,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .call("DELETE", &format!("/session/{}", self.id), None);
    }
}

impl Session<'_> {
    fn cmd(&self, method: &str, what: &str, body: Value) -> Value {
        let path = format!("/session/{}/{what}", self.id);
        let body = (method == "POST").then_some(&body);
        self.driver
            .call(method, &path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "url", json!({ "url": url }));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            json!({ "script": script, "args": [] }),
        )
    }

    /// What the page's terminal holds (its whole buffer, scrollback included).
    fn terminal_text(&self) -> String {
        let v = self.js("return window.vstream ? window.vstream.text() : ''");
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until `script` returns true.
    fn wait_js(&self, what: &str, script: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.js(script) != true {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {} s; the page's terminal shows:\n{}",
                timeout.as_secs(),
                self.terminal_text()
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until the terminal shows a line that is exactly `line`.
    fn wait_line(&self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.terminal_text();
            if text.lines().any(|l| l.trim_end() == line) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{line:?} never showed up in the page's terminal within {} s; it shows:\n{text}",
                timeout.as_secs()
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Types `keys` into xterm.js as a user does (its hidden textarea has the focus).
    fn type_keys(&self, keys: &str) {
        let el = self.cmd(
            "POST",
            "element",
            json!({"using": "css selector", "value": ".xterm-helper-textarea"}),
        );
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("element id")
            .to_owned();
        self.cmd(
            "POST",
            &format!("element/{id}/value"),
            json!({ "text": keys }),
        );
    }

    fn screenshot(&self) -> Vec<u8> {
        let b64 = self.cmd("GET", "screenshot", Value::Null);
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64"))
            .expect("PNG")
    }
}

/// Opens the page with `token`, then `guest`'s console `name`, and waits until it is attached.
fn open_console(s: &Session, base: &str, token: &str, guest: &str, name: &str) {
    s.go(&format!("{base}/?token={token}"));
    s.go(&format!("{base}/#{guest}/{name}"));
    s.wait_js(
        "the console attached",
        "return !!window.vstream && \
         /^(typing|watching)/.test(document.getElementById('mode').textContent)",
        Duration::from_secs(30),
    );
}

/// Types `command` and Enter until `expect` shows up as a line of its own (the first keys may
/// reach the shell before its prompt; a line typed twice does no harm).
fn type_until(s: &Session, command: &str, expect: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        s.type_keys(&format!("{command}{ENTER}"));
        let left = deadline.saturating_duration_since(Instant::now());
        let step = left.min(Duration::from_secs(10));
        let until = Instant::now() + step;
        while Instant::now() < until {
            let text = s.terminal_text();
            if text.lines().any(|l| l.trim_end() == expect) {
                return text;
            }
            thread::sleep(Duration::from_millis(250));
        }
        assert!(
            Instant::now() < deadline,
            "typed {command:?}: {expect:?} never showed up in the page within {} s; it shows:\n{}",
            timeout.as_secs(),
            s.terminal_text()
        );
    }
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/devices/console-web.png")
}

#[test]
fn a_browser_types_into_a_guest_console_and_a_second_viewer_sees_it() {
    if !lab::e2e_enabled("a_browser_types_into_a_guest_console_and_a_second_viewer_sees_it") {
        return;
    }
    let port = free_port();
    let lab = Lab::boot(LabOptions {
        extra_config: format!("\n[daemon]\nhttp = \"127.0.0.1:{port}\"\n"),
        ..LabOptions::virtio_port_only().named("web")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    lab.wait_for("the agent's transport to be up", UP_TIMEOUT, |s| {
        lab.mux_transports_up(s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (t, long) = (Duration::from_secs(30), Duration::from_secs(60));
    let token = ctl_ok(&lab, &["web-token"], t).trim().to_owned();
    let read_only = ctl_ok(&lab, &["web-token", "--read-only"], t)
        .trim()
        .to_owned();
    assert_eq!(token.len(), 64, "{token:?}");
    assert_ne!(token, read_only);
    let base = format!("http://127.0.0.1:{port}");
    let driver = Driver::start();

    // Without a token: the login form, no page, no console.
    let stranger = driver.session();
    stranger.go(&format!("{base}/#web/hvc0"));
    let form = stranger
        .js("return !!document.querySelector('form[action=\"/login\"]') && !window.vstream");
    assert_eq!(
        form, true,
        "a browser without the token gets the login form"
    );
    stranger.go(&format!("{base}/?token={}", "0".repeat(64)));
    assert_eq!(
        stranger.js("return !window.vstream"),
        true,
        "a wrong token opens nothing"
    );
    drop(stranger);

    // First viewer: types, and reads the output from xterm.js's buffer.
    let first = driver.session();
    open_console(&first, &base, &token, "web", "hvc0");
    first.wait_js(
        "the first viewer holds the typing",
        "return window.vstream.state.writer === true",
        t,
    );
    // The guest list shows the guest, connected, with its consoles.
    first.wait_js(
        "the guest list",
        "return [...document.querySelectorAll('.guest')].some(g => \
         g.textContent.includes('web') && g.querySelector('.state-up') && \
         g.querySelector('a[data-console=\"hvc0\"]') && g.querySelector('a[data-console=\"ttyS0\"]'))",
        t,
    );
    type_until(
        &first,
        "echo web-$((6*7))",
        "web-42",
        Duration::from_secs(120),
    );

    // Second viewer (another browser): the history replayed, then the same live output.
    let second = driver.session();
    open_console(&second, &base, &token, "web", "hvc0");
    assert_eq!(
        second.js("return window.vstream.state.writer"),
        false,
        "one writer at a time"
    );
    second.wait_line("web-42", t);
    type_until(&first, "echo both-$((7*8))", "both-56", long);
    second.wait_line("both-56", t);

    // An explicit take-over: the second types now, the first only watches.
    second.js("document.getElementById('take').click(); return true");
    second.wait_js(
        "the take-over",
        "return window.vstream.state.writer === true",
        t,
    );
    type_until(&second, "echo took-$((8*9))", "took-72", long);
    first.wait_line("took-72", t);
    // Past the page's own check: the daemon drops what a viewer without the role sends.
    first.js(SEND_AROUND_THE_PAGE
        .replace("KEYS", "echo lost-$((9*9))")
        .as_str());

    // A read-only token watches and cannot type.
    let watcher = driver.session();
    open_console(&watcher, &base, &read_only, "web", "hvc0");
    watcher.wait_line("took-72", t);
    assert_eq!(watcher.js("return window.vstream.state.writer"), false);
    watcher.js(SEND_AROUND_THE_PAGE
        .replace("KEYS", "echo ro-$((5*5))")
        .as_str());
    // Something typed after both refused inputs, so that they had their chance to arrive.
    type_until(&second, "echo after-$((3*3))", "after-9", long);
    let log = lab.console_log("hvc0");
    assert!(
        !log.contains("ro-25"),
        "a read-only token typed into the guest:\n{log}"
    );
    assert!(
        !log.contains("lost-81"),
        "a viewer typed after losing the take-over:\n{log}"
    );
    // The events pane follows the daemon's events (a channel opened and closed on the guest).
    ctl_ok(&lab, &["open", "web", "diag", "echo"], t);
    watcher.wait_js(
        "the events pane",
        "return document.getElementById('events').textContent.includes('web channel-')",
        t,
    );

    // A shell from the page: a login shell on a pty of the page terminal's size, resized with
    // the page, ending with the shell.
    first.js("document.querySelector('a.shell[data-guest=\"web\"]').click(); return true");
    first.wait_js(
        "the shell attached",
        "return window.vstream.state.writer === true && \
         document.getElementById('title').textContent === 'web / shell'",
        t,
    );
    let size = |s: &Session| {
        let v = s.js("return [window.vstream.term.rows, window.vstream.term.cols]");
        format!("{} {}", v[0], v[1])
    };
    let before = size(&first);
    let text = type_until(
        &first,
        "stty size; echo sh-$((5*9))",
        "sh-45",
        Duration::from_secs(120),
    );
    assert!(
        text.lines().any(|l| l.trim_end() == before),
        "stty size in the guest must print the page terminal's {before}; the page shows:\n{text}"
    );
    // A smaller browser window: the page refits its terminal and the guest's pty follows.
    first.cmd(
        "POST",
        "window/rect",
        json!({ "width": 800, "height": 500 }),
    );
    first.js("window.vstream.fit(); return true");
    let after = size(&first);
    assert_ne!(after, before, "the page's terminal did not change size");
    let text = type_until(&first, "stty size; echo rs-$((6*6))", "rs-36", long);
    assert!(
        text.lines().any(|l| l.trim_end() == after),
        "after the resize stty size must print {after} (was {before}); the page shows:\n{text}"
    );
    eprintln!("web shell: stty size {before:?}, then {after:?} after the window shrank");
    first.type_keys(&format!("exit{ENTER}"));
    first.wait_js(
        "the page saying the shell ended",
        "return document.getElementById('mode').textContent === 'the shell exited with status 0'",
        long,
    );
    // A read-only token has no shell link, and its request for one is refused.
    assert_eq!(
        watcher.js("return !document.querySelector('a.shell')"),
        true
    );
    watcher.js(
        "const ws = new WebSocket(`ws://${location.host}/ws/shell/web?cols=80&rows=24`); \
         ws.onmessage = (e) => { window.shellReply = e.data; }; return true",
    );
    watcher.wait_js(
        "the read-only shell request's answer",
        "return typeof window.shellReply === 'string'",
        t,
    );
    let reply: Value = serde_json::from_str(
        watcher
            .js("return window.shellReply")
            .as_str()
            .unwrap_or("{}"),
    )
    .expect("a JSON control message");
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["error"].as_str().unwrap_or("").contains("read-only"),
        "{reply}"
    );

    // The second viewer's page: it holds the typing now.
    let png = second.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    std::fs::write(screenshot_path(), &png).expect("write docs/devices/console-web.png");
}
