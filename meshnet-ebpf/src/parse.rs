//! Packet parsing: the only place that knows header layouts and offsets.
//!
//! Headers are read with direct packet access. When a header is not in the linear part of
//! the skb, it is pulled in with `bpf_skb_pull_data` first; pulling changes no byte, so a
//! packet meshnet does not translate still leaves byte-identical.

use aya_ebpf::programs::TcContext;
use meshnet_common::{tunnel, Counter, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
pub const IP_MIN_HLEN: usize = 20;
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

impl Ipv4 {
    /// Where the L4 header starts, bounded where the verifier sees it (see [`bounded`]).
    #[inline(always)]
    pub fn l4(&self) -> usize {
        bounded(self.l4_off, 0x7f)
    }
}

/// `v & mask`, masked where the verifier sees it. Kernels before 5.10 forget the bounds of a
/// scalar spilled to the stack (only constants keep theirs), and the compiler drops a mask it
/// can prove redundant, spilling the value all the same: the 5.4 verifier then refuses to add
/// it to a packet pointer. A volatile read is opaque to the compiler, so the mask after it
/// stays, and the verifier knows the bounds again right where an offset is used.
#[inline(always)]
pub fn bounded(v: usize, mask: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&raw const v) & mask }
}

/// A packet field read at its own width. Packet fields are often not aligned to it (the IP
/// header follows a 14-byte Ethernet header), and `read_unaligned` would split each word
/// into byte loads, shifts and ors: a dozen instructions for one load on the hot path. The
/// verifier accepts unaligned packet access wherever the CPU handles it (x86-64 and arm64,
/// what nodes run), and the JIT emits one load, as for the header structs read by field
/// here and as C programs rely on with `struct iphdr`.
///
/// # Safety
/// `p` lies inside the packet, bounds checked where the verifier sees it.
#[inline(always)]
pub unsafe fn load<T: Copy>(p: *const T) -> T {
    // SAFETY: the caller's; see above for the alignment.
    unsafe { core::ptr::read(p) }
}

/// A packet field written at its own width (see [`load`]).
///
/// # Safety
/// `p` lies inside the packet, bounds checked where the verifier sees it, and writable.
#[inline(always)]
pub unsafe fn store<T: Copy>(p: *mut T, v: T) {
    // SAFETY: the caller's.
    unsafe { core::ptr::write(p, v) }
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
/// non-linear data in when needed. For lengths computed from the packet; constant ones
/// take [`ensure_fixed`].
#[inline(always)]
fn ensure(ctx: &TcContext, len: usize) -> Result<(), Counter> {
    // Headers only: a few hundred bytes at most (see `bounded` for why it is masked here).
    if ctx.data() + bounded(len, 0x3ff) <= ctx.data_end() {
        return Ok(());
    }
    pull(ctx, len)
}

/// [`ensure`] for a constant length, which keeps its bounds wherever the compiler puts it:
/// no mask, no stack round trip on the hot path.
#[inline(always)]
fn ensure_fixed<const LEN: usize>(ctx: &TcContext) -> Result<(), Counter> {
    if ctx.data() + LEN <= ctx.data_end() {
        return Ok(());
    }
    pull(ctx, LEN)
}

#[inline(always)]
fn pull(ctx: &TcContext, len: usize) -> Result<(), Counter> {
    if (ctx.len() as usize) < len {
        return Err(Counter::Truncated);
    }
    ctx.pull_data(len as u32).map_err(|_| Counter::Truncated)?;
    if ctx.data() + bounded(len, 0x3ff) <= ctx.data_end() {
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
    ensure_fixed::<ETH_HLEN>(ctx)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Counter::Truncated)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if unsafe { (*eth).proto_be } != ETH_P_IP_BE {
        return Ok(None);
    }
    ensure_fixed::<{ ETH_HLEN + IP_MIN_HLEN }>(ctx)?;
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
            let (ports, flags) = unsafe { (load(p.cast::<u32>()), *p.add(13)) };
            Ok(Some(Ports::new(ports, flags, ip.l4() + TCP_CSUM)))
        }
        IPPROTO_UDP => {
            let p = l4_header::<UDP_HLEN>(ctx, ip)?;
            // SAFETY: l4_header proved UDP_HLEN bytes at p; both ports lie within them.
            let ports = unsafe { load(p.cast::<u32>()) };
            Ok(Some(Ports::new(ports, 0, ip.l4() + UDP_CSUM)))
        }
        _ => Ok(None),
    }
}

/// The destination port of `ip`, a UDP datagram with its L4 header (the caller checked
/// both). Behind a plain 20-byte IPv4 header the port is at a constant offset, read with one
/// constant bounds check; anything else takes [`ports`]. The uplink program asks this of
/// every UDP packet the node receives, to tell the tunnel's from the rest.
#[inline(always)]
pub fn udp_dport(ctx: &TcContext, ip: &Ipv4) -> Option<u16> {
    const AT: usize = ETH_HLEN + IP_MIN_HLEN;
    if ip.l4_off == AT && ip.end >= AT + UDP_HLEN {
        if let Some(p) = ptr_at::<[u16; 4]>(ctx, AT) {
            // SAFETY: ptr_at proved the 8-byte header inside the packet; the port is its
            // second field.
            return Some(unsafe { load(p) }[1]);
        }
    }
    ports(ctx, ip).ok().flatten().map(|l4| l4.dport_be)
}

/// The start of `ip`'s L4 header, once `LEN` bytes of it are proven inside both the
/// datagram and the linear packet data.
#[inline(always)]
fn l4_header<const LEN: usize>(ctx: &TcContext, ip: &Ipv4) -> Result<*const u8, Counter> {
    let l4_off = ip.l4();
    // The header must lie inside the datagram, not in padding after it: a checksum field
    // beyond the total length is not part of the packet and cannot be fixed.
    if l4_off + LEN > ip.end {
        return Err(Counter::Truncated);
    }
    ensure(ctx, l4_off + LEN)?;
    // Masked again after `ensure`, whose helper call clobbers the registers: the offset would
    // come back from the stack, where kernels before 5.10 forget its bounds (see `bounded`).
    let p = ctx.data() + ip.l4();
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
    let l4_off = ip.l4();
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
        let inner_ports = load(inner.add(IP_MIN_HLEN).cast::<u32>());
        let b = inner_ports.to_ne_bytes();
        Ok(Some(IcmpError {
            icmp_csum_off: l4_off + 2,
            inner_off: l4_off + ICMP_HLEN,
            inner_proto,
            inner_saddr_be: load(inner.add(12).cast::<u32>()),
            inner_daddr_be: load(inner.add(16).cast::<u32>()),
            inner_ports,
            inner_sport_be: u16::from_ne_bytes([b[0], b[1]]),
            inner_dport_be: u16::from_ne_bytes([b[2], b[3]]),
            inner_csum: load(inner.add(10).cast::<u16>()),
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
        let old_be = load(addr);
        store(addr, new_be);
        store(csum, csum_replace4(load(csum), old_be, new_be));
    }
    Ok(())
}

/// Replaces the ports word (source and destination port, as [`Ports::ports`]) at the start
/// of `ip`'s L4 header in place. Only the L4 checksum covers ports: the caller fixes it.
#[inline(always)]
pub fn set_ports(ctx: &TcContext, ip: &Ipv4, ports: u32) -> Result<(), i64> {
    let l4_off = ip.l4();
    let p = ctx.data() + l4_off;
    if p + 4 > ctx.data_end() {
        return Err(-1);
    }
    // SAFETY: checked to lie inside the packet.
    unsafe { store(p as *mut u32, ports) };
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

/// The skb's checksum state, as told by what `bpf_l4_csum_replace` with
/// `BPF_F_PSEUDO_HDR` did to an L4 checksum field when one address changed from `old` to
/// `new`: with CHECKSUM_PARTIAL the kernel adds the change to the pseudo-header's sum the
/// field holds (`c - old + new`); otherwise it updates the whole checksum (`c + old - new`,
/// RFC 1624). `Unknown` when the two would give the same value (the addresses' sums are
/// equal), or the field holds neither (another representation of zero): the caller then
/// asks the kernel again.
pub enum CsumState {
    Full,
    Partial,
    Unknown,
}

#[inline(always)]
pub fn csum_state(before: u16, after: u16, old: u32, new: u32, mangle0: bool) -> CsumState {
    // `BPF_F_MARK_MANGLED_0`: a UDP checksum that comes out zero is written as 0xffff.
    let mangled = |c: u16| if mangle0 && c == 0 { 0xffff } else { c };
    let full = mangled(csum_replace4(before, old, new));
    let partial = mangled(!csum_replace4(!before, old, new));
    // 0 and 0xffff are one value in one's complement: predictions equal up to that tell
    // nothing.
    let canonical = |c: u16| if c == 0xffff { 0 } else { c };
    if canonical(full) == canonical(partial) {
        CsumState::Unknown
    } else if after == full {
        CsumState::Full
    } else if after == partial {
        CsumState::Partial
    } else {
        CsumState::Unknown
    }
}

/// The skb's checksum state (`meshnet_common::ip_summed`), or `UNKNOWN` on kernels where
/// the loader could not make it readable.
#[inline(always)]
pub fn ip_summed(ctx: &TcContext) -> u64 {
    use aya_ebpf::EbpfContext as _;
    const P: [u64; 4] = meshnet_common::ip_summed::PLACEHOLDER;
    let state: u64;
    // SAFETY: the loader rewrites these four instructions into a kfunc call that turns the
    // context into the kernel's sk_buff and a one-byte read inside it, or into a constant;
    // either leaves r0 set and r1-r5 clobbered, as declared, and touches no memory of ours.
    unsafe {
        core::arch::asm!(
            ".8byte {0}", ".8byte {1}", ".8byte {2}", ".8byte {3}",
            const P[0], const P[1], const P[2], const P[3],
            inout("r1") ctx.as_ptr() => _,
            lateout("r0") state,
            lateout("r2") _, lateout("r3") _, lateout("r4") _, lateout("r5") _,
            options(nostack, readonly),
        );
    }
    state
}

/// Writes an L4 checksum at `off` (inside the headers), `mangle0` as [`csum_state`]'s.
#[inline(always)]
pub fn set_l4_csum(ctx: &TcContext, off: usize, csum: u16, mangle0: bool) -> Result<(), i64> {
    // Bounded here, where it meets the packet pointer: the caller's copy may have been
    // spilled across a helper call (see `bounded`).
    let p = ctx.data() + bounded(off, 0x3ff);
    if p + 2 > ctx.data_end() {
        return Err(-1);
    }
    let csum = if mangle0 && csum == 0 { 0xffff } else { csum };
    // SAFETY: checked to lie inside the packet; the tc prologue made it writable.
    unsafe { store(p as *mut u16, csum) };
    Ok(())
}

/// Reads the 16-bit word at `off` inside the headers (bounds-checked, for a checksum just
/// rewritten).
#[inline(always)]
pub fn load_u16(ctx: &TcContext, off: usize) -> Option<u16> {
    let p = ctx.data() + bounded(off, 0x3ff);
    if p + 2 > ctx.data_end() {
        return None;
    }
    // SAFETY: checked to lie inside the packet.
    Some(unsafe { load(p as *const u16) })
}

/// The fields of the IPv4 header at `ETH_HLEN` that tunnelling rewrites or copies.
pub struct IpHeader {
    pub tos: u8,
    pub tot_len: u16,
    /// Flags and fragment offset, host byte order.
    pub frag_off: u16,
    /// Header length in bytes.
    pub ihl: usize,
}

pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
pub fn ip_header(ctx: &TcContext) -> Option<IpHeader> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    unsafe {
        Some(IpHeader {
            tos: (*ip).tos,
            tot_len: u16::from_be((*ip).tot_len_be),
            frag_off: u16::from_be((*ip).frag_off_be),
            ihl: (((*ip).ver_ihl & 0x0f) as usize) * 4,
        })
    }
}

/// Bytes summed per step of [`split_keeps_l4_checksum`], and the most steps: tails of up to 8 KB,
/// what a pod of a jumbo MTU can send whole.
const SUM_STEP: usize = 64;
const SUM_STEPS: usize = 128;

/// Adds the `N` bytes at `off` to `sum` (`bpf_csum_diff`'s running sum). `N` is a constant, a
/// multiple of 4, and the buffer is written whole by the load before it is read: kernels
/// before 5.10 refuse a helper length that may be 0, and a zeroed buffer becomes a `memset`
/// call, which they refuse beside tail calls.
#[inline(always)]
fn sum_bytes<const N: usize>(ctx: &TcContext, off: usize, sum: u32) -> Result<u32, ()> {
    let mut buf = core::mem::MaybeUninit::<[u32; SUM_STEP / 4]>::uninit();
    let p = buf.as_mut_ptr().cast::<u32>();
    // SAFETY: helper calls into a stack buffer of SUM_STEP bytes, with N ≤ SUM_STEP of them,
    // the second reading only what the first wrote.
    unsafe {
        if aya_ebpf::helpers::bpf_skb_load_bytes(ctx.skb.skb.cast(), off as u32, p.cast(), N as u32) != 0 {
            return Err(());
        }
        let r = aya_ebpf::helpers::bpf_csum_diff(core::ptr::null_mut(), 0, p, N as u32, sum);
        if r < 0 {
            return Err(());
        }
        Ok(r as u32)
    }
}

/// Before a whole TCP or UDP datagram of `tot_len` bytes is cut to its first `keep` payload
/// bytes (the rest goes on as a later fragment), makes its L4 checksum come out right for the
/// datagram reassembled. A checksum the device is still to compute (`CHECKSUM_PARTIAL`, what
/// a pod's socket leaves with offload on) would cover the first fragment only: the bytes cut
/// off are added to the seed it starts from. A checksum already computed covers the whole
/// datagram and stays; which one the field holds, `bpf_l4_csum_replace` tells by what it did
/// to it (as for the address in `nat`), and what it did to a computed one is undone. Works on
/// every kernel, without the checksum state the loaded variant may not read.
#[inline(always)]
pub fn split_keeps_l4_checksum(ctx: &TcContext, proto: u8, tot_len: usize, keep: usize) -> Result<(), ()> {
    let (field, mangle) = match proto {
        IPPROTO_TCP => (TCP_CSUM, 0),
        IPPROTO_UDP => (UDP_CSUM, u64::from(aya_ebpf::bindings::BPF_F_MARK_MANGLED_0)),
        _ => return Ok(()),
    };
    let l4 = ETH_HLEN + IP_MIN_HLEN;
    let (from, end) = (l4 + keep, ETH_HLEN + tot_len);
    if from >= end || keep & 1 != 0 {
        return Err(());
    }
    if end - from > SUM_STEP * SUM_STEPS {
        // A tail past 8 KB (a pod MTU over 9 KB): split as before this adjustment existed,
        // right for a checksum already computed.
        return Ok(());
    }
    let mut sum: u32 = 0;
    let mut off = from;
    let mut i = 0;
    while i < SUM_STEPS && end - off >= SUM_STEP {
        sum = sum_bytes::<SUM_STEP>(ctx, off, sum)?;
        off += SUM_STEP;
        i += 1;
    }
    // What is left, under SUM_STEP bytes, in constant lengths.
    if end - off >= 32 {
        sum = sum_bytes::<32>(ctx, off, sum)?;
        off += 32;
    }
    if end - off >= 16 {
        sum = sum_bytes::<16>(ctx, off, sum)?;
        off += 16;
    }
    if end - off >= 8 {
        sum = sum_bytes::<8>(ctx, off, sum)?;
        off += 8;
    }
    if end - off >= 4 {
        sum = sum_bytes::<4>(ctx, off, sum)?;
        off += 4;
    }
    let rest = end - off;
    if rest > 0 {
        // The last one to three bytes, zero-padded to a word as the checksum pads an odd end
        // (`off` is even, so their place in the sum is right).
        let mut w: u32 = 0;
        let p = (&raw mut w).cast::<u8>();
        // SAFETY: helper calls into a 4-byte local, at most 2 + 1 bytes of it.
        unsafe {
            let skb = ctx.skb.skb.cast();
            // Constant stack offsets: older verifiers refuse a variable one for a helper.
            let rc = match rest {
                1 => aya_ebpf::helpers::bpf_skb_load_bytes(skb, off as u32, p.cast(), 1),
                2 => aya_ebpf::helpers::bpf_skb_load_bytes(skb, off as u32, p.cast(), 2),
                _ => match aya_ebpf::helpers::bpf_skb_load_bytes(skb, off as u32, p.cast(), 2) {
                    0 => aya_ebpf::helpers::bpf_skb_load_bytes(skb, (off + 2) as u32, p.add(2).cast(), 1),
                    e => e,
                },
            };
            if rc != 0 {
                return Err(());
            }
            let r = aya_ebpf::helpers::bpf_csum_diff(core::ptr::null_mut(), 0, &raw mut w, 4, sum);
            if r < 0 {
                return Err(());
            }
            sum = r as u32;
        }
    }
    let fold = |v: u32| {
        let v = (v & 0xffff) + (v >> 16);
        ((v & 0xffff) + (v >> 16)) as u16
    };
    let s16 = fold(sum);
    // Adding 0 or 0xffff (both zero) changes nothing that matters, and would leave the two
    // states below indistinguishable.
    if s16 == 0 || s16 == 0xffff {
        return Ok(());
    }
    let at = l4 + field;
    let read = |ctx: &TcContext| ptr_at::<u16>(ctx, at).map(|p| unsafe { load(p) });
    let before = read(ctx).ok_or(())?;
    let flags = u64::from(aya_ebpf::bindings::BPF_F_PSEUDO_HDR) | mangle | 4;
    ctx.l4_csum_replace(at, 0, u64::from(sum), flags).map_err(|_| ())?;
    let after = read(ctx).ok_or(())?;
    let seeded = fold(u32::from(before) + u32::from(s16));
    let seeded = if seeded == 0 && mangle != 0 { 0xffff } else { seeded };
    if after != seeded && !(mangle != 0 && before == 0) {
        // A computed checksum, changed as if the bytes had changed: put it back.
        ctx.l4_csum_replace(at, u64::from(sum), 0, flags).map_err(|_| ())?;
    }
    Ok(())
}

/// Rewrites the total length and the fragment field of the IPv4 header at `ETH_HLEN`, with
/// its checksum: what splitting a datagram into fragments changes.
#[inline(always)]
pub fn set_ip_len_frag(ctx: &TcContext, tot_len: u16, frag_off: u16) -> Result<(), ()> {
    let start = ctx.data();
    if start + ETH_HLEN + IP_MIN_HLEN > ctx.data_end() {
        return Err(());
    }
    let hdr = (start + ETH_HLEN) as *mut u8;
    // SAFETY: checked above; the words lie in the fixed header.
    unsafe {
        let w0 = hdr.cast::<u32>();
        let w1 = hdr.add(4).cast::<u32>();
        let csum = hdr.add(10).cast::<u16>();
        let (old0, old1) = (load(w0), load(w1));
        let mut b0 = old0.to_ne_bytes();
        let mut b1 = old1.to_ne_bytes();
        let l = tot_len.to_be_bytes();
        let f = frag_off.to_be_bytes();
        (b0[2], b0[3], b1[2], b1[3]) = (l[0], l[1], f[0], f[1]);
        let (new0, new1) = (u32::from_ne_bytes(b0), u32::from_ne_bytes(b1));
        store(w0, new0);
        store(w1, new1);
        let c = csum_replace4(load(csum), old0, new0);
        store(csum, csum_replace4(c, old1, new1));
    }
    Ok(())
}

/// The IPv4 header checksum of five words as they lie in memory.
#[inline(always)]
fn ipv4_csum(w: &[u32; 5]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 5 {
        sum += (w[i] >> 16) + (w[i] & 0xffff);
        i += 1;
    }
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Five words of an IPv4 header without options, checksum filled in.
#[inline(always)]
fn ipv4_words(tos: u8, tot_len: u16, frag_off: u16, proto: u8, src_be: u32, dst_be: u32) -> [u32; 5] {
    let l = tot_len.to_be_bytes();
    let f = frag_off.to_be_bytes();
    let mut w = [
        u32::from_ne_bytes([0x45, tos, l[0], l[1]]),
        u32::from_ne_bytes([0, 0, f[0], f[1]]),
        u32::from_ne_bytes([tunnel::TTL, proto, 0, 0]),
        src_be,
        dst_be,
    ];
    let c = ipv4_csum(&w).to_ne_bytes();
    w[2] = u32::from_ne_bytes([tunnel::TTL, proto, c[0], c[1]]);
    w
}

/// Writes the tunnel's outer headers (IPv4, UDP, meshnet's) into the room just made after
/// the Ethernet header. `inner_len`: the inner packet's IPv4 total length. The outer UDP
/// checksum is 0, which IPv4 allows (RFC 768) and VXLAN does too: the inner packet keeps its
/// own checksums, and the outer IPv4 header has its checksum.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one header's fields")]
pub fn write_outer(ctx: &TcContext, tos: u8, inner_len: u16, src_be: u32, dst_be: u32, sport: u16, dport_be: u16, cluster_id: u32) -> Result<(), ()> {
    const LEN: usize = tunnel::OVERHEAD as usize;
    let start = ctx.data();
    if start + ETH_HLEN + LEN > ctx.data_end() {
        return Err(());
    }
    let ip_len = inner_len.wrapping_add(LEN as u16);
    let udp_len = (inner_len.wrapping_add((tunnel::UDP_LEN + tunnel::HEADER_LEN) as u16)).to_be_bytes();
    let ip = ipv4_words(tos, ip_len, IP_DF, IPPROTO_UDP, src_be, dst_be);
    let sp = sport.to_be_bytes();
    let dp = dport_be.to_ne_bytes();
    let m = tunnel::MAGIC.to_be_bytes();
    let words: [u32; 9] = [
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        ip[4],
        u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]),
        u32::from_ne_bytes([udp_len[0], udp_len[1], 0, 0]),
        u32::from_ne_bytes([m[0], m[1], tunnel::VERSION, 0]),
        cluster_id.to_be(),
    ];
    let p = (start + ETH_HLEN) as *mut u32;
    // SAFETY: checked above: LEN (36) bytes after the Ethernet header, nine words.
    unsafe {
        let mut i = 0;
        while i < 9 {
            store(p.add(i), words[i]);
            i += 1;
        }
        // The Ethernet type stays IPv4, the outer header's.
    }
    Ok(())
}

/// A packet that arrived on the tunnel port, as far as the fixed-size headers tell.
#[derive(Clone, Copy)]
pub struct TunnelPacket {
    /// The outer IPv4 total length.
    pub outer_len: u16,
    pub magic_be: u16,
    pub version: u8,
    pub cluster_be: u32,
    pub inner_ver_ihl: u8,
    pub inner_proto: u8,
    pub inner_len: u16,
    pub inner_saddr_be: u32,
    pub inner_daddr_be: u32,
    /// Whether the inner packet may be a TCP SYN, whose MSS the decapsulation clamps: false
    /// only where its TCP flags were read here and hold no SYN, or it is not TCP. The
    /// packet is then not parsed again once the outer headers are off.
    pub maybe_syn: bool,
}

/// Where a tunnel packet's inner TCP flags are when its inner header has no options.
const INNER_TCP_FLAGS: usize = ETH_HLEN + tunnel::OVERHEAD as usize + IP_MIN_HLEN + 13;

/// Reads the headers of a tunnel packet: `ip` is the outer header (without options, checked
/// by the caller), then UDP, meshnet's header and the inner IPv4 header's fixed part.
#[inline(always)]
pub fn tunnel_packet(ctx: &TcContext, ip: &Ipv4) -> Result<TunnelPacket, Counter> {
    const NEED: usize = ETH_HLEN + tunnel::OVERHEAD as usize + IP_MIN_HLEN;
    if ip.end < NEED {
        return Err(Counter::TunnelBadHeader);
    }
    ensure_fixed::<NEED>(ctx).map_err(|_| Counter::TunnelBadHeader)?;
    let start = ctx.data();
    if start + NEED > ctx.data_end() {
        return Err(Counter::TunnelBadHeader);
    }
    let p = start as *const u8;
    // SAFETY: NEED bytes from the start are inside the packet.
    unsafe {
        // The stack checks the outer header's checksum only after tc ingress: a redirect would
        // deliver what `ip_rcv` drops. Summed with its checksum, a right header comes to 0.
        let w = p.add(ETH_HLEN).cast::<u32>();
        if ipv4_csum(&[load(w), load(w.add(1)), load(w.add(2)), load(w.add(3)), load(w.add(4))]) != 0 {
            return Err(Counter::TunnelBadHeader);
        }
        let hdr = p.add(ETH_HLEN + (tunnel::OUTER_IP_LEN + tunnel::UDP_LEN) as usize);
        let inner = p.add(ETH_HLEN + tunnel::OVERHEAD as usize);
        let inner_proto = *inner.add(9);
        // Read in place only where the inner header is the plain 20 bytes and the flags are in
        // the linear data; anything else is taken for a possible SYN, and parsed in full.
        let maybe_syn = inner_proto == IPPROTO_TCP
            && (*inner != 0x45 || start + INNER_TCP_FLAGS + 1 > ctx.data_end() || *p.add(INNER_TCP_FLAGS) & TCP_SYN != 0);
        Ok(TunnelPacket {
            outer_len: (ip.end - ETH_HLEN) as u16,
            magic_be: load(hdr.cast::<u16>()),
            version: *hdr.add(2),
            cluster_be: load(hdr.add(4).cast::<u32>()),
            inner_ver_ihl: *inner,
            inner_proto,
            inner_len: u16::from_be(load(inner.add(2).cast::<u16>())),
            inner_saddr_be: load(inner.add(12).cast::<u32>()),
            inner_daddr_be: load(inner.add(16).cast::<u32>()),
            maybe_syn,
        })
    }
}

/// The TCP MSS option kind and its length.
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;
/// Options examined at most: a SYN carries a handful, and MSS comes first in practice.
const TCP_MAX_OPTIONS: usize = 8;

/// Lowers the MSS option of a TCP SYN or SYN-ACK to `max` if it is larger. Read and written
/// through the skb helpers, at offsets the verifier need not prove: this runs once per
/// connection. The checksum is fixed with `bpf_l4_csum_replace`, which leaves a
/// CHECKSUM_PARTIAL packet's field alone, as it must.
#[inline(always)]
pub fn clamp_mss(ctx: &TcContext, ip: &Ipv4, l4: &Ports, max: u16) -> bool {
    let l4_off = ip.l4();
    let Ok(doff) = ctx.load::<u8>(l4_off + 12) else {
        return false;
    };
    let end = (l4_off + ((doff >> 4) as usize) * 4).min(ip.end);
    let mut off = l4_off + TCP_MIN_HLEN;
    for _ in 0..TCP_MAX_OPTIONS {
        if off + 4 > end {
            return false;
        }
        let Ok(kind) = ctx.load::<u8>(off) else { return false };
        match kind {
            0 => return false,
            1 => {
                off += 1;
                continue;
            }
            _ => {}
        }
        let Ok(len) = ctx.load::<u8>(off + 1) else { return false };
        if kind == TCPOPT_MSS && len == TCPOLEN_MSS {
            let Ok(mss_be) = ctx.load::<u16>(off + 2) else { return false };
            if u16::from_be(mss_be) <= max {
                return false;
            }
            let new_be = max.to_be();
            if ctx.store(off + 2, &new_be, 0).is_err() {
                return false;
            }
            return ctx.l4_csum_replace(l4.csum_off, u64::from(mss_be), u64::from(new_be), 2).is_ok();
        }
        if len < 2 {
            return false;
        }
        off += len as usize;
    }
    false
}

/// ICMP "destination unreachable", code "fragmentation needed".
const ICMP_FRAG_NEEDED: u8 = 4;
/// What an ICMP error quotes of the packet it is about: its header (without options) and
/// the 20 bytes after it, the least RFC 792 asks (8) and a TCP header whole. A packet whose
/// L4 checksum the device is to fill (`CHECKSUM_PARTIAL`) cannot be cut short of that
/// field (`bpf_skb_change_tail` refuses), and TCP's lies 16 bytes in.
const ICMP_QUOTE: usize = IP_MIN_HLEN + 20;
/// The ICMP error's own IPv4 and ICMP headers.
pub const ICMP_ERROR_ROOM: i32 = (IP_MIN_HLEN + ICMP_HLEN) as i32;
/// Where the packet ends once only its quoted part is left.
pub const ICMP_QUOTE_END: u32 = (ETH_HLEN + ICMP_QUOTE) as u32;

/// Turns a packet already cut to [`ICMP_QUOTE_END`] bytes, with [`ICMP_ERROR_ROOM`] bytes
/// made after its Ethernet header, into an ICMP "fragmentation needed" (RFC 1191) back to
/// its sender: from `src_be`, announcing `mtu`. The Ethernet addresses are swapped so that
/// the frame goes back where it came from.
#[inline(always)]
pub fn write_frag_needed(ctx: &TcContext, sender_be: u32, src_be: u32, mtu: u16) -> Result<(), ()> {
    const LEN: usize = ETH_HLEN + ICMP_ERROR_ROOM as usize + ICMP_QUOTE;
    let start = ctx.data();
    if start + LEN > ctx.data_end() {
        return Err(());
    }
    let ip = ipv4_words(0xc0, (ICMP_ERROR_ROOM as usize + ICMP_QUOTE) as u16, 0, IPPROTO_ICMP, src_be, sender_be);
    let m = mtu.to_be_bytes();
    let icmp_w1 = u32::from_ne_bytes([0, 0, m[0], m[1]]);
    // SAFETY: checked above: the whole frame is inside the packet.
    unsafe {
        let eth = start as *mut [u8; 6];
        let (dst, src) = (load(eth), load(eth.add(1)));
        store(eth, src);
        store(eth.add(1), dst);
        let p = (start + ETH_HLEN) as *mut u32;
        let mut i = 0;
        while i < 5 {
            store(p.add(i), ip[i]);
            i += 1;
        }
        let icmp = p.add(5);
        store(icmp, u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]));
        store(icmp.add(1), icmp_w1);
        // The ICMP checksum covers its header and the quote: 9 words.
        let mut sum: u32 = 0;
        let mut j = 0;
        while j < (ICMP_HLEN + ICMP_QUOTE) / 4 {
            let w = load(icmp.add(j));
            sum += (w >> 16) + (w & 0xffff);
            j += 1;
        }
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        let c = (!(sum as u16)).to_ne_bytes();
        store(icmp, u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, c[0], c[1]]));
    }
    Ok(())
}

/// Writes the Ethernet addresses (a next hop's, from a FIB lookup).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> Result<(), ()> {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return Err(());
    }
    let eth = start as *mut [u8; 6];
    // SAFETY: checked above.
    unsafe {
        store(eth, dst);
        store(eth.add(1), src);
    }
    Ok(())
}
