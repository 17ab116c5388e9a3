//! [`Topology`]: the simulated hospital in network namespaces.
//!
//! ```text
//!  <p>-p1 eth0 ──┐
//!                ├─ <p>-psw: br0 (p1, p2, app) ── app ═ patient0 ─ <p>-app ─ uplink0 ═ eth0 <p>-ext
//!  <p>-p2 eth0 ──┘                                      (appliance)  │
//!                                                                 mgmt0          (with a controller)
//!                                                                    ║
//!                                                      eth0 <p>-ctl: airlock-controller
//!                                                      host0 ═ <p>-hctl in the host (lab up only)
//! ```
//! Patient side 10.77.0.0/24 and fd00:a1:77::/64, uplink side 10.78.0.0/24 and
//! fd00:a1:78::/64 (see [`addr`]). Hosts route everything via the appliance.
//!
//! With a controller ([`TopologyOptions::controller`]) a sixth namespace
//! `<p>-ctl` holds it, cabled to the appliance's management port `mgmt0`
//! (10.90.0.0/24, fd00:a1:90::/64). The agent configures `mgmt0` as a port
//! with role `management`: it carries only the agent's own connection to the
//! controller (XDP passes only answers addressed to the appliance's own
//! address there, to the management entries the agent adds itself), and
//! nothing is forwarded from or to it on either layer.
//! The controller has no route beyond its link: it cannot reach the patient
//! network or the uplink. [`TopologyOptions::host_link`] adds a veth from the
//! host (`<p>-hctl`, 10.91.0.1/30) to `host0` (10.91.0.2/30) in `<p>-ctl`, so
//! a browser on the host reaches the controller; only for the interactive
//! lab, because concurrent labs would clash on that address.
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
    /// The appliance on the management network.
    pub const APPLIANCE_MGMT_V4: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
    /// The appliance on the management network.
    pub const APPLIANCE_MGMT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x90, 0, 0, 0, 0, 1);
    /// The controller.
    pub const CONTROLLER_V4: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 100);
    /// The controller.
    pub const CONTROLLER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0x90, 0, 0, 0, 0, 0x100);
    /// The host's end of the host link (interactive lab only).
    pub const HOST_LINK_HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 1);
    /// The controller's end of the host link (interactive lab only).
    pub const HOST_LINK_CONTROLLER_V4: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 2);
    /// Prefix length of the host link.
    pub const HOST_LINK_PREFIX_LEN: u8 = 30;
    /// The controller's main (API, UI, enrollment) port.
    pub const CONTROLLER_PORT: u16 = 8443;
    /// The controller's agent (mTLS bundle stream) port.
    pub const CONTROLLER_AGENT_PORT: u16 = 8444;
}

/// The appliance's patient-facing port.
pub const PATIENT_PORT: &str = "patient0";
/// The appliance's uplink port.
pub const UPLINK_PORT: &str = "uplink0";
/// The appliance's management port (towards the controller).
pub const MGMT_PORT: &str = "mgmt0";
/// The controller's end of the host link.
pub const HOST_LINK_IF: &str = "host0";
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
    /// The controller on the management network (labs with a controller).
    Controller,
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
    /// The controller.
    Controller,
}

impl Node {
    /// Every node, in status order (the controller only exists in labs with one).
    pub const ALL: [Node; 6] =
        [Node::P1, Node::P2, Node::Switch, Node::Appliance, Node::External, Node::Controller];

    /// The namespace suffix (`<prefix>-<suffix>`).
    pub fn suffix(self) -> &'static str {
        match self {
            Node::P1 => "p1",
            Node::P2 => "p2",
            Node::Switch => "psw",
            Node::Appliance => "app",
            Node::External => "ext",
            Node::Controller => "ctl",
        }
    }

    /// Its role.
    pub fn role(self) -> Role {
        match self {
            Node::P1 | Node::P2 => Role::Patient,
            Node::Switch => Role::Switch,
            Node::Appliance => Role::Appliance,
            Node::External => Role::External,
            Node::Controller => Role::Controller,
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
                (MGMT_PORT, v4(APPLIANCE_MGMT_V4)),
                (MGMT_PORT, v6(APPLIANCE_MGMT_V6)),
            ],
            Node::External => vec![(HOST_IF, v4(EXT_V4)), (HOST_IF, v6(EXT_V6))],
            Node::Controller => vec![(HOST_IF, v4(CONTROLLER_V4)), (HOST_IF, v6(CONTROLLER_V6))],
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
            // The controller reaches only its own link.
            Node::Switch | Node::Appliance | Node::Controller => None,
        }
    }
}

/// One end of a cable: a node and the interface name in its namespace.
type End = (Node, &'static str);

/// The cables.
const LINKS: [(End, End); 5] = [
    ((Node::P1, HOST_IF), (Node::Switch, "p1")),
    ((Node::P2, HOST_IF), (Node::Switch, "p2")),
    ((Node::Appliance, PATIENT_PORT), (Node::Switch, "app")),
    ((Node::Appliance, UPLINK_PORT), (Node::External, HOST_IF)),
    ((Node::Appliance, MGMT_PORT), (Node::Controller, HOST_IF)),
];

/// What to build besides the five namespaces every lab has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopologyOptions {
    /// The controller namespace `<p>-ctl` and the appliance's `mgmt0`.
    pub controller: bool,
    /// The host link `<p>-hctl` ↔ `host0` in `<p>-ctl` (needs `controller`;
    /// interactive lab only: its addresses are fixed).
    pub host_link: bool,
}

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
    controller: Option<NetNs>,
    host_link: Option<HostLink>,
}

/// The host end of the host link, deleted on drop (the kernel would remove
/// it with the controller namespace, but asynchronously).
#[derive(Debug)]
struct HostLink {
    name: String,
    owned: bool,
}

impl Drop for HostLink {
    fn drop(&mut self) {
        if self.owned {
            delete_host_link(&self.name);
        }
    }
}

/// `ip link del NAME` if it exists.
fn delete_host_link(name: &str) {
    if std::path::Path::new("/sys/class/net").join(name).exists() {
        if let Err(e) = cmd::ip(&["link", "del", name]) {
            eprintln!("airlock-testbed: cannot delete {name}: {e}");
        }
    }
}

impl Topology {
    /// Builds the lab `prefix` without a controller. Fails if any namespace
    /// of that lab exists. On failure, everything built so far is removed again.
    pub fn build(prefix: &str) -> Result<Self> {
        Self::build_with(prefix, TopologyOptions::default())
    }

    /// Builds the lab `prefix` as `opts` says (see [`Topology::build`]).
    pub fn build_with(prefix: &str, opts: TopologyOptions) -> Result<Self> {
        names::validate_prefix(prefix)?;
        if let Some(existing) = names::lab_namespaces(prefix).into_iter().next() {
            return Err(Error::NamespaceExists(existing));
        }
        // The appliance first, closed before it has any interface.
        let appliance = NetNs::create(&Node::Appliance.namespace(prefix))?;
        close_appliance(&appliance)?;
        let mut topo = Topology {
            prefix: prefix.to_owned(),
            p1: host_ns(prefix, Node::P1)?,
            p2: host_ns(prefix, Node::P2)?,
            switch: host_ns(prefix, Node::Switch)?,
            appliance,
            external: host_ns(prefix, Node::External)?,
            controller: if opts.controller {
                Some(host_ns(prefix, Node::Controller)?)
            } else {
                None
            },
            host_link: None,
        };
        topo.wire()?;
        if opts.controller && opts.host_link {
            topo.host_link = Some(HostLink { name: Self::host_link_name(prefix), owned: true });
            topo.wire_host_link()?;
        }
        Ok(topo)
    }

    /// The host-side interface of the host link (`<prefix>-hctl`).
    pub fn host_link_name(prefix: &str) -> String {
        format!("{prefix}-hctl")
    }

    fn wire_host_link(&self) -> Result<()> {
        use addr::*;
        let host_if = Self::host_link_name(&self.prefix);
        let ctl = Node::Controller.namespace(&self.prefix);
        cmd::ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            HOST_LINK_IF,
            "netns",
            &ctl,
        ])?;
        let len = HOST_LINK_PREFIX_LEN;
        cmd::ip(&["addr", "add", &format!("{HOST_LINK_HOST_V4}/{len}"), "dev", &host_if])?;
        cmd::ip(&["link", "set", &host_if, "up"])?;
        let ns = NetNs::existing(&ctl);
        ns.ip(&["addr", "add", &format!("{HOST_LINK_CONTROLLER_V4}/{len}"), "dev", HOST_LINK_IF])?;
        ns.ip(&["link", "set", HOST_LINK_IF, "up"])?;
        Ok(())
    }

    /// Whether the lab has a controller namespace.
    pub fn has_controller(&self) -> bool {
        self.controller.is_some()
    }

    /// Whether the lab has the host link.
    pub fn has_host_link(&self) -> bool {
        self.host_link.is_some()
    }

    fn wire(&self) -> Result<()> {
        for ((a, a_if), (b, b_if)) in LINKS {
            if self.ns(a).is_none() || self.ns(b).is_none() {
                continue;
            }
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
        for node in [Node::P1, Node::P2, Node::Appliance, Node::External, Node::Controller] {
            let Some(ns) = self.ns(node) else { continue };
            // mgmt0 exists only with a controller.
            let addresses: Vec<(&str, String)> = node
                .addresses()
                .into_iter()
                .filter(|(i, _)| *i != MGMT_PORT || self.controller.is_some())
                .collect();
            for (ifname, address) in &addresses {
                ns.ip(&["addr", "add", address, "dev", ifname, "nodad"])?;
            }
            let mut ifs: Vec<&str> = addresses.iter().map(|(i, _)| *i).collect();
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

    /// The namespace of `node` (`None`: the controller of a lab without one).
    pub fn ns(&self, node: Node) -> Option<&NetNs> {
        match node {
            Node::P1 => Some(&self.p1),
            Node::P2 => Some(&self.p2),
            Node::Switch => Some(&self.switch),
            Node::Appliance => Some(&self.appliance),
            Node::External => Some(&self.external),
            Node::Controller => self.controller.as_ref(),
        }
    }

    /// The controller's namespace, in a lab with a controller.
    pub fn controller(&self) -> Option<&NetNs> {
        self.controller.as_ref()
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
        let Topology { prefix, p1, p2, switch, appliance, external, controller, host_link } = self;
        for ns in [p1, p2, switch, appliance, external].into_iter().chain(controller) {
            ns.into_detached();
        }
        if let Some(mut link) = host_link {
            link.owned = false;
        }
        prefix
    }

    /// Deletes every namespace of the lab `prefix` (`<prefix>-*`), leftovers
    /// included, and its host link; returns the namespaces deleted. Tries all
    /// before reporting the first failure.
    pub fn destroy_by_prefix(prefix: &str) -> Result<Vec<String>> {
        names::validate_prefix(prefix)?;
        delete_host_link(&Self::host_link_name(prefix));
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
        assert_eq!(
            got,
            ["t3f9a-p1", "t3f9a-p2", "t3f9a-psw", "t3f9a-app", "t3f9a-ext", "t3f9a-ctl"]
        );
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
                ("mgmt0", "10.90.0.1/24".to_owned()),
                ("mgmt0", "fd00:a1:90::1/64".to_owned()),
            ]
        );
        assert_eq!(
            Node::Controller.addresses(),
            [("eth0", "10.90.0.100/24".to_owned()), ("eth0", "fd00:a1:90::100/64".to_owned())]
        );
        assert_eq!(Node::Controller.gateways(), None);
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
        let longest = "a".repeat(names::MAX_PREFIX_LEN);
        assert!(Topology::host_link_name(&longest).len() <= 15);
    }
}
