//! The device descriptor and the registry that vstreamd, vstreamctl and vstream-agent iterate
//! over: none of them names a device.
//!
//! A device is one value implementing [`Device`]: a trait object rather than a struct of fn
//! pointers because most devices override only a few of its methods (defaults say "nothing
//! here"), and because a test can register a device of its own (`tests/upper/`) with the same
//! code path as the built-in ones ([`Registry::with`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use vstream_link::{ChannelStream, Mux};
use vstream_transport::{Address, BoxStream};

use crate::status::DeviceStatus;
use crate::{EventSink, ServeFuture, Service};

/// A future a device hands to the daemon, the agent or the command line.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A vstreamctl verb's future (vstreamctl runs one at a time, on one thread).
pub type VerbFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<i32>> + 'a>>;

/// A `[guest.CLASS]` section, or a device option, that is wrong: the message says which key and
/// why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[guest.{class}]: {message}")]
pub struct SettingsError {
    /// The device's class (the section's name).
    pub class: &'static str,
    /// What is wrong.
    pub message: String,
}

impl SettingsError {
    /// An error in `class`'s section.
    pub fn new(class: &'static str, message: impl std::fmt::Display) -> SettingsError {
        SettingsError {
            class,
            message: message.to_string(),
        }
    }
}

/// Reads a device's `[guest.CLASS]` section as its settings type: `None` if absent; unknown keys
/// and wrong types are errors naming the section.
pub fn section<T: DeserializeOwned>(
    class: &'static str,
    section: Option<&Value>,
) -> Result<Option<T>, SettingsError> {
    section
        .map(|v| serde_json::from_value(v.clone()).map_err(|e| SettingsError::new(class, e)))
        .transpose()
}

/// [`section`], then `validate` on the settings if present: its error names the section too.
pub fn valid_section<T: DeserializeOwned, E: std::fmt::Display>(
    class: &'static str,
    s: Option<&Value>,
    validate: impl FnOnce(&T) -> Result<(), E>,
) -> Result<Option<T>, SettingsError> {
    let s: Option<T> = section(class, s)?;
    if let Some(s) = &s {
        validate(s).map_err(|e| SettingsError::new(class, e))?;
    }
    Ok(s)
}

/// What a configured guest's sections are checked against.
#[derive(Debug, Clone, Default)]
pub struct GuestFacts {
    /// The guest has a QMP socket.
    pub has_qmp: bool,
    /// The guest's transports of the device's raw kinds.
    pub transports: Vec<RawTransport>,
}

#[cfg(feature = "host")]
/// See [`HostContext::carried_console`].
pub type TakeCarried = Arc<dyn Fn(&str) -> Option<crate::console::Carried> + Send + Sync>;

/// One `[[guest.transport]]` of a kind a device owns (not `mux`).
#[derive(Debug, Clone)]
pub struct RawTransport {
    /// Its kind (one of the device's [`Device::raw_kinds`]).
    pub kind: String,
    /// Name shown in status.
    pub name: String,
    /// Where.
    pub address: Address,
    /// A log file for what comes out of it, if the config names one.
    pub log: Option<PathBuf>,
    /// Log size before rotation.
    pub log_max_bytes: u64,
    /// Rotated logs kept.
    pub log_keep: usize,
}

impl RawTransport {
    /// The socket of a vhost-user transport (its `unix-listen:` address, where the VMM
    /// connects); `class` names the device in the error.
    pub fn vhost_user_socket(&self, class: &'static str) -> Result<&Path, SettingsError> {
        match &self.address {
            Address::UnixListen(path) => Ok(path),
            other => Err(SettingsError::new(
                class,
                format!(
                    "transport {:?} of kind {}: expected a unix-listen: address (the socket the VMM connects to), not {other}",
                    self.name, self.kind
                ),
            )),
        }
    }
}

/// What a host half knows about the guest it serves (built by vstreamd per guest).
#[derive(Clone)]
pub struct HostContext {
    /// The guest's name.
    pub guest: String,
    /// The guest's QMP socket, for actions on the virtual machine.
    pub qmp: Option<Address>,
    /// The guest's session, for channels the host half opens.
    pub mux: Mux,
    /// Where the guest's events go (`vstreamctl events`).
    pub events: EventSink,
    /// Where events of the guest's start go: every `events` client gets them first, marked
    /// `replayed` (e.g. print jobs a killed vstreamd left incomplete).
    pub start_events: EventSink,
    /// Where the guest's state lives (`STATE_DIR/GUEST`); `None` for a guest that announced
    /// itself (it gets nothing on disk).
    pub state_dir: Option<PathBuf>,
    /// The device's `[guest.CLASS]` section, already checked by [`Device::check`].
    pub section: Option<Value>,
    /// The guest's transports of the device's raw kinds.
    pub transports: Vec<RawTransport>,
    #[cfg(feature = "host")]
    /// The connection of one of the guest's consoles (by name) that a live upgrade's
    /// predecessor handed over, if any: the console adopts it instead of connecting.
    pub carried_console: TakeCarried,
}

/// A raw transport's line in `vstreamctl status` (a `mux` transport's has the link's counters
/// too; vstreamd adds them).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TransportStatus {
    /// `mux`, or a device's raw kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// `up`, `down`, `connecting`.
    pub state: String,
    /// Since when (Unix seconds).
    pub since: u64,
    /// Who is connected.
    pub peer: String,
    /// Connections made.
    #[serde(default)]
    pub connects: u64,
    /// Errors.
    pub errors: u64,
    /// The last one.
    pub last_error: Option<String>,
    /// Bytes read from it by vstreamd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Bytes written into it by vstreamd.
    pub bytes_out: u64,
    /// What else the device says about it (a console's log and viewers).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// A control connection handed to a device (`vstreamctl console`, `agent`, ...): the device
/// answers with [`ControlConn::reply`] or [`ControlConn::refuse`], then either uses the bytes
/// itself ([`ControlConn::into_stream`]) or hands a long-lived connection back to vstreamd
/// ([`ControlConn::bridge`], [`ControlConn::view`]) so that a live upgrade can carry it.
pub struct ControlConn {
    client: Client,
    carrier: Arc<dyn Carrier>,
}

/// A control connection's client, after its request line.
pub struct Client {
    /// The guest the request is about.
    pub guest: String,
    /// What the client sends (may hold bytes read past the request line).
    pub r: BufReader<OwnedReadHalf>,
    /// Where replies go.
    pub w: OwnedWriteHalf,
}

/// A future that serves a connection to its end.
pub type CarryFuture = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// How vstreamd runs the long-lived connections it can carry across a live upgrade (the
/// socket halves themselves are handed over, so a device never holds them past this call).
pub trait Carrier: Send + Sync {
    /// Pipes the client and `chan` both ways until both are done.
    fn bridge(&self, client: Client, chan: ChannelStream) -> CarryFuture;
    #[cfg(feature = "host")]
    /// Sends a console's output to the client (and, `attach`ed, its typing to the console)
    /// until either is done.
    fn view(&self, client: Client, view: ConsoleViewer) -> CarryFuture;
}

#[cfg(feature = "host")]
/// A console viewer that [`Carrier::view`] serves.
pub struct ConsoleViewer {
    /// The console.
    pub console: Arc<crate::console::Console>,
    /// Its viewer.
    pub viewer: crate::console::Viewer,
    /// Whether the client types.
    pub attach: bool,
}

impl ControlConn {
    /// The connection of a request about `guest` (`r` after the request line).
    pub fn new(
        guest: &str,
        r: BufReader<OwnedReadHalf>,
        w: OwnedWriteHalf,
        carrier: Arc<dyn Carrier>,
    ) -> ControlConn {
        ControlConn {
            client: Client {
                guest: guest.to_owned(),
                r,
                w,
            },
            carrier,
        }
    }

    /// The first reply line: `{"ok":true}` plus `fields` (an object).
    pub async fn reply(&mut self, fields: Value) -> std::io::Result<()> {
        let mut v = match fields {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        v.insert("ok".into(), Value::Bool(true));
        self.line(&Value::Object(v)).await
    }

    /// An error reply.
    pub async fn refuse(&mut self, error: impl std::fmt::Display) -> std::io::Result<()> {
        let v = serde_json::json!({ "ok": false, "error": error.to_string() });
        self.line(&v).await
    }

    /// Writes raw bytes to the client.
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.client.w.write_all(bytes).await
    }

    /// The connection as a byte stream, for a device that serves it itself (not carried
    /// across a live upgrade).
    pub fn into_stream(self) -> BoxStream {
        Box::new(tokio::io::join(self.client.r, self.client.w))
    }

    #[cfg(feature = "host")]
    /// Relays the connection to `stream` both ways until both are done (not carried across a
    /// live upgrade). When `stream` is one descriptor a thread of its own does it, waiting in
    /// `poll` (a latency-bound path such as QGA's raw transport: see [`crate::thread`]); else two
    /// tasks copy.
    pub async fn relay(self, stream: BoxStream) -> std::io::Result<()> {
        let raw = match crate::thread::detach(stream) {
            Ok(fd) => fd,
            Err(stream) => return pipe(self.into_stream(), stream).await,
        };
        // The client's halves give up their registrations too.
        let pending = self.client.r.buffer().to_vec();
        let client = self
            .client
            .r
            .into_inner()
            .reunite(self.client.w)
            .map_err(std::io::Error::other)?
            .into_std()?;
        let client = std::os::fd::OwnedFd::from(client);
        crate::thread::on_thread("relay", move || {
            crate::thread::relay(&client, &raw, &pending)
        })
        .await
    }

    /// Pipes the connection to `chan` (carried across a live upgrade).
    pub async fn bridge(self, chan: ChannelStream) -> std::io::Result<()> {
        self.carrier.bridge(self.client, chan).await
    }

    #[cfg(feature = "host")]
    /// Serves a console viewer (carried across a live upgrade).
    pub async fn view(self, view: ConsoleViewer) -> std::io::Result<()> {
        self.carrier.view(self.client, view).await
    }

    async fn line(&mut self, v: &Value) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.client.w.write_all(&line).await?;
        self.client.w.flush().await
    }
}

/// The running host half of a device for one guest: what vstreamd asks of it after the start.
pub trait HostState: Send + Sync {
    /// The device's typed status, shown under `devices.CLASS` in `vstreamctl status`.
    fn status(&self) -> Option<DeviceStatus> {
        None
    }
    /// The state of the device's raw transports.
    fn transports(&self) -> Vec<TransportStatus> {
        Vec::new()
    }
    #[cfg(feature = "host")]
    /// The guest's consoles this device captures (a live upgrade finds the console of a
    /// carried viewer here).
    fn consoles(&self) -> Vec<Arc<crate::console::Console>> {
        Vec::new()
    }
    /// Serves a control request of one of the device's ops ([`Device::control_ops`]); `request`
    /// is the whole request object.
    fn control(&self, _op: &str, _request: Value, mut conn: ControlConn) -> ServeFuture {
        Box::pin(async move {
            let _ = conn.refuse("this device takes no control requests").await;
        })
    }
}

/// Nothing to report, nothing to control.
struct NoState;
impl HostState for NoState {}

/// What a device's host half starts for one guest.
pub struct HostHalf {
    /// Services for the channels of its class that the guest opens.
    pub services: Vec<Arc<dyn Service>>,
    /// Per-guest tasks (e.g. serving raw transports), ended when the guest is forgotten.
    pub tasks: Vec<ServeFuture>,
    /// Status, raw transports and control requests.
    pub state: Arc<dyn HostState>,
}

impl HostHalf {
    /// Only channel services.
    pub fn services(services: Vec<Arc<dyn Service>>) -> HostHalf {
        HostHalf {
            services,
            tasks: Vec::new(),
            state: Arc::new(NoState),
        }
    }
}

/// A device's guest options, set by vstream-agent's command line (and kernel command line) or by
/// a program embedding the agent; each device reads its own by class.
#[derive(Default)]
pub struct GuestOptions {
    by_class: BTreeMap<&'static str, Arc<dyn Any + Send + Sync>>,
}

impl GuestOptions {
    /// Sets `class`'s options (the type its guest half expects).
    pub fn set<T: Any + Send + Sync>(&mut self, class: &'static str, options: T) -> &mut Self {
        self.by_class.insert(class, Arc::new(options));
        self
    }

    /// `class`'s options, if set and of type `T`.
    pub fn get<T: Any + Send + Sync>(&self, class: &str) -> Option<&T> {
        self.by_class.get(class)?.downcast_ref()
    }
}

impl Clone for GuestOptions {
    fn clone(&self) -> Self {
        GuestOptions {
            by_class: self.by_class.clone(),
        }
    }
}

impl std::fmt::Debug for GuestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_class.keys()).finish()
    }
}

/// What the agent's own command line says to a device, and the kernel command line.
pub struct AgentArgs<'a> {
    /// The agent's parsed command line (with the device's [`Device::agent_args`]).
    pub matches: &'a clap::ArgMatches,
    /// The kernel command line (empty if unreadable).
    pub cmdline: &'a str,
    /// Whether the agent takes its settings from the kernel command line (it was given no
    /// `--connect`): `vstream.KEY=` words that only apply then are read.
    pub from_kernel: bool,
}

/// A device's guest half running in the agent.
#[derive(Default)]
pub struct GuestHalf {
    /// Services for the channels of its class that the host opens.
    pub services: Vec<Arc<dyn Service>>,
    /// Tasks that run for the agent's life (they open channels, serve raw transports).
    pub tasks: Vec<ServeFuture>,
    /// Run on a clean stop with its reason (e.g. a watchdog disarm), before the tasks end.
    pub on_stop: Option<Box<dyn FnOnce(String) -> ServeFuture + Send>>,
}

/// A terminal in a page (the web console's shell), as [`Device::terminal`] serves it: a login
/// shell on a pty of `size` whose bytes go both ways.
#[cfg(feature = "host")]
pub struct PageTerminal {
    /// The page terminal's size when the shell starts.
    pub size: crate::term::WindowSize,
    /// What the page types; its end ends the shell's input.
    pub keys: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    /// The shell's output.
    pub stdout: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    /// The shell's error output (none on a pty, where both go to the terminal).
    pub stderr: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    /// Each new size of the page's terminal.
    pub resizes: tokio::sync::mpsc::UnboundedReceiver<crate::term::WindowSize>,
}

/// Runs a [`PageTerminal`] session on a channel opened to the device's class (its two
/// halves); ends with the shell and says how, for the page.
#[cfg(feature = "host")]
pub type TerminalFn = fn(
    Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    PageTerminal,
) -> BoxFuture<'static, String>;

/// A vstreamctl verb's way to vstreamd: the requests it may send.
pub trait Control: Sync {
    /// Sends `request` (a control request object) and returns vstreamd's first reply line (an
    /// error reply is an error) and the connection, for what follows.
    fn call(&self, request: Value) -> BoxFuture<'_, anyhow::Result<(Value, BoxStream)>>;

    /// If the command failed because vstreamd went away or was replaced during it, why.
    fn lost(&self) -> BoxFuture<'_, Option<String>>;
}

/// vstreamd did not answer at the start of a command (the error's context, so that a command
/// can tell this from losing vstreamd midway).
#[derive(Debug)]
pub struct Unreachable(pub PathBuf);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot reach vstreamd at {} (is it running? --control / VSTREAM_CONTROL)",
            self.0.display()
        )
    }
}

/// What vstreamctl's verbs of a device get.
pub struct VerbContext<'a> {
    /// vstreamctl's parsed command line; its subcommand is the verb.
    pub matches: &'a clap::ArgMatches,
    /// The way to vstreamd.
    pub control: &'a dyn Control,
}

impl VerbContext<'_> {
    /// Opens a channel of `class` named `name` on `guest` through vstreamd (`open`).
    pub async fn open(&self, guest: &str, class: &str, name: &str) -> anyhow::Result<BoxStream> {
        let req = serde_json::json!({ "op": "open", "guest": guest, "class": class, "name": name });
        Ok(self.control.call(req).await?.1)
    }
}

/// Everything the rest of the system needs to know about one device.
pub trait Device: Send + Sync {
    /// The device class: the channel class, the `[guest.CLASS]` section, the key of its status.
    fn class(&self) -> &'static str;

    /// `[[guest.transport]]` kinds it owns besides `mux` (e.g. `random-raw`).
    fn raw_kinds(&self) -> &'static [&'static str] {
        &[]
    }

    /// Checks a configured guest's `[guest.CLASS]` (`None`: absent): its keys and types when
    /// the file is parsed (`guest` is `None`), its values against the rest of the guest's
    /// config (`guest`: its QMP socket, its transports of the device's kinds) when it is loaded.
    /// By default a device has no section.
    fn check(
        &self,
        section: Option<&Value>,
        _guest: Option<&GuestFacts>,
    ) -> Result<(), SettingsError> {
        match section {
            None => Ok(()),
            Some(_) => Err(SettingsError::new(
                self.class(),
                "this device has no settings",
            )),
        }
    }

    /// Starts the host half for one guest (inside a tokio runtime).
    fn host(&self, _ctx: &HostContext) -> Result<HostHalf, SettingsError> {
        Ok(HostHalf::services(Vec::new()))
    }

    /// Reads back the JSON of this device's status ([`HostState::status`]) as its type
    /// (vstreamctl): `DeviceStatus::read::<MyStatus>(json)`. By default it stays JSON.
    fn read_status(&self, json: Value) -> serde_json::Result<DeviceStatus> {
        Ok(DeviceStatus::new(json))
    }

    /// The numbers of this device's `status` ([`HostState::status`], [`crate::Service::status`])
    /// for vstreamd's metrics: `status_type!` gives them from the status type's
    /// [`crate::status::Samples`]. By default none.
    fn samples(&self, _status: &DeviceStatus) -> Vec<crate::status::Sample> {
        Vec::new()
    }

    /// Control-socket ops (`{"op":OP,"guest":...}`) served by [`HostState::control`].
    fn control_ops(&self) -> &'static [&'static str] {
        &[]
    }

    /// How control request `request` of op `op` is named in messages ("OP needs the owner"),
    /// and whether the read-only group may make it (it only watches). By default: the op, and
    /// no.
    fn control_access(&self, op: &str, _request: &Value) -> (String, bool) {
        (op.to_owned(), false)
    }

    /// The events vstreamd emits when a channel of this class is opened and closed through
    /// `vstreamctl open` (default `channel-opened`, `channel-closed`).
    fn channel_events(&self) -> (&'static str, &'static str) {
        ("channel-opened", "channel-closed")
    }

    /// How this device runs an interactive shell for a page ([`TerminalFn`], on a channel of
    /// its class named `""`), if it offers one: the web console finds it through
    /// [`Registry::terminal`]. By default none.
    #[cfg(feature = "host")]
    fn terminal(&self) -> Option<TerminalFn> {
        None
    }

    /// vstream-agent's options for this device.
    fn agent_args(&self) -> Vec<clap::Arg> {
        Vec::new()
    }

    /// Reads the agent's options for this device from its command lines into `options`.
    fn agent_options(
        &self,
        _args: &AgentArgs<'_>,
        _options: &mut GuestOptions,
    ) -> Result<(), SettingsError> {
        Ok(())
    }

    /// Whether these agent options give the agent something to do without any `--connect`
    /// (a raw transport of the device's own).
    fn serves_without_connect(&self, _options: &GuestOptions) -> bool {
        false
    }

    /// Process set-up these agent options ask for, done before the agent starts any thread (a
    /// pid file, becoming a daemon, a log file); `Break` when they asked only for output (a
    /// configuration dump) and the agent should exit.
    fn agent_prepare(&self, _options: &GuestOptions) -> anyhow::Result<std::ops::ControlFlow<()>> {
        Ok(std::ops::ControlFlow::Continue(()))
    }

    /// Hidden vstream-agent subcommands: helpers for tests and diagnosis.
    fn agent_tools(&self) -> Vec<clap::Command> {
        Vec::new()
    }

    /// Runs agent tool `name` (one of [`Device::agent_tools`]), outside any runtime.
    fn run_agent_tool(&self, _name: &str, _matches: &clap::ArgMatches) -> anyhow::Result<()> {
        anyhow::bail!("no such tool")
    }

    /// Starts the guest half (inside a tokio runtime).
    fn guest(&self, _mux: &Mux, _options: &GuestOptions) -> GuestHalf {
        GuestHalf::default()
    }

    /// vstreamctl's verbs for this device.
    fn verbs(&self) -> Vec<clap::Command> {
        Vec::new()
    }

    /// Runs verb `ctx.matches.subcommand()` (one of [`Device::verbs`]); returns the process's
    /// exit status.
    fn run_verb<'a>(&'a self, _ctx: VerbContext<'a>) -> VerbFuture<'a> {
        Box::pin(async { anyhow::bail!("no such verb") })
    }
}

/// The devices, in the order their status, transports and verbs are shown.
#[derive(Clone)]
pub struct Registry {
    devices: Vec<Arc<dyn Device>>,
}

impl Registry {
    /// The built-in devices.
    fn builtin() -> Registry {
        Registry {
            devices: vec![
                Arc::new(crate::diag::device::Diag),
                Arc::new(crate::console::device::ConsoleDevice),
                Arc::new(crate::tty::device::TtyDevice),
                Arc::new(crate::qga::device::QgaDevice),
                Arc::new(crate::hid::device::HidDevice),
                Arc::new(crate::printer::device::PrinterDevice),
                Arc::new(crate::random::device::RandomDevice),
                Arc::new(crate::watchdog::device::WatchdogDevice),
                Arc::new(crate::ppp::device::PppDevice),
                Arc::new(crate::fastnet::device::FastnetDevice),
                Arc::new(crate::files::device::FilesDevice),
            ],
        }
    }

    /// This registry and one more device (tests; a program embedding vstream).
    pub fn with(mut self, device: Arc<dyn Device>) -> Registry {
        self.devices.push(device);
        self
    }

    /// Every device.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Device>> {
        self.devices.iter()
    }

    /// The device of `class`.
    pub fn get(&self, class: &str) -> Option<&Arc<dyn Device>> {
        self.devices.iter().find(|d| d.class() == class)
    }

    /// The device that owns raw transport kind `kind`.
    pub fn owner_of_kind(&self, kind: &str) -> Option<&Arc<dyn Device>> {
        self.devices.iter().find(|d| d.raw_kinds().contains(&kind))
    }

    /// The device that serves control op `op`.
    pub fn owner_of_op(&self, op: &str) -> Option<&Arc<dyn Device>> {
        self.devices.iter().find(|d| d.control_ops().contains(&op))
    }

    /// The device that offers interactive shells ([`Device::terminal`]): its class and how
    /// to run one.
    #[cfg(feature = "host")]
    pub fn terminal(&self) -> Option<(&'static str, TerminalFn)> {
        self.devices
            .iter()
            .find_map(|d| Some((d.class(), d.terminal()?)))
    }

    /// The device with vstream-agent tool `tool`.
    pub fn owner_of_tool(&self, tool: &str) -> Option<&Arc<dyn Device>> {
        self.devices
            .iter()
            .find(|d| d.agent_tools().iter().any(|c| c.get_name() == tool))
    }

    /// The device with vstreamctl verb `verb`.
    pub fn owner_of_verb(&self, verb: &str) -> Option<&Arc<dyn Device>> {
        self.devices
            .iter()
            .find(|d| d.verbs().iter().any(|c| c.get_name() == verb))
    }

    /// The guest halves' services and tasks, started on `mux` with `options`.
    pub fn start_guest(&self, mux: &Mux, options: &GuestOptions) -> GuestHalf {
        let mut all = GuestHalf::default();
        let mut stops = Vec::new();
        for d in &self.devices {
            let half = d.guest(mux, options);
            all.services.extend(half.services);
            all.tasks.extend(half.tasks);
            stops.extend(half.on_stop);
        }
        if !stops.is_empty() {
            all.on_stop = Some(Box::new(move |reason: String| -> ServeFuture {
                Box::pin(async move {
                    for stop in stops {
                        stop(reason.clone()).await;
                    }
                })
            }));
        }
        all
    }
}

/// The built-in devices.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::builtin)
}

/// The values of `vstream.KEY=VALUE` words on a kernel command line, in order.
pub fn cmdline_values<'a>(cmdline: &'a str, key: &str) -> impl Iterator<Item = &'a str> + 'a {
    let prefix = format!("vstream.{key}=");
    cmdline
        .split_ascii_whitespace()
        .filter_map(move |w| w.strip_prefix(prefix.as_str()))
}

#[cfg(feature = "host")]
/// Joins two byte streams, both directions until both ends are done; EOF is passed on as a half
/// close.
async fn pipe<A, B>(a: A, b: B) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = async {
        tokio::io::copy(&mut ar, &mut bw).await?;
        bw.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut br, &mut aw).await?;
        aw.shutdown().await
    };
    let (x, y) = tokio::join!(up, down);
    x.and(y)
}

#[cfg(feature = "host")]
/// [`Device::verbs`] and [`Device::run_verb`] of a device whose verbs are a module's `Verb`
/// enum and `run` function (the shape of every device's `verbs.rs`): `verbs_in!(super::verbs);`
macro_rules! verbs_in {
    ($($module:tt)+) => {
        fn verbs(&self) -> Vec<clap::Command> {
            $crate::registry::verbs_of::<$($module)+::Verb>()
        }

        fn run_verb<'a>(
            &'a self,
            ctx: $crate::registry::VerbContext<'a>,
        ) -> $crate::registry::VerbFuture<'a> {
            Box::pin($($module)+::run(ctx))
        }
    };
}
#[cfg(feature = "host")]
pub(crate) use verbs_in;

/// [`Device::read_status`] and [`Device::samples`] of a device whose status is type `T`,
/// compiled into the host half only (where vstreamd and vstreamctl read statuses):
/// `status_type!(super::host::MyStatus);`
macro_rules! status_type {
    ($status:ty) => {
        #[cfg(feature = "host")]
        fn read_status(
            &self,
            json: serde_json::Value,
        ) -> serde_json::Result<$crate::status::DeviceStatus> {
            $crate::status::DeviceStatus::read::<$status>(json)
        }

        #[cfg(feature = "host")]
        fn samples(&self, status: &$crate::status::DeviceStatus) -> Vec<$crate::status::Sample> {
            status
                .get::<$status>()
                .map($crate::status::Samples::samples)
                .unwrap_or_default()
        }
    };
}
pub(crate) use status_type;

/// The commands of a derived [`clap::Subcommand`] enum, for [`Device::verbs`].
pub fn verbs_of<S: clap::Subcommand>() -> Vec<clap::Command> {
    S::augment_subcommands(clap::Command::new("verbs"))
        .get_subcommands()
        .cloned()
        .collect()
}
