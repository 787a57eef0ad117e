//! Embeds the eBPF objects built by `cargo xtask build-ebpf`, so `meshnet` ships as one file:
//! the datapath and its logging build (`--datapath-log`).
//!
//! MESHNET_EBPF_OBJECT and MESHNET_EBPF_LOG_OBJECT point at other objects; MESHNET_EBPF_STUB=1
//! embeds empty ones so that `cargo check` and clippy work without the eBPF toolchain (such a
//! binary refuses to load anything).

use std::{
    env, fs,
    path::{Path, PathBuf},
};

#[path = "src/objcheck.rs"]
mod objcheck;

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=MESHNET_EBPF_STUB");
    let stub = env::var_os("MESHNET_EBPF_STUB").is_some_and(|v| v == "1");
    for (file, var) in [("meshnet.bpf.o", "MESHNET_EBPF_OBJECT"), ("meshnet-datapath-log.bpf.o", "MESHNET_EBPF_LOG_OBJECT")] {
        println!("cargo:rerun-if-env-changed={var}");
        let out = out_dir.join(file);
        if stub {
            fs::write(&out, b"").unwrap();
            continue;
        }
        let src = env::var_os(var).map_or_else(|| manifest_dir.join("../target/ebpf").join(file), PathBuf::from);
        embed(&src, &out);
    }
}

fn embed(src: &Path, out: &Path) {
    println!("cargo:rerun-if-changed={}", src.display());
    let object = fs::read(src).unwrap_or_else(|e| {
        panic!(
            "\n\nmeshnet embeds its eBPF objects, and one is missing at {} ({e}).\n\
             Build them first with `cargo xtask build-ebpf` (after `cargo xtask setup` on a new machine),\n\
             or set MESHNET_EBPF_STUB=1 for a check-only build.\n\n",
            src.display()
        )
    });
    match objcheck::functions_without_exit(&object) {
        Ok(bad) if bad.is_empty() => {}
        Ok(bad) => {
            let list: Vec<String> = bad.iter().map(|(f, op)| format!("{f} (ends in opcode {op:#04x})")).collect();
            panic!(
                "\n\nthe eBPF object at {} would be refused by the kernel (\"last insn is not an exit or jmp\"): \
                 {}.\nRebuild it with `cargo xtask build-ebpf`, which uses the release profile.\n\n",
                src.display(),
                list.join(", ")
            );
        }
        Err(e) => panic!("\n\nthe eBPF object at {} is unreadable: {e}\n\n", src.display()),
    }
    fs::write(out, &object).unwrap();
}
