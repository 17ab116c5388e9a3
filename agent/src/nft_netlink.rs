//! The nftables layer's fast path: set-element changes sent to the kernel
//! over netlink, without starting `nft`.
//!
//! A policy change that only adds and removes flows changes only elements of
//! the table's sets (`airlock_policy::nft_delta::ElementDelta`). Here that
//! delta becomes one nf_tables batch on a `NETLINK_NETFILTER` socket:
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN (res_id NFNL_SUBSYS_NFTABLES)
//!   NFT_MSG_DELSETELEM  inet <table> <set> [key, …]            ┐ NLM_F_ACK on each:
//!   NFT_MSG_NEWSETELEM  inet <table> <set> [timeout, key,      │ one answer per
//!                       comment (nft's user data TLV), …]      ┘ message
//! NFNL_MSG_BATCH_END
//! ```
//!
//! The kernel applies the batch as one transaction: every message or none.
//! Each message's answer is read back; a refusal is returned with its errno,
//! the kernel's message and what it refers to (the table, the set or the
//! element, from the extended ack's attribute offset). Elements are written
//! as `nft` writes them (same key layout, timeout in milliseconds, the same
//! comment), so `nft list` shows the same table either way. The per-element
//! counter is not sent: the sets are declared with `counter`, and the kernel
//! gives every new element of such a set the set's expressions (nft 1.0.6
//! sends none either).
//!
//! [`NftNetlink`] is the socket; keep one open where changes are frequent
//! (closing it right after a commit waits for the kernel's grace period).
//! `nft -f` stays the path for everything else (first install, a changed
//! shape): see `crate::nftables` and `crate::policy_cmd`. The encoding is in
//! `wire` (pure, tested against the bytes nft sends), the socket in `socket`.

mod socket;
pub mod wire;

use std::{io, time::Duration};

use airlock_policy::nft_delta::{key_text, ElementDelta};

use self::{
    socket::NlSocket,
    wire::{Ack, Incoming, Located, MessageMap, Op},
};

/// How long to wait for the kernel's answer (a batch of 100k elements
/// commits in well under a second).
const RECV_TIMEOUT: Duration = Duration::from_secs(30);
const RECV_BUF: usize = 64 * 1024;
/// Receive-buffer room per expected answer (an ack is a small skb, but the
/// buffer counts its whole allocation).
const RECV_PER_ANSWER: usize = 4096;
const ENOENT: i32 = libc::ENOENT;

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened or prepared, or the batch not sent:
    /// nothing changed.
    #[error("cannot {action} the nf_tables netlink socket")]
    Socket {
        /// What failed.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the batch; it committed none of it.
    #[error("the kernel refused {what} (errno {errno}{}); nothing was changed",
        kernel_msg.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        /// What was refused: the batch, a message, the table, a set or an element.
        what: String,
        /// The errno.
        errno: i32,
        /// The kernel's extended-ack message, if any.
        kernel_msg: Option<String>,
        /// The errno as an error.
        #[source]
        source: io::Error,
    },
    /// The batch was sent but not every answer came back (or one could not
    /// be read): whether the kernel committed it is unknown.
    #[error("{missing} of {expected} answers to the nf_tables batch missing: whether it was applied is unknown")]
    Unconfirmed {
        /// Answers not received.
        missing: usize,
        /// Answers expected.
        expected: usize,
        /// Why receiving stopped.
        #[source]
        source: io::Error,
    },
}

fn socket_error(action: &'static str) -> impl FnOnce(io::Error) -> NetlinkError {
    move |source| NetlinkError::Socket { action, source }
}

/// A `NETLINK_NETFILTER` socket for element changes and table lookups, in
/// the network namespace of the thread that opened it.
///
/// Keep it for as long as there are changes to make: closing a netfilter
/// netlink socket right after a commit waits for the kernel to release the
/// committed transaction (an RCU grace period, 12–16 ms measured here; see
/// BENCHMARKS.md). That wait comes after the change is in force, but it is
/// the caller's time.
#[derive(Debug)]
pub struct NftNetlink {
    sock: NlSocket,
    next_seq: u32,
}

impl NftNetlink {
    /// Opens the socket.
    pub fn open() -> Result<Self, NetlinkError> {
        let sock = NlSocket::open(RECV_TIMEOUT).map_err(socket_error("open"))?;
        Ok(NftNetlink { sock, next_seq: 1 })
    }

    /// The first of the next sequence numbers; after `used`, the next ones
    /// start above it (from 1 again long before they could wrap).
    fn next_seq(&mut self, used: u32) {
        self.next_seq = if used >= u32::MAX / 2 { 1 } else { used + 1 };
    }

    /// Applies `delta` to the table in one transaction (see the module
    /// docs). `Ok` only when the kernel acknowledged every message — the
    /// change is then in force; on `Refused` the table is unchanged.
    pub fn apply_delta(&mut self, delta: &ElementDelta) -> Result<(), NetlinkError> {
        if delta.is_empty() {
            return Ok(());
        }
        let batch = wire::encode(delta, self.next_seq);
        self.next_seq(batch.end_seq);
        let expected = batch.messages.len();
        self.sock
            .reserve(batch.bytes.len() + RECV_BUF, (expected + 2) * RECV_PER_ANSWER)
            .map_err(socket_error("size the buffers of"))?;
        self.sock.send(&batch.bytes).map_err(socket_error("send the batch on"))?;
        self.read_answers(delta, &batch)
    }

    fn read_answers(
        &mut self,
        delta: &ElementDelta,
        batch: &wire::Batch,
    ) -> Result<(), NetlinkError> {
        let expected = batch.messages.len();
        let mut answered = vec![false; expected];
        let mut missing = expected;
        let mut first_refusal: Option<(usize, Ack)> = None;
        let mut buf = vec![0u8; RECV_BUF];
        let unconfirmed = |missing, source| NetlinkError::Unconfirmed { missing, expected, source };
        while missing > 0 {
            let data = self.sock.recv(&mut buf).map_err(|e| unconfirmed(missing, e))?;
            let answers = wire::parse(data).ok_or_else(|| {
                unconfirmed(missing, io::Error::other("malformed netlink answer"))
            })?;
            for answer in answers {
                let Incoming::Ack(ack) = answer else { continue };
                if ack.seq == batch.begin_seq || ack.seq == batch.end_seq {
                    // The batch as a whole (e.g. the commit failed): nothing applied.
                    if ack.errno != 0 {
                        return Err(refused("the batch".to_owned(), ack));
                    }
                    continue;
                }
                // Answers to earlier requests on this socket are not ours.
                let Some(i) = ack
                    .seq
                    .checked_sub(batch.begin_seq + 1)
                    .and_then(|i| usize::try_from(i).ok())
                    .filter(|i| *i < expected)
                else {
                    continue;
                };
                if std::mem::replace(&mut answered[i], true) {
                    continue;
                }
                missing -= 1;
                if ack.errno != 0 && first_refusal.as_ref().is_none_or(|(j, _)| i < *j) {
                    first_refusal = Some((i, ack));
                }
            }
        }
        match first_refusal {
            None => Ok(()),
            Some((i, ack)) => {
                let what = batch.messages.get(i).map_or_else(
                    || "a message".to_owned(),
                    |m| describe(delta, m, i, expected, &ack),
                );
                Err(refused(what, ack))
            }
        }
    }

    /// True when the table `inet <name>` exists (one `NFT_MSG_GETTABLE`
    /// round trip).
    pub fn table_exists(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let seq = self.next_seq;
        self.next_seq(seq);
        let sent = self.sock.send(&wire::get_table(name, seq));
        sent.map_err(socket_error("send the table lookup on"))?;
        let mut buf = vec![0u8; RECV_BUF];
        let unconfirmed = |source| NetlinkError::Unconfirmed { missing: 1, expected: 1, source };
        loop {
            let data = self.sock.recv(&mut buf).map_err(unconfirmed)?;
            let answers = wire::parse(data)
                .ok_or_else(|| unconfirmed(io::Error::other("malformed netlink answer")))?;
            for answer in answers {
                match answer {
                    Incoming::Ack(ack) if ack.seq == seq => {
                        return match ack.errno {
                            0 => Ok(true),
                            ENOENT => Ok(false),
                            _ => Err(refused(format!("the lookup of table inet {name}"), ack)),
                        };
                    }
                    _ => {}
                }
            }
        }
    }
}

/// [`NftNetlink::apply_delta`] on a socket of its own (closed afterwards).
pub fn apply_delta(delta: &ElementDelta) -> Result<(), NetlinkError> {
    NftNetlink::open()?.apply_delta(delta)
}

/// [`NftNetlink::table_exists`] on a socket of its own (closed afterwards).
pub fn table_exists(name: &str) -> Result<bool, NetlinkError> {
    NftNetlink::open()?.table_exists(name)
}

fn refused(what: String, ack: Ack) -> NetlinkError {
    NetlinkError::Refused {
        what,
        errno: ack.errno,
        kernel_msg: ack.msg,
        source: io::Error::from_raw_os_error(ack.errno),
    }
}

/// Names what a refused message's error refers to, e.g. `element
/// 10.77.0.12 . 10.78.0.100 . tcp . 443 of set inet airlock flow4_patient
/// (delete, message 1 of 2)`.
fn describe(delta: &ElementDelta, m: &MessageMap, i: usize, n: usize, ack: &Ack) -> String {
    let (table, set) = (delta.table(), m.set);
    let op = match m.op {
        Op::Delete => "delete",
        Op::Add => "add",
    };
    let flow = |index: usize| match m.op {
        Op::Delete => delta.removals().get(index).map(|(_, f)| *f),
        Op::Add => delta.additions().get(index).map(|(_, e)| e.flow),
    };
    let at = format!("{op}, message {} of {n}", i + 1);
    match ack.offset.map(|o| m.locate(o)) {
        Some(Located::Table) => format!("table inet {table} ({at})"),
        Some(Located::Set) => format!("set inet {table} {set} ({at})"),
        Some(Located::Element(index)) => match flow(index) {
            Some(f) => format!("element {} of set inet {table} {set} ({at})", key_text(&f)),
            None => format!("an element of set inet {table} {set} ({at})"),
        },
        Some(Located::Message) | None => format!("the elements of set inet {table} {set} ({at})"),
    }
}
