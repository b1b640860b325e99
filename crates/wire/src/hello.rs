//! The handshake message sent first on every link.

use crate::frame::{Decoder, Kind};

/// Protocol version spoken by this implementation. Peers with another major version are refused.
pub const VERSION: u16 = 1;
/// Longest peer name accepted, in bytes.
pub const MAX_NAME: usize = 64;

/// Capability bits.
pub mod caps {
    /// The sender keeps unacknowledged frames and can resume a session on a new link.
    pub const RESUME: u32 = 1 << 0;
    /// The sender's transport for this link checks integrity itself (a socket, vsock): if both
    /// HELLOs on a link carry it, frames on that link leave out the payload CRC.
    pub const NO_PAYLOAD_CRC: u32 = 1 << 1;
}

/// Which end of the line a peer is. Channel ids opened by the host are even, by the guest odd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host (vstreamd).
    Host = 0,
    /// The guest (vstream-agent).
    Guest = 1,
}

/// Payload of a HELLO frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Sender's role.
    pub role: Role,
    /// Capability bits ([`caps`]).
    pub caps: u32,
    /// Sender's session id (random, never 0).
    pub my_session: u64,
    /// The session id the sender last saw from its peer, 0 if none.
    pub your_session: u64,
    /// Next sequence number the sender expects (meaningful when resuming).
    pub recv_next: u32,
    /// Largest payload the sender accepts.
    pub max_frame: u32,
    /// Sender's random id for this link (a new value means the peer restarted its end).
    pub link: u32,
    /// The peer's `link` value the sender has received, 0 if none yet: "I heard you".
    pub echo: u32,
    /// Sender's name (guest name, or host name), UTF-8, at most [`MAX_NAME`] bytes.
    pub name: String,
}

/// A HELLO that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Shorter than the fixed part, or the name runs past the end.
    #[error("HELLO payload of {0} bytes is truncated")]
    Truncated(usize),
    /// Unknown role byte.
    #[error("HELLO names role {0}, expected 0 (host) or 1 (guest)")]
    BadRole(u8),
    /// Name too long or not UTF-8.
    #[error("HELLO name is not UTF-8 of at most 64 bytes")]
    BadName,
    /// Session id 0 is reserved for "none".
    #[error("HELLO carries session id 0")]
    ZeroSession,
}

const FIXED: usize = 2 + 1 + 1 + 4 + 8 + 8 + 4 + 4 + 4 + 4 + 1;

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let name = truncate_utf8(&self.name, MAX_NAME);
        let mut v = Vec::with_capacity(FIXED + name.len());
        v.extend_from_slice(&self.version.to_le_bytes());
        v.push(self.role as u8);
        v.push(0);
        v.extend_from_slice(&self.caps.to_le_bytes());
        v.extend_from_slice(&self.my_session.to_le_bytes());
        v.extend_from_slice(&self.your_session.to_le_bytes());
        v.extend_from_slice(&self.recv_next.to_le_bytes());
        v.extend_from_slice(&self.max_frame.to_le_bytes());
        v.extend_from_slice(&self.link.to_le_bytes());
        v.extend_from_slice(&self.echo.to_le_bytes());
        // truncate_utf8 bounds the name to MAX_NAME (64) bytes.
        v.push(name.len() as u8);
        v.extend_from_slice(name.as_bytes());
        v
    }

    /// Decodes and validates a payload.
    pub fn decode(p: &[u8]) -> Result<Hello, HelloError> {
        if p.len() < FIXED {
            return Err(HelloError::Truncated(p.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        let u64_at = |at: usize| (u64::from(u32_at(at + 4)) << 32) | u64::from(u32_at(at));
        let role = match p[2] {
            0 => Role::Host,
            1 => Role::Guest,
            r => return Err(HelloError::BadRole(r)),
        };
        let name_len = usize::from(p[FIXED - 1]);
        let name = p
            .get(FIXED..FIXED + name_len)
            .ok_or(HelloError::Truncated(p.len()))?;
        if name_len > MAX_NAME {
            return Err(HelloError::BadName);
        }
        let name = std::str::from_utf8(name).map_err(|_| HelloError::BadName)?;
        let my_session = u64_at(8);
        if my_session == 0 {
            return Err(HelloError::ZeroSession);
        }
        Ok(Hello {
            version: u16::from_le_bytes([p[0], p[1]]),
            role,
            caps: u32_at(4),
            my_session,
            your_session: u64_at(16),
            recv_next: u32_at(24),
            max_frame: u32_at(28),
            link: u32_at(32),
            echo: u32_at(36),
            name: name.to_owned(),
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Looks for the peer's HELLO at the start of a new link, before the link is given to a
/// session. A daemon that accepts agents on a shared listener uses it to learn which guest is
/// calling. Returns `None` until a HELLO frame has been decoded; other frames before it are
/// skipped. The caller keeps all bytes it read and feeds them to the session afterwards.
pub fn peek_hello(decoder: &mut Decoder) -> Option<Result<Hello, HelloError>> {
    for frame in decoder.by_ref().flatten() {
        if frame.header.kind == Kind::Hello as u8 {
            return Some(Hello::decode(&frame.payload));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Hello {
        Hello {
            version: VERSION,
            role: Role::Guest,
            caps: caps::RESUME,
            my_session: 0x1122_3344_5566_7788,
            your_session: 9,
            recv_next: 77,
            max_frame: 65536,
            link: 5,
            echo: 6,
            name: "guest-1".into(),
        }
    }

    #[test]
    fn round_trip() {
        assert_eq!(Hello::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary() {
        let h = Hello {
            name: "é".repeat(40),
            ..sample()
        };
        let back = Hello::decode(&h.encode()).expect("valid");
        assert_eq!(back.name, "é".repeat(32));
    }

    #[test]
    fn rejects_bad_input() {
        let good = sample().encode();
        assert_eq!(Hello::decode(&good[..10]), Err(HelloError::Truncated(10)));
        let mut bad = good.clone();
        bad[2] = 7;
        assert_eq!(Hello::decode(&bad), Err(HelloError::BadRole(7)));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] = 0xFF;
        assert_eq!(Hello::decode(&bad), Err(HelloError::BadName));
        let mut bad = good.clone();
        bad[8..16].fill(0);
        assert_eq!(Hello::decode(&bad), Err(HelloError::ZeroSession));
        let mut bad = good;
        bad[FIXED - 1] = 200;
        assert!(matches!(Hello::decode(&bad), Err(HelloError::Truncated(_))));
    }
}
