//! Proof that the oracle sees the reference gaps the core fixes: for each gap, a switch restores
//! the reference's behaviour ([`Mutation`]), the oracle reports the right invariant (within a
//! bounded number of seeds, or in a scripted scenario), and the same seed or scenario is clean
//! with the fix on. G1 lives in `explore.rs`.

// Test helpers report through panics and prints.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use cotal_core::delivery::authorize::DropReason;
use cotal_core::delivery::daemon::DeliveryEvent;
use cotal_core::time::Instant;
use cotal_core::wire::token::Channel;
use cotal_driver_sim::explore::{FaultSet, RunSpec};
use cotal_driver_sim::mesh::{
    Action, ChannelSpec, Mesh, MeshConfig, Mutation, RunReport, Step, Workload,
};
use cotal_driver_sim::oracle::Violation;
use cotal_driver_sim::sched::FaultConfig;

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
    let (seed, v) = caught
        .unwrap_or_else(|| panic!("the oracle sees {} within {seeds} seeds", mutation.name()));
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

/// The G2 scenario, with the daemon's connection lost `offset` ms after alice's post: bob, a
/// durable member of `ops` (replay off, so a rejoin backfills nothing), is disconnected while
/// alice posts; the daemon fans the post out to bob's dinbox and then loses its connection, so
/// the reader's delivery of the entry waits for redelivery; meanwhile bob reconnects, leaves and
/// rejoins (generation 2, `J' ≥ s`). Only the redelivered generation-1 entry can bring the post
/// to bob. Returns the report and whether a daemon dropped a generation-1 entry as outside the
/// interval.
fn g2_scenario(mutation: Mutation, seed: u64, offset: u64) -> (RunReport, bool) {
    const OPS: usize = 1;
    let (alice, bob) = (0, 1);
    let mut config = MeshConfig::new(seed);
    config.agents = 2;
    config.channels = vec![
        ChannelSpec {
            channel: Channel::new("lobby").unwrap(),
            durable: false,
            replay: true,
        },
        ChannelSpec {
            channel: Channel::new("ops").unwrap(),
            durable: true,
            replay: false,
        },
    ];
    config.daemons = 1;
    config.faults = FaultConfig::default();
    config.mutation = mutation;
    let steps = [
        (1_000, Action::Lose { agent: bob }),
        (
            1_001,
            Action::Post {
                agent: alice,
                channel: OPS,
                mention: None,
            },
        ),
        (1_001 + offset, Action::LoseDaemon { daemon: 0 }),
        (
            3_000,
            Action::Leave {
                agent: bob,
                channel: OPS,
            },
        ),
        (
            3_500,
            Action::Join {
                agent: bob,
                channel: OPS,
            },
        ),
    ];
    let workload = Workload {
        boot: vec![vec![], vec![OPS]],
        acl: vec![vec![0, 1], vec![0, 1]],
        steps: steps
            .iter()
            .map(|(ms, action)| Step {
                at: Instant::from_millis(*ms),
                action: action.clone(),
            })
            .collect(),
    };
    let mut mesh = Mesh::new(config, workload);
    let report = mesh.run();
    let dropped_old_generation = mesh.journal().daemon_events.iter().any(|d| {
        matches!(
            &d.event,
            DeliveryEvent::EntryDropped {
                generation: 1,
                reason: DropReason::OutsideInterval(_),
                ..
            }
        )
    });
    (report, dropped_old_generation)
}

/// G2: with the reader judging entries by the record's current interval (the reference), the
/// pending generation-1 entry is dropped after bob's rejoin and the post never reaches him; the
/// oracle must see that (S7-complete). With the fix on, every offset of the sweep is clean and
/// no generation-1 entry is dropped.
#[test]
fn g2_the_oracle_fails_when_the_reader_ignores_the_entry_generation() {
    let mut caught = Vec::new();
    // The window moves with the seeded latencies (and with every command the daemon adds), so
    // a few seeds are swept, each over 20 offsets.
    for seed in 1..=4 {
        for offset in 0..20 {
            let (fixed, fixed_dropped) = g2_scenario(Mutation::None, seed, offset);
            assert_eq!(
                fixed.violation, None,
                "seed {seed} offset {offset} passes with the fix"
            );
            assert!(
                !fixed_dropped,
                "seed {seed} offset {offset}: the fix keeps generation 1's entry"
            );
            let (report, dropped) = g2_scenario(Mutation::ReferenceG2, seed, offset);
            if let Some(v) = report.violation {
                assert_eq!(
                    v.invariant, "S7-complete",
                    "seed {seed} offset {offset}: {v}"
                );
                assert!(
                    dropped,
                    "seed {seed} offset {offset}: the loss is the reader's drop: {v}"
                );
                caught.push((seed, offset));
            }
        }
    }
    // The daemon must lose its connection after the fan-out published the entry and before the
    // reader settled it: a window of a few milliseconds.
    assert!(
        !caught.is_empty(),
        "the oracle sees the G2 gap for some seed and daemon-loss offset"
    );
    eprintln!("reference-g2: caught at offsets {caught:?}");
}

/// The G23 scenario, with the lease holder frozen `offset` ms after alice's leave: two daemons
/// serve the space (one holds the lease, the other contends and is restarted by the supervisor
/// until it wins); alice is a durable member of `ops` from boot and leaves it at 2 s; the holder
/// receives the leave and starts its reads, then stalls for 45 s (longer than the 30 s lease
/// TTL) with the job in its hands. The successor acquires the lease when the stalled holder's
/// write expires. At the thaw the stalled daemon holds a read answer and may write the
/// tombstone. Returns the report and whether a daemon abandoned a job (no fencing token).
fn g23_scenario(mutation: Mutation, offset: u64) -> (RunReport, bool) {
    const OPS: usize = 1;
    let alice = 0;
    let mut config = MeshConfig::new(23);
    config.agents = 2;
    config.daemons = 2;
    config.faults = FaultConfig::default();
    config.mutation = mutation;
    let steps = [
        (
            2_000,
            Action::Leave {
                agent: alice,
                channel: OPS,
            },
        ),
        (2_000 + offset, Action::FreezeHolder { ms: 45_000 }),
    ];
    let workload = Workload {
        boot: vec![vec![OPS], vec![]],
        acl: vec![vec![0, 1], vec![0, 1]],
        steps: steps
            .iter()
            .map(|(ms, action)| Step {
                at: Instant::from_millis(*ms),
                action: action.clone(),
            })
            .collect(),
    };
    let mut mesh = Mesh::new(config, workload);
    let report = mesh.run();
    let abandoned = mesh
        .journal()
        .daemon_events
        .iter()
        .any(|d| matches!(&d.event, DeliveryEvent::Abandoned { .. }));
    (report, abandoned)
}

fn abandoned_here(abandons: &[u64], offset: u64) -> bool {
    abandons.contains(&offset)
}

/// G23: with the lease keeping no deadline of its own (the reference: loss is noticed only when
/// a renew CAS fails), a daemon stalled past the TTL resumes and writes alice's tombstone while
/// its successor holds the lease; the oracle must see that (I30, from the server's attribution
/// of the write to the stalled daemon's connection). With the fix on, every offset of the sweep
/// is clean: the stalled daemon's token is withdrawn at its own deadline and the job is
/// abandoned.
#[test]
fn g23_the_oracle_fails_when_a_stalled_daemon_keeps_its_fencing_token() {
    let (mut caught, mut abandons) = (Vec::new(), Vec::new());
    for offset in 0..20 {
        let (fixed, abandoned) = g23_scenario(Mutation::None, offset);
        assert_eq!(fixed.violation, None, "offset {offset} passes with the fix");
        if abandoned {
            abandons.push(offset);
        }
        let (report, _) = g23_scenario(Mutation::ReferenceG23, offset);
        if let Some(v) = report.violation {
            assert_eq!(v.invariant, "I30", "offset {offset}: {v}");
            assert!(
                abandoned_here(&abandons, offset),
                "offset {offset}: with the fix the stalled daemon abandons the same job"
            );
            if caught.is_empty() {
                eprintln!("reference-g23 offset {offset}: {v}");
            }
            caught.push(offset);
        }
    }
    assert!(
        !caught.is_empty(),
        "the oracle sees the G23 gap for some freeze offset"
    );
    eprintln!("reference-g23: caught at offsets {caught:?}; the fix abandoned at {abandons:?}");
}

/// Every mutation's command-line name parses back to it, and a replay of a mutated spec names it.
#[test]
fn mutation_names_round_trip() {
    for m in Mutation::ALL {
        assert_eq!(Mutation::parse(m.name()), Some(m));
        let mut spec = RunSpec::new(1, 5, FaultSet::default());
        spec.mutation = m;
        assert!(
            spec.replay_args()
                .ends_with(&format!("--mutation {}", m.name()))
        );
    }
    assert_eq!(Mutation::parse("none"), Some(Mutation::None));
    assert_eq!(Mutation::parse("bogus"), None);
}

/// The shrinker on a planted violation (G10 switched off, seed 0, 40 steps): the shrunk spec is
/// strictly smaller (fewer steps played, and fewer agents or fewer mentions: the reductions
/// beyond dropping steps), still fails the same invariant, and replays bit for bit.
#[test]
fn shrink_makes_a_planted_violation_strictly_smaller() {
    let mut spec = RunSpec::new(0, 40, FaultSet::default());
    spec.mutation = Mutation::ReferenceG10;
    let (report, _) = spec.run(false);
    let v = report
        .violation
        .expect("seed 0 fails with G10 switched off");
    let shrunk = cotal_driver_sim::explore::shrink(&spec, v.invariant, 60);
    eprintln!(
        "shrunk {} -> {}: {} -> {} steps, {} -> {} agents, {} mentions removed",
        spec.replay_args(),
        shrunk.replay_args(),
        spec.live_steps(),
        shrunk.live_steps(),
        spec.agent_count(),
        shrunk.agent_count(),
        shrunk.plain.len()
    );
    assert!(shrunk.live_steps() < spec.live_steps(), "fewer steps");
    assert!(
        shrunk.agent_count() < spec.agent_count() || !shrunk.plain.is_empty(),
        "a reduction beyond dropping steps applied"
    );
    let (a, _) = shrunk.run(false);
    let (b, _) = shrunk.run(false);
    assert_eq!(
        a.violation.as_ref().map(|v| v.invariant),
        Some(v.invariant),
        "the shrunk case still fails the same invariant"
    );
    assert_eq!(a.hash, b.hash, "the shrunk case replays bit for bit");
    assert_eq!(a.violation, b.violation);
}

/// The shrinker's reductions remove from the seed's own workload: fewer agents drops exactly
/// the steps of the others and the mentions of them; a plain step loses only its mention.
#[test]
fn shrunk_specs_remove_from_the_seed_workload() {
    let spec = RunSpec::new(7, 60, FaultSet::default());
    let (config, full) = spec.build(false);
    assert!(config.agents >= 2);
    let mentioned = full
        .steps
        .iter()
        .position(|s| {
            matches!(
                s.action,
                Action::Post {
                    mention: Some(_),
                    ..
                }
            )
        })
        .expect("seed 7 has a post with a mention");
    let mut plain = spec.clone();
    plain.plain.insert(mentioned);
    let (_, w) = plain.build(false);
    assert_eq!(w.steps.len(), full.steps.len());
    for (i, (a, b)) in full.steps.iter().zip(&w.steps).enumerate() {
        match (&a.action, &b.action) {
            (
                Action::Post {
                    mention: Some(_), ..
                },
                Action::Post { mention: None, .. },
            ) if i == mentioned => {}
            _ => assert_eq!(a, b, "step {i} unchanged"),
        }
    }
    let mut one = spec.clone();
    one.agents = Some(1);
    let (c1, w1) = one.build(false);
    assert_eq!((c1.agents, w1.acl.len(), w1.boot.len()), (1, 1, 1));
    let kept: Vec<_> = full
        .steps
        .iter()
        .filter(|s| match s.action {
            Action::Join { agent, .. }
            | Action::Leave { agent, .. }
            | Action::Post { agent, .. }
            | Action::Narrow { agent, .. }
            | Action::Restart { agent }
            | Action::Lose { agent }
            | Action::Away { agent, .. } => agent == 0,
            _ => true,
        })
        .collect();
    assert_eq!(w1.steps.len(), kept.len());
    assert!(w1.steps.len() < full.steps.len());
    assert!(
        w1.steps
            .iter()
            .all(|s| !matches!(s.action, Action::Post { mention: Some(m), .. } if m >= 1))
    );
}

/// The G17 scenario (issue 15 item 3): bob (a1) is away for 60 s from 1 s — longer than the
/// presence bucket's TTL, so his key expires — and the daemon restarts at 8 s, rebuilding its
/// roster from the keys the bucket still holds once it wins the lease again (after the killed
/// holder's lease expires, still within bob's absence). At 9 s alice posts on the live channel
/// `lobby` mentioning bob. Returns the report and the daemons' unresolved-mention events.
fn g17_scenario(mutation: Mutation) -> (RunReport, usize) {
    const LOBBY: usize = 0;
    let (alice, bob) = (0, 1);
    let mut config = MeshConfig::new(17);
    config.agents = 2;
    config.daemons = 1;
    config.faults = FaultConfig::default();
    config.mutation = mutation;
    let steps = [
        (
            1_000,
            Action::Away {
                agent: bob,
                ms: 60_000,
            },
        ),
        (8_000, Action::RestartDaemon { daemon: 0 }),
        (
            9_000,
            Action::Post {
                agent: alice,
                channel: LOBBY,
                mention: Some(bob),
            },
        ),
    ];
    let workload = Workload {
        boot: vec![vec![LOBBY], vec![LOBBY]],
        acl: vec![vec![0, 1], vec![0, 1]],
        steps: steps
            .iter()
            .map(|(ms, action)| Step {
                at: Instant::from_millis(*ms),
                action: action.clone(),
            })
            .collect(),
    };
    let mut mesh = Mesh::new(config, workload);
    let report = mesh.run();
    let unresolved = mesh
        .journal()
        .daemon_events
        .iter()
        .filter(|d| matches!(&d.event, DeliveryEvent::MentionUnresolved { .. }))
        .count();
    (report, unresolved)
}

/// G17: with the reference's resolution, a mention of a member whose presence expired before
/// the daemon (re)started resolves to nobody and the member never gets its mention copy; the
/// oracle must see that (`M1-mention`). With the fix (the provisioned directory, offline
/// matches still resolve) the member gets its copy and nothing is unresolved.
#[test]
fn g17_the_oracle_fails_when_a_mention_of_an_offline_member_reaches_nobody() {
    let (fixed, unresolved) = g17_scenario(Mutation::None);
    assert_eq!(fixed.violation, None, "passes with the fix");
    assert_eq!(unresolved, 0);
    let (report, unresolved) = g17_scenario(Mutation::ReferenceG17);
    let v = report
        .violation
        .expect("the oracle sees the reference's G17");
    assert_eq!(v.invariant, "M1-mention", "{v}");
    assert_eq!(unresolved, 1, "the reference's miss is reported as unknown");
    eprintln!("reference-g17: {v}");
}
