//! Memory blocks and logical CPUs through sysfs, as qemu-ga does: `guest-get-memory-blocks`,
//! `guest-set-memory-blocks`, `guest-get-memory-block-info`, `guest-set-vcpus` (and the
//! numbered-entry listing `guest-get-vcpus` shares).

use super::*;

/// The entries `PREFIX<N>` of a sysfs directory, by number.
pub(super) fn numbered(dir: &Path, prefix: &str) -> io::Result<Vec<(i64, PathBuf)>> {
    let mut out = Vec::new();
    // Bounded: a guest has at most thousands of CPUs or memory blocks.
    for entry in std::fs::read_dir(dir)?.flatten().take(1 << 20) {
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.parse::<i64>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// A memory block's state; `Err` carries the errno of what failed.
fn read_block(index: i64, dir: &Path) -> io::Result<GuestMemoryBlock> {
    let state = read_text(&dir.join("state"), 64)?;
    // No `removable` file: the kernel cannot take the block offline.
    let can_offline = match read_text(&dir.join("removable"), 16) {
        Ok(r) => r.trim() != "0",
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    Ok(GuestMemoryBlock {
        phys_index: index,
        online: state.starts_with("online"),
        can_offline: Some(can_offline),
    })
}

impl GuestAgent {
    fn memory_dir(&self) -> PathBuf {
        self.settings.sysfs.join("devices/system/memory")
    }

    fn cpu_dir(&self) -> PathBuf {
        self.settings.sysfs.join("devices/system/cpu")
    }

    pub(super) fn memory_blocks(&self) -> Result<Vec<GuestMemoryBlock>, QgaError> {
        let dir = self.memory_dir();
        let cannot = |e: &io::Error| {
            QgaError::generic(format!(
                "Can't open directory \"{}/\": {}",
                dir.display(),
                errstr(e)
            ))
        };
        let mut blocks = Vec::new();
        for (index, path) in numbered(&dir, "memory").map_err(|e| cannot(&e))? {
            blocks.push(read_block(index, &path).map_err(|e| QgaError::io(path.display(), &e))?);
        }
        if blocks.is_empty() {
            return Err(QgaError::generic("guest reported zero memory blocks!"));
        }
        Ok(blocks)
    }

    pub(super) fn set_memory_blocks(
        &self,
        blocks: Vec<GuestMemoryBlock>,
    ) -> Vec<GuestMemoryBlockResponse> {
        blocks
            .into_iter()
            .map(|b| self.set_memory_block(&b))
            .collect()
    }

    fn set_memory_block(&self, want: &GuestMemoryBlock) -> GuestMemoryBlockResponse {
        let answer = |response, error: Option<&io::Error>| GuestMemoryBlockResponse {
            phys_index: want.phys_index,
            response,
            error_code: error.map(|e| e.raw_os_error().unwrap_or(libc::EIO).into()),
        };
        let dir = self.memory_dir().join(format!("memory{}", want.phys_index));
        let now = match read_block(want.phys_index, &dir) {
            Ok(now) => now,
            Err(e) if !dir.exists() => return answer(MemoryBlockResponse::NotFound, Some(&e)),
            Err(e) => return answer(MemoryBlockResponse::OperationFailed, Some(&e)),
        };
        if now.online == want.online {
            return answer(MemoryBlockResponse::Success, None);
        }
        if !want.online && now.can_offline != Some(true) {
            return answer(MemoryBlockResponse::OperationNotSupported, None);
        }
        let state = if want.online { "online" } else { "offline" };
        match std::fs::write(dir.join("state"), state) {
            Ok(()) => answer(MemoryBlockResponse::Success, None),
            Err(e) => answer(MemoryBlockResponse::OperationFailed, Some(&e)),
        }
    }

    pub(super) fn memory_block_info(&self) -> Result<GuestMemoryBlockInfo, QgaError> {
        let file = self.memory_dir().join("block_size_bytes");
        let text = read_text(&file, 64).map_err(|e| QgaError::io(file.display(), &e))?;
        let size = u64::from_str_radix(text.trim(), 16).map_err(|_| {
            QgaError::generic(format!(
                "{}: not a hexadecimal size: {}",
                file.display(),
                text.trim()
            ))
        })?;
        Ok(GuestMemoryBlockInfo { size })
    }

    pub(super) fn vcpus(&self) -> Result<Vec<GuestLogicalProcessor>, QgaError> {
        let dir = self.cpu_dir();
        let cpus = numbered(&dir, "cpu").map_err(|e| QgaError::io(dir.display(), &e))?;
        Ok(cpus
            .into_iter()
            .map(|(id, path)| {
                let (online, can_offline) = match read_text(&path.join("online"), 16) {
                    Ok(s) => (s.trim() == "1", true),
                    Err(_) => (true, false), // cpu0 often has no "online": it cannot go offline.
                };
                GuestLogicalProcessor {
                    logical_id: id,
                    online,
                    can_offline: Some(can_offline),
                }
            })
            .collect())
    }

    /// Sets CPUs on- or offline in order, stopping at the first failure, as qemu-ga does: the
    /// number done, or the first failure's error when none was done.
    pub(super) fn set_vcpus(&self, vcpus: &[GuestLogicalProcessor]) -> Result<i64, QgaError> {
        if vcpus.is_empty() {
            return Err(QgaError::invalid_value("vcpus", "a non-empty list"));
        }
        let mut done = 0;
        for cpu in vcpus {
            match self.set_vcpu(cpu) {
                Ok(()) => done += 1,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    fn set_vcpu(&self, want: &GuestLogicalProcessor) -> Result<(), QgaError> {
        let dir = self.cpu_dir().join(format!("cpu{}", want.logical_id));
        if !dir.is_dir() {
            return Err(QgaError::generic(format!(
                "logical processor #{} does not exist",
                want.logical_id
            )));
        }
        let file = dir.join("online");
        let online = match read_text(&file, 16) {
            Ok(s) => s.trim() == "1",
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if want.online {
                    return Ok(());
                }
                return Err(QgaError::generic(format!(
                    "logical processor #{} can't be offlined",
                    want.logical_id
                )));
            }
            Err(e) => return Err(QgaError::io(file.display(), &e)),
        };
        if online == want.online {
            return Ok(());
        }
        std::fs::write(&file, if want.online { "1" } else { "0" })
            .map_err(|e| QgaError::io(file.display(), &e))
    }

    /// `guest-set-user-password`: `chpasswd` (`-e` for a crypted one) with `USER:PASSWORD`, as
    /// qemu-ga runs it.
    pub(super) fn set_user_password(
        &self,
        username: &str,
        password_b64: &str,
        crypted: bool,
    ) -> Result<(), QgaError> {
        let raw = base64_decode(password_b64)
            .ok_or_else(|| QgaError::generic("Base64 data is not valid"))?;
        if raw.contains(&b'\n') {
            return Err(QgaError::generic("forbidden characters in raw password"));
        }
        if username.contains(['\n', ':']) {
            return Err(QgaError::generic("forbidden characters in user name"));
        }
        let mut cmd = std::process::Command::new("chpasswd");
        crate::spawn::undo_inherited(&mut cmd);
        if crypted {
            cmd.arg("-e");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                // qemu-ga's words (it looks for chpasswd too).
                io::ErrorKind::NotFound => {
                    QgaError::generic("cannot find 'passwd' program in PATH")
                }
                _ => QgaError::io("chpasswd", &e),
            })?;
        let mut line = Vec::with_capacity(username.len() + raw.len() + 2);
        line.extend_from_slice(username.as_bytes());
        line.push(b':');
        line.extend_from_slice(&raw);
        line.push(b'\n');
        let written = child.stdin.take().map(|mut s| s.write_all(&line));
        let status = child.wait().map_err(|e| QgaError::io("chpasswd", &e))?;
        match (written, status.success()) {
            (Some(Ok(())), true) => Ok(()),
            _ => Err(QgaError::generic(
                "child process has failed to set user password",
            )),
        }
    }
}
