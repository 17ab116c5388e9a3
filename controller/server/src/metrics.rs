//! Prometheus metrics, rendered by hand (a few counters need no crate).

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// The controller's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP responses by class 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// Successful enrollments.
    pub enrollments: AtomicU64,
    /// Refused enrollments (bad, used or expired tokens, bad CSRs).
    pub enrollments_refused: AtomicU64,
    /// Bundles signed and published.
    pub bundles: AtomicU64,
    /// Failed logins.
    pub logins_failed: AtomicU64,
}

impl Metrics {
    /// Counts a response.
    pub fn response(&self, status: u16) {
        let i = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[i].fetch_add(1, Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self, appliances: usize, connected: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE airlock_http_responses_total counter");
        for (i, c) in self.responses.iter().enumerate() {
            let _ = writeln!(
                s,
                "airlock_http_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Relaxed)
            );
        }
        for (name, help, v) in [
            ("airlock_enrollments_total", "counter", self.enrollments.load(Relaxed)),
            (
                "airlock_enrollments_refused_total",
                "counter",
                self.enrollments_refused.load(Relaxed),
            ),
            ("airlock_bundles_published_total", "counter", self.bundles.load(Relaxed)),
            ("airlock_logins_failed_total", "counter", self.logins_failed.load(Relaxed)),
            ("airlock_appliances", "gauge", appliances as u64),
            ("airlock_appliances_connected", "gauge", connected as u64),
        ] {
            let _ = writeln!(s, "# TYPE {name} {help}\n{name} {v}");
        }
        s
    }
}
