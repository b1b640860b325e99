//! A guest is what its transport proves (docs/THREAT-MODEL.md, "Identity"): vstreamd as a
//! process, real Unix and TCP sockets, a real other uid. Connections that claim a live guest's
//! name without proving it are refused with a reason, and the guest sees nothing of them.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_agent::{Agent, AgentOptions};
use vstream_wire::auth::{self, Challenge, Claim, Key};
use vstream_wire::frame::{encode, Decoder, Kind};
use vstream_wire::{Hello, Role};

use common::{ctl_async, ok, Options};

const KEY: &[u8] = b"the good guest's key: 32+ bytes!";

/// A HELLO frame from a guest that calls itself `name`.
fn hello(name: &str) -> Vec<u8> {
    let h = Hello {
        version: 1,
        role: Role::Guest,
        caps: 1,
        my_session: rand::random::<u64>() | 1,
        your_session: 0,
        recv_next: 0,
        max_frame: 65536,
        link: rand::random::<u32>() | 1,
        echo: 0,
        name: name.to_owned(),
    };
    let mut out = Vec::new();
    encode(&mut out, Kind::Hello as u8, 0, 0, 0, &h.encode());
    out
}

/// Connects to `path` as `uid` (this thread only: the test process stays root), says HELLO as
/// `name`, and returns the daemon's refusal.
fn claim_over_unix_as(uid: u32, path: &Path, name: &str) -> Option<String> {
    let (path, name) = (path.to_owned(), name.to_owned());
    std::thread::spawn(move || {
        if uid != 0 {
            rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)).expect("setuid");
        }
        let mut s = UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&hello(&name)).expect("hello");
        answer(|buf| s.read(buf))
    })
    .join()
    .expect("thread")
}

/// Reads the daemon's answer to a HELLO: `Some(reason)` for a REFUSE frame, `None` when it
/// accepted (its own HELLO came) or said nothing before closing.
fn answer(mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>) -> Option<String> {
    let mut d = Decoder::new(1 << 20);
    let mut buf = [0u8; 4096];
    loop {
        let n = read(&mut buf).ok().filter(|n| *n > 0)?;
        d.push(&buf[..n]);
        for f in d.by_ref().flatten() {
            if f.header.kind == Kind::Refuse as u8 {
                return Some(String::from_utf8_lossy(&f.payload).into_owned());
            }
            if f.header.kind == Kind::Hello as u8 {
                return None;
            }
        }
    }
}

/// A plain TCP connection (no key) that says HELLO as `name`.
async fn claim_over_plain_tcp(port: u16, name: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&hello(name)).await.expect("hello");
    let s = s.into_std().expect("std");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tokio::task::spawn_blocking(move || answer(|buf| (&s).read(buf)))
        .await
        .expect("join")
}

/// A TCP connection that claims `name` in the key handshake but cannot prove it: the daemon's
/// verdict.
async fn claim_with_a_forged_proof(port: u16, name: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let claim = Claim {
        name: name.to_owned(),
        nonce: rand::random(),
    };
    s.write_all(&claim.encode()).await.expect("claim");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    let challenge = loop {
        if let Some((c, n)) = Challenge::parse(&buf).expect("challenge") {
            buf.drain(..n);
            break c;
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before the challenge");
        buf.extend_from_slice(&chunk[..n]);
    };
    if let Challenge::Refuse(reason) = challenge {
        return Some(reason);
    }
    s.write_all(&[0x55; auth::PROOF_LEN]).await.expect("proof");
    loop {
        if let Some((verdict, _)) = auth::parse_verdict(&buf).expect("verdict") {
            return verdict;
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before the verdict");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Lets any uid reach the daemon's shared socket (its directory too): only the credentials the
/// kernel reports may then stop a connection. Returns the socket's path.
fn open_to_everyone(d: &common::Daemon) -> std::path::PathBuf {
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock = d.path("agents.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    sock
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn key_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("good.key");
    std::fs::write(&path, KEY).expect("key");
    path
}

fn guest<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no guest {name} in {s:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_without_proof_are_refused_and_the_guest_sees_nothing() {
    let keys = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let d = Options::config(&format!(
        r#"
[daemon]
listen = ["unix-listen:DIR/agents.sock", "tcp-listen:127.0.0.1:{port}"]
[[guest]]
name = "good"
uid = 0
key_file = "{}"
"#,
        key_file(keys.path()).display()
    ))
    .wait_for_file("DIR/agents.sock")
    .start();
    let sock = open_to_everyone(&d);

    let _agent = Agent::start("good", vec![d.unix("agents.sock")]);
    d.wait_connected("good").await;
    let started = Instant::now();
    let before = d.status().await;
    let good_before = guest(&before, "good").clone();

    // Attacks in a loop while the good guest is used.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacks = {
        let (stop, sock) = (stop.clone(), sock.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s2 = sock.clone();
                let r = tokio::task::spawn_blocking(move || claim_over_unix_as(65534, &s2, "good"))
                    .await
                    .expect("join")
                    .expect("refused (another uid)");
                assert!(r.contains("uid 0") && r.contains("uid 65534"), "{r}");
                let r = claim_over_plain_tcp(port, "good")
                    .await
                    .expect("refused (plain tcp)");
                assert!(r.contains("plain TCP"), "{r}");
                let r = claim_with_a_forged_proof(port, "good")
                    .await
                    .expect("refused (wrong key)");
                assert!(r.contains("wrong key"), "{r}");
                let r = claim_over_unix_as(0, &sock, "stranger").expect("refused (unknown)");
                assert!(r.contains("allow is false"), "{r}");
                n += 1;
            }
            n
        })
    };
    for i in 0..20 {
        let args = ["exec", "good", "--", "echo", "still me"];
        let out = ok(&args, ctl_async(&d.control, &args).await);
        assert_eq!(out, "still me\n", "exec {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = attacks.await.expect("attacks");
    assert!(rounds >= 1, "no attack ran");

    let after = d.status().await;
    let g = guest(&after, "good");
    assert_eq!(
        g["stats"]["session_restarts"], good_before["stats"]["session_restarts"],
        "the good guest's session restarted: {g:#}"
    );
    assert_eq!(
        g["stats"]["protocol_errors"],
        good_before["stats"]["protocol_errors"]
    );
    assert_eq!(g["connected"], true);
    let refused = g["refusals"]["count"].as_u64().expect("count");
    assert!(
        refused >= 3 * u64::from(rounds),
        "{refused} refusals counted for {rounds} rounds"
    );
    assert!(after["refused_unknown"]["count"].as_u64() >= Some(u64::from(rounds)));
    let names: Vec<_> = after["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .map(|g| g["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["good"],
        "a refused connection must not create a guest"
    );
    // Refusals are logged at a bounded rate (5 lines a second per guest, and as many for
    // unknown names), not once each.
    let lines = d.log().matches("refused a connection").count() as u64;
    let bound = 2 * 5 * (started.elapsed().as_secs() + 2);
    assert!(
        lines <= bound,
        "{lines} log lines for {refused} refusals (bound {bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_over_tcp_is_the_guest_in_both_directions() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = Key::new(KEY).expect("key");
    let port = free_port();
    // The guest connects to the daemon's shared TCP listener with its key.
    let d = Options::config(&format!(
        r#"
[daemon]
listen = ["tcp-listen:127.0.0.1:{port}"]
[[guest]]
name = "good"
key_file = "{}"
"#,
        key_file(keys.path()).display()
    ))
    .start();
    let options = AgentOptions {
        key: Some(key.clone()),
        ..AgentOptions::default()
    };
    let address = format!("tcp:127.0.0.1:{port}").parse().expect("address");
    let _agent = Agent::start_with("good", vec![address], options.clone());
    d.wait_connected("good").await;
    let args = ["exec", "good", "--", "echo", "over tcp"];
    assert_eq!(ok(&args, ctl_async(&d.control, &args).await), "over tcp\n");

    // The daemon connects to the guest's TCP listener: the agent checks the daemon's key too.
    let agent_port = free_port();
    let listen = format!("tcp-listen:127.0.0.1:{agent_port}")
        .parse()
        .expect("address");
    let _listening = Agent::start_with("web", vec![listen], options);
    let d2 = Options::config(&format!(
        r#"
[[guest]]
name = "web"
key_file = "{}"
[[guest.transport]]
kind = "mux"
address = "tcp:127.0.0.1:{agent_port}"
"#,
        key_file(keys.path()).display()
    ))
    .start();
    d2.wait_connected("web").await;
    let args = ["exec", "web", "--", "echo", "reached"];
    assert_eq!(ok(&args, ctl_async(&d2.control, &args).await), "reached\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_names_are_owned_capped_and_forgotten() {
    let d = Options::config(
        r#"
[daemon]
listen = ["unix-listen:DIR/agents.sock"]
[daemon.announced]
allow = true
max = 4
forget_after_secs = 1
"#,
    )
    .wait_for_file("DIR/agents.sock")
    .start();
    let sock = open_to_everyone(&d);
    let agent = Agent::start("mine", vec![d.unix("agents.sock")]);
    d.wait_connected("mine").await;
    assert_eq!(guest(&d.status().await, "mine")["owner"], "uid 0");
    // Another user cannot take the name over.
    let r = claim_over_unix_as(65534, &sock, "mine").expect("refused");
    assert!(r.contains("belongs to uid 0"), "{r}");

    // 10,000 connections with random names: at most `max` guests, memory bounded.
    let rss = || -> u64 {
        let pid = d.pid();
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("VmRSS")
    };
    let start_rss = rss();
    let started = Instant::now();
    let mut refused = 0u64;
    let sock2 = sock.clone();
    let results = tokio::task::spawn_blocking(move || {
        (0..10_000)
            .map(|i| {
                claim_over_unix_as(0, &sock2, &format!("random-{i}-{}", rand::random::<u32>()))
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("join");
    for r in results.iter().flatten() {
        assert!(r.contains("max"), "{r}");
        refused += 1;
    }
    let s = d.status().await;
    let count = s["guests"].as_array().expect("guests").len();
    assert!(count <= 4, "{count} guests for a cap of 4");
    // Forgotten names free their places after forget_after_secs (1 s here): at most `max`
    // new names a second get in.
    let accepted = 10_000 - refused;
    let bound = 4 * (started.elapsed().as_secs() + 2);
    assert!(
        accepted <= bound,
        "{accepted} names accepted (bound {bound})"
    );
    let grown = rss().saturating_sub(start_rss);
    eprintln!(
        "10,000 random names in {:?}: {count} guests, vstreamd RSS {start_rss} kB -> +{grown} kB",
        started.elapsed()
    );
    assert!(grown < 8 * 1024, "vstreamd grew by {grown} kB");

    // An announced guest whose agent went away is forgotten after forget_after_secs.
    drop(agent);
    d.wait_for_within("mine to be forgotten", Duration::from_secs(10), |s| {
        s["guests"]
            .as_array()
            .is_some_and(|g| g.iter().all(|g| g["name"] != "mine"))
    })
    .await;
}

/// A guest that completes the handshake (a sans-io session of our own, driven by hand) and then
/// sends frames whose payload checksums are all wrong.
fn violate_over_unix(path: &Path, name: &str, frames: usize) -> std::io::Result<()> {
    use vstream_wire::{Config, LinkParams, Session};
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let t0 = Instant::now();
    let mut session = Session::new(Config::new(Role::Guest, name), 7, t0);
    let link = session.add_link(LinkParams::stream(0), t0);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !session.is_connected() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no handshake");
        out.clear();
        session.poll_transmit(link, Instant::now(), &mut out, 64 * 1024);
        s.write_all(&out)?;
        match s.read(&mut buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => session.handle_input(link, &buf[..n], Instant::now()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let mut bad = Vec::new();
    for i in 0..frames {
        encode(
            &mut bad,
            Kind::Data as u8,
            1,
            i as u32,
            0,
            b"bad payload checksum",
        );
        let last = bad.len() - 1;
        bad[last] ^= 0xFF;
    }
    // The daemon closes the link part way: a write may then fail.
    let _ = s.write_all(&bad);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_keeps_violating_the_protocol_is_dropped_and_held_off() {
    let d = Options::config(
        r#"
[daemon]
listen = ["unix-listen:DIR/agents.sock"]
[daemon.announced]
allow = true
"#,
    )
    .wait_for_file("DIR/agents.sock")
    .start();
    let sock = d.path("agents.sock");
    let frames = usize::try_from(vstream_link::MAX_VIOLATIONS).expect("fits") * 2;
    let s2 = sock.clone();
    tokio::task::spawn_blocking(move || violate_over_unix(&s2, "evil", frames))
        .await
        .expect("join")
        .expect("handshake");
    let s = d
        .wait_for("the violator to be held off", |s| {
            s["guests"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g["name"] == "evil" && g["held_off"]["drops"] == 1)
        })
        .await;
    let g = guest(&s, "evil");
    assert_eq!(g["connected"], false, "{g:#}");
    let remaining = g["held_off"]["remaining_ms"]
        .as_u64()
        .expect("held off now");
    assert!(remaining > 0 && remaining <= 5000, "{remaining} ms");
    // Coming back at once is refused, with the reason.
    let r = claim_over_unix_as(0, &sock, "evil").expect("refused while held off");
    assert!(
        r.contains("held off") && r.contains("protocol violations"),
        "{r}"
    );
    assert!(
        d.log().contains("too many protocol violations"),
        "{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_waits_before_it_tries_again() {
    let d = Options::config("[daemon]\nlisten = [\"unix-listen:DIR/agents.sock\"]\n")
        .wait_for_file("DIR/agents.sock")
        .start();
    let _agent = Agent::start("stranger", vec![d.unix("agents.sock")]);
    d.wait_for("the first refusal", |s| {
        s["refused_unknown"]["count"].as_u64() >= Some(1)
    })
    .await;
    // It retries a transport that fails every 500 ms, but one the host refused only after 5 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = d.status().await;
    assert_eq!(s["refused_unknown"]["count"], 1, "{s:#}");
    let last = s["refused_unknown"]["last"].as_str().expect("last");
    assert!(last.contains("allow is false"), "{last}");
}
