//! Exact flows and their dataplane entries.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use airlock_ebpf_common::layout::{
    proto, FlowKeyV4, FlowKeyV6, FlowValue, PortRole, FLOW_ALLOW_REPLY, FLOW_INFRASTRUCTURE,
};
use serde::{Deserialize, Serialize};

/// Transport protocols a flow may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (needs a destination port).
    Tcp,
    /// UDP (needs a destination port).
    Udp,
    /// ICMP echo for IPv4, ICMPv6 echo for IPv6 (no port).
    Icmp,
}

impl Protocol {
    /// The IP protocol number for an address family.
    pub const fn number(self, v6: bool) -> u8 {
        match (self, v6) {
            (Protocol::Tcp, _) => proto::TCP,
            (Protocol::Udp, _) => proto::UDP,
            (Protocol::Icmp, false) => proto::ICMP,
            (Protocol::Icmp, true) => proto::ICMPV6,
        }
    }

    /// Decodes a protocol number found in a map key.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Protocol::Tcp),
            proto::UDP => Some(Protocol::Udp),
            proto::ICMP | proto::ICMPV6 => Some(Protocol::Icmp),
            _ => None,
        }
    }

    /// Lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self, FlowError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" | "icmpv6" => Ok(Protocol::Icmp),
            _ => Err(FlowError::UnknownProtocol(s.to_owned())),
        }
    }
}

/// Why a flow or entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// Not tcp, udp or icmp.
    #[error("unknown protocol {0:?}: use tcp, udp or icmp")]
    UnknownProtocol(String),
    /// Source and destination differ in family.
    #[error("source {src} and destination {dst} are not the same address family")]
    FamilyMismatch {
        /// Source.
        src: IpAddr,
        /// Destination.
        dst: IpAddr,
    },
    /// TCP/UDP without a port, or port 0.
    #[error("{0} flows need a destination port between 1 and 65535")]
    PortRequired(Protocol),
    /// ICMP with a port.
    #[error("icmp flows take no port (they allow echo request and its reply)")]
    PortNotAllowed,
    /// An address that cannot name one host.
    #[error("{addr} is not a single host address ({why}); flows are exact host-to-host")]
    NotAHost {
        /// The address.
        addr: IpAddr,
        /// What it is instead.
        why: &'static str,
    },
    /// The same address on both ends.
    #[error("source and destination are both {0}")]
    SameEndpoints(IpAddr),
    /// No expiry on a rule that is not infrastructure.
    #[error("only infrastructure rules may have no expiry; give the flow an expiry")]
    MissingExpiry,
    /// An expiry of 0 (reserved for "none").
    #[error("an expiry must be a positive CLOCK_MONOTONIC instant")]
    ZeroExpiry,
    /// A map entry the agent did not write.
    #[error("map entry is not a valid flow entry: {0}")]
    BadMapEntry(&'static str),
}

/// An exact allowance: `src` may send `protocol` to `dst`:`port`.
///
/// Deserializing validates exactly like [`Flow::new`]: a flow read from the
/// wire or a store is never more open than one built in code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "FlowWire")]
pub struct Flow {
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
}

/// The serialized shape of a [`Flow`], before validation.
#[derive(Deserialize)]
struct FlowWire {
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
}

impl TryFrom<FlowWire> for Flow {
    type Error = FlowError;
    fn try_from(w: FlowWire) -> Result<Self, FlowError> {
        let port = match (w.protocol, w.port) {
            (Protocol::Icmp, 0) => None,
            (_, p) => Some(p),
        };
        Flow::new(w.src, w.dst, w.protocol, port)
    }
}

/// Refuses an address that cannot name one host (unspecified, broadcast,
/// multicast, loopback, IPv4-mapped IPv6): flows and policy hosts are exact.
pub fn check_host(addr: IpAddr) -> Result<(), FlowError> {
    let why = match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V4(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("IPv4-mapped; use the IPv4 form"),
        _ => None,
    };
    match why {
        Some(why) => Err(FlowError::NotAHost { addr, why }),
        None => Ok(()),
    }
}

impl Flow {
    /// Validates and builds a flow. `port` is required for TCP/UDP and
    /// refused for ICMP.
    pub fn new(
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: Option<u16>,
    ) -> Result<Self, FlowError> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(FlowError::FamilyMismatch { src, dst });
        }
        check_host(src)?;
        check_host(dst)?;
        if src == dst {
            return Err(FlowError::SameEndpoints(src));
        }
        let port = match (protocol, port) {
            (Protocol::Icmp, None) => 0,
            (Protocol::Icmp, Some(_)) => return Err(FlowError::PortNotAllowed),
            (p, None | Some(0)) => return Err(FlowError::PortRequired(p)),
            (_, Some(p)) => p,
        };
        Ok(Self { src, dst, protocol, port })
    }

    /// Source address.
    pub const fn src(&self) -> IpAddr {
        self.src
    }
    /// Destination address.
    pub const fn dst(&self) -> IpAddr {
        self.dst
    }
    /// Protocol.
    pub const fn protocol(&self) -> Protocol {
        self.protocol
    }
    /// Destination port (None for ICMP).
    pub const fn port(&self) -> Option<u16> {
        match self.protocol {
            Protocol::Icmp => None,
            _ => Some(self.port),
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port(), self.dst) {
            (Some(p), IpAddr::V6(d)) => write!(f, "{} -> [{d}]:{p}/{}", self.src, self.protocol),
            (Some(p), IpAddr::V4(d)) => write!(f, "{} -> {d}:{p}/{}", self.src, self.protocol),
            (None, d) => write!(f, "{} -> {d}/{}", self.src, self.protocol),
        }
    }
}

/// When an entry stops passing packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// At this CLOCK_MONOTONIC instant (nanoseconds), checked by the kernel.
    At(u64),
    /// Never: only for infrastructure rules.
    Infrastructure,
}

/// A flow placed in the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    /// The allowance.
    pub flow: Flow,
    /// The policy rule behind it.
    pub rule_id: u32,
    /// The policy version that produced it.
    pub policy_version: u32,
    /// The side the forward direction enters on.
    pub ingress: Ingress,
    /// Whether replies come back (stateless; see ARCHITECTURE.md).
    pub allow_reply: bool,
    /// When it stops.
    pub expiry: Expiry,
}

/// Serde-friendly [`PortRole`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ingress {
    /// Forward traffic enters from the patient network.
    Patient,
    /// Forward traffic enters from the uplink.
    Uplink,
    /// The agent's own entries to its controller: the forward direction is
    /// the appliance's own output, the replies enter on a management port.
    /// Never in a policy (the agent drops such entries from one) and never
    /// in the nftables table.
    Management,
}

impl From<Ingress> for PortRole {
    fn from(i: Ingress) -> Self {
        match i {
            Ingress::Patient => PortRole::Patient,
            Ingress::Uplink => PortRole::Uplink,
            Ingress::Management => PortRole::Management,
        }
    }
}

impl From<PortRole> for Ingress {
    fn from(r: PortRole) -> Self {
        match r {
            PortRole::Patient => Ingress::Patient,
            PortRole::Uplink => Ingress::Uplink,
            PortRole::Management => Ingress::Management,
        }
    }
}

/// A flow entry in map form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapEntry {
    /// For `FLOWS_V4`.
    V4(FlowKeyV4, FlowValue),
    /// For `FLOWS_V6`.
    V6(FlowKeyV6, FlowValue),
}

fn v6_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn v4_bytes(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4],
    }
}

impl FlowEntry {
    /// Validates the expiry rule: only infrastructure entries may be endless.
    pub fn new(
        flow: Flow,
        rule_id: u32,
        policy_version: u32,
        ingress: Ingress,
        allow_reply: bool,
        expiry: Expiry,
        infrastructure: bool,
    ) -> Result<Self, FlowError> {
        match (expiry, infrastructure) {
            (Expiry::At(0), _) => Err(FlowError::ZeroExpiry),
            (Expiry::Infrastructure, false) => Err(FlowError::MissingExpiry),
            _ => Ok(Self { flow, rule_id, policy_version, ingress, allow_reply, expiry }),
        }
    }

    /// True when the kernel would pass this entry's packets at `now_ns`.
    pub const fn is_live(&self, now_ns: u64) -> bool {
        match self.expiry {
            Expiry::Infrastructure => true,
            Expiry::At(t) => now_ns < t,
        }
    }

    /// The map key and a value with zero counters.
    pub fn to_map(&self) -> MapEntry {
        let (expires_ns, mut flags) = match self.expiry {
            Expiry::At(t) => (t, 0),
            Expiry::Infrastructure => (0, FLOW_INFRASTRUCTURE),
        };
        if self.allow_reply {
            flags |= FLOW_ALLOW_REPLY;
        }
        let value = FlowValue {
            expires_ns,
            rule_id: self.rule_id,
            policy_version: self.policy_version,
            ingress: PortRole::from(self.ingress) as u8,
            flags,
            ..FlowValue::default()
        };
        let f = &self.flow;
        match f.dst {
            IpAddr::V4(_) => MapEntry::V4(
                FlowKeyV4::new(v4_bytes(f.src), v4_bytes(f.dst), f.protocol.number(false), f.port),
                value,
            ),
            IpAddr::V6(_) => MapEntry::V6(
                FlowKeyV6::new(v6_bytes(f.src), v6_bytes(f.dst), f.protocol.number(true), f.port),
                value,
            ),
        }
    }

    /// Reads an entry back from a map key and value.
    pub fn from_map(entry: &MapEntry) -> Result<Self, FlowError> {
        let (src, dst, proto_nr, port, v) = match entry {
            MapEntry::V4(k, v) => (
                IpAddr::V4(Ipv4Addr::from(k.src)),
                IpAddr::V4(Ipv4Addr::from(k.dst)),
                k.proto,
                k.port(),
                v,
            ),
            MapEntry::V6(k, v) => (
                IpAddr::V6(Ipv6Addr::from(k.src)),
                IpAddr::V6(Ipv6Addr::from(k.dst)),
                k.proto,
                k.port(),
                v,
            ),
        };
        let protocol = Protocol::from_number(proto_nr).ok_or(FlowError::BadMapEntry("protocol"))?;
        let port = (protocol != Protocol::Icmp).then_some(port);
        let flow = Flow::new(src, dst, protocol, port)?;
        let ingress = PortRole::from_u8(v.ingress).ok_or(FlowError::BadMapEntry("ingress"))?;
        let infrastructure = v.flags & FLOW_INFRASTRUCTURE != 0;
        let expiry =
            if v.expires_ns == 0 { Expiry::Infrastructure } else { Expiry::At(v.expires_ns) };
        Self::new(
            flow,
            v.rule_id,
            v.policy_version,
            ingress.into(),
            v.flags & FLOW_ALLOW_REPLY != 0,
            expiry,
            infrastructure,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn validates_flows() {
        let ok = Flow::new(ip("10.77.0.11"), ip("10.78.0.100"), Protocol::Tcp, Some(443)).unwrap();
        assert_eq!(ok.to_string(), "10.77.0.11 -> 10.78.0.100:443/tcp");
        let e = |s, d, p, port| Flow::new(ip(s), ip(d), p, port).unwrap_err();
        assert!(matches!(
            e("10.0.0.1", "fd00::1", Protocol::Tcp, Some(1)),
            FlowError::FamilyMismatch { .. }
        ));
        assert_eq!(
            e("10.0.0.1", "10.0.0.2", Protocol::Udp, None),
            FlowError::PortRequired(Protocol::Udp)
        );
        assert_eq!(
            e("10.0.0.1", "10.0.0.2", Protocol::Tcp, Some(0)),
            FlowError::PortRequired(Protocol::Tcp)
        );
        assert_eq!(e("10.0.0.1", "10.0.0.2", Protocol::Icmp, Some(1)), FlowError::PortNotAllowed);
        assert!(matches!(
            e("0.0.0.0", "10.0.0.2", Protocol::Icmp, None),
            FlowError::NotAHost { .. }
        ));
        assert!(matches!(
            e("10.0.0.1", "255.255.255.255", Protocol::Icmp, None),
            FlowError::NotAHost { .. }
        ));
        assert!(matches!(
            e("10.0.0.1", "224.0.0.1", Protocol::Icmp, None),
            FlowError::NotAHost { .. }
        ));
        assert!(matches!(
            e("fd00::1", "ff02::1", Protocol::Icmp, None),
            FlowError::NotAHost { .. }
        ));
        assert!(matches!(
            e("fd00::1", "::ffff:10.0.0.1", Protocol::Icmp, None),
            FlowError::NotAHost { .. }
        ));
        assert_eq!(
            e("10.0.0.1", "10.0.0.1", Protocol::Icmp, None),
            FlowError::SameEndpoints(ip("10.0.0.1"))
        );
        assert_eq!("TCP".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert!("sctp".parse::<Protocol>().is_err());
    }

    #[test]
    fn expiry_rules() {
        let f = Flow::new(ip("10.0.0.1"), ip("10.0.0.2"), Protocol::Udp, Some(123)).unwrap();
        let mk = |exp, infra| FlowEntry::new(f, 1, 1, Ingress::Patient, true, exp, infra);
        assert_eq!(mk(Expiry::Infrastructure, false).unwrap_err(), FlowError::MissingExpiry);
        assert_eq!(mk(Expiry::At(0), false).unwrap_err(), FlowError::ZeroExpiry);
        assert!(mk(Expiry::Infrastructure, true).unwrap().is_live(u64::MAX));
        let timed = mk(Expiry::At(10), false).unwrap();
        assert!(timed.is_live(9) && !timed.is_live(10));
    }

    #[test]
    fn map_round_trip() {
        for (s, d, p, port) in [
            ("10.77.0.11", "10.78.0.100", Protocol::Tcp, Some(443)),
            ("fd00:a1:77::11", "fd00:a1:78::100", Protocol::Udp, Some(514)),
            ("fd00:a1:77::11", "fd00:a1:78::100", Protocol::Icmp, None),
            ("10.77.0.11", "10.78.0.100", Protocol::Icmp, None),
        ] {
            let flow = Flow::new(ip(s), ip(d), p, port).unwrap();
            for (exp, infra, reply) in
                [(Expiry::At(99), false, true), (Expiry::Infrastructure, true, false)]
            {
                let e = FlowEntry::new(flow, 7, 3, Ingress::Patient, reply, exp, infra).unwrap();
                let m = e.to_map();
                assert_eq!(FlowEntry::from_map(&m).unwrap(), e);
            }
        }
        let m = FlowEntry::new(
            Flow::new(ip("10.0.0.1"), ip("10.0.0.2"), Protocol::Icmp, None).unwrap(),
            1,
            1,
            Ingress::Uplink,
            true,
            Expiry::At(5),
            false,
        )
        .unwrap()
        .to_map();
        let MapEntry::V4(k, v) = m else { panic!("v4 expected") };
        assert_eq!(
            (k.proto, k.port, v.ingress, v.flags),
            (proto::ICMP, [0, 0], 2, FLOW_ALLOW_REPLY)
        );
    }
}
