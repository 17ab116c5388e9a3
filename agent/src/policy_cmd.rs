//! `airlock-agent policy check | diff | apply`: the policy file on the command
//! line, before the controller exists. Reading files and clocks happens here;
//! the decisions are the pure functions of `airlock-policy`.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use airlock_policy::{
    check_toml, compile, model::MANAGEMENT_RULE_ID, nft_delta, reconcile, validate, Action,
    DesiredState, Diagnostic, Expiry, Flow, FlowEntry, Now, Policy,
};

use crate::{
    applier::Applier,
    clock,
    config::AgentConfig,
    maps::Maps,
    nft_netlink::NftNetlink,
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
/// nftables step ([`nftables_step`]). `previous` is what was applied
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
    apply_entries_on(None, entries, policy_version, previous, cfg, maps, now)
}

/// [`apply_entries`] with an nf_tables netlink socket the caller keeps open
/// across changes (`None`: one is opened for this change and closed after
/// it, which waits for the kernel's grace period once the change is in
/// force). A one-shot [`Applier`]: the maps are listed first. The daemon
/// keeps an [`Applier`] instead, whose record spares the listing.
pub fn apply_entries_on(
    nl: Option<&mut NftNetlink>,
    entries: &[FlowEntry],
    policy_version: u32,
    previous: Option<(&[FlowEntry], u32)>,
    cfg: &AgentConfig,
    maps: &mut Maps,
    now: Now,
) -> Result<(usize, usize), PolicyCmdError> {
    Applier::with_previous(cfg, previous).apply_on(
        nl,
        entries.to_vec(),
        policy_version,
        cfg,
        maps,
        now,
    )
}

/// What the nftables step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftOutcome {
    /// The layer is off in the configuration.
    Off,
    /// Elements changed over netlink (one batch).
    Elements {
        /// Elements deleted.
        removed: usize,
        /// Elements added.
        added: usize,
    },
    /// The whole table was replaced (`nft -f`).
    Replaced,
}

/// The nftables step of [`apply_entries`], when `cfg` turns the layer on,
/// after the eBPF step found `observed` in the maps (sorted by flow) and
/// applied `actions` (the reconciler's, from `observed` to `entries` plus
/// the management entries).
///
/// When the table is there it holds the entries of `previous` (what was
/// applied before is saved only after its nftables step succeeded). If the
/// maps held the same — `previous` plus management entries, which have no
/// element — the eBPF step's actions are the table's change too: the element
/// delta is built from them and `previous` alone
/// ([`nft_delta::element_delta_from_actions`], O(changes), no ruleset
/// compiled), and goes to the kernel over netlink as one batch. If the maps
/// held anything else, an earlier apply stopped between its steps (a crash,
/// or a failed nftables step): then the table's content is not certain
/// either (that apply may have changed it before it could save), and the
/// whole table is replaced. So is it for no previous state, a changed shape,
/// a missing table, and a batch the kernel refuses or does not confirm:
/// `nft -f` with the whole new ruleset (one transaction). Either way the
/// table holds the old or the new ruleset, never a mix; the eBPF layer
/// already enforces the new one.
///
/// `nl`: as in [`apply_entries_on`].
#[expect(clippy::too_many_arguments, reason = "the state of both layers at one point")]
pub fn nftables_step(
    nl: Option<&mut NftNetlink>,
    entries: &[FlowEntry],
    policy_version: u32,
    previous: Option<(&[FlowEntry], u32)>,
    observed: &[FlowEntry],
    actions: &[Action],
    cfg: &AgentConfig,
    now: Now,
) -> Result<NftOutcome, PolicyCmdError> {
    let Some(input) = cfg.nft_input(policy_version)? else { return Ok(NftOutcome::Off) };
    let full = || {
        let ruleset = airlock_policy::nft::compile(&input, entries, now.mono_ns);
        crate::nftables::apply(&ruleset.to_string())?;
        Ok(NftOutcome::Replaced)
    };
    let Some((previous, previous_version)) = previous else { return full() };
    let policy_part = observed.iter().filter(|e| e.rule_id != MANAGEMENT_RULE_ID);
    if !nft_delta::same_live_entries(policy_part, previous, now.mono_ns) {
        tracing::warn!(
            "the eBPF maps did not hold the previously applied entries (an apply did not \
             finish): replacing the nftables table"
        );
        return full();
    }
    let Some(old_input) = cfg.nft_input(previous_version).ok().flatten() else { return full() };
    // `same_live_entries` found `previous` sorted by flow, one entry per flow.
    let old = |f: &Flow| previous.binary_search_by(|e| e.flow.cmp(f)).ok().map(|i| &previous[i]);
    let Some(delta) =
        nft_delta::element_delta_from_actions(&old_input, old, actions, &input, now.mono_ns)
    else {
        return full();
    };
    let (removed, added) = (delta.removals().len(), delta.additions().len());
    let send = |nl: &mut NftNetlink| {
        if !nl.table_exists(delta.table())? {
            return Ok(false);
        }
        nl.apply_delta(&delta).map(|()| true)
    };
    let applied = match nl {
        Some(nl) => send(nl),
        // Closing this one (when the closure returns) waits for the kernel to
        // release the transaction: after the change is in force.
        None => NftNetlink::open().and_then(|mut nl| send(&mut nl)),
    };
    match applied {
        Ok(true) => {
            tracing::info!(removed, added, "nftables elements changed over netlink");
            Ok(NftOutcome::Elements { removed, added })
        }
        Ok(false) => {
            tracing::info!(table = delta.table(), "no nftables table yet; installing it whole");
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
    // A running agent lists the maps again before its next change.
    let note = || {
        if let Err(e) = crate::applier::note_external_write(&cfg.appliance.state_dir) {
            tracing::warn!(error = %e, "cannot tell a running agent that the maps changed");
        }
    };
    note();
    let counts = apply_policy(&policy, previous.as_ref(), path, appliance, cfg, maps, now);
    note();
    let counts = counts?;
    crate::fault::point("before-save");
    let lkg = LastKnownGood {
        format: 1,
        appliance: appliance.to_owned(),
        policy,
        applied_at: now.unix_secs,
    };
    store.save(&lkg)?;
    Ok(counts)
}
