//! The delivery lease of one shard as a sans-IO state machine (semantics §1.6, §1.7, §2(m), I30;
//! gaps G23, G36, G40).
//!
//! Shard `i` of a space has one lease, the key `lease.<i>` ([`Shard::lease_key`]) in the
//! `cotal_delivery_<space>` bucket ([`KvBucket::Delivery`](crate::wire::keys::KvBucket::Delivery)),
//! whose bucket-level `max_age` (the lease TTL, 30 s) removes an unrenewed holder's last write. A
//! [`Lease`] drives that key for one daemon: create-only acquisition, the ready flip after Plane-3
//! is bound, periodic CAS renewal, and a release that can never delete a successor's lease.
//!
//! # What it adds to the reference (`EP:acquire/markReady/renew/release`, `DMN:runDelivery`)
//!
//! - **Acquisition retries** (G23, second bullet): a create that finds the key taken does not
//!   end the run. The machine reads the current holder, reports [`LeaseEvent::Contended`] and
//!   retries with the shared backoff ([`crate::constants::backoff`]) for up to
//!   [`LeaseConfig::acquire_window`] (one TTL plus one backoff step, so a crashed holder's last
//!   write has expired before the last attempt), then reports [`LeaseEvent::AcquireFailed`].
//! - **A fencing token** (G23, first bullet): the revision returned by the acquiring create, as a
//!   [`FencingToken`]. [`Lease::fencing_token`] returns it only while the lease is held and our own
//!   clock says no successor can hold it yet: before `last confirmed write + TTL − safety margin`
//!   ([`Lease::deadline`]). A renew whose outcome is unknown does not extend that deadline; if it
//!   passes without confirmation the lease is reported [`LeaseEvent::Lost`].
//! - **Acquisition time kept apart from renewal time** (G23, third bullet): `since` is re-stamped
//!   on every write, as the reference does, and the acquisition time travels in the extra field
//!   [`ACQUIRED_AT_FIELD`] (`acquiredAt`), which older peers ignore.
//! - **Health that ages** (G40): [`judge_health`] also checks `since` against the TTL.
//! - **No TTL's wait for ourselves** (issue 19): a process whose lease was lost by its own clock
//!   (the broker unreachable past the deadline) starts over with a new machine that may write
//!   over its earlier hold's record, when nobody wrote the key since ([`Lease::reclaim`]). The
//!   reference would contend a whole TTL against its own last write.
//!
//! # Driving it
//!
//! 1. [`Lease::new`], then [`Lease::acquire`].
//! 2. After every input (`acquire`, [`Lease::handle_completion`], [`Lease::handle_timeout`],
//!    [`Lease::mark_ready`], [`Lease::release`]) drain [`Lease::poll_command`] (execute each
//!    command and answer it with `handle_completion` and the same [`OpId`]) and
//!    [`Lease::poll_event`], then sleep until [`Lease::poll_timeout`].
//! 3. Once [`LeaseEvent::Acquired`] arrives, bind Plane-3, then call [`Lease::mark_ready`] (I30:
//!    ready proves the responder is up).
//! 4. Before every fenced write, ask [`Lease::fencing_token`] with the current time; `None` means
//!    stop writing now.
//! 5. On shutdown call [`Lease::release`].
//!
//! Time comes in as [`Now`]: a monotonic [`Instant`] for every deadline, and the wall clock
//! ([`UnixMillis`]) only to stamp `since`/`acquiredAt`. Instants must not go backwards.
//!
//! The machine keeps **at most one command in flight** for its key: a ready flip, renewal or
//! release asked for while another command is outstanding waits for its completion.
//!
//! Files: this one holds the machine; `lease/config.rs` its timings, `lease/messages.rs` the
//! commands, replies, events and states it exchanges, `lease/record.rs` how a record is read.

use crate::constants::backoff;
use crate::op::{Failure, OpId, OpIds, Outcome, TimerTable};
use crate::registry::FencingToken;
use crate::time::{Duration, Instant, UnixMillis};
use crate::wire::message::Extra;
use crate::wire::records::DeliveryLease;
use crate::wire::shard::Shard;
use serde_json::Value;
use std::collections::VecDeque;

/// The most create attempts one acquisition makes (R18). With the default window and backoff
/// (1, 2, 4, 8, 16 s …) far fewer are reached; the cap only bounds odd configurations.
pub const MAX_ACQUIRE_ATTEMPTS: u32 = 32;

pub use crate::time::Now;

mod config;
mod messages;
mod record;

pub use config::{LeaseConfig, LeaseConfigError};
pub use messages::{
    AcquireFailure, LeaseCommand, LeaseEntry, LeaseEvent, LeaseReply, LeaseState, LeaseTimer,
    LeaseUsageError, LostReason, ReleaseSkipReason,
};
pub use record::{
    ACQUIRED_AT_FIELD, CONSUMERS_FIELD, DegradedReason, HEALTH_FIELD, LeaseHealth, ORPHANS_FIELD,
    acquired_at_of, judge_health,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum OpKind {
    Create {
        stamp: UnixMillis,
    },
    /// A compare-and-set write over our own earlier hold's record (see [`Lease::reclaim`]).
    Reclaim {
        stamp: UnixMillis,
        over: u64,
    },
    CreateRead,
    Update {
        ready: bool,
    },
    ConfirmRead,
    Delete {
        revision: u64,
    },
    ReleaseRead {
        revision: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct InFlight {
    op: OpId,
    sent: Instant,
    kind: OpKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Acquiring {
    deadline: Instant,
    attempts: u32,
    /// The `since`/`acquiredAt` stamps of our creates (≤ [`MAX_ACQUIRE_ATTEMPTS`]).
    stamps: Vec<(UnixMillis, Instant)>,
    last_holder: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    token: FencingToken,
    revision: u64,
    acquired_wall: UnixMillis,
    confirmed_at: Instant,
    ready: bool,
    needs_reread: bool,
    releasing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Acquiring(Acquiring),
    Held(Held),
    Lost,
    Released,
    NotAcquired,
}

/// The delivery lease of one shard, for one daemon. See the [module docs](self) for how to drive
/// it.
#[derive(Clone, Debug)]
pub struct Lease {
    key: String,
    shard: Shard,
    holder: String,
    config: LeaseConfig,
    ops: OpIds,
    phase: Phase,
    in_flight: Option<InFlight>,
    timers: TimerTable<LeaseTimer>,
    commands: VecDeque<LeaseCommand>,
    events: VecDeque<LeaseEvent>,
    ready_wanted: bool,
    release_wanted: bool,
    /// Extra fields written with every lease record (see [`Lease::annotate`]).
    annotations: Extra,
    /// The `acquiredAt` of an earlier hold of this key by this very process, whose record this
    /// machine may write over ([`Lease::reclaim`]).
    reclaimable: Option<UnixMillis>,
    /// The `acquiredAt` of the last hold this machine took (kept after a loss).
    last_acquired: Option<UnixMillis>,
}

impl Lease {
    /// A machine for `shard`'s lease, held under the daemon id `holder`. Nothing happens until
    /// [`Lease::acquire`].
    pub fn new(shard: Shard, holder: impl Into<String>, config: LeaseConfig) -> Self {
        Lease {
            key: shard.lease_key(),
            shard,
            holder: holder.into(),
            config,
            ops: OpIds::new(),
            phase: Phase::Idle,
            in_flight: None,
            timers: TimerTable::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            ready_wanted: false,
            release_wanted: false,
            annotations: Extra::new(),
            reclaimable: None,
            last_acquired: None,
        }
    }

    /// Sets an extra field written with every later lease record (the next renew, at most one
    /// renew interval away): how the daemon publishes its health ([`HEALTH_FIELD`]) where agents
    /// can read it. The record's own fields (`holder`, `since`, `ready`, [`ACQUIRED_AT_FIELD`])
    /// cannot be overridden.
    pub fn annotate(&mut self, key: &str, value: Value) {
        if matches!(key, "holder" | "since" | "ready" | ACQUIRED_AT_FIELD) {
            debug_assert!(false, "lease annotation {key} would shadow a record field");
            return;
        }
        self.annotations.insert(key.to_owned(), value);
    }

    /// The shard this lease is for.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The lease key, `lease.<i>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The daemon id written as `holder`.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The timing in use.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Replaces the timing while idle (before an acquisition): the daemon reads the lease
    /// bucket's TTL before each one ([`super::daemon::DeliveryConfig::lease_ttl_from_bucket`]).
    /// Refused once started: a holder's deadline must not move under it.
    pub fn retime(&mut self, config: LeaseConfig) -> Result<(), LeaseUsageError> {
        if self.phase != Phase::Idle {
            return Err(LeaseUsageError::AlreadyStarted);
        }
        self.config = if self.config.reference_gap_g23() {
            config.with_reference_gap_g23()
        } else {
            config
        };
        Ok(())
    }

    /// Lets the next acquisition write over the record of an earlier hold **by this same process**
    /// (a lease it lost by its own clock: a deadline passed while the broker was unreachable),
    /// instead of waiting up to a TTL for that record to expire. `acquired_at` is the earlier
    /// hold's `acquiredAt` ([`Lease::prior_hold`] of the machine that held it).
    ///
    /// A create that finds the key taken reads it. When the record's `holder` is ours and its
    /// `acquiredAt` is `acquired_at`, nobody has written the key since our last write: no
    /// successor can hold it, and the earlier hold stopped writing at its loss. The machine then
    /// writes a fresh record (`ready:false`, a new `acquiredAt`) with a compare-and-set on the
    /// revision it read, and takes the hold with that write's revision as the fencing token
    /// (greater than any earlier token of the key). Any other write in between fails the
    /// compare-and-set, and acquisition goes on as contended. A record under our daemon id that
    /// carries another `acquiredAt` (a second process started with the same id) is never written
    /// over.
    ///
    /// Only the host may vouch that `acquired_at` is its own: it must come from this process's
    /// own earlier [`Lease`] for this key. Refused once started.
    pub fn reclaim(&mut self, acquired_at: UnixMillis) -> Result<(), LeaseUsageError> {
        if self.phase != Phase::Idle {
            return Err(LeaseUsageError::AlreadyStarted);
        }
        self.reclaimable = Some(acquired_at);
        Ok(())
    }

    /// The `acquiredAt` of the last hold this machine took, kept after the hold is lost (or the
    /// one it was allowed to [`Lease::reclaim`], when it never held): what a successor machine in
    /// this process may reclaim.
    pub fn prior_hold(&self) -> Option<UnixMillis> {
        self.last_acquired.or(self.reclaimable)
    }

    /// Starts acquisition: a create-only write of `{holder, since, ready:false}`.
    pub fn acquire(&mut self, now: Now) -> Result<(), LeaseUsageError> {
        if self.phase != Phase::Idle {
            return Err(LeaseUsageError::AlreadyStarted);
        }
        self.phase = Phase::Acquiring(Acquiring {
            deadline: now.at + self.config.acquire_window(),
            attempts: 0,
            stamps: Vec::new(),
            last_holder: None,
        });
        self.send_create(now);
        Ok(())
    }

    /// Says Plane-3 is bound: flip the record to `ready:true` (I30). [`LeaseEvent::Ready`] follows
    /// once the write is confirmed. Idempotent while held.
    pub fn mark_ready(&mut self, now: Now) -> Result<(), LeaseUsageError> {
        match &self.phase {
            Phase::Held(h) if !h.releasing && !self.release_wanted => {
                if self.ready_wanted || h.ready {
                    self.ready_wanted = true;
                    return Ok(());
                }
                self.ready_wanted = true;
                if self.in_flight.is_none() && !h.needs_reread {
                    self.send_update(now);
                }
                Ok(())
            }
            _ => Err(LeaseUsageError::NotHeld),
        }
    }

    /// Releases the lease (shutdown). The fencing token is withdrawn at once; the key is deleted
    /// only if its revision is still our last confirmed one, so a successor's lease survives.
    /// In any other state this ends the machine with [`LeaseEvent::ReleaseSkipped`] or
    /// [`LeaseEvent::AcquireFailed`]; never an error.
    pub fn release(&mut self, now: Now) {
        match &mut self.phase {
            Phase::Idle => {
                self.phase = Phase::Released;
                self.events.push_back(LeaseEvent::ReleaseSkipped {
                    reason: ReleaseSkipReason::NotHeld,
                });
            }
            Phase::Acquiring(_) => {
                self.timers.cancel(&LeaseTimer::AcquireRetry);
                if self.in_flight.is_some() {
                    // The create (or its read) may still make us the holder: decide on completion.
                    self.release_wanted = true;
                } else {
                    self.phase = Phase::NotAcquired;
                    self.events.push_back(LeaseEvent::AcquireFailed {
                        reason: AcquireFailure::Cancelled,
                    });
                }
            }
            Phase::Held(h) => {
                if h.releasing {
                    return;
                }
                h.releasing = true;
                self.release_wanted = false;
                self.timers.cancel(&LeaseTimer::Renew);
                if self.in_flight.is_none() {
                    self.send_delete(now);
                }
            }
            Phase::Lost | Phase::Released | Phase::NotAcquired => {
                self.events.push_back(LeaseEvent::ReleaseSkipped {
                    reason: ReleaseSkipReason::NotHeld,
                });
            }
        }
    }

    /// The machine's state.
    pub fn state(&self) -> LeaseState {
        match &self.phase {
            Phase::Idle => LeaseState::Idle,
            Phase::Acquiring(_) => LeaseState::Acquiring,
            Phase::Held(h) if h.releasing => LeaseState::Releasing,
            Phase::Held(h) if h.ready => LeaseState::Ready,
            Phase::Held(_) => LeaseState::Held,
            Phase::Lost => LeaseState::Lost,
            Phase::Released => LeaseState::Released,
            Phase::NotAcquired => LeaseState::NotAcquired,
        }
    }

    /// The fencing token (the acquiring create's revision), only while the lease is held, not
    /// being released, and `now` is before [`Lease::deadline`]. `None` means: stop writing.
    pub fn fencing_token(&self, now: Instant) -> Option<FencingToken> {
        match &self.phase {
            Phase::Held(h) if !h.releasing && now < self.config.deadline_after(h.confirmed_at) => {
                Some(h.token)
            }
            _ => None,
        }
    }

    /// Our own deadline while held: `send time of the last confirmed write + TTL − margin`.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Held(h) => Some(self.config.deadline_after(h.confirmed_at)),
            _ => None,
        }
    }

    /// Our last confirmed revision of the key while held.
    pub fn revision(&self) -> Option<u64> {
        match &self.phase {
            Phase::Held(h) => Some(h.revision),
            _ => None,
        }
    }

    /// The acquisition wall time while held (what [`ACQUIRED_AT_FIELD`] carries).
    pub fn acquired_at(&self) -> Option<UnixMillis> {
        match &self.phase {
            Phase::Held(h) => Some(h.acquired_wall),
            _ => None,
        }
    }

    /// True when a command is in flight (issued and not yet completed).
    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The next command to execute.
    pub fn poll_command(&mut self) -> Option<LeaseCommand> {
        self.commands.pop_front()
    }

    /// The next event for the daemon.
    pub fn poll_event(&mut self) -> Option<LeaseEvent> {
        self.events.pop_front()
    }

    /// The earliest deadline and why. After `handle_timeout(t)` this is `None` or later than `t`
    /// (R13).
    pub fn poll_timeout(&self) -> Option<(Instant, LeaseTimer)> {
        self.timers.next().map(|(at, k)| (at, *k))
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        // Our deadline goes first: no renewal is sent for a lease we no longer trust.
        if self
            .timers
            .get(&LeaseTimer::Deadline)
            .is_some_and(|d| d <= now.at)
        {
            self.timers.cancel(&LeaseTimer::Deadline);
            self.fire_deadline(now);
        }
        while let Some(timer) = self.timers.pop_expired(now.at) {
            match timer {
                LeaseTimer::AcquireRetry => {
                    if matches!(self.phase, Phase::Acquiring(_)) && self.in_flight.is_none() {
                        self.send_create(now);
                    }
                }
                LeaseTimer::Renew => {
                    if let Phase::Held(h) = &self.phase
                        && !h.releasing
                        && self.in_flight.is_none()
                    {
                        if h.needs_reread {
                            self.send_get(now, OpKind::ConfirmRead);
                        } else {
                            self.send_update(now);
                        }
                    }
                }
                LeaseTimer::Deadline => self.fire_deadline(now),
            }
        }
    }

    fn fire_deadline(&mut self, now: Now) {
        if let Phase::Held(h) = &self.phase
            && now.at >= self.config.deadline_after(h.confirmed_at)
        {
            if h.releasing {
                // The release could not be confirmed in time; our write expires by itself.
                self.finish_release(ReleaseSkipReason::Unconfirmed);
            } else {
                self.lose(LostReason::DeadlinePassed);
            }
        }
    }

    /// Takes the outcome of the command `op`.
    pub fn handle_completion(
        &mut self,
        now: Now,
        op: OpId,
        outcome: Outcome<LeaseReply>,
    ) -> Result<(), LeaseUsageError> {
        let Some(flight) = self.in_flight.as_ref().filter(|f| f.op == op) else {
            return Err(LeaseUsageError::UnknownOp(op));
        };
        let fits = match (&flight.kind, &outcome) {
            (
                OpKind::Create { .. } | OpKind::Reclaim { .. } | OpKind::Update { .. },
                Outcome::Success(r),
            ) => {
                matches!(r, LeaseReply::Written { .. })
            }
            (OpKind::Delete { .. }, Outcome::Success(r)) => matches!(r, LeaseReply::Deleted),
            (
                OpKind::CreateRead | OpKind::ConfirmRead | OpKind::ReleaseRead { .. },
                Outcome::Success(r),
            ) => matches!(r, LeaseReply::Entry(_)),
            _ => true,
        };
        if !fits {
            return Err(LeaseUsageError::ReplyMismatch(op));
        }
        let Some(flight) = self.in_flight.take() else {
            return Err(LeaseUsageError::UnknownOp(op));
        };
        match flight.kind {
            OpKind::Create { stamp } => self.on_create(now, flight.sent, stamp, outcome),
            OpKind::Reclaim { stamp, over } => {
                self.on_reclaim(now, flight.sent, stamp, over, outcome);
            }
            OpKind::CreateRead => self.on_create_read(now, outcome),
            OpKind::Update { ready } => self.on_update(now, flight.sent, ready, outcome),
            OpKind::ConfirmRead => self.on_confirm_read(now, outcome),
            OpKind::Delete { revision } => self.on_delete(now, revision, outcome),
            OpKind::ReleaseRead { revision } => self.on_release_read(now, revision, outcome),
        }
        Ok(())
    }

    // ---- acquisition ----

    fn on_create(&mut self, now: Now, sent: Instant, stamp: UnixMillis, o: Outcome<LeaseReply>) {
        if !matches!(self.phase, Phase::Acquiring(_)) {
            return;
        }
        match o {
            Outcome::Success(LeaseReply::Written { revision }) => {
                self.take_hold(now, revision, stamp, sent);
            }
            Outcome::Success(_) => {}
            Outcome::Failed(Failure::AlreadyExists) | Outcome::Unknown => {
                // Learn the holder; after an unknown outcome the holder may be us.
                self.send_get(now, OpKind::CreateRead);
            }
            Outcome::Failed(f) if f.is_transient() || f == Failure::NotFound => {
                self.retry_acquire(now);
            }
            Outcome::Failed(f) => self.give_up(AcquireFailure::Refused(f)),
        }
    }

    fn on_create_read(&mut self, now: Now, o: Outcome<LeaseReply>) {
        let Phase::Acquiring(a) = &mut self.phase else {
            return;
        };
        match o {
            Outcome::Success(LeaseReply::Entry(Some(entry))) => {
                let record = entry.record;
                let holder = record.as_ref().map(|r| r.holder.clone());
                let ours = record.as_ref().and_then(|r| {
                    if r.holder != self.holder {
                        return None;
                    }
                    let acquired = acquired_at_of(r);
                    a.stamps.iter().find(|(s, _)| *s == acquired).copied()
                });
                let reclaimable = record.as_ref().is_some_and(|r| {
                    r.holder == self.holder && Some(acquired_at_of(r)) == self.reclaimable
                });
                if let Some((stamp, sent)) = ours {
                    // One of our creates landed after all: adopt its revision.
                    self.take_hold(now, entry.revision, stamp, sent);
                } else if reclaimable {
                    // Our own earlier hold's record, untouched since: write over it.
                    self.send_reclaim(now, entry.revision);
                } else {
                    a.last_holder.clone_from(&holder);
                    self.events.push_back(LeaseEvent::Contended { holder });
                    self.retry_acquire(now);
                }
            }
            Outcome::Success(_) => {
                // Absent (expired meanwhile, or our create never landed): try again.
                self.retry_acquire(now);
            }
            Outcome::Failed(_) | Outcome::Unknown => self.retry_acquire(now),
        }
    }

    fn on_reclaim(
        &mut self,
        now: Now,
        sent: Instant,
        stamp: UnixMillis,
        over: u64,
        o: Outcome<LeaseReply>,
    ) {
        if !matches!(self.phase, Phase::Acquiring(_)) {
            return;
        }
        match o {
            Outcome::Success(LeaseReply::Written { revision }) => {
                self.events.push_back(LeaseEvent::Reclaimed {
                    over_revision: over,
                });
                self.take_hold(now, revision, stamp, sent);
            }
            Outcome::Success(_) => {}
            Outcome::Unknown => {
                // It may have landed: the read adopts it by its stamp.
                self.send_get(now, OpKind::CreateRead);
            }
            Outcome::Failed(f) if f.is_transient() => self.retry_acquire(now),
            Outcome::Failed(Failure::WrongLastRevision { .. } | Failure::NotFound) => {
                // Someone wrote (or the record expired) in between: contend as usual.
                self.retry_acquire(now);
            }
            Outcome::Failed(f) => self.give_up(AcquireFailure::Refused(f)),
        }
    }

    fn retry_acquire(&mut self, now: Now) {
        let Phase::Acquiring(a) = &self.phase else {
            return;
        };
        if self.release_wanted {
            self.release_wanted = false;
            self.give_up(AcquireFailure::Cancelled);
            return;
        }
        if now.at >= a.deadline {
            let holder = a.last_holder.clone();
            self.give_up(AcquireFailure::Contended { holder });
            return;
        }
        if a.attempts >= MAX_ACQUIRE_ATTEMPTS {
            self.give_up(AcquireFailure::AttemptsExhausted);
            return;
        }
        let wait = backoff(a.attempts.saturating_sub(1));
        let at = (now.at + wait).min(a.deadline);
        self.timers.set(LeaseTimer::AcquireRetry, at);
    }

    fn give_up(&mut self, reason: AcquireFailure) {
        self.timers.cancel(&LeaseTimer::AcquireRetry);
        self.phase = Phase::NotAcquired;
        self.events.push_back(LeaseEvent::AcquireFailed { reason });
    }

    fn take_hold(&mut self, now: Now, revision: u64, stamp: UnixMillis, sent: Instant) {
        self.timers.cancel(&LeaseTimer::AcquireRetry);
        self.last_acquired = Some(stamp);
        let token = FencingToken(revision);
        self.phase = Phase::Held(Held {
            token,
            revision,
            acquired_wall: stamp,
            confirmed_at: sent,
            ready: false,
            needs_reread: false,
            releasing: false,
        });
        self.events.push_back(LeaseEvent::Acquired { token });
        // Runs a release asked during acquisition, or schedules the renewal.
        self.after_confirmed(now);
    }

    // ---- renewal and the ready flip ----

    fn on_update(&mut self, now: Now, sent: Instant, ready: bool, o: Outcome<LeaseReply>) {
        let Phase::Held(h) = &mut self.phase else {
            return;
        };
        match o {
            Outcome::Success(LeaseReply::Written { revision }) => {
                h.revision = revision;
                if sent > h.confirmed_at {
                    h.confirmed_at = sent;
                }
                let flipped = ready && !h.ready;
                h.ready |= ready;
                self.events.push_back(LeaseEvent::Renewed { revision });
                if flipped {
                    self.events.push_back(LeaseEvent::Ready);
                }
                self.after_confirmed(now);
            }
            Outcome::Success(_) => {}
            Outcome::Failed(Failure::WrongLastRevision { .. }) => {
                self.lose(LostReason::Superseded);
            }
            Outcome::Failed(Failure::NotFound) => self.lose(LostReason::Expired),
            Outcome::Failed(f) if f.is_transient() => self.after_unconfirmed(now, false),
            Outcome::Failed(f) => self.lose(LostReason::Refused(f)),
            Outcome::Unknown => {
                // It may have landed: re-read before the next write (R10).
                h.needs_reread = true;
                self.send_get(now, OpKind::ConfirmRead);
            }
        }
    }

    fn on_confirm_read(&mut self, now: Now, o: Outcome<LeaseReply>) {
        let Phase::Held(h) = &mut self.phase else {
            return;
        };
        match o {
            Outcome::Success(LeaseReply::Entry(Some(entry))) => {
                let ours = entry.record.as_ref().is_some_and(|r| {
                    r.holder == self.holder && acquired_at_of(r) == h.acquired_wall
                });
                if !ours {
                    let holder = entry.record.map(|r| r.holder);
                    self.lose(LostReason::TakenOver { holder });
                    return;
                }
                h.needs_reread = false;
                if entry.revision != h.revision {
                    // Our unknown write landed. Its send time is unknown here, so the deadline
                    // stays on the last write we saw confirmed (conservative).
                    h.revision = entry.revision;
                    let flipped = entry.record.as_ref().is_some_and(|r| r.ready) && !h.ready;
                    h.ready |= flipped;
                    self.events.push_back(LeaseEvent::Renewed {
                        revision: entry.revision,
                    });
                    if flipped {
                        self.events.push_back(LeaseEvent::Ready);
                    }
                }
                // Renew right away: only a confirmed write moves the deadline.
                self.after_unconfirmed(now, true);
            }
            Outcome::Success(_) => self.lose(LostReason::TakenOver { holder: None }),
            Outcome::Failed(_) | Outcome::Unknown => self.after_unconfirmed(now, false),
        }
    }

    /// After a confirmed write: schedule the renewal and the deadline, then run what waited.
    fn after_confirmed(&mut self, now: Now) {
        let Phase::Held(h) = &self.phase else {
            return;
        };
        let deadline = self.config.deadline_after(h.confirmed_at);
        self.timers.set(LeaseTimer::Deadline, deadline);
        if now.at >= deadline {
            self.lose(LostReason::DeadlinePassed);
            return;
        }
        if self.release_wanted || h.releasing {
            self.release_wanted = false;
            if let Phase::Held(h) = &mut self.phase {
                h.releasing = true;
            }
            self.timers.cancel(&LeaseTimer::Renew);
            self.send_delete(now);
        } else if self.ready_wanted && !h.ready {
            self.timers.cancel(&LeaseTimer::Renew);
            self.send_update(now);
        } else {
            let renew_at = h.confirmed_at + self.config.renew_interval();
            self.timers.set(
                LeaseTimer::Renew,
                renew_at.max(now.at + Duration::from_millis(1)),
            );
        }
    }

    /// After a write that did not land (or whose fate is being read): retry soon, keep the
    /// deadline where it is.
    fn after_unconfirmed(&mut self, now: Now, immediately: bool) {
        let Phase::Held(h) = &self.phase else {
            return;
        };
        if now.at >= self.config.deadline_after(h.confirmed_at) {
            self.lose(LostReason::DeadlinePassed);
            return;
        }
        if h.releasing || self.release_wanted {
            self.release_wanted = false;
            if h.needs_reread {
                // We cannot name our revision; let the TTL remove our write.
                self.finish_release(ReleaseSkipReason::Unconfirmed);
            } else {
                if let Phase::Held(h) = &mut self.phase {
                    h.releasing = true;
                }
                self.send_delete(now);
            }
            return;
        }
        if immediately && !h.needs_reread {
            self.send_update(now);
        } else {
            self.timers
                .set(LeaseTimer::Renew, now.at + self.config.retry_step());
        }
    }

    fn lose(&mut self, reason: LostReason) {
        self.timers.cancel(&LeaseTimer::Renew);
        self.timers.cancel(&LeaseTimer::Deadline);
        self.phase = Phase::Lost;
        self.events.push_back(LeaseEvent::Lost { reason });
        if self.release_wanted {
            self.release_wanted = false;
            self.events.push_back(LeaseEvent::ReleaseSkipped {
                reason: ReleaseSkipReason::NotHeld,
            });
        }
    }

    // ---- release ----

    fn on_delete(&mut self, now: Now, revision: u64, o: Outcome<LeaseReply>) {
        if !matches!(self.phase, Phase::Held(_)) {
            return; // already ended by the deadline
        }
        match o {
            Outcome::Success(_) => {
                self.timers.cancel(&LeaseTimer::Deadline);
                self.phase = Phase::Released;
                self.events.push_back(LeaseEvent::Released);
            }
            Outcome::Failed(Failure::WrongLastRevision { .. } | Failure::NotFound) => {
                self.finish_release(ReleaseSkipReason::Superseded);
            }
            Outcome::Failed(_) => self.finish_release(ReleaseSkipReason::Unconfirmed),
            Outcome::Unknown => self.send_get(now, OpKind::ReleaseRead { revision }),
        }
    }

    fn on_release_read(&mut self, now: Now, revision: u64, o: Outcome<LeaseReply>) {
        if !matches!(self.phase, Phase::Held(_)) {
            return; // already ended by the deadline
        }
        match o {
            Outcome::Success(LeaseReply::Entry(None)) => {
                self.timers.cancel(&LeaseTimer::Deadline);
                self.phase = Phase::Released;
                self.events.push_back(LeaseEvent::Released);
            }
            Outcome::Success(LeaseReply::Entry(Some(e))) if e.revision == revision => {
                // The delete did not land and the key is still ours: try once more, within our
                // deadline (the deadline timer ends this loop).
                match &self.phase {
                    Phase::Held(h) if now.at < self.config.deadline_after(h.confirmed_at) => {
                        self.send_delete(now);
                    }
                    _ => self.finish_release(ReleaseSkipReason::Unconfirmed),
                }
            }
            Outcome::Success(_) => self.finish_release(ReleaseSkipReason::Superseded),
            Outcome::Failed(_) | Outcome::Unknown => {
                self.finish_release(ReleaseSkipReason::Unconfirmed);
            }
        }
    }

    fn finish_release(&mut self, reason: ReleaseSkipReason) {
        self.timers.cancel(&LeaseTimer::Renew);
        self.timers.cancel(&LeaseTimer::Deadline);
        self.phase = Phase::Released;
        self.events.push_back(LeaseEvent::ReleaseSkipped { reason });
    }

    // ---- command emission ----

    fn issue(&mut self, now: Now, kind: OpKind, make: impl FnOnce(OpId, String) -> LeaseCommand) {
        let op = self.ops.next_id();
        self.in_flight = Some(InFlight {
            op,
            sent: now.at,
            kind,
        });
        self.commands.push_back(make(op, self.key.clone()));
    }

    fn send_create(&mut self, now: Now) {
        let Phase::Acquiring(a) = &mut self.phase else {
            return;
        };
        a.attempts = a.attempts.saturating_add(1);
        a.stamps.push((now.wall, now.at));
        let value = self.record(now.wall, now.wall, false);
        self.issue(now, OpKind::Create { stamp: now.wall }, |op, key| {
            LeaseCommand::Create { op, key, value }
        });
    }

    fn send_reclaim(&mut self, now: Now, over: u64) {
        let Phase::Acquiring(a) = &mut self.phase else {
            return;
        };
        a.attempts = a.attempts.saturating_add(1);
        a.stamps.push((now.wall, now.at));
        let value = self.record(now.wall, now.wall, false);
        self.issue(
            now,
            OpKind::Reclaim {
                stamp: now.wall,
                over,
            },
            |op, key| LeaseCommand::Update {
                op,
                key,
                value,
                expected_revision: over,
            },
        );
    }

    fn send_update(&mut self, now: Now) {
        let Phase::Held(h) = &self.phase else {
            return;
        };
        let ready = self.ready_wanted || h.ready;
        let expected_revision = h.revision;
        let value = self.record(now.wall, h.acquired_wall, ready);
        self.timers.cancel(&LeaseTimer::Renew);
        self.issue(now, OpKind::Update { ready }, |op, key| {
            LeaseCommand::Update {
                op,
                key,
                value,
                expected_revision,
            }
        });
    }

    fn send_delete(&mut self, now: Now) {
        let Phase::Held(h) = &self.phase else {
            return;
        };
        let expected_revision = h.revision;
        self.issue(
            now,
            OpKind::Delete {
                revision: expected_revision,
            },
            |op, key| LeaseCommand::Delete {
                op,
                key,
                expected_revision,
            },
        );
    }

    fn send_get(&mut self, now: Now, kind: OpKind) {
        self.issue(now, kind, |op, key| LeaseCommand::Get { op, key });
    }

    fn record(&self, since: UnixMillis, acquired: UnixMillis, ready: bool) -> DeliveryLease {
        let mut extra = self.annotations.clone();
        extra.insert(ACQUIRED_AT_FIELD.to_owned(), Value::from(acquired.0));
        DeliveryLease {
            holder: self.holder.clone(),
            since,
            ready,
            extra,
        }
    }
}

#[cfg(test)]
mod tests;
