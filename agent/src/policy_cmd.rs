//! `airlock-agent policy check | diff | apply`: the policy file on the command
//! line, before the controller exists. Reading files and clocks happens here;
//! the decisions are the pure functions of `airlock-policy`.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use airlock_policy::{
    check_toml, compile, reconcile, validate, Action, DesiredState, Diagnostic, Expiry, FlowEntry,
    Now, Policy,
};

use crate::{
    clock,
    config::AgentConfig,
    maps::Maps,
    store::{LastKnownGood, StateStore, StoreError},
};

/// Policy command failures.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCmdError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The policy is invalid; the report lists every problem.
    #[error("{0}")]
    Invalid(String),
    /// The policy has no such appliance.
    #[error("the policy has no appliance {name:?} (it has: {known})")]
    UnknownAppliance {
        /// The name asked for.
        name: String,
        /// The names it has.
        known: String,
    },
    /// Map trouble.
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
    /// State store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The nftables layer's input is invalid (port names).
    #[error("cannot build the nftables ruleset")]
    NftInput(#[from] airlock_policy::nft::NftError),
    /// nft refused or could not run; the eBPF layer already enforces the policy.
    #[error(transparent)]
    Nftables(#[from] crate::nftables::NftablesError),
}

/// The wall and monotonic clocks, read together.
pub fn now() -> Now {
    let unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Now { unix_secs, mono_ns: clock::monotonic_ns() }
}

fn report(path: &Path, diags: &[Diagnostic]) -> String {
    let mut s = format!(
        "{}: {} problem{}",
        path.display(),
        diags.len(),
        if diags.len() == 1 { "" } else { "s" }
    );
    for d in diags {
        let at = match (d.line, d.column) {
            (Some(l), Some(c)) => format!("{}:{l}:{c}", path.display()),
            _ => path.display().to_string(),
        };
        let _ = write!(s, "\n  {at}: {}", d.issue);
    }
    s
}

/// Reads and validates a policy file.
pub fn read(path: &Path) -> Result<Policy, PolicyCmdError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PolicyCmdError::Read { path: path.display().to_string(), source })?;
    let (policy, _) = check_toml(&text).map_err(|d| PolicyCmdError::Invalid(report(path, &d)))?;
    Ok(policy)
}

/// Validates and compiles a policy at `now`; `origin` names it in errors.
pub fn compile_policy(
    policy: &Policy,
    origin: &Path,
    now: Now,
) -> Result<BTreeMap<String, DesiredState>, PolicyCmdError> {
    let located = |issues: Vec<airlock_policy::Issue>| {
        let d: Vec<Diagnostic> = issues
            .into_iter()
            .map(|issue| Diagnostic { line: None, column: None, issue })
            .collect();
        PolicyCmdError::Invalid(report(origin, &d))
    };
    let resolved = validate(policy).map_err(located)?;
    compile(&resolved, &[], now).map_err(located)
}

/// Reads, validates and compiles a policy file at `now`.
pub fn load(path: &Path, now: Now) -> Result<BTreeMap<String, DesiredState>, PolicyCmdError> {
    compile_policy(&read(path)?, path, now)
}

/// `policy check`: a one-line summary per appliance.
pub fn check(path: &Path, now: Now) -> Result<String, PolicyCmdError> {
    let out = load(path, now)?;
    let mut s = format!("{}: ok", path.display());
    for (name, st) in &out {
        let _ = write!(
            s,
            "\n  appliance {name}: policy version {}, {} live flow entries",
            st.policy_version,
            st.entries.len()
        );
    }
    Ok(s)
}

fn describe(e: &FlowEntry, now: Now) -> String {
    let life = match e.expiry {
        Expiry::Infrastructure => "infrastructure".to_owned(),
        Expiry::At(t) => format!("{}s left", t.saturating_sub(now.mono_ns) / 1_000_000_000),
    };
    format!(
        "{} (rule {}, {life}{})",
        e.flow,
        e.rule_id,
        if e.allow_reply { "" } else { ", no replies" }
    )
}

/// `policy diff`: what opens, what closes and what changes, per appliance.
pub fn diff(old: &Path, new: &Path, now: Now) -> Result<String, PolicyCmdError> {
    let (a, b) = (load(old, now)?, load(new, now)?);
    let mut s = String::new();
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let empty = Vec::new();
    for name in names {
        let before = a.get(name).map_or(&empty, |d| &d.entries);
        let after = b.get(name).map_or(&empty, |d| &d.entries);
        let actions = reconcile(after, before, now.mono_ns);
        let _ = write!(s, "appliance {name}: ");
        if actions.is_empty() {
            s.push_str("no change\n");
            continue;
        }
        s.push('\n');
        for act in actions {
            match act {
                Action::Remove(f) => {
                    let _ = writeln!(s, "  - closes {f}");
                }
                Action::Upsert(e) if before.iter().any(|o| o.flow == e.flow) => {
                    let _ = writeln!(s, "  ~ changes {}", describe(&e, now));
                }
                Action::Upsert(e) => {
                    let _ = writeln!(s, "  + opens {}", describe(&e, now));
                }
            }
        }
    }
    Ok(s)
}

/// Makes the maps equal `policy`'s entries for `appliance` (minimal changes,
/// closing first), then, when `cfg` turns the layer on, changes the nftables
/// table to the same entries (see [`apply_entries`]). `previous` is the
/// policy applied before (the last-known-good one), whose ruleset the table
/// holds. Returns (removed, upserted) of the eBPF step.
pub fn apply_policy(
    policy: &Policy,
    previous: Option<&Policy>,
    origin: &Path,
    appliance: &str,
    cfg: &AgentConfig,
    maps: &mut Maps,
    now: Now,
) -> Result<(usize, usize), PolicyCmdError> {
    let mut out = compile_policy(policy, origin, now)?;
    let Some(want) = out.remove(appliance) else {
        let known = out.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(PolicyCmdError::UnknownAppliance { name: appliance.to_owned(), known });
    };
    let before = previous.and_then(|p| {
        let resolved = validate(p).ok()?;
        Some((compile(&resolved, &[], now).ok()?.remove(appliance)?.entries, p.version))
    });
    let before = before.as_ref().map(|(e, v)| (e.as_slice(), *v));
    apply_entries(&want.entries, policy.version, before, cfg, maps, now)
}

/// Makes both layers enforce `entries` (compiled for `policy_version` at
/// `now`): the maps first (minimal changes, closing first), then the
/// nftables step ([`apply_nftables_entries`]). `previous` is what was applied
/// before (entries compiled at the same `now`, and their policy version).
/// Returns (removed, upserted) of the eBPF step.
pub fn apply_entries(
    entries: &[FlowEntry],
    policy_version: u32,
    previous: Option<(&[FlowEntry], u32)>,
    cfg: &AgentConfig,
    maps: &mut Maps,
    now: Now,
) -> Result<(usize, usize), PolicyCmdError> {
    let listed = maps.list()?;
    let observed: Vec<FlowEntry> =
        listed.iter().filter_map(|(e, _, _)| e.as_ref().ok().copied()).collect();
    let unreadable = listed.len() - observed.len();
    if unreadable > 0 {
        // They cannot be named by flow; `detach` clears them.
        tracing::warn!(unreadable, "flow entries the agent cannot read back are left in the maps");
    }
    // The agent's own way to its controller (eBPF only: the nftables table
    // filters forwarded traffic, never the appliance's own).
    let want = crate::controller::mgmt::with_management(entries, cfg);
    let (mut removed, mut upserted) = (0, 0);
    for act in reconcile(&want, &observed, now.mono_ns) {
        match act {
            Action::Remove(f) => {
                maps.remove(&f)?;
                removed += 1;
            }
            Action::Upsert(e) => {
                maps.upsert(&e)?;
                upserted += 1;
            }
        }
    }
    crate::fault::point("after-ebpf");
    apply_nftables_entries(entries, policy_version, previous, cfg, now)?;
    Ok((removed, upserted))
}

/// The nftables step, when `cfg` turns the layer on. When the table is there
/// it holds the ruleset of `previous` (what was applied before is saved only
/// after its nftables step succeeded), and a change of elements only goes to
/// the kernel over netlink as one batch (`nft_netlink`); anything else — no
/// previous state, no table, a changed shape — and a batch the kernel
/// refuses or does not confirm replace the whole table with `nft -f` (one
/// transaction). Either way the table holds the old or the new ruleset, never
/// a mix; run it after the eBPF step, which then already enforces the new one.
pub fn apply_nftables_entries(
    entries: &[FlowEntry],
    policy_version: u32,
    previous: Option<(&[FlowEntry], u32)>,
    cfg: &AgentConfig,
    now: Now,
) -> Result<(), PolicyCmdError> {
    let Some(input) = cfg.nft_input(policy_version)? else { return Ok(()) };
    let ruleset = airlock_policy::nft::compile(&input, entries, now.mono_ns);
    let old = previous.and_then(|(entries, version)| {
        let input = cfg.nft_input(version).ok()??;
        Some(airlock_policy::nft::compile(&input, entries, now.mono_ns))
    });
    let full = || crate::nftables::apply(&ruleset.to_string()).map_err(PolicyCmdError::from);
    let Some(delta) = old.and_then(|old| airlock_policy::nft_delta::element_delta(&old, &ruleset))
    else {
        return full();
    };
    let (removed, added) = (delta.removals().len(), delta.additions().len());
    // One socket for the lookup and the batch. Closing it (when the closure
    // returns) waits for the kernel to release the transaction: after the
    // change is in force.
    let applied = crate::nft_netlink::NftNetlink::open().and_then(|mut nl| {
        if !nl.table_exists(ruleset.table())? {
            return Ok(false);
        }
        nl.apply_delta(&delta).map(|()| true)
    });
    match applied {
        Ok(true) => {
            tracing::info!(removed, added, "nftables elements changed over netlink");
            Ok(())
        }
        Ok(false) => {
            tracing::info!(table = ruleset.table(), "no nftables table yet; installing it whole");
            full()
        }
        Err(e) => {
            tracing::warn!(
                error = %chain(&e),
                removed,
                added,
                "nftables element batch not applied; replacing the table"
            );
            full()
        }
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// `policy apply`: applies the file, then keeps it as the last-known-good
/// state (only once applied: a policy that failed is never kept).
pub fn apply(
    path: &Path,
    appliance: &str,
    cfg: &AgentConfig,
    maps: &mut Maps,
    store: &dyn StateStore,
    now: Now,
) -> Result<(usize, usize), PolicyCmdError> {
    let policy = read(path)?;
    let previous = store.load()?.filter(|l| l.appliance == appliance).map(|l| l.policy);
    let counts = apply_policy(&policy, previous.as_ref(), path, appliance, cfg, maps, now)?;
    let lkg = LastKnownGood {
        format: 1,
        appliance: appliance.to_owned(),
        policy,
        applied_at: now.unix_secs,
    };
    store.save(&lkg)?;
    Ok(counts)
}
