//! Health reports: built by the run loop from the dataplane it owns, sent by
//! a task (`POST /agent/v1/report`) so that a slow or absent controller never
//! holds the loop up. Only the newest report is kept for sending.

use std::{collections::BTreeMap, sync::Arc};

use airlock_proto::agent::{Health, PortState, Report};
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

/// A report from the sync state and the health.
pub fn build(status: &SyncStatus, health: Health) -> Report {
    Report {
        applied_version: status.applied_version,
        policy_version: status.policy_version,
        refused: status.refused.clone(),
        health,
        wireguard_public_key: None,
        release: None,
    }
}

async fn send(
    shared: &Shared,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    r: &Report,
) -> Result<(), client::ClientError> {
    // One reused connection; a stale one is replaced once.
    if let Some(c) = conn.as_mut().filter(|c| !c.is_closed()) {
        match client::report(c, &shared.agent, r).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_refusal() => return Err(e),
            Err(e) => debug!(error = %super::chain(&e), "report connection stale; reconnecting"),
        }
    }
    *conn = None;
    let mut c = client::connect(shared.tls(), &shared.agent).await?;
    let out = client::report(&mut c, &shared.agent, r).await;
    if out.is_ok() {
        *conn = Some(c);
    }
    out
}

/// Sends each new report; logs a failure once, not every interval.
pub async fn report_task(shared: Arc<Shared>, mut rx: watch::Receiver<Option<Report>>) {
    let mut conn = None;
    let mut failing = false;
    while rx.changed().await.is_ok() {
        let Some(report) = rx.borrow_and_update().clone() else { continue };
        match send(&shared, &mut conn, &report).await {
            Ok(()) => {
                if failing {
                    info!("reports reach the controller again");
                }
                failing = false;
                debug!(applied_version = ?report.applied_version, "report sent");
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
