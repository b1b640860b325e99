//! `vstreamd --metrics ADDR`: the daemon's guests, transports, sessions and devices as
//! Prometheus metrics on `GET /metrics` (every series: docs/METRICS.md).
//!
//! Nothing is counted twice: each scrape reads every guest's status line ([`Guest::status`],
//! what `vstreamctl status` shows) and turns it into samples, so the numbers cannot drift from
//! the live counters. A device's series come from the device
//! ([`vstream_devices::registry::Device::samples`]), so this
//! file names none. A scrape is one pass over the guests: linear in guests, transports,
//! channels and device samples.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use vstream_devices::registry::registry;
use vstream_devices::status::{Sample, SampleKind};
use vstream_wire::ErrorKind;

use crate::daemon::{Daemon, Guest};
use crate::status::GuestStatus;

/// What `/metrics` answers with (the OpenMetrics text format that the encoder writes).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until the runtime ends.
pub async fn serve(daemon: Arc<Daemon>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let mut metrics = Registry::default();
    metrics.register_collector(Box::new(Exporter(daemon)));
    let metrics = Arc::new(metrics);
    let app = Router::new().route("/metrics", get(move || scrape(metrics.clone())));
    axum::serve(listener, app).await
}

async fn scrape(metrics: Arc<Registry>) -> Response {
    // Thousands of guests are milliseconds of work: off the runtime's worker threads.
    let text = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics).map(|()| text)
    })
    .await;
    match text {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Reads the daemon at each scrape.
struct Exporter(Arc<Daemon>);

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Exporter")
    }
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut build = encoder.encode_descriptor(
            "vstream_build",
            "The running vstreamd's version.",
            None,
            prometheus_client::metrics::MetricType::Info,
        )?;
        build.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        let guests = self.0.all_guests();
        let mut families = Families::default();
        families.gauge(
            "guests",
            "Guests the daemon knows (configured, and announced ones while kept).",
            Vec::new(),
            guests.len() as f64,
        );
        for guest in &guests {
            add_guest(&mut families, guest);
        }
        families.encode(&mut encoder)
    }
}

/// Labels of one series, values escaped.
type Labels = Vec<(&'static str, String)>;

/// A sample's value: counts print as integers (`8192`, not `8192.0`).
#[derive(Clone, Copy)]
enum Number {
    Count(u64),
    Real(f64),
}

impl From<f64> for Number {
    /// Device samples carry an `f64`; a whole one that fits is a count.
    fn from(v: f64) -> Number {
        // 2^64 as f64: the first value that does not fit.
        if v >= 0.0 && v.fract() == 0.0 && v < 18_446_744_073_709_551_616.0 {
            Number::Count(v as u64)
        } else {
            Number::Real(v)
        }
    }
}

/// One metric family: its samples across all guests, in the order they were added.
struct Family {
    help: &'static str,
    kind: SampleKind,
    series: Vec<(Labels, Number)>,
}

/// The families of one scrape, by name (the text format wants each family's samples together).
#[derive(Default)]
struct Families(BTreeMap<String, Family>);

impl Families {
    /// Adds a series to family `vstream_NAME`.
    fn add(&mut self, name: &str, help: &'static str, kind: SampleKind, labels: Labels, v: Number) {
        self.0
            .entry(format!("vstream_{name}"))
            .or_insert_with(|| Family {
                help,
                kind,
                series: Vec::new(),
            })
            .series
            .push((labels, v));
    }

    fn counter(&mut self, name: &str, help: &'static str, labels: Labels, v: u64) {
        self.add(name, help, SampleKind::Counter, labels, Number::Count(v));
    }

    fn gauge(&mut self, name: &str, help: &'static str, labels: Labels, v: f64) {
        self.add(name, help, SampleKind::Gauge, labels, Number::from(v));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        for (name, family) in &self.0 {
            let kind = match family.kind {
                SampleKind::Counter => prometheus_client::metrics::MetricType::Counter,
                SampleKind::Gauge => prometheus_client::metrics::MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(name, family.help, None, kind)?;
            for (labels, v) in &family.series {
                let series = metric.encode_family(labels)?;
                match (family.kind, *v) {
                    (SampleKind::Counter, Number::Count(v)) => {
                        ConstCounter::new(v).encode(series)?
                    }
                    (SampleKind::Counter, Number::Real(v)) => {
                        ConstCounter::new(v).encode(series)?
                    }
                    (SampleKind::Gauge, Number::Count(v)) => ConstGauge::new(v).encode(series)?,
                    (SampleKind::Gauge, Number::Real(v)) => ConstGauge::new(v).encode(series)?,
                }
            }
        }
        Ok(())
    }
}

/// A label value as the text format needs it (guest and transport names come from configs and
/// from what agents announce).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// Adds one guest's series.
fn add_guest(f: &mut Families, guest: &Guest) {
    let s: GuestStatus = guest.status();
    let name = escape(&s.name);
    let g = || vec![("guest", name.clone())];
    f.gauge(
        "guest_up",
        "Whether a link of the guest's session is up.",
        g(),
        flag(s.connected),
    );
    let st = &s.stats.session;
    let session: [(&str, &'static str, u64); 8] = [
        (
            "frames_sent",
            "Sequenced frames sent for the first time.",
            st.frames_sent,
        ),
        (
            "frames_received",
            "Sequenced frames accepted in order.",
            st.frames_received,
        ),
        (
            "frames_retransmitted",
            "Sequenced frames sent again.",
            st.frames_retransmitted,
        ),
        (
            "frames_duplicate",
            "Sequenced frames received twice (dropped).",
            st.duplicates,
        ),
        (
            "frames_out_of_order",
            "Sequenced frames received after a gap (dropped, retransmission asked).",
            st.out_of_order,
        ),
        (
            "retransmit_timeouts",
            "Retransmission timer expiries.",
            st.timeouts,
        ),
        (
            "channel_resets",
            "Channels reset because of an error (either side).",
            st.channel_resets,
        ),
        (
            "session_restarts",
            "Times the guest's agent started a new session (our channels were dropped).",
            st.session_restarts,
        ),
    ];
    for (metric, help, v) in session {
        f.counter(metric, help, g(), v);
    }
    for (kind, n) in ErrorKind::ALL.iter().zip(st.errors) {
        let mut labels = g();
        labels.push(("kind", kind.name().to_owned()));
        f.counter(
            "protocol_errors",
            "Protocol violations by the guest's side, by kind.",
            labels,
            n,
        );
    }
    f.gauge(
        "held_bytes",
        "Bytes the session holds because of the guest now (bounded by peer_buffer_limit).",
        g(),
        s.stats.held_bytes as f64,
    );
    // Every device class, open or not, so that a class's series does not come and go.
    let mut open: BTreeMap<&str, usize> = registry().iter().map(|d| (d.class(), 0)).collect();
    for c in &s.channels {
        *open.entry(c.class.as_str()).or_default() += 1;
    }
    for (class, n) in open {
        let mut labels = g();
        labels.push(("class", escape(class)));
        f.gauge(
            "channels_open",
            "Open channels, by device class.",
            labels,
            n as f64,
        );
    }
    f.counter(
        "violation_drops",
        "Links of the guest dropped for protocol violations.",
        g(),
        s.held_off.drops,
    );
    f.gauge(
        "held_off",
        "Whether no connection of the guest is taken now (after violations).",
        g(),
        flag(s.held_off.remaining_ms.is_some()),
    );
    f.counter(
        "refused_connections",
        "Connections refused because they claimed the guest without proving it.",
        g(),
        s.refusals.count,
    );
    for t in &s.transports {
        let labels = || {
            let mut l = g();
            l.push(("transport", escape(&t.transport.name)));
            l.push(("kind", escape(&t.transport.kind)));
            l
        };
        f.gauge(
            "transport_up",
            "Whether the transport is up (a mux transport: its link's handshake is done).",
            labels(),
            flag(t.transport.state == "up"),
        );
        if let Some(active) = t.active {
            f.gauge(
                "transport_active",
                "Whether the session sends on this transport's link.",
                labels(),
                flag(active),
            );
        }
        f.counter(
            "transport_connects",
            "Connections made on the transport.",
            labels(),
            t.transport.connects,
        );
        f.counter(
            "transport_errors",
            "Errors on the transport.",
            labels(),
            t.transport.errors,
        );
        let (bytes_in, bytes_out) = t.bytes();
        if let Some(b) = bytes_in {
            f.counter(
                "transport_received_bytes",
                "Bytes read from the transport (a mux transport: by its current link).",
                labels(),
                b,
            );
        }
        f.counter(
            "transport_sent_bytes",
            "Bytes written into the transport (a mux transport: by its current link).",
            labels(),
            bytes_out,
        );
        if let Some(link) = &t.link {
            let d = &link.stats.decode;
            let decode: [(&str, &'static str, u64); 3] = [
                (
                    "transport_frames_received",
                    "Frames decoded by the current link.",
                    d.frames,
                ),
                (
                    "transport_crc_errors",
                    "Frame headers or payloads that failed their CRC on the current link.",
                    d.crc_errors,
                ),
                (
                    "transport_garbage_bytes",
                    "Bytes the current link skipped while looking for a frame.",
                    d.garbage_bytes,
                ),
            ];
            for (metric, help, v) in decode {
                f.counter(metric, help, labels(), v);
            }
        }
    }
    for (class, status) in &s.devices.0 {
        let Some(device) = registry().get(class) else {
            continue;
        };
        for sample in device.samples(status) {
            add_device_sample(f, class, &name, sample);
        }
    }
}

/// A device's sample as `vstream_CLASS_NAME{guest=...,...}`.
fn add_device_sample(f: &mut Families, class: &str, guest: &str, sample: Sample) {
    let mut labels = vec![("guest", guest.to_owned())];
    labels.extend(sample.labels.into_iter().map(|(k, v)| (k, escape(&v))));
    f.add(
        &format!("{class}_{}", sample.name),
        sample.help,
        sample.kind,
        labels,
        Number::from(sample.value),
    );
}
