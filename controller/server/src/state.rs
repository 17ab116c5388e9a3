//! The state every handler shares, built once at start.

use std::sync::Arc;

use airlock_store::Store;

use crate::{
    appliances::Appliances,
    auth::Sessions,
    ca::Ca,
    metrics::Metrics,
    policy::Policies,
    releases::Releases,
    sync::Hub,
    telemetry::Telemetry,
    tls::{Registry, ServerCert},
};

/// Shared state.
#[derive(Debug)]
pub struct AppState {
    /// The encrypted store.
    pub store: Store,
    /// The internal CA.
    pub ca: Ca,
    /// The server certificate in use (renewed in place).
    pub cert: Arc<ServerCert>,
    /// Accepted client certificates.
    pub registry: Arc<Registry>,
    /// Admin sessions.
    pub sessions: Sessions,
    /// Appliance records and enrollment.
    pub appliances: Appliances,
    /// Policy versions and bundles.
    pub policies: Policies,
    /// Image releases and their rollout.
    pub releases: Releases,
    /// Bundle streams and reports.
    pub hub: Arc<Hub>,
    /// Counters.
    pub metrics: Metrics,
    /// The appliances' reported packet counters over time (dashboard charts).
    pub telemetry: Telemetry,
    /// The URL of the main listener.
    pub public_url: String,
    /// The URL of the agent listener.
    pub agent_url: String,
    /// Unix seconds (a parameter so tests can move time).
    pub clock: fn() -> u64,
}

impl AppState {
    /// Now, in Unix seconds.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Ids of the enrolled appliances.
    pub fn enrolled(&self) -> Vec<String> {
        self.appliances
            .list()
            .map(|l| {
                l.into_iter()
                    .filter(|r| r.state == airlock_proto::admin::ApplianceState::Enrolled)
                    .map(|r| r.id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The system clock, in Unix seconds.
pub fn system_clock() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
