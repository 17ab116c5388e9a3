//! Per-packet cost of the XDP boundary through BPF_PROG_TEST_RUN (run as root).
//!
//! `cargo bench -p airlock-agent --bench dataplane` (or `cargo xtask bench`).
//! For 10, 10k and 100k flow entries per family, IPv4 and IPv6, it measures:
//! the empty program (returns DROP), an allowed packet (forward hit), a silent
//! drop (the program built without drop events), a drop under a flood (event
//! budget spent: what a flood of disallowed packets costs), and a drop that
//! writes a ring-buffer event. Results: a Markdown table on stdout and
//! `target/bench-dataplane.json`. Figures are medians of 11 runs; each run is
//! the kernel's average over `repeat` executions.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use airlock_agent::{dataplane::PROGRAMS, maps::Maps};
use airlock_ebpf_common::layout::{program_names, proto, Settings};
use airlock_policy::{Expiry, Flow, FlowEntry, Ingress, Protocol};
use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};

mod common;
const SIZES: [u32; 3] = [10, 10_000, 100_000];
const RUNS: usize = 11;
const REPEAT: u32 = 200_000;
/// Events per run for the event path: small enough that the ring never fills.
const EVENT_REPEAT: u32 = 2_000;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x10;
    h
}

fn v4_packet(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let l4 = tcp(40000, dport);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len() + 18) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto::TCP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut f = eth(0x0800);
    f.extend(ip);
    f.extend(l4);
    f.extend([0u8; 18]); // a little payload: 74-byte frame
    f
}

fn v6_packet(src: [u8; 16], dst: [u8; 16], dport: u16) -> Vec<u8> {
    let mut l4 = tcp(40000, dport);
    l4.extend([0u8; 18]);
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    ip[6] = proto::TCP;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    let mut f = eth(0x86dd);
    f.extend(ip);
    f.extend(l4);
    f
}

const P1: [u8; 4] = [10, 77, 0, 11];
const EXT: [u8; 4] = [10, 78, 0, 100];

fn v6(last: u32, net: u8) -> [u8; 16] {
    let mut a = [0xfd, 0, 0, 0xa1, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    a[12..16].copy_from_slice(&last.to_be_bytes());
    a
}

fn entry(src: IpAddr, dst: IpAddr, rule_id: u32) -> Result<FlowEntry> {
    let flow = Flow::new(src, dst, Protocol::Tcp, Some(443))?;
    Ok(FlowEntry::new(flow, rule_id, 1, Ingress::Patient, true, Expiry::At(u64::MAX), false)?)
}

/// Fills both flow maps with `n` entries each, the measured flow among them.
fn fill(maps: &mut Maps, n: u32) -> Result<()> {
    for (e, _, _) in maps.list()? {
        maps.remove(&e?.flow)?;
    }
    let ext4 = IpAddr::from(EXT);
    let ext6 = IpAddr::from(v6(0x100, 0x78));
    maps.upsert(&entry(IpAddr::from(P1), ext4, 1)?)?;
    maps.upsert(&entry(IpAddr::from(v6(0x11, 0x77)), ext6, 1)?)?;
    for i in 1..n {
        maps.upsert(&entry(IpAddr::from((0x0a40_0000u32 + i).to_be_bytes()), ext4, i + 1)?)?;
        maps.upsert(&entry(IpAddr::from(v6(0x1000 + i, 0x77)), ext6, i + 1)?)?;
    }
    Ok(())
}

fn run(prog: &Xdp, packet: &[u8], repeat: u32, expect: u32) -> Result<f64> {
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts)?;
    if r.return_value != expect {
        bail!("program returned {} instead of {expect}", r.return_value);
    }
    Ok(r.duration.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // must not spend a minute here.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "dataplane benchmark: run it with `cargo bench -p airlock-agent --bench dataplane`"
        );
        return Ok(());
    }
    common::with_scratch_pins("dataplane", bench)
}

fn bench(pin_dir: &std::path::Path) -> Result<()> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(PROGRAMS)?;
    for name in [program_names::PATIENT, program_names::SILENT, program_names::BASELINE] {
        let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let mut maps = Maps::open(pin_dir)?;
    maps.set_settings(Settings::default())?;
    let mut ring = Maps::open_events(pin_dir)?;

    let allowed = [
        ("IPv4", v4_packet(P1, EXT, 443)),
        ("IPv6", v6_packet(v6(0x11, 0x77), v6(0x100, 0x78), 443)),
    ];
    let denied = [
        ("IPv4", v4_packet(P1, EXT, 444)),
        ("IPv6", v6_packet(v6(0x11, 0x77), v6(0x100, 0x78), 444)),
    ];

    let mut rows: BTreeMap<(u32, &str), BTreeMap<&str, f64>> = BTreeMap::new();
    for n in SIZES {
        fill(&mut maps, n)?;
        eprintln!("==> {n} entries per family");
        let prog =
            |name: &str| -> Result<&Xdp> { Ok(ebpf.program(name).context("program")?.try_into()?) };
        for ((fam, ok), (_, bad)) in allowed.iter().zip(&denied) {
            let mut m = BTreeMap::new();
            let mut sample = |label, name, pkt: &[u8], repeat, expect, budget: u32| -> Result<()> {
                let mut v = Vec::new();
                for _ in 0..RUNS {
                    maps.refill_event_budget(budget)?;
                    v.push(run(prog(name)?, pkt, repeat, expect)?);
                    while ring.next().is_some() {}
                }
                m.insert(label, median(v));
                Ok(())
            };
            sample("baseline", program_names::BASELINE, ok, REPEAT, XDP_DROP, 0)?;
            sample("allowed", program_names::PATIENT, ok, REPEAT, XDP_PASS, 0)?;
            sample("silent_drop", program_names::SILENT, bad, REPEAT, XDP_DROP, 0)?;
            sample("flood_drop", program_names::PATIENT, bad, REPEAT, XDP_DROP, 0)?;
            sample(
                "event_drop",
                program_names::PATIENT,
                bad,
                EVENT_REPEAT,
                XDP_DROP,
                EVENT_REPEAT,
            )?;
            eprintln!("    {fam}: {m:?}");
            rows.insert((n, fam), m);
        }
    }
    drop(maps);

    println!("| entries | family | empty program | allowed | allowed − empty | silent drop | flood drop (budget spent) | flood / silent | drop with event |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for ((n, fam), m) in &rows {
        let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "| {n} | {fam} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.2} | {:.0} ns |",
            g("baseline"),
            g("allowed"),
            g("allowed") - g("baseline"),
            g("silent_drop"),
            g("flood_drop"),
            g("flood_drop") / g("silent_drop"),
            g("event_drop"),
        );
        json.push(serde_json::json!({"entries": n, "family": fam, "ns": m}));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_owned());
    let out = PathBuf::from(target).join("bench-dataplane.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    eprintln!("results: {}", out.display());
    Ok(())
}
