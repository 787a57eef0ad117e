//! `meshnet agent --datapath-log`: the logging build of the datapath, and what the default
//! build must not have.
//!
//! The default object is checked from its ELF: no ring-buffer map and no ring-buffer helper
//! call (kernels before 5.8 refuse both, and a logging instruction would cost every packet),
//! against the logging object, which has both, so that the check itself is seen to work. In
//! the two-cluster topology the logging build logs a new flow with its gateway, and a drop
//! with its reason, under `meshnet::datapath`; a flood of drops is rate-limited and every drop
//! is either a line or counted as held back.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF;
use meshnet::datapath::{EBPF_LOG_OBJECT, EBPF_OBJECT};
use meshnet_common::{limits, names};
use meshnet_tests::{
    peer, poll, skip,
    topo::{app_a, node1_config, Options, Topology, APP_A, CLIENT_IP, NODE2_LAN, NODEPORT_TCP, POD_INTERFACES},
    Agent,
};

const WAIT: Duration = Duration::from_mins(1);
/// Drops in the flood test: far more than the budget lets through in the seconds it takes.
const FLOOD: usize = 5_000;
/// The ring-buffer helpers: `bpf_ringbuf_output` (130) … `bpf_ringbuf_query` (134).
const RINGBUF_HELPERS: std::ops::RangeInclusive<i32> = 130..=134;
/// `bpf_tail_call`.
const TAIL_CALL: i32 = 12;
/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// A call's `src_reg`: 0 a helper, 1 a BPF-to-BPF call (2 a kfunc).
const HELPER: u8 = 0;
const BPF_FUNCTION: u8 = 1;

/// The calls in `program`'s own instructions (`None`: every function of the object) whose
/// `src_reg` is `kind` and whose `imm` passes `imm`.
fn calls(obj: &aya_obj::Object, program: Option<&str>, kind: u8, imm: impl Fn(i32) -> bool) -> usize {
    obj.functions
        .iter()
        .filter(|(key, _)| program.is_none_or(|p| obj.programs[p].function_key() == **key))
        .flat_map(|(_, f)| f.instructions.iter())
        .filter(|i| i.code == CALL && i.src_reg() == kind && imm(i.imm))
        .count()
}

/// The object's ring-buffer maps and its calls of ring-buffer helpers.
fn ring_buffer_use(object: &[u8]) -> (Vec<String>, usize) {
    let obj = aya_obj::Object::parse(object).expect("parsing the object");
    let maps = obj.maps.iter().filter(|(_, m)| m.map_type() == BPF_MAP_TYPE_RINGBUF as u32).map(|(n, _)| n.clone()).collect();
    (maps, calls(&obj, None, HELPER, |imm| RINGBUF_HELPERS.contains(&imm)))
}

#[test]
fn the_default_object_has_no_ring_buffer_and_no_logging_instruction() {
    let (maps, n) = ring_buffer_use(EBPF_OBJECT);
    assert!(maps.is_empty(), "the default object has ring-buffer maps {maps:?}: kernels before 5.8 would refuse it");
    assert_eq!(n, 0, "the default object calls ring-buffer helpers");
    let obj = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
    for name in [names::LOG_RING, names::LOG_BUDGET, names::LOG_EVENT, names::LOG_PROGS] {
        assert!(!obj.maps.contains_key(name), "the default object has {name}");
    }
    assert!(!obj.programs.contains_key(names::PROG_LOG), "the default object has the line writer");
    assert_eq!(calls(&obj, None, HELPER, |imm| imm == TAIL_CALL), 0, "the default object tail-calls");
    // The same checks find them in the logging object.
    let (maps, n) = ring_buffer_use(EBPF_LOG_OBJECT);
    assert_eq!(maps, [names::LOG_RING], "the logging object's ring buffer");
    assert!(n > 0, "the logging object writes no line");
    let obj = aya_obj::Object::parse(EBPF_LOG_OBJECT).unwrap();
    for name in [names::LOG_BUDGET, names::LOG_EVENT, names::LOG_PROGS] {
        assert!(obj.maps.contains_key(name), "the logging object lacks {name}");
    }
    assert!(calls(&obj, None, HELPER, |imm| imm == TAIL_CALL) > 0, "the logging object never tail-calls its line writer");
    // Same maps otherwise: switching builds keeps every pinned map and flow.
    for name in names::ALL_MAPS {
        assert!(obj.maps.contains_key(name), "the logging object lacks {name}");
    }
}

/// Kernels before 5.10 (and any whose JIT does not allow it) refuse a program that both
/// calls a BPF function and tail-calls: the logging build's translating programs, which
/// tail-call the line writer, must call no BPF function (a struct copy can become a call of
/// `memset`).
#[test]
fn the_logging_builds_tail_calling_programs_call_no_bpf_function() {
    let obj = aya_obj::Object::parse(EBPF_LOG_OBJECT).unwrap();
    for program in [names::PROG_FROM_POD, names::PROG_TO_POD] {
        assert!(calls(&obj, Some(program), HELPER, |imm| imm == TAIL_CALL) > 0, "{program} does not tail-call");
        assert_eq!(calls(&obj, Some(program), BPF_FUNCTION, |_| true), 0, "{program} calls a BPF function besides its tail call");
    }
}

fn start(t: &Topology, extra: &[&str]) -> Agent {
    let cfg = t.write_config(&node1_config(POD_INTERFACES));
    Agent::start(&t.node1, &cfg, &t.pin_path(), extra)
}

/// Sends `n` ICMP echo requests from the client pod to `dst` as fast as it can; meshnet drops
/// each (ICMP to a remote CIDR cannot be translated in gateway mode).
fn pings(t: &Topology, dst: Ipv4Addr, n: usize) {
    t.client
        .run(move || -> std::io::Result<()> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::ICMPV4))?;
            let to = socket2::SockAddr::from(SocketAddrV4::new(dst, 0));
            for seq in 0..n {
                let seq = u16::try_from(seq % 65_536).unwrap();
                let mut echo = [8u8, 0, 0, 0, 0x4d, 0x4e, 0, 0];
                echo[6..8].copy_from_slice(&seq.to_be_bytes());
                let sum = etherparse::checksum::Sum16BitWords::new().add_slice(&echo).ones_complement();
                echo[2..4].copy_from_slice(&sum.to_be_bytes());
                s.send_to(&echo, &to)?;
            }
            Ok(())
        })
        .expect("sending ICMP echo requests");
}

/// `n` drops (ICMP, which meshnet does not carry), sent in bursts that the datapath counts
/// before the next goes: a veth queues what it passes on in the CPU's backlog (1,000 packets),
/// which a loaded machine, its softirqs deferred, lets overflow before tc sees them.
fn flood(t: &Topology, dst: Ipv4Addr, n: usize) {
    const BURST: usize = 500;
    let before = t.counter("unsupported_proto");
    let mut sent = 0;
    while sent < n {
        let burst = BURST.min(n - sent);
        pings(t, dst, burst);
        sent += burst;
        let counted = poll(WAIT, || (t.counter("unsupported_proto") - before >= sent as u64).then_some(()));
        assert!(counted.is_some(), "{sent} drops sent, {} counted", t.counter("unsupported_proto") - before);
    }
}

/// Whether the kernel has BPF ring buffers; reports a skip when not.
fn ring_buffers() -> bool {
    if meshnet::datapath_log::ring_buffers_supported() {
        return true;
    }
    skip("BPF ring buffers (5.8)");
    false
}

#[test]
fn logs_a_new_flow_and_a_drop() {
    if !ring_buffers() {
        return;
    }
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &["--datapath-log"]);
    assert!(agent.child.output().contains("datapath logging on"), "{}", agent.child.output());
    let reply = t.client.run(|| peer::tcp_request(app_a(), "logged")).expect("TCP to app-a");
    assert_eq!(reply, "app 10.245.0.20:8080 got logged");
    let line = agent.child.wait_for_line(&format!("-> {APP_A}:8080 via gateway {NODE2_LAN}:{NODEPORT_TCP}"), WAIT);
    assert!(line.contains("meshnet::datapath") && line.contains(&format!("new flow proto=tcp {CLIENT_IP}:")), "{line}");
    pings(&t, APP_A, 1);
    let line = agent.child.wait_for_line(&format!("drop reason=unsupported_proto proto=icmp {CLIENT_IP}:0 -> {APP_A}:0"), WAIT);
    assert!(line.contains("WARN") && line.contains("meshnet::datapath"), "{line}");
    // The established flow's later packets write nothing: one request over one connection
    // is one new-flow line however many packets it took.
    let lines = agent.child.output();
    assert_eq!(lines.matches("new flow proto=tcp").count(), 1, "{lines}");
}

/// The default build says nothing of the datapath, and a level that filters the datapath's
/// lines out keeps them out of the kernel's ring too (the object is told the level).
#[test]
fn without_the_flag_or_below_the_level_no_line_is_written() {
    if !ring_buffers() {
        return;
    }
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &[]);
    let _ = t.client.run(|| peer::tcp_request(app_a(), "quiet")).expect("TCP to app-a");
    pings(&t, APP_A, 3);
    assert!(poll(WAIT, || (t.counter("unsupported_proto") >= 3).then_some(())).is_some());
    assert!(agent.child.stop(), "the agent did not stop cleanly");
    let out = agent.child.output();
    assert!(!out.contains("meshnet::datapath:"), "{out}");
    drop(agent);

    // Logging on, datapath lines filtered out: told the level, the object writes none. More
    // drops than the budget: had it written them, some would have been held back and
    // counted, whatever the agent's filter then did with the lines.
    let cfg = t.write_config(&node1_config(POD_INTERFACES));
    let mut argv = Agent::argv(&t.node1, &cfg, &t.pin_path(), &["--datapath-log", "--metrics-addr", "127.0.0.1:9471"]);
    argv.extend(["--log-level".into(), "info,meshnet::datapath=error".into()]);
    let mut agent = Agent::spawn(&argv);
    flood(&t, APP_A, FLOOD);
    let metrics = metrics(&t);
    assert!(metrics.contains("meshnet_datapath_log_enabled 1"), "{metrics}");
    assert!(metrics.contains("meshnet_datapath_log_suppressed_total 0"), "the object wrote filtered lines:\n{metrics}");
    assert!(agent.child.stop());
    let out = agent.child.output();
    assert!(!out.contains("drop reason="), "{out}");
}

/// A flood of drops: at most the node's budget of lines per second reaches the log, and every
/// drop is either a line or counted as held back (the log says how many, and the metric).
#[test]
fn a_drop_flood_is_rate_limited_and_every_drop_accounted_for() {
    if !ring_buffers() {
        return;
    }
    let t = Topology::new(Options::default());
    let agent = start(&t, &["--datapath-log", "--metrics-addr", "127.0.0.1:9471"]);
    assert!(agent.child.output().contains("datapath logging on"), "{}", agent.child.output());
    // Resolves the pod's next hop first: packets queued for ARP beyond its queue would be
    // lost before meshnet sees them.
    let _ = t.client.run(|| peer::tcp_request(app_a(), "first")).expect("TCP to app-a");
    let started = Instant::now();
    flood(&t, APP_A, FLOOD);
    let took = started.elapsed();
    let needle = format!("drop reason=unsupported_proto proto=icmp {CLIENT_IP}:0 -> {APP_A}:0");
    let accounted = || {
        let out = agent.child.output();
        let lines = out.matches(&needle).count() as u64;
        let held: u64 = out
            .lines()
            .filter(|l| l.contains("held back by the rate limit"))
            .filter_map(|l| l.split("suppressed=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
            .sum();
        (lines, held)
    };
    let (lines, held) = poll(WAIT, || {
        let (lines, held) = accounted();
        (lines + held >= FLOOD as u64).then_some((lines, held))
    })
    .unwrap_or_else(|| panic!("drops not accounted for within {WAIT:?}: {:?}\n{}", accounted(), agent.child.output()));
    println!("{FLOOD} drops in {took:?}: {lines} lines, {held} held back");
    assert_eq!(lines + held, FLOOD as u64, "every drop is a line or held back, once");
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    // The sends span at most this many of the budget's seconds; CPUs that test the budget at
    // the same instant may overshoot it by one line each.
    let seconds = took.as_secs() + 2;
    assert!(
        lines <= (u64::from(limits::LOG_LINES_PER_SEC) + cpus) * seconds,
        "{lines} lines for {FLOOD} drops in {took:?} on {cpus} CPUs: the rate limit did not hold"
    );
    assert!(held > 0, "a flood of {FLOOD} drops held nothing back");
    let metrics = metrics(&t);
    let metric = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshnet_datapath_log_suppressed_total "))
        .unwrap_or_else(|| panic!("no suppressed metric:\n{metrics}"));
    assert_eq!(metric.trim().parse::<u64>().unwrap(), held, "{metrics}");
    assert!(metrics.contains("meshnet_datapath_log_enabled 1"), "{metrics}");
}

fn metrics(t: &Topology) -> String {
    meshnet_tests::http_get(&t.node1, "127.0.0.1:9471".parse().unwrap(), "/metrics")
}

/// The logging build through the netlink attach path, the one kernels before 6.6 take.
#[test]
fn logs_through_the_netlink_attach_path_too() {
    if !ring_buffers() {
        return;
    }
    let t = Topology::new(Options::default());
    let mut agent = start(&t, &["--datapath-log", "--attach-mode", "netlink"]);
    let _ = t.client.run(|| peer::tcp_request(app_a(), "netlink")).expect("TCP to app-a");
    agent.child.wait_for_line(&format!("-> {APP_A}:8080 via gateway {NODE2_LAN}:{NODEPORT_TCP}"), WAIT);
}
