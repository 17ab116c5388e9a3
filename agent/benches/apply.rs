//! Cost of compiling and applying a policy on both layers (run as root).
//!
//! `cargo bench -p airlock-agent --bench apply` (or `cargo xtask bench`). The
//! process moves into a fresh network namespace of its own first, so its
//! nftables table never touches the host; the eBPF maps are pinned in a
//! private bpffs directory and removed afterwards. For 10, 1k, 10k and 100k
//! flows it measures: the policy compile (TOML text → validated → entries),
//! the nftables compile and render, the full apply on each layer (eBPF: the
//! reconciler's upserts into empty maps; nftables: one `nft -f` transaction),
//! and the latency of a one-flow change, over [`CHANGES`] changes back and
//! forth (median and p99): the agent's nftables step as the daemon runs it
//! (`policy_cmd::nftables_step` after the eBPF step: the check that the maps
//! held the previous entries, the element delta from the eBPF step's
//! actions, the table lookup and one netlink batch), until the kernel
//! acknowledged it (in force), on a socket kept open — and of that the pure
//! part, beside the merge over two compiled rulesets it replaces; the same
//! step with a socket opened and closed per change (as `policy apply`
//! does); the whole `apply_entries` (both layers: the maps listed,
//! reconciled and changed, then the nftables step) and of that the listing
//! of the maps; the whole change through the daemon's [`Applier`] (both
//! layers, diffed against its record of what it wrote: no listing, one
//! socket kept), as the run loop applies a controller bundle; and, once, the
//! change as a whole-table replacement.
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use airlock_agent::{
    applier::Applier,
    config::AgentConfig,
    dataplane::PROGRAMS,
    maps::Maps,
    nft_netlink::NftNetlink,
    nftables,
    policy_cmd::{self, NftOutcome},
};
use airlock_policy::{check_toml, compile, nft, nft_delta, reconcile, Action, FlowEntry, Now};
use anyhow::{Context as _, Result};

mod common;
const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
/// One-flow changes timed per size.
const CHANGES: usize = 50;
/// Map listings timed per size.
const LISTINGS: usize = 10;

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

/// `CHANGES` one-flow changes, back and forth between `a` and `b` (both
/// layers hold `a`), each applied by `apply(from, to)`; they hold `a` again
/// afterwards.
fn time_changes<T: ?Sized>(
    a: &T,
    b: &T,
    mut apply: impl FnMut(&T, &T) -> Result<()>,
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

/// An agent configuration with the nftables layer on: ports `patient0` and
/// `uplink0`, no controller (so no management entries).
fn config(pin_dir: &std::path::Path) -> Result<AgentConfig> {
    let text = format!(
        "[appliance]\nname = \"gw\"\npin_dir = \"{}\"\nstate_dir = \"{}/state\"\n\
         [[port]]\nname = \"patient0\"\nrole = \"patient\"\n\
         [[port]]\nname = \"uplink0\"\nrole = \"uplink\"\n",
        pin_dir.display(),
        pin_dir.display(),
    );
    AgentConfig::parse(&text).map_err(|e| anyhow::anyhow!("{e:?}"))
}

fn bench(pin_dir: &std::path::Path) -> Result<()> {
    let _ebpf = aya::EbpfLoader::new().default_map_pin_directory(pin_dir).load(PROGRAMS)?;
    let mut maps = Maps::open(pin_dir)?;
    let cfg = config(pin_dir)?;
    let input = cfg.nft_input(1)?.context("the nftables layer is on")?;
    println!("| flows | policy compile | nft compile + render | eBPF full apply | nftables full apply | one-flow change: eBPF | one-flow change: agent nftables step, in force, median / p99 | of which the delta (check + from actions), median / p99 | before: merge delta over the compiled rulesets, median | nftables step incl. socket open and close, median / p99 | one-flow change: apply_entries (both layers), median / p99 | of which listing the maps, median | one-flow change through the daemon's applier (both layers, no listing), median / p99 | same change as a full table replace |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
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

        // One flow changes: the last one gets a new rule id.
        let mut changed = entries.clone();
        if let Some(last) = changed.last_mut() {
            last.rule_id += 1_000_000;
        }
        let t = Instant::now();
        let one = apply_ebpf(&mut maps, &changed, entries, now.mono_ns)?;
        let ebpf_one_ms = ms(t);
        anyhow::ensure!(one == 1, "{one} actions for one change");
        apply_ebpf(&mut maps, entries, &changed, now.mono_ns)?;

        // The agent's nftables step after the eBPF step, which found the
        // previous entries in the maps (`observed`) and computed the actions:
        // the check, the delta from the actions, the table lookup and one
        // netlink batch, on a socket kept open (in force at the last ack).
        let actions = |from: &[FlowEntry], to: &[FlowEntry]| reconcile(to, from, now.mono_ns);
        let (forth, back) = (actions(entries, &changed), actions(&changed, entries));
        let actions_of = |to: &[FlowEntry]| if to == changed.as_slice() { &forth } else { &back };
        let mut nl = NftNetlink::open()?;
        let step = time_changes(entries.as_slice(), &changed, |from, to| {
            let done = policy_cmd::nftables_step(
                Some(&mut nl),
                to,
                1,
                Some((from, 1)),
                from,
                actions_of(to),
                &cfg,
                now,
            )?;
            anyhow::ensure!(done == NftOutcome::Elements { removed: 1, added: 1 }, "{done:?}");
            Ok(())
        })?;
        // Of that, the pure part: the check and the delta from the actions.
        let delta_only = time_changes(entries.as_slice(), &changed, |from, to| {
            anyhow::ensure!(nft_delta::same_live_entries(from, from, now.mono_ns));
            let old = |f: &airlock_policy::Flow| {
                from.binary_search_by(|e| e.flow.cmp(f)).ok().map(|i| &from[i])
            };
            let d = nft_delta::element_delta_from_actions(
                &input,
                old,
                actions_of(to),
                &input,
                now.mono_ns,
            )
            .context("same shape")?;
            anyhow::ensure!(d.len() == 2, "one flow: one removal and one addition:\n{d}");
            Ok(())
        })?;
        // What it replaces (without the two compiles it needed).
        let (old_rs, new_rs) = (
            nft::compile(&input, entries, now.mono_ns),
            nft::compile(&input, &changed, now.mono_ns),
        );
        let merge = time_changes(&old_rs, &new_rs, |from, to| {
            nft_delta::element_delta(from, to).context("same shape").map(drop)
        })?;
        // The same step with a socket per change, as `policy apply` does:
        // closing it waits for the kernel to release the transaction.
        let per_socket = time_changes(entries.as_slice(), &changed, |from, to| {
            let done = policy_cmd::nftables_step(
                None,
                to,
                1,
                Some((from, 1)),
                from,
                actions_of(to),
                &cfg,
                now,
            )?;
            anyhow::ensure!(done == NftOutcome::Elements { removed: 1, added: 1 }, "{done:?}");
            Ok(())
        })?;
        // Both layers as the daemon changes them: list the maps, reconcile,
        // change them, then the nftables step (socket kept open).
        let both = time_changes(entries.as_slice(), &changed, |from, to| {
            let (removed, upserted) = policy_cmd::apply_entries_on(
                Some(&mut nl),
                to,
                1,
                Some((from, 1)),
                &cfg,
                &mut maps,
                now,
            )?;
            anyhow::ensure!(
                (removed, upserted) == (0, 1),
                "{removed} removed, {upserted} upserted"
            );
            Ok(())
        })?;
        drop(nl);
        // The daemon's path: one applier kept across changes. Its first
        // change lists the maps and replaces the table (untimed); every
        // later one diffs against its record.
        // The daemon hands it the entries it localized from the bundle (owned;
        // copied here outside the timed part).
        let mut applier = Applier::new(&cfg);
        applier.apply(entries.clone(), 1, &cfg, &mut maps, now)?;
        let mut through_applier = Vec::with_capacity(CHANGES);
        for i in 0..CHANGES.next_multiple_of(2) {
            let to = if i % 2 == 0 { changed.clone() } else { entries.clone() };
            let t = Instant::now();
            let (removed, upserted) = applier.apply(to, 1, &cfg, &mut maps, now)?;
            through_applier.push(t.elapsed());
            anyhow::ensure!(
                (removed, upserted) == (0, 1),
                "{removed} removed, {upserted} upserted"
            );
            anyhow::ensure!(applier.knows_maps(), "the record is kept");
        }
        drop(applier);
        // Of that, listing the maps (the eBPF step's read of what they hold).
        let mut listing = Vec::new();
        for _ in 0..LISTINGS {
            let t = Instant::now();
            let listed = maps.list()?;
            listing.push(t.elapsed());
            anyhow::ensure!(listed.len() == n, "{} entries listed", listed.len());
        }
        let t = Instant::now();
        nftables::apply(&new_rs.to_string())?;
        let nft_replace_ms = ms(t);
        let [(st_med, st_p99), (d_med, d_p99), (m_med, _), (so_med, so_p99), (b_med, b_p99), (l_med, _), (a_med, a_p99)] =
            [step, delta_only, merge, per_socket, both, listing, through_applier].map(median_p99);
        println!(
            "| {n} | {compile_ms:.1} ms | {nft_compile_ms:.1} ms | {ebpf_ms:.1} ms | {nft_ms:.1} ms | {ebpf_one_ms:.2} ms | {st_med:.3} / {st_p99:.3} ms | {d_med:.3} / {d_p99:.3} ms | {m_med:.2} ms | {so_med:.1} / {so_p99:.1} ms | {b_med:.2} / {b_p99:.2} ms | {l_med:.2} ms | **{a_med:.2} / {a_p99:.2} ms** | {nft_replace_ms:.0} ms |"
        );
    }
    Ok(())
}
