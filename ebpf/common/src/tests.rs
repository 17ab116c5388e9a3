//! Host-side tests of the parser and the verdict: the same code the kernel runs.

extern crate std;

use std::{cell::Cell, vec, vec::Vec};

use crate::{
    layout::*,
    parse::{ethertype, icmp, parse, tcp_flags, FrameKind},
    verdict::{decide, Action, Direction},
};

// ---- frame builders -------------------------------------------------------

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn l4(proto_nr: u8, sport: u16, dport: u16, flags: u8, icmp_type: u8) -> Vec<u8> {
    match proto_nr {
        proto::TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = flags;
            h
        }
        proto::UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        _ => {
            let mut h = vec![0u8; 8];
            h[0] = icmp_type;
            h
        }
    }
}

struct V4 {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    icmp_type: u8,
}

impl V4 {
    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Self {
        Self { src, dst, proto: proto::TCP, sport, dport, flags, icmp_type: 0 }
    }
    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        Self { src, dst, proto: proto::UDP, sport, dport, flags: 0, icmp_type: 0 }
    }
    fn icmp(src: [u8; 4], dst: [u8; 4], t: u8) -> Self {
        Self { src, dst, proto: proto::ICMP, sport: 0, dport: 0, flags: 0, icmp_type: t }
    }
    fn frame(&self) -> Vec<u8> {
        let payload = l4(self.proto, self.sport, self.dport, self.flags, self.icmp_type);
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip[6] = 0x40; // DF is fine
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src);
        ip[16..20].copy_from_slice(&self.dst);
        let mut f = eth(ethertype::IPV4);
        f.extend(ip);
        f.extend(payload);
        f
    }
}

fn v6_frame(src: [u8; 16], dst: [u8; 16], nh: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    ip[6] = nh;
    ip[7] = hop;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    let mut f = eth(ethertype::IPV6);
    f.extend(ip);
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, tpa: [u8; 4]) -> Vec<u8> {
    let mut f = eth(ethertype::ARP);
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 77, 0, 11]);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa);
    f.extend(a);
    f
}

const P1: [u8; 4] = [10, 77, 0, 11];
const EXT: [u8; 4] = [10, 78, 0, 100];
const P1_6: [u8; 16] = [0xfd, 0, 0, 0xa1, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const EXT_6: [u8; 16] = [0xfd, 0, 0, 0xa1, 0, 0x78, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00];

// ---- a flow table on the host ---------------------------------------------

type Table = crate::host::HostTable;

fn entry(expires_ns: u64, flags: u8, rule_id: u32) -> FlowValue {
    FlowValue { expires_ns, rule_id, ingress: PortRole::Patient as u8, flags, ..Default::default() }
}

const SETTINGS: Settings = Settings { reply_min_port: 1024, pad: [0; 6] };

fn verdict(t: &Table, frame: &[u8], role: PortRole, now: u64) -> (Action, Reason) {
    match parse(frame) {
        Err(r) => (Action::Drop, r),
        Ok(f) => {
            let d = decide(&f, role, 7, t, &SETTINGS, || now);
            (d.action, d.reason)
        }
    }
}

fn web_table() -> Table {
    let mut t = Table::default();
    t.v4.insert(FlowKeyV4::new(P1, EXT, proto::TCP, 443), entry(1_000, FLOW_ALLOW_REPLY, 1));
    t
}

// ---- parser ---------------------------------------------------------------

#[test]
fn parses_ipv4_tcp_udp_icmp() {
    let ip = parse(&V4::tcp(P1, EXT, 40000, 443, tcp_flags::SYN).frame()[..]).unwrap();
    assert_eq!(ip.kind, FrameKind::V4);
    assert_eq!((ip.src4(), ip.dst4(), ip.proto), (P1, EXT, proto::TCP));
    assert_eq!(ip.src[4..], [0; 12]);
    assert_eq!((u16::from_be_bytes(ip.sport), u16::from_be_bytes(ip.dport)), (40000, 443));
    assert_eq!(ip.tcp_flags, tcp_flags::SYN);
    let u = parse(&V4::udp(P1, EXT, 5000, 53).frame()[..]).unwrap();
    assert_eq!(u16::from_be_bytes(u.dport), 53);
    let i = parse(&V4::icmp(P1, EXT, 8).frame()[..]).unwrap();
    assert_eq!((i.proto, i.icmp_type, i.dport), (proto::ICMP, 8, [0, 0]));
}

#[test]
fn parses_ipv6() {
    let f = v6_frame(P1_6, EXT_6, proto::UDP, 64, &l4(proto::UDP, 1, 514, 0, 0));
    let ip = parse(&f[..]).unwrap();
    assert_eq!(ip.kind, FrameKind::V6);
    assert_eq!((ip.src, ip.dst, u16::from_be_bytes(ip.dport)), (P1_6, EXT_6, 514));
    let f = v6_frame(P1_6, EXT_6, proto::ICMPV6, 64, &l4(proto::ICMPV6, 0, 0, 0, 128));
    let ip = parse(&f[..]).unwrap();
    assert_eq!(ip.icmp_type, icmp::ECHO_REQUEST_V6);
}

#[test]
fn odd_frames_are_dropped_by_reason() {
    let good = V4::tcp(P1, EXT, 40000, 443, tcp_flags::SYN).frame();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut g = good.clone();
        f(&mut g);
        parse(&g[..]).unwrap_err()
    };
    assert_eq!(parse(&good[..10]).unwrap_err(), Reason::DropTruncated);
    assert_eq!(parse(&good[..30]).unwrap_err(), Reason::DropTruncated);
    assert_eq!(with(&|g| g.truncate(14 + 20 + 10)), Reason::DropTruncated);
    assert_eq!(with(&|g| g[16..18].copy_from_slice(&[0, 30])), Reason::DropIpHeader); // total < 20 + TCP
    assert_eq!(with(&|g| g[12..14].copy_from_slice(&[0x81, 0x00])), Reason::DropVlan);
    assert_eq!(with(&|g| g[12..14].copy_from_slice(&[0x88, 0xa8])), Reason::DropVlan);
    assert_eq!(with(&|g| g[12..14].copy_from_slice(&[0x88, 0xcc])), Reason::DropEthertype);
    assert_eq!(with(&|g| g[14] = 0x46), Reason::DropIpv4Options);
    assert_eq!(with(&|g| g[14] = 0x44), Reason::DropIpHeader);
    assert_eq!(with(&|g| g[14] = 0x65), Reason::DropIpHeader);
    assert_eq!(with(&|g| g[20] = 0x20), Reason::DropFragment); // MF
    assert_eq!(with(&|g| g[21] = 0x01), Reason::DropFragment); // offset
    assert_eq!(with(&|g| g[20] = 0x80), Reason::DropIpHeader); // reserved bit
    assert_eq!(with(&|g| g[23] = 47), Reason::DropL4Proto); // GRE
    assert_eq!(with(&|g| g[23] = proto::ICMPV6), Reason::DropL4Proto);
    assert_eq!(with(&|g| g[14 + 20 + 12] = 4 << 4), Reason::DropTruncated); // TCP doff < 5
    for nh in [0u8, 43, 60, 51] {
        let f = v6_frame(P1_6, EXT_6, nh, 64, &[0u8; 16]);
        assert_eq!(parse(&f[..]).unwrap_err(), Reason::DropIpv6Ext, "next header {nh}");
    }
    let f = v6_frame(P1_6, EXT_6, 44, 64, &[0u8; 16]);
    assert_eq!(parse(&f[..]).unwrap_err(), Reason::DropFragment);
    let f = v6_frame(P1_6, EXT_6, 132, 64, &[0u8; 16]);
    assert_eq!(parse(&f[..]).unwrap_err(), Reason::DropL4Proto);
    let f = v6_frame(P1_6, EXT_6, proto::TCP, 64, &[0u8; 8]);
    assert_eq!(parse(&f[..]).unwrap_err(), Reason::DropIpHeader);
}

#[test]
fn arp_and_nd_are_narrow() {
    let a = parse(&arp(1, [10, 77, 0, 1])[..]).unwrap();
    assert_eq!((a.kind, a.dst4()), (FrameKind::Arp, [10, 77, 0, 1]));
    assert_eq!(parse(&arp(3, [10, 77, 0, 1])[..]).unwrap_err(), Reason::DropArp);
    let mut bad = arp(1, [10, 77, 0, 1]);
    bad[14 + 5] = 16; // plen
    assert_eq!(parse(&bad[..]).unwrap_err(), Reason::DropArp);

    let solicited: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
    let ns = l4(proto::ICMPV6, 0, 0, 0, icmp::ND_NEIGHBOR_SOLICIT);
    let f = v6_frame(P1_6, solicited, proto::ICMPV6, 255, &ns);
    let nd = parse(&f[..]).unwrap();
    assert_eq!((nd.kind, nd.dst), (FrameKind::NdLink, solicited));
    let f = v6_frame(P1_6, EXT_6, proto::ICMPV6, 255, &ns);
    let nd = parse(&f[..]).unwrap();
    assert_eq!((nd.kind, nd.dst), (FrameKind::NdLocal, EXT_6));
    let f = v6_frame(P1_6, solicited, proto::ICMPV6, 254, &ns);
    assert_eq!(parse(&f[..]).unwrap_err(), Reason::DropNd, "hop limit must be 255");
    let ra = l4(proto::ICMPV6, 0, 0, 0, icmp::ND_ROUTER_ADVERT);
    let f = v6_frame(P1_6, solicited, proto::ICMPV6, 255, &ra);
    assert_eq!(parse(&f[..]).unwrap_err(), Reason::DropNd);
}

/// Every truncation and every single-byte corruption of valid frames parses to
/// some result without panicking, and a truncated frame never yields more than
/// the whole one did.
#[test]
fn parser_survives_truncation_and_corruption() {
    let frames = [
        V4::tcp(P1, EXT, 1, 2, 0).frame(),
        V4::icmp(P1, EXT, 8).frame(),
        v6_frame(P1_6, EXT_6, proto::UDP, 64, &l4(proto::UDP, 1, 2, 0, 0)),
        arp(2, P1),
    ];
    let mut checked = 0u32;
    for f in &frames {
        for n in 0..f.len() {
            assert!(parse(&f[..n]).is_err() || f[..n].len() >= 42, "cut at {n}");
            checked += 1;
        }
        for i in 0..f.len() {
            for v in [0u8, 1, 0x40, 0x7f, 0x80, 0xff] {
                let mut g = f.clone();
                g[i] = v;
                let _verdict = parse(&g[..]);
                checked += 1;
            }
        }
    }
    assert!(checked > 500);
}

// ---- verdict --------------------------------------------------------------

#[test]
fn default_deny() {
    let t = Table::default();
    for f in [
        V4::tcp(P1, EXT, 40000, 443, tcp_flags::SYN).frame(),
        V4::udp(P1, EXT, 40000, 53).frame(),
        V4::icmp(P1, EXT, 8).frame(),
        V4::tcp(EXT, P1, 443, 22, tcp_flags::SYN).frame(),
    ] {
        assert_eq!(verdict(&t, &f, PortRole::Patient, 0), (Action::Drop, Reason::DropNoFlow));
        assert_eq!(verdict(&t, &f, PortRole::Uplink, 0), (Action::Drop, Reason::DropNoFlow));
    }
}

#[test]
fn exact_flow_passes_and_nothing_else() {
    let t = web_table();
    let ok = V4::tcp(P1, EXT, 40000, 443, tcp_flags::SYN).frame();
    assert_eq!(verdict(&t, &ok, PortRole::Patient, 10), (Action::Pass, Reason::PassFlow));
    for other in [
        V4::tcp(P1, EXT, 40000, 444, tcp_flags::SYN),
        V4::tcp([10, 77, 0, 12], EXT, 40000, 443, tcp_flags::SYN),
        V4::tcp(P1, [10, 78, 0, 101], 40000, 443, tcp_flags::SYN),
        V4::udp(P1, EXT, 40000, 443),
    ] {
        assert_eq!(verdict(&t, &other.frame(), PortRole::Patient, 10).0, Action::Drop);
    }
    // The same packet arriving on the uplink is spoofed.
    assert_eq!(verdict(&t, &ok, PortRole::Uplink, 10), (Action::Drop, Reason::DropWrongPort));
}

#[test]
fn a_management_port_passes_only_answers_to_the_appliance_itself() {
    const APP: [u8; 4] = [10, 90, 0, 1];
    const CTL: [u8; 4] = [10, 90, 0, 100];
    let mut t = web_table();
    // The agent's entry to its controller: replies enter on the management port.
    let mgmt = FlowValue {
        ingress: PortRole::Management as u8,
        ..entry(0, FLOW_ALLOW_REPLY | FLOW_INFRASTRUCTURE, u32::MAX)
    };
    t.v4.insert(FlowKeyV4::new(APP, CTL, proto::TCP, 8443), mgmt);
    t.local.push(LocalAddrKey::v4(7, APP));
    let answer = V4::tcp(CTL, APP, 8443, 40000, tcp_flags::ACK).frame();
    assert_eq!(verdict(&t, &answer, PortRole::Management, 5), (Action::Pass, Reason::PassReply));
    // Nothing for anyone else, even with an entry that would match: the
    // controller to a patient host, or a patient flow arriving there.
    let to_patient = V4::tcp(CTL, P1, 8443, 40000, tcp_flags::ACK).frame();
    assert_eq!(
        verdict(&t, &to_patient, PortRole::Management, 5),
        (Action::Drop, Reason::DropNoFlow)
    );
    let patient_flow = V4::tcp(P1, EXT, 40000, 443, tcp_flags::SYN).frame();
    assert_eq!(verdict(&t, &patient_flow, PortRole::Management, 5).0, Action::Drop);
    let reply_to_p1 = V4::tcp(EXT, P1, 443, 40000, tcp_flags::ACK).frame();
    assert_eq!(verdict(&t, &reply_to_p1, PortRole::Management, 5).0, Action::Drop);
    // A new connection from the controller to the appliance: not an answer.
    let syn = V4::tcp(CTL, APP, 8443, 40000, tcp_flags::SYN).frame();
    assert_eq!(verdict(&t, &syn, PortRole::Management, 5).0, Action::Drop);
    let forward = V4::tcp(APP, CTL, 40000, 8443, tcp_flags::SYN).frame();
    t.local.push(LocalAddrKey::v4(7, CTL));
    assert_eq!(verdict(&t, &forward, PortRole::Management, 5).0, Action::Drop);
    // The management entry is inert on the boundary's ports.
    for role in [PortRole::Patient, PortRole::Uplink] {
        assert_eq!(verdict(&t, &answer, role, 5), (Action::Drop, Reason::DropWrongPort));
        assert_eq!(verdict(&t, &forward, role, 5), (Action::Drop, Reason::DropWrongPort));
    }
    // Leaving through the management port: the appliance's own packets only.
    let egress = |frame: &[u8]| {
        let f = parse(frame).unwrap();
        crate::verdict::decide_management_egress(&f, 7, &t).action
    };
    assert_eq!(egress(&forward), Action::Pass, "the agent's own connection");
    assert_eq!(egress(&arp(1, CTL)), Action::Pass, "ARP for the controller");
    assert_eq!(egress(&patient_flow), Action::Drop, "forwarded from a patient host");
    let from_uplink = V4::udp(EXT, CTL, 40000, 53).frame();
    assert_eq!(egress(&from_uplink), Action::Drop, "forwarded from the uplink side");
    assert_eq!(PortRole::from_u8(3), Some(PortRole::Management));
    assert_eq!(PortRole::Management.opposite(), PortRole::Management);
}

#[test]
fn expiry_is_checked_and_clock_read_only_when_needed() {
    let t = web_table();
    let ok = V4::tcp(P1, EXT, 40000, 443, tcp_flags::ACK).frame();
    assert_eq!(verdict(&t, &ok, PortRole::Patient, 999).0, Action::Pass);
    assert_eq!(verdict(&t, &ok, PortRole::Patient, 1_000), (Action::Drop, Reason::DropExpired));

    let mut t = Table::default();
    let infra = FlowKeyV4::new(P1, EXT, proto::UDP, 123);
    t.v4.insert(infra, entry(0, FLOW_INFRASTRUCTURE, 2));
    let reads = Cell::new(0);
    let f = parse(&V4::udp(P1, EXT, 123, 123).frame()[..]).unwrap();
    let d = decide(&f, PortRole::Patient, 7, &t, &SETTINGS, || {
        reads.set(reads.get() + 1);
        u64::MAX
    });
    assert_eq!((d.action, reads.get()), (Action::Pass, 0));
    // Without the infrastructure flag "no expiry" means "never".
    t.v4.insert(infra, entry(0, 0, 2));
    assert_eq!(
        verdict(&t, &V4::udp(P1, EXT, 123, 123).frame(), PortRole::Patient, 0).1,
        Reason::DropExpired
    );
}

#[test]
fn replies_are_narrow() {
    let t = web_table();
    let reply = |flags, dport| V4::tcp(EXT, P1, 443, dport, flags).frame();
    let d = parse(&reply(tcp_flags::SYN | tcp_flags::ACK, 40000)[..]).unwrap();
    let d = decide(&d, PortRole::Uplink, 7, &t, &SETTINGS, || 10);
    assert_eq!((d.action, d.reason), (Action::Pass, Reason::PassReply));
    assert_eq!(d.dir, Direction::Reply);
    assert_eq!(verdict(&t, &reply(tcp_flags::ACK, 40000), PortRole::Uplink, 10).0, Action::Pass);
    // The far side cannot open a connection, reach a privileged port, or reply
    // through the patient port.
    assert_eq!(
        verdict(&t, &reply(tcp_flags::SYN, 40000), PortRole::Uplink, 10).1,
        Reason::DropReplySyn
    );
    assert_eq!(
        verdict(&t, &reply(tcp_flags::ACK, 22), PortRole::Uplink, 10).1,
        Reason::DropReplyPort
    );
    assert_eq!(
        verdict(&t, &reply(tcp_flags::ACK, 40000), PortRole::Patient, 10).1,
        Reason::DropWrongPort
    );
    assert_eq!(
        verdict(&t, &reply(tcp_flags::ACK, 40000), PortRole::Uplink, 1_000).1,
        Reason::DropExpired
    );
    // Other source port: no entry at all.
    let other = V4::tcp(EXT, P1, 444, 40000, tcp_flags::ACK).frame();
    assert_eq!(verdict(&t, &other, PortRole::Uplink, 10).1, Reason::DropNoFlow);
    // An entry without the reply flag allows no return traffic.
    let mut oneway = Table::default();
    oneway.v4.insert(FlowKeyV4::new(P1, EXT, proto::UDP, 514), entry(1_000, 0, 3));
    let r = V4::udp(EXT, P1, 514, 40000).frame();
    assert_eq!(verdict(&oneway, &r, PortRole::Uplink, 10).1, Reason::DropNoFlow);
}

#[test]
fn icmp_echo_only() {
    let mut t = Table::default();
    t.v4.insert(FlowKeyV4::new(P1, EXT, proto::ICMP, 0), entry(1_000, FLOW_ALLOW_REPLY, 4));
    assert_eq!(
        verdict(&t, &V4::icmp(P1, EXT, 8).frame(), PortRole::Patient, 1).1,
        Reason::PassFlow
    );
    assert_eq!(
        verdict(&t, &V4::icmp(EXT, P1, 0).frame(), PortRole::Uplink, 1).1,
        Reason::PassReply
    );
    assert_eq!(
        verdict(&t, &V4::icmp(P1, EXT, 13).frame(), PortRole::Patient, 1).1,
        Reason::DropIcmpType
    );
    assert_eq!(
        verdict(&t, &V4::icmp(EXT, P1, 8).frame(), PortRole::Uplink, 1).1,
        Reason::DropIcmpType
    );
    assert_eq!(
        verdict(&t, &V4::icmp(EXT, P1, 3).frame(), PortRole::Uplink, 1).1,
        Reason::DropIcmpType
    );
}

#[test]
fn ipv6_flows() {
    let mut t = Table::default();
    t.v6.insert(FlowKeyV6::new(P1_6, EXT_6, proto::TCP, 443), entry(1_000, FLOW_ALLOW_REPLY, 5));
    let fwd = v6_frame(P1_6, EXT_6, proto::TCP, 64, &l4(proto::TCP, 40000, 443, tcp_flags::SYN, 0));
    assert_eq!(verdict(&t, &fwd, PortRole::Patient, 1), (Action::Pass, Reason::PassFlow));
    let rev = v6_frame(EXT_6, P1_6, proto::TCP, 64, &l4(proto::TCP, 443, 40000, tcp_flags::ACK, 0));
    assert_eq!(verdict(&t, &rev, PortRole::Uplink, 1), (Action::Pass, Reason::PassReply));
    let other =
        v6_frame(P1_6, EXT_6, proto::TCP, 64, &l4(proto::TCP, 40000, 80, tcp_flags::SYN, 0));
    assert_eq!(verdict(&t, &other, PortRole::Patient, 1), (Action::Drop, Reason::DropNoFlow));
}

#[test]
fn arp_and_nd_need_the_appliance_as_target() {
    let mut t = Table::default();
    t.local.push(LocalAddrKey::v4(7, [10, 77, 0, 1]));
    t.local.push(LocalAddrKey::v6(7, P1_6));
    assert_eq!(verdict(&t, &arp(1, [10, 77, 0, 1]), PortRole::Patient, 0).1, Reason::PassArp);
    assert_eq!(verdict(&t, &arp(2, [10, 77, 0, 1]), PortRole::Patient, 0).1, Reason::PassArp);
    assert_eq!(verdict(&t, &arp(1, [10, 77, 0, 12]), PortRole::Patient, 0).1, Reason::DropArp);
    let ns = l4(proto::ICMPV6, 0, 0, 0, icmp::ND_NEIGHBOR_SOLICIT);
    let f = v6_frame(EXT_6, P1_6, proto::ICMPV6, 255, &ns);
    assert_eq!(verdict(&t, &f, PortRole::Patient, 0).1, Reason::PassNd);
    let f = v6_frame(P1_6, EXT_6, proto::ICMPV6, 255, &ns);
    assert_eq!(verdict(&t, &f, PortRole::Patient, 0).1, Reason::DropNd, "routable ND target");
}
