//! The nftables layer: the same [`FlowEntry`]s the eBPF maps hold, compiled into
//! one `inet` table — the second, independent enforcer of the policy.
//!
//! [`compile`] turns (port names, entries, now) into an [`NftRuleset`], a
//! structured value. Its `Display` is the text for `nft -f`; its
//! [`NftRuleset::decide`] evaluates the same structure the way nftables would,
//! so that the property tests can hold it against the eBPF verdict
//! (`airlock_ebpf_common::verdict::decide`).
//!
//! # The table
//!
//! ```text
//! add table inet airlock        ┐ one `nft -f` = one transaction: make sure the
//! delete table inet airlock     │ table exists, delete it, define it anew, so
//! table inet airlock { … }      ┘ the whole table is replaced atomically
//!   set patient_ports, uplink_ports    type ifname (the appliance's ports by role)
//!   set flow4_<role>         saddr . daddr . l4proto . dport   TCP/UDP entries entering
//!                                                    on <role> that allow replies
//!   set flownoreply4_<role>  the same key            those that do not
//!   set echo4_<role>         saddr . daddr           ICMP echo entries entering on
//!                                                    <role> that allow replies
//!   set echonoreply4_<role>  the same key            those that do not
//!   (and the same four for IPv6: flow6_…, flownoreply6_…, echo6_…, echonoreply6_…)
//!   chain forward   type filter hook forward priority filter; policy drop;
//!     ct state invalid counter drop
//!     per family and entry role R (opposite side R'):
//!       iifname @R_ports  saddr . daddr . l4proto . dport @flowF_R          accept
//!       iifname @R_ports  saddr . daddr . l4proto . dport @flownoreplyF_R   accept
//!       iifname @R_ports  icmp echo-request  saddr . daddr @echoF_R        accept
//!       iifname @R_ports  icmp echo-request  saddr . daddr @echonoreplyF_R accept
//!       iifname @R'_ports ct established reply  tcp, not a bare SYN, dport ≥ floor
//!                         daddr . saddr . l4proto . sport @flowF_R         accept
//!       iifname @R'_ports ct established reply  udp dport ≥ floor   (same lookup) accept
//!       iifname @R'_ports ct established reply  icmp echo-reply
//!                         daddr . saddr @echoF_R                           accept
//!     counter drop      (explicit: the chain policy alone leaked packets during
//!                        an atomic table replacement — measured)
//!   chain guard     type filter hook forward priority -1; policy accept;
//!     iifname != @patient_ports iifname != @uplink_ports counter drop
//!     oifname != @patient_ports oifname != @uplink_ports counter drop
//!                       (a packet forwarded from or to any other interface — a
//!                        management port, one not in the configuration — is
//!                        dropped before the forward chain, whatever the sets hold)
//! ```
//!
//! Every entry is an element of exactly one set: replies are looked up with the
//! packet reversed in the same set as the forward direction, so nft loads one
//! element per entry. Entries without replies (`reply = false` in the policy)
//! are kept in the `…noreply…` sets, which no reply rule looks at.
//!
//! Every element carries `comment "rule <id> v<version>"`, a per-element counter
//! (the sets are declared with `counter`; an element of a `flow`/`echo` set
//! therefore counts the packets and bytes of *both* directions together, unlike
//! the eBPF value, which counts replies separately; an element of a `…noreply…`
//! set counts the forward direction only) and,
//! when the entry expires, `timeout <secs>s`: the time left at compile time,
//! rounded *up* to whole seconds (at least 1 s, at most [`MAX_TIMEOUT_SECS`]).
//! Infrastructure entries have no timeout. Entries already expired at compile
//! time are left out, and so are management entries (the agent's own way to
//! its controller: eBPF only). [`element_of`] is that placement of one entry.
//! The table is installed from this text; later element changes
//! ([`crate::nft_delta`]) reach the kernel as netlink messages the agent
//! builds from the same [`NftElement`]s (the same key layout, timeout and
//! comment), so `nft list` shows the same table either way. Replies are
//! matched only with `ct state established` in
//! the reply direction *and* the entry's element: there is no bare
//! "established accept", so an entry that expires or is removed also stops the
//! connections it let through.
//!
//! Only forwarded traffic is filtered. The appliance's own traffic (the `input`
//! and `output` hooks: management, the agent, WireGuard) is out of scope for this
//! step; this table has no chains there, so it neither allows nor blocks it.
//!
//! Interfaces are matched by name (`iifname`), not by index: the ruleset
//! survives a port being recreated, and `nft -c` can check it where the ports
//! do not exist.
//!
//! # Determinism
//!
//! The output depends only on the input values: sets and rules come in a fixed
//! order, elements sorted by key (source, destination, protocol, port), port
//! names sorted. Entries with the same key in the same set (which policy
//! validation refuses) are merged deterministically: the element that lives
//! longest wins, then the lowest rule id, then the highest policy version.
//!
//! # The model ([`NftRuleset::decide`]) and its assumptions
//!
//! - It evaluates the forward chain of this table only, rule by rule, first
//!   match wins, `counter` has no effect on the verdict. An accept here is not
//!   final in the kernel (another table's chain may still drop); a drop is.
//! - The packet ([`PacketMeta`]) is what the forward hook sees: after
//!   conntrack's defragmentation and with the conntrack state and direction
//!   already decided. The caller supplies the state; the model does not track
//!   connections (a property test derives it from the ruleset, see the tests).
//! - `ip saddr` / `ip6 saddr` match only packets of that family; `icmp type` and
//!   `tcp flags` / `udp dport` imply the protocol; `th dport` in a key with
//!   `meta l4proto` can only hit TCP/UDP elements because no other protocol is
//!   ever in a port set.
//! - Timeouts run from the compile time: an element with timeout T compiled at
//!   `now0` stops matching at `now0 + T` (the kernel counts from the insertion,
//!   which is later, so the real element lives slightly longer; the kernel
//!   treats an element as expired from its expiry instant on, like
//!   [`FlowEntry::is_live`]). The clock is CLOCK_MONOTONIC nanoseconds; the
//!   kernel's jiffies, like it, do not advance during suspend.
//!
//! # Where the two layers differ on purpose
//!
//! - The eBPF reply check is stateless: it passes a reply-shaped packet for
//!   which no connection exists. Here a reply needs an established connection
//!   (which pins the client's port). Conversely the reply floor and the bare-SYN
//!   check are repeated here, so a connection from a privileged client port gets
//!   no replies through either layer.
//! - Timeouts have one-second resolution and are rounded up: an element lives up
//!   to a second longer than the eBPF entry (the eBPF layer closes the window on
//!   time; nftables never closes it early). Timeouts longer than
//!   [`MAX_TIMEOUT_SECS`] (~3.2 years, the largest `<n>s` that nft 1.0.6 parses)
//!   are clamped: the element then expires *before* the eBPF entry.
//! - Conntrack marks out-of-window or odd-flag TCP segments `invalid`; they are
//!   dropped here and may pass the eBPF layer.
//! - nftables sees reassembled fragments; the eBPF parser drops every fragment.
//! - Counters: an nftables element counts both directions of its flow together
//!   (replies hit the forward element); the eBPF value counts replies apart.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use airlock_ebpf_common::{
    layout::{PortRole, Settings},
    parse::{icmp, tcp_flags},
};

use crate::{
    flow::{Expiry, Flow, FlowEntry, Ingress, Protocol},
    model::MANAGEMENT_RULE_ID,
};

/// The table name used unless the input names another.
pub const DEFAULT_TABLE: &str = "airlock";

/// The guard chain's comment on its drop of packets that entered through an
/// interface that is no patient or uplink port (a management port, or one
/// not in the configuration): nothing is forwarded from it.
pub const GUARD_IN: &str = "enters through no boundary port";
/// The guard chain's comment on its drop of packets that would leave through
/// an interface that is no patient or uplink port: nothing is forwarded to it.
pub const GUARD_OUT: &str = "leaves through no boundary port";

/// The longest element timeout written, in seconds (~3.17 years): nft 1.0.6
/// (Debian 12) refuses `timeout 100000000s` ("value too large").
pub const MAX_TIMEOUT_SECS: u64 = 99_999_999;

const NS_PER_SEC: u64 = 1_000_000_000;
const TABLE_NAME_MAX: usize = 64;
/// IFNAMSIZ without the terminating NUL.
const IFNAME_MAX: usize = 15;

/// Why an [`NftInput`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NftError {
    /// A table name nft would not parse or that could collide with another tool's.
    #[error("nftables table name {name:?} is not usable: {why}")]
    TableName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An interface name that Linux or nft would not take.
    #[error("interface name {name:?} is not usable: {why}")]
    PortName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// One interface given two roles.
    #[error("interface {name:?} is named as both a patient and an uplink port")]
    PortInTwoRoles {
        /// The name.
        name: String,
    },
}

/// What the ruleset is compiled for besides the entries: the table's name, the
/// appliance's ports by role and the policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftInput {
    table: String,
    policy_version: u32,
    patient_ports: Vec<String>,
    uplink_ports: Vec<String>,
    reply_min_port: u16,
}

impl NftInput {
    /// Table [`DEFAULT_TABLE`], no ports, the default reply floor
    /// ([`Settings::EFFECTIVE_FLOOR`]).
    pub fn new(policy_version: u32) -> Self {
        Self {
            table: DEFAULT_TABLE.to_owned(),
            policy_version,
            patient_ports: Vec::new(),
            uplink_ports: Vec::new(),
            reply_min_port: Settings::EFFECTIVE_FLOOR,
        }
    }

    /// Names the table: `airlock` or `airlock_` followed by lower-case letters,
    /// digits and `_`, at most 64 bytes. (nft does not accept quoted table names,
    /// so a name that is an nft keyword — `ip`, `table`, `drop` — would not
    /// parse; the prefix rules that out and keeps clear of other tools' tables.)
    pub fn with_table(mut self, name: &str) -> Result<Self, NftError> {
        let bad = |why| Err(NftError::TableName { name: name.to_owned(), why });
        if name.len() > TABLE_NAME_MAX {
            return bad("longer than 64 bytes");
        }
        let rest = match name.strip_prefix(DEFAULT_TABLE) {
            Some(rest) => rest,
            None => return bad("must be \"airlock\" or start with \"airlock_\""),
        };
        if !(rest.is_empty() || rest.starts_with('_')) {
            return bad("must be \"airlock\" or start with \"airlock_\"");
        }
        if !rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return bad("only lower-case letters, digits and '_' are allowed");
        }
        self.table = name.to_owned();
        Ok(self)
    }

    /// Sets the interface names of the ports of one role (replacing earlier
    /// ones; duplicates are merged, order does not matter). Names are Linux
    /// interface names of 1 to 15 bytes made of letters, digits, `_`, `.` and
    /// `-`; a name may not have both roles.
    pub fn with_ports<I, S>(mut self, role: Ingress, names: I) -> Result<Self, NftError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ports = Vec::new();
        for name in names {
            let name = name.as_ref();
            check_ifname(name)?;
            if self.ports(opposite(role)).iter().any(|p| p == name) {
                return Err(NftError::PortInTwoRoles { name: name.to_owned() });
            }
            ports.push(name.to_owned());
        }
        ports.sort();
        ports.dedup();
        match role {
            Ingress::Patient => self.patient_ports = ports,
            Ingress::Uplink => self.uplink_ports = ports,
            // Management ports are in no set: the guard chain drops whatever
            // would be forwarded from or to them.
            Ingress::Management => {}
        }
        Ok(self)
    }

    /// Sets the reply floor: replies (TCP and UDP) must go to a destination port
    /// at or above it, as in the eBPF layer's `Settings`. 0 means
    /// [`Settings::EFFECTIVE_FLOOR`], as there.
    pub fn with_reply_min_port(mut self, port: u16) -> Self {
        self.reply_min_port = Settings { reply_min_port: port, pad: [0; 6] }.reply_floor();
        self
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
    /// The policy version.
    pub const fn policy_version(&self) -> u32 {
        self.policy_version
    }
    /// The ports of one role, sorted.
    pub fn ports(&self, role: Ingress) -> &[String] {
        match role {
            Ingress::Patient => &self.patient_ports,
            Ingress::Uplink => &self.uplink_ports,
            Ingress::Management => &[],
        }
    }
    /// The reply floor in force (never 0).
    pub const fn reply_min_port(&self) -> u16 {
        self.reply_min_port
    }
    /// True when rulesets compiled from `self` and `other` can differ only in
    /// set elements: the same table, ports and reply floor (the policy
    /// version is only in comments).
    pub fn same_shape(&self, other: &NftInput) -> bool {
        self.table == other.table
            && self.patient_ports == other.patient_ports
            && self.uplink_ports == other.uplink_ports
            && self.reply_min_port == other.reply_min_port
    }
}

fn check_ifname(name: &str) -> Result<(), NftError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > IFNAME_MAX {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved by Linux")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        Some("only letters, digits, '_', '.' and '-' are allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(NftError::PortName { name: name.to_owned(), why }),
        None => Ok(()),
    }
}

fn opposite(role: Ingress) -> Ingress {
    Ingress::from(PortRole::from(role).opposite())
}

fn role_name(role: Ingress) -> &'static str {
    PortRole::from(role).as_str()
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`ip`).
    V4,
    /// IPv6 (`ip6`).
    V6,
}

impl Family {
    /// The family of an address.
    pub const fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    const fn payload(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    const fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
    const fn icmp(self) -> &'static str {
        match self {
            Family::V4 => "icmp",
            Family::V6 => "icmpv6",
        }
    }
    const fn digit(self) -> &'static str {
        match self {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    }
    /// The echo-request type number of this family's ICMP.
    pub const fn echo_request(self) -> u8 {
        match self {
            Family::V4 => icmp::ECHO_REQUEST_V4,
            Family::V6 => icmp::ECHO_REQUEST_V6,
        }
    }
    /// The echo-reply type number of this family's ICMP.
    pub const fn echo_reply(self) -> u8 {
        match self {
            Family::V4 => icmp::ECHO_REPLY_V4,
            Family::V6 => icmp::ECHO_REPLY_V6,
        }
    }
}

/// What a set holds. Every entry is in exactly one set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetKind {
    /// TCP/UDP entries that allow replies; looked up as
    /// `saddr . daddr . meta l4proto . th dport`, and with the packet reversed
    /// (`daddr . saddr . meta l4proto . th sport`) for their replies.
    Flow,
    /// TCP/UDP entries without replies; looked up forward only.
    FlowNoReply,
    /// ICMP echo entries that allow replies; looked up as `saddr . daddr`, and
    /// as `daddr . saddr` for echo replies.
    Echo,
    /// ICMP echo entries without replies; looked up forward only.
    EchoNoReply,
}

impl SetKind {
    const ALL: [SetKind; 4] =
        [SetKind::Flow, SetKind::FlowNoReply, SetKind::Echo, SetKind::EchoNoReply];

    const fn prefix(self) -> &'static str {
        match self {
            SetKind::Flow => "flow",
            SetKind::FlowNoReply => "flownoreply",
            SetKind::Echo => "echo",
            SetKind::EchoNoReply => "echonoreply",
        }
    }
    /// True when the key has protocol and port.
    pub const fn has_port(self) -> bool {
        matches!(self, SetKind::Flow | SetKind::FlowNoReply)
    }
    /// True when the entries allow replies (the reply rules look the reversed
    /// packet up in these sets).
    pub const fn allows_reply(self) -> bool {
        matches!(self, SetKind::Flow | SetKind::Echo)
    }
}

/// Names one of the ruleset's flow sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SetId {
    /// Address family of the key.
    pub family: Family,
    /// The side the entries' forward direction enters on.
    pub ingress: Ingress,
    /// What it holds.
    pub kind: SetKind,
}

impl SetId {
    /// The set's position in the ruleset (its rendering order).
    pub(crate) const fn slot(self) -> usize {
        let f = match self.family {
            Family::V4 => 0,
            Family::V6 => 1,
        };
        let r = match self.ingress {
            Ingress::Patient => 0,
            // No set holds management entries ([`element_of`] places none).
            Ingress::Uplink | Ingress::Management => 1,
        };
        let k = match self.kind {
            SetKind::Flow => 0,
            SetKind::FlowNoReply => 1,
            SetKind::Echo => 2,
            SetKind::EchoNoReply => 3,
        };
        f * 8 + r * 4 + k
    }

    /// Every set, in the order of the ruleset.
    fn all() -> impl Iterator<Item = SetId> {
        [Family::V4, Family::V6].into_iter().flat_map(|family| {
            [Ingress::Patient, Ingress::Uplink].into_iter().flat_map(move |ingress| {
                SetKind::ALL.into_iter().map(move |kind| SetId { family, ingress, kind })
            })
        })
    }

    /// The lookup expression, e.g. `ip saddr . ip daddr . meta l4proto . th dport`,
    /// or reversed for replies: `ip daddr . ip saddr . meta l4proto . th sport`.
    fn key_expr(self, reversed: bool) -> String {
        let p = self.family.payload();
        let (a, b) = if reversed { ("daddr", "saddr") } else { ("saddr", "daddr") };
        let port = if reversed { "sport" } else { "dport" };
        if self.kind.has_port() {
            format!("{p} {a} . {p} {b} . meta l4proto . th {port}")
        } else {
            format!("{p} {a} . {p} {b}")
        }
    }

    /// The key's type, e.g. `ipv4_addr . ipv4_addr . inet_proto . inet_service`.
    fn key_type(self) -> String {
        let t = self.family.addr_type();
        if self.kind.has_port() {
            format!("{t} . {t} . inet_proto . inet_service")
        } else {
            format!("{t} . {t}")
        }
    }
}

impl fmt::Display for SetId {
    /// The set's name, e.g. `flow4_patient`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}_{}", self.kind.prefix(), self.family.digit(), role_name(self.ingress))
    }
}

/// One set element: a flow entry's key, its timeout and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NftElement {
    /// The entry's flow (the key: addresses, and protocol and port unless ICMP).
    pub flow: Flow,
    /// Seconds from the compile time; `None` for infrastructure entries.
    pub timeout_secs: Option<u64>,
    /// The policy rule behind it.
    pub rule_id: u32,
    /// The policy version that produced the entry.
    pub policy_version: u32,
}

impl NftElement {
    /// The element's comment, `rule <id> v<version>` (the same text whether
    /// the element is written by `nft -f` or sent over netlink).
    pub fn comment(&self) -> String {
        format!("rule {} v{}", self.rule_id, self.policy_version)
    }

    /// Orders duplicates: the longest-lived, then the lowest rule id, then the
    /// highest version wins.
    fn rank(&self) -> (u64, std::cmp::Reverse<u32>, u32) {
        (
            self.timeout_secs.unwrap_or(u64::MAX),
            std::cmp::Reverse(self.rule_id),
            self.policy_version,
        )
    }
}

impl fmt::Display for NftElement {
    /// The element as written inside `elements = { … }` (or after
    /// `add element … {`), e.g.
    /// `10.77.0.11 . 10.78.0.100 . tcp . 443 timeout 30s comment "rule 1 v3"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flow = &self.flow;
        match flow.port() {
            Some(port) => {
                write!(f, "{} . {} . {} . {port}", flow.src(), flow.dst(), flow.protocol())?
            }
            None => write!(f, "{} . {}", flow.src(), flow.dst())?,
        }
        if let Some(secs) = self.timeout_secs {
            write!(f, " timeout {secs}s")?;
        }
        write!(f, " comment \"{}\"", self.comment())
    }
}

/// A named set of flow elements, sorted by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftSet {
    id: SetId,
    elements: BTreeMap<Flow, NftElement>,
}

impl NftSet {
    /// Which set this is.
    pub const fn id(&self) -> SetId {
        self.id
    }
    /// Its elements in key order.
    pub fn elements(&self) -> impl Iterator<Item = &NftElement> {
        self.elements.values()
    }
    /// The element with this key, if any.
    pub fn get(&self, key: &Flow) -> Option<&NftElement> {
        self.elements.get(key)
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.elements.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    fn insert(&mut self, element: NftElement) {
        let slot = self.elements.entry(element.flow).or_insert(element);
        if element.rank() > slot.rank() {
            *slot = element;
        }
    }
}

/// One match expression of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftMatch {
    /// `ct state invalid`.
    CtInvalid,
    /// `iifname @<role>_ports`: the packet entered on a port of this role.
    Iif(Ingress),
    /// `ct state established ct direction reply`.
    CtEstablishedReply,
    /// `tcp flags & (syn | ack) != syn`: TCP, and not a bare SYN.
    TcpNotBareSyn,
    /// `tcp dport >= N` or `udp dport >= N` (implies the protocol; never ICMP).
    DportAtLeast {
        /// TCP or UDP.
        protocol: Protocol,
        /// The floor.
        port: u16,
    },
    /// `icmp type …` / `icmpv6 type …` (implies the family and the protocol).
    IcmpType {
        /// Which ICMP.
        family: Family,
        /// The type number (echo request or echo reply).
        icmp_type: u8,
    },
    /// A lookup of the packet's key in one of the flow sets.
    Lookup(SetId),
    /// A lookup of the packet's key reversed (destination, source and, for
    /// TCP/UDP, source port): the packet is a reply to one of the set's flows.
    ReplyLookup(SetId),
}

impl fmt::Display for NftMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NftMatch::CtInvalid => f.write_str("ct state invalid"),
            NftMatch::Iif(role) => write!(f, "iifname @{}_ports", role_name(role)),
            NftMatch::CtEstablishedReply => f.write_str("ct state established ct direction reply"),
            NftMatch::TcpNotBareSyn => f.write_str("tcp flags & (syn | ack) != syn"),
            NftMatch::DportAtLeast { protocol, port } => write!(f, "{protocol} dport >= {port}"),
            NftMatch::IcmpType { family, icmp_type } => {
                let name = if icmp_type == family.echo_request() {
                    "echo-request"
                } else if icmp_type == family.echo_reply() {
                    "echo-reply"
                } else {
                    return write!(f, "{} type {icmp_type}", family.icmp());
                };
                write!(f, "{} type {name}", family.icmp())
            }
            NftMatch::Lookup(id) => write!(f, "{} @{id}", id.key_expr(false)),
            NftMatch::ReplyLookup(id) => write!(f, "{} @{id}", id.key_expr(true)),
        }
    }
}

/// A rule's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleVerdict {
    /// `accept`.
    Accept,
    /// `drop`.
    Drop,
}

/// One rule of the forward chain: every match must hold, then the verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftRule {
    /// The matches, in order.
    pub matches: Vec<NftMatch>,
    /// Whether the rule counts what it decides (`counter`).
    pub counter: bool,
    /// Accept or drop.
    pub verdict: RuleVerdict,
    /// A comment kept with the rule in the kernel.
    pub comment: Option<&'static str>,
}

impl fmt::Display for NftRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        if self.counter {
            f.write_str("counter ")?;
        }
        f.write_str(match self.verdict {
            RuleVerdict::Accept => "accept",
            RuleVerdict::Drop => "drop",
        })?;
        if let Some(c) = self.comment {
            write!(f, " comment \"{c}\"")?;
        }
        Ok(())
    }
}

/// The compiled nftables layer of one appliance: its table with the port sets,
/// the flow sets and the forward chain. `Display` renders the `nft -f` text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftRuleset {
    table: String,
    policy_version: u32,
    compiled_at_ns: u64,
    patient_ports: Vec<String>,
    uplink_ports: Vec<String>,
    sets: Vec<NftSet>,
    forward: Vec<NftRule>,
}

/// Compiles flow entries into the nftables layer at `now_ns` (CLOCK_MONOTONIC
/// nanoseconds, like [`Expiry::At`]): every entry becomes the element
/// [`element_of`] gives it, in the set it names.
pub fn compile(input: &NftInput, entries: &[FlowEntry], now_ns: u64) -> NftRuleset {
    let mut sets: Vec<NftSet> =
        SetId::all().map(|id| NftSet { id, elements: BTreeMap::new() }).collect();
    for (id, element) in entries.iter().filter_map(|e| element_of(e, now_ns)) {
        if let Some(set) = sets.get_mut(id.slot()) {
            set.insert(element);
        }
    }
    NftRuleset {
        table: input.table.clone(),
        policy_version: input.policy_version,
        compiled_at_ns: now_ns,
        patient_ports: input.patient_ports.clone(),
        uplink_ports: input.uplink_ports.clone(),
        sets,
        forward: forward_chain(input.reply_min_port),
    }
}

/// Where [`compile`] at `now_ns` puts one entry: its set and its element, or
/// `None` when it is not in the table — expired at `now_ns`, or a management
/// entry ([`MANAGEMENT_RULE_ID`]: the agent's own way to its controller, which
/// the eBPF layer alone needs; this table filters forwarded traffic only).
/// Timed entries get the time left, rounded up to whole seconds (1 s at least,
/// [`MAX_TIMEOUT_SECS`] at most); infrastructure entries no timeout.
///
/// The one definition of an entry's place: `compile` and the element delta
/// built from the reconciler's actions
/// ([`crate::nft_delta::element_delta_from_actions`]) both use it.
pub fn element_of(entry: &FlowEntry, now_ns: u64) -> Option<(SetId, NftElement)> {
    if entry.rule_id == MANAGEMENT_RULE_ID || entry.ingress == Ingress::Management {
        return None;
    }
    let timeout_secs = match entry.expiry {
        Expiry::Infrastructure => None,
        Expiry::At(t) if t <= now_ns => return None,
        Expiry::At(t) => Some((t - now_ns).div_ceil(NS_PER_SEC).clamp(1, MAX_TIMEOUT_SECS)),
    };
    let element = NftElement {
        flow: entry.flow,
        timeout_secs,
        rule_id: entry.rule_id,
        policy_version: entry.policy_version,
    };
    let kind = match (entry.flow.protocol(), entry.allow_reply) {
        (Protocol::Icmp, true) => SetKind::Echo,
        (Protocol::Icmp, false) => SetKind::EchoNoReply,
        (Protocol::Tcp | Protocol::Udp, true) => SetKind::Flow,
        (Protocol::Tcp | Protocol::Udp, false) => SetKind::FlowNoReply,
    };
    let id = SetId { family: Family::of(entry.flow.dst()), ingress: entry.ingress, kind };
    Some((id, element))
}

fn forward_chain(floor: u16) -> Vec<NftRule> {
    let accept =
        |matches| NftRule { matches, counter: false, verdict: RuleVerdict::Accept, comment: None };
    let mut rules = vec![NftRule {
        matches: vec![NftMatch::CtInvalid],
        counter: true,
        verdict: RuleVerdict::Drop,
        comment: Some("conntrack: invalid"),
    }];
    for family in [Family::V4, Family::V6] {
        for ingress in [Ingress::Patient, Ingress::Uplink] {
            let set = |kind| NftMatch::Lookup(SetId { family, ingress, kind });
            let reply_of = |kind| NftMatch::ReplyLookup(SetId { family, ingress, kind });
            let back = NftMatch::Iif(opposite(ingress));
            for kind in [SetKind::Flow, SetKind::FlowNoReply] {
                rules.push(accept(vec![NftMatch::Iif(ingress), set(kind)]));
            }
            for kind in [SetKind::Echo, SetKind::EchoNoReply] {
                rules.push(accept(vec![
                    NftMatch::Iif(ingress),
                    NftMatch::IcmpType { family, icmp_type: family.echo_request() },
                    set(kind),
                ]));
            }
            rules.push(accept(vec![
                back,
                NftMatch::CtEstablishedReply,
                NftMatch::TcpNotBareSyn,
                NftMatch::DportAtLeast { protocol: Protocol::Tcp, port: floor },
                reply_of(SetKind::Flow),
            ]));
            rules.push(accept(vec![
                back,
                NftMatch::CtEstablishedReply,
                NftMatch::DportAtLeast { protocol: Protocol::Udp, port: floor },
                reply_of(SetKind::Flow),
            ]));
            rules.push(accept(vec![
                back,
                NftMatch::CtEstablishedReply,
                NftMatch::IcmpType { family, icmp_type: family.echo_reply() },
                reply_of(SetKind::Echo),
            ]));
        }
    }
    rules.push(NftRule {
        matches: Vec::new(),
        counter: true,
        verdict: RuleVerdict::Drop,
        comment: Some("default deny"),
    });
    rules
}

/// Conntrack state as nftables' `ct state` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// The first packet of a connection.
    New,
    /// A packet of a connection seen in both directions, or any reply-direction
    /// packet.
    Established,
    /// Related to a connection (ICMP errors, expectations).
    Related,
    /// Conntrack could not classify it (or a lone reply such as an echo reply
    /// without a request).
    Invalid,
    /// Exempted from tracking.
    Untracked,
}

/// Conntrack direction (`ct direction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDirection {
    /// The direction of the connection's first packet.
    Original,
    /// The other one.
    Reply,
}

/// The transport part of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with ports and the flags byte.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// TCP flags (byte 13 of the header).
        flags: u8,
    },
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP for IPv4 packets, ICMPv6 for IPv6 packets.
    Icmp {
        /// The type.
        icmp_type: u8,
    },
    /// Any other protocol number (including ICMPv4 in an IPv6 packet).
    Other {
        /// The protocol number.
        proto: u8,
    },
}

/// A packet as the forward hook sees it (see the module's modelling
/// assumptions). Source and destination of different families match nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// The interface it entered on.
    pub iifname: String,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport header.
    pub l4: L4,
    /// Conntrack state.
    pub ct_state: CtState,
    /// Conntrack direction.
    pub ct_direction: CtDirection,
}

impl PacketMeta {
    /// The family, when source and destination agree.
    pub fn family(&self) -> Option<Family> {
        let f = Family::of(self.src);
        (f == Family::of(self.dst)).then_some(f)
    }
}

/// What the forward chain does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftVerdict {
    /// Accepted by the rule at this index of [`NftRuleset::forward_chain`].
    Accept {
        /// Index of the rule.
        rule: usize,
    },
    /// Dropped by the rule at this index (the `ct state invalid` rule or the
    /// final explicit drop).
    Drop {
        /// Index of the rule.
        rule: usize,
    },
    /// No rule matched: the chain policy (drop). Not reached while the chain
    /// ends with its explicit drop rule.
    PolicyDrop,
}

impl NftVerdict {
    /// True when the packet is accepted.
    pub const fn is_accept(self) -> bool {
        matches!(self, NftVerdict::Accept { .. })
    }
}

impl NftRuleset {
    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
    /// The policy version it was compiled from.
    pub const fn policy_version(&self) -> u32 {
        self.policy_version
    }
    /// The CLOCK_MONOTONIC instant timeouts count from.
    pub const fn compiled_at_ns(&self) -> u64 {
        self.compiled_at_ns
    }
    /// The interface names of one role, sorted.
    pub fn ports(&self, role: Ingress) -> &[String] {
        match role {
            Ingress::Patient => &self.patient_ports,
            Ingress::Uplink => &self.uplink_ports,
            Ingress::Management => &[],
        }
    }
    /// The flow sets, in rendering order.
    pub fn sets(&self) -> &[NftSet] {
        &self.sets
    }
    /// One flow set.
    pub fn set(&self, id: SetId) -> Option<&NftSet> {
        self.sets.get(id.slot())
    }
    /// The forward chain's rules, in order.
    pub fn forward_chain(&self) -> &[NftRule] {
        &self.forward
    }
    /// The CLOCK_MONOTONIC instant an element stops matching under the model
    /// (compile time + timeout, saturating); `None` for no timeout.
    pub fn expires_ns(&self, element: &NftElement) -> Option<u64> {
        element
            .timeout_secs
            .map(|s| self.compiled_at_ns.saturating_add(s.saturating_mul(NS_PER_SEC)))
    }

    /// What the forward chain would do with `pkt` at `now_ns`, evaluated on the
    /// structure (see the module's modelling assumptions).
    pub fn decide(&self, pkt: &PacketMeta, now_ns: u64) -> NftVerdict {
        for (rule, r) in self.forward.iter().enumerate() {
            if r.matches.iter().all(|m| self.matches(m, pkt, now_ns)) {
                return match r.verdict {
                    RuleVerdict::Accept => NftVerdict::Accept { rule },
                    RuleVerdict::Drop => NftVerdict::Drop { rule },
                };
            }
        }
        NftVerdict::PolicyDrop
    }

    fn matches(&self, m: &NftMatch, pkt: &PacketMeta, now_ns: u64) -> bool {
        match *m {
            NftMatch::CtInvalid => pkt.ct_state == CtState::Invalid,
            NftMatch::Iif(role) => self.ports(role).contains(&pkt.iifname),
            NftMatch::CtEstablishedReply => {
                pkt.ct_state == CtState::Established && pkt.ct_direction == CtDirection::Reply
            }
            NftMatch::TcpNotBareSyn => matches!(
                pkt.l4,
                L4::Tcp { flags, .. } if flags & (tcp_flags::SYN | tcp_flags::ACK) != tcp_flags::SYN
            ),
            NftMatch::DportAtLeast { protocol, port } => match (protocol, pkt.l4) {
                (Protocol::Tcp, L4::Tcp { dport, .. }) | (Protocol::Udp, L4::Udp { dport, .. }) => {
                    dport >= port
                }
                _ => false,
            },
            NftMatch::IcmpType { family, icmp_type } => {
                pkt.family() == Some(family) && pkt.l4 == L4::Icmp { icmp_type }
            }
            NftMatch::Lookup(id) => self.lookup(id, false, pkt, now_ns),
            NftMatch::ReplyLookup(id) => self.lookup(id, true, pkt, now_ns),
        }
    }

    /// A set lookup: the packet's key (reversed for a reply lookup) is an
    /// element that has not timed out. Keys that no [`Flow`] can have (same
    /// addresses, port 0, multicast, …) are never elements, so they miss.
    fn lookup(&self, id: SetId, reversed: bool, pkt: &PacketMeta, now_ns: u64) -> bool {
        if pkt.family() != Some(id.family) {
            return false;
        }
        let (a, b) = if reversed { (pkt.dst, pkt.src) } else { (pkt.src, pkt.dst) };
        let key = if id.kind.has_port() {
            let (protocol, sport, dport) = match pkt.l4 {
                L4::Tcp { sport, dport, .. } => (Protocol::Tcp, sport, dport),
                L4::Udp { sport, dport } => (Protocol::Udp, sport, dport),
                L4::Icmp { .. } | L4::Other { .. } => return false,
            };
            Flow::new(a, b, protocol, Some(if reversed { sport } else { dport }))
        } else {
            Flow::new(a, b, Protocol::Icmp, None)
        };
        let Ok(key) = key else { return false };
        self.set(id).and_then(|s| s.get(&key)).is_some_and(|e| match self.expires_ns(e) {
            None => true,
            Some(end) => now_ns < end,
        })
    }
}

impl fmt::Display for NftRuleset {
    /// The `nft -f` text: one transaction that replaces the table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.table;
        writeln!(
            f,
            "# Airlock nftables layer, policy v{}. Generated: do not edit.",
            self.policy_version
        )?;
        writeln!(f, "# Forwarded traffic only: the appliance's own traffic (input and output")?;
        writeln!(f, "# hooks) is out of scope for this table, which has no chains there.")?;
        writeln!(f, "# One transaction: make sure the table exists, delete it, define it anew.")?;
        writeln!(f, "add table inet {t}")?;
        writeln!(f, "delete table inet {t}")?;
        writeln!(f, "table inet {t} {{")?;
        writeln!(f, "\tcomment \"airlock policy v{}\"", self.policy_version)?;
        for role in [Ingress::Patient, Ingress::Uplink] {
            writeln!(f)?;
            writeln!(f, "\tset {}_ports {{", role_name(role))?;
            writeln!(f, "\t\ttype ifname")?;
            let ports = self.ports(role);
            if !ports.is_empty() {
                f.write_str("\t\telements = { ")?;
                for (i, p) in ports.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}\"{p}\"")?;
                }
                writeln!(f, " }}")?;
            }
            writeln!(f, "\t}}")?;
        }
        for set in &self.sets {
            writeln!(f)?;
            writeln!(f, "\tset {} {{", set.id)?;
            writeln!(f, "\t\ttype {}", set.id.key_type())?;
            writeln!(f, "\t\tflags timeout")?;
            writeln!(f, "\t\tcounter")?;
            if !set.is_empty() {
                writeln!(f, "\t\telements = {{")?;
                let last = set.len().saturating_sub(1);
                for (i, e) in set.elements().enumerate() {
                    let sep = if i == last { "" } else { "," };
                    writeln!(f, "\t\t\t{e}{sep}")?;
                }
                writeln!(f, "\t\t}}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f)?;
        writeln!(f, "\tchain guard {{")?;
        writeln!(f, "\t\ttype filter hook forward priority -1; policy accept;")?;
        writeln!(
            f,
            "\t\tiifname != @patient_ports iifname != @uplink_ports counter drop \
             comment \"{GUARD_IN}\""
        )?;
        writeln!(
            f,
            "\t\toifname != @patient_ports oifname != @uplink_ports counter drop \
             comment \"{GUARD_OUT}\""
        )?;
        writeln!(f, "\t}}")?;
        writeln!(f)?;
        writeln!(f, "\tchain forward {{")?;
        writeln!(f, "\t\ttype filter hook forward priority filter; policy drop;")?;
        for rule in &self.forward {
            writeln!(f, "\t\t{rule}")?;
        }
        writeln!(f, "\t}}")?;
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        collections::BTreeMap,
        io::Write,
        process::{Command, Stdio},
    };

    use airlock_ebpf_common::{
        host::HostTable,
        layout::proto,
        verdict::{self, Action, Direction},
        Frame, FrameKind,
    };
    use proptest::{
        prelude::*,
        test_runner::{Config, TestCaseError, TestRunner},
    };

    use super::*;
    use crate::flow::MapEntry;

    const S: u64 = NS_PER_SEC;
    /// The compile time of every test: 1000 s of CLOCK_MONOTONIC.
    const NOW0: u64 = 1_000 * S;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        src: &str,
        dst: &str,
        protocol: Protocol,
        port: Option<u16>,
        rule_id: u32,
        ingress: Ingress,
        allow_reply: bool,
        expiry: Expiry,
    ) -> FlowEntry {
        let flow = Flow::new(ip(src), ip(dst), protocol, port).unwrap();
        let infra = expiry == Expiry::Infrastructure;
        FlowEntry::new(flow, rule_id, 3, ingress, allow_reply, expiry, infra).unwrap()
    }

    fn lab_input() -> NftInput {
        NftInput::new(3)
            .with_ports(Ingress::Patient, ["patient0"])
            .unwrap()
            .with_ports(Ingress::Uplink, ["uplink0"])
            .unwrap()
    }

    fn golden_entries() -> Vec<FlowEntry> {
        use Ingress::{Patient, Uplink};
        use Protocol::{Icmp, Tcp, Udp};
        vec![
            // IPv4 TCP, 29.5 s left: timeout rounds up to 30 s.
            entry(
                "10.77.0.11",
                "10.78.0.100",
                Tcp,
                Some(443),
                1,
                Patient,
                true,
                Expiry::At(NOW0 + 29_500_000_000),
            ),
            // IPv6 UDP without replies: in the no-reply set, which no reply rule reads.
            entry(
                "fd00:a1:77::11",
                "fd00:a1:78::100",
                Udp,
                Some(514),
                2,
                Patient,
                false,
                Expiry::At(NOW0 + 3_600 * S),
            ),
            // ICMP echo with 1 ns left: at least 1 s.
            entry("10.77.0.11", "10.78.0.1", Icmp, None, 3, Patient, true, Expiry::At(NOW0 + 1)),
            // Infrastructure: no timeout.
            entry(
                "10.77.0.11",
                "10.78.0.53",
                Udp,
                Some(53),
                4,
                Patient,
                true,
                Expiry::Infrastructure,
            ),
            // Monitoring from the uplink side, infrastructure ICMP.
            entry("10.78.0.200", "10.77.0.11", Icmp, None, 5, Uplink, true, Expiry::Infrastructure),
            // Expired exactly now: left out.
            entry("10.77.0.12", "10.78.0.100", Tcp, Some(443), 6, Patient, true, Expiry::At(NOW0)),
        ]
    }

    /// The golden text (tab-indented, as `nft list` prints).
    const GOLDEN: &str = r#"# Airlock nftables layer, policy v3. Generated: do not edit.
# Forwarded traffic only: the appliance's own traffic (input and output
# hooks) is out of scope for this table, which has no chains there.
# One transaction: make sure the table exists, delete it, define it anew.
add table inet airlock
delete table inet airlock
table inet airlock {
	comment "airlock policy v3"

	set patient_ports {
		type ifname
		elements = { "patient0" }
	}

	set uplink_ports {
		type ifname
		elements = { "uplink0" }
	}

	set flow4_patient {
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
		flags timeout
		counter
		elements = {
			10.77.0.11 . 10.78.0.53 . udp . 53 comment "rule 4 v3",
			10.77.0.11 . 10.78.0.100 . tcp . 443 timeout 30s comment "rule 1 v3"
		}
	}

	set flownoreply4_patient {
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
		flags timeout
		counter
	}

	set echo4_patient {
		type ipv4_addr . ipv4_addr
		flags timeout
		counter
		elements = {
			10.77.0.11 . 10.78.0.1 timeout 1s comment "rule 3 v3"
		}
	}

	set echonoreply4_patient {
		type ipv4_addr . ipv4_addr
		flags timeout
		counter
	}

	set flow4_uplink {
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
		flags timeout
		counter
	}

	set flownoreply4_uplink {
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
		flags timeout
		counter
	}

	set echo4_uplink {
		type ipv4_addr . ipv4_addr
		flags timeout
		counter
		elements = {
			10.78.0.200 . 10.77.0.11 comment "rule 5 v3"
		}
	}

	set echonoreply4_uplink {
		type ipv4_addr . ipv4_addr
		flags timeout
		counter
	}

	set flow6_patient {
		type ipv6_addr . ipv6_addr . inet_proto . inet_service
		flags timeout
		counter
	}

	set flownoreply6_patient {
		type ipv6_addr . ipv6_addr . inet_proto . inet_service
		flags timeout
		counter
		elements = {
			fd00:a1:77::11 . fd00:a1:78::100 . udp . 514 timeout 3600s comment "rule 2 v3"
		}
	}

	set echo6_patient {
		type ipv6_addr . ipv6_addr
		flags timeout
		counter
	}

	set echonoreply6_patient {
		type ipv6_addr . ipv6_addr
		flags timeout
		counter
	}

	set flow6_uplink {
		type ipv6_addr . ipv6_addr . inet_proto . inet_service
		flags timeout
		counter
	}

	set flownoreply6_uplink {
		type ipv6_addr . ipv6_addr . inet_proto . inet_service
		flags timeout
		counter
	}

	set echo6_uplink {
		type ipv6_addr . ipv6_addr
		flags timeout
		counter
	}

	set echonoreply6_uplink {
		type ipv6_addr . ipv6_addr
		flags timeout
		counter
	}

	chain guard {
		type filter hook forward priority -1; policy accept;
		iifname != @patient_ports iifname != @uplink_ports counter drop comment "enters through no boundary port"
		oifname != @patient_ports oifname != @uplink_ports counter drop comment "leaves through no boundary port"
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state invalid counter drop comment "conntrack: invalid"
		iifname @patient_ports ip saddr . ip daddr . meta l4proto . th dport @flow4_patient accept
		iifname @patient_ports ip saddr . ip daddr . meta l4proto . th dport @flownoreply4_patient accept
		iifname @patient_ports icmp type echo-request ip saddr . ip daddr @echo4_patient accept
		iifname @patient_ports icmp type echo-request ip saddr . ip daddr @echonoreply4_patient accept
		iifname @uplink_ports ct state established ct direction reply tcp flags & (syn | ack) != syn tcp dport >= 1024 ip daddr . ip saddr . meta l4proto . th sport @flow4_patient accept
		iifname @uplink_ports ct state established ct direction reply udp dport >= 1024 ip daddr . ip saddr . meta l4proto . th sport @flow4_patient accept
		iifname @uplink_ports ct state established ct direction reply icmp type echo-reply ip daddr . ip saddr @echo4_patient accept
		iifname @uplink_ports ip saddr . ip daddr . meta l4proto . th dport @flow4_uplink accept
		iifname @uplink_ports ip saddr . ip daddr . meta l4proto . th dport @flownoreply4_uplink accept
		iifname @uplink_ports icmp type echo-request ip saddr . ip daddr @echo4_uplink accept
		iifname @uplink_ports icmp type echo-request ip saddr . ip daddr @echonoreply4_uplink accept
		iifname @patient_ports ct state established ct direction reply tcp flags & (syn | ack) != syn tcp dport >= 1024 ip daddr . ip saddr . meta l4proto . th sport @flow4_uplink accept
		iifname @patient_ports ct state established ct direction reply udp dport >= 1024 ip daddr . ip saddr . meta l4proto . th sport @flow4_uplink accept
		iifname @patient_ports ct state established ct direction reply icmp type echo-reply ip daddr . ip saddr @echo4_uplink accept
		iifname @patient_ports ip6 saddr . ip6 daddr . meta l4proto . th dport @flow6_patient accept
		iifname @patient_ports ip6 saddr . ip6 daddr . meta l4proto . th dport @flownoreply6_patient accept
		iifname @patient_ports icmpv6 type echo-request ip6 saddr . ip6 daddr @echo6_patient accept
		iifname @patient_ports icmpv6 type echo-request ip6 saddr . ip6 daddr @echonoreply6_patient accept
		iifname @uplink_ports ct state established ct direction reply tcp flags & (syn | ack) != syn tcp dport >= 1024 ip6 daddr . ip6 saddr . meta l4proto . th sport @flow6_patient accept
		iifname @uplink_ports ct state established ct direction reply udp dport >= 1024 ip6 daddr . ip6 saddr . meta l4proto . th sport @flow6_patient accept
		iifname @uplink_ports ct state established ct direction reply icmpv6 type echo-reply ip6 daddr . ip6 saddr @echo6_patient accept
		iifname @uplink_ports ip6 saddr . ip6 daddr . meta l4proto . th dport @flow6_uplink accept
		iifname @uplink_ports ip6 saddr . ip6 daddr . meta l4proto . th dport @flownoreply6_uplink accept
		iifname @uplink_ports icmpv6 type echo-request ip6 saddr . ip6 daddr @echo6_uplink accept
		iifname @uplink_ports icmpv6 type echo-request ip6 saddr . ip6 daddr @echonoreply6_uplink accept
		iifname @patient_ports ct state established ct direction reply tcp flags & (syn | ack) != syn tcp dport >= 1024 ip6 daddr . ip6 saddr . meta l4proto . th sport @flow6_uplink accept
		iifname @patient_ports ct state established ct direction reply udp dport >= 1024 ip6 daddr . ip6 saddr . meta l4proto . th sport @flow6_uplink accept
		iifname @patient_ports ct state established ct direction reply icmpv6 type echo-reply ip6 daddr . ip6 saddr @echo6_uplink accept
		counter drop comment "default deny"
	}
}
"#;

    #[test]
    fn golden_text() {
        let text = compile(&lab_input(), &golden_entries(), NOW0).to_string();
        assert_eq!(text, GOLDEN, "rendered:\n{text}");
    }

    #[test]
    fn same_input_same_text_in_any_order() {
        let input = lab_input();
        let entries = golden_entries();
        let first = compile(&input, &entries, NOW0).to_string();
        assert_eq!(compile(&input, &entries, NOW0).to_string(), first);
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(compile(&input, &reversed, NOW0).to_string(), first);
        for k in 1..entries.len() {
            let mut rotated = entries.clone();
            rotated.rotate_left(k);
            assert_eq!(compile(&input, &rotated, NOW0).to_string(), first);
        }
        // Ports given in another order, twice: the same text.
        let shuffled_ports = NftInput::new(3)
            .with_ports(Ingress::Uplink, ["uplink0", "uplink0"])
            .unwrap()
            .with_ports(Ingress::Patient, ["patient0"])
            .unwrap();
        assert_eq!(compile(&shuffled_ports, &entries, NOW0).to_string(), first);

        // Duplicate keys (refused by validation) merge the same way in any order:
        // the longer-lived element wins.
        let a = entry(
            "10.77.0.11",
            "10.78.0.100",
            Protocol::Tcp,
            Some(443),
            8,
            Ingress::Patient,
            false,
            Expiry::At(NOW0 + 10 * S),
        );
        let b = FlowEntry { rule_id: 9, expiry: Expiry::At(NOW0 + 20 * S), ..a };
        let ab = compile(&input, &[a, b], NOW0);
        assert_eq!(ab.to_string(), compile(&input, &[b, a], NOW0).to_string());
        let rules = |rs: &NftRuleset, kind| {
            let id = SetId { family: Family::V4, ingress: Ingress::Patient, kind };
            rs.set(id).unwrap().elements().map(|e| e.rule_id).collect::<Vec<_>>()
        };
        assert_eq!(rules(&ab, SetKind::FlowNoReply), [9]);
        assert_eq!(rules(&ab, SetKind::Flow), [0u32; 0], "no replies: not in the flow set");
    }

    #[test]
    fn input_is_validated() {
        let table = |n: &str| NftInput::new(1).with_table(n).map(|i| i.table().to_owned());
        assert_eq!(table("airlock").unwrap(), "airlock");
        assert_eq!(table("airlock_lab2").unwrap(), "airlock_lab2");
        for bad in ["", "filter", "table", "airlockx", "airlock-lab", "airlock_Lab", "airlock lab"]
        {
            assert!(matches!(table(bad), Err(NftError::TableName { .. })), "{bad:?}");
        }
        assert!(table(&format!("airlock_{}", "x".repeat(57))).is_err());
        let ports = |names: &[&str]| NftInput::new(1).with_ports(Ingress::Patient, names);
        assert_eq!(
            ports(&["p1", "p0", "p1", "wg.up-1_x"]).unwrap().ports(Ingress::Patient),
            ["p0", "p1", "wg.up-1_x"]
        );
        for bad in ["", "..", "sixteen-bytes-xx", "a b", "a\"b", "a/b", "p*", "p\n"] {
            assert!(matches!(ports(&[bad]), Err(NftError::PortName { .. })), "{bad:?}");
        }
        let err = NftInput::new(1)
            .with_ports(Ingress::Uplink, ["eth1"])
            .unwrap()
            .with_ports(Ingress::Patient, ["eth0", "eth1"])
            .unwrap_err();
        assert_eq!(err, NftError::PortInTwoRoles { name: "eth1".into() });
        assert_eq!(NftInput::new(1).with_reply_min_port(0).reply_min_port(), 1024);
        assert_eq!(NftInput::new(1).with_reply_min_port(32768).reply_min_port(), 32768);
    }

    #[test]
    fn timeouts_round_up_and_are_bounded() {
        let timeout = |expiry| {
            let e = FlowEntry {
                expiry,
                ..entry(
                    "10.0.0.1",
                    "10.0.0.2",
                    Protocol::Udp,
                    Some(53),
                    1,
                    Ingress::Patient,
                    false,
                    Expiry::At(1),
                )
            };
            let rs = compile(&NftInput::new(1), &[e], NOW0);
            let mut all = rs.sets().iter().flat_map(NftSet::elements);
            all.next().map(|el| el.timeout_secs)
        };
        assert_eq!(timeout(Expiry::At(NOW0 + 1)), Some(Some(1)));
        assert_eq!(timeout(Expiry::At(NOW0 + S)), Some(Some(1)));
        assert_eq!(timeout(Expiry::At(NOW0 + S + 1)), Some(Some(2)));
        assert_eq!(timeout(Expiry::At(NOW0 + 3_600 * S)), Some(Some(3_600)));
        assert_eq!(timeout(Expiry::At(u64::MAX)), Some(Some(MAX_TIMEOUT_SECS)));
        assert_eq!(timeout(Expiry::Infrastructure), Some(None));
        assert_eq!(timeout(Expiry::At(NOW0)), None, "expired: left out");
        assert_eq!(timeout(Expiry::At(0)), None, "a zero expiry fails closed");
    }

    /// `compile` puts every entry where `element_of` says (the golden
    /// entries cover every set), and management entries nowhere.
    #[test]
    fn compile_places_each_entry_as_element_of_does() {
        let entries = golden_entries();
        let rs = compile(&lab_input(), &entries, NOW0);
        let placed: Vec<_> = entries.iter().filter_map(|e| element_of(e, NOW0)).collect();
        assert_eq!(placed.len(), rs.sets().iter().map(NftSet::len).sum::<usize>());
        for (id, element) in &placed {
            assert_eq!(rs.set(*id).and_then(|s| s.get(&element.flow)), Some(element));
        }
        let mgmt = FlowEntry { rule_id: MANAGEMENT_RULE_ID, ..entries[0] };
        assert_eq!(element_of(&mgmt, NOW0), None);
        assert_eq!(compile(&lab_input(), &[mgmt], NOW0), compile(&lab_input(), &[], NOW0));
    }

    fn pkt(iif: &str, src: &str, dst: &str, l4: L4, ct: CtState, dir: CtDirection) -> PacketMeta {
        PacketMeta {
            iifname: iif.into(),
            src: ip(src),
            dst: ip(dst),
            l4,
            ct_state: ct,
            ct_direction: dir,
        }
    }

    #[test]
    fn model_follows_the_rules() {
        use CtDirection::{Original, Reply};
        use CtState::{Established, Invalid, New};
        let rs = compile(&lab_input(), &golden_entries(), NOW0);
        let last = rs.forward_chain().len() - 1;
        let at = |p: &PacketMeta, t| rs.decide(p, t);
        let syn = L4::Tcp { sport: 40000, dport: 443, flags: tcp_flags::SYN };
        let fwd = pkt("patient0", "10.77.0.11", "10.78.0.100", syn, New, Original);
        assert!(at(&fwd, NOW0).is_accept());
        assert!(at(&fwd, NOW0 + 29 * S).is_accept());
        assert_eq!(at(&fwd, NOW0 + 30 * S), NftVerdict::Drop { rule: last }, "timed out");
        let wrong_side = PacketMeta { iifname: "uplink0".into(), ..fwd.clone() };
        assert_eq!(at(&wrong_side, NOW0), NftVerdict::Drop { rule: last });
        let unknown_port = PacketMeta { iifname: "mgmt0".into(), ..fwd.clone() };
        assert_eq!(at(&unknown_port, NOW0), NftVerdict::Drop { rule: last });
        let invalid = PacketMeta { ct_state: Invalid, ..fwd.clone() };
        assert_eq!(at(&invalid, NOW0), NftVerdict::Drop { rule: 0 });

        let synack = L4::Tcp { sport: 443, dport: 40000, flags: tcp_flags::SYN | tcp_flags::ACK };
        let reply = pkt("uplink0", "10.78.0.100", "10.77.0.11", synack, Established, Reply);
        assert!(at(&reply, NOW0).is_accept());
        // The same connection stops when its element times out: no bare
        // "established accept".
        assert!(!at(&reply, NOW0 + 30 * S).is_accept());
        // A reply-shaped packet without a connection does not pass (stateful).
        assert!(!at(&PacketMeta { ct_state: New, ct_direction: Original, ..reply.clone() }, NOW0)
            .is_accept());
        // Bare SYN, privileged client port, wrong side: dropped as in eBPF.
        let bare_syn = L4::Tcp { sport: 443, dport: 40000, flags: tcp_flags::SYN };
        assert!(!at(&PacketMeta { l4: bare_syn, ..reply.clone() }, NOW0).is_accept());
        let low = L4::Tcp { sport: 443, dport: 1023, flags: tcp_flags::ACK };
        assert!(!at(&PacketMeta { l4: low, ..reply.clone() }, NOW0).is_accept());
        assert!(!at(&PacketMeta { iifname: "patient0".into(), ..reply.clone() }, NOW0).is_accept());

        // UDP without replies (rule 2, IPv6): forward only.
        let udp = L4::Udp { sport: 40000, dport: 514 };
        let fwd6 = pkt("patient0", "fd00:a1:77::11", "fd00:a1:78::100", udp, New, Original);
        assert!(at(&fwd6, NOW0 + 3_599 * S).is_accept());
        let back = L4::Udp { sport: 514, dport: 40000 };
        let reply6 = pkt("uplink0", "fd00:a1:78::100", "fd00:a1:77::11", back, Established, Reply);
        assert!(!at(&reply6, NOW0).is_accept());

        // ICMP: echo request forward, echo reply back, nothing else; the
        // infrastructure entry from the uplink never times out.
        let echo = |t| L4::Icmp { icmp_type: t };
        let ping = pkt("uplink0", "10.78.0.200", "10.77.0.11", echo(8), New, Original);
        assert!(at(&ping, u64::MAX).is_accept());
        assert!(!at(&PacketMeta { l4: echo(13), ..ping.clone() }, NOW0).is_accept());
        let pong = pkt("patient0", "10.77.0.11", "10.78.0.200", echo(0), Established, Reply);
        assert!(at(&pong, u64::MAX).is_accept());
        let pong_early = pkt("uplink0", "10.78.0.1", "10.77.0.11", echo(0), Established, Reply);
        assert!(at(&pong_early, NOW0 + S - 1).is_accept());
        assert!(!at(&pong_early, NOW0 + S).is_accept());

        // Mixed families and unknown protocols match nothing.
        let mixed = pkt("patient0", "10.77.0.11", "fd00:a1:78::100", udp, New, Original);
        assert!(!at(&mixed, NOW0).is_accept());
        let gre =
            pkt("patient0", "10.77.0.11", "10.78.0.100", L4::Other { proto: 47 }, New, Original);
        assert!(!at(&gre, NOW0).is_accept());

        // The chain ends with the explicit counted drop; the policy is never reached.
        let end = &rs.forward_chain()[last];
        assert!(end.matches.is_empty() && end.counter && end.verdict == RuleVerdict::Drop);
    }

    // ---- agreement with the eBPF verdict (property test) ------------------------

    /// The eBPF flow maps on the host, holding `entries` as the agent writes them.
    fn host_table(entries: &[FlowEntry]) -> HostTable {
        let mut t = HostTable::default();
        for e in entries {
            match e.to_map() {
                MapEntry::V4(k, v) => t.v4.insert(k, v),
                MapEntry::V6(k, v) => t.v6.insert(k, v),
            };
        }
        t
    }

    /// The parsed frame the XDP program would hand to `decide`.
    fn frame_of(p: &PacketMeta) -> Frame {
        let mut f = Frame::EMPTY;
        match (p.src, p.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.kind = FrameKind::V4;
                f.src[..4].copy_from_slice(&s.octets());
                f.dst[..4].copy_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.kind = FrameKind::V6;
                f.src = s.octets();
                f.dst = d.octets();
            }
            _ => panic!("the generator makes single-family packets"),
        }
        match p.l4 {
            L4::Tcp { sport, dport, flags } => {
                (f.proto, f.sport, f.dport, f.tcp_flags) =
                    (proto::TCP, sport.to_be_bytes(), dport.to_be_bytes(), flags);
            }
            L4::Udp { sport, dport } => {
                (f.proto, f.sport, f.dport) =
                    (proto::UDP, sport.to_be_bytes(), dport.to_be_bytes());
            }
            L4::Icmp { icmp_type } => {
                f.proto = if f.kind == FrameKind::V4 { proto::ICMP } else { proto::ICMPV6 };
                f.icmp_type = icmp_type;
            }
            L4::Other { proto } => f.proto = proto,
        }
        f
    }

    // Small pools so that random packets hit entries often. The last host of
    // each family is never in an entry.
    const V4_HOSTS: [&str; 5] =
        ["10.77.0.11", "10.77.0.12", "10.78.0.100", "10.78.0.101", "10.99.0.9"];
    const V6_HOSTS: [&str; 5] =
        ["fd00:a1:77::11", "fd00:a1:77::12", "fd00:a1:78::100", "fd00:a1:78::101", "fd00:99::9"];
    /// Ports: entries use the first four, packets all (123 is below the reply floor).
    const PORTS: [u16; 5] = [53, 443, 1234, 40000, 123];
    const FLAGS: [u8; 6] = [
        tcp_flags::SYN,
        tcp_flags::SYN | tcp_flags::ACK,
        tcp_flags::ACK,
        tcp_flags::ACK | 0x08, // PSH
        tcp_flags::ACK | 0x01, // FIN
        0x04,                  // RST
    ];
    const PATIENT_PORTS: [&str; 2] = ["patient0", "patient1"];
    const UPLINK_PORTS: [&str; 1] = ["uplink0"];
    const ALL_PORTS: [&str; 3] = ["patient0", "patient1", "uplink0"];

    fn port_of(role: Ingress, i: usize) -> &'static str {
        match role {
            Ingress::Patient => PATIENT_PORTS[i % PATIENT_PORTS.len()],
            Ingress::Uplink => UPLINK_PORTS[i % UPLINK_PORTS.len()],
            Ingress::Management => "mgmt0",
        }
    }

    fn role_of(iif: &str) -> Ingress {
        if UPLINK_PORTS.contains(&iif) {
            Ingress::Uplink
        } else {
            Ingress::Patient
        }
    }

    fn host(v6: bool, i: usize) -> IpAddr {
        ip(if v6 { V6_HOSTS[i % 5] } else { V4_HOSTS[i % 5] })
    }

    #[derive(Clone, Debug)]
    struct EntrySeed {
        v6: bool,
        src: usize,
        dst: usize,
        protocol: Protocol,
        port: usize,
        uplink: bool,
        reply: bool,
        /// None: infrastructure; else the expiry relative to NOW0 in ns.
        expiry: Option<i64>,
        rule_id: u32,
    }

    fn entry_seed() -> impl Strategy<Value = EntrySeed> {
        (
            (any::<bool>(), 0..4usize, 0..4usize),
            prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Icmp)],
            (0..4usize, any::<bool>(), any::<bool>()),
            // Any nanosecond, or whole seconds (so that packets also land exactly
            // on expiry instants).
            prop_oneof![
                1 => Just(None),
                2 => (-3_000_000_000i64..12_000_000_000).prop_map(Some),
                2 => (-3..12i64).prop_map(|s| Some(s * 1_000_000_000)),
            ],
            1..50u32,
        )
            .prop_map(
                |((v6, src, dst), protocol, (port, uplink, reply), expiry, rule_id)| EntrySeed {
                    v6,
                    src,
                    dst,
                    protocol,
                    port,
                    uplink,
                    reply,
                    expiry,
                    rule_id,
                },
            )
    }

    /// Valid entries with unique keys (as validated policies have).
    fn entries_of(seeds: &[EntrySeed]) -> Vec<FlowEntry> {
        let mut out = BTreeMap::new();
        for s in seeds {
            let port = (s.protocol != Protocol::Icmp).then_some(PORTS[s.port]);
            let Ok(flow) = Flow::new(host(s.v6, s.src), host(s.v6, s.dst), s.protocol, port) else {
                continue; // same source and destination
            };
            let expiry = match s.expiry {
                None => Expiry::Infrastructure,
                Some(d) => Expiry::At(NOW0.saturating_add_signed(d)),
            };
            let ingress = if s.uplink { Ingress::Uplink } else { Ingress::Patient };
            let e =
                FlowEntry::new(flow, s.rule_id, 7, ingress, s.reply, expiry, s.expiry.is_none())
                    .unwrap();
            out.insert(flow, e);
        }
        out.into_values().collect()
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Label {
        /// Sent as the first packet of a connection (or mid-stream for TCP).
        Original,
        /// Sent as a reply within a connection.
        Reply,
    }

    #[derive(Clone, Debug)]
    struct PacketSeed {
        /// 0..4 an entry's forward packet, 4..8 an entry's reply, 8..10 random.
        template: u8,
        pick: usize,
        /// The template's side (85 %) or any port.
        right_side: bool,
        /// The label contradicts the template (10 %).
        flip: bool,
        /// The template's ICMP type (80 %) or any of three.
        usual_icmp: bool,
        iface: usize,
        v6: bool,
        src: usize,
        dst: usize,
        protocol: u8,
        sport: usize,
        dport: usize,
        flags: usize,
        icmp: usize,
        /// ns after NOW0.
        at: u64,
    }

    fn packet_seed() -> impl Strategy<Value = PacketSeed> {
        (
            (0..10u8, any::<usize>(), prop::bool::weighted(0.85), prop::bool::weighted(0.1)),
            (prop::bool::weighted(0.8), 0..3usize, any::<bool>(), 0..5usize, 0..5usize),
            (0..4u8, 0..5usize, 0..5usize, 0..FLAGS.len(), 0..3usize),
            prop_oneof![0..12_000_000_000u64, (0..12u64).prop_map(|s| s * S)],
        )
            .prop_map(
                |(
                    (template, pick, right_side, flip),
                    (usual_icmp, iface, v6, src, dst),
                    (protocol, sport, dport, flags, icmp),
                    at,
                )| PacketSeed {
                    template,
                    pick,
                    right_side,
                    flip,
                    usual_icmp,
                    iface,
                    v6,
                    src,
                    dst,
                    protocol,
                    sport,
                    dport,
                    flags,
                    icmp,
                    at,
                },
            )
    }

    fn icmp_types(f: Family) -> [u8; 3] {
        // Echo request, echo reply, and a query conntrack also tracks
        // (timestamp / node information).
        match f {
            Family::V4 => [f.echo_request(), f.echo_reply(), 13],
            Family::V6 => [f.echo_request(), f.echo_reply(), 139],
        }
    }

    /// A packet and the label it is sent with (its conntrack state is set later).
    fn packet_of(s: &PacketSeed, entries: &[FlowEntry]) -> (PacketMeta, Label) {
        let any_port = ALL_PORTS[s.iface % ALL_PORTS.len()];
        let flags = FLAGS[s.flags];
        let picked =
            (!entries.is_empty() && s.template < 8).then(|| entries[s.pick % entries.len()]);
        let (iifname, src, dst, l4, label) = match picked {
            Some(e) => {
                let forward = s.template < 4;
                let f = e.flow;
                let fam = Family::of(f.dst());
                let port = f.port().unwrap_or(0);
                let other = PORTS[if forward { s.sport } else { s.dport }];
                let l4 = match (f.protocol(), forward) {
                    (Protocol::Tcp, true) => L4::Tcp { sport: other, dport: port, flags },
                    (Protocol::Tcp, false) => L4::Tcp { sport: port, dport: other, flags },
                    (Protocol::Udp, true) => L4::Udp { sport: other, dport: port },
                    (Protocol::Udp, false) => L4::Udp { sport: port, dport: other },
                    (Protocol::Icmp, _) if !s.usual_icmp => {
                        L4::Icmp { icmp_type: icmp_types(fam)[s.icmp] }
                    }
                    (Protocol::Icmp, true) => L4::Icmp { icmp_type: fam.echo_request() },
                    (Protocol::Icmp, false) => L4::Icmp { icmp_type: fam.echo_reply() },
                };
                let side = if forward { e.ingress } else { opposite(e.ingress) };
                let iif = if s.right_side { port_of(side, s.iface) } else { any_port };
                let (src, dst) = if forward { (f.src(), f.dst()) } else { (f.dst(), f.src()) };
                let usual = if forward { Label::Original } else { Label::Reply };
                let unusual = if forward { Label::Reply } else { Label::Original };
                (iif, src, dst, l4, if s.flip { unusual } else { usual })
            }
            None => {
                let (sport, dport) = (PORTS[s.sport], PORTS[s.dport]);
                let fam = if s.v6 { Family::V6 } else { Family::V4 };
                let l4 = match s.protocol {
                    0 => L4::Tcp { sport, dport, flags },
                    1 => L4::Udp { sport, dport },
                    2 => L4::Icmp { icmp_type: icmp_types(fam)[s.icmp] },
                    _ => L4::Other { proto: 47 },
                };
                let label = if s.flip || s.right_side { Label::Original } else { Label::Reply };
                (any_port, host(s.v6, s.src), host(s.v6, s.dst), l4, label)
            }
        };
        let p = PacketMeta {
            iifname: iifname.to_owned(),
            src,
            dst,
            l4,
            ct_state: CtState::New,
            ct_direction: CtDirection::Original,
        };
        (p, label)
    }

    /// The first packet of the connection a reply-labelled packet would belong
    /// to: reversed, entering on the other side; for ICMP only an echo reply has
    /// one (the echo request).
    fn original_of(p: &PacketMeta) -> Option<PacketMeta> {
        let fam = p.family()?;
        let l4 = match p.l4 {
            L4::Tcp { sport, dport, .. } => {
                L4::Tcp { sport: dport, dport: sport, flags: tcp_flags::SYN }
            }
            L4::Udp { sport, dport } => L4::Udp { sport: dport, dport: sport },
            L4::Icmp { icmp_type } if icmp_type == fam.echo_reply() => {
                L4::Icmp { icmp_type: fam.echo_request() }
            }
            L4::Icmp { .. } | L4::Other { .. } => return None,
        };
        Some(PacketMeta {
            iifname: port_of(opposite(role_of(&p.iifname)), 0).to_owned(),
            src: p.dst,
            dst: p.src,
            l4,
            ct_state: CtState::New,
            ct_direction: CtDirection::Original,
        })
    }

    /// The conntrack state nftables would see. Conventions:
    /// - a reply-labelled packet is `established`, reply direction, when its
    ///   connection can exist: its first packet (see [`original_of`]) passes
    ///   this ruleset at compile time (a connection is confirmed only when its
    ///   first packet leaves the box, so one that nftables dropped never exists);
    /// - otherwise, and for originals, it is in the original direction: `new`,
    ///   or `established` for a TCP segment without SYN (a connection already
    ///   running), or `invalid` for a lone ICMP echo reply (conntrack does not
    ///   start a connection with a reply).
    fn with_conntrack(rs: &NftRuleset, mut p: PacketMeta, label: Label) -> PacketMeta {
        let connected = label == Label::Reply
            && original_of(&p).is_some_and(|o| rs.decide(&o, rs.compiled_at_ns()).is_accept());
        (p.ct_state, p.ct_direction) = if connected {
            (CtState::Established, CtDirection::Reply)
        } else {
            let state = match (p.l4, p.family()) {
                (L4::Tcp { flags, .. }, _) if flags & tcp_flags::SYN == 0 => CtState::Established,
                (L4::Icmp { icmp_type }, Some(f)) if icmp_type == f.echo_reply() => {
                    CtState::Invalid
                }
                _ => CtState::New,
            };
            (state, CtDirection::Original)
        };
        p
    }

    #[derive(Default, Debug)]
    struct Tally {
        pass: Cell<u64>,
        pass_reply: Cell<u64>,
        drop: Cell<u64>,
        stateless_reply: Cell<u64>,
        rounding: Cell<u64>,
    }

    fn bump(c: &Cell<u64>) {
        c.set(c.get() + 1);
    }

    /// For random entries and packets the eBPF verdict and the nftables model
    /// agree on pass/drop, except where the layers differ on purpose:
    /// 1. the eBPF reply check is stateless: it passes a reply-shaped packet for
    ///    which nftables has no connection (the packet is `new`/original there,
    ///    or `invalid` for a lone echo reply), and nftables drops it;
    /// 2. nftables timeouts are whole seconds rounded up: in the last fraction
    ///    of a second of an entry the eBPF layer drops (`drop_expired`) while
    ///    the element still matches; checked by deciding again with eBPF
    ///    entries that expire at the rounded instants, which must then pass.
    ///
    /// Both exclusions are counted, and must stay a small fraction of all packets.
    #[test]
    fn agrees_with_the_ebpf_verdict() {
        let input = NftInput::new(7)
            .with_ports(Ingress::Patient, PATIENT_PORTS)
            .unwrap()
            .with_ports(Ingress::Uplink, UPLINK_PORTS)
            .unwrap();
        let settings = Settings { reply_min_port: input.reply_min_port(), pad: [0; 6] };
        let mut config = Config::with_cases(1024);
        config.failure_persistence = None;
        let mut runner = TestRunner::new(config);
        let tally = Tally::default();
        let strategy = (
            prop::collection::vec(entry_seed(), 0..12),
            prop::collection::vec(packet_seed(), 1..40),
        );
        let result = runner.run(&strategy, |(entry_seeds, packet_seeds)| {
            let entries = entries_of(&entry_seeds);
            let rs = compile(&input, &entries, NOW0);
            let mut reversed = entries.clone();
            reversed.reverse();
            prop_assert_eq!(compile(&input, &reversed, NOW0).to_string(), rs.to_string());

            let table = host_table(&entries);
            // The eBPF entries as nftables times them (rounded up to seconds).
            let rounded: Vec<FlowEntry> = entries
                .iter()
                .map(|e| match e.expiry {
                    Expiry::At(t) if t > NOW0 => {
                        FlowEntry { expiry: Expiry::At(NOW0 + (t - NOW0).div_ceil(S) * S), ..*e }
                    }
                    _ => *e,
                })
                .collect();
            let rounded = host_table(&rounded);
            for seed in &packet_seeds {
                let (p, label) = packet_of(seed, &entries);
                let p = with_conntrack(&rs, p, label);
                let now = NOW0 + seed.at;
                let frame = frame_of(&p);
                let role = PortRole::from(role_of(&p.iifname));
                let ebpf = verdict::decide(&frame, role, 7, &table, &settings, || now);
                let nft = rs.decide(&p, now);
                match (ebpf.action == Action::Pass, nft.is_accept()) {
                    (true, true) => {
                        bump(&tally.pass);
                        if ebpf.dir == Direction::Reply {
                            bump(&tally.pass_reply);
                        }
                    }
                    (false, false) => bump(&tally.drop),
                    (true, false)
                        if ebpf.dir == Direction::Reply
                            && p.ct_direction == CtDirection::Original =>
                    {
                        bump(&tally.stateless_reply)
                    }
                    (false, true)
                        if verdict::decide(&frame, role, 7, &rounded, &settings, || now).action
                            == Action::Pass =>
                    {
                        bump(&tally.rounding)
                    }
                    _ => {
                        return Err(TestCaseError::fail(format!(
                            "layers disagree at now0+{}ns: ebpf {ebpf:?}, nft {nft:?}\n\
                             packet {p:?}\nentries {entries:#?}",
                            seed.at
                        )))
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        let (pass, drop) = (tally.pass.get(), tally.drop.get());
        let excluded = tally.stateless_reply.get() + tally.rounding.get();
        let total = pass + drop + excluded;
        let fraction = excluded as f64 / total as f64;
        eprintln!(
            "{total} packets: {pass} pass in both ({} as replies), {drop} drop in both, excluded \
             {} stateless replies + {} timeout rounding = {:.2} %",
            tally.pass_reply.get(),
            tally.stateless_reply.get(),
            tally.rounding.get(),
            100.0 * fraction
        );
        assert!(pass > total / 10, "too few agreeing passes: {tally:?}");
        assert!(drop > total / 10, "too few agreeing drops: {tally:?}");
        assert!(tally.pass_reply.get() > total / 50, "too few agreeing replies: {tally:?}");
        assert!(fraction < 0.08, "excluded fraction {fraction:.3} too large: {tally:?}");
    }

    // ---- the real nft accepts the text -------------------------------------------

    /// Runs `nft -c -f -` (check only: nothing is changed) in a fresh network
    /// namespace, so the host's ruleset is neither read nor touched.
    fn nft_check(text: &str) {
        let mut child = Command::new("unshare")
            .args(["-n", "nft", "-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `unshare -n nft -c -f -` ({e}): this test needs util-linux's \
                     unshare, nftables' nft and root; `cargo xtask setup` installs them"
                )
            });
        let written = child.stdin.take().expect("stdin is piped").write_all(text.as_bytes());
        let out = child.wait_with_output().expect("waiting for nft");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(127),
            "nft is not installed (install nftables; `cargo xtask setup` does): {stderr}"
        );
        assert!(
            out.status.success() && written.is_ok(),
            "nft -c refused the ruleset ({}): {stderr}\n---\n{text}",
            out.status
        );
    }

    /// A reproducible spread of entries: both families, all protocols, both
    /// sides, with and without replies, timed, expired, clamped and infrastructure.
    fn spread(n: u32) -> Vec<FlowEntry> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n)
            .filter_map(|i| {
                let r = next();
                let (a, b) = ((r % 200) as u8 + 1, ((r >> 8) % 200) as u8 + 1);
                let v6 = (r >> 16) & 1 == 1;
                let (src, dst) = if v6 {
                    (ip(&format!("fd00:a1:77::{a:x}")), ip(&format!("fd00:a1:78::{b:x}")))
                } else {
                    (ip(&format!("10.77.0.{a}")), ip(&format!("10.78.0.{b}")))
                };
                let protocol =
                    [Protocol::Tcp, Protocol::Udp, Protocol::Icmp][(r >> 17) as usize % 3];
                let port = (protocol != Protocol::Icmp).then_some((r >> 20) as u16 % 65535 + 1);
                let flow = Flow::new(src, dst, protocol, port).ok()?;
                let expiry = match (r >> 40) % 5 {
                    0 => Expiry::Infrastructure,
                    1 => Expiry::At(NOW0 - S),
                    2 => Expiry::At(u64::MAX),
                    _ => Expiry::At(NOW0 + (r >> 44) % 100_000 * S + 1),
                };
                let ingress = if (r >> 50) & 1 == 1 { Ingress::Uplink } else { Ingress::Patient };
                FlowEntry::new(
                    flow,
                    i,
                    u32::MAX,
                    ingress,
                    (r >> 51) & 1 == 1,
                    expiry,
                    expiry == Expiry::Infrastructure,
                )
                .ok()
            })
            .collect()
    }

    #[test]
    fn nft_accepts_the_rendered_text() {
        nft_check(GOLDEN);
        nft_check(&compile(&NftInput::new(0), &[], NOW0).to_string());
        let input = NftInput::new(u32::MAX)
            .with_table("airlock_check")
            .unwrap()
            .with_ports(Ingress::Patient, ["patient0", "patient1.100", "p-2_x"])
            .unwrap()
            .with_ports(Ingress::Uplink, ["wg0", "uplink0"])
            .unwrap()
            .with_reply_min_port(32768);
        let entries = spread(400);
        let rs = compile(&input, &entries, NOW0);
        let elements: usize = rs.sets().iter().map(NftSet::len).sum();
        assert!(elements > 300, "the spread should fill the sets: {elements}");
        // One element per live entry (entries of the same key, side and reply
        // choice merge).
        let live: std::collections::HashSet<_> = entries
            .iter()
            .filter(|e| e.is_live(NOW0))
            .map(|e| (e.flow, e.ingress, e.allow_reply))
            .collect();
        assert_eq!(elements, live.len(), "one element per live entry");
        nft_check(&rs.to_string());
    }
}
