//! The operation contract shared by every machine: operation ids, outcomes, and named timers.
//!
//! Every command a machine emits that can fail carries an [`OpId`]. The driver executes it and
//! answers with the same id and an [`Outcome`]:
//!
//! - [`Outcome::Success`]: the effect happened, with its result;
//! - [`Outcome::Failed`]: it did not happen, for a typed [`Failure`] reason (no responders, a
//!   compare-and-set conflict, a permission refusal, a timeout that the broker confirmed …);
//! - [`Outcome::Unknown`]: the driver cannot tell (the connection died while the command was in
//!   flight, a publish acknowledgement never came). The machine must stay correct whether or not
//!   the effect happened: it re-reads before it re-plans, and it never reports success it has not
//!   seen (design rules R10, R11).
//!
//! Machines decide deadlines with a [`TimerTable`] of named timers on the core's own clock
//! ([`crate::time::Instant`]), so `poll_timeout` is one lookup and never walks every child (R14).

use crate::time::Instant;
use std::collections::BTreeMap;
use std::fmt;

/// The id of one command that expects a completion. Allocated by the machine that emitted the
/// command, unique for the machine's lifetime, increasing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(u64);

impl OpId {
    /// The raw number, for logs and driver-side maps.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// An id with the given number. Drivers and tests use this to name an id they were given;
    /// machines allocate new ids through an [`OpIds`] allocator.
    pub const fn from_raw(raw: u64) -> Self {
        OpId(raw)
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

/// Allocates [`OpId`]s for one machine: 1, 2, 3 … (0 is never handed out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpIds {
    last: u64,
}

impl OpIds {
    /// A fresh allocator.
    pub const fn new() -> Self {
        OpIds { last: 0 }
    }

    /// The next id.
    ///
    /// # Panics
    ///
    /// After 2^64 − 1 allocations, which no machine can reach (a bug, not an input).
    pub fn next_id(&mut self) -> OpId {
        self.last = self
            .last
            .checked_add(1)
            .expect("operation ids exhausted (2^64 allocations)");
        OpId(self.last)
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "an outcome decides the machine's next step; ignoring it loses the decision"]
pub enum Outcome<T> {
    /// The effect happened; here is its result.
    Success(T),
    /// The effect did not happen, for this reason.
    Failed(Failure),
    /// The driver cannot tell whether the effect happened (connection lost mid-flight, no
    /// acknowledgement). The machine treats the effect as possibly applied.
    Unknown,
}

impl<T> Outcome<T> {
    /// Maps the success value, keeping failures and unknowns.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Success(v) => Outcome::Success(f(v)),
            Outcome::Failed(e) => Outcome::Failed(e),
            Outcome::Unknown => Outcome::Unknown,
        }
    }

    /// The success value, if any.
    pub fn success(self) -> Option<T> {
        match self {
            Outcome::Success(v) => Some(v),
            _ => None,
        }
    }

    /// True for [`Outcome::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success(_))
    }
}

/// Why a command did not take effect. Drivers map every client-library error onto one of these;
/// anything that does not fit goes into [`Failure::Other`] with the library's own words, never
/// silently into a success.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// A request found no responder (NATS status 503): e.g. no delivery daemon is running.
    NoResponders,
    /// No answer within the command's timeout, and the driver knows the request was not
    /// processed (otherwise it reports [`Outcome::Unknown`]).
    Timeout,
    /// The broker refused the operation for this user's permissions.
    PermissionDenied {
        /// The broker's words, e.g. `Permissions Violation for Publish to "…"`.
        detail: String,
    },
    /// A compare-and-set write found another revision than the one it expected.
    WrongLastRevision {
        /// The revision the broker reported as current, when it said so.
        current: Option<u64>,
    },
    /// A create-only write found the key already present.
    AlreadyExists,
    /// The stream, consumer, key or message does not exist.
    NotFound,
    /// The broker or a service answered with an error of its own (JetStream API error, a
    /// `ctl.delivery` reply with `ok:false`).
    Rejected {
        /// The numeric error code, when there is one (JetStream `err_code`).
        code: Option<u32>,
        /// The description given.
        description: String,
    },
    /// A failure that fits no other kind, in the client library's words.
    Other {
        /// What happened.
        description: String,
    },
}

impl Failure {
    /// True when retrying the same command later can succeed without anything else changing:
    /// no responders (a daemon may start), timeouts, and unclassified failures. Permission
    /// refusals, conflicts and explicit rejections are not transient: the machine must re-read
    /// or give up and report.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Failure::NoResponders | Failure::Timeout | Failure::Other { .. }
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoResponders => write!(f, "no responders"),
            Failure::Timeout => write!(f, "timed out"),
            Failure::PermissionDenied { detail } => write!(f, "permission denied: {detail}"),
            Failure::WrongLastRevision { current: Some(rev) } => {
                write!(f, "wrong last revision (current {rev})")
            }
            Failure::WrongLastRevision { current: None } => write!(f, "wrong last revision"),
            Failure::AlreadyExists => write!(f, "already exists"),
            Failure::NotFound => write!(f, "not found"),
            Failure::Rejected {
                code: Some(code),
                description,
            } => write!(f, "rejected ({code}): {description}"),
            Failure::Rejected {
                code: None,
                description,
            } => write!(f, "rejected: {description}"),
            Failure::Other { description } => f.write_str(description),
        }
    }
}

impl std::error::Error for Failure {}

/// A table of named deadlines: at most one deadline per key, and the earliest in O(log n).
///
/// Keys name what the deadline is for (a child's backoff retry, a lease renew, a confirm
/// settle …), so `poll_timeout` can say *why* the machine wants to wake up (R14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimerTable<K: Ord + Clone> {
    by_key: BTreeMap<K, Instant>,
    by_deadline: BTreeMap<(Instant, K), ()>,
}

impl<K: Ord + Clone> Default for TimerTable<K> {
    fn default() -> Self {
        TimerTable {
            by_key: BTreeMap::new(),
            by_deadline: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> TimerTable<K> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or moves) the deadline of `key`.
    pub fn set(&mut self, key: K, at: Instant) {
        if let Some(old) = self.by_key.insert(key.clone(), at) {
            self.by_deadline.remove(&(old, key.clone()));
        }
        self.by_deadline.insert((at, key), ());
    }

    /// Removes the deadline of `key`, returning it if there was one.
    pub fn cancel(&mut self, key: &K) -> Option<Instant> {
        let at = self.by_key.remove(key)?;
        self.by_deadline.remove(&(at, key.clone()));
        Some(at)
    }

    /// The deadline of `key`, if set.
    pub fn get(&self, key: &K) -> Option<Instant> {
        self.by_key.get(key).copied()
    }

    /// The earliest deadline and its key.
    pub fn next(&self) -> Option<(Instant, &K)> {
        self.by_deadline.keys().next().map(|(at, k)| (*at, k))
    }

    /// Removes and returns the earliest key whose deadline is at or before `now`.
    ///
    /// Call it in a loop from `handle_timeout(now)`: every expired timer comes out exactly once,
    /// in deadline order (ties by key order), and none that is still in the future.
    pub fn pop_expired(&mut self, now: Instant) -> Option<K> {
        let (at, key) = self.by_deadline.keys().next()?.clone();
        if at > now {
            return None;
        }
        self.by_deadline.remove(&(at, key.clone()));
        self.by_key.remove(&key);
        Some(key)
    }

    /// How many timers are set.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when no timer is set.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn op_ids_start_at_one_and_increase() {
        let mut ids = OpIds::new();
        let a = ids.next_id();
        let b = ids.next_id();
        assert_eq!(a.get(), 1);
        assert!(b > a);
        assert_eq!(b.to_string(), "op#2");
    }

    #[test]
    fn outcome_helpers_keep_failures_and_unknowns() {
        let ok: Outcome<u64> = Outcome::Success(41);
        assert_eq!(ok.clone().map(|v| v + 1), Outcome::Success(42));
        let failed: Outcome<u64> = Outcome::Failed(Failure::NoResponders);
        assert_eq!(
            failed.clone().map(|v| v + 1),
            Outcome::Failed(Failure::NoResponders)
        );
        assert_eq!(Outcome::<u64>::Unknown.map(|v| v + 1), Outcome::Unknown);
        assert_eq!(failed.success(), None);
        assert!(ok.is_success());
    }

    #[test]
    fn transient_failures_are_the_retryable_ones() {
        assert!(Failure::NoResponders.is_transient());
        assert!(Failure::Timeout.is_transient());
        assert!(!Failure::WrongLastRevision { current: Some(3) }.is_transient());
        assert!(!Failure::PermissionDenied { detail: "x".into() }.is_transient());
        assert_eq!(
            Failure::WrongLastRevision { current: Some(7) }.to_string(),
            "wrong last revision (current 7)"
        );
    }

    #[test]
    fn timers_move_cancel_and_expire_in_order() {
        let mut t = TimerTable::new();
        t.set("renew", Instant::from_millis(30));
        t.set("settle", Instant::from_millis(10));
        t.set("renew", Instant::from_millis(20)); // moved, not duplicated
        assert_eq!(t.len(), 2);
        assert_eq!(t.next(), Some((Instant::from_millis(10), &"settle")));
        assert_eq!(t.pop_expired(Instant::from_millis(9)), None);
        assert_eq!(t.pop_expired(Instant::from_millis(25)), Some("settle"));
        assert_eq!(t.pop_expired(Instant::from_millis(25)), Some("renew"));
        assert_eq!(t.pop_expired(Instant::from_millis(25)), None);
        t.set("x", Instant::from_millis(5));
        assert_eq!(t.cancel(&"x"), Some(Instant::from_millis(5)));
        assert!(t.is_empty());
        assert_eq!(t.next(), None);
    }

    proptest! {
        /// The table agrees with a plain map model under any sequence of set / cancel / pop.
        #[test]
        fn timer_table_matches_a_map_model(ops in proptest::collection::vec((0u8..3, 0u8..6, 0u64..50), 0..80)) {
            let mut table = TimerTable::new();
            let mut model: BTreeMap<u8, Instant> = BTreeMap::new();
            for (op, key, t) in ops {
                let at = Instant::from_millis(t);
                match op {
                    0 => { table.set(key, at); model.insert(key, at); }
                    1 => { prop_assert_eq!(table.cancel(&key), model.remove(&key)); }
                    _ => {
                        let expected = model
                            .iter()
                            .filter(|(_, d)| **d <= at)
                            .min_by_key(|(k, d)| (**d, **k))
                            .map(|(k, _)| *k);
                        let got = table.pop_expired(at);
                        prop_assert_eq!(got, expected);
                        if let Some(k) = got { model.remove(&k); }
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                let earliest = model.iter().min_by_key(|(k, d)| (**d, **k)).map(|(k, d)| (*d, *k));
                prop_assert_eq!(table.next().map(|(d, k)| (d, *k)), earliest);
            }
        }
    }
}
