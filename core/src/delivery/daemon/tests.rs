#![allow(clippy::unwrap_used)]

mod harness;
mod transcript;

use super::*;
use crate::time::Duration;
use crate::wire::records::MembershipRecord;
use harness::*;

fn served() -> World {
    let mut w = World::new();
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    w
}

#[test]
fn boot_acquires_the_lease_before_anything_else_and_ready_after_binding() {
    let mut w = World::new();
    w.boot();
    let cmds: Vec<&str> = w
        .log
        .lines()
        .filter(|l| l.contains(" cmd "))
        .map(|l| l.split_once(" cmd ").unwrap().1.trim())
        .collect();
    assert!(
        cmds[0].starts_with("kv.put delivery/lease.0 create"),
        "{}",
        w.log
    );
    let ready = cmds.iter().position(|c| c.contains("ready=true")).unwrap();
    let consume = cmds.iter().rposition(|c| c.starts_with("consume")).unwrap();
    let sub = cmds.iter().position(|c| c.starts_with("sub ")).unwrap();
    assert!(ready > consume && ready > sub, "{}", w.log);
    assert_eq!(w.d.health(), &DeliveryHealth::Active, "{}", w.log);
    assert_eq!(w.d.lease_state(), LeaseState::Ready);
}

fn member_bucket() -> String {
    KvBucket::Members.name(&space())
}

fn lease_bucket() -> String {
    KvBucket::Delivery.name(&space())
}

fn is_member_put(c: &Command) -> bool {
    matches!(c, Command::KvPut { bucket, .. } if bucket.starts_with("cotal_members_"))
}

fn is_catch_up_read(c: &Command) -> bool {
    matches!(c, Command::ReadStream { .. })
}

fn is_dinbox_pub(c: &Command) -> bool {
    matches!(c, Command::JsPublish { subject, .. } if subject.contains(".dinbox."))
}

fn is_dlv_pub(c: &Command) -> bool {
    matches!(c, Command::JsPublish { subject, .. } if subject.contains(".dlv."))
}

fn ok_data(w: &World, uuid: &str) -> serde_json::Value {
    let r = w
        .reply(uuid)
        .unwrap_or_else(|| panic!("no reply {uuid}\n{}", w.log));
    assert!(r.ok, "reply {uuid} not ok: {:?}\n{}", r.error, w.log);
    r.data.unwrap()
}

fn err_text(w: &World, uuid: &str) -> String {
    let r = w
        .reply(uuid)
        .unwrap_or_else(|| panic!("no reply {uuid}\n{}", w.log));
    assert!(!r.ok, "reply {uuid} ok\n{}", w.log);
    r.error.unwrap()
}

/// Writes a membership record directly (another writer), with an optional stored fence.
fn plant_member(w: &mut World, rec: &MembershipRecord, fence: Option<u64>) {
    let mut rec = rec.clone();
    if let Some(f) = fence {
        rec.extra
            .insert(crate::registry::FENCE_FIELD.into(), f.into());
    }
    let key = member_key(&rec.channel, &rec.owner);
    let inputs =
        w.b.kv_write(&member_bucket(), &key, KvOperation::Put, json::encode(&rec));
    for i in inputs {
        w.feed(i);
    }
    w.run();
}

fn record(channel: &str, owner: &str, j: u64, generation: u64) -> MembershipRecord {
    MembershipRecord::fresh_join(
        ch(channel),
        id(owner),
        j,
        generation,
        "OTHER",
        crate::time::UnixMillis(1),
    )
}

#[test]
fn join_catches_up_skipping_own_spoofed_and_other_channels_then_activates_b18() {
    let mut w = served();
    w.acl("alice", &["review"]);
    let s1 = w.post("bob", "review", &[]);
    w.post("bob", "general", &[]);
    w.post("alice", "review", &[]);
    let spoof = CotalMessage::new(
        "spoof",
        crate::time::UnixMillis(1),
        space(),
        crate::wire::message::Sender::new(id("carol"), "carol"),
        crate::wire::message::Route::Channel(ch("review")),
        vec![],
    );
    w.post_raw("cotal.main.chat.bob.review", json::encode(&spoof));
    w.join("alice", "review", Some(0), "u1");
    let data = ok_data(&w, "u1");
    assert_eq!(data["durable"], true, "{}", w.log);
    let g = data["generation"].as_u64().unwrap();
    assert_eq!(g, 5, "G34: generation = frontier + 1");
    assert_eq!(
        data["joinCursor"], 0,
        "G1: the watermark is the join cursor"
    );
    assert_eq!(w.inbox_ids("alice"), vec![format!("m{s1}:alice:{g}")]);
    let rec = w.b.member("review", "alice").unwrap();
    assert!(rec.is_activated());
    assert_eq!(
        crate::registry::stored_fence(&rec).0,
        1,
        "stamped with the lease token"
    );
}

#[test]
fn b19_busy_other_channel_is_no_false_eviction() {
    let mut w = served();
    w.acl("alice", &["review"]);
    for _ in 0..40 {
        w.post("bob", "general", &[]);
    }
    w.join("alice", "review", Some(3), "u1");
    assert_eq!(ok_data(&w, "u1")["durable"], true, "{}", w.log);
}

#[test]
fn b20_a_sender_subject_at_its_cap_inside_the_window_is_reported_evicted() {
    let mut w = served();
    w.acl("alice", &["review"]);
    // J = 0; bob posted 1001 times on review; the stream discarded his oldest (seq 1).
    for _ in 0..1001 {
        w.post("bob", "review", &[]);
    }
    w.b.chat.remove(0);
    w.post("carol", "general", &[]); // keeps the stream's first seq honest: 2
    w.join("alice", "review", Some(0), "u1");
    let data = ok_data(&w, "u1");
    assert_eq!(data["durable"], false);
    assert_eq!(data["reason"], REASON_PARTIALLY_EVICTED);
    let g = data["generation"].as_u64().unwrap();
    let ev = w
        .events
        .iter()
        .find_map(|e| match e {
            DeliveryEvent::Evicted {
                from_seq, to_seq, ..
            } => Some((*from_seq, *to_seq)),
            _ => None,
        })
        .unwrap();
    assert_eq!(ev, (1, 1));
    let rec = w.b.member("review", "alice").unwrap();
    assert_eq!(rec.generation, g);
    assert_eq!(
        rec.leave_cursor,
        Some(1002),
        "tombstoned at the fence (I13)"
    );
    assert_eq!(
        w.inbox_ids("alice").len(),
        1000,
        "everything retained is still copied"
    );
    assert_eq!(w.d.counters().evicted_ranges, 1);
}

#[test]
fn b9_b21_leave_during_catch_up_wins_and_activation_is_refused() {
    let mut w = served();
    w.acl("alice", &["review"]);
    w.post("bob", "review", &[]);
    w.rule(is_catch_up_read, Effect::Hold, 1);
    w.join("alice", "review", Some(0), "join");
    assert_eq!(w.held.len(), 1, "{}", w.log);
    assert!(w.reply("join").is_none());
    let g = w.b.member("review", "alice").unwrap().generation;
    // The leave is not stuck behind the catch-up (G22): it runs and tombstones now.
    w.leave("alice", "review", g, "leave");
    assert_eq!(ok_data(&w, "leave")["channel"], "review", "{}", w.log);
    let rec = w.b.member("review", "alice").unwrap();
    assert_eq!(rec.leave_cursor, Some(1));
    w.release(0, None);
    let data = ok_data(&w, "join");
    assert_eq!(data["durable"], false, "{}", w.log);
    assert_eq!(data["reason"], REASON_SUPERSEDED);
    let rec = w.b.member("review", "alice").unwrap();
    assert_eq!(rec.leave_cursor, Some(1), "no resurrection (I17)");
    assert!(!rec.is_activated());
}

#[test]
fn a_leave_running_when_catch_up_ends_is_waited_for() {
    let mut w = served();
    w.acl("alice", &["review"]);
    w.post("bob", "review", &[]);
    w.rule(is_catch_up_read, Effect::Hold, 1);
    w.join("alice", "review", Some(0), "join");
    let g = w.b.member("review", "alice").unwrap().generation;
    // Hold the leave's tombstone write, then let catch-up finish.
    w.rule(is_member_put, Effect::Hold, 1);
    w.leave("alice", "review", g, "leave");
    assert_eq!(w.held.len(), 2, "{}", w.log);
    w.release(0, None); // the catch-up read
    assert!(
        w.reply("join").is_none(),
        "activation waits for the leave\n{}",
        w.log
    );
    w.release(0, None); // the tombstone
    assert_eq!(
        ok_data(&w, "join")["reason"],
        REASON_SUPERSEDED,
        "{}",
        w.log
    );
}

#[test]
fn a_second_join_of_the_same_key_waits_for_the_first() {
    let mut w = served();
    w.acl("alice", &["review"]);
    w.post("bob", "review", &[]);
    w.rule(is_catch_up_read, Effect::Hold, 1);
    w.join("alice", "review", Some(0), "j1");
    w.join("alice", "review", Some(0), "j2");
    assert!(w.reply("j2").is_none(), "{}", w.log);
    // Another key is not blocked.
    w.acl("bob", &["general"]);
    w.join("bob", "general", None, "other");
    assert_eq!(ok_data(&w, "other")["durable"], true);
    w.release(0, None);
    let g1 = ok_data(&w, "j1")["generation"].clone();
    let d2 = ok_data(&w, "j2");
    assert_eq!(d2["durable"], true);
    assert_eq!(d2["generation"], g1, "I19: idempotent join");
}

#[test]
fn b8_b15_fanout_and_reader_route_by_interval_not_by_activation() {
    let mut w = served();
    w.acl("alice", &["review"]);
    // A pending (activated:false) record with J=0, and a tombstone 0..2 for dave.
    plant_member(&mut w, &record("review", "alice", 0, 1), None);
    let mut dave = record("review", "dave", 0, 1);
    dave.state = crate::wire::records::MemberState::LiveConfirmed;
    dave.leave_cursor = Some(2);
    plant_member(&mut w, &dave, None);
    w.acl("dave", &["review"]);
    let s1 = w.post("bob", "review", &[]);
    let s2 = w.post("bob", "review", &[]);
    let s3 = w.post("bob", "review", &[]);
    for s in [s1, s2, s3] {
        let d = w.fanout(s, 1);
        assert_eq!(w.settled(d), vec![AckKind::Ack]);
    }
    assert_eq!(w.inbox_ids("alice").len(), 3);
    assert_eq!(
        w.inbox_ids("dave"),
        vec!["m1:dave:1".to_owned(), "m2:dave:1".to_owned()],
        "the tombstone routes its pre-leave window only"
    );
    for seq in 1..=5 {
        w.reader(seq, 1);
    }
    assert_eq!(w.dlv_ids("alice").len(), 3, "{}", w.log);
    assert_eq!(w.dlv_ids("dave").len(), 2);
}

#[test]
fn fanout_acks_only_after_every_entry_is_stored_and_issues_them_all_at_once() {
    let mut w = served();
    for o in ["alice", "carol", "dave"] {
        plant_member(&mut w, &record("review", o, 0, 1), None);
    }
    let s = w.post("bob", "review", &[]);
    w.rule(is_dinbox_pub, Effect::Hold, 3);
    let d = w.fanout(s, 1);
    assert_eq!(w.held.len(), 3, "pipelined\n{}", w.log);
    assert!(w.settled(d).is_empty());
    w.release(0, None);
    w.release(0, None);
    assert!(w.settled(d).is_empty(), "not before the last PubAck");
    w.release(0, None);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(w.d.counters().copies_written, 3);
}

#[test]
fn fanout_naks_with_backoff_on_a_failed_or_unknown_publish_and_the_retry_collapses() {
    let mut w = served();
    for o in ["alice", "carol"] {
        plant_member(&mut w, &record("review", o, 0, 1), None);
    }
    let s = w.post("bob", "review", &[]);
    w.rule(is_dinbox_pub, Effect::ExecuteThenUnknown, 1);
    let d = w.fanout(s, 1);
    assert_eq!(
        w.settled(d),
        vec![AckKind::Nak {
            delay: Duration::from_millis(1000)
        }]
    );
    assert!(
        matches!(w.d.health(), DeliveryHealth::Degraded(r) if r.contains(&DegradedReason::WritesFailing))
    );
    w.rule(
        is_dinbox_pub,
        Effect::Answer(Outcome::Failed(Failure::Timeout)),
        1,
    );
    let d2 = w.fanout(s, 2);
    assert_eq!(
        w.settled(d2),
        vec![AckKind::Nak {
            delay: Duration::from_millis(2000)
        }]
    );
    let d3 = w.fanout(s, 3);
    assert_eq!(w.settled(d3), vec![AckKind::Ack]);
    assert_eq!(w.inbox_ids("alice").len() + w.inbox_ids("carol").len(), 2);
    assert!(w.d.counters().copies_duplicate >= 1);
    assert_eq!(w.d.health(), &DeliveryHealth::Active);
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, DeliveryEvent::CopyWriteFailed { seq, .. } if *seq == s))
    );
}

#[test]
fn fanout_terminates_spoofs_garbage_and_non_chat_g32() {
    let mut w = served();
    let spoof = CotalMessage::new(
        "x",
        crate::time::UnixMillis(1),
        space(),
        crate::wire::message::Sender::new(id("carol"), "carol"),
        crate::wire::message::Route::Channel(ch("review")),
        vec![],
    );
    let a = w.post_raw("cotal.main.chat.bob.review", json::encode(&spoof));
    let b = w.post_raw(
        "cotal.main.chat.bob.review",
        bytes::Bytes::from_static(b"{"),
    );
    let c = w.post_raw("cotal.other.chat.bob.review", json::encode(&spoof));
    for s in [a, b, c] {
        let d = w.fanout(s, 1);
        assert_eq!(w.settled(d), vec![AckKind::Term]);
    }
    assert_eq!(w.d.counters().fanout_anomalies, 3);
}

#[test]
fn c8_live_channel_mentions_route_within_the_acl_only() {
    let mut w = served();
    w.channel_class("lobby", "live");
    w.presence("bob", "Bob");
    w.presence("carol", "carol");
    w.acl("bob", &["lobby"]);
    w.acl("carol", &["other"]);
    plant_member(&mut w, &record("lobby", "dave", 0, 1), None); // inert on a live channel (G38)
    let s = w.post("alice", "lobby", &["bob", "carol"]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(w.inbox_ids("bob"), vec![format!("m{s}:bob:0")]);
    assert!(w.inbox_ids("carol").is_empty());
    assert!(w.inbox_ids("dave").is_empty());
}
