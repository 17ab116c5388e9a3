//! Agent ↔ controller messages: enrollment, certificate renewal, the bundle
//! stream and health reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bundle::SignedBundle;

/// `POST /api/v1/enroll` on the controller's main HTTPS listener, over TLS
/// pinned to the CA fingerprint the technician provisioned.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    /// The one-time enrollment token (never logged).
    pub token: String,
    /// A PKCS#10 CSR (PEM) for the key pair the agent generated; the private
    /// key never leaves the appliance.
    pub csr_pem: String,
    /// The agent's version, for the inventory.
    pub agent_version: String,
}

/// What an enrolled agent needs to talk to the controller from then on.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// The appliance id (also the certificate's subject).
    pub appliance: String,
    /// The client certificate (PEM).
    pub certificate_pem: String,
    /// The controller CA certificate (PEM); its SHA-256 is the pinned fingerprint.
    pub ca_pem: String,
    /// The controller's bundle-signing public key (base64, 32 bytes Ed25519).
    pub bundle_key: String,
    /// Base URL of the mTLS agent listener, e.g. `https://10.0.0.1:8444`.
    pub agent_url: String,
}

/// `POST /agent/v1/renew` (mTLS): a new certificate for a new key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewRequest {
    /// A CSR (PEM) for a freshly generated key pair.
    pub csr_pem: String,
}

/// The renewed certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewResponse {
    /// The client certificate (PEM).
    pub certificate_pem: String,
}

/// One line of the `GET /agent/v1/stream` response (newline-delimited JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamMessage {
    /// The appliance's current bundle: sent at connect and on every change.
    Bundle(SignedBundle),
    /// Sent when nothing else was for a while; its absence means the stream
    /// is dead and the agent reconnects.
    Heartbeat {
        /// Controller Unix time.
        at: u64,
    },
}

/// `POST /agent/v1/report` (mTLS): the agent's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Report {
    /// The bundle version enforced now (`None`: none from the controller yet).
    pub applied_version: Option<u64>,
    /// The policy version of that bundle.
    pub policy_version: Option<u32>,
    /// The last bundle the agent refused, and why.
    pub refused: Option<Refusal>,
    /// Health.
    pub health: Health,
    /// The appliance's WireGuard public key (base64), generated on the box;
    /// external services are configured with it. `None` until it has one.
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
    /// The appliance image's release and update state (`None`: not an A/B
    /// appliance image, e.g. an agent on a lab host).
    #[serde(default)]
    pub release: Option<crate::release::ReleaseState>,
}

/// A refused bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Refusal {
    /// The version it claimed.
    pub version: u64,
    /// Why (the verifier's or applier's message).
    pub reason: String,
}

/// The appliance's health, as its agent sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// The boundary is attached to every port and forwarding is guarded.
    pub enforcing: bool,
    /// IP forwarding is on.
    pub forwarding: bool,
    /// Problems the agent sees (empty when healthy).
    pub problems: Vec<String>,
    /// Flow entries in the dataplane.
    pub flows: u64,
    /// Packets by drop/pass reason since the dataplane was loaded.
    pub counters: BTreeMap<String, u64>,
    /// WireGuard tunnels (empty until the push issue brings them).
    pub tunnels: Vec<TunnelState>,
    /// The ports the agent guards, with their roles.
    #[serde(default)]
    pub ports: Vec<PortState>,
    /// The newest drop events (at most [`RECENT_DROPS`], newest last).
    #[serde(default)]
    pub recent_drops: Vec<DropRecord>,
}

/// How many drop events a report carries at most.
pub const RECENT_DROPS: usize = 50;

/// One guarded port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortState {
    /// Interface name.
    pub name: String,
    /// `patient`, `uplink` or `management`.
    pub role: String,
    /// How the XDP program is attached (`native`, `generic`), or `detached`.
    pub xdp_mode: String,
    /// The boundary programs are attached to it now.
    pub attached: bool,
}

/// One dropped packet, as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DropRecord {
    /// Unix seconds when the agent read the event.
    pub at: u64,
    /// The dataplane's reason code, e.g. `drop_no_flow`, `drop_expired`.
    pub reason: String,
    /// What caused it: `default deny`, or the rule that no longer allows it
    /// (`rule <id>` for an expired entry).
    pub cause: String,
    /// Ingress port name.
    pub port: String,
    /// Source address, when the frame was IP.
    pub src: Option<String>,
    /// Destination address.
    pub dst: Option<String>,
    /// IP protocol number (0 when not IP).
    pub proto: u8,
    /// Destination port (0 when none).
    pub dport: u16,
}

/// One WireGuard peer's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TunnelState {
    /// The external service.
    pub service: String,
    /// Seconds since the last handshake (`None`: never).
    pub handshake_age_secs: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}
