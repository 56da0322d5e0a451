//! The vendored fixtures must be byte-identical to the shared spec copy when it is present.

use cotal_tests::{fixtures_dir, shared_fixtures_dir};

#[test]
fn vendored_fixtures_match_the_shared_spec() {
    let Some(shared) = shared_fixtures_dir() else {
        // A clone without `../shared` has only the vendored copy; nothing to compare against.
        eprintln!("../shared/spec/wire-fixtures not present; vendored copy used as is");
        return;
    };
    let mut compared = 0;
    for entry in std::fs::read_dir(&shared).expect("read shared fixtures") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        let ours = std::fs::read(fixtures_dir().join(&name))
            .unwrap_or_else(|e| panic!("vendored fixture {name:?} missing: {e}"));
        let theirs = std::fs::read(entry.path()).expect("read shared fixture");
        assert!(
            ours == theirs,
            "vendored fixture {name:?} differs from ../shared"
        );
        compared += 1;
    }
    assert!(
        compared >= 20,
        "expected the full fixture set, compared {compared}"
    );
}
