//! The one error type of this crate.

use std::path::PathBuf;

use airlock_kms::KmsError;

/// Everything the store can fail with. No variant carries a value, a data key or any
/// other secret; record keys appear (they are not secret by contract, see the crate docs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed (I/O, corruption it detected itself).
    #[error("sled {op} failed")]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    /// The KMS could not wrap, unwrap, rewrap or rotate.
    #[error("KMS {op} failed")]
    Kms {
        op: &'static str,
        #[source]
        source: KmsError,
    },
    /// A record failed authentication: altered, truncated, copied from another key or
    /// tree, or of an unknown format. The value is never returned.
    #[error("integrity check failed for record {key} in tree {tree:?}")]
    Integrity { tree: String, key: String },
    /// The store's own metadata (wrapped data keys, store info) is damaged.
    #[error("store metadata damaged: {reason}")]
    Meta { reason: &'static str },
    /// The store was created with another KMS backend than the one configured.
    #[error("the store was created with the {stored} KMS backend, but {configured} is configured")]
    BackendMismatch { stored: String, configured: &'static str },
    /// Tree names are 1–128 bytes and may not start with `__` (reserved).
    #[error("invalid tree name {name:?}: {reason}")]
    InvalidTreeName { name: String, reason: &'static str },
    /// A JSON helper could not (de)serialize a value.
    #[error("JSON value of record {key} in tree {tree:?}")]
    Json {
        tree: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A file operation of backup or restore failed.
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The backup file is not a store backup, or is truncated or malformed.
    #[error("backup {path} is malformed: {reason}")]
    BackupFormat { path: PathBuf, reason: &'static str },
    /// The backup's MAC does not match: it was altered (or is not from this KMS).
    #[error("backup {path} failed its integrity check; nothing was restored")]
    BackupIntegrity { path: PathBuf },
    /// `restore` writes only into a missing or empty directory.
    #[error("restore target {path} is not empty; nothing was restored")]
    TargetNotEmpty { path: PathBuf },
    /// `backup` does not overwrite an existing file.
    #[error("backup file {path} already exists")]
    BackupExists { path: PathBuf },
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
}

pub(crate) fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled { op, source }
}

pub(crate) fn kms_err(op: &'static str) -> impl FnOnce(KmsError) -> StoreError {
    move |source| StoreError::Kms { op, source }
}

pub(crate) fn io_err<'a>(
    path: &'a std::path::Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { path: path.to_owned(), op, source }
}
