//! Key-encryption keys (KEKs) for Airlock's encrypted store.
//!
//! The store encrypts every value with a data key (DEK) per tree; this crate keeps the
//! key that encrypts those data keys. One object-safe, synchronous trait, [`Kms`], and
//! three backends:
//!
//! | backend | where the KEK lives | restart needs |
//! |---|---|---|
//! | [`BuiltinKms`] (embedded default) | a local key file: a `0600` keyfile, or the same content sealed under Argon2id(passphrase) + XChaCha20-Poly1305 | keyfile: nothing; passphrase: the operator |
//! | [`Pkcs11Kms`] | AES-256 key objects inside a PKCS#11 token (an HSM; SoftHSM2 in tests); wrapping is AES-GCM inside the token | the user PIN |
//! | [`VaultTransitKms`] | HashiCorp Vault's Transit engine (recommended), over its HTTP API | a Vault token |
//!
//! ```text
//!   store ──wrap(dek, context)──▶ Kms ──▶ WrappedKey { kek_version, ciphertext }  (kept in the store)
//!   store ◀─unwrap(wrapped, ctx)── Kms      rotate(): new KEK version, older ones still unwrap
//!                                           rewrap(): re-encrypt under the newest version
//! ```
//!
//! `context` is associated data: a key wrapped for one context does not unwrap under
//! another (the store passes the tree name, so wrapped keys cannot be swapped between
//! trees). Every backend authenticates it: AEAD associated data for built-in and PKCS#11,
//! a derived key per context for Vault when the Transit key is `derived`.
//!
//! The built-in trade-off: a keyfile lets the controller restart unattended, but anyone
//! who can read the file (root, a stolen disk or backup of it) has the KEK; a passphrase
//! keeps the KEK off the disk in the clear, at the price of an operator typing it at every
//! start. PKCS#11 and Vault keep the KEK off the machine altogether.
//!
//! What this crate is not: it does not encrypt records (that is `airlock-store`), it does
//! no caching of unwrapped keys, and it never logs or prints key material, passphrases,
//! PINs or tokens (errors name files, versions and backends only).

mod builtin;
mod error;
mod pkcs11;
mod vault;

use std::{path::PathBuf, sync::Arc};

pub use secrecy::{ExposeSecret, SecretString};
pub use zeroize::Zeroizing;

pub use builtin::{BuiltinKms, KdfParams, Protection};
pub use error::KmsError;
pub use pkcs11::{Pkcs11Config, Pkcs11Kms};
pub use vault::{VaultTransitConfig, VaultTransitKms};

/// A key-encryption-key service. Implementations are cheap to share (`Arc<dyn Kms>`)
/// and safe to call from many threads.
pub trait Kms: Send + Sync + std::fmt::Debug {
    /// `"builtin"`, `"pkcs11"` or `"vault-transit"`.
    fn backend(&self) -> &'static str;
    /// Encrypts `dek` under the newest KEK version, binding `context`.
    fn wrap(&self, dek: &[u8], context: &[u8]) -> Result<WrappedKey, KmsError>;
    /// Decrypts a wrapped key made by [`Kms::wrap`] or [`Kms::rewrap`] with the same
    /// `context`, under whichever (still available) version wrapped it.
    fn unwrap(&self, wrapped: &WrappedKey, context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError>;
    /// Creates a new KEK version and returns its number; older versions stay
    /// available for `unwrap` and `rewrap`.
    fn rotate(&self) -> Result<u32, KmsError>;
    /// Re-encrypts a wrapped key under the newest KEK version. The default unwraps and
    /// wraps again in this process; Vault does it server-side.
    fn rewrap(&self, wrapped: &WrappedKey, context: &[u8]) -> Result<WrappedKey, KmsError> {
        let dek = self.unwrap(wrapped, context)?;
        self.wrap(&dek, context)
    }
    /// The version `wrap` uses now.
    fn current_version(&self) -> Result<u32, KmsError>;
}

/// A data key encrypted by a KMS: the KEK version that did it and the backend's
/// ciphertext (opaque outside the backend; for Vault it is the `vault:vN:…` string).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    pub kek_version: u32,
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("kek_version", &self.kek_version)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// Which backend to use and where it is; secrets (passphrase, PIN, token) are passed
/// separately to [`open`], never kept in configuration files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KmsConfig {
    /// The embedded default: a local key file.
    Builtin {
        key_file: PathBuf,
        /// `keyfile` (unattended restarts) or `passphrase` (operator at each start).
        #[serde(default)]
        protection: BuiltinProtection,
    },
    Pkcs11(Pkcs11Config),
    VaultTransit(VaultTransitConfig),
}

/// How the built-in key file is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinProtection {
    #[default]
    Keyfile,
    Passphrase,
}

/// Opens (or, for the built-in backend and a missing Vault key, creates) the configured
/// backend. `secret` is the passphrase, PKCS#11 user PIN or Vault token; the built-in
/// keyfile needs none.
pub fn open(config: &KmsConfig, secret: Option<&SecretString>) -> Result<Arc<dyn Kms>, KmsError> {
    Ok(match config {
        KmsConfig::Builtin { key_file, protection: BuiltinProtection::Keyfile } => {
            Arc::new(BuiltinKms::open_or_create(key_file, Protection::Keyfile)?)
        }
        KmsConfig::Builtin { key_file, protection: BuiltinProtection::Passphrase } => {
            let pass = secret.ok_or(KmsError::MissingSecret {
                backend: "builtin",
                what: "the key file's passphrase",
            })?;
            Arc::new(BuiltinKms::open_or_create(key_file, Protection::Passphrase(pass))?)
        }
        KmsConfig::Pkcs11(cfg) => {
            let pin = secret.ok_or(KmsError::MissingSecret {
                backend: "pkcs11",
                what: "the token's user PIN",
            })?;
            Arc::new(Pkcs11Kms::open(cfg, pin)?)
        }
        KmsConfig::VaultTransit(cfg) => {
            let token = secret.ok_or(KmsError::MissingSecret {
                backend: "vault-transit",
                what: "a Vault token",
            })?;
            Arc::new(VaultTransitKms::connect(cfg.clone(), token.clone())?)
        }
    })
}

/// Random bytes from the operating system.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], KmsError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(KmsError::Random)?;
    Ok(buf)
}

/// Base64 (standard, padded) for byte fields in JSON.
pub(crate) mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}
