//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH` (hash maps, kernel 5.6+): a full flow table of
//! 65,536 entries in 16 syscalls instead of two per entry. On kernels without it (ELRepo's
//! 5.4), [`lookup_all`] says `Unsupported` at once and callers walk the map entry by entry.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use bytemuck::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's internal "not supported" (`ENOTSUPP`), which it lets out for map types that
/// have no batch operations.
const ENOTSUPP: i32 = 524;
/// Entries asked for per call. A hash map's batch never splits a bucket, and fails with
/// `ENOSPC` when one bucket holds more than this: the chunk then doubles.
const CHUNK: usize = 4096;

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the hash map `fd` with keys `K` and values `V` (whose sizes must be the
/// map's). The datapath keeps writing meanwhile, so like any walk it is a view of a moving
/// table: an entry added or removed during the read may be missing or present.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // A hash map's position is a bucket index (a u32); 8 bytes hold any map type's.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); chunk];
        let mut values = vec![V::zeroed(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const position) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            ..BatchAttr::default()
        };
        // SAFETY: BPF_MAP_LOOKUP_BATCH with an attr of the size passed; `keys` and `values`
        // hold `count` entries of the map's key and value sizes, and `position` and `next`
        // outlive the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>()) };
        let err = (r < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // ENOENT: this was the last batch (it may still hold entries).
            None | Some(libc::ENOENT) => {}
            Some(libc::ENOSPC) if n == 0 && chunk < (1 << 20) => {
                chunk *= 2;
                continue;
            }
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => return Err(io::ErrorKind::Unsupported.into()),
            Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("batch lookup failed"))),
        }
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if err.is_some() {
            return Ok(out);
        }
        position = next;
        first = false;
    }
}
