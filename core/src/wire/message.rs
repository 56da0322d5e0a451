//! Delivery messages and presence records (semantics §1.7, §2n).
//!
//! [`CotalMessage`] is the body of every chat, DM and anycast publish, of the `msg` inside a dinbox
//! entry, and of every DLV copy. [`Presence`] is the value each instance writes under its own key in
//! `cotal_presence_<space>`.
//!
//! Both accept unknown fields (SPEC §11) and keep them in an `extra` map, so a record from a newer
//! peer survives being forwarded (the reader republishes the dinbox `msg` as the DLV copy) or
//! rewritten (the offline scrub). Known fields are written in the reference's key order.

use crate::time::UnixMillis;
use crate::wire::json::{self, DecodeError, WireRecord, de_millis, sealed::Sealed};
// Defined next to `DecodeError`, which wraps it; re-exported here.
pub use crate::wire::json::MessageError;
use crate::wire::token::{AgentId, ConcreteChannel, Role, Space};
use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

mod one_pass;

/// JSON object with the fields a record did not recognise, kept verbatim.
pub type Extra = Map<String, Value>;

/// The `from` block of a message or control request: who sent it.
///
/// Only `id` is authenticated (receivers compare it with the subject's sender token); `name` and
/// `role` are display metadata and are not validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The sender's stable id (its nkey in auth mode).
    pub id: AgentId,
    /// Display name.
    pub name: String,
    /// Anycast role, if the sender has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Sender {
    /// A sender with no role and no extra fields.
    pub fn new(id: AgentId, name: impl Into<String>) -> Self {
        Sender {
            id,
            name: name.into(),
            role: None,
            extra: Extra::new(),
        }
    }
}

/// The routing field of a message: exactly one of `channel`, `to` or `toService`.
///
/// It is a payload label only. Receivers take the delivery kind from the subject (conformance 6),
/// and the daemon takes the channel from the subject (semantics §1.7, gap G18).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Route {
    /// `"channel"`: a multicast on a concrete channel.
    Channel(ConcreteChannel),
    /// `"to"`: a unicast to one instance.
    To(AgentId),
    /// `"toService"`: an anycast to a role.
    ToService(Role),
}

impl Route {
    /// The JSON key this route is written under.
    pub fn field(&self) -> &'static str {
        match self {
            Route::Channel(_) => "channel",
            Route::To(_) => "to",
            Route::ToService(_) => "toService",
        }
    }

    /// The routed-to name as written on the wire.
    pub fn target(&self) -> &str {
        match self {
            Route::Channel(c) => c.as_str(),
            Route::To(a) => a.as_str(),
            Route::ToService(r) => r.as_str(),
        }
    }
}

/// The routing-field names, in the reference's key order.
pub const ROUTING_FIELDS: [&str; 3] = ["channel", "to", "toService"];

/// One element of `parts`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Part {
    /// `{"kind":"text","text":…}`.
    Text {
        /// The text.
        text: String,
        /// Unknown fields, preserved.
        extra: Extra,
    },
    /// `{"kind":"data","data":…}`; `data` is any JSON value.
    Data {
        /// The payload.
        data: Value,
        /// Unknown fields, preserved.
        extra: Extra,
    },
    /// Any other kind (reverse-DNS by convention), kept with all its fields.
    Other {
        /// The `kind` value.
        kind: String,
        /// Every other field of the part.
        fields: Extra,
    },
}

impl Part {
    /// A plain text part.
    pub fn text(text: impl Into<String>) -> Self {
        Part::Text {
            text: text.into(),
            extra: Extra::new(),
        }
    }

    /// A data part.
    pub fn data(data: Value) -> Self {
        Part::Data {
            data,
            extra: Extra::new(),
        }
    }

    /// The part's `kind`.
    pub fn kind(&self) -> &str {
        match self {
            Part::Text { .. } => "text",
            Part::Data { .. } => "data",
            Part::Other { kind, .. } => kind,
        }
    }
}

impl Serialize for Part {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("kind", self.kind())?;
        let (known, rest) = match self {
            Part::Text { text, extra } => {
                m.serialize_entry("text", text)?;
                ("text", extra)
            }
            Part::Data { data, extra } => {
                m.serialize_entry("data", data)?;
                ("data", extra)
            }
            Part::Other { fields, .. } => ("kind", fields),
        };
        for (k, v) in rest {
            if k != "kind" && k != known {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut fields = Extra::deserialize(d)?;
        let kind = match fields.remove("kind") {
            Some(Value::String(k)) => k,
            Some(_) => return Err(de::Error::custom("part `kind` must be a string")),
            None => return Err(de::Error::missing_field("kind")),
        };
        match kind.as_str() {
            "text" => match fields.remove("text") {
                Some(Value::String(text)) => Ok(Part::Text {
                    text,
                    extra: fields,
                }),
                Some(_) => Err(de::Error::custom("text part: `text` must be a string")),
                None => Err(de::Error::missing_field("text")),
            },
            "data" => match fields.remove("data") {
                Some(data) => Ok(Part::Data {
                    data,
                    extra: fields,
                }),
                None => Err(de::Error::missing_field("data")),
            },
            _ => Ok(Part::Other { kind, fields }),
        }
    }
}

/// A delivery message (`TYP:CotalMessage`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CotalMessage {
    /// The message id (a uuid in the reference), also its publish `Nats-Msg-Id`.
    pub id: String,
    /// Publish time, as stamped by the sender.
    pub ts: UnixMillis,
    /// The space, raw.
    pub space: Space,
    /// The sender.
    pub from: Sender,
    /// The one routing field.
    pub route: Route,
    /// `@mentions`, normalized by the sender (see [`normalize_mentions`]). Kept as received on
    /// decode; an empty list is omitted on encode.
    pub mentions: Vec<String>,
    /// The content.
    pub parts: Vec<Part>,
    /// Id of the message this one answers.
    pub reply_to: Option<String>,
    /// Conversation/context id.
    pub context_id: Option<String>,
    /// Unknown fields, preserved (written after the known ones).
    pub extra: Extra,
}

const MESSAGE_FIELDS: [&str; 11] = [
    "id",
    "ts",
    "space",
    "from",
    "channel",
    "to",
    "toService",
    "mentions",
    "parts",
    "replyTo",
    "contextId",
];

fn take<T: serde::de::DeserializeOwned>(
    map: &mut Extra,
    field: &'static str,
) -> Result<Option<T>, MessageError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| MessageError::InvalidField {
                field,
                message: e.to_string(),
            }),
    }
}

fn require<T: serde::de::DeserializeOwned>(
    map: &mut Extra,
    field: &'static str,
) -> Result<T, MessageError> {
    take(map, field)?.ok_or(MessageError::MissingField { field })
}

impl CotalMessage {
    /// A message with no mentions, no reply/context ids and no extra fields.
    pub fn new(
        id: impl Into<String>,
        ts: UnixMillis,
        space: Space,
        from: Sender,
        route: Route,
        parts: Vec<Part>,
    ) -> Self {
        CotalMessage {
            id: id.into(),
            ts,
            space,
            from,
            route,
            mentions: Vec::new(),
            parts,
            reply_to: None,
            context_id: None,
            extra: Extra::new(),
        }
    }

    /// Sets the mentions, normalized as the reference does before publishing.
    #[must_use]
    pub fn with_mentions<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.mentions = normalize_mentions(names);
        self
    }

    /// Builds a message from a decoded JSON object, validating the routing rule.
    ///
    /// # Errors
    ///
    /// A [`MessageError`] for the first missing or invalid field, or for zero or several routing
    /// fields.
    pub fn from_object(mut map: Extra) -> Result<Self, MessageError> {
        let id: String = require(&mut map, "id")?;
        let ts: u64 = match map.remove("ts") {
            None | Some(Value::Null) => return Err(MessageError::MissingField { field: "ts" }),
            Some(Value::Number(n)) => {
                json::uint_from_number(&n).ok_or_else(|| MessageError::InvalidField {
                    field: "ts",
                    message: format!("{n} is not a timestamp"),
                })?
            }
            Some(other) => {
                return Err(MessageError::InvalidField {
                    field: "ts",
                    message: format!("expected a number, got {other}"),
                });
            }
        };
        let space: Space = require(&mut map, "space")?;
        let from: Sender = require(&mut map, "from")?;
        let channel: Option<ConcreteChannel> = take(&mut map, "channel")?;
        let to: Option<AgentId> = take(&mut map, "to")?;
        let to_service: Option<Role> = take(&mut map, "toService")?;
        let route = match (channel, to, to_service) {
            (Some(c), None, None) => Route::Channel(c),
            (None, Some(a), None) => Route::To(a),
            (None, None, Some(r)) => Route::ToService(r),
            (None, None, None) => return Err(MessageError::NoRoutingField),
            (c, a, r) => {
                let mut fields = Vec::new();
                if c.is_some() {
                    fields.push("channel");
                }
                if a.is_some() {
                    fields.push("to");
                }
                if r.is_some() {
                    fields.push("toService");
                }
                return Err(MessageError::MultipleRoutingFields { fields });
            }
        };
        let mentions: Vec<String> = take(&mut map, "mentions")?.unwrap_or_default();
        let parts: Vec<Part> = require(&mut map, "parts")?;
        let reply_to: Option<String> = take(&mut map, "replyTo")?;
        let context_id: Option<String> = take(&mut map, "contextId")?;
        Ok(CotalMessage {
            id,
            ts: UnixMillis(ts),
            space,
            from,
            route,
            mentions,
            parts,
            reply_to,
            context_id,
            extra: map,
        })
    }

    /// Decodes a message payload (a chat/DM/TASK body or a DLV copy).
    ///
    /// Unlike `json::decode::<CotalMessage>`, which reports message-rule violations as a
    /// [`DecodeError::Shape`] string, this keeps them typed as [`DecodeError::Message`].
    ///
    /// # Errors
    ///
    /// Any [`DecodeError`] of [`json::decode`], or [`DecodeError::Message`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        // The one-pass decode takes every well-formed message; the tree decode below decides
        // the rest and names their errors (the two agree wherever both succeed: `one_pass`).
        if let Some(message) = one_pass::decode(bytes) {
            return Ok(message);
        }
        Self::decode_tree(bytes)
    }

    /// The tree decode: the whole payload into a JSON [`Value`], then
    /// [`CotalMessage::from_object`]. The reference for [`CotalMessage::decode`]'s answers.
    fn decode_tree(bytes: &[u8]) -> Result<Self, DecodeError> {
        let value: Value = json::decode(bytes)?;
        match value {
            Value::Object(map) => CotalMessage::from_object(map).map_err(DecodeError::Message),
            _ => Err(DecodeError::Message(MessageError::NotAnObject)),
        }
    }

    /// The channel of a multicast, if this is one.
    pub fn channel(&self) -> Option<&ConcreteChannel> {
        match &self.route {
            Route::Channel(c) => Some(c),
            _ => None,
        }
    }

    /// The receiver's `mentionsMe` test: `mentions` holds `name` lowercased (exact match, as the
    /// reference compares).
    pub fn mentions_name(&self, name: &str) -> bool {
        let lower = name.to_lowercase();
        self.mentions.contains(&lower)
    }
}

impl Serialize for CotalMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("ts", &self.ts.0)?;
        m.serialize_entry("space", &self.space)?;
        m.serialize_entry("from", &self.from)?;
        m.serialize_entry(self.route.field(), self.route.target())?;
        if !self.mentions.is_empty() {
            m.serialize_entry("mentions", &self.mentions)?;
        }
        m.serialize_entry("parts", &self.parts)?;
        if let Some(r) = &self.reply_to {
            m.serialize_entry("replyTo", r)?;
        }
        if let Some(c) = &self.context_id {
            m.serialize_entry("contextId", c)?;
        }
        for (k, v) in &self.extra {
            if !MESSAGE_FIELDS.contains(&k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for CotalMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Extra::deserialize(d)?;
        CotalMessage::from_object(map).map_err(de::Error::custom)
    }
}

impl Sealed for CotalMessage {}
impl WireRecord for CotalMessage {}

fn js_trim(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}')
}

/// The reference's `normalizeMentions`: trim, lowercase, drop empties, dedupe (first occurrence
/// wins, order kept).
pub fn normalize_mentions<I, S>(names: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for name in names {
        let n = js_trim(name.as_ref()).to_lowercase();
        if !n.is_empty() && seen.insert(n.clone()) {
            out.push(n);
        }
    }
    out
}

/// Presence status (`TYP:Presence.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PresenceStatus {
    /// Online, nothing to do.
    Idle,
    /// Online, waiting on someone.
    Waiting,
    /// Online, busy.
    Working,
    /// Gone (stopped, or materialized by an observer after the TTL).
    Offline,
}

/// Global attention mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Attention {
    /// Everything surfaces.
    Open,
    /// Do not disturb.
    Dnd,
    /// Only quiet-mode channels and mentions.
    Focus,
}

/// Per-channel mode in `channelModes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ChannelMode {
    /// Surfaces even under `focus`.
    Quiet,
    /// Dropped (mentions too).
    Muted,
}

/// An agent card, the `card` of a presence record.
///
/// The reference 0.6.0 writes `{id, name, kind, role?, protocolVersion}`; anything else a newer
/// peer adds is kept in `extra`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCard {
    /// The instance id; also the presence key.
    pub id: AgentId,
    /// Display name (mentions resolve against it, case-insensitively).
    pub name: String,
    /// `"agent"`, `"endpoint"` …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Anycast role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The card's protocol version string (`"0.2"` in reference 0.6.0).
    #[serde(
        rename = "protocolVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub protocol_version: Option<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A presence record (`TYP:Presence`), keyed by `card.id` in `cotal_presence_<space>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Who.
    pub card: AgentCard,
    /// Status.
    pub status: PresenceStatus,
    /// Free-text activity line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// Global attention; never present on an offline record once scrubbed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Attention>,
    /// Per-channel modes; never present on an offline record once scrubbed.
    #[serde(
        rename = "channelModes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub channel_modes: Option<BTreeMap<String, ChannelMode>>,
    /// Heartbeat time.
    #[serde(deserialize_with = "de_millis")]
    pub ts: UnixMillis,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Presence {
    /// The reference's `toOffline`: status `offline`, and `attention` and `channelModes` removed
    /// (invariant I34). The card, `activity`, `ts` and unknown fields are kept.
    #[must_use]
    pub fn to_offline(&self) -> Presence {
        Presence {
            status: PresenceStatus::Offline,
            attention: None,
            channel_modes: None,
            ..self.clone()
        }
    }

    /// True when this record is offline and carries neither `attention` nor `channelModes`.
    pub fn is_scrubbed_offline(&self) -> bool {
        self.status == PresenceStatus::Offline
            && self.attention.is_none()
            && self.channel_modes.is_none()
    }
}

impl Sealed for Presence {}
impl WireRecord for Presence {}
impl Sealed for AgentCard {}
impl WireRecord for AgentCard {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALICE: &str = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";

    fn msg(v: Value) -> Result<CotalMessage, DecodeError> {
        CotalMessage::decode(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({"id":"m1","ts":1,"space":"main","from":{"id":ALICE,"name":"alice"},
               "parts":[{"kind":"text","text":"hi"}]})
    }

    #[test]
    fn routing_needs_exactly_one_field() {
        assert_eq!(
            msg(base()),
            Err(DecodeError::Message(MessageError::NoRoutingField))
        );
        let mut two = base();
        two["channel"] = json!("team.backend");
        two["toService"] = json!("reviewer");
        assert_eq!(
            msg(two.clone()),
            Err(DecodeError::Message(MessageError::MultipleRoutingFields {
                fields: vec!["channel", "toService"]
            }))
        );
        // The generic entry point reports the same rule as a shape error.
        let err = json::decode::<CotalMessage>(two.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Shape { message, .. } if message.contains("2 routing fields")),
            "{err}"
        );
        let mut wild = base();
        wild["channel"] = json!("team.*");
        assert!(matches!(
            msg(wild),
            Err(DecodeError::Message(MessageError::InvalidField {
                field: "channel",
                ..
            }))
        ));
    }

    #[test]
    fn unknown_fields_and_parts_survive_a_round_trip() {
        let mut v = base();
        v["to"] = json!(ALICE);
        v["x-new"] = json!({"z": 1});
        v["parts"] = json!([
            {"kind":"text","text":"hi","lang":"en"},
            {"kind":"data","data":{"k":[1,2]}},
            {"kind":"com.example.card","title":"t","n":3}
        ]);
        let m = msg(v.clone()).unwrap();
        assert_eq!(m.parts[2].kind(), "com.example.card");
        assert_eq!(
            serde_json::from_slice::<Value>(&json::encode(&m)).unwrap(),
            v
        );
    }

    #[test]
    fn mentions_normalize_like_the_reference() {
        assert_eq!(
            normalize_mentions([" Bob", "bob", "", "  ", "ALICE ", "\u{feff}carol"]),
            vec!["bob", "alice", "carol"]
        );
        let m = CotalMessage::new(
            "m",
            UnixMillis(1),
            Space::new("main").unwrap(),
            Sender::new(AgentId::new(ALICE).unwrap(), "alice"),
            Route::Channel(ConcreteChannel::new("general").unwrap()),
            vec![Part::text("x")],
        );
        let plain = json::encode(&m.clone().with_mentions(["", " "]));
        assert!(!std::str::from_utf8(&plain).unwrap().contains("mentions"));
        let with = m.with_mentions(["Bob"]);
        assert!(with.mentions_name("BOB"));
        assert!(!with.mentions_name("alice"));
    }

    #[test]
    fn offline_scrub_drops_attention_and_modes() {
        let p: Presence = json::decode(
            json!({"card":{"id":ALICE,"name":"alice","kind":"agent","future":true},
                   "status":"working","activity":"coding","attention":"focus",
                   "channelModes":{"general":"muted"},"ts":5,"x":1})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert!(!p.is_scrubbed_offline());
        let off = p.to_offline();
        assert!(off.is_scrubbed_offline());
        assert_eq!(
            serde_json::from_slice::<Value>(&json::encode(&off)).unwrap(),
            json!({"card":{"id":ALICE,"name":"alice","kind":"agent","future":true},
                   "status":"offline","activity":"coding","ts":5,"x":1})
        );
    }
}
