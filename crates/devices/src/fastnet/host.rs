//! The host's end of a fastnet link: sends the setup, learns the guest's mode, then moves
//! packets between the host TAP and the guest, through the segment's rings (doorbells on the
//! channel) or on the channel itself. A bad index, length or header in the segment ends this
//! link with a `Reset` naming the fault; the daemon and its other guests go on.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::link::{next, pump, rings, send};
pub use super::link::{LinkError, Stats};
use super::port::Port;
use super::ring::{Layout, Memory, Segment};
use super::{Decoder, GuestMsg, HostMsg, Mode, Setup, MAX_PACKET, READ_CHUNK};

/// Runs one link on `stream` (the guest's `fastnet` channel): `setup` first, then packets
/// between `tap` (the host's TAP or a switch port) and the guest until an error. `segment` is the host's mapping of the segment
/// offered in `setup` (initialised here), if any; with `shm_only` a guest that answers with
/// the channel mode is refused. `stats` shows the guest's mode and the counters as it runs.
/// In shared-memory mode, `poll_for` after traffic the rings are polled instead of asking the
/// guest for doorbells (zero: never; `poll_us` of the configuration).
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    tap: &impl Port,
    setup: Setup,
    segment: Option<Arc<Segment>>,
    shm_only: bool,
    stats: &Stats,
    poll_for: Duration,
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
        match next(&mut stream, &mut dec).await? {
            GuestMsg::Ready(r) => break r,
            GuestMsg::Reset(why) => return Err(LinkError::GuestReset(why)),
            _ => {}
        }
    };
    stats.set_ready(&ready);
    match (ready.mode, segment, layout) {
        (Mode::SharedMemory, Some(seg), Some(layout)) => {
            rings(
                &mut stream,
                tap,
                (seg, layout),
                dec,
                &mut rbuf,
                stats,
                poll_for,
            )
            .await
        }
        (Mode::SharedMemory, ..) => Err(LinkError::GuestReset(
            "the guest chose shared memory, but the host offered no segment".into(),
        )),
        (Mode::Channel, ..) if shm_only => {
            let why = format!(
                "mode = \"shm\" and the guest cannot use the segment: {}",
                ready.reason.as_deref().unwrap_or("no reason given")
            );
            let _ = send(&mut stream, &HostMsg::Reset(why.clone())).await;
            Err(LinkError::HostReset(why))
        }
        (Mode::Channel, ..) => pump(&mut stream, tap, dec, stats).await,
    }
}
