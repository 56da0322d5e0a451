//! What the daemon reports: its feeds, health, counters and events (re-exported by [`super`]).

use super::index::PresenceIgnored;
use crate::delivery::authorize::{Anomaly, DropReason, GiveUp};
use crate::delivery::control::Unanswerable;
use crate::delivery::lease::LeaseEvent;
use crate::delivery::revoke::SweepEvent;
use crate::delivery::route::MentionSkipReason;
use crate::op::Failure;
use crate::registry::{ClosedInterval, RegistryError, WatermarkUse};
use crate::time::Duration;
use crate::wire::keys::KvBucket;
use crate::wire::token::{AgentId, ConcreteChannel};
use std::collections::BTreeSet;
use std::fmt;

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
    pub(super) const WATCHES: [Feed; 4] =
        [Feed::Members, Feed::Acl, Feed::Channels, Feed::Presence];
    /// Every feed, in the order health reports them.
    pub const ALL: [Feed; 7] = [
        Feed::Members,
        Feed::Acl,
        Feed::Channels,
        Feed::Presence,
        Feed::Control,
        Feed::Fanout,
        Feed::Reader,
    ];

    pub(super) fn bucket(self) -> Option<KvBucket> {
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
    /// The published form, written into the lease record's [`HEALTH_FIELD`](crate::delivery::lease::HEALTH_FIELD) so that agents (who
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
    /// Copies newly stored by fan-out and catch-up: straight in the owner's DLV
    /// (`transferred_direct`) or in its dinbox (the rest).
    pub copies_written: u64,
    /// Copy publishes (DLV or dinbox) the duplicate window collapsed.
    pub copies_duplicate: u64,
    /// Copies handed off to DLV (by the reader, and by fan-out straight from CHAT).
    pub transferred: u64,
    /// Of those, copies fan-out wrote straight to DLV (one write per copy); the rest went
    /// through the dinbox (spilled, caught up, or left by an earlier daemon).
    pub transferred_direct: u64,
    /// Entries the reader dropped (deny).
    pub dropped: u64,
    /// Entries the reader deferred (nak).
    pub deferred: u64,
    /// Of those, entries held because a leave of their `(owner, channel)` was writing its
    /// tombstone and they lay past its frontier ([`crate::delivery::authorize::hold_for_leave`]).
    pub held_for_leave: u64,
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
    /// Times the daemon started over with a fresh lease after losing one (or failing to get one).
    pub lease_reacquisitions: u64,
    /// Times a new incarnation wrote over its own earlier hold's unexpired record instead of
    /// waiting for it to expire ([`Lease::reclaim`](crate::delivery::lease::Lease::reclaim)).
    pub lease_reclaims: u64,
    /// Times an owner's dinbox backlog crossed the per-owner cap (G6).
    pub cap_reached: u64,
    /// CHAT deliveries with a copy held back because its owner's dinbox backlog was at
    /// [`DINBOX_HIGH_WATER`](super::DINBOX_HIGH_WATER).
    pub fanout_deferred: u64,
    /// Held CHAT deliveries naked because the hold reached [`FANOUT_HOLD_LIMIT`](super::FANOUT_HOLD_LIMIT).
    pub fanout_hold_expired: u64,
    /// Copies the reader shed because the owner's DLV held the per-owner cap of unread copies
    /// (each also counted in `lost` and reported as [`DeliveryEvent::CopyShed`]).
    pub dlv_shed: u64,
    /// Episodes in which an owner's DLV had copies acked past an unacked one that further writes
    /// could rotate out ([`DeliveryEvent::BackstopAtRisk`]).
    pub dlv_at_risk: u64,
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
    /// Messages read back because the fan-out consumer (CHAT) or the reader consumer (INBOX)
    /// had offered them to a feed that is gone ([`crate::delivery::stranded`]).
    pub stranded_read_back: u64,
    /// Read-backs that failed, reading the stream or writing a read-back entry's DLV copy (the
    /// consumer's redelivery serves them).
    pub stranded_reads_failed: u64,
    /// Control requests abandoned without a reply (lease or connection lost).
    pub abandoned: u64,
    /// DLV copies deleted by the revocation sweep: their owner's ACL no longer admits them
    /// ([`crate::delivery::revoke`]).
    pub dlv_revoked: u64,
    /// DLV sweeps (one owner each) that finished.
    pub dlv_sweeps: u64,
    /// DLV sweeps that gave up: revoked copies may still wait in the owner's DLV.
    pub dlv_sweeps_failed: u64,
    /// Memberships found orphaned: the owner offline beyond [`DeliveryConfig::orphan_retention`](super::DeliveryConfig::orphan_retention).
    pub orphans_found: u64,
    /// Times a stream's consumer headroom was found to have fallen under
    /// [`LOW_HEADROOM_PERCENT`](crate::wire::capacity::LOW_HEADROOM_PERCENT) (issue 22).
    pub consumer_headroom_low: u64,
    /// Orphaned memberships this daemon tombstoned ([`DeliveryConfig::reap_orphans`](super::DeliveryConfig::reap_orphans)).
    pub orphans_reaped: u64,
    /// `durableJoin`s answered `durable:false` because the channel resolves live: no record was
    /// written (G38, [`REASON_LIVE_CLASS`](crate::wire::control::REASON_LIVE_CLASS)).
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
            transferred_direct,
            dropped,
            deferred,
            held_for_leave,
            terminated,
            lost,
            evicted_ranges,
            writes_failed,
            cas_retries,
            fenced,
            lease_lost,
            lease_reacquisitions,
            lease_reclaims,
            cap_reached,
            fanout_deferred,
            fanout_hold_expired,
            dlv_shed,
            dlv_at_risk,
            backlog_unverified,
            evicted_before_fanout,
            gaps_unverified,
            fanout_anomalies,
            stranded_read_back,
            stranded_reads_failed,
            abandoned,
            dlv_revoked,
            dlv_sweeps,
            dlv_sweeps_failed,
            live_class_joins,
            orphans_found,
            consumer_headroom_low,
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
        self.transferred_direct += transferred_direct;
        self.dropped += dropped;
        self.deferred += deferred;
        self.held_for_leave += held_for_leave;
        self.terminated += terminated;
        self.lost += lost;
        self.evicted_ranges += evicted_ranges;
        self.writes_failed += writes_failed;
        self.cas_retries += cas_retries;
        self.fenced += fenced;
        self.lease_lost += lease_lost;
        self.lease_reacquisitions += lease_reacquisitions;
        self.lease_reclaims += lease_reclaims;
        self.cap_reached += cap_reached;
        self.fanout_deferred += fanout_deferred;
        self.fanout_hold_expired += fanout_hold_expired;
        self.dlv_shed += dlv_shed;
        self.dlv_at_risk += dlv_at_risk;
        self.backlog_unverified += backlog_unverified;
        self.evicted_before_fanout += evicted_before_fanout;
        self.gaps_unverified += gaps_unverified;
        self.fanout_anomalies += fanout_anomalies;
        self.stranded_read_back += stranded_read_back;
        self.stranded_reads_failed += stranded_reads_failed;
        self.abandoned += abandoned;
        self.dlv_revoked += dlv_revoked;
        self.dlv_sweeps += dlv_sweeps;
        self.dlv_sweeps_failed += dlv_sweeps_failed;
        self.live_class_joins += live_class_joins;
        self.orphans_found += orphans_found;
        self.consumer_headroom_low += consumer_headroom_low;
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
    /// The daemon started over after a lost lease (or one it could not acquire): a new
    /// incarnation, acquiring a fresh lease ([`DeliveryConfig::reacquire_lease`](super::DeliveryConfig::reacquire_lease)).
    Reincarnated {
        /// 1 for the first start-over, then 2 …
        incarnation: u64,
    },
    /// The lease is timed by the lease bucket's TTL, which differs from the configured one
    /// ([`DeliveryConfig::lease_ttl_from_bucket`](super::DeliveryConfig::lease_ttl_from_bucket)).
    LeaseTtl {
        /// The bucket's TTL.
        ttl: crate::time::Duration,
    },
    /// The lease bucket's TTL could not be read or cannot time a lease (too short to renew in):
    /// no acquisition until a read gives a usable one (retried).
    LeaseTtlUnusable {
        /// What went wrong.
        detail: String,
    },
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
    /// [`DeliveryConfig::orphan_retention`](super::DeliveryConfig::orphan_retention) (G12). Reported once per episode; `reaping` says
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
        /// Whether it is being tombstoned ([`DeliveryConfig::reap_orphans`](super::DeliveryConfig::reap_orphans)).
        reaping: bool,
    },
    /// A stream's consumer headroom crossed [`LOW_HEADROOM_PERCENT`] (issue 22): `low` when
    /// less is free (agents can no longer be provisioned once it is full, and on CHAT the
    /// catch-up readers of joins are refused), not `low` when it is back above.
    ///
    /// [`LOW_HEADROOM_PERCENT`]: crate::wire::capacity::LOW_HEADROOM_PERCENT
    ConsumerHeadroom {
        /// The stream (`CHAT_<space>`, `DLV_<space>`).
        stream: String,
        /// Its headroom as `STREAM.INFO` reported it.
        headroom: crate::wire::capacity::Headroom,
        /// Whether it is low now.
        low: bool,
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
    /// An owner's dinbox backlog reached [`DINBOX_HIGH_WATER`](super::DINBOX_HIGH_WATER): fan-out holds its copies back
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
    /// The owner's consumer has copies acked past an unacked one (its ack floor is held): `span`
    /// of this daemon's copies are stored above the floor, `unread` are unread. Writes the
    /// unread count admits may push the unacked copy out of the owner's DLV (the cap rotates
    /// the oldest stored copy out, acked or not); if the member then needs it again (it dies
    /// holding it, or naks it), it is lost. Reported once per episode
    /// ([`crate::delivery::backlog`], G6).
    BackstopAtRisk {
        /// The owner.
        owner: AgentId,
        /// Stored copies above the ack floor.
        span: u64,
        /// Unread copies.
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
