//! Element-level changes between two nftables rulesets: a one-flow policy
//! change becomes one removal and/or one addition in a single transaction
//! instead of a whole-table replacement.
//!
//! Two ways to the same change, as a value ([`ElementDelta`]: which elements
//! leave which sets, which enter), which the agent sends to the kernel as one
//! netlink batch; its `Display` (and [`delta`]) is the same change as an
//! `nft -f` script (`policy diff`, tests, the benchmark's comparison):
//!
//! - [`element_delta`] compares two whole compiled rulesets (one merge pass,
//!   O(n));
//! - [`element_delta_from_actions`] derives it from the reconciler's actions
//!   (old entries → new entries) and the old entries, placing each changed
//!   entry with [`nft::element_of`] as `compile` does: O(changes), no ruleset
//!   compiled. The agent uses it with the actions of its eBPF step when the
//!   maps held what the table holds ([`same_live_entries`]).
//!
//! Both need everything compiled at the same instant (equal expiries give
//! equal timeouts), and both refuse (`None`) when anything but set elements
//! differs — table, ports, reply floor — and the caller then replaces the
//! whole table.

use std::{cmp::Ordering, fmt};

use crate::{
    flow::{Flow, FlowEntry},
    nft::{self, NftElement, NftInput, NftRuleset, SetId},
    reconcile::{self, Action},
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

/// The element changes that turn the table compiled from the old entries
/// into the one compiled from the new ones, from the reconciler's actions —
/// the same change as `element_delta(&compile(old_input, old), &compile(new_input, new))`
/// without compiling either, in O(changes · lookup).
///
/// - `old_input`, `new_input`: what the two rulesets are (or were) compiled
///   for; `None` when they differ in shape ([`NftInput::same_shape`]).
/// - `old`: looks an old entry up by flow (old entries have one entry per
///   flow).
/// - `actions`: [`reconcile::reconcile`]`(new, old, now_ns)` — or of the
///   same entries plus others that have no place in the table (management
///   entries, [`nft::element_of`]): those are no element on either side.
///
/// `Remove(flow)` deletes the flow's element from the set its old entry is in
/// (nothing when the old entry has no element: expired, management);
/// `Upsert(entry)` deletes the old element when the set or the element
/// differs, and adds the new one (nothing to add when it has no element).
/// The result is in the order of [`element_delta`]: removals, then additions,
/// each by set and key.
///
/// One difference by design: an entry whose expiry moved by less than
/// [`reconcile::EXPIRY_TOLERANCE_NS`] is no action, so its element keeps its
/// old timeout (up to 2 s apart from a fresh compile: the tolerance the eBPF
/// layer has too); `element_delta` would replace it.
pub fn element_delta_from_actions<'o>(
    old_input: &NftInput,
    old: impl Fn(&Flow) -> Option<&'o FlowEntry>,
    actions: &[Action],
    new_input: &NftInput,
    now_ns: u64,
) -> Option<ElementDelta> {
    if !old_input.same_shape(new_input) {
        return None;
    }
    let placed = |flow: &Flow| old(flow).and_then(|e| nft::element_of(e, now_ns));
    let (mut removals, mut additions) = (Vec::new(), Vec::new());
    for action in actions {
        match action {
            Action::Remove(flow) => {
                if let Some((set, _)) = placed(flow) {
                    removals.push((set, *flow));
                }
            }
            Action::Upsert(entry) => {
                let new = nft::element_of(entry, now_ns);
                match (placed(&entry.flow), new) {
                    (Some(o), Some(n)) if o.0 == n.0 && same(&o.1, &n.1) => {}
                    (o, n) => {
                        removals.extend(o.map(|(set, e)| (set, e.flow)));
                        additions.extend(n);
                    }
                }
            }
        }
    }
    removals.sort_unstable_by_key(|(set, flow)| (set.slot(), *flow));
    additions.sort_unstable_by_key(|(set, e)| (set.slot(), e.flow));
    Some(ElementDelta { table: new_input.table().to_owned(), removals, additions })
}

/// True when `observed` and `previous` hold the same entries live at
/// `now_ns` (per flow, [`reconcile::same`]: equal but for the policy version
/// and clock-reading jitter in the expiry). Both must be sorted by flow with
/// one entry per flow; anything else (duplicates, disorder) is `false`. One
/// pass, no allocation.
///
/// The agent asks this of its eBPF maps as found before a change (without
/// its management entries) and the entries it applied before: only then are
/// the actions of its eBPF step the change of the nftables table too.
pub fn same_live_entries<'a>(
    observed: impl IntoIterator<Item = &'a FlowEntry>,
    previous: &[FlowEntry],
    now_ns: u64,
) -> bool {
    let mut observed = observed.into_iter().filter(|e| e.is_live(now_ns));
    let mut last: Option<&Flow> = None;
    for p in previous {
        if last.is_some_and(|l| *l >= p.flow) {
            return false;
        }
        last = Some(&p.flow);
        if !p.is_live(now_ns) {
            continue;
        }
        match observed.next() {
            Some(o) if o.flow == p.flow && reconcile::same(o, p) => {}
            _ => return false,
        }
    }
    observed.next().is_none()
}

/// The nft script that turns the table of `old` into that of `new` (see
/// [`element_delta`]), or `None` when they differ in more than elements. An
/// empty script means no change.
pub fn delta(old: &NftRuleset, new: &NftRuleset) -> Option<String> {
    element_delta(old, new).map(|d| d.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::{model::MANAGEMENT_RULE_ID, nft, Expiry, FlowEntry, Protocol};

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
        input_v(1)
    }

    fn input_v(version: u32) -> nft::NftInput {
        nft::NftInput::new(version)
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

    /// An entry of the generated policies: a few hosts of both families,
    /// TCP/UDP/ICMP, both sides, with and without replies, a few rule ids
    /// (and management entries), versions and expiries (`Infrastructure`, or
    /// `At(expiry)` for the generated instant).
    fn gen_entry(expiry: impl Strategy<Value = u64>) -> impl Strategy<Value = FlowEntry> {
        (
            (any::<bool>(), 1u8..5, 1u8..3, 0usize..3, 0u16..2),
            (any::<bool>(), any::<bool>(), 0u32..4, 1u32..3),
            proptest::option::weighted(0.8, expiry),
        )
            .prop_map(
                |((v6, src, dst, proto, port), (uplink, reply, rule, version), exp)| {
                    let (src, dst): (std::net::IpAddr, std::net::IpAddr) = if v6 {
                        (
                            [0xfd00, 0xa1, 0x77, 0, 0, 0, 0, src.into()].into(),
                            [0xfd00, 0xa1, 0x78, 0, 0, 0, 0, dst.into()].into(),
                        )
                    } else {
                        ([10, 77, 0, src].into(), [10, 78, 0, dst].into())
                    };
                    let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp][proto];
                    let port = (protocol != Protocol::Icmp).then_some(443 + port);
                    FlowEntry {
                        flow: Flow::new(src, dst, protocol, port).unwrap(),
                        rule_id: if rule == 0 { MANAGEMENT_RULE_ID } else { rule },
                        policy_version: version,
                        ingress: if uplink { Ingress::Uplink } else { Ingress::Patient },
                        allow_reply: reply,
                        expiry: exp.map_or(Expiry::Infrastructure, Expiry::At),
                    }
                },
            )
    }

    /// Entries with one entry per flow, sorted (as the compiler gives them).
    fn gen_entries(
        expiry: impl Strategy<Value = u64> + Clone,
    ) -> impl Strategy<Value = Vec<FlowEntry>> {
        proptest::collection::vec(gen_entry(expiry), 0..24).prop_map(|mut v| {
            v.sort_by_key(|e| e.flow);
            v.dedup_by_key(|e| e.flow);
            v
        })
    }

    /// Applies `d` to the sets of `rs` as the kernel would, refusing what the
    /// kernel refuses (deleting an absent element, adding a present one).
    fn applied(rs: &NftRuleset, d: &ElementDelta) -> BTreeMap<(usize, Flow), NftElement> {
        let mut sets: BTreeMap<(usize, Flow), NftElement> = rs
            .sets()
            .iter()
            .flat_map(|s| s.elements().map(move |e| ((s.id().slot(), e.flow), *e)))
            .collect();
        for (set, flow) in d.removals() {
            assert!(sets.remove(&(set.slot(), *flow)).is_some(), "deletes an absent {set} {flow}");
        }
        for (set, e) in d.additions() {
            assert!(sets.insert((set.slot(), e.flow), *e).is_none(), "adds a present {set} {e}");
        }
        sets
    }

    fn old_of<'a>(old: &'a [FlowEntry]) -> impl Fn(&Flow) -> Option<&'a FlowEntry> + 'a {
        move |f| old.binary_search_by(|e| e.flow.cmp(f)).ok().map(|i| &old[i])
    }

    /// Expiries at most this far from now (the generated instants).
    const SPAN: u64 = 12 * GRID;
    /// Expiries on this grid are further apart than the reconciler's
    /// tolerance: there its "same expiry" is "equal expiry".
    const GRID: u64 = 3 * reconcile::EXPIRY_TOLERANCE_NS;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// From the reconciler's actions, the same delta as the merge over
        /// both compiled rulesets — and so the same table: the new ruleset's
        /// elements (an unchanged element keeps its old version in the
        /// comment, as with the merge).
        #[test]
        fn the_delta_from_actions_is_the_merge_delta(
            old in gen_entries((1..SPAN / GRID).prop_map(|k| k * GRID)),
            new in gen_entries((1..SPAN / GRID).prop_map(|k| k * GRID)),
            now in 0..SPAN,
            (v_old, v_new) in (1u32..4, 1u32..4),
        ) {
            let (input_old, input_new) = (input_v(v_old), input_v(v_new));
            let (rs_old, rs_new) =
                (nft::compile(&input_old, &old, now), nft::compile(&input_new, &new, now));
            let merged = element_delta(&rs_old, &rs_new).unwrap();
            let actions = reconcile::reconcile(&new, &old, now);
            let from_actions =
                element_delta_from_actions(&input_old, old_of(&old), &actions, &input_new, now)
                    .unwrap();
            prop_assert_eq!(&from_actions, &merged);
            let table = applied(&rs_old, &from_actions);
            prop_assert_eq!(&table, &applied(&rs_old, &merged));
            let want: Vec<_> = rs_new
                .sets()
                .iter()
                .flat_map(|s| s.elements().map(move |e| (s.id().slot(), e.flow, e.timeout_secs, e.rule_id)))
                .collect();
            let got: Vec<_> =
                table.iter().map(|((slot, f), e)| (*slot, *f, e.timeout_secs, e.rule_id)).collect();
            prop_assert_eq!(got, want);
        }

        /// With expiries anywhere (clock-reading jitter included), the table
        /// is never more open than the new ruleset: no element it lacks, the
        /// same set and rule, a timeout within 2 s of it; it lacks only
        /// elements of at most 2 s left (an entry the reconciler kept as
        /// expired, as the eBPF layer does).
        #[test]
        fn with_jitter_the_table_is_never_more_open(
            old in gen_entries(1..SPAN),
            new in gen_entries(1..SPAN),
            now in 0..SPAN,
        ) {
            let (rs_old, rs_new) =
                (nft::compile(&input(), &old, now), nft::compile(&input(), &new, now));
            let actions = reconcile::reconcile(&new, &old, now);
            let d = element_delta_from_actions(&input(), old_of(&old), &actions, &input(), now)
                .unwrap();
            let table = applied(&rs_old, &d);
            for ((slot, flow), e) in &table {
                let want = rs_new.sets()[*slot].get(flow);
                prop_assert!(want.is_some(), "{flow} is open only in the result");
                let want = want.unwrap();
                prop_assert_eq!(e.rule_id, want.rule_id);
                let (a, b) = (e.timeout_secs.unwrap_or(0), want.timeout_secs.unwrap_or(0));
                prop_assert!(a.abs_diff(b) <= 2, "{flow}: timeout {a} s vs {b} s");
            }
            for s in rs_new.sets() {
                for e in s.elements() {
                    if !table.contains_key(&(s.id().slot(), e.flow)) {
                        prop_assert!(e.timeout_secs.is_some_and(|t| t <= 2), "{e} missing");
                    }
                }
            }
        }
    }

    #[test]
    fn a_changed_shape_needs_a_full_replacement() {
        let old = [entry(11, 443, 1)];
        let actions = reconcile::reconcile(&[entry(12, 443, 2)], &old, 0);
        let d = |a: &nft::NftInput, b: &nft::NftInput| {
            element_delta_from_actions(a, old_of(&old), &actions, b, 0)
        };
        assert_eq!(d(&input(), &input_v(7)).unwrap().len(), 2, "a version is no shape");
        let other_port = nft::NftInput::new(1)
            .with_ports(Ingress::Patient, ["patient1"])
            .unwrap()
            .with_ports(Ingress::Uplink, ["uplink0"])
            .unwrap();
        assert!(d(&input(), &other_port).is_none());
        assert!(d(&input(), &input().with_reply_min_port(32768)).is_none());
        assert!(d(&input(), &input().with_table("airlock_x").unwrap()).is_none());
    }

    #[test]
    fn same_live_entries_compares_what_is_live_per_flow() {
        let now = 50_000_000_000;
        let (a, b, c) = (entry(11, 443, 1), entry(12, 443, 2), entry(13, 443, 3));
        let expired = FlowEntry { expiry: Expiry::At(now), ..entry(12, 8443, 4) };
        assert!(same_live_entries(&[a, b, c], &[a, b, c], now));
        assert!(same_live_entries(&[], &[], now));
        let jitter = FlowEntry {
            expiry: Expiry::At(100_000_000_000 + reconcile::EXPIRY_TOLERANCE_NS - 1),
            policy_version: 9,
            ..b
        };
        assert!(same_live_entries(&[a, jitter, c], &[a, b, c], now), "jitter, versions");
        assert!(same_live_entries(&[a, expired, c], &[a, c], now), "expired on one side");
        assert!(same_live_entries(&[a, c], &[a, expired, c], now));
        assert!(!same_live_entries(&[a, c], &[a, b, c], now), "one missing");
        assert!(!same_live_entries(&[a, b, c], &[a, c], now), "one more");
        let b2 = FlowEntry { rule_id: 7, ..b };
        assert!(!same_live_entries(&[a, b2, c], &[a, b, c], now), "one changed");
        let moved = FlowEntry { ingress: Ingress::Uplink, ..b };
        assert!(!same_live_entries(&[a, moved, c], &[a, b, c], now), "another side");
        assert!(!same_live_entries(&[a, b, b], &[a, b, b], now), "a duplicate in previous");
        assert!(!same_live_entries(&[b, a, c], &[b, a, c], now), "previous out of order");
    }
}
