//! The reconciler's pure core: (desired, observed, now) → the minimal actions
//! that make the dataplane equal the live part of the desired state.
//!
//! Closing comes first: every removal is listed before any upsert, so applying
//! the actions in order never allows more than either the old or the new state.

use crate::flow::{Expiry, Flow, FlowEntry};

/// One change to the flow maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Remove the entry of this flow.
    Remove(Flow),
    /// Insert or replace this entry.
    Upsert(FlowEntry),
}

/// Expiries closer than this are the same expiry: a policy's wall-clock end
/// converted to the monotonic clock at two moments differs by the jitter of
/// reading two clocks (up to a second at whole-second wall time).
pub const EXPIRY_TOLERANCE_NS: u64 = 2_000_000_000;

/// True when `a` and `b` differ in nothing that matters to the dataplane.
/// The policy version is provenance, not behaviour: an entry a new version
/// leaves unchanged keeps the version that wrote it (otherwise every new
/// version would rewrite every entry on both layers).
pub fn same(a: &FlowEntry, b: &FlowEntry) -> bool {
    let expiry_same = match (a.expiry, b.expiry) {
        (Expiry::At(x), Expiry::At(y)) => x.abs_diff(y) < EXPIRY_TOLERANCE_NS,
        (x, y) => x == y,
    };
    expiry_same && FlowEntry { expiry: b.expiry, policy_version: b.policy_version, ..*a } == *b
}

/// The actions that turn `observed` into the entries of `desired` that are
/// live at `now_ns`: removals (sorted) then upserts (sorted). An observed
/// entry equal to the desired one ([`same`]) is left alone, counters too.
pub fn reconcile(desired: &[FlowEntry], observed: &[FlowEntry], now_ns: u64) -> Vec<Action> {
    reconcile_with(desired, &[], observed, now_ns)
}

/// [`reconcile`] for `desired` plus the entries of `extra` whose flows
/// `desired` does not hold, live or not (the agent's own management entries
/// beside a policy's), without copying `desired`.
pub fn reconcile_with(
    desired: &[FlowEntry],
    extra: &[FlowEntry],
    observed: &[FlowEntry],
    now_ns: u64,
) -> Vec<Action> {
    // A linear merge over both sides sorted by flow (the compiler's output
    // already is: then sorting costs one pass), not maps: a one-flow change
    // in 100k entries costs about a millisecond.
    let mut want = sorted_by_flow(desired.iter().collect());
    for e in extra {
        if let Err(at) = want.binary_search_by(|w| w.flow.cmp(&e.flow)) {
            want.insert(at, e);
        }
    }
    want.retain(|e| e.is_live(now_ns));
    let have = sorted_by_flow(observed.iter().collect());
    let (mut removes, mut upserts) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < have.len() {
        match (want.get(i), have.get(j)) {
            (Some(w), Some(h)) if w.flow == h.flow => {
                if !same(h, w) {
                    upserts.push(Action::Upsert(**w));
                }
                i += 1;
                j += 1;
            }
            (Some(w), Some(h)) if w.flow < h.flow => {
                upserts.push(Action::Upsert(**w));
                i += 1;
            }
            (Some(_), Some(h)) | (None, Some(h)) => {
                removes.push(Action::Remove(h.flow));
                j += 1;
            }
            (Some(w), None) => {
                upserts.push(Action::Upsert(**w));
                i += 1;
            }
            (None, None) => break,
        }
    }
    removes.extend(upserts);
    removes
}

/// Changes `record` (sorted by flow, one entry per flow, as [`applied`]
/// returns it) into [`applied`]`(record, actions)`: in place, by binary
/// search, for a few actions (a one-flow change in 100k entries moves no
/// more than the entries behind it); by the linear merge for many.
pub fn apply_to(record: &mut Vec<FlowEntry>, actions: &[Action]) {
    /// Above this many actions one linear merge is cheaper.
    const IN_PLACE_MAX: usize = 32;
    if actions.len() > IN_PLACE_MAX || !record.is_sorted_by_key(|e| e.flow) {
        *record = applied(record, actions);
        return;
    }
    for a in actions {
        match a {
            Action::Remove(f) => {
                if let Ok(at) = record.binary_search_by(|e| e.flow.cmp(f)) {
                    record.remove(at);
                }
            }
            Action::Upsert(e) => match record.binary_search_by(|r| r.flow.cmp(&e.flow)) {
                Ok(at) => record[at] = *e,
                Err(at) => record.insert(at, *e),
            },
        }
    }
}

/// What the maps hold after `actions` were applied, in order, to maps that
/// held `observed`: sorted by flow, one entry per flow. The agent keeps this
/// as its record of the maps (its observed state for the next change) instead
/// of listing them again; linear in the sizes, like [`reconcile`].
pub fn applied(observed: &[FlowEntry], actions: &[Action]) -> Vec<FlowEntry> {
    let have = sorted_by_flow(observed.iter().collect());
    // The reconciler lists each flow once, removals before upserts; a flow
    // removed and then upserted ends as the upsert, as in the maps.
    let mut removed: Vec<Flow> = Vec::new();
    let mut upserts: Vec<&FlowEntry> = Vec::new();
    for a in actions {
        match a {
            Action::Remove(f) => removed.push(*f),
            Action::Upsert(e) => upserts.push(e),
        }
    }
    removed.sort_unstable();
    // The last upsert of a flow wins (a stable sort keeps their order).
    upserts.sort_by_key(|e| e.flow);
    upserts.reverse();
    upserts.dedup_by_key(|e| e.flow);
    upserts.reverse();
    let mut out = Vec::with_capacity(have.len() + upserts.len());
    let (mut i, mut j, mut r) = (0, 0, 0);
    loop {
        let next = match (have.get(i), upserts.get(j)) {
            (Some(h), Some(u)) => h.flow.min(u.flow),
            (Some(h), None) => h.flow,
            (None, Some(u)) => u.flow,
            (None, None) => break,
        };
        if let Some(u) = upserts.get(j).filter(|u| u.flow == next) {
            out.push(**u);
            j += 1;
            if have.get(i).is_some_and(|h| h.flow == next) {
                i += 1;
            }
            continue;
        }
        // Only `have[i]` has this flow: kept unless removed.
        while removed.get(r).is_some_and(|f| *f < next) {
            r += 1;
        }
        if removed.get(r) != Some(&next) {
            out.push(*have[i]);
        }
        i += 1;
    }
    out
}

/// Sorts by flow (cheaply when already sorted) and keeps the first entry of
/// each flow, as a map keyed by flow would.
fn sorted_by_flow(mut v: Vec<&FlowEntry>) -> Vec<&FlowEntry> {
    if !v.is_sorted_by_key(|e| e.flow) {
        v.sort_by_key(|e| e.flow);
    }
    v.dedup_by_key(|e| e.flow);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ingress, Protocol};
    use std::collections::BTreeMap;

    fn entry(last: u8, port: u16, rule: u32, expiry: Expiry) -> FlowEntry {
        let src = std::net::IpAddr::from([10, 77, 0, last]);
        let dst = std::net::IpAddr::from([10, 78, 0, 100]);
        FlowEntry {
            flow: Flow::new(src, dst, Protocol::Tcp, Some(port)).unwrap(),
            rule_id: rule,
            policy_version: 1,
            ingress: Ingress::Patient,
            allow_reply: true,
            expiry,
        }
    }

    /// Generated expiries are whole multiples of this, above the tolerance.
    const SEC: u64 = 3 * EXPIRY_TOLERANCE_NS;

    fn apply(observed: &[FlowEntry], actions: &[Action]) -> Vec<FlowEntry> {
        let mut m: BTreeMap<Flow, FlowEntry> = observed.iter().map(|e| (e.flow, *e)).collect();
        for a in actions {
            match a {
                Action::Remove(f) => assert!(m.remove(f).is_some(), "removal of an absent entry"),
                Action::Upsert(e) => {
                    assert_ne!(m.insert(e.flow, *e).as_ref(), Some(e), "no-op upsert")
                }
            }
        }
        m.into_values().collect()
    }

    #[test]
    fn minimal_and_closing_first() {
        let a = entry(11, 443, 1, Expiry::At(100));
        let b = entry(12, 443, 2, Expiry::At(100));
        let c = entry(13, 443, 3, Expiry::Infrastructure);
        let b2 = FlowEntry { rule_id: 9, ..b };
        let stale = entry(14, 443, 4, Expiry::At(5));
        let actions = reconcile(&[a, b2, c, stale], &[a, b, entry(15, 22, 5, Expiry::At(100))], 10);
        assert_eq!(
            actions,
            [
                Action::Remove(entry(15, 22, 5, Expiry::At(100)).flow),
                Action::Upsert(b2),
                Action::Upsert(c),
            ]
        );
        assert!(reconcile(&[a], &[a], 10).is_empty(), "converged state needs nothing");
        let jitter = FlowEntry { expiry: Expiry::At(100 + EXPIRY_TOLERANCE_NS - 1), ..a };
        assert!(reconcile(&[jitter], &[a], 10).is_empty(), "clock-reading jitter is no change");
        let next_version = FlowEntry { policy_version: 2, ..a };
        assert!(
            reconcile(&[next_version], &[a], 10).is_empty(),
            "a new version alone rewrites nothing"
        );
        let later = FlowEntry { expiry: Expiry::At(100 + EXPIRY_TOLERANCE_NS), ..a };
        assert_eq!(reconcile(&[later], &[a], 10), [Action::Upsert(later)]);
        // An expired desired entry is removed from the maps.
        assert_eq!(reconcile(&[stale], &[stale], 10), [Action::Remove(stale.flow)]);
    }

    #[test]
    fn the_record_after_actions_is_what_the_maps_hold() {
        let a = entry(11, 443, 1, Expiry::At(100));
        let b = entry(12, 443, 2, Expiry::At(100));
        let b2 = FlowEntry { rule_id: 9, ..b };
        let c = entry(13, 443, 3, Expiry::Infrastructure);
        let acts = [Action::Remove(a.flow), Action::Upsert(b2), Action::Upsert(c)];
        assert_eq!(applied(&[b, a], &acts), vec![b2, c]);
        // Removed then upserted: the upsert; removing an absent flow: nothing.
        let back = [Action::Remove(a.flow), Action::Remove(c.flow), Action::Upsert(a)];
        assert_eq!(applied(&[a, b], &back), vec![a, b]);
        assert_eq!(applied(&[], &[]), Vec::<FlowEntry>::new());
    }

    /// For many pseudo-random desired/observed pairs: applying the actions to
    /// observed gives exactly the live desired entries, every action changes
    /// something, and removals precede upserts.
    #[test]
    fn converges_with_minimal_actions() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut total = 0;
        for _ in 0..2_000 {
            let (dn, on) = ((next() % 8) as usize, (next() % 8) as usize);
            let mut pick = |n: usize| -> Vec<FlowEntry> {
                (0..n)
                    .map(|_| {
                        let r = next();
                        let expiry = if r % 5 == 0 {
                            Expiry::Infrastructure
                        } else {
                            Expiry::At((r % 40 + 1) * SEC)
                        };
                        entry(
                            (r % 6) as u8 + 1,
                            440 + (r >> 8) as u16 % 3,
                            (r >> 16) as u32 % 3,
                            expiry,
                        )
                    })
                    .collect()
            };
            let mut desired = pick(dn);
            let mut observed = pick(on);
            // One entry per flow on each side, as the compiler and maps guarantee.
            desired.sort_by_key(|e| e.flow);
            desired.dedup_by_key(|e| e.flow);
            observed.sort_by_key(|e| e.flow);
            observed.dedup_by_key(|e| e.flow);
            let now = (pick(1)[0].rule_id as u64 * 13 % 40) * SEC;
            let actions = reconcile(&desired, &observed, now);
            let first_upsert = actions
                .iter()
                .position(|a| matches!(a, Action::Upsert(_)))
                .unwrap_or(actions.len());
            assert!(actions[first_upsert..].iter().all(|a| matches!(a, Action::Upsert(_))));
            let live: Vec<FlowEntry> = desired.iter().filter(|e| e.is_live(now)).copied().collect();
            let got = apply(&observed, &actions);
            assert_eq!(applied(&observed, &actions), got, "the agent's record equals the maps");
            let mut in_place = observed.clone();
            apply_to(&mut in_place, &actions);
            assert_eq!(in_place, got, "changed in place: the same record");
            let mut extra = pick(2);
            extra.dedup_by_key(|e| e.flow);
            let with = reconcile_with(&desired, &extra, &observed, now);
            let mut merged = desired.clone();
            merged.extend(extra.iter().filter(|x| !desired.iter().any(|d| d.flow == x.flow)));
            assert_eq!(with, reconcile(&merged, &observed, now), "extra entries: as if merged");
            assert_eq!(got.len(), live.len());
            assert!(got.iter().zip(&live).all(|(g, l)| same(g, l)), "{got:?} != {live:?}");
            total += actions.len();
        }
        assert!(total > 1_000, "the generator exercised the reconciler");
    }
}
