//! Is a management port's egress guard still attached? One rtnetlink dump
//! (`RTM_GETTFILTER`) of the filters on the port's clsact egress hook,
//! looking for a `bpf` filter with the program's name. The health check asks
//! this every `gc_interval_secs`, as it checks the XDP link pins: a guard
//! that is gone (its qdisc deleted, say) turns forwarding off until the
//! boundary is installed again.

use std::{io, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`: the clsact egress hook.
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// True when a `bpf` filter named `program` is attached to the egress hook
/// of interface `ifindex` (in the caller's network namespace).
pub fn egress_guard_present(ifindex: u32, program: &str) -> io::Result<bool> {
    // SAFETY: a plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = Vec::with_capacity(NLMSG_HDR + TCMSG);
    req.extend_from_slice(&((NLMSG_HDR + TCMSG) as u32).to_ne_bytes());
    req.extend_from_slice(&libc::RTM_GETTFILTER.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // handle
    req.extend_from_slice(&CLSACT_EGRESS.to_ne_bytes()); // parent
    req.extend_from_slice(&0u32.to_ne_bytes()); // info
                                                // SAFETY: `req` is a valid buffer of its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = false;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: `buf` is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < NLMSG_HDR || len > msgs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let body = &msgs[NLMSG_HDR..len];
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(found),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let errno =
                        body.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return match errno {
                        0 => Ok(found),
                        // No clsact qdisc (or no such interface): no guard.
                        e if -e == libc::EINVAL || -e == libc::ENOENT => Ok(false),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
                k if k == libc::RTM_NEWTFILTER => {
                    found |= body.get(TCMSG..).is_some_and(|attrs| is_named_bpf(attrs, program));
                }
                _ => {}
            }
            msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
        }
    }
}

/// The attributes of one filter: `kind` "bpf" with `TCA_BPF_NAME` `program`.
fn is_named_bpf(attrs: &[u8], program: &str) -> bool {
    let mut bpf = false;
    let mut named = false;
    for (kind, value) in attributes(attrs) {
        match kind {
            TCA_KIND => bpf = value.split(|b| *b == 0).next() == Some(b"bpf".as_slice()),
            TCA_OPTIONS => {
                named = attributes(value).any(|(k, v)| {
                    k == TCA_BPF_NAME && v.split(|b| *b == 0).next() == Some(program.as_bytes())
                })
            }
            _ => {}
        }
    }
    bpf && named
}

/// Netlink attributes: (type without flags, value).
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    #[test]
    fn a_named_bpf_filter_is_recognised_and_nothing_else() {
        let opts = attr(TCA_BPF_NAME | 0x8000, b"airlock_management_egress\0");
        let mut good = attr(TCA_KIND, b"bpf\0");
        good.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        assert!(is_named_bpf(&good, "airlock_management_egress"));
        assert!(!is_named_bpf(&good, "other"));
        let mut other_kind = attr(TCA_KIND, b"u32\0");
        other_kind.extend(attr(TCA_OPTIONS, &opts));
        assert!(!is_named_bpf(&other_kind, "airlock_management_egress"));
        assert!(!is_named_bpf(&[1, 0], "airlock_management_egress"), "truncated");
    }

    #[test]
    fn loopback_has_no_guard() {
        // A dump of a hook without a clsact qdisc answers "no guard", not an error.
        assert_eq!(egress_guard_present(1, "airlock_management_egress").ok(), Some(false));
    }
}
