//! `@mention` routing through the daemon machine (issues 15 item 3 and 21 item 2): presence
//! identity, name squatting, and what an unresolved mention reports.

use super::super::*;
use super::harness::*;
use super::served;
use crate::delivery::daemon::index::{PresenceFault, PresenceIgnored};
use crate::delivery::route::MentionSkipReason;
use bytes::Bytes;

/// Writes a raw presence record under `key` (the KV key the broker let the writer use).
fn presence_as(w: &mut World, key: &str, card_id: &str, name: &str) {
    let value = serde_json::json!({
        "card": {"id": card_id, "name": name, "kind": "agent"},
        "status": "idle",
        "ts": 1
    });
    let bucket = KvBucket::Presence.name(&space());
    let inputs = w.b.kv_write(
        &bucket,
        key,
        KvOperation::Put,
        Bytes::from(value.to_string()),
    );
    for i in inputs {
        w.feed(i);
    }
    w.run();
}

fn ignored(w: &World) -> Vec<PresenceIgnored> {
    w.events
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::PresenceIgnored(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

fn unresolved(w: &World) -> Vec<(String, MentionSkipReason)> {
    w.events
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::MentionUnresolved { name, reason, .. } => Some((name.clone(), *reason)),
            _ => None,
        })
        .collect()
}

/// Issue 21 item 2: mallory (key and card.id both `mallory`) presents `alice`, a name reserved
/// for the provisioned identity `alice`. `@alice` still gives alice her copy; the squat is one
/// event and one count, however often mallory heartbeats.
#[test]
fn a_squatted_name_still_routes_the_mention_to_its_provisioned_owner() {
    let mut w = served();
    w.channel_class("lobby", "live");
    w.acl("alice", &["lobby"]);
    w.acl("mallory", &["lobby"]);
    w.presence("alice", "alice");
    for _ in 0..3 {
        presence_as(&mut w, "mallory", "mallory", "Alice");
    }
    let s = w.post("bob", "lobby", &["alice"]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(w.copy_ids("alice"), vec![format!("m{s}:alice:0")]);
    assert!(w.copy_ids("mallory").is_empty());
    assert_eq!(
        ignored(&w),
        vec![PresenceIgnored {
            key: "mallory".into(),
            name: "Alice".into(),
            fault: PresenceFault::NameReserved { owner: id("alice") },
        }]
    );
    assert_eq!(w.d.counters().presence_ignored, 1);
    assert_eq!(unresolved(&w), vec![]);
}

/// Issue 15 item 3: a presence whose key is not its card.id is ignored (it cannot steal bob's
/// copy nor make him ambiguous) and reported once.
#[test]
fn a_presence_key_that_is_not_its_card_id_cannot_take_a_mention() {
    let mut w = served();
    w.channel_class("lobby", "live");
    w.acl("bob", &["lobby"]);
    w.acl("eve", &["lobby"]);
    w.presence("bob", "bob");
    presence_as(&mut w, "eve", "bob", "bob");
    presence_as(&mut w, "eve", "bob", "bob");
    let s = w.post("alice", "lobby", &["bob"]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert_eq!(w.copy_ids("bob"), vec![format!("m{s}:bob:0")]);
    assert_eq!(ignored(&w).len(), 1, "{:?}", w.events);
    assert_eq!(w.d.counters().presence_ignored, 1);
}

/// An ambiguous and an unknown mention each become an event and a count (first delivery
/// only: a redelivery of the same CHAT message does not count again).
#[test]
fn an_ambiguous_or_unknown_mention_is_an_event_and_a_count() {
    let mut w = served();
    w.channel_class("lobby", "live");
    w.acl("b1", &["lobby"]);
    w.acl("b2", &["lobby"]);
    w.presence("b1", "bob");
    w.presence("b2", "Bob");
    let s = w.post("alice", "lobby", &["bob", "nobody"]);
    let d = w.fanout(s, 1);
    assert_eq!(w.settled(d), vec![AckKind::Ack]);
    assert!(w.copy_ids("b1").is_empty() && w.copy_ids("b2").is_empty());
    assert_eq!(
        unresolved(&w),
        vec![
            ("bob".to_owned(), MentionSkipReason::Ambiguous),
            ("nobody".to_owned(), MentionSkipReason::Unknown)
        ]
    );
    let c = w.d.counters();
    assert_eq!((c.mentions_ambiguous, c.mentions_unknown), (1, 1));
    w.fanout(s, 2);
    let c = w.d.counters();
    assert_eq!((c.mentions_ambiguous, c.mentions_unknown), (1, 1));
}
