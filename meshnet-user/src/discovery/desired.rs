//! What the controller publishes, decided by one pure function of what it watches. The
//! controller applies the result (writes, logs, counters, its memory of each peer's last good
//! state); nothing here has an effect, so every rule is shown by the golden tests below.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use super::{
    published::PeerStatus,
    resolve::{self, ClusterView, LocalNode, MeshNetworks, ResolveOptions, ALLOWED_CIDRS_ANNOTATION, POD_CIDRS_ANNOTATION},
};
use crate::config::{self, PeerMode, RawPeer, Reserved};

/// What the controller knows of one remote cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteInput<'a> {
    /// Its last complete view; `None` before its watches synced.
    pub view: Option<&'a ClusterView>,
    /// Its API server is failing: its view is not to be trusted now.
    pub stale: bool,
    pub error: Option<&'a str>,
    /// Why the remote is refused as a whole (its kubeconfig, ...).
    pub refused: Option<&'a str>,
    /// Its remote secret's pod CIDR override; `Err` when unreadable, which refuses.
    pub pod_cidrs: Option<&'a Result<Vec<Ipv4Net>, String>>,
    /// Its remote secret's allow-list annotation; `Err` when unreadable, which refuses.
    pub allowed: Option<&'a Result<Vec<Ipv4Net>, String>>,
    /// Its remote secret's mode annotation, as written.
    pub mode_annotation: Option<&'a str>,
}

/// Everything the published state depends on.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub remotes: &'a BTreeMap<String, RemoteInput<'a>>,
    pub resolve: &'a ResolveOptions,
    /// `--pod-cidrs`, by peer: wins over the secret's annotation and the nodes.
    pub pod_cidrs: &'a BTreeMap<String, Vec<Ipv4Net>>,
    /// `--allowed-cidrs`, by peer: wins over the secret's annotation.
    pub allowed_cidrs: &'a BTreeMap<String, Vec<Ipv4Net>>,
    /// `--mode`, by peer: wins over the secret's annotation.
    pub modes: &'a BTreeMap<String, PeerMode>,
    /// `--default-mode`: for remotes with neither.
    pub default_mode: PeerMode,
    /// This cluster's Service CIDRs: no peer may claim them.
    pub service_cidrs: &'a [Ipv4Net],
    /// This cluster's Nodes: no peer may claim their pod CIDRs or addresses, unless it was
    /// published with them before (see [`resolve::unheld_addresses`]).
    pub local: &'a [LocalNode],
    /// Istio's ConfigMap, for networks written by hand in its `meshNetworks`.
    pub istio: Option<&'a ConfigMap>,
    /// The last known peer of each hand-written network: kept, stale, while `meshNetworks` (or
    /// that network's entry) is unreadable or the ConfigMap is gone. See [`hand_written`].
    pub hand: &'a BTreeMap<String, RawPeer>,
    /// The last good peer of each remote, published while it is stale or unresolvable.
    pub last_good: &'a BTreeMap<String, RawPeer>,
    /// What each peer was last published with (the controller keeps each while the peer is
    /// configured, refused or not): a peer published with a CIDR or a node address keeps it
    /// against any other peer's claim. Entries of peers no longer configured (no remote
    /// secret, no hand-written network) are not consulted.
    pub published: &'a BTreeMap<String, RawPeer>,
    /// The peers in the published list now: their records have the tunnel room first.
    pub listed: &'a BTreeSet<String>,
}

/// What to publish, and what the controller remembers and reports about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// `peers.yaml`, sorted by name.
    pub peers: Vec<RawPeer>,
    /// `status.yaml`.
    pub status: BTreeMap<String, PeerStatus>,
    /// The peers resolved from a live view now: each becomes its remote's last good state.
    pub resolved: BTreeMap<String, RawPeer>,
    /// Every refused peer, and why.
    pub refused: BTreeMap<String, String>,
    /// Every peer that keeps what this cluster's Nodes now claim of it, and what they claim.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub clashes: BTreeMap<String, String>,
    /// Inputs wrong as a whole, not as one peer (an unreadable `meshNetworks`).
    pub warnings: Vec<String>,
    /// The last published peer of each hand-written network, for the next [`Inputs::hand`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hand: BTreeMap<String, RawPeer>,
}

/// Why `p` must not be published, if it must not: the agent's own validator (so that no agent
/// ever receives a peer it would refuse), then the cluster's allow-list.
fn vet(
    p: &RawPeer,
    flag: Option<&Vec<Ipv4Net>>,
    annotation: Option<&Result<Vec<Ipv4Net>, String>>,
    reserved: &Reserved,
) -> Option<String> {
    if let Err(errors) = config::validate_peer(p, reserved) {
        return Some(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
    }
    if let Some(list) = flag {
        return resolve::outside_allowed(p, list, "--allowed-cidrs");
    }
    match annotation {
        Some(Ok(list)) => resolve::outside_allowed(p, list, &format!("annotation {ALLOWED_CIDRS_ANNOTATION}")),
        Some(Err(e)) => Some(format!("annotation {ALLOWED_CIDRS_ANNOTATION}: {e}; refusing the peer until it is fixed")),
        None => None,
    }
}

/// What the datapath holds across all tunnel peers: nodes, and node pod CIDRs.
fn tunnel_room() -> (usize, usize) {
    let max_nodes = usize::try_from(meshnet_common::limits::MAX_TUNNEL_NODES).unwrap_or(usize::MAX);
    let max_routes = usize::try_from(meshnet_common::limits::MAX_TUNNEL_ROUTES).unwrap_or(usize::MAX);
    (max_nodes, max_routes)
}

/// What `p` takes of [`tunnel_room`].
fn tunnel_size(p: &RawPeer) -> (usize, usize) {
    (p.nodes.len(), p.nodes.iter().map(|n| n.pod_cidrs.len()).sum())
}

/// Why `nodes` and `routes` in all, with `p`'s, do not fit the tunnel room, if they do not.
fn over_room(p: (usize, usize), nodes: usize, routes: usize) -> Option<String> {
    let (max_nodes, max_routes) = tunnel_room();
    if nodes > max_nodes {
        Some(format!("nodes: {} nodes make {nodes} across the tunnel peers; at most {max_nodes}", p.0))
    } else if routes > max_routes {
        Some(format!("nodes: {} node podCIDRs make {routes} across the tunnel peers; at most {max_routes}", p.1))
    } else {
        None
    }
}

/// Tunnel peers published before, each at the version it was published with where its
/// current one does not fit the datapath's room beside the others as they were published
/// (`fits` says whether that version passes today's rules; if not, the current one stays, and
/// [`refuse_tunnel_clashes`] refuses it). The room is each published peer's as it was
/// published first, growth getting what is left in order of name: else one peer growing
/// would have every peer that sorts after it refused and withdrawn from every node. Returns
/// the peers and, for each kept as it was published, why.
fn keep_published_room(
    peers: Vec<RawPeer>,
    published: &[&RawPeer],
    reserved: &BTreeMap<String, (usize, usize)>,
    fits: impl Fn(&RawPeer) -> bool,
) -> (Vec<RawPeer>, BTreeMap<String, String>) {
    let record = |p: &RawPeer| {
        reserved.contains_key(p.name.as_str()).then(|| published.iter().find(|h| h.name == p.name).copied()).flatten()
    };
    let (mut nodes, mut routes) = reserved.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let mut kept = BTreeMap::new();
    let peers = peers
        .into_iter()
        .map(|p| {
            // A gateway peer now keeps its record's room through this pass: a Node clash may
            // yet send out its published tunnel version (`against_local`).
            let Some(h) = record(&p).filter(|_| p.mode == PeerMode::Tunnel) else {
                return p;
            };
            let (held, size) = (tunnel_size(h), tunnel_size(&p));
            let (with_nodes, with_routes) = (nodes - held.0 + size.0, routes - held.1 + size.1);
            match over_room(size, with_nodes, with_routes) {
                None => {
                    (nodes, routes) = (with_nodes, with_routes);
                    p
                }
                Some(why) if over_room(held, nodes, routes).is_none() && fits(h) => {
                    kept.insert(p.name.clone(), format!("{why}; it stays as it was published"));
                    h.clone()
                }
                Some(_) => p,
            }
        })
        .collect();
    (peers, kept)
}

/// The room each of `peers` that was published as a tunnel peer and is one now holds: its
/// published size, granted while the room lasts, first to the peers `listed` now, then to
/// the others, each by name. The records may add up to more than the room (one kept while
/// its peer was refused, others grown meanwhile): a record past it holds nothing, and its
/// peer takes its turn with the newcomers, rather than have every peer after it refused in
/// turn; and a live peer keeps its room against one coming back. A peer published in
/// gateway mode holds none. Reckoned once, before any clash is settled, for both
/// [`keep_published_room`] and [`refuse_tunnel_clashes`]: reckoned again over fewer peers,
/// it could give a version kept for its room no room.
fn reservations(peers: &[RawPeer], published: &[&RawPeer], listed: &BTreeSet<String>) -> BTreeMap<String, (usize, usize)> {
    // Whatever mode a candidate has now: one that is a gateway peer now may yet go out as
    // its published tunnel version (`against_local`); one that stays a gateway peer never
    // reaches the tunnel budget, where only its members' rooms are summed.
    // Gateway peers now last: they rarely go out as their tunnel version, and must not crowd
    // out a tunnel peer's record.
    let mut held: Vec<(bool, bool, &str, (usize, usize))> = peers
        .iter()
        .filter_map(|p| {
            let h = published.iter().find(|h| h.name == p.name && h.mode == PeerMode::Tunnel)?;
            Some((p.mode != PeerMode::Tunnel, !listed.contains(&p.name), p.name.as_str(), tunnel_size(h)))
        })
        .collect();
    held.sort_unstable();
    let (mut nodes, mut routes) = (0, 0);
    let mut out = BTreeMap::new();
    for (_, _, name, size) in held {
        if over_room(size, nodes + size.0, routes + size.1).is_none() {
            (nodes, routes) = (nodes + size.0, routes + size.1);
            out.insert(name.to_owned(), size);
        }
    }
    out
}

/// Tunnel peers kept (some without nodes another peer has), those refused and why, and the
/// nodes each kept one lost, in one line, for its `skipped:` status.
type TunnelClashes = (Vec<RawPeer>, BTreeMap<String, String>, BTreeMap<String, String>);

/// Settles what the agents could not take of the tunnel peers beside each other: a node
/// address that two tunnel peers list (the decapsulating side knows a peer by its node's
/// address), and more nodes or node pod CIDRs than the datapath holds across all tunnel
/// peers. Of two peers that list one address, the one published with it keeps it (see
/// [`resolve::refuse_overlaps`]); when neither was (or both), neither does. A peer that
/// loses an address loses that node alone, as a node the resolver leaves out costs no
/// other (said so in its `skipped:`); one left with no node is refused. The room goes first
/// to the peers published before, each to what it was published with, so that no
/// newcomer, whatever its name, nor another's growth takes an address or the room of one.
/// Each agent would refuse such a peer anyway; settled here, it is settled once, with the
/// reason in `status.yaml`.
fn refuse_tunnel_clashes(mut peers: Vec<RawPeer>, published: &[&RawPeer], reserved: &BTreeMap<String, (usize, usize)>) -> TunnelClashes {
    // Each peer's node addresses that it loses, and why.
    let mut taken: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    {
        let held: BTreeMap<&str, BTreeSet<&str>> =
            published.iter().map(|p| (p.name.as_str(), p.nodes.iter().map(|n| n.address.as_str()).collect())).collect();
        let tunnel: Vec<&RawPeer> = peers.iter().filter(|p| p.mode == PeerMode::Tunnel).collect();
        let holds = |who: &str, addr: &str| held.get(who).is_some_and(|s| s.contains(addr));
        // Each node address with the candidates that list it, and with the configured peers
        // not among them that were published with it (they hold it still).
        let mut listed: BTreeMap<&str, Vec<&RawPeer>> = BTreeMap::new();
        for p in &tunnel {
            for n in &p.nodes {
                let at = listed.entry(n.address.as_str()).or_default();
                if !at.iter().any(|q| q.name == p.name) {
                    at.push(p);
                }
            }
        }
        let absent: BTreeMap<&str, &str> = published
            .iter()
            .filter(|h| !tunnel.iter().any(|t| t.name == h.name))
            .flat_map(|h| h.nodes.iter().map(|n| (n.address.as_str(), h.name.as_str())))
            .collect();
        for (addr, at) in &listed {
            let mut lose = |who: &RawPeer, other: &str, why: &str| {
                let by_address = taken.entry(who.name.clone()).or_default();
                by_address.entry((*addr).to_owned()).or_insert_with(|| format!("nodes: {addr} is also a node of peer {other:?}{why}"));
            };
            if let Some(owner) = absent.get(addr) {
                for p in at.iter().filter(|p| !holds(&p.name, addr)) {
                    lose(p, owner, ", published with it before (not published now)");
                }
            }
            for (i, p) in at.iter().enumerate() {
                for q in at.iter().skip(i + 1) {
                    match resolve::contest(holds(&p.name, addr), holds(&q.name, addr)) {
                        resolve::Contest::First => lose(q, &p.name, ", published with it before"),
                        resolve::Contest::Second => lose(p, &q.name, ", published with it before"),
                        resolve::Contest::Neither => {
                            let why = if holds(&p.name, addr) { ", both published with it before" } else { "; neither was published with it before, so neither is" };
                            lose(p, &q.name, why);
                            lose(q, &p.name, why);
                        }
                    }
                }
            }
        }
    }
    let mut refused = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    for p in peers.iter_mut().filter(|p| p.mode == PeerMode::Tunnel) {
        let Some(gone) = taken.get(&p.name) else { continue };
        if p.nodes.iter().all(|n| gone.contains_key(&n.address)) {
            // The first of its addresses, as the reason.
            refused.insert(p.name.clone(), gone.values().next().cloned().unwrap_or_default());
            continue;
        }
        p.nodes.retain(|n| !gone.contains_key(&n.address));
        // As few reasons as the resolver keeps: a remote listing thousands of another's
        // addresses must not fill `status.yaml`.
        let more = gone.len().saturating_sub(resolve::MAX_REASONS);
        let mut why: Vec<String> = gone.values().take(resolve::MAX_REASONS).map(|w| format!("{w}; that node is left out")).collect();
        if more > 0 {
            why.push(format!("and {more} more"));
        }
        skipped.insert(p.name.clone(), why.join("; "));
    }
    let mut budget: Vec<&RawPeer> = peers.iter().filter(|p| p.mode == PeerMode::Tunnel && !refused.contains_key(&p.name)).collect();
    budget.sort_by_key(|p| (!reserved.contains_key(p.name.as_str()), p.name.as_str()));
    // What peers refused since hold is let go.
    let reserved = |p: &RawPeer| reserved.get(p.name.as_str()).copied().unwrap_or((0, 0));
    let (mut nodes, mut routes) = budget.iter().map(|p| reserved(p)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    for p in budget {
        let (held, size) = (reserved(p), tunnel_size(p));
        let (with_nodes, with_routes) = (nodes - held.0 + size.0, routes - held.1 + size.1);
        if let Some(why) = over_room(size, with_nodes, with_routes) {
            // Its room is let go: the records may hold more than the room (one held while its
            // peer was not published, another published meanwhile), and kept, it would have
            // every peer after it refused in turn.
            refused.insert(p.name.clone(), why);
            (nodes, routes) = (nodes - held.0, routes - held.1);
            continue;
        }
        (nodes, routes) = (with_nodes, with_routes);
    }
    skipped.retain(|name, _| !refused.contains_key(name));
    (peers.into_iter().filter(|p| !refused.contains_key(&p.name)).collect(), refused, skipped)
}

/// What [`settle_claims`] decided.
struct Settled {
    /// The peers to publish, in their order.
    peers: Vec<RawPeer>,
    /// The peers refused, and why.
    refused: BTreeMap<String, String>,
    /// The peers published as they were before, their change refused, and why.
    kept_published: BTreeMap<String, String>,
    /// The tunnel nodes each peer to publish lost to another peer, in one line.
    skipped: BTreeMap<String, String>,
}

/// Settles what the peers claim of each other: pod CIDRs and node addresses
/// ([`resolve::refuse_overlaps`]), then tunnel node addresses and room
/// ([`refuse_tunnel_clashes`]). A peer published before whose change loses (it grew into
/// what another peer was published with, or lists a node address another has) goes out as
/// it was published, its `record`, when today's rules still pass that version (`record`
/// says so): were it refused, whoever claimed first the range a peer will grow into, or the
/// address a node of its will have, would withdraw it from every node when it grows. That
/// version holds all it claims, so it loses only to a peer published with the same (both
/// were): then the change is refused, as it is for a peer never published. A peer refused
/// while the others stand as they are now stays refused when one of them goes back to its
/// published version: a newcomer claiming what a published peer grows into waits, as two
/// newcomers do (neither was published with it).
fn settle_claims<'a>(
    peers: &[RawPeer],
    held: &[&RawPeer],
    room: &BTreeMap<String, (usize, usize)>,
    record: impl Fn(&RawPeer) -> Option<&'a RawPeer>,
) -> Settled {
    let records: BTreeMap<&str, &RawPeer> = peers.iter().filter_map(|p| Some((p.name.as_str(), record(p).filter(|h| *h != p)?))).collect();
    // Peers whose published version lost too: their change is refused.
    let mut lost_too = BTreeSet::new();
    'again: loop {
        let mut kept_published: BTreeMap<String, String> = BTreeMap::new();
        let mut refused = BTreeMap::new();
        loop {
            let candidates: Vec<RawPeer> =
                peers.iter().map(|p| if kept_published.contains_key(&p.name) { records[p.name.as_str()].clone() } else { p.clone() }).collect();
            let (kept, mut now) = resolve::refuse_overlaps(candidates, held);
            let (kept, over, skipped) = refuse_tunnel_clashes(kept, held, room);
            now.extend(over);
            let mut changed = false;
            for (name, why) in now {
                if kept_published.contains_key(&name) {
                    // Its published version loses too (both were published with what it
                    // claims): its change is refused, and all is settled again from the
                    // start, for that version may have had others refused meanwhile.
                    lost_too.insert(name);
                    continue 'again;
                }
                if records.contains_key(name.as_str()) && !lost_too.contains(&name) {
                    kept_published.insert(name, why);
                    changed = true;
                } else {
                    refused.entry(name).or_insert(why);
                }
            }
            if !changed {
                let peers = kept.into_iter().filter(|p| !refused.contains_key(&p.name)).collect();
                let skipped = skipped.into_iter().filter(|(name, _)| !refused.contains_key(name)).collect();
                return Settled { peers, refused, kept_published, skipped };
            }
        }
    }
}

/// The reserved-range rules for peer `name`'s tunnel nodes: this cluster's Service CIDRs,
/// and its Nodes' addresses less those that `name` was published with. A node of the peer
/// at one of them is left out (and said so); the peer's other nodes stay.
fn reserved_for(i: &Inputs<'_>, name: &str) -> Reserved {
    Reserved { service_cidrs: i.service_cidrs.to_vec(), local_addresses: resolve::unheld_addresses(i.local, i.published.get(name)) }
}

/// The networks written by hand in Istio's `meshNetworks` (for clusters without a secret),
/// each with its status. What a readable text no longer
/// gives is withdrawn, as a removed remote secret's peer is. What a typo makes unreadable
/// (the whole text, or one network) keeps its last known state, stale: a syntax error must
/// not withdraw every hand-written peer from every node and release what they hold. So does
/// a deleted ConfigMap: Istio's installers delete and recreate it, and its deletion says
/// nothing of any one network (the controller passes no last known state before it has seen
/// the ConfigMap since it started).
fn hand_written(i: &Inputs<'_>, d: &mut Desired) -> Vec<(RawPeer, PeerStatus)> {
    let stale = |error: String| PeerStatus { stale: true, error: Some(error), ..PeerStatus::default() };
    let given = i.istio.map(|cm| MeshNetworks::parse_each(cm.data.as_ref().and_then(|d| d.get("meshNetworks")).map_or("", String::as_str)));
    let mut out = Vec::new();
    let why = match given {
        Some(Ok((mn, broken))) => {
            // A discovered cluster's peer is not the entry's to refuse.
            for (name, why) in broken.into_iter().filter(|(name, _)| !i.remotes.contains_key(name)) {
                let why = format!("meshNetworks: {why}");
                if let Some(p) = i.hand.get(&name) {
                    out.push((p.clone(), stale(format!("{why}; the network keeps its last known state until it is fixed"))));
                } else {
                    d.status.entry(name.clone()).or_default();
                    d.refused.insert(name, why);
                }
            }
            out.extend(mn.peers(None).into_iter().map(|p| (p, PeerStatus::default())));
            return out;
        }
        Some(Err(e)) => format!("istio ConfigMap: meshNetworks is not valid YAML: {e}; the networks it gave keep their last known state until it is fixed"),
        None => "the istio ConfigMap is gone; the networks it gave keep their last known state until it is back".to_owned(),
    };
    for (_, p) in i.hand.iter().filter(|(name, _)| !i.remotes.contains_key(*name)) {
        out.push((p.clone(), stale(why.clone())));
    }
    if i.istio.is_some() || !out.is_empty() {
        d.warnings.push(why);
    }
    out
}

/// Settles peers whose names hash to one datapath id ([`config::peer_id`]). Every agent
/// refuses the later of two by name, so a remote secret's key chosen to collide with a
/// peer's name, and to sort before it, would have that peer refused on every node. As with
/// what two peers claim ([`resolve::refuse_overlaps`]), the one published with its name
/// before keeps the id and the other is refused; when neither was (or both), both are: no
/// rule could tell the rightful one, and an order of names is one a newcomer picks. A
/// configured peer that is not among `peers` (refused, or unpublished now) holds its id all
/// the same, as it holds its claims. Returns the kept peers (in their order) and, for each
/// refused one, why.
fn refuse_id_clashes(peers: Vec<RawPeer>, held: &[&RawPeer]) -> (Vec<RawPeer>, BTreeMap<String, String>) {
    let held: BTreeSet<&str> = held.iter().map(|p| p.name.as_str()).collect();
    let contesting: BTreeSet<&str> = peers.iter().map(|p| p.name.as_str()).collect();
    let mut by_id: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for name in contesting.iter().chain(&held) {
        by_id.entry(config::peer_id(name)).or_default().insert(name);
    }
    let mut refused = BTreeMap::new();
    for p in &peers {
        let id = config::peer_id(&p.name);
        let others: Vec<&str> = by_id[&id].iter().copied().filter(|n| *n != p.name).collect();
        let Some(first) = others.first() else { continue };
        let same = |other: &str| format!("its name hashes to the same datapath id ({id:#010x}) as peer {other}'s");
        let holder = others.iter().find(|n| held.contains(**n));
        let why = match holder {
            // Another held peer among these: both were published with it, and neither keeps it.
            _ if held.contains(p.name.as_str()) => match others.iter().find(|n| held.contains(**n) && contesting.contains(**n)) {
                Some(other) => format!("{}, both published with it before", same(other)),
                None => continue,
            },
            Some(h) if contesting.contains(h) => format!("{}, published with it before", same(h)),
            Some(h) => format!("{}, published with it before (not published now)", same(h)),
            None => format!("{}; neither was published with it before, so neither is", same(first)),
        };
        refused.insert(p.name.clone(), why);
    }
    (peers.into_iter().filter(|p| !refused.contains_key(&p.name)).collect(), refused)
}

/// The published state for `i`.
#[must_use]
pub fn desired(i: &Inputs<'_>) -> Desired {
    let mut d = Desired::default();
    let mut peers = Vec::new();
    // What this cluster's Nodes claim is `resolve::against_local`'s, which names the Node and
    // knows what each peer holds.
    let reserved = Reserved { service_cidrs: i.service_cidrs.to_vec(), local_addresses: BTreeSet::new() };
    for (name, r) in i.remotes {
        let mut st = PeerStatus { stale: r.stale, refused: r.refused.map(str::to_owned), error: r.error.map(str::to_owned), ..PeerStatus::default() };
        if r.refused.is_some() {
            d.status.insert(name.clone(), st);
            continue;
        }
        let mode = match resolve::remote_mode(i.modes.get(name).copied(), r.mode_annotation, i.default_mode) {
            Ok(m) => m,
            Err(why) => {
                d.refused.insert(name.clone(), why);
                d.status.insert(name.clone(), st);
                continue;
            }
        };
        let allowed = i.allowed_cidrs.get(name);
        // `--pod-cidrs` wins over the annotation, readable or not, as `--allowed-cidrs` does.
        // An unreadable one publishes no part of it: the peer keeps its last known state, as
        // an unresolvable one does (a typo must not withdraw it from every node).
        let (cidrs, unreadable) = match (i.pod_cidrs.get(name), r.pod_cidrs) {
            (Some(flag), _) => (Some(flag.as_slice()), None),
            (None, Some(Ok(annotation))) => (Some(annotation.as_slice()), None),
            (None, Some(Err(e))) => (None, Some(format!("annotation {POD_CIDRS_ANNOTATION}: {e}; the peer keeps its last known state until it is fixed"))),
            (None, None) => (None, None),
        };
        if let Some(e) = &unreadable {
            st.error = Some(e.clone());
        }
        // A remote Node that cannot be used (its address annotation refused, ...) is left out,
        // and costs no other: anyone who can patch one Node must not withdraw the peer. With
        // nothing usable left, the peer keeps its last good state, as when it is stale.
        let resolved = r.view.filter(|_| !r.stale && unreadable.is_none()).map(|v| match mode {
            PeerMode::Gateway => {
                let x = resolve::resolve(v, i.resolve, cidrs);
                (resolve::peer(name, &x), (!x.skipped.is_empty()).then(|| x.skipped.join("; ")))
            }
            PeerMode::Tunnel => {
                let x = resolve::resolve_tunnel(v, i.resolve, cidrs, &reserved_for(i, name));
                (resolve::tunnel_peer(name, &x), x.skipped_summary())
            }
        });
        if let Some((Ok(_), skipped)) = &resolved {
            st.skipped.clone_from(skipped);
        }
        match resolved.map(|(p, _)| p) {
            Some(Ok(p)) => {
                if let Some(why) = vet(&p, allowed, r.allowed, &reserved) {
                    d.refused.insert(name.clone(), why);
                } else {
                    d.resolved.insert(name.clone(), p.clone());
                    peers.push(p);
                }
            }
            other => {
                if let Some(Err(problem)) = other {
                    st.error = Some(problem);
                }
                // A stale or unresolvable peer keeps its last known state, if today's rules
                // still pass it.
                if let Some(p) = i.last_good.get(name) {
                    st.stale = true;
                    match vet(p, allowed, r.allowed, &reserved) {
                        Some(why) => {
                            d.refused.insert(name.clone(), why);
                        }
                        None => peers.push(p.clone()),
                    }
                }
            }
        }
        d.status.insert(name.clone(), st);
    }
    let mut hand = BTreeSet::new();
    for (p, st) in hand_written(i, &mut d) {
        let discovered = peers.iter().any(|q| q.name == p.name) || i.remotes.contains_key(&p.name);
        // This cluster's own network, unless it was published as a peer before: then a Node
        // of this cluster claims what the peer holds (see `resolve::against_local`).
        let local_network = !i.published.contains_key(&p.name)
            && p.pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<Ipv4Net>().ok())
                .any(|n| i.local.iter().flat_map(|l| &l.pod_cidrs).any(|l| l.contains(&n) || n.contains(l)));
        if discovered || local_network {
            // Not a hand-written peer: kept, it would outlive its remote secret.
            continue;
        }
        hand.insert(p.name.clone());
        let (p, st) = match vet(&p, None, None, &reserved) {
            None => (p, st),
            Some(why) => {
                let why = format!("meshNetworks: {why}");
                // A value out of range is a typo as much as a misspelt key: a network published
                // before keeps that state, stale, rather than going from every node.
                let Some(last) = i.hand.get(&p.name).filter(|last| !st.stale && vet(last, None, None, &reserved).is_none()) else {
                    d.status.insert(p.name.clone(), st);
                    d.refused.insert(p.name.clone(), why);
                    continue;
                };
                let error = Some(format!("{why}; the network keeps its last known state until it is fixed"));
                (last.clone(), PeerStatus { stale: true, error, ..st })
            }
        };
        d.status.insert(p.name.clone(), st);
        peers.push(p);
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    // Only configured peers hold anything: every remote and hand-written network has a status.
    let held: Vec<&RawPeer> = i.published.iter().filter(|(n, _)| d.status.contains_key(*n)).map(|(_, p)| p).collect();
    // Before the clashes are settled, so that a version kept as it was published is settled
    // as any other, and so is what it claims.
    let fits = |h: &RawPeer| vet(h, i.allowed_cidrs.get(&h.name), i.remotes.get(&h.name).and_then(|r| r.allowed), &reserved).is_none();
    let room = reservations(&peers, &held, i.listed);
    let (peers, kept_small) = keep_published_room(peers, &held, &room, fits);
    // A peer published before keeps what it was published with, and when a change of its
    // clashes with a local Node, it stays as it was published: no Node, however it came to
    // claim what it claims, withdraws a peer from every node.
    let peers: Vec<RawPeer> = peers
        .into_iter()
        .filter_map(|p| {
            let held = i.published.get(&p.name);
            match resolve::against_local(&p, i.local, held) {
                Ok(kept) => {
                    if !kept.is_empty() {
                        d.clashes.insert(p.name.clone(), format!("{}; kept, as the peer was published with it before", kept.join("; ")));
                    }
                    Some(p)
                }
                Err(why) => {
                    if let Some((h, Ok(_))) = held.map(|h| (h, resolve::against_local(h, i.local, Some(h)))) {
                        d.clashes.insert(p.name.clone(), format!("its change is refused: {why}; it stays as it was published"));
                        Some(h.clone())
                    } else {
                        d.refused.insert(p.name.clone(), why);
                        None
                    }
                }
            }
        })
        .collect();
    // First: a peer refused for its id contests no one's claims.
    let (peers, same_id) = refuse_id_clashes(peers, &held);
    d.refused.extend(same_id);
    // A change of a published peer that loses to another's claim leaves the peer as it was
    // published, if that version passes today's rules.
    let record = |p: &RawPeer| {
        held.iter().copied().find(|h| h.name == p.name).filter(|h| fits(h) && resolve::against_local(h, i.local, Some(h)).is_ok())
    };
    let settled = settle_claims(&peers, &held, &room, record);
    d.refused.extend(settled.refused);
    for (name, why) in settled.kept_published {
        // The refused change is no last good state.
        d.resolved.remove(&name);
        let st = d.status.entry(name.clone()).or_default();
        let why = format!("its change is refused: {why}; it stays as it was published");
        st.error = Some(st.error.take().map_or_else(|| why.clone(), |e| format!("{e}; {why}")));
        // What this cluster's Nodes claim of it is what they claim of the published version.
        d.clashes.remove(&name);
        if let Some(Ok(kept)) = i.published.get(&name).map(|h| resolve::against_local(h, i.local, Some(h))) {
            if !kept.is_empty() {
                d.clashes.insert(name, format!("{}; kept, as the peer was published with it before", kept.join("; ")));
            }
        }
    }
    for (name, lost) in settled.skipped {
        let st = d.status.entry(name).or_default();
        st.skipped = Some(st.skipped.take().map_or_else(|| lost.clone(), |s| format!("{s}; {lost}")));
    }
    let kept = settled.peers;
    // A peer refused for an overlap is no one's last good state.
    d.resolved.retain(|name, _| !d.refused.contains_key(name));
    for (name, why) in &d.refused {
        d.status.entry(name.clone()).or_default().refused = Some(why.clone());
    }
    for (name, why) in kept_small.into_iter().filter(|(name, _)| !d.refused.contains_key(name)) {
        let st = d.status.entry(name).or_default();
        st.error = Some(st.error.take().map_or_else(|| why.clone(), |e| format!("{e}; {why}")));
    }
    d.clashes.retain(|name, _| !d.refused.contains_key(name));
    for (name, what) in &d.clashes {
        d.status.entry(name.clone()).or_default().local_clash = Some(what.clone());
    }
    // A version refused now is no network's last state: a later typo must bring back only
    // what was published.
    for name in hand {
        if let Some(p) = kept.iter().find(|p| p.name == name).or_else(|| i.hand.get(&name)) {
            d.hand.insert(name, p.clone());
        }
    }
    d.peers = kept;
    d
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, sync::Arc};

    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec};

    use super::*;
    use crate::{
        config::RawGateway,
        discovery::resolve::{NodeAddressType, NodeInfo},
    };

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// A remote whose gateway runs on one node of `addr`, NodePort 32361, pods in `cidr`.
    fn view(addr: &str, cidr: &str) -> ClusterView {
        let node = NodeInfo {
            pod_cidrs: [net(cidr)].into(),
            addresses: [(NodeAddressType::Internal, addr.parse().unwrap())].into(),
            gateway_address: None,
        };
        let ports = vec![ServicePort { name: Some("tls".into()), port: 15443, node_port: Some(32361), ..ServicePort::default() }];
        ClusterView {
            nodes: Arc::new([("gw".to_string(), node)].into()),
            service: Some(Service { spec: Some(ServiceSpec { ports: Some(ports), ..ServiceSpec::default() }), ..Service::default() }),
            endpoints: Some(Endpoints {
                subsets: Some(vec![EndpointSubset {
                    addresses: Some(vec![EndpointAddress { ip: "10.0.0.1".into(), node_name: Some("gw".into()), ..EndpointAddress::default() }]),
                    ..EndpointSubset::default()
                }]),
                ..Endpoints::default()
            }),
            tunnel_service: None,
        }
    }

    fn tunnel_peer(name: &str, node: &str, cidr: &str) -> RawPeer {
        let nodes = vec![crate::config::RawTunnelNode { address: node.into(), pod_cidrs: vec![cidr.into()] }];
        RawPeer { name: name.into(), mode: PeerMode::Tunnel, pod_cidrs: vec![cidr.into()], nodes, tunnel_port: Some(31800), ..RawPeer::default() }
    }

    fn peer(name: &str, addr: &str, cidr: &str) -> RawPeer {
        RawPeer { name: name.into(), pod_cidrs: vec![cidr.into()], gateways: vec![RawGateway { address: addr.into(), port: 32361, udp_port: None }], ..RawPeer::default() }
    }

    fn istio(mesh_networks: &str) -> ConfigMap {
        ConfigMap { data: Some([("meshNetworks".to_string(), mesh_networks.to_string())].into()), ..ConfigMap::default() }
    }

    /// Runs `desired` on a cluster with pods in 10.244.0.0/16, Services in 10.96.0.0/12 and a
    /// node at 10.20.144.160, and renders the result as the golden files hold it.
    fn render(remotes: &BTreeMap<String, RemoteInput<'_>>, istio: Option<&ConfigMap>, last_good: &[RawPeer], flags: &[(&str, &str)]) -> String {
        render_modes(remotes, istio, last_good, flags, &BTreeMap::new(), PeerMode::Gateway, &[])
    }

    fn render_modes(
        remotes: &BTreeMap<String, RemoteInput<'_>>,
        istio: Option<&ConfigMap>,
        last_good: &[RawPeer],
        flags: &[(&str, &str)],
        modes: &BTreeMap<String, PeerMode>,
        default_mode: PeerMode,
        published: &[RawPeer],
    ) -> String {
        let local = [LocalNode {
            name: "node1".into(),
            pod_cidrs: vec![net("10.244.0.0/16")],
            addresses: BTreeSet::from(["10.20.144.160".parse().unwrap()]),
        }];
        let allowed_cidrs = flags.iter().map(|(n, c)| ((*n).to_string(), vec![net(c)])).collect();
        let last_good = last_good.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let i = Inputs {
            listed: &BTreeSet::new(),
            remotes,
            resolve: &ResolveOptions::default(),
            pod_cidrs: &BTreeMap::new(),
            allowed_cidrs: &allowed_cidrs,
            modes,
            default_mode,
            service_cidrs: &[net("10.96.0.0/12")],
            local: &local,
            istio,
            hand: &BTreeMap::new(),
            last_good: &last_good,
            published: &published.iter().map(|p| (p.name.clone(), p.clone())).collect(),
        };
        let d = desired(&i);
        assert_eq!(d, desired(&i), "the same inputs gave two answers");
        serde_yaml::to_string(&d).unwrap()
    }

    /// A Node of this cluster claiming half of IPv4 and a peer's gateway address (a typo, or
    /// a compromised kubelet) withdraws no published peer from any node: the peers keep what
    /// they were published with, and the status says what the Node claims. A peer never
    /// published is refused, naming the Node; a hand-written network published before is not
    /// taken for this cluster's own.
    #[test]
    fn one_local_node_cannot_withdraw_published_peers() {
        let (a, b) = (view("10.20.144.165", "10.245.0.0/24"), view("10.20.144.175", "10.254.0.0/16"));
        let remotes = [
            ("cluster2".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() }),
            ("cluster3".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
        ]
        .into();
        let cm = istio("networks:\n  hand:\n    endpoints:\n    - fromCidr: 10.250.0.0/16\n    gateways:\n    - address: 10.20.144.185\n      port: 30443\n");
        let published: BTreeMap<String, RawPeer> = [peer("cluster2", "10.20.144.165", "10.245.0.0/24"), peer("hand", "10.20.144.185", "10.250.0.0/16")]
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let node = |name: &str, cidr: &str, addrs: &[&str]| LocalNode {
            name: name.into(),
            pod_cidrs: vec![net(cidr)],
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        };
        let local = [node("node1", "10.244.0.0/24", &["10.20.144.160"]), node("rogue", "0.0.0.0/1", &["10.20.144.160", "10.20.144.165", "10.20.144.175"])];
        let i = Inputs {
            listed: &BTreeSet::new(),
            remotes: &remotes,
            resolve: &ResolveOptions::default(),
            pod_cidrs: &BTreeMap::new(),
            allowed_cidrs: &BTreeMap::new(),
            modes: &BTreeMap::new(),
            default_mode: PeerMode::Gateway,
            service_cidrs: &[net("10.96.0.0/12")],
            local: &local,
            istio: Some(&cm),
            hand: &BTreeMap::new(),
            last_good: &BTreeMap::new(),
            published: &published,
        };
        let d = desired(&i);
        assert_eq!(d.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["cluster2", "hand"]);
        assert_eq!(
            d.status["cluster2"].local_clash.as_deref(),
            Some(
                "node rogue lists 10.20.144.165 among its addresses; node rogue's pod CIDR 0.0.0.0/1 overlaps 10.20.144.165/32; \
                 node rogue's pod CIDR 0.0.0.0/1 overlaps 10.245.0.0/24; kept, as the peer was published with it before"
            )
        );
        assert!(d.status["hand"].local_clash.as_deref().is_some_and(|c| c.contains("0.0.0.0/1 overlaps 10.250.0.0/16")), "{:?}", d.status["hand"]);
        assert!(d.refused["cluster3"].contains("node rogue"), "{:?}", d.refused);
        assert_eq!(d.status["cluster3"].local_clash, None);
        // The peer's gateway moves to a node the rogue Node's claim covers: the change is
        // refused, and the peer stays as it was published, not withdrawn.
        let moved = view("10.20.144.166", "10.245.0.0/24");
        let remotes2: BTreeMap<String, RemoteInput<'_>> = [("cluster2".to_string(), RemoteInput { view: Some(&moved), ..RemoteInput::default() })].into();
        let d = desired(&Inputs { remotes: &remotes2, ..i });
        let kept = d.peers.iter().find(|p| p.name == "cluster2").expect("cluster2 was withdrawn");
        assert_eq!(kept.gateways[0].address, "10.20.144.165");
        let clash = d.status["cluster2"].local_clash.as_deref().unwrap();
        assert!(clash.starts_with("its change is refused: ") && clash.contains("(node rogue)") && clash.ends_with("it stays as it was published"), "{clash}");
        assert!(!d.refused.contains_key("cluster2"));
        // Without the rogue Node nothing clashes, and the status says nothing of it.
        let d = desired(&Inputs { local: &local[..1], ..i });
        assert_eq!(d.peers.len(), 3);
        assert!(d.clashes.is_empty() && d.status.values().all(|s| s.local_clash.is_none()));
    }

    #[test]
    fn live_remotes_are_published_and_become_last_good() {
        let (a, b) = (view("10.20.144.165", "10.245.0.0/24"), view("10.20.144.175", "10.254.0.0/16"));
        let remotes = [
            ("cluster2".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() }),
            ("cluster3".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
        ]
        .into();
        crate::golden::check("desired_live.yaml", &render(&remotes, None, &[], &[]));
    }

    /// A failing API server or a remote that cannot resolve now keeps its last good state,
    /// marked stale, and a remote never seen alive publishes nothing.
    #[test]
    fn stale_and_unresolvable_remotes_keep_their_last_good_state() {
        let a = view("10.20.144.165", "10.245.0.0/24");
        let mut broken = view("10.20.144.175", "10.254.0.0/16");
        broken.service = None;
        let remotes = [
            ("failing".to_string(), RemoteInput { view: Some(&a), stale: true, error: Some("connection refused"), ..RemoteInput::default() }),
            ("unresolvable".to_string(), RemoteInput { view: Some(&broken), ..RemoteInput::default() }),
            ("new".to_string(), RemoteInput { stale: true, ..RemoteInput::default() }),
        ]
        .into();
        let last_good = [peer("failing", "10.20.144.165", "10.245.0.0/24"), peer("unresolvable", "10.20.144.175", "10.254.0.0/16")];
        crate::golden::check("desired_stale.yaml", &render(&remotes, None, &last_good, &[]));
    }

    /// Each refusal stops one peer and says why; the others are published. (A gateway node's
    /// address annotation that is not one of its addresses leaves that gateway out: with
    /// none left, and no last good state, "spoofed-gateway" is not published, with the
    /// reason as its error.)
    #[test]
    fn refusals_stop_one_peer_each() {
        let good = view("10.20.144.165", "10.245.0.0/24");
        let metadata = view("10.20.144.166", "169.254.169.254/32");
        let local = view("10.20.144.167", "10.244.5.0/24");
        let wide = view("10.20.144.168", "10.246.0.0/16");
        let unreadable: Result<Vec<Ipv4Net>, String> = Err("\"x\" is not a CIDR".into());
        let mut spoofed = view("10.20.144.169", "10.247.0.0/16");
        Arc::make_mut(&mut spoofed.nodes).get_mut("gw").unwrap().gateway_address = Some("10.20.144.160".into());
        let remotes = [
            ("good".to_string(), RemoteInput { view: Some(&good), ..RemoteInput::default() }),
            ("kubeconfig".to_string(), RemoteInput { view: Some(&good), refused: Some("users[0].user.exec is not allowed"), ..RemoteInput::default() }),
            ("metadata".to_string(), RemoteInput { view: Some(&metadata), ..RemoteInput::default() }),
            ("overlaps-local".to_string(), RemoteInput { view: Some(&local), ..RemoteInput::default() }),
            ("outside-flag".to_string(), RemoteInput { view: Some(&wide), ..RemoteInput::default() }),
            ("unreadable-allow-list".to_string(), RemoteInput { view: Some(&wide), allowed: Some(&unreadable), ..RemoteInput::default() }),
            ("spoofed-gateway".to_string(), RemoteInput { view: Some(&spoofed), ..RemoteInput::default() }),
        ]
        .into();
        crate::golden::check("desired_refused.yaml", &render(&remotes, None, &[], &[("outside-flag", "10.246.0.0/24")]));
    }

    /// A typo in a remote secret's pod CIDRs annotation publishes no part of it, and withdraws
    /// nothing: the peer keeps its last known state, stale, with the reason.
    #[test]
    fn an_unreadable_pod_cidrs_annotation_keeps_the_last_known_state() {
        let typo = view("10.20.144.170", "10.248.0.0/24");
        let unreadable: Result<Vec<Ipv4Net>, String> = Err("\"10.248.0.0\" is not an IPv4 CIDR".into());
        let remotes = [
            ("typo".to_string(), RemoteInput { view: Some(&typo), pod_cidrs: Some(&unreadable), ..RemoteInput::default() }),
            ("new-typo".to_string(), RemoteInput { view: Some(&typo), pod_cidrs: Some(&unreadable), ..RemoteInput::default() }),
        ]
        .into();
        let out = render(&remotes, None, &[peer("typo", "10.20.144.170", "10.248.0.0/16")], &[]);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        let why = "annotation meshnet.io/pod-cidrs: \"10.248.0.0\" is not an IPv4 CIDR; the peer keeps its last known state until it is fixed";
        assert_eq!(d["status"]["typo"]["error"], why, "{out}");
        assert_eq!(d["status"]["typo"]["stale"], true, "{out}");
        assert_eq!(d["status"]["new-typo"]["error"], why, "{out}");
        assert!(out.contains("- name: typo\n  podCIDRs:\n  - 10.248.0.0/16\n"), "the last known state was not kept: {out}");
        assert!(!out.contains("- name: new-typo"), "a peer never resolved was published: {out}");
        assert!(d["refused"].as_mapping().unwrap().is_empty(), "{out}");
    }

    /// `desired` of `remotes` and Istio's ConfigMap, with what each hand-written network and
    /// each peer published last.
    fn with_hand(
        remotes: &BTreeMap<String, RemoteInput<'_>>,
        local: &[LocalNode],
        istio: Option<&ConfigMap>,
        hand: &BTreeMap<String, RawPeer>,
        published: &BTreeMap<String, RawPeer>,
    ) -> Desired {
        let none = BTreeMap::new();
        desired(&Inputs {
            listed: &BTreeSet::new(),
            remotes,
            resolve: &ResolveOptions::default(),
            pod_cidrs: &none,
            allowed_cidrs: &none,
            modes: &BTreeMap::new(),
            default_mode: PeerMode::Gateway,
            service_cidrs: &[],
            local,
            istio,
            hand,
            last_good: &BTreeMap::new(),
            published,
        })
    }

    /// A typo in Istio's meshNetworks, or the ConfigMap deleted, withdraws no hand-written
    /// peer: each keeps its last known state and what it holds, stale, with the reason. A
    /// network that a readable text no longer lists is withdrawn, and holds nothing.
    #[test]
    fn an_unreadable_mesh_networks_keeps_the_hand_written_peers() {
        type Peers = BTreeMap<String, RawPeer>;
        let cm = istio(
            "networks:\n  \
               hand: {endpoints: [{fromCidr: 10.250.0.0/16}], gateways: [{address: 10.20.144.185, port: 30443}]}\n  \
               other: {endpoints: [{fromCidr: 10.251.0.0/16}], gateways: [{address: 10.20.144.186, port: 30443}]}\n",
        );
        let local = [LocalNode { name: "node1".into(), pod_cidrs: vec![net("10.244.0.0/16")], addresses: BTreeSet::new() }];
        let taker = view("10.20.144.175", "10.250.7.0/24");
        let remotes: BTreeMap<String, RemoteInput<'_>> = [("taker".to_string(), RemoteInput { view: Some(&taker), ..RemoteInput::default() })].into();
        let run_with = |remotes: &BTreeMap<String, RemoteInput<'_>>, istio: Option<&ConfigMap>, hand: &Peers, published: &Peers| {
            with_hand(remotes, &local, istio, hand, published)
        };
        let run = |istio: Option<&ConfigMap>, hand: &Peers, published: &Peers| run_with(&remotes, istio, hand, published);
        let names = |d: &Desired| d.peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let nothing = Peers::new();
        let first = run_with(&BTreeMap::new(), Some(&cm), &nothing, &nothing);
        assert_eq!(names(&first), ["hand", "other"], "{first:?}");
        assert_eq!(first.hand.keys().collect::<Vec<_>>(), ["hand", "other"]);
        let published: Peers = first.peers.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let typo = istio("networks:\n  hand: {endpoints: [{fromCidr: 10.250.0.0/16}]\n");
        let d = run(Some(&typo), &first.hand, &published);
        assert_eq!(names(&d), ["hand", "other"], "a typo withdrew the hand-written peers: {d:?}");
        assert_eq!(d.hand, first.hand);
        let error = d.status["hand"].error.as_deref().unwrap();
        assert!(d.status["hand"].stale && error.starts_with("istio ConfigMap: meshNetworks is not valid YAML: "), "{error}");
        assert!(error.ends_with("the networks it gave keep their last known state until it is fixed"), "{error}");
        assert_eq!(d.warnings, [error]);
        // What they hold stays theirs.
        assert_eq!(d.refused["taker"], "claims 10.250.7.0/24, which overlaps 10.250.0.0/16 of peer hand, published with it before", "{d:?}");
        // One network's entry misshapen: that network keeps its last known state.
        let one = istio(
            "networks:\n  \
               hand: {endpoints: {fromCidr: 10.250.0.0/16}, gateways: [{address: 10.20.144.185, port: 30443}]}\n  \
               other: {endpoints: [{fromCidr: 10.251.0.0/16}], gateways: [{address: 10.20.144.187, port: 30443}]}\n",
        );
        let d = run(Some(&one), &first.hand, &published);
        assert_eq!(names(&d), ["hand", "other"], "{d:?}");
        assert_eq!(d.peers[0], first.peers[0]);
        let error = d.status["hand"].error.as_deref().unwrap();
        assert!(d.status["hand"].stale && error.starts_with("meshNetworks: ") && error.ends_with("keeps its last known state until it is fixed"), "{error}");
        assert!(!d.status["other"].stale && !d.refused.contains_key("hand"), "{d:?}");
        assert_eq!(d.hand["other"].gateways[0].address, "10.20.144.187");
        // The ConfigMap deleted: the same, until it is back.
        let d = run(None, &first.hand, &published);
        assert_eq!(names(&d), ["hand", "other"], "{d:?}");
        assert_eq!(d.status["other"].error.as_deref(), Some("the istio ConfigMap is gone; the networks it gave keep their last known state until it is back"));
        assert!(d.refused.contains_key("taker"), "{d:?}");
        // With no last known state (a controller that has not seen the ConfigMap) nothing stays.
        let d = run(None, &nothing, &published);
        assert_eq!(names(&d), ["taker"], "{d:?}");
        assert!(d.warnings.is_empty() && d.hand.is_empty(), "{d:?}");
        // A readable text without "other" withdraws it; it holds nothing any more.
        let without = istio("networks:\n  hand: {endpoints: [{fromCidr: 10.250.0.0/16}], gateways: [{address: 10.20.144.185, port: 30443}]}\n");
        let d = run(Some(&without), &first.hand, &published);
        assert_eq!(names(&d), ["hand"], "{d:?}");
        assert!(!d.status.contains_key("other") && !d.hand.contains_key("other"), "{d:?}");
    }

    /// `desired` of hand-written networks alone, with what each published last.
    fn hand_only(text: &str, hand: &BTreeMap<String, RawPeer>, published: &BTreeMap<String, RawPeer>) -> Desired {
        with_hand(&BTreeMap::new(), &[], Some(&istio(text)), hand, published)
    }

    const HAND: &str = "hand: {endpoints: [{fromCidr: 10.250.0.0/16}, {fromCidr: 10.252.0.0/16}], gateways: [{address: 10.20.144.185, port: 30443}]}";
    const OTHER: &str = "other: {endpoints: [{fromCidr: 10.251.0.0/16}], gateways: [{address: 10.20.144.186, port: 30443}]}";

    /// A misspelt key is a typo even where the text still parses: read as absent, it would
    /// withdraw a network (or part of it) without a word. The whole text, or that network,
    /// keeps its last known state, and the reason names the key.
    #[test]
    fn a_misspelt_key_in_mesh_networks_withdraws_no_hand_written_peer() {
        let names = |d: &Desired| d.peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let first = hand_only(&format!("networks:\n  {HAND}\n  {OTHER}\n"), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(names(&first), ["hand", "other"], "{first:?}");
        let published: BTreeMap<String, RawPeer> = first.peers.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let run = |text: &str| hand_only(text, &first.hand, &published);

        let d = run(&format!("netwroks:\n  {HAND}\n  {OTHER}\n"));
        assert_eq!(d.peers, first.peers, "{d:?}");
        let error = d.status["hand"].error.as_deref().unwrap();
        assert!(d.status["hand"].stale && d.status["other"].stale && error.contains("netwroks"), "{d:?}");
        assert_eq!(d.warnings, [error]);

        let hand_typos = [
            ("adress", HAND.replace("address:", "adress:")),
            ("fromCIDR", HAND.replace("{fromCidr: 10.252.0.0/16}", "{fromCIDR: 10.252.0.0/16}")),
            ("gateway", HAND.replace("gateways:", "gateway:")),
            ("registryServiceName", HAND.replace("address: 10.20.144.185", "registryServiceName: gw.istio-system.svc")),
            ("neither fromCidr nor fromRegistry", HAND.replace("{fromCidr: 10.252.0.0/16}", "{}")),
        ];
        for (key, typo) in hand_typos {
            let d = run(&format!("networks:\n  {typo}\n  {OTHER}\n"));
            assert_eq!(d.peers, first.peers, "{key}: {d:?}");
            let error = d.status["hand"].error.as_deref().unwrap();
            assert!(d.status["hand"].stale && error.starts_with("meshNetworks: ") && error.contains(key), "{key}: {error}");
            assert!(!d.status["other"].stale && d.refused.is_empty() && d.warnings.is_empty(), "{key}: {d:?}");
            assert_eq!(d.hand, first.hand, "{key}");
            // A network never published is refused, with the same reason.
            let d = hand_only(&format!("networks:\n  {typo}\n  {OTHER}\n"), &BTreeMap::new(), &BTreeMap::new());
            assert_eq!(names(&d), ["other"], "{key}: {d:?}");
            assert!(d.refused["hand"].contains(key), "{key}: {d:?}");
        }

        // istiod's own fields read, and a network of fromRegistry endpoints alone is istiod's:
        // no typo of it is reported, and nothing is published for it.
        let istio_text = format!(
            "networks:\n  {}\n  {OTHER}\n  \
               registry: {{endpoints: [{{fromRegistry: cluster9}}], gateways: [{{adress: 192.0.2.1, port: 15443}}]}}\n  \
               service: {{endpoints: [{{fromRegistry: cluster8}}], gateways: [{{registryServiceName: gw.svc, port: 15443}}]}}\n",
            HAND.replace("port: 30443}", "port: 30443, locality: us-east1/a}"),
        );
        let d = run(&istio_text);
        assert_eq!(d.peers, first.peers, "{d:?}");
        assert_eq!(d.status.keys().collect::<Vec<_>>(), ["hand", "other"], "{d:?}");
        assert!(d.refused.is_empty() && d.warnings.is_empty() && !d.status["hand"].stale, "{d:?}");
    }

    /// A value the validator refuses (a port out of range, a CIDR with host bits) keeps a
    /// network published before at that state, stale, as a misspelt key does; and only a
    /// published version is remembered, so that a later typo brings back no refused one.
    #[test]
    fn a_refused_value_keeps_the_last_published_hand_written_peer() {
        let first = hand_only(&format!("networks:\n  {HAND}\n  {OTHER}\n"), &BTreeMap::new(), &BTreeMap::new());
        let published: BTreeMap<String, RawPeer> = first.peers.iter().map(|p| (p.name.clone(), p.clone())).collect();
        for (what, typo) in [("port", HAND.replace("30443", "304430")), ("fromCidr", HAND.replace("10.250.0.0/16", "10.250.0.1/16"))] {
            let d = hand_only(&format!("networks:\n  {typo}\n  {OTHER}\n"), &first.hand, &published);
            assert_eq!(d.peers, first.peers, "{what}: {d:?}");
            let error = d.status["hand"].error.as_deref().unwrap();
            assert!(d.status["hand"].stale && error.starts_with("meshNetworks: ") && error.ends_with("keeps its last known state until it is fixed"), "{what}: {error}");
            assert!(d.refused.is_empty(), "{what}: {d:?}");
            assert_eq!(d.hand, first.hand, "{what}");
            // Never published: refused.
            let d = hand_only(&format!("networks:\n  {typo}\n"), &BTreeMap::new(), &BTreeMap::new());
            assert!(d.peers.is_empty() && d.refused.contains_key("hand") && d.hand.is_empty(), "{what}: {d:?}");
        }
        // A change refused for its overlap with a published peer leaves the network as it was
        // published, and is not remembered: the next typo brings back what was published.
        let taking = HAND.replace("10.252.0.0/16", "10.251.0.0/24");
        let d = hand_only(&format!("networks:\n  {taking}\n  {OTHER}\n"), &first.hand, &published);
        assert!(d.refused.is_empty() && d.peers == first.peers, "{d:?}");
        let error = d.status["hand"].error.as_deref().unwrap();
        assert!(error.starts_with("its change is refused: ") && error.contains("10.251.0.0/16 of peer other") && error.ends_with("it stays as it was published"), "{error}");
        assert_eq!(d.hand, first.hand);
        let d = hand_only(&format!("networks:\n  {HAND}\n  other: [\n"), &d.hand, &published);
        assert_eq!(d.peers, first.peers, "{d:?}");
    }

    /// A remote in tunnel mode (no east-west gateway at all): every node and its pod CIDRs,
    /// and the tunnel Service's nodePort.
    /// A tunnel peer of `n` nodes, 172.16.0.`first`… with a /24 of 10.64.`first`.0… each.
    fn many_nodes(first: u32, n: u32) -> ClusterView {
        let nodes: Vec<(String, String, String)> = (0..n)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0xac10_0000 + first + i).to_string();
                let cidr = Ipv4Net::new(std::net::Ipv4Addr::from(0x0a40_0000 + ((first + i) << 8)), 24).unwrap().to_string();
                (format!("n{i}"), ip, cidr)
            })
            .collect();
        let refs: Vec<(&str, &str, &str)> = nodes.iter().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())).collect();
        tunnel_view(&refs, Some(31800))
    }

    fn tunnel_view(nodes: &[(&str, &str, &str)], node_port: Option<i32>) -> ClusterView {
        let nodes = nodes
            .iter()
            .map(|(name, addr, cidr)| {
                let info = NodeInfo {
                    pod_cidrs: [net(cidr)].into(),
                    addresses: [(NodeAddressType::Internal, addr.parse().unwrap())].into(),
                    gateway_address: None,
                };
                ((*name).to_string(), info)
            })
            .collect();
        let ports = vec![ServicePort { name: Some("tunnel".into()), protocol: Some("UDP".into()), port: 31800, node_port, ..ServicePort::default() }];
        ClusterView {
            nodes: Arc::new(nodes),
            tunnel_service: Some(Service { spec: Some(ServiceSpec { ports: Some(ports), ..ServiceSpec::default() }), ..Service::default() }),
            ..ClusterView::default()
        }
    }

    /// The mode of each remote (flag over annotation over default) decides what it is
    /// published as; a tunnel peer that cannot resolve keeps its last good state, and the
    /// tunnel peers together stay within what the agents take.
    #[test]
    fn tunnel_mode_remotes_publish_their_nodes() {
        let gw = view("10.20.144.165", "10.245.0.0/24");
        let tun = tunnel_view(&[("a", "10.20.144.175", "10.246.0.0/24"), ("b", "10.20.144.176", "10.246.1.0/24"), ("c", "127.0.0.1", "10.246.2.0/24")], Some(31800));
        let by_flag = tunnel_view(&[("a", "10.20.144.185", "10.247.0.0/24")], Some(31801));
        let mut no_service = tunnel_view(&[("a", "10.20.144.195", "10.248.0.0/24")], None);
        no_service.tunnel_service = None;
        let no_node_port = tunnel_view(&[("a", "10.20.144.196", "10.250.0.0/24")], None);
        let clash = tunnel_view(&[("a", "10.20.144.175", "10.249.0.0/24")], Some(31800));
        let remotes = [
            ("gateway".to_string(), RemoteInput { view: Some(&gw), ..RemoteInput::default() }),
            ("tunnel".to_string(), RemoteInput { view: Some(&tun), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
            ("tunnel-by-flag".to_string(), RemoteInput { view: Some(&by_flag), mode_annotation: Some("gateway"), ..RemoteInput::default() }),
            ("tunnel-no-service".to_string(), RemoteInput { view: Some(&no_service), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
            ("tunnel-no-node-port".to_string(), RemoteInput { view: Some(&no_node_port), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
            ("tunnel-typo".to_string(), RemoteInput { view: Some(&tun), mode_annotation: Some("tunel"), ..RemoteInput::default() }),
            ("zz-node-clash".to_string(), RemoteInput { view: Some(&clash), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
        ]
        .into();
        let modes = [("tunnel-by-flag".to_string(), PeerMode::Tunnel)].into();
        let last_good = [peer("tunnel-no-service", "10.20.144.195", "10.248.0.0/24")];
        // "tunnel" was published with the node that "zz-node-clash" lists too: it keeps it.
        let published = [tunnel_peer("tunnel", "10.20.144.175", "10.246.0.0/24")];
        crate::golden::check("desired_tunnel.yaml", &render_modes(&remotes, None, &last_good, &[], &modes, PeerMode::Gateway, &published));
        // "tunnel" refused now (its mode annotation unreadable) still holds its node address.
        let refused_now: BTreeMap<String, RemoteInput<'_>> = [
            ("tunnel".to_string(), RemoteInput { view: Some(&tun), mode_annotation: Some("tunel"), ..RemoteInput::default() }),
            ("zz-node-clash".to_string(), RemoteInput { view: Some(&clash), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
        ]
        .into();
        let out = render_modes(&refused_now, None, &[], &[], &modes, PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(
            d["refused"]["zz-node-clash"].as_str(),
            Some(r#"nodes: 10.20.144.175 is also a node of peer "tunnel", published with it before (not published now)"#),
            "{out}"
        );
        // Had neither been published with it, neither would have it: "tunnel" loses that node
        // alone, "zz-node-clash", whose only node it is, is refused.
        let out = render_modes(&remotes, None, &last_good, &[], &modes, PeerMode::Gateway, &[]);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        let want = |other: &str| format!("nodes: 10.20.144.175 is also a node of peer {other:?}; neither was published with it before, so neither is");
        assert_eq!(d["refused"]["zz-node-clash"].as_str(), Some(want("tunnel").as_str()), "{out}");
        assert!(d["refused"].get("tunnel").is_none(), "{out}");
        let skipped = d["status"]["tunnel"]["skipped"].as_str().unwrap();
        assert!(skipped.ends_with(&format!("; {}; that node is left out", want("zz-node-clash"))), "{out}");
        let peers: Vec<RawPeer> = serde_yaml::from_value(d["peers"].clone()).unwrap();
        let tunnel = peers.iter().find(|p| p.name == "tunnel").unwrap();
        assert_eq!(tunnel.nodes.iter().map(|n| n.address.as_str()).collect::<Vec<_>>(), ["10.20.144.176"], "{out}");
        // --default-mode tunnel: a remote without annotation or flag is a tunnel peer, and a
        // gateway-mode view (no tunnel Service watched) cannot resolve as one.
        let remotes = [("plain".to_string(), RemoteInput { view: Some(&tun), ..RemoteInput::default() })].into();
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Tunnel, &[]);
        assert!(out.contains("mode: tunnel") && out.contains("tunnelPort: 31800"), "{out}");
        let remotes = [("plain".to_string(), RemoteInput { view: Some(&gw), ..RemoteInput::default() })].into();
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Tunnel, &[]);
        assert!(out.contains("Service meshnet-tunnel not found") && !out.contains("name: plain"), "{out}");
    }

    /// Past the datapath's 4,096 tunnel nodes in all, the later tunnel peer (by name) is refused.
    #[test]
    fn tunnel_peers_share_the_datapaths_node_budget() {
        let (a, b) = (many_nodes(1, 3000), many_nodes(3001, 1500));
        let remotes = [
            ("a".to_string(), RemoteInput { view: Some(&a), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
            ("b".to_string(), RemoteInput { view: Some(&b), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
        ]
        .into();
        let out = render(&remotes, None, &[], &[]);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(d["peers"].as_sequence().unwrap().len(), 1);
        assert_eq!(d["refused"]["b"], "nodes: 1500 nodes make 4500 across the tunnel peers; at most 4096");
        assert!(d["resolved"].get("b").is_none(), "a refused peer became a last good state");
        // A peer published before has the room first, whatever its name: here "b".
        let published = [tunnel_peer("b", "172.16.11.185", "10.75.185.0/24")];
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(d["refused"]["a"], "nodes: 3000 nodes make 4500 across the tunnel peers; at most 4096", "{out}");
        assert!(d["refused"].get("b").is_none(), "{out}");
    }

    /// The tunnel budget is kept for the peers as they were published: one that grows gets
    /// only the room left, else it stays as it was published (said so in its status), and no
    /// other published peer, sorted after it or not, is withdrawn for its growth.
    #[test]
    fn a_published_tunnel_peers_growth_withdraws_no_other() {
        let run = |aaa: &ClusterView, prod: &ClusterView, published: &[RawPeer]| {
            let remotes = [
                ("aaa".to_string(), RemoteInput { view: Some(aaa), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
                ("prod".to_string(), RemoteInput { view: Some(prod), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
            ]
            .into();
            let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, published);
            let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
            let peers: Vec<RawPeer> = serde_yaml::from_value(d["peers"].clone()).unwrap();
            // What a failure shows: the peers' sizes, the refusals and the status.
            let sizes: Vec<(String, usize)> = peers.iter().map(|p| (p.name.clone(), p.nodes.len())).collect();
            let out = format!("{sizes:?} refused: {:?} status: {:?}", d["refused"], d["status"]);
            (peers, d, out)
        };
        let (small, prod) = (many_nodes(1, 100), many_nodes(5001, 100));
        let (published, _, out) = run(&small, &prod, &[]);
        assert_eq!(published.iter().map(|p| p.nodes.len()).collect::<Vec<_>>(), [100, 100], "{out}");
        // aaa grows past what is left: prod stays, aaa stays as it was published.
        let (peers, d, out) = run(&many_nodes(1, 4096), &prod, &published);
        assert!(peers == published, "{out}");
        assert!(d["refused"].as_mapping().is_none_or(serde_yaml::Mapping::is_empty), "{out}");
        assert_eq!(
            d["status"]["aaa"]["error"],
            "nodes: 4096 nodes make 4196 across the tunnel peers; at most 4096; it stays as it was published",
            "{out}"
        );
        assert!(d["status"]["prod"].get("error").is_none(), "{out}");
        // Growth within what is left is published.
        let (peers, _, out) = run(&many_nodes(1, 3996), &prod, &published);
        assert_eq!(peers.iter().map(|p| p.nodes.len()).collect::<Vec<_>>(), [3996, 100], "{out}");
        // A newcomer has only what is left, as before; and without the published version to
        // fall back on, a published peer that grew past the room is refused, not the others.
        let raw = |name: &str, first: u32, n: u32| {
            let node = |i: u32| {
                let address = std::net::Ipv4Addr::from(0xac10_0000 + first + i).to_string();
                crate::config::RawTunnelNode { address, pod_cidrs: vec![] }
            };
            RawPeer { name: name.into(), mode: PeerMode::Tunnel, nodes: (0..n).map(node).collect(), tunnel_port: Some(31800), ..RawPeer::default() }
        };
        let records: Vec<&RawPeer> = published.iter().collect();
        let clashes = |candidates: Vec<RawPeer>, records: &[&RawPeer], listed: &[&str]| {
            let listed: BTreeSet<String> = listed.iter().map(|n| (*n).to_owned()).collect();
            let (kept, refused, _) = refuse_tunnel_clashes(candidates.clone(), records, &reservations(&candidates, records, &listed));
            (kept, refused)
        };
        let (kept, refused) = clashes(vec![raw("aaa", 1, 4096), published[1].clone(), raw("new", 6001, 4000)], &records, &["aaa", "prod"]);
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["prod"]);
        assert_eq!(refused["aaa"], "nodes: 4096 nodes make 4196 across the tunnel peers; at most 4096");
        assert_eq!(refused["new"], "nodes: 4000 nodes make 4100 across the tunnel peers; at most 4096");

        // Records past the room (one kept while its peer was refused, another grown meanwhile):
        // the peer coming back takes its turn with the newcomers, however its name sorts; the
        // live ones stay.
        let names = |kept: &[RawPeer]| kept.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let small: Vec<RawPeer> = (0..10).map(|i| raw(&format!("a{i}"), 10_000 + i * 100, 100)).collect();
        let live: Vec<&str> = small.iter().map(|p| p.name.as_str()).collect();
        for back in ["0zz", "zz"] {
            let back = raw(back, 1, 4000);
            let records: Vec<&RawPeer> = small.iter().chain([&back]).collect();
            let (kept, refused) = clashes(small.iter().cloned().chain([back.clone()]).collect(), &records, &live);
            let kept: Vec<String> = names(&kept).into_iter().filter(|n| *n != back.name).collect();
            assert_eq!(kept, names(&small), "{refused:?}");
            assert_eq!(refused[&back.name], "nodes: 4000 nodes make 5000 across the tunnel peers; at most 4096");
        }
        // A peer published in gateway mode holds no tunnel room: turned tunnel, it is a newcomer.
        let gateway = RawPeer { name: "aaa".into(), mode: PeerMode::Gateway, ..RawPeer::default() };
        let prod = raw("prod", 5001, 100);
        let (kept, refused) = clashes(vec![raw("aaa", 1, 3000), raw("prod", 5001, 3000)], &[&gateway, &prod], &["aaa", "prod"]);
        assert_eq!(names(&kept), ["prod"], "{refused:?}");
        assert_eq!(refused["aaa"], "nodes: 3000 nodes make 6000 across the tunnel peers; at most 4096");
        // One published as a tunnel peer that is a gateway peer now keeps its room: a Node
        // clash may yet send out its published tunnel version (`against_local`).
        let now_gateway = RawPeer { name: "prod".into(), mode: PeerMode::Gateway, ..RawPeer::default() };
        let room = reservations(&[now_gateway], &[&prod], &BTreeSet::new());
        assert_eq!(room.get("prod"), Some(&(100, 0)));
        // ... and through the published-room pass, whatever the names: a peer that grows into
        // that room stays at its published version, as it would were the room a tunnel peer's.
        let (was_tunnel, grows) = (raw("a-was-tunnel", 1, 1000), raw("prod", 5001, 3000));
        let now = vec![RawPeer { name: "a-was-tunnel".into(), mode: PeerMode::Gateway, ..RawPeer::default() }, raw("prod", 5001, 3500)];
        let records = [&was_tunnel, &grows];
        let listed: BTreeSet<String> = ["a-was-tunnel".to_string(), "prod".to_string()].into();
        let (out, kept) = keep_published_room(now.clone(), &records, &reservations(&now, &records, &listed), |_| true);
        assert_eq!(out[1].nodes.len(), 3000, "{kept:?}");
        assert_eq!(out[0].mode, PeerMode::Gateway);
        assert_eq!(kept["prod"], "nodes: 3500 nodes make 4500 across the tunnel peers; at most 4096; it stays as it was published");
    }

    /// A remote that claims what another peer was published with is refused, however its
    /// name sorts; the peer published with it stays.
    #[test]
    fn a_newcomer_cannot_take_a_published_peers_cidrs() {
        let west = view("10.20.144.165", "10.246.0.0/16");
        let attacker = view("10.20.144.175", "10.246.7.0/24");
        let remotes = [
            ("aaa-attacker".to_string(), RemoteInput { view: Some(&attacker), ..RemoteInput::default() }),
            ("prod-west".to_string(), RemoteInput { view: Some(&west), ..RemoteInput::default() }),
        ]
        .into();
        let published = [peer("prod-west", "10.20.144.165", "10.246.0.0/16")];
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        let names: Vec<&str> = d["peers"].as_sequence().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["prod-west"], "{out}");
        assert_eq!(d["refused"]["aaa-attacker"], "claims 10.246.7.0/24, which overlaps 10.246.0.0/16 of peer prod-west, published with it before");
        assert!(d["resolved"].get("aaa-attacker").is_none(), "{out}");
    }

    /// A published peer that grows into what a newer peer was published with is not
    /// withdrawn: its change is refused and it stays as it was published, the newer peer
    /// keeping what it was published with. A peer never published, two published with what
    /// they both claim, or a newcomer claiming what a published peer grows into: as before,
    /// the rules of who keeps what stand.
    #[test]
    fn a_published_peers_growth_into_a_newer_claim_does_not_withdraw_it() {
        let parse = |out: &str| serde_yaml::from_str::<serde_yaml::Value>(out).unwrap();
        let a = view("10.20.144.165", "10.245.0.0/23"); // grew from /24
        let b = view("10.20.144.175", "10.245.1.0/24");
        let remotes: BTreeMap<String, RemoteInput<'_>> = [
            ("a".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() }),
            ("b".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
        ]
        .into();
        let published = [peer("a", "10.20.144.165", "10.245.0.0/24"), peer("b", "10.20.144.175", "10.245.1.0/24")];
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        assert!(out.contains("- name: a\n  podCIDRs:\n  - 10.245.0.0/24\n"), "a was withdrawn: {out}");
        assert!(out.contains("- name: b\n  podCIDRs:\n  - 10.245.1.0/24\n"), "{out}");
        let d = parse(&out);
        assert!(d["refused"].as_mapping().unwrap().is_empty(), "{out}");
        assert_eq!(
            d["status"]["a"]["error"],
            "its change is refused: claims 10.245.0.0/23, which overlaps 10.245.1.0/24 of peer b, published with it before; it stays as it was published",
            "{out}"
        );
        assert!(d["status"]["b"].get("error").is_none() && d["status"]["b"].get("refused").is_none(), "{out}");
        // The refused change is no last good state.
        assert!(d["resolved"].get("a").is_none() && d["resolved"].get("b").is_some(), "{out}");

        // Never published, the grown peer is refused.
        let d = parse(&render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published[1..]));
        assert_eq!(d["refused"]["a"], "claims 10.245.0.0/23, which overlaps 10.245.1.0/24 of peer b, published with it before", "{d:?}");
        assert_eq!(d["peers"].as_sequence().unwrap().len(), 1, "{d:?}");
        // Both published with what they both claim: the published version clashes too, and
        // neither is published.
        let wider = view("10.20.144.165", "10.245.0.0/22");
        let both_held: BTreeMap<String, RemoteInput<'_>> = [
            ("a".to_string(), RemoteInput { view: Some(&wider), ..RemoteInput::default() }),
            ("b".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
        ]
        .into();
        let records = [peer("a", "10.20.144.165", "10.245.0.0/23"), published[1].clone()];
        let d = parse(&render_modes(&both_held, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &records));
        assert!(d["peers"].as_sequence().unwrap().is_empty(), "{d:?}");
        assert_eq!(d["refused"]["a"], "claims 10.245.0.0/22, which overlaps 10.245.1.0/24 of peer b, both published with it before", "{d:?}");
        assert_eq!(d["refused"]["b"], "claims 10.245.1.0/24, which overlaps 10.245.0.0/22 of peer a, both published with it before", "{d:?}");
        // A newcomer claiming what a published peer grows into: neither has it; the
        // published peer stays as it was published, the newcomer waits.
        let newcomer: BTreeMap<String, RemoteInput<'_>> = [
            ("a".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() }),
            ("c".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
        ]
        .into();
        let out = render_modes(&newcomer, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published[..1]);
        let d = parse(&out);
        assert!(out.contains("- name: a\n  podCIDRs:\n  - 10.245.0.0/24\n") && !out.contains("- name: c\n"), "{out}");
        let neither = "neither was published with it before, so neither is";
        assert_eq!(d["refused"]["c"].as_str(), Some(format!("claims 10.245.1.0/24, which overlaps 10.245.0.0/23 of peer a; {neither}").as_str()), "{out}");
        assert_eq!(
            d["status"]["a"]["error"].as_str(),
            Some(format!("its change is refused: claims 10.245.0.0/23, which overlaps 10.245.1.0/24 of peer c; {neither}; it stays as it was published").as_str()),
            "{out}"
        );
        // The published version is settled as any other: a newcomer that claims part of it
        // (which the change gave up) is refused, rather than both going out over each other.
        let (moved, b, newer) = (view("10.20.144.165", "10.246.0.0/16"), view("10.20.144.175", "10.246.0.0/24"), view("10.20.144.185", "10.245.7.0/24"));
        let remotes: BTreeMap<String, RemoteInput<'_>> = [
            ("a".to_string(), RemoteInput { view: Some(&moved), ..RemoteInput::default() }),
            ("b".to_string(), RemoteInput { view: Some(&b), ..RemoteInput::default() }),
            ("c".to_string(), RemoteInput { view: Some(&newer), ..RemoteInput::default() }),
        ]
        .into();
        let records = [peer("a", "10.20.144.165", "10.245.0.0/16"), peer("b", "10.20.144.175", "10.246.0.0/24")];
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &records);
        let d = parse(&out);
        let peers: Vec<RawPeer> = serde_yaml::from_value(d["peers"].clone()).unwrap();
        assert_eq!(peers, records, "{out}");
        assert_eq!(d["refused"]["c"], "claims 10.245.7.0/24, which overlaps 10.245.0.0/16 of peer a, published with it before", "{out}");
        assert!(d["status"]["a"]["error"].as_str().is_some_and(|e| e.starts_with("its change is refused: claims 10.246.0.0/16")), "{out}");
    }

    /// A tunnel peer's new node at an address another tunnel peer was published with costs
    /// that node alone; a peer left with no node stays as it was published.
    #[test]
    fn a_tunnel_peers_new_node_at_an_address_another_listed_first_withdraws_nothing() {
        let a = tunnel_view(&[("n1", "10.20.144.175", "10.246.0.0/24"), ("n2", "10.20.144.176", "10.246.1.0/24")], Some(31800));
        let b = tunnel_view(&[("x", "10.20.144.176", "10.247.0.0/24")], Some(31800));
        let t = |v| RemoteInput { view: Some(v), mode_annotation: Some("tunnel"), ..RemoteInput::default() };
        let remotes = [("a".to_string(), t(&a)), ("b".to_string(), t(&b))].into();
        let published = [tunnel_peer("a", "10.20.144.175", "10.246.0.0/24"), tunnel_peer("b", "10.20.144.176", "10.247.0.0/24")];
        let out = render_modes(&remotes, None, &[], &[("b", "10.247.0.0/16")], &BTreeMap::new(), PeerMode::Gateway, &published);
        assert!(out.contains("name: a"), "{out}");
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        let peers: Vec<RawPeer> = serde_yaml::from_value(d["peers"].clone()).unwrap();
        assert_eq!(peers.len(), 2, "{out}");
        assert_eq!(peers[0].nodes, published[0].nodes, "{out}");
        assert_eq!(peers[0].pod_cidrs, ["10.246.0.0/23"], "{out}");
        assert_eq!(peers[1], published[1], "{out}");
        assert!(d["refused"].as_mapping().unwrap().is_empty(), "{out}");
        assert_eq!(d["status"]["a"]["skipped"], r#"nodes: 10.20.144.176 is also a node of peer "b", published with it before; that node is left out"#, "{out}");
        assert!(d["status"]["b"].get("skipped").is_none(), "{out}");
        // Its only node moved to that address: the peer stays as it was published.
        let moved = tunnel_view(&[("n1", "10.20.144.176", "10.246.0.0/24")], Some(31800));
        let remotes = [("a".to_string(), t(&moved)), ("b".to_string(), t(&b))].into();
        let out = render_modes(&remotes, None, &[], &[("b", "10.247.0.0/16")], &BTreeMap::new(), PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        let peers: Vec<RawPeer> = serde_yaml::from_value(d["peers"].clone()).unwrap();
        assert_eq!(peers, published, "{out}");
        assert_eq!(
            d["status"]["a"]["error"],
            r#"its change is refused: nodes: 10.20.144.176 is also a node of peer "b", published with it before; it stays as it was published"#,
            "{out}"
        );
        assert!(d["refused"].as_mapping().unwrap().is_empty(), "{out}");
    }

    /// Whoever can annotate one remote Node (its kubelet can) withdraws no peer with an
    /// address annotation the check refuses: in gateway mode that gateway is left out, and
    /// with none left the peer keeps its last good state, stale; in tunnel mode that node is.
    #[test]
    fn one_remote_nodes_bad_gateway_annotation_costs_that_node_alone() {
        let parse = |out: &str| serde_yaml::from_str::<serde_yaml::Value>(out).unwrap();
        let mut two = view("10.20.144.165", "10.245.0.0/24");
        let gw2 = NodeInfo {
            pod_cidrs: [net("10.245.1.0/24")].into(),
            addresses: [(NodeAddressType::Internal, "10.20.144.166".parse().unwrap())].into(),
            gateway_address: Some("1.2.3.4".into()),
        };
        Arc::make_mut(&mut two.nodes).insert("gw2".into(), gw2);
        let subsets = two.endpoints.as_mut().unwrap().subsets.as_mut().unwrap();
        subsets[0].addresses.as_mut().unwrap().push(EndpointAddress { ip: "10.0.0.2".into(), node_name: Some("gw2".into()), ..EndpointAddress::default() });
        let mut one = view("10.20.144.175", "10.254.0.0/16");
        Arc::make_mut(&mut one.nodes).get_mut("gw").unwrap().gateway_address = Some("1.2.3.4".into());
        let tun = tunnel_view(&[("n1", "10.20.144.185", "10.246.0.0/24"), ("n2", "10.20.144.186", "10.246.1.0/24")], Some(31800));
        let mut tun_spoofed = tun.clone();
        Arc::make_mut(&mut tun_spoofed.nodes).get_mut("n2").unwrap().gateway_address = Some("1.2.3.4".into());
        let remotes = [
            ("one".to_string(), RemoteInput { view: Some(&one), ..RemoteInput::default() }),
            ("tun".to_string(), RemoteInput { view: Some(&tun_spoofed), mode_annotation: Some("tunnel"), ..RemoteInput::default() }),
            ("two".to_string(), RemoteInput { view: Some(&two), ..RemoteInput::default() }),
        ]
        .into();
        let last_good = [peer("one", "10.20.144.175", "10.254.0.0/16")];
        let out = render(&remotes, None, &last_good, &[]);
        let d = parse(&out);
        assert!(d["refused"].as_mapping().unwrap().is_empty(), "{out}");
        let peers: Vec<RawPeer> = serde_yaml::from_value(d["peers"].clone()).unwrap();
        assert_eq!(peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["one", "tun", "two"], "{out}");
        // Two gateways: the other stays.
        assert_eq!(peers[2].gateways.iter().map(|g| g.address.as_str()).collect::<Vec<_>>(), ["10.20.144.165"], "{out}");
        assert_eq!(peers[2].pod_cidrs, ["10.245.0.0/23"], "{out}");
        assert_eq!(d["status"]["two"]["skipped"], r#"node gw2: meshnet.io/gateway-address "1.2.3.4" is not one of its addresses (10.20.144.166)"#, "{out}");
        // Its only gateway: the last good state, stale, with the reason.
        assert_eq!(peers[0], last_good[0], "{out}");
        assert_eq!(d["status"]["one"]["stale"], true, "{out}");
        let error = d["status"]["one"]["error"].as_str().unwrap();
        assert!(error.contains(r#"node gw: meshnet.io/gateway-address "1.2.3.4" is not one of its addresses (10.20.144.175)"#), "{out}");
        // Tunnel mode: the node is skipped, the others stay.
        assert_eq!(peers[1].nodes.iter().map(|n| n.address.as_str()).collect::<Vec<_>>(), ["10.20.144.185"], "{out}");
        assert_eq!(d["status"]["tun"]["skipped"], r#"node n2: meshnet.io/gateway-address "1.2.3.4" is not one of its addresses (10.20.144.186)"#, "{out}");
    }

    /// Of two peers whose names hash to one datapath id, the one published before keeps it
    /// and the newcomer is refused, even though it sorts first (as the agents walk peers);
    /// while it is refused (not published now) it still holds its id; two newcomers are both
    /// refused, for no rule could tell the rightful one.
    #[test]
    fn a_newcomer_cannot_take_a_published_peers_datapath_id() {
        let (first, second) = config::colliding_names();
        assert_eq!(config::peer_id(&first), config::peer_id(&second));
        let id = config::peer_id(&first);
        let west = view("10.20.144.165", "10.246.0.0/16");
        let attacker = view("10.20.144.175", "10.247.0.0/16");
        let remotes: BTreeMap<String, RemoteInput<'_>> = [
            (first.clone(), RemoteInput { view: Some(&attacker), ..RemoteInput::default() }),
            (second.clone(), RemoteInput { view: Some(&west), ..RemoteInput::default() }),
        ]
        .into();
        let render_with = |remotes: &BTreeMap<String, RemoteInput<'_>>, published: &[RawPeer]| {
            let out = render_modes(remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, published);
            serde_yaml::from_str::<serde_yaml::Value>(&out).unwrap()
        };
        let names = |d: &serde_yaml::Value| -> Vec<String> {
            d["peers"].as_sequence().unwrap().iter().filter_map(|p| Some(p["name"].as_str()?.to_owned())).collect()
        };
        let published = [peer(&second, "10.20.144.165", "10.246.0.0/16")];
        let d = render_with(&remotes, &published);
        assert_eq!(names(&d), std::slice::from_ref(&second), "{d:?}");
        let why = format!("its name hashes to the same datapath id ({id:#010x}) as peer {second}'s, published with it before");
        assert_eq!(d["refused"][first.as_str()].as_str(), Some(why.as_str()));
        assert!(d["resolved"].get(first.as_str()).is_none(), "{d:?}");
        // Refused itself now (all of IPv4), the published peer still holds its id.
        let everything = view("10.20.144.165", "0.0.0.0/0");
        let mut held_refused = remotes.clone();
        held_refused.insert(second.clone(), RemoteInput { view: Some(&everything), ..RemoteInput::default() });
        let d = render_with(&held_refused, &published);
        assert!(names(&d).is_empty(), "{d:?}");
        assert_eq!(d["refused"][first.as_str()].as_str(), Some(format!("{why} (not published now)").as_str()));
        // Neither published before: neither is published.
        let d = render_with(&remotes, &[]);
        assert!(names(&d).is_empty(), "{d:?}");
        let neither = |other: &str| format!("its name hashes to the same datapath id ({id:#010x}) as peer {other}'s; neither was published with it before, so neither is");
        assert_eq!(d["refused"][first.as_str()].as_str(), Some(neither(&second).as_str()));
        assert_eq!(d["refused"][second.as_str()].as_str(), Some(neither(&first).as_str()));
    }

    /// A pod CIDR over another peer's gateway is a claim on it; and a peer that cannot be
    /// published now (refused) still holds what it was published with.
    #[test]
    fn a_published_peers_gateway_and_cidrs_stay_its_own_while_it_is_refused() {
        let west = view("10.20.144.165", "10.246.0.0/16");
        let over_gateway = view("10.20.144.175", "10.20.144.165/32");
        let remotes = [
            ("aaa".to_string(), RemoteInput { view: Some(&over_gateway), ..RemoteInput::default() }),
            ("prod-west".to_string(), RemoteInput { view: Some(&west), ..RemoteInput::default() }),
        ]
        .into();
        let published = [peer("prod-west", "10.20.144.165", "10.246.0.0/16")];
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(
            d["refused"]["aaa"],
            "claims 10.20.144.165/32, which holds 10.20.144.165, a node address of peer prod-west, published with it before",
            "{out}"
        );
        assert!(d["refused"].get("prod-west").is_none(), "{out}");
        // prod-west not published now (its only gateway node's annotation points elsewhere,
        // and it has no last good state here): its CIDRs stay its.
        let mut spoofed = view("10.20.144.165", "10.246.0.0/16");
        Arc::make_mut(&mut spoofed.nodes).get_mut("gw").unwrap().gateway_address = Some("10.20.144.99".into());
        let taker = view("10.20.144.175", "10.246.7.0/24");
        let remotes = [
            ("aaa".to_string(), RemoteInput { view: Some(&taker), ..RemoteInput::default() }),
            ("prod-west".to_string(), RemoteInput { view: Some(&spoofed), ..RemoteInput::default() }),
        ]
        .into();
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(
            d["refused"]["aaa"],
            "claims 10.246.7.0/24, which overlaps 10.246.0.0/16 of peer prod-west, published with it before (not published now)",
            "{out}"
        );
        assert!(d["peers"].as_sequence().unwrap().is_empty(), "{out}");
        // Its claim now overlaps this cluster's pods: the change is refused, and prod-west
        // stays as it was published, holding what it was published with all the same.
        let overlapping = view("10.20.144.165", "10.244.0.0/15");
        let remotes = [
            ("aaa".to_string(), RemoteInput { view: Some(&taker), ..RemoteInput::default() }),
            ("prod-west".to_string(), RemoteInput { view: Some(&overlapping), ..RemoteInput::default() }),
        ]
        .into();
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        let d: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert!(d["refused"].get("prod-west").is_none(), "{out}");
        let clash = d["status"]["prod-west"]["localClash"].as_str().unwrap();
        assert!(clash.contains("overlaps 10.244.0.0/16 of the local cluster (node node1)") && clash.ends_with("it stays as it was published"), "{out}");
        assert!(out.contains("- name: prod-west\n  podCIDRs:\n  - 10.246.0.0/16\n"), "{out}");
        assert_eq!(d["refused"]["aaa"], "claims 10.246.7.0/24, which overlaps 10.246.0.0/16 of peer prod-west, published with it before", "{out}");
        // Once prod-west's secret is gone it holds nothing, and the claim stands.
        let remotes = [("aaa".to_string(), RemoteInput { view: Some(&taker), ..RemoteInput::default() })].into();
        let out = render_modes(&remotes, None, &[], &[], &BTreeMap::new(), PeerMode::Gateway, &published);
        assert!(out.contains("name: aaa") && !out.contains("refused:\n  aaa"), "{out}");
    }

    /// Hand-written meshNetworks entries are published for clusters without a secret, one bad
    /// entry spoils only itself, and a discovered cluster or this cluster's own network wins.
    #[test]
    fn mesh_networks_entries_stand_alone() {
        let a = view("10.20.144.165", "10.245.0.0/24");
        let remotes = [("cluster2".to_string(), RemoteInput { view: Some(&a), ..RemoteInput::default() })].into();
        let cm = istio(
            "networks:\n  \
               cluster2: {endpoints: [{fromCidr: 10.99.0.0/16}], gateways: [{address: 192.0.2.1, port: 31000}]}\n  \
               network1: {endpoints: [{fromCidr: 10.244.0.0/16}], gateways: [{address: 10.20.144.160, port: 31000}]}\n  \
               hand: {endpoints: [{fromCidr: 10.250.0.0/16}], gateways: [{address: 10.20.144.185, port: 30443}]}\n  \
               hostname: {endpoints: [{fromCidr: 10.251.0.0/16}], gateways: [{address: gw.example.com, port: 30443}]}\n",
        );
        crate::golden::check("desired_mesh_networks.yaml", &render(&remotes, Some(&cm), &[], &[]));
        let bad = istio("networks: [");
        let out = render(&remotes, Some(&bad), &[], &[]);
        assert!(out.contains("meshNetworks is not valid YAML"), "{out}");
        assert!(out.contains("name: cluster2"), "an unreadable meshNetworks cost a discovered peer:\n{out}");
    }
}
