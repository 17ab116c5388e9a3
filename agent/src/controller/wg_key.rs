//! The appliance's WireGuard key pair: generated on the box at the first
//! start, the private key kept in `<state_dir>/wireguard.key` (mode 0600,
//! base64 as `wg genkey` writes it), never logged, never sent; the public key
//! goes into every report so that external services can be configured with it.
//!
//! Keys are `wireguard_control::Key` (the type the tunnels of the push issue
//! will use): a clamped X25519 secret, its public key by x25519-dalek. `Key`
//! has no `Debug`, so it cannot slip into a log by formatting.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use wireguard_control::Key;

/// The private key's file name in the state directory.
pub const KEY_FILE: &str = "wireguard.key";

/// Errors reading or creating the key file (they name the file, never its content).
#[derive(Debug, thiserror::Error)]
pub enum WgKeyError {
    /// The file could not be read, written or restricted.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a base64 32-byte key.
    #[error("{} does not hold a WireGuard private key (base64, 32 bytes)", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
    },
}

/// The appliance's public key (base64, 44 characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(pub String);

/// Loads the key pair from `state_dir`, generating it on the first start.
/// A file that exists but is not a key is an error: it is never replaced
/// (a configured tunnel peer would silently stop matching). A file readable
/// by others is restricted to 0600.
pub fn load_or_generate(state_dir: &Path) -> Result<PublicKey, WgKeyError> {
    let path = state_dir.join(KEY_FILE);
    let io = |what, source| WgKeyError::Io { what, path: path.clone(), source };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path).map_err(|e| io("reading", e))?.permissions().mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(|e| io("restricting", e))?;
            }
            let key = Key::from_base64(text.trim())
                .map_err(|_| WgKeyError::Invalid { path: path.clone() })?;
            Ok(PublicKey(key.get_public().to_base64()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate(state_dir, &path),
        Err(e) => Err(io("reading", e)),
    }
}

/// Writes a fresh key to a 0600 temporary file, syncs it and renames it into
/// place, so a crash leaves either no key or a whole one.
fn generate(state_dir: &Path, path: &Path) -> Result<PublicKey, WgKeyError> {
    let io = |what, p: &Path, source| WgKeyError::Io { what, path: p.to_owned(), source };
    fs::create_dir_all(state_dir).map_err(|e| io("creating", state_dir, e))?;
    let tmp = state_dir.join(format!(".{KEY_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    let private = Key::generate_private();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("creating", &tmp, e))?;
    f.write_all(format!("{}\n", private.to_base64()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io("renaming into", path, e))?;
    if let Ok(dir) = fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(PublicKey(private.get_public().to_base64()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("airlock-wgkey-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn generated_once_private_0600_public_stable() {
        let dir = scratch("gen");
        let first = load_or_generate(&dir).unwrap();
        assert_eq!(first.0.len(), 44, "{first:?}");
        let path = dir.join(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let private = fs::read_to_string(&path).unwrap();
        assert_ne!(private.trim(), first.0, "the file holds the private key, not the public one");
        assert_eq!(load_or_generate(&dir).unwrap(), first, "the same key on the next start");
        // `wg pubkey` agrees (wireguard-tools is installed by `cargo xtask setup`).
        let mut wg = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wg.stdin.take().unwrap().write_all(private.as_bytes()).unwrap();
        let out = wg.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first.0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_loose_file_is_restricted_and_a_bad_one_refused() {
        let dir = scratch("bad");
        let first = load_or_generate(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_generate(&dir).unwrap(), first);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, "not a key\n").unwrap();
        let err = load_or_generate(&dir).unwrap_err();
        assert!(matches!(err, WgKeyError::Invalid { .. }), "{err}");
        assert!(!err.to_string().contains("not a key"), "content never in errors: {err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key\n", "never replaced");
        fs::remove_dir_all(&dir).unwrap();
    }
}
