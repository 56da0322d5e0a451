//! The feeds: the four KV watches (members, ACL, channels, presence), the `ctl.delivery.*`
//! subscription and the two consumers (fan-out, reader).
//!
//! [`Feeds`] owns each feed's state (closed, opening, open, with its subscription id), the
//! subscription-id allocator, which watches delivered their initial values (`loaded`), the
//! failures counted per feed for the reopen backoff, and the op ids of the opens it issued
//! (`KvWatch`, `Subscribe`, `Consume`). It sets [`Timer::Reopen`] after a failure. What an open
//! means for the rest of the daemon (a bound fan-out cursor, the reader's backlog read, the
//! consumers once every watch is loaded, readiness) is decided by the parent from the
//! [`Opened`] it returns.

use super::config::DeliveryConfig;
use super::context::Ctx;
use super::events::{DeliveryEvent, Feed};
use super::types::Timer;
use crate::constants::backoff;
use crate::io::{Command, Reply, SubId, SubIds};
use crate::op::{OpId, Outcome};
use crate::time::Now;
use crate::wire::config::ConsumerSpec;
use crate::wire::subject::delivery_control_pattern;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FeedState {
    Closed,
    Opening(SubId),
    Open(SubId),
}

/// The feeds child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Feeds {
    subs: SubIds,
    state: BTreeMap<Feed, FeedState>,
    /// The watches that delivered their initial values.
    loaded: BTreeSet<Feed>,
    /// Failed opens in a row, per feed (the reopen backoff).
    failures: BTreeMap<Feed, u32>,
    /// The opens in flight: op → (feed, subscription).
    pending: BTreeMap<OpId, (Feed, SubId)>,
}

/// Where a consumer (fan-out or reader) stood when it was bound ([`Reply::ConsumerBound`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BoundAt {
    /// Its delivery pointer.
    pub(super) delivered: u64,
    /// Its ack floor.
    pub(super) ack_floor: u64,
    /// Deliveries above the floor nobody settled.
    pub(super) ack_pending: u64,
}

/// A feed's open completed: what the parent does next.
#[derive(Debug)]
pub(super) enum Opened {
    /// The feed is open. `bound` is where its consumer stood, when the driver told.
    Open { feed: Feed, bound: Option<BoundAt> },
    /// Superseded (a reconnect or a stop) or failed (a reopen is scheduled).
    Not,
}

impl Feeds {
    /// The feeds of a new incarnation of the daemon: all closed, with subscription ids that
    /// continue this one's (a late delivery on an old subscription is never taken for a new
    /// feed's).
    pub(super) fn successor(&self) -> Self {
        Feeds {
            subs: self.subs.clone(),
            ..Feeds::new()
        }
    }

    pub(super) fn new() -> Self {
        Feeds {
            subs: SubIds::new(),
            state: Feed::ALL.iter().map(|f| (*f, FeedState::Closed)).collect(),
            loaded: BTreeSet::new(),
            failures: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Whether `feed` is open.
    pub(super) fn is_open(&self, feed: Feed) -> bool {
        matches!(self.state.get(&feed), Some(FeedState::Open(_)))
    }

    /// Whether every feed is open.
    pub(super) fn all_open(&self) -> bool {
        Feed::ALL.iter().all(|f| self.is_open(*f))
    }

    /// Whether watch `feed` delivered its initial values.
    pub(super) fn loaded(&self, feed: Feed) -> bool {
        self.loaded.contains(&feed)
    }

    /// Whether every watch delivered its initial values.
    pub(super) fn watches_loaded(&self) -> bool {
        Feed::WATCHES.iter().all(|f| self.loaded.contains(f))
    }

    /// The feed of subscription `sub` (open or opening).
    pub(super) fn feed_of(&self, sub: SubId) -> Option<Feed> {
        self.state.iter().find_map(|(f, s)| match s {
            FeedState::Open(x) | FeedState::Opening(x) if *x == sub => Some(*f),
            _ => None,
        })
    }

    /// Whether `op` is one of this child's opens.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// Opens `feed` if it is closed.
    pub(super) fn open(&mut self, cx: &mut Ctx, config: &DeliveryConfig, feed: Feed) {
        if self.state.get(&feed) != Some(&FeedState::Closed) {
            return;
        }
        cx.timers.cancel(&Timer::Reopen(feed));
        let sub = self.subs.next_id();
        self.state.insert(feed, FeedState::Opening(sub));
        let op = cx.op();
        self.pending.insert(op, (feed, sub));
        let space = &config.space;
        let shard = config.shard;
        let cmd = match feed {
            Feed::Members | Feed::Acl | Feed::Channels | Feed::Presence => {
                self.loaded.remove(&feed);
                let bucket = feed
                    .bucket()
                    .expect("watch feeds have a bucket")
                    .name(space);
                Command::KvWatch {
                    op,
                    sub,
                    bucket,
                    filter: ">".into(),
                }
            }
            Feed::Control => Command::Subscribe {
                op,
                sub,
                subject: delivery_control_pattern(space),
            },
            Feed::Fanout => Command::Consume {
                op,
                sub,
                consumer: ConsumerSpec::fanout(space, shard.index(), shard.shards()),
                create: true,
                max_in_flight: config.fanout_window,
            },
            Feed::Reader => Command::Consume {
                op,
                sub,
                consumer: ConsumerSpec::reader(space, shard.index(), shard.shards()),
                create: true,
                max_in_flight: config.reader_window,
            },
        };
        cx.push(cmd);
    }

    /// Closes every feed (the close commands only while `connected`).
    pub(super) fn close_all(&mut self, cx: &mut Ctx, connected: bool) {
        for feed in Feed::ALL {
            let state = self.state.insert(feed, FeedState::Closed);
            cx.timers.cancel(&Timer::Reopen(feed));
            let sub = match state {
                Some(FeedState::Open(s) | FeedState::Opening(s)) => s,
                _ => continue,
            };
            if !connected {
                continue;
            }
            cx.push(close_command(feed, sub));
        }
        self.loaded.clear();
    }

    /// The connection is gone, and every feed with it; answers in flight are forgotten.
    pub(super) fn connection_lost(&mut self, cx: &mut Ctx) {
        for feed in Feed::ALL {
            self.state.insert(feed, FeedState::Closed);
            cx.timers.cancel(&Timer::Reopen(feed));
        }
        self.loaded.clear();
        self.pending.clear();
    }

    /// An open completed. `connected` and `live` (connected and not stopped) are the daemon's.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        op: OpId,
        outcome: Outcome<Reply>,
        connected: bool,
        live: bool,
    ) -> Opened {
        let Some((feed, sub)) = self.pending.remove(&op) else {
            return Opened::Not;
        };
        if self.state.get(&feed) != Some(&FeedState::Opening(sub)) {
            return Opened::Not; // superseded by a reconnect or a stop
        }
        match outcome {
            Outcome::Success(reply) => {
                let bound = match (feed, reply) {
                    (
                        Feed::Fanout | Feed::Reader,
                        Reply::ConsumerBound {
                            delivered_stream_seq,
                            ack_floor_stream_seq,
                            num_ack_pending,
                        },
                    ) => Some(BoundAt {
                        delivered: delivered_stream_seq,
                        ack_floor: ack_floor_stream_seq,
                        ack_pending: num_ack_pending,
                    }),
                    _ => None,
                };
                self.state.insert(feed, FeedState::Open(sub));
                self.failures.remove(&feed);
                if feed.bucket().is_some() {
                    self.loaded.insert(feed);
                }
                Opened::Open { feed, bound }
            }
            Outcome::Failed(f) => {
                if connected {
                    cx.push(close_command(feed, sub));
                }
                self.failed(cx, now, feed, f.to_string(), live);
                Opened::Not
            }
            Outcome::Unknown => {
                if connected {
                    cx.push(close_command(feed, sub));
                }
                self.failed(cx, now, feed, "outcome unknown".into(), live);
                Opened::Not
            }
        }
    }

    /// `feed` failed (its open, or the server ended it): reported, reopened after a backoff
    /// while `live`.
    pub(super) fn failed(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        feed: Feed,
        detail: String,
        live: bool,
    ) {
        self.state.insert(feed, FeedState::Closed);
        if feed.bucket().is_some() {
            self.loaded.remove(&feed);
        }
        cx.emit(DeliveryEvent::FeedProblem { feed, detail });
        if live {
            let n = self.failures.entry(feed).or_insert(0);
            let wait = backoff(*n);
            *n = n.saturating_add(1);
            cx.timers.set(Timer::Reopen(feed), now.at + wait);
        }
    }
}

/// The command that closes `feed`'s subscription `sub`.
///
/// A feed whose open failed or ended unknown may exist on the server all the same (the effect
/// happened, the answer was lost), so it is closed before the retry opens another: a forgotten
/// consumer feed keeps taking deliveries nobody settles (found by the simulator, seed 128: a
/// ghost reader feed starved an owner's dinbox entry forever).
fn close_command(feed: Feed, sub: SubId) -> Command {
    match feed {
        Feed::Members | Feed::Acl | Feed::Channels | Feed::Presence => Command::KvUnwatch { sub },
        Feed::Control => Command::Unsubscribe { sub },
        Feed::Fanout | Feed::Reader => Command::StopConsume { sub },
    }
}
