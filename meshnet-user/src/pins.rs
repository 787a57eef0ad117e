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

    /// The directory whose `flock` keeps a second agent out. Inside the root, which only
    /// the agent's user can enter, so that no other user can open it and hold the lock.
    /// (bpffs holds no regular files, so a directory it is.)
    #[must_use]
    pub fn lock_dir(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// Creates the directory tree; fails with a fix when the root is not on a bpffs, or
    /// when a part of it is not the agent's alone.
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
                 mount one with `mount -t bpf bpf /sys/fs/bpf -o mode=700` (see docs/kernel-upgrade.md) \
                 or pass --pin-path DIR on a bpffs"
            );
        }
        self.make_private()
    }

    /// Creates the root, `maps`, `links` and the lock directory with mode 0700 and checks
    /// each: a bpffs mounted without `mode=` lets every user create entries at its top, so
    /// before the agent first runs (after a reboot, or a `meshnet detach`) any user could
    /// have made one of them, world-writable or a symlink to a directory of theirs. The
    /// agent (uid 0 without `CAP_DAC_OVERRIDE`) would then pin into it, and that user could
    /// unlink its tcx links or plant maps. One that is the agent's own but open to others
    /// (0755, from an agent before this check or the kubelet's `DirectoryOrCreate`) cannot
    /// have been written to by anyone else and is closed to 0700.
    fn make_private(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        let euid = nix::unistd::geteuid().as_raw();
        for (i, dir) in [self.root.clone(), self.maps_dir(), self.links_dir(), self.lock_dir()].iter().enumerate() {
            // The root's parents are the operator's (or its bpffs's), the rest inside the root.
            let made = std::fs::DirBuilder::new().recursive(i == 0).mode(0o700).create(dir);
            if let Err(e) = made {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(anyhow::anyhow!("creating {}: {e}", dir.display()));
                }
            }
            private_dir(dir, euid, i == 0)?;
        }
        Ok(())
    }
}

/// Checks that `dir` is a directory of `euid`'s that no one else can write to, and closes it
/// to others (mode 0700). The root may have been open to writes (a bpffs mounted there is
/// 1777): what others could have made in it is checked as its subdirectories are, by owner,
/// and nothing else in it is read. Group writes count only for a group other than root's (an
/// older agent under umask 002 made 0775 directories).
fn private_dir(dir: &Path, euid: u32, root: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let shown = dir.display();
    let fix = format!(
        "check what it holds, remove it (`rm -r {shown}`) and start the agent again, which creates it \
         (mount the bpffs with `mode=700` so that no other user can create it again)"
    );
    let meta = std::fs::symlink_metadata(dir).map_err(|e| anyhow::anyhow!("checking {shown}: {e}"))?;
    let refuse = |what: String| {
        anyhow::anyhow!(
            "{shown} {what}: whoever controls it could unlink meshnet's pinned links or plant maps, \
             so the agent refuses to pin there; {fix}"
        )
    };
    if meta.file_type().is_symlink() {
        let to = std::fs::read_link(dir).map(|t| format!(" (to {})", t.display())).unwrap_or_default();
        return Err(refuse(format!("is a symlink{to}")));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    if meta.uid() != euid {
        return Err(refuse(format!("is owned by uid {}, not by the agent's ({euid})", meta.uid())));
    }
    let mode = meta.mode() & 0o7777;
    let open_to_writes = mode & 0o002 != 0 || (mode & 0o020 != 0 && meta.gid() != 0);
    if open_to_writes && !root {
        return Err(refuse(format!(
            "has mode {mode:o}: its group or other users can write to it (if nothing else has, `chmod 700 {shown}` \
             is enough)"
        )));
    }
    if mode != 0o700 {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => {}
            // Closed to writes already: reads by others are no reason to stop (a security
            // module may refuse the agent a chmod it never needed before).
            Err(e) if !open_to_writes => tracing::warn!(dir = %shown, error = %e, "could not close the pin directory to other users' reads"),
            Err(e) => return Err(anyhow::anyhow!("closing {shown} to other users (chmod 700): {e}")),
        }
    }
    Ok(())
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
    use crate::scratch::Scratch;

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

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_tree_is_made_closed_to_other_users() {
        let s = Scratch::new("fresh");
        let pins = Pins::new(s.0.join("meshnet"));
        pins.make_private().unwrap();
        for d in [pins.root().to_path_buf(), pins.maps_dir(), pins.links_dir(), pins.lock_dir()] {
            assert_eq!(mode_of(&d), 0o700, "{}", d.display());
        }
    }

    /// An older agent's tree (0755, as `create_dir_all` or the kubelet made it): no one else
    /// could write to it, so it is kept and closed.
    #[test]
    fn an_older_agents_tree_is_closed_not_refused() {
        let s = Scratch::new("older");
        let pins = Pins::new(s.0.join("meshnet"));
        for d in [pins.maps_dir(), pins.links_dir()] {
            std::fs::create_dir_all(&d).unwrap();
            chmod(&d, 0o755);
        }
        chmod(pins.root(), 0o755);
        std::fs::write(pins.map("kept"), "").unwrap();
        pins.make_private().unwrap();
        for d in [pins.root().to_path_buf(), pins.maps_dir(), pins.links_dir()] {
            assert_eq!(mode_of(&d), 0o700, "{}", d.display());
        }
        assert!(pins.map("kept").exists());
    }

    /// A subdirectory others can write to may hold pins they planted: refused, untouched. The
    /// root is only read for its subdirectories, each checked: the agent's own root is closed
    /// whatever its mode (a bpffs mounted there is 1777), as is a directory only root's group
    /// can write to.
    #[test]
    fn a_tree_others_can_write_to_is_refused() {
        use std::os::unix::fs::chown;
        let s = Scratch::new("open");
        let pins = Pins::new(s.0.join("meshnet"));
        std::fs::create_dir(pins.root()).unwrap();
        std::fs::create_dir(pins.maps_dir()).unwrap();
        chmod(&pins.maps_dir(), 0o777);
        let err = format!("{:#}", pins.make_private().unwrap_err());
        assert!(err.starts_with(&format!("{} has mode 777", pins.maps_dir().display())), "{err}");
        assert!(err.contains("refuses") && err.contains("chmod 700"), "{err}");
        assert!(!pins.links_dir().exists(), "went on past a directory others can write to");
        assert_eq!(mode_of(&pins.maps_dir()), 0o777, "a refused directory was changed");

        // Only the group, another than root's.
        chmod(&pins.maps_dir(), 0o770);
        chown(pins.maps_dir(), None, Some(65534)).unwrap();
        let err = format!("{:#}", pins.make_private().unwrap_err());
        assert!(err.starts_with(&format!("{} has mode 770", pins.maps_dir().display())), "{err}");
        // Root's group: closed.
        chown(pins.maps_dir(), None, Some(0)).unwrap();
        chmod(pins.root(), 0o1777);
        pins.make_private().unwrap();
        for d in [pins.root().to_path_buf(), pins.maps_dir(), pins.links_dir(), pins.lock_dir()] {
            assert_eq!(mode_of(&d), 0o700, "{}", d.display());
        }
    }

    #[test]
    fn a_symlink_anywhere_in_the_tree_is_refused() {
        let s = Scratch::new("link");
        let theirs = s.0.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let pins = Pins::new(s.0.join("meshnet"));
        std::os::unix::fs::symlink(&theirs, pins.root()).unwrap();
        let err = format!("{:#}", pins.make_private().unwrap_err());
        assert!(err.starts_with(&format!("{} is a symlink (to {})", pins.root().display(), theirs.display())), "{err}");
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0, "created something in the symlink's target");

        std::fs::remove_file(pins.root()).unwrap();
        std::fs::create_dir(pins.root()).unwrap();
        std::os::unix::fs::symlink(&theirs, pins.links_dir()).unwrap();
        let err = format!("{:#}", pins.make_private().unwrap_err());
        assert!(err.starts_with(&format!("{} is a symlink", pins.links_dir().display())), "{err}");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        use std::os::unix::fs::MetadataExt as _;
        let s = Scratch::new("owner");
        let ours = std::fs::metadata(&s.0).unwrap().uid();
        chmod(&s.0, 0o700);
        let err = format!("{:#}", private_dir(&s.0, ours + 1, true).unwrap_err());
        assert!(err.contains(&format!("is owned by uid {ours}, not by the agent's ({})", ours + 1)), "{err}");
        private_dir(&s.0, ours, true).unwrap();
    }

    /// An older agent (which locks only the root) holding its lock keeps this agent out, and
    /// this one, once it holds both, keeps out an older one and another of its own version.
    #[test]
    fn the_lock_on_the_root_is_required_both_ways() {
        use nix::fcntl::{Flock, FlockArg};
        let s = Scratch::new("lock");
        let pins = Pins::new(s.0.join("meshnet"));
        pins.make_private().unwrap();
        let older = Flock::lock(std::fs::File::open(pins.root()).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        assert!(matches!(pins.lock(std::time::Duration::ZERO, |_| {}), Err(LockError::Held { .. })));
        drop(older);
        let first = pins.lock(std::time::Duration::ZERO, |_| {}).unwrap();
        assert!(matches!(pins.lock(std::time::Duration::ZERO, |_| {}), Err(LockError::Held { .. })));
        let older = std::fs::File::open(pins.root()).unwrap();
        assert!(Flock::lock(older, FlockArg::LockExclusiveNonblock).is_err(), "an older agent got in");
        drop(first);
        assert!(pins.lock(std::time::Duration::ZERO, |_| {}).is_ok());
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
    _root: nix::fcntl::Flock<std::fs::File>,
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
    /// Takes the pin directory's lock (after [`Self::prepare`]), waiting up to `wait` for
    /// another holder to go, and calling `waiting` every ten seconds while it waits (for a
    /// log line).
    ///
    /// Agents before this version lock the root itself, which any user who could open it
    /// could lock too, keeping every agent out. This one locks [`Self::lock_dir`], which
    /// only root can open, and the root as well: an agent that locks only the root (an
    /// upgrade's old pod while it stops, a rollback's) must never run the datapath beside
    /// this one, and a holder of the root's lock cannot be told from such an agent (in
    /// another pod's pid namespace it has no pid here). Since [`Self::prepare`] closes the
    /// root to other users, only a process that opened it before and kept it open can hold
    /// that lock against the agent.
    pub fn lock(&self, wait: std::time::Duration, mut waiting: impl FnMut(&str)) -> Result<PinLock, LockError> {
        use std::time::{Duration, Instant};
        let until = Instant::now() + wait;
        let lock = self.flock(&self.lock_dir(), until, wait, &mut waiting)?;
        // An agent of this version that just let go of the first lets go of this one as it
        // exits too, if a moment later: a wait used up on the first must not refuse it.
        let until = until.max(Instant::now() + wait.min(Duration::from_secs(2)));
        let root = self.flock(&self.root, until, wait, &mut waiting)?;
        Ok(PinLock { _lock: lock, _root: root })
    }

    fn flock(
        &self,
        dir: &Path,
        until: std::time::Instant,
        wait: std::time::Duration,
        waiting: &mut impl FnMut(&str),
    ) -> Result<nix::fcntl::Flock<std::fs::File>, LockError> {
        use nix::fcntl::{Flock, FlockArg};
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.root.display().to_string();
        let io = |source| LockError::Io { path: dir.display().to_string(), source };
        let mut tries = 0_u32;
        // Not through a symlink someone put in its place since `prepare` looked.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)
            .map_err(io)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = lock_holder(dir).map_or_else(String::new, |pid| format!(" (pid {pid})"));
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(LockError::Held { path, holder, waited: wait });
                    }
                    if tries.is_multiple_of(10) {
                        waiting(&holder);
                    }
                    tries += 1;
                    file = f;
                    std::thread::sleep(std::time::Duration::from_secs(1).min(left));
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
