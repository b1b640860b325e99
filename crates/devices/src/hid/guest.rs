//! The guest half: one uinput device per kind, created on the first channel of that kind and
//! kept for the agent's life (desktops pick up a new input device asynchronously; a device made
//! per command would lose the first events and flood them with hotplugs). Channels of the same
//! kind share it; each batch is written whole under the device's lock, so reports of two
//! channels never interleave. When a channel ends, the keys and buttons it left pressed are
//! released, so a killed forwarder leaves no stuck key.
//!
//! Also here: [`evtest`], a small evdev reader (`vstream-agent evtest`), used by the lab.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vstream_link::ChannelStream;

use super::codes::*;
use super::{Decoder, Event, Kind, Message, ABS_MAX, FLAG_ACK, FLAG_PROBE, FLAG_SEEN, VERSION};
use crate::record::Message as _;
use crate::{ServeFuture, Service};

/// How long a new device is left alone before its first events, so that udev and desktop
/// input stacks have opened it.
pub const SETTLE: Duration = Duration::from_millis(200);

/// How long a probe waits to read its report back from the evdev node.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the guest writes events: a uinput device, or a recorder in tests.
pub trait Sink: Send {
    /// Writes `events` followed by one `SYN_REPORT`. With `probe`, then reads the report back
    /// from the device's evdev node and returns whether it was seen (within
    /// [`PROBE_TIMEOUT`]); without, returns false.
    fn emit(&mut self, events: &[Event], probe: bool) -> io::Result<bool>;
    /// The evdev node's name (`event3`), empty if unknown.
    fn node(&self) -> String;
}

/// Makes the device of a kind.
pub trait Backend: Send + Sync {
    /// Creates the device (blocking: called on a blocking thread).
    fn create(&self, kind: Kind) -> io::Result<Box<dyn Sink>>;
}

/// The real backend: /dev/uinput.
pub struct UinputBackend;

impl Backend for UinputBackend {
    fn create(&self, kind: Kind) -> io::Result<Box<dyn Sink>> {
        Ok(Box::new(Uinput::create(kind)?))
    }
}

/// A device shared by the channels of its kind.
pub type SharedSink = Arc<Mutex<Box<dyn Sink>>>;

/// The hid service of the agent.
pub struct Hid {
    inner: Arc<HidInner>,
}

struct HidInner {
    backend: Arc<dyn Backend>,
    devices: tokio::sync::Mutex<HashMap<Kind, SharedSink>>,
}

impl Hid {
    /// Devices made through /dev/uinput.
    pub fn uinput() -> Hid {
        Hid::with_backend(Arc::new(UinputBackend))
    }

    /// Devices made by `backend` (tests).
    pub fn with_backend(backend: Arc<dyn Backend>) -> Hid {
        Hid {
            inner: Arc::new(HidInner {
                backend,
                devices: tokio::sync::Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl HidInner {
    async fn device(&self, kind: Kind) -> io::Result<SharedSink> {
        let mut devices = self.devices.lock().await;
        if let Some(d) = devices.get(&kind) {
            return Ok(d.clone());
        }
        let backend = self.backend.clone();
        let sink = tokio::task::spawn_blocking(move || backend.create(kind))
            .await
            .map_err(io::Error::other)??;
        let sink: SharedSink = Arc::new(Mutex::new(sink));
        devices.insert(kind, sink.clone());
        Ok(sink)
    }
}

impl Default for Hid {
    fn default() -> Self {
        Hid::uinput()
    }
}

fn lock(sink: &SharedSink) -> std::sync::MutexGuard<'_, Box<dyn Sink>> {
    sink.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service for Hid {
    fn class(&self) -> &'static str {
        super::CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let Some(kind) = Kind::from_name(&name) else {
            stream.reset(&format!(
                "hid has no device {name:?} (keyboard, mouse or tablet)"
            ));
            return Box::pin(async {});
        };
        let inner = self.inner.clone();
        Box::pin(async move {
            let sink = match inner.device(kind).await {
                Ok(s) => s,
                Err(e) => {
                    let why = format!("cannot create the {kind} uinput device: {e}");
                    tracing::warn!("hid: {why}");
                    stream.reset(&why);
                    return;
                }
            };
            if let Err(e) = serve_channel(kind, sink, stream).await {
                tracing::debug!(%kind, "hid channel ended: {e}");
            }
        })
    }
}

/// Serves one channel: [`serve_stream`], then a reset with the reason if the host broke the
/// protocol.
async fn serve_channel(kind: Kind, sink: SharedSink, mut stream: ChannelStream) -> io::Result<()> {
    let result = serve_stream(kind, &sink, &mut stream).await;
    if let Err(e) = &result {
        if e.kind() == io::ErrorKind::InvalidData {
            stream.reset(&e.to_string());
        }
    }
    let _ = stream.shutdown().await;
    result
}

/// Serves the guest's end of the hid protocol on `stream` into `sink`: `Ready`, then batches
/// until the host closes; releases what it pressed. Used by the agent's channels and by
/// vstreamd for the virtio-input devices it serves itself.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    kind: Kind,
    sink: &SharedSink,
    stream: &mut S,
) -> io::Result<()> {
    let node = lock(sink).node();
    let ready = Message::Ready {
        version: VERSION,
        kind,
        node,
    };
    stream
        .write_all(&ready.to_bytes().map_err(io::Error::other)?)
        .await?;
    let mut pressed: BTreeSet<u16> = BTreeSet::new();
    let result = replay(kind, sink, stream, &mut pressed).await;
    if !pressed.is_empty() {
        let release: Vec<Event> = pressed.iter().map(|k| Event::key(*k, false)).collect();
        tracing::info!(%kind, keys = ?pressed, "hid channel ended with keys pressed: releasing them");
        for part in release.chunks(super::MAX_EVENTS) {
            if let Err(e) = lock(sink).emit(part, false) {
                tracing::warn!(%kind, "releasing keys: {e}");
            }
        }
    }
    result
}

async fn replay<S: AsyncRead + AsyncWrite + Unpin>(
    kind: Kind,
    sink: &SharedSink,
    stream: &mut S,
    pressed: &mut BTreeSet<u16>,
) -> io::Result<()> {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; super::READ_CHUNK];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return decoder
                .finish()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        decoder
            .push(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("hid/{kind}: {e}")))?;
        loop {
            let msg = decoder.next_message().map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("hid/{kind}: {e}"))
            })?;
            let Some(msg) = msg else { break };
            let Message::Batch { seq, flags, events } = msg else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("hid/{kind}: the host sent a guest message ({msg:?})"),
                ));
            };
            for (i, ev) in events.iter().enumerate() {
                kind.allows(ev).map_err(|why| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("hid/{kind}: batch {seq}, event {i}: {why}"),
                    )
                })?;
            }
            for ev in &events {
                if ev.type_ == EV_KEY {
                    if ev.value == 0 {
                        pressed.remove(&ev.code);
                    } else {
                        pressed.insert(ev.code);
                    }
                }
            }
            let probe = flags & FLAG_PROBE != 0;
            let seen = if probe {
                let sink = sink.clone();
                tokio::task::spawn_blocking(move || lock(&sink).emit(&events, true))
                    .await
                    .map_err(io::Error::other)??
            } else {
                lock(sink).emit(&events, false)?
            };
            if flags & (FLAG_ACK | FLAG_PROBE) != 0 {
                let ack = Message::Ack {
                    seq,
                    flags: if seen { FLAG_SEEN } else { 0 },
                };
                stream
                    .write_all(&ack.to_bytes().map_err(io::Error::other)?)
                    .await?;
            }
        }
    }
}

/// A uinput device with exactly the capabilities of its kind.
pub struct Uinput {
    kind: Kind,
    device: evdev::uinput::VirtualDevice,
    node: Option<PathBuf>,
    reader: Option<evdev::Device>,
}

impl Uinput {
    /// Creates the device, waits for its evdev node and lets it settle ([`SETTLE`]).
    pub fn create(kind: Kind) -> io::Result<Uinput> {
        use evdev::{
            AbsInfo, AbsoluteAxisCode, AttributeSet, BusType, InputId, KeyCode, PropType,
            RelativeAxisCode, UinputAbsSetup,
        };
        let open = |e: io::Error| io::Error::new(e.kind(), format!("/dev/uinput: {e}"));
        let keys: AttributeSet<KeyCode> = kind.keys().into_iter().map(KeyCode::new).collect();
        let [bus, vendor, product, version] = kind.input_id();
        let mut b = evdev::uinput::VirtualDevice::builder()
            .map_err(open)?
            .name(kind.device_name())
            .input_id(InputId::new(BusType(bus), vendor, product, version))
            .with_keys(&keys)?;
        if !kind.rel_axes().is_empty() {
            let axes: AttributeSet<RelativeAxisCode> = kind
                .rel_axes()
                .iter()
                .map(|a| RelativeAxisCode(*a))
                .collect();
            b = b.with_relative_axes(&axes)?;
        }
        for axis in kind.abs_axes() {
            let info = AbsInfo::new(0, 0, ABS_MAX, 0, 0, 0);
            b = b.with_absolute_axis(&UinputAbsSetup::new(AbsoluteAxisCode(*axis), info))?;
        }
        if !kind.props().is_empty() {
            let props: AttributeSet<PropType> = kind.props().iter().map(|p| PropType(*p)).collect();
            b = b.with_properties(&props)?;
        }
        let mut device = b.build()?;
        // The kernel creates the node asynchronously (devtmpfs); wait for it.
        let deadline = Instant::now() + Duration::from_secs(2);
        let node = loop {
            let found = device
                .enumerate_dev_nodes_blocking()
                .ok()
                .and_then(|mut it| it.find_map(Result::ok));
            match found {
                Some(p) if p.exists() => break Some(p),
                _ if Instant::now() >= deadline => break None,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        std::thread::sleep(SETTLE);
        tracing::info!(%kind, node = ?node, "hid: uinput device created");
        Ok(Uinput {
            kind,
            device,
            node,
            reader: None,
        })
    }

    fn read_back(&mut self, events: &[Event]) -> io::Result<bool> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(false);
        };
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let mut report = Vec::new();
        loop {
            let fetched: io::Result<Vec<evdev::InputEvent>> =
                reader.fetch_events().map(|evs| evs.collect());
            match fetched {
                Ok(evs) => {
                    for e in evs {
                        if e.event_type().0 == EV_SYN && e.code() == SYN_REPORT {
                            if report == events {
                                return Ok(true);
                            }
                            report.clear();
                        } else if e.event_type().0 != EV_SYN {
                            report.push(Event::new(e.event_type().0, e.code(), e.value()));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    wait_readable(reader.as_fd(), left)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn drain(reader: &mut evdev::Device) {
    while let Ok(evs) = reader.fetch_events() {
        if evs.count() == 0 {
            break;
        }
    }
}

impl Sink for Uinput {
    fn emit(&mut self, events: &[Event], probe: bool) -> io::Result<bool> {
        if probe && self.reader.is_none() {
            if let Some(node) = &self.node {
                let reader = evdev::Device::open(node)?;
                reader.set_nonblocking(true)?;
                self.reader = Some(reader);
            }
        }
        if probe {
            if let Some(r) = self.reader.as_mut() {
                drain(r);
            }
        }
        let evs: Vec<evdev::InputEvent> = events
            .iter()
            .map(|e| evdev::InputEvent::new(e.type_, e.code, e.value))
            .collect();
        self.device.emit(&evs).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("writing to the {} uinput device: {e}", self.kind),
            )
        })?;
        if probe {
            self.read_back(events)
        } else {
            Ok(false)
        }
    }

    fn node(&self) -> String {
        self.node
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Finds the evdev node of the input device called `name` (first match).
pub fn find_device(name: &str) -> Option<PathBuf> {
    let mut found: Vec<(PathBuf, String)> = evdev::enumerate()
        .map(|(p, d)| (p, d.name().unwrap_or_default().to_owned()))
        .collect();
    found.sort();
    found.into_iter().find(|(_, n)| n == name).map(|(p, _)| p)
}

/// A line for one event, as [`evtest`] prints it: `EV_KEY 30 1`, `SYN_REPORT`.
pub fn event_line(type_: u16, code: u16, value: i32) -> String {
    match (type_, code) {
        (EV_SYN, SYN_REPORT) => "SYN_REPORT".to_owned(),
        (EV_SYN, SYN_DROPPED) => "SYN_DROPPED".to_owned(),
        _ => {
            let t = match type_ {
                EV_SYN => "EV_SYN".to_owned(),
                EV_KEY => "EV_KEY".to_owned(),
                EV_REL => "EV_REL".to_owned(),
                EV_ABS => "EV_ABS".to_owned(),
                EV_MSC => "EV_MSC".to_owned(),
                t => format!("EV_{t}"),
            };
            format!("{t} {code} {value}")
        }
    }
}

/// A tiny evtest: waits for the device named `name` (or opens the node `path`), prints
/// `listening on NODE` and then one line per event ([`event_line`]) to `out`, until `reports`
/// reports were read or `timeout` passed. With `grab`, takes the device exclusively. Returns
/// the number of reports read.
pub fn evtest(
    device: &str,
    reports: usize,
    timeout: Duration,
    grab: bool,
    out: &mut dyn io::Write,
) -> io::Result<usize> {
    let deadline = Instant::now() + timeout;
    let path = loop {
        let p = if device.starts_with('/') {
            Some(PathBuf::from(device))
        } else {
            find_device(device)
        };
        match p {
            Some(p) if Path::new(&p).exists() => break p,
            _ if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no input device {device:?} within {} s", timeout.as_secs()),
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut dev = evdev::Device::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if grab {
        dev.grab()?;
    }
    dev.set_nonblocking(true)?;
    writeln!(
        out,
        "listening on {} ({})",
        path.display(),
        dev.name().unwrap_or_default()
    )?;
    out.flush()?;
    let mut seen = 0;
    while seen < reports {
        let fetched: io::Result<Vec<evdev::InputEvent>> =
            dev.fetch_events().map(|evs| evs.collect());
        match fetched {
            Ok(evs) => {
                for e in evs {
                    writeln!(out, "{}", event_line(e.event_type().0, e.code(), e.value()))?;
                    if e.event_type().0 == EV_SYN && e.code() == SYN_REPORT {
                        seen += 1;
                        if seen == reports {
                            break;
                        }
                    }
                }
                out.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                wait_readable(dev.as_fd(), left)?;
            }
            Err(e) => return Err(e),
        }
    }
    writeln!(out, "done: {seen} reports")?;
    out.flush()?;
    Ok(seen)
}
