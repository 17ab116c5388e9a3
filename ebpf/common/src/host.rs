//! A [`FlowTable`] in ordinary memory, for running the kernel's verdict on
//! the host: this crate's tests and the policy crate's property test (the
//! nftables layer must decide like the eBPF layer). Not used by the kernel
//! program or the agent's dataplane.

extern crate alloc;

use alloc::{collections::BTreeMap, vec::Vec};

use crate::{
    layout::{FlowKeyV4, FlowKeyV6, FlowValue, LocalAddrKey},
    verdict::{EntryMeta, FlowTable},
};

/// Flow entries and local addresses, as the kernel's maps would hold them.
#[derive(Debug, Default, Clone)]
pub struct HostTable {
    /// IPv4 entries.
    pub v4: BTreeMap<FlowKeyV4, FlowValue>,
    /// IPv6 entries.
    pub v6: BTreeMap<FlowKeyV6, FlowValue>,
    /// The appliance's own addresses per port.
    pub local: Vec<LocalAddrKey>,
}

impl FlowTable for HostTable {
    type Entry = FlowValue;
    const NO_ENTRY: FlowValue = FlowValue {
        expires_ns: 0,
        packets: 0,
        bytes: 0,
        reply_packets: 0,
        reply_bytes: 0,
        rule_id: 0,
        policy_version: 0,
        ingress: 0,
        flags: 0,
        pad: [0; 6],
    };
    fn get_v4(&self, key: &FlowKeyV4) -> Option<FlowValue> {
        self.v4.get(key).copied()
    }
    fn get_v6(&self, key: &FlowKeyV6) -> Option<FlowValue> {
        self.v6.get(key).copied()
    }
    fn meta(&self, e: FlowValue) -> EntryMeta {
        EntryMeta { expires_ns: e.expires_ns, ingress: e.ingress, flags: e.flags }
    }
    fn is_local(&self, key: &LocalAddrKey) -> bool {
        self.local.contains(key)
    }
}
