//! Connection life (parent code, `impl Agent`): loss, restore and the registry's load, fanned
//! out to every part (registry watch, direct feeds, presence, loss poll, the book's audit) and to
//! the parent's channel map (each machine re-subscribes, fails closed, or starts its post-commit
//! steps). This is the parent's own job: no part owns the connection.
//!
//! # Connection (§2(e))
//!
//! On [`Connection::Restored`] the first time, the boot channels are joined like runtime joins
//! (watermark, subscribe, confirm, backfill, durable self-join). On later restores the joined
//! channels are re-subscribed and confirmed; no watermark, no backfill: durable channels catch up
//! through DLV, live channels have a gap. The joined set, the membership mirror, pending closes and
//! reconciles survive; the registry cache, subscriptions and in-flight joins do not (a join in
//! flight when the connection drops fails closed). The endpoint refuses joins and leaves until the
//! channel registry watch has loaded: the cache must not answer before it is complete (G10).

use super::Agent;
use super::ctx::{Link, bump};
use super::types::AgentEvent;
use crate::io::Connection;
use crate::time::Now;
use crate::wire::token::Channel;

impl Agent {
    pub(super) fn on_connection(&mut self, now: Now, change: Connection) {
        match change {
            Connection::Lost => self.on_lost(),
            Connection::Restored => self.on_restored(now),
        }
    }

    pub(super) fn on_lost(&mut self) {
        if self.cx.link == Link::Down {
            return;
        }
        bump(&mut self.cx.counters.connection_losses);
        self.cx.link = Link::Down;
        self.feeds.clear();
        self.direct.on_lost();
        self.watch.on_lost();
        self.presence.on_lost();
        // The audit in flight is moot (its answer is ignored); the next ready connection audits.
        self.members.on_lost();
        self.loss_poll.on_lost();
        // In-flight joins fail closed; joined channels lose their subscription.
        let names: Vec<Channel> = self.channels.keys().cloned().collect();
        for name in names {
            let Some(machine) = self.channels.get_mut(&name) else {
                continue;
            };
            if !machine.on_lost(&mut self.cx) {
                self.remove_channel(&name);
            }
        }
        self.cx.events.push_back(AgentEvent::Disconnected);
    }

    pub(super) fn on_restored(&mut self, now: Now) {
        if self.cx.stopped {
            return;
        }
        if self.cx.link != Link::Down {
            // A restore without a loss: treat as loss + restore (feeds may be gone).
            self.on_lost();
        }
        self.cx.link = Link::Loading;
        self.watch.on_restored(&mut self.cx);
        self.direct.on_restored(&mut self.cx);
        // Every channel still held was committed on an earlier connection: re-subscribe it. This
        // includes a boot channel committed before a loss that came before the registry ever
        // loaded, so "first connect" is not "nothing to re-subscribe" (found by the simulator,
        // seed 1979: such a channel stayed joined with no subscription).
        let names: Vec<Channel> = self.channels.keys().cloned().collect();
        for name in names {
            self.resubscribe(&name);
        }
        if self.first_connect {
            let boot: Vec<Channel> = self.cx.config.channels.clone();
            for channel in boot {
                if !self.channels.contains_key(&channel) {
                    self.start_join(channel, None);
                }
            }
        }
        self.presence.on_restored(&mut self.cx, now);
    }

    pub(super) fn on_registry_loaded(&mut self) {
        if self.cx.link != Link::Loading {
            return;
        }
        self.cx.link = Link::Ready;
        let first = self.first_connect;
        self.first_connect = false;
        self.cx.events.push_back(AgentEvent::Connected { first });
        self.loss_poll.read(&mut self.cx);
        let names: Vec<Channel> = self.channels.keys().cloned().collect();
        for name in names {
            self.maybe_start_post_commit(&name);
        }
        self.members.start_audit(&mut self.cx);
    }
}
