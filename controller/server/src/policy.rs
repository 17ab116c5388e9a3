//! Policy versions and the bundles compiled from them.
//!
//! Upload → validate (every problem, located) → store as the next version
//! (durable) → compile for every appliance with [`Now::wall`] → sign one
//! [`PolicyBundle`] per appliance with a fresh, strictly increasing version →
//! store it → hand it to the stream hub. A rollback stores the old text as a
//! new version. The controller numbers versions; the text's own `version` is
//! replaced by that number.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use ed25519_dalek::SigningKey;

use airlock_policy::{
    compile, to_portable, validate::Resolved, Diagnostic, FlowEntry, Now, Policy,
};
use airlock_proto::{
    admin::{
        ApplianceDiff, PolicyDiff, PolicyFormat, PolicyProblem, PolicyUpload, PolicyVersion,
        PolicyVersionSummary,
    },
    PolicyBundle, SignedBundle, BUNDLE_FORMAT,
};
use airlock_store::{Store, StoreError};

/// Largest policy text accepted.
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// Policy failures.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text does not validate.
    #[error("the policy has {} problem(s)", .0.len())]
    Invalid(Vec<PolicyProblem>),
    /// No such version.
    #[error("no policy version {0}")]
    UnknownVersion(u32),
    /// Nothing stored yet.
    #[error("no policy has been applied yet")]
    NoPolicy,
    /// The change was prepared against another version than the current one.
    #[error("the policy changed meanwhile: version {} is current now", .current.map_or("none".to_owned(), |v| v.to_string()))]
    Conflict {
        /// The current version.
        current: Option<u32>,
    },
    /// Store failure.
    #[error("policy store")]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error("a stored policy record is unreadable")]
    Corrupt(#[source] serde_json::Error),
}

fn problems(d: Vec<Diagnostic>) -> PolicyError {
    PolicyError::Invalid(
        d.into_iter()
            .map(|d| PolicyProblem {
                line: d.line,
                column: d.column,
                path: d.issue.path,
                message: d.issue.message,
                hint: d.issue.hint,
            })
            .collect(),
    )
}

/// Parses and validates an upload.
pub fn check(text: &str, format: PolicyFormat) -> Result<(Policy, Resolved), PolicyError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::Invalid(vec![PolicyProblem {
            line: None,
            column: None,
            path: "(document)".into(),
            message: format!("the policy is larger than {MAX_POLICY_BYTES} bytes"),
            hint: None,
        }]));
    }
    match format {
        PolicyFormat::Toml => airlock_policy::check_toml(text),
        PolicyFormat::Json => airlock_policy::check_json(text),
    }
    .map_err(problems)
}

fn compiled(r: &Resolved, now: u64) -> Result<BTreeMap<String, Vec<FlowEntry>>, PolicyError> {
    let out = compile(r, &[], Now::wall(now)).map_err(|issues| {
        PolicyError::Invalid(
            issues
                .into_iter()
                .map(|i| PolicyProblem {
                    line: None,
                    column: None,
                    path: i.path,
                    message: i.message,
                    hint: i.hint,
                })
                .collect(),
        )
    })?;
    Ok(out.into_iter().map(|(k, v)| (k, v.entries)).collect())
}

fn be(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn describe(e: &FlowEntry, now: u64) -> String {
    let when = match e.expiry {
        airlock_policy::Expiry::Infrastructure => "infrastructure".to_owned(),
        // Compiled with Now::wall(now): the instant is nanoseconds after `now`.
        airlock_policy::Expiry::At(ns) => {
            let at = now.saturating_add(ns / 1_000_000_000);
            let text = i64::try_from(at)
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_else(|| format!("unix {at}"));
            format!("until {text}")
        }
    };
    format!(
        "{} (rule {}, {when}{})",
        e.flow,
        e.rule_id,
        if e.allow_reply { ", replies" } else { "" }
    )
}

/// A policy and its validated form, shared.
pub type Checked = Arc<(Policy, Resolved)>;

/// The policy service.
#[derive(Debug)]
pub struct Policies {
    store: Store,
    key: SigningKey,
    /// Serializes version and bundle numbering within this process.
    lock: Mutex<()>,
    /// The newest stored bundle version per appliance, so listings need not
    /// decrypt and parse whole bundles: set when signing, filled from the
    /// store on a miss, only ever raised (versions strictly increase).
    versions: Mutex<HashMap<String, u64>>,
    /// The current version's checked model (see [`Policies::current_checked`]).
    checked: Mutex<Option<(u32, Checked)>>,
}

impl Policies {
    /// Over `store`, signing with `key`.
    pub fn new(store: Store, key: SigningKey) -> Self {
        Self {
            store,
            key,
            lock: Mutex::new(()),
            versions: Mutex::new(HashMap::new()),
            checked: Mutex::new(None),
        }
    }

    fn note_version(&self, appliance: &str, v: u64) {
        let mut m = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(appliance.to_owned()).or_insert(v);
        *e = (*e).max(v);
    }

    /// The version of the newest stored bundle of an appliance.
    pub fn desired_version(&self, appliance: &str) -> Result<Option<u64>, PolicyError> {
        let known = self.versions.lock().unwrap_or_else(|p| p.into_inner()).get(appliance).copied();
        if known.is_some() {
            return Ok(known);
        }
        let v = self.stored_bundle(appliance)?.map(|b| b.version);
        if let Some(v) = v {
            self.note_version(appliance, v);
        }
        Ok(v)
    }

    /// The bundle-signing public key.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }

    /// The current version number.
    pub fn current_version(&self) -> Result<Option<u32>, PolicyError> {
        Ok(self
            .store
            .tree("policy")?
            .get(b"current")?
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map(u32::from_be_bytes))
    }

    /// One stored version.
    pub fn version(&self, v: u32) -> Result<PolicyVersion, PolicyError> {
        let raw = self
            .store
            .tree("policy_versions")?
            .get(&be(v))?
            .ok_or(PolicyError::UnknownVersion(v))?;
        serde_json::from_slice(&raw).map_err(PolicyError::Corrupt)
    }

    /// The current version, if any.
    pub fn current(&self) -> Result<Option<PolicyVersion>, PolicyError> {
        self.current_version()?.map(|v| self.version(v)).transpose()
    }

    /// Every version, newest first.
    pub fn history(&self) -> Result<Vec<PolicyVersionSummary>, PolicyError> {
        let mut out = Vec::new();
        for r in self.store.tree("policy_versions")?.scan_prefix(b"") {
            let (_, raw) = r?;
            let p: PolicyVersion = serde_json::from_slice(&raw).map_err(PolicyError::Corrupt)?;
            out.push(PolicyVersionSummary {
                version: p.version,
                author: p.author,
                created_at: p.created_at,
                comment: p.comment,
                rollback_of: p.rollback_of,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// The current version's model, checked: parsed once per version and
    /// shared (a 1,000-appliance policy takes ~25 ms to parse and validate).
    pub fn current_checked(&self) -> Result<Option<Checked>, PolicyError> {
        let Some(v) = self.current_version()? else { return Ok(None) };
        if let Some((cv, c)) = &*self.checked.lock().unwrap_or_else(|p| p.into_inner()) {
            if *cv == v {
                return Ok(Some(c.clone()));
            }
        }
        let p = self.version(v)?;
        let (policy, mut r) = check(&p.text, p.format)?;
        r.version = v;
        let c = Arc::new((policy, r));
        *self.checked.lock().unwrap_or_else(|p| p.into_inner()) = Some((v, c.clone()));
        Ok(Some(c))
    }

    fn current_resolved(&self) -> Result<Option<Checked>, PolicyError> {
        self.current_checked()
    }

    /// What applying `upload` would open and close, per appliance.
    pub fn diff(&self, upload: &PolicyUpload, now: u64) -> Result<PolicyDiff, PolicyError> {
        let (_, mut new) = check(&upload.text, upload.format)?;
        let from = self.current_version()?;
        new.version = from.unwrap_or(0) + 1;
        let old = match self.current_resolved()? {
            Some(r) => compiled(&r.1, now)?,
            None => BTreeMap::new(),
        };
        let new = compiled(&new, now)?;
        let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        let empty = Vec::new();
        let appliances = names
            .into_iter()
            .map(|name| {
                let (a, b) = (old.get(name).unwrap_or(&empty), new.get(name).unwrap_or(&empty));
                let find = |set: &[FlowEntry], e: &FlowEntry| {
                    set.iter().find(|o| o.flow == e.flow).copied()
                };
                let mut d = ApplianceDiff {
                    appliance: name.clone(),
                    opens: vec![],
                    closes: vec![],
                    changes: vec![],
                };
                for e in b {
                    match find(a, e) {
                        None => d.opens.push(describe(e, now)),
                        Some(o)
                            if (o.rule_id, o.allow_reply, o.expiry)
                                != (e.rule_id, e.allow_reply, e.expiry) =>
                        {
                            d.changes.push(describe(e, now))
                        }
                        Some(_) => {}
                    }
                }
                for e in a.iter().filter(|e| find(b, e).is_none()) {
                    d.closes.push(describe(e, now));
                }
                d
            })
            .collect();
        Ok(PolicyDiff { from_version: from, to_version: new_version(from), appliances })
    }

    /// Stores `upload` as the next version and signs bundles for
    /// `appliances` (the enrolled ones; appliances named only in the policy
    /// get theirs when they enroll). Returns the version and the bundles.
    pub fn apply(
        &self,
        upload: &PolicyUpload,
        author: &str,
        rollback_of: Option<u32>,
        appliances: &[String],
        now: u64,
    ) -> Result<(PolicyVersionSummary, Vec<(String, SignedBundle)>), PolicyError> {
        self.apply_checked(upload, author, rollback_of, None, appliances, now)
    }

    /// Like [`apply`](Self::apply), but only while `base` is still the
    /// current version (the version an admin reviewed the diff against);
    /// otherwise [`PolicyError::Conflict`] and nothing changes.
    pub fn apply_on(
        &self,
        upload: &PolicyUpload,
        author: &str,
        base: Option<u32>,
        appliances: &[String],
        now: u64,
    ) -> Result<(PolicyVersionSummary, Vec<(String, SignedBundle)>), PolicyError> {
        self.apply_checked(upload, author, None, Some(base), appliances, now)
    }

    fn apply_checked(
        &self,
        upload: &PolicyUpload,
        author: &str,
        rollback_of: Option<u32>,
        base: Option<Option<u32>>,
        appliances: &[String],
        now: u64,
    ) -> Result<(PolicyVersionSummary, Vec<(String, SignedBundle)>), PolicyError> {
        let (_, mut r) = check(&upload.text, upload.format)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current_version()?;
        if let Some(base) = base.filter(|b| *b != current) {
            tracing::info!(
                ?base,
                ?current,
                "policy apply refused: prepared against an older version"
            );
            return Err(PolicyError::Conflict { current });
        }
        let version = new_version(current);
        r.version = version;
        let compiled = compiled(&r, now)?;
        let stored = PolicyVersion {
            version,
            author: author.to_owned(),
            created_at: now,
            comment: upload.comment.clone(),
            rollback_of,
            text: upload.text.clone(),
            format: upload.format,
        };
        self.store
            .tree("policy_versions")?
            .insert(&be(version), &serde_json::to_vec(&stored).map_err(PolicyError::Corrupt)?)?;
        self.store.tree("policy")?.insert(b"current", &be(version))?;
        let mut bundles = Vec::new();
        for a in appliances {
            let entries = compiled.get(a).cloned().unwrap_or_default();
            bundles.push((a.clone(), self.sign_locked(a, version, &entries, now)?));
        }
        tracing::info!(version, author, appliances = bundles.len(), "policy applied");
        Ok((
            PolicyVersionSummary {
                version,
                author: author.into(),
                created_at: now,
                comment: stored.comment,
                rollback_of,
            },
            bundles,
        ))
    }

    /// Re-applies the text of version `to` as a new version.
    pub fn rollback(
        &self,
        to: u32,
        comment: &str,
        author: &str,
        appliances: &[String],
        now: u64,
    ) -> Result<(PolicyVersionSummary, Vec<(String, SignedBundle)>), PolicyError> {
        let old = self.version(to)?;
        let upload = PolicyUpload {
            text: old.text,
            format: old.format,
            comment: if comment.is_empty() {
                format!("rollback to version {to}")
            } else {
                comment.to_owned()
            },
        };
        self.apply(&upload, author, Some(to), appliances, now)
    }

    /// A freshly signed bundle for one appliance from the current policy
    /// (an empty one — everything dropped — when there is no policy or the
    /// appliance is not in it).
    pub fn bundle_for(&self, appliance: &str, now: u64) -> Result<SignedBundle, PolicyError> {
        let r = self.current_resolved()?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (version, entries) = match &r {
            Some(r) => (r.1.version, compiled(&r.1, now)?.remove(appliance).unwrap_or_default()),
            None => (0, Vec::new()),
        };
        self.sign_locked(appliance, version, &entries, now)
    }

    /// The newest stored bundle of an appliance.
    pub fn stored_bundle(&self, appliance: &str) -> Result<Option<SignedBundle>, PolicyError> {
        match self.store.tree("bundles")?.get(appliance.as_bytes())? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw).map_err(PolicyError::Corrupt)?)),
            None => Ok(None),
        }
    }

    fn sign_locked(
        &self,
        appliance: &str,
        policy_version: u32,
        entries: &[FlowEntry],
        now: u64,
    ) -> Result<SignedBundle, PolicyError> {
        let meta = self.store.tree("policy")?;
        let seq = meta
            .get(b"bundle_seq")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes)
            + 1;
        meta.insert(b"bundle_seq", &seq.to_be_bytes())?;
        let bundle = PolicyBundle {
            format: BUNDLE_FORMAT,
            appliance: appliance.to_owned(),
            version: seq,
            policy_version,
            issued_at: now,
            entries: to_portable(entries, Now::wall(now)),
        };
        let signed = bundle.sign(&self.key);
        self.store.tree("bundles")?.insert(
            appliance.as_bytes(),
            &serde_json::to_vec(&signed).map_err(PolicyError::Corrupt)?,
        )?;
        self.note_version(appliance, signed.version);
        Ok(signed)
    }
}

fn new_version(current: Option<u32>) -> u32 {
    current.unwrap_or(0) + 1
}

/// Loads the bundle-signing key from the store, or creates it.
pub fn signing_key(store: &Store) -> Result<SigningKey, PolicyError> {
    let keys = store.tree("keys")?;
    if let Some(raw) = keys.get(b"bundle-signing")? {
        if let Ok(seed) = <[u8; 32]>::try_from(raw.as_slice()) {
            return Ok(SigningKey::from_bytes(&seed));
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|_| PolicyError::NoPolicy)?;
    if keys.compare_and_swap(b"bundle-signing", None, Some(&seed))?.is_err() {
        return signing_key(store);
    }
    tracing::info!("bundle-signing key created");
    Ok(SigningKey::from_bytes(&seed))
}
