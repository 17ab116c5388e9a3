//! The last-known-good state, kept on the appliance so that a restart (or a
//! reboot, or an unreachable controller) enforces the last policy applied.
//!
//! What is kept is the desired state in wall-clock form, never compiled
//! entries (the monotonic instants the kernel checks do not survive a
//! reboot): either a validated local policy file or the controller's signed
//! bundle with the key it was verified with — whichever was applied last. At
//! start the agent compiles or localizes it anew against the clocks of that
//! moment (a bundle's signature is checked again first). Behind
//! [`StateStore`] so that encryption at rest can go under it.

use std::path::{Path, PathBuf};

use airlock_policy::Policy;
use airlock_proto::SignedBundle;
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
    #[error("the stored last-known-good state is unreadable; nothing from it is applied")]
    Corrupt(#[source] serde_json::Error),
    /// Encoding failed.
    #[error("cannot encode the last-known-good state")]
    Encode(#[source] serde_json::Error),
}

/// A local policy applied last (`policy apply`).
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

/// A controller bundle applied last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    /// Record format.
    pub format: u32,
    /// The appliance id the bundle was verified for.
    pub appliance: String,
    /// The bundle exactly as received (signature included).
    pub bundle: SignedBundle,
    /// The controller's bundle key it verified with (base64 Ed25519).
    pub bundle_key: String,
    /// When it was applied, Unix seconds.
    pub applied_at: u64,
}

/// What is kept: whichever was applied last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stored {
    /// A local policy file (a record with a `policy` field).
    Policy(LastKnownGood),
    /// A controller bundle (a record with a `bundle` field).
    Bundle(BundleRecord),
}

impl Stored {
    /// The appliance it was applied for.
    pub fn appliance(&self) -> &str {
        match self {
            Stored::Policy(l) => &l.appliance,
            Stored::Bundle(b) => &b.appliance,
        }
    }

    /// The bundle version, when a controller bundle was applied last.
    pub fn bundle_version(&self) -> Option<u64> {
        match self {
            Stored::Bundle(b) => Some(b.bundle.version),
            Stored::Policy(_) => None,
        }
    }
}

/// Where the last-known-good state lives.
pub trait StateStore {
    /// The stored state, if any.
    fn load_state(&self) -> Result<Option<Stored>, StoreError>;
    /// Replaces the stored state; durable when it returns.
    fn save_state(&self, state: &Stored) -> Result<(), StoreError>;

    /// The stored local policy, if that is what was applied last.
    fn load(&self) -> Result<Option<LastKnownGood>, StoreError> {
        Ok(match self.load_state()? {
            Some(Stored::Policy(l)) => Some(l),
            _ => None,
        })
    }
    /// Keeps a local policy as the state applied last.
    fn save(&self, lkg: &LastKnownGood) -> Result<(), StoreError> {
        self.save_state(&Stored::Policy(lkg.clone()))
    }
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
    fn load_state(&self) -> Result<Option<Stored>, StoreError> {
        match self.db.get(KEY).map_err(|source| StoreError::Io { op: "read", source })? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(StoreError::Corrupt),
        }
    }

    fn save_state(&self, state: &Stored) -> Result<(), StoreError> {
        let v = serde_json::to_vec(state).map_err(StoreError::Encode)?;
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

    #[test]
    fn records_written_before_bundles_existed_still_load() {
        let text = include_str!("../../policies/lab.toml");
        let (policy, _) = airlock_policy::check_toml(text).unwrap();
        let old = serde_json::json!({
            "format": 1, "appliance": "lab-appliance", "policy": policy, "applied_at": 7
        });
        let lkg =
            LastKnownGood { format: 1, appliance: "lab-appliance".into(), policy, applied_at: 7 };
        let back: Stored = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(back, Stored::Policy(lkg));
        assert_eq!(serde_json::to_value(&back).unwrap(), old);
        assert_eq!(back.bundle_version(), None);
    }

    #[test]
    fn the_newest_applied_wins_bundle_or_policy() {
        let dir = std::env::temp_dir().join(format!("airlock-store-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let signed = airlock_proto::PolicyBundle {
            format: airlock_proto::BUNDLE_FORMAT,
            appliance: "ward-3".into(),
            version: 12,
            policy_version: 4,
            issued_at: 1_800_000_000,
            entries: vec![],
        }
        .sign(&key);
        let bundle = Stored::Bundle(BundleRecord {
            format: 1,
            appliance: "ward-3".into(),
            bundle: signed,
            bundle_key: "a2V5".into(),
            applied_at: 8,
        });
        let (policy, _) =
            airlock_policy::check_toml(include_str!("../../policies/lab.toml")).unwrap();
        let local =
            LastKnownGood { format: 1, appliance: "lab-appliance".into(), policy, applied_at: 9 };
        let s = SledStore::open(&dir).unwrap();
        s.save(&local).unwrap();
        s.save_state(&bundle).unwrap();
        assert_eq!(s.load_state().unwrap(), Some(bundle.clone()));
        assert_eq!(s.load_state().unwrap().and_then(|b| b.bundle_version()), Some(12));
        // A policy reader sees no local policy while a bundle is in force.
        assert_eq!(s.load().unwrap(), None);
        s.save(&local).unwrap();
        assert_eq!(s.load_state().unwrap(), Some(Stored::Policy(local.clone())));
        assert_eq!(s.load().unwrap(), Some(local));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
