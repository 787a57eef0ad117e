//! Every documented way to build the eBPF object gives one the kernel loads: `cargo xtask
//! build-ebpf` with no flag and with `--release` (README), the object `meshnet`'s build.rs
//! embedded, and the upgrade-canary variant that `cargo xtask test` builds. Each is loaded
//! program by program, the way the agent loads it (fresh unpinned maps, nothing attached).
//!
//! The two `build-ebpf` tests run the command itself (a no-op rebuild after `cargo xtask
//! test`'s own build), so a default that drifts to a profile the kernel refuses fails here.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use meshnet::datapath::{Datapath, EBPF_LOG_OBJECT, EBPF_OBJECT};
use meshnet_common::names;
use meshnet_tests::require_root;

/// Both builds write target/ebpf/meshnet.bpf.o: one at a time, each reading its own.
static BUILD: Mutex<()> = Mutex::new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Loads every program of `object`; panics with the kernel's answer when it refuses one.
fn loads(what: &str, object: &[u8]) {
    let mut ebpf = Datapath::load_unpinned_object(1024, object)
        .unwrap_or_else(|e| panic!("the kernel refused the object of {what}: {e:#}"));
    for prog in [names::PROG_FROM_POD, names::PROG_TO_POD, names::PROG_EMPTY] {
        let p = ebpf.program_mut(prog).unwrap_or_else(|| panic!("{what}: no program {prog}"));
        assert!(p.fd().is_ok(), "{what}: {prog} is not loaded");
    }
}

/// Runs `cargo xtask build-ebpf FLAGS` and returns the object it says it wrote.
fn xtask_build_ebpf(flags: &[&str]) -> (PathBuf, Vec<u8>) {
    let _one = BUILD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["xtask", "build-ebpf"])
        .args(flags)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo xtask build-ebpf {flags:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("xtask: eBPF object at "))
        .unwrap_or_else(|| panic!("cargo xtask build-ebpf {flags:?} named no object:\n{stdout}"));
    let path = PathBuf::from(path.trim());
    assert_eq!(path, root().join("target/ebpf/meshnet.bpf.o"), "not where build.rs embeds from");
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn build_ebpf_without_a_flag_loads() {
    require_root();
    let (path, object) = xtask_build_ebpf(&[]);
    loads(&format!("`cargo xtask build-ebpf` ({})", path.display()), &object);
}

#[test]
fn build_ebpf_release_loads() {
    require_root();
    let (path, object) = xtask_build_ebpf(&["--release"]);
    loads(&format!("`cargo xtask build-ebpf --release` ({})", path.display()), &object);
}

/// What `cargo build -p meshnet` embedded (build.rs), which the agent loads.
#[test]
fn embedded_object_loads() {
    require_root();
    assert!(!EBPF_OBJECT.is_empty(), "this build embedded the MESHNET_EBPF_STUB placeholder");
    loads("the object embedded by build.rs", EBPF_OBJECT);
}

#[test]
fn embedded_logging_object_loads_with_its_line_writer() {
    require_root();
    if !meshnet::datapath_log::ring_buffers_supported() {
        meshnet_tests::skip("BPF ring buffers (5.8)");
        return;
    }
    assert!(!EBPF_LOG_OBJECT.is_empty(), "this build embedded the MESHNET_EBPF_STUB placeholder");
    loads("the logging object embedded by build.rs", EBPF_LOG_OBJECT);
    let mut ebpf = Datapath::load_unpinned_object(1024, EBPF_LOG_OBJECT).unwrap();
    let p = ebpf.program_mut(names::PROG_LOG).expect("the logging object has no line writer");
    assert!(p.fd().is_ok(), "{} is not loaded", names::PROG_LOG);
}

#[test]
fn upgrade_canary_variant_loads() {
    require_root();
    let path = std::env::var("MESHNET_UPGRADE_OBJECT")
        .expect("MESHNET_UPGRADE_OBJECT is unset: run this test through `cargo xtask test`, which builds the variant object");
    let object = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    assert_ne!(object.as_slice(), EBPF_OBJECT, "the variant is the default object");
    loads(&format!("the upgrade-canary variant ({path})"), &object);
}
