//! The daemon's internal state types: pending operations, timers, jobs, batches.

use super::events::Feed;
use crate::delivery::control::{SerialKey, Work};
use crate::io::Reply;
use crate::op::{OpId, Outcome};
use crate::registry::{MemberSnapshot, WatermarkUse, WriteIntent};
use crate::wire::token::{AgentId, ConcreteChannel};
use std::collections::{BTreeMap, VecDeque};

pub(super) type JobId = u64;
pub(super) type BatchId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeaseOpKind {
    Create,
    Update,
    Delete,
    Get,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum JobOp {
    Acl,
    Frontier,
    Member,
    Write(Box<WriteIntent>),
    Fence,
    Read,
    Publish {
        seq: u64,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
        attempt: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    Lease {
        lease_op: OpId,
        kind: LeaseOpKind,
    },
    Sweep,
    /// A `STREAM.INFO` of the consumer-headroom check, of this stream.
    Headroom(String),
    /// The `STREAM.INFO` of the lease bucket read before an acquisition (its TTL).
    LeaseTtl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Timer {
    Reopen(Feed),
    GapCheck,
    /// While fan-out holds copies: reread the reader consumer's total (a hold may rest on an
    /// over-count) and give up holds older than [`FANOUT_HOLD_LIMIT`](super::FANOUT_HOLD_LIMIT).
    HeldCopies,
    /// Look for orphaned memberships ([`ORPHAN_SCAN_INTERVAL`](crate::constants::ORPHAN_SCAN_INTERVAL)).
    OrphanScan,
    /// Read the consumer headroom of CHAT and DLV
    /// ([`CONSUMER_HEADROOM_INTERVAL`](crate::constants::CONSUMER_HEADROOM_INTERVAL)).
    HeadroomCheck,
    /// Start a new incarnation with a fresh lease ([`DeliveryConfig::reacquire_lease`](super::DeliveryConfig::reacquire_lease)).
    Reacquire,
    /// Read the lease bucket's TTL again (the last read failed, or the TTL was unusable).
    LeaseTtlRead,
    /// Look at the fan-out consumer for deliveries stranded without a bind.
    StrandCheck,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum JoinPhase {
    ReadAcl,
    ReadFrontier,
    ReadMember,
    Commit,
    ReadFence,
    CatchUp,
    WaitLane,
    ReadForFinish,
    WriteFinish,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct JoinJob {
    pub(super) watermark: Option<u64>,
    pub(super) phase: JoinPhase,
    pub(super) attempts: u32,
    pub(super) frontier: u64,
    pub(super) generation: u64,
    pub(super) join_cursor: u64,
    pub(super) watermark_use: Option<WatermarkUse>,
    pub(super) fence: u64,
    pub(super) stream_first: u64,
    pub(super) next_start: u64,
    pub(super) exhausted: bool,
    pub(super) outstanding: usize,
    pub(super) copied: u64,
    /// Per sender subject of the channel: (messages in the window, first sequence seen).
    pub(super) subjects: BTreeMap<String, (u64, u64)>,
    pub(super) evicted: Option<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeavePhase {
    ReadMember,
    ReadFrontier,
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LeaveJob {
    pub(super) generation: u64,
    pub(super) phase: LeavePhase,
    pub(super) attempts: u32,
    pub(super) snapshot: Option<MemberSnapshot>,
    pub(super) frontier: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum JobKind {
    Join(Box<JoinJob>),
    Leave(Box<LeaveJob>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Job {
    pub(super) key: SerialKey,
    pub(super) owner: AgentId,
    pub(super) channel: ConcreteChannel,
    pub(super) reply_to: String,
    pub(super) kind: JobKind,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Lane {
    pub(super) active: Option<JobId>,
    pub(super) catching_up: Option<JobId>,
    pub(super) finish_waiting: bool,
    pub(super) queue: VecDeque<Work>,
}

/// What a failed, unknown or unexpected outcome says, for an event or an error reply.
pub(super) fn outcome_detail(outcome: &Outcome<Reply>) -> String {
    match outcome {
        Outcome::Failed(f) => f.to_string(),
        Outcome::Unknown => "outcome unknown".into(),
        Outcome::Success(r) => format!("unexpected reply {r:?}"),
    }
}
