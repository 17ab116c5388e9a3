//! Airlock's wire types: what the agent, the controller and `airlockctl` say
//! to each other, versioned serde types and nothing else — plus the one
//! integrity rule that belongs to a wire type, the signed policy bundle.
//!
//! ```text
//!  controller: compile(policy, grants, Now::wall) ─▶ PolicyBundle ─sign(Ed25519)─▶ SignedBundle
//!                                                                                      │ mTLS stream
//!  agent:      SignedBundle ─verify(key, appliance, last version)─▶ PolicyBundle ─localize(now)─▶ maps, nft
//! ```
//!
//! What it is not: no I/O, no clock reads (times are parameters), no HTTP.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod agent;
pub mod bundle;
#[cfg(feature = "pin")]
pub mod pin;
pub mod release;

pub use bundle::{key_id, BundleError, PolicyBundle, SignedBundle, BUNDLE_FORMAT};

/// The pinned form of a CA certificate: `sha256:` + 64 hex digits of SHA-256
/// over its DER encoding.
pub fn ca_fingerprint(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(der);
    let hex: String = d.iter().map(|x| format!("{x:02x}")).collect();
    format!("sha256:{hex}")
}

/// Parses a pinned fingerprint (`sha256:<hex>`, case-insensitive, `:` between
/// bytes allowed) into its 32 bytes.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: String = s
        .trim()
        .strip_prefix("sha256:")
        .or_else(|| s.trim().strip_prefix("SHA256:"))?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprints_round_trip() {
        let f = super::ca_fingerprint(b"certificate");
        let bytes = super::parse_fingerprint(&f).unwrap();
        assert_eq!(
            super::parse_fingerprint(&f.to_uppercase().replace("SHA256:", "sha256:")),
            Some(bytes)
        );
        assert_eq!(super::parse_fingerprint("sha256:abc"), None);
        assert_eq!(super::parse_fingerprint("md5:00"), None);
    }
}
