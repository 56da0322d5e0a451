//! Sequence continuity of the fan-out: CHAT messages that left the stream before fan-out was
//! offered them.
//!
//! The fan-out durable filters the whole CHAT stream (`cotal.<space>.chat.>` is the stream's only
//! subject), so JetStream offers it every stored sequence once, in ascending order; a message
//! offered again (nak, ack-wait expiry, a feed that died holding it) comes back as a
//! *redelivery*, below the consumer's delivery pointer. CHAT keeps [`MAX_MSGS_PER_SUBJECT`]
//! messages per subject with discard-old: a sender that outruns a lagging fan-out pushes its
//! oldest messages out of the stream before fan-out reaches them, and the consumer steps over
//! them without a word. Nobody routed them, so no member gets its durable copy: the reference
//! loses them silently, and so did this daemon until `cotal bench` caught a burst of 2,000
//! messages from one sender leaving 600 of them unrouted with the fan-out consumer fully acked.
//!
//! [`SequenceCursor`] is the one place that notices: it remembers the lowest sequence fan-out has
//! not been offered yet, and a delivery above it reveals the range in between as *skipped*. A skip
//! is not yet a loss: a pull of an earlier feed session (or of a consumer leader that moved) may
//! have taken those messages, and they come back as redeliveries after the consumer's
//! `ack_wait`. So the daemon reads the skipped range from CHAT; what CHAT still holds is fanned
//! out at once, as a read-back ([`super::stranded`]), and every sequence CHAT no longer holds is
//! a loss ([`missing`]), reported as
//! [`DeliveryEvent::EvictedBeforeFanout`](super::daemon::DeliveryEvent::EvictedBeforeFanout) and
//! counted. A check that cannot be made is reported as possibly lost, never dropped.
//!
//! Where the cursor starts: the consumer's delivery pointer when the feed is bound
//! ([`Reply::ConsumerBound`](crate::io::Reply::ConsumerBound)), so a daemon that starts (or
//! restarts) after CHAT evicted messages the durable never delivered still sees the jump. A driver
//! that cannot tell leaves the cursor to start at the first delivery.
//!
//! What it cannot see: a message the consumer delivered (to a feed that then died) and that CHAT
//! evicted before its redelivery. JetStream drops it from the consumer's pending set. The cursor
//! counts it as offered; the window is one ack-wait, and only for deliveries a lost feed held.
//!
//! [`MAX_MSGS_PER_SUBJECT`]: crate::constants::MAX_MSGS_PER_SUBJECT

/// An inclusive range of stream sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqRange {
    /// The first sequence.
    pub first: u64,
    /// The last sequence (`≥ first`).
    pub last: u64,
}

impl SeqRange {
    /// `first..=last`; `None` when `last < first`.
    pub fn new(first: u64, last: u64) -> Option<Self> {
        (first <= last).then_some(SeqRange { first, last })
    }

    /// How many sequences it holds.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Never empty; here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The lowest CHAT sequence the fan-out has not been offered yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SequenceCursor {
    next: Option<u64>,
}

impl SequenceCursor {
    /// A cursor that starts at the first delivery.
    pub fn new() -> Self {
        SequenceCursor::default()
    }

    /// The next sequence expected, once known.
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// The consumer was bound with its delivery pointer at `delivered` (the last stream sequence
    /// it has offered to anyone). The next first delivery is `delivered + 1`; if this machine has
    /// not been offered everything up to the pointer (a feed that died holding deliveries), the
    /// cursor stays lower, so the next delivery checks that range too.
    pub fn bound(&mut self, delivered: u64) {
        let pointer = delivered.saturating_add(1);
        self.next = Some(match self.next {
            Some(n) => n.min(pointer),
            None => pointer,
        });
    }

    /// Fan-out was offered `seq`. Returns the range it stepped over, if any. A sequence below the
    /// cursor is a redelivery and changes nothing.
    pub fn offered(&mut self, seq: u64) -> Option<SeqRange> {
        let next = self.next.unwrap_or(seq);
        if seq < next {
            return None;
        }
        self.next = Some(seq.saturating_add(1));
        SeqRange::new(next, seq.checked_sub(1)?)
    }
}

/// The sub-ranges of `range` whose sequences are not in `present` (ascending or not; values
/// outside `range` are ignored).
pub fn missing(range: SeqRange, present: impl IntoIterator<Item = u64>) -> Vec<SeqRange> {
    let mut held: Vec<u64> = present
        .into_iter()
        .filter(|s| (range.first..=range.last).contains(s))
        .collect();
    held.sort_unstable();
    held.dedup();
    let mut out = Vec::new();
    let mut from = range.first;
    for s in held {
        if s > from {
            out.push(SeqRange {
                first: from,
                last: s - 1,
            });
        }
        from = s + 1;
    }
    if let Some(r) = SeqRange::new(from, range.last) {
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(first: u64, last: u64) -> SeqRange {
        SeqRange::new(first, last).unwrap()
    }

    #[test]
    fn a_fresh_cursor_starts_at_the_first_delivery() {
        let mut c = SequenceCursor::new();
        assert_eq!(c.offered(40), None);
        assert_eq!(c.offered(41), None);
        assert_eq!(c.offered(45), Some(r(42, 44)));
        assert_eq!(c.next(), Some(46));
    }

    #[test]
    fn a_zero_sequence_from_a_broken_driver_is_no_gap_and_no_panic() {
        let mut c = SequenceCursor::new();
        assert_eq!(c.offered(0), None);
        assert_eq!(c.offered(0), None);
        assert_eq!(c.offered(2), Some(r(1, 1)));
    }

    #[test]
    fn redeliveries_below_the_cursor_change_nothing() {
        let mut c = SequenceCursor::new();
        c.offered(10);
        assert_eq!(c.offered(3), None);
        assert_eq!(c.next(), Some(11));
        assert_eq!(c.offered(11), None);
    }

    #[test]
    fn the_bind_pointer_reveals_what_was_evicted_before_this_daemon_started() {
        let mut c = SequenceCursor::new();
        c.bound(100);
        assert_eq!(c.offered(150), Some(r(101, 149)));
    }

    #[test]
    fn a_rebind_keeps_the_range_a_dead_feed_held_under_check() {
        let mut c = SequenceCursor::new();
        c.offered(10);
        // The old feed took 11..=20 and died; the consumer's pointer is at 20.
        c.bound(20);
        assert_eq!(c.next(), Some(11));
        // 11..=20 come back as redeliveries or were evicted: the read decides.
        assert_eq!(c.offered(21), Some(r(11, 20)));
    }

    #[test]
    fn a_pointer_below_the_cursor_is_authoritative() {
        // The durable was deleted and recreated: it offers from its new pointer.
        let mut c = SequenceCursor::new();
        c.offered(50);
        c.bound(30);
        assert_eq!(c.next(), Some(31));
        assert_eq!(c.offered(31), None);
    }

    #[test]
    fn missing_names_the_holes_between_held_sequences() {
        assert_eq!(missing(r(5, 9), []), vec![r(5, 9)]);
        assert_eq!(missing(r(5, 9), [5, 6, 7, 8, 9]), Vec::<SeqRange>::new());
        assert_eq!(missing(r(5, 9), [7]), vec![r(5, 6), r(8, 9)]);
        assert_eq!(missing(r(5, 9), [9, 5, 5, 100, 1]), vec![r(6, 8)]);
    }

    proptest! {
        /// The holes and the held sequences partition the range exactly.
        #[test]
        fn missing_partitions_the_range(first in 0u64..50, len in 1u64..40, held in proptest::collection::vec(0u64..100, 0..30)) {
            let range = r(first, first + len - 1);
            let holes = missing(range, held.iter().copied());
            let mut covered = std::collections::BTreeSet::new();
            for h in &holes {
                prop_assert!(h.first >= range.first && h.last <= range.last);
                for s in h.first..=h.last {
                    prop_assert!(covered.insert(s), "holes overlap at {}", s);
                    prop_assert!(!held.contains(&s));
                }
            }
            for s in range.first..=range.last {
                prop_assert_eq!(covered.contains(&s), !held.contains(&s));
            }
        }

        /// Offering any ascending subset of sequences reports exactly the sequences not offered.
        #[test]
        fn the_cursor_reports_exactly_what_was_stepped_over(offered in proptest::collection::btree_set(1u64..200, 1..60)) {
            let mut c = SequenceCursor::new();
            c.bound(0);
            let mut skipped = std::collections::BTreeSet::new();
            for &s in &offered {
                if let Some(g) = c.offered(s) {
                    skipped.extend(g.first..=g.last);
                }
            }
            let top = *offered.iter().next_back().unwrap();
            let expected: std::collections::BTreeSet<u64> =
                (1..=top).filter(|s| !offered.contains(s)).collect();
            prop_assert_eq!(skipped, expected);
        }
    }
}
