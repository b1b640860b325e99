//! The connections a live upgrade carries: control connections bridged to guest channels
//! ([`Pump`]) and console viewers ([`ConsoleView`]), each able to stop with every byte it
//! holds in its own state.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{oneshot, watch};
use vstream_devices::console::{Console, Viewer};
use vstream_link::ChannelStream;

use vstream_devices::registry::{CarryFuture, Client, ConsoleViewer};

use super::{Handover, PUMP_BUF, SKIPPED};

/// One control connection joined to a guest channel: moves bytes both ways, and can stop at
/// any await point with every byte it holds in `up` or `down` (so a stopped pump, carried
/// to the successor, loses and repeats nothing).
pub struct Pump {
    pub(super) guest: String,
    pub(super) r: OwnedReadHalf,
    pub(super) w: OwnedWriteHalf,
    pub(super) chan: ChannelStream,
    /// From the client, not yet taken by the channel.
    pub(super) up: Vec<u8>,
    /// From the channel, not yet written to the client.
    pub(super) down: Vec<u8>,
    /// The client ended its direction / the channel was told.
    pub(super) up_eof: bool,
    pub(super) up_closed: bool,
    /// The channel ended its direction / the client was told.
    pub(super) down_eof: bool,
    pub(super) down_closed: bool,
}

impl Pump {
    /// A pump for a control connection (whose reader may already hold client bytes) and a
    /// channel.
    pub fn new(
        guest: &str,
        r: BufReader<OwnedReadHalf>,
        w: OwnedWriteHalf,
        chan: ChannelStream,
    ) -> Pump {
        Pump {
            guest: guest.to_owned(),
            up: r.buffer().to_vec(),
            r: r.into_inner(),
            w,
            chan,
            down: Vec::new(),
            up_eof: false,
            up_closed: false,
            down_eof: false,
            down_closed: false,
        }
    }

    fn done(&self) -> bool {
        self.up_closed && self.down_closed
    }

    /// Does every step that is ready now; all state changes happen here, inside one poll, so
    /// dropping the future between polls is always clean. Ready when the pump is done.
    fn poll_pump(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<()>> {
        loop {
            let up = [&mut self.up_eof, &mut self.up_closed];
            let mut progressed = step(cx, buf, &mut self.r, &mut self.chan, &mut self.up, up)?;
            let down = [&mut self.down_eof, &mut self.down_closed];
            progressed |= step(cx, buf, &mut self.chan, &mut self.w, &mut self.down, down)?;
            if self.done() {
                return Poll::Ready(Ok(()));
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    /// Runs until done (`None`) or until `stop` is set (the pump, to be carried or resumed).
    pub(super) async fn run(
        mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> io::Result<Option<Pump>> {
        let mut buf = vec![0u8; PUMP_BUF];
        let stopped = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => true,
            done = std::future::poll_fn(|cx| self.poll_pump(cx, &mut buf)) => {
                done?;
                false
            }
        };
        Ok(stopped.then_some(self))
    }
}

/// One direction of a [`Pump`]: reads into `held` when it is empty, writes `held` out, and
/// passes the end on as a shutdown once `held` is empty (`[eof, closed]`: the end was read /
/// passed on). Returns whether anything moved.
fn step<R, W>(
    cx: &mut Context<'_>,
    buf: &mut [u8],
    from: &mut R,
    to: &mut W,
    held: &mut Vec<u8>,
    [eof, closed]: [&mut bool; 2],
) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut progressed = false;
    if held.is_empty() && !*eof {
        let mut rb = ReadBuf::new(buf);
        if let Poll::Ready(r) = Pin::new(&mut *from).poll_read(cx, &mut rb) {
            r?;
            *eof = rb.filled().is_empty();
            held.extend_from_slice(rb.filled());
            progressed = true;
        }
    }
    if !held.is_empty() {
        if let Poll::Ready(n) = Pin::new(&mut *to).poll_write(cx, held) {
            held.drain(..n?);
            progressed = true;
        }
    } else if *eof && !*closed {
        if let Poll::Ready(r) = Pin::new(&mut *to).poll_shutdown(cx) {
            r?;
            *closed = true;
            progressed = true;
        }
    }
    Ok(progressed)
}

/// A console viewer's connection (`vstreamctl console`, following or attached).
pub struct ConsoleView {
    /// Guest name.
    pub guest: String,
    /// The console.
    pub console: Arc<Console>,
    /// Its viewer.
    pub viewer: Viewer,
    /// The client's side (typed bytes, when attached).
    pub r: BufReader<OwnedReadHalf>,
    /// Where the output goes.
    pub w: OwnedWriteHalf,
    /// Whether the client types.
    pub attach: bool,
    /// Output taken from the viewer's queue for an upgrade, not yet written to the client.
    pub pending: Vec<u8>,
}

impl ConsoleView {
    /// Sends output (and takes typed input) until the client or the console is done (`None`)
    /// or `stop` is set (the view, to be carried or resumed). Stops only between two chunks.
    pub(super) async fn run(
        mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> io::Result<Option<ConsoleView>> {
        let mut input = vec![0u8; 4096];
        if !self.pending.is_empty() {
            self.w.write_all(&std::mem::take(&mut self.pending)).await?;
        }
        loop {
            // The guard `wait_for` returns must not live across the awaits below.
            let stopped = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                biased;
                () = stopped => return Ok(Some(self)),
                out = self.viewer.next_output() => match out {
                    Ok(Some(b)) => self.w.write_all(&b).await?,
                    Ok(None) => self.w.write_all(SKIPPED).await?,
                    Err(_) => return Ok(None),
                },
                n = self.r.read(&mut input), if self.attach => match n? {
                    0 => return Ok(None),
                    n => {
                        if self.viewer.is_writer() {
                            self.viewer.type_bytes(Bytes::copy_from_slice(&input[..n])).await?;
                        }
                    }
                },
            }
        }
    }
}

/// A stopped connection, waiting for the exec (or to go on if it fails).
pub(super) enum Parked {
    Pump(Pump),
    View(ConsoleView),
}

/// Bridges and viewers known to the handover: how many run, and the stopped ones.
#[derive(Default)]
pub(super) struct Bridges {
    pub(super) active: usize,
    pub(super) parked: Vec<(Parked, oneshot::Sender<Parked>)>,
}

/// Runs the connections devices hand back ([`vstream_devices::registry::ControlConn::bridge`],
/// [`view`](vstream_devices::registry::ControlConn::view)) through the handover, so that a
/// live upgrade carries them.
pub struct Carry(pub Arc<Handover>);

impl vstream_devices::registry::Carrier for Carry {
    fn bridge(&self, c: Client, chan: ChannelStream) -> CarryFuture {
        let (handover, pump) = (self.0.clone(), Pump::new(&c.guest, c.r, c.w, chan));
        Box::pin(async move { handover.bridge(pump).await })
    }

    fn view(&self, c: Client, view: ConsoleViewer) -> CarryFuture {
        let handover = self.0.clone();
        let view = ConsoleView {
            guest: c.guest,
            console: view.console,
            viewer: view.viewer,
            r: c.r,
            w: c.w,
            attach: view.attach,
            pending: Vec::new(),
        };
        Box::pin(async move { handover.view(view).await })
    }
}
