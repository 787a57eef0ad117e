//! `meshnet doctor`: checks that this node can run meshnet, one line per check, with a fix
//! for each problem.
//!
//! Each check's verdict is a pure function of what was read (kernel release, `CapEff`,
//! `iptables-save` text, probe results), so that the judgement is unit-tested; [`run`] does
//! the reading. Kernel problems point at docs/kernel-upgrade.md.

use std::{
    fmt::{self, Write as _},
    net::Ipv4Addr,
    path::Path,
    process::Command,
};

use aya::{maps::MapType, programs::ProgramType};
use ipnet::Ipv4Net;
use meshnet_common::{names, Counter};
use serde::Serialize;

use crate::{config::RawConfig, datapath, netlink, pins::Pins};

const KERNEL_DOC: &str = "see docs/kernel-upgrade.md";

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Level::Ok => "OK",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One check: what was looked at, how it came out, and how to fix a problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, level: Level, detail: impl Into<String>) -> Self {
        Self { name: name.into(), level, detail: detail.into(), fix: None }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Renders the checks, one line each (a problem's fix on the next line), and a summary.
#[must_use]
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(out, "{:<4}  {}: {}", c.level, c.name, c.detail);
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "      fix: {fix}");
        }
    }
    let count = |l: Level| checks.iter().filter(|c| c.level == l).count();
    let _ = writeln!(
        out,
        "{} ok, {} info, {} warnings, {} failures",
        count(Level::Ok),
        count(Level::Info),
        count(Level::Warn),
        count(Level::Fail)
    );
    out
}

/// Whether any check failed (the exit status is then non-zero).
#[must_use]
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.level == Level::Fail)
}

/// Runs every check. With `config`, also checks the config and what it refers to on this
/// node.
#[must_use]
pub fn run(pins: &Pins, config: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string());
    let kernel = release.as_ref().ok().and_then(|r| KernelRelease::parse(r));
    checks.push(match &release {
        Ok(r) => kernel_check(r),
        Err(e) => Check::new("kernel version", Level::Warn, format!("cannot read /proc/sys/kernel/osrelease: {e}")),
    });
    checks.push(btf_check(Path::new("/sys/kernel/btf/vmlinux").exists()));
    for (what, ty, since) in [
        ("LPM trie (remote CIDRs)", MapType::LpmTrie, "4.11"),
        ("hash (flow state, peers)", MapType::Hash, "3.19"),
        ("per-CPU array (counters)", MapType::PerCpuArray, "4.6"),
    ] {
        let r = aya::sys::is_map_supported(ty).map_err(|e| format!("{:#}", anyhow::Error::from(e)));
        checks.push(probe_check(&format!("map type {what}"), since, r));
    }
    let r = aya::sys::is_program_supported(ProgramType::SchedClassifier)
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
    checks.push(probe_check("program type SchedClassifier (tc)", "4.1", r));
    checks.push(attach_check(kernel));
    checks.push(datapath_log_check(
        aya::sys::is_map_supported(MapType::RingBuf).map_err(|e| format!("{:#}", anyhow::Error::from(e))),
    ));
    checks.push(bpffs_check(pins));
    checks.extend(pin_dir_check(pins));
    checks.push(pins_check(pins));
    if let Some(c) = flow_table_check(pins) {
        checks.push(c);
    }
    let status = std::fs::read_to_string("/proc/self/status").ok();
    checks.push(caps_check(status.as_deref().and_then(parse_cap_eff), kernel));
    if let Some(path) = config {
        config_checks(path, &mut checks);
    }
    checks
}

/// A kernel release, as in `uname -r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelRelease {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelRelease {
    #[must_use]
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }

    /// Parses the leading `MAJOR.MINOR[.PATCH]` of a release such as `6.1.0-18-amd64` or
    /// `3.10.0-862.el7.x86_64`.
    #[must_use]
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.trim().splitn(3, '.');
        let num = |s: Option<&str>| -> Option<u32> {
            let s = s?;
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok()
        };
        let major = num(parts.next())?;
        let minor = num(parts.next())?;
        let patch = num(parts.next()).unwrap_or(0);
        Some(Self { major, minor, patch })
    }
}

impl fmt::Display for KernelRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The oldest kernel meshnet runs on: clsact with direct action (4.5), LPM trie (4.11),
/// LRU hash (4.10), bounded loops (5.3); 5.4 is the first LTS with all of them.
pub const MIN_KERNEL: KernelRelease = KernelRelease::new(5, 4, 0);
/// The 5.4 stable release that brought 5.5's verifier reading of read-only data ("bpf: Track
/// contents of read-only maps as scalars"), which prunes the branches a load-time constant
/// rules out. Before it the verifier walks them too, and refuses the programs' calls to the
/// 5.10 helpers a 5.4 kernel lacks, on a branch that would never run.
pub const RODATA_5_4: KernelRelease = KernelRelease::new(5, 4, 144);
/// tcx links.
pub const TCX_KERNEL: KernelRelease = KernelRelease::new(6, 6, 0);
/// `CAP_BPF` and `CAP_PERFMON`.
pub const CAP_BPF_KERNEL: KernelRelease = KernelRelease::new(5, 8, 0);

#[must_use]
pub fn kernel_check(release: &str) -> Check {
    const NAME: &str = "kernel version";
    let Some(k) = KernelRelease::parse(release) else {
        return Check::new(NAME, Level::Warn, format!("cannot parse the kernel release {release:?}"))
            .fix(format!("check by hand that the kernel is 5.4 or newer; {KERNEL_DOC}"));
    };
    if k < MIN_KERNEL {
        let why = if k.major < 4 {
            format!(
                "{release} is far older than 5.4: meshnet needs tc clsact direct-action programs, LPM-trie and \
                 LRU-hash maps and bounded loops (5.3), none of which a 3.x kernel (such as CentOS 7's 3.10) has, \
                 so it cannot run meshnet at all"
            )
        } else {
            format!(
                "{release} is older than 5.4: meshnet's programs use bounded loops (5.3) and LPM-trie and LRU-hash \
                 maps; 5.4 is the oldest kernel it supports"
            )
        };
        return Check::new(NAME, Level::Fail, why)
            .fix(format!("upgrade the node's kernel to 5.4 or newer (6.6 or newer for tcx links); {KERNEL_DOC}"));
    }
    if k.major == 5 && k.minor == 4 && k < RODATA_5_4 {
        // A warning, not a failure: a distribution may freeze the number it shows and backport
        // the fix (Ubuntu 20.04's 5.4.0-NNN carries it since late 2021; Oracle's UEK shows 5.4.17).
        return Check::new(
            NAME,
            Level::Warn,
            format!(
                "{release} shows a 5.4 older than 5.4.144: unless its distribution backported it, the verifier \
                 does not read read-only data, walks the branches meshnet's load-time constants rule out, and \
                 refuses their calls to helpers of 5.10, so the programs do not load"
            ),
        )
        .fix(format!("if the agent cannot load its programs (`unknown func`), use 5.4.144 or newer (ELRepo's kernel-lt is), or 5.10 or newer; {KERNEL_DOC}"));
    }
    Check::new(NAME, Level::Ok, format!("{release} (5.4 or newer)"))
}

#[must_use]
pub fn btf_check(present: bool) -> Check {
    const NAME: &str = "kernel BTF";
    if present {
        Check::new(NAME, Level::Ok, "/sys/kernel/btf/vmlinux present (meshnet does not need it)")
    } else {
        Check::new(
            NAME,
            Level::Info,
            "/sys/kernel/btf/vmlinux absent; meshnet does not need it (its object has no CO-RE relocations)",
        )
    }
}

/// A feature probe's outcome: `Ok(supported)` or why probing failed.
#[must_use]
pub fn probe_check(name: &str, since: &str, probed: Result<bool, String>) -> Check {
    match probed {
        Ok(true) => Check::new(name, Level::Ok, "supported"),
        Ok(false) => Check::new(name, Level::Fail, format!("not supported by this kernel (it came in {since})"))
            .fix(format!("use a kernel of 5.4 or newer built with CONFIG_BPF_SYSCALL and CONFIG_NET_CLS_BPF; {KERNEL_DOC}")),
        Err(e) => Check::new(name, Level::Warn, format!("could not probe: {e}"))
            .fix("run `meshnet doctor` as root, or with the capabilities the agent gets, so that it can create test maps and programs"),
    }
}

/// Whether `--datapath-log` can load the logging build here (BPF ring buffers, 5.8). Never a
/// failure: meshnet runs without it.
#[must_use]
pub fn datapath_log_check(ring_buffers: Result<bool, String>) -> Check {
    const NAME: &str = "datapath logging";
    match ring_buffers {
        Ok(true) => Check::new(NAME, Level::Ok, "available: BPF ring buffers are supported, so `--datapath-log` loads the logging build"),
        Ok(false) => Check::new(
            NAME,
            Level::Info,
            "not available: BPF ring buffers need kernel 5.8; with `--datapath-log` the agent says so and loads the default build (the counters still count every drop)",
        ),
        Err(e) => Check::new(NAME, Level::Info, format!("could not probe BPF ring buffers: {e}")),
    }
}

/// Which attach path `--attach-mode auto` takes on this kernel.
#[must_use]
pub fn attach_check(kernel: Option<KernelRelease>) -> Check {
    const NAME: &str = "attach path";
    match kernel {
        Some(k) if k >= TCX_KERNEL => Check::new(
            NAME,
            Level::Ok,
            "tcx links (kernel 6.6 or newer); `--attach-mode auto` falls back to netlink clsact filters if tcx is refused",
        ),
        Some(_) => Check::new(
            NAME,
            Level::Info,
            "netlink clsact filters: tcx needs kernel 6.6; meshnet supports both paths, and a restart replaces its filter in place",
        ),
        None => Check::new(NAME, Level::Info, "unknown kernel: `--attach-mode auto` tries tcx, then netlink clsact filters"),
    }
}

/// Whether the pin directory (or, before the agent creates it, its nearest existing
/// ancestor) is on a bpffs.
#[must_use]
pub fn bpffs_check(pins: &Pins) -> Check {
    let root = pins.root();
    let Some(probe) = pins.probe_dir() else {
        return bpffs_verdict(root, root, Err("no part of the path exists".into()));
    };
    bpffs_verdict(root, probe, crate::pins::is_bpffs(probe).map_err(|e| format!("{e:#}")))
}

#[must_use]
pub fn bpffs_verdict(root: &Path, probed: &Path, is_bpffs: Result<bool, String>) -> Check {
    const NAME: &str = "bpffs";
    let at = if probed == root {
        root.display().to_string()
    } else {
        format!("{} (checked at {}, the nearest existing directory)", root.display(), probed.display())
    };
    let fix = format!(
        "`mount -t bpf bpf /sys/fs/bpf -o mode=700` (persistently: `{FSTAB_LINE}` in /etc/fstab; in a pod, \
         mount the host's /sys/fs/bpf), or pass --pin-path DIR on a bpffs; {KERNEL_DOC}"
    );
    match is_bpffs {
        Ok(true) => Check::new(NAME, Level::Ok, format!("{at} is on a bpffs")),
        Ok(false) => Check::new(
            NAME,
            Level::Fail,
            format!("{at} is not on a bpffs: pinned maps and links could not outlive the agent, which refuses to start"),
        )
        .fix(fix),
        Err(e) => Check::new(NAME, Level::Fail, format!("cannot check {at}: {e}")).fix(fix),
    }
}

/// The /etc/fstab line of a bpffs only root can enter, so that no other user can create the
/// pin directory before the agent does.
const FSTAB_LINE: &str = "bpffs /sys/fs/bpf bpf defaults,mode=700 0 0";

/// What `lstat` says of a directory on the pin path.
#[derive(Debug, Clone, Copy)]
pub struct DirMode {
    pub symlink: bool,
    pub uid: u32,
    pub mode: u32,
}

/// Who besides the agent can reach the pin directory or, before the agent creates it, its
/// nearest existing ancestor.
#[must_use]
pub fn pin_dir_check(pins: &Pins) -> Option<Check> {
    use std::os::unix::fs::MetadataExt as _;
    let root = pins.root();
    // `probe_dir` follows a symlink, and passes over one that leads nowhere.
    let probed = if root.is_symlink() { root } else { pins.probe_dir()? };
    let m = std::fs::symlink_metadata(probed).ok()?;
    let found = DirMode { symlink: m.file_type().is_symlink(), uid: m.uid(), mode: m.mode() & 0o7777 };
    Some(pin_dir_verdict(root, probed, found, nix::unistd::geteuid().as_raw()))
}

/// Fails where the agent refuses the pin directory (a symlink, another owner, writable by
/// others); warns where other users can open it, or create it before the agent does.
#[must_use]
pub fn pin_dir_verdict(root: &Path, probed: &Path, found: DirMode, euid: u32) -> Check {
    const NAME: &str = "pin directory";
    let shown = root.display();
    let mount = format!("mount the bpffs with `mode=700` (`{FSTAB_LINE}` in /etc/fstab); {KERNEL_DOC}");
    if probed != root {
        if found.mode & 0o002 != 0 {
            return Check::new(
                NAME,
                Level::Warn,
                format!(
                    "{shown} does not exist yet and any user can create it in {} (mode {:o}): the agent would then \
                     refuse to start",
                    probed.display(),
                    found.mode
                ),
            )
            .fix(mount);
        }
        return Check::new(NAME, Level::Ok, format!("{shown} does not exist yet; only the agent's user can create it"));
    }
    let refused = |what: String| {
        Check::new(NAME, Level::Fail, format!("{shown} {what}: the agent refuses to pin there"))
            .fix(format!("check what it holds, remove it (`rm -r {shown}`) and start the agent, which creates it; {mount}"))
    };
    if found.symlink {
        return refused("is a symlink".into());
    }
    if found.uid != euid {
        return refused(format!("is owned by uid {}, not {euid}", found.uid));
    }
    if found.mode & 0o077 != 0 {
        // The agent closes its own root whatever its mode, and refuses what it holds that
        // others made or can write to.
        let how = if found.mode & 0o022 != 0 { "write to" } else { "open" };
        return Check::new(
            NAME,
            Level::Warn,
            format!(
                "other users can {how} {shown} (mode {:o}), and one that opens it and locks it keeps the agent \
                 waiting; the agent closes it (mode 700) when it starts",
                found.mode
            ),
        )
        .fix(format!("`chmod 700 {shown}`, or start the agent"));
    }
    Check::new(NAME, Level::Ok, format!("{shown} is closed to other users (mode {:o})", found.mode))
}

/// Which of meshnet's maps are pinned (informational: an agent has run with this
/// --pin-path).
#[must_use]
pub fn pins_check(pins: &Pins) -> Check {
    let present: Vec<&str> = names::ALL_MAPS.iter().copied().filter(|n| pins.map(n).exists()).collect();
    pins_verdict(&pins.maps_dir(), &present)
}

#[must_use]
pub fn pins_verdict(maps_dir: &Path, present: &[&str]) -> Check {
    const NAME: &str = "pinned maps";
    let all = names::ALL_MAPS.len();
    if present.len() == all {
        Check::new(NAME, Level::Ok, format!("all {all} maps pinned under {}", maps_dir.display()))
    } else if present.is_empty() {
        Check::new(
            NAME,
            Level::Info,
            format!("none under {}: no agent has run with this --pin-path yet", maps_dir.display()),
        )
    } else {
        let missing: Vec<&str> = names::ALL_MAPS.iter().copied().filter(|n| !present.contains(n)).collect();
        Check::new(
            NAME,
            Level::Warn,
            format!("{} of {all} maps pinned under {}; missing {}", present.len(), maps_dir.display(), missing.join(", ")),
        )
        .fix("restart the agent, which pins the maps it misses (or run `meshnet detach` and start it again)")
    }
}

/// How full the flow table is and whether new flows were refused for lack of room. `None`
/// when nothing is pinned yet.
#[must_use]
pub fn flow_table_check(pins: &Pins) -> Option<Check> {
    let info = aya::maps::MapInfo::from_pin(pins.map(names::NAT_FWD)).ok()?;
    let fwd: crate::maps::NatFwdMap = crate::maps::open(pins, names::NAT_FWD).ok()?;
    let entries = fwd.keys().count();
    let refused = crate::maps::read_stats(pins).ok().and_then(|s| s.get(Counter::NatTableFull.name()).copied()).unwrap_or(0);
    Some(flow_table_verdict(entries, info.max_entries(), refused))
}

/// Warns when the table is over 80 % full or new flows were refused (`nat_table_full`).
#[must_use]
pub fn flow_table_verdict(entries: usize, capacity: u32, refused: u64) -> Check {
    const NAME: &str = "flow table";
    let (n, cap) = (entries as u64, u64::from(capacity.max(1)));
    let pct = n * 100 / cap;
    let fill = format!("{entries} of {capacity} flows ({pct}%) in {}", names::NAT_FWD);
    let fix = "raise nat.maxFlows and restart the agent (its flows are migrated into the larger maps), or lower \
               the nat timeouts; established flows are never evicted, so a full table refuses new ones";
    if refused > 0 {
        Check::new(NAME, Level::Warn, format!("{fill}; {refused} new flows were refused because the table was full (nat_table_full)"))
            .fix(fix)
    } else if n * 5 > cap * 4 {
        Check::new(NAME, Level::Warn, format!("{fill}: over 80% full; new flows are refused when it is full")).fix(fix)
    } else {
        Check::new(NAME, Level::Ok, fill)
    }
}

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The `CapEff` mask of a `/proc/PID/status` text.
#[must_use]
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[must_use]
pub fn caps_check(cap_eff: Option<u64>, kernel: Option<KernelRelease>) -> Check {
    const NAME: &str = "capabilities";
    let fix = "run the agent as root, or grant it CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (CAP_SYS_ADMIN and \
               CAP_NET_ADMIN on kernels before 5.8), e.g. securityContext.capabilities.add: [BPF, NET_ADMIN, PERFMON]; \
               doctor checks its own capabilities, so run it the way the agent runs";
    let Some(mask) = cap_eff else {
        return Check::new(NAME, Level::Warn, "cannot read CapEff from /proc/self/status").fix(fix);
    };
    let has = |c: u32| mask & (1u64 << c) != 0;
    let present: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(c, _)| has(*c))
    .map(|(_, n)| *n)
    .collect();
    let shown = if present.is_empty() { "none of CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN".into() } else { present.join(", ") };
    let detail = format!("effective: {shown} (CapEff {mask:016x})");
    let (sys, bpf, net, perf) = (has(CAP_SYS_ADMIN), has(CAP_BPF), has(CAP_NET_ADMIN), has(CAP_PERFMON));
    if !(sys || bpf && net) {
        return Check::new(
            NAME,
            Level::Fail,
            format!("{detail}: loading programs needs CAP_SYS_ADMIN, or CAP_BPF with CAP_NET_ADMIN"),
        )
        .fix(fix);
    }
    if !sys && kernel.is_some_and(|k| k < CAP_BPF_KERNEL) {
        return Check::new(
            NAME,
            Level::Fail,
            format!("{detail}: kernels before 5.8 have no CAP_BPF, so loading programs needs CAP_SYS_ADMIN"),
        )
        .fix(fix);
    }
    if !net {
        return Check::new(
            NAME,
            Level::Warn,
            format!("{detail}: without CAP_NET_ADMIN, netlink tc filters (kernels before 6.6, --attach-mode netlink) cannot be attached"),
        )
        .fix(fix);
    }
    if !sys && !perf {
        // Seen on 6.18: "pointer arithmetic with it prohibited for !root" on meshnet_from_pod.
        return Check::new(
            NAME,
            Level::Fail,
            format!(
                "{detail}: without CAP_PERFMON (or CAP_SYS_ADMIN) the verifier forbids the packet-pointer arithmetic \
                 meshnet's programs do and refuses them"
            ),
        )
        .fix(fix);
    }
    Check::new(NAME, Level::Ok, detail)
}

fn config_checks(path: &Path, checks: &mut Vec<Check>) {
    // On the node, with the node's own addresses: what the agent itself would refuse.
    let loaded = RawConfig::load(path)
        .and_then(|(raw, _)| raw.validated_on(&path.display().to_string(), &netlink::local_addresses()));
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            checks.push(
                Check::new("config", Level::Fail, e.to_string().replace('\n', " "))
                    .fix(format!("correct the fields named above; `meshnet check --config {}` validates without touching anything", path.display())),
            );
            return;
        }
    };
    checks.push(Check::new(
        "config",
        Level::Ok,
        format!(
            "{} is valid: cluster {}, {} peers, {} routes",
            path.display(),
            cfg.cluster,
            cfg.peers.len(),
            cfg.desired().routes.len()
        ),
    ));
    let mut matched = std::collections::BTreeSet::new();
    for pattern in &cfg.interfaces {
        let found = datapath::matching_interfaces(std::slice::from_ref(pattern)).map_err(|e| format!("{e:#}"));
        if let Ok(f) = &found {
            matched.extend(f.keys().cloned());
        }
        checks.push(interfaces_check(pattern, found.map(|f| f.into_keys().collect())));
    }
    let bridges: Vec<String> =
        matched.iter().filter(|i| Path::new("/sys/class/net").join(i).join("bridge").exists()).cloned().collect();
    if !matched.is_empty() {
        let br_netfilter = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists();
        checks.push(bridge_check(&bridges, br_netfilter));
    }
    checks.push(big_tcp_check(&big_ipv4_packets(), &matched));
    let gateways: Vec<Ipv4Addr> = cfg.peers.iter().flat_map(|p| p.gateways.iter().map(|g| g.address)).collect();
    // Tunnel traffic leaves encapsulated before netfilter: only gateway peers need it.
    if !gateways.is_empty() || cfg.peers.iter().all(|p| p.tunnel.is_none()) {
        checks.push(masquerade_check(iptables_nat_rules(), &cfg.pod_cidrs, &gateways));
    }
    if let Some(t) = &cfg.tunnel {
        let found = datapath::matching_interfaces(&t.interfaces).map_err(|e| format!("{e:#}"));
        let uplinks: Vec<String> = found.as_ref().map(|f| f.keys().cloned().collect()).unwrap_or_default();
        checks.push(uplinks_check(&t.interfaces, found.map(|f| f.into_keys().collect()), &matched));
        if let Some(c) = uplink_mac_check(&uplinks.iter().map(|u| enslaved(Path::new("/sys/class/net"), u)).collect::<Vec<_>>()) {
            checks.push(c);
        }
        checks.push(tunnel_port_check(t.port, iptables_save("nat").as_ref(), crate::netlink::udp_listeners().as_deref()));
        if t.delivery == crate::config::Delivery::Stack {
            let peers: Vec<Ipv4Net> = cfg.peers.iter().filter(|p| p.tunnel.is_some()).flat_map(|p| p.pod_cidrs.iter().copied()).collect();
            checks.push(forward_check(iptables_save("filter").or_else(kernel_filter_rules), &uplinks, &peers));
        }
    }
}

/// The tunnel's uplinks: `tunnel.interfaces` must match an interface here, and not a pod
/// interface (`pods`): one device carries one program per direction.
#[must_use]
pub fn uplinks_check(patterns: &[String], found: Result<Vec<String>, String>, pods: &std::collections::BTreeSet<String>) -> Check {
    const NAME: &str = "tunnel uplinks";
    let shown = patterns.join(", ");
    match found {
        Err(e) => Check::new(NAME, Level::Fail, e).fix("correct the patterns in `tunnel.interfaces`"),
        Ok(f) if f.is_empty() => Check::new(
            NAME,
            Level::Fail,
            format!("tunnel.interfaces ({shown}) matches no interface here: tunnel packets from peers would reach no meshnet program and be refused by the stack"),
        )
        .fix("name the interfaces peer nodes' packets arrive on: `ip route get PEER_NODE_IP` shows it (e.g. eth0, ens192, bond0)"),
        Ok(f) => {
            let both: Vec<&String> = f.iter().filter(|i| pods.contains(*i)).collect();
            if both.is_empty() {
                Check::new(NAME, Level::Ok, format!("tunnel packets are taken off on {}", f.join(", ")))
            } else {
                Check::new(NAME, Level::Warn, format!("{} matched by both `interfaces` and `tunnel.interfaces`: the agent keeps them pod interfaces", both.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")))
                    .fix("make the two lists disjoint")
            }
        }
    }
}

/// An uplink enslaved to a bridge or a bond as `/sys/class/net` shows it: the uplink, its
/// MAC, its master and the master's MAC. `None` for one without a master, or with another kind
/// (a VRF, Open vSwitch's `ovs-system`: their MAC is no address peers send to).
fn enslaved(sys: &Path, uplink: &str) -> Option<Enslaved> {
    let mac = |dev: &Path| std::fs::read_to_string(dev.join("address")).ok().map(|m| m.trim().to_string());
    let dev = sys.join(uplink);
    let master = std::fs::read_link(dev.join("master")).ok()?;
    let master_name = master.file_name()?.to_string_lossy().into_owned();
    let master_dev = sys.join(&master_name);
    if !master_dev.join("bridge").exists() && !master_dev.join("bonding").exists() {
        return None;
    }
    Some(Enslaved { uplink: uplink.to_string(), mac: mac(&dev)?, master: master_name, master_mac: mac(&master_dev)? })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enslaved {
    pub uplink: String,
    pub mac: String,
    pub master: String,
    pub master_mac: String,
}

/// The uplink program redirects only frames to its interface's own MAC to pods, and hands
/// the stack those to another host's. Peers address the node's address, which on an enslaved
/// uplink lives on its master: a master whose MAC is not the uplink's gets frames that the
/// uplink takes for another host's, so `delivery: redirect` does not apply to them. `None`
/// when no uplink is enslaved to a bridge or bond, so that most nodes show no such row.
#[must_use]
pub fn uplink_mac_check(uplinks: &[Option<Enslaved>]) -> Option<Check> {
    const NAME: &str = "tunnel uplink MACs";
    let enslaved: Vec<&Enslaved> = uplinks.iter().flatten().collect();
    if enslaved.is_empty() {
        return None;
    }
    let differ: Vec<&&Enslaved> = enslaved.iter().filter(|e| !e.mac.eq_ignore_ascii_case(&e.master_mac)).collect();
    Some(match differ.first() {
        None => Check::new(NAME, Level::Ok, format!("{} share their masters' MACs", enslaved.iter().map(|e| e.uplink.as_str()).collect::<Vec<_>>().join(", "))),
        Some(e) => Check::new(
            NAME,
            Level::Warn,
            format!(
                "{} ({}) is a port of {} ({}): frames to the node's address there are another host's to {}, which the uplink program hands to the stack, never to a pod by redirect (tunnel_not_for_node counts them), so kube-proxy's INVALID drop kills their TCP flows as with `delivery: stack`",
                e.uplink, e.mac, e.master, e.master_mac, e.uplink
            ),
        )
        .fix(format!("name {} in `tunnel.interfaces` instead of {}", e.master, e.uplink)),
    })
}

/// The tunnel port's reservation: a NodePort Service (`meshnet-tunnel`) keeps any other
/// Service from taking the port, and kube-proxy's rules for it show it exists. A local
/// socket on the port would never see a packet (the uplink program takes them first), so it
/// is a sign of a clash.
#[must_use]
pub fn tunnel_port_check(port: u16, nat: Option<&Result<String, String>>, listeners: Option<&[u16]>) -> Check {
    const NAME: &str = "tunnel port";
    if listeners.is_some_and(|l| l.contains(&port)) {
        return Check::new(NAME, Level::Warn, format!("a local UDP socket is bound to {port}: the tunnel takes every packet to that port before it could"))
            .fix("give the tunnel another port, or move that service");
    }
    let reserved = nat.and_then(|r| r.as_ref().ok()).is_some_and(|t| {
        t.lines().any(|l| l.starts_with("-A KUBE-NODEPORTS") && l.contains("-p udp") && l.contains(&format!("--dport {port}")))
    });
    if reserved {
        Check::new(NAME, Level::Ok, format!("UDP {port} is a NodePort of a Service (kube-proxy has its rule): no other Service can take it"))
    } else {
        Check::new(
            NAME,
            Level::Warn,
            format!("no kube-proxy NodePort rule for UDP {port}: unless the meshnet-tunnel Service reserves it, another Service may be given the port"),
        )
        .fix(format!("apply deploy/base/tunnel-service.yaml with nodePort {port} (docs/operations.md, \"Tunnel mode\"), and open UDP {port} between the nodes"))
    }
}

/// With `delivery: stack`, decapsulated packets are forwarded by the node as if they had
/// arrived on the uplink from the peer's pods: a FORWARD policy or rule that drops what
/// comes in on the uplink drops them too.
#[must_use]
pub fn forward_check(filter: Option<Result<String, String>>, uplinks: &[String], peer_cidrs: &[Ipv4Net]) -> Check {
    const NAME: &str = "tunnel FORWARD rules";
    let text = match filter {
        None => {
            return Check::new(
                NAME,
                Level::Warn,
                "neither iptables-save (the agent's image has none) nor a legacy filter table with rules: FORWARD rules not checked, and kube-proxy's INVALID drop would kill TCP delivered through the stack",
            )
            .fix("set tunnel.delivery: redirect (the default), or check `iptables-save -t filter` on the node for `--ctstate INVALID -j DROP`");
        }
        Some(Err(e)) => return Check::new(NAME, Level::Warn, format!("could not read the filter table: {e}")),
        Some(Ok(t)) => t,
    };
    let fix = format!(
        "accept what the tunnel delivers before the drop, e.g. `iptables -I FORWARD -i {} -s {} -j ACCEPT`, or set tunnel.delivery: redirect (straight to the pod, past netfilter and NetworkPolicy)",
        uplinks.first().map_or("UPLINK", String::as_str),
        peer_cidrs.first().map_or_else(|| "PEER_POD_CIDR".to_string(), ToString::to_string)
    );
    if let Some(rule) = invalid_drop(&text, uplinks, peer_cidrs) {
        return Check::new(
            NAME,
            Level::Fail,
            format!(
                "`{rule}` (kube-proxy has one) drops tunnelled TCP and ping replies delivered through the stack: this node's conntrack never sees its own pods' half of a tunnelled flow (it leaves encapsulated, before netfilter), so it holds the other half INVALID"
            ),
        )
        .fix("set tunnel.delivery: redirect (the default): conntrack then sees neither half");
    }
    let mut policy_drop = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with(":FORWARD DROP") {
            policy_drop = true;
        }
        if !line.starts_with("-A FORWARD ") {
            continue;
        }
        let w = words(line);
        let arg = |opt: &str| w.windows(2).find(|p| p[0] == opt).map(|p| p[1].clone());
        let negated = w.iter().any(|x| x == "!");
        let iface_ok = in_on_uplink(&w, uplinks);
        let src_ok = arg("-s").is_none_or(|s| net_of(&s).is_some_and(|n| peer_cidrs.iter().any(|p| overlaps(n, *p))));
        if !iface_ok || !src_ok || negated {
            continue;
        }
        match arg("-j").as_deref() {
            // The first verdict that can apply decides, for the heuristic's purposes.
            Some("ACCEPT") if arg("-s").is_some() || arg("-m").is_none() => {
                return Check::new(NAME, Level::Ok, format!("decapsulated traffic is accepted: `{line}`"));
            }
            Some("DROP" | "REJECT") if arg("-d").is_none() && arg("-p").is_none() => {
                return Check::new(NAME, Level::Warn, format!("`{line}` drops what arrives on the uplink, decapsulated pod traffic included")).fix(fix);
            }
            _ => {}
        }
    }
    if policy_drop {
        return Check::new(NAME, Level::Warn, "the FORWARD policy is DROP and no rule accepts the peers' pod traffic from the uplink").fix(fix);
    }
    Check::new(NAME, Level::Ok, "no FORWARD rule drops what the tunnel delivers")
}

/// The first rule that FORWARD reaches, in order and through the chains it jumps or goes to,
/// that drops what conntrack holds INVALID coming in on one of the `uplinks` (where
/// decapsulated packets come in). `None` as well when an ACCEPT of the peers' pod traffic
/// (`peer_cidrs`) from the uplink comes first: those packets never reach the drop.
fn invalid_drop(filter: &str, uplinks: &[String], peer_cidrs: &[Ipv4Net]) -> Option<String> {
    let rules: Vec<(String, Vec<String>, &str)> = filter
        .lines()
        .map(str::trim)
        .filter_map(|l| {
            let w = words(l);
            (w.len() > 2 && w[0] == "-A").then(|| (w[1].clone(), w, l))
        })
        .collect();
    match walk_for_invalid_drop(&rules, "FORWARD", uplinks, peer_cidrs, &mut vec![]) {
        Walk::Dropped(rule) => Some(rule),
        Walk::Accepted | Walk::Ended => None,
    }
}

/// How [`walk_for_invalid_drop`] left a chain.
enum Walk {
    /// At this rule, an INVALID drop.
    Dropped(String),
    /// The peers' traffic was accepted first.
    Accepted,
    /// Neither: the calling chain goes on.
    Ended,
}

/// [`invalid_drop`] in `chain`, in order, into the chains it jumps or goes to.
fn walk_for_invalid_drop(rules: &[(String, Vec<String>, &str)], chain: &str, uplinks: &[String], peer_cidrs: &[Ipv4Net], seen: &mut Vec<String>) -> Walk {
    seen.push(chain.to_string());
    for (_, w, line) in rules.iter().filter(|(c, _, _)| c == chain) {
        if !in_on_uplink(w, uplinks) {
            continue;
        }
        let arg = |opt: &str| w.windows(2).find(|p| p[0] == opt).map(|p| p[1].as_str());
        let target = arg("-j").or_else(|| arg("-g"));
        let state = arg("--ctstate").or_else(|| arg("--state"));
        let negated = |opt: &str| w.windows(2).any(|p| p[0] == "!" && p[1] == opt);
        let invalid = state.is_some_and(|s| s.split(',').any(|x| x == "INVALID")) && !negated("--ctstate") && !negated("--state");
        let from_peers = arg("-s").and_then(net_of).is_some_and(|n| peer_cidrs.iter().any(|p| overlaps(n, *p))) && !negated("-s");
        match target {
            Some("DROP" | "REJECT") if invalid => return Walk::Dropped((*line).to_string()),
            Some("ACCEPT") if from_peers && state.is_none() => return Walk::Accepted,
            Some("RETURN") if w.len() == 4 => return Walk::Ended,
            Some(t) if !seen.iter().any(|c| c == t) && rules.iter().any(|(c, _, _)| c == t) => {
                match walk_for_invalid_drop(rules, t, uplinks, peer_cidrs, seen) {
                    Walk::Ended => {}
                    found => return found,
                }
            }
            _ => {}
        }
    }
    Walk::Ended
}

/// Whether a rule's `-i` (none, or an iptables `+` wildcard) can match one of the `uplinks`.
fn in_on_uplink(w: &[String], uplinks: &[String]) -> bool {
    let negated = w.windows(3).any(|p| p[0] == "!" && p[1] == "-i");
    w.windows(2)
        .find(|p| p[0] == "-i")
        .is_none_or(|p| negated || uplinks.iter().any(|u| glob::Pattern::new(&p[1].replace('+', "*")).is_ok_and(|g| g.matches(u))))
}

/// One `interfaces` pattern and the interfaces it matches in this network namespace.
#[must_use]
pub fn interfaces_check(pattern: &str, found: Result<Vec<String>, String>) -> Check {
    let name = format!("interfaces {pattern:?}");
    match found {
        Err(e) => Check::new(name, Level::Fail, e).fix("correct the pattern in `interfaces`"),
        Ok(f) if f.is_empty() => Check::new(
            name,
            Level::Warn,
            "matches no interface in this network namespace (if no pods run on this node yet, that is expected: the \
             agent rescans every --rescan-seconds)",
        )
        .fix(
            "list the pods' host-side interfaces with `ip -o link` and match those (`veth*` for bridge CNIs such as \
             flannel, `cali*` for Calico, `lxc*` for Cilium)",
        ),
        Ok(f) => {
            const SHOWN: usize = 5;
            let more = if f.len() > SHOWN { format!(" and {} more", f.len() - SHOWN) } else { String::new() };
            let list: Vec<&str> = f.iter().take(SHOWN).map(String::as_str).collect();
            Check::new(name, Level::Ok, format!("matches {}: {}{more}", f.len(), list.join(", ")))
        }
    }
}

/// The interfaces of this namespace that build IPv4 packets past 64 KB (BIG TCP), with their
/// GSO and GRO maximums.
fn big_ipv4_packets() -> Result<Vec<(String, u32, u32)>, String> {
    let all = nix::net::if_::if_nameindex().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut found = Vec::new();
    let mut failed = None;
    for i in &all {
        let name = i.name().to_string_lossy().into_owned();
        match crate::netlink::ipv4_big_packet_sizes(i.index()) {
            Ok((gso, gro)) => {
                let (gso, gro) = (gso.unwrap_or(0), gro.unwrap_or(0));
                if gso > IPV4_MAX_PACKET || gro > IPV4_MAX_PACKET {
                    found.push((name, gso, gro));
                }
            }
            // Gone since the listing: a pod that went.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => failed = Some(format!("reading {name}: {e}")),
        }
    }
    // One that cannot be read is not taken for one without BIG TCP.
    match failed {
        Some(e) if found.is_empty() => Err(e),
        _ => Ok(found),
    }
}

/// The largest IPv4 packet whose total length its header can say.
const IPV4_MAX_PACKET: u32 = 65_536;

/// Interfaces with IPv4 BIG TCP on: their packets past 64 KB carry a total length of 0,
/// which the datapath refuses as malformed (a reply of a flow then reaches the pod
/// untranslated), wherever they reach a pod interface meshnet is on. A failure on a pod
/// interface (`pods`), which meshnet's programs see; a warning elsewhere (an uplink's GRO
/// packets reach the pods; a storage NIC's never do).
#[must_use]
pub fn big_tcp_check(found: &Result<Vec<(String, u32, u32)>, String>, pods: &std::collections::BTreeSet<String>) -> Check {
    const NAME: &str = "IPv4 BIG TCP";
    match found {
        Err(e) => Check::new(NAME, Level::Warn, format!("cannot tell: {e}")),
        Ok(f) if f.is_empty() => Check::new(NAME, Level::Ok, "no interface builds IPv4 packets past 64 KB"),
        Ok(f) => {
            let list: Vec<String> = f.iter().map(|(n, gso, gro)| format!("{n} (gso_ipv4_max_size {gso}, gro_ipv4_max_size {gro})")).collect();
            let level = if f.iter().any(|(n, ..)| pods.contains(n)) { Level::Fail } else { Level::Warn };
            Check::new(
                NAME,
                level,
                format!(
                    "on {}: packets past 64 KB carry an IPv4 total length of 0, which meshnet refuses as malformed \
                     (`malformed` grows; large transfers to remote pods stall or are reset)",
                    list.join(", ")
                ),
            )
            .fix("`ip link set dev IFACE gso_ipv4_max_size 65536 gro_ipv4_max_size 65536` (and turn off the CNI's IPv4 BIG TCP option)")
        }
    }
}

/// Matched interfaces that are bridges.
#[must_use]
pub fn bridge_check(bridges: &[String], br_netfilter: bool) -> Check {
    const NAME: &str = "bridges";
    if bridges.is_empty() {
        return Check::new(NAME, Level::Ok, "no matched interface is a bridge");
    }
    let loaded = if br_netfilter { "br_netfilter is loaded here" } else { "Kubernetes nodes load br_netfilter" };
    Check::new(
        NAME,
        Level::Warn,
        format!(
            "{} matched but {} a bridge: {loaded}, so conntrack tracks a pod's packet on the bridge before the bridge \
             device's tc hook could rewrite it",
            bridges.join(", "),
            if bridges.len() == 1 { "is" } else { "are" }
        ),
    )
    .fix("match the pods' host-side veths (e.g. `veth*` for a cni0 bridge) instead of the bridge; see README.md, \"Running the agent\"")
}

/// The nat table as `iptables-save -t nat` prints it, also from the legacy backend when
/// iptables-nft says it has tables. Without iptables-save (in the agent's pod: the image has
/// none), the legacy table is read from the kernel directly. `None`: nothing to judge by:
/// no iptables-save, and no legacy nat table with rules (the host's rules, if any, are in
/// nftables).
fn iptables_nat_rules() -> Option<Result<String, String>> {
    iptables_save_nat().or_else(kernel_nat_rules)
}

/// Without iptables-save: the legacy nat table and the IPv4 rules of nftables, from the
/// kernel. `None` when neither could be read.
fn kernel_nat_rules() -> Option<Result<String, String>> {
    let mut text = String::new();
    let mut errors = Vec::new();
    match crate::iptables::legacy_nat_rules() {
        Ok(t) => text.push_str(&t.unwrap_or_default()),
        Err(e) => errors.push(format!("the legacy nat table: {e}")),
    }
    match crate::nftables::ipv4_rules() {
        Ok(t) => text.push_str(&t),
        Err(e) => errors.push(format!("nftables: {e}")),
    }
    match (text.lines().any(|l| l.starts_with("-A ")), errors.len()) {
        (true, _) | (false, 0) => Some(Ok(text)),
        (false, 1) => Some(Err(errors.join("; "))),
        (false, _) => None,
    }
}

/// Without iptables-save: the legacy filter table from the kernel, when it holds rules (as on
/// nodes whose kube-proxy writes with iptables-legacy, CentOS 7's). `None` otherwise: rules
/// in nftables are not judged here, and an empty answer would read as "nothing drops".
fn kernel_filter_rules() -> Option<Result<String, String>> {
    match crate::iptables::legacy_filter_rules() {
        Ok(Some(t)) if t.lines().any(|l| l.starts_with("-A ")) => Some(Ok(t)),
        Ok(_) => None,
        Err(e) => Some(Err(format!("the legacy filter table: {e}"))),
    }
}

/// `iptables-save -t nat`, and `iptables-legacy-save` where iptables-nft says there are
/// legacy tables too. `None`: iptables-save is not installed.
fn iptables_save_nat() -> Option<Result<String, String>> {
    iptables_save("nat")
}

/// `iptables-save -t TABLE`, with the legacy backend's rules where iptables-nft says there
/// are some. `None`: iptables-save is not installed.
fn iptables_save(table: &str) -> Option<Result<String, String>> {
    let run = |cmd: &str| -> Option<Result<String, String>> {
        match Command::new(cmd).args(["-t", table]).output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(format!("{cmd}: {e}"))),
            Ok(o) if !o.status.success() => {
                Some(Err(format!("{cmd} -t {table}: {}", String::from_utf8_lossy(&o.stderr).trim())))
            }
            Ok(o) => Some(Ok(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))),
        }
    };
    let mut text = run("iptables-save")?;
    if let Ok(t) = &mut text {
        if t.contains("iptables-legacy tables present") {
            if let Some(Ok(legacy)) = run("iptables-legacy-save") {
                t.push_str(&legacy);
            }
        }
    }
    Some(text)
}

/// MASQUERADE and SNAT rules of an `iptables-save` nat table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Masquerade {
    /// Rules that can apply to pod traffic leaving for a peer's gateways.
    pub pod_rules: Vec<String>,
    /// Rules that cannot: for other sources or destinations, or only for marked packets
    /// (kube-proxy's service masquerade).
    pub other_rules: Vec<String>,
}

/// Splits an iptables-save rule into words, keeping quoted comments whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => cur.extend(chars.next()),
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn net_of(s: &str) -> Option<Ipv4Net> {
    s.parse::<Ipv4Net>().ok().or_else(|| s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from))
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Finds the rules of an `iptables-save -t nat` text that give pod traffic leaving for the
/// gateways the node's address: MASQUERADE or SNAT whose source match (if any) covers the
/// pod CIDRs and whose destination match (if any) covers a gateway. An empty `pod_cidrs`
/// or `gateways` does not restrict.
#[must_use]
pub fn find_masquerade(iptables_save: &str, pod_cidrs: &[Ipv4Net], gateways: &[Ipv4Addr]) -> Masquerade {
    let mut m = Masquerade::default();
    // Chains that return every unmarked packet early (kube-proxy's KUBE-POSTROUTING:
    // `-m mark ! --mark 0x4000/0x4000 -j RETURN`): their later rules see marked packets only.
    let mut mark_gated = std::collections::HashSet::new();
    for line in iptables_save.lines() {
        let line = line.trim();
        if !line.starts_with("-A ") {
            continue;
        }
        let w = words(line);
        let chain = w.get(1).cloned().unwrap_or_default();
        let target = w.iter().position(|x| x == "-j" || x == "--jump").and_then(|i| w.get(i + 1));
        let negated_mark = w.windows(2).any(|p| p[0] == "!" && p[1] == "--mark");
        if target.is_some_and(|t| t == "RETURN") && negated_mark {
            mark_gated.insert(chain.clone());
        }
        if !matches!(target.map(String::as_str), Some("MASQUERADE" | "SNAT")) {
            continue;
        }
        let mut applies = !mark_gated.contains(&chain);
        let mut negate = false;
        let mut i = 0;
        while i < w.len() {
            let opt = w[i].as_str();
            let value = w.get(i + 1).map(String::as_str).unwrap_or_default();
            match opt {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                "-s" | "--source" => {
                    if let Some(net) = net_of(value) {
                        let ok = if negate {
                            // Excludes a source: fine unless it excludes every pod CIDR.
                            pod_cidrs.is_empty() || !pod_cidrs.iter().all(|p| net.contains(p))
                        } else {
                            pod_cidrs.is_empty() || pod_cidrs.iter().any(|p| overlaps(net, *p))
                        };
                        applies &= ok;
                    }
                }
                "-d" | "--destination" => {
                    if let Some(net) = net_of(value) {
                        let ok = gateways.is_empty() || gateways.iter().any(|g| net.contains(g) != negate);
                        applies &= ok;
                    }
                }
                // Only packets kube-proxy marked for a service, never a pod's own traffic.
                "--mark" if !negate => applies = false,
                _ => {}
            }
            negate = false;
            i += 1;
        }
        if applies {
            m.pod_rules.push(line.to_string());
        } else {
            m.other_rules.push(line.to_string());
        }
    }
    m
}

/// Whether pod traffic leaving the node is masqueraded. `rules`: `None` when iptables-save
/// is not installed.
#[must_use]
pub fn masquerade_check(rules: Option<Result<String, String>>, pod_cidrs: &[Ipv4Net], gateways: &[Ipv4Addr]) -> Check {
    const NAME: &str = "masquerade";
    let cidrs = if pod_cidrs.is_empty() {
        "POD_CIDR".to_string()
    } else {
        pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    };
    let why = "the peer's gateway replies to the packet's source address, and a pod address is not routable from \
               the peer's network: translated packets must leave with the node's address";
    let fix = format!(
        "make sure the CNI masquerades pod traffic leaving the cluster (flannel: --ip-masq; Calico: natOutgoing on the \
         IP pool), or add `iptables -t nat -A POSTROUTING -s {cidrs} ! -d {cidrs} -j MASQUERADE`"
    );
    let text = match rules {
        None => {
            // The image is FROM scratch: in the agent's pod there is no iptables to ask.
            return Check::new(
                NAME,
                Level::Warn,
                format!(
                    "cannot judge: iptables-save not found (the meshnet image has none), and neither the legacy nat table \
                     nor nftables could be read from the kernel, so this was not checked; {why}"
                ),
            )
            .fix(format!("run `meshnet doctor --config FILE` on the node itself, where iptables is; {fix}"))
        }
        Some(Err(e)) => return Check::new(NAME, Level::Warn, format!("could not read the nat table: {e}; {why}")).fix(fix),
        Some(Ok(t)) => t,
    };
    let m = find_masquerade(&text, pod_cidrs, gateways);
    if let Some(rule) = m.pod_rules.first() {
        let more = if m.pod_rules.len() > 1 { format!(" (and {} more)", m.pod_rules.len() - 1) } else { String::new() };
        return Check::new(NAME, Level::Ok, format!("pod traffic leaving the node is masqueraded: `{rule}`{more}"));
    }
    let seen = if m.other_rules.is_empty() {
        "no MASQUERADE or SNAT rule in the nat table".to_string()
    } else {
        format!(
            "{} MASQUERADE/SNAT rule(s) in the nat table, none for pod sources {cidrs} towards the gateways (e.g. `{}`)",
            m.other_rules.len(),
            m.other_rules[0]
        )
    };
    Check::new(NAME, Level::Warn, format!("{seen}; {why}")).fix(fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(KernelRelease::parse("6.18.0-1-amd64"), Some(KernelRelease::new(6, 18, 0)));
        assert_eq!(KernelRelease::parse("3.10.0-862.el7.x86_64"), Some(KernelRelease::new(3, 10, 0)));
        assert_eq!(KernelRelease::parse("5.4"), Some(KernelRelease::new(5, 4, 0)));
        assert_eq!(KernelRelease::parse("5.15.0-91-generic\n"), Some(KernelRelease::new(5, 15, 0)));
        assert_eq!(KernelRelease::parse("6.1.55+"), Some(KernelRelease::new(6, 1, 55)));
        assert_eq!(KernelRelease::parse("6.8-rc1"), Some(KernelRelease::new(6, 8, 0)));
        assert_eq!(KernelRelease::parse("linux"), None);
        assert_eq!(KernelRelease::parse("6"), None);
        assert!(KernelRelease::new(5, 10, 0) > KernelRelease::new(5, 4, 200));
    }

    #[test]
    fn kernel_versions_are_judged() {
        let c = kernel_check("3.10.0-862.el7.x86_64");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("cannot run meshnet at all"), "{}", c.detail);
        assert!(c.fix.unwrap().contains("docs/kernel-upgrade.md"));
        let c = kernel_check("4.19.0-25-amd64");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("bounded loops"));
        // 5.4 before 5.4.144: no pruning on read-only data, unless backported.
        assert_eq!(kernel_check("5.4.0-42-generic").level, Level::Warn);
        assert_eq!(kernel_check("5.4.143").level, Level::Warn);
        assert_eq!(kernel_check("5.4.17-2136.el8uek.x86_64").level, Level::Warn, "Oracle's UEK freezes the number");
        assert_eq!(kernel_check("5.4.144-1.el7.elrepo.x86_64").level, Level::Ok);
        assert_eq!(kernel_check("5.4.278-1.el7.elrepo.x86_64").level, Level::Ok);
        assert_eq!(kernel_check("5.10.0-46-amd64").level, Level::Ok);
        assert_eq!(kernel_check("6.18.0").level, Level::Ok);
        assert_eq!(kernel_check("weird").level, Level::Warn);
    }

    #[test]
    fn the_attach_path_follows_the_kernel() {
        let c = attach_check(Some(KernelRelease::new(6, 6, 0)));
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.starts_with("tcx"));
        let c = attach_check(Some(KernelRelease::new(6, 1, 0)));
        assert_eq!(c.level, Level::Info);
        assert!(c.detail.starts_with("netlink clsact") && c.detail.contains("6.6"));
    }

    #[test]
    fn datapath_logging_is_never_a_failure() {
        let c = datapath_log_check(Ok(true));
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.starts_with("available"));
        let c = datapath_log_check(Ok(false));
        assert_eq!(c.level, Level::Info);
        assert!(c.detail.contains("5.8") && c.detail.contains("default build"), "{}", c.detail);
        assert_eq!(datapath_log_check(Err("EPERM".into())).level, Level::Info);
    }

    #[test]
    fn btf_is_never_a_problem() {
        assert_eq!(btf_check(true).level, Level::Ok);
        assert_eq!(btf_check(false).level, Level::Info);
    }

    #[test]
    fn probes_map_to_levels() {
        assert_eq!(probe_check("map type LPM trie", "4.11", Ok(true)).level, Level::Ok);
        let c = probe_check("map type LPM trie", "4.11", Ok(false));
        assert_eq!(c.level, Level::Fail);
        assert!(c.fix.unwrap().contains("docs/kernel-upgrade.md"));
        assert_eq!(probe_check("x", "4.1", Err("EPERM".into())).level, Level::Warn);
    }

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tmeshnet\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn flow_table_warns_when_nearly_full_or_refusing() {
        assert_eq!(flow_table_verdict(10, 100, 0).level, Level::Ok);
        assert_eq!(flow_table_verdict(80, 100, 0).level, Level::Ok);
        let c = flow_table_verdict(81, 100, 0);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("81%"), "{}", c.detail);
        let c = flow_table_verdict(3, 100, 7);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("7 new flows were refused") && c.detail.contains("nat_table_full"), "{}", c.detail);
        assert!(c.fix.unwrap().contains("nat.maxFlows"));
    }

    fn mask(caps: &[u32]) -> u64 {
        caps.iter().fold(0, |m, c| m | 1 << c)
    }

    #[test]
    fn capabilities_are_judged() {
        let new = Some(KernelRelease::new(6, 6, 0));
        let old = Some(KernelRelease::new(5, 4, 0));
        assert_eq!(caps_check(Some(0x1ff_ffff_ffff), new).level, Level::Ok);
        assert_eq!(caps_check(Some(mask(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])), new).level, Level::Ok);
        assert_eq!(caps_check(Some(mask(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])), old).level, Level::Ok);
        let c = caps_check(Some(0), new);
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("none of"));
        assert!(c.fix.is_some());
        assert_eq!(caps_check(Some(mask(&[CAP_BPF, CAP_PERFMON])), new).level, Level::Fail);
        // CAP_BPF does not exist before 5.8.
        assert_eq!(caps_check(Some(mask(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])), old).level, Level::Fail);
        // SYS_ADMIN alone loads programs but cannot add netlink filters.
        assert_eq!(caps_check(Some(mask(&[CAP_SYS_ADMIN])), new).level, Level::Warn);
        // Without CAP_PERFMON the verifier refuses meshnet_from_pod.
        assert_eq!(caps_check(Some(mask(&[CAP_BPF, CAP_NET_ADMIN])), new).level, Level::Fail);
        assert_eq!(caps_check(Some(mask(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])), new).level, Level::Ok);
        assert_eq!(caps_check(None, new).level, Level::Warn);
    }

    #[test]
    fn bpffs_and_pins_verdicts() {
        let root = Path::new("/sys/fs/bpf/meshnet");
        assert_eq!(bpffs_verdict(root, root, Ok(true)).level, Level::Ok);
        let c = bpffs_verdict(root, Path::new("/sys/fs/bpf"), Ok(false));
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("checked at /sys/fs/bpf"));
        assert!(c.fix.as_deref().unwrap().contains("mount -t bpf bpf /sys/fs/bpf -o mode=700"), "{c:?}");
        assert!(c.fix.as_deref().unwrap().contains("bpffs /sys/fs/bpf bpf defaults,mode=700 0 0"), "{c:?}");
        assert_eq!(bpffs_verdict(root, root, Err("EACCES".into())).level, Level::Fail);

        let dir = Path::new("/sys/fs/bpf/meshnet/maps");
        assert_eq!(pins_verdict(dir, &names::ALL_MAPS).level, Level::Ok);
        assert_eq!(pins_verdict(dir, &[]).level, Level::Info);
        let c = pins_verdict(dir, &[names::ROUTES]);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains(names::NAT_FWD));
    }

    #[test]
    fn a_pin_directory_others_can_reach() {
        let root = Path::new("/sys/fs/bpf/meshnet");
        let dir = |symlink, uid, mode| DirMode { symlink, uid, mode };
        let at_root = |found| pin_dir_verdict(root, root, found, 0);
        assert_eq!(at_root(dir(false, 0, 0o700)).level, Level::Ok);
        // An older agent's, or the kubelet's, or a bpffs mounted there: the agent's own, which
        // it closes.
        for (mode, how) in [(0o755, "open"), (0o777, "write to"), (0o1777, "write to"), (0o770, "write to")] {
            let c = at_root(dir(false, 0, mode));
            assert_eq!(c.level, Level::Warn, "{mode:o}");
            assert!(c.detail.contains(&format!("can {how}")) && c.detail.contains(&format!("mode {mode:o}")), "{c:?}");
            assert!(c.fix.unwrap().contains("chmod 700 /sys/fs/bpf/meshnet"));
        }
        for (found, why) in [
            (dir(false, 65534, 0o700), "owned by uid 65534"),
            (dir(true, 65534, 0o777), "is a symlink"),
        ] {
            let c = at_root(found);
            assert_eq!(c.level, Level::Fail, "{found:?}");
            assert!(c.detail.contains(why) && c.detail.contains("refuses"), "{c:?}");
        }
        // Not there yet: a bpffs mounted without mode= lets anyone create it.
        let parent = Path::new("/sys/fs/bpf");
        let c = pin_dir_verdict(root, parent, dir(false, 0, 0o1777), 0);
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.unwrap().contains("mode=700"));
        assert_eq!(pin_dir_verdict(root, parent, dir(false, 0, 0o700), 0).level, Level::Ok);
    }

    #[test]
    fn interfaces_and_bridges() {
        assert_eq!(interfaces_check("veth*", Ok(vec!["veth1".into()])).level, Level::Ok);
        let c = interfaces_check("cali*", Ok(vec![]));
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("no pods run"));
        let many: Vec<String> = (0..8).map(|i| format!("veth{i}")).collect();
        assert!(interfaces_check("veth*", Ok(many)).detail.ends_with("veth4 and 3 more"));
        let pods: std::collections::BTreeSet<String> = ["veth1".to_string()].into();
        assert_eq!(big_tcp_check(&Ok(vec![]), &pods).level, Level::Ok);
        assert_eq!(big_tcp_check(&Err("EPERM".into()), &pods).level, Level::Warn);
        let c = big_tcp_check(&Ok(vec![("eth0".into(), 65_536, 185_000)]), &pods);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("eth0 (gso_ipv4_max_size 65536, gro_ipv4_max_size 185000)"), "{}", c.detail);
        let c = big_tcp_check(&Ok(vec![("eth0".into(), 65_536, 185_000), ("veth1".into(), 185_000, 65_536)]), &pods);
        assert_eq!(c.level, Level::Fail);
        assert_eq!(bridge_check(&[], true).level, Level::Ok);
        let c = bridge_check(&["cni0".into()], true);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("cni0 matched but is a bridge"));
        assert!(c.fix.unwrap().contains("README.md"));
    }

    const FLANNEL: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
COMMIT
"#;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn finds_the_cni_masquerade() {
        let gw = [Ipv4Addr::new(192, 0, 2, 2)];
        let m = find_masquerade(FLANNEL, &[net("10.244.0.0/16")], &gw);
        assert_eq!(m.pod_rules.len(), 1, "{m:?}");
        assert!(m.pod_rules[0].starts_with("-A FLANNEL-POSTRTG -s 10.244.0.0/16"));
        // kube-proxy's last KUBE-POSTROUTING rule looks unconditional, but the chain returns
        // every unmarked packet first.
        assert_eq!(m.other_rules.len(), 1);
        assert!(m.other_rules[0].starts_with("-A KUBE-POSTROUTING"));
        // The older form with the mark on the MASQUERADE rule itself does not count either.
        let kube = "-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n";
        let m = find_masquerade(kube, &[net("10.244.0.0/16")], &gw);
        assert!(m.pod_rules.is_empty());
        assert_eq!(m.other_rules.len(), 1);
        let c = masquerade_check(Some(Ok(kube.into())), &[net("10.244.0.0/16")], &gw);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("none for pod sources 10.244.0.0/16"), "{}", c.detail);
    }

    #[test]
    fn masquerade_rules_for_other_sources_or_destinations_do_not_count() {
        let gw = [Ipv4Addr::new(192, 0, 2, 2)];
        let pods = [net("10.244.0.0/16")];
        let docker = "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n";
        assert!(find_masquerade(docker, &pods, &gw).pod_rules.is_empty());
        // The demo's node2 rule: only towards the gateway pod.
        let to_gw_pod = "-A POSTROUTING -d 10.245.0.10/32 -o cni0 -m conntrack --ctstate DNAT -j MASQUERADE\n";
        assert!(find_masquerade(to_gw_pod, &pods, &gw).pod_rules.is_empty());
        // Excluding the gateways' network.
        let not_gw = "-A POSTROUTING -s 10.244.0.0/16 ! -d 192.0.2.0/24 -j MASQUERADE\n";
        assert!(find_masquerade(not_gw, &pods, &gw).pod_rules.is_empty());
        // The demo's node1 rule, an SNAT, and Calico's ipset-based rule count.
        for rule in [
            "-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE",
            "-A POSTROUTING -s 10.244.0.0/16 -o eth0 -j SNAT --to-source 192.0.2.1",
            "-A cali-nat-outgoing -m comment --comment \"cali:flqWnvo8yq4ULQLa\" -m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE --random-fully",
            "-A POSTROUTING -j MASQUERADE",
        ] {
            assert_eq!(find_masquerade(rule, &pods, &gw).pod_rules.len(), 1, "{rule}");
        }
    }

    #[test]
    fn masquerade_verdicts() {
        let pods = [net("10.244.0.0/16")];
        let ok = masquerade_check(Some(Ok(FLANNEL.into())), &pods, &[]);
        assert_eq!(ok.level, Level::Ok);
        assert!(ok.detail.contains("`-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4"), "{}", ok.detail);
        let two = format!("{FLANNEL}-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\n");
        assert!(masquerade_check(Some(Ok(two)), &pods, &[]).detail.ends_with("(and 1 more)"));
        // Masquerading what is *not* marked applies to pods.
        let unmarked = "-A POSTROUTING -m mark ! --mark 0x1 -j MASQUERADE\n";
        assert_eq!(find_masquerade(unmarked, &pods, &[]).pod_rules.len(), 1);
        let none = masquerade_check(Some(Ok("*nat\nCOMMIT\n".into())), &pods, &[]);
        assert_eq!(none.level, Level::Warn);
        assert!(none.detail.starts_with("no MASQUERADE or SNAT rule"));
        assert!(none.fix.unwrap().contains("-s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE"));
        assert_eq!(masquerade_check(None, &pods, &[]).level, Level::Warn);
        assert_eq!(masquerade_check(Some(Err("permission denied".into())), &pods, &[]).level, Level::Warn);
    }

    #[test]
    fn words_keep_quoted_comments() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a -s b" -j MASQUERADE"#),
            ["-A", "X", "-m", "comment", "--comment", "a -s b", "-j", "MASQUERADE"]
        );
    }

    #[test]
    fn renders_one_line_per_check_with_fixes() {
        let checks = vec![
            Check::new("kernel version", Level::Ok, "6.18.0 (5.4 or newer)"),
            Check::new("bpffs", Level::Fail, "/x is not on a bpffs").fix("mount it"),
        ];
        let out = render(&checks);
        assert_eq!(
            out,
            "OK    kernel version: 6.18.0 (5.4 or newer)\nFAIL  bpffs: /x is not on a bpffs\n      fix: mount it\n\
             1 ok, 0 info, 0 warnings, 1 failures\n"
        );
        assert!(failed(&checks));
        assert!(!failed(&checks[..1]));
    }
}

#[cfg(test)]
mod tunnel_tests {
    use super::*;

    #[expect(clippy::unnecessary_wraps, reason = "forward_check takes what iptables_save returns")]
    fn filter(rules: &str) -> Option<Result<String, String>> {
        Some(Ok(format!("*filter\n:INPUT ACCEPT [0:0]\n{rules}\nCOMMIT\n")))
    }

    #[test]
    fn forward_rules_that_drop_decapsulated_traffic_are_named() {
        let up = ["eth0".to_string()];
        let peers = ["10.245.0.0/16".parse().unwrap()];
        let c = forward_check(filter(":FORWARD ACCEPT [0:0]\n-A FORWARD -i eth0 -j DROP"), &up, &peers);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.detail.contains("-A FORWARD -i eth0 -j DROP") && c.fix.as_deref().unwrap().contains("10.245.0.0/16"), "{c:?}");
        let c = forward_check(filter(":FORWARD DROP [0:0]"), &up, &peers);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        let c = forward_check(filter(":FORWARD DROP [0:0]\n-A FORWARD -i eth0 -s 10.245.0.0/16 -j ACCEPT\n-A FORWARD -i eth0 -j DROP"), &up, &peers);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        // A drop on another interface does not touch the tunnel's packets.
        let c = forward_check(filter(":FORWARD ACCEPT [0:0]\n-A FORWARD -i wlan+ -j DROP"), &up, &peers);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert_eq!(forward_check(None, &up, &peers).level, Level::Warn);
    }

    /// kube-proxy 1.18's FORWARD rules, as `iptables-save` prints them.
    const KUBE_PROXY: &str = "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
        -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT";

    #[test]
    fn kube_proxys_invalid_drop_fails_stack_delivery() {
        let up = ["eth0".to_string()];
        let peers = ["10.245.0.0/16".parse().unwrap()];
        // Reached through a jump.
        let rules = format!(":FORWARD DROP [0:0]\n{KUBE_PROXY}\n-A FORWARD -i eth0 -s 10.245.0.0/16 -j ACCEPT");
        let c = forward_check(filter(&rules), &up, &peers);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(c.detail.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"), "{c:?}");
        assert!(c.fix.as_deref().unwrap().contains("delivery: redirect"), "{c:?}");
        // An ACCEPT of the peers' traffic from the uplink ahead of it exempts the tunnel.
        let rules = format!(":FORWARD DROP [0:0]\n-A FORWARD -i eth0 -s 10.245.0.0/16 -j ACCEPT\n{KUBE_PROXY}");
        assert_eq!(forward_check(filter(&rules), &up, &peers).level, Level::Ok);
        // Through a goto, past a chain that returns early.
        let c = forward_check(filter("-A FORWARD -j R\n-A R -j RETURN\n-A R -j DROP\n-A FORWARD -g G\n-A G -m conntrack --ctstate INVALID -j DROP"), &up, &peers);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        // Two jumps deep, with --state, and on an interface pattern that holds the uplink.
        let c = forward_check(filter("-A FORWARD -i eth+ -m conntrack --ctstate INVALID -j DROP"), &up, &peers);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        let c = forward_check(filter("-A FORWARD -j A\n-A A -j B\n-A B -m state --state NEW,INVALID -j REJECT"), &up, &peers);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        // A chain FORWARD never jumps to, a negated state, or another verdict: not this.
        for rules in [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A FORWARD -m conntrack ! --ctstate INVALID -j DROP",
            "-A FORWARD -m conntrack --ctstate INVALID -j LOG",
            "-A FORWARD -j A\n-A A -j A",
            "-A FORWARD -i wlan+ -m conntrack --ctstate INVALID -j DROP",
        ] {
            assert_ne!(forward_check(filter(rules), &up, &peers).level, Level::Fail, "{rules}");
        }
    }

    #[test]
    fn the_tunnel_port_is_reserved_by_a_nodeport_and_free_of_sockets() {
        let nat = |r: &str| Ok(format!("*nat\n{r}\nCOMMIT\n"));
        let rule = "-A KUBE-NODEPORTS -p udp -m comment --comment \"kube-system/meshnet-tunnel\" -m udp --dport 31800 -j KUBE-EXT-X";
        assert_eq!(tunnel_port_check(31800, Some(&nat(rule)), Some(&[53])).level, Level::Ok);
        assert_eq!(tunnel_port_check(31801, Some(&nat(rule)), Some(&[])).level, Level::Warn);
        let c = tunnel_port_check(31800, Some(&nat(rule)), Some(&[31800]));
        assert!(c.level == Level::Warn && c.detail.contains("socket"), "{c:?}");
    }

    #[test]
    fn uplinks_must_match_and_not_be_pod_interfaces() {
        let pods = std::collections::BTreeSet::from(["veth1".to_string()]);
        let p = ["eth*".to_string()];
        assert_eq!(uplinks_check(&p, Ok(vec![]), &pods).level, Level::Fail);
        assert_eq!(uplinks_check(&p, Ok(vec!["eth0".into()]), &pods).level, Level::Ok);
        assert_eq!(uplinks_check(&p, Ok(vec!["veth1".into()]), &pods).level, Level::Warn);
    }

    #[test]
    fn an_uplink_whose_master_has_another_mac_is_named() {
        let port = |mac: &str| Enslaved { uplink: "eth0".into(), mac: mac.into(), master: "br0".into(), master_mac: "02:00:00:00:00:01".into() };
        assert_eq!(uplink_mac_check(&[None, None]), None, "no enslaved uplink, no row");
        assert_eq!(uplink_mac_check(&[Some(port("02:00:00:00:00:01"))]).unwrap().level, Level::Ok);
        let c = uplink_mac_check(&[None, Some(port("02:00:00:00:00:02"))]).unwrap();
        assert!(c.level == Level::Warn && c.detail.contains("another host's") && c.fix.as_deref().unwrap_or("").contains("br0"), "{c:?}");
    }

    #[test]
    fn an_enslaved_uplink_is_read_from_sysfs() {
        let dir = crate::scratch::Scratch::new("doctor-sysfs");
        let sys = dir.0.as_path();
        for (dev, mac) in [("eth0", "02:00:00:00:00:02"), ("br0", "02:00:00:00:00:01"), ("eth1", "02:00:00:00:00:03"), ("eth2", "02:00:00:00:00:04"), ("vrf0", "02:00:00:00:00:05")] {
            std::fs::create_dir_all(sys.join(dev)).unwrap();
            std::fs::write(sys.join(dev).join("address"), format!("{mac}\n")).unwrap();
        }
        std::fs::create_dir(sys.join("br0").join("bridge")).unwrap();
        std::os::unix::fs::symlink("../br0", sys.join("eth0").join("master")).unwrap();
        std::os::unix::fs::symlink("../vrf0", sys.join("eth2").join("master")).unwrap();
        let want = Enslaved { uplink: "eth0".into(), mac: "02:00:00:00:00:02".into(), master: "br0".into(), master_mac: "02:00:00:00:00:01".into() };
        assert_eq!(enslaved(sys, "eth0"), Some(want));
        assert_eq!(enslaved(sys, "eth1"), None, "no master");
        assert_eq!(enslaved(sys, "eth2"), None, "a VRF's MAC is no address peers send to");
    }
}
