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
}

#[derive(Clone, Debug)]
enum DlvOwner<T> {
    /// Upper bound on unread copies: the last read plus the transfers admitted since.
    Known(u64),
    /// A read is in flight; these transfers wait for it, oldest first.
    Reading(VecDeque<T>),
}

/// The DLV side: per-owner upper bounds on unread copies, with the transfers waiting for a read.
/// `T` is whatever the caller needs to resume a transfer (the daemon uses its delivery id).
#[derive(Clone, Debug)]
pub struct DlvBacklog<T> {
    owners: BTreeMap<AgentId, DlvOwner<T>>,
}

impl<T> Default for DlvBacklog<T> {
    fn default() -> Self {
        DlvBacklog {
            owners: BTreeMap::new(),
        }
    }
}

impl<T> DlvBacklog<T> {
    /// One transfer for the owner was decided: admit it, or park `item` until a read.
    pub fn admit(&mut self, owner: &AgentId, item: T) -> (DlvAdmit, Option<T>) {
        match self.owners.get_mut(owner) {
            Some(DlvOwner::Known(n)) if *n < OWNER_CAP => {
                *n += 1;
                (DlvAdmit::Transfer, Some(item))
            }
            Some(DlvOwner::Reading(waiting)) => {
                waiting.push_back(item);
                (DlvAdmit::Wait { read: false }, None)
            }
            // First transfer in this life, or at the cap: read before writing.
            _ => {
                self.owners
                    .insert(owner.clone(), DlvOwner::Reading(VecDeque::from([item])));
                (DlvAdmit::Wait { read: true }, None)
            }
        }
    }

    /// The owner's read ended: `Some(unread)` from the consumer, `None` when it failed;
    /// `in_flight` transfers of the owner were published and not yet acknowledged when the read
    /// was sent (it may not have seen them; no transfer of the owner starts while it reads). The waiting transfers are admitted oldest first while
    /// they fit; the rest are shed. After a failure every waiting transfer is admitted and the
    /// next read is due a cap's worth later.
    pub fn read(&mut self, owner: &AgentId, unread: Option<u64>, in_flight: u64) -> DlvVerdict<T> {
        let waiting = match self.owners.remove(owner) {
            Some(DlvOwner::Reading(w)) => w,
            other => {
                // A late answer to a read the daemon forgot (reset at a connection loss): the
                // owner's state is newer than it, keep that.
                if let Some(o) = other {
                    self.owners.insert(owner.clone(), o);
                }
                return DlvVerdict {
                    admitted: Vec::new(),
                    shed: Vec::new(),
                    unread,
                };
            }
        };
        let mut verdict = DlvVerdict {
            admitted: Vec::new(),
            shed: Vec::new(),
            unread,
        };
        let (room, base) = match unread {
            Some(u) => {
                let taken = u.saturating_add(in_flight);
                (OWNER_CAP.saturating_sub(taken), taken)
            }
            None => (u64::MAX, 0),
        };
        let mut admitted = 0u64;
        for item in waiting {
            if admitted < room {
                admitted += 1;
                verdict.admitted.push(item);
            } else {
                verdict.shed.push(item);
            }
        }
        let bound = base.saturating_add(admitted).min(OWNER_CAP);
        self.owners.insert(owner.clone(), DlvOwner::Known(bound));
        verdict
    }

    /// A transfer admitted earlier failed to store: one fewer copy waits in DLV (the bound stays
    /// an upper bound either way; this keeps it tight).
    pub fn unstored(&mut self, owner: &AgentId) {
        if let Some(DlvOwner::Known(n)) = self.owners.get_mut(owner) {
            *n = n.saturating_sub(1);
        }
    }

    /// Forget every owner (the daemon lost its lease or connection: a successor or the next life
    /// reads afresh). Returns the transfers that were waiting, so the caller can release them.
    pub fn reset(&mut self) -> Vec<T> {
        let owners = std::mem::take(&mut self.owners);
        owners
            .into_values()
            .flat_map(|o| match o {
                DlvOwner::Reading(w) => w.into_iter().collect::<Vec<_>>(),
                DlvOwner::Known(_) => Vec::new(),
            })
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

    #[test]
    fn the_first_transfer_of_an_owner_waits_for_a_read() {
        let mut d = DlvBacklog::default();
        assert_eq!(d.admit(&a("bob"), 1), (DlvAdmit::Wait { read: true }, None));
        assert_eq!(
            d.admit(&a("bob"), 2),
            (DlvAdmit::Wait { read: false }, None)
        );
        let v = d.read(&a("bob"), Some(0), 0);
        assert_eq!(v.admitted, vec![1, 2]);
        assert!(v.shed.is_empty());
        assert_eq!(d.admit(&a("bob"), 3), (DlvAdmit::Transfer, Some(3)));
    }

    #[test]
    fn a_full_dlv_sheds_the_newest_and_keeps_the_room_it_has() {
        let mut d = DlvBacklog::default();
        for i in 0..5 {
            d.admit(&a("bob"), i);
        }
        let v = d.read(&a("bob"), Some(OWNER_CAP - 2), 0);
        assert_eq!(v.admitted, vec![0, 1]);
        assert_eq!(v.shed, vec![2, 3, 4]);
        // Now at the cap: the next one reads again.
        assert_eq!(d.admit(&a("bob"), 9), (DlvAdmit::Wait { read: true }, None));
        let v = d.read(&a("bob"), Some(10), 0);
        assert_eq!(v.admitted, vec![9]);
    }

    #[test]
    fn transfers_in_flight_at_the_read_count_against_the_room() {
        let mut d = DlvBacklog::default();
        for i in 0..3 {
            d.admit(&a("bob"), i);
        }
        // 997 read, 2 more published but maybe not seen: room for one.
        let v = d.read(&a("bob"), Some(OWNER_CAP - 3), 2);
        assert_eq!(v.admitted, vec![0]);
        assert_eq!(v.shed, vec![1, 2]);
    }

    #[test]
    fn a_failed_read_admits_and_defers_the_next_read_by_a_cap() {
        let mut d = DlvBacklog::default();
        d.admit(&a("bob"), 0);
        let v = d.read(&a("bob"), None, 0);
        assert_eq!(v.admitted, vec![0]);
        for i in 1..OWNER_CAP {
            assert_eq!(d.admit(&a("bob"), i), (DlvAdmit::Transfer, Some(i)), "{i}");
        }
        assert_eq!(
            d.admit(&a("bob"), OWNER_CAP),
            (DlvAdmit::Wait { read: true }, None)
        );
    }

    #[test]
    fn owners_are_independent_and_reset_returns_the_waiting() {
        let mut d = DlvBacklog::default();
        d.admit(&a("bob"), 1);
        d.read(&a("bob"), Some(0), 0);
        d.admit(&a("carol"), 2);
        assert_eq!(d.admit(&a("bob"), 3), (DlvAdmit::Transfer, Some(3)));
        assert_eq!(d.reset(), vec![2]);
        assert_eq!(d.admit(&a("bob"), 4), (DlvAdmit::Wait { read: true }, None));
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

    proptest! {
        /// Whatever the order of reads, the admitted transfers never take an owner's DLV past
        /// the cap as last read, and every waiting transfer is either admitted or shed.
        #[test]
        fn dlv_never_admits_past_the_cap(
            steps in proptest::collection::vec((0u8..3, 0u64..=OWNER_CAP), 1..400)
        ) {
            let mut d = DlvBacklog::default();
            let bob = a("bob");
            let mut next = 0u64;
            let mut waiting = 0usize;
            let mut last_read: Option<u64> = None;
            let mut since_read = 0u64;
            for (kind, unread) in steps {
                if kind < 2 {
                    match d.admit(&bob, next) {
                        (DlvAdmit::Transfer, Some(_)) => {
                            since_read += 1;
                            if let Some(u) = last_read {
                                prop_assert!(u + since_read <= OWNER_CAP);
                            }
                        }
                        (DlvAdmit::Wait { .. }, None) => waiting += 1,
                        other => prop_assert!(false, "bad admit {other:?}"),
                    }
                    next += 1;
                } else if waiting > 0 {
                    let v = d.read(&bob, Some(unread), 0);
                    prop_assert_eq!(v.admitted.len() + v.shed.len(), waiting);
                    prop_assert!(unread + v.admitted.len() as u64 <= OWNER_CAP.max(unread));
                    if !v.shed.is_empty() {
                        prop_assert_eq!(unread + v.admitted.len() as u64, OWNER_CAP);
                    }
                    waiting = 0;
                    last_read = Some(unread);
                    since_read = v.admitted.len() as u64;
                }
            }
        }
    }
}
