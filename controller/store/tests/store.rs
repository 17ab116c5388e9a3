//! Integration tests of the encrypted store: round trips over each KMS backend,
//! tamper and swap detection through a raw sled handle, online KEK rotation, backup and
//! restore, concurrent compare-and-swap, and durability under SIGKILL.

#[path = "../../kms/tests/kms/vault_standin.rs"]
mod vault_standin;

use std::{
    collections::HashSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use airlock_kms::{
    BuiltinKms, Kms, Pkcs11Config, Pkcs11Kms, Protection, SecretString, VaultTransitConfig,
    VaultTransitKms,
};
use airlock_store::{Store, StoreError, META_TREE};

fn builtin(dir: &Path) -> Arc<BuiltinKms> {
    Arc::new(
        BuiltinKms::open_or_create(&dir.join("kek.json"), Protection::Keyfile)
            .expect("built-in KMS"),
    )
}

/// Insert, get, overwrite, remove, scan and JSON over any backend; the values survive
/// a reopen and never appear in the clear in the store's files.
fn round_trip(dir: &Path, kms: Arc<dyn Kms>) {
    let db = dir.join("db");
    {
        let store = Store::open(&db, kms.clone()).expect("open");
        let t = store.tree("appliances").expect("tree");
        t.insert(b"app/1", b"PLAINTEXT-MARKER-one").expect("insert");
        t.insert(b"app/2", b"PLAINTEXT-MARKER-two").expect("insert");
        t.insert(b"other", b"PLAINTEXT-MARKER-three").expect("insert");
        t.insert(b"app/2", b"PLAINTEXT-MARKER-two-v2").expect("overwrite");
        assert_eq!(
            t.get(b"app/1").expect("get").as_deref().map(|v| &v[..]),
            Some(&b"PLAINTEXT-MARKER-one"[..])
        );
        assert!(t.get(b"missing").expect("get").is_none());
        let scanned: Vec<(Vec<u8>, Vec<u8>)> = t
            .scan_prefix(b"app/")
            .map(|r| r.map(|(k, v)| (k, v.to_vec())))
            .collect::<Result<_, _>>()
            .expect("scan");
        assert_eq!(
            scanned,
            vec![
                (b"app/1".to_vec(), b"PLAINTEXT-MARKER-one".to_vec()),
                (b"app/2".to_vec(), b"PLAINTEXT-MARKER-two-v2".to_vec())
            ]
        );
        assert!(t.remove(b"other").expect("remove"));
        assert!(!t.remove(b"other").expect("remove again"));
        let cfg = serde_json::json!({"name": "PLAINTEXT-MARKER-json", "ports": [443]});
        store.tree("settings").expect("tree").insert_json(b"cfg", &cfg).expect("insert_json");
    }
    let store = Store::open(&db, kms).expect("reopen");
    let t = store.tree("appliances").expect("tree");
    assert_eq!(
        t.get(b"app/2").expect("get").as_deref().map(|v| &v[..]),
        Some(&b"PLAINTEXT-MARKER-two-v2"[..])
    );
    assert!(t.get(b"other").expect("get").is_none());
    let cfg: serde_json::Value =
        store.tree("settings").expect("tree").get_json(b"cfg").expect("get_json").expect("present");
    assert_eq!(cfg["ports"][0], 443);
    assert_eq!(
        store.tree_names().expect("names"),
        vec!["appliances".to_owned(), "settings".to_owned()]
    );
    drop((t, store));
    assert_no_plaintext_on_disk(&db, b"PLAINTEXT-MARKER");
}

fn assert_no_plaintext_on_disk(dir: &Path, needle: &[u8]) {
    let mut files = vec![dir.to_path_buf()];
    let mut checked = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(fs::read_dir(&p).expect("list").map(|e| e.expect("entry").path()));
        } else {
            let bytes = fs::read(&p).expect("read");
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "plaintext found in {}",
                p.display()
            );
            checked += bytes.len();
        }
    }
    assert!(checked > 0, "the store wrote files");
}

#[test]
fn round_trip_builtin_keyfile() {
    let dir = tempfile::tempdir().expect("tempdir");
    round_trip(dir.path(), builtin(dir.path()));
}

#[test]
fn round_trip_pkcs11_softhsm2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.path().join("softhsm2.conf");
    fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\n", tokens.display()),
    )
    .expect("conf");
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            "store-test",
            "--so-pin",
            "5678",
            "--pin",
            "1234",
        ])
        .output()
        .expect("softhsm2-util");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The only test in this binary that loads SoftHSM2.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let cfg = Pkcs11Config {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        token_label: "store-test".into(),
        key_label: "airlock-kek".into(),
    };
    let kms: Arc<dyn Kms> =
        Arc::new(Pkcs11Kms::open(&cfg, &SecretString::from("1234".to_owned())).expect("pkcs11"));
    round_trip(dir.path(), kms.clone());
    let store = Store::open(&dir.path().join("db"), kms).expect("open");
    let report = store.rotate_kek().expect("rotate in the token");
    assert_eq!(report.kek_version, 2);
    assert_eq!(report.deks_rewrapped, 2);
    assert!(store.tree("appliances").expect("tree").get(b"app/1").expect("get").is_some());
}

#[test]
fn round_trip_vault_transit_standin_and_backend_mismatch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let standin = vault_standin::VaultStandin::start("tok");
    let cfg = VaultTransitConfig {
        address: standin.address(),
        mount: "transit".into(),
        key: "airlock-store".into(),
        derived: true,
        create_key: true,
        ca_file: None,
        timeout_secs: 5,
    };
    let kms: Arc<dyn Kms> = Arc::new(
        VaultTransitKms::connect(cfg, SecretString::from("tok".to_owned())).expect("stand-in"),
    );
    round_trip(dir.path(), kms.clone());
    let store = Store::open(&dir.path().join("db"), kms).expect("open");
    let report = store.rotate_kek().expect("rotate");
    assert_eq!((report.kek_version, report.deks_rewrapped), (2, 2));
    assert!(
        standin.requests().iter().any(|r| r == "POST /v1/transit/rewrap/airlock-store"),
        "server-side rewrap"
    );
    drop(store);

    let err = Store::open(&dir.path().join("db"), builtin(dir.path())).expect_err("other backend");
    assert!(matches!(err, StoreError::BackendMismatch { .. }), "{err:?}");
}

/// Flips one byte of the stored value of `key` in `tree` through a raw sled handle.
fn with_raw_sled(db: &Path, f: impl FnOnce(&sled::Db)) {
    let raw = sled::open(db).expect("raw sled");
    f(&raw);
    raw.flush().expect("flush");
}

#[test]
fn tampered_ciphertext_is_detected_and_never_returned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let kms = builtin(dir.path());
    {
        let store = Store::open(&db, kms.clone()).expect("open");
        let t = store.tree("tokens").expect("tree");
        for k in ["a", "b", "c", "d"] {
            t.insert(k.as_bytes(), b"secret-enrollment-token").expect("insert");
        }
    }
    with_raw_sled(&db, |raw| {
        let t = raw.open_tree("tokens").expect("tree");
        // a: a flipped ciphertext byte; b: a flipped tag byte; c: another DEK version;
        // d: truncated.
        let mut a = t.get("a").expect("get").expect("a").to_vec();
        a[40] ^= 0x01;
        t.insert("a", a).expect("insert");
        let mut b = t.get("b").expect("get").expect("b").to_vec();
        let last = b.len() - 1;
        b[last] ^= 0x80;
        t.insert("b", b).expect("insert");
        let mut c = t.get("c").expect("get").expect("c").to_vec();
        c[4] = 2;
        t.insert("c", c).expect("insert");
        let d = t.get("d").expect("get").expect("d").to_vec();
        t.insert("d", &d[..20]).expect("insert");
    });
    let store = Store::open(&db, kms).expect("open");
    let t = store.tree("tokens").expect("tree");
    for k in ["a", "b", "c", "d"] {
        let err = t.get(k.as_bytes()).expect_err("tampered record");
        match &err {
            StoreError::Integrity { tree, key } => {
                assert_eq!((tree.as_str(), key.as_str()), ("tokens", k))
            }
            other => panic!("expected Integrity, got {other:?}"),
        }
        assert!(!format!("{err} {err:?}").contains("secret-enrollment"), "no value in the error");
    }
    let results: Vec<_> = t.iter().collect();
    assert_eq!(results.len(), 4);
    assert!(
        results.iter().all(|r| matches!(r, Err(StoreError::Integrity { .. }))),
        "scan returns no tampered data"
    );
    let cas = t
        .compare_and_swap(b"a", Some(b"secret-enrollment-token"), None)
        .expect_err("cas on tampered");
    assert!(matches!(cas, StoreError::Integrity { .. }));
}

#[test]
fn a_record_copied_to_another_key_or_tree_does_not_decrypt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let kms = builtin(dir.path());
    {
        let store = Store::open(&db, kms.clone()).expect("open");
        store.tree("users").expect("tree").insert(b"alice", b"role=admin").expect("insert");
        store.tree("users").expect("tree").insert(b"mallory", b"role=viewer").expect("insert");
        store.tree("audit").expect("tree").insert(b"x", b"entry").expect("insert");
    }
    with_raw_sled(&db, |raw| {
        let users = raw.open_tree("users").expect("tree");
        let admin = users.get("alice").expect("get").expect("alice");
        users.insert("mallory", admin.clone()).expect("swap within tree");
        raw.open_tree("audit").expect("tree").insert("alice", admin).expect("copy to another tree");
    });
    let store = Store::open(&db, kms).expect("open");
    let err = store.tree("users").expect("tree").get(b"mallory").expect_err("swapped");
    assert!(matches!(err, StoreError::Integrity { ref key, .. } if key == "mallory"), "{err:?}");
    let err = store.tree("audit").expect("tree").get(b"alice").expect_err("copied across trees");
    assert!(matches!(err, StoreError::Integrity { ref tree, .. } if tree == "audit"), "{err:?}");
    assert_eq!(
        &store.tree("users").expect("tree").get(b"alice").expect("get").expect("alice")[..],
        b"role=admin"
    );
}

#[test]
fn wrapped_data_keys_are_bound_to_their_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let kms = builtin(dir.path());
    {
        let store = Store::open(&db, kms.clone()).expect("open");
        store.tree("a").expect("tree").insert(b"k", b"v").expect("insert");
        store.tree("b").expect("tree").insert(b"k", b"v").expect("insert");
    }
    with_raw_sled(&db, |raw| {
        let meta = raw.open_tree(META_TREE).expect("meta");
        let a = meta.get("dek/a").expect("get").expect("dek/a");
        assert!(!a.windows(32).any(|w| w.iter().all(|b| *b == 0)), "not a plaintext key");
        meta.insert("dek/b", a).expect("swap wrapped keys");
    });
    let store = Store::open(&db, kms).expect("open");
    let err = store.tree("b").expect_err("a's wrapped key under b's name");
    assert!(matches!(err, StoreError::Kms { .. }), "{err:?}");
}

#[test]
fn tree_names_are_validated_and_meta_is_reserved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db"), builtin(dir.path())).expect("open");
    for bad in ["", META_TREE, "__sled__default", &"x".repeat(129)] {
        let err = store.tree(bad).expect_err("invalid name");
        assert!(matches!(err, StoreError::InvalidTreeName { .. }), "{bad:?}: {err:?}");
    }
}

#[test]
fn kek_rotation_is_online_and_old_versions_can_be_retired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let kms = builtin(dir.path());
    let store = Store::open(&db, kms.clone()).expect("open");
    for name in ["a", "b", "c"] {
        let t = store.tree(name).expect("tree");
        for i in 0..50u32 {
            t.insert(format!("k{i:03}").as_bytes(), format!("{name}-{i}").as_bytes())
                .expect("insert");
        }
    }
    assert!(store.dek_kek_versions().expect("versions").values().all(|v| v == &[1]));

    // Readers and writers keep going while the KEK rotates.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let t = store.tree("a").expect("tree");
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 20 {
                    let key = format!("live-{w}-{n}");
                    t.insert(key.as_bytes(), key.as_bytes()).expect("write during rotation");
                    assert_eq!(
                        &t.get(b"k007").expect("read during rotation").expect("k007")[..],
                        b"a-7"
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let report = store.rotate_kek().expect("rotate");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written: u32 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    assert_eq!(report.kek_version, 2);
    assert_eq!(report.deks_rewrapped, 3);
    assert!(
        store.dek_kek_versions().expect("versions").values().all(|v| v == &[2]),
        "every DEK under v2"
    );
    store.tree("d").expect("new tree after rotation").insert(b"k", b"v").expect("insert");
    assert_eq!(
        store.dek_kek_versions().expect("versions")["d"],
        vec![2],
        "new DEKs use the new KEK"
    );
    drop(store);

    // Proof that the rewrap is complete: destroy KEK v1 and read everything.
    assert_eq!(kms.retire_before(2).expect("retire"), 1);
    let kms_v2_only: Arc<dyn Kms> = Arc::new(
        BuiltinKms::open(&dir.path().join("kek.json"), Protection::Keyfile).expect("reopen kms"),
    );
    let store = Store::open(&db, kms_v2_only).expect("open with v2 only");
    for name in ["a", "b", "c"] {
        let t = store.tree(name).expect("tree unwraps with v2 only");
        assert_eq!(
            t.iter().filter(|r| r.is_ok()).count(),
            if name == "a" { 50 + written as usize } else { 50 }
        );
        assert_eq!(
            &t.get(b"k049").expect("get").expect("k049")[..],
            format!("{name}-49").as_bytes()
        );
    }
}

fn fill(store: &Store) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut all = Vec::new();
    for name in ["appliances", "enrollment", "audit"] {
        let t = store.tree(name).expect("tree");
        for i in 0..40u32 {
            let (k, v) =
                (format!("{name}/{i:04}").into_bytes(), vec![i as u8; 100 + i as usize * 37]);
            t.insert(&k, &v).expect("insert");
            all.push((name.to_owned(), k, v));
        }
    }
    all
}

#[test]
fn backup_and_restore_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = builtin(dir.path());
    let store = Store::open(&dir.path().join("db"), kms.clone()).expect("open");
    let all = fill(&store);
    store.rotate_kek().expect("rotate before the backup");
    let archive = dir.path().join("store.backup");
    let report = store.backup(&archive).expect("backup");
    assert_eq!(
        (report.trees, report.records),
        (3, 120 + 4),
        "3 trees, their records + store info + 3 DEKs"
    );
    assert_eq!(report.kms_backend, "builtin");
    assert_eq!(report.bytes, fs::metadata(&archive).expect("stat").len());
    assert!(
        matches!(store.backup(&archive), Err(StoreError::BackupExists { .. })),
        "never overwrites"
    );
    assert_no_plaintext_on_disk(&dir.path().join("db"), b"appliances/0001\x01");

    let target = dir.path().join("restored");
    let restored = Store::restore(&archive, &target, kms.clone()).expect("restore");
    assert_eq!((restored.trees, restored.records), (3, 124));
    assert_eq!(restored.store_id, store.id());
    let copy = Store::open(&target, kms.clone()).expect("open restored");
    for (tree, k, v) in &all {
        assert_eq!(
            &copy.tree(tree).expect("tree").get(k).expect("get").expect("present")[..],
            &v[..]
        );
    }
    drop(copy);

    let err = Store::restore(&archive, &target, kms).expect_err("non-empty target");
    assert!(matches!(err, StoreError::TargetNotEmpty { .. }), "{err:?}");
}

#[test]
fn a_tampered_or_truncated_backup_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = builtin(dir.path());
    let store = Store::open(&dir.path().join("db"), kms.clone()).expect("open");
    fill(&store);
    let archive = dir.path().join("store.backup");
    store.backup(&archive).expect("backup");
    let good = fs::read(&archive).expect("read");

    let header_end = 21 + 4 + u32::from_be_bytes(good[21..25].try_into().expect("len")) as usize;
    let positions = [30, header_end + 10, good.len() / 2, good.len() - 40, good.len() - 1];
    for (i, pos) in positions.into_iter().enumerate() {
        let mut bad = good.clone();
        bad[pos] ^= 0x04;
        let path = dir.path().join(format!("bad-{i}.backup"));
        fs::write(&path, &bad).expect("write");
        let target = dir.path().join(format!("target-{i}"));
        fs::create_dir(&target).expect("empty target");
        let err = Store::restore(&path, &target, kms.clone()).expect_err("tampered backup");
        assert!(
            matches!(err, StoreError::BackupIntegrity { .. } | StoreError::BackupFormat { .. }),
            "byte {pos}: {err:?}"
        );
        assert_eq!(
            fs::read_dir(&target).expect("list").count(),
            0,
            "byte {pos}: target stays empty"
        );
    }
    let mut short = good.clone();
    short.truncate(good.len() - 100);
    let path = dir.path().join("short.backup");
    fs::write(&path, &short).expect("write");
    let target = dir.path().join("target-short");
    let err = Store::restore(&path, &target, kms.clone()).expect_err("truncated backup");
    assert!(
        matches!(err, StoreError::BackupIntegrity { .. } | StoreError::BackupFormat { .. }),
        "{err:?}"
    );
    assert!(!target.exists(), "a missing target is not even created");

    // Another KMS (another key file) cannot restore it.
    let other = tempfile::tempdir().expect("tempdir");
    let err = Store::restore(&archive, &other.path().join("t"), builtin(other.path()))
        .expect_err("other KEK");
    assert!(matches!(err, StoreError::BackupIntegrity { .. }), "{err:?}");
}

#[test]
fn concurrent_compare_and_swap_has_exactly_one_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db"), builtin(dir.path())).expect("open");
    let t = store.tree("enrollment").expect("tree");
    t.insert(b"token/1", b"unused").expect("insert");
    for (key, expected) in [(&b"token/1"[..], Some(&b"unused"[..])), (&b"token/2"[..], None)] {
        let barrier = Arc::new(Barrier::new(16));
        let results: Vec<bool> = (0..16)
            .map(|i| {
                let (t, barrier) = (t.clone(), barrier.clone());
                let key = key.to_vec();
                let expected = expected.map(<[u8]>::to_vec);
                std::thread::spawn(move || {
                    barrier.wait();
                    let new = format!("used-by-{i}");
                    t.compare_and_swap(&key, expected.as_deref(), Some(new.as_bytes()))
                        .expect("cas")
                        .is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let winners: Vec<usize> =
            results.iter().enumerate().filter(|(_, w)| **w).map(|(i, _)| i).collect();
        assert_eq!(winners.len(), 1, "exactly one winner for {key:?}: {winners:?}");
        let value = t.get(key).expect("get").expect("present");
        assert_eq!(&value[..], format!("used-by-{}", winners[0]).as_bytes());
    }
    let conflict =
        t.compare_and_swap(b"token/1", Some(b"unused"), None).expect("cas").expect_err("used");
    assert!(conflict.current.is_some_and(|v| v.starts_with(b"used-by-")));
    t.compare_and_swap(b"token/1", Some(&t.get(b"token/1").expect("get").expect("v")), None)
        .expect("cas")
        .expect("delete with the right expectation");
    assert!(t.get(b"token/1").expect("get").is_none());
}

const CHILD_ENV: &str = "AIRLOCK_STORE_SIGKILL_CHILD";
const CHILD_TEST: &str = "sigkill_during_writes_loses_no_acknowledged_write";

fn value_for(key: &str) -> Vec<u8> {
    key.as_bytes().iter().cycle().take(300).copied().collect()
}

/// The child role: 4 writer threads; each acknowledged key goes to stdout only after
/// `insert` returned. Stops by itself after 60 s if nobody kills it.
fn child_writer(dir: &Path) {
    let kms: Arc<dyn Kms> =
        Arc::new(BuiltinKms::open(&dir.join("kek.json"), Protection::Keyfile).expect("child KMS"));
    let store = Store::open(&dir.join("db"), kms).expect("child store");
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|w| {
            let t = store.tree("writes").expect("tree");
            std::thread::spawn(move || {
                let mut n = 0u32;
                while started.elapsed() < Duration::from_secs(60) {
                    let key = format!("w{w}-{n:07}");
                    t.insert(key.as_bytes(), &value_for(&key)).expect("child insert");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {key}").expect("stdout");
                    out.flush().expect("stdout");
                    n += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
}

#[test]
fn sigkill_during_writes_loses_no_acknowledged_write() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child_writer(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    BuiltinKms::create(&dir.path().join("kek.json"), Protection::Keyfile).expect("KMS");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the writer");
    let mut acked: Vec<String> = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 400 {
        let Some(line) = lines.next() else { break };
        if let Some(key) = line.expect("line").strip_prefix("ack ") {
            acked.push(key.to_owned());
        }
        assert!(Instant::now() < deadline, "the writer is too slow");
    }
    child.kill().expect("SIGKILL the writer mid-stream");
    let status = child.wait().expect("wait");
    // Acks printed before the kill are acknowledged writes too.
    for line in lines {
        match line {
            Ok(l) => acked.extend(l.strip_prefix("ack ").map(str::to_owned)),
            Err(_) => break,
        }
    }
    assert!(acked.len() >= 400, "the writer acknowledged {} writes before dying", acked.len());
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL, not finished: {status:?}");

    let kms: Arc<dyn Kms> =
        Arc::new(BuiltinKms::open(&dir.path().join("kek.json"), Protection::Keyfile).expect("KMS"));
    let store = Store::open(&dir.path().join("db"), kms).expect("reopen after SIGKILL");
    let t = store.tree("writes").expect("tree");
    for key in &acked {
        let v = t
            .get(key.as_bytes())
            .expect("intact")
            .unwrap_or_else(|| panic!("acknowledged {key} lost"));
        assert_eq!(&v[..], &value_for(key)[..], "{key}");
    }
    // Everything on disk (acknowledged or in flight) decrypts.
    let all: Vec<_> = t.iter().collect::<Result<_, _>>().expect("every record verifies");
    let keys: HashSet<&[u8]> = all.iter().map(|(k, _)| k.as_slice()).collect();
    assert!(acked.iter().all(|k| keys.contains(k.as_bytes())));
    let threads: HashSet<&str> = acked.iter().map(|k| &k[..2]).collect();
    assert!(threads.len() > 1, "several writers were acknowledged: {threads:?}");
    let _: PathBuf = dir.path().to_owned();
}
