//! The one artifact for nodes: `cargo xtask build-static`'s `meshnet`, statically linked for
//! x86_64-unknown-linux-musl. It must need nothing from the node's userland (CentOS 7's
//! glibc 2.17, a container runtime's image, or nothing at all in a `FROM scratch` image):
//! no program interpreter and no shared library, read from its ELF headers; and it must run
//! from an empty root directory. `cargo xtask test` builds it and sets MESHNET_STATIC_BIN;
//! it also runs the pipeline tests with it as MESHNET_BIN.

use std::{path::PathBuf, process::Command};

use meshnet::datapath::EBPF_OBJECT;
use meshnet_tests::{require_root, topo::TempDir};
use object::{
    elf,
    read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _},
    Endianness,
};

fn static_bin() -> PathBuf {
    let p = std::env::var_os("MESHNET_STATIC_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/x86_64-unknown-linux-musl/release/meshnet"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "the static meshnet is missing at {}: build it with `cargo xtask build-static` (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// What in `bytes`' ELF headers ties it to a userland: its interpreter, if any, and its
/// `DT_NEEDED` libraries (as string-table offsets).
fn dynamic_dependencies(bytes: &[u8]) -> (Option<String>, Vec<u64>) {
    let file = ElfFile64::<Endianness>::parse(bytes).expect("not a 64-bit ELF file");
    let (header, endian) = (file.elf_header(), file.endian());
    assert_eq!(header.e_machine(endian), elf::EM_X86_64, "not an x86-64 binary");
    let kind = header.e_type(endian);
    assert!(kind == elf::ET_EXEC || kind == elf::ET_DYN, "not an executable (e_type {kind})");
    let mut interp = None;
    let mut needed = Vec::new();
    for ph in file.elf_program_headers() {
        match ph.p_type(endian) {
            elf::PT_INTERP => {
                let data = ph.data(endian, bytes).expect("PT_INTERP out of the file");
                interp = Some(String::from_utf8_lossy(data).trim_end_matches('\0').to_string());
            }
            elf::PT_DYNAMIC => {
                let entries = ph.dynamic(endian, bytes).expect("reading PT_DYNAMIC").unwrap_or_default();
                needed.extend(entries.iter().filter(|d| d.d_tag(endian) == elf::DT_NEEDED).map(|d| d.d_val(endian)));
            }
            _ => {}
        }
    }
    (interp, needed)
}

#[test]
fn static_binary_has_no_interpreter_and_no_shared_libraries() {
    let bin = static_bin();
    let bytes = std::fs::read(&bin).unwrap();
    let (interp, needed) = dynamic_dependencies(&bytes);
    assert_eq!(interp, None, "{} asks for a program interpreter", bin.display());
    assert!(needed.is_empty(), "{} needs {} shared libraries (DT_NEEDED)", bin.display(), needed.len());
}

/// The check itself, on a binary that has both: the host's debug build (glibc).
#[test]
fn the_check_sees_a_dynamic_binary() {
    let bytes = std::fs::read(meshnet_tests::meshnet_bin()).unwrap();
    let (interp, needed) = dynamic_dependencies(&bytes);
    if meshnet_tests::meshnet_bin() == static_bin() {
        // The smoke run with MESHNET_BIN pointing at the static binary.
        assert_eq!((interp, needed.len()), (None, 0));
        return;
    }
    assert!(interp.is_some_and(|i| i.contains("ld-linux")), "the glibc build has no interpreter?");
    assert!(!needed.is_empty(), "the glibc build needs no shared library?");
}

/// It carries the eBPF object the release build made (the one the host's tests load).
#[test]
fn static_binary_embeds_the_ebpf_object() {
    assert!(!EBPF_OBJECT.is_empty(), "this test build embedded the MESHNET_EBPF_STUB placeholder");
    let bytes = std::fs::read(static_bin()).unwrap();
    assert!(
        bytes.windows(EBPF_OBJECT.len()).any(|w| w == EBPF_OBJECT),
        "the static binary does not embed the object the tests were built with"
    );
}

/// As in a `FROM scratch` image: a root directory holding the binary and its config only.
#[test]
fn static_binary_runs_in_an_empty_root() {
    require_root();
    let root = TempDir::new();
    std::fs::copy(static_bin(), root.0.join("meshnet")).unwrap();
    std::fs::write(
        root.0.join("config.yaml"),
        "cluster: cluster1\npodCIDRs: [\"10.244.0.0/16\"]\ninterfaces: [\"veth*\"]\npeers:\n  - name: cluster2\n    podCIDRs: [\"10.245.0.0/16\"]\n    gateways: [{address: 192.0.2.2, port: 31674}]\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("chroot").arg(&root.0).arg("/meshnet").args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`meshnet {}` in an empty root failed ({}):\n{text}", args.join(" "), out.status);
        text
    };
    assert!(run(&["--version"]).contains(env!("CARGO_PKG_VERSION")));
    let checked = run(&["check", "--config", "/config.yaml"]);
    assert!(checked.contains("valid; cluster cluster1, 1 peers"), "{checked}");
}
