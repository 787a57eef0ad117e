//! The operator guides in docs/ against the code: every `meshnet` command line they show
//! parses with the binary's own CLI, every relative link and `deploy/` path exists, the
//! `meshnet doctor` check names and the metric names they cite are the ones the code uses.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The operator guides. (Generated docs, such as the benchmark report, are not checked here.)
const GUIDES: [&str; 4] = ["architecture.md", "istio.md", "kernel-upgrade.md", "operations.md"];

fn docs() -> Vec<(PathBuf, String)> {
    GUIDES
        .iter()
        .map(|name| {
            let p = root().join("docs").join(name);
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

/// `meshnet ...` command lines: in fenced code blocks (also after `kubectl exec ... --`) and
/// in inline code spans.
fn invocations(md: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            let t = line.trim();
            if t.starts_with("meshnet ") {
                found.push(t.to_string());
            } else if let Some((_, rest)) = t.split_once(" -- meshnet ") {
                found.push(format!("meshnet {rest}"));
            }
        } else {
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 && span.starts_with("meshnet ") {
                    found.push(span.to_string());
                }
            }
        }
    }
    found
        .into_iter()
        .map(|c| {
            let mut c = c.as_str();
            for stop in [" | ", " #", " &&", " >", " 2>", " &"] {
                if let Some(i) = c.find(stop) {
                    c = &c[..i];
                }
            }
            c.trim().to_string()
        })
        .collect()
}

/// A command with a placeholder (`FILE`, `SRC_IP[:PORT]`, `[a|b]`, `...`) documents a syntax,
/// not a runnable line.
fn is_concrete(cmd: &str) -> bool {
    !cmd.contains(['<', '[', '|', '$', '…']) && !cmd.contains("...")
        && !cmd.split_whitespace().any(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase() || c == '_' || c == ':'))
}

#[test]
fn every_meshnet_command_in_the_docs_parses() {
    let bin = meshnet_tests::meshnet_bin();
    let mut checked = 0;
    for (path, text) in docs() {
        for cmd in invocations(&text).into_iter().filter(|c| is_concrete(c)) {
            let args: Vec<String> = cmd.split_whitespace().skip(1).map(|w| w.trim_matches(['\'', '"']).to_string()).collect();
            // clap parses and validates every argument before it acts on a trailing --help,
            // so this checks the line without running it.
            let out = Command::new(&bin).args(&args).arg("--help").output().unwrap();
            assert!(
                out.status.success(),
                "{}: `{cmd}` is not a valid meshnet command line:\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} meshnet command lines found in docs/");
}

/// GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes.
fn anchors(md: &str) -> Vec<String> {
    md.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn links_and_deploy_paths_exist() {
    for (path, text) in docs() {
        let dir = path.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let target = &text[i + 2..];
            let target = &target[..target.find(')').unwrap()];
            if target.starts_with("http") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let file = if file.is_empty() { path.clone() } else { dir.join(file) };
            assert!(file.exists(), "{}: link to {target}, which does not exist", path.display());
            if !anchor.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let heads = anchors(&std::fs::read_to_string(&file).unwrap());
                assert!(heads.iter().any(|h| h == anchor), "{}: no heading #{anchor} in {}", path.display(), file.display());
            }
        }
        for (i, _) in text.match_indices("deploy/") {
            if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
                continue;
            }
            let rest = &text[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c))).unwrap_or(rest.len());
            let p = rest[..end].trim_end_matches(['.', ',']);
            // `deploy/meshnet-controller` is kubectl's TYPE/NAME, not a path.
            let last = p.rsplit('/').next().unwrap_or_default();
            if !(last.is_empty() || last.contains('.') || last == "Dockerfile") {
                continue;
            }
            assert!(root().join(p).exists(), "{}: mentions {p}, which does not exist", path.display());
        }
    }
}

/// The check names docs/kernel-upgrade.md and docs/operations.md cite are doctor's.
#[test]
fn doctor_check_names_are_the_codes() {
    let doctor = std::fs::read_to_string(root().join("meshnet-user/src/doctor.rs")).unwrap();
    let all: String = docs().into_iter().map(|(_, t)| t).collect();
    for name in [
        "kernel version",
        "kernel BTF",
        "map type {what}",
        "LPM trie (remote CIDRs)",
        "hash (flow state, peers)",
        "flow table",
        "per-CPU array (counters)",
        "program type SchedClassifier (tc)",
        "attach path",
        "bpffs",
        "pinned maps",
        "capabilities",
        "config",
        "interfaces {pattern:?}",
        "bridges",
        "masquerade",
        "tunnel uplinks",
        "tunnel port",
        "tunnel FORWARD rules",
    ] {
        assert!(doctor.contains(&format!("\"{name}\"")), "doctor.rs has no check named {name:?}");
        let shown = name.replace("{what}", "").replace("{pattern:?}", "\"veth*\"");
        assert!(all.contains(shown.trim()), "docs/ never name doctor's check {shown:?}");
    }
}

/// Every `meshnet_*` metric docs/operations.md lists is registered under that name.
#[test]
fn metric_names_are_the_registered_ones() {
    let ops = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let agent = std::fs::read_to_string(root().join("meshnet-user/src/metrics.rs")).unwrap();
    let controller = std::fs::read_to_string(root().join("meshnet-user/src/discovery/probes.rs")).unwrap();
    let mut seen = 0;
    for (i, _) in ops.match_indices("`meshnet_") {
        let name = &ops[i + 1..];
        let name = &name[..name.find('`').unwrap()];
        let name = &name[..name.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(name.len())];
        let (source, rest) = match name.strip_prefix("meshnet_controller_") {
            Some(rest) => (&controller, rest),
            None => (&agent, name.strip_prefix("meshnet_").unwrap()),
        };
        // prometheus-client appends _total to counters.
        let base = rest.strip_suffix("_total").unwrap_or(rest);
        assert!(source.contains(&format!("register(\"{base}\"")) || source.contains(&format!("\"{base}\",")), "{name} is not a registered metric");
        seen += 1;
    }
    assert!(seen >= 13, "only {seen} metric names found in docs/operations.md");
}
