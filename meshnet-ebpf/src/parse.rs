//! Packet parsing: the only place that knows header layouts and offsets.
//!
//! Headers are read with direct packet access. When a header is not in the linear part of
//! the skb, it is pulled in with `bpf_skb_pull_data` first; pulling changes no byte, so a
//! packet meshnet does not translate still leaves byte-identical.

use aya_ebpf::programs::TcContext;
use meshnet_common::{Counter, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
const IP_MIN_HLEN: usize = 20;
/// Offsets inside the IPv4 header.
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
/// `frag_off` bits: MF and the offset, in network byte order.
const IP_MF_OFFSET_BE: u16 = 0x3fff_u16.to_be();
const IP_OFFSET_BE: u16 = 0x1fff_u16.to_be();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto_be: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id_be: u16,
    frag_off_be: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr_be: u32,
    daddr_be: u32,
}

/// An IPv4 packet meshnet may translate.
pub struct Ipv4 {
    pub proto: u8,
    pub saddr_be: u32,
    pub daddr_be: u32,
    /// MF set or a non-zero offset.
    pub is_fragment: bool,
    /// The IP identification, which ties the fragments of a datagram together.
    pub id_be: u16,
    /// Offset zero: the fragment (or whole packet) that carries the L4 header.
    pub has_l4: bool,
    pub l4_off: usize,
    /// Where the datagram ends (`ETH_HLEN` + total length); bytes after it are link padding.
    pub end: usize,
}

/// The L4 part of a TCP or UDP packet.
pub struct Ports {
    /// Both ports as one word in wire order (source port first), so both can be rewritten
    /// with one store and one checksum update.
    pub ports: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 checksum field.
    pub csum_off: usize,
}

/// Makes `len` bytes from the start of the packet readable with direct access, pulling
/// non-linear data in when needed.
#[inline(always)]
fn ensure(ctx: &TcContext, len: usize) -> Result<(), Counter> {
    if ctx.data() + len <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < len {
        return Err(Counter::Truncated);
    }
    ctx.pull_data(len as u32).map_err(|_| Counter::Truncated)?;
    if ctx.data() + len <= ctx.data_end() {
        Ok(())
    } else {
        Err(Counter::Truncated)
    }
}

/// A pointer to a `T` at `off`, after the bounds check the verifier wants to see.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

/// An IPv4 packet that could not be parsed: why, and its destination when the fixed part of
/// the header was there to read it (so that a packet bound for a remote CIDR is dropped, not
/// passed untranslated).
pub struct BadIpv4 {
    pub counter: Counter,
    pub daddr_be: Option<u32>,
}

impl From<Counter> for BadIpv4 {
    #[inline(always)]
    fn from(counter: Counter) -> Self {
        Self { counter, daddr_be: None }
    }
}

/// Parses Ethernet and IPv4. `Ok(None)` is a packet that is not IPv4 (IPv6, ARP, ...).
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Option<Ipv4>, BadIpv4> {
    if ctx.len() < ETH_HLEN as u32 {
        return Ok(None);
    }
    ensure(ctx, ETH_HLEN)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Counter::Truncated)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if unsafe { (*eth).proto_be } != ETH_P_IP_BE {
        return Ok(None);
    }
    ensure(ctx, ETH_HLEN + IP_MIN_HLEN)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(Counter::Truncated)?;
    // SAFETY: as above.
    let (ver_ihl, tot_len, frag_off_be, proto, saddr_be, daddr_be, id_be) = unsafe {
        (
            (*ip).ver_ihl,
            u16::from_be((*ip).tot_len_be) as usize,
            (*ip).frag_off_be,
            (*ip).proto,
            (*ip).saddr_be,
            (*ip).daddr_be,
            (*ip).id_be,
        )
    };
    let bad = |counter| BadIpv4 { counter, daddr_be: Some(daddr_be) };
    if ver_ihl >> 4 != 4 {
        return Err(bad(Counter::Malformed));
    }
    // The header length comes from IHL, so IP options are skipped, never misread as L4.
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < IP_MIN_HLEN || tot_len < ihl {
        return Err(bad(Counter::Malformed));
    }
    if (ctx.len() as usize) < ETH_HLEN + tot_len {
        return Err(bad(Counter::Truncated));
    }
    let is_fragment = frag_off_be & IP_MF_OFFSET_BE != 0;
    let has_l4 = frag_off_be & IP_OFFSET_BE == 0;
    Ok(Some(Ipv4 {
        proto,
        saddr_be,
        daddr_be,
        is_fragment,
        id_be,
        has_l4,
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + tot_len,
    }))
}

/// Parses the TCP or UDP header of `ip`. `Ok(None)` for other protocols and for fragments
/// without an L4 header. A header shorter than its minimum is `Truncated`, so a packet is
/// never rewritten when its checksum field is not there to be fixed.
#[inline(always)]
pub fn ports(ctx: &TcContext, ip: &Ipv4) -> Result<Option<Ports>, Counter> {
    if !ip.has_l4 {
        return Ok(None);
    }
    // One arm per protocol, each with a constant length checked right before its reads. A
    // shared variable length lets LLVM re-test the protocol after `pull_data`, from a stack
    // slot that 5.10's verifier does not tie to the register it was tested in: that
    // verifier then sees the TCP flags read on the UDP path, with 8 bytes proven.
    match ip.proto {
        IPPROTO_TCP => {
            let p = l4_header::<TCP_MIN_HLEN>(ctx, ip)?;
            // SAFETY: l4_header proved TCP_MIN_HLEN bytes at p; both ports (0..4) and the
            // flags byte (13) lie within them.
            let (ports, flags) = unsafe { (core::ptr::read_unaligned(p.cast::<u32>()), *p.add(13)) };
            Ok(Some(Ports::new(ports, flags, (ip.l4_off & 0x7f) + TCP_CSUM)))
        }
        IPPROTO_UDP => {
            let p = l4_header::<UDP_HLEN>(ctx, ip)?;
            // SAFETY: l4_header proved UDP_HLEN bytes at p; both ports lie within them.
            let ports = unsafe { core::ptr::read_unaligned(p.cast::<u32>()) };
            Ok(Some(Ports::new(ports, 0, (ip.l4_off & 0x7f) + UDP_CSUM)))
        }
        _ => Ok(None),
    }
}

/// The start of `ip`'s L4 header, once `LEN` bytes of it are proven inside both the
/// datagram and the linear packet data.
#[inline(always)]
fn l4_header<const LEN: usize>(ctx: &TcContext, ip: &Ipv4) -> Result<*const u8, Counter> {
    // l4_off is at most ETH_HLEN + 60, which keeps the verifier's range tracking happy.
    let l4_off = ip.l4_off & 0x7f;
    // The header must lie inside the datagram, not in padding after it: a checksum field
    // beyond the total length is not part of the packet and cannot be fixed.
    if l4_off + LEN > ip.end {
        return Err(Counter::Truncated);
    }
    ensure(ctx, l4_off + LEN)?;
    let p = ctx.data() + l4_off;
    if p + LEN > ctx.data_end() {
        return Err(Counter::Truncated);
    }
    Ok(p as *const u8)
}

impl Ports {
    #[inline(always)]
    fn new(ports: u32, tcp_flags: u8, csum_off: usize) -> Self {
        // The word holds the wire bytes; on a little-endian host its low half is the source port.
        let b = ports.to_ne_bytes();
        Self {
            ports,
            sport_be: u16::from_ne_bytes([b[0], b[1]]),
            dport_be: u16::from_ne_bytes([b[2], b[3]]),
            tcp_flags,
            csum_off,
        }
    }
}

/// Packs two wire-order ports into the word layout of [`Ports::ports`].
#[inline(always)]
pub fn ports_word(sport_be: u16, dport_be: u16) -> u32 {
    let s = sport_be.to_ne_bytes();
    let d = dport_be.to_ne_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// ICMP types whose message quotes the packet it is about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_HLEN: usize = 8;

/// An ICMP error quoting a TCP or UDP packet: the quoted header's offsets and tuple.
pub struct IcmpError {
    /// Offset of the ICMP checksum.
    pub icmp_csum_off: usize,
    /// Offset of the quoted IPv4 header.
    pub inner_off: usize,
    pub inner_proto: u8,
    pub inner_saddr_be: u32,
    pub inner_daddr_be: u32,
    /// The quoted ports as one word in wire order.
    pub inner_ports: u32,
    pub inner_sport_be: u16,
    pub inner_dport_be: u16,
    pub inner_csum: u16,
}

/// Parses an ICMP destination-unreachable or time-exceeded message that quotes a TCP or UDP
/// packet (an IPv4 header without options and at least the 8 bytes with the ports).
/// `Ok(None)`: any other ICMP message.
#[inline(always)]
pub fn icmp_error(ctx: &TcContext, ip: &Ipv4) -> Result<Option<IcmpError>, Counter> {
    if !ip.has_l4 || ip.is_fragment {
        return Ok(None);
    }
    let l4_off = ip.l4_off & 0x7f;
    let need = l4_off + ICMP_HLEN + IP_MIN_HLEN + 8;
    if need > ip.end {
        return Ok(None);
    }
    ensure(ctx, need)?;
    // Bounds-checked from the pointer itself, with a constant length, which is the form
    // every verifier follows.
    let p = ctx.data() + l4_off;
    if p + ICMP_HLEN + IP_MIN_HLEN + 8 > ctx.data_end() {
        return Err(Counter::Truncated);
    }
    let p = p as *const u8;
    // SAFETY: the check above covers `need` bytes from the start of the packet, which is
    // the ICMP header, the quoted IPv4 header and 8 bytes after it.
    unsafe {
        let ty = *p;
        if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
            return Ok(None);
        }
        let inner = p.add(ICMP_HLEN);
        let inner_proto = *inner.add(9);
        if *inner != 0x45 || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP) {
            return Ok(None);
        }
        let inner_ports = core::ptr::read_unaligned(inner.add(IP_MIN_HLEN).cast::<u32>());
        let b = inner_ports.to_ne_bytes();
        Ok(Some(IcmpError {
            icmp_csum_off: l4_off + 2,
            inner_off: l4_off + ICMP_HLEN,
            inner_proto,
            inner_saddr_be: core::ptr::read_unaligned(inner.add(12).cast::<u32>()),
            inner_daddr_be: core::ptr::read_unaligned(inner.add(16).cast::<u32>()),
            inner_ports,
            inner_sport_be: u16::from_ne_bytes([b[0], b[1]]),
            inner_dport_be: u16::from_ne_bytes([b[2], b[3]]),
            inner_csum: core::ptr::read_unaligned(inner.add(10).cast::<u16>()),
        }))
    }
}

/// Which address of an IPv4 header a rewrite replaces.
#[derive(Clone, Copy)]
pub enum Addr {
    Src,
    Dst,
}

/// Replaces one address of the IPv4 header in place and updates the header checksum
/// inline: direct packet access, no helper call. The L4 checksum is the caller's to fix:
/// how depends on the skb's checksum state, which only the kernel's helpers know on 5.x.
#[inline(always)]
pub fn set_addr(ctx: &TcContext, which: Addr, new_be: u32) -> Result<(), i64> {
    let start = ctx.data();
    if start + ETH_HLEN + IP_MIN_HLEN > ctx.data_end() {
        return Err(-1);
    }
    let hdr = (start + ETH_HLEN) as *mut u8;
    let addr_off = match which {
        Addr::Src => IP_SRC_OFF - ETH_HLEN,
        Addr::Dst => IP_DST_OFF - ETH_HLEN,
    };
    // SAFETY: the check above covers the fixed IPv4 header; both addresses and the
    // checksum lie within it. The tc prologue has made the header writable (unshared).
    unsafe {
        let addr = hdr.add(addr_off).cast::<u32>();
        let csum = hdr.add(IP_CSUM_OFF - ETH_HLEN).cast::<u16>();
        let old_be = core::ptr::read_unaligned(addr);
        core::ptr::write_unaligned(addr, new_be);
        core::ptr::write_unaligned(csum, csum_replace4(core::ptr::read_unaligned(csum), old_be, new_be));
    }
    Ok(())
}

/// Replaces the ports word (source and destination port, as [`Ports::ports`]) at the start
/// of `ip`'s L4 header in place. Only the L4 checksum covers ports: the caller fixes it.
#[inline(always)]
pub fn set_ports(ctx: &TcContext, ip: &Ipv4, ports: u32) -> Result<(), i64> {
    let l4_off = ip.l4_off & 0x7f;
    let p = ctx.data() + l4_off;
    if p + 4 > ctx.data_end() {
        return Err(-1);
    }
    // SAFETY: checked to lie inside the packet.
    unsafe { core::ptr::write_unaligned(p as *mut u32, ports) };
    Ok(())
}

/// A checksum updated for one 32-bit field changed from `old` to `new` (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m'), as the kernel's `csum_replace4`). Words are summed as they lie
/// in memory, in whichever byte order: a one's-complement sum does not depend on it.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check) + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Reads the 16-bit word at `off` (bounds-checked, for a checksum just rewritten).
#[inline(always)]
pub fn load_u16(ctx: &TcContext, off: usize) -> Option<u16> {
    let start = ctx.data();
    if start + off + 2 > ctx.data_end() {
        return None;
    }
    // SAFETY: checked to lie inside the packet.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const u16) })
}
