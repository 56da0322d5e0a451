//! The one-pass decode of a [`CotalMessage`]: straight from the JSON text into the typed fields,
//! without building a [`Value`] tree of the whole message first.
//!
//! Every chat message is decoded once by fan-out and every copy once by its receiver, so this is
//! on the hot path of both machines (the agents' profile in issue 17 put `CotalMessage::decode`
//! at 22 % of a member's CPU, half of it building the tree).
//!
//! It decides nothing of its own. It succeeds only when the message is well formed, and then
//! yields exactly what the tree decode ([`CotalMessage::from_object`]) yields; on anything else
//! it gives up and the caller decodes through the tree, which names the error. Rules it must
//! share with the tree decode:
//! - the same bounds (size, UTF-8, depth): it runs inside [`json::decode`];
//! - a key given twice counts once, the last one (a JSON object read into a map);
//! - `null` is an absent field;
//! - fields it does not know go to `extra`, verbatim.
//!
//! The equivalence is tested on the wire fixtures, hand-written edge cases and generated objects
//! (`tests` below).

use super::{CotalMessage, Extra, Part, Route, Sender};
use crate::time::UnixMillis;
use crate::wire::json;
use crate::wire::token::{AgentId, ConcreteChannel, Role, Space};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Number, Value};
use std::fmt;

/// `bytes` decoded in one pass, or `None` when the message is not well formed (or is, in a way
/// this decode does not take: the tree decode then decides).
pub(super) fn decode(bytes: &[u8]) -> Option<CotalMessage> {
    json::decode::<OnePass>(bytes).ok()?.0
}

/// The typed fields as read; `None` for absent or `null`.
#[derive(Default)]
struct Fields {
    id: Option<String>,
    ts: Option<Number>,
    space: Option<Space>,
    from: Option<Sender>,
    channel: Option<ConcreteChannel>,
    to: Option<AgentId>,
    to_service: Option<Role>,
    mentions: Option<Vec<String>>,
    parts: Option<Vec<Part>>,
    reply_to: Option<String>,
    context_id: Option<String>,
    extra: Extra,
}

impl Fields {
    /// The message, when the fields make one (the rules of [`CotalMessage::from_object`]).
    fn assemble(self) -> Option<CotalMessage> {
        let ts = json::uint_from_number(&self.ts?)?;
        let route = match (self.channel, self.to, self.to_service) {
            (Some(c), None, None) => Route::Channel(c),
            (None, Some(a), None) => Route::To(a),
            (None, None, Some(r)) => Route::ToService(r),
            _ => return None,
        };
        Some(CotalMessage {
            id: self.id?,
            ts: UnixMillis(ts),
            space: self.space?,
            from: self.from?,
            route,
            mentions: self.mentions.unwrap_or_default(),
            parts: self.parts?,
            reply_to: self.reply_to,
            context_id: self.context_id,
            extra: self.extra,
        })
    }
}

/// A message key: one of the known fields, or another kept for `extra`.
enum Key {
    Id,
    Ts,
    Space,
    From,
    Channel,
    To,
    ToService,
    Mentions,
    Parts,
    ReplyTo,
    ContextId,
    Other(String),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "id" => Key::Id,
                    "ts" => Key::Ts,
                    "space" => Key::Space,
                    "from" => Key::From,
                    "channel" => Key::Channel,
                    "to" => Key::To,
                    "toService" => Key::ToService,
                    "mentions" => Key::Mentions,
                    "parts" => Key::Parts,
                    "replyTo" => Key::ReplyTo,
                    "contextId" => Key::ContextId,
                    other => Key::Other(other.to_owned()),
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The whole message: `None` inside when the fields do not make one.
struct OnePass(Option<CotalMessage>);

impl<'de> Deserialize<'de> for OnePass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(OnePassVisitor)
    }
}

struct OnePassVisitor;

impl<'de> Visitor<'de> for OnePassVisitor {
    type Value = OnePass;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Cotal message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OnePass, A::Error> {
        let mut f = Fields::default();
        // A key given twice: the later value replaces the earlier one, `null` included.
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Id => f.id = map.next_value()?,
                Key::Ts => f.ts = map.next_value()?,
                Key::Space => f.space = map.next_value()?,
                Key::From => f.from = map.next_value()?,
                Key::Channel => f.channel = map.next_value()?,
                Key::To => f.to = map.next_value()?,
                Key::ToService => f.to_service = map.next_value()?,
                Key::Mentions => f.mentions = map.next_value()?,
                Key::Parts => f.parts = map.next_value()?,
                Key::ReplyTo => f.reply_to = map.next_value()?,
                Key::ContextId => f.context_id = map.next_value()?,
                Key::Other(name) => {
                    let value: Value = map.next_value()?;
                    f.extra.insert(name, value);
                }
            }
        }
        Ok(OnePass(f.assemble()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Both decodes answer alike: the same message, or the same error.
    fn agree(text: &str) {
        let bytes = text.as_bytes();
        assert_eq!(
            CotalMessage::decode(bytes),
            CotalMessage::decode_tree(bytes),
            "{text}"
        );
    }

    /// A well-formed message the one-pass decode must take itself (not leave to the tree).
    fn taken(text: &str) -> CotalMessage {
        agree(text);
        decode(text.as_bytes()).unwrap_or_else(|| panic!("not taken in one pass: {text}"))
    }

    const FROM: &str = r#"{"id":"alice","name":"Alice"}"#;

    #[test]
    fn every_route_and_optional_field_is_taken_in_one_pass() {
        let chat = taken(&format!(
            r#"{{"id":"m1","ts":1700000000000,"space":"main","from":{FROM},"channel":"general","parts":[{{"kind":"text","text":"hi"}}]}}"#
        ));
        assert_eq!(chat.channel().map(|c| c.as_str()), Some("general"));
        assert!(chat.mentions.is_empty() && chat.extra.is_empty());
        let dm = taken(&format!(
            r#"{{"id":"m2","ts":1,"space":"main","from":{FROM},"to":"bob","parts":[],"replyTo":"m1","contextId":"c"}}"#
        ));
        assert_eq!(dm.route, Route::To(AgentId::new("bob").unwrap()));
        assert_eq!(
            (dm.reply_to.as_deref(), dm.context_id.as_deref()),
            (Some("m1"), Some("c"))
        );
        let task = taken(
            r#"{"id":"m3","ts":2,"space":"main","from":{"id":"alice","name":"A","role":"r","x":[1]},"toService":"reviewer","mentions":["bob"],"parts":[{"kind":"data","data":{"k":1}},{"kind":"org.x","y":2}],"future":{"a":[1,2,{"b":null}]}}"#,
        );
        assert_eq!(task.mentions, vec!["bob".to_owned()]);
        assert_eq!(task.from.role.as_deref(), Some("r"));
        assert_eq!(task.extra["future"]["a"][2]["b"], Value::Null);
        assert_eq!(task.parts.len(), 2);
    }

    #[test]
    fn the_last_of_a_repeated_key_counts_and_null_is_absent() {
        let m = taken(&format!(
            r#"{{"id":"first","id":"last","ts":1,"space":"main","from":{FROM},"channel":"a","parts":[],"mentions":null,"replyTo":null,"x":1,"x":2}}"#
        ));
        assert_eq!(m.id, "last");
        assert_eq!(m.extra["x"], 2);
        assert!(m.mentions.is_empty() && m.reply_to.is_none());
        // An escaped key is the key it spells.
        let m = taken(&format!(
            r#"{{"\u0069d":"escaped","ts":1,"space":"main","from":{FROM},"channel":"a","parts":[]}}"#
        ));
        assert_eq!(m.id, "escaped");
        // An integral float timestamp, as the tree decode takes it.
        assert_eq!(
            taken(&format!(
                r#"{{"id":"m","ts":1.0e3,"space":"main","from":{FROM},"channel":"a","parts":[]}}"#
            ))
            .ts,
            UnixMillis(1000)
        );
    }

    #[test]
    fn what_is_not_well_formed_is_left_to_the_tree_decode_and_its_error() {
        for text in [
            "",
            "[]",
            "\"m\"",
            "{",
            &format!(r#"{{"id":"m","ts":1,"space":"main","from":{FROM},"channel":"a"}}"#),
            &format!(r#"{{"id":"m","ts":1,"space":"main","from":{FROM},"parts":[]}}"#),
            &format!(
                r#"{{"id":"m","ts":1,"space":"main","from":{FROM},"channel":"a","to":"b","parts":[]}}"#
            ),
            &format!(
                r#"{{"id":"m","ts":1,"space":"main","from":{FROM},"channel":"a","channel":null,"parts":[]}}"#
            ),
            &format!(
                r#"{{"id":"m","ts":-1,"space":"main","from":{FROM},"channel":"a","parts":[]}}"#
            ),
            &format!(
                r#"{{"id":"m","ts":"1","space":"main","from":{FROM},"channel":"a","parts":[]}}"#
            ),
            &format!(
                r#"{{"id":"m","ts":1.5,"space":"main","from":{FROM},"channel":"a","parts":[]}}"#
            ),
            &format!(r#"{{"id":7,"ts":1,"space":"main","from":{FROM},"channel":"a","parts":[]}}"#),
            &format!(r#"{{"id":"m","ts":1,"space":"a.b","from":{FROM},"channel":"a","parts":[]}}"#),
            r#"{"id":"m","ts":1,"space":"main","from":{"id":"a","id":"b","name":"n"},"channel":"a","parts":[]}"#,
            &format!(
                r#"{{"id":"m","id":null,"ts":1,"space":"main","from":{FROM},"channel":"a","parts":[]}}"#
            ),
            &format!(
                r#"{{"id":"m","ts":1,"space":"main","from":{FROM},"channel":"a","parts":[]}} x"#
            ),
            &format!("{}{}", "[".repeat(200), "]".repeat(200)),
        ] {
            agree(text);
        }
    }

    /// A value for `key`: a good one, `null`, or one of the wrong type or form.
    fn value_for(key: &'static str) -> impl Strategy<Value = String> {
        let good: Vec<&'static str> = match key {
            "id" | "replyTo" | "contextId" => vec![r#""m1""#, r#""""#, r#""\u00e9""#],
            "ts" => vec!["0", "1700000000000", "1.0e3", "18446744073709551615"],
            "space" => vec![r#""main""#, r#""other""#],
            "from" => vec![FROM, r#"{"id":"bob","name":"","role":"r","z":true}"#],
            "channel" => vec![r#""general""#, r#""a-b""#],
            "to" => vec![r#""bob""#],
            "toService" => vec![r#""reviewer""#],
            "mentions" => vec!["[]", r#"["bob","alice"]"#],
            "parts" => vec![
                "[]",
                r#"[{"kind":"text","text":"t"}]"#,
                r#"[{"kind":"data","data":[1]},{"kind":"x.y","q":null}]"#,
            ],
            _ => vec!["1", r#""s""#, "[]", r#"{"k":{"k":[null]}}"#, "true"],
        };
        let bad = vec![
            "null",
            "-1",
            "1.5",
            r#""""#,
            r#""a.b""#,
            "[1]",
            r#"{"id":1}"#,
            "false",
            "{}",
        ];
        prop_oneof![
            3 => proptest::sample::select(good),
            1 => proptest::sample::select(bad),
        ]
        .prop_map(str::to_owned)
    }

    /// Every field the message knows, and three it does not.
    fn keys() -> Vec<&'static str> {
        super::super::MESSAGE_FIELDS
            .into_iter()
            .chain(["x", "y", "zz"])
            .collect()
    }

    fn entry() -> impl Strategy<Value = String> {
        proptest::sample::select(keys())
            .prop_flat_map(|k| value_for(k).prop_map(move |v| format!("\"{k}\":{v}")))
    }

    /// A message object most of whose fields are right: the required ones first, in any form,
    /// then any mix of keys (repeats included).
    fn object() -> impl Strategy<Value = String> {
        let required = ["id", "ts", "space", "from", "channel", "parts"]
            .map(|k| value_for(k).prop_map(move |v| format!("\"{k}\":{v}")));
        (required, proptest::collection::vec(entry(), 0..8)).prop_map(|(req, more)| {
            let all: Vec<String> = req.into_iter().chain(more).collect();
            format!("{{{}}}", all.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_one_pass_decode_answers_as_the_tree_decode(text in object()) {
            agree(&text);
        }
    }
}
