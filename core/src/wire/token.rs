//! Tokens, channel names and identifiers (semantics §1.1).
//!
//! Two families live here:
//!
//! - the reference's *lenient builders*, [`token`], [`route_token`] and [`channel_path`], which map
//!   any string onto subject-safe tokens exactly as the TypeScript reference does (lossy; never
//!   decode their output back into a name);
//! - the *strict validators* behind the typed names [`Channel`], [`ConcreteChannel`], [`AgentId`],
//!   [`Role`] and [`Space`]. They reject anything the lenient builders would silently rewrite, which
//!   closes the ACL-aliasing hole (a policy for `foo/bar` must not mint a grant for `foo_bar`) and the
//!   join-entry gap G29. A value of one of these types always formats to itself on the wire.
//!
//! The reference sets no length limit on names. This crate bounds them ([`MAX_CHANNEL_BYTES`],
//! [`MAX_TOKEN_BYTES`]) so hostile input cannot make subjects exceed what a broker accepts; the bounds
//! are far above anything the reference produces (nkeys are 56 bytes).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 512;
/// Longest single token (agent id, role, space, service) accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// The reference's `token(s)`: trim, replace every character outside `[A-Za-z0-9_-]` with `_`, and
/// return `"_"` for an empty result. Lossy by design.
pub fn token(s: &str) -> String {
    let mapped: String = s
        .trim()
        .chars()
        .map(|c| if is_token_char(c) { c } else { '_' })
        .collect();
    if mapped.is_empty() {
        "_".to_owned()
    } else {
        mapped
    }
}

/// The reference's `routeToken(s)`: `"*"` passes unchanged (for allow rules such as `inst.*.<id>`),
/// anything else goes through [`token`].
pub fn route_token(s: &str) -> String {
    if s == "*" { "*".to_owned() } else { token(s) }
}

/// The reference's lenient `channelPath(ch)`, the builder its wire path uses.
///
/// Splits on `.`, trims and drops empty segments, keeps `*` anywhere and `>` only as the last
/// segment, and passes every other segment through [`token`]. No segment at all gives `"_"`.
///
/// # Errors
///
/// [`ChannelError::MisplacedFullWildcard`] when `>` is not the last (non-empty) segment.
pub fn channel_path(ch: &str) -> Result<String, ChannelError> {
    let segments: Vec<&str> = ch
        .split('.')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if segments.is_empty() {
        return Ok("_".to_owned());
    }
    let last = segments.len() - 1;
    let mut out = Vec::with_capacity(segments.len());
    for (index, seg) in segments.iter().enumerate() {
        match *seg {
            ">" if index != last => return Err(ChannelError::MisplacedFullWildcard { index }),
            ">" | "*" => out.push((*seg).to_owned()),
            other => out.push(token(other)),
        }
    }
    Ok(out.join("."))
}

/// Why a channel name was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelError {
    /// The name is the empty string.
    Empty,
    /// The name is longer than [`MAX_CHANNEL_BYTES`].
    TooLong {
        /// The length that was given, in bytes.
        len: usize,
    },
    /// A leading, trailing or doubled dot left an empty segment.
    EmptySegment {
        /// Zero-based index of the empty segment.
        index: usize,
    },
    /// `>` appears somewhere other than the last segment.
    MisplacedFullWildcard {
        /// Zero-based index of the offending segment.
        index: usize,
    },
    /// A segment is not `[A-Za-z0-9_-]+`, `*` or `>`.
    InvalidSegment {
        /// Zero-based index of the offending segment.
        index: usize,
        /// The segment as given.
        segment: String,
    },
    /// The name is valid but holds a `*` or `>` segment where a concrete channel is required.
    NotConcrete {
        /// The channel as given.
        channel: String,
    },
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Empty => write!(f, "invalid channel: empty name"),
            ChannelError::TooLong { len } => {
                write!(
                    f,
                    "invalid channel: {len} bytes is longer than the {MAX_CHANNEL_BYTES}-byte limit"
                )
            }
            ChannelError::EmptySegment { index } => write!(
                f,
                "invalid channel: segment {index} is empty (leading, trailing or doubled dot)"
            ),
            ChannelError::MisplacedFullWildcard { index } => write!(
                f,
                "invalid channel: '>' is only valid as the last segment (found at segment {index})"
            ),
            ChannelError::InvalidSegment { index, segment } => write!(
                f,
                "invalid channel: segment {index} ({segment:?}) must be [A-Za-z0-9_-]+, '*' or '>'"
            ),
            ChannelError::NotConcrete { channel } => write!(
                f,
                "\"{channel}\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)"
            ),
        }
    }
}

impl std::error::Error for ChannelError {}

/// The reference's strict `assertValidChannel(ch)`, plus this crate's length bound.
///
/// Accepts dot-separated segments that are each exactly `[A-Za-z0-9_-]+`, `*`, or `>` as the last
/// segment. Performs no trimming: surrounding whitespace is an invalid segment.
///
/// # Errors
///
/// The first problem found, as a [`ChannelError`].
pub fn validate_channel(ch: &str) -> Result<(), ChannelError> {
    if ch.is_empty() {
        return Err(ChannelError::Empty);
    }
    if ch.len() > MAX_CHANNEL_BYTES {
        return Err(ChannelError::TooLong { len: ch.len() });
    }
    let count = ch.split('.').count();
    for (index, seg) in ch.split('.').enumerate() {
        match seg {
            "" => return Err(ChannelError::EmptySegment { index }),
            ">" if index + 1 != count => {
                return Err(ChannelError::MisplacedFullWildcard { index });
            }
            "*" | ">" => {}
            s if s.chars().all(is_token_char) => {}
            s => {
                return Err(ChannelError::InvalidSegment {
                    index,
                    segment: s.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// The reference's `isConcreteChannel(ch)`: no segment, after trimming, equals `*` or `>`.
///
/// Note the reference quirk kept here: a segment such as `a*` counts as concrete (but fails
/// [`validate_channel`]).
pub fn is_concrete_channel(ch: &str) -> bool {
    !ch.split('.').map(str::trim).any(|s| s == "*" || s == ">")
}

/// A channel name that passed [`validate_channel`]; it may contain `*` or a final `>`, so it can
/// name a subscription or an ACL entry but not necessarily a publish target.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Channel(String);

impl Channel {
    /// Validates `name` as a channel (wildcards allowed).
    ///
    /// # Errors
    ///
    /// The [`ChannelError`] that [`validate_channel`] reports.
    pub fn new(name: impl Into<String>) -> Result<Self, ChannelError> {
        let name = name.into();
        validate_channel(&name)?;
        Ok(Channel(name))
    }

    /// The channel as written on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when no segment is `*` or `>`.
    pub fn is_concrete(&self) -> bool {
        is_concrete_channel(&self.0)
    }

    /// This channel as a [`ConcreteChannel`], if it has no wildcard.
    pub fn to_concrete(&self) -> Option<ConcreteChannel> {
        self.is_concrete().then(|| ConcreteChannel(self.0.clone()))
    }
}

/// A valid channel name with no `*` or `>` segment: something one can publish to, hold a durable
/// membership on, or use as a registry key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConcreteChannel(String);

impl ConcreteChannel {
    /// Validates `name` as a concrete channel.
    ///
    /// # Errors
    ///
    /// A [`ChannelError`] from [`validate_channel`], or [`ChannelError::NotConcrete`].
    pub fn new(name: impl Into<String>) -> Result<Self, ChannelError> {
        let name = name.into();
        validate_channel(&name)?;
        if !is_concrete_channel(&name) {
            return Err(ChannelError::NotConcrete { channel: name });
        }
        Ok(ConcreteChannel(name))
    }

    /// The channel as written on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same name as a (possibly-wildcard) [`Channel`].
    pub fn as_channel(&self) -> Channel {
        Channel(self.0.clone())
    }
}

/// Why an identifier token was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is empty.
    Empty {
        /// What the token names (`"agent id"`, `"role"`, `"space"` …).
        what: &'static str,
    },
    /// The token is longer than [`MAX_TOKEN_BYTES`].
    TooLong {
        /// What the token names.
        what: &'static str,
        /// The length given, in bytes.
        len: usize,
    },
    /// The token holds a character outside `[A-Za-z0-9_-]`.
    InvalidChar {
        /// What the token names.
        what: &'static str,
        /// The first offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Empty { what } => write!(f, "invalid {what}: empty"),
            TokenError::TooLong { what, len } => {
                write!(
                    f,
                    "invalid {what}: {len} bytes is longer than the {MAX_TOKEN_BYTES}-byte limit"
                )
            }
            TokenError::InvalidChar { what, ch, at } => write!(
                f,
                "invalid {what}: character {ch:?} at byte {at} is outside [A-Za-z0-9_-]"
            ),
        }
    }
}

impl std::error::Error for TokenError {}

/// Checks that `s` is one subject token that [`token`] would leave unchanged.
///
/// # Errors
///
/// A [`TokenError`] naming `what`.
pub fn validate_token(s: &str, what: &'static str) -> Result<(), TokenError> {
    if s.is_empty() {
        return Err(TokenError::Empty { what });
    }
    if s.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong { what, len: s.len() });
    }
    match s.char_indices().find(|(_, c)| !is_token_char(*c)) {
        Some((at, ch)) => Err(TokenError::InvalidChar { what, ch, at }),
        None => Ok(()),
    }
}

macro_rules! token_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Validates `s` as a ", $what, ".")]
            ///
            /// # Errors
            ///
            /// A [`TokenError`] when `s` is empty, too long, or not `[A-Za-z0-9_-]+`.
            pub fn new(s: impl Into<String>) -> Result<Self, TokenError> {
                let s = s.into();
                validate_token(&s, $what)?;
                Ok($name(s))
            }

            /// The token as written on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = TokenError;
            fn from_str(s: &str) -> Result<Self, TokenError> {
                $name::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_newtype!(
    /// An agent's (or daemon's) stable authenticated id: in auth mode its user nkey
    /// (`U…`, 56 characters). Used as presence key, subject sender token, owner of memberships and
    /// backstop copies, and in the inbox prefix `_INBOX_<id>`.
    AgentId,
    "agent id"
);
token_newtype!(
    /// An anycast role, the `<role>` token of `svc.<role>.<sender>`.
    Role,
    "role"
);
token_newtype!(
    /// A space name. The reference runs raw names through `token()` for subjects; this type accepts
    /// only names that `token()` leaves unchanged, so the raw name and the subject token agree.
    Space,
    "space"
);

impl Space {
    /// `cotal.<space>`, the prefix of every subject of this space (`spacePrefix`).
    pub fn subject_prefix(&self) -> String {
        format!("cotal.{}", self.0)
    }
}

impl AgentId {
    /// `_INBOX_<id>`, the per-identity inbox prefix set before any request (SPEC §10).
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX_{}", self.0)
    }
}

macro_rules! channel_serde {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ChannelError;
            fn from_str(s: &str) -> Result<Self, ChannelError> {
                $name::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

channel_serde!(Channel);
channel_serde!(ConcreteChannel);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_the_reference_examples() {
        assert_eq!(token(" a.b "), "a_b");
        assert_eq!(token(""), "_");
        assert_eq!(token("   "), "_");
        assert_eq!(token("héllo"), "h_llo");
        assert_eq!(route_token("*"), "*");
        assert_eq!(route_token("a*"), "a_");
        let nkey = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";
        assert_eq!(route_token(nkey), nkey);
    }

    #[test]
    fn channel_path_is_lenient_like_the_reference() {
        assert_eq!(channel_path("a..b").unwrap(), "a.b");
        assert_eq!(channel_path(" a . b ").unwrap(), "a.b");
        assert_eq!(channel_path("...").unwrap(), "_");
        assert_eq!(channel_path("foo/bar.*.>").unwrap(), "foo_bar.*.>");
        assert_eq!(
            channel_path("a.>.b"),
            Err(ChannelError::MisplacedFullWildcard { index: 1 })
        );
    }

    #[test]
    fn validate_channel_rejects_what_token_would_rewrite() {
        assert!(validate_channel("team.backend").is_ok());
        assert!(validate_channel("team.*").is_ok());
        assert!(validate_channel("team.>").is_ok());
        assert!(validate_channel(">").is_ok());
        assert_eq!(validate_channel(""), Err(ChannelError::Empty));
        assert_eq!(
            validate_channel(".a"),
            Err(ChannelError::EmptySegment { index: 0 })
        );
        assert_eq!(
            validate_channel("a."),
            Err(ChannelError::EmptySegment { index: 1 })
        );
        assert_eq!(
            validate_channel("a..b"),
            Err(ChannelError::EmptySegment { index: 1 })
        );
        assert_eq!(
            validate_channel(">.a"),
            Err(ChannelError::MisplacedFullWildcard { index: 0 })
        );
        assert_eq!(
            validate_channel("foo/bar"),
            Err(ChannelError::InvalidSegment {
                index: 0,
                segment: "foo/bar".into()
            })
        );
        assert_eq!(
            validate_channel("a* "),
            Err(ChannelError::InvalidSegment {
                index: 0,
                segment: "a* ".into()
            })
        );
        assert!(matches!(
            validate_channel(&"a".repeat(513)),
            Err(ChannelError::TooLong { len: 513 })
        ));
        assert!(validate_channel(&"a".repeat(512)).is_ok());
    }

    #[test]
    fn concreteness_follows_the_reference_quirk() {
        assert!(is_concrete_channel("team.backend"));
        assert!(!is_concrete_channel("team.*"));
        assert!(!is_concrete_channel("team. > "));
        assert!(is_concrete_channel("a*"), "reference counts a* as concrete");
        assert_eq!(
            ConcreteChannel::new("team.>"),
            Err(ChannelError::NotConcrete {
                channel: "team.>".into()
            })
        );
        assert_eq!(Channel::new("team.>").unwrap().to_concrete(), None);
        assert_eq!(
            Channel::new("team.x")
                .unwrap()
                .to_concrete()
                .unwrap()
                .as_str(),
            "team.x"
        );
    }

    #[test]
    fn identifiers_are_single_tokens() {
        assert!(AgentId::new("UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD").is_ok());
        assert_eq!(
            AgentId::new(""),
            Err(TokenError::Empty { what: "agent id" })
        );
        assert_eq!(
            AgentId::new("a.b"),
            Err(TokenError::InvalidChar {
                what: "agent id",
                ch: '.',
                at: 1
            })
        );
        assert!(matches!(
            Role::new("*"),
            Err(TokenError::InvalidChar { .. })
        ));
        assert!(matches!(
            Space::new("x".repeat(257)),
            Err(TokenError::TooLong { .. })
        ));
        assert_eq!(Space::new("main").unwrap().subject_prefix(), "cotal.main");
        assert_eq!(AgentId::new("U1").unwrap().inbox_prefix(), "_INBOX_U1");
    }

    #[test]
    fn serde_validates_on_the_way_in() {
        let c: ConcreteChannel = serde_json::from_str("\"team.backend\"").unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"team.backend\"");
        let err = serde_json::from_str::<ConcreteChannel>("\"team.*\"").unwrap_err();
        assert!(err.to_string().contains("concrete"), "{err}");
        assert!(serde_json::from_str::<AgentId>("\"a b\"").is_err());
    }
}
