//! Subject parsing against the conformance vectors (SPEC §12) and every subject the reference
//! 0.6.0 put on the wire (`subjects-seen.txt`), plus round-trip and robustness properties.

#![allow(clippy::unwrap_used)]

use cotal_core::wire::subject::{
    ControlService, DeliveryKind, MAX_SUBJECT_BYTES, ReservedPrefix, Subject, SubjectError,
    SubjectKind, anycast_role_pattern, chat_subscribe_pattern, chat_wildcard, delivery_of,
    delivery_reply_subject, delivery_request_subject, dinbox_wildcard, parse_dinbox_owner,
    parse_subject, reserved_prefix, unicast_inbox_pattern,
};
use cotal_core::wire::{AgentId, Channel, ChannelError, ConcreteChannel, Role, Space, TokenError};
use cotal_tests::{fixture_json, fixture_text};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const ALICE: &str = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";
const BOB: &str = "UDI36ZKVNUM5WMO4QQ6HDQU7F4OH2RCXOJRX6GAIOS5SKVNNSKCDNLJA";

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn space(s: &str) -> Space {
    Space::new(s).unwrap()
}

// ----------------------------------------------------------------------------------------------
// Conformance vectors (conformance.md, "Subject parsing vectors")
// ----------------------------------------------------------------------------------------------

#[test]
fn conformance_subject_parsing_vectors() {
    let vectors: [(String, SubjectKind, &str, String); 4] = [
        (
            format!("cotal.main.chat.{ALICE}.team.backend"),
            SubjectKind::Chat,
            ALICE,
            "team.backend".to_owned(),
        ),
        (
            format!("cotal.main.inst.{BOB}.{ALICE}"),
            SubjectKind::Inst,
            ALICE,
            BOB.to_owned(),
        ),
        (
            format!("cotal.main.svc.reviewer.{ALICE}"),
            SubjectKind::Svc,
            ALICE,
            "reviewer".into(),
        ),
        (
            format!("cotal.main.ctl.manager.{ALICE}"),
            SubjectKind::Ctl,
            ALICE,
            "manager".into(),
        ),
    ];
    for (subject, kind, sender, rest) in &vectors {
        let parsed = parse_subject(subject).unwrap_or_else(|| panic!("{subject} has a sender"));
        assert_eq!(parsed.kind(), *kind, "{subject}");
        assert_eq!(parsed.sender().as_str(), *sender, "{subject}");
        assert_eq!(parsed.rest(), rest, "{subject}");
        assert_eq!(parsed.space(), "main");
        assert_eq!(kind.as_str(), subject.split('.').nth(2).unwrap());
    }

    // The same vectors through the typed grammar.
    let typed: Vec<Subject> = vectors
        .iter()
        .map(|(s, ..)| Subject::parse(s).unwrap())
        .collect();
    assert_eq!(
        typed,
        vec![
            Subject::Chat {
                space: space("main"),
                sender: id(ALICE),
                channel: ConcreteChannel::new("team.backend").unwrap(),
            },
            Subject::Unicast {
                space: space("main"),
                target: id(BOB),
                sender: id(ALICE)
            },
            Subject::Anycast {
                space: space("main"),
                role: Role::new("reviewer").unwrap(),
                sender: id(ALICE),
            },
            Subject::Control {
                space: space("main"),
                service: ControlService::Manager,
                sender: id(ALICE),
            },
        ]
    );
    let delivery: Vec<Option<DeliveryKind>> = typed.iter().map(Subject::delivery_kind).collect();
    assert_eq!(
        delivery,
        [
            Some(DeliveryKind::Channel),
            Some(DeliveryKind::Dm),
            Some(DeliveryKind::Anycast),
            None
        ]
    );
    assert_eq!(delivery_of("ctl"), None);

    // A chat subject with no channel token has no sender.
    let malformed = format!("cotal.main.chat.{ALICE}");
    assert_eq!(parse_subject(&malformed), None);
    assert_eq!(
        Subject::parse(&malformed),
        Err(SubjectError::TooFewTokens {
            kind: "chat",
            min: 5,
            found: 4
        })
    );
}

// ----------------------------------------------------------------------------------------------
// subjects-seen.txt
// ----------------------------------------------------------------------------------------------

struct Ids {
    space: Space,
    by_name: BTreeMap<String, AgentId>,
}

fn ids() -> Ids {
    let v = fixture_json("identities.json");
    let mut by_name = BTreeMap::new();
    for (name, agent) in v["agents"].as_object().unwrap() {
        by_name.insert(name.clone(), id(agent["id"].as_str().unwrap()));
    }
    by_name.insert("provisioner".into(), id(v["provisioner"].as_str().unwrap()));
    by_name.insert(
        "delivery-daemon".into(),
        id(v["deliveryDaemon"].as_str().unwrap()),
    );
    assert_eq!(
        by_name.len(),
        6,
        "four agents, the provisioner and the daemon"
    );
    Ids {
        space: space(v["space"].as_str().unwrap()),
        by_name,
    }
}

const UUID: &str = "6f1c2a9e-3b47-4d2e-8a10-5c9b7e2d4f31";
const NUID: &str = "Vf3kQ9mZ2pR7sT1xW8yB4c";

/// Replaces every `<placeholder>` of a templated subject with a plausible concrete value.
fn substitute(template: &str, ids: &Ids) -> String {
    let mut out = template.to_owned();
    for (name, id) in &ids.by_name {
        out = out.replace(&format!("<{name}>"), id.as_str());
    }
    for (placeholder, value) in [
        ("<uuid>", UUID),
        ("<nuid>", NUID),
        ("<n>", "3"),
        ("<generation>", "1"),
        ("<token>", "17"),
        ("<delivered>", "1"),
        ("<stream_seq>", "42"),
        ("<consumer_seq>", "7"),
        ("<ts>", "1795000000000000000"),
        ("<pending>", "0"),
    ] {
        out = out.replace(placeholder, value);
    }
    assert!(
        !out.contains('<'),
        "unknown placeholder left in {template}: {out}"
    );
    out
}

struct Seen {
    template: String,
    subject: String,
    requesters: BTreeSet<String>,
}

fn subjects_seen(ids: &Ids) -> Vec<Seen> {
    let text = fixture_text("subjects-seen.txt");
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let mut cols = line.split('\t');
        let count = cols.next().unwrap();
        assert!(count.parse::<u32>().unwrap() > 0, "{line}");
        let template = cols.next().unwrap().to_owned();
        let requesters = cols
            .next()
            .unwrap_or("")
            .split(", ")
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        out.push(Seen {
            subject: substitute(&template, ids),
            template,
            requesters,
        });
    }
    assert!(out.len() > 150, "expected the full list, got {}", out.len());
    out
}

/// What each application subject of the recorded run must parse to.
fn expected_application_subjects(ids: &Ids) -> BTreeMap<String, Subject> {
    let s = &ids.space;
    let who = |n: &str| ids.by_name[n].clone();
    let ch = |c: &str| ConcreteChannel::new(c).unwrap();
    let mut m = BTreeMap::new();
    let mut put = |t: &str, v: Subject| assert!(m.insert(t.to_owned(), v).is_none(), "{t}");
    for c in ["general", "lobby", "review"] {
        put(
            &format!("cotal.wirefix.chat.<bob>.{c}"),
            Subject::Chat {
                space: s.clone(),
                sender: who("bob"),
                channel: ch(c),
            },
        );
    }
    for a in ["alice", "bob", "carol", "dave"] {
        put(
            &format!("cotal.wirefix.ctl.delivery.<{a}>"),
            Subject::Control {
                space: s.clone(),
                service: ControlService::Delivery,
                sender: who(a),
            },
        );
        put(
            &format!("cotal.wirefix.ctl.delivery.<{a}>.reply.<uuid>"),
            delivery_reply_subject(s, &who(a), UUID).unwrap(),
        );
    }
    for a in ["alice", "carol", "dave"] {
        put(
            &format!("cotal.wirefix.dinbox.<{a}>"),
            Subject::Dinbox {
                space: s.clone(),
                owner: who(a),
            },
        );
        put(
            &format!("cotal.wirefix.dlv.<{a}>"),
            Subject::Dlv {
                space: s.clone(),
                owner: who(a),
            },
        );
    }
    put(
        "cotal.wirefix.inst.<alice>.<bob>",
        Subject::Unicast {
            space: s.clone(),
            target: who("alice"),
            sender: who("bob"),
        },
    );
    put(
        "cotal.wirefix.svc.reviewer.<alice>",
        Subject::Anycast {
            space: s.clone(),
            role: Role::new("reviewer").unwrap(),
            sender: who("alice"),
        },
    );
    m
}

#[test]
fn every_application_subject_seen_parses_to_its_typed_kind() {
    let ids = ids();
    let seen = subjects_seen(&ids);
    let mut expected = expected_application_subjects(&ids);
    let total = expected.len();
    assert_eq!(total, 19);
    let mut checked = 0;
    for line in seen.iter().filter(|l| l.subject.starts_with("cotal.")) {
        assert!(
            line.template.starts_with("cotal.wirefix."),
            "{}",
            line.template
        );
        let want = expected
            .remove(&line.template)
            .unwrap_or_else(|| panic!("no expectation for {}", line.template));
        let got = Subject::parse(&line.subject)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", line.subject));
        assert_eq!(got, want, "{}", line.template);
        assert_eq!(got.to_string(), line.subject, "format(parse(s)) == s");
        assert_eq!(got.space(), &ids.space);
        assert_eq!(got.kind_token(), line.subject.split('.').nth(2).unwrap());

        // The authentication parser reads the same sender, and that sender is the publisher the
        // reply subject names (requester column), except for daemon-written or reply subjects.
        let parsed = parse_subject(&line.subject);
        assert_eq!(
            parsed.as_ref().map(|p| p.sender()),
            got.sender(),
            "{}",
            line.template
        );
        if let Some(p) = &parsed {
            let publisher = ids
                .by_name
                .iter()
                .find(|(_, id)| *id == p.sender())
                .unwrap()
                .0;
            assert!(
                line.requesters.contains(publisher),
                "{}: {:?}",
                line.template,
                line.requesters
            );
            assert_eq!(p.delivery_kind(), got.delivery_kind());
        }
        match &got {
            Subject::Chat { channel, .. } => {
                let p = parsed.unwrap();
                assert_eq!((p.kind(), p.rest()), (SubjectKind::Chat, channel.as_str()));
            }
            Subject::Unicast { target, .. } => {
                let p = parsed.unwrap();
                assert_eq!((p.kind(), p.rest()), (SubjectKind::Inst, target.as_str()));
            }
            Subject::Anycast { role, .. } => {
                let p = parsed.unwrap();
                assert_eq!((p.kind(), p.rest()), (SubjectKind::Svc, role.as_str()));
            }
            Subject::Control {
                service, sender, ..
            } => {
                let p = parsed.unwrap();
                assert_eq!((p.kind(), p.rest()), (SubjectKind::Ctl, service.as_str()));
                assert_eq!(got, delivery_request_subject(&ids.space, sender));
            }
            Subject::DeliveryReply { requester, .. } => {
                assert!(parsed.is_none(), "a 7-token reply carries no sender");
                assert!(line.requesters.is_empty());
                // The reply is bound to the request of the same requester, and only that one.
                let request = delivery_request_subject(&ids.space, requester);
                assert_eq!(request.accept_reply(&line.subject).unwrap().as_str(), UUID);
                for (name, other) in &ids.by_name {
                    if other != requester {
                        let wrong = delivery_request_subject(&ids.space, other);
                        assert_eq!(wrong.accept_reply(&line.subject), None, "{name}");
                    }
                }
            }
            Subject::Dinbox { owner, .. } => {
                assert!(parsed.is_none());
                assert_eq!(parse_dinbox_owner(&line.subject).as_ref(), Some(owner));
                assert!(line.requesters.contains("delivery-daemon"));
            }
            Subject::Dlv { .. } => {
                assert!(parsed.is_none());
                assert_eq!(parse_dinbox_owner(&line.subject), None);
                assert_eq!(got.delivery_kind(), Some(DeliveryKind::Channel));
            }
            other => panic!("unexpected kind in the recorded run: {other:?}"),
        }
        checked += 1;
    }
    assert!(
        expected.is_empty(),
        "expected but not seen: {:?}",
        expected.keys()
    );
    assert_eq!(checked, total);
}

#[test]
fn every_non_application_subject_seen_is_recognised_as_such() {
    let ids = ids();
    let mut by_prefix: BTreeMap<ReservedPrefix, usize> = BTreeMap::new();
    for line in subjects_seen(&ids)
        .iter()
        .filter(|l| !l.subject.starts_with("cotal."))
    {
        let prefix = reserved_prefix(&line.subject)
            .unwrap_or_else(|| panic!("{} is neither cotal nor reserved", line.template));
        assert_eq!(
            Subject::parse(&line.subject),
            Err(SubjectError::Reserved { prefix })
        );
        assert_eq!(parse_subject(&line.subject), None, "{}", line.template);
        assert_eq!(parse_dinbox_owner(&line.subject), None);
        *by_prefix.entry(prefix).or_default() += 1;

        // Per-identity inboxes belong to a known identity.
        if prefix == ReservedPrefix::IdentityInbox {
            let owner = ids
                .by_name
                .values()
                .find(|id| line.subject.starts_with(&format!("{}.", id.inbox_prefix())));
            assert!(owner.is_some(), "{}", line.template);
        }
    }
    assert_eq!(
        by_prefix.keys().copied().collect::<Vec<_>>(),
        [
            ReservedPrefix::JetStream,
            ReservedPrefix::KeyValue,
            ReservedPrefix::Inbox,
            ReservedPrefix::IdentityInbox
        ]
    );
    assert_eq!(by_prefix[&ReservedPrefix::IdentityInbox], 6);
    assert_eq!(by_prefix[&ReservedPrefix::Inbox], 1);
}

/// The filter subjects embedded in `$JS.API.CONSUMER.CREATE.<stream>.<consumer>.<filter>` are what
/// this crate's builders produce.
#[test]
fn consumer_filters_seen_match_the_builders() {
    let ids = ids();
    let s = &ids.space;
    let mut built: BTreeSet<String> = BTreeSet::new();
    for c in ["general", "review"] {
        built.insert(chat_subscribe_pattern(s, &Channel::new(c).unwrap()));
    }
    built.insert(chat_wildcard(s));
    built.insert(dinbox_wildcard(s));
    built.insert(anycast_role_pattern(s, &Role::new("reviewer").unwrap()));
    for a in ["alice", "bob", "carol", "dave"] {
        let who = ids.by_name[a].clone();
        built.insert(
            Subject::Dlv {
                space: s.clone(),
                owner: who.clone(),
            }
            .to_string(),
        );
        built.insert(unicast_inbox_pattern(s, &who));
    }
    let mut filters = BTreeSet::new();
    for line in subjects_seen(&ids) {
        let Some(rest) = line.subject.strip_prefix("$JS.API.CONSUMER.CREATE.") else {
            continue;
        };
        let parts: Vec<&str> = rest.splitn(3, '.').collect();
        let filter = parts[2];
        if filter.starts_with("cotal.") {
            assert!(
                built.contains(filter),
                "{} not built by this crate",
                line.template
            );
            filters.insert(filter.to_owned());
        }
    }
    assert_eq!(
        filters, built,
        "every builder output appears as a recorded filter"
    );
}

// ----------------------------------------------------------------------------------------------
// Typed errors on bad input
// ----------------------------------------------------------------------------------------------

#[test]
fn bad_input_gives_the_expected_typed_error() {
    use SubjectError as E;
    let too_long = format!("cotal.main.chat.{ALICE}.{}", "a".repeat(MAX_SUBJECT_BYTES));
    let cases: Vec<(String, SubjectError)> = vec![
        (String::new(), E::Empty),
        (
            too_long.clone(),
            E::TooLong {
                len: too_long.len(),
            },
        ),
        (
            "$JS.API.INFO".into(),
            E::Reserved {
                prefix: ReservedPrefix::JetStream,
            },
        ),
        (
            "$KV.b.k".into(),
            E::Reserved {
                prefix: ReservedPrefix::KeyValue,
            },
        ),
        (
            "$SYS.REQ.x".into(),
            E::Reserved {
                prefix: ReservedPrefix::System,
            },
        ),
        (
            "$OBJ.b.x".into(),
            E::Reserved {
                prefix: ReservedPrefix::ObjectStore,
            },
        ),
        (
            "_INBOX.abc.1".into(),
            E::Reserved {
                prefix: ReservedPrefix::Inbox,
            },
        ),
        (
            format!("_INBOX_{ALICE}.x"),
            E::Reserved {
                prefix: ReservedPrefix::IdentityInbox,
            },
        ),
        (
            " cotal.main.dlv.U1".into(),
            E::NotCotal {
                first: " cotal".into(),
            },
        ),
        (
            "nats.main.dlv.U1".into(),
            E::NotCotal {
                first: "nats".into(),
            },
        ),
        ("cotal".into(), E::MissingKind),
        ("cotal.main".into(), E::MissingKind),
        (
            "cotal.main.nope.U1".into(),
            E::UnknownKind {
                kind: "nope".into(),
            },
        ),
        (
            "cotal.main..U1".into(),
            E::InvalidToken {
                index: 2,
                source: TokenError::Empty { what: "kind" },
            },
        ),
        (
            "cotal..chat.U1.x".into(),
            E::InvalidToken {
                index: 1,
                source: TokenError::Empty { what: "space" },
            },
        ),
        (
            "cotal.main.chat.U1.a..b".into(),
            E::InvalidChannel {
                source: ChannelError::EmptySegment { index: 1 },
            },
        ),
        (
            "cotal.main.chat.U1.team backend".into(),
            E::InvalidChannel {
                source: ChannelError::InvalidSegment {
                    index: 0,
                    segment: "team backend".into(),
                },
            },
        ),
        (
            "cotal.main.chat.U1.team.*".into(),
            E::InvalidChannel {
                source: ChannelError::NotConcrete {
                    channel: "team.*".into(),
                },
            },
        ),
        (
            "cotal.main.chat.*.team".into(),
            E::InvalidToken {
                index: 3,
                source: TokenError::InvalidChar {
                    what: "agent id",
                    ch: '*',
                    at: 0,
                },
            },
        ),
        (
            "cotal.main.inst.U1.U 2".into(),
            E::InvalidToken {
                index: 4,
                source: TokenError::InvalidChar {
                    what: "agent id",
                    ch: ' ',
                    at: 1,
                },
            },
        ),
        (
            "cotal.main.dlv.".into(),
            E::InvalidToken {
                index: 3,
                source: TokenError::Empty { what: "agent id" },
            },
        ),
        (
            "cotal.main.chat.U1".into(),
            E::TooFewTokens {
                kind: "chat",
                min: 5,
                found: 4,
            },
        ),
        (
            "cotal.main.inst.U1".into(),
            E::TooFewTokens {
                kind: "inst",
                min: 5,
                found: 4,
            },
        ),
        (
            "cotal.main.inst.U1.U2.U3".into(),
            E::TooManyTokens {
                kind: "inst",
                max: 5,
                found: 6,
            },
        ),
        (
            "cotal.main.svc.r".into(),
            E::TooFewTokens {
                kind: "svc",
                min: 5,
                found: 4,
            },
        ),
        (
            "cotal.main.svc.r.U1.x".into(),
            E::TooManyTokens {
                kind: "svc",
                max: 5,
                found: 6,
            },
        ),
        (
            "cotal.main.ctl.delivery".into(),
            E::TooFewTokens {
                kind: "ctl",
                min: 5,
                found: 4,
            },
        ),
        (
            "cotal.main.ctl.delivery.U1.x".into(),
            E::TooManyTokens {
                kind: "ctl",
                max: 5,
                found: 6,
            },
        ),
        (
            "cotal.main.ctl.delivery.U1.reply".into(),
            E::TooFewTokens {
                kind: "ctl.delivery reply",
                min: 7,
                found: 6,
            },
        ),
        (
            "cotal.main.ctl.delivery.U1.reply.a.b".into(),
            E::TooManyTokens {
                kind: "ctl.delivery reply",
                max: 7,
                found: 8,
            },
        ),
        (
            "cotal.main.ctl.manager.U1.reply.x".into(),
            E::UnexpectedToken {
                index: 3,
                expected: "delivery",
                found: "manager".into(),
            },
        ),
        (
            "cotal.main.ctl.spawn.U1".into(),
            E::UnknownService {
                service: "spawn".into(),
            },
        ),
        (
            "cotal.main.dinbox".into(),
            E::TooFewTokens {
                kind: "dinbox",
                min: 4,
                found: 3,
            },
        ),
        (
            "cotal.main.dinbox.U1.x".into(),
            E::TooManyTokens {
                kind: "dinbox",
                max: 4,
                found: 5,
            },
        ),
        (
            "cotal.main.dlv.U1.x".into(),
            E::TooManyTokens {
                kind: "dlv",
                max: 4,
                found: 5,
            },
        ),
        (
            "cotal.main.trace".into(),
            E::TooFewTokens {
                kind: "trace",
                min: 4,
                found: 3,
            },
        ),
        (
            "cotal.main.control.a.b".into(),
            E::TooManyTokens {
                kind: "control",
                max: 4,
                found: 5,
            },
        ),
        (
            format!("cotal.{}.dlv.U1", "s".repeat(257)),
            E::InvalidToken {
                index: 1,
                source: TokenError::TooLong {
                    what: "space",
                    len: 257,
                },
            },
        ),
    ];
    for (input, want) in cases {
        let got = Subject::parse(&input);
        assert_eq!(got.as_ref(), Err(&want), "{input:?}");
        let message = want.to_string();
        assert!(message.starts_with("invalid"), "{message}");
    }
    let e = Subject::parse("cotal.main.chat.*.team").unwrap_err();
    assert!(e.to_string().contains("index 3"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
    assert!("cotal.main.chat.U1.x".parse::<Subject>().is_ok());
}

#[test]
fn reserved_kinds_parse() {
    assert_eq!(
        Subject::parse("cotal.main.trace.U1").unwrap(),
        Subject::Trace {
            space: space("main"),
            instance: id("U1")
        }
    );
    assert_eq!(
        Subject::parse("cotal.main.control.U1").unwrap(),
        Subject::ControlPlane {
            space: space("main"),
            instance: id("U1")
        }
    );
    assert_eq!(parse_subject("cotal.main.trace.U1.x"), None);
}

// ----------------------------------------------------------------------------------------------
// Properties
// ----------------------------------------------------------------------------------------------

fn token_str() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,24}"
}

fn agent() -> impl Strategy<Value = AgentId> {
    prop_oneof![
        token_str(),
        // nkey-shaped ids
        "U[A-Z2-7]{55}",
    ]
    .prop_map(|s| AgentId::new(s).unwrap())
}

fn space_s() -> impl Strategy<Value = Space> {
    token_str().prop_map(|s| Space::new(s).unwrap())
}

fn channel() -> impl Strategy<Value = ConcreteChannel> {
    prop::collection::vec(token_str(), 1..5)
        .prop_map(|s| ConcreteChannel::new(s.join(".")).unwrap())
}

fn service() -> impl Strategy<Value = ControlService> {
    prop::sample::select(vec![
        ControlService::Manager,
        ControlService::SelfService,
        ControlService::Admin,
        ControlService::Delivery,
    ])
}

fn subject() -> impl Strategy<Value = Subject> {
    prop_oneof![
        (space_s(), agent(), channel()).prop_map(|(space, sender, channel)| Subject::Chat {
            space,
            sender,
            channel
        }),
        (space_s(), agent(), agent()).prop_map(|(space, target, sender)| Subject::Unicast {
            space,
            target,
            sender
        }),
        (space_s(), token_str(), agent()).prop_map(|(space, role, sender)| Subject::Anycast {
            space,
            role: Role::new(role).unwrap(),
            sender
        }),
        (space_s(), service(), agent()).prop_map(|(space, service, sender)| Subject::Control {
            space,
            service,
            sender
        }),
        (
            space_s(),
            agent(),
            "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
        )
            .prop_map(|(space, requester, uuid)| {
                delivery_reply_subject(&space, &requester, &uuid).unwrap()
            }),
        (space_s(), agent()).prop_map(|(space, owner)| Subject::Dinbox { space, owner }),
        (space_s(), agent()).prop_map(|(space, owner)| Subject::Dlv { space, owner }),
        (space_s(), agent()).prop_map(|(space, instance)| Subject::Trace { space, instance }),
        (space_s(), agent())
            .prop_map(|(space, instance)| Subject::ControlPlane { space, instance }),
    ]
}

/// Strings assembled from the grammar's own words, wildcards and junk, to reach deep branches.
fn subject_like() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "cotal", "main", "chat", "inst", "svc", "ctl", "delivery", "manager", "self", "reply",
        "dinbox", "dlv", "trace", "control", "U1", "U2", "*", ">", "", " ", "a/b", "$JS", "_INBOX",
        "é",
    ]);
    prop::collection::vec(word, 0..10).prop_map(|w| w.join("."))
}

fn check_consistent(input: &str) {
    let typed = Subject::parse(input);
    let parsed = parse_subject(input);
    let _ = parse_dinbox_owner(input);
    let _ = reserved_prefix(input);
    if let Ok(subject) = &typed {
        // The strict grammar never normalises: a parsed value formats back to the input.
        assert_eq!(subject.to_string(), input);
        // Whenever both parsers accept, they agree on the sender.
        assert_eq!(
            parsed.as_ref().map(|p| p.sender()),
            subject.sender(),
            "{input}"
        );
        let _ = subject.accept_reply(input);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn format_then_parse_is_identity(subject in subject()) {
        let text = subject.to_string();
        prop_assert!(text.len() <= MAX_SUBJECT_BYTES);
        prop_assert_eq!(Subject::parse(&text), Ok(subject.clone()));
        let parsed = parse_subject(&text);
        prop_assert_eq!(parsed.as_ref().map(|p| p.sender()), subject.sender());
        if let Some(p) = &parsed {
            prop_assert_eq!(p.delivery_kind(), subject.delivery_kind());
            prop_assert_eq!(p.kind().as_str(), subject.kind_token());
        }
        match &subject {
            Subject::Chat { channel, .. } => {
                prop_assert_eq!(parsed.unwrap().channel(), Some(channel.clone()));
            }
            Subject::Unicast { target, .. } => {
                prop_assert_eq!(parsed.unwrap().target(), Some(target.clone()));
            }
            Subject::Anycast { role, .. } => {
                prop_assert_eq!(parsed.unwrap().role(), Some(role.clone()));
            }
            Subject::Control { service, .. } => {
                prop_assert_eq!(parsed.unwrap().service(), Some(*service));
            }
            Subject::Dinbox { owner, .. } => {
                prop_assert_eq!(parse_dinbox_owner(&text), Some(owner.clone()));
            }
            _ => prop_assert_eq!(parse_dinbox_owner(&text), None),
        }
    }

    #[test]
    fn reply_guard_accepts_exactly_its_own_reply(
        space in space_s(), requester in agent(), other in agent(), uuid in token_str(),
        junk in "[a-z.]{0,6}",
    ) {
        let request = delivery_request_subject(&space, &requester);
        let reply = delivery_reply_subject(&space, &requester, &uuid).unwrap();
        let accepted = request.accept_reply(&reply.to_string()).map(|r| r.to_string());
        prop_assert_eq!(accepted, Some(uuid.clone()));
        let foreign = delivery_reply_subject(&space, &other, &uuid).unwrap();
        prop_assert_eq!(request.accept_reply(&foreign.to_string()).is_some(), other == requester);
        let extended = format!("{reply}.{junk}");
        prop_assert_eq!(request.accept_reply(&extended), None);
    }

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        check_consistent(&s);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
        check_consistent(&String::from_utf8_lossy(&b));
    }

    #[test]
    fn grammar_shaped_strings_never_panic(s in subject_like()) {
        check_consistent(&s);
    }
}
