//! Empty library target: it lets the agent name this crate as a build
//! dependency (so cargo rebuilds the agent when the programs change). The
//! programs themselves are the binary target, built for bpfel-unknown-none.
#![no_std]
