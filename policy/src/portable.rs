//! Desired state in wall-clock form, for carrying between machines.
//!
//! [`compile()`](crate::compile()) places expiries on a CLOCK_MONOTONIC axis,
//! which is private to one machine. The controller compiles with
//! [`Now::wall`] (monotonic zero at its wall-clock instant), turns the result
//! into [`PortableEntry`]s (expiry as Unix seconds) with [`to_portable`], signs
//! and ships them; the agent turns them back onto its own monotonic clock with
//! [`localize`], which drops whatever has already expired (fail closed: an
//! entry that cannot be placed in the future is never opened).

use serde::{Deserialize, Serialize};

use crate::{
    compile::Now,
    flow::{Expiry, Flow, FlowEntry, Ingress},
};

/// A [`FlowEntry`] whose expiry is Unix time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortableEntry {
    /// The allowance.
    pub flow: Flow,
    /// The policy rule behind it.
    pub rule_id: u32,
    /// The policy version that produced it.
    pub policy_version: u32,
    /// The side the forward direction enters on.
    pub ingress: Ingress,
    /// Whether replies come back.
    pub allow_reply: bool,
    /// Unix seconds at which it stops; `None` only for infrastructure rules.
    pub expires_unix: Option<u64>,
}

impl Now {
    /// A clock for compiling on a machine that does not enforce: monotonic
    /// zero at `unix_secs`.
    pub const fn wall(unix_secs: u64) -> Self {
        Self { unix_secs, mono_ns: 0 }
    }
}

/// Turns entries compiled at `now` into portable ones.
pub fn to_portable(entries: &[FlowEntry], now: Now) -> Vec<PortableEntry> {
    entries
        .iter()
        .map(|e| PortableEntry {
            flow: e.flow,
            rule_id: e.rule_id,
            policy_version: e.policy_version,
            ingress: e.ingress,
            allow_reply: e.allow_reply,
            expires_unix: match e.expiry {
                Expiry::Infrastructure => None,
                // Round up: the compiler placed whole seconds, so this is exact
                // for its output; anything else is never shortened below 1 s.
                Expiry::At(m) => Some(
                    now.unix_secs
                        .saturating_add(m.saturating_sub(now.mono_ns).div_ceil(1_000_000_000)),
                ),
            },
        })
        .collect()
}

/// Places portable entries on this machine's monotonic clock. Entries whose
/// time has passed are left out.
pub fn localize(entries: &[PortableEntry], now: Now) -> Vec<FlowEntry> {
    entries
        .iter()
        .filter_map(|p| {
            let expiry = match p.expires_unix {
                None => Expiry::Infrastructure,
                Some(t) => Expiry::At(now.mono_of(t)?),
            };
            Some(FlowEntry {
                flow: p.flow,
                rule_id: p.rule_id,
                policy_version: p.policy_version,
                ingress: p.ingress,
                allow_reply: p.allow_reply,
                expiry,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Protocol;

    fn entry(expiry: Expiry) -> FlowEntry {
        FlowEntry {
            flow: Flow::new(
                "10.77.0.13".parse().unwrap(),
                "10.78.0.100".parse().unwrap(),
                Protocol::Tcp,
                Some(443),
            )
            .unwrap(),
            rule_id: 7,
            policy_version: 3,
            ingress: Ingress::Patient,
            allow_reply: true,
            expiry,
        }
    }

    #[test]
    fn wall_compiled_entries_round_trip_onto_another_clock() {
        let wall = Now::wall(1_800_000_000);
        let compiled = [entry(Expiry::At(3_600 * 1_000_000_000)), entry(Expiry::Infrastructure)];
        let p = to_portable(&compiled, wall);
        assert_eq!(p[0].expires_unix, Some(1_800_003_600));
        assert_eq!(p[1].expires_unix, None);
        // The agent's clock: booted 5 s ago, 100 s later in wall time.
        let agent = Now { unix_secs: 1_800_000_100, mono_ns: 5_000_000_000 };
        let local = localize(&p, agent);
        assert_eq!(local[0].expiry, Expiry::At(5_000_000_000 + 3_500 * 1_000_000_000));
        assert_eq!(local[1].expiry, Expiry::Infrastructure);
    }

    #[test]
    fn expired_entries_are_never_placed() {
        let p = to_portable(&[entry(Expiry::At(10 * 1_000_000_000))], Now::wall(1_000));
        assert!(localize(&p, Now { unix_secs: 1_010, mono_ns: 1 }).is_empty());
        assert!(localize(&p, Now { unix_secs: 2_000, mono_ns: 1 }).is_empty());
        assert_eq!(localize(&p, Now { unix_secs: 1_009, mono_ns: 1 }).len(), 1);
    }
}

#[cfg(test)]
mod wire_tests {
    #[test]
    fn a_flow_from_the_wire_is_validated() {
        let ok = r#"{"src":"10.77.0.13","dst":"10.78.0.100","protocol":"tcp","port":443}"#;
        assert!(serde_json::from_str::<crate::Flow>(ok).is_ok());
        for bad in [
            r#"{"src":"0.0.0.0","dst":"10.78.0.100","protocol":"tcp","port":443}"#,
            r#"{"src":"10.77.0.13","dst":"10.78.0.100","protocol":"tcp","port":0}"#,
            r#"{"src":"10.77.0.13","dst":"fd00::1","protocol":"udp","port":53}"#,
            r#"{"src":"10.77.0.13","dst":"10.78.0.100","protocol":"icmp","port":7}"#,
        ] {
            assert!(serde_json::from_str::<crate::Flow>(bad).is_err(), "{bad}");
        }
    }
}
