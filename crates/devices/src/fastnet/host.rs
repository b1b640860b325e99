//! The host's end of a fastnet link: sends the setup, learns the guest's mode, then moves
//! packets between the host TAP and the guest, through the segment's rings (doorbells on the
//! channel) or on the channel itself. A bad index, length or header in the segment ends this
//! link with a `Reset` naming the fault; the daemon and its other guests go on.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ring::{Consumer, Direction, Doorbell, Layout, Memory, Producer, RingError, Segment};
use super::{read_message, Decoder, GuestMsg, HostMsg, Message, Mode, Setup, MAX_PACKET};
use super::{ReadError, RecordError, READ_CHUNK};
use crate::tun::Tun;

/// Packets taken from the TAP per batch before the producer index is published.
const BATCH: usize = 64;

/// How a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The segment broke a rule (the guest was told with a `Reset`).
    #[error("{0}")]
    Ring(#[from] RingError),
    /// The channel carried something that is not a fastnet message.
    #[error("fastnet channel: {0}")]
    Codec(#[from] RecordError),
    /// The guest reset the link.
    #[error("the guest reset the link: {0}")]
    GuestReset(String),
    /// The host reset the link (the guest's end).
    #[error("the host reset the link: {0}")]
    HostReset(String),
    /// The channel or the TAP failed, or the channel ended.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Counters for `vstreamctl status` and the benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Packets to the guest.
    pub packets_out: u64,
    /// Packets from the guest.
    pub packets_in: u64,
    /// Doorbells sent to the guest.
    pub doorbells_out: u64,
    /// Doorbells received.
    pub doorbells_in: u64,
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, msg: &HostMsg) -> Result<(), LinkError> {
    let mut out = Vec::new();
    msg.encode(&mut out)?;
    stream.write_all(&out).await?;
    Ok(())
}

async fn next<S: AsyncRead + Unpin>(
    stream: &mut S,
    dec: &mut Decoder<GuestMsg>,
    buf: &mut [u8],
) -> Result<GuestMsg, LinkError> {
    match read_message(stream, dec, buf).await {
        Ok(Some(m)) => Ok(m),
        // The guest ends a link with a `Reset`, never by closing the channel.
        Ok(None) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
        Err(ReadError::Io(e)) => Err(e.into()),
        Err(ReadError::Record(e)) => Err(e.into()),
    }
}

/// Runs one link on `stream` (the guest's `fastnet` channel): `setup` first, then packets
/// between `tap` and the guest until an error. `segment` is the host's mapping of the segment
/// offered in `setup` (initialised here), if any.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    tap: &Tun,
    setup: Setup,
    segment: Option<Arc<Segment>>,
    stats: &mut Stats,
) -> Result<(), LinkError> {
    let layout = match &segment {
        Some(seg) => {
            let layout = Layout::for_segment(seg.size() as u64, MAX_PACKET)?;
            layout.initialize(seg)?;
            Some(layout)
        }
        None => None,
    };
    send(&mut stream, &HostMsg::Setup(setup)).await?;
    let mut dec = Decoder::<GuestMsg>::new();
    let mut rbuf = vec![0u8; READ_CHUNK];
    let ready = loop {
        match next(&mut stream, &mut dec, &mut rbuf).await? {
            GuestMsg::Ready(r) => break r,
            GuestMsg::Reset(why) => return Err(LinkError::GuestReset(why)),
            _ => {}
        }
    };
    match (ready.mode, segment, layout) {
        (Mode::SharedMemory, Some(seg), Some(layout)) => {
            let result = rings(&mut stream, tap, seg, layout, dec, &mut rbuf, stats).await;
            if let Err(LinkError::Ring(e)) = &result {
                // Best effort: the guest learns why before the channel goes.
                let _ = send(&mut stream, &HostMsg::Reset(e.to_string())).await;
            }
            result
        }
        (Mode::SharedMemory, ..) => Err(LinkError::GuestReset(
            "the guest chose shared memory, but the host offered no segment".into(),
        )),
        (Mode::Channel, ..) => channel(&mut stream, tap, dec, &mut rbuf, stats).await,
    }
}

async fn channel<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    tap: &Tun,
    dec: Decoder<GuestMsg>,
    rbuf: &mut [u8],
    stats: &mut Stats,
) -> Result<(), LinkError> {
    let from_guest = |m| match m {
        GuestMsg::Packet(p) => Ok(Some(p)),
        GuestMsg::Reset(why) => Err(LinkError::GuestReset(why)),
        GuestMsg::Ready(_) | GuestMsg::Doorbell => Ok(None),
    };
    pump(stream, tap, dec, rbuf, from_guest, HostMsg::Packet, stats).await
}

/// Channel-only mode at either end: packets from the peer (what `packet_of` finds in its
/// messages) go to `tap`, packets from `tap` go to the peer as `packet` messages, until an
/// error or the peer's reset.
pub(super) async fn pump<S, In, Out>(
    stream: &mut S,
    tap: &Tun,
    mut dec: Decoder<In>,
    rbuf: &mut [u8],
    packet_of: impl Fn(In) -> Result<Option<bytes::Bytes>, LinkError>,
    packet: impl Fn(bytes::Bytes) -> Out,
    stats: &mut Stats,
) -> Result<(), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    In: Message,
    Out: Message,
{
    let mut pkt = vec![0u8; MAX_PACKET as usize];
    let mut out = Vec::new();
    loop {
        while let Some(m) = dec.next_message()? {
            if let Some(p) = packet_of(m)? {
                stats.packets_in += 1;
                tap.send(&p)?;
            }
        }
        tokio::select! {
            n = stream.read(rbuf) => {
                let n = n?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                dec.push(&rbuf[..n])?;
            }
            n = tap.recv(&mut pkt) => {
                let n = n?;
                out.clear();
                packet(bytes::Bytes::copy_from_slice(&pkt[..n])).encode(&mut out)?;
                // More queued frames go in the same write.
                while let Some(n) = tap.try_recv(&mut pkt) {
                    packet(bytes::Bytes::copy_from_slice(&pkt[..n])).encode(&mut out)?;
                    stats.packets_out += 1;
                }
                stats.packets_out += 1;
                stream.write_all(&out).await?;
            }
        }
    }
}

async fn rings<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    tap: &Tun,
    seg: Arc<Segment>,
    layout: Layout,
    mut dec: Decoder<GuestMsg>,
    rbuf: &mut [u8],
    stats: &mut Stats,
) -> Result<(), LinkError> {
    let mut tx = Producer::new(seg.clone(), layout, Direction::HostToGuest);
    let mut rx = Consumer::new(seg, layout, Direction::GuestToHost);
    let mut pkt = vec![0u8; layout.max_packet as usize];
    let mut from_guest = vec![0u8; layout.max_packet as usize];
    // A packet read from the TAP (in `pkt`) that did not fit: the TAP is not read until it does.
    let mut held: Option<usize> = None;
    loop {
        // Take everything the guest published, then say we sleep (or go round again).
        loop {
            rx.refresh()?;
            while let Some(n) = rx.recv(&mut from_guest)? {
                stats.packets_in += 1;
                tap.send(&from_guest[..n])?;
            }
            if rx.release() == Doorbell::Ring {
                stats.doorbells_out += 1;
                send(stream, &HostMsg::Doorbell).await?;
            }
            if rx.prepare_sleep()? {
                break;
            }
        }
        // A held packet goes first, once the guest freed space.
        if let Some(n) = held {
            if tx.push(&pkt[..n])? {
                held = None;
                stats.packets_out += 1;
                if tx.publish() == Doorbell::Ring {
                    stats.doorbells_out += 1;
                    send(stream, &HostMsg::Doorbell).await?;
                }
            } else if !tx.prepare_wait()? {
                continue;
            }
        }
        while let Some(m) = dec.next_message()? {
            match m {
                GuestMsg::Doorbell => stats.doorbells_in += 1,
                GuestMsg::Reset(why) => return Err(LinkError::GuestReset(why)),
                GuestMsg::Ready(_) | GuestMsg::Packet(_) => {}
            }
        }
        tokio::select! {
            n = stream.read(rbuf) => {
                let n = n?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                dec.push(&rbuf[..n])?;
            }
            n = tap.recv(&mut pkt), if held.is_none() => {
                let mut n = n?;
                let mut batch = 0;
                loop {
                    if !tx.push(&pkt[..n])? {
                        held = Some(n);
                        let _ = tx.prepare_wait()?;
                        break;
                    }
                    stats.packets_out += 1;
                    batch += 1;
                    if batch == BATCH {
                        break;
                    }
                    match tap.try_recv(&mut pkt) {
                        Some(m) => n = m,
                        None => break,
                    }
                }
                if tx.publish() == Doorbell::Ring {
                    stats.doorbells_out += 1;
                    send(stream, &HostMsg::Doorbell).await?;
                }
            }
        }
    }
}
