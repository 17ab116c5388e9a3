//! Cost of compiling and applying a policy on both layers (run as root).
//!
//! `cargo bench -p airlock-agent --bench apply` (or `cargo xtask bench`). The
//! process moves into a fresh network namespace of its own first, so its
//! nftables table never touches the host; the eBPF maps are pinned in a
//! private bpffs directory and removed afterwards. For 10, 1k, 10k and 100k
//! flows it measures: the policy compile (TOML text → validated → entries),
//! the nftables compile and render, the full apply on each layer (eBPF: the
//! reconciler's upserts into empty maps; nftables: one `nft -f` transaction),
//! and the latency of a one-flow change on each layer.

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use airlock_agent::{dataplane::PROGRAMS, maps::Maps, nftables};
use airlock_policy::{check_toml, compile, nft, reconcile, Action, FlowEntry, Ingress, Now};
use anyhow::{Context as _, Result};

mod common;
const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];

/// A policy with `n` patient hosts, each with one flow to one service.
fn policy_text(n: usize) -> String {
    let mut s = String::from(
        "version = 1\n[[appliance]]\nname = \"gw\"\nports = { patient = [\"patient0\"], uplink = [\"uplink0\"] }\n\
         [[service]]\nname = \"svc\"\nendpoint = \"192.0.2.1:51820\"\n\
         public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\naddresses = [\"10.200.0.1\"]\n\
         ports = [{ proto = \"tcp\", port = 443 }]\n",
    );
    for i in 0..n {
        let a = Ipv4Addr::from(0x0a40_0000u32 + i as u32);
        let _ = write!(
            s,
            "[[host]]\nname = \"h{i}\"\nappliance = \"gw\"\naddresses = [\"{a}\"]\n\
             [[flow]]\nid = {}\nname = \"f{i}\"\nfrom = \"host:h{i}\"\nto = \"service:svc\"\nproto = \"tcp\"\nport = 443\nexpires = \"2099-01-01T00:00:00Z\"\n",
            i + 1
        );
    }
    s
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn apply_ebpf(
    maps: &mut Maps,
    desired: &[FlowEntry],
    observed: &[FlowEntry],
    now: u64,
) -> Result<usize> {
    let actions = reconcile(desired, observed, now);
    for a in &actions {
        match a {
            Action::Remove(f) => {
                maps.remove(f)?;
            }
            Action::Upsert(e) => maps.upsert(e)?,
        }
    }
    Ok(actions.len())
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "apply benchmark: run it with `cargo bench -p airlock-agent --bench apply` (root)"
        );
        return Ok(());
    }
    // SAFETY: unshare affects only this process; no threads run yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("unshare(CLONE_NEWNET): {} (run as root)", std::io::Error::last_os_error());
    }
    common::with_scratch_pins("apply", bench)
}

fn bench(pin_dir: &std::path::Path) -> Result<()> {
    let _ebpf = aya::EbpfLoader::new().default_map_pin_directory(pin_dir).load(PROGRAMS)?;
    let mut maps = Maps::open(pin_dir)?;
    let input = nft::NftInput::new(1)
        .with_ports(Ingress::Patient, ["patient0"])?
        .with_ports(Ingress::Uplink, ["uplink0"])?;
    println!("| flows | policy compile | nft compile + render | eBPF full apply | nftables full apply | one-flow change: eBPF | one-flow change: nftables (element delta) | same change as a full table replace |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in SIZES {
        let text = policy_text(n);
        let now = Now { unix_secs: 1_795_392_000, mono_ns: airlock_agent::clock::monotonic_ns() };
        let t = Instant::now();
        let (_, resolved) = check_toml(&text).map_err(|d| anyhow::anyhow!("{:?}", d.first()))?;
        let desired = compile(&resolved, &[], now).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let compile_ms = ms(t);
        let entries = &desired.get("gw").context("appliance")?.entries;

        let t = Instant::now();
        let text_nft = nft::compile(&input, entries, now.mono_ns).to_string();
        let nft_compile_ms = ms(t);

        // Empty maps first.
        let existing: Vec<FlowEntry> =
            maps.list()?.into_iter().filter_map(|(e, _, _)| e.ok()).collect();
        apply_ebpf(&mut maps, &[], &existing, now.mono_ns)?;
        let t = Instant::now();
        let n_actions = apply_ebpf(&mut maps, entries, &[], now.mono_ns)?;
        let ebpf_ms = ms(t);
        anyhow::ensure!(n_actions == n, "{n_actions} actions for {n} flows");

        let t = Instant::now();
        nftables::apply(&text_nft)?;
        let nft_ms = ms(t);

        // One flow changes: the last one moves to port 8443... as a new rule id.
        let mut changed = entries.clone();
        if let Some(last) = changed.last_mut() {
            last.rule_id += 1_000_000;
        }
        let t = Instant::now();
        let one = apply_ebpf(&mut maps, &changed, entries, now.mono_ns)?;
        let ebpf_one_ms = ms(t);
        anyhow::ensure!(one == 1, "{one} actions for one change");
        let old_rs = nft::compile(&input, entries, now.mono_ns);
        let new_rs = nft::compile(&input, &changed, now.mono_ns);
        let t = Instant::now();
        let script = airlock_policy::nft_delta::delta(&old_rs, &new_rs).context("same shape")?;
        nftables::apply(&script)?;
        let nft_one_ms = ms(t);
        anyhow::ensure!(script.lines().count() == 2, "one flow: one delete and one add:\n{script}");
        let t = Instant::now();
        nftables::apply(&new_rs.to_string())?;
        let nft_replace_ms = ms(t);
        println!(
            "| {n} | {compile_ms:.1} ms | {nft_compile_ms:.1} ms | {ebpf_ms:.1} ms | {nft_ms:.1} ms | {ebpf_one_ms:.2} ms | {nft_one_ms:.1} ms | {nft_replace_ms:.0} ms |"
        );
    }
    Ok(())
}
