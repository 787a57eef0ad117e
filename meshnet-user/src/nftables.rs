//! The IPv4 rules of nftables (iptables-nft writes its nat rules to table `ip nat`; a
//! native ruleset may use any `ip` table), read over netlink, for `doctor` in the agent's
//! pod: the image has no iptables binaries. A rule dump needs CAP_NET_ADMIN, no CAP_NET_RAW.
//! Tables of the `inet` family are not read.
//!
//! Each rule is rendered in `iptables-save`'s words for what `doctor` judges: source and
//! destination (with `!`), the output interface, the mark, the target or verdict. The
//! expressions iptables-nft emits are understood (payload + bitwise + cmp, meta, compat
//! `match`/`target`, immediate verdicts), and so are native `masquerade` and `snat`.
//! Anything else appears as `-m nft-EXPR`, which no `doctor` judgement reads.

use std::{
    fmt::Write as _,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use crate::netlink;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// An expression's attributes by type (what this reader needs: all of them are small).
type Attrs<'a> = Vec<(u16, &'a [u8])>;

/// The rules of every `ip` table as `-A CHAIN ...` lines; empty when there is none.
pub fn ipv4_rules() -> io::Result<String> {
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + nfgenmsg (4): a dump of every IPv4 rule; the table is picked below.
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE).to_ne_bytes());
    let flags = u16::try_from(libc::NLM_F_REQUEST | libc::NLM_F_DUMP).unwrap_or_default();
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[u8::try_from(libc::AF_INET).unwrap_or(2), 0, 0, 0]);
    // SAFETY: send(2) of a buffer of the length passed.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = String::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: recv(2) into a buffer of the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for msg in netlink::messages(&buf[..n]) {
            let msg = msg?;
            match netlink::message_type(msg) {
                Some(netlink::NLMSG_DONE) => return Ok(out),
                Some(netlink::NLMSG_ERROR) => {
                    netlink::error_of(msg)?;
                    return Ok(out);
                }
                Some(kind) if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                    // After nlmsghdr and nfgenmsg.
                    if let Some(line) = msg.get(netlink::NLMSG_HDRLEN + 4..).and_then(rule) {
                        let _ = writeln!(out, "{line}");
                    }
                }
                _ => {}
            }
        }
    }
}

/// The attributes in `b`, in order.
fn attrs(b: &[u8]) -> Attrs<'_> {
    netlink::attrs(b).collect()
}

fn get<'a>(a: &Attrs<'a>, kind: u16) -> Option<&'a [u8]> {
    a.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.iter().position(|c| *c == 0).unwrap_or(b.len())]).into_owned()
}

fn be32(b: Option<&[u8]>) -> Option<u32> {
    Some(u32::from_be_bytes(b?.get(..4)?.try_into().ok()?))
}

/// The value of a nested `NFTA_DATA_VALUE`.
fn data_value(b: Option<&[u8]>) -> Vec<u8> {
    b.map(attrs).and_then(|a| get(&a, NFTA_DATA_VALUE).map(<[u8]>::to_vec)).unwrap_or_default()
}

/// What a register holds, as far as the rendering cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loaded {
    Saddr(usize),
    Daddr(usize),
    OifName,
    Mark,
    Other,
}

/// One NFT_MSG_NEWRULE's payload (after nfgenmsg) as an `-A` line.
fn rule(msg: &[u8]) -> Option<String> {
    let rule_attrs = attrs(msg);
    get(&rule_attrs, NFTA_RULE_TABLE)?;
    let chain = string(get(&rule_attrs, NFTA_RULE_CHAIN)?);
    // In iptables-save's order, whatever order the expressions come in.
    let (mut src, mut dst, mut oif, mut matches) = (None, None, None, String::new());
    let mut loaded = Loaded::Other;
    let mut mask: Option<Vec<u8>> = None;
    let mut jump = None;
    for (kind, elem) in attrs(get(&rule_attrs, NFTA_RULE_EXPRESSIONS).unwrap_or_default()) {
        if kind != NFTA_LIST_ELEM {
            continue;
        }
        let expr = attrs(elem);
        let name = string(get(&expr, NFTA_EXPR_NAME).unwrap_or_default());
        let d = attrs(get(&expr, NFTA_EXPR_DATA).unwrap_or_default());
        match name.as_str() {
            "payload" => {
                // base (2) 1 = network header; offset (3); len (4).
                let (base, offset, len) = (be32(get(&d, 2)), be32(get(&d, 3)), be32(get(&d, 4)).unwrap_or(0) as usize);
                loaded = match (base, offset) {
                    (Some(1), Some(12)) => Loaded::Saddr(len),
                    (Some(1), Some(16)) => Loaded::Daddr(len),
                    _ => Loaded::Other,
                };
                mask = None;
            }
            "meta" => {
                // key (2): 3 = mark, 7 = oifname.
                loaded = match be32(get(&d, 2)) {
                    Some(3) => Loaded::Mark,
                    Some(7) => Loaded::OifName,
                    _ => Loaded::Other,
                };
                mask = None;
            }
            // mask (4).
            "bitwise" => mask = Some(data_value(get(&d, 4))),
            "cmp" => {
                // op (2): 0 = eq, 1 = neq; data (3).
                let bang = if be32(get(&d, 2)) == Some(1) { "! " } else { "" };
                let value = data_value(get(&d, 3));
                match loaded {
                    Loaded::Saddr(len) | Loaded::Daddr(len) => {
                        let mut addr = [0u8; 4];
                        for (i, v) in value.iter().take(4).enumerate() {
                            addr[i] = *v;
                        }
                        let prefix = mask.as_ref().map_or(u32::try_from(len.min(4) * 8).unwrap_or(32), |m| {
                            m.iter().take(4).fold(0, |n, byte| n + byte.count_ones())
                        });
                        let text = format!(" {bang}{} {}/{prefix}", if matches!(loaded, Loaded::Saddr(_)) { "-s" } else { "-d" }, Ipv4Addr::from(addr));
                        if matches!(loaded, Loaded::Saddr(_)) {
                            src = Some(text);
                        } else {
                            dst = Some(text);
                        }
                    }
                    Loaded::OifName => oif = Some(format!(" {bang}-o {}", string(&value))),
                    Loaded::Mark => {
                        let v = value.get(..4).map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or_default()));
                        let m = mask.as_ref().and_then(|m| m.get(..4)).map_or(u32::MAX, |b| u32::from_ne_bytes(b.try_into().unwrap_or_default()));
                        let _ = write!(matches, " -m mark {bang}--mark {v:#x}/{m:#x}");
                    }
                    Loaded::Other => {}
                }
                loaded = Loaded::Other;
            }
            // Compat xt matches: name (1), info (3).
            "match" => {
                let m = string(get(&d, 1).unwrap_or_default());
                let info = get(&d, 3).unwrap_or_default();
                if m == "mark" && info.len() >= 9 {
                    let v = u32::from_ne_bytes(info[0..4].try_into().unwrap_or_default());
                    let k = u32::from_ne_bytes(info[4..8].try_into().unwrap_or_default());
                    let bang = if info[8] != 0 { "! " } else { "" };
                    let _ = write!(matches, " -m mark {bang}--mark {v:#x}/{k:#x}");
                } else {
                    let _ = write!(matches, " -m {m}");
                }
            }
            "target" => jump = Some(string(get(&d, 1).unwrap_or_default())),
            "masq" => jump = Some("MASQUERADE".into()),
            // type (1): 0 = snat, 1 = dnat.
            "nat" => jump = Some(if be32(get(&d, 1)) == Some(0) { "SNAT" } else { "DNAT" }.into()),
            "immediate" => {
                let v = get(&d, 2).map(attrs).and_then(|x| get(&x, NFTA_DATA_VERDICT).map(attrs)).unwrap_or_default();
                let code = be32(get(&v, NFTA_VERDICT_CODE)).map(u32::cast_signed);
                jump = match code {
                    Some(1) => Some("ACCEPT".into()),
                    Some(0) => Some("DROP".into()),
                    Some(-5) => Some("RETURN".into()),
                    // NFT_JUMP, NFT_GOTO.
                    Some(-3 | -4) => get(&v, NFTA_VERDICT_CHAIN).map(string),
                    _ => jump,
                };
            }
            "counter" => {}
            other => {
                let _ = write!(matches, " -m nft-{other}");
            }
        }
    }
    let mut line = format!("-A {chain}{}{}{}{matches}", src.unwrap_or_default(), dst.unwrap_or_default(), oif.unwrap_or_default());
    if let Some(j) = jump {
        let _ = write!(line, " -j {j}");
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + payload.len()).unwrap().to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
        let name = [name.as_bytes(), &[0]].concat();
        attr(NFTA_LIST_ELEM, &[attr(NFTA_EXPR_NAME, &name), attr(NFTA_EXPR_DATA, &data.concat())].concat())
    }

    /// `-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE` as iptables-nft encodes it.
    fn sample() -> Vec<u8> {
        let be = |v: u32| v.to_be_bytes().to_vec();
        let exprs = [
            expr("payload", &[attr(1, &be(1)), attr(2, &be(1)), attr(3, &be(12)), attr(4, &be(2))]),
            expr("cmp", &[attr(1, &be(1)), attr(2, &be(0)), attr(3, &attr(NFTA_DATA_VALUE, &[10, 244]))]),
            expr("counter", &[]),
            expr("target", &[attr(1, b"MASQUERADE\0"), attr(2, &be(0))]),
        ]
        .concat();
        [attr(NFTA_RULE_TABLE, b"nat\0"), attr(NFTA_RULE_CHAIN, b"POSTROUTING\0"), attr(NFTA_RULE_EXPRESSIONS, &exprs)].concat()
    }

    #[test]
    fn a_rule_reads_in_iptables_save_words() {
        assert_eq!(rule(&sample()).as_deref(), Some("-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE"));
    }

    /// A damaged message costs a wrong line at worst, never a panic.
    #[test]
    fn damaged_messages_never_panic() {
        let base = sample();
        let mut x = 0x9e37_79b9_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as usize
        };
        for _ in 0..20_000 {
            let mut msg = base.clone();
            for _ in 0..=(next() % 4) {
                let at = next() % msg.len();
                msg[at] = u8::try_from(next() % 256).unwrap();
            }
            msg.truncate(next() % (msg.len() + 1));
            let _ = rule(&msg);
        }
    }
}
