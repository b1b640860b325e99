//! Where things are: the workspace, its target dir, the lab's build dir, the binaries the lab runs.
//!
//! Every location can be overridden through the environment so that a developer can point the lab at
//! another build without editing code:
//!
//! | variable            | default                                                          |
//! |---------------------|------------------------------------------------------------------|
//! | `VSTREAM_WORKSPACE` | the parent of this crate's directory                             |
//! | `CARGO_TARGET_DIR`  | `<workspace>/target`                                             |
//! | `VSTREAM_BIN_DIR`   | `<target>/debug` (where `vstreamd` and `vstreamctl` are found)   |
//! | `VSTREAM_AGENT`     | `<target>/x86_64-unknown-linux-gnu/agent/vstream-agent`          |
//! | `VSTREAM_VHOST_DEVICE_VSOCK` | `vhost-device-vsock` in `PATH`, else `$CARGO_HOME/bin` (`./x.sh setup` installs it) |

use std::env;
use std::path::{Path, PathBuf};

/// The Rust target the guest agent is built for (statically linked, see [`AGENT_RUSTFLAGS`]).
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The `RUSTFLAGS` of the static agent build.
pub const AGENT_RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// The cargo profile of the shipped agent (`[profile.agent]` in the workspace's Cargo.toml:
/// built for size, see there).
pub const AGENT_PROFILE: &str = "agent";

fn env_path(name: &str) -> Option<PathBuf> {
    env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Makes a relative path absolute against the current directory (as cargo does for `CARGO_TARGET_DIR`).
fn absolute(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    match env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path,
    }
}

/// The root of the cargo workspace.
pub fn workspace_root() -> PathBuf {
    if let Some(p) = env_path("VSTREAM_WORKSPACE") {
        return absolute(p);
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Cargo's target dir for this workspace: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    env_path("CARGO_TARGET_DIR")
        .map(absolute)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `<workspace>/build`: generated lab artefacts (guest image, accelerator verdict). Ignored by git.
pub fn build_dir() -> PathBuf {
    workspace_root().join("build")
}

/// The directory holding the host binaries (`vstreamd`, `vstreamctl`).
pub fn host_bin_dir() -> PathBuf {
    env_path("VSTREAM_BIN_DIR")
        .map(absolute)
        .unwrap_or_else(|| target_dir().join("debug"))
}

/// A host binary of the workspace, e.g. `host_bin("vstreamd")`.
pub fn host_bin(name: &str) -> PathBuf {
    host_bin_dir().join(name)
}

/// The statically linked guest agent that goes into the image.
pub fn agent_bin() -> PathBuf {
    env_path("VSTREAM_AGENT").map(absolute).unwrap_or_else(|| {
        target_dir()
            .join(AGENT_TARGET)
            .join(AGENT_PROFILE)
            .join("vstream-agent")
    })
}

/// The version of vhost-device-vsock the lab is tested with (`./x.sh setup` installs it).
pub const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";

/// rust-vmm's vhost-device-vsock, the vsock backend of [`crate::lab::LabVsock::VhostDeviceVsock`].
/// `cargo install` puts it in `$CARGO_HOME/bin`, which is not always in `PATH`.
pub fn vhost_device_vsock() -> Option<PathBuf> {
    const NAME: &str = "vhost-device-vsock";
    if let Some(p) = env_path("VSTREAM_VHOST_DEVICE_VSOCK") {
        return Some(absolute(p));
    }
    which(NAME).or_else(|| {
        let cargo_home =
            env_path("CARGO_HOME").or_else(|| env_path("HOME").map(|h| h.join(".cargo")))?;
        let candidate = cargo_home.join("bin").join(NAME);
        is_executable(&candidate).then_some(candidate)
    })
}

/// Looks a program up in `PATH` (plus the sbin directories, which a non-root `PATH` often lacks).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// True if `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
