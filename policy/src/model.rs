//! The policy model: what an administrator writes (TOML) or sends (JSON).
//!
//! Names, not addresses, connect the parts: a flow goes `from` a patient host
//! or group `to` an external service (always through its WireGuard tunnel) or
//! an internal infrastructure server. Fields that need checking beyond their
//! type (addresses, protocols, times, references) stay strings here so that
//! [`crate::validate()`] can report every problem at once with its place.

use serde::{Deserialize, Serialize};

/// A whole policy, one version of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Monotonic version; the controller assigns it on upload.
    pub version: u32,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Sites (a hospital campus).
    #[serde(default, rename = "site")]
    pub sites: Vec<Site>,
    /// Appliances and their ports.
    #[serde(default, rename = "appliance")]
    pub appliances: Vec<ApplianceDef>,
    /// Patient hosts.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostDef>,
    /// Named groups of patient hosts.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupDef>,
    /// External services, reached only through their WireGuard tunnel.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceDef>,
    /// Internal infrastructure servers (DNS, NTP) on the management side.
    #[serde(default, rename = "server")]
    pub servers: Vec<ServerDef>,
    /// Allowed flows.
    #[serde(default, rename = "flow")]
    pub flows: Vec<FlowDef>,
}

/// `[[site]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Unique name.
    pub name: String,
}

/// `[[appliance]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceDef {
    /// Unique name.
    pub name: String,
    /// The site it stands in (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Interface names by zone.
    pub ports: Ports,
}

/// An appliance's ports by zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    /// Facing the patient network.
    pub patient: Vec<String>,
    /// Facing the uplink (WireGuard to external services).
    pub uplink: Vec<String>,
    /// Facing the hospital's management network (controller, infrastructure servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub management: Vec<String>,
}

/// `[[host]]`: a patient host behind an appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDef {
    /// Unique name.
    pub name: String,
    /// The appliance that guards it.
    pub appliance: String,
    /// Its addresses (single hosts, IPv4 and/or IPv6; no prefixes).
    pub addresses: Vec<String>,
}

/// `[[group]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    /// Unique name.
    pub name: String,
    /// Host names.
    pub hosts: Vec<String>,
}

/// `[[service]]`: an external party that receives pushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    /// Unique name.
    pub name: String,
    /// WireGuard endpoint `host:port`.
    pub endpoint: String,
    /// WireGuard public key (base64, 32 bytes).
    pub public_key: String,
    /// Destination addresses inside the tunnel.
    pub addresses: Vec<String>,
    /// What may be sent there.
    pub ports: Vec<PortDef>,
    /// What the data is used for (shown to approvers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_use: String,
}

/// A protocol and port a service accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDef {
    /// tcp, udp or icmp.
    pub proto: String,
    /// The port (none for icmp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `[[server]]`: an internal infrastructure server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerDef {
    /// Unique name.
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<String>,
}

/// `[[flow]]`: an allowed flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDef {
    /// Unique rule id (1 ..= 2^31-1; grants use the upper half).
    pub id: u32,
    /// A name for people.
    pub name: String,
    /// `host:NAME` or `group:NAME`.
    pub from: String,
    /// `service:NAME` or `server:NAME`.
    pub to: String,
    /// tcp, udp or icmp.
    pub proto: String,
    /// Destination port (tcp and udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// An infrastructure rule (to a `server:`) without expiry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub infrastructure: bool,
    /// When a standing flow ends, RFC 3339 UTC (`2026-12-31T23:59:59Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Whether replies come back (default true).
    #[serde(default = "yes", skip_serializing_if = "Clone::clone")]
    pub reply: bool,
}

fn yes() -> bool {
    true
}

/// A time-bounded grant from the push workflow: exact flows from named hosts
/// to a service, open in `[starts, ends)` (Unix seconds, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Grant id; its entries carry rule id `GRANT_RULE_BASE | id`.
    pub id: u32,
    /// Patient host names.
    pub hosts: Vec<String>,
    /// Service name.
    pub service: String,
    /// tcp, udp or icmp.
    pub proto: String,
    /// Destination port.
    pub port: Option<u16>,
    /// Window start, Unix seconds.
    pub starts: u64,
    /// Window end, Unix seconds (exclusive).
    pub ends: u64,
}

/// Rule ids at and above this belong to grants.
pub const GRANT_RULE_BASE: u32 = 0x8000_0000;

/// The rule id of the agent's own management entries (its connection to the
/// controller); no policy flow or grant may produce it.
pub const MANAGEMENT_RULE_ID: u32 = u32::MAX;
