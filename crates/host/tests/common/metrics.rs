//! Scraping `vstreamd --metrics`: the HTTP request and a strict parser of the text format.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Daemon, WAIT};

/// One sample of the exposition.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape, parsed.
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// The families, by name, with their type.
    pub families: BTreeMap<String, String>,
    pub text: String,
}

impl Scrape {
    /// The value of the one series of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
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
pub fn metrics_addr(d: &Daemon) -> String {
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
pub async fn scrape(addr: &str) -> Scrape {
    parse(&get_metrics(addr).await)
}

/// `GET /metrics` over plain HTTP/1.1: the body of a 200 in the OpenMetrics format.
pub async fn get_metrics(addr: &str) -> String {
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
pub fn parse(text: &str) -> Scrape {
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
        if kind == "counter" {
            let value = line.rsplit(' ').next().expect("value");
            assert!(value.parse::<u64>().is_ok(), "a count as a float: {line}");
        }
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
pub async fn scrape_until(addr: &str, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
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
