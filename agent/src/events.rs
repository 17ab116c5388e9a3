//! Drop events from the kernel's ring buffer, decoded for logs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use airlock_ebpf_common::layout::{DropEvent, PortRole, Reason};

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

#[cfg(test)]
mod tests {
    use super::*;

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
