//! Policy change → applied on the agent, in the lab with its controller
//! (root; `cargo xtask bench` runs it with release binaries).
//!
//! 200 policy changes through the admin API (`POST /api/v1/policy`),
//! alternating between policies/lab.toml and the same policy with p2 added to
//! the group (two more entries: IPv4 and IPv6). Each change is timed from
//! just before the POST until:
//!
//! - **posted**: the controller answered (stored, compiled, signed, published);
//! - **in the kernel**: the agent's pinned eBPF flow maps hold exactly the new
//!   set, read by this process through the pins (the agent applies eBPF first,
//!   then nftables);
//! - **reported**: the controller's view of the appliance says the new bundle
//!   is applied (the agent reports right after applying both layers and
//!   saving the bundle as last-known-good); polled over one kept-alive HTTPS
//!   connection every millisecond, only once the kernel signal was seen.
//!
//! Environment: `AIRLOCK_AGENT_BIN`, `AIRLOCK_CONTROLLER_BIN` (default: the
//! debug builds), `AIRLOCK_SYNC_CHANGES` (default 200). Writes
//! `<target>/bench-sync.json`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use airlock_agent::maps::Maps;
use airlock_testbed::{is_applied, unique_prefix, ControllerApi, Lab, LabOptions, LAB_APPLIANCE};

const LAB_POLICY: &str = include_str!("../../policies/lab.toml");
const WARMUP: usize = 6;
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    if let Err(e) = run() {
        eprintln!("sync benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn bin(var: &str, name: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(PathBuf::from).or_else(|| {
        let p = airlock_testbed::target_dir().join("debug").join(name);
        p.is_file().then_some(p)
    })
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let changes: usize =
        std::env::var("AIRLOCK_SYNC_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let agent_bin = bin("AIRLOCK_AGENT_BIN", "airlock-agent");
    let controller_bin = bin("AIRLOCK_CONTROLLER_BIN", "airlock-controller");
    for (what, b) in [("agent", &agent_bin), ("controller", &controller_bin)] {
        println!(
            "{what}: {}",
            b.as_ref().map_or("(not found)".into(), |p| p.display().to_string())
        );
    }
    let lab = Lab::start_with(LabOptions {
        agent_bin,
        controller_bin,
        // Periodic reports only add noise; the agent reports after each apply.
        report_interval_secs: 10,
        ..LabOptions::with_controller(&unique_prefix())
    })?;
    let mut api = lab.api()?;
    let cfg_text = std::fs::read_to_string(&lab.agent().record().config)?;
    let cfg = airlock_agent::config::AgentConfig::parse(&cfg_text)?;
    let maps = Maps::open(&cfg.pins().maps())?;
    let narrow = maps.len()?;
    let wider = LAB_POLICY.replace("hosts = [\"p1\"]", "hosts = [\"p1\", \"p2\"]");
    assert_ne!(wider, LAB_POLICY, "lab.toml changed shape: update the benchmark");
    let mut last = api.appliance(LAB_APPLIANCE)?.applied_version;

    let mut posted = Vec::with_capacity(changes);
    let mut kernel = Vec::with_capacity(changes);
    let mut reported = Vec::with_capacity(changes);
    for i in 0..WARMUP + changes {
        let (text, want) =
            if i % 2 == 0 { (&wider, narrow + 2) } else { (&LAB_POLICY.to_owned(), narrow) };
        let t = one_change(&mut api, &maps, text, want, &mut last)?;
        if i >= WARMUP {
            posted.push(t.0);
            kernel.push(t.1);
            reported.push(t.2);
        }
    }
    drop(lab);

    let rows =
        [("posted", &mut posted), ("in the kernel", &mut kernel), ("reported", &mut reported)];
    println!("\n{changes} policy changes (after {WARMUP} warm-up changes):\n");
    println!("| until | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    let mut json = serde_json::Map::new();
    for (name, v) in rows {
        v.sort();
        let (p50, p90, p99, max) = (pct(v, 50), pct(v, 90), pct(v, 99), v[v.len() - 1]);
        println!("| {name} | {} | {} | {} | {} |", ms(p50), ms(p90), ms(p99), ms(max));
        json.insert(
            name.into(),
            serde_json::json!({"p50_ms": p50.as_secs_f64() * 1e3, "p90_ms": p90.as_secs_f64() * 1e3,
                "p99_ms": p99.as_secs_f64() * 1e3, "max_ms": max.as_secs_f64() * 1e3}),
        );
    }
    json.insert("changes".into(), changes.into());
    let out = airlock_testbed::target_dir().join("bench-sync.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("\n(written to {})", out.display());
    Ok(())
}

/// One change: (posted, in the kernel, reported), each from just before the POST.
fn one_change(
    api: &mut ControllerApi,
    maps: &Maps,
    text: &str,
    want_entries: usize,
    last: &mut Option<u64>,
) -> Result<(Duration, Duration, Duration), Box<dyn std::error::Error>> {
    let start = Instant::now();
    api.apply_policy(text, "bench")?;
    let posted = start.elapsed();
    while maps.len()? != want_entries {
        if start.elapsed() > STEP_TIMEOUT {
            return Err(format!("the maps never held {want_entries} entries").into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let kernel = start.elapsed();
    loop {
        let v = api.appliance(LAB_APPLIANCE)?;
        if is_applied(&v) && v.applied_version > *last {
            *last = v.applied_version;
            break;
        }
        if start.elapsed() > STEP_TIMEOUT {
            return Err(format!("the controller never saw the change applied: {v:?}").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((posted, kernel, start.elapsed()))
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
