//! The bytes: nf_tables netlink messages for set-element changes, and the
//! kernel's acknowledgements. Pure functions, no socket.
//!
//! Constants are the kernel's UAPI values (`/usr/include/linux/netlink.h`,
//! `netfilter.h`, `netfilter/nfnetlink.h`, `netfilter/nf_tables.h`), named as
//! there. The one that is not in the kernel's headers — the comment's type in
//! an element's user data — is libnftnl's (`include/libnftnl/udata.h`), which
//! is what `nft` writes and reads.

use std::net::IpAddr;

use airlock_policy::{
    nft::{NftElement, SetId},
    nft_delta::ElementDelta,
    Flow,
};

// <linux/netlink.h>
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 0x2;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
// <linux/netfilter/nfnetlink.h>
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NLMSG_MIN_TYPE: u16 = 0x10;
const NFNL_MSG_BATCH_BEGIN: u16 = NLMSG_MIN_TYPE;
const NFNL_MSG_BATCH_END: u16 = NLMSG_MIN_TYPE + 1;
const NFNETLINK_V0: u8 = 0;
// <linux/netfilter.h>
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
// <linux/netfilter/nf_tables.h>: enum nf_tables_msg_types
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
// enum nft_table_attributes
const NFTA_TABLE_NAME: u16 = 1;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
/// Each field of a concatenated key starts on a 32-bit register.
const NFT_REG32_SIZE: usize = 4;
const NFT_USERDATA_MAXLEN: usize = 256;
// libnftnl include/libnftnl/udata.h: enum nftnl_udata_set_elem_types
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;

/// The nf_tables message type `t` (`NFNL_SUBSYS_NFTABLES << 8 | t`).
const fn nft_type(t: u16) -> u16 {
    NFNL_SUBSYS_NFTABLES << 8 | t
}

/// `nla_len` is a u16: the elements of one set go into messages whose
/// element list stays below this many bytes (nft splits the same way).
const MAX_ELEMENT_BYTES: usize = 60_000;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages and attributes with the kernel's 4-byte alignment.
/// Lengths are patched when a message or a nested attribute ends.
#[derive(Debug, Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Starts a message: `struct nlmsghdr` then `struct nfgenmsg`.
    fn begin_msg(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched by end_msg
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0 to the kernel
        self.buf.extend_from_slice(&[family, NFNETLINK_V0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end_msg(&mut self, start: usize) {
        self.pad();
        let len = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Starts an attribute; returns its offset for `end_attr`.
    fn begin_attr(&mut self, kind: u16) -> usize {
        self.pad();
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        start
    }

    /// Ends an attribute: its length excludes the trailing padding, which the
    /// next attribute (or the message end) adds.
    fn end_attr(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> usize {
        let at = self.begin_attr(kind);
        self.buf.extend_from_slice(payload);
        self.end_attr(at);
        at
    }

    fn attr_strz(&mut self, kind: u16, s: &str) -> usize {
        let at = self.begin_attr(kind);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.end_attr(at);
        at
    }

    fn nested(&mut self, kind: u16) -> usize {
        self.begin_attr(kind | NLA_F_NESTED)
    }

    /// Ends a nested attribute: its length includes the padding of its last
    /// member (as libmnl, and so nft, writes it).
    fn end_nested(&mut self, start: usize) {
        self.pad();
        self.end_attr(start);
    }
}

/// The element's key as the kernel stores it: the concatenation of its
/// fields, each padded to whole 32-bit registers — `ipv4_addr . ipv4_addr .
/// inet_proto . inet_service` is 4 + 4 + 4 (protocol, 3 zero bytes) + 4 (port
/// in network order, 2 zero bytes) = 16 bytes; with IPv6 addresses 40; the
/// `… . …` address pairs of the echo sets 8 and 32.
pub fn key_bytes(set: SetId, flow: &Flow) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    let mut v6 = false;
    for addr in [flow.src(), flow.dst()] {
        match addr {
            IpAddr::V4(a) => key.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => {
                v6 = true;
                key.extend_from_slice(&a.octets());
            }
        }
    }
    if set.kind.has_port() {
        let mut proto = [0u8; NFT_REG32_SIZE];
        proto[0] = flow.protocol().number(v6);
        key.extend_from_slice(&proto);
        let mut port = [0u8; NFT_REG32_SIZE];
        port[..2].copy_from_slice(&flow.port().unwrap_or(0).to_be_bytes());
        key.extend_from_slice(&port);
    }
    key
}

/// nft's user data for an element comment: one TLV (type, length, the text
/// with its NUL). `None` when it would not fit (never for `rule N vV`).
pub fn comment_udata(comment: &str) -> Option<Vec<u8>> {
    let len = u8::try_from(comment.len() + 1).ok()?;
    if usize::from(len) + 2 > NFT_USERDATA_MAXLEN {
        return None;
    }
    let mut v = Vec::with_capacity(usize::from(len) + 2);
    v.extend_from_slice(&[NFTNL_UDATA_SET_ELEM_COMMENT, len]);
    v.extend_from_slice(comment.as_bytes());
    v.push(0);
    Some(v)
}

/// One `NFTA_LIST_ELEM`: (timeout,) key (, user data), in the order nft sends them.
fn write_element(w: &mut Writer, set: SetId, flow: &Flow, added: Option<&NftElement>) {
    let el = w.nested(NFTA_LIST_ELEM);
    if let Some(secs) = added.and_then(|e| e.timeout_secs) {
        w.attr(NFTA_SET_ELEM_TIMEOUT, &secs.saturating_mul(1000).to_be_bytes());
    }
    let key = w.nested(NFTA_SET_ELEM_KEY);
    w.attr(NFTA_DATA_VALUE, &key_bytes(set, flow));
    w.end_nested(key);
    if let Some(udata) = added.and_then(|e| comment_udata(&e.comment())) {
        w.attr(NFTA_SET_ELEM_USERDATA, &udata);
    }
    w.end_nested(el);
}

/// Whether a message removes or adds elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `NFT_MSG_DELSETELEM`.
    Delete,
    /// `NFT_MSG_NEWSETELEM` (with `NLM_F_CREATE`, like `nft add element`).
    Add,
}

/// Where things are in one element message, to name what the kernel refused
/// (its extended ack gives the offending attribute's offset in the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageMap {
    /// The message's sequence number.
    pub seq: u32,
    /// Removal or addition.
    pub op: Op,
    /// The set.
    pub set: SetId,
    /// The message's offset in the batch.
    pub start: usize,
    /// Offsets in the message of the table and set name attributes.
    pub table_attr: usize,
    /// See `table_attr`.
    pub set_attr: usize,
    /// Per element: its `NFTA_LIST_ELEM`'s offset in the message and its
    /// index in the delta's removals or additions.
    pub elements: Vec<(usize, usize)>,
}

impl MessageMap {
    /// What an extended-ack offset points at.
    pub fn locate(&self, offset: usize) -> Located {
        if offset == self.table_attr {
            return Located::Table;
        }
        if offset == self.set_attr {
            return Located::Set;
        }
        match self.elements.iter().rev().find(|(at, _)| *at <= offset) {
            Some(&(_, index)) => Located::Element(index),
            None => Located::Message,
        }
    }
}

/// What in a message an error refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Located {
    /// The table name (no such table).
    Table,
    /// The set name (no such set).
    Set,
    /// The element at this index of the delta's removals or additions.
    Element(usize),
    /// The message as a whole.
    Message,
}

/// A whole transaction: batch begin, the element messages, batch end.
#[derive(Debug)]
pub struct Batch {
    /// The bytes for one `sendmsg`.
    pub bytes: Vec<u8>,
    /// Sequence numbers of the begin and end messages.
    pub begin_seq: u32,
    /// See `begin_seq`.
    pub end_seq: u32,
    /// The element messages in order (`seq` = `begin_seq + 1 + index`).
    pub messages: Vec<MessageMap>,
}

/// Encodes `delta` as one nf_tables batch (one transaction: the kernel
/// commits every message or none). Removals come first, then additions; the
/// elements of one set share a message (split below the attribute size
/// limit). Every element message asks for an acknowledgement (`NLM_F_ACK`).
pub fn encode(delta: &ElementDelta, first_seq: u32) -> Batch {
    let mut w = Writer::default();
    let mut seq = first_seq;
    let begin =
        w.begin_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES);
    w.end_msg(begin);
    let begin_seq = seq;
    let mut messages = Vec::new();
    let removals = delta.removals().iter().map(|(s, f)| (*s, f, None));
    let additions = delta.additions().iter().map(|(s, e)| (*s, &e.flow, Some(e)));
    for (op, items) in
        [(Op::Delete, removals.collect::<Vec<_>>()), (Op::Add, additions.collect::<Vec<_>>())]
    {
        let mut open: Option<(MessageMap, usize)> = None; // the message and its element list
        for (index, (set, flow, added)) in items.into_iter().enumerate() {
            let full = open
                .as_ref()
                .is_some_and(|(m, list)| m.set != set || w.buf.len() - list > MAX_ELEMENT_BYTES);
            if full {
                if let Some((m, list)) = open.take() {
                    messages.push(close(&mut w, m, list));
                }
            }
            let (m, _) = open.get_or_insert_with(|| {
                seq = seq.wrapping_add(1);
                open_message(&mut w, delta.table(), op, set, seq)
            });
            w.pad();
            let at = w.buf.len() - m.start;
            m.elements.push((at, index));
            write_element(&mut w, set, flow, added);
        }
        if let Some((m, list)) = open.take() {
            messages.push(close(&mut w, m, list));
        }
    }
    seq = seq.wrapping_add(1);
    let end =
        w.begin_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES);
    w.end_msg(end);
    Batch { bytes: w.buf, begin_seq, end_seq: seq, messages }
}

fn open_message(w: &mut Writer, table: &str, op: Op, set: SetId, seq: u32) -> (MessageMap, usize) {
    let (kind, flags) = match op {
        Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
    };
    let start = w.begin_msg(nft_type(kind), flags, seq, NFPROTO_INET, 0);
    let table_attr = w.attr_strz(NFTA_SET_ELEM_LIST_TABLE, table) - start;
    let set_attr = w.attr_strz(NFTA_SET_ELEM_LIST_SET, &set.to_string()) - start;
    let list = w.nested(NFTA_SET_ELEM_LIST_ELEMENTS);
    let map = MessageMap { seq, op, set, start, table_attr, set_attr, elements: Vec::new() };
    (map, list)
}

fn close(w: &mut Writer, map: MessageMap, list: usize) -> MessageMap {
    w.end_nested(list);
    w.end_msg(map.start);
    map
}

/// `NFT_MSG_GETTABLE` for one `inet` table, acknowledged: the answer is the
/// table (then an ack) or an error (`ENOENT` when there is no such table).
pub fn get_table(name: &str, seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let start =
        w.begin_msg(nft_type(NFT_MSG_GETTABLE), NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO_INET, 0);
    w.attr_strz(NFTA_TABLE_NAME, name);
    w.end_msg(start);
    w.buf
}

/// One `NLMSG_ERROR` from the kernel: an acknowledgement when `errno` is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The sequence number of the message it answers.
    pub seq: u32,
    /// 0, or the (positive) errno.
    pub errno: i32,
    /// The kernel's extended-ack message, if it sent one.
    pub msg: Option<String>,
    /// The offset of the offending attribute in the answered message, if sent.
    pub offset: Option<usize>,
}

/// What one received datagram holds, message by message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// An acknowledgement or error.
    Ack(Ack),
    /// Any other message (e.g. the table a `GETTABLE` asked for).
    Other {
        /// Its sequence number.
        seq: u32,
        /// Its type.
        kind: u16,
    },
}

/// Splits a received datagram into its messages. `None` when it is not
/// well-formed netlink (a length that runs past the end).
pub fn parse(mut buf: &[u8]) -> Option<Vec<Incoming>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let flags = u16::from_ne_bytes(buf[6..8].try_into().ok()?);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(if kind == NLMSG_ERROR {
            Incoming::Ack(ack(seq, flags, body)?)
        } else {
            Incoming::Other { seq, kind }
        });
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Some(out)
}

/// `struct nlmsgerr` (error, then the original header — only the header:
/// the socket sets `NETLINK_CAP_ACK`), then extended-ack attributes.
fn ack(seq: u32, flags: u16, body: &[u8]) -> Option<Ack> {
    let error = i32::from_ne_bytes(body.get(0..4)?.try_into().ok()?);
    let orig_len = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?) as usize;
    // Capped: only the header; otherwise the whole original message.
    let orig =
        if error == 0 || flags & NLM_F_CAPPED != 0 { NLMSG_HDRLEN } else { align4(orig_len) };
    let mut a = Ack { seq, errno: error.saturating_neg(), msg: None, offset: None };
    if flags & NLM_F_ACK_TLVS == 0 {
        return Some(a);
    }
    let mut tlvs = body.get(4 + orig..).unwrap_or_default();
    while tlvs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([tlvs[0], tlvs[1]]));
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
        let payload = tlvs.get(4..len)?;
        match kind {
            NLMSGERR_ATTR_MSG => {
                let text = payload.split(|b| *b == 0).next().unwrap_or_default();
                a.msg = Some(String::from_utf8_lossy(text).into_owned());
            }
            NLMSGERR_ATTR_OFFS => {
                a.offset = Some(u32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?) as usize);
            }
            _ => {}
        }
        tlvs = tlvs.get(align4(len.max(4))..).unwrap_or_default();
    }
    Some(a)
}

#[cfg(test)]
mod tests;
