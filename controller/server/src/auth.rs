//! Users, passwords and sessions for the admin API — the part the controller
//! core needs; the identity issue grows it (roles in use, TOTP, LDAP, API
//! tokens, lockout, break-glass) around the same [`authorize`] decision.
//!
//! - Users live in the encrypted store; passwords as Argon2id PHC strings.
//! - There is no default password: the first start creates `admin` with a
//!   random password printed once (see [`bootstrap`]).
//! - Sessions are server-side and in memory (a restart logs everyone out):
//!   random 256-bit tokens, kept as SHA-256 digests, with an idle timeout
//!   (automatic log-off) and an absolute one.

use std::{collections::HashMap, sync::Mutex};

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use airlock_store::{Store, StoreError};

/// What a user may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Network admins: appliances, policy, services.
    Admin,
    /// Hospital staff who approve pushes (push issue).
    Approver,
    /// People or service accounts that request pushes (push issue).
    Requester,
    /// Read-only audit (audit issue).
    Auditor,
}

/// A stored user.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    /// Unique id.
    pub id: String,
    /// Argon2id PHC string.
    pub password: String,
    /// Roles.
    pub roles: Vec<Role>,
    /// A disabled user cannot log in.
    pub disabled: bool,
    /// Unix seconds.
    pub created_at: u64,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// User id.
    pub user: String,
    /// Roles at login.
    pub roles: Vec<Role>,
}

/// What is being done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// List and read appliances.
    ReadAppliances,
    /// Create, revoke appliances; issue tokens.
    ManageAppliances,
    /// Read policy and its history.
    ReadPolicy,
    /// Upload, apply, roll back policy.
    WritePolicy,
    /// Prometheus metrics.
    ReadMetrics,
    /// List image releases, the rollout and each appliance's image.
    ReadReleases,
    /// Upload image releases; start and stop their rollout.
    ManageReleases,
}

/// The one authorization decision, for API and (later) UI.
pub fn authorize(subject: &Subject, action: Action) -> bool {
    let has = |r: Role| subject.roles.contains(&r);
    match action {
        Action::ReadAppliances
        | Action::ReadPolicy
        | Action::ReadMetrics
        | Action::ReadReleases => has(Role::Admin) || has(Role::Auditor),
        Action::ManageAppliances | Action::WritePolicy | Action::ManageReleases => has(Role::Admin),
    }
}

/// Authentication failures. Messages never say whether the user exists.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong user or password, or a disabled user.
    #[error("wrong user or password")]
    Refused,
    /// The store failed.
    #[error("user store")]
    Store(#[from] StoreError),
    /// Hashing failed.
    #[error("password hashing failed")]
    Hash,
    /// A stored user record is unreadable.
    #[error("a stored user record is unreadable")]
    Corrupt(#[source] serde_json::Error),
}

fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|_| AuthError::Hash)?;
    let salt = SaltString::encode_b64(&salt).map_err(|_| AuthError::Hash)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|_| AuthError::Hash)?
        .to_string())
}

/// A random secret: 32 bytes, base64url.
pub fn random_secret() -> Result<String, AuthError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|_| AuthError::Hash)?;
    Ok(B64URL.encode(b))
}

/// Creates the `admin` user with a random password when there is no user at
/// all; returns the password, to be shown once. `None`: users exist.
pub fn bootstrap(store: &Store, now: u64) -> Result<Option<String>, AuthError> {
    let users = store.tree("users")?;
    if users.scan_prefix(b"").next().is_some() {
        return Ok(None);
    }
    let password = random_secret()?;
    let u = User {
        id: "admin".into(),
        password: hash_password(&password)?,
        roles: vec![Role::Admin],
        disabled: false,
        created_at: now,
    };
    let bytes = serde_json::to_vec(&u).map_err(AuthError::Corrupt)?;
    if users.compare_and_swap(b"admin", None, Some(&bytes))?.is_err() {
        return Ok(None);
    }
    Ok(Some(password))
}

/// Sets a user's password (creating the user with `roles` when absent).
pub fn set_password(
    store: &Store,
    user: &str,
    password: &str,
    roles: &[Role],
    now: u64,
) -> Result<(), AuthError> {
    let users = store.tree("users")?;
    let mut u = match users.get(user.as_bytes())? {
        Some(raw) => serde_json::from_slice::<User>(&raw).map_err(AuthError::Corrupt)?,
        None => User {
            id: user.into(),
            password: String::new(),
            roles: roles.to_vec(),
            disabled: false,
            created_at: now,
        },
    };
    u.password = hash_password(password)?;
    users.insert(user.as_bytes(), &serde_json::to_vec(&u).map_err(AuthError::Corrupt)?)?;
    Ok(())
}

#[derive(Clone, Debug)]
struct Session {
    subject: Subject,
    last_used: u64,
    expires_at: u64,
}

/// Server-side sessions.
#[derive(Debug)]
pub struct Sessions {
    idle_secs: u64,
    absolute_secs: u64,
    map: Mutex<HashMap<[u8; 32], Session>>,
    /// A hash of a random password, verified against for unknown users.
    dummy: String,
}

/// A new session.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The bearer token / cookie value.
    pub token: String,
    /// Absolute end.
    pub expires_at: u64,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Sessions {
    /// Sessions end after `idle_secs` unused or `absolute_secs` after login.
    pub fn new(idle_secs: u64, absolute_secs: u64) -> Self {
        let dummy = random_secret().and_then(|p| hash_password(&p)).unwrap_or_default();
        Self { idle_secs, absolute_secs, map: Mutex::new(HashMap::new()), dummy }
    }

    /// The idle timeout.
    pub fn idle_secs(&self) -> u64 {
        self.idle_secs
    }

    /// Checks a password and opens a session. Runs Argon2 also for unknown
    /// users, so timing does not tell who exists.
    pub fn login(
        &self,
        store: &Store,
        user: &str,
        password: &str,
        now: u64,
    ) -> Result<NewSession, AuthError> {
        let users = store.tree("users")?;
        let found = match users.get(user.as_bytes())? {
            Some(raw) => Some(serde_json::from_slice::<User>(&raw).map_err(AuthError::Corrupt)?),
            None => None,
        };
        let phc = found.as_ref().map_or(self.dummy.as_str(), |u| u.password.as_str());
        let ok = PasswordHash::new(phc)
            .is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok());
        let Some(u) = found.filter(|u| ok && !u.disabled) else {
            return Err(AuthError::Refused);
        };
        let token = random_secret()?;
        let expires_at = now + self.absolute_secs;
        let s =
            Session { subject: Subject { user: u.id, roles: u.roles }, last_used: now, expires_at };
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, s| now < s.expires_at && now < s.last_used + self.idle_secs);
        m.insert(digest(&token), s);
        Ok(NewSession { token, expires_at })
    }

    /// The subject of a live session (and marks it used); `None` when unknown,
    /// idle too long or past its absolute end.
    pub fn authenticate(&self, token: &str, now: u64) -> Option<Subject> {
        let key = digest(token);
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.get_mut(&key)?;
        if now >= s.expires_at || now >= s.last_used + self.idle_secs {
            m.remove(&key);
            return None;
        }
        s.last_used = now;
        Some(s.subject.clone())
    }

    /// Like [`authenticate`](Self::authenticate) but without marking the
    /// session used: for the pages' background refreshes, so a dashboard left
    /// open still logs its user off after the idle timeout.
    pub fn peek(&self, token: &str, now: u64) -> Option<Subject> {
        let key = digest(token);
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.get(&key)?;
        if now >= s.expires_at || now >= s.last_used + self.idle_secs {
            m.remove(&key);
            return None;
        }
        Some(s.subject.clone())
    }

    /// The anti-forgery token of a session, for the web UI's forms: derived
    /// from the session secret (which scripts cannot read: the cookie is
    /// `HttpOnly`), so a page on another origin cannot produce it.
    pub fn csrf_token(token: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"airlock-csrf-v1\0");
        h.update(token.as_bytes());
        B64URL.encode(h.finalize())
    }

    /// Whether `presented` is the session's anti-forgery token (constant time).
    pub fn csrf_ok(token: &str, presented: &str) -> bool {
        let want = Self::csrf_token(token);
        want.len() == presented.len()
            && want.bytes().zip(presented.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// Ends a session.
    pub fn logout(&self, token: &str) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&digest(token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(roles: &[Role]) -> Subject {
        Subject { user: "u".into(), roles: roles.to_vec() }
    }

    #[test]
    fn only_admins_change_things_auditors_read() {
        assert!(authorize(&subject(&[Role::Admin]), Action::WritePolicy));
        assert!(!authorize(&subject(&[Role::Auditor]), Action::WritePolicy));
        assert!(authorize(&subject(&[Role::Auditor]), Action::ReadPolicy));
        assert!(authorize(&subject(&[Role::Admin]), Action::ManageReleases));
        assert!(!authorize(&subject(&[Role::Auditor]), Action::ManageReleases));
        assert!(authorize(&subject(&[Role::Auditor]), Action::ReadReleases));
        assert!(!authorize(&subject(&[Role::Approver]), Action::ReadReleases));
        assert!(!authorize(&subject(&[Role::Approver]), Action::ReadAppliances));
        assert!(!authorize(&subject(&[]), Action::ReadMetrics));
    }

    #[test]
    fn sessions_end_when_idle_and_at_their_absolute_end() {
        let s = Sessions::new(900, 8 * 3600);
        let mut m = s.map.lock().unwrap();
        m.insert(
            digest("t"),
            Session { subject: subject(&[Role::Admin]), last_used: 0, expires_at: 8 * 3600 },
        );
        drop(m);
        assert!(s.authenticate("t", 899).is_some());
        assert!(s.authenticate("t", 899 + 899).is_some(), "use resets the idle timer");
        assert!(s.authenticate("t", 899 + 899 + 900).is_none(), "idle for 15 min: logged off");
        assert!(s.authenticate("t", 0).is_none(), "and gone for good");
        let mut m = s.map.lock().unwrap();
        m.insert(
            digest("u"),
            Session {
                subject: subject(&[Role::Admin]),
                last_used: 8 * 3600 - 1,
                expires_at: 8 * 3600,
            },
        );
        drop(m);
        assert!(s.authenticate("u", 8 * 3600).is_none(), "absolute timeout");
        assert!(s.authenticate("nope", 1).is_none());
    }

    #[test]
    fn background_refreshes_do_not_keep_a_session_alive() {
        let s = Sessions::new(900, 8 * 3600);
        s.map.lock().unwrap().insert(
            digest("t"),
            Session { subject: subject(&[Role::Admin]), last_used: 0, expires_at: 8 * 3600 },
        );
        assert!(s.peek("t", 500).is_some());
        assert!(s.peek("t", 899).is_some());
        assert!(s.peek("t", 900).is_none(), "peeks do not reset the idle timer");
        assert!(s.authenticate("t", 901).is_none());
    }

    #[test]
    fn csrf_tokens_bind_to_the_session() {
        let a = Sessions::csrf_token("session-a");
        assert!(Sessions::csrf_ok("session-a", &a));
        assert!(!Sessions::csrf_ok("session-b", &a));
        assert!(!Sessions::csrf_ok("session-a", ""));
        assert!(!Sessions::csrf_ok("session-a", &a[1..]));
    }
}
