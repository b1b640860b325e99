//! File systems: information, freezing.

use rustix::ioctl::{ioctl, opcode, Opcode, Updater};

use super::*;

// ---------------------------------------------------------------------------------------------
// File systems.

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mountpoint: String,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
pub(super) fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 3 {
            continue;
        }
        let Some((maj, min)) = fields[2].split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else {
            continue;
        };
        out.push(Mount {
            major,
            minor,
            mountpoint: unescape_mount(fields[4]),
            fs_type: unescape_mount(fields[sep + 1]),
            source: unescape_mount(fields[sep + 2]),
        });
    }
    out
}

pub(super) const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "ceph",
    "glusterfs",
    "9p",
    "afs",
    "ncpfs",
    "fuse.sshfs",
    "virtiofs",
];

/// File systems on a block device (not virtual, not network): what fsinfo lists and freeze
/// freezes, as in qemu-ga.
pub(crate) fn is_disk_mount(m: &Mount) -> bool {
    (m.major != 0 || m.source.starts_with("/dev/")) && !NETWORK_FS.contains(&m.fs_type.as_str())
}

/// A PCI address `DDDD:BB:SS.F` in a sysfs path component.
pub(super) fn parse_pci(s: &str) -> Option<GuestPciAddress> {
    let (dom, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    if dom.len() != 4 || bus.len() != 2 || slot.len() != 2 || func.len() != 1 {
        return None;
    }
    Some(GuestPciAddress {
        domain: i64::from_str_radix(dom, 16).ok()?,
        bus: i64::from_str_radix(bus, 16).ok()?,
        slot: i64::from_str_radix(slot, 16).ok()?,
        function: i64::from_str_radix(func, 16).ok()?,
    })
}

/// The disk address of a whole-disk sysfs device path such as
/// `/sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda`.
pub(crate) fn disk_address(sys_path: &str, dev_name: &str) -> Option<GuestDiskAddress> {
    let parts: Vec<&str> = sys_path.split('/').collect();
    let pci = parts.iter().rev().find_map(|p| parse_pci(p))?;
    let scsi = parts.iter().rev().find_map(|p| {
        let n: Vec<i64> = p.split(':').map_while(|x| x.parse().ok()).collect();
        (n.len() == 4 && p.split(':').count() == 4).then(|| (n[1], n[2], n[3]))
    });
    let has = |needle: &str| parts.iter().any(|p| p.starts_with(needle));
    let bus_type = if has("usb") {
        "usb"
    } else if has("ata") {
        "sata"
    } else if scsi.is_some() {
        "scsi"
    } else if has("virtio") {
        "virtio"
    } else if has("ide") {
        "ide"
    } else {
        "unknown"
    };
    let (bus, target, unit) = scsi.unwrap_or((0, 0, 0));
    Some(GuestDiskAddress {
        pci_controller: pci,
        bus_type: bus_type.into(),
        bus,
        target,
        unit,
        serial: None,
        dev: Some(format!("/dev/{dev_name}")),
    })
}

/// The disks under a block device (following device-mapper and md slaves), at most 16.
pub(super) fn disks_of(sys: &Path, depth: u32, out: &mut Vec<GuestDiskAddress>) {
    if depth > 4 || out.len() >= 16 {
        return;
    }
    // A partition's disk is its parent directory.
    let disk = if sys.join("partition").exists() {
        sys.parent().unwrap_or(sys).to_path_buf()
    } else {
        sys.to_path_buf()
    };
    if let Ok(slaves) = std::fs::read_dir(disk.join("slaves")) {
        let slaves: Vec<PathBuf> = slaves
            .flatten()
            .filter_map(|e| std::fs::canonicalize(e.path()).ok())
            .take(16)
            .collect();
        if !slaves.is_empty() {
            for s in slaves {
                disks_of(&s, depth + 1, out);
            }
            return;
        }
    }
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(mut addr) = disk_address(&disk.to_string_lossy(), &name) {
        addr.serial = ["serial", "device/serial"]
            .iter()
            .find_map(|f| read_text(&disk.join(f), 256).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        out.push(addr);
    }
}

pub(super) fn statvfs(path: &str) -> Option<rustix::fs::StatVfs> {
    rustix::fs::statvfs(path).ok()
}

impl GuestAgent {
    pub(super) fn mounts(&self) -> Result<Vec<Mount>, QgaError> {
        let text = read_text(&self.settings.mountinfo, 16 * 1024 * 1024)
            .map_err(|e| QgaError::io(self.settings.mountinfo.display(), &e))?;
        Ok(parse_mountinfo(&text)
            .into_iter()
            .filter(is_disk_mount)
            .collect())
    }

    pub(super) fn fsinfo(&self) -> Result<Vec<GuestFilesystemInfo>, QgaError> {
        let mut out = Vec::new();
        for m in self.mounts()? {
            let sys = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", m.major, m.minor)).ok();
            let name = sys
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{}:{}", m.major, m.minor));
            let mut disk = Vec::new();
            if let Some(sys) = &sys {
                disks_of(sys, 0, &mut disk);
            }
            let (used, total, total_priv) = match statvfs(&m.mountpoint) {
                Some(st) => {
                    let frsize = st.f_frsize;
                    let used = st.f_blocks.saturating_sub(st.f_bfree);
                    (
                        Some(used.saturating_mul(frsize)),
                        Some(used.saturating_add(st.f_bavail).saturating_mul(frsize)),
                        Some(st.f_blocks.saturating_mul(frsize)),
                    )
                }
                None => (None, None, None),
            };
            out.push(GuestFilesystemInfo {
                name,
                mountpoint: m.mountpoint,
                fs_type: m.fs_type,
                used_bytes: used,
                total_bytes: total,
                total_bytes_privileged: total_priv,
                disk,
            });
        }
        Ok(out)
    }

    /// FIFREEZE on the disk file systems (all, or those in `only`), deepest mounts first.
    /// On an error, thaws what it froze and reports the error.
    pub(super) fn freeze(&self, only: Option<Vec<String>>) -> Result<i64, QgaError> {
        let _busy = lock(&self.freezing);
        if self.is_frozen() {
            return Err(QgaError::generic(
                "The command guest-fsfreeze-freeze has been disabled: file systems are already frozen",
            ));
        }
        self.fsfreeze_hook("freeze")?;
        let mounts = self.mounts()?;
        let mut frozen: Vec<String> = Vec::new();
        for m in mounts.iter().rev() {
            if let Some(only) = &only {
                if !only.iter().any(|p| p == &m.mountpoint) {
                    continue;
                }
            }
            if frozen.contains(&m.mountpoint) {
                continue;
            }
            match fs_ioctl::<FIFREEZE>(&m.mountpoint) {
                Ok(()) => frozen.push(m.mountpoint.clone()),
                // Not freezable, or frozen by someone else already: qemu-ga skips both.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EBUSY)) => {}
                Err(e) => {
                    for p in &frozen {
                        let _ = fs_ioctl::<FITHAW>(p);
                    }
                    return Err(QgaError::generic(format!(
                        "failed to freeze {}: {}",
                        m.mountpoint,
                        errstr(&e)
                    )));
                }
            }
        }
        if !frozen.is_empty() {
            lock(&self.state).frozen = true;
            tracing::info!(count = frozen.len(), "file systems frozen: {frozen:?}");
        }
        Ok(frozen.len() as i64)
    }

    /// FITRIM on every disk file system, each one's outcome reported as qemu-ga does.
    pub(super) fn fstrim(
        &self,
        minimum: Option<i64>,
    ) -> Result<GuestFilesystemTrimResponse, QgaError> {
        let minimum = u64::try_from(minimum.unwrap_or(0))
            .map_err(|_| QgaError::invalid_value("minimum", "a non-negative size"))?;
        let mut paths = Vec::new();
        for m in self.mounts()? {
            let mut r = GuestFilesystemTrimResult {
                path: m.mountpoint.clone(),
                trimmed: None,
                minimum: None,
                error: None,
            };
            match fitrim(&m.mountpoint, minimum) {
                Ok(trimmed) => {
                    r.trimmed = Some(trimmed);
                    r.minimum = Some(minimum);
                }
                // Not supported by this file system: no error, nothing trimmed (qemu-ga).
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)
                    ) => {}
                Err(e) => r.error = Some(format!("failed to trim: {}", errstr(&e))),
            }
            paths.push(r);
        }
        Ok(GuestFilesystemTrimResponse { paths })
    }

    /// The block devices (`/sys/block`) with their partitions, as `guest-get-disks` lists them.
    pub(super) fn disks(&self) -> Result<Vec<GuestDiskInfo>, QgaError> {
        let block = self.settings.sysfs.join("block");
        let mut names: Vec<String> = match std::fs::read_dir(&block) {
            Ok(d) => d
                .flatten()
                .take(4096)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) => return Err(QgaError::io(block.display(), &e)),
        };
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let sys = std::fs::canonicalize(block.join(&name)).unwrap_or(block.join(&name));
            let dependencies: Vec<String> = match std::fs::read_dir(sys.join("slaves")) {
                Ok(d) => d
                    .flatten()
                    .take(64)
                    .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let alias = read_text(&sys.join("dm/name"), 256)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            let mut address = Vec::new();
            disks_of(&sys, 0, &mut address);
            let dev = format!("/dev/{name}");
            out.push(GuestDiskInfo {
                name: dev.clone(),
                partition: false,
                dependencies: Some(dependencies),
                address: address.into_iter().next(),
                alias,
            });
            let mut parts: Vec<String> = std::fs::read_dir(&sys)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join("partition").exists())
                .take(256)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            parts.sort();
            out.extend(parts.into_iter().map(|p| GuestDiskInfo {
                name: format!("/dev/{p}"),
                partition: true,
                dependencies: Some(vec![dev.clone()]),
                address: None,
                alias: None,
            }));
        }
        Ok(out)
    }

    /// FITHAW on every disk file system (frozen by us or not, as qemu-ga: a restarted agent
    /// can still thaw); returns how many were thawed.
    pub(super) fn thaw(&self) -> Result<i64, QgaError> {
        let _busy = lock(&self.freezing);
        let mut count = 0;
        for m in self.mounts()? {
            if fs_ioctl::<FITHAW>(&m.mountpoint).is_ok() {
                count += 1;
            }
        }
        lock(&self.state).frozen = false;
        self.fsfreeze_hook("thaw")?;
        Ok(count)
    }

    /// Runs qemu-ga's fsfreeze hook (`-F`), if one is set, with `freeze` or `thaw`.
    fn fsfreeze_hook(&self, arg: &str) -> Result<(), QgaError> {
        let Some(hook) = &self.settings.fsfreeze_hook else {
            return Ok(());
        };
        let status = run_quietly(hook, &[arg]).map_err(|_| {
            QgaError::generic(format!("can't access fsfreeze hook '{}'", hook.display()))
        })?;
        if status.success() {
            return Ok(());
        }
        Err(QgaError::generic(format!(
            "fsfreeze hook has failed with status {}",
            status.code().unwrap_or(-1)
        )))
    }
}

/// Freezes a file system (linux/fs.h `_IOWR('X', 119, int)`).
pub(super) const FIFREEZE: Opcode = opcode::read_write::<libc::c_int>(b'X', 119);
/// Thaws it (`_IOWR('X', 120, int)`).
pub(super) const FITHAW: Opcode = opcode::read_write::<libc::c_int>(b'X', 120);

/// Discards unused blocks (`_IOWR('X', 121, struct fstrim_range)`).
const FITRIM: Opcode = opcode::read_write::<FstrimRange>(b'X', 121);

/// linux/fs.h `struct fstrim_range`.
#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

fn open_mountpoint(mountpoint: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mountpoint)
}

/// FITRIM on the whole file system: the bytes trimmed.
fn fitrim(mountpoint: &str, minimum: u64) -> io::Result<u64> {
    let dir = open_mountpoint(mountpoint)?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: minimum,
    };
    // SAFETY: FITRIM takes a pointer to a struct fstrim_range, which FstrimRange lays out
    // (repr(C), three u64); the fd is an open directory.
    unsafe { ioctl(&dir, Updater::<FITRIM, FstrimRange>::new(&mut range)) }?;
    Ok(range.len)
}

pub(super) fn fs_ioctl<const REQUEST: Opcode>(mountpoint: &str) -> io::Result<()> {
    let dir = open_mountpoint(mountpoint)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW (the only REQUESTs) take a pointer to an int; the fd is an
    // open directory.
    unsafe { ioctl(&dir, Updater::<REQUEST, libc::c_int>::new(&mut arg)) }?;
    Ok(())
}
