//! Interim applier until `policy_cmd::apply_entries` exists (the nftables
//! netlink work in policy_cmd.rs is in flight): the same eBPF reconcile, and
//! the nftables table replaced whole.

use airlock_policy::{reconcile, Action, FlowEntry, Now};

use crate::{config::AgentConfig, maps::Maps, policy_cmd::PolicyCmdError};

/// Makes the maps equal `entries` (plus the management entries), then the
/// nftables table. Returns (removed, upserted) of the eBPF step.
pub fn apply_entries(
    entries: &[FlowEntry],
    policy_version: u32,
    _previous: Option<(&[FlowEntry], u32)>,
    cfg: &AgentConfig,
    maps: &mut Maps,
    now: Now,
) -> Result<(usize, usize), PolicyCmdError> {
    let want = super::mgmt::with_management(entries, cfg);
    let observed: Vec<FlowEntry> =
        maps.list()?.iter().filter_map(|(e, _, _)| e.as_ref().ok().copied()).collect();
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
    if let Some(input) = cfg.nft_input(policy_version)? {
        let ruleset = airlock_policy::nft::compile(&input, entries, now.mono_ns);
        crate::nftables::apply(&ruleset.to_string())?;
    }
    Ok((removed, upserted))
}
