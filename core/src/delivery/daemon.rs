//! The delivery daemon machine: the privileged side of the durable backstop for one space and one
//! shard (semantics §2 (g)–(m); invariants I7–I21, I25–I31; gaps G1–G4, G6, G22–G27, G32–G38,
//! G40).
//!
//! [`Delivery`] is an [`io::Machine`](crate::io::Machine). It composes the pure pieces of this
//! module tree: the [`Lease`] machine, the control gate ([`admit`]), the registry plans
//! ([`crate::registry`]), the fan-out router ([`route()`]) and the reader's decision
//! ([`authorize()`]).
//!
//! # Life cycle
//!
//! 1. **Boot.** On the first [`Connection::Restored`] the machine acquires its shard's lease
//!    (`lease.<i>` in `cotal_delivery_<space>`). Nothing else happens before the lease is held:
//!    no watch, no consumer, no registry write.
//! 2. **Feeds.** Once acquired: KV watches of the members, ACL, channels and presence buckets
//!    (in-memory views, [`index`]) and the `ctl.delivery.*` subscription. When every watch has
//!    delivered its initial values, the fan-out and reader consumers are bound (`create: true`).
//!    When both are bound the lease is marked ready (I30: ready proves the responders are up), and
//!    control requests start being served.
//! 3. **Control** ([`super::control`]): each request is admitted by the gate (bound reply first,
//!    D1/I27), requests of other shards' owners are left to their daemon, and the rest run as
//!    jobs serialized per `(owner, channel)` (G22). A join reads the owner's ACL **fresh** from KV,
//!    the CHAT frontier, and the member key, plans with [`plan_join`] (watermark join cursor G1,
//!    generation floor G34), writes with CAS (re-read and re-plan on conflict, at most
//!    [`KV_CAS_ATTEMPTS`]), reads the fence, copies `(J, fence]` from CHAT into the owner's
//!    dinbox, checks for eviction, then tombstones (eviction) or activates.
//! 4. **Fan-out**: every CHAT delivery is routed against the in-memory membership index (fed by
//!    the watch **and** by our own confirmed writes), every entry is published at once, and the
//!    CHAT delivery is acked only after every PubAck; any failure naks it with backoff. A copy
//!    whose owner's dinbox backlog is at [`DINBOX_HIGH_WATER`] is **held** in memory with its
//!    CHAT delivery unsettled and written, in CHAT order, as soon as the reader has drained the
//!    owner below the mark; the held deliveries fill the fan-out window, which pauses fan-out.
//!    A hold older than [`FANOUT_HOLD_LIMIT`] gives up and naks the message instead (its
//!    redelivery writes the held copies).
//! 5. **Reader**: every dinbox entry is authorized against the in-memory ACL and membership views,
//!    transferred to `dlv.<owner>` and acked only after the DLV PubAck (I21).
//!
//! # Decisions
//!
//! - **Fencing (G23).** Every registry write takes the lease's fencing token at the moment it is
//!   planned ([`Lease::fencing_token`]); without one the job is abandoned with no reply (the
//!   successor daemon answers the same request). A [`RegistryError::Fenced`] refusal is reported
//!   and abandons the job the same way. Losing the lease stops everything: feeds closed, jobs
//!   abandoned, health degraded. The machine never re-acquires on its own; a driver that wants
//!   to try again builds a new [`Delivery`].
//! - **The fence** is `max(CHAT frontier read after the commit, highest fan-out sequence this
//!   machine has received)`. Fan-out runs inside this machine, so "fan-out progress" is known
//!   exactly without a consumer-info read (G9 cannot happen): a message received before the
//!   commit confirmed is `≤` that maximum and is copied by catch-up; one received after is routed
//!   from an index that already holds the commit.
//! - **A leave during catch-up wins (B9/B21, G22).** A join in catch-up releases its key, so a
//!   leave of the same `(owner, channel)` runs at once (another join of that key still waits).
//!   When catch-up ends while that leave is running, the activation waits for it, then plans
//!   from a fresh read: a tombstone makes it [`ActivatePlan::Superseded`] and the join answers
//!   `durable:false` ("activation superseded …").
//! - **Eviction (G8, I13).** Catch-up reads the channel's messages in `(J, fence]`. The window
//!   counts as evicted when (a) the CHAT stream's first stored sequence is above `J + 1`
//!   (everything in between is gone, whatever its channel), or (b) a sender subject of the channel
//!   holds at least [`MAX_MSGS_PER_SUBJECT`] messages inside the window and its oldest one is above
//!   `J + 1` (the subject is at its cap and may have discarded in-window messages). Both are
//!   conservative: they may report a loss that did not happen, never hide one that did. The
//!   reported range is `J+1 ..= last possibly evicted sequence`. Copies are still written for
//!   everything retained; then the record is tombstoned at the fence and the join answers
//!   `durable:false` with the range in an event.
//! - **Catch-up write failures (G24).** A dinbox publish of catch-up is retried
//!   [`CATCHUP_PUBLISH_ATTEMPTS`] times; then the join answers `ok:false` naming the sequence, the
//!   record stays pending (it routes), and a retry of the join resumes catch-up over the same
//!   window.
//! - **Per-owner caps (G6).** The daemon counts, per owner, entries it stored minus entries the
//!   reader settled since it started. Crossing [`MAX_MSGS_PER_SUBJECT`] reports
//!   [`DeliveryEvent::DinboxCapReached`]: older entries of that owner are about to be discarded by
//!   the INBOX stream. The count is a lower bound (entries written before this daemon started are
//!   not counted).
//! - **Sharding (G36).** Shard `i` of `N` owns the owners [`Shard::owns`] picks: it routes only
//!   to them, answers only their control requests, and its reader (which sees every dinbox entry,
//!   through its own durable) acks other shards' entries without looking at them.
//! - **Revocation (issue 9).** Every ACL change the watch reports for an owner of this shard
//!   (every record, once, at start or takeover) queues a sweep of that owner's DLV subject
//!   ([`crate::delivery::revoke`]): copies the owner's current ACL no longer admits are deleted,
//!   each one a [`DeliveryEvent::DlvRevocation`] and counted in `dlv_revoked`. The sweep runs only
//!   while the lease is held, the connection is up and the ACL view is loaded.
//! - **Reconnect (I35).** On [`Connection::Lost`] every feed is gone, control jobs are abandoned
//!   (their requesters time out and retry; every step is idempotent), and unsettled deliveries are
//!   forgotten (the broker redelivers them). On [`Connection::Restored`] watches, subscription and
//!   consumers are opened again. The in-memory views are kept: the watches replay the last entry of
//!   every key (delete markers included) and views only move forward by revision.

pub mod index;

use crate::constants::{
    DEFAULT_ORPHAN_RETENTION, KV_CAS_ATTEMPTS, MAX_MSGS_PER_SUBJECT, ORPHAN_SCAN_INTERVAL, backoff,
};
use crate::delivery::authorize::{
    Anomaly, Decision, DropReason, GiveUp, after_transfer_failure, authorize, decode_entry,
    dlv_payload,
};
use crate::delivery::backlog::{BACKLOG_RECHECK, DlvAdmit, DlvBacklog, InboxBacklog, OWNER_CAP};
use crate::delivery::control::{
    Admission, SerialKey, Unanswerable, Work, admit, durable_join_reply, durable_leave_reply,
    encode_reply, failure_reply, list_memberships_reply, live_class_join_reply,
};
use crate::delivery::gap::{SeqRange, SequenceCursor, missing};
use crate::delivery::lease::{
    HEALTH_FIELD, Lease, LeaseCommand, LeaseConfig, LeaseEntry, LeaseEvent, LeaseReply, LeaseState,
    ORPHANS_FIELD,
};
use crate::delivery::losses::{LossNotices, LossReason, NoticeOutcome, NoticeStep};
use crate::delivery::revoke::{DlvSweeper, SweepEvent};
use crate::delivery::route::{MentionSkipReason, Routed, route};
use crate::io::{
    AckKind, Command, Completion, Connection, Inbound, Input, KvCondition, KvEntry, KvOperation,
    Machine, ReadStart, Reply, StoredMessage, SubId, SubIds,
};
use crate::ledger::DeliveryId;
use crate::op::{Failure, OpId, OpIds, Outcome, TimerTable};
use crate::registry::{
    ActivatePlan, ClosedInterval, JoinPlan, MemberSnapshot, Precondition, RegistryError,
    TombstonePlan, WatermarkUse, WriteIntent, Writer, current_interval, durable_eligible,
    plan_activate, plan_join, plan_tombstone,
};
use crate::time::{Duration, Instant, Now};
use crate::wire::config::{ConsumerSpec, SpaceStream};
use crate::wire::control::{REASON_LIVE_CLASS, REASON_PARTIALLY_EVICTED, REASON_SUPERSEDED};
use crate::wire::json;
use crate::wire::keys::{KvBucket, acl_key, member_key};
use crate::wire::message::CotalMessage;
use crate::wire::records::{
    DeliveryLease, MemberState, MembershipRecord, Plane3Entry, Plane3Reason,
};
use crate::wire::shard::Shard;
use crate::wire::subject::{
    Subject, chat_subscribe_pattern, chat_wildcard, delivery_control_pattern,
};
use crate::wire::token::{AgentId, ConcreteChannel, Space};
use index::{AclIndex, MemberIndex, Roster};
pub use index::{PresenceFault, PresenceIgnored};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// How many times catch-up publishes one dinbox copy before the join fails (G24).
pub const CATCHUP_PUBLISH_ATTEMPTS: u32 = 3;

/// Messages per catch-up stream read (the reference's history batch).
pub const DEFAULT_CATCHUP_PAGE: u32 = crate::constants::HISTORY_FETCH_MAX_BATCH;

/// Default flow-control window of the fan-out consumer (CHAT messages in flight at once).
pub const DEFAULT_FANOUT_WINDOW: u32 = 64;

pub use super::backlog::DINBOX_HIGH_WATER;

/// The longest fan-out keeps a CHAT delivery unsettled while some of its copies are held back
/// (their owner's dinbox backlog is at [`DINBOX_HIGH_WATER`]): a third of the fan-out consumer's
/// `ack_wait` (60 s), so the server never redelivers a message the daemon still holds. Past it
/// the delivery is naked with [`backpressure_delay`] and its redelivery writes the held copies.
pub const FANOUT_HOLD_LIMIT: crate::time::Duration = crate::time::Duration::from_millis(20_000);

/// The first nak delay of a CHAT delivery whose hold gave up ([`FANOUT_HOLD_LIMIT`]); each
/// redelivery that gives up again doubles it, up to [`BACKPRESSURE_MAX_DELAY`]
/// ([`backpressure_delay`]).
pub const BACKPRESSURE_DELAY: crate::time::Duration = crate::time::Duration::from_millis(200);

/// The longest nak delay of a held-back CHAT delivery: a long hold costs one redelivery per
/// message every few seconds, not a hot loop.
pub const BACKPRESSURE_MAX_DELAY: crate::time::Duration = crate::time::Duration::from_millis(5000);

/// The nak delay of a CHAT delivery held back on its `delivery_count`-th delivery.
pub fn backpressure_delay(delivery_count: u64) -> crate::time::Duration {
    let doublings = u32::try_from(delivery_count.saturating_sub(1).min(5)).unwrap_or(5);
    let ms = BACKPRESSURE_DELAY
        .as_millis()
        .saturating_mul(1 << doublings);
    crate::time::Duration::from_millis(ms.min(BACKPRESSURE_MAX_DELAY.as_millis()))
}

/// Reads of a skipped CHAT range tried before it is reported as possibly lost
/// ([`DeliveryEvent::EvictedBeforeFanout`] with `verified: false`).
pub const GAP_CHECK_ATTEMPTS: u32 = 3;

/// Default flow-control window of the reader consumer.
pub const DEFAULT_READER_WINDOW: u32 = 256;

/// The nak delay of a delivery a stopping daemon hands back (or one that arrives on a feed it
/// closed): long enough that the closed feed's own pull request is gone from the server, so the
/// redelivery goes to a successor rather than back into the dead pull (which would hold it for
/// the consumer's whole `ack_wait`); short next to that `ack_wait` (60 s).
pub const HAND_BACK_DELAY: crate::time::Duration = crate::time::Duration::from_millis(1000);

/// Default bound on control requests held at once (running and queued, R18). A request over it is
/// refused with an error reply.
pub const DEFAULT_MAX_REQUESTS: usize = 1024;

/// At most this many orphaned memberships are listed in the lease record (the count is exact).
pub const MAX_PUBLISHED_ORPHANS: usize = 100;

/// The configuration of one daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// The space served.
    pub space: Space,
    /// The shard held (default: shard 0 of 1).
    pub shard: Shard,
    /// The daemon id: the lease holder and every record's `writerIdentity`.
    pub daemon_id: String,
    /// Lease timing.
    pub lease: LeaseConfig,
    /// Messages per catch-up read.
    pub catchup_page: u32,
    /// Fan-out consumer window.
    pub fanout_window: u32,
    /// Reader consumer window.
    pub reader_window: u32,
    /// Bound on control requests held at once.
    pub max_requests: usize,
    /// Test-only: restores the reference behaviour of gap G2 so the simulator can prove the
    /// oracle sees it. The reader then judges a `durable-channel` entry by the record's
    /// **current** interval only, ignoring `entry.generation`: after a leave and a rejoin, the
    /// pending entries of the previous generation are dropped (semantics §4 G2, I18). Always
    /// `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g2: bool,
    /// Test-only: restores the reference behaviour of gap G23 so the simulator can prove the
    /// oracle sees it. The lease then keeps no deadline of its own
    /// ([`LeaseConfig::with_reference_gap_g23`]): a daemon that was stalled past the lease TTL
    /// keeps its fencing token and writes until a renew CAS fails (semantics §2(m), G23, I30).
    /// Always `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g23: bool,
    /// Test-only: switches the DLV revocation sweep off ([`crate::delivery::revoke`]), as the
    /// reference has none, so the simulator can prove the oracle sees copies of a narrowed
    /// channel left in DLV (issue 9). Always `false` outside tests.
    #[doc(hidden)]
    pub reference_no_dlv_sweep: bool,
    /// How long an owner may be offline (no presence heartbeat seen by this daemon) before its
    /// open memberships count as orphaned (issue 15 item 7, G12). They are reported
    /// ([`DeliveryEvent::MembershipOrphaned`]) and published in the lease record's
    /// [`ORPHANS_FIELD`] either way.
    pub orphan_retention: Duration,
    /// Tombstone orphaned memberships (through the daemon's own leave, fenced as any leave).
    /// Off by default: only an operator opts in.
    pub reap_orphans: bool,
    /// Test-only: restores the reference's `@mention` resolution (G17) so the simulator can
    /// prove the oracle sees it: every presence entry ever seen counts, offline ghosts and
    /// mismatched keys included, and a name the roster never saw is unknown (no provisioned
    /// directory). Always `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g17: bool,
}

impl DeliveryConfig {
    /// The defaults for `shard` of `space`, run as `daemon_id`.
    pub fn new(space: Space, shard: Shard, daemon_id: impl Into<String>) -> Self {
        DeliveryConfig {
            space,
            shard,
            daemon_id: daemon_id.into(),
            lease: LeaseConfig::default(),
            catchup_page: DEFAULT_CATCHUP_PAGE,
            fanout_window: DEFAULT_FANOUT_WINDOW,
            reader_window: DEFAULT_READER_WINDOW,
            max_requests: DEFAULT_MAX_REQUESTS,
            reference_gap_g2: false,
            reference_gap_g23: false,
            reference_no_dlv_sweep: false,
            orphan_retention: DEFAULT_ORPHAN_RETENTION,
            reap_orphans: false,
            reference_gap_g17: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Health, counters, events
// ---------------------------------------------------------------------------------------------

/// The feeds the daemon keeps open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Feed {
    /// KV watch of `cotal_members_<space>`.
    Members,
    /// KV watch of `cotal_acl_<space>`.
    Acl,
    /// KV watch of `cotal_channels_<space>`.
    Channels,
    /// KV watch of `cotal_presence_<space>`.
    Presence,
    /// The `ctl.delivery.*` subscription.
    Control,
    /// The fan-out consumer on CHAT.
    Fanout,
    /// The trusted reader on INBOX.
    Reader,
}

impl Feed {
    const WATCHES: [Feed; 4] = [Feed::Members, Feed::Acl, Feed::Channels, Feed::Presence];
    const ALL: [Feed; 7] = [
        Feed::Members,
        Feed::Acl,
        Feed::Channels,
        Feed::Presence,
        Feed::Control,
        Feed::Fanout,
        Feed::Reader,
    ];

    fn bucket(self) -> Option<KvBucket> {
        match self {
            Feed::Members => Some(KvBucket::Members),
            Feed::Acl => Some(KvBucket::Acl),
            Feed::Channels => Some(KvBucket::Channels),
            Feed::Presence => Some(KvBucket::Presence),
            _ => None,
        }
    }
}

impl fmt::Display for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feed::Members => "members",
            Feed::Acl => "acl",
            Feed::Channels => "channels",
            Feed::Presence => "presence",
            Feed::Control => "control",
            Feed::Fanout => "fanout",
            Feed::Reader => "reader",
        })
    }
}

/// Why the backstop is not (fully) working.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DegradedReason {
    /// No connection to the broker.
    Disconnected,
    /// The lease is not held yet (acquiring, or not started).
    LeaseNotHeld,
    /// The lease is held but not marked ready yet.
    LeaseNotReady,
    /// The lease was lost, acquisition failed, or it was released: this machine does no more work.
    Stopped,
    /// A feed is not open (opening, or being retried after a refusal or failure).
    FeedDown(Feed),
    /// The last fan-out of a message could not store every copy (it is being retried).
    WritesFailing,
}

/// The delivery-health surface (D10, G40 from the daemon's side).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryHealth {
    /// Lease ready, every feed open, writes succeeding.
    Active,
    /// Not working, or working with known problems.
    Degraded(BTreeSet<DegradedReason>),
}

impl fmt::Display for DeliveryHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryHealth::Active => f.write_str("active"),
            DeliveryHealth::Degraded(reasons) => {
                f.write_str("degraded(")?;
                for (i, r) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{r}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl fmt::Display for DegradedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DegradedReason::Disconnected => f.write_str("disconnected"),
            DegradedReason::LeaseNotHeld => f.write_str("lease-not-held"),
            DegradedReason::LeaseNotReady => f.write_str("lease-not-ready"),
            DegradedReason::Stopped => f.write_str("stopped"),
            DegradedReason::FeedDown(feed) => write!(f, "{feed}-down"),
            DegradedReason::WritesFailing => f.write_str("writes-failing"),
        }
    }
}

impl DeliveryHealth {
    /// The published form, written into the lease record's [`HEALTH_FIELD`] so that agents (who
    /// may read the lease key) see it: `{"state":"active"}` or
    /// `{"state":"degraded","reasons":["fanout-down", …]}`. Reference peers ignore the field.
    pub fn to_published(&self) -> serde_json::Value {
        match self {
            DeliveryHealth::Active => serde_json::json!({ "state": "active" }),
            DeliveryHealth::Degraded(reasons) => serde_json::json!({
                "state": "degraded",
                "reasons": reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
        }
    }
}

/// Counters of everything the daemon did and lost since it was built.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryCounters {
    /// Dinbox copies newly stored (fan-out and catch-up).
    pub copies_written: u64,
    /// Dinbox publishes the duplicate window collapsed.
    pub copies_duplicate: u64,
    /// Copies handed off to DLV.
    pub transferred: u64,
    /// Entries the reader dropped (deny).
    pub dropped: u64,
    /// Entries the reader deferred (nak).
    pub deferred: u64,
    /// Entries terminated: give-ups after the redelivery ceiling (G3) and anomalies (G32).
    pub terminated: u64,
    /// Copies lost: give-ups plus drops of possibly valid copies (forgotten intervals).
    pub lost: u64,
    /// Catch-up windows found evicted.
    pub evicted_ranges: u64,
    /// Failed or unknown dinbox / DLV / registry writes.
    pub writes_failed: u64,
    /// CAS conflicts that made a job re-read and re-plan.
    pub cas_retries: u64,
    /// Registry writes refused because a newer daemon wrote the record (G23).
    pub fenced: u64,
    /// Times the lease was lost.
    pub lease_lost: u64,
    /// Times an owner's dinbox backlog crossed the per-owner cap (G6).
    pub cap_reached: u64,
    /// CHAT deliveries with a copy held back because its owner's dinbox backlog was at
    /// [`DINBOX_HIGH_WATER`].
    pub fanout_deferred: u64,
    /// Held CHAT deliveries naked because the hold reached [`FANOUT_HOLD_LIMIT`].
    pub fanout_hold_expired: u64,
    /// Copies the reader shed because the owner's DLV held the per-owner cap of unread copies
    /// (each also counted in `lost` and reported as [`DeliveryEvent::CopyShed`]).
    pub dlv_shed: u64,
    /// Reads of an owner's DLV consumer (or of the reader consumer) that failed: the backlog
    /// they would have checked is unverified ([`DeliveryEvent::BacklogUnverified`]).
    pub backlog_unverified: u64,
    /// CHAT messages fan-out never saw because the stream evicted them first (verified by a
    /// read): nobody got a durable copy of them.
    pub evicted_before_fanout: u64,
    /// CHAT messages fan-out stepped over whose loss could not be checked (reported as possibly
    /// lost).
    pub gaps_unverified: u64,
    /// CHAT messages fan-out terminated as anomalies (not chat, undecodable, spoofed).
    pub fanout_anomalies: u64,
    /// Control requests abandoned without a reply (lease or connection lost).
    pub abandoned: u64,
    /// DLV copies deleted by the revocation sweep: their owner's ACL no longer admits them
    /// ([`crate::delivery::revoke`]).
    pub dlv_revoked: u64,
    /// DLV sweeps (one owner each) that finished.
    pub dlv_sweeps: u64,
    /// DLV sweeps that gave up: revoked copies may still wait in the owner's DLV.
    pub dlv_sweeps_failed: u64,
    /// Memberships found orphaned: the owner offline beyond [`DeliveryConfig::orphan_retention`].
    pub orphans_found: u64,
    /// Orphaned memberships this daemon tombstoned ([`DeliveryConfig::reap_orphans`]).
    pub orphans_reaped: u64,
    /// `durableJoin`s answered `durable:false` because the channel resolves live: no record was
    /// written (G38, [`REASON_LIVE_CLASS`]).
    pub live_class_joins: u64,
    /// Presence keys that started to be ignored for `@mention` resolution (a `card.id` that is
    /// not the key, or a name squatted from another provisioned identity), once per episode
    /// ([`DeliveryEvent::PresenceIgnored`]).
    pub presence_ignored: u64,
    /// Mentions on a live channel whose name matched several owners: nobody got a copy
    /// ([`DeliveryEvent::MentionUnresolved`]).
    pub mentions_ambiguous: u64,
    /// Mentions on a live channel whose name matched nobody ([`DeliveryEvent::MentionUnresolved`]).
    pub mentions_unknown: u64,
    /// Writes of a member's loss record ([`crate::delivery::losses`]).
    pub loss_notices_written: u64,
    /// Reads or writes of a loss record that failed (CAS conflicts included; each retried).
    pub loss_notices_failed: u64,
}

impl DeliveryCounters {
    /// Adds `other` field by field (the counters of several shards' daemons as one). The
    /// destructuring is exhaustive, so a new counter cannot be forgotten here.
    pub fn add(&mut self, other: &DeliveryCounters) {
        let DeliveryCounters {
            copies_written,
            copies_duplicate,
            transferred,
            dropped,
            deferred,
            terminated,
            lost,
            evicted_ranges,
            writes_failed,
            cas_retries,
            fenced,
            lease_lost,
            cap_reached,
            fanout_deferred,
            fanout_hold_expired,
            dlv_shed,
            backlog_unverified,
            evicted_before_fanout,
            gaps_unverified,
            fanout_anomalies,
            abandoned,
            dlv_revoked,
            dlv_sweeps,
            dlv_sweeps_failed,
            live_class_joins,
            orphans_found,
            orphans_reaped,
            presence_ignored,
            mentions_ambiguous,
            mentions_unknown,
            loss_notices_written,
            loss_notices_failed,
        } = other;
        self.copies_written += copies_written;
        self.copies_duplicate += copies_duplicate;
        self.transferred += transferred;
        self.dropped += dropped;
        self.deferred += deferred;
        self.terminated += terminated;
        self.lost += lost;
        self.evicted_ranges += evicted_ranges;
        self.writes_failed += writes_failed;
        self.cas_retries += cas_retries;
        self.fenced += fenced;
        self.lease_lost += lease_lost;
        self.cap_reached += cap_reached;
        self.fanout_deferred += fanout_deferred;
        self.fanout_hold_expired += fanout_hold_expired;
        self.dlv_shed += dlv_shed;
        self.backlog_unverified += backlog_unverified;
        self.evicted_before_fanout += evicted_before_fanout;
        self.gaps_unverified += gaps_unverified;
        self.fanout_anomalies += fanout_anomalies;
        self.abandoned += abandoned;
        self.dlv_revoked += dlv_revoked;
        self.dlv_sweeps += dlv_sweeps;
        self.dlv_sweeps_failed += dlv_sweeps_failed;
        self.live_class_joins += live_class_joins;
        self.orphans_found += orphans_found;
        self.orphans_reaped += orphans_reaped;
        self.presence_ignored += presence_ignored;
        self.mentions_ambiguous += mentions_ambiguous;
        self.mentions_unknown += mentions_unknown;
        self.loss_notices_written += loss_notices_written;
        self.loss_notices_failed += loss_notices_failed;
    }
}

/// Why fan-out terminated a CHAT delivery without routing it (G32).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FanoutAnomaly {
    /// The subject is not a chat subject of this space.
    NotChat,
    /// The payload is not a message.
    Undecodable(String),
    /// `from.id` differs from the subject's sender.
    Spoofed {
        /// The subject's sender.
        sender: AgentId,
        /// The claimed `from.id`.
        claimed: AgentId,
    },
}

/// Why a control job ended without a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AbandonReason {
    /// The lease is no longer held (or its deadline passed): no fencing token.
    LeaseNotHeld,
    /// A newer daemon wrote the record (G23).
    Fenced(RegistryError),
    /// The connection was lost.
    ConnectionLost,
}

/// What the daemon reports. Every loss names member, channel and sequences.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryEvent {
    /// A lease fact (acquired, ready, renewed, lost, released …).
    Lease(LeaseEvent),
    /// The health surface changed.
    HealthChanged(DeliveryHealth),
    /// A control message got no reply at all (D1: unbound reply, not a request of this space).
    ControlIgnored(Unanswerable),
    /// A control request was refused with an error reply.
    ControlRefused {
        /// The subject's sender.
        requester: AgentId,
        /// The error text sent.
        error: String,
    },
    /// An open membership whose owner has been offline (no presence heartbeat seen) longer than
    /// [`DeliveryConfig::orphan_retention`] (G12). Reported once per episode; `reaping` says
    /// whether the daemon tombstones it (its leave then reports [`DeliveryEvent::Left`]).
    MembershipOrphaned {
        /// The owner.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The open generation.
        generation: u64,
        /// How long the owner has been offline as this daemon knows it (its own uptime at most).
        offline_for: Duration,
        /// Whether it is being tombstoned ([`DeliveryConfig::reap_orphans`]).
        reaping: bool,
    },
    /// A durable join answered.
    Joined {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The generation.
        generation: u64,
        /// The join cursor.
        join_cursor: u64,
        /// What the daemon did with the agent's watermark (G1); `None` for a resumed or already
        /// active membership.
        watermark: Option<WatermarkUse>,
        /// `durable` as answered.
        durable: bool,
        /// The reason of a `durable:false`.
        reason: Option<String>,
        /// Copies catch-up wrote.
        copied: u64,
    },
    /// A durable join answered `ok:false`.
    JoinFailed {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The error text sent.
        error: String,
    },
    /// A durable leave answered.
    Left {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The generation tombstoned (`None` when there was no record).
        generation: Option<u64>,
        /// The leave cursor stored (`None` when nothing was written).
        leave_cursor: Option<u64>,
    },
    /// A durable leave answered `ok:false`.
    LeaveFailed {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The error text sent.
        error: String,
    },
    /// A control job ended without a reply.
    Abandoned {
        /// The requester.
        owner: AgentId,
        /// The channel, for joins and leaves.
        channel: Option<ConcreteChannel>,
        /// Why.
        reason: AbandonReason,
    },
    /// Catch-up found part of `(J, fence]` evicted (I13): the join answered `durable:false`.
    Evicted {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The generation.
        generation: u64,
        /// First possibly evicted sequence.
        from_seq: u64,
        /// Last possibly evicted sequence.
        to_seq: u64,
    },
    /// A rejoin pushed closed intervals off the record's history cap: pending entries of these
    /// generations will be dropped (G2).
    HistoryForgotten {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The intervals forgotten.
        intervals: Vec<ClosedInterval>,
    },
    /// A dinbox copy could not be stored (fan-out naks and retries; catch-up retries, then fails
    /// the join).
    CopyWriteFailed {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The CHAT sequence.
        seq: u64,
        /// The generation.
        generation: u64,
        /// What the broker said (`None`: outcome unknown).
        failure: Option<Failure>,
    },
    /// Fan-out terminated a CHAT delivery (G32).
    FanoutTerminated {
        /// The CHAT sequence.
        seq: u64,
        /// The subject.
        subject: String,
        /// Why.
        anomaly: FanoutAnomaly,
    },
    /// The reader dropped an entry (acked without transfer).
    EntryDropped {
        /// The member.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The CHAT sequence.
        seq: u64,
        /// The entry's generation.
        generation: u64,
        /// Why.
        reason: DropReason,
    },
    /// The reader gave up on an entry after the redelivery ceiling: a reported loss (G3).
    EntryLost(GiveUp),
    /// The reader terminated a malformed entry (G32).
    EntryTerminated {
        /// The dinbox subject.
        subject: String,
        /// Why.
        anomaly: Anomaly,
    },
    /// An owner's dinbox backlog reached the stream's per-owner cap: older entries are being
    /// discarded (G6).
    DinboxCapReached {
        /// The owner.
        owner: AgentId,
        /// Entries stored and not yet settled, as counted by this daemon.
        backlog: u64,
    },
    /// CHAT messages the fan-out consumer stepped over because the stream no longer held them
    /// (evicted by its per-subject cap, or deleted) before fan-out was offered them: nobody got a
    /// durable copy of them ([`crate::delivery::gap`]). `verified: false` when the check could
    /// not be made: the range is only possibly lost.
    EvictedBeforeFanout {
        /// First sequence.
        first: u64,
        /// Last sequence.
        last: u64,
        /// Whether CHAT was read and found not to hold them.
        verified: bool,
    },
    /// An owner's dinbox backlog reached [`DINBOX_HIGH_WATER`]: fan-out holds its copies back
    /// (their CHAT deliveries stay unsettled) until the reader drains. Once per episode.
    DinboxBackpressure {
        /// The owner.
        owner: AgentId,
        /// Entries stored and not yet settled, as counted by this daemon.
        backlog: u64,
    },
    /// The owner's DLV already holds the per-owner cap of unread copies: this copy was not
    /// transferred (storing it would have pushed out an older unread one) and is lost, reported
    /// ([`crate::delivery::backlog`]). The dinbox entry is acked.
    CopyShed {
        /// The owner.
        owner: AgentId,
        /// The channel.
        channel: ConcreteChannel,
        /// The CHAT sequence.
        seq: u64,
        /// The membership generation of the copy.
        generation: u64,
        /// The owner's unread DLV copies as read.
        unread: u64,
    },
    /// A backlog read failed, so a per-owner cap is not verified for now: `owner` is the DLV
    /// owner, or `None` for the reader consumer (INBOX). Transfers and fan-out go on; the next
    /// read is made later ([`crate::delivery::backlog`]).
    BacklogUnverified {
        /// The DLV owner, or `None` for INBOX.
        owner: Option<AgentId>,
        /// Why.
        detail: String,
    },
    /// A read or write of a member's loss record failed ([`crate::delivery::losses`]); it is
    /// read again and retried, and after repeated failures waits for the member's next loss.
    LossNoticeFailed {
        /// The member.
        owner: AgentId,
        /// Why.
        detail: String,
    },
    /// The DLV revocation sweep deleted a copy, finished, retries or gave up
    /// ([`crate::delivery::revoke`]).
    DlvRevocation(SweepEvent),
    /// A presence key is ignored for `@mention` resolution from now on (issues 15 item 3, 21
    /// item 2): once per episode.
    PresenceIgnored(PresenceIgnored),
    /// A mention on a live channel reached nobody: its name matched several owners
    /// ([`MentionSkipReason::Ambiguous`]) or none ([`MentionSkipReason::Unknown`]).
    MentionUnresolved {
        /// The channel.
        channel: ConcreteChannel,
        /// The CHAT sequence.
        seq: u64,
        /// The mentioned name as written.
        name: String,
        /// Ambiguous or unknown.
        reason: MentionSkipReason,
    },
    /// A feed failed to open, was refused or ended; it is retried.
    FeedProblem {
        /// The feed.
        feed: Feed,
        /// What happened.
        detail: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Internal state
// ---------------------------------------------------------------------------------------------

type JobId = u64;
type BatchId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseOpKind {
    Create,
    Update,
    Delete,
    Get,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum JobOp {
    Acl,
    Frontier,
    Member,
    Write(Box<WriteIntent>),
    Fence,
    Read,
    Publish {
        seq: u64,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
        attempt: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pending {
    Lease {
        lease_op: OpId,
        kind: LeaseOpKind,
    },
    Open {
        feed: Feed,
        sub: SubId,
    },
    Job {
        job: JobId,
        what: JobOp,
    },
    Fanout {
        batch: BatchId,
        owner: AgentId,
        generation: u64,
    },
    Transfer {
        delivery: DeliveryId,
    },
    GapCheck {
        range: SeqRange,
        attempt: u32,
    },
    /// A read of the reader consumer's unread total.
    InboxBacklog,
    /// A read of an owner's `dlv_<owner>` consumer; `in_flight` of the owner's transfers were
    /// published and unacknowledged when it was sent (the read may or may not see them).
    DlvBacklog {
        owner: AgentId,
        in_flight: u64,
    },
    Sweep,
    Settle,
    /// A read or write of an owner's loss record.
    LossNotice {
        owner: AgentId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FeedState {
    Closed,
    Opening(SubId),
    Open(SubId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Timer {
    Reopen(Feed),
    GapCheck,
    /// While fan-out holds copies: reread the reader consumer's total (a hold may rest on an
    /// over-count) and give up holds older than [`FANOUT_HOLD_LIMIT`].
    HeldCopies,
    /// Look for orphaned memberships ([`ORPHAN_SCAN_INTERVAL`]).
    OrphanScan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FanoutBatch {
    delivery: DeliveryId,
    seq: u64,
    delivery_count: u64,
    channel: ConcreteChannel,
    outstanding: usize,
    failed: bool,
    /// Copies held back because their owner's dinbox backlog is at the high water, written by
    /// [`Delivery::release_held`] once the reader drained it. The delivery is settled only when
    /// none is left.
    held: Vec<Routed>,
    /// When the copies were held ([`FANOUT_HOLD_LIMIT`]).
    held_since: Option<Instant>,
    /// The hold gave up: nak the message once the others are stored, so its redelivery writes
    /// the copies that were held.
    deferred: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Transfer {
    delivery_count: u64,
    owner: AgentId,
    entry: Plane3Entry,
    /// The DLV copy's msg-id (the reader's decision).
    msg_id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JoinPhase {
    ReadAcl,
    ReadFrontier,
    ReadMember,
    Commit,
    ReadFence,
    CatchUp,
    WaitLane,
    ReadForFinish,
    WriteFinish,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct JoinJob {
    watermark: Option<u64>,
    phase: JoinPhase,
    attempts: u32,
    frontier: u64,
    generation: u64,
    join_cursor: u64,
    watermark_use: Option<WatermarkUse>,
    fence: u64,
    stream_first: u64,
    next_start: u64,
    exhausted: bool,
    outstanding: usize,
    copied: u64,
    /// Per sender subject of the channel: (messages in the window, first sequence seen).
    subjects: BTreeMap<String, (u64, u64)>,
    evicted: Option<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeavePhase {
    ReadMember,
    ReadFrontier,
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LeaveJob {
    generation: u64,
    phase: LeavePhase,
    attempts: u32,
    snapshot: Option<MemberSnapshot>,
    frontier: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum JobKind {
    Join(Box<JoinJob>),
    Leave(Box<LeaveJob>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Job {
    key: SerialKey,
    owner: AgentId,
    channel: ConcreteChannel,
    reply_to: String,
    kind: JobKind,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Lane {
    active: Option<JobId>,
    catching_up: Option<JobId>,
    finish_waiting: bool,
    queue: VecDeque<Work>,
}

/// The delivery daemon of one shard. See the [module docs](self).
///
/// Drive it as any [`Machine`]: feed [`Input`]s and expired deadlines, drain
/// [`poll_command`](Machine::poll_command) and [`poll_event`](Machine::poll_event), sleep until
/// [`poll_timeout`](Machine::poll_timeout). [`Delivery::shutdown`] releases the lease.
#[derive(Debug)]
pub struct Delivery {
    config: DeliveryConfig,
    lease: Lease,
    ops: OpIds,
    subs: SubIds,
    pending: BTreeMap<OpId, Pending>,
    commands: VecDeque<Command>,
    events: VecDeque<DeliveryEvent>,
    timers: TimerTable<Timer>,
    connected: bool,
    stopped: bool,
    feeds: BTreeMap<Feed, FeedState>,
    loaded: BTreeSet<Feed>,
    feed_failures: BTreeMap<Feed, u32>,
    members: MemberIndex,
    acls: AclIndex,
    channels: crate::policy::ChannelRegistry,
    roster: Roster,
    fanout_high: u64,
    fanout_cursor: SequenceCursor,
    /// Skipped CHAT ranges still to check, with the attempts made (the one being read is a
    /// [`Pending::GapCheck`]).
    gap_queue: VecDeque<(SeqRange, u32)>,
    next_batch: BatchId,
    batches: BTreeMap<BatchId, FanoutBatch>,
    transfers: BTreeMap<DeliveryId, Transfer>,
    writes_failing: bool,
    next_job: JobId,
    jobs: BTreeMap<JobId, Job>,
    lanes: BTreeMap<SerialKey, Lane>,
    held_requests: usize,
    inbox: InboxBacklog,
    dlv: DlvBacklog<DeliveryId>,
    /// Each member's losses on their way to its loss record ([`crate::delivery::losses`]).
    notices: LossNotices,
    /// Owners whose fan-out copies are held back (for one event per episode).
    backpressured: BTreeSet<AgentId>,
    /// The fan-out batches holding a copy for each owner, oldest first.
    held_for: BTreeMap<AgentId, BTreeSet<BatchId>>,
    counters: DeliveryCounters,
    health: DeliveryHealth,
    last_now: Option<Instant>,
    /// The DLV revocation sweep ([`crate::delivery::revoke`]).
    sweeper: DlvSweeper,
    /// When this daemon started watching presence: an owner never seen is offline since then.
    watching_since: Option<Instant>,
    /// The last presence heartbeat (a put that is not `offline`) seen per owner key.
    presence_seen: BTreeMap<AgentId, Instant>,
    /// The orphaned memberships of the last scan: `(owner, channel)` → generation.
    orphans: BTreeMap<(AgentId, ConcreteChannel), u64>,
}

impl Delivery {
    /// A daemon that does nothing until the first [`Connection::Restored`].
    pub fn new(config: DeliveryConfig) -> Self {
        let lease_config = if config.reference_gap_g23 {
            config.lease.with_reference_gap_g23()
        } else {
            config.lease
        };
        let lease = Lease::new(config.shard, config.daemon_id.clone(), lease_config);
        let sweeper = DlvSweeper::new(&config.space, config.shard);
        let mut d = Delivery {
            config,
            lease,
            ops: OpIds::new(),
            subs: SubIds::new(),
            pending: BTreeMap::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            timers: TimerTable::new(),
            connected: false,
            stopped: false,
            feeds: Feed::ALL.iter().map(|f| (*f, FeedState::Closed)).collect(),
            loaded: BTreeSet::new(),
            feed_failures: BTreeMap::new(),
            members: MemberIndex::new(),
            acls: AclIndex::new(),
            channels: crate::policy::ChannelRegistry::default(),
            roster: Roster::new(),
            fanout_high: 0,
            fanout_cursor: SequenceCursor::new(),
            gap_queue: VecDeque::new(),
            next_batch: 0,
            batches: BTreeMap::new(),
            transfers: BTreeMap::new(),
            writes_failing: false,
            next_job: 0,
            jobs: BTreeMap::new(),
            lanes: BTreeMap::new(),
            held_requests: 0,
            inbox: InboxBacklog::default(),
            dlv: DlvBacklog::default(),
            notices: LossNotices::default(),
            backpressured: BTreeSet::new(),
            held_for: BTreeMap::new(),
            counters: DeliveryCounters::default(),
            health: DeliveryHealth::Degraded(BTreeSet::new()),
            last_now: None,
            sweeper,
            watching_since: None,
            presence_seen: BTreeMap::new(),
            orphans: BTreeMap::new(),
        };
        d.health = d.compute_health();
        d
    }

    /// The configuration.
    pub fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    /// The health surface.
    pub fn health(&self) -> &DeliveryHealth {
        &self.health
    }

    /// The counters.
    pub fn counters(&self) -> &DeliveryCounters {
        &self.counters
    }

    /// The lease machine's state.
    pub fn lease_state(&self) -> LeaseState {
        self.lease.state()
    }

    /// The in-memory membership index.
    pub fn members(&self) -> &MemberIndex {
        &self.members
    }

    /// The DLV revocation sweeper (its queue and running sweep).
    pub fn sweeper(&self) -> &DlvSweeper {
        &self.sweeper
    }

    /// The highest CHAT sequence fan-out has received (the fan-out part of the fence).
    pub fn fanout_progress(&self) -> u64 {
        self.fanout_high
    }

    /// True once every feed is open and control requests are served.
    pub fn serving(&self) -> bool {
        !self.stopped && self.connected && Feed::ALL.iter().all(|f| self.feed_open(*f))
    }

    /// Shuts down: closes every feed, abandons jobs, and releases the lease (a successor's lease
    /// is never deleted, D6).
    pub fn shutdown(&mut self, now: Now) {
        self.observe(now);
        self.close_feeds();
        self.abandon_jobs(AbandonReason::LeaseNotHeld);
        self.give_up_gap_checks("the daemon stopped before checking");
        self.stopped = true;
        self.lease.release(now);
        self.after(now);
    }

    // ---- plumbing ----

    fn observe(&mut self, now: Now) {
        debug_assert!(
            self.last_now.is_none_or(|t| t <= now.at),
            "time went backwards"
        );
        self.last_now = Some(now.at);
    }

    fn op(&mut self, pending: Pending) -> OpId {
        let op = self.ops.next_id();
        self.pending.insert(op, pending);
        op
    }

    fn emit(&mut self, e: DeliveryEvent) {
        self.events.push_back(e);
    }

    fn publish_reply(&mut self, subject: &str, payload: bytes::Bytes) {
        if subject.is_empty() {
            // The daemon's own jobs (the orphan reaper's leaves) have no requester to answer.
            return;
        }
        self.commands.push_back(Command::Publish {
            subject: subject.to_owned(),
            headers: Vec::new(),
            payload,
        });
    }

    /// Settles a CHAT or dinbox delivery with a plain (unconfirmed) ack: nothing here waits on
    /// the outcome. An ack lost on the way means a redelivery after `ack_wait`, and redoing a
    /// fan-out or a transfer is collapsed by the copy's msg-id.
    fn settle(&mut self, delivery: DeliveryId, kind: AckKind) {
        let op = self.op(Pending::Settle);
        self.commands.push_back(Command::Settle {
            op,
            delivery,
            kind,
            confirm: false,
        });
    }

    fn writer(&self, now: Now) -> Option<Writer> {
        self.lease
            .fencing_token(now.at)
            .map(|t| Writer::new(self.config.daemon_id.clone(), t))
    }

    fn lease_held(&self) -> bool {
        matches!(self.lease.state(), LeaseState::Held | LeaseState::Ready)
    }

    fn feed_open(&self, feed: Feed) -> bool {
        matches!(self.feeds.get(&feed), Some(FeedState::Open(_)))
    }

    fn feed_of(&self, sub: SubId) -> Option<Feed> {
        self.feeds.iter().find_map(|(f, s)| match s {
            FeedState::Open(x) | FeedState::Opening(x) if *x == sub => Some(*f),
            _ => None,
        })
    }

    /// After every input: run the lease's commands and events, then recompute health.
    fn after(&mut self, now: Now) {
        loop {
            let mut progressed = false;
            while let Some(cmd) = self.lease.poll_command() {
                progressed = true;
                self.issue_lease(cmd);
            }
            while let Some(ev) = self.lease.poll_event() {
                progressed = true;
                self.on_lease_event(now, ev);
            }
            if !progressed {
                break;
            }
        }
        self.drive_sweeps(now);
        if self.watching_since.is_none() && self.serving() {
            self.watching_since = Some(now.at);
            self.timers
                .set(Timer::OrphanScan, now.at + self.orphan_scan_interval());
        }
        let health = self.compute_health();
        if health != self.health {
            // Published with the next lease write (every renew interval), for agents to read.
            self.lease.annotate(HEALTH_FIELD, health.to_published());
            self.health = health.clone();
            self.emit(DeliveryEvent::HealthChanged(health));
        }
    }

    /// Runs the DLV revocation sweep while this daemon may write and its ACL view is loaded
    /// (a view still loading could lack an owner's record, which the sweep reads as "revoke
    /// all"), and turns its events into counters.
    fn drive_sweeps(&mut self, now: Now) {
        if self.may_sweep() {
            for cmd in self.sweeper.pump(now.at, &mut self.ops) {
                if let Some(op) = cmd.op() {
                    self.pending.insert(op, Pending::Sweep);
                }
                self.commands.push_back(cmd);
            }
        }
        while let Some(e) = self.sweeper.poll_event() {
            match &e {
                SweepEvent::Revoked { .. } => self.counters.dlv_revoked += 1,
                SweepEvent::Finished { .. } => self.counters.dlv_sweeps += 1,
                SweepEvent::Failed { .. } => self.counters.dlv_sweeps_failed += 1,
                _ => {}
            }
            self.emit(DeliveryEvent::DlvRevocation(e));
        }
    }

    fn may_sweep(&self) -> bool {
        !self.config.reference_no_dlv_sweep
            && self.connected
            && !self.stopped
            && self.lease_held()
            && self.loaded.contains(&Feed::Acl)
    }

    /// A transfer to `owner`'s DLV completed (in any outcome) for a channel its **current** ACL no
    /// longer admits: the reader judged it under an older view, and the copy may have landed
    /// after a sweep read past it. Sweep again.
    fn sweep_if_revoked(&mut self, owner: &AgentId, channel: &ConcreteChannel) {
        let admitted = self
            .acls
            .get(owner)
            .is_some_and(|v| crate::delivery::authorize::acl_admits(&v.read, channel));
        if !admitted {
            self.sweeper.request(owner.clone());
        }
    }

    fn compute_health(&self) -> DeliveryHealth {
        let mut reasons = BTreeSet::new();
        if self.stopped {
            reasons.insert(DegradedReason::Stopped);
            return DeliveryHealth::Degraded(reasons);
        }
        if !self.connected {
            reasons.insert(DegradedReason::Disconnected);
        }
        match self.lease.state() {
            LeaseState::Ready => {}
            LeaseState::Held => {
                reasons.insert(DegradedReason::LeaseNotReady);
            }
            _ => {
                reasons.insert(DegradedReason::LeaseNotHeld);
            }
        }
        if self.connected && self.lease_held() {
            for f in Feed::ALL {
                if !self.feed_open(f) {
                    reasons.insert(DegradedReason::FeedDown(f));
                }
            }
        }
        if self.writes_failing {
            reasons.insert(DegradedReason::WritesFailing);
        }
        if reasons.is_empty() {
            DeliveryHealth::Active
        } else {
            DeliveryHealth::Degraded(reasons)
        }
    }

    // ---- the lease ----

    fn issue_lease(&mut self, cmd: LeaseCommand) {
        let bucket = KvBucket::Delivery.name(&self.config.space);
        let lease_op = cmd.op();
        let (kind, make): (LeaseOpKind, Box<dyn FnOnce(OpId) -> Command>) = match cmd {
            LeaseCommand::Create { key, value, .. } => (
                LeaseOpKind::Create,
                Box::new(move |op| Command::KvPut {
                    op,
                    bucket,
                    key,
                    value: json::encode(&value),
                    condition: KvCondition::CreateOnly,
                }),
            ),
            LeaseCommand::Update {
                key,
                value,
                expected_revision,
                ..
            } => (
                LeaseOpKind::Update,
                Box::new(move |op| Command::KvPut {
                    op,
                    bucket,
                    key,
                    value: json::encode(&value),
                    condition: KvCondition::Revision(expected_revision),
                }),
            ),
            LeaseCommand::Delete {
                key,
                expected_revision,
                ..
            } => (
                LeaseOpKind::Delete,
                Box::new(move |op| Command::KvDelete {
                    op,
                    bucket,
                    key,
                    expected_revision: Some(expected_revision),
                }),
            ),
            LeaseCommand::Get { key, .. } => (
                LeaseOpKind::Get,
                Box::new(move |op| Command::KvGet { op, bucket, key }),
            ),
        };
        let op = self.op(Pending::Lease { lease_op, kind });
        self.commands.push_back(make(op));
    }

    fn on_lease_completion(
        &mut self,
        now: Now,
        lease_op: OpId,
        kind: LeaseOpKind,
        outcome: Outcome<Reply>,
    ) {
        let translated = match outcome {
            Outcome::Success(reply) => match (kind, reply) {
                (LeaseOpKind::Create | LeaseOpKind::Update, Reply::KvWritten { revision }) => {
                    Outcome::Success(LeaseReply::Written { revision })
                }
                (LeaseOpKind::Delete, Reply::KvWritten { .. } | Reply::Done) => {
                    Outcome::Success(LeaseReply::Deleted)
                }
                (LeaseOpKind::Get, Reply::Kv(entry)) => {
                    Outcome::Success(LeaseReply::Entry(entry.and_then(|e| {
                        (e.operation == KvOperation::Put).then(|| LeaseEntry {
                            revision: e.revision,
                            record: DeliveryLease::from_kv(Some(&e.value)),
                        })
                    })))
                }
                (_, other) => Outcome::Failed(Failure::Other {
                    description: format!("unexpected reply to a lease command: {other:?}"),
                }),
            },
            Outcome::Failed(f) => Outcome::Failed(f),
            Outcome::Unknown => Outcome::Unknown,
        };
        let result = self.lease.handle_completion(now, lease_op, translated);
        debug_assert!(result.is_ok(), "lease completion refused: {result:?}");
    }

    fn on_lease_event(&mut self, now: Now, ev: LeaseEvent) {
        match &ev {
            LeaseEvent::Acquired { .. } => {
                self.emit(DeliveryEvent::Lease(ev));
                if self.connected && !self.stopped {
                    self.open_feeds(now);
                }
                return;
            }
            LeaseEvent::Lost { .. } => {
                self.counters.lease_lost += 1;
                self.stop();
            }
            LeaseEvent::AcquireFailed { .. }
            | LeaseEvent::Released
            | LeaseEvent::ReleaseSkipped { .. } => self.stop(),
            _ => {}
        }
        self.emit(DeliveryEvent::Lease(ev));
    }

    /// Stops every piece of work: the lease is gone.
    ///
    /// Deliveries still held (a fan-out whose copies are not all stored, a transfer whose DLV
    /// PubAck has not come) are handed back with a nak after [`HAND_BACK_DELAY`], so the successor
    /// gets them within a second instead of after the consumer's `ack_wait` (60 s). Redoing them is safe: every copy
    /// carries its msg-id, so the stream collapses a copy already stored.
    fn stop(&mut self) {
        self.close_feeds();
        self.abandon_jobs(AbandonReason::LeaseNotHeld);
        let held: Vec<DeliveryId> = self
            .batches
            .values()
            .map(|b| b.delivery)
            .chain(self.transfers.keys().copied())
            .collect();
        self.batches.clear();
        self.held_for.clear();
        self.timers.cancel(&Timer::HeldCopies);
        self.transfers.clear();
        self.dlv.reset();
        self.notices.interrupt();
        self.give_up_gap_checks("the daemon stopped before checking");
        self.sweeper.interrupt();
        if self.connected {
            for delivery in held {
                self.settle(
                    delivery,
                    AckKind::Nak {
                        delay: HAND_BACK_DELAY,
                    },
                );
            }
        }
        self.stopped = true;
    }

    // ---- feeds ----

    fn open_feeds(&mut self, now: Now) {
        for f in Feed::WATCHES {
            self.open_feed(now, f);
        }
        self.open_feed(now, Feed::Control);
        self.maybe_open_consumers(now);
    }

    fn maybe_open_consumers(&mut self, now: Now) {
        if Feed::WATCHES.iter().all(|f| self.loaded.contains(f)) {
            self.open_feed(now, Feed::Reader);
            // Fan-out writes dinbox entries: it starts once the reader consumer's unread total
            // (what a predecessor left) is known ([`crate::delivery::backlog`]).
            if self.inbox.legacy_known() {
                self.open_feed(now, Feed::Fanout);
            }
        }
    }

    fn open_feed(&mut self, _now: Now, feed: Feed) {
        if self.stopped || !self.connected {
            return;
        }
        if self.feeds.get(&feed) != Some(&FeedState::Closed) {
            return;
        }
        self.timers.cancel(&Timer::Reopen(feed));
        let sub = self.subs.next_id();
        self.feeds.insert(feed, FeedState::Opening(sub));
        let op = self.op(Pending::Open { feed, sub });
        let space = &self.config.space;
        let shard = self.config.shard;
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
                max_in_flight: self.config.fanout_window,
            },
            Feed::Reader => Command::Consume {
                op,
                sub,
                consumer: ConsumerSpec::reader(space, shard.index(), shard.shards()),
                create: true,
                max_in_flight: self.config.reader_window,
            },
        };
        self.commands.push_back(cmd);
    }

    fn close_feeds(&mut self) {
        for feed in Feed::ALL {
            let state = self.feeds.insert(feed, FeedState::Closed);
            self.timers.cancel(&Timer::Reopen(feed));
            let sub = match state {
                Some(FeedState::Open(s) | FeedState::Opening(s)) => s,
                _ => continue,
            };
            if !self.connected {
                continue;
            }
            self.commands.push_back(match feed {
                Feed::Members | Feed::Acl | Feed::Channels | Feed::Presence => {
                    Command::KvUnwatch { sub }
                }
                Feed::Control => Command::Unsubscribe { sub },
                Feed::Fanout | Feed::Reader => Command::StopConsume { sub },
            });
        }
        self.loaded.clear();
    }

    fn on_feed_opened(&mut self, now: Now, feed: Feed, sub: SubId, outcome: Outcome<Reply>) {
        if self.feeds.get(&feed) != Some(&FeedState::Opening(sub)) {
            return; // superseded by a reconnect or a stop
        }
        match outcome {
            Outcome::Success(reply) => {
                if let (
                    Feed::Fanout,
                    Reply::ConsumerBound {
                        delivered_stream_seq,
                    },
                ) = (feed, reply)
                {
                    self.fanout_cursor.bound(delivered_stream_seq);
                }
                self.feeds.insert(feed, FeedState::Open(sub));
                if feed == Feed::Reader {
                    self.read_inbox_backlog(now);
                }
                self.feed_failures.remove(&feed);
                if feed.bucket().is_some() {
                    self.loaded.insert(feed);
                    self.maybe_open_consumers(now);
                }
                self.maybe_ready(now);
            }
            Outcome::Failed(f) => {
                self.close_failed_feed(feed, sub);
                self.feed_failed(now, feed, f.to_string());
            }
            Outcome::Unknown => {
                self.close_failed_feed(feed, sub);
                self.feed_failed(now, feed, "outcome unknown".into());
            }
        }
    }

    /// A feed whose open failed or ended unknown may exist on the server all the same (the effect
    /// happened, the answer was lost). Close it before the retry opens another: a forgotten
    /// consumer feed keeps taking deliveries nobody settles (found by the simulator, seed 128: a
    /// ghost reader feed starved an owner's dinbox entry forever).
    fn close_failed_feed(&mut self, feed: Feed, sub: SubId) {
        if !self.connected {
            return;
        }
        self.commands.push_back(match feed {
            Feed::Members | Feed::Acl | Feed::Channels | Feed::Presence => {
                Command::KvUnwatch { sub }
            }
            Feed::Control => Command::Unsubscribe { sub },
            Feed::Fanout | Feed::Reader => Command::StopConsume { sub },
        });
    }

    fn feed_failed(&mut self, now: Now, feed: Feed, detail: String) {
        self.feeds.insert(feed, FeedState::Closed);
        if feed.bucket().is_some() {
            self.loaded.remove(&feed);
        }
        self.emit(DeliveryEvent::FeedProblem { feed, detail });
        if self.connected && !self.stopped {
            let n = self.feed_failures.entry(feed).or_insert(0);
            let wait = backoff(*n);
            *n = n.saturating_add(1);
            self.timers.set(Timer::Reopen(feed), now.at + wait);
        }
    }

    fn maybe_ready(&mut self, now: Now) {
        if !self.serving() {
            return;
        }
        if self.lease.state() == LeaseState::Held {
            // The ready write publishes the health the daemon has once ready: without this it
            // carried the pre-ready health (`lease-not-ready`, feeds down) until the next renew,
            // and `judge_health` read a freshly ready daemon as degraded for a renew interval.
            let mut once_ready = self.compute_health();
            if let DeliveryHealth::Degraded(reasons) = &mut once_ready {
                reasons.remove(&DegradedReason::LeaseNotReady);
                if reasons.is_empty() {
                    once_ready = DeliveryHealth::Active;
                }
            }
            self.lease.annotate(HEALTH_FIELD, once_ready.to_published());
            let r = self.lease.mark_ready(now);
            debug_assert!(r.is_ok(), "mark_ready while held: {r:?}");
        }
        let keys: Vec<SerialKey> = self.lanes.keys().cloned().collect();
        for key in keys {
            self.pump(now, &key);
        }
    }

    // ---- connection ----

    fn on_connection(&mut self, now: Now, c: Connection) {
        match c {
            Connection::Lost => {
                self.connected = false;
                for feed in Feed::ALL {
                    self.feeds.insert(feed, FeedState::Closed);
                    self.timers.cancel(&Timer::Reopen(feed));
                }
                self.loaded.clear();
                self.abandon_jobs(AbandonReason::ConnectionLost);
                self.sweeper.interrupt();
                self.batches.clear();
                self.held_for.clear();
                self.timers.cancel(&Timer::HeldCopies);
                self.transfers.clear();
                self.dlv.reset();
                self.notices.interrupt();
                self.inbox.check_abandoned();
                if let Some(check) = self.take_gap_check_in_flight() {
                    self.gap_queue.push_front(check);
                }
                // Only the lease's completions still matter; the rest are answered Unknown and
                // ignored.
                self.pending
                    .retain(|_, p| matches!(p, Pending::Lease { .. }));
            }
            Connection::Restored => {
                self.connected = true;
                if self.stopped {
                    return;
                }
                match self.lease.state() {
                    LeaseState::Idle => {
                        let r = self.lease.acquire(now);
                        debug_assert!(r.is_ok(), "acquire from idle: {r:?}");
                    }
                    LeaseState::Held | LeaseState::Ready => {
                        self.open_feeds(now);
                        self.next_gap_check();
                        for step in self.notices.resume() {
                            self.issue_notice(step);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    // ---- completions ----

    fn on_completion(&mut self, now: Now, c: Completion) {
        let Some(pending) = self.pending.remove(&c.op) else {
            return; // abandoned at a connection loss or a stop
        };
        match pending {
            Pending::Lease { lease_op, kind } => {
                self.on_lease_completion(now, lease_op, kind, c.outcome);
            }
            Pending::Open { feed, sub } => self.on_feed_opened(now, feed, sub, c.outcome),
            Pending::Job { job, what } => self.on_job_completion(now, job, what, c.outcome),
            Pending::Fanout {
                batch,
                owner,
                generation,
            } => self.on_fanout_publish(batch, owner, generation, c.outcome),
            Pending::Transfer { delivery } => self.on_transfer(delivery, c.outcome),
            Pending::GapCheck { range, attempt } => {
                self.on_gap_check(now, range, attempt, c.outcome);
            }
            Pending::InboxBacklog => self.on_inbox_backlog(now, c.outcome),
            Pending::DlvBacklog { owner, in_flight } => {
                self.on_dlv_backlog(owner, in_flight, c.outcome);
            }
            Pending::Sweep => self.sweeper.on_completion(c.op, c.outcome, &self.acls),
            Pending::Settle => {}
            Pending::LossNotice { owner } => self.on_loss_notice(owner, c.outcome),
        }
    }

    // ---- inbound ----

    fn on_inbound(&mut self, now: Now, i: Inbound) {
        let Some(feed) = self.feed_of(i.sub()) else {
            // A feed we closed. A delivery still in flight on it is handed back
            // ([`HAND_BACK_DELAY`]), not left to the consumer's ack_wait (a successor takes it).
            if let Inbound::Delivery { delivery, .. } = i
                && self.connected
            {
                self.settle(
                    delivery,
                    AckKind::Nak {
                        delay: HAND_BACK_DELAY,
                    },
                );
            }
            return;
        };
        match i {
            Inbound::KvChange { entry, .. } => self.on_kv_change(now, feed, &entry),
            Inbound::Message {
                subject,
                reply,
                payload,
                ..
            } if feed == Feed::Control => {
                self.on_control(now, &subject, reply.as_deref(), &payload);
            }
            Inbound::Delivery {
                delivery,
                stream_seq,
                delivery_count,
                subject,
                payload,
                ..
            } => match feed {
                Feed::Fanout => {
                    self.on_fanout(
                        now,
                        delivery,
                        stream_seq,
                        delivery_count,
                        &subject,
                        &payload,
                    );
                }
                Feed::Reader => self.on_reader(delivery, delivery_count, &subject, &payload),
                _ => {}
            },
            Inbound::Refused { detail, .. } => {
                self.feed_failed(now, feed, format!("refused: {detail}"));
            }
            Inbound::ConsumerEnded { detail, .. } => {
                self.feed_failed(now, feed, format!("ended: {detail}"));
            }
            _ => {}
        }
    }

    fn on_kv_change(&mut self, now: Now, feed: Feed, entry: &KvEntry) {
        match feed {
            Feed::Members => {
                self.members.apply(entry);
            }
            Feed::Acl if self.acls.apply(entry) => {
                // The reserved names may have moved: a presence can start squatting.
                for notice in self.roster.audit(&self.acls) {
                    self.presence_ignored(notice);
                }
                if let Ok(owner) = AgentId::new(entry.key.as_str())
                    && self.config.shard.owns(&owner)
                {
                    self.sweeper.request(owner);
                }
            }
            Feed::Channels => {
                let value = (entry.operation == KvOperation::Put && !entry.value.is_empty())
                    .then_some(&entry.value[..]);
                // Keys that are neither a channel nor `=defaults` are ignored.
                let _ = self.channels.apply(&entry.key, value);
            }
            Feed::Presence => {
                if let Some(notice) = self.roster.apply(entry, now.at, &self.acls) {
                    self.presence_ignored(notice);
                }
                self.presence_heartbeat(entry);
            }
            _ => {}
        }
    }

    /// A presence key started to be ignored for `@mention` resolution: counted and reported,
    /// once per episode ([`Roster::apply`]).
    fn presence_ignored(&mut self, notice: PresenceIgnored) {
        self.counters.presence_ignored += 1;
        self.emit(DeliveryEvent::PresenceIgnored(notice));
    }

    // ---- control ----

    fn on_control(&mut self, now: Now, subject: &str, reply: Option<&str>, payload: &[u8]) {
        match admit(&self.config.space, subject, reply, payload) {
            Admission::Ignored(u) => self.emit(DeliveryEvent::ControlIgnored(u)),
            Admission::Refused(r) => {
                if !self.config.shard.owns(&r.subject_sender) {
                    return;
                }
                self.publish_reply(&r.reply_to, r.reply);
                self.emit(DeliveryEvent::ControlRefused {
                    requester: r.subject_sender,
                    error: r.reason.to_string(),
                });
            }
            Admission::Admitted(a) => {
                if !self.config.shard.owns(&a.requester) {
                    return; // the owner's shard answers
                }
                if self.held_requests >= self.config.max_requests {
                    let error = "delivery daemon busy: too many control requests in flight";
                    self.publish_reply(&a.reply_to, failure_reply(error));
                    self.emit(DeliveryEvent::ControlRefused {
                        requester: a.requester,
                        error: error.into(),
                    });
                    return;
                }
                let key = a.serial_key();
                self.held_requests += 1;
                self.lanes
                    .entry(key.clone())
                    .or_default()
                    .queue
                    .push_back(a.into_work());
                self.pump(now, &key);
            }
        }
    }

    /// Starts what may run on `key`'s lane.
    fn pump(&mut self, now: Now, key: &SerialKey) {
        if !self.serving() {
            return;
        }
        loop {
            let Some(lane) = self.lanes.get_mut(key) else {
                return;
            };
            if lane.active.is_some() {
                return;
            }
            if lane.finish_waiting {
                lane.finish_waiting = false;
                let Some(job) = lane.catching_up.take() else {
                    continue;
                };
                lane.active = Some(job);
                self.start_finish(now, job);
                continue;
            }
            let blocked =
                matches!(lane.queue.front(), Some(Work::Join(_))) && lane.catching_up.is_some();
            if blocked {
                return;
            }
            let Some(work) = lane.queue.pop_front() else {
                if lane.catching_up.is_none() {
                    self.lanes.remove(key);
                }
                return;
            };
            match work {
                Work::List(list) => {
                    self.held_requests = self.held_requests.saturating_sub(1);
                    let reply = list_memberships_reply(self.members.owner_memberships(&list.owner));
                    self.publish_reply(&list.reply_to, reply);
                }
                Work::Join(join) => {
                    let id = self.new_job(Job {
                        key: key.clone(),
                        owner: join.owner.clone(),
                        channel: join.channel.clone(),
                        reply_to: join.reply_to.clone(),
                        kind: JobKind::Join(Box::new(JoinJob {
                            watermark: join.join_cursor,
                            phase: JoinPhase::ReadAcl,
                            attempts: 0,
                            frontier: 0,
                            generation: 0,
                            join_cursor: 0,
                            watermark_use: None,
                            fence: 0,
                            stream_first: 0,
                            next_start: 0,
                            exhausted: false,
                            outstanding: 0,
                            copied: 0,
                            subjects: BTreeMap::new(),
                            evicted: None,
                        })),
                    });
                    if let Some(lane) = self.lanes.get_mut(key) {
                        lane.active = Some(id);
                    }
                    let bucket = KvBucket::Acl.name(&self.config.space);
                    let key = acl_key(&join.owner);
                    self.job_cmd(id, JobOp::Acl, |op| Command::KvGet { op, bucket, key });
                }
                Work::Leave(leave) => {
                    let id = self.new_job(Job {
                        key: key.clone(),
                        owner: leave.owner.clone(),
                        channel: leave.channel.clone(),
                        reply_to: leave.reply_to.clone(),
                        kind: JobKind::Leave(Box::new(LeaveJob {
                            generation: leave.generation,
                            phase: LeavePhase::ReadMember,
                            attempts: 0,
                            snapshot: None,
                            frontier: 0,
                        })),
                    });
                    if let Some(lane) = self.lanes.get_mut(key) {
                        lane.active = Some(id);
                    }
                    self.read_member(id);
                }
            }
        }
    }

    fn new_job(&mut self, job: Job) -> JobId {
        self.next_job += 1;
        let id = self.next_job;
        self.jobs.insert(id, job);
        id
    }

    fn job_cmd(&mut self, job: JobId, what: JobOp, make: impl FnOnce(OpId) -> Command) {
        let op = self.op(Pending::Job { job, what });
        self.commands.push_back(make(op));
    }

    fn read_member(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let bucket = KvBucket::Members.name(&self.config.space);
        let key = member_key(&job.channel, &job.owner);
        self.job_cmd(id, JobOp::Member, |op| Command::KvGet { op, bucket, key });
    }

    fn read_frontier(&mut self, id: JobId, what: JobOp) {
        let stream = SpaceStream::Chat.name(&self.config.space);
        self.job_cmd(id, what, |op| Command::StreamInfo { op, stream });
    }

    fn write_intent(&mut self, id: JobId, intent: WriteIntent) {
        let bucket = KvBucket::Members.name(&self.config.space);
        let key = intent.key().to_owned();
        let value = intent.encode();
        let condition = match intent.precondition() {
            Precondition::CreateOnly => KvCondition::CreateOnly,
            Precondition::Revision(r) => KvCondition::Revision(r),
        };
        self.job_cmd(id, JobOp::Write(Box::new(intent)), |op| Command::KvPut {
            op,
            bucket,
            key,
            value,
            condition,
        });
    }

    /// Ends a job (its reply, if any, already sent) and lets its lane move on.
    fn end_job(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.held_requests = self.held_requests.saturating_sub(1);
        self.pending
            .retain(|_, p| !matches!(p, Pending::Job { job, .. } if *job == id));
        if let Some(lane) = self.lanes.get_mut(&job.key) {
            if lane.active == Some(id) {
                lane.active = None;
            }
            if lane.catching_up == Some(id) {
                lane.catching_up = None;
                lane.finish_waiting = false;
            }
        }
        self.pump(now, &job.key);
    }

    fn abandon(&mut self, now: Now, id: JobId, reason: AbandonReason) {
        if let Some(job) = self.jobs.get(&id) {
            self.counters.abandoned += 1;
            if matches!(reason, AbandonReason::Fenced(_)) {
                self.counters.fenced += 1;
            }
            self.events.push_back(DeliveryEvent::Abandoned {
                owner: job.owner.clone(),
                channel: Some(job.channel.clone()),
                reason,
            });
        }
        self.end_job(now, id);
    }

    fn abandon_jobs(&mut self, reason: AbandonReason) {
        let jobs = std::mem::take(&mut self.jobs);
        for job in jobs.into_values() {
            self.counters.abandoned += 1;
            self.events.push_back(DeliveryEvent::Abandoned {
                owner: job.owner,
                channel: Some(job.channel),
                reason: reason.clone(),
            });
        }
        let queued: usize = self.lanes.values().map(|l| l.queue.len()).sum();
        self.counters.abandoned += queued as u64;
        self.lanes.clear();
        self.held_requests = 0;
        self.pending
            .retain(|_, p| !matches!(p, Pending::Job { .. }));
    }

    fn reply_join(&mut self, now: Now, id: JobId, durable: bool, reason: Option<&str>) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let JobKind::Join(j) = &job.kind else {
            return;
        };
        let payload = durable_join_reply(durable, reason, j.generation, Some(j.join_cursor));
        let event = DeliveryEvent::Joined {
            owner: job.owner.clone(),
            channel: job.channel.clone(),
            generation: j.generation,
            join_cursor: j.join_cursor,
            watermark: j.watermark_use,
            durable,
            reason: reason.map(str::to_owned),
            copied: j.copied,
        };
        let to = job.reply_to.clone();
        self.publish_reply(&to, payload);
        self.emit(event);
        self.end_job(now, id);
    }

    // ---- orphaned memberships (issue 15 item 7, G12) ----

    /// Records a presence heartbeat of the entry's key (the owner's id): a put whose status is
    /// not `offline`. Expiry (the bucket's TTL) sends nothing, so an owner is offline since its
    /// last heartbeat, however its record ended.
    fn presence_heartbeat(&mut self, entry: &KvEntry) {
        let Some(now) = self.last_now else {
            return;
        };
        let Ok(owner) = AgentId::new(entry.key.as_str()) else {
            return;
        };
        let online = entry.operation == KvOperation::Put
            && json::decode::<crate::wire::message::Presence>(&entry.value)
                .is_ok_and(|p| p.status != crate::wire::message::PresenceStatus::Offline);
        if online {
            self.presence_seen.insert(owner, now);
        }
    }

    /// Finds the open memberships (of this shard's owners) whose owner has been offline longer
    /// than the retention; reports each new one, tombstones it when the operator opted in, and
    /// publishes the list in the lease record ([`ORPHANS_FIELD`]).
    fn scan_orphans(&mut self, now: Now) {
        self.timers
            .set(Timer::OrphanScan, now.at + self.orphan_scan_interval());
        if !self.serving() {
            return;
        }
        let since = self.watching_since.unwrap_or(now.at);
        let retention = self.config.orphan_retention;
        let mut found: BTreeMap<(AgentId, ConcreteChannel), (u64, Duration)> = BTreeMap::new();
        for r in self.members.open_records() {
            if !self.config.shard.owns(&r.owner) {
                continue;
            }
            let last = self
                .presence_seen
                .get(&r.owner)
                .copied()
                .unwrap_or(since)
                .max(since);
            let offline_for = now.at - last;
            if offline_for > retention {
                found.insert(
                    (r.owner.clone(), r.channel.clone()),
                    (r.generation, offline_for),
                );
            }
        }
        let reap = self.config.reap_orphans;
        for ((owner, channel), (generation, offline_for)) in &found {
            if self.orphans.get(&(owner.clone(), channel.clone())) == Some(generation) {
                continue;
            }
            self.counters.orphans_found += 1;
            self.emit(DeliveryEvent::MembershipOrphaned {
                owner: owner.clone(),
                channel: channel.clone(),
                generation: *generation,
                offline_for: *offline_for,
                reaping: reap,
            });
        }
        if reap {
            for ((owner, channel), (generation, _)) in &found {
                let key = SerialKey::Membership {
                    owner: owner.clone(),
                    channel: channel.clone(),
                };
                if self.lanes.contains_key(&key) {
                    // A join or leave of this membership is running: it decides first; the next
                    // scan looks again.
                    continue;
                }
                self.counters.orphans_reaped += 1;
                self.held_requests += 1;
                self.lanes
                    .entry(key.clone())
                    .or_default()
                    .queue
                    .push_back(Work::Leave(crate::delivery::control::LeaveWork {
                        owner: owner.clone(),
                        channel: channel.clone(),
                        generation: *generation,
                        reply_to: String::new(),
                    }));
                self.pump(now, &key);
            }
        }
        let orphans: BTreeMap<(AgentId, ConcreteChannel), u64> =
            found.iter().map(|(k, (g, _))| (k.clone(), *g)).collect();
        if orphans != self.orphans {
            self.orphans = orphans;
            self.lease
                .annotate(ORPHANS_FIELD, self.published_orphans(&found, now));
        }
    }

    /// The lease record's [`ORPHANS_FIELD`]: the retention, whether this daemon reaps, the count
    /// and the first [`MAX_PUBLISHED_ORPHANS`] orphans.
    fn published_orphans(
        &self,
        found: &BTreeMap<(AgentId, ConcreteChannel), (u64, Duration)>,
        _now: Now,
    ) -> serde_json::Value {
        let list: Vec<serde_json::Value> = found
            .iter()
            .take(MAX_PUBLISHED_ORPHANS)
            .map(|((owner, channel), (generation, offline_for))| {
                serde_json::json!({
                    "owner": owner.as_str(),
                    "channel": channel.as_str(),
                    "generation": generation,
                    "offlineMs": offline_for.as_millis(),
                })
            })
            .collect();
        serde_json::json!({
            "retentionMs": self.config.orphan_retention.as_millis(),
            "reap": self.config.reap_orphans,
            "count": found.len(),
            "memberships": list,
        })
    }

    /// How often orphans are looked for: half the retention, within 1 s ..
    /// [`ORPHAN_SCAN_INTERVAL`].
    fn orphan_scan_interval(&self) -> Duration {
        let half = self.config.orphan_retention.as_millis() / 2;
        Duration::from_millis(half.clamp(1_000, ORPHAN_SCAN_INTERVAL.as_millis()))
    }

    /// The orphaned memberships of the last scan, `(owner, channel)` → generation.
    pub fn orphans(&self) -> &BTreeMap<(AgentId, ConcreteChannel), u64> {
        &self.orphans
    }

    /// Whether the channel of join `id` resolves live ([`crate::policy::ChannelRegistry::policy_for`],
    /// the resolver fan-out routes by): a membership there would route nothing (G38).
    fn join_is_live_class(&self, id: JobId) -> bool {
        self.jobs.get(&id).is_some_and(|job| {
            !self
                .channels
                .policy_for(&job.channel.as_channel())
                .is_durable()
        })
    }

    /// Answers a join on a live-class channel `{durable:false, reason}` without a generation and
    /// writes nothing: the daemon does not claim a backstop fan-out will not give (issue 15
    /// item 5, G38). A record the owner already holds is left as it is (its leave still works).
    fn reply_live_class(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        self.counters.live_class_joins += 1;
        let event = DeliveryEvent::Joined {
            owner: job.owner.clone(),
            channel: job.channel.clone(),
            generation: 0,
            join_cursor: 0,
            watermark: None,
            durable: false,
            reason: Some(REASON_LIVE_CLASS.to_owned()),
            copied: 0,
        };
        let to = job.reply_to.clone();
        self.publish_reply(&to, live_class_join_reply());
        self.emit(event);
        self.end_job(now, id);
    }

    fn fail_job(&mut self, now: Now, id: JobId, error: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let to = job.reply_to.clone();
        let event = match &job.kind {
            JobKind::Join(_) => DeliveryEvent::JoinFailed {
                owner: job.owner.clone(),
                channel: job.channel.clone(),
                error: error.clone(),
            },
            JobKind::Leave(_) => DeliveryEvent::LeaveFailed {
                owner: job.owner.clone(),
                channel: job.channel.clone(),
                error: error.clone(),
            },
        };
        self.publish_reply(&to, failure_reply(error));
        self.emit(event);
        self.end_job(now, id);
    }

    /// A registry refusal: fenced → abandon; anything else → an error reply.
    fn registry_error(&mut self, now: Now, id: JobId, e: RegistryError) {
        if matches!(e, RegistryError::Fenced { .. }) {
            self.abandon(now, id, AbandonReason::Fenced(e));
        } else {
            self.fail_job(now, id, e.to_string());
        }
    }

    fn on_job_completion(&mut self, now: Now, id: JobId, what: JobOp, outcome: Outcome<Reply>) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        match &job.kind {
            JobKind::Join(_) => self.on_join_step(now, id, what, outcome),
            JobKind::Leave(_) => self.on_leave_step(now, id, what, outcome),
        }
    }

    fn snapshot_of(&self, id: JobId, outcome: &Outcome<Reply>) -> Option<MemberSnapshot> {
        let job = self.jobs.get(&id)?;
        match outcome {
            Outcome::Success(Reply::Kv(entry)) => {
                let (value, revision) = match entry {
                    Some(e) if e.operation == KvOperation::Put => (Some(&e.value[..]), e.revision),
                    Some(e) => (None, e.revision),
                    None => (None, 0),
                };
                Some(MemberSnapshot::from_kv(
                    job.channel.clone(),
                    job.owner.clone(),
                    value,
                    revision,
                ))
            }
            _ => None,
        }
    }

    /// A failed or unknown read: the job fails with an error reply naming what could not be read.
    fn read_failed(&mut self, now: Now, id: JobId, what: &str, outcome: &Outcome<Reply>) {
        let detail = outcome_detail(outcome);
        self.fail_job(
            now,
            id,
            format!("delivery daemon could not read {what}: {detail}"),
        );
    }

    fn join_mut(&mut self, id: JobId) -> Option<&mut JoinJob> {
        match &mut self.jobs.get_mut(&id)?.kind {
            JobKind::Join(j) => Some(j),
            JobKind::Leave(_) => None,
        }
    }

    // ---- join ----

    fn on_join_step(&mut self, now: Now, id: JobId, what: JobOp, outcome: Outcome<Reply>) {
        match what {
            JobOp::Acl => {
                let Outcome::Success(Reply::Kv(entry)) = &outcome else {
                    return self.read_failed(now, id, "the read ACL", &outcome);
                };
                let record = entry
                    .as_ref()
                    .filter(|e| e.operation == KvOperation::Put)
                    .and_then(|e| crate::wire::records::AclRecord::from_kv(Some(&e.value)));
                let Some(job) = self.jobs.get(&id) else {
                    return;
                };
                if let Err(reply) =
                    crate::delivery::control::gate_join(&job.owner, &job.channel, record.as_ref())
                {
                    let error = reply.error.clone().unwrap_or_default();
                    let to = job.reply_to.clone();
                    let ev = DeliveryEvent::JoinFailed {
                        owner: job.owner.clone(),
                        channel: job.channel.clone(),
                        error,
                    };
                    self.publish_reply(&to, encode_reply(&reply));
                    self.emit(ev);
                    return self.end_job(now, id);
                }
                if self.join_is_live_class(id) {
                    return self.reply_live_class(now, id);
                }
                if let Some(j) = self.join_mut(id) {
                    j.phase = JoinPhase::ReadFrontier;
                }
                self.read_frontier(id, JobOp::Frontier);
            }
            JobOp::Frontier => {
                let Outcome::Success(Reply::StreamState(state)) = &outcome else {
                    return self.read_failed(now, id, "the CHAT frontier", &outcome);
                };
                if let Some(j) = self.join_mut(id) {
                    j.frontier = state.last_seq;
                    j.phase = JoinPhase::ReadMember;
                }
                self.read_member(id);
            }
            JobOp::Member => {
                let Some(snapshot) = self.snapshot_of(id, &outcome) else {
                    return self.read_failed(now, id, "the membership record", &outcome);
                };
                let phase = self.join_mut(id).map(|j| j.phase);
                match phase {
                    Some(JoinPhase::ReadMember) => self.plan_join_step(now, id, &snapshot),
                    Some(JoinPhase::ReadForFinish) => self.plan_finish(now, id, &snapshot),
                    _ => {}
                }
            }
            JobOp::Write(intent) => self.on_join_write(now, id, *intent, outcome),
            JobOp::Fence => {
                let Outcome::Success(Reply::StreamState(state)) = &outcome else {
                    return self.read_failed(now, id, "the CHAT fence", &outcome);
                };
                let high = self.fanout_high;
                let Some(j) = self.join_mut(id) else {
                    return;
                };
                j.fence = state.last_seq.max(high);
                j.stream_first = state.first_seq;
                j.phase = JoinPhase::CatchUp;
                j.next_start = j.join_cursor.saturating_add(1);
                if j.fence <= j.join_cursor {
                    // Nothing to copy; eviction is not checked (§2h 7.1).
                    j.exhausted = true;
                }
                self.enter_catch_up(now, id);
            }
            JobOp::Read => {
                let Outcome::Success(Reply::Stored(messages)) = outcome else {
                    return self.read_failed(now, id, "the channel history", &outcome);
                };
                self.on_catch_up_page(now, id, messages);
            }
            JobOp::Publish {
                seq,
                subject,
                msg_id,
                payload,
                attempt,
            } => self.on_catch_up_publish(now, id, seq, subject, msg_id, payload, attempt, outcome),
        }
    }

    fn plan_join_step(&mut self, now: Now, id: JobId, snapshot: &MemberSnapshot) {
        let Some(writer) = self.writer(now) else {
            return self.abandon(now, id, AbandonReason::LeaseNotHeld);
        };
        let Some(j) = self.join_mut(id) else {
            return;
        };
        let (watermark, frontier) = (j.watermark, j.frontier);
        match plan_join(snapshot, watermark, frontier, &writer, now.wall) {
            Err(e) => self.registry_error(now, id, e),
            Ok(JoinPlan::AlreadyActive { generation }) => {
                let join_cursor = snapshot.record().map_or(0, |r| r.join_cursor);
                if let Some(j) = self.join_mut(id) {
                    j.generation = generation;
                    j.join_cursor = join_cursor;
                }
                self.reply_join(now, id, true, None);
            }
            Ok(JoinPlan::ResumePending {
                generation,
                join_cursor,
            }) => {
                if let Some(j) = self.join_mut(id) {
                    j.generation = generation;
                    j.join_cursor = join_cursor;
                    j.phase = JoinPhase::ReadFence;
                }
                self.read_frontier(id, JobOp::Fence);
            }
            Ok(JoinPlan::Commit(commit)) => {
                let commit = *commit;
                if !commit.forgotten.is_empty()
                    && let Some(job) = self.jobs.get(&id)
                {
                    let ev = DeliveryEvent::HistoryForgotten {
                        owner: job.owner.clone(),
                        channel: job.channel.clone(),
                        intervals: commit.forgotten.clone(),
                    };
                    self.emit(ev);
                }
                if let Some(j) = self.join_mut(id) {
                    j.generation = commit.generation;
                    j.join_cursor = commit.join_cursor;
                    j.watermark_use = Some(commit.watermark);
                    j.phase = JoinPhase::Commit;
                }
                self.write_intent(id, commit.intent);
            }
        }
    }

    /// The write of a join step (commit, tombstone after eviction, activation) completed.
    fn on_join_write(&mut self, now: Now, id: JobId, intent: WriteIntent, outcome: Outcome<Reply>) {
        let Some(phase) = self.join_mut(id).map(|j| j.phase) else {
            return;
        };
        match outcome {
            Outcome::Success(Reply::KvWritten { revision }) => {
                self.members.put(intent.record().clone(), revision);
                match phase {
                    JoinPhase::Commit => {
                        if let Some(j) = self.join_mut(id) {
                            j.phase = JoinPhase::ReadFence;
                        }
                        self.read_frontier(id, JobOp::Fence);
                    }
                    JoinPhase::WriteFinish => self.finish_written(now, id),
                    _ => {}
                }
            }
            Outcome::Failed(Failure::WrongLastRevision { .. } | Failure::AlreadyExists)
            | Outcome::Unknown => {
                // Lost a CAS race, or the write may or may not have landed: read again and plan
                // again from what is really stored (an Unknown that landed re-plans as a resume
                // or an idempotent no-op).
                if matches!(outcome, Outcome::Unknown) {
                    self.counters.writes_failed += 1;
                } else {
                    self.counters.cas_retries += 1;
                }
                let Some(j) = self.join_mut(id) else {
                    return;
                };
                j.attempts += 1;
                if j.attempts >= KV_CAS_ATTEMPTS {
                    let key = intent.key().to_owned();
                    return match phase {
                        JoinPhase::WriteFinish => self.finish_exhausted(now, id),
                        _ => {
                            self.fail_job(now, id, RegistryError::CasExhausted { key }.to_string())
                        }
                    };
                }
                j.phase = match phase {
                    JoinPhase::Commit => JoinPhase::ReadMember,
                    _ => JoinPhase::ReadForFinish,
                };
                self.read_member(id);
            }
            Outcome::Failed(f) => {
                self.counters.writes_failed += 1;
                self.fail_job(now, id, format!("membership write failed: {f}"));
            }
            Outcome::Success(r) => {
                self.fail_job(
                    now,
                    id,
                    format!("unexpected reply to a membership write: {r:?}"),
                );
            }
        }
    }

    /// Catch-up runs off the lane: a leave of the same key may run meanwhile (B9/B21, G22).
    fn enter_catch_up(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let key = job.key.clone();
        if let Some(lane) = self.lanes.get_mut(&key) {
            if lane.active == Some(id) {
                lane.active = None;
            }
            lane.catching_up = Some(id);
        }
        self.next_catch_up_read(now, id);
        self.pump(now, &key);
    }

    fn next_catch_up_read(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let JobKind::Join(j) = &job.kind else {
            return;
        };
        if j.exhausted || j.next_start > j.fence {
            return self.catch_up_done(now, id);
        }
        let stream = SpaceStream::Chat.name(&self.config.space);
        let filter = chat_subscribe_pattern(&self.config.space, &job.channel.as_channel());
        let (start, last) = (j.next_start, j.fence);
        let max = self.config.catchup_page.max(1);
        self.job_cmd(id, JobOp::Read, |op| Command::ReadStream {
            op,
            stream,
            filter,
            start: ReadStart::Seq(start),
            last_seq: Some(last),
            max,
            reader: None,
        });
    }

    fn on_catch_up_page(&mut self, now: Now, id: JobId, messages: Vec<StoredMessage>) {
        let page = self.config.catchup_page.max(1) as usize;
        let space = self.config.space.clone();
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let (owner, channel) = (job.owner.clone(), job.channel.clone());
        let mut publishes = Vec::new();
        {
            let Some(j) = self.join_mut(id) else {
                return;
            };
            if messages.len() < page {
                j.exhausted = true;
            }
            for m in &messages {
                if m.seq < j.next_start || m.seq > j.fence {
                    continue;
                }
                j.next_start = m.seq.saturating_add(1);
                let Ok(Subject::Chat {
                    space: s,
                    sender,
                    channel: c,
                }) = Subject::parse(&m.subject)
                else {
                    continue;
                };
                if s != space || c != channel {
                    continue;
                }
                let counted = j.subjects.entry(m.subject.clone()).or_insert((0, m.seq));
                counted.0 += 1;
                let Ok(msg) = CotalMessage::decode(&m.payload) else {
                    continue;
                };
                if msg.from.id != sender || sender == owner {
                    continue; // spoofed, or the owner's own post (I4)
                }
                let entry = Plane3Entry::durable_channel(msg, channel.clone(), m.seq, j.generation);
                let routed = Routed {
                    owner: owner.clone(),
                    entry,
                };
                publishes.push((m.seq, routed));
            }
            if messages.is_empty() {
                j.exhausted = true;
            }
            j.outstanding += publishes.len();
        }
        let dinbox = Subject::Dinbox {
            space,
            owner: owner.clone(),
        }
        .to_string();
        for (seq, routed) in publishes {
            let msg_id = routed.msg_id().to_string();
            let payload = json::encode(&routed.entry);
            self.catch_up_publish(id, seq, dinbox.clone(), msg_id, payload, 1);
        }
        let outstanding = self.join_mut(id).map_or(0, |j| j.outstanding);
        if outstanding == 0 {
            self.next_catch_up_read(now, id);
        }
    }

    fn catch_up_publish(
        &mut self,
        id: JobId,
        seq: u64,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
        attempt: u32,
    ) {
        let what = JobOp::Publish {
            seq,
            subject: subject.clone(),
            msg_id: msg_id.clone(),
            payload: payload.clone(),
            attempt,
        };
        self.job_cmd(id, what, |op| Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_catch_up_publish(
        &mut self,
        now: Now,
        id: JobId,
        seq: u64,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
        attempt: u32,
        outcome: Outcome<Reply>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let owner = job.owner.clone();
        let channel = job.channel.clone();
        match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                self.count_stored(&owner, ack.duplicate);
                let Some(j) = self.join_mut(id) else {
                    return;
                };
                j.outstanding = j.outstanding.saturating_sub(1);
                if !ack.duplicate {
                    j.copied += 1;
                }
                if j.outstanding == 0 {
                    self.next_catch_up_read(now, id);
                }
            }
            other => {
                self.counters.writes_failed += 1;
                let generation = self.join_mut(id).map_or(0, |j| j.generation);
                let failure = match other {
                    Outcome::Failed(f) => Some(f),
                    _ => None,
                };
                self.emit(DeliveryEvent::CopyWriteFailed {
                    owner: owner.clone(),
                    channel: channel.clone(),
                    seq,
                    generation,
                    failure: failure.clone(),
                });
                if attempt < CATCHUP_PUBLISH_ATTEMPTS {
                    self.catch_up_publish(id, seq, subject, msg_id, payload, attempt + 1);
                } else {
                    let why =
                        failure.map_or_else(|| "outcome unknown".to_owned(), |f| f.to_string());
                    self.fail_job(
                        now,
                        id,
                        format!(
                            "activation catch-up could not store the copy of {channel} seq {seq} for {owner}: {why}"
                        ),
                    );
                }
            }
        }
    }

    fn catch_up_done(&mut self, now: Now, id: JobId) {
        let Some(j) = self.join_mut(id) else {
            return;
        };
        let start = j.join_cursor.saturating_add(1);
        let mut last_evicted: Option<u64> = None;
        if j.fence > j.join_cursor {
            if j.stream_first > start {
                last_evicted = Some(j.stream_first.saturating_sub(1).min(j.fence));
            }
            let cap = u64::try_from(MAX_MSGS_PER_SUBJECT).unwrap_or(u64::MAX);
            for (count, first) in j.subjects.values() {
                if *count >= cap && *first > start {
                    let end = first.saturating_sub(1);
                    last_evicted = Some(last_evicted.map_or(end, |e| e.max(end)));
                }
            }
        }
        j.evicted = last_evicted.map(|end| (start, end));
        j.phase = JoinPhase::WaitLane;
        let Some(key) = self.jobs.get(&id).map(|job| job.key.clone()) else {
            return;
        };
        let lane = self.lanes.entry(key).or_default();
        if lane.active.is_some_and(|a| a != id) {
            // A leave of the same key is running: the activation waits for it (B9/B21).
            lane.finish_waiting = true;
        } else {
            lane.catching_up = None;
            lane.active = Some(id);
            self.start_finish(now, id);
        }
    }

    fn start_finish(&mut self, _now: Now, id: JobId) {
        if let Some(j) = self.join_mut(id) {
            j.phase = JoinPhase::ReadForFinish;
            j.attempts = 0;
        }
        self.read_member(id);
    }

    /// Tombstone after eviction, or activation, planned from a fresh read.
    fn plan_finish(&mut self, now: Now, id: JobId, snapshot: &MemberSnapshot) {
        let Some(writer) = self.writer(now) else {
            return self.abandon(now, id, AbandonReason::LeaseNotHeld);
        };
        let Some(j) = self.join_mut(id) else {
            return;
        };
        let (generation, join_cursor, fence, evicted) =
            (j.generation, j.join_cursor, j.fence, j.evicted);
        if evicted.is_some() {
            match plan_tombstone(snapshot, fence, Some(generation), &writer, now.wall) {
                Ok(TombstonePlan::Write(intent)) => {
                    if let Some(j) = self.join_mut(id) {
                        j.phase = JoinPhase::WriteFinish;
                    }
                    self.write_intent(id, intent);
                }
                // A newer rejoin won (stale), or nothing left to write: answer durable:false.
                Ok(_) | Err(RegistryError::StaleMembershipWrite { .. }) => {
                    self.finish_written(now, id);
                }
                Err(e) => self.registry_error(now, id, e),
            }
            return;
        }
        match plan_activate(snapshot, generation, join_cursor, &writer, now.wall) {
            Ok(ActivatePlan::Write(intent)) => {
                if let Some(j) = self.join_mut(id) {
                    j.phase = JoinPhase::WriteFinish;
                }
                self.write_intent(id, intent);
            }
            Ok(ActivatePlan::AlreadyActive) => self.reply_join(now, id, true, None),
            Ok(_) => self.reply_join(now, id, false, Some(REASON_SUPERSEDED)),
            Err(e) => self.registry_error(now, id, e),
        }
    }

    fn finish_written(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let JobKind::Join(j) = &job.kind else {
            return;
        };
        match j.evicted {
            Some((from_seq, to_seq)) => {
                self.counters.evicted_ranges += 1;
                let ev = DeliveryEvent::Evicted {
                    owner: job.owner.clone(),
                    channel: job.channel.clone(),
                    generation: j.generation,
                    from_seq,
                    to_seq,
                };
                self.emit(ev);
                self.reply_join(now, id, false, Some(REASON_PARTIALLY_EVICTED));
            }
            None => self.reply_join(now, id, true, None),
        }
    }

    /// The finishing write lost every CAS attempt: an honest `durable:false`.
    fn finish_exhausted(&mut self, now: Now, id: JobId) {
        let evicted = self.join_mut(id).and_then(|j| j.evicted);
        if evicted.is_some() {
            self.finish_written(now, id);
        } else {
            self.reply_join(now, id, false, Some(REASON_SUPERSEDED));
        }
    }

    // ---- leave ----

    fn on_leave_step(&mut self, now: Now, id: JobId, what: JobOp, outcome: Outcome<Reply>) {
        match what {
            JobOp::Member => {
                let Some(snapshot) = self.snapshot_of(id, &outcome) else {
                    return self.read_failed(now, id, "the membership record", &outcome);
                };
                let first = matches!(
                    self.jobs.get(&id).map(|j| &j.kind),
                    Some(JobKind::Leave(l)) if l.attempts == 0
                );
                if snapshot.record().is_none() && first {
                    return self.reply_leave(now, id, true, None);
                }
                let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind) else {
                    return;
                };
                l.snapshot = Some(snapshot);
                if l.attempts == 0 {
                    l.phase = LeavePhase::ReadFrontier;
                    self.read_frontier(id, JobOp::Frontier);
                } else {
                    self.plan_leave(now, id);
                }
            }
            JobOp::Frontier => {
                let Outcome::Success(Reply::StreamState(state)) = &outcome else {
                    return self.read_failed(now, id, "the CHAT frontier", &outcome);
                };
                if let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind) {
                    l.frontier = state.last_seq;
                }
                self.plan_leave(now, id);
            }
            JobOp::Write(intent) => match outcome {
                Outcome::Success(Reply::KvWritten { revision }) => {
                    self.members.put(intent.record().clone(), revision);
                    let g = intent.record().generation;
                    let l = intent.record().leave_cursor;
                    self.reply_leave(now, id, false, Some((g, l)));
                }
                Outcome::Failed(Failure::WrongLastRevision { .. } | Failure::AlreadyExists)
                | Outcome::Unknown => {
                    if matches!(outcome, Outcome::Unknown) {
                        self.counters.writes_failed += 1;
                    } else {
                        self.counters.cas_retries += 1;
                    }
                    let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind)
                    else {
                        return;
                    };
                    l.attempts += 1;
                    if l.attempts >= KV_CAS_ATTEMPTS {
                        let key = intent.key().to_owned();
                        return self.fail_job(
                            now,
                            id,
                            RegistryError::CasExhausted { key }.to_string(),
                        );
                    }
                    l.phase = LeavePhase::ReadMember;
                    self.read_member(id);
                }
                Outcome::Failed(f) => {
                    self.counters.writes_failed += 1;
                    self.fail_job(now, id, format!("membership write failed: {f}"));
                }
                Outcome::Success(r) => {
                    self.fail_job(
                        now,
                        id,
                        format!("unexpected reply to a membership write: {r:?}"),
                    );
                }
            },
            _ => {}
        }
    }

    fn plan_leave(&mut self, now: Now, id: JobId) {
        let Some(writer) = self.writer(now) else {
            return self.abandon(now, id, AbandonReason::LeaseNotHeld);
        };
        let Some(JobKind::Leave(l)) = self.jobs.get(&id).map(|j| &j.kind) else {
            return;
        };
        let Some(snapshot) = l.snapshot.clone() else {
            return;
        };
        match plan_tombstone(&snapshot, l.frontier, Some(l.generation), &writer, now.wall) {
            Ok(TombstonePlan::NoRecord) => self.reply_leave(now, id, true, None),
            Ok(TombstonePlan::AlreadyTombstoned {
                generation,
                leave_cursor,
            }) => self.reply_leave(now, id, false, Some((generation, Some(leave_cursor)))),
            Ok(TombstonePlan::Write(intent)) => {
                if let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind) {
                    l.phase = LeavePhase::Write;
                }
                self.write_intent(id, intent);
            }
            Err(e) => self.registry_error(now, id, e),
        }
    }

    fn reply_leave(
        &mut self,
        now: Now,
        id: JobId,
        already_left: bool,
        written: Option<(u64, Option<u64>)>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let to = job.reply_to.clone();
        let ev = DeliveryEvent::Left {
            owner: job.owner.clone(),
            channel: job.channel.clone(),
            generation: written.map(|w| w.0),
            leave_cursor: written.and_then(|w| w.1),
        };
        let payload = durable_leave_reply(&job.channel, already_left);
        self.publish_reply(&to, payload);
        self.emit(ev);
        self.end_job(now, id);
    }

    // ---- fan-out ----

    fn on_fanout(
        &mut self,
        now: Now,
        delivery: DeliveryId,
        seq: u64,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        self.fanout_high = self.fanout_high.max(seq);
        if let Some(skipped) = self.fanout_cursor.offered(seq) {
            self.gap_queue.push_back((skipped, 0));
            self.next_gap_check();
        }
        let space = &self.config.space;
        let (sender, channel) = match Subject::parse(subject) {
            Ok(Subject::Chat {
                space: s,
                sender,
                channel,
            }) if &s == space => (sender, channel),
            _ => return self.fanout_anomaly(delivery, seq, subject, FanoutAnomaly::NotChat),
        };
        let msg = match CotalMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                let a = FanoutAnomaly::Undecodable(e.to_string());
                return self.fanout_anomaly(delivery, seq, subject, a);
            }
        };
        if msg.from.id != sender {
            let a = FanoutAnomaly::Spoofed {
                sender,
                claimed: msg.from.id.clone(),
            };
            return self.fanout_anomaly(delivery, seq, subject, a);
        }
        let shard = self.config.shard;
        let class = self
            .channels
            .policy_for(&channel.as_channel())
            .delivery_class;
        let roster = &self.roster;
        let acls = &self.acls;
        let reference_g17 = self.config.reference_gap_g17;
        let views: Vec<Cow<'_, MembershipRecord>> = self
            .members
            .channel(&channel)
            .map(|r| routing_view(r, seq))
            .collect();
        let decision = route(
            &msg,
            &channel,
            seq,
            class,
            views.iter().map(|v| v.as_ref()),
            |name| {
                if reference_g17 {
                    roster.resolve_reference(name)
                } else {
                    roster.resolve(name, now.at, acls)
                }
            },
            |owner| acls.get(owner).map(|v| &v.read),
        );
        // A mention that reaches nobody is reported, by the first shard only (every shard
        // routes every message) and on the first delivery only (not again on a redelivery).
        if shard.index() == 0 && delivery_count <= 1 {
            for skipped in &decision.skipped_mentions {
                let counter = match skipped.reason {
                    MentionSkipReason::Ambiguous => &mut self.counters.mentions_ambiguous,
                    MentionSkipReason::Unknown => &mut self.counters.mentions_unknown,
                    _ => continue,
                };
                *counter += 1;
                self.emit(DeliveryEvent::MentionUnresolved {
                    channel: channel.clone(),
                    seq,
                    name: skipped.name.clone(),
                    reason: skipped.reason,
                });
            }
        }
        let entries: Vec<Routed> = decision
            .entries
            .into_iter()
            .filter(|r| shard.owns(&r.owner))
            .collect();
        if entries.is_empty() {
            return self.settle(delivery, AckKind::Ack);
        }
        // Per-owner back-pressure (G6): INBOX keeps the newest 1000 entries of an owner, so a
        // copy written while 1000 newer ones wait for the reader is discarded unread. An owner at
        // the high water gets its copy from this very delivery, held until the reader drained.
        let (entries, held): (Vec<Routed>, Vec<Routed>) = entries
            .into_iter()
            .partition(|r| self.inbox.admits(&r.owner));
        self.next_batch += 1;
        let batch = self.next_batch;
        if !held.is_empty() {
            self.counters.fanout_deferred += 1;
            for r in &held {
                self.held_for
                    .entry(r.owner.clone())
                    .or_default()
                    .insert(batch);
                if self.backpressured.insert(r.owner.clone()) {
                    let backlog = self.inbox.bound(&r.owner);
                    self.emit(DeliveryEvent::DinboxBackpressure {
                        owner: r.owner.clone(),
                        backlog,
                    });
                }
            }
            if self.timers.get(&Timer::HeldCopies).is_none() {
                self.timers.set(Timer::HeldCopies, now.at + BACKLOG_RECHECK);
            }
            // A hold may rest on an over-count: read the truth (paced).
            if self.inbox.needs_recheck(now.at) {
                self.read_inbox_backlog(now);
            }
        }
        let held_since = (!held.is_empty()).then_some(now.at);
        self.batches.insert(
            batch,
            FanoutBatch {
                delivery,
                seq,
                delivery_count,
                channel,
                outstanding: 0,
                failed: false,
                held,
                held_since,
                deferred: false,
            },
        );
        for routed in entries {
            self.publish_copy(batch, routed);
        }
    }

    /// Writes one routed copy of fan-out batch `batch` to its owner's dinbox.
    fn publish_copy(&mut self, batch: BatchId, routed: Routed) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding += 1;
        let subject = Subject::Dinbox {
            space: self.config.space.clone(),
            owner: routed.owner.clone(),
        }
        .to_string();
        let msg_id = routed.msg_id().to_string();
        let payload = json::encode(&routed.entry);
        let op = self.op(Pending::Fanout {
            batch,
            owner: routed.owner,
            generation: routed.entry.generation,
        });
        self.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    /// Writes the copies held for `owner`, oldest CHAT message first, as many as its backlog has
    /// room for under the high water. (A copy counts once stored; the few in flight meanwhile fit
    /// in the margin between the high water and the cap.)
    fn release_held(&mut self, owner: &AgentId) {
        let room = DINBOX_HIGH_WATER.saturating_sub(self.inbox.bound(owner));
        for _ in 0..room {
            let Some(batches) = self.held_for.get_mut(owner) else {
                return;
            };
            let Some(batch) = batches.pop_first() else {
                self.held_for.remove(owner);
                return;
            };
            if batches.is_empty() {
                self.held_for.remove(owner);
            }
            let Some(b) = self.batches.get_mut(&batch) else {
                continue;
            };
            let Some(at) = b.held.iter().position(|r| &r.owner == owner) else {
                continue;
            };
            let routed = b.held.swap_remove(at);
            if b.held.is_empty() {
                b.held_since = None;
            }
            self.publish_copy(batch, routed);
        }
    }

    /// Every hold whose owner the reader has drained below the high water is released.
    fn release_all_held(&mut self) {
        let owners: Vec<AgentId> = self
            .held_for
            .keys()
            .filter(|o| self.inbox.admits(o))
            .cloned()
            .collect();
        for owner in owners {
            self.release_held(&owner);
        }
    }

    /// [`Timer::HeldCopies`]: holds older than [`FANOUT_HOLD_LIMIT`] give up (their message is
    /// naked once its other copies are stored), the reader consumer is read again if a hold may
    /// rest on an over-count, and the timer is set again while anything is held.
    fn on_held_timer(&mut self, now: Now) {
        let expired: Vec<BatchId> = self
            .batches
            .iter()
            .filter(|(_, b)| {
                b.held_since
                    .is_some_and(|t| now.at.saturating_since(t) >= FANOUT_HOLD_LIMIT)
            })
            .map(|(id, _)| *id)
            .collect();
        for batch in expired {
            let Some(b) = self.batches.get_mut(&batch) else {
                continue;
            };
            let held = std::mem::take(&mut b.held);
            b.held_since = None;
            b.deferred = true;
            self.counters.fanout_hold_expired += 1;
            for r in held {
                if let Some(set) = self.held_for.get_mut(&r.owner) {
                    set.remove(&batch);
                    if set.is_empty() {
                        self.held_for.remove(&r.owner);
                    }
                }
            }
            self.finish_batch_if_done(batch);
        }
        if !self.held_for.is_empty() {
            if self.inbox.needs_recheck(now.at) {
                self.read_inbox_backlog(now);
            }
            self.timers.set(Timer::HeldCopies, now.at + BACKLOG_RECHECK);
        }
    }

    fn fanout_anomaly(
        &mut self,
        delivery: DeliveryId,
        seq: u64,
        subject: &str,
        anomaly: FanoutAnomaly,
    ) {
        self.counters.fanout_anomalies += 1;
        self.settle(delivery, AckKind::Term);
        self.emit(DeliveryEvent::FanoutTerminated {
            seq,
            subject: subject.to_owned(),
            anomaly,
        });
    }

    fn count_stored(&mut self, owner: &AgentId, duplicate: bool) {
        if duplicate {
            self.counters.copies_duplicate += 1;
            return;
        }
        self.counters.copies_written += 1;
        let n = self.inbox.stored(owner);
        if n == OWNER_CAP {
            let backlog = n;
            self.counters.cap_reached += 1;
            self.emit(DeliveryEvent::DinboxCapReached {
                owner: owner.clone(),
                backlog,
            });
        }
    }

    fn count_settled(&mut self, owner: &AgentId) {
        if self.inbox.settled(owner) && !self.held_for.is_empty() {
            // A predecessor's entry: the legacy bounds every owner.
            self.release_all_held();
        }
        if self.inbox.admits(owner) {
            if self.held_for.contains_key(owner) {
                self.release_held(owner);
            }
            // The episode ends when nothing of the owner's is held any more.
            if !self.held_for.contains_key(owner) {
                self.backpressured.remove(owner);
            }
        }
    }

    /// Reads the reader consumer's unread total (at its bind, and when a hold may rest on an
    /// over-count).
    fn read_inbox_backlog(&mut self, now: Now) {
        if !self.connected || self.stopped {
            return;
        }
        self.inbox.check_started(now.at);
        let op = self.op(Pending::InboxBacklog);
        let reader = ConsumerSpec::reader(
            &self.config.space,
            self.config.shard.index(),
            self.config.shard.shards(),
        );
        self.commands.push_back(Command::ConsumerInfo {
            op,
            stream: reader.stream,
            consumer: reader.name,
        });
    }

    fn on_inbox_backlog(&mut self, now: Now, outcome: Outcome<Reply>) {
        match outcome {
            Outcome::Success(Reply::ConsumerState(state)) => {
                self.inbox.clamp(state.unread());
                self.release_all_held();
                let (inbox, held_for) = (&self.inbox, &self.held_for);
                self.backpressured
                    .retain(|owner| !inbox.admits(owner) || held_for.contains_key(owner));
            }
            other => {
                self.inbox.check_failed();
                self.counters.backlog_unverified += 1;
                self.emit(DeliveryEvent::BacklogUnverified {
                    owner: None,
                    detail: outcome_detail(&other),
                });
            }
        }
        if self.lease_held() {
            self.maybe_open_consumers(now);
        }
    }

    fn on_dlv_backlog(&mut self, owner: AgentId, in_flight: u64, outcome: Outcome<Reply>) {
        let unread = match outcome {
            Outcome::Success(Reply::ConsumerState(state)) => Some(state.unread()),
            other => {
                self.counters.backlog_unverified += 1;
                self.emit(DeliveryEvent::BacklogUnverified {
                    owner: Some(owner.clone()),
                    detail: outcome_detail(&other),
                });
                None
            }
        };
        let verdict = self.dlv.read(&owner, unread, in_flight);
        for delivery in verdict.admitted {
            self.start_transfer(delivery);
        }
        for delivery in verdict.shed {
            let Some(t) = self.transfers.remove(&delivery) else {
                continue;
            };
            self.counters.dlv_shed += 1;
            self.counters.lost += 1;
            self.count_settled(&t.owner);
            self.settle(delivery, AckKind::Ack);
            self.tell_loss(&t.owner, &t.entry.channel, t.entry.seq, LossReason::DlvFull);
            self.emit(DeliveryEvent::CopyShed {
                owner: t.owner,
                channel: t.entry.channel,
                seq: t.entry.seq,
                generation: t.entry.generation,
                unread: verdict.unread.unwrap_or(0),
            });
        }
    }

    fn on_fanout_publish(
        &mut self,
        batch: BatchId,
        owner: AgentId,
        generation: u64,
        outcome: Outcome<Reply>,
    ) {
        let ok = match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                self.count_stored(&owner, ack.duplicate);
                None
            }
            Outcome::Failed(f) => Some(Some(f)),
            _ => Some(None),
        };
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding = b.outstanding.saturating_sub(1);
        if let Some(failure) = ok {
            b.failed = true;
            let (channel, seq) = (b.channel.clone(), b.seq);
            self.counters.writes_failed += 1;
            self.emit(DeliveryEvent::CopyWriteFailed {
                owner,
                channel,
                seq,
                generation,
                failure,
            });
        }
        self.finish_batch_if_done(batch);
    }

    /// Settles a fan-out batch's CHAT delivery once no copy is in flight or held: acked when
    /// every copy is stored, naked with backoff after a failed write (the msg-id collapses the
    /// copies already stored), naked with [`backpressure_delay`] after a hold gave up. A failed
    /// write ends the holds too (the redelivery writes everything again).
    fn finish_batch_if_done(&mut self, batch: BatchId) {
        let Some(b) = self.batches.get(&batch) else {
            return;
        };
        if b.outstanding > 0 || (!b.held.is_empty() && !b.failed) {
            return;
        }
        let Some(b) = self.batches.remove(&batch) else {
            return;
        };
        for r in &b.held {
            if let Some(set) = self.held_for.get_mut(&r.owner) {
                set.remove(&batch);
                if set.is_empty() {
                    self.held_for.remove(&r.owner);
                }
            }
        }
        if b.failed {
            self.writes_failing = true;
            let attempt = u32::try_from(b.delivery_count.saturating_sub(1)).unwrap_or(u32::MAX);
            self.settle(
                b.delivery,
                AckKind::Nak {
                    delay: backoff(attempt),
                },
            );
        } else if b.deferred {
            self.writes_failing = false;
            self.settle(
                b.delivery,
                AckKind::Nak {
                    delay: backpressure_delay(b.delivery_count),
                },
            );
        } else {
            self.writes_failing = false;
            self.settle(b.delivery, AckKind::Ack);
        }
    }

    // ---- sequence continuity (gap) ----

    /// Starts the check of the oldest skipped range, unless one is in flight.
    fn next_gap_check(&mut self) {
        let in_flight = self
            .pending
            .values()
            .any(|p| matches!(p, Pending::GapCheck { .. }));
        if in_flight || !self.connected || self.stopped {
            return;
        }
        let Some((range, attempt)) = self.gap_queue.pop_front() else {
            return;
        };
        let max = u32::try_from(self.gap_page(range)).unwrap_or(u32::MAX);
        let op = self.op(Pending::GapCheck { range, attempt });
        self.commands.push_back(Command::ReadStream {
            op,
            stream: SpaceStream::Chat.name(&self.config.space),
            filter: chat_wildcard(&self.config.space),
            start: ReadStart::Seq(range.first),
            last_seq: Some(range.last),
            max,
            reader: None,
        });
    }

    /// A skipped range was read back from CHAT: what CHAT no longer holds is lost. A page that
    /// came back full judges only up to its last message; the rest is checked next.
    fn on_gap_check(&mut self, now: Now, range: SeqRange, attempt: u32, outcome: Outcome<Reply>) {
        match outcome {
            Outcome::Success(Reply::Stored(messages)) => {
                let full =
                    u64::try_from(messages.len()).unwrap_or(u64::MAX) >= self.gap_page(range);
                let judged_to = match messages.last() {
                    Some(m) if full => m.seq.min(range.last),
                    _ => range.last,
                };
                let judged = SeqRange::new(range.first, judged_to).unwrap_or(range);
                for lost in missing(judged, messages.iter().map(|m| m.seq)) {
                    self.counters.evicted_before_fanout += lost.len();
                    self.tell_evicted(lost);
                    self.emit(DeliveryEvent::EvictedBeforeFanout {
                        first: lost.first,
                        last: lost.last,
                        verified: true,
                    });
                }
                if let Some(rest) = SeqRange::new(judged.last + 1, range.last) {
                    self.gap_queue.push_front((rest, 0));
                }
            }
            other => {
                let detail = match other {
                    Outcome::Failed(f) => f.to_string(),
                    Outcome::Unknown => "outcome unknown".to_owned(),
                    Outcome::Success(r) => format!("unexpected reply {r:?}"),
                };
                let attempt = attempt.saturating_add(1);
                if attempt >= GAP_CHECK_ATTEMPTS {
                    self.give_up_gap_check(range, &detail);
                } else {
                    self.gap_queue.push_front((range, attempt));
                    self.timers
                        .set(Timer::GapCheck, now.at + backoff(attempt - 1));
                    return;
                }
            }
        }
        self.next_gap_check();
    }

    /// A skipped range that cannot be checked is reported as possibly lost: a loss is never
    /// silent, and a false alarm is the lesser error.
    fn give_up_gap_check(&mut self, range: SeqRange, detail: &str) {
        self.counters.gaps_unverified += range.len();
        self.tell_evicted(range);
        self.emit(DeliveryEvent::EvictedBeforeFanout {
            first: range.first,
            last: range.last,
            verified: false,
        });
        self.emit(DeliveryEvent::FeedProblem {
            feed: Feed::Fanout,
            detail: format!(
                "CHAT {}..={} skipped by fan-out and not checked: {detail}",
                range.first, range.last
            ),
        });
    }

    /// How many messages one check of `range` reads at most.
    fn gap_page(&self, range: SeqRange) -> u64 {
        range.len().min(u64::from(self.config.catchup_page.max(1)))
    }

    /// Forgets the check in flight (its answer will be ignored) and returns its range.
    fn take_gap_check_in_flight(&mut self) -> Option<(SeqRange, u32)> {
        let (op, range, attempt) = self.pending.iter().find_map(|(op, p)| match p {
            Pending::GapCheck { range, attempt } => Some((*op, *range, *attempt)),
            _ => None,
        })?;
        self.pending.remove(&op);
        Some((range, attempt))
    }

    fn give_up_gap_checks(&mut self, detail: &str) {
        self.timers.cancel(&Timer::GapCheck);
        let queued: Vec<(SeqRange, u32)> = self
            .take_gap_check_in_flight()
            .into_iter()
            .chain(self.gap_queue.drain(..))
            .collect();
        for (range, _) in queued {
            self.give_up_gap_check(range, detail);
        }
    }

    // ---- reader ----

    fn on_reader(
        &mut self,
        delivery: DeliveryId,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        let (owner, entry) = match decode_entry(subject, payload) {
            Ok(x) => x,
            Err(anomaly) => {
                self.counters.terminated += 1;
                if let Ok(Subject::Dinbox { owner, .. }) = Subject::parse(subject) {
                    // Settled all the same: one fewer unread entry of that owner.
                    self.count_settled(&owner);
                }
                self.settle(delivery, AckKind::Term);
                return self.emit(DeliveryEvent::EntryTerminated {
                    subject: subject.to_owned(),
                    anomaly,
                });
            }
        };
        if !self.config.shard.owns(&owner) {
            // Another shard's reader (its own durable) handles this owner.
            return self.settle(delivery, AckKind::Ack);
        }
        let acl = self.acls.get(&owner).map(|v| &v.read);
        let record = self.members.get(&entry.channel, &owner);
        let mut decision = authorize(&entry, &owner, acl, record, delivery_count);
        if self.config.reference_gap_g2
            && entry.reason == Plane3Reason::DurableChannel
            && matches!(decision, Decision::Transfer { .. })
            && let Some(rec) = record
            && !durable_eligible(rec, entry.seq)
        {
            // The reference's reader: the current interval only (G2 switched back on).
            decision = Decision::Drop(match current_interval(rec) {
                Some(interval) => DropReason::OutsideInterval(interval),
                None => DropReason::InertGeneration {
                    generation: rec.generation,
                },
            });
        }
        self.apply_reader_decision(delivery, delivery_count, owner, entry, decision);
    }

    fn apply_reader_decision(
        &mut self,
        delivery: DeliveryId,
        delivery_count: u64,
        owner: AgentId,
        entry: Plane3Entry,
        decision: Decision,
    ) {
        match decision {
            Decision::Transfer { msg_id } => {
                let (admit, _) = self.dlv.admit(&owner, &entry.msg.from.id, delivery);
                let dlv_owner = owner.clone();
                self.transfers.insert(
                    delivery,
                    Transfer {
                        delivery_count,
                        owner,
                        entry,
                        msg_id: msg_id.to_string(),
                    },
                );
                match admit {
                    DlvAdmit::Transfer => self.start_transfer(delivery),
                    DlvAdmit::Wait { read: false } => {}
                    DlvAdmit::Wait { read: true } => {
                        let consumer = ConsumerSpec::dlv(&self.config.space, &dlv_owner);
                        let transfers = &self.transfers;
                        let in_flight = self
                            .pending
                            .values()
                            .filter(|p| {
                                matches!(p, Pending::Transfer { delivery }
                                    if transfers.get(delivery).is_some_and(|t| t.owner == dlv_owner))
                            })
                            .count();
                        let op = self.op(Pending::DlvBacklog {
                            owner: dlv_owner,
                            in_flight: u64::try_from(in_flight).unwrap_or(u64::MAX),
                        });
                        self.commands.push_back(Command::ConsumerInfo {
                            op,
                            stream: consumer.stream,
                            consumer: consumer.name,
                        });
                    }
                }
            }
            Decision::Drop(reason) => {
                self.counters.dropped += 1;
                if reason.is_loss() {
                    self.counters.lost += 1;
                    self.tell_loss(
                        &owner,
                        &entry.channel,
                        entry.seq,
                        LossReason::IntervalForgotten,
                    );
                }
                self.count_settled(&owner);
                self.settle(delivery, AckKind::Ack);
                self.emit(DeliveryEvent::EntryDropped {
                    owner,
                    channel: entry.channel,
                    seq: entry.seq,
                    generation: entry.generation,
                    reason,
                });
            }
            Decision::Defer { delay, .. } => {
                self.counters.deferred += 1;
                self.settle(delivery, AckKind::Nak { delay });
            }
            Decision::GiveUp(g) => {
                self.counters.terminated += 1;
                self.counters.lost += 1;
                self.count_settled(&owner);
                self.settle(delivery, AckKind::Term);
                self.tell_loss(&g.owner, &g.channel, g.seq, LossReason::RedeliveryCeiling);
                self.emit(DeliveryEvent::EntryLost(g));
            }
            Decision::Terminate(anomaly) => {
                self.counters.terminated += 1;
                self.count_settled(&owner);
                self.settle(delivery, AckKind::Term);
                self.emit(DeliveryEvent::EntryTerminated {
                    subject: Subject::Dinbox {
                        space: self.config.space.clone(),
                        owner,
                    }
                    .to_string(),
                    anomaly,
                });
            }
        }
    }

    /// A copy of `seq` on `channel` is lost to `owner`: fold it into the owner's loss record
    /// ([`crate::delivery::losses`]), written now or after the read or write in flight.
    fn tell_loss(
        &mut self,
        owner: &AgentId,
        channel: &ConcreteChannel,
        seq: u64,
        reason: LossReason,
    ) {
        let step = self
            .notices
            .lost(owner, channel.as_str(), seq, seq, 1, reason);
        if !self.connected || self.stopped {
            // Written after the reconnect ([`LossNotices::resume`]).
            self.notices.interrupt();
            return;
        }
        if let Some(step) = step {
            self.issue_notice(step);
        }
    }

    /// CHAT messages `range` left the stream before fan-out routed them: every member of this
    /// shard whose current interval overlaps the range is told the overlap, on that channel.
    /// Which of those sequences were on the member's channel is unknown (they are gone), so the
    /// notice names the whole overlap: an upper bound, never an omission.
    fn tell_evicted(&mut self, range: SeqRange) {
        let mut told = Vec::new();
        for rec in self.members.records() {
            if !self.config.shard.owns(&rec.owner) {
                continue;
            }
            let Some(interval) = current_interval(rec) else {
                continue;
            };
            let lo = range.first.max(interval.join_cursor.saturating_add(1));
            let hi = range.last.min(interval.leave_cursor.unwrap_or(u64::MAX));
            if lo <= hi {
                told.push((rec.owner.clone(), rec.channel.clone(), lo, hi));
            }
        }
        for (owner, channel, lo, hi) in told {
            let step = self.notices.lost(
                &owner,
                channel.as_str(),
                lo,
                hi,
                hi - lo + 1,
                LossReason::EvictedBeforeFanout,
            );
            if !self.connected || self.stopped {
                self.notices.interrupt();
            } else if let Some(step) = step {
                self.issue_notice(step);
            }
        }
    }

    fn issue_notice(&mut self, step: NoticeStep) {
        let bucket = KvBucket::Losses.name(&self.config.space);
        match step {
            NoticeStep::Read { owner } => {
                let key = owner.as_str().to_owned();
                let op = self.op(Pending::LossNotice { owner });
                self.commands.push_back(Command::KvGet { op, bucket, key });
            }
            NoticeStep::Write {
                owner,
                value,
                condition,
            } => {
                let key = owner.as_str().to_owned();
                let op = self.op(Pending::LossNotice { owner });
                self.commands.push_back(Command::KvPut {
                    op,
                    bucket,
                    key,
                    value,
                    condition,
                });
            }
        }
    }

    fn on_loss_notice(&mut self, owner: AgentId, outcome: Outcome<Reply>) {
        let ended = match outcome {
            Outcome::Success(Reply::Kv(entry)) => {
                NoticeOutcome::Read(entry.map(|e| (e.value, e.revision)))
            }
            Outcome::Success(Reply::KvWritten { revision }) => {
                self.counters.loss_notices_written += 1;
                NoticeOutcome::Written(revision)
            }
            other => {
                self.counters.loss_notices_failed += 1;
                self.emit(DeliveryEvent::LossNoticeFailed {
                    owner: owner.clone(),
                    detail: outcome_detail(&other),
                });
                NoticeOutcome::Failed
            }
        };
        if let Some(step) = self.notices.ended(&owner, ended) {
            self.issue_notice(step);
        }
    }

    /// Publishes an admitted transfer's DLV copy.
    fn start_transfer(&mut self, delivery: DeliveryId) {
        let Some(t) = self.transfers.get(&delivery) else {
            return;
        };
        let subject = Subject::Dlv {
            space: self.config.space.clone(),
            owner: t.owner.clone(),
        }
        .to_string();
        let payload = dlv_payload(&t.entry);
        let msg_id = t.msg_id.clone();
        let op = self.op(Pending::Transfer { delivery });
        self.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    fn on_transfer(&mut self, delivery: DeliveryId, outcome: Outcome<Reply>) {
        let Some(t) = self.transfers.remove(&delivery) else {
            return;
        };
        self.sweep_if_revoked(&t.owner, &t.entry.channel);
        match outcome {
            Outcome::Success(Reply::PubAck(_)) => {
                self.counters.transferred += 1;
                self.count_settled(&t.owner);
                self.settle(delivery, AckKind::Ack);
            }
            _ => {
                self.counters.writes_failed += 1;
                self.dlv.unstored(&t.owner);
                let decision = after_transfer_failure(&t.entry, &t.owner, t.delivery_count);
                self.apply_reader_decision(delivery, t.delivery_count, t.owner, t.entry, decision);
            }
        }
    }

    // ---- timers ----

    fn on_timer(&mut self, now: Now, timer: Timer) {
        match timer {
            Timer::GapCheck => self.next_gap_check(),
            Timer::HeldCopies => self.on_held_timer(now),
            Timer::OrphanScan => self.scan_orphans(now),
            Timer::Reopen(feed) => {
                if self.lease_held() {
                    if feed == Feed::Fanout || feed == Feed::Reader {
                        self.maybe_open_consumers(now);
                    } else {
                        self.open_feed(now, feed);
                    }
                }
            }
        }
    }
}

/// What a failed, unknown or unexpected outcome says, for an event or an error reply.
fn outcome_detail(outcome: &Outcome<Reply>) -> String {
    match outcome {
        Outcome::Failed(f) => f.to_string(),
        Outcome::Unknown => "outcome unknown".into(),
        Outcome::Success(r) => format!("unexpected reply {r:?}"),
    }
}

/// The record fan-out routes `seq` by: the record itself when its current interval admits `seq`,
/// else a view of the closed generation whose interval does (G2 on the fan-out side).
///
/// Without it, a message that fan-out reaches only after its member left **and rejoined** would be
/// judged by the new generation's interval alone and never routed, although it lies in the old
/// generation's window (the reference loses it). The view carries the old generation, so the
/// entry's msg-id and the reader's check both use that generation.
fn routing_view(rec: &MembershipRecord, seq: u64) -> Cow<'_, MembershipRecord> {
    if crate::registry::durable_eligible(rec, seq) {
        return Cow::Borrowed(rec);
    }
    let closed = crate::registry::closed_intervals(rec)
        .into_iter()
        .find(|c| c.interval().contains(seq));
    match closed {
        Some(c) => {
            let mut view = rec.clone();
            view.generation = c.generation;
            view.join_cursor = c.join_cursor;
            view.leave_cursor = Some(c.leave_cursor);
            view.state = MemberState::LiveConfirmed;
            Cow::Owned(view)
        }
        None => Cow::Borrowed(rec),
    }
}

impl Machine for Delivery {
    type Event = DeliveryEvent;

    fn handle_input(&mut self, now: Now, input: Input) {
        self.observe(now);
        match input {
            Input::Completed(c) => self.on_completion(now, c),
            Input::Inbound(i) => self.on_inbound(now, i),
            Input::Connection(c) => self.on_connection(now, c),
        }
        self.after(now);
    }

    fn handle_timeout(&mut self, now: Now) {
        self.observe(now);
        self.lease.handle_timeout(now);
        while let Some(t) = self.timers.pop_expired(now.at) {
            self.on_timer(now, t);
        }
        self.after(now);
    }

    fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    fn poll_event(&mut self) -> Option<DeliveryEvent> {
        self.events.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let lease = self.lease.poll_timeout().map(|(at, _)| at);
        let own = self.timers.next().map(|(at, _)| at);
        // The sweep's backoff only counts while it may run (else a past deadline spins).
        let sweep = self
            .may_sweep()
            .then(|| self.sweeper.poll_timeout())
            .flatten();
        [lease, own, sweep].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests;
