//! The built-in backend: KEK versions in a local key file.
//!
//! The file is JSON. With [`Protection::Keyfile`] it holds the versions themselves and
//! must be mode `0600` (anything group- or world-accessible is refused). With
//! [`Protection::Passphrase`] it holds them sealed: XChaCha20-Poly1305 under a key that
//! Argon2id derives from the passphrase, with the KDF parameters as associated data.
//! Rotation appends a version and replaces the file atomically (temporary file, fsync,
//! rename, fsync of the directory): a crash leaves the old or the new file, never half.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::RwLock,
    time::{SystemTime, UNIX_EPOCH},
};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{b64, random, Kms, KmsError, WrappedKey};

const BACKEND: &str = "builtin";
const FORMAT: &str = "airlock-builtin-kek";
const FILE_VERSION: u32 = 1;
const WRAP_AD: &[u8] = b"airlock-kms/builtin/wrap/v1";
const SEAL_AD: &[u8] = b"airlock-kms/builtin/seal/v1";
const NONCE_LEN: usize = 24;

/// How the key file is protected.
#[derive(Clone, Copy)]
pub enum Protection<'a> {
    /// The KEKs in the clear in a `0600` file: unattended restarts; whoever reads the file
    /// (root, the disk, a copy of it) has the KEKs.
    Keyfile,
    /// The KEKs sealed under Argon2id(passphrase): nothing usable on disk, but an operator
    /// must give the passphrase at every start.
    Passphrase(&'a SecretString),
}

impl std::fmt::Debug for Protection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Protection<'_> {
    fn name(&self) -> &'static str {
        match self {
            Protection::Keyfile => "keyfile",
            Protection::Passphrase(_) => "passphrase",
        }
    }
}

/// Argon2id cost parameters, stored in the key file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// RFC 9106's second recommended option: 64 MiB, 3 passes, 4 lanes.
    fn default() -> Self {
        KdfParams { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 4 }
    }
}

/// The built-in KMS. See the crate docs for the keyfile/passphrase trade-off.
pub struct BuiltinKms {
    path: PathBuf,
    seal: Seal,
    keys: RwLock<Vec<KekVersion>>,
}

enum Seal {
    Keyfile,
    Passphrase { kdf: KdfHeader, key: Zeroizing<[u8; 32]> },
}

impl std::fmt::Debug for BuiltinKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seal = match self.seal {
            Seal::Keyfile => "keyfile",
            Seal::Passphrase { .. } => "passphrase",
        };
        f.debug_struct("BuiltinKms").field("path", &self.path).field("protection", &seal).finish()
    }
}

#[derive(Serialize, Deserialize)]
struct KekVersion {
    version: u32,
    created_unix: u64,
    #[serde(with = "b64")]
    key: Vec<u8>,
}

impl Drop for KekVersion {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KdfHeader {
    algorithm: String,
    #[serde(flatten)]
    params: KdfParams,
    #[serde(with = "b64")]
    salt: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "protection", rename_all = "kebab-case")]
enum FileBody {
    Keyfile {
        keys: Vec<KekVersion>,
    },
    Passphrase {
        kdf: KdfHeader,
        #[serde(with = "b64")]
        nonce: Vec<u8>,
        #[serde(with = "b64")]
        sealed: Vec<u8>,
    },
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    version: u32,
    #[serde(flatten)]
    body: FileBody,
}

impl BuiltinKms {
    /// Creates a new key file with one KEK version; refuses to overwrite an existing file.
    pub fn create(path: &Path, protection: Protection<'_>) -> Result<Self, KmsError> {
        Self::create_with_params(path, protection, KdfParams::default())
    }

    /// [`BuiltinKms::create`] with explicit Argon2id costs (only used with a passphrase).
    pub fn create_with_params(
        path: &Path,
        protection: Protection<'_>,
        params: KdfParams,
    ) -> Result<Self, KmsError> {
        if path.exists() {
            return Err(KmsError::AlreadyExists { path: path.to_owned() });
        }
        let seal = match protection {
            Protection::Keyfile => Seal::Keyfile,
            Protection::Passphrase(pass) => {
                let kdf = KdfHeader {
                    algorithm: "argon2id".into(),
                    params,
                    salt: random::<16>()?.to_vec(),
                };
                let key = derive(pass, &kdf)?;
                Seal::Passphrase { kdf, key }
            }
        };
        let first = new_version(1)?;
        let kms = BuiltinKms { path: path.to_owned(), seal, keys: RwLock::new(vec![first]) };
        kms.persist(&read(&kms.keys))?;
        tracing::info!(path = %path.display(), protection = protection.name(), "created built-in KEK file");
        Ok(kms)
    }

    /// Opens an existing key file.
    pub fn open(path: &Path, protection: Protection<'_>) -> Result<Self, KmsError> {
        let meta = fs::metadata(path).map_err(io(path, "stat"))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KmsError::InsecurePermissions { path: path.to_owned(), mode });
        }
        let text = Zeroizing::new(fs::read(path).map_err(io(path, "read"))?);
        let file: KeyFile = serde_json::from_slice(&text)
            .map_err(|source| KmsError::KeyFileJson { path: path.to_owned(), source })?;
        if file.format != FORMAT || file.version != FILE_VERSION {
            return Err(KmsError::KeyFileFormat {
                path: path.to_owned(),
                reason: "not an airlock built-in KEK file of a known version",
            });
        }
        let (seal, keys) = match (file.body, protection) {
            (FileBody::Keyfile { keys }, Protection::Keyfile) => (Seal::Keyfile, keys),
            (FileBody::Passphrase { kdf, nonce, sealed }, Protection::Passphrase(pass)) => {
                if kdf.algorithm != "argon2id" || nonce.len() != NONCE_LEN {
                    return Err(KmsError::KeyFileFormat {
                        path: path.to_owned(),
                        reason: "unknown key derivation or nonce size",
                    });
                }
                let key = derive(pass, &kdf)?;
                let plain = XChaCha20Poly1305::new((&*key).into())
                    .decrypt(
                        XNonce::from_slice(&nonce),
                        Payload { msg: &sealed, aad: &seal_ad(&kdf)? },
                    )
                    .map(Zeroizing::new)
                    .map_err(|_| KmsError::WrongPassphrase { path: path.to_owned() })?;
                let keys: Vec<KekVersion> = serde_json::from_slice(&plain)
                    .map_err(|source| KmsError::KeyFileJson { path: path.to_owned(), source })?;
                (Seal::Passphrase { kdf, key }, keys)
            }
            (body, expected) => {
                let found = match body {
                    FileBody::Keyfile { .. } => "a keyfile",
                    FileBody::Passphrase { .. } => "a passphrase",
                };
                return Err(KmsError::ProtectionMismatch {
                    path: path.to_owned(),
                    found,
                    expected: expected.name(),
                });
            }
        };
        let sane = !keys.is_empty()
            && keys.iter().all(|k| k.key.len() == 32)
            && keys.windows(2).all(|w| w[0].version < w[1].version);
        if !sane {
            return Err(KmsError::KeyFileFormat {
                path: path.to_owned(),
                reason: "key versions missing, unordered or of the wrong size",
            });
        }
        Ok(BuiltinKms { path: path.to_owned(), seal, keys: RwLock::new(keys) })
    }

    /// Opens the key file, or creates it when it does not exist (first start).
    pub fn open_or_create(path: &Path, protection: Protection<'_>) -> Result<Self, KmsError> {
        if path.exists() {
            Self::open(path, protection)
        } else {
            Self::create(path, protection)
        }
    }

    /// The KEK versions in the file, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        read(&self.keys).iter().map(|k| k.version).collect()
    }

    /// Destroys every KEK version older than `min_version` (after a rotation and a
    /// rewrap of everything they protected). Backups wrapped under a retired version can
    /// no longer be restored.
    pub fn retire_before(&self, min_version: u32) -> Result<usize, KmsError> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let newest = keys.last().map_or(0, |k| k.version);
        let keep = min_version.min(newest);
        let before = keys.len();
        let kept: Vec<KekVersion> = keys
            .iter()
            .filter(|k| k.version >= keep)
            .map(|k| KekVersion {
                version: k.version,
                created_unix: k.created_unix,
                key: k.key.clone(),
            })
            .collect();
        self.persist(&kept)?;
        *keys = kept;
        Ok(before - keys.len())
    }

    fn persist(&self, keys: &[KekVersion]) -> Result<(), KmsError> {
        let body = match &self.seal {
            Seal::Keyfile => FileBody::Keyfile {
                keys: keys
                    .iter()
                    .map(|k| KekVersion {
                        version: k.version,
                        created_unix: k.created_unix,
                        key: k.key.clone(),
                    })
                    .collect(),
            },
            Seal::Passphrase { kdf, key } => {
                let plain =
                    Zeroizing::new(serde_json::to_vec(keys).map_err(|source| {
                        KmsError::KeyFileJson { path: self.path.clone(), source }
                    })?);
                let nonce = random::<NONCE_LEN>()?;
                let sealed = XChaCha20Poly1305::new((&**key).into())
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload { msg: &plain, aad: &seal_ad(kdf)? },
                    )
                    .map_err(|_| KmsError::KeyFileFormat {
                        path: self.path.clone(),
                        reason: "sealing failed",
                    })?;
                FileBody::Passphrase { kdf: kdf.clone(), nonce: nonce.to_vec(), sealed }
            }
        };
        let file = KeyFile { format: FORMAT.into(), version: FILE_VERSION, body };
        let text = Zeroizing::new(
            serde_json::to_vec_pretty(&file)
                .map_err(|source| KmsError::KeyFileJson { path: self.path.clone(), source })?,
        );
        write_atomically(&self.path, &text)
    }

    fn key(&self, version: u32) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let keys = read(&self.keys);
        let k = keys
            .iter()
            .find(|k| k.version == version)
            .ok_or(KmsError::UnknownVersion { backend: BACKEND, version })?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&k.key);
        Ok(out)
    }
}

impl Kms for BuiltinKms {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn wrap(&self, dek: &[u8], context: &[u8]) -> Result<WrappedKey, KmsError> {
        let version = self.current_version()?;
        let key = self.key(version)?;
        let nonce = random::<NONCE_LEN>()?;
        let ct = XChaCha20Poly1305::new((&*key).into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload { msg: dek, aad: &wrap_ad(version, context) },
            )
            .map_err(|_| KmsError::MalformedWrappedKey {
                backend: BACKEND,
                reason: "encryption failed",
            })?;
        let mut ciphertext = nonce.to_vec();
        ciphertext.extend_from_slice(&ct);
        Ok(WrappedKey { kek_version: version, ciphertext })
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let version = wrapped.kek_version;
        if wrapped.ciphertext.len() < NONCE_LEN + 16 {
            return Err(KmsError::MalformedWrappedKey { backend: BACKEND, reason: "too short" });
        }
        let key = self.key(version)?;
        let (nonce, ct) = wrapped.ciphertext.split_at(NONCE_LEN);
        XChaCha20Poly1305::new((&*key).into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload { msg: ct, aad: &wrap_ad(version, context) },
            )
            .map(Zeroizing::new)
            .map_err(|_| KmsError::UnwrapFailed { backend: BACKEND, version })
    }

    fn rotate(&self) -> Result<u32, KmsError> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let next = keys.last().map_or(1, |k| k.version + 1);
        let mut all: Vec<KekVersion> = keys
            .iter()
            .map(|k| KekVersion {
                version: k.version,
                created_unix: k.created_unix,
                key: k.key.clone(),
            })
            .collect();
        all.push(new_version(next)?);
        self.persist(&all)?;
        *keys = all;
        tracing::info!(path = %self.path.display(), kek_version = next, "rotated built-in KEK");
        Ok(next)
    }

    fn current_version(&self) -> Result<u32, KmsError> {
        read(&self.keys)
            .last()
            .map(|k| k.version)
            .ok_or(KmsError::UnknownVersion { backend: BACKEND, version: 0 })
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn new_version(version: u32) -> Result<KekVersion, KmsError> {
    let created_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(KekVersion { version, created_unix, key: random::<32>()?.to_vec() })
}

fn derive(pass: &SecretString, kdf: &KdfHeader) -> Result<Zeroizing<[u8; 32]>, KmsError> {
    let p = kdf.params;
    let params = Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32)).map_err(KmsError::Kdf)?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(pass.expose_secret().as_bytes(), &kdf.salt, &mut *out)
        .map_err(KmsError::Kdf)?;
    Ok(out)
}

fn seal_ad(kdf: &KdfHeader) -> Result<Vec<u8>, KmsError> {
    let mut ad = SEAL_AD.to_vec();
    ad.extend_from_slice(
        &serde_json::to_vec(kdf)
            .map_err(|source| KmsError::KeyFileJson { path: PathBuf::new(), source })?,
    );
    Ok(ad)
}

fn wrap_ad(version: u32, context: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(WRAP_AD.len() + 4 + context.len());
    ad.extend_from_slice(WRAP_AD);
    ad.extend_from_slice(&version.to_be_bytes());
    ad.extend_from_slice(context);
    ad
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> KmsError + 'a {
    move |source| KmsError::Io { path: path.to_owned(), op, source }
}

/// Writes `path` atomically with mode 0600: a temporary file beside it, fsync, rename,
/// fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KmsError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp, "create"))?;
    // An old temporary file may carry a wider mode: narrow it before writing.
    f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io(&tmp, "chmod"))?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_all().map_err(io(&tmp, "fsync"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path, "rename"))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "fsync directory"))?;
    Ok(())
}
