//! The rule for every YAML text meshnet reads from a ConfigMap or a file (its config, the
//! published peers, holds and status, Istio's meshNetworks): aliases may not make a text
//! much larger than it is. serde_yaml replays an alias as a copy of what its anchor names,
//! and bounds the number of replays, not their size: 14 KB of aliases to one large anchor
//! expand to millions of values, so one edited ConfigMap would take every agent, and the
//! controller, down by memory. A few anchors reused a few times (as operators and Istio's
//! own examples write them) stay well inside the bound. (Remote kubeconfigs have stricter
//! rules of their own: `discovery::kubeconfig` refuses anchors outright.)

use std::collections::{HashMap, HashSet};

use serde_saphyr::granit_parser::{Event, Options, Parser};

/// What aliases may add to a text, beyond as much as it holds itself (what a text twice its
/// length could hold anyway), for small texts: in the units of [`bound_aliases`], about bytes.
const ALIAS_MARGIN: u64 = 64 * 1024;

/// A text refused before it was parsed, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {why}")]
pub struct Refused {
    pub line: usize,
    pub column: usize,
    pub why: &'static str,
}

const TOO_LARGE: &str =
    "YAML aliases (*name) here would expand the text to more than twice its own size, which meshnet refuses: each alias is a copy of its anchor";
const RECURSIVE: &str = "a YAML alias inside the anchor it names, which meshnet refuses: it would copy itself into itself";
const REDEFINED: &str =
    "a YAML anchor name defined twice in one document, which meshnet refuses: YAML parsers disagree on which definition a later alias names";

/// Refuses `text` if its aliases would expand it past twice its own size plus
/// [`ALIAS_MARGIN`]. Sizes are counted on the parser's events: a scalar weighs one plus its
/// length, a list or a map one, an alias what its anchor expands to (aliases inside anchors
/// included), so the count itself costs no more than the text's length. An anchor name
/// defined twice is refused (serde_yaml numbers anchors so that a redefinition makes a later
/// alias name another anchor than the one counted here), and so is a text this parser cannot
/// read at all: whatever another parser would make of it, its aliases were not counted.
pub fn bound_aliases(text: &str) -> Result<(), Refused> {
    // The expanded size of each anchor, and of each collection still open (with its anchor).
    let mut anchors: HashMap<usize, u64> = HashMap::new();
    let mut names: HashSet<String> = HashSet::new();
    let mut open: Vec<(usize, u64)> = Vec::new();
    let (mut own, mut expanded) = (0u64, 0u64);
    let mut options = Options::default();
    options.emit_anchor_events = true;
    for ev in Parser::new_from_str_with_options(text, options) {
        let (event, span) = ev.map_err(|e| Refused {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            why: if matches!(e.kind(), serde_saphyr::granit_parser::ErrorKind::UnknownAnchor) {
                "an alias to no anchor"
            } else {
                "not valid YAML"
            },
        })?;
        let at = |why| Refused { line: span.start.line(), column: span.start.col() + 1, why };
        let nodes = match event {
            Event::DocumentStart(..) => {
                names.clear();
                continue;
            }
            Event::Anchor(_, name) => {
                if !names.insert(name.into_owned()) {
                    return Err(at(REDEFINED));
                }
                continue;
            }
            Event::Scalar(value, _, anchor, _) => {
                let weight = 1 + value.len() as u64;
                if anchor != 0 {
                    anchors.insert(anchor, weight);
                }
                own += weight;
                weight
            }
            Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) => {
                own += 1;
                expanded = expanded.saturating_add(1);
                open.push((anchor, 1));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some((anchor, size)) = open.pop() else { continue };
                if anchor != 0 {
                    anchors.insert(anchor, size);
                }
                if let Some(parent) = open.last_mut() {
                    parent.1 = parent.1.saturating_add(size);
                }
                continue;
            }
            Event::Alias(anchor) => {
                // serde_yaml knows an anchor from its start, and would replay the collection
                // inside itself until its depth limit.
                if open.iter().any(|(a, _)| *a == anchor) {
                    return Err(at(RECURSIVE));
                }
                own += 1;
                anchors.get(&anchor).copied().unwrap_or(1)
            }
            _ => continue,
        };
        expanded = expanded.saturating_add(nodes);
        if let Some(parent) = open.last_mut() {
            parent.1 = parent.1.saturating_add(nodes);
        }
        if expanded > own.saturating_mul(2).saturating_add(ALIAS_MARGIN) {
            return Err(at(TOO_LARGE));
        }
    }
    Ok(())
}

/// A list of 2,001 entries in under 16 KB whose aliases serde_yaml would expand to four
/// million values: for the readers' tests.
#[cfg(test)]
pub(crate) fn alias_bomb() -> String {
    let mut text = format!("- &a {{name: x, podCIDRs: [{}]}}\n", vec!["a"; 2000].join(","));
    for _ in 0..2000 {
        text.push_str("- *a\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_reused_a_few_times_pass_and_garbage_does_not() {
        let reused = "gateways: &gw [{address: 192.0.2.1, port: 15443}]\nnetworks:\n  a: {gateways: *gw}\n  b: {gateways: *gw}\n";
        for ok in ["", "[]", "- name: a\n  podCIDRs: [10.0.0.0/8]\n", reused, "a: '&x *y'\nb: \"*z\"\n", "k: a&b*c\n"] {
            assert_eq!(bound_aliases(ok), Ok(()), "{ok:?}");
        }
        for (bad, line, why) in [("a: *nowhere\n", 1, "an alias to no anchor"), ("a: [unclosed\n", 1, "not valid YAML")] {
            let e = bound_aliases(bad).expect_err(bad);
            assert_eq!((e.line, e.why), (line, why), "{bad:?}: {e}");
        }
    }

    /// The attack: a few kilobytes of aliases to one anchor, which serde_yaml would expand to
    /// millions of values. Refused before serde_yaml sees it, at the alias that crosses the
    /// bound; nested anchors (each doubling the last) likewise.
    #[test]
    fn an_alias_bomb_is_refused_before_any_expansion() {
        let text = alias_bomb();
        assert!(text.len() < 16 * 1024);
        let e = bound_aliases(&text).unwrap_err();
        // The anchor weighs some 4,000; a few dozen aliases take the text past its bound.
        assert!(e.line < 40 && e.why == TOO_LARGE, "{e}");
        // One long string, copied by each alias: weighed by its length.
        let long = format!("- &a \"{}\"\n{}", "x".repeat(100_000), "- *a\n".repeat(100));
        assert_eq!(bound_aliases(&long).unwrap_err().why, TOO_LARGE);
        // A name defined twice: serde_yaml would let the later alias name the large anchor
        // after it, which a count by the parser's ids would not see.
        let redefined = format!("a: &x 0\nb: &x 0\nc: &y [{}]\nd: [*x, *x]\n", vec!["v"; 100].join(","));
        assert_eq!(bound_aliases(&redefined).unwrap_err(), Refused { line: 2, column: 4, why: REDEFINED });
        // An alias inside its own anchor.
        assert_eq!(bound_aliases("- &a [x, x, *a]\n").unwrap_err().why, RECURSIVE);
        // In another document the name is free again.
        assert_eq!(bound_aliases("a: &x 0\nb: *x\n---\nc: &x 1\nd: *x\n"), Ok(()));
        let nested: String =
            std::iter::once("a0: &a0 [x, x]\n".to_string()).chain((1..40).map(|i| format!("a{i}: &a{i} [*a{p}, *a{p}]\n", p = i - 1))).collect();
        assert_eq!(bound_aliases(&nested).unwrap_err().why, TOO_LARGE);
    }
}
