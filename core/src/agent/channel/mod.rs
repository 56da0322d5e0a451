//! One joined (or joining) channel's machine: [`ChannelMachine`], one per entry of the parent's
//! channel map (keyed by [`Channel`], possibly a wildcard).
//!
//! - **Owns:** the join's phase and attempt (epoch), the live subscription, the armed watermark
//!   `F`, a refusal seen during the confirm window, the join in progress and its report, whether
//!   a re-subscribe is being confirmed, the durable backstop's state as the channel shows it, a
//!   leave in progress, the backfill's next page, and its own ops in flight (the frontier read,
//!   the subscribe and the barriers, keyed by [`OpId`] with the attempt each belongs to).
//! - **Issues:** `StreamInfo`, `Subscribe`, `Barrier`, a leave's `listMemberships`, and
//!   `Unsubscribe` when a join fails, a leave finishes or a refusal drops the channel.
//! - **Routed to it:** the completions of its ops ([`ChannelMachine::owns`]).
//! - **Returns to the parent** what other parts must do ([`JoinStep`]): register the new
//!   subscription as a feed, undo a failed join, start the post-commit steps, or treat a refusal
//!   of a re-subscribe as a late refusal. The post-commit plan ([`join::PostCommit`]) names the durable
//!   join to request (the parent hands it to the membership book, which sends it and decides on
//!   its answer) and the first
//!   backfill page to read (the parent hands it to the history reader).
//!
//! The machine never reads the membership book, the registry or a sibling: the parent passes
//! what it needs (the channel's policy, a membership it may adopt) as arguments. The join's
//! protocol, step by step, is in `join.rs`; the channel's side of the leave, the late refusal
//! and a connection loss in `leave.rs`; what the parent may ask or tell it about its state (its
//! fields are private to this module) in `backstop.rs`.

use super::ctx::Ctx;
use super::types::{AgentEvent, BackstopState, JoinError, JoinReport, RequestId};
use crate::io::{Command, SubId};
use crate::op::OpId;
use crate::wire::config::SpaceStream;
use crate::wire::subject::chat_subscribe_pattern;
use crate::wire::token::Channel;
use std::collections::BTreeMap;

mod backstop;
pub(super) mod join;
pub(super) mod leave;

/// Where a join stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Arming,
    Subscribing,
    Confirming,
    Joined,
}

/// A join in progress (until it is reported).
#[derive(Clone, Debug, PartialEq, Eq)]
struct JoinProgress {
    request: Option<RequestId>,
    /// Decided after the commit, once the registry is loaded.
    started: bool,
    backfill_pending: bool,
    durable_pending: bool,
    report: JoinReport,
}

/// What one of the machine's ops is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChannelOp {
    /// The CHAT frontier read that arms the watermark.
    Arm,
    /// The live subscription.
    Subscribe,
    /// The server round trip that confirms it.
    Barrier,
    /// A leave's `listMemberships` (its answer is routed by channel name, also after the
    /// machine is dropped: the parent keeps it then).
    ListForLeave,
}

/// One channel's join state (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ChannelMachine {
    channel: Channel,
    phase: Phase,
    /// Distinguishes this subscribe attempt from earlier ones (stale completions are ignored).
    epoch: u64,
    sub: Option<SubId>,
    watermark: Option<u64>,
    refused: Option<String>,
    /// A join (or re-confirm after reconnect) in progress.
    join: Option<JoinProgress>,
    /// Whether a re-subscribe after reconnect is being confirmed (no report).
    resubscribe: bool,
    backstop: BackstopState,
    /// A leave in progress.
    leave: Option<RequestId>,
    /// A backfill page read in flight.
    backfill_next: Option<u64>,
    /// Its ops in flight, with the attempt (epoch) each was issued in.
    ops: BTreeMap<OpId, (ChannelOp, u64)>,
}

impl ChannelMachine {
    /// A new join of `channel` in attempt `epoch`: arms the watermark (step 1).
    pub(super) fn start(
        cx: &mut Ctx,
        channel: Channel,
        epoch: u64,
        request: Option<RequestId>,
    ) -> Self {
        let mut machine = ChannelMachine {
            channel,
            phase: Phase::Arming,
            epoch,
            sub: None,
            watermark: None,
            refused: None,
            join: Some(JoinProgress {
                request,
                started: false,
                backfill_pending: false,
                durable_pending: false,
                report: JoinReport {
                    joined: true,
                    watermark: None,
                    backfilled: 0,
                    durable: false,
                    generation: None,
                    cursor_honoured: None,
                    reason: None,
                },
            }),
            resubscribe: false,
            backstop: BackstopState::Pending,
            leave: None,
            backfill_next: None,
            ops: BTreeMap::new(),
        };
        let op = machine.op(cx, ChannelOp::Arm);
        cx.commands.push_back(Command::StreamInfo {
            op,
            stream: SpaceStream::Chat.name(&cx.config.space),
        });
        machine
    }

    /// Whether `op` is one of this machine's ops in flight.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.ops.contains_key(&op)
    }

    /// Its ops in flight (the parent retires them when it drops the machine: their late
    /// completions are ignored).
    pub(super) fn ops(&self) -> impl Iterator<Item = (OpId, ChannelOp)> + '_ {
        self.ops.iter().map(|(op, (kind, _))| (*op, *kind))
    }

    fn op(&mut self, cx: &mut Ctx, kind: ChannelOp) -> OpId {
        let op = cx.ops.next_id();
        self.ops.insert(op, (kind, self.epoch));
        op
    }

    /// Subscribes live and confirms (steps 2 and 3). Returns the new subscription, which the
    /// parent registers as the channel's feed.
    pub(super) fn subscribe(&mut self, cx: &mut Ctx) -> SubId {
        let sub = cx.subs.next_id();
        let subject = chat_subscribe_pattern(&cx.config.space, &self.channel);
        self.sub = Some(sub);
        self.refused = None;
        if self.phase == Phase::Arming {
            self.phase = Phase::Subscribing;
        }
        let op = self.op(cx, ChannelOp::Subscribe);
        cx.commands
            .push_back(Command::Subscribe { op, sub, subject });
        let op = self.op(cx, ChannelOp::Barrier);
        cx.commands.push_back(Command::Barrier { op });
        sub
    }

    /// Re-subscribes after a reconnect, in the new attempt `epoch` (confirmed, not reported).
    pub(super) fn resubscribe(&mut self, cx: &mut Ctx, epoch: u64) -> SubId {
        self.epoch = epoch;
        self.resubscribe = true;
        self.refused = None;
        self.subscribe(cx)
    }

    /// A join attempt failed before its commit: undo everything and report. Returns the
    /// subscription the parent must forget.
    pub(super) fn fail(self, cx: &mut Ctx, error: JoinError) -> Option<SubId> {
        if let Some(sub) = self.sub {
            cx.commands.push_back(Command::Unsubscribe { sub });
        }
        let request = self.join.and_then(|j| j.request);
        cx.events.push_back(AgentEvent::JoinFailed {
            request,
            channel: self.channel,
            error,
        });
        self.sub
    }
}
