//! The pure core Airlock's agent and (later) controller share.
//!
//! Today it holds the [`Flow`] — an exact (source, destination, protocol,
//! destination port) allowance — and the [`FlowEntry`] that places one in the
//! dataplane with its rule id, policy version and expiry, plus the lossless
//! conversion to and from the eBPF map layouts of `airlock-ebpf-common`.
//! The policy model, its validation and the compiler to eBPF entries and
//! nftables rulesets grow here next.
//!
//! What it is not: it does no I/O and reads no clock. Expiry instants are
//! CLOCK_MONOTONIC nanoseconds handed in by the caller.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod flow;

pub use flow::{Expiry, Flow, FlowEntry, FlowError, Ingress, MapEntry, Protocol};
