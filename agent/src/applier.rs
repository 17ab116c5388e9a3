//! The one applier, with the agent's record of what it wrote.
//!
//! Listing the kernel maps costs ~0.4 s at 100k entries, so the daemon does
//! not read them back for every change. [`Applier`] keeps an in-memory record
//! of both layers — the flow entries the maps hold (sorted by flow) and the
//! entries and policy version the nftables table holds — and diffs the
//! desired state against that record with the pure reconciler. The record
//! is the observed state of [`airlock_policy::reconcile`]; it is updated only
//! from actions the kernel confirmed ([`airlock_policy::applied`]).
//!
//! Fail closed: when the record could be wrong it is dropped and the kernel
//! is listed again before the next change —
//! - at start (a new [`Applier`] knows nothing);
//! - after any failed map write (the maps may hold part of a change) and
//!   after a failed nftables step (the table's content is then unknown: it
//!   is replaced whole next time);
//! - when another process wrote the maps: the CLI's `flow add|remove`,
//!   `policy apply` and `enroll` call [`note_external_write`] before and after
//!   their writes, which changes a stamp file in the state directory that the
//!   applier compares (one small read) before every change; a stamp that
//!   cannot be read counts as changed;
//! - when the boundary is installed again (a new `Dataplane`, a new applier).
//!
//! The applier also keeps one nf_tables netlink socket open across changes
//! (reopened after an error).

use std::path::{Path, PathBuf};

use airlock_policy::{apply_to, reconcile_with, Action, FlowEntry, Ingress, Now};
use tracing::{debug, info, warn};

use crate::{
    config::AgentConfig,
    maps::{Maps, MapsError},
    nft_netlink::NftNetlink,
    policy_cmd::{nftables_step, NftOutcome, PolicyCmdError},
};

/// The stamp file in the state directory that other processes change when
/// they write the flow maps.
pub const WRITE_STAMP: &str = "maps-written";

/// The stamp as read: `None` when no other process ever wrote.
type Stamp = Option<Vec<u8>>;

/// Makes running agents list the maps again before their next change: call
/// it before and after a process other than the daemon writes flow entries.
pub fn note_external_write(state_dir: &Path) -> std::io::Result<()> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce)
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))?;
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(WRITE_STAMP);
    let tmp = state_dir.join(format!("{WRITE_STAMP}.{}", std::process::id()));
    std::fs::write(&tmp, hex(&nonce))?;
    std::fs::rename(&tmp, &path)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The entries and policy version the nftables table holds.
type TableRecord = (Vec<FlowEntry>, u32);

/// Both layers' applier with its record of what it wrote.
pub struct Applier {
    stamp_path: PathBuf,
    /// What the maps hold, sorted by flow (management entries included);
    /// `None`: unknown, list them. Valid only with `stamp`.
    maps: Option<Vec<FlowEntry>>,
    /// The external-write stamp seen when `maps` was listed (`None`: it could
    /// not be read, so no later stamp matches).
    stamp: Option<Stamp>,
    /// What the nftables table holds; `None`: unknown, replace it whole.
    table: Option<TableRecord>,
    nl: Option<NftNetlink>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("maps", &self.maps.as_ref().map(Vec::len))
            .field("table", &self.table.as_ref().map(|(e, v)| (e.len(), *v)))
            .field("socket", &self.nl.is_some())
            .finish()
    }
}

impl Applier {
    /// An applier that knows nothing yet: its first change lists the maps
    /// and replaces the nftables table whole.
    pub fn new(cfg: &AgentConfig) -> Self {
        Self {
            stamp_path: cfg.appliance.state_dir.join(WRITE_STAMP),
            maps: None,
            stamp: None,
            table: None,
            nl: None,
        }
    }

    /// An applier for one change by a short-lived process: the maps are
    /// listed, and the table is taken to hold `previous` (the last-known-good
    /// state, checked against the listed maps before it is relied on).
    pub fn with_previous(cfg: &AgentConfig, previous: Option<(&[FlowEntry], u32)>) -> Self {
        let mut a = Self::new(cfg);
        a.table = previous.map(|(e, v)| (e.to_vec(), v));
        a
    }

    /// Forgets everything: the next change lists the maps and replaces the
    /// table whole.
    pub fn forget(&mut self) {
        self.maps = None;
        self.table = None;
    }

    /// True when the record of the maps is in use (nothing made it doubtful).
    pub fn knows_maps(&self) -> bool {
        self.maps.is_some()
    }

    fn read_stamp(&self) -> Result<Stamp, std::io::Error> {
        match std::fs::read(&self.stamp_path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The record of the maps, listed anew when there is none or another
    /// process wrote since.
    fn observed(&mut self, maps: &Maps) -> Result<Vec<FlowEntry>, MapsError> {
        let stamp = self.read_stamp();
        match (&stamp, self.maps.take()) {
            (Ok(s), Some(record)) if self.stamp.as_ref() == Some(s) => return Ok(record),
            (Ok(_), Some(_)) => {
                info!("another process wrote the flow maps: listing them again");
                // Whatever wrote them may have changed the table too.
                self.table = None;
            }
            (Err(e), _) => {
                warn!(error = %e, path = %self.stamp_path.display(), "cannot read the write stamp: listing the maps");
            }
            (Ok(_), None) => {}
        }
        let listed = maps.list()?;
        let mut observed: Vec<FlowEntry> =
            listed.iter().filter_map(|(e, _, _)| e.as_ref().ok().copied()).collect();
        let unreadable = listed.len() - observed.len();
        if unreadable > 0 {
            // They cannot be named by flow; `detach` clears them.
            warn!(unreadable, "flow entries the agent cannot read back are left in the maps");
        }
        // In flow order: the reconciler's (it then sorts nothing), and the
        // nftables step compares it with the table's record in one pass.
        observed.sort_unstable_by_key(|e| e.flow);
        self.stamp = stamp.ok();
        debug!(entries = observed.len(), "flow maps listed");
        Ok(observed)
    }

    /// Makes both layers enforce `entries` (compiled for `policy_version` at
    /// `now`): the maps first (minimal changes from the record, closing
    /// first, plus the agent's own management entries), then the nftables
    /// step ([`nftables_step`], an element delta from the same actions when
    /// the table's record matches, else a whole-table replacement). Returns
    /// (removed, upserted) of the eBPF step.
    pub fn apply(
        &mut self,
        entries: Vec<FlowEntry>,
        policy_version: u32,
        cfg: &AgentConfig,
        maps: &mut Maps,
        now: Now,
    ) -> Result<(usize, usize), PolicyCmdError> {
        let mut nl = self.nl.take();
        if nl.is_none() {
            match NftNetlink::open() {
                Ok(s) => nl = Some(s),
                Err(e) => debug!(error = %e, "no nf_tables socket kept; one per change"),
            }
        }
        let out = self.apply_on(nl.as_mut(), entries, policy_version, cfg, maps, now);
        // A socket that saw an error may be out of step: a new one next time.
        if out.is_ok() {
            self.nl = nl;
        }
        out
    }

    /// [`Applier::apply`] on the caller's nf_tables socket (`None`: one for
    /// this change).
    pub fn apply_on(
        &mut self,
        nl: Option<&mut NftNetlink>,
        entries: Vec<FlowEntry>,
        policy_version: u32,
        cfg: &AgentConfig,
        maps: &mut Maps,
        now: Now,
    ) -> Result<(usize, usize), PolicyCmdError> {
        let mut entries = entries;
        if entries.iter().any(|e| e.ingress == Ingress::Management) {
            // Only the agent writes management entries (its own way to its
            // controller): a policy or bundle never opens a management port.
            let before = entries.len();
            entries.retain(|e| e.ingress != Ingress::Management);
            warn!(dropped = before - entries.len(), "management entries in a policy are ignored");
        }
        let mut observed = self.observed(maps)?;
        // The agent's own way to its controller (eBPF only: the nftables
        // table filters forwarded traffic, never the appliance's own).
        let management = crate::controller::mgmt::entries(cfg);
        let actions = reconcile_with(&entries, &management, &observed, now.mono_ns);
        let (mut removed, mut upserted) = (0, 0);
        for act in &actions {
            let done = match act {
                Action::Remove(f) => maps.remove(f).map(|_| removed += 1),
                Action::Upsert(e) => maps.upsert(e).map(|()| upserted += 1),
            };
            if let Err(e) = done {
                // Part of the change may be in the maps: list them next time.
                // The table was not touched, but the maps no longer match
                // its record: the next nftables step replaces it whole.
                self.maps = None;
                return Err(e.into());
            }
        }
        crate::fault::point("after-ebpf");
        let table = self.table.take();
        let step = nftables_step(
            nl,
            &entries,
            policy_version,
            table.as_ref().map(|(e, v)| (e.as_slice(), *v)),
            &observed,
            &actions,
            cfg,
            now,
        );
        // The maps hold what the actions made of `observed` (whatever the
        // nftables step did).
        apply_to(&mut observed, &actions);
        self.maps = Some(observed);
        drop(table);
        match step {
            // The layer is off: a table installed later is installed whole.
            Ok(NftOutcome::Off) => Ok((removed, upserted)),
            Ok(_) => {
                self.table = Some((entries, policy_version));
                Ok((removed, upserted))
            }
            Err(e) => {
                // The table's content is unknown now.
                self.table = None;
                Err(e)
            }
        }
    }

    /// Installs the nftables table with no flows — its forward chain ends in
    /// its explicit drop — replacing any table there (one transaction): what
    /// the agent does at start when it has no state to apply, so that the
    /// nftables layer fails closed too. The maps are left as they are.
    pub fn install_empty_table(
        &mut self,
        cfg: &AgentConfig,
        now: Now,
    ) -> Result<NftOutcome, PolicyCmdError> {
        self.table = None;
        let Some(input) = cfg.nft_input(0)? else { return Ok(NftOutcome::Off) };
        let ruleset = airlock_policy::nft::compile(&input, &[], now.mono_ns);
        crate::nftables::apply(&ruleset.to_string())?;
        self.table = Some((Vec::new(), 0));
        Ok(NftOutcome::Replaced)
    }

    /// Writes the management entries (the agent's own way to its controller)
    /// for the known endpoints and `extra`, adding only, and records them.
    pub fn ensure_management(
        &mut self,
        cfg: &AgentConfig,
        maps: &mut Maps,
        extra: &[crate::controller::client::Endpoint],
    ) -> Result<usize, MapsError> {
        let mut all = crate::controller::mgmt::entries(cfg);
        all.extend(extra.iter().flat_map(|ep| crate::controller::mgmt::entries_for(cfg, ep)));
        let acts: Vec<Action> = all.iter().copied().map(Action::Upsert).collect();
        for e in &all {
            if let Err(err) = maps.upsert(e) {
                self.maps = None;
                return Err(err);
            }
        }
        if let Some(record) = &mut self.maps {
            apply_to(record, &acts);
        }
        Ok(all.len())
    }

    /// Removes expired entries from the maps (the kernel already refuses
    /// them) and from the record. With a record that no other process made
    /// doubtful, only the record's expired entries are looked up (a sweep of
    /// the maps costs as much as listing them: ~0.3 s at 100k, on the run
    /// loop that applies changes); else the maps are swept.
    pub fn remove_expired(&mut self, maps: &mut Maps, now_ns: u64) -> Result<usize, MapsError> {
        let current = matches!(
            (self.read_stamp(), &self.stamp),
            (Ok(s), Some(seen)) if s == *seen
        );
        if let (true, Some(record)) = (current, &mut self.maps) {
            let dead: Vec<_> =
                record.iter().filter(|e| !e.is_live(now_ns)).map(|e| e.flow).collect();
            let mut n = 0;
            for f in &dead {
                match maps.remove_if_expired(f, now_ns) {
                    Ok(removed) => n += usize::from(removed),
                    Err(e) => {
                        self.maps = None;
                        return Err(e);
                    }
                }
            }
            record.retain(|e| e.is_live(now_ns));
            return Ok(n);
        }
        match maps.remove_expired(now_ns) {
            Ok(n) => {
                if let Some(record) = &mut self.maps {
                    record.retain(|e| e.is_live(now_ns));
                }
                Ok(n)
            }
            Err(e) => {
                self.maps = None;
                Err(e)
            }
        }
    }
}
