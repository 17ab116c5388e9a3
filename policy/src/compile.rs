//! The compiler: (validated policy, active grants, now) → each appliance's
//! desired flow entries. Deterministic: the same input gives the same entries
//! in the same order.

use std::collections::BTreeMap;

use crate::{
    flow::{Expiry, Flow, FlowEntry, Ingress, Protocol},
    model::{Grant, GRANT_RULE_BASE, MANAGEMENT_RULE_ID},
    validate::{Issue, Resolved},
};

/// The two clocks the compiler needs, read once by the caller: wall time for
/// policy expiries and grant windows, CLOCK_MONOTONIC for the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Unix seconds.
    pub unix_secs: u64,
    /// CLOCK_MONOTONIC nanoseconds at the same instant.
    pub mono_ns: u64,
}

impl Now {
    /// The monotonic instant of Unix time `t`; `None` when `t` is not in the future.
    pub fn mono_of(&self, t: u64) -> Option<u64> {
        let ahead = t.checked_sub(self.unix_secs).filter(|d| *d > 0)?;
        Some(self.mono_ns.saturating_add(ahead.saturating_mul(1_000_000_000)))
    }
}

/// What one appliance should enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    /// The policy version compiled.
    pub policy_version: u32,
    /// Entries, sorted by flow then rule id.
    pub entries: Vec<FlowEntry>,
}

fn push(out: &mut BTreeMap<String, DesiredState>, version: u32, appliance: &str, entry: FlowEntry) {
    out.entry(appliance.to_owned())
        .or_insert_with(|| DesiredState { policy_version: version, entries: Vec::new() })
        .entries
        .push(entry);
}

/// Compiles a validated policy and the grants active at `now`. Expired flows
/// and grants outside their window produce nothing; every appliance of the
/// policy gets a state, possibly empty (everything dropped).
pub fn compile(
    r: &Resolved,
    grants: &[Grant],
    now: Now,
) -> Result<BTreeMap<String, DesiredState>, Vec<Issue>> {
    let mut out: BTreeMap<String, DesiredState> = r
        .appliances
        .keys()
        .map(|a| (a.clone(), DesiredState { policy_version: r.version, entries: Vec::new() }))
        .collect();
    let mut issues = Vec::new();

    for f in &r.flows {
        let expiry = match (f.infrastructure, f.expires) {
            (true, _) => Expiry::Infrastructure,
            (false, Some(t)) => match now.mono_of(t) {
                Some(m) => Expiry::At(m),
                None => continue, // expired
            },
            (false, None) => continue, // validation refuses this; never open it
        };
        for h in &f.hosts {
            let Some((appliance, srcs)) = r.hosts.get(h) else { continue };
            for s in srcs {
                for d in f.dst.iter().filter(|d| d.is_ipv4() == s.is_ipv4()) {
                    if let Ok(flow) = Flow::new(*s, *d, f.protocol, f.port) {
                        let e = FlowEntry {
                            flow,
                            rule_id: f.id,
                            policy_version: r.version,
                            ingress: Ingress::Patient,
                            allow_reply: f.reply,
                            expiry,
                        };
                        push(&mut out, r.version, appliance, e);
                    }
                }
            }
        }
    }

    for (i, g) in grants.iter().enumerate() {
        let at = |field: &str| format!("grant[{i}].{field}");
        if g.id == 0 || g.id >= GRANT_RULE_BASE || GRANT_RULE_BASE | g.id == MANAGEMENT_RULE_ID {
            issues.push(Issue {
                path: at("id"),
                message: format!("grant id {} is out of range", g.id),
                hint: None,
            });
            continue;
        }
        let Some(svc) = r.services.get(&g.service) else {
            issues.push(Issue {
                path: at("service"),
                message: format!("unknown service {:?}", g.service),
                hint: None,
            });
            continue;
        };
        let Ok(protocol) = g.proto.parse::<Protocol>() else {
            issues.push(Issue {
                path: at("proto"),
                message: format!("unknown protocol {:?}", g.proto),
                hint: None,
            });
            continue;
        };
        if !svc.accepted.contains(&(protocol, g.port)) {
            issues.push(Issue {
                path: at("port"),
                message: format!("service {:?} does not accept this protocol/port", g.service),
                hint: None,
            });
            continue;
        }
        if !(g.starts <= now.unix_secs && now.unix_secs < g.ends) {
            continue; // not open now
        }
        let Some(end) = now.mono_of(g.ends) else { continue };
        for h in &g.hosts {
            let Some((appliance, srcs)) = r.hosts.get(h) else {
                issues.push(Issue {
                    path: at("hosts"),
                    message: format!("unknown host {h:?}"),
                    hint: None,
                });
                continue;
            };
            for s in srcs {
                for d in svc.addresses.iter().filter(|d| d.is_ipv4() == s.is_ipv4()) {
                    if let Ok(flow) = Flow::new(*s, *d, protocol, g.port) {
                        let e = FlowEntry {
                            flow,
                            rule_id: GRANT_RULE_BASE | g.id,
                            policy_version: r.version,
                            ingress: Ingress::Patient,
                            allow_reply: true,
                            expiry: Expiry::At(end),
                        };
                        push(&mut out, r.version, appliance, e);
                    }
                }
            }
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    for s in out.values_mut() {
        s.entries.sort_by_key(|e| (e.flow, e.rule_id));
        // Validation refuses duplicate flows; a grant over a standing flow keeps the longer life.
        s.entries.dedup_by(|later, first| {
            if later.flow != first.flow {
                return false;
            }
            if longer(later.expiry, first.expiry) {
                *first = *later;
            }
            true
        });
    }
    Ok(out)
}

fn longer(a: Expiry, b: Expiry) -> bool {
    match (a, b) {
        (Expiry::Infrastructure, _) => true,
        (_, Expiry::Infrastructure) => false,
        (Expiry::At(x), Expiry::At(y)) => x > y,
    }
}
