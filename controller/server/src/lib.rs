//! The Airlock controller: the hospital's control plane for its appliances.
//!
//! ```text
//!  admin / airlockctl ──HTTPS (TLS 1.2/1.3)──▶ main listener: /api/v1 (sessions), /api/v1/enroll (tokens)
//!                                                   │ policy upload → validate → version (store)
//!                                                   │ → compile per appliance → sign bundle (Ed25519)
//!                                                   │ image releases (verified bundles) and their rollout
//!                                                   ▼
//!  agent ◀──mTLS (client cert from the CA)── agent listener: /agent/v1/stream (NDJSON push), report, renew
//!
//!  store: airlock-store (sled, every value AEAD-encrypted, data keys wrapped by the KMS's KEK)
//!  ca:    ECDSA P-256 root sealed in the store; 30-day server and client certificates
//! ```
//!
//! What it is not: it enforces nothing itself (the agents do), and it never
//! holds an appliance's private keys (they are generated on the box).

pub mod api;
pub mod appliances;
pub mod auth;
pub mod ca;
pub mod config;
pub mod metrics;
pub mod policy;
pub mod releases;
pub mod run;
pub mod server;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod ui;

/// An error and its causes on one line, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
