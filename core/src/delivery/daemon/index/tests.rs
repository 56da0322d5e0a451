//! Roster tests: presence identity (key = `card.id`), live-before-offline resolution (G17) and
//! provisioned names (issue 21 item 2).

use super::*;

fn id(s: &str) -> AgentId {
    AgentId::new(s).expect("id")
}

fn presence(id: &str, name: &str, status: &str) -> bytes::Bytes {
    bytes::Bytes::from(
        serde_json::json!({"card": {"id": id, "name": name}, "status": status, "ts": 1})
            .to_string(),
    )
}

fn put(key: &str, revision: u64, value: bytes::Bytes) -> KvEntry {
    KvEntry {
        key: key.into(),
        revision,
        operation: KvOperation::Put,
        value,
    }
}

fn delete(key: &str, revision: u64) -> KvEntry {
    KvEntry {
        key: key.into(),
        revision,
        operation: KvOperation::Delete,
        value: bytes::Bytes::new(),
    }
}

fn acl(owner: &str, revision: u64, names: &[&str]) -> KvEntry {
    let mut record = AclRecord {
        allow_subscribe: vec!["general".into()],
        revision,
        updated_at: crate::time::UnixMillis(1),
        extra: Default::default(),
    };
    record.set_provisioned_names(&names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>());
    put(owner, revision, json::encode(&record))
}

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

/// One step of a roster scenario: a presence write `(key, card.id, name, status)` at a time, or
/// a delete of a key.
enum Step {
    Put(&'static str, &'static str, &'static str, &'static str, u64),
    Delete(&'static str, u64),
}

/// Resolution table (G17, issue 15 item 3): each row builds a roster from scratch (open space,
/// no ACL records) and resolves `bob` at `now`.
#[test]
fn roster_resolution_table() {
    use MentionResolution::{Ambiguous, Owner, Unknown};
    use Step::{Delete, Put};
    let rows: Vec<(&str, Vec<Step>, u64, MentionResolution)> = vec![
        (
            "one live",
            vec![Put("b", "b", "Bob", "idle", 0)],
            1_000,
            Owner(id("b")),
        ),
        (
            "case-insensitive",
            vec![Put("b", "b", "BOB", "working", 0)],
            1_000,
            Owner(id("b")),
        ),
        (
            "nobody",
            vec![Put("c", "c", "carol", "idle", 0)],
            1_000,
            Unknown,
        ),
        (
            "an offline ghost plus a live instance: the live one",
            vec![
                Put("b1", "b1", "bob", "idle", 0),
                Delete("b1", 100),
                Put("b2", "b2", "bob", "idle", 200),
            ],
            1_000,
            Owner(id("b2")),
        ),
        (
            "an offline status record plus a live instance: the live one",
            vec![
                Put("b1", "b1", "bob", "offline", 0),
                Put("b2", "b2", "bob", "idle", 0),
            ],
            1_000,
            Owner(id("b2")),
        ),
        (
            "an expired (unrefreshed past the bucket TTL) instance plus a live one: the live one",
            vec![
                Put("b1", "b1", "bob", "idle", 0),
                Put("b2", "b2", "bob", "idle", 5_000),
            ],
            7_000,
            Owner(id("b2")),
        ),
        (
            "the only match is offline: it still resolves (durable mention copy)",
            vec![Put("b1", "b1", "bob", "idle", 0), Delete("b1", 100)],
            1_000,
            Owner(id("b1")),
        ),
        (
            "the only match expired: it still resolves",
            vec![Put("b1", "b1", "bob", "idle", 0)],
            60_000,
            Owner(id("b1")),
        ),
        (
            "two live matches: ambiguous",
            vec![
                Put("b1", "b1", "bob", "idle", 0),
                Put("b2", "b2", "Bob", "idle", 0),
            ],
            1_000,
            Ambiguous,
        ),
        (
            "two offline matches and no live one: ambiguous",
            vec![
                Put("b1", "b1", "bob", "offline", 0),
                Delete("b2", 0),
                Put("b2", "b2", "bob", "offline", 0),
            ],
            1_000,
            Ambiguous,
        ),
        (
            "the same owner under two keys counts once… but a key not its card.id is ignored",
            vec![Put("x", "b", "bob", "idle", 0)],
            1_000,
            Unknown,
        ),
        (
            "a key claiming another id does not make the real owner ambiguous",
            vec![
                Put("mallory", "eve", "bob", "idle", 0),
                Put("b", "b", "bob", "idle", 0),
            ],
            1_000,
            Owner(id("b")),
        ),
        (
            "a live instance comes back under the same key after going offline",
            vec![
                Put("b", "b", "bob", "idle", 0),
                Delete("b", 100),
                Put("b", "b", "bob", "idle", 9_000),
            ],
            10_000,
            Owner(id("b")),
        ),
    ];
    let acls = AclIndex::new();
    for (what, steps, now, want) in rows {
        let mut r = Roster::new();
        for (rev, step) in steps.into_iter().enumerate() {
            let rev = rev as u64 + 1;
            match step {
                Put(key, card, name, status, at) => {
                    r.apply(&put(key, rev, presence(card, name, status)), t(at), &acls);
                }
                Delete(key, at) => {
                    r.apply(&delete(key, rev), t(at), &acls);
                }
            }
        }
        assert_eq!(r.resolve("bob", t(now), &acls), want, "{what}");
    }
}

/// A key that is not its record's `card.id` is ignored and reported once per episode, not per
/// heartbeat; a clean record ends the episode.
#[test]
fn a_presence_key_that_is_not_its_card_id_is_ignored_and_reported_once_per_episode() {
    let acls = AclIndex::new();
    let mut r = Roster::new();
    let n = r.apply(
        &put("mallory", 1, presence("bob", "bob", "idle")),
        t(0),
        &acls,
    );
    assert_eq!(
        n,
        Some(PresenceIgnored {
            key: "mallory".into(),
            name: "bob".into(),
            fault: PresenceFault::KeyMismatch { claimed: id("bob") },
        })
    );
    assert_eq!(r.resolve("bob", t(1), &acls), MentionResolution::Unknown);
    for rev in 2..5 {
        let again = r.apply(
            &put("mallory", rev, presence("bob", "bob", "idle")),
            t(rev * 2000),
            &acls,
        );
        assert_eq!(
            again, None,
            "a heartbeat of the same fault is not reported again"
        );
    }
    assert_eq!(
        r.apply(
            &put("mallory", 5, presence("mallory", "mal", "idle")),
            t(10_000),
            &acls
        ),
        None
    );
    assert!(
        r.apply(
            &put("mallory", 6, presence("bob", "bob", "idle")),
            t(12_000),
            &acls
        )
        .is_some(),
        "a new episode"
    );
    assert_eq!(
        r.audit(&acls),
        vec![],
        "an audit with nothing changed reports nothing"
    );
}

/// Issue 21 item 2: a provisioned identity's id and its `names` are reserved for it. Mallory
/// (key and card.id both `mallory`) presenting `alice` is ignored and reported; alice still
/// resolves. The reservation also works when the ACL arrives after the presence (the audit).
#[test]
fn a_name_reserved_for_another_provisioned_identity_is_ignored() {
    let mut acls = AclIndex::new();
    let mut r = Roster::new();
    acls.apply(&acl("mallory", 1, &[]));
    // The squatter's presence arrives before alice's ACL: not yet reserved.
    assert_eq!(
        r.apply(
            &put("mallory", 1, presence("mallory", "Alice", "idle")),
            t(0),
            &acls
        ),
        None
    );
    assert_eq!(
        r.apply(
            &put("alice", 2, presence("alice", "alice", "idle")),
            t(0),
            &acls
        ),
        None
    );
    assert_eq!(
        r.resolve("alice", t(1), &acls),
        MentionResolution::Ambiguous,
        "open: as before"
    );
    acls.apply(&acl("alice", 2, &[]));
    let notices = r.audit(&acls);
    assert_eq!(
        notices,
        vec![PresenceIgnored {
            key: "mallory".into(),
            name: "Alice".into(),
            fault: PresenceFault::NameReserved { owner: id("alice") },
        }]
    );
    assert_eq!(
        r.resolve("alice", t(1), &acls),
        MentionResolution::Owner(id("alice"))
    );
    assert_eq!(r.audit(&acls), vec![], "once per episode");
    // Alice offline and never seen since a restart: the provisioned directory still resolves her.
    let fresh = Roster::new();
    assert_eq!(
        fresh.resolve("ALICE", t(1), &acls),
        MentionResolution::Owner(id("alice"))
    );
    // A provisioned display name: "Wonder" is alice's; mallory presenting it is ignored.
    acls.apply(&acl("alice", 3, &["Wonder"]));
    let n = r.apply(
        &put("mallory", 3, presence("mallory", "wonder", "idle")),
        t(2),
        &acls,
    );
    assert_eq!(
        n, None,
        "the same fault (alice's name) continues mallory's episode"
    );
    assert_eq!(
        r.resolve("wonder", t(3), &acls),
        MentionResolution::Owner(id("alice"))
    );
    // Alice's names are bound now: presenting something else is not hers to present.
    let n = r.apply(
        &put("alice", 4, presence("alice", "queen", "idle")),
        t(3),
        &acls,
    );
    assert_eq!(n.map(|n| n.fault), Some(PresenceFault::NameNotProvisioned));
    assert_eq!(r.resolve("queen", t(4), &acls), MentionResolution::Unknown);
    // Mallory's own, unreserved name is fine.
    assert_eq!(
        r.apply(
            &put("mallory", 5, presence("mallory", "mal", "idle")),
            t(4),
            &acls
        ),
        None
    );
    assert_eq!(
        r.resolve("mal", t(5), &acls),
        MentionResolution::Owner(id("mallory"))
    );
    // Deleting alice's ACL frees the names.
    acls.apply(&delete("alice", 9));
    assert_eq!(acls.reserved("alice"), None);
    assert_eq!(acls.reserved("wonder"), None);
}
