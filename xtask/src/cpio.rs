//! A writer for the `newc` cpio format (the one the kernel unpacks as an initramfs), and a small tree of
//! entries to fill it from.
//!
//! Why write cpio ourselves instead of running `cpio -o -H newc` over a staging directory:
//! - the device node `/dev/console` needs `mknod`, i.e. root, in a staging directory; here it is a header;
//! - the archive is reproducible (fixed inode numbers, mtimes, owners, sorted order), so an unchanged image
//!   is byte-identical and the rebuild check stays simple;
//! - no staging directory to keep in sync (stale files from an older build cannot leak into the image);
//! - the format is 13 hex fields and a name: ~100 lines, less than driving `cpio` and `find` correctly.
//!
//! Compression is left to `gzip` (an essential Debian package) through a pipe, see `image.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The mtime written into every header (reproducible archives).
const MTIME: u32 = 0;

/// Where the bytes of a regular file come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Bytes held in memory (generated files).
    Bytes(Vec<u8>),
    /// A file on the host, read when the archive is written.
    Host(PathBuf),
}

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits.
        mode: u32,
        /// Its content.
        source: Source,
    },
    /// A symbolic link.
    Symlink {
        /// What it points to.
        target: String,
    },
    /// A character device node.
    CharDev {
        /// Permission bits.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// The file tree of an initramfs, keyed by absolute guest path.
///
/// Adding an entry creates its missing parent directories. Entries are written in path order, so a
/// directory always precedes its content.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an entry at `path` and creates its parent directories.
    pub fn insert(&mut self, path: &str, entry: Entry) {
        let path = normalize(path);
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len().saturating_sub(1)] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        if !path.is_empty() {
            self.entries.insert(path, entry);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Entry::Dir { mode });
    }

    /// Adds a file with generated content.
    pub fn bytes(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.insert(
            path,
            Entry::File {
                mode,
                source: Source::Bytes(data.into()),
            },
        );
    }

    /// Adds a copy of a host file.
    pub fn host_file(&mut self, path: &str, mode: u32, host: &Path) {
        self.insert(
            path,
            Entry::File {
                mode,
                source: Source::Host(host.to_path_buf()),
            },
        );
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.insert(path, Entry::CharDev { mode, major, minor });
    }

    /// True if the tree has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(&normalize(path))
    }

    /// All entries in archive order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Writes the tree as a `newc` archive (with its trailer) to `out`.
    pub fn write_newc<W: Write>(&self, out: W) -> io::Result<W> {
        let mut writer = NewcWriter::new(out);
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir { mode } => writer.entry(path, libc::S_IFDIR | mode, (0, 0), &[])?,
                Entry::Symlink { target } => {
                    writer.entry(path, libc::S_IFLNK | 0o777, (0, 0), target.as_bytes())?
                }
                Entry::CharDev { mode, major, minor } => {
                    writer.entry(path, libc::S_IFCHR | mode, (*major, *minor), &[])?
                }
                Entry::File { mode, source } => match source {
                    Source::Bytes(data) => {
                        writer.entry(path, libc::S_IFREG | mode, (0, 0), data)?
                    }
                    Source::Host(host) => {
                        let data = read_host(host)?;
                        writer.entry(path, libc::S_IFREG | mode, (0, 0), &data)?
                    }
                },
            }
        }
        writer.finish()
    }
}

fn read_host(path: &Path) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    Ok(data)
}

/// Streams `newc` records to a writer.
pub struct NewcWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> NewcWriter<W> {
    /// A writer that starts at offset 0 of `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self, align: u64) -> io::Result<()> {
        let rem = self.written % align;
        if rem != 0 {
            let zeros = vec![0u8; (align - rem) as usize];
            self.put(&zeros)?;
        }
        Ok(())
    }

    /// Writes one record. `path` has no leading `/`; `mode` includes the file type bits; `rdev` is the
    /// (major, minor) of a device node.
    pub fn entry(
        &mut self,
        path: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: {} bytes is too large for a cpio entry", data.len()),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & libc::S_IFMT == libc::S_IFDIR {
            2
        } else {
            1
        };
        self.header(path, ino, mode, nlink, size, rdev)?;
        self.put(data)?;
        self.pad(4)
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {devmajor:08x}{devminor:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = MTIME,
            devmajor = 0,
            devminor = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)
    }

    /// Writes the trailer record, pads the archive to a 512-byte block and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 1, 0, (0, 0))?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_are_created() {
        let mut tree = Tree::new();
        tree.bytes("/usr/bin/x", 0o755, b"hi".to_vec());
        tree.symlink("/bin/sh", "busybox");
        let paths: Vec<&str> = tree.iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["bin", "bin/sh", "usr", "usr/bin", "usr/bin/x"]);
    }

    #[test]
    fn newc_layout() {
        let mut tree = Tree::new();
        tree.bytes("/a", 0o644, b"xyz".to_vec());
        let out = tree.write_newc(Vec::new()).unwrap();
        assert_eq!(out.len() % 512, 0);
        assert!(out.starts_with(b"070701"));
        // header (110) + "a\0" (2) = 112, aligned; data 3 bytes padded to 4.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..115], b"xyz");
        assert_eq!(&out[116..122], b"070701");
        let trailer = String::from_utf8_lossy(&out[116 + 110..116 + 120]);
        assert_eq!(trailer, "TRAILER!!!");
        // Filesize field of the first header.
        assert_eq!(&out[54..62], b"00000003");
    }

    #[test]
    fn roundtrips_through_gnu_cpio_if_present() {
        if crate::paths::which("cpio").is_none() {
            return;
        }
        let mut tree = Tree::new();
        tree.bytes("/etc/hello", 0o644, b"hello\n".to_vec());
        tree.symlink("/bin/sh", "busybox");
        tree.char_dev("/dev/console", 0o600, 5, 1);
        let archive = tree.write_newc(Vec::new()).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("etc/hello"), "{listing}");
        assert!(listing.contains("bin/sh -> busybox"), "{listing}");
        assert!(listing.contains("dev/console"), "{listing}");
    }
}
