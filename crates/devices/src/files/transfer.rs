//! The async half of a transfer: records move between the channel and a blocking end of
//! [`super::tree`] running on a thread of its own, through a queue of a few records, so that the
//! file system and the channel work at the same time and memory stays bounded on both ends.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::tree::{Failure, Sink};
use super::{Decoder, ErrorCode, Message, Record};
use crate::record::{read_message, ReadError};

/// Batches of records in flight between the channel and the file system, per direction.
const DEPTH: usize = 8;

/// Small records (a tree of small files) are gathered into batches of up to this much before
/// they cross between the threads: a hand-off per record costs two thread wake-ups, which on a
/// guest's one vCPU cost more than a small file's own work.
const BATCH: usize = 64 * 1024;

/// Why a transfer stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It failed for good: a missing file, a refused write, a bad checksum, a peer's error.
    #[error("{0}")]
    Failed(#[from] Failure),
    /// The channel broke: another attempt may resume.
    #[error("the channel broke: {0}")]
    Cut(String),
}

impl Error {
    /// The code of the failure (a cut channel is `Other`).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Failed(f) => f.code,
            Error::Cut(_) => ErrorCode::Other,
        }
    }
}

/// A local failure of the file system end as the error of the transfer.
fn other(message: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::Other, message)
}

/// Runs `produce` (one of [`super::tree`]'s senders) on a blocking thread and writes the records
/// it emits to `w`, calling `progress` with the bytes written so far. If `produce` fails, the
/// peer gets its `Error` record before the error is returned.
pub async fn send<W, P>(
    w: &mut W,
    produce: P,
    mut progress: impl FnMut(u64) + Send,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
    P: FnOnce(&mut dyn FnMut(Record) -> Result<(), Failure>) -> Result<(), Failure>
        + Send
        + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(DEPTH);
    let thread = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(BATCH);
        let flush = |batch: &mut Vec<u8>| {
            tx.blocking_send(std::mem::replace(batch, Vec::with_capacity(BATCH)))
                .map_err(|_| other("the channel writer stopped"))
        };
        let mut emit = |r: Record| -> Result<(), Failure> {
            r.encode(&mut batch).map_err(|e| other(e.to_string()))?;
            if batch.len() < BATCH {
                return Ok(());
            }
            flush(&mut batch)
        };
        let mut result = produce(&mut emit);
        if let Err(f) = &result {
            let _ = emit(f.record());
        }
        if !batch.is_empty() {
            // The records produced so far; a failure to send them is the outcome if nothing
            // failed before.
            let sent = flush(&mut batch);
            result = result.and(sent);
        }
        result
    });
    let mut sent = 0u64;
    while let Some(frame) = rx.recv().await {
        w.write_all(&frame)
            .await
            .map_err(|e| Error::Cut(e.to_string()))?;
        sent += frame.len() as u64;
        progress(sent);
    }
    w.flush().await.map_err(|e| Error::Cut(e.to_string()))?;
    match thread.await {
        Ok(result) => result.map_err(Error::Failed),
        Err(e) => Err(Error::Failed(other(format!(
            "the sender thread failed: {e}"
        )))),
    }
}

/// Reads records from `r` (through `dec`, which may hold bytes already read) into `sink` on a
/// blocking thread until the sink has the whole tree, calling `progress` with the data bytes
/// received so far and the sizes of the files announced so far. Returns the sink (to abandon its partial file on an error; `None` if its
/// thread died) and the outcome.
pub async fn receive<R>(
    r: &mut R,
    dec: &mut Decoder,
    mut sink: Sink,
    mut progress: impl FnMut(u64, u64) + Send,
) -> (Option<Sink>, Result<(), Error>)
where
    R: AsyncRead + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Vec<Record>>(DEPTH);
    let mut thread = tokio::task::spawn_blocking(move || {
        // Ok(false): the records stopped before the tree was complete.
        let result = (|| {
            while !sink.is_done() {
                let Some(batch) = rx.blocking_recv() else {
                    return Ok(false);
                };
                for record in batch {
                    sink.apply(record)?;
                }
            }
            Ok(true)
        })();
        (sink, result)
    });
    let reading = async move {
        let tx = tx;
        let (mut received, mut announced) = (0u64, 0u64);
        let corrupt = |e: &dyn std::fmt::Display| Error::Failed(Failure::corrupt(e.to_string()));
        loop {
            let first = match read_message(r, dec).await {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(()),
                Err(ReadError::Io(e)) => return Err(Error::Cut(e.to_string())),
                Err(ReadError::Record(e)) => return Err(corrupt(&e)),
            };
            // With it, every record complete in what was read already (at most one read
            // and one record: the decoder's limit): one hand-off for them all.
            let (mut batch, mut size) = (Vec::new(), 0);
            let mut next = Some(first);
            while let Some(record) = next {
                match &record {
                    Record::Data { bytes, .. } => {
                        received += bytes.len() as u64;
                        size += bytes.len();
                    }
                    Record::Entry(e) => announced = announced.saturating_add(e.size),
                    _ => {}
                }
                batch.push(record);
                next = if size < BATCH {
                    dec.next_message().map_err(|e| corrupt(&e))?
                } else {
                    None
                };
            }
            progress(received, announced);
            if tx.send(batch).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::pin!(reading);
    // The thread may finish first (the tree is complete while the peer keeps the channel
    // open for its answer): then the reading stops there.
    let read = tokio::select! {
        read = &mut reading => Some(read),
        joined = &mut thread => return outcome(joined, None),
    };
    outcome(thread.await, read)
}

type Joined = Result<(Sink, Result<bool, Failure>), tokio::task::JoinError>;

fn outcome(joined: Joined, read: Option<Result<(), Error>>) -> (Option<Sink>, Result<(), Error>) {
    let (sink, result) = match joined {
        Ok(j) => j,
        Err(e) => {
            let f = other(format!("the receiving thread failed: {e}"));
            return (None, Err(Error::Failed(f)));
        }
    };
    let result = match result {
        Ok(true) => Ok(()),
        Err(f) => Err(Error::Failed(f)),
        Ok(false) => match read {
            Some(Err(e)) => Err(e),
            _ => Err(Error::Cut(
                "the channel ended before the transfer was complete".into(),
            )),
        },
    };
    (Some(sink), result)
}

/// Writes one record and flushes it.
pub async fn write_record<W>(w: &mut W, record: &Record) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    let frame = record
        .to_bytes()
        .map_err(|e| Error::Failed(Failure::corrupt(e.to_string())))?;
    let cut = |e: std::io::Error| Error::Cut(e.to_string());
    w.write_all(&frame).await.map_err(cut)?;
    w.flush().await.map_err(cut)
}
