//! vstreamd's errors.

use vstream_devices::registry::SettingsError;

use crate::identity::Owner;

/// A device's host half refused to start for a guest (its settings, its spool, its log file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest {guest}: {error}")]
pub struct DeviceFailed {
    /// The guest.
    pub guest: String,
    /// What the device said.
    pub error: SettingsError,
}

/// Why a configured guest could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A device's host half refused to start.
    #[error(transparent)]
    Device(#[from] DeviceFailed),
    /// The guest's key file.
    #[error("guest {guest}: {error}")]
    Key {
        /// The guest.
        guest: String,
        /// What is wrong with it.
        error: std::io::Error,
    },
}

/// Why a connection is not taken as a guest: it is told this reason in a REFUSE frame, and it
/// is counted on the guest it claimed (docs/THREAT-MODEL.md, "Identity").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A vsock peer whose CID is not the guest's.
    #[error("guest {guest:?} is CID {want}; this connection comes from CID {cid}")]
    WrongCid {
        /// The guest claimed.
        guest: String,
        /// Its configured CID.
        want: u32,
        /// The connection's.
        cid: u32,
    },
    /// A vsock peer that is another configured guest.
    #[error("CID {cid} is guest {guest:?}; it may not announce {claimed:?}")]
    CidOfAnother {
        /// The connection's CID.
        cid: u32,
        /// The guest with that CID.
        guest: String,
        /// The name it announced.
        claimed: String,
    },
    /// A vsock peer claiming a guest that has no `cid`.
    #[error("guest {0:?} has no cid in the config; vsock connections cannot be it")]
    NoCid(String),
    /// A Unix peer of another user.
    #[error("guest {guest:?} belongs to uid {want}; this connection is uid {uid}")]
    WrongUid {
        /// The guest claimed.
        guest: String,
        /// Its configured uid.
        want: u32,
        /// The connection's.
        uid: u32,
    },
    /// A Unix peer of another group.
    #[error("guest {guest:?} belongs to gid {want}; this connection is gid {gid}")]
    WrongGid {
        /// The guest claimed.
        guest: String,
        /// Its configured gid.
        want: u32,
        /// The connection's.
        gid: u32,
    },
    /// A Unix peer on a shared listener claiming a guest with neither `uid` nor `gid`.
    #[error("guest {0:?} has no uid or gid in the config, so no Unix connection on a shared listener can be it (use its own transport)")]
    NoUnixRule(String),
    /// TCP without the key handshake, and `insecure_tcp` is off.
    #[error("plain TCP without a key is refused: give the guest a key_file, or set [daemon] insecure_tcp = true")]
    PlainTcp,
    /// Plain TCP (allowed) claiming a guest that has a key.
    #[error("guest {0:?} has a key: connect with it")]
    HasKey(String),
    /// The key handshake proved one guest and the HELLO announced another.
    #[error("this connection proved the key of guest {proven:?} but announces {claimed:?}")]
    KeyOfAnother {
        /// The guest whose key it proved.
        proven: String,
        /// The name it announced.
        claimed: String,
    },
    /// A key handshake for a name that has no key here.
    #[error("no guest {0:?} has a key here")]
    NoKey(String),
    /// A guest's own transport answered with another guest's name in the key handshake.
    #[error("this transport is guest {guest:?}'s, not {claimed:?}'s")]
    NotThisGuest {
        /// The transport's guest.
        guest: String,
        /// The name it was offered.
        claimed: String,
    },
    /// The listener cannot tell who connects.
    #[error("this listener cannot tell who connects; use a transport of the guest's own")]
    Unidentified,
    /// An empty name.
    #[error("the agent announced no name")]
    NoName,
    /// An unknown name, and announced guests are not allowed.
    #[error("no guest {0:?} in the config, and [daemon.announced] allow is false")]
    NotAllowed(String),
    /// An announced name owned by another identity.
    #[error("guest {guest:?} belongs to {owner}; this connection is {this}")]
    Owned {
        /// The name.
        guest: String,
        /// Who owns it.
        owner: Owner,
        /// Who asks.
        this: Owner,
    },
    /// As many announced guests as allowed already.
    #[error("already {0} announced guests, the most [daemon.announced] max allows")]
    TooMany(usize),
    /// A configured guest whose host half is not running (it failed to start).
    #[error("guest {0:?} is configured but not running")]
    NotRunning(String),
    /// An announced guest whose devices could not start.
    #[error(transparent)]
    Start(#[from] DeviceFailed),
    /// A guest held off after its links were dropped for protocol violations.
    #[error("guest {guest:?} is held off for {secs} s more: its links were dropped for protocol violations")]
    HeldOff {
        /// The guest.
        guest: String,
        /// Seconds left (rounded up).
        secs: u64,
    },
    /// The key handshake failed.
    #[error("{0}")]
    Handshake(String),
}

/// Why a live upgrade did not happen (this vstreamd then goes on serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A bridged connection or console viewer did not reach a point where it can be carried.
    #[error("a bridged connection did not stop within 5 s")]
    Quiesce,
    /// A console's capture did not stop in time.
    #[error("a console's capture did not stop within 5 s")]
    ConsoleTimeout,
    /// A console's capture could not be stopped.
    #[error("{0}")]
    Console(std::io::Error),
    /// The state could not be written.
    #[error("writing the state: {0}")]
    State(std::io::Error),
    /// The new binary could not be exec'd.
    #[error("cannot run {}: {error}", binary.display())]
    Exec {
        /// The binary.
        binary: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
}
