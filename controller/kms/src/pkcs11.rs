//! The PKCS#11 backend: the KEK is an AES-256 secret-key object inside a token, and
//! wrapping is AES-GCM performed by the token; the key never leaves it (it is created
//! sensitive and non-extractable).
//!
//! Version `N` is the object labelled `<key_label>-v<N>` (e.g. `airlock-kek-v3`);
//! [`Kms::rotate`] generates the next one. Older objects stay for `unwrap`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{aead::GcmParams, Mechanism},
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{random, Kms, KmsError, WrappedKey};

const BACKEND: &str = "pkcs11";
const IV_LEN: usize = 12;
const AAD_PREFIX: &[u8] = b"airlock-kms/pkcs11/wrap/v1";

/// Where the KEK lives. The user PIN is passed separately (configuration or the
/// environment), never stored here and never logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token holding the KEK.
    pub token_label: String,
    /// Prefix of the KEK objects' labels; version N is `<key_label>-v<N>`.
    #[serde(default = "default_key_label")]
    pub key_label: String,
}

fn default_key_label() -> String {
    "airlock-kek".into()
}

/// A logged-in session on the token and the KEK objects found in it.
pub struct Pkcs11Kms {
    key_label: String,
    token_label: String,
    inner: Mutex<Inner>,
    // Keeps the module loaded for as long as the session lives.
    _ctx: Pkcs11,
}

struct Inner {
    session: Session,
    versions: BTreeMap<u32, ObjectHandle>,
}

impl std::fmt::Debug for Pkcs11Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Kms")
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .finish()
    }
}

fn ck(op: &'static str) -> impl FnOnce(CkError) -> KmsError {
    move |source| KmsError::Pkcs11 { op, source }
}

impl Pkcs11Kms {
    /// Loads the module, logs in to the token labelled `token_label` as the user and
    /// finds the KEK versions; generates version 1 if the token has none yet.
    pub fn open(config: &Pkcs11Config, pin: &SecretString) -> Result<Self, KmsError> {
        let ctx = Pkcs11::new(&config.module).map_err(ck("load module"))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another handle in this process initialized the module already.
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck("C_Initialize")(e)),
        }
        let mut slot = None;
        for s in ctx.get_slots_with_initialized_token().map_err(ck("C_GetSlotList"))? {
            let info = ctx.get_token_info(s).map_err(ck("C_GetTokenInfo"))?;
            if info.label().trim_end() == config.token_label {
                slot = Some(s);
                break;
            }
        }
        let slot = slot.ok_or_else(|| KmsError::TokenNotFound {
            label: config.token_label.clone(),
            module: config.module.clone(),
        })?;
        let session = ctx.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
        match session.login(UserType::User, Some(pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(ck("C_Login")(e)),
        }
        let kms = Pkcs11Kms {
            key_label: config.key_label.clone(),
            token_label: config.token_label.clone(),
            inner: Mutex::new(Inner { session, versions: BTreeMap::new() }),
            _ctx: ctx,
        };
        {
            let mut inner = kms.lock();
            inner.versions = kms.find_versions(&inner.session)?;
            if inner.versions.is_empty() {
                let handle = kms.generate(&inner.session, 1)?;
                inner.versions.insert(1, handle);
                tracing::info!(token = %kms.token_label, label = %kms.object_label(1), "generated PKCS#11 KEK");
            }
        }
        Ok(kms)
    }

    /// The KEK versions present in the token, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        self.lock().versions.keys().copied().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn object_label(&self, version: u32) -> String {
        format!("{}-v{version}", self.key_label)
    }

    fn find_versions(&self, session: &Session) -> Result<BTreeMap<u32, ObjectHandle>, KmsError> {
        let template =
            [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES)];
        let prefix = format!("{}-v", self.key_label);
        let mut out = BTreeMap::new();
        for handle in session.find_objects(&template).map_err(ck("C_FindObjects"))? {
            let attrs = session
                .get_attributes(handle, &[AttributeType::Label])
                .map_err(ck("C_GetAttributeValue"))?;
            for attr in attrs {
                if let Attribute::Label(label) = attr {
                    let version = std::str::from_utf8(&label)
                        .ok()
                        .and_then(|l| l.strip_prefix(&prefix))
                        .and_then(|v| v.parse::<u32>().ok());
                    if let Some(v) = version {
                        out.insert(v, handle);
                    }
                }
            }
        }
        Ok(out)
    }

    fn generate(&self, session: &Session, version: u32) -> Result<ObjectHandle, KmsError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(self.object_label(version).into_bytes()),
        ];
        session.generate_key(&Mechanism::AesKeyGen, &template).map_err(ck("C_GenerateKey"))
    }
}

fn aad(version: u32, context: &[u8]) -> Vec<u8> {
    let mut ad = AAD_PREFIX.to_vec();
    ad.extend_from_slice(&version.to_be_bytes());
    ad.extend_from_slice(context);
    ad
}

impl Kms for Pkcs11Kms {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn wrap(&self, dek: &[u8], context: &[u8]) -> Result<WrappedKey, KmsError> {
        let inner = self.lock();
        let (&version, &key) = inner
            .versions
            .last_key_value()
            .ok_or(KmsError::UnknownVersion { backend: BACKEND, version: 0 })?;
        let iv = random::<IV_LEN>()?;
        let mut iv_param = iv;
        let ad = aad(version, context);
        let params =
            GcmParams::new(&mut iv_param, &ad, 128.into()).map_err(ck("GCM parameters"))?;
        let ct =
            inner.session.encrypt(&Mechanism::AesGcm(params), key, dek).map_err(ck("C_Encrypt"))?;
        let mut ciphertext = iv.to_vec();
        ciphertext.extend_from_slice(&ct);
        Ok(WrappedKey { kek_version: version, ciphertext })
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let version = wrapped.kek_version;
        if wrapped.ciphertext.len() < IV_LEN + 16 {
            return Err(KmsError::MalformedWrappedKey { backend: BACKEND, reason: "too short" });
        }
        let inner = self.lock();
        let key = *inner
            .versions
            .get(&version)
            .ok_or(KmsError::UnknownVersion { backend: BACKEND, version })?;
        let (iv, ct) = wrapped.ciphertext.split_at(IV_LEN);
        let mut iv = iv.to_vec();
        let ad = aad(version, context);
        let params = GcmParams::new(&mut iv, &ad, 128.into()).map_err(ck("GCM parameters"))?;
        match inner.session.decrypt(&Mechanism::AesGcm(params), key, ct) {
            Ok(plain) => Ok(Zeroizing::new(plain)),
            // SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR, others as
            // CKR_ENCRYPTED_DATA_INVALID.
            Err(CkError::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError,
                _,
            )) => Err(KmsError::UnwrapFailed { backend: BACKEND, version }),
            Err(e) => Err(ck("C_Decrypt")(e)),
        }
    }

    fn rotate(&self) -> Result<u32, KmsError> {
        let mut inner = self.lock();
        // Another process may have rotated: look again before choosing the number.
        inner.versions = self.find_versions(&inner.session)?;
        let next = inner.versions.last_key_value().map_or(1, |(v, _)| v + 1);
        let handle = self.generate(&inner.session, next)?;
        inner.versions.insert(next, handle);
        tracing::info!(token = %self.token_label, label = %self.object_label(next), "rotated PKCS#11 KEK");
        Ok(next)
    }

    fn current_version(&self) -> Result<u32, KmsError> {
        self.lock()
            .versions
            .last_key_value()
            .map(|(v, _)| *v)
            .ok_or(KmsError::UnknownVersion { backend: BACKEND, version: 0 })
    }
}
