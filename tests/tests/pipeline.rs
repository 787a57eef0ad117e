//! The pipeline from build to kernel: the embedded object loads (also without kernel BTF),
//! attaches to a veth in a namespace through tcx and through netlink, sees traffic, lets it
//! pass, stays attached after the agent stops, and `meshnet detach` removes it all.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use meshnet_tests::{kernel_at_least, meshnet, poll, require_root, sh, skip_unless_tcx, topo::TempDir, Agent, Bpffs, NetNs};

const CONFIG: &str = r#"cluster: cluster1
podCIDRs: ["10.244.0.0/16"]
interfaces: ["vethp"]
peers:
  - name: cluster2
    podCIDRs: ["10.245.0.0/16"]
    gateways: [{address: 192.0.2.2, port: 31674}]
"#;

/// A node namespace with one pod namespace behind the veth `vethp`.
struct Pair {
    pod: NetNs,
    node: NetNs,
}

fn pair() -> Pair {
    let node = NetNs::new("pn");
    let pod = NetNs::new("pp");
    node.ip(&format!("link add vethp type veth peer name eth0 netns {}", pod.name));
    node.ip("addr add 10.244.0.1/24 dev vethp");
    node.ip("link set vethp up");
    pod.ip("addr add 10.244.0.2/24 dev eth0");
    pod.ip("link set eth0 up");
    Pair { pod, node }
}

/// Names of the tcx programs on `iface` in `ns`.
fn tcx_programs(ns: &NetNs, iface: &'static str, dir: TcAttachType) -> Vec<String> {
    ns.run(move || match SchedClassifier::query_tcx(iface, dir) {
        Ok((_, progs)) => progs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)).collect(),
        Err(_) => Vec::new(),
    })
}

fn netlink_filters(ns: &NetNs, iface: &str, dir: &str) -> String {
    ns.exec(&format!("tc filter show dev {iface} {dir} 2>/dev/null || true"))
}

/// Whether meshnet's programs are attached to vethp, by either mechanism.
fn attached(p: &Pair) -> (bool, bool) {
    let tcx = tcx_programs(&p.node, "vethp", TcAttachType::Ingress).iter().any(|n| n.starts_with("meshnet_from"))
        && tcx_programs(&p.node, "vethp", TcAttachType::Egress).iter().any(|n| n.starts_with("meshnet_to"));
    let nl = netlink_filters(&p.node, "vethp", "ingress").contains("meshnet_from_pod")
        && netlink_filters(&p.node, "vethp", "egress").contains("meshnet_to_pod");
    (tcx, nl)
}

/// TCP from the pod to the node, through the attached programs.
fn traffic_passes(p: &Pair) {
    let listener = p.node.run(|| TcpListener::bind("10.244.0.1:7000").unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let echoed = p.pod.run(|| {
        let mut s = TcpStream::connect_timeout(&"10.244.0.1:7000".parse().unwrap(), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    server.join().unwrap();
    assert_eq!(&echoed, b"hello");
}

/// Sends an Ethernet frame claiming IPv4 with IHL 3 from the pod: the kernel's IP layer
/// would drop it, but meshnet's ingress program sees it first and counts it as malformed.
fn send_malformed(p: &Pair) {
    let mac_hex = p.node.exec("cat /sys/class/net/vethp/address");
    let mac: Vec<u8> = mac_hex.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    p.pod.run(move || {
        let mut frame = vec![0u8; 60];
        frame[..6].copy_from_slice(&mac);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x43; // version 4, IHL 3 words: shorter than any IPv4 header
        // SAFETY: plain socket calls with correctly sized, initialised arguments.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&mac);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap(),
            );
            libc::close(fd);
            assert_eq!(n, 60, "sendto: {}", std::io::Error::last_os_error());
        }
    });
}

fn counter(ns: &NetNs, pin: &Path, name: &str) -> u64 {
    let out = meshnet(ns, &format!("maps dump stats -o json --pin-path {}", pin.display()));
    assert!(out.ok, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["stats"][name].as_u64().unwrap()
}

fn pipeline(mode: &str, wrap_no_btf: bool) {
    require_root();
    let p = pair();
    let fs = Bpffs::new();
    let dir = TempDir::new();
    let cfg = dir.0.join("c.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let pin = fs.pin_path();
    let mut argv = Agent::argv(&p.node, &cfg, &pin, &["--attach-mode", mode]);
    // A kernel without BTF at all (the ELRepo kernels) needs no hiding.
    let has_btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if wrap_no_btf && !has_btf {
        println!("this kernel has no /sys/kernel/btf/vmlinux: loading without BTF as it is");
    }
    if wrap_no_btf && has_btf {
        // A private mount namespace where the kernel's BTF reads as empty, as on the
        // ELRepo kernels CentOS 7 nodes get: loading must not need it.
        let mut wrapped: Vec<String> = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind /dev/null /sys/kernel/btf/vmlinux && test ! -s /sys/kernel/btf/vmlinux && exec \"$@\"",
            "sh",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        wrapped.extend(argv);
        argv = wrapped;
    }
    let mut agent = Agent::spawn(&argv);
    // `auto` takes tcx links from 6.6 on and netlink clsact filters below.
    let tcx = mode == "tcx" || (mode == "auto" && kernel_at_least(6, 6));
    let want = if tcx { (true, false) } else { (false, true) };
    assert_eq!(attached(&p), want, "attachment after start ({mode})");

    traffic_passes(&p);
    let before = counter(&p.node, &pin, "malformed");
    send_malformed(&p);
    let seen = poll(Duration::from_secs(30), || (counter(&p.node, &pin, "malformed") > before).then_some(()));
    assert!(seen.is_some(), "the ingress program never counted the malformed frame");

    // Stopping the agent leaves the datapath in place.
    assert!(agent.child.stop(), "agent did not exit cleanly:\n{}", agent.child.output());
    assert_eq!(attached(&p), want, "attachment after the agent stopped ({mode})");
    traffic_passes(&p);

    let out = meshnet(&p.node, &format!("detach --pin-path {}", pin.display()));
    assert!(out.ok, "detach failed: {}", out.stderr);
    assert_eq!(attached(&p), (false, false), "something is still attached after detach");
    assert!(!pin.exists() || std::fs::read_dir(&pin).unwrap().next().is_none(), "pins left behind: {}", sh(&format!("ls -R {}", pin.display())));
    traffic_passes(&p);
}

#[test]
fn tcx_pipeline() {
    if !skip_unless_tcx() {
        return;
    }
    pipeline("tcx", false);
}

#[test]
fn netlink_pipeline() {
    pipeline("netlink", false);
}

/// On every kernel: with tcx from 6.6 on, through netlink clsact below.
#[test]
fn loads_without_kernel_btf() {
    pipeline("auto", true);
}

#[test]
fn bad_config_fails_before_touching_anything() {
    require_root();
    let p = pair();
    let fs = Bpffs::new();
    let dir = TempDir::new();
    let cfg = dir.0.join("c.yaml");
    std::fs::write(&cfg, CONFIG.replace("10.245.0.0/16", "10.245.0.0/33")).unwrap();
    let out = meshnet(&p.node, &format!("agent --config {} --pin-path {}", cfg.display(), fs.pin_path().display()));
    assert!(!out.ok);
    assert!(out.stderr.contains(r#"peers[0].podCIDRs[0]: "10.245.0.0/33" is not a valid CIDR"#), "{}", out.stderr);
    assert!(!fs.pin_path().exists(), "a bad config still created pins");
    assert_eq!(attached(&p), (false, false));
}

/// No bpffs at the pin path: the agent says so, with the fix, before it creates anything,
/// both on a writable filesystem and under /sys/fs, where a node without the mount has a
/// sysfs directory that refuses `mkdir` (EPERM).
#[test]
fn missing_bpffs_is_named_before_anything_is_created() {
    require_root();
    let p = pair();
    let dir = TempDir::new();
    let cfg = dir.0.join("c.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let sysfs_pin = Path::new("/sys/fs").join(format!("meshnet-absent-{}", std::process::id())).join("meshnet");
    assert!(!sysfs_pin.parent().unwrap().exists());
    for (pin, probed) in [(dir.0.join("bpf/meshnet"), dir.0.clone()), (sysfs_pin, "/sys/fs".into())] {
        let out = meshnet(&p.node, &format!("agent --config {} --pin-path {}", cfg.display(), pin.display()));
        assert!(!out.ok, "the agent started without a bpffs at {}", pin.display());
        let want = format!("{} (checked at {}, the nearest existing directory) is not on a bpffs", pin.display(), probed.display());
        assert!(out.stderr.contains(&want), "no `{want}` in:\n{}", out.stderr);
        assert!(out.stderr.contains("mount -t bpf bpf /sys/fs/bpf"), "no fix in:\n{}", out.stderr);
        assert!(!out.stderr.contains("Operation not permitted"), "{}", out.stderr);
        assert!(!pin.parent().unwrap().exists(), "the agent created {} off a bpffs", pin.parent().unwrap().display());
        assert_eq!(attached(&p), (false, false));
    }
}
