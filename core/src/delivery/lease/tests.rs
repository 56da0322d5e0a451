use super::*;
use crate::constants::LEASE_TTL;
use crate::wire::shard::ShardMap;
use proptest::prelude::*;

const BASE_WALL: u64 = 1_700_000_000_000;

fn t(ms: u64) -> Now {
    Now::new(Instant::from_millis(ms), UnixMillis(BASE_WALL + ms))
}

fn shard0() -> Shard {
    match ShardMap::SINGLE.shard(0) {
        Ok(s) => s,
        Err(e) => panic!("shard 0: {e}"),
    }
}

fn lease(id: &str) -> Lease {
    Lease::new(shard0(), id, LeaseConfig::default())
}

/// A model of the delivery bucket: one key, revisions from a shared sequence, `max_age` TTL.
#[derive(Default)]
struct FakeKv {
    seq: u64,
    /// (revision, record, stored at ms)
    entry: Option<(u64, DeliveryLease, u64)>,
}

impl FakeKv {
    fn expire(&mut self, now: u64) {
        if let Some((_, _, at)) = &self.entry
            && now >= at + LEASE_TTL.as_millis()
        {
            self.entry = None;
        }
    }

    fn exec(&mut self, now: u64, cmd: &LeaseCommand) -> Outcome<LeaseReply> {
        self.expire(now);
        let current = self.entry.as_ref().map(|e| e.0);
        match cmd {
            LeaseCommand::Create { value, .. } => {
                if current.is_some() {
                    return Outcome::Failed(Failure::AlreadyExists);
                }
                self.seq += 1;
                self.entry = Some((self.seq, value.clone(), now));
                Outcome::Success(LeaseReply::Written { revision: self.seq })
            }
            LeaseCommand::Update {
                value,
                expected_revision,
                ..
            } => {
                if current != Some(*expected_revision) {
                    return Outcome::Failed(Failure::WrongLastRevision { current });
                }
                self.seq += 1;
                self.entry = Some((self.seq, value.clone(), now));
                Outcome::Success(LeaseReply::Written { revision: self.seq })
            }
            LeaseCommand::Delete {
                expected_revision, ..
            } => {
                if current != Some(*expected_revision) {
                    return Outcome::Failed(Failure::WrongLastRevision { current });
                }
                self.seq += 1;
                self.entry = None;
                Outcome::Success(LeaseReply::Deleted)
            }
            LeaseCommand::Get { .. } => Outcome::Success(LeaseReply::Entry(
                self.entry.as_ref().map(|(revision, record, _)| LeaseEntry {
                    revision: *revision,
                    record: Some(record.clone()),
                }),
            )),
        }
    }
}

fn events(l: &mut Lease) -> Vec<LeaseEvent> {
    std::iter::from_fn(|| l.poll_event()).collect()
}

/// Executes every queued command against the fake KV at `now`.
fn run(l: &mut Lease, kv: &mut FakeKv, now: u64) {
    while let Some(cmd) = l.poll_command() {
        let out = kv.exec(now, &cmd);
        assert_eq!(l.handle_completion(t(now), cmd.op(), out), Ok(()));
    }
}

fn one_command(l: &mut Lease) -> LeaseCommand {
    match l.poll_command() {
        Some(c) => c,
        None => panic!("expected a command"),
    }
}

#[test]
fn acquire_success_gives_the_create_revision_as_token() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    assert_eq!(l.state(), LeaseState::Idle);
    l.acquire(t(0)).ok();
    let cmd = one_command(&mut l);
    let LeaseCommand::Create {
        ref key, ref value, ..
    } = cmd
    else {
        panic!("expected create, got {cmd:?}")
    };
    assert_eq!(key, "lease.0");
    assert_eq!(value.holder, "d1");
    assert!(!value.ready);
    assert_eq!(acquired_at_of(value), UnixMillis(BASE_WALL));
    let out = kv.exec(0, &cmd);
    l.handle_completion(t(5), cmd.op(), out).ok();
    assert_eq!(
        events(&mut l),
        vec![LeaseEvent::Acquired {
            token: FencingToken(1)
        }]
    );
    assert_eq!(l.state(), LeaseState::Held);
    assert_eq!(
        l.fencing_token(Instant::from_millis(5)),
        Some(FencingToken(1))
    );
    assert_eq!(l.deadline(), Some(Instant::from_millis(25_000)));
    assert_eq!(
        l.poll_timeout(),
        Some((Instant::from_millis(15_000), LeaseTimer::Renew))
    );
    assert_eq!(l.acquire(t(6)), Err(LeaseUsageError::AlreadyStarted));
}

#[test]
fn contended_then_successor_expires_then_we_acquire() {
    let mut kv = FakeKv::default();
    let mut d1 = lease("d1");
    d1.acquire(t(0)).ok();
    run(&mut d1, &mut kv, 0);
    events(&mut d1);
    // d1 crashes now (never renews). d2 tries.
    let mut d2 = lease("d2");
    d2.acquire(t(100)).ok();
    run(&mut d2, &mut kv, 100);
    assert_eq!(
        events(&mut d2),
        vec![LeaseEvent::Contended {
            holder: Some("d1".into())
        }]
    );
    assert_eq!(d2.state(), LeaseState::Acquiring);
    let mut now = 100;
    let mut guard = 0;
    while d2.state() == LeaseState::Acquiring {
        guard += 1;
        assert!(guard < 20, "acquisition must be bounded");
        let Some((at, why)) = d2.poll_timeout() else {
            panic!("no retry timer")
        };
        assert_eq!(why, LeaseTimer::AcquireRetry);
        assert!(at.as_millis() > now);
        now = at.as_millis();
        d2.handle_timeout(t(now));
        run(&mut d2, &mut kv, now);
    }
    let evs = events(&mut d2);
    assert_eq!(
        evs.last(),
        Some(&LeaseEvent::Acquired {
            token: FencingToken(2)
        })
    );
    assert!((30_000..=31_100).contains(&now), "acquired at {now}");
    assert_eq!(d2.state(), LeaseState::Held);
}

#[test]
fn contention_for_the_whole_window_gives_up() {
    let mut kv = FakeKv::default();
    let mut d1 = lease("d1");
    d1.acquire(t(0)).ok();
    run(&mut d1, &mut kv, 0);
    let mut d2 = lease("d2");
    d2.acquire(t(0)).ok();
    run(&mut d2, &mut kv, 0);
    let mut now = 0;
    while let Some((at, _)) = d2.poll_timeout() {
        now = at.as_millis();
        // d1 keeps renewing.
        d1.handle_timeout(t(now));
        run(&mut d1, &mut kv, now);
        d2.handle_timeout(t(now));
        run(&mut d2, &mut kv, now);
        if d2.state() != LeaseState::Acquiring {
            break;
        }
        // advance d1 to its renew times in between
        while let Some((r, _)) = d1.poll_timeout() {
            if r.as_millis() > now {
                break;
            }
            d1.handle_timeout(t(r.as_millis()));
            run(&mut d1, &mut kv, r.as_millis());
        }
    }
    assert_eq!(d2.state(), LeaseState::NotAcquired);
    assert_eq!(
        events(&mut d2).last(),
        Some(&LeaseEvent::AcquireFailed {
            reason: AcquireFailure::Contended {
                holder: Some("d1".into())
            }
        })
    );
    assert!(now <= 31_000);
}

#[test]
fn unknown_create_outcome_adopts_our_own_write() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    let cmd = one_command(&mut l);
    let _landed = kv.exec(0, &cmd); // it landed, but the answer was lost
    l.handle_completion(t(10), cmd.op(), Outcome::Unknown).ok();
    assert!(events(&mut l).is_empty());
    let get = one_command(&mut l);
    assert!(matches!(get, LeaseCommand::Get { .. }));
    let out = kv.exec(10, &get);
    l.handle_completion(t(20), get.op(), out).ok();
    assert_eq!(
        events(&mut l),
        vec![LeaseEvent::Acquired {
            token: FencingToken(1)
        }]
    );
    // The deadline counts from the create's send time, not the read.
    assert_eq!(l.deadline(), Some(Instant::from_millis(25_000)));
}

#[test]
fn ready_only_after_mark_ready() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    run(&mut l, &mut kv, 0);
    events(&mut l);
    // Renewals before mark_ready keep ready:false.
    l.handle_timeout(t(15_000));
    let cmd = one_command(&mut l);
    let LeaseCommand::Update {
        ref value,
        expected_revision,
        ..
    } = cmd
    else {
        panic!("expected update")
    };
    assert!(!value.ready);
    assert_eq!(expected_revision, 1);
    assert_eq!(value.since, UnixMillis(BASE_WALL + 15_000));
    assert_eq!(acquired_at_of(value), UnixMillis(BASE_WALL));
    let out = kv.exec(15_000, &cmd);
    l.handle_completion(t(15_000), cmd.op(), out).ok();
    assert_eq!(events(&mut l), vec![LeaseEvent::Renewed { revision: 2 }]);
    assert_eq!(l.state(), LeaseState::Held);
    l.mark_ready(t(16_000)).ok();
    assert!(events(&mut l).is_empty(), "no Ready before the write lands");
    run(&mut l, &mut kv, 16_000);
    assert_eq!(
        events(&mut l),
        vec![LeaseEvent::Renewed { revision: 3 }, LeaseEvent::Ready]
    );
    assert_eq!(l.state(), LeaseState::Ready);
    assert!(kv.entry.as_ref().is_some_and(|e| e.1.ready));
    let mut idle = lease("x");
    assert_eq!(idle.mark_ready(t(0)), Err(LeaseUsageError::NotHeld));
}

#[test]
fn renew_success_moves_the_deadline() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    run(&mut l, &mut kv, 0);
    l.handle_timeout(t(15_000));
    run(&mut l, &mut kv, 15_000);
    assert_eq!(l.deadline(), Some(Instant::from_millis(40_000)));
    assert_eq!(l.revision(), Some(2));
    assert_eq!(
        l.fencing_token(Instant::from_millis(39_999)),
        Some(FencingToken(1))
    );
}

#[test]
fn renew_conflict_is_lost() {
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    let c = one_command(&mut l);
    l.handle_completion(
        t(0),
        c.op(),
        Outcome::Success(LeaseReply::Written { revision: 7 }),
    )
    .ok();
    l.handle_timeout(t(15_000));
    let u = one_command(&mut l);
    l.handle_completion(
        t(15_001),
        u.op(),
        Outcome::Failed(Failure::WrongLastRevision { current: Some(9) }),
    )
    .ok();
    assert_eq!(
        events(&mut l),
        vec![
            LeaseEvent::Acquired {
                token: FencingToken(7)
            },
            LeaseEvent::Lost {
                reason: LostReason::Superseded
            }
        ]
    );
    assert_eq!(l.state(), LeaseState::Lost);
    assert_eq!(l.fencing_token(Instant::from_millis(15_001)), None);
    assert_eq!(l.poll_timeout(), None);
}

#[test]
fn renew_unknown_then_deadline_passes_withdraws_the_token() {
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    let c = one_command(&mut l);
    l.handle_completion(
        t(0),
        c.op(),
        Outcome::Success(LeaseReply::Written { revision: 1 }),
    )
    .ok();
    l.handle_timeout(t(15_000));
    let u = one_command(&mut l);
    l.handle_completion(t(15_500), u.op(), Outcome::Unknown)
        .ok();
    // It re-reads; the read never answers.
    let g = one_command(&mut l);
    assert!(matches!(g, LeaseCommand::Get { .. }));
    assert_eq!(
        l.fencing_token(Instant::from_millis(24_999)),
        Some(FencingToken(1))
    );
    assert_eq!(l.fencing_token(Instant::from_millis(25_000)), None);
    l.handle_timeout(t(25_000));
    assert_eq!(
        events(&mut l).last(),
        Some(&LeaseEvent::Lost {
            reason: LostReason::DeadlinePassed
        })
    );
    assert_eq!(l.state(), LeaseState::Lost);
    // The late answer is accepted and changes nothing.
    l.handle_completion(t(26_000), g.op(), Outcome::Unknown)
        .ok();
    assert_eq!(l.state(), LeaseState::Lost);
    assert!(l.poll_command().is_none());
}

#[test]
fn release_of_our_own_lease_deletes_it() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    run(&mut l, &mut kv, 0);
    l.mark_ready(t(10)).ok();
    run(&mut l, &mut kv, 10);
    events(&mut l);
    l.release(t(20));
    assert_eq!(l.fencing_token(Instant::from_millis(20)), None);
    let d = one_command(&mut l);
    assert!(matches!(
        d,
        LeaseCommand::Delete {
            expected_revision: 2,
            ..
        }
    ));
    let out = kv.exec(20, &d);
    l.handle_completion(t(20), d.op(), out).ok();
    assert_eq!(events(&mut l), vec![LeaseEvent::Released]);
    assert_eq!(l.state(), LeaseState::Released);
    assert!(kv.entry.is_none());
    assert_eq!(l.poll_timeout(), None);
}

/// D6: d1 stalls past the TTL, d2 acquires, then d1's shutdown release lands: the CAS delete
/// must leave d2's lease in place.
#[test]
fn d6_release_racing_a_successor_never_deletes_the_successors_lease() {
    let mut kv = FakeKv::default();
    let mut d1 = lease("d1");
    d1.acquire(t(0)).ok();
    run(&mut d1, &mut kv, 0);
    let mut d2 = lease("d2");
    d2.acquire(t(10)).ok();
    run(&mut d2, &mut kv, 10);
    assert_eq!(d2.state(), LeaseState::Acquiring);
    // d1 stalls (no timers run). d1's shutdown release is issued, still naming revision 1 ...
    d1.release(t(29_000));
    let del = one_command(&mut d1);
    assert!(matches!(
        del,
        LeaseCommand::Delete {
            expected_revision: 1,
            ..
        }
    ));
    // ... but d2's retry acquires first, after the key expired.
    let (at, _) = d2
        .poll_timeout()
        .unwrap_or((Instant::ZERO, LeaseTimer::AcquireRetry));
    let now = at.as_millis().max(30_000);
    d2.handle_timeout(t(now));
    run(&mut d2, &mut kv, now);
    assert_eq!(d2.state(), LeaseState::Held);
    let succ_rev = kv.entry.as_ref().map(|e| e.0);
    // Now d1's delete reaches the broker.
    let out = kv.exec(now + 1, &del);
    d1.handle_completion(t(now + 1), del.op(), out).ok();
    assert_eq!(
        events(&mut d1).last(),
        Some(&LeaseEvent::ReleaseSkipped {
            reason: ReleaseSkipReason::Superseded
        })
    );
    assert_eq!(kv.entry.as_ref().map(|e| e.0), succ_rev);
    assert_eq!(kv.entry.as_ref().map(|e| e.1.holder.as_str()), Some("d2"));
    assert!(d2.fencing_token(Instant::from_millis(now + 1)).is_some());
}

#[test]
fn health_table_d10_g40() {
    let ttl = LEASE_TTL;
    let rec = |since: u64, ready: bool| DeliveryLease::new("d1", UnixMillis(since), ready);
    let active = LeaseHealth::Active {
        holder: "d1".into(),
    };
    let cases: Vec<(Option<DeliveryLease>, u64, LeaseHealth)> = vec![
        (None, 1000, LeaseHealth::Degraded(DegradedReason::Absent)),
        (
            Some(rec(1000, false)),
            2000,
            LeaseHealth::Degraded(DegradedReason::NotReady),
        ),
        (Some(rec(1000, true)), 2000, active.clone()),
        (Some(rec(1000, true)), 31_000, active.clone()),
        (
            Some(rec(1000, true)),
            31_001,
            LeaseHealth::Degraded(DegradedReason::Stale {
                age: Duration::from_millis(30_001),
            }),
        ),
        (
            Some(rec(1000, false)),
            40_000,
            LeaseHealth::Degraded(DegradedReason::Stale {
                age: Duration::from_millis(39_000),
            }),
        ),
        (Some(rec(5000, true)), 1000, active), // since in the future: age 0
    ];
    for (record, now, want) in cases {
        assert_eq!(
            judge_health(record.as_ref(), UnixMillis(now), ttl),
            want,
            "{record:?} at {now}"
        );
    }
}

#[test]
fn config_is_validated() {
    assert!(LeaseConfig::for_ttl(Duration::from_millis(1500)).is_ok());
    assert_eq!(
        LeaseConfig::for_ttl(Duration::ZERO),
        Err(LeaseConfigError::ZeroTtl)
    );
    assert!(matches!(
        LeaseConfig::new(
            Duration::from_millis(1000),
            Duration::from_millis(900),
            Duration::from_millis(100),
            Duration::from_millis(1000)
        ),
        Err(LeaseConfigError::NoRoomToRenew { .. })
    ));
    let d = LeaseConfig::default();
    assert_eq!(d.safety_margin(), Duration::from_millis(5000));
    assert_eq!(d.renew_interval(), Duration::from_millis(15_000));
}

#[test]
fn completion_misuse_is_refused_without_change() {
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    let c = one_command(&mut l);
    assert_eq!(
        l.handle_completion(t(0), OpId::from_raw(99), Outcome::Unknown),
        Err(LeaseUsageError::UnknownOp(OpId::from_raw(99)))
    );
    assert_eq!(
        l.handle_completion(t(0), c.op(), Outcome::Success(LeaseReply::Deleted)),
        Err(LeaseUsageError::ReplyMismatch(c.op()))
    );
    assert!(l.has_in_flight());
}

// ---- property: random outcomes for every command ----

#[derive(Clone, Debug)]
enum Step {
    Advance(u64),
    Complete(u8, u64),
    MarkReady,
    Release,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u64..20_000).prop_map(Step::Advance),
        6 => (0u8..10, 1u64..100).prop_map(|(k, r)| Step::Complete(k, r)),
        1 => Just(Step::MarkReady),
        1 => Just(Step::Release),
    ]
}

fn reply_for(
    cmd: &LeaseCommand,
    kind: u8,
    rev: u64,
    acquired: Option<UnixMillis>,
) -> Outcome<LeaseReply> {
    match kind {
        0 | 1 => match cmd {
            LeaseCommand::Create { .. } | LeaseCommand::Update { .. } => {
                Outcome::Success(LeaseReply::Written { revision: rev })
            }
            LeaseCommand::Delete { .. } => Outcome::Success(LeaseReply::Deleted),
            LeaseCommand::Get { .. } => {
                let mut r = DeliveryLease::new(
                    if kind == 0 { "me" } else { "other" },
                    UnixMillis(BASE_WALL),
                    rev.is_multiple_of(2),
                );
                if let Some(a) = acquired {
                    r.extra.insert(ACQUIRED_AT_FIELD.into(), Value::from(a.0));
                }
                Outcome::Success(LeaseReply::Entry(Some(LeaseEntry {
                    revision: rev,
                    record: Some(r),
                })))
            }
        },
        2 => match cmd {
            LeaseCommand::Get { .. } => Outcome::Success(LeaseReply::Entry(None)),
            _ => Outcome::Failed(Failure::AlreadyExists),
        },
        3 => Outcome::Failed(Failure::WrongLastRevision { current: Some(rev) }),
        4 => Outcome::Failed(Failure::NotFound),
        5 => Outcome::Failed(Failure::Timeout),
        6 => Outcome::Failed(Failure::NoResponders),
        7 => Outcome::Failed(Failure::PermissionDenied {
            detail: "no".into(),
        }),
        _ => Outcome::Unknown,
    }
}

proptest! {
    #[test]
    fn lease_invariants_hold_under_random_outcomes(steps in proptest::collection::vec(step(), 0..120)) {
        let cfg = LeaseConfig::default();
        let mut l = Lease::new(shard0(), "me", cfg);
        let mut now = 0u64;
        l.acquire(t(now)).ok();
        // (command, issued at)
        let mut outstanding: Option<(LeaseCommand, u64)> = None;
        // The latest send time of a write not known to have failed.
        let mut latest_write: Option<u64> = None;
        let mut confirmed: Vec<u64> = Vec::new();
        let mut last_acquired: Option<UnixMillis> = None;
        for s in steps {
            match s {
                Step::Advance(d) => {
                    now += d;
                    l.handle_timeout(t(now));
                    // R13 (drain first: queued commands are checked below)
                    if let Some((at, _)) = l.poll_timeout() {
                        prop_assert!(at.as_millis() > now);
                    }
                }
                Step::Complete(kind, rev) => {
                    if let Some((cmd, _)) = outstanding.take() {
                        let out = reply_for(&cmd, kind, rev, last_acquired);
                        match (&cmd, &out) {
                            (LeaseCommand::Create { .. } | LeaseCommand::Update { .. }, Outcome::Success(LeaseReply::Written { revision })) => confirmed.push(*revision),
                            (LeaseCommand::Get { .. }, Outcome::Success(LeaseReply::Entry(Some(e)))) if kind == 0 => confirmed.push(e.revision),
                            _ => {}
                        }
                        prop_assert_eq!(l.handle_completion(t(now), cmd.op(), out), Ok(()));
                    }
                }
                Step::MarkReady => { let _ = l.mark_ready(t(now)); }
                Step::Release => l.release(t(now)),
            }
            while let Some(cmd) = l.poll_command() {
                prop_assert!(outstanding.is_none(), "two commands in flight: {:?} and {:?}", outstanding, cmd);
                prop_assert_eq!(cmd.key(), "lease.0");
                match &cmd {
                    LeaseCommand::Create { value, .. } => {
                        latest_write = Some(now);
                        last_acquired = Some(acquired_at_of(value));
                    }
                    LeaseCommand::Update { value, expected_revision, .. } => {
                        latest_write = Some(now);
                        prop_assert_eq!(Some(*expected_revision), l.revision());
                        last_acquired = Some(acquired_at_of(value));
                    }
                    LeaseCommand::Delete { expected_revision, .. } => {
                        prop_assert_eq!(Some(*expected_revision), l.revision());
                        prop_assert!(confirmed.contains(expected_revision));
                    }
                    LeaseCommand::Get { .. } => {}
                }
                outstanding = Some((cmd, now));
            }
            while l.poll_event().is_some() {}
            // Never a token past our own deadline, nor past the last write's send time + TTL − margin.
            if l.fencing_token(Instant::from_millis(now)).is_some() {
                let deadline = l.deadline().map(|d| d.as_millis()).unwrap_or(0);
                prop_assert!(now < deadline);
                let bound = latest_write.unwrap_or(0) + cfg.ttl().as_millis() - cfg.safety_margin().as_millis();
                prop_assert!(deadline <= bound, "deadline {} beyond bound {}", deadline, bound);
            }
        }
    }
}

#[test]
fn release_during_acquisition_deletes_what_the_create_won() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    let c = one_command(&mut l);
    l.release(t(1));
    let out = kv.exec(1, &c);
    l.handle_completion(t(2), c.op(), out).ok();
    let d = one_command(&mut l);
    assert!(matches!(
        d,
        LeaseCommand::Delete {
            expected_revision: 1,
            ..
        }
    ));
    assert_eq!(l.fencing_token(Instant::from_millis(2)), None);
    let out = kv.exec(2, &d);
    l.handle_completion(t(3), d.op(), out).ok();
    assert_eq!(
        events(&mut l),
        vec![
            LeaseEvent::Acquired {
                token: FencingToken(1)
            },
            LeaseEvent::Released
        ]
    );
    assert!(kv.entry.is_none());
}

#[test]
fn published_health_rides_on_the_next_renew_and_agents_read_it() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    run(&mut l, &mut kv, 0);
    l.mark_ready(t(1)).ok();
    run(&mut l, &mut kv, 1);
    let degraded = serde_json::json!({"state": "degraded", "reasons": ["fanout-down"]});
    l.annotate(HEALTH_FIELD, degraded.clone());
    // Not written until the next lease write: the renew.
    assert!(
        kv.entry
            .as_ref()
            .unwrap()
            .1
            .extra
            .get(HEALTH_FIELD)
            .is_none()
    );
    l.handle_timeout(t(16_000));
    run(&mut l, &mut kv, 16_000);
    let record = kv.entry.as_ref().unwrap().1.clone();
    assert_eq!(record.extra.get(HEALTH_FIELD), Some(&degraded));
    assert!(record.ready);
    assert_eq!(
        judge_health(Some(&record), UnixMillis(16_000), LEASE_TTL),
        LeaseHealth::Degraded(DegradedReason::Reported {
            reasons: vec!["fanout-down".into()]
        })
    );
    // Healthy again: the field says so, and the judgement is active.
    l.annotate(HEALTH_FIELD, serde_json::json!({"state": "active"}));
    l.handle_timeout(t(31_000));
    run(&mut l, &mut kv, 31_000);
    let record = kv.entry.as_ref().unwrap().1.clone();
    assert_eq!(
        judge_health(Some(&record), UnixMillis(31_000), LEASE_TTL),
        LeaseHealth::Active {
            holder: "d1".into()
        }
    );
    // A reference record (no field) is judged as before.
    let reference = DeliveryLease::new("d0", UnixMillis(30_000), true);
    assert!(matches!(
        judge_health(Some(&reference), UnixMillis(30_000), LEASE_TTL),
        LeaseHealth::Active { .. }
    ));
}

/// A renew whose outcome is unknown is confirmed by reading the key: our own record (same holder
/// and same acquisition time) keeps the lease, adopts the landed revision and renews at once; the
/// same holder name with another acquisition time is a successor (a restarted daemon reusing the
/// id), so the lease is lost. (Mutation survivors of issue 16: `==` → `!=` in the ownership test.)
#[test]
fn an_unknown_renew_is_confirmed_only_by_our_own_record() {
    for successor_reused_the_id in [false, true] {
        let mut kv = FakeKv::default();
        let mut l = lease("d1");
        l.acquire(t(0)).ok();
        run(&mut l, &mut kv, 0);
        events(&mut l);
        l.handle_timeout(t(15_000));
        let u = one_command(&mut l);
        // The renew lands, but its answer is lost.
        let landed = kv.exec(15_000, &u);
        assert!(matches!(
            landed,
            Outcome::Success(LeaseReply::Written { revision: 2 })
        ));
        if successor_reused_the_id && let Some((_, record, _)) = kv.entry.as_mut() {
            record
                .extra
                .insert(ACQUIRED_AT_FIELD.to_owned(), Value::from(14_000u64));
        }
        l.handle_completion(t(15_000), u.op(), Outcome::Unknown)
            .ok();
        let g = one_command(&mut l);
        assert!(matches!(g, LeaseCommand::Get { .. }));
        let read = kv.exec(15_010, &g);
        l.handle_completion(t(15_010), g.op(), read).ok();
        if successor_reused_the_id {
            assert_eq!(l.state(), LeaseState::Lost);
            assert!(matches!(
                events(&mut l).last(),
                Some(LeaseEvent::Lost {
                    reason: LostReason::TakenOver { .. }
                })
            ));
            assert!(l.poll_command().is_none());
        } else {
            assert_eq!(l.state(), LeaseState::Held);
            assert_eq!(events(&mut l), vec![LeaseEvent::Renewed { revision: 2 }]);
            assert!(matches!(
                one_command(&mut l),
                LeaseCommand::Update {
                    expected_revision: 2,
                    ..
                }
            ));
        }
    }
}

/// A release whose delete outcome is unknown reads the key: a record at another revision is a
/// successor's, so the release is skipped as superseded and nothing more is sent (deleting again
/// is only for our own revision). (Mutation survivor of issue 16: the revision guard → `true`.)
#[test]
fn an_unknown_release_that_finds_a_successor_sends_nothing_more() {
    let mut kv = FakeKv::default();
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    run(&mut l, &mut kv, 0);
    events(&mut l);
    l.release(t(20));
    let d = one_command(&mut l);
    assert!(matches!(d, LeaseCommand::Delete { .. }));
    l.handle_completion(t(20), d.op(), Outcome::Unknown).ok();
    let g = one_command(&mut l);
    assert!(matches!(g, LeaseCommand::Get { .. }));
    // Meanwhile our key expired and a successor acquired it.
    kv.expire(LEASE_TTL.as_millis());
    let mut d2 = lease("d2");
    d2.acquire(t(LEASE_TTL.as_millis())).ok();
    run(&mut d2, &mut kv, LEASE_TTL.as_millis());
    let read = kv.exec(LEASE_TTL.as_millis() + 1, &g);
    l.handle_completion(t(21), g.op(), read).ok();
    assert_eq!(
        events(&mut l).last(),
        Some(&LeaseEvent::ReleaseSkipped {
            reason: ReleaseSkipReason::Superseded
        })
    );
    assert!(l.poll_command().is_none());
    assert_eq!(kv.entry.as_ref().map(|e| e.1.holder.as_str()), Some("d2"));
}

/// d1 acquires at 0 and is cut off: its own deadline (25 s) passes, the record (TTL 30 s) is still
/// on the server.
fn held_then_lost_by_the_deadline(kv: &mut FakeKv) -> Lease {
    let mut d1 = lease("d1");
    d1.acquire(t(0)).ok();
    run(&mut d1, kv, 0);
    events(&mut d1);
    d1.handle_timeout(t(25_000));
    while d1.poll_command().is_some() {}
    assert_eq!(d1.state(), LeaseState::Lost);
    d1
}

#[test]
fn a_successor_machine_reclaims_its_own_earlier_record_without_waiting_for_the_ttl() {
    let mut kv = FakeKv::default();
    let old = held_then_lost_by_the_deadline(&mut kv);
    assert_eq!(old.prior_hold(), Some(UnixMillis(BASE_WALL)));
    let mut next = lease("d1");
    assert_eq!(next.prior_hold(), None);
    next.reclaim(UnixMillis(BASE_WALL)).ok();
    assert_eq!(next.prior_hold(), Some(UnixMillis(BASE_WALL)));
    next.acquire(t(26_000)).ok();
    // The create finds the key taken, the read finds our own record, the CAS writes over it.
    let create = one_command(&mut next);
    assert!(matches!(create, LeaseCommand::Create { .. }));
    let out = kv.exec(26_000, &create);
    next.handle_completion(t(26_001), create.op(), out).ok();
    let get = one_command(&mut next);
    assert!(matches!(get, LeaseCommand::Get { .. }));
    let out = kv.exec(26_001, &get);
    next.handle_completion(t(26_002), get.op(), out).ok();
    let cmd = one_command(&mut next);
    let LeaseCommand::Update {
        ref value,
        expected_revision,
        ..
    } = cmd
    else {
        panic!("expected a compare-and-set over our record, got {cmd:?}")
    };
    assert_eq!(expected_revision, 1);
    assert!(!value.ready, "a reclaimed hold is not ready until bound");
    assert_eq!(acquired_at_of(value), UnixMillis(BASE_WALL + 26_002));
    let out = kv.exec(26_002, &cmd);
    next.handle_completion(t(26_003), cmd.op(), out).ok();
    assert_eq!(
        events(&mut next),
        vec![
            LeaseEvent::Reclaimed { over_revision: 1 },
            LeaseEvent::Acquired {
                token: FencingToken(2)
            },
        ]
    );
    assert_eq!(next.state(), LeaseState::Held);
    assert_eq!(next.prior_hold(), Some(UnixMillis(BASE_WALL + 26_002)));
    // Its deadline counts from the reclaiming write's send time.
    assert_eq!(next.deadline(), Some(Instant::from_millis(51_002)));
}

#[test]
fn a_record_under_our_id_from_another_hold_is_never_written_over() {
    let mut kv = FakeKv::default();
    // Another process started with the id d1 holds the key (acquiredAt 0 + 5).
    let mut other = lease("d1");
    other.acquire(t(5)).ok();
    run(&mut other, &mut kv, 5);
    let mut next = lease("d1");
    next.reclaim(UnixMillis(BASE_WALL)).ok();
    next.acquire(t(100)).ok();
    run(&mut next, &mut kv, 100);
    assert_eq!(
        events(&mut next),
        vec![LeaseEvent::Contended {
            holder: Some("d1".into())
        }]
    );
    assert_eq!(next.state(), LeaseState::Acquiring);
    assert_eq!(kv.entry.as_ref().map(|e| e.0), Some(1), "untouched");
}

#[test]
fn a_write_between_the_read_and_the_reclaim_fails_it_and_acquisition_contends() {
    let mut kv = FakeKv::default();
    let _old = held_then_lost_by_the_deadline(&mut kv);
    let mut next = lease("d1");
    next.reclaim(UnixMillis(BASE_WALL)).ok();
    next.acquire(t(26_000)).ok();
    let create = one_command(&mut next);
    let out = kv.exec(26_000, &create);
    next.handle_completion(t(26_000), create.op(), out).ok();
    let get = one_command(&mut next);
    let out = kv.exec(26_000, &get);
    next.handle_completion(t(26_000), get.op(), out).ok();
    let reclaim = one_command(&mut next);
    // The key expires and another daemon takes it before our CAS lands.
    kv.expire(30_000);
    let mut d2 = lease("d2");
    d2.acquire(t(30_000)).ok();
    run(&mut d2, &mut kv, 30_000);
    let out = kv.exec(30_001, &reclaim);
    assert!(matches!(
        out,
        Outcome::Failed(Failure::WrongLastRevision { .. })
    ));
    next.handle_completion(t(30_002), reclaim.op(), out).ok();
    assert_eq!(next.state(), LeaseState::Acquiring);
    assert!(!events(&mut next).iter().any(|e| matches!(
        e,
        LeaseEvent::Acquired { .. } | LeaseEvent::Reclaimed { .. }
    )));
    // The retry reads d2's record, which it does not reclaim.
    let (at, _) = next.poll_timeout().expect("a retry");
    next.handle_timeout(t(at.as_millis()));
    run(&mut next, &mut kv, at.as_millis());
    assert_eq!(next.state(), LeaseState::Acquiring);
    assert_eq!(
        kv.entry.as_ref().map(|e| e.1.holder.clone()),
        Some("d2".into())
    );
}

/// d1's earlier hold lost by its deadline, and its next incarnation's reclaim of that record
/// sent (the create and the read answered): the lease and the reclaim write, not yet executed.
fn reclaim_sent(kv: &mut FakeKv) -> (Lease, LeaseCommand) {
    let _old = held_then_lost_by_the_deadline(kv);
    let mut next = lease("d1");
    next.reclaim(UnixMillis(BASE_WALL)).ok();
    next.acquire(t(26_000)).ok();
    for _ in 0..2 {
        let cmd = one_command(&mut next);
        let out = kv.exec(26_000, &cmd);
        next.handle_completion(t(26_000), cmd.op(), out).ok();
    }
    let reclaim = one_command(&mut next);
    (next, reclaim)
}

#[test]
fn an_unknown_reclaim_outcome_is_adopted_by_its_stamp() {
    let mut kv = FakeKv::default();
    let (mut next, reclaim) = reclaim_sent(&mut kv);
    let _landed = kv.exec(26_000, &reclaim);
    next.handle_completion(t(26_010), reclaim.op(), Outcome::Unknown)
        .ok();
    run(&mut next, &mut kv, 26_020);
    let evs = events(&mut next);
    assert_eq!(
        evs.last(),
        Some(&LeaseEvent::Acquired {
            token: FencingToken(2)
        })
    );
    assert_eq!(next.state(), LeaseState::Held);
}

/// A reclaim write that times out is tried again (the retry reads the record, still ours, and
/// reclaims it); one the broker refuses (no permission) ends the acquisition.
#[test]
fn a_reclaim_that_times_out_is_retried_and_a_refused_one_gives_up() {
    let mut kv = FakeKv::default();
    let (mut next, reclaim) = reclaim_sent(&mut kv);
    next.handle_completion(t(26_010), reclaim.op(), Outcome::Failed(Failure::Timeout))
        .ok();
    assert_eq!(next.state(), LeaseState::Acquiring);
    let (at, _) = next.poll_timeout().expect("a retry");
    next.handle_timeout(t(at.as_millis()));
    run(&mut next, &mut kv, at.as_millis());
    assert_eq!(next.state(), LeaseState::Held);
    assert!(
        events(&mut next)
            .iter()
            .any(|e| matches!(e, LeaseEvent::Reclaimed { .. }))
    );

    let mut kv = FakeKv::default();
    let (mut next, reclaim) = reclaim_sent(&mut kv);
    let refused = Failure::PermissionDenied {
        detail: "no".into(),
    };
    next.handle_completion(t(26_010), reclaim.op(), Outcome::Failed(refused.clone()))
        .ok();
    assert_eq!(
        events(&mut next).last(),
        Some(&LeaseEvent::AcquireFailed {
            reason: AcquireFailure::Refused(refused)
        })
    );
    assert_ne!(next.state(), LeaseState::Acquiring);
}

#[test]
fn reclaim_is_refused_once_started() {
    let mut l = lease("d1");
    l.acquire(t(0)).ok();
    assert_eq!(
        l.reclaim(UnixMillis(1)),
        Err(LeaseUsageError::AlreadyStarted)
    );
}
