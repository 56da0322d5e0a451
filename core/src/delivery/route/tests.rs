#![allow(clippy::unwrap_used)]

use super::*;
use crate::time::UnixMillis;
use crate::wire::message::{Part, Route, Sender};
use crate::wire::records::MemberState;
use crate::wire::token::Space;
use std::collections::BTreeMap;

pub(crate) fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

pub(crate) fn ch(s: &str) -> ConcreteChannel {
    ConcreteChannel::new(s).unwrap()
}

pub(crate) fn msg(from: &str, channel: &str, mentions: &[&str]) -> CotalMessage {
    CotalMessage::new(
        "m-1",
        UnixMillis(5),
        Space::new("main").unwrap(),
        Sender::new(id(from), from),
        Route::Channel(ch(channel)),
        vec![Part::text("hi")],
    )
    .with_mentions(mentions.iter().copied())
}

fn member(owner: &str, j: u64, leave: Option<u64>, generation: u64) -> MembershipRecord {
    let mut r = MembershipRecord::fresh_join(ch("c"), id(owner), j, generation, "D", UnixMillis(1));
    if leave.is_some() {
        r.state = MemberState::LiveConfirmed;
        r.leave_cursor = leave;
    }
    r
}

fn acl(patterns: &[&str]) -> ReadAcl {
    ReadAcl::from_allow_subscribe(patterns).unwrap()
}

struct World {
    roster: BTreeMap<&'static str, MentionResolution>,
    acls: BTreeMap<AgentId, ReadAcl>,
}

impl World {
    fn c8() -> Self {
        let mut roster = BTreeMap::new();
        roster.insert("bob", MentionResolution::Owner(id("bob")));
        roster.insert("carol", MentionResolution::Owner(id("carol")));
        roster.insert("dup", MentionResolution::Ambiguous);
        roster.insert("alice", MentionResolution::Owner(id("alice")));
        roster.insert("dan", MentionResolution::Owner(id("dan")));
        let mut acls = BTreeMap::new();
        acls.insert(id("bob"), acl(&["c"]));
        acls.insert(id("carol"), acl(&["other.>"]));
        acls.insert(id("alice"), acl(&[">"]));
        // dan has no ACL row.
        World { roster, acls }
    }

    fn route(
        &self,
        m: &CotalMessage,
        seq: u64,
        class: DeliveryClass,
        members: &[MembershipRecord],
    ) -> RouteDecision {
        route(
            m,
            &ch("c"),
            seq,
            class,
            members,
            |name| {
                self.roster
                    .get(name)
                    .cloned()
                    .unwrap_or(MentionResolution::Unknown)
            },
            |owner| self.acls.get(owner),
        )
    }
}

fn owners(d: &RouteDecision) -> Vec<(String, u64, Plane3Reason)> {
    d.entries
        .iter()
        .map(|r| {
            (
                r.owner.as_str().to_owned(),
                r.entry.generation,
                r.entry.reason,
            )
        })
        .collect()
}

use crate::wire::records::Plane3Reason;

#[test]
fn c7_durable_routing_matrix() {
    let world = World::c8();
    let members = vec![
        member("alice", 0, None, 3),      // the sender
        member("bob", 10, None, 2),       // open, in interval
        member("carol", 10, Some(20), 4), // tombstone, seq ≤ L
        member("dan", 10, Some(14), 5),   // tombstone, seq > L
        member("erin", 15, None, 6),      // joined at the seq: not after it
        member("frank", 1, None, 7),      // activated:false still routes (B15)
        member("bob", 1, None, 99),       // a duplicate owner: ignored
    ];
    let mut other = member("gina", 0, None, 1);
    other.channel = ch("elsewhere");
    let mut all = members.clone();
    all.push(other);
    let m = msg("alice", "c", &["bob", "zed"]);
    let d = world.route(&m, 15, DeliveryClass::Durable, &all);
    assert_eq!(
        owners(&d),
        vec![
            ("bob".into(), 2, Plane3Reason::DurableChannel),
            ("carol".into(), 4, Plane3Reason::DurableChannel),
            ("frank".into(), 7, Plane3Reason::DurableChannel),
        ]
    );
    // G37 / C9: mentions ignored on a durable channel (zed is no member and gets nothing).
    assert_eq!(d.ignored_mentions, 2);
    assert!(d.skipped_mentions.is_empty());
    let first = &d.entries[0];
    assert_eq!(first.entry.channel, ch("c"));
    assert_eq!(first.entry.seq, 15);
    assert_eq!(first.entry.msg, m);
    assert_eq!(first.msg_id().generation, 2);
    assert_eq!(first.msg_id().message_id, "m-1");
}

#[test]
fn c7_g26_inert_record_never_routes() {
    let world = World::c8();
    let mut inert = member("bob", 0, None, 1);
    inert.state = MemberState::LiveConfirmed;
    let d = world.route(&msg("alice", "c", &[]), 5, DeliveryClass::Durable, &[inert]);
    assert!(d.entries.is_empty());
}

#[test]
fn c8_live_mention_matrix() {
    let world = World::c8();
    let m = msg(
        "alice",
        "c",
        &["bob", "carol", "dup", "alice", "dan", "nobody", "BOB"],
    );
    // Memberships are inert on a live channel (G38).
    let members = vec![member("erin", 0, None, 1)];
    let d = world.route(&m, 9, DeliveryClass::Live, &members);
    assert_eq!(
        owners(&d),
        vec![("bob".into(), 0, Plane3Reason::LiveMention)]
    );
    let skipped: Vec<(&str, MentionSkipReason)> = d
        .skipped_mentions
        .iter()
        .map(|s| (s.name.as_str(), s.reason))
        .collect();
    assert_eq!(
        skipped,
        vec![
            ("carol", MentionSkipReason::NotCovered),
            ("dup", MentionSkipReason::Ambiguous),
            ("alice", MentionSkipReason::Sender),
            ("dan", MentionSkipReason::NoAcl),
            ("nobody", MentionSkipReason::Unknown),
        ],
        "BOB normalizes to bob, a duplicate mention the sender already deduped"
    );
    assert_eq!(d.ignored_mentions, 0);
    assert_eq!(d.entries[0].msg_id().generation, 0);
}

#[test]
fn c7_duplicate_resolution_routes_once() {
    let mut world = World::c8();
    world
        .roster
        .insert("robert", MentionResolution::Owner(id("bob")));
    let d = world.route(
        &msg("alice", "c", &["bob", "robert"]),
        9,
        DeliveryClass::Live,
        &[],
    );
    assert_eq!(d.entries.len(), 1);
    assert_eq!(d.skipped_mentions[0].reason, MentionSkipReason::Duplicate);
}

#[test]
fn i4_sender_never_gets_a_durable_copy() {
    let world = World::c8();
    let d = world.route(
        &msg("bob", "c", &[]),
        50,
        DeliveryClass::Durable,
        &[member("bob", 0, None, 1)],
    );
    assert!(d.entries.is_empty());
}
