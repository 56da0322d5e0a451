#![allow(clippy::unwrap_used)]

use super::*;
use crate::time::UnixMillis;
use crate::wire::control::{OP_DURABLE_JOIN, REASON_PARTIALLY_EVICTED};
use proptest::prelude::*;
use serde_json::json;

const ALICE: &str = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";
const BOB: &str = "UDI36ZKVNUM5WMO4QQ6HDQU7F4OH2RCXOJRX6GAIOS5SKVNNSKCDNLJA";
const UUID: &str = "9307730c-fc82-43de-89fa-0116d4c2ef0f";

fn space() -> Space {
    Space::new("main").unwrap()
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn ch(s: &str) -> ConcreteChannel {
    ConcreteChannel::new(s).unwrap()
}

fn subj(who: &str) -> String {
    format!("cotal.main.ctl.delivery.{who}")
}

fn reply_of(who: &str) -> String {
    format!("{}.reply.{UUID}", subj(who))
}

fn body(op: &str, args: Value, from: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"op": op, "args": args, "from": {"id": from, "name": "a"}})).unwrap()
}

fn acl(allow: &[&str]) -> AclRecord {
    AclRecord {
        allow_subscribe: allow.iter().map(|s| (*s).to_owned()).collect(),
        revision: 1,
        updated_at: UnixMillis(1),
        extra: Extra::new(),
    }
}

/// Admits as alice with a bound reply.
fn alice(payload: &[u8]) -> Admission {
    admit(&space(), &subj(ALICE), Some(&reply_of(ALICE)), payload)
}

/// The refusal's reply as `(reply_to, decoded reply)`, asserting its shape.
fn refused(a: &Admission) -> (String, ControlReply) {
    let Admission::Refused(r) = a else {
        panic!("not refused: {a:?}")
    };
    assert_eq!(r.reply_to, reply_of(ALICE));
    let reply: ControlReply = json::decode(&r.reply).unwrap();
    assert!(!reply.ok);
    assert_eq!(reply.error.as_deref(), Some(r.reason.to_string().as_str()));
    (r.reply_to.clone(), reply)
}

fn error_of(a: &Admission) -> String {
    refused(a).1.error.unwrap()
}

// --- step 1: the bound reply (D1, I27) ---------------------------------------------------------

#[test]
fn d1_unbound_replies_get_nothing_at_all() {
    let ok = body(OP_DURABLE_JOIN, json!({"channel": "general"}), ALICE);
    let req = subj(ALICE);
    for bad in [
        // Another agent's reply lane (the confused deputy).
        reply_of(BOB),
        format!("{req}.reply.a.b"),
        format!("{req}.reply."),
        format!("{req}.reply"),
        format!("{req}.replyx.{UUID}"),
        format!("cotal.other.ctl.delivery.{ALICE}.reply.{UUID}"),
        format!("_INBOX_{ALICE}.abc"),
        format!("{req}.reply.a b"),
        String::new(),
    ] {
        let a = admit(&space(), &req, Some(&bad), &ok);
        assert_eq!(
            a,
            Admission::Ignored(Unanswerable::UnboundReply {
                subject: req.clone(),
                reply: bad.clone()
            }),
            "{bad}"
        );
        assert_eq!(a.reply_to(), None);
        assert_eq!(
            match a {
                Admission::Ignored(u) => u.to_string(),
                _ => unreachable!(),
            },
            format!(
                "rejected delivery request on {req}: reply target {bad} is not under the sender's own reply subtree"
            )
        );
    }
    // Even a garbage payload gets nothing when the reply is unbound: the guard runs first.
    assert!(matches!(
        admit(&space(), &req, Some(&reply_of(BOB)), b"{not json"),
        Admission::Ignored(Unanswerable::UnboundReply { .. })
    ));
    assert_eq!(
        admit(&space(), &req, None, &ok),
        Admission::Ignored(Unanswerable::NoReply {
            subject: req.clone()
        })
    );
    // The legitimate target is answered (D1's second half).
    assert_eq!(
        admit(&space(), &req, Some(&reply_of(ALICE)), &ok).reply_to(),
        Some(reply_of(ALICE).as_str())
    );
}

#[test]
fn subjects_outside_the_delivery_service_of_this_space_get_nothing() {
    let ok = body("listMemberships", json!({}), ALICE);
    for subject in [
        format!("cotal.other.ctl.delivery.{ALICE}"),
        format!("cotal.main.ctl.manager.{ALICE}"),
        format!("cotal.main.ctl.delivery.{ALICE}.reply.{UUID}"),
        format!("cotal.main.chat.{ALICE}.general"),
        "cotal.main.ctl.delivery.not an id".to_owned(),
        String::new(),
    ] {
        let reply = format!("{subject}.reply.{UUID}");
        assert_eq!(
            admit(&space(), &subject, Some(&reply), &ok),
            Admission::Ignored(Unanswerable::NotDeliveryRequest {
                subject: subject.clone()
            }),
            "{subject}"
        );
    }
}

// --- steps 2-5 (D2) -----------------------------------------------------------------------------

#[test]
fn oversize_payload_is_refused_before_decoding() {
    let big = vec![b' '; MAX_REQUEST_BYTES + 1];
    let a = alice(&big);
    assert_eq!(
        error_of(&a),
        format!(
            "record of {} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit",
            MAX_REQUEST_BYTES + 1
        )
    );
    assert!(matches!(
        a,
        Admission::Refused(Refused {
            reason: RefusalReason::TooLarge { .. },
            ..
        })
    ));
}

#[test]
fn d2_malformed_json_gets_the_parse_message() {
    for bad in [&b"{not json"[..], b"", b"\xff", b"[[[[1]]]] x"] {
        let a = alice(bad);
        let Admission::Refused(Refused {
            reason: RefusalReason::Malformed(e),
            ..
        }) = &a
        else {
            panic!("{a:?}")
        };
        assert_eq!(error_of(&a), e.to_string());
    }
}

#[test]
fn d2_sender_mismatch() {
    const MISMATCH: &str = "sender mismatch — request rejected";
    for payload in [
        body("listMemberships", json!({}), BOB),
        br#"{"op":"listMemberships","args":{}}"#.to_vec(),
        br#"{"op":"listMemberships","from":{"id":5}}"#.to_vec(),
        br#"{"op":"listMemberships","from":null}"#.to_vec(),
        b"null".to_vec(),
        b"[1]".to_vec(),
        b"\"x\"".to_vec(),
    ] {
        let a = alice(&payload);
        assert_eq!(error_of(&a), MISMATCH);
        assert!(matches!(
            a,
            Admission::Refused(Refused {
                reason: RefusalReason::SenderMismatch { .. },
                ..
            })
        ));
    }
    // The sender check runs before op validation.
    assert_eq!(error_of(&alice(&body("nope", json!({}), BOB))), MISMATCH);
    assert_eq!(
        alice(&body("nope", json!({}), BOB)),
        Admission::Refused(Refused {
            subject_sender: id(ALICE),
            reply_to: reply_of(ALICE),
            reason: RefusalReason::SenderMismatch {
                claimed: Some(BOB.into())
            },
            reply: failure_reply(MISMATCH),
        })
    );
}

#[test]
fn d2_op_and_argument_errors_use_the_reference_texts() {
    let cases: [(&str, Value, &str); 9] = [
        (
            "nope",
            json!({}),
            "op \"nope\" not supported on the delivery control service",
        ),
        (
            "durableJoin",
            json!({}),
            "durableJoin: channel must be a non-blank string",
        ),
        (
            "durableJoin",
            json!({"channel": "   "}),
            "durableJoin: channel must be a non-blank string",
        ),
        (
            "durableLeave",
            json!({"channel": 3, "generation": 1}),
            "durableLeave: channel must be a non-blank string",
        ),
        (
            "durableJoin",
            json!({"channel": "general.>"}),
            "durableJoin: \"general.>\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)",
        ),
        (
            "durableLeave",
            json!({"channel": "team.*", "generation": 1}),
            "durableLeave: \"team.*\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)",
        ),
        (
            "durableLeave",
            json!({"channel": "general"}),
            "durableLeave: a finite generation is required (fail-closed stale-leave guard)",
        ),
        (
            "durableLeave",
            json!({"channel": "general", "generation": "1"}),
            "durableLeave: a finite generation is required (fail-closed stale-leave guard)",
        ),
        (
            "durableLeave",
            json!({"channel": "general", "generation": null}),
            "durableLeave: a finite generation is required (fail-closed stale-leave guard)",
        ),
    ];
    for (op, args, want) in cases {
        assert_eq!(
            error_of(&alice(&body(op, args.clone(), ALICE))),
            want,
            "{op} {args}"
        );
    }
    // The channel validator's own message.
    let e = error_of(&alice(&body(
        "durableJoin",
        json!({"channel": "a..b"}),
        ALICE,
    )));
    assert!(e.starts_with("invalid channel"), "{e}");
    // A missing op reads as the reference's `undefined`; a non-string op as its JSON text.
    assert_eq!(
        error_of(&alice(
            format!(r#"{{"from":{{"id":"{ALICE}","name":"a"}}}}"#).as_bytes()
        )),
        "op \"undefined\" not supported on the delivery control service"
    );
    assert_eq!(
        error_of(&alice(
            format!(r#"{{"op":7,"from":{{"id":"{ALICE}"}}}}"#).as_bytes()
        )),
        "op \"7\" not supported on the delivery control service"
    );
}

#[test]
fn admitted_requests_carry_the_authenticated_requester_and_reply() {
    let a = alice(&body(
        "durableJoin",
        json!({"channel": " team.backend ", "joinCursor": 41}),
        ALICE,
    ));
    let Admission::Admitted(ad) = a else {
        panic!("{a:?}")
    };
    assert_eq!(ad.requester, id(ALICE));
    assert_eq!(ad.reply_to, reply_of(ALICE));
    assert_eq!(ad.reply_id.as_str(), UUID);
    assert_eq!(
        ad.request,
        DeliveryRequest::DurableJoin {
            channel: ch("team.backend"),
            join_cursor: Some(41)
        }
    );
    // Display metadata is not validated: no name, a numeric role, null args.
    let bare =
        format!(r#"{{"op":"listMemberships","args":null,"from":{{"id":"{ALICE}","role":1}}}}"#);
    assert!(matches!(
        alice(bare.as_bytes()),
        Admission::Admitted(Admitted {
            request: DeliveryRequest::ListMemberships,
            ..
        })
    ));
    // Missing args read as `{}`.
    let no_args = format!(r#"{{"op":"listMemberships","from":{{"id":"{ALICE}","name":"a"}}}}"#);
    assert!(matches!(alice(no_args.as_bytes()), Admission::Admitted(_)));
}

// --- the join gate and the leave path (B22, B23, I25) -------------------------------------------

#[test]
fn b22_join_is_gated_by_the_current_read_acl() {
    let me = id(ALICE);
    assert_eq!(
        gate_join(&me, &ch("general"), None)
            .unwrap_err()
            .error
            .unwrap(),
        format!(
            "durableJoin: no read ACL on record for {ALICE} (not provisioned for durable delivery)"
        )
    );
    assert_eq!(
        gate_join(&me, &ch("review"), Some(&acl(&["general", "team.*"])))
            .unwrap_err()
            .error
            .unwrap(),
        "channel \"review\" is not within your read ACL [general, team.*]"
    );
    // Narrowed to `[]`: reads nothing.
    assert_eq!(
        gate_join(&me, &ch("general"), Some(&acl(&[])))
            .unwrap_err()
            .error
            .unwrap(),
        "channel \"general\" is not within your read ACL []"
    );
    assert_eq!(
        gate_join(&me, &ch("general"), Some(&acl(&["general"]))),
        Ok(())
    );
    assert_eq!(
        gate_join(&me, &ch("team.x"), Some(&acl(&["team.*"]))),
        Ok(())
    );
    assert_eq!(gate_join(&me, &ch("team.x.y"), Some(&acl(&[">"]))), Ok(()));
    assert!(gate_join(&me, &ch("team.x.y"), Some(&acl(&["team.*"]))).is_err());
    // An invalid entry covers nothing (fail closed), and is listed verbatim.
    assert_eq!(
        gate_join(&me, &ch("team.y"), Some(&acl(&["team.>.x"])))
            .unwrap_err()
            .error
            .unwrap(),
        "channel \"team.y\" is not within your read ACL [team.>.x]"
    );
    // An ACL read through the KV rule: absent vs present-and-empty.
    assert!(gate_join(&me, &ch("general"), AclRecord::from_kv(None).as_ref()).is_err());
    let raw = br#"{"allowSubscribe":["general"],"revision":1,"updatedAt":1}"#;
    assert_eq!(
        gate_join(&me, &ch("general"), AclRecord::from_kv(Some(raw)).as_ref()),
        Ok(())
    );
}

#[test]
fn b23_leave_is_not_acl_gated_and_needs_a_finite_generation() {
    // The join is refused once the ACL is narrowed …
    let join = alice(&body("durableJoin", json!({"channel": "review"}), ALICE));
    let Admission::Admitted(join) = join else {
        panic!()
    };
    let Work::Join(pending) = join.into_work() else {
        panic!()
    };
    let narrowed = acl(&[]);
    let err = pending.clone().gate(Some(&narrowed)).unwrap_err();
    assert_eq!(
        std::str::from_utf8(&encode_reply(&err)).unwrap(),
        r#"{"ok":false,"error":"channel \"review\" is not within your read ACL []"}"#
    );
    let approved = pending.gate(Some(&acl(&["review"]))).unwrap();
    assert_eq!(approved.owner, id(ALICE));
    assert_eq!(approved.channel, ch("review"));
    // … but the leave goes straight to the registry: its work has no ACL anywhere.
    let leave = alice(&body(
        "durableLeave",
        json!({"channel": "review", "generation": 3}),
        ALICE,
    ));
    let Admission::Admitted(leave) = leave else {
        panic!()
    };
    assert_eq!(
        leave.into_work(),
        Work::Leave(LeaveWork {
            owner: id(ALICE),
            channel: ch("review"),
            generation: 3,
            reply_to: reply_of(ALICE),
        })
    );
    // A leave without a finite generation is refused at the gate.
    assert_eq!(
        error_of(&alice(&body(
            "durableLeave",
            json!({"channel": "review"}),
            ALICE
        ))),
        "durableLeave: a finite generation is required (fail-closed stale-leave guard)"
    );
    let list = alice(&body("listMemberships", json!({}), ALICE));
    let Admission::Admitted(list) = list else {
        panic!()
    };
    assert_eq!(
        list.into_work(),
        Work::List(ListWork {
            owner: id(ALICE),
            reply_to: reply_of(ALICE)
        })
    );
}

// --- G22 keys -------------------------------------------------------------------------------------

#[test]
fn g22_keys_are_per_owner_and_channel_and_lists_per_owner() {
    let join = DeliveryRequest::DurableJoin {
        channel: ch("a"),
        join_cursor: None,
    };
    let leave = DeliveryRequest::DurableLeave {
        channel: ch("a"),
        generation: 1,
    };
    let other = DeliveryRequest::DurableJoin {
        channel: ch("b"),
        join_cursor: Some(3),
    };
    let (a, b) = (id(ALICE), id(BOB));
    assert_eq!(serial_key(&a, &join), serial_key(&a, &leave));
    assert_ne!(serial_key(&a, &join), serial_key(&a, &other));
    assert_ne!(serial_key(&a, &join), serial_key(&b, &join));
    assert_eq!(
        serial_key(&a, &DeliveryRequest::ListMemberships),
        SerialKey::Owner { owner: a.clone() }
    );
    assert_ne!(
        serial_key(&a, &DeliveryRequest::ListMemberships),
        serial_key(&b, &DeliveryRequest::ListMemberships)
    );
    let Admission::Admitted(ad) = alice(&body(
        "durableLeave",
        json!({"channel": "a", "generation": 1}),
        ALICE,
    )) else {
        panic!()
    };
    assert_eq!(
        ad.serial_key(),
        SerialKey::Membership {
            owner: a,
            channel: ch("a")
        }
    );
}

// --- reply builders -------------------------------------------------------------------------------

#[test]
fn success_replies_encode_in_reference_order() {
    let s = |b: Bytes| String::from_utf8(b.to_vec()).unwrap();
    assert_eq!(
        s(durable_join_reply(true, None, 1, None)),
        r#"{"ok":true,"data":{"durable":true,"generation":1}}"#
    );
    assert_eq!(
        s(durable_join_reply(
            false,
            Some(REASON_PARTIALLY_EVICTED),
            2,
            Some(40)
        )),
        r#"{"ok":true,"data":{"durable":false,"reason":"activation catch-up window partially evicted by retention","generation":2,"joinCursor":40}}"#
    );
    assert_eq!(
        s(durable_leave_reply(&ch("review"), false)),
        r#"{"ok":true,"data":{"channel":"review"}}"#
    );
    assert_eq!(
        s(durable_leave_reply(&ch("review"), true)),
        r#"{"ok":true,"data":{"channel":"review","alreadyLeft":true}}"#
    );
    let m = |c: &str, g: u64, a: bool| MembershipSummary {
        channel: ch(c),
        generation: g,
        activated: a,
        extra: Extra::new(),
    };
    assert_eq!(
        s(list_memberships_reply([
            m("general", 1, true),
            m("review", 2, false)
        ])),
        r#"{"ok":true,"data":{"memberships":[{"channel":"general","generation":1,"activated":true},{"channel":"review","generation":2,"activated":false}]}}"#
    );
    assert_eq!(
        s(list_memberships_reply([])),
        r#"{"ok":true,"data":{"memberships":[]}}"#
    );
    assert_eq!(s(failure_reply("boom")), r#"{"ok":false,"error":"boom"}"#);
}

// --- properties (I27, totality) -------------------------------------------------------------------

fn subject_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(subj(ALICE)),
        Just(subj(BOB)),
        Just(format!("cotal.other.ctl.delivery.{ALICE}")),
        "[a-z.*>]{0,30}",
        ".{0,40}",
    ]
}

fn reply_strategy(subject: String) -> impl Strategy<Value = Option<String>> {
    let s = subject.clone();
    prop_oneof![
        Just(None),
        "[a-zA-Z0-9._-]{0,12}".prop_map(move |t| Some(format!("{s}.reply.{t}"))),
        Just(Some(reply_of(BOB))),
        ".{0,40}".prop_map(Some),
        "[a-z0-9.]{0,10}".prop_map(move |t| Some(format!("{subject}{t}"))),
    ]
}

fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (
            prop_oneof![
                Just("durableJoin".to_owned()),
                Just("durableLeave".to_owned()),
                Just("listMemberships".to_owned()),
                ".{0,8}"
            ],
            prop_oneof![Just(ALICE.to_owned()), Just(BOB.to_owned()), ".{0,8}"],
            prop_oneof![
                Just(json!("general")),
                Just(json!("a.*")),
                Just(json!(5)),
                ".{0,10}".prop_map(Value::from)
            ],
            prop_oneof![
                Just(json!(1)),
                Just(json!(1.5)),
                Just(json!(-1)),
                Just(Value::Null)
            ],
        )
            .prop_map(|(op, from, channel, generation)| {
                body(
                    &op,
                    json!({"channel": channel, "generation": generation}),
                    &from,
                )
            }),
    ]
}

proptest! {
    #[test]
    fn admit_is_total_and_replies_only_under_the_request_subject(
        (subject, reply) in subject_strategy().prop_flat_map(|s| (Just(s.clone()), reply_strategy(s))),
        payload in payload_strategy(),
    ) {
        let a = admit(&space(), &subject, reply.as_deref(), &payload);
        if let Some(to) = a.reply_to() {
            let prefix = format!("{subject}.reply.");
            prop_assert!(to.starts_with(&prefix), "{to} not under {prefix}");
            prop_assert_eq!(Some(to), reply.as_deref());
        }
        match &a {
            Admission::Refused(r) => {
                let back: ControlReply = json::decode(&r.reply).unwrap();
                prop_assert!(!back.ok);
                prop_assert_eq!(back.error, Some(r.reason.to_string()));
            }
            Admission::Admitted(ad) => {
                // The requester is the subject's sender.
                prop_assert_eq!(subj(ad.requester.as_str()), subject);
            }
            Admission::Ignored(_) => {}
        }
    }
}
