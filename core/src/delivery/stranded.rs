//! Stranded deliveries: CHAT messages the fan-out consumer offered to a feed that is gone, which
//! nobody settled.
//!
//! JetStream offers a durable's message again only when its `ack_wait` ran out (60 s for the
//! fan-out durable, `STRM:fanoutDurableConfig`). A pull the server answered just before it
//! stopped, a connection that dropped with deliveries on the wire, a daemon killed while it
//! held a window of them: in each case the messages are pending on the consumer and no live
//! feed holds them, so their copies wait a whole `ack_wait`. `cotal chaos` measured it: after a
//! 3 s server stop the last owed copy landed 56 s after the restart, although the daemon served
//! again 3 s after it.
//!
//! The rule: when the fan-out durable is bound, its position says what may be stranded: every
//! sequence above the ack floor up to the delivery pointer that this daemon does not hold. The
//! daemon reads that range from CHAT ([`stranded_range`] bounds it) and fans each message out at
//! once, with nothing to settle. The consumer's own redelivery still comes later and is fanned
//! out again: each copy carries the same msg-id (`<msg.id>:<owner>:<generation>`), so the DLV
//! stream's duplicate window (2 h) collapses it, and that redelivery is the one acked. Reading
//! ahead is therefore only ever an acceleration: a read that fails, or a range this bound cuts,
//! leaves the message to the redelivery as before, and nothing is lost or reported.
//!
//! What it costs: sequences in the range that were acked already (an ack above the floor) are
//! read and written again, and collapse the same way; a range of only settled deliveries
//! (`num_ack_pending` 0) is not read at all.

use super::gap::SeqRange;

/// The most CHAT sequences read back at one bind: the newest this many below the delivery
/// pointer. The fan-out window keeps at most [`DEFAULT_FANOUT_WINDOW`] deliveries unsettled, so
/// a feed that died strands at most that many near the pointer; an older pending message is one
/// the daemon naked with a delay (a hold that gave up), which its redelivery serves.
///
/// [`DEFAULT_FANOUT_WINDOW`]: super::daemon::DEFAULT_FANOUT_WINDOW
pub const STRANDED_SPAN_MAX: u64 = 1024;

/// The CHAT range worth reading back when the fan-out durable is bound with its delivery pointer
/// at `delivered`, its ack floor at `ack_floor` and `ack_pending` deliveries unsettled: `None`
/// when nothing is pending; else `ack_floor + 1 ..= delivered`, cut to its newest
/// [`STRANDED_SPAN_MAX`] sequences.
pub fn stranded_range(delivered: u64, ack_floor: u64, ack_pending: u64) -> Option<SeqRange> {
    if ack_pending == 0 {
        return None;
    }
    let first = ack_floor
        .saturating_add(1)
        .max(delivered.saturating_sub(STRANDED_SPAN_MAX - 1));
    SeqRange::new(first.max(1), delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_pending_reads_nothing() {
        assert_eq!(stranded_range(50, 10, 0), None);
        assert_eq!(stranded_range(0, 0, 0), None);
    }

    #[test]
    fn the_range_runs_from_above_the_floor_to_the_pointer() {
        assert_eq!(stranded_range(50, 10, 3), SeqRange::new(11, 50));
        assert_eq!(stranded_range(11, 10, 1), SeqRange::new(11, 11));
    }

    #[test]
    fn a_floor_at_or_past_the_pointer_reads_nothing() {
        // A server that reports pending deliveries with its floor at the pointer is
        // inconsistent; there is nothing above the floor to read.
        assert_eq!(stranded_range(10, 10, 2), None);
        assert_eq!(stranded_range(10, 12, 2), None);
    }

    #[test]
    fn a_long_span_keeps_its_newest_sequences() {
        let r = stranded_range(10_000, 0, 5).expect("pending");
        assert_eq!((r.first, r.last), (10_000 - STRANDED_SPAN_MAX + 1, 10_000));
        assert_eq!(r.len(), STRANDED_SPAN_MAX);
        let r = stranded_range(STRANDED_SPAN_MAX, 0, 5).expect("pending");
        assert_eq!(r.first, 1, "sequence 0 is never read");
    }
}
