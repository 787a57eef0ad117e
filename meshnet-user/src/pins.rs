//! Where meshnet pins its objects. Every path under the pin directory is built here.

use std::path::{Path, PathBuf};

use meshnet_common::names;

/// The default pin directory on a node.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/meshnet";

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
    /// tc ingress of an uplink (tunnel mode): `tun_in`.
    Uplink,
}

impl Direction {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
            Direction::Uplink => "uplink",
        }
    }

    #[must_use]
    pub fn program(self) -> &'static str {
        match self {
            Direction::Ingress => names::PROG_FROM_POD,
            Direction::Egress => names::PROG_TO_POD,
            Direction::Uplink => names::PROG_TUNNEL_IN,
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

    /// A tcx link of one interface and direction. Named by interface name: an agent that
    /// sees an interface renamed moves its pins (`datapath::move_pins`); one renamed while
    /// no agent ran keeps its link under the old name, which `detach` still finds by
    /// listing the directory.
    /// bpffs refuses names with a dot (it reserves them for its own files), so dots in an
    /// interface name (`eth0.100`) are percent-encoded.
    #[must_use]
    pub fn link(&self, iface: &str, dir: Direction) -> PathBuf {
        let safe = iface.replace('%', "%25").replace('.', "%2E");
        self.links_dir().join(format!("{safe}@{}", dir.as_str()))
    }

    /// The directory whose filesystem decides where pins land: the root itself, or before
    /// the agent first creates it, its nearest existing ancestor.
    #[must_use]
    pub fn probe_dir(&self) -> Option<&Path> {
        self.root.ancestors().find(|a| a.exists())
    }

    /// Creates the directory tree; fails with a fix when the root is not on a bpffs.
    ///
    /// The filesystem is checked before anything is created: on a node without a bpffs,
    /// `/sys/fs/bpf` is a sysfs directory that refuses `mkdir` with EPERM, which says
    /// nothing about the missing mount, and on a writable filesystem the check would come
    /// after a stray directory had been left behind.
    pub fn prepare(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let probe = self
            .probe_dir()
            .with_context(|| format!("no part of the pin path {} exists", self.root.display()))?;
        if !is_bpffs(probe)? {
            let at = if probe == self.root {
                self.root.display().to_string()
            } else {
                format!("{} (checked at {}, the nearest existing directory)", self.root.display(), probe.display())
            };
            anyhow::bail!(
                "{at} is not on a bpffs, so pinned maps and links would not survive the agent; \
                 mount one with `mount -t bpf bpf /sys/fs/bpf` (see docs/kernel-upgrade.md) or \
                 pass --pin-path DIR on a bpffs"
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
    Ok(st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of this test's own under the temp dir (not a bpffs), removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("meshnet-pins-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn off_bpffs_is_refused_before_anything_is_created() {
        let s = Scratch::new("off");
        assert!(!is_bpffs(&s.0).unwrap(), "the temp dir is a bpffs here; the test needs one that is not");
        let pins = Pins::new(s.0.join("a/meshnet"));
        let err = format!("{:#}", pins.prepare().unwrap_err());
        assert!(err.contains("is not on a bpffs"), "{err}");
        assert!(err.contains(&format!("checked at {}", s.0.display())), "{err}");
        assert!(err.contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");
        assert!(!s.0.join("a").exists(), "prepare created directories off a bpffs");
    }

    #[test]
    fn existing_dir_off_bpffs_is_refused() {
        let s = Scratch::new("existing");
        let err = format!("{:#}", Pins::new(&s.0).prepare().unwrap_err());
        assert!(err.starts_with(&format!("{} is not on a bpffs", s.0.display())), "{err}");
        assert!(!s.0.join("maps").exists());
    }

    /// A node without a bpffs mounted: /sys/fs/bpf is then a plain sysfs directory, where
    /// `mkdir` answers EPERM. The error must name the missing bpffs, not the mkdir.
    #[test]
    fn sysfs_without_bpffs_names_the_missing_mount() {
        let absent = Path::new("/sys/fs").join(format!("meshnet-absent-{}", std::process::id()));
        assert!(Path::new("/sys/fs").is_dir() && !absent.exists());
        let err = format!("{:#}", Pins::new(absent.join("meshnet")).prepare().unwrap_err());
        assert!(err.contains("is not on a bpffs") && err.contains("checked at /sys/fs,"), "{err}");
        assert!(!err.contains("Operation not permitted") && !err.contains("creating"), "{err}");
    }
}

/// An exclusive hold on a pin directory, released when dropped (or when the process dies,
/// however it dies: the kernel drops `flock`s with the last open file).
///
/// Two agents on one node (a rolling update with surge, a force-deleted pod whose process
/// lingers, an operator's manual run) would otherwise both rewrite the same maps and swap
/// each other's programs.
#[derive(Debug)]
pub struct PinLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Why the pin directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another meshnet agent holds {path}{holder}, and it did not let go within {waited:?}. \
         Two agents on one node would fight over the same maps and programs: stop the other \
         one first (`kubectl -n meshnet get pods -o wide` for the node, or the process named \
         here), or give this one its own --pin-path"
    )]
    Held { path: String, holder: String, waited: std::time::Duration },
    #[error("locking {path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
}

impl Pins {
    /// Takes the pin directory's lock, waiting up to `wait` for another holder to go, and
    /// calling `waiting` every ten seconds while it waits (for a log line).
    pub fn lock(&self, wait: std::time::Duration, mut waiting: impl FnMut(&str)) -> Result<PinLock, LockError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.root.display().to_string();
        let io = |source| LockError::Io { path: path.clone(), source };
        let start = std::time::Instant::now();
        let mut tries = 0_u32;
        let mut file = std::fs::File::open(&self.root).map_err(io)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(PinLock { _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = lock_holder(&self.root).map_or_else(String::new, |pid| format!(" (pid {pid})"));
                    if start.elapsed() >= wait {
                        return Err(LockError::Held { path, holder, waited: wait });
                    }
                    if tries.is_multiple_of(10) {
                        waiting(&holder);
                    }
                    tries += 1;
                    file = f;
                    std::thread::sleep(std::time::Duration::from_secs(1).min(wait.saturating_sub(start.elapsed())));
                }
                Err((_, e)) => return Err(io(e.into())),
            }
        }
    }
}

/// The pid holding a `flock` on `path`, from /proc/locks. Best effort: the kernel shows it
/// in our pid namespace, and a holder in another pod's namespace shows as 0 (left out).
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (kind, pid, dev_ino) = (f.get(1)?, f.get(4)?, f.get(5)?);
        (*kind == "FLOCK" && dev_ino.rsplit(':').next()?.parse::<u64>().ok()? == ino).then(|| pid.parse().ok().filter(|p| *p != 0))?
    })
}
