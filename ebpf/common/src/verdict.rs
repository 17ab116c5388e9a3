//! The verdict: given a parsed frame, the port it entered on and the flow table,
//! pass or drop, and why.
//!
//! Forward match: the key (src, dst, proto, dport) is in the table, the entry's
//! ingress role is this port's role, the entry is live, and for ICMP the packet
//! is an echo request.
//!
//! Reply match (return traffic, stateless): the key built from the packet with
//! source and destination swapped and the *source* port as the port
//! (dst, src, proto, sport) is in the table, the entry allows replies, the
//! packet entered on the side opposite the entry's ingress, the entry is live,
//! a TCP reply is not a bare SYN, the reply's destination port is at or above
//! the ephemeral floor, and for ICMP the packet is an echo reply.
//!
//! Everything else is dropped: default deny.

use crate::{
    layout::{
        proto, FlowKeyV4, FlowKeyV6, LocalAddrKey, PortRole, Reason, Settings, FLOW_ALLOW_REPLY,
        FLOW_INFRASTRUCTURE,
    },
    parse::{icmp, tcp_flags, Frame, FrameKind},
};

/// Pass or drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the kernel route the packet (XDP_PASS).
    Pass,
    /// Drop it (XDP_DROP).
    Drop,
}

/// Which direction of a flow entry matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// No flow entry passed the packet (drops, ARP, ND).
    None,
    /// The entry's own direction.
    Forward,
    /// The reply to it.
    Reply,
}

/// The outcome for one frame. When `dir` is not `None`, `entry` is the flow
/// entry whose counters to bump; otherwise it is [`FlowTable::NO_ENTRY`]. (No
/// `Option<(E, Direction)>`: the verifier rejects copies of its unset bytes.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<E> {
    /// Pass or drop.
    pub action: Action,
    /// The counter to bump.
    pub reason: Reason,
    /// Which direction of `entry` passed the packet.
    pub dir: Direction,
    /// The entry that passed the packet.
    pub entry: E,
}

/// The parts of a flow entry the verdict reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// CLOCK_MONOTONIC expiry, 0 for none.
    pub expires_ns: u64,
    /// Ingress [`PortRole`] as stored.
    pub ingress: u8,
    /// `FLOW_*` flags.
    pub flags: u8,
}

/// Lookups the verdict needs; the kernel implements them with map lookups.
pub trait FlowTable {
    /// A handle to a found entry (a map value pointer in the kernel).
    type Entry: Copy;
    /// The handle meaning "no entry" (a null pointer in the kernel).
    const NO_ENTRY: Self::Entry;
    /// Looks up an IPv4 key.
    fn get_v4(&self, key: &FlowKeyV4) -> Option<Self::Entry>;
    /// Looks up an IPv6 key.
    fn get_v6(&self, key: &FlowKeyV6) -> Option<Self::Entry>;
    /// Reads the entry's metadata.
    fn meta(&self, entry: Self::Entry) -> EntryMeta;
    /// True when `key` is one of the appliance's own addresses on that port.
    fn is_local(&self, key: &LocalAddrKey) -> bool;
}

/// True when an entry passes at the time `now` returns. The clock is read only
/// for entries that expire.
#[inline(always)]
fn live(m: &EntryMeta, now: &impl Fn() -> u64) -> bool {
    if m.expires_ns == 0 {
        m.flags & FLOW_INFRASTRUCTURE != 0
    } else {
        now() < m.expires_ns
    }
}

#[inline(always)]
const fn is_icmp(p: u8) -> bool {
    p == proto::ICMP || p == proto::ICMPV6
}

#[inline(always)]
const fn echo_request(p: u8) -> u8 {
    if p == proto::ICMP {
        icmp::ECHO_REQUEST_V4
    } else {
        icmp::ECHO_REQUEST_V6
    }
}

#[inline(always)]
const fn echo_reply(p: u8) -> u8 {
    if p == proto::ICMP {
        icmp::ECHO_REPLY_V4
    } else {
        icmp::ECHO_REPLY_V6
    }
}

/// Checks a forward hit.
#[inline(always)]
pub fn check_forward(
    ip: &Frame,
    m: &EntryMeta,
    role: PortRole,
    now: &impl Fn() -> u64,
) -> Result<(), Reason> {
    // Nothing enters a management port in the forward direction: its
    // entries' forward direction is the appliance's own output.
    if m.ingress != role as u8 || matches!(role, PortRole::Management) {
        return Err(Reason::DropWrongPort);
    }
    if !live(m, now) {
        return Err(Reason::DropExpired);
    }
    if is_icmp(ip.proto) && ip.icmp_type != echo_request(ip.proto) {
        return Err(Reason::DropIcmpType);
    }
    Ok(())
}

/// Checks a reply hit. `Ok(false)` means the entry does not allow replies (as
/// if it were absent).
#[inline(always)]
pub fn check_reply(
    ip: &Frame,
    m: &EntryMeta,
    role: PortRole,
    settings: &Settings,
    now: &impl Fn() -> u64,
) -> Result<bool, Reason> {
    if m.flags & FLOW_ALLOW_REPLY == 0 {
        return Ok(false);
    }
    if m.ingress != role.opposite() as u8 {
        return Err(Reason::DropWrongPort);
    }
    if !live(m, now) {
        return Err(Reason::DropExpired);
    }
    if is_icmp(ip.proto) {
        if ip.icmp_type != echo_reply(ip.proto) {
            return Err(Reason::DropIcmpType);
        }
        return Ok(true);
    }
    if ip.proto == proto::TCP
        && ip.tcp_flags & tcp_flags::SYN != 0
        && ip.tcp_flags & tcp_flags::ACK == 0
    {
        return Err(Reason::DropReplySyn);
    }
    if u16::from_be_bytes(ip.dport) < settings.reply_floor() {
        return Err(Reason::DropReplyPort);
    }
    Ok(true)
}

#[inline(always)]
const fn drop<E>(reason: Reason, none: E) -> Decision<E> {
    Decision { action: Action::Drop, reason, dir: Direction::None, entry: none }
}

#[inline(always)]
const fn pass<E>(reason: Reason, dir: Direction, entry: E) -> Decision<E> {
    Decision { action: Action::Pass, reason, dir, entry }
}

/// The verdict for a parsed frame that entered on port `ifindex` with `role`.
/// `now` returns CLOCK_MONOTONIC nanoseconds and is called only when needed.
#[inline(always)]
pub fn decide<T: FlowTable>(
    frame: &Frame,
    role: PortRole,
    ifindex: u32,
    table: &T,
    settings: &Settings,
    now: impl Fn() -> u64,
) -> Decision<T::Entry> {
    let v4 = match frame.kind {
        FrameKind::V4 => true,
        FrameKind::V6 => false,
        FrameKind::Arp => {
            return if table.is_local(&LocalAddrKey::v4(ifindex, frame.dst4())) {
                pass(Reason::PassArp, Direction::None, T::NO_ENTRY)
            } else {
                drop(Reason::DropArp, T::NO_ENTRY)
            };
        }
        FrameKind::NdLink => return pass(Reason::PassNd, Direction::None, T::NO_ENTRY),
        FrameKind::NdLocal => {
            return if table.is_local(&LocalAddrKey::v6(ifindex, frame.dst)) {
                pass(Reason::PassNd, Direction::None, T::NO_ENTRY)
            } else {
                drop(Reason::DropNd, T::NO_ENTRY)
            };
        }
    };
    // A management port carries the appliance's own traffic only: whatever
    // the entries say, nothing that is not addressed to its own address on
    // that port passes (so nothing is forwarded from it).
    if matches!(role, PortRole::Management) {
        let own = if v4 {
            LocalAddrKey::v4(ifindex, frame.dst4())
        } else {
            LocalAddrKey::v6(ifindex, frame.dst)
        };
        if !table.is_local(&own) {
            return drop(Reason::DropNoFlow, T::NO_ENTRY);
        }
    }
    let lookup = |src: &[u8; 16], dst: &[u8; 16], port: [u8; 2]| {
        if v4 {
            table.get_v4(&FlowKeyV4 {
                src: [src[0], src[1], src[2], src[3]],
                dst: [dst[0], dst[1], dst[2], dst[3]],
                port,
                proto: frame.proto,
                pad: 0,
            })
        } else {
            table.get_v6(&FlowKeyV6 { src: *src, dst: *dst, port, proto: frame.proto, pad: 0 })
        }
    };

    let mut fwd_err = Reason::DropNoFlow;
    if let Some(e) = lookup(&frame.src, &frame.dst, frame.dport) {
        match check_forward(frame, &table.meta(e), role, &now) {
            Ok(()) => return pass(Reason::PassFlow, Direction::Forward, e),
            Err(r) => fwd_err = r,
        }
    }
    if let Some(e) = lookup(&frame.dst, &frame.src, frame.sport) {
        match check_reply(frame, &table.meta(e), role, settings, &now) {
            Ok(true) => return pass(Reason::PassReply, Direction::Reply, e),
            Ok(false) => {}
            Err(r) => return drop(r, T::NO_ENTRY),
        }
    }
    drop(fwd_err, T::NO_ENTRY)
}

/// The verdict for a parsed frame leaving through management port `ifindex`
/// (tc egress): the appliance's own packets only — ARP and neighbour
/// discovery (never forwarded), and IP whose source is the appliance's own
/// address on that port. Anything else was forwarded from another port and
/// is dropped (`DropWrongPort`): nothing is forwarded to a management port.
#[inline(always)]
pub fn decide_management_egress<T: FlowTable>(
    frame: &Frame,
    ifindex: u32,
    table: &T,
) -> Decision<T::Entry> {
    let own = match frame.kind {
        FrameKind::Arp | FrameKind::NdLink | FrameKind::NdLocal => {
            return pass(Reason::PassNd, Direction::None, T::NO_ENTRY);
        }
        FrameKind::V4 => {
            LocalAddrKey::v4(ifindex, [frame.src[0], frame.src[1], frame.src[2], frame.src[3]])
        }
        FrameKind::V6 => LocalAddrKey::v6(ifindex, frame.src),
    };
    if table.is_local(&own) {
        pass(Reason::PassFlow, Direction::None, T::NO_ENTRY)
    } else {
        drop(Reason::DropWrongPort, T::NO_ENTRY)
    }
}
