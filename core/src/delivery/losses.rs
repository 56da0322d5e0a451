//! The loss ledger: what a member lost, kept where the member can read it (issue 21 item 5).
//!
//! Every loss the daemon reports names a member (the *owner*), a channel and CHAT sequences:
//! a copy shed because the owner's DLV was full ([`LossReason::DlvFull`],
//! [`crate::delivery::backlog`]), an entry the reader gave up on at the redelivery ceiling
//! ([`LossReason::RedeliveryCeiling`], G3), an entry of a generation whose interval the record
//! forgot ([`LossReason::IntervalForgotten`], G2), CHAT messages the stream evicted before
//! fan-out routed them, told to every member whose interval overlaps them
//! ([`LossReason::EvictedBeforeFanout`]). Reporting them on the daemon's side is not
//! enough: the member must learn what it will never receive. So the daemon also folds each one
//! into the owner's [`LossLedger`] and writes it to the owner's key in the losses bucket; the
//! owner's agent reads that key when it connects and every [`LOSS_POLL`] while connected, and
//! reports every range it has not reported yet (an agent event, a health field, one JSON line of
//! `cotal agent`).
//!
//! What is deliberately *not* a loss here: a copy the revocation sweep deleted
//! ([`crate::delivery::revoke`]): the owner's ACL no longer admits it, so the owner was not
//! entitled to it; and a catch-up window found evicted at a join (the join already answers
//! `durable:false` with the range, which the agent reports as the join's outcome).
//!
//! # The carrier
//!
//! A KV record per owner, key `<owner>`, in its own bucket `cotal_losses_<space>` (history 1, no
//! TTL: it survives daemon restarts; `cotal up` creates it). Why there:
//!
//! - **It reaches a member whose DLV is full.** The DLV is the one thing that cannot carry the
//!   notice of its own overflow; a KV record needs no room there.
//! - **It survives a daemon restart.** A daemon reads the stored record before its first write of
//!   an owner in its life and folds its own unwritten losses on top; every write is a CAS on the
//!   revision it read (another writer makes it read and fold again).
//! - **The owner alone may read it.** An agent's credential gets one grant: a direct get pinned to
//!   its own key (`$JS.API.DIRECT.GET.KV_cotal_losses_<s>.$KV.cotal_losses_<s>.<id>`), so no
//!   agent reads another's losses (which would tell it the channels that member is in), and no
//!   agent writes the bucket.
//! - **Reference 0.6.0 agents never read it** (a bucket they do not know), so it cannot confuse
//!   them; an unknown message on their DLV subject could.
//!
//! # Wire format (version 1)
//!
//! ```json
//! {"owner":"bob","stamp":7,
//!  "ranges":[{"stamp":7,"channel":"general","first":751,"last":1010,"count":260,"reason":"dlv-full",
//!    "exact":true}],
//!  "more":{"ranges":0,"count":0}}
//! ```
//!
//! - `ranges`: oldest first, at most [`LOSS_RANGES_MAX`]. A range says: `count` copies of CHAT
//!   sequences in `first..=last` of `channel` were lost for `reason`. `exact` (default true):
//!   every sequence of the range was lost (`count == last - first + 1`); a range only becomes
//!   inexact when the ledger is full and a new loss is folded into the newest range of the same
//!   channel and reason.
//! - `stamp`: the record's change counter; each range carries the stamp of its last change. A
//!   reader that remembers the highest stamp it reported reports exactly the ranges with a higher
//!   one (a range that grew is reported again, whole).
//! - `more`: ranges pushed out of a full ledger (oldest first) and the copies they counted: the
//!   "and more" of the notice.
//! - `reason`: `dlv-full`, `redelivery-ceiling`, `interval-forgotten`, `evicted-before-fanout`
//!   (CHAT sequences, on any channel, evicted before fan-out saw them, clipped to the member's
//!   interval: the channel's share of them is unknown, so `count` is an upper bound); a reader
//!   maps any other value to `other` (a newer writer's reason is still a loss).
//!
//! Unknown fields are ignored by the reader, so later versions may add some.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::io::KvCondition;
use crate::time::Duration;
use crate::wire::AgentId;

/// The most ranges a ledger keeps; past it ranges are folded or pushed out into `more`.
pub const LOSS_RANGES_MAX: usize = 64;

/// How often a connected agent reads its loss record (it also reads it at every connect).
pub const LOSS_POLL: Duration = Duration::from_millis(10_000);

/// Why a member lost copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossReason {
    /// The owner's DLV held the per-owner cap (or the sender's share of it): the copy was shed.
    DlvFull,
    /// The reader gave up on the entry after the redelivery ceiling (G3).
    RedeliveryCeiling,
    /// The entry's generation was pushed off the record's history cap (G2).
    IntervalForgotten,
    /// CHAT evicted the messages before fan-out routed them ([`crate::delivery::gap`]); the
    /// range is the overlap with the member's interval, and which of its sequences were on the
    /// channel is unknown (an upper bound).
    EvictedBeforeFanout,
    /// A reason this reader does not know (written by a newer daemon).
    #[serde(other)]
    Other,
}

impl LossReason {
    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::DlvFull => "dlv-full",
            LossReason::RedeliveryCeiling => "redelivery-ceiling",
            LossReason::IntervalForgotten => "interval-forgotten",
            LossReason::EvictedBeforeFanout => "evicted-before-fanout",
            LossReason::Other => "other",
        }
    }
}

/// One range of lost copies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossRange {
    /// The ledger's stamp at this range's last change.
    pub stamp: u64,
    /// The channel.
    pub channel: String,
    /// The first CHAT sequence.
    pub first: u64,
    /// The last CHAT sequence (`≥ first`).
    pub last: u64,
    /// Copies lost in `first..=last` (all of them when `count == last - first + 1`).
    pub count: u64,
    /// Why.
    pub reason: LossReason,
    /// Every sequence of `first..=last` was lost (`count` is its length); false once a full
    /// ledger folded a loss into it.
    #[serde(default = "yes")]
    pub exact: bool,
}

fn yes() -> bool {
    true
}

impl LossRange {
    /// Whether every sequence of the range was lost.
    pub fn exact(&self) -> bool {
        self.exact
    }

    fn len(&self) -> u64 {
        self.last.saturating_sub(self.first).saturating_add(1)
    }
}

/// What a full ledger pushed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossOverflow {
    /// Ranges pushed out.
    pub ranges: u64,
    /// Copies they counted.
    pub count: u64,
}

/// One owner's losses: bounded ([`LOSS_RANGES_MAX`] ranges plus an overflow count), merged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossLedger {
    /// The owner.
    pub owner: String,
    /// The change counter.
    #[serde(default)]
    pub stamp: u64,
    /// The ranges, oldest first.
    #[serde(default)]
    pub ranges: Vec<LossRange>,
    /// What was pushed out.
    #[serde(default)]
    pub more: LossOverflow,
}

impl LossLedger {
    /// An empty ledger of `owner`.
    pub fn new(owner: &str) -> Self {
        LossLedger {
            owner: owner.to_owned(),
            ..LossLedger::default()
        }
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.more.ranges == 0
    }

    /// Copies lost in all (ranges and overflow).
    pub fn total(&self) -> u64 {
        // Saturating: a record is read from the bucket, and its counts are not ours to trust.
        self.ranges
            .iter()
            .fold(self.more.count, |sum, r| sum.saturating_add(r.count))
    }

    /// One copy of CHAT sequence `seq` on `channel` was lost for `reason`.
    pub fn record(&mut self, channel: &str, seq: u64, reason: LossReason) {
        self.record_range(channel, seq, seq, 1, reason);
    }

    /// `count` copies in `first..=last` of `channel` were lost for `reason` (`count` is clamped
    /// to the range's length, and to at least one; the range is exact when it is the length). Merges with the newest range of the same
    /// channel and reason when they touch; a sequence an exact range already holds is not
    /// counted twice.
    pub fn record_range(
        &mut self,
        channel: &str,
        first: u64,
        last: u64,
        count: u64,
        reason: LossReason,
    ) {
        let (first, last) = (first.min(last), first.max(last));
        let len = (last - first).saturating_add(1);
        let count = count.clamp(1, len.max(1));
        let exact_new = count == len;
        if exact_new
            && self.ranges.iter().any(|r| {
                r.exact
                    && r.channel == channel
                    && r.reason == reason
                    && r.first <= first
                    && last <= r.last
            })
        {
            // Already recorded (a redelivered entry reported twice): counted once.
            return;
        }
        let stamp = self.stamp.saturating_add(1);
        let newest = self
            .ranges
            .iter_mut()
            .rev()
            .find(|r| r.channel == channel && r.reason == reason);
        if let Some(r) = newest
            && r.exact()
            && exact_new
            && first <= r.last.saturating_add(1)
            && last.saturating_add(1) >= r.first
        {
            // Touching or overlapping exact ranges: the union, counted once.
            let (f, l) = (r.first.min(first), r.last.max(last));
            if (f, l) == (r.first, r.last) {
                return;
            }
            r.first = f;
            r.last = l;
            r.count = (l - f).saturating_add(1);
            r.stamp = stamp;
            self.stamp = stamp;
            return;
        }
        if self.ranges.len() >= LOSS_RANGES_MAX
            && let Some(r) = self
                .ranges
                .iter_mut()
                .rev()
                .find(|r| r.channel == channel && r.reason == reason)
        {
            // Full: fold into the newest range of the same kind (it becomes inexact).
            r.first = r.first.min(first);
            r.last = r.last.max(last);
            r.count = r.count.saturating_add(count).min(r.len());
            r.exact = false;
            r.stamp = stamp;
            self.stamp = stamp;
            return;
        }
        self.ranges.push(LossRange {
            stamp,
            channel: channel.to_owned(),
            first,
            last,
            count,
            reason,
            exact: exact_new,
        });
        self.stamp = stamp;
        while self.ranges.len() > LOSS_RANGES_MAX {
            let gone = self.ranges.remove(0);
            self.more.ranges = self.more.ranges.saturating_add(1);
            self.more.count = self.more.count.saturating_add(gone.count);
        }
    }

    /// Folds `other` (losses not written yet) into this ledger (the stored one), range by range,
    /// oldest first, overflow included.
    pub fn absorb(&mut self, other: &LossLedger) {
        for r in &other.ranges {
            self.record_range(&r.channel, r.first, r.last, r.count, r.reason);
        }
        if other.more.ranges > 0 {
            self.more.ranges = self.more.ranges.saturating_add(other.more.ranges);
            self.more.count = self.more.count.saturating_add(other.more.count);
            self.stamp = self.stamp.saturating_add(1);
        }
    }

    /// The ranges changed after `stamp` (what a reader that reported up to `stamp` has not
    /// reported yet).
    pub fn since(&self, stamp: u64) -> Vec<LossRange> {
        self.ranges
            .iter()
            .filter(|r| r.stamp > stamp)
            .cloned()
            .collect()
    }

    /// Copies lost per channel (ranges and nothing of the overflow, which names no channel).
    pub fn per_channel(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for r in &self.ranges {
            let n: &mut u64 = out.entry(r.channel.clone()).or_insert(0);
            *n = n.saturating_add(r.count);
        }
        out
    }

    /// The record's bytes.
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads a record. `None` for bytes that are not a ledger (the caller reports it).
    pub fn decode(bytes: &[u8]) -> Option<LossLedger> {
        serde_json::from_slice(bytes).ok()
    }
}

/// What the daemon must do next for one owner's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeStep {
    /// Read the owner's stored record (KV get of `<owner>` in the losses bucket).
    Read {
        /// The owner.
        owner: AgentId,
    },
    /// Write the owner's record: `value` under `condition`.
    Write {
        /// The owner.
        owner: AgentId,
        /// The record's bytes.
        value: bytes::Bytes,
        /// Create when the key held nothing, else the revision read.
        condition: KvCondition,
    },
}

/// How a read or write of an owner's record ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeOutcome {
    /// Read: the stored record and its revision (`None`: the key holds nothing).
    Read(Option<(bytes::Bytes, u64)>),
    /// Written at this revision.
    Written(u64),
    /// Refused or unknown (a CAS conflict included): read again before the next write.
    Failed,
}

/// How many read/write rounds in a row may fail before an owner's losses wait for its next loss
/// (each such round is counted and reported by the daemon).
pub const NOTICE_ATTEMPTS: u32 = 3;

#[derive(Clone, Debug, Default)]
struct OwnerNotice {
    /// Losses not written yet.
    pending: LossLedger,
    /// The stored record and its revision, once read in this life (`None` revision: absent).
    stored: Option<(LossLedger, Option<u64>)>,
    /// While a write is in flight: the ledger written, and the pending losses it carries.
    writing: Option<(LossLedger, LossLedger)>,
    reading: bool,
    failures: u32,
}

/// The daemon's side of the carrier: per owner, the losses not yet written and the one read or
/// write in flight. Pure: it says which step comes next ([`NoticeStep`]) and is told how each
/// ended ([`NoticeOutcome`]). At most one step per owner is in flight; losses that arrive
/// meanwhile wait in the owner's pending ledger (bounded like any ledger) and go out with the
/// next write. A write is always a CAS on the revision read in this life, so a record another
/// writer (a predecessor that was still finishing, a successor) changed is read and folded
/// again; an unknown outcome is read again too, and folding the same exact ranges twice counts
/// them once.
#[derive(Clone, Debug, Default)]
pub struct LossNotices {
    owners: BTreeMap<AgentId, OwnerNotice>,
}

impl LossNotices {
    /// `count` copies of `first..=last` on `channel` were lost to `owner` for `reason`. Returns
    /// the step to take now, if none is in flight for the owner.
    pub fn lost(
        &mut self,
        owner: &AgentId,
        channel: &str,
        first: u64,
        last: u64,
        count: u64,
        reason: LossReason,
    ) -> Option<NoticeStep> {
        let o = self.owners.entry(owner.clone()).or_default();
        if o.pending.owner.is_empty() {
            o.pending.owner = owner.as_str().to_owned();
        }
        o.pending.record_range(channel, first, last, count, reason);
        o.failures = 0;
        Self::next(owner, o)
    }

    /// The step in flight for `owner` ended.
    pub fn ended(&mut self, owner: &AgentId, outcome: NoticeOutcome) -> Option<NoticeStep> {
        let o = self.owners.get_mut(owner)?;
        match outcome {
            NoticeOutcome::Read(stored) => {
                o.reading = false;
                let ledger = stored
                    .as_ref()
                    .and_then(|(b, _)| LossLedger::decode(b))
                    .unwrap_or_else(|| LossLedger::new(owner.as_str()));
                o.stored = Some((ledger, stored.map(|(_, rev)| rev)));
            }
            NoticeOutcome::Written(rev) => {
                if let Some((written, _)) = o.writing.take() {
                    o.stored = Some((written, Some(rev)));
                }
                o.failures = 0;
            }
            NoticeOutcome::Failed => {
                o.reading = false;
                if let Some((_, carried)) = o.writing.take() {
                    // Put back what this write carried, oldest first.
                    let newer = std::mem::replace(&mut o.pending, carried);
                    o.pending.absorb(&newer);
                }
                o.stored = None;
                o.failures += 1;
                if o.failures >= NOTICE_ATTEMPTS {
                    return None;
                }
            }
        }
        Self::next(owner, o)
    }

    fn next(owner: &AgentId, o: &mut OwnerNotice) -> Option<NoticeStep> {
        if o.reading || o.writing.is_some() || o.pending.is_empty() {
            return None;
        }
        let Some((stored, revision)) = &o.stored else {
            o.reading = true;
            return Some(NoticeStep::Read {
                owner: owner.clone(),
            });
        };
        let mut next = stored.clone();
        next.owner = owner.as_str().to_owned();
        let pending = std::mem::replace(&mut o.pending, LossLedger::new(owner.as_str()));
        next.absorb(&pending);
        let condition = match revision {
            Some(r) => KvCondition::Revision(*r),
            None => KvCondition::CreateOnly,
        };
        let value = next.encode();
        o.writing = Some((next, pending));
        Some(NoticeStep::Write {
            owner: owner.clone(),
            value,
            condition,
        })
    }

    /// The connection or the lease was lost: every step in flight is forgotten (its completion
    /// will not come) and every stored record must be read again; unwritten losses stay.
    pub fn interrupt(&mut self) {
        for o in self.owners.values_mut() {
            o.reading = false;
            if let Some((_, carried)) = o.writing.take() {
                let newer = std::mem::replace(&mut o.pending, carried);
                o.pending.absorb(&newer);
            }
            o.stored = None;
        }
    }

    /// Owners with losses not written yet, with the steps to retry them (after a reconnect).
    pub fn resume(&mut self) -> Vec<NoticeStep> {
        let mut steps = Vec::new();
        for (owner, o) in &mut self.owners {
            o.failures = 0;
            if let Some(s) = Self::next(owner, o) {
                steps.push(s);
            }
        }
        steps
    }

    /// Copies lost and not yet written, over all owners.
    pub fn unwritten(&self) -> u64 {
        self.owners
            .values()
            .fold(0, |sum, o| sum.saturating_add(o.pending.total()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn adjacent_losses_merge_into_one_exact_range() {
        let mut l = LossLedger::new("bob");
        for s in 751..=1010 {
            l.record("general", s, LossReason::DlvFull);
        }
        l.record("general", 800, LossReason::DlvFull);
        assert_eq!(l.ranges.len(), 1);
        let r = &l.ranges[0];
        assert_eq!((r.first, r.last, r.count), (751, 1010, 260));
        assert!(r.exact());
        assert_eq!(l.total(), 260);
    }

    #[test]
    fn other_channels_and_reasons_and_gaps_make_new_ranges() {
        let mut l = LossLedger::new("bob");
        l.record("general", 5, LossReason::DlvFull);
        l.record("general", 7, LossReason::DlvFull);
        l.record("team", 6, LossReason::DlvFull);
        l.record("general", 8, LossReason::RedeliveryCeiling);
        assert_eq!(l.ranges.len(), 4);
        assert_eq!(l.total(), 4);
        assert_eq!(l.since(2).len(), 2);
    }

    #[test]
    fn a_full_ledger_folds_then_pushes_out_into_more() {
        let mut l = LossLedger::new("bob");
        for i in 0..LOSS_RANGES_MAX as u64 {
            l.record(&format!("c{i}"), 10 * i, LossReason::DlvFull);
        }
        // Same kind as the newest: folded, inexact.
        let last = (LOSS_RANGES_MAX as u64 - 1) * 10;
        l.record(
            &format!("c{}", LOSS_RANGES_MAX - 1),
            last + 5,
            LossReason::DlvFull,
        );
        assert_eq!(l.ranges.len(), LOSS_RANGES_MAX);
        let r = l.ranges.last().unwrap();
        assert_eq!((r.first, r.last, r.count), (last, last + 5, 2));
        assert!(!r.exact());
        // A new kind: the oldest range goes to `more`.
        l.record("fresh", 1, LossReason::DlvFull);
        assert_eq!(l.ranges.len(), LOSS_RANGES_MAX);
        assert_eq!(
            l.more,
            LossOverflow {
                ranges: 1,
                count: 1
            }
        );
        assert_eq!(l.total(), LOSS_RANGES_MAX as u64 + 2);
    }

    #[test]
    fn the_wire_format_is_stable_and_unknown_reasons_read_as_other() {
        let mut l = LossLedger::new("bob");
        l.record_range("general", 751, 1010, 260, LossReason::DlvFull);
        let text = String::from_utf8(l.encode().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"owner":"bob","stamp":1,"ranges":[{"stamp":1,"channel":"general","first":751,"last":1010,"count":260,"reason":"dlv-full","exact":true}],"more":{"ranges":0,"count":0}}"#
        );
        assert_eq!(LossLedger::decode(text.as_bytes()), Some(l));
        let newer = r#"{"owner":"bob","stamp":3,"x":1,"ranges":[{"stamp":3,"channel":"g","first":1,"last":1,"count":1,"reason":"meteor"}]}"#;
        let l = LossLedger::decode(newer.as_bytes()).unwrap();
        assert_eq!(l.ranges[0].reason, LossReason::Other);
        assert_eq!(LossLedger::decode(b"[1]"), None);
    }

    #[test]
    fn absorbing_unwritten_losses_restamps_them_above_the_stored_ones() {
        let mut stored = LossLedger::new("bob");
        stored.record("general", 1, LossReason::DlvFull);
        stored.record("team", 1, LossReason::DlvFull);
        let mut pending = LossLedger::new("bob");
        pending.record("general", 2, LossReason::DlvFull);
        pending.record("x", 9, LossReason::RedeliveryCeiling);
        let before = stored.stamp;
        stored.absorb(&pending);
        assert_eq!(stored.total(), 4);
        assert_eq!(stored.since(before).len(), 2);
        assert_eq!(stored.ranges.len(), 3);
    }

    fn bob() -> AgentId {
        AgentId::new("bob").unwrap()
    }

    #[test]
    fn notices_read_before_the_first_write_and_fold_onto_the_stored_record() {
        let mut n = LossNotices::default();
        assert_eq!(
            n.lost(&bob(), "general", 5, 5, 1, LossReason::DlvFull),
            Some(NoticeStep::Read { owner: bob() })
        );
        // Losses while the read is in flight wait.
        assert_eq!(
            n.lost(&bob(), "general", 6, 6, 1, LossReason::DlvFull),
            None
        );
        let mut before = LossLedger::new("bob");
        before.record("team", 1, LossReason::RedeliveryCeiling);
        let Some(NoticeStep::Write {
            value, condition, ..
        }) = n.ended(&bob(), NoticeOutcome::Read(Some((before.encode(), 40))))
        else {
            panic!("a write");
        };
        assert_eq!(condition, KvCondition::Revision(40));
        let written = LossLedger::decode(&value).unwrap();
        assert_eq!(written.total(), 3);
        assert_eq!(written.ranges.len(), 2);
        assert_eq!(n.ended(&bob(), NoticeOutcome::Written(41)), None);
        // The next loss writes at once, at the new revision.
        let Some(NoticeStep::Write { condition, .. }) =
            n.lost(&bob(), "general", 7, 7, 1, LossReason::DlvFull)
        else {
            panic!("a write");
        };
        assert_eq!(condition, KvCondition::Revision(41));
    }

    #[test]
    fn a_failed_write_reads_again_and_keeps_every_loss() {
        let mut n = LossNotices::default();
        n.lost(&bob(), "general", 5, 5, 1, LossReason::DlvFull);
        let Some(NoticeStep::Write { condition, .. }) = n.ended(&bob(), NoticeOutcome::Read(None))
        else {
            panic!("a write");
        };
        assert_eq!(condition, KvCondition::CreateOnly);
        n.lost(&bob(), "general", 6, 6, 1, LossReason::DlvFull);
        // Someone else wrote: read again, fold both losses onto what is there.
        assert_eq!(
            n.ended(&bob(), NoticeOutcome::Failed),
            Some(NoticeStep::Read { owner: bob() })
        );
        let mut other = LossLedger::new("bob");
        other.record("general", 5, LossReason::DlvFull);
        let Some(NoticeStep::Write { value, .. }) =
            n.ended(&bob(), NoticeOutcome::Read(Some((other.encode(), 3))))
        else {
            panic!("a write");
        };
        let l = LossLedger::decode(&value).unwrap();
        assert_eq!((l.total(), l.ranges.len()), (2, 1), "{l:?}");
        assert_eq!(n.unwritten(), 0);
        // A connection loss forgets the write in flight; the losses wait for the reconnect.
        n.interrupt();
        assert_eq!(n.unwritten(), 2);
        assert_eq!(n.resume(), vec![NoticeStep::Read { owner: bob() }]);
    }

    #[test]
    fn notices_stop_after_repeated_failures_until_the_next_loss() {
        let mut n = LossNotices::default();
        n.lost(&bob(), "general", 5, 5, 1, LossReason::DlvFull);
        for _ in 1..NOTICE_ATTEMPTS {
            assert!(n.ended(&bob(), NoticeOutcome::Failed).is_some());
        }
        assert_eq!(n.ended(&bob(), NoticeOutcome::Failed), None);
        assert_eq!(n.unwritten(), 1);
        assert!(
            n.lost(&bob(), "general", 9, 9, 1, LossReason::DlvFull)
                .is_some()
        );
    }

    proptest! {
        /// Whatever is recorded, the ledger stays bounded, counts every distinct loss exactly
        /// once (ranges plus overflow), every exact range holds only recorded losses, and every
        /// change raises the stamp of what changed above what a reader saw before.
        #[test]
        fn the_ledger_is_bounded_and_counts_each_loss_once(
            losses in proptest::collection::vec((0u8..3, 0u8..2, 0u64..400), 1..600)
        ) {
            let mut l = LossLedger::new("bob");
            let mut seen = std::collections::BTreeSet::new();
            for (c, r, seq) in losses {
                let channel = format!("c{c}");
                let reason = if r == 0 { LossReason::DlvFull } else { LossReason::RedeliveryCeiling };
                let before = l.stamp;
                let fresh = seen.insert((channel.clone(), reason, seq));
                l.record(&channel, seq, reason);
                prop_assert!(l.ranges.len() <= LOSS_RANGES_MAX);
                if fresh {
                    prop_assert!(l.stamp > before);
                    // Covered by a range of its kind changed now, or counted in the overflow.
                    prop_assert!(l.since(before).iter().any(|x| x.channel == channel
                        && x.reason == reason && x.first <= seq && seq <= x.last));
                }
                for x in &l.ranges {
                    prop_assert!(x.first <= x.last && x.count >= 1);
                    prop_assert!(x.count <= x.last - x.first + 1);
                    prop_assert!(!x.exact() || x.count == x.last - x.first + 1);
                    if x.exact() {
                        for s in x.first..=x.last {
                            prop_assert!(seen.contains(&(x.channel.clone(), x.reason, s)));
                        }
                    }
                }
            }
            // Exact ranges never double count: while nothing was folded or pushed out, the total
            // is the number of distinct losses.
            if l.ranges.iter().all(LossRange::exact) && l.more.ranges == 0 {
                prop_assert_eq!(l.total(), seen.len() as u64);
            }
        }
    }
}
