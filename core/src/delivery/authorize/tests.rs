#![allow(clippy::unwrap_used)]

use super::*;
use crate::delivery::route::tests::{ch, id, msg};
use crate::registry::{
    FencingToken, JoinPlan, MemberSnapshot, TombstonePlan, Writer, durable_eligible, plan_join,
    plan_tombstone,
};
use crate::time::UnixMillis;
use crate::wire::records::MemberState;

fn owner() -> AgentId {
    id("bob")
}

fn durable_entry(seq: u64, generation: u64) -> Plane3Entry {
    Plane3Entry::durable_channel(msg("alice", "c", &[]), ch("c"), seq, generation)
}

fn mention_entry(seq: u64) -> Plane3Entry {
    Plane3Entry::live_mention(msg("alice", "c", &["bob"]), ch("c"), seq)
}

fn record(j: u64, leave: Option<u64>, generation: u64) -> MembershipRecord {
    let mut r = MembershipRecord::fresh_join(ch("c"), owner(), j, generation, "D", UnixMillis(1));
    if leave.is_some() {
        r.state = MemberState::LiveConfirmed;
        r.leave_cursor = leave;
    }
    r
}

fn acl(patterns: &[&str]) -> ReadAcl {
    ReadAcl::from_allow_subscribe(patterns).unwrap()
}

fn transfer(entry: &Plane3Entry) -> Decision {
    Decision::Transfer {
        msg_id: Plane3MsgId::for_entry(entry, &owner()),
    }
}

#[test]
fn c6_reader_matrix() {
    let covers = acl(&["c"]);
    let nothing = acl(&[]);
    let narrowed = acl(&["other"]);
    let open = record(10, None, 2);
    let closed = record(10, Some(20), 2);
    let d = durable_entry(15, 2);
    let after_leave = durable_entry(21, 2);
    let before_join = durable_entry(10, 2);
    let m = mention_entry(15);
    let defer = Decision::Defer {
        delay: READER_NAK_DELAY,
        reason: RetryReason::UnknownOwner,
    };
    type Row<'a> = (
        &'a str,
        &'a Plane3Entry,
        Option<&'a ReadAcl>,
        Option<&'a MembershipRecord>,
        u64,
        Decision,
    );
    let rows: Vec<Row<'_>> = vec![
        (
            "unknown owner, first delivery",
            &d,
            None,
            Some(&open),
            1,
            defer.clone(),
        ),
        (
            "unknown owner, 9th delivery",
            &d,
            None,
            Some(&open),
            9,
            defer.clone(),
        ),
        (
            "ACL [] drops",
            &d,
            Some(&nothing),
            Some(&open),
            1,
            Decision::Drop(DropReason::NotCovered),
        ),
        (
            "ACL narrowed drops",
            &m,
            Some(&narrowed),
            None,
            1,
            Decision::Drop(DropReason::NotCovered),
        ),
        (
            "durable, no record",
            &d,
            Some(&covers),
            None,
            1,
            Decision::Drop(DropReason::NoMembership),
        ),
        (
            "durable, seq > leave cursor",
            &after_leave,
            Some(&covers),
            Some(&closed),
            1,
            Decision::Drop(DropReason::OutsideInterval(Interval {
                generation: 2,
                join_cursor: 10,
                leave_cursor: Some(20),
            })),
        ),
        (
            "durable, seq ≤ join cursor",
            &before_join,
            Some(&covers),
            Some(&open),
            1,
            Decision::Drop(DropReason::OutsideInterval(Interval {
                generation: 2,
                join_cursor: 10,
                leave_cursor: None,
            })),
        ),
        (
            "durable, in interval",
            &d,
            Some(&covers),
            Some(&open),
            1,
            transfer(&d),
        ),
        (
            "durable, pre-leave entry of a tombstone",
            &d,
            Some(&covers),
            Some(&closed),
            3,
            transfer(&d),
        ),
        (
            "live mention, ACL covers, no membership",
            &m,
            Some(&covers),
            None,
            1,
            transfer(&m),
        ),
        (
            "live mention ignores a record",
            &m,
            Some(&covers),
            Some(&closed),
            1,
            transfer(&m),
        ),
    ];
    for (what, entry, a, r, n, want) in rows {
        assert_eq!(authorize(entry, &owner(), a, r, n), want, "{what}");
    }
    // At the 10th delivery an unknown owner is given up, with the report.
    let Decision::GiveUp(g) = authorize(&d, &owner(), None, Some(&open), 10) else {
        panic!("expected a give-up")
    };
    assert_eq!(g.reason, RetryReason::UnknownOwner);
    assert_eq!((g.seq, g.generation, g.deliveries), (15, 2, 10));
    assert_eq!(g.channel, ch("c"));
    assert!(g.to_string().starts_with(
        "plane-3 reader: gave up on entry for unknown owner bob after 10 redeliveries"
    ));
    // The msg-id of a transfer is `<msgId>:<owner>:<generation>`.
    let Decision::Transfer { msg_id } = authorize(&d, &owner(), Some(&covers), Some(&open), 1)
    else {
        panic!()
    };
    assert_eq!(
        (
            msg_id.message_id.as_str(),
            msg_id.owner.as_str(),
            msg_id.generation
        ),
        ("m-1", "bob", 2)
    );
}

#[test]
fn c6_transfer_failure_defers_then_gives_up() {
    let d = durable_entry(15, 2);
    assert_eq!(
        after_transfer_failure(&d, &owner(), 1),
        Decision::Defer {
            delay: READER_NAK_DELAY,
            reason: RetryReason::TransferFailed
        }
    );
    assert_eq!(
        after_transfer_failure(&d, &owner(), 9),
        Decision::Defer {
            delay: READER_NAK_DELAY,
            reason: RetryReason::TransferFailed
        }
    );
    let Decision::GiveUp(g) = after_transfer_failure(&d, &owner(), 10) else {
        panic!()
    };
    assert_eq!(g.reason, RetryReason::TransferFailed);
    assert_eq!(g.message_id, "m-1");
    assert!(
        g.to_string()
            .starts_with("plane-3 reader: gave up transferring m-1 for bob after 10 redeliveries")
    );
}

#[test]
fn g4_read_failure_backs_off_and_counts_against_the_ceiling() {
    let d = durable_entry(15, 2);
    let delay = |n| match after_read_failure(&d, &owner(), n) {
        Decision::Defer { delay, reason } => {
            assert_eq!(reason, RetryReason::ReadFailed);
            delay.as_millis()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(delay(0), 1000);
    assert_eq!(delay(1), 1000);
    assert_eq!(delay(2), 2000);
    assert_eq!(delay(5), 16_000);
    assert_eq!(delay(9), 30_000);
    assert!(matches!(
        after_read_failure(&d, &owner(), 10),
        Decision::GiveUp(GiveUp {
            reason: RetryReason::ReadFailed,
            ..
        })
    ));
}

#[test]
fn b15_activation_pending_member_still_receives() {
    let pending = record(0, None, 1);
    assert_eq!(pending.activated, Some(false));
    let d = durable_entry(1, 1);
    assert_eq!(
        authorize(&d, &owner(), Some(&acl(&["c"])), Some(&pending), 1),
        transfer(&d)
    );
}

#[test]
fn g26_inert_record_drops() {
    let mut inert = record(0, None, 1);
    inert.state = MemberState::LiveConfirmed;
    assert_eq!(
        authorize(
            &durable_entry(5, 1),
            &owner(),
            Some(&acl(&["c"])),
            Some(&inert),
            1
        ),
        Decision::Drop(DropReason::InertGeneration { generation: 1 })
    );
}

#[test]
fn record_of_another_key_fails_closed() {
    let mut other = record(0, None, 1);
    other.owner = id("carol");
    assert_eq!(
        authorize(
            &durable_entry(5, 1),
            &owner(),
            Some(&acl(&["c"])),
            Some(&other),
            1
        ),
        Decision::Drop(DropReason::RecordMismatch)
    );
}

/// G2, end to end through the registry plans: leave at L, rejoin with J' ≥ s; the pending
/// old-generation entry with s ≤ L is transferred. The reference, judging by the current
/// record, drops it.
#[test]
fn g2_reader_transfers_pending_old_generation_entry_after_rejoin() {
    let w = Writer::new("D1", FencingToken(1));
    let absent = MemberSnapshot::absent(ch("c"), owner());
    let JoinPlan::Commit(j1) = plan_join(&absent, None, 10, &w, UnixMillis(1)).unwrap() else {
        panic!()
    };
    let s1 = MemberSnapshot::at(j1.intent.record().clone(), 1);
    let TombstonePlan::Write(t) =
        plan_tombstone(&s1, 30, Some(j1.generation), &w, UnixMillis(2)).unwrap()
    else {
        panic!()
    };
    let s2 = MemberSnapshot::at(t.record().clone(), 2);
    let JoinPlan::Commit(j2) = plan_join(&s2, None, 40, &w, UnixMillis(3)).unwrap() else {
        panic!()
    };
    let current = j2.intent.record();
    assert!(j2.join_cursor >= 25);
    let pending = durable_entry(25, j1.generation);
    let covers = acl(&["c"]);

    // The reference's rule: the current record's interval, whatever the entry's generation.
    let reference_transfers = durable_eligible(current, pending.seq);
    assert!(
        !reference_transfers,
        "the reference drops the valid pre-leave entry"
    );

    assert_eq!(
        authorize(&pending, &owner(), Some(&covers), Some(current), 1),
        transfer(&pending)
    );
    // A gen-1 entry past the leave cursor is still cut (I14), and the new generation's own
    // window starts after J'.
    assert!(matches!(
        authorize(
            &durable_entry(31, j1.generation),
            &owner(),
            Some(&covers),
            Some(current),
            1
        ),
        Decision::Drop(DropReason::OutsideInterval(_))
    ));
    assert_eq!(
        authorize(
            &durable_entry(41, j2.generation),
            &owner(),
            Some(&covers),
            Some(current),
            1
        ),
        transfer(&durable_entry(41, j2.generation))
    );
    // A generation the record never had fails closed.
    assert_eq!(
        authorize(
            &durable_entry(25, 3),
            &owner(),
            Some(&covers),
            Some(current),
            1
        ),
        Decision::Drop(DropReason::UnknownGeneration { generation: 3 })
    );
}

#[test]
fn g32_malformed_deliveries_terminate() {
    let entry = durable_entry(5, 1);
    let payload = json::encode(&entry);
    let (o, e) = decode_entry("cotal.main.dinbox.bob", &payload).unwrap();
    assert_eq!((o, e), (owner(), entry.clone()));
    assert!(matches!(
        decode_entry("cotal.main.dlv.bob", &payload),
        Err(Anomaly::MalformedSubject { .. })
    ));
    assert!(matches!(
        decode_entry("cotal.main.dinbox.b*b", &payload),
        Err(Anomaly::MalformedSubject { .. })
    ));
    assert!(matches!(
        decode_entry("cotal.main.dinbox.bob", b"{nope"),
        Err(Anomaly::Undecodable(_))
    ));
    assert!(matches!(
        decode_entry("cotal.main.dinbox.bob", b""),
        Err(Anomaly::Undecodable(_))
    ));
    assert_eq!(
        dlv_payload(&entry),
        json::encode(&entry.msg),
        "the DLV copy is the bare message"
    );
}

#[test]
fn an_entry_past_the_frontier_of_a_leave_in_flight_is_held_not_transferred() {
    let entry = durable_entry(4, 2);
    // No leave running, or one that has not read its frontier yet: nothing held.
    assert_eq!(hold_for_leave(&entry, &owner(), None, 1), None);
    // At or below the leave's frontier the entry is inside the interval either way.
    assert_eq!(
        hold_for_leave(&durable_entry(3, 2), &owner(), Some(3), 1),
        None
    );
    // Past it: deferred until the tombstone's outcome is known.
    assert_eq!(
        hold_for_leave(&entry, &owner(), Some(3), 1),
        Some(Decision::Defer {
            delay: READER_NAK_DELAY,
            reason: RetryReason::LeaveInFlight,
        })
    );
    // A mention copy is not about membership.
    assert_eq!(
        hold_for_leave(&mention_entry(4), &owner(), Some(3), 1),
        None
    );
    // At the ceiling: given up, reported.
    let Some(Decision::GiveUp(g)) =
        hold_for_leave(&entry, &owner(), Some(3), READER_MAX_REDELIVERIES)
    else {
        panic!("expected a give-up at the ceiling");
    };
    assert_eq!((g.reason, g.seq), (RetryReason::LeaveInFlight, 4));
    assert!(
        g.to_string().contains("while a leave of c was in flight"),
        "{g}"
    );
}
