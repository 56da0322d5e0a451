//! The delivery lease of one shard as a sans-IO state machine (semantics §1.6, §1.7, §2(m), I30;
//! gaps G23, G36, G40).
//!
//! Shard `i` of a space has one lease, the key `lease.<i>` ([`Shard::lease_key`]) in the
//! `cotal_delivery_<space>` bucket ([`KvBucket::Delivery`]), whose bucket-level `max_age` (the
//! lease TTL, 30 s) removes an unrenewed holder's last write. A [`Lease`] drives that key for one
//! daemon: create-only acquisition, the ready flip after Plane-3 is bound, periodic CAS renewal,
//! and a release that can never delete a successor's lease.
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

use crate::constants::{BACKOFF_BASE, LEASE_TTL, backoff, lease_renew_interval};
use crate::op::{Failure, OpId, OpIds, Outcome, TimerTable};
use crate::registry::FencingToken;
use crate::time::{Duration, Instant, UnixMillis};
use crate::wire::keys::KvBucket;
use crate::wire::message::Extra;
use crate::wire::records::DeliveryLease;
use crate::wire::shard::Shard;
use serde_json::Value;
use std::collections::VecDeque;
use std::fmt;

/// The extra record field carrying the acquisition time (wall-clock ms), written on every write
/// of this crate. The reference ignores unknown fields and preserves nothing, so it is harmless.
pub const ACQUIRED_AT_FIELD: &str = "acquiredAt";

/// The extra record field carrying the holder's delivery health (`{"state":"active"}` or
/// `{"state":"degraded","reasons":[…]}`), written by this crate's daemon with every renew so that
/// agents, who may read the lease key, can see it ([`judge_health`]). The reference ignores it.
pub const HEALTH_FIELD: &str = "health";

/// The extra record field carrying the holder's orphaned memberships (`{retentionMs, reap, count,
/// memberships:[{owner, channel, generation, offlineMs}]}`), for `cotal members --orphans`
/// (issue 15 item 7). The reference ignores it.
pub const ORPHANS_FIELD: &str = "orphans";

/// The most create attempts one acquisition makes (R18). With the default window and backoff
/// (1, 2, 4, 8, 16 s …) far fewer are reached; the cap only bounds odd configurations.
pub const MAX_ACQUIRE_ATTEMPTS: u32 = 32;

pub use crate::time::Now;

/// Why a [`LeaseConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseConfigError {
    /// The TTL is zero.
    ZeroTtl,
    /// The renew interval is zero.
    ZeroRenewInterval,
    /// `renew_interval + safety_margin` must stay below the TTL, or a healthy holder would lose
    /// its own fencing token before its first renewal.
    NoRoomToRenew {
        /// The TTL.
        ttl: Duration,
        /// The renew interval.
        renew_interval: Duration,
        /// The safety margin.
        safety_margin: Duration,
    },
}

impl fmt::Display for LeaseConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseConfigError::ZeroTtl => write!(f, "the lease TTL must be positive"),
            LeaseConfigError::ZeroRenewInterval => {
                write!(f, "the lease renew interval must be positive")
            }
            LeaseConfigError::NoRoomToRenew {
                ttl,
                renew_interval,
                safety_margin,
            } => write!(
                f,
                "renew interval {renew_interval} + safety margin {safety_margin} must be below the TTL {ttl}"
            ),
        }
    }
}

impl std::error::Error for LeaseConfigError {}

/// Timing of a [`Lease`].
///
/// The **safety margin** is how long before the broker could expire our last write we stop
/// trusting the lease. The broker measures the TTL from when it *stored* the write, which is no
/// earlier than when we *sent* it, so `sent + TTL` is already a lower bound of the expiry; the
/// margin covers what remains: the rate difference between our clock and the broker's over one
/// TTL, and the time a write fenced just before the deadline takes to reach the registry. The
/// default is `TTL / 6` (5 s for the 30 s TTL), leaving 10 s of one-second renew retries between
/// the renew interval (15 s) and the deadline (25 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    ttl: Duration,
    renew_interval: Duration,
    safety_margin: Duration,
    acquire_window: Duration,
    retry_step: Duration,
    reference_gap_g23: bool,
}

impl Default for LeaseConfig {
    /// The reference's timing: [`LEASE_TTL`] (30 s), renew every 15 s, 5 s margin, 31 s window.
    fn default() -> Self {
        LeaseConfig {
            ttl: LEASE_TTL,
            renew_interval: lease_renew_interval(LEASE_TTL),
            safety_margin: Duration::from_millis(LEASE_TTL.as_millis() / 6),
            acquire_window: LEASE_TTL + BACKOFF_BASE,
            retry_step: BACKOFF_BASE,
            reference_gap_g23: false,
        }
    }
}

impl LeaseConfig {
    /// The timing for a bucket whose TTL is `ttl`: renew at `max(1 s, ttl / 2)` (`DMN`), margin
    /// `ttl / 6`, acquisition window `ttl + 1 s`, renew retries every second.
    pub fn for_ttl(ttl: Duration) -> Result<Self, LeaseConfigError> {
        LeaseConfig::new(
            ttl,
            lease_renew_interval(ttl),
            Duration::from_millis(ttl.as_millis() / 6),
            ttl + BACKOFF_BASE,
        )
    }

    /// A timing with every value given; refused when a healthy holder could not renew before
    /// its own deadline.
    pub fn new(
        ttl: Duration,
        renew_interval: Duration,
        safety_margin: Duration,
        acquire_window: Duration,
    ) -> Result<Self, LeaseConfigError> {
        if ttl == Duration::ZERO {
            return Err(LeaseConfigError::ZeroTtl);
        }
        if renew_interval == Duration::ZERO {
            return Err(LeaseConfigError::ZeroRenewInterval);
        }
        if (renew_interval + safety_margin) >= ttl {
            return Err(LeaseConfigError::NoRoomToRenew {
                ttl,
                renew_interval,
                safety_margin,
            });
        }
        Ok(LeaseConfig {
            ttl,
            renew_interval,
            safety_margin,
            acquire_window,
            retry_step: BACKOFF_BASE.min(renew_interval),
            reference_gap_g23: false,
        })
    }

    /// The bucket TTL: an unrenewed write disappears this long after it was stored.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Time between renewals, counted from the send time of the last confirmed write.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval
    }

    /// How long before `last confirmed write + TTL` the fencing token is withdrawn.
    pub fn safety_margin(&self) -> Duration {
        self.safety_margin
    }

    /// How long acquisition keeps retrying a contended create before it gives up.
    pub fn acquire_window(&self) -> Duration {
        self.acquire_window
    }

    /// Delay before retrying a renewal or a re-read that failed transiently.
    pub fn retry_step(&self) -> Duration {
        self.retry_step
    }

    /// Test-only: the same timing with gap G23 restored, as the reference runs its lease: no
    /// deadline of our own, so the fencing token is never withdrawn by time and the lease is lost
    /// only when a renew CAS fails. The simulator uses it to prove its oracle sees a deposed
    /// daemon's writes. Never used outside tests.
    #[doc(hidden)]
    pub fn with_reference_gap_g23(self) -> Self {
        LeaseConfig {
            reference_gap_g23: true,
            ..self
        }
    }

    fn deadline_after(&self, confirmed: Instant) -> Instant {
        if self.reference_gap_g23 {
            // No deadline: far past any run (about 31 years).
            return confirmed + Duration::from_secs(1_000_000_000);
        }
        confirmed + Duration::from_millis(self.ttl.as_millis() - self.safety_margin.as_millis())
    }
}

/// One KV effect on the lease key. Every command carries an [`OpId`] to answer with
/// [`Lease::handle_completion`]; all of them target [`KvBucket::Delivery`] ([`LeaseCommand::bucket`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseCommand {
    /// Create-only put (`kv.create`); answer [`LeaseReply::Written`] or
    /// [`Failure::AlreadyExists`]. A create over a DEL/PURGE marker succeeds.
    Create {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
        /// The record to write (`ready:false`).
        value: DeliveryLease,
    },
    /// Compare-and-set put (`kv.update`); answer [`LeaseReply::Written`] or
    /// [`Failure::WrongLastRevision`] / [`Failure::NotFound`].
    Update {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
        /// The record to write.
        value: DeliveryLease,
        /// The revision the key must still have.
        expected_revision: u64,
    },
    /// Compare-and-set delete (`kv.delete` with `previousSeq`); answer [`LeaseReply::Deleted`]
    /// or [`Failure::WrongLastRevision`] / [`Failure::NotFound`].
    Delete {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
        /// The revision the key must still have: always our last confirmed revision.
        expected_revision: u64,
    },
    /// Read the key (`kv.get`); answer [`LeaseReply::Entry`].
    Get {
        /// The operation id.
        op: OpId,
        /// `lease.<i>`.
        key: String,
    },
}

impl LeaseCommand {
    /// The command's operation id.
    pub fn op(&self) -> OpId {
        match self {
            LeaseCommand::Create { op, .. }
            | LeaseCommand::Update { op, .. }
            | LeaseCommand::Delete { op, .. }
            | LeaseCommand::Get { op, .. } => *op,
        }
    }

    /// The key the command touches.
    pub fn key(&self) -> &str {
        match self {
            LeaseCommand::Create { key, .. }
            | LeaseCommand::Update { key, .. }
            | LeaseCommand::Delete { key, .. }
            | LeaseCommand::Get { key, .. } => key,
        }
    }

    /// The bucket every lease command targets: `cotal_delivery_<space>`.
    pub const fn bucket(&self) -> KvBucket {
        KvBucket::Delivery
    }
}

/// A lease record as read, with its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    /// The key's revision (the stream sequence of the stored write).
    pub revision: u64,
    /// The decoded record; `None` when the bytes did not decode ([`DeliveryLease::from_kv`]).
    pub record: Option<DeliveryLease>,
}

/// The result of a successful lease command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseReply {
    /// A create or update was stored at this revision.
    Written {
        /// The new revision.
        revision: u64,
    },
    /// The delete was stored.
    Deleted,
    /// The read's result: `None` for an absent key or a DEL/PURGE marker.
    Entry(Option<LeaseEntry>),
}

/// Driver misuse (R17a); the machine's state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseUsageError {
    /// The completion names no command in flight.
    UnknownOp(OpId),
    /// The reply does not fit the command (e.g. `Deleted` for a create).
    ReplyMismatch(OpId),
    /// `acquire` on a machine that already started.
    AlreadyStarted,
    /// `mark_ready` while the lease is not held.
    NotHeld,
}

impl fmt::Display for LeaseUsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseUsageError::UnknownOp(op) => write!(f, "no lease command {op} is in flight"),
            LeaseUsageError::ReplyMismatch(op) => {
                write!(f, "the reply to {op} does not fit its command")
            }
            LeaseUsageError::AlreadyStarted => write!(f, "the lease machine already started"),
            LeaseUsageError::NotHeld => write!(f, "the lease is not held"),
        }
    }
}

impl std::error::Error for LeaseUsageError {}

/// Why the lease is no longer ours.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// A CAS found another revision: someone else wrote the key.
    Superseded,
    /// The key is gone (expired or deleted).
    Expired,
    /// A read shows another holder, another acquisition, or nothing.
    TakenOver {
        /// The holder read, if any.
        holder: Option<String>,
    },
    /// No write was confirmed before our own deadline (`last confirmed write + TTL − margin`).
    DeadlinePassed,
    /// The broker refused our write outright (permissions, a rejection).
    Refused(Failure),
}

/// Why acquisition ended without the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcquireFailure {
    /// The key was held for the whole acquisition window.
    Contended {
        /// The last holder read, if any read succeeded.
        holder: Option<String>,
    },
    /// The broker refused the create outright (permissions, a rejection).
    Refused(Failure),
    /// [`MAX_ACQUIRE_ATTEMPTS`] creates were made.
    AttemptsExhausted,
    /// [`Lease::release`] was asked before the lease was acquired.
    Cancelled,
}

/// Why a release did not delete the key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseSkipReason {
    /// We held nothing to release (never acquired, already lost or released).
    NotHeld,
    /// The key has another revision: a successor's lease, which is left alone.
    Superseded,
    /// The delete failed, or its outcome and the re-read both failed; the TTL removes our write.
    Unconfirmed,
}

/// A fact for the daemon. Every state change emits one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// The create landed: the lease is ours, not yet ready. Bind Plane-3, then `mark_ready`.
    Acquired {
        /// The create's revision: the fencing token for registry writes.
        token: FencingToken,
    },
    /// The lease reads `ready:true` (the ready flip, or a renewal that carried it, landed).
    Ready,
    /// A renewal landed.
    Renewed {
        /// The new revision.
        revision: u64,
    },
    /// The key is held by someone else; acquisition retries.
    Contended {
        /// The holder read (`None` when the read found nothing or failed).
        holder: Option<String>,
    },
    /// Acquisition gave up.
    AcquireFailed {
        /// Why.
        reason: AcquireFailure,
    },
    /// The lease is no longer ours: stop every fenced write at once.
    Lost {
        /// Why.
        reason: LostReason,
    },
    /// Our lease was deleted.
    Released,
    /// A release did not delete the key.
    ReleaseSkipped {
        /// Why.
        reason: ReleaseSkipReason,
    },
}

/// Where the machine is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseState {
    /// Created; [`Lease::acquire`] not called yet.
    Idle,
    /// Creating, reading the holder, or waiting to retry.
    Acquiring,
    /// Ours, `ready:false`.
    Held,
    /// Ours, `ready:true`.
    Ready,
    /// A release was asked; the delete is pending or in flight.
    Releasing,
    /// Terminal: lost (see [`LeaseEvent::Lost`]).
    Lost,
    /// Terminal: released (deleted or skipped).
    Released,
    /// Terminal: acquisition gave up.
    NotAcquired,
}

/// Why the machine wants to wake up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum LeaseTimer {
    /// Retry a contended or failed create.
    AcquireRetry,
    /// Renew (or re-read after an unknown renewal).
    Renew,
    /// Our own deadline: the fencing token is withdrawn here unless a write is confirmed.
    Deadline,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum OpKind {
    Create { stamp: UnixMillis },
    CreateRead,
    Update { ready: bool },
    ConfirmRead,
    Delete { revision: u64 },
    ReleaseRead { revision: u64 },
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

/// The delivery lease of one shard, for one daemon. See the [module docs](self) for how to drive it.
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

    /// Starts acquisition: a create-only write of `{holder, since, ready:false}`.
    pub fn acquire(&mut self, now: Now) -> Result<(), LeaseUsageError> {
        if self.phase != Phase::Idle {
            return Err(LeaseUsageError::AlreadyStarted);
        }
        self.phase = Phase::Acquiring(Acquiring {
            deadline: now.at + self.config.acquire_window,
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
            (OpKind::Create { .. } | OpKind::Update { .. }, Outcome::Success(r)) => {
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
                if let Some((stamp, sent)) = ours {
                    // One of our creates landed after all: adopt its revision.
                    self.take_hold(now, entry.revision, stamp, sent);
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
            let renew_at = h.confirmed_at + self.config.renew_interval;
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
                .set(LeaseTimer::Renew, now.at + self.config.retry_step);
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

/// The acquisition time of a record: [`ACQUIRED_AT_FIELD`] when present and a whole number,
/// else `since` (a record written by the reference, whose `since` is its last write).
pub fn acquired_at_of(record: &DeliveryLease) -> UnixMillis {
    record
        .extra
        .get(ACQUIRED_AT_FIELD)
        .and_then(Value::as_u64)
        .map_or(record.since, UnixMillis)
}

/// How an observer judges a shard's delivery (G40, scenario D10).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseHealth {
    /// A holder is ready and wrote within one TTL.
    Active {
        /// The holder.
        holder: String,
    },
    /// No working holder can be shown.
    Degraded(DegradedReason),
}

/// Why a lease reads as degraded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DegradedReason {
    /// No lease record (absent, deleted, or undecodable): no daemon holds the shard.
    Absent,
    /// A daemon holds the lease but has not bound Plane-3 yet (`ready:false`).
    NotReady,
    /// The holder is ready but published its own health as degraded ([`HEALTH_FIELD`]).
    Reported {
        /// The holder's reasons, as it wrote them (`fanout-down`, `writes-failing` …).
        reasons: Vec<String>,
    },
    /// The last write is older than the TTL: the holder stopped renewing (crashed or stalled),
    /// and the record is only waiting for the bucket's `max_age` to remove it.
    Stale {
        /// `now − since`.
        age: Duration,
    },
}

/// Judges a lease record read by an observer at wall time `now`: active iff
/// `ready && now − since ≤ ttl`; a `since` in the future (clock skew) counts as age 0.
///
/// Unlike the reference's point-in-time check (G40), a crashed holder stops reading as active
/// one TTL after its last renewal.
pub fn judge_health(record: Option<&DeliveryLease>, now: UnixMillis, ttl: Duration) -> LeaseHealth {
    let Some(record) = record else {
        return LeaseHealth::Degraded(DegradedReason::Absent);
    };
    let age = Duration::from_millis(now.0.saturating_sub(record.since.0));
    if age > ttl {
        LeaseHealth::Degraded(DegradedReason::Stale { age })
    } else if !record.ready {
        LeaseHealth::Degraded(DegradedReason::NotReady)
    } else if let Some(reasons) = reported_degraded(record) {
        LeaseHealth::Degraded(DegradedReason::Reported { reasons })
    } else {
        LeaseHealth::Active {
            holder: record.holder.clone(),
        }
    }
}

#[cfg(test)]
mod tests;

/// The reasons of a record whose [`HEALTH_FIELD`] says `degraded`; `None` when the field is
/// absent (a reference daemon), says anything else, or does not parse.
fn reported_degraded(record: &DeliveryLease) -> Option<Vec<String>> {
    let health = record.extra.get(HEALTH_FIELD)?;
    if health.get("state").and_then(Value::as_str) != Some("degraded") {
        return None;
    }
    Some(
        health
            .get("reasons")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    )
}
