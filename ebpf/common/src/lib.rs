//! Shared between the Airlock XDP programs (kernel side) and the agent (user side).
//!
//! What this crate is:
//! - the `#[repr(C)]` layouts of every map key, map value and ring-buffer event
//!   ([`layout`]), with addresses and ports kept as network-order byte arrays;
//! - the packet parser ([`parse`]) and the verdict logic ([`verdict`]) as plain
//!   functions over a [`parse::Packet`] byte source, so that the exact code the
//!   kernel runs is unit-tested on the host.
//!
//! What it is not: it does no map I/O, reads no clock and allocates nothing. The
//! kernel crate (`airlock-ebpf`) supplies map lookups and the time; the agent
//! supplies them in userspace. With the `user` feature the layouts also implement
//! `aya::Pod` so the agent can put them into maps.
//!
//! ```text
//!  frame bytes ──parse_into()──▶ Frame ──decide(table, now)──▶ Decision { action, reason, hit }
//!                 │ Err(Reason)                                   │
//!                 └──────────────▶ DROP, counted by reason ◀──────┘
//! ```
#![no_std]
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(any(test, feature = "host"))]
pub mod host;
pub mod layout;
pub mod parse;
pub mod verdict;

pub use layout::*;
pub use parse::{parse, parse_into, Frame, FrameKind, Packet};
pub use verdict::{decide, Action, Decision, Direction, FlowTable};

#[cfg(test)]
mod tests;
