//! The pure core Airlock's agent and (later) controller share.
//!
//! ```text
//!  TOML / JSON ─▶ model::Policy ─validate()─▶ Resolved ─compile(grants, now)─▶ DesiredState per appliance
//!                                  │ every Issue, with path,                     (FlowEntry list → eBPF maps,
//!                                  ▼ line/column and hint                          nftables ruleset)
//! ```
//!
//! - [`Flow`]: an exact (source, destination, protocol, destination port)
//!   allowance; [`FlowEntry`] places one in the dataplane with rule id, policy
//!   version and expiry, with lossless conversion to the eBPF map layouts.
//! - [`model`]: the policy as written; [`validate()`]: every problem at once;
//!   [`compile()`]: desired state; [`nft`]: the nftables layer; [`locate`]: paths to lines.
//!
//! What it is not: it does no I/O and reads no clock. Times are handed in
//! ([`compile::Now`]); expiry instants are CLOCK_MONOTONIC nanoseconds.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod compile;
mod flow;
pub mod locate;
pub mod model;
pub mod nft;
pub mod nft_delta;
pub mod portable;
pub mod reconcile;
pub mod validate;

pub use compile::{compile, DesiredState, Now};
pub use flow::{Expiry, Flow, FlowEntry, FlowError, Ingress, MapEntry, Protocol};
pub use model::{Grant, Policy};
pub use nft::{NftError, NftInput, NftRuleset};
pub use portable::{localize, to_portable, PortableEntry};
pub use reconcile::{applied, apply_to, reconcile, reconcile_with, Action};
pub use validate::{validate, Issue, Resolved};

/// An [`Issue`] with its place in the text it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The problem.
    #[serde(flatten)]
    pub issue: Issue,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l}, column {c}: ")?;
        }
        write!(f, "{}", self.issue)
    }
}

/// Parses and validates the TOML form; every problem comes back located.
pub fn check_toml(text: &str) -> Result<(Policy, Resolved), Vec<Diagnostic>> {
    let policy: Policy = toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(s) => {
                let (l, c) = locate::line_col(text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        vec![Diagnostic {
            line,
            column,
            issue: Issue { path: "(syntax)".into(), message: e.message().to_owned(), hint: None },
        }]
    })?;
    let resolved = validate(&policy).map_err(|issues| {
        issues
            .into_iter()
            .map(|issue| {
                let at = locate::locate(text, &issue.path);
                Diagnostic { line: at.map(|a| a.0), column: at.map(|a| a.1), issue }
            })
            .collect::<Vec<_>>()
    })?;
    Ok((policy, resolved))
}

/// Parses and validates the JSON form; problems carry JSON paths (`$.flow[2].to`).
pub fn check_json(text: &str) -> Result<(Policy, Resolved), Vec<Diagnostic>> {
    let policy: Policy = serde_json::from_str(text).map_err(|e| {
        vec![Diagnostic {
            line: Some(e.line()),
            column: Some(e.column()),
            issue: Issue { path: "$".into(), message: e.to_string(), hint: None },
        }]
    })?;
    let resolved = validate(&policy).map_err(|issues| {
        issues
            .into_iter()
            .map(|mut issue| {
                issue.path = format!("$.{}", issue.path);
                Diagnostic { line: None, column: None, issue }
            })
            .collect::<Vec<_>>()
    })?;
    Ok((policy, resolved))
}

#[cfg(test)]
mod policy_tests;
