//! Issue 21 "also try": unicode, percent-encoding and dot tricks in channel and agent names,
//! against every validator, parser and subject builder that takes a name from outside. Each must
//! refuse the name (never rewrite it into another, valid one that could alias a real name).

use cotal_core::wire::keys::{ChannelRegistryKey, parse_member_key};
use cotal_core::wire::subject::{Subject, parse_dinbox_owner, parse_subject};
use cotal_core::wire::token::{AgentId, Channel, ConcreteChannel, Role, Space};

/// Names that look like `alice` / `general` or smuggle a separator.
const HOSTILE_TOKENS: &[&str] = &[
    "al\u{0456}ce",      // Cyrillic i
    "alice\u{200b}",     // zero-width space
    "\u{202e}ecila",     // right-to-left override
    "ALICE\u{0130}",     // dotted capital I
    "alic%65",           // percent-encoded e
    "alice%2Eevil",      // percent-encoded dot
    "alice\u{ff0e}evil", // fullwidth full stop
    "alice.evil",        // a real dot
    "alice evil",
    " alice",
    "alice\t",
    "alice/evil",
    "alice*",
    ">",
    "*",
    "",
    "alice\0",
    "ａlice", // fullwidth a
];

const HOSTILE_CHANNELS: &[&str] = &[
    "gen\u{0435}ral",   // Cyrillic e
    "general\u{200d}",  // zero-width joiner
    "general%2Esecret", // percent-encoded dot
    "general\u{ff0e}secret",
    "general\u{3002}secret", // ideographic full stop
    "general..secret",
    ".general",
    "general.",
    "general.>.secret",
    "general. secret",
    "general/secret",
    "general secret",
    "general\nsecret",
];

#[test]
fn hostile_tokens_are_refused_by_every_typed_name() {
    for t in HOSTILE_TOKENS {
        assert!(AgentId::new(*t).is_err(), "agent id {t:?}");
        assert!(Role::new(*t).is_err(), "role {t:?}");
        assert!(Space::new(*t).is_err(), "space {t:?}");
        assert!(
            serde_json::from_value::<AgentId>(serde_json::json!(t)).is_err(),
            "decoded agent id {t:?}"
        );
    }
}

#[test]
fn hostile_channels_are_refused_and_never_rewritten() {
    for c in HOSTILE_CHANNELS {
        assert!(Channel::new(*c).is_err(), "channel {c:?}");
        assert!(ConcreteChannel::new(*c).is_err(), "concrete {c:?}");
        assert!(ChannelRegistryKey::parse(c).is_err(), "registry key {c:?}");
        assert!(
            parse_member_key(&format!("{c}/alice")).is_err(),
            "member key {c:?}"
        );
    }
}

#[test]
fn hostile_subjects_parse_to_nothing_valid() {
    for t in HOSTILE_TOKENS {
        // A sender token outside the alphabet never parses (it could only alias a real id).
        let chat = format!("cotal.main.chat.{t}.general");
        assert!(
            parse_subject(&chat).is_none() || t.contains('.'),
            "{chat:?}"
        );
        if let Some(p) = parse_subject(&chat) {
            // A dotted sender splits into tokens: the sender is the first, valid, token, and the
            // rest is the channel; nothing is rewritten.
            assert!(chat.contains(p.sender().as_str()));
        }
        assert!(
            Subject::parse(&chat).is_err() || t.contains('.'),
            "{chat:?}"
        );
        let dm = format!("cotal.main.inst.bob.{t}");
        assert!(Subject::parse(&dm).is_err(), "{dm:?}");
        let dinbox = format!("cotal.main.dinbox.{t}");
        assert!(parse_dinbox_owner(&dinbox).is_none(), "{dinbox:?}");
        for c in HOSTILE_CHANNELS {
            let chat = format!("cotal.main.chat.alice.{c}");
            assert!(Subject::parse(&chat).is_err(), "{chat:?}");
        }
    }
    // A member key with the owner smuggled through percent-encoding or a second slash.
    for key in [
        "general/al%69ce",
        "general/alice/evil",
        "general/",
        "/alice",
    ] {
        assert!(parse_member_key(key).is_err(), "{key:?}");
    }
}
