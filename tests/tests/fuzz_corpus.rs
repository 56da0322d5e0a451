//! Replays the committed seed corpus (`fuzz/seeds/<target>/`, written by `fuzz/make_seeds.py`)
//! through the same entry points the cargo-fuzz targets call, so every `cargo test` exercises them
//! without libFuzzer. A developer's local grown corpus (`fuzz/corpus/<target>/`, not committed) is
//! replayed too when it exists.

use cotal_tests::fuzz_entry;
use std::path::Path;

fn replay_dir(target: &str, dir: &Path, run: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
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
    n
}

fn replay(target: &str, run: fn(&[u8]), at_least: usize) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let seeds = replay_dir(target, &fuzz.join("seeds").join(target), run);
    assert!(
        seeds >= at_least,
        "seed corpus {target} has {seeds} inputs, expected at least {at_least}"
    );
    replay_dir(target, &fuzz.join("corpus").join(target), run);
}

#[test]
fn subject_corpus() {
    replay("subject", fuzz_entry::subject, 30);
}

#[test]
fn channel_corpus() {
    replay("channel", fuzz_entry::channel, 15);
}

#[test]
fn message_corpus() {
    replay("message", fuzz_entry::message, 15);
}

#[test]
fn plane3_entry_corpus() {
    replay("plane3_entry", fuzz_entry::plane3_entry, 15);
}

#[test]
fn membership_record_corpus() {
    replay("membership_record", fuzz_entry::membership_record, 15);
}

#[test]
fn acl_record_corpus() {
    replay("acl_record", fuzz_entry::acl_record, 15);
}

#[test]
fn delivery_lease_corpus() {
    replay("delivery_lease", fuzz_entry::delivery_lease, 15);
}

#[test]
fn presence_corpus() {
    replay("presence", fuzz_entry::presence, 15);
}

#[test]
fn channel_config_corpus() {
    replay("channel_config", fuzz_entry::channel_config, 15);
}

#[test]
fn control_request_corpus() {
    replay("control_request", fuzz_entry::control_request, 15);
}

#[test]
fn control_reply_corpus() {
    replay("control_reply", fuzz_entry::control_reply, 15);
}

#[test]
fn msg_id_corpus() {
    replay("msg_id", fuzz_entry::msg_id, 15);
}

#[test]
fn control_gate_corpus() {
    replay("control_gate", fuzz_entry::control_gate, 15);
}

#[test]
fn reader_entry_corpus() {
    replay("reader_entry", fuzz_entry::reader_entry, 15);
}

#[test]
fn loss_record_corpus() {
    replay("loss_record", fuzz_entry::loss_record, 7);
}
