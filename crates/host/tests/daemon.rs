//! vstreamd and vstreamctl as processes, an agent in-process: status, channels through the
//! control socket, failover between two transports, and a hostile connection that must not
//! disturb a good guest.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use vstream_agent::Agent;

use common::{ctl_input_all_async, start_daemon, status};

fn mux_states(s: &serde_json::Value) -> Vec<String> {
    s["guests"][0]["transports"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["kind"] == "mux")
                .map(|t| t["state"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

const TWO_TRANSPORTS: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/a.sock"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/b.sock"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transports_status_echo_and_failover() {
    let d = start_daemon(TWO_TRANSPORTS);
    let mode = std::fs::metadata(&d.control)
        .expect("control")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket must be 0600");

    let proxy = Proxy::start(d.path("pa.sock"), d.path("a.sock")).await;
    let agent = Agent::start("g", vec![d.unix("pa.sock"), d.unix("b.sock")]);
    let s = d
        .wait_for("both transports up", |s| mux_states(s) == ["up", "up"])
        .await;
    assert_eq!(s["guests"][0]["peer"], "g");

    // A channel through vstreamctl: 4 MiB through the guest's echo service, unchanged.
    let data: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = ctl_input_all_async(&d.control, &["open", "g", "diag", "echo"], &data).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "echo returned {} bytes, sent {}",
        out.stdout.len(),
        data.len()
    );

    // A class nobody serves: a clear error, exit status 1.
    let out = ctl_input_all_async(&d.control, &["open", "g", "nope", "x"], b"").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no service for device class \"nope\""),
        "{err}"
    );

    // Failover and resume: the preferred transport goes through a proxy that the test cuts
    // five times during an 8 MiB echo; the session moves to the other transport and back, and
    // every byte comes back once, in order.
    let mux = agent.mux().clone();
    let chan = mux.open("diag", "echo").await.expect("open");
    let (mut r, mut w) = tokio::io::split(chan);
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let writer = async move {
        for part in sent.chunks(16 * 1024) {
            w.write_all(part).await.expect("write");
            tokio::task::yield_now().await;
        }
        w.shutdown().await.expect("shutdown");
    };
    let reader = async {
        let mut back = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut back)
            .await
            .expect("read");
        back
    };
    let cutter = async {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            proxy.cut();
        }
    };
    let (_, back, ()) = tokio::join!(writer, reader, cutter);
    assert!(
        back == payload,
        "echo across cuts: {} of {} bytes came back",
        back.len(),
        payload.len()
    );
    let st = mux.status();
    assert_eq!(
        st.stats.session.session_restarts, 0,
        "cuts must resume the session"
    );
    assert!(proxy.cuts() >= 1);
    drop(agent);
}

/// A forwarding proxy between the agent and one of the daemon's sockets, with a kill switch.
struct Proxy {
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    async fn start(listen: PathBuf, target: PathBuf) -> Proxy {
        let listener = tokio::net::UnixListener::bind(&listen).expect("proxy bind");
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let registry = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::UnixStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                registry.lock().expect("proxy").push(task);
            }
        });
        Proxy {
            conns,
            cut: Default::default(),
        }
    }

    /// Drops every forwarded connection: both ends see the transport close.
    fn cut(&self) {
        let mut conns = self.conns.lock().expect("proxy");
        for c in conns.drain(..) {
            if !c.is_finished() {
                self.cut.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            c.abort();
        }
    }

    fn cuts(&self) -> usize {
        self.cut.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_agent_listener_does_not_disturb_a_good_guest() {
    let d = start_daemon(
        r#"
[daemon]
listen = ["unix-listen:DIR/agents.sock"]
[daemon.announced]
allow = true
"#,
    );
    let agent = Agent::start("good", vec![d.unix("agents.sock")]);
    d.wait_for("good guest up", |s| s["guests"][0]["connected"] == true)
        .await;

    // A hostile client: garbage, then a huge claimed frame, then nothing.
    let mut evil = tokio::net::UnixStream::connect(d.path("agents.sock"))
        .await
        .expect("connect");
    let mut junk = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    junk.extend_from_slice(&[0xA9, 0x5C, 0x12, 0, 1, 0, 0, 0]);
    junk.extend(std::iter::repeat_n(0xFFu8, 4096));
    evil.write_all(&junk).await.expect("write");

    // A class the host does not serve: refused with the reason, the session carries on.
    let refused = agent.mux().open("nope", "x").await.expect_err("refused");
    assert!(
        refused.to_string().contains("no service for device class"),
        "{refused}"
    );
    let s = status(&d.control);
    let names: Vec<_> = s["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .map(|g| g["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["good"],
        "the hostile connection must not create a guest"
    );
    // The good guest still works end to end.
    let out =
        ctl_input_all_async(&d.control, &["open", "good", "diag", "echo"], b"still here").await;
    assert_eq!(out.stdout, b"still here");
    drop(evil);
}
