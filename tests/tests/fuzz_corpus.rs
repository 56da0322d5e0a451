//! Replays the committed cargo-fuzz corpus (`fuzz/corpus/<target>/`) through the same entry points
//! the fuzz targets call, so every `cargo test` exercises them without libFuzzer.

use cotal_tests::fuzz_entry;
use std::path::Path;

fn replay(target: &str, run: fn(&[u8]), at_least: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()));
    let mut n = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("read corpus input");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "fuzz target {target} panicked on {}",
            path.display()
        );
        n += 1;
    }
    assert!(
        n >= at_least,
        "corpus {target} has {n} inputs, expected at least {at_least}"
    );
}

#[test]
fn subject_corpus() {
    replay("subject", fuzz_entry::subject, 30);
}

#[test]
fn channel_corpus() {
    replay("channel", fuzz_entry::channel, 20);
}
