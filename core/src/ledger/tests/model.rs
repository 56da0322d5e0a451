//! Reference-model property test (R22): random copy/surface/settle/reject sequences are applied to
//! the ledger and to an obviously-correct model built from the documented rules, with linear scans
//! and plain vectors. After every step the decisions must agree and the invariants must hold:
//!
//! - I23: no id surfaced twice unless the horizon reported it evicted in between;
//! - R16: every durable handle given to the ledger is resolved exactly once, or is the handle a
//!   pending entry holds now (no leak, no double resolution, no resolution of unknown handles);
//! - I22: an ack only for a settled id, for a superseded delivery of a distinct stream message
//!   while a fresher one still guards the id, or for an own echo;
//! - I24: a pending entry holds a durable handle iff a durable copy of it was ingested since it
//!   became pending, and it is the latest one;
//! - R18: the pending and horizon bounds are never exceeded;
//! - R17a: misuse returns an error and leaves the state unchanged.

use super::super::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

const IDS: u8 = 6;
const NAK: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug)]
enum Src {
    Live,
    Backfill,
    /// A durable copy with a fresh handle and, maybe, a stream sequence from a small pool (so both
    /// "same message" and "distinct message" supersessions happen).
    Durable(Option<u8>, bool),
}

#[derive(Clone, Debug)]
enum Op {
    Ingest(u8, Src),
    /// A durable copy reusing a handle the ledger holds (misuse).
    ReuseHeld(u8, usize),
    Surface(usize),
    Handled(u8),
    Decline(u8),
    Reject(bool, Rejection),
}

fn src() -> impl Strategy<Value = Src> {
    prop_oneof![
        3 => Just(Src::Live),
        1 => Just(Src::Backfill),
        4 => (proptest::option::of(0u8..3), proptest::bool::weighted(0.3))
            .prop_map(|(seq, redelivered)| Src::Durable(seq, redelivered)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..IDS, src()).prop_map(|(i, s)| Op::Ingest(i, s)),
        1 => (0..IDS, 0usize..8).prop_map(|(i, p)| Op::ReuseHeld(i, p)),
        3 => (0usize..4).prop_map(Op::Surface),
        4 => (0..IDS).prop_map(Op::Handled),
        2 => (0..IDS).prop_map(Op::Decline),
        1 => (any::<bool>(), prop_oneof![
            Just(Rejection::Malformed),
            Just(Rejection::Spoofed),
            Just(Rejection::OwnEcho)
        ])
            .prop_map(|(d, r)| Op::Reject(d, r)),
    ]
}

fn case() -> impl Strategy<Value = (usize, usize, Vec<Op>)> {
    (
        1usize..5,
        1usize..6,
        proptest::collection::vec(op(), 1..120),
    )
}

fn name(i: u8) -> MessageId {
    MessageId::new(format!("m{i}"))
}

#[derive(Clone, Debug)]
struct MEntry {
    id: u8,
    item: u32,
    surfaced: bool,
    origin: SourceKind,
    /// (handle, stream seq, redelivered) of the latest durable copy since the entry was created.
    handle: Option<(DeliveryId, Option<u8>, bool)>,
}

/// The model: the documented rules, with vectors and linear scans.
#[derive(Debug)]
struct Model {
    max: usize,
    cap: usize,
    pending: Vec<MEntry>,
    horizon: Vec<(u8, Settlement)>,
}

impl Model {
    fn pos(&self, id: u8) -> Option<usize> {
        self.pending.iter().position(|e| e.id == id)
    }

    fn settled(&self, id: u8) -> bool {
        self.horizon.iter().any(|(h, _)| *h == id)
    }

    fn ingest(
        &mut self,
        id: u8,
        kind: SourceKind,
        d: Option<(DeliveryId, Option<u8>, bool)>,
        item: u32,
    ) -> Decision {
        if self.settled(id) {
            return Decision::SettledDuplicate {
                ack: d.map(|(h, _, _)| Resolution::new(h, Action::Ack)),
            };
        }
        if let Some(p) = self.pos(id) {
            let Some(fresh) = d else {
                return Decision::DuplicateDropped;
            };
            let old = self.pending[p].handle.replace(fresh);
            return match old {
                None => Decision::HandleUpgraded,
                Some((oh, oseq, _)) => {
                    let distinct = matches!((oseq, fresh.1), (Some(a), Some(b)) if a != b);
                    Decision::HandleReplaced {
                        superseded: Resolution::new(
                            oh,
                            if distinct {
                                Action::Ack
                            } else {
                                Action::Forget
                            },
                        ),
                    }
                }
            };
        }
        let entry = MEntry {
            id,
            item,
            surfaced: false,
            origin: kind,
            handle: d,
        };
        if self.pending.len() < self.max {
            self.pending.push(entry);
            return Decision::Buffered;
        }
        // The newest queued entry with a durable handle that is a first delivery (`Some(false)`)
        // or any (`None`).
        let newest_queued = |pending: &[MEntry], redelivered: Option<bool>| {
            (0..pending.len()).rev().find(|&i| {
                !pending[i].surfaced
                    && pending[i]
                        .handle
                        .is_some_and(|(_, _, r)| redelivered.is_none_or(|want| r == want))
            })
        };
        if let Some((h, _, redelivered)) = d {
            // A redelivery takes the place of the newest queued first delivery, if any.
            if redelivered && let Some(i) = newest_queued(&self.pending, Some(false)) {
                let v = self.pending.remove(i);
                self.pending.push(entry);
                return Decision::BufferedDisplacing {
                    displaced: name(v.id),
                    nak: Resolution::new(v.handle.unwrap().0, Action::Nak { delay: NAK }),
                };
            }
            return Decision::OverflowDeferred {
                nak: Resolution::new(h, Action::Nak { delay: NAK }),
            };
        }
        let victim = newest_queued(&self.pending, Some(false))
            .or_else(|| newest_queued(&self.pending, None));
        match victim {
            Some(i) => {
                let v = self.pending.remove(i);
                self.pending.push(entry);
                Decision::BufferedDisplacing {
                    displaced: name(v.id),
                    nak: Resolution::new(v.handle.unwrap().0, Action::Nak { delay: NAK }),
                }
            }
            None => Decision::OverflowLost,
        }
    }

    fn settle(
        &mut self,
        id: u8,
        how: Settlement,
        need_surfaced: bool,
    ) -> Result<Settled, LedgerError> {
        let Some(p) = self.pos(id) else {
            return Err(LedgerError::NotPending { id: name(id) });
        };
        if need_surfaced && !self.pending[p].surfaced {
            return Err(LedgerError::NotSurfaced { id: name(id) });
        }
        let e = self.pending.remove(p);
        let evicted = if self.horizon.len() == self.cap {
            Some(name(self.horizon.remove(0).0))
        } else {
            None
        };
        self.horizon.push((id, how));
        Ok(Settled {
            id: name(id),
            settlement: how,
            ack: e.handle.map(|(h, _, _)| Resolution::new(h, Action::Ack)),
            evicted,
        })
    }
}

/// What the harness knows about handles, for the R16/I22 checks.
#[derive(Default)]
struct Book {
    next: u64,
    /// Every handle given to the ledger: the id it carried (`None` for rejected copies) and its
    /// stream sequence.
    given: BTreeMap<DeliveryId, (Option<u8>, Option<u8>)>,
    resolved: BTreeMap<DeliveryId, Action>,
    surfaced_times: BTreeMap<u8, u32>,
    may_resurface: BTreeSet<u8>,
}

impl Book {
    fn fresh(&mut self, id: Option<u8>, seq: Option<u8>) -> DeliveryId {
        self.next += 1;
        let h = DeliveryId(self.next);
        self.given.insert(h, (id, seq));
        h
    }

    fn resolve(&mut self, r: Resolution, model: &Model, own_echo: bool) {
        let info = self.given.get(&r.delivery).copied();
        assert!(
            info.is_some(),
            "R16: resolution of a handle never given: {r}"
        );
        let prev = self.resolved.insert(r.delivery, r.action);
        assert_eq!(prev, None, "R16: {} resolved twice", r.delivery);
        if r.action == Action::Ack {
            let (id, seq) = info.unwrap_or((None, None));
            let justified = own_echo
                || id.is_some_and(|id| {
                    model.settled(id)
                        || model.pos(id).is_some_and(|p| {
                            matches!(model.pending[p].handle,
                                Some((h, s, _)) if h != r.delivery
                                    && matches!((s, seq), (Some(a), Some(b)) if a != b))
                        })
                });
            assert!(justified, "I22: unjustified ack {r} of id {id:?}");
        }
    }
}

fn check(ledger: &Ledger<u32>, model: &Model, book: &Book) {
    // R18
    assert!(ledger.pending_len() <= model.max, "R18 pending bound");
    assert!(ledger.horizon_len() <= model.cap, "R18 horizon bound");
    // Same pending set, same order, same horizon.
    let ids: Vec<MessageId> = ledger.pending_ids().cloned().collect();
    let want: Vec<MessageId> = model.pending.iter().map(|e| name(e.id)).collect();
    assert_eq!(ids, want, "pending order");
    let snap: Vec<(MessageId, Settlement)> = ledger
        .horizon_snapshot()
        .settled
        .into_iter()
        .map(|s| (s.id, s.settlement))
        .collect();
    let want: Vec<(MessageId, Settlement)> =
        model.horizon.iter().map(|(i, s)| (name(*i), *s)).collect();
    assert_eq!(snap, want, "horizon");
    // I24: the held handle is the latest durable handle since the entry was created.
    for e in &model.pending {
        assert_eq!(
            ledger.held_handle(&name(e.id)),
            e.handle.map(|(h, _, _)| h),
            "I24 for m{}",
            e.id
        );
        assert_eq!(ledger.is_surfaced(&name(e.id)), Some(e.surfaced));
    }
    // R16: given = resolved ⊎ held.
    let held: BTreeSet<DeliveryId> = ledger.held_handles().map(|(h, _)| h).collect();
    for h in book.given.keys() {
        let r = book.resolved.contains_key(h);
        let k = held.contains(h);
        assert!(r ^ k, "R16: handle {h} resolved={r} held={k}");
    }
    assert!(held.iter().all(|h| book.given.contains_key(h)));
}

fn run(max: usize, cap: usize, ops: &[Op]) {
    let config = LedgerConfig {
        max_pending: max,
        horizon_capacity: cap,
        overflow_nak_delay: NAK,
    };
    let mut ledger: Ledger<u32> = Ledger::new(config).unwrap();
    let mut model = Model {
        max,
        cap,
        pending: Vec::new(),
        horizon: Vec::new(),
    };
    let mut book = Book::default();
    for (step, op) in ops.iter().enumerate() {
        let now = Instant::from_millis(step as u64 * 10);
        let item = step as u32;
        match *op {
            Op::Ingest(i, s) => {
                let (source, d) = match s {
                    Src::Live => (CopySource::Live, None),
                    Src::Backfill => (CopySource::Backfill, None),
                    Src::Durable(seq, redelivered) => {
                        let h = book.fresh(Some(i), seq);
                        let count = if redelivered { 2 } else { 1 };
                        let mut dd = DurableDelivery::new(h).with_delivery_count(count);
                        if let Some(seq) = seq {
                            dd = dd.with_stream_seq(u64::from(seq));
                        }
                        (CopySource::Durable(dd), Some((h, seq, redelivered)))
                    }
                };
                let got = ledger.ingest(now, name(i), source, item).unwrap();
                let want = model.ingest(i, source.kind(), d, item);
                assert_eq!(got, want, "step {step}: {op:?}");
                if let Decision::BufferedDisplacing { displaced, .. } = &got {
                    // The displaced entry was never surfaced: it may surface later, but only once.
                    assert!(!ledger.is_pending(displaced));
                }
                if let Some(r) = got.resolution() {
                    book.resolve(r, &model, false);
                }
            }
            Op::ReuseHeld(i, pick) => {
                let held: Vec<(DeliveryId, MessageId)> = ledger
                    .held_handles()
                    .map(|(h, id)| (h, id.clone()))
                    .collect();
                if held.is_empty() {
                    continue;
                }
                let (h, held_by) = held[pick % held.len()].clone();
                let before = ledger.clone();
                let got = ledger.ingest(
                    now,
                    name(i),
                    CopySource::Durable(DurableDelivery::new(h)),
                    item,
                );
                assert_eq!(
                    got,
                    Err(LedgerError::HandleInUse {
                        delivery: h,
                        held_by
                    })
                );
                assert_eq!(ledger, before, "R17a: state unchanged");
            }
            Op::Surface(limit) => {
                let got = ledger.surface(now, limit);
                let mut want = Vec::new();
                for e in model.pending.iter_mut().filter(|e| !e.surfaced).take(limit) {
                    e.surfaced = true;
                    want.push(Surfaced {
                        id: name(e.id),
                        item: e.item,
                        origin: e.origin,
                        durable: e.handle.is_some(),
                    });
                }
                assert_eq!(got, want, "step {step}: surface({limit})");
                for s in &want {
                    let i = model
                        .pending
                        .iter()
                        .find(|e| name(e.id) == s.id)
                        .map(|e| e.id)
                        .unwrap();
                    let n = book.surfaced_times.entry(i).or_insert(0);
                    assert!(
                        *n == 0 || book.may_resurface.remove(&i),
                        "I23: m{i} surfaced twice within the horizon"
                    );
                    *n += 1;
                }
            }
            Op::Handled(i) | Op::Decline(i) => {
                let (how, need) = match op {
                    Op::Handled(_) => (Settlement::Handled, true),
                    _ => (Settlement::Declined, false),
                };
                let before = ledger.clone();
                let got = match how {
                    Settlement::Handled => ledger.handled(now, &name(i)),
                    _ => ledger.decline(now, &name(i)),
                };
                let want = model.settle(i, how, need);
                assert_eq!(got, want, "step {step}: {op:?}");
                match got {
                    Err(_) => assert_eq!(ledger, before, "R17a: state unchanged"),
                    Ok(s) => {
                        if let Some(ev) = &s.evicted {
                            let ev = (0..IDS).find(|j| name(*j) == *ev).unwrap();
                            book.may_resurface.insert(ev);
                        }
                        if let Some(r) = s.ack {
                            book.resolve(r, &model, false);
                        }
                    }
                }
            }
            Op::Reject(durable, why) => {
                let (source, h) = if durable {
                    let h = book.fresh(None, None);
                    (CopySource::Durable(DurableDelivery::new(h)), Some(h))
                } else {
                    (CopySource::Live, None)
                };
                let got = ledger.reject(now, source, why).unwrap();
                let want = h.map(|h| {
                    Resolution::new(
                        h,
                        if why == Rejection::OwnEcho {
                            Action::Ack
                        } else {
                            Action::Term
                        },
                    )
                });
                assert_eq!(got, want);
                if let Some(r) = got {
                    book.resolve(r, &model, why == Rejection::OwnEcho);
                }
            }
        }
        check(&ledger, &model, &book);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ledger_agrees_with_the_reference_model((max, cap, ops) in case()) {
        run(max, cap, &ops);
    }
}

#[test]
fn the_generator_is_deterministic_for_a_given_seed() {
    let sample = || {
        let mut runner = TestRunner::deterministic();
        let tree = case().new_tree(&mut runner).unwrap();
        format!("{:?}", tree.current())
    };
    assert_eq!(sample(), sample());
}
