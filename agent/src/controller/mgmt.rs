//! The agent's own connection to the controller through the boundary.
//!
//! XDP sees every packet entering a port, including the controller's answers
//! to the appliance itself: without an entry they are dropped like anything
//! else (with no state at all, enrollment could never complete). For each
//! controller endpoint this adds one infrastructure entry
//! `appliance address -> controller:port (tcp)` whose replies may enter on the
//! side the controller is on: on a `management` port (the usual place) a
//! management entry, which the kernel passes only as an answer addressed to
//! the appliance itself on that port and never on a patient or uplink port.
//! Only the eBPF layer needs it (the nftables table has forward hooks only).
//! The replies are bounded like any entry's: not a bare SYN, to ports >=
//! `reply_min_port`, only from that address and port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _, UdpSocket};

use airlock_policy::{Expiry, Flow, FlowEntry, Ingress, Protocol};
use tracing::{debug, warn};

use super::{client::Endpoint, identity::IdentityPaths};
use crate::config::{AgentConfig, Role};

/// The rule id recorded on management entries (policy rule ids are small).
pub const MGMT_RULE_ID: u32 = airlock_policy::model::MANAGEMENT_RULE_ID;

/// The controller endpoints this agent talks to: the configured main URL and,
/// once enrolled, the recorded main and agent URLs.
pub fn endpoints(cfg: &AgentConfig) -> Vec<Endpoint> {
    let mut urls: Vec<String> = cfg.controller.iter().map(|c| c.url.clone()).collect();
    let record = IdentityPaths::new(&cfg.appliance.state_dir).record();
    if let Ok(text) = std::fs::read_to_string(record) {
        if let Ok(r) = toml::from_str::<super::identity::ControllerRecord>(&text) {
            urls.push(r.url);
            urls.push(r.agent_url);
        }
    }
    let mut out: Vec<Endpoint> = urls.iter().filter_map(|u| Endpoint::parse(u).ok()).collect();
    out.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    out.dedup();
    out
}

/// The side of the boundary that the route to `dst` leaves through, and the
/// source address used, or `None` when it does not cross a configured port.
fn route(cfg: &AgentConfig, dst: SocketAddr) -> Option<(IpAddr, Role)> {
    let any: IpAddr =
        if dst.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    // connect() on UDP picks the route and source address; nothing is sent.
    let sock = UdpSocket::bind((any, 0)).ok()?;
    sock.connect(dst).ok()?;
    let src = sock.local_addr().ok()?.ip();
    let ports: Vec<(String, u32, Role)> = cfg
        .ports
        .iter()
        .filter_map(|p| crate::netif::ifindex(&p.name).ok().map(|i| (p.name.clone(), i, p.role)))
        .collect();
    let named: Vec<(String, u32)> = ports.iter().map(|(n, i, _)| (n.clone(), *i)).collect();
    let keys = crate::netif::local_addrs(&named).ok()?;
    let want = match src {
        IpAddr::V4(a) => airlock_ebpf_common::layout::LocalAddrKey::v4(0, a.octets()),
        IpAddr::V6(a) => airlock_ebpf_common::layout::LocalAddrKey::v6(0, a.octets()),
    };
    let k = keys.iter().find(|k| k.0.family == want.family && k.0.addr == want.addr)?;
    let role = ports.iter().find(|(_, i, _)| *i == k.0.ifindex)?.2;
    Some((src, role))
}

/// The entry that lets `ep`'s answers in, when the route crosses a port.
pub fn entries_for(cfg: &AgentConfig, ep: &Endpoint) -> Vec<FlowEntry> {
    let addrs: Vec<SocketAddr> = match ep.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, ep.port)],
        Err(_) => match (ep.host.as_str(), ep.port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                warn!(host = %ep.host, error = %e, "cannot resolve the controller");
                Vec::new()
            }
        },
    };
    let mut out = Vec::new();
    for dst in addrs {
        let Some((src, role)) = route(cfg, dst) else {
            debug!(%dst, "the controller is not reached through a boundary port");
            continue;
        };
        // On a management port the entry is a management entry: its answers
        // enter there and nowhere else (the eBPF layer passes them only to the
        // appliance's own address on that port). Through a boundary port the
        // forward direction leaves towards the controller's side, so it
        // "enters" on the other one; the controller's answers enter on its side.
        let ingress = match role {
            Role::Management => Ingress::Management,
            Role::Uplink => Ingress::Patient,
            Role::Patient => Ingress::Uplink,
        };
        match Flow::new(src, dst.ip(), Protocol::Tcp, Some(dst.port())) {
            Ok(flow) => out.push(FlowEntry {
                flow,
                rule_id: MGMT_RULE_ID,
                policy_version: 0,
                ingress,
                allow_reply: true,
                expiry: Expiry::Infrastructure,
            }),
            Err(e) => warn!(%dst, error = %e, "no management entry for the controller"),
        }
    }
    out
}

/// The management entries for every endpoint.
pub fn entries(cfg: &AgentConfig) -> Vec<FlowEntry> {
    endpoints(cfg).iter().flat_map(|ep| entries_for(cfg, ep)).collect()
}

/// Writes the management entries for `extra` and the known endpoints into
/// the maps, adding only (used before any policy is applied).
pub fn ensure(
    maps: &mut crate::maps::Maps,
    cfg: &AgentConfig,
    extra: &[Endpoint],
) -> Result<usize, crate::maps::MapsError> {
    let mut all = entries(cfg);
    all.extend(extra.iter().flat_map(|ep| entries_for(cfg, ep)));
    for e in &all {
        maps.upsert(e)?;
    }
    Ok(all.len())
}
