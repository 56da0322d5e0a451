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
