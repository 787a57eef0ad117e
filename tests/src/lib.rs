//! Test support for meshnet's privileged tests and the demo: RAII guards for network
//! namespaces, bpffs mounts and child processes, a two-cluster topology, and fake
//! east-west gateway and app servers.
//!
//! Every guard removes what it made when dropped, also when a test panics. Processes are
//! only ever ended by the pid this code started.

pub mod fakeapi;
pub mod peer;
pub mod raw_bpf;
pub mod testrun;
pub mod topo;
pub mod tunnel_topo;

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Fails the test (never passes it silently) when not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, bpffs, eBPF): run `cargo xtask test` as root"
    );
}

/// The `meshnet` binary under test: `MESHNET_BIN`, set by `cargo xtask test`, or the debug
/// build next to this test binary.
#[must_use]
pub fn meshnet_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHNET_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let guess = exe.parent().and_then(Path::parent).map(|d| d.join("meshnet")).unwrap();
    assert!(
        guess.exists(),
        "meshnet binary not found at {}; run the tests through `cargo xtask test` (or set MESHNET_BIN)",
        guess.display()
    );
    guess
}

/// Runs a command to completion and panics with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`sh`] but returns whether it succeeded, with the combined output.
pub fn try_sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for netns and interface names.
#[must_use]
pub fn unique(tag: &str) -> String {
    format!("mn{}x{}{tag}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh(&format!("ip netns add {name}"));
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &str) -> String {
        sh(&format!("ip -n {} {args}", self.name))
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', r"'\''")))
    }

    pub fn try_exec(&self, cmd: &str) -> (bool, String) {
        try_sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', r"'\''")))
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace. Sockets it creates stay in the namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) {
    let f = File::open(path).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A bpffs mounted on a fresh temporary directory, unmounted and removed on drop. Tests pin
/// here because `ip netns exec` remounts /sys, which hides /sys/fs/bpf pins between calls.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    #[must_use]
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("bpffs"));
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!("mount -t bpf bpf {}", dir.display()));
        Self { dir }
    }

    /// The pin path meshnet gets.
    #[must_use]
    pub fn pin_path(&self) -> PathBuf {
        self.dir.join("meshnet")
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A child process, killed by its pid on drop. Its stderr and stdout lines are collected.
pub struct ChildGuard {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        // SAFETY: prctl is async-signal-safe; it makes the child die with the test process
        // even if the test is killed before any Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (lines, tx) = (lines.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Self { child: Some(child), lines, rx }
    }

    #[must_use]
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    /// Waits for an output line containing `needle`; panics with the output so far if the
    /// process exits or `timeout` passes first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                        // Drain what is left before reporting.
                        std::thread::sleep(Duration::from_millis(50));
                        panic!("process exited ({status}) before printing {needle:?}:\n{}", self.output());
                    }
                    if Instant::now() >= deadline {
                        panic!("no {needle:?} within {timeout:?}:\n{}", self.output());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("output closed before {needle:?}:\n{}", self.output());
                }
            }
        }
    }

    /// Everything printed so far.
    #[must_use]
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Sends a signal to this child (by its pid).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Stops the child with SIGTERM and waits for it; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()), nix::sys::signal::Signal::SIGTERM);
        // Generous: an agent's clean exit under a loaded, emulated VM can take seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `meshnet agent` inside a namespace.
pub struct Agent {
    pub child: ChildGuard,
}

impl Agent {
    /// The argv that runs `meshnet agent` inside `ns`.
    #[must_use]
    pub fn argv(ns: &NetNs, config: &Path, pin_path: &Path, extra: &[&str]) -> Vec<String> {
        let mut v = vec![
            "nsenter".to_string(),
            format!("--net={}", ns.path().display()),
            meshnet_bin().display().to_string(),
            "agent".into(),
            "--config".into(),
            config.display().to_string(),
            "--pin-path".into(),
            pin_path.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_string()));
        v
    }

    /// Starts `meshnet agent` in `ns` and waits until it reports ready.
    pub fn start(ns: &NetNs, config: &Path, pin_path: &Path, extra: &[&str]) -> Self {
        Self::spawn(&Self::argv(ns, config, pin_path, extra))
    }

    /// Runs `argv` (which ends up exec'ing `meshnet agent`) and waits until it is ready.
    pub fn spawn(argv: &[String]) -> Self {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env("MESHNET_LOG", "info");
        let mut child = ChildGuard::spawn(&mut cmd);
        child.wait_for_line("meshnet agent ready", Duration::from_secs(120));
        Self { child }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a meshnet CLI command inside `ns`.
#[must_use]
pub fn meshnet(ns: &NetNs, args: &str) -> CmdOut {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("nsenter --net={} {} {args}", ns.path().display(), meshnet_bin().display()))
        .output()
        .unwrap();
    CmdOut {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `GET path` over HTTP/1.0 from the server at `addr` inside `ns`, the whole answer. Waits up
/// to a minute for the server to listen: the agent says "ready" once the datapath is, and its
/// metrics server binds on a task of its own, which on a slow (emulated) machine can come a
/// moment later.
#[must_use]
pub fn http_get(ns: &NetNs, addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let path = path.to_string();
    ns.run(move || {
        let wait = Duration::from_mins(1);
        let mut s = poll(wait, || std::net::TcpStream::connect_timeout(&addr, peer::IO_TIMEOUT).ok())
            .unwrap_or_else(|| panic!("nothing listens on {addr} within {wait:?}"));
        s.set_read_timeout(Some(peer::IO_TIMEOUT)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// Whether the running kernel is at least `major.minor`, as the agent's `--attach-mode auto`
/// judges it (aya's reading of the kernel version, which knows Debian's and Ubuntu's ways).
#[must_use]
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(major, minor, 0))
}

/// The running kernel's release (`uname -r`).
#[must_use]
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string())
}

/// Reports that the current test is skipped because the kernel lacks `feature`. The line
/// goes straight to stdout, past libtest's capture, so a skip is never silent;
/// `cargo xtask test` counts these lines as skipped tests.
pub fn skip(feature: &str) {
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let line = format!("skipped: needs {feature}, kernel is {}: {test}\n", kernel_release());
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

/// `true` (and the test should go on) when the kernel has tcx links (6.6+); otherwise prints
/// "skipped: needs tcx (kernel >= 6.6)" and returns `false`: the test returns early.
#[must_use]
pub fn skip_unless_tcx() -> bool {
    if kernel_at_least(6, 6) {
        return true;
    }
    skip("tcx (kernel >= 6.6)");
    false
}

/// The container `name` of a workload manifest (or patch) of deploy/.
#[must_use]
pub fn container(doc: &serde_yaml::Value, name: &str) -> serde_yaml::Value {
    doc["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
        .clone()
}

/// A YAML list of strings.
#[must_use]
pub fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence().unwrap_or_else(|| panic!("not a list: {v:?}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}
