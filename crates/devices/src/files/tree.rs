//! The two ends of a transfer on the file system, blocking (they run on a thread of their own,
//! see [`super::transfer`]): [`send_path`] lists a path as records, [`Sink`] builds the tree
//! those records describe. The same code serves both directions on both sides.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::BytesMut;

use super::{Entry, ErrorCode, Kind, Record, Time, MAX_DATA};

/// A transfer that failed: why, and what to tell the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The kind of failure (an exit status).
    pub code: ErrorCode,
    /// What failed, naming the path.
    pub message: String,
}

impl Failure {
    /// A failure of `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A local I/O error on `path`.
    pub fn io(path: &Path, e: &io::Error) -> Failure {
        Failure::new(ErrorCode::of(e), format!("{}: {e}", path.display()))
    }

    /// Records that break the protocol.
    pub fn corrupt(message: impl Into<String>) -> Failure {
        Failure::new(ErrorCode::Corrupt, message)
    }

    /// The record that reports it to the peer.
    pub fn record(&self) -> Record {
        Record::Error(self.code, self.message.clone())
    }
}

/// The temporary name of `path` while it is written: a hidden sibling, so that the rename
/// that completes it stays in one directory (and one file system).
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or(OsStr::new("file")));
    name.push(".vstream-partial");
    path.with_file_name(name)
}

/// Where a copy of something named `name` lands when sent to `dst`: into it if it is a
/// directory (as cp does), else at `dst` itself.
pub fn destination(dst: &Path, name: &OsStr) -> PathBuf {
    if dst.is_dir() {
        dst.join(name)
    } else {
        dst.to_owned()
    }
}

fn entry_of(kind: Kind, name: Vec<u8>, m: &std::fs::Metadata, target: Vec<u8>) -> Entry {
    Entry {
        kind,
        name,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: Time {
            secs: m.mtime(),
            nanos: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        },
        atime: Time {
            secs: m.atime(),
            nanos: m.atime_nsec().clamp(0, 999_999_999) as u32,
        },
        size: if kind == Kind::File { m.size() } else { 0 },
        target,
    }
}

/// A tree's files are made durable in batches of this many files or bytes (whichever comes
/// first): a batch holds its names and at most this much data not yet on disk.
const SETTLE_FILES: usize = 1024;
const SETTLE_BYTES: u64 = 64 << 20;

/// Zeros for the checksum of holes.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// `crc` extended by `n` zero bytes: in O(log² n) for a large hole, so that a sender's
/// claimed size of 2^60 costs nothing to check.
fn crc_zeros(crc: u32, n: u64) -> u32 {
    if n <= ZEROS.len() as u64 {
        return vstream_wire::crc::crc32c_append(crc, &ZEROS[..n as usize]);
    }
    // The CRC of n zeros, by doubling: crc(Z_{a+b}) = combine(crc(Z_a), crc(Z_b), b).
    let (mut zeros, mut power, mut len, mut rest) =
        (0u32, vstream_wire::crc::crc32c(&[0]), 1u64, n);
    while rest > 0 {
        if rest & 1 == 1 {
            zeros = crc32c::crc32c_combine(zeros, power, len as usize);
        }
        rest >>= 1;
        if rest > 0 {
            power = crc32c::crc32c_combine(power, power, len as usize);
            len *= 2;
        }
    }
    crc32c::crc32c_combine(crc, zeros, n as usize)
}

/// Where the data of `file` starts at or after `pos`, and where that data ends: `None` past
/// the last data. A file system without SEEK_DATA has one extent: all of it.
fn extent(file: &File, pos: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    if pos >= size {
        return Ok(None);
    }
    let start = match seek(file, SeekFrom::Data(pos)) {
        Ok(s) => s,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
            return Ok(Some((pos, size)))
        }
        Err(e) => return Err(e.into()),
    };
    let end = match seek(file, SeekFrom::Hole(start)) {
        Ok(e) => e,
        Err(rustix::io::Errno::NXIO) => size,
        Err(e) => return Err(e.into()),
    };
    Ok((start < size).then_some((start, end.min(size))))
}

/// Sends regular file `file` (already described by its `Entry`): its data from `offset` on,
/// holes skipped, then `FileEnd` with the checksum of all of it (the bytes before `offset`
/// are read for the checksum only).
fn send_file(
    file: &File,
    path: &Path,
    offset: u64,
    emit: &mut dyn FnMut(Record) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let io = |e: io::Error| Failure::io(path, &e);
    let size = file.metadata().map_err(io)?.len();
    let mut crc = 0u32;
    let mut pos = 0u64;
    let mut buf = BytesMut::new();
    'extents: while let Some((start, end)) = extent(file, pos, size).map_err(io)? {
        crc = crc_zeros(crc, start - pos);
        pos = start;
        while pos < end {
            let want = (end - pos).min(MAX_DATA as u64) as usize;
            buf.resize(want, 0);
            let n = file.read_at(&mut buf, pos).map_err(io)?;
            if n == 0 {
                // The file shrank while we read it: send what there was.
                break 'extents;
            }
            crc = vstream_wire::crc::crc32c_append(crc, &buf[..n]);
            let chunk = buf.split_to(n).freeze();
            if pos + n as u64 > offset {
                let skip = offset.saturating_sub(pos) as usize;
                emit(Record::Data {
                    offset: pos + skip as u64,
                    bytes: chunk.slice(skip..),
                })?;
            }
            pos += n as u64;
        }
    }
    // A trailing hole (or a file that shrank: then `size` is where we stopped).
    let size = if pos < size && extent(file, pos, size).map_err(io)?.is_some() {
        pos
    } else {
        size
    };
    crc = crc_zeros(crc, size - pos);
    emit(Record::FileEnd { size, crc })
}

/// Sends `root` (followed if it is a symlink, as cp does) and, if `recursive`, everything under
/// it (symlinks as symlinks), then `Done`. `offset` is where a single file's data starts (a
/// resumed copy). Fails with the first error: a missing or unreadable path, a directory without
/// `recursive`, or `emit`'s error (the channel is gone).
pub fn send_path(
    root: &Path,
    recursive: bool,
    offset: u64,
    emit: &mut dyn FnMut(Record) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let meta = std::fs::metadata(root).map_err(|e| Failure::io(root, &e))?;
    let mut entries = 0u64;
    if meta.is_dir() {
        if !recursive {
            return Err(Failure::new(
                ErrorCode::Other,
                format!("{}: is a directory (use -r)", root.display()),
            ));
        }
        // Listing one directory at a time, depth first: memory grows with the depth and the
        // largest directory, not with the tree.
        emit(Record::Entry(entry_of(
            Kind::Dir,
            Vec::new(),
            &meta,
            Vec::new(),
        )))?;
        entries += 1;
        let mut stack = vec![(Vec::new(), list(root)?)];
        while let Some((prefix, names)) = stack.last_mut() {
            let Some(name) = names.pop() else {
                stack.pop();
                continue;
            };
            let mut rel = prefix.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let path = root.join(OsStr::from_bytes(&rel));
            let m = std::fs::symlink_metadata(&path).map_err(|e| Failure::io(&path, &e))?;
            entries += 1;
            if m.is_dir() {
                emit(Record::Entry(entry_of(
                    Kind::Dir,
                    rel.clone(),
                    &m,
                    Vec::new(),
                )))?;
                let names = list(&path)?;
                stack.push((rel, names));
            } else if m.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| Failure::io(&path, &e))?;
                let target = target.into_os_string().into_vec();
                emit(Record::Entry(entry_of(Kind::Symlink, rel, &m, target)))?;
            } else if m.is_file() {
                let file = File::open(&path).map_err(|e| Failure::io(&path, &e))?;
                emit(Record::Entry(entry_of(Kind::File, rel, &m, Vec::new())))?;
                send_file(&file, &path, 0, emit)?;
            } else {
                // Devices, fifos and sockets are not files to copy (cp -r would hang on a fifo).
                entries -= 1;
                tracing::debug!(
                    "{}: not a file, directory or symlink: skipped",
                    path.display()
                );
            }
        }
    } else if meta.is_file() {
        let file = File::open(root).map_err(|e| Failure::io(root, &e))?;
        emit(Record::Entry(entry_of(
            Kind::File,
            Vec::new(),
            &meta,
            Vec::new(),
        )))?;
        send_file(&file, root, offset, emit)?;
        entries += 1;
    } else {
        return Err(Failure::new(
            ErrorCode::Other,
            format!("{}: not a regular file or directory", root.display()),
        ));
    }
    emit(Record::Done(entries))
}

/// The names in directory `dir`, sorted backwards (they are popped from the end).
fn list(dir: &Path) -> Result<Vec<OsString>, Failure> {
    let mut names = std::fs::read_dir(dir)
        .and_then(|d| {
            d.map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|e| Failure::io(dir, &e))?;
    names.sort_by(|a, b| b.cmp(a));
    Ok(names)
}

/// Sends what `r` reads (stdin) as one file named after nothing (its metadata is now's),
/// then `Done`.
pub fn send_reader(
    r: &mut dyn Read,
    emit: &mut dyn FnMut(Record) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = Time {
        secs: now.as_secs() as i64,
        nanos: now.subsec_nanos(),
    };
    emit(Record::Entry(Entry {
        kind: Kind::File,
        name: Vec::new(),
        mode: 0o644,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        mtime: now,
        atime: now,
        size: 0,
        target: Vec::new(),
    }))?;
    let stdin = Path::new("stdin");
    let mut crc = 0u32;
    let mut pos = 0u64;
    let mut buf = BytesMut::new();
    loop {
        buf.resize(MAX_DATA, 0);
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::io(stdin, &e)),
        };
        crc = vstream_wire::crc::crc32c_append(crc, &buf[..n]);
        emit(Record::Data {
            offset: pos,
            bytes: buf.split_to(n).freeze(),
        })?;
        pos += n as u64;
    }
    emit(Record::FileEnd { size: pos, crc })?;
    emit(Record::Done(1))
}

/// Where a [`Sink`] writes.
enum Target {
    /// A tree rooted at this path.
    Tree(PathBuf),
    /// One file's bytes, in order, holes as zeros (stdout).
    Stream(Box<dyn Write + Send>),
}

/// The file being received.
struct Open {
    entry: Entry,
    path: PathBuf,
    /// Where it is written: its partial name (`None` when streaming).
    file: Option<(File, PathBuf)>,
    /// Bytes up to here are written (or are holes).
    end: u64,
    crc: u32,
}

/// Builds, from the records of a tree, the tree at its destination: every file under a
/// temporary name, made durable and renamed when its checksum matched (a tree's files in
/// batches: one syncfs, then the renames).
///
/// The sender is not trusted: every name must be a path under the root made of normal
/// components ([`super::check_name`]); an entry goes only into a directory that this stream
/// created (or found as a real directory) earlier, and no name comes twice, so that no
/// symlink of the stream is ever followed and nothing lands outside the root. Data must come
/// in increasing offsets; memory is one record plus a set of the names seen.
pub struct Sink {
    target: Target,
    preserve: bool,
    /// A partial file of the root left by a cut copy, kept and continued.
    resume: u64,
    seen: HashSet<Vec<u8>>,
    dirs: HashSet<Vec<u8>>,
    /// Directories whose metadata is applied at the end (after their contents changed them),
    /// and whether this copy created them.
    dir_meta: Vec<(PathBuf, Entry, bool)>,
    open: Option<Open>,
    /// Files of a tree, complete and checked under their partial names, waiting to be made
    /// durable together and renamed ([`Sink::settle`]): (partial, final path).
    settling: Vec<(PathBuf, PathBuf)>,
    /// Their bytes.
    settling_bytes: u64,
    /// One open file on each file system this tree wrote to (its device, the file, the
    /// directory it was in, for messages): what `syncfs` needs.
    filesystems: Vec<(u64, File, PathBuf)>,
    entries: u64,
    root_file: bool,
    done: bool,
    /// Bytes received so far (progress).
    pub bytes: u64,
}

impl Sink {
    /// A sink writing the tree at `root` (the final path of the copied root). With `resume`, a
    /// partial file of a single-file copy to `root` is continued from its end
    /// ([`Sink::resume_offset`]) instead of started again.
    pub fn tree(root: PathBuf, preserve: bool, resume: bool) -> Sink {
        let resume = if resume {
            std::fs::symlink_metadata(partial_path(&root))
                .ok()
                .filter(|m| m.is_file())
                .map_or(0, |m| m.len())
        } else {
            0
        };
        Sink::new(Target::Tree(root), preserve, resume)
    }

    /// A sink writing a single file's bytes to `w` (stdout).
    pub fn stream(w: Box<dyn Write + Send>) -> Sink {
        Sink::new(Target::Stream(w), false, 0)
    }

    fn new(target: Target, preserve: bool, resume: u64) -> Sink {
        Sink {
            target,
            preserve,
            resume,
            seen: HashSet::new(),
            dirs: HashSet::new(),
            dir_meta: Vec::new(),
            open: None,
            settling: Vec::new(),
            settling_bytes: 0,
            filesystems: Vec::new(),
            entries: 0,
            root_file: false,
            done: false,
            bytes: 0,
        }
    }

    /// Where the sender should start the data of a single file: the end of the partial file
    /// a cut copy left (0 if none).
    pub fn resume_offset(&self) -> u64 {
        self.resume
    }

    /// Whether `Done` came and everything is in place.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Gives up: removes the partial file being written, unless it is the root's resumable
    /// one and the copy was `cut` (the next attempt continues it). Files already complete and
    /// checked are put in place (made durable first), or removed if that fails.
    pub fn abandon(&mut self, cut: bool) {
        if self.settle().is_err() {
            for (partial, _) in self.settling.drain(..) {
                let _ = std::fs::remove_file(partial);
            }
        }
        if let Some(open) = self.open.take() {
            if let Some((_, partial)) = open.file {
                if !(cut && open.entry.name.is_empty() && self.resume_allowed()) {
                    let _ = std::fs::remove_file(partial);
                }
            }
        }
    }

    fn resume_allowed(&self) -> bool {
        matches!(self.target, Target::Tree(_)) && self.root_file
    }

    /// Applies one record.
    pub fn apply(&mut self, record: Record) -> Result<(), Failure> {
        if self.done {
            return Err(Failure::corrupt("a record after Done"));
        }
        match record {
            Record::Entry(e) => self.entry(e),
            Record::Data { offset, bytes } => self.data(offset, &bytes),
            Record::FileEnd { size, crc } => self.file_end(size, crc),
            Record::Done(n) => self.finish(n),
            Record::Error(code, message) => Err(Failure::new(code, message)),
            other => Err(Failure::corrupt(format!(
                "unexpected {} inside a tree",
                record_name(&other)
            ))),
        }
    }

    fn path_of(&self, name: &[u8]) -> PathBuf {
        match &self.target {
            Target::Tree(root) if name.is_empty() => root.clone(),
            Target::Tree(root) => root.join(OsStr::from_bytes(name)),
            Target::Stream(_) => PathBuf::from("-"),
        }
    }

    fn entry(&mut self, e: Entry) -> Result<(), Failure> {
        if self.open.is_some() {
            return Err(Failure::corrupt("an entry inside a file's data"));
        }
        // The decoder checked the name's form; here, its place in the tree.
        super::check_name(&e.name).map_err(|err| Failure::corrupt(err.to_string()))?;
        if self.entries == 0 {
            if !e.name.is_empty() {
                return Err(Failure::corrupt("the first entry is not the root"));
            }
        } else {
            let parent = match e.name.iter().rposition(|&b| b == b'/') {
                Some(i) => &e.name[..i],
                None => &[][..],
            };
            if e.name.is_empty() || !self.dirs.contains(parent) {
                return Err(Failure::corrupt(format!(
                    "entry {:?} is not under a directory sent before it",
                    String::from_utf8_lossy(&e.name)
                )));
            }
            if !self.seen.insert(e.name.clone()) {
                return Err(Failure::corrupt(format!(
                    "entry {:?} sent twice",
                    String::from_utf8_lossy(&e.name)
                )));
            }
        }
        self.entries += 1;
        let path = self.path_of(&e.name);
        if let Target::Stream(_) = self.target {
            if e.kind != Kind::File || self.entries > 1 {
                return Err(Failure::new(
                    ErrorCode::Other,
                    "only a single regular file can be written to stdout",
                ));
            }
            self.open = Some(Open {
                entry: e,
                path,
                file: None,
                end: 0,
                crc: 0,
            });
            return Ok(());
        }
        let io = |e: io::Error| Failure::io(&path, &e);
        match e.kind {
            Kind::Dir => {
                // Writable by us until its contents are in; its own mode comes at the end.
                let created = match std::fs::DirBuilder::new()
                    .mode((e.mode & 0o777) | 0o700)
                    .create(&path)
                {
                    Ok(()) => true,
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                        // Into an existing directory, as cp -r does; never through a symlink.
                        let m = std::fs::symlink_metadata(&path).map_err(io)?;
                        if !m.is_dir() {
                            return Err(Failure::new(
                                ErrorCode::Other,
                                format!("{}: exists and is not a directory", path.display()),
                            ));
                        }
                        false
                    }
                    Err(err) => return Err(io(err)),
                };
                self.dirs.insert(e.name.clone());
                self.dir_meta.push((path, e, created));
                Ok(())
            }
            Kind::Symlink => {
                // Made under the partial name and renamed over the destination, like a file.
                let partial = partial_path(&path);
                let _ = std::fs::remove_file(&partial);
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), &partial).map_err(io)?;
                if self.preserve {
                    apply_link_meta(&partial, &e).map_err(io)?;
                }
                std::fs::rename(&partial, &path).map_err(io)?;
                Ok(())
            }
            Kind::File => {
                let partial = partial_path(&path);
                let root = e.name.is_empty();
                self.root_file = root;
                let resume = if root { self.resume } else { 0 };
                let file = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create(true)
                    .truncate(resume == 0)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(e.mode & 0o777)
                    .open(&partial)
                    .map_err(|err| Failure::io(&partial, &err))?;
                // What a cut copy left: kept up to `resume`, and counted in the checksum.
                let mut crc = 0;
                if resume > 0 {
                    file.set_len(resume)
                        .map_err(|err| Failure::io(&partial, &err))?;
                    crc = crc_of(&file, resume).map_err(|err| Failure::io(&partial, &err))?;
                }
                self.open = Some(Open {
                    entry: e,
                    path,
                    file: Some((file, partial)),
                    end: resume,
                    crc,
                });
                Ok(())
            }
        }
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Failure> {
        let Some(open) = self.open.as_mut() else {
            return Err(Failure::corrupt("data outside a file"));
        };
        let Some(stop) = offset.checked_add(bytes.len() as u64) else {
            return Err(Failure::corrupt("data beyond 2^64"));
        };
        if offset < open.end {
            return Err(Failure::corrupt(format!(
                "data at {offset} goes back before {} already written",
                open.end
            )));
        }
        let gap = offset - open.end;
        open.crc = vstream_wire::crc::crc32c_append(crc_zeros(open.crc, gap), bytes);
        match (&mut open.file, &mut self.target) {
            (Some((file, partial)), _) => file
                .write_all_at(bytes, offset)
                .map_err(|e| Failure::io(partial, &e))?,
            (None, Target::Stream(w)) => {
                write_zeros(w, gap).map_err(|e| Failure::io(Path::new("-"), &e))?;
                w.write_all(bytes)
                    .map_err(|e| Failure::io(Path::new("-"), &e))?;
            }
            (None, Target::Tree(_)) => unreachable!("a tree's files are always open"),
        }
        open.end = stop;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn file_end(&mut self, size: u64, crc: u32) -> Result<(), Failure> {
        let Some(mut open) = self.open.take() else {
            return Err(Failure::corrupt("a file end outside a file"));
        };
        if size < open.end {
            let err = Failure::corrupt(format!(
                "file size {size} below its data's end {}",
                open.end
            ));
            self.open = Some(open);
            return Err(err);
        }
        open.crc = crc_zeros(open.crc, size - open.end);
        let result = self.complete(&mut open, size, crc);
        if result.is_err() {
            self.open = Some(open);
        }
        result
    }

    fn complete(&mut self, open: &mut Open, size: u64, crc: u32) -> Result<(), Failure> {
        let name = open.path.display().to_string();
        let Some((file, partial)) = &open.file else {
            let Target::Stream(w) = &mut self.target else {
                unreachable!("a file without a partial is streamed")
            };
            let io = |e: io::Error| Failure::io(Path::new("-"), &e);
            write_zeros(w, size - open.end).map_err(io)?;
            w.flush().map_err(io)?;
            return check_crc(&name, open.crc, crc);
        };
        let io = |e: io::Error| Failure::io(partial, &e);
        file.set_len(size).map_err(io)?;
        check_crc(&name, open.crc, crc)?;
        if self.preserve {
            apply_file_meta(file, &open.entry).map_err(io)?;
        }
        if open.entry.name.is_empty() {
            // A single file (the resumable one): durable on its own, then in place.
            file.sync_all().map_err(io)?;
            std::fs::rename(partial, &open.path).map_err(|e| Failure::io(&open.path, &e))?;
            open.file = None;
            return Ok(());
        }
        // A file of a tree: an fsync each costs a journal commit each (most of a tree of small
        // files' time); one syncfs makes a batch durable, and only then are they renamed.
        let dev = file.metadata().map_err(io)?.dev();
        if let Some((file, partial)) = open.file.take() {
            if self.filesystems.iter().all(|(d, ..)| *d != dev) {
                let dir = open.path.parent().unwrap_or(Path::new(".")).to_owned();
                self.filesystems.push((dev, file, dir));
            }
            self.settling.push((partial, open.path.clone()));
        }
        self.settling_bytes += size;
        if self.settling.len() >= SETTLE_FILES || self.settling_bytes >= SETTLE_BYTES {
            self.settle()?;
        }
        Ok(())
    }

    /// Makes the settling files durable (one syncfs per file system), then renames each over
    /// its name: no file appears under its name before its data is on disk.
    fn settle(&mut self) -> Result<(), Failure> {
        if self.settling.is_empty() {
            return Ok(());
        }
        self.sync_filesystems()?;
        while let Some((partial, path)) = self.settling.pop() {
            if let Err(e) = std::fs::rename(&partial, &path) {
                let _ = std::fs::remove_file(&partial);
                return Err(Failure::io(&path, &e));
            }
        }
        self.settling_bytes = 0;
        Ok(())
    }

    fn sync_filesystems(&self) -> Result<(), Failure> {
        for (_, file, dir) in &self.filesystems {
            rustix::fs::syncfs(file).map_err(|e| {
                let e = io::Error::from(e);
                Failure::new(
                    ErrorCode::of(&e),
                    format!("{}: syncing its file system: {e}", dir.display()),
                )
            })?;
        }
        Ok(())
    }

    fn finish(&mut self, n: u64) -> Result<(), Failure> {
        if self.open.is_some() {
            return Err(Failure::corrupt("Done inside a file"));
        }
        if n != self.entries || n == 0 {
            return Err(Failure::corrupt(format!(
                "Done says {n} entries, {} came",
                self.entries
            )));
        }
        self.settle()?;
        // Deepest first: setting a directory's times before its contents change them is lost.
        for (path, e, created) in self.dir_meta.drain(..).rev() {
            let io = |err: io::Error| Failure::io(&path, &err);
            if self.preserve {
                let dir = File::open(&path).map_err(io)?;
                apply_file_meta(&dir, &e).map_err(io)?;
            } else if created && e.mode & 0o700 != 0o700 {
                // Take back the owner bits added at creation (the umask applied then).
                use std::os::unix::fs::PermissionsExt;
                let now = std::fs::symlink_metadata(&path).map_err(io)?.mode() & 0o7777;
                let mode = now & !(0o700 & !e.mode);
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(io)?;
            }
        }
        // The renames themselves are durable once the root's directory is synced, or for a
        // tree of files, with everything else by one more syncfs.
        if !self.filesystems.is_empty() {
            self.sync_filesystems()?;
        } else if let Target::Tree(root) = &self.target {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                if let Ok(d) = File::open(parent) {
                    let _ = d.sync_all();
                }
            }
        }
        self.done = true;
        Ok(())
    }
}

fn record_name(r: &Record) -> &'static str {
    match r {
        Record::Request(_) => "Request",
        Record::Ready(_) => "Ready",
        Record::Entry(_) => "Entry",
        Record::Data { .. } => "Data",
        Record::FileEnd { .. } => "FileEnd",
        Record::Done(_) => "Done",
        Record::Error(..) => "Error",
        Record::Ok => "Ok",
    }
}

fn check_crc(name: &str, got: u32, sent: u32) -> Result<(), Failure> {
    if got != sent {
        return Err(Failure::corrupt(format!(
            "{name}: checksum mismatch: received data has CRC-32C {got:08x}, the sender's is {sent:08x}"
        )));
    }
    Ok(())
}

fn write_zeros(w: &mut dyn Write, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// The CRC-32C of the first `len` bytes of `file`.
fn crc_of(file: &File, len: u64) -> io::Result<u32> {
    let mut crc = 0;
    let mut buf = vec![0; MAX_DATA];
    let mut pos = 0;
    while pos < len {
        let want = (len - pos).min(buf.len() as u64) as usize;
        let n = file.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        crc = vstream_wire::crc::crc32c_append(crc, &buf[..n]);
        pos += n as u64;
    }
    Ok(crc)
}

fn timestamps(e: &Entry) -> rustix::fs::Timestamps {
    let t = |t: Time| rustix::fs::Timespec {
        tv_sec: t.secs,
        tv_nsec: t.nanos.into(),
    };
    rustix::fs::Timestamps {
        last_access: t(e.atime),
        last_modification: t(e.mtime),
    }
}

/// Owner (where allowed: as cp -p, an unprivileged copy keeps its own), mode and times of `e`
/// on an open file or directory.
fn apply_file_meta(file: &File, e: &Entry) -> io::Result<()> {
    use rustix::fs::{fchmod, fchown, futimens, Gid, Mode, Uid};
    match fchown(file, Some(Uid::from_raw(e.uid)), Some(Gid::from_raw(e.gid))) {
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(err) => return Err(err.into()),
    }
    // After chown, which clears setuid and setgid.
    fchmod(file, Mode::from_raw_mode(e.mode))?;
    futimens(file, &timestamps(e))?;
    Ok(())
}

/// Owner and times of `e` on the symlink at `path` itself (a link has no mode of its own).
fn apply_link_meta(path: &Path, e: &Entry) -> io::Result<()> {
    use rustix::fs::{chownat, utimensat, AtFlags, Gid, Uid, CWD};
    let uid = Some(Uid::from_raw(e.uid));
    let gid = Some(Gid::from_raw(e.gid));
    match chownat(CWD, path, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(err) => return Err(err.into()),
    }
    utimensat(CWD, path, &timestamps(e), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}
