//! SSH authorized keys.

use super::*;

// ---------------------------------------------------------------------------------------------
// SSH authorized keys.

/// A user's entry in the passwd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Passwd {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Finds `user` in passwd(5) text.
pub(crate) fn parse_passwd(text: &str, user: &str) -> Option<Passwd> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && f[0] == user).then_some(())?;
        Some(Passwd {
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(f[5]),
        })
    })
}

pub(super) fn check_key(key: &str) -> Result<(), QgaError> {
    let k = key.trim();
    // virsh set-user-sshkeys sends an empty key after its file's last newline; qemu-ga takes it
    // (and we add nothing for it).
    if k.is_empty() && !key.contains(['\n', '\r', '\0']) {
        return Ok(());
    }
    if k.starts_with('#') || key.contains(['\n', '\r', '\0']) || !k.contains(' ') {
        return Err(QgaError::generic(format!(
            "invalid OpenSSH public key: '{key}'"
        )));
    }
    Ok(())
}

impl GuestAgent {
    pub(super) fn passwd(&self, user: &str) -> Result<Passwd, QgaError> {
        let text = read_text(&self.settings.passwd, 16 * 1024 * 1024)
            .map_err(|e| QgaError::io(self.settings.passwd.display(), &e))?;
        parse_passwd(&text, user).ok_or_else(|| {
            QgaError::generic(format!(
                "failed to get passwd entry for user '{user}' ({})",
                self.settings.passwd.display()
            ))
        })
    }

    /// The user's entry and their keys (non-empty, non-comment lines).
    pub(super) fn ssh_keys(&self, user: &str) -> Result<(Passwd, Vec<String>), QgaError> {
        let pw = self.passwd(user)?;
        let path = pw.home.join(".ssh/authorized_keys");
        let keys = match read_text(&path, 16 * 1024 * 1024) {
            Ok(t) => t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(QgaError::io(path.display(), &e)),
        };
        Ok((pw, keys))
    }

    pub(super) fn ssh_add(&self, user: &str, keys: &[String], reset: bool) -> Result<(), QgaError> {
        for k in keys {
            check_key(k)?;
        }
        let (pw, mut have) = self.ssh_keys(user)?;
        if reset {
            have.clear();
        }
        for k in keys {
            let k = k.trim().to_owned();
            if !k.is_empty() && !have.contains(&k) {
                have.push(k);
            }
        }
        write_authorized_keys(&pw, &have)
    }

    pub(super) fn ssh_remove(&self, user: &str, keys: &[String]) -> Result<(), QgaError> {
        for k in keys {
            check_key(k)?;
        }
        let (pw, have) = self.ssh_keys(user)?;
        let keep: Vec<String> = have
            .into_iter()
            .filter(|h| !keys.iter().any(|k| k.trim() == h))
            .collect();
        write_authorized_keys(&pw, &keep)
    }
}

/// Writes `~/.ssh/authorized_keys` (0600, in `~/.ssh` 0700, both owned by the user) through a
/// new file renamed over the old one; never follows a symlink planted by the user.
pub(super) fn write_authorized_keys(pw: &Passwd, keys: &[String]) -> Result<(), QgaError> {
    let dir = pw.home.join(".ssh");
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(QgaError::generic(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(&dir).map_err(|e| QgaError::io(dir.display(), &e))?;
            std::os::unix::fs::chown(&dir, Some(pw.uid), Some(pw.gid))
                .map_err(|e| QgaError::io(format!("cannot chown {}", dir.display()), &e))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| QgaError::io(dir.display(), &e))?;
        }
        Err(e) => return Err(QgaError::io(dir.display(), &e)),
    }
    let path = dir.join("authorized_keys");
    let tmp = dir.join(format!(".authorized_keys.vstream-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut text = keys.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::os::unix::fs::fchown(&f, Some(pw.uid), Some(pw.gid))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(QgaError::io(path.display(), &e));
    }
    Ok(())
}
