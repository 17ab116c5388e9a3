//! Backups: one file with the store's records and wrapped data keys exactly as they are
//! on disk (ciphertext only), authenticated as a whole.
//!
//! ```text
//! "AIRLOCK-STORE-BACKUP\n" | header_len u32 BE | header JSON
//!     { format, store_id, kms_backend, created_unix, mac_key: WrappedKey }
//! frames: 'T' name_len u32 | name                       a tree (the metadata tree first)
//!         'R' key_len u32 | key | value_len u32 | value a record, as stored
//!         'E' records u64                               the end
//! HMAC-SHA256(mac_key, everything above)  (32 bytes)
//! ```
//! The MAC key is random per backup and stored wrapped by the KMS, so restoring needs
//! the same KMS (key file, token or Vault key) with the KEK versions that wrapped the
//! MAC key and the data keys. `restore` reads the file twice: the first pass checks
//! the structure, the MAC and that the KMS unwraps every data key, and writes nothing;
//! the second writes, and checks the MAC again.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufReader, BufWriter, Read, Write},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
};

use airlock_kms::{Kms, WrappedKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{
    dek_context,
    error::{io_err, kms_err, sled_err},
    to_key, unix_now, DekSet, Store, StoreError, StoreInfo, DEK_PREFIX, META_TREE, STORE_INFO_KEY,
};

const MAGIC: &[u8] = b"AIRLOCK-STORE-BACKUP\n";
const FORMAT: u32 = 1;
const MAC_LEN: usize = 32;
const MAX_HEADER: u32 = 64 * 1024;
const MAX_KEY: u32 = 64 * 1024;
const MAX_VALUE: u32 = 256 * 1024 * 1024;
const SLED_DEFAULT_TREE: &[u8] = b"__sled__default";

type HmacSha256 = Hmac<Sha256>;

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    store_id: String,
    kms_backend: String,
    created_unix: u64,
    mac_key: WrappedKey,
}

/// What [`Store::backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub trees: usize,
    pub records: u64,
    pub bytes: u64,
    /// The KMS backend needed to restore it.
    pub kms_backend: &'static str,
}

/// What [`Store::restore`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub trees: usize,
    pub records: u64,
    pub store_id: String,
}

fn mac_context(store_id: &str) -> Vec<u8> {
    format!("airlock-store/backup-mac/v1/{store_id}").into_bytes()
}

fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

struct MacWriter<W: Write> {
    w: W,
    mac: HmacSha256,
    bytes: u64,
}

impl<W: Write> Write for MacWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.mac.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

pub(crate) fn write(store: &Store, out: &Path) -> Result<BackupReport, StoreError> {
    let inner = &store.inner;
    if out.exists() {
        return Err(StoreError::BackupExists { path: out.to_owned() });
    }
    let mut mac_key = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *mac_key).map_err(StoreError::Random)?;
    let header = Header {
        format: FORMAT,
        store_id: inner.store_id.clone(),
        kms_backend: inner.kms.backend().to_owned(),
        created_unix: unix_now(),
        mac_key: inner
            .kms
            .wrap(&*mac_key, &mac_context(&inner.store_id))
            .map_err(kms_err("wrap backup MAC key"))?,
    };
    let header =
        serde_json::to_vec(&header).map_err(|_| StoreError::Meta { reason: "backup header" })?;

    let mut tmp_name = out.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".partial");
    let tmp = out.with_file_name(tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create"))?;
    let mac = <HmacSha256 as Mac>::new_from_slice(&*mac_key)
        .map_err(|_| StoreError::Meta { reason: "MAC key" })?;
    let mut w = MacWriter { w: BufWriter::new(file), mac, bytes: 0 };
    let io = |e| StoreError::Io { path: tmp.clone(), op: "write", source: e };

    w.write_all(MAGIC).map_err(io)?;
    w.write_all(&len32(header.len())).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    let (mut trees, mut records) = (0usize, 0u64);
    {
        // No writes while copying: the backup is one consistent state.
        let _gate = inner.write_gate.write().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<sled::IVec> = inner.db.tree_names();
        names.retain(|n| &n[..] != SLED_DEFAULT_TREE);
        // The metadata tree first, then the others in name order.
        names.sort_by_key(|n| (&n[..] != META_TREE.as_bytes(), n.clone()));
        for name in names {
            let tree = inner.db.open_tree(&name).map_err(sled_err("open tree"))?;
            w.write_all(b"T").map_err(io)?;
            w.write_all(&len32(name.len())).map_err(io)?;
            w.write_all(&name).map_err(io)?;
            trees += 1;
            for item in tree.iter() {
                let (k, v) = item.map_err(sled_err("scan"))?;
                w.write_all(b"R").map_err(io)?;
                w.write_all(&len32(k.len())).map_err(io)?;
                w.write_all(&k).map_err(io)?;
                w.write_all(&len32(v.len())).map_err(io)?;
                w.write_all(&v).map_err(io)?;
                records += 1;
            }
        }
    }
    w.write_all(b"E").map_err(io)?;
    w.write_all(&records.to_be_bytes()).map_err(io)?;
    let tag = w.mac.finalize().into_bytes();
    let mut bw = w.w;
    bw.write_all(&tag).map_err(io)?;
    let file = bw.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io_err(&tmp, "fsync"))?;
    drop(file);
    fs::rename(&tmp, out).map_err(io_err(out, "rename"))?;
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir, "fsync directory"))?;
    let bytes = w.bytes + MAC_LEN as u64;
    tracing::info!(path = %out.display(), trees, records, bytes, kms = inner.kms.backend(), "wrote store backup");
    Ok(BackupReport { trees: trees - 1, records, bytes, kms_backend: inner.kms.backend() })
}

struct MacReader<R: Read> {
    r: R,
    mac: HmacSha256,
}

impl<R: Read> Read for MacReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.mac.update(&buf[..n]);
        Ok(n)
    }
}

/// The archive opened: its header checked and MAC key unwrapped.
struct Opened {
    header: Header,
    mac_key: Zeroizing<Vec<u8>>,
    body_len: u64,
    header_bytes: Vec<u8>,
}

fn open_archive(path: &Path, kms: &dyn Kms) -> Result<Opened, StoreError> {
    let bad = |reason| StoreError::BackupFormat { path: path.to_owned(), reason };
    let len = fs::metadata(path).map_err(io_err(path, "stat"))?.len();
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let mut magic = vec![0u8; MAGIC.len()];
    let mut hlen = [0u8; 4];
    f.read_exact(&mut magic)
        .and_then(|()| f.read_exact(&mut hlen))
        .map_err(|_| bad("truncated"))?;
    if magic != MAGIC {
        return Err(bad("not an airlock store backup"));
    }
    let hlen = u32::from_be_bytes(hlen);
    if hlen > MAX_HEADER {
        return Err(bad("header too large"));
    }
    let mut header_bytes = vec![0u8; hlen as usize];
    f.read_exact(&mut header_bytes).map_err(|_| bad("truncated"))?;
    let header: Header =
        serde_json::from_slice(&header_bytes).map_err(|_| bad("header is not valid JSON"))?;
    if header.format != FORMAT {
        return Err(bad("unknown backup format"));
    }
    if header.kms_backend != kms.backend() {
        return Err(StoreError::BackendMismatch {
            stored: header.kms_backend,
            configured: kms.backend(),
        });
    }
    let prefix = (MAGIC.len() + 4 + header_bytes.len() + MAC_LEN) as u64;
    if len < prefix + 9 {
        return Err(bad("truncated"));
    }
    // An altered header may make this fail (its context binds the store id): that is
    // an integrity failure too.
    let mac_key = kms
        .unwrap(&header.mac_key, &mac_context(&header.store_id))
        .map_err(|_| StoreError::BackupIntegrity { path: path.to_owned() })?;
    Ok(Opened { header, mac_key, body_len: len - MAC_LEN as u64, header_bytes })
}

/// Reads the frames after the header, calling `on_tree` and `on_record`, and checks the
/// MAC at the end. Returns (trees, records).
fn read_frames(
    path: &Path,
    o: &Opened,
    mut on_tree: impl FnMut(&[u8]) -> Result<(), StoreError>,
    mut on_record: impl FnMut(&[u8], &[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(usize, u64), StoreError> {
    let bad = |reason| StoreError::BackupFormat { path: path.to_owned(), reason };
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&o.mac_key)
        .map_err(|_| StoreError::BackupIntegrity { path: path.to_owned() })?;
    let skip = MAGIC.len() + 4 + o.header_bytes.len();
    let mut head = vec![0u8; skip];
    f.read_exact(&mut head).map_err(|_| bad("truncated"))?;
    mac.update(&head);
    let mut r = MacReader { r: BufReader::new(f.take(o.body_len - skip as u64)), mac };

    fn u32_of(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok().map(|()| u32::from_be_bytes(b))
    }
    fn bytes_of(r: &mut impl Read, n: u32) -> Option<Vec<u8>> {
        let mut b = vec![0u8; n as usize];
        r.read_exact(&mut b).ok().map(|()| b)
    }

    let (mut trees, mut records) = (0usize, 0u64);
    let mut tree: Option<Vec<u8>> = None;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(|_| bad("truncated"))?;
        match tag[0] {
            b'T' => {
                let n = u32_of(&mut r).ok_or_else(|| bad("truncated"))?;
                if n == 0 || n > 256 {
                    return Err(bad("tree name length"));
                }
                let name = bytes_of(&mut r, n).ok_or_else(|| bad("truncated"))?;
                on_tree(&name)?;
                tree = Some(name);
                trees += 1;
            }
            b'R' => {
                let name = tree.as_deref().ok_or_else(|| bad("record before any tree"))?;
                let kl =
                    u32_of(&mut r).filter(|n| *n <= MAX_KEY).ok_or_else(|| bad("record key"))?;
                let k = bytes_of(&mut r, kl).ok_or_else(|| bad("truncated"))?;
                let vl = u32_of(&mut r)
                    .filter(|n| *n <= MAX_VALUE)
                    .ok_or_else(|| bad("record value"))?;
                let v = bytes_of(&mut r, vl).ok_or_else(|| bad("truncated"))?;
                on_record(name, &k, &v)?;
                records += 1;
            }
            b'E' => {
                let mut n = [0u8; 8];
                r.read_exact(&mut n).map_err(|_| bad("truncated"))?;
                if u64::from_be_bytes(n) != records {
                    return Err(bad("record count"));
                }
                let mut rest = [0u8; 1];
                if r.read(&mut rest).map_err(io_err(path, "read"))? != 0 {
                    return Err(bad("data after the end frame"));
                }
                break;
            }
            _ => return Err(bad("unknown frame")),
        }
    }
    let MacReader { r, mac } = r;
    let mut f = r.into_inner().into_inner();
    let mut tag = [0u8; MAC_LEN];
    f.read_exact(&mut tag).map_err(|_| bad("truncated"))?;
    mac.verify_slice(&tag).map_err(|_| StoreError::BackupIntegrity { path: path.to_owned() })?;
    Ok((trees, records))
}

fn is_empty_dir(dir: &Path) -> Result<bool, StoreError> {
    if !dir.exists() {
        return Ok(true);
    }
    Ok(fs::read_dir(dir).map_err(io_err(dir, "list"))?.next().is_none())
}

pub(crate) fn restore(
    archive: &Path,
    dir: &Path,
    kms: Arc<dyn Kms>,
) -> Result<RestoreReport, StoreError> {
    if !is_empty_dir(dir)? {
        return Err(StoreError::TargetNotEmpty { path: dir.to_owned() });
    }
    let opened = open_archive(archive, &*kms)?;
    let store_id = opened.header.store_id.clone();

    // Pass 1: structure, MAC, and every data key unwraps. Nothing is written.
    let mut deks: Vec<(String, DekSet)> = Vec::new();
    let mut info: Option<StoreInfo> = None;
    read_frames(
        archive,
        &opened,
        |_| Ok(()),
        |tree, k, v| {
            if tree == META_TREE.as_bytes() {
                if k == STORE_INFO_KEY {
                    info = serde_json::from_slice(v).ok();
                } else if let Some(name) = k.strip_prefix(DEK_PREFIX) {
                    let set: DekSet = serde_json::from_slice(v)
                        .map_err(|_| StoreError::Meta { reason: "data key set in backup" })?;
                    deks.push((String::from_utf8_lossy(name).into_owned(), set));
                }
            }
            Ok(())
        },
    )?;
    let info = info.ok_or(StoreError::Meta { reason: "backup has no store info" })?;
    if info.store_id != store_id || info.kms_backend != kms.backend() {
        return Err(StoreError::Meta { reason: "backup header and store info disagree" });
    }
    for (tree, set) in &deks {
        for (&v, wrapped) in &set.wrapped {
            let dek = kms
                .unwrap(wrapped, &dek_context(&store_id, tree, v))
                .map_err(kms_err("unwrap data key from backup"))?;
            to_key(&dek)?;
        }
    }

    // Pass 2: write, checking the MAC again (the file could change between passes).
    let created = !dir.exists();
    if created {
        fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir, "chmod"))?;
    }
    let result = (|| {
        let db = sled::Config::new().path(dir).open().map_err(sled_err("open"))?;
        let current: std::cell::RefCell<Option<sled::Tree>> = std::cell::RefCell::new(None);
        let counts = read_frames(
            archive,
            &opened,
            |name| {
                *current.borrow_mut() = Some(db.open_tree(name).map_err(sled_err("open tree"))?);
                Ok(())
            },
            |_, k, v| {
                let t = current.borrow();
                let t = t.as_ref().ok_or(StoreError::Meta { reason: "record before tree" })?;
                t.insert(k, v).map(drop).map_err(sled_err("insert"))
            },
        )?;
        db.flush().map_err(sled_err("flush"))?;
        Ok::<_, StoreError>(counts)
    })();
    match result {
        Ok((trees, records)) => {
            tracing::info!(path = %archive.display(), dir = %dir.display(), trees, records, "restored store backup");
            Ok(RestoreReport { trees: trees.saturating_sub(1), records, store_id })
        }
        Err(e) => {
            // Leave the target as it was: empty.
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let p = entry.path();
                    let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                }
            }
            if created {
                let _ = fs::remove_dir(dir);
            }
            Err(e)
        }
    }
}
