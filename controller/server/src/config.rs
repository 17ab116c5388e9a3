//! The controller's configuration: a TOML file, every field with a safe
//! default, so `airlock-controller serve --data-dir D` alone is a working
//! controller on loopback.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use airlock_kms::{BuiltinProtection, KmsConfig};

/// The configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Where the store and the built-in key file live.
    pub data_dir: PathBuf,
    /// The main HTTPS listener (API, enrollment, web UI).
    pub listen: SocketAddr,
    /// The mTLS listener for enrolled agents.
    pub agent_listen: SocketAddr,
    /// A plain-HTTP listener that only redirects to HTTPS (off by default).
    pub http_redirect_listen: Option<SocketAddr>,
    /// The URL admins and enrolling agents use (default: from `listen`).
    pub public_url: Option<String>,
    /// The URL agents stream from (default: from `agent_listen`).
    pub agent_url: Option<String>,
    /// Extra names and addresses for the server certificate.
    pub server_names: Vec<String>,
    /// The KMS holding the key-encryption key (default: the built-in key
    /// file `<data_dir>/kek.json`, protected by file mode 0600).
    pub kms: Option<KmsConfig>,
    /// Idle timeout of admin sessions (automatic log-off), seconds.
    pub session_idle_secs: u64,
    /// Absolute lifetime of admin sessions, seconds.
    pub session_absolute_secs: u64,
    /// The appliance image update public key: a file holding 64 hex digits
    /// (what `cargo xtask image` writes as `target/image/image-signing.pub`).
    /// Without it, image releases cannot be uploaded.
    pub update_key: Option<PathBuf>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/airlock-controller"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            http_redirect_listen: None,
            public_url: None,
            agent_url: None,
            server_names: Vec::new(),
            kms: None,
            session_idle_secs: 15 * 60,
            session_absolute_secs: 8 * 3600,
            update_key: None,
        }
    }
}

/// Configuration failures.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Invalid TOML or values.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Located message from the parser.
        message: String,
    },
}

fn url_of(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => format!("https://{}:{}", v.ip(), v.port()),
        SocketAddr::V6(v) => format!("https://[{}]:{}", v.ip(), v.port()),
    }
}

impl ControllerConfig {
    /// Refuses settings that would hand out unusable URLs: a listener on an
    /// unspecified address (0.0.0.0, ::) needs its URL configured.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| ConfigError::Invalid {
            path: PathBuf::from("(settings)"),
            message: format!(
                "{what} listens on an unspecified address: set its URL (public_url / agent_url)"
            ),
        };
        if self.listen.ip().is_unspecified() && self.public_url.is_none() {
            return Err(bad("listen"));
        }
        if self.agent_listen.ip().is_unspecified() && self.agent_url.is_none() {
            return Err(bad("agent_listen"));
        }
        for u in [&self.public_url, &self.agent_url].into_iter().flatten() {
            if host_of(u).is_none() {
                return Err(ConfigError::Invalid {
                    path: PathBuf::from("(settings)"),
                    message: format!("{u:?} is not an https://HOST[:PORT] URL"),
                });
            }
        }
        Ok(())
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })
    }

    /// The update public key from [`update_key`](Self::update_key), checked
    /// (64 hex digits of an Ed25519 public key), as lowercase hex.
    pub fn load_update_key(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.update_key else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        parse_update_key(&text).map(Some).map_err(|message| ConfigError::Invalid {
            path: path.clone(),
            message: format!("update_key: {message}"),
        })
    }

    /// The KMS configuration in effect.
    pub fn kms(&self) -> KmsConfig {
        self.kms.clone().unwrap_or_else(|| KmsConfig::Builtin {
            key_file: self.data_dir.join("kek.json"),
            protection: BuiltinProtection::Keyfile,
        })
    }

    /// The public URL.
    pub fn public_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| url_of(self.listen))
    }

    /// The agent URL.
    pub fn agent_url(&self) -> String {
        self.agent_url.clone().unwrap_or_else(|| url_of(self.agent_listen))
    }

    /// Every name the server certificate carries.
    pub fn cert_names(&self) -> Vec<String> {
        let mut v = vec!["localhost".to_owned()];
        for a in [self.listen, self.agent_listen] {
            if !a.ip().is_unspecified() {
                v.push(a.ip().to_string());
            }
        }
        for u in [self.public_url(), self.agent_url()] {
            if let Some(host) = host_of(&u) {
                v.push(host);
            }
        }
        v.extend(self.server_names.iter().cloned());
        v.sort();
        v.dedup();
        v
    }
}

/// Checks an update public key's text: 64 hex digits (surrounding
/// whitespace allowed) of a valid Ed25519 public key; returns it lowercase.
pub fn parse_update_key(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected 64 hex digits (an Ed25519 public key), found {} characters",
            t.chars().count()
        ));
    }
    let t = t.to_ascii_lowercase();
    let mut raw = [0u8; 32];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    ed25519_dalek::VerifyingKey::from_bytes(&raw)
        .map_err(|_| "the 64 hex digits are not a valid Ed25519 public key".to_owned())?;
    Ok(t)
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let hostport = rest.split('/').next()?;
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split(']').next().map(str::to_owned);
    }
    hostport.split(':').next().filter(|h| !h.is_empty()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_names_cover_the_urls() {
        let mut c = ControllerConfig::default();
        assert!(c.listen.ip().is_loopback() && c.agent_listen.ip().is_loopback());
        c.public_url = Some("https://ctl.example:9443/".into());
        c.agent_url = Some("https://[fd00::1]:8444".into());
        let n = c.cert_names();
        for want in ["localhost", "127.0.0.1", "ctl.example", "fd00::1"] {
            assert!(n.contains(&want.to_owned()), "{n:?}");
        }
    }

    #[test]
    fn unspecified_listeners_need_urls() {
        let mut c =
            ControllerConfig { listen: "0.0.0.0:8443".parse().unwrap(), ..Default::default() };
        assert!(c.check().is_err());
        c.public_url = Some("https://10.0.0.1:8443".into());
        assert!(c.check().is_ok());
        c.agent_url = Some("http://x".into());
        assert!(c.check().is_err());
    }

    #[test]
    fn update_keys_are_64_hex_digits_of_an_ed25519_key() {
        let pk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let hex: String = pk.as_bytes().iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_update_key(&format!("{hex}\n")).unwrap(), hex.to_lowercase());
        assert!(parse_update_key("abcd").unwrap_err().contains("64 hex digits"));
        assert!(parse_update_key(&"zz".repeat(32)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.pub");
        std::fs::write(&f, "nope").unwrap();
        let c = ControllerConfig { update_key: Some(f.clone()), ..Default::default() };
        let e = c.load_update_key().unwrap_err().to_string();
        assert!(e.contains("k.pub") && e.contains("update_key"), "{e}");
        let c = ControllerConfig { update_key: Some(dir.path().join("missing")), ..c };
        assert!(c.load_update_key().is_err());
        assert_eq!(ControllerConfig::default().load_update_key().unwrap(), None);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<ControllerConfig>("lisen = \"127.0.0.1:1\"").is_err());
    }
}
