//! Project tasks: `cargo xtask setup | build-ebpf | build-static | image | test | demo | bench`.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

mod bench;
mod image;
mod manifests;
mod vm;

/// Where the eBPF side's toolchain is pinned (a dated nightly): `rust-toolchain.toml` makes a
/// plain `cargo build` in meshnet-ebpf/ take the same one that xtask names explicitly.
const EBPF_TOOLCHAIN_FILE: &str = "meshnet-ebpf/rust-toolchain.toml";
const BPF_LINKER_VERSION: &str = "0.10.0";
/// The target of the one binary shipped for nodes: statically linked against musl, so it
/// runs on any distribution's userland (CentOS 7's glibc 2.17 included) and in an empty
/// image.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";
/// Debian packages the tests and the demo run: ip/bridge (iproute2), the CNI-style
/// masquerade and kube-proxy-style NodePort rules (iptables), checksum offload switches
/// (ethtool), mount/umount (mount), the throughput load generator of the benchmarks
/// (iperf3), musl-gcc for the C parts (ring) of the static build (musl-tools), the
/// daemonless image builder of `cargo xtask image` (buildah), and `ping` for tunnel mode's
/// ICMP test (iputils-ping).
const APT_PACKAGES: [&str; 8] = ["iproute2", "iptables", "ethtool", "mount", "iperf3", "musl-tools", "buildah", "iputils-ping"];

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
    /// Build the eBPF object into target/ebpf/meshnet.bpf.o, where the `meshnet` build embeds
    /// it from (needs `cargo xtask setup` once). Always the release profile: the kernel
    /// refuses what the debug profile makes.
    BuildEbpf {
        /// Accepted for older scripts: the release profile is the only one.
        #[arg(long)]
        release: bool,
    },
    /// Build the node artifact: the eBPF object, then `meshnet` statically linked for
    /// x86_64-unknown-linux-musl at target/x86_64-unknown-linux-musl/release/meshnet.
    BuildStatic,
    /// Build the OCI image (deploy/Dockerfile: FROM scratch, the static `meshnet` and its
    /// licences) with buildah, without a daemon, reproducibly, into
    /// target/image/meshnet-VERSION.docker.tar (`docker load -i`) and .oci.tar.
    Image(image::ImageArgs),
    /// Set up if needed, build everything, and run every test (root required): on the host,
    /// then the pipeline tests again against the static binary, then the datapath tests in
    /// VMs on the kernel matrix (see xtask/src/vm.rs).
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
        Task::BuildEbpf { release: _ } => build_ebpf().map(|_| ()),
        Task::BuildStatic => build_static().map(|_| ()),
        Task::Image(args) => image::image(&args),
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

/// The eBPF side's pinned toolchain, from its `rust-toolchain.toml` (the one place it is
/// named): the dated nightly, and the `rustc --version` line that build prints.
struct EbpfPin {
    channel: String,
    rustc: String,
}

fn ebpf_pin() -> anyhow::Result<EbpfPin> {
    let path = root_dir().join(EBPF_TOOLCHAIN_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_pin(&text).with_context(|| format!("{} needs `channel = \"...\"` and `# rustc: ...` lines", path.display()))
}

fn parse_pin(toml: &str) -> Option<EbpfPin> {
    let channel = toml.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_string())
    })?;
    let rustc = toml.lines().find_map(|l| l.strip_prefix("# rustc: "))?.trim().to_string();
    Some(EbpfPin { channel, rustc })
}

/// The installed toolchain to build the eBPF side with: the pinned one, or, where only an
/// undated `nightly` is installed (and the pinned one cannot be fetched), that one when it
/// is the very same build. Any other compiler is refused, so the object never changes under
/// the same source without the pin changing.
fn ebpf_toolchain() -> anyhow::Result<String> {
    let pin = ebpf_pin()?;
    let version = |t: &str| output(clean(Command::new("rustup")).args(["run", t, "rustc", "--version"])).map(|v| v.trim().to_string());
    match version(&pin.channel) {
        Some(v) if v == pin.rustc => return Ok(pin.channel),
        Some(v) => bail!("{} reports `{v}`, but {EBPF_TOOLCHAIN_FILE} expects `{}`", pin.channel, pin.rustc),
        None => {}
    }
    if version("nightly").as_deref() == Some(pin.rustc.as_str()) {
        return Ok("nightly".to_string());
    }
    bail!("the Rust toolchain {} (or a `nightly` that is `{}`)", pin.channel, pin.rustc)
}

/// What is missing for an eBPF build, each with how to get it.
fn ebpf_prerequisites() -> Vec<(String, String)> {
    let mut missing = Vec::new();
    let pin = match ebpf_pin() {
        Ok(p) => p,
        Err(e) => return vec![(format!("{e:#}"), format!("git checkout {EBPF_TOOLCHAIN_FILE}"))],
    };
    match ebpf_toolchain() {
        Err(e) => missing.push((
            format!("{e:#}"),
            format!("rustup toolchain install {} --profile minimal --component rust-src", pin.channel),
        )),
        Ok(nightly) => {
            let comps = output(clean(Command::new("rustup")).args(["component", "list", "--toolchain", &nightly, "--installed"]))
                .unwrap_or_default();
            if !comps.lines().any(|l| l.starts_with("rust-src")) {
                missing.push((
                    format!("rust-src for {nightly}"),
                    format!("rustup component add rust-src --toolchain {nightly}"),
                ));
            }
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

/// What is missing for the static build: the musl target of the toolchain that builds the
/// workspace (musl-gcc comes with the Debian packages).
fn static_prerequisites() -> Vec<(String, String)> {
    // Named explicitly: setup runs its commands without the outer cargo's RUSTUP_TOOLCHAIN.
    let toolchain = output(Command::new("rustup").current_dir(root_dir()).args(["show", "active-toolchain"]))
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "stable".to_string());
    let installed = output(Command::new("rustup").args(["target", "list", "--installed", "--toolchain", &toolchain]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == STATIC_TARGET) {
        return Vec::new();
    }
    vec![(
        format!("the Rust target {STATIC_TARGET} for {toolchain}"),
        format!("rustup target add --toolchain {toolchain} {STATIC_TARGET}"),
    )]
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
    for (what, how) in ebpf_prerequisites().into_iter().chain(static_prerequisites()) {
        println!("xtask setup: installing {what}: {how}");
        let mut parts = how.split_whitespace();
        let program = parts.next().unwrap();
        if program != "rustup" && program != "cargo" {
            bail!("{what} is missing and cannot be installed here: {how}");
        }
        // Run from the repository root: a `rustup target add` is for the toolchain that
        // builds the workspace.
        run(clean(Command::new(program)).current_dir(root_dir()).args(parts))
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
    let left: Vec<_> = ebpf_prerequisites().into_iter().chain(static_prerequisites()).collect();
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

/// The second object meshnet ships: the datapath that also logs its decisions through
/// aya-log (`meshnet agent --datapath-log`).
const LOGGING_FEATURE: &str = "datapath-log";

/// Builds the eBPF objects meshnet embeds (see meshnet-user/build.rs): the datapath, to
/// target/ebpf/meshnet.bpf.o, and its logging build, to target/ebpf/meshnet-datapath-log.bpf.o.
/// Returns the first.
fn build_ebpf() -> anyhow::Result<PathBuf> {
    let object = build_ebpf_variant(None)?;
    build_ebpf_variant(Some(LOGGING_FEATURE))?;
    Ok(object)
}

/// Builds the eBPF object, or with `feature` a variant of it (into its own target dir and
/// file, target/ebpf/meshnet-FEATURE.bpf.o).
///
/// Always with the release profile, the one every test loads: the debug profile's object
/// was once refused by the kernel ("last insn is not an exit or jmp", from core's panic
/// paths that debug assertions kept), and a second profile would be a second object to test.
fn build_ebpf_variant(feature: Option<&str>) -> anyhow::Result<PathBuf> {
    let missing = ebpf_prerequisites();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|(w, h)| format!("  - {w} (`{h}`)")).collect();
        bail!("the eBPF build needs:\n{}\nRun `cargo xtask setup` to install them.", list.join("\n"));
    }
    let nightly = ebpf_toolchain()?;
    let root = root_dir();
    let dir = root.join("meshnet-ebpf");
    let mut cmd = clean(Command::new("rustup"));
    cmd.current_dir(&dir).args([
        "run",
        &nightly,
        "cargo",
        "build",
        "--locked",
        "--release",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
    ]);
    let target_dir = match feature {
        Some(f) => {
            cmd.args(["--features", f]);
            dir.join("target").join(f)
        }
        None => dir.join("target"),
    };
    cmd.arg("--target-dir").arg(&target_dir);
    run(&mut cmd).context("building the eBPF object")?;
    let built = target_dir.join("bpfel-unknown-none/release/meshnet");
    let dest_dir = root.join("target/ebpf");
    std::fs::create_dir_all(&dest_dir)?;
    let dest = dest_dir.join(feature.map_or_else(|| "meshnet.bpf.o".to_string(), |f| format!("meshnet-{f}.bpf.o")));
    let object = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // An unchanged object keeps its mtime, so that build.rs (rerun-if-changed) does not
    // make cargo rebuild meshnet and every test for nothing; a changed one goes in through
    // a rename, so that a build embedding it never reads half of it.
    if std::fs::read(&dest).ok().as_deref() != Some(object.as_slice()) {
        let tmp = dest.with_extension(format!("o.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &object).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    }
    println!("xtask: eBPF object at {}", dest.display());
    Ok(dest)
}

/// `cargo SUBCOMMAND --locked` from the repository root: every cargo run of xtask builds
/// with the versions in Cargo.lock.
fn cargo(subcommand: &str) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root_dir()).args([subcommand, "--locked"]);
    cmd
}

/// Builds the `meshnet` binary with the object embedded; returns its path.
fn build_meshnet() -> anyhow::Result<PathBuf> {
    run(cargo("build").args(["-p", "meshnet", "--bin", "meshnet"]))?;
    Ok(root_dir().join("target/debug/meshnet"))
}

/// The static `meshnet` for nodes: release profile, musl, the release eBPF object
/// embedded. Returns its path.
fn build_static() -> anyhow::Result<PathBuf> {
    let missing: Vec<_> = static_prerequisites().into_iter().chain(ebpf_prerequisites()).collect();
    let no_musl_gcc = output(Command::new("musl-gcc").arg("--version")).is_none();
    if !missing.is_empty() || no_musl_gcc {
        let mut list: Vec<String> = missing.iter().map(|(w, h)| format!("  - {w} (`{h}`)")).collect();
        if no_musl_gcc {
            list.push("  - musl-gcc, for ring's C code (Debian: `apt-get install musl-tools`)".to_string());
        }
        bail!("the static build needs:\n{}\nRun `cargo xtask setup` to install them.", list.join("\n"));
    }
    build_ebpf()?;
    run(cargo("build").args(["--release", "-p", "meshnet", "--bin", "meshnet", "--target", STATIC_TARGET]))
        .context("building the static meshnet")?;
    let bin = root_dir().join("target").join(STATIC_TARGET).join("release/meshnet");
    println!("xtask: static meshnet at {}", bin.display());
    Ok(bin)
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
    set_up_if_needed()?;
    build_ebpf()?;
    build_meshnet()
}

/// [`prepare`] for the test suite: everything `cargo test --workspace` builds, and the debug
/// `meshnet` with the same features. Built alone (`-p meshnet`), `meshnet` resolved its
/// dependencies' features without the other members and the dev-dependencies, and the test
/// build then compiled tokio, hyper, k8s-openapi and kube a second time.
pub fn prepare_tests() -> anyhow::Result<PathBuf> {
    set_up_if_needed()?;
    build_ebpf()?;
    run(cargo("build").args(["--workspace", "--all-targets"]))?;
    Ok(root_dir().join("target/debug/meshnet"))
}

fn set_up_if_needed() -> anyhow::Result<()> {
    if !ebpf_prerequisites().is_empty()
        || !static_prerequisites().is_empty()
        || !missing_apt_packages().is_empty()
        || manifests::missing(&root_dir())
    {
        setup()?;
    }
    Ok(())
}

/// The host suite's tests that run a second time against the static binary: they start
/// `meshnet` as a process (MESHNET_BIN), so they exercise the shipped artifact itself:
/// loading with and without kernel BTF, both attach paths, the bpffs checks, `detach`.
const STATIC_SMOKE_TESTS: [&str; 1] = ["pipeline"];

/// The whole suite on the host's kernel, then its smoke tests against the static binary.
fn test(args: &[String]) -> anyhow::Result<vm::Counts> {
    require_root("test")?;
    let bin = prepare_tests()?;
    // A build with different program instructions, for the upgrade-under-a-live-flow test.
    let canary = build_ebpf_variant(Some("upgrade-canary"))?;
    let started = std::time::Instant::now();
    let static_bin = build_static()?;
    println!("xtask: the static build took {}s", started.elapsed().as_secs());
    let mut cmd = cargo("test");
    cmd.args(["--workspace", "--no-fail-fast"])
        .env("MESHNET_BIN", &bin)
        .env("MESHNET_UPGRADE_OBJECT", &canary)
        .env("MESHNET_STATIC_BIN", &static_bin);
    let mut counts = counted(cmd, args)?;
    println!("\nxtask: the smoke tests again, against the static binary {}", static_bin.display());
    // The whole workspace's features, as above, so that nothing is compiled again.
    let mut cmd = cargo("test");
    cmd.args(["--workspace", "--no-fail-fast"])
        .env("MESHNET_BIN", &static_bin)
        .env("MESHNET_UPGRADE_OBJECT", &canary)
        .env("MESHNET_STATIC_BIN", &static_bin);
    for t in STATIC_SMOKE_TESTS {
        cmd.args(["--test", t]);
    }
    let smoke = counted(cmd, args)?;
    counts.add(smoke);
    let (passed, failed, skipped) = (counts.passed, counts.failed, counts.skipped);
    println!("\nhost suite: {passed} passed, {failed} failed, {skipped} skipped (of which the static binary's smoke tests: {} passed, {} failed, {} skipped)", smoke.passed, smoke.failed, smoke.skipped);
    if failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(counts)
}

/// Runs a `cargo test` (with `args` after `--`), echoing its output and counting its
/// results ("test result:" lines, and meshnet-tests' "skipped: needs ..." lines). A
/// failing run counts at least one failure, also when it failed before printing a result.
fn counted(mut cmd: Command, args: &[String]) -> anyhow::Result<vm::Counts> {
    cmd.stdout(Stdio::piped());
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let mut child = cmd.spawn().context("running cargo test")?;
    let mut counts = vm::Counts::default();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        counts.scan(&line);
    }
    let status = child.wait()?;
    if !status.success() && counts.failed == 0 {
        counts.failed = 1;
    }
    Ok(counts)
}

fn demo() -> anyhow::Result<()> {
    require_root("demo")?;
    let bin = prepare()?;
    run(cargo("run")
        .args(["--quiet", "-p", "meshnet-tests", "--bin", "meshnet-demo"])
        .env("MESHNET_BIN", &bin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_toolchain_is_a_dated_nightly() {
        let t = ebpf_pin().unwrap().channel;
        let date = t.strip_prefix("nightly-").unwrap_or_else(|| panic!("{t} is not a dated nightly"));
        let parts: Vec<&str> = date.split('-').collect();
        assert!(
            parts.len() == 3 && parts.iter().zip([4, 2, 2]).all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_digit())),
            "{t} is not nightly-YYYY-MM-DD"
        );
    }

    #[test]
    fn pin_reads_the_channel_and_the_rustc_line() {
        let pin = parse_pin("# rustc: rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\n[toolchain]\nchannel = \"nightly-2026-05-20\"\n").unwrap();
        assert_eq!((pin.channel.as_str(), pin.rustc.as_str()), ("nightly-2026-05-20", "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)"));
        assert!(parse_pin("[toolchain]\nchannel = \"nightly-2026-05-20\"\n").is_none());
        assert!(parse_pin("# rustc: x\n[toolchain]\ncomponents = [\"rust-src\"]\n").is_none());
    }

    /// The README's `cargo xtask build-ebpf` and the older `--release` both parse, and
    /// there is no flag for another profile.
    #[test]
    fn build_ebpf_takes_no_profile_choice() {
        for argv in [&["xtask", "build-ebpf"][..], &["xtask", "build-ebpf", "--release"]] {
            assert!(matches!(Cli::try_parse_from(argv).unwrap().task, Task::BuildEbpf { .. }), "{argv:?}");
        }
        assert!(Cli::try_parse_from(["xtask", "build-ebpf", "--debug"]).is_err());
        assert!(matches!(Cli::try_parse_from(["xtask", "build-static"]).unwrap().task, Task::BuildStatic));
    }

    #[test]
    fn cargo_runs_are_locked() {
        for sub in ["build", "test", "run"] {
            let cmd = cargo(sub);
            let args: Vec<_> = cmd.get_args().collect();
            assert_eq!(args, [sub, "--locked"]);
        }
    }
}
