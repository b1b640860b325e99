//! Which guest a connection is: what its transport proves, never the name it announces alone
//! (docs/THREAT-MODEL.md, "Identity").
//!
//! A connection on a guest's own transport (`[[guest.transport]]`) is that guest's; its
//! address is the proof, checked against the guest's `uid`/`gid`/`cid` where it has them. On a
//! shared listener (`[daemon] listen`) the rules are, by transport:
//!
//! | transport | proof | the connection is |
//! | --- | --- | --- |
//! | vsock | the peer's CID | the guest with that `cid`; a different announced name is refused |
//! | unix | `SO_PEERCRED` | the named guest if its `uid`/`gid` match; a guest without either is not reachable there |
//! | tcp | the key handshake | the guest whose key it proved; plain TCP only with `[daemon] insecure_tcp` |
//!
//! A name that no `[[guest]]` has is an *announced* guest: accepted only with
//! `[daemon.announced] allow = true`, at most `max` of them, owned by the identity of the
//! connection that announced it first (uid, CID) until it is forgotten
//! `forget_after_secs` after its last connection ended.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vstream_transport::PeerIdentity;

use crate::config::{AnnouncedConfig, GuestConfig};
use crate::error::Refused;

/// What a configured guest accepts as proof on shared listeners and its own listening
/// transports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `cid`: its AF_VSOCK context id.
    pub cid: Option<u32>,
    /// `uid`: Unix peers must run as this user.
    pub uid: Option<u32>,
    /// `gid`: Unix peers must run with this group.
    pub gid: Option<u32>,
    /// Whether it has a key (`key_file`), proven on TCP.
    pub has_key: bool,
}

impl Rules {
    /// A configured guest's rules.
    pub fn of(g: &GuestConfig) -> Rules {
        Rules {
            cid: g.cid,
            uid: g.uid,
            gid: g.gid,
            has_key: g.key_file.is_some(),
        }
    }

    /// Whether a connection on one of the guest's own transports may be the guest: every rule
    /// that speaks of the connection's kind must hold.
    pub fn admit_own(&self, name: &str, id: &PeerIdentity) -> Result<(), Refused> {
        match *id {
            PeerIdentity::Unix { uid, gid, .. } => self.check_unix(name, uid, gid),
            PeerIdentity::Vsock { cid } => match self.cid {
                Some(want) if want != cid => Err(Refused::WrongCid {
                    guest: name.to_owned(),
                    want,
                    cid,
                }),
                _ => Ok(()),
            },
            PeerIdentity::Tcp(_) | PeerIdentity::Opened => Ok(()),
        }
    }

    fn check_unix(&self, name: &str, uid: u32, gid: u32) -> Result<(), Refused> {
        if let Some(want) = self.uid.filter(|w| *w != uid) {
            return Err(Refused::WrongUid {
                guest: name.to_owned(),
                want,
                uid,
            });
        }
        if let Some(want) = self.gid.filter(|w| *w != gid) {
            return Err(Refused::WrongGid {
                guest: name.to_owned(),
                want,
                gid,
            });
        }
        Ok(())
    }
}

/// The verdict on a connection to a shared listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A configured guest.
    Configured(String),
    /// An announced guest (new or known), owned by `owner`.
    Announced {
        /// Its name.
        name: String,
        /// Who owns it.
        owner: Owner,
    },
}

/// The identity that owns an announced guest's name: what later connections must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A Unix user.
    Uid(u32),
    /// A VM.
    Cid(u32),
    /// Nobody in particular: plain TCP under `insecure_tcp`.
    Anyone,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Uid(u) => write!(f, "uid {u}"),
            Owner::Cid(c) => write!(f, "CID {c}"),
            Owner::Anyone => f.write_str("anyone (insecure TCP)"),
        }
    }
}

/// Everything needed to judge connections on shared listeners.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Configured guests and their rules.
    pub guests: BTreeMap<String, Rules>,
    /// `[daemon.announced]`.
    pub announced: AnnouncedConfig,
    /// `[daemon] insecure_tcp`.
    pub insecure_tcp: bool,
}

impl Policy {
    /// Judges a connection whose transport proved `id`, which announced `claimed` in its HELLO
    /// and, on TCP, proved the key of `proven` (or none). `owner_of` gives the owner of an
    /// existing announced guest; `announced_count` how many there are.
    pub fn admit(
        &self,
        id: &PeerIdentity,
        claimed: &str,
        proven: Option<&str>,
        owner_of: impl Fn(&str) -> Option<Owner>,
        announced_count: usize,
    ) -> Result<Admission, Refused> {
        if let Some(p) = proven {
            // The key handshake named the guest; the HELLO must agree.
            if claimed != p {
                return Err(Refused::KeyOfAnother {
                    proven: p.to_owned(),
                    claimed: claimed.to_owned(),
                });
            }
            return Ok(Admission::Configured(p.to_owned()));
        }
        let owner = match *id {
            PeerIdentity::Vsock { cid } => {
                if let Some((name, _)) = self.guests.iter().find(|(_, r)| r.cid == Some(cid)) {
                    if !claimed.is_empty() && claimed != name {
                        return Err(Refused::CidOfAnother {
                            cid,
                            guest: name.clone(),
                            claimed: claimed.to_owned(),
                        });
                    }
                    return Ok(Admission::Configured(name.clone()));
                }
                if let Some(r) = self.guests.get(claimed) {
                    return Err(match r.cid {
                        Some(want) => Refused::WrongCid {
                            guest: claimed.to_owned(),
                            want,
                            cid,
                        },
                        None => Refused::NoCid(claimed.to_owned()),
                    });
                }
                Owner::Cid(cid)
            }
            PeerIdentity::Unix { uid, gid, .. } => {
                if let Some(r) = self.guests.get(claimed) {
                    if r.uid.is_none() && r.gid.is_none() {
                        return Err(Refused::NoUnixRule(claimed.to_owned()));
                    }
                    r.check_unix(claimed, uid, gid)?;
                    return Ok(Admission::Configured(claimed.to_owned()));
                }
                Owner::Uid(uid)
            }
            PeerIdentity::Tcp(_) => {
                if !self.insecure_tcp {
                    return Err(Refused::PlainTcp);
                }
                if let Some(r) = self.guests.get(claimed) {
                    if r.has_key {
                        return Err(Refused::HasKey(claimed.to_owned()));
                    }
                    return Ok(Admission::Configured(claimed.to_owned()));
                }
                Owner::Anyone
            }
            PeerIdentity::Opened => return Err(Refused::Unidentified),
        };
        self.announce(claimed, owner, owner_of, announced_count)
    }

    fn announce(
        &self,
        claimed: &str,
        owner: Owner,
        owner_of: impl Fn(&str) -> Option<Owner>,
        announced_count: usize,
    ) -> Result<Admission, Refused> {
        if claimed.is_empty() {
            return Err(Refused::NoName);
        }
        if !self.announced.allow {
            return Err(Refused::NotAllowed(claimed.to_owned()));
        }
        match owner_of(claimed) {
            Some(o) if o == owner => {}
            Some(o) => {
                return Err(Refused::Owned {
                    guest: claimed.to_owned(),
                    owner: o,
                    this: owner,
                })
            }
            None if announced_count >= self.announced.max => {
                return Err(Refused::TooMany(self.announced.max))
            }
            None => {}
        }
        Ok(Admission::Announced {
            name: claimed.to_owned(),
            owner,
        })
    }
}

/// At most `burst` log lines per `period` for one kind of event, then a count of what was left
/// out: a hostile peer cannot fill the disk through our log.
#[derive(Debug)]
pub struct LogLimit {
    period: Duration,
    burst: u32,
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    /// `burst` lines per `period`.
    pub const fn new(period: Duration, burst: u32) -> LogLimit {
        LogLimit {
            period,
            burst,
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log one more line now; `Some(n)` with how many were suppressed since the last
    /// line that was logged.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.window {
            Some(start) if now.duration_since(start) < self.period => {}
            _ => {
                self.window = Some(now);
                self.used = 0;
            }
        }
        if self.used >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(uid: u32) -> PeerIdentity {
        PeerIdentity::Unix {
            uid,
            gid: uid,
            pid: None,
        }
    }

    fn policy(allow: bool) -> Policy {
        let mut guests = BTreeMap::new();
        guests.insert(
            "lab".to_owned(),
            Rules {
                cid: Some(5),
                uid: Some(1000),
                gid: None,
                has_key: true,
            },
        );
        guests.insert("bare".to_owned(), Rules::default());
        Policy {
            guests,
            announced: AnnouncedConfig {
                allow,
                max: 2,
                forget_after_secs: 60,
            },
            insecure_tcp: false,
        }
    }

    fn none(_: &str) -> Option<Owner> {
        None
    }

    #[test]
    fn vsock_connections_are_their_cid() {
        let p = policy(true);
        let cid = |c| PeerIdentity::Vsock { cid: c };
        assert_eq!(
            p.admit(&cid(5), "", None, none, 0),
            Ok(Admission::Configured("lab".into()))
        );
        assert_eq!(
            p.admit(&cid(5), "lab", None, none, 0),
            Ok(Admission::Configured("lab".into()))
        );
        let e = p
            .admit(&cid(5), "web", None, none, 0)
            .expect_err("claims another")
            .to_string();
        assert!(e.contains("CID 5 is guest \"lab\""), "{e}");
        let e = p
            .admit(&cid(7), "lab", None, none, 0)
            .expect_err("wrong CID")
            .to_string();
        assert!(e.contains("CID 5") && e.contains("CID 7"), "{e}");
        let e = p
            .admit(&cid(7), "bare", None, none, 0)
            .expect_err("no cid rule")
            .to_string();
        assert!(e.contains("no cid"), "{e}");
        assert_eq!(
            p.admit(&cid(7), "new", None, none, 0),
            Ok(Admission::Announced {
                name: "new".into(),
                owner: Owner::Cid(7)
            })
        );
    }

    #[test]
    fn unix_connections_are_their_uid() {
        let p = policy(true);
        assert_eq!(
            p.admit(&unix(1000), "lab", None, none, 0),
            Ok(Admission::Configured("lab".into()))
        );
        let e = p
            .admit(&unix(0), "lab", None, none, 0)
            .expect_err("root is not uid 1000")
            .to_string();
        assert!(e.contains("uid 1000") && e.contains("uid 0"), "{e}");
        let e = p
            .admit(&unix(1000), "bare", None, none, 0)
            .expect_err("no rule")
            .to_string();
        assert!(e.contains("no uid or gid"), "{e}");
    }

    #[test]
    fn tcp_needs_a_key_unless_insecure() {
        let mut p = policy(true);
        let tcp = PeerIdentity::Tcp("127.0.0.1:9".parse().expect("addr"));
        let e = p
            .admit(&tcp, "lab", None, none, 0)
            .expect_err("no key")
            .to_string();
        assert!(e.contains("plain TCP"), "{e}");
        assert_eq!(
            p.admit(&tcp, "lab", Some("lab"), none, 0),
            Ok(Admission::Configured("lab".into()))
        );
        let e = p
            .admit(&tcp, "bare", Some("lab"), none, 0)
            .expect_err("mismatch")
            .to_string();
        assert!(e.contains("proved the key of guest \"lab\""), "{e}");
        p.insecure_tcp = true;
        let e = p
            .admit(&tcp, "lab", None, none, 0)
            .expect_err("lab has a key")
            .to_string();
        assert!(e.contains("has a key"), "{e}");
        assert_eq!(
            p.admit(&tcp, "bare", None, none, 0),
            Ok(Admission::Configured("bare".into()))
        );
    }

    #[test]
    fn announced_names_are_owned_capped_and_optional() {
        let p = policy(true);
        let owner = |_: &str| Some(Owner::Uid(1000));
        assert!(p.admit(&unix(1000), "x", None, owner, 1).is_ok());
        let e = p
            .admit(&unix(1001), "x", None, owner, 1)
            .expect_err("other uid")
            .to_string();
        assert!(e.contains("belongs to uid 1000"), "{e}");
        let e = p
            .admit(&unix(1000), "y", None, none, 2)
            .expect_err("cap")
            .to_string();
        assert!(e.contains("max"), "{e}");
        // An existing name is not a new guest: the cap does not apply to it.
        assert!(p.admit(&unix(1000), "x", None, owner, 2).is_ok());
        let e = p
            .admit(&unix(1000), "", None, none, 0)
            .expect_err("no name")
            .to_string();
        assert!(e.contains("no name"), "{e}");
        let e = policy(false)
            .admit(&unix(1000), "x", None, none, 0)
            .expect_err("not allowed")
            .to_string();
        assert!(e.contains("allow is false"), "{e}");
        let e = p
            .admit(&PeerIdentity::Opened, "x", None, none, 0)
            .expect_err("opened")
            .to_string();
        assert!(e.contains("cannot tell"), "{e}");
    }

    #[test]
    fn own_transports_check_the_rules_that_apply() {
        let r = policy(false).guests["lab"].clone();
        assert!(r.admit_own("lab", &unix(1000)).is_ok());
        assert!(r.admit_own("lab", &unix(1)).is_err());
        assert!(r.admit_own("lab", &PeerIdentity::Vsock { cid: 5 }).is_ok());
        assert!(r.admit_own("lab", &PeerIdentity::Vsock { cid: 6 }).is_err());
        assert!(r.admit_own("lab", &PeerIdentity::Opened).is_ok());
        assert!(Rules::default().admit_own("x", &unix(5)).is_ok());
    }

    #[test]
    fn log_lines_are_limited_and_the_rest_counted() {
        let mut l = LogLimit::new(Duration::from_secs(1), 3);
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.allow(t0), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), Some(1000));
    }
}
