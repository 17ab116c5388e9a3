//! Airlock's lab: a simulated hospital in network namespaces, with the real
//! agent enforcing on a simulated appliance. The end-to-end tests and
//! `cargo xtask lab` both build on it.
//!
//! ```text
//!  p1 ─┐                                    ┌──────────── appliance ───────────┐
//!      ├─ patient switch (bridge) ─ patient0│ XDP boundary, airlock-agent      │uplink0 ─ ext
//!  p2 ─┘   10.77.0.0/24, fd00:a1:77::/64    └──────────────────────────────────┘ 10.78.0.0/24
//! ```
//!
//! - [`NetNs`]: one named network namespace, deleted on drop; run closures
//!   (std sockets) or programs inside it.
//! - [`Topology`]: the namespaces `<prefix>-p1`, `-p2`, `-psw`, `-app`, `-ext`
//!   and their cables; built fail-closed (appliance forwarding off until the
//!   agent enforces); deleted on drop.
//! - [`Agent`]: `airlock-agent run` in the appliance namespace, its CLI
//!   (flows, stats), restart and signals; detached and cleaned up on drop.
//! - [`Lab`]: both together. [`LabStatus`]: the stable JSON of `lab status`.
//!
//! What it is not: it checks no Airlock behaviour itself (the tests do) and
//! needs root (namespaces, bpffs, XDP). Everything it creates is named from
//! a prefix, so labs run side by side and leftovers can be found and removed
//! ([`Topology::destroy_by_prefix`]).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod agent;
mod agent_formats;
mod cmd;
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
    AgentConfig, AgentStats, Counter, LogFormat, PortConfig, PortRole, XdpMode,
};
pub use error::{Error, Result};
pub use host::{agent_bin, bpffs_mounted, ensure_bpffs, target_dir, workspace_root, BPFFS};
pub use lab::{Lab, LabOptions};
pub use names::unique_prefix;
pub use netns::NetNs;
pub use status::{
    AgentStatus, HostStatus, InterfaceStatus, LabState, LabStatus, NamespaceStatus, STATUS_SCHEMA,
};
pub use topology::{addr, Node, Role, Topology, BRIDGE, HOST_IF, PATIENT_PORT, UPLINK_PORT};
