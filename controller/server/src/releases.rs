//! Appliance image releases and their rollout.
//!
//! ```text
//! POST /api/v1/releases (raw bundle) ─▶ temp file in <data>/releases (SHA-256 while writing, fsync)
//!   ─▶ open_verified(update key) + SHA-256 of root.img and both UKIs against the manifest
//!   ─▶ rename to <data>/releases/<release>.bundle ─▶ metadata in the store (tree "releases")
//! PUT /api/v1/rollout {release, appliances} ─▶ the store (tree "rollout", key "current")
//! POST /agent/v1/report {release: state} ─▶ progress(rollout, appliance, state) ─▶ UpdateOffer?
//! GET /agent/v1/releases/{release}/bundle ─▶ the file, while it is offered to that appliance
//! ```
//!
//! The decision ([`progress`], [`offer`]) is a pure function of the rollout,
//! the appliance and its reported state. Bundle files are never held whole in
//! memory. Metadata and the rollout are kept in the encrypted store (durable
//! when written) and mirrored in memory, so a report costs no store read.
//!
//! What it is not: it never builds, signs or applies a bundle (the image
//! build signs, the agent applies and checks the signature again), and it
//! never tells an appliance to reboot.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use airlock_proto::{
    admin::{ReleaseView, RolloutProgress, RolloutView},
    release::{self as rel, ReleaseError, ReleaseState, UpdateOffer},
};
use airlock_store::{Store, StoreError};

/// The largest bundle accepted.
pub const MAX_BUNDLE_BYTES: u64 = 1 << 30;
/// The setting that names the update key (for messages).
pub const KEY_SETTING: &str = "update_key";
const TMP_PREFIX: &str = ".upload-";

/// A stored release: what the API shows of it is all there is to it (the
/// record in the store and the view are one type).
pub type ReleaseMeta = ReleaseView;

/// The rollout in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The release offered.
    pub release: u64,
    /// The appliances; `None`: all.
    pub appliances: Option<Vec<String>>,
    /// Who started it.
    pub started_by: String,
    /// Unix seconds.
    pub started_at: u64,
}

impl Rollout {
    /// Whether it names `appliance`.
    pub fn names(&self, appliance: &str) -> bool {
        self.appliances.as_ref().is_none_or(|l| l.iter().any(|a| a == appliance))
    }

    /// The API view.
    pub fn view(&self) -> RolloutView {
        RolloutView {
            release: self.release,
            appliances: self.appliances.clone(),
            started_by: self.started_by.clone(),
            started_at: self.started_at,
        }
    }
}

/// Where `appliance` is in `rollout`, from the image state it reported
/// (`None`: no report, or not an A/B image). Pure.
pub fn progress(
    rollout: Option<&Rollout>,
    appliance: &str,
    state: Option<&ReleaseState>,
) -> RolloutProgress {
    let Some(r) = rollout.filter(|r| r.names(appliance)) else {
        return RolloutProgress::NotTargeted;
    };
    let Some(s) = state else { return RolloutProgress::NoImage };
    let target = r.release;
    if s.release >= target {
        RolloutProgress::Done
    } else if s.failed_trials.contains(&target) {
        RolloutProgress::FailedTrial
    } else if s.pending == Some(target) {
        RolloutProgress::Pending
    } else if s.in_progress == Some(target) {
        RolloutProgress::Installing
    } else {
        RolloutProgress::Offered
    }
}

/// Whether that progress means the target is offered (also while it is
/// being installed: the agent may ask for it again after a restart).
pub fn is_offered(p: RolloutProgress) -> bool {
    matches!(p, RolloutProgress::Offered | RolloutProgress::Installing)
}

/// The agent path a release is downloaded from.
pub fn bundle_path(release: u64) -> String {
    format!("/agent/v1/releases/{release}/bundle")
}

/// The offer for a report: made when a rollout names the appliance, the
/// report carries an image state, that state runs an older release, the
/// target's trial did not fail there and it is not already pending. Pure.
pub fn offer(
    rollout: Option<&Rollout>,
    meta: Option<&ReleaseMeta>,
    appliance: &str,
    state: Option<&ReleaseState>,
) -> Option<UpdateOffer> {
    let r = rollout?;
    let m = meta.filter(|m| m.release == r.release)?;
    is_offered(progress(Some(r), appliance, state)).then(|| UpdateOffer {
        release: m.release,
        image_version: m.image_version.clone(),
        size: m.size,
        sha256: m.sha256.clone(),
        path: bundle_path(m.release),
    })
}

/// Release and rollout failures; each maps to one API error.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseStoreError {
    /// No update key configured.
    #[error("no image update key is configured: set `{KEY_SETTING}` in the controller configuration to the image update public key file (image-signing.pub)")]
    NoKey,
    /// The body is larger than allowed.
    #[error("the bundle is larger than {} MiB", MAX_BUNDLE_BYTES >> 20)]
    TooLarge,
    /// The bundle does not verify.
    #[error("the bundle was refused: {0}")]
    Invalid(String),
    /// The release exists with other bytes.
    #[error("release {release} was already uploaded with different contents (SHA-256 {have}); a new image needs a new release number")]
    Conflict {
        /// The release.
        release: u64,
        /// The stored bundle's SHA-256.
        have: String,
    },
    /// No such release.
    #[error("no release {0} has been uploaded")]
    UnknownRelease(u64),
    /// Rollout ids that are not enrolled appliances.
    #[error("not enrolled appliances: {}", .0.join(", "))]
    UnknownAppliances(Vec<String>),
    /// An empty appliance list.
    #[error("the appliance list is empty; leave it out to offer the release to every enrolled appliance")]
    EmptyList,
    /// The upload stalled or broke off.
    #[error("the upload broke off: {0}")]
    Upload(String),
    /// Another upload is being received (one at a time bounds the disk
    /// space uploads take to one bundle).
    #[error("another release upload is in progress; try again when it has finished")]
    Busy,
    /// File system.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Store failure.
    #[error("release store")]
    Store(#[from] StoreError),
    /// A stored record is unreadable.
    #[error("a stored release record is unreadable")]
    Corrupt(#[source] serde_json::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReleaseStoreError {
    let what = what.into();
    move |source| ReleaseStoreError::Io { what, source }
}

#[derive(Debug, Default)]
struct Cache {
    releases: BTreeMap<u64, ReleaseMeta>,
    rollout: Option<Rollout>,
}

/// What an upload produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A new release.
    New(ReleaseMeta),
    /// The same bytes were already stored (idempotent).
    Same(ReleaseMeta),
}

/// An upload being written: the temp file and its running hash and size.
#[derive(Debug)]
pub struct Upload {
    path: PathBuf,
    file: Option<File>,
    hash: Sha256,
    size: u64,
    _slot: UploadSlot,
}

/// The one upload allowed at a time; released on drop.
#[derive(Debug)]
struct UploadSlot(Arc<AtomicBool>);

impl UploadSlot {
    /// The slot, or `None` while another upload holds it.
    fn take(flag: &Arc<AtomicBool>) -> Option<UploadSlot> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| UploadSlot(Arc::clone(flag)))
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Upload {
    /// Appends a chunk; refused past [`MAX_BUNDLE_BYTES`].
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ReleaseStoreError> {
        use std::io::Write as _;
        self.size = self.size.saturating_add(chunk.len() as u64);
        if self.size > MAX_BUNDLE_BYTES {
            return Err(ReleaseStoreError::TooLarge);
        }
        self.hash.update(chunk);
        match &mut self.file {
            Some(f) => f.write_all(chunk).map_err(io_err("writing the upload")),
            None => Err(ReleaseStoreError::Upload("the upload was already finished".into())),
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Refused, broken off or renamed: the temp file never stays.
        drop(self.file.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The release service.
#[derive(Debug)]
pub struct Releases {
    store: Store,
    dir: PathBuf,
    key: Option<String>,
    cache: Mutex<Cache>,
    /// Serializes the commit of uploads (check, rename, record).
    commit: Mutex<()>,
    /// Set while an upload is received.
    uploading: Arc<AtomicBool>,
}

fn be(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

impl Releases {
    /// Over `store`, bundle files in `<data_dir>/releases`, verifying with
    /// `key` (hex; `None`: uploads are refused). Removes uploads a crash
    /// left behind and loads the records.
    pub fn open(
        store: Store,
        data_dir: &Path,
        key: Option<String>,
    ) -> Result<Self, ReleaseStoreError> {
        let dir = data_dir.join("releases");
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        for e in std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let e = e.map_err(io_err(format!("reading {}", dir.display())))?;
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut cache = Cache::default();
        for r in store.tree("releases")?.scan_prefix(b"") {
            let (_, raw) = r?;
            let m: ReleaseMeta =
                serde_json::from_slice(&raw).map_err(ReleaseStoreError::Corrupt)?;
            cache.releases.insert(m.release, m);
        }
        cache.rollout = match store.tree("rollout")?.get(b"current")? {
            Some(raw) => Some(serde_json::from_slice(&raw).map_err(ReleaseStoreError::Corrupt)?),
            None => None,
        };
        Ok(Self {
            store,
            dir,
            key,
            cache: Mutex::new(cache),
            commit: Mutex::new(()),
            uploading: Arc::new(AtomicBool::new(false)),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether uploads are possible (an update key is configured).
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// Where a release's bundle file lives.
    pub fn file(&self, release: u64) -> PathBuf {
        self.dir.join(format!("{release}.bundle"))
    }

    /// Every release, newest first.
    pub fn list(&self) -> Vec<ReleaseMeta> {
        self.cache().releases.values().rev().cloned().collect()
    }

    /// One release.
    pub fn get(&self, release: u64) -> Option<ReleaseMeta> {
        self.cache().releases.get(&release).cloned()
    }

    /// The rollout in force.
    pub fn rollout(&self) -> Option<Rollout> {
        self.cache().rollout.clone()
    }

    /// The rollout's target release when it names `appliance`.
    pub fn target_for(&self, appliance: &str) -> Option<u64> {
        self.cache().rollout.as_ref().filter(|r| r.names(appliance)).map(|r| r.release)
    }

    /// The offer for a report of `appliance`.
    pub fn offer_for(&self, appliance: &str, state: Option<&ReleaseState>) -> Option<UpdateOffer> {
        let c = self.cache();
        let meta = c.rollout.as_ref().and_then(|r| c.releases.get(&r.release));
        offer(c.rollout.as_ref(), meta, appliance, state)
    }

    /// Starts an upload: a temp file in the releases directory. Refused
    /// without an update key.
    pub fn begin(&self) -> Result<Upload, ReleaseStoreError> {
        if self.key.is_none() {
            return Err(ReleaseStoreError::NoKey);
        }
        let slot = UploadSlot::take(&self.uploading).ok_or(ReleaseStoreError::Busy)?;
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| ReleaseStoreError::Io {
            what: "random temp name".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let path = self.dir.join(format!("{TMP_PREFIX}{}.tmp", rel::hex(&r)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        Ok(Upload { path, file: Some(file), hash: Sha256::new(), size: 0, _slot: slot })
    }

    /// Finishes an upload (blocking: fsync, verification, hashing): checks
    /// the bundle, then stores it under its release unless that release
    /// exists (same bytes: [`Stored::Same`]; other bytes: conflict).
    pub fn finish(&self, mut up: Upload, by: &str, now: u64) -> Result<Stored, ReleaseStoreError> {
        let key = self.key.clone().ok_or(ReleaseStoreError::NoKey)?;
        let mut file = up
            .file
            .take()
            .ok_or_else(|| ReleaseStoreError::Upload("the upload was already finished".into()))?;
        file.sync_all().map_err(io_err("writing the upload to disk"))?;
        let sha256 = rel::hex(&std::mem::take(&mut up.hash).finalize());
        let manifest = verify_file(&mut file, &key)?;
        drop(file);
        let meta = ReleaseMeta {
            release: manifest.release,
            image_version: manifest.image_version,
            size: up.size,
            sha256,
            uploaded_by: by.to_owned(),
            uploaded_at: now,
        };
        let _g = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(have) = self.get(meta.release) {
            return if have.sha256 == meta.sha256 && have.size == meta.size {
                Ok(Stored::Same(have))
            } else {
                Err(ReleaseStoreError::Conflict { release: meta.release, have: have.sha256 })
            };
        }
        let dest = self.file(meta.release);
        std::fs::rename(&up.path, &dest)
            .map_err(io_err(format!("storing the bundle as {}", dest.display())))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let raw = serde_json::to_vec(&meta).map_err(ReleaseStoreError::Corrupt)?;
        self.store.tree("releases")?.insert(&be(meta.release), &raw)?;
        self.cache().releases.insert(meta.release, meta.clone());
        tracing::info!(release = meta.release, image_version = %meta.image_version,
            size = meta.size, sha256 = %meta.sha256, by, "image release uploaded");
        Ok(Stored::New(meta))
    }

    /// Starts (or replaces) the rollout. `enrolled`: the enrolled appliance ids.
    pub fn start_rollout(
        &self,
        release: u64,
        appliances: Option<Vec<String>>,
        enrolled: &[String],
        by: &str,
        now: u64,
    ) -> Result<Rollout, ReleaseStoreError> {
        if self.get(release).is_none() {
            return Err(ReleaseStoreError::UnknownRelease(release));
        }
        let appliances = match appliances {
            None => None,
            Some(l) if l.is_empty() => return Err(ReleaseStoreError::EmptyList),
            Some(mut l) => {
                l.sort();
                l.dedup();
                let unknown: Vec<String> = l
                    .iter()
                    .filter(|a| !enrolled.contains(a))
                    .map(|a| a.chars().take(80).collect())
                    .collect();
                if !unknown.is_empty() {
                    return Err(ReleaseStoreError::UnknownAppliances(unknown));
                }
                Some(l)
            }
        };
        let r = Rollout { release, appliances, started_by: by.to_owned(), started_at: now };
        let raw = serde_json::to_vec(&r).map_err(ReleaseStoreError::Corrupt)?;
        self.store.tree("rollout")?.insert(b"current", &raw)?;
        self.cache().rollout = Some(r.clone());
        tracing::info!(release, appliances = ?r.appliances, by, "image rollout started");
        Ok(r)
    }

    /// Stops offering; returns the rollout that was in force.
    pub fn stop_rollout(&self, by: &str) -> Result<Option<Rollout>, ReleaseStoreError> {
        self.store.tree("rollout")?.remove(b"current")?;
        let old = self.cache().rollout.take();
        if let Some(r) = &old {
            tracing::info!(release = r.release, by, "image rollout stopped");
        }
        Ok(old)
    }
}

/// Verifies a bundle file: signature and manifest ([`rel::open_verified`]),
/// then the SHA-256 of `root.img` and both UKIs against the manifest.
pub fn verify_file(f: &mut File, key_hex: &str) -> Result<rel::Manifest, ReleaseStoreError> {
    let bad = |e: ReleaseError| match e {
        ReleaseError::Io { what, source } => ReleaseStoreError::Io { what, source },
        other => ReleaseStoreError::Invalid(other.to_string()),
    };
    let v = rel::open_verified(f, key_hex).map_err(bad)?;
    let m = &v.manifest;
    let named = std::iter::once((rel::ROOT_IMAGE, m.root.sha256.as_str()))
        .chain(m.ukis.iter().map(|(n, r)| (n.as_str(), r.sha256.as_str())));
    for (name, want) in named {
        let member = v.members.get(name).ok_or_else(|| {
            ReleaseStoreError::Invalid(format!("{name} is named by the manifest but missing"))
        })?;
        let got = member_sha256(f, member.offset, member.size)?;
        if got != want {
            return Err(ReleaseStoreError::Invalid(format!(
                "{name} does not match the manifest: its SHA-256 is {got}, the signed manifest says {want}"
            )));
        }
    }
    Ok(v.manifest)
}

fn member_sha256(f: &mut File, offset: u64, size: u64) -> Result<String, ReleaseStoreError> {
    f.seek(SeekFrom::Start(offset)).map_err(io_err("reading the bundle"))?;
    let mut h = Sha256::new();
    let mut left = size;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = f.read(&mut buf[..want]).map_err(io_err("reading the bundle"))?;
        if n == 0 {
            return Err(ReleaseStoreError::Invalid("the bundle ends inside a member".into()));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(rel::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RolloutProgress as P;

    fn rollout(release: u64, appliances: Option<&[&str]>) -> Rollout {
        Rollout {
            release,
            appliances: appliances.map(|l| l.iter().map(|s| (*s).to_owned()).collect()),
            started_by: "admin".into(),
            started_at: 1,
        }
    }

    fn state(release: u64) -> ReleaseState {
        ReleaseState { release, slot: "a".into(), ..ReleaseState::default() }
    }

    fn meta(release: u64) -> ReleaseMeta {
        ReleaseMeta {
            release,
            image_version: format!("0.1.0+r{release}"),
            size: 10,
            sha256: "ab".repeat(32),
            uploaded_by: "admin".into(),
            uploaded_at: 1,
        }
    }

    #[test]
    fn one_upload_at_a_time() {
        let flag = Arc::new(AtomicBool::new(false));
        let first = UploadSlot::take(&flag).expect("free");
        assert!(UploadSlot::take(&flag).is_none(), "a second upload while one runs");
        drop(first);
        assert!(UploadSlot::take(&flag).is_some(), "free again once the first ended");
    }

    #[test]
    fn the_offer_needs_a_rollout_naming_the_appliance_and_an_older_image() {
        let all = rollout(5, None);
        let some = rollout(5, Some(&["ward-1"]));
        let m = meta(5);
        let old = state(4);
        let o = offer(Some(&all), Some(&m), "ward-9", Some(&old)).unwrap();
        assert_eq!(
            (o.release, o.size, o.path.as_str(), o.image_version.as_str()),
            (5, 10, "/agent/v1/releases/5/bundle", "0.1.0+r5")
        );
        assert!(offer(Some(&some), Some(&m), "ward-1", Some(&old)).is_some());
        assert!(offer(Some(&some), Some(&m), "ward-2", Some(&old)).is_none(), "not named");
        assert!(offer(None, Some(&m), "ward-1", Some(&old)).is_none(), "no rollout");
        assert!(offer(Some(&all), Some(&m), "ward-1", None).is_none(), "no image state");
        assert!(offer(Some(&all), Some(&m), "ward-1", Some(&state(5))).is_none(), "current");
        assert!(offer(Some(&all), Some(&m), "ward-1", Some(&state(6))).is_none(), "newer");
        assert!(
            offer(Some(&all), Some(&meta(4)), "ward-1", Some(&old)).is_none(),
            "meta of another release"
        );
        assert!(offer(Some(&all), None, "ward-1", Some(&old)).is_none(), "no meta");
        let failed = ReleaseState { failed_trials: vec![3, 5], ..state(4) };
        assert!(offer(Some(&all), Some(&m), "ward-1", Some(&failed)).is_none());
        let pending = ReleaseState { pending: Some(5), ..state(4) };
        assert!(offer(Some(&all), Some(&m), "ward-1", Some(&pending)).is_none());
        let other_pending = ReleaseState { pending: Some(4), failed_trials: vec![3], ..state(3) };
        assert!(offer(Some(&all), Some(&m), "ward-1", Some(&other_pending)).is_some());
        let installing = ReleaseState { in_progress: Some(5), ..state(4) };
        assert!(offer(Some(&all), Some(&m), "ward-1", Some(&installing)).is_some());
    }

    #[test]
    fn progress_names_every_stage() {
        let r = rollout(5, Some(&["a"]));
        assert_eq!(progress(None, "a", Some(&state(1))), P::NotTargeted);
        assert_eq!(progress(Some(&r), "b", Some(&state(1))), P::NotTargeted);
        assert_eq!(progress(Some(&r), "a", None), P::NoImage);
        assert_eq!(progress(Some(&r), "a", Some(&state(4))), P::Offered);
        let s = ReleaseState { in_progress: Some(5), ..state(4) };
        assert_eq!(progress(Some(&r), "a", Some(&s)), P::Installing);
        let s = ReleaseState { pending: Some(5), ..state(4) };
        assert_eq!(progress(Some(&r), "a", Some(&s)), P::Pending);
        let s = ReleaseState { failed_trials: vec![5], pending: Some(5), ..state(4) };
        assert_eq!(progress(Some(&r), "a", Some(&s)), P::FailedTrial);
        assert_eq!(progress(Some(&r), "a", Some(&state(5))), P::Done);
    }
}
