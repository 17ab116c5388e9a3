//! Airlock's lab: a simulated hospital in network namespaces, with the real
//! agent enforcing on a simulated appliance. The end-to-end tests and
//! `cargo xtask lab` both build on it.
//!
//! ```text
//!  p1 ─┐                                    ┌──────────── appliance ───────────┐
//!      ├─ patient switch (bridge) ─ patient0│ XDP boundary, airlock-agent      │uplink0 ─ ext
//!  p2 ─┘   10.77.0.0/24, fd00:a1:77::/64    └───────────────┬──────────────────┘ 10.78.0.0/24
//!                                                        mgmt0 10.90.0.0/24
//!                                                      ctl: airlock-controller (optional)
//! ```
//!
//! - [`NetNs`]: one named network namespace, deleted on drop; run closures
//!   (std sockets) or programs inside it.
//! - [`Topology`]: the namespaces `<prefix>-p1`, `-p2`, `-psw`, `-app`, `-ext`
//!   (and `-ctl` with a controller) and their cables; built fail-closed
//!   (appliance forwarding off until the agent enforces); deleted on drop.
//! - [`Agent`]: `airlock-agent run` in the appliance namespace, its CLI
//!   (flows, stats), restart and signals; detached and cleaned up on drop.
//! - [`Controller`]: `airlock-controller serve` in the controller namespace;
//!   [`ControllerApi`]: an HTTPS client for its admin API, pinned to its CA.
//! - [`Browser`]: headless Chromium through chromedriver (WebDriver), trusting
//!   the controller's CA for real, for the web UI's tests; screenshots under
//!   `target/ui-artifacts/`.
//! - [`Lab`]: all together; with a controller the appliance enrolls itself
//!   and enforces the controller's policy. [`LabStatus`]: the stable JSON of
//!   `lab status`.
//!
//! What it is not: it checks no Airlock behaviour itself (the tests do) and
//! needs root (namespaces, bpffs, XDP). Everything it creates is named from
//! a prefix, so labs run side by side and leftovers can be found and removed
//! ([`Topology::destroy_by_prefix`]).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod agent;
mod agent_formats;
pub mod browser;
mod cmd;
mod controller;
mod controller_api;
mod error;
mod host;
mod lab;
pub mod names;
mod netns;
mod status;
mod topology;

pub use agent::{
    Agent, AgentOptions, AgentRecord, Signal, DEFAULT_READY_TIMEOUT, LAB_APPLIANCE, LINK_PINS,
};
pub use agent_formats::{
    AgentConfig, AgentStats, ControllerSection, Counter, LogFormat, PortConfig, PortRole, XdpMode,
};
/// The controller's admin API types the harness returns.
pub use airlock_proto::admin::{
    ApplianceImage, ApplianceState, ApplianceView, EnrollmentToken, PolicyVersionSummary,
    ReleasesOverview, RolloutProgress, RolloutView,
};
pub use browser::{Browser, BrowserOptions, Element};
pub use controller::{
    Controller, ControllerOptions, ControllerRecord, ADMIN_USER, CONTROLLER_READY_TIMEOUT,
};
pub use controller_api::{is_applied, ControllerApi, Secret};
pub use error::{Error, Result};
pub use host::{
    agent_bin, bpffs_mounted, controller_bin, ensure_bpffs, target_dir, workspace_root, BPFFS,
};
pub use lab::{Lab, LabOptions, PendingLab, DEFAULT_CONVERGE_TIMEOUT};
pub use names::unique_prefix;
pub use netns::NetNs;
pub use status::{
    AgentStatus, ControllerStatus, HostStatus, InterfaceStatus, LabState, LabStatus,
    NamespaceStatus, STATUS_SCHEMA,
};
pub use topology::{
    addr, Node, Role, Topology, TopologyOptions, BRIDGE, HOST_IF, HOST_LINK_IF, MGMT_PORT,
    PATIENT_PORT, UPLINK_PORT,
};
