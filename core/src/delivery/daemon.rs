//! The delivery daemon machine: the privileged side of the durable backstop for one space and one
//! shard (semantics §2 (g)–(m); invariants I7–I21, I25–I31; gaps G1–G4, G6, G22–G27, G32–G38,
//! G40).
//!
//! [`Delivery`] is an [`io::Machine`](crate::io::Machine). It composes the pure pieces of this
//! module tree: the [`Lease`] machine, the control gate ([`admit`](crate::delivery::control::admit)), the registry plans
//! ([`crate::registry`]), the fan-out router ([`route()`](crate::delivery::route::route)) and the reader's decision
//! ([`authorize()`](crate::delivery::authorize::authorize)).
//!
//! # The machine in one screen
//!
//! `Delivery` is a parent that owns small children; each child is a struct in its own file with
//! its own state and the op ids it issued. Every child writes into one shared context
//! (`Ctx`: the one op-id allocator, command queue, event queue, timer table and counters), lent
//! as `&mut` for one call, so op ids and the order of commands and events are those of a single
//! machine. The parent routes each completion by asking the children which one owns its op
//! (`owns(op)`), and passes what a child needs of a sibling as an argument, never a reference
//! kept.
//!
//! | child (file) | owns | issues | the parent routes to it |
//! |---|---|---|---|
//! | [`Lease`] (`lease.rs` one level up; glue in `leasing.rs`) | the shard's lease, fencing token | `KvPut`/`KvDelete`/`KvGet` of `lease.<i>` (ops in the parent's `Pending::Lease`) | its completions, timeouts; its events start or stop everything |
//! | `Feeds` (`feeds.rs`) | feed states, sub ids, loaded watches, failures | `KvWatch`, `Subscribe`, `Consume`, closes; `Timer::Reopen` | open completions → `Opened` |
//! | `Views` (`views.rs`) | member and ACL indexes, channel registry, roster, presence heartbeats | nothing | every watched KV change |
//! | `Fanout` (`fanout.rs`) | batches, highest CHAT seq, spilled copies in flight, inbox backlog, held copies, back-pressure, writes failing | DLV and dinbox `JsPublish`, reader `ConsumerInfo`, CHAT settles; `Timer::HeldCopies` | fan-out deliveries (with `Lent`: the views, leave frontiers, the DLV gate), its completions, the timer, the reader's settles |
//! | `Gaps` (`gaps.rs`) | fan-out's sequence cursor, skipped ranges, the check in flight | CHAT `ReadStream`; `Timer::GapCheck` | a skipped seq (before fan-out routes it), its completion, the timer |
//! | `Stranded` (`stranded.rs`), one per consumer | the range the fan-out (CHAT) or reader (INBOX) consumer offered to a feed that is gone, the read in flight | `ReadStream` of CHAT or INBOX | the consumer's bind (its ack floor, pointer, pending count), its completions (CHAT messages go to `Fanout` as read-backs, dinbox entries to `Reader::on_read_back`) |
//! | `Reader` (`reader.rs`) | transfers, DLV backlog (the DLV gate fan-out's direct copies pass too), the one copy decision (`judge`) | DLV `JsPublish`, DLV `ConsumerInfo` | reader deliveries (with the ACL and member indexes), its completions, fan-out's direct copies at the gate |
//! | `Notifier` (`notices.rs`) | the loss notices, their reads and writes | `KvGet`/`KvPut` of `cotal_losses_<space>` | losses from the reader and the gap checks, its completions |
//! | [`DlvSweeper`] ([`crate::delivery::revoke`]) | the revocation sweeps | DLV reads and deletes (ops in `Pending::Sweep`) | ACL changes, transfers under a revoked ACL, its completions |
//! | (parent, `headroom.rs`) | the last consumer-headroom reading of CHAT and DLV | `StreamInfo` (ops in `Pending::Headroom`); `Timer::HeadroomCheck` | its completions: a crossing of the low mark is an event, the reading goes into the lease record |
//! | `Jobs` (`jobs.rs`, `jobs/join.rs`, `jobs/leave.rs`) | jobs, lanes per `(owner, channel)`, held requests | KV reads and CAS writes of members, ACL reads, CHAT info/reads, catch-up `JsPublish`, replies | control requests, its completions, orphan reaping, readiness (every lane pumped) |
//!
//! What crosses between children, always through the parent: fan-out reports a skipped sequence
//! to `Gaps` first; fan-out asks the reader's DLV gate before it writes a copy straight to DLV
//! (a closure the parent lends), a direct copy that failed gives its place back to the gate, and
//! one that landed goes to the sweeper like a reader transfer (`FanoutStep`); the lost ranges `Gaps` returns go to `Notifier` with the member index; the
//! `ReaderStep`s the reader returns are applied in order (`Fanout::settled`, a settle,
//! `Notifier` for a loss, the sweeper for a transfer under a revoked ACL); a join's fence reads
//! `Fanout::high`, its catch-up copies count in `Fanout::stored`, and its confirmed writes go into
//! the member index (the jobs get these lent for one call in an `Env`, with the lease's writer of
//! the instant); an ACL change in `Views` queues a sweep; a loaded watch or a known inbox
//! backlog lets `Feeds` open the consumers. `poll_timeout` is the minimum of the lease's, the
//! shared timer table's (every child's deadlines) and the sweeper's.
//!
//! `leasing.rs` (the lease glue and the stop) and `orphans.rs` (the orphan scan: views × jobs ×
//! lease record) are parent glue (`impl Delivery` blocks). Shared types live in leaf modules
//! that import no child: `config.rs` and `events.rs` (public, re-exported here), `types.rs` and
//! `context.rs`.
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
//!    the CHAT frontier, and the member key, plans with [`plan_join`](crate::registry::plan_join) (watermark join cursor G1,
//!    generation floor G34), writes with CAS (re-read and re-plan on conflict, at most
//!    [`KV_CAS_ATTEMPTS`](crate::constants::KV_CAS_ATTEMPTS)), reads the fence, copies `(J, fence]` from CHAT into the owner's
//!    dinbox, checks for eviction, then tombstones (eviction) or activates.
//! 4. **Fan-out**: every CHAT delivery is routed against the in-memory membership index (fed by
//!    the watch **and** by our own confirmed writes) and each copy judged as the reader would;
//!    a copy it may transfer goes straight to the owner's DLV (one write per copy), the rest
//!    spill to the owner's dinbox (see `daemon/fanout.rs`). Every copy is published at once, and
//!    the CHAT delivery is acked only after every PubAck; any failure naks it with backoff. A copy
//!    whose owner's dinbox backlog is at [`DINBOX_HIGH_WATER`] is **held** in memory with its
//!    CHAT delivery unsettled and written, in CHAT order, as soon as the reader has drained the
//!    owner below the mark; the held deliveries fill the fan-out window, which pauses fan-out.
//!    A hold older than [`FANOUT_HOLD_LIMIT`] gives up and naks the message instead (its
//!    redelivery writes the held copies).
//! 5. **Reader**: every dinbox entry (spilled, caught up, or left by an earlier daemon) is
//!    authorized against the in-memory ACL and membership views, transferred to `dlv.<owner>` and
//!    acked only after the DLV PubAck (I21).
//!
//! # Decisions
//!
//! - **Fencing (G23).** Every registry write takes the lease's fencing token at the moment it is
//!   planned ([`Lease::fencing_token`]); without one the job is abandoned with no reply (the
//!   successor daemon answers the same request). A [`RegistryError::Fenced`](crate::registry::RegistryError::Fenced) refusal is reported
//!   and abandons the job the same way. Losing the lease stops everything: feeds closed, jobs
//!   abandoned, health degraded. The machine never re-acquires on its own; a driver that wants
//!   to try again builds a new [`Delivery`].
//! - **The fence, a leave during catch-up, eviction, catch-up write failures**: see the module docs of `daemon/join.rs`.
//! - **Per-owner caps (G6)**: see the module docs of `daemon/fanout.rs`.
//! - **Sharding (G36).** Shard `i` of `N` owns the owners [`Shard::owns`](crate::wire::shard::Shard::owns) picks: it routes only
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

use crate::constants::{CONSUMER_HEADROOM_INTERVAL, ORPHAN_SCAN_INTERVAL};
use crate::delivery::control::SerialKey;
use crate::delivery::gap::SeqRange;
use crate::delivery::lease::{
    CONSUMERS_FIELD, HEALTH_FIELD, Lease, LeaseCommand, LeaseEntry, LeaseEvent, LeaseReply,
    LeaseState, ORPHANS_FIELD,
};
use crate::delivery::losses::LossReason;
use crate::delivery::revoke::{DlvSweeper, SweepEvent};
use crate::delivery::stranded::stranded_range;
use crate::io::{
    AckKind, Command, Completion, Connection, Inbound, Input, KvCondition, KvOperation, Machine,
    Reply, StoredMessage, SubId,
};
use crate::ledger::DeliveryId;
use crate::op::{Failure, OpId, Outcome};
use crate::registry::Writer;
use crate::time::{Duration, Instant, Now};
use crate::wire::config::{ConsumerSpec, SpaceStream};
use crate::wire::json;
use crate::wire::keys::KvBucket;
use crate::wire::records::DeliveryLease;
use crate::wire::subject::chat_wildcard;
use crate::wire::token::{AgentId, ConcreteChannel};
use index::MemberIndex;
pub use index::{PresenceFault, PresenceIgnored};
use std::collections::{BTreeMap, BTreeSet};

mod config;
mod context;
mod events;
mod fanout;
mod feeds;
mod gaps;
mod headroom;
mod jobs;
mod leasing;
mod notices;
mod orphans;
mod reader;
mod stranded;
mod types;
mod views;

pub use config::*;
use context::Ctx;
pub use events::*;
use fanout::{Fanout, FanoutStep, Lent, Offer};
use feeds::{Feeds, Opened};
use gaps::Gaps;
use jobs::{Env, Jobs};
use notices::Notifier;
use reader::{Reader, ReaderStep};
use stranded::{STRAND_CHECK_INTERVAL, Stranded};
use types::*;
use views::Views;

/// The delivery daemon of one shard. See the [module docs](self).
///
/// Drive it as any [`Machine`]: feed [`Input`]s and expired deadlines, drain
/// [`poll_command`](Machine::poll_command) and [`poll_event`](Machine::poll_event), sleep until
/// [`poll_timeout`](Machine::poll_timeout). [`Delivery::shutdown`] releases the lease.
#[derive(Debug)]
pub struct Delivery {
    config: DeliveryConfig,
    lease: Lease,
    /// The shared context lent to the children ([`context`]).
    cx: Ctx,
    pending: BTreeMap<OpId, Pending>,
    connected: bool,
    stopped: bool,
    /// [`Delivery::shutdown`] was called: the daemon ends, whatever happens to its lease.
    shut_down: bool,
    /// A new incarnation is due at the next reconnect (its timer fired while disconnected).
    reacquire_due: bool,
    /// How many times this daemon started over with a fresh lease (0: the first incarnation).
    incarnation: u64,
    /// The watches, the control subscription and the consumers ([`feeds`]).
    feeds: Feeds,
    /// The in-memory views the watches feed ([`views`]).
    views: Views,
    /// Fan-out: batches, held copies, the inbox backlog ([`fanout`]).
    fanout: Fanout,
    /// Sequence continuity: the skipped CHAT ranges and their checks ([`gaps`]).
    gaps: Gaps,
    /// What the fan-out consumer offered to a feed that is gone, read back ([`stranded`]).
    stranded: Stranded,
    /// What the reader consumer offered to a feed that is gone, read back ([`stranded`]).
    stranded_inbox: Stranded,
    /// The control jobs and their lanes ([`jobs`]).
    jobs: Jobs,
    /// The reader: authorization, DLV transfers, DLV backlogs ([`reader`]).
    reader: Reader,
    /// Loss notices ([`notices`]).
    notices: Notifier,
    health: DeliveryHealth,
    last_now: Option<Instant>,
    /// The DLV revocation sweep ([`crate::delivery::revoke`]).
    sweeper: DlvSweeper,
    /// When this daemon started watching presence: an owner never seen is offline since then.
    watching_since: Option<Instant>,
    /// The orphaned memberships of the last scan: `(owner, channel)` → generation.
    orphans: BTreeMap<(AgentId, ConcreteChannel), u64>,
    /// The last consumer-headroom reading of CHAT and DLV ([`headroom`]).
    headroom: BTreeMap<String, crate::wire::capacity::Headroom>,
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
        let gaps = Gaps::new(config.space.clone(), config.catchup_page);
        let fanout_spec =
            ConsumerSpec::fanout(&config.space, config.shard.index(), config.shard.shards());
        let stranded = Stranded::new(
            Feed::Fanout,
            SpaceStream::Chat.name(&config.space),
            chat_wildcard(&config.space),
            config.catchup_page,
        )
        .checking(fanout_spec.stream, fanout_spec.name);
        let reader_spec =
            ConsumerSpec::reader(&config.space, config.shard.index(), config.shard.shards());
        let stranded_inbox = Stranded::new(
            Feed::Reader,
            reader_spec.stream.clone(),
            reader_spec.filter_subject,
            config.catchup_page,
        )
        .checking(reader_spec.stream, reader_spec.name);
        let notices = Notifier::new(config.space.clone());
        let fanout = Fanout::new(config.space.clone(), config.shard, &config);
        let reader = Reader::new(config.space.clone(), config.shard, config.reference_gap_g2);
        let mut d = Delivery {
            config,
            lease,
            cx: Ctx::new(),
            pending: BTreeMap::new(),
            connected: false,
            stopped: false,
            shut_down: false,
            reacquire_due: false,
            incarnation: 0,
            feeds: Feeds::new(),
            views: Views::new(),
            fanout,
            gaps,
            stranded,
            stranded_inbox,
            jobs: Jobs::default(),
            reader,
            notices,
            health: DeliveryHealth::Degraded(BTreeSet::new()),
            last_now: None,
            sweeper,
            watching_since: None,
            orphans: BTreeMap::new(),
            headroom: BTreeMap::new(),
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
        &self.cx.counters
    }

    /// The lease machine's state.
    pub fn lease_state(&self) -> LeaseState {
        self.lease.state()
    }

    /// The lease's timing in use: the lease bucket's TTL once read
    /// ([`DeliveryConfig::lease_ttl_from_bucket`]).
    pub fn lease_config(&self) -> &crate::delivery::lease::LeaseConfig {
        self.lease.config()
    }

    /// The in-memory membership index.
    pub fn members(&self) -> &MemberIndex {
        &self.views.members
    }

    /// The DLV revocation sweeper (its queue and running sweep).
    pub fn sweeper(&self) -> &DlvSweeper {
        &self.sweeper
    }

    /// The highest CHAT sequence fan-out has received (the fan-out part of the fence).
    pub fn fanout_progress(&self) -> u64 {
        self.fanout.high()
    }

    /// How many times this daemon started over with a fresh lease after losing one (0: never).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Stopped at a lost lease, with a new incarnation to come (its health reads
    /// `lease-not-held`, not `stopped`).
    fn starting_over(&self) -> bool {
        self.reacquire_due || self.cx.timers.get(&Timer::Reacquire).is_some()
    }

    /// True once every feed is open and control requests are served.
    pub fn serving(&self) -> bool {
        !self.stopped && self.connected && self.feeds.all_open()
    }

    /// Shuts down: closes every feed, abandons jobs, and releases the lease (a successor's lease
    /// is never deleted, D6).
    pub fn shutdown(&mut self, now: Now) {
        self.observe(now);
        self.shut_down = true;
        self.cx.timers.cancel(&Timer::Reacquire);
        self.close_feeds();
        self.jobs
            .abandon_jobs(&mut self.cx, AbandonReason::LeaseNotHeld);
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
        let op = self.cx.op();
        self.pending.insert(op, pending);
        op
    }

    fn emit(&mut self, e: DeliveryEvent) {
        self.cx.emit(e);
    }

    /// Settles a CHAT or dinbox delivery with a plain (unconfirmed) ack: nothing here waits on
    /// the outcome. An ack lost on the way means a redelivery after `ack_wait`, and redoing a
    /// fan-out or a transfer is collapsed by the copy's msg-id.
    fn settle(&mut self, delivery: DeliveryId, kind: AckKind) {
        self.cx.settle(delivery, kind);
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
        self.feeds.is_open(feed)
    }

    fn feed_of(&self, sub: SubId) -> Option<Feed> {
        self.feeds.feed_of(sub)
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
            self.cx
                .timers
                .set(Timer::OrphanScan, now.at + self.orphan_scan_interval());
            // The first headroom reading one interval after the daemon starts serving, then
            // every interval (`cotal health` reads the streams itself at any time).
            self.cx
                .timers
                .set(Timer::HeadroomCheck, now.at + CONSUMER_HEADROOM_INTERVAL);
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
            for cmd in self.sweeper.pump(now.at, &mut self.cx.ops) {
                if let Some(op) = cmd.op() {
                    self.pending.insert(op, Pending::Sweep);
                }
                self.cx.commands.push_back(cmd);
            }
        }
        while let Some(e) = self.sweeper.poll_event() {
            match &e {
                SweepEvent::Revoked { .. } => self.cx.counters.dlv_revoked += 1,
                SweepEvent::Finished { .. } => self.cx.counters.dlv_sweeps += 1,
                SweepEvent::Failed { .. } => self.cx.counters.dlv_sweeps_failed += 1,
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
            && self.feeds.loaded(Feed::Acl)
    }

    /// A transfer to `owner`'s DLV completed (in any outcome) for a channel its **current** ACL no
    /// longer admits: the reader judged it under an older view, and the copy may have landed
    /// after a sweep read past it. Sweep again.
    fn sweep_if_revoked(&mut self, owner: &AgentId, channel: &ConcreteChannel) {
        let admitted = self
            .views
            .acls
            .get(owner)
            .is_some_and(|v| crate::delivery::authorize::acl_admits(&v.read, channel));
        if !admitted {
            self.sweeper.request(owner.clone());
        }
    }

    fn compute_health(&self) -> DeliveryHealth {
        let mut reasons = BTreeSet::new();
        if self.stopped && !self.starting_over() {
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
        if self.fanout.writes_failing() {
            reasons.insert(DegradedReason::WritesFailing);
        }
        if reasons.is_empty() {
            DeliveryHealth::Active
        } else {
            DeliveryHealth::Degraded(reasons)
        }
    }

    // ---- connection ----

    fn on_connection(&mut self, now: Now, c: Connection) {
        match c {
            Connection::Lost => {
                self.connected = false;
                self.feeds.connection_lost(&mut self.cx);
                self.jobs
                    .abandon_jobs(&mut self.cx, AbandonReason::ConnectionLost);
                self.sweeper.interrupt();
                self.fanout.connection_lost(&mut self.cx);
                self.reader.connection_lost();
                self.notices.connection_lost();
                self.gaps.connection_lost();
                self.stranded.connection_lost();
                self.stranded_inbox.connection_lost();
                // Only the lease's completions still matter; the rest are answered Unknown and
                // ignored.
                self.pending
                    .retain(|_, p| matches!(p, Pending::Lease { .. }));
            }
            Connection::Restored => {
                self.connected = true;
                if self.stopped {
                    if self.reacquire_due {
                        self.reincarnate(now);
                    }
                    return;
                }
                match self.lease.state() {
                    LeaseState::Idle => self.acquire_lease(now),
                    LeaseState::Held | LeaseState::Ready => {
                        self.open_feeds(now);
                        self.next_gap_check();
                        self.notices.resume(&mut self.cx);
                    }
                    _ => {}
                }
            }
        }
    }

    // ---- completions ----

    fn on_completion(&mut self, now: Now, c: Completion) {
        if self.feeds.owns(c.op) {
            let (connected, live) = (self.connected, self.connected && !self.stopped);
            let opened =
                self.feeds
                    .on_completion(&mut self.cx, now, c.op, c.outcome, connected, live);
            return self.on_feed_opened(now, opened);
        }
        if self.jobs.owns(c.op) {
            return self.with_jobs(now, |jobs, env| {
                jobs.on_completion(env, now, c.op, c.outcome)
            });
        }
        if self.fanout.owns(c.op) {
            match self.fanout.on_completion(&mut self.cx, c.op, c.outcome) {
                Some(FanoutStep::InboxBacklogRead) if self.lease_held() => {
                    self.maybe_open_consumers(now);
                }
                Some(FanoutStep::Transferred {
                    owner,
                    channel,
                    seq,
                }) => {
                    self.reader.direct_done(&owner, true, seq);
                    self.sweep_if_revoked(&owner, &channel);
                }
                Some(FanoutStep::DirectUnstored(owner)) => {
                    self.reader.direct_done(&owner, false, None)
                }
                _ => {}
            }
            return;
        }
        if self.reader.owns(c.op) {
            let steps = self.reader.on_completion(&mut self.cx, c.op, c.outcome);
            return self.reader_steps(steps);
        }
        if self.notices.owns(c.op) {
            return self.notices.on_completion(&mut self.cx, c.op, c.outcome);
        }
        if self.stranded.owns(c.op) {
            let messages = self.stranded.on_completion(&mut self.cx, c.op, c.outcome);
            return self.fan_out_read_back(now, messages);
        }
        if self.stranded.owns_check(c.op) {
            let fanout = &self.fanout;
            if self
                .stranded
                .on_check(c.op, c.outcome, &|seq| fanout.holds(seq))
            {
                let live = self.connected && !self.stopped;
                self.stranded.next(&mut self.cx, live);
            }
            return;
        }
        if self.stranded_inbox.owns_check(c.op) {
            let reader = &self.reader;
            if self
                .stranded_inbox
                .on_check(c.op, c.outcome, &|seq| reader.holds(seq))
            {
                let live = self.connected && !self.stopped;
                self.stranded_inbox.next(&mut self.cx, live);
            }
            return;
        }
        if self.stranded_inbox.owns(c.op) {
            let entries = self
                .stranded_inbox
                .on_completion(&mut self.cx, c.op, c.outcome);
            return self.transfer_read_back(entries);
        }
        if self.gaps.owns(c.op) {
            let report = self.gaps.on_completion(&mut self.cx, now, c.op, c.outcome);
            for range in report.lost {
                self.tell_evicted(range);
            }
            // What the skipped range still holds went to a feed that is gone: fanned out now,
            // not after the consumer's ack_wait (`delivery::stranded`).
            if !self.stopped && self.config.read_back_stranded {
                self.cx.counters.stranded_read_back += report.present.len() as u64;
                self.fan_out_stranded(now, report.present);
            }
            if report.next {
                self.next_gap_check();
            }
            return;
        }
        let Some(pending) = self.pending.remove(&c.op) else {
            return; // abandoned at a connection loss or a stop
        };
        match pending {
            Pending::Lease { lease_op, kind } => {
                self.on_lease_completion(now, lease_op, kind, c.outcome);
            }
            Pending::Sweep => self
                .sweeper
                .on_completion(c.op, c.outcome, &self.views.acls),
            Pending::Headroom(stream) => self.on_headroom(stream, c.outcome),
            Pending::LeaseTtl => self.on_lease_ttl(now, c.outcome),
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
            Inbound::KvChange { entry, .. } => {
                let shard = self.config.shard;
                if let Some(owner) = self.views.apply(&mut self.cx, now.at, feed, &entry, shard) {
                    self.sweeper.request(owner);
                }
            }
            Inbound::Message {
                subject,
                reply,
                payload,
                ..
            } if feed == Feed::Control => {
                self.with_jobs(now, |jobs, env| {
                    jobs.on_control(env, now, &subject, reply.as_deref(), &payload);
                });
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
                    if self.gaps.offered(stream_seq) {
                        self.next_gap_check();
                    }
                    let offer = Offer::Delivery(delivery);
                    self.fan_out(now, offer, stream_seq, delivery_count, &subject, &payload);
                }
                Feed::Reader => {
                    let jobs = &self.jobs;
                    let steps = self.reader.on_delivery(
                        &mut self.cx,
                        &self.views.acls,
                        &self.views.members,
                        &|owner, channel| jobs.leave_frontier(owner, channel),
                        delivery,
                        stream_seq,
                        delivery_count,
                        &subject,
                        &payload,
                    );
                    self.reader_steps(steps);
                }
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

    // ---- control jobs (the [`Jobs`] child) ----

    /// Runs `f` on the jobs with what they may use for this call ([`Env`]).
    fn with_jobs<R>(&mut self, now: Now, f: impl FnOnce(&mut Jobs, &mut Env<'_>) -> R) -> R {
        let writer = self.writer(now);
        let serving = self.serving();
        let mut env = Env {
            cx: &mut self.cx,
            config: &self.config,
            writer,
            serving,
            members: &mut self.views.members,
            channels: &self.views.channels,
            fanout: &mut self.fanout,
        };
        f(&mut self.jobs, &mut env)
    }

    // ---- feeds (the [`Feeds`] child) ----

    fn open_feeds(&mut self, now: Now) {
        for f in Feed::WATCHES {
            self.open_feed(now, f);
        }
        self.open_feed(now, Feed::Control);
        self.maybe_open_consumers(now);
    }

    /// The consumers open once every watch is loaded.
    fn maybe_open_consumers(&mut self, now: Now) {
        if self.feeds.watches_loaded() {
            self.open_feed(now, Feed::Reader);
            // Fan-out writes dinbox entries: it starts once the reader consumer's unread total
            // (what a predecessor left) is known ([`crate::delivery::backlog`]).
            if self.fanout.legacy_known() {
                self.open_feed(now, Feed::Fanout);
            }
        }
    }

    fn open_feed(&mut self, _now: Now, feed: Feed) {
        // Defence in depth: every caller already holds the lease on a live connection (a loss
        // cancels the reopen timers and forgets the feeds' and fan-out's ops; stopping ends the
        // lease), so this guard never fires today (its `&&` mutant survives, equivalent).
        if self.stopped || !self.connected {
            return;
        }
        self.feeds.open(&mut self.cx, &self.config, feed);
    }

    fn close_feeds(&mut self) {
        self.feeds.close_all(&mut self.cx, self.connected);
    }

    fn feed_failed(&mut self, now: Now, feed: Feed, detail: String) {
        let live = self.connected && !self.stopped;
        self.feeds.failed(&mut self.cx, now, feed, detail, live);
    }

    /// A feed opened: the fan-out cursor is bound, the reader's backlog read, the consumers
    /// opened once every watch is loaded, and the daemon made ready once everything is open.
    fn on_feed_opened(&mut self, now: Now, opened: Opened) {
        let Opened::Open { feed, bound } = opened else {
            return;
        };
        let read_back = self.config.read_back_stranded;
        if matches!(feed, Feed::Fanout | Feed::Reader) && read_back {
            self.cx
                .timers
                .set(Timer::StrandCheck, now.at + STRAND_CHECK_INTERVAL);
        }
        if let Some(at) = bound {
            let range =
                stranded_range(at.delivered, at.ack_floor, at.ack_pending).filter(|_| read_back);
            let live = self.connected && !self.stopped;
            if feed == Feed::Fanout {
                self.gaps.bound(at.delivered);
                self.stranded.bound(range);
                self.stranded.next(&mut self.cx, live);
            } else if feed == Feed::Reader {
                self.stranded_inbox.bound(range);
                self.stranded_inbox.next(&mut self.cx, live);
            }
        }
        if feed == Feed::Reader {
            let live = self.connected && !self.stopped;
            self.fanout.read_inbox_backlog(&mut self.cx, now, live);
        }
        if feed.bucket().is_some() {
            self.maybe_open_consumers(now);
        }
        self.maybe_ready(now);
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
        self.with_jobs(now, |jobs, env| jobs.pump_all(env, now));
    }

    // ---- fan-out (the [`Fanout`] child) ----

    /// Fans one CHAT message out: a delivery of the fan-out consumer, or a stranded one read
    /// back.
    fn fan_out(
        &mut self,
        now: Now,
        offer: Offer,
        seq: u64,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        let live = self.connected && !self.stopped;
        let (jobs, reader) = (&self.jobs, &mut self.reader);
        let lent = Lent {
            views: &self.views,
            leave_frontier: &|owner, channel| jobs.leave_frontier(owner, channel),
            dlv_gate: &mut |cx, owner, sender, batch| reader.admit_direct(cx, owner, sender, batch),
        };
        self.fanout.on_delivery(
            &mut self.cx,
            lent,
            live,
            now,
            offer,
            seq,
            delivery_count,
            subject,
            payload,
        );
    }

    /// Fans out the stranded messages a read brought back (unless the daemon stopped meanwhile
    /// or fan-out holds the message already), then reads the next page. Each counts as offered
    /// before (`delivery_count` 2): a mention it leaves unresolved was reported when the
    /// consumer first offered it.
    fn fan_out_read_back(&mut self, now: Now, messages: Vec<StoredMessage>) {
        if self.stopped {
            return;
        }
        self.fan_out_stranded(now, messages);
        let live = self.connected && !self.stopped;
        self.stranded.next(&mut self.cx, live);
    }

    /// Fans out CHAT messages the consumer offered to a feed that is gone (read back, or found
    /// by a gap check), except those fan-out holds now.
    fn fan_out_stranded(&mut self, now: Now, messages: Vec<StoredMessage>) {
        for m in messages {
            if !self.fanout.holds(m.seq) {
                self.fan_out(now, Offer::ReadBack, m.seq, 2, &m.subject, &m.payload);
            }
        }
    }

    /// Hands the dinbox entries a read brought back to the reader (unless the daemon stopped
    /// meanwhile), then reads the next page.
    fn transfer_read_back(&mut self, entries: Vec<StoredMessage>) {
        if self.stopped {
            return;
        }
        for e in entries {
            let jobs = &self.jobs;
            self.reader.on_read_back(
                &mut self.cx,
                &self.views.acls,
                &self.views.members,
                &|owner, channel| jobs.leave_frontier(owner, channel),
                &e.subject,
                &e.payload,
            );
        }
        let live = self.connected && !self.stopped;
        self.stranded_inbox.next(&mut self.cx, live);
    }

    // ---- sequence continuity (the [`Gaps`] child) ----

    /// Starts the next check of a skipped range, if the daemon may read.
    fn next_gap_check(&mut self) {
        let live = self.connected && !self.stopped;
        self.gaps.next(&mut self.cx, live);
    }

    /// Gives up every skipped range still to check; the members concerned are told.
    fn give_up_gap_checks(&mut self, detail: &str) {
        for range in self.gaps.give_up_all(&mut self.cx, detail) {
            self.tell_evicted(range);
        }
    }

    // ---- the reader (the [`Reader`] child) ----

    /// Applies what the reader asked, in its order.
    fn reader_steps(&mut self, steps: Vec<ReaderStep>) {
        for step in steps {
            match step {
                ReaderStep::Settled(owner) => self.fanout.settled(&mut self.cx, &owner),
                ReaderStep::Settle(delivery, kind) => {
                    self.reader.delivery_settled(delivery);
                    self.settle(delivery, kind);
                }
                ReaderStep::Lost {
                    owner,
                    channel,
                    seq,
                    reason,
                } => self.tell_loss(&owner, &channel, seq, reason),
                ReaderStep::SweepIfRevoked { owner, channel } => {
                    self.sweep_if_revoked(&owner, &channel);
                }
                ReaderStep::WriteDirect { batch, owner } => {
                    let jobs = &self.jobs;
                    let released = self.fanout.release_parked(
                        &mut self.cx,
                        &self.views,
                        &|owner, channel| jobs.leave_frontier(owner, channel),
                        batch,
                        &owner,
                    );
                    if released != fanout::Released::Written {
                        self.reader.direct_done(&owner, false, None);
                    }
                }
                ReaderStep::ShedDirect {
                    batch,
                    owner,
                    unread,
                } => {
                    if let Some((channel, seq)) =
                        self.fanout.shed_parked(&mut self.cx, batch, &owner, unread)
                    {
                        self.tell_loss(&owner, &channel, seq, LossReason::DlvFull);
                    }
                }
            }
        }
    }

    // ---- loss notices (the [`Notifier`] child) ----

    /// A copy of `seq` on `channel` is lost to `owner`: told to its loss record.
    fn tell_loss(
        &mut self,
        owner: &AgentId,
        channel: &ConcreteChannel,
        seq: u64,
        reason: LossReason,
    ) {
        let live = self.connected && !self.stopped;
        self.notices
            .lost(&mut self.cx, live, owner, channel, seq, reason);
    }

    /// CHAT `range` left the stream before fan-out: the members concerned are told.
    fn tell_evicted(&mut self, range: SeqRange) {
        let live = self.connected && !self.stopped;
        self.notices.evicted(
            &mut self.cx,
            live,
            &self.views.members,
            self.config.shard,
            range,
        );
    }

    // ---- timers ----

    fn on_timer(&mut self, now: Now, timer: Timer) {
        match timer {
            Timer::GapCheck => self.next_gap_check(),
            Timer::HeldCopies => {
                let live = self.connected && !self.stopped;
                self.fanout.on_held_timer(&mut self.cx, now, live);
            }
            Timer::OrphanScan => self.scan_orphans(now),
            Timer::HeadroomCheck => self.check_headroom(now),
            Timer::Reacquire => self.on_reacquire_timer(now),
            Timer::StrandCheck => {
                let (fanout, reader) = (
                    self.feeds.is_open(Feed::Fanout),
                    self.feeds.is_open(Feed::Reader),
                );
                if self.connected && !self.stopped && (fanout || reader) {
                    if fanout {
                        self.stranded.check(&mut self.cx);
                    }
                    if reader {
                        self.stranded_inbox.check(&mut self.cx);
                    }
                    self.cx
                        .timers
                        .set(Timer::StrandCheck, now.at + STRAND_CHECK_INTERVAL);
                }
            }
            Timer::LeaseTtlRead => {
                if self.connected && !self.stopped && self.lease.state() == LeaseState::Idle {
                    self.acquire_lease(now);
                }
            }
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
        while let Some(t) = self.cx.timers.pop_expired(now.at) {
            self.on_timer(now, t);
        }
        self.after(now);
    }

    fn poll_command(&mut self) -> Option<Command> {
        self.cx.commands.pop_front()
    }

    fn poll_event(&mut self) -> Option<DeliveryEvent> {
        self.cx.events.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let lease = self.lease.poll_timeout().map(|(at, _)| at);
        let own = self.cx.timers.next().map(|(at, _)| at);
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
