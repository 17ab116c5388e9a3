//! The policy bundle: one appliance's desired state, signed by the controller.
//!
//! The signature covers the exact payload bytes (the JSON of a
//! [`PolicyBundle`]), carried base64-encoded so no re-serialization can change
//! what was signed. [`SignedBundle::verify`] checks, in this order: encoding,
//! signature, format, appliance, version — and returns the bundle only when all
//! hold. The agent records every refusal with its [`BundleError`].

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use airlock_policy::PortableEntry;

/// The bundle format this crate reads and writes.
pub const BUNDLE_FORMAT: u16 = 1;

/// One appliance's desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBundle {
    /// [`BUNDLE_FORMAT`].
    pub format: u16,
    /// The appliance this is for (its id, as in its certificate).
    pub appliance: String,
    /// Strictly increasing per appliance; never reused, also across rollbacks.
    pub version: u64,
    /// The policy version it was compiled from.
    pub policy_version: u32,
    /// Unix seconds at which the controller compiled it.
    pub issued_at: u64,
    /// The flow entries, expiries in Unix seconds.
    pub entries: Vec<PortableEntry>,
}

/// A [`PolicyBundle`] with its Ed25519 signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignedBundle {
    /// The bundle version (also inside the payload; here for logs and routing,
    /// never trusted without [`SignedBundle::verify`]).
    pub version: u64,
    /// Base64 of the bundle's JSON bytes: what the signature covers.
    pub payload: String,
    /// Base64 of the 64-byte Ed25519 signature over the payload bytes.
    pub signature: String,
    /// Which controller key signed it (fingerprint of the public key).
    pub key_id: String,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// Payload or signature is not valid base64 / the payload is not a bundle.
    #[error("the bundle is malformed: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the controller's key.
    #[error("the bundle signature does not verify (signed by key {key_id})")]
    BadSignature {
        /// The key the bundle claims.
        key_id: String,
    },
    /// A format this agent does not know.
    #[error("bundle format {0} is not supported (this agent reads format {BUNDLE_FORMAT})")]
    Format(u16),
    /// Signed for another appliance.
    #[error("the bundle is for appliance {got:?}, not {expected:?}")]
    Foreign {
        /// This appliance.
        expected: String,
        /// The bundle's appliance.
        got: String,
    },
    /// Older than what is applied.
    #[error("bundle version {got} is older than the applied version {applied}")]
    Older {
        /// The applied version.
        applied: u64,
        /// The bundle's version.
        got: u64,
    },
    /// The outer version does not match the signed one.
    #[error("the bundle's outer version {outer} differs from its signed version {signed}")]
    VersionMismatch {
        /// Unsigned label.
        outer: u64,
        /// Signed value.
        signed: u64,
    },
}

/// A short, stable name for a public key: `ed25519:` + the first 16 hex digits
/// of SHA-256 over the key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(key.as_bytes());
    format!("ed25519:{}", hex16(&d[..8]))
}

fn hex16(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl PolicyBundle {
    /// Signs the bundle.
    pub fn sign(&self, key: &SigningKey) -> SignedBundle {
        // Serializing plain structs, strings, integers and addresses cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let sig = key.sign(&bytes);
        SignedBundle {
            version: self.version,
            payload: B64.encode(&bytes),
            signature: B64.encode(sig.to_bytes()),
            key_id: key_id(&key.verifying_key()),
        }
    }
}

impl SignedBundle {
    /// Verifies and opens the bundle for `appliance`, refusing anything older
    /// than `applied` (an equal version is returned; the caller treats it as
    /// already applied).
    pub fn verify(
        &self,
        key: &VerifyingKey,
        appliance: &str,
        applied: Option<u64>,
    ) -> Result<PolicyBundle, BundleError> {
        let bytes = B64.decode(&self.payload).map_err(|_| BundleError::Malformed("payload"))?;
        let sig = B64.decode(&self.signature).map_err(|_| BundleError::Malformed("signature"))?;
        let sig: [u8; 64] =
            sig.try_into().map_err(|_| BundleError::Malformed("signature length"))?;
        key.verify(&bytes, &Signature::from_bytes(&sig))
            .map_err(|_| BundleError::BadSignature { key_id: self.key_id.clone() })?;
        // Signed by the controller from here on; still check what it says.
        let format = serde_json::from_slice::<FormatOnly>(&bytes)
            .map_err(|_| BundleError::Malformed("payload is not a bundle"))?
            .format;
        if format != BUNDLE_FORMAT {
            return Err(BundleError::Format(format));
        }
        let b: PolicyBundle = serde_json::from_slice(&bytes)
            .map_err(|_| BundleError::Malformed("payload is not a valid bundle"))?;
        if b.appliance != appliance {
            return Err(BundleError::Foreign { expected: appliance.to_owned(), got: b.appliance });
        }
        if b.version != self.version {
            return Err(BundleError::VersionMismatch { outer: self.version, signed: b.version });
        }
        if let Some(applied) = applied.filter(|a| b.version < *a) {
            return Err(BundleError::Older { applied, got: b.version });
        }
        Ok(b)
    }
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_policy::{Flow, Ingress, Protocol};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn bundle(version: u64) -> PolicyBundle {
        PolicyBundle {
            format: BUNDLE_FORMAT,
            appliance: "ward-3".into(),
            version,
            policy_version: 2,
            issued_at: 1_800_000_000,
            entries: vec![PortableEntry {
                flow: Flow::new(
                    "10.77.0.13".parse().unwrap(),
                    "10.78.0.100".parse().unwrap(),
                    Protocol::Tcp,
                    Some(443),
                )
                .unwrap(),
                rule_id: 1,
                policy_version: 2,
                ingress: Ingress::Patient,
                allow_reply: true,
                expires_unix: Some(1_800_003_600),
            }],
        }
    }

    #[test]
    fn a_signed_bundle_verifies_for_its_appliance() {
        let k = key(1);
        let s = bundle(5).sign(&k);
        assert_eq!(s.verify(&k.verifying_key(), "ward-3", Some(4)), Ok(bundle(5)));
        assert_eq!(s.verify(&k.verifying_key(), "ward-3", Some(5)), Ok(bundle(5)));
        assert_eq!(s.verify(&k.verifying_key(), "ward-3", None), Ok(bundle(5)));
    }

    #[test]
    fn older_foreign_unsigned_and_tampered_bundles_are_refused() {
        let k = key(1);
        let vk = k.verifying_key();
        let s = bundle(5).sign(&k);
        assert_eq!(
            s.verify(&vk, "ward-3", Some(6)),
            Err(BundleError::Older { applied: 6, got: 5 })
        );
        assert!(matches!(s.verify(&vk, "ward-4", None), Err(BundleError::Foreign { .. })));
        // Signed by another key.
        let other = bundle(5).sign(&key(2));
        assert!(matches!(other.verify(&vk, "ward-3", None), Err(BundleError::BadSignature { .. })));
        // Unsigned: an empty or zero signature.
        let mut unsigned = s.clone();
        unsigned.signature = String::new();
        assert!(matches!(unsigned.verify(&vk, "ward-3", None), Err(BundleError::Malformed(_))));
        unsigned.signature = B64.encode([0u8; 64]);
        assert!(matches!(
            unsigned.verify(&vk, "ward-3", None),
            Err(BundleError::BadSignature { .. })
        ));
        // One payload byte changed (the port 443 → 444).
        let mut bytes = B64.decode(&s.payload).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap().replace("443", "444");
        bytes = text.into_bytes();
        let mut tampered = s.clone();
        tampered.payload = B64.encode(&bytes);
        assert!(matches!(
            tampered.verify(&vk, "ward-3", None),
            Err(BundleError::BadSignature { .. })
        ));
        // The unsigned outer version lies.
        let mut relabeled = s.clone();
        relabeled.version = 9;
        assert_eq!(
            relabeled.verify(&vk, "ward-3", None),
            Err(BundleError::VersionMismatch { outer: 9, signed: 5 })
        );
    }

    #[test]
    fn an_unknown_format_is_refused_even_when_signed() {
        let k = key(1);
        let mut b = bundle(1);
        b.format = 2;
        assert_eq!(
            b.sign(&k).verify(&k.verifying_key(), "ward-3", None),
            Err(BundleError::Format(2))
        );
    }

    #[test]
    fn an_invalid_flow_inside_a_signed_bundle_is_refused() {
        let k = key(1);
        let s = bundle(1).sign(&k);
        let text = String::from_utf8(B64.decode(&s.payload).unwrap()).unwrap();
        let bad = text.replace("10.78.0.100", "255.255.255.255");
        let sig = k.sign(bad.as_bytes());
        let forged = SignedBundle {
            payload: B64.encode(bad.as_bytes()),
            signature: B64.encode(sig.to_bytes()),
            ..s
        };
        assert!(matches!(
            forged.verify(&k.verifying_key(), "ward-3", None),
            Err(BundleError::Malformed(_))
        ));
    }
}
