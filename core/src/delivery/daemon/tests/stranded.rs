//! Stranded deliveries read back (issue 19): what the fan-out consumer offered to a feed that is
//! gone is read from CHAT at the bind and fanned out at once, not after the consumer's
//! `ack_wait`; its redelivery collapses on the copies' msg-ids and is the one acked.

use super::super::*;
use super::harness::*;
use super::{plant_member, record, served, served_two_hop};

fn is_read_back(c: &Command) -> bool {
    matches!(c, Command::ReadStream { filter, .. } if filter == "cotal.main.chat.>")
}

/// A world whose fan-out durable, at the first bind, has offered `1..=pointer` and settled up
/// to `floor`, with `pending` deliveries unsettled; alice is a member of `review` and bob posted
/// `pointer + 1` messages there.
fn bound_with(pointer: u64, floor: u64, pending: u64) -> World {
    let mut w = World::new();
    w.b.fanout_pointer = Some(pointer);
    w.b.fanout_unsettled = Some((floor, pending));
    alice_reads_review(&mut w);
    for _ in 0..=pointer {
        w.post("bob", "review", &[]);
    }
    w
}

/// alice is a member of `review` and may read it.
fn alice_reads_review(w: &mut World) {
    plant_member(w, &record("review", "alice", 0, 1), None);
    w.acl("alice", &["review"]);
}

fn copies_of(w: &World, seq: u64) -> usize {
    let prefix = format!("m{seq}:");
    w.copy_ids("alice")
        .iter()
        .filter(|i| i.starts_with(&prefix))
        .count()
}

#[test]
fn a_bind_with_unsettled_deliveries_writes_their_copies_at_once_and_settles_nothing() {
    let mut w = bound_with(4, 2, 2);
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert!(
        w.log.contains("read cotal.main.chat.> from=3 to=4"),
        "the range above the floor is read back\n{}",
        w.log
    );
    assert_eq!(
        (1..=5).map(|s| copies_of(&w, s)).collect::<Vec<_>>(),
        vec![0, 0, 1, 1, 0],
        "copies of the stranded 3 and 4 only\n{}",
        w.log
    );
    assert!(
        w.b.settled.is_empty(),
        "nothing to settle: {:?}",
        w.b.settled
    );
    assert_eq!(w.d.counters().stranded_read_back, 2);
    // The consumer's own redelivery comes after its ack_wait: the copy collapses on its msg-id
    // and the redelivery is acked.
    let before = w.d.counters().copies_duplicate;
    let d = w.fanout(3, 2);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(copies_of(&w, 3), 1);
    assert!(w.d.counters().copies_duplicate > before, "{}", w.log);
    // The message past the pointer comes as a first delivery, as before.
    let d = w.fanout(5, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(copies_of(&w, 5), 1);
}

#[test]
fn a_bind_with_everything_settled_reads_nothing_back() {
    let mut w = bound_with(4, 4, 0);
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert!(!w.log.contains("read cotal.main.chat.>"), "{}", w.log);
    assert_eq!(w.d.counters().stranded_read_back, 0);
    // Pending deliveries reported at the floor itself: nothing above it to read.
    let mut w = bound_with(4, 4, 3);
    w.boot();
    assert!(!w.log.contains("read cotal.main.chat.>"), "{}", w.log);
}

#[test]
fn a_failed_read_back_is_reported_and_leaves_the_messages_to_the_redelivery() {
    let mut w = bound_with(4, 2, 2);
    w.rule(
        is_read_back,
        Effect::Answer(Outcome::Failed(Failure::Timeout)),
        1,
    );
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(w.d.counters().stranded_reads_failed, 1);
    assert_eq!(copies_of(&w, 3), 0);
    assert!(
        w.events.iter().any(|e| matches!(
            e,
            DeliveryEvent::FeedProblem { feed: Feed::Fanout, detail } if detail.contains("3..=4")
        )),
        "{:?}",
        w.events
    );
    let c = w.d.counters();
    assert_eq!(
        (c.lost, c.gaps_unverified, c.evicted_before_fanout),
        (0, 0, 0),
        "no loss: the redelivery serves them"
    );
    let d = w.fanout(3, 2);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(copies_of(&w, 3), 1);
}

#[test]
fn deliveries_lost_with_the_connection_are_read_back_at_the_rebind() {
    let mut w = served();
    alice_reads_review(&mut w);
    let s1 = w.post("bob", "review", &[]);
    w.fanout(s1, 1);
    // 2 and 3 were on their way to the daemon when the server stopped: the daemon never saw
    // them; the consumer holds them pending.
    let s2 = w.post("bob", "review", &[]);
    let s3 = w.post("bob", "review", &[]);
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    w.b.fanout_pointer = Some(s3);
    w.b.fanout_unsettled = Some((s1, 2));
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert!(
        w.log
            .contains(&format!("read cotal.main.chat.> from={s2} to={s3}")),
        "{}",
        w.log
    );
    assert_eq!((copies_of(&w, s2), copies_of(&w, s3)), (1, 1), "{}", w.log);
}

#[test]
fn a_long_read_back_is_read_in_pages() {
    let mut config = DeliveryConfig::new(space(), shard0(), "D1");
    config.catchup_page = 2;
    let mut w = World::with_config(config);
    w.b.fanout_pointer = Some(5);
    w.b.fanout_unsettled = Some((0, 5));
    alice_reads_review(&mut w);
    for _ in 0..6 {
        w.post("bob", "review", &[]);
    }
    w.boot();
    for (from, to) in [(1, 5), (3, 5), (5, 5)] {
        assert!(
            w.log
                .contains(&format!("read cotal.main.chat.> from={from} to={to}")),
            "pages of 2\n{}",
            w.log
        );
    }
    assert_eq!(
        (1..=6).map(|s| copies_of(&w, s)).collect::<Vec<_>>(),
        vec![1, 1, 1, 1, 1, 0],
        "{}",
        w.log
    );
    assert_eq!(w.d.counters().stranded_read_back, 5);
}

/// The reader consumer (INBOX) the same way: a dinbox entry offered to a reader feed that died
/// with the connection is read back at the rebind and transferred to DLV at once (through the
/// DLV gate), settling nothing; its redelivery collapses on the DLV msg-id and is the one acked
/// and counted.
#[test]
fn dinbox_entries_lost_with_the_connection_are_transferred_at_the_rebind() {
    let mut w = served_two_hop();
    alice_reads_review(&mut w);
    let s = w.post("bob", "review", &[]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(w.b.inbox.len(), 1, "spilled to the dinbox\n{}", w.log);
    assert!(w.dlv_ids("alice").is_empty());
    // The reader consumer handed INBOX 1 to the daemon's feed as the connection dropped.
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    w.b.reader_bound = Some((1, 0, 1));
    w.b.fanout_unsettled = None;
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert!(
        w.log.contains("read cotal.main.dinbox.> from=1 to=1"),
        "{}",
        w.log
    );
    assert_eq!(
        w.dlv_ids("alice").len(),
        1,
        "transferred at once\n{}",
        w.log
    );
    let transferred = w.d.counters().transferred;
    assert_eq!(w.d.counters().stranded_read_back, 1);
    // The redelivery, a minute later: collapses on the msg-id, acked, counted once.
    let r = w.reader(1, 2);
    assert_eq!(w.settled(r), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(w.dlv_ids("alice").len(), 1);
    assert_eq!(w.d.counters().transferred, transferred + 1);
}

/// A read-back entry the decision would not transfer (alice left: her record is tombstoned) is
/// left to its redelivery: nothing written, counted or reported by the read-back.
#[test]
fn a_read_back_entry_not_to_transfer_is_left_to_the_redelivery() {
    let mut w = served_two_hop();
    alice_reads_review(&mut w);
    let s = w.post("bob", "review", &[]);
    w.fanout(s, 1);
    w.acl("alice", &[]);
    let before = w.d.counters().clone();
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    w.b.reader_bound = Some((1, 0, 1));
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert!(
        w.log.contains("read cotal.main.dinbox.> from=1 to=1"),
        "{}",
        w.log
    );
    assert!(w.dlv_ids("alice").is_empty(), "{}", w.log);
    let after = w.d.counters();
    assert_eq!(
        (after.dropped, after.lost, after.transferred),
        (before.dropped, before.lost, before.transferred),
        "the redelivery decides and counts"
    );
}

/// A short page (the stream no longer holds the top of the range) ends the read-back: no read
/// past what came back.
#[test]
fn a_short_page_ends_the_read_back() {
    let mut w = bound_with(5, 2, 3);
    w.b.chat.retain(|m| m.seq != 5);
    w.boot();
    assert_eq!(
        w.log.matches("read cotal.main.chat.>").count(),
        1,
        "{}",
        w.log
    );
    assert_eq!((copies_of(&w, 3), copies_of(&w, 4)), (1, 1), "{}", w.log);
}

/// A read cut by a connection loss is forgotten: its late answer is neither fanned out nor
/// counted as a failed read-back.
#[test]
fn a_read_back_cut_by_a_connection_loss_is_forgotten() {
    let mut w = bound_with(4, 2, 2);
    w.rule(is_read_back, Effect::Hold, 1);
    w.boot();
    assert_eq!(w.held.len(), 1, "{}", w.log);
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    w.release(0, Some(Outcome::Unknown));
    assert_eq!(w.d.counters().stranded_reads_failed, 0, "{}", w.log);
    assert_eq!(copies_of(&w, 3), 0, "{}", w.log);
}

/// Two entries of one owner read back together wait in the DLV gate behind one read of the
/// owner's consumer, and both are written.
#[test]
fn several_read_back_entries_of_one_owner_are_all_transferred() {
    let mut w = served_two_hop();
    alice_reads_review(&mut w);
    for _ in 0..2 {
        let s = w.post("bob", "review", &[]);
        w.fanout(s, 1);
    }
    assert_eq!(w.b.inbox.len(), 2, "{}", w.log);
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    w.b.reader_bound = Some((2, 0, 2));
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert_eq!(w.dlv_ids("alice").len(), 2, "{}", w.log);
}

fn is_dlv_publish(c: &Command) -> bool {
    matches!(c, Command::JsPublish { subject, .. } if subject.contains(".dlv."))
}

/// A read-back entry whose DLV write fails is counted (the redelivery serves it, nothing is
/// lost); one written under an ACL narrowed while it was in flight is swept away, as a reader
/// transfer is (the revocation window).
#[test]
fn a_read_back_write_is_counted_when_it_fails_and_swept_when_revoked() {
    let stranded_entry = |w: &mut World| {
        alice_reads_review(w);
        let s = w.post("bob", "review", &[]);
        w.fanout(s, 1);
        w.feed(Input::Connection(Connection::Lost));
        w.run();
        w.b.reader_bound = Some((1, 0, 1));
        w.rule(is_dlv_publish, Effect::Hold, 1);
        w.feed(Input::Connection(Connection::Restored));
        w.run();
        assert_eq!(w.held.len(), 1, "{}", w.log);
    };
    let mut w = served_two_hop();
    stranded_entry(&mut w);
    w.release(0, Some(Outcome::Failed(Failure::Timeout)));
    assert_eq!(w.d.counters().stranded_reads_failed, 1, "{}", w.log);
    assert_eq!(w.d.counters().lost, 0);

    let mut w = served_two_hop();
    stranded_entry(&mut w);
    w.acl("alice", &[]);
    w.release(0, None);
    w.run();
    for _ in 0..5 {
        w.advance(1_000);
    }
    assert!(
        w.dlv_ids("alice").is_empty(),
        "the copy that landed under the narrowed ACL was swept\n{}",
        w.log
    );
}

/// A daemon shut down while its lease bucket's TTL is being read does not acquire when the
/// answer comes.
#[test]
fn a_shutdown_during_the_ttl_read_acquires_nothing() {
    let mut w = World::new();
    w.rule(
        |c| matches!(c, Command::StreamInfo { stream, .. } if stream == "KV_cotal_delivery_main"),
        Effect::Hold,
        1,
    );
    w.boot();
    assert_eq!(w.held.len(), 1, "{}", w.log);
    w.d.shutdown(w.now());
    w.collect();
    w.run();
    w.release(0, None);
    w.run();
    assert!(
        !w.log.contains("kv.put delivery/lease.0 create"),
        "{}",
        w.log
    );
}

/// A page holding messages outside the range asked for (a driver that ignored the bound) is
/// cut to the range: only what the consumer may have stranded is fanned out.
#[test]
fn a_page_is_cut_to_the_range_asked_for() {
    let mut w = bound_with(4, 2, 2);
    let page: Vec<StoredMessage> = w.b.chat.clone();
    w.rule(
        is_read_back,
        Effect::Answer(Outcome::Success(Reply::Stored(page))),
        1,
    );
    w.boot();
    assert_eq!(
        (1..=5).map(|s| copies_of(&w, s)).collect::<Vec<_>>(),
        vec![0, 0, 1, 1, 0],
        "{}",
        w.log
    );
    assert_eq!(w.d.counters().stranded_read_back, 2);
}

fn fanout_state(delivered: u64, floor: u64, pending: u64) -> crate::io::ConsumerState {
    crate::io::ConsumerState {
        delivered_stream_seq: delivered,
        num_pending: 0,
        num_ack_pending: pending,
        ack_floor_stream_seq: floor,
    }
}

/// Stranded without a bind (issue 19: a consumer leader killed on a cluster while this daemon's
/// connection lives), found by the sequence cursor: the next delivery skips what the lost pull
/// had taken; the gap check that reads the skipped range fans out what CHAT still holds at once.
#[test]
fn a_skipped_delivery_chat_still_holds_is_fanned_out_by_the_gap_check() {
    let (mut w, _, s2) = one_fanned_out_one_not();
    let s3 = w.post("bob", "review", &[]);
    w.fanout(s3, 1);
    assert!(
        w.log
            .contains(&format!("read cotal.main.chat.> from={s2} to={s2}")),
        "{}",
        w.log
    );
    assert_eq!(copies_of(&w, s2), 1, "{}", w.log);
    assert_eq!(w.d.counters().stranded_read_back, 1);
    // Its redelivery, after the ack_wait, collapses and is acked.
    let d = w.fanout(s2, 2);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(copies_of(&w, s2), 1);
}

/// A served world where alice reads `review`, bob posted twice, and fan-out got only the first:
/// `(world, first, second)`.
fn one_fanned_out_one_not() -> (World, u64, u64) {
    let mut w = served();
    alice_reads_review(&mut w);
    let s1 = w.post("bob", "review", &[]);
    w.fanout(s1, 1);
    let s2 = w.post("bob", "review", &[]);
    (w, s1, s2)
}

/// The same with no later delivery to reveal the skip: the fan-out consumer's ack floor stands
/// still between two looks with a delivery pending that fan-out never saw, so the range above it
/// is read back, once per floor.
#[test]
fn a_floor_that_stands_still_over_a_stranded_delivery_is_read_back_once() {
    let (mut w, s1, s2) = one_fanned_out_one_not();
    w.b.fanout_state = Some(fanout_state(s2, s1, 1));
    for _ in 0..11 {
        w.advance(1_000);
    }
    assert!(
        w.log
            .contains(&format!("read cotal.main.chat.> from={s2} to={s2}")),
        "{}",
        w.log
    );
    assert_eq!(copies_of(&w, s2), 1, "{}", w.log);
    // The floor still stands (the redelivery comes after ack_wait): not read again.
    for _ in 0..20 {
        w.advance(1_000);
    }
    assert_eq!(
        w.log.matches("read cotal.main.chat.>").count(),
        1,
        "{}",
        w.log
    );
}

/// A read-back a look asked for fails (on a cluster, the stream may be electing a leader): the
/// next looks read above the same floor again, so the stranded message does not wait out the
/// consumer's `ack_wait`.
#[test]
fn a_floor_read_back_that_fails_is_tried_again_at_a_later_look() {
    let (mut w, s1, s2) = one_fanned_out_one_not();
    w.rule(
        is_read_back,
        Effect::Answer(Outcome::Failed(Failure::Timeout)),
        1,
    );
    w.b.fanout_state = Some(fanout_state(s2, s1, 1));
    for _ in 0..11 {
        w.advance(1_000);
    }
    assert_eq!(w.d.counters().stranded_reads_failed, 1, "{}", w.log);
    assert_eq!(copies_of(&w, s2), 0, "{}", w.log);
    for _ in 0..11 {
        w.advance(1_000);
    }
    assert_eq!(
        w.log.matches("read cotal.main.chat.>").count(),
        2,
        "{}",
        w.log
    );
    assert_eq!(copies_of(&w, s2), 1, "{}", w.log);
}

/// The reader consumer (INBOX) is looked at the same way: a dinbox entry its pull took and lost
/// (no bind follows, the connection lives) is read back once the floor stood still over it, and
/// transferred at once; one the reader holds is not read.
#[test]
fn a_reader_floor_that_stands_still_over_a_lost_entry_is_read_back() {
    let mut w = served_two_hop();
    alice_reads_review(&mut w);
    let s = w.post("bob", "review", &[]);
    w.fanout(s, 1);
    assert_eq!(w.b.inbox.len(), 1, "spilled to the dinbox\n{}", w.log);
    w.b.reader_state = Some(fanout_state(1, 0, 1));
    for _ in 0..11 {
        w.advance(1_000);
    }
    assert!(
        w.log.contains("read cotal.main.dinbox.> from=1 to=1"),
        "{}",
        w.log
    );
    assert_eq!(w.dlv_ids("alice").len(), 1, "{}", w.log);

    // Held: the reader has the delivery, its DLV write in flight.
    let mut w = served_two_hop();
    alice_reads_review(&mut w);
    let s = w.post("bob", "review", &[]);
    w.fanout(s, 1);
    w.rule(is_dlv_publish, Effect::Hold, 1);
    w.reader(1, 1);
    assert_eq!(w.held.len(), 1, "{}", w.log);
    w.b.reader_state = Some(fanout_state(1, 0, 1));
    for _ in 0..11 {
        w.advance(1_000);
    }
    assert!(!w.log.contains("read cotal.main.dinbox.>"), "{}", w.log);
}

#[test]
fn a_moving_floor_or_a_held_delivery_is_not_read_back() {
    // The floor moves between looks: traffic, not a stranding.
    let mut w = served();
    alice_reads_review(&mut w);
    for _ in 0..4 {
        w.post("bob", "review", &[]);
    }
    for floor in 0..4 {
        w.b.fanout_state = Some(fanout_state(4, floor, 1));
        for _ in 0..5 {
            w.advance(1_000);
        }
    }
    assert!(!w.log.contains("read cotal.main.chat.>"), "{}", w.log);
    // The floor stands still over a delivery fan-out holds (its copy's write in flight).
    let (mut w, s1, s2) = one_fanned_out_one_not();
    w.rule(
        |c| matches!(c, Command::JsPublish { subject, .. } if subject.contains(".dlv.")),
        Effect::Hold,
        1,
    );
    w.fanout(s2, 1);
    assert_eq!(w.held.len(), 1, "{}", w.log);
    w.b.fanout_state = Some(fanout_state(s2, s1, 1));
    for _ in 0..12 {
        w.advance(1_000);
    }
    assert!(!w.log.contains("read cotal.main.chat.>"), "{}", w.log);
}
