//! The rule for every YAML text meshnet reads from a ConfigMap or a file (its config, the
//! published peers, holds and status, Istio's meshNetworks): aliases may not make a text
//! much larger than it is. serde_yaml replays an alias as a copy of what its anchor names,
//! and bounds the number of replays, not their size: 14 KB of aliases to one large anchor
//! expand to millions of values, so one edited ConfigMap would take every agent, and the
//! controller, down by memory. A few anchors reused a few times (as operators and Istio's
//! own examples write them) stay well inside the bound. (Remote kubeconfigs have stricter
//! rules of their own: `discovery::kubeconfig` refuses anchors outright.)

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// The nodes (scalars, lists, maps) aliases may add to a text, beyond as many as it holds
/// itself: what a text twice its length could hold anyway, and a margin for small ones.
const ALIAS_MARGIN: u64 = 10_000;

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

/// Refuses `text` if its aliases would expand it past twice its own nodes plus
/// [`ALIAS_MARGIN`]. The sizes are counted on the parser's events, one node each, an alias
/// counting as the nodes its anchor expands to (aliases inside anchors included), so the
/// count itself costs no more than the text's length. A text this parser cannot read at all
/// is refused too: whatever another parser would make of it, its aliases were not counted.
pub fn bound_aliases(text: &str) -> Result<(), Refused> {
    // The expanded size of each anchor, and of each collection still open (with its anchor).
    let mut anchors: HashMap<usize, u64> = HashMap::new();
    let mut open: Vec<(usize, u64)> = Vec::new();
    let (mut own, mut expanded) = (0u64, 0u64);
    for ev in Parser::new_from_str(text) {
        let (event, span) = ev.map_err(|e| Refused {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            why: if matches!(e.kind(), serde_saphyr::granit_parser::ErrorKind::UnknownAnchor) {
                "an alias to no anchor"
            } else {
                "not valid YAML"
            },
        })?;
        let nodes = match event {
            Event::Scalar(_, _, anchor, _) => {
                if anchor != 0 {
                    anchors.insert(anchor, 1);
                }
                own += 1;
                1
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
            return Err(Refused { line: span.start.line(), column: span.start.col() + 1, why: TOO_LARGE });
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
        // The anchor holds 2,005 nodes; the sixth alias takes the text past its bound.
        assert_eq!((e.line, e.why), (7, TOO_LARGE));
        let nested: String =
            std::iter::once("a0: &a0 [x, x]\n".to_string()).chain((1..40).map(|i| format!("a{i}: &a{i} [*a{p}, *a{p}]\n", p = i - 1))).collect();
        assert_eq!(bound_aliases(&nested).unwrap_err().why, TOO_LARGE);
    }
}
