//! `airlock-agent`: the appliance daemon and its command line.
//!
//! What it is: the userspace half of the patient-network boundary. It loads the
//! XDP programs (embedded at build time), pins programs' links and maps in
//! bpffs, attaches one program per port role, writes flow entries, refills the
//! drop-event budget, logs counters and drop events, and frees expired entries.
//!
//! What it is not: the enforcer. The kernel enforces — default drop, exact
//! entries, expiry checked against the kernel's monotonic clock — whether the agent runs or
//! not. A crashed or stopped agent changes nothing on the wire.
//!
//! ```text
//!  config.rs ─▶ dataplane.rs (load, pin, attach/replace, detach)
//!                   │
//!                   ▼
//!               maps.rs (flows, stats, settings, budget, local addrs) ◀── CLI: flow / stats
//!                   │
//!  events.rs ◀── ring buffer                clock.rs: CLOCK_MONOTONIC, durations
//! ```

pub mod applier;
pub mod clock;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod events;
pub mod fault;
pub mod hwcheck;
pub mod maps;
pub mod netif;
pub mod nft_netlink;
pub mod nftables;
pub mod policy_cmd;
pub mod store;
pub mod tc_guard;
pub mod update;
