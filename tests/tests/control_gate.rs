//! Replays every `ctl.delivery` request recorded from the reference 0.6.0 through the request gate
//! (`admit`, then `gate_join` with the recorded ACL rows): carol's three refusals must give the
//! recorded error strings byte for byte, and every other request must be admitted with the
//! recorded reply subject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cotal_core::delivery::control::{Admission, Work, admit};
use cotal_core::wire::json;
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::token::Space;
use cotal_tests::fixture_json;
use serde_json::Value;
use std::collections::BTreeMap;

/// The ACL rows by owner id, as the daemon reads them (`AclRecord::from_kv`).
fn acls() -> BTreeMap<String, AclRecord> {
    let fixture = fixture_json("kv-acl-records.json");
    let stored = fixture["stored"].as_array().expect("stored");
    stored
        .iter()
        .map(|row| {
            let owner = row["subject"]
                .as_str()
                .and_then(|s| s.rsplit('.').next())
                .expect("owner")
                .to_owned();
            let bytes = serde_json::to_vec(&row["data"]).unwrap();
            (
                owner,
                AclRecord::from_kv(Some(&bytes)).expect("present ACL"),
            )
        })
        .collect()
}

/// The error the gate produces for one request, or `None` when it passes every check.
fn gate(
    space: &Space,
    acls: &BTreeMap<String, AclRecord>,
    request: &Value,
) -> (String, Option<String>) {
    let subject = request["subject"].as_str().unwrap();
    let reply = request["reply"].as_str();
    let payload = serde_json::to_vec(&request["payload"]).unwrap();
    match admit(space, subject, reply, &payload) {
        Admission::Admitted(a) => {
            let reply_to = a.reply_to.clone();
            let owner = a.requester.as_str().to_owned();
            match a.into_work() {
                Work::Join(join) => match join.gate(acls.get(&owner)) {
                    Ok(_) => (reply_to, None),
                    Err(e) => (reply_to, e.error),
                },
                _ => (reply_to, None),
            }
        }
        Admission::Refused(r) => {
            let reply: cotal_core::wire::control::ControlReply = json::decode(&r.reply).unwrap();
            (r.reply_to, reply.error)
        }
        other => panic!("{subject}: not answered: {other:?}"),
    }
}

#[test]
fn reference_exchanges_replay_through_the_gate() {
    let space = Space::new("wirefix").unwrap();
    let acls = acls();
    assert_eq!(acls.len(), 4);
    let exchanges = fixture_json("ctl-delivery-exchanges.json");
    let exchanges = exchanges.as_array().expect("array");
    assert_eq!(exchanges.len(), 14);
    let mut refusals = Vec::new();
    for ex in exchanges {
        let (reply_to, error) = gate(&space, &acls, &ex["request"]);
        let recorded = &ex["reply"];
        assert_eq!(
            Some(reply_to.as_str()),
            recorded["subject"].as_str(),
            "{}",
            ex["step"]
        );
        let ok = recorded["payload"]["ok"].as_bool().unwrap();
        if ok {
            assert_eq!(error, None, "{}", ex["step"]);
        } else {
            let want = recorded["payload"]["error"].as_str().unwrap();
            assert_eq!(error.as_deref(), Some(want), "{}", ex["step"]);
            refusals.push((ex["caller"].as_str().unwrap().to_owned(), want.to_owned()));
        }
    }
    assert_eq!(
        refusals,
        [
            (
                "carol".to_owned(),
                "channel \"review\" is not within your read ACL [general]".to_owned()
            ),
            (
                "carol".to_owned(),
                "durableJoin: \"general.>\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)".to_owned()
            ),
            (
                "carol".to_owned(),
                "durableLeave: a finite generation is required (fail-closed stale-leave guard)"
                    .to_owned()
            ),
        ]
    );
}

#[test]
fn reference_requests_redirected_to_another_lane_get_no_reply() {
    let space = Space::new("wirefix").unwrap();
    let exchanges = fixture_json("ctl-delivery-exchanges.json");
    let exchanges = exchanges.as_array().expect("array");
    // Every request, re-aimed at the next caller's recorded reply lane (D1), is not answered.
    for (ex, other) in exchanges.iter().zip(exchanges.iter().cycle().skip(1)) {
        let subject = ex["request"]["subject"].as_str().unwrap();
        let victim = other["request"]["reply"].as_str().unwrap();
        if victim.starts_with(&format!("{subject}.reply.")) {
            continue;
        }
        let payload = serde_json::to_vec(&ex["request"]["payload"]).unwrap();
        let a = admit(&space, subject, Some(victim), &payload);
        assert!(matches!(a, Admission::Ignored(_)), "{a:?}");
        assert_eq!(a.reply_to(), None);
    }
}
