//! Map keys, values, events and names shared by the kernel and the agent.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields so that no byte of a
//! key is left uninitialised (the kernel hashes all of them). Addresses and ports
//! are network-order byte arrays; accessors convert.

/// Bumped whenever a pinned map's layout changes; it is part of the pin directory
/// so an agent never reuses a map written with another layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Map names (at most 15 bytes: the kernel's object-name limit).
pub mod map_names {
    /// IPv4 flow entries: [`super::FlowKeyV4`] → per-CPU [`super::FlowValue`].
    pub const FLOWS_V4: &str = "FLOWS_V4";
    /// IPv6 flow entries: [`super::FlowKeyV6`] → per-CPU [`super::FlowValue`].
    pub const FLOWS_V6: &str = "FLOWS_V6";
    /// Per-CPU counters indexed by [`super::Reason`]: [`super::Counter`].
    pub const STATS: &str = "STATS";
    /// Ring buffer of [`super::DropEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU drop-event budget (u32) refilled by the agent every second.
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    /// The appliance's own addresses per port: [`super::LocalAddrKey`] → u8.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// One [`super::Settings`] at index 0.
    pub const SETTINGS: &str = "SETTINGS";
}

/// Program names in the object file.
pub mod program_names {
    /// XDP program for ports facing the patient network.
    pub const PATIENT: &str = "airlock_patient";
    /// XDP program for ports facing the uplink (towards WireGuard and the outside).
    pub const UPLINK: &str = "airlock_uplink";
    /// XDP program for management ports (the agent's own link to its controller).
    pub const MANAGEMENT: &str = "airlock_management";
    /// tc egress program for management ports: only the appliance's own
    /// packets leave through them (nothing forwarded).
    pub const MANAGEMENT_EGRESS: &str = "airlock_management_egress";
    /// An XDP program that only returns DROP: the benchmark's baseline.
    pub const BASELINE: &str = "airlock_baseline";
    /// The patient program without drop events (benchmark reference only).
    pub const SILENT: &str = "airlock_silent";
}

/// Default size of each flow map; the agent may override it at load time.
pub const DEFAULT_MAX_FLOWS: u32 = 131_072;
/// Size of the drop-event ring buffer in bytes (a power of two, page multiple).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Size of the local-address map.
pub const MAX_LOCAL_ADDRS: u32 = 256;

/// The role of the port a packet entered on. Each role has its own XDP program
/// so the role is a compile-time constant in the kernel.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRole {
    /// Faces the patient network.
    Patient = 1,
    /// Faces the uplink (the WireGuard side).
    Uplink = 2,
    /// The management network: carries only the appliance's own traffic (the
    /// agent's connection to its controller). Nothing entering it passes
    /// unless it is addressed to the appliance's own address on that port and
    /// answers a management entry; it is on neither side of the boundary.
    Management = 3,
}

impl PortRole {
    /// Decodes the byte stored in [`FlowValue::ingress`].
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Patient),
            2 => Some(Self::Uplink),
            3 => Some(Self::Management),
            _ => None,
        }
    }

    /// The other side of the boundary: where an entry's replies enter. A
    /// management entry's forward direction is the appliance's own output
    /// and its replies enter on the management port: its own opposite.
    pub const fn opposite(self) -> Self {
        match self {
            Self::Patient => Self::Uplink,
            Self::Uplink => Self::Patient,
            Self::Management => Self::Management,
        }
    }

    /// Lower-case name used in configuration and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "patient",
            Self::Uplink => "uplink",
            Self::Management => "management",
        }
    }
}

/// Why a packet passed or was dropped. The discriminant indexes the `STATS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Matched a flow entry in its forward direction.
    PassFlow = 0,
    /// Matched a flow entry as its reply.
    PassReply = 1,
    /// ARP request or reply addressed to the appliance itself on that port.
    PassArp = 2,
    /// IPv6 neighbour solicitation or advertisement that stays on the link.
    PassNd = 3,
    /// No flow entry (default deny).
    DropNoFlow = 4,
    /// The matching entry has expired (checked against CLOCK_MONOTONIC).
    DropExpired = 5,
    /// A header ends beyond the frame.
    DropTruncated = 6,
    /// 802.1Q / 802.1ad tagged frame.
    DropVlan = 7,
    /// Ethertype other than IPv4, IPv6 or ARP.
    DropEthertype = 8,
    /// IPv4 header with options (IHL > 5).
    DropIpv4Options = 9,
    /// Malformed IP header (version, IHL < 5, length fields, reserved flag).
    DropIpHeader = 10,
    /// IPv4 fragment (MF set or non-zero offset) or IPv6 fragment header.
    DropFragment = 11,
    /// IPv6 extension header (hop-by-hop, routing, destination options, ...).
    DropIpv6Ext = 12,
    /// Transport protocol other than TCP, UDP, ICMP or ICMPv6.
    DropL4Proto = 13,
    /// ARP that is malformed or not addressed to the appliance on that port.
    DropArp = 14,
    /// Neighbour discovery that is not allowed (RS/RA/redirect, hop limit != 255,
    /// or a destination that could be routed).
    DropNd = 15,
    /// ICMP type other than echo request (forward) or echo reply (reply).
    DropIcmpType = 16,
    /// A TCP SYN without ACK in the reply direction: the far side may not open
    /// connections through a reply entry.
    DropReplySyn = 17,
    /// Reply to a destination port below the configured ephemeral floor.
    DropReplyPort = 18,
    /// A flow entry matched but the packet entered on the wrong side (spoofing).
    DropWrongPort = 19,
    /// Drop events written to the ring buffer.
    EventsSent = 20,
    /// Drop events not written because the per-CPU budget was spent.
    EventsSuppressed = 21,
    /// Drop events lost because the ring buffer was full.
    EventsLost = 22,
}

impl Reason {
    /// Number of slots in the `STATS` map (room to grow without a layout change).
    pub const SLOTS: u32 = 32;

    /// Every reason, in index order.
    pub const ALL: [Reason; 23] = [
        Reason::PassFlow,
        Reason::PassReply,
        Reason::PassArp,
        Reason::PassNd,
        Reason::DropNoFlow,
        Reason::DropExpired,
        Reason::DropTruncated,
        Reason::DropVlan,
        Reason::DropEthertype,
        Reason::DropIpv4Options,
        Reason::DropIpHeader,
        Reason::DropFragment,
        Reason::DropIpv6Ext,
        Reason::DropL4Proto,
        Reason::DropArp,
        Reason::DropNd,
        Reason::DropIcmpType,
        Reason::DropReplySyn,
        Reason::DropReplyPort,
        Reason::DropWrongPort,
        Reason::EventsSent,
        Reason::EventsSuppressed,
        Reason::EventsLost,
    ];

    /// Decodes a `STATS` index or an event's reason field.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    /// Stable snake_case name for logs, JSON and the CLI.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::PassFlow => "pass_flow",
            Reason::PassReply => "pass_reply",
            Reason::PassArp => "pass_arp",
            Reason::PassNd => "pass_nd",
            Reason::DropNoFlow => "drop_no_flow",
            Reason::DropExpired => "drop_expired",
            Reason::DropTruncated => "drop_truncated",
            Reason::DropVlan => "drop_vlan",
            Reason::DropEthertype => "drop_ethertype",
            Reason::DropIpv4Options => "drop_ipv4_options",
            Reason::DropIpHeader => "drop_ip_header",
            Reason::DropFragment => "drop_fragment",
            Reason::DropIpv6Ext => "drop_ipv6_ext",
            Reason::DropL4Proto => "drop_l4_proto",
            Reason::DropArp => "drop_arp",
            Reason::DropNd => "drop_nd",
            Reason::DropIcmpType => "drop_icmp_type",
            Reason::DropReplySyn => "drop_reply_syn",
            Reason::DropReplyPort => "drop_reply_port",
            Reason::DropWrongPort => "drop_wrong_port",
            Reason::EventsSent => "events_sent",
            Reason::EventsSuppressed => "events_suppressed",
            Reason::EventsLost => "events_lost",
        }
    }

    /// True for the verdict reasons that let a packet through.
    pub const fn is_pass(self) -> bool {
        matches!(self, Reason::PassFlow | Reason::PassReply | Reason::PassArp | Reason::PassNd)
    }
}

/// IP protocol numbers the dataplane understands.
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Exact IPv4 flow: the forward direction's source, destination, protocol and
/// destination port (0 for ICMP). 12 bytes, hashed whole by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FlowKeyV4 {
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// Destination port, network order (0 for ICMP).
    pub port: [u8; 2],
    /// IP protocol number.
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
}

/// Exact IPv6 flow, as [`FlowKeyV4`]. 36 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FlowKeyV6 {
    /// Source address, network order.
    pub src: [u8; 16],
    /// Destination address, network order.
    pub dst: [u8; 16],
    /// Destination port, network order (0 for ICMPv6).
    pub port: [u8; 2],
    /// IP protocol number.
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
}

impl FlowKeyV4 {
    /// Builds a key from host-order parts.
    pub const fn new(src: [u8; 4], dst: [u8; 4], proto: u8, port: u16) -> Self {
        Self { src, dst, port: port.to_be_bytes(), proto, pad: 0 }
    }
    /// Destination port in host order.
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

impl FlowKeyV6 {
    /// Builds a key from host-order parts.
    pub const fn new(src: [u8; 16], dst: [u8; 16], proto: u8, port: u16) -> Self {
        Self { src, dst, port: port.to_be_bytes(), proto, pad: 0 }
    }
    /// Destination port in host order.
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// [`FlowValue::flags`]: replies (source and destination swapped, source port =
/// the entry's port) are allowed back through the opposite port.
pub const FLOW_ALLOW_REPLY: u8 = 1;
/// [`FlowValue::flags`]: an infrastructure rule; only these may have no expiry.
pub const FLOW_INFRASTRUCTURE: u8 = 2;

/// What the kernel knows about an allowed flow, plus its counters. The maps are
/// per-CPU: the agent writes the same metadata to every CPU's copy, each CPU
/// bumps only its own counters, and the agent sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// CLOCK_MONOTONIC nanoseconds after which the entry no longer passes
    /// anything (the kernel compares with its coarse monotonic clock); 0 means
    /// no expiry, allowed only with [`FLOW_INFRASTRUCTURE`].
    pub expires_ns: u64,
    /// Forward packets passed.
    pub packets: u64,
    /// Forward bytes passed (whole frames).
    pub bytes: u64,
    /// Reply packets passed.
    pub reply_packets: u64,
    /// Reply bytes passed.
    pub reply_bytes: u64,
    /// The policy rule that created the entry.
    pub rule_id: u32,
    /// The policy version that created the entry.
    pub policy_version: u32,
    /// [`PortRole`] the forward direction must enter on.
    pub ingress: u8,
    /// `FLOW_*` flags.
    pub flags: u8,
    /// Always 0.
    pub pad: [u8; 6],
}

impl FlowValue {
    /// True when the entry may pass a packet at `now_ns` (CLOCK_MONOTONIC).
    /// An expiry of 0 without the infrastructure flag never passes: a value
    /// written wrongly fails closed.
    #[inline(always)]
    pub const fn is_live(&self, now_ns: u64) -> bool {
        if self.expires_ns == 0 {
            self.flags & FLOW_INFRASTRUCTURE != 0
        } else {
            now_ns < self.expires_ns
        }
    }
}

/// One per-CPU counter slot of the `STATS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (whole frames).
    pub bytes: u64,
}

/// Key of the `LOCAL_ADDRS` map: an address of the appliance on one port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalAddrKey {
    /// Interface index of the port.
    pub ifindex: u32,
    /// 4 or 6.
    pub family: u32,
    /// The address (IPv4 in the first four bytes, the rest zero).
    pub addr: [u8; 16],
}

impl LocalAddrKey {
    /// Key for an IPv4 address on `ifindex`.
    pub const fn v4(ifindex: u32, a: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = a[0];
        addr[1] = a[1];
        addr[2] = a[2];
        addr[3] = a[3];
        Self { ifindex, family: 4, addr }
    }
    /// Key for an IPv6 address on `ifindex`.
    pub const fn v6(ifindex: u32, addr: [u8; 16]) -> Self {
        Self { ifindex, family: 6, addr }
    }
}

/// Dataplane settings at index 0 of the `SETTINGS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Replies must go to a destination port at or above this (the client's
    /// ephemeral port). 0 (the map before the agent writes it) means
    /// [`Settings::EFFECTIVE_FLOOR`], never "any port".
    pub reply_min_port: u16,
    /// Always 0.
    pub pad: [u8; 6],
}

impl Settings {
    /// The floor used when the map holds 0 (never written): ports below 1024 are
    /// never valid reply destinations.
    pub const EFFECTIVE_FLOOR: u16 = 1024;

    /// The floor the kernel applies.
    #[inline(always)]
    pub const fn reply_floor(&self) -> u16 {
        if self.reply_min_port == 0 {
            Self::EFFECTIVE_FLOOR
        } else {
            self.reply_min_port
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self { reply_min_port: Self::EFFECTIVE_FLOOR, pad: [0; 6] }
    }
}

/// A drop event sent through the `EVENTS` ring buffer (rate-limited).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Interface the packet entered on.
    pub ifindex: u32,
    /// [`Reason`] as u32.
    pub reason: u32,
    /// Source address (IPv4 in the first four bytes), zero when not parsed.
    pub src: [u8; 16],
    /// Destination address, as `src`.
    pub dst: [u8; 16],
    /// Source port, network order (0 when none).
    pub sport: [u8; 2],
    /// Destination port, network order (0 when none).
    pub dport: [u8; 2],
    /// Ethertype, network order.
    pub ethertype: [u8; 2],
    /// IP protocol, 0 when not parsed.
    pub proto: u8,
    /// 4, 6, or 0 when the frame was not parsed as IP.
    pub family: u8,
    /// Frame length in bytes.
    pub len: u32,
    /// [`PortRole`] of the ingress port.
    pub role: u8,
    /// Always 0.
    pub pad: [u8; 3],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays,
    // and carry explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKeyV4 {}
    unsafe impl aya::Pod for super::FlowKeyV6 {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::LocalAddrKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::DropEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    // Pins the layouts the kernel and the agent share: a change here must bump
    // LAYOUT_VERSION.
    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<FlowKeyV4>(), 12);
        assert_eq!(align_of::<FlowKeyV4>(), 1);
        assert_eq!(size_of::<FlowKeyV6>(), 36);
        assert_eq!(offset_of!(FlowKeyV6, port), 32);
        assert_eq!(size_of::<FlowValue>(), 56);
        assert_eq!(offset_of!(FlowValue, rule_id), 40);
        assert_eq!(offset_of!(FlowValue, ingress), 48);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<LocalAddrKey>(), 24);
        assert_eq!(size_of::<Settings>(), 8);
        assert_eq!(size_of::<DropEvent>(), 64);
        assert_eq!(offset_of!(DropEvent, proto), 54);
        assert_eq!(LAYOUT_VERSION, 1);
    }

    #[test]
    fn ports_are_network_order() {
        let k = FlowKeyV4::new([10, 0, 0, 1], [10, 0, 0, 2], proto::TCP, 443);
        assert_eq!(k.port, [0x01, 0xbb]);
        assert_eq!(k.port(), 443);
        let k6 = FlowKeyV6::new([0; 16], [1; 16], proto::UDP, 53);
        assert_eq!(k6.port(), 53);
    }

    #[test]
    fn reasons_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(Reason::ALL.len() as u32), None);
        assert!(Reason::ALL.len() as u32 <= Reason::SLOTS);
    }

    #[test]
    fn expiry_fails_closed() {
        let mut v = FlowValue { expires_ns: 0, ..Default::default() };
        assert!(!v.is_live(1), "no expiry without the infrastructure flag never passes");
        v.flags = FLOW_INFRASTRUCTURE;
        assert!(v.is_live(u64::MAX));
        v.expires_ns = 100;
        assert!(v.is_live(99));
        assert!(!v.is_live(100));
    }

    #[test]
    fn settings_floor() {
        let s = Settings { reply_min_port: 0, pad: [0; 6] };
        assert_eq!(s.reply_floor(), 1024);
        assert_eq!(Settings { reply_min_port: 32768, pad: [0; 6] }.reply_floor(), 32768);
    }
}
