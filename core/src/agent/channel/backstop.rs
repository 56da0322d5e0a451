//! What the rest of the agent may ask or tell a [`ChannelMachine`] about its state: whether it
//! is joined or leaving, its health, and the durable backstop as the membership book decides it
//! (the parent applies the book's verdicts through these). The machine's fields are its own; these are the only ways
//! in.

use super::{ChannelMachine, Phase};
use crate::agent::types::{BackstopState, ChannelHealth};
use crate::io::SubId;
use crate::wire::token::Channel;

impl ChannelMachine {
    /// The channel.
    pub(in crate::agent) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The current attempt.
    pub(in crate::agent) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether `sub` is its subscription in attempt `epoch`.
    pub(in crate::agent) fn is_feed(&self, epoch: u64, sub: SubId) -> bool {
        self.epoch == epoch && self.sub == Some(sub)
    }

    /// Whether the join committed.
    pub(in crate::agent) fn joined(&self) -> bool {
        self.phase == Phase::Joined
    }

    /// Whether a leave is in progress.
    pub(in crate::agent) fn leaving(&self) -> bool {
        self.leave.is_some()
    }

    /// Committed and not leaving: the channel keeps (or gets) its membership.
    pub(in crate::agent) fn staying(&self) -> bool {
        self.joined() && !self.leaving()
    }

    /// Whether its durable backstop is established.
    pub(in crate::agent) fn established(&self) -> bool {
        matches!(self.backstop, BackstopState::Established { .. })
    }

    /// Its health line.
    pub(in crate::agent) fn health(&self) -> ChannelHealth {
        ChannelHealth {
            channel: self.channel.clone(),
            live: self.sub.is_some() && !self.resubscribe,
            backstop: self.backstop.clone(),
        }
    }

    /// The attempts counted on a degraded backstop (0 otherwise).
    pub(in crate::agent) fn degraded_attempts(&self) -> u32 {
        match &self.backstop {
            BackstopState::Degraded { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// The backstop is degraded for `reason`, with `attempts` counted.
    pub(in crate::agent) fn degrade(&mut self, reason: String, attempts: u32) {
        self.backstop = BackstopState::Degraded { reason, attempts };
    }

    /// A reconcile is sent: one more attempt counted on a degraded backstop (it stays degraded
    /// while the request is in flight: the channel is not protected until the daemon says so).
    /// Returns the join cursor: the armed watermark, still the right one, as everything above
    /// it reached us only live (at-most-once), so the daemon's catch-up from it closes that
    /// window (G1).
    pub(in crate::agent) fn reconcile_attempt(&mut self) -> Option<u64> {
        if let BackstopState::Degraded { attempts, .. } = &mut self.backstop {
            *attempts = attempts.saturating_add(1);
        }
        self.watermark
    }

    /// The durable join answered with membership `generation`: the backstop is established and
    /// the join's report says so.
    pub(in crate::agent) fn backstop_established(
        &mut self,
        generation: u64,
        honoured: Option<bool>,
    ) {
        self.backstop = BackstopState::Established { generation };
        if let Some(join) = self.join.as_mut() {
            join.durable_pending = false;
            join.report.durable = true;
            join.report.generation = Some(generation);
            join.report.cursor_honoured = honoured;
        }
    }

    /// The durable join failed for `reason`: the backstop is degraded and the join's report
    /// carries the reason.
    pub(in crate::agent) fn backstop_unavailable(&mut self, reason: &str, attempts: u32) {
        self.degrade(reason.to_owned(), attempts);
        if let Some(join) = self.join.as_mut() {
            join.durable_pending = false;
            join.report.reason = Some(reason.to_owned());
        }
    }
}
