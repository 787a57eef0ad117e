//! Plain `bpf(2)` calls, for what the tests do outside aya: maps of the layouts an older
//! build made (this build's object cannot make them any more), another tool's program, and
//! loads whose verifier log the verifier test reads.

use std::{
    ffi::{CStr, CString},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

pub const HASH: u32 = 1;
pub const PERCPU_HASH: u32 = 5;
pub const PERCPU_ARRAY: u32 = 6;
pub const LRU_HASH: u32 = 9;
pub const PROG_TYPE_SCHED_CLS: u32 = 3;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_FREEZE: libc::c_long = 22;

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Writes a global data section (`.rodata`, an array of one value) and, when `freeze`, makes
/// it read-only for user space (5.2+), as aya does when it loads an object: only then does the
/// verifier take its values as known constants and prune the branches they rule out.
pub fn set_global_data(map_fd: i32, data: &[u8], freeze: bool) -> std::io::Result<()> {
    let key = 0u32;
    let attr = MapElem {
        map_fd: u32::try_from(map_fd).unwrap_or(u32::MAX),
        _pad: 0,
        key: (&raw const key) as u64,
        value: data.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the key and the value outlive the call; the attr is of the size given.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, &raw const attr, size_of::<MapElem>()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if freeze {
        let fd = u32::try_from(map_fd).unwrap_or(u32::MAX);
        // SAFETY: BPF_MAP_FREEZE reads the map fd, the first word of the attr.
        if unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, &raw const fd, size_of::<u32>()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to `prog_name` (kernel 4.15+); the
/// kernel treats the fields after it as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Loads `insns` (8-byte `bpf_insn`s) as a program of `prog_type` named `name` (cut to 15
/// bytes). With `log_level` above 0 the verifier writes its log into `log`. Returns the fd,
/// or the kernel's error.
pub fn prog_load<I: Copy>(prog_type: u32, name: &str, insns: &[I], license: &CStr, log_level: u32, log: &mut [u8]) -> std::io::Result<OwnedFd> {
    assert_eq!(size_of::<I>(), 8, "a bpf_insn is 8 bytes");
    lift_memlock_limit();
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).unwrap(),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size: u32::try_from(log.len()).unwrap(),
        log_buf: if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 },
        ..ProgLoad::default()
    };
    for (d, s) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    // SAFETY: every pointer in attr refers to a live buffer of the stated size for the
    // duration of the call, and the size passed is that of attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &raw const attr, size_of::<ProgLoad>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) })
}

/// Loads another tool's tc program, named "foreign_pass", that passes every packet on
/// (`TC_ACT_UNSPEC`, which is also tcx's "next"), and pins it at `path`.
pub fn load_pinned_pass_program(path: &Path) {
    // r0 = -1; exit
    let insns: [u64; 2] = [0xb7 | (u64::from(u32::MAX) << 32), 0x95];
    let license = CString::new("GPL").unwrap();
    let fd = prog_load(PROG_TYPE_SCHED_CLS, "foreign_pass", &insns, &license, 0, &mut []).unwrap_or_else(|e| panic!("BPF_PROG_LOAD: {e}"));
    pin(path, &fd);
}

fn pin(path: &Path, fd: &OwnedFd) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let pin = ObjPin { pathname: c.as_ptr() as u64, bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap(), file_flags: 0 };
    // SAFETY: BPF_OBJ_PIN with a valid attr; `c` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &raw const pin, size_of::<ObjPin>()) };
    assert_eq!(r, 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK, whose default
/// (8 MB, or 64 KB) holds no 65,536-entry map: without this, 5.10 says EPERM.
pub fn lift_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) };
}

/// Creates a map and pins it at `path`.
pub fn create_pinned(path: &Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32, map_flags: u32) {
    lift_memlock_limit();
    let attr = MapCreate { map_type, key_size, value_size, max_entries, map_flags };
    // SAFETY: BPF_MAP_CREATE with a valid attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw const attr, size_of::<MapCreate>()) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd the kernel just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
    pin(path, &fd);
}
