//! Key authentication for links whose transport proves nothing about the peer (TCP), sans-io.
//!
//! Before the first HELLO, the side that connected (the *connector*) and the side that accepted
//! (the *acceptor*) prove to each other that they hold the same per-guest key: a
//! challenge-response with HMAC-SHA-256 over the guest's name and both sides' random nonces.
//! The key never crosses the wire, a recorded exchange cannot be replayed (the other side's
//! nonce is fresh), and neither proof can be reflected as the other (each has its own label).
//! The exchange (docs/PROTOCOL.md §9):
//!
//! ```text
//! connector -> acceptor   CLAIM     "VSAUTH1\n", u8 name_len, name, nonce_c[32]
//! acceptor  -> connector  CHALLENGE u8 0, nonce_a[32], proof_a[32]    | u8 1, u8 len, reason
//! connector -> acceptor   RESPONSE  proof_c[32]
//! acceptor  -> connector  VERDICT   u8 0                              | u8 1, u8 len, reason
//! ```
//!
//! `proof_a = HMAC(key, "vstream-auth-v1 acceptor" || u8 name_len || name || nonce_c || nonce_a)`,
//! `proof_c` the same with the label `"vstream-auth-v1 connector"`. The connector checks
//! `proof_a` before it answers, so it never proves anything to a side that does not hold the key.
//!
//! This authenticates the start of a connection; it does not encrypt it. On networks where an
//! attacker can take over a TCP connection after it started, run the link through a tunnel.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First bytes of a CLAIM. A mux frame starts with `A9 5C`, so one byte tells them apart.
pub const MAGIC: [u8; 8] = *b"VSAUTH1\n";
/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (HMAC-SHA-256).
pub const PROOF_LEN: usize = 32;
/// Shortest key accepted: a key is a secret, not a password.
pub const MIN_KEY_LEN: usize = 16;
/// Longest name in a CLAIM (as in HELLO).
pub const MAX_NAME: usize = crate::hello::MAX_NAME;

const LABEL_ACCEPTOR: &[u8] = b"vstream-auth-v1 acceptor";
const LABEL_CONNECTOR: &[u8] = b"vstream-auth-v1 connector";

/// A per-guest key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)") // Never in logs.
    }
}

impl Key {
    /// A key from its bytes; at least [`MIN_KEY_LEN`] of them.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Key, AuthError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(AuthError::ShortKey(bytes.len()));
        }
        Ok(Key(bytes))
    }

    /// A key from the contents of a key file: its bytes without trailing white space (so that
    /// `head -c 32 /dev/urandom | base64 > KEYFILE` makes a good one).
    pub fn from_file_contents(contents: &[u8]) -> Result<Key, AuthError> {
        let end = contents
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        Key::new(&contents[..end])
    }

    fn mac(
        &self,
        side: Side,
        name: &str,
        nonce_c: &[u8; NONCE_LEN],
        nonce_a: &[u8; NONCE_LEN],
    ) -> Hmac<Sha256> {
        // new_from_slice accepts any key length for HMAC; the error case cannot happen.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(side.label());
        mac.update(&[name.len() as u8]);
        mac.update(name.as_bytes());
        mac.update(nonce_c);
        mac.update(nonce_a);
        mac
    }

    /// `side`'s proof for `name` and the two nonces.
    pub fn proof(
        &self,
        side: Side,
        name: &str,
        nonce_c: &[u8; NONCE_LEN],
        nonce_a: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(side, name, nonce_c, nonce_a)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks `side`'s proof in constant time.
    pub fn verify(
        &self,
        side: Side,
        name: &str,
        nonce_c: &[u8; NONCE_LEN],
        nonce_a: &[u8; NONCE_LEN],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(side, name, nonce_c, nonce_a)
            .verify_slice(proof)
            .is_ok()
    }
}

/// Which end of the handshake a proof is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that connected.
    Connector,
    /// The side that accepted.
    Acceptor,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Acceptor => LABEL_ACCEPTOR,
            Side::Connector => LABEL_CONNECTOR,
        }
    }
}

/// What went wrong in the exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A key shorter than [`MIN_KEY_LEN`].
    #[error("a key must have at least {MIN_KEY_LEN} bytes, this one has {0}")]
    ShortKey(usize),
    /// The bytes are not an authentication message.
    #[error("not a vstream key handshake (expected {expected})")]
    Malformed {
        /// What was expected.
        expected: &'static str,
    },
    /// The name is empty, too long or not UTF-8.
    #[error("the name in the key handshake is not 1-{MAX_NAME} bytes of UTF-8")]
    BadName,
    /// The other side refused, with its reason.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The other side's proof does not match our key.
    #[error("the peer does not hold this guest's key")]
    WrongKey,
}

/// The connector's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The guest the connection claims to be (or, from vstreamd, to reach).
    pub name: String,
    /// The connector's nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Claim {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + self.name.len() + NONCE_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    /// Parses a CLAIM from the start of `buf`: `Ok(None)` while more bytes are needed, else the
    /// claim and how many bytes it took. Reads at most `8 + 1 + 64 + 32` bytes.
    pub fn parse(buf: &[u8]) -> Result<Option<(Claim, usize)>, AuthError> {
        let have = buf.len().min(MAGIC.len());
        if buf[..have] != MAGIC[..have] {
            return Err(AuthError::Malformed {
                expected: "VSAUTH1",
            });
        }
        let Some(&n) = buf.get(MAGIC.len()) else {
            return Ok(None);
        };
        let n = n as usize;
        if n == 0 || n > MAX_NAME {
            return Err(AuthError::BadName);
        }
        let end = MAGIC.len() + 1 + n + NONCE_LEN;
        if buf.len() < end {
            return Ok(None);
        }
        let name = std::str::from_utf8(&buf[MAGIC.len() + 1..MAGIC.len() + 1 + n])
            .map_err(|_| AuthError::BadName)?
            .to_owned();
        let mut nonce = [0; NONCE_LEN];
        nonce.copy_from_slice(&buf[end - NONCE_LEN..end]);
        Ok(Some((Claim { name, nonce }, end)))
    }
}

/// The acceptor's answer to a CLAIM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// The acceptor knows the name: its nonce and its proof.
    Accept {
        /// The acceptor's nonce.
        nonce: [u8; NONCE_LEN],
        /// `proof_a`.
        proof: [u8; PROOF_LEN],
    },
    /// Refused (unknown name, no key for it...).
    Refuse(String),
}

impl Challenge {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Challenge::Accept { nonce, proof } => {
                let mut out = vec![0];
                out.extend_from_slice(nonce);
                out.extend_from_slice(proof);
                out
            }
            Challenge::Refuse(reason) => encode_refusal(reason),
        }
    }

    /// Parses a CHALLENGE; as [`Claim::parse`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Challenge, usize)>, AuthError> {
        match buf.first() {
            None => Ok(None),
            Some(0) => {
                let end = 1 + NONCE_LEN + PROOF_LEN;
                if buf.len() < end {
                    return Ok(None);
                }
                let mut nonce = [0; NONCE_LEN];
                nonce.copy_from_slice(&buf[1..1 + NONCE_LEN]);
                let mut proof = [0; PROOF_LEN];
                proof.copy_from_slice(&buf[1 + NONCE_LEN..end]);
                Ok(Some((Challenge::Accept { nonce, proof }, end)))
            }
            Some(1) => Ok(parse_refusal(buf)?.map(|(r, n)| (Challenge::Refuse(r), n))),
            Some(_) => Err(AuthError::Malformed {
                expected: "a challenge",
            }),
        }
    }
}

/// The acceptor's last word: `None` accepted, `Some(reason)` refused.
pub fn encode_verdict(refusal: Option<&str>) -> Vec<u8> {
    match refusal {
        None => vec![0],
        Some(reason) => encode_refusal(reason),
    }
}

/// Parses a VERDICT; as [`Claim::parse`], with `Ok(Some((None, 1)))` for "accepted".
pub fn parse_verdict(buf: &[u8]) -> Result<Option<(Option<String>, usize)>, AuthError> {
    match buf.first() {
        None => Ok(None),
        Some(0) => Ok(Some((None, 1))),
        Some(1) => Ok(parse_refusal(buf)?.map(|(r, n)| (Some(r), n))),
        Some(_) => Err(AuthError::Malformed {
            expected: "a verdict",
        }),
    }
}

/// `u8 1, u8 len, reason` (the reason cut to 255 bytes at a character boundary).
fn encode_refusal(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(255);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = vec![1, end as u8];
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

fn parse_refusal(buf: &[u8]) -> Result<Option<(String, usize)>, AuthError> {
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    let end = 2 + n as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        String::from_utf8_lossy(&buf[2..end]).into_owned(),
        end,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::from_file_contents(b"0123456789abcdef0123456789abcdef\n").expect("key")
    }

    #[test]
    fn keys_are_checked_and_trimmed() {
        assert_eq!(Key::new(vec![0; 15]), Err(AuthError::ShortKey(15)));
        assert_eq!(
            Key::from_file_contents(b"0123456789abcdef \n\n").expect("16 bytes"),
            Key::new(*b"0123456789abcdef").expect("key")
        );
        assert_eq!(format!("{:?}", key()), "Key(..)");
    }

    #[test]
    fn proofs_verify_only_with_the_same_key_name_and_nonces() {
        let k = key();
        let (c, a) = ([1; NONCE_LEN], [2; NONCE_LEN]);
        let p = k.proof(Side::Acceptor, "lab", &c, &a);
        assert!(k.verify(Side::Acceptor, "lab", &c, &a, &p));
        assert!(!k.verify(Side::Acceptor, "lab2", &c, &a, &p));
        assert!(!k.verify(Side::Acceptor, "lab", &a, &c, &p));
        // A proof is never valid in the other direction (no reflection).
        assert!(!k.verify(Side::Connector, "lab", &c, &a, &p));
        let other = Key::new(*b"another key of 16+ bytes").expect("key");
        assert!(!other.verify(Side::Acceptor, "lab", &c, &a, &p));
    }

    #[test]
    fn messages_round_trip_and_parse_incrementally() {
        let claim = Claim {
            name: "lab".into(),
            nonce: [7; NONCE_LEN],
        };
        let wire = claim.encode();
        for cut in 0..wire.len() {
            assert_eq!(Claim::parse(&wire[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(Claim::parse(&wire), Ok(Some((claim, wire.len()))));
        let ch = Challenge::Accept {
            nonce: [3; NONCE_LEN],
            proof: [4; PROOF_LEN],
        };
        let w = ch.encode();
        assert_eq!(Challenge::parse(&w[..w.len() - 1]), Ok(None));
        assert_eq!(Challenge::parse(&w), Ok(Some((ch, w.len()))));
        let r = Challenge::Refuse("no such guest".into()).encode();
        assert_eq!(
            Challenge::parse(&r),
            Ok(Some((Challenge::Refuse("no such guest".into()), r.len())))
        );
        assert_eq!(parse_verdict(&encode_verdict(None)), Ok(Some((None, 1))));
        let v = encode_verdict(Some("wrong key"));
        assert_eq!(
            parse_verdict(&v),
            Ok(Some((Some("wrong key".into()), v.len())))
        );
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        assert!(Claim::parse(&[0xA9, 0x5C]).is_err());
        let mut bad = MAGIC.to_vec();
        bad.push(0);
        assert_eq!(Claim::parse(&bad), Err(AuthError::BadName));
        bad[8] = 65;
        assert_eq!(Claim::parse(&bad), Err(AuthError::BadName));
        let mut utf = MAGIC.to_vec();
        utf.extend_from_slice(&[2, 0xFF, 0xFE]);
        utf.extend_from_slice(&[0; NONCE_LEN]);
        assert_eq!(Claim::parse(&utf), Err(AuthError::BadName));
        assert!(Challenge::parse(&[9]).is_err());
        assert!(parse_verdict(&[9]).is_err());
        let long = encode_refusal(&"é".repeat(200));
        assert_eq!(long[1] as usize, long.len() - 2);
        assert!(std::str::from_utf8(&long[2..]).is_ok());
    }
}
