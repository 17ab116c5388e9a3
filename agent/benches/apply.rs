//! Cost of compiling and applying a policy on both layers (run as root).
//!
//! `cargo bench -p airlock-agent --bench apply` (or `cargo xtask bench`). The
//! process moves into a fresh network namespace of its own first, so its
//! nftables table never touches the host; the eBPF maps are pinned in a
//! private bpffs directory and removed afterwards. For 10, 1k, 10k and 100k
//! flows it measures: the policy compile (TOML text → validated → entries),
//! the nftables compile and render, the full apply on each layer (eBPF: the
//! reconciler's upserts into empty maps; nftables: one `nft -f` transaction),
//! and the latency of a one-flow change on each layer. The nftables one-flow
//! change is what the agent does — the element delta, the table lookup and
//! one netlink batch (`nft_netlink`) — timed over [`CHANGES`] changes (median
//! and p99): until the kernel acknowledged it (in force), on a socket kept
//! open, and with a socket opened and closed per change (as `policy apply`
//! does); beside the same change as an `nft -f` text delta (the path before
//! netlink) and as a whole-table replacement.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use airlock_agent::{dataplane::PROGRAMS, maps::Maps, nft_netlink, nftables};
use airlock_policy::{
    check_toml, compile, nft, nft_delta, reconcile, Action, FlowEntry, Ingress, Now,
};
use anyhow::{Context as _, Result};

mod common;
const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
/// One-flow changes timed per size on the nftables layer.
const CHANGES: usize = 50;

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

/// Median and 99th percentile (nearest rank) in milliseconds.
fn median_p99(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    let at = |q: f64| {
        let rank = ((q * d.len() as f64).ceil() as usize).clamp(1, d.len().max(1));
        d.get(rank - 1).map_or(f64::NAN, |x| x.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.99))
}

/// `CHANGES` one-flow changes, back and forth between `a` and `b` (the table
/// holds `a`), each applied by `apply`; the table holds `a` again afterwards.
fn time_changes(
    a: &nft::NftRuleset,
    b: &nft::NftRuleset,
    mut apply: impl FnMut(&nft::NftRuleset, &nft::NftRuleset) -> Result<()>,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES.next_multiple_of(2) {
        let (from, to) = if i % 2 == 0 { (a, b) } else { (b, a) };
        let t = Instant::now();
        apply(from, to)?;
        times.push(t.elapsed());
    }
    Ok(times)
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
    println!("| flows | policy compile | nft compile + render | eBPF full apply | nftables full apply | one-flow change: eBPF | one-flow change: nftables over netlink, in force, median / p99 | of which the element delta, median | the same incl. socket open and close, median / p99 | same change as `nft -f` element delta, median / p99 | same change as a full table replace |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
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
        let one = nft_delta::element_delta(&old_rs, &new_rs).context("same shape")?;
        anyhow::ensure!(
            one.removals().len() == 1 && one.additions().len() == 1,
            "one flow: one removal and one addition:\n{one}"
        );
        // The agent's path: delta, table lookup, one netlink batch, on a socket
        // kept open (the change is in force when the last ack is read).
        let mut nl = nft_netlink::NftNetlink::open()?;
        let netlink = time_changes(&old_rs, &new_rs, |from, to| {
            let d = nft_delta::element_delta(from, to).context("same shape")?;
            anyhow::ensure!(nl.table_exists(to.table())?, "the table is there");
            Ok(nl.apply_delta(&d)?)
        })?;
        drop(nl);
        // Of that, the element delta alone (pure: a merge over both rulesets).
        let delta_only = time_changes(&old_rs, &new_rs, |from, to| {
            nft_delta::element_delta(from, to).context("same shape").map(drop)
        })?;
        // The same with a socket per change, as `policy apply` does: closing it
        // waits for the kernel to release the transaction.
        let per_socket = time_changes(&old_rs, &new_rs, |from, to| {
            let d = nft_delta::element_delta(from, to).context("same shape")?;
            let mut nl = nft_netlink::NftNetlink::open()?;
            anyhow::ensure!(nl.table_exists(to.table())?, "the table is there");
            Ok(nl.apply_delta(&d)?)
        })?;
        // The same change through `nft -f` (the path before netlink).
        let text = time_changes(&old_rs, &new_rs, |from, to| {
            let script = nft_delta::delta(from, to).context("same shape")?;
            Ok(nftables::apply(&script)?)
        })?;
        let t = Instant::now();
        nftables::apply(&new_rs.to_string())?;
        let nft_replace_ms = ms(t);
        let ((nl_med, nl_p99), (delta_med, _)) = (median_p99(netlink), median_p99(delta_only));
        let ((sock_med, sock_p99), (text_med, text_p99)) =
            (median_p99(per_socket), median_p99(text));
        println!(
            "| {n} | {compile_ms:.1} ms | {nft_compile_ms:.1} ms | {ebpf_ms:.1} ms | {nft_ms:.1} ms | {ebpf_one_ms:.2} ms | {nl_med:.2} / {nl_p99:.2} ms | {delta_med:.2} ms | {sock_med:.1} / {sock_p99:.1} ms | {text_med:.1} / {text_p99:.1} ms | {nft_replace_ms:.0} ms |"
        );
    }
    Ok(())
}
