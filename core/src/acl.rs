//! NATS subject matching and read-ACL coverage (semantics §1.3, gap G28).
//!
//! - [`subject_matches`] is the reference's `subjectMatches`, token for token.
//! - [`channel_in_allow`] is the reference's `channelInAllow`. It is literal: when the channel it
//!   is given is itself a pattern, it can answer "covered" wrongly (`team.*` "covers" `team.>`,
//!   gap G28). It is kept, documented, for places that must reproduce the reference's answer.
//! - [`pattern_covers`] and [`patterns_cover`] are the G28 fix: a true subset test between NATS
//!   patterns.
//! - [`ReadAcl`] is the **one** coverage rule the rest of the core uses: the join gate, the fan-out
//!   mention check, the reader's re-check, and provisioning's `subscribe ⊆ allowSubscribe`.
//!
//! All functions are total: they never panic, whatever the input.

use crate::wire::token::{Channel, ChannelError, ConcreteChannel};
use serde::{Deserialize, Serialize};

/// The reference's `subjectMatches(pattern, subject)`: NATS token semantics, token by token.
///
/// - `*` matches exactly one token (any token, as the reference compares nothing for it);
/// - `>` at index `i` matches when at least one subject token remains, so `a.>` does **not**
///   match `a`; the pattern's tokens after a `>` are never looked at (as in the reference);
/// - any other pattern token must be equal;
/// - if no `>` was reached, the token counts must be equal.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    let mut remaining = subject.split('.').count();
    for p in pattern.split('.') {
        if p == ">" {
            return remaining > 0;
        }
        let Some(s) = subject_tokens.next() else {
            return false;
        };
        remaining -= 1;
        if p != "*" && p != s {
            return false;
        }
    }
    remaining == 0
}

/// The reference's `channelInAllow(allow, ch)`: some entry `a` satisfies
/// `subject_matches(a, ch)`.
///
/// Literal, not a subset test: correct when `ch` is a concrete channel, wrong when `ch` is a
/// pattern (`channel_in_allow(["team.*"], "team.>") == true`, gap G28). New code uses
/// [`ReadAcl`] instead.
pub fn channel_in_allow<S: AsRef<str>>(allow: &[S], ch: &str) -> bool {
    allow.iter().any(|a| subject_matches(a.as_ref(), ch))
}

/// A pattern split into tokens, if well formed: no empty token, `>` only as the last token.
fn well_formed(pattern: &str) -> Option<Vec<&str>> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    let last = tokens.len().saturating_sub(1);
    let ok = tokens
        .iter()
        .enumerate()
        .all(|(i, t)| !t.is_empty() && (*t != ">" || i == last));
    ok.then_some(tokens)
}

/// True iff every concrete subject matched by `requested` is matched by `allow`: a true subset
/// test between NATS patterns (the G28 fix).
///
/// The languages are taken over concrete subjects whose tokens are non-empty and not `*` or `>`.
/// A malformed pattern (an empty token, or `>` anywhere but last) is never trusted: as `allow` it
/// covers nothing, as `requested` it is never covered.
///
/// Examples: `team.>` covers `team.*` and `team.a.b`; `team.*` covers `team.a` but **not**
/// `team.>`; `*.b` covers `a.b`; `a.*` does not cover `*.b`.
pub fn pattern_covers(allow: &str, requested: &str) -> bool {
    patterns_cover(&[allow], requested)
}

/// True iff every concrete subject matched by `requested` is matched by at least one of `allow`:
/// a true subset test against a union of patterns.
///
/// A union can cover what no single entry covers: `{a.*, a.*.>}` covers `a.>`. Malformed entries
/// of `allow` are ignored and a malformed `requested` is never covered (see [`pattern_covers`]).
pub fn patterns_cover<S: AsRef<str>>(allow: &[S], requested: &str) -> bool {
    let Some(requested) = well_formed(requested) else {
        return false;
    };
    let live: Vec<Vec<&str>> = allow
        .iter()
        .filter_map(|a| well_formed(a.as_ref()))
        .collect();
    union_covers(live.iter().map(Vec::as_slice).collect(), &requested)
}

/// The subset test on well-formed token lists.
///
/// It walks the requested pattern position by position, keeping the allow patterns that can still
/// match. The argument for exactness: a subject whose wildcard positions hold *fresh* tokens
/// (appearing in no allow pattern) is matched by a subset of the patterns that match any other
/// subject of the same shape, so the fresh subjects are the hardest to cover, and it is enough
/// to keep, at a requested `*`, only the allow patterns with a wildcard there.
fn union_covers(mut live: Vec<&[&str]>, requested: &[&str]) -> bool {
    for (i, r) in requested.iter().enumerate() {
        // An allow pattern with `>` here matches every continuation of at least one token; the
        // requested pattern has a token here, so all of its subjects have one.
        if live.iter().any(|p| p.get(i) == Some(&">")) {
            return true;
        }
        match *r {
            ">" => return tail_covered(&live, i),
            "*" => live.retain(|p| p.get(i) == Some(&"*")),
            lit => live.retain(|p| matches!(p.get(i), Some(t) if *t == "*" || *t == lit)),
        }
        if live.is_empty() {
            return false;
        }
    }
    // Requested subjects end here: some allow pattern must end here too.
    live.iter().any(|p| p.len() == requested.len())
}

/// Do `live` patterns cover every continuation of one or more fresh tokens from position `i`?
fn tail_covered(live: &[&[&str]], i: usize) -> bool {
    // Only patterns whose tail from `i` is all `*` (with an optional final `>`) match fresh tails.
    let mut exact_lengths = std::collections::BTreeSet::new();
    let mut open_from: Option<usize> = None;
    for p in live {
        let tail = p.get(i..).unwrap_or_default();
        let stars = tail.iter().take_while(|t| **t == "*").count();
        match tail.get(stars) {
            None if stars > 0 => {
                exact_lengths.insert(stars);
            }
            Some(&">") => {
                // Matches every tail of length > stars.
                let from = stars + 1;
                open_from = Some(open_from.map_or(from, |o| o.min(from)));
            }
            _ => {}
        }
    }
    match open_from {
        Some(from) => (1..from).all(|len| exact_lengths.contains(&len)),
        None => false,
    }
}

/// A read ACL: the `allowSubscribe` patterns of one owner, validated.
///
/// This is the single coverage rule of the core. `[]` reads nothing. Serialized as the JSON array
/// of patterns, as in the ACL record's `allowSubscribe`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReadAcl {
    allow: Vec<Channel>,
}

impl ReadAcl {
    /// An ACL from already-validated patterns, kept in the given order.
    pub fn new(allow: impl IntoIterator<Item = Channel>) -> Self {
        ReadAcl {
            allow: allow.into_iter().collect(),
        }
    }

    /// The ACL that reads nothing (`allowSubscribe: []`).
    pub fn nothing() -> Self {
        ReadAcl::default()
    }

    /// Validates each raw `allowSubscribe` entry as a [`Channel`].
    ///
    /// # Errors
    ///
    /// The [`ChannelError`] of the first invalid entry.
    pub fn from_allow_subscribe<S: AsRef<str>>(entries: &[S]) -> Result<Self, ChannelError> {
        let allow = entries
            .iter()
            .map(|e| Channel::new(e.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(ReadAcl { allow })
    }

    /// The patterns, in order.
    pub fn entries(&self) -> &[Channel] {
        &self.allow
    }

    /// True when the ACL reads nothing.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }

    /// May the owner read the concrete channel `ch`?
    pub fn covers(&self, ch: &ConcreteChannel) -> bool {
        self.allow
            .iter()
            .any(|a| subject_matches(a.as_str(), ch.as_str()))
    }

    /// May the owner read every channel matched by `pattern`? A true subset test against the
    /// union of the entries (so `{a.*, a.*.>}` covers `a.>`, and `team.*` does not cover
    /// `team.>`).
    pub fn covers_pattern(&self, pattern: &Channel) -> bool {
        let allow: Vec<&str> = self.allow.iter().map(Channel::as_str).collect();
        patterns_cover(&allow, pattern.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subject_matches_reference_semantics() {
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches(">", "a"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(!subject_matches("a", "a.b"));
        // Reference quirks: tokens after `>` are ignored, `*` matches an empty token.
        assert!(subject_matches("a.>.zzz", "a.b"));
        assert!(subject_matches("a.*", "a."));
        assert!(subject_matches("", ""));
    }

    #[test]
    fn channel_in_allow_is_literal() {
        assert!(channel_in_allow(&["team.*"], "team.x"));
        assert!(!channel_in_allow(&["team.*"], "team.x.y"));
        // G28: literal comparison of a pattern.
        assert!(channel_in_allow(&["team.*"], "team.>"));
        assert!(!pattern_covers("team.*", "team.>"));
        let none: [&str; 0] = [];
        assert!(!channel_in_allow(&none, "general"));
    }

    #[test]
    fn pattern_covers_examples() {
        assert!(pattern_covers("team.>", "team.*"));
        assert!(pattern_covers("team.>", "team.a.b"));
        assert!(pattern_covers("team.>", "team.>"));
        assert!(pattern_covers(">", "*.>"));
        assert!(pattern_covers("*.b", "a.b"));
        assert!(!pattern_covers("a.*", "*.b"));
        assert!(!pattern_covers("team.>", "team"));
        assert!(!pattern_covers("a.*.>", "a.>"));
        assert!(pattern_covers("a.*.>", "a.*.*"));
        assert!(!pattern_covers("a.b", "a.*"));
        // Malformed input is never trusted.
        assert!(!pattern_covers("a.>.b", "a.x.b"));
        assert!(!pattern_covers(">", "a..b"));
        assert!(!pattern_covers("", ""));
        // Unions.
        assert!(patterns_cover(&["a.*", "a.*.>"], "a.>"));
        assert!(!patterns_cover(&["a.*", "a.*.*.>"], "a.>"));
        assert!(patterns_cover(&["a.*", "a.*.*", "a.*.*.>"], "a.>"));
        assert!(!patterns_cover(&["a.x", "a.y"], "a.*"));
    }

    #[test]
    fn read_acl() {
        let acl = ReadAcl::from_allow_subscribe(&["general", "team.*"]).unwrap();
        let c = |s: &str| ConcreteChannel::new(s).unwrap();
        let p = |s: &str| Channel::new(s).unwrap();
        assert!(acl.covers(&c("general")));
        assert!(acl.covers(&c("team.x")));
        assert!(!acl.covers(&c("team.x.y")));
        assert!(!acl.covers(&c("review")));
        assert!(acl.covers_pattern(&p("team.*")));
        assert!(!acl.covers_pattern(&p("team.>")));
        assert!(!acl.covers_pattern(&p(">")));
        let nothing = ReadAcl::nothing();
        assert!(nothing.is_empty());
        assert!(!nothing.covers(&c("general")));
        assert!(!nothing.covers_pattern(&p("general")));
        assert!(ReadAcl::from_allow_subscribe(&["foo/bar"]).is_err());
        let json: ReadAcl = serde_json::from_str(r#"["general",">"]"#).unwrap();
        assert!(json.covers_pattern(&p("a.*.>")));
        assert_eq!(serde_json::to_string(&json).unwrap(), r#"["general",">"]"#);
        assert!(serde_json::from_str::<ReadAcl>(r#"["a b"]"#).is_err());
    }

    // ------------------------------------------------------------------------------------------
    // Brute-force models
    // ------------------------------------------------------------------------------------------

    /// Literal tokens patterns may use. Subjects also use `z`, which no pattern holds, so a
    /// wildcard can always be told apart from a literal.
    const PATTERN_LITERALS: [&str; 2] = ["x", "y"];
    const SUBJECT_TOKENS: [&str; 3] = ["x", "y", "z"];
    const MAX_PATTERN_TOKENS: usize = 4;

    /// Every concrete subject of 1..=max tokens over [`SUBJECT_TOKENS`].
    fn all_subjects(max: usize) -> Vec<Vec<&'static str>> {
        let mut out = Vec::new();
        let mut layer: Vec<Vec<&'static str>> = vec![vec![]];
        for _ in 0..max {
            let mut next = Vec::new();
            for s in &layer {
                for t in SUBJECT_TOKENS {
                    let mut s2 = s.clone();
                    s2.push(t);
                    next.push(s2);
                }
            }
            out.extend(next.iter().cloned());
            layer = next;
        }
        out
    }

    /// An independent recursive model of NATS matching for well-formed patterns.
    fn model_match(p: &[&str], s: &[&str]) -> bool {
        match (p.split_first(), s.split_first()) {
            (Some((&">", _)), Some(_)) => true,
            (Some((pt, pr)), Some((st, sr))) => (*pt == "*" || pt == st) && model_match(pr, sr),
            (None, None) => true,
            _ => false,
        }
    }

    /// Brute-force union coverage. Subjects up to `MAX_PATTERN_TOKENS + 1` tokens with a fresh
    /// token `z` are enough to find a counterexample if one exists.
    fn brute_cover(allow: &[String], requested: &str, subjects: &[Vec<&str>]) -> bool {
        let req: Vec<&str> = requested.split('.').collect();
        let allow: Vec<Vec<&str>> = allow.iter().map(|a| a.split('.').collect()).collect();
        subjects
            .iter()
            .filter(|s| model_match(&req, s))
            .all(|s| allow.iter().any(|a| model_match(a, s)))
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just(PATTERN_LITERALS[0]),
            Just(PATTERN_LITERALS[1]),
            Just("*"),
        ];
        (
            prop::collection::vec(token, 1..=MAX_PATTERN_TOKENS),
            any::<bool>(),
        )
            .prop_map(|(mut tokens, full)| {
                if full && let Some(last) = tokens.last_mut() {
                    *last = ">";
                }
                tokens.join(".")
            })
    }

    fn subject_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(&SUBJECT_TOKENS[..]),
            1..=MAX_PATTERN_TOKENS + 1,
        )
        .prop_map(|t| t.join("."))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Soundness and completeness of the single-pattern subset test.
        #[test]
        fn pattern_covers_equals_brute_force(a in pattern_strategy(), r in pattern_strategy()) {
            let subjects = all_subjects(MAX_PATTERN_TOKENS + 1);
            prop_assert_eq!(
                pattern_covers(&a, &r),
                brute_cover(std::slice::from_ref(&a), &r, &subjects),
                "allow {} requested {}", a, r
            );
        }

        /// Soundness and completeness of the union subset test.
        #[test]
        fn patterns_cover_equals_brute_force(
            allow in prop::collection::vec(pattern_strategy(), 0..4),
            r in pattern_strategy(),
        ) {
            let subjects = all_subjects(MAX_PATTERN_TOKENS + 1);
            prop_assert_eq!(
                patterns_cover(&allow, &r),
                brute_cover(&allow, &r, &subjects),
                "allow {:?} requested {}", allow, r
            );
            let acl = ReadAcl::new(allow.iter().map(|a| Channel::new(a.as_str()).unwrap()));
            prop_assert_eq!(acl.covers_pattern(&Channel::new(r.as_str()).unwrap()),
                patterns_cover(&allow, &r));
        }

        /// `subject_matches` agrees with the independent recursive model.
        #[test]
        fn subject_matches_agrees_with_model(p in pattern_strategy(), s in subject_strategy()) {
            let pt: Vec<&str> = p.split('.').collect();
            let st: Vec<&str> = s.split('.').collect();
            prop_assert_eq!(subject_matches(&p, &s), model_match(&pt, &st));
        }

        /// For concrete channels the reference's literal rule is exactly the subset test, and
        /// `ReadAcl::covers` agrees with both.
        #[test]
        fn channel_in_allow_equals_pattern_covers_on_concrete(
            allow in prop::collection::vec(pattern_strategy(), 0..4),
            ch in subject_strategy(),
        ) {
            let by_subset = allow.iter().any(|a| pattern_covers(a, &ch));
            prop_assert_eq!(channel_in_allow(&allow, &ch), by_subset);
            prop_assert_eq!(patterns_cover(&allow, &ch), by_subset);
            let acl = ReadAcl::new(allow.iter().map(|a| Channel::new(a.as_str()).unwrap()));
            prop_assert_eq!(acl.covers(&ConcreteChannel::new(ch.as_str()).unwrap()), by_subset);
        }

        /// Nothing panics on arbitrary input.
        #[test]
        fn total_on_arbitrary_strings(a in ".{0,40}", b in ".{0,40}") {
            let _ = subject_matches(&a, &b);
            let _ = pattern_covers(&a, &b);
            let _ = patterns_cover(&[a.as_str(), b.as_str()], &b);
            let _ = channel_in_allow(&[a.as_str()], &b);
        }

        /// Every pattern covers itself and `>` covers every well-formed pattern.
        #[test]
        fn reflexive_and_top(p in pattern_strategy()) {
            prop_assert!(pattern_covers(&p, &p));
            prop_assert!(pattern_covers(">", &p));
        }
    }
}
