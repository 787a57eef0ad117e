//! The shipped image: `cargo xtask image` builds it with buildah (no daemon) from the static
//! binary. The same inputs give byte-identical archives; the docker-archive holds one layer
//! with the binary and its licences, root-owned, and a config that runs `meshnet` as the
//! unprivileged user the manifests expect. Unpacked, the image's root runs the agent as the
//! DaemonSet does (uid 0, exactly its capabilities, read-only root, the config and the bpffs
//! mounted in) in the two-cluster topology, where it translates a request to a remote pod,
//! and `meshnet doctor` from it judges the node.
//!
//! `cargo xtask test` sets MESHNET_STATIC_BIN to the static binary it built, and the image
//! build takes that file instead of building it again.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _, io::AsRawFd as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use meshnet_tests::{
    container, peer, poll, strings,
    topo::{self, app_a, Options, TempDir, Topology},
    ChildGuard, NetNs,
};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn static_bin() -> PathBuf {
    let p = std::env::var_os("MESHNET_STATIC_BIN")
        .map_or_else(|| repo().join("target/x86_64-unknown-linux-musl/release/meshnet"), PathBuf::from);
    assert!(
        p.exists(),
        "the static meshnet is missing at {}: build it with `cargo xtask build-static` (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// `true` when buildah runs here; otherwise prints the counted skip line.
fn have_buildah() -> bool {
    if Command::new("buildah").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    meshnet_tests::skip("buildah (`cargo xtask setup` installs it)");
    false
}

/// `cargo xtask image --binary BINARY --out-dir OUT`: whether it succeeded, and its output.
fn xtask_image(binary: &Path, out: &Path) -> (bool, String) {
    let o = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args(["xtask", "image", "--binary"])
        .arg(binary)
        .arg("--out-dir")
        .arg(out)
        // The archives' times come from SOURCE_DATE_EPOCH when it is set; this test expects 0.
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn build(out: &Path) -> PathBuf {
    let (ok, text) = xtask_image(&static_bin(), out);
    assert!(ok, "cargo xtask image failed:\n{text}");
    println!("{text}");
    out.join(format!("meshnet-{VERSION}.docker.tar"))
}

/// One entry of a tar archive's headers.
#[derive(Debug)]
struct Entry {
    path: String,
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

/// The entries of an (uncompressed, ustar or pax) tar archive.
fn tar_entries(bytes: &[u8]) -> Vec<Entry> {
    let octal = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
        if s.is_empty() { 0 } else { u64::from_str_radix(s, 8).unwrap_or_else(|e| panic!("tar number {s:?}: {e}")) }
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap()).into_owned();
    let mut entries = Vec::new();
    let mut at = 0;
    let mut long_path = None;
    while at + 512 <= bytes.len() && bytes[at..at + 512].iter().any(|&b| b != 0) {
        let h = &bytes[at..at + 512];
        let size = usize::try_from(octal(&h[124..136])).unwrap();
        let data = &bytes[at + 512..at + 512 + size];
        at += 512 + size.div_ceil(512) * 512;
        match h[156] {
            // A pax header: only its path matters here.
            b'x' => {
                long_path = String::from_utf8_lossy(data)
                    .lines()
                    .find_map(|l| l.split_once(" path=").map(|(_, p)| p.to_string()));
                continue;
            }
            b'g' => continue,
            _ => {}
        }
        let prefix = text(&h[345..500]);
        let name = text(&h[..100]);
        let path = long_path.take().unwrap_or_else(|| if prefix.is_empty() { name } else { format!("{prefix}/{name}") });
        entries.push(Entry {
            path,
            kind: h[156],
            mode: u32::try_from(octal(&h[100..108])).unwrap(),
            uid: octal(&h[108..116]),
            gid: octal(&h[116..124]),
            mtime: octal(&h[136..148]),
        });
    }
    entries
}

/// A docker-archive unpacked: the image's root filesystem, its config and its tags.
struct Unpacked {
    _dir: TempDir,
    root: PathBuf,
    config: Value,
    repo_tags: Vec<String>,
    layer: Vec<Entry>,
}

fn unpack(archive: &Path) -> Unpacked {
    let dir = TempDir::new();
    let (files, root) = (dir.0.join("archive"), dir.0.join("rootfs"));
    for d in [&files, &root] {
        std::fs::create_dir(d).unwrap();
    }
    meshnet_tests::sh(&format!("tar -xf {} -C {}", archive.display(), files.display()));
    let manifest: Value = serde_json::from_slice(&std::fs::read(files.join("manifest.json")).unwrap()).unwrap();
    let images = manifest.as_array().unwrap();
    assert_eq!(images.len(), 1, "one image in the archive: {manifest}");
    let config: Value = serde_json::from_slice(&std::fs::read(files.join(images[0]["Config"].as_str().unwrap())).unwrap()).unwrap();
    let layers: Vec<&str> = images[0]["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(layers.len(), 1, "the image is one layer: {manifest}");
    let layer_file = files.join(layers[0]);
    // What `docker load` checks: the layer's digest is the config's diff_id.
    let sum = meshnet_tests::sh(&format!("sha256sum {}", layer_file.display()));
    let diff_id = format!("sha256:{}", sum.split_whitespace().next().unwrap());
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]), "the layer is not the one the config names");
    let layer = tar_entries(&std::fs::read(&layer_file).unwrap());
    meshnet_tests::sh(&format!("tar --numeric-owner -xpf {} -C {}", layer_file.display(), root.display()));
    let repo_tags = images[0]["RepoTags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    Unpacked { _dir: dir, root, config, repo_tags, layer }
}

/// A YAML document of the repository's deploy/.
fn yaml(path: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(repo().join(path)).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The agent container's capabilities in a manifest: it drops all and adds these.
fn agent_caps(path: &str) -> Vec<String> {
    let caps = container(&yaml(path), "agent")["securityContext"]["capabilities"].clone();
    assert_eq!(strings(&caps["drop"]), ["ALL"], "{path}: the agent drops every capability it does not add");
    strings(&caps["add"])
}

fn cap_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} of a manifest is not in this test's table (include/uapi/linux/capability.h)"),
    }
}

#[test]
fn image_is_reproducible_with_the_layout_the_manifests_expect() {
    meshnet_tests::require_root();
    if !have_buildah() {
        return;
    }
    let (first, second) = (TempDir::new(), TempDir::new());
    let docker = build(&first.0);
    // The same binary with another mtime and mode, from another path: the image must not
    // change.
    let copy = second.0.join("input-meshnet");
    std::fs::copy(static_bin(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1))
        .unwrap();
    let out2 = second.0.join("out");
    let (ok, text) = xtask_image(&copy, &out2);
    assert!(ok, "the second cargo xtask image failed:\n{text}");
    for name in [format!("meshnet-{VERSION}.docker.tar"), format!("meshnet-{VERSION}.oci.tar")] {
        let (a, b) = (std::fs::read(first.0.join(&name)).unwrap(), std::fs::read(out2.join(&name)).unwrap());
        assert!(a == b, "{name} differs between two builds of the same inputs");
    }

    let image = unpack(&docker);
    let entries: BTreeMap<&str, &Entry> = image.layer.iter().map(|e| (e.path.trim_end_matches('/'), e)).collect();
    let dirs = ["usr", "usr/local", "usr/local/bin", "usr/share", "usr/share/doc", "usr/share/doc/meshnet"];
    let files = [("usr/local/bin/meshnet", 0o755), ("usr/share/doc/meshnet/LICENSE", 0o644), ("usr/share/doc/meshnet/THIRD-PARTY-LICENSES", 0o644)];
    let want: Vec<&str> = dirs.iter().copied().chain(files.iter().map(|f| f.0)).collect();
    assert_eq!(entries.keys().copied().collect::<Vec<_>>(), { let mut w = want.clone(); w.sort_unstable(); w }, "the layer's files");
    for e in &image.layer {
        assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}: owner and time", e.path);
    }
    for d in dirs {
        assert_eq!((entries[d].kind, entries[d].mode & 0o7777), (b'5', 0o755), "{d}");
    }
    for (f, mode) in files {
        assert_eq!((entries[f].kind, entries[f].mode & 0o7777), (b'0', mode), "{f}");
    }
    assert!(
        std::fs::read(image.root.join("usr/local/bin/meshnet")).unwrap() == std::fs::read(static_bin()).unwrap(),
        "the image's binary is not the static build"
    );
    let license = std::fs::read_to_string(image.root.join("usr/share/doc/meshnet/LICENSE")).unwrap();
    assert!(license.contains("licensed under MIT OR Apache-2.0"), "{license}");
    assert!(license.contains("(meshnet-ebpf) is licensed under GPL-2.0 OR MIT"), "{license}");
    let third = std::fs::read_to_string(image.root.join("usr/share/doc/meshnet/THIRD-PARTY-LICENSES")).unwrap();
    for line in ["  aya 0.14.0: MIT OR Apache-2.0", "  aya-ebpf 0.2.1: MIT OR Apache-2.0"] {
        assert!(third.lines().any(|l| l == line), "no `{line}` in THIRD-PARTY-LICENSES");
    }
    assert!(third.lines().any(|l| l.starts_with("  tokio ")), "tokio is not listed");
    assert!(third.contains("Apache License") && third.contains("Permission is hereby granted"), "the licence texts are missing");

    // The config: what Kubernetes runs when a manifest gives no command.
    let c = &image.config;
    assert_eq!((c["os"].as_str(), c["architecture"].as_str()), (Some("linux"), Some("amd64")));
    assert_eq!(c["created"], "1970-01-01T00:00:00Z");
    assert_eq!(c["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/meshnet"]));
    assert!(c["config"]["Cmd"].is_null(), "a Cmd would be appended to the manifests' args: {c}");
    assert_eq!(c["config"]["User"], "65532:65532");
    // The manifests' image and users.
    for (path, name) in [("deploy/base/agent.yaml", "agent"), ("deploy/base/controller.yaml", "controller")] {
        let image_ref = container(&yaml(path), name)["image"].as_str().unwrap().to_string();
        assert_eq!(image_ref, format!("meshnet:{VERSION}"), "{path}");
        assert_eq!(image.repo_tags, [format!("docker.io/library/{image_ref}")], "the tag `docker load` gives");
    }
    let controller = yaml("deploy/base/controller.yaml");
    let pod = &controller["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(format!("{}:{}", pod["runAsUser"].as_u64().unwrap(), pod["runAsGroup"].as_u64().unwrap()), "65532:65532");
    assert_eq!(container(&yaml("deploy/base/agent.yaml"), "agent")["securityContext"]["runAsUser"].as_u64(), Some(0));
}

/// Every program the manifests under deploy/ run in the image, as (manifest, what, path): each
/// container's `command[0]` and each exec probe's. Without a `command`, the image's entrypoint
/// runs, which the test above checks.
fn manifest_programs() -> Vec<(String, String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("deploy"), &mut files);
    files.sort();
    let mut programs = Vec::new();
    for file in files {
        let name = file.strip_prefix(repo()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in text.split("\n---\n") {
            let doc: serde_yaml::Value = serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            let pod = if doc["kind"] == "Pod" { doc["spec"].clone() } else { doc["spec"]["template"]["spec"].clone() };
            for list in ["initContainers", "containers"] {
                for c in pod[list].as_sequence().into_iter().flatten() {
                    let who = c["name"].as_str().unwrap_or("?");
                    if let Some(cmd) = c["command"].as_sequence() {
                        programs.push((name.clone(), format!("{who}: command"), cmd[0].as_str().unwrap().to_string()));
                    }
                    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                        if let Some(cmd) = c[probe]["exec"]["command"].as_sequence() {
                            programs.push((name.clone(), format!("{who}: {probe}"), cmd[0].as_str().unwrap().to_string()));
                        }
                    }
                }
            }
        }
    }
    programs
}

/// The image is FROM scratch: a manifest that runs anything but what it holds (a shell, say)
/// makes a pod that never starts. Every container's command and exec probe is an executable
/// file of the image.
#[test]
fn every_program_the_manifests_run_is_in_the_image() {
    let programs = manifest_programs();
    // The walk finds what it must: the uninstall's command and the workloads' probes.
    for (file, what) in [("deploy/detach.yaml", "detach: command"), ("deploy/base/agent.yaml", "agent: livenessProbe"), ("deploy/base/controller.yaml", "controller: readinessProbe")] {
        assert!(programs.iter().any(|p| p.0 == file && p.1 == what), "{file}: no {what} found in {programs:?}");
    }
    if !have_buildah() {
        return;
    }
    let out = TempDir::new();
    let image = unpack(&build(&out.0));
    for (file, what, program) in &programs {
        assert!(program.starts_with('/'), "{file}: {what}: {program} is not an absolute path");
        let in_image = image.root.join(program.trim_start_matches('/'));
        let meta = std::fs::symlink_metadata(&in_image).unwrap_or_else(|e| panic!("{file}: {what}: {program} is not in the image: {e}"));
        assert!(meta.is_file() && meta.permissions().mode() & 0o111 == 0o111, "{file}: {what}: {program} is not an executable file: {meta:?}");
    }
}

#[test]
fn image_build_refuses_a_missing_or_dynamic_binary() {
    if !have_buildah() {
        return;
    }
    let out = TempDir::new();
    let (ok, text) = xtask_image(Path::new("/nonexistent/meshnet"), &out.0);
    assert!(!ok && text.contains("reading the static meshnet /nonexistent/meshnet"), "{text}");
    // A dynamically linked program: this test itself.
    let exe = std::env::current_exe().unwrap();
    let (ok, text) = xtask_image(&exe, &out.0);
    assert!(!ok && text.contains("dynamically linked") && text.contains("cargo xtask build-static"), "{text}");
    assert!(!out.0.join(format!("meshnet-{VERSION}.docker.tar")).exists());
}

/// The unpacked image's root with the mountpoints a container runtime would create.
struct Jail {
    root: PathBuf,
    netns: PathBuf,
    bpffs: PathBuf,
    config_dir: PathBuf,
    /// Mounted at /run/meshnet, as the pod's emptyDir for the health socket.
    run_dir: PathBuf,
    caps: u64,
}

/// Writes `msg` to stderr without allocating (between fork and exec).
fn child_error(msg: &[u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    // SAFETY: write(2) of a valid buffer; async-signal-safe.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    err
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

impl Jail {
    /// `meshnet ARGS` from the image's root as the agent's container runs it: in the node's
    /// network namespace, a private mount namespace with the root read-only, proc, a
    /// read-only sysfs, the bpffs and the config (read-only) mounted in; uid 0 with exactly
    /// `caps` as bounding, permitted and effective set (none inheritable or ambient) and no
    /// new privileges; the container's environment only. What runc does, done here because
    /// setpriv cannot: entering the root (chroot) needs CAP_SYS_CHROOT, which the DaemonSet
    /// does not grant, and setpriv is not in the image to run after it.
    fn command(&self, args: &[&str]) -> Command {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let root = c(&self.root);
        let (proc_, sys, bpf, etc, run) = (
            c(&self.root.join("proc")),
            c(&self.root.join("sys")),
            c(&self.root.join("sys/fs/bpf")),
            c(&self.root.join("etc/meshnet")),
            c(&self.root.join("run/meshnet")),
        );
        let (bpffs, config, run_dir) = (c(&self.bpffs), c(&self.config_dir), c(&self.run_dir));
        let (slash, proc_fs, sysfs) = (c(Path::new("/")), CString::new("proc").unwrap(), CString::new("sysfs").unwrap());
        let netns = std::fs::File::open(&self.netns).unwrap();
        let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").unwrap().trim().parse().unwrap();
        let caps = self.caps;
        let mut cmd = Command::new("/usr/local/bin/meshnet");
        cmd.args(args).env_clear().env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").env("MESHNET_LOG", "info");
        // SAFETY: only syscalls between fork and exec, on buffers prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let none = std::ptr::null::<libc::c_char>();
                let mount = |src: &CString, dst: &CString, fs: *const libc::c_char, flags: libc::c_ulong| {
                    libc::mount(src.as_ptr(), dst.as_ptr(), fs, flags, std::ptr::null())
                };
                let remount_ro = |dst: &CString| {
                    libc::mount(none, dst.as_ptr(), none, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY, std::ptr::null())
                };
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(child_error(b"image test: setns failed\n"));
                }
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(none, slash.as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0
                {
                    return Err(child_error(b"image test: private mount namespace failed\n"));
                }
                if mount(&root, &root, none, libc::MS_BIND) != 0 || remount_ro(&root) != 0 {
                    return Err(child_error(b"image test: read-only root failed\n"));
                }
                let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                if mount(&proc_fs, &proc_, proc_fs.as_ptr(), nodev) != 0
                    || mount(&sysfs, &sys, sysfs.as_ptr(), nodev | libc::MS_RDONLY) != 0
                    || mount(&bpffs, &bpf, none, libc::MS_BIND) != 0
                    || mount(&config, &etc, none, libc::MS_BIND) != 0
                    || remount_ro(&etc) != 0
                    || mount(&run_dir, &run, none, libc::MS_BIND) != 0
                {
                    return Err(child_error(b"image test: mounting proc, sysfs, the bpffs, the config or /run/meshnet failed\n"));
                }
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(slash.as_ptr()) != 0 || libc::setgroups(0, std::ptr::null()) != 0 {
                    return Err(child_error(b"image test: entering the root failed\n"));
                }
                for cap in 0..=last_cap {
                    if caps & (1 << cap) == 0 && libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0 {
                        return Err(child_error(b"image test: dropping a capability from the bounding set failed\n"));
                    }
                }
                // uid 0 gets its bounding set as permitted and effective at exec; nothing
                // inheritable or ambient, as under CRI runtimes.
                let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
                let mut data = [CapData::default(); 2];
                if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) != 0 {
                    return Err(child_error(b"image test: capget failed\n"));
                }
                data[0].inheritable = 0;
                data[1].inheritable = 0;
                if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0
                    || libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(child_error(b"image test: setting the capabilities failed\n"));
                }
                Ok(())
            });
        }
        cmd
    }
}

/// A capability line of /proc/PID/status, as a mask.
fn status_caps(status: &str, field: &str) -> u64 {
    let hex = status.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// GET `path` from the agent's metrics address in the node's namespace: the status line.
fn http_status(ns: &NetNs, addr: &str, path: &str) -> Option<String> {
    let (addr, path) = (addr.to_string(), path.to_string());
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply.lines().next().map(str::to_string)
    })
}

/// The agent from the unpacked image with `caps`, with the args of deploy/base/agent.yaml
/// (without `--kube`: there is no API server here), on node1 of the two-cluster topology.
fn agent_from_image(root: &Path, manifest: &str, caps: &[String]) {
    let t = Topology::new(Options::default());
    let agent = container(&yaml("deploy/base/agent.yaml"), "agent");
    let args: Vec<String> = strings(&agent["args"]).into_iter().filter(|a| a != "--kube").collect();
    let flag = |name: &str| args.iter().position(|a| a == name).map_or_else(|| panic!("no {name} in {args:?}"), |i| args[i + 1].clone());
    let (config_path, metrics) = (flag("--config"), flag("--metrics-addr"));
    let mounts = agent["volumeMounts"].as_sequence().unwrap();
    let mount_path = |volume: &str| {
        mounts.iter().find(|m| m["name"].as_str() == Some(volume)).and_then(|m| m["mountPath"].as_str()).unwrap().to_string()
    };
    assert_eq!(Path::new(&config_path).parent(), Some(Path::new(&mount_path("config"))), "--config is not in the config volume");
    assert_eq!(mount_path("pins"), "/sys/fs/bpf/meshnet", "the agent's default --pin-path");
    let config_dir = TempDir::new();
    std::fs::write(config_dir.0.join(Path::new(&config_path).file_name().unwrap()), topo::node1_config(topo::POD_INTERFACES)).unwrap();
    let mut mask = caps.iter().fold(0u64, |m, c| m | 1 << cap_number(c));
    // Root in some sandboxes lacks a capability (this one has no SYS_RESOURCE, which kernels
    // from 5.11 on do not need for BPF): the agent cannot get more than this test has.
    let own = status_caps(&std::fs::read_to_string("/proc/self/status").unwrap(), "CapBnd:");
    if mask & !own != 0 {
        let missing: Vec<&String> = caps.iter().filter(|c| own & 1 << cap_number(c) == 0).collect();
        let line = format!("note: {manifest}: this test's root lacks {missing:?}; the agent runs without them\n");
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
        mask &= own;
    }
    let run_dir = TempDir::new();
    let jail = Jail {
        root: root.to_path_buf(),
        netns: t.node1.path(),
        bpffs: t.bpffs.dir.clone(),
        config_dir: config_dir.0.clone(),
        run_dir: run_dir.0.clone(),
        caps: mask,
    };

    let agent_argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = ChildGuard::spawn(&mut jail.command(&agent_argv));
    child.wait_for_line("meshnet agent ready", Duration::from_secs(90));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid())).unwrap();
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(status_caps(&status, field), mask, "{manifest}: {field} of the agent is not {caps:?}");
    }
    assert_eq!((status_caps(&status, "CapInh:"), status_caps(&status, "CapAmb:")), (0, 0), "{manifest}");
    assert!(status.lines().any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])), "{manifest}: privileges can be gained");
    assert!(status.lines().any(|l| l.split_whitespace().nth(1) == Some("0") && l.starts_with("Uid:")), "{manifest}: not uid 0");
    let ready = poll(Duration::from_mins(1), || http_status(&t.node1, &metrics, "/readyz").filter(|l| l.contains(" 200 ")));
    assert!(ready.is_some(), "{manifest}: /readyz is not 200: {:?}", http_status(&t.node1, &metrics, "/readyz"));
    // The DaemonSet's exec probes, run in the container as the kubelet runs them.
    for (probe, body) in [("livenessProbe", "ok\n"), ("readinessProbe", "ready\n")] {
        let cmd = strings(&agent[probe]["exec"]["command"]);
        assert_eq!(cmd[0], "/usr/local/bin/meshnet", "{manifest}: {probe}");
        let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
        let answered = poll(Duration::from_mins(1), || jail.command(&args).output().ok().filter(|o| o.status.success()));
        let out = answered.unwrap_or_else(|| panic!("{manifest}: {probe} {cmd:?} fails: {:?}", jail.command(&args).output()));
        assert_eq!(String::from_utf8_lossy(&out.stdout), body, "{manifest}: {probe}");
    }

    let reply = t.client.run(|| peer::tcp_request(app_a(), "from the image")).unwrap_or_else(|e| panic!("{manifest}: TCP to app-a: {e}"));
    assert_eq!(reply, "app 10.245.0.20:8080 got from the image", "{manifest}");
    let out = jail.command(&["maps", "dump", "stats", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{manifest}: maps dump from the image: {}", String::from_utf8_lossy(&out.stderr));
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(dump["stats"]["flow_opened"].as_u64() >= Some(1), "{manifest}: nothing redirected: {dump}");

    // doctor from the image, with the agent's rights and no iptables binaries: it reads the
    // node's nat rules from the kernel (iptables-nft's here, over netlink) and finds the
    // masquerade the topology set up for the pods.
    let out = jail.command(&["doctor", "--config", &config_path]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{manifest}: doctor from the image failed:\n{text}");
    let masquerade = text.lines().find(|l| l.contains("masquerade:")).unwrap_or_else(|| panic!("no masquerade check:\n{text}"));
    assert!(masquerade.starts_with("OK") && masquerade.contains("! -d 10.244.0.0/16 -j MASQUERADE"), "{manifest}: {masquerade}");
    assert!(text.contains(&format!("{config_path} is valid")), "{manifest}:\n{text}");
    assert!(child.stop(), "{manifest}: the agent did not exit cleanly:\n{}", child.output());
}

#[test]
fn unpacked_image_runs_the_agent_with_the_daemonsets_capabilities() {
    meshnet_tests::require_root();
    if !have_buildah() {
        return;
    }
    let out = TempDir::new();
    let image = unpack(&build(&out.0));
    // The mountpoints a runtime creates in the container's root.
    for d in ["proc", "sys", "etc/meshnet", "run/meshnet"] {
        std::fs::create_dir_all(image.root.join(d)).unwrap();
    }
    // The default DaemonSet, and the variant for older kernels and Docker 19.03 (which works
    // on newer kernels too).
    for manifest in ["deploy/base/agent.yaml", "deploy/overlays/centos7-docker19/older-kernel.yaml"] {
        agent_from_image(&image.root, manifest, &agent_caps(manifest));
    }
}
