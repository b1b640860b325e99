//! A size-capped log file with rotation (`NAME.log`, `NAME.log.1` ... `NAME.log.KEEP`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Appends bytes to a file and rotates it when it would grow past `max_bytes`.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
    /// When the log was last written, if it was (by an earlier run: the file's mtime).
    last_write: Option<SystemTime>,
    /// Whether the last byte written ended a line (or nothing was written).
    at_line_start: bool,
}

impl RotatingLog {
    /// Opens (appending) or creates the log, making its directory if needed.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<RotatingLog> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let meta = file.metadata()?;
        let size = meta.len();
        let mut last = [b'\n'];
        if size > 0 {
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
        }
        Ok(RotatingLog {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1024),
            keep,
            file,
            size,
            last_write: (size > 0).then(|| meta.modified().ok()).flatten(),
            at_line_start: last[0] == b'\n',
        })
    }

    /// When the log was last written (by this run or, for a log that had content when it was
    /// opened, by an earlier one).
    pub fn last_write(&self) -> Option<SystemTime> {
        self.last_write
    }

    /// Writes `line` on a line of its own (a note of ours amid the guest's output).
    pub fn mark(&mut self, line: &str) -> io::Result<()> {
        let sep = if self.at_line_start { "" } else { "\n" };
        self.write(format!("{sep}{line}\n").as_bytes())
    }

    /// Appends `data`, rotating first if it would not fit.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        if let Some(last) = data.last() {
            self.at_line_start = *last == b'\n';
            self.last_write = Some(SystemTime::now());
        }
        Ok(())
    }

    fn rotated(&self, n: usize) -> PathBuf {
        rotated(&self.path, n)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file = File::create(&self.path)?;
        } else {
            let _ = fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let _ = fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            fs::rename(&self.path, self.rotated(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// The `n`th rotated file of the log at `path` (`NAME.log.N`).
pub(super) fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut p = path.to_owned().into_os_string();
    p.push(format!(".{n}"));
    p.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.log");
        let mut log = RotatingLog::open(&path, 1024, 2).expect("open");
        for i in 0..10u8 {
            log.write(&[b'a' + i; 600]).expect("write");
        }
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).ok();
        assert_eq!(size(&path), Some(600));
        assert_eq!(fs::read(&path).expect("read")[0], b'j');
        assert_eq!(fs::read(dir.path().join("c.log.1")).expect("read")[0], b'i');
        assert_eq!(fs::read(dir.path().join("c.log.2")).expect("read")[0], b'h');
        assert_eq!(size(&dir.path().join("c.log.3")), None);
    }
}
