//! `cargo xtask bench [--quick]`: meshnet's benchmarks. Measures the datapath through
//! `BPF_PROG_TEST_RUN`, end-to-end traffic in network namespaces (meshnet against the
//! untranslated path and against iptables DNAT), and the agent's control plane; writes the
//! raw results as JSON and renders the report (Markdown and SVG plots) from them.
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
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    eprintln!("bench: raw results in {}", json_path.display());
    report::write(&results, &args.out_dir)
}
