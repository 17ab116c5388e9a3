//! Signing the image's manifest (Ed25519) and checking a signed image.
//!
//! The manifest names the image's SHA-256, so its signature covers the image.
//! The signing key is a 32-byte seed in a file (`AIRLOCK_IMAGE_SIGNING_KEY`,
//! default `~/.config/airlock/image-signing.key`, mode 0600). When it is
//! missing, a development key is generated there and said so: release keys
//! belong to the release process, never to the repository. The public key is
//! baked into the image (`/usr/share/airlock/image-signing.pub`) for the
//! update path to check bundles against.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context as _, Result};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

/// Where the signing key lives.
pub fn key_path() -> PathBuf {
    std::env::var_os("AIRLOCK_IMAGE_SIGNING_KEY").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".config/airlock/image-signing.key")
        },
        PathBuf::from,
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len()).step_by(2).map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok()).collect()
}

/// Loads the key, or makes a development key. Returns it and whether it was new.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool)> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let seed: [u8; 32] = unhex(&text)
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{}: not a 64-hex-digit Ed25519 seed", path.display()))?;
            Ok((SigningKey::from_bytes(&seed), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
                .context("reading /dev/urandom")?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{}", hex(&seed))?;
            Ok((SigningKey::from_bytes(&seed), true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The public key as written into the image and next to it.
pub fn public_hex(key: &SigningKey) -> String {
    hex(key.verifying_key().as_bytes())
}

/// `manifest.json.sig`: the hex signature of the manifest's bytes.
pub fn sign(key: &SigningKey, manifest: &[u8]) -> String {
    hex(&key.sign(manifest).to_bytes())
}

/// Checks a signature made by [`sign`].
pub fn verify(public_hex: &str, manifest: &[u8], sig_hex: &str) -> Result<()> {
    let pk: [u8; 32] = unhex(public_hex)
        .and_then(|b| b.try_into().ok())
        .context("the public key is not 64 hex digits")?;
    let sig: [u8; 64] = unhex(sig_hex)
        .and_then(|b| b.try_into().ok())
        .context("the signature is not 128 hex digits")?;
    let vk = VerifyingKey::from_bytes(&pk).context("not an Ed25519 public key")?;
    vk.verify(manifest, &Signature::from_bytes(&sig))
        .map_err(|_| anyhow::anyhow!("the manifest's signature does not verify with this key"))
}

/// `cargo xtask image verify`: signature over the manifest, then the image's
/// checksum against the manifest.
pub fn verify_image(image: &Path, public_key: Option<&Path>) -> Result<()> {
    let dir = image.parent().context("image path has no directory")?;
    let manifest_path = dir.join("manifest.json");
    let manifest =
        fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let sig =
        fs::read_to_string(dir.join("manifest.json.sig")).context("reading manifest.json.sig")?;
    let pk_path = public_key.map_or_else(|| dir.join("image-signing.pub"), Path::to_owned);
    let pk =
        fs::read_to_string(&pk_path).with_context(|| format!("reading {}", pk_path.display()))?;
    verify(&pk, &manifest, &sig)?;
    let m: serde_json::Value =
        serde_json::from_slice(&manifest).context("manifest.json is not JSON")?;
    let want = m["image_sha256"].as_str().context("manifest.json has no image_sha256")?;
    let out = crate::step::capture(std::process::Command::new("sha256sum").arg(image))?;
    let got = out.split_whitespace().next().unwrap_or_default();
    if got != want {
        bail!(
            "{} does not match its manifest (sha256 {got}, manifest says {want}); verify before \
             `image provision`, which writes the AIRLOCK-CFG partition",
            image.display()
        );
    }
    ensure!(!want.is_empty(), "empty checksum in the manifest");
    println!("{}: signature ok (key {}), sha256 ok", image.display(), pk.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_manifest_or_key_does_not() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let m = br#"{"image_sha256":"ab"}"#;
        let sig = sign(&key, m);
        verify(&public_hex(&key), m, &sig).unwrap();
        assert!(verify(&public_hex(&key), br#"{"image_sha256":"ac"}"#, &sig).is_err());
        assert!(verify(&public_hex(&other), m, &sig).is_err());
        assert!(verify(&public_hex(&key), m, "zz").is_err());
    }

    #[test]
    fn keys_round_trip_through_their_file() {
        let dir = std::env::temp_dir().join(format!("airlock-sign-{}", std::process::id()));
        let path = dir.join("k");
        let (k1, new1) = load_or_create(&path).unwrap();
        let (k2, new2) = load_or_create(&path).unwrap();
        assert!(new1 && !new2);
        assert_eq!(public_hex(&k1), public_hex(&k2));
        fs::write(&path, "not hex").unwrap();
        assert!(load_or_create(&path).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
