//! The Vault Transit backend: a synchronous client for the documented HTTP API of
//! Vault's Transit secrets engine. The KEK never leaves Vault; this client sends data
//! keys to be encrypted and gets `vault:vN:…` ciphertexts back.
//!
//! | operation | request |
//! |---|---|
//! | wrap | `POST /v1/<mount>/encrypt/<key>` `{"plaintext": b64, "context": b64?}` |
//! | unwrap | `POST /v1/<mount>/decrypt/<key>` `{"ciphertext": "vault:vN:…", "context": b64?}` |
//! | rewrap | `POST /v1/<mount>/rewrap/<key>` (server-side: the data key never reaches us) |
//! | rotate | `POST /v1/<mount>/keys/<key>/rotate`, then `GET /v1/<mount>/keys/<key>` |
//! | connect | `GET /v1/<mount>/keys/<key>`; `POST /v1/<mount>/keys/<key>` creates it if missing |
//!
//! Every request carries the token in `X-Vault-Token`. With `derived = true` (the
//! default) the Transit key is created with key derivation and each call sends the
//! store's context, so a wrapped key only decrypts for the tree it was made for.
//! A Vault policy for the controller needs `update` on encrypt, decrypt and rewrap,
//! `read` on the key, and `update` on rotate only where `kms rotate` runs.

use std::{path::PathBuf, sync::Arc, time::Duration};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::{Kms, KmsError, WrappedKey};

const BACKEND: &str = "vault-transit";

/// Where the Transit key is. The token is passed separately.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultTransitConfig {
    /// e.g. `https://vault.hospital.example:8200`
    pub address: String,
    /// The Transit engine's mount path.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The Transit key's name.
    pub key: String,
    /// Use a derived key with the store's context (recommended; see module docs).
    #[serde(default = "default_true")]
    pub derived: bool,
    /// Create the key (`aes256-gcm96`) when it does not exist.
    #[serde(default = "default_true")]
    pub create_key: bool,
    /// PEM file of the CA that signed Vault's certificate (default: the web PKI roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_mount() -> String {
    "transit".into()
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> u64 {
    10
}

/// A Vault Transit client.
pub struct VaultTransitKms {
    config: VaultTransitConfig,
    token: SecretString,
    agent: ureq::Agent,
}

impl std::fmt::Debug for VaultTransitKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultTransitKms")
            .field("address", &self.config.address)
            .field("mount", &self.config.mount)
            .field("key", &self.config.key)
            .field("derived", &self.config.derived)
            .finish()
    }
}

impl VaultTransitKms {
    /// Checks that the key exists (creating it when allowed) and is usable as configured.
    pub fn connect(config: VaultTransitConfig, token: SecretString) -> Result<Self, KmsError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| KmsError::CaFile { path: path.clone(), source: Box::new(e) })?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(KmsError::CaFile { path: path.clone(), source: Box::new(e) })
                    }
                }
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(config.timeout_secs)))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .into();
        let kms = VaultTransitKms { config, token, agent };
        match kms.read_key() {
            Ok(info) => {
                if info.derived != kms.config.derived {
                    return Err(KmsError::VaultResponse {
                        op: "read key",
                        reason: "the key's `derived` setting differs from the configuration",
                    });
                }
            }
            Err(KmsError::Vault { status: 404, .. }) if kms.config.create_key => {
                kms.call(
                    "create key",
                    "POST",
                    &format!("keys/{}", kms.config.key),
                    Some(json!({"type": "aes256-gcm96", "derived": kms.config.derived})),
                )?;
                tracing::info!(key = %kms.config.key, mount = %kms.config.mount, "created Vault Transit key");
            }
            Err(e) => return Err(e),
        }
        Ok(kms)
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/{}/{}",
            self.config.address.trim_end_matches('/'),
            self.config.mount.trim_matches('/'),
            path
        )
    }

    /// One request; returns the `data` object of a 2xx answer (or `Null` for 204).
    fn call(
        &self,
        op: &'static str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, KmsError> {
        let url = self.url(path);
        let http = |source| KmsError::Http { op, source: Box::new(source) };
        let token = self.token.expose_secret();
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("X-Vault-Token", token).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("X-Vault-Token", token)
                .content_type("application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string()),
        }
        .map_err(http)?;
        let status = resp.status().as_u16();
        let text = Zeroizing::new(resp.body_mut().read_to_string().map_err(http)?);
        if !(200..300).contains(&status) {
            let errors = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("errors").cloned())
                .and_then(|e| serde_json::from_value::<Vec<String>>(e).ok())
                .unwrap_or_default();
            return Err(KmsError::Vault { op, status, errors });
        }
        if status == 204 || text.trim().is_empty() {
            return Ok(Value::Null);
        }
        let mut v: Value = serde_json::from_str(&text)
            .map_err(|_| KmsError::VaultResponse { op, reason: "body is not JSON" })?;
        Ok(v.get_mut("data").map(Value::take).unwrap_or(Value::Null))
    }

    fn read_key(&self) -> Result<KeyInfo, KmsError> {
        let data = self.call("read key", "GET", &format!("keys/{}", self.config.key), None)?;
        serde_json::from_value(data).map_err(|_| KmsError::VaultResponse {
            op: "read key",
            reason: "no latest_version in key info",
        })
    }

    fn with_context(&self, mut body: Value, context: &[u8]) -> Value {
        if self.config.derived {
            body["context"] = Value::String(STANDARD.encode(context));
        }
        body
    }
}

#[derive(Deserialize)]
struct KeyInfo {
    latest_version: u32,
    #[serde(default)]
    derived: bool,
}

/// `vault:v7:…` → 7.
fn version_of(ciphertext: &str) -> Option<u32> {
    ciphertext.strip_prefix("vault:v")?.split(':').next()?.parse().ok()
}

fn ciphertext_of(op: &'static str, data: &Value) -> Result<WrappedKey, KmsError> {
    let ct = data
        .get("ciphertext")
        .and_then(Value::as_str)
        .ok_or(KmsError::VaultResponse { op, reason: "no ciphertext" })?;
    let kek_version = version_of(ct)
        .ok_or(KmsError::VaultResponse { op, reason: "ciphertext is not vault:vN:…" })?;
    Ok(WrappedKey { kek_version, ciphertext: ct.as_bytes().to_vec() })
}

impl Kms for VaultTransitKms {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn wrap(&self, dek: &[u8], context: &[u8]) -> Result<WrappedKey, KmsError> {
        let plaintext = Zeroizing::new(STANDARD.encode(dek));
        let body = self.with_context(json!({ "plaintext": &*plaintext }), context);
        let data =
            self.call("encrypt", "POST", &format!("encrypt/{}", self.config.key), Some(body))?;
        ciphertext_of("encrypt", &data)
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let ct = std::str::from_utf8(&wrapped.ciphertext).map_err(|_| {
            KmsError::MalformedWrappedKey { backend: BACKEND, reason: "not a vault ciphertext" }
        })?;
        if version_of(ct) != Some(wrapped.kek_version) {
            return Err(KmsError::MalformedWrappedKey {
                backend: BACKEND,
                reason: "version prefix mismatch",
            });
        }
        let body = self.with_context(json!({ "ciphertext": ct }), context);
        let data =
            match self.call("decrypt", "POST", &format!("decrypt/{}", self.config.key), Some(body))
            {
                // Vault answers 400 for a ciphertext that does not authenticate.
                Err(KmsError::Vault { status: 400, .. }) => {
                    return Err(KmsError::UnwrapFailed {
                        backend: BACKEND,
                        version: wrapped.kek_version,
                    })
                }
                other => other?,
            };
        let b64 = Zeroizing::new(
            data.get("plaintext")
                .and_then(Value::as_str)
                .ok_or(KmsError::VaultResponse { op: "decrypt", reason: "no plaintext" })?
                .to_owned(),
        );
        STANDARD.decode(b64.as_bytes()).map(Zeroizing::new).map_err(|_| KmsError::VaultResponse {
            op: "decrypt",
            reason: "plaintext is not base64",
        })
    }

    fn rotate(&self) -> Result<u32, KmsError> {
        self.call("rotate", "POST", &format!("keys/{}/rotate", self.config.key), None)?;
        let v = self.read_key()?.latest_version;
        tracing::info!(key = %self.config.key, kek_version = v, "rotated Vault Transit key");
        Ok(v)
    }

    fn rewrap(&self, wrapped: &WrappedKey, context: &[u8]) -> Result<WrappedKey, KmsError> {
        let ct = std::str::from_utf8(&wrapped.ciphertext).map_err(|_| {
            KmsError::MalformedWrappedKey { backend: BACKEND, reason: "not a vault ciphertext" }
        })?;
        let body = self.with_context(json!({ "ciphertext": ct }), context);
        let data =
            self.call("rewrap", "POST", &format!("rewrap/{}", self.config.key), Some(body))?;
        ciphertext_of("rewrap", &data)
    }

    fn current_version(&self) -> Result<u32, KmsError> {
        Ok(self.read_key()?.latest_version)
    }
}
