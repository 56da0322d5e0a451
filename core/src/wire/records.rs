//! KV records and the dinbox entry (semantics §1.6, §1.7).
//!
//! These are faithful data: what the reference writes, field for field, in its key order, with
//! unknown fields preserved (the reference rewrites membership records as `{...cur, …}`, so a field
//! a newer daemon added must survive our rewrite too). The decisions built on them (tombstoning,
//! activation, the interval predicate, the reader's authorization) live elsewhere.
//!
//! Free-form identity strings that are only informational (`writerIdentity`, the lease `holder`)
//! are plain strings, so an unexpected writer id can never make a record undecodable (an
//! undecodable membership record reads as *absent*).

use crate::time::UnixMillis;
use crate::wire::json::{self, WireRecord, de_millis, de_opt_uint, de_uint, sealed::Sealed};
use crate::wire::message::{CotalMessage, Extra};
use crate::wire::token::{AgentId, ConcreteChannel};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `state` of a membership record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemberState {
    /// `"live-confirmed"`: written only together with a leave cursor (a tombstone) in the reference.
    #[serde(rename = "live-confirmed")]
    LiveConfirmed,
    /// `"durable-active"`: an open durable membership (pending or activated).
    #[serde(rename = "durable-active")]
    DurableActive,
}

/// A durable membership (`TYP:MembershipRecord`), key `<channel>/<owner>` in
/// `cotal_members_<space>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRecord {
    /// The concrete channel.
    pub channel: ConcreteChannel,
    /// The member.
    pub owner: AgentId,
    /// The state label (see [`MemberState`]).
    pub state: MemberState,
    /// The join cursor: CHAT stream sequence at join; the member's window starts after it.
    #[serde(rename = "joinCursor", deserialize_with = "de_uint")]
    pub join_cursor: u64,
    /// The join generation, ≥ 1 for real memberships.
    #[serde(deserialize_with = "de_uint")]
    pub generation: u64,
    /// Whether activation catch-up confirmed (reporting only, never delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<bool>,
    /// Id of the daemon that wrote this revision.
    #[serde(rename = "writerIdentity")]
    pub writer_identity: String,
    /// Write time.
    #[serde(rename = "updatedAt", deserialize_with = "de_millis")]
    pub updated_at: UnixMillis,
    /// The leave cursor: CHAT sequence at leave. Present means the record is a tombstone. The
    /// reference adds it to a copy of the current record, so it is written last.
    #[serde(
        rename = "leaveCursor",
        default,
        deserialize_with = "de_opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub leave_cursor: Option<u64>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl MembershipRecord {
    /// The record a fresh (non-open) durable join commits: `state:"durable-active"`,
    /// `activated:false`, no leave cursor (semantics §2h step 5).
    pub fn fresh_join(
        channel: ConcreteChannel,
        owner: AgentId,
        join_cursor: u64,
        generation: u64,
        writer_identity: impl Into<String>,
        updated_at: UnixMillis,
    ) -> Self {
        MembershipRecord {
            channel,
            owner,
            state: MemberState::DurableActive,
            join_cursor,
            generation,
            activated: Some(false),
            writer_identity: writer_identity.into(),
            updated_at,
            leave_cursor: None,
            extra: Extra::new(),
        }
    }

    /// A record with a leave cursor is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.leave_cursor.is_some()
    }

    /// `activated === true` (absent counts as not activated).
    pub fn is_activated(&self) -> bool {
        self.activated == Some(true)
    }

    /// Decodes a KV value the way `readMember` does: a missing value, an empty `DEL`/`PURGE`
    /// marker, or bytes that do not decode all read as absent.
    pub fn from_kv(value: Option<&[u8]>) -> Option<Self> {
        value.and_then(|b| json::decode(b).ok())
    }
}

/// A read ACL (`TYP:AclRecord`), key `token(owner)` in `cotal_acl_<space>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRecord {
    /// The subject patterns the owner may read. `[]` means "reads nothing".
    #[serde(rename = "allowSubscribe")]
    pub allow_subscribe: Vec<String>,
    /// `prev + 1`, starting at 1.
    #[serde(deserialize_with = "de_uint")]
    pub revision: u64,
    /// Write time.
    #[serde(rename = "updatedAt", deserialize_with = "de_millis")]
    pub updated_at: UnixMillis,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl AclRecord {
    /// The reference's `readAcl` rule, mapping raw KV bytes to a present or absent ACL.
    ///
    /// - `None` (missing key), an empty `DEL`/`PURGE` marker, bytes that are not a JSON object, or an
    ///   object whose `allowSubscribe` is missing or not an array: **absent** (`None`; the reader
    ///   defers, a durable join is refused as "not provisioned").
    /// - An object whose `allowSubscribe` is an array: **present**, even `[]` ("reads nothing").
    ///
    /// The reference checks nothing beyond `Array.isArray(allowSubscribe)`, so this does not
    /// either: array elements that are not strings are dropped (they match no channel in the
    /// reference), and a missing or invalid `revision`/`updatedAt` reads as 0 rather than making
    /// the record absent.
    pub fn from_kv(value: Option<&[u8]>) -> Option<Self> {
        let bytes = value?;
        if let Ok(strict) = json::decode::<AclRecord>(bytes) {
            return Some(strict);
        }
        let Value::Object(mut map) = json::decode::<Value>(bytes).ok()? else {
            return None;
        };
        let Some(Value::Array(items)) = map.remove("allowSubscribe") else {
            return None;
        };
        let allow_subscribe = items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect();
        let mut number = |field: &str| match map.remove(field) {
            Some(Value::Number(n)) => json::uint_from_number(&n).unwrap_or(0),
            _ => 0,
        };
        let revision = number("revision");
        let updated_at = UnixMillis(number("updatedAt"));
        Some(AclRecord {
            allow_subscribe,
            revision,
            updated_at,
            extra: map,
        })
    }
}

/// The delivery lease (`LEASE:DeliveryLeaseInfo`), key `lease.<i>` in `cotal_delivery_<space>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryLease {
    /// Id of the daemon holding the lease.
    pub holder: String,
    /// Time of this write (re-stamped on every renew: the last renewal, not the acquisition).
    #[serde(deserialize_with = "de_millis")]
    pub since: UnixMillis,
    /// True once the holder's Plane-3 responders are bound.
    pub ready: bool,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl DeliveryLease {
    /// A lease record with no extra fields.
    pub fn new(holder: impl Into<String>, since: UnixMillis, ready: bool) -> Self {
        DeliveryLease {
            holder: holder.into(),
            since,
            ready,
            extra: Extra::new(),
        }
    }

    /// The reference's `readDeliveryLease`: a missing key, a `DEL`/`PURGE` marker (empty
    /// payload), or undecodable bytes read as no lease.
    pub fn from_kv(value: Option<&[u8]>) -> Option<Self> {
        value.and_then(|b| json::decode(b).ok())
    }
}

/// Why an entry is in a member's dinbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Plane3Reason {
    /// `"durable-channel"`: the owner holds a membership whose interval covers the sequence.
    #[serde(rename = "durable-channel")]
    DurableChannel,
    /// `"live-mention"`: an `@mention` on a live channel (generation 0).
    #[serde(rename = "live-mention")]
    LiveMention,
}

/// A dinbox entry (`TYP:Plane3Entry`) on `cotal.<s>.dinbox.<owner>`, written by fan-out and
/// catch-up and consumed by the trusted reader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plane3Entry {
    /// The CHAT message as published (unknown fields kept: it becomes the DLV copy verbatim).
    pub msg: CotalMessage,
    /// The concrete channel taken from the CHAT **subject**, not from `msg`.
    pub channel: ConcreteChannel,
    /// The CHAT stream sequence of `msg`.
    #[serde(deserialize_with = "de_uint")]
    pub seq: u64,
    /// Why the entry exists.
    pub reason: Plane3Reason,
    /// The member's generation, or 0 for a live mention.
    #[serde(deserialize_with = "de_uint")]
    pub generation: u64,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Plane3Entry {
    /// A `durable-channel` entry for a member of generation `generation`.
    pub fn durable_channel(
        msg: CotalMessage,
        channel: ConcreteChannel,
        seq: u64,
        generation: u64,
    ) -> Self {
        Plane3Entry {
            msg,
            channel,
            seq,
            reason: Plane3Reason::DurableChannel,
            generation,
            extra: Extra::new(),
        }
    }

    /// A `live-mention` entry (generation 0).
    pub fn live_mention(msg: CotalMessage, channel: ConcreteChannel, seq: u64) -> Self {
        Plane3Entry {
            msg,
            channel,
            seq,
            reason: Plane3Reason::LiveMention,
            generation: 0,
            extra: Extra::new(),
        }
    }
}

/// The extra ACL field naming the display names an owner is provisioned to present (issue 21
/// item 2): `"names": ["Alice", …]`. The reference 0.6.0 ignores it (its `readAcl` reads only
/// `allowSubscribe`), and its `commitAcl` rewrites the record without it.
pub const ACL_NAMES_FIELD: &str = "names";

impl AclRecord {
    /// The display names the operator provisioned for the owner (`names`, an extra field):
    /// absent, not an array, or holding no non-empty string reads as none. Non-string elements
    /// are skipped.
    pub fn provisioned_names(&self) -> Vec<String> {
        match self.extra.get(ACL_NAMES_FIELD) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Sets (or, with no names, removes) the provisioned display names.
    pub fn set_provisioned_names(&mut self, names: &[String]) {
        if names.is_empty() {
            self.extra.remove(ACL_NAMES_FIELD);
        } else {
            let items = names.iter().cloned().map(Value::String).collect();
            self.extra
                .insert(ACL_NAMES_FIELD.to_owned(), Value::Array(items));
        }
    }
}

impl Sealed for MembershipRecord {}
impl WireRecord for MembershipRecord {}
impl Sealed for AclRecord {}
impl WireRecord for AclRecord {}
impl Sealed for DeliveryLease {}
impl WireRecord for DeliveryLease {}
impl Sealed for Plane3Entry {}
impl WireRecord for Plane3Entry {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OWNER: &str = "UDHQN2VXGF5T7O3GSPVKMV6VFFHD3XQTWFY3M5P7ELIK4ICOADTOEJ5S";

    #[test]
    fn acl_absent_vs_reads_nothing() {
        let acl = |s: &str| AclRecord::from_kv(Some(s.as_bytes()));
        assert_eq!(AclRecord::from_kv(None), None);
        assert_eq!(AclRecord::from_kv(Some(b"")), None, "DEL marker");
        assert_eq!(acl("{not json"), None);
        assert_eq!(acl("[]"), None);
        assert_eq!(acl(r#"{"revision":1,"updatedAt":2}"#), None);
        assert_eq!(
            acl(r#"{"allowSubscribe":"general","revision":1,"updatedAt":2}"#),
            None
        );
        assert_eq!(
            acl(r#"{"allowSubscribe":null,"revision":1,"updatedAt":2}"#),
            None
        );
        let empty = acl(r#"{"allowSubscribe":[],"revision":3,"updatedAt":2}"#).unwrap();
        assert!(empty.allow_subscribe.is_empty());
        assert_eq!(empty.revision, 3);
        let lenient = acl(r#"{"allowSubscribe":["a",5,"b.>"],"x":true}"#).unwrap();
        assert_eq!(lenient.allow_subscribe, vec!["a", "b.>"]);
        assert_eq!((lenient.revision, lenient.updated_at), (0, UnixMillis(0)));
        assert_eq!(lenient.extra.get("x"), Some(&json!(true)));
    }

    #[test]
    fn tombstone_key_order_matches_the_reference_spread() {
        let mut r = MembershipRecord::fresh_join(
            ConcreteChannel::new("review").unwrap(),
            AgentId::new(OWNER).unwrap(),
            1,
            1,
            "D1",
            UnixMillis(10),
        );
        assert!(!r.is_tombstone() && !r.is_activated());
        r.state = MemberState::LiveConfirmed;
        r.leave_cursor = Some(2);
        assert!(r.is_tombstone());
        assert_eq!(
            std::str::from_utf8(&json::encode(&r)).unwrap(),
            format!(
                r#"{{"channel":"review","owner":"{OWNER}","state":"live-confirmed","joinCursor":1,"generation":1,"activated":false,"writerIdentity":"D1","updatedAt":10,"leaveCursor":2}}"#
            )
        );
    }

    #[test]
    fn records_accept_integral_floats_and_reject_fractions() {
        let rec = |gen_: &str| {
            MembershipRecord::from_kv(Some(
                format!(
                    r#"{{"channel":"g","owner":"{OWNER}","state":"durable-active","joinCursor":0,"generation":{gen_},"writerIdentity":"d","updatedAt":1}}"#
                )
                .as_bytes(),
            ))
        };
        assert_eq!(rec("2.0").unwrap().generation, 2);
        assert_eq!(rec("1.5"), None);
        assert_eq!(rec("-1"), None);
        assert_eq!(rec("1e300"), None);
        assert_eq!(DeliveryLease::from_kv(Some(b"")), None);
    }
}
