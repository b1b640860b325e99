//! Throughput of the multiplexer over one Unix socketpair against raw Unix socketpairs, in one
//! run on this machine, so that the ratio mux/raw is meaningful (absolute MB/s are not).
//!
//! `cargo bench -p vstream-link --bench mux_vs_raw` runs everything (two or three minutes).
//! Options after `--`: `--scale F` (bytes per cell times F), `--repeats N` (default 5),
//! `--only W` (write size 64, 4096 or 65536), `--channels C` (1 or 8), `--mux-only` (for
//! profilers), `--api bytes|stream` (only the mux's `Bytes` calls, or only
//! `AsyncWrite`/`AsyncRead`), `--window-kib N` (channel window and send buffer of both ends,
//! default 256), `--fixed-window` (no window growth: `channel_window_max` equal to the window,
//! as before autotuning), `--per-end` or `--shared` (one arrangement of the runtimes only).
//!
//! Every cell runs in two arrangements of tokio runtimes (fresh ones per run, so that no run
//! inherits where the previous one left its tasks), the same for raw and the mux:
//! - per end: two runtimes of one worker each, the sending end (raw writers; the guest's mux
//!   and the channel writers) on one and the receiving end (raw readers; the host's mux and
//!   the channel readers) on the other, as a link's two ends always are two processes
//!   (vstreamd and the agent, each with its own CPU);
//! - shared: both ends on one runtime of two workers. A task woken by another runs next on
//!   the waker's worker (tokio's LIFO slot), so a pipeline of tasks tends to stay on one core;
//!   raw's writer and reader then copy in and out of the kernel with the bytes still in that
//!   core's cache, which no two processes on two CPUs get.
//!
//! Both paths write with the same application
//! write size: raw sockets with `write_all` from the application's buffer and reads into a
//! 256 KiB buffer; the mux with `ChannelStream::write_bytes` (sent from the application's
//! buffer, as `write_all` is) and `read_bytes` of up to 256 KiB (the buffers frames arrived
//! in), and once more (without the payload CRC) through `AsyncWrite`/`AsyncRead` as the raw
//! sockets, which costs a copy into the reader's buffer:
//! - raw, 1 channel: one socketpair, one writer task, one reader task;
//! - raw, 8 channels: 8 socketpairs written concurrently (8 writers, 8 readers);
//! - mux: a host and a guest `Mux` joined by one socketpair; the guest opens 1 or 8 channels
//!   and writes, the host reads. Both ends of the mux run in this process, so the mux's CPU
//!   work of both machines shares the same 2 cores, as both ends of the raw socketpair do.
//!   Sockets are registered with the runtime of the end that uses them. Three times: with the `Bytes` calls, with the payload CRC (the link parameters of a
//!   virtio-serial port) and without (those of a Unix socket, which negotiate it away; checked
//!   after every run), and through `AsyncWrite`/`AsyncRead` without the CRC.
//!
//! Integrity, so that a broken path cannot look fast: the bytes written follow a position
//! pattern (`offset % 251`); every read checks its first and last byte against its stream
//! position, and every channel must deliver exactly the bytes written, then EOF.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use vstream_link::{ChannelStream, Mux};
use vstream_wire::{Config, LinkParams, Role};

/// Reader buffer, the same for raw and mux.
const READ_BUF: usize = 256 * 1024;
/// Period of the byte pattern (prime, so that it never lines up with a write size).
const PERIOD: u64 = 251;
const MIB: u64 = 1024 * 1024;

#[derive(Clone, Copy)]
struct Cell {
    write: usize,
    channels: usize,
    /// Bytes the raw path transfers (split evenly over the channels).
    raw_total: u64,
    /// Bytes the mux transfers: more where it is much faster, so that every run lasts about
    /// half a second or more (the ratio compares rates, not times).
    mux_total: u64,
    /// Channel window and send buffer of both ends, if not the defaults.
    window: Option<u32>,
    /// Whether windows stay as they start (no autotuning).
    fixed_window: bool,
}

/// Where the two ends of a transfer run: the sending end (raw writers; the guest's mux and the
/// channel writers) and the receiving end (raw readers; the host's mux and the channel readers).
#[derive(Clone)]
struct Ends {
    send: tokio::runtime::Handle,
    recv: tokio::runtime::Handle,
}

/// How the two ends share the machine's cores (see the module's documentation).
#[derive(Clone, Copy, PartialEq)]
enum Arrangement {
    /// A runtime of one worker per end.
    PerEnd,
    /// One runtime of two workers for both ends.
    Shared,
}

impl Arrangement {
    fn name(self) -> &'static str {
        match self {
            Arrangement::PerEnd => "per end",
            Arrangement::Shared => "shared",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Raw,
    /// The mux with the payload CRC.
    Mux,
    /// The mux on a link that negotiated the payload CRC away.
    MuxNoCrc,
    /// As `MuxNoCrc`, through `AsyncWrite`/`AsyncRead` instead of the `Bytes` calls.
    MuxNoCrcStream,
}

/// One timed transfer.
struct Sample {
    elapsed: Duration,
    /// Mux only: transport writes issued by the sending link.
    link_writes: u64,
    /// Mux only: bytes the sending link wrote (frames, headers, acks...).
    link_bytes: u64,
}

fn main() {
    let mut scale = 1.0f64;
    let mut only: Option<usize> = None;
    let mut paths = vec![Path::Raw, Path::Mux, Path::MuxNoCrc, Path::MuxNoCrcStream];
    let mut repeats = 5usize;
    let mut only_channels: Option<usize> = None;
    let mut window = None;
    let mut fixed_window = false;
    let mut arrangements = vec![Arrangement::PerEnd, Arrangement::Shared];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scale" => scale = args.next().and_then(|v| v.parse().ok()).expect("--scale F"),
            "--only" => only = Some(args.next().and_then(|v| v.parse().ok()).expect("--only N")),
            // For profiling one path; the table then shows 0 for the other.
            "--mux-only" => paths.retain(|p| *p != Path::Raw),
            // One payload-CRC mode only.
            "--crc" => match args.next().as_deref() {
                Some("on") => paths.retain(|p| *p != Path::MuxNoCrc),
                Some("off") => paths.retain(|p| *p != Path::Mux),
                _ => panic!("--crc on|off"),
            },
            "--channels" => {
                only_channels = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--channels N"),
                )
            }
            "--api" => match args.next().as_deref() {
                Some("bytes") => paths.retain(|p| *p != Path::MuxNoCrcStream),
                Some("stream") => paths.retain(|p| matches!(p, Path::Raw | Path::MuxNoCrcStream)),
                _ => panic!("--api bytes|stream"),
            },
            // A diagnostic: how much a channel's window, not CPU work, limits one channel.
            "--window-kib" => {
                window = Some(
                    args.next()
                        .and_then(|v| v.parse::<u32>().ok())
                        .expect("--window-kib N")
                        * 1024,
                )
            }
            "--fixed-window" => fixed_window = true,
            "--per-end" => arrangements.retain(|a| *a == Arrangement::PerEnd),
            "--shared" => arrangements.retain(|a| *a == Arrangement::Shared),
            "--repeats" => {
                repeats = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--repeats N")
            }
            _ => {} // `cargo bench` passes `--bench`; filters are not supported.
        }
    }
    let cells: Vec<Cell> = [
        (64usize, 64 * MIB, 1024 * MIB),
        (4096, 2048 * MIB, 2048 * MIB),
        (65536, 8192 * MIB, 4096 * MIB),
    ]
    .into_iter()
    .filter(|(w, _, _)| only.is_none_or(|o| o == *w))
    .flat_map(|(write, raw, mux)| {
        // A whole number of writes on every channel.
        let unit = write as u64 * 8;
        let bytes = |total: u64| ((total as f64 * scale) as u64 / unit).max(1) * unit;
        [1, 8].map(|channels| Cell {
            write,
            channels,
            raw_total: bytes(raw),
            mux_total: bytes(mux),
            window,
            fixed_window,
        })
    })
    .filter(|c| only_channels.is_none_or(|n| n == c.channels))
    .collect();

    println!("# vstream multiplexer vs raw Unix socketpair");
    println!("date (UTC):   {}", utc_now());
    println!(
        "machine:      nproc {}, {}, kernel {}, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "?".into(), |s| s.trim().to_owned()),
        load_average(),
    );
    let (memcpy, crc) = single_core_rates();
    println!(
        "one core:     memcpy {memcpy:.1} GB/s, CRC-32C {crc:.1} GB/s (64 KiB blocks, cache-warm)"
    );
    println!(
        "runtimes:     per end (--per-end): one tokio runtime of 1 worker for the sending end, \
         one for the receiving end, as a link's ends are two processes; shared (--shared): \
         one tokio multi-thread runtime of 2 workers for both ends; fresh ones per run, for \
         both paths"
    );
    println!(
        "mux API:      ChannelStream::write_bytes / read_bytes (raw: write_all / read); \
         stream: AsyncWrite::write_all / AsyncRead::read, as raw, without the payload CRC"
    );
    println!(
        "mux window:   {} KiB per channel at first, both ends (default 256); {}",
        window.map_or(256, |w| w / 1024),
        if fixed_window {
            "fixed (--fixed-window)".to_owned()
        } else {
            format!(
                "grows up to {} KiB while it limits a channel",
                Config::new(Role::Host, "").channel_window_max / 1024
            )
        }
    );
    println!(
        "method:       median of {repeats} runs per cell, raw and the mux's three runs alternating; \
         MB/s = 10^6 payload bytes/s"
    );
    println!("spread:       (fastest - slowest) / median, over the runs of a cell");
    println!(
        "raw, 8 ch:    8 separate socketpairs written concurrently \
         (mux, 8 ch: 8 channels on 1 socketpair)"
    );
    println!("B/link-write: payload+framing bytes per write(v) call of the sending mux link");
    println!("integrity:    first/last byte of every read checked against its stream offset, exact byte count and EOF per channel");
    println!();
    println!(
        "crc / no crc: the mux with the payload CRC / on a link that negotiated it away; \
         stream: no CRC, AsyncWrite/AsyncRead"
    );
    let mut fastest_run = None;
    for &arrangement in &arrangements {
        println!();
        println!("runtimes: {}", arrangement.name());
        println!(
        "{:>6} {:>3} {:>6} {:>9} {:>6} {:>6} {:>9} {:>6} {:>8} {:>9} {:>6} {:>8} {:>9} {:>6} {:>8} {:>13}",
        "write",
        "ch",
        "MiB",
        "raw MB/s",
        "spread",
        "MiB",
        "crc MB/s",
        "spread",
        "crc/raw",
        "no-crc",
        "spread",
        "no/raw",
        "stream",
        "spread",
        "st/raw",
        "B/link-write"
    );

        let mut results: Vec<(Cell, [f64; 3], Duration)> = Vec::new();
        for cell in &cells {
            let mut raw = Vec::new();
            let mut mux = Vec::new();
            let mut nocrc = Vec::new();
            let mut stream = Vec::new();
            for _ in 0..repeats {
                for &path in &paths {
                    // A fresh runtime per run, so that no run inherits the scheduler state (which
                    // worker holds which task) of the one before.
                    let runtime = |workers| {
                        tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(workers)
                            .enable_all()
                            .build()
                            .expect("runtime")
                    };
                    let (rt, other) = match arrangement {
                        Arrangement::PerEnd => (runtime(1), Some(runtime(1))),
                        Arrangement::Shared => (runtime(2), None),
                    };
                    let ends = Ends {
                        send: rt.handle().clone(),
                        recv: other.as_ref().unwrap_or(&rt).handle().clone(),
                    };
                    let sample = rt.block_on(run(path, *cell, ends));
                    match path {
                        Path::Raw => raw.push(sample),
                        Path::Mux => mux.push(sample),
                        Path::MuxNoCrc => nocrc.push(sample),
                        Path::MuxNoCrcStream => stream.push(sample),
                    }
                }
            }
            let mbps = |total: u64| move |d: Duration| total as f64 / d.as_secs_f64() / 1e6;
            let (r, r_spread, _) = summary(&raw, mbps(cell.raw_total));
            let (m, m_spread, mid) = summary(&mux, mbps(cell.mux_total));
            let (n, n_spread, n_mid) = summary(&nocrc, mbps(cell.mux_total));
            let (st, st_spread, st_mid) = summary(&stream, mbps(cell.mux_total));
            let per_write = mid
                .or(n_mid)
                .or(st_mid)
                .and_then(|s| s.link_bytes.checked_div(s.link_writes))
                .unwrap_or(0);
            println!(
            "{:>6} {:>3} {:>6} {:>9.0} {:>5.0}% {:>6} {:>9.0} {:>5.0}% {:>7.2}x {:>9.0} {:>5.0}% {:>7.2}x {:>9.0} {:>5.0}% {:>7.2}x {:>13}",
            size_label(cell.write),
            cell.channels,
            cell.raw_total / MIB,
            r,
            r_spread,
            cell.mux_total / MIB,
            m,
            m_spread,
            m / r,
            n,
            n_spread,
            n / r,
            st,
            st_spread,
            st / r,
            per_write
        );
            let fastest = raw
                .iter()
                .chain(&mux)
                .chain(&nocrc)
                .chain(&stream)
                .map(|s| s.elapsed)
                .min();
            results.push((*cell, [m / r, n / r, st / r], fastest.unwrap_or_default()));
        }

        println!();
        // Which ratio: the Bytes calls with, or without, the payload CRC, or AsyncRead/AsyncWrite.
        let modes = [
            "payload CRC on ",
            "payload CRC off",
            "CRC off, AsyncRead/AsyncWrite",
        ];
        let verdict = |write: usize, target: f64, mode: usize| {
            let cells: Vec<(usize, f64)> = results
                .iter()
                .filter(|(c, _, _)| c.write == write)
                .map(|(c, ratios, _)| (c.channels, ratios[mode]))
                .filter(|(_, ratio)| !ratio.is_nan())
                .collect();
            if cells.is_empty() {
                return;
            }
            let met = cells.iter().all(|(_, ratio)| *ratio >= target);
            let detail: Vec<String> = cells
                .iter()
                .map(|(channels, ratio)| format!("{channels} ch {ratio:.2}x"))
                .collect();
            println!(
                "target mux >= {target}x raw at {:>6}, {}, {}: {} ({})",
                size_label(write),
                arrangement.name(),
                modes[mode],
                if met { "MET" } else { "MISSED" },
                detail.join(", ")
            );
        };
        for mode in 0..modes.len() {
            verdict(65536, 0.9, mode);
            // Issue 11: small writes must stay at least 4x raw (the mux batches them).
            verdict(64, 4.0, mode);
        }
        if let Some(f) = results.iter().min_by_key(|(_, _, t)| *t) {
            if fastest_run.is_none_or(|(_, _, t)| f.2 < t) {
                fastest_run = Some(*f);
            }
        }
    }
    let (memcpy, crc) = single_core_rates();
    println!(
        "at the end:   load average {}; one core: memcpy {memcpy:.1} GB/s, CRC-32C {crc:.1} GB/s \
         (lower than at the start = other work competed for the cores)",
        load_average()
    );
    if let Some((c, _, t)) = fastest_run {
        if t < Duration::from_millis(500) {
            println!(
                "note: fastest run ({} x{} ch) took {:.0} ms; raise --scale for steadier figures",
                size_label(c.write),
                c.channels,
                t.as_secs_f64() * 1e3
            );
        }
    }
}

/// Median MB/s, spread in % of it, and the median sample (`NaN`s when there was no run).
fn summary(v: &[Sample], mbps: impl Fn(Duration) -> f64) -> (f64, f64, Option<&Sample>) {
    let mut sorted: Vec<&Sample> = v.iter().collect();
    sorted.sort_by_key(|s| s.elapsed);
    let Some(mid) = sorted.get(sorted.len() / 2).copied() else {
        return (f64::NAN, f64::NAN, None);
    };
    let median = mbps(mid.elapsed);
    let (fast, slow) = (sorted[0], sorted[sorted.len() - 1]);
    let spread = (mbps(fast.elapsed) - mbps(slow.elapsed)) / median * 100.0;
    (median, spread, Some(mid))
}

async fn run(path: Path, cell: Cell, ends: Ends) -> Sample {
    let res = match path {
        Path::Raw => run_raw(cell, ends).await,
        Path::Mux => run_mux(cell, LinkParams::stream(0), true, ends).await,
        Path::MuxNoCrc => run_mux(cell, LinkParams::socket(0), true, ends).await,
        Path::MuxNoCrcStream => run_mux(cell, LinkParams::socket(0), false, ends).await,
    };
    res.unwrap_or_else(|e| {
        panic!(
            "{} {} x{}: {e}",
            match path {
                Path::Raw => "raw",
                Path::Mux => "mux",
                Path::MuxNoCrc => "mux without payload CRC",
                Path::MuxNoCrcStream => "mux without payload CRC, AsyncRead/AsyncWrite",
            },
            cell.write,
            cell.channels
        )
    })
}

async fn run_raw(cell: Cell, ends: Ends) -> io::Result<Sample> {
    let per = cell.raw_total / cell.channels as u64;
    let pattern = Bytes::from(pattern(cell.write));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..cell.channels {
        let (w, r) = socket_pair()?;
        writers.push(w);
        readers.push(
            ends.recv
                .spawn(async move { receive(UnixStream::from_std(r)?, per).await }),
        );
    }
    let start = Instant::now();
    let senders: Vec<_> = writers
        .into_iter()
        .map(|w| {
            let pattern = pattern.clone();
            ends.send.spawn(async move {
                send(UnixStream::from_std(w)?, cell.write, per, pattern).await
            })
        })
        .collect();
    for r in readers {
        r.await.map_err(io::Error::other)??;
    }
    let elapsed = start.elapsed();
    for s in senders {
        s.await.map_err(io::Error::other)??;
    }
    Ok(Sample {
        elapsed,
        link_writes: 0,
        link_bytes: 0,
    })
}

async fn run_mux(
    cell: Cell,
    params: LinkParams,
    bytes_api: bool,
    ends: Ends,
) -> io::Result<Sample> {
    let per = cell.mux_total / cell.channels as u64;
    let pattern = Bytes::from(pattern(cell.write));
    let config = |role, name| {
        let mut c = Config::new(role, name);
        if let Some(w) = cell.window {
            c.channel_window = w;
            c.channel_send_buffer = w as usize;
        }
        if cell.fixed_window {
            c.channel_window_max = c.channel_window;
        }
        c
    };
    let (host, mut incoming) = Mux::new(config(Role::Host, "bench-host"), 0x1111);
    let (guest, _none) = Mux::new(config(Role::Guest, "bench-guest"), 0x2222);
    let (a, b) = socket_pair()?;
    let writes = Arc::new(AtomicU64::new(0));
    let links = [
        ends.recv.spawn({
            let host = host.clone();
            async move {
                let a = UnixStream::from_std(a)?;
                Ok::<_, io::Error>(host.run_link(a, params, "unix:pair", &[]).await)
            }
        }),
        ends.send.spawn({
            let guest = guest.clone();
            let writes = writes.clone();
            async move {
                let b = CountWrites {
                    inner: UnixStream::from_std(b)?,
                    writes,
                };
                Ok(guest.run_link(b, params, "unix:pair", &[]).await)
            }
        }),
    ];
    // The host's first read accepts each channel (OPEN_OK), which completes the guest's `open`.
    let channels = cell.channels;
    let acceptor = ends.recv.spawn(async move {
        let mut readers = Vec::new();
        for _ in 0..channels {
            let inc = incoming
                .recv()
                .await
                .ok_or_else(|| io::Error::other("host session ended"))?;
            readers.push(if bytes_api {
                tokio::spawn(receive(BytesApi(inc.stream), per))
            } else {
                tokio::spawn(receive(inc.stream, per))
            });
        }
        Ok::<_, io::Error>(readers)
    });
    let mut streams = Vec::new();
    for k in 0..cell.channels {
        streams.push(guest.open("bench", &format!("ch{k}")).await?);
    }
    let readers = acceptor.await.map_err(io::Error::other)??;
    let bytes_before = guest_link_bytes(&guest);
    let writes_before = writes.load(Ordering::Relaxed);
    let start = Instant::now();
    let senders: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let pattern = pattern.clone();
            if bytes_api {
                ends.send
                    .spawn(async move { Ok(send(BytesApi(s), cell.write, per, pattern).await?.0) })
            } else {
                ends.send.spawn(send(s, cell.write, per, pattern))
            }
        })
        .collect();
    for r in readers {
        r.await.map_err(io::Error::other)??;
    }
    let elapsed = start.elapsed();
    for s in senders {
        s.await.map_err(io::Error::other)??;
    }
    // The mode measured is the mode asked for.
    if guest
        .status()
        .links
        .iter()
        .any(|l| l.payload_crc == params.checksummed)
    {
        return Err(io::Error::other(
            "the link did not negotiate the payload-CRC mode asked for",
        ));
    }
    let sample = Sample {
        elapsed,
        link_writes: writes.load(Ordering::Relaxed) - writes_before,
        link_bytes: guest_link_bytes(&guest) - bytes_before,
    };
    for l in links {
        l.abort();
    }
    Ok(sample)
}

/// A connected pair of sockets, each registered with a runtime only where its end runs
/// (`UnixStream::from_std` there): a socket's readiness comes from the reactor it was
/// registered with, which on another runtime would wake its task late.
fn socket_pair() -> io::Result<(
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    Ok((a, b))
}

fn guest_link_bytes(m: &Mux) -> u64 {
    m.status().links.iter().map(|l| l.stats.bytes_out).sum()
}

/// `write + PERIOD` bytes of the position pattern: a write at stream offset `o` is the slice
/// starting at `o % PERIOD`.
fn pattern(write: usize) -> Vec<u8> {
    (0..write as u64 + PERIOD)
        .map(|i| (i % PERIOD) as u8)
        .collect()
}

/// How an application writes and reads a stream: through `AsyncWrite`/`AsyncRead`, or through
/// the mux's `Bytes` calls ([`BytesApi`]).
trait AppIo: Send + 'static {
    /// Writes all of `data`.
    fn put(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the direction.
    fn done(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads what is there: into `buf` (its length) or as bytes of its own; empty at EOF.
    fn get(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<Got>> + Send;
}

/// What [`AppIo::get`] read.
enum Got {
    InBuf(usize),
    Own(Bytes),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AppIo for S {
    async fn put(&mut self, data: Bytes) -> io::Result<()> {
        self.write_all(&data).await
    }
    async fn done(&mut self) -> io::Result<()> {
        self.shutdown().await
    }
    async fn get(&mut self, buf: &mut [u8]) -> io::Result<Got> {
        Ok(Got::InBuf(self.read(buf).await?))
    }
}

/// A channel written with `write_bytes` and read with `read_bytes`.
struct BytesApi(ChannelStream);

impl AppIo for BytesApi {
    async fn put(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_bytes(data).await
    }
    async fn done(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
    async fn get(&mut self, buf: &mut [u8]) -> io::Result<Got> {
        Ok(Got::Own(self.0.read_bytes(buf.len()).await?))
    }
}

/// Writes `bytes` in application writes of `write` bytes, then closes the direction.
async fn send<W: AppIo>(mut w: W, write: usize, bytes: u64, pattern: Bytes) -> io::Result<W> {
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(write as u64) as usize;
        let at = (sent % PERIOD) as usize;
        w.put(pattern.slice(at..at + n)).await?;
        sent += n as u64;
    }
    w.done().await?;
    // The stream is returned (not dropped) so the mux cannot discard anything early.
    Ok(w)
}

/// Reads to EOF; checks the position pattern at both ends of every read and the total.
async fn receive<R: AppIo>(mut r: R, expected: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_BUF];
    let mut got = 0u64;
    loop {
        let piece = r.get(&mut buf).await?;
        let data = match &piece {
            Got::InBuf(k) => &buf[..*k],
            Got::Own(b) => &b[..],
        };
        let k = data.len();
        if k == 0 {
            break;
        }
        let last = got + k as u64 - 1;
        if u64::from(data[0]) != got % PERIOD || u64::from(data[k - 1]) != last % PERIOD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt or misordered data at offset {got} (read of {k} bytes)"),
            ));
        }
        got += k as u64;
    }
    if got != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("received {got} bytes, expected {expected}"),
        ));
    }
    Ok(got)
}

/// Counts the write calls that reach the transport (each is one `write` syscall).
struct CountWrites<S> {
    inner: S,
    writes: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountWrites<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(_))) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(_))) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn size_label(write: usize) -> String {
    if write >= 1024 {
        format!("{} KiB", write / 1024)
    } else {
        format!("{write} B")
    }
}

/// The 1, 5 and 15 minute load averages: other work on this machine skews the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// GB/s of `memcpy` and of CRC-32C over 64 KiB on one core: the per-byte work the mux adds
/// (two copies in each direction's application buffers, a CRC at each end) costs this much.
fn single_core_rates() -> (f64, f64) {
    let src = vec![0x5Au8; 64 * 1024];
    let mut dst = vec![0u8; 64 * 1024];
    let rate = |f: &mut dyn FnMut() -> u32| {
        let (start, mut bytes, mut sink) = (Instant::now(), 0u64, 0u32);
        while start.elapsed() < Duration::from_millis(200) {
            for _ in 0..64 {
                sink = sink.wrapping_add(f());
                bytes += src.len() as u64;
            }
        }
        std::hint::black_box(sink);
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    let memcpy = rate(&mut || {
        dst.copy_from_slice(std::hint::black_box(&src));
        u32::from(std::hint::black_box(&dst)[7])
    });
    let crc = rate(&mut || crc32c::crc32c(std::hint::black_box(&src)));
    (memcpy, crc)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Current UTC date and time, "YYYY-MM-DD HH:MM" (days-to-civil, H. Hinnant's algorithm).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}
