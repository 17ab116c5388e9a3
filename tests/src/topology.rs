//! [`Topology`]: the simulated hospital in network namespaces.
//!
//! ```text
//!  <p>-p1 eth0 ──┐
//!                ├─ <p>-psw: br0 (p1, p2, app) ── app ═ patient0 ─ <p>-app ─ uplink0 ═ eth0 <p>-ext
//!  <p>-p2 eth0 ──┘                                      (appliance: XDP on both ports)
//! ```
//! Patient side 10.77.0.0/24 and fd00:a1:77::/64, uplink side 10.78.0.0/24 and
//! fd00:a1:78::/64 (see [`addr`]). Hosts route everything via the appliance.
//!
//! Fail-closed build order: the appliance namespace is created first and its
//! IPv4 and IPv6 forwarding are switched off (and checked) before it has any
//! interface; only the agent turns forwarding on, once it enforces.

use crate::{cmd, names, netns, status::LabStatus, Error, NetNs, Result};

/// The lab's address plan.
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Prefix length of both IPv4 subnets.
    pub const V4_PREFIX_LEN: u8 = 24;
    /// Prefix length of both IPv6 subnets.
    pub const V6_PREFIX_LEN: u8 = 64;

    /// The appliance on the patient side.
    pub const APPLIANCE_PATIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    /// The appliance on the patient side.
    pub const APPLIANCE_PATIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x77, 0, 0, 0, 0, 1);
    /// Patient host 1.
    pub const P1_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
    /// Patient host 1.
    pub const P1_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x77, 0, 0, 0, 0, 0x11);
    /// Patient host 2.
    pub const P2_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
    /// Patient host 2.
    pub const P2_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x77, 0, 0, 0, 0, 0x12);
    /// The appliance on the uplink side.
    pub const APPLIANCE_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
    /// The appliance on the uplink side.
    pub const APPLIANCE_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x78, 0, 0, 0, 0, 1);
    /// The external host.
    pub const EXT_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 100);
    /// The external host.
    pub const EXT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x78, 0, 0, 0, 0, 0x100);
}

/// The appliance's patient-facing port.
pub const PATIENT_PORT: &str = "patient0";
/// The appliance's uplink port.
pub const UPLINK_PORT: &str = "uplink0";
/// Every host's interface.
pub const HOST_IF: &str = "eth0";
/// The patient switch's bridge.
pub const BRIDGE: &str = "br0";

/// One namespace of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    /// Patient host 1.
    P1,
    /// Patient host 2.
    P2,
    /// The patient switch.
    Switch,
    /// The appliance.
    Appliance,
    /// The external host beyond the uplink.
    External,
}

/// What a namespace plays in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host on the patient network.
    Patient,
    /// The patient network's switch.
    Switch,
    /// The Airlock appliance.
    Appliance,
    /// A host beyond the uplink.
    External,
}

impl Node {
    /// Every node, in status order.
    pub const ALL: [Node; 5] = [Node::P1, Node::P2, Node::Switch, Node::Appliance, Node::External];

    /// The namespace suffix (`<prefix>-<suffix>`).
    pub fn suffix(self) -> &'static str {
        match self {
            Node::P1 => "p1",
            Node::P2 => "p2",
            Node::Switch => "psw",
            Node::Appliance => "app",
            Node::External => "ext",
        }
    }

    /// Its role.
    pub fn role(self) -> Role {
        match self {
            Node::P1 | Node::P2 => Role::Patient,
            Node::Switch => Role::Switch,
            Node::Appliance => Role::Appliance,
            Node::External => Role::External,
        }
    }

    /// The namespace name in the lab `prefix`.
    pub fn namespace(self, prefix: &str) -> String {
        names::namespace_name(prefix, self.suffix())
    }

    /// Addresses (interface, address/len) configured on this node.
    pub(crate) fn addresses(self) -> Vec<(&'static str, String)> {
        use addr::*;
        let v4 = |a: std::net::Ipv4Addr| format!("{a}/{V4_PREFIX_LEN}");
        let v6 = |a: std::net::Ipv6Addr| format!("{a}/{V6_PREFIX_LEN}");
        match self {
            Node::P1 => vec![(HOST_IF, v4(P1_V4)), (HOST_IF, v6(P1_V6))],
            Node::P2 => vec![(HOST_IF, v4(P2_V4)), (HOST_IF, v6(P2_V6))],
            Node::Switch => vec![],
            Node::Appliance => vec![
                (PATIENT_PORT, v4(APPLIANCE_PATIENT_V4)),
                (PATIENT_PORT, v6(APPLIANCE_PATIENT_V6)),
                (UPLINK_PORT, v4(APPLIANCE_UPLINK_V4)),
                (UPLINK_PORT, v6(APPLIANCE_UPLINK_V6)),
            ],
            Node::External => vec![(HOST_IF, v4(EXT_V4)), (HOST_IF, v6(EXT_V6))],
        }
    }

    /// Default gateways (IPv4, IPv6) of a host.
    fn gateways(self) -> Option<(String, String)> {
        use addr::*;
        match self {
            Node::P1 | Node::P2 => {
                Some((APPLIANCE_PATIENT_V4.to_string(), APPLIANCE_PATIENT_V6.to_string()))
            }
            Node::External => {
                Some((APPLIANCE_UPLINK_V4.to_string(), APPLIANCE_UPLINK_V6.to_string()))
            }
            Node::Switch | Node::Appliance => None,
        }
    }
}

/// One end of a cable: a node and the interface name in its namespace.
type End = (Node, &'static str);

/// The cables.
const LINKS: [(End, End); 4] = [
    ((Node::P1, HOST_IF), (Node::Switch, "p1")),
    ((Node::P2, HOST_IF), (Node::Switch, "p2")),
    ((Node::Appliance, PATIENT_PORT), (Node::Switch, "app")),
    ((Node::Appliance, UPLINK_PORT), (Node::External, HOST_IF)),
];

/// The lab's namespaces and cables. Dropping it deletes every namespace (the
/// veths die with them). Stop the agent first (see [`crate::Lab`]).
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    // One guard per node, in Node::ALL order.
    p1: NetNs,
    p2: NetNs,
    switch: NetNs,
    appliance: NetNs,
    external: NetNs,
}

impl Topology {
    /// Builds the lab `prefix`. Fails if any namespace of that lab exists.
    /// On failure, everything built so far is removed again.
    pub fn build(prefix: &str) -> Result<Self> {
        names::validate_prefix(prefix)?;
        if let Some(existing) = names::lab_namespaces(prefix).into_iter().next() {
            return Err(Error::NamespaceExists(existing));
        }
        // The appliance first, closed before it has any interface.
        let appliance = NetNs::create(&Node::Appliance.namespace(prefix))?;
        close_appliance(&appliance)?;
        let topo = Topology {
            prefix: prefix.to_owned(),
            p1: host_ns(prefix, Node::P1)?,
            p2: host_ns(prefix, Node::P2)?,
            switch: host_ns(prefix, Node::Switch)?,
            appliance,
            external: host_ns(prefix, Node::External)?,
        };
        topo.wire()?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        for ((a, a_if), (b, b_if)) in LINKS {
            let (a_ns, b_ns) = (a.namespace(&self.prefix), b.namespace(&self.prefix));
            cmd::ip(&[
                "link", "add", a_if, "netns", &a_ns, "type", "veth", "peer", "name", b_if, "netns",
                &b_ns,
            ])?;
        }
        let sw = &self.switch;
        sw.ip(&["link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0"])?;
        for port in ["p1", "p2", "app"] {
            sw.ip(&["link", "set", port, "master", BRIDGE, "up"])?;
        }
        sw.ip(&["link", "set", BRIDGE, "up"])?;
        // A switch forwards frames, it does not validate IP: without this the
        // host's br_netfilter would drop malformed frames before they reach
        // the appliance, hiding what the appliance does with them.
        sw.sysctl(&[
            ("net.bridge.bridge-nf-call-iptables", "0"),
            ("net.bridge.bridge-nf-call-ip6tables", "0"),
            ("net.bridge.bridge-nf-call-arptables", "0"),
        ])?;
        // Like a real switch, put VLAN tags on the wire: with TX VLAN offload
        // the tag would travel beside the frame and the appliance's XDP
        // program would see an untagged frame.
        for port in ["p1", "p2", "app"] {
            sw.exec("ethtool", &["-K", port, "txvlan", "off", "tx-vlan-stag-hw-insert", "off"])?;
        }
        for node in [Node::P1, Node::P2, Node::Appliance, Node::External] {
            let ns = self.ns(node);
            for (ifname, address) in node.addresses() {
                ns.ip(&["addr", "add", &address, "dev", ifname, "nodad"])?;
            }
            let mut ifs: Vec<&str> = node.addresses().into_iter().map(|(i, _)| i).collect();
            ifs.dedup();
            for ifname in ifs {
                ns.ip(&["link", "set", ifname, "up"])?;
            }
            if let Some((gw4, gw6)) = node.gateways() {
                ns.ip(&["-4", "route", "add", "default", "via", &gw4])?;
                ns.ip(&["-6", "route", "add", "default", "via", &gw6])?;
            }
        }
        Ok(())
    }

    /// The lab's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace of `node`.
    pub fn ns(&self, node: Node) -> &NetNs {
        match node {
            Node::P1 => &self.p1,
            Node::P2 => &self.p2,
            Node::Switch => &self.switch,
            Node::Appliance => &self.appliance,
            Node::External => &self.external,
        }
    }

    /// Patient host 1.
    pub fn p1(&self) -> &NetNs {
        &self.p1
    }

    /// Patient host 2.
    pub fn p2(&self) -> &NetNs {
        &self.p2
    }

    /// The patient switch.
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// The appliance.
    pub fn appliance(&self) -> &NetNs {
        &self.appliance
    }

    /// The external host.
    pub fn external(&self) -> &NetNs {
        &self.external
    }

    /// The lab's status as it is now (no agent section; see [`crate::Lab::status`]).
    pub fn status(&self) -> LabStatus {
        LabStatus::probe(&self.prefix, None)
    }

    /// Keeps every namespace after this value is dropped (`lab up --detach`);
    /// [`Topology::destroy_by_prefix`] removes them later. Returns the prefix.
    pub fn into_detached(self) -> String {
        let Topology { prefix, p1, p2, switch, appliance, external } = self;
        for ns in [p1, p2, switch, appliance, external] {
            ns.into_detached();
        }
        prefix
    }

    /// Deletes every namespace of the lab `prefix` (`<prefix>-*`), leftovers
    /// included; returns the names deleted. Tries all before reporting the
    /// first failure.
    pub fn destroy_by_prefix(prefix: &str) -> Result<Vec<String>> {
        names::validate_prefix(prefix)?;
        let found = names::lab_namespaces(prefix);
        let mut first_err = None;
        for name in &found {
            if let Err(e) = netns::delete(name) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }
}

/// A non-appliance namespace: DAD off so addresses work at once.
fn host_ns(prefix: &str, node: Node) -> Result<NetNs> {
    let ns = NetNs::create(&node.namespace(prefix))?;
    ns.sysctl(&[("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0")])?;
    Ok(ns)
}

/// Forwarding off (a new namespace may inherit IPv4 settings from the host),
/// no reverse-path filtering, no DAD; then checks forwarding is off.
fn close_appliance(ns: &NetNs) -> Result<()> {
    ns.sysctl(&[
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv6.conf.all.forwarding", "0"),
        ("net.ipv6.conf.default.forwarding", "0"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ])?;
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        let v = ns.read_sysctl(key)?;
        if v != "0" {
            return Err(Error::ForwardingOn { ns: ns.name().to_owned(), key, value: v });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names() {
        let got: Vec<String> = Node::ALL.iter().map(|n| n.namespace("t3f9a")).collect();
        assert_eq!(got, ["t3f9a-p1", "t3f9a-p2", "t3f9a-psw", "t3f9a-app", "t3f9a-ext"]);
    }

    #[test]
    fn address_plan() {
        assert_eq!(
            Node::Appliance.addresses(),
            [
                ("patient0", "10.77.0.1/24".to_owned()),
                ("patient0", "fd00:a1:77::1/64".to_owned()),
                ("uplink0", "10.78.0.1/24".to_owned()),
                ("uplink0", "fd00:a1:78::1/64".to_owned()),
            ]
        );
        assert_eq!(Node::P2.addresses()[1].1, "fd00:a1:77::12/64");
        assert_eq!(Node::External.addresses()[0].1, "10.78.0.100/24");
        assert_eq!(Node::External.addresses()[1].1, "fd00:a1:78::100/64");
        assert_eq!(Node::P1.gateways(), Some(("10.77.0.1".into(), "fd00:a1:77::1".into())));
    }

    #[test]
    fn interface_names_fit() {
        for ((_, a), (_, b)) in LINKS {
            assert!(a.len() <= 15 && b.len() <= 15);
        }
    }
}
