//! The channel registry watch: [`RegistryWatch`] keeps the agent's cache of the channel
//! registry (`KV_cotal_channels_<space>`, the one resolver [`ChannelRegistry::policy_for`]
//! reads) and tells the parent when its initial values loaded: the endpoint refuses joins and
//! leaves until then, so the cache never answers before it is complete (G10).
//!
//! The watch is opened at every connect. One that fails or ends unknown leaves the endpoint
//! loading (never answering from an incomplete cache): what it delivered is dropped and it is
//! opened again after `backoff(attempt)`. A connection that stays up must not leave the endpoint
//! loading forever (found by the simulator, seed 93: an ambiguous watch answer kept an agent
//! unable to join, leave or reconcile for good).
//!
//! - **Owns:** the cache, the watch's feed, its watches in flight (by op id), the failed
//!   attempts on this connection and the retry deadline (timer `RegistryWatch`).
//! - **Issues:** `KvWatch`, `KvUnwatch`.
//! - **Routed to it:** its completions ([`RegistryWatch::owns`]; a success is handed back so the
//!   parent turns ready), the `KvChange` / `Refused` of its feed, its deadline, loss and
//!   restore.

use super::ctx::{Ctx, Link};
use crate::constants::backoff;
use crate::io::{Command, KvEntry, KvOperation, Reply, SubId};
use crate::op::{OpId, Outcome};
use crate::policy::ChannelRegistry;
use crate::time::{Instant, Now};
use crate::wire::keys::KvBucket;
use std::collections::BTreeSet;

/// The channel registry watch. See the module docs.
#[derive(Debug, Default)]
pub(super) struct RegistryWatch {
    /// The cache (complete once a watch loaded on this connection).
    cache: ChannelRegistry,
    /// The current watch's subscription.
    feed: Option<SubId>,
    /// Whether that feed is still open (a refused one is not).
    open: bool,
    /// Watches in flight.
    pending: BTreeSet<OpId>,
    /// Watches that failed or ended unknown on this connection (retried with backoff).
    attempts: u32,
    /// When to watch again.
    deadline: Option<Instant>,
}

impl RegistryWatch {
    /// The cache.
    pub(super) fn registry(&self) -> &ChannelRegistry {
        &self.cache
    }

    /// Whether `op` is one of this child's watches.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains(&op)
    }

    /// The open feed, if `sub` is it.
    pub(super) fn is_feed(&self, sub: SubId) -> bool {
        self.open && self.feed == Some(sub)
    }

    /// Closes the feed (refused by the broker): its changes are ignored from now on.
    pub(super) fn forget_feed(&mut self) {
        self.open = false;
    }

    /// The open feed (to close it when the agent stops), and forgets it.
    pub(super) fn take_feed(&mut self) -> Option<SubId> {
        if !self.open {
            return None;
        }
        self.open = false;
        self.feed
    }

    /// The retry deadline.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Clears the retry deadline (the agent stopped).
    pub(super) fn clear_timer(&mut self) {
        self.deadline = None;
    }

    /// The retry deadline fired (the parent popped it): watch again if still loading.
    pub(super) fn handle_timeout(&mut self, cx: &mut Ctx) {
        self.deadline = None;
        if cx.link == Link::Loading && !cx.stopped && self.feed.is_none() {
            self.watch(cx);
        }
    }

    /// The connection is gone: no feed, and the cache is stale.
    pub(super) fn on_lost(&mut self) {
        self.feed = None;
        self.open = false;
        self.cache = ChannelRegistry::default();
    }

    /// A connection is up: watch with a fresh backoff.
    pub(super) fn on_restored(&mut self, cx: &mut Ctx) {
        self.attempts = 0;
        self.deadline = None;
        self.watch(cx);
    }

    /// Opens the watch; the endpoint is ready once its initial values loaded.
    fn watch(&mut self, cx: &mut Ctx) {
        let sub = cx.subs.next_id();
        self.feed = Some(sub);
        self.open = true;
        let op = cx.ops.next_id();
        self.pending.insert(op);
        cx.commands.push_back(Command::KvWatch {
            op,
            sub,
            bucket: KvBucket::Channels.name(&cx.config.space),
            filter: ">".into(),
        });
    }

    /// A watch's completion. Returns whether it loaded (the parent then turns ready).
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> bool {
        self.pending.remove(&op);
        match outcome {
            Outcome::Success(_) => {
                self.attempts = 0;
                true
            }
            Outcome::Failed(_) | Outcome::Unknown => {
                if cx.link == Link::Loading && !cx.stopped {
                    if let Some(sub) = self.feed.take() {
                        self.open = false;
                        cx.commands.push_back(Command::KvUnwatch { sub });
                    }
                    self.cache = ChannelRegistry::default();
                    self.deadline = Some(now.at + backoff(self.attempts));
                    self.attempts = self.attempts.saturating_add(1);
                }
                false
            }
        }
    }

    /// A change on the feed.
    pub(super) fn on_change(&mut self, entry: KvEntry) {
        let value = match entry.operation {
            KvOperation::Put => Some(entry.value.as_ref()),
            KvOperation::Delete | KvOperation::Purge => None,
        };
        // A key that is neither `=defaults` nor a concrete channel is not ours to judge.
        let _ = self.cache.apply(&entry.key, value);
    }
}
