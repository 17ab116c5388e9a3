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
    // A linear merge over both sides sorted by flow (the compiler's output
    // already is: then sorting costs one pass), not maps: a one-flow change
    // in 100k entries costs a few milliseconds.
    let want = sorted_by_flow(desired.iter().filter(|e| e.is_live(now_ns)).collect());
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
            assert_eq!(got.len(), live.len());
            assert!(got.iter().zip(&live).all(|(g, l)| same(g, l)), "{got:?} != {live:?}");
            total += actions.len();
        }
        assert!(total > 1_000, "the generator exercised the reconciler");
    }
}
