//! The web console's tokens. vstreamd keeps one random key in its state directory
//! ([`KEY_FILE`], mode 0600) and derives two tokens from it with HMAC-SHA256: the owner's (may
//! type) and the read-only group's (may only watch), so that `vstreamctl web-token` gives each
//! role its own. Removing the key file and restarting vstreamd revokes both.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::access::Role;

/// The key's file in the state directory.
pub const KEY_FILE: &str = "web.key";

/// Bytes of key.
const KEY_LEN: usize = 32;

/// The two tokens of one key.
#[derive(Clone)]
pub struct Tokens {
    owner: String,
    read_only: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)")
    }
}

impl Tokens {
    /// The tokens of the key in `state_dir`, which is made (random, 0600) if there is none.
    pub fn load_or_create(state_dir: &Path) -> io::Result<Tokens> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(KEY_FILE);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match created {
            Ok(mut f) => {
                let mut key = [0u8; KEY_LEN];
                std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
                f.write_all(&key)?;
                f.sync_all()?;
                Ok(Tokens::from_key(&key))
            }
            // Another daemon (or an earlier run) made it: use that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let key = std::fs::read(&path)?;
                if key.len() < KEY_LEN {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: shorter than {KEY_LEN} bytes", path.display()),
                    ));
                }
                Ok(Tokens::from_key(&key))
            }
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// The tokens derived from `key`.
    pub fn from_key(key: &[u8]) -> Tokens {
        let derive = |label: &[u8]| {
            // HMAC takes keys of any length.
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
            mac.update(b"vstream web token: ");
            mac.update(label);
            let tag = mac.finalize().into_bytes();
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        Tokens {
            owner: derive(b"owner"),
            read_only: derive(b"read-only"),
        }
    }

    /// The token of `role`.
    pub fn for_role(&self, role: Role) -> &str {
        match role {
            Role::Owner => &self.owner,
            Role::ReadOnly => &self.read_only,
        }
    }

    /// The role a presented token gives, if any. Both tokens are compared in full whatever
    /// matches, in time that depends only on the lengths.
    pub fn check(&self, presented: &str) -> Option<Role> {
        let owner = constant_time_eq(presented.as_bytes(), self.owner.as_bytes());
        let read_only = constant_time_eq(presented.as_bytes(), self.read_only.as_bytes());
        match (owner, read_only) {
            (true, _) => Some(Role::Owner),
            (false, true) => Some(Role::ReadOnly),
            (false, false) => None,
        }
    }
}

/// Whether `a == b`, without stopping at the first difference (a timing side channel would
/// let a client guess a token byte by byte).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_has_its_token_and_nothing_else_passes() {
        let t = Tokens::from_key(&[7u8; KEY_LEN]);
        let (owner, ro) = (t.for_role(Role::Owner), t.for_role(Role::ReadOnly));
        assert_ne!(owner, ro);
        assert_eq!(owner.len(), 64);
        assert_eq!(t.check(owner), Some(Role::Owner));
        assert_eq!(t.check(ro), Some(Role::ReadOnly));
        assert_eq!(t.check(""), None);
        assert_eq!(t.check(&owner[..63]), None, "a prefix is not the token");
        let mut flipped = owner.to_owned().into_bytes();
        flipped[63] = if flipped[63] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).expect("hex");
        assert_eq!(t.check(&flipped), None, "one wrong character");
        let other = Tokens::from_key(&[8u8; KEY_LEN]);
        assert_eq!(other.check(owner), None, "another key's token");
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = Tokens::load_or_create(&state).expect("create");
        let mode = std::fs::metadata(state.join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Tokens::load_or_create(&state).expect("load");
        assert_eq!(
            first.for_role(Role::Owner),
            again.for_role(Role::Owner),
            "a restart keeps the tokens"
        );
        std::fs::write(state.join(KEY_FILE), b"short").expect("truncate");
        assert!(
            Tokens::load_or_create(&state).is_err(),
            "a short key is refused"
        );
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
