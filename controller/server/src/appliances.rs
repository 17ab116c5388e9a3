//! Appliance records, one-time enrollment tokens, certificate issue, renewal
//! and revocation.
//!
//! A token is 256 random bits, shown once; the store keeps only its SHA-256.
//! Use flips the stored record from unused to used with one compare-and-swap,
//! so of any number of concurrent enrollments with one token exactly one wins,
//! and a replay is told the token was used (not merely "unknown").

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use airlock_proto::admin::ApplianceState;
use airlock_store::{Store, StoreError};

use crate::{
    ca::{Ca, CaError, Issued},
    tls::Registry,
};

/// Default token lifetime.
pub const DEFAULT_TOKEN_TTL: u64 = 24 * 3600;
/// Longest token lifetime.
pub const MAX_TOKEN_TTL: u64 = 7 * 24 * 3600;

/// A stored appliance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplianceRecord {
    /// Id (certificate CN, policy appliance name).
    pub id: String,
    /// Lifecycle.
    pub state: ApplianceState,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub enrolled_at: Option<u64>,
    /// Accepted certificate serials, oldest first (at most two: current and
    /// the one before it, during a renewal).
    pub serials: Vec<String>,
    /// Expiry of the newest certificate.
    pub cert_expires_at: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TokenRecord {
    appliance: String,
    expires_at: u64,
    used_at: Option<u64>,
}

/// Enrollment and record failures; each maps to one API error code.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// Bad id.
    #[error("appliance id {0:?} is invalid: use 1-63 characters a-z, 0-9 and '-', starting with a letter or digit")]
    BadId(String),
    /// No such appliance.
    #[error("no appliance {0:?}")]
    Unknown(String),
    /// Token not known.
    #[error("the enrollment token is not valid")]
    InvalidToken,
    /// Token already used.
    #[error("the enrollment token was already used; ask an admin for a new one")]
    TokenUsed,
    /// Token expired.
    #[error("the enrollment token expired; ask an admin for a new one")]
    TokenExpired,
    /// The appliance was revoked.
    #[error("appliance {0:?} is revoked")]
    Revoked(String),
    /// CA failure (bad CSR included).
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Store failure.
    #[error("appliance store")]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error("a stored appliance record is unreadable")]
    Corrupt(#[source] serde_json::Error),
}

/// Checks an appliance id.
pub fn check_id(id: &str) -> Result<(), ApplianceError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApplianceError::BadId(id.chars().take(80).collect()))
    }
}

fn token_key(token: &str) -> Vec<u8> {
    Sha256::digest(token.trim().as_bytes()).to_vec()
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, ApplianceError> {
    serde_json::to_vec(v).map_err(ApplianceError::Corrupt)
}

/// Appliance operations over the store.
#[derive(Clone, Debug)]
pub struct Appliances {
    store: Store,
}

impl Appliances {
    /// Over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// One record.
    pub fn get(&self, id: &str) -> Result<Option<ApplianceRecord>, ApplianceError> {
        match self.store.tree("appliances")?.get(id.as_bytes())? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw).map_err(ApplianceError::Corrupt)?)),
            None => Ok(None),
        }
    }

    /// All records, by id.
    pub fn list(&self) -> Result<Vec<ApplianceRecord>, ApplianceError> {
        self.store
            .tree("appliances")?
            .scan_prefix(b"")
            .map(|r| {
                let (_, v) = r?;
                serde_json::from_slice(&v).map_err(ApplianceError::Corrupt)
            })
            .collect()
    }

    fn put(&self, r: &ApplianceRecord) -> Result<(), ApplianceError> {
        self.store.tree("appliances")?.insert(r.id.as_bytes(), &json(r)?)?;
        Ok(())
    }

    /// Creates the record (or keeps an existing one: re-provisioning) and a
    /// one-time token; returns the token and its expiry.
    pub fn create(
        &self,
        id: &str,
        ttl: Option<u64>,
        now: u64,
    ) -> Result<(String, u64), ApplianceError> {
        check_id(id)?;
        let existing = self.get(id)?;
        if let Some(r) = &existing {
            if r.state == ApplianceState::Revoked {
                return Err(ApplianceError::Revoked(id.into()));
            }
        } else {
            self.put(&ApplianceRecord {
                id: id.into(),
                state: ApplianceState::Pending,
                created_at: now,
                enrolled_at: None,
                serials: Vec::new(),
                cert_expires_at: None,
            })?;
        }
        let token = crate::auth::random_secret().map_err(|_| ApplianceError::InvalidToken)?;
        let expires_at = now + ttl.unwrap_or(DEFAULT_TOKEN_TTL).clamp(60, MAX_TOKEN_TTL);
        let rec = TokenRecord { appliance: id.into(), expires_at, used_at: None };
        self.store.tree("tokens")?.insert(&token_key(&token), &json(&rec)?)?;
        Ok((token, expires_at))
    }

    /// Redeems a token for a certificate over the CSR's key. Exactly one
    /// concurrent caller per token succeeds.
    pub fn enroll(
        &self,
        ca: &Ca,
        registry: &Registry,
        token: &str,
        csr_pem: &str,
        now: u64,
    ) -> Result<(ApplianceRecord, Issued), ApplianceError> {
        let tokens = self.store.tree("tokens")?;
        let key = token_key(token);
        let Some(raw) = tokens.get(&key)? else { return Err(ApplianceError::InvalidToken) };
        let rec: TokenRecord = serde_json::from_slice(&raw).map_err(ApplianceError::Corrupt)?;
        if rec.used_at.is_some() {
            return Err(ApplianceError::TokenUsed);
        }
        if now >= rec.expires_at {
            return Err(ApplianceError::TokenExpired);
        }
        // Check the CSR before spending the token: a typo should not burn it.
        let issued = ca.issue_client(csr_pem, &rec.appliance, now)?;
        let used = TokenRecord { used_at: Some(now), ..rec.clone() };
        if tokens.compare_and_swap(&key, Some(&raw), Some(&json(&used)?))?.is_err() {
            return Err(ApplianceError::TokenUsed);
        }
        let mut r = self
            .get(&rec.appliance)?
            .ok_or_else(|| ApplianceError::Unknown(rec.appliance.clone()))?;
        if r.state == ApplianceState::Revoked {
            return Err(ApplianceError::Revoked(r.id));
        }
        // A (re-)enrollment replaces every earlier certificate.
        r.state = ApplianceState::Enrolled;
        r.enrolled_at = Some(now);
        r.serials = vec![issued.serial.clone()];
        r.cert_expires_at = Some(issued.not_after);
        self.put(&r)?;
        registry.set(&r.id, r.serials.clone());
        tracing::info!(appliance = %r.id, serial = %issued.serial, "appliance enrolled");
        Ok((r, issued))
    }

    /// A new certificate for an enrolled appliance; the previous one stays
    /// accepted until the next renewal, so in-flight connections survive.
    pub fn renew(
        &self,
        ca: &Ca,
        registry: &Registry,
        id: &str,
        csr_pem: &str,
        now: u64,
    ) -> Result<Issued, ApplianceError> {
        let mut r = self.get(id)?.ok_or_else(|| ApplianceError::Unknown(id.into()))?;
        if r.state != ApplianceState::Enrolled {
            return Err(ApplianceError::Revoked(id.into()));
        }
        let issued = ca.issue_client(csr_pem, id, now)?;
        r.serials.push(issued.serial.clone());
        let keep = r.serials.len().saturating_sub(2);
        r.serials.drain(..keep);
        r.cert_expires_at = Some(issued.not_after);
        self.put(&r)?;
        registry.set(id, r.serials.clone());
        tracing::info!(appliance = %id, serial = %issued.serial, "certificate renewed");
        Ok(issued)
    }

    /// Revokes: every certificate of the appliance is refused from the next
    /// handshake on; open streams are closed by the caller.
    pub fn revoke(&self, registry: &Registry, id: &str) -> Result<ApplianceRecord, ApplianceError> {
        let mut r = self.get(id)?.ok_or_else(|| ApplianceError::Unknown(id.into()))?;
        r.state = ApplianceState::Revoked;
        r.serials.clear();
        self.put(&r)?;
        registry.set(id, Vec::new());
        tracing::warn!(appliance = %id, "appliance revoked");
        Ok(r)
    }

    /// Fills the TLS registry from the store (at start).
    pub fn load_registry(&self, registry: &Registry) -> Result<usize, ApplianceError> {
        let all = self.list()?;
        let mut n = 0;
        for r in all.iter().filter(|r| r.state == ApplianceState::Enrolled) {
            registry.set(&r.id, r.serials.clone());
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::check_id;

    #[test]
    fn ids_are_plain_names() {
        for ok in ["lab-appliance", "ward3", "a"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "Ward", "a b", "a/b", &"x".repeat(64)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
