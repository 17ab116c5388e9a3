//! The agent's file formats the lab writes and reads: the configuration
//! TOML (docs/agent-cli.md) and the `stats --json` output.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    host::BPFFS,
    topology::{MGMT_PORT, PATIENT_PORT, UPLINK_PORT},
    Error, Result,
};

/// Log format of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// XDP attach mode of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// Driver mode (veth supports it).
    #[default]
    Native,
    /// Generic (skb) mode.
    Generic,
    /// Native, falling back to generic.
    Auto,
}

/// Which side a port faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    /// The patient network.
    Patient,
    /// The uplink.
    Uplink,
    /// The management network: only the agent's own connection to its
    /// controller, never forwarded.
    Management,
}

/// One `[[port]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Interface name in the appliance namespace.
    pub name: String,
    /// Its side.
    pub role: PortRole,
    /// Attach mode.
    pub xdp_mode: XdpMode,
}

/// The agent configuration file the lab writes (see docs/agent-cli.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `appliance.name`.
    pub name: String,
    /// `appliance.pin_dir`.
    pub pin_dir: PathBuf,
    /// `appliance.state_dir` (the agent's default when `None`; [`crate::Agent`]
    /// sets it inside its state directory).
    pub state_dir: Option<PathBuf>,
    /// `[[port]]`s.
    pub ports: Vec<PortConfig>,
    /// `dataplane.max_flows` (the agent's default when `None`).
    pub max_flows: Option<u32>,
    /// `dataplane.events_per_second`.
    pub events_per_second: u32,
    /// `dataplane.enable_forwarding`.
    pub enable_forwarding: bool,
    /// `dataplane.reply_min_port`.
    pub reply_min_port: u16,
    /// `dataplane.nftables` (the second layer; rendered only when off).
    pub nftables: bool,
    /// `log.format`.
    pub log_format: LogFormat,
    /// `log.counters_interval_secs`.
    pub counters_interval_secs: u64,
    /// `[controller]` (absent: policies are local files only).
    pub controller: Option<ControllerSection>,
}

/// The agent's `[controller]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSection {
    /// `url`: the controller's main listener (`https://10.90.0.100:8443`).
    pub url: String,
    /// `ca_fingerprint`: the pinned CA (`sha256:<hex>`).
    pub ca_fingerprint: String,
    /// `enrollment_token_file`: `run` enrolls with it when not enrolled.
    pub enrollment_token_file: Option<PathBuf>,
    /// `report_interval_secs`.
    pub report_interval_secs: u64,
}

impl AgentConfig {
    /// The lab's configuration: ports `patient0` and `uplink0` in native
    /// mode, pins under `/sys/fs/bpf/airlock-<prefix>`, forwarding on.
    pub fn for_lab(prefix: &str) -> Self {
        AgentConfig {
            name: format!("lab-{prefix}"),
            pin_dir: Path::new(BPFFS).join(format!("airlock-{prefix}")),
            state_dir: None,
            ports: vec![
                PortConfig {
                    name: PATIENT_PORT.into(),
                    role: PortRole::Patient,
                    xdp_mode: XdpMode::Native,
                },
                PortConfig {
                    name: UPLINK_PORT.into(),
                    role: PortRole::Uplink,
                    xdp_mode: XdpMode::Native,
                },
            ],
            max_flows: None,
            events_per_second: 200,
            enable_forwarding: true,
            reply_min_port: 1024,
            nftables: true,
            log_format: LogFormat::Text,
            counters_interval_secs: 10,
            controller: None,
        }
    }

    /// The same configuration with the eBPF layer alone (`nftables =
    /// false`): the tests of the XDP boundary, whose hand-added flows are
    /// eBPF-only (the nftables layer, installed with no flows at start,
    /// would drop them).
    pub fn ebpf_only(mut self) -> Self {
        self.nftables = false;
        self
    }

    /// The same configuration managed by a controller: the management port
    /// `mgmt0` joins the ports (role `management`: it carries the agent's own
    /// connection to the controller and nothing is forwarded across it, see
    /// [`crate::Topology`]) and `[controller]` is set.
    pub fn with_controller(mut self, section: ControllerSection) -> Self {
        if !self.ports.iter().any(|p| p.name == MGMT_PORT) {
            self.ports.push(PortConfig {
                name: MGMT_PORT.into(),
                role: PortRole::Management,
                xdp_mode: XdpMode::Native,
            });
        }
        self.controller = Some(section);
        self
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# Written by airlock-testbed.\n[appliance]\n");
        s.push_str(&format!("name = {}\n", toml_str(&self.name)));
        s.push_str(&format!("pin_dir = {}\n", toml_str(&self.pin_dir.to_string_lossy())));
        if let Some(d) = &self.state_dir {
            s.push_str(&format!("state_dir = {}\n", toml_str(&d.to_string_lossy())));
        }
        for p in &self.ports {
            let role = match p.role {
                PortRole::Patient => "patient",
                PortRole::Uplink => "uplink",
                PortRole::Management => "management",
            };
            let mode = match p.xdp_mode {
                XdpMode::Native => "native",
                XdpMode::Generic => "generic",
                XdpMode::Auto => "auto",
            };
            s.push_str(&format!(
                "\n[[port]]\nname = {}\nrole = \"{role}\"\nxdp_mode = \"{mode}\"\n",
                toml_str(&p.name)
            ));
        }
        s.push_str("\n[dataplane]\n");
        if let Some(n) = self.max_flows {
            s.push_str(&format!("max_flows = {n}\n"));
        }
        s.push_str(&format!(
            "events_per_second = {}\nenable_forwarding = {}\nreply_min_port = {}\n",
            self.events_per_second, self.enable_forwarding, self.reply_min_port
        ));
        if !self.nftables {
            s.push_str(
                "nftables = false
",
            );
        }
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        s.push_str(&format!(
            "\n[log]\nformat = \"{format}\"\ncounters_interval_secs = {}\n",
            self.counters_interval_secs
        ));
        if let Some(c) = &self.controller {
            s.push_str(&format!(
                "\n[controller]\nurl = {}\nca_fingerprint = {}\n",
                toml_str(&c.url),
                toml_str(&c.ca_fingerprint)
            ));
            if let Some(f) = &c.enrollment_token_file {
                s.push_str(&format!(
                    "enrollment_token_file = {}\n",
                    toml_str(&f.to_string_lossy())
                ));
            }
            s.push_str(&format!("report_interval_secs = {}\n", c.report_interval_secs));
        }
        s
    }
}

/// A TOML basic string (a JSON string literal is one).
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Per-reason counters from `stats --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// `airlock-agent stats --json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentStats {
    /// Counters by reason name (`pass_flow`, `drop_no_flow`, ...).
    pub reasons: BTreeMap<String, Counter>,
    /// Flow entries in the maps.
    pub flows: u64,
}

impl AgentStats {
    /// Parses the JSON output.
    pub fn parse(json: &str) -> Result<Self> {
        serde_json::from_str(json)
            .map_err(|source| Error::Json { what: "airlock-agent stats --json".into(), source })
    }

    /// Packets counted for `reason` (0 if absent).
    pub fn packets(&self, reason: &str) -> u64 {
        self.reasons.get(reason).map_or(0, |c| c.packets)
    }

    /// `flows=N reason=packets ...` for the non-zero reasons, sorted.
    pub fn summary(&self) -> String {
        let mut s = format!("flows={}", self.flows);
        for (r, c) in self.reasons.iter().filter(|(_, c)| c.packets > 0) {
            s.push_str(&format!(" {r}={}", c.packets));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_config_renders_the_contract_format() {
        let text = AgentConfig::for_lab("t3f9a").render();
        let expected = "# Written by airlock-testbed.
[appliance]
name = \"lab-t3f9a\"
pin_dir = \"/sys/fs/bpf/airlock-t3f9a\"

[[port]]
name = \"patient0\"
role = \"patient\"
xdp_mode = \"native\"

[[port]]
name = \"uplink0\"
role = \"uplink\"
xdp_mode = \"native\"

[dataplane]
events_per_second = 200
enable_forwarding = true
reply_min_port = 1024

[log]
format = \"text\"
counters_interval_secs = 10
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_managed_lab_config_adds_the_management_port_and_the_controller() {
        let fp = format!("sha256:{}", "0f".repeat(32));
        let c = AgentConfig::for_lab("t3f9a").with_controller(ControllerSection {
            url: "https://10.90.0.100:8443".into(),
            ca_fingerprint: fp.clone(),
            enrollment_token_file: Some("/run/x/enrollment-token".into()),
            report_interval_secs: 2,
        });
        let text = c.clone().with_controller(c.controller.clone().unwrap()).render();
        assert_eq!(text.matches("name = \"mgmt0\"").count(), 1, "added once: {text}");
        assert!(
            text.contains(
                "[[port]]\nname = \"mgmt0\"\nrole = \"management\"\nxdp_mode = \"native\"\n"
            ),
            "{text}"
        );
        let expected_tail = format!(
            "[controller]\nurl = \"https://10.90.0.100:8443\"\nca_fingerprint = \"{fp}\"\n\
             enrollment_token_file = \"/run/x/enrollment-token\"\nreport_interval_secs = 2\n"
        );
        assert!(text.ends_with(&expected_tail), "{text}");
    }

    #[test]
    fn config_options_render() {
        let mut c = AgentConfig::for_lab("al");
        c.max_flows = Some(1024);
        c.log_format = LogFormat::Json;
        c.enable_forwarding = false;
        c.name = "quote\"and\\slash".into();
        let text = c.render();
        assert!(text.contains("max_flows = 1024\n"));
        assert!(text.contains("format = \"json\"\n"));
        assert!(text.contains("enable_forwarding = false\n"));
        assert!(text.contains("name = \"quote\\\"and\\\\slash\"\n"), "{text}");
    }

    #[test]
    fn stats_parse_and_summarize() {
        let json = r#"{"reasons": {"pass_flow": {"packets": 3, "bytes": 180},
                       "drop_no_flow": {"packets": 7, "bytes": 420},
                       "drop_vlan": {"packets": 0, "bytes": 0}}, "flows": 2}"#;
        let s = AgentStats::parse(json).expect("parses");
        assert_eq!(s.packets("pass_flow"), 3);
        assert_eq!(s.packets("drop_arp"), 0);
        assert_eq!(s.summary(), "flows=2 drop_no_flow=7 pass_flow=3");
        assert!(AgentStats::parse("{").is_err());
    }
}
