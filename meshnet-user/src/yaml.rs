//! The rule for every YAML text meshnet reads from a ConfigMap or a file (its config, the
//! published peers, holds and status, Istio's meshNetworks): no anchors and no aliases.
//! serde_yaml replays an alias as a copy of what its anchor names and bounds the number of
//! replays, not their size: 14 KB of aliases to one large anchor expand to millions of
//! values, so one edited ConfigMap would take every agent, and the controller, down by
//! memory. Nothing meshnet writes uses them. (Remote kubeconfigs have stricter rules of
//! their own: `discovery::kubeconfig`.)

use serde_saphyr::granit_parser::{Event, Parser};

/// A text refused before it was parsed, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {why}")]
pub struct Refused {
    pub line: usize,
    pub column: usize,
    pub why: &'static str,
}

const ALIAS: &str = "a YAML alias (*name), which meshnet does not accept: each one is expanded into a copy of its anchor";
const ANCHOR: &str = "a YAML anchor (&name), which meshnet does not accept (nor the aliases that would copy it)";

/// Refuses `text` if it defines an anchor or uses an alias. A text this parser cannot read at
/// all is refused too: whatever another parser would make of it, its aliases were not seen.
pub fn refuse_aliases(text: &str) -> Result<(), Refused> {
    for ev in Parser::new_from_str(text) {
        let (event, span) = ev.map_err(|e| Refused {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            why: if matches!(e.kind(), serde_saphyr::granit_parser::ErrorKind::UnknownAnchor) { ALIAS } else { "not valid YAML" },
        })?;
        let why = match event {
            Event::Alias(_) | Event::UnresolvedAlias(_) => ALIAS,
            Event::Anchor(..) => ANCHOR,
            Event::Scalar(_, _, anchor, _) | Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) if anchor != 0 => {
                ANCHOR
            }
            _ => continue,
        };
        return Err(Refused { line: span.start.line(), column: span.start.col() + 1, why });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_and_aliases_are_refused_and_plain_yaml_passes() {
        for ok in ["", "[]", "- name: a\n  podCIDRs: [10.0.0.0/8]\n", "networks: {}\n", "a: '&x *y'\nb: \"*z\"\n", "k: a&b*c\n"] {
            assert_eq!(refuse_aliases(ok), Ok(()), "{ok:?}");
        }
        for (bad, line, why) in [
            ("- &a {name: x}\n- *a\n", 1, ANCHOR),
            ("a: 1\nb: &s text\n", 2, ANCHOR),
            ("a: &l [1, 2]\n", 1, ANCHOR),
            ("a: *nowhere\n", 1, ALIAS),
            ("a: [unclosed\n", 1, "not valid YAML"),
        ] {
            let e = refuse_aliases(bad).expect_err(bad);
            assert_eq!((e.line, e.why), (line, why), "{bad:?}: {e}");
        }
    }

    /// The attack: a few kilobytes of aliases to one anchor, which serde_yaml would expand to
    /// millions of values. Refused before serde_yaml sees it.
    #[test]
    fn an_alias_bomb_is_refused_before_any_expansion() {
        let mut text = format!("- &a {{name: x, podCIDRs: [{}]}}\n", vec!["a"; 2000].join(","));
        for _ in 0..2000 {
            text.push_str("- *a\n");
        }
        assert!(text.len() < 16 * 1024);
        let e = refuse_aliases(&text).unwrap_err();
        assert_eq!((e.line, e.why), (1, ANCHOR));
    }
}
