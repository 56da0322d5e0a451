//! Fan-out routing for one CHAT message (semantics §2j, invariants I4, I8, I9; gaps G17, G37,
//! G38).
//!
//! [`route`] is pure: the caller has already parsed the subject (a `chat` subject, the channel is
//! its rest), decoded the message and checked that `from.id` is the subject's sender (spoof,
//! malformed and non-chat messages are dropped before routing), resolved the channel's class
//! fresh, and looked up the channel's members in its in-memory index. Work is `O(m log m)` in the
//! members given plus `O(k)` resolver and ACL lookups for `k` mentions: nothing quadratic.

use crate::acl::ReadAcl;
use crate::policy::DeliveryClass;
use crate::registry::durable_eligible;
use crate::wire::message::CotalMessage;
use crate::wire::msgid::Plane3MsgId;
use crate::wire::records::{MembershipRecord, Plane3Entry};
use crate::wire::token::{AgentId, ConcreteChannel};
use std::collections::BTreeSet;

/// What the daemon's roster says a mentioned name is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MentionResolution {
    /// Exactly one owner has that name.
    Owner(AgentId),
    /// Several owners have that name: nobody gets a copy.
    Ambiguous,
    /// Nobody has that name.
    Unknown,
}

/// One dinbox write: the entry for `owner`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    /// The owner whose dinbox (`cotal.<s>.dinbox.<owner>`) receives the entry.
    pub owner: AgentId,
    /// The entry.
    pub entry: Plane3Entry,
}

impl Routed {
    /// The entry's `Nats-Msg-Id`, `<msg.id>:<owner>:<generation>`.
    pub fn msg_id(&self) -> Plane3MsgId {
        Plane3MsgId::for_entry(&self.entry, &self.owner)
    }
}

/// Why a mention produced no entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MentionSkipReason {
    /// The name resolves to nobody.
    Unknown,
    /// The name resolves to several owners.
    Ambiguous,
    /// The name is the sender's own (I4).
    Sender,
    /// The owner has no read ACL on record.
    NoAcl,
    /// The owner's read ACL does not cover the channel (I8): a mention never leaks content.
    NotCovered,
    /// The owner already got an entry from an earlier mention of this message.
    Duplicate,
}

/// A mention that produced no entry, for observability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedMention {
    /// The mentioned name as written in the message.
    pub name: String,
    /// Why it produced no entry.
    pub reason: MentionSkipReason,
}

/// The fan-out decision for one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteDecision {
    /// The dinbox entries to write, in order (members in the order given, then mentions in the
    /// message's order). Ack the CHAT message only after all of them are stored.
    pub entries: Vec<Routed>,
    /// Mentions on a live channel that produced no entry.
    pub skipped_mentions: Vec<SkippedMention>,
    /// Mentions on a durable channel, ignored by design (G37: a mentioned non-member gets no
    /// durable copy; members get theirs through membership).
    pub ignored_mentions: usize,
}

/// Routes one authenticated CHAT message (`fanOutMessage` step 4).
///
/// - `channel` is the concrete channel from the CHAT **subject**; `seq` its stream sequence;
///   `class` the channel's effective class, resolved fresh.
/// - `members`: the channel's membership records from the daemon's index (tombstones
///   included). Records of another channel are ignored; if an owner appears twice, only its
///   first record counts.
/// - `resolve`: the roster lookup of a mentioned name (G17: resolution policy is the caller's).
/// - `acl_for`: the owner's current read ACL, `None` when absent.
///
/// Durable class: one `durable-channel` entry per member whose current interval admits `seq`
/// ([`durable_eligible`], G26), except the sender, with the member's generation. Mentions are
/// ignored (G37).
///
/// Live class: memberships play no part (G38: they are inert on a live channel); each mention
/// that resolves to exactly one owner, not the sender, whose ACL covers `channel`, gets one
/// `live-mention` entry with generation 0.
pub fn route<'m, 'a, M, R, A>(
    message: &CotalMessage,
    channel: &ConcreteChannel,
    seq: u64,
    class: DeliveryClass,
    members: M,
    mut resolve: R,
    mut acl_for: A,
) -> RouteDecision
where
    M: IntoIterator<Item = &'m MembershipRecord>,
    R: FnMut(&str) -> MentionResolution,
    A: FnMut(&AgentId) -> Option<&'a ReadAcl>,
{
    let sender = &message.from.id;
    let mut decision = RouteDecision::default();
    let mut routed: BTreeSet<&AgentId> = BTreeSet::new();
    match class {
        DeliveryClass::Durable => {
            for rec in members {
                if &rec.channel != channel || &rec.owner == sender || routed.contains(&rec.owner) {
                    continue;
                }
                // One record per owner counts, eligible or not.
                routed.insert(&rec.owner);
                if durable_eligible(rec, seq) {
                    decision.entries.push(Routed {
                        owner: rec.owner.clone(),
                        entry: Plane3Entry::durable_channel(
                            message.clone(),
                            channel.clone(),
                            seq,
                            rec.generation,
                        ),
                    });
                }
            }
            decision.ignored_mentions = message.mentions.len();
        }
        DeliveryClass::Live => {
            let mut mentioned: BTreeSet<AgentId> = BTreeSet::new();
            for name in &message.mentions {
                let skip = |reason| SkippedMention {
                    name: name.clone(),
                    reason,
                };
                let owner = match resolve(name) {
                    MentionResolution::Owner(o) => o,
                    MentionResolution::Ambiguous => {
                        decision
                            .skipped_mentions
                            .push(skip(MentionSkipReason::Ambiguous));
                        continue;
                    }
                    MentionResolution::Unknown => {
                        decision
                            .skipped_mentions
                            .push(skip(MentionSkipReason::Unknown));
                        continue;
                    }
                };
                let reason = if &owner == sender {
                    Some(MentionSkipReason::Sender)
                } else if mentioned.contains(&owner) {
                    Some(MentionSkipReason::Duplicate)
                } else {
                    match acl_for(&owner) {
                        None => Some(MentionSkipReason::NoAcl),
                        Some(acl) if !acl.covers(channel) => Some(MentionSkipReason::NotCovered),
                        Some(_) => None,
                    }
                };
                if let Some(reason) = reason {
                    decision.skipped_mentions.push(skip(reason));
                    continue;
                }
                mentioned.insert(owner.clone());
                decision.entries.push(Routed {
                    owner,
                    entry: Plane3Entry::live_mention(message.clone(), channel.clone(), seq),
                });
            }
        }
    }
    decision
}

#[cfg(test)]
pub(crate) mod tests;
