//! Server-side render time of the web UI's pages with 1,000 appliances.
//!
//! A real controller (`run::start`, encrypted store, release build) with
//! 1,000 enrolled appliances, a policy naming all of them (2 hosts and a
//! flow each, ~12,000 lines of TOML), a report from each (ports, 50 recent
//! drops, a tunnel, counters) and 15 minutes of counter history each. Each
//! page is requested through the main listener's router — session check,
//! CSP and security headers, access log off — one request at a time, and
//! timed from request to the last byte of the body.
//!
//! ```sh
//! cargo bench -p airlock-controller --bench ui
//! # knobs: AIRLOCK_BENCH_APPLIANCES (1000), AIRLOCK_BENCH_REQUESTS (300 per page)
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "common.rs"]
mod common;

use std::{collections::BTreeMap, time::Instant};

use airlock_controller::state::AppState;
use airlock_proto::{
    admin::{PolicyFormat, PolicyUpload},
    agent::{DropRecord, Health, PortState, Report, TunnelState, RECENT_DROPS},
};
use axum::{body::Body, http::Request};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn policy(n: usize) -> String {
    let mut t = String::from(
        "version = 1\ndescription = \"bench\"\n\n[[site]]\nname = \"campus\"\n\n\
         [[service]]\nname = \"regional-lab\"\nendpoint = \"10.78.0.100:51820\"\n\
         public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\n\
         addresses = [\"10.78.0.100\"]\nports = [{ proto = \"tcp\", port = 443 }]\n",
    );
    for i in 0..n {
        let (a, b) = (i / 250, i % 250);
        t.push_str(&format!(
            "\n[[appliance]]\nname = \"ward-{i:04}\"\nsite = \"campus\"\n\
             ports = {{ patient = [\"patient0\"], uplink = [\"uplink0\"] }}\n\n\
             [[host]]\nname = \"h{i}a\"\nappliance = \"ward-{i:04}\"\naddresses = [\"10.{a}.{b}.11\"]\n\n\
             [[host]]\nname = \"h{i}b\"\nappliance = \"ward-{i:04}\"\naddresses = [\"10.{a}.{b}.12\"]\n\n\
             [[flow]]\nid = {}\nname = \"imaging {i}\"\nfrom = \"host:h{i}a\"\nto = \"service:regional-lab\"\n\
             proto = \"tcp\"\nport = 443\nexpires = \"2030-01-01T00:00:00Z\"\n",
            i + 1
        ));
    }
    t
}

fn report(i: usize, now: u64) -> Report {
    let drops = (0..RECENT_DROPS)
        .map(|k| DropRecord {
            at: now - k as u64,
            reason: "drop_no_flow".into(),
            cause: "default deny".into(),
            port: "patient0".into(),
            src: Some(format!("10.0.{}.{}", i % 250, k)),
            dst: Some("10.78.0.100".into()),
            proto: 6,
            dport: 443,
        })
        .collect();
    let port = |name: &str, role: &str| PortState {
        name: name.into(),
        role: role.into(),
        xdp_mode: "native".into(),
        attached: true,
    };
    Report {
        applied_version: None,
        policy_version: Some(1),
        refused: None,
        wireguard_public_key: Some("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into()),
        release: None,
        health: Health {
            enforcing: !i.is_multiple_of(97),
            forwarding: true,
            problems: if i.is_multiple_of(97) {
                vec!["port patient0 lost its XDP program".into()]
            } else {
                vec![]
            },
            flows: 2,
            counters: BTreeMap::new(),
            tunnels: vec![TunnelState {
                service: "regional-lab".into(),
                handshake_age_secs: Some(40),
                rx_bytes: 1 << 20,
                tx_bytes: 1 << 24,
            }],
            ports: vec![
                port("patient0", "patient"),
                port("uplink0", "uplink"),
                port("mgmt0", "management"),
            ],
            recent_drops: drops,
        },
    }
}

fn counters(t: u64, i: usize) -> BTreeMap<String, u64> {
    let k = t * (1 + i as u64 % 7);
    [
        ("pass_flow", 40 * k),
        ("pass_reply", 38 * k),
        ("drop_no_flow", 3 * k),
        ("drop_expired", k / 5),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v))
    .collect()
}

fn populate(st: &AppState, n: usize) {
    let now = st.now();
    let upload =
        PolicyUpload { text: policy(n), format: PolicyFormat::Toml, comment: "bench".into() };
    let (_, bundles) = st.policies.apply(&upload, "admin", None, &st.enrolled(), now).unwrap();
    let upload = PolicyUpload { comment: "second".into(), ..upload };
    let (_, bundles2) = st.policies.apply(&upload, "admin", None, &st.enrolled(), now).unwrap();
    assert_eq!(bundles.len(), n);
    for (i, (id, b)) in bundles2.into_iter().enumerate() {
        for s in 0..90u64 {
            let t = now - 900 + s * 10;
            st.telemetry.record(&id, t, &counters(t, i));
        }
        let mut r = report(i, now);
        r.applied_version = Some(b.version - u64::from(i % 50 == 0));
        st.hub.report(&id, r, now - (i as u64 % 20));
    }
}

async fn get(app: &axum::Router, path: &str, cookie: &str) -> (u16, usize) {
    let req = Request::get(path).header("cookie", cookie).body(Body::empty()).unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status().as_u16();
    let len = r.into_body().collect().await.unwrap().to_bytes().len();
    (status, len)
}

fn main() {
    let n = env_or("AIRLOCK_BENCH_APPLIANCES", 1000);
    let reqs = env_or("AIRLOCK_BENCH_REQUESTS", 300);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let started = common::start(&rt, dir.path());
    let t0 = Instant::now();
    common::enroll_up_to(&started, n);
    populate(&started.state, n);
    eprintln!("ui bench: {n} appliances set up in {:.1} s", t0.elapsed().as_secs_f64());
    let st = started.state.clone();
    let pw = started.bootstrap.clone().unwrap();
    let s = st.sessions.login(&st.store, "admin", &pw, st.now()).unwrap();
    let cookie = format!("airlock_session={}", s.token);
    let app = airlock_controller::server::main_app(st.clone());
    let mid = format!("/appliances/ward-{:04}", n / 2);
    let pages: Vec<(&str, String)> = vec![
        ("dashboard (page 1 of 20)", "/".into()),
        ("dashboard, last page", format!("/?page={}", n.div_ceil(50))),
        ("dashboard search", "/?q=ward-09".into()),
        ("dashboard live refresh", "/ui/live/dashboard".into()),
        ("appliance detail", mid.clone()),
        ("appliance live refresh", format!("/ui/live{mid}")),
        ("policy (12k-line text)", "/policy".into()),
        ("policy history", "/policy/versions".into()),
        ("policy version", "/policy/versions/1".into()),
        ("rollback review (dry-run diff, 1,000 appliances)", "/policy/versions/1/rollback".into()),
        ("external services", "/services".into()),
        ("enrollment form", "/appliances/new".into()),
    ];
    let time = |what: &str, f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..50 {
            f();
        }
        eprintln!("ui bench: {what}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 50.0);
    };
    time("appliances.list()", &|| drop(st.appliances.list().unwrap()));
    time("telemetry.rates(all)", &|| drop(st.telemetry.rates(None, st.now(), 10, 90)));
    time("policies.current()", &|| drop(st.policies.current().unwrap()));
    println!("| page | p50 ms | p99 ms | max ms | body KiB |");
    println!("|---|---:|---:|---:|---:|");
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(reqs);
        let mut size = 0;
        rt.block_on(async {
            for i in 0..reqs + 20 {
                let t = Instant::now();
                let (status, len) = get(&app, path, &cookie).await;
                let dt = t.elapsed().as_secs_f64() * 1e3;
                assert_eq!(status, 200, "{path}");
                size = len;
                if i >= 20 {
                    times.push(dt);
                }
            }
        });
        times.sort_by(f64::total_cmp);
        let q = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {} |",
            q(0.5),
            q(0.99),
            times[times.len() - 1],
            size / 1024
        );
    }
}
