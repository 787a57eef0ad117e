//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so `meshnet` ships as one file.
//!
//! MESHNET_EBPF_OBJECT points at another object; MESHNET_EBPF_STUB=1 embeds an empty one so
//! that `cargo check` and clippy work without the eBPF toolchain (such a binary refuses to
//! load anything).

use std::{env, fs, path::PathBuf};

#[path = "src/objcheck.rs"]
mod objcheck;

fn main() {
    println!("cargo:rerun-if-env-changed=MESHNET_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=MESHNET_EBPF_STUB");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("meshnet.bpf.o");
    if env::var_os("MESHNET_EBPF_STUB").is_some_and(|v| v == "1") {
        fs::write(&out, b"").unwrap();
        return;
    }
    let src = env::var_os("MESHNET_EBPF_OBJECT").map_or_else(
        || PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../target/ebpf/meshnet.bpf.o"),
        PathBuf::from,
    );
    println!("cargo:rerun-if-changed={}", src.display());
    let object = fs::read(&src).unwrap_or_else(|e| {
        panic!(
            "\n\nmeshnet embeds its eBPF object, which is missing at {} ({e}).\n\
             Build it first with `cargo xtask build-ebpf` (after `cargo xtask setup` on a new machine),\n\
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
    fs::write(&out, &object).unwrap();
}
