//! Membership registry: the one interval check and every record transition, as pure functions
//! (semantics §2g–§2i, invariants I7, I14, I16–I19, gaps G1, G2, G23, G26, G27, G34, G35).
//!
//! A membership record (`<channel>/<owner>` in `cotal_members_<space>`) is a small state machine:
//!
//! ```text
//! absent ──join──▶ open(pending, g, J) ──activate──▶ open(activated, g, J)
//!                        │                                   │
//!                        └──────────────tombstone(L)─────────┘
//!                                          ▼
//!                                tombstone(g, J, L) ──join──▶ open(pending, g' > g, J' ≥ L)
//!                                                              history += (g, J, L)
//! ```
//!
//! # How to use it
//!
//! Every transition is a `plan_*` function over a [`MemberSnapshot`] (what one KV read returned:
//! the record, or its absence, and the revision). A plan either says nothing has to be written
//! (an idempotent outcome), refuses with a typed [`RegistryError`], or returns a [`WriteIntent`]:
//! the new record plus the precondition the driver must apply (create-only, or compare-and-set
//! against the snapshot's revision). On a CAS conflict the driver reads the key again and plans
//! again; a [`WriteIntent`] cannot be re-targeted at another revision, so a stale plan can never
//! be replayed over a fresh read (G27). The reference's 5-attempt bound is the driver's loop
//! ([`crate::constants::KV_CAS_ATTEMPTS`], then [`RegistryError::CasExhausted`]).
//!
//! # Wire extensions (old peers ignore and preserve them)
//!
//! The record keeps every reference field with the reference's meaning. This module adds three
//! optional fields, held in [`MembershipRecord::extra`] (so `records.rs` is unchanged):
//!
//! | field | JSON | meaning |
//! | --- | --- | --- |
//! | [`CLOSED_INTERVALS_FIELD`] `"closedIntervals"` | `[{"generation":g,"joinCursor":J,"leaveCursor":L}, …]`, oldest first, at most [`INTERVAL_HISTORY_CAP`] | the closed intervals of earlier generations (G2) |
//! | [`FORGOTTEN_INTERVALS_FIELD`] `"forgottenIntervals"` | integer, omitted when 0 | how many closed intervals fell off the cap, in total |
//! | [`FENCE_FIELD`] `"fence"` | integer | the highest fencing token (lease revision) that wrote the record (G23) |
//!
//! The reference rewrites tombstones and activations as `{...cur, …}`, so it carries these fields
//! over unchanged. Its fresh join writes a new object without them: after a reference daemon
//! rejoins a pair, the history is gone and entries of older generations fail closed (they are
//! dropped, exactly as the reference itself would drop them), and the fence restarts at 0.
//!
//! # Decisions on the reference's gaps
//!
//! - **G26.** [`current_interval`] is `None` for a `live-confirmed` record without a leave
//!   cursor: such a record never routes. `activated` never gates delivery (B15).
//! - **G2.** An entry of generation `g` is judged against the interval of generation `g`
//!   ([`lookup_generation`]): the current one or one in the history. A generation whose interval
//!   fell off the cap is [`IntervalLookup::Forgotten`] (fail closed, and countable: the record
//!   counts them, [`JoinCommit::forgotten`] names them); one never seen is
//!   [`IntervalLookup::Unknown`].
//! - **G1.** [`plan_join`] takes the agent's armed watermark `w`: `J = max(min(w, frontier), L)`
//!   where `L` is the leave cursor of the record being rejoined. Below the frontier is safe
//!   because everything up to the frontier is already in the channel's history, which the
//!   owner's read ACL (checked at join and again by the reader) lets it read anyway; catch-up
//!   copies `(J, fence]`. Not below `L` keeps consecutive generations disjoint, so one message is
//!   never copied under two generations (two msg-ids, a duplicate the broker cannot collapse),
//!   and `(L, J]` stays the rejoin gap of I18. [`WatermarkUse`] reports what happened.
//! - **G34.** A new generation is `max(previous + 1, frontier + 1)`. Without a purge this is
//!   strictly increasing like the reference's `previous + 1`. After an external purge (this
//!   implementation never purges a membership key) the new generation is `frontier + 1`, which is
//!   larger than every earlier generation of the pair as long as the space published at least one
//!   CHAT message between consecutive joins of that pair (then every generation equals
//!   `frontier at its join + 1`). Only a pair that rejoined more often than the whole space
//!   published could reuse a generation number after a purge. Wire compatibility: generations
//!   stay integers ≤ 2⁵³ − 1 (a larger one is refused, [`RegistryError::GenerationExhausted`]);
//!   the reference's `previous + 1` continues from ours; only the *values* differ from the
//!   reference's `1, 2, 3` (a first join on a stream whose last sequence is 40 gets 41).
//! - **G23.** Every plan takes a [`Writer`] with its [`FencingToken`]; a plan whose token is below
//!   the record's stored fence is refused ([`RegistryError::Fenced`]); every write stores
//!   `max(stored, token)`. What this guarantees on NATS KV, and what it does not, is on
//!   [`FencingToken`].
//! - **G27.** Writes CAS against the revision of the snapshot they were planned from (above).
//! - **G35.** [`RegistryError::StaleMembershipWrite`] says `<` or `>` as the numbers are.
//!
//! Files: this one holds the snapshots, write intents, errors and the plans; `registry/interval.rs`
//! the intervals and the one interval check; `registry/fence.rs` the fencing token and its stamp.

use crate::time::UnixMillis;
use crate::wire::json::{self, MAX_SAFE_INTEGER};
use crate::wire::keys::member_key;
use crate::wire::records::{MemberState, MembershipRecord};
use crate::wire::token::{AgentId, ConcreteChannel};
use bytes::Bytes;
use std::fmt;

mod fence;
mod interval;

use fence::stamp_fence;
pub use fence::{FENCE_FIELD, FencingToken, Writer, stored_fence};
pub use interval::{
    CLOSED_INTERVALS_FIELD, ClosedInterval, FORGOTTEN_INTERVALS_FIELD, INTERVAL_HISTORY_CAP,
    Interval, IntervalLookup, closed_intervals, current_interval, durable_eligible,
    forgotten_intervals, generation_eligible, is_open, lookup_generation,
};
use interval::{push_history, set_history};

// ---------------------------------------------------------------------------------------------
// Snapshots and write intents
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Stored {
    /// No key, or a `DEL`/`PURGE` marker: a `create` is the right precondition (NATS allows a
    /// create over a marker, CAS-safe).
    Absent,
    /// A value that does not decode (or names another key): reads as absent, like `readMember`,
    /// but is overwritten with a CAS on its revision rather than a doomed `create`.
    Undecodable { revision: u64 },
    /// A record and its revision.
    Record {
        record: MembershipRecord,
        revision: u64,
    },
}

/// What one read of a membership key returned: the only input the `plan_*` functions accept.
///
/// Plans compare-and-set against this snapshot's revision, so the only way to retry after a
/// conflict is to read again and plan again (G27).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSnapshot {
    channel: ConcreteChannel,
    owner: AgentId,
    stored: Stored,
}

impl MemberSnapshot {
    /// The key holds nothing (missing, deleted or purged).
    pub fn absent(channel: ConcreteChannel, owner: AgentId) -> Self {
        MemberSnapshot {
            channel,
            owner,
            stored: Stored::Absent,
        }
    }

    /// A decoded record read at `revision`; the key is the record's own.
    pub fn at(record: MembershipRecord, revision: u64) -> Self {
        MemberSnapshot {
            channel: record.channel.clone(),
            owner: record.owner.clone(),
            stored: Stored::Record { record, revision },
        }
    }

    /// A KV read of key `<channel>/<owner>`: `value` is `None` for a missing key (or a
    /// `DEL`/`PURGE` entry), else the stored bytes at `revision`.
    ///
    /// Empty bytes (a marker) read as absent. Bytes that do not decode, or a record naming
    /// another channel or owner, read as absent too (as `readMember` does) but keep the revision,
    /// so a write replaces them with a CAS.
    pub fn from_kv(
        channel: ConcreteChannel,
        owner: AgentId,
        value: Option<&[u8]>,
        revision: u64,
    ) -> Self {
        let stored = match value {
            None | Some([]) => Stored::Absent,
            Some(bytes) => match MembershipRecord::from_kv(Some(bytes)) {
                Some(record) if record.channel == channel && record.owner == owner => {
                    Stored::Record { record, revision }
                }
                _ => Stored::Undecodable { revision },
            },
        };
        MemberSnapshot {
            channel,
            owner,
            stored,
        }
    }

    /// The channel of the key.
    pub fn channel(&self) -> &ConcreteChannel {
        &self.channel
    }

    /// The owner of the key.
    pub fn owner(&self) -> &AgentId {
        &self.owner
    }

    /// The record, if one was read.
    pub fn record(&self) -> Option<&MembershipRecord> {
        match &self.stored {
            Stored::Record { record, .. } => Some(record),
            _ => None,
        }
    }

    /// The revision read, if the key held a value.
    pub fn revision(&self) -> Option<u64> {
        match &self.stored {
            Stored::Absent => None,
            Stored::Undecodable { revision } | Stored::Record { revision, .. } => Some(*revision),
        }
    }

    fn precondition(&self) -> Precondition {
        match self.revision() {
            None => Precondition::CreateOnly,
            Some(r) => Precondition::Revision(r),
        }
    }

    fn intent(&self, record: MembershipRecord) -> WriteIntent {
        WriteIntent {
            key: member_key(&self.channel, &self.owner),
            record,
            precondition: self.precondition(),
        }
    }

    fn check_fence(&self, writer: &Writer) -> Result<(), RegistryError> {
        if let Some(rec) = self.record() {
            let stored = stored_fence(rec);
            if writer.fence < stored {
                return Err(RegistryError::Fenced {
                    channel: self.channel.clone(),
                    owner: self.owner.clone(),
                    stored,
                    attempted: writer.fence,
                });
            }
        }
        Ok(())
    }

    fn stale(&self, attempted: u64, current: u64) -> RegistryError {
        RegistryError::StaleMembershipWrite {
            channel: self.channel.clone(),
            owner: self.owner.clone(),
            attempted,
            current,
        }
    }
}

/// The condition a [`WriteIntent`] must be applied under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precondition {
    /// `kv.create`: the key must hold nothing (a `DEL`/`PURGE` marker counts as nothing).
    CreateOnly,
    /// `kv.update(key, value, revision)`: the key must still be at this revision.
    Revision(u64),
}

/// A write to apply to the members bucket. Built only by the `plan_*` functions, from a
/// snapshot: on a conflict, read again and plan again.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a planned write does nothing until the driver applies it"]
pub struct WriteIntent {
    key: String,
    record: MembershipRecord,
    precondition: Precondition,
}

impl WriteIntent {
    /// The KV key, `<channel>/<owner>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The record to write.
    pub fn record(&self) -> &MembershipRecord {
        &self.record
    }

    /// The precondition to apply it under.
    pub fn precondition(&self) -> Precondition {
        self.precondition
    }

    /// The value bytes (compact JSON in the reference's key order, extensions last).
    pub fn encode(&self) -> Bytes {
        json::encode(&self.record)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a registry write was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryError {
    /// The generation guard (`StaleMembershipWrite`): the write's generation does not match (is
    /// below, or for a leave differs from) the stored one.
    StaleMembershipWrite {
        /// The channel.
        channel: ConcreteChannel,
        /// The owner.
        owner: AgentId,
        /// The generation the write carried.
        attempted: u64,
        /// The stored generation.
        current: u64,
    },
    /// The writer's fencing token is below the record's stored fence: a deposed daemon (G23).
    Fenced {
        /// The channel.
        channel: ConcreteChannel,
        /// The owner.
        owner: AgentId,
        /// The record's fence.
        stored: FencingToken,
        /// The writer's token.
        attempted: FencingToken,
    },
    /// The next generation would exceed 2⁵³ − 1, which a JavaScript peer cannot hold exactly.
    GenerationExhausted {
        /// The channel.
        channel: ConcreteChannel,
        /// The owner.
        owner: AgentId,
        /// The stored generation.
        current: u64,
    },
    /// A same-generation write would clear or raise the leave cursor (resurrection, I14/I17).
    WouldReopen {
        /// The channel.
        channel: ConcreteChannel,
        /// The owner.
        owner: AgentId,
        /// The generation.
        generation: u64,
        /// The stored leave cursor.
        leave_cursor: u64,
        /// The leave cursor the write carried.
        attempted: Option<u64>,
    },
    /// A same-generation write would move the join cursor (a generation has one interval).
    JoinCursorChanged {
        /// The channel.
        channel: ConcreteChannel,
        /// The owner.
        owner: AgentId,
        /// The generation.
        generation: u64,
        /// The stored join cursor.
        join_cursor: u64,
        /// The join cursor the write carried.
        attempted: u64,
    },
    /// A record was planned for a key other than the snapshot's.
    KeyMismatch {
        /// The snapshot's key.
        expected: String,
        /// The record's key.
        found: String,
    },
    /// The driver's CAS loop gave up (`members CAS exhausted retries for <key>`).
    CasExhausted {
        /// The key.
        key: String,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::StaleMembershipWrite {
                channel,
                owner,
                attempted,
                current,
            } => {
                // G35: the reference always prints "<".
                let op = match attempted.cmp(current) {
                    std::cmp::Ordering::Less => "<",
                    std::cmp::Ordering::Greater => ">",
                    std::cmp::Ordering::Equal => "=",
                };
                write!(
                    f,
                    "stale membership write for {channel}/{owner}: generation {attempted} {op} current {current}"
                )
            }
            RegistryError::Fenced {
                channel,
                owner,
                stored,
                attempted,
            } => write!(
                f,
                "fenced membership write for {channel}/{owner}: writer {attempted} < stored {stored} (a newer delivery daemon holds the lease)"
            ),
            RegistryError::GenerationExhausted {
                channel,
                owner,
                current,
            } => write!(
                f,
                "membership generation exhausted for {channel}/{owner}: current {current}"
            ),
            RegistryError::WouldReopen {
                channel,
                owner,
                generation,
                leave_cursor,
                attempted,
            } => match attempted {
                Some(a) => write!(
                    f,
                    "membership write for {channel}/{owner} would raise the leave cursor of generation {generation} from {leave_cursor} to {a}"
                ),
                None => write!(
                    f,
                    "membership write for {channel}/{owner} would clear the leave cursor {leave_cursor} of generation {generation}"
                ),
            },
            RegistryError::JoinCursorChanged {
                channel,
                owner,
                generation,
                join_cursor,
                attempted,
            } => write!(
                f,
                "membership write for {channel}/{owner} would move the join cursor of generation {generation} from {join_cursor} to {attempted}"
            ),
            RegistryError::KeyMismatch { expected, found } => {
                write!(f, "membership record for {found} planned on key {expected}")
            }
            RegistryError::CasExhausted { key } => {
                write!(f, "members CAS exhausted retries for {key}")
            }
        }
    }
}

impl std::error::Error for RegistryError {}

// ---------------------------------------------------------------------------------------------
// The generation guard (`commitMember`)
// ---------------------------------------------------------------------------------------------

/// The generation guard of `commitMember`: a write whose generation is below the stored one is
/// refused as stale; an equal generation is allowed (activation, tombstone, upgrade).
///
/// # Errors
///
/// [`RegistryError::StaleMembershipWrite`].
pub fn check_generation(
    snapshot: &MemberSnapshot,
    next_generation: u64,
) -> Result<(), RegistryError> {
    match snapshot.record() {
        Some(cur) if next_generation < cur.generation => {
            Err(snapshot.stale(next_generation, cur.generation))
        }
        _ => Ok(()),
    }
}

/// `commitMember` for an arbitrary next record: the generation guard, the fence, and the
/// interval guards, then a write against the snapshot.
///
/// Beyond the reference: a same-generation write may not clear or raise a leave cursor, nor move
/// the join cursor (so no raw write can resurrect or re-window a generation); the history and
/// fence fields are taken from the stored record (a raw write cannot erase them), and a write
/// of a higher generation over a tombstone closes the tombstone's interval into the history.
///
/// # Errors
///
/// [`RegistryError::KeyMismatch`], [`RegistryError::Fenced`],
/// [`RegistryError::StaleMembershipWrite`], [`RegistryError::WouldReopen`],
/// [`RegistryError::JoinCursorChanged`].
pub fn plan_commit(
    snapshot: &MemberSnapshot,
    mut next: MembershipRecord,
    writer: &Writer,
) -> Result<WriteIntent, RegistryError> {
    if next.channel != snapshot.channel || next.owner != snapshot.owner {
        return Err(RegistryError::KeyMismatch {
            expected: member_key(&snapshot.channel, &snapshot.owner),
            found: member_key(&next.channel, &next.owner),
        });
    }
    snapshot.check_fence(writer)?;
    check_generation(snapshot, next.generation)?;
    let (mut history, mut forgotten) = (Vec::new(), 0);
    if let Some(cur) = snapshot.record() {
        if next.generation == cur.generation {
            if let Some(l) = cur.leave_cursor
                && next.leave_cursor.is_none_or(|n| n > l)
            {
                return Err(RegistryError::WouldReopen {
                    channel: cur.channel.clone(),
                    owner: cur.owner.clone(),
                    generation: cur.generation,
                    leave_cursor: l,
                    attempted: next.leave_cursor,
                });
            }
            if next.join_cursor != cur.join_cursor {
                return Err(RegistryError::JoinCursorChanged {
                    channel: cur.channel.clone(),
                    owner: cur.owner.clone(),
                    generation: cur.generation,
                    join_cursor: cur.join_cursor,
                    attempted: next.join_cursor,
                });
            }
        }
        history = closed_intervals(cur);
        forgotten = forgotten_intervals(cur);
        if next.generation > cur.generation
            && let Some(l) = cur.leave_cursor
        {
            let dropped = push_history(
                &mut history,
                ClosedInterval {
                    generation: cur.generation,
                    join_cursor: cur.join_cursor,
                    leave_cursor: l,
                },
            );
            forgotten = forgotten.saturating_add(dropped.len() as u64);
        }
    }
    // The fence is the stored one, never what the caller put in `next`.
    next.extra.remove(FENCE_FIELD);
    if let Some(cur) = snapshot.record() {
        next.extra
            .insert(FENCE_FIELD.into(), stored_fence(cur).0.into());
    }
    history.retain(|c| c.generation < next.generation);
    set_history(&mut next.extra, &history, forgotten);
    stamp_fence(&mut next, writer);
    Ok(snapshot.intent(next))
}

// ---------------------------------------------------------------------------------------------
// Join
// ---------------------------------------------------------------------------------------------

/// What [`plan_join`] did with the agent's watermark (G1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WatermarkUse {
    /// No watermark was given: the join cursor is the frontier (the reference's behaviour).
    NotGiven,
    /// The watermark is the join cursor.
    Honoured,
    /// The watermark was above the frontier; the join cursor is the frontier.
    CappedAtFrontier,
    /// The watermark was below the leave cursor of the record being rejoined; the join cursor is
    /// that leave cursor (the rejoin gap `(L, w]` stays uncovered, I18).
    RaisedToLeaveCursor,
    /// The record is open: its existing window is reused and the watermark plays no part.
    OpenRecordReused,
}

impl WatermarkUse {
    /// True when the join cursor is exactly the watermark given.
    pub fn honoured(self) -> bool {
        self == WatermarkUse::Honoured
    }
}

/// A join that must commit a new generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinCommit {
    /// The write: `durable-active`, `activated:false`, the new window, history and fence.
    pub intent: WriteIntent,
    /// The new generation.
    pub generation: u64,
    /// The new join cursor.
    pub join_cursor: u64,
    /// What happened to the watermark.
    pub watermark: WatermarkUse,
    /// Closed intervals that fell off the history cap with this write: entries of these
    /// generations still pending will be dropped. Report them (which member, which channel, which
    /// sequences).
    pub forgotten: Vec<ClosedInterval>,
}

/// What a durable join must do (semantics §2h steps 2–5).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinPlan {
    /// Open and activated: idempotent success, no write, no catch-up.
    AlreadyActive {
        /// The existing generation.
        generation: u64,
    },
    /// Open but not activated (an earlier attempt stopped mid catch-up): no write; re-run
    /// catch-up over the same window with the same generation, then activate.
    ResumePending {
        /// The existing generation.
        generation: u64,
        /// The existing join cursor.
        join_cursor: u64,
    },
    /// A new generation must be committed before catch-up.
    Commit(Box<JoinCommit>),
}

/// Plans a durable join (`durableJoinFor` steps 2–5) for the agent whose armed watermark is
/// `watermark` (if the request carried one), with the CHAT stream's `frontier` (`last_seq`) read
/// now.
///
/// - Open and activated → [`JoinPlan::AlreadyActive`]; open and pending →
///   [`JoinPlan::ResumePending`].
/// - Otherwise a new generation `max(previous + 1, frontier + 1)` (G34) and join cursor
///   `max(min(watermark, frontier), L)` where `L` is the stored leave cursor (G1; without a
///   watermark, `max(frontier, L)`). A tombstone's interval goes into the history (G2).
///
/// # Errors
///
/// [`RegistryError::Fenced`] for a deposed writer (checked on every outcome), and
/// [`RegistryError::GenerationExhausted`].
pub fn plan_join(
    snapshot: &MemberSnapshot,
    watermark: Option<u64>,
    frontier: u64,
    writer: &Writer,
    now: UnixMillis,
) -> Result<JoinPlan, RegistryError> {
    snapshot.check_fence(writer)?;
    let existing = snapshot.record();
    if let Some(cur) = existing.filter(|r| is_open(r)) {
        return Ok(if cur.is_activated() {
            JoinPlan::AlreadyActive {
                generation: cur.generation,
            }
        } else {
            JoinPlan::ResumePending {
                generation: cur.generation,
                join_cursor: cur.join_cursor,
            }
        });
    }
    let previous = existing.map_or(0, |r| r.generation);
    let generation = previous
        .checked_add(1)
        .zip(frontier.checked_add(1))
        .map(|(a, b)| a.max(b))
        .filter(|g| *g <= MAX_SAFE_INTEGER)
        .ok_or_else(|| RegistryError::GenerationExhausted {
            channel: snapshot.channel.clone(),
            owner: snapshot.owner.clone(),
            current: previous,
        })?;
    let leave_floor = existing.and_then(|r| r.leave_cursor);
    let (join_cursor, watermark_use) = choose_join_cursor(watermark, frontier, leave_floor);

    let mut history = Vec::new();
    let mut forgotten_total = 0;
    let mut forgotten = Vec::new();
    let mut fence = writer.fence;
    if let Some(cur) = existing {
        history = closed_intervals(cur);
        forgotten_total = forgotten_intervals(cur);
        fence = fence.max(stored_fence(cur));
        if let Some(l) = cur.leave_cursor {
            forgotten = push_history(
                &mut history,
                ClosedInterval {
                    generation: cur.generation,
                    join_cursor: cur.join_cursor,
                    leave_cursor: l,
                },
            );
            forgotten_total = forgotten_total.saturating_add(forgotten.len() as u64);
        }
    }
    let mut record = MembershipRecord::fresh_join(
        snapshot.channel.clone(),
        snapshot.owner.clone(),
        join_cursor,
        generation,
        writer.identity.clone(),
        now,
    );
    set_history(&mut record.extra, &history, forgotten_total);
    record.extra.insert(FENCE_FIELD.into(), fence.0.into());
    Ok(JoinPlan::Commit(Box::new(JoinCommit {
        intent: snapshot.intent(record),
        generation,
        join_cursor,
        watermark: watermark_use,
        forgotten,
    })))
}

fn choose_join_cursor(
    watermark: Option<u64>,
    frontier: u64,
    leave_floor: Option<u64>,
) -> (u64, WatermarkUse) {
    let floor = leave_floor.unwrap_or(0);
    match watermark {
        None => (frontier.max(floor), WatermarkUse::NotGiven),
        Some(w) if w > frontier => (frontier.max(floor), WatermarkUse::CappedAtFrontier),
        Some(w) if w < floor => (floor, WatermarkUse::RaisedToLeaveCursor),
        Some(w) => (w, WatermarkUse::Honoured),
    }
}

// ---------------------------------------------------------------------------------------------
// Tombstone
// ---------------------------------------------------------------------------------------------

/// What a leave must do (`tombstoneMember`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TombstonePlan {
    /// No record: nothing to do (the reference returns undefined; the control reply says
    /// `alreadyLeft`).
    NoRecord,
    /// Already tombstoned at a leave cursor ≤ the requested one: nothing to write.
    AlreadyTombstoned {
        /// The stored generation.
        generation: u64,
        /// The stored leave cursor.
        leave_cursor: u64,
    },
    /// Write the tombstone.
    Write(WriteIntent),
}

/// Plans a tombstone at `leave_cursor` (`tombstoneMember`).
///
/// - No record → [`TombstonePlan::NoRecord`].
/// - Stale-leave guard: `expected_generation`, when given, must equal the stored generation
///   (a leave belongs to the generation it joined with, I16).
/// - Idempotent: a stored leave cursor ≤ `leave_cursor` is kept ([`TombstonePlan::AlreadyTombstoned`]);
///   a tombstone can only **lower** a leave cursor (I14).
/// - Otherwise `{...cur, state:"live-confirmed", leaveCursor, writerIdentity, updatedAt}`,
///   generation kept; the interval moves into the history at the next rejoin.
///
/// # Errors
///
/// [`RegistryError::Fenced`], [`RegistryError::StaleMembershipWrite`].
pub fn plan_tombstone(
    snapshot: &MemberSnapshot,
    leave_cursor: u64,
    expected_generation: Option<u64>,
    writer: &Writer,
    now: UnixMillis,
) -> Result<TombstonePlan, RegistryError> {
    let Some(cur) = snapshot.record() else {
        return Ok(TombstonePlan::NoRecord);
    };
    snapshot.check_fence(writer)?;
    if let Some(g) = expected_generation
        && g != cur.generation
    {
        return Err(snapshot.stale(g, cur.generation));
    }
    if let Some(l) = cur.leave_cursor
        && l <= leave_cursor
    {
        return Ok(TombstonePlan::AlreadyTombstoned {
            generation: cur.generation,
            leave_cursor: l,
        });
    }
    let mut next = cur.clone();
    next.state = MemberState::LiveConfirmed;
    next.leave_cursor = Some(leave_cursor);
    next.writer_identity.clone_from(&writer.identity);
    next.updated_at = now;
    stamp_fence(&mut next, writer);
    Ok(TombstonePlan::Write(snapshot.intent(next)))
}

// ---------------------------------------------------------------------------------------------
// Activation
// ---------------------------------------------------------------------------------------------

/// Why an activation found the pending join superseded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Superseded {
    /// The record is gone.
    NoRecord,
    /// A rejoin moved the generation.
    GenerationMoved {
        /// The stored generation.
        current: u64,
    },
    /// The join cursor differs from the one captured.
    JoinCursorMoved {
        /// The stored join cursor.
        current: u64,
    },
    /// A same-generation leave tombstoned it.
    Tombstoned {
        /// The stored leave cursor.
        leave_cursor: u64,
    },
    /// The record is not `durable-active`.
    NotDurableActive,
}

/// What an activation must do (`activateMember`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActivatePlan {
    /// The pending join was superseded: report `durable:false`, "activation superseded by a
    /// concurrent leave or rejoin".
    Superseded(Superseded),
    /// Already activated: nothing to write.
    AlreadyActive,
    /// Write `{...cur, activated:true, updatedAt}`.
    Write(WriteIntent),
}

/// Plans the activation flip for the pending join `(expected_generation, expected_join_cursor)`.
///
/// Never clears a leave cursor, never changes the generation or join cursor (I17): any of those
/// having moved is [`ActivatePlan::Superseded`]. `writerIdentity` is kept, as the reference does;
/// the fence is stamped.
///
/// # Errors
///
/// [`RegistryError::Fenced`].
pub fn plan_activate(
    snapshot: &MemberSnapshot,
    expected_generation: u64,
    expected_join_cursor: u64,
    writer: &Writer,
    now: UnixMillis,
) -> Result<ActivatePlan, RegistryError> {
    let Some(cur) = snapshot.record() else {
        return Ok(ActivatePlan::Superseded(Superseded::NoRecord));
    };
    snapshot.check_fence(writer)?;
    let superseded = if cur.generation != expected_generation {
        Some(Superseded::GenerationMoved {
            current: cur.generation,
        })
    } else if cur.join_cursor != expected_join_cursor {
        Some(Superseded::JoinCursorMoved {
            current: cur.join_cursor,
        })
    } else if let Some(l) = cur.leave_cursor {
        Some(Superseded::Tombstoned { leave_cursor: l })
    } else if cur.state != MemberState::DurableActive {
        Some(Superseded::NotDurableActive)
    } else {
        None
    };
    if let Some(s) = superseded {
        return Ok(ActivatePlan::Superseded(s));
    }
    if cur.is_activated() {
        return Ok(ActivatePlan::AlreadyActive);
    }
    let mut next = cur.clone();
    next.activated = Some(true);
    next.updated_at = now;
    stamp_fence(&mut next, writer);
    Ok(ActivatePlan::Write(snapshot.intent(next)))
}

#[cfg(test)]
mod tests;
