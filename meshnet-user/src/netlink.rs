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

/// The MAC address of the other end of a veth: a pod's own interface, in the pod's network
/// namespace. `RTM_GETLINK` of the host side names the peer's ifindex and the id of its
/// namespace; a second one with `IFLA_TARGET_NETNSID` (Linux 4.20) reads the peer there.
/// `None` when the interface is no veth. From the kernel, not from what the pod sends: a pod
/// can put any source address on its frames, but not change this one without
/// `CAP_NET_ADMIN` in its namespace.
pub fn veth_peer_mac(ifindex: u32) -> io::Result<Option<[u8; 6]>> {
    let sock = RouteSocket::new()?;
    let host = sock.get_link(ifindex, None)?;
    if host.kind.as_deref() != Some(b"veth".as_slice()) {
        return Ok(None);
    }
    let Some(peer) = host.peer.filter(|l| *l != 0) else { return Ok(None) };
    let far = sock.get_link(peer, host.peer_netnsid)?;
    // A kernel that ignores IFLA_TARGET_NETNSID answers with this namespace's link of that
    // index, another device; one that honours it says so in the reply.
    if far.index != Some(peer) || (host.peer_netnsid.is_some() && far.target_netnsid != host.peer_netnsid) {
        return Err(io::Error::other("this kernel cannot read a link in another network namespace (IFLA_TARGET_NETNSID, Linux 4.20)"));
    }
    Ok(far.mac)
}

/// What [`RouteSocket::get_link`] reads of a link.
#[derive(Debug, Default)]
struct Link {
    index: Option<u32>,
    mac: Option<[u8; 6]>,
    /// `IFLA_LINK`: a veth's peer.
    peer: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the namespace of that peer, when it is another one.
    peer_netnsid: Option<i32>,
    /// `IFLA_INFO_KIND` inside `IFLA_LINKINFO`, without its NUL.
    kind: Option<Vec<u8>>,
    /// `IFLA_TARGET_NETNSID`: the namespace a reply is about, when the request named one.
    target_netnsid: Option<i32>,
}

/// A blocking NETLINK_ROUTE socket for one request at a time.
struct RouteSocket {
    fd: OwnedFd,
}

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
// libc gives these as c_int; the wire has them narrower.
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const AF_UNSPEC: u8 = 0;

impl RouteSocket {
    fn new() -> io::Result<Self> {
        // SAFETY: a plain socket call; the fd is owned right after creation.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A kernel that never answers must not hang a rescan.
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: setsockopt with a timeval of the size given.
        unsafe {
            libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(16));
        }
        Ok(Self { fd })
    }

    /// `RTM_GETLINK` of one link, in the namespace with id `netnsid` (this one when `None`).
    fn get_link(&self, ifindex: u32, netnsid: Option<i32>) -> io::Result<Link> {
        let index = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut req = Vec::with_capacity(NLMSG_HDRLEN + IFINFOMSG_LEN + 8);
        req.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
        req.extend_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
        req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        req.extend_from_slice(&[AF_UNSPEC, 0, 0, 0]);
        req.extend_from_slice(&index.to_ne_bytes());
        req.extend_from_slice(&[0; 8]); // flags, change
        if let Some(id) = netnsid {
            req.extend_from_slice(&8u16.to_ne_bytes());
            req.extend_from_slice(&libc::IFLA_TARGET_NETNSID.to_ne_bytes());
            req.extend_from_slice(&id.to_ne_bytes());
        }
        let len = u32::try_from(req.len()).unwrap_or(0);
        req[..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: sending from and receiving into buffers of the lengths given.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 65_536];
        // SAFETY: as above.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        parse_link_reply(&buf[..n.unsigned_abs()])
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Route attributes (`struct rtattr`, 4-byte aligned) as (type, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & 0x3fff; // without NLA_F_NESTED and NLA_F_NET_BYTEORDER
        let payload = b.get(4..len)?;
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((ty, payload))
    })
}

/// The first message of a reply to `RTM_GETLINK`: the link, or the kernel's error.
fn parse_link_reply(b: &[u8]) -> io::Result<Link> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {what}"));
    let ty = u16_at(b, 4).ok_or_else(|| bad("too short"))?;
    if ty == NLMSG_ERROR {
        let code = u32_at(b, NLMSG_HDRLEN).ok_or_else(|| bad("short error"))?.cast_signed();
        return Err(io::Error::from_raw_os_error(-code));
    }
    if ty != libc::RTM_NEWLINK {
        return Err(bad(&format!("message type {ty}")));
    }
    let len = usize::try_from(u32_at(b, 0).unwrap_or(0)).unwrap_or(0).min(b.len());
    let body = b.get(NLMSG_HDRLEN + IFINFOMSG_LEN..len).ok_or_else(|| bad("truncated"))?;
    let mut link = Link { index: u32_at(b, NLMSG_HDRLEN + 4), ..Link::default() };
    for (ty, payload) in attrs(body) {
        match ty {
            libc::IFLA_ADDRESS => link.mac = payload.try_into().ok(),
            libc::IFLA_LINK => link.peer = u32_at(payload, 0),
            libc::IFLA_LINK_NETNSID => link.peer_netnsid = u32_at(payload, 0).map(u32::cast_signed),
            libc::IFLA_TARGET_NETNSID => link.target_netnsid = u32_at(payload, 0).map(u32::cast_signed),
            libc::IFLA_LINKINFO => {
                link.kind = attrs(payload)
                    .find(|(t, _)| *t == libc::IFLA_INFO_KIND)
                    .map(|(_, k)| k.split(|c| *c == 0).next().unwrap_or_default().to_vec());
            }
            _ => {}
        }
    }
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as the kernel writes it: header, ifinfomsg, then attributes.
    fn reply(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        b[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        b[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&12i32.to_ne_bytes());
        for (ty, payload) in attrs {
            let len = u16::try_from(4 + payload.len()).unwrap();
            b.extend_from_slice(&len.to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(payload);
            b.resize(b.len().next_multiple_of(4), 0);
        }
        let len = u32::try_from(b.len()).unwrap();
        b[..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    #[test]
    fn a_link_reply_gives_mac_peer_namespace_and_kind() {
        let mut info = vec![];
        info.extend_from_slice(&9u16.to_ne_bytes());
        info.extend_from_slice(&libc::IFLA_INFO_KIND.to_ne_bytes());
        info.extend_from_slice(b"veth\0");
        let b = reply(&[
            (libc::IFLA_IFNAME, b"vethab12\0"),
            (libc::IFLA_ADDRESS, &[0x0a, 0x58, 0x0a, 0xf4, 0, 5]),
            (libc::IFLA_LINK, &7u32.to_ne_bytes()),
            (libc::IFLA_LINK_NETNSID, &3i32.to_ne_bytes()),
            (libc::IFLA_LINKINFO | 0x8000, &info),
        ]);
        let link = parse_link_reply(&b).unwrap();
        assert_eq!(link.mac, Some([0x0a, 0x58, 0x0a, 0xf4, 0, 5]));
        assert_eq!((link.index, link.peer, link.peer_netnsid, link.target_netnsid), (Some(12), Some(7), Some(3), None));
        assert_eq!(link.kind.as_deref(), Some(b"veth".as_slice()));
    }

    #[test]
    fn malformed_and_error_replies_are_errors_not_panics() {
        let mut err = vec![0u8; NLMSG_HDRLEN + 4];
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[NLMSG_HDRLEN..].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(parse_link_reply(&err).unwrap_err().raw_os_error(), Some(libc::ENODEV));
        assert!(parse_link_reply(&[1, 2]).is_err());
        // An attribute claiming more than there is ends the walk; a MAC of the wrong size is none.
        let mut b = reply(&[(libc::IFLA_ADDRESS, &[1, 2, 3])]);
        b.extend_from_slice(&[200, 0, 1, 0]);
        let len = u32::try_from(b.len()).unwrap();
        b[..4].copy_from_slice(&len.to_ne_bytes());
        let link = parse_link_reply(&b).unwrap();
        assert_eq!(link.mac, None);
    }
}
