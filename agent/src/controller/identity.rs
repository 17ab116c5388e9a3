//! The agent's identity on disk, `<state_dir>/identity/`: its private key
//! (generated here, never sent anywhere), its client certificate, the
//! controller CA, the bundle-signing key and where the controller is.
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of
//! the directory). A renewal replaces key and certificate as a pair through
//! `*.next` files; [`Identity::load`] finishes or discards an interrupted one.
//! The key is never logged and appears in no error.

use std::{
    fmt,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// Identity failures.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file cannot be read or written.
    #[error("{op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `controller.toml` does not parse.
    #[error("{path} is not a valid controller record")]
    Record {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// `controller.toml` cannot be written.
    #[error("cannot encode the controller record")]
    Encode(#[source] toml::ser::Error),
    /// Key generation or CSR creation failed.
    #[error("cannot generate the key pair or the certificate request")]
    KeyGen(#[source] rcgen::Error),
    /// A stored key does not parse.
    #[error("the private key in {0} is unreadable")]
    BadKey(PathBuf),
    /// A certificate does not parse.
    #[error("{what} is not a PEM X.509 certificate")]
    BadCert {
        /// Which certificate.
        what: &'static str,
    },
    /// The certificate the controller returned is for another key.
    #[error("the certificate is not for this agent's key")]
    KeyMismatch,
    /// The bundle key is not base64 of 32 bytes of an Ed25519 key.
    #[error("the bundle key is not a base64 Ed25519 public key")]
    BadBundleKey,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_owned();
    move |source| IdentityError::Io { op, path, source }
}

/// Where the files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPaths {
    dir: PathBuf,
}

impl IdentityPaths {
    /// The identity directory under the agent's state directory.
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("identity") }
    }
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `key.pem` (0600).
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// `cert.pem`.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `bundle_key` (base64).
    pub fn bundle_key(&self) -> PathBuf {
        self.dir.join("bundle_key")
    }
    /// `controller.toml`: written last, so its presence means "enrolled".
    pub fn record(&self) -> PathBuf {
        self.dir.join("controller.toml")
    }
    /// `status.json`: what `run` last did with the controller (for `controller status`).
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    fn next(path: &Path) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(".next");
        PathBuf::from(s)
    }
}

/// `controller.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerRecord {
    /// The appliance id the controller assigned (certificate subject, bundle target).
    pub appliance: String,
    /// The mTLS agent listener, e.g. `https://10.90.0.1:8444`.
    pub agent_url: String,
    /// The main listener enrolled at.
    pub url: String,
    /// The pinned CA fingerprint enrolled with.
    pub ca_fingerprint: String,
    /// Unix seconds of enrollment.
    pub enrolled_at: u64,
}

/// A private key in PEM, kept out of `Debug` output.
#[derive(Clone)]
pub struct KeyPem(String);

impl KeyPem {
    /// The PEM text (for the TLS configuration only).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPem(<redacted>)")
    }
}

/// A fresh key pair and its certificate request.
#[derive(Debug)]
pub struct KeyAndCsr {
    /// The private key (PKCS#8 PEM).
    pub key: KeyPem,
    /// The CSR (PEM).
    pub csr_pem: String,
    /// The public key (DER SubjectPublicKeyInfo), to match the certificate.
    pub spki: Vec<u8>,
}

/// Generates an ECDSA P-256 key pair on this machine and a CSR for it with
/// `common_name` as subject (the controller sets the real subject).
pub fn generate(common_name: &str) -> Result<KeyAndCsr, IdentityError> {
    use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData as _, PKCS_ECDSA_P256_SHA256};
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::KeyGen)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key).map_err(IdentityError::KeyGen)?;
    Ok(KeyAndCsr {
        key: KeyPem(key.serialize_pem()),
        csr_pem: csr.pem().map_err(IdentityError::KeyGen)?,
        spki: key.subject_public_key_info(),
    })
}

/// Validity of a certificate, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validity {
    /// Not before.
    pub not_before: i64,
    /// Not after.
    pub not_after: i64,
}

/// The first certificate of a PEM text, DER.
pub fn cert_der(pem: &str, what: &'static str) -> Result<Vec<u8>, IdentityError> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|_| IdentityError::BadCert { what })
}

/// Validity and public key (DER SPKI) of a PEM certificate.
pub fn inspect(pem: &str, what: &'static str) -> Result<(Validity, Vec<u8>), IdentityError> {
    let der = cert_der(pem, what)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| IdentityError::BadCert { what })?;
    let v = cert.validity();
    Ok((
        Validity { not_before: v.not_before.timestamp(), not_after: v.not_after.timestamp() },
        cert.public_key().raw.to_vec(),
    ))
}

/// True when less than a third of the certificate's lifetime is left at
/// `now` (Unix seconds), or it has expired.
pub fn renewal_due(v: Validity, now: i64) -> bool {
    let lifetime = v.not_after.saturating_sub(v.not_before);
    let left = v.not_after.saturating_sub(now);
    lifetime <= 0 || left <= 0 || left.saturating_mul(3) < lifetime
}

/// Decodes the bundle key as the controller sends it.
pub fn parse_bundle_key(b64: &str) -> Result<VerifyingKey, IdentityError> {
    let bytes = B64.decode(b64.trim()).map_err(|_| IdentityError::BadBundleKey)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| IdentityError::BadBundleKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| IdentityError::BadBundleKey)
}

/// Everything an enrolled agent holds.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Where the controller is and who this appliance is.
    pub record: ControllerRecord,
    /// The private key.
    pub key: KeyPem,
    /// The client certificate (PEM).
    pub cert_pem: String,
    /// The controller CA (PEM): the only trust root.
    pub ca_pem: String,
    /// The controller's bundle-signing key.
    pub bundle_key: VerifyingKey,
    /// The client certificate's validity.
    pub validity: Validity,
}

/// Writes `bytes` to `path` atomically with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("cannot create", &tmp))?;
    f.write_all(bytes).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("cannot rename into", path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", dir))
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(io("cannot read", path))
}

impl Identity {
    /// True when `controller.toml` exists.
    pub fn is_enrolled(paths: &IdentityPaths) -> bool {
        paths.record().exists()
    }

    /// Loads the identity; `None` when not enrolled. Finishes (or discards)
    /// an interrupted renewal first.
    pub fn load(paths: &IdentityPaths) -> Result<Option<Self>, IdentityError> {
        if !Self::is_enrolled(paths) {
            return Ok(None);
        }
        recover_renewal(paths)?;
        let record_path = paths.record();
        let record: ControllerRecord = toml::from_str(&read(&record_path)?)
            .map_err(|source| IdentityError::Record { path: record_path, source })?;
        let key = KeyPem(read(&paths.key())?);
        let cert_pem = read(&paths.cert())?;
        let ca_pem = read(&paths.ca())?;
        let bundle_key = parse_bundle_key(&read(&paths.bundle_key())?)?;
        let (validity, spki) = inspect(&cert_pem, "cert.pem")?;
        if spki_of_key(&key, &paths.key())? != spki {
            return Err(IdentityError::KeyMismatch);
        }
        cert_der(&ca_pem, "ca.pem")?;
        Ok(Some(Self { record, key, cert_pem, ca_pem, bundle_key, validity }))
    }

    /// Writes a new identity; `controller.toml` last.
    pub fn store(&self, paths: &IdentityPaths) -> Result<(), IdentityError> {
        let dir = paths.dir();
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io("cannot restrict", dir))?;
        write_atomic(&paths.key(), self.key.expose().as_bytes(), 0o600)?;
        write_atomic(&paths.cert(), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&paths.ca(), self.ca_pem.as_bytes(), 0o644)?;
        let bk = B64.encode(self.bundle_key.as_bytes());
        write_atomic(&paths.bundle_key(), format!("{bk}\n").as_bytes(), 0o644)?;
        let record = toml::to_string(&self.record).map_err(IdentityError::Encode)?;
        write_atomic(&paths.record(), record.as_bytes(), 0o644)
    }

    /// Replaces key and certificate as a pair: both are written completely
    /// as `*.next` before either is renamed into place.
    pub fn replace_key_and_cert(
        paths: &IdentityPaths,
        key: &KeyPem,
        cert_pem: &str,
    ) -> Result<(), IdentityError> {
        let (k, c) = (paths.key(), paths.cert());
        let (kn, cn) = (IdentityPaths::next(&k), IdentityPaths::next(&c));
        write_atomic(&kn, key.expose().as_bytes(), 0o600)?;
        write_atomic(&cn, cert_pem.as_bytes(), 0o644)?;
        std::fs::rename(&kn, &k).map_err(io("cannot rename into", &k))?;
        std::fs::rename(&cn, &c).map_err(io("cannot rename into", &c))?;
        sync_dir(paths.dir())
    }
}

/// `cert.pem.next` exists only when both new files are complete: finish the
/// pair. A lone `key.pem.next` is a renewal that never completed: drop it.
fn recover_renewal(paths: &IdentityPaths) -> Result<(), IdentityError> {
    let (k, c) = (paths.key(), paths.cert());
    let (kn, cn) = (IdentityPaths::next(&k), IdentityPaths::next(&c));
    if cn.exists() {
        if kn.exists() {
            std::fs::rename(&kn, &k).map_err(io("cannot rename into", &k))?;
        }
        std::fs::rename(&cn, &c).map_err(io("cannot rename into", &c))?;
        tracing::warn!("finished an interrupted certificate renewal");
        sync_dir(paths.dir())?;
    } else if kn.exists() {
        std::fs::remove_file(&kn).map_err(io("cannot remove", &kn))?;
    }
    Ok(())
}

/// The DER SubjectPublicKeyInfo of a PEM private key.
pub fn spki_of_key(key: &KeyPem, path: &Path) -> Result<Vec<u8>, IdentityError> {
    use rcgen::PublicKeyData as _;
    rcgen::KeyPair::from_pem(key.expose())
        .map(|k| k.subject_public_key_info())
        .map_err(|_| IdentityError::BadKey(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("airlock-identity-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn renewal_is_due_in_the_last_third_and_after_expiry() {
        let v = Validity { not_before: 0, not_after: 30 * 86_400 };
        assert!(!renewal_due(v, 0));
        assert!(!renewal_due(v, 20 * 86_400)); // exactly a third left
        assert!(renewal_due(v, 20 * 86_400 + 1));
        assert!(renewal_due(v, 30 * 86_400));
        assert!(renewal_due(v, 40 * 86_400));
        // A certificate whose dates make no sense is renewed.
        assert!(renewal_due(Validity { not_before: 10, not_after: 5 }, 0));
    }

    #[test]
    fn a_generated_csr_carries_the_generated_key() {
        let k = generate("ward-3").unwrap();
        assert!(k.csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_eq!(spki_of_key(&k.key, Path::new("k")).unwrap(), k.spki);
        assert!(!format!("{:?}", k.key).contains("PRIVATE"));
        // Two keys are different keys.
        assert_ne!(generate("ward-3").unwrap().spki, k.spki);
    }

    #[test]
    fn an_interrupted_renewal_is_finished_or_dropped() {
        let dir = tempdir("renew");
        let paths = IdentityPaths::new(&dir);
        std::fs::create_dir_all(paths.dir()).unwrap();
        write_atomic(&paths.key(), b"old key", 0o600).unwrap();
        write_atomic(&paths.cert(), b"old cert", 0o644).unwrap();
        // Crashed after the key was renamed: the certificate follows.
        write_atomic(&IdentityPaths::next(&paths.cert()), b"new cert", 0o644).unwrap();
        write_atomic(&paths.key(), b"new key", 0o600).unwrap();
        recover_renewal(&paths).unwrap();
        assert_eq!(std::fs::read(paths.cert()).unwrap(), b"new cert");
        // Crashed while writing the pair: the lone new key is dropped.
        write_atomic(&IdentityPaths::next(&paths.key()), b"newer key", 0o600).unwrap();
        recover_renewal(&paths).unwrap();
        assert_eq!(std::fs::read(paths.key()).unwrap(), b"new key");
        assert!(!IdentityPaths::next(&paths.key()).exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(paths.key()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bundle_keys_must_be_32_bytes_of_base64() {
        let k = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        assert_eq!(parse_bundle_key(&B64.encode(k.as_bytes())).unwrap(), k);
        assert!(parse_bundle_key("not base64!").is_err());
        assert!(parse_bundle_key(&B64.encode([1u8; 31])).is_err());
    }
}
