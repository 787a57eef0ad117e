//! `cargo xtask image`: meshnet's OCI image, built with buildah from deploy/Dockerfile without
//! a daemon, written as a `docker load`-able docker-archive and an OCI archive.
//!
//! The same inputs give the same bytes: buildah's `--timestamp` fixes the created time and the
//! layer's file times, the staged files get fixed modes (ownership is root's by COPY), the
//! history is omitted, and the OCI archive is tarred here with fixed metadata, because
//! buildah's own `oci-archive:` writer stamps the current time on its entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{cargo, output, root_dir, run, STATIC_TARGET};

/// The repository name of the image; deploy/base/*.yaml run `meshnet:VERSION`.
const NAME: &str = "meshnet";
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The static `meshnet` to put in the image instead of building it (`cargo xtask test`
    /// exports the one it built as MESHNET_STATIC_BIN).
    #[arg(long, env = "MESHNET_STATIC_BIN")]
    binary: Option<PathBuf>,
    /// Where to write the archives (and stage the build context): target/image by default.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn image(args: &ImageArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if output(Command::new("buildah").arg("--version")).is_none() {
        bail!("`cargo xtask image` needs buildah: run `cargo xtask setup` (or `apt-get install buildah`)");
    }
    let root = root_dir();
    let out = args.out_dir.clone().unwrap_or_else(|| root.join("target/image"));
    // Absolute, so that the summary printed at the end names the files wherever the command
    // ran from.
    let out = std::path::absolute(&out).with_context(|| format!("resolving {}", out.display()))?;
    if out.to_string_lossy().contains(':') {
        bail!("{} contains a `:`, which buildah's archive references (`docker-archive:PATH:TAG`) cannot take", out.display());
    }
    let binary = match &args.binary {
        Some(b) => {
            println!("xtask: putting {} in the image (not rebuilding it)", b.display());
            b.clone()
        }
        None => crate::build_static()?,
    };
    let bytes = std::fs::read(&binary).with_context(|| format!("reading the static meshnet {}", binary.display()))?;
    check_static(&bytes).with_context(|| {
        format!("{} cannot run in a FROM scratch image; `cargo xtask build-static` builds the one that can", binary.display())
    })?;

    let context = out.join("context");
    let state = out.join("buildah");
    for dir in [&context, &state] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing the previous {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The modes are the image's: a COPY keeps them, and the caller's umask must not change
    // the digest.
    let put = |name: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        let p = context.join(name);
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", p.display()))
    };
    put("meshnet", &bytes, 0o755)?;
    let (license, third_party) = licences()?;
    put("LICENSE", license.as_bytes(), 0o644)?;
    put("THIRD-PARTY-LICENSES", third_party.as_bytes(), 0o644)?;

    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s.trim().parse::<u64>().with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds"))?,
        Err(_) => 0,
    };
    let buildah = Buildah::new(&state)?;
    let iid = state.join("iid");
    run(buildah
        .cmd("build")
        .args(["--quiet", "--pull=never", "--layers=false", "--format", "oci", "--omit-history", "--identity-label=false"])
        // Nothing runs in the build (COPY, USER and ENTRYPOINT only); chroot is the isolation
        // that would need no runtime if something did.
        .args(["--isolation", "chroot", "--timestamp", &epoch.to_string()])
        .arg("--iidfile")
        .arg(&iid)
        .arg("-f")
        .arg(root.join("deploy/Dockerfile"))
        .arg(&context))
    .context("buildah build")?;
    let id = std::fs::read_to_string(&iid).with_context(|| format!("reading {}", iid.display()))?.trim().to_string();

    let tag = format!("{NAME}:{VERSION}");
    let docker = out.join(format!("{NAME}-{VERSION}.docker.tar"));
    let oci = out.join(format!("{NAME}-{VERSION}.oci.tar"));
    let oci_dir = state.join("oci");
    for f in [&docker, &oci] {
        // buildah adds to an existing docker-archive rather than replacing it.
        if f.exists() {
            std::fs::remove_file(f).with_context(|| format!("removing the previous {}", f.display()))?;
        }
    }
    let digest_file = state.join("oci-digest");
    run(buildah.cmd("push").arg(&id).arg(format!("docker-archive:{}:{tag}", docker.display()))).context("writing the docker-archive")?;
    run(buildah.cmd("push").arg("--digestfile").arg(&digest_file).arg(&id).arg(format!("oci:{}:{tag}", oci_dir.display())))
        .context("writing the OCI layout")?;
    let digest = std::fs::read_to_string(&digest_file).with_context(|| format!("reading {}", digest_file.display()))?;
    run(Command::new("tar")
        .args(["--create", "--file"])
        .arg(&oci)
        .arg("--directory")
        .arg(&oci_dir)
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--mode=u+rw,go+r,go-w", "--format=ustar"])
        .args(["oci-layout", "index.json", "blobs"]))
    .context("writing the OCI archive")?;
    // The storage holds vfs copies of everything; the archives are what is kept.
    std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;

    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    println!("xtask: image {tag}: image ID {id}, OCI manifest digest {}", digest.trim());
    println!("xtask: docker-archive (`docker load -i`) at {} ({} bytes)", docker.display(), size(&docker));
    println!("xtask: OCI archive at {} ({} bytes)", oci.display(), size(&oci));
    println!("xtask: the image build took {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// buildah on a private vfs storage under `state`, with none of the machine's containers
/// configuration: the image depends on the inputs only, and nothing is left in the machine's
/// storage.
struct Buildah {
    env: Vec<(&'static str, PathBuf)>,
    policy: PathBuf,
}

impl Buildah {
    fn new(state: &Path) -> anyhow::Result<Self> {
        let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let p = state.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let storage = write(
            "storage.conf",
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                state.join("root").display(),
                state.join("run").display()
            ),
        )?;
        let containers = write("containers.conf", String::new())?;
        let registries = write("registries.conf", String::new())?;
        // Only local storage and local archives take part; signatures do not apply.
        let policy = write("policy.json", r#"{"default":[{"type":"insecureAcceptAnything"}]}"#.to_string())?;
        Ok(Self {
            env: vec![
                ("CONTAINERS_STORAGE_CONF", storage),
                ("CONTAINERS_CONF", containers),
                ("CONTAINERS_REGISTRIES_CONF", registries),
            ],
            policy,
        })
    }

    fn cmd(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("buildah");
        // The environment's overrides of the build's format, history and isolation.
        for var in ["BUILDAH_FORMAT", "BUILDAH_HISTORY", "BUILDAH_ISOLATION", "BUILDAH_LAYERS", "STORAGE_DRIVER", "STORAGE_OPTS"] {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg(subcommand).arg("--signature-policy").arg(&self.policy);
        if subcommand == "push" {
            cmd.arg("--quiet");
        }
        cmd
    }
}

/// Refuses what a FROM scratch image cannot run: not an x86-64 ELF executable, or one that
/// asks for a program interpreter (a dynamically linked build).
fn check_static(bytes: &[u8]) -> anyhow::Result<()> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    // ELFCLASS64, little-endian, EM_X86_64.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") || u16_at(0x12) != Some(62) {
        bail!("not an x86-64 ELF executable");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        bail!("truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)? + i * usize::from(phentsize);
        if bytes.len() < at + usize::from(phentsize) {
            bail!("truncated ELF program headers");
        }
        match u32_at(at) {
            None => bail!("truncated ELF program headers"),
            Some(PT_INTERP) => bail!("it is dynamically linked (it asks for a program interpreter)"),
            Some(_) => {}
        }
    }
    Ok(())
}

/// A package of `cargo metadata`, with what its licence file section needs.
struct Crate {
    name: String,
    version: String,
    license: String,
    dir: PathBuf,
    license_file: Option<String>,
    workspace: bool,
}

/// The crates whose code ends up in `package`'s build for `platform` from the workspace of
/// `manifest`: its normal dependencies, transitively (build scripts and dev-dependencies
/// ship nothing), `package` first.
fn shipped_crates(manifest: &Path, platform: &str, package: &str) -> anyhow::Result<Vec<Crate>> {
    let out = cargo("metadata")
        .args(["--format-version", "1", "--filter-platform", platform, "--manifest-path"])
        .arg(manifest)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata --manifest-path {} failed: {}", manifest.display(), String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
    let packages: BTreeMap<&str, &Value> =
        meta["packages"].as_array().into_iter().flatten().filter_map(|p| Some((p["id"].as_str()?, p))).collect();
    let nodes: BTreeMap<&str, &Value> =
        meta["resolve"]["nodes"].as_array().into_iter().flatten().filter_map(|n| Some((n["id"].as_str()?, n))).collect();
    let start = packages
        .values()
        .find(|p| p["name"] == package && p["source"].is_null())
        .and_then(|p| p["id"].as_str())
        .with_context(|| format!("no package {package} in {}", manifest.display()))?;
    let mut seen = BTreeSet::from([start]);
    let mut todo = vec![start];
    let mut order = vec![start];
    while let Some(id) = todo.pop() {
        for dep in nodes.get(id).and_then(|n| n["deps"].as_array()).into_iter().flatten() {
            let normal = dep["dep_kinds"].as_array().into_iter().flatten().any(|k| k["kind"].is_null());
            if let (true, Some(d)) = (normal, dep["pkg"].as_str()) {
                if seen.insert(d) {
                    todo.push(d);
                    order.push(d);
                }
            }
        }
    }
    let mut crates: Vec<Crate> = order
        .iter()
        .map(|id| {
            let p = packages[id];
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            Crate {
                name: s("name"),
                version: s("version"),
                license: p["license"].as_str().map_or_else(|| "(no license expression; see its licence file)".into(), str::to_string),
                dir: Path::new(p["manifest_path"].as_str().unwrap_or_default()).parent().map(Path::to_path_buf).unwrap_or_default(),
                license_file: p["license_file"].as_str().map(str::to_string),
                workspace: p["source"].is_null(),
            }
        })
        .collect();
    crates[1..].sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    Ok(crates)
}

/// The licence files a crate ships: LICENSE*, LICENCE*, COPYING*, UNLICENSE, NOTICE*, and
/// the one its manifest names.
fn licence_texts(c: &Crate) -> Vec<(String, String)> {
    let mut names: BTreeSet<String> = std::fs::read_dir(&c.dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let u = n.to_ascii_uppercase();
            ["LICENSE", "LICENCE", "COPYING", "UNLICENSE", "NOTICE"].iter().any(|p| u.starts_with(p))
        })
        .collect();
    names.extend(c.license_file.clone());
    names.into_iter().filter_map(|n| Some((n.clone(), std::fs::read_to_string(c.dir.join(&n)).ok()?))).collect()
}

/// The image's LICENSE (meshnet's own licence terms, and those of the eBPF object it
/// embeds) and THIRD-PARTY-LICENSES (every crate compiled into the binary, with the licence
/// texts they ship, each distinct text once).
fn licences() -> anyhow::Result<(String, String)> {
    let root = root_dir();
    let user = shipped_crates(&root.join("Cargo.toml"), STATIC_TARGET, "meshnet")?;
    let ebpf = shipped_crates(&root.join("meshnet-ebpf/Cargo.toml"), "bpfel-unknown-none", "meshnet-ebpf")?;
    let (own, ebpf_own) = (&user[0], &ebpf[0]);
    let mut license = format!(
        "meshnet {}\n\nThe meshnet program is licensed under {}.\nThe eBPF object it embeds (meshnet-ebpf) is licensed under {}.\n",
        own.version, own.license, ebpf_own.license
    );
    // The repository's own licence files, where it has them.
    let mut own_files: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().to_ascii_uppercase().starts_with("LICEN")))
        .collect();
    own_files.sort();
    for f in own_files {
        let _ = write!(license, "\n==> {} <==\n{}\n", f.file_name().unwrap().to_string_lossy(), std::fs::read_to_string(&f)?);
    }

    let mut text = format!(
        "Third-party software in the meshnet {VERSION} image\n\n\
         /usr/local/bin/meshnet is statically linked for {STATIC_TARGET}: besides meshnet's own code it contains the\n\
         Rust crates listed below, the Rust standard library (MIT OR Apache-2.0) and musl libc (MIT), and it embeds\n\
         the eBPF object built from meshnet-ebpf with the crates listed under \"eBPF object\". Generated by\n\
         `cargo xtask image` from `cargo metadata` (normal dependencies, transitively).\n"
    );
    let mut texts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (title, crates) in [("Crates of the meshnet program", &user), ("Crates of the eBPF object", &ebpf)] {
        let _ = write!(text, "\n{title} (name version: licence)\n\n");
        // Workspace crates (no source) are meshnet's own, under LICENSE.
        for c in crates.iter().skip(1).filter(|c| !c.workspace) {
            let _ = writeln!(text, "  {} {}: {}", c.name, c.version, c.license);
            for (file, body) in licence_texts(c) {
                texts.entry(body.trim_start_matches(['\n', '\r']).trim_end().to_string()).or_default().push(format!("{} {} {file}", c.name, c.version));
            }
        }
    }
    text.push_str("\nLicence texts shipped by these crates, each distinct text once\n");
    for (body, users) in texts {
        let mut users = users;
        users.dedup();
        let _ = write!(text, "\n==> {} <==\n\n{body}\n", users.join(", "));
    }
    Ok((license, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_static_reads_the_program_headers() {
        // A minimal ELF64 x86-64 header with one program header of the given type.
        let elf = |p_type: u32| {
            let mut b = vec![0u8; 64 + 56];
            b[..6].copy_from_slice(b"\x7fELF\x02\x01");
            b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
            b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            b[64..68].copy_from_slice(&p_type.to_le_bytes());
            b
        };
        assert!(check_static(&elf(1)).is_ok());
        assert!(check_static(&elf(3)).unwrap_err().to_string().contains("dynamically linked"));
        assert!(check_static(b"#!/bin/sh\n").unwrap_err().to_string().contains("not an x86-64 ELF"));
        assert!(check_static(&elf(1)[..70]).unwrap_err().to_string().contains("truncated"));
    }
}
