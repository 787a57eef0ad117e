//! Where meshnet pins its objects. Every path under the pin directory is built here.

use std::path::{Path, PathBuf};

use meshnet_common::names;

/// The default pin directory on a node.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/meshnet";

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

/// Which way a program is attached on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// tc ingress: `from_pod`.
    Ingress,
    /// tc egress: `to_pod`.
    Egress,
}

impl Direction {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    #[must_use]
    pub fn program(self) -> &'static str {
        match self {
            Direction::Ingress => names::PROG_FROM_POD,
            Direction::Egress => names::PROG_TO_POD,
        }
    }
}

impl Pins {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[must_use]
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// A tcx link of one interface and direction. Named by interface name: a renamed
    /// interface keeps its link, which `detach` still finds by listing the directory.
    /// bpffs refuses names with a dot (it reserves them for its own files), so dots in an
    /// interface name (`eth0.100`) are percent-encoded.
    #[must_use]
    pub fn link(&self, iface: &str, dir: Direction) -> PathBuf {
        let safe = iface.replace('%', "%25").replace('.', "%2E");
        self.links_dir().join(format!("{safe}@{}", dir.as_str()))
    }

    /// Creates the directory tree; fails with a fix when the root is not on a bpffs.
    pub fn prepare(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating pin directory {}", self.root.display()))?;
        if !is_bpffs(&self.root)? {
            anyhow::bail!(
                "{} is not on a bpffs, so pinned maps and links would not survive the agent; \
                 mount one with `mount -t bpf bpf /sys/fs/bpf` (see docs/kernel-upgrade.md) or \
                 pass --pin-path DIR on a bpffs",
                self.root.display()
            );
        }
        for d in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }
}

/// Whether `path` lies on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let st = nix::sys::statfs::statfs(path)
        .map_err(|e| anyhow::anyhow!("statfs {}: {e}", path.display()))?;
    Ok(st.filesystem_type().0 == BPF_FS_MAGIC)
}
