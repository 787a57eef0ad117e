//! Golden files: expected output checked in under `src/testdata`. `UPDATE_GOLDEN=1` rewrites
//! them from what the code gives now, for a reviewer to read in the diff.

use std::path::PathBuf;

/// Compares `actual` with `src/testdata/NAME`.
#[track_caller]
pub fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/testdata").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(actual, expected, "{name} differs from the golden file (UPDATE_GOLDEN=1 to accept)");
}
