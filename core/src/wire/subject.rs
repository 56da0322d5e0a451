//! Subjects (semantics §1.2): the authentication parser, the typed subject grammar, and the
//! builders for the related subscribe patterns.
//!
//! Two parsers live here, on purpose:
//!
//! - [`parse_subject`] is the reference's `parseSubject`, the **only** parser used to authenticate
//!   a sender. It keeps the reference's shape (kind, sender, raw `rest`) and its leniency about the
//!   space and the `rest` tokens, so a Rust peer reads the same sender out of a subject as a
//!   TypeScript peer does. It is stricter in exactly one place, documented on the function.
//! - [`Subject::parse`] is the strict, typed grammar: every token is validated with the types of
//!   [`token`](mod@super::token), and formatting a [`Subject`] and parsing it back gives the
//!   same value. Use it for subjects this crate builds and for everything that is not sender
//!   authentication.
//!
//! Nothing here panics, whatever the input.
//!
//! The subject kinds and delivery classes live in `subject/kind.rs`.

use super::token::{
    AgentId, Channel, ChannelError, ConcreteChannel, MAX_CHANNEL_BYTES, MAX_TOKEN_BYTES, Role,
    Space, TokenError, validate_token,
};
use std::fmt;

mod kind;

pub use kind::{Delivery, DeliveryKind, SubjectKind, delivery_of};

/// The first token of every application subject.
pub const COTAL_PREFIX_TOKEN: &str = "cotal";

/// Longest subject [`Subject::parse`] accepts, in bytes.
///
/// The reference has no limit. This bound sits above the longest subject the typed values can
/// format (a chat subject with a [`MAX_TOKEN_BYTES`] space and sender and a [`MAX_CHANNEL_BYTES`]
/// channel is 1 037 bytes), so every [`Subject`] round-trips, and far below the broker's control
/// line limit.
pub const MAX_SUBJECT_BYTES: usize = 2048;

const LONGEST_TYPED_SUBJECT: usize = "cotal.".len()
    + MAX_TOKEN_BYTES
    + ".chat.".len()
    + MAX_TOKEN_BYTES
    + ".".len()
    + MAX_CHANNEL_BYTES;
const _: () = assert!(LONGEST_TYPED_SUBJECT <= MAX_SUBJECT_BYTES);

// ---------------------------------------------------------------------------------------------
// The authentication parser
// ---------------------------------------------------------------------------------------------

/// What [`parse_subject`] reads out of a sender-carrying subject: kind, authenticated sender token
/// and the raw `rest`.
///
/// A value of this type always has a sender; "no sender" is `None` from [`parse_subject`] and
/// cannot be mistaken for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSubject {
    kind: SubjectKind,
    space: String,
    sender: AgentId,
    rest: String,
}

impl ParsedSubject {
    /// The subject kind.
    pub fn kind(&self) -> SubjectKind {
        self.kind
    }

    /// Token 1 as written. The reference parser does not check it; neither does this one.
    pub fn space(&self) -> &str {
        &self.space
    }

    /// The sender token: token 3 for `chat`, token 4 for `inst`/`svc`/`ctl`.
    pub fn sender(&self) -> &AgentId {
        &self.sender
    }

    /// The reference's `rest`, unvalidated: for `chat` tokens 4.. joined with `.` (the concrete
    /// channel), for `inst` the target, for `svc` the role, for `ctl` the service.
    pub fn rest(&self) -> &str {
        &self.rest
    }

    /// The delivery kind of the subject (`kindFromParsed`); `None` for `ctl`.
    pub fn delivery_kind(&self) -> Option<DeliveryKind> {
        self.kind.delivery_kind()
    }

    /// For `chat`, `rest` as a validated concrete channel; `None` for other kinds or when `rest`
    /// is not a valid concrete channel.
    pub fn channel(&self) -> Option<ConcreteChannel> {
        match self.kind {
            SubjectKind::Chat => ConcreteChannel::new(self.rest.as_str()).ok(),
            _ => None,
        }
    }

    /// For `inst`, `rest` as a validated target id; `None` otherwise.
    pub fn target(&self) -> Option<AgentId> {
        match self.kind {
            SubjectKind::Inst => AgentId::new(self.rest.as_str()).ok(),
            _ => None,
        }
    }

    /// For `svc`, `rest` as a validated role; `None` otherwise.
    pub fn role(&self) -> Option<Role> {
        match self.kind {
            SubjectKind::Svc => Role::new(self.rest.as_str()).ok(),
            _ => None,
        }
    }

    /// For `ctl`, `rest` as a known control service; `None` otherwise.
    pub fn service(&self) -> Option<ControlService> {
        match self.kind {
            SubjectKind::Ctl => ControlService::from_token(&self.rest),
            _ => None,
        }
    }
}

/// The reference's `parseSubject`, the only parser used to authenticate a sender.
///
/// - Token 0 must be `cotal`; the space (token 1) is not checked.
/// - `chat` needs at least 5 tokens: sender = token 3, `rest` = tokens 4.. joined with `.`.
/// - `inst`, `svc` and `ctl` need exactly 5 tokens: sender = token 4, `rest` = token 3.
/// - Anything else, including the 7-token `ctl.delivery.<id>.reply.<uuid>`, has no sender: `None`.
///
/// **Stricter than the reference in one place:** the sender token must be a valid [`AgentId`]
/// (non-empty, `[A-Za-z0-9_-]`, at most [`MAX_TOKEN_BYTES`] bytes), otherwise the result is `None`.
/// Such a sender can never authenticate: a sender is accepted only when it equals the publisher's
/// id, an authenticated id is an nkey (56 characters of `[A-Z0-9]`), and publish grants are minted
/// for exactly `…<kind>.<id>…`; a sender outside the token alphabet (empty, `*`, `>`, `foo/bar`)
/// could otherwise only alias a real id through the lossy `token()`. The `rest` and the space are
/// left exactly as the reference leaves them; the typed accessors on [`ParsedSubject`] validate on
/// request.
pub fn parse_subject(subject: &str) -> Option<ParsedSubject> {
    let parts: Vec<&str> = subject.split('.').collect();
    if parts.first() != Some(&COTAL_PREFIX_TOKEN) {
        return None;
    }
    let kind = SubjectKind::from_token(parts.get(2)?)?;
    let (sender, rest) = match kind {
        SubjectKind::Chat => {
            let sender = parts.get(3)?;
            let channel = parts.get(4..).filter(|c| !c.is_empty())?;
            (*sender, channel.join("."))
        }
        SubjectKind::Inst | SubjectKind::Svc | SubjectKind::Ctl => {
            if parts.len() != 5 {
                return None;
            }
            (*parts.get(4)?, (*parts.get(3)?).to_owned())
        }
    };
    let sender = AgentId::new(sender).ok()?;
    Some(ParsedSubject {
        kind,
        space: (*parts.get(1)?).to_owned(),
        sender,
        rest,
    })
}

/// The reference's `parseDinboxOwner`: exactly 4 tokens, token 0 `cotal`, token 2 `dinbox` →
/// token 3. The space is not checked.
///
/// **Stricter than the reference:** the owner must be a valid [`AgentId`]. The daemon writes
/// dinbox subjects with `routeToken(owner)`, so a real entry always has a token owner; a
/// non-token owner could otherwise alias another owner's ACL record, whose key is `token(owner)`.
pub fn parse_dinbox_owner(subject: &str) -> Option<AgentId> {
    let mut parts = subject.split('.');
    let (Some(COTAL_PREFIX_TOKEN), Some(_space), Some("dinbox"), Some(owner), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    AgentId::new(owner).ok()
}

// ---------------------------------------------------------------------------------------------
// Reserved prefixes
// ---------------------------------------------------------------------------------------------

/// A subject prefix that application messages must not use (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ReservedPrefix {
    /// `$JS.`: the JetStream API, acks and advisories.
    JetStream,
    /// `$KV.`: key-value bucket writes.
    KeyValue,
    /// `$SYS.`: the system account.
    System,
    /// `$OBJ.`: object stores.
    ObjectStore,
    /// `_INBOX.`: the default request-reply inbox.
    Inbox,
    /// `_INBOX_`: the per-identity inbox prefix `_INBOX_<id>` (SPEC §10). Not in SPEC §3's list;
    /// this crate adds it because every request reply, pull delivery and KV-watch delivery of an
    /// identity lands under it, and no `cotal.` subject can start with it.
    IdentityInbox,
}

impl ReservedPrefix {
    /// Every reserved prefix, in the order they are checked.
    pub const ALL: [ReservedPrefix; 6] = [
        ReservedPrefix::JetStream,
        ReservedPrefix::KeyValue,
        ReservedPrefix::System,
        ReservedPrefix::ObjectStore,
        ReservedPrefix::Inbox,
        ReservedPrefix::IdentityInbox,
    ];

    /// The prefix text, including its trailing `.` or `_`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservedPrefix::JetStream => "$JS.",
            ReservedPrefix::KeyValue => "$KV.",
            ReservedPrefix::System => "$SYS.",
            ReservedPrefix::ObjectStore => "$OBJ.",
            ReservedPrefix::Inbox => "_INBOX.",
            ReservedPrefix::IdentityInbox => "_INBOX_",
        }
    }
}

impl fmt::Display for ReservedPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reserved prefix `subject` starts with, if any.
pub fn reserved_prefix(subject: &str) -> Option<ReservedPrefix> {
    ReservedPrefix::ALL
        .into_iter()
        .find(|p| subject.starts_with(p.as_str()))
}

/// True when `subject` starts with a reserved prefix and so must not carry an application message.
pub fn is_reserved(subject: &str) -> bool {
    reserved_prefix(subject).is_some()
}

// ---------------------------------------------------------------------------------------------
// Typed values
// ---------------------------------------------------------------------------------------------

/// The control services of `cotal.<space>.ctl.<service>.<sender>`.
///
/// Unknown services are refused by [`Subject::parse`] ([`SubjectError::UnknownService`]): nothing
/// in the protocol serves them, so a typed value for them would only invite a default. The
/// authentication parser [`parse_subject`] still reads the sender of such a subject, as the
/// reference does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ControlService {
    /// `manager`: spawn and manage agents (granted only with the `spawn` capability).
    Manager,
    /// `self`: an agent's own control tier.
    SelfService,
    /// `admin`: the admin tier.
    Admin,
    /// `delivery`: the delivery daemon's control service (`durableJoin`, `durableLeave`,
    /// `listMemberships`).
    Delivery,
}

impl ControlService {
    /// The service token.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlService::Manager => "manager",
            ControlService::SelfService => "self",
            ControlService::Admin => "admin",
            ControlService::Delivery => "delivery",
        }
    }

    /// The service named by `token`, if known.
    pub fn from_token(token: &str) -> Option<Self> {
        match token {
            "manager" => Some(ControlService::Manager),
            "self" => Some(ControlService::SelfService),
            "admin" => Some(ControlService::Admin),
            "delivery" => Some(ControlService::Delivery),
            _ => None,
        }
    }
}

impl fmt::Display for ControlService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last token of a delivery-control reply subject, `…ctl.delivery.<id>.reply.<uuid>`.
///
/// The reference uses a fresh `randomUUID()` per request (defence in depth against a peer aiming
/// at an in-flight reply subscription; it must not become a counter). The core has no randomness,
/// so the driver supplies it; this type only checks that it is one subject token.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplyId(String);

impl ReplyId {
    /// Validates `s` as a single subject token.
    ///
    /// # Errors
    ///
    /// A [`TokenError`] when `s` is empty, too long or not `[A-Za-z0-9_-]+`.
    pub fn new(s: impl Into<String>) -> Result<Self, TokenError> {
        let s = s.into();
        validate_token(&s, "reply id")?;
        Ok(ReplyId(s))
    }

    /// The token as written on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every subject kind of semantics §1.2, with validated tokens.
///
/// `Display` writes the wire form and [`Subject::parse`] reads it back to the same value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Subject {
    /// Multicast, `cotal.<space>.chat.<sender>.<channel…>` (captured by `CHAT_<space>`).
    Chat {
        /// The space.
        space: Space,
        /// The publisher.
        sender: AgentId,
        /// The concrete channel.
        channel: ConcreteChannel,
    },
    /// Unicast, `cotal.<space>.inst.<target>.<sender>` (captured by `DM_<space>`).
    Unicast {
        /// The space.
        space: Space,
        /// The addressed instance.
        target: AgentId,
        /// The publisher.
        sender: AgentId,
    },
    /// Anycast, `cotal.<space>.svc.<role>.<sender>` (captured by `TASK_<space>`).
    Anycast {
        /// The space.
        space: Space,
        /// The addressed role.
        role: Role,
        /// The publisher.
        sender: AgentId,
    },
    /// A control request, `cotal.<space>.ctl.<service>.<sender>` (not captured).
    Control {
        /// The space.
        space: Space,
        /// The control service.
        service: ControlService,
        /// The requester.
        sender: AgentId,
    },
    /// A delivery-control reply, `cotal.<space>.ctl.delivery.<requester>.reply.<uuid>`. It carries
    /// no sender: [`parse_subject`] returns `None` for it.
    DeliveryReply {
        /// The space.
        space: Space,
        /// The id that sent the request.
        requester: AgentId,
        /// The per-request random token.
        reply_id: ReplyId,
    },
    /// The mixed pre-auth durable inbox, `cotal.<space>.dinbox.<owner>` (captured by
    /// `INBOX_<space>`).
    Dinbox {
        /// The space.
        space: Space,
        /// The owner the entry is for.
        owner: AgentId,
    },
    /// The post-auth handoff, `cotal.<space>.dlv.<owner>` (captured by `DLV_<space>`).
    Dlv {
        /// The space.
        space: Space,
        /// The owner of the copy.
        owner: AgentId,
    },
    /// Reserved trace subject, `cotal.<space>.trace.<instance>`.
    Trace {
        /// The space.
        space: Space,
        /// The instance.
        instance: AgentId,
    },
    /// Reserved control-plane subject, `cotal.<space>.control.<instance>`.
    ControlPlane {
        /// The space.
        space: Space,
        /// The instance.
        instance: AgentId,
    },
}

impl Subject {
    /// The space of the subject.
    pub fn space(&self) -> &Space {
        match self {
            Subject::Chat { space, .. }
            | Subject::Unicast { space, .. }
            | Subject::Anycast { space, .. }
            | Subject::Control { space, .. }
            | Subject::DeliveryReply { space, .. }
            | Subject::Dinbox { space, .. }
            | Subject::Dlv { space, .. }
            | Subject::Trace { space, .. }
            | Subject::ControlPlane { space, .. } => space,
        }
    }

    /// The kind token at index 2 (`chat`, `inst`, `svc`, `ctl`, `dinbox`, `dlv`, `trace`,
    /// `control`); a delivery-control reply is a `ctl` subject.
    pub fn kind_token(&self) -> &'static str {
        match self {
            Subject::Chat { .. } => "chat",
            Subject::Unicast { .. } => "inst",
            Subject::Anycast { .. } => "svc",
            Subject::Control { .. } | Subject::DeliveryReply { .. } => "ctl",
            Subject::Dinbox { .. } => "dinbox",
            Subject::Dlv { .. } => "dlv",
            Subject::Trace { .. } => "trace",
            Subject::ControlPlane { .. } => "control",
        }
    }

    /// The sender [`parse_subject`] authenticates for this subject, if it carries one.
    pub fn sender(&self) -> Option<&AgentId> {
        match self {
            Subject::Chat { sender, .. }
            | Subject::Unicast { sender, .. }
            | Subject::Anycast { sender, .. }
            | Subject::Control { sender, .. } => Some(sender),
            _ => None,
        }
    }

    /// The delivery kind of a message delivered on this subject: `chat` → channel, `inst` → dm,
    /// `svc` → anycast, and `dlv` → channel (the backstop only ever carries channel messages).
    /// Everything else (control, replies, dinbox entries, reserved kinds) has none.
    pub fn delivery_kind(&self) -> Option<DeliveryKind> {
        match self {
            Subject::Chat { .. } | Subject::Dlv { .. } => Some(DeliveryKind::Channel),
            Subject::Unicast { .. } => Some(DeliveryKind::Dm),
            Subject::Anycast { .. } => Some(DeliveryKind::Anycast),
            _ => None,
        }
    }

    /// The confused-deputy guard of the delivery control service (semantics §2(l) step 1).
    ///
    /// `self` is the subject a request arrived on (already authenticated); `reply` is the reply
    /// subject the requester embedded. The reply is acceptable only when `self` is a
    /// `ctl.delivery.<id>` request and `reply` is exactly `<self>.reply.<one token>`; the token is
    /// returned. Anything else (a missing `.reply.` segment, a reply under another id or space,
    /// more than one token after `reply`, an empty or non-token suffix) gives `None`, and the
    /// daemon must send nothing.
    ///
    /// **Stricter than the reference**, whose `boundReply` only checks
    /// `reply.startsWith(subject + ".reply.")` and so also accepts `….reply.a.b` or a suffix with
    /// characters outside the token alphabet. A reference client always sends one uuid token, so
    /// only non-reference requesters are refused.
    pub fn accept_reply(&self, reply: &str) -> Option<ReplyId> {
        let Subject::Control {
            space,
            service: ControlService::Delivery,
            sender,
        } = self
        else {
            return None;
        };
        match Subject::parse(reply) {
            Ok(Subject::DeliveryReply {
                space: s,
                requester,
                reply_id,
            }) if &s == space && &requester == sender => Some(reply_id),
            _ => None,
        }
    }

    /// Parses `subject` strictly into a typed value.
    ///
    /// Checks, in order: non-empty, at most [`MAX_SUBJECT_BYTES`], no reserved prefix, token 0 is
    /// `cotal`, a known kind at token 2, the token count of that kind, then each token with its
    /// type, in index order. A chat channel must be a valid concrete channel (no wildcard); a
    /// control service must be known.
    ///
    /// # Errors
    ///
    /// The first problem found, as a [`SubjectError`].
    pub fn parse(subject: &str) -> Result<Subject, SubjectError> {
        if subject.is_empty() {
            return Err(SubjectError::Empty);
        }
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(SubjectError::TooLong { len: subject.len() });
        }
        if let Some(prefix) = reserved_prefix(subject) {
            return Err(SubjectError::Reserved { prefix });
        }
        let parts: Vec<&str> = subject.split('.').collect();
        let n = parts.len();
        let tok = |i: usize| parts.get(i).copied().unwrap_or("");
        if tok(0) != COTAL_PREFIX_TOKEN {
            return Err(SubjectError::NotCotal {
                first: tok(0).to_owned(),
            });
        }
        if n < 3 {
            return Err(SubjectError::MissingKind);
        }
        let kind = tok(2);
        let count = |kind: &'static str, min: usize, max: Option<usize>| {
            if n < min {
                Err(SubjectError::TooFewTokens {
                    kind,
                    min,
                    found: n,
                })
            } else if let Some(max) = max.filter(|max| n > *max) {
                Err(SubjectError::TooManyTokens {
                    kind,
                    max,
                    found: n,
                })
            } else {
                Ok(())
            }
        };
        let agent = |i: usize| AgentId::new(tok(i)).map_err(|e| SubjectError::token(i, e));
        match kind {
            "chat" => {
                count("chat", 5, None)?;
                let space = space_at(tok(1))?;
                let sender = agent(3)?;
                let channel = parts.get(4..).unwrap_or_default().join(".");
                let channel = ConcreteChannel::new(channel)
                    .map_err(|source| SubjectError::InvalidChannel { source })?;
                Ok(Subject::Chat {
                    space,
                    sender,
                    channel,
                })
            }
            "inst" => {
                count("inst", 5, Some(5))?;
                let space = space_at(tok(1))?;
                let target = agent(3)?;
                let sender = agent(4)?;
                Ok(Subject::Unicast {
                    space,
                    target,
                    sender,
                })
            }
            "svc" => {
                count("svc", 5, Some(5))?;
                let space = space_at(tok(1))?;
                let role = Role::new(tok(3)).map_err(|e| SubjectError::token(3, e))?;
                let sender = agent(4)?;
                Ok(Subject::Anycast {
                    space,
                    role,
                    sender,
                })
            }
            "ctl" if n >= 6 && tok(5) == "reply" => {
                count("ctl.delivery reply", 7, Some(7))?;
                let space = space_at(tok(1))?;
                if tok(3) != ControlService::Delivery.as_str() {
                    return Err(SubjectError::UnexpectedToken {
                        index: 3,
                        expected: "delivery",
                        found: tok(3).to_owned(),
                    });
                }
                let requester = agent(4)?;
                let reply_id = ReplyId::new(tok(6)).map_err(|e| SubjectError::token(6, e))?;
                Ok(Subject::DeliveryReply {
                    space,
                    requester,
                    reply_id,
                })
            }
            "ctl" => {
                count("ctl", 5, Some(5))?;
                let space = space_at(tok(1))?;
                validate_token(tok(3), "control service").map_err(|e| SubjectError::token(3, e))?;
                let service = ControlService::from_token(tok(3)).ok_or_else(|| {
                    SubjectError::UnknownService {
                        service: tok(3).to_owned(),
                    }
                })?;
                let sender = agent(4)?;
                Ok(Subject::Control {
                    space,
                    service,
                    sender,
                })
            }
            "dinbox" | "dlv" | "trace" | "control" => {
                let kind: &'static str = match kind {
                    "dinbox" => "dinbox",
                    "dlv" => "dlv",
                    "trace" => "trace",
                    _ => "control",
                };
                count(kind, 4, Some(4))?;
                let space = space_at(tok(1))?;
                let id = agent(3)?;
                Ok(match kind {
                    "dinbox" => Subject::Dinbox { space, owner: id },
                    "dlv" => Subject::Dlv { space, owner: id },
                    "trace" => Subject::Trace {
                        space,
                        instance: id,
                    },
                    _ => Subject::ControlPlane {
                        space,
                        instance: id,
                    },
                })
            }
            other => {
                // An empty or non-token kind is reported as a bad token, anything else as unknown.
                validate_token(other, "kind").map_err(|e| SubjectError::token(2, e))?;
                Err(SubjectError::UnknownKind {
                    kind: other.to_owned(),
                })
            }
        }
    }
}

fn space_at(s: &str) -> Result<Space, SubjectError> {
    Space::new(s).map_err(|e| SubjectError::token(1, e))
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Chat {
                space,
                sender,
                channel,
            } => {
                write!(f, "cotal.{space}.chat.{sender}.{channel}")
            }
            Subject::Unicast {
                space,
                target,
                sender,
            } => {
                write!(f, "cotal.{space}.inst.{target}.{sender}")
            }
            Subject::Anycast {
                space,
                role,
                sender,
            } => {
                write!(f, "cotal.{space}.svc.{role}.{sender}")
            }
            Subject::Control {
                space,
                service,
                sender,
            } => {
                write!(f, "cotal.{space}.ctl.{service}.{sender}")
            }
            Subject::DeliveryReply {
                space,
                requester,
                reply_id,
            } => {
                write!(f, "cotal.{space}.ctl.delivery.{requester}.reply.{reply_id}")
            }
            Subject::Dinbox { space, owner } => write!(f, "cotal.{space}.dinbox.{owner}"),
            Subject::Dlv { space, owner } => write!(f, "cotal.{space}.dlv.{owner}"),
            Subject::Trace { space, instance } => write!(f, "cotal.{space}.trace.{instance}"),
            Subject::ControlPlane { space, instance } => {
                write!(f, "cotal.{space}.control.{instance}")
            }
        }
    }
}

impl std::str::FromStr for Subject {
    type Err = SubjectError;
    fn from_str(s: &str) -> Result<Self, SubjectError> {
        Subject::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why [`Subject::parse`] refused a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubjectError {
    /// The subject is the empty string.
    Empty,
    /// The subject is longer than [`MAX_SUBJECT_BYTES`].
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The subject starts with a prefix reserved for the broker (SPEC §3).
    Reserved {
        /// The prefix found.
        prefix: ReservedPrefix,
    },
    /// Token 0 is not `cotal`.
    NotCotal {
        /// Token 0 as given.
        first: String,
    },
    /// There is no kind token (fewer than 3 tokens).
    MissingKind,
    /// Token 2 is a well-formed token but not a known kind.
    UnknownKind {
        /// The kind token as given.
        kind: String,
    },
    /// Fewer tokens than the kind needs.
    TooFewTokens {
        /// The kind (`chat`, `inst`, `svc`, `ctl`, `ctl.delivery reply`, `dinbox`, `dlv`, `trace`,
        /// `control`).
        kind: &'static str,
        /// The least number of tokens accepted.
        min: usize,
        /// The number of tokens found.
        found: usize,
    },
    /// More tokens than the kind allows.
    TooManyTokens {
        /// The kind.
        kind: &'static str,
        /// The most tokens accepted.
        max: usize,
        /// The number of tokens found.
        found: usize,
    },
    /// The token at `index` is not valid for its place (empty, wildcard, outside
    /// `[A-Za-z0-9_-]`, or too long).
    InvalidToken {
        /// Zero-based token index in the subject.
        index: usize,
        /// What is wrong with it.
        source: TokenError,
    },
    /// The channel of a chat subject (tokens 4..) is not a valid concrete channel; the error's
    /// segment index counts from token 4.
    InvalidChannel {
        /// What is wrong with it.
        source: ChannelError,
    },
    /// A `ctl` subject names a service other than `manager`, `self`, `admin` or `delivery`.
    UnknownService {
        /// The service token as given.
        service: String,
    },
    /// A fixed token has the wrong value (e.g. a 7-token `ctl` subject whose service is not
    /// `delivery`).
    UnexpectedToken {
        /// Zero-based token index.
        index: usize,
        /// The value required there.
        expected: &'static str,
        /// The value found.
        found: String,
    },
}

impl SubjectError {
    fn token(index: usize, source: TokenError) -> Self {
        SubjectError::InvalidToken { index, source }
    }
}

impl fmt::Display for SubjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectError::Empty => write!(f, "invalid subject: empty"),
            SubjectError::TooLong { len } => write!(
                f,
                "invalid subject: {len} bytes is longer than the {MAX_SUBJECT_BYTES}-byte limit"
            ),
            SubjectError::Reserved { prefix } => write!(
                f,
                "invalid subject: the reserved prefix {prefix:?} is not for application messages",
                prefix = prefix.as_str()
            ),
            SubjectError::NotCotal { first } => {
                write!(f, "invalid subject: token 0 is {first:?}, not \"cotal\"")
            }
            SubjectError::MissingKind => {
                write!(
                    f,
                    "invalid subject: no kind token (needs cotal.<space>.<kind>…)"
                )
            }
            SubjectError::UnknownKind { kind } => {
                write!(f, "invalid subject: unknown kind {kind:?}")
            }
            SubjectError::TooFewTokens { kind, min, found } => write!(
                f,
                "invalid {kind} subject: {found} tokens, at least {min} required"
            ),
            SubjectError::TooManyTokens { kind, max, found } => write!(
                f,
                "invalid {kind} subject: {found} tokens, at most {max} allowed"
            ),
            SubjectError::InvalidToken { index, source } => {
                write!(f, "invalid subject: bad token at index {index}: {source}")
            }
            SubjectError::InvalidChannel { source } => {
                write!(f, "invalid chat subject: channel (from token 4): {source}")
            }
            SubjectError::UnknownService { service } => {
                write!(
                    f,
                    "invalid ctl subject: unknown control service {service:?}"
                )
            }
            SubjectError::UnexpectedToken {
                index,
                expected,
                found,
            } => write!(
                f,
                "invalid subject: token {index} is {found:?}, expected {expected:?}"
            ),
        }
    }
}

impl std::error::Error for SubjectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SubjectError::InvalidToken { source, .. } => Some(source),
            SubjectError::InvalidChannel { source } => Some(source),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Builders for related subjects and patterns
// ---------------------------------------------------------------------------------------------

/// The delivery-control request subject of `requester`, `cotal.<space>.ctl.delivery.<requester>`.
pub fn delivery_request_subject(space: &Space, requester: &AgentId) -> Subject {
    Subject::Control {
        space: space.clone(),
        service: ControlService::Delivery,
        sender: requester.clone(),
    }
}

/// The reply subject for one delivery-control request,
/// `cotal.<space>.ctl.delivery.<requester>.reply.<uuid>`, from a caller-supplied random uuid
/// (the core has no randomness; the reference uses `randomUUID()` and it must not be a counter).
///
/// # Errors
///
/// [`SubjectError::InvalidToken`] (index 6) when `uuid` is not one subject token.
pub fn delivery_reply_subject(
    space: &Space,
    requester: &AgentId,
    uuid: &str,
) -> Result<Subject, SubjectError> {
    let reply_id = ReplyId::new(uuid).map_err(|e| SubjectError::token(6, e))?;
    Ok(Subject::DeliveryReply {
        space: space.clone(),
        requester: requester.clone(),
        reply_id,
    })
}

/// The live subscribe pattern of a channel, `cotal.<space>.chat.*.<channel>`; the channel may hold
/// `*` or a final `>` (`chatSubject(space, "*", ch)`).
pub fn chat_subscribe_pattern(space: &Space, channel: &Channel) -> String {
    format!("cotal.{space}.chat.*.{channel}")
}

/// Every chat subject of the space, `cotal.<space>.chat.>` (`chatWildcard`; the CHAT stream's
/// subjects and the fan-out filter).
pub fn chat_wildcard(space: &Space) -> String {
    format!("cotal.{space}.chat.>")
}

/// Every subject of the space, `cotal.<space>.>` (`spaceWildcard`).
pub fn space_wildcard(space: &Space) -> String {
    format!("cotal.{space}.>")
}

/// Every dinbox subject of the space, `cotal.<space>.dinbox.>` (the INBOX stream's subjects and
/// the trusted reader's filter).
pub fn dinbox_wildcard(space: &Space) -> String {
    format!("cotal.{space}.dinbox.>")
}

/// Every dlv subject of the space, `cotal.<space>.dlv.>` (the DLV stream's subjects).
pub fn dlv_wildcard(space: &Space) -> String {
    format!("cotal.{space}.dlv.>")
}

/// The daemon's control subscription, `cotal.<space>.ctl.delivery.*` (one token: requests only,
/// never replies).
pub fn delivery_control_pattern(space: &Space) -> String {
    format!("cotal.{space}.ctl.delivery.*")
}

/// The requester's reply subtree, `cotal.<space>.ctl.delivery.<requester>.>`.
pub fn delivery_reply_pattern(space: &Space, requester: &AgentId) -> String {
    format!("cotal.{space}.ctl.delivery.{requester}.>")
}

/// Every unicast to `target`, `cotal.<space>.inst.<target>.*` (the `dm_<id>` filter).
pub fn unicast_inbox_pattern(space: &Space, target: &AgentId) -> String {
    format!("cotal.{space}.inst.{target}.*")
}

/// Every anycast to `role`, `cotal.<space>.svc.<role>.*` (the `svc_<role>` filter).
pub fn anycast_role_pattern(space: &Space, role: &Role) -> String {
    format!("cotal.{space}.svc.{role}.*")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ALICE: &str = "UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD";
    const BOB: &str = "UDI36ZKVNUM5WMO4QQ6HDQU7F4OH2RCXOJRX6GAIOS5SKVNNSKCDNLJA";

    fn space() -> Space {
        Space::new("main").unwrap()
    }

    fn alice() -> AgentId {
        AgentId::new(ALICE).unwrap()
    }

    #[test]
    fn parse_subject_is_the_reference_parser() {
        let p = parse_subject(&format!("cotal.main.chat.{ALICE}.team.backend")).unwrap();
        assert_eq!(
            (p.kind(), p.sender().as_str(), p.rest()),
            (SubjectKind::Chat, ALICE, "team.backend")
        );
        assert_eq!(p.channel().unwrap().as_str(), "team.backend");
        assert_eq!(p.delivery_kind(), Some(DeliveryKind::Channel));

        let p = parse_subject(&format!("cotal.main.inst.{BOB}.{ALICE}")).unwrap();
        assert_eq!(
            (p.kind(), p.sender().as_str(), p.rest()),
            (SubjectKind::Inst, ALICE, BOB)
        );
        assert_eq!(p.target().unwrap().as_str(), BOB);

        let p = parse_subject(&format!("cotal.other.ctl.nope.{ALICE}")).unwrap();
        assert_eq!(
            (p.kind(), p.rest(), p.space()),
            (SubjectKind::Ctl, "nope", "other")
        );
        assert_eq!(p.service(), None);
        assert_eq!(p.delivery_kind(), None);

        // Lenient like the reference on rest and space.
        let p = parse_subject(&format!("cotal..chat.{ALICE}.a..b")).unwrap();
        assert_eq!((p.space(), p.rest()), ("", "a..b"));
        assert_eq!(p.channel(), None);

        for bad in [
            format!("cotal.main.chat.{ALICE}"),
            format!("cotal.main.ctl.delivery.{ALICE}.reply.x"),
            format!("cotal.main.inst.{BOB}.{ALICE}.x"),
            format!("cotal.main.svc.{ALICE}"),
            format!("cotal.main.dinbox.{ALICE}"),
            format!("Cotal.main.chat.{ALICE}.x"),
            "cotal.main.chat..x".to_owned(),
            "cotal.main.chat.*.x".to_owned(),
            "cotal.main.inst.x.a/b".to_owned(),
            "cotal".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse_subject(&bad), None, "{bad}");
        }
    }

    #[test]
    fn delivery_mappings() {
        assert_eq!(delivery_of("chat"), Some(Delivery::Chat));
        assert_eq!(delivery_of("svc"), Some(Delivery::Anycast));
        assert_eq!(delivery_of("inst"), Some(Delivery::Unicast));
        assert_eq!(delivery_of("ctl"), None);
        assert_eq!(delivery_of("dlv"), None);
        assert_eq!(
            SubjectKind::Svc.delivery_kind(),
            Some(DeliveryKind::Anycast)
        );
        assert_eq!(SubjectKind::Inst.delivery_kind(), Some(DeliveryKind::Dm));
        assert_eq!(serde_json::to_string(&DeliveryKind::Dm).unwrap(), "\"dm\"");
        assert_eq!(
            serde_json::to_string(&Delivery::Unicast).unwrap(),
            "\"unicast\""
        );
    }

    #[test]
    fn dinbox_owner() {
        assert_eq!(
            parse_dinbox_owner(&format!("cotal.x.dinbox.{ALICE}")),
            Some(alice())
        );
        assert_eq!(
            parse_dinbox_owner(&format!("cotal.x.dinbox.{ALICE}.y")),
            None
        );
        assert_eq!(parse_dinbox_owner("cotal.x.dinbox"), None);
        assert_eq!(parse_dinbox_owner(&format!("cotal.x.dlv.{ALICE}")), None);
        assert_eq!(parse_dinbox_owner("cotal.x.dinbox.a/b"), None);
        assert_eq!(parse_dinbox_owner("cotal.x.dinbox."), None);
    }

    #[test]
    fn reply_guard_is_bound_to_the_request() {
        let req = delivery_request_subject(&space(), &alice());
        assert_eq!(req.to_string(), format!("cotal.main.ctl.delivery.{ALICE}"));
        let uuid = "0b0e7c3e-1f6a-4c2b-9a51-3f4c1d2e5a6b";
        let good = format!("{req}.reply.{uuid}");
        assert_eq!(req.accept_reply(&good).unwrap().as_str(), uuid);
        assert_eq!(
            delivery_reply_subject(&space(), &alice(), uuid)
                .unwrap()
                .to_string(),
            good
        );
        for bad in [
            format!("{req}.reply.{uuid}.x"),
            format!("{req}.reply."),
            format!("{req}.reply"),
            format!("{req}.replyx.{uuid}"),
            format!("cotal.main.ctl.delivery.{BOB}.reply.{uuid}"),
            format!("cotal.other.ctl.delivery.{ALICE}.reply.{uuid}"),
            format!("_INBOX_{ALICE}.abc"),
            format!("{req}.reply.a b"),
        ] {
            assert_eq!(req.accept_reply(&bad), None, "{bad}");
        }
        let manager = Subject::Control {
            space: space(),
            service: ControlService::Manager,
            sender: alice(),
        };
        assert_eq!(
            manager.accept_reply(&format!("{manager}.reply.{uuid}")),
            None
        );
        assert!(matches!(
            delivery_reply_subject(&space(), &alice(), "a.b"),
            Err(SubjectError::InvalidToken { index: 6, .. })
        ));
    }

    #[test]
    fn builders() {
        let s = space();
        let ch = Channel::new("team.*").unwrap();
        assert_eq!(chat_subscribe_pattern(&s, &ch), "cotal.main.chat.*.team.*");
        assert_eq!(chat_wildcard(&s), "cotal.main.chat.>");
        assert_eq!(space_wildcard(&s), "cotal.main.>");
        assert_eq!(dinbox_wildcard(&s), "cotal.main.dinbox.>");
        assert_eq!(dlv_wildcard(&s), "cotal.main.dlv.>");
        assert_eq!(delivery_control_pattern(&s), "cotal.main.ctl.delivery.*");
        assert_eq!(
            delivery_reply_pattern(&s, &alice()),
            format!("cotal.main.ctl.delivery.{ALICE}.>")
        );
        assert_eq!(
            unicast_inbox_pattern(&s, &alice()),
            format!("cotal.main.inst.{ALICE}.*")
        );
        assert_eq!(
            anycast_role_pattern(&s, &Role::new("reviewer").unwrap()),
            "cotal.main.svc.reviewer.*"
        );
    }

    #[test]
    fn reserved_prefixes() {
        assert_eq!(
            reserved_prefix("$JS.API.INFO"),
            Some(ReservedPrefix::JetStream)
        );
        assert_eq!(reserved_prefix("$KV.b.k"), Some(ReservedPrefix::KeyValue));
        assert_eq!(reserved_prefix("$SYS.x"), Some(ReservedPrefix::System));
        assert_eq!(reserved_prefix("$OBJ.x"), Some(ReservedPrefix::ObjectStore));
        assert_eq!(reserved_prefix("_INBOX.abc"), Some(ReservedPrefix::Inbox));
        assert_eq!(
            reserved_prefix("_INBOX_U1.abc"),
            Some(ReservedPrefix::IdentityInbox)
        );
        assert_eq!(reserved_prefix("cotal.main.chat.U.x"), None);
        assert_eq!(reserved_prefix("$JSX.a"), None);
        assert!(!is_reserved("$JS"));
    }

    #[test]
    fn max_subject_holds_the_longest_typed_subject() {
        let long = Subject::Chat {
            space: Space::new("s".repeat(MAX_TOKEN_BYTES)).unwrap(),
            sender: AgentId::new("U".repeat(MAX_TOKEN_BYTES)).unwrap(),
            channel: ConcreteChannel::new("c".repeat(MAX_CHANNEL_BYTES - 2) + ".d").unwrap(),
        };
        let text = long.to_string();
        assert_eq!(text.len(), LONGEST_TYPED_SUBJECT);
        assert_eq!(Subject::parse(&text).unwrap(), long);
    }
}
