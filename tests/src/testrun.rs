//! Helpers shared by the tests that run the programs through `BPF_PROG_TEST_RUN`.

use std::collections::BTreeMap;

/// `TC_ACT_OK`.
pub const OK: u32 = 0;
/// `TC_ACT_SHOT`.
pub const SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`.
pub const REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1).
pub const UNSPEC: u32 = u32::MAX;

#[must_use]
pub fn verdict_name(v: u32) -> String {
    match v {
        OK => "TC_ACT_OK".into(),
        SHOT => "TC_ACT_SHOT".into(),
        REDIRECT => "TC_ACT_REDIRECT".into(),
        UNSPEC => "TC_ACT_UNSPEC".into(),
        other => format!("{other}"),
    }
}

/// Asserts that exactly the counters in `moved` grew, by the given amounts, and no other.
#[track_caller]
pub fn assert_counter_delta(
    what: &str,
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    moved: &[(&str, u64)],
) {
    for (name, _) in moved {
        assert!(after.contains_key(name), "{what}: no counter named {name:?}");
    }
    for (name, now) in after {
        let want = moved.iter().find(|(n, _)| n == name).map_or(0, |(_, d)| *d);
        assert_eq!(now - before[name], want, "{what}: counter {name} grew by {} instead of {want}", now - before[name]);
    }
}

/// Asserts two packets are byte-identical, naming every differing offset.
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let diffs: Vec<String> = (0..got.len().max(want.len()))
            .filter(|&i| got.get(i) != want.get(i))
            .map(|i| format!("@{i}: {:02x?} != {:02x?}", got.get(i), want.get(i)))
            .collect();
        panic!(
            "{what}: packet differs ({} vs {} bytes): {}\n got: {got:02x?}\nwant: {want:02x?}",
            got.len(),
            want.len(),
            diffs.join(", ")
        );
    }
}

