//! Membership intervals and **the one interval check**: a member's current interval
//! `(joinCursor, leaveCursor]` of its generation, the closed intervals of earlier generations
//! kept in the record (G2, capped at [`INTERVAL_HISTORY_CAP`]), and the eligibility of a copy of
//! sequence `seq` for a generation ([`durable_eligible`], [`generation_eligible`]). Every reader
//! decision and every routing decision goes through these functions.

use crate::wire::json;
use crate::wire::message::Extra;
use crate::wire::records::{MemberState, MembershipRecord};
use serde_json::{Map, Value};

/// Extra field holding the closed intervals of earlier generations (G2).
pub const CLOSED_INTERVALS_FIELD: &str = "closedIntervals";
/// Extra field counting the closed intervals that fell off [`INTERVAL_HISTORY_CAP`].
pub const FORGOTTEN_INTERVALS_FIELD: &str = "forgottenIntervals";
/// How many closed intervals a record keeps. Older ones are forgotten: entries of their
/// generations are dropped (fail closed) and counted.
///
/// Eight covers any realistic leave/rejoin churn within the INBOX backlog of one owner (entries
/// pending longer than eight rejoins are far beyond the reader's normal latency), and keeps the
/// record well under 1 KiB.
pub const INTERVAL_HISTORY_CAP: usize = 8;

// ---------------------------------------------------------------------------------------------
// Intervals and the one interval check
// ---------------------------------------------------------------------------------------------

/// The delivery interval of one generation: CHAT sequences `s` with
/// `join_cursor < s ≤ leave_cursor` (no upper bound while the leave cursor is absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval {
    /// The generation this interval belongs to.
    pub generation: u64,
    /// The join cursor: the interval starts after it.
    pub join_cursor: u64,
    /// The leave cursor: the last sequence of the interval, or `None` while open.
    pub leave_cursor: Option<u64>,
}

impl Interval {
    /// The one interval predicate (`durableEligible`): `join_cursor < seq ≤ leave_cursor`.
    pub fn contains(&self, seq: u64) -> bool {
        seq > self.join_cursor && self.leave_cursor.is_none_or(|l| seq <= l)
    }
}

/// A closed interval kept in a record's history: one element of `"closedIntervals"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClosedInterval {
    /// Its generation.
    pub generation: u64,
    /// Its join cursor.
    pub join_cursor: u64,
    /// Its leave cursor.
    pub leave_cursor: u64,
}

impl ClosedInterval {
    /// As an [`Interval`].
    pub fn interval(&self) -> Interval {
        Interval {
            generation: self.generation,
            join_cursor: self.join_cursor,
            leave_cursor: Some(self.leave_cursor),
        }
    }

    fn to_json(self) -> Value {
        let mut m = Map::new();
        m.insert("generation".into(), self.generation.into());
        m.insert("joinCursor".into(), self.join_cursor.into());
        m.insert("leaveCursor".into(), self.leave_cursor.into());
        Value::Object(m)
    }

    fn from_json(v: &Value) -> Option<Self> {
        let o = v.as_object()?;
        let num = |k: &str| match o.get(k) {
            Some(Value::Number(n)) => json::uint_from_number(n),
            _ => None,
        };
        Some(ClosedInterval {
            generation: num("generation")?,
            join_cursor: num("joinCursor")?,
            leave_cursor: num("leaveCursor")?,
        })
    }
}

/// The record's open membership: `state:"durable-active"` and no leave cursor (pending or
/// activated). A join over an open record reuses its window and generation.
pub fn is_open(rec: &MembershipRecord) -> bool {
    rec.state == MemberState::DurableActive && rec.leave_cursor.is_none()
}

/// The interval of the record's current generation, if the record routes at all.
///
/// G26: a `durable-active` record routes, and so does any record with a leave cursor (a
/// tombstone still delivers its pre-leave window). A `live-confirmed` record **without** a leave
/// cursor never routes (`None`). `activated` plays no part (B15).
pub fn current_interval(rec: &MembershipRecord) -> Option<Interval> {
    let routes = rec.state == MemberState::DurableActive || rec.leave_cursor.is_some();
    routes.then_some(Interval {
        generation: rec.generation,
        join_cursor: rec.join_cursor,
        leave_cursor: rec.leave_cursor,
    })
}

/// The one interval check, on the record's current generation: what fan-out routes by.
///
/// `joinCursor < seq ≤ leaveCursor` (leave cursor absent = open), and, fixing G26, only for a
/// record that routes (see [`current_interval`]).
pub fn durable_eligible(rec: &MembershipRecord, seq: u64) -> bool {
    current_interval(rec).is_some_and(|i| i.contains(seq))
}

/// Where a generation's interval was found in a record (see [`lookup_generation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IntervalLookup {
    /// The record's current generation, and it routes.
    Current(Interval),
    /// The record's current generation, but it never routes (`live-confirmed` without a leave
    /// cursor, G26).
    Inert,
    /// An earlier generation, kept in the history.
    Historical(Interval),
    /// An earlier generation whose interval fell off the history cap: fail closed, count it.
    Forgotten,
    /// A generation this record knows nothing of (never ours, newer than the record, or the
    /// history was lost to a writer that does not keep it): fail closed.
    Unknown,
}

impl IntervalLookup {
    /// The interval, when one is known.
    pub fn interval(&self) -> Option<Interval> {
        match self {
            IntervalLookup::Current(i) | IntervalLookup::Historical(i) => Some(*i),
            _ => None,
        }
    }
}

/// Finds the interval of `generation` in `rec`: the current one or one in the history (G2).
pub fn lookup_generation(rec: &MembershipRecord, generation: u64) -> IntervalLookup {
    if generation == rec.generation {
        return current_interval(rec).map_or(IntervalLookup::Inert, IntervalLookup::Current);
    }
    if generation > rec.generation {
        return IntervalLookup::Unknown;
    }
    let history = closed_intervals(rec);
    if let Some(c) = history.iter().find(|c| c.generation == generation) {
        return IntervalLookup::Historical(c.interval());
    }
    let older_than_kept = history.first().is_none_or(|c| generation < c.generation);
    if older_than_kept && forgotten_intervals(rec) > 0 {
        IntervalLookup::Forgotten
    } else {
        IntervalLookup::Unknown
    }
}

/// The interval check for an entry of generation `generation` (the G2 fix): true iff `seq` lies
/// in the interval of that generation, current or historical.
pub fn generation_eligible(rec: &MembershipRecord, generation: u64, seq: u64) -> bool {
    lookup_generation(rec, generation)
        .interval()
        .is_some_and(|i| i.contains(seq))
}

/// The closed intervals kept in `rec`, oldest first.
///
/// Fail closed on anything odd: a missing or malformed field reads as no history, malformed
/// elements are skipped, and elements whose generation is not below the record's generation are
/// ignored (a record never holds history of its own or a later generation).
pub fn closed_intervals(rec: &MembershipRecord) -> Vec<ClosedInterval> {
    let Some(Value::Array(items)) = rec.extra.get(CLOSED_INTERVALS_FIELD) else {
        return Vec::new();
    };
    let mut out: Vec<ClosedInterval> = items
        .iter()
        .filter_map(ClosedInterval::from_json)
        .filter(|c| c.generation < rec.generation)
        .collect();
    out.sort();
    out.dedup_by_key(|c| c.generation);
    out
}

/// How many closed intervals of `rec` fell off the history cap (0 when absent or malformed).
pub fn forgotten_intervals(rec: &MembershipRecord) -> u64 {
    match rec.extra.get(FORGOTTEN_INTERVALS_FIELD) {
        Some(Value::Number(n)) => json::uint_from_number(n).unwrap_or(0),
        _ => 0,
    }
}

pub(super) fn set_history(extra: &mut Extra, history: &[ClosedInterval], forgotten: u64) {
    if history.is_empty() {
        extra.remove(CLOSED_INTERVALS_FIELD);
    } else {
        let items = history.iter().map(|c| c.to_json()).collect();
        extra.insert(CLOSED_INTERVALS_FIELD.into(), Value::Array(items));
    }
    if forgotten == 0 {
        extra.remove(FORGOTTEN_INTERVALS_FIELD);
    } else {
        extra.insert(FORGOTTEN_INTERVALS_FIELD.into(), forgotten.into());
    }
}

/// Appends `closed` to `history`, trims to the cap, and returns the forgotten ones.
pub(super) fn push_history(
    history: &mut Vec<ClosedInterval>,
    closed: ClosedInterval,
) -> Vec<ClosedInterval> {
    history.retain(|c| c.generation != closed.generation);
    history.push(closed);
    history.sort();
    let excess = history.len().saturating_sub(INTERVAL_HISTORY_CAP);
    history.drain(..excess).collect()
}
