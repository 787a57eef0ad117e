//! Making the skb's checksum state readable to the datapath (`meshnet_common::ip_summed`).
//!
//! Knowing `skb->ip_summed`, the programs fix an L4 checksum inline instead of through
//! `bpf_l4_csum_replace`, whose call costs more than the rest of the rewrite. The state is
//! read through `bpf_cast_to_kern_ctx` (6.2), at an offset that differs between kernel
//! builds: both come from the running kernel's BTF, and are written into the object's
//! placeholder instructions before it is loaded. Where the kernel lacks either, or refuses
//! the result, the placeholders become a constant that keeps the helper path, the one every
//! kernel before 6.2 takes.

use std::{path::Path, sync::OnceLock};

use anyhow::{bail, Context as _};
use meshnet_common::ip_summed;
use object::{Object as _, ObjectSection as _, SectionKind};

/// Set to 1 in the agent's environment, the datapath asks the checksum helper on every
/// kernel: how the tests hold the older kernels' path to account on the newer ones, and a
/// way out should the read misbehave somewhere.
pub const NO_KFUNC_ENV: &str = "MESHNET_NO_SKB_KFUNC";

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const KFUNC: &str = "bpf_cast_to_kern_ctx";

/// Where the running kernel keeps `ip_summed`, and how to reach its `sk_buff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// BTF id of `bpf_cast_to_kern_ctx` in vmlinux.
    pub kfunc: u32,
    /// The byte of `struct sk_buff` that holds `ip_summed`, and the field's lowest bit in it.
    pub byte: u16,
    pub shift: u8,
}

impl Layout {
    /// The running kernel's, unless [`NO_KFUNC_ENV`] says not to; `Err` says why not.
    pub fn current() -> anyhow::Result<Self> {
        // The running kernel's BTF stays as it is while a process lives, and reading its
        // megabytes again cost more than the rest of preparing an object: the packet tests
        // prepare one per test, hundreds under emulation in the kernel matrix.
        static RUNNING: OnceLock<Result<Layout, String>> = OnceLock::new();
        if std::env::var_os(NO_KFUNC_ENV).is_some_and(|v| v == "1") {
            bail!("{NO_KFUNC_ENV}=1");
        }
        RUNNING.get_or_init(|| Self::from_file(Path::new(VMLINUX_BTF)).map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Self::from_source(&file).with_context(|| format!("reading {}", path.display()))
    }

    /// From raw BTF (`/sys/kernel/btf/vmlinux`'s format).
    pub fn from_btf(data: &[u8]) -> anyhow::Result<Self> {
        Self::from_source(data)
    }

    fn from_source<S: Source + ?Sized>(src: &S) -> anyhow::Result<Self> {
        let btf = RawBtf::parse(src, [KFUNC, "sk_buff", "ip_summed"])?;
        let kfunc = btf.found[0].with_context(|| format!("the kernel has no {KFUNC} (6.2 added it)"))?;
        let skb = btf.found[1].context("the kernel's BTF has no struct sk_buff")?;
        let (bit, size) = btf.find_member(skb, 2, 0, 0, &mut 1_000)?.context("struct sk_buff has no ip_summed")?;
        if size == 0 {
            // BTF without kind_flag would encode a bitfield in its int type, which pahole has
            // not written for the kernels meshnet runs on.
            bail!("the member has no bitfield width");
        }
        if size != 2 {
            bail!("sk_buff's ip_summed is {size} bits wide, not 2");
        }
        let byte = u16::try_from(bit / 8).ok().filter(|b| *b <= 0x7fff).context("ip_summed lies beyond a load's offset")?;
        let shift = u8::try_from(bit % 8)?;
        if shift + 2 > 8 {
            bail!("sk_buff's ip_summed straddles a byte (bit {bit})");
        }
        Ok(Self { kfunc, byte, shift })
    }

    fn code(self) -> [u64; 4] {
        ip_summed::read(self.kfunc, self.byte, self.shift)
    }
}

const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;
/// Typedef, volatile, const, restrict, type tag: a name or qualifier for another type.
const KINDS_ALIAS: [u32; 5] = [8, 9, 10, 11, 18];

/// Where BTF comes from: the kernel's file, read at offsets and never whole (the agent's
/// memory: vmlinux's BTF is several MB, and a heap that once held it stays that large), or a
/// slice in the tests.
trait Source {
    fn read_at(&self, off: usize, buf: &mut [u8]) -> anyhow::Result<()>;
}

impl Source for [u8] {
    fn read_at(&self, off: usize, buf: &mut [u8]) -> anyhow::Result<()> {
        buf.copy_from_slice(self.get(off..off + buf.len()).context("BTF data ends inside a record")?);
        Ok(())
    }
}

impl Source for std::fs::File {
    fn read_at(&self, off: usize, buf: &mut [u8]) -> anyhow::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, u64::try_from(off)?).context("BTF data ends inside a record")
    }
}

/// Sequential reads of `[pos, end)` through a small window.
struct Stream<'a, S: ?Sized> {
    src: &'a S,
    pos: usize,
    end: usize,
    window: Vec<u8>,
    /// Offset of `window[0]` in the source.
    at: usize,
}

impl<'a, S: Source + ?Sized> Stream<'a, S> {
    const WINDOW: usize = 64 * 1024;

    fn new(src: &'a S, pos: usize, len: usize) -> Self {
        Self { src, pos, end: pos + len, window: Vec::new(), at: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.end
    }

    fn take<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
        if self.pos + N > self.end {
            bail!("BTF data ends inside a record");
        }
        if self.pos < self.at || self.pos + N > self.at + self.window.len() {
            self.window.resize((self.end - self.pos).min(Self::WINDOW), 0);
            self.src.read_at(self.pos, &mut self.window)?;
            self.at = self.pos;
        }
        let i = self.pos - self.at;
        self.pos += N;
        Ok(self.window[i..i + N].try_into()?)
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
}

/// Just enough of a BTF reader for [`Layout`]: where each type starts (one `u32` per type)
/// and the types named as asked. Not a full parser (btf-rs, tried) for the agent's memory:
/// a parsed copy of vmlinux's 100,000-odd types left the idle agent at 36 MB instead of 12.
struct RawBtf<'a, S: ?Sized> {
    src: &'a S,
    types_at: usize,
    strings: (usize, usize),
    /// Offset in the type section of type id `i + 1` (id 0 is void).
    starts: Vec<u32>,
    /// Per name asked for, its string offsets (BTF's strings are deduplicated, but nothing
    /// requires it).
    names: Vec<Vec<u32>>,
    /// The first function with the first name, the first struct (with members) with the second.
    found: [Option<u32>; 2],
}

impl<'a, S: Source + ?Sized> RawBtf<'a, S> {
    fn parse(src: &'a S, names: [&str; 3]) -> anyhow::Result<Self> {
        let mut header = [0; 24];
        src.read_at(0, &mut header).context("BTF data too short")?;
        if header[..2] != 0xeb9f_u16.to_le_bytes() {
            bail!("not little-endian BTF (magic {:02x?})", &header[..2]);
        }
        let field = |i: usize| usize::try_from(u32::from_le_bytes(header[4 + 4 * i..8 + 4 * i].try_into().unwrap_or_default()));
        let (hdr_len, type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let mut btf = Self {
            src,
            types_at: hdr_len + type_off,
            strings: (hdr_len + str_off, str_len),
            starts: Vec::new(),
            names: Vec::new(),
            found: [None; 2],
        };
        btf.names = btf.string_offsets(&names)?;
        let mut types = Stream::new(src, btf.types_at, type_len);
        while !types.done() {
            let id = u32::try_from(btf.starts.len() + 1)?;
            btf.starts.push(u32::try_from(types.pos - btf.types_at)?);
            let (name_off, info, _) = (types.u32()?, types.u32()?, types.u32()?);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            if kind == KIND_FUNC && btf.found[0].is_none() && btf.names[0].contains(&name_off) {
                btf.found[0] = Some(id);
            }
            if kind == KIND_STRUCT && vlen > 0 && btf.found[1].is_none() && btf.names[1].contains(&name_off) {
                btf.found[1] = Some(id);
            }
            types.pos += match kind {
                2 | 7..=12 | 16 | 18 => 0,
                KIND_INT | 14 | 17 => 4,
                3 => 12,
                KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                kind => bail!("BTF type kind {kind} unknown"),
            };
        }
        if types.pos != types.end {
            bail!("BTF data ends inside a record");
        }
        Ok(btf)
    }

    /// Where each of `names` occurs in the string section, read through once.
    fn string_offsets(&self, names: &[&str]) -> anyhow::Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); names.len()];
        let mut strings = Stream::new(self.src, self.strings.0, self.strings.1);
        let (mut start, mut current) = (0, Vec::new());
        while !strings.done() {
            let [b] = strings.take::<1>()?;
            if b != 0 {
                current.push(b);
                continue;
            }
            for (i, n) in names.iter().enumerate() {
                if current == n.as_bytes() {
                    out[i].push(u32::try_from(start)?);
                }
            }
            current.clear();
            start = strings.pos - self.strings.0;
        }
        Ok(out)
    }

    fn u32_at(&self, off: usize) -> anyhow::Result<u32> {
        let mut b = [0; 4];
        self.src.read_at(off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Info and size-or-type of type `id`, and where its extra data starts in the source.
    fn record(&self, id: u32) -> anyhow::Result<(u32, u32, usize)> {
        let start = id.checked_sub(1).and_then(|i| self.starts.get(i as usize)).with_context(|| format!("BTF type {id} does not exist"))?;
        let at = self.types_at + *start as usize;
        Ok((self.u32_at(at + 4)?, self.u32_at(at + 8)?, at + 12))
    }

    /// The bit offset and bit width of the member named `names[name]` of the struct or union
    /// `id`, looking into anonymous members (where recent kernels group `ip_summed` with
    /// other fields).
    /// `budget` bounds the anonymous members looked into, on malformed BTF.
    fn find_member(&self, id: u32, name: usize, base: u32, depth: u32, budget: &mut u32) -> anyhow::Result<Option<(u32, u32)>> {
        let (info, _, members) = self.record(id)?;
        let kind = (info >> 24) & 0x1f;
        if !(kind == KIND_STRUCT || kind == KIND_UNION) || depth > 8 {
            return Ok(None);
        }
        let kind_flag = info >> 31 == 1;
        for m in 0..(info & 0xffff) as usize {
            let at = members + 12 * m;
            let (name_off, mut ty, offset) = (self.u32_at(at)?, self.u32_at(at + 4)?, self.u32_at(at + 8)?);
            let (bit, width) = if kind_flag { (offset & 0xff_ffff, offset >> 24) } else { (offset, 0) };
            if self.names[name].contains(&name_off) {
                return Ok(Some((base.checked_add(bit).context("a member's offset overflows")?, width)));
            }
            if name_off == 0 {
                // Names and qualifiers down to the type itself.
                for _ in 0..16 {
                    let (tinfo, next, _) = self.record(ty)?;
                    if !KINDS_ALIAS.contains(&((tinfo >> 24) & 0x1f)) {
                        break;
                    }
                    ty = next;
                }
                *budget = budget.checked_sub(1).context("a struct's anonymous members go on too long")?;
                let base = base.checked_add(bit).context("a member's offset overflows")?;
                if let Some(found) = self.find_member(ty, name, base, depth + 1, budget)? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }
}

/// Whether the struct `name` of the kernel's BTF at `path` has a member `member` (inside
/// anonymous members too); `None` where there is no such struct.
pub fn struct_has_member(path: &Path, name: &str, member: &str) -> anyhow::Result<Option<bool>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    has_member(&file, name, member).with_context(|| format!("reading {}", path.display()))
}

fn has_member<S: Source + ?Sized>(src: &S, name: &str, member: &str) -> anyhow::Result<Option<bool>> {
    // The function name is not asked about: any will do.
    let btf = RawBtf::parse(src, [KFUNC, name, member])?;
    let Some(id) = btf.found[1] else { return Ok(None) };
    Ok(Some(btf.find_member(id, 2, 0, 0, &mut 1_000)?.is_some()))
}

/// `object` with every placeholder sequence rewritten: into the read where `layout` is given,
/// into the constant otherwise. How many there were comes back with it; none is not an error
/// (an object from before this scheme).
pub fn patch(object: &[u8], layout: Option<&Layout>) -> anyhow::Result<(Vec<u8>, usize)> {
    let code = layout.map_or_else(ip_summed::fallback, |l| l.code());
    let file = object::File::parse(object).context("the eBPF object is not an ELF file")?;
    let mut out = object.to_vec();
    let mut sites = 0;
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let Some((start, len)) = section.file_range() else {
            continue;
        };
        let (start, len) = (usize::try_from(start)?, usize::try_from(len)?);
        let end = start.checked_add(len).context("a code section lies outside the file")?;
        let text = out.get_mut(start..end).context("a code section lies outside the file")?;
        let placeholder: Vec<u8> = ip_summed::PLACEHOLDER
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let code: Vec<u8> = code.iter().flat_map(|i| i.to_le_bytes()).collect();
        // At instruction boundaries only: the same bytes inside a 16-byte load are not code.
        let mut i = 0;
        while i + placeholder.len() <= text.len() {
            if text[i..i + placeholder.len()] == placeholder[..] {
                text[i..i + code.len()].copy_from_slice(&code);
                sites += 1;
                i += placeholder.len();
            } else {
                i += 8;
            }
        }
    }
    Ok((out, sites))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{EBPF_LOG_OBJECT, EBPF_OBJECT};

    /// A BTF blob with what [`Layout::from_btf`] looks for: `ip_summed` a bitfield of
    /// `width` bits at bit `bit` of an anonymous struct, inside an anonymous union at byte
    /// 16 of `struct sk_buff` (as recent kernels group it), and a function named `func`.
    fn btf(width: u32, bit: u32, func: &str) -> Vec<u8> {
        let mut strings = b"\0".to_vec();
        let mut name = |s: &str| {
            let off = u32::try_from(strings.len()).unwrap();
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let (u8_name, ip_summed, skb, len, func) = (name("u8"), name("ip_summed"), name("sk_buff"), name("len"), name(func));
        let info = |kind_flag: u32, kind: u32, vlen: u32| kind_flag << 31 | kind << 24 | vlen;
        let types: Vec<u32> = [
            // 1: INT u8, 8 bits.
            vec![u8_name, info(0, 1, 0), 1, 8],
            // 2: struct { u8 :?; u8 ip_summed:width; } with kind_flag (bitfield sizes in offsets).
            vec![0, info(1, 4, 1), 8, ip_summed, 1, width << 24 | bit],
            // 3: union { struct ...; }
            vec![0, info(0, 5, 1), 8, 0, 2, 0],
            // 4: struct sk_buff { u8 len; union ...; } the union at byte 16.
            vec![skb, info(1, 4, 2), 256, len, 1, 0, 0, 3, 16 * 8],
            // 5: FUNC_PROTO void (void); 6: FUNC, global.
            vec![0, info(0, 13, 0), 0],
            vec![func, info(0, 12, 1), 5],
        ]
        .concat();
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24, 0, types.len(), types.len(), strings.len()] {
            out.extend_from_slice(&u32::try_from(w).unwrap().to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    fn layout(width: u32, bit: u32, func: &str) -> anyhow::Result<Layout> {
        Layout::from_btf(&btf(width, bit, func))
    }

    #[test]
    fn a_struct_member_is_found_or_not() {
        let blob = btf(2, 5, KFUNC);
        assert_eq!(has_member(&blob[..], "sk_buff", "ip_summed").unwrap(), Some(true));
        assert_eq!(has_member(&blob[..], "sk_buff", "no_such_member").unwrap(), Some(false));
        assert_eq!(has_member(&blob[..], "bpf_htab", "ip_summed").unwrap(), None);
        assert!(has_member(&blob[..8], "sk_buff", "ip_summed").is_err());
    }

    #[test]
    fn ip_summed_is_found_inside_anonymous_members() {
        assert_eq!(layout(2, 13, KFUNC).unwrap(), Layout { kfunc: 6, byte: 17, shift: 5 });
        assert_eq!(layout(2, 0, KFUNC).unwrap(), Layout { kfunc: 6, byte: 16, shift: 0 });
    }

    #[test]
    fn a_layout_the_read_cannot_take_is_refused() {
        let e = |r: anyhow::Result<Layout>| format!("{:#}", r.unwrap_err());
        assert!(e(layout(3, 8, KFUNC)).contains("3 bits wide"));
        assert!(e(layout(2, 7, KFUNC)).contains("straddles"));
        assert!(e(layout(2, 8, "bpf_something_else")).contains("no bpf_cast_to_kern_ctx"));
    }

    /// Every prefix of a valid blob, and bytes that are not BTF, are errors, not panics.
    #[test]
    fn truncated_or_foreign_data_is_an_error() {
        let good = btf(2, 13, KFUNC);
        for len in 0..good.len() {
            assert!(Layout::from_btf(&good[..len]).is_err(), "{len} bytes");
        }
        let mut unknown_kind = good.clone();
        // The first type's info: kind 31.
        unknown_kind[24 + 7] = 0x1f;
        assert!(format!("{:#}", Layout::from_btf(&unknown_kind).unwrap_err()).contains("kind 31"));
        assert!(Layout::from_btf(b"\x7fELF not btf at all, but long enough").is_err());
    }

    #[test]
    fn the_running_kernels_btf_is_read_in_place() {
        let Ok(data) = std::fs::read(VMLINUX_BTF) else { return };
        let btf = RawBtf::parse(&data[..], ["nothing by this name", "sk_buff", "ip_summed"]).unwrap();
        // vmlinux has tens of thousands of types; the index is one u32 each.
        assert!(btf.starts.len() > 10_000, "{} types", btf.starts.len());
        assert_eq!(btf.found[0], None);
        assert!(btf.found[1].is_some());
        // And through the file, at offsets: the same.
        let file = std::fs::File::open(VMLINUX_BTF).unwrap();
        let from_file = RawBtf::parse(&file, ["nothing by this name", "sk_buff", "ip_summed"]).unwrap();
        assert_eq!((from_file.starts, from_file.found), (btf.starts, btf.found));
    }

    fn count(haystack: &[u8], code: [u64; 4]) -> usize {
        let needle: Vec<u8> = code.iter().flat_map(|i| i.to_le_bytes()).collect();
        haystack.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn every_placeholder_is_rewritten_and_nothing_else() {
        let l = Layout { kfunc: 1234, byte: 130, shift: 6 };
        for object in [EBPF_OBJECT, EBPF_LOG_OBJECT] {
            let sites = count(object, ip_summed::PLACEHOLDER);
            // from_pod and to_pod fix L4 checksums.
            assert!(sites >= 2, "{sites} placeholders");
            let (read, n) = patch(object, Some(&l)).unwrap();
            assert_eq!(n, sites);
            assert_eq!((count(&read, ip_summed::PLACEHOLDER), count(&read, l.code())), (0, sites));
            let (helper, n) = patch(object, None).unwrap();
            assert_eq!(n, sites);
            assert_eq!((count(&helper, ip_summed::PLACEHOLDER), count(&helper, ip_summed::fallback())), (0, sites));
            // Each rewrite changes those instructions' bytes only.
            let changed = |a: &[u8]| a.iter().zip(object).filter(|(x, y)| x != y).count();
            assert!(changed(&read) <= sites * 32 && changed(&helper) <= sites * 32);
            assert_eq!((read.len(), helper.len()), (object.len(), object.len()));
            // A rewritten object has nothing left to rewrite.
            assert_eq!(patch(&read, None).unwrap(), (read.clone(), 0));
        }
    }

    #[test]
    fn the_running_kernel_is_read_where_it_has_btf() {
        // The layout itself is proven by the packet tests, which load it into this kernel.
        if Path::new(VMLINUX_BTF).exists() && std::env::var_os(NO_KFUNC_ENV).is_none() {
            match Layout::current() {
                Ok(l) => assert!(l.kfunc > 0 && l.byte > 0 && l.shift <= 6),
                Err(e) => assert!(format!("{e:#}").contains("6.2 added it"), "{e:#}"),
            }
        }
    }
}
