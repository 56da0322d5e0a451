//! One write per copy (issue 17): fan-out judges each copy as the reader would and writes the
//! ones it may transfer straight to the owner's DLV; everything else spills into the dinbox,
//! where the reader decides it. Driven through the machine with the fake broker.

use super::super::*;
use super::harness::*;
use super::{chat_msg, is_dlv_pub, is_member_put, plant_member, record, served};
use crate::time::Duration;
use bytes::Bytes;

/// The INBOX sequences not yet given to the reader.
fn unread_inbox(w: &World, from: usize) -> Vec<u64> {
    w.b.inbox.iter().skip(from).map(|e| e.0).collect()
}

/// Fans out a first message to every member: this daemon reads each owner's DLV consumer
/// first (the copies wait parked in the gate), then writes the copies straight to DLV.
fn warm(w: &mut World) -> u64 {
    let before = w.d.counters().transferred_direct;
    let s = w.post("bob", "review", &[]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert!(w.d.counters().transferred_direct > before, "{}", w.log);
    assert!(w.b.inbox.is_empty(), "nothing spilled\n{}", w.log);
    s
}

fn is_dlv_read(c: &Command) -> bool {
    matches!(c, Command::ConsumerInfo { consumer, .. } if consumer.starts_with("dlv_"))
}

fn members(w: &mut World, owners: &[&str]) {
    for o in owners {
        plant_member(w, &record("review", o, 0, 1), None);
        w.acl(o, &["review"]);
    }
}

fn dlv_payload_of(w: &World, id: &str) -> Bytes {
    w.b.dlv
        .iter()
        .find(|e| e.2 == id)
        .map(|e| e.3.clone())
        .unwrap_or_else(|| panic!("no DLV copy {id}\n{}", w.log))
}

#[test]
fn in_steady_state_each_copy_is_one_dlv_write_and_the_message_is_acked_after_every_pub_ack() {
    let mut w = served();
    members(&mut w, &["alice", "carol"]);
    warm(&mut w);
    let inbox_before = w.b.inbox.len();
    let s = w.post("bob", "review", &[]);
    w.rule(is_dlv_pub, Effect::Hold, 2);
    let d = w.fanout(s, 1);
    assert_eq!(w.held.len(), 2, "both copies pipelined\n{}", w.log);
    assert!(w.settled(d).is_empty(), "not before the PubAcks");
    w.release(0, None);
    assert!(w.settled(d).is_empty(), "not before the last PubAck");
    w.release(0, None);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(
        w.b.inbox.len(),
        inbox_before,
        "nothing went through the dinbox"
    );
    for o in ["alice", "carol"] {
        let id = format!("m{s}:{o}:1");
        assert!(w.dlv_ids(o).contains(&id), "{}", w.log);
        // The record reference agents read: the message itself, as the reader writes it.
        assert_eq!(dlv_payload_of(&w, &id), json::encode(&chat_msg(&w, s)));
    }
    let c = w.d.counters();
    // Written: all four (the warm-up's and these) straight to DLV.
    assert_eq!(
        (c.transferred_direct, c.transferred, c.copies_written),
        (4, 4, 4)
    );
}

#[test]
fn a_first_copy_waits_parked_for_the_owners_dlv_read_and_the_next_one_parks_behind_it() {
    let mut w = served();
    members(&mut w, &["alice"]);
    let s1 = w.post("bob", "review", &[]);
    let s2 = w.post("bob", "review", &[]);
    w.rule(is_dlv_read, Effect::Hold, 1);
    let d1 = w.fanout(s1, 1);
    let d2 = w.fanout(s2, 1);
    assert_eq!(w.held.len(), 1, "one read for both\n{}", w.log);
    assert!(w.b.dlv.is_empty() && w.b.inbox.is_empty(), "{}", w.log);
    assert!(w.settled(d1).is_empty() && w.settled(d2).is_empty());
    w.release(0, None);
    assert_eq!(w.settled(d1), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(w.settled(d2), vec![AckKind::Ack]);
    assert_eq!(
        w.dlv_ids("alice"),
        vec![format!("m{s1}:alice:1"), format!("m{s2}:alice:1")],
        "CHAT order\n{}",
        w.log
    );
    assert_eq!(w.d.counters().transferred_direct, 2);
}

#[test]
fn a_copy_spills_while_its_owner_has_dinbox_entries_so_dlv_keeps_chat_order() {
    let mut w = served();
    // Alice's ACL is not known yet: the reader must decide her first copy (a deferral).
    plant_member(&mut w, &record("review", "alice", 0, 1), None);
    let s1 = w.post("bob", "review", &[]);
    w.fanout(s1, 1);
    assert_eq!(unread_inbox(&w, 0).len(), 1, "spilled\n{}", w.log);
    w.acl("alice", &["review"]);
    // Her entry still waits in the dinbox: the next copy spills behind it.
    let s2 = w.post("bob", "review", &[]);
    w.fanout(s2, 1);
    assert_eq!(unread_inbox(&w, 0).len(), 2, "{}", w.log);
    assert_eq!(w.d.counters().transferred_direct, 0);
    w.drain_reader();
    // Nothing of alice's is in the dinbox any more: straight to DLV.
    let s3 = w.post("bob", "review", &[]);
    w.fanout(s3, 1);
    assert_eq!(w.d.counters().transferred_direct, 1, "{}", w.log);
    let order: Vec<String> = [s1, s2, s3]
        .iter()
        .map(|s| format!("m{s}:alice:1"))
        .collect();
    assert_eq!(w.dlv_ids("alice"), order, "CHAT order\n{}", w.log);
}

#[test]
fn two_hop_sends_every_copy_through_the_dinbox() {
    let mut config = DeliveryConfig::new(space(), shard0(), "D1");
    config.two_hop = true;
    let mut w = World::with_config(config);
    w.boot();
    members(&mut w, &["alice"]);
    let first = w.post("bob", "review", &[]);
    w.fanout(first, 1);
    w.drain_reader();
    assert_eq!(w.dlv_ids("alice"), vec![format!("m{first}:alice:1")]);
    let s = w.post("bob", "review", &[]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(w.inbox_ids("alice").last(), Some(&format!("m{s}:alice:1")));
    assert_eq!(w.d.counters().transferred_direct, 0);
}

#[test]
fn a_failed_direct_write_naks_the_message_and_its_redelivery_collapses_on_the_msg_id() {
    let mut w = served();
    members(&mut w, &["alice", "carol"]);
    warm(&mut w);
    let s = w.post("bob", "review", &[]);
    w.rule(is_dlv_pub, Effect::ExecuteThenUnknown, 1);
    let d = w.fanout(s, 1);
    assert_eq!(
        w.settled(d),
        vec![AckKind::Nak {
            delay: Duration::from_millis(1000)
        }]
    );
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, DeliveryEvent::CopyWriteFailed { seq, .. } if *seq == s)),
        "{}",
        w.log
    );
    let d2 = w.fanout(s, 2);
    assert_eq!(w.settled(d2), vec![AckKind::Ack], "{}", w.log);
    for o in ["alice", "carol"] {
        let id = format!("m{s}:{o}:1");
        assert_eq!(
            w.dlv_ids(o).iter().filter(|i| **i == id).count(),
            1,
            "one copy per owner\n{}",
            w.log
        );
    }
    assert_eq!(w.d.health(), &DeliveryHealth::Active);
}

/// Acks out of order (G6): alice's agent acked every copy fan-out wrote her but the first, so
/// her consumer's ack floor stays below it (the fake reports a floor of 0). One copy is unread,
/// so the next copy is written; the daemon's own copies above the floor fill the cap, so the
/// read reports alice at risk (the next writes may rotate the unacked first copy out), once.
#[test]
fn direct_copies_acked_out_of_order_put_the_owner_at_risk() {
    let mut w = served();
    members(&mut w, &["alice"]);
    // Two senders, so neither reaches its share of alice's DLV.
    for i in 0..1000 {
        let s = w.post(["bob", "carol"][i % 2], "review", &[]);
        let d = w.fanout(s, 1);
        assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    }
    assert_eq!(w.dlv_ids("alice").len(), 1000, "{}", w.log);
    w.b.dlv_acked.insert("alice".into(), 999);
    let s = w.post("bob", "review", &[]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    assert_eq!(w.dlv_ids("alice").len(), 1001, "written: {}", w.log);
    let risks: Vec<_> = w
        .events
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::BackstopAtRisk {
                owner,
                span,
                unread,
            } if owner.as_str() == "alice" => Some((*span, *unread)),
            _ => None,
        })
        .collect();
    assert_eq!(risks, vec![(1000, 1)], "{}", w.log);
    assert_eq!(w.d.counters().dlv_at_risk, 1);
    assert_eq!(w.d.counters().dlv_shed, 0);
}

#[test]
fn a_full_dlv_sheds_the_parked_copy_with_a_reported_loss() {
    let mut w = served();
    members(&mut w, &["alice"]);
    // Alice's agent is far behind: 998 unread copies wait in her DLV; the warm-up adds one.
    for i in 0..998u64 {
        w.b.dlv.push((
            i + 1,
            "cotal.main.dlv.alice".into(),
            format!("old-{i}"),
            Bytes::new(),
        ));
    }
    warm(&mut w);
    assert_eq!(w.dlv_ids("alice").len(), 999);
    let s = w.post("bob", "review", &[]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(w.dlv_ids("alice").len(), 1000, "room for exactly one");
    let s2 = w.post("bob", "review", &[]);
    let d2 = w.fanout(s2, 1);
    assert_eq!(
        w.settled(d2),
        vec![AckKind::Ack],
        "shed, not held\n{}",
        w.log
    );
    assert_eq!(w.dlv_ids("alice").len(), 1000, "no unread copy pushed out");
    assert!(w.b.inbox.is_empty(), "{}", w.log);
    assert_eq!((w.d.counters().dlv_shed, w.d.counters().lost), (1, 1));
    assert!(
        w.events.iter().any(|e| matches!(e,
            DeliveryEvent::CopyShed { owner, seq, unread, .. }
                if owner.as_str() == "alice" && *seq == s2 && *unread == 1000)),
        "{}",
        w.log
    );
    // The member is told: the loss goes to its loss record.
    let notices = w.b.kv.get("cotal_losses_main");
    assert!(
        notices.is_some_and(|b| b.keys().any(|k| k.contains("alice"))),
        "{notices:?}\n{}",
        w.log
    );
    // The agent catches up: the next copy goes straight again after one more read.
    w.b.dlv_acked.insert("alice".into(), 500);
    let s3 = w.post("bob", "review", &[]);
    let d3 = w.fanout(s3, 1);
    assert_eq!(w.settled(d3), vec![AckKind::Ack]);
    assert!(w.dlv_ids("alice").contains(&format!("m{s3}:alice:1")));
}

#[test]
fn a_copy_past_the_frontier_of_a_running_leave_is_not_written_straight_to_dlv() {
    let mut w = served();
    members(&mut w, &["alice"]);
    warm(&mut w);
    let before = w.post("bob", "review", &[]);
    // Alice leaves; her tombstone's compare-and-set is in flight.
    w.rule(is_member_put, Effect::Hold, 1);
    w.leave("alice", "review", 1, "L1");
    assert_eq!(w.held.len(), 1, "{}", w.log);
    let after = w.post("bob", "review", &[]);
    let d = w.fanout(before, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert!(
        w.dlv_ids("alice").contains(&format!("m{before}:alice:1")),
        "inside the interval either way\n{}",
        w.log
    );
    let from = w.b.inbox.len();
    let d = w.fanout(after, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert!(!w.dlv_ids("alice").contains(&format!("m{after}:alice:1")));
    assert_eq!(unread_inbox(&w, from).len(), 1, "spilled for the reader");
    // The tombstone lands: the reader drops the spilled copy as past the leave.
    w.release(0, None);
    let e = unread_inbox(&w, from);
    let r = w.reader(e[0], 1);
    assert_eq!(w.settled(r), vec![AckKind::Ack], "{}", w.log);
    assert!(!w.dlv_ids("alice").contains(&format!("m{after}:alice:1")));
    assert!(w.d.counters().dropped >= 1);
}

#[test]
fn a_narrowing_that_races_a_direct_write_is_swept_after_it_lands() {
    let mut w = served();
    members(&mut w, &["alice"]);
    warm(&mut w);
    let s = w.post("bob", "review", &[]);
    w.rule(is_dlv_pub, Effect::Hold, 1);
    let d = w.fanout(s, 1);
    assert_eq!(w.held.len(), 1);
    w.note("fan-out judged under the old ACL; the narrowing is swept before the copy lands");
    w.acl("alice", &[]);
    w.release(0, None);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert!(
        !w.dlv_ids("alice").contains(&format!("m{s}:alice:1")),
        "taken back by the sweep\n{}",
        w.log
    );
    // The warm-up copy by the first sweep, this one by the sweep its landing asked for.
    assert_eq!(w.d.counters().dlv_revoked, 2, "{}", w.log);
}

/// The decision is taken again when the DLV gate lets a parked copy in: a narrowing that arrived
/// while the copy waited for the owner's consumer read sends it to the reader, which drops it.
/// The copy never lands in DLV, so no sweep has to take it back.
#[test]
fn a_narrowing_while_a_copy_is_parked_is_decided_again_and_the_copy_never_lands() {
    let mut w = served();
    members(&mut w, &["alice", "carol"]);
    let s = w.post("bob", "review", &[]);
    w.rule(is_dlv_read, Effect::Hold, 2);
    let d = w.fanout(s, 1);
    assert_eq!(w.held.len(), 2, "both first copies parked\n{}", w.log);
    w.note("alice's ACL narrows while her copy is parked");
    w.acl("alice", &[]);
    w.release(0, None);
    w.release(0, None);
    w.drain_reader();
    assert_eq!(w.settled(d), vec![AckKind::Ack], "{}", w.log);
    let alice = format!("m{s}:alice:1");
    assert!(
        !w.dlv_ids("alice").contains(&alice),
        "never written\n{}",
        w.log
    );
    assert!(w.inbox_ids("alice").contains(&alice), "spilled\n{}", w.log);
    assert!(
        w.dlv_ids("carol").contains(&format!("m{s}:carol:1")),
        "carol's copy is written as before\n{}",
        w.log
    );
    let c = w.d.counters();
    assert_eq!(c.transferred_direct, 1, "carol's only");
    assert_eq!(c.dropped, 1, "the reader dropped alice's");
    assert_eq!(c.dlv_revoked, 0, "nothing to take back");
}
