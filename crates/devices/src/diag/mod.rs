//! Device: diag. Both halves echo every byte back on channels of class `diag`, name `echo`: a
//! round-trip probe through the whole stack (transport, mux, agent), used by the lab, the
//! benchmarks and `vstreamctl open GUEST diag echo` when debugging a transport; the agent can
//! probe the host the same way.

pub mod device;

use tokio::io::AsyncWriteExt;
use vstream_link::ChannelStream;

use crate::{ServeFuture, Service};

/// The echo service (the same on both halves).
pub struct Echo;

impl Service for Echo {
    fn class(&self) -> &'static str {
        "diag"
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        Box::pin(async move {
            if name != "echo" {
                stream.reset(&format!("diag has no {name:?} (only \"echo\")"));
                return;
            }
            let (mut r, mut w) = tokio::io::split(stream);
            if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                tracing::debug!("diag echo ended: {e}");
            }
            let _ = w.shutdown().await;
        })
    }
}
