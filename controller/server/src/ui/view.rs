//! What the pages say about an appliance: its state and its alarms, derived
//! from its record, its last report, the image rollout's target and the
//! time (a pure function).

use airlock_proto::{admin::ApplianceState, agent::Report};

use crate::appliances::ApplianceRecord;

/// No report for this long is an alarm (six missed reports at the agent's
/// default 10 s interval).
pub const STALE_AFTER: u64 = 60;
/// A client certificate closer than this to its expiry is an alarm (the
/// agent renews at a third of its 30-day lifetime left).
pub const CERT_WARN: u64 = 7 * 86_400;
/// A tunnel without a handshake for this long is down (WireGuard
/// re-handshakes every 2 minutes while traffic flows).
pub const TUNNEL_STALE: u64 = 180;

/// How bad an alarm is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The boundary may not be what the policy says.
    Critical,
    /// Needs attention.
    Warning,
}

/// One alarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alarm {
    /// How bad.
    pub severity: Severity,
    /// For people.
    pub text: String,
}

/// An appliance's state for the pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Id.
    pub id: String,
    /// Lifecycle.
    pub state: ApplianceState,
    /// Enforcing per its last report (`None`: no report).
    pub enforcing: Option<bool>,
    /// Newest bundle version for it.
    pub desired: Option<u64>,
    /// Bundle version it applied.
    pub applied: Option<u64>,
    /// Policy version of the applied bundle.
    pub policy_version: Option<u32>,
    /// Last report.
    pub last_seen: Option<u64>,
    /// On the bundle stream now.
    pub connected: bool,
    /// Tunnels with a recent handshake / all tunnels.
    pub tunnels: (usize, usize),
    /// Alarms, critical first.
    pub alarms: Vec<Alarm>,
}

impl Status {
    /// Applied what it should.
    pub fn converged(&self) -> bool {
        self.desired.is_some() && self.applied >= self.desired
    }
}

/// Derives the status. `rollout_target`: the image release the rollout
/// offers this appliance, if any.
pub fn status(
    rec: &ApplianceRecord,
    report: Option<(&Report, u64)>,
    connected: bool,
    desired: Option<u64>,
    rollout_target: Option<u64>,
    now: u64,
) -> Status {
    let mut alarms = Vec::new();
    let mut alarm = |severity, text: String| alarms.push(Alarm { severity, text });
    let enrolled = rec.state == ApplianceState::Enrolled;
    if enrolled {
        match report {
            None => {
                if now.saturating_sub(rec.enrolled_at.unwrap_or(0)) > STALE_AFTER {
                    alarm(Severity::Critical, "has never reported to this controller".into());
                }
            }
            Some((_, at)) if now.saturating_sub(at) > STALE_AFTER => alarm(
                Severity::Critical,
                format!("no report for {}", super::layout::span(now.saturating_sub(at))),
            ),
            Some(_) => {}
        }
        if !connected {
            alarm(Severity::Warning, "not connected to the bundle stream".into());
        }
        if let Some(exp) = rec.cert_expires_at.filter(|e| e.saturating_sub(now) < CERT_WARN) {
            let text = if exp <= now {
                "client certificate expired".to_owned()
            } else {
                format!("client certificate expires in {}", super::layout::span(exp - now))
            };
            alarm(Severity::Warning, text);
        }
    }
    let mut tunnels = (0, 0);
    if let Some((r, _)) = report.filter(|_| enrolled) {
        if !r.health.enforcing {
            let why = if r.health.problems.is_empty() {
                "no reason given".to_owned()
            } else {
                r.health.problems.join("; ")
            };
            alarm(Severity::Critical, format!("not enforcing: {why}"));
        }
        if let Some(f) = &r.refused {
            alarm(Severity::Critical, format!("refused bundle {}: {}", f.version, f.reason));
        }
        if let (Some(d), a) = (desired, r.applied_version) {
            if a.is_none_or(|a| a < d) {
                alarm(
                    Severity::Warning,
                    format!(
                        "policy not yet applied: bundle {} of {d}",
                        a.map_or("none".into(), |a| a.to_string())
                    ),
                );
            }
        }
        if let Some(img) = &r.release {
            if let Some(t) = rollout_target.filter(|t| img.failed_trials.contains(t)) {
                alarm(
                    Severity::Warning,
                    format!(
                        "image release {t} failed its trial boot here; it is not offered again"
                    ),
                );
            }
            if let Some(f) = &img.last_failure {
                alarm(
                    Severity::Warning,
                    format!("image update to release {} failed: {}", f.release, f.reason),
                );
            }
        }
        tunnels.1 = r.health.tunnels.len();
        for t in &r.health.tunnels {
            match t.handshake_age_secs {
                Some(age) if age <= TUNNEL_STALE => tunnels.0 += 1,
                age => alarm(
                    Severity::Warning,
                    format!(
                        "tunnel to {} is down (last handshake {})",
                        t.service,
                        age.map_or("never".into(), |a| format!("{} ago", super::layout::span(a)))
                    ),
                ),
            }
        }
    }
    alarms.sort_by_key(|a| a.severity);
    Status {
        id: rec.id.clone(),
        state: rec.state,
        enforcing: report.map(|(r, _)| r.health.enforcing),
        desired,
        applied: report.and_then(|(r, _)| r.applied_version),
        policy_version: report.and_then(|(r, _)| r.policy_version),
        last_seen: report.map(|(_, t)| t),
        connected,
        tunnels,
        alarms,
    }
}

#[cfg(test)]
mod tests {
    use airlock_proto::agent::{Health, Refusal, TunnelState};

    use super::*;

    fn rec(state: ApplianceState) -> ApplianceRecord {
        ApplianceRecord {
            id: "a1".into(),
            state,
            created_at: 0,
            enrolled_at: Some(0),
            serials: vec![],
            cert_expires_at: Some(30 * 86_400),
        }
    }

    fn healthy(applied: u64) -> Report {
        Report {
            applied_version: Some(applied),
            policy_version: Some(3),
            health: Health { enforcing: true, ..Health::default() },
            ..Report::default()
        }
    }

    #[test]
    fn a_healthy_converged_appliance_has_no_alarm() {
        let r = healthy(7);
        let s = status(&rec(ApplianceState::Enrolled), Some((&r, 1000)), true, Some(7), None, 1010);
        assert!(s.alarms.is_empty(), "{:?}", s.alarms);
        assert!(s.converged());
        assert_eq!(s.enforcing, Some(true));
    }

    #[test]
    fn silence_refusal_lag_and_problems_are_alarms_critical_first() {
        let mut r = healthy(5);
        r.health.enforcing = false;
        r.health.problems = vec!["port patient0 has no XDP program".into()];
        r.refused = Some(Refusal { version: 7, reason: "bad signature".into() });
        r.health.tunnels = vec![TunnelState {
            service: "lab".into(),
            handshake_age_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }];
        let s =
            status(&rec(ApplianceState::Enrolled), Some((&r, 1000)), false, Some(7), None, 1200);
        let texts: Vec<_> = s.alarms.iter().map(|a| a.text.as_str()).collect();
        assert_eq!(s.alarms[0].severity, Severity::Critical);
        assert!(texts.contains(&"no report for 3 min"), "{texts:?}");
        assert!(texts.iter().any(|t| t.contains("not enforcing: port patient0")));
        assert!(texts.iter().any(|t| t.contains("refused bundle 7: bad signature")));
        assert!(texts.iter().any(|t| t.contains("bundle 5 of 7")));
        assert!(texts.iter().any(|t| t.contains("tunnel to lab is down (last handshake never)")));
        assert!(texts.contains(&"not connected to the bundle stream"));
        assert!(!s.converged());
    }

    #[test]
    fn failed_image_updates_warn() {
        use airlock_proto::release::{ReleaseState, UpdateFailure};
        let mut r = healthy(7);
        r.release = Some(ReleaseState {
            release: 6,
            slot: "a".into(),
            failed_trials: vec![8],
            ..ReleaseState::default()
        });
        let on = |r: &Report, target| {
            status(&rec(ApplianceState::Enrolled), Some((r, 1000)), true, Some(7), target, 1010)
        };
        assert!(on(&r, Some(9)).alarms.is_empty(), "an old failed trial of another release");
        let s = on(&r, Some(8));
        assert_eq!(s.alarms.len(), 1);
        assert_eq!(s.alarms[0].severity, Severity::Warning);
        assert!(s.alarms[0].text.contains("image release 8 failed its trial boot"), "{s:?}");
        if let Some(i) = r.release.as_mut() {
            i.last_failure =
                Some(UpdateFailure { release: 9, reason: "no space left".into(), at: 900 });
        }
        let s = on(&r, Some(9));
        assert_eq!(s.alarms.len(), 1);
        assert_eq!(s.alarms[0].text, "image update to release 9 failed: no space left");
    }

    #[test]
    fn pending_and_revoked_records_raise_nothing_and_certificates_warn() {
        let s = status(&rec(ApplianceState::Pending), None, false, None, None, 10_000);
        assert!(s.alarms.is_empty());
        let s = status(&rec(ApplianceState::Revoked), None, false, None, None, 10_000);
        assert!(s.alarms.is_empty());
        let r = healthy(1);
        let s = status(
            &rec(ApplianceState::Enrolled),
            Some((&r, 25 * 86_400)),
            true,
            Some(1),
            None,
            25 * 86_400,
        );
        assert_eq!(s.alarms.len(), 1);
        assert_eq!(s.alarms[0].text, "client certificate expires in 5 d");
        let s = status(&rec(ApplianceState::Enrolled), None, true, Some(1), None, 30);
        assert!(s.alarms.is_empty(), "just enrolled: not yet late");
    }
}
