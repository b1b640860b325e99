//! The host half, run by vstreamd: one [`Spool`] per guest, and the [`PrinterService`] that
//! receives jobs into it.
//!
//! Every file operation goes through a descriptor of the spool directory (`openat`, `renameat`,
//! `unlinkat`) with names the host makes (`job-NNNNNN.EXT`), so nothing a guest sends can name a
//! path: metadata is only sanitised ([`super::sanitize`]) and shown. A job is written to
//! `.job-NNNNNN.tmp` (mode 0600, created exclusively), fsynced, and renamed (without replacing)
//! to `job-NNNNNN.EXT` once its `End` matched; the directory is fsynced after each rename. A job
//! that ends any other way is renamed to `job-NNNNNN.EXT.partial`; temporary files left by a
//! crash become partial jobs when the spool is opened again.
//!
//! Quota: everything in the spool directory counts (the jobs of this daemon and any other
//! file). A job that would make it exceed `quota_bytes` is refused: its channel is reset with the
//! reason, its temporary file removed; nothing else is touched.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vstream_link::ChannelStream;

pub use super::spool::{
    file_name, is_spool_name, EventSink, JobCounts, JobRecord, JobState, PrinterStatus, Spool,
    SpoolConfig,
};
use super::{sanitize, Decoder, JobType, Record, HEAD_LEN, READ_CHUNK, VERSION};
use crate::{ServeFuture, Service};

/// How long a guest may take to send the `Job` record after opening the channel.
pub const JOB_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The printer service of one guest (no spool: jobs are refused with the reason).
pub struct PrinterService {
    guest: String,
    spool: Option<Arc<Spool>>,
}

impl PrinterService {
    /// The service for `guest`, spooling into `spool` (or refusing jobs if `None`).
    pub fn new(guest: &str, spool: Option<Arc<Spool>>) -> PrinterService {
        PrinterService {
            guest: guest.to_owned(),
            spool,
        }
    }
}

impl Service for PrinterService {
    fn class(&self) -> &'static str {
        super::CLASS
    }

    fn serve(&self, name: String, stream: ChannelStream) -> ServeFuture {
        let Some(spool) = self.spool.clone() else {
            stream.reset(&format!(
                "guest {} has no printer spool on this host (configure [guest.printer] in vstreamd's config)",
                self.guest
            ));
            return Box::pin(async {});
        };
        if name != super::CHANNEL_NAME {
            stream.reset(&format!("printer has no {name:?} (only \"job\")"));
            return Box::pin(async {});
        }
        Box::pin(receive(spool, stream))
    }
}

/// How a job's channel ended.
enum Outcome {
    Done,
    Cut(String),
    Refused(String),
}

/// Why a job's bytes stopped coming.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The channel failed.
    #[error("channel: {0}")]
    Channel(#[from] std::io::Error),
    /// The guest sent what is no record.
    #[error(transparent)]
    Record(#[from] super::RecordError),
}

/// Reads more of the job into `dec`: `false` at the channel's end.
async fn read_more(
    stream: &mut ChannelStream,
    dec: &mut Decoder,
    buf: &mut [u8],
) -> Result<bool, ReadError> {
    match stream.read(buf).await? {
        0 => Ok(false),
        n => {
            dec.push(&buf[..n])?;
            Ok(true)
        }
    }
}

/// Receives one job from a channel into the spool.
pub async fn receive(spool: Arc<Spool>, mut stream: ChannelStream) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    // The Job record.
    let header = tokio::time::timeout(JOB_HEADER_TIMEOUT, async {
        loop {
            match dec.next_message() {
                Ok(Some(Record::Job(meta))) => return Ok(meta),
                Ok(Some(other)) => {
                    return Err(format!(
                        "the first record must be job, got {}",
                        record_name(&other)
                    ))
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match read_more(&mut stream, &mut dec, &mut buf).await {
                Ok(true) => {}
                Ok(false) => return Err("the channel ended before the job record".to_owned()),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let meta = match header {
        Ok(Ok(meta)) => meta,
        Ok(Err(e)) => {
            tracing::warn!(guest = %spool.guest, "printer: {e}");
            stream.reset(&format!("printer protocol error: {e}"));
            return;
        }
        Err(_) => {
            stream.reset("printer: no job record within 30 s");
            return;
        }
    };
    if let Some(v) = Record::meta(&meta, "version") {
        if v.parse::<u32>().ok() != Some(VERSION) {
            stream.reset(&format!("printer: unsupported version {}", sanitize(v)));
            return;
        }
    }
    let (id, file) = match spool.begin(&meta) {
        Ok(x) => x,
        Err((id, why)) => {
            tracing::warn!(guest = %spool.guest, job = id, "{why}");
            stream.reset(&why);
            let rec = spool.lock().jobs.get(&id).cloned();
            if let Some(rec) = rec {
                spool.report(&rec);
            }
            return;
        }
    };
    tracing::info!(guest = %spool.guest, job = id, "print job arriving");
    let mut file = tokio::fs::File::from_std(file);
    let mut head: Vec<u8> = Vec::with_capacity(HEAD_LEN);
    let mut received: u64 = 0;
    let outcome = loop {
        let rec = match dec.next_message() {
            Ok(Some(r)) => r,
            Ok(None) => match read_more(&mut stream, &mut dec, &mut buf).await {
                Ok(true) => continue,
                Ok(false) => {
                    break Outcome::Cut(format!(
                        "the channel ended after {received} bytes without an end record"
                    ))
                }
                Err(e) => break Outcome::Cut(e.to_string()),
            },
            Err(e) => break Outcome::Cut(format!("protocol error: {e}")),
        };
        match rec {
            Record::Data(d) => {
                if let Err(why) = spool.reserve(id, d.len() as u64) {
                    break Outcome::Refused(why.to_string());
                }
                if head.len() < HEAD_LEN {
                    let take = (HEAD_LEN - head.len()).min(d.len());
                    head.extend_from_slice(&d[..take]);
                }
                if let Err(e) = file.write_all(&d).await {
                    break Outcome::Cut(format!("writing the spool file: {e}"));
                }
                received += d.len() as u64;
            }
            Record::End(total) if total == received => {
                // Nothing may follow End but the end of the stream.
                break Outcome::Done;
            }
            Record::End(total) => {
                break Outcome::Cut(format!(
                    "protocol error: end record says {total} bytes, {received} arrived"
                ))
            }
            other => {
                break Outcome::Cut(format!(
                    "protocol error: unexpected {} record",
                    record_name(&other)
                ))
            }
        }
    };
    let synced = async {
        file.flush().await?;
        file.sync_all().await
    }
    .await;
    let outcome = match (outcome, synced) {
        (Outcome::Done, Err(e)) => Outcome::Cut(format!("fsync of the spool file failed: {e}")),
        (o, _) => o,
    };
    drop(file);
    match outcome {
        Outcome::Done => {
            let rec = spool.finish(id, JobState::Done, &head, None);
            tracing::info!(guest = %spool.guest, job = id, file = ?rec.file, size = rec.size, "print job done");
            spool.report(&rec);
            let done = Record::Done(vec![
                ("id".into(), id.to_string()),
                ("file".into(), rec.file.clone().unwrap_or_default()),
                (
                    "type".into(),
                    rec.job_type.unwrap_or(JobType::Unknown).name().into(),
                ),
                ("size".into(), rec.size.to_string()),
            ]);
            if let Ok(bytes) = done.to_bytes() {
                let _ = stream.write_all(&bytes).await;
            }
            let _ = stream.shutdown().await;
            if rec.state == JobState::Done {
                spool.run_hook(&rec);
            }
        }
        Outcome::Cut(why) => {
            stream.reset(&format!("printer: job {id} kept as partial: {why}"));
            let rec = spool.finish(id, JobState::Partial, &head, Some(why));
            tracing::warn!(guest = %spool.guest, job = id, file = ?rec.file, size = rec.size, reason = ?rec.reason, "print job cut: kept as partial");
            spool.report(&rec);
        }
        Outcome::Refused(why) => {
            stream.reset(&why);
            let rec = spool.finish(id, JobState::Refused, &head, Some(why));
            tracing::warn!(guest = %spool.guest, job = id, reason = ?rec.reason, "print job refused");
            spool.report(&rec);
        }
    }
}

fn record_name(r: &Record) -> &'static str {
    match r {
        Record::Job(_) => "job",
        Record::Data(_) => "data",
        Record::End(_) => "end",
        Record::Done(_) => "done",
    }
}
