//! The receiver's dedup and ack-ownership ledger (semantics §2(f), invariants I22–I24, gaps G7,
//! G31, G32).
//!
//! An agent receives one logical message (one `id`) through up to four paths: the live core
//! subscription, the join backfill, the durable DLV consumer, and JetStream redeliveries of a DLV
//! copy. The endpoint does not deduplicate; this ledger does, for every copy the agent machine
//! receives, and it decides what happens to each durable JetStream delivery. It is a plain struct:
//! no IO, no clock, no callbacks. Every input is a method call carrying `now`; every decision comes
//! back as a value ([`Decision`], [`Settled`], [`Resolution`]) that the parent turns into commands
//! (`ack` / `nak(delay)` / `term` of one durable delivery, surface to the application, drop).
//!
//! # The rules
//!
//! - **Dedup by id (I23).** Among all copies of one id, at most one is surfaced while the id is
//!   pending or within the settled-id horizon.
//! - **Ack ownership (I24, SPEC §4).** Only a durable copy owns an ack. A live or backfill copy never
//!   commits anything and never replaces a durable handle. A later durable copy of a pending id
//!   takes over: the pending entry always holds the most recently ingested durable handle.
//! - **Ack after handling (I22).** A durable delivery is acked only when its id was *settled* by the
//!   application (reported [handled](Ledger::handled) after it was surfaced, or deliberately
//!   [declined](Ledger::decline)), when it duplicates an already-settled id, when it is the
//!   parent's own echo, or when it was superseded by a fresher delivery of a *different* stream
//!   message of the same pending id (see below). Nothing else commits.
//! - **Anomalies are terminated (G32).** A durable copy the parent found malformed or spoofed is
//!   `term`ed, never acked, so no redelivery loop and a consistent advisory.
//! - **Bounded (R18).** At most [`LedgerConfig::max_pending`] ids are pending (queued or surfaced but
//!   not yet settled), and the horizon remembers exactly the last
//!   [`LedgerConfig::horizon_capacity`] settled ids.
//! - **Loss is never silent.** Every copy that is refused, deferred or forgotten shows up in the
//!   returned value *and* in [`LedgerCounters`].
//!
//! # Where the reference is weak, and what this ledger does instead
//!
//! **Superseded durable handles.** The reference overwrites the stored handle with the fresher one
//! and forgets the old delivery. JetStream keys ack, nak and term by *stream sequence*, only
//! range-checking the delivery sequence, so a superseded delivery of the **same** stream message
//! (a redelivery) is the same pending entry on the server: acking it would commit the message
//! before the application handled it (an I22 break: a crash then loses it), and nakking it would
//! schedule yet another redelivery of the entry we still hold. So:
//!
//! - both stream sequences known and **different** (two DLV messages of one id, for example a
//!   re-transfer after the 2 h duplicate window or a mention copy beside a channel copy): the
//!   superseded delivery is **acked** ([`Action::Ack`]). The logical message stays protected by the
//!   fresher handle, which is acked only after handling; a crash still leads to its redelivery.
//! - same stream sequence, or either unknown: [`Action::Forget`]. The driver drops its mapping and
//!   sends nothing. If the two were in fact distinct messages, the forgotten one is redelivered
//!   after `ack_wait` and then deduplicated (acked if the id was settled meanwhile, otherwise it
//!   supersedes again): a cost in traffic, never an early commit.
//!
//! **Inbox overflow (G31).** The reference acks and drops the oldest entries past 200, committing
//! durable copies nobody saw. Here a full inbox never acks anything:
//!
//! - a durable copy of a new id is refused and **nakked** with
//!   [`LedgerConfig::overflow_nak_delay`] ([`Decision::OverflowDeferred`]); JetStream redelivers it
//!   later, so nothing is lost;
//! - unless it is itself a **redelivery**: then it takes the place of the newest queued first
//!   delivery, which is nakked instead ([`Decision::BufferedDisplacing`]). A copy refused once is
//!   older than the first deliveries that arrive while it waits; refusing it at every redelivery
//!   would let newer copies take each slot as it frees, and the owner's DLV, capped at 1000 per
//!   owner with discard-old, would rotate the old copy out before it was ever surfaced: a silent
//!   loss (G6). Found by `cotal bench` at 200 members (2,000 messages, 2–8 copies of 400,000 in
//!   every run);
//! - a live or backfill copy of a new id cannot be asked for again. If some *queued* (not yet
//!   surfaced) pending entry holds a durable handle, the newest such entry is displaced instead
//!   (a first delivery when one is queued): its delivery is nakked (it comes back later) and the
//!   live copy takes its place ([`Decision::BufferedDisplacing`]). Only when no such entry exists
//!   is the live copy dropped, and that is reported as a loss ([`Decision::OverflowLost`],
//!   [`LedgerCounters::overflow_lost`]).
//!
//! The bound covers surfaced-but-unsettled ids too: they still hold durable deliveries. An
//! application that never reports back therefore exerts back-pressure rather than making the ledger
//! grow.
//!
//! **The horizon.** The reference keeps two rotating sets of 4096 ids, so it remembers between 4096
//! and 8192. Here the horizon is one FIFO of exactly the last `horizon_capacity` settled ids
//! (default 8192, never less than the reference's worst case). Each eviction is reported in
//! [`Settled::evicted`] and counted in [`LedgerCounters::horizon_evicted`]: a later copy of an
//! evicted id would surface again.
//!
//! **Declined copies.** Channel attention policy (mute, focus) stays in the application. When it
//! declines a pending item, [`Ledger::decline`] settles the id as [`Settlement::Declined`]: the
//! durable handle is acked, the id enters the horizon (so a later copy is dropped, not re-offered),
//! and it is counted apart from handled ids.
//!
//! # Restart and the horizon snapshot (G7)
//!
//! The exact guarantee, per ledger instance:
//!
//! - **Without a snapshot.** Among all copies one ledger ingests, an id is surfaced at most once as
//!   long as it is pending or among the last `horizon_capacity` settled ids. Nothing holds across a
//!   restart: a fresh ledger knows no settled id, so a boot backfill (scenario A14) or the
//!   redelivery of a copy whose ack was lost can surface an id again. Nothing is lost either: an
//!   unsettled durable copy was never acked and comes back after `ack_wait`.
//! - **With a snapshot.** [`Ledger::horizon_snapshot`] returns the settled ids, oldest first, as a
//!   serde value; [`Ledger::restore`] builds a ledger that treats each of them as settled (durable
//!   copies acked at once and dropped, others dropped). A host that persists the snapshot (or an
//!   append-only journal of the ids in each [`Settled`], which is the same list) **before** it sends
//!   the ack of that [`Settled`] gets: an id whose settlement was persisted is never surfaced again
//!   by a ledger restored from it, as long as it is among the last `horizon_capacity` settled ids;
//!   and an id whose settlement was not yet persisted when the process died is surfaced again
//!   (at-least-once: the application's own handling and the persist are not atomic). Acking before
//!   persisting opens a window in which the delivery is committed but the id is unknown after a
//!   restart, so only a backfill could repeat it; the persist-then-ack order closes that window.
//!
//! Pending ids are deliberately not in the snapshot: their durable copies were not acked and will
//! be redelivered; their live copies are lost with the process, as the live path is at-most-once.
//!
//! # Driving it
//!
//! ```
//! use cotal_core::ledger::{Action, CopySource, Decision, DeliveryId, DurableDelivery, Ledger,
//!     LedgerConfig, MessageId};
//! use cotal_core::time::Instant;
//!
//! let mut ledger: Ledger<&str> = Ledger::new(LedgerConfig::default()).unwrap();
//! let t = Instant::from_millis(10);
//! let id = MessageId::from("m1");
//!
//! // 1. Every received copy goes through `ingest`; execute `decision.resolution()` if any.
//! let d = ledger.ingest(t, id.clone(), CopySource::Live, "hello").unwrap();
//! assert_eq!(d, Decision::Buffered);
//! let dlv = DurableDelivery::new(DeliveryId(7)).with_stream_seq(42);
//! let d = ledger.ingest(t, id.clone(), CopySource::Durable(dlv), "hello").unwrap();
//! assert_eq!(d, Decision::HandleUpgraded); // the durable copy now owns the ack
//! assert_eq!(d.resolution(), None);
//!
//! // 2. When the application wants work, surface pending items in arrival order.
//! let items = ledger.surface(t, 10);
//! assert_eq!(items.len(), 1);
//!
//! // 3. Once it has handled one, report it; only now is the durable delivery acked.
//! let settled = ledger.handled(t, &id).unwrap();
//! let ack = settled.ack.unwrap();
//! assert_eq!((ack.delivery, ack.action), (DeliveryId(7), Action::Ack));
//! ```
//!
//! Method categories: [`ingest`](Ledger::ingest) and [`reject`](Ledger::reject) for copies from the
//! broker; [`surface`](Ledger::surface), [`handled`](Ledger::handled) and
//! [`decline`](Ledger::decline) for the application; getters for tests and health. Calls may come
//! in any order; misuse (settling an unknown id, reusing a held delivery handle) is a
//! [`LedgerError`] with the state unchanged. `now` should not go backwards; if it does, the ledger
//! keeps its latest `now` and counts a [clock regression](LedgerCounters::clock_regressions).
//!
//! Files: this one holds the ledger itself, its configuration, errors and snapshot;
//! `ledger/identity.rs` the ids and copy sources, `ledger/decisions.rs` what the ledger answers.

use crate::constants::{HANDLED_IDS_WINDOW, MAX_INBOX};
use crate::time::{Duration, Instant};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

#[cfg(test)]
mod tests;

mod decisions;
mod identity;

pub use decisions::{
    Action, Decision, LedgerCounters, Rejection, Resolution, Settled, Settlement, Surfaced,
};
pub use identity::{CopySource, DeliveryId, DurableDelivery, MessageId, SourceKind};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Default [`LedgerConfig::horizon_capacity`]: the reference's worst case, 2 × 4096 ids.
pub const DEFAULT_HORIZON_CAPACITY: usize = 2 * HANDLED_IDS_WINDOW;

/// Default [`LedgerConfig::overflow_nak_delay`]: how long JetStream waits before redelivering a
/// durable copy the full inbox refused.
pub const DEFAULT_OVERFLOW_NAK_DELAY: Duration = Duration::from_millis(5_000);

/// The only [`HorizonSnapshot::version`] this crate writes and reads.
pub const HORIZON_SNAPSHOT_VERSION: u32 = 1;

/// The ledger's bounds and its one tunable delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LedgerConfig {
    /// Most ids pending at once, queued or surfaced-but-unsettled (reference `MAX_INBOX`, 200).
    pub max_pending: usize,
    /// Exactly how many settled ids the horizon remembers (default 8192).
    pub horizon_capacity: usize,
    /// The nak delay of a durable copy deferred because the inbox was full.
    pub overflow_nak_delay: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            max_pending: MAX_INBOX,
            horizon_capacity: DEFAULT_HORIZON_CAPACITY,
            overflow_nak_delay: DEFAULT_OVERFLOW_NAK_DELAY,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Misuse of the ledger by its parent (R17a). The call changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LedgerError {
    /// A configuration bound is zero.
    InvalidConfig {
        /// Which bound.
        field: &'static str,
    },
    /// A durable copy carries a handle a pending entry still holds.
    HandleInUse {
        /// The reused handle.
        delivery: DeliveryId,
        /// The id whose entry holds it.
        held_by: MessageId,
    },
    /// [`Ledger::handled`] or [`Ledger::decline`] for an id that is not pending.
    NotPending {
        /// The id.
        id: MessageId,
    },
    /// [`Ledger::handled`] for a pending id that was never surfaced.
    NotSurfaced {
        /// The id.
        id: MessageId,
    },
    /// A snapshot written by an unknown format version.
    SnapshotVersion {
        /// The version found.
        found: u32,
    },
    /// A snapshot listing one id twice.
    SnapshotDuplicate {
        /// The repeated id.
        id: MessageId,
    },
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::InvalidConfig { field } => {
                write!(f, "ledger config: `{field}` must be at least 1")
            }
            LedgerError::HandleInUse { delivery, held_by } => {
                write!(
                    f,
                    "delivery {delivery} is still held by pending id {held_by}"
                )
            }
            LedgerError::NotPending { id } => write!(f, "id {id} is not pending"),
            LedgerError::NotSurfaced { id } => {
                write!(f, "id {id} is pending but was never surfaced")
            }
            LedgerError::SnapshotVersion { found } => write!(
                f,
                "horizon snapshot version {found} is not supported (expected {HORIZON_SNAPSHOT_VERSION})"
            ),
            LedgerError::SnapshotDuplicate { id } => {
                write!(f, "horizon snapshot lists id {id} twice")
            }
        }
    }
}

impl std::error::Error for LedgerError {}

// ---------------------------------------------------------------------------------------------
// Snapshot
// ---------------------------------------------------------------------------------------------

/// One settled id in a [`HorizonSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettledId {
    /// The id.
    pub id: MessageId,
    /// How it was settled.
    pub settlement: Settlement,
}

/// The settled-id horizon as data, for a host that wants dedup across restarts (G7). See the
/// module docs for the exact guarantee.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HorizonSnapshot {
    /// The format version, [`HORIZON_SNAPSHOT_VERSION`].
    pub version: u32,
    /// The settled ids, oldest first.
    pub settled: Vec<SettledId>,
}

// ---------------------------------------------------------------------------------------------
// The ledger
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage<T> {
    /// Waiting for [`Ledger::surface`]; holds the item.
    Queued(T),
    /// Handed to the application, waiting for `handled`/`decline`.
    Surfaced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PendingEntry<T> {
    /// Arrival sequence (key in `order`).
    seq: u64,
    since: Instant,
    origin: SourceKind,
    /// The most recently ingested durable delivery of this id, if any (I24).
    handle: Option<DurableDelivery>,
    stage: Stage<T>,
}

/// The settled ids, oldest first, with a lookup map; never more than `capacity`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Horizon {
    capacity: usize,
    order: VecDeque<MessageId>,
    settled: BTreeMap<MessageId, Settlement>,
}

impl Horizon {
    fn new(capacity: usize) -> Self {
        Horizon {
            capacity,
            order: VecDeque::new(),
            settled: BTreeMap::new(),
        }
    }

    fn get(&self, id: &MessageId) -> Option<Settlement> {
        self.settled.get(id).copied()
    }

    /// Records `id` (not yet present) and returns the id evicted to stay within capacity.
    fn insert(&mut self, id: MessageId, settlement: Settlement) -> Option<MessageId> {
        let evicted = if self.order.len() >= self.capacity {
            let old = self.order.pop_front();
            if let Some(old) = &old {
                self.settled.remove(old);
            }
            old
        } else {
            None
        };
        self.order.push_back(id.clone());
        self.settled.insert(id, settlement);
        assert!(
            self.order.len() <= self.capacity && self.settled.len() == self.order.len(),
            "R18: horizon bound or index broken"
        );
        evicted
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// The receiver's dedup and ack-ownership ledger. See the [module docs](self) for the rules, the
/// decisions where the reference is weak, and the restart guarantee.
///
/// `T` is whatever the parent wants back when an item surfaces (typically the decoded message and
/// its channel metadata); the ledger stores it only while the item is queued and never looks
/// inside.
///
/// How the parent drives it:
///
/// 1. For every copy received, after its own filters (subject parse, decode, spoof and echo
///    checks): a copy that failed them goes to [`reject`](Self::reject); every other copy goes to
///    [`ingest`](Self::ingest). Execute the returned [`Decision::resolution`], if any, on the broker.
/// 2. If the application's policy declines a new item (mute, focus), call
///    [`decline`](Self::decline) and execute its ack.
/// 3. When the application wants work, call [`surface`](Self::surface) (the reference's
///    `drainInbox`); after it handled each item, call [`handled`](Self::handled) and execute its
///    ack. Until then the durable delivery stays unacked, so a crash leads to a redelivery (I22).
/// 4. Report [`counters`](Self::counters), [`pending_len`](Self::pending_len) and
///    [`oldest_pending_since`](Self::oldest_pending_since) in health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ledger<T> {
    config: LedgerConfig,
    last_now: Instant,
    next_seq: u64,
    pending: BTreeMap<MessageId, PendingEntry<T>>,
    /// Pending ids in arrival order.
    order: BTreeMap<u64, MessageId>,
    /// Which pending id holds each held durable handle.
    held: BTreeMap<DeliveryId, MessageId>,
    horizon: Horizon,
    counters: LedgerCounters,
}

fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}

impl<T> Ledger<T> {
    /// An empty ledger.
    ///
    /// # Errors
    ///
    /// [`LedgerError::InvalidConfig`] if `max_pending` or `horizon_capacity` is zero.
    pub fn new(config: LedgerConfig) -> Result<Self, LedgerError> {
        if config.max_pending == 0 {
            return Err(LedgerError::InvalidConfig {
                field: "max_pending",
            });
        }
        if config.horizon_capacity == 0 {
            return Err(LedgerError::InvalidConfig {
                field: "horizon_capacity",
            });
        }
        Ok(Ledger {
            config,
            last_now: Instant::ZERO,
            next_seq: 0,
            pending: BTreeMap::new(),
            order: BTreeMap::new(),
            held: BTreeMap::new(),
            horizon: Horizon::new(config.horizon_capacity),
            counters: LedgerCounters::default(),
        })
    }

    /// A ledger whose horizon holds the ids of `snapshot` (G7).
    ///
    /// If the snapshot lists more than `horizon_capacity` ids, the newest are kept and the cut ones
    /// are counted in [`LedgerCounters::horizon_evicted`].
    ///
    /// # Errors
    ///
    /// [`LedgerError::InvalidConfig`] as for [`new`](Self::new);
    /// [`LedgerError::SnapshotVersion`] for an unknown version; [`LedgerError::SnapshotDuplicate`]
    /// if an id appears twice.
    pub fn restore(config: LedgerConfig, snapshot: &HorizonSnapshot) -> Result<Self, LedgerError> {
        let mut ledger = Self::new(config)?;
        if snapshot.version != HORIZON_SNAPSHOT_VERSION {
            return Err(LedgerError::SnapshotVersion {
                found: snapshot.version,
            });
        }
        let mut seen = BTreeSet::new();
        for entry in &snapshot.settled {
            if !seen.insert(&entry.id) {
                return Err(LedgerError::SnapshotDuplicate {
                    id: entry.id.clone(),
                });
            }
        }
        let cut = snapshot
            .settled
            .len()
            .saturating_sub(config.horizon_capacity);
        for entry in snapshot.settled.iter().skip(cut) {
            let evicted = ledger.horizon.insert(entry.id.clone(), entry.settlement);
            debug_assert!(evicted.is_none(), "restore kept at most capacity ids");
        }
        ledger.counters.horizon_evicted = u64::try_from(cut).unwrap_or(u64::MAX);
        Ok(ledger)
    }

    /// The settled-id horizon, oldest first, for persistence (G7).
    pub fn horizon_snapshot(&self) -> HorizonSnapshot {
        HorizonSnapshot {
            version: HORIZON_SNAPSHOT_VERSION,
            settled: self
                .horizon
                .order
                .iter()
                .map(|id| SettledId {
                    id: id.clone(),
                    settlement: self.horizon.get(id).unwrap_or(Settlement::Handled),
                })
                .collect(),
        }
    }

    fn observe(&mut self, now: Instant) -> Instant {
        if now < self.last_now {
            bump(&mut self.counters.clock_regressions);
        } else {
            self.last_now = now;
        }
        self.last_now
    }

    fn check_held(&self, source: &CopySource) -> Result<(), LedgerError> {
        if let Some(d) = source.durable()
            && let Some(held_by) = self.held.get(&d.handle)
        {
            return Err(LedgerError::HandleInUse {
                delivery: d.handle,
                held_by: held_by.clone(),
            });
        }
        Ok(())
    }

    /// Takes one received copy of message `id` and decides its fate (semantics §2(f) `ingest`).
    ///
    /// `item` is kept only if the copy becomes a pending entry ([`Decision::is_buffered`]).
    /// Execute [`Decision::resolution`] on the broker, if any.
    ///
    /// # Errors
    ///
    /// [`LedgerError::HandleInUse`] if a durable copy carries a handle a pending entry still holds.
    pub fn ingest(
        &mut self,
        now: Instant,
        id: MessageId,
        source: CopySource,
        item: T,
    ) -> Result<Decision, LedgerError> {
        self.check_held(&source)?;
        let now = self.observe(now);
        bump(&mut self.counters.copies_ingested);
        let durable = source.durable().copied();
        if durable
            .and_then(|d| d.delivery_count)
            .is_some_and(|n| n > 1)
        {
            bump(&mut self.counters.durable_redeliveries);
        }

        // 1. Already settled: a durable copy is acked at once (safe: the id was settled), any
        //    copy is dropped.
        if self.horizon.get(&id).is_some() {
            let ack = durable.map(|d| Resolution::new(d.handle, Action::Ack));
            if ack.is_some() {
                bump(&mut self.counters.settled_duplicates_acked);
            } else {
                bump(&mut self.counters.settled_duplicates_dropped);
            }
            return Ok(Decision::SettledDuplicate { ack });
        }

        // 2. Pending: coalesce. Only a durable copy changes the entry (I24).
        if let Some(entry) = self.pending.get_mut(&id) {
            let Some(fresh) = durable else {
                bump(&mut self.counters.duplicates_dropped);
                return Ok(Decision::DuplicateDropped);
            };
            let previous = entry.handle.replace(fresh);
            self.held.insert(fresh.handle, id.clone());
            return Ok(match previous {
                None => {
                    bump(&mut self.counters.handles_upgraded);
                    Decision::HandleUpgraded
                }
                Some(old) => {
                    self.held.remove(&old.handle);
                    let action = if fresh.distinct_message_from(&old) {
                        bump(&mut self.counters.superseded_acked);
                        Action::Ack
                    } else {
                        bump(&mut self.counters.superseded_forgotten);
                        Action::Forget
                    };
                    Decision::HandleReplaced {
                        superseded: Resolution::new(old.handle, action),
                    }
                }
            });
        }

        // 3. New id.
        if self.pending.len() < self.config.max_pending {
            self.push_pending(now, id, source.kind(), durable, item);
            bump(&mut self.counters.buffered);
            return Ok(Decision::Buffered);
        }

        // 4. Full inbox (G31): never ack what was not surfaced.
        if let Some(d) = durable {
            // A redelivered copy is older than any first delivery queued behind it (a consumer
            // delivers in stream order, redeliveries first): it takes the place of the newest
            // queued first delivery. Without this an old copy, refused and nakked, could be
            // refused again at every redelivery while newer copies take each slot as it frees,
            // and the owner's DLV cap would rotate it out unread (G6).
            if d.is_redelivery()
                && let Some((displaced, handle)) =
                    self.displace_newest_queued_durable(|h| !h.is_redelivery())
            {
                self.push_pending(now, id, source.kind(), Some(d), item);
                bump(&mut self.counters.overflow_displaced);
                bump(&mut self.counters.buffered);
                return Ok(Decision::BufferedDisplacing {
                    displaced,
                    nak: Resolution::new(
                        handle,
                        Action::Nak {
                            delay: self.config.overflow_nak_delay,
                        },
                    ),
                });
            }
            bump(&mut self.counters.overflow_deferred);
            return Ok(Decision::OverflowDeferred {
                nak: Resolution::new(
                    d.handle,
                    Action::Nak {
                        delay: self.config.overflow_nak_delay,
                    },
                ),
            });
        }
        // A first delivery goes first (it comes back; a redelivered copy has waited already).
        let victim = self
            .displace_newest_queued_durable(|h| !h.is_redelivery())
            .or_else(|| self.displace_newest_queued_durable(|_| true));
        match victim {
            Some((displaced, handle)) => {
                self.push_pending(now, id, source.kind(), None, item);
                bump(&mut self.counters.overflow_displaced);
                bump(&mut self.counters.buffered);
                Ok(Decision::BufferedDisplacing {
                    displaced,
                    nak: Resolution::new(
                        handle,
                        Action::Nak {
                            delay: self.config.overflow_nak_delay,
                        },
                    ),
                })
            }
            None => {
                bump(&mut self.counters.overflow_lost);
                Ok(Decision::OverflowLost)
            }
        }
    }

    fn push_pending(
        &mut self,
        now: Instant,
        id: MessageId,
        origin: SourceKind,
        handle: Option<DurableDelivery>,
        item: T,
    ) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        if let Some(d) = handle {
            self.held.insert(d.handle, id.clone());
        }
        self.order.insert(seq, id.clone());
        self.pending.insert(
            id,
            PendingEntry {
                seq,
                since: now,
                origin,
                handle,
                stage: Stage::Queued(item),
            },
        );
        assert!(
            self.pending.len() <= self.config.max_pending,
            "R18: pending bound exceeded"
        );
        debug_assert_eq!(self.order.len(), self.pending.len(), "order index broken");
    }

    /// Removes the newest queued entry whose durable handle `may_displace`; returns its id and
    /// handle.
    fn displace_newest_queued_durable(
        &mut self,
        may_displace: impl Fn(&DurableDelivery) -> bool,
    ) -> Option<(MessageId, DeliveryId)> {
        let (seq, id) = self.order.iter().rev().find_map(|(seq, id)| {
            let entry = self.pending.get(id)?;
            (matches!(entry.stage, Stage::Queued(_))
                && entry.handle.as_ref().is_some_and(&may_displace))
            .then(|| (*seq, id.clone()))
        })?;
        self.order.remove(&seq);
        let entry = self.pending.remove(&id)?;
        let handle = entry.handle?.handle;
        self.held.remove(&handle);
        Some((id, handle))
    }

    /// Refuses a copy the parent found anomalous, or its own echo, without touching dedup state.
    ///
    /// A durable malformed or spoofed copy is terminated (G32); a durable own echo is acked; a live
    /// or backfill copy needs nothing. Returns the resolution to execute, if any.
    ///
    /// # Errors
    ///
    /// [`LedgerError::HandleInUse`] if a durable copy carries a handle a pending entry still holds.
    pub fn reject(
        &mut self,
        now: Instant,
        source: CopySource,
        rejection: Rejection,
    ) -> Result<Option<Resolution>, LedgerError> {
        self.check_held(&source)?;
        self.observe(now);
        let durable = source.durable().map(|d| d.handle);
        Ok(match rejection {
            Rejection::OwnEcho => {
                bump(&mut self.counters.own_echoes);
                durable.map(|h| Resolution::new(h, Action::Ack))
            }
            Rejection::Malformed | Rejection::Spoofed => match durable {
                Some(h) => {
                    bump(&mut self.counters.anomalies_terminated);
                    Some(Resolution::new(h, Action::Term))
                }
                None => {
                    bump(&mut self.counters.anomalies_dropped);
                    None
                }
            },
        })
    }

    /// Hands up to `limit` queued items to the application, oldest first (the reference's
    /// `drainInbox`, minus its ack: nothing is acked until [`handled`](Self::handled)).
    ///
    /// Surfaced ids stay pending, and keep counting against `max_pending`, until settled.
    pub fn surface(&mut self, now: Instant, limit: usize) -> Vec<Surfaced<T>> {
        self.observe(now);
        let ids: Vec<MessageId> = self
            .order
            .values()
            .filter(|id| {
                self.pending
                    .get(*id)
                    .is_some_and(|e| matches!(e.stage, Stage::Queued(_)))
            })
            .take(limit)
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(entry) = self.pending.get_mut(&id) else {
                continue;
            };
            if let Stage::Queued(item) = std::mem::replace(&mut entry.stage, Stage::Surfaced) {
                bump(&mut self.counters.surfaced);
                out.push(Surfaced {
                    id,
                    item,
                    origin: entry.origin,
                    durable: entry.handle.is_some(),
                });
            }
        }
        out
    }

    /// Reports that the application handled surfaced item `id`: the id is settled, enters the
    /// horizon, and its durable delivery (if any) is acked (I22).
    ///
    /// # Errors
    ///
    /// [`LedgerError::NotPending`] if `id` is not pending (unknown, or already settled);
    /// [`LedgerError::NotSurfaced`] if it is pending but was never surfaced.
    pub fn handled(&mut self, now: Instant, id: &MessageId) -> Result<Settled, LedgerError> {
        match self.pending.get(id).map(|e| &e.stage) {
            None => Err(LedgerError::NotPending { id: id.clone() }),
            Some(Stage::Queued(_)) => Err(LedgerError::NotSurfaced { id: id.clone() }),
            Some(Stage::Surfaced) => Ok(self.settle(now, id, Settlement::Handled)),
        }
    }

    /// Reports that the application deliberately declined pending item `id`, surfaced or not (mute,
    /// focus): the id is settled as declined, enters the horizon (later copies are dropped, not
    /// re-offered), and its durable delivery is acked. Counted apart from handled ids.
    ///
    /// # Errors
    ///
    /// [`LedgerError::NotPending`] if `id` is not pending.
    pub fn decline(&mut self, now: Instant, id: &MessageId) -> Result<Settled, LedgerError> {
        if !self.pending.contains_key(id) {
            return Err(LedgerError::NotPending { id: id.clone() });
        }
        Ok(self.settle(now, id, Settlement::Declined))
    }

    fn settle(&mut self, now: Instant, id: &MessageId, settlement: Settlement) -> Settled {
        self.observe(now);
        let handle = match self.pending.remove(id) {
            Some(entry) => {
                self.order.remove(&entry.seq);
                entry.handle.map(|d| d.handle)
            }
            None => None,
        };
        if let Some(h) = handle {
            self.held.remove(&h);
        }
        match settlement {
            Settlement::Handled => bump(&mut self.counters.handled),
            Settlement::Declined => bump(&mut self.counters.declined),
        }
        let evicted = self.horizon.insert(id.clone(), settlement);
        if evicted.is_some() {
            bump(&mut self.counters.horizon_evicted);
        }
        debug_assert_eq!(self.order.len(), self.pending.len(), "order index broken");
        Settled {
            id: id.clone(),
            settlement,
            ack: handle.map(|h| Resolution::new(h, Action::Ack)),
            evicted,
        }
    }

    // ---- getters ----

    /// The configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Pending ids, queued or surfaced (at most `max_pending`).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Pending ids not yet surfaced.
    pub fn queued_len(&self) -> usize {
        self.pending
            .values()
            .filter(|e| matches!(e.stage, Stage::Queued(_)))
            .count()
    }

    /// Pending ids in arrival order.
    pub fn pending_ids(&self) -> impl Iterator<Item = &MessageId> + '_ {
        self.order.values()
    }

    /// Whether `id` is pending.
    pub fn is_pending(&self, id: &MessageId) -> bool {
        self.pending.contains_key(id)
    }

    /// Whether pending `id` has been surfaced (`None` if not pending).
    pub fn is_surfaced(&self, id: &MessageId) -> Option<bool> {
        self.pending
            .get(id)
            .map(|e| matches!(e.stage, Stage::Surfaced))
    }

    /// The durable delivery pending `id` holds, if any.
    pub fn held_handle(&self, id: &MessageId) -> Option<DeliveryId> {
        self.pending.get(id)?.handle.map(|d| d.handle)
    }

    /// Every held durable delivery, with the id holding it, in handle order.
    pub fn held_handles(&self) -> impl Iterator<Item = (DeliveryId, &MessageId)> + '_ {
        self.held.iter().map(|(h, id)| (*h, id))
    }

    /// When the oldest pending entry arrived (for an inbox-age health check).
    pub fn oldest_pending_since(&self) -> Option<Instant> {
        let id = self.order.values().next()?;
        self.pending.get(id).map(|e| e.since)
    }

    /// How `id` was settled, if it is within the horizon.
    pub fn settlement(&self, id: &MessageId) -> Option<Settlement> {
        self.horizon.get(id)
    }

    /// Settled ids remembered (at most `horizon_capacity`).
    pub fn horizon_len(&self) -> usize {
        self.horizon.len()
    }

    /// The counters.
    pub fn counters(&self) -> &LedgerCounters {
        &self.counters
    }
}
