//! The typed replies of QGA commands (the guest half writes them, the host half reads them).

use serde::{Deserialize, Serialize};

/// `guest-info`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// Agent version.
    pub version: String,
    /// Every command (QGA spells this member with an underscore).
    pub supported_commands: Vec<GuestAgentCommandInfo>,
}

/// One command in `guest-info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestAgentCommandInfo {
    /// Name.
    pub name: String,
    /// Usable now.
    pub enabled: bool,
    /// Replies on success.
    pub success_response: bool,
}

/// `guest-file-read`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFileRead {
    /// Bytes read (before base64).
    pub count: u64,
    /// The bytes, base64.
    pub buf_b64: String,
    /// End of file reached.
    pub eof: bool,
}

/// `guest-file-write`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestFileWrite {
    /// Bytes written.
    pub count: u64,
    /// End of file (always false for writes).
    pub eof: bool,
}

/// `guest-file-seek`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestFileSeek {
    /// New position.
    pub position: u64,
    /// End of file (false after a seek).
    pub eof: bool,
}

/// `guest-exec`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestExec {
    /// The process id.
    pub pid: i64,
}

/// `guest-exec-status`'s reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExecStatus {
    /// The process ended and its output was read to the end.
    pub exited: bool,
    /// Exit code, if it exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    /// Signal number, if killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    /// Captured standard output, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_data: Option<String>,
    /// Captured standard error, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_data: Option<String>,
    /// Standard output was cut at the capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_truncated: Option<bool>,
    /// Standard error was cut at the capture limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_truncated: Option<bool>,
}

/// `guest-get-osinfo`'s reply: uname and os-release(5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // uname(2) and os-release(5) fields of the same names.
pub struct GuestOsInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant_id: Option<String>,
}

/// `guest-get-host-name`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestHostName {
    /// The host name.
    pub host_name: String,
}

/// `guest-get-timezone`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTimezone {
    /// Zone abbreviation, e.g. `UTC`, `CET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Seconds east of UTC.
    pub offset: i64,
}

/// One logged-in user in `guest-get-users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestUser {
    /// User name.
    pub user: String,
    /// Earliest login of this user, seconds since the epoch.
    pub login_time: f64,
    /// Logon domain (Windows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `guest-get-load`'s reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)] // The three load averages.
pub struct GuestLoadAverage {
    pub load1m: f64,
    pub load5m: f64,
    pub load15m: f64,
}

/// One CPU in `guest-get-vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestLogicalProcessor {
    /// CPU number.
    pub logical_id: i64,
    /// Online.
    pub online: bool,
    /// Can be taken offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// One memory block in `guest-get-memory-blocks`, and what `guest-set-memory-blocks` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlock {
    /// Its number (`/sys/devices/system/memory/memoryN`).
    pub phys_index: i64,
    /// Online.
    pub online: bool,
    /// Can be taken offline (ignored in requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// What became of one block in `guest-set-memory-blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBlockResponse {
    /// Done (or already so).
    Success,
    /// No such block.
    NotFound,
    /// The block cannot go offline.
    OperationNotSupported,
    /// The kernel refused; `error-code` says why.
    OperationFailed,
}

/// One block's answer in `guest-set-memory-blocks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlockResponse {
    /// The block.
    pub phys_index: i64,
    /// What became of it.
    pub response: MemoryBlockResponse,
    /// The errno of a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
}

/// `guest-get-memory-block-info`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemoryBlockInfo {
    /// Bytes per memory block.
    pub size: u64,
}

/// One interface in `guest-network-get-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterface {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_addresses: Option<Vec<GuestIpAddress>>,
    /// Counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<GuestNetworkInterfaceStat>,
}

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestIpAddress {
    /// The address.
    pub ip_address: String,
    /// `ipv4` or `ipv6`.
    pub ip_address_type: String,
    /// Prefix length.
    pub prefix: i64,
}

/// Interface counters (/proc/net/dev).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // /proc/net/dev's columns.
pub struct GuestNetworkInterfaceStat {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_dropped: u64,
}

/// One file system in `guest-get-fsinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFilesystemInfo {
    /// Block device name (`vda1`, `dm-0`) or `MAJOR:MINOR`.
    pub name: String,
    /// Mount point.
    pub mountpoint: String,
    /// File system type.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Bytes usable by unprivileged users (used + available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Size of the file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes_privileged: Option<u64>,
    /// Disks it lives on.
    pub disk: Vec<GuestDiskAddress>,
}

/// A disk under a file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskAddress {
    /// PCI address of its controller (-1s if none).
    pub pci_controller: GuestPciAddress,
    /// `virtio`, `scsi`, `sata`, `ide`, `usb`, ... or `unknown`.
    pub bus_type: String,
    /// SCSI bus (channel).
    pub bus: i64,
    /// SCSI target.
    pub target: i64,
    /// SCSI unit (LUN).
    pub unit: i64,
    /// Serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Device node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// One block device in `guest-get-disks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskInfo {
    /// `/dev/NAME`.
    pub name: String,
    /// A partition (of the disk in `dependencies`).
    pub partition: bool,
    /// The devices it is made of (device-mapper, md), or a partition's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Vec<String>>,
    /// Where the disk is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<GuestDiskAddress>,
    /// A device-mapper name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// `guest-fstrim`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFilesystemTrimResponse {
    /// One result per disk file system.
    pub paths: Vec<GuestFilesystemTrimResult>,
}

/// One file system in `guest-fstrim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFilesystemTrimResult {
    /// Mount point.
    pub path: String,
    /// Bytes trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trimmed: Option<u64>,
    /// The minimum extent asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A PCI address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // domain:bus:slot.function.
pub struct GuestPciAddress {
    pub domain: i64,
    pub bus: i64,
    pub slot: i64,
    pub function: i64,
}

/// `guest-ssh-get-authorized-keys`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAuthorizedKeys {
    /// The keys, one per line of the file.
    pub keys: Vec<String>,
}
