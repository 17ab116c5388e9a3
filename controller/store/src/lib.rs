//! The controller's encrypted store: sled, with every value encrypted.
//!
//! Envelope encryption: each tree has its own random 256-bit data key (DEK); values are
//! sealed with XChaCha20-Poly1305 under it, with the tree name, the record key and the
//! DEK version as associated data (see `record.rs` for the exact layout), so a value
//! copied to another key or tree does not decrypt. DEKs are stored only wrapped by the
//! key-encryption key of an [`airlock_kms::Kms`] backend, in the reserved tree
//! `__airlock_meta`; unwrapped DEKs live in memory only.
//!
//! ```text
//!  Tree::insert(k, v) ─▶ seal(DEK_tree, v, ad = tree|k|dek_version) ─▶ sled ─▶ flush (group commit) ─▶ Ok
//!  Tree::get(k) ─▶ sled ─▶ open(...) ─▶ Ok(value) | Err(Integrity { tree, key })  (never the bytes)
//!  __airlock_meta: "store" → store id + KMS backend; "dek/<tree>" → Kms::wrap(DEK, "…/<store id>/<tree>/<version>")
//! ```
//!
//! - **Keys stay plaintext** so that ordering and prefix scans work: a record key must
//!   never hold patient data, a secret or a token (use an id and put the rest in the value).
//! - **Durable writes**: `insert`, `remove` and `compare_and_swap` return only once sled
//!   has flushed and fsynced the write (concurrent flushes share their work inside sled).
//! - **KEK rotation is online**: [`Store::rotate_kek`] asks the KMS for a new version and
//!   rewraps every DEK; reads and writes keep running (they never call the KMS once a
//!   tree is open), and values are not re-encrypted (their DEKs do not change).
//! - **Backups** ([`Store::backup`], [`Store::restore`]) copy the ciphertext and wrapped
//!   DEKs as they are, with an HMAC-SHA256 over the whole file under a key wrapped by the
//!   same KMS: restoring needs that KMS (the same key file, token or Vault key, with the
//!   KEK versions that were current when the backup was taken).
//!
//! What it is not: no query layer, no schema, no caching of values; it does not hide
//! which keys exist or how large values are.

mod backup;
mod error;
mod record;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use airlock_kms::{Kms, WrappedKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
pub use zeroize::Zeroizing;

pub use backup::{BackupReport, RestoreReport};
pub use error::StoreError;
use error::{kms_err, sled_err};
use record::{show_key, TreeKeys};

/// The reserved tree holding store info and wrapped data keys.
pub const META_TREE: &str = "__airlock_meta";
const STORE_INFO_KEY: &[u8] = b"store";
const DEK_PREFIX: &[u8] = b"dek/";
const STORE_FORMAT: u32 = 1;

/// A decrypted value; wiped from memory when dropped.
pub type Value = Zeroizing<Vec<u8>>;

/// The encrypted store. Cheap to clone (an `Arc` inside); share it between threads.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Open trees (their unwrapped data keys). Kept beside `inner`, not in it: a `Tree`
    /// holds `inner`, and a cycle would keep sled (and its lock) open forever.
    trees: Arc<RwLock<HashMap<String, Tree>>>,
}

struct Inner {
    db: sled::Db,
    meta: sled::Tree,
    kms: Arc<dyn Kms>,
    store_id: String,
    /// Serializes DEK creation with KEK rotation.
    dek_lock: Mutex<()>,
    /// Writers hold it shared; a backup holds it exclusively for a consistent copy.
    write_gate: RwLock<()>,
    commit: Durability,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("store_id", &self.inner.store_id)
            .field("kms", &self.inner.kms.backend())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct StoreInfo {
    format: u32,
    store_id: String,
    kms_backend: String,
    created_unix: u64,
}

/// A tree's data keys, each wrapped by the KMS.
#[derive(Serialize, Deserialize)]
struct DekSet {
    current: u32,
    wrapped: BTreeMap<u32, WrappedKey>,
}

/// What [`Store::rotate_kek`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateReport {
    /// The KEK version every data key is now wrapped under.
    pub kek_version: u32,
    /// Wrapped data keys rewritten.
    pub deks_rewrapped: usize,
}

/// `compare_and_swap` found another value than expected; nothing was written.
pub struct CasConflict {
    /// The value found (`None`: the key was absent).
    pub current: Option<Value>,
}

impl std::fmt::Debug for CasConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CasConflict")
            .field("current_len", &self.current.as_ref().map(|v| v.len()))
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn dek_context(store_id: &str, tree: &str, version: u32) -> Vec<u8> {
    format!("airlock-store/dek/v1/{store_id}/{tree}/{version}").into_bytes()
}

impl Store {
    /// Opens (or creates) the store in `dir`. A new directory is created mode 0700.
    pub fn open(dir: &Path, kms: Arc<dyn Kms>) -> Result<Store, StoreError> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(error::io_err(dir, "create directory"))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(error::io_err(dir, "chmod"))?;
        }
        let db = sled::Config::new().path(dir).open().map_err(sled_err("open"))?;
        Self::with_db(db, kms)
    }

    fn with_db(db: sled::Db, kms: Arc<dyn Kms>) -> Result<Store, StoreError> {
        let meta = db.open_tree(META_TREE).map_err(sled_err("open meta tree"))?;
        let info = match meta.get(STORE_INFO_KEY).map_err(sled_err("read store info"))? {
            Some(raw) => {
                let info: StoreInfo = serde_json::from_slice(&raw)
                    .map_err(|_| StoreError::Meta { reason: "store info" })?;
                if info.format != STORE_FORMAT {
                    return Err(StoreError::Meta { reason: "unknown store format" });
                }
                if info.kms_backend != kms.backend() {
                    return Err(StoreError::BackendMismatch {
                        stored: info.kms_backend,
                        configured: kms.backend(),
                    });
                }
                info
            }
            None => {
                let mut id = [0u8; 16];
                getrandom::fill(&mut id).map_err(StoreError::Random)?;
                let info = StoreInfo {
                    format: STORE_FORMAT,
                    store_id: hex::encode(id),
                    kms_backend: kms.backend().to_owned(),
                    created_unix: unix_now(),
                };
                let raw = serde_json::to_vec(&info)
                    .map_err(|_| StoreError::Meta { reason: "store info" })?;
                meta.insert(STORE_INFO_KEY, raw).map_err(sled_err("write store info"))?;
                db.flush().map_err(sled_err("flush"))?;
                tracing::info!(store_id = %info.store_id, kms = kms.backend(), "created encrypted store");
                info
            }
        };
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                meta,
                kms,
                store_id: info.store_id,
                dek_lock: Mutex::new(()),
                write_gate: RwLock::new(()),
                commit: Durability::default(),
            }),
            trees: Arc::new(RwLock::new(HashMap::new())),
        })
    }

    /// The tree `name`, with its data key created (and wrapped by the KMS) on first use.
    pub fn tree(&self, name: &str) -> Result<Tree, StoreError> {
        validate_tree_name(name)?;
        if let Some(t) = self.trees.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(t.clone());
        }
        let keys = self.load_or_create_deks(name)?;
        let sled = self.inner.db.open_tree(name).map_err(sled_err("open tree"))?;
        let tree =
            Tree { store: self.inner.clone(), name: Arc::from(name), sled, keys: Arc::new(keys) };
        let mut trees = self.trees.write().unwrap_or_else(|p| p.into_inner());
        Ok(trees.entry(name.to_owned()).or_insert(tree).clone())
    }

    /// The names of the trees that have data keys, sorted.
    pub fn tree_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for item in self.inner.meta.scan_prefix(DEK_PREFIX) {
            let (k, _) = item.map_err(sled_err("scan meta"))?;
            names.push(String::from_utf8_lossy(&k[DEK_PREFIX.len()..]).into_owned());
        }
        Ok(names)
    }

    fn load_or_create_deks(&self, name: &str) -> Result<TreeKeys, StoreError> {
        let _guard = self.inner.dek_lock.lock().unwrap_or_else(|p| p.into_inner());
        let meta_key = [DEK_PREFIX, name.as_bytes()].concat();
        let kms = &self.inner.kms;
        if let Some(raw) = self.inner.meta.get(&meta_key).map_err(sled_err("read data key"))? {
            let set: DekSet = serde_json::from_slice(&raw)
                .map_err(|_| StoreError::Meta { reason: "data key set" })?;
            let mut keys = BTreeMap::new();
            for (&v, wrapped) in &set.wrapped {
                let dek = kms
                    .unwrap(wrapped, &dek_context(&self.inner.store_id, name, v))
                    .map_err(kms_err("unwrap data key"))?;
                keys.insert(v, to_key(&dek)?);
            }
            if !keys.contains_key(&set.current) {
                return Err(StoreError::Meta { reason: "current data key missing" });
            }
            return Ok(TreeKeys { current: set.current, keys });
        }
        let mut dek = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *dek).map_err(StoreError::Random)?;
        let wrapped = kms
            .wrap(&*dek, &dek_context(&self.inner.store_id, name, 1))
            .map_err(kms_err("wrap data key"))?;
        let kek_version = wrapped.kek_version;
        let set = DekSet { current: 1, wrapped: BTreeMap::from([(1, wrapped)]) };
        let raw =
            serde_json::to_vec(&set).map_err(|_| StoreError::Meta { reason: "data key set" })?;
        self.inner.meta.insert(meta_key, raw).map_err(sled_err("write data key"))?;
        self.inner.commit.sync(&self.inner.db)?;
        tracing::info!(tree = name, kek_version, kms = kms.backend(), "created data key");
        Ok(TreeKeys { current: 1, keys: BTreeMap::from([(1, dek)]) })
    }

    /// Online KEK rotation: a new KEK version in the KMS, then every data key rewrapped
    /// under it (durably). Values are not touched; reads and writes go on meanwhile.
    /// Data keys wrapped under older versions stay readable until the KMS retires them.
    pub fn rotate_kek(&self) -> Result<RotateReport, StoreError> {
        let _guard = self.inner.dek_lock.lock().unwrap_or_else(|p| p.into_inner());
        let kms = &self.inner.kms;
        let kek_version = kms.rotate().map_err(kms_err("rotate"))?;
        let mut deks_rewrapped = 0;
        for item in self.inner.meta.scan_prefix(DEK_PREFIX) {
            let (meta_key, raw) = item.map_err(sled_err("scan data keys"))?;
            let name = String::from_utf8_lossy(&meta_key[DEK_PREFIX.len()..]).into_owned();
            let mut set: DekSet = serde_json::from_slice(&raw)
                .map_err(|_| StoreError::Meta { reason: "data key set" })?;
            let mut changed = false;
            for (&v, wrapped) in set.wrapped.iter_mut() {
                if wrapped.kek_version != kek_version {
                    *wrapped = kms
                        .rewrap(wrapped, &dek_context(&self.inner.store_id, &name, v))
                        .map_err(kms_err("rewrap data key"))?;
                    deks_rewrapped += 1;
                    changed = true;
                }
            }
            if changed {
                let new = serde_json::to_vec(&set)
                    .map_err(|_| StoreError::Meta { reason: "data key set" })?;
                self.inner.meta.insert(meta_key, new).map_err(sled_err("write data key"))?;
            }
        }
        self.inner.commit.sync(&self.inner.db)?;
        tracing::info!(
            kek_version,
            deks_rewrapped,
            kms = kms.backend(),
            "rotated KEK and rewrapped data keys"
        );
        Ok(RotateReport { kek_version, deks_rewrapped })
    }

    /// The KEK version of each tree's wrapped data keys (for status pages and tests).
    pub fn dek_kek_versions(&self) -> Result<BTreeMap<String, Vec<u32>>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self.inner.meta.scan_prefix(DEK_PREFIX) {
            let (k, raw) = item.map_err(sled_err("scan data keys"))?;
            let set: DekSet = serde_json::from_slice(&raw)
                .map_err(|_| StoreError::Meta { reason: "data key set" })?;
            out.insert(
                String::from_utf8_lossy(&k[DEK_PREFIX.len()..]).into_owned(),
                set.wrapped.values().map(|w| w.kek_version).collect(),
            );
        }
        Ok(out)
    }

    /// Flushes and fsyncs everything written so far.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush().map(drop).map_err(sled_err("flush"))
    }

    /// This store's random id (bound into every wrapped data key's context).
    pub fn id(&self) -> &str {
        &self.inner.store_id
    }

    /// How many flushes (write + fsync) durable writes have asked sled for.
    pub fn durable_flushes(&self) -> u64 {
        self.inner.commit.flushes.load(Ordering::Relaxed)
    }

    /// Writes a consistent backup to `out` (a new file, mode 0600; writers wait meanwhile).
    /// The format is described in `backup.rs`; restoring it needs the same KMS.
    pub fn backup(&self, out: &Path) -> Result<BackupReport, StoreError> {
        backup::write(self, out)
    }

    /// Verifies the whole backup `archive` (its MAC, under a key the KMS unwraps, and
    /// that the KMS unwraps every data key in it) and only then writes it into `dir`,
    /// which must be missing or empty.
    pub fn restore(
        archive: &Path,
        dir: &Path,
        kms: Arc<dyn Kms>,
    ) -> Result<RestoreReport, StoreError> {
        backup::restore(archive, dir, kms)
    }
}

fn to_key(dek: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let mut k = Zeroizing::new([0u8; 32]);
    if dek.len() != 32 {
        return Err(StoreError::Meta { reason: "data key of the wrong size" });
    }
    k.copy_from_slice(dek);
    Ok(k)
}

fn validate_tree_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidTreeName { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 bytes");
    }
    if name.starts_with("__") {
        return bad("names starting with `__` are reserved");
    }
    Ok(())
}

/// Durable writes: a write returns once a sled flush (write + fsync) that began after
/// it has completed. sled already lets concurrent flushes share their work; a
/// mutex-based group commit on top measured slower (BENCHMARKS.md), so there is none.
#[derive(Default)]
struct Durability {
    flushes: AtomicU64,
}

impl Durability {
    fn sync(&self, db: &sled::Db) -> Result<(), StoreError> {
        db.flush().map_err(sled_err("flush"))?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One encrypted tree. Cheap to clone.
#[derive(Clone)]
pub struct Tree {
    store: Arc<Inner>,
    name: Arc<str>,
    sled: sled::Tree,
    keys: Arc<TreeKeys>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").field("name", &self.name).finish()
    }
}

impl Tree {
    /// The tree's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value under `key`, decrypted and verified; `Integrity` if it does not verify.
    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, StoreError> {
        match self.sled.get(key).map_err(sled_err("get"))? {
            None => Ok(None),
            Some(raw) => record::open(&self.keys, &self.name, key, &raw).map(Some),
        }
    }

    /// Whether `key` is present (without decrypting).
    pub fn contains_key(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.sled.contains_key(key).map_err(sled_err("contains_key"))
    }

    /// Stores `value` under `key`; on disk when it returns `Ok`.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let _gate = self.store.write_gate.read().unwrap_or_else(|p| p.into_inner());
        let sealed = record::seal(&self.keys, &self.name, key, value)?;
        self.sled.insert(key, sealed).map_err(sled_err("insert"))?;
        self.store.commit.sync(&self.store.db)
    }

    /// Removes `key`; returns whether it was there. On disk when it returns `Ok`.
    pub fn remove(&self, key: &[u8]) -> Result<bool, StoreError> {
        let _gate = self.store.write_gate.read().unwrap_or_else(|p| p.into_inner());
        let existed = self.sled.remove(key).map_err(sled_err("remove"))?.is_some();
        if existed {
            self.store.commit.sync(&self.store.db)?;
        }
        Ok(existed)
    }

    /// Atomically replaces the value under `key` by `new` (`None` removes it) if its
    /// current *plaintext* equals `expected` (`None`: absent). Of many concurrent calls
    /// expecting the same value, exactly one succeeds. On disk when it returns `Ok(Ok(()))`.
    pub fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), CasConflict>, StoreError> {
        let _gate = self.store.write_gate.read().unwrap_or_else(|p| p.into_inner());
        loop {
            let raw = self.sled.get(key).map_err(sled_err("get"))?;
            let current = match &raw {
                None => None,
                Some(r) => Some(record::open(&self.keys, &self.name, key, r)?),
            };
            if current.as_deref().map(|v| &v[..]) != expected {
                return Ok(Err(CasConflict { current }));
            }
            let sealed = match new {
                Some(v) => Some(record::seal(&self.keys, &self.name, key, v)?),
                None => None,
            };
            // The ciphertext (random nonce) identifies the exact version read above.
            match self
                .sled
                .compare_and_swap(key, raw, sealed)
                .map_err(sled_err("compare_and_swap"))?
            {
                Ok(()) => {
                    self.store.commit.sync(&self.store.db)?;
                    return Ok(Ok(()));
                }
                Err(_) => continue, // changed between our read and our swap: look again
            }
        }
    }

    /// Decrypted records whose key starts with `prefix`, in key order. A record that
    /// does not verify yields `Err(Integrity)` and the iteration goes on.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Value), StoreError>> + '_ {
        self.sled.scan_prefix(prefix).map(move |item| {
            let (k, raw) = item.map_err(sled_err("scan"))?;
            let v = record::open(&self.keys, &self.name, &k, &raw)?;
            Ok((k.to_vec(), v))
        })
    }

    /// Every record, in key order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(Vec<u8>, Value), StoreError>> + '_ {
        self.scan_prefix(b"")
    }

    /// The value under `key` as JSON.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|source| StoreError::Json {
                tree: self.name.to_string(),
                key: show_key(key),
                source,
            }),
        }
    }

    /// Stores `value` as JSON under `key` (durably).
    pub fn insert_json<T: Serialize + ?Sized>(
        &self,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = Zeroizing::new(serde_json::to_vec(value).map_err(|source| {
            StoreError::Json { tree: self.name.to_string(), key: show_key(key), source }
        })?);
        self.insert(key, &bytes)
    }
}
