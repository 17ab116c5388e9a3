//! The one error type of this crate.

use std::path::PathBuf;

/// Everything a KMS backend can fail with. No variant carries key material, a
/// passphrase, a PIN or a token; `Display` never prints a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// Reading or writing the built-in key file (or its directory) failed.
    #[error("key file {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A keyfile-protected key file that group or others could read is refused.
    #[error(
        "key file {path} has mode {mode:04o}: group or others can access it; \
         run `chmod 600 {path}` (and check who else could have read it)"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// `create` found a key file already there (it never overwrites one).
    #[error("key file {path} already exists; open it instead of creating a new one")]
    AlreadyExists { path: PathBuf },
    /// The key file is not in the expected format.
    #[error("key file {path} is malformed: {reason}")]
    KeyFileFormat { path: PathBuf, reason: &'static str },
    /// The key file's JSON did not parse.
    #[error("key file {path} is malformed")]
    KeyFileJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The key file is sealed with a passphrase but the caller asked for a plain
    /// keyfile, or the other way round.
    #[error("key file {path} is protected by {found}, but {expected} was configured")]
    ProtectionMismatch { path: PathBuf, found: &'static str, expected: &'static str },
    /// The passphrase did not open the sealed key file (wrong passphrase, or the
    /// file was altered: both look the same to an AEAD).
    #[error("wrong passphrase for key file {path} (or the file was altered)")]
    WrongPassphrase { path: PathBuf },
    /// Argon2id rejected its parameters.
    #[error("passphrase key derivation failed: {0}")]
    Kdf(argon2::Error),
    /// A wrapped key names a KEK version this backend does not have (never
    /// created, or retired).
    #[error("{backend}: no key-encryption key version {version}")]
    UnknownVersion { backend: &'static str, version: u32 },
    /// A wrapped key did not authenticate: altered ciphertext, wrong context, or
    /// a different key.
    #[error("{backend}: wrapped key (KEK version {version}) failed authentication")]
    UnwrapFailed { backend: &'static str, version: u32 },
    /// A wrapped key is too short or otherwise not what this backend produces.
    #[error("{backend}: malformed wrapped key: {reason}")]
    MalformedWrappedKey { backend: &'static str, reason: &'static str },
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {op} failed")]
    Pkcs11 {
        op: &'static str,
        #[source]
        source: cryptoki::error::Error,
    },
    /// No slot holds a token with the configured label.
    #[error("PKCS#11: no token labelled {label:?} in module {module}")]
    TokenNotFound { label: String, module: PathBuf },
    /// The HTTP exchange with Vault failed (connection, TLS, timeout, body).
    #[error("Vault {op}: request failed")]
    Http {
        op: &'static str,
        #[source]
        source: Box<ureq::Error>,
    },
    /// Vault answered with an error status; `errors` is Vault's own list.
    #[error("Vault {op}: HTTP {status}: {}", errors.join("; "))]
    Vault { op: &'static str, status: u16, errors: Vec<String> },
    /// Vault answered 2xx with a body this client does not understand.
    #[error("Vault {op}: unexpected response: {reason}")]
    VaultResponse { op: &'static str, reason: &'static str },
    /// Reading the configured CA file for Vault's TLS failed.
    #[error("Vault CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend needs a secret (passphrase, PIN, token) that was not given.
    #[error("the {backend} KMS backend needs {what}")]
    MissingSecret { backend: &'static str, what: &'static str },
}
