//! Authenticated admin-API reads per second under a load generator.
//!
//! Starts a real controller in this (release-built) process — the same
//! `run::start` as the binary, a tokio multi-thread runtime with one worker
//! per core, the binary's access log (INFO, formatted, written to a file) —
//! logs in, enrolls N appliances (each with a signed bundle of the lab
//! policy, as after a real enrollment) and drives routes with `wrk` over
//! HTTPS with keep-alive. The session token reaches wrk through a 0600 Lua
//! script, never its arguments.
//!
//! wrk runs on the same machine: the controller and the generator share the
//! cores, and the CPU each used is reported.
//!
//! ```sh
//! cargo bench -p airlock-controller --bench api
//! # knobs: AIRLOCK_BENCH_SECS (10), AIRLOCK_BENCH_CONNECTIONS (64),
//! #        AIRLOCK_BENCH_THREADS (2), AIRLOCK_BENCH_LOG (file | off),
//! #        AIRLOCK_BENCH_APPLIANCES (10,1000),
//! #        AIRLOCK_BENCH_ROUTES (appliances,ward-0001,healthz: path suffixes)
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    io::Write as _, net::SocketAddr, os::unix::fs::OpenOptionsExt as _, path::Path,
    process::Command, sync::Arc, time::Instant,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Request};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[path = "common.rs"]
mod common;
use common::enroll_up_to;

const LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/lab.toml");

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One HTTP/1.1 request over a fresh TLS connection, for setup and checks.
async fn call(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Option<String>,
    bearer: Option<&str>,
) -> (u16, String) {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let tls =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

/// CPU seconds (user + system) of this process and of its waited-for children.
fn cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which ends with the last ')').
    let rest: Vec<u64> =
        stat[stat.rfind(')').unwrap() + 2..].split(' ').map(|f| f.parse().unwrap_or(0)).collect();
    // utime, stime, cutime, cstime are fields 14-17 (1-based), 12-15 here; 100 ticks/s on Linux.
    let t = |i: usize| rest[i] as f64 / 100.0;
    (t(11) + t(12), t(13) + t(14))
}

struct Run {
    rps: f64,
    p50: String,
    p99: String,
    non_2xx: u64,
    errors: String,
    server_cpu: f64,
    wrk_cpu: f64,
}

fn wrk(url: &str, script: &Path, secs: u64, threads: u64, conns: u64) -> Run {
    let (s0, c0) = cpu();
    let t0 = Instant::now();
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &conns.to_string(), "-d", &format!("{secs}s")])
        .args(["--latency", "--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk runs (apt-get install wrk, or cargo xtask setup)");
    let wall = t0.elapsed().as_secs_f64();
    let (s1, c1) = cpu();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    Run {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        p50: field("50%"),
        p99: field("99%"),
        non_2xx: field("Non-2xx or 3xx responses:").parse().unwrap_or(0),
        errors: field("Socket errors:"),
        server_cpu: (s1 - s0) / wall,
        wrk_cpu: (c1 - c0) / wall,
    }
}

fn write_script(dir: &Path, token: &str) -> std::path::PathBuf {
    let p = dir.join("auth.lua");
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).unwrap();
    writeln!(f, "wrk.headers[\"Authorization\"] = \"Bearer {token}\"").unwrap();
    p
}

fn main() {
    let secs = env_or("AIRLOCK_BENCH_SECS", 10);
    let conns = env_or("AIRLOCK_BENCH_CONNECTIONS", 64);
    let threads = env_or("AIRLOCK_BENCH_THREADS", 2);
    let log = std::env::var("AIRLOCK_BENCH_LOG").unwrap_or_else(|_| "file".into());
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("api bench: wrk is not installed (apt-get install wrk, or cargo xtask setup)");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().unwrap();
    if log != "off" {
        // What the binary does, but into a file instead of the terminal.
        let file = std::fs::File::create(dir.path().join("controller.log")).unwrap();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::sync::Mutex::new(file))
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let started = common::start(&rt, dir.path());
    let addr = started.main_addr;
    let ca = started.state.ca.cert_pem().to_owned();
    let pw = started.bootstrap.clone().unwrap();
    let token = rt.block_on(async {
        let body = serde_json::json!({"user": "admin", "password": pw}).to_string();
        let (s, b) = call(addr, &ca, "POST", "/api/v1/login", Some(body), None).await;
        assert_eq!(s, 200, "{b}");
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["token"].as_str().unwrap().to_owned()
    });
    rt.block_on(async {
        let text = std::fs::read_to_string(LAB).unwrap();
        let body = serde_json::json!({"text": text, "comment": "bench"}).to_string();
        let (s, b) = call(addr, &ca, "POST", "/api/v1/policy", Some(body), Some(&token)).await;
        assert_eq!(s, 201, "{b}");
    });
    let script = write_script(dir.path(), &token);
    let base = format!("https://{addr}");

    println!(
        "controller in-process, {} worker threads; wrk -t{threads} -c{conns} -d{secs}s on the same {} cores; access log: {log}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "load average before: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!(
        "| route | appliances | req/s | p50 | p99 | controller CPU | wrk CPU | controller CPU/req | wrk CPU/req | 2-core capacity | body bytes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sizes: Vec<usize> = std::env::var("AIRLOCK_BENCH_APPLIANCES")
        .unwrap_or_else(|_| "10,1000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    // Path suffixes to run (default: all).
    let routes: Vec<String> = std::env::var("AIRLOCK_BENCH_ROUTES")
        .unwrap_or_else(|_| "appliances,ward-0001,healthz".into())
        .split(',')
        .map(|r| r.trim().to_owned())
        .collect();
    for n in sizes {
        enroll_up_to(&started, n);
        for path in ["/api/v1/appliances", "/api/v1/appliances/ward-0001", "/healthz"] {
            if (path == "/healthz" && n > 10) || !routes.iter().any(|r| path.ends_with(r.as_str()))
            {
                continue;
            }
            // Check the answer first: the route returns what it should.
            let (s, body) = rt.block_on(call(addr, &ca, "GET", path, None, Some(&token)));
            assert_eq!(s, 200, "{path}: {body}");
            if path == "/api/v1/appliances" {
                let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
                assert_eq!(v.len(), n);
            }
            let url = format!("{base}{path}");
            let _warm = wrk(&url, &script, 2, threads, conns);
            let r = wrk(&url, &script, secs, threads, conns);
            assert_eq!(r.non_2xx, 0, "{path}: every answer must be 200");
            let auth = if path == "/healthz" { " (no auth)" } else { "" };
            // CPU per request is what the machine's other load does not change
            // much; the capacity is what two otherwise idle cores would serve
            // with wrk on them too.
            let ctl_us = r.server_cpu / r.rps * 1e6;
            let wrk_us = r.wrk_cpu / r.rps * 1e6;
            println!(
                "| GET {path}{auth} | {n} | {:.0} | {} | {} | {:.0}% | {:.0}% | {ctl_us:.0} µs | {wrk_us:.0} µs | {:.0} | {} |{}",
                r.rps,
                r.p50,
                r.p99,
                r.server_cpu * 100.0,
                r.wrk_cpu * 100.0,
                2e6 / (ctl_us + wrk_us),
                body.len(),
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!(" socket errors: {}", r.errors)
                },
            );
        }
    }
    drop(rt);
}
