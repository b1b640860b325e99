//! The guest half: a [`Client`] for the `random` channel and the [`Feeder`] that credits the
//! bytes to the guest kernel's entropy pool, as rngd does for a hardware RNG.
//!
//! When the feeder adds entropy:
//! - at start, to fill the pool (`poolsize - entropy_avail` bits, at least [`FeedSettings::start`]
//!   bytes);
//! - when the kernel asks: `/dev/random` polls writable (`POLLOUT`). Kernels before 5.18 raise it
//!   when `entropy_avail` drops below `write_wakeup_threshold`; 5.18 and later raise it only
//!   while the CRNG is not yet initialised;
//! - after any wake-up, until `entropy_avail >= min(write_wakeup_threshold, poolsize)` (at most
//!   [`FeedSettings::max_rounds`] chunks in a row);
//! - every [`FeedSettings::refresh`] anyway (the kernel's own hwrng thread reseeds on this
//!   kind of period), so a long-running guest keeps mixing in fresh host entropy.
//!
//! Memory is bounded: one buffer of [`FeedSettings::chunk`] bytes, wiped after each use.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use vstream_link::{ChannelStream, Mux};

use vstream_transport::Backoff;

use super::{Request, CLASS, MAX_REQUEST, POOL_CHANNEL};
use crate::channel::{open_with_backoff, REOPEN_PAUSE};

/// A `random` channel: ask for bytes, get them.
pub struct Client {
    stream: ChannelStream,
}

impl Client {
    /// Opens a channel named `name` (the feeder uses [`POOL_CHANNEL`]).
    pub async fn open(mux: &Mux, name: &str) -> io::Result<Client> {
        Ok(Client {
            stream: mux.open(CLASS, name).await?,
        })
    }

    /// Fills `buf` with host entropy (waits as long as the guest's budget requires).
    pub async fn fetch(&mut self, buf: &mut [u8]) -> io::Result<()> {
        for part in buf.chunks_mut(MAX_REQUEST as usize) {
            let len = u32::try_from(part.len()).map_err(io::Error::other)?;
            let req = Request::new(len).map_err(io::Error::other)?;
            self.stream.write_all(&req.encode()).await?;
            self.stream.read_exact(part).await?;
        }
        Ok(())
    }
}

/// The state of an entropy pool, in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLevel {
    /// `entropy_avail`.
    pub avail: u32,
    /// `write_wakeup_threshold`: below this the pool wants more.
    pub threshold: u32,
    /// `poolsize`.
    pub size: u32,
}

impl PoolLevel {
    /// The level the feeder fills up to.
    pub fn target(&self) -> u32 {
        self.threshold.min(self.size)
    }

    /// Whether the pool is below its target.
    pub fn low(&self) -> bool {
        self.avail < self.target()
    }

    /// Bytes that would fill the pool, within `1..=max`.
    pub fn deficit_bytes(&self, max: usize) -> usize {
        let bits = self.size.saturating_sub(self.avail) as usize;
        bits.div_ceil(8).clamp(1, max.max(1))
    }
}

/// Where the feeder puts entropy: the guest kernel ([`KernelPool`]), or a test's capture.
pub trait Pool: Send {
    /// The current level.
    fn level(&mut self) -> io::Result<PoolLevel>;
    /// Adds `data`, credited as full entropy (8 bits a byte).
    fn add(&mut self, data: &[u8]) -> io::Result<()>;
    /// Resolves when the pool asks for more (`POLLOUT` on `/dev/random`).
    fn demand(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::write::<[libc::c_int; 2]>(b'R', 0x03);

/// Most bytes one `RNDADDENTROPY` carries here (the kernel takes any size; this bounds the
/// stack buffer).
const MAX_ADD: usize = 4096;

/// `struct rand_pool_info` with its buffer inline.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ADD],
}

/// The guest kernel's pool: `/dev/random` and `/proc/sys/kernel/random`. Adding needs
/// `CAP_SYS_ADMIN`.
pub struct KernelPool {
    dev: AsyncFd<std::fs::File>,
    proc_dir: PathBuf,
}

impl KernelPool {
    /// Opens `/dev/random` and checks the proc files are readable.
    pub fn open() -> io::Result<KernelPool> {
        Self::open_at("/dev/random".into(), "/proc/sys/kernel/random".into())
    }

    /// Opens another device and proc directory (tests).
    pub fn open_at(dev: PathBuf, proc_dir: PathBuf) -> io::Result<KernelPool> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&dev)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dev.display())))?;
        // SAFETY: the `File` owns its descriptor, which stays open (and is the one
        // `as_raw_fd` returns) until the `AsyncFd` that owns the `File` is dropped.
        let dev = unsafe { AsyncFd::register_with_interest(file, Interest::WRITABLE) }?;
        let mut pool = KernelPool { dev, proc_dir };
        pool.level()?;
        Ok(pool)
    }

    fn read_proc(&self, name: &str) -> io::Result<u32> {
        let path = self.proc_dir.join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        text.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {text:?}: {e}", path.display()),
            )
        })
    }
}

impl Pool for KernelPool {
    fn level(&mut self) -> io::Result<PoolLevel> {
        Ok(PoolLevel {
            avail: self.read_proc("entropy_avail")?,
            threshold: self.read_proc("write_wakeup_threshold")?,
            size: self.read_proc("poolsize")?,
        })
    }

    fn add(&mut self, data: &[u8]) -> io::Result<()> {
        for part in data.chunks(MAX_ADD) {
            let mut info = RandPoolInfo {
                entropy_count: (part.len() * 8) as libc::c_int,
                buf_size: part.len() as libc::c_int,
                buf: [0; MAX_ADD],
            };
            info.buf[..part.len()].copy_from_slice(part);
            // SAFETY: `info` is a live, properly aligned `struct rand_pool_info` whose
            // `buf_size` bytes of `buf` are initialised and inside the struct; the kernel only
            // reads it for the duration of the call. The fd is open and owned by `self.dev`.
            let rc = unsafe {
                libc::ioctl(
                    self.dev.get_ref().as_raw_fd(),
                    RNDADDENTROPY as libc::Ioctl,
                    &info as *const RandPoolInfo,
                )
            };
            let result = if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            };
            info.buf.fill(0);
            std::hint::black_box(&info.buf);
            result.map_err(|e| io::Error::new(e.kind(), format!("RNDADDENTROPY: {e}")))?;
        }
        Ok(())
    }

    async fn demand(&mut self) -> io::Result<()> {
        let mut guard = self.dev.writable().await?;
        // Edge-triggered: forget this readiness; the feeder checks the level itself before
        // waiting again, so no wake-up is missed.
        guard.clear_ready();
        Ok(())
    }
}

/// How the feeder behaves.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Bytes added at start even if the pool reports full.
    pub start: usize,
    /// Largest addition at once (and the size of the one buffer).
    pub chunk: usize,
    /// Most chunks in a row after one wake-up.
    pub max_rounds: u32,
    /// Periodic addition even without demand; `None` turns it off.
    pub refresh: Option<Duration>,
    /// Bytes of a periodic addition.
    pub refresh_bytes: usize,
}

impl Default for FeedSettings {
    fn default() -> FeedSettings {
        FeedSettings {
            start: 64,
            chunk: 512,
            max_rounds: 16,
            refresh: Some(Duration::from_secs(60)),
            refresh_bytes: 64,
        }
    }
}

/// Why the feeder stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The pool refused entropy or cannot be read (e.g. no `CAP_SYS_ADMIN`): no point retrying.
    #[error("entropy pool: {0}")]
    Pool(io::Error),
    /// The channel failed: reopen and carry on.
    #[error("random channel: {0}")]
    Channel(io::Error),
}

/// Counters of a feeder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// Bytes added to the pool.
    pub bytes: u64,
    /// Additions.
    pub adds: u64,
}

/// Feeds a [`Pool`] from a [`Client`].
pub struct Feeder<P: Pool> {
    pool: P,
    settings: FeedSettings,
    buf: Vec<u8>,
    stats: FeedStats,
    started: bool,
}

impl<P: Pool> Feeder<P> {
    /// A feeder for `pool`.
    pub fn new(pool: P, settings: FeedSettings) -> Feeder<P> {
        let chunk = settings.chunk.clamp(1, MAX_REQUEST as usize);
        Feeder {
            pool,
            settings: FeedSettings { chunk, ..settings },
            buf: vec![0; chunk],
            stats: FeedStats::default(),
            started: false,
        }
    }

    /// What was fed so far.
    pub fn stats(&self) -> FeedStats {
        self.stats
    }

    /// The pool.
    pub fn pool(&self) -> &P {
        &self.pool
    }

    async fn add(&mut self, client: &mut Client, len: usize) -> Result<(), FeedError> {
        let len = len.clamp(1, self.settings.chunk);
        let buf = &mut self.buf[..len];
        client.fetch(buf).await.map_err(FeedError::Channel)?;
        let added = self.pool.add(buf);
        buf.fill(0);
        std::hint::black_box(&self.buf);
        added.map_err(FeedError::Pool)?;
        self.stats.bytes += len as u64;
        self.stats.adds += 1;
        Ok(())
    }

    /// Adds chunks while the pool is below its target (at most `max_rounds`).
    async fn top_up(&mut self, client: &mut Client) -> Result<(), FeedError> {
        for _ in 0..self.settings.max_rounds {
            let level = self.pool.level().map_err(FeedError::Pool)?;
            if !level.low() {
                break;
            }
            let len = level.deficit_bytes(self.settings.chunk);
            self.add(client, len).await?;
        }
        Ok(())
    }

    /// Feeds through `client` until the channel or the pool fails.
    pub async fn run(&mut self, client: &mut Client) -> FeedError {
        match self.run_inner(client).await {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    async fn run_inner(
        &mut self,
        client: &mut Client,
    ) -> Result<std::convert::Infallible, FeedError> {
        if !self.started {
            let level = self.pool.level().map_err(FeedError::Pool)?;
            let len = level
                .deficit_bytes(self.settings.chunk)
                .max(self.settings.start.min(self.settings.chunk));
            self.add(client, len).await?;
            self.started = true;
            let after = self.pool.level().map_err(FeedError::Pool)?;
            tracing::info!(
                bytes = len,
                entropy_avail = after.avail,
                poolsize = after.size,
                "random: fed the kernel's pool at start"
            );
        }
        let refresh = self.settings.refresh;
        loop {
            self.top_up(client).await?;
            let asked = tokio::select! {
                r = self.pool.demand() => { r.map_err(FeedError::Pool)?; true }
                () = sleep_or_never(refresh) => false,
            };
            if asked {
                let level = self.pool.level().map_err(FeedError::Pool)?;
                if !level.low() {
                    // POLLOUT with a full count: a kernel whose CRNG wants seeding; one chunk.
                    let len = self.settings.refresh_bytes;
                    self.add(client, len).await?;
                }
            } else {
                let len = self.settings.refresh_bytes;
                self.add(client, len).await?;
                tracing::debug!(bytes = len, "random: periodic refresh");
            }
        }
    }
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Keeps `feeder` fed through channels of `mux`, reopening them when they fail; returns when the
/// pool fails (logged).
pub async fn run_feeder<P: Pool>(mux: Mux, mut feeder: Feeder<P>) {
    // The first failure waits 2 s, doubling to 60 s; a channel that ended is reopened after 1 s.
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
    loop {
        let stream = open_with_backoff(&mux, CLASS, POOL_CHANNEL, &mut backoff).await;
        match feeder.run(&mut Client { stream }).await {
            FeedError::Pool(e) => {
                tracing::error!("random: cannot feed the kernel's entropy pool: {e}; stopping");
                return;
            }
            FeedError::Channel(e) => tracing::info!("random: channel ended ({e}); reopening"),
        }
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}
