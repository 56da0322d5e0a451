//! Every JSON record recorded from the TypeScript reference 0.6.0 decodes into the typed wire
//! records, re-encodes to the same JSON value (and, where the exact bytes were recorded, to the same
//! bytes), and carries the `Nats-Msg-Id` that `wire::msgid` builds for it.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is the test failing"
)]

use cotal_core::wire::control::{
    ControlReply, ControlRequest, DeliveryRefusal, DeliveryRequest, DeliveryRequestError,
    DurableJoinReply, DurableLeaveReply, ListMembershipsReply,
};
use cotal_core::wire::json::{self, DecodeError, WireRecord};
use cotal_core::wire::message::{CotalMessage, Presence, PresenceStatus, Route};
use cotal_core::wire::msgid::{NATS_MSG_ID, Plane3MsgId, publish_msg_id};
use cotal_core::wire::records::{
    AclRecord, DeliveryLease, MemberState, MembershipRecord, Plane3Entry, Plane3Reason,
};
use cotal_core::wire::{AgentId, ConcreteChannel};
use cotal_tests::{b64, fixture_json, fixture_text};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;

const SPACE_PREFIX: &str = "cotal.wirefix.";

#[test]
fn base64_helper_decodes() {
    assert_eq!(b64("TkFUUy8xLjANCg0K"), b"NATS/1.0\r\n\r\n");
    assert_eq!(b64("YQ=="), b"a");
    assert_eq!(b64("YWI="), b"ab");
}

fn bytes_of(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// Decodes `v` as `T` through the wire entry point, re-encodes it, and checks the JSON value is
/// unchanged.
fn round_trip<T: DeserializeOwned + WireRecord>(v: &Value) -> T {
    let rec: T = json::decode(&bytes_of(v)).unwrap_or_else(|e| panic!("{e}\n{v}"));
    let again: Value = serde_json::from_slice(&json::encode(&rec)).unwrap();
    assert_eq!(&again, v, "re-encoded record differs");
    rec
}

fn msg_id_header(stored: &Value) -> &str {
    stored["headers"][NATS_MSG_ID][0]
        .as_str()
        .expect("Nats-Msg-Id header")
}

/// `cotal.wirefix.<kind>.<a>.<rest>` → (kind, a, rest).
fn split_subject(subject: &str) -> (&str, &str, &str) {
    let tail = subject.strip_prefix(SPACE_PREFIX).expect("space prefix");
    let mut it = tail.splitn(3, '.');
    (
        it.next().unwrap(),
        it.next().unwrap(),
        it.next().unwrap_or(""),
    )
}

/// When the stored message kept the server's raw reply, our encoding must equal its bytes.
fn assert_raw_bytes_match<T: WireRecord>(stored: &Value, rec: &T) -> bool {
    let Some(raw) = stored["raw_response"]["message"]["data"].as_str() else {
        return false;
    };
    let expected = b64(raw);
    let ours = json::encode(rec);
    assert_eq!(
        std::str::from_utf8(&ours).unwrap(),
        std::str::from_utf8(&expected).unwrap(),
        "byte-exact re-encode"
    );
    let hdrs = String::from_utf8(b64(stored["raw_response"]["message"]["hdrs"]
        .as_str()
        .unwrap()))
    .unwrap();
    assert!(
        hdrs.contains(&format!("{NATS_MSG_ID}: {}\r\n", msg_id_header(stored))),
        "{hdrs}"
    );
    true
}

fn stored_messages(file: &str) -> Vec<Value> {
    fixture_json(file)["messages"].as_array().unwrap().clone()
}

#[test]
fn chat_messages_decode_and_carry_their_id_as_msg_id() {
    let mut raw_checked = 0;
    let all = stored_messages("chat-messages.json");
    assert_eq!(all.len(), 85);
    for stored in &all {
        let msg: CotalMessage = round_trip(&stored["data"]);
        assert_eq!(
            CotalMessage::decode(&bytes_of(&stored["data"])).unwrap(),
            msg
        );
        assert_eq!(msg_id_header(stored), publish_msg_id(&msg));
        let (kind, sender, channel) = split_subject(stored["subject"].as_str().unwrap());
        assert_eq!((kind, sender), ("chat", msg.from.id.as_str()));
        assert_eq!(
            msg.route,
            Route::Channel(ConcreteChannel::new(channel).unwrap())
        );
        if assert_raw_bytes_match(stored, &msg) {
            raw_checked += 1;
        }
    }
    assert_eq!(raw_checked, 8);
}

#[test]
fn dm_and_task_messages_decode() {
    let f = fixture_json("dm-task-messages.json");
    let dms = f["DM_wirefix"].as_array().unwrap();
    assert_eq!(dms.len(), 1);
    for stored in dms {
        let msg: CotalMessage = round_trip(&stored["data"]);
        assert_eq!(msg_id_header(stored), publish_msg_id(&msg));
        let (kind, target, sender) = split_subject(stored["subject"].as_str().unwrap());
        assert_eq!((kind, sender), ("inst", msg.from.id.as_str()));
        assert_eq!(msg.route, Route::To(AgentId::new(target).unwrap()));
        assert!(assert_raw_bytes_match(stored, &msg));
    }
    // The TASK stream was already drained by bob's `svc_reviewer` consumer when it was dumped; the
    // anycast itself is checked from the wire log (`wire_log_records_re_encode_byte_for_byte`).
    assert_eq!(f["TASK_wirefix"], Value::Array(vec![]));
}

fn chat_by_seq() -> BTreeMap<u64, Value> {
    stored_messages("chat-messages.json")
        .into_iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m))
        .collect()
}

#[test]
fn dinbox_entries_decode_and_match_their_chat_source() {
    let chat = chat_by_seq();
    let entries = stored_messages("dinbox-entries.json");
    assert_eq!(entries.len(), 70);
    let (mut raw_checked, mut with_source, mut mentions) = (0, 0, 0);
    for stored in &entries {
        let entry: Plane3Entry = round_trip(&stored["data"]);
        let (kind, owner, rest) = split_subject(stored["subject"].as_str().unwrap());
        assert_eq!((kind, rest), ("dinbox", ""));
        let owner = AgentId::new(owner).unwrap();
        // The Msg-Id is built from the entry and the subject's owner, and parses back.
        let id = Plane3MsgId::for_entry(&entry, &owner);
        assert_eq!(msg_id_header(stored), id.to_string());
        assert_eq!(Plane3MsgId::parse(msg_id_header(stored)).unwrap(), id);
        assert_ne!(
            entry.msg.from.id, owner,
            "a sender never gets a backstop copy"
        );
        match entry.reason {
            Plane3Reason::LiveMention => {
                mentions += 1;
                assert_eq!(entry.generation, 0);
                assert!(entry.msg.mentions_name("alice"));
            }
            Plane3Reason::DurableChannel => assert!(entry.generation >= 1),
            _ => unreachable!(),
        }
        // `channel` is the CHAT subject's channel; `msg` is the CHAT body as published.
        if let Some(src) = chat.get(&entry.seq) {
            with_source += 1;
            let (_, _, chat_channel) = split_subject(src["subject"].as_str().unwrap());
            assert_eq!(entry.channel.as_str(), chat_channel);
            let src_msg = CotalMessage::decode(&bytes_of(&src["data"])).unwrap();
            assert_eq!(src_msg, entry.msg);
        }
        assert_eq!(
            Some(&entry.channel),
            entry.msg.channel(),
            "no spoofed label in this run"
        );
        if assert_raw_bytes_match(stored, &entry) {
            raw_checked += 1;
        }
    }
    assert_eq!((raw_checked, mentions), (70, 1));
    assert!(with_source >= 60, "{with_source}");
}

#[test]
fn dlv_bodies_are_the_bare_dinbox_msg_under_the_same_msg_id() {
    let dinbox: BTreeMap<String, Plane3Entry> = stored_messages("dinbox-entries.json")
        .iter()
        .map(|s| {
            (
                msg_id_header(s).to_owned(),
                json::decode(&bytes_of(&s["data"])).unwrap(),
            )
        })
        .collect();
    let dlv = stored_messages("dlv-messages.json");
    assert_eq!(dlv.len(), 70);
    for stored in &dlv {
        let msg = CotalMessage::decode(&bytes_of(&stored["data"])).unwrap();
        let _: CotalMessage = round_trip(&stored["data"]);
        let (kind, owner, _) = split_subject(stored["subject"].as_str().unwrap());
        assert_eq!(kind, "dlv");
        let entry = dinbox
            .get(msg_id_header(stored))
            .expect("DLV copy has a dinbox entry");
        assert_eq!(
            entry.msg, msg,
            "the DLV body is the dinbox msg, envelope stripped"
        );
        let id = Plane3MsgId::for_entry(entry, &AgentId::new(owner).unwrap());
        assert_eq!(msg_id_header(stored), id.to_string());
        assert!(assert_raw_bytes_match(stored, &msg));
    }
}

#[test]
fn membership_records_decode_in_every_snapshot_and_write() {
    let f = fixture_json("kv-members-records.json");
    let mut decoded = 0;
    for (name, records) in f["snapshots"].as_object().unwrap() {
        for stored in records.as_array().unwrap() {
            if stored.get("error").is_some() {
                continue; // a superseded revision (history=1)
            }
            let rec: MembershipRecord = round_trip(&stored["data"]);
            let key = stored["subject"]
                .as_str()
                .unwrap()
                .strip_prefix("$KV.cotal_members_wirefix.");
            assert_eq!(
                key,
                Some(format!("{}/{}", rec.channel, rec.owner).as_str()),
                "{name}"
            );
            // In the reference a tombstone always flips the state.
            assert_eq!(rec.is_tombstone(), rec.state == MemberState::LiveConfirmed);
            assert!(rec.generation >= 1);
            decoded += 1;
        }
    }
    assert_eq!(decoded, 26);

    let writes = fixture_json("kv-members-writes.json");
    let writes = writes.as_array().unwrap();
    assert_eq!(writes.len(), 16);
    let mut tombstones = 0;
    for w in writes {
        let rec: MembershipRecord = round_trip(&w["payload"]);
        if w["headers"]["Nats-Expected-Last-Subject-Sequence"][0] == "0" {
            assert_eq!(
                rec.activated,
                Some(false),
                "a fresh join is written not yet activated"
            );
        }
        tombstones += usize::from(rec.is_tombstone());
    }
    assert_eq!(tombstones, 2);
}

#[test]
fn acl_records_are_present_and_round_trip() {
    let f = fixture_json("kv-acl-records.json");
    let stored = f["stored"].as_array().unwrap();
    let writes = f["writes"].as_array().unwrap();
    assert_eq!((stored.len(), writes.len()), (4, 4));
    for v in stored
        .iter()
        .map(|s| &s["data"])
        .chain(writes.iter().map(|w| &w["payload"]))
    {
        let rec: AclRecord = round_trip(v);
        assert_eq!(AclRecord::from_kv(Some(&bytes_of(v))), Some(rec.clone()));
        assert_eq!(rec.revision, 1);
        assert!(!rec.allow_subscribe.is_empty());
    }
}

#[test]
fn delivery_lease_writes_and_the_del_marker() {
    let f = fixture_json("kv-delivery-lease.json");
    let up: DeliveryLease = round_trip(&f["stored_while_daemon_up"][0]["data"]);
    assert!(up.ready);
    let after = &f["stored_after_daemon_sigterm"][0];
    assert_eq!(after["headers"]["KV-Operation"][0], "DEL");
    assert!(after.get("data").is_none());
    assert_eq!(
        DeliveryLease::from_kv(None),
        None,
        "a DEL marker stores no data"
    );
    let writes = f["writes"].as_array().unwrap();
    assert_eq!(writes.len(), 4);
    let mut seen = Vec::new();
    for w in writes {
        match &w["payload"] {
            Value::String(s) => {
                assert_eq!(w["headers"]["KV-Operation"][0], "DEL");
                assert_eq!(DeliveryLease::from_kv(Some(s.as_bytes())), None);
                assert_eq!(
                    json::decode::<DeliveryLease>(s.as_bytes()),
                    Err(DecodeError::Empty)
                );
                seen.push(None);
            }
            v => {
                let lease: DeliveryLease = round_trip(v);
                assert_eq!(
                    DeliveryLease::from_kv(Some(&bytes_of(v))),
                    Some(lease.clone())
                );
                seen.push(Some(lease.ready));
            }
        }
    }
    assert_eq!(seen, vec![Some(false), Some(true), Some(true), None]);
}

#[test]
fn presence_records_decode_and_offline_is_scrubbed() {
    let f = fixture_json("kv-presence-records.json");
    let live: Vec<Presence> = f["stored_while_live"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| round_trip(&s["data"]))
        .collect();
    let stopped: Vec<Presence> = f["stored_after_agents_stop"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| round_trip(&s["data"]))
        .collect();
    assert_eq!((live.len(), stopped.len()), (4, 4));
    for (l, s) in live.iter().zip(&stopped) {
        assert_eq!(l.status, PresenceStatus::Idle);
        assert!(s.is_scrubbed_offline(), "I34");
        let mut scrubbed = l.to_offline();
        scrubbed.ts = s.ts;
        assert_eq!(&scrubbed, s);
    }
    for w in f["first_write_per_key_and_status"].as_array().unwrap() {
        let p: Presence = round_trip(&w["payload"]);
        let key = w["subject"]
            .as_str()
            .unwrap()
            .strip_prefix("$KV.cotal_presence_wirefix.");
        assert_eq!(key, Some(p.card.id.as_str()));
    }
}

fn acl_of(name: &str) -> AclRecord {
    let ids = fixture_json("identities.json");
    let id = ids["agents"][name]["id"].as_str().unwrap();
    let f = fixture_json("kv-acl-records.json");
    let stored = f["stored"].as_array().unwrap();
    let s = stored
        .iter()
        .find(|s| s["subject"].as_str().unwrap().ends_with(id))
        .unwrap();
    AclRecord::from_kv(Some(&bytes_of(&s["data"]))).unwrap()
}

#[test]
fn ctl_delivery_exchanges_go_through_the_typed_decoder() {
    let ex = fixture_json("ctl-delivery-exchanges.json");
    let ex = ex.as_array().unwrap();
    assert_eq!(ex.len(), 14);
    let mut refusals = Vec::new();
    let mut typed_replies = 0;
    for e in ex {
        let req_v = &e["request"]["payload"];
        let rep_v = &e["reply"]["payload"];
        let req: ControlRequest = round_trip(req_v);
        let (kind, service, sender) = split_subject(e["request"]["subject"].as_str().unwrap());
        assert_eq!(
            (kind, service, sender),
            ("ctl", "delivery", req.from.id.as_str())
        );
        let reply: ControlReply = round_trip(rep_v);
        match DeliveryRequest::from_request(&req) {
            Err(err) => {
                assert!(!reply.ok);
                assert_eq!(reply.error.as_deref(), Some(err.to_string().as_str()));
                refusals.push(err);
            }
            Ok(op) => {
                // What our agent would send is what the reference agent sent.
                assert_eq!(
                    serde_json::to_value(op.to_request(req.from.clone())).unwrap(),
                    *req_v
                );
                if !reply.ok {
                    // Refused after validation: carol's join outside her read ACL.
                    let DeliveryRequest::DurableJoin { channel, .. } = &op else {
                        panic!()
                    };
                    let refusal = DeliveryRefusal::NotWithinReadAcl {
                        channel: channel.to_string(),
                        allow_subscribe: acl_of("carol").allow_subscribe,
                    };
                    assert_eq!(reply.error, Some(refusal.to_string()));
                    assert_eq!(e["caller"], "carol");
                    continue;
                }
                typed_replies += 1;
                match op {
                    DeliveryRequest::DurableJoin { join_cursor, .. } => {
                        assert_eq!(
                            join_cursor, None,
                            "reference agents send no join cursor (G1)"
                        );
                        let d: DurableJoinReply = reply.data_as().unwrap().unwrap();
                        assert!(d.durable && d.generation.is_some() && d.join_cursor.is_none());
                        let _: ControlReply<DurableJoinReply> = round_trip(rep_v);
                    }
                    DeliveryRequest::DurableLeave {
                        channel,
                        generation,
                    } => {
                        assert!(generation >= 1);
                        let d: DurableLeaveReply = reply.data_as().unwrap().unwrap();
                        assert_eq!((d.channel, d.already_left), (channel, false));
                        let _: ControlReply<DurableLeaveReply> = round_trip(rep_v);
                    }
                    DeliveryRequest::ListMemberships => {
                        let d: ListMembershipsReply = reply.data_as().unwrap().unwrap();
                        assert_eq!(d.memberships.len(), 2);
                        let _: ControlReply<ListMembershipsReply> = round_trip(rep_v);
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    assert_eq!(typed_replies, 11);
    assert!(matches!(
        refusals.as_slice(),
        [
            DeliveryRequestError::NotConcrete {
                op: "durableJoin",
                ..
            },
            DeliveryRequestError::GenerationRequired
        ]
    ));
}

/// The two sample messages of conformance.md, verbatim.
const CONFORMANCE_MULTICAST: &str = r#"{"id":"018f1d0a-0000-7000-9000-000000000001","ts":1710000000000,"space":"main",
 "from":{"id":"UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD","name":"alice","role":"planner"},
 "channel":"team.backend","mentions":["bob"],
 "parts":[{"kind":"text","text":"Can you review this?"}],"contextId":"ctx-1"}"#;
const CONFORMANCE_UNICAST: &str = r#"{"id":"018f1d0a-0000-7000-9000-000000000002","ts":1710000001000,"space":"main",
 "from":{"id":"UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD","name":"alice"},
 "to":"UDI36ZKVNUM5WMO4QQ6HDQU7F4OH2RCXOJRX6GAIOS5SKVNNSKCDNLJA",
 "parts":[{"kind":"text","text":"Direct note."}]}"#;

/// Drops the whitespace between JSON tokens (not inside strings), keeping key order.
fn minify(s: &str) -> String {
    let (mut out, mut in_str, mut esc) = (String::new(), false, false);
    for c in s.chars() {
        if in_str {
            out.push(c);
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
        } else if !c.is_whitespace() {
            in_str = c == '"';
            out.push(c);
        }
    }
    out
}

#[test]
fn conformance_sample_messages() {
    let multi = CotalMessage::decode(CONFORMANCE_MULTICAST.as_bytes()).unwrap();
    let _: CotalMessage = round_trip(&serde_json::from_str(CONFORMANCE_MULTICAST).unwrap());
    assert_eq!(
        multi.channel().map(ConcreteChannel::as_str),
        Some("team.backend")
    );
    assert!(multi.mentions_name("Bob"));
    assert_eq!(multi.context_id.as_deref(), Some("ctx-1"));
    let uni = CotalMessage::decode(CONFORMANCE_UNICAST.as_bytes()).unwrap();
    let _: CotalMessage = round_trip(&serde_json::from_str(CONFORMANCE_UNICAST).unwrap());
    assert_eq!(uni.route.field(), "to");
    assert!(uni.mentions.is_empty() && uni.from.role.is_none());
    // Minified, in the documented key order.
    assert_eq!(
        std::str::from_utf8(&json::encode(&multi)).unwrap(),
        minify(CONFORMANCE_MULTICAST)
    );
    assert_eq!(
        std::str::from_utf8(&json::encode(&uni)).unwrap(),
        minify(CONFORMANCE_UNICAST)
    );
    insta::assert_snapshot!(
        "conformance_multicast",
        std::str::from_utf8(&json::encode(&multi)).unwrap()
    );
}

/// Every record payload the observer saw on the wire re-encodes to exactly the same bytes.
#[test]
fn wire_log_records_re_encode_byte_for_byte() {
    fn exact<T: DeserializeOwned + WireRecord>(payload: &str) {
        let rec: T = json::decode(payload.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{payload}"));
        assert_eq!(std::str::from_utf8(&json::encode(&rec)).unwrap(), payload);
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in fixture_text("wire-log.jsonl").lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let subject = r["subject"].as_str().unwrap();
        let Some(payload) = r["payload"].as_str().filter(|p| !p.is_empty()) else {
            continue; // headers-only KV deliveries, DEL markers, or base64 payloads
        };
        let kind = if let Some(rest) = subject.strip_prefix(SPACE_PREFIX) {
            match rest.split('.').next().unwrap() {
                k @ ("chat" | "inst" | "svc" | "dlv") => {
                    exact::<CotalMessage>(payload);
                    match k {
                        "chat" => "chat",
                        "inst" => "inst",
                        "svc" => "svc",
                        _ => "dlv",
                    }
                }
                "dinbox" => {
                    exact::<Plane3Entry>(payload);
                    "dinbox"
                }
                "ctl" if rest.contains(".reply.") => {
                    let v: ControlReply = json::decode(payload.as_bytes()).unwrap();
                    match v.data.as_ref() {
                        Some(d) if d.get("durable").is_some() => {
                            exact::<ControlReply<DurableJoinReply>>(payload)
                        }
                        Some(d) if d.get("memberships").is_some() => {
                            exact::<ControlReply<ListMembershipsReply>>(payload)
                        }
                        Some(_) => exact::<ControlReply<DurableLeaveReply>>(payload),
                        None => exact::<ControlReply>(payload),
                    }
                    "ctl-reply"
                }
                "ctl" => {
                    exact::<ControlRequest>(payload);
                    "ctl-request"
                }
                other => panic!("unexpected subject kind {other}"),
            }
        } else if subject.starts_with("$KV.cotal_members_wirefix.") {
            exact::<MembershipRecord>(payload);
            "members"
        } else if subject.starts_with("$KV.cotal_acl_wirefix.") {
            exact::<AclRecord>(payload);
            "acl"
        } else if subject.starts_with("$KV.cotal_delivery_wirefix.") {
            exact::<DeliveryLease>(payload);
            "lease"
        } else if subject.starts_with("$KV.cotal_presence_wirefix.") {
            exact::<Presence>(payload);
            "presence"
        } else {
            continue;
        };
        *counts.entry(kind).or_default() += 1;
    }
    insta::assert_debug_snapshot!("wire_log_record_counts", counts);
}

#[test]
fn one_record_of_each_type_pinned() {
    let dinbox = stored_messages("dinbox-entries.json");
    let mention = dinbox
        .iter()
        .find(|s| s["data"]["reason"] == "live-mention")
        .unwrap();
    let entry: Plane3Entry = json::decode(&bytes_of(&mention["data"])).unwrap();
    insta::assert_json_snapshot!("plane3_entry_live_mention", entry);
    insta::assert_snapshot!("plane3_msg_id_live_mention", msg_id_header(mention));

    let members = fixture_json("kv-members-writes.json");
    let tomb = members
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["payload"].get("leaveCursor").is_some())
        .unwrap();
    let rec: MembershipRecord = json::decode(&bytes_of(&tomb["payload"])).unwrap();
    insta::assert_snapshot!(
        "membership_tombstone",
        std::str::from_utf8(&json::encode(&rec)).unwrap()
    );

    let p: Presence = json::decode(&bytes_of(
        &fixture_json("kv-presence-records.json")["stored_while_live"][1]["data"],
    ))
    .unwrap();
    insta::assert_json_snapshot!("presence_bob_live", p);
    let l: DeliveryLease = json::decode(&bytes_of(
        &fixture_json("kv-delivery-lease.json")["writes"][0]["payload"],
    ))
    .unwrap();
    insta::assert_json_snapshot!("lease_acquire", l);

    let ex = fixture_json("ctl-delivery-exchanges.json");
    let decoded: Vec<String> = ex
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let req: ControlRequest = json::decode(&bytes_of(&e["request"]["payload"])).unwrap();
            match DeliveryRequest::from_request(&req) {
                Ok(op) => format!("{} {op:?}", e["caller"].as_str().unwrap()),
                Err(err) => format!("{} refused: {err}", e["caller"].as_str().unwrap()),
            }
        })
        .collect();
    insta::assert_debug_snapshot!("ctl_delivery_requests_typed", decoded);
}
