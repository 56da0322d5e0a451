//! Per-owner backlogs of the two capped per-owner stores, kept under their caps (G6).
//!
//! INBOX (`cotal.<s>.dinbox.<owner>`) and DLV (`cotal.<s>.dlv.<owner>`) each keep the newest
//! [`MAX_MSGS_PER_SUBJECT`] entries of an owner and discard the oldest. A write while an owner
//! already has that many **unread** entries pushes an unread one out: the reference loses it
//! without a word. This module is the one place that decides whether the daemon may write one
//! more entry for an owner, for both stores.
//!
//! **INBOX ([`InboxBacklog`]).** The daemon writes dinbox entries (fan-out, catch-up) and its own
//! reader settles them, so it can count: an owner's backlog is the entries stored in this life
//! and not yet settled, plus the entries a predecessor left unread (the *legacy*, unattributed:
//! the reader consumer's unread total when it was bound). Fan-out holds an owner's copy back
//! while that bound is at [`DINBOX_HIGH_WATER`]: the CHAT message is nakked and its redelivery
//! writes the copy. Counts drift upward when an entry is settled without the daemon seeing it
//! (INBOX evicted it, a predecessor settled it, an anomaly was terminated); an upward drift would
//! hold an owner forever and, with it, its channel's CHAT messages. So whenever an owner is held
//! the daemon reads the reader consumer again ([`InboxBacklog::needs_recheck`], at most once per
//! [`BACKLOG_RECHECK`]), and every count, legacy included, is clamped to the unread total
//! ([`InboxBacklog::clamp`]): no owner can have more unread entries than all owners together.
//! Once the reader has drained, every hold is released.
//!
//! **DLV ([`DlvBacklog`]).** The agent acks its DLV copies, and the daemon does not see those
//! acks. It reads the truth from the agent's `dlv_<owner>` consumer (undelivered plus unacked:
//! [`ConsumerState::unread`](crate::io::ConsumerState::unread)) and counts its own transfers on
//! top, which gives an upper bound. A transfer is admitted while the bound is below the cap. When
//! it reaches the cap (and for an owner's first transfer in this life, because a predecessor's
//! copies may be waiting) the transfers wait for a fresh read. If the owner truly has a full DLV,
//! the copies that do not fit are **shed**: dropped with a loss event that names owner, channel
//! and sequence. So a member that stops reading loses its newest copies, reported, rather than
//! its oldest, silently. The reader never holds an entry for a slow agent, so a member that is
//! offline for hours costs one consumer read per cap's worth of copies and stalls nobody.
//!
//! **Acked out of order (reported, not prevented).** The cap rotates out an owner's oldest
//! *stored* copy, read or not, so counting unread copies bounds the rotation only while the
//! member acks in stream order: one copy left unacked while a cap's worth of newer ones are
//! acked is the oldest stored copy, and the next writes push it out (the server forgets an
//! evicted ack-pending copy at once: its ack floor moves past it; nats-server 2.15, the tokio
//! driver's `tests/server_facts.rs`). That copy is lost if the member needs the server's copy
//! again (it dies holding it, or naks it). The daemon keeps the stream sequences of the copies
//! it stored for the owner ([`DlvBacklog::stored`]) and, at every read, counts those above the
//! ack floor: the owner's **span** is the larger of that and the unread total. A span above
//! the unread total (and what is in flight) means copies were acked past an unacked one, and
//! the writes the unread count admits may rotate it out: the read reports the owner **at
//! risk** ([`DlvVerdict::at_risk`], once per episode), so the possible loss is never silent.
//! Admission stays on the unread count. A gate on the span was built and measured first: it
//! shed, as reported losses, thousands of copies of members that were keeping up in the hour's
//! chaos soaks (a delivery held unacked for a while holds the floor, and everything acked past
//! it filled the span), against none with the unread gate on the same seed; so the span only
//! reports.
//!
//! **Per-sender shares.** One sender may hold at most [`SENDER_SHARE`] (three quarters) of an
//! owner's unread DLV copies; the rest of the room stays for every other sender, so a member of a
//! channel who floods it while another member is offline cannot push everyone else's copies out
//! of that member's backstop: the copies of the flood beyond its share are the ones shed. The
//! daemon attributes unread copies to senders from its own transfers (the agent acks its DLV in
//! order, so a read of `unread` keeps the newest `unread` of them); see [`DlvBacklog`] for the
//! decision and its cost.
//!
//! A read that fails (no `dlv_<owner>` consumer, a credential written for the reference daemon
//! that lacks `CONSUMER.INFO` on DLV, a timeout) cannot prove a loss either way: the waiting
//! transfers are admitted, the owner is counted as unverified, and the next read is due after
//! another cap's worth of transfers, never per copy.
//!
//! **A read races the writes in flight.** The server computes a total while some of this
//! daemon's own writes for the owner may still be in flight, so the total may miss them. On the
//! DLV side the gate works at the cap itself, so the transfers in flight when the read is
//! sent are added to what it reports ([`DlvBacklog::read`]'s `in_flight`). One already
//! counted by the server is then counted twice, which errs toward shedding, never toward
//! eviction. On the INBOX side a clamp can miss at most what fan-out writes in one round trip,
//! far inside the half-cap margin of [`DINBOX_HIGH_WATER`].
//!
//! [`MAX_MSGS_PER_SUBJECT`]: crate::constants::MAX_MSGS_PER_SUBJECT

use std::collections::{BTreeMap, VecDeque};

use crate::constants::MAX_MSGS_PER_SUBJECT;
use crate::time::{Duration, Instant};
use crate::wire::AgentId;

/// The per-owner cap of INBOX and DLV (entries per owner subject).
pub const OWNER_CAP: u64 = MAX_MSGS_PER_SUBJECT as u64;

/// An owner's dinbox backlog at which fan-out holds its copies back: half the stream's per-owner
/// cap, leaving room for the copies already in flight (at most the fan-out window) and a
/// catch-up page.
pub const DINBOX_HIGH_WATER: u64 = OWNER_CAP / 2;

/// The most unread copies of one sender an owner's DLV may hold: a single sender cannot take
/// the last quarter of the owner's room, which stays for every other sender.
pub const SENDER_SHARE: u64 = OWNER_CAP * 3 / 4;

/// The least time between two reads of the reader consumer made because an owner is held.
pub const BACKLOG_RECHECK: Duration = Duration::from_millis(1000);

/// The INBOX side: per-owner counts of stored, unsettled dinbox entries.
#[derive(Clone, Debug, Default)]
pub struct InboxBacklog {
    counts: BTreeMap<AgentId, u64>,
    /// Unread entries of a predecessor, owner unknown; `None` until the reader consumer was read.
    legacy: Option<u64>,
    last_check: Option<Instant>,
    checking: bool,
}

impl InboxBacklog {
    /// Whether the predecessor's unread total is known (fan-out waits for it).
    pub fn legacy_known(&self) -> bool {
        self.legacy.is_some()
    }

    /// An upper bound on the owner's unread dinbox entries.
    pub fn bound(&self, owner: &AgentId) -> u64 {
        let own = self.counts.get(owner).copied().unwrap_or(0);
        own.saturating_add(self.legacy.unwrap_or(0))
    }

    /// The predecessor's unread entries still counted against every owner (0 until known).
    pub fn legacy(&self) -> u64 {
        self.legacy.unwrap_or(0)
    }

    /// Whether fan-out may write one more entry for the owner now.
    pub fn admits(&self, owner: &AgentId) -> bool {
        self.bound(owner) < DINBOX_HIGH_WATER
    }

    /// A new entry for the owner was stored (not a duplicate). Returns the owner's own count.
    pub fn stored(&mut self, owner: &AgentId) -> u64 {
        let n = self.counts.entry(owner.clone()).or_insert(0);
        *n += 1;
        *n
    }

    /// The reader settled one of the owner's entries (transferred, dropped, given up). Returns
    /// true when it was counted as one of the predecessor's (the legacy, which bounds every
    /// owner, went down).
    pub fn settled(&mut self, owner: &AgentId) -> bool {
        if let Some(n) = self.counts.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(owner);
            }
            false
        } else if let Some(l) = self.legacy.as_mut().filter(|l| **l > 0) {
            // Not one this life stored: one of the predecessor's.
            *l -= 1;
            true
        } else {
            false
        }
    }

    /// Whether a read of the reader consumer is due because an owner is held at `now`.
    pub fn needs_recheck(&self, now: Instant) -> bool {
        !self.checking
            && self
                .last_check
                .is_none_or(|t| now.saturating_since(t) >= BACKLOG_RECHECK)
    }

    /// A read of the reader consumer was issued at `now`.
    pub fn check_started(&mut self, now: Instant) {
        self.checking = true;
        self.last_check = Some(now);
    }

    /// A read in flight was abandoned (connection lost): its answer will not come.
    pub fn check_abandoned(&mut self) {
        self.checking = false;
    }

    /// A read ended without an answer. The first one sets the legacy to zero, so fan-out can
    /// start: what a predecessor left is then unverified (the caller reports it).
    pub fn check_failed(&mut self) {
        self.checking = false;
        self.legacy.get_or_insert(0);
    }

    /// The reader consumer has `unread` entries (all owners together): no count can be higher.
    pub fn clamp(&mut self, unread: u64) {
        self.checking = false;
        let legacy = self.legacy.map_or(unread, |l| l.min(unread));
        self.legacy = Some(legacy);
        self.counts.retain(|_, n| {
            *n = (*n).min(unread);
            *n > 0
        });
    }
}

/// What the DLV gate says about one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlvAdmit {
    /// Transfer it now.
    Transfer,
    /// Hold it until the owner's DLV consumer was read; `read` says whether to issue that read
    /// (false when one is already in flight).
    Wait {
        /// Issue a `CONSUMER.INFO` on `dlv_<owner>`.
        read: bool,
    },
}

/// What to do with the transfers that waited for a read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DlvVerdict<T> {
    /// Transfer these.
    pub admitted: Vec<T>,
    /// These do not fit: the owner's DLV holds `unread` unread copies. Report each as lost.
    pub shed: Vec<T>,
    /// The owner's unread copies as read (`None` when the read failed).
    pub unread: Option<u64>,
    /// The owner is at risk (see the module docs): its span as read, and whether this read
    /// began the episode (the one to report).
    pub at_risk: Option<AtRisk>,
}

/// The senders of the copies this daemon transferred to one owner's DLV, oldest first,
/// run-length encoded, never more than [`OWNER_CAP`] copies (the stream keeps no more). A read
/// of the owner's consumer keeps only the newest `unread` of them: the agent acks its DLV in
/// order, so the copies it acked are the oldest. What a read reports beyond the log (a
/// predecessor's copies) counts against the cap and against no sender's share.
#[derive(Clone, Debug, Default)]
struct SenderLog {
    runs: VecDeque<(AgentId, u64)>,
    counts: BTreeMap<AgentId, u64>,
    total: u64,
}

impl SenderLog {
    fn of(&self, sender: &AgentId) -> u64 {
        self.counts.get(sender).copied().unwrap_or(0)
    }

    fn push(&mut self, sender: &AgentId) {
        match self.runs.back_mut() {
            Some((s, n)) if s == sender => *n += 1,
            _ => self.runs.push_back((sender.clone(), 1)),
        }
        *self.counts.entry(sender.clone()).or_insert(0) += 1;
        self.total += 1;
        self.keep_newest(OWNER_CAP);
    }

    /// Forgets the oldest copies until at most `n` remain (they were acked, or pushed out).
    fn keep_newest(&mut self, n: u64) {
        while self.total > n {
            let excess = self.total - n;
            let Some((sender, run)) = self.runs.front_mut() else {
                self.total = 0;
                return;
            };
            let gone = excess.min(*run);
            *run -= gone;
            self.total -= gone;
            if let Some(c) = self.counts.get_mut(sender) {
                *c = c.saturating_sub(gone);
                if *c == 0 {
                    self.counts.remove(sender);
                }
            }
            if *run == 0 {
                self.runs.pop_front();
            }
        }
    }
}

/// An owner whose consumer has copies acked past an unacked one: further writes may rotate the
/// unacked one out of its DLV (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtRisk {
    /// The owner's stored copies above its ack floor (at least its unread total).
    pub span: u64,
    /// This read found the owner at risk and the one before did not.
    pub began: bool,
}

/// What a read of an owner's `dlv_<owner>` consumer reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DlvRead {
    /// Undelivered plus delivered and unacked ([`ConsumerState::unread`]).
    ///
    /// [`ConsumerState::unread`]: crate::io::ConsumerState::unread
    pub unread: u64,
    /// The consumer's ack floor: every copy at or below it is acked.
    pub ack_floor: u64,
}

impl From<&crate::io::ConsumerState> for DlvRead {
    fn from(s: &crate::io::ConsumerState) -> Self {
        DlvRead {
            unread: s.unread(),
            ack_floor: s.ack_floor_stream_seq,
        }
    }
}

/// The stream sequences of the copies this daemon stored for one owner and has not yet seen at
/// or below the owner's ack floor, ascending (at most [`OWNER_CAP`]: a longer run is past the
/// cap whatever the floor).
#[derive(Clone, Debug, Default)]
struct StoredAbove(VecDeque<u64>);

impl StoredAbove {
    fn record(&mut self, seq: u64) {
        // PubAcks may complete out of order within the publish window: keep the order.
        let at = self.0.partition_point(|s| *s < seq);
        if self.0.get(at) == Some(&seq) {
            return;
        }
        self.0.insert(at, seq);
        if self.0.len() as u64 > OWNER_CAP {
            self.0.pop_front();
        }
    }

    /// Forgets what is at or below `floor`; returns how many stay above it.
    fn above(&mut self, floor: u64) -> u64 {
        while self.0.front().is_some_and(|s| *s <= floor) {
            self.0.pop_front();
        }
        self.0.len() as u64
    }
}

#[derive(Clone, Debug)]
struct DlvOwner<T> {
    /// Upper bound on unread copies: the last read plus the transfers admitted since.
    bound: u64,
    /// A read is in flight; these transfers (with their senders) wait for it, oldest first.
    reading: Option<VecDeque<(T, AgentId)>>,
    /// Who sent the unread copies, as far as this daemon knows.
    senders: SenderLog,
}

/// The DLV side: per-owner upper bounds on unread copies, per sender and in all, with the
/// transfers waiting for a read. `T` is whatever the caller needs to resume a transfer (the
/// daemon uses its delivery id).
///
/// **One sender cannot crowd out the others.** A copy is admitted while the owner's bound is
/// under [`OWNER_CAP`] *and* its sender's unread copies are under [`SENDER_SHARE`]; so a sender
/// that floods a channel while a member is offline fills at most three quarters of that member's
/// DLV, and the last quarter stays for everyone else. The copies of the flood beyond its share
/// are shed (reported losses for that member); a sender whose share is full waits for a read
/// like a full DLV does, so a member that caught up lets it in again. Why this and not a refill
/// from CHAT: the share needs no new reads, state or writes beyond what the cap already has, and
/// it keeps the loss with the sender that caused it. Its cost: a lone sender that posts more
/// than [`SENDER_SHARE`] copies while a member is away loses its newest quarter earlier than it
/// would have (reported, like every shed).
#[derive(Clone, Debug)]
pub struct DlvBacklog<T> {
    owners: BTreeMap<AgentId, DlvOwner<T>>,
    /// Per owner, the copies this daemon stored above the last floor read (kept across
    /// [`DlvBacklog::reset`]: the copies are stored whoever holds the lease next).
    stored: BTreeMap<AgentId, StoredAbove>,
    /// Owners the last read found at risk.
    at_risk: std::collections::BTreeSet<AgentId>,
}

impl<T> Default for DlvBacklog<T> {
    fn default() -> Self {
        DlvBacklog {
            owners: BTreeMap::new(),
            stored: BTreeMap::new(),
            at_risk: std::collections::BTreeSet::new(),
        }
    }
}

impl<T> DlvBacklog<T> {
    /// One transfer for the owner, of a copy `sender` posted, was decided: admit it, or park
    /// `item` until a read.
    pub fn admit(&mut self, owner: &AgentId, sender: &AgentId, item: T) -> (DlvAdmit, Option<T>) {
        match self.owners.get_mut(owner) {
            Some(DlvOwner {
                reading: Some(waiting),
                ..
            }) => {
                waiting.push_back((item, sender.clone()));
                (DlvAdmit::Wait { read: false }, None)
            }
            Some(o) if o.bound < OWNER_CAP && o.senders.of(sender) < SENDER_SHARE => {
                o.bound += 1;
                o.senders.push(sender);
                (DlvAdmit::Transfer, Some(item))
            }
            // At the cap or at the sender's share: read before writing.
            Some(o) => {
                o.reading = Some(VecDeque::from([(item, sender.clone())]));
                (DlvAdmit::Wait { read: true }, None)
            }
            // First transfer in this life: a predecessor's copies may be waiting.
            None => {
                self.owners.insert(
                    owner.clone(),
                    DlvOwner {
                        bound: 0,
                        reading: Some(VecDeque::from([(item, sender.clone())])),
                        senders: SenderLog::default(),
                    },
                );
                (DlvAdmit::Wait { read: true }, None)
            }
        }
    }

    /// A copy for the owner was stored at stream sequence `seq` (a new one, not a duplicate).
    pub fn stored(&mut self, owner: &AgentId, seq: u64) {
        self.stored.entry(owner.clone()).or_default().record(seq);
    }

    /// The owner's read ended: `Some` from the consumer, `None` when it failed; `in_flight`
    /// transfers of the owner were published and not yet acknowledged when the read was sent (it
    /// may not have seen them; no transfer of the owner starts while it reads). The room is the
    /// cap less the unread total and what is in flight. The waiting transfers are admitted
    /// oldest first while they fit, in all and in their sender's share; the rest are shed. After
    /// a failure every waiting transfer is admitted and the next read is due a cap's worth later.
    /// The owner's span is measured too (see the module docs): above the unread total and what
    /// is in flight, the owner is at risk.
    pub fn read(
        &mut self,
        owner: &AgentId,
        read: Option<DlvRead>,
        in_flight: u64,
    ) -> DlvVerdict<T> {
        let unread = read.map(|r| r.unread);
        let span = read.map(|r| {
            let above = match self.stored.get_mut(owner) {
                Some(s) => {
                    let n = s.above(r.ack_floor);
                    if n == 0 {
                        self.stored.remove(owner);
                    }
                    n
                }
                None => 0,
            };
            r.unread.max(above)
        });
        let at_risk = match (span, unread) {
            (Some(s), Some(u)) if s > u.saturating_add(in_flight) => Some(s),
            _ => None,
        };
        let began = match (at_risk, read) {
            (Some(_), _) => self.at_risk.insert(owner.clone()),
            // A failed read says nothing either way.
            (None, Some(_)) => {
                self.at_risk.remove(owner);
                false
            }
            (None, None) => false,
        };
        let mut verdict = DlvVerdict {
            admitted: Vec::new(),
            shed: Vec::new(),
            unread,
            at_risk: at_risk.map(|span| AtRisk { span, began }),
        };
        // A late answer to a read the daemon forgot (reset at a connection loss) finds no
        // waiting transfers: the owner's state is newer than it, keep that.
        let Some(o) = self.owners.get_mut(owner) else {
            return verdict;
        };
        let Some(waiting) = o.reading.take() else {
            return verdict;
        };
        let (room, base) = match unread {
            Some(u) => {
                let taken = u.saturating_add(in_flight);
                o.senders.keep_newest(taken);
                (OWNER_CAP.saturating_sub(taken), taken)
            }
            None => (u64::MAX, 0),
        };
        let mut admitted = 0u64;
        for (item, sender) in waiting {
            let within_share = unread.is_none() || o.senders.of(&sender) < SENDER_SHARE;
            if admitted < room && within_share {
                admitted += 1;
                o.senders.push(&sender);
                verdict.admitted.push(item);
            } else {
                verdict.shed.push(item);
            }
        }
        o.bound = base.saturating_add(admitted).min(OWNER_CAP);
        verdict
    }

    /// A transfer admitted earlier failed to store: one fewer copy waits in DLV (the bound stays
    /// an upper bound either way; this keeps it tight).
    pub fn unstored(&mut self, owner: &AgentId) {
        if let Some(o) = self.owners.get_mut(owner)
            && o.reading.is_none()
        {
            o.bound = o.bound.saturating_sub(1);
        }
    }

    /// Forget every owner (the daemon lost its lease or connection: a successor or the next life
    /// reads afresh). Returns the transfers that were waiting, so the caller can release them.
    pub fn reset(&mut self) -> Vec<T> {
        let owners = std::mem::take(&mut self.owners);
        owners
            .into_values()
            .flat_map(|o| o.reading.into_iter().flatten().map(|(item, _)| item))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn a(s: &str) -> AgentId {
        AgentId::new(s).expect("valid id")
    }

    /// A read of `unread` copies, nothing acked yet (the ack floor at 0).
    fn r(unread: u64) -> Option<DlvRead> {
        Some(DlvRead {
            unread,
            ack_floor: 0,
        })
    }

    #[test]
    fn the_first_transfer_of_an_owner_waits_for_a_read() {
        let mut d = DlvBacklog::default();
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), 1),
            (DlvAdmit::Wait { read: true }, None)
        );
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), 2),
            (DlvAdmit::Wait { read: false }, None)
        );
        let v = d.read(&a("bob"), r(0), 0);
        assert_eq!(v.admitted, vec![1, 2]);
        assert!(v.shed.is_empty());
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), 3),
            (DlvAdmit::Transfer, Some(3))
        );
    }

    #[test]
    fn a_full_dlv_sheds_the_newest_and_keeps_the_room_it_has() {
        let mut d = DlvBacklog::default();
        for i in 0..5 {
            d.admit(&a("bob"), &a("zed"), i);
        }
        let v = d.read(&a("bob"), r(OWNER_CAP - 2), 0);
        assert_eq!(v.admitted, vec![0, 1]);
        assert_eq!(v.shed, vec![2, 3, 4]);
        // Now at the cap: the next one reads again.
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), 9),
            (DlvAdmit::Wait { read: true }, None)
        );
        let v = d.read(&a("bob"), r(10), 0);
        assert_eq!(v.admitted, vec![9]);
    }

    #[test]
    fn transfers_in_flight_at_the_read_count_against_the_room() {
        let mut d = DlvBacklog::default();
        for i in 0..3 {
            d.admit(&a("bob"), &a("zed"), i);
        }
        // 997 read, 2 more published but maybe not seen: room for one.
        let v = d.read(&a("bob"), r(OWNER_CAP - 3), 2);
        assert_eq!(v.admitted, vec![0]);
        assert_eq!(v.shed, vec![1, 2]);
    }

    #[test]
    fn a_failed_read_admits_and_defers_the_next_read_by_a_cap() {
        let mut d = DlvBacklog::default();
        d.admit(&a("bob"), &a("zed"), 0);
        let v = d.read(&a("bob"), None, 0);
        assert_eq!(v.admitted, vec![0]);
        let senders = [a("s0"), a("s1"), a("s2"), a("s3")];
        for i in 1..OWNER_CAP {
            let sender = &senders[(i % 4) as usize];
            assert_eq!(
                d.admit(&a("bob"), sender, i),
                (DlvAdmit::Transfer, Some(i)),
                "{i}"
            );
        }
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), OWNER_CAP),
            (DlvAdmit::Wait { read: true }, None)
        );
    }

    #[test]
    fn owners_are_independent_and_reset_returns_the_waiting() {
        let mut d = DlvBacklog::default();
        d.admit(&a("bob"), &a("zed"), 1);
        d.read(&a("bob"), r(0), 0);
        d.admit(&a("carol"), &a("zed"), 2);
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), 3),
            (DlvAdmit::Transfer, Some(3))
        );
        assert_eq!(d.reset(), vec![2]);
        assert_eq!(
            d.admit(&a("bob"), &a("zed"), 4),
            (DlvAdmit::Wait { read: true }, None)
        );
    }

    #[test]
    fn inbox_holds_at_the_high_water_and_a_clamp_releases_an_over_count() {
        let mut b = InboxBacklog::default();
        assert!(!b.legacy_known());
        b.clamp(0);
        assert!(b.legacy_known());
        for _ in 0..DINBOX_HIGH_WATER {
            assert!(b.admits(&a("bob")));
            b.stored(&a("bob"));
        }
        assert!(!b.admits(&a("bob")));
        assert!(b.admits(&a("carol")));
        // INBOX evicted or someone else settled them: the reader consumer has 3 unread.
        b.clamp(3);
        assert!(b.admits(&a("bob")));
        assert_eq!(b.bound(&a("bob")), 3);
    }

    #[test]
    fn a_predecessors_unread_entries_count_against_every_owner_until_settled() {
        let mut b = InboxBacklog::default();
        b.clamp(DINBOX_HIGH_WATER);
        assert!(!b.admits(&a("bob")));
        // The reader settles one of the predecessor's entries (bob has no count of his own).
        b.settled(&a("carol"));
        assert!(b.admits(&a("bob")));
        assert_eq!(b.bound(&a("bob")), DINBOX_HIGH_WATER - 1);
    }

    #[test]
    fn rechecks_are_paced_and_a_failure_unblocks_fan_out() {
        let mut b = InboxBacklog::default();
        let t0 = Instant::ZERO;
        assert!(b.needs_recheck(t0));
        b.check_started(t0);
        assert!(!b.needs_recheck(t0 + BACKLOG_RECHECK));
        b.check_failed();
        assert!(b.legacy_known());
        assert!(!b.needs_recheck(t0 + Duration::from_millis(999)));
        assert!(b.needs_recheck(t0 + BACKLOG_RECHECK));
    }

    #[test]
    fn one_sender_fills_at_most_its_share_and_the_rest_stays_for_the_others() {
        let mut d = DlvBacklog::default();
        let (bob, mallory, alice) = (a("bob"), a("mallory"), a("alice"));
        d.admit(&bob, &mallory, 0);
        d.read(&bob, r(0), 0);
        for i in 1..SENDER_SHARE {
            assert_eq!(
                d.admit(&bob, &mallory, i),
                (DlvAdmit::Transfer, Some(i)),
                "{i}"
            );
        }
        // Her share is full: the next waits for a read, and so does Alice's behind it.
        assert_eq!(
            d.admit(&bob, &mallory, 1000),
            (DlvAdmit::Wait { read: true }, None)
        );
        assert_eq!(
            d.admit(&bob, &alice, 2000),
            (DlvAdmit::Wait { read: false }, None)
        );
        let v = d.read(&bob, r(SENDER_SHARE), 0);
        assert_eq!(v.admitted, vec![2000]);
        assert_eq!(v.shed, vec![1000]);
        assert_eq!(
            d.admit(&bob, &alice, 2001),
            (DlvAdmit::Transfer, Some(2001))
        );
        // Bob read 700 of the oldest (all Mallory's): she has room again.
        assert_eq!(
            d.admit(&bob, &mallory, 1001),
            (DlvAdmit::Wait { read: true }, None)
        );
        let v = d.read(&bob, r(SENDER_SHARE + 2 - 700), 0);
        assert_eq!(v.admitted, vec![1001]);
    }

    #[test]
    fn a_predecessors_copies_count_against_the_cap_and_no_share() {
        let mut d = DlvBacklog::default();
        d.admit(&a("bob"), &a("mallory"), 0);
        let v = d.read(&a("bob"), r(OWNER_CAP - SENDER_SHARE + 5), 0);
        assert_eq!(v.admitted, vec![0]);
        for i in 1..SENDER_SHARE - 5 {
            assert_eq!(
                d.admit(&a("bob"), &a("mallory"), i).0,
                DlvAdmit::Transfer,
                "{i}"
            );
        }
        assert_eq!(
            d.admit(&a("bob"), &a("alice"), 9).0,
            DlvAdmit::Wait { read: true },
            "at the cap"
        );
    }

    /// G6 with acks out of order: the member acked every copy but the oldest. The unread count
    /// (1) admits more, and the next writes may push the unacked copy out: the read reports the
    /// owner at risk (span 1000), once per episode, until the floor passes it.
    #[test]
    fn copies_acked_past_an_unacked_one_put_the_owner_at_risk_once_per_episode() {
        let mut d = DlvBacklog::default();
        let (bob, zed) = (a("bob"), a("zed"));
        d.admit(&bob, &zed, 0);
        let v = d.read(&bob, r(0), 0);
        assert_eq!((v.admitted, v.at_risk), (vec![0], None));
        d.stored(&bob, 1);
        for i in 1..OWNER_CAP {
            let s = [a("s0"), a("s1"), a("s2")][(i % 3) as usize].clone();
            assert_eq!(d.admit(&bob, &s, i).0, DlvAdmit::Transfer, "{i}");
            d.stored(&bob, i + 1);
        }
        // Everything but sequence 1 acked: one unread, the floor still at 0.
        assert_eq!(d.admit(&bob, &zed, 5000).0, DlvAdmit::Wait { read: true });
        let v = d.read(&bob, r(1), 0);
        assert_eq!(v.admitted, vec![5000], "admission counts unread copies");
        assert_eq!(
            v.at_risk,
            Some(AtRisk {
                span: OWNER_CAP,
                began: true
            })
        );
        // Still held at the next read: at risk, not a new episode.
        d.reset();
        d.admit(&bob, &zed, 5001);
        let v = d.read(&bob, r(1), 0);
        assert_eq!(v.at_risk.map(|r| r.began), Some(false));
        // Sequence 1 acked: the floor moves past every copy.
        d.admit(&bob, &zed, 5002);
        d.reset();
        d.admit(&bob, &zed, 5003);
        let done = Some(DlvRead {
            unread: 0,
            ack_floor: OWNER_CAP,
        });
        let v = d.read(&bob, done, 0);
        assert_eq!((v.admitted, v.at_risk), (vec![5003], None));
    }

    #[test]
    fn stored_copies_keep_stream_order_and_survive_a_reset() {
        let mut d: DlvBacklog<u64> = DlvBacklog::default();
        let bob = a("bob");
        for seq in [5, 3, 9, 7, 7] {
            d.stored(&bob, seq);
        }
        assert_eq!(d.stored[&bob].0, VecDeque::from([3, 5, 7, 9]));
        d.reset();
        d.admit(&bob, &a("zed"), 1);
        let v = d.read(
            &bob,
            Some(DlvRead {
                unread: 0,
                ack_floor: 5,
            }),
            0,
        );
        assert_eq!(
            v.at_risk.map(|r| r.span),
            Some(2),
            "7 and 9 above the floor, nothing unread"
        );
    }

    proptest! {
        /// Whatever the member acks, in any order, and whenever the daemon reads: a copy
        /// written through the gate pushes an unacked copy out of the owner's DLV only after a
        /// read that reported the owner at risk (a model of the subject: the newest
        /// [`OWNER_CAP`] copies stored, discard-old; every write stored at once; reads report
        /// the unread total and the ack floor). So the possible loss is never silent.
        #[test]
        fn the_cap_rotates_out_an_unacked_copy_only_after_the_owner_was_reported_at_risk(
            steps in proptest::collection::vec((0u8..10, any::<u16>()), 1..6000)
        ) {
            let mut d = DlvBacklog::default();
            let bob = a("bob");
            let senders = [a("s0"), a("s1"), a("s2"), a("s3")];
            // (seq, acked), oldest first.
            let mut subject: VecDeque<(u64, bool)> = VecDeque::new();
            let mut waiting = 0usize;
            // Whether the last read found the owner at risk.
            let mut at_risk = false;
            let store = |d: &mut DlvBacklog<u64>, subject: &mut VecDeque<(u64, bool)>| {
                let seq = subject.back().map_or(1, |(s, _)| s + 1);
                d.stored(&bob, seq);
                subject.push_back((seq, false));
                if subject.len() as u64 > OWNER_CAP {
                    let (seq, acked) = subject.pop_front().expect("non-empty");
                    return Some((seq, acked));
                }
                None
            };
            for (kind, x) in steps {
                match kind {
                    // Writes, from four senders.
                    0..=4 => match d.admit(&bob, &senders[usize::from(x % 4)], 0) {
                        (DlvAdmit::Transfer, Some(_)) => {
                            if let Some((seq, acked)) = store(&mut d, &mut subject) {
                                prop_assert!(acked || at_risk, "unacked {seq} rotated out unreported");
                            }
                        }
                        _ => waiting += 1,
                    },
                    // Acks: mostly the oldest unacked, sometimes any (out of order).
                    5..=7 => {
                        let unacked: Vec<usize> = subject
                            .iter()
                            .enumerate()
                            .filter(|(_, (_, a))| !a)
                            .map(|(i, _)| i)
                            .collect();
                        if !unacked.is_empty() {
                            let i = if kind == 7 {
                                unacked[usize::from(x) % unacked.len()]
                            } else {
                                unacked[0]
                            };
                            subject[i].1 = true;
                        }
                    }
                    // A read, when transfers wait for one.
                    _ if waiting > 0 => {
                        let unread = subject.iter().filter(|(_, a)| !a).count() as u64;
                        let ack_floor = match subject.iter().find(|(_, a)| !a) {
                            Some((seq, _)) => seq - 1,
                            None => subject.back().map_or(0, |(s, _)| *s),
                        };
                        let v = d.read(&bob, Some(DlvRead { unread, ack_floor }), 0);
                        prop_assert_eq!(v.admitted.len() + v.shed.len(), waiting);
                        waiting = 0;
                        at_risk = v.at_risk.is_some();
                        for _ in v.admitted {
                            if let Some((seq, acked)) = store(&mut d, &mut subject) {
                                prop_assert!(acked || at_risk, "unacked {seq} rotated out unreported at a read");
                            }
                        }
                    }
                    _ => {}
                }
            }
        }

        /// Whatever the order of reads, the admitted transfers never take an owner's DLV past
        /// the cap as last read, nor one sender's unread copies past its share (checked against
        /// a plain model: the senders of admitted copies in order, of which a read keeps the
        /// newest `unread`); every waiting transfer is either admitted or shed, and a shed one
        /// had no room in all or none in its sender's share.
        #[test]
        fn dlv_never_admits_past_the_cap_nor_past_a_senders_share(
            steps in proptest::collection::vec((0u8..4, 0u64..=OWNER_CAP), 1..3000)
        ) {
            let mut d = DlvBacklog::default();
            let bob = a("bob");
            let senders = [a("mallory"), a("alice")];
            let mut next = 0u64;
            let mut waiting = 0usize;
            let mut last_read: Option<u64> = None;
            let mut since_read = 0u64;
            let mut model: VecDeque<usize> = VecDeque::new();
            let share = |m: &VecDeque<usize>, s: usize| m.iter().filter(|x| **x == s).count() as u64;
            for (kind, unread) in steps {
                // Mostly Mallory, sometimes Alice, sometimes a read.
                if kind < 3 {
                    let s = usize::from(kind == 2);
                    match d.admit(&bob, &senders[s], (next, s)) {
                        (DlvAdmit::Transfer, Some(_)) => {
                            since_read += 1;
                            model.push_back(s);
                            if let Some(u) = last_read {
                                prop_assert!(u + since_read <= OWNER_CAP);
                            }
                        }
                        (DlvAdmit::Wait { .. }, None) => waiting += 1,
                        other => prop_assert!(false, "bad admit {other:?}"),
                    }
                    next += 1;
                } else if waiting > 0 {
                    while model.len() as u64 > unread {
                        model.pop_front();
                    }
                    let v = d.read(&bob, r(unread), 0);
                    prop_assert_eq!(v.admitted.len() + v.shed.len(), waiting);
                    prop_assert!(unread + v.admitted.len() as u64 <= OWNER_CAP.max(unread));
                    let mut admitted = 0u64;
                    let mut all = v.admitted.iter().map(|x| (x, true)).chain(v.shed.iter().map(|x| (x, false))).collect::<Vec<_>>();
                    all.sort();
                    for ((_, s), ok) in all {
                        if ok {
                            admitted += 1;
                            model.push_back(*s);
                        } else {
                            prop_assert!(
                                unread + admitted >= OWNER_CAP || share(&model, *s) >= SENDER_SHARE
                            );
                        }
                    }
                    waiting = 0;
                    last_read = Some(unread);
                    since_read = v.admitted.len() as u64;
                }
                for s in 0..2 {
                    prop_assert!(share(&model, s) <= SENDER_SHARE);
                }
            }
        }
    }
}
