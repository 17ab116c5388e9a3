//! Airlock hardware profiles: what a gateway box must have to run the
//! appliance image, and which of its ports plays which role.
//!
//! A profile is a TOML file (see `hardware/profiles/`). [`Profile::parse`]
//! reports every problem at once, each with its place (`port[1].role` or
//! `line 7, column 3`), like the agent's configuration. The image build turns a
//! profile into the agent's port list; `airlock-agent hwcheck` checks a box
//! against one. [`sizing`] is the storage model of hardware/SIZING.md.
//!
//! What it is not: it reads no hardware itself (the agent's hwcheck does).

pub mod sizing;

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// One hardware profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name, e.g. `qemu-virtual`.
    pub name: String,
    /// What box this is.
    pub description: String,
    /// Serial console for the kernel command line, e.g. `ttyS0,115200`.
    pub console: String,
    /// Extra kernel command line arguments (never `root=`, `init=` or `airlock.*`).
    #[serde(default)]
    pub kernel_args: Vec<String>,
    /// Whether the box must have a TPM 2.0 (it seals the state key).
    pub tpm: TpmRequirement,
    /// Minimum resources.
    pub minimum: Minimum,
    /// The ports, in kernel order (`eth0`, `eth1`, ... with `net.ifnames=0`).
    #[serde(rename = "port")]
    pub ports: Vec<Port>,
}

/// `tpm = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TpmRequirement {
    /// hwcheck fails without `/dev/tpmrm0`.
    Required,
    /// Used when present.
    Optional,
    /// Not expected (virtual test appliance): the state key is not sealed.
    None,
}

/// `[minimum]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Minimum {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Boot disk in GiB (see SIZING.md for the state partition's share).
    pub storage_gib: u64,
    /// AES instructions (WireGuard does not need them; TLS and LUKS do).
    #[serde(default)]
    pub aes: bool,
}

/// `[[port]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// Interface name on the appliance image (`net.ifnames=0`: eth0, eth1, ...).
    pub name: String,
    /// What the port faces.
    pub role: PortRole,
    /// Kernel driver expected behind it (`igc`, `igb`, `virtio_net`, ...).
    pub driver: String,
    /// XDP attach mode for this port.
    pub xdp: XdpMode,
    /// The label on the box, for technicians ("LAN1").
    #[serde(default)]
    pub label: Option<String>,
}

/// Port role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortRole {
    /// Faces the patient network (enforced).
    Patient,
    /// Faces the uplink (enforced).
    Uplink,
    /// Reaches the controller; not a boundary port.
    Management,
}

impl PortRole {
    /// As written in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            PortRole::Patient => "patient",
            PortRole::Uplink => "uplink",
            PortRole::Management => "management",
        }
    }
}

/// XDP attach mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver: the driver must support XDP.
    Native,
    /// Generic (skb) mode: any driver, slower.
    Generic,
}

impl XdpMode {
    /// As written in TOML (and in the agent's configuration).
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// One problem in a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Where: a field path like `port[1].role`, or `line 3, column 7`.
    pub at: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ProfileErrors {
    /// The file, when read from one.
    pub path: Option<PathBuf>,
    /// The problems, in file order.
    pub issues: Vec<Issue>,
}

impl fmt::Display for ProfileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        let s = if n == 1 { "" } else { "s" };
        match &self.path {
            Some(p) => write!(f, "{}: {n} problem{s} in the hardware profile", p.display())?,
            None => write!(f, "{n} problem{s} in the hardware profile")?,
        }
        for i in &self.issues {
            write!(f, "\n  {}: {}", i.at, i.message)?;
        }
        Ok(())
    }
}

/// Reading a profile failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// I/O.
    #[error("cannot read hardware profile {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Syntax or semantic problems.
    #[error(transparent)]
    Invalid(#[from] ProfileErrors),
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, str::len) + 1;
    format!("line {line}, column {col}")
}

fn is_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && !n.contains(['/', ':'])
        && !n.chars().any(char::is_whitespace)
        && n != "."
        && n != ".."
}

impl Profile {
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
    pub fn parse(text: &str) -> Result<Self, ProfileErrors> {
        let p: Profile = toml::from_str(text).map_err(|e| ProfileErrors {
            path: None,
            issues: vec![Issue {
                at: e.span().map_or_else(|| "file".to_owned(), |s| line_col(text, s.start)),
                message: e.message().to_owned(),
            }],
        })?;
        let issues = p.issues();
        if issues.is_empty() {
            Ok(p)
        } else {
            Err(ProfileErrors { path: None, issues })
        }
    }

    /// Semantic checks; empty when the profile is usable.
    pub fn issues(&self) -> Vec<Issue> {
        let mut out = Vec::new();
        let mut issue = |at: String, message: String| out.push(Issue { at, message });
        if self.name.is_empty()
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            issue(
                "name".into(),
                "must be letters, digits, '-' or '_' (e.g. \"mini-pc-i226\")".into(),
            );
        }
        if self.console.trim().is_empty() || self.console.contains(char::is_whitespace) {
            issue("console".into(), "must be one console like \"ttyS0,115200\"".into());
        }
        for (i, a) in self.kernel_args.iter().enumerate() {
            let key = a.split('=').next().unwrap_or_default();
            if a.is_empty() || a.contains(char::is_whitespace) {
                issue(format!("kernel_args[{i}]"), "must be one argument without spaces".into());
            } else if ["root", "init", "rootfstype", "ro", "rw", "console"].contains(&key)
                || key.starts_with("airlock.")
                || key.starts_with("systemd.")
                || key.starts_with("rd.")
            {
                issue(
                    format!("kernel_args[{i}]"),
                    format!("{key:?} is set by the image itself (root, verity, slot, console)"),
                );
            }
        }
        let m = &self.minimum;
        if m.cpus == 0 {
            issue("minimum.cpus".into(), "must be at least 1".into());
        }
        if m.memory_mib < 512 {
            issue("minimum.memory_mib".into(), "must be at least 512 (the image needs it)".into());
        }
        if m.storage_gib < 2 {
            issue(
                "minimum.storage_gib".into(),
                "must be at least 2: the image alone is about 1 GiB (see SIZING.md)".into(),
            );
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if !is_ifname(&p.name) {
                issue(
                    format!("port[{i}].name"),
                    "must be an interface name: 1-15 characters, no '/', ':' or spaces".into(),
                );
            } else if !names.insert(p.name.as_str()) {
                issue(
                    format!("port[{i}].name"),
                    "names the same interface as an earlier port".into(),
                );
            }
            if p.driver.is_empty()
                || !p.driver.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                issue(
                    format!("port[{i}].driver"),
                    "must be a kernel driver name like \"igc\" or \"virtio_net\"".into(),
                );
            }
        }
        for (role, why) in [
            (PortRole::Patient, "the boundary needs its patient side"),
            (PortRole::Uplink, "the boundary needs its uplink side"),
        ] {
            if !self.ports.iter().any(|p| p.role == role) {
                issue("port".into(), format!("no port with role = \"{}\": {why}", role.as_str()));
            }
        }
        if self.ports.iter().filter(|p| p.role == PortRole::Management).count() > 1 {
            issue("port".into(), "at most one port may have role = \"management\"".into());
        }
        out
    }

    /// The ports the boundary is enforced on (patient and uplink).
    pub fn boundary_ports(&self) -> impl Iterator<Item = &Port> {
        self.ports.iter().filter(|p| p.role != PortRole::Management)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
description = "test"
console = "ttyS0,115200"
tpm = "none"

[minimum]
cpus = 1
memory_mib = 1024
storage_gib = 2

[[port]]
name = "eth0"
role = "patient"
driver = "virtio_net"
xdp = "native"

[[port]]
name = "eth1"
role = "uplink"
driver = "virtio_net"
xdp = "generic"
"#;

    #[test]
    fn parses_a_good_profile() {
        let p = Profile::parse(GOOD).unwrap();
        assert_eq!(p.ports.len(), 2);
        assert_eq!(p.ports[1].xdp, XdpMode::Generic);
        assert!(!p.minimum.aes);
        assert_eq!(p.boundary_ports().count(), 2);
    }

    #[test]
    fn every_problem_with_its_place() {
        let bad = r#"
name = "has space"
description = ""
console = ""
kernel_args = ["root=/dev/sda1", "quiet"]
tpm = "required"
[minimum]
cpus = 0
memory_mib = 100
storage_gib = 1
[[port]]
name = "eth0"
role = "patient"
driver = "igc"
xdp = "native"
[[port]]
name = "eth0"
role = "management"
driver = "bad driver"
xdp = "generic"
[[port]]
name = "eth2"
role = "management"
driver = "igc"
xdp = "generic"
"#;
        let e = Profile::parse(bad).unwrap_err();
        let at: Vec<_> = e.issues.iter().map(|i| i.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "name",
                "console",
                "kernel_args[0]",
                "minimum.cpus",
                "minimum.memory_mib",
                "minimum.storage_gib",
                "port[1].name",
                "port[1].driver",
                "port",
                "port"
            ]
        );
        assert!(e.issues[8].message.contains("uplink"), "{e}");
        assert!(e.to_string().contains("10 problems"), "{e}");
    }

    #[test]
    fn syntax_and_unknown_values_name_line_and_column() {
        let e = Profile::parse(&GOOD.replace("xdp = \"generic\"", "xdp = \"turbo\"")).unwrap_err();
        assert_eq!(e.issues.len(), 1);
        assert_eq!(e.issues[0].at, "line 22, column 7", "{:?}", e.issues);
        assert!(e.issues[0].message.contains("unknown variant"), "{:?}", e.issues);
        let e = Profile::parse(&GOOD.replace("tpm = \"none\"", "tpm = \"none\"\nfans = 3"))
            .unwrap_err();
        assert!(e.issues[0].message.contains("unknown field"), "{:?}", e.issues);
    }

    #[test]
    fn the_shipped_profiles_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                Profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "expected at least two profiles in {}", dir.display());
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_panic() {
        let e = Profile::load(Path::new("/nonexistent/profile.toml")).unwrap_err();
        assert!(e.to_string().contains("cannot read hardware profile"), "{e}");
    }
}
