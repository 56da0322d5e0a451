//! insta transcripts (R21) of the daemon's main flows, in the harness's one-line-per-step format.

use super::super::*;
use super::harness::*;
use crate::wire::message::CotalMessage;
use crate::wire::records::{DeliveryLease, Plane3Entry};

fn served() -> World {
    let mut w = World::new();
    w.boot();
    assert!(w.d.serving());
    w.log.clear();
    w
}

#[test]
fn join_catch_up_active() {
    let mut w = served();
    w.acl("alice", &["review"]);
    w.post("bob", "review", &[]);
    w.post("bob", "general", &[]);
    w.post("alice", "review", &[]);
    w.note("alice joins review with her armed watermark 0; the frontier is 3");
    w.join("alice", "review", Some(0), "u1");
    w.note("a post after the join is routed by fan-out from the in-memory index");
    let s = w.post("bob", "review", &[]);
    w.fanout(s, 1);
    insta::assert_snapshot!(w.log);
}

#[test]
fn rejoin_over_a_tombstone() {
    // The reader's G2 judgment of a pending entry: every copy through the dinbox.
    let mut w = World::two_hop();
    w.boot();
    w.log.clear();
    w.acl("alice", &["review"]);
    w.join("alice", "review", None, "j1");
    let s1 = w.post("bob", "review", &[]);
    w.fanout(s1, 1);
    w.note("leave generation 1 at the frontier");
    w.leave("alice", "review", 1, "l1");
    let gap = w.post("bob", "review", &[]);
    w.fanout(gap, 1);
    w.note("rejoin: generation max(1+1, frontier+1), the old interval goes to the history");
    w.join("alice", "review", Some(0), "j2");
    w.note("the pending generation-1 entry is judged by its own interval (G2) and transfers");
    w.reader(1, 1);
    insta::assert_snapshot!(w.log);
}

#[test]
fn eviction_during_catch_up() {
    let mut w = served();
    w.acl("alice", &["review"]);
    for _ in 0..4 {
        w.post("bob", "review", &[]);
    }
    w.note("the stream discarded seq 1..=2 before catch-up ran");
    w.b.chat.drain(..2);
    w.join("alice", "review", Some(0), "u1");
    insta::assert_snapshot!(w.log);
}

#[test]
fn fan_out_to_n_members() {
    let mut w = served();
    for o in ["alice", "carol", "dave", "erin"] {
        w.acl(o, &["review"]);
        w.join(o, "review", None, o);
    }
    w.log.clear();
    w.note("four members; erin's first copy fails and the message is retried");
    let s = w.post("bob", "review", &[]);
    let erin =
        |c: &Command| matches!(c, Command::JsPublish { subject, .. } if subject.ends_with(".erin"));
    w.rule(erin, Effect::Answer(Outcome::Failed(Failure::Timeout)), 1);
    w.fanout(s, 1);
    w.fanout(s, 2);
    insta::assert_snapshot!(w.log);
}

#[test]
fn reader_deny_defer_transfer() {
    let mut w = served();
    w.acl("alice", &["review"]);
    w.acl("erin", &[]);
    let s = w.post("bob", "review", &[]);
    let m = w.b.chat.iter().find(|m| m.seq == s).unwrap();
    let msg = CotalMessage::decode(&m.payload).unwrap();
    let mut put = |owner: &str, e: Plane3Entry| {
        let seq = w.b.inbox.len() as u64 + 1;
        let id = crate::wire::msgid::Plane3MsgId::for_entry(&e, &id(owner)).to_string();
        w.b.inbox.push((
            seq,
            format!("cotal.main.dinbox.{owner}"),
            id,
            json::encode(&e),
        ));
    };
    put(
        "alice",
        Plane3Entry::live_mention(msg.clone(), ch("review"), s),
    );
    put(
        "erin",
        Plane3Entry::live_mention(msg.clone(), ch("review"), s),
    );
    put(
        "frank",
        Plane3Entry::live_mention(msg.clone(), ch("review"), s),
    );
    put(
        "alice",
        Plane3Entry::durable_channel(msg, ch("review"), s, 7),
    );
    w.note("transfer: alice's ACL covers review");
    w.reader(1, 1);
    w.note("deny: erin's ACL is []");
    w.reader(2, 1);
    w.note("defer: frank has no ACL row; at the ceiling the loss is reported");
    w.reader(3, 1);
    w.reader(3, 10);
    w.note("deny: a durable entry with no membership record");
    w.reader(4, 1);
    insta::assert_snapshot!(w.log);
}

#[test]
fn lease_takeover() {
    let mut w = World::new();
    w.note("another daemon holds lease.0");
    let held = DeliveryLease::new("D0", crate::time::UnixMillis(BASE_WALL), true);
    w.b.kv_write(
        &KvBucket::Delivery.name(&space()),
        "lease.0",
        KvOperation::Put,
        json::encode(&held),
    );
    w.boot();
    w.note("its last write expires (bucket max_age); our retry creates the key");
    let inputs = w.b.kv_write(
        &KvBucket::Delivery.name(&space()),
        "lease.0",
        KvOperation::Delete,
        bytes::Bytes::new(),
    );
    assert!(inputs.is_empty());
    w.advance(1_000);
    assert!(w.d.serving());
    w.note("a successor takes the key over: our renewal's CAS fails and all work stops");
    let successor = DeliveryLease::new("D2", crate::time::UnixMillis(BASE_WALL + 9_000), false);
    w.b.kv_write(
        &KvBucket::Delivery.name(&space()),
        "lease.0",
        KvOperation::Put,
        json::encode(&successor),
    );
    w.quiet_lease = false;
    w.advance(15_000);
    w.note("shutdown releases nothing: the key is the successor's (D6)");
    let now = w.now();
    w.d.shutdown(now);
    w.collect();
    w.run();
    insta::assert_snapshot!(w.log);
}
