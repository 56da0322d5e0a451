//! Seeds the explorer once found violating an invariant, each replayed as it was printed (shrunk),
//! and the full seed it came from. Each must now run clean; the comment says what was wrong.

use cotal_driver_sim::explore::{FaultSet, RunSpec, parse_ranges};
use cotal_driver_sim::mesh::Mesh;
use cotal_driver_sim::world::MeshConfig;

fn spec(seed: u64, steps: usize, faults: &str, daemons: usize, skip: &str) -> RunSpec {
    let mut spec = RunSpec::new(seed, steps, FaultSet::parse(faults).expect("fault list"));
    spec.daemons = daemons;
    spec.skip = parse_ranges(skip).expect("skip ranges");
    spec
}

/// Seed 4363 (issue 16's 10,000-seed run): a leave's tombstone CAS lost to a concurrent write
/// (the `kv` fault), and while the leave re-read and re-planned, the reader transferred a dinbox
/// entry past the planned leave cursor: a DLV copy outside the closed interval (S7-interval).
/// The reader now holds an entry past the cursor of a leave in flight until the tombstone's
/// outcome is known.
#[test]
fn seed_4363_no_copy_past_a_leave_whose_tombstone_is_in_flight() {
    let shrunk = spec(
        4363,
        40,
        "drop,loss,slow,kv,ambiguous",
        1,
        "2-4,6,8,10-11,14-39",
    );
    let (report, _) = shrunk.run(false);
    assert!(report.violation.is_none(), "{:?}", report.violation);
    let full = RunSpec::new(4363, 40, FaultSet::all());
    let (report, _) = full.run(false);
    assert!(report.violation.is_none(), "{:?}", report.violation);
    // The hold is what fixed it: the reader held the entry while the tombstone was re-planned.
    // The run reaches the hold with the daemons' boot as it was when the seed was found: since
    // they read the lease bucket's TTL before acquiring (session 12), one more round trip at
    // boot moves every later step.
    let (config, workload) = shrunk.build(false);
    let config = MeshConfig {
        lease_ttl_from_bucket: false,
        ..config
    };
    let mut mesh = Mesh::new(config, workload);
    let report = mesh.run();
    assert!(report.violation.is_none(), "{:?}", report.violation);
    let held: u64 = mesh
        .daemons()
        .iter()
        .map(|d| d.proc.borrow().daemon().counters().held_for_leave)
        .sum();
    assert!(held >= 1, "the reader never held an entry for the leave");
}
