//! The stored last-known-good state turned back into flow entries and
//! applied: at start (before forwarding) and as the "previous" state of the
//! next apply (the base of the nftables element delta).

use std::path::Path;

use airlock_policy::{localize, FlowEntry, Now};
use airlock_proto::BundleError;

use super::identity::{parse_bundle_key, IdentityError};
use crate::{
    applier::Applier,
    config::AgentConfig,
    maps::Maps,
    policy_cmd::{self, PolicyCmdError},
    store::Stored,
};

/// Why a stored state cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The stored bundle's key does not decode.
    #[error("the stored bundle key is unusable")]
    Key(#[source] IdentityError),
    /// The stored bundle no longer verifies (integrity).
    #[error("the stored bundle does not verify; nothing from it is applied")]
    Bundle(#[source] BundleError),
    /// The stored policy has no such appliance.
    #[error("the stored policy has no appliance {0:?}")]
    UnknownAppliance(String),
    /// Compiling or applying failed.
    #[error(transparent)]
    Apply(#[from] PolicyCmdError),
}

/// The flow entries of `lkg` at `now` and their policy version. A bundle is
/// verified again with the key stored beside it; its expired entries drop out.
pub fn desired_entries(
    lkg: &Stored,
    origin: &Path,
    now: Now,
) -> Result<(Vec<FlowEntry>, u32), RestoreError> {
    match lkg {
        Stored::Policy(l) => {
            let mut out = policy_cmd::compile_policy(&l.policy, origin, now)?;
            let want = out
                .remove(&l.appliance)
                .ok_or_else(|| RestoreError::UnknownAppliance(l.appliance.clone()))?;
            Ok((want.entries, l.policy.version))
        }
        Stored::Bundle(b) => {
            let key = parse_bundle_key(&b.bundle_key).map_err(RestoreError::Key)?;
            let bundle = b.bundle.verify(&key, &b.appliance, None).map_err(RestoreError::Bundle)?;
            Ok((localize(&bundle.entries, now), bundle.policy_version))
        }
    }
}

/// Applies `lkg` to both layers at `now` through the daemon's `applier`
/// (at start it knows nothing: the maps are listed and the nftables table
/// is replaced whole). Returns (removed, upserted) of the eBPF step.
pub fn restore(
    lkg: &Stored,
    cfg: &AgentConfig,
    applier: &mut Applier,
    maps: &mut Maps,
    now: Now,
) -> Result<(usize, usize), RestoreError> {
    let origin = cfg.appliance.state_dir.join("last-known-good");
    let (entries, policy_version) = desired_entries(lkg, &origin, now)?;
    Ok(applier.apply(entries, policy_version, cfg, maps, now)?)
}
