//! Fencing (G23): the token a writer carries, where a record stores the highest one that wrote
//! it, and how a write stamps it. The refusal of a writer below the stored fence is a step of
//! each plan in the parent module.

use crate::wire::json;
use crate::wire::records::MembershipRecord;
use serde_json::Value;
use std::fmt;

/// Extra field holding the highest fencing token that wrote the record (G23).
pub const FENCE_FIELD: &str = "fence";

/// The highest fencing token that wrote `rec` (0 for a record no fenced writer touched, such as
/// one written by a reference daemon).
pub fn stored_fence(rec: &MembershipRecord) -> FencingToken {
    match rec.extra.get(FENCE_FIELD) {
        Some(Value::Number(n)) => FencingToken(json::uint_from_number(n).unwrap_or(0)),
        _ => FencingToken(0),
    }
}

// ---------------------------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------------------------

/// A fencing token: the revision of the delivery lease key at the moment the writer **acquired**
/// it (the `create` revision, not a renewal's).
///
/// KV revisions of one bucket are the sequence numbers of its stream, so a successor's
/// acquisition always has a larger revision than its predecessor's.
///
/// # What it guarantees on NATS KV
///
/// - Every write stores `max(stored, token)` in the record's `"fence"` field, and every plan
///   refuses a writer whose token is below the stored one. Combined with the CAS against the
///   planned revision: once the successor has written a record, a deposed daemon can no longer
///   write it (either its plan is refused, or, if it planned before the successor's write, its
///   CAS fails and the re-plan is refused).
///
/// # What it does not guarantee
///
/// - NATS KV has no multi-key transaction, and the lease lives in another bucket, so the member
///   write cannot be conditioned on the lease. A deposed daemon can still write a record its
///   successor has not written yet (a join, a tombstone, an activation). The driver must
///   narrow that window: confirm its lease (read `lease.<i>`, same holder, revision not moved
///   except by its own renewals) before each registry write, stop writing at the first failed
///   renew, and treat a lease it cannot confirm as lost. The window left is the time between
///   that check and the write landing; a write that lands in it is still visible afterwards
///   (its `fence` is below the successor's token), so it can be detected and reported.
/// - A reference daemon writes no fence; a reference *fresh join* erases it (the field restarts at
///   0 and the next fenced writer stamps it again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fence {}", self.0)
    }
}

/// Who plans a write: the daemon id written as `writerIdentity`, and its fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Writer {
    /// The daemon id (`writerIdentity`).
    pub identity: String,
    /// The lease revision the daemon acquired.
    pub fence: FencingToken,
}

impl Writer {
    /// A writer.
    pub fn new(identity: impl Into<String>, fence: FencingToken) -> Self {
        Writer {
            identity: identity.into(),
            fence,
        }
    }
}

pub(super) fn stamp_fence(rec: &mut MembershipRecord, writer: &Writer) {
    let fence = stored_fence(rec).max(writer.fence);
    rec.extra.insert(FENCE_FIELD.into(), fence.0.into());
}
