//! Link notifications from the kernel, so the agent attaches to a pod's interface as soon as
//! it appears rather than at the next rescan.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// A NETLINK_ROUTE socket subscribed to link events (RTMGRP_LINK).
pub struct LinkEvents {
    fd: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket calls; the fd is owned right after creation.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or_default();
            addr.nl_groups = libc::RTMGRP_LINK as u32;
            let len = u32::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or(12);
            if libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: the fd is ours alone, and AsyncFd owns it from here until it drops.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Waits for one or more link events and drains them. The agent rescans on any event,
    /// so their contents do not matter.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 16_384];
            let mut got = false;
            loop {
                // SAFETY: reading into a stack buffer of the given length.
                let n = unsafe { libc::recv(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                if n < 0 && err.raw_os_error() == Some(libc::ENOBUFS) {
                    // Events were lost; a rescan covers them all the same.
                    got = true;
                    continue;
                }
                return Err(err);
            }
            if got {
                return Ok(());
            }
        }
    }
}

/// This host's IPv4 addresses (every interface), which no peer may claim.
#[must_use]
pub fn local_addresses() -> std::collections::BTreeSet<std::net::Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return std::collections::BTreeSet::new() };
    addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(nix::sys::socket::SockaddrIn::ip))
        .collect()
}

/// The local UDP ports with a socket bound, from /proc/net/udp (this network namespace's,
/// when /proc is the process's own). `None` when it cannot be read.
#[must_use]
pub fn udp_listeners() -> Option<Vec<u16>> {
    let text = std::fs::read_to_string("/proc/self/net/udp").ok()?;
    Some(
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1)?.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()))
            .collect(),
    )
}
