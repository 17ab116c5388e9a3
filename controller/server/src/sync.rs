//! The bundle stream hub: one watch channel per appliance holding its newest
//! signed bundle, the agents' last reports, and who is connected.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes_util::line;
use futures_util::stream::Stream;
use tokio::sync::watch;

use airlock_proto::{
    agent::{Report, StreamMessage},
    SignedBundle,
};

/// How often a quiet stream gets a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

mod bytes_util {
    use airlock_proto::agent::StreamMessage;
    /// One NDJSON line.
    pub fn line(m: &StreamMessage) -> Vec<u8> {
        let mut v = serde_json::to_vec(m).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[derive(Debug, Default)]
struct Entry {
    tx: Option<watch::Sender<Option<SignedBundle>>>,
    connected: usize,
    report: Option<(Report, u64)>,
}

/// The hub.
#[derive(Debug, Default)]
pub struct Hub {
    map: Mutex<HashMap<String, Entry>>,
}

fn with<R>(hub: &Hub, id: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
    let mut m = hub.map.lock().unwrap_or_else(|p| p.into_inner());
    f(m.entry(id.to_owned()).or_default())
}

impl Hub {
    /// Publishes a new bundle to the appliance's streams.
    pub fn publish(&self, id: &str, b: SignedBundle) {
        with(self, id, |e| match &e.tx {
            Some(tx) => {
                tx.send_replace(Some(b));
            }
            None => e.tx = Some(watch::channel(Some(b)).0),
        });
    }

    /// Ends every stream of a (revoked) appliance.
    pub fn close(&self, id: &str) {
        with(self, id, |e| e.tx = None);
    }

    /// Whether the appliance has a bundle in the hub.
    pub fn has_bundle(&self, id: &str) -> bool {
        with(self, id, |e| e.tx.as_ref().is_some_and(|t| t.borrow().is_some()))
    }

    /// Records a report.
    pub fn report(&self, id: &str, r: Report, now: u64) {
        with(self, id, |e| e.report = Some((r, now)));
    }

    /// The last report and when it came.
    pub fn last_report(&self, id: &str) -> Option<(Report, u64)> {
        with(self, id, |e| e.report.clone())
    }

    /// Looks at the last report (and when it came) and the number of open
    /// streams without copying the report.
    pub fn inspect<R>(&self, id: &str, f: impl FnOnce(Option<(&Report, u64)>, usize) -> R) -> R {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(id) {
            Some(e) => f(e.report.as_ref().map(|(r, t)| (r, *t)), e.connected),
            None => f(None, 0),
        }
    }

    /// Open streams of the appliance.
    pub fn connected(&self, id: &str) -> usize {
        with(self, id, |e| e.connected)
    }

    /// Appliances with at least one open stream.
    pub fn connected_total(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.connected > 0)
            .count()
    }

    /// The NDJSON body of one agent's stream: its current bundle, then each
    /// new one, heartbeats in between. Ends when the appliance is revoked.
    pub fn stream(
        self: &Arc<Self>,
        id: &str,
        clock: fn() -> u64,
    ) -> impl Stream<Item = Result<Vec<u8>, std::convert::Infallible>> + Send + 'static {
        let rx = with(self, id, |e| {
            e.connected += 1;
            e.tx.get_or_insert_with(|| watch::channel(None).0).subscribe()
        });
        let guard = Connected { hub: self.clone(), id: id.to_owned() };
        let state = (rx, true, guard);
        futures_util::stream::unfold(state, move |(mut rx, first, guard)| async move {
            if first {
                let cur = rx.borrow_and_update().clone();
                if let Some(b) = cur {
                    return Some((Ok(line(&StreamMessage::Bundle(b))), (rx, false, guard)));
                }
            }
            match tokio::time::timeout(HEARTBEAT, rx.changed()).await {
                Err(_) => {
                    Some((Ok(line(&StreamMessage::Heartbeat { at: clock() })), (rx, false, guard)))
                }
                Ok(Err(_)) => None, // sender dropped: revoked
                Ok(Ok(())) => {
                    let cur = rx.borrow_and_update().clone();
                    let msg = match cur {
                        Some(b) => StreamMessage::Bundle(b),
                        None => StreamMessage::Heartbeat { at: clock() },
                    };
                    Some((Ok(line(&msg)), (rx, false, guard)))
                }
            }
        })
    }
}

struct Connected {
    hub: Arc<Hub>,
    id: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        with(&self.hub, &self.id, |e| e.connected = e.connected.saturating_sub(1));
        tracing::info!(appliance = %self.id, "bundle stream closed");
    }
}
