//! The nftables layer's applier: hands a rendered ruleset to `nft -f -` in the
//! agent's network namespace. The text replaces the agent's own table in one
//! transaction (see `airlock_policy::nft`); nft reports errors on stderr,
//! which are returned whole.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

/// nft failures.
#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    /// nft could not be started.
    #[error("cannot run nft (install nftables)")]
    Spawn(#[source] std::io::Error),
    /// nft refused the ruleset; nothing was changed (one transaction).
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// True when the table `inet <name>` exists in this network namespace.
pub fn table_exists(name: &str) -> bool {
    Command::new("nft").args(["list", "tables", "inet"]).output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == format!("table inet {name}"))
    })
}

/// Applies `ruleset` atomically.
pub fn apply(ruleset: &str) -> Result<(), NftablesError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftablesError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).map_err(NftablesError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftablesError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftablesError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}
