//! The kinds of Cotal subject ([`SubjectKind`]), the delivery class of a message kind
//! ([`DeliveryKind`]) and whether it travels live or durable ([`Delivery`]).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The subject kinds that carry a sender token, as [`parse_subject`](super::parse_subject) returns
/// them (`chat`, `inst`, `svc`, `ctl`).
///
/// Deliberately exhaustive: it is exactly the reference parser's set, and callers should be forced
/// to decide what `Ctl` means wherever they map kinds (it has no delivery kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectKind {
    /// `chat`: multicast on a channel, `cotal.<space>.chat.<sender>.<channel…>`.
    Chat,
    /// `inst`: unicast to one instance, `cotal.<space>.inst.<target>.<sender>`.
    Inst,
    /// `svc`: anycast to a role, `cotal.<space>.svc.<role>.<sender>`.
    Svc,
    /// `ctl`: a control request, `cotal.<space>.ctl.<service>.<sender>`.
    Ctl,
}

impl SubjectKind {
    /// The kind token as it appears at index 2 of the subject.
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Chat => "chat",
            SubjectKind::Inst => "inst",
            SubjectKind::Svc => "svc",
            SubjectKind::Ctl => "ctl",
        }
    }

    /// The kind named by `token`, if it is one of the four sender-carrying kinds.
    pub fn from_token(token: &str) -> Option<Self> {
        match token {
            "chat" => Some(SubjectKind::Chat),
            "inst" => Some(SubjectKind::Inst),
            "svc" => Some(SubjectKind::Svc),
            "ctl" => Some(SubjectKind::Ctl),
            _ => None,
        }
    }

    /// The reference's `kindFromParsed`: `chat` → `channel`, `inst` → `dm`, `svc` → `anycast`.
    ///
    /// `ctl` has **no** delivery kind and gives `None`; the reference throws there and never
    /// defaults silently, and neither may a caller of this.
    pub fn delivery_kind(self) -> Option<DeliveryKind> {
        match self {
            SubjectKind::Chat => Some(DeliveryKind::Channel),
            SubjectKind::Inst => Some(DeliveryKind::Dm),
            SubjectKind::Svc => Some(DeliveryKind::Anycast),
            SubjectKind::Ctl => None,
        }
    }

    /// The reference's `deliveryOf`: `chat` → `chat`, `svc` → `anycast`, `inst` → `unicast`,
    /// `ctl` → `None`.
    pub fn delivery(self) -> Option<Delivery> {
        match self {
            SubjectKind::Chat => Some(Delivery::Chat),
            SubjectKind::Inst => Some(Delivery::Unicast),
            SubjectKind::Svc => Some(Delivery::Anycast),
            SubjectKind::Ctl => None,
        }
    }
}

impl fmt::Display for SubjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated delivery kind a receiver reports (`MessageMeta.kind`, SPEC §4). It comes only
/// from the delivering subject, never from payload fields.
///
/// Exhaustive on purpose: protocol v0.3 has exactly these three, and a receiver must handle each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryKind {
    /// `"channel"`: a multicast, live or through the durable backstop.
    Channel,
    /// `"dm"`: a unicast.
    Dm,
    /// `"anycast"`: a role-addressed task.
    Anycast,
}

impl DeliveryKind {
    /// The kind as the reference spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryKind::Channel => "channel",
            DeliveryKind::Dm => "dm",
            DeliveryKind::Anycast => "anycast",
        }
    }
}

impl fmt::Display for DeliveryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The delivery pattern of a subject kind, the reference's `deliveryOf` result.
///
/// Exhaustive on purpose, like [`DeliveryKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// `"chat"`: multicast.
    Chat,
    /// `"anycast"`: one of a role's consumers.
    Anycast,
    /// `"unicast"`: one instance.
    Unicast,
}

impl Delivery {
    /// The pattern as the reference spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Chat => "chat",
            Delivery::Anycast => "anycast",
            Delivery::Unicast => "unicast",
        }
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reference's `deliveryOf(kind)` on a raw kind token: `chat`, `svc` and `inst` map, anything
/// else (including `ctl`) gives `None`.
pub fn delivery_of(kind: &str) -> Option<Delivery> {
    SubjectKind::from_token(kind).and_then(SubjectKind::delivery)
}
