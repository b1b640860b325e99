//! Files: open, read, write, seek, close.

use super::*;

// ---------------------------------------------------------------------------------------------
// Files.

/// An open handle. A file opened with mode `w` is written under a temporary name and renamed
/// over its path by `guest-file-close` (`commit`), so that a copy cut short (the host gone, the
/// channel reset) never looks complete under the final name.
pub(super) struct OpenFile {
    file: Arc<Mutex<File>>,
    commit: Option<Commit>,
}

/// Where a `w` handle's temporary file goes on `guest-file-close`.
pub(super) struct Commit {
    temp: PathBuf,
    path: PathBuf,
}

/// The temporary name of handle `handle`'s file for `path`: next to it (so the rename stays
/// within one file system), and saying what it is if a cut copy leaves it behind.
pub(super) fn partial_name(path: &Path, handle: i64) -> Option<PathBuf> {
    let mut name = path.file_name()?.to_owned();
    name.push(format!(".vstream-partial-{handle}"));
    Some(path.with_file_name(name))
}

/// Opens `path` for mode `w` as a temporary file to be renamed over it on close; `None` when
/// that cannot keep the meaning of writing to `path` (a symbolic link, a device, a FIFO, a file
/// with other hard links) or the directory refuses a new file: then the caller opens `path`
/// itself, as qemu-ga does.
pub(super) fn open_for_commit(
    path: &Path,
    handle: i64,
    opts: &OpenOptions,
) -> Option<(File, Commit)> {
    use std::os::unix::fs::MetadataExt;
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() && m.nlink() == 1 => Some(m),
        Ok(_) => return None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => return None,
    };
    let temp = partial_name(path, handle)?;
    // Created exclusively, so a name planted in a shared directory (a symbolic link to some
    // other file) is never followed; a leftover of an earlier agent is replaced.
    let mut excl = opts.clone();
    excl.create_new(true);
    let file = match excl.open(&temp) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&temp).ok()?;
            excl.open(&temp).ok()?
        }
        r => r.ok()?,
    };
    if let Some(m) = existing {
        // The replacement keeps the file's owner and permissions (best effort: only root
        // may give a file away).
        let _ = rustix::fs::fchown(
            &file,
            Some(rustix::fs::Uid::from_raw(m.uid())),
            Some(rustix::fs::Gid::from_raw(m.gid())),
        );
        let _ = file.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777));
    }
    let path = path.to_owned();
    Some((file, Commit { temp, path }))
}

/// open(2) options for an fopen(3) mode.
pub(super) fn open_options(mode: &str) -> Option<OpenOptions> {
    let mut o = OpenOptions::new();
    match mode {
        "r" | "rb" => o.read(true),
        "w" | "wb" => o.write(true).create(true).truncate(true),
        "a" | "ab" => o.append(true).create(true),
        "r+" | "rb+" | "r+b" => o.read(true).write(true),
        "w+" | "wb+" | "w+b" => o.read(true).write(true).create(true).truncate(true),
        "a+" | "ab+" | "a+b" => o.read(true).append(true).create(true),
        _ => return None,
    };
    // New files are private to their owner (qemu-ga 7.2 gives 0666 less the umask);
    // non-blocking, so a FIFO or a device cannot stall a command.
    o.mode(0o600).custom_flags(libc::O_NONBLOCK);
    Some(o)
}

impl GuestAgent {
    pub(super) fn file(&self, handle: i64) -> Result<Arc<Mutex<File>>, QgaError> {
        lock(&self.state)
            .files
            .get(&handle)
            .map(|f| f.file.clone())
            .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))
    }

    pub(super) fn file_open(&self, path: &str, mode: Option<&str>) -> Result<i64, QgaError> {
        let mode = mode.unwrap_or("r");
        let opts = open_options(mode)
            .ok_or_else(|| QgaError::generic(format!("invalid file open mode '{mode}'")))?;
        if lock(&self.state).files.len() >= MAX_OPEN_FILES {
            return Err(QgaError::generic(format!(
                "too many open files ({MAX_OPEN_FILES}); close some with guest-file-close"
            )));
        }
        // Taken before the open, for the temporary name; never reused, even if the open fails.
        let handle = {
            let mut st = lock(&self.state);
            st.next_handle += 1;
            st.next_handle - 1
        };
        let staged = matches!(mode, "w" | "wb")
            .then(|| open_for_commit(Path::new(path), handle, &opts))
            .flatten();
        let (file, commit) = match staged {
            Some((file, commit)) => (file, Some(commit)),
            None => {
                let file = opts.open(path).map_err(|e| {
                    QgaError::generic(format!(
                        "failed to open file '{path}' (mode: '{mode}'): {}",
                        errstr(&e)
                    ))
                })?;
                (file, None)
            }
        };
        let mut st = lock(&self.state);
        if st.files.len() >= MAX_OPEN_FILES {
            if let Some(c) = commit {
                let _ = std::fs::remove_file(c.temp);
            }
            return Err(QgaError::generic(format!(
                "too many open files ({MAX_OPEN_FILES}); close some with guest-file-close"
            )));
        }
        st.files.insert(
            handle,
            OpenFile {
                file: Arc::new(Mutex::new(file)),
                commit,
            },
        );
        tracing::debug!(handle, path, mode, "guest-file-open");
        Ok(handle)
    }

    pub(super) fn file_close(&self, handle: i64) -> Result<(), QgaError> {
        let open = lock(&self.state)
            .files
            .remove(&handle)
            .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))?;
        let Some(c) = open.commit else {
            return Ok(());
        };
        std::fs::rename(&c.temp, &c.path).map_err(|e| {
            let _ = std::fs::remove_file(&c.temp);
            QgaError::generic(format!(
                "failed to close file '{}': cannot rename {} to it: {}",
                c.path.display(),
                c.temp.display(),
                errstr(&e)
            ))
        })
    }

    /// Reads up to `count` bytes (QGA's default if `None`) of file `handle`, appending their
    /// base64 to `out`: returns how many bytes were read and whether the end of the file was
    /// reached. The bytes go through a small buffer straight into `out` (reserved once, for
    /// the whole count and the reply's closing members), so a large read costs one pass over
    /// the data and no copy of the encoded text.
    pub(super) fn read_encoded(
        &self,
        handle: i64,
        count: Option<i64>,
        out: &mut Vec<u8>,
    ) -> Result<(u64, bool), QgaError> {
        /// Bytes per read(2): a multiple of 3, so the pieces' base64 concatenate into that of
        /// the whole; small enough to stay in the CPU's cache between the read and the encoding.
        const PIECE: usize = 3 * 16 * 1024;
        /// Room kept after the base64 for what closes a reply (`","count":N,"eof":false}}`, an
        /// `id`'s end is written before), so finishing it never moves the text.
        const TAIL: usize = 64;
        let file = self.file(handle)?;
        let count = match count {
            None => DEFAULT_READ_COUNT,
            Some(n) if n < 0 => {
                return Err(QgaError::generic(format!(
                    "value '{n}' is invalid for argument count"
                )))
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(MAX_READ_COUNT),
        };
        // Pages of the reservation that a short read never reaches are never touched either.
        out.reserve(count.div_ceil(3) * 4 + TAIL);
        let mut piece = [0u8; PIECE];
        let mut got = 0;
        let mut eof = false;
        let mut f = lock(&file);
        while got < count {
            let want = (count - got).min(PIECE);
            let mut filled = 0;
            while filled < want {
                match f.read(&mut piece[filled..want]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(QgaError::io("failed to read file", &e)),
                }
            }
            base64_encode_into(&piece[..filled], out);
            got += filled;
            if filled < want {
                break;
            }
        }
        Ok((got as u64, eof))
    }

    pub(super) fn file_write(
        &self,
        handle: i64,
        b64: &str,
        count: Option<i64>,
    ) -> Result<GuestFileWrite, QgaError> {
        let file = self.file(handle)?;
        let data =
            base64_decode(b64).ok_or_else(|| QgaError::generic("Base64 data is not valid"))?;
        let count = match count {
            None => data.len(),
            Some(n) if n < 0 || n as u64 > data.len() as u64 => {
                return Err(QgaError::generic(format!(
                    "value '{n}' is invalid for argument count"
                )))
            }
            Some(n) => n as usize,
        };
        let mut f = lock(&file);
        let mut done = 0;
        while done < count {
            match f.write(&data[done..count]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(QgaError::io("failed to write to file", &e)),
            }
        }
        Ok(GuestFileWrite {
            count: done as u64,
            eof: false,
        })
    }

    pub(super) fn file_seek(
        &self,
        handle: i64,
        offset: i64,
        whence: Whence,
    ) -> Result<GuestFileSeek, QgaError> {
        let file = self.file(handle)?;
        let pos = match whence {
            Whence::Set => {
                let off = u64::try_from(offset)
                    .map_err(|_| QgaError::generic("failed to seek file: Invalid argument"))?;
                SeekFrom::Start(off)
            }
            Whence::Cur => SeekFrom::Current(offset),
            Whence::End => SeekFrom::End(offset),
        };
        let position = lock(&file)
            .seek(pos)
            .map_err(|e| QgaError::io("failed to seek file", &e))?;
        Ok(GuestFileSeek {
            position,
            eof: false,
        })
    }
}
