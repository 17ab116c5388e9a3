//! The last-known-good state, kept on the appliance so that a restart (or a
//! reboot, or an unreachable controller) enforces the last policy applied.
//!
//! What is kept is the validated policy itself, not compiled entries: policy
//! expiries are wall-clock times, and the monotonic instants the kernel checks
//! do not survive a reboot. At start the agent compiles it anew against the
//! clocks of that moment. Behind [`StateStore`] so that the controller issue
//! can put encryption at rest under it.

use std::path::{Path, PathBuf};

use airlock_policy::Policy;
use serde::{Deserialize, Serialize};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be opened (another process may hold it).
    #[error("cannot open the state store at {path} (is another airlock-agent using it?)")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// Reading or writing failed.
    #[error("state store {op} failed")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// The stored record does not decode: nothing from it is applied.
    #[error("the stored last-known-good policy is unreadable; nothing from it is applied")]
    Corrupt(#[source] serde_json::Error),
    /// Encoding failed.
    #[error("cannot encode the last-known-good policy")]
    Encode(#[source] serde_json::Error),
}

/// What is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastKnownGood {
    /// Record format.
    pub format: u32,
    /// The appliance of the policy this agent enforces.
    pub appliance: String,
    /// The policy as validated.
    pub policy: Policy,
    /// When it was applied, Unix seconds.
    pub applied_at: u64,
}

/// Where the last-known-good state lives.
pub trait StateStore {
    /// The stored state, if any.
    fn load(&self) -> Result<Option<LastKnownGood>, StoreError>;
    /// Replaces the stored state; durable when it returns.
    fn save(&self, lkg: &LastKnownGood) -> Result<(), StoreError>;
}

/// The sled implementation (plaintext until the controller issue adds
/// envelope encryption with a KMS-held key).
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
}

const KEY: &[u8] = b"last_known_good";

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db =
            sled::open(dir).map_err(|source| StoreError::Open { path: dir.to_owned(), source })?;
        Ok(Self { db })
    }
}

impl StateStore for SledStore {
    fn load(&self) -> Result<Option<LastKnownGood>, StoreError> {
        match self.db.get(KEY).map_err(|source| StoreError::Io { op: "read", source })? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(StoreError::Corrupt),
        }
    }

    fn save(&self, lkg: &LastKnownGood) -> Result<(), StoreError> {
        let v = serde_json::to_vec(lkg).map_err(StoreError::Encode)?;
        self.db.insert(KEY, v).map_err(|source| StoreError::Io { op: "write", source })?;
        self.db.flush().map_err(|source| StoreError::Io { op: "flush", source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_durably_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("airlock-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = include_str!("../../policies/lab.toml");
        let (policy, _) = airlock_policy::check_toml(text).unwrap();
        let lkg =
            LastKnownGood { format: 1, appliance: "lab-appliance".into(), policy, applied_at: 7 };
        {
            let s = SledStore::open(&dir).unwrap();
            assert_eq!(s.load().unwrap(), None);
            s.save(&lkg).unwrap();
        }
        let s = SledStore::open(&dir).unwrap();
        assert_eq!(s.load().unwrap(), Some(lkg));
        s.db.insert(KEY, b"{not json".to_vec()).unwrap();
        assert!(matches!(s.load(), Err(StoreError::Corrupt(_))));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
