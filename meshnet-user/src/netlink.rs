//! Link notifications from the kernel, so the agent attaches to a pod's interface as soon as
//! it appears rather than at the next rescan, and what the kernel says of a pod's interface.
//! The netlink message and attribute walkers here serve every netlink reader (nftables too).

use std::{
    io,
    net::Ipv4Addr,
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

/// A pod's end of a veth, as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPeer {
    /// The host side's MAC address.
    pub host_mac: [u8; 6],
    /// The pod's interface's MAC address.
    pub pod_mac: [u8; 6],
    /// The IPv4 addresses on the pod's interface.
    pub addrs: Vec<Ipv4Addr>,
}

/// The other end of a veth: a pod's own interface, in the pod's network namespace.
/// `RTM_GETLINK` of the host side names the peer's ifindex and the id of its namespace; with
/// `IFLA_TARGET_NETNSID` and `IFA_TARGET_NETNSID` (Linux 4.20) `RTM_GETLINK` and
/// `RTM_GETADDR` read the peer there. `None` when the interface is no veth, or its other end
/// is in this namespace (no pod's: `delivery: peer` hands packets to the other end of a port
/// table's veth with `bpf_redirect_peer`, which drops them within one namespace). From the kernel,
/// not from what the pod sends: a pod puts any source addresses on its packets, but changes
/// neither its interface's MAC nor its addresses without `CAP_NET_ADMIN` in its namespace.
pub fn veth_peer(ifindex: u32) -> io::Result<Option<VethPeer>> {
    let sock = RouteSocket::new()?;
    let host = sock.get_link(ifindex, None)?;
    if host.kind.as_deref() != Some(b"veth".as_slice()) {
        return Ok(None);
    }
    let (Some(peer), Some(host_mac), Some(_)) = (host.peer.filter(|l| *l != 0), host.mac, host.peer_netnsid) else { return Ok(None) };
    let far = sock.get_link(peer, host.peer_netnsid)?;
    // A kernel that ignores the target namespace answers with this namespace's link of that
    // index, another device; one that honours it says so in the reply.
    if far.index != Some(peer) || far.target_netnsid != host.peer_netnsid {
        return Err(unsupported());
    }
    let Some(pod_mac) = far.mac else { return Ok(None) };
    let addrs = sock.get_addrs(peer, host.peer_netnsid)?;
    Ok(Some(VethPeer { host_mac, pod_mac, addrs }))
}

/// The largest IPv4 packets link `ifindex` may build by GSO and by GRO
/// (`IFLA_GSO_IPV4_MAX_SIZE`, `IFLA_GRO_IPV4_MAX_SIZE`; Linux 6.3): past 65,536, IPv4 BIG TCP
/// is on there. `None` for a size the kernel does not report (before 6.3: no BIG TCP).
pub fn ipv4_big_packet_sizes(ifindex: u32) -> io::Result<(Option<u32>, Option<u32>)> {
    let link = RouteSocket::new()?.get_link(ifindex, None)?;
    Ok((link.gso_ipv4_max_size, link.gro_ipv4_max_size))
}

/// The id of the program in the bpf filter at `priority` and `handle` among the filters of
/// `parent` (a clsact hook) on interface `ifindex`; `None` when there is no such filter.
pub fn tc_filter_program(ifindex: u32, parent: u32, priority: u16, handle: u32) -> io::Result<Option<u32>> {
    let sock = RouteSocket::new()?;
    let index = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut body = [0u8; TCMSG_LEN];
    body[4..8].copy_from_slice(&index.to_ne_bytes());
    body[12..16].copy_from_slice(&parent.to_ne_bytes());
    sock.send(&request(libc::RTM_GETTFILTER, NLM_F_DUMP, &body, None))?;
    let mut found = None;
    loop {
        let datagram = sock.recv()?;
        for msg in messages(&datagram) {
            match parse_filter_message(msg?)? {
                FilterMessage::Done => return Ok(found),
                FilterMessage::Filter(f) if f.priority == priority && f.handle == handle && f.kind == b"bpf" => {
                    found = f.program.or(found);
                }
                FilterMessage::Filter(_) => {}
            }
        }
    }
}

fn unsupported() -> io::Error {
    io::Error::other("this kernel cannot read links and addresses in another network namespace (IFLA/IFA_TARGET_NETNSID, Linux 4.20)")
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
    /// `IFLA_GSO_IPV4_MAX_SIZE` and `IFLA_GRO_IPV4_MAX_SIZE`.
    gso_ipv4_max_size: Option<u32>,
    gro_ipv4_max_size: Option<u32>,
}

/// `enum` values of `if_link.h` (Linux 6.3) that the libc crate does not name yet.
const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;

/// What [`tc_filter_program`] reads of a tc filter.
#[derive(Debug, Default, PartialEq, Eq)]
struct Filter {
    priority: u16,
    handle: u32,
    /// `TCA_KIND`, without its NUL.
    kind: Vec<u8>,
    /// `TCA_BPF_ID` inside `TCA_OPTIONS`.
    program: Option<u32>,
}

/// One message of a reply to an `RTM_GETTFILTER` dump.
#[derive(Debug, PartialEq, Eq)]
enum FilterMessage {
    Filter(Filter),
    Done,
}

/// A message of a filter dump. A dump the kernel says was interrupted by a change
/// (`NLM_F_DUMP_INTR`) may lack a filter, and is an error: absence is not to be concluded.
fn parse_filter_message(msg: &[u8]) -> io::Result<FilterMessage> {
    const NLM_F_DUMP_INTR: u16 = 0x10;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_ID: u16 = 11;
    if u16_at(msg, 6).is_some_and(|f| f & NLM_F_DUMP_INTR != 0) {
        return Err(io::Error::new(io::ErrorKind::Interrupted, "the filter dump was interrupted by a change"));
    }
    match message_type(msg).ok_or_else(|| bad("too short"))? {
        NLMSG_DONE => return Ok(FilterMessage::Done),
        NLMSG_ERROR => {
            error_of(msg)?;
            return Err(bad("an acknowledgement, no filter"));
        }
        ty if ty != libc::RTM_NEWTFILTER => return Err(bad(&format!("message type {ty}"))),
        _ => {}
    }
    let len = usize::try_from(u32_at(msg, 0).unwrap_or(0)).unwrap_or(0).min(msg.len());
    let body = msg.get(NLMSG_HDRLEN + TCMSG_LEN..len).ok_or_else(|| bad("truncated filter"))?;
    let info = u32_at(msg, NLMSG_HDRLEN + 16).ok_or_else(|| bad("truncated filter"))?;
    let mut f = Filter {
        // tcm_info: the priority in the upper half, the protocol in the lower.
        priority: u16::try_from(info >> 16).unwrap_or_default(),
        handle: u32_at(msg, NLMSG_HDRLEN + 8).ok_or_else(|| bad("truncated filter"))?,
        ..Filter::default()
    };
    for (ty, payload) in attrs(body) {
        match ty {
            TCA_KIND => f.kind = payload.split(|c| *c == 0).next().unwrap_or_default().to_vec(),
            TCA_OPTIONS => f.program = attrs(payload).find(|(t, _)| *t == TCA_BPF_ID).and_then(|(_, p)| u32_at(p, 0)),
            _ => {}
        }
    }
    Ok(FilterMessage::Filter(f))
}

/// A blocking NETLINK_ROUTE socket for one request at a time.
struct RouteSocket {
    fd: OwnedFd,
}

pub(crate) const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
/// `struct tcmsg`: family and padding, ifindex, handle, parent, info.
const TCMSG_LEN: usize = 20;
// libc gives these as c_int; the wire has them narrower.
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
/// `IFA_TARGET_NETNSID` and `NETLINK_GET_STRICT_CHK` (Linux 4.20; libc has no constants for them).
const IFA_TARGET_NETNSID: u16 = 10;
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;

/// A request: header, the family-specific message, then one `i32` attribute if any.
fn request(ty: u16, flags: u16, body: &[u8], attr: Option<(u16, i32)>) -> Vec<u8> {
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + body.len() + 8);
    req.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    req.extend_from_slice(&ty.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    req.extend_from_slice(body);
    if let Some((ty, value)) = attr {
        req.extend_from_slice(&8u16.to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&value.to_ne_bytes());
    }
    let len = u32::try_from(req.len()).unwrap_or(0);
    req[..4].copy_from_slice(&len.to_ne_bytes());
    req
}

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
        // Without strict checking the kernel ignores a dump request's IFA_TARGET_NETNSID and
        // dumps this namespace's addresses (which the reply then says, and we refuse).
        let strict: libc::c_int = 1;
        // SAFETY: setsockopt with values of the sizes given.
        unsafe {
            libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(16));
            libc::setsockopt(raw, libc::SOL_NETLINK, NETLINK_GET_STRICT_CHK, (&raw const strict).cast(), libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4));
        }
        Ok(Self { fd })
    }

    fn send(&self, req: &[u8]) -> io::Result<()> {
        // SAFETY: sending from a buffer of the length given.
        if unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram of the reply.
    fn recv(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        // SAFETY: receiving into a buffer of the length given.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n.unsigned_abs());
        Ok(buf)
    }

    /// `RTM_GETLINK` of one link, in the namespace with id `netnsid` (this one when `None`).
    fn get_link(&self, ifindex: u32, netnsid: Option<i32>) -> io::Result<Link> {
        let index = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut body = [0u8; IFINFOMSG_LEN];
        body[0] = AF_UNSPEC;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        self.send(&request(libc::RTM_GETLINK, 0, &body, netnsid.map(|id| (libc::IFLA_TARGET_NETNSID, id))))?;
        parse_link_reply(&self.recv()?)
    }

    /// The IPv4 addresses of link `ifindex` in the namespace with id `netnsid` (a dump of
    /// the namespace's addresses, filtered here: older kernels ignore a filter in the request).
    fn get_addrs(&self, ifindex: u32, netnsid: Option<i32>) -> io::Result<Vec<Ipv4Addr>> {
        let mut body = [0u8; IFADDRMSG_LEN];
        body[0] = AF_INET;
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        self.send(&request(libc::RTM_GETADDR, NLM_F_DUMP, &body, netnsid.map(|id| (IFA_TARGET_NETNSID, id))))?;
        let mut addrs = Vec::new();
        loop {
            let datagram = self.recv()?;
            for msg in messages(&datagram) {
                match parse_addr_message(msg?)? {
                    AddrMessage::Done => return Ok(addrs),
                    AddrMessage::Addr { index, addr, target_netnsid } => {
                        if netnsid.is_some() && target_netnsid != netnsid {
                            return Err(unsupported());
                        }
                        if index == ifindex {
                            addrs.push(addr);
                        }
                    }
                    AddrMessage::Other => {}
                }
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The netlink messages of one datagram, each with its header. A message whose length is
/// shorter than a header or runs past the datagram is an error, and the walk ends there.
pub(crate) fn messages(mut b: &[u8]) -> impl Iterator<Item = io::Result<&[u8]>> {
    std::iter::from_fn(move || {
        let len = usize::try_from(u32_at(b, 0)?).ok()?;
        let Some(msg) = b.get(..len).filter(|_| len >= NLMSG_HDRLEN) else {
            b = &[];
            return Some(Err(bad("a truncated message")));
        };
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(msg))
    })
}

/// A message's type (`nlmsg_type`).
pub(crate) fn message_type(msg: &[u8]) -> Option<u16> {
    u16_at(msg, 4)
}

/// Netlink attributes (`struct nlattr`, `struct rtattr`: 4-byte aligned) as (type, payload),
/// without the nested and byte-order flags. An attribute claiming more than there is ends the
/// walk.
pub(crate) fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & 0x3fff; // without NLA_F_NESTED and NLA_F_NET_BYTEORDER
        let payload = b.get(4..len)?;
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((ty, payload))
    })
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {what}"))
}

/// The kernel's error in an `NLMSG_ERROR` message (0 is an acknowledgement).
pub(crate) fn error_of(msg: &[u8]) -> io::Result<()> {
    let code = u32_at(msg, NLMSG_HDRLEN).ok_or_else(|| bad("short error"))?.cast_signed();
    if code == 0 {
        return Ok(());
    }
    Err(io::Error::from_raw_os_error(-code))
}

/// The first message of a reply to `RTM_GETLINK`: the link, or the kernel's error.
fn parse_link_reply(b: &[u8]) -> io::Result<Link> {
    let ty = message_type(b).ok_or_else(|| bad("too short"))?;
    if ty == NLMSG_ERROR {
        error_of(b)?;
        return Err(bad("an acknowledgement, no link"));
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
            IFLA_GSO_IPV4_MAX_SIZE => link.gso_ipv4_max_size = u32_at(payload, 0),
            IFLA_GRO_IPV4_MAX_SIZE => link.gro_ipv4_max_size = u32_at(payload, 0),
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

/// One message of a reply to an `RTM_GETADDR` dump.
#[derive(Debug, PartialEq, Eq)]
enum AddrMessage {
    Addr { index: u32, addr: Ipv4Addr, target_netnsid: Option<i32> },
    Done,
    /// Not IPv4, or without a local address.
    Other,
}

fn parse_addr_message(msg: &[u8]) -> io::Result<AddrMessage> {
    match message_type(msg).ok_or_else(|| bad("too short"))? {
        NLMSG_DONE => return Ok(AddrMessage::Done),
        NLMSG_ERROR => {
            error_of(msg)?;
            return Ok(AddrMessage::Other);
        }
        ty if ty != libc::RTM_NEWADDR => return Ok(AddrMessage::Other),
        _ => {}
    }
    let body = msg.get(NLMSG_HDRLEN + IFADDRMSG_LEN..).ok_or_else(|| bad("truncated address"))?;
    if msg[NLMSG_HDRLEN] != AF_INET {
        return Ok(AddrMessage::Other);
    }
    let index = u32_at(msg, NLMSG_HDRLEN + 4).ok_or_else(|| bad("truncated address"))?;
    let (mut local, mut address, mut target_netnsid) = (None, None, None);
    for (ty, payload) in attrs(body) {
        let v4 = || <[u8; 4]>::try_from(payload).ok().map(Ipv4Addr::from);
        match ty {
            libc::IFA_LOCAL => local = v4(),
            libc::IFA_ADDRESS => address = v4(),
            IFA_TARGET_NETNSID => target_netnsid = u32_at(payload, 0).map(u32::cast_signed),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on point-to-point links).
    Ok(local.or(address).map_or(AddrMessage::Other, |addr| AddrMessage::Addr { index, addr, target_netnsid }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as the kernel writes it: header, the family-specific part, then attributes.
    fn message(ty: u16, fixed: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; NLMSG_HDRLEN];
        b[4..6].copy_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(fixed);
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

    fn ifinfo(index: i32) -> Vec<u8> {
        let mut m = vec![0u8; IFINFOMSG_LEN];
        m[4..8].copy_from_slice(&index.to_ne_bytes());
        m
    }

    fn ifaddr(family: u8, index: u32) -> Vec<u8> {
        let mut m = vec![0u8; IFADDRMSG_LEN];
        m[0] = family;
        m[4..8].copy_from_slice(&index.to_ne_bytes());
        m
    }

    #[test]
    fn a_link_reply_gives_mac_peer_namespace_and_kind() {
        let mut info = vec![];
        info.extend_from_slice(&9u16.to_ne_bytes());
        info.extend_from_slice(&libc::IFLA_INFO_KIND.to_ne_bytes());
        info.extend_from_slice(b"veth\0");
        let b = message(
            libc::RTM_NEWLINK,
            &ifinfo(12),
            &[
                (libc::IFLA_IFNAME, b"vethab12\0"),
                (libc::IFLA_ADDRESS, &[0x0a, 0x58, 0x0a, 0xf4, 0, 5]),
                (libc::IFLA_LINK, &7u32.to_ne_bytes()),
                (libc::IFLA_LINK_NETNSID, &3i32.to_ne_bytes()),
                (libc::IFLA_LINKINFO | 0x8000, &info),
            ],
        );
        let link = parse_link_reply(&b).unwrap();
        assert_eq!(link.mac, Some([0x0a, 0x58, 0x0a, 0xf4, 0, 5]));
        assert_eq!((link.index, link.peer, link.peer_netnsid, link.target_netnsid), (Some(12), Some(7), Some(3), None));
        assert_eq!(link.kind.as_deref(), Some(b"veth".as_slice()));
    }

    /// What this kernel says of the loopback device's largest IPv4 packets: the default of
    /// 64 KB from 6.3 on (the attributes are read where they are), nothing before.
    #[test]
    fn the_loopbacks_ipv4_packet_sizes_are_read() {
        let sizes = ipv4_big_packet_sizes(1).unwrap();
        if aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 3, 0)) {
            assert_eq!(sizes, (Some(65_536), Some(65_536)));
        } else {
            assert_eq!(sizes, (None, None));
        }
        let b = message(libc::RTM_NEWLINK, &ifinfo(3), &[(IFLA_GSO_IPV4_MAX_SIZE, &185_000u32.to_ne_bytes()), (IFLA_GRO_IPV4_MAX_SIZE, &65_536u32.to_ne_bytes())]);
        let link = parse_link_reply(&b).unwrap();
        assert_eq!((link.gso_ipv4_max_size, link.gro_ipv4_max_size), (Some(185_000), Some(65_536)));
    }

    #[test]
    fn malformed_and_error_replies_are_errors_not_panics() {
        let mut err = message(NLMSG_ERROR, &(-libc::ENODEV).to_ne_bytes(), &[]);
        assert_eq!(parse_link_reply(&err).unwrap_err().raw_os_error(), Some(libc::ENODEV));
        assert_eq!(parse_addr_message(&err).unwrap_err().raw_os_error(), Some(libc::ENODEV));
        err.truncate(NLMSG_HDRLEN + 2);
        assert!(parse_link_reply(&err).is_err());
        assert!(parse_link_reply(&[1, 2]).is_err());
        assert!(parse_addr_message(&message(libc::RTM_NEWADDR, &[2, 0], &[])).is_err());
        // An attribute claiming more than there is ends the walk; a MAC of the wrong size is none.
        let mut b = message(libc::RTM_NEWLINK, &ifinfo(1), &[(libc::IFLA_ADDRESS, &[1, 2, 3])]);
        b.extend_from_slice(&[200, 0, 1, 0]);
        let len = u32::try_from(b.len()).unwrap();
        b[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_link_reply(&b).unwrap().mac, None);
        // A message claiming a length shorter than a header, or longer than the datagram, is
        // an error that ends the walk.
        let mut d = message(NLMSG_DONE, &[], &[]);
        d[..4].copy_from_slice(&4u32.to_ne_bytes());
        let walked: Vec<_> = messages(&d).collect();
        assert!(walked.len() == 1 && walked[0].is_err());
        let mut d = message(NLMSG_DONE, &[], &[]);
        d.extend(message(NLMSG_DONE, &[], &[]));
        d[16..20].copy_from_slice(&64u32.to_ne_bytes());
        let walked: Vec<_> = messages(&d).collect();
        assert!(walked.len() == 2 && walked[0].is_ok() && walked[1].is_err());
    }

    #[test]
    fn a_filter_dump_gives_each_filters_priority_handle_kind_and_program() {
        let tcmsg = |handle: u32, info: u32| {
            let mut m = vec![0u8; TCMSG_LEN];
            m[8..12].copy_from_slice(&handle.to_ne_bytes());
            m[12..16].copy_from_slice(&0xffff_fff2u32.to_ne_bytes());
            m[16..20].copy_from_slice(&info.to_ne_bytes());
            m
        };
        let mut options = vec![];
        options.extend_from_slice(&20u16.to_ne_bytes());
        options.extend_from_slice(&7u16.to_ne_bytes()); // TCA_BPF_NAME
        options.extend_from_slice(b"meshnet_from_pod");
        options.extend_from_slice(&8u16.to_ne_bytes());
        options.extend_from_slice(&11u16.to_ne_bytes()); // TCA_BPF_ID
        options.extend_from_slice(&42u32.to_ne_bytes());
        let info = (0x4d4e_u32 << 16) | 0x0300;
        // The chain's own message (handle 0, no options), then its filter.
        let head = message(libc::RTM_NEWTFILTER, &tcmsg(0, info), &[(1, b"bpf\0")]);
        let filter = message(libc::RTM_NEWTFILTER, &tcmsg(1, info), &[(1, b"bpf\0"), (2 | 0x8000, &options)]);
        let datagram = [head, filter, message(NLMSG_DONE, &[0; 4], &[])].concat();
        let parsed: Vec<_> = messages(&datagram).map(|m| parse_filter_message(m.unwrap()).unwrap()).collect();
        let f = |handle, program| FilterMessage::Filter(Filter { priority: 0x4d4e, handle, kind: b"bpf".to_vec(), program });
        assert_eq!(parsed, [f(0, None), f(1, Some(42)), FilterMessage::Done]);
        // Interrupted by a change: it may lack the filter.
        let mut done = message(NLMSG_DONE, &[0; 4], &[]);
        done[6..8].copy_from_slice(&0x12u16.to_ne_bytes());
        assert_eq!(parse_filter_message(&done).unwrap_err().kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn an_address_dump_gives_each_ipv4_address_with_its_link() {
        let pod = message(
            libc::RTM_NEWADDR,
            &ifaddr(AF_INET, 7),
            &[
                (libc::IFA_ADDRESS, &[10, 245, 0, 20]),
                (libc::IFA_LOCAL, &[10, 245, 0, 20]),
                (IFA_TARGET_NETNSID, &3i32.to_ne_bytes()),
            ],
        );
        let lo = message(libc::RTM_NEWADDR, &ifaddr(AF_INET, 1), &[(libc::IFA_ADDRESS, &[127, 0, 0, 1])]);
        let v6 = message(libc::RTM_NEWADDR, &ifaddr(10, 7), &[(libc::IFA_ADDRESS, &[0xfe; 16])]);
        let datagram = [pod, lo, v6, message(NLMSG_DONE, &[0; 4], &[])].concat();
        let parsed: Vec<_> = messages(&datagram).map(|m| parse_addr_message(m.unwrap()).unwrap()).collect();
        assert_eq!(
            parsed,
            [
                AddrMessage::Addr { index: 7, addr: Ipv4Addr::new(10, 245, 0, 20), target_netnsid: Some(3) },
                AddrMessage::Addr { index: 1, addr: Ipv4Addr::LOCALHOST, target_netnsid: None },
                AddrMessage::Other,
                AddrMessage::Done,
            ]
        );
    }
}
