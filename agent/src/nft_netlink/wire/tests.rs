//! The encoding against the bytes nft sends, and the parsing of acks.

use airlock_policy::{
    nft::{self, Family, SetKind},
    nft_delta::element_delta,
    Expiry, FlowEntry, Ingress, Protocol,
};

use super::*;

const S: u64 = 1_000_000_000;
const NOW: u64 = 1_000 * S;

fn entry(
    src: &str,
    dst: &str,
    proto: Protocol,
    port: Option<u16>,
    rule: u32,
    version: u32,
    expiry: Expiry,
) -> FlowEntry {
    let flow = Flow::new(src.parse().unwrap(), dst.parse().unwrap(), proto, port).unwrap();
    let infra = expiry == Expiry::Infrastructure;
    FlowEntry::new(flow, rule, version, Ingress::Patient, true, expiry, infra).unwrap()
}

fn input() -> nft::NftInput {
    nft::NftInput::new(1)
        .with_ports(Ingress::Patient, ["patient0"])
        .unwrap()
        .with_ports(Ingress::Uplink, ["uplink0"])
        .unwrap()
}

fn v4(rule: u32, expiry: Expiry) -> FlowEntry {
    entry("10.77.0.13", "10.78.0.100", Protocol::Tcp, Some(443), rule, 1, expiry)
}

fn v6() -> FlowEntry {
    entry(
        "fd00:a1:77::11",
        "fd00:a1:78::100",
        Protocol::Udp,
        Some(514),
        2,
        3,
        Expiry::Infrastructure,
    )
}

fn hdr(len: u32, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&[family, 0]);
    v.extend_from_slice(&res_id.to_be_bytes());
    v
}

/// The element lists below are byte for byte what `nft -f` (nftables
/// 1.0.6) sent for
/// `add element inet airlock flow4_patient { 10.77.0.13 . 10.78.0.100 . tcp . 443 timeout 100s comment "rule 3 v1" }`,
/// `add element inet airlock flow6_patient { fd00:a1:77::11 . fd00:a1:78::100 . udp . 514 comment "rule 2 v3" }` and
/// `delete element inet airlock flow4_patient { 10.77.0.13 . 10.78.0.100 . tcp . 443 }`
/// (`strace -e sendmsg -x nft -f …`, Debian 12, x86-64). The message
/// headers differ from nft's on purpose: `NLM_F_ACK` on every element
/// message (nft 1.0.6 asks for none), no `NFTA_SET_ELEM_LIST_SET_ID`
/// (only needed for a set created in the same batch).
const NFT_DEL_V4: &[u8] = b"\x1c\x00\x01\x80\x18\x00\x01\x80\x14\x00\x01\x00\x0a\x4d\x00\x0d\x0a\x4e\x00\x64\x06\x00\x00\x00\x01\xbb\x00\x00";
const NFT_ADD_V4: &[u8] = b"\x38\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x01\x86\xa0\x18\x00\x01\x80\x14\x00\x01\x00\x0a\x4d\x00\x0d\x0a\x4e\x00\x64\x06\x00\x00\x00\x01\xbb\x00\x00\x10\x00\x06\x00\x00\x0a\x72\x75\x6c\x65\x20\x33\x20\x76\x31\x00";
const NFT_ADD_V6: &[u8] = b"\x44\x00\x01\x80\x30\x00\x01\x80\x2c\x00\x01\x00\xfd\x00\x00\xa1\x00\x77\x00\x00\x00\x00\x00\x00\x00\x00\x00\x11\xfd\x00\x00\xa1\x00\x78\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x11\x00\x00\x00\x02\x02\x00\x00\x10\x00\x06\x00\x00\x0a\x72\x75\x6c\x65\x20\x32\x20\x76\x33\x00";

/// One element message as the kernel expects it, around an element list.
fn element_msg(kind: u16, flags: u16, seq: u32, set: &[u8], elements: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(b"\x0c\x00\x01\x00airlock\x00"); // NFTA_SET_ELEM_LIST_TABLE
    body.extend_from_slice(&(4 + set.len() as u16).to_ne_bytes());
    body.extend_from_slice(b"\x02\x00"); // NFTA_SET_ELEM_LIST_SET
    body.extend_from_slice(set);
    body.resize(align4(body.len()), 0);
    body.extend_from_slice(&(4 + elements.len() as u16).to_ne_bytes());
    body.extend_from_slice(b"\x03\x80"); // NFTA_SET_ELEM_LIST_ELEMENTS, nested
    body.extend_from_slice(elements);
    let mut m = hdr(20 + body.len() as u32, kind, flags, seq, NFPROTO_INET, 0);
    m.extend_from_slice(&body);
    m
}

#[test]
fn golden_batch_for_one_v4_and_one_v6_element() {
    // Old: the v4 flow as rule 9. New: the same key as rule 3 (100 s left),
    // and a v6 infrastructure flow.
    let old = nft::compile(&input(), &[v4(9, Expiry::At(NOW + 50 * S))], NOW);
    let new = nft::compile(&input(), &[v4(3, Expiry::At(NOW + 100 * S)), v6()], NOW);
    let delta = element_delta(&old, &new).unwrap();
    let batch = encode(&delta, 1);

    let mut want = hdr(20, 0x10, 0x01, 1, 0, 10); // NFNL_MSG_BATCH_BEGIN
                                                  // DELSETELEM: NLM_F_REQUEST | NLM_F_ACK.
    want.extend(element_msg(0x0a0e, 0x05, 2, b"flow4_patient\x00", NFT_DEL_V4));
    // NEWSETELEM: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE.
    want.extend(element_msg(0x0a0c, 0x405, 3, b"flow4_patient\x00", NFT_ADD_V4));
    want.extend(element_msg(0x0a0c, 0x405, 4, b"flow6_patient\x00", NFT_ADD_V6));
    want.extend(hdr(20, 0x11, 0x01, 5, 0, 10)); // NFNL_MSG_BATCH_END
    assert_eq!(batch.bytes, want);
    assert_eq!((batch.begin_seq, batch.end_seq), (1, 5));
    let seqs: Vec<_> = batch.messages.iter().map(|m| (m.seq, m.op)).collect();
    assert_eq!(seqs, [(2, Op::Delete), (3, Op::Add), (4, Op::Add)]);
}

#[test]
fn keys_fill_whole_registers() {
    let set = |family, kind| SetId { family, ingress: Ingress::Patient, kind };
    let echo4 =
        entry("10.77.0.11", "10.78.0.1", Protocol::Icmp, None, 1, 1, Expiry::Infrastructure);
    assert_eq!(
        key_bytes(set(Family::V4, SetKind::Echo), &echo4.flow),
        [10, 77, 0, 11, 10, 78, 0, 1]
    );
    let udp4 =
        entry("10.77.0.11", "10.78.0.53", Protocol::Udp, Some(53), 1, 1, Expiry::Infrastructure);
    assert_eq!(
        key_bytes(set(Family::V4, SetKind::FlowNoReply), &udp4.flow),
        [10, 77, 0, 11, 10, 78, 0, 53, 17, 0, 0, 0, 0, 53, 0, 0]
    );
    let echo6 = entry("fd00::1", "fd00::2", Protocol::Icmp, None, 1, 1, Expiry::Infrastructure);
    assert_eq!(key_bytes(set(Family::V6, SetKind::EchoNoReply), &echo6.flow).len(), 32);
    assert_eq!(key_bytes(set(Family::V6, SetKind::Flow), &v6().flow).len(), 40);
    assert_eq!(comment_udata("rule 3 v1").unwrap(), b"\x00\x0arule 3 v1\x00");
    assert_eq!(comment_udata(&"x".repeat(300)), None);
}

#[test]
fn large_changes_are_split_and_every_element_can_be_located() {
    let entries: Vec<FlowEntry> = (0..3000u32)
        .map(|i| {
            let src = format!("10.64.{}.{}", i / 250, i % 250 + 1);
            entry(&src, "10.78.0.100", Protocol::Tcp, Some(443), i + 1, 1, Expiry::At(NOW + S))
        })
        .collect();
    let new = nft::compile(&input(), &entries, NOW);
    let empty = nft::compile(&input(), &[], NOW);
    let delta = element_delta(&empty, &new).unwrap();
    let batch = encode(&delta, 7);
    assert!(batch.messages.len() > 1, "split into several messages");
    assert_eq!(batch.begin_seq, 7);
    assert_eq!(batch.end_seq, 7 + batch.messages.len() as u32 + 1);
    let mut seen = 0;
    for (i, m) in batch.messages.iter().enumerate() {
        assert_eq!(m.seq, 8 + i as u32);
        let len = u32::from_ne_bytes(batch.bytes[m.start..m.start + 4].try_into().unwrap());
        assert!(len < 65_535, "message {i}: {len} bytes");
        assert_eq!(m.locate(m.table_attr), Located::Table);
        assert_eq!(m.locate(m.set_attr), Located::Set);
        for &(at, index) in &m.elements {
            assert_eq!(index, seen, "elements in order, none lost");
            // The offset the kernel reports is that of NFTA_LIST_ELEM.
            assert_eq!(&batch.bytes[m.start + at + 2..m.start + at + 4], b"\x01\x80");
            assert_eq!(m.locate(at), Located::Element(index));
            assert_eq!(m.locate(at + 8), Located::Element(index), "inside the element");
            seen += 1;
        }
    }
    assert_eq!(seen, 3000);
}

#[test]
fn acknowledgements_and_extended_errors_are_read() {
    // An ack (error 0) for seq 2, then ENOENT for seq 3 with the extended
    // ack: a message and the offending attribute's offset (as the kernel
    // sends them with NETLINK_CAP_ACK | NETLINK_EXT_ACK).
    let mut buf = hdr(36, NLMSG_ERROR, NLM_F_CAPPED, 2, 0, 0)[..16].to_vec();
    buf.extend_from_slice(&0i32.to_ne_bytes());
    buf.extend_from_slice(&hdr(120, 0x0a0c, 0x405, 2, 0, 0)[..16]);
    let mut err = hdr(0, NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 3, 0, 0)[..16].to_vec();
    err.extend_from_slice(&(-2i32).to_ne_bytes());
    err.extend_from_slice(&hdr(120, 0x0a0e, 0x05, 3, 0, 0)[..16]);
    err.extend_from_slice(b"\x0f\x00\x01\x00no element\x00\x00"); // NLMSGERR_ATTR_MSG
    err.extend_from_slice(b"\x08\x00\x02\x00");
    err.extend_from_slice(&44u32.to_ne_bytes()); // NLMSGERR_ATTR_OFFS
    let len = err.len() as u32;
    err[0..4].copy_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&err);
    buf.extend_from_slice(&hdr(20, nft_type(0), 0, 4, 1, 0)); // some other message
    let got = parse(&buf).unwrap();
    assert_eq!(
        got,
        [
            Incoming::Ack(Ack { seq: 2, errno: 0, msg: None, offset: None }),
            Incoming::Ack(Ack {
                seq: 3,
                errno: 2,
                msg: Some("no element".into()),
                offset: Some(44)
            }),
            Incoming::Other { seq: 4, kind: 0x0a00 },
        ]
    );
    assert_eq!(parse(&buf[..buf.len() - 4]), None, "a cut message is refused");
    assert_eq!(parse(&[]), Some(vec![]));
}

#[test]
fn the_table_lookup() {
    let mut want = hdr(32, 0x0a01, 0x05, 9, NFPROTO_INET, 0);
    want.extend_from_slice(b"\x0c\x00\x01\x00airlock\x00");
    assert_eq!(get_table("airlock", 9), want);
}
