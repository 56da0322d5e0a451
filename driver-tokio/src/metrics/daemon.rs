//! [`DaemonMetrics`]: what `cotal delivery --metrics` serves.

use super::shared::{Exported, Read, catch_up, flag, gauge_value, lock};
use crate::app::DaemonStatus;
use cotal_core::delivery::daemon::{
    DegradedReason, DeliveryCounters, DeliveryEvent, DeliveryHealth, Feed,
};
use cotal_core::delivery::lease::{LeaseEvent, LeaseState};
use cotal_core::io::{Inbound, Input};
use cotal_core::wire::control::{ControlRequest, DeliveryRequest};
use cotal_core::wire::subject::{ControlService, Subject};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Labels = Vec<(&'static str, String)>;

fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

/// A core counter exported as is, and how to read it.
struct CoreCounter {
    read: Read<DeliveryCounters>,
    counter: Counter,
}

/// The counters exported one to one (the rest are split by a label below).
const CORE_COUNTERS: &[Exported<DeliveryCounters>] = &[
    (
        "copies_written",
        "Copies stored by fan-out and catch-up (in DLV directly, or in the dinbox)",
        |c| c.copies_written,
    ),
    (
        "copies_duplicate",
        "Copy publishes the stream's duplicate window collapsed",
        |c| c.copies_duplicate,
    ),
    (
        "dropped",
        "Dinbox entries the reader dropped (not admitted)",
        |c| c.dropped,
    ),
    (
        "deferred",
        "Dinbox entries the reader deferred (nak)",
        |c| c.deferred,
    ),
    (
        "held_for_leave",
        "Entries held while a leave of their membership wrote its tombstone",
        |c| c.held_for_leave,
    ),
    (
        "terminated",
        "Dinbox entries terminated (give-ups after the redelivery ceiling, anomalies)",
        |c| c.terminated,
    ),
    (
        "shed",
        "Copies shed because the owner's DLV held its cap of unread copies (each also lost)",
        |c| c.dlv_shed,
    ),
    (
        "backstop_at_risk",
        "Episodes in which an owner's DLV had copies acked past an unacked one that further writes could rotate out (G6)",
        |c| c.dlv_at_risk,
    ),
    (
        "catchup_evicted_ranges",
        "Catch-up windows found evicted (the join answered durable:false)",
        |c| c.evicted_ranges,
    ),
    (
        "writes_failed",
        "Failed or unknown dinbox, DLV and registry writes",
        |c| c.writes_failed,
    ),
    (
        "cas_retries",
        "Compare-and-set conflicts that made a job re-read",
        |c| c.cas_retries,
    ),
    (
        "fenced",
        "Registry writes refused because a newer daemon wrote the record",
        |c| c.fenced,
    ),
    ("lease_lost", "Times the lease was lost", |c| c.lease_lost),
    (
        "lease_reacquisitions",
        "Times the daemon started over with a fresh lease after losing one",
        |c| c.lease_reacquisitions,
    ),
    (
        "lease_reclaims",
        "Times a new incarnation wrote over its own earlier, unexpired lease record",
        |c| c.lease_reclaims,
    ),
    (
        "dinbox_cap_reached",
        "Times an owner's dinbox backlog reached the per-owner cap",
        |c| c.cap_reached,
    ),
    (
        "fanout_held",
        "CHAT deliveries held back because an owner's dinbox backlog was at its high water (back-pressure)",
        |c| c.fanout_deferred,
    ),
    (
        "fanout_hold_expired",
        "Held CHAT deliveries released (nak) at the hold limit",
        |c| c.fanout_hold_expired,
    ),
    (
        "backlog_unverified",
        "Backlog reads that failed (a per-owner cap unverified for a while)",
        |c| c.backlog_unverified,
    ),
    (
        "fanout_anomalies",
        "CHAT messages fan-out terminated as anomalies",
        |c| c.fanout_anomalies,
    ),
    (
        "stranded_read_back",
        "CHAT messages read back because the fan-out consumer had offered them to a feed that is gone",
        |c| c.stranded_read_back,
    ),
    (
        "stranded_reads_failed",
        "Read-backs of stranded CHAT messages that failed (left to the redelivery)",
        |c| c.stranded_reads_failed,
    ),
    (
        "abandoned",
        "Control requests abandoned without a reply (lease or connection lost)",
        |c| c.abandoned,
    ),
    (
        "revoked",
        "DLV copies deleted by the revocation sweep (their owner's ACL no longer admits them)",
        |c| c.dlv_revoked,
    ),
    (
        "orphans_found",
        "Memberships found orphaned (owner offline beyond the retention)",
        |c| c.orphans_found,
    ),
    ("orphans_reaped", "Orphaned memberships tombstoned", |c| {
        c.orphans_reaped
    }),
    (
        "live_class_joins",
        "Durable joins answered durable:false because the channel is live",
        |c| c.live_class_joins,
    ),
    (
        "consumer_headroom_low",
        "Times a stream's consumer headroom fell under 10 % of its cap",
        |c| c.consumer_headroom_low,
    ),
    (
        "presence_ignored",
        "Presence keys ignored for @mention resolution (once per episode)",
        |c| c.presence_ignored,
    ),
    (
        "loss_notices_written",
        "Writes of a member's loss record",
        |c| c.loss_notices_written,
    ),
    (
        "loss_notices_failed",
        "Loss record reads or writes that failed (each retried)",
        |c| c.loss_notices_failed,
    ),
];

/// The lease states, as the `state` label spells them.
const LEASE_STATES: [&str; 8] = [
    "idle",
    "acquiring",
    "held",
    "ready",
    "releasing",
    "lost",
    "released",
    "not_acquired",
];

fn lease_label(s: LeaseState) -> &'static str {
    match s {
        LeaseState::Idle => "idle",
        LeaseState::Acquiring => "acquiring",
        LeaseState::Held => "held",
        LeaseState::Ready => "ready",
        LeaseState::Releasing => "releasing",
        LeaseState::Lost => "lost",
        LeaseState::Released => "released",
        LeaseState::NotAcquired => "not_acquired",
        _ => "other",
    }
}

/// A join or a leave, for the latency of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Join,
    Leave,
}

/// Control requests waiting for their answer at most this many at once (the rest are not
/// timed), and at most this long (then forgotten: the request was abandoned or never answered).
const MAX_PENDING: usize = 10_000;
const PENDING_TTL: Duration = Duration::from_secs(120);

/// The metrics of one delivery daemon. Feed it the daemon's inputs ([`DaemonMetrics::input`],
/// from [`DeliveryDaemon::start_tapped`](crate::app::DeliveryDaemon::start_tapped)) and events
/// ([`DaemonMetrics::event`]); [`DaemonMetrics::render`] reads its status at each scrape.
pub struct DaemonMetrics {
    registry: Registry,
    space: String,
    core: Vec<CoreCounter>,
    transferred_direct: Counter,
    transferred_reader: Counter,
    copies_lost: Family<Labels, Counter>,
    messages_lost: Family<Labels, Counter>,
    sweeps: Family<Labels, Counter>,
    backpressure: Counter,
    healthy: Gauge,
    serving: Gauge,
    degraded: Family<Labels, Gauge>,
    feed_up: Family<Labels, Gauge>,
    lease: Family<Labels, Gauge>,
    fencing_token: Gauge,
    joins: Family<Labels, Counter>,
    leaves: Family<Labels, Counter>,
    join_seconds: Histogram,
    leave_seconds: Histogram,
    pending: Mutex<HashMap<(Op, String, String), Instant>>,
}

impl std::fmt::Debug for DaemonMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonMetrics")
            .field("space", &self.space)
            .finish_non_exhaustive()
    }
}

fn latency() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl DaemonMetrics {
    /// The metrics of the daemon `daemon` serving shard `shard` of `shards` in `space`: every
    /// name starts with `cotal_delivery_`; `cotal_delivery_info` carries the three as labels.
    pub fn new(space: &str, shard: u32, shards: u32, daemon: &str) -> Self {
        let mut root = Registry::default();
        let info = Family::<Labels, Gauge>::default();
        let r = root.sub_registry_with_prefix("cotal_delivery");
        r.register(
            "info",
            "The daemon: space, shard and id (always 1)",
            info.clone(),
        );
        info.get_or_create(&vec![
            ("space", space.to_owned()),
            ("shard", shard.to_string()),
            ("shards", shards.to_string()),
            ("daemon", daemon.to_owned()),
        ])
        .set(1);
        let core = CORE_COUNTERS
            .iter()
            .map(|(name, help, read)| {
                let counter = Counter::default();
                r.register(*name, *help, counter.clone());
                CoreCounter {
                    read: *read,
                    counter,
                }
            })
            .collect();
        let transferred = Family::<Labels, Counter>::default();
        r.register(
            "transferred",
            "Copies handed to DLV: path=direct by fan-out straight from CHAT, path=reader through the dinbox and the reader",
            transferred.clone(),
        );
        let copies_lost = Family::<Labels, Counter>::default();
        r.register(
            "copies_lost",
            "Copies lost, by cause: shed (the owner's DLV full), given_up_or_forgotten (the redelivery ceiling, or an interval pushed off the history cap)",
            copies_lost.clone(),
        );
        let messages_lost = Family::<Labels, Counter>::default();
        r.register(
            "messages_lost",
            "CHAT messages nobody got a durable copy of, by cause: evicted_before_fanout (verified), gap_unverified (possibly lost)",
            messages_lost.clone(),
        );
        let sweeps = Family::<Labels, Counter>::default();
        r.register(
            "revocation_sweeps",
            "DLV revocation sweeps (one owner each), by result: done, failed",
            sweeps.clone(),
        );
        let backpressure = Counter::default();
        r.register(
            "backpressure_episodes",
            "Episodes of an owner's dinbox backlog at its high water (fan-out holds its copies back), counted from the daemon's DinboxBackpressure events",
            backpressure.clone(),
        );
        let healthy = Gauge::default();
        r.register(
            "healthy",
            "1 when the daemon is active: lease ready, every feed open, writes succeeding",
            healthy.clone(),
        );
        let serving = Gauge::default();
        r.register(
            "serving",
            "1 when every feed is open and control requests are served",
            serving.clone(),
        );
        let degraded = Family::<Labels, Gauge>::default();
        r.register("degraded", "1 for each reason the daemon is degraded now (lease-not-held, fanout-down, writes-failing …)", degraded.clone());
        let feed_up = Family::<Labels, Gauge>::default();
        r.register("feed_up", "1 when the feed is open as the daemon's health tells (0 when it is down, disconnected, or the lease is not held)", feed_up.clone());
        let lease = Family::<Labels, Gauge>::default();
        r.register(
            "lease_state",
            "1 for the lease machine's state now, 0 for the others",
            lease.clone(),
        );
        let fencing_token = Gauge::default();
        r.register("lease_fencing_token", "The fencing token (the lease create's revision) of the lease last acquired; 0 before one", fencing_token.clone());
        let joins = Family::<Labels, Counter>::default();
        r.register("joins", "Durable joins answered, by result: durable, not_durable (live class, evicted window …), failed", joins.clone());
        let leaves = Family::<Labels, Counter>::default();
        r.register(
            "leaves",
            "Durable leaves answered, by result: ok, failed",
            leaves.clone(),
        );
        let join_seconds = latency();
        r.register(
            "join_duration_seconds",
            "From a durableJoin request's arrival to its answer",
            join_seconds.clone(),
        );
        let leave_seconds = latency();
        r.register(
            "leave_duration_seconds",
            "From a durableLeave request's arrival to its answer",
            leave_seconds.clone(),
        );
        for feed in Feed::ALL {
            feed_up
                .get_or_create(&label("feed", feed.to_string()))
                .set(0);
        }
        for state in LEASE_STATES {
            lease.get_or_create(&label("state", state)).set(0);
        }
        let transferred_direct = transferred.get_or_create(&label("path", "direct")).clone();
        let transferred_reader = transferred.get_or_create(&label("path", "reader")).clone();
        DaemonMetrics {
            registry: root,
            space: space.to_owned(),
            core,
            transferred_direct,
            transferred_reader,
            copies_lost,
            messages_lost,
            sweeps,
            backpressure,
            healthy,
            serving,
            degraded,
            feed_up,
            lease,
            fencing_token,
            joins,
            leaves,
            join_seconds,
            leave_seconds,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// One input of the daemon's machine: a `durableJoin` or `durableLeave` on its control
    /// subject starts that request's clock.
    pub fn input(&self, input: &Input) {
        let Input::Inbound(Inbound::Message {
            subject,
            reply: Some(_),
            payload,
            ..
        }) = input
        else {
            return;
        };
        let Ok(Subject::Control {
            space,
            service: ControlService::Delivery,
            sender,
        }) = Subject::parse(subject)
        else {
            return;
        };
        if space.as_str() != self.space {
            return;
        }
        let Ok(request) = serde_json::from_slice::<ControlRequest>(payload) else {
            return;
        };
        let (op, channel) = match DeliveryRequest::from_request(&request) {
            Ok(DeliveryRequest::DurableJoin { channel, .. }) => (Op::Join, channel),
            Ok(DeliveryRequest::DurableLeave { channel, .. }) => (Op::Leave, channel),
            _ => return,
        };
        let now = Instant::now();
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, at| now.duration_since(*at) < PENDING_TTL);
        }
        if pending.len() < MAX_PENDING {
            pending.insert(
                (op, sender.as_str().to_owned(), channel.as_str().to_owned()),
                now,
            );
        }
    }

    /// One event of the daemon: lease, answers to joins and leaves, back-pressure.
    pub fn event(&self, event: &DeliveryEvent) {
        match event {
            DeliveryEvent::Lease(LeaseEvent::Acquired { token }) => {
                self.fencing_token.set(gauge_value(token.0));
            }
            DeliveryEvent::DinboxBackpressure { .. } => {
                self.backpressure.inc();
            }
            DeliveryEvent::Joined {
                owner,
                channel,
                durable,
                ..
            } => {
                let result = if *durable { "durable" } else { "not_durable" };
                self.joins.get_or_create(&label("result", result)).inc();
                self.answered(Op::Join, owner.as_str(), channel.as_str());
            }
            DeliveryEvent::JoinFailed { owner, channel, .. } => {
                self.joins.get_or_create(&label("result", "failed")).inc();
                self.answered(Op::Join, owner.as_str(), channel.as_str());
            }
            DeliveryEvent::Left { owner, channel, .. } => {
                self.leaves.get_or_create(&label("result", "ok")).inc();
                self.answered(Op::Leave, owner.as_str(), channel.as_str());
            }
            DeliveryEvent::LeaveFailed { owner, channel, .. } => {
                self.leaves.get_or_create(&label("result", "failed")).inc();
                self.answered(Op::Leave, owner.as_str(), channel.as_str());
            }
            DeliveryEvent::Abandoned {
                owner,
                channel: Some(channel),
                ..
            } => {
                let mut pending = lock(&self.pending);
                for op in [Op::Join, Op::Leave] {
                    pending.remove(&(op, owner.as_str().to_owned(), channel.as_str().to_owned()));
                }
            }
            _ => {}
        }
    }

    fn answered(&self, op: Op, owner: &str, channel: &str) {
        let started = lock(&self.pending).remove(&(op, owner.to_owned(), channel.to_owned()));
        if let Some(at) = started {
            let seconds = at.elapsed().as_secs_f64();
            match op {
                Op::Join => self.join_seconds.observe(seconds),
                Op::Leave => self.leave_seconds.observe(seconds),
            }
        }
    }

    /// The OpenMetrics text, with the counters and state of `status` (`None`: the daemon has
    /// stopped; the last values stay).
    pub fn render(&self, status: Option<&DaemonStatus>) -> String {
        if let Some(status) = status {
            self.update(status);
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            // Writing to a String does not fail; if the encoder refuses, say so in the body.
            return format!("# encoding failed: {e}\n# EOF\n");
        }
        out
    }

    fn update(&self, status: &DaemonStatus) {
        let c = &status.counters;
        for core in &self.core {
            catch_up(&core.counter, (core.read)(c));
        }
        catch_up(&self.transferred_direct, c.transferred_direct);
        catch_up(
            &self.transferred_reader,
            c.transferred.saturating_sub(c.transferred_direct),
        );
        catch_up(
            &self.copies_lost.get_or_create(&label("cause", "shed")),
            c.dlv_shed,
        );
        catch_up(
            &self
                .copies_lost
                .get_or_create(&label("cause", "given_up_or_forgotten")),
            c.lost.saturating_sub(c.dlv_shed),
        );
        catch_up(
            &self
                .messages_lost
                .get_or_create(&label("cause", "evicted_before_fanout")),
            c.evicted_before_fanout,
        );
        catch_up(
            &self
                .messages_lost
                .get_or_create(&label("cause", "gap_unverified")),
            c.gaps_unverified,
        );
        catch_up(
            &self.sweeps.get_or_create(&label("result", "done")),
            c.dlv_sweeps,
        );
        catch_up(
            &self.sweeps.get_or_create(&label("result", "failed")),
            c.dlv_sweeps_failed,
        );
        let reasons = match &status.health {
            DeliveryHealth::Active => Default::default(),
            DeliveryHealth::Degraded(reasons) => reasons.clone(),
        };
        self.healthy
            .set(flag(matches!(status.health, DeliveryHealth::Active)));
        self.serving.set(flag(status.serving));
        self.degraded.clear();
        for reason in &reasons {
            self.degraded
                .get_or_create(&label("reason", reason.to_string()))
                .set(1);
        }
        let everything_down = reasons.iter().any(|r| {
            matches!(
                r,
                DegradedReason::Disconnected
                    | DegradedReason::LeaseNotHeld
                    | DegradedReason::Stopped
            )
        });
        for feed in Feed::ALL {
            let down = everything_down || reasons.contains(&DegradedReason::FeedDown(feed));
            self.feed_up
                .get_or_create(&label("feed", feed.to_string()))
                .set(flag(!down));
        }
        let now = lease_label(status.lease);
        for state in LEASE_STATES {
            self.lease
                .get_or_create(&label("state", state))
                .set(flag(state == now));
        }
    }
}
