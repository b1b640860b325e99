//! The ppp device through vstreamd (a process) and an in-process agent, each end in a network
//! namespace this test creates: vstreamd terminates the link in namespace H (backend `tun`,
//! its TUN device `ppp-g` there, a route added through it); the guest end is the same userspace
//! PPP endpoint on a TUN device in namespace G, on the `ppp` channel the agent's session opens.
//! Shown: the link comes up, `ping` crosses it, 16 MiB of TCP cross it intact, the route is
//! there, a guest without `[guest.ppp]` is refused with the reason, and the link comes back
//! after the agent restarts; the scraped `vstream_ppp_up` and `vstream_ppp_links_total` follow.
//!
//! Why not pppd at both ends here: this machine's kernel has no PPP driver (no /dev/ppp,
//! `CONFIG_PPP` unset), so pppd cannot run at all; the real-guest test (xtask/tests/ppp.rs) runs
//! Debian's pppd in the guest against vstreamd. Needs root (`ip netns add`, TUN devices).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use vstream_agent::Agent;
use vstream_devices::ppp::host::{run_userspace, UserspaceLink};
use vstream_devices::tun::{in_netns, netns_path};

use common::metrics::{metrics_addr, scrape};
use common::{Daemon, Options};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("vs-ppp-{tag}-{}", std::process::id());
        let out = run("ip", &["netns", "add", &name]);
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed: {} (this test needs root: CAP_SYS_ADMIN for \
             namespaces, CAP_NET_ADMIN for TUN devices)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let ns = NetNs(name);
        let out = ns.exec(&["ip", "link", "set", "lo", "up"]);
        assert!(out.status.success());
        ns
    }

    fn path(&self) -> PathBuf {
        netns_path(&self.0)
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

fn ppp_status(status: &Value, guest: &str) -> Value {
    status["guests"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == guest))
        .map(|g| g["devices"]["ppp"].clone())
        .unwrap_or(Value::Null)
}

async fn wait_for_state(d: &Daemon, state: &str, links: u64) -> Value {
    let s = d
        .wait_for_within(
            &format!("ppp to become {state:?} (link {links})"),
            Duration::from_secs(30),
            |s| {
                let p = ppp_status(s, "g");
                p["state"] == state && p["links"].as_u64() >= Some(links)
            },
        )
        .await;
    ppp_status(&s, "g")
}

const CONFIG: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/g.sock"
[guest.ppp]
local = "10.77.0.1"
remote = "10.77.0.2"
mtu = 1500
backend = "tun"
netns = "NETNS"
routes = ["10.78.0.0/24"]

[[guest]]
name = "n"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/n.sock"
"#;

/// The guest end: the userspace endpoint on a TUN device in namespace `ns`, on a `ppp` channel
/// of `agent`'s session.
fn guest_end(agent: &Agent, ns: &NetNs) -> tokio::task::JoinHandle<String> {
    let mux = agent.mux().clone();
    let link = UserspaceLink {
        label: "guest end".into(),
        local: Ipv4Addr::new(10, 77, 0, 2),
        remote: Ipv4Addr::new(10, 77, 0, 1),
        mtu: 1500,
        netns: Some(ns.path()),
        interface: "ppp-guest".into(),
        routes: Vec::new(),
        echo_interval: Duration::from_secs(5),
        echo_failures: 4,
    };
    tokio::spawn(async move {
        let chan = mux.open("ppp", "").await.expect("the ppp channel");
        run_userspace(&link, chan, |_| {})
            .await
            .unwrap_or_else(|e| format!("error: {e}"))
    })
}

/// xorshift64*: incompressible, reproducible bytes.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ppp_link_between_two_namespaces() {
    let host_ns = NetNs::new("h");
    let guest_ns = NetNs::new("g");
    let d = Options::config(&CONFIG.replace("NETNS", &host_ns.0))
        .env("RUST_LOG", "info")
        .arg("--metrics")
        .arg("127.0.0.1:0")
        .start();
    let metrics = metrics_addr(&d);
    let labels = [("guest", "g")];
    let g = d.unix("g.sock");
    let agent = Agent::start("g", vec![g]);
    let mut end = guest_end(&agent, &guest_ns);
    let up = wait_for_state(&d, "up", 1).await;
    assert_eq!(up["interface"], "ppp-g");
    assert_eq!(up["backend"], "tun");
    let s = scrape(&metrics).await;
    assert_eq!(s.value("vstream_ppp_up", &labels), 1.0);
    assert_eq!(s.value("vstream_ppp_links_total", &labels), 1.0);

    // The host end's interface and route, in namespace H only.
    let addr = host_ns.exec(&["ip", "-4", "addr", "show", "dev", "ppp-g"]);
    let addr = String::from_utf8_lossy(&addr.stdout);
    assert!(addr.contains("10.77.0.1 peer 10.77.0.2/32"), "{addr}");
    assert!(addr.contains("mtu 1500"), "{addr}");
    let route = host_ns.exec(&["ip", "route", "show", "10.78.0.0/24"]);
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("dev ppp-g"),
        "{}",
        String::from_utf8_lossy(&route.stdout)
    );
    assert!(!run("ip", &["link", "show", "ppp-g"]).status.success());

    // ping (busybox's: no other ping is installed) from the guest side to the host end.
    let ping = tokio::task::spawn_blocking({
        let ns = guest_ns.0.clone();
        move || {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "busybox",
                    "ping",
                    "-c",
                    "5",
                    "-i",
                    "0.2",
                    "-w",
                    "10",
                    "10.77.0.1",
                ],
            )
        }
    })
    .await
    .expect("ping");
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success(),
        "ping failed: {text}{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    assert!(text.contains("5 packets received"), "{text}");
    let rtt = text
        .lines()
        .find(|l| l.contains("round-trip"))
        .unwrap_or("");
    eprintln!("ping through the ppp link: {rtt}");

    // 16 MiB of TCP from the guest side to a listener on the host side, intact.
    let listener = in_netns(Some(&host_ns.path()), || {
        TcpListener::bind((Ipv4Addr::new(10, 77, 0, 1), 0))
    })
    .expect("listener in H");
    let port = listener.local_addr().expect("port").port();
    let data = pattern(16 * 1024 * 1024);
    let expected = data.clone();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let start = Instant::now();
        let mut got = Vec::with_capacity(expected.len());
        s.read_to_end(&mut got).expect("read");
        (got == expected, got.len(), start.elapsed())
    });
    let client = in_netns(Some(&guest_ns.path()), move || {
        TcpStream::connect((Ipv4Addr::new(10, 77, 0, 1), port))
    })
    .expect("connect from G");
    let sender = std::thread::spawn(move || {
        let mut client = client;
        client.write_all(&data).expect("send");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let (same, len, took) = tokio::task::spawn_blocking(move || receiver.join())
        .await
        .expect("join")
        .expect("receiver");
    sender.join().expect("sender");
    assert_eq!(len, 16 * 1024 * 1024);
    assert!(same, "the bytes arrived changed");
    eprintln!(
        "16 MiB over TCP through the ppp link (userspace ends, TUN): {:.2?}, {:.1} MiB/s",
        took,
        16.0 / took.as_secs_f64()
    );

    // A guest without [guest.ppp] is refused with the reason.
    let n = d.unix("n.sock");
    let other = Agent::start("n", vec![n]);
    let refused = tokio::time::timeout(Duration::from_secs(15), other.mux().open("ppp", ""))
        .await
        .expect("an answer");
    let e = refused.expect_err("refused");
    assert!(
        e.to_string()
            .contains("guest \"n\" has no [guest.ppp] section"),
        "{e}"
    );
    let s = d.status().await;
    assert_eq!(ppp_status(&s, "n"), Value::Null);
    drop(other);

    // The agent restarts (a new session): the old link ends, a new one comes up.
    drop(agent);
    end.abort();
    let _ = end.await;
    let g = d.unix("g.sock");
    let agent = Agent::start("g", vec![g]);
    end = guest_end(&agent, &guest_ns);
    wait_for_state(&d, "up", 2).await;
    let s = scrape(&metrics).await;
    assert_eq!(s.value("vstream_ppp_up", &labels), 1.0);
    assert_eq!(s.value("vstream_ppp_links_total", &labels), 2.0);
    let ping = guest_ns.exec(&["busybox", "ping", "-c", "1", "-w", "5", "10.77.0.1"]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    end.abort();
    drop(agent);
}
