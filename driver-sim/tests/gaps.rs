//! Proof that the oracle sees the reference gaps the core fixes: for each gap, a switch restores
//! the reference's behaviour ([`Mutation`]), the oracle reports the right invariant within a
//! bounded number of seeds, and the same seed is clean with the fix on. (G1 lives in
//! `explore.rs`.)

// Test helpers report through panics and prints.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use cotal_driver_sim::explore::{FaultSet, RunSpec};
use cotal_driver_sim::mesh::Mutation;
use cotal_driver_sim::oracle::Violation;

/// Runs seeds `0..seeds` with `mutation` until the oracle reports a violation; then checks it
/// names `invariant` and that the same seed passes with the fix on.
fn caught_within(
    mutation: Mutation,
    faults: &FaultSet,
    steps: usize,
    seeds: u64,
    invariant: &str,
) -> (u64, Violation) {
    let mut caught = None;
    for seed in 0..seeds {
        let mut spec = RunSpec::new(seed, steps, faults.clone());
        spec.mutation = mutation;
        if let Some(v) = spec.run(false).0.violation {
            caught = Some((seed, v));
            break;
        }
    }
    let (seed, v) = caught.unwrap_or_else(|| {
        panic!(
            "the oracle sees {} within {seeds} seeds",
            mutation.name()
        )
    });
    let mut spec = RunSpec::new(seed, steps, faults.clone());
    spec.mutation = mutation;
    assert_eq!(
        v.invariant,
        invariant,
        "{v}\nreplay: cargo run -p cotal-driver-sim --bin cotal-sim -- {}",
        spec.replay_args()
    );
    let fixed = RunSpec::new(seed, steps, faults.clone());
    assert_eq!(
        fixed.run(false).0.violation,
        None,
        "seed {seed} passes with the fix"
    );
    eprintln!("{}: seed {seed}: {v}", mutation.name());
    (seed, v)
}

/// G10: with the leave skipping the tombstone (the reference's stale cached class `live`), the
/// agent answers the leave while its membership stays open and DLV copies keep coming; the
/// oracle must see that (I15, leave ordering). With the fix on, the same seed passes.
#[test]
fn g10_the_oracle_fails_when_the_leave_skips_the_tombstone() {
    caught_within(Mutation::ReferenceG10, &FaultSet::default(), 40, 200, "I15");
}
