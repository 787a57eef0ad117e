//! `cargo xtask bench [--quick]`: builds what the benchmarks measure and runs them.
//!
//! Builds the release eBPF objects (embedded in `meshnet`: the datapath and its logging build,
//! which is measured beside it), the benchmark-only variants of it (`bench-no-rewrite`,
//! `bench-no-clock`: the datapath with one part taken out, so that its cost shows by
//! difference; `bench-floor`: extra programs, a new flow's lookup and inserts alone and a
//! decapsulation without its checks), the release `meshnet` binary (the agent under test, on
//! both nodes in tunnel mode) and the `meshnet-bench` binary, then runs `meshnet-bench`, which writes
//! docs/benchmarks.md, docs/benchmarks.json and the plots beside them. The end-to-end part's
//! VXLAN baseline for tunnel mode needs a kernel with VXLAN (`ip link add … type vxlan`).

use std::{
    path::PathBuf,
    process::Command,
    time::Instant,
};

use anyhow::Context as _;

use super::{build_ebpf, build_ebpf_variant, cargo, ebpf_prerequisites, missing_apt_packages, require_root, root_dir, run, setup};

/// Datapath variants built for the cost breakdown, by cargo feature of meshnet-ebpf.
const VARIANTS: [&str; 3] = ["bench-no-rewrite", "bench-no-clock", "bench-floor"];

pub struct Options {
    pub quick: bool,
    /// Only these parts (micro, e2e, control, discovery); all when empty.
    pub only: Vec<String>,
    /// Where the report goes; docs/ by default.
    pub out_dir: Option<PathBuf>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    require_root("bench")?;
    if !ebpf_prerequisites().is_empty() || !missing_apt_packages().is_empty() {
        setup()?;
    }
    build_ebpf()?;
    let mut variants = Vec::new();
    for v in VARIANTS {
        variants.push((v, build_ebpf_variant(Some(v))?));
    }
    run(cargo("build").args([
        "--release",
        "-p",
        "meshnet",
        "--bin",
        "meshnet",
        "-p",
        "meshnet-tests",
        "--bin",
        "meshnet-bench",
    ]))
    .context("building the release binaries")?;
    let root = root_dir();
    let release = root.join("target/release");
    let out_dir = opts.out_dir.clone().unwrap_or_else(|| root.join("docs"));

    let load = loadavg();
    println!("xtask bench: load average before the run: {load} (the figures are best on an otherwise idle machine)");
    let mut cmd = Command::new(release.join("meshnet-bench"));
    cmd.current_dir(&root).env("MESHNET_BIN", release.join("meshnet")).arg("--out-dir").arg(&out_dir);
    if opts.quick {
        cmd.arg("--quick");
    }
    if !opts.only.is_empty() {
        cmd.arg("--only").arg(opts.only.join(","));
    }
    for (name, path) in &variants {
        cmd.arg("--variant").arg(format!("{name}={}", path.display()));
    }
    // The logging build, which build_ebpf made beside the default one: what it costs, measured
    // in the same loop.
    let logging = root.join("target/ebpf").join(format!("meshnet-{}.bpf.o", super::LOGGING_FEATURE));
    cmd.arg("--variant").arg(format!("{}={}", super::LOGGING_FEATURE, logging.display()));
    let started = Instant::now();
    run(&mut cmd)?;
    println!(
        "xtask bench: {} mode took {:.0} s; report in {}",
        if opts.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64(),
        out_dir.join("benchmarks.md").display()
    );
    Ok(())
}
