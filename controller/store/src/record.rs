//! The on-disk record format and its associated data.
//!
//! ```text
//! value on disk = 0x01 | dek_version (u32 BE) | nonce (24) | XChaCha20-Poly1305(value) + tag (16)
//! associated data = "airlock-store/record/v1" | 0x01 | len(tree) u32 | tree | len(key) u32 | key | dek_version
//! ```
//! The associated data binds a ciphertext to its tree, its key and its data-key
//! version: a value copied to another key or tree, or relabelled with another version,
//! fails authentication.

use std::collections::BTreeMap;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use zeroize::Zeroizing;

use crate::StoreError;

pub(crate) const FORMAT_V1: u8 = 0x01;
const AD_PREFIX: &[u8] = b"airlock-store/record/v1";
const HEADER: usize = 1 + 4 + 24;
const TAG: usize = 16;

/// A tree's unwrapped data keys, by version.
pub(crate) struct TreeKeys {
    pub(crate) current: u32,
    pub(crate) keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for TreeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeKeys")
            .field("current", &self.current)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn ad(tree: &str, key: &[u8], dek_version: u32) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_PREFIX.len() + 13 + tree.len() + key.len());
    ad.extend_from_slice(AD_PREFIX);
    ad.push(FORMAT_V1);
    ad.extend_from_slice(&u32::try_from(tree.len()).unwrap_or(u32::MAX).to_be_bytes());
    ad.extend_from_slice(tree.as_bytes());
    ad.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
    ad.extend_from_slice(key);
    ad.extend_from_slice(&dek_version.to_be_bytes());
    ad
}

pub(crate) fn seal(
    keys: &TreeKeys,
    tree: &str,
    key: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let version = keys.current;
    let dek =
        keys.keys.get(&version).ok_or(StoreError::Meta { reason: "current data key missing" })?;
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).map_err(StoreError::Random)?;
    let ct = XChaCha20Poly1305::new((&**dek).into())
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: value, aad: &ad(tree, key, version) })
        .map_err(|_| StoreError::Meta { reason: "encryption failed" })?;
    let mut out = Vec::with_capacity(HEADER + ct.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

pub(crate) fn open(
    keys: &TreeKeys,
    tree: &str,
    key: &[u8],
    raw: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let integrity = || {
        tracing::warn!(tree, key = %show_key(key), "record failed its integrity check");
        StoreError::Integrity { tree: tree.to_owned(), key: show_key(key) }
    };
    if raw.len() < HEADER + TAG || raw[0] != FORMAT_V1 {
        return Err(integrity());
    }
    let version = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]);
    let dek = keys.keys.get(&version).ok_or_else(integrity)?;
    XChaCha20Poly1305::new((&**dek).into())
        .decrypt(
            XNonce::from_slice(&raw[5..HEADER]),
            Payload { msg: &raw[HEADER..], aad: &ad(tree, key, version) },
        )
        .map(Zeroizing::new)
        .map_err(|_| integrity())
}

/// A record key for errors and logs: as text when it is printable ASCII, else hex.
pub(crate) fn show_key(key: &[u8]) -> String {
    if !key.is_empty() && key.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        String::from_utf8_lossy(key).into_owned()
    } else {
        format!("0x{}", hex::encode(key))
    }
}
