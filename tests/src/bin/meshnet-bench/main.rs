//! `cargo xtask bench [--quick]`: meshnet's benchmarks. Measures the datapath through
//! `BPF_PROG_TEST_RUN` (gateway mode's programs, and tunnel mode's encapsulation and
//! decapsulation), end-to-end traffic in network namespaces (gateway mode against the
//! untranslated path and against iptables DNAT; tunnel mode against plain routing and the
//! kernel's VXLAN device), and the agent's control plane; writes the raw results as JSON and
//! renders the report (Markdown and SVG plots) from them.
//!
//! ```text
//! meshnet-bench [--quick] [--only micro,e2e,control,discovery] [--out-dir DIR]
//! meshnet-bench --render DIR/benchmarks.json [--out-dir DIR]
//! ```
//!
//! Needs root. Every load generator is bounded in count and time and runs inside the
//! network namespaces this program creates, against addresses of those namespaces only.

// Measurement code converts between counts, nanoseconds and floating-point statistics all
// the time; every value here is far from the limits these lints guard.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::format_push_string,
    clippy::too_many_lines,
    clippy::many_single_char_names
)]

mod control;
mod discovery;
mod e2e;
mod micro;
mod micro_tunnel;
mod report;
mod stats;
mod svg;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

struct Args {
    quick: bool,
    only: Vec<String>,
    out_dir: PathBuf,
    render: Option<PathBuf>,
    object: Option<PathBuf>,
    variants: Vec<(String, PathBuf)>,
}

const PARTS: [&str; 4] = ["micro", "e2e", "control", "discovery"];

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { quick: false, only: Vec::new(), out_dir: PathBuf::from("docs"), render: None, object: None, variants: Vec::new() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                let v = it.next().context("--only needs a value")?;
                for part in v.split(',') {
                    if !PARTS.contains(&part) {
                        bail!("--only: {part:?} is not one of {PARTS:?}");
                    }
                    args.only.push(part.to_string());
                }
            }
            "--out-dir" => args.out_dir = it.next().context("--out-dir needs a value")?.into(),
            // Measure another build of the datapath (e.g. a cargo-feature variant) in the
            // datapath part instead of the embedded object.
            "--object" => args.object = Some(it.next().context("--object needs a value")?.into()),
            // A benchmark-only build of the datapath for the cost breakdown: FEATURE=PATH.
            "--variant" => {
                let v = it.next().context("--variant needs FEATURE=PATH")?;
                let (name, path) = v.split_once('=').context("--variant needs FEATURE=PATH")?;
                args.variants.push((name.to_string(), path.into()));
            }
            "--render" => args.render = Some(it.next().context("--render needs a value")?.into()),
            "-h" | "--help" => {
                println!("usage: meshnet-bench [--quick] [--only micro,e2e,control,discovery] [--out-dir DIR] | --render JSON [--out-dir DIR]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshnet-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The key of each part in the results.
fn section(part: &str) -> &str {
    if part == "micro" {
        "datapath"
    } else {
        part
    }
}

/// A run of some parts only (`--only`) goes into the earlier results in place of those parts,
/// so that the report keeps the sections it did not measure; the note says which is which.
fn merge(mut earlier: Value, run: &Value, only: &[String]) -> Value {
    let old_meta = earlier["meta"].clone();
    for part in only {
        earlier[section(part)] = run[section(part)].clone();
    }
    let kept: Vec<&str> =
        PARTS.iter().copied().filter(|p| !only.iter().any(|o| o == p) && earlier[section(p)].is_object()).collect();
    let mut note = format!(
        "This run measured only {} (`--only {}`). {} kept from the earlier results of this file \
         (run of {}, commit {}).",
        only.join(", "),
        only.join(","),
        if kept.is_empty() { "Nothing else was".to_string() } else { format!("The other sections ({}) are", kept.join(", ")) },
        old_meta["date"].as_str().unwrap_or("?"),
        old_meta["git"].as_str().unwrap_or("?"),
    );
    if let Some(old) = old_meta["note"].as_str() {
        note.push_str(&format!(" The earlier results' note, which may speak of sections measured again since: {old}"));
    }
    let mut merged = earlier;
    merged["meta"] = run["meta"].clone();
    merged["meta"]["note"] = json!(note);
    merged
}

fn real_main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(json_path) = &args.render {
        let text = std::fs::read_to_string(json_path).with_context(|| format!("reading {}", json_path.display()))?;
        let results: Value = serde_json::from_str(&text)?;
        return report::write(&results, &args.out_dir);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks need root (eBPF, network namespaces): run `cargo xtask bench` as root");
    }
    let wanted = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let started = Instant::now();
    let mut results = json!({ "meta": report::machine_meta(args.quick) });
    if wanted("micro") {
        let mut params = micro::Params::new(args.quick);
        if let Some(path) = &args.object {
            params.object = Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
            results["meta"]["object"] = json!(path.display().to_string());
        }
        for (name, path) in &args.variants {
            params.variants.push((name.clone(), std::fs::read(path).with_context(|| format!("reading {}", path.display()))?));
        }
        results["datapath"] = micro::run(&params)?;
    }
    if wanted("e2e") {
        results["e2e"] = e2e::run(&e2e::Params::new(args.quick))?;
        results["e2e"]["meta"] = json!({"date": results["meta"]["date"], "git": results["meta"]["git"], "mode": results["meta"]["mode"], "load_before": results["meta"]["load_before"]});
    }
    if wanted("control") {
        results["control"] = control::run(&control::Params::new(args.quick))?;
    }
    if wanted("discovery") {
        results["discovery"] = discovery::run(&discovery::Params::new(args.quick))?;
        results["discovery"]["meta"] = json!({"date": results["meta"]["date"], "git": results["meta"]["git"]});
    }
    results["meta"]["seconds"] = json!(stats::round(started.elapsed().as_secs_f64()));
    results["meta"]["load_after"] = json!(report::loadavg());
    std::fs::create_dir_all(&args.out_dir)?;
    let json_path = args.out_dir.join("benchmarks.json");
    if !args.only.is_empty() {
        if let Ok(text) = std::fs::read_to_string(&json_path) {
            let earlier: Value = serde_json::from_str(&text).with_context(|| format!("reading {}", json_path.display()))?;
            results = merge(earlier, &results, &args.only);
        }
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    eprintln!("bench: raw results in {}", json_path.display());
    report::write(&results, &args.out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_only_run_replaces_its_sections_and_keeps_the_others() {
        let earlier = json!({"meta": {"date": "D0", "git": "g0", "note": "old"}, "datapath": {"x": 1}, "e2e": {"y": 1}, "control": {"z": 1}});
        let run = json!({"meta": {"date": "D1", "git": "g1"}, "e2e": {"y": 2}});
        let m = merge(earlier, &run, &["e2e".to_string()]);
        assert_eq!(m["e2e"]["y"], 2);
        assert_eq!(m["datapath"]["x"], 1);
        assert_eq!(m["control"]["z"], 1);
        assert_eq!(m["meta"]["date"], "D1");
        let note = m["meta"]["note"].as_str().unwrap();
        assert!(note.contains("micro, control") && note.contains("D0") && note.contains("old"), "{note}");
    }
}
