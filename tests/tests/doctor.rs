//! `meshnet doctor` in the agent's pod has no iptables binaries (the image is FROM scratch):
//! it reads the legacy nat and filter tables from the kernel itself. This checks that reading against
//! `iptables-legacy-save` on the same rules, in a namespace of the test's own.

use std::net::Ipv4Addr;

use meshnet::doctor::find_masquerade;
use meshnet_tests::{require_root, skip, NetNs};

const POD_RULE: &str = "-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE";

/// The rules of a kubeadm node with flannel and Docker, as iptables-legacy writes them.
const RULES: &[&str] = &[
    "-N KUBE-POSTROUTING",
    "-A PREROUTING -d 10.20.144.160/32 -p tcp --dport 32361 -j DNAT --to-destination 10.244.0.9:15443",
    "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
    POD_RULE,
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    "-A KUBE-POSTROUTING -j MASQUERADE",
];

fn read(ns: &NetNs) -> String {
    ns.run(meshnet::iptables::legacy_nat_rules).expect("reading the nat table").expect("a legacy nat table")
}

/// A namespace of the test's own where iptables-legacy can write `table`; `None` (the test
/// reported as skipped) on a kernel without the ip_tables modules.
fn legacy_ns(name: &str, table: &str) -> Option<NetNs> {
    require_root();
    let ns = NetNs::new(name);
    let (ok, out) = ns.try_exec(&format!("iptables-legacy -t {table} -L -n"));
    if !ok {
        eprintln!("{out}");
        skip("iptables-legacy with the ip_tables modules");
        return None;
    }
    Some(ns)
}

#[test]
fn the_legacy_nat_table_reads_as_iptables_save_prints_it() {
    let Some(ns) = legacy_ns("mnipt", "nat") else {
        return;
    };
    for r in RULES {
        ns.exec(&format!("iptables-legacy -t nat {r}"));
    }
    let saved = ns.exec("iptables-legacy-save -t nat");
    let read_back = read(&ns);
    // Rules made only of what doctor reads come out in iptables-save's own words.
    for line in [POD_RULE, RULES[3], RULES[5], RULES[7], "-A POSTROUTING -m comment -j KUBE-POSTROUTING"] {
        let expected_in_save = line != "-A POSTROUTING -m comment -j KUBE-POSTROUTING";
        assert!(!expected_in_save || saved.lines().any(|l| l == line), "fixture: {line:?} not in iptables-legacy-save:\n{saved}");
        assert!(read_back.lines().any(|l| l == line), "{line:?} not read back:\n{read_back}");
    }
    assert_eq!(read_back.lines().count(), RULES.len() - 1, "{read_back}");

    // doctor's verdict is the same from either.
    let pods = vec!["10.244.0.0/16".parse().unwrap()];
    let gws: Vec<Ipv4Addr> = vec!["10.20.144.165".parse().unwrap()];
    let (from_save, from_kernel) = (find_masquerade(&saved, &pods, &gws), find_masquerade(&read_back, &pods, &gws));
    assert_eq!(from_kernel.pod_rules, [POD_RULE]);
    assert_eq!(from_kernel.pod_rules.len(), from_save.pod_rules.len());
    assert_eq!(from_kernel.other_rules.len(), from_save.other_rules.len(), "{from_kernel:?}\n{from_save:?}");

    // Without the CNI's rule nothing masquerades pod traffic: kube-proxy's only sees marked
    // packets, Docker's only its bridge's.
    ns.exec(&format!("iptables-legacy -t nat {}", POD_RULE.replacen("-A", "-D", 1)));
    let without = find_masquerade(&read(&ns), &pods, &gws);
    assert!(without.pod_rules.is_empty(), "{without:?}");
    assert_eq!(without.other_rules.len(), 2, "{without:?}");
}

/// The same for a host whose iptables is iptables-nft: the rules live in nftables, and doctor
/// reads them over netlink.
#[test]
fn the_nftables_nat_table_reads_as_iptables_save_prints_it() {
    require_root();
    let ns = NetNs::new("mnnft");
    let (ok, out) = ns.try_exec("iptables-nft -t nat -L -n");
    if !ok {
        eprintln!("{out}");
        skip("iptables-nft with nf_tables");
        return;
    }
    for r in RULES {
        ns.exec(&format!("iptables-nft -t nat {r}"));
    }
    let saved = ns.exec("iptables-nft-save -t nat");
    let read_back = ns.run(meshnet::nftables::ipv4_rules).expect("reading the nat table");
    for line in [POD_RULE, RULES[3], RULES[5], RULES[7]] {
        assert!(saved.lines().any(|l| l == line), "fixture: {line:?} not in iptables-nft-save:\n{saved}");
        assert!(read_back.lines().any(|l| l == line), "{line:?} not read back:\n{read_back}");
    }
    assert_eq!(read_back.lines().count(), RULES.len() - 1, "{read_back}");
    let pods = vec!["10.244.0.0/16".parse().unwrap()];
    let gws: Vec<Ipv4Addr> = vec!["10.20.144.165".parse().unwrap()];
    let (from_save, from_kernel) = (find_masquerade(&saved, &pods, &gws), find_masquerade(&read_back, &pods, &gws));
    assert_eq!(from_kernel.pod_rules, [POD_RULE]);
    assert_eq!(from_kernel.other_rules.len(), from_save.other_rules.len(), "{from_kernel:?}\n{from_save:?}");
    ns.exec(&format!("iptables-nft -t nat {}", POD_RULE.replacen("-A", "-D", 1)));
    let without = find_masquerade(&ns.run(meshnet::nftables::ipv4_rules).unwrap(), &pods, &gws);
    assert!(without.pod_rules.is_empty(), "{without:?}");
    assert_eq!(without.other_rules.len(), 2, "{without:?}");
}

/// kube-proxy's FORWARD rules and a tunnel exemption, as iptables-legacy writes them on a
/// CentOS 7 node: doctor in the agent's pod reads the filter table from the kernel, in
/// iptables-save's words for what it judges, and comes to the same verdict on stack delivery.
#[test]
fn the_legacy_filter_table_reads_as_iptables_save_prints_it() {
    use meshnet::doctor::{forward_check, Level};
    let Some(ns) = legacy_ns("mniptf", "filter") else {
        return;
    };
    let judged = [
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        "-A KUBE-FORWARD -s 10.244.0.0/16 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -i eth+ -m state --state INVALID,NEW -j DROP",
        "-A FORWARD -i lan0 -o cni0 -m conntrack ! --ctstate INVALID -j ACCEPT",
    ];
    // What doctor prints where iptables-save prints more (`--comment`'s text).
    let read_as = |r: &str| r.replace(" --comment \"kubernetes forwarding rules\"", "");
    ns.exec("iptables-legacy -t filter -N KUBE-FORWARD");
    for r in judged {
        ns.exec(&format!("iptables-legacy -t filter {r}"));
    }
    let saved = ns.exec("iptables-legacy-save -t filter");
    let read_back = ns.run(meshnet::iptables::legacy_filter_rules).expect("reading the filter table").expect("a legacy filter table");
    for r in judged {
        assert!(saved.lines().any(|l| l == r), "fixture: {r:?} not in iptables-legacy-save:\n{saved}");
        assert!(read_back.lines().any(|l| l == read_as(r)), "{:?} not read back:\n{read_back}", read_as(r));
    }

    let uplinks = ["lan0".to_string()];
    let peers = ["10.245.0.0/16".parse().unwrap()];
    let (from_save, from_kernel) = (forward_check(Some(Ok(saved.clone())), &uplinks, &peers), forward_check(Some(Ok(read_back)), &uplinks, &peers));
    assert_eq!(from_kernel.level, Level::Fail, "{from_kernel:?}");
    assert!(from_kernel.detail.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"), "{from_kernel:?}");
    assert_eq!((from_save.level, from_save.detail), (from_kernel.level, from_kernel.detail));

    // The exemption ahead of kube-proxy's jump: both read it the same, and pass.
    ns.exec("iptables-legacy -t filter -I FORWARD 1 -i lan0 -s 10.245.0.0/16 -j ACCEPT");
    let read_back = ns.run(meshnet::iptables::legacy_filter_rules).unwrap().unwrap();
    assert!(read_back.lines().any(|l| l == "-A FORWARD -i lan0 -s 10.245.0.0/16 -j ACCEPT" || l == "-A FORWARD -s 10.245.0.0/16 -i lan0 -j ACCEPT"), "{read_back}");
    assert_eq!(forward_check(Some(Ok(read_back)), &uplinks, &peers).level, Level::Ok);
}
