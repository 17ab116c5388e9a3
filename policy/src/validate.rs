//! Validation: a [`Policy`] in, a [`Resolved`] policy or every problem out.
//!
//! Each [`Issue`] names its place as a path (`flow[2].to`) — which
//! [`crate::locate`] turns into a line and column for the TOML form — says
//! what is wrong and, where it helps, how to fix it. Nothing here panics on
//! any input.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use crate::{
    flow::{check_host, Protocol},
    model::{Policy, GRANT_RULE_BASE},
};

/// Largest number of exact entries one flow may expand to (hosts × addresses).
/// A rule wider than this is not an exact allowance any more.
pub const MAX_ENTRIES_PER_FLOW: usize = 256;

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    /// Where, as a path into the document (`flow[2].to`).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// An appliance after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedAppliance {
    /// Patient port names.
    pub patient: Vec<String>,
    /// Uplink port names.
    pub uplink: Vec<String>,
    /// Management port names.
    pub management: Vec<String>,
}

/// A flow after validation: concrete endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFlow {
    /// Rule id.
    pub id: u32,
    /// Source hosts (names, sorted).
    pub hosts: Vec<String>,
    /// Destination addresses.
    pub dst: Vec<IpAddr>,
    /// Protocol.
    pub protocol: Protocol,
    /// Port (None for ICMP).
    pub port: Option<u16>,
    /// Infrastructure rule (no expiry).
    pub infrastructure: bool,
    /// Expiry, Unix seconds (None only for infrastructure).
    pub expires: Option<u64>,
    /// Replies allowed.
    pub reply: bool,
}

/// An external service after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedService {
    /// Destination addresses inside the tunnel.
    pub addresses: Vec<IpAddr>,
    /// Accepted protocol/port pairs.
    pub accepted: BTreeSet<(Protocol, Option<u16>)>,
}

/// A validated policy, ready for the compiler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Version.
    pub version: u32,
    /// Appliances by name.
    pub appliances: BTreeMap<String, ResolvedAppliance>,
    /// Host name → (appliance, addresses).
    pub hosts: BTreeMap<String, (String, Vec<IpAddr>)>,
    /// Services by name.
    pub services: BTreeMap<String, ResolvedService>,
    /// Flows in document order.
    pub flows: Vec<ResolvedFlow>,
}

struct Checker {
    issues: Vec<Issue>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue { path: path.into(), message: message.into(), hint: None });
    }
    fn hint(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
            hint: Some(hint.into()),
        });
    }

    fn name(&mut self, path: String, name: &str, seen: &mut BTreeSet<String>, kind: &str) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !ok {
            self.hint(
                path,
                format!("invalid {kind} name {name:?}"),
                "1-64 characters: letters, digits, '-', '_', '.'",
            );
        } else if !seen.insert(name.to_owned()) {
            self.err(path, format!("{kind} {name:?} is defined twice"));
        }
    }

    fn addresses(&mut self, path: &str, list: &[String]) -> Vec<IpAddr> {
        if list.is_empty() {
            self.err(path, "needs at least one address");
        }
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            if a.contains('/') {
                self.hint(
                    p,
                    format!("{a:?} is a prefix"),
                    "list single host addresses: a boundary rule never opens a whole range",
                );
                continue;
            }
            match a.parse::<IpAddr>() {
                Err(_) => self.hint(
                    p,
                    format!("{a:?} is not an IP address"),
                    "e.g. 10.77.0.11 or fd00:a1:77::11",
                ),
                Ok(ip) => match check_host(ip) {
                    Ok(()) => out.push(ip),
                    Err(e) => self.err(p, e.to_string()),
                },
            }
        }
        out
    }
}

fn known<'a>(kind: &str, names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        format!("no {kind} is defined")
    } else {
        format!("known {kind}s: {}", v.join(", "))
    }
}

fn valid_port_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 15 && !n.contains(['/', ':']) && !n.chars().any(char::is_whitespace)
}

fn parse_proto(
    c: &mut Checker,
    path: String,
    proto: &str,
    port: Option<u16>,
) -> Option<(Protocol, Option<u16>)> {
    let p = match proto.parse::<Protocol>() {
        Ok(p) => p,
        Err(e) => {
            c.err(path, e.to_string());
            return None;
        }
    };
    match (p, port) {
        (Protocol::Icmp, None) => Some((p, None)),
        (Protocol::Icmp, Some(_)) => {
            c.err(path, "icmp takes no port");
            None
        }
        (_, None | Some(0)) => {
            c.hint(path, format!("{p} needs a port"), "add port = <1-65535>");
            None
        }
        (_, Some(n)) => Some((p, Some(n))),
    }
}

/// Base64 of exactly 32 bytes (a WireGuard key).
fn is_wg_key(k: &str) -> bool {
    k.len() == 44
        && k.ends_with('=')
        && k[..43].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// `YYYY-MM-DDTHH:MM:SSZ` → Unix seconds.
pub fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, mo, d, h, mi, se) =
        (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || d == 0
        || h > 23
        || mi > 59
        || se > 59
    {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if d > mdays[(mo - 1) as usize] {
        return None;
    }
    // Days from civil (H. Hinnant), for years >= 1970.
    let (y2, m2) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y2 / 400;
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Validates a policy; every problem is reported.
pub fn validate(p: &Policy) -> Result<Resolved, Vec<Issue>> {
    let mut c = Checker { issues: Vec::new() };
    if p.version == 0 {
        c.err("version", "must be at least 1");
    }
    let mut sites = BTreeSet::new();
    for (i, s) in p.sites.iter().enumerate() {
        c.name(format!("site[{i}].name"), &s.name, &mut sites, "site");
    }

    let mut names = BTreeSet::new();
    let mut appliances = BTreeMap::new();
    if p.appliances.is_empty() {
        c.hint("appliance", "no appliance is defined", "add an [[appliance]] with its ports");
    }
    for (i, a) in p.appliances.iter().enumerate() {
        c.name(format!("appliance[{i}].name"), &a.name, &mut names, "appliance");
        if let Some(s) = &a.site {
            if !sites.contains(s) {
                c.hint(
                    format!("appliance[{i}].site"),
                    format!("unknown site {s:?}"),
                    known("site", sites.iter()),
                );
            }
        }
        let mut ports = BTreeSet::new();
        for (zone, list) in [
            ("patient", &a.ports.patient),
            ("uplink", &a.ports.uplink),
            ("management", &a.ports.management),
        ] {
            if list.is_empty() && zone != "management" {
                c.err(
                    format!("appliance[{i}].ports.{zone}"),
                    format!("needs at least one {zone} port"),
                );
            }
            for (j, n) in list.iter().enumerate() {
                let path = format!("appliance[{i}].ports.{zone}[{j}]");
                if !valid_port_name(n) {
                    c.err(path, format!("{n:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"));
                } else if !ports.insert(n.clone()) {
                    c.err(path, format!("port {n:?} is listed twice on this appliance"));
                }
            }
        }
        appliances.insert(
            a.name.clone(),
            ResolvedAppliance {
                patient: a.ports.patient.clone(),
                uplink: a.ports.uplink.clone(),
                management: a.ports.management.clone(),
            },
        );
    }

    let mut host_names = BTreeSet::new();
    let mut hosts = BTreeMap::new();
    let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (i, h) in p.hosts.iter().enumerate() {
        c.name(format!("host[{i}].name"), &h.name, &mut host_names, "host");
        if !appliances.contains_key(&h.appliance) {
            c.hint(
                format!("host[{i}].appliance"),
                format!("unknown appliance {:?}", h.appliance),
                known("appliance", appliances.keys()),
            );
        }
        let addrs = c.addresses(&format!("host[{i}].addresses"), &h.addresses);
        for (j, a) in addrs.iter().enumerate() {
            if let Some(other) = owner.insert(*a, h.name.clone()) {
                if other != h.name {
                    c.err(
                        format!("host[{i}].addresses[{j}]"),
                        format!("{a} is also host {other:?}'s address"),
                    );
                }
            }
        }
        hosts.insert(h.name.clone(), (h.appliance.clone(), addrs));
    }

    let mut group_names = BTreeSet::new();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, g) in p.groups.iter().enumerate() {
        c.name(format!("group[{i}].name"), &g.name, &mut group_names, "group");
        if g.hosts.is_empty() {
            c.err(format!("group[{i}].hosts"), "a group needs at least one host");
        }
        for (j, h) in g.hosts.iter().enumerate() {
            if !hosts.contains_key(h) {
                c.hint(
                    format!("group[{i}].hosts[{j}]"),
                    format!("unknown host {h:?}"),
                    known("host", hosts.keys()),
                );
            }
        }
        let mut members = g.hosts.clone();
        members.sort();
        members.dedup();
        groups.insert(g.name.clone(), members);
    }

    let mut svc_names = BTreeSet::new();
    let mut services = BTreeMap::new();
    for (i, s) in p.services.iter().enumerate() {
        c.name(format!("service[{i}].name"), &s.name, &mut svc_names, "service");
        if s.endpoint.parse::<SocketAddr>().is_err() {
            c.hint(format!("service[{i}].endpoint"), format!("{:?} is not an address:port", s.endpoint), "the service's WireGuard endpoint, e.g. 203.0.113.10:51820: every external flow goes through its tunnel");
        }
        if !is_wg_key(&s.public_key) {
            c.hint(
                format!("service[{i}].public_key"),
                "not a WireGuard public key",
                "44 characters of base64 (wg pubkey)",
            );
        }
        let addrs = c.addresses(&format!("service[{i}].addresses"), &s.addresses);
        let mut accepted = BTreeSet::new();
        if s.ports.is_empty() {
            c.err(format!("service[{i}].ports"), "needs at least one accepted protocol/port");
        }
        for (j, pd) in s.ports.iter().enumerate() {
            if let Some(pp) =
                parse_proto(&mut c, format!("service[{i}].ports[{j}]"), &pd.proto, pd.port)
            {
                accepted.insert(pp);
            }
        }
        services.insert(s.name.clone(), ResolvedService { addresses: addrs, accepted });
    }

    let mut srv_names = BTreeSet::new();
    let mut servers = BTreeMap::new();
    for (i, s) in p.servers.iter().enumerate() {
        c.name(format!("server[{i}].name"), &s.name, &mut srv_names, "server");
        let addrs = c.addresses(&format!("server[{i}].addresses"), &s.addresses);
        servers.insert(s.name.clone(), addrs);
    }

    let mut ids = BTreeSet::new();
    let mut flows = Vec::new();
    let mut keys: BTreeMap<(IpAddr, IpAddr, Protocol, Option<u16>), usize> = BTreeMap::new();
    for (i, f) in p.flows.iter().enumerate() {
        let at = |field: &str| format!("flow[{i}].{field}");
        if f.id == 0 || f.id >= GRANT_RULE_BASE {
            c.hint(at("id"), format!("rule id {} is out of range", f.id), "use 1 ..= 2147483647");
        } else if !ids.insert(f.id) {
            c.err(at("id"), format!("rule id {} is used twice", f.id));
        }
        let src_hosts: Vec<String> = match f.from.split_once(':') {
            Some(("host", h)) if hosts.contains_key(h) => vec![h.to_owned()],
            Some(("host", h)) => {
                c.hint(at("from"), format!("unknown host {h:?}"), known("host", hosts.keys()));
                vec![]
            }
            Some(("group", g)) => match groups.get(g) {
                Some(m) => m.iter().filter(|h| hosts.contains_key(*h)).cloned().collect(),
                None => {
                    c.hint(
                        at("from"),
                        format!("unknown group {g:?}"),
                        known("group", groups.keys()),
                    );
                    vec![]
                }
            },
            _ => {
                c.hint(
                    at("from"),
                    format!("{:?} names no patient host or group", f.from),
                    "write host:NAME or group:NAME",
                );
                vec![]
            }
        };
        let pp = parse_proto(&mut c, at("proto"), &f.proto, f.port);
        let (dst, to_service) = match f.to.split_once(':') {
            Some(("service", s)) => match services.get(s) {
                Some(ResolvedService { addresses: addrs, accepted }) => {
                    if let Some(pp) = pp {
                        if !accepted.contains(&pp) {
                            c.hint(
                                at("port"),
                                format!(
                                    "service {s:?} does not accept {}{}",
                                    pp.0,
                                    pp.1.map(|p| format!("/{p}")).unwrap_or_default()
                                ),
                                "add it to the service's ports, or fix the flow",
                            );
                        }
                    }
                    (addrs.clone(), true)
                }
                None => {
                    c.hint(
                        at("to"),
                        format!("unknown service {s:?}"),
                        known("service", services.keys()),
                    );
                    (vec![], true)
                }
            },
            Some(("server", s)) => match servers.get(s) {
                Some(addrs) => (addrs.clone(), false),
                None => {
                    c.hint(
                        at("to"),
                        format!("unknown server {s:?}"),
                        known("server", servers.keys()),
                    );
                    (vec![], false)
                }
            },
            _ => {
                c.hint(at("to"), format!("{:?} is not a service or server", f.to), "flows leave the patient network only to service:NAME (through its WireGuard tunnel) or server:NAME; a bare address is not allowed");
                (vec![], true)
            }
        };
        let expires = match (&f.expires, f.infrastructure) {
            (Some(_), true) => {
                c.err(at("expires"), "infrastructure rules have no expiry");
                None
            }
            (None, true) => {
                if to_service {
                    c.hint(at("infrastructure"), "an external service flow cannot be infrastructure", "infrastructure rules go to internal servers (server:NAME); external pushes are granted by approval");
                }
                None
            }
            (None, false) => {
                c.hint(at("expires"), "a standing flow needs an expiry", "add expires = \"YYYY-MM-DDTHH:MM:SSZ\", or mark an internal DNS/NTP rule infrastructure = true");
                None
            }
            (Some(t), false) => {
                let v = parse_utc(t);
                if v.is_none() {
                    c.hint(
                        at("expires"),
                        format!("{t:?} is not a UTC time"),
                        "RFC 3339 in UTC, e.g. 2026-12-31T23:59:59Z",
                    );
                }
                v
            }
        };
        let Some((protocol, port)) = pp else { continue };
        // Expansion: every source address to every destination address of the same family.
        let mut n = 0;
        let mut families = false;
        for h in &src_hosts {
            for s in hosts.get(h).map(|(_, a)| a.as_slice()).unwrap_or_default() {
                for d in &dst {
                    if s.is_ipv4() != d.is_ipv4() {
                        continue;
                    }
                    families = true;
                    n += 1;
                    if let Some(first) = keys.insert((*s, *d, protocol, port), i) {
                        if first != i {
                            c.hint(
                                at("to"),
                                format!(
                                    "{s} -> {d} {protocol} is already allowed by flow[{first}]"
                                ),
                                "one rule per exact flow: remove or merge the duplicate",
                            );
                        }
                    }
                }
            }
        }
        if !src_hosts.is_empty() && !dst.is_empty() && !families {
            c.hint(
                at("to"),
                "source and destination share no address family",
                "give both ends IPv4 or both IPv6 addresses",
            );
        }
        if n > MAX_ENTRIES_PER_FLOW {
            c.hint(
                at("from"),
                format!("expands to {n} exact flows, more than {MAX_ENTRIES_PER_FLOW}"),
                "too broad for a patient boundary: name fewer hosts or addresses",
            );
        }
        flows.push(ResolvedFlow {
            id: f.id,
            hosts: src_hosts,
            dst,
            protocol,
            port,
            infrastructure: f.infrastructure,
            expires,
            reply: f.reply,
        });
    }

    if c.issues.is_empty() {
        Ok(Resolved { version: p.version, appliances, hosts, services, flows })
    } else {
        Err(c.issues)
    }
}
