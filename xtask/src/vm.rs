//! The kernel matrix: meshnet's datapath tests in VMs booted on other kernels.
//!
//! `cargo xtask test` runs the whole suite on the host, then the datapath tests (the
//! `meshnet-tests` integration tests that load and attach programs) in a QEMU VM for each
//! kernel of [`MATRIX`] (Ubuntu's 5.4, Debian's 5.10 and 6.1, without tcx, and 6.12), or for the kernels given
//! with `--kernel`. The VMs run through virtme-ng on the host's own root filesystem
//! (read-only), so the test executables built here run there unchanged. KVM is not
//! assumed: this machine kind cannot start it, so QEMU emulates (TCG).
//!
//! Each run also collects the verifier's statistics (tests/tests/verifier.rs writes one file
//! per kernel into `target/verifier-stats/`); they are merged into
//! `target/verifier-stats.json` and printed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{cargo, output, require_root, root_dir, run};

/// virtme-ng from PyPI, the version this was checked with.
const VIRTME_NG: &str = "virtme-ng==1.42";
/// What the VMs need from Debian: QEMU; busybox and udev for virtme-ng's initramfs and its
/// script I/O ports; kmod's depmod for the extracted modules; `file` to read an image's version;
/// curl for the pinned kernel's packages.
const APT_PACKAGES: [&str; 6] = ["qemu-system-x86", "busybox-static", "udev", "kmod", "file", "curl"];

/// A kernel of the default matrix.
struct MatrixKernel {
    label: &'static str,
    source: Source,
    why: &'static str,
    /// The test targets that run whole on this kernel by default; the others run the
    /// `SUBSET`.
    whole: &'static [&'static str],
    /// Whether the host's udevd works in this guest (see [`HIDE_UDEV`]).
    udev: bool,
}

/// Where a matrix kernel comes from.
enum Source {
    /// A Debian kernel package, found through a meta package of a Debian suite, looked up
    /// with a private apt configuration (target/vm/apt/SUITE), whatever the machine's own apt
    /// sources are.
    Debian { suite: &'static str, meta: &'static str },
    /// Exact packages, downloaded by URL and checked against their SHA-256: the image's
    /// package (`pkg`, which names the kernel's directory) and its modules'.
    Pinned { pkg: &'static str, debs: &'static [PinnedDeb] },
}

struct PinnedDeb {
    url: &'static str,
    sha256: &'static str,
}

/// Ubuntu 20.04's last 5.4 kernel in focal-updates (focal's standard support has ended, so
/// these files no longer change), from Ubuntu's pool: the image and the modules package that
/// holds veth, the bridge, netfilter, tc's ingress and 9p. No registry this project reaches
/// carries ELRepo's kernel-lt 5.4, which docs/kernel-upgrade.md puts on the user's nodes; this
/// is the same long-term line, with its verifier and helpers.
const UBUNTU_5_4: &[PinnedDeb] = &[
    PinnedDeb {
        url: "http://archive.ubuntu.com/ubuntu/pool/main/l/linux-signed/linux-image-5.4.0-216-generic_5.4.0-216.236_amd64.deb",
        sha256: "9ab123036173136d766f49cbcd7decb7ab3da629985abd2c7b12a733b1601514",
    },
    PinnedDeb {
        url: "http://archive.ubuntu.com/ubuntu/pool/main/l/linux/linux-modules-5.4.0-216-generic_5.4.0-216.236_amd64.deb",
        sha256: "6f8da7e233a20a6aafe9bb2c03d7394026a6253c5d5056a4be4d2264ab2e5f45",
    },
];

/// The default matrix: 5.4, the long-term line our users run (ELRepo's kernel-lt on CentOS
/// 7), then Debian's kernels.
const MATRIX: [MatrixKernel; 4] = [
    MatrixKernel {
        label: "5.4",
        source: Source::Pinned { pkg: "linux-image-5.4.0-216-generic", debs: UBUNTU_5_4 },
        why: "Ubuntu 20.04's 5.4, the long-term line of ELRepo's kernel-lt: the oldest verifier, no bpf_redirect_neigh, no tcx",
        // As on 5.10.
        whole: &["verifier", "pipeline", "packets"],
        udev: false,
    },
    MatrixKernel {
        label: "5.10",
        source: Source::Debian { suite: "bullseye", meta: "linux-image-amd64" },
        why: "Debian 11's kernel: an older verifier, no tcx, so the netlink clsact path",
        // The kernel's own verdicts (verifier, load paths, every packet test) run whole, the
        // namespace tests as the subset: the host runs them all with netlink forced. Every
        // test here took 15 to over 30 minutes under emulation, past what the suite can spend.
        whole: &["verifier", "pipeline", "packets"],
        udev: false,
    },
    MatrixKernel {
        label: "6.1",
        source: Source::Debian { suite: "bookworm", meta: "linux-image-amd64" },
        why: "Debian 12's kernel: no tcx, so the netlink clsact path",
        // As on 5.10: under emulation every namespace test costs minutes.
        whole: &["verifier", "pipeline", "packets"],
        udev: true,
    },
    MatrixKernel {
        label: "6.12",
        source: Source::Debian { suite: "bookworm", meta: "linux-image-6.12-amd64" },
        why: "Debian 12's newer kernel: tcx links",
        // The host (6.18) runs every test on tcx: here too the kernel's own verdicts whole.
        whole: &["verifier", "pipeline", "packets"],
        udev: true,
    },
];

/// The datapath test targets of `meshnet-tests` that run in the VMs. Others (config,
/// discovery, manifests) do not touch the kernel and run on the host only.
const GUEST_TESTS: [&str; 8] = ["verifier", "pipeline", "packets", "e2e", "agent", "datapath_log", "tunnel_packets", "tunnel"];

/// The subset run in each VM with `--quick-matrix`, and on a matrix kernel for the targets
/// its `whole` leaves out; a `--kernel PATH` guest runs every datapath test. The subset: the verifier's
/// statistics, loading with and without kernel BTF, both attach paths, every packet test
/// (`BPF_PROG_TEST_RUN`, no namespaces, fast), a redirected request with its reply in both
/// checksum modes, a held connection across agent restarts, and another tool's programs
/// beside meshnet's (netlink everywhere, tcx where the kernel has it), the logging build's
/// lines and rate limit (every matrix kernel has ring buffers), and tunnel mode: every
/// packet test of its programs (`BPF_PROG_TEST_RUN`), TCP both ways, 1 MB and ping
/// delivered with `bpf_redirect_neigh` (the default) under kube-proxy's INVALID drop, the refused tunnel packets, and the MTU cases on the FIB lookup
/// and `bpf_redirect` path of kernels before 5.10 (which no matrix kernel takes by itself)
/// with delivery through the stack, and redirected out of the pods' own ports (GSO packets
/// reach the pods whole). Each tunnel namespace test takes one to two minutes under
/// emulation: four of them.
const SUBSET: [(&str, &[&str]); 8] = [
    ("verifier", &[]),
    ("pipeline", &["tcx_pipeline", "netlink_pipeline", "loads_without_kernel_btf"]),
    ("packets", &[]),
    ("e2e", &["tcp_and_udp_reach_remote_pods_strict_checksums", "tcp_and_udp_reach_remote_pods_with_offload"]),
    (
        "agent",
        &[
            "held_connection_survives_restart_netlink",
            "held_connection_survives_restart_tcx",
            "foreign_programs_keep_working_netlink",
            "foreign_programs_keep_working_tcx",
        ],
    ),
    (
        "datapath_log",
        &[
            "the_default_object_has_no_ring_buffer_and_no_logging_instruction",
            "logs_a_new_flow_and_a_drop",
            "a_drop_flood_is_rate_limited_and_every_drop_accounted_for",
        ],
    ),
    ("tunnel_packets", &[]),
    (
        "tunnel",
        &[
            "flows_cross_under_kube_proxy",
            "foreign_and_spoofed_tunnel_packets_are_dropped_and_counted_stack",
            "mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_fib_lookup_stack",
            "mtu_tcp_mss_clamped_large_udp_fragmented_and_pmtu_discovered_redirect",
        ],
    ),
];

/// A guest that has run this long (three times what the slowest, 5.10, takes) is stopped and counted as failed, so that a hung guest cannot eat CI's 90 minutes.
const GUEST_TIMEOUT_MINUTES: u64 = 25;

/// The VM options of `cargo xtask test`.
#[derive(clap::Args, Debug, Default)]
pub struct VmArgs {
    /// Run the datapath tests in a VM booted on this kernel image (bzImage/vmlinuz) instead
    /// of the host suite and the default matrix. Its modules are taken from lib/modules/RELEASE
    /// in a directory above the image, as in an extracted kernel package. `5.4`, `5.10`, `6.1`
    /// and `6.12` name the default matrix's kernels. Repeatable.
    #[arg(long = "kernel", value_name = "VMLINUZ")]
    pub kernels: Vec<String>,
    /// Run only a subset of the datapath tests in the VMs (programs load with and without
    /// BTF, both attach paths, the packet tests, a redirected request and its reply, a held
    /// connection across agent restarts): about half the time.
    #[arg(long)]
    pub quick_matrix: bool,
    /// Only the host suite: no VMs.
    #[arg(long, conflicts_with_all = ["kernels", "quick_matrix"])]
    pub host_only: bool,
}

/// A kernel to boot.
#[derive(Debug, Clone)]
struct Kernel {
    /// Short name for output: `6.1`, or the release of a kernel given by path.
    label: String,
    image: PathBuf,
    /// The kernel's release, read from the image.
    release: String,
    /// A directory holding `lib/modules/RELEASE`, unless the kernel has no modules dir.
    mod_root: Option<PathBuf>,
    why: String,
    /// The test targets run whole (the others run `SUBSET`), unless `--quick-matrix`.
    whole: &'static [&'static str],
    /// Whether the guest runs the host's udevd; see [`HIDE_UDEV`].
    udev: bool,
}

/// Runs virtme-run (`$0`, its arguments after) with the host's udevd out of the guest's sight.
/// On 5.10 the host's systemd-udevd (Debian 12's, 252) never answers in the guest, and
/// virtme-ng-init's `udevadm settle` waits out its 300 s before going on without it: the
/// guest's script then runs on the console, as it does without udev. virtme-ng-init looks
/// for udevd only in `/usr/lib/systemd` (`/lib` is a link to it), so an empty, read-only
/// tmpfs there, in a mount namespace of virtme-run's own, skips udev; the host's mounts do
/// not change. Measured: the 5.10 guest reached its script after 350 s with udev, 32 s
/// without.
const HIDE_UDEV: &str = r#"mount -t tmpfs -o ro,mode=0755 meshnet-no-udev /usr/lib/systemd && exec "$0" "$@""#;

/// What one run (the host's or a guest's) counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Skip lines seen since the last "test result:" line.
    pending_skips: u64,
}

impl Counts {
    /// Reads one line of libtest's output (or of meshnet-tests' skip lines).
    pub fn scan(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(label).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok()))
                    .unwrap_or(0)
            };
            // A test that returned early for want of a kernel feature printed a skip line
            // before its binary's result line, which counts it as passed.
            let passed = num(" passed");
            let skips = self.pending_skips.min(passed);
            self.passed += passed - skips;
            self.skipped += num(" ignored") + skips;
            self.failed += num(" failed");
            self.pending_skips = 0;
        } else if line.contains("skipped: needs ") {
            // Anywhere in the line: with one test thread libtest has already printed
            // "test NAME ... " when the test prints this.
            self.pending_skips += 1;
        }
    }

    pub fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

fn kernels_dir() -> PathBuf {
    root_dir().join("target/vm/kernels")
}

fn stats_dir() -> PathBuf {
    root_dir().join("target/verifier-stats")
}

// ---------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------

fn missing_apt() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let installed = |name: &str| {
                output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
                    .is_some_and(|s| s.contains("install ok installed"))
            };
            // A dynamic busybox does for virtme-ng as well; never swap one for the other.
            !(installed(p) || (*p == "busybox-static" && installed("busybox")))
        })
        .collect()
}

/// `virtme-run`, on PATH or in the scripts directory of the python3 that pip installs into.
fn virtme_run() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("virtme-run")).collect::<Vec<_>>())
        .unwrap_or_default();
    let scripts = output(Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]))
        .map(|s| PathBuf::from(s.trim()).join("virtme-run"));
    let user = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/bin/virtme-run"));
    // (A pyenv shim can outlive the package it ran: the candidate must answer.)
    on_path.into_iter().chain(scripts).chain(user).find(|p| p.is_file() && output(Command::new(p).arg("--help")).is_some())
}

/// apt-get/apt-cache options for a private configuration reading only Debian's `suite` (and
/// its security updates), with its own package lists under target/vm/apt/SUITE.
fn apt_options(suite: &str) -> anyhow::Result<Vec<String>> {
    let dir = root_dir().join("target/vm/apt").join(suite);
    for d in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    let signed = if keyring.exists() { format!(" [signed-by={}]", keyring.display()) } else { String::new() };
    std::fs::write(
        dir.join("sources.list"),
        format!(
            "deb{signed} http://deb.debian.org/debian {suite} main\ndeb{signed} http://deb.debian.org/debian-security {suite}-security main\n"
        ),
    )?;
    Ok([
        ("Dir::Etc::sourcelist", dir.join("sources.list")),
        ("Dir::Etc::sourceparts", dir.join("sources.list.d")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ]
    .iter()
    .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={}", v.display())])
    .collect())
}

/// The Debian kernel image package a meta package of `suite` currently points at, e.g.
/// `linux-image-amd64` in bookworm -> `linux-image-6.1.0-56-amd64`.
fn debian_image_package(suite: &str, meta: &str) -> anyhow::Result<String> {
    let opts = apt_options(suite)?;
    let find = || {
        output(Command::new("apt-cache").args(&opts).args(["depends", "--no-recommends", "--no-suggests", meta])).and_then(
            |out| {
                out.lines()
                    .filter_map(|l| l.trim().strip_prefix("Depends: "))
                    .map(str::trim)
                    .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64") && !d.contains('<'))
                    .map(str::to_owned)
            },
        )
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // No package lists for this suite yet (a fresh checkout): fetch them.
    run(Command::new("apt-get").args(&opts).args(["update", "-q"]))
        .with_context(|| format!("apt-get update for Debian {suite}, to find its kernel packages"))?;
    find().with_context(|| format!("Debian {suite} has no kernel image behind {meta}"))
}

/// The release of a kernel package, from its name (`linux-image-6.1.0-56-amd64` -> `6.1.0-56-amd64`).
fn package_release(pkg: &str) -> &str {
    pkg.strip_prefix("linux-image-").unwrap_or(pkg)
}

/// Puts a kernel's packages, extracted, into target/vm/kernels/PKG (the machine's /boot and
/// /lib/modules stay untouched), unless it is there already: `download` fills the directory
/// it is given with the .deb files. Returns whether it fetched.
fn install_kernel(pkg: &str, origin: &str, download: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<bool> {
    let dir = kernels_dir().join(pkg);
    if dir.join(".complete").exists() {
        return Ok(false);
    }
    let release = package_release(pkg);
    let dl = kernels_dir().join(".download");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    println!("xtask: fetching {origin} {pkg} into {}", dir.display());
    download(&dl)?;
    let mut debs: Vec<PathBuf> =
        std::fs::read_dir(&dl)?.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "deb")).collect();
    debs.sort();
    if debs.is_empty() {
        bail!("downloading {pkg} left no .deb");
    }
    let partial = kernels_dir().join(format!("{pkg}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    for deb in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial)).with_context(|| format!("extracting {}", deb.display()))?;
    }
    // The package's postinst would run depmod; modprobe in the guest needs modules.dep.
    run(Command::new("depmod").arg("-b").arg(&partial).arg(release)).context("depmod for the extracted modules")?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir)?;
    std::fs::write(dir.join(".complete"), format!("{pkg}\n"))?;
    let _ = std::fs::remove_dir_all(&dl);
    Ok(true)
}

/// A Debian kernel package, with apt-get from Debian's `suite`.
fn fetch_debian_kernel(suite: &str, pkg: &str) -> anyhow::Result<bool> {
    install_kernel(pkg, "Debian's", |dl| {
        run(Command::new("apt-get")
            .args(apt_options(suite)?)
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", pkg])
            .current_dir(dl))
        .with_context(|| format!("apt-get download {pkg}"))
    })
}

/// A pinned kernel's packages, by URL, each checked against its SHA-256.
fn fetch_pinned_kernel(pkg: &str, debs: &[PinnedDeb]) -> anyhow::Result<bool> {
    install_kernel(pkg, "the pinned", |dl| {
        for deb in debs {
            let name = deb.url.rsplit('/').next().unwrap_or("package.deb");
            let file = dl.join(name);
            run(Command::new("curl").args(["-fsSL", "--retry", "3", "-o"]).arg(&file).arg(deb.url))
                .with_context(|| format!("downloading {}", deb.url))?;
            let sum = output(Command::new("sha256sum").arg(&file)).unwrap_or_default();
            let got = sum.split_whitespace().next().unwrap_or("");
            if got != deb.sha256 {
                let _ = std::fs::remove_file(&file);
                bail!("{name}: SHA-256 {got}, expected {}: refusing it", deb.sha256);
            }
        }
        Ok(())
    })
}

impl MatrixKernel {
    /// The kernel's image package, which names its directory under target/vm/kernels.
    fn package(&self) -> anyhow::Result<String> {
        match self.source {
            Source::Debian { suite, meta } => debian_image_package(suite, meta),
            Source::Pinned { pkg, .. } => Ok(pkg.to_string()),
        }
    }

    /// Fetches the kernel unless it is there; whether it fetched.
    fn fetch(&self, pkg: &str) -> anyhow::Result<bool> {
        match self.source {
            Source::Debian { suite, .. } => fetch_debian_kernel(suite, pkg),
            Source::Pinned { pkg, debs } => fetch_pinned_kernel(pkg, debs),
        }
    }

    fn origin(&self) -> String {
        match self.source {
            Source::Debian { suite, .. } => format!("Debian {suite}"),
            Source::Pinned { .. } => "pinned".to_string(),
        }
    }
}

/// The default matrix's kernels as they are cached (no fetching), with whether each is there.
fn matrix_state() -> anyhow::Result<Vec<(&'static str, String, bool)>> {
    MATRIX
        .iter()
        .map(|m| {
            let pkg = m.package()?;
            let there = kernels_dir().join(&pkg).join(".complete").exists();
            Ok((m.label, pkg, there))
        })
        .collect()
}

/// Whether anything the VMs need is missing.
pub fn missing() -> bool {
    !missing_apt().is_empty() || virtme_run().is_none() || matrix_state().map_or(true, |m| m.iter().any(|(_, _, there)| !there))
}

/// Installs what the VMs need: QEMU and friends from Debian, virtme-ng from PyPI, and the
/// matrix's kernels (downloaded with apt-get and extracted under target/vm/kernels). Returns
/// what it did, for `cargo xtask setup` to report.
pub fn setup(is_root: bool) -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    let apt = missing_apt();
    if !apt.is_empty() {
        let cmd = format!("apt-get update && apt-get install -y {}", apt.join(" "));
        if !is_root {
            bail!("the kernel-matrix VMs need the Debian packages {}: run as root `{cmd}`", apt.join(", "));
        }
        println!("xtask setup: installing Debian packages for the kernel-matrix VMs: {}", apt.join(" "));
        run(Command::new("apt-get").args(["update", "-q"])).with_context(|| format!("apt-get update failed; run `{cmd}` by hand"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install failed; run `{cmd}` by hand"))?;
        did.push(format!("Debian packages {}", apt.join(", ")));
    }
    if virtme_run().is_none() {
        println!("xtask setup: installing {VIRTME_NG} from PyPI (python3 -m pip install {VIRTME_NG})");
        let pip = |extra: &[&str]| {
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(extra)
                .arg(VIRTME_NG)
                .status()
                .is_ok_and(|s| s.success())
        };
        // A Debian python3 refuses system-wide pip installs (PEP 668) unless told.
        if !pip(&[]) && !pip(&["--break-system-packages"]) {
            bail!(
                "could not install {VIRTME_NG} with pip; install it by hand (`python3 -m pip install {VIRTME_NG}`, \
                 or `apt-get install python3-pip` first)"
            );
        }
        if virtme_run().is_none() {
            bail!("{VIRTME_NG} is installed but its `virtme-run` is neither on PATH nor in python3's scripts directory");
        }
        did.push(VIRTME_NG.to_string());
    }
    if !is_root {
        bail!("fetching the matrix's kernels needs root (apt-get)");
    }
    let mut keep = Vec::new();
    for m in &MATRIX {
        let pkg = m.package()?;
        if m.fetch(&pkg)? {
            did.push(format!("kernel {} ({pkg}, {}) in target/vm/kernels", m.label, m.origin()));
        }
        keep.push(pkg);
    }
    // Older kernels of the matrix (Debian moved on): 0.5 GB each.
    if let Ok(entries) = std::fs::read_dir(kernels_dir()) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("linux-image-") && !keep.contains(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(did)
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

/// The release string of an x86 bzImage, from its setup header (`kernel_version`).
fn image_release(image: &Path) -> anyhow::Result<String> {
    let mut head = vec![0u8; 0x10000 + 0x200];
    let mut f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if head.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} is not an x86 bzImage (no HdrS setup header)", image.display());
    }
    let off = usize::from(u16::from_le_bytes([head[0x20e], head[0x20f]])) + 0x200;
    let s = head.get(off..).context("kernel_version offset past the header")?;
    let s = &s[..s.iter().position(|b| *b == 0).unwrap_or(s.len())];
    String::from_utf8_lossy(s).split_whitespace().next().map(str::to_owned).context("empty kernel version string")
}

/// The directory above `image` that holds `lib/modules/RELEASE` (as in an extracted package,
/// or `/` for an installed kernel).
fn find_mod_root(image: &Path, release: &str) -> Option<PathBuf> {
    let start = image.canonicalize().ok()?;
    start
        .ancestors()
        .skip(1)
        .find(|d| d.join("lib/modules").join(release).is_dir() || d.join("usr/lib/modules").join(release).is_dir())
        .map(|d| if d.join("lib/modules").join(release).is_dir() { d.to_path_buf() } else { d.join("usr") })
}

fn kernel_from_image(label: String, image: &Path, why: String) -> anyhow::Result<Kernel> {
    let image = image.canonicalize().with_context(|| format!("kernel image {}", image.display()))?;
    let release = image_release(&image)?;
    let label = if label.is_empty() { release.clone() } else { label };
    let mod_root = find_mod_root(&image, &release);
    if mod_root.is_none() {
        println!(
            "xtask: warning: no lib/modules/{release} above {}: the guest gets only what is built into the kernel",
            image.display()
        );
    }
    Ok(Kernel { label, image, release, mod_root, why, whole: &GUEST_TESTS, udev: true })
}

fn matrix_kernel(label: &str) -> anyhow::Result<Kernel> {
    let m = MATRIX.iter().find(|m| m.label == label).context("not a matrix kernel")?;
    let pkg = m.package()?;
    m.fetch(&pkg)?;
    let release = package_release(&pkg);
    let image = kernels_dir().join(&pkg).join("boot").join(format!("vmlinuz-{release}"));
    Ok(Kernel { whole: m.whole, udev: m.udev, ..kernel_from_image(label.to_string(), &image, format!("{} ({pkg})", m.why))? })
}

fn resolve_kernels(vm: &VmArgs) -> anyhow::Result<Vec<Kernel>> {
    if vm.host_only {
        return Ok(Vec::new());
    }
    if vm.kernels.is_empty() {
        return MATRIX.iter().map(|m| matrix_kernel(m.label)).collect();
    }
    vm.kernels
        .iter()
        .map(|k| {
            let path = Path::new(k);
            if !path.exists() {
                if let Some(label) = MATRIX.iter().map(|m| m.label).find(|l| k == l || k.strip_prefix("debian-") == Some(l)) {
                    return matrix_kernel(label);
                }
                bail!("--kernel {k}: no such file (give a kernel image, or one of {})", MATRIX.map(|m| m.label).join(", "));
            }
            // Labelled by its release, read from the image.
            kernel_from_image(String::new(), path, "given with --kernel".to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Running a guest
// ---------------------------------------------------------------------------------------

/// The datapath test executables, built on the host (the host run built them already).
fn test_executables() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let out = cargo("test")
        // The workspace's features, as the host suite builds them (see `prepare_tests`).
        .args(["--no-run", "--workspace", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test executables failed");
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let ours = msg["manifest_path"].as_str().is_some_and(|p| Path::new(p) == root_dir().join("tests/Cargo.toml"));
        if msg["reason"] != "compiler-artifact" || msg["target"]["kind"] != serde_json::json!(["test"]) || !ours {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) else { continue };
        if GUEST_TESTS.contains(&name) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for t in GUEST_TESTS {
        if !found.contains_key(t) {
            bail!("cargo built no test executable `{t}` in meshnet-tests");
        }
    }
    Ok(found)
}

/// Single-quotes `s` for sh.
fn q(s: impl AsRef<std::ffi::OsStr>) -> String {
    format!("'{}'", s.as_ref().to_string_lossy().replace('\'', r"'\''"))
}

/// The script the guest runs first (in the VM's own root, the host's through uncached 9p):
/// modules, then a page-cached view of the host's root to chroot into (uncached 9p makes every
/// exec of a 100 MB test binary cost seconds under emulation), then the tests.
const GUEST_PRELUDE: &str = r#"
# Everything goes to a file in the read-write run directory, which the host follows: the
# console sometimes loses a 5.10 guest's whole output.
exec >>"$OUT/log" 2>&1
echo "guest: kernel $(uname -r), $(nproc) CPUs, clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource), booted in $(cut -d' ' -f1 /proc/uptime)s"
uname -r > "$OUT/uname"
dmesg > "$OUT/dmesg" 2>&1
# The kernel's own module requests (veth, bridge, clsact, cls_bpf, nf_tables...) must find this
# kernel's modules, which are not under the host's /lib/modules: point modprobe at them.
MODPROBE=/sbin/modprobe
if [ -n "$MODROOT" ]; then
    mkdir -p /run/meshnet-vm
    printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$MODROOT" > /run/meshnet-vm/modprobe
    chmod 755 /run/meshnet-vm/modprobe
    echo /run/meshnet-vm/modprobe > /proc/sys/kernel/modprobe
    MODPROBE=/run/meshnet-vm/modprobe
fi
absent=""
for m in veth bridge sch_ingress cls_bpf nf_tables nft_chain_nat nft_compat xt_MASQUERADE xt_conntrack xt_nat; do
    $MODPROBE -q "$m" 2>/dev/null || absent="$absent $m"
done
[ -z "$absent" ] || echo "guest: not loadable as modules (built in, or missing):$absent"
R=/run/meshnet-vm/root
mkdir -p $R
if mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro,access=any meshnet_root $R; then
    mount -t proc proc $R/proc
    mount -t sysfs sysfs $R/sys
    mount --rbind /dev $R/dev
    mount -t tmpfs -o mode=755 tmpfs $R/run
else
    echo "guest: no cached 9p view of the root; running on the uncached one (slow)"
    R=/
fi
mount -t bpf bpf $R/sys/fs/bpf 2>/dev/null || true
# A writable /tmp, unless the checkout itself lives under /tmp: then TMPDIR (a directory on
# the tmpfs /run) is where the tests' temporary files go.
case "$REPO/" in
    /tmp/*) echo "guest: the checkout is under /tmp: leaving /tmp read-only, TMPDIR=/run/tmp" ;;
    *) mount -t tmpfs -o mode=1777 tmpfs $R/tmp ;;
esac
mkdir -p $R/run/netns $R/run/tmp
chmod 1777 $R/run/tmp
if [ "$R" != / ]; then
    mount --bind "$OUT" "$R$OUT"
    mount --bind "$STATS" "$R$STATS"
fi
iptables -V 2>/dev/null | sed 's/^/guest: /'
exec chroot $R /bin/sh "$OUT/tests.sh"
"#;

const GUEST_TESTS_HEAD: &str = r#"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export TMPDIR=/run/tmp
export RUST_BACKTRACE=1
# The packet tests' random-mutation sweep: 1,000,000 on the host; under emulation each
# TEST_RUN costs a hundred times more, and what a guest adds is its kernel's verdicts on
# the same program, which 50,000 cover.
export MESHNET_MUTATIONS=50000
# The agent soak (held flows across restarts): 1,000 TCP, 200 UDP and 20 restarts on the
# host; the guests check the same on their attach path at a tenth of the flows.
export MESHNET_SOAK=100,20,4
# explain against the program: 4 rounds of 200 packets (16 on the host); random tuples
# through veth with partial checksums: 1,000 (10,000 on the host); flows held through a
# stalled gateway: 10 (100 on the host).
export MESHNET_DIFF_ROUNDS=4 MESHNET_TUPLES=1000 MESHNET_STALL_HELD=10
ip link set lo up
status=0
run_tests() {
    name=$1
    shift
    echo "==> $name"
    start=$(date +%s)
    "$@" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" >> "$OUT/results"
    echo "==> $name: exit $rc in $(( $(date +%s) - start ))s"
    [ "$rc" = 0 ] || status=1
}
"#;

/// What a guest run left.
struct GuestResult {
    kernel: Kernel,
    uname: String,
    counts: Counts,
    ok: bool,
    secs: u64,
    per_target: Vec<(String, String, u64)>,
}

fn run_guest(
    virtme: &Path,
    k: &Kernel,
    exes: &BTreeMap<String, PathBuf>,
    env: &[(&str, PathBuf)],
    quick: bool,
    extra: &[String],
) -> anyhow::Result<GuestResult> {
    let out = root_dir().join("target/vm/runs").join(&k.release);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let stats = stats_dir();
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get).clamp(1, 4);

    let mut head = String::from("#!/bin/sh\n# Generated by `cargo xtask test` (xtask/src/vm.rs); runs inside the VM.\nset -u\n");
    writeln!(head, "REPO={}\nOUT={}\nSTATS={}", q(root_dir()), q(&out), q(&stats))?;
    writeln!(head, "MODROOT={}", q(k.mod_root.as_deref().map(Path::as_os_str).unwrap_or_default()))?;
    std::fs::write(out.join("guest.sh"), format!("{head}{GUEST_PRELUDE}"))?;

    // Copies of the executables, so that a rebuild on the host while the guest runs cannot
    // change them under the guest. Outside the run directory: that one is the guest's
    // uncached read-write mount. Without their debug info: a debug test binary is 90 %
    // DWARF, and every byte of an exec crosses 9p under emulation. eBPF objects are linked
    // as they are.
    let bin = root_dir().join("target/vm/bin").join(&k.release);
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin)?;
    let snapshot = |name: &str, src: &Path| -> anyhow::Result<PathBuf> {
        let dst = bin.join(name);
        let is_object = src.extension().is_some_and(|e| e == "o");
        let stripped = !is_object
            && Command::new("objcopy").arg("--strip-debug").arg(src).arg(&dst).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !stripped {
            let _ = std::fs::remove_file(&dst);
            if std::fs::hard_link(src, &dst).is_err() {
                std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
            }
        }
        Ok(dst)
    };
    let mut tests = head.clone();
    for (var, val) in env {
        let name = val.file_name().map_or_else(|| (*var).to_string(), |n| n.to_string_lossy().into_owned());
        writeln!(tests, "export {var}={}", q(snapshot(&name, val)?))?;
    }
    writeln!(tests, "export MESHNET_VERIFIER_STATS_DIR={}", q(&stats))?;
    tests.push_str(GUEST_TESTS_HEAD);
    writeln!(tests, "cd {}", q(root_dir().join("tests")))?;
    for name in GUEST_TESTS {
        let full = !quick && k.whole.contains(&name);
        let filters: &[&str] = if full || !extra.is_empty() { &[] } else { SUBSET.iter().find(|(n, _)| *n == name).map_or(&[], |s| s.1) };
        if !full && extra.is_empty() && !SUBSET.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let mut line = format!("run_tests {name} {} --test-threads={cpus}", q(snapshot(name, &exes[name])?));
        if !filters.is_empty() {
            line.push_str(" --exact");
            for f in filters {
                write!(line, " {}", q(f))?;
            }
        }
        for a in extra {
            write!(line, " {}", q(a))?;
        }
        writeln!(tests, "{line}")?;
    }
    // The guest's verdict, in a file: without udev (see HIDE_UDEV) virtme-run cannot pass
    // the script's exit code back, so the host reads this instead.
    tests.push_str("echo \"$status\" > \"$OUT/status\"\nexit $status\n");
    std::fs::write(out.join("tests.sh"), tests)?;

    let mut cmd = if k.udev {
        Command::new(virtme)
    } else {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c", HIDE_UDEV]).arg(virtme);
        c
    };
    cmd.arg("--kimg")
        .arg(&k.image)
        .args(["--mods", if k.mod_root.is_some() { "auto" } else { "none" }])
        .args(["--disable-kvm", "--memory", "4G", "--cpus", &cpus.to_string()])
        // Under emulation, page-table isolation and an HPET clock make every syscall and every
        // clock read expensive; these guests run nothing but our tests.
        .args(["-a", "mitigations=off", "-a", "clocksource=tsc", "-a", "tsc=reliable"])
        .arg(format!("--rwdir={}", out.display()))
        .arg(format!("--rwdir={}", stats.display()))
        .args(["--script-sh", &format!("sh {}", q(out.join("guest.sh")))])
        // A second, page-cached 9p export of the root for the guest to chroot into.
        .args([
            "--qemu-opts",
            "-fsdev",
            "local,id=meshnet_root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=meshnet_root,mount_tag=meshnet_root",
        ])
        .current_dir(root_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout stops virtme-run and its QEMU together.
        .process_group(0);
    println!("\n==> VM {}: kernel {} ({})", k.label, k.release, k.why);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", virtme.display()))?;
    let pgid = i32::try_from(child.id()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, timed_out) = (done.clone(), timed_out.clone());
        std::thread::spawn(move || {
            while started.elapsed() < Duration::from_secs(GUEST_TIMEOUT_MINUTES * 60) {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            timed_out.store(true, Ordering::Relaxed);
            // SAFETY: kill(2) on the process group this function created.
            unsafe { libc_kill(-pgid, 9) };
        })
    };
    let tag = format!("[{}]", k.label);
    let err_reader = {
        let stderr = child.stderr.take().unwrap();
        let tag = tag.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{tag} {line}");
            }
        })
    };
    let follower = {
        let (done, tag, log) = (done.clone(), tag.clone(), out.join("log"));
        std::thread::spawn(move || follow_guest_log(&log, &tag, &done))
    };
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        println!("{tag} {}", line?);
    }
    let exit = child.wait()?;
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let counts = follower.join().unwrap_or_default();
    let _ = err_reader.join();
    let secs = started.elapsed().as_secs();
    let uname = std::fs::read_to_string(out.join("uname")).map(|s| s.trim().to_string()).unwrap_or_default();
    let per_target = std::fs::read_to_string(out.join("results"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect();
    if timed_out.load(Ordering::Relaxed) {
        println!("{tag} stopped after {secs}s: over the guest time limit");
    }
    if uname.is_empty() {
        println!("{tag} the guest never started its script ({exit})");
    }
    let verdict = std::fs::read_to_string(out.join("status")).map(|s| s.trim().to_string()).unwrap_or_default();
    if verdict.is_empty() {
        println!("{tag} the guest's script did not finish ({exit})");
    } else if !exit.success() && verdict == "0" {
        println!("{tag} virtme-run said {exit}; the guest's script finished with status 0");
    }
    let ok = verdict == "0" && counts.failed == 0 && !timed_out.load(Ordering::Relaxed) && !uname.is_empty();
    Ok(GuestResult { kernel: k.clone(), uname, counts, ok, secs, per_target })
}

/// Prints the guest's log (OUT/log) line by line as it grows, counting test results, until
/// `done` is set; then reads what is left and returns the counts.
fn follow_guest_log(log: &Path, tag: &str, done: &AtomicBool) -> Counts {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut counts = Counts::default();
    let (mut offset, mut pending) = (0u64, Vec::new());
    loop {
        let finished = done.load(Ordering::Relaxed);
        if let Ok(mut f) = std::fs::File::open(log) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                if let Ok(n) = f.read_to_end(&mut pending) {
                    offset += n as u64;
                }
            }
        }
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..nl]);
            println!("{tag} {line}");
            counts.scan(&line);
        }
        if finished {
            if !pending.is_empty() {
                let line = String::from_utf8_lossy(&pending);
                println!("{tag} {line}");
                counts.scan(&line);
            }
            return counts;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

// ---------------------------------------------------------------------------------------
// Verifier statistics
// ---------------------------------------------------------------------------------------

/// Merges the per-kernel statistics files into target/verifier-stats.json, prints them, and
/// fails if a program takes more than a quarter of the verifier's budget.
fn merge_verifier_stats(host_release: &str, guests: &[GuestResult]) -> anyhow::Result<()> {
    let mut kernels = Vec::new();
    let mut table = String::new();
    let mut over = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(stats_dir())
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let mut doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f)?).with_context(|| format!("parsing {}", f.display()))?;
        let release = doc["kernel"].as_str().unwrap_or_default().to_string();
        let ran_on = if release == host_release {
            "host".to_string()
        } else {
            guests.iter().find(|g| g.uname == release).map_or_else(|| "vm".to_string(), |g| format!("vm {}", g.kernel.label))
        };
        doc["ranOn"] = ran_on.clone().into();
        for p in doc["programs"].as_array().cloned().unwrap_or_default() {
            let processed = p["processedInsns"].as_u64().unwrap_or(0);
            let limit = p["insnLimit"].as_u64().unwrap_or(1).max(1);
            #[allow(clippy::cast_precision_loss)]
            let share = 100.0 * processed as f64 / limit as f64;
            let stack: Vec<String> =
                p["stackDepth"].as_array().map(|a| a.iter().map(ToString::to_string).collect()).unwrap_or_default();
            writeln!(
                table,
                "  {:<24} {:<9} {:<18} {:>10} {:>8.2}% {:>8}",
                release,
                if ran_on == "host" { "host" } else { "vm" },
                p["program"].as_str().unwrap_or("?"),
                processed,
                share,
                stack.join("+")
            )?;
            if processed * 4 > limit {
                over.push(format!("{} on {release}: {processed} of {limit}", p["program"].as_str().unwrap_or("?")));
            }
        }
        kernels.push(doc);
    }
    let merged = serde_json::json!({
        "generatedBy": "cargo xtask test",
        "budget": "a program may make the verifier process at most 25% of its instruction limit",
        "kernels": kernels,
    });
    let path = root_dir().join("target/verifier-stats.json");
    std::fs::write(&path, serde_json::to_string_pretty(&merged)? + "\n")?;
    println!("\nverifier statistics ({}):", path.display());
    println!("  {:<24} {:<9} {:<18} {:>10} {:>9} {:>8}", "KERNEL", "RAN ON", "PROGRAM", "PROCESSED", "OF LIMIT", "STACK");
    print!("{table}");
    if !over.is_empty() {
        bail!("over a quarter of the verifier's budget: {}", over.join("; "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// cargo xtask test
// ---------------------------------------------------------------------------------------

/// `cargo xtask test`: the host suite (through `host`, main.rs's test), then the datapath
/// tests in a VM per kernel, then the verifier statistics of all of them.
pub fn test(args: &[String], vm: &VmArgs, host: fn(&[String]) -> anyhow::Result<Counts>) -> anyhow::Result<()> {
    require_root("test")?;
    let started = Instant::now();
    let run_host = vm.kernels.is_empty();
    let run_vms = !vm.host_only;
    if run_vms && missing() {
        super::setup()?;
    }
    let _ = std::fs::remove_dir_all(stats_dir());
    std::fs::create_dir_all(stats_dir())?;
    // Read by tests/tests/verifier.rs, on the host and (passed on) in the guests.
    std::env::set_var("MESHNET_VERIFIER_STATS_DIR", stats_dir());

    let mut total = Counts::default();
    let mut host_secs = 0;
    if run_host {
        let t = Instant::now();
        // A failing host suite stops here: the VMs would take long to say little more.
        total.add(host(args)?);
        host_secs = t.elapsed().as_secs();
    } else {
        super::prepare_tests()?;
        super::build_ebpf_variant(Some("upgrade-canary"))?;
        super::build_static()?;
    }

    let mut guests = Vec::new();
    let kernels = resolve_kernels(vm)?;
    if !kernels.is_empty() {
        let virtme = virtme_run().context("virtme-run not found; run `cargo xtask setup`")?;
        let exes = test_executables()?;
        let env = [
            // The shipped artifact: also the smallest to load and the fastest to start under
            // emulation.
            ("MESHNET_BIN", root_dir().join("target").join(super::STATIC_TARGET).join("release/meshnet")),
            ("MESHNET_UPGRADE_OBJECT", root_dir().join("target/ebpf/meshnet-upgrade-canary.bpf.o")),
        ];
        for (_, p) in &env {
            if !p.exists() {
                bail!("{} is missing", p.display());
            }
        }
        for k in &kernels {
            let g = run_guest(&virtme, k, &exes, &env, vm.quick_matrix, args)?;
            total.add(g.counts);
            if !g.ok && g.counts.failed == 0 {
                total.failed += 1;
            }
            guests.push(g);
        }
    }

    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let stats = merge_verifier_stats(&host_release, &guests);

    println!("\nkernel matrix:");
    if run_host {
        println!("  host {host_release:<28} {:<7} {host_secs:>5}s  attach: {}", "ok", attach_path(&host_release));
    }
    for g in &guests {
        let c = g.counts;
        println!(
            "  vm   {:<28} {:<7} {:>5}s  attach: {}  ({} passed, {} failed, {} skipped; {})",
            if g.uname.is_empty() { &g.kernel.release } else { &g.uname },
            if g.ok { "ok" } else { "FAILED" },
            g.secs,
            attach_path(&g.kernel.release),
            c.passed,
            c.failed,
            c.skipped,
            if !args.is_empty() {
                "the datapath tests matching the filter"
            } else if vm.quick_matrix {
                "the --quick-matrix subset"
            } else if g.kernel.whole.len() < GUEST_TESTS.len() {
                "the kernel's own verdicts whole, the namespace tests as the subset"
            } else {
                "every datapath test"
            }
        );
        for (name, rc, secs) in &g.per_target {
            println!("         {name:<10} exit {rc:<3} {secs:>5}s");
        }
    }
    println!("  total {}s", started.elapsed().as_secs());
    println!("\nsummary: {} passed, {} failed, {} skipped", total.passed, total.failed, total.skipped);
    let failed: Vec<&str> = guests.iter().filter(|g| !g.ok).map(|g| g.kernel.label.as_str()).collect();
    if !failed.is_empty() {
        bail!("the datapath tests failed on kernel {}", failed.join(", "));
    }
    stats?;
    if total.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The attach path `meshnet agent --attach-mode auto` takes on a kernel release.
fn attach_path(release: &str) -> &'static str {
    let mut nums = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if (major, minor) >= (6, 6) {
        "tcx"
    } else {
        "netlink clsact"
    }
}
