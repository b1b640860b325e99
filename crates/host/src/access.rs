//! Who may use the control socket. Every connection's peer credentials (SO_PEERCRED, read by
//! the kernel at connect time, not claimed by the client) decide its role:
//!
//! - the owner (root, and the uid vstreamd runs as) may make every request;
//! - a member of the optional read-only group (`[daemon] control_read_group`) may watch:
//!   status, events, console logs and following a console without typing
//!   ([`Request::read_only`]); the socket is then 0660 and owned by that group;
//! - anyone else is refused (with the socket at 0600 or 0660 the kernel already keeps them
//!   out; the check holds even if the file's mode is loosened by hand).
//!
//! Membership is the peer's primary gid or the group's member list in the group database.

use std::io;

use nix::unistd::{Gid, Group, Uid, User};
use serde::Deserialize;

use crate::control::Request;

/// `control_read_group` in the config: a group name or a gid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupRef {
    /// A gid.
    Gid(u32),
    /// A group name (or a gid written as a string).
    Name(String),
}

/// What a connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Owner,
    /// Watch only.
    ReadOnly,
}

/// The control socket's access policy.
#[derive(Debug, Clone)]
pub struct Access {
    owner: u32,
    read_group: Option<(u32, String)>,
}

impl Access {
    /// The policy for a daemon running as the current effective uid, with an optional
    /// read-only group (resolved now: an unknown group name is a config error).
    pub fn new(read_group: Option<&GroupRef>) -> io::Result<Access> {
        let read_group = match read_group {
            None => None,
            Some(GroupRef::Gid(gid)) => Some(*gid),
            Some(GroupRef::Name(name)) => Some(match name.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(name)
                    .map_err(io::Error::from)?
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("control_read_group: no group named {name:?}"),
                        )
                    })?
                    .gid
                    .as_raw(),
            }),
        };
        let read_group = read_group.map(|gid| {
            let name = Group::from_gid(Gid::from_raw(gid))
                .ok()
                .flatten()
                .map_or_else(|| gid.to_string(), |g| g.name);
            (gid, name)
        });
        Ok(Access {
            owner: Uid::effective().as_raw(),
            read_group,
        })
    }

    /// The read-only group's gid, if there is one.
    pub fn read_gid(&self) -> Option<u32> {
        self.read_group.as_ref().map(|(gid, _)| *gid)
    }

    /// The control socket's file mode: group access only for a read-only group.
    pub fn socket_mode(&self) -> u32 {
        if self.read_group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    /// Whether `uid` owns the daemon (root, or the daemon's own uid).
    pub fn is_owner(&self, uid: u32) -> bool {
        uid == 0 || uid == self.owner
    }

    /// The role of a peer with these credentials, or why it has none. May consult the group
    /// database (blocking) unless the peer [is the owner](Access::is_owner).
    pub fn role(&self, uid: u32, gid: u32) -> Result<Role, Refused> {
        if self.is_owner(uid) {
            return Ok(Role::Owner);
        }
        let owner = self.owner;
        match &self.read_group {
            Some((group, _)) if gid == *group || is_member(uid, *group) => Ok(Role::ReadOnly),
            Some((_, name)) => Err(Refused::NotInGroup {
                uid,
                owner,
                group: name.clone(),
            }),
            None => Err(Refused::NoGroup { uid, owner }),
        }
    }

    /// Whether a peer with `role` may make `req`; if not, why.
    pub fn check(&self, uid: u32, role: Role, req: &Request) -> Result<(), Refused> {
        match role {
            Role::Owner => Ok(()),
            Role::ReadOnly if req.read_only() => Ok(()),
            Role::ReadOnly => {
                let group = self.read_group.as_ref().map_or("", |(_, n)| n.as_str());
                Err(Refused::NeedsOwner {
                    uid,
                    group: group.to_owned(),
                    verb: req.verb(),
                })
            }
        }
    }
}

/// Why a control request is refused (the error reply's text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not the owner, and not in the configured read-only group.
    #[error("uid {uid} is neither the owner (uid {owner}) nor in the read-only group {group}")]
    NotInGroup {
        /// The peer.
        uid: u32,
        /// The owner's uid.
        owner: u32,
        /// The read-only group.
        group: String,
    },
    /// Not the owner, and there is no read-only group.
    #[error("uid {uid} is not the owner (uid {owner}) and no read-only group is configured")]
    NoGroup {
        /// The peer.
        uid: u32,
        /// The owner's uid.
        owner: u32,
    },
    /// A read-only member asked for something that acts on a guest.
    #[error("uid {uid} is in the read-only group {group}; {verb} needs the owner")]
    NeedsOwner {
        /// The peer.
        uid: u32,
        /// The read-only group.
        group: String,
        /// What it asked for.
        verb: String,
    },
}

/// Whether the user with `uid` is listed as a member of group `gid`.
fn is_member(uid: u32, gid: u32) -> bool {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .is_some_and(|g| g.mem.contains(&user.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Request {
        Request::Open {
            guest: "g".into(),
            class: "tty".into(),
            name: String::new(),
        }
    }

    #[test]
    fn root_and_the_daemons_uid_own_others_watch_or_are_refused() {
        let a = Access::new(Some(&GroupRef::Gid(64_999))).expect("access");
        assert_eq!(a.socket_mode(), 0o660);
        assert_eq!(a.role(0, 0), Ok(Role::Owner));
        assert_eq!(a.role(a.owner, 12345), Ok(Role::Owner));
        assert_eq!(a.role(64_998, 64_999), Ok(Role::ReadOnly));
        let refused = a
            .role(64_997, 64_997)
            .expect_err("not in the group")
            .to_string();
        assert!(
            refused.contains("uid 64997 is neither the owner"),
            "{refused}"
        );
        let why = a
            .check(64_998, Role::ReadOnly, &open())
            .expect_err("open is not read-only")
            .to_string();
        assert!(
            why.starts_with("uid 64998 is in the read-only group"),
            "{why}"
        );
        assert!(why.ends_with("; open needs the owner"), "{why}");
        assert!(a
            .check(64_998, Role::ReadOnly, &Request::Status { guest: None })
            .is_ok());
        assert!(a.check(0, Role::Owner, &open()).is_ok());
        let none = Access::new(None).expect("access");
        assert_eq!(none.socket_mode(), 0o600);
        assert!(none.role(64_998, 64_999).is_err());
    }

    #[test]
    fn a_group_is_named_or_numbered() {
        let by_number = Access::new(Some(&GroupRef::Name("64999".into()))).expect("number");
        assert_eq!(by_number.read_gid(), Some(64_999));
        let root = Access::new(Some(&GroupRef::Name("root".into()))).expect("root group");
        assert_eq!(root.read_gid(), Some(0));
        let err = Access::new(Some(&GroupRef::Name("no-such-group-here".into())))
            .expect_err("unknown group");
        assert!(err.to_string().contains("no-such-group-here"), "{err}");
    }
}
