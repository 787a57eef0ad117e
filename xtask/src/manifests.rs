//! The tools that tests/tests/manifests.rs checks deploy/ with, installed by `cargo xtask
//! setup` under target/tools:
//!
//! - `kubernetes-validate` from PyPI in a venv. Version 1.27.1 is the newest that bundles the
//!   JSON schemas of Kubernetes 1.18 (it has 1.11 to 1.27, each also in a strict variant that
//!   rejects unknown fields), so validation needs no network.
//! - kubectl 1.20 from Debian's `kubernetes-client`, unpacked, not installed (it would clash
//!   with another kubectl). kubectl 1.14 to 1.20 embed kustomize v2.0.3, so it renders
//!   deploy/overlays/* as the user's kubectl 1.18 does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// What pip installs: the validator, and the versions of its dependencies it is known to
/// work with (it uses `pkg_resources` and jsonschema's `RefResolver`).
const PIP_REQUIREMENTS: [&str; 3] = ["kubernetes-validate==1.27.1", "jsonschema==4.26.0", "setuptools<81"];
/// The Debian package whose kubectl embeds kustomize v2.0.3.
const KUBECTL_DEB: &str = "kubernetes-client";

fn tools_dir(root: &Path) -> PathBuf {
    root.join("target/tools")
}

/// The validator's entry point (tests/tests/manifests.rs looks here).
pub fn validator(root: &Path) -> PathBuf {
    tools_dir(root).join("venv/bin/kubernetes-validate")
}

/// The unpacked kubectl 1.20 (tests/tests/manifests.rs looks here).
pub fn kubectl(root: &Path) -> PathBuf {
    tools_dir(root).join("kubectl-1.20/usr/bin/kubectl")
}

/// Whether a tool is missing, so that `cargo xtask test` runs setup first.
pub fn missing(root: &Path) -> bool {
    !validator(root).exists() || !kubectl(root).exists()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Installs what is missing; returns what it did.
pub fn setup(root: &Path, is_root: bool) -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    let tools = tools_dir(root);
    std::fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    if !validator(root).exists() {
        let venv = tools.join("venv");
        println!("xtask setup: installing {} into {}", PIP_REQUIREMENTS.join(" "), venv.display());
        // Debian's python3, not whatever python3 comes first in PATH: its venv module is the
        // python3-venv package, which is installed here when missing.
        let python = "/usr/bin/python3";
        let venv_ok = Command::new(python).args(["-c", "import ensurepip, venv"]).output().is_ok_and(|o| o.status.success());
        if !venv_ok {
            if !is_root {
                bail!("{python} cannot create a venv: run as root `apt-get install -y python3-venv`");
            }
            run(Command::new("apt-get").args(["update", "-q"])).context("apt-get update")?;
            run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends", "python3-venv"]).env("DEBIAN_FRONTEND", "noninteractive"))
                .context("installing python3-venv; run `apt-get update && apt-get install -y python3-venv` by hand")?;
        }
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new(python).args(["-m", "venv"]).arg(&venv)).context("creating the validator's venv")?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PIP_REQUIREMENTS))
        .with_context(|| format!("installing {} from PyPI", PIP_REQUIREMENTS[0]))?;
        let schemas = venv.join("lib").read_dir().ok().and_then(|mut d| d.next()).and_then(Result::ok).map(|e| {
            e.path().join("site-packages/kubernetes_validate/kubernetes-json-schema/v1.18.0-local-strict")
        });
        if !schemas.is_some_and(|s| s.is_dir()) {
            bail!("{} does not bundle the Kubernetes 1.18 schemas", PIP_REQUIREMENTS[0]);
        }
        did.push(PIP_REQUIREMENTS[0].to_string());
    }
    if !kubectl(root).exists() {
        if !is_root {
            bail!("fetching Debian's {KUBECTL_DEB} needs root (apt-get download): run `cargo xtask setup` as root");
        }
        println!("xtask setup: unpacking Debian's {KUBECTL_DEB} (kubectl 1.20, kustomize v2.0.3) into {}", tools.display());
        let download = || Command::new("apt-get").args(["download", "-q", KUBECTL_DEB]).current_dir(&tools).status();
        if !download().is_ok_and(|s| s.success()) {
            run(Command::new("apt-get").args(["update", "-q"])).context("apt-get update")?;
            if !download().is_ok_and(|s| s.success()) {
                bail!("`apt-get download {KUBECTL_DEB}` failed");
            }
        }
        let deb = std::fs::read_dir(&tools)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(KUBECTL_DEB))
            })
            .with_context(|| format!("no {KUBECTL_DEB} .deb in {}", tools.display()))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tools.join("kubectl-1.20")))?;
        let _ = std::fs::remove_file(&deb);
        let version = Command::new(kubectl(root)).args(["version", "--client", "--short"]).output()?;
        let version = String::from_utf8_lossy(&version.stdout);
        if !version.contains("v1.20.") {
            bail!("{KUBECTL_DEB} brought kubectl {}, not 1.20 (whose kustomize is kubectl 1.18's)", version.trim());
        }
        did.push(format!("kubectl 1.20 from {KUBECTL_DEB}"));
    }
    Ok(did)
}
