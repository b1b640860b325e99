//! `vstreamctl cp`: files, symlinks and trees to and from a guest over a `files` channel.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{FromArgMatches, Subcommand, ValueEnum};
use tokio::io::{AsyncRead, AsyncWrite};

use super::transfer::{self, write_record, Error};
use super::tree::{self, Failure, Sink};
use super::{flags, Decoder, ErrorCode, Op, Record, Request, CHANNEL_NAME, CLASS};
use crate::cli::{remote_path, Progress};
use crate::record::{read_message, ReadError};
use crate::registry::{registry, Unreachable, VerbContext};

/// The verb of the QGA file commands' copy (`cp --via qga` runs it).
const QGA_VERB: &str = "qga-cp";

/// How many times a broken channel is reopened and the copy resumed.
const RETRIES: u32 = 5;

/// `vstreamctl cp`'s exit status when the channel broke for good (the others are
/// [`ErrorCode::exit_status`]).
pub const EXIT_CUT: i32 = 5;

/// The way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// A `files` channel of vstream-agent: binary, streamed, resumable.
    Files,
    /// The QEMU guest agent's file commands (base64 in JSON; also to a real qemu-ga).
    Qga,
}

/// The files device's verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Copy a file, a symlink's target or (-r) a directory tree to or from a guest: `cp SRC
    /// GUEST:PATH` or `cp GUEST:PATH DST` (`-` is stdin or stdout; an existing directory as
    /// destination receives the source under its own name). Written atomically (temporary
    /// name, fsync, rename) and checked (CRC-32C); a broken channel is reopened and the copy
    /// resumed. Exit status: 2 no such file, 3 permission denied, 4 corrupt data, 5 channel
    /// lost, 1 anything else.
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
        /// Copy directories recursively (symlinks as symlinks, holes kept).
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Keep mode, owner (where allowed) and timestamps.
        #[arg(short = 'p', long)]
        preserve: bool,
        /// The way to the guest: a files channel, or the QGA file commands (to compare; or for
        /// a guest that has only qemu-ga).
        #[arg(long, value_enum, default_value_t = Via::Files)]
        via: Via,
        /// With --via qga: bytes per guest-file-read/write request.
        #[arg(long)]
        chunk: Option<usize>,
    },
}

/// Runs the verb.
pub async fn run(ctx: VerbContext<'_>) -> anyhow::Result<i32> {
    let Verb::Cp {
        src,
        dst,
        recursive,
        preserve,
        via,
        chunk,
    } = Verb::from_arg_matches(ctx.matches)?;
    if via == Via::Qga {
        if recursive || preserve {
            anyhow::bail!("cp --via qga copies single files only (no -r, no -p)");
        }
        return via_qga(&ctx, &src, &dst, chunk).await;
    }
    let copy = Copy {
        ctx: &ctx,
        recursive,
        preserve,
        progress: Progress::new(format!("{src} -> {dst}")),
        total: None,
    };
    let result = match (remote_path(&src), remote_path(&dst)) {
        (None, Some((guest, path))) => copy.put(&src, guest, path).await,
        (Some((guest, path)), None) => copy.get(guest, path, &dst).await,
        (Some(_), Some(_)) => {
            anyhow::bail!("cp: both {src} and {dst} are on guests; one must be local")
        }
        (None, None) => anyhow::bail!("cp: neither {src} nor {dst} is GUEST:PATH"),
    };
    let e = match result {
        Ok(()) => return Ok(0),
        Err(e) => e,
    };
    // vstreamd gone (at the start, or midway) is vstreamctl's usual error.
    let e = match e.downcast::<Error>() {
        Ok(e) => e,
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => return Err(e),
        Err(e) => return Err(lost(&ctx, e).await),
    };
    let (status, e) = match e {
        Error::Failed(f) => (f.code.exit_status(), anyhow::Error::new(f)),
        cut => (EXIT_CUT, lost(&ctx, anyhow::Error::new(cut)).await),
    };
    eprintln!("vstreamctl: cp {src} {dst}: {e:#}");
    Ok(status)
}

async fn lost(ctx: &VerbContext<'_>, e: anyhow::Error) -> anyhow::Error {
    match ctx.control.lost().await {
        Some(why) => e.context(why),
        None => e,
    }
}

/// Runs the QGA path's copy verb (another device's, found through the registry).
async fn via_qga(
    ctx: &VerbContext<'_>,
    src: &str,
    dst: &str,
    chunk: Option<usize>,
) -> anyhow::Result<i32> {
    let device = registry()
        .owner_of_verb(QGA_VERB)
        .ok_or_else(|| anyhow::anyhow!("no device copies through the QGA file commands"))?;
    let chunk = chunk.map(|c| c.to_string());
    let mut argv = vec!["vstreamctl", QGA_VERB, src, dst];
    if let Some(c) = &chunk {
        argv.extend(["--chunk", c]);
    }
    let matches = clap::Command::new("vstreamctl")
        .subcommands(device.verbs())
        .try_get_matches_from(argv)?;
    device
        .run_verb(VerbContext {
            matches: &matches,
            control: ctx.control,
        })
        .await
}

/// One `cp` over a files channel.
struct Copy<'a> {
    ctx: &'a VerbContext<'a>,
    recursive: bool,
    preserve: bool,
    progress: Progress,
    /// A single file's size, for the progress line.
    total: Option<u64>,
}

/// The last component of a guest path, the name a copy gets in a destination directory.
fn base_name(path: &str) -> anyhow::Result<&OsStr> {
    Path::new(path)
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{path:?} has no file name to copy"))
}

impl Copy<'_> {
    fn flags(&self, resumable: bool) -> u8 {
        let mut f = 0;
        if self.recursive {
            f |= flags::RECURSIVE;
        }
        if self.preserve {
            f |= flags::PRESERVE;
        }
        if resumable {
            f |= flags::RESUME;
        }
        f
    }

    async fn open(
        &self,
        guest: &str,
    ) -> anyhow::Result<(impl AsyncRead + Unpin, impl AsyncWrite + Unpin)> {
        let stream = self.ctx.open(guest, CLASS, CHANNEL_NAME).await?;
        Ok(tokio::io::split(stream))
    }

    /// A channel for the next attempt; if it cannot be opened after a cut (vstreamd is gone),
    /// the cut is the error.
    async fn reopen(
        &self,
        guest: &str,
        cut: &mut Option<Error>,
    ) -> anyhow::Result<(impl AsyncRead + Unpin, impl AsyncWrite + Unpin)> {
        match (self.open(guest).await, cut.take()) {
            (Ok(halves), _) => Ok(halves),
            (Err(_), Some(cut)) => Err(cut.into()),
            (Err(e), None) => Err(e),
        }
    }

    /// Guest to host, reopening a broken channel and resuming from what the partial file
    /// holds (a partial file that turns out not to be this file's start is started again).
    async fn get(mut self, guest: &str, path: &str, dst: &str) -> anyhow::Result<()> {
        let to_stdout = dst == "-";
        let root = tree::destination(Path::new(dst), base_name(path)?);
        let (mut attempt, mut cut) = (0, None);
        loop {
            let sink = if to_stdout {
                Sink::stream(Box::new(std::io::stdout()))
            } else {
                Sink::tree(root.clone(), self.preserve, !self.recursive)
            };
            let offset = sink.resume_offset();
            let (mut r, mut w) = self.reopen(guest, &mut cut).await?;
            let request = Record::Request(Request {
                op: Op::Get,
                flags: self.flags(false),
                offset,
                path: path.as_bytes().to_vec(),
                name: Vec::new(),
            });
            let (sink, result) = match write_record(&mut w, &request).await {
                Ok(()) => {
                    let progress = &mut self.progress;
                    let mut dec = Decoder::new();
                    let mut show = |n, total| progress.show(offset + n, Some(total), false);
                    transfer::receive(&mut r, &mut dec, sink, &mut show).await
                }
                Err(e) => (Some(sink), Err(e)),
            };
            let Some(mut sink) = sink else {
                return Err(result
                    .err()
                    .map_or_else(|| anyhow::anyhow!("lost"), Into::into));
            };
            let retry = match &result {
                Ok(()) => {
                    self.progress.show(sink.bytes + offset, None, true);
                    return Ok(());
                }
                Err(Error::Cut(_)) => !to_stdout,
                // The partial file was not the start of this one.
                Err(Error::Failed(f)) => f.code == ErrorCode::Corrupt && offset > 0,
            };
            let was_cut = matches!(result, Err(Error::Cut(_)));
            sink.abandon(was_cut && retry);
            match result {
                Err(e) if retry && attempt < RETRIES => {
                    attempt += 1;
                    eprintln!(
                        "vstreamctl: cp: {e}; again from the partial file ({attempt}/{RETRIES})"
                    );
                    tokio::time::sleep(Duration::from_millis(500 << attempt.min(4))).await;
                    cut = Some(e);
                }
                Err(e) => return Err(e.into()),
                Ok(()) => unreachable!("returned above"),
            }
        }
    }

    /// Host to guest, reopening a broken channel and resuming where the guest's partial file
    /// ends.
    async fn put(mut self, src: &str, guest: &str, path: &str) -> anyhow::Result<()> {
        let from_stdin = src == "-";
        let name = if from_stdin {
            Vec::new()
        } else {
            let meta = std::fs::metadata(src).map_err(|e| Failure::io(Path::new(src), &e));
            let meta = meta.map_err(Error::Failed)?;
            let name = base_name(src)?.as_bytes().to_vec();
            // Only a single file's size is known without walking the tree.
            if meta.is_file() {
                self.total = Some(meta.len());
            }
            name
        };
        let (mut attempt, mut cut) = (0, None);
        loop {
            let (mut r, mut w) = self.reopen(guest, &mut cut).await?;
            let resumable = !from_stdin && !self.recursive;
            let request = Record::Request(Request {
                op: Op::Put,
                flags: self.flags(resumable),
                offset: 0,
                path: path.as_bytes().to_vec(),
                name: name.clone(),
            });
            let result = self
                .put_once(&mut r, &mut w, request, src, from_stdin)
                .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e @ Error::Cut(_)) if !from_stdin && attempt < RETRIES => {
                    attempt += 1;
                    eprintln!("vstreamctl: cp: {e}; resuming ({attempt}/{RETRIES})");
                    tokio::time::sleep(Duration::from_millis(500 << attempt.min(4))).await;
                    cut = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn put_once<R, W>(
        &mut self,
        r: &mut R,
        w: &mut W,
        request: Record,
        src: &str,
        from_stdin: bool,
    ) -> Result<(), Error>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        write_record(w, &request).await?;
        let mut dec = Decoder::new();
        let offset = match answer(r, &mut dec).await? {
            Record::Ready(offset) => offset,
            other => return Err(unexpected(&other)),
        };
        let (recursive, src_path) = (self.recursive, PathBuf::from(src));
        let (total, progress) = (self.total, &mut self.progress);
        let mut show = |n: u64| progress.show(offset + n, total, false);
        let sending = transfer::send(
            w,
            move |emit| {
                if from_stdin {
                    tree::send_reader(&mut std::io::stdin(), emit)
                } else {
                    tree::send_path(&src_path, recursive, offset, emit)
                }
            },
            &mut show,
        );
        let answering = answer(r, &mut dec);
        tokio::pin!(answering);
        // The guest may refuse before the tree is sent (a directory it cannot write): its
        // answer stops the sending.
        tokio::select! {
            sent = sending => sent?,
            early = &mut answering => return match early? {
                Record::Error(code, message) => Err(Error::Failed(Failure::new(code, message))),
                other => Err(unexpected(&other)),
            },
        }
        match answering.await? {
            Record::Ok => {
                self.progress.show(total.unwrap_or(0), total, true);
                Ok(())
            }
            Record::Error(code, message) => Err(Error::Failed(Failure::new(code, message))),
            other => Err(unexpected(&other)),
        }
    }
}

/// The guest's next record; the channel's end is a cut.
async fn answer<R: AsyncRead + Unpin>(r: &mut R, dec: &mut Decoder) -> Result<Record, Error> {
    match read_message(r, dec).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(Error::Cut("the guest closed the channel".into())),
        Err(ReadError::Io(e)) => Err(Error::Cut(e.to_string())),
        Err(ReadError::Record(e)) => Err(Error::Failed(Failure::corrupt(e.to_string()))),
    }
}

fn unexpected(record: &Record) -> Error {
    Error::Failed(Failure::corrupt(format!(
        "the guest answered {record:?}, not what the protocol allows here"
    )))
}
