//! `meshnet maps dump`: the pinned maps joined into readable rows, as a table or as JSON.
//!
//! The JSON shapes are a stable interface (documented in docs/operations.md):
//! - `routes`: `[{cidr, peer, gateways: [{address, port, udpPort, up}]}]`
//! - `gateways`: `[{peer, address, port, udpPort, up}]`
//! - `nat`: `[{proto, pod, remote, gateway, natPort, idleSeconds, state, unanswered}]`,
//!   endpoints as `ip:port` strings, `natPort` null unless the source port was remapped,
//!   `unanswered` true while a flow opened since the agent started has had no reply
//! - `stats`: `{counter: value}`
//! - `tunnel`: `{settings: {clusterId, publishedClusterId, port, takenPort, delivery, mtu,
//!   podCIDRs, nodeAddresses, decapCopy} | null, routes: [{cidr,
//!   peer, node, port, source, ifindex, mtu, decap}], peers: [{peer, nodes, txPackets, txBytes,
//!   rxPackets, rxBytes}], podPorts: [{address, ifindex, podMac, lookup}]}`
//!
//! A map whose pin is missing is reported and skipped.

use std::{collections::BTreeMap, fmt::Write as _};

use meshnet_common::{
    names, FlowKey, Gateway, FLOW_FIN_PEER, FLOW_FIN_POD, FLOW_REMAPPED, FLOW_RST, FLOW_UNANSWERED, GW_UP, IPPROTO_TCP,
    IPPROTO_UDP,
};
use serde::Serialize;

use crate::{
    maps::{self, addr_of_be, ControlMaps},
    pins::Pins,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Routes,
    Gateways,
    Nat,
    Stats,
    /// Tunnel mode: this node's tunnel settings, the peer nodes' pod CIDRs, and packets and
    /// bytes per peer.
    Tunnel,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub address: String,
    pub port: u16,
    pub udp_port: Option<u16>,
    pub up: bool,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RouteRow {
    pub cidr: String,
    pub peer: String,
    pub gateways: Vec<GatewayRow>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NatRow {
    pub proto: String,
    pub pod: String,
    pub remote: String,
    pub gateway: String,
    pub nat_port: Option<u16>,
    pub idle_seconds: u64,
    pub state: String,
    /// No reply yet: the GC expires it after `nat.unansweredTimeoutSeconds` of idleness.
    pub unanswered: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct Dump {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<GatewayRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<Vec<NatRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<BTreeMap<&'static str, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<crate::tunnel::TunnelDump>,
    /// Maps that could not be read, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

fn gateway_row(peer: Option<String>, g: &Gateway) -> GatewayRow {
    let udp = u16::from_be(g.udp_port_be);
    GatewayRow {
        peer,
        address: addr_of_be(g.addr_be).to_string(),
        port: u16::from_be(g.tcp_port_be),
        udp_port: (udp != 0).then_some(udp),
        up: g.flags & GW_UP != 0,
    }
}

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        other => other.to_string(),
    }
}

/// A flow's state as the dumps and `explain` name it, from its protocol and flags.
#[must_use]
pub fn flow_state(proto: u8, flags: u32) -> &'static str {
    if proto != IPPROTO_TCP {
        return "active";
    }
    if flags & FLOW_RST != 0 {
        "reset"
    } else if flags & (FLOW_FIN_POD | FLOW_FIN_PEER) == FLOW_FIN_POD | FLOW_FIN_PEER {
        "closed"
    } else if flags & (FLOW_FIN_POD | FLOW_FIN_PEER) != 0 {
        "closing"
    } else {
        "established"
    }
}

/// Nanoseconds on the clock `bpf_ktime_get_ns` reads.
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
    })
}

/// Reads what `what` asks for from the pinned maps.
#[must_use]
pub fn collect(pins: &Pins, what: What) -> Dump {
    let mut dump = Dump::default();
    let want = |w: What| what == w || what == What::All;
    let control = match ControlMaps::open(pins) {
        Ok(m) => Some(m),
        Err(e) => {
            if what != What::Stats {
                dump.missing.push(format!("{e:#}"));
            }
            None
        }
    };
    if let Some(m) = &control {
        let peer_names: BTreeMap<u32, String> =
            m.names.iter().flatten().map(|(id, n)| (id, maps::peer_name_of(&n))).collect();
        let name_of = |id: u32| peer_names.get(&id).cloned().unwrap_or_else(|| format!("#{id:08x}"));
        let peers: BTreeMap<u32, _> = m.peers.iter().flatten().collect();
        if want(What::Routes) {
            let rows = match m.current_routes() {
                Ok(routes) => routes
                    .into_iter()
                    .map(|(net, id)| RouteRow {
                        cidr: net.to_string(),
                        peer: name_of(id),
                        gateways: peers
                            .get(&id)
                            .map(|pg| pg.live().iter().map(|g| gateway_row(None, g)).collect())
                            .unwrap_or_default(),
                    })
                    .collect(),
                Err(e) => {
                    dump.missing.push(format!("{}: {e:#}", names::ROUTES));
                    Vec::new()
                }
            };
            dump.routes = Some(rows);
        }
        if want(What::Gateways) {
            let mut rows = Vec::new();
            for (id, pg) in &peers {
                for g in pg.live() {
                    rows.push(gateway_row(Some(name_of(*id)), g));
                }
            }
            dump.gateways = Some(rows);
        }
        if want(What::Nat) {
            let now = monotonic_ns();
            let mut rows: Vec<NatRow> = m
                .nat_fwd
                .iter()
                .flatten()
                .map(|(k, f)| {
                    // Each direction records its own FINs; the state needs both.
                    let rev = m.nat_rev.get(&FlowKey::rev_of_fwd(&k, &f), 0).ok();
                    // A forward half's copy of the unanswered mark is an earlier release's (see
                    // ControlMaps::judged_flags).
                    let flags = (f.flags & !FLOW_UNANSWERED) | rev.map_or(0, |r| r.flags);
                    let last = f.last_seen_ns.max(rev.map_or(0, |r| r.last_seen_ns));
                    NatRow {
                        proto: proto_name(k.proto),
                        pod: format!("{}:{}", addr_of_be(k.src_be), u16::from_be(k.sport_be)),
                        remote: format!("{}:{}", addr_of_be(k.dst_be), u16::from_be(k.dport_be)),
                        gateway: format!("{}:{}", addr_of_be(f.gw_addr_be), u16::from_be(f.gw_port_be)),
                        nat_port: (f.flags & FLOW_REMAPPED != 0).then(|| u16::from_be(f.nat_sport_be)),
                        idle_seconds: now.saturating_sub(last) / 1_000_000_000,
                        state: flow_state(k.proto, flags).into(),
                        unanswered: flags & FLOW_UNANSWERED != 0,
                    }
                })
                .collect();
            rows.sort_by(|a, b| (&a.proto, &a.pod, &a.remote).cmp(&(&b.proto, &b.pod, &b.remote)));
            dump.nat = Some(rows);
        }
        if want(What::Tunnel) {
            match crate::tunnel::TunnelMaps::open(pins) {
                Ok(t) => dump.tunnel = Some(t.dump(&peer_names)),
                // Pins of a release before tunnel mode have none: nothing to show in `all`.
                Err(e) if what == What::Tunnel => dump.missing.push(format!("{e:#}")),
                Err(_) => {}
            }
        }
    }
    if want(What::Stats) {
        match maps::read_stats(pins) {
            Ok(s) => dump.stats = Some(s),
            Err(e) => dump.missing.push(format!("{e:#}")),
        }
    }
    dump
}

/// Renders a dump as aligned text tables.
#[must_use]
pub fn table(d: &Dump) -> String {
    let mut out = String::new();
    if let Some(routes) = &d.routes {
        let rows: Vec<Vec<String>> = routes
            .iter()
            .map(|r| {
                let gws = r
                    .gateways
                    .iter()
                    .map(|g| format!("{}:{}{}{}", g.address, g.port, g.udp_port.map(|u| format!("/udp:{u}")).unwrap_or_default(), if g.up { "" } else { " (down)" }))
                    .collect::<Vec<_>>()
                    .join(", ");
                vec![r.cidr.clone(), r.peer.clone(), gws]
            })
            .collect();
        render(&mut out, "routes", &["CIDR", "PEER", "GATEWAYS"], &rows);
    }
    if let Some(gws) = &d.gateways {
        let rows: Vec<Vec<String>> = gws
            .iter()
            .map(|g| {
                vec![
                    g.peer.clone().unwrap_or_default(),
                    g.address.clone(),
                    g.port.to_string(),
                    g.udp_port.map_or("-".into(), |p| p.to_string()),
                    if g.up { "up".into() } else { "down".into() },
                ]
            })
            .collect();
        render(&mut out, "gateways", &["PEER", "ADDRESS", "TCP", "UDP", "STATE"], &rows);
    }
    if let Some(nat) = &d.nat {
        let rows: Vec<Vec<String>> = nat
            .iter()
            .map(|n| {
                vec![
                    n.proto.clone(),
                    n.pod.clone(),
                    n.remote.clone(),
                    n.gateway.clone(),
                    n.nat_port.map_or("-".into(), |p| p.to_string()),
                    format!("{}s", n.idle_seconds),
                    n.state.clone(),
                    if n.unanswered { "no".into() } else { "yes".into() },
                ]
            })
            .collect();
        let header = ["PROTO", "POD", "REMOTE", "VIA GATEWAY", "NAT PORT", "IDLE", "STATE", "ANSWERED"];
        render(&mut out, "nat", &header, &rows);
    }
    if let Some(stats) = &d.stats {
        let rows: Vec<Vec<String>> = stats.iter().map(|(k, v)| vec![(*k).to_string(), v.to_string()]).collect();
        render(&mut out, "stats", &["COUNTER", "VALUE"], &rows);
    }
    if let Some(t) = &d.tunnel {
        let settings: Vec<Vec<String>> = t
            .settings
            .iter()
            .map(|s| {
                let port = match s.taken_port {
                    Some(0) => format!("{} (uplink program takes none)", s.port),
                    Some(taken) if taken != s.port => format!("{} (uplink program takes {taken})", s.port),
                    _ => s.port.to_string(),
                };
                let id = match s.published_cluster_id {
                    Some(p) if p != 0 && p != s.cluster_id => format!("{:08x} (encapsulation writes {p:08x})", s.cluster_id),
                    _ => format!("{:08x}", s.cluster_id),
                };
                let mut cidrs = s.pod_cidrs.join(",");
                if s.decap_copy == "other" {
                    cidrs.push_str(" (decapsulation reads other settings until the next sync)");
                }
                vec![port, s.delivery.to_string(), s.mtu.to_string(), id, cidrs]
            })
            .collect();
        render(&mut out, "tunnel settings", &["PORT", "DELIVERY", "MTU", "CLUSTER ID", "POD CIDRS"], &settings);
        let routes: Vec<Vec<String>> = t
            .routes
            .iter()
            .map(|r| {
                let node = format!("{}:{}", r.node, r.port);
                vec![r.cidr.clone(), r.peer.clone(), node, r.source.clone(), r.ifindex.to_string(), r.mtu.to_string(), r.decap.to_owned()]
            })
            .collect();
        render(&mut out, "tunnel routes", &["CIDR", "PEER", "NODE", "SOURCE", "IFINDEX", "MTU", "DECAP"], &routes);
        let peers: Vec<Vec<String>> = t
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.peer.clone(),
                    p.nodes.join(","),
                    p.tx_packets.to_string(),
                    p.tx_bytes.to_string(),
                    p.rx_packets.to_string(),
                    p.rx_bytes.to_string(),
                ]
            })
            .collect();
        render(&mut out, "tunnel peers", &["PEER", "NODES", "TX PACKETS", "TX BYTES", "RX PACKETS", "RX BYTES"], &peers);
        let ports: Vec<Vec<String>> =
            t.pod_ports.iter().map(|p| vec![p.address.clone(), p.ifindex.to_string(), p.pod_mac.clone(), p.lookup.to_owned()]).collect();
        render(&mut out, "tunnel pod ports", &["POD", "IFINDEX", "POD MAC", "LOOKUP"], &ports);
        if !t.peer_ports.is_empty() {
            let list: Vec<String> = t.peer_ports.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "tunnel peer ports (pods' own UDP to them is dropped, tunnel_forged): {}", list.join(", "));
        }
    }
    for m in &d.missing {
        let _ = writeln!(out, "missing: {m}");
    }
    out
}

fn render(out: &mut String, title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let _ = writeln!(out, "# {title} ({} entries)", rows.len());
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Dump {
        Dump {
            routes: Some(vec![RouteRow {
                cidr: "10.245.0.0/16".into(),
                peer: "cluster2".into(),
                gateways: vec![
                    GatewayRow { peer: None, address: "192.0.2.2".into(), port: 31674, udp_port: Some(31675), up: true },
                    GatewayRow { peer: None, address: "192.0.2.3".into(), port: 31674, udp_port: None, up: false },
                ],
            }]),
            gateways: Some(vec![GatewayRow {
                peer: Some("cluster2".into()),
                address: "192.0.2.2".into(),
                port: 31674,
                udp_port: Some(31675),
                up: true,
            }]),
            nat: Some(vec![
                NatRow {
                    proto: "udp".into(),
                    pod: "10.244.0.10:5300".into(),
                    remote: "10.245.0.21:8080".into(),
                    gateway: "192.0.2.2:31675".into(),
                    nat_port: Some(62_111),
                    idle_seconds: 3,
                    state: "active".into(),
                    unanswered: false,
                },
                NatRow {
                    proto: "tcp".into(),
                    pod: "10.244.0.10:41000".into(),
                    remote: "10.245.0.22:443".into(),
                    gateway: "192.0.2.2:31674".into(),
                    nat_port: None,
                    idle_seconds: 12,
                    state: "established".into(),
                    unanswered: true,
                },
            ]),
            stats: Some(BTreeMap::from([("flow_opened", 7), ("port_remap", 1)])),
            tunnel: None,
            missing: vec![],
        }
    }

    #[test]
    fn table_and_json_are_golden() {
        let d = sample();
        let table = table(&d);
        let json = serde_json::to_string_pretty(&d).unwrap();
        crate::golden::check("dump_table.txt", &table);
        crate::golden::check("dump.json", &json);
    }

    /// The settings' row flags what the per-packet paths were given when it is not the
    /// settings' own (a sync not yet done), and stays plain when it is.
    #[test]
    fn tunnel_settings_show_what_the_datapath_was_given() {
        let row = |taken_port, published_cluster_id| crate::tunnel::TunnelSettingsRow {
            decap_copy: "same",
            cluster_id: 0x1234_5678,
            published_cluster_id,
            port: 31800,
            taken_port,
            delivery: "redirect",
            mtu: 1500,
            pod_cidrs: vec!["10.244.0.0/24".into()],
            node_addresses: vec![],
        };
        let text = |settings| {
            let tunnel = crate::tunnel::TunnelDump { settings: Some(settings), routes: vec![], peers: vec![], pod_ports: vec![], peer_ports: vec![31801] };
            table(&Dump { tunnel: Some(tunnel), ..sample() })
        };
        for plain in [row(Some(31800), Some(0x1234_5678)), row(None, None), row(Some(31800), Some(0))] {
            let t = text(plain);
            assert!(!t.contains("uplink program takes") && !t.contains("encapsulation writes"), "{t}");
        }
        assert!(text(row(None, None)).contains("tunnel peer ports (pods' own UDP to them is dropped, tunnel_forged): 31801"));
        assert!(text(row(Some(0), Some(0x1234_5678))).contains("31800 (uplink program takes none)"));
        assert!(text(row(Some(31900), Some(0x1234_5678))).contains("31800 (uplink program takes 31900)"));
        assert!(text(row(Some(31800), Some(7))).contains("12345678 (encapsulation writes 00000007)"));
        for (copy, flagged) in [("same", false), ("none", false), ("other", true)] {
            let t = text(crate::tunnel::TunnelSettingsRow { decap_copy: copy, ..row(Some(31800), Some(0x1234_5678)) });
            assert_eq!(t.contains("10.244.0.0/24 (decapsulation reads other settings until the next sync)"), flagged, "{copy}: {t}");
        }
    }

    #[test]
    fn tcp_state_needs_both_fins() {
        assert_eq!(flow_state(IPPROTO_TCP, FLOW_FIN_POD), "closing");
        assert_eq!(flow_state(IPPROTO_TCP, FLOW_FIN_POD | FLOW_FIN_PEER), "closed");
        assert_eq!(flow_state(IPPROTO_TCP, FLOW_RST), "reset");
        assert_eq!(flow_state(IPPROTO_UDP, FLOW_RST), "active");
    }
}
