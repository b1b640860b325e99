//! The web console (`vstreamd --http ADDR`): a page listing the guests with their live status,
//! and each guest's consoles and a shell in xterm.js over a WebSocket (docs/devices/console.md).
//!
//! Everything a page does is a control request that vstreamd serves on an in-process
//! connection ([`Daemon::serve_local`]): a console viewer is exactly the one `vstreamctl
//! console` gets (its history, one writer at a time, the take-over), a shell is the channel
//! `vstreamctl shell` opens (run by the device that offers shells, [`registry`]'s
//! `terminal`), and the token's role is checked as the control socket checks a peer's. The page and xterm.js are in the binary: no
//! network at run time.
//!
//! Access: `vstreamctl web-token` prints a token ([`Tokens`]); the page takes it once (`/?token=`
//! or the login form) and keeps it in an HttpOnly, SameSite=Strict cookie. A read-only token
//! watches and cannot type (nor open a shell).

mod frame;
mod token;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use vstream_devices::registry::{registry, PageTerminal, TerminalFn};
use vstream_devices::term::WindowSize;

pub use self::token::{Tokens, KEY_FILE};
use crate::access::Role;
use crate::control::{read_reply, write_line, Reply, Request};
use crate::daemon::Daemon;

/// The cookie that holds the token.
const COOKIE: &str = "vstream_web";

/// Lines of history a new viewer gets (from the capture log, bounded by the device's cap).
const HISTORY_LINES: usize = 10_000;

const PAGE: &str = include_str!("../../web/index.html");
const LOGIN: &str = include_str!("../../web/login.html");
const APP_JS: &[u8] = include_bytes!("../../web/app.js");
const XTERM_JS: &[u8] = include_bytes!("../../web/vendor/xterm/xterm.js");
const XTERM_CSS: &[u8] = include_bytes!("../../web/vendor/xterm/xterm.css");

/// Where the web console listens: a TCP address (keep it on loopback: the page is plain
/// HTTP) or a Unix socket path (for a reverse proxy that adds TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAddr {
    /// `127.0.0.1:8080`.
    Tcp(SocketAddr),
    /// `/run/vstream/web.sock` or `unix:/run/vstream/web.sock`.
    Unix(PathBuf),
}

impl std::str::FromStr for HttpAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<HttpAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(HttpAddr::Unix(path.into()));
        }
        if s.starts_with('/') {
            return Ok(HttpAddr::Unix(s.into()));
        }
        s.parse().map(HttpAddr::Tcp).map_err(|e| {
            format!("{s:?}: neither HOST:PORT ({e}) nor a Unix socket path (/... or unix:/...)")
        })
    }
}

impl<'de> Deserialize<'de> for HttpAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HttpAddr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A bound web console, not serving yet.
pub enum Listener {
    /// On TCP.
    Tcp(tokio::net::TcpListener),
    /// On a Unix socket.
    Unix(tokio::net::UnixListener),
}

/// Binds `addr` (a Unix socket gets the control socket's mode and group).
pub async fn bind(daemon: &Daemon, addr: &HttpAddr) -> io::Result<Listener> {
    match addr {
        HttpAddr::Tcp(a) => {
            if !a.ip().is_loopback() {
                tracing::warn!(%a, "the web console is plain HTTP on a non-loopback address");
            }
            Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?))
        }
        HttpAddr::Unix(path) => Ok(Listener::Unix(daemon.bind_control(path)?)),
    }
}

/// Serves the web console on `listener` forever.
pub async fn serve(daemon: Arc<Daemon>, listener: Listener) -> io::Result<()> {
    let tokens = daemon.web_tokens()?;
    let app = router(Arc::new(Web { daemon, tokens }));
    match listener {
        Listener::Tcp(l) => {
            tracing::info!(address = %l.local_addr()?, "web console ready");
            axum::serve(l, app).await
        }
        Listener::Unix(l) => {
            tracing::info!(address = ?l.local_addr()?, "web console ready");
            axum::serve(l, app).await
        }
    }
}

struct Web {
    daemon: Arc<Daemon>,
    tokens: Tokens,
}

fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route(
            "/xterm.js",
            get(|| async { asset("text/javascript", XTERM_JS) }),
        )
        .route("/xterm.css", get(|| async { asset("text/css", XTERM_CSS) }))
        .route("/api/guests", get(guests))
        .route("/ws/events", get(events_ws))
        .route("/ws/console/{guest}/{name}", get(console_ws))
        .route("/ws/shell/{guest}", get(shell_ws))
        .with_state(web)
}

impl Web {
    /// The role of the request's cookie, if it holds a valid token.
    fn role(&self, headers: &HeaderMap) -> Option<Role> {
        cookie_role(&self.tokens, headers)
    }

    /// The cookie for a valid token (and back to the page), or the login form again.
    fn sign_in(&self, token: &str) -> Response {
        match self.tokens.check(token.trim()) {
            Some(_) => {
                let cookie = format!(
                    "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                    token.trim()
                );
                (
                    StatusCode::SEE_OTHER,
                    [
                        (header::LOCATION, "/".to_owned()),
                        (header::SET_COOKIE, cookie),
                    ],
                )
                    .into_response()
            }
            None => login_page(StatusCode::UNAUTHORIZED, "That token is not valid."),
        }
    }
}

/// The role of the token in the request's cookie, if it is a valid one.
fn cookie_role(tokens: &Tokens, headers: &HeaderMap) -> Option<Role> {
    let cookies = headers.get_all(header::COOKIE).into_iter();
    let pairs = cookies
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'));
    pairs
        .filter_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .find_map(|t| tokens.check(t))
}

/// A page may open a WebSocket only from its own origin (a cookie alone would let any site
/// the user visits open one).
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => {
            host.is_some_and(|h| origin.split_once("://").map(|(_, o)| o) == Some(h))
        }
        Some(Err(_)) => false,
    }
}

fn login_page(status: StatusCode, message: &str) -> Response {
    (status, Html(LOGIN.replace("{message}", message))).into_response()
}

fn asset(content_type: &'static str, body: &'static [u8]) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type)], body)
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "no valid web token (vstreamctl web-token)",
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

async fn index(
    State(web): State<Arc<Web>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(token) = q.token {
        return web.sign_in(&token);
    }
    match web.role(&headers) {
        Some(_) => (
            [(
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'",
            )],
            Html(PAGE),
        )
            .into_response(),
        None => login_page(StatusCode::OK, "Paste the output of vstreamctl web-token."),
    }
}

async fn login(State(web): State<Arc<Web>>, Form(f): Form<TokenForm>) -> Response {
    web.sign_in(&f.token)
}

/// Every guest's status line with the names of its consoles, and the page's role.
async fn guests(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let Some(role) = web.role(&headers) else {
        return unauthorized();
    };
    let guests: Vec<_> = web
        .daemon
        .all_guests()
        .iter()
        .map(|g| {
            let consoles: Vec<String> = g.consoles().into_iter().map(|(_, n)| n).collect();
            json!({ "status": g.status(), "consoles": consoles })
        })
        .collect();
    let role = match role {
        Role::Owner => "owner",
        Role::ReadOnly => "read-only",
    };
    let body = json!({ "role": role, "guests": guests }).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A control request on an in-process connection, served with `role`: its reply, and the
/// connection for what follows.
async fn local_request(
    daemon: &Arc<Daemon>,
    role: Role,
    req: &Request,
) -> io::Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf, Reply)> {
    let (ours, theirs) = UnixStream::pair()?;
    let d = daemon.clone();
    tokio::spawn(async move {
        if let Err(e) = d.serve_local(role, theirs).await {
            tracing::debug!("web console request: {e}");
        }
    });
    let (r, mut w) = ours.into_split();
    let mut r = BufReader::new(r);
    write_line(&mut w, req).await?;
    let reply = read_reply(&mut r).await?;
    Ok((r, w, reply))
}

/// `/ws/events`: each event as a text message.
async fn events_ws(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(role) = web.role(&headers).filter(|_| same_origin(&headers)) else {
        return unauthorized();
    };
    ws.max_message_size(frame::MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = events(&web.daemon, role, socket).await {
                tracing::debug!("web console events: {e}");
            }
        })
}

async fn events(daemon: &Arc<Daemon>, role: Role, mut socket: WebSocket) -> io::Result<()> {
    let (mut r, _w, _) = local_request(daemon, role, &Request::Events { guest: None }).await?;
    loop {
        tokio::select! {
            ev = read_reply::<_, serde_json::Value>(&mut r) => {
                let text = ev?.to_string();
                socket.send(axum::extract::ws::Message::Text(text.into())).await.map_err(io::Error::other)?;
            }
            // The page says nothing here; it only closes.
            msg = socket.recv() => if !matches!(msg, Some(Ok(_))) {
                return Ok(());
            },
        }
    }
}

#[derive(Deserialize)]
struct ConsoleQuery {
    /// Take the writer role from whoever holds it.
    #[serde(default)]
    take: bool,
}

/// `/ws/console/{guest}/{name}`: the console's history then its output (binary messages),
/// the page's keys to the guest if it holds the writer role.
async fn console_ws(
    State(web): State<Arc<Web>>,
    Path((guest, name)): Path<(String, String)>,
    Query(q): Query<ConsoleQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(role) = web.role(&headers).filter(|_| same_origin(&headers)) else {
        return unauthorized();
    };
    let op = web.daemon.guest(&guest).and_then(|g| {
        let consoles = g.consoles().into_iter();
        consoles
            .filter(|(_, n)| *n == name)
            .map(|(op, _)| op)
            .next()
    });
    let Some(op) = op else {
        let why = format!("guest {guest:?} has no console {name:?}");
        return (StatusCode::NOT_FOUND, why).into_response();
    };
    let owner = role == Role::Owner;
    let fields = json!({
        "name": name, "tail": HISTORY_LINES, "follow": true,
        "attach": owner, "take": owner && q.take,
    });
    let req = Request::device(op, &guest, fields);
    ws.max_message_size(frame::MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = console(&web.daemon, role, req, socket).await {
                tracing::debug!(%guest, console = %name, "web console viewer: {e}");
            }
        })
}

async fn console(
    daemon: &Arc<Daemon>,
    role: Role,
    req: Request,
    mut socket: WebSocket,
) -> io::Result<()> {
    let (mut r, mut w, reply) = local_request(daemon, role, &req).await?;
    let send_err = io::Error::other;
    socket
        .send(frame::attached(&reply))
        .await
        .map_err(send_err)?;
    if !reply.ok {
        return Ok(());
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = r.read(&mut buf) => match n? {
                0 => return Ok(()),
                n => socket.send(frame::output(&buf[..n])).await.map_err(send_err)?,
            },
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else { return Ok(()) };
                match frame::decode(msg) {
                    // A watcher's keys go nowhere: its viewer reads no input.
                    Ok(frame::FromPage::Keys(keys)) if role == Role::Owner => w.write_all(&keys).await?,
                    Ok(frame::FromPage::Keys(_) | frame::FromPage::Keepalive) => {}
                    // A console stream carries no window size (no virtio-console F_SIZE in
                    // QEMU); the page fits its own terminal.
                    Ok(frame::FromPage::Resize { cols, rows }) => {
                        tracing::debug!(cols, rows, "web console resized");
                    }
                    Ok(frame::FromPage::Close) => return Ok(()),
                    Err(why) => {
                        socket.send(frame::error(&why)).await.map_err(send_err)?;
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct ShellQuery {
    /// The page terminal's size, which the shell's pty starts with.
    cols: u16,
    rows: u16,
}

/// `/ws/shell/{guest}?cols=C&rows=R`: a login shell in the guest on a pty of that size, bytes
/// both ways as a console's, resizes reaching the pty, and how the shell ended last.
async fn shell_ws(
    State(web): State<Arc<Web>>,
    Path(guest): Path<String>,
    Query(q): Query<ShellQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(role) = web.role(&headers).filter(|_| same_origin(&headers)) else {
        return unauthorized();
    };
    let size = match frame::window_size(q.cols, q.rows) {
        Ok(size) => size,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    let Some((class, run)) = registry().terminal() else {
        return (StatusCode::NOT_FOUND, "no device offers a shell").into_response();
    };
    // The daemon refuses a read-only role here as on the control socket.
    let req = Request::Open {
        guest: guest.clone(),
        class: class.to_owned(),
        name: String::new(),
    };
    ws.max_message_size(frame::MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let page = (size, socket);
            if let Err(e) = shell(&web.daemon, role, req, run, page).await {
                tracing::debug!(%guest, "web console shell: {e}");
            }
        })
}

async fn shell(
    daemon: &Arc<Daemon>,
    role: Role,
    req: Request,
    run: TerminalFn,
    (size, mut socket): (WindowSize, WebSocket),
) -> io::Result<()> {
    let (r, w, reply) = local_request(daemon, role, &req).await?;
    let send_err = io::Error::other;
    // The shell is the page's own: it types.
    let reply = Reply {
        writer: Some(reply.ok),
        ..reply
    };
    socket
        .send(frame::attached(&reply))
        .await
        .map_err(send_err)?;
    if !reply.ok {
        return Ok(());
    }
    let (mut keys, keys_r) = tokio::io::duplex(frame::MAX_MESSAGE);
    let (out_w, mut out) = tokio::io::duplex(64 * 1024);
    let (err_w, mut err) = tokio::io::duplex(64 * 1024);
    let (resize, resizes) = mpsc::unbounded_channel();
    let page = PageTerminal {
        size,
        keys: Box::new(keys_r),
        stdout: Box::new(out_w),
        stderr: Box::new(err_w),
        resizes,
    };
    let session = run(Box::new(r), Box::new(w), page);
    tokio::pin!(session);
    let (mut buf, mut ebuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let ended = loop {
        tokio::select! {
            ended = &mut session => break ended,
            Ok(n @ 1..) = out.read(&mut buf) => {
                socket.send(frame::output(&buf[..n])).await.map_err(send_err)?;
            }
            Ok(n @ 1..) = err.read(&mut ebuf) => {
                socket.send(frame::output(&ebuf[..n])).await.map_err(send_err)?;
            }
            msg = socket.recv() => {
                // The page gone: dropping the session closes the channel, which hangs the
                // shell up.
                let Some(Ok(msg)) = msg else { return Ok(()) };
                match frame::decode(msg) {
                    Ok(frame::FromPage::Keys(k)) => keys.write_all(&k).await?,
                    Ok(frame::FromPage::Resize { cols, rows }) => {
                        // Unsent only if the session is ending.
                        let _ = resize.send(WindowSize { rows, cols });
                    }
                    Ok(frame::FromPage::Keepalive) => {}
                    Ok(frame::FromPage::Close) => return Ok(()),
                    Err(why) => {
                        socket.send(frame::error(&why)).await.map_err(send_err)?;
                        return Ok(());
                    }
                }
            }
        }
    };
    // The session's end dropped its writers: what they hold goes out before the end.
    for stream in [&mut out, &mut err] {
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            socket
                .send(frame::output(&buf[..n]))
                .await
                .map_err(send_err)?;
        }
    }
    socket.send(frame::ended(&ended)).await.map_err(send_err)?;
    let close = axum::extract::ws::Message::Close(None);
    socket.send(close).await.map_err(send_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_tcp_or_unix_paths() {
        assert_eq!(
            "127.0.0.1:8080".parse::<HttpAddr>(),
            Ok(HttpAddr::Tcp("127.0.0.1:8080".parse().expect("addr")))
        );
        assert_eq!(
            "/run/vstream/web.sock".parse::<HttpAddr>(),
            Ok(HttpAddr::Unix("/run/vstream/web.sock".into()))
        );
        assert_eq!(
            "unix:web.sock".parse::<HttpAddr>(),
            Ok(HttpAddr::Unix("web.sock".into()))
        );
        assert!("localhost".parse::<HttpAddr>().is_err());
    }

    #[test]
    fn the_cookie_gives_its_tokens_role_and_websockets_need_the_same_origin() {
        let tokens = Tokens::from_key(&[1; 32]);
        let headers = |pairs: &[(header::HeaderName, String)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(k, v.parse().expect("header value"));
            }
            h
        };
        let owner = tokens.for_role(Role::Owner);
        let ro = tokens.for_role(Role::ReadOnly);
        let with = |v: String| headers(&[(header::COOKIE, v)]);
        assert_eq!(
            cookie_role(&tokens, &with(format!("a=b; {COOKIE}={owner}"))),
            Some(Role::Owner)
        );
        assert_eq!(
            cookie_role(&tokens, &with(format!("{COOKIE}={ro}"))),
            Some(Role::ReadOnly)
        );
        assert_eq!(cookie_role(&tokens, &with(format!("{COOKIE}=x{ro}"))), None);
        assert_eq!(cookie_role(&tokens, &with(format!("other={owner}"))), None);
        assert_eq!(cookie_role(&tokens, &HeaderMap::new()), None);
        let site = |origin: &str| {
            headers(&[
                (header::HOST, "127.0.0.1:8080".into()),
                (header::ORIGIN, origin.into()),
            ])
        };
        assert!(same_origin(&site("http://127.0.0.1:8080")));
        assert!(!same_origin(&site("http://evil.example")));
        assert!(!same_origin(&site("http://127.0.0.1:8080.evil.example")));
    }
}
