//! Property tests for the wire records: encode → decode gives back the same value for generated
//! records of every type, and hostile bytes give a typed error, never a panic.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers and strategies: a panic is the test failing"
)]

use cotal_core::time::UnixMillis;
use cotal_core::wire::control::{
    ControlReply, ControlRequest, DeliveryRequest, DurableJoinReply, DurableLeaveReply,
    ListMembershipsReply, MembershipSummary,
};
use cotal_core::wire::json::{self, DecodeError, MAX_NESTING_DEPTH, MAX_RECORD_BYTES, WireRecord};
use cotal_core::wire::message::{
    AgentCard, Attention, ChannelMode, CotalMessage, Extra, MessageError, Part, Presence,
    PresenceStatus, Route, Sender, normalize_mentions,
};
use cotal_core::wire::msgid::{MsgIdError, Plane3MsgId};
use cotal_core::wire::records::{
    AclRecord, DeliveryLease, MemberState, MembershipRecord, Plane3Entry, Plane3Reason,
};
use cotal_core::wire::{AgentId, ConcreteChannel, Role, Space};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::fmt::Debug;

fn agent_id() -> impl Strategy<Value = AgentId> {
    "U[A-Z2-7]{55}".prop_map(|s| AgentId::new(s).unwrap())
}

fn channel() -> impl Strategy<Value = ConcreteChannel> {
    "[a-zA-Z0-9_-]{1,8}(\\.[a-z0-9_-]{1,8}){0,2}".prop_map(|s| ConcreteChannel::new(s).unwrap())
}

fn role() -> impl Strategy<Value = Role> {
    "[a-z][a-z0-9_-]{0,10}".prop_map(|s| Role::new(s).unwrap())
}

fn space() -> impl Strategy<Value = Space> {
    "[a-z][a-z0-9_-]{0,8}".prop_map(|s| Space::new(s).unwrap())
}

fn millis() -> impl Strategy<Value = UnixMillis> {
    any::<u64>().prop_map(UnixMillis)
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Dyadic fractions only: without serde_json's `float_roundtrip` feature, parsing an
        // arbitrary shortest-repr float can land one ULP off (e.g. -1.9527019702707395e208,
        // 114258.85656738281); its exact fast path covers ≤ 15 significant digits.
        (any::<i16>(), 0..8u32).prop_map(|(m, k)| Value::from(f64::from(m) / f64::from(1u32 << k))),
        any::<String>().prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Unknown fields: keys that no record of the protocol uses.
fn extra() -> impl Strategy<Value = Extra> {
    btree_map("x[A-Za-z0-9_]{0,6}", value(), 0..3).prop_map(|m| m.into_iter().collect())
}

fn sender() -> impl Strategy<Value = Sender> {
    (
        agent_id(),
        any::<String>(),
        option::of(any::<String>()),
        extra(),
    )
        .prop_map(|(id, name, role, extra)| Sender {
            id,
            name,
            role,
            extra,
        })
}

fn route() -> impl Strategy<Value = Route> {
    prop_oneof![
        channel().prop_map(Route::Channel),
        agent_id().prop_map(Route::To),
        role().prop_map(Route::ToService),
    ]
}

fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        (any::<String>(), extra()).prop_map(|(text, extra)| {
            let mut p = Part::text(text);
            if let Part::Text { extra: e, .. } = &mut p {
                *e = extra;
            }
            p
        }),
        value().prop_map(Part::data),
        ("com\\.example\\.[a-z]{1,6}", extra()).prop_map(|(kind, fields)| {
            // A part of unknown kind is built through the decoder, the only public way in.
            let mut obj = fields;
            obj.insert("kind".into(), Value::String(kind));
            serde_json::from_value(Value::Object(obj)).unwrap()
        }),
    ]
}

fn message() -> impl Strategy<Value = CotalMessage> {
    (
        ("\\PC{1,36}", millis(), space(), sender(), route()),
        (vec("\\PC{0,8}", 0..4), vec(part(), 0..4)),
        (option::of("\\PC{0,12}"), option::of("\\PC{0,12}"), extra()),
    )
        .prop_map(
            |((id, ts, space, from, route), (mentions, parts), (reply_to, context_id, extra))| {
                let mut m =
                    CotalMessage::new(id, ts, space, from, route, parts).with_mentions(mentions);
                m.reply_to = reply_to;
                m.context_id = context_id;
                m.extra = extra;
                m
            },
        )
}

fn presence() -> impl Strategy<Value = Presence> {
    let card = (
        agent_id(),
        any::<String>(),
        option::of("[a-z]{1,8}"),
        option::of(any::<String>()),
        option::of("[0-9]\\.[0-9]"),
        extra(),
    )
        .prop_map(
            |(id, name, kind, role, protocol_version, extra)| AgentCard {
                id,
                name,
                kind,
                role,
                protocol_version,
                extra,
            },
        );
    let status = prop_oneof![
        Just(PresenceStatus::Idle),
        Just(PresenceStatus::Waiting),
        Just(PresenceStatus::Working),
        Just(PresenceStatus::Offline),
    ];
    let attention = prop_oneof![
        Just(Attention::Open),
        Just(Attention::Dnd),
        Just(Attention::Focus)
    ];
    let mode = prop_oneof![Just(ChannelMode::Quiet), Just(ChannelMode::Muted)];
    (
        card,
        status,
        option::of(any::<String>()),
        option::of(attention),
        option::of(btree_map("[a-z.]{1,8}", mode, 0..3)),
        millis(),
        extra(),
    )
        .prop_map(
            |(card, status, activity, attention, channel_modes, ts, extra)| Presence {
                card,
                status,
                activity,
                attention,
                channel_modes,
                ts,
                extra,
            },
        )
}

fn membership() -> impl Strategy<Value = MembershipRecord> {
    (
        (
            channel(),
            agent_id(),
            prop_oneof![
                Just(MemberState::LiveConfirmed),
                Just(MemberState::DurableActive)
            ],
        ),
        (
            any::<u64>(),
            any::<u64>(),
            option::of(any::<bool>()),
            option::of(any::<u64>()),
        ),
        (any::<String>(), millis(), extra()),
    )
        .prop_map(
            |(
                (channel, owner, state),
                (join_cursor, generation, activated, leave_cursor),
                (w, at, extra),
            )| {
                let mut r =
                    MembershipRecord::fresh_join(channel, owner, join_cursor, generation, w, at);
                r.state = state;
                r.activated = activated;
                r.leave_cursor = leave_cursor;
                r.extra = extra;
                r
            },
        )
}

fn acl() -> impl Strategy<Value = AclRecord> {
    (vec(any::<String>(), 0..4), any::<u64>(), millis(), extra()).prop_map(
        |(allow_subscribe, revision, updated_at, extra)| AclRecord {
            allow_subscribe,
            revision,
            updated_at,
            extra,
        },
    )
}

fn lease() -> impl Strategy<Value = DeliveryLease> {
    (any::<String>(), millis(), any::<bool>(), extra()).prop_map(|(h, s, r, extra)| {
        let mut l = DeliveryLease::new(h, s, r);
        l.extra = extra;
        l
    })
}

fn entry() -> impl Strategy<Value = Plane3Entry> {
    (
        message(),
        channel(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        extra(),
    )
        .prop_map(|(msg, ch, seq, generation, mention, extra)| {
            let mut e = if mention {
                Plane3Entry::live_mention(msg, ch, seq)
            } else {
                Plane3Entry::durable_channel(msg, ch, seq, generation)
            };
            e.extra = extra;
            e
        })
}

fn delivery_request() -> impl Strategy<Value = DeliveryRequest> {
    prop_oneof![
        (channel(), option::of(0..=json::MAX_SAFE_INTEGER)).prop_map(|(channel, join_cursor)| {
            DeliveryRequest::DurableJoin {
                channel,
                join_cursor,
            }
        }),
        (channel(), any::<u64>()).prop_map(|(channel, generation)| DeliveryRequest::DurableLeave {
            channel,
            generation
        }),
        Just(DeliveryRequest::ListMemberships),
    ]
}

fn not_null(v: Value) -> Value {
    if v.is_null() { json!(0) } else { v }
}

/// encode → decode is the identity, and decoding the re-encoding is stable.
fn assert_round_trip<T: WireRecord + DeserializeOwned + PartialEq + Debug>(rec: &T) {
    let bytes = json::encode(rec);
    let back: T = json::decode(&bytes).unwrap_or_else(|e| panic!("{e}: {rec:?}"));
    prop_assert_eq_panic(&back, rec);
    assert_eq!(json::encode(&back), bytes);
}

fn prop_assert_eq_panic<T: PartialEq + Debug>(a: &T, b: &T) {
    assert_eq!(a, b);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn messages_round_trip(m in message()) {
        assert_round_trip(&m);
        prop_assert_eq!(CotalMessage::decode(&json::encode(&m)).unwrap(), m);
    }

    #[test]
    fn presence_round_trips_and_scrubs(p in presence()) {
        assert_round_trip(&p);
        let off = p.to_offline();
        prop_assert!(off.is_scrubbed_offline());
        prop_assert_eq!(off.to_offline(), off.clone());
        prop_assert_eq!((&off.card, &off.activity, off.ts, &off.extra), (&p.card, &p.activity, p.ts, &p.extra));
        assert_round_trip(&off);
    }

    #[test]
    fn kv_records_round_trip(m in membership(), a in acl(), l in lease()) {
        assert_round_trip(&m);
        prop_assert_eq!(MembershipRecord::from_kv(Some(&json::encode(&m))), Some(m));
        assert_round_trip(&a);
        prop_assert_eq!(AclRecord::from_kv(Some(&json::encode(&a))), Some(a));
        assert_round_trip(&l);
        prop_assert_eq!(DeliveryLease::from_kv(Some(&json::encode(&l))), Some(l));
    }

    #[test]
    fn dinbox_entries_round_trip_and_msg_ids_parse(e in entry(), owner in agent_id()) {
        assert_round_trip(&e);
        if e.reason == Plane3Reason::LiveMention {
            prop_assert_eq!(e.generation, 0);
        }
        let id = Plane3MsgId::for_entry(&e, &owner);
        prop_assert_eq!(Plane3MsgId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn control_records_round_trip(
        req in delivery_request(),
        from in sender(),
        data in value(),
        error in any::<String>(),
        durable in any::<bool>(),
        reason in option::of(any::<String>()),
        generation in option::of(any::<u64>()),
        join_cursor in option::of(any::<u64>()),
        summaries in vec((channel(), any::<u64>(), any::<bool>()), 0..4),
        already_left in any::<bool>(),
        ch in channel(),
    ) {
        // What our agent sends decodes, on our daemon, to the same typed request.
        let wire = json::encode(&req.to_request(from));
        let decoded: ControlRequest = json::decode(&wire).unwrap();
        assert_round_trip(&decoded);
        prop_assert_eq!(DeliveryRequest::from_request(&decoded), Ok(req));

        assert_round_trip(&ControlReply::success(not_null(data)));
        assert_round_trip(&ControlReply::<Value>::failure(error));
        let join = DurableJoinReply { durable, reason, generation, join_cursor, extra: Extra::new() };
        assert_round_trip(&ControlReply::success(join));
        let list = ListMembershipsReply {
            memberships: summaries
                .into_iter()
                .map(|(channel, generation, activated)| MembershipSummary {
                    channel, generation, activated, extra: Extra::new(),
                })
                .collect(),
            extra: Extra::new(),
        };
        assert_round_trip(&ControlReply::success(list));
        assert_round_trip(&DurableLeaveReply { channel: ch, already_left, extra: Extra::new() });
    }

    #[test]
    fn mention_normalization_is_idempotent(names in vec("\\PC{0,6}", 0..8)) {
        let once = normalize_mentions(&names);
        prop_assert_eq!(normalize_mentions(&once), once.clone());
        let set: std::collections::BTreeSet<_> = once.iter().collect();
        prop_assert_eq!(set.len(), once.len());
        prop_assert!(once.iter().all(|m| !m.is_empty() && *m == m.trim().to_lowercase()));
    }

    /// Arbitrary bytes never panic any decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        let _ = CotalMessage::decode(&bytes);
        let _ = json::decode::<Plane3Entry>(&bytes);
        let _ = json::decode::<Presence>(&bytes);
        let _ = json::decode::<ControlRequest>(&bytes);
        let _ = json::decode::<ControlReply>(&bytes);
        let _ = MembershipRecord::from_kv(Some(&bytes));
        let _ = AclRecord::from_kv(Some(&bytes));
        let _ = DeliveryLease::from_kv(Some(&bytes));
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = Plane3MsgId::parse(s);
        }
    }

    /// Any JSON value (right syntax, random shape) is a typed error or a record, never a panic.
    #[test]
    fn arbitrary_json_never_panics(v in value()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        let _ = CotalMessage::decode(&bytes);
        let _ = json::decode::<Plane3Entry>(&bytes);
        let _ = json::decode::<MembershipRecord>(&bytes);
        if let Ok(req) = json::decode::<ControlRequest>(&bytes) {
            let _ = DeliveryRequest::from_request(&req);
        }
    }
}

const ALICE: &str = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";

fn good_message() -> Value {
    json!({"id":"m","ts":1,"space":"main","from":{"id":ALICE,"name":"alice"},
           "channel":"team.backend","parts":[{"kind":"text","text":"hi"}]})
}

fn all_decoders(bytes: &[u8]) -> Vec<DecodeError> {
    vec![
        CotalMessage::decode(bytes).unwrap_err(),
        json::decode::<CotalMessage>(bytes).unwrap_err(),
        json::decode::<Plane3Entry>(bytes).unwrap_err(),
        json::decode::<Presence>(bytes).unwrap_err(),
        json::decode::<MembershipRecord>(bytes).unwrap_err(),
        json::decode::<AclRecord>(bytes).unwrap_err(),
        json::decode::<DeliveryLease>(bytes).unwrap_err(),
        json::decode::<ControlRequest>(bytes).unwrap_err(),
        json::decode::<ControlReply>(bytes).unwrap_err(),
    ]
}

#[test]
fn hostile_bytes_give_typed_errors() {
    for e in all_decoders(b"") {
        assert_eq!(e, DecodeError::Empty);
    }
    for e in all_decoders(b"{\"id\":\"\xc3\x28\"}") {
        assert_eq!(e, DecodeError::NotUtf8 { valid_up_to: 7 });
    }
    let deep = "[".repeat(100_000);
    for e in all_decoders(deep.as_bytes()) {
        assert!(
            matches!(
                e,
                DecodeError::TooDeep {
                    max: MAX_NESTING_DEPTH,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // Deep nesting hidden in a data part of an otherwise valid message.
    let mut m = good_message();
    m["parts"] = json!([{"kind":"data","data": Value::Null}]);
    let s = m
        .to_string()
        .replace("null", &format!("{}{}", "[".repeat(70), "]".repeat(70)));
    assert!(matches!(
        CotalMessage::decode(s.as_bytes()),
        Err(DecodeError::TooDeep { .. })
    ));
    let big = format!("{{\"id\":\"{}\"}}", "a".repeat(MAX_RECORD_BYTES));
    for e in all_decoders(big.as_bytes()) {
        assert!(
            matches!(
                e,
                DecodeError::TooLarge {
                    max: MAX_RECORD_BYTES,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    for e in all_decoders(b"{\"id\":") {
        assert!(matches!(e, DecodeError::Syntax { .. }), "{e:?}");
    }
    for e in all_decoders(b"[1,2]") {
        assert!(
            matches!(
                e,
                DecodeError::Shape { .. } | DecodeError::Message(MessageError::NotAnObject)
            ),
            "{e:?}"
        );
    }
}

#[test]
fn wrong_shapes_are_typed_errors() {
    let bad = |v: Value| CotalMessage::decode(v.to_string().as_bytes()).unwrap_err();
    let mut m = good_message();
    m.as_object_mut().unwrap().remove("parts");
    assert_eq!(
        bad(m),
        DecodeError::Message(MessageError::MissingField { field: "parts" })
    );
    let mut m = good_message();
    m["ts"] = json!("yesterday");
    assert!(matches!(
        bad(m),
        DecodeError::Message(MessageError::InvalidField { field: "ts", .. })
    ));
    let mut m = good_message();
    m["ts"] = json!(1.5);
    assert!(matches!(
        bad(m),
        DecodeError::Message(MessageError::InvalidField { field: "ts", .. })
    ));
    let mut m = good_message();
    m["from"] = json!({"id": "not an id", "name": "x"});
    assert!(matches!(
        bad(m),
        DecodeError::Message(MessageError::InvalidField { field: "from", .. })
    ));
    let mut m = good_message();
    m["parts"] = json!([{"text": "no kind"}]);
    assert!(matches!(
        bad(m),
        DecodeError::Message(MessageError::InvalidField { field: "parts", .. })
    ));
    let mut m = good_message();
    m["parts"] = json!([{"kind": "text", "text": 3}]);
    assert!(matches!(
        bad(m),
        DecodeError::Message(MessageError::InvalidField { field: "parts", .. })
    ));
    let mut m = good_message();
    m["mentions"] = json!("bob");
    assert!(matches!(
        bad(m),
        DecodeError::Message(MessageError::InvalidField {
            field: "mentions",
            ..
        })
    ));
    let mut m = good_message();
    m["to"] = json!(ALICE);
    m["toService"] = json!("reviewer");
    assert_eq!(
        bad(m),
        DecodeError::Message(MessageError::MultipleRoutingFields {
            fields: vec!["channel", "to", "toService"]
        })
    );
    let mut m = good_message();
    m.as_object_mut().unwrap().remove("channel");
    assert_eq!(
        bad(m.clone()),
        DecodeError::Message(MessageError::NoRoutingField)
    );
    // `null` routing fields read as absent.
    m["channel"] = Value::Null;
    assert_eq!(bad(m), DecodeError::Message(MessageError::NoRoutingField));

    let shape = |r: Result<MembershipRecord, DecodeError>| match r {
        Err(DecodeError::Shape { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    let rec = json!({"channel":"g","owner":ALICE,"state":"durable-active","joinCursor":0,
                     "generation":1,"writerIdentity":"d","updatedAt":1});
    let mut missing = rec.clone();
    missing.as_object_mut().unwrap().remove("generation");
    assert!(
        shape(json::decode(missing.to_string().as_bytes())).contains("missing field `generation`")
    );
    let mut state = rec.clone();
    state["state"] = json!("left");
    assert!(shape(json::decode(state.to_string().as_bytes())).contains("unknown variant"));
    let mut wild = rec;
    wild["channel"] = json!("g.*");
    assert!(shape(json::decode(wild.to_string().as_bytes())).contains("concrete"));

    let entry = json!({"msg": good_message(), "channel":"team.backend","seq":1,"reason":"replay","generation":0});
    assert!(matches!(
        json::decode::<Plane3Entry>(entry.to_string().as_bytes()),
        Err(DecodeError::Shape { .. })
    ));

    assert!(matches!(
        Plane3MsgId::parse("m:U1"),
        Err(MsgIdError::MissingSeparator)
    ));
}
