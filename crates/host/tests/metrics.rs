//! `vstreamd --metrics ADDR` as a process, an agent in-process: the scraped values follow what
//! the guest does (bytes through a channel, open channels, entropy served and refused, the
//! guest up then gone; a print job, watchdog heartbeats and a fire), every line of the
//! exposition parses, counts print as integers, and every series is documented.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_agent::{Agent, AgentOptions};
use vstream_devices::printer::device::Listeners;
use vstream_devices::random::guest::Client;
use vstream_devices::registry::GuestOptions;
use vstream_devices::watchdog::guest::GuestSettings;

use common::metrics::{get_metrics, metrics_addr, parse, scrape, scrape_until, Scrape};
use common::{jobs, wait_jobs, Options, WAIT};

const CONFIG: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/a.sock"
[guest.random]
rate = 1048576
burst = 1048576
"#;

/// Every family of `s` has a line in docs/METRICS.md.
fn documented(s: &Scrape) {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/METRICS.md"
    ))
    .expect("docs/METRICS.md");
    for (family, kind) in &s.families {
        let shown = match kind.as_str() {
            "counter" => format!("{family}_total"),
            "info" => format!("{family}_info"),
            _ => family.clone(),
        };
        // In backquotes, with or without its labels.
        assert!(
            doc.contains(&format!("`{shown}`")) || doc.contains(&format!("`{shown}{{")),
            "docs/METRICS.md lacks {shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_values_follow_the_guest() {
    let d = Options::config(CONFIG)
        .arg("--metrics")
        .arg("127.0.0.1:0")
        .start();
    let addr = metrics_addr(&d);
    let g = [("guest", "g")];

    // Before any agent: known, down.
    let s = scrape(&addr).await;
    assert_eq!(s.value("vstream_guests", &[]), 1.0);
    assert_eq!(s.value("vstream_guest_up", &g), 0.0);
    assert_eq!(
        s.value("vstream_transport_up", &[("guest", "g"), ("kind", "mux")]),
        0.0
    );
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(s.value("vstream_build_info", &version), 1.0);

    let agent = Agent::start("g", vec![d.unix("a.sock")]);
    d.wait_connected("g").await;
    let s = scrape_until(&addr, "the guest up", |s| {
        s.value("vstream_guest_up", &g) == 1.0
    })
    .await;
    let mux = [("guest", "g"), ("kind", "mux")];
    assert_eq!(s.value("vstream_transport_up", &mux), 1.0);
    assert_eq!(s.value("vstream_transport_active", &mux), 1.0);
    let sent0 = s.value("vstream_transport_sent_bytes_total", &mux);
    let received0 = s.value("vstream_transport_received_bytes_total", &mux);

    // 1 MiB through the guest's echo service, on one of three open channels.
    const MIB: usize = 1 << 20;
    let mut chans = Vec::new();
    for _ in 0..3 {
        chans.push(agent.mux().open("diag", "echo").await.expect("open"));
    }
    let data: Vec<u8> = (0..MIB as u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(chans.pop().expect("channel"));
    let writer = async {
        w.write_all(&data).await.expect("write");
        w.flush().await.expect("flush");
    };
    let reader = async {
        let mut back = vec![0u8; MIB];
        r.read_exact(&mut back).await.expect("echo");
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    assert!(back == data, "the echo differs");
    chans.push(r.unsplit(w));

    let diag = [("guest", "g"), ("class", "diag")];
    let s = scrape_until(&addr, "three open diag channels", |s| {
        s.value("vstream_channels_open", &diag) == 3.0
    })
    .await;
    let sent = s.value("vstream_transport_sent_bytes_total", &mux) - sent0;
    let received = s.value("vstream_transport_received_bytes_total", &mux) - received0;
    println!("1 MiB echoed: the link received {received} bytes and sent {sent}");
    assert!(received >= MIB as f64, "received {received}");
    assert!(sent >= MIB as f64, "sent {sent}");
    // At most 64 KiB of payload in a frame: at least 16 frames each way.
    assert!(s.value("vstream_frames_sent_total", &g) >= 16.0);
    assert!(s.value("vstream_frames_received_total", &g) >= 16.0);
    assert!(s.value("vstream_transport_frames_received_total", &mux) >= 16.0);
    assert_eq!(s.value("vstream_transport_crc_errors_total", &mux), 0.0);
    let protocol_errors: f64 = s
        .samples
        .iter()
        .filter(|x| x.name == "vstream_protocol_errors_total")
        .map(|x| x.value)
        .sum();
    assert_eq!(protocol_errors, 0.0, "{}", s.text);

    // Closed channels leave the count.
    drop(chans);
    scrape_until(&addr, "no open diag channel", |s| {
        s.value("vstream_channels_open", &diag) == 0.0
    })
    .await;

    // The device's own series: entropy served, and a bad request refused.
    let mut client = Client::open(agent.mux(), "pool").await.expect("open");
    let mut buf = vec![0u8; 8192];
    client.fetch(&mut buf).await.expect("fetch");
    let mut bad = agent.mux().open("random", "x").await.expect("open");
    bad.write_all(&0u32.to_le_bytes()).await.expect("write");
    let mut b = [0u8; 16];
    bad.read(&mut b).await.expect_err("reset");
    let via = [("guest", "g"), ("via", "channel")];
    let s = scrape(&addr).await;
    assert!(s.value("vstream_random_served_bytes_total", &via) >= 8192.0);
    assert!(s.value("vstream_random_requests_total", &g) >= 1.0);
    assert_eq!(s.value("vstream_random_refusals_total", &g), 1.0);
    assert_eq!(
        s.value("vstream_random_rate_bytes_per_second", &g),
        1048576.0
    );
    documented(&s);

    // The guest goes: down.
    drop(client);
    drop(agent);
    let s = scrape_until(&addr, "the guest down", |s| {
        s.value("vstream_guest_up", &g) == 0.0
    })
    .await;
    assert_eq!(s.value("vstream_transport_up", &mux), 0.0);
    documented(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_key_serves_metrics_and_a_taken_address_stops_the_start() {
    let d = Options::config(&format!("[daemon]\nmetrics = \"127.0.0.1:0\"\n{CONFIG}")).start();
    let addr = metrics_addr(&d);
    let s = scrape(&addr).await;
    assert_eq!(s.value("vstream_guest_up", &[("guest", "g")]), 0.0);

    // The command line wins; an address in use is an error at the start, not a silent daemon
    // without metrics.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vstreamd"))
        .args(["--control", &d.path("other.sock").display().to_string()])
        .args(["--state-dir", &d.path("other").display().to_string()])
        .args(["--metrics", &addr])
        .output()
        .expect("vstreamd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("metrics on {addr}")), "{err}");
}

/// The fastest of five scrapes (the HTTP request and its whole reply) of a vstreamd with `n`
/// configured guests (each with its own transport), and the last scrape, parsed.
async fn scrape_guests(n: usize) -> (Duration, Scrape) {
    let guests: String = (0..n)
        .map(|i| {
            format!(
                "[[guest]]\nname = \"g{i}\"\n[[guest.transport]]\nkind = \"mux\"\n\
                 address = \"unix-listen:DIR/g{i}.sock\"\n"
            )
        })
        .collect();
    let d = Options::config(&format!("[daemon]\nmetrics = \"127.0.0.1:0\"\n{guests}")).start();
    let addr = metrics_addr(&d);
    let mut fastest = Duration::MAX;
    let mut body = String::new();
    for _ in 0..5 {
        let t = Instant::now();
        body = get_metrics(&addr).await;
        fastest = fastest.min(t.elapsed());
    }
    let s = parse(&body);
    assert_eq!(s.value("vstream_guests", &[]), n as f64);
    let up = s.samples.iter().filter(|x| x.name == "vstream_guest_up");
    assert_eq!(up.count(), n, "one vstream_guest_up per guest");
    println!(
        "{n} guests: scrape {:.1} ms (fastest of 5), {} samples, {} KiB",
        fastest.as_secs_f64() * 1e3,
        s.samples.len(),
        s.text.len() / 1024
    );
    (fastest, s)
}

/// A scrape is one pass over the guests: ten times the guests is about ten times the samples
/// and the time, not a hundred (docs/PERFORMANCE.md has one run's figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_grows_linearly_with_the_guests() {
    let (t100, s100) = scrape_guests(100).await;
    let (t1000, s1000) = scrape_guests(1000).await;
    let (per100, per1000) = (s100.samples.len() / 100, s1000.samples.len() / 1000);
    assert!(
        per100.abs_diff(per1000) <= 1,
        "{per100} vs {per1000} samples per guest"
    );
    let ratio = t1000.as_secs_f64() / t100.as_secs_f64();
    println!("1000 guests vs 100: {ratio:.1} times the scrape time");
    // Quadratic would be about 100. Linear measures 10 to 24 here: the smaller scrape fits in
    // the caches, and the machine is shared; the margin is for that.
    assert!(
        ratio < 50.0,
        "{ratio:.1} times the time for 10 times the guests"
    );
}

const DEVICES: &str = r#"
[[guest]]
name = "g"
[[guest.transport]]
kind = "mux"
address = "unix-listen:DIR/a.sock"
[guest.watchdog]
timeout_ms = 1500
action = "log"
[guest.printer]
spool = "DIR/spool"
quota_bytes = 10000000
"#;

/// The watchdog's and the printer's series follow a real agent: heartbeats while it runs, a
/// print job through its printer socket (one more job done, its bytes in the spool), and one
/// fire when it goes silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_series_follow_the_devices() {
    let d = Options::config(DEVICES)
        .arg("--metrics")
        .arg("127.0.0.1:0")
        .start();
    let addr = metrics_addr(&d);
    let g = [("guest", "g")];
    let socket = d.path("printer.sock");
    let listen = format!("unix-listen:{}", socket.display());
    let mut devices = GuestOptions::default();
    devices.set(
        vstream_devices::watchdog::CLASS,
        GuestSettings {
            interval: Duration::from_millis(200),
            check: None,
        },
    );
    let options = AgentOptions {
        devices,
        ..AgentOptions::default()
    };
    let mut agent = Agent::start_with("g", vec![d.unix("a.sock")], options);
    agent.start_device(
        vstream_devices::printer::CLASS,
        Listeners(vec![listen.parse().expect("address")]),
    );

    let s = scrape_until(&addr, "the watchdog armed, heartbeats", |s| {
        s.value("vstream_watchdog_armed", &g) == 1.0
            && s.value("vstream_watchdog_heartbeats_total", &g) >= 2.0
    })
    .await;
    assert_eq!(s.value("vstream_watchdog_fires_total", &g), 0.0);
    assert_eq!(s.value("vstream_watchdog_timeout_seconds", &g), 1.5);
    let done = [("guest", "g"), ("state", "done")];
    assert_eq!(s.value("vstream_printer_jobs", &done), 0.0);
    assert_eq!(
        s.value("vstream_printer_spool_quota_bytes", &g),
        10_000_000.0
    );
    let used0 = s.value("vstream_printer_spool_used_bytes", &g);

    // A print job through the agent, as a guest application prints (like `nc -U`).
    let job: Vec<u8> = [b"%!PS-Adobe-3.0\n".as_slice(), &[b'x'; 100_000]].concat();
    let deadline = Instant::now() + WAIT;
    let mut conn = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "printer socket: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    conn.write_all(&job).await.expect("job");
    conn.shutdown().await.expect("end of job");
    conn.read_to_end(&mut Vec::new()).await.expect("job taken");
    wait_jobs(&d.control, "g", "the job done", |j| {
        j.iter().any(|j| j["state"] == "done")
    })
    .await;
    let listed = jobs(&d.control, "g").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["size"], job.len(), "{listed:?}");
    let s = scrape(&addr).await;
    assert_eq!(s.value("vstream_printer_jobs", &done), 1.0);
    assert_eq!(
        s.value(
            "vstream_printer_jobs",
            &[("guest", "g"), ("state", "receiving")]
        ),
        0.0
    );
    // The job's bytes, and at most a little metadata beside them.
    let grew = s.value("vstream_printer_spool_used_bytes", &g) - used0;
    assert!(
        (job.len() as f64..=job.len() as f64 + 4096.0).contains(&grew),
        "the spool grew by {grew} for a {}-byte job",
        job.len()
    );

    // The agent goes silent (as if killed): one fire within the timeout and a second.
    let heartbeats = s.value("vstream_watchdog_heartbeats_total", &g);
    drop(agent);
    let s = scrape_until(&addr, "the watchdog fired", |s| {
        s.value("vstream_watchdog_fires_total", &g) == 1.0
    })
    .await;
    assert_eq!(s.value("vstream_watchdog_armed", &g), 0.0);
    assert_eq!(s.value("vstream_watchdog_action_failures_total", &g), 0.0);
    assert!(s.value("vstream_watchdog_heartbeats_total", &g) >= heartbeats);
    documented(&s);
}
