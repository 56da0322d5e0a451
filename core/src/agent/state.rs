//! The parent's internal vocabulary: the operations the parent itself has in flight
//! ([`Pending`]), every timer's name ([`Timer`], which orders the parent's and the children's
//! deadlines alike), the parent's feeds, and the decoders of the daemon's control replies. It imports neither the parent nor a child, only the shared
//! [`super::ctx`] and [`super::types`].

use super::ctx::Direct;
use super::types::LeaveError;
use crate::io::Reply;
use crate::op::Outcome;
use crate::wire::control::{ControlReply, DurableJoinReply, ListMembershipsReply};
use crate::wire::json;
use crate::wire::token::Channel;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    ListForLeave { channel: Channel },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    Heartbeat,
    /// Read our loss record again.
    Losses,
    DlvBind,
    DirectBind(Direct),
    RegistryWatch,
    Reconcile(u64),
    Close(u64),
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Feed {
    Chat(u64),
}

pub(super) fn control_reply(outcome: Outcome<Reply>) -> Result<ControlReply, String> {
    match outcome {
        Outcome::Success(Reply::Response(r)) => {
            let reply: ControlReply =
                json::decode(&r.payload).map_err(|e| format!("malformed reply: {e}"))?;
            if reply.ok {
                Ok(reply)
            } else {
                Err(reply.error.unwrap_or_else(|| "request rejected".to_owned()))
            }
        }
        Outcome::Success(other) => Err(format!("unexpected reply {other:?}")),
        Outcome::Failed(f) => Err(f.to_string()),
        Outcome::Unknown => Err(OUTCOME_UNKNOWN.into()),
    }
}

/// The error text of a control request whose outcome is unknown.
pub(super) const OUTCOME_UNKNOWN: &str = "outcome unknown";

pub(super) fn decode_join_reply(outcome: Outcome<Reply>) -> Result<DurableJoinReply, String> {
    let reply = control_reply(outcome)?;
    reply
        .data_as::<DurableJoinReply>()
        .map_err(|e| format!("malformed durableJoin reply: {e}"))?
        .ok_or_else(|| "durableJoin reply without data".to_owned())
}

pub(super) fn decode_list_reply(outcome: Outcome<Reply>) -> Result<ListMembershipsReply, String> {
    let reply = control_reply(outcome)?;
    reply
        .data_as::<ListMembershipsReply>()
        .map_err(|e| format!("malformed listMemberships reply: {e}"))?
        .ok_or_else(|| "listMemberships reply without data".to_owned())
}

pub(super) fn decode_leave_reply(outcome: Outcome<Reply>) -> Result<(), (LeaveError, String)> {
    let unknown = matches!(outcome, Outcome::Unknown);
    match control_reply(outcome) {
        Ok(_) => Ok(()),
        Err(detail) if unknown => Err((LeaveError::TombstoneUnknown, detail)),
        Err(detail) => Err((
            LeaveError::TombstoneFailed {
                detail: detail.clone(),
            },
            detail,
        )),
    }
}
