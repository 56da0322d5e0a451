//! Entry points shared by the cargo-fuzz targets in `fuzz/` and by `tests/tests/fuzz_corpus.rs`,
//! which replays the committed corpus through them on every `cargo test`.
//!
//! Each function takes arbitrary bytes, must never panic on them, and asserts the properties that
//! must hold for whatever the decoder accepted (round trips, agreement between the lenient and the
//! strict parsers). A panic is a finding.

use cotal_core::acl::{ReadAcl, pattern_covers, subject_matches};
use cotal_core::wire::subject::{Subject, parse_dinbox_owner, parse_subject};
use cotal_core::wire::{Channel, ConcreteChannel, channel_path, is_concrete_channel};

/// The subject parsers: the reference's authentication parser and the strict typed grammar.
pub fn subject(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();
    let parsed = parse_subject(s);
    let _ = parse_dinbox_owner(s);
    let _ = subject_matches(s, s);
    if let Ok(typed) = Subject::parse(s) {
        // A strictly parsed subject formats back to exactly its input.
        assert_eq!(typed.to_string(), s, "format(parse(s)) != s");
        assert_eq!(Subject::parse(&typed.to_string()).as_ref(), Ok(&typed));
        // Where the strict grammar names a sender, the authentication parser names the same one.
        if let Some(sender) = typed.sender() {
            let parsed = parsed
                .as_ref()
                .expect("strict sender but no authenticated sender");
            assert_eq!(parsed.sender(), sender);
        }
        // The confused-deputy guard never accepts a reply outside the request's own subtree.
        if let Some(reply) = typed.accept_reply(&format!("{s}.reply.x")) {
            assert_eq!(reply.as_str(), "x");
        }
        assert!(typed.accept_reply(&format!("{s}x.reply.y")).is_none());
    }
}

/// The channel validators and the lenient builder.
pub fn channel(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();
    let lenient = channel_path(s);
    let concrete_flag = is_concrete_channel(s);
    match Channel::new(s) {
        Ok(ch) => {
            assert_eq!(ch.as_str(), s);
            // The lenient builder leaves a strictly valid name unchanged.
            assert_eq!(
                lenient.as_deref(),
                Ok(s),
                "channel_path rewrote a valid channel"
            );
            assert_eq!(ch.is_concrete(), concrete_flag);
            assert_eq!(ConcreteChannel::new(s).is_ok(), concrete_flag);
            // Every valid pattern covers itself, and `>` covers every pattern.
            assert!(pattern_covers(s, s));
            assert!(pattern_covers(">", s));
            let acl = ReadAcl::new([ch.clone()]);
            assert!(acl.covers_pattern(&ch));
            if let Some(c) = ch.to_concrete() {
                assert!(acl.covers(&c));
            }
        }
        Err(_) => assert!(ConcreteChannel::new(s).is_err()),
    }
}

use cotal_core::policy::{ChannelConfig, ChannelDefaults, effective_policy};
use cotal_core::wire::control::{
    ControlReply, ControlRequest, DeliveryRequest, DurableJoinReply, DurableLeaveReply,
    ListMembershipsReply,
};
use cotal_core::wire::json::{WireRecord, decode, encode};
use cotal_core::wire::message::{CotalMessage, Presence};
use cotal_core::wire::msgid::Plane3MsgId;
use cotal_core::wire::records::{AclRecord, DeliveryLease, MembershipRecord, Plane3Entry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Decodes `data` as `T`; whatever decodes must re-encode to bytes that decode to the same value,
/// and re-encoding that value must give the same bytes (our own output is a fixed point).
fn wire_round_trip<T>(data: &[u8]) -> Option<T>
where
    T: DeserializeOwned + WireRecord + PartialEq + Debug,
{
    let value: T = decode(data).ok()?;
    let bytes = encode(&value);
    let again: T = decode(&bytes)
        .unwrap_or_else(|e| panic!("our own encoding of {value:?} does not decode: {e}"));
    assert_eq!(again, value, "decode(encode(v)) != v");
    assert_eq!(encode(&again), bytes, "encoding is not stable");
    Some(value)
}

/// The same round trip for records that are plain serde types (the channel registry entries).
fn serde_round_trip<T>(data: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let value: T = decode(data).ok()?;
    let bytes = serde_json::to_vec(&value).expect("serializing a decoded record cannot fail");
    let again: T = decode(&bytes)
        .unwrap_or_else(|e| panic!("our own encoding of {value:?} does not decode: {e}"));
    assert_eq!(again, value, "decode(encode(v)) != v");
    Some(value)
}

/// The message envelope (chat, DM, anycast, and the bare DLV copy).
pub fn message(data: &[u8]) {
    let typed = CotalMessage::decode(data);
    let generic = wire_round_trip::<CotalMessage>(data);
    assert_eq!(
        typed.as_ref().ok(),
        generic.as_ref(),
        "the two decode paths disagree"
    );
    if let Ok(m) = typed {
        assert!(m.mentions.iter().all(|n| !n.is_empty() && n.trim() == n));
    }
}

/// The dinbox payload, and the msg-id it is stored under.
pub fn plane3_entry(data: &[u8]) {
    if let Some(entry) = wire_round_trip::<Plane3Entry>(data) {
        let owner = entry.msg.from.id.clone();
        let id = Plane3MsgId::for_entry(&entry, &owner);
        assert_eq!(Plane3MsgId::parse(&id.to_string()).as_ref(), Ok(&id));
    }
}

/// A membership registry record, through the KV reading rule and the plain decoder.
pub fn membership_record(data: &[u8]) {
    let from_kv = MembershipRecord::from_kv(Some(data));
    let plain = wire_round_trip::<MembershipRecord>(data);
    assert_eq!(from_kv, plain, "KV reading rule and decoder disagree");
    if let Some(r) = plain {
        assert_eq!(r.is_tombstone(), r.leave_cursor.is_some());
    }
}

/// An ACL record through the reference's "absent unless well formed" reading rule.
pub fn acl_record(data: &[u8]) {
    if let Some(acl) = AclRecord::from_kv(Some(data)) {
        let again = AclRecord::from_kv(Some(&encode(&acl)));
        assert_eq!(again.as_ref(), Some(&acl));
    }
    assert_eq!(AclRecord::from_kv(None), None);
}

/// The delivery lease record.
pub fn delivery_lease(data: &[u8]) {
    let from_kv = DeliveryLease::from_kv(Some(data));
    if let Some(lease) = &from_kv {
        assert_eq!(
            DeliveryLease::from_kv(Some(&encode(lease))).as_ref(),
            Some(lease)
        );
    }
}

/// A presence record, and the offline scrub (I34).
pub fn presence(data: &[u8]) {
    if let Some(p) = wire_round_trip::<Presence>(data) {
        let offline = p.to_offline();
        assert!(offline.is_scrubbed_offline());
        assert_eq!(offline.to_offline(), offline, "the scrub is idempotent");
    }
}

/// Channel registry entries and the one policy resolver.
pub fn channel_config(data: &[u8]) {
    let config = serde_round_trip::<ChannelConfig>(data);
    let defaults = serde_round_trip::<ChannelDefaults>(data);
    let channel = cotal_core::wire::Channel::new("team.backend").expect("valid channel");
    let _ = effective_policy(&channel, config.as_ref(), defaults.as_ref());
    if let Some(c) = &config {
        let _ = c.validate_for_write();
    }
    if let Some(d) = &defaults {
        let _ = d.validate_for_write();
    }
}

/// A `ctl.delivery` request, decoded and then validated into a typed operation.
pub fn control_request(data: &[u8]) {
    let Some(request) = wire_round_trip::<ControlRequest>(data) else {
        return;
    };
    if let Ok(op) = DeliveryRequest::from_request(&request) {
        // What we accept, we can re-send, and it means the same thing.
        let resent = op.to_request(request.from.clone());
        assert_eq!(DeliveryRequest::from_request(&resent).as_ref(), Ok(&op));
    }
}

/// The `ctl.delivery` replies an agent decodes.
pub fn control_reply(data: &[u8]) {
    let _ = wire_round_trip::<ControlReply<DurableJoinReply>>(data);
    let _ = wire_round_trip::<ControlReply<DurableLeaveReply>>(data);
    let _ = wire_round_trip::<ControlReply<ListMembershipsReply>>(data);
    if let Some(generic) = wire_round_trip::<ControlReply>(data) {
        let _ = generic.data_as::<DurableJoinReply>();
    }
}

/// The backstop msg-id `<msg.id>:<owner>:<generation>`.
pub fn msg_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = Plane3MsgId::parse(&text) {
        assert_eq!(id.to_string(), text.as_ref(), "format(parse(s)) != s");
    }
}

use cotal_core::delivery::authorize::decode_entry;
use cotal_core::delivery::control::{Admission, admit};
use cotal_core::wire::token::Space;

/// Splits a fuzz input into `<line 1>\n<line 2>\n<rest>` (missing parts are empty).
fn three_parts(data: &[u8]) -> (String, String, &[u8]) {
    let mut it = data.splitn(3, |b| *b == b'\n');
    let a = String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
    let b = String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
    (a, b, it.next().unwrap_or_default())
}

/// The daemon's request gate on one `ctl.delivery` message of space `main`: input
/// `<subject>\n<reply subject, empty: none>\n<payload>`.
///
/// Whatever the bytes, a reply only ever goes to `<subject>.reply.<one token>` (the
/// confused-deputy guard, I27), and an admitted request's requester is the subject's sender.
pub fn control_gate(data: &[u8]) {
    let (subject, reply, payload) = three_parts(data);
    let space = Space::new("main").expect("valid space");
    let reply = (!reply.is_empty()).then_some(reply.as_str());
    let admission = admit(&space, &subject, reply, payload);
    if let Some(to) = admission.reply_to() {
        let token = to
            .strip_prefix(&format!("{subject}.reply."))
            .unwrap_or_else(|| panic!("reply to {to} for a request on {subject}"));
        assert!(
            !token.is_empty() && !token.contains('.'),
            "reply token {token}"
        );
        assert_eq!(
            Some(to),
            reply,
            "a reply to a subject the requester did not name"
        );
    }
    if let Admission::Admitted(a) = &admission {
        assert_eq!(
            subject.rsplit('.').next(),
            Some(a.requester.as_str()),
            "admitted requester is not the subject's sender"
        );
    }
}

/// The trusted reader's decoding of one INBOX message: input `<subject>\n<payload>`. A decoded
/// entry's owner is the dinbox subject's owner token, never a payload field.
pub fn reader_entry(data: &[u8]) {
    let mut it = data.splitn(2, |b| *b == b'\n');
    let subject = String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
    let payload = it.next().unwrap_or_default();
    if let Ok((owner, _entry)) = decode_entry(&subject, payload) {
        assert_eq!(parse_dinbox_owner(&subject).as_ref(), Some(&owner));
    }
}

/// A member's loss record (issue 21 item 5), as its agent reads it and as a daemon folds its own
/// unwritten losses into it: whatever decodes round-trips, totals without overflow, and folding
/// it into a ledger keeps the ledger within [`LOSS_RANGES_MAX`] ranges.
pub fn loss_record(data: &[u8]) {
    use cotal_core::delivery::losses::{LOSS_RANGES_MAX, LossLedger};
    let Some(stored) = LossLedger::decode(data) else {
        return;
    };
    let again = LossLedger::decode(&stored.encode())
        .unwrap_or_else(|| panic!("our own encoding of {stored:?} does not decode"));
    assert_eq!(again, stored, "decode(encode(v)) != v");
    let _ = stored.total();
    let _ = stored.per_channel();
    let _ = stored.since(0);
    let mut folded = LossLedger::new(&stored.owner);
    folded.absorb(&stored);
    assert!(folded.ranges.len() <= LOSS_RANGES_MAX, "{folded:?}");
    let _ = folded.total();
}
