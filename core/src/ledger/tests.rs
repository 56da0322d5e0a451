//! Tests of the receiver ledger: scenario-named unit tests (scenarios.md group E), bound tests,
//! a reference-model property test (R22) and a transcript snapshot (R21).

use super::*;

mod model;
mod transcript;

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

fn mid(s: &str) -> MessageId {
    MessageId::from(s)
}

/// A durable copy with no stream metadata.
fn dlv(h: u64) -> CopySource {
    CopySource::Durable(DurableDelivery::new(DeliveryId(h)))
}

/// A durable copy of stream message `seq`.
fn dlv_seq(h: u64, seq: u64) -> CopySource {
    CopySource::Durable(DurableDelivery::new(DeliveryId(h)).with_stream_seq(seq))
}

fn ack(h: u64) -> Resolution {
    Resolution::new(DeliveryId(h), Action::Ack)
}

fn ledger() -> Ledger<&'static str> {
    Ledger::new(LedgerConfig::default()).unwrap()
}

fn small(max_pending: usize, horizon_capacity: usize) -> Ledger<&'static str> {
    Ledger::new(LedgerConfig {
        max_pending,
        horizon_capacity,
        overflow_nak_delay: Duration::from_millis(250),
    })
    .unwrap()
}

/// Surfaces everything and settles `id` as handled.
fn drain_one(l: &mut Ledger<&'static str>, now: Instant, id: &MessageId) -> Settled {
    let _ = l.surface(now, usize::MAX);
    l.handled(now, id).unwrap()
}

// ---- E1–E7: commit-aware cross-path dedup ----

#[test]
fn e1_durable_then_live_keeps_the_durable_handle_and_acks_once() {
    let mut l = ledger();
    let a = mid("a");
    assert_eq!(
        l.ingest(t(1), a.clone(), dlv(1), "x"),
        Ok(Decision::Buffered)
    );
    assert_eq!(
        l.ingest(t(2), a.clone(), CopySource::Live, "x"),
        Ok(Decision::DuplicateDropped)
    );
    assert_eq!(l.held_handle(&a), Some(DeliveryId(1)));
    assert_eq!(l.pending_len(), 1);

    let items = l.surface(t(3), 10);
    assert_eq!(items.len(), 1);
    assert!(items[0].durable);
    let s = l.handled(t(4), &a).unwrap();
    assert_eq!(s.ack, Some(ack(1)));
    assert_eq!(l.surface(t(5), 10), vec![]);
    assert_eq!(l.counters().duplicates_dropped, 1);
}

#[test]
fn e2_live_then_durable_upgrades_the_handle_and_commits_it_once() {
    let mut l = ledger();
    let a = mid("a");
    assert_eq!(
        l.ingest(t(1), a.clone(), CopySource::Live, "x"),
        Ok(Decision::Buffered)
    );
    assert_eq!(l.held_handle(&a), None);
    assert_eq!(
        l.ingest(t(2), a.clone(), dlv(9), "x"),
        Ok(Decision::HandleUpgraded)
    );
    assert_eq!(l.held_handle(&a), Some(DeliveryId(9)));
    let items = l.surface(t(3), 10);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].origin, SourceKind::Live);
    assert!(items[0].durable);
    assert_eq!(l.handled(t(4), &a).unwrap().ack, Some(ack(9)));
    assert_eq!(l.counters().handles_upgraded, 1);
}

#[test]
fn e3_redelivery_of_the_same_stream_message_forgets_the_first_and_commits_the_freshest() {
    let mut l = ledger();
    let a = mid("a");
    let first = DurableDelivery::new(DeliveryId(1))
        .with_stream_seq(40)
        .with_delivery_count(1);
    let again = DurableDelivery::new(DeliveryId(2))
        .with_stream_seq(40)
        .with_delivery_count(2);
    assert_eq!(
        l.ingest(t(1), a.clone(), CopySource::Durable(first), "x"),
        Ok(Decision::Buffered)
    );
    // Acking or nakking d1 would act on stream message 40, which d2 still holds: forget it.
    assert_eq!(
        l.ingest(t(60_001), a.clone(), CopySource::Durable(again), "x"),
        Ok(Decision::HandleReplaced {
            superseded: Resolution::new(DeliveryId(1), Action::Forget)
        })
    );
    assert_eq!(l.held_handle(&a), Some(DeliveryId(2)));
    let s = drain_one(&mut l, t(60_002), &a);
    assert_eq!(
        s.ack,
        Some(ack(2)),
        "the freshest handle is committed, the first is not"
    );
    assert_eq!(l.counters().durable_redeliveries, 1);
    assert_eq!(l.counters().superseded_forgotten, 1);
}

#[test]
fn e3_distinct_stream_messages_of_one_pending_id_ack_the_superseded_delivery() {
    let mut l = ledger();
    let a = mid("a");
    let _ = l.ingest(t(1), a.clone(), dlv_seq(1, 40), "x").unwrap();
    // A re-transfer (new DLV message, seq 77): the logical message stays guarded by d2.
    assert_eq!(
        l.ingest(t(2), a.clone(), dlv_seq(2, 77), "x"),
        Ok(Decision::HandleReplaced { superseded: ack(1) })
    );
    assert!(
        l.is_pending(&a),
        "the id is still pending, unacked through d2"
    );
    assert_eq!(drain_one(&mut l, t(3), &a).ack, Some(ack(2)));
    assert_eq!(l.counters().superseded_acked, 1);
}

#[test]
fn e3_unknown_stream_sequence_is_treated_as_possibly_the_same_message() {
    let mut l = ledger();
    let a = mid("a");
    let _ = l.ingest(t(1), a.clone(), dlv_seq(1, 40), "x").unwrap();
    assert_eq!(
        l.ingest(t(2), a.clone(), dlv(2), "x"),
        Ok(Decision::HandleReplaced {
            superseded: Resolution::new(DeliveryId(1), Action::Forget)
        })
    );
}

#[test]
fn e4_two_live_copies_make_one_entry_and_one_surfacing() {
    let mut l = ledger();
    let a = mid("a");
    assert_eq!(
        l.ingest(t(1), a.clone(), CopySource::Live, "x"),
        Ok(Decision::Buffered)
    );
    assert_eq!(
        l.ingest(t(2), a.clone(), CopySource::Live, "x"),
        Ok(Decision::DuplicateDropped)
    );
    assert_eq!(l.surface(t(3), 10).len(), 1);
    assert_eq!(l.handled(t(4), &a).unwrap().ack, None);
    assert_eq!(l.surface(t(5), 10).len(), 0);
}

#[test]
fn e5_durable_copy_after_the_live_copy_was_handled_is_acked_not_rebuffered() {
    let mut l = ledger();
    let a = mid("a");
    let _ = l.ingest(t(1), a.clone(), CopySource::Live, "x").unwrap();
    let s = drain_one(&mut l, t(2), &a);
    assert_eq!(s.ack, None, "a live copy commits nothing");
    assert_eq!(
        l.ingest(t(3), a.clone(), dlv(5), "x"),
        Ok(Decision::SettledDuplicate { ack: Some(ack(5)) })
    );
    assert!(!l.is_pending(&a));
    assert!(l.surface(t(4), 10).is_empty());
}

#[test]
fn e6_live_copy_after_the_durable_copy_was_handled_is_dropped_without_ack() {
    let mut l = ledger();
    let a = mid("a");
    let _ = l.ingest(t(1), a.clone(), dlv(5), "x").unwrap();
    assert_eq!(drain_one(&mut l, t(2), &a).ack, Some(ack(5)));
    let d = l.ingest(t(3), a.clone(), CopySource::Live, "x").unwrap();
    assert_eq!(d, Decision::SettledDuplicate { ack: None });
    assert_eq!(d.resolution(), None);
    assert!(l.surface(t(4), 10).is_empty());
    let d = l.ingest(t(5), a, CopySource::Backfill, "x").unwrap();
    assert_eq!(d, Decision::SettledDuplicate { ack: None });
    assert_eq!(l.counters().settled_duplicates_dropped, 2);
}

#[test]
fn e7_the_first_id_is_still_deduplicated_after_5000_settlements() {
    let mut l = ledger();
    let mut now = 0;
    for batch in 0..50 {
        for i in 0..100 {
            now += 1;
            let id = MessageId::new(format!("m{}", batch * 100 + i));
            let _ = l.ingest(t(now), id, CopySource::Live, "x").unwrap();
        }
        for item in l.surface(t(now), 100) {
            let _ = l.handled(t(now), &item.id).unwrap();
        }
    }
    assert_eq!(l.horizon_len(), 5000);
    assert_eq!(l.counters().horizon_evicted, 0);
    let first = mid("m0");
    assert_eq!(
        l.ingest(t(now + 1), first.clone(), dlv(1), "x"),
        Ok(Decision::SettledDuplicate { ack: Some(ack(1)) })
    );
    assert_eq!(
        l.ingest(t(now + 2), first, CopySource::Live, "x"),
        Ok(Decision::SettledDuplicate { ack: None })
    );
    assert!(l.surface(t(now + 3), 10).is_empty());
}

// ---- Horizon bound (R18, G7) ----

#[test]
fn horizon_forgets_the_oldest_id_exactly_past_its_capacity_and_reports_it() {
    let mut l = small(10, 3);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let _ = l
            .ingest(t(i as u64), mid(name), CopySource::Live, "x")
            .unwrap();
        let s = drain_one(&mut l, t(i as u64), &mid(name));
        assert_eq!(s.evicted, None);
    }
    assert_eq!(l.horizon_len(), 3);
    let _ = l.ingest(t(10), mid("d"), CopySource::Live, "x").unwrap();
    let s = drain_one(&mut l, t(10), &mid("d"));
    assert_eq!(s.evicted, Some(mid("a")));
    assert_eq!(l.horizon_len(), 3);
    assert_eq!(l.counters().horizon_evicted, 1);
    assert_eq!(l.settlement(&mid("a")), None);
    assert_eq!(l.settlement(&mid("b")), Some(Settlement::Handled));
    // Past the horizon a copy surfaces again: that is what the eviction report warned about.
    assert_eq!(
        l.ingest(t(11), mid("a"), dlv(1), "x"),
        Ok(Decision::Buffered)
    );
}

#[test]
fn default_horizon_holds_exactly_8192_ids() {
    let mut l: Ledger<()> = Ledger::new(LedgerConfig::default()).unwrap();
    assert_eq!(l.config().horizon_capacity, 8192);
    let settle = |l: &mut Ledger<()>, n: usize| {
        let id = MessageId::new(format!("m{n}"));
        let _ = l
            .ingest(t(n as u64), id.clone(), CopySource::Live, ())
            .unwrap();
        l.decline(t(n as u64), &id).unwrap()
    };
    for n in 0..8192 {
        assert_eq!(settle(&mut l, n).evicted, None);
    }
    assert_eq!(l.horizon_len(), 8192);
    assert_eq!(settle(&mut l, 8192).evicted, Some(mid("m0")));
    assert_eq!(l.horizon_len(), 8192);
}

// ---- E8: overflow (G31) ----

fn fill_live(l: &mut Ledger<&'static str>, n: usize) {
    for i in 0..n {
        let d = l
            .ingest(
                t(i as u64),
                MessageId::new(format!("f{i}")),
                CopySource::Live,
                "x",
            )
            .unwrap();
        assert_eq!(d, Decision::Buffered);
    }
}

#[test]
fn e8_a_durable_copy_refused_by_a_full_inbox_is_nakked_never_acked() {
    let mut l = ledger();
    fill_live(&mut l, MAX_INBOX);
    assert_eq!(l.pending_len(), 200);
    let d = l.ingest(t(500), mid("late"), dlv(1), "x").unwrap();
    assert_eq!(
        d,
        Decision::OverflowDeferred {
            nak: Resolution::new(
                DeliveryId(1),
                Action::Nak {
                    delay: DEFAULT_OVERFLOW_NAK_DELAY
                }
            )
        }
    );
    assert_eq!(l.pending_len(), 200);
    assert!(!l.is_pending(&mid("late")));
    assert_eq!(l.settlement(&mid("late")), None, "not recorded as handled");
    assert_eq!(l.counters().overflow_deferred, 1);
    // Once there is room, the redelivery is buffered normally.
    let first = l.surface(t(501), 1);
    let _ = l.handled(t(501), &first[0].id).unwrap();
    assert_eq!(
        l.ingest(t(5_600), mid("late"), dlv(2), "x"),
        Ok(Decision::Buffered)
    );
}

#[test]
fn e8_a_live_copy_displaces_the_newest_queued_durable_entry() {
    let mut l = small(3, 10);
    let _ = l.ingest(t(1), mid("a"), dlv(1), "x").unwrap();
    let _ = l.ingest(t(2), mid("b"), dlv(2), "x").unwrap();
    let _ = l.ingest(t(3), mid("c"), CopySource::Live, "x").unwrap();
    let d = l.ingest(t(4), mid("d"), CopySource::Live, "x").unwrap();
    assert_eq!(
        d,
        Decision::BufferedDisplacing {
            displaced: mid("b"),
            nak: Resolution::new(
                DeliveryId(2),
                Action::Nak {
                    delay: Duration::from_millis(250)
                }
            )
        }
    );
    assert_eq!(
        l.pending_ids().cloned().collect::<Vec<_>>(),
        vec![mid("a"), mid("c"), mid("d")]
    );
    assert_eq!(l.held_handle(&mid("b")), None);
    assert_eq!(l.counters().overflow_displaced, 1);
    assert_eq!(l.counters().overflow_lost, 0);
}

#[test]
fn e8_a_live_copy_is_lost_and_counted_when_nothing_can_be_deferred() {
    let mut l = small(2, 10);
    let _ = l.ingest(t(1), mid("a"), dlv(1), "x").unwrap();
    let _ = l.ingest(t(2), mid("b"), CopySource::Live, "x").unwrap();
    // "a" is surfaced: the application has it, so it cannot be displaced.
    let _ = l.surface(t(3), 1);
    let d = l.ingest(t(4), mid("c"), CopySource::Backfill, "x").unwrap();
    assert_eq!(d, Decision::OverflowLost);
    assert_eq!(d.resolution(), None);
    assert_eq!(l.counters().overflow_lost, 1);
    assert_eq!(l.pending_len(), 2);
}

#[test]
fn e8_surfaced_but_unsettled_items_count_against_the_bound() {
    let mut l = small(1, 10);
    let _ = l.ingest(t(1), mid("a"), CopySource::Live, "x").unwrap();
    assert_eq!(l.surface(t(2), 5).len(), 1);
    assert_eq!(l.queued_len(), 0);
    assert_eq!(l.pending_len(), 1);
    assert!(matches!(
        l.ingest(t(3), mid("b"), dlv(1), "x"),
        Ok(Decision::OverflowDeferred { .. })
    ));
    // A copy of the pending id needs no room.
    assert_eq!(
        l.ingest(t(4), mid("a"), dlv(2), "x"),
        Ok(Decision::HandleUpgraded)
    );
}

// ---- Declined copies (E11 boundary) ----

#[test]
fn e11_declined_item_is_acked_counted_apart_and_later_copies_are_dropped() {
    let mut l = ledger();
    let a = mid("a");
    let _ = l.ingest(t(1), a.clone(), dlv(3), "x").unwrap();
    // Declined before it was ever surfaced (the application's mute policy).
    let s = l.decline(t(2), &a).unwrap();
    assert_eq!(s.settlement, Settlement::Declined);
    assert_eq!(s.ack, Some(ack(3)));
    assert_eq!((l.counters().declined, l.counters().handled), (1, 0));
    assert_eq!(l.settlement(&a), Some(Settlement::Declined));
    assert_eq!(
        l.ingest(t(3), a.clone(), dlv(4), "x"),
        Ok(Decision::SettledDuplicate { ack: Some(ack(4)) })
    );
    assert!(l.surface(t(4), 10).is_empty());
}

// ---- Anomalies and echoes (E10, G32) ----

#[test]
fn e10_permanent_anomalies_on_durable_copies_are_terminated_never_acked() {
    let mut l = ledger();
    assert_eq!(
        l.reject(t(1), dlv(1), Rejection::Malformed),
        Ok(Some(Resolution::new(DeliveryId(1), Action::Term)))
    );
    assert_eq!(
        l.reject(t(2), dlv(2), Rejection::Spoofed),
        Ok(Some(Resolution::new(DeliveryId(2), Action::Term)))
    );
    assert_eq!(
        l.reject(t(3), CopySource::Live, Rejection::Spoofed),
        Ok(None)
    );
    assert_eq!(l.reject(t(4), dlv(3), Rejection::OwnEcho), Ok(Some(ack(3))));
    let c = l.counters();
    assert_eq!(
        (c.anomalies_terminated, c.anomalies_dropped, c.own_echoes),
        (2, 1, 1)
    );
    assert_eq!(
        (l.pending_len(), l.horizon_len()),
        (0, 0),
        "dedup state untouched"
    );
}

// ---- Misuse is a typed error, state unchanged (R17a) ----

#[test]
fn settling_an_unknown_or_unsurfaced_id_is_an_error_and_changes_nothing() {
    let mut l = ledger();
    let _ = l.ingest(t(1), mid("a"), dlv(1), "x").unwrap();
    let before = l.clone();
    assert_eq!(
        l.handled(t(2), &mid("zz")),
        Err(LedgerError::NotPending { id: mid("zz") })
    );
    assert_eq!(
        l.decline(t(2), &mid("zz")),
        Err(LedgerError::NotPending { id: mid("zz") })
    );
    assert_eq!(
        l.handled(t(2), &mid("a")),
        Err(LedgerError::NotSurfaced { id: mid("a") })
    );
    assert_eq!(l, before);

    let _ = drain_one(&mut l, t(3), &mid("a"));
    let before = l.clone();
    assert_eq!(
        l.handled(t(4), &mid("a")),
        Err(LedgerError::NotPending { id: mid("a") })
    );
    assert_eq!(l, before);
}

#[test]
fn reusing_a_held_delivery_handle_is_an_error_and_changes_nothing() {
    let mut l = ledger();
    let _ = l.ingest(t(1), mid("a"), dlv(1), "x").unwrap();
    let before = l.clone();
    let err = LedgerError::HandleInUse {
        delivery: DeliveryId(1),
        held_by: mid("a"),
    };
    assert_eq!(l.ingest(t(2), mid("a"), dlv(1), "x"), Err(err.clone()));
    assert_eq!(l.ingest(t(2), mid("b"), dlv(1), "x"), Err(err.clone()));
    assert_eq!(
        l.reject(t(2), dlv(1), Rejection::Malformed),
        Err(err.clone())
    );
    assert_eq!(l, before);
    assert_eq!(err.to_string(), "delivery d1 is still held by pending id a");
}

#[test]
fn zero_bounds_are_rejected() {
    let cfg = LedgerConfig {
        max_pending: 0,
        ..LedgerConfig::default()
    };
    assert_eq!(
        Ledger::<()>::new(cfg).unwrap_err(),
        LedgerError::InvalidConfig {
            field: "max_pending"
        }
    );
    let cfg = LedgerConfig {
        horizon_capacity: 0,
        ..LedgerConfig::default()
    };
    assert!(Ledger::<()>::new(cfg).is_err());
}

// ---- Surfacing ----

#[test]
fn surface_returns_queued_items_in_arrival_order_up_to_the_limit() {
    let mut l = ledger();
    for (i, n) in ["c", "a", "b"].iter().enumerate() {
        let _ = l.ingest(t(i as u64), mid(n), CopySource::Live, n).unwrap();
    }
    assert!(l.surface(t(5), 0).is_empty());
    let first: Vec<_> = l.surface(t(5), 2).into_iter().map(|s| s.item).collect();
    assert_eq!(first, vec!["c", "a"]);
    let rest: Vec<_> = l.surface(t(6), 2).into_iter().map(|s| s.item).collect();
    assert_eq!(rest, vec!["b"]);
    assert_eq!(l.counters().surfaced, 3);
    assert_eq!(l.is_surfaced(&mid("b")), Some(true));
    assert_eq!(l.is_surfaced(&mid("zz")), None);
}

#[test]
fn time_going_backwards_is_counted_and_never_moves_the_clock_back() {
    let mut l = ledger();
    let _ = l.ingest(t(100), mid("a"), CopySource::Live, "x").unwrap();
    let _ = l.ingest(t(50), mid("b"), CopySource::Live, "x").unwrap();
    assert_eq!(l.counters().clock_regressions, 1);
    assert_eq!(l.oldest_pending_since(), Some(t(100)));
    let _ = drain_one(&mut l, t(200), &mid("a"));
    assert_eq!(
        l.oldest_pending_since(),
        Some(t(100)),
        "b was stamped with the clamped time"
    );
}

// ---- Snapshot and restart (G7) ----

fn settled_ledger() -> Ledger<&'static str> {
    let mut l = ledger();
    let _ = l.ingest(t(1), mid("h"), dlv(1), "x").unwrap();
    let _ = drain_one(&mut l, t(2), &mid("h"));
    let _ = l.ingest(t(3), mid("d"), CopySource::Live, "x").unwrap();
    let _ = l.decline(t(4), &mid("d")).unwrap();
    let _ = l.ingest(t(5), mid("p"), dlv(2), "x").unwrap();
    l
}

#[test]
fn g7_a_fresh_ledger_after_restart_surfaces_a_handled_id_again() {
    let _before = settled_ledger();
    let mut after = ledger();
    assert_eq!(
        after.ingest(t(0), mid("h"), CopySource::Backfill, "x"),
        Ok(Decision::Buffered)
    );
}

#[test]
fn g7_a_restored_horizon_keeps_settled_ids_settled_across_restart() {
    let before = settled_ledger();
    let snap = before.horizon_snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    assert_eq!(
        json,
        r#"{"version":1,"settled":[{"id":"h","settlement":"handled"},{"id":"d","settlement":"declined"}]}"#
    );
    let back: HorizonSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);

    let mut after: Ledger<&str> = Ledger::restore(LedgerConfig::default(), &back).unwrap();
    assert_eq!(after.horizon_len(), 2);
    assert_eq!(
        after.pending_len(),
        0,
        "pending ids are not part of the snapshot"
    );
    assert_eq!(
        after.ingest(t(0), mid("h"), CopySource::Backfill, "x"),
        Ok(Decision::SettledDuplicate { ack: None })
    );
    assert_eq!(
        after.ingest(t(1), mid("d"), dlv(7), "x"),
        Ok(Decision::SettledDuplicate { ack: Some(ack(7)) })
    );
    // The unsettled id comes back through its redelivery and surfaces once.
    assert_eq!(
        after.ingest(t(2), mid("p"), dlv(8), "x"),
        Ok(Decision::Buffered)
    );
    assert_eq!(after.horizon_snapshot(), snap);
}

#[test]
fn restore_keeps_the_newest_ids_when_the_snapshot_exceeds_the_capacity() {
    let snap = HorizonSnapshot {
        version: HORIZON_SNAPSHOT_VERSION,
        settled: ["a", "b", "c"]
            .iter()
            .map(|n| SettledId {
                id: mid(n),
                settlement: Settlement::Handled,
            })
            .collect(),
    };
    let cfg = LedgerConfig {
        horizon_capacity: 2,
        ..LedgerConfig::default()
    };
    let l: Ledger<()> = Ledger::restore(cfg, &snap).unwrap();
    assert_eq!(l.horizon_len(), 2);
    assert_eq!(l.settlement(&mid("a")), None);
    assert_eq!(l.settlement(&mid("c")), Some(Settlement::Handled));
    assert_eq!(l.counters().horizon_evicted, 1);
}

#[test]
fn restore_rejects_unknown_versions_and_repeated_ids() {
    let mut snap = HorizonSnapshot {
        version: 2,
        settled: vec![],
    };
    assert_eq!(
        Ledger::<()>::restore(LedgerConfig::default(), &snap).unwrap_err(),
        LedgerError::SnapshotVersion { found: 2 }
    );
    snap.version = HORIZON_SNAPSHOT_VERSION;
    let e = SettledId {
        id: mid("a"),
        settlement: Settlement::Handled,
    };
    snap.settled = vec![e.clone(), e];
    assert_eq!(
        Ledger::<()>::restore(LedgerConfig::default(), &snap).unwrap_err(),
        LedgerError::SnapshotDuplicate { id: mid("a") }
    );
}

// ---- Overflow fairness: a redelivered copy is not refused forever (G6) ----

/// A durable copy of stream message `seq`, delivered for the `count`th time.
fn dlv_nth(h: u64, seq: u64, count: u64) -> CopySource {
    CopySource::Durable(
        DurableDelivery::new(DeliveryId(h))
            .with_stream_seq(seq)
            .with_delivery_count(count),
    )
}

#[test]
fn a_redelivered_copy_takes_the_place_of_the_newest_queued_first_delivery() {
    let mut l = small(3, 10);
    let _ = l.ingest(t(1), mid("b"), dlv_nth(2, 20, 1), "x").unwrap();
    let _ = l.ingest(t(2), mid("c"), dlv_nth(3, 30, 1), "x").unwrap();
    let _ = l.ingest(t(3), mid("d"), dlv_nth(4, 40, 1), "x").unwrap();
    // "a" (stream seq 10) was refused before, while the inbox was full; it comes back.
    let d = l.ingest(t(4), mid("a"), dlv_nth(1, 10, 2), "x").unwrap();
    assert_eq!(
        d,
        Decision::BufferedDisplacing {
            displaced: mid("d"),
            nak: Resolution::new(
                DeliveryId(4),
                Action::Nak {
                    delay: Duration::from_millis(250)
                }
            )
        }
    );
    assert!(l.is_pending(&mid("a")));
    assert_eq!(l.held_handle(&mid("a")), Some(DeliveryId(1)));
    // "d" comes back as a redelivery: it displaces "c", the newest first delivery left.
    let d = l.ingest(t(5), mid("d"), dlv_nth(5, 40, 2), "x").unwrap();
    assert!(matches!(
        d,
        Decision::BufferedDisplacing { ref displaced, .. } if *displaced == mid("c")
    ));
    // "c" comes back: only redeliveries and "b" are queued; "b" goes.
    let d = l.ingest(t(6), mid("c"), dlv_nth(6, 30, 2), "x").unwrap();
    assert!(matches!(
        d,
        Decision::BufferedDisplacing { ref displaced, .. } if *displaced == mid("b")
    ));
    // Now every queued entry is a redelivery: a redelivery is refused, never displacing one.
    let d = l.ingest(t(7), mid("b"), dlv_nth(7, 20, 2), "x").unwrap();
    assert!(matches!(d, Decision::OverflowDeferred { .. }), "{d:?}");
    assert_eq!(l.counters().overflow_displaced, 3);
}

#[test]
fn a_first_delivery_never_displaces_anything() {
    let mut l = small(2, 10);
    let _ = l.ingest(t(1), mid("a"), dlv_nth(1, 10, 1), "x").unwrap();
    let _ = l.ingest(t(2), mid("b"), dlv_nth(2, 20, 1), "x").unwrap();
    let d = l.ingest(t(3), mid("c"), dlv_nth(3, 30, 1), "x").unwrap();
    assert!(matches!(d, Decision::OverflowDeferred { .. }), "{d:?}");
}

#[test]
fn a_live_copy_displaces_a_first_delivery_before_a_redelivered_one() {
    let mut l = small(2, 10);
    let _ = l.ingest(t(1), mid("a"), dlv_nth(1, 10, 1), "x").unwrap();
    let _ = l.ingest(t(2), mid("b"), dlv_nth(2, 20, 3), "x").unwrap();
    let d = l.ingest(t(3), mid("c"), CopySource::Live, "x").unwrap();
    assert!(matches!(
        d,
        Decision::BufferedDisplacing { ref displaced, .. } if *displaced == mid("a")
    ));
    // Only a redelivered entry is queued now: it is displaced rather than the live copy lost.
    let d = l.ingest(t(4), mid("e"), CopySource::Live, "x").unwrap();
    assert!(matches!(
        d,
        Decision::BufferedDisplacing { ref displaced, .. } if *displaced == mid("b")
    ));
}

/// The starvation the rule removes: an inbox kept full by a steady flow of first deliveries
/// (each slot taken as it frees), and one old copy refused at the full inbox. It is admitted at
/// its first redelivery, and surfaced within one inbox's worth of surfacings.
#[test]
fn an_old_copy_is_admitted_at_its_redelivery_under_a_steady_flow_of_newer_ones() {
    let max = 4;
    let mut l = small(max, 64);
    let mut next_seq = 100;
    let mut h = 1000;
    for _ in 0..max {
        next_seq += 1;
        h += 1;
        let _ = l
            .ingest(
                t(1),
                mid(&format!("n{next_seq}")),
                dlv_nth(h, next_seq, 1),
                "x",
            )
            .unwrap();
    }
    let old = mid("old");
    let d = l.ingest(t(2), old.clone(), dlv_nth(1, 1, 1), "x").unwrap();
    assert!(matches!(d, Decision::OverflowDeferred { .. }));
    let mut surfaced_old_at = None;
    for round in 0..20u64 {
        let now = t(10 + round);
        // The application takes one copy and handles it; a newer copy takes the slot at once.
        let items = l.surface(now, 1);
        for it in &items {
            if it.id == old {
                surfaced_old_at = Some(round);
            }
            let _ = l.handled(now, &it.id).unwrap();
        }
        next_seq += 1;
        h += 1;
        let _ = l
            .ingest(
                now,
                mid(&format!("n{next_seq}")),
                dlv_nth(h, next_seq, 1),
                "x",
            )
            .unwrap();
        if round == 2 {
            // The old copy's redelivery, while the inbox is full again.
            assert_eq!(l.pending_len(), max);
            let d = l.ingest(now, old.clone(), dlv_nth(2, 1, 2), "x").unwrap();
            assert!(
                matches!(d, Decision::BufferedDisplacing { .. }),
                "admitted at its redelivery: {d:?}"
            );
        }
    }
    let at = surfaced_old_at.expect("the old copy surfaced");
    assert!(at <= 2 + max as u64, "surfaced at round {at}");
}
