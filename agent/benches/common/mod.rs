//! Shared by the benchmarks that load the programs without attaching them.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Runs `f` with a private pin directory on bpffs (`/sys/fs/bpf/airlock-bench-<name>-<pid>`)
/// and removes it afterwards, also when `f` fails.
pub fn with_scratch_pins<T>(name: &str, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let dir = PathBuf::from(format!("/sys/fs/bpf/airlock-bench-{name}-{}", std::process::id()));
    airlock_agent::dataplane::ensure_bpffs(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
