//! The saved login: `$XDG_CONFIG_HOME/airlock/ctl.toml` (or
//! `~/.config/airlock/ctl.toml`), mode 0600 in a 0700 directory, replaced
//! atomically. It holds the controller URL, the CA certificate pinned at
//! login and the session token — never a password.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// What `login` saves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The controller (`https://host:port`).
    pub controller: String,
    /// Who logged in.
    pub user: String,
    /// The session token (`None` after `logout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The session's absolute end (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The pinned CA's fingerprint (`sha256:…`).
    pub ca_fingerprint: String,
    /// The pinned CA certificate (PEM): the only root afterwards.
    pub ca_pem: String,
}

/// Session-file failures.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Neither XDG_CONFIG_HOME nor HOME is set.
    #[error("cannot find the configuration directory: set HOME or XDG_CONFIG_HOME")]
    NoHome,
    /// Reading failed.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{} is damaged; delete it and log in again", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// Writing failed.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serializing failed (not expected).
    #[error("cannot encode the session file")]
    Encode(#[source] toml::ser::Error),
}

/// The session file's path.
pub fn path() -> Result<PathBuf, SessionError> {
    let nonempty = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = match nonempty("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        Some(p) => p,
        None => nonempty("HOME").ok_or(SessionError::NoHome)?.join(".config"),
    };
    Ok(base.join("airlock").join("ctl.toml"))
}

/// Reads the file at `p`; `None` when there is none.
pub fn load(p: &Path) -> Result<Option<Saved>, SessionError> {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SessionError::Read { path: p.into(), source }),
    };
    toml::from_str(&text).map(Some).map_err(|source| SessionError::Parse { path: p.into(), source })
}

/// Writes `s` to `p` atomically: a 0600 temporary file next to it, synced,
/// then renamed over it. The directory is created 0700.
pub fn save(p: &Path, s: &Saved) -> Result<(), SessionError> {
    let werr = |source| SessionError::Write { path: p.into(), source };
    let text = toml::to_string(s).map_err(SessionError::Encode)?;
    let dir = p.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(werr)?;
    let tmp = dir.join(format!(".ctl.toml.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, p)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn saves_0600_atomically_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("airlockctl-session-{}", std::process::id()));
        let p = dir.join("airlock/ctl.toml");
        assert_eq!(load(&p).unwrap(), None);
        let s = Saved {
            controller: "https://127.0.0.1:8443".into(),
            user: "admin".into(),
            token: Some("t".into()),
            expires_at: Some(5),
            ca_fingerprint: "sha256:00".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
        };
        save(&p, &s).unwrap();
        save(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), Some(s));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(p.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        std::fs::write(&p, "controller = [").unwrap();
        assert!(matches!(load(&p), Err(SessionError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
