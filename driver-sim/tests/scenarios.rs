//! Named scenarios of `shared/spec/scenarios.md` as deterministic simulator runs: real agents and
//! (where named) the real delivery daemon on the broker model, a scripted workload, and the
//! oracle's verdict, plus what each scenario promises about who received what, and how.

// Test helpers unwrap set-up results and report through panics.
#![allow(clippy::unwrap_used)]

use cotal_core::agent::{AgentEvent, JoinError};
use cotal_core::delivery::daemon::DeliveryEvent;
use cotal_core::ledger::SourceKind;
use cotal_core::time::Instant;
use cotal_driver_sim::mesh::{
    Action, Mesh, MeshConfig, RunReport, Step, Surfacing, Workload, default_channels,
};
use cotal_driver_sim::sched::FaultConfig;

// Channel indices of `default_channels()`.
const LOBBY: usize = 0; // live
const OPS: usize = 1; // durable
const SECRET: usize = 3; // durable

// Agents.
const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;

struct Run {
    mesh: Mesh,
    report: RunReport,
}

/// Runs a scripted mesh of three agents (alice, bob, carol) with `daemons` daemons. `acl`
/// defaults to every channel.
fn run(
    seed: u64,
    daemons: usize,
    boot: [&[usize]; 3],
    acl: Option<[&[usize]; 3]>,
    steps: &[(u64, Action)],
) -> Run {
    run_with(seed, daemons, boot, acl, steps, FaultConfig::default())
}

fn run_with(
    seed: u64,
    daemons: usize,
    boot: [&[usize]; 3],
    acl: Option<[&[usize]; 3]>,
    steps: &[(u64, Action)],
    faults: FaultConfig,
) -> Run {
    let mut config = MeshConfig::new(seed);
    config.agents = 3;
    config.channels = default_channels();
    config.daemons = daemons;
    config.faults = faults;
    config.keep_transcript = true;
    let all: &[usize] = &[0, 1, 2, 3];
    let workload = Workload {
        boot: boot.iter().map(|b| b.to_vec()).collect(),
        acl: acl
            .unwrap_or([all, all, all])
            .iter()
            .map(|a| a.to_vec())
            .collect(),
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
    if let Some(v) = &report.violation {
        let lines = mesh.host().transcript().lines();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!("{v}\n{tail}");
    }
    Run { mesh, report }
}

fn post(agent: usize, channel: usize) -> Action {
    Action::Post {
        agent,
        channel,
        mention: None,
    }
}

fn join(agent: usize, channel: usize) -> Action {
    Action::Join { agent, channel }
}

fn leave(agent: usize, channel: usize) -> Action {
    Action::Leave { agent, channel }
}

impl Run {
    /// What `agent` surfaced, in order.
    fn got(&self, agent: usize) -> Vec<Surfacing> {
        self.mesh
            .journal()
            .surfacings
            .iter()
            .filter(|s| s.agent == agent)
            .cloned()
            .collect()
    }

    /// The id of the n-th post (1-based, in workload order) that CHAT stored.
    fn posted(&self, n: usize) -> String {
        let journal = self.mesh.journal();
        journal
            .requests
            .iter()
            .filter_map(|r| match &r.asked {
                cotal_driver_sim::mesh::Asked::Send(_, id) => Some(id.clone()),
                _ => None,
            })
            .nth(n - 1)
            .unwrap()
    }

    fn received(&self, agent: usize, n: usize) -> Option<Surfacing> {
        let id = self.posted(n);
        self.got(agent).into_iter().find(|s| s.id == id)
    }

    fn events(&self, agent: usize) -> Vec<AgentEvent> {
        self.mesh
            .journal()
            .events
            .iter()
            .filter(|e| e.agent == agent)
            .map(|e| e.event.clone())
            .collect()
    }
}

#[test]
fn a1_self_serve_live_join_with_no_daemon() {
    let r = run(
        1,
        0,
        [&[], &[], &[]],
        None,
        &[(200, join(BOB, LOBBY)), (400, post(ALICE, LOBBY))],
    );
    let got = r.received(BOB, 1).expect("bob gets alice's post");
    assert_eq!(got.origin, SourceKind::Live);
    assert!(r.events(BOB).iter().any(|e| matches!(
        e,
        AgentEvent::Joined { report, .. } if report.joined && !report.durable && report.reason.is_none()
    )));
}

#[test]
fn a2_out_of_acl_join_is_refused_cleanly() {
    let no_secret: &[usize] = &[0, 1, 2];
    let all: &[usize] = &[0, 1, 2, 3];
    let r = run(
        2,
        1,
        [&[], &[], &[]],
        Some([all, no_secret, all]),
        &[(200, join(BOB, SECRET)), (400, post(ALICE, SECRET))],
    );
    assert!(r.events(BOB).iter().any(|e| matches!(
        e,
        AgentEvent::JoinFailed {
            error: JoinError::Refused { .. },
            ..
        }
    )));
    assert!(r.got(BOB).is_empty());
    // The oracle's end checks (I6) found no subscription left behind; no membership either:
    assert!(
        !r.mesh
            .host()
            .broker()
            .kv_keys("cotal_members_main")
            .unwrap()
            .iter()
            .any(|k| k.starts_with("secret/")),
    );
}

#[test]
fn a3_leave_stops_live_delivery() {
    let r = run(
        3,
        0,
        [&[], &[LOBBY], &[]],
        None,
        &[
            (300, post(ALICE, LOBBY)),
            (600, leave(BOB, LOBBY)),
            (900, post(ALICE, LOBBY)),
        ],
    );
    assert!(r.received(BOB, 1).is_some());
    assert!(r.received(BOB, 2).is_none(), "nothing past the leave");
}

#[test]
fn a4_rejoin_is_an_idempotent_no_op() {
    let r = run(4, 0, [&[], &[LOBBY], &[]], None, &[(300, join(BOB, LOBBY))]);
    assert!(r.events(BOB).iter().any(|e| matches!(
        e,
        AgentEvent::Joined { request: Some(_), report, .. } if !report.joined
    )));
}

#[test]
fn a5_leave_then_rejoin_resumes_delivery_exactly_once() {
    let r = run(
        5,
        0,
        [&[], &[LOBBY], &[]],
        None,
        &[
            (300, leave(BOB, LOBBY)),
            (600, join(BOB, LOBBY)),
            (900, post(ALICE, LOBBY)),
        ],
    );
    let copies = r.got(BOB).iter().filter(|s| s.id == r.posted(1)).count();
    assert_eq!(copies, 1);
}

#[test]
fn a13_join_backfills_history_up_to_the_watermark_then_live() {
    let r = run(
        13,
        0,
        [&[], &[], &[]],
        None,
        &[
            (200, post(ALICE, OPS)),
            (300, post(CAROL, OPS)),
            (500, join(BOB, OPS)),
            (800, post(ALICE, OPS)),
        ],
    );
    assert_eq!(r.received(BOB, 1).unwrap().origin, SourceKind::Backfill);
    assert_eq!(r.received(BOB, 2).unwrap().origin, SourceKind::Backfill);
    assert_eq!(r.received(BOB, 3).unwrap().origin, SourceKind::Live);
}

#[test]
fn a14_restart_of_the_same_identity_re_backfills() {
    let r = run(
        14,
        0,
        [&[], &[LOBBY], &[]],
        None,
        &[
            (300, post(ALICE, LOBBY)),
            (600, Action::Restart { agent: BOB }),
        ],
    );
    let copies: Vec<(u32, SourceKind)> = r
        .got(BOB)
        .iter()
        .filter(|s| s.id == r.posted(1))
        .map(|s| (s.life, s.origin))
        .collect();
    assert_eq!(copies, [(0, SourceKind::Live), (1, SourceKind::Backfill)]);
}

#[test]
fn a15_reconnect_reopens_live_subs_without_re_backfill() {
    let r = run(
        15,
        0,
        [&[], &[LOBBY], &[]],
        None,
        &[
            (300, post(ALICE, LOBBY)),
            (600, Action::Lose { agent: BOB }),
            (2_000, post(ALICE, LOBBY)),
        ],
    );
    assert_eq!(r.got(BOB).len(), 2, "no second copy of the first post");
    assert_eq!(r.received(BOB, 2).unwrap().origin, SourceKind::Live);
}

#[test]
fn a16_runtime_join_with_a_daemon_gets_a_backstop_and_surfaces_once() {
    let r = run(
        16,
        1,
        [&[], &[], &[]],
        None,
        &[(1_000, join(BOB, OPS)), (1_500, post(ALICE, OPS))],
    );
    assert!(r.events(BOB).iter().any(|e| matches!(
        e,
        AgentEvent::Joined { report, .. } if report.durable && report.cursor_honoured == Some(true)
    )));
    let copies = r.got(BOB).iter().filter(|s| s.id == r.posted(1)).count();
    assert_eq!(copies, 1, "live and durable copies collapse");
}

#[test]
fn a24_late_refusal_drops_the_channel() {
    let r = run(
        24,
        1,
        [&[], &[OPS], &[]],
        None,
        &[
            (
                1_000,
                Action::Narrow {
                    agent: BOB,
                    channel: OPS,
                },
            ),
            (1_500, post(ALICE, OPS)),
        ],
    );
    assert!(
        r.events(BOB)
            .iter()
            .any(|e| matches!(e, AgentEvent::ChannelRefused { .. }))
    );
    assert!(r.received(BOB, 1).is_none());
}

#[test]
fn a26_offline_catch_up_through_dlv() {
    // Bob's connection is down while alice posts: the durable backstop delivers it.
    let r = run(
        26,
        1,
        [&[], &[OPS], &[]],
        None,
        &[
            (1_000, Action::Lose { agent: BOB }),
            (1_001, post(ALICE, OPS)),
        ],
    );
    let got = r.received(BOB, 1).expect("delivered after the reconnect");
    assert_eq!(got.origin, SourceKind::Durable);
}

#[test]
fn b17_rejoin_gap_is_not_durably_redelivered() {
    let r = run(
        17,
        1,
        [&[], &[OPS], &[]],
        None,
        &[
            (1_000, leave(BOB, OPS)),
            (1_500, post(ALICE, OPS)),
            (2_000, join(BOB, OPS)),
        ],
    );
    // The gap message reaches the rejoin only through ACL-bounded history (replay is on).
    let got = r.received(BOB, 1).expect("through the rejoin's backfill");
    assert_eq!(got.origin, SourceKind::Backfill);
}

#[test]
fn c2_leave_is_a_hard_backstop_cut() {
    let r = run(
        2,
        1,
        [&[], &[OPS], &[]],
        None,
        &[
            (1_000, Action::Lose { agent: BOB }),
            (1_001, post(ALICE, OPS)),
            (3_000, leave(BOB, OPS)),
            (3_500, post(ALICE, OPS)),
        ],
    );
    assert!(r.received(BOB, 1).is_some());
    assert!(
        r.received(BOB, 2).is_none(),
        "nothing past the leave, on any path"
    );
}

#[test]
fn d6_two_daemons_hold_one_lease_and_deliver_once() {
    let mut steps = vec![
        (1_000, Action::Lose { agent: BOB }),
        (1_001, post(ALICE, OPS)),
    ];
    steps.push((5_000, Action::RestartDaemon { daemon: 0 }));
    steps.push((5_001, Action::Lose { agent: BOB }));
    steps.push((5_002, post(CAROL, OPS)));
    let r = run(6, 2, [&[], &[OPS], &[]], None, &steps);
    assert!(r.received(BOB, 1).is_some());
    assert!(
        r.received(BOB, 2).is_some(),
        "the surviving daemon takes over"
    );
    assert!(r.report.messages >= 2);
}

#[test]
fn demo_is_clean_and_reproducible() {
    let a = cotal_driver_sim::demo::run(7);
    assert!(a.clean(), "{a}");
    assert!(a.received.iter().all(|(_, got)| !got.is_empty()), "{a}");
    let b = cotal_driver_sim::demo::run(7);
    assert_eq!(a, b);
}

#[test]
fn c8_mention_on_a_live_channel_reaches_a_non_member_durably() {
    let r = run(
        8,
        1,
        [&[LOBBY], &[], &[]],
        None,
        &[(
            1_000,
            Action::Post {
                agent: ALICE,
                channel: LOBBY,
                mention: Some(CAROL),
            },
        )],
    );
    let got = r.received(CAROL, 1).expect("carol is mentioned");
    assert_eq!(got.origin, SourceKind::Durable);
    assert!(got.mentions_me);
    assert!(
        r.received(BOB, 1).is_none(),
        "bob is neither a member nor mentioned"
    );
}

#[test]
fn chat_evicting_ahead_of_a_stalled_fan_out_is_a_reported_loss() {
    // Found by `cotal bench` on a real server: a sender that outruns fan-out by more than CHAT's
    // 1000-per-subject cap loses its oldest messages before fan-out is offered them. Here the
    // daemon's connection is down while alice posts 1,005 times on OPS and bob is offline too, so
    // only the durable path could bring them: the 5 CHAT discarded reach nobody, and the daemon
    // must say so (the oracle's S7-complete accepts nothing else).
    let posts = 1_005;
    let mut steps = vec![
        (1_000, Action::LoseDaemon { daemon: 0 }),
        (1_000, Action::Lose { agent: BOB }),
    ];
    for i in 0..posts {
        steps.push((1_001 + i, post(ALICE, OPS)));
    }
    let faults = FaultConfig {
        restore_after: (
            cotal_core::time::Duration::from_millis(4_000),
            cotal_core::time::Duration::from_millis(4_000),
        ),
        ..FaultConfig::default()
    };
    let r = run_with(31, 1, [&[OPS], &[OPS], &[]], None, &steps, faults);
    let journal = r.mesh.journal();
    // Ground truth: the sequences alice's sends were stored at, and which CHAT still holds.
    let sent: Vec<(u64, String)> = journal
        .events
        .iter()
        .filter_map(|e| match &e.event {
            AgentEvent::Sent { seq, id, .. } => Some((*seq, id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), posts as usize);
    let broker = r.mesh.host().broker();
    let chat = cotal_core::wire::config::SpaceStream::Chat.name(r.mesh.space());
    let chat = chat.as_str();
    let evicted: Vec<u64> = sent
        .iter()
        .filter(|(seq, _)| broker.message(chat, *seq).ok().flatten().is_none())
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(evicted.len(), 5, "CHAT keeps 1000 per subject");
    let reported: Vec<u64> = journal
        .daemon_events
        .iter()
        .filter_map(|n| match n.event {
            DeliveryEvent::EvictedBeforeFanout {
                first,
                last,
                verified: true,
            } => Some(first..=last),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        reported, evicted,
        "exactly the discarded messages, verified"
    );
    // Bob got every message CHAT still held, and none of the discarded ones.
    let got: std::collections::BTreeSet<String> = r.got(BOB).into_iter().map(|s| s.id).collect();
    for (seq, id) in &sent {
        assert_eq!(got.contains(id), !evicted.contains(seq), "seq {seq}");
    }
}

/// G42 across a restart: bob is a durable member of `ops` from boot (generation 1). The daemon
/// restarts (its successor waits out the lease TTL: no responders for about 30 s) and bob
/// restarts too, so his new life knows nothing of generation 1. He leaves `ops` while no daemon
/// answers, and the application retries the leave once the daemon is back. After healing, the
/// membership must be closed: an open one is a zombie the daemon keeps copying posts into.
#[test]
fn g42_leave_after_restart_while_the_daemon_is_down_closes_the_old_membership() {
    use cotal_core::wire::keys::{KvBucket, member_key};
    use cotal_core::wire::records::MembershipRecord;
    use cotal_core::wire::token::{AgentId, ConcreteChannel};
    let r = run(
        42,
        1,
        [&[], &[OPS], &[]],
        None,
        &[
            (1_000, Action::RestartDaemon { daemon: 0 }),
            (2_000, Action::Restart { agent: BOB }),
            (4_000, leave(BOB, OPS)),
            (45_000, leave(BOB, OPS)),
            (50_000, post(ALICE, OPS)),
        ],
    );
    let bucket = KvBucket::Members.name(r.mesh.space());
    let key = member_key(
        &ConcreteChannel::new("ops").unwrap(),
        &AgentId::new("bob").unwrap(),
    );
    let entry = r
        .mesh
        .host()
        .broker()
        .kv_get(&bucket, &key)
        .unwrap()
        .expect("bob's ops membership record");
    let record = MembershipRecord::from_kv(Some(&entry.value)).unwrap();
    assert!(
        record.leave_cursor.is_some(),
        "bob left ops: generation {} must be tombstoned, not a zombie ({record:?})",
        record.generation
    );
    let left = r
        .events(BOB)
        .iter()
        .any(|e| matches!(e, AgentEvent::Left { .. }));
    assert!(left, "one of bob's leaves succeeded");
    assert!(
        r.received(BOB, 1).is_none(),
        "nothing past the leave reaches bob"
    );
}

/// Issue 19: the daemon holding the lease is cut off the broker for 45 s, longer than the lease
/// window (30 s TTL). Its process lives on: it stops writing when its lease deadline passes,
/// and after the reconnect it starts over in process with a fresh lease and delivers what was
/// posted meanwhile. The oracle's I30 (every registry write made by the lease holder of that
/// moment) and S7-complete (every copy owed, after healing) are checked throughout.
#[test]
fn an_outage_longer_than_the_lease_is_ridden_out_in_process() {
    use cotal_core::delivery::daemon::DeliveryEvent;
    let r = run(
        19,
        1,
        [&[], &[OPS], &[]],
        None,
        &[
            (1_000, Action::CutHolder { ms: 45_000 }),
            (1_500, Action::Lose { agent: BOB }),
            (2_000, post(ALICE, OPS)),
            (50_000, post(CAROL, OPS)),
        ],
    );
    let daemon = r.mesh.daemons()[0].proc.borrow();
    let counters = daemon.daemon().counters();
    assert_eq!(counters.lease_lost, 1, "the outage outlived the lease");
    assert!(counters.lease_reacquisitions >= 1);
    assert_eq!(r.mesh.daemons()[0].life, 0, "the same process throughout");
    assert!(daemon.daemon().serving(), "serving again after the outage");
    drop(daemon);
    let reincarnated = r
        .mesh
        .journal()
        .daemon_events
        .iter()
        .any(|e| matches!(e.event, DeliveryEvent::Reincarnated { .. }));
    assert!(reincarnated);
    assert!(
        r.received(BOB, 1).is_some(),
        "posted while the daemon was cut off"
    );
    assert!(r.received(BOB, 2).is_some(), "posted after it came back");
}

/// Issue 19 with a standby: two daemons; the holder is cut off for 45 s. The standby takes the
/// lease once the holder's last write expires; the deposed daemon reconnects, starts over and
/// contends, and never writes while the standby holds the lease (I30, checked after every step).
#[test]
fn a_deposed_daemon_contends_after_its_outage_and_never_writes_beside_the_new_holder() {
    let r = run(
        23,
        2,
        [&[], &[OPS], &[]],
        None,
        &[
            (1_000, Action::CutHolder { ms: 45_000 }),
            (1_500, Action::Lose { agent: BOB }),
            (2_000, post(ALICE, OPS)),
            (60_000, post(CAROL, OPS)),
            (61_000, join(ALICE, SECRET)),
        ],
    );
    let lost: u64 = r
        .mesh
        .daemons()
        .iter()
        .map(|d| d.proc.borrow().daemon().counters().lease_lost)
        .sum();
    assert_eq!(lost, 1, "only the cut-off holder lost the lease");
    let serving = r
        .mesh
        .daemons()
        .iter()
        .filter(|d| d.proc.borrow().daemon().serving())
        .count();
    assert_eq!(serving, 1, "one daemon serves; the other contends");
    assert!(r.received(BOB, 1).is_some());
    assert!(r.received(BOB, 2).is_some());
}

/// Issue 19, the cluster case: the holder is cut off past its own lease deadline but reconnects
/// before its last write expires on the server. The new incarnation writes over its own record at
/// once (`Lease::reclaim`) instead of contending a TTL against itself; a standby, which sees the
/// key taken throughout, never holds beside it (I30, checked after every step).
#[test]
fn a_holder_back_before_its_record_expires_reclaims_it_at_once() {
    for daemons in [1, 2] {
        let r = run(
            29,
            daemons,
            [&[], &[OPS], &[]],
            None,
            &[
                (
                    1_000,
                    Action::CutHolder {
                        ms: CUT_PAST_DEADLINE_MS,
                    },
                ),
                (1_500, Action::Lose { agent: BOB }),
                (2_000, post(ALICE, OPS)),
                (40_000, post(CAROL, OPS)),
            ],
        );
        let counters: Vec<_> = r
            .mesh
            .daemons()
            .iter()
            .map(|d| d.proc.borrow().daemon().counters().clone())
            .collect();
        let lost: u64 = counters.iter().map(|c| c.lease_lost).sum();
        let reclaims: u64 = counters.iter().map(|c| c.lease_reclaims).sum();
        assert_eq!(
            lost, 1,
            "{daemons} daemon(s): the cut-off holder lost the lease"
        );
        assert_eq!(reclaims, 1, "{daemons} daemon(s): and reclaimed its record");
        assert!(
            counters.iter().all(|c| c.lease_reclaims == c.lease_lost),
            "the holder itself reclaimed"
        );
        assert!(r.received(BOB, 1).is_some());
        assert!(r.received(BOB, 2).is_some());
    }
}

/// Past the 25 s lease deadline (TTL 30 s − margin) from the last renewal, before the record's
/// 30 s expiry: renewals come every 10 s, so a cut of 27 s ends in that window when the last
/// renewal was 2–3 s before it.
const CUT_PAST_DEADLINE_MS: u64 = 27_000;
