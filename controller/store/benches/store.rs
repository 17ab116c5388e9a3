//! Store overhead of encryption: plain sled against the encrypted store (built-in KMS),
//! for durable inserts, point gets and a full scan at 100 B, 1 KiB and 16 KiB values,
//! plus concurrent durable inserts.
//!
//! `cargo bench -p airlock-store --bench store` (figures in BENCHMARKS.md).

use std::{
    hint::black_box,
    path::Path,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use airlock_kms::{BuiltinKms, Kms, Protection};
use airlock_store::Store;

const SIZES: [usize; 3] = [100, 1024, 16 * 1024];
const DURABLE_OPS: usize = 1000;
const RECORDS: usize = 2000;
const GETS: usize = 20_000;
const ROUNDS: usize = 5;

fn key(i: usize) -> [u8; 8] {
    (i as u64).to_be_bytes()
}

/// The fastest round: on a shared, busy machine the least disturbed one.
fn best(v: Vec<Duration>) -> Duration {
    v.into_iter().min().unwrap_or_default()
}

fn per_op(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

struct Plain(sled::Db, sled::Tree);
struct Enc(airlock_store::Tree);

trait Bench {
    fn insert_durable(&self, k: &[u8], v: &[u8]);
    fn get(&self, k: &[u8]) -> usize;
    fn scan(&self) -> usize;
}

impl Bench for Plain {
    fn insert_durable(&self, k: &[u8], v: &[u8]) {
        self.1.insert(k, v).expect("insert");
        self.0.flush().expect("flush");
    }
    fn get(&self, k: &[u8]) -> usize {
        self.1.get(k).expect("get").map_or(0, |v| v.len())
    }
    fn scan(&self) -> usize {
        self.1.iter().map(|r| r.expect("scan").1.len()).sum()
    }
}

impl Bench for Enc {
    fn insert_durable(&self, k: &[u8], v: &[u8]) {
        self.0.insert(k, v).expect("insert");
    }
    fn get(&self, k: &[u8]) -> usize {
        self.0.get(k).expect("get").map_or(0, |v| v.len())
    }
    fn scan(&self) -> usize {
        self.0.iter().map(|r| r.expect("scan").1.len()).sum()
    }
}

fn measure(b: &dyn Bench, size: usize) -> [f64; 3] {
    let value = vec![0x5a; size];
    let insert = best(
        (0..ROUNDS)
            .map(|r| {
                let t = Instant::now();
                for i in 0..DURABLE_OPS {
                    b.insert_durable(&key(1_000_000 + r * DURABLE_OPS + i), &value);
                }
                t.elapsed()
            })
            .collect(),
    );
    for i in 0..RECORDS {
        b.insert_durable(&key(i), &value);
    }
    let get = best(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for i in 0..GETS {
                    black_box(b.get(&key((i * 7919) % RECORDS)));
                }
                t.elapsed()
            })
            .collect(),
    );
    let records = RECORDS + ROUNDS * DURABLE_OPS;
    let scan = best(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                black_box(b.scan());
                t.elapsed()
            })
            .collect(),
    );
    [per_op(insert, DURABLE_OPS), per_op(get, GETS), per_op(scan, records)]
}

fn kms(dir: &Path) -> Arc<dyn Kms> {
    Arc::new(BuiltinKms::create(&dir.join("kek.json"), Protection::Keyfile).expect("kms"))
}

fn tempdir() -> tempfile::TempDir {
    // On the build's disk (not a tmpfs), so that fsync costs what it costs.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn concurrent_plain(threads: usize, per_thread: usize) -> f64 {
    let dir = tempdir();
    let db = sled::Config::new().path(dir.path().join("db")).open().expect("sled");
    let tree = db.open_tree("bench").expect("tree");
    let barrier = Arc::new(Barrier::new(threads));
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|w| {
            let (db, tree, barrier) = (db.clone(), tree.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    tree.insert(key(w * 1_000_000 + i), vec![0x5a; 1024]).expect("insert");
                    db.flush().expect("flush");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    (threads * per_thread) as f64 / t.elapsed().as_secs_f64()
}

fn concurrent(threads: usize, per_thread: usize) -> f64 {
    let dir = tempdir();
    let store = Store::open(&dir.path().join("db"), kms(dir.path())).expect("store");
    let tree = store.tree("bench").expect("tree");
    let barrier = Arc::new(Barrier::new(threads));
    let value = vec![0x5a; 1024];
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|w| {
            let (tree, barrier, value) = (tree.clone(), barrier.clone(), value.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    tree.insert(&key(w * 1_000_000 + i), &value).expect("insert");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    let ops = threads * per_thread;
    ops as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    println!("store overhead of encryption (µs per operation; scan: µs per record)");
    println!("{:>7} | {:>22} | {:>22} | {:>22}", "value", "durable insert", "get", "scan");
    println!(
        "{:>7} | {:>6} {:>6} {:>7} | {:>6} {:>6} {:>7} | {:>6} {:>6} {:>7}",
        "", "sled", "enc", "ratio", "sled", "enc", "ratio", "sled", "enc", "ratio"
    );
    for size in SIZES {
        let d1 = tempdir();
        let db = sled::Config::new().path(d1.path().join("db")).open().expect("sled");
        let plain = Plain(db.clone(), db.open_tree("bench").expect("tree"));
        let p = measure(&plain, size);
        let d2 = tempdir();
        let store = Store::open(&d2.path().join("db"), kms(d2.path())).expect("store");
        let enc = Enc(store.tree("bench").expect("tree"));
        let e = measure(&enc, size);
        println!(
            "{:>7} | {:>6.1} {:>6.1} {:>6.2}x | {:>6.2} {:>6.2} {:>6.2}x | {:>6.2} {:>6.2} {:>6.2}x",
            size, p[0], e[0], e[0] / p[0], p[1], e[1], e[1] / p[1], p[2], e[2], e[2] / p[2]
        );
    }
    println!();
    println!("concurrent durable inserts, 1 KiB, 1200 in all (inserts/s):");
    for threads in [1, 4, 16] {
        let per = 1200 / threads;
        let plain = concurrent_plain(threads, per);
        let ops = concurrent(threads, per);
        println!("  {threads:>2} threads: sled + flush each {plain:>6.0}/s, encrypted store {ops:>6.0}/s");
    }
}
