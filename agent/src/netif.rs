//! The appliance's own network interfaces: indexes, addresses, forwarding.
//! Everything here acts on the calling process's network namespace.

use std::{
    collections::BTreeSet,
    ffi::{CStr, CString},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use airlock_ebpf_common::layout::LocalAddrKey;

/// Interface problems.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// No interface by that name.
    #[error("no network interface named {0:?} in this network namespace")]
    NoSuchInterface(String),
    /// getifaddrs failed.
    #[error("cannot list interface addresses")]
    Addresses(#[source] std::io::Error),
    /// Writing a sysctl failed.
    #[error("cannot write {path}")]
    Sysctl {
        /// The /proc/sys file.
        path: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The index of interface `name`.
pub fn ifindex(name: &str) -> Result<u32, NetifError> {
    let c = CString::new(name).map_err(|_| NetifError::NoSuchInterface(name.to_owned()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(NetifError::NoSuchInterface(name.to_owned())),
        i => Ok(i),
    }
}

/// Names of every interface in this network namespace.
pub fn interfaces() -> Result<Vec<String>, NetifError> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, or NULL.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(NetifError::Addresses(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    // SAFETY: walk until the terminating entry (index 0, NULL name); freed below.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            out.push(CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned());
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

/// Interfaces other than loopback that are not among `ports`: traffic entering
/// them would be routed without passing any Airlock program.
pub fn foreign_interfaces(ports: &[&str]) -> Result<Vec<String>, NetifError> {
    Ok(interfaces()?.into_iter().filter(|n| n != "lo" && !ports.contains(&n.as_str())).collect())
}

/// Every address configured on the named interfaces, as `LOCAL_ADDRS` keys.
pub fn local_addrs(ports: &[(String, u32)]) -> Result<BTreeSet<LocalAddrKeyOrd>, NetifError> {
    let mut out = BTreeSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: out pointer is valid; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(NetifError::Addresses(std::io::Error::last_os_error()));
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs returned, until NULL.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null, NUL-terminated per getifaddrs.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        let Some(&(_, index)) = ports.iter().find(|(n, _)| *n == name) else { continue };
        // SAFETY: ifa_addr is non-null and its family says which struct it is.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        match addr {
            Some(IpAddr::V4(a)) => out.insert(LocalAddrKeyOrd(LocalAddrKey::v4(index, a.octets()))),
            Some(IpAddr::V6(a)) => out.insert(LocalAddrKeyOrd(LocalAddrKey::v6(index, a.octets()))),
            None => false,
        };
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// [`LocalAddrKey`] with a total order (for deterministic sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddrKeyOrd(pub LocalAddrKey);

impl Ord for LocalAddrKeyOrd {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0.ifindex, self.0.family, self.0.addr).cmp(&(o.0.ifindex, o.0.family, o.0.addr))
    }
}
impl PartialOrd for LocalAddrKeyOrd {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

const V4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const V6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Turns IPv4 and IPv6 forwarding on or off in this network namespace.
pub fn set_forwarding(on: bool) -> Result<(), NetifError> {
    let v = if on { "1\n" } else { "0\n" };
    for path in [V4_FORWARD, V6_FORWARD] {
        std::fs::write(path, v).map_err(|source| NetifError::Sysctl { path, source })?;
    }
    Ok(())
}

/// Whether IPv4 or IPv6 forwarding is on.
pub fn forwarding() -> bool {
    [V4_FORWARD, V6_FORWARD]
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|s| s.trim() != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_exists_and_bogus_does_not() {
        assert!(ifindex("lo").is_ok());
        assert!(matches!(ifindex("no-such-if0"), Err(NetifError::NoSuchInterface(_))));
        assert!(matches!(ifindex("bad\0name"), Err(NetifError::NoSuchInterface(_))));
    }

    #[test]
    fn interfaces_include_loopback() {
        let all = interfaces().unwrap();
        assert!(all.iter().any(|n| n == "lo"), "{all:?}");
        assert!(!foreign_interfaces(&[]).unwrap().contains(&"lo".to_owned()));
    }

    #[test]
    fn loopback_addresses_are_listed() {
        let lo = ifindex("lo").unwrap();
        let set = local_addrs(&[("lo".to_owned(), lo)]).unwrap();
        assert!(set.contains(&LocalAddrKeyOrd(LocalAddrKey::v4(lo, [127, 0, 0, 1]))), "{set:?}");
    }
}
