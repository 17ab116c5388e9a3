//! The run loop's side of the controller: owns the channel ends, applies
//! verified bundles to the dataplane it is lent, keeps the sync state and
//! produces reports. One `select!` arm in `run` drives it:
//!
//! ```text
//! ev = link.recv() => link.handle(ev, &cfg, &mut dp),
//! ```

use std::{sync::Arc, time::Duration};

use airlock_policy::localize;
use airlock_proto::{agent::Report, SignedBundle};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::VerifyingKey;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Interval,
};
use tracing::{debug, error, info, warn};

use super::{
    identity::{Identity, IdentityPaths},
    renew, report,
    sync::{self, Decision, SyncEvent},
    unix_now,
    updater::{self, UpdaterStatus},
    ControllerError, Shared, SyncStatus, Token,
};
use crate::{
    config::AgentConfig,
    dataplane::Dataplane,
    events::{self, RecentDrops},
    policy_cmd,
    store::{BundleRecord, SledStore, StateStore as _, Stored},
};

/// What the run loop is woken for.
#[derive(Debug)]
pub enum Event {
    /// From the stream task.
    Sync(SyncEvent),
    /// A report is due.
    ReportDue,
    /// First-boot enrollment finished.
    Enrolled(Box<Identity>),
    /// A task ended for good (the controller link is off from now on).
    Closed,
}

struct Active {
    shared: Arc<Shared>,
    key: VerifyingKey,
    events: mpsc::Receiver<SyncEvent>,
    reports: watch::Sender<Option<Report>>,
    tick: Interval,
    status: SyncStatus,
    tasks: Vec<JoinHandle<()>>,
    /// The state store, kept open while the link is on (bundles are saved
    /// into it); `None` when it could not be opened (then per save).
    store: Option<SledStore>,
    /// The updater's status (`None` once its task is gone); a change is
    /// reported at once.
    updater: Option<watch::Receiver<UpdaterStatus>>,
    /// The running system's paths, for the reported release state.
    system: crate::update::System,
    /// The last reason the release state could not be read (logged once).
    release_error: Option<String>,
}

enum Stage {
    Off,
    Enrolling(mpsc::Receiver<Identity>, JoinHandle<()>),
    On(Box<Active>),
}

/// The controller link of a running agent.
pub struct Link {
    stage: Stage,
    paths: IdentityPaths,
    /// The newest drop events, for the reports.
    drops: RecentDrops,
    /// The appliance's WireGuard public key (`None`: the key file is unusable).
    wg_public: Option<String>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match &self.stage {
            Stage::Off => "off",
            Stage::Enrolling(..) => "enrolling",
            Stage::On(_) => "on",
        };
        f.debug_struct("Link").field("stage", &stage).finish()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        match &self.stage {
            Stage::On(a) => a.tasks.iter().for_each(JoinHandle::abort),
            Stage::Enrolling(_, t) => t.abort(),
            Stage::Off => {}
        }
    }
}

impl Link {
    /// Starts the link: the tasks when enrolled, first-boot enrollment when a
    /// token file is provisioned, nothing otherwise. Writes the management
    /// entries that let the controller's answers through the boundary.
    /// Must be called inside the runtime.
    pub fn start(cfg: &AgentConfig, dp: &mut Dataplane) -> Self {
        let paths = IdentityPaths::new(&cfg.appliance.state_dir);
        let wg_public = match super::wg_key::load_or_generate(&cfg.appliance.state_dir) {
            Ok(k) => Some(k.0),
            Err(e) => {
                error!(error = %super::chain(&e), "no WireGuard key; reports carry none");
                None
            }
        };
        let mut link = Self {
            stage: Stage::Off,
            paths: paths.clone(),
            drops: RecentDrops::default(),
            wg_public,
        };
        if cfg.controller.is_none() && !Identity::is_enrolled(&paths) {
            return link;
        }
        match dp.applier.ensure_management(cfg, &mut dp.maps, &[]) {
            Ok(n) => debug!(entries = n, "controller management entries in place"),
            Err(e) => warn!(error = %e, "cannot write the controller management entries"),
        }
        match Identity::load(&paths) {
            Ok(Some(id)) => link.activate(cfg, &id),
            Ok(None) => link.bootstrap(cfg),
            Err(e) => error!(
                error = %super::chain(&e),
                "the controller identity is unreadable; the controller link stays off"
            ),
        }
        link
    }

    fn bootstrap(&mut self, cfg: &AgentConfig) {
        let Some(c) = &cfg.controller else { return };
        let Some(token_file) = c.enrollment_token_file.clone() else {
            info!("not enrolled with the controller (airlock-agent enroll)");
            return;
        };
        if !token_file.exists() {
            info!(token_file = %token_file.display(), "not enrolled and no enrollment token provisioned");
            return;
        }
        let (tx, rx) = mpsc::channel(1);
        let cfg = cfg.clone();
        let task = tokio::spawn(async move {
            let Some(c) = cfg.controller.clone() else { return };
            let mut attempt = 0u32;
            loop {
                let res = match Token::from_file(&token_file) {
                    Ok(t) => super::enroll(&cfg, &c.url, &c.ca_fingerprint, &t).await,
                    Err(e) => Err(e),
                };
                match res {
                    Ok(id) => {
                        if let Err(e) = std::fs::remove_file(&token_file) {
                            warn!(error = %e, token_file = %token_file.display(), "cannot delete the used token file");
                        }
                        let _ = tx.send(id).await;
                        return;
                    }
                    Err(e) if e.is_refusal() || matches!(e, ControllerError::TokenMalformed(_)) => {
                        error!(error = %super::chain(&e), "enrollment refused; the controller link stays off");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %super::chain(&e), attempt, "enrollment failed; retrying")
                    }
                }
                tokio::time::sleep(sync::backoff_delay(attempt, sync::jitter())).await;
                attempt = attempt.saturating_add(1);
            }
        });
        self.stage = Stage::Enrolling(rx, task);
    }

    fn activate(&mut self, cfg: &AgentConfig, id: &Identity) {
        let shared = match Shared::new(id, self.paths.clone()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                error!(error = %super::chain(&e), "cannot set up the controller link; it stays off");
                return;
            }
        };
        // The applied bundle version counts only for the same appliance id.
        // The store stays open while the link is on (a local `policy apply`
        // is refused meanwhile: the controller decides the policy).
        let store = SledStore::open(&cfg.appliance.state_dir)
            .inspect_err(|e| warn!(error = %super::chain(e), "cannot keep the state store open"))
            .ok();
        let lkg = match &store {
            Some(s) => s.load_state(),
            None => SledStore::open(&cfg.appliance.state_dir).and_then(|s| s.load_state()),
        };
        let lkg_version = match lkg {
            Ok(Some(l)) if l.appliance() == id.record.appliance => l.bundle_version(),
            _ => None,
        };
        let mut status = SyncStatus::load(&self.paths);
        status.connected = false;
        if status.applied_version != lkg_version {
            status.applied_version = lkg_version;
            status.policy_version = None;
        }
        let (tx, events) = mpsc::channel(4);
        let (reports, report_rx) = watch::channel(None);
        let (offers, offer_rx) = watch::channel(None);
        let (status_tx, updater_rx) = watch::channel(UpdaterStatus::default());
        let every = cfg.controller.as_ref().map_or(10, |c| c.report_interval_secs);
        let settings = updater::Settings::from_config(cfg);
        let system = settings.system.clone();
        let tasks = vec![
            tokio::spawn(sync::stream_task(Arc::clone(&shared), tx)),
            tokio::spawn(report::report_task(Arc::clone(&shared), report_rx, offers)),
            tokio::spawn(renew::renew_task(Arc::clone(&shared))),
            tokio::spawn(updater::updater_task(Arc::clone(&shared), settings, offer_rx, status_tx)),
        ];
        info!(appliance = %shared.appliance, agent_url = %shared.agent.authority(), applied_version = ?lkg_version, "controller link on");
        self.stage = Stage::On(Box::new(Active {
            shared,
            key: id.bundle_key,
            events,
            reports,
            tick: tokio::time::interval(Duration::from_secs(every.max(1))),
            status,
            tasks,
            store,
            updater: Some(updater_rx),
            system,
            release_error: None,
        }));
    }

    /// The next event; never resolves while the link is off.
    pub async fn recv(&mut self) -> Event {
        match &mut self.stage {
            Stage::Off => std::future::pending().await,
            Stage::Enrolling(rx, _) => {
                rx.recv().await.map_or(Event::Closed, |id| Event::Enrolled(Box::new(id)))
            }
            Stage::On(a) => tokio::select! {
                ev = a.events.recv() => ev.map_or(Event::Closed, Event::Sync),
                _ = a.tick.tick() => Event::ReportDue,
                alive = updater_changed(&mut a.updater) => {
                    if !alive {
                        warn!("the image updater stopped; offered updates are not taken until the agent restarts");
                        a.updater = None;
                    }
                    Event::ReportDue
                }
            },
        }
    }

    /// Handles an event with the dataplane the run loop lends.
    pub fn handle(&mut self, ev: Event, cfg: &AgentConfig, dp: &mut Dataplane) {
        match ev {
            Event::Closed => {
                warn!("the controller link stopped; the last-known-good state stays enforced");
                self.stage = Stage::Off;
            }
            Event::Enrolled(id) => {
                if let Err(e) = dp.applier.ensure_management(cfg, &mut dp.maps, &[]) {
                    warn!(error = %e, "cannot write the controller management entries");
                }
                self.activate(cfg, &id);
            }
            Event::ReportDue => {
                // Not connected: put the management entries back in case a
                // local `policy apply` replaced them (it makes the maps equal
                // its policy), else the controller's answers stay dropped.
                if matches!(&self.stage, Stage::On(a) if !a.status.connected) {
                    if let Err(e) = dp.applier.ensure_management(cfg, &mut dp.maps, &[]) {
                        debug!(error = %e, "cannot write the controller management entries");
                    }
                }
                self.report(cfg, dp);
            }
            Event::Sync(SyncEvent::Connected) => {
                self.update(|s| {
                    s.connected = true;
                    s.last_contact = Some(unix_now());
                });
            }
            Event::Sync(SyncEvent::Disconnected) => self.update(|s| s.connected = false),
            Event::Sync(SyncEvent::Bundle(b)) => {
                self.update(|s| s.last_contact = Some(unix_now()));
                self.on_bundle(&b, cfg, dp);
            }
        }
    }

    fn update(&mut self, f: impl FnOnce(&mut SyncStatus)) {
        let Stage::On(a) = &mut self.stage else { return };
        f(&mut a.status);
        a.status.updated_at = unix_now();
        if let Err(e) = a.status.save(&self.paths) {
            debug!(error = %super::chain(&e), "cannot record the controller status");
        }
    }

    fn report(&mut self, cfg: &AgentConfig, dp: &Dataplane) {
        let Stage::On(a) = &mut self.stage else { return };
        let mut health = report::health(dp, cfg);
        health.recent_drops = self.drops.to_vec();
        let release = match crate::update::read_release_state(&a.system) {
            Ok(r) => {
                a.release_error = None;
                r.map(|mut r| {
                    if let Some(u) = &a.updater {
                        u.borrow().merge_into(&mut r);
                    }
                    r
                })
            }
            Err(e) => {
                let text = super::chain(&e);
                if a.release_error.as_ref() != Some(&text) {
                    warn!(error = %text, "cannot read the image's release state; reports carry none");
                    a.release_error = Some(text);
                }
                None
            }
        };
        let mut r = report::build(&a.status, health, release);
        r.wireguard_public_key.clone_from(&self.wg_public);
        a.reports.send_replace(Some(r));
    }

    /// Keeps a decoded drop event for the reports, with its ingress port's
    /// name and its cause (for an expired entry, the rule it came from, read
    /// from the flow map while the entry is still there).
    pub fn note_drop(&mut self, d: &events::Drop, dp: &Dataplane) {
        let port = dp
            .ports
            .iter()
            .find(|(_, i, _)| *i == d.ifindex)
            .map_or_else(|| format!("ifindex {}", d.ifindex), |(n, _, _)| n.clone());
        let rule =
            (d.reason == "drop_expired").then(|| dp.maps.list().ok()).flatten().and_then(|l| {
                events::matching_rule(d, l.iter().filter_map(|(e, _, _)| e.as_ref().ok()))
            });
        let cause = events::cause(d.reason, rule);
        self.drops.push(events::record(d, unix_now(), port, cause));
    }

    fn on_bundle(&mut self, signed: &SignedBundle, cfg: &AgentConfig, dp: &mut Dataplane) {
        let Stage::On(a) = &mut self.stage else { return };
        let span = tracing::info_span!("bundle", version = signed.version, key_id = %signed.key_id);
        let _e = span.enter();
        let applied = a.status.applied_version;
        let outcome = match sync::decide(signed, &a.key, &a.shared.appliance, applied) {
            Decision::AlreadyApplied => {
                debug!("bundle already applied");
                return;
            }
            Decision::Refuse(r) => Err(r),
            Decision::Apply(bundle) => {
                apply(signed, &bundle, &a.shared.appliance, &a.key, a.store.as_ref(), cfg, dp)
                    .map(|()| bundle)
            }
        };
        match outcome {
            Ok(bundle) => self.update(|s| {
                s.applied_version = Some(bundle.version);
                s.policy_version = Some(bundle.policy_version);
            }),
            Err(r) => {
                warn!(version = r.version, reason = %r.reason, "bundle refused; the last-known-good state stays enforced");
                self.update(|s| s.refused = Some(r));
            }
        }
        self.report(cfg, dp);
    }
}

/// Resolves when the updater's status changed (true) or its task is gone
/// (false); never while there is none.
async fn updater_changed(rx: &mut Option<watch::Receiver<UpdaterStatus>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Applies a verified bundle to both layers through the run loop's applier
/// (its record of both layers spares listing the maps), then keeps it as
/// last-known-good in `store` (opened for the save when `None`).
fn apply(
    signed: &SignedBundle,
    bundle: &airlock_proto::PolicyBundle,
    appliance: &str,
    key: &VerifyingKey,
    store: Option<&SledStore>,
    cfg: &AgentConfig,
    dp: &mut Dataplane,
) -> Result<(), airlock_proto::agent::Refusal> {
    let now = policy_cmd::now();
    let entries = localize(&bundle.entries, now);
    let refused =
        |reason: String| airlock_proto::agent::Refusal { version: bundle.version, reason };
    let n = entries.len();
    let (removed, upserted) = dp
        .applier
        .apply(entries, bundle.policy_version, cfg, &mut dp.maps, now)
        .map_err(|e| refused(format!("applying failed: {}", super::chain(&e))))?;
    info!(
        policy_version = bundle.policy_version,
        entries = n,
        expired = bundle.entries.len() - n,
        removed,
        upserted,
        "bundle applied"
    );
    let lkg = Stored::Bundle(BundleRecord {
        format: 1,
        appliance: appliance.to_owned(),
        bundle: signed.clone(),
        bundle_key: B64.encode(key.as_bytes()),
        applied_at: now.unix_secs,
    });
    // Enforced now, but a restart would go back to the older state: say so.
    let saved = match store {
        Some(s) => s.save_state(&lkg),
        None => SledStore::open(&cfg.appliance.state_dir).and_then(|s| s.save_state(&lkg)),
    };
    if let Err(e) = saved {
        error!(error = %super::chain(&e), "the applied bundle is not saved as last-known-good");
    }
    Ok(())
}
