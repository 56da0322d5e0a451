//! What the [`Ledger`](super::Ledger) answers: the decision for each copy it is handed, the
//! settlements it asks its parent to carry out, what it surfaces to the application, its
//! counters, and the errors of misuse (R17a).

use super::identity::{DeliveryId, MessageId, SourceKind};
use crate::time::Duration;
use serde::{Deserialize, Serialize};
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Decisions
// ---------------------------------------------------------------------------------------------

/// What to do with one durable delivery. Each delivery handed to the ledger is resolved by exactly
/// one of these, once, unless it is still held by a pending entry (R16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// Acknowledge: the message is settled, or a duplicate of a settled or superseding copy.
    Ack,
    /// Negative-acknowledge with a redelivery delay: deferred, not lost.
    Nak {
        /// How long JetStream should wait before redelivering.
        delay: Duration,
    },
    /// Terminate: a permanent anomaly, never to be redelivered (G32).
    Term,
    /// Send nothing and drop the mapping: a fresher delivery of the same (or possibly the same)
    /// stream message replaced this one, and any ack or nak of it would act on that one too.
    Forget,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Ack => f.write_str("ack"),
            Action::Nak { delay } => write!(f, "nak({delay})"),
            Action::Term => f.write_str("term"),
            Action::Forget => f.write_str("forget"),
        }
    }
}

/// One instruction for the driver: resolve `delivery` by `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "a durable delivery must be acked, nakked, termed or forgotten"]
pub struct Resolution {
    /// The delivery to resolve.
    pub delivery: DeliveryId,
    /// How to resolve it.
    pub action: Action,
}

impl Resolution {
    pub(super) fn new(delivery: DeliveryId, action: Action) -> Self {
        Resolution { delivery, action }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.delivery)
    }
}

/// The outcome of [`Ledger::ingest`](super::Ledger::ingest) for one copy. Carries at most one
/// [`Resolution`]; take it with [`Decision::resolution`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a decision may carry a resolution the driver must execute"]
#[non_exhaustive]
pub enum Decision {
    /// A new id: the copy is pending and will be returned by
    /// [`Ledger::surface`](super::Ledger::surface).
    Buffered,
    /// A new id admitted to a full inbox by deferring the newest queued entry that holds a durable
    /// handle: that entry is dropped unsurfaced and its delivery nakked, so JetStream brings it
    /// back later. The copy admitted is a live or backfill copy (the victim is a first delivery
    /// when one is queued, else any), or a redelivered durable copy (the victim is a first
    /// delivery only).
    BufferedDisplacing {
        /// The id whose queued entry was deferred.
        displaced: MessageId,
        /// The nak of its durable delivery.
        nak: Resolution,
    },
    /// A live or backfill copy of a pending id: dropped, the pending entry is unchanged.
    DuplicateDropped,
    /// A durable copy of a pending id whose entry held no durable handle: it now holds this one.
    HandleUpgraded,
    /// A durable copy of a pending id that already held a durable handle: the entry now holds this
    /// fresher one; the superseded delivery is acked (a distinct stream message) or forgotten.
    HandleReplaced {
        /// What to do with the superseded delivery.
        superseded: Resolution,
    },
    /// A copy of an id already settled (within the horizon): dropped; acked if durable.
    SettledDuplicate {
        /// The ack of the copy, if it was durable.
        ack: Option<Resolution>,
    },
    /// A durable copy of a new id refused because the inbox is full: nakked, redelivered later.
    OverflowDeferred {
        /// The nak of the copy.
        nak: Resolution,
    },
    /// A live or backfill copy of a new id refused because the inbox is full and nothing could be
    /// deferred in its place: this copy is lost (G31; counted).
    OverflowLost,
}

impl Decision {
    /// The one delivery this decision resolves, if any.
    pub fn resolution(&self) -> Option<Resolution> {
        match self {
            Decision::BufferedDisplacing { nak, .. } => Some(*nak),
            Decision::HandleReplaced { superseded } => Some(*superseded),
            Decision::SettledDuplicate { ack } => *ack,
            Decision::OverflowDeferred { nak } => Some(*nak),
            Decision::Buffered
            | Decision::DuplicateDropped
            | Decision::HandleUpgraded
            | Decision::OverflowLost => None,
        }
    }

    /// Whether the copy became a pending entry.
    pub fn is_buffered(&self) -> bool {
        matches!(
            self,
            Decision::Buffered | Decision::BufferedDisplacing { .. }
        )
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Buffered => f.write_str("buffered"),
            Decision::BufferedDisplacing { displaced, nak } => {
                write!(f, "buffered, displacing {displaced}: {nak}")
            }
            Decision::DuplicateDropped => f.write_str("duplicate dropped"),
            Decision::HandleUpgraded => f.write_str("handle upgraded"),
            Decision::HandleReplaced { superseded } => {
                write!(f, "handle replaced: {superseded}")
            }
            Decision::SettledDuplicate { ack: Some(ack) } => {
                write!(f, "settled duplicate: {ack}")
            }
            Decision::SettledDuplicate { ack: None } => f.write_str("settled duplicate dropped"),
            Decision::OverflowDeferred { nak } => write!(f, "overflow deferred: {nak}"),
            Decision::OverflowLost => f.write_str("overflow LOST"),
        }
    }
}

/// How an id was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Settlement {
    /// The application handled the surfaced item.
    Handled,
    /// The application deliberately declined it (mute, focus, or any other policy of its own).
    Declined,
}

impl fmt::Display for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Settlement::Handled => "handled",
            Settlement::Declined => "declined",
        })
    }
}

/// The outcome of [`Ledger::handled`](super::Ledger::handled) or
/// [`Ledger::decline`](super::Ledger::decline).
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a settlement may carry an ack the driver must send"]
pub struct Settled {
    /// The settled id, now in the horizon. A host persisting the horizon appends it to its journal
    /// before sending `ack`.
    pub id: MessageId,
    /// How it was settled.
    pub settlement: Settlement,
    /// The ack of the durable delivery the entry held, if any.
    pub ack: Option<Resolution>,
    /// The oldest settled id, forgotten to make room: a later copy of it would surface again.
    pub evicted: Option<MessageId>,
}

/// Why the parent refuses a copy before it reaches dedup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// The payload does not decode (bad JSON, missing id): a permanent anomaly.
    Malformed,
    /// The payload's `from` does not match the subject's sender: a permanent anomaly.
    Spoofed,
    /// The parent's own message coming back: not an anomaly, acked silently as the reference does.
    OwnEcho,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Malformed => "malformed",
            Rejection::Spoofed => "spoofed",
            Rejection::OwnEcho => "own echo",
        })
    }
}

/// A pending item handed to the application by [`Ledger::surface`](super::Ledger::surface).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Surfaced<T> {
    /// Its id; report it to [`Ledger::handled`](super::Ledger::handled) or
    /// [`Ledger::decline`](super::Ledger::decline) when done.
    pub id: MessageId,
    /// The item the first copy carried.
    pub item: T,
    /// The source of the first copy.
    pub origin: SourceKind,
    /// Whether the entry holds a durable handle at the time of surfacing.
    pub durable: bool,
}

/// Monotone counters for health and tests; all saturate instead of overflowing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LedgerCounters {
    /// Copies given to [`Ledger::ingest`](super::Ledger::ingest) (misuse errors excluded).
    pub copies_ingested: u64,
    /// Durable copies with a delivery count above 1.
    pub durable_redeliveries: u64,
    /// New ids that became pending.
    pub buffered: u64,
    /// Live or backfill copies of a pending id, dropped.
    pub duplicates_dropped: u64,
    /// Pending entries that gained their first durable handle.
    pub handles_upgraded: u64,
    /// Superseded durable deliveries acked (distinct stream messages).
    pub superseded_acked: u64,
    /// Superseded durable deliveries forgotten (same or unknown stream message).
    pub superseded_forgotten: u64,
    /// Durable copies of settled ids, acked and dropped.
    pub settled_duplicates_acked: u64,
    /// Live or backfill copies of settled ids, dropped.
    pub settled_duplicates_dropped: u64,
    /// Items handed to the application.
    pub surfaced: u64,
    /// Ids settled as handled.
    pub handled: u64,
    /// Ids settled as declined.
    pub declined: u64,
    /// Durable copies refused by a full inbox and nakked (deferred, not lost).
    pub overflow_deferred: u64,
    /// Queued durable entries displaced by a live copy and nakked (deferred, not lost).
    pub overflow_displaced: u64,
    /// Live or backfill copies refused by a full inbox (lost).
    pub overflow_lost: u64,
    /// Settled ids forgotten by the horizon, including those cut from a restored snapshot.
    pub horizon_evicted: u64,
    /// Durable anomalies terminated.
    pub anomalies_terminated: u64,
    /// Live or backfill anomalies dropped.
    pub anomalies_dropped: u64,
    /// Own echoes (acked if durable).
    pub own_echoes: u64,
    /// Inputs whose `now` was earlier than a previous one.
    pub clock_regressions: u64,
}
