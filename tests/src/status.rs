//! [`LabStatus`]: what `cargo xtask lab status --json` prints.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::{
    agent::AgentRecord,
    controller::ControllerRecord,
    names,
    topology::{addr, Node, Role},
    NetNs,
};

/// Version of the [`LabStatus`] JSON shape; bumped on incompatible changes.
pub const STATUS_SCHEMA: u32 = 1;

/// The state of one lab, as stable JSON (fields appear in this order):
///
/// - `schema`: [`STATUS_SCHEMA`] (1).
/// - `lab`: the lab's name, which is its namespace prefix (`"al"` for the
///   interactive lab, `t` + 4 characters in tests).
/// - `state`: `"running"` (every namespace exists and the agent and the
///   controller, where the lab has them, are alive), `"down"` (no namespace
///   left and no process alive), or `"degraded"` (anything in between).
/// - `namespaces`: one object per lab namespace, in the order p1, p2, switch,
///   appliance, external, controller (the last only in a lab with a
///   controller):
///   - `name`: the namespace (`al-p1`), usable with `ip netns exec` and
///     `nsenter --net=/run/netns/<name>`;
///   - `role`: `"patient"`, `"switch"`, `"appliance"`, `"external"` or
///     `"controller"`;
///   - `exists`: whether `/run/netns/<name>` exists now;
///   - `interfaces`: its interfaces except `lo`, sorted by name, each with
///     `name`, `mac` (`"aa:bb:..."`), `up` (administratively up), `ipv4`
///     and `ipv6` (global addresses with prefix length, `"10.77.0.1/24"`;
///     link-local addresses are left out). Empty when the namespace is gone.
/// - `agent`: `null` for a lab without an agent, else:
///   - `pid`: the agent process; `alive`: whether it still runs;
///   - `namespace`: where it runs (the appliance namespace);
///   - `config`, `log`: its TOML configuration and its log file;
///   - `pin_dir`: where its programs, maps and links are pinned;
///   - `bpffs`: the bpffs mount holding `pin_dir` (`"/sys/fs/bpf"`);
///   - `pinned`: whether `pin_dir` exists (the boundary stays pinned, and
///     enforcing, when the agent process dies).
/// - `hosts`: the addressed nodes in the order p1, p2, appliance, external,
///   each with `name` (`"p1"`, `"p2"`, `"appliance"`, `"ext"`), `namespace`,
///   `role`, `ipv4` and `ipv6` (plain addresses, from the address plan).
/// - `services`: external services of the lab; empty for now.
/// - `controller`: `null` for a lab without a controller, else:
///   - `namespace`: where it runs (`al-ctl`);
///   - `url`: its main listener (API, web UI, enrollment),
///     `"https://10.90.0.100:8443"`, reachable from inside `namespace` (and
///     from the host over the host link that `lab up` adds, at 10.91.0.2);
///   - `agent_url`: the mTLS listener agents stream bundles from;
///   - `ca_fingerprint`: the CA agents pin (`"sha256:<hex>"`);
///   - `pid`, `alive`: its process and whether it still runs;
///   - `data_dir`: its data directory (store, key file, `ca.pem`, the
///     harness's config, ready file and log);
///   - `log`: its log (standard error; no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabStatus {
    /// See the type docs.
    pub schema: u32,
    /// The lab's name (its prefix).
    pub lab: String,
    /// Overall state.
    pub state: LabState,
    /// Every lab namespace.
    pub namespaces: Vec<NamespaceStatus>,
    /// The agent, if the lab has one.
    pub agent: Option<AgentStatus>,
    /// Addressed nodes.
    pub hosts: Vec<HostStatus>,
    /// External services (filled by later work).
    pub services: Vec<serde_json::Value>,
    /// The controller, if the lab has one.
    pub controller: Option<ControllerStatus>,
}

/// Overall lab state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabState {
    /// Everything present.
    Running,
    /// Some parts missing.
    Degraded,
    /// Nothing left.
    Down,
}

/// One namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStatus {
    /// Namespace name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Whether it exists.
    pub exists: bool,
    /// Its interfaces (no `lo`).
    pub interfaces: Vec<InterfaceStatus>,
}

/// One interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Interface name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// Administratively up.
    pub up: bool,
    /// Global IPv4 addresses with prefix length.
    pub ipv4: Vec<String>,
    /// Global IPv6 addresses with prefix length.
    pub ipv6: Vec<String>,
}

/// The agent process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Process id.
    pub pid: u32,
    /// Whether it runs.
    pub alive: bool,
    /// Its network namespace.
    pub namespace: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its pin directory.
    pub pin_dir: PathBuf,
    /// The bpffs mount point.
    pub bpffs: PathBuf,
    /// Whether the pin directory exists.
    pub pinned: bool,
}

/// The controller process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// Its network namespace.
    pub namespace: String,
    /// The main listener's URL.
    pub url: String,
    /// The agent listener's URL.
    pub agent_url: String,
    /// The CA fingerprint agents pin.
    pub ca_fingerprint: String,
    /// Process id.
    pub pid: u32,
    /// Whether it runs.
    pub alive: bool,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

/// One addressed node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Short name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Role.
    pub role: Role,
    /// IPv4 addresses.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses.
    pub ipv6: Vec<Ipv6Addr>,
}

impl LabStatus {
    /// Looks at the lab `prefix` as it is now: which namespaces exist, their
    /// interfaces, and (given its record) whether the agent is alive.
    pub fn probe(prefix: &str, agent: Option<&AgentRecord>) -> Self {
        Self::probe_with(prefix, agent, None)
    }

    /// [`LabStatus::probe`] with the controller's record. The controller
    /// namespace is listed when the lab has a controller or the namespace exists.
    pub fn probe_with(
        prefix: &str,
        agent: Option<&AgentRecord>,
        controller: Option<&ControllerRecord>,
    ) -> Self {
        let namespaces: Vec<NamespaceStatus> = Node::ALL
            .iter()
            .filter(|&&node| {
                node != Node::Controller
                    || controller.is_some()
                    || names::namespace_exists(&node.namespace(prefix))
            })
            .map(|&node| {
                let name = node.namespace(prefix);
                let exists = names::namespace_exists(&name);
                let interfaces = if exists { interfaces(&name) } else { Vec::new() };
                NamespaceStatus { name, role: node.role(), exists, interfaces }
            })
            .collect();
        let agent = agent.map(AgentRecord::status);
        let controller = controller.map(ControllerRecord::status);
        let all = namespaces.iter().all(|n| n.exists);
        let none = namespaces.iter().all(|n| !n.exists);
        let agent_ok =
            agent.as_ref().is_none_or(|a| a.alive) && controller.as_ref().is_none_or(|c| c.alive);
        let agent_dead =
            agent.as_ref().is_none_or(|a| !a.alive) && controller.as_ref().is_none_or(|c| !c.alive);
        let state = if all && agent_ok {
            LabState::Running
        } else if none && agent_dead {
            LabState::Down
        } else {
            LabState::Degraded
        };
        LabStatus {
            schema: STATUS_SCHEMA,
            lab: prefix.to_owned(),
            state,
            namespaces,
            agent,
            hosts: hosts(prefix),
            services: Vec::new(),
            controller,
        }
    }

    /// Pretty JSON (what `lab status --json` prints).
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The addressed nodes from the address plan.
pub(crate) fn hosts(prefix: &str) -> Vec<HostStatus> {
    use addr::*;
    let host = |name: &str, node: Node, ipv4: Vec<Ipv4Addr>, ipv6: Vec<Ipv6Addr>| HostStatus {
        name: name.to_owned(),
        namespace: node.namespace(prefix),
        role: node.role(),
        ipv4,
        ipv6,
    };
    vec![
        host("p1", Node::P1, vec![P1_V4], vec![P1_V6]),
        host("p2", Node::P2, vec![P2_V4], vec![P2_V6]),
        host(
            "appliance",
            Node::Appliance,
            vec![APPLIANCE_PATIENT_V4, APPLIANCE_UPLINK_V4],
            vec![APPLIANCE_PATIENT_V6, APPLIANCE_UPLINK_V6],
        ),
        host("ext", Node::External, vec![EXT_V4], vec![EXT_V6]),
    ]
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

/// Interfaces of a namespace from `ip -j addr show`; empty if that fails.
fn interfaces(ns: &str) -> Vec<InterfaceStatus> {
    let Ok(out) = NetNs::existing(ns).ip(&["-j", "addr", "show"]) else {
        return Vec::new();
    };
    parse_ip_addr(&out)
}

fn parse_ip_addr(json: &str) -> Vec<InterfaceStatus> {
    let links: Vec<IpLink> = serde_json::from_str(json).unwrap_or_default();
    let mut out: Vec<InterfaceStatus> = links
        .into_iter()
        .filter(|l| l.ifname != "lo")
        .map(|l| {
            let addrs = |family: &str| {
                l.addr_info
                    .iter()
                    .filter(|a| a.family == family && a.scope == "global")
                    .map(|a| format!("{}/{}", a.local, a.prefixlen))
                    .collect()
            };
            InterfaceStatus {
                ipv4: addrs("inet"),
                ipv6: addrs("inet6"),
                up: l.flags.iter().any(|f| f == "UP"),
                name: l.ifname,
                mac: l.address,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

impl fmt::Display for LabStatus {
    /// A human table: state, namespaces with their interfaces, agent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            LabState::Running => "running",
            LabState::Degraded => "DEGRADED",
            LabState::Down => "down",
        };
        writeln!(f, "lab {}: {state}", self.lab)?;
        writeln!(
            f,
            "{:<12} {:<10} {:<10} {:<18} addresses",
            "namespace", "role", "interface", "mac"
        )?;
        for ns in &self.namespaces {
            let role = serde_json::to_value(ns.role).ok();
            let role = role.as_ref().and_then(|r| r.as_str()).unwrap_or("?");
            if !ns.exists {
                writeln!(f, "{:<12} {role:<10} MISSING", ns.name)?;
                continue;
            }
            if ns.interfaces.is_empty() {
                writeln!(f, "{:<12} {role:<10} -", ns.name)?;
            }
            for (i, itf) in ns.interfaces.iter().enumerate() {
                let (name, role) = if i == 0 { (ns.name.as_str(), role) } else { ("", "") };
                let addrs: Vec<&str> =
                    itf.ipv4.iter().chain(&itf.ipv6).map(String::as_str).collect();
                let down = if itf.up { "" } else { " (down)" };
                let line = format!(
                    "{name:<12} {role:<10} {:<10} {:<18} {}{down}",
                    itf.name,
                    itf.mac,
                    addrs.join(" ")
                );
                writeln!(f, "{}", line.trim_end())?;
            }
        }
        match &self.controller {
            None => writeln!(f, "controller: none")?,
            Some(c) => writeln!(
                f,
                "controller: pid {} {} in {}; {} (agents: {}); CA {}; log {}",
                c.pid,
                if c.alive { "running" } else { "NOT RUNNING" },
                c.namespace,
                c.url,
                c.agent_url,
                c.ca_fingerprint,
                c.log.display()
            )?,
        }
        match &self.agent {
            None => writeln!(f, "agent: none"),
            Some(a) => writeln!(
                f,
                "agent: pid {} {} in {}; pins {} ({}); config {}; log {}",
                a.pid,
                if a.alive { "running" } else { "NOT RUNNING" },
                a.namespace,
                a.pin_dir.display(),
                if a.pinned { "present" } else { "absent" },
                a.config.display(),
                a.log.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LabStatus {
        LabStatus {
            schema: STATUS_SCHEMA,
            lab: "al".into(),
            state: LabState::Degraded,
            namespaces: vec![NamespaceStatus {
                name: "al-app".into(),
                role: Role::Appliance,
                exists: true,
                interfaces: vec![InterfaceStatus {
                    name: "patient0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    up: true,
                    ipv4: vec!["10.77.0.1/24".into()],
                    ipv6: vec!["fd00:a1:77::1/64".into()],
                }],
            }],
            agent: Some(AgentStatus {
                pid: 42,
                alive: false,
                namespace: "al-app".into(),
                config: "/run/airlock-lab/al/agent/agent.toml".into(),
                log: "/run/airlock-lab/al/agent/agent.log".into(),
                pin_dir: "/sys/fs/bpf/airlock-al".into(),
                bpffs: "/sys/fs/bpf".into(),
                pinned: true,
            }),
            hosts: hosts("al")[..1].to_vec(),
            services: vec![],
            controller: Some(ControllerStatus {
                namespace: "al-ctl".into(),
                url: "https://10.90.0.100:8443".into(),
                agent_url: "https://10.90.0.100:8444".into(),
                ca_fingerprint: "sha256:00ff".into(),
                pid: 43,
                alive: true,
                data_dir: "/run/airlock-lab/al/controller".into(),
                log: "/run/airlock-lab/al/controller/controller.log".into(),
            }),
        }
    }

    #[test]
    fn json_shape_is_stable() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).expect("json");
        let expected = serde_json::json!({
            "schema": 1,
            "lab": "al",
            "state": "degraded",
            "namespaces": [{
                "name": "al-app",
                "role": "appliance",
                "exists": true,
                "interfaces": [{
                    "name": "patient0",
                    "mac": "02:00:00:00:00:01",
                    "up": true,
                    "ipv4": ["10.77.0.1/24"],
                    "ipv6": ["fd00:a1:77::1/64"]
                }]
            }],
            "agent": {
                "pid": 42,
                "alive": false,
                "namespace": "al-app",
                "config": "/run/airlock-lab/al/agent/agent.toml",
                "log": "/run/airlock-lab/al/agent/agent.log",
                "pin_dir": "/sys/fs/bpf/airlock-al",
                "bpffs": "/sys/fs/bpf",
                "pinned": true
            },
            "hosts": [{
                "name": "p1",
                "namespace": "al-p1",
                "role": "patient",
                "ipv4": ["10.77.0.11"],
                "ipv6": ["fd00:a1:77::11"]
            }],
            "services": [],
            "controller": {
                "namespace": "al-ctl",
                "url": "https://10.90.0.100:8443",
                "agent_url": "https://10.90.0.100:8444",
                "ca_fingerprint": "sha256:00ff",
                "pid": 43,
                "alive": true,
                "data_dir": "/run/airlock-lab/al/controller",
                "log": "/run/airlock-lab/al/controller/controller.log"
            }
        });
        assert_eq!(v, expected);
        // Field order is part of the contract for humans reading it.
        let text = sample().to_json();
        let order = [
            "\"schema\"",
            "\"lab\"",
            "\"state\"",
            "\"namespaces\"",
            "\"agent\"",
            "\"hosts\"",
            "\"services\"",
            "\"controller\"",
        ];
        let pos: Vec<usize> = order.iter().map(|k| text.find(k).expect(k)).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{text}");
        let back: LabStatus = serde_json::from_str(&text).expect("round trip");
        assert_eq!(back, sample());
    }

    #[test]
    fn hosts_follow_the_address_plan() {
        let h = hosts("t1");
        let names: Vec<&str> = h.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["p1", "p2", "appliance", "ext"]);
        assert_eq!(h[2].ipv4, [addr::APPLIANCE_PATIENT_V4, addr::APPLIANCE_UPLINK_V4]);
        assert_eq!(h[3].ipv6[0].to_string(), "fd00:a1:78::100");
        assert_eq!(h[3].namespace, "t1-ext");
    }

    #[test]
    fn missing_lab_is_down() {
        let s = LabStatus::probe("zz9nolab", None);
        assert_eq!(s.state, LabState::Down);
        assert!(s.namespaces.iter().all(|n| !n.exists && n.interfaces.is_empty()));
        assert!(s.to_string().contains("MISSING"));
    }

    #[test]
    fn parses_ip_json() {
        let json = r#"[
          {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"address":"00:00:00:00:00:00",
           "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
          {"ifindex":3,"ifname":"uplink0","flags":["BROADCAST","UP"],"address":"aa:bb:cc:dd:ee:02",
           "addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
          {"ifindex":2,"ifname":"patient0","flags":["BROADCAST"],"address":"aa:bb:cc:dd:ee:01",
           "addr_info":[{"family":"inet","local":"10.77.0.1","prefixlen":24,"scope":"global"},
                        {"family":"inet6","local":"fd00:a1:77::1","prefixlen":64,"scope":"global"}]}
        ]"#;
        let got = parse_ip_addr(json);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "patient0");
        assert!(!got[0].up);
        assert_eq!(got[0].ipv4, ["10.77.0.1/24"]);
        assert_eq!(got[0].ipv6, ["fd00:a1:77::1/64"]);
        assert_eq!(got[1].name, "uplink0");
        assert!(got[1].up && got[1].ipv6.is_empty());
    }
}
