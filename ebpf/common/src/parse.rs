//! The packet parser: Ethernet → IPv4 / IPv6 / ARP → TCP / UDP / ICMP.
//!
//! It accepts only what it fully understands. Everything else is an `Err(Reason)`
//! and therefore a counted drop: truncated headers, VLAN tags, unknown ethertypes,
//! IPv4 options and fragments, IPv6 extension headers, unknown transport
//! protocols, malformed ARP. Every offset is a constant (no options, no extension
//! headers are walked), which keeps the kernel verifier's job trivial.

use crate::layout::{proto, Reason};

/// A source of frame bytes. The kernel implements it over the XDP context with a
/// bounds check per read; the host implements it over a slice.
pub trait Packet {
    /// Length of the whole frame in bytes.
    fn len(&self) -> usize;
    /// True for an empty frame.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `N` bytes at `off`, or `None` when any of them lies beyond the frame.
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        let s = self.get(off..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Some(out)
    }
}

/// Ethertypes.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service tag.
    pub const QINQ: u16 = 0x88a8;
    /// Pre-standard QinQ tag.
    pub const QINQ_OLD: u16 = 0x9100;
}

/// Offsets and sizes.
const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const ARP_LEN: usize = 28;
const TCP_MIN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_MIN: usize = 8;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// ICMP and ICMPv6 types the dataplane names.
pub mod icmp {
    /// ICMPv4 echo reply.
    pub const ECHO_REPLY_V4: u8 = 0;
    /// ICMPv4 echo request.
    pub const ECHO_REQUEST_V4: u8 = 8;
    /// ICMPv6 echo request.
    pub const ECHO_REQUEST_V6: u8 = 128;
    /// ICMPv6 echo reply.
    pub const ECHO_REPLY_V6: u8 = 129;
    /// ICMPv6 router solicitation.
    pub const ND_ROUTER_SOLICIT: u8 = 133;
    /// ICMPv6 router advertisement.
    pub const ND_ROUTER_ADVERT: u8 = 134;
    /// ICMPv6 neighbour solicitation.
    pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
    /// ICMPv6 neighbour advertisement.
    pub const ND_NEIGHBOR_ADVERT: u8 = 136;
    /// ICMPv6 redirect.
    pub const ND_REDIRECT: u8 = 137;
}

/// What kind of frame the parser accepted.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// IPv4 TCP/UDP/ICMP without options or fragmentation.
    V4 = 4,
    /// IPv6 TCP/UDP/ICMPv6 without extension headers.
    V6 = 6,
    /// A well-formed Ethernet/IPv4 ARP request or reply; `dst` holds the
    /// target protocol address.
    Arp = 1,
    /// A neighbour solicitation or advertisement with hop limit 255 whose
    /// destination is link-scoped (ff02::/16, fe80::/10): it can never be routed.
    NdLink = 2,
    /// As `NdLink` but to a routable destination: it passes only when `dst` is
    /// one of the port's own addresses.
    NdLocal = 3,
}

/// A frame the parser fully understood. A flat struct rather than an enum with
/// data: every byte is always initialised, which the kernel verifier requires
/// when the value is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The kind; decides which fields mean something.
    pub kind: FrameKind,
    /// Source address (IPv4 in the first four bytes, rest zero).
    pub src: [u8; 16],
    /// Destination address (IPv4 and ARP targets in the first four bytes).
    pub dst: [u8; 16],
    /// [`proto`] number (TCP, UDP, ICMP or ICMPv6 only), 0 for ARP.
    pub proto: u8,
    /// Source port, network order (0 for ICMP).
    pub sport: [u8; 2],
    /// Destination port, network order (0 for ICMP).
    pub dport: [u8; 2],
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP type (0 for other protocols; check `proto` first).
    pub icmp_type: u8,
}

impl Frame {
    /// An all-zero frame to parse into.
    pub const EMPTY: Frame = Frame {
        kind: FrameKind::V4,
        src: [0; 16],
        dst: [0; 16],
        proto: 0,
        sport: [0; 2],
        dport: [0; 2],
        tcp_flags: 0,
        icmp_type: 0,
    };

    /// The IPv4 source address.
    #[inline(always)]
    pub const fn src4(&self) -> [u8; 4] {
        [self.src[0], self.src[1], self.src[2], self.src[3]]
    }

    /// The IPv4 destination (or ARP target) address.
    #[inline(always)]
    pub const fn dst4(&self) -> [u8; 4] {
        [self.dst[0], self.dst[1], self.dst[2], self.dst[3]]
    }

    /// 4 for IPv4 and ARP, 6 for IPv6 and ND (for events).
    pub const fn family(&self) -> u8 {
        match self.kind {
            FrameKind::V4 | FrameKind::Arp => 4,
            FrameKind::V6 | FrameKind::NdLink | FrameKind::NdLocal => 6,
        }
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// The ethertype of a frame, or `DropTruncated` when the Ethernet header is short.
#[inline(always)]
pub fn ethertype_of<P: Packet + ?Sized>(p: &P) -> Result<u16, Reason> {
    p.bytes::<2>(12).map(be16).ok_or(Reason::DropTruncated)
}

/// Parses a frame into `out` (which the kernel keeps on its stack). `Err`
/// carries the drop reason; `out` is then partly written and meaningless.
#[inline(always)]
pub fn parse_into<P: Packet + ?Sized>(p: &P, out: &mut Frame) -> Result<(), Reason> {
    match ethertype_of(p)? {
        ethertype::IPV4 => parse_v4(p, out),
        ethertype::IPV6 => parse_v6(p, out),
        ethertype::ARP => parse_arp(p, out),
        ethertype::VLAN | ethertype::QINQ | ethertype::QINQ_OLD => Err(Reason::DropVlan),
        _ => Err(Reason::DropEthertype),
    }
}

/// Parses a frame and returns it (for userspace and tests).
pub fn parse<P: Packet + ?Sized>(p: &P) -> Result<Frame, Reason> {
    let mut f = Frame::EMPTY;
    parse_into(p, &mut f).map(|()| f)
}

/// Minimum transport header length for the protocols the dataplane accepts.
#[inline(always)]
const fn l4_min(proto_nr: u8) -> Option<usize> {
    match proto_nr {
        proto::TCP => Some(TCP_MIN),
        proto::UDP => Some(UDP_LEN),
        proto::ICMP | proto::ICMPV6 => Some(ICMP_MIN),
        _ => None,
    }
}

/// Ports, TCP flags and ICMP type from the transport header at `off`.
#[inline(always)]
fn parse_l4<P: Packet + ?Sized>(
    p: &P,
    off: usize,
    proto_nr: u8,
) -> Result<([u8; 2], [u8; 2], u8, u8), Reason> {
    match proto_nr {
        proto::TCP => {
            let h = p.bytes::<TCP_MIN>(off).ok_or(Reason::DropTruncated)?;
            if (h[12] >> 4) < 5 {
                return Err(Reason::DropTruncated);
            }
            Ok(([h[0], h[1]], [h[2], h[3]], h[13], 0))
        }
        proto::UDP => {
            let h = p.bytes::<UDP_LEN>(off).ok_or(Reason::DropTruncated)?;
            Ok(([h[0], h[1]], [h[2], h[3]], 0, 0))
        }
        _ => {
            let h = p.bytes::<ICMP_MIN>(off).ok_or(Reason::DropTruncated)?;
            Ok(([0, 0], [0, 0], 0, h[0]))
        }
    }
}

#[inline(always)]
fn parse_v4<P: Packet + ?Sized>(p: &P, out: &mut Frame) -> Result<(), Reason> {
    let h = p.bytes::<IPV4_LEN>(ETH_LEN).ok_or(Reason::DropTruncated)?;
    if h[0] >> 4 != 4 {
        return Err(Reason::DropIpHeader);
    }
    let ihl = (h[0] & 0x0f) as usize;
    if ihl < 5 {
        return Err(Reason::DropIpHeader);
    }
    if ihl > 5 {
        return Err(Reason::DropIpv4Options);
    }
    let frag = be16([h[6], h[7]]);
    if frag & 0x8000 != 0 {
        return Err(Reason::DropIpHeader); // reserved flag
    }
    if frag & 0x3fff != 0 {
        return Err(Reason::DropFragment); // MF or offset
    }
    let proto_nr = h[9];
    let min = l4_min(proto_nr).filter(|_| proto_nr != proto::ICMPV6);
    let Some(min) = min else {
        return Err(Reason::DropL4Proto);
    };
    let total = be16([h[2], h[3]]) as usize;
    if total < IPV4_LEN + min {
        return Err(Reason::DropIpHeader);
    }
    if total > p.len().saturating_sub(ETH_LEN) {
        return Err(Reason::DropTruncated); // the frame ends before the packet does
    }
    let (sport, dport, tcp_flags, icmp_type) = parse_l4(p, ETH_LEN + IPV4_LEN, proto_nr)?;
    out.kind = FrameKind::V4;
    out.src[..4].copy_from_slice(&h[12..16]);
    out.dst[..4].copy_from_slice(&h[16..20]);
    out.proto = proto_nr;
    out.sport = sport;
    out.dport = dport;
    out.tcp_flags = tcp_flags;
    out.icmp_type = icmp_type;
    Ok(())
}

/// IPv6 next-header values that are extension headers.
#[inline(always)]
const fn is_ipv6_ext(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
fn parse_v6<P: Packet + ?Sized>(p: &P, out: &mut Frame) -> Result<(), Reason> {
    let h = p.bytes::<IPV6_LEN>(ETH_LEN).ok_or(Reason::DropTruncated)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::DropIpHeader);
    }
    let nh = h[6];
    if nh == 44 {
        return Err(Reason::DropFragment);
    }
    if is_ipv6_ext(nh) {
        return Err(Reason::DropIpv6Ext);
    }
    let min = l4_min(nh).filter(|_| nh != proto::ICMP);
    let Some(min) = min else {
        return Err(Reason::DropL4Proto);
    };
    let payload = be16([h[4], h[5]]) as usize;
    if payload < min {
        return Err(Reason::DropIpHeader);
    }
    if payload > p.len().saturating_sub(ETH_LEN + IPV6_LEN) {
        return Err(Reason::DropTruncated);
    }
    let (sport, dport, tcp_flags, icmp_type) = parse_l4(p, ETH_LEN + IPV6_LEN, nh)?;
    out.kind = FrameKind::V6;
    out.src.copy_from_slice(&h[8..24]);
    out.dst.copy_from_slice(&h[24..40]);
    out.proto = nh;
    out.sport = sport;
    out.dport = dport;
    out.tcp_flags = tcp_flags;
    out.icmp_type = icmp_type;
    if nh == proto::ICMPV6 {
        if let Some(kind) = classify_nd(p, icmp_type, h[7], &out.dst)? {
            out.kind = kind;
        }
    }
    Ok(())
}

/// Neighbour discovery: NS/NA only, hop limit 255 (RFC 4861: proves on-link),
/// code 0; router messages and redirects are refused. `Ok(None)` for other ICMPv6.
#[inline(always)]
fn classify_nd<P: Packet + ?Sized>(
    p: &P,
    icmp_type: u8,
    hop_limit: u8,
    dst: &[u8; 16],
) -> Result<Option<FrameKind>, Reason> {
    match icmp_type {
        icmp::ND_NEIGHBOR_SOLICIT | icmp::ND_NEIGHBOR_ADVERT => {
            let code = p.bytes::<2>(ETH_LEN + IPV6_LEN).ok_or(Reason::DropTruncated)?[1];
            if hop_limit != 255 || code != 0 {
                return Err(Reason::DropNd);
            }
            let link_multicast = dst[0] == 0xff && dst[1] == 0x02;
            let link_local = dst[0] == 0xfe && (dst[1] & 0xc0) == 0x80;
            Ok(Some(if link_multicast || link_local {
                FrameKind::NdLink
            } else {
                FrameKind::NdLocal
            }))
        }
        icmp::ND_ROUTER_SOLICIT | icmp::ND_ROUTER_ADVERT | icmp::ND_REDIRECT => Err(Reason::DropNd),
        _ => Ok(None),
    }
}

#[inline(always)]
fn parse_arp<P: Packet + ?Sized>(p: &P, out: &mut Frame) -> Result<(), Reason> {
    let h = p.bytes::<ARP_LEN>(ETH_LEN).ok_or(Reason::DropTruncated)?;
    let htype = be16([h[0], h[1]]);
    let ptype = be16([h[2], h[3]]);
    let op = be16([h[6], h[7]]);
    if htype != 1 || ptype != ethertype::IPV4 || h[4] != 6 || h[5] != 4 || !(op == 1 || op == 2) {
        return Err(Reason::DropArp);
    }
    out.kind = FrameKind::Arp;
    out.dst[..4].copy_from_slice(&h[24..28]);
    Ok(())
}
