//! A `NETLINK_NETFILTER` socket: the only unsafe code of the netlink applier,
//! each call a thin wrapper over one libc function with its SAFETY argument.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

/// An open netlink socket to the kernel's netfilter subsystem, in the calling
/// thread's network namespace; closed on drop.
#[derive(Debug)]
pub struct NlSocket {
    fd: OwnedFd,
}

impl NlSocket {
    /// Opens and binds the socket (the kernel picks the port id), asks for
    /// short acknowledgements (`NETLINK_CAP_ACK`: the original message is cut
    /// to its header) with the offending attribute named (`NETLINK_EXT_ACK`),
    /// and gives receiving a time limit.
    pub fn open(recv_timeout: Duration) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let sock = NlSocket { fd: unsafe { OwnedFd::from_raw_fd(raw) } };
        sock.set_int(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        sock.set_int(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1)?;
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(recv_timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(recv_timeout.subsec_micros() as i32),
        };
        sock.set_opt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and the length is its size.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Makes room for a batch of `send` bytes and the answers to it: the
    /// kernel refuses a message larger than the send buffer, and drops
    /// answers (`ENOBUFS`) that do not fit the receive buffer. Tries the
    /// `…FORCE` options (CAP_NET_ADMIN, which changing nftables needs anyway)
    /// and settles for the plain ones.
    pub fn reserve(&self, send: usize, recv: usize) -> io::Result<()> {
        for (force, plain, bytes) in [
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, send),
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, recv),
        ] {
            let n = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
            if self.set_int(libc::SOL_SOCKET, force, n).is_err() {
                self.set_int(libc::SOL_SOCKET, plain, n)?;
            }
        }
        Ok(())
    }

    /// Sends `bytes` to the kernel as one datagram (one batch must be one
    /// `sendmsg`: the kernel processes a batch within one buffer).
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero addresses the kernel (pid 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `bytes` is valid for its length, `to` for its size.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    std::ptr::from_ref(&to).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            match usize::try_from(n) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!("sent {n} of {} bytes", bytes.len())))
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Receives one datagram into `buf`; an error if it did not fit.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        loop {
            // SAFETY: `buf` is valid for writes of its length. MSG_TRUNC makes
            // the result the datagram's real length.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC)
            };
            match usize::try_from(n) {
                Ok(n) if n <= buf.len() => return Ok(&buf[..n]),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "a {n}-byte answer did not fit the {}-byte buffer",
                        buf.len()
                    )))
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        self.set_opt(level, name, &value)
    }

    fn set_opt<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` points to a live T and the length is its size; the
        // callers pass the type each option expects (int, timeval).
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(value).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
