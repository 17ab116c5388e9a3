//! Health reports: built by the run loop from the dataplane it owns, sent by
//! a task (`POST /agent/v1/report`) so that a slow or absent controller never
//! holds the loop up. Only the newest report is kept for sending. The
//! controller's answer may offer an image update; the task hands each answer's
//! offer (or none) to the updater (`updater::updater_task`).

use std::{collections::BTreeMap, sync::Arc};

use airlock_proto::{
    agent::{Health, PortState, Report},
    release::{ReleaseState, ReportResponse, UpdateOffer},
};
use http_body_util::Full;
use hyper::{body::Bytes, client::conn::http1::SendRequest};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{client, Shared, SyncStatus};
use crate::{config::AgentConfig, dataplane::Dataplane};

/// The dataplane's health as the controller sees it.
pub fn health(dp: &Dataplane, cfg: &AgentConfig) -> Health {
    let mut problems = dp.problems(cfg);
    let flows = dp.maps.len().map_or_else(
        |e| {
            problems.push(format!("cannot count flow entries: {e}"));
            0
        },
        |n| n as u64,
    );
    let counters: BTreeMap<String, u64> = dp.maps.stats().map_or_else(
        |e| {
            problems.push(format!("cannot read counters: {e}"));
            BTreeMap::new()
        },
        |s| s.iter().map(|(r, c)| (r.as_str().to_owned(), c.packets)).collect(),
    );
    let ports = ports(dp, cfg);
    Health {
        enforcing: problems.is_empty(),
        forwarding: crate::netif::forwarding(),
        problems,
        flows,
        counters,
        tunnels: Vec::new(),
        ports,
        recent_drops: Vec::new(),
    }
}

/// Each guarded port with its role and the XDP mode the kernel reports for
/// it. Attached means: the same device (ifindex) the agent attached to, its
/// link pin in place, and a program on it.
fn ports(dp: &Dataplane, cfg: &AgentConfig) -> Vec<PortState> {
    let layout = cfg.pins();
    dp.ports
        .iter()
        .map(|(name, ifindex, role)| {
            let mode = crate::hwcheck::attached_xdp(name);
            let same_device = crate::netif::ifindex(name).is_ok_and(|i| i == *ifindex);
            PortState {
                name: name.clone(),
                role: role.as_str().to_owned(),
                attached: mode.is_some() && same_device && layout.link(name, *ifindex).exists(),
                xdp_mode: mode.unwrap_or_else(|| "detached".to_owned()),
            }
        })
        .collect()
}

/// A report from the sync state, the health and the image's release state
/// (`None`: not an A/B appliance image).
pub fn build(status: &SyncStatus, health: Health, release: Option<ReleaseState>) -> Report {
    Report {
        applied_version: status.applied_version,
        policy_version: status.policy_version,
        refused: status.refused.clone(),
        health,
        wireguard_public_key: None,
        release,
    }
}

async fn send(
    shared: &Shared,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    r: &Report,
) -> Result<ReportResponse, client::ClientError> {
    // One reused connection; a stale one is replaced once.
    if let Some(c) = conn.as_mut().filter(|c| !c.is_closed()) {
        match client::report(c, &shared.agent, r).await {
            Ok(resp) => return Ok(resp),
            // Delivered, or refused: sending again cannot help.
            Err(e) if e.is_refusal() || matches!(e, client::ClientError::Decode(_)) => {
                return Err(e)
            }
            Err(e) => debug!(error = %super::chain(&e), "report connection stale; reconnecting"),
        }
    }
    *conn = None;
    let mut c = client::connect(shared.tls(), &shared.agent).await?;
    let out = client::report(&mut c, &shared.agent, r).await;
    if out.is_ok() || matches!(out, Err(client::ClientError::Decode(_))) {
        *conn = Some(c);
    }
    out
}

/// Sends each new report and passes the answer's update offer to `offers`
/// (every answer, so the updater looks at an unchanged offer again); logs a
/// failure once, not every interval.
pub async fn report_task(
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Option<Report>>,
    offers: watch::Sender<Option<UpdateOffer>>,
) {
    let mut conn = None;
    let mut failing = false;
    let mut undecodable = false;
    while rx.changed().await.is_ok() {
        let Some(report) = rx.borrow_and_update().clone() else { continue };
        match send(&shared, &mut conn, &report).await {
            Ok(resp) => {
                if failing {
                    info!("reports reach the controller again");
                }
                failing = false;
                undecodable = false;
                debug!(applied_version = ?report.applied_version, offer = ?resp.update.as_ref().map(|o| o.release), "report sent");
                offers.send_replace(resp.update);
            }
            Err(e @ client::ClientError::Decode(_)) => {
                // The report arrived; the offer (if any) stays as it was.
                if !undecodable {
                    warn!(error = %super::chain(&e), "the controller's answer to a report does not decode; no update offer taken from it");
                }
                undecodable = true;
                failing = false;
            }
            Err(e) => {
                conn = None;
                if !failing {
                    warn!(error = %super::chain(&e), "cannot send the report; will keep trying");
                }
                failing = true;
            }
        }
    }
}
