//! `vstreamd --metrics ADDR` as a process, an agent in-process: the scraped values follow what
//! the guest does (bytes through a channel, open channels, entropy served and refused, the
//! guest up then gone), every line of the exposition parses, and every series is documented.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_agent::Agent;
use vstream_devices::random::guest::Client;

use common::{Daemon, Options, WAIT};

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

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed.
struct Scrape {
    samples: Vec<Sample>,
    /// The families, by name, with their type.
    families: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    /// The value of the one series of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{name} {labels:?}: {found:?}\n{}",
            self.text
        );
        found[0].value
    }
}

/// The address vstreamd logged for its metrics (it was given port 0).
fn metrics_addr(d: &Daemon) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = d.log();
        if let Some(at) = log.find("metrics on http://") {
            let rest = &log[at + "metrics on http://".len()..];
            return rest[..rest.find('/').expect("address")].to_owned();
        }
        assert!(Instant::now() < deadline, "no metrics address in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` over plain HTTP/1.1; the body must be a valid exposition.
async fn scrape(addr: &str) -> Scrape {
    parse(&get_metrics(addr).await)
}

/// `GET /metrics` over plain HTTP/1.1: the body of a 200 in the OpenMetrics format.
async fn get_metrics(addr: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: vstreamd\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).await.expect("reply");
    let reply = String::from_utf8(reply).expect("utf-8");
    let (head, body) = reply.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body.to_owned()
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the text format strictly: every line is a HELP, TYPE or sample of the family just
/// declared, and `# EOF` ends it.
fn parse(text: &str) -> Scrape {
    let (mut samples, mut families) = (Vec::new(), BTreeMap::<String, String>::new());
    let mut current: Option<(String, String)> = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "text after # EOF");
            return Scrape {
                samples,
                families,
                text: text.to_owned(),
            };
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            assert!(!families.contains_key(name), "{name} declared twice");
            current = Some((name.to_owned(), String::new()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name type");
            assert!(
                ["counter", "gauge", "info"].contains(&kind),
                "unexpected type: {line}"
            );
            let (family, _) = current.as_ref().expect("TYPE after HELP");
            assert_eq!(family, name, "TYPE of another family: {line}");
            families.insert(name.to_owned(), kind.to_owned());
            current = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let s = parse_sample(line);
        let (family, kind) = current.as_ref().expect("sample after TYPE");
        let expected = match kind.as_str() {
            "counter" => format!("{family}_total"),
            "info" => format!("{family}_info"),
            _ => family.clone(),
        };
        assert_eq!(s.name, expected, "sample outside its family: {line}");
        samples.push(s);
    }
    panic!("no # EOF:\n{text}");
}

/// `name{k="v",...} value`, label values with `\\`, `\"`, `\n` escapes.
fn parse_sample(line: &str) -> Sample {
    let end = line.find(['{', ' ']).expect("name");
    let name = &line[..end];
    assert!(valid_name(name), "bad name: {line}");
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let close;
        loop {
            let Some((at, c)) = chars.next() else {
                panic!("unclosed labels: {line}");
            };
            if c == '}' {
                close = at;
                break;
            }
            let key_end = inner[at..].find('=').expect("label =") + at;
            let key = &inner[at..key_end];
            assert!(valid_name(key), "bad label name {key:?}: {line}");
            for _ in at..key_end {
                chars.next();
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
            let mut value = String::new();
            loop {
                match chars.next().expect("label value").1 {
                    '"' => break,
                    '\\' => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("bad escape \\{c}: {line}"),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key.to_owned(), value);
            if let Some((_, ',')) = chars.clone().next() {
                chars.next();
            }
        }
        rest = &inner[close + 1..];
    }
    let value = rest.strip_prefix(' ').expect("space before the value");
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("bad value: {line}"));
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// Scrapes until `pred` holds (for up to `WAIT`).
async fn scrape_until(addr: &str, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(addr).await;
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
