//! The agent's TOML configuration: which ports, which roles, where the pins live.
//!
//! Parsing collects every problem at once ([`ConfigErrors`]), each naming the
//! field it is about, so an operator fixes a file in one pass.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use airlock_ebpf_common::layout::{PortRole, DEFAULT_MAX_FLOWS};
use serde::Deserialize;

/// Default config path on an appliance.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/airlock/agent.toml";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Identity and pin location.
    pub appliance: ApplianceConfig,
    /// The ports the boundary is enforced on.
    #[serde(rename = "port")]
    pub ports: Vec<PortConfig>,
    /// Dataplane tuning.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The controller (absent: policies are local files only).
    #[serde(default)]
    pub controller: Option<ControllerConfig>,
    /// Image updates offered by the controller.
    #[serde(default)]
    pub update: UpdateConfig,
}

/// `[update]`: A/B image updates the controller offers in its answer to a
/// report. They are downloaded over the agent's mTLS connection, checked, and
/// installed on the inactive slot like `airlock-agent update apply`; the
/// dataplane is never touched by them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// Take offered updates (false: offers are ignored and reported as such).
    pub enabled: bool,
    /// Where a bundle is downloaded to (`<release>.bundle.part`, renamed to
    /// `<release>.bundle` once its size and SHA-256 match the offer, removed
    /// after it was applied). Default `<appliance.state_dir>/update`.
    pub download_dir: Option<PathBuf>,
    /// Run after an update was installed, to boot it. Empty: do not reboot;
    /// the installed release is reported as pending until the next boot.
    pub reboot_command: Vec<String>,
    /// Test stand-in only (cargo feature `update-fixture`): a directory that
    /// prefixes every path of the running system the updater reads or writes
    /// (see [`UpdateConfig::system`]), so a lab host without an A/B disk can
    /// run the whole flow against file-backed partitions. Refused otherwise.
    pub system_root: Option<PathBuf>,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            download_dir: None,
            reboot_command: vec!["systemctl".to_owned(), "reboot".to_owned()],
            system_root: None,
        }
    }
}

/// Whether this build accepts `[update] system_root` (the `update-fixture`
/// cargo feature, a test stand-in that the image build never enables).
pub const UPDATE_FIXTURE: bool = cfg!(feature = "update-fixture");

impl UpdateConfig {
    /// The download directory for a state directory.
    pub fn download_dir(&self, state_dir: &Path) -> PathBuf {
        self.download_dir.clone().unwrap_or_else(|| state_dir.join("update"))
    }

    /// The running system's paths: the appliance's, or with `system_root`
    /// (only in an `update-fixture` build) each of them below that directory:
    /// `<root>/proc/cmdline`, `<root>/usr/share/airlock/release`,
    /// `<root>/usr/share/airlock/image-signing.pub`, `<root>/efi/EFI/Linux`
    /// and `<root>/dev/disk/by-partlabel` (files named `airlock-root-a`,
    /// `airlock-root-b` stand in for the partitions).
    pub fn system(&self) -> crate::update::System {
        let sys = crate::update::System::default();
        #[cfg(feature = "update-fixture")]
        if let Some(root) = &self.system_root {
            let under = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
            return crate::update::System {
                uki_dir: under(&sys.uki_dir),
                public_key: under(&sys.public_key),
                release_file: under(&sys.release_file),
                cmdline: under(&sys.cmdline),
                partitions: under(&sys.partitions),
            };
        }
        sys
    }
}

/// `[controller]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The main HTTPS listener, e.g. `https://10.90.0.1:8443` (enrollment).
    pub url: String,
    /// The controller CA's fingerprint, `sha256:<hex>`: the only trust at enrollment.
    pub ca_fingerprint: String,
    /// First-boot provisioning: when this file exists and the agent is not
    /// enrolled, `run` enrolls with the token in it, then deletes it.
    #[serde(default)]
    pub enrollment_token_file: Option<PathBuf>,
    /// Seconds between health reports.
    #[serde(default = "default_report_interval")]
    pub report_interval_secs: u64,
}

fn default_report_interval() -> u64 {
    10
}

/// `[appliance]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// A name for logs.
    pub name: String,
    /// Directory on a bpffs where programs' maps and links are pinned.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Directory of the local state store (the last-known-good policy).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/airlock")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/airlock")
}

/// `[[port]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Interface name in the agent's network namespace.
    pub name: String,
    /// Which side of the boundary it faces.
    pub role: Role,
    /// How to attach XDP.
    #[serde(default)]
    pub xdp_mode: XdpModeConfig,
}

/// Port role as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Faces the patient network.
    Patient,
    /// Faces the uplink.
    Uplink,
    /// The management network: carries only the agent's own connection to
    /// its controller (traffic to and from the appliance's own address on
    /// it); nothing is forwarded from or to it, on either layer.
    Management,
}

impl From<Role> for PortRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Patient => PortRole::Patient,
            Role::Uplink => PortRole::Uplink,
            Role::Management => PortRole::Management,
        }
    }
}

/// XDP attach mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Driver mode, falling back to generic when the driver lacks XDP.
    #[default]
    Auto,
    /// Driver (native) mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Capacity of each flow map (IPv4 and IPv6).
    pub max_flows: u32,
    /// Drop events per CPU per second; the rest are only counted.
    pub events_per_second: u32,
    /// Turn on IP forwarding once every port enforces (and never before).
    pub enable_forwarding: bool,
    /// Replies must go to ports at or above this (client ephemeral ports).
    pub reply_min_port: u16,
    /// How often expired entries are removed from the maps (seconds). The
    /// kernel already refuses them; this only frees the slots.
    pub gc_interval_secs: u64,
    /// Enforce applied policies a second time with nftables (own `inet
    /// airlock` table). Manual `flow add` entries are eBPF-only.
    pub nftables: bool,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_MAX_FLOWS,
            events_per_second: 200,
            enable_forwarding: true,
            reply_min_port: 1024,
            gc_interval_secs: 5,
            nftables: true,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Seconds between counter summaries.
    pub counters_interval_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, counters_interval_secs: 10 }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Where: a field path like `port[1].name`, or `line 3, column 7`.
    pub at: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file, when read from one.
    pub path: Option<PathBuf>,
    /// The problems, in file order.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        match &self.path {
            Some(p) => write!(f, "{}: {n} problem{}", p.display(), if n == 1 { "" } else { "s" })?,
            None => write!(f, "{n} configuration problem{}", if n == 1 { "" } else { "s" })?,
        }
        for i in &self.issues {
            write!(f, "\n  {}: {}", i.at, i.message)?;
        }
        Ok(())
    }
}

/// Reading the file failed before parsing.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// I/O.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Syntax or semantic problems.
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, str::len) + 1;
    format!("line {line}, column {col}")
}

impl AgentConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|mut e| {
            e.path = Some(path.to_owned());
            LoadError::Invalid(e)
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigErrors {
            path: None,
            issues: vec![ConfigIssue {
                at: e.span().map_or_else(|| "file".to_owned(), |s| line_col(text, s.start)),
                message: e.message().to_owned(),
            }],
        })?;
        let issues = cfg.issues();
        if issues.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors { path: None, issues })
        }
    }

    /// Semantic checks; empty when the configuration is usable.
    pub fn issues(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let mut issue =
            |at: String, message: &str| out.push(ConfigIssue { at, message: message.to_owned() });
        if self.appliance.name.trim().is_empty() {
            issue("appliance.name".into(), "must not be empty");
        }
        if !self.appliance.pin_dir.is_absolute() {
            issue(
                "appliance.pin_dir".into(),
                "must be an absolute path on a bpffs (e.g. /sys/fs/bpf/airlock)",
            );
        }
        if !self.appliance.state_dir.is_absolute() {
            issue("appliance.state_dir".into(), "must be an absolute path (e.g. /var/lib/airlock)");
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let n = &p.name;
            if n.is_empty()
                || n.len() > 15
                || n.contains(['/', ':'])
                || n.chars().any(char::is_whitespace)
                || n == "."
                || n == ".."
            {
                issue(
                    format!("port[{i}].name"),
                    "must be an interface name: 1-15 characters, no '/', ':' or spaces",
                );
            } else if !names.insert(n.as_str()) {
                issue(format!("port[{i}].name"), "names the same interface as an earlier port");
            }
        }
        for (role, what) in [(Role::Patient, "patient"), (Role::Uplink, "uplink")] {
            if !self.ports.iter().any(|p| p.role == role) {
                issue(
                    "port".into(),
                    match what {
                        "patient" => {
                            "no port with role = \"patient\": the boundary needs its patient side"
                        }
                        _ => "no port with role = \"uplink\": the boundary needs its uplink side",
                    },
                );
            }
        }
        let d = &self.dataplane;
        if !(1..=4_194_304).contains(&d.max_flows) {
            issue("dataplane.max_flows".into(), "must be between 1 and 4194304");
        }
        if d.events_per_second > 100_000 {
            issue(
                "dataplane.events_per_second".into(),
                "must be at most 100000 (events cost CPU under floods)",
            );
        }
        if d.reply_min_port < 1024 {
            issue(
                "dataplane.reply_min_port".into(),
                "must be at least 1024: replies may never reach privileged ports",
            );
        }
        if !(1..=86_400).contains(&d.gc_interval_secs) {
            issue("dataplane.gc_interval_secs".into(), "must be between 1 and 86400");
        }
        if !(1..=86_400).contains(&self.log.counters_interval_secs) {
            issue("log.counters_interval_secs".into(), "must be between 1 and 86400");
        }
        let u = &self.update;
        if u.download_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            issue("update.download_dir".into(), "must be an absolute path");
        }
        if u.reboot_command.iter().any(|a| a.is_empty() || a.contains('\0')) {
            issue(
                "update.reboot_command".into(),
                "must be a list of non-empty arguments, e.g. [\"systemctl\", \"reboot\"] \
                 (an empty list: do not reboot)",
            );
        }
        match &u.system_root {
            Some(_) if !UPDATE_FIXTURE => issue(
                "update.system_root".into(),
                "is a test stand-in: only an agent built with the cargo feature \
                 update-fixture accepts it; an appliance updates its real system",
            ),
            Some(r) if !r.is_absolute() => {
                issue("update.system_root".into(), "must be an absolute path")
            }
            _ => {}
        }
        if let Some(c) = &self.controller {
            if crate::controller::client::Endpoint::parse(&c.url).is_err() {
                issue(
                    "controller.url".into(),
                    "must be https://HOST[:PORT] (the controller's main listener), no path",
                );
            }
            if airlock_proto::parse_fingerprint(&c.ca_fingerprint).is_none() {
                issue(
                    "controller.ca_fingerprint".into(),
                    "must be sha256: followed by 64 hex digits (shown when the token is created)",
                );
            }
            if c.enrollment_token_file.as_ref().is_some_and(|f| !f.is_absolute()) {
                issue("controller.enrollment_token_file".into(), "must be an absolute path");
            }
            if !(1..=3_600).contains(&c.report_interval_secs) {
                issue("controller.report_interval_secs".into(), "must be between 1 and 3600");
            }
        }
        out
    }

    /// The nftables layer's input for a policy version, or `None` when the
    /// layer is off.
    pub fn nft_input(
        &self,
        policy_version: u32,
    ) -> Result<Option<airlock_policy::nft::NftInput>, airlock_policy::nft::NftError> {
        use airlock_policy::{nft::NftInput, Ingress};
        if !self.dataplane.nftables {
            return Ok(None);
        }
        let names =
            |role: Role| self.ports.iter().filter(move |p| p.role == role).map(|p| p.name.clone());
        Ok(Some(
            NftInput::new(policy_version)
                .with_ports(Ingress::Patient, names(Role::Patient))?
                .with_ports(Ingress::Uplink, names(Role::Uplink))?
                .with_reply_min_port(self.dataplane.reply_min_port),
        ))
    }

    /// The directory holding this layout version's pins.
    pub fn pins(&self) -> crate::dataplane::PinLayout {
        crate::dataplane::PinLayout::new(&self.appliance.pin_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[appliance]
name = "lab"
pin_dir = "/sys/fs/bpf/airlock-x"

[[port]]
name = "patient0"
role = "patient"
xdp_mode = "native"

[[port]]
name = "uplink0"
role = "uplink"
"#;

    #[test]
    fn parses_a_good_file_with_defaults() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.ports[0].xdp_mode, XdpModeConfig::Native);
        assert_eq!(c.ports[1].xdp_mode, XdpModeConfig::Auto);
        assert_eq!(c.dataplane, DataplaneConfig::default());
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn reports_every_problem_with_its_place() {
        let bad = r#"
[appliance]
name = ""
pin_dir = "relative"
[[port]]
name = "this-name-is-far-too-long"
role = "patient"
[[port]]
name = "eth0"
role = "patient"
[[port]]
name = "eth0"
role = "patient"
[dataplane]
reply_min_port = 80
max_flows = 0
gc_interval_secs = 9223372036854775807
"#;
        let e = AgentConfig::parse(bad).unwrap_err();
        let at: Vec<_> = e.issues.iter().map(|i| i.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "appliance.name",
                "appliance.pin_dir",
                "port[0].name",
                "port[2].name",
                "port",
                "dataplane.max_flows",
                "dataplane.reply_min_port",
                "dataplane.gc_interval_secs"
            ]
        );
        assert!(e.to_string().contains("8 configuration problems"), "{e}");
    }

    /// The lab (airlock-testbed) writes this format without depending on this
    /// crate; its output must stay valid here.
    #[test]
    fn the_labs_rendering_is_accepted() {
        let text = airlock_testbed::AgentConfig::for_lab("t1").render();
        let c = AgentConfig::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            c.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["patient0", "uplink0"]
        );
        assert_eq!(c.appliance.pin_dir, std::path::Path::new("/sys/fs/bpf/airlock-t1"));
        // The harness unpins links and names the lab appliance itself.
        assert_eq!(c.pins().links(), c.appliance.pin_dir.join(airlock_testbed::LINK_PINS));
        let lab_policy = include_str!("../../policies/lab.toml");
        let (policy, _) = airlock_policy::check_toml(lab_policy).unwrap();
        assert!(policy.appliances.iter().any(|a| a.name == airlock_testbed::LAB_APPLIANCE));
    }

    #[test]
    fn the_controller_section_is_optional_and_checked() {
        assert_eq!(AgentConfig::parse(GOOD).unwrap().controller, None);
        let fp = format!("sha256:{}", "0f".repeat(32));
        let ok = format!(
            "{GOOD}\n[controller]\nurl = \"https://10.90.0.1:8443\"\nca_fingerprint = \"{fp}\"\n"
        );
        let c = AgentConfig::parse(&ok).unwrap().controller.unwrap();
        assert_eq!(c.report_interval_secs, 10);
        assert_eq!(c.enrollment_token_file, None);
        let bad = format!(
            "{GOOD}\n[controller]\nurl = \"http://10.90.0.1\"\nca_fingerprint = \"sha256:12\"\n\
             enrollment_token_file = \"token\"\nreport_interval_secs = 0\n"
        );
        let e = AgentConfig::parse(&bad).unwrap_err();
        let at: Vec<_> = e.issues.iter().map(|i| i.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "controller.url",
                "controller.ca_fingerprint",
                "controller.enrollment_token_file",
                "controller.report_interval_secs"
            ]
        );
        let unknown = format!("{ok}token = \"x\"\n");
        let e = AgentConfig::parse(&unknown).unwrap_err();
        assert!(e.issues[0].message.contains("unknown field"), "{:?}", e.issues);
    }

    #[test]
    fn the_update_section_has_defaults_and_is_checked() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert!(c.update.enabled);
        assert_eq!(c.update.reboot_command, ["systemctl", "reboot"]);
        assert_eq!(
            c.update.download_dir(&c.appliance.state_dir),
            Path::new("/var/lib/airlock/update")
        );
        assert_eq!(c.update.system().cmdline, Path::new("/proc/cmdline"));
        let c = AgentConfig::parse(&format!(
            "{GOOD}\n[update]\nenabled = false\ndownload_dir = \"/data/dl\"\nreboot_command = []\n"
        ))
        .unwrap();
        assert!(!c.update.enabled);
        assert!(c.update.reboot_command.is_empty());
        assert_eq!(c.update.download_dir(Path::new("/x")), Path::new("/data/dl"));

        let e = AgentConfig::parse(&format!(
            "{GOOD}\n[update]\ndownload_dir = \"dl\"\nreboot_command = [\"\", \"now\"]\n"
        ))
        .unwrap_err();
        let at: Vec<_> = e.issues.iter().map(|i| i.at.as_str()).collect();
        assert_eq!(at, ["update.download_dir", "update.reboot_command"]);
        let e = AgentConfig::parse(&format!("{GOOD}\n[update]\nenabled = \"yes\"\n")).unwrap_err();
        assert!(e.issues[0].at.starts_with("line "), "{:?}", e.issues);
        let e = AgentConfig::parse(&format!("{GOOD}\n[update]\nurl = \"x\"\n")).unwrap_err();
        assert!(e.issues[0].message.contains("unknown field"), "{:?}", e.issues);
    }

    #[test]
    fn system_root_needs_the_update_fixture_feature() {
        let text = format!("{GOOD}\n[update]\nsystem_root = \"/tmp/fixture\"\n");
        let parsed = AgentConfig::parse(&text);
        if UPDATE_FIXTURE {
            let sys = parsed.unwrap().update.system();
            assert_eq!(sys.cmdline, Path::new("/tmp/fixture/proc/cmdline"));
            assert_eq!(sys.release_file, Path::new("/tmp/fixture/usr/share/airlock/release"));
            assert_eq!(
                sys.public_key,
                Path::new("/tmp/fixture/usr/share/airlock/image-signing.pub")
            );
            assert_eq!(sys.uki_dir, Path::new("/tmp/fixture/efi/EFI/Linux"));
            assert_eq!(sys.partitions, Path::new("/tmp/fixture/dev/disk/by-partlabel"));
            let e = AgentConfig::parse(&format!("{GOOD}\n[update]\nsystem_root = \"rel\"\n"))
                .unwrap_err();
            assert_eq!(e.issues[0].at, "update.system_root");
        } else {
            let e = parsed.unwrap_err();
            assert_eq!(e.issues.len(), 1, "{:?}", e.issues);
            assert_eq!(e.issues[0].at, "update.system_root");
            assert!(e.issues[0].message.contains("update-fixture"), "{}", e.issues[0].message);
        }
    }

    #[test]
    fn a_management_port_is_neither_side_of_the_boundary() {
        let text = format!("{GOOD}\n[[port]]\nname = \"mgmt0\"\nrole = \"management\"\n");
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(PortRole::from(c.ports[2].role), PortRole::Management);
        let input = c.nft_input(1).unwrap().unwrap();
        for role in [airlock_policy::Ingress::Patient, airlock_policy::Ingress::Uplink] {
            assert!(!input.ports(role).iter().any(|p| p == "mgmt0"), "in no forwarding set");
        }
        // It does not stand in for a side of the boundary.
        let only = "[appliance]\nname = \"x\"\n[[port]]\nname = \"a\"\nrole = \"patient\"\n\
                    [[port]]\nname = \"m\"\nrole = \"management\"\n";
        let e = AgentConfig::parse(only).unwrap_err();
        assert!(e.issues.iter().any(|i| i.message.contains("uplink")), "{:?}", e.issues);
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let e = AgentConfig::parse(
            "[appliance]\nname = \"x\"\n[[port]]\nname = \"a\"\nrole = \"sideways\"\n",
        )
        .unwrap_err();
        assert_eq!(e.issues.len(), 1);
        assert!(e.issues[0].at.starts_with("line 5"), "{:?}", e.issues);
        assert!(e.issues[0].message.contains("unknown variant"), "{:?}", e.issues);
        let e = AgentConfig::parse("[appliance]\nname = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(e.issues[0].message.contains("unknown field"), "{:?}", e.issues);
    }
}
