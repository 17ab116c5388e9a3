//! Drop events from the kernel's ring buffer, decoded for logs and kept,
//! the newest [`RECENT_DROPS`] of them, for the controller's reports with
//! the cause of each (`default deny`, the rule of an expired entry, or the
//! parser's reason in plain words). Addresses and ports only, never payload.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use airlock_ebpf_common::layout::{DropEvent, PortRole, Reason};
use airlock_policy::FlowEntry;
use airlock_proto::agent::{DropRecord, RECENT_DROPS};

/// A decoded drop event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drop {
    /// Why.
    pub reason: &'static str,
    /// Ingress interface index.
    pub ifindex: u32,
    /// Ingress role.
    pub role: &'static str,
    /// Source address, when the frame was parsed as IP.
    pub src: Option<IpAddr>,
    /// Destination (or ARP/ND target) address.
    pub dst: Option<IpAddr>,
    /// IP protocol (0 when unknown).
    pub proto: u8,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Ethertype.
    pub ethertype: u16,
    /// Frame length.
    pub len: u32,
}

/// Decodes a ring-buffer record; `None` when it is not a `DropEvent`.
pub fn decode(bytes: &[u8]) -> Option<Drop> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: length checked; DropEvent is plain old data, read unaligned.
    let e: DropEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr = |b: [u8; 16]| match e.family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    };
    Some(Drop {
        reason: Reason::from_u32(e.reason).map_or("unknown", Reason::as_str),
        ifindex: e.ifindex,
        role: PortRole::from_u8(e.role).map_or("unknown", PortRole::as_str),
        src: addr(e.src).filter(|a| !a.is_unspecified()),
        dst: addr(e.dst),
        proto: e.proto,
        sport: u16::from_be_bytes(e.sport),
        dport: u16::from_be_bytes(e.dport),
        ethertype: u16::from_be_bytes(e.ethertype),
        len: e.len,
    })
}

/// What caused a drop, as an operator reads it. `expired_rule` is the rule
/// of the entry an expired drop matched (see [`matching_rule`]), if the
/// entry was still there to ask.
pub fn cause(reason: &str, expired_rule: Option<u32>) -> String {
    let plain = match reason {
        "drop_no_flow" => "default deny",
        "drop_expired" => {
            return expired_rule.map_or_else(
                || "expired entry (already removed)".to_owned(),
                |id| format!("rule {id}"),
            )
        }
        "drop_truncated" => "truncated frame",
        "drop_vlan" => "VLAN-tagged frame",
        "drop_ethertype" => "unknown ethertype",
        "drop_ipv4_options" => "IPv4 header with options",
        "drop_ip_header" => "malformed IP header",
        "drop_fragment" => "IP fragment",
        "drop_ipv6_ext" => "IPv6 extension header",
        "drop_l4_proto" => "unsupported transport protocol",
        "drop_arp" => "ARP not addressed to the appliance",
        "drop_nd" => "neighbour discovery not allowed",
        "drop_icmp_type" => "ICMP type not allowed",
        "drop_reply_syn" => "connection opened from the reply side",
        "drop_reply_port" => "reply to a port below the reply floor",
        "drop_wrong_port" => "entered on the wrong port",
        _ => "unknown reason",
    };
    plain.to_owned()
}

/// The rule of the entry `d` matched: its forward key (src, dst, proto,
/// dport) or its reply key (addresses swapped, the source port as the
/// service port).
pub fn matching_rule<'a>(
    d: &Drop,
    entries: impl IntoIterator<Item = &'a FlowEntry>,
) -> Option<u32> {
    let (src, dst) = (d.src?, d.dst?);
    entries.into_iter().find_map(|e| {
        let f = &e.flow;
        if f.protocol().number(f.src().is_ipv6()) != d.proto {
            return None;
        }
        let port = |p: u16| f.port().is_none_or(|fp| fp == p);
        let forward = f.src() == src && f.dst() == dst && port(d.dport);
        let reply = e.allow_reply && f.src() == dst && f.dst() == src && port(d.sport);
        (forward || reply).then_some(e.rule_id)
    })
}

/// The report's record of a drop read at Unix time `at` on port `port`.
pub fn record(d: &Drop, at: u64, port: String, cause: String) -> DropRecord {
    DropRecord {
        at,
        reason: d.reason.to_owned(),
        cause,
        port,
        src: d.src.map(|a| a.to_string()),
        dst: d.dst.map(|a| a.to_string()),
        proto: d.proto,
        dport: d.dport,
    }
}

/// The newest drop records, oldest first, at most [`RECENT_DROPS`].
#[derive(Debug, Clone, Default)]
pub struct RecentDrops {
    ring: VecDeque<DropRecord>,
}

impl RecentDrops {
    /// Adds `r`, forgetting the oldest when full.
    pub fn push(&mut self, r: DropRecord) {
        if self.ring.len() == RECENT_DROPS {
            self.ring.pop_front();
        }
        self.ring.push_back(r);
    }

    /// The records, newest last.
    pub fn to_vec(&self) -> Vec<DropRecord> {
        self.ring.iter().cloned().collect()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// None yet.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_policy::{Expiry, Flow, Ingress, Protocol};

    fn tcp_drop(reason: &'static str, src: &str, dst: &str, sport: u16, dport: u16) -> Drop {
        Drop {
            reason,
            ifindex: 3,
            role: "patient",
            src: Some(src.parse().expect("ip")),
            dst: Some(dst.parse().expect("ip")),
            proto: 6,
            sport,
            dport,
            ethertype: 0x0800,
            len: 74,
        }
    }

    fn entry(rule_id: u32, src: &str, dst: &str, port: u16) -> FlowEntry {
        FlowEntry {
            flow: Flow::new(
                src.parse().expect("ip"),
                dst.parse().expect("ip"),
                Protocol::Tcp,
                Some(port),
            )
            .expect("flow"),
            rule_id,
            policy_version: 1,
            ingress: Ingress::Patient,
            allow_reply: true,
            expiry: Expiry::At(1),
        }
    }

    #[test]
    fn causes_are_default_deny_the_rule_or_plain_words() {
        assert_eq!(cause("drop_no_flow", None), "default deny");
        assert_eq!(cause("drop_expired", Some(7)), "rule 7");
        assert_eq!(cause("drop_expired", None), "expired entry (already removed)");
        assert_eq!(cause("drop_ethertype", None), "unknown ethertype");
        assert_eq!(cause("drop_truncated", None), "truncated frame");
        assert_eq!(cause("drop_fragment", None), "IP fragment");
        assert_eq!(cause("unknown", None), "unknown reason");
        // Every drop reason the dataplane has is described, none as "unknown".
        for r in (0..64).filter_map(Reason::from_u32) {
            if r.as_str().starts_with("drop_") {
                assert_ne!(cause(r.as_str(), None), "unknown reason", "{}", r.as_str());
            }
        }
    }

    #[test]
    fn an_expired_drop_finds_its_rule_forward_and_reply() {
        let entries =
            [entry(3, "10.77.0.12", "10.78.0.100", 22), entry(7, "10.77.0.11", "10.78.0.100", 443)];
        let fwd = tcp_drop("drop_expired", "10.77.0.11", "10.78.0.100", 40000, 443);
        assert_eq!(matching_rule(&fwd, &entries), Some(7));
        let reply = tcp_drop("drop_expired", "10.78.0.100", "10.77.0.11", 443, 40000);
        assert_eq!(matching_rule(&reply, &entries), Some(7));
        let other = tcp_drop("drop_expired", "10.77.0.11", "10.78.0.100", 40000, 80);
        assert_eq!(matching_rule(&other, &entries), None);
        let mut udp = fwd.clone();
        udp.proto = 17;
        assert_eq!(matching_rule(&udp, &entries), None);
        let mut no_reply = entries[1];
        no_reply.allow_reply = false;
        assert_eq!(matching_rule(&reply, [&no_reply]), None);
    }

    #[test]
    fn the_ring_keeps_the_newest_in_order() {
        let mut ring = RecentDrops::default();
        assert!(ring.is_empty());
        let d = tcp_drop("drop_no_flow", "10.77.0.12", "10.78.0.100", 40000, 443);
        for at in 0..(RECENT_DROPS as u64 + 5) {
            ring.push(record(&d, at, "patient0".into(), cause(d.reason, None)));
        }
        assert_eq!(ring.len(), RECENT_DROPS);
        let v = ring.to_vec();
        assert_eq!(v.first().map(|r| r.at), Some(5));
        assert_eq!(v.last().map(|r| r.at), Some(RECENT_DROPS as u64 + 4));
        let r = &v[0];
        assert_eq!((r.port.as_str(), r.cause.as_str()), ("patient0", "default deny"));
        assert_eq!((r.src.as_deref(), r.dst.as_deref()), (Some("10.77.0.12"), Some("10.78.0.100")));
        assert_eq!((r.proto, r.dport, r.reason.as_str()), (6, 443, "drop_no_flow"));
    }

    #[test]
    fn decodes_events() {
        let mut e = DropEvent {
            reason: Reason::DropNoFlow as u32,
            ifindex: 3,
            role: PortRole::Patient as u8,
            family: 4,
            proto: 6,
            sport: 40000u16.to_be_bytes(),
            dport: 443u16.to_be_bytes(),
            ethertype: 0x0800u16.to_be_bytes(),
            len: 74,
            ..DropEvent::default()
        };
        e.src[..4].copy_from_slice(&[10, 77, 0, 11]);
        e.dst[..4].copy_from_slice(&[10, 78, 0, 100]);
        // SAFETY: plain old data viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const DropEvent).cast::<u8>(),
                std::mem::size_of::<DropEvent>(),
            )
        };
        let d = decode(bytes).expect("decodes");
        assert_eq!(d.reason, "drop_no_flow");
        assert_eq!(d.src, Some("10.77.0.11".parse().expect("ip")));
        assert_eq!((d.sport, d.dport, d.role), (40000, 443, "patient"));
        assert!(decode(&bytes[..10]).is_none());
    }
}
