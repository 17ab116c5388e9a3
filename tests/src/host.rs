//! Host prerequisites: where the agent and controller binaries are, and a
//! mounted bpffs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{cmd, Error, Result};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The agent binary: `$AIRLOCK_AGENT_BIN`, else `<target dir>/debug/airlock-agent`.
pub fn agent_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("AIRLOCK_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("airlock-agent"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::AgentBinaryMissing { path })
    }
}

/// The controller binary: `$AIRLOCK_CONTROLLER_BIN`, else
/// `<target dir>/debug/airlock-controller`.
pub fn controller_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("AIRLOCK_CONTROLLER_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("airlock-controller"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ControllerBinaryMissing { path })
    }
}

/// The workspace root (the testbed crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$CARGO_TARGET_DIR` (relative to the workspace root) or `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

/// Mounts bpffs at /sys/fs/bpf unless one is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).map_err(|e| Error::io("creating", BPFFS, e))?;
    cmd::output(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])).map(drop)
}

/// Whether a bpffs is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.nth(1) == Some(BPFFS) && f.next() == Some("bpf")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_bin_from_env_must_exist() {
        // Only the error path: setting the variable would race other tests.
        let missing = Error::AgentBinaryMissing { path: "/nope/airlock-agent".into() };
        assert!(missing.to_string().contains("AIRLOCK_AGENT_BIN"));
        assert!(target_dir().ends_with("target") || std::env::var_os("CARGO_TARGET_DIR").is_some());
    }
}
