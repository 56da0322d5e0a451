//! The lease glue: the [`Lease`] machine's commands issued as KV operations, its completions
//! and events routed back, and the stop when the lease is gone.

use super::*;
use crate::delivery::lease::LeaseConfig;
use crate::time::Duration;

impl Delivery {
    pub(super) fn issue_lease(&mut self, cmd: LeaseCommand) {
        let bucket = KvBucket::Delivery.name(&self.config.space);
        let lease_op = cmd.op();
        let (kind, make): (LeaseOpKind, Box<dyn FnOnce(OpId) -> Command>) = match cmd {
            LeaseCommand::Create { key, value, .. } => (
                LeaseOpKind::Create,
                Box::new(move |op| Command::KvPut {
                    op,
                    bucket,
                    key,
                    value: json::encode(&value),
                    condition: KvCondition::CreateOnly,
                }),
            ),
            LeaseCommand::Update {
                key,
                value,
                expected_revision,
                ..
            } => (
                LeaseOpKind::Update,
                Box::new(move |op| Command::KvPut {
                    op,
                    bucket,
                    key,
                    value: json::encode(&value),
                    condition: KvCondition::Revision(expected_revision),
                }),
            ),
            LeaseCommand::Delete {
                key,
                expected_revision,
                ..
            } => (
                LeaseOpKind::Delete,
                Box::new(move |op| Command::KvDelete {
                    op,
                    bucket,
                    key,
                    expected_revision: Some(expected_revision),
                }),
            ),
            LeaseCommand::Get { key, .. } => (
                LeaseOpKind::Get,
                Box::new(move |op| Command::KvGet { op, bucket, key }),
            ),
        };
        let op = self.op(Pending::Lease { lease_op, kind });
        self.cx.commands.push_back(make(op));
    }

    pub(super) fn on_lease_completion(
        &mut self,
        now: Now,
        lease_op: OpId,
        kind: LeaseOpKind,
        outcome: Outcome<Reply>,
    ) {
        let translated = match outcome {
            Outcome::Success(reply) => match (kind, reply) {
                (LeaseOpKind::Create | LeaseOpKind::Update, Reply::KvWritten { revision }) => {
                    Outcome::Success(LeaseReply::Written { revision })
                }
                (LeaseOpKind::Delete, Reply::KvWritten { .. } | Reply::Done) => {
                    Outcome::Success(LeaseReply::Deleted)
                }
                (LeaseOpKind::Get, Reply::Kv(entry)) => {
                    Outcome::Success(LeaseReply::Entry(entry.and_then(|e| {
                        (e.operation == KvOperation::Put).then(|| LeaseEntry {
                            revision: e.revision,
                            record: DeliveryLease::from_kv(Some(&e.value)),
                        })
                    })))
                }
                (_, other) => Outcome::Failed(Failure::Other {
                    description: format!("unexpected reply to a lease command: {other:?}"),
                }),
            },
            Outcome::Failed(f) => Outcome::Failed(f),
            Outcome::Unknown => Outcome::Unknown,
        };
        let result = self.lease.handle_completion(now, lease_op, translated);
        debug_assert!(result.is_ok(), "lease completion refused: {result:?}");
    }

    pub(super) fn on_lease_event(&mut self, now: Now, ev: LeaseEvent) {
        match &ev {
            LeaseEvent::Acquired { .. } => {
                self.emit(DeliveryEvent::Lease(ev));
                if self.connected && !self.stopped {
                    self.open_feeds(now);
                    // Losses an earlier incarnation could not write yet.
                    self.notices.resume(&mut self.cx);
                }
                return;
            }
            LeaseEvent::Lost { .. } => {
                self.cx.counters.lease_lost += 1;
                self.stop();
                self.schedule_reacquire(now);
            }
            LeaseEvent::AcquireFailed { .. } => {
                self.stop();
                self.schedule_reacquire(now);
            }
            LeaseEvent::Reclaimed { .. } => self.cx.counters.lease_reclaims += 1,
            LeaseEvent::Released | LeaseEvent::ReleaseSkipped { .. } => self.stop(),
            _ => {}
        }
        self.emit(DeliveryEvent::Lease(ev));
    }

    /// Starts an acquisition: with [`DeliveryConfig::lease_ttl_from_bucket`], once the lease
    /// bucket's TTL is read ([`Delivery::on_lease_ttl`]); else at once. Called with the lease
    /// idle and the daemon connected.
    pub(super) fn acquire_lease(&mut self, now: Now) {
        if !self.config.lease_ttl_from_bucket {
            let r = self.lease.acquire(now);
            debug_assert!(r.is_ok(), "acquire from idle: {r:?}");
            return;
        }
        if self.pending.values().any(|p| *p == Pending::LeaseTtl) {
            return;
        }
        let stream = KvBucket::Delivery.stream_name(&self.config.space);
        let op = self.op(Pending::LeaseTtl);
        self.cx.push(Command::StreamInfo { op, stream });
    }

    /// The lease bucket's `STREAM.INFO` came back: the lease is retimed by its TTL when that
    /// differs from the timing in use, then acquired. A failed read, or a TTL too short to renew
    /// in, is reported and read again after [`REACQUIRE_DELAY`]: acquiring on a guess could
    /// trust a lease the broker already expired.
    pub(super) fn on_lease_ttl(&mut self, now: Now, outcome: Outcome<Reply>) {
        // Only an idle lease is acquired: a shutdown meanwhile released it (a connection loss
        // dropped the read: its answer never comes here).
        if self.lease.state() != LeaseState::Idle {
            return;
        }
        let unusable = match outcome {
            Outcome::Success(Reply::StreamState(state)) => {
                let ttl = Duration::from_millis(state.max_age_ms);
                if state.max_age_ms == 0 || ttl == self.lease.config().ttl() {
                    None
                } else {
                    match LeaseConfig::for_ttl(ttl) {
                        Ok(timing) => {
                            let r = self.lease.retime(timing);
                            debug_assert!(r.is_ok(), "retime while idle: {r:?}");
                            self.emit(DeliveryEvent::LeaseTtl { ttl });
                            None
                        }
                        Err(e) => Some(format!("the lease bucket's TTL {ttl}: {e}")),
                    }
                }
            }
            Outcome::Success(other) => Some(format!("unexpected reply {other:?}")),
            Outcome::Failed(f) => Some(format!("reading the lease bucket's TTL: {f}")),
            Outcome::Unknown => Some("reading the lease bucket's TTL: outcome unknown".into()),
        };
        match unusable {
            None => {
                let r = self.lease.acquire(now);
                debug_assert!(r.is_ok(), "acquire from idle: {r:?}");
            }
            Some(detail) => {
                self.emit(DeliveryEvent::LeaseTtlUnusable { detail });
                self.cx
                    .timers
                    .set(Timer::LeaseTtlRead, now.at + REACQUIRE_DELAY);
            }
        }
    }

    /// After a lost lease (or one not acquired): a new incarnation [`REACQUIRE_DELAY`] later,
    /// unless the daemon is shutting down or the configuration ends it here.
    fn schedule_reacquire(&mut self, now: Now) {
        if self.config.reacquire_lease && !self.shut_down {
            self.cx
                .timers
                .set(Timer::Reacquire, now.at + REACQUIRE_DELAY);
        }
    }

    /// The reacquire timer fired: start over now, or at the reconnect.
    pub(super) fn on_reacquire_timer(&mut self, now: Now) {
        if self.shut_down {
            return;
        }
        if self.connected {
            self.reincarnate(now);
        } else {
            self.reacquire_due = true;
        }
    }

    /// Starts over as a new incarnation: everything the old one held is dropped (it stopped at the
    /// loss: feeds closed, jobs abandoned, held deliveries handed back), except what must outlive
    /// it: the op-id allocator and the commands and events not yet taken (so no op id is reused
    /// and no late completion is misrouted), the subscription ids, the counters, and the loss
    /// notices still waiting (loss is never silent). Then a fresh lease is acquired; its
    /// `Acquired` opens the feeds and reloads the views as at boot.
    pub(super) fn reincarnate(&mut self, now: Now) {
        let mut next = Delivery::new(self.config.clone());
        // The timing read from the lease bucket carries over (it is read again before the
        // acquisition; an unchanged TTL is not reported again).
        let r = next.lease.retime(*self.lease.config());
        debug_assert!(r.is_ok(), "retime of a fresh lease: {r:?}");
        // The record of our own last hold may be written over at once (it stopped writing at
        // the loss): no TTL's wait for ourselves.
        if let Some(prior) = self.lease.prior_hold() {
            let r = next.lease.reclaim(prior);
            debug_assert!(r.is_ok(), "reclaim on a fresh lease: {r:?}");
        }

        std::mem::swap(&mut next.cx, &mut self.cx);
        next.cx.timers = crate::op::TimerTable::new();
        next.feeds = self.feeds.successor();
        next.notices =
            std::mem::replace(&mut self.notices, Notifier::new(self.config.space.clone()));
        next.connected = self.connected;
        next.incarnation = self.incarnation + 1;
        next.cx.counters.lease_reacquisitions += 1;
        *self = next;
        self.emit(DeliveryEvent::Reincarnated {
            incarnation: self.incarnation,
        });
        self.acquire_lease(now);
    }

    /// Stops every piece of work: the lease is gone.
    ///
    /// Deliveries still held (a fan-out whose copies are not all stored, a transfer whose DLV
    /// PubAck has not come) are handed back with a nak after [`HAND_BACK_DELAY`], so the successor
    /// gets them within a second instead of after the consumer's `ack_wait` (60 s). Redoing them is safe: every copy
    /// carries its msg-id, so the stream collapses a copy already stored.
    pub(super) fn stop(&mut self) {
        self.close_feeds();
        self.jobs
            .abandon_jobs(&mut self.cx, AbandonReason::LeaseNotHeld);
        let mut held: Vec<DeliveryId> = self.fanout.stop(&mut self.cx);
        held.extend(self.reader.stop());
        self.notices.interrupt();
        self.give_up_gap_checks("the daemon stopped before checking");
        self.sweeper.interrupt();
        if self.connected {
            for delivery in held {
                self.settle(
                    delivery,
                    AckKind::Nak {
                        delay: HAND_BACK_DELAY,
                    },
                );
            }
        }
        self.stopped = true;
    }
}
