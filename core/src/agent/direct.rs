//! The DLV binding and the direct (dm / anycast) feeds: [`DirectFeeds`] binds the consumers the
//! agent pumps and keeps them bound.
//!
//! - `dlv_<id>` on `DLV_<space>` (the durable backstop's copies), when
//!   [`AgentConfig::durable_backstop`];
//! - `dm_<id>` on `DM_<space>` when [`AgentConfig::unicast`], and one `svc_<role>` on
//!   `TASK_<space>` per distinct [`AgentConfig::roles`] entry.
//!
//! Each is bound at every connect and rebound with `backoff(attempt)` after a failed bind or an
//! ended feed (unlike the reference's bind-once, G20); an unknown bind is stopped before the
//! retry binds another. A direct consumer's first failure in a row, and every fifth, is an
//! [`AgentEvent::DirectUnbound`].
//!
//! - **Owns:** each consumer's subscription id, bound flag and attempt count; the open feeds;
//!   the binds in flight (by op id); the rebind deadlines (timers `DlvBind`, `DirectBind`).
//! - **Issues:** `Consume`, `StopConsume`.
//! - **Routed to it:** the completions of its binds ([`DirectFeeds::owns`]), the
//!   `ConsumerEnded` of its feeds, its deadlines, connection loss and restore. The deliveries of
//!   its feeds go to the parent's authenticity filter and ledger: the parent asks
//!   [`DirectFeeds::feed`] which consumer a subscription is.
//!
//! # Unicast and anycast (§1.2, §2(e), §2(f))
//!
//! [`super::Agent::send_dm`] publishes on `cotal.<s>.inst.<target>.<me>` (captured by `DM_<s>`) and
//! [`super::Agent::send_anycast`] on `cotal.<s>.svc.<role>.<me>` (captured by the work queue `TASK_<s>`),
//! through JetStream with `Nats-Msg-Id` = the message id, each message carrying exactly one
//! routing field (`to` / `toService`). With [`AgentConfig::unicast`] the agent pumps its
//! `dm_<id>` consumer, and one `svc_<role>` consumer per [`AgentConfig::roles`] entry; each is
//! bound at every connect and rebound with backoff after a failed bind or an ended feed (no G20
//! here), visible in [`super::AgentHealth::direct`]. A delivery's kind (`dm` / `anycast`) and sender come
//! from its subject only; a subject the consumer never captures and bad JSON are terminated as
//! malformed, a payload whose `from.id` is not the subject's sender is terminated as spoofed
//! (both an [`AgentEvent::Anomaly`] and a counter), our own echo is acked, and the rest is a
//! durable copy in the one ledger: deduplicated by id, acked only after [`super::Agent::handled`].

use super::ctx::{Ctx, Direct, Link, bump};
use super::types::{AgentConfig, AgentEvent, DirectHealth};
use crate::constants::{DEFAULT_INACTIVE_THRESHOLD, backoff};
use crate::io::{Command, Reply, SubId};
use crate::op::{OpId, Outcome, TimerTable};
use crate::time::{Instant, Now};
use crate::wire::config::ConsumerSpec;
use crate::wire::subject::DeliveryKind;
use std::collections::{BTreeMap, BTreeSet};

/// Which consumer a feed (or a rebind deadline) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Consumer {
    /// `dlv_<id>`.
    Dlv,
    /// `dm_<id>` or `svc_<role>`.
    Direct(Direct),
}

/// The binding state of one direct consumer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DirectFeed {
    sub: Option<SubId>,
    bound: bool,
    attempts: u32,
}

/// The consumers' bindings. See the module docs.
#[derive(Debug)]
pub(super) struct DirectFeeds {
    dlv: Option<SubId>,
    dlv_bound: bool,
    dlv_attempts: u32,
    /// The direct consumers configured (`dm_<id>`, `svc_<role>`), fixed at construction.
    direct: BTreeMap<Direct, DirectFeed>,
    /// The feeds open (a refused or closed one is dropped from here first).
    feeds: BTreeMap<SubId, Consumer>,
    /// The binds in flight, with the subscription each binds.
    pending: BTreeMap<OpId, (Consumer, SubId)>,
    /// Rebind deadlines.
    timers: TimerTable<Consumer>,
}

impl DirectFeeds {
    /// The consumers `config` asks for, none bound.
    pub(super) fn new(config: &AgentConfig) -> Self {
        let mut direct = BTreeMap::new();
        if config.unicast {
            direct.insert(Direct::Dm, DirectFeed::default());
        }
        // A role listed twice is served once: one consumer per role.
        let mut seen = BTreeSet::new();
        for (i, role) in config.roles.iter().enumerate() {
            if seen.insert(role.clone()) {
                direct.insert(Direct::Svc(i), DirectFeed::default());
            }
        }
        DirectFeeds {
            dlv: None,
            dlv_bound: false,
            dlv_attempts: 0,
            direct,
            feeds: BTreeMap::new(),
            pending: BTreeMap::new(),
            timers: TimerTable::new(),
        }
    }

    /// Whether `op` is one of this child's binds.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// The consumer an open feed belongs to.
    pub(super) fn feed(&self, sub: SubId) -> Option<Consumer> {
        self.feeds.get(&sub).copied()
    }

    /// Drops an open feed (refused by the broker); its deliveries are ignored from now on.
    /// Whether it was one of ours.
    pub(super) fn forget_feed(&mut self, sub: SubId) -> bool {
        self.feeds.remove(&sub).is_some()
    }

    /// The open feeds (to stop them), and forgets them.
    pub(super) fn take_feeds(&mut self) -> Vec<SubId> {
        std::mem::take(&mut self.feeds).into_keys().collect()
    }

    /// The earliest rebind deadline.
    pub(super) fn poll_timeout(&self) -> Option<(Instant, Consumer)> {
        self.timers.next().map(|(at, c)| (at, *c))
    }

    /// Removes the deadline of `consumer` (the parent is about to fire it).
    pub(super) fn take_timer(&mut self, consumer: Consumer) {
        self.timers.cancel(&consumer);
    }

    /// Clears every deadline (the agent stopped).
    pub(super) fn clear_timers(&mut self) {
        self.timers = TimerTable::new();
    }

    /// The rebind deadline of `consumer` fired.
    pub(super) fn handle_timeout(&mut self, cx: &mut Ctx, consumer: Consumer) {
        match consumer {
            Consumer::Dlv => {
                if cx.link != Link::Down && !cx.stopped && cx.config.durable_backstop {
                    self.bind_dlv(cx);
                }
            }
            Consumer::Direct(d) => {
                if cx.link != Link::Down && !cx.stopped {
                    self.bind_direct(cx, d);
                }
            }
        }
    }

    /// The connection is gone: nothing is bound, no feed is open.
    pub(super) fn on_lost(&mut self) {
        self.feeds.clear();
        self.dlv = None;
        self.dlv_bound = false;
        for feed in self.direct.values_mut() {
            feed.sub = None;
            feed.bound = false;
        }
    }

    /// A connection is up: bind DLV (with the backstop on), then every direct consumer, each
    /// with a fresh backoff.
    pub(super) fn on_restored(&mut self, cx: &mut Ctx) {
        if cx.config.durable_backstop {
            self.dlv_attempts = 0;
            self.timers.cancel(&Consumer::Dlv);
            self.bind_dlv(cx);
        }
        // The direct consumers are bound at every connect, first or not, and a failed bind is
        // retried (the reference binds DLV once, G20; we treat DM and TASK the same way as DLV).
        let directs: Vec<Direct> = self.direct.keys().copied().collect();
        for d in directs {
            self.timers.cancel(&Consumer::Direct(d));
            if let Some(feed) = self.direct.get_mut(&d) {
                feed.attempts = 0;
            }
            self.bind_direct(cx, d);
        }
    }

    /// A bind's completion.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        op: OpId,
        outcome: Outcome<Reply>,
    ) {
        let Some((consumer, sub)) = self.pending.remove(&op) else {
            return;
        };
        match consumer {
            Consumer::Dlv => {
                if outcome.is_success() {
                    self.dlv_bound = true;
                    self.dlv_attempts = 0;
                } else if cx.link != Link::Down && !cx.stopped {
                    self.dlv_unbound(cx, now);
                }
            }
            Consumer::Direct(direct) => {
                // A completion for a feed already replaced (a rebind) says nothing of the
                // current one.
                let current = self.direct.get(&direct).and_then(|f| f.sub) == Some(sub);
                if !current {
                    return;
                }
                if outcome.is_success() {
                    if let Some(feed) = self.direct.get_mut(&direct) {
                        feed.bound = true;
                        feed.attempts = 0;
                    }
                } else if cx.link != Link::Down && !cx.stopped {
                    let detail = match outcome {
                        Outcome::Failed(f) => f.to_string(),
                        _ => "bind outcome unknown".to_owned(),
                    };
                    self.direct_unbound(cx, now, direct, detail);
                }
            }
        }
    }

    /// A feed of ours ended (`ConsumerEnded`).
    pub(super) fn on_ended(&mut self, cx: &mut Ctx, now: Now, consumer: Consumer, detail: String) {
        match consumer {
            Consumer::Dlv => self.dlv_unbound(cx, now),
            Consumer::Direct(d) => {
                if cx.link != Link::Down && !cx.stopped {
                    self.direct_unbound(cx, now, d, detail);
                }
            }
        }
    }

    /// Whether DLV is bound.
    pub(super) fn dlv_bound(&self) -> bool {
        self.dlv_bound
    }

    /// The direct consumers' health.
    pub(super) fn health(&self, config: &AgentConfig) -> Vec<DirectHealth> {
        self.direct
            .iter()
            .map(|(d, f)| DirectHealth {
                consumer: spec(config, *d).name,
                kind: match d {
                    Direct::Dm => DeliveryKind::Dm,
                    Direct::Svc(_) => DeliveryKind::Anycast,
                },
                bound: f.bound,
                attempts: f.attempts,
            })
            .collect()
    }

    /// Binds the DLV consumer. Unlike the reference (G20), a failed bind or an ended consumer is
    /// retried with backoff and shows in [`super::AgentHealth::dlv_bound`] meanwhile.
    fn bind_dlv(&mut self, cx: &mut Ctx) {
        if let Some(old) = self.dlv.take() {
            self.feeds.remove(&old);
        }
        let sub = cx.subs.next_id();
        self.feeds.insert(sub, Consumer::Dlv);
        self.dlv = Some(sub);
        let op = cx.ops.next_id();
        self.pending.insert(op, (Consumer::Dlv, sub));
        cx.commands.push_back(Command::Consume {
            op,
            sub,
            consumer: ConsumerSpec::dlv(&cx.config.space, &cx.config.me.id),
            create: cx.config.create_dlv_consumer,
            max_in_flight: u32::try_from(cx.config.ledger.max_pending).unwrap_or(u32::MAX),
        });
    }

    fn dlv_unbound(&mut self, cx: &mut Ctx, now: Now) {
        self.dlv_bound = false;
        if let Some(old) = self.dlv.take() {
            self.feeds.remove(&old);
            // The bind may have happened all the same (an unknown outcome): stop that feed before
            // the retry binds another, or it keeps taking deliveries nobody settles.
            cx.commands.push_back(Command::StopConsume { sub: old });
        }
        bump(&mut cx.counters.dlv_bind_failures);
        self.timers
            .set(Consumer::Dlv, now.at + backoff(self.dlv_attempts));
        self.dlv_attempts = self.dlv_attempts.saturating_add(1);
    }

    /// Binds (or, in open mode, creates and binds) one direct consumer.
    fn bind_direct(&mut self, cx: &mut Ctx, d: Direct) {
        let Some(old) = self.direct.get_mut(&d).map(|f| f.sub.take()) else {
            return;
        };
        if let Some(old) = old {
            self.feeds.remove(&old);
        }
        let sub = cx.subs.next_id();
        self.feeds.insert(sub, Consumer::Direct(d));
        if let Some(feed) = self.direct.get_mut(&d) {
            feed.sub = Some(sub);
            feed.bound = false;
        }
        let op = cx.ops.next_id();
        self.pending.insert(op, (Consumer::Direct(d), sub));
        cx.commands.push_back(Command::Consume {
            op,
            sub,
            consumer: spec(&cx.config, d),
            create: cx.config.create_direct_consumers,
            max_in_flight: u32::try_from(cx.config.ledger.max_pending).unwrap_or(u32::MAX),
        });
    }

    /// A direct consumer's bind failed or its feed ended: stop it and retry after the backoff.
    /// The first failure in a row, and every fifth after it, is an [`AgentEvent::DirectUnbound`].
    fn direct_unbound(&mut self, cx: &mut Ctx, now: Now, d: Direct, detail: String) {
        let consumer = spec(&cx.config, d).name;
        let Some(feed) = self.direct.get_mut(&d) else {
            return;
        };
        feed.bound = false;
        let old = feed.sub.take();
        let attempts = feed.attempts;
        feed.attempts = feed.attempts.saturating_add(1);
        if let Some(old) = old {
            self.feeds.remove(&old);
            // As for DLV: an unknown bind may have happened; stop it before the retry.
            cx.commands.push_back(Command::StopConsume { sub: old });
        }
        bump(&mut cx.counters.direct_bind_failures);
        if attempts.is_multiple_of(5) {
            cx.events.push_back(AgentEvent::DirectUnbound {
                consumer,
                attempts: attempts.saturating_add(1),
                detail,
            });
        }
        self.timers
            .set(Consumer::Direct(d), now.at + backoff(attempts));
    }
}

/// The consumer spec of a direct feed.
fn spec(config: &AgentConfig, d: Direct) -> ConsumerSpec {
    match d {
        // Open-mode self-creation carries the endpoint's inactive_threshold, as the reference
        // agent's does: both create the same `dm_<id>`.
        Direct::Dm if config.create_direct_consumers => {
            ConsumerSpec::dm(&config.space, &config.me.id)
                .with_inactive_threshold(DEFAULT_INACTIVE_THRESHOLD)
        }
        Direct::Dm => ConsumerSpec::dm(&config.space, &config.me.id),
        Direct::Svc(i) => match config.roles.get(i) {
            Some(role) => ConsumerSpec::svc(&config.space, role),
            None => {
                debug_assert!(false, "svc feed {i} without a role");
                ConsumerSpec::dm(&config.space, &config.me.id)
            }
        },
    }
}
