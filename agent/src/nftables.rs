//! The nftables layer's slow path: hands a rendered ruleset to `nft -f -` in
//! the agent's network namespace. Used for whatever is not a pure element
//! change — the first install, a changed table shape, and the fallback when
//! the netlink element batch (`crate::nft_netlink`, the path of an ordinary
//! policy change) is refused. The text replaces the agent's own table in one
//! transaction (see `airlock_policy::nft`); nft reports errors on stderr,
//! which are returned whole. Starting nft and its cache load cost 8–15 ms
//! even for a small table, which is why element changes do not come here.

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
