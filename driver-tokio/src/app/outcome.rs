//! The outcomes and errors of an agent's requests.

use cotal_core::agent::{AgentError, JoinError as CoreJoinError, LeaveError as CoreLeaveError};
use std::time::Duration;

/// A join that did not happen, or whose outcome is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Bad input: not a channel name. Nothing changed.
    #[error("invalid channel '{channel}': {reason}")]
    InvalidChannel {
        /// The name given.
        channel: String,
        /// Why it is refused.
        reason: String,
    },
    /// The agent refused it at once (not ready, a join or leave of it in progress, stopped).
    /// Nothing changed; [`AgentError::NotReady`] is worth a retry shortly.
    #[error("{0}")]
    Refused(AgentError),
    /// The join failed (refused by the broker's ACL, or not confirmed); nothing of it is left
    /// behind.
    #[error("{0}")]
    Failed(CoreJoinError),
    /// No outcome within the request timeout: the join may still complete (see
    /// [`Agent::health`](super::Agent::health) and the [`AgentEvent::Joined`](cotal_core::agent::AgentEvent::Joined) event).
    #[error("join outcome unknown: {detail}")]
    Unknown {
        /// Why.
        detail: String,
    },
    /// The agent is closed or gone.
    #[error("the agent is closed")]
    Closed,
}

/// How a leave ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Left {
    /// The membership generation tombstoned, if the channel had a durable membership.
    pub tombstoned: Option<u64>,
}

/// A leave that did not happen, or whose outcome is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// Bad input: not a channel name. Nothing changed.
    #[error("invalid channel '{channel}': {reason}")]
    InvalidChannel {
        /// The name given.
        channel: String,
        /// Why it is refused.
        reason: String,
    },
    /// Refused at once (not joined, busy, not ready, stopped); nothing changed.
    #[error("{0}")]
    Refused(AgentError),
    /// The leave failed; the channel stays joined (retry).
    #[error("{0}")]
    Failed(CoreLeaveError),
    /// The tombstone's outcome is unknown, or no outcome came within the request timeout.
    #[error("leave outcome unknown: {detail}")]
    Unknown {
        /// Why.
        detail: String,
    },
    /// The agent is closed or gone.
    #[error("the agent is closed")]
    Closed,
}

/// A send the stream stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The message id (its `Nats-Msg-Id`).
    pub id: String,
    /// Its stream sequence (CHAT for a post, DM for a unicast, TASK for an anycast).
    pub seq: u64,
    /// The stream had it already (a resend of an id it holds).
    pub duplicate: bool,
}

/// A send that did not happen, or whose outcome is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Bad input: not a valid channel, agent id or role. Nothing was sent.
    #[error("invalid {what} '{value}': {reason}")]
    Invalid {
        /// What the value names.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// Refused at once (not connected, a wildcard channel, stopped). Nothing was sent.
    #[error("{0}")]
    Refused(AgentError),
    /// The stream refused it: not stored.
    #[error("send {id} failed: {detail}")]
    Failed {
        /// The message id.
        id: String,
        /// Why.
        detail: String,
    },
    /// Stored or not, nobody knows (timeout, connection lost). Send it again with
    /// [`Agent::resend`](super::Agent::resend) and this id: stored once either way (a plain
    /// send again would post it twice).
    #[error("send {id} outcome unknown: {detail}")]
    Unknown {
        /// The message id.
        id: String,
        /// Why.
        detail: String,
    },
    /// The agent is closed or gone.
    #[error("the agent is closed")]
    Closed,
}

/// A message could not be reported handled or declined.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The agent refused it: the message is not pending (already handled or declined).
    #[error("{0}")]
    Refused(AgentError),
    /// The agent is closed or gone.
    #[error("the agent is closed")]
    Closed,
}

/// The agent is closed or gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the agent is closed")]
pub struct AgentClosed;

/// [`Agent::close`](super::Agent::close) did not see the agent end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// The agent's task did not end within the grace and a margin.
    #[error("the agent did not stop within {0:?}")]
    Timeout(Duration),
    /// The agent's task ended without its machine (it panicked): no final health.
    #[error("the agent's task failed")]
    Lost,
}
