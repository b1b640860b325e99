//! The guest half: serves `files` channels, one request each.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use vstream_link::ChannelStream;

use super::transfer::{self, write_record, Error};
use super::tree::{self, Sink};
use super::{flags, Decoder, Op, Record, CHANNEL_NAME, CLASS};
use crate::record::read_message;
use crate::{ServeFuture, Service};

/// The `files` service of vstream-agent.
pub struct FilesService;

impl Service for FilesService {
    fn class(&self) -> &'static str {
        CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        Box::pin(async move {
            if name != CHANNEL_NAME {
                stream.reset(&format!("files has no {name:?} (only {CHANNEL_NAME:?})"));
                return;
            }
            serve(stream).await;
        })
    }
}

async fn serve(stream: ChannelStream) {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut dec = Decoder::new();
    let request = match read_message(&mut r, &mut dec).await {
        Ok(Some(Record::Request(req))) => req,
        Ok(other) => {
            tracing::debug!("files: a channel that did not start with a request: {other:?}");
            return;
        }
        Err(e) => {
            tracing::debug!("files: bad request: {e}");
            return;
        }
    };
    let path = PathBuf::from(OsString::from_vec(request.path));
    let recursive = request.flags & flags::RECURSIVE != 0;
    let result = match request.op {
        Op::Get => {
            let offset = request.offset;
            let copy = path.clone();
            transfer::send(
                &mut w,
                move |emit| tree::send_path(&copy, recursive, offset, emit),
                |_| {},
            )
            .await
        }
        Op::Put => {
            let dest = tree::destination(&path, &OsString::from_vec(request.name));
            let resume = request.flags & flags::RESUME != 0 && !recursive;
            let sink = Sink::tree(dest, request.flags & flags::PRESERVE != 0, resume);
            put(&mut r, &mut w, &mut dec, sink).await
        }
    };
    match &result {
        Ok(()) => tracing::debug!("files: {:?} {} done", request.op, path.display()),
        Err(e) => tracing::debug!("files: {:?} {}: {e}", request.op, path.display()),
    }
    let _ = w.shutdown().await;
}

/// Receives a put into `sink`: `Ready`, the tree, then `Ok` or `Error`.
async fn put<R, W>(r: &mut R, w: &mut W, dec: &mut Decoder, sink: Sink) -> Result<(), Error>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let ready = Record::Ready(sink.resume_offset());
    write_record(w, &ready).await?;
    let (sink, result) = transfer::receive(r, dec, sink, |_, _| {}).await;
    let answer = match &result {
        Ok(()) => Record::Ok,
        Err(Error::Failed(f)) => f.record(),
        Err(Error::Cut(_)) => {
            // Kept for a resumed copy; nobody to answer.
            if let Some(mut sink) = sink {
                sink.abandon(true);
            }
            return result;
        }
    };
    if let (Some(mut sink), Err(_)) = (sink, &result) {
        sink.abandon(false);
    }
    write_record(w, &answer).await?;
    result
}
