//! What the verifier spends on each of meshnet's programs on the running kernel: processed
//! instructions and stack depth, from its own statistics (log level `BPF_LOG_STATS`). A
//! program that takes more than a quarter of the verifier's budget (1,000,000 processed
//! instructions since 5.2) fails the test: it would be a few features away from being
//! refused, and older verifiers explore more states than newer ones.
//!
//! aya keeps the verifier log only of a load that fails, so this test relocates the embedded
//! object itself with aya-obj (the parser aya uses, against maps created through aya) and
//! loads each program with a plain `BPF_PROG_LOAD`: the same instructions the agent loads
//! (the object has no BTF, so aya adds no function or line info either).
//!
//! With `MESHNET_VERIFIER_STATS_DIR` set (`cargo xtask test` sets it, also in its VMs), the
//! numbers go to `DIR/<kernel release>.json`; xtask merges those into
//! `target/verifier-stats.json` and prints the table.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::CStr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;
use aya_obj::generated::bpf_insn;
use meshnet::datapath::{EBPF_LOG_OBJECT, EBPF_OBJECT};
use meshnet_common::names;
use meshnet_tests::{kernel_release, raw_bpf, require_root};
use serde_json::json;

/// `BPF_LOG_LEVEL1`: the summary line only, on success.
const BPF_LOG_LEVEL1: u32 = 1;
/// `BPF_LOG_STATS` (5.2+): the summary plus verification time and stack depth.
const BPF_LOG_STATS: u32 = 4;
/// Before 5.2 the verifier stopped at 131,072 processed instructions, from 5.2 at 1,000,000.
const OLD_LIMIT: u64 = 131_072;
/// The share of the verifier's budget a program may use: 1/4.
const BUDGET_DIVISOR: u64 = 4;

#[derive(Debug)]
struct Stats {
    program: String,
    instructions: usize,
    processed: u64,
    limit: u64,
    stack_depth: Vec<u64>,
    verification_usec: Option<u64>,
}

/// Loads `insns` as a tc classifier with the verifier's statistics; returns the log.
fn load_with_stats(name: &str, insns: &[bpf_insn], license: &CStr) -> String {
    let mut last_err = None;
    for level in [BPF_LOG_STATS, BPF_LOG_LEVEL1] {
        let mut buf = vec![0u8; 1 << 20];
        let loaded = raw_bpf::prog_load(raw_bpf::PROG_TYPE_SCHED_CLS, name, insns, license, level, &mut buf);
        let log = String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == 0).unwrap_or(buf.len())]).into_owned();
        let err = match loaded {
            Ok(_fd) => return log,
            Err(e) => e,
        };
        // Kernels before 5.2 refuse the STATS level with EINVAL: try the plain log.
        if level == BPF_LOG_STATS && err.raw_os_error() == Some(libc::EINVAL) {
            last_err = Some((err, log));
            continue;
        }
        panic!("the kernel refused {name}: {err}\nverifier log:\n{log}");
    }
    let (err, log) = last_err.unwrap();
    panic!("the kernel refused {name}: {err}\nverifier log:\n{log}");
}

/// The number after `key` in `log` (`key` ends with a space).
fn number_after(log: &str, key: &str) -> Option<u64> {
    let rest = &log[log.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn parse(program: String, instructions: usize, log: &str) -> Stats {
    let processed = number_after(log, "processed ").unwrap_or_else(|| panic!("no processed count in the log of {program}:\n{log}"));
    let limit = number_after(log, "(limit ").unwrap_or(OLD_LIMIT);
    // "stack depth 64+0+16": one number per function (the program and its subprograms).
    let stack_depth = log
        .find("stack depth ")
        .map(|i| {
            log[i + "stack depth ".len()..]
                .split(|c: char| c.is_whitespace() || c == ',')
                .next()
                .unwrap_or("")
                .split('+')
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    Stats { program, instructions, processed, limit, stack_depth, verification_usec: number_after(log, "verification time ") }
}

/// `programs` of `object`, loaded with statistics, named with `prefix`.
/// With `read` the object as the agent loads it on this kernel (reading the skb's checksum
/// state where it can), without it as kernels before 6.2 run it.
fn measure(object: &[u8], programs: &[&str], prefix: &str, read: bool) -> Vec<Stats> {
    let layout = if read { meshnet::datapath::skb_layout() } else { None };
    let (mut object, _) = meshnet::datapath::prepare_object(object, layout.as_ref()).expect("rewriting the placeholders");
    let flags = meshnet::datapath::flow_map_flags(meshnet_common::limits::DEFAULT_NAT_ENTRIES);
    meshnet::datapath::set_flow_map_flags(&mut object, flags).expect("setting the flow maps' flags");
    let mut obj = aya_obj::Object::parse(&object).expect("parsing the embedded object");
    // The load-time constant the agent sets (a kernel without bpf_redirect_neigh must never
    // see the helper), in read-only global data the verifier takes as known, as aya loads it.
    let neigh = [meshnet::datapath::have_redirect_neigh()];
    obj.patch_map_data(std::collections::HashMap::from([(names::GLOBAL_HAVE_REDIRECT_NEIGH, (&neigh[..], false))]))
        .expect("setting the load-time constant");
    // The maps, created by aya from the object's own definitions (kept alive while loading).
    let maps: BTreeMap<String, MapData> = obj
        .maps
        .iter()
        .map(|(name, def)| {
            let data = MapData::create(def.clone(), name, None).unwrap_or_else(|e| panic!("creating map {name}: {e}"));
            if name.starts_with(".rodata") {
                raw_bpf::set_global_data(data.fd().as_fd().as_raw_fd(), def.data(), true).unwrap_or_else(|e| panic!("filling {name}: {e}"));
            }
            (name.clone(), data)
        })
        .collect();
    let defs = obj.maps.clone();
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(
        maps.iter().map(|(name, data)| (name.as_str(), data.fd().as_fd().as_raw_fd(), &defs[name])),
        &text_sections,
    )
    .expect("relocating map references");
    obj.relocate_calls(&text_sections).expect("relocating calls");
    programs
        .iter()
        .map(|program| {
            let prog = obj.programs.get(*program).unwrap_or_else(|| panic!("the object has no program {program}"));
            let insns = &obj.functions[&prog.function_key()].instructions;
            let log = load_with_stats(program, insns, &obj.license);
            parse(format!("{prefix}{program}"), insns.len(), &log)
        })
        .collect()
}

#[test]
fn verifier_budget() {
    require_root();
    let release = kernel_release();
    let mut stats =
        measure(EBPF_OBJECT, &[names::PROG_FROM_POD, names::PROG_TO_POD, names::PROG_TUNNEL_IN, names::PROG_EMPTY], "", true);
    // Where this kernel reads the skb's checksum state, the path of kernels before 6.2 too.
    if meshnet::datapath::skb_layout().is_some() {
        stats.extend(measure(EBPF_OBJECT, &[names::PROG_FROM_POD, names::PROG_TO_POD], "helper:", false));
    }
    // The logging build (`--datapath-log`) where the kernel can load it: its translating
    // programs carry a tail call per decision, its line writer aya-log's formatting.
    if meshnet::datapath_log::ring_buffers_supported() {
        stats.extend(measure(EBPF_LOG_OBJECT, &[names::PROG_FROM_POD, names::PROG_TO_POD, names::PROG_LOG], "log:", true));
    } else {
        println!("the logging build is not measured: this kernel has no BPF ring buffers");
    }
    println!("verifier statistics on {release}:");
    println!("{:<22} {:>7} {:>10} {:>9} {:>7} {:>11}", "PROGRAM", "INSNS", "PROCESSED", "OF LIMIT", "STACK", "VERIFY TIME");
    for s in &stats {
        #[allow(clippy::cast_precision_loss)]
        let share = 100.0 * s.processed as f64 / s.limit as f64;
        println!(
            "{:<22} {:>7} {:>10} {:>8.2}% {:>7} {:>11}",
            s.program,
            s.instructions,
            s.processed,
            share,
            s.stack_depth.iter().map(u64::to_string).collect::<Vec<_>>().join("+"),
            s.verification_usec.map_or("-".to_string(), |t| format!("{t} us")),
        );
    }
    if let Some(dir) = std::env::var_os("MESHNET_VERIFIER_STATS_DIR") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let programs: Vec<_> = stats
            .iter()
            .map(|s| {
                json!({
                    "program": s.program,
                    "instructions": s.instructions,
                    "processedInsns": s.processed,
                    "insnLimit": s.limit,
                    "stackDepth": s.stack_depth,
                    "stackDepthTotal": s.stack_depth.iter().sum::<u64>(),
                    "verificationTimeUsec": s.verification_usec,
                })
            })
            .collect();
        let doc = json!({ "kernel": release, "programs": programs });
        let path = dir.join(format!("{release}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        println!("written to {}", path.display());
    }
    for s in &stats {
        assert!(
            s.processed * BUDGET_DIVISOR <= s.limit,
            "{} makes the verifier process {} instructions on {release}: more than a quarter of its limit of {}",
            s.program,
            s.processed,
            s.limit
        );
        assert!(s.processed > 0, "{}: no instruction processed?", s.program);
    }
}
