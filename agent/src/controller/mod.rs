//! The agent's controller client: enrollment, the bundle stream, reports and
//! certificate renewal.
//!
//! ```text
//!  enroll (CLI or first boot with a token file)
//!    identity::generate ─▶ client::enroll (TLS pinned: tls::PinnedCaVerifier) ─▶ identity files
//!  run
//!    lkg::restore (stored bundle re-verified, localized) ─▶ maps, nft      before forwarding
//!    Link::start ─▶ tasks: sync::stream_task ──SyncEvent──▶ run loop: Link::handle
//!                          report::report_task ◀──Report──┘   sync::decide ─▶ policy_cmd::apply_entries
//!                            │ offer (from the answer)                       ─▶ store (LKG)
//!                            ▼
//!                          updater::updater_task ──UpdaterStatus──▶ run loop (next report)
//!                            (download, update::apply, reboot; never the dataplane)
//!                          renew::renew_task (new key + cert, atomic)
//! ```
//!
//! The run loop alone owns the dataplane: tasks only talk to the controller
//! and pass messages. Nothing here ever opens anything by failing: a lost
//! controller, a refused bundle or a broken identity leaves the last applied
//! state enforced (or, with none, everything dropped).

pub mod client;
pub mod identity;
pub mod link;
pub mod lkg;
pub mod mgmt;
pub mod renew;
pub mod report;
#[cfg(test)]
mod stand_in;
pub mod sync;
pub mod tls;
pub mod updater;
pub mod wg_key;

use std::{
    fmt,
    io::Read as _,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
};

use airlock_proto::agent::{EnrollRequest, Refusal};
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use client::{ClientError, Endpoint};
use identity::{Identity, IdentityError, IdentityPaths, Validity};

pub use link::Link;

/// Controller client failures.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Identity files.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Talking to the controller.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `enroll` on an enrolled agent.
    #[error("this agent is already enrolled (remove {0} to enroll again)")]
    AlreadyEnrolled(PathBuf),
    /// Not enrolled.
    #[error("this agent is not enrolled (airlock-agent enroll)")]
    NotEnrolled,
    /// The CA fingerprint does not parse.
    #[error("{0:?} is not a CA fingerprint (sha256:<64 hex digits>)")]
    BadFingerprint(String),
    /// The controller's CA is not the pinned one.
    #[error("the controller returned a CA that is not the pinned one ({got})")]
    CaMismatch {
        /// The returned CA's fingerprint.
        got: String,
    },
    /// The enroll response is incomplete.
    #[error("the enrollment answer is unusable: {0}")]
    BadAnswer(&'static str),
    /// The token cannot be read.
    #[error("cannot read the enrollment token from {from}")]
    TokenRead {
        /// Where from.
        from: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty or not one line of printable text.
    #[error("the enrollment token from {0} is empty or malformed")]
    TokenMalformed(String),
    /// The state store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl ControllerError {
    /// True when the controller said no (retrying cannot help).
    pub fn is_refusal(&self) -> bool {
        match self {
            ControllerError::Client(c) => c.is_refusal(),
            ControllerError::CaMismatch { .. } | ControllerError::BadAnswer(_) => true,
            _ => false,
        }
    }
}

/// An error and its causes on one line (for logs).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Parses a pinned CA fingerprint.
pub fn parse_pin(s: &str) -> Result<[u8; 32], ControllerError> {
    airlock_proto::parse_fingerprint(s).ok_or_else(|| ControllerError::BadFingerprint(s.to_owned()))
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A one-time enrollment token; never printed.
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    fn parse(text: &str, from: &str) -> Result<Self, ControllerError> {
        let t = text.trim();
        if t.is_empty() || t.len() > 4096 || t.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ControllerError::TokenMalformed(from.to_owned()));
        }
        Ok(Self(t.to_owned()))
    }

    /// Reads the token from a file.
    pub fn from_file(path: &Path) -> Result<Self, ControllerError> {
        let from = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ControllerError::TokenRead { from: from.clone(), source })?;
        Self::parse(&text, &from)
    }

    /// Reads the token from standard input.
    pub fn from_stdin() -> Result<Self, ControllerError> {
        let mut text = String::new();
        std::io::stdin()
            .take(8192)
            .read_to_string(&mut text)
            .map_err(|source| ControllerError::TokenRead { from: "stdin".into(), source })?;
        Self::parse(&text, "stdin")
    }
}

/// Enrolls this agent: generates its key pair, sends the CSR with the token
/// over TLS pinned to `ca_fingerprint`, checks the answer and stores the
/// identity. The private key is written only once the controller accepted.
pub async fn enroll(
    cfg: &AgentConfig,
    url: &str,
    ca_fingerprint: &str,
    token: &Token,
) -> Result<Identity, ControllerError> {
    let paths = IdentityPaths::new(&cfg.appliance.state_dir);
    if Identity::is_enrolled(&paths) {
        return Err(ControllerError::AlreadyEnrolled(paths.record()));
    }
    let pin = parse_pin(ca_fingerprint)?;
    let ep = Endpoint::parse(url)?;
    let fresh = identity::generate(&cfg.appliance.name)?;
    let req = EnrollRequest {
        token: token.0.clone(),
        csr_pem: fresh.csr_pem.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    tracing::info!(controller = %ep.authority(), "enrolling");
    let resp = client::enroll(tls::enroll_config(pin)?, &ep, &req).await?;
    let ca_der = identity::cert_der(&resp.ca_pem, "the controller's CA")?;
    let got = airlock_proto::ca_fingerprint(&ca_der);
    if airlock_proto::parse_fingerprint(&got) != Some(pin) {
        return Err(ControllerError::CaMismatch { got });
    }
    let (validity, spki) = identity::inspect(&resp.certificate_pem, "the issued certificate")?;
    if spki != fresh.spki {
        return Err(IdentityError::KeyMismatch.into());
    }
    if resp.appliance.trim().is_empty() {
        return Err(ControllerError::BadAnswer("no appliance id"));
    }
    Endpoint::parse(&resp.agent_url)?;
    let id = Identity {
        record: identity::ControllerRecord {
            appliance: resp.appliance,
            agent_url: resp.agent_url,
            url: url.to_owned(),
            ca_fingerprint: got,
            enrolled_at: unix_now(),
        },
        key: fresh.key,
        cert_pem: resp.certificate_pem,
        ca_pem: resp.ca_pem,
        bundle_key: identity::parse_bundle_key(&resp.bundle_key)?,
        validity,
    };
    id.store(&paths)?;
    tracing::info!(appliance = %id.record.appliance, not_after = validity.not_after, "enrolled");
    Ok(id)
}

/// What the run loop's tasks share: where the agent listener is and the
/// current TLS identity (replaced by a renewal; new connections use it).
#[derive(Debug)]
pub struct Shared {
    /// The agent listener.
    pub agent: Endpoint,
    /// The appliance id.
    pub appliance: String,
    /// The identity files.
    pub paths: IdentityPaths,
    current: RwLock<(Arc<ClientConfig>, Validity)>,
}

impl Shared {
    /// From a loaded identity.
    pub fn new(id: &Identity, paths: IdentityPaths) -> Result<Self, ControllerError> {
        Ok(Self {
            agent: Endpoint::parse(&id.record.agent_url)?,
            appliance: id.record.appliance.clone(),
            paths,
            current: RwLock::new((tls::agent_config(id)?, id.validity)),
        })
    }
    /// The client configuration for new connections.
    pub fn tls(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner).0)
    }
    /// The current certificate's validity.
    pub fn validity(&self) -> Validity {
        self.current.read().unwrap_or_else(PoisonError::into_inner).1
    }
    /// Switches to a renewed identity.
    pub fn replace(&self, id: &Identity) -> Result<(), ControllerError> {
        let next = (tls::agent_config(id)?, id.validity);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }
}

/// What `run` last did with the controller (`status.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// The bundle version enforced.
    pub applied_version: Option<u64>,
    /// Its policy version.
    pub policy_version: Option<u32>,
    /// The last refusal.
    pub refused: Option<Refusal>,
    /// The stream was open at `updated_at`.
    pub connected: bool,
    /// Unix seconds of the last stream message or connect.
    pub last_contact: Option<u64>,
    /// Unix seconds of this record.
    pub updated_at: u64,
}

impl SyncStatus {
    /// Reads `status.json` (absent or unreadable: default).
    pub fn load(paths: &IdentityPaths) -> Self {
        std::fs::read(paths.status())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
    /// Writes `status.json`.
    pub fn save(&self, paths: &IdentityPaths) -> Result<(), IdentityError> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        identity::write_atomic(&paths.status(), &bytes, 0o644)
    }
}

/// `controller status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    /// Enrolled with a controller.
    pub enrolled: bool,
    /// The appliance id.
    pub appliance: Option<String>,
    /// The main URL enrolled at.
    pub controller_url: Option<String>,
    /// The agent listener.
    pub agent_url: Option<String>,
    /// The pinned CA.
    pub ca_fingerprint: Option<String>,
    /// Client certificate expiry (Unix seconds).
    pub cert_not_after: Option<i64>,
    /// Renewal is due now.
    pub cert_renewal_due: Option<bool>,
    /// What the last-known-good state is: `bundle`, `policy` or `none`.
    pub last_known_good: String,
    /// The applied bundle version.
    pub applied_version: Option<u64>,
    /// Its policy version.
    pub policy_version: Option<u32>,
    /// The last refused bundle.
    pub last_refusal: Option<Refusal>,
    /// The stream was connected when `run` last recorded its state.
    pub stream_connected: bool,
    /// Unix seconds of the last contact with the controller.
    pub last_contact: Option<u64>,
    /// Problems reading the state (the identity or the store).
    pub errors: Vec<String>,
}

/// Gathers [`StatusView`] from the identity files, the store and `status.json`.
pub fn status(cfg: &AgentConfig, store: Option<&dyn crate::store::StateStore>) -> StatusView {
    let paths = IdentityPaths::new(&cfg.appliance.state_dir);
    let mut errors = Vec::new();
    let id = Identity::load(&paths).unwrap_or_else(|e| {
        errors.push(chain(&e));
        None
    });
    let sync = SyncStatus::load(&paths);
    let lkg = store.and_then(|s| {
        s.load_state().unwrap_or_else(|e| {
            errors.push(chain(&e));
            None
        })
    });
    let (kind, applied, policy_version) = match &lkg {
        None => ("none", sync.applied_version, sync.policy_version),
        Some(crate::store::Stored::Bundle(b)) => {
            ("bundle", Some(b.bundle.version), sync.policy_version)
        }
        Some(crate::store::Stored::Policy(l)) => ("policy", None, Some(l.policy.version)),
    };
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    StatusView {
        enrolled: id.is_some(),
        appliance: id.as_ref().map(|i| i.record.appliance.clone()),
        controller_url: id.as_ref().map(|i| i.record.url.clone()),
        agent_url: id.as_ref().map(|i| i.record.agent_url.clone()),
        ca_fingerprint: id.as_ref().map(|i| i.record.ca_fingerprint.clone()),
        cert_not_after: id.as_ref().map(|i| i.validity.not_after),
        cert_renewal_due: id.as_ref().map(|i| identity::renewal_due(i.validity, now)),
        last_known_good: kind.to_owned(),
        applied_version: applied,
        policy_version,
        last_refusal: sync.refused,
        stream_connected: sync.connected,
        last_contact: sync.last_contact,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_printable_word_and_never_shown() {
        let t = Token::parse("  abc.DEF-123_x \n", "f").unwrap();
        assert_eq!(t.0, "abc.DEF-123_x");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        for bad in ["", "  \n", "two words", "a\u{7}b"] {
            assert!(
                matches!(Token::parse(bad, "f"), Err(ControllerError::TokenMalformed(_))),
                "{bad:?}"
            );
        }
        let e = Token::parse("two words", "/run/token").unwrap_err();
        assert!(!e.to_string().contains("two"), "{e}");
    }

    #[test]
    fn pins_parse_or_fail_with_the_text() {
        assert!(parse_pin(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        assert!(matches!(parse_pin("sha256:12"), Err(ControllerError::BadFingerprint(_))));
    }
}
