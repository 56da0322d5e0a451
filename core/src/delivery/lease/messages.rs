//! What the [`Lease`](super::Lease) machine exchanges with its driver: the KV commands it issues
//! and the replies that complete them, the events it reports, its observable state and timers,
//! and the errors of its API.

use crate::op::{Failure, OpId};
use crate::registry::FencingToken;
use crate::wire::keys::KvBucket;
use crate::wire::records::DeliveryLease;
use std::fmt;

/// One KV effect on the lease key. Every command carries an [`OpId`] to answer with
/// [`Lease::handle_completion`](super::Lease::handle_completion); all of them target
/// [`KvBucket::Delivery`] ([`LeaseCommand::bucket`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseCommand {
    /// Create-only put (`kv.create`); answer [`LeaseReply::Written`] or
    /// [`Failure::AlreadyExists`]. A create over a DEL/PURGE marker succeeds.
    Create {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
        /// The record to write (`ready:false`).
        value: DeliveryLease,
    },
    /// Compare-and-set put (`kv.update`); answer [`LeaseReply::Written`] or
    /// [`Failure::WrongLastRevision`] / [`Failure::NotFound`].
    Update {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
        /// The record to write.
        value: DeliveryLease,
        /// The revision the key must still have.
        expected_revision: u64,
    },
    /// Compare-and-set delete (`kv.delete` with `previousSeq`); answer [`LeaseReply::Deleted`]
    /// or [`Failure::WrongLastRevision`] / [`Failure::NotFound`].
    Delete {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
        /// The revision the key must still have: always our last confirmed revision.
        expected_revision: u64,
    },
    /// Read the key (`kv.get`); answer [`LeaseReply::Entry`].
    Get {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
    },
}

impl LeaseCommand {
    /// The command's operation id.
    pub fn op(&self) -> OpId {
        match self {
            LeaseCommand::Create { op, .. }
            | LeaseCommand::Update { op, .. }
            | LeaseCommand::Delete { op, .. }
            | LeaseCommand::Get { op, .. } => *op,
        }
    }

    /// The key the command touches.
    pub fn key(&self) -> &str {
        match self {
            LeaseCommand::Create { key, .. }
            | LeaseCommand::Update { key, .. }
            | LeaseCommand::Delete { key, .. }
            | LeaseCommand::Get { key, .. } => key,
        }
    }

    /// The bucket every lease command targets: `cotal_delivery_<space>`.
    pub const fn bucket(&self) -> KvBucket {
        KvBucket::Delivery
    }
}

/// A lease record as read, with its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    /// The key's revision (the stream sequence of the stored write).
    pub revision: u64,
    /// The decoded record; `None` when the bytes did not decode ([`DeliveryLease::from_kv`]).
    pub record: Option<DeliveryLease>,
}

/// The result of a successful lease command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseReply {
    /// A create or update was stored at this revision.
    Written {
        /// The new revision.
        revision: u64,
    },
    /// The delete was stored.
    Deleted,
    /// The read's result: `None` for an absent key or a DEL/PURGE marker.
    Entry(Option<LeaseEntry>),
}

/// Driver misuse (R17a); the machine's state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseUsageError {
    /// The completion names no command in flight.
    UnknownOp(OpId),
    /// The reply does not fit the command (e.g. `Deleted` for a create).
    ReplyMismatch(OpId),
    /// `acquire` on a machine that already started.
    AlreadyStarted,
    /// `mark_ready` while the lease is not held.
    NotHeld,
}

impl fmt::Display for LeaseUsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseUsageError::UnknownOp(op) => write!(f, "no lease command {op} is in flight"),
            LeaseUsageError::ReplyMismatch(op) => {
                write!(f, "the reply to {op} does not fit its command")
            }
            LeaseUsageError::AlreadyStarted => write!(f, "the lease machine already started"),
            LeaseUsageError::NotHeld => write!(f, "the lease is not held"),
        }
    }
}

impl std::error::Error for LeaseUsageError {}

/// Why the lease is no longer ours.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// A CAS found another revision: someone else wrote the key.
    Superseded,
    /// The key is gone (expired or deleted).
    Expired,
    /// A read shows another holder, another acquisition, or nothing.
    TakenOver {
        /// The holder read, if any.
        holder: Option<String>,
    },
    /// No write was confirmed before our own deadline (`last confirmed write + TTL − margin`).
    DeadlinePassed,
    /// The broker refused our write outright (permissions, a rejection).
    Refused(Failure),
}

/// Why acquisition ended without the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcquireFailure {
    /// The key was held for the whole acquisition window.
    Contended {
        /// The last holder read, if any read succeeded.
        holder: Option<String>,
    },
    /// The broker refused the create outright (permissions, a rejection).
    Refused(Failure),
    /// [`MAX_ACQUIRE_ATTEMPTS`](super::MAX_ACQUIRE_ATTEMPTS) creates were made.
    AttemptsExhausted,
    /// [`Lease::release`](super::Lease::release) was asked before the lease was acquired.
    Cancelled,
}

/// Why a release did not delete the key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseSkipReason {
    /// We held nothing to release (never acquired, already lost or released).
    NotHeld,
    /// The key has another revision: a successor's lease, which is left alone.
    Superseded,
    /// The delete failed, or its outcome and the re-read both failed; the TTL removes our write.
    Unconfirmed,
}

/// A fact for the daemon. Every state change emits one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// The create landed: the lease is ours, not yet ready. Bind Plane-3, then `mark_ready`.
    Acquired {
        /// The create's revision: the fencing token for registry writes.
        token: FencingToken,
    },
    /// The acquisition wrote over our own earlier hold's record ([`Lease::reclaim`](super::Lease::reclaim)),
    /// which had not expired yet. [`LeaseEvent::Acquired`] follows at once.
    Reclaimed {
        /// The revision of the record written over.
        over_revision: u64,
    },
    /// The lease reads `ready:true` (the ready flip, or a renewal that carried it, landed).
    Ready,
    /// A renewal landed.
    Renewed {
        /// The new revision.
        revision: u64,
    },
    /// The key is held by someone else; acquisition retries.
    Contended {
        /// The holder read (`None` when the read found nothing or failed).
        holder: Option<String>,
    },
    /// Acquisition gave up.
    AcquireFailed {
        /// Why.
        reason: AcquireFailure,
    },
    /// The lease is no longer ours: stop every fenced write at once.
    Lost {
        /// Why.
        reason: LostReason,
    },
    /// Our lease was deleted.
    Released,
    /// A release did not delete the key.
    ReleaseSkipped {
        /// Why.
        reason: ReleaseSkipReason,
    },
}

/// Where the machine is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseState {
    /// Created; [`Lease::acquire`](super::Lease::acquire) not called yet.
    Idle,
    /// Creating, reading the holder, or waiting to retry.
    Acquiring,
    /// Ours, `ready:false`.
    Held,
    /// Ours, `ready:true`.
    Ready,
    /// A release was asked; the delete is pending or in flight.
    Releasing,
    /// Terminal: lost (see [`LeaseEvent::Lost`]).
    Lost,
    /// Terminal: released (deleted or skipped).
    Released,
    /// Terminal: acquisition gave up.
    NotAcquired,
}

/// Why the machine wants to wake up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum LeaseTimer {
    /// Retry a contended or failed create.
    AcquireRetry,
    /// Renew (or re-read after an unknown renewal).
    Renew,
    /// Our own deadline: the fencing token is withdrawn here unless a write is confirmed.
    Deadline,
}
