//! Element-level changes between two nftables rulesets: a one-flow policy
//! change becomes one removal and/or one addition in a single transaction
//! instead of a whole-table replacement.
//!
//! [`element_delta`] gives the change as a value ([`ElementDelta`]: which
//! elements leave which sets, which enter), which the agent sends to the
//! kernel as one netlink batch; its `Display` (and [`delta`]) is the same
//! change as an `nft -f` script (`policy diff`, tests, the benchmark's
//! comparison).
//!
//! Both rulesets must be compiled at the same instant (equal expiries give
//! equal timeouts). `element_delta` refuses (`None`) when anything but set
//! elements differs — table, ports, reply floor, rules — and the caller then
//! replaces the whole table.

use std::{cmp::Ordering, fmt};

use crate::{
    flow::Flow,
    nft::{NftElement, NftRuleset, SetId},
    Ingress,
};

/// The element changes that turn the table of one ruleset into that of
/// another: removals first (closing first), then additions, each in set
/// order and then key order. Applied as one transaction, the order inside
/// does not matter to packets; it keeps the output deterministic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementDelta {
    table: String,
    removals: Vec<(SetId, Flow)>,
    additions: Vec<(SetId, NftElement)>,
}

impl ElementDelta {
    /// The table (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }
    /// Elements to delete: the set and the element's key.
    pub fn removals(&self) -> &[(SetId, Flow)] {
        &self.removals
    }
    /// Elements to add, with their timeout and comment.
    pub fn additions(&self) -> &[(SetId, NftElement)] {
        &self.additions
    }
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.removals.is_empty() && self.additions.is_empty()
    }
    /// Number of element changes (removals plus additions).
    pub fn len(&self) -> usize {
        self.removals.len() + self.additions.len()
    }
}

/// An element's key as nft writes it, e.g. `10.77.0.11 . 10.78.0.100 . tcp . 443`
/// (`10.77.0.11 . 10.78.0.1` in the echo sets).
pub fn key_text(flow: &Flow) -> String {
    match flow.port() {
        Some(port) => format!("{} . {} . {} . {port}", flow.src(), flow.dst(), flow.protocol()),
        None => format!("{} . {}", flow.src(), flow.dst()),
    }
}

impl fmt::Display for ElementDelta {
    /// The change as an `nft -f` script: one `delete element` / `add element`
    /// line per change; empty when nothing changes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = &self.table;
        for (set, flow) in &self.removals {
            writeln!(f, "delete element inet {table} {set} {{ {} }}", key_text(flow))?;
        }
        for (set, e) in &self.additions {
            writeln!(f, "add element inet {table} {set} {{ {e} }}")?;
        }
        Ok(())
    }
}

/// Equal for the dataplane (the version in the comment is provenance).
fn same(a: &NftElement, b: &NftElement) -> bool {
    a.timeout_secs == b.timeout_secs && a.rule_id == b.rule_id
}

/// The element changes that turn the table of `old` into that of `new`, or
/// `None` when they differ in more than elements.
pub fn element_delta(old: &NftRuleset, new: &NftRuleset) -> Option<ElementDelta> {
    let same_shape = old.table() == new.table()
        && [Ingress::Patient, Ingress::Uplink].iter().all(|r| old.ports(*r) == new.ports(*r))
        && old.forward_chain() == new.forward_chain()
        && old.sets().len() == new.sets().len()
        && old.sets().iter().zip(new.sets()).all(|(a, b)| a.id() == b.id());
    if !same_shape {
        return None;
    }
    let (mut removals, mut additions) = (Vec::new(), Vec::new());
    for (o, n) in old.sets().iter().zip(new.sets()) {
        let set = n.id();
        // Both sides are in key order: one merge pass, no lookups (100k
        // elements in a few milliseconds).
        let (mut olds, mut news) = (o.elements().peekable(), n.elements().peekable());
        loop {
            let order = match (olds.peek(), news.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(oe), Some(ne)) => oe.flow.cmp(&ne.flow),
            };
            match (order, olds.next_if(|_| order.is_le()), news.next_if(|_| order.is_ge())) {
                (Ordering::Equal, Some(oe), Some(ne)) if !same(oe, ne) => {
                    removals.push((set, oe.flow));
                    additions.push((set, *ne));
                }
                (Ordering::Less, Some(oe), _) => removals.push((set, oe.flow)),
                (Ordering::Greater, _, Some(ne)) => additions.push((set, *ne)),
                _ => {}
            }
        }
    }
    Some(ElementDelta { table: new.table().to_owned(), removals, additions })
}

/// The nft script that turns the table of `old` into that of `new` (see
/// [`element_delta`]), or `None` when they differ in more than elements. An
/// empty script means no change.
pub fn delta(old: &NftRuleset, new: &NftRuleset) -> Option<String> {
    element_delta(old, new).map(|d| d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{nft, Expiry, FlowEntry, Protocol};

    fn entry(last: u8, port: u16, rule: u32) -> FlowEntry {
        FlowEntry {
            flow: Flow::new(
                [10, 77, 0, last].into(),
                [10, 78, 0, 100].into(),
                Protocol::Tcp,
                Some(port),
            )
            .unwrap(),
            rule_id: rule,
            policy_version: 1,
            ingress: Ingress::Patient,
            allow_reply: true,
            expiry: Expiry::At(100_000_000_000),
        }
    }

    fn input() -> nft::NftInput {
        nft::NftInput::new(1)
            .with_ports(Ingress::Patient, ["patient0"])
            .unwrap()
            .with_ports(Ingress::Uplink, ["uplink0"])
            .unwrap()
    }

    #[test]
    fn one_changed_flow_is_one_delete_and_one_add() {
        let old = nft::compile(&input(), &[entry(11, 443, 1), entry(12, 443, 2)], 0);
        let new = nft::compile(&input(), &[entry(11, 443, 1), entry(13, 443, 3)], 0);
        let script = delta(&old, &new).unwrap();
        assert_eq!(
            script,
            "delete element inet airlock flow4_patient { 10.77.0.12 . 10.78.0.100 . tcp . 443 }\n\
             add element inet airlock flow4_patient { 10.77.0.13 . 10.78.0.100 . tcp . 443 timeout 100s comment \"rule 3 v1\" }\n"
        );
        assert_eq!(delta(&old, &old).unwrap(), "", "no change, no script");
        assert!(element_delta(&old, &old).unwrap().is_empty());
        let v2 = FlowEntry { policy_version: 2, ..entry(11, 443, 1) };
        let bumped = nft::compile(&input(), &[v2, entry(12, 443, 2)], 0);
        assert_eq!(delta(&old, &bumped).unwrap(), "", "a version bump alone changes nothing");
    }

    #[test]
    fn the_structured_delta_names_sets_and_elements() {
        // Rule 2 changes its rule id (same key: removed and added again), rule 3
        // goes, rule 4 comes; rule 1 stays.
        let old =
            nft::compile(&input(), &[entry(11, 443, 1), entry(12, 443, 2), entry(13, 443, 3)], 0);
        let new =
            nft::compile(&input(), &[entry(11, 443, 1), entry(12, 443, 5), entry(14, 443, 4)], 0);
        let d = element_delta(&old, &new).unwrap();
        let set = old.sets()[0].id();
        assert_eq!(set.to_string(), "flow4_patient");
        assert_eq!(d.table(), "airlock");
        assert_eq!(
            d.removals(),
            [(set, entry(12, 443, 2).flow), (set, entry(13, 443, 3).flow)],
            "closing first, in key order"
        );
        let added: Vec<_> = d.additions().iter().map(|(s, e)| (*s, e.flow, e.rule_id)).collect();
        assert_eq!(added, [(set, entry(12, 443, 5).flow, 5), (set, entry(14, 443, 4).flow, 4)]);
        assert_eq!(d.additions()[0].1.timeout_secs, Some(100));
        assert_eq!(d.len(), 4);
        assert_eq!(d.to_string(), delta(&old, &new).unwrap());
    }

    /// The merge pass finds what looking every element up in the other
    /// ruleset finds, for overlapping, disjoint and changed entries.
    #[test]
    fn the_merge_pass_agrees_with_lookups() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50 {
            let mut pick = |n: usize| -> Vec<FlowEntry> {
                (0..n)
                    .map(|_| {
                        let r = next();
                        entry(
                            (r % 40) as u8 + 1,
                            [443, 8443][(r >> 8) as usize % 2],
                            (r >> 16) as u32 % 3,
                        )
                    })
                    .collect()
            };
            let (a, b) = (pick(30), pick(30));
            let (old, new) = (nft::compile(&input(), &a, 0), nft::compile(&input(), &b, 0));
            let d = element_delta(&old, &new).unwrap();
            let (mut removals, mut additions) = (Vec::new(), Vec::new());
            for (o, n) in old.sets().iter().zip(new.sets()) {
                for e in o.elements() {
                    if !n.get(&e.flow).is_some_and(|ne| same(e, ne)) {
                        removals.push((n.id(), e.flow));
                    }
                }
                for e in n.elements() {
                    if !o.get(&e.flow).is_some_and(|oe| same(oe, e)) {
                        additions.push((n.id(), *e));
                    }
                }
            }
            assert_eq!(d.removals(), removals);
            assert_eq!(d.additions(), additions);
        }
    }

    #[test]
    fn other_differences_need_a_full_replacement() {
        let old = nft::compile(&input(), &[entry(11, 443, 1)], 0);
        let other_ports = nft::NftInput::new(1)
            .with_ports(Ingress::Patient, ["patient1"])
            .unwrap()
            .with_ports(Ingress::Uplink, ["uplink0"])
            .unwrap();
        assert!(delta(&old, &nft::compile(&other_ports, &[entry(11, 443, 1)], 0)).is_none());
        let floor = input().with_reply_min_port(32768);
        assert!(delta(&old, &nft::compile(&floor, &[entry(11, 443, 1)], 0)).is_none());
    }
}
