//! Project tasks: `cargo xtask setup | build-ebpf | test | demo`.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

mod bench;
mod manifests;
mod vm;

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.10.0";
/// Debian packages the tests and the demo run: ip/bridge (iproute2), the CNI-style
/// masquerade and kube-proxy-style NodePort rules (iptables), checksum offload switches
/// (ethtool), mount/umount (mount), and the throughput load generator of the benchmarks
/// (iperf3).
const APT_PACKAGES: [&str; 5] = ["iproute2", "iptables", "ethtool", "mount", "iperf3"];

#[derive(Parser)]
#[command(name = "xtask", about = "meshnet's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need, and say what was done. Idempotent.
    Setup,
    /// Build the eBPF object (needs `cargo xtask setup` once).
    BuildEbpf {
        /// Build with the release profile (LTO).
        #[arg(long)]
        release: bool,
    },
    /// Set up if needed, build everything, and run every test (root required): on the host,
    /// then the datapath tests in VMs on the kernel matrix (see xtask/src/vm.rs).
    Test {
        #[command(flatten)]
        vm: vm::VmArgs,
        /// Extra arguments for `cargo test` after `--`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a two-cluster topology in network namespaces and show traffic to a remote pod
    /// failing without meshnet and crossing with it (root required).
    Demo,
    /// Run the benchmarks and write docs/benchmarks.md, docs/benchmarks.json and the plots
    /// (root required).
    Bench {
        /// Fewer and shorter repeats: a few minutes instead of a longer full run.
        #[arg(long)]
        quick: bool,
        /// Only some parts: micro (per-packet cost), e2e (network namespaces), control, discovery (50 clusters × 1,000 nodes).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Write the report here instead of docs/.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::BuildEbpf { release } => build_ebpf(release).map(|_| ()),
        Task::Test { args, vm } => vm::test(&args, &vm, test),
        Task::Demo => demo(),
        Task::Bench { quick, only, out_dir } => bench::bench(&bench::Options { quick, only, out_dir }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A command with the outer cargo's toolchain choices removed, so `+nightly` wins.
fn clean(mut cmd: Command) -> Command {
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTDOC", "CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// What is missing for an eBPF build, each with how to get it.
fn ebpf_prerequisites() -> Vec<(String, String)> {
    let mut missing = Vec::new();
    let nightly = output(clean(Command::new("rustup")).args(["run", NIGHTLY, "rustc", "--version"]));
    if nightly.is_none() {
        missing.push((
            "the nightly Rust toolchain".to_string(),
            "this machine kind ships one; elsewhere: rustup toolchain install nightly".to_string(),
        ));
    } else {
        let comps = output(clean(Command::new("rustup")).args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))
            .unwrap_or_default();
        if !comps.lines().any(|l| l.starts_with("rust-src")) {
            missing.push((
                "rust-src for the nightly toolchain".to_string(),
                format!("rustup component add rust-src --toolchain {NIGHTLY}"),
            ));
        }
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        missing.push((
            format!("bpf-linker {BPF_LINKER_VERSION}"),
            format!("cargo install bpf-linker@{BPF_LINKER_VERSION} --locked"),
        ));
    }
    missing
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect()
}

fn setup() -> anyhow::Result<()> {
    let mut did = Vec::new();
    for (what, how) in ebpf_prerequisites() {
        println!("xtask setup: installing {what}: {how}");
        let mut parts = how.split_whitespace();
        let program = parts.next().unwrap();
        if program != "rustup" && program != "cargo" {
            bail!("{what} is missing and cannot be installed here: {how}");
        }
        run(clean(Command::new(program)).args(parts))
            .with_context(|| format!("installing {what}; install it by hand with `{how}`"))?;
        did.push(what);
    }
    let apt = missing_apt_packages();
    if !apt.is_empty() {
        let cmd = format!("apt-get update && apt-get install -y {}", apt.join(" "));
        if !is_root() {
            bail!("missing Debian packages {}: run as root `{cmd}`", apt.join(", "));
        }
        println!("xtask setup: installing Debian packages: {}", apt.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))
            .with_context(|| format!("apt-get update failed; run `{cmd}` by hand"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install failed; run `{cmd}` by hand"))?;
        did.push(format!("Debian packages {}", apt.join(", ")));
    }
    // The manifest tests' validator and kubectl (see manifests.rs).
    did.extend(manifests::setup(&root_dir(), is_root())?);
    // QEMU, virtme-ng and the kernels of the VM matrix (see vm.rs).
    did.extend(vm::setup(is_root())?);
    let left = ebpf_prerequisites();
    if !left.is_empty() {
        bail!("still missing after setup: {}", left.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(", "));
    }
    if did.is_empty() {
        println!("xtask setup: everything was already installed");
    } else {
        println!("xtask setup: installed {}", did.join("; "));
    }
    Ok(())
}

/// Builds the eBPF object and copies it to target/ebpf/meshnet.bpf.o, where meshnet's
/// build.rs embeds it from.
fn build_ebpf(release: bool) -> anyhow::Result<PathBuf> {
    build_ebpf_variant(release, None)
}

/// Builds the eBPF object, or with `feature` a variant of it (into its own target dir and
/// file, target/ebpf/meshnet-FEATURE.bpf.o).
fn build_ebpf_variant(release: bool, feature: Option<&str>) -> anyhow::Result<PathBuf> {
    let missing = ebpf_prerequisites();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|(w, h)| format!("  - {w} (`{h}`)")).collect();
        bail!("the eBPF build needs:\n{}\nRun `cargo xtask setup` to install them.", list.join("\n"));
    }
    let root = root_dir();
    let dir = root.join("meshnet-ebpf");
    let mut cmd = clean(Command::new("rustup"));
    cmd.current_dir(&dir).args([
        "run",
        NIGHTLY,
        "cargo",
        "build",
        "--locked",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
    ]);
    if release {
        cmd.arg("--release");
    }
    let target_dir = match feature {
        Some(f) => {
            cmd.args(["--features", f]);
            dir.join("target").join(f)
        }
        None => dir.join("target"),
    };
    cmd.arg("--target-dir").arg(&target_dir);
    run(&mut cmd).context("building the eBPF object")?;
    let profile = if release { "release" } else { "debug" };
    let built = target_dir.join("bpfel-unknown-none").join(profile).join("meshnet");
    let dest_dir = root.join("target/ebpf");
    std::fs::create_dir_all(&dest_dir)?;
    let dest = dest_dir.join(feature.map_or_else(|| "meshnet.bpf.o".to_string(), |f| format!("meshnet-{f}.bpf.o")));
    std::fs::copy(&built, &dest).with_context(|| format!("copying {}", built.display()))?;
    println!("xtask: eBPF object at {}", dest.display());
    Ok(dest)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root_dir());
    cmd
}

/// Builds the `meshnet` binary with the object embedded; returns its path.
fn build_meshnet() -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "--locked", "-p", "meshnet", "--bin", "meshnet"]))?;
    Ok(root_dir().join("target/debug/meshnet"))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root: its tests create network namespaces, mount bpffs and load eBPF \
             programs. Run it as root (e.g. `sudo -E cargo xtask {what}`)."
        );
    }
    Ok(())
}

fn prepare() -> anyhow::Result<PathBuf> {
    if !ebpf_prerequisites().is_empty() || !missing_apt_packages().is_empty() || manifests::missing(&root_dir()) {
        setup()?;
    }
    build_ebpf(true)?;
    build_meshnet()
}

/// The whole suite on the host's kernel.
fn test(args: &[String]) -> anyhow::Result<vm::Counts> {
    require_root("test")?;
    let bin = prepare()?;
    // A build with different program instructions, for the upgrade-under-a-live-flow test.
    let canary = build_ebpf_variant(true, Some("upgrade-canary"))?;
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "--workspace", "--no-fail-fast"])
        .env("MESHNET_BIN", &bin)
        .env("MESHNET_UPGRADE_OBJECT", &canary)
        .stdout(Stdio::piped());
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let mut child = cmd.spawn().context("running cargo test")?;
    // "test result:" lines, and meshnet-tests' "skipped: needs ..." lines.
    let mut counts = vm::Counts::default();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        counts.scan(&line);
    }
    let status = child.wait()?;
    let (passed, failed, skipped) = (counts.passed, counts.failed, counts.skipped);
    println!("\nhost suite: {passed} passed, {failed} failed, {skipped} skipped");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(counts)
}

fn demo() -> anyhow::Result<()> {
    require_root("demo")?;
    let bin = prepare()?;
    run(cargo()
        .args(["run", "--locked", "--quiet", "-p", "meshnet-tests", "--bin", "meshnet-demo"])
        .env("MESHNET_BIN", &bin))
}
