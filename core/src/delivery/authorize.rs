//! The trusted reader's decision for one dinbox entry (semantics §2k, invariants I7, I8, I21;
//! gaps G2, G3, G4, G32).
//!
//! The reader runs in two pure steps around its reads:
//!
//! 1. [`decode_entry`] on the subject and payload: the owner and the entry, or a permanent
//!    [`Anomaly`] (terminate, G32; the reference acks).
//! 2. [`authorize`] with the owner's fresh ACL and, for a `durable-channel` entry, the fresh
//!    membership record of `(entry.channel, owner)`.
//!
//! After a failed DLV publish the reader asks [`after_transfer_failure`]; after a failed KV read
//! (the reference's hot nak loop, G4) it asks [`after_read_failure`]. Every path that stops
//! retrying ends in [`Decision::GiveUp`], which carries what the loss report needs (G3): it is
//! never a silent `term`.

use crate::acl::ReadAcl;
use crate::constants::{READER_MAX_REDELIVERIES, READER_NAK_DELAY, backoff};
use crate::registry::{Interval, IntervalLookup, lookup_generation};
use crate::time::Duration;
use crate::wire::json::{self, DecodeError};
use crate::wire::msgid::Plane3MsgId;
use crate::wire::records::{MembershipRecord, Plane3Entry, Plane3Reason};
use crate::wire::subject::parse_dinbox_owner;
use crate::wire::token::{AgentId, ConcreteChannel};
use bytes::Bytes;
use std::fmt;

/// The reader's decision for one delivery of a dinbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Publish the entry's `msg` to `cotal.<s>.dlv.<owner>` with this msg-id, then ack the
    /// dinbox entry once the publish is acknowledged.
    Transfer {
        /// `<msg.id>:<owner>:<entry.generation>`, the same id as the dinbox entry.
        msg_id: Plane3MsgId,
    },
    /// Ack without transferring: the owner may not (or may no longer) have this copy.
    Drop(DropReason),
    /// Nak with this delay: the answer may change (unknown owner, failed transfer or read).
    Defer {
        /// The nak delay.
        delay: Duration,
        /// Why.
        reason: RetryReason,
    },
    /// Stop retrying: terminate the entry **and report the loss** (G3).
    GiveUp(GiveUp),
    /// Terminate a permanently malformed entry (G32).
    Terminate(Anomaly),
}

/// Why an entry was dropped (acked without transfer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The owner's ACL is present but does not cover the channel (revoked or narrowed, `[]`).
    NotCovered,
    /// A `durable-channel` entry and no membership record.
    NoMembership,
    /// A record for another channel or owner was passed in: fail closed.
    RecordMismatch,
    /// The sequence lies outside the interval of the entry's generation.
    OutsideInterval(Interval),
    /// The entry's generation never routes (`live-confirmed` without a leave cursor, G26).
    InertGeneration {
        /// The generation.
        generation: u64,
    },
    /// The interval of the entry's generation fell off the record's history cap: a counted
    /// loss of a possibly valid copy (fail closed).
    IntervalForgotten {
        /// The generation.
        generation: u64,
    },
    /// The record knows nothing of the entry's generation (fail closed).
    UnknownGeneration {
        /// The generation.
        generation: u64,
    },
}

impl DropReason {
    /// True for the drop of a copy that may have been valid and is lost to the owner (count and
    /// report it), as opposed to a deliberate deny.
    pub fn is_loss(&self) -> bool {
        matches!(self, DropReason::IntervalForgotten { .. })
    }
}

/// Why the reader retries (or, at the ceiling, gives up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryReason {
    /// The owner has no read ACL on record: defer, never drop.
    UnknownOwner,
    /// The DLV publish failed (or its PubAck timed out).
    TransferFailed,
    /// A KV read (ACL or membership) failed.
    ReadFailed,
    /// A leave of the entry's `(owner, channel)` is writing its tombstone and the entry lies past
    /// the leave cursor it chose ([`hold_for_leave`]).
    LeaveInFlight,
}

/// A give-up at the redelivery ceiling: everything a loss report needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GiveUp {
    /// Why the retries failed.
    pub reason: RetryReason,
    /// The owner who loses the copy.
    pub owner: AgentId,
    /// The channel.
    pub channel: ConcreteChannel,
    /// The CHAT sequence.
    pub seq: u64,
    /// The entry's generation.
    pub generation: u64,
    /// The entry's reason.
    pub entry_reason: Plane3Reason,
    /// The copied message's id.
    pub message_id: String,
    /// The delivery count at which the reader gave up.
    pub deliveries: u64,
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (owner, n, ch, seq) = (&self.owner, self.deliveries, &self.channel, self.seq);
        match self.reason {
            RetryReason::UnknownOwner => write!(
                f,
                "plane-3 reader: gave up on entry for unknown owner {owner} after {n} redeliveries ({ch} seq {seq})"
            ),
            RetryReason::TransferFailed => write!(
                f,
                "plane-3 reader: gave up transferring {} for {owner} after {n} redeliveries ({ch} seq {seq})",
                self.message_id
            ),
            RetryReason::ReadFailed => write!(
                f,
                "plane-3 reader: gave up authorizing {} for {owner} after {n} failed reads ({ch} seq {seq})",
                self.message_id
            ),
            RetryReason::LeaveInFlight => write!(
                f,
                "plane-3 reader: gave up on {} for {owner} after {n} redeliveries while a leave of {ch} was in flight (seq {seq})",
                self.message_id
            ),
        }
    }
}

/// A permanently malformed dinbox delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Anomaly {
    /// The subject is not `cotal.<space>.dinbox.<owner>` with a valid owner token.
    MalformedSubject {
        /// The subject.
        subject: String,
    },
    /// The payload is not a `Plane3Entry`.
    Undecodable(DecodeError),
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::MalformedSubject { subject } => {
                write!(f, "plane-3 reader: not a dinbox subject: {subject}")
            }
            Anomaly::Undecodable(e) => write!(f, "plane-3 reader: undecodable entry: {e}"),
        }
    }
}

impl std::error::Error for Anomaly {}

/// Step 1: the owner from the subject and the entry from the payload.
///
/// # Errors
///
/// [`Anomaly::MalformedSubject`] or [`Anomaly::Undecodable`]: terminate the delivery.
pub fn decode_entry(subject: &str, payload: &[u8]) -> Result<(AgentId, Plane3Entry), Anomaly> {
    let owner = parse_dinbox_owner(subject).ok_or_else(|| Anomaly::MalformedSubject {
        subject: subject.to_owned(),
    })?;
    let entry = json::decode::<Plane3Entry>(payload).map_err(Anomaly::Undecodable)?;
    Ok((owner, entry))
}

/// The DLV payload of a transfer: the bare `msg`, as the reference stores it.
pub fn dlv_payload(entry: &Plane3Entry) -> Bytes {
    json::encode(&entry.msg)
}

fn at_ceiling(delivery_count: u64) -> bool {
    delivery_count >= READER_MAX_REDELIVERIES
}

fn give_up(entry: &Plane3Entry, owner: &AgentId, reason: RetryReason, n: u64) -> Decision {
    Decision::GiveUp(GiveUp {
        reason,
        owner: owner.clone(),
        channel: entry.channel.clone(),
        seq: entry.seq,
        generation: entry.generation,
        entry_reason: entry.reason,
        message_id: entry.msg.id.clone(),
        deliveries: n,
    })
}

/// The one read-access rule of the backstop: may a member holding `acl` have a copy of a message
/// on `channel`? The reader applies it before a transfer ([`authorize`]) and the DLV revocation
/// sweep applies it to copies already transferred ([`crate::delivery::revoke`]), so a narrowing
/// means the same thing on both sides of the hand-off.
pub fn acl_admits(acl: &ReadAcl, channel: &ConcreteChannel) -> bool {
    acl.covers(channel)
}

/// Step 2: the reader's re-authorization of `entry` for `owner` (`readerHandle` steps 3–6).
///
/// - `acl`: the owner's read ACL, read fresh; `None` when absent (an unknown owner).
/// - `record`: the membership record of `(entry.channel, owner)`, read fresh; only consulted for
///   a `durable-channel` entry.
/// - `delivery_count`: the JetStream delivery count, 1 on the first delivery.
///
/// In order: absent ACL → [`Decision::Defer`] for [`READER_NAK_DELAY`], or at
/// [`READER_MAX_REDELIVERIES`] a [`Decision::GiveUp`]; ACL not covering the channel → drop;
/// `durable-channel` → the record must exist and the interval of the **entry's** generation
/// (current or historical, G2) must contain `entry.seq`, else drop; `live-mention` → no
/// membership involved. Then transfer with the entry's msg-id.
pub fn authorize(
    entry: &Plane3Entry,
    owner: &AgentId,
    acl: Option<&ReadAcl>,
    record: Option<&MembershipRecord>,
    delivery_count: u64,
) -> Decision {
    let Some(acl) = acl else {
        return if at_ceiling(delivery_count) {
            give_up(entry, owner, RetryReason::UnknownOwner, delivery_count)
        } else {
            Decision::Defer {
                delay: READER_NAK_DELAY,
                reason: RetryReason::UnknownOwner,
            }
        };
    };
    if !acl_admits(acl, &entry.channel) {
        return Decision::Drop(DropReason::NotCovered);
    }
    if entry.reason == Plane3Reason::DurableChannel {
        let Some(rec) = record else {
            return Decision::Drop(DropReason::NoMembership);
        };
        if rec.channel != entry.channel || &rec.owner != owner {
            return Decision::Drop(DropReason::RecordMismatch);
        }
        let generation = entry.generation;
        let interval = match lookup_generation(rec, generation) {
            IntervalLookup::Current(i) | IntervalLookup::Historical(i) => i,
            IntervalLookup::Inert => {
                return Decision::Drop(DropReason::InertGeneration { generation });
            }
            IntervalLookup::Forgotten => {
                return Decision::Drop(DropReason::IntervalForgotten { generation });
            }
            _ => return Decision::Drop(DropReason::UnknownGeneration { generation }),
        };
        if !interval.contains(entry.seq) {
            return Decision::Drop(DropReason::OutsideInterval(interval));
        }
    }
    Decision::Transfer {
        msg_id: Plane3MsgId::for_entry(entry, owner),
    }
}

/// Step 2b: the hold for a leave in flight, applied to an entry [`authorize`] would transfer.
///
/// A leave chooses its leave cursor from the CHAT frontier it reads (`leave_frontier`), then
/// tombstones the record by compare-and-set. Until that write's outcome is known, the reader's
/// view still holds the open interval, so a `durable-channel` entry of the same
/// `(owner, channel)` with `seq > leave_frontier` would reach the owner's store past its leave
/// (seed 4363 of the 10,000-seed exploration: the tombstone lost a CAS race and was re-planned
/// while the reader transferred such an entry). It is deferred instead: once the tombstone is
/// confirmed, its redelivery is dropped as outside the interval; if the leave fails, it is
/// transferred. An entry at or below the frontier lies inside the interval either way, and one
/// the reader sees before the leave read its frontier is at or below that frontier (it was in
/// CHAT already). At the redelivery ceiling the entry is given up, reported (G3).
///
/// `leave_frontier`: the frontier read by a running leave of the entry's `(owner, channel)`,
/// `None` when no leave is running or it has not read one yet. Returns `None` when nothing is held.
pub fn hold_for_leave(
    entry: &Plane3Entry,
    owner: &AgentId,
    leave_frontier: Option<u64>,
    delivery_count: u64,
) -> Option<Decision> {
    let frontier = leave_frontier?;
    if entry.reason != Plane3Reason::DurableChannel || entry.seq <= frontier {
        return None;
    }
    Some(if at_ceiling(delivery_count) {
        give_up(entry, owner, RetryReason::LeaveInFlight, delivery_count)
    } else {
        Decision::Defer {
            delay: READER_NAK_DELAY,
            reason: RetryReason::LeaveInFlight,
        }
    })
}

/// The decision after the DLV publish of a [`Decision::Transfer`] failed (or timed out):
/// defer for [`READER_NAK_DELAY`], or give up at the ceiling (reported, G3).
pub fn after_transfer_failure(
    entry: &Plane3Entry,
    owner: &AgentId,
    delivery_count: u64,
) -> Decision {
    if at_ceiling(delivery_count) {
        give_up(entry, owner, RetryReason::TransferFailed, delivery_count)
    } else {
        Decision::Defer {
            delay: READER_NAK_DELAY,
            reason: RetryReason::TransferFailed,
        }
    }
}

/// The decision after a KV read the reader needed (ACL or membership) failed: the G4 fix.
///
/// The reference naks at once with no ceiling (a hot loop). Here the delay backs off
/// exponentially with the delivery count (`min(30 s, 1 s · 2^(n−1))`) and the failures count
/// against the same ceiling, ending in a reported [`Decision::GiveUp`].
pub fn after_read_failure(entry: &Plane3Entry, owner: &AgentId, delivery_count: u64) -> Decision {
    if at_ceiling(delivery_count) {
        give_up(entry, owner, RetryReason::ReadFailed, delivery_count)
    } else {
        let attempt = u32::try_from(delivery_count.saturating_sub(1)).unwrap_or(u32::MAX);
        Decision::Defer {
            delay: backoff(attempt),
            reason: RetryReason::ReadFailed,
        }
    }
}

#[cfg(test)]
mod tests;
