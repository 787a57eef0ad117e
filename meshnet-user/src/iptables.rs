//! The legacy (x_tables) nat and filter tables, read from the kernel the way `iptables-legacy-save` reads
//! it, for `doctor` in the agent's pod: the image has no iptables binaries. The kernel hands
//! the table out through `getsockopt(IPT_SO_GET_INFO / IPT_SO_GET_ENTRIES)` on any IPv4
//! socket to a caller with CAP_NET_ADMIN; a UDP socket needs no CAP_NET_RAW.
//!
//! Only what `doctor` judges is rendered, in `iptables-save`'s words: the chain, source and
//! destination (with `!`), the interfaces, the mark match, the conntrack and state matches'
//! states and the target. Other matches appear as `-m NAME` alone.

use std::{
    fmt::Write as _,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const IPT_SO_GET_INFO: libc::c_int = 64;
const IPT_SO_GET_ENTRIES: libc::c_int = 65;
/// `NF_INET_NUMHOOKS`, and the built-in chains in hook order.
const HOOKS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
/// `struct ipt_getinfo`: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const INFO_LEN: usize = 32 + 4 + 20 + 20 + 4 + 4;
/// `struct ipt_get_entries`: name[32], size, then the entries at the next 8-byte boundary.
const ENTRIES_HEAD: usize = 40;
/// `struct ipt_entry` up to its matches: ipt_ip (84), nfcache, target_offset, next_offset,
/// comefrom, counters (2 × u64).
const ENTRY_LEN: usize = 112;
/// `struct xt_entry_match` / `xt_entry_target` headers: size (u16), name[29], revision.
const XT_HEAD: usize = 32;
const IPT_INV_VIA_IN: u8 = 0x01;
const IPT_INV_VIA_OUT: u8 = 0x02;
/// Conntrack states as `xt_conntrack` and `xt_state` store them (`XT_CONNTRACK_STATE_BIT`),
/// in the order `iptables-save` prints them.
const CT_STATES: [(u32, &str); 5] = [(1, "INVALID"), (1 << 3, "NEW"), (1 << 2, "RELATED"), (1 << 1, "ESTABLISHED"), (1 << 4, "UNTRACKED")];
/// `XT_CONNTRACK_STATE`, in the conntrack match's `match_flags` and `invert_flags`.
const XT_CONNTRACK_STATE: u16 = 1;
/// `XT_CONNTRACK_STATE_ALIAS`: the match was written as `-m state`.
const XT_CONNTRACK_STATE_ALIAS: u16 = 1 << 13;
const IPT_INV_SRCIP: u8 = 0x08;
const IPT_INV_DSTIP: u8 = 0x10;
/// Standard verdicts as the kernel stores them (`-verdict - 1`).
const VERDICT_ACCEPT: i32 = -2;
const VERDICT_DROP: i32 = -1;
const VERDICT_RETURN: i32 = -5;

/// The nat table's rules as `-A CHAIN ...` lines. `Ok(None)`: this kernel has no legacy nat
/// table (ip_tables is not loaded: the host uses nftables, or no iptables at all).
pub fn legacy_nat_rules() -> io::Result<Option<String>> {
    legacy_rules("nat")
}

/// The filter table's, likewise.
pub fn legacy_filter_rules() -> io::Result<Option<String>> {
    legacy_rules("filter")
}

fn legacy_rules(table: &str) -> io::Result<Option<String>> {
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = [0u8; INFO_LEN];
    info[..table.len()].copy_from_slice(table.as_bytes());
    match getsockopt(&sock, IPT_SO_GET_INFO, &mut info) {
        // No such table, or no ip_tables: nothing legacy here.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)) => return Ok(None),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap_or_default());
    let hook_entry: Vec<u32> = (0..5).map(|h| u32_at(&info, 36 + 4 * h)).collect();
    let underflow: Vec<u32> = (0..5).map(|h| u32_at(&info, 56 + 4 * h)).collect();
    let valid_hooks = u32_at(&info, 32);
    let size = u32_at(&info, 80) as usize;
    let mut buf = vec![0u8; ENTRIES_HEAD + size];
    buf[..table.len()].copy_from_slice(table.as_bytes());
    buf[32..36].copy_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_ne_bytes());
    getsockopt(&sock, IPT_SO_GET_ENTRIES, &mut buf)?;
    let hooks: Vec<(usize, u32, u32)> =
        (0..5).filter(|h| valid_hooks & (1 << h) != 0).map(|h| (h, hook_entry[h], underflow[h])).collect();
    Ok(Some(render(&buf[ENTRIES_HEAD..], &hooks)))
}

fn getsockopt(sock: &OwnedFd, opt: libc::c_int, buf: &mut [u8]) -> io::Result<()> {
    let mut len = libc::socklen_t::try_from(buf.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: getsockopt(2) into a buffer of the length passed.
    let r = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::IPPROTO_IP, opt, buf.as_mut_ptr().cast(), &raw mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A NUL-terminated name of at most `max` bytes at `at`.
fn name_at(b: &[u8], at: usize, max: usize) -> String {
    let s = b.get(at..(at + max).min(b.len())).unwrap_or_default();
    String::from_utf8_lossy(&s[..s.iter().position(|c| *c == 0).unwrap_or(s.len())]).into_owned()
}

fn cidr(addr: [u8; 4], mask: [u8; 4]) -> String {
    let len = u32::from_be_bytes(mask).leading_ones();
    if len == 32 {
        format!("{}/32", Ipv4Addr::from(addr))
    } else {
        format!("{}/{len}", Ipv4Addr::from(addr))
    }
}

/// Renders the entries `blob` of a table whose built-in chains (hook number, first entry,
/// policy entry) are `hooks`.
#[must_use]
pub fn render(blob: &[u8], hooks: &[(usize, u32, u32)]) -> String {
    // Where each user chain starts: right after its ERROR entry, which carries its name.
    let mut starts = std::collections::BTreeMap::new();
    let mut off = 0usize;
    while off + ENTRY_LEN <= blob.len() {
        let e = &blob[off..];
        let target_offset = usize::from(u16::from_ne_bytes([e[88], e[89]]));
        let next = usize::from(u16::from_ne_bytes([e[90], e[91]]));
        if next < ENTRY_LEN || target_offset + XT_HEAD > next {
            break;
        }
        if name_at(e, target_offset + 2, 29) == "ERROR" {
            starts.insert(off + next, name_at(e, target_offset + XT_HEAD, 30));
        }
        off += next;
    }
    let mut out = String::new();
    let mut chain = String::new();
    let mut off = 0usize;
    while off + ENTRY_LEN <= blob.len() {
        let e = &blob[off..];
        let target_offset = usize::from(u16::from_ne_bytes([e[88], e[89]]));
        let next = usize::from(u16::from_ne_bytes([e[90], e[91]]));
        if next < ENTRY_LEN || target_offset + XT_HEAD > next || off + next > blob.len() {
            break;
        }
        if let Some((h, _, _)) = hooks.iter().find(|(_, first, _)| *first as usize == off) {
            chain = HOOKS[*h].to_string();
        } else if let Some(name) = starts.get(&off) {
            chain.clone_from(name);
        }
        let is_policy = hooks.iter().any(|(_, _, policy)| *policy as usize == off);
        let target = name_at(e, target_offset + 2, 29);
        let verdict = e.get(target_offset + XT_HEAD..target_offset + XT_HEAD + 4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
        let bare = target_offset == ENTRY_LEN && e[..84].iter().all(|b| *b == 0);
        // Policies, chain heads (ERROR) and the RETURN that ends each user chain are not rules.
        let skip = is_policy || target == "ERROR" || (target.is_empty() && verdict == VERDICT_RETURN && bare);
        if !skip {
            let _ = writeln!(out, "{}", rule(e, &chain, target_offset, &target, verdict, &starts));
        }
        off += next;
    }
    out
}

fn rule(e: &[u8], chain: &str, target_offset: usize, target: &str, verdict: i32, starts: &std::collections::BTreeMap<usize, String>) -> String {
    let quad = |at: usize| -> [u8; 4] { e[at..at + 4].try_into().unwrap_or_default() };
    let (src, dst, smsk, dmsk) = (quad(0), quad(4), quad(8), quad(12));
    let invflags = e[83];
    let bang = |flag: u8| if invflags & flag != 0 { "! " } else { "" };
    let mut r = format!("-A {chain}");
    if smsk != [0; 4] {
        let _ = write!(r, " {}-s {}", bang(IPT_INV_SRCIP), cidr(src, smsk));
    }
    if dmsk != [0; 4] {
        let _ = write!(r, " {}-d {}", bang(IPT_INV_DSTIP), cidr(dst, dmsk));
    }
    for (opt, at, inv) in [("-i", 16, IPT_INV_VIA_IN), ("-o", 32, IPT_INV_VIA_OUT)] {
        let _ = write!(r, "{}", iface(e, at, opt, bang(inv)));
    }
    let mut m = ENTRY_LEN;
    while m + XT_HEAD <= target_offset {
        let size = usize::from(u16::from_ne_bytes([e[m], e[m + 1]]));
        if size < XT_HEAD {
            break;
        }
        let name = name_at(e, m + 2, 29);
        let data = &e[m + XT_HEAD..(m + size).min(target_offset)];
        let revision = e.get(m + 31).copied().unwrap_or(0);
        if name == "conntrack" && (1..=3).contains(&revision) && data.len() >= 152 {
            // xt_conntrack_mtinfo1..3: eight addresses (128 bytes), expiry (8), l4proto and
            // four ports (10), then match_flags, invert_flags and state_mask: u8 in
            // revision 1, u16 from 2.
            let field = |i: usize| if revision == 1 { u16::from(data[146 + i]) } else { u16::from_ne_bytes([data[146 + 2 * i], data[147 + 2 * i]]) };
            let (flags, invert, states) = (field(0), field(1), field(2));
            if flags & XT_CONNTRACK_STATE_ALIAS != 0 {
                // `-m state`, which iptables now writes as a conntrack match.
                let not = if invert & XT_CONNTRACK_STATE != 0 { "! " } else { "" };
                let _ = write!(r, " -m state {not}--state {}", state_names(u32::from(states)));
            } else if flags & XT_CONNTRACK_STATE != 0 {
                let not = if invert & XT_CONNTRACK_STATE != 0 { "! " } else { "" };
                let _ = write!(r, " -m conntrack {not}--ctstate {}", state_names(u32::from(states)));
            } else {
                let _ = write!(r, " -m conntrack");
            }
        } else if name == "state" && data.len() >= 4 {
            // xt_state_info: statemask.
            let states = u32::from_ne_bytes(data[0..4].try_into().unwrap_or_default());
            let _ = write!(r, " -m state --state {}", state_names(states));
        } else if name == "mark" && data.len() >= 9 {
            // xt_mark_mtinfo1: mark, mask, invert.
            let value = u32::from_ne_bytes(data[0..4].try_into().unwrap_or_default());
            let mask = u32::from_ne_bytes(data[4..8].try_into().unwrap_or_default());
            let not = if data[8] != 0 { "! " } else { "" };
            let _ = write!(r, " -m mark {not}--mark {value:#x}/{mask:#x}");
        } else {
            let _ = write!(r, " -m {name}");
        }
        m += size;
    }
    let jump = if target.is_empty() {
        match verdict {
            VERDICT_ACCEPT => "ACCEPT".into(),
            VERDICT_DROP => "DROP".into(),
            VERDICT_RETURN => "RETURN".into(),
            v => usize::try_from(v).ok().and_then(|o| starts.get(&o).cloned()).unwrap_or_else(|| format!("#{v}")),
        }
    } else {
        target.to_string()
    };
    let _ = write!(r, " -j {jump}");
    r
}

/// An interface name at `at` (16 bytes, its mask 32 bytes later) as iptables-save prints it:
/// the characters the mask covers, and `+` when the mask stops inside the name (a wildcard).
fn iface(e: &[u8], at: usize, opt: &str, bang: &str) -> String {
    let (Some(name), Some(mask)) = (e.get(at..at + 16), e.get(at + 32..at + 48)) else { return String::new() };
    if mask[0] == 0 {
        return String::new();
    }
    let mut s = String::new();
    for i in 0..16 {
        if mask[i] == 0 {
            if name[i - 1] != 0 {
                s.push('+');
            }
            break;
        }
        if name[i] != 0 {
            s.push(char::from(name[i]));
        }
    }
    format!(" {bang}{opt} {s}")
}

/// `iptables-save`'s list of the conntrack states in `mask`.
fn state_names(mask: u32) -> String {
    CT_STATES.iter().filter(|(bit, _)| mask & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the bytes, rendering ends without a panic: a table read while it changes, or
    /// from a kernel with another layout, must cost a wrong line at worst, never the doctor.
    #[test]
    fn any_bytes_render_without_a_panic() {
        // Four well-formed entries (a standard target each), then random damage to them.
        let entry = |verdict: i32| {
            let mut e = vec![0u8; ENTRY_LEN + 40];
            e[88..90].copy_from_slice(&u16::try_from(ENTRY_LEN).unwrap().to_ne_bytes());
            e[90..92].copy_from_slice(&u16::try_from(ENTRY_LEN + 40).unwrap().to_ne_bytes());
            e[ENTRY_LEN..ENTRY_LEN + 2].copy_from_slice(&40u16.to_ne_bytes());
            e[ENTRY_LEN + XT_HEAD..ENTRY_LEN + XT_HEAD + 4].copy_from_slice(&verdict.to_ne_bytes());
            e
        };
        let base: Vec<u8> = [entry(VERDICT_ACCEPT), entry(304), entry(VERDICT_RETURN), entry(VERDICT_DROP)].concat();
        assert_eq!(render(&base, &[(4, 0, 456)]).lines().count(), 2, "{}", render(&base, &[(4, 0, 456)]));
        let mut x = 0x1234_5678_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as usize
        };
        for _ in 0..20_000 {
            let mut blob = base.clone();
            for _ in 0..=(next() % 4) {
                let at = next() % blob.len();
                blob[at] = u8::try_from(next() % 256).unwrap();
            }
            blob.truncate(next() % (blob.len() + 1));
            let _ = render(&blob, &[(4, 0, 456)]);
        }
    }
}
