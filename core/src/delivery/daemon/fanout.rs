//! Fan-out: every CHAT delivery routed into dinbox copies, batches, held copies and
//! back-pressure, the inbox backlog.

use super::*;

impl Delivery {
    pub(super) fn on_fanout(
        &mut self,
        now: Now,
        delivery: DeliveryId,
        seq: u64,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        self.fanout_high = self.fanout_high.max(seq);
        if self.gaps.offered(seq) {
            self.next_gap_check();
        }
        let space = &self.config.space;
        let (sender, channel) = match Subject::parse(subject) {
            Ok(Subject::Chat {
                space: s,
                sender,
                channel,
            }) if &s == space => (sender, channel),
            _ => return self.fanout_anomaly(delivery, seq, subject, FanoutAnomaly::NotChat),
        };
        let msg = match CotalMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                let a = FanoutAnomaly::Undecodable(e.to_string());
                return self.fanout_anomaly(delivery, seq, subject, a);
            }
        };
        if msg.from.id != sender {
            let a = FanoutAnomaly::Spoofed {
                sender,
                claimed: msg.from.id.clone(),
            };
            return self.fanout_anomaly(delivery, seq, subject, a);
        }
        let shard = self.config.shard;
        let class = self
            .views
            .channels
            .policy_for(&channel.as_channel())
            .delivery_class;
        let roster = &self.views.roster;
        let acls = &self.views.acls;
        let reference_g17 = self.config.reference_gap_g17;
        let views: Vec<Cow<'_, MembershipRecord>> = self
            .views
            .members
            .channel(&channel)
            .map(|r| routing_view(r, seq))
            .collect();
        let decision = route(
            &msg,
            &channel,
            seq,
            class,
            views.iter().map(|v| v.as_ref()),
            |name| {
                if reference_g17 {
                    roster.resolve_reference(name)
                } else {
                    roster.resolve(name, now.at, acls)
                }
            },
            |owner| acls.get(owner).map(|v| &v.read),
        );
        // A mention that reaches nobody is reported, by the first shard only (every shard
        // routes every message) and on the first delivery only (not again on a redelivery).
        if shard.index() == 0 && delivery_count <= 1 {
            for skipped in &decision.skipped_mentions {
                let counter = match skipped.reason {
                    MentionSkipReason::Ambiguous => &mut self.cx.counters.mentions_ambiguous,
                    MentionSkipReason::Unknown => &mut self.cx.counters.mentions_unknown,
                    _ => continue,
                };
                *counter += 1;
                self.emit(DeliveryEvent::MentionUnresolved {
                    channel: channel.clone(),
                    seq,
                    name: skipped.name.clone(),
                    reason: skipped.reason,
                });
            }
        }
        let entries: Vec<Routed> = decision
            .entries
            .into_iter()
            .filter(|r| shard.owns(&r.owner))
            .collect();
        if entries.is_empty() {
            return self.settle(delivery, AckKind::Ack);
        }
        // Per-owner back-pressure (G6): INBOX keeps the newest 1000 entries of an owner, so a
        // copy written while 1000 newer ones wait for the reader is discarded unread. An owner at
        // the high water gets its copy from this very delivery, held until the reader drained.
        let (entries, held): (Vec<Routed>, Vec<Routed>) = entries
            .into_iter()
            .partition(|r| self.inbox.admits(&r.owner));
        self.next_batch += 1;
        let batch = self.next_batch;
        if !held.is_empty() {
            self.cx.counters.fanout_deferred += 1;
            for r in &held {
                self.held_for
                    .entry(r.owner.clone())
                    .or_default()
                    .insert(batch);
                if self.backpressured.insert(r.owner.clone()) {
                    let backlog = self.inbox.bound(&r.owner);
                    self.emit(DeliveryEvent::DinboxBackpressure {
                        owner: r.owner.clone(),
                        backlog,
                    });
                }
            }
            if self.cx.timers.get(&Timer::HeldCopies).is_none() {
                self.cx
                    .timers
                    .set(Timer::HeldCopies, now.at + BACKLOG_RECHECK);
            }
            // A hold may rest on an over-count: read the truth (paced).
            if self.inbox.needs_recheck(now.at) {
                self.read_inbox_backlog(now);
            }
        }
        let held_since = (!held.is_empty()).then_some(now.at);
        self.batches.insert(
            batch,
            FanoutBatch {
                delivery,
                seq,
                delivery_count,
                channel,
                outstanding: 0,
                failed: false,
                held,
                held_since,
                deferred: false,
            },
        );
        for routed in entries {
            self.publish_copy(batch, routed);
        }
    }

    /// Writes one routed copy of fan-out batch `batch` to its owner's dinbox.
    pub(super) fn publish_copy(&mut self, batch: BatchId, routed: Routed) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding += 1;
        let subject = Subject::Dinbox {
            space: self.config.space.clone(),
            owner: routed.owner.clone(),
        }
        .to_string();
        let msg_id = routed.msg_id().to_string();
        let payload = json::encode(&routed.entry);
        let op = self.op(Pending::Fanout {
            batch,
            owner: routed.owner,
            generation: routed.entry.generation,
        });
        self.cx.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    /// Writes the copies held for `owner`, oldest CHAT message first, as many as its backlog has
    /// room for under the high water. (A copy counts once stored; the few in flight meanwhile fit
    /// in the margin between the high water and the cap.)
    pub(super) fn release_held(&mut self, owner: &AgentId) {
        let room = DINBOX_HIGH_WATER.saturating_sub(self.inbox.bound(owner));
        for _ in 0..room {
            let Some(batches) = self.held_for.get_mut(owner) else {
                return;
            };
            let Some(batch) = batches.pop_first() else {
                self.held_for.remove(owner);
                return;
            };
            if batches.is_empty() {
                self.held_for.remove(owner);
            }
            let Some(b) = self.batches.get_mut(&batch) else {
                continue;
            };
            let Some(at) = b.held.iter().position(|r| &r.owner == owner) else {
                continue;
            };
            let routed = b.held.swap_remove(at);
            if b.held.is_empty() {
                b.held_since = None;
            }
            self.publish_copy(batch, routed);
        }
    }

    /// Every hold whose owner the reader has drained below the high water is released.
    pub(super) fn release_all_held(&mut self) {
        let owners: Vec<AgentId> = self
            .held_for
            .keys()
            .filter(|o| self.inbox.admits(o))
            .cloned()
            .collect();
        for owner in owners {
            self.release_held(&owner);
        }
    }

    /// [`Timer::HeldCopies`]: holds older than [`FANOUT_HOLD_LIMIT`] give up (their message is
    /// naked once its other copies are stored), the reader consumer is read again if a hold may
    /// rest on an over-count, and the timer is set again while anything is held.
    pub(super) fn on_held_timer(&mut self, now: Now) {
        let expired: Vec<BatchId> = self
            .batches
            .iter()
            .filter(|(_, b)| {
                b.held_since
                    .is_some_and(|t| now.at.saturating_since(t) >= FANOUT_HOLD_LIMIT)
            })
            .map(|(id, _)| *id)
            .collect();
        for batch in expired {
            let Some(b) = self.batches.get_mut(&batch) else {
                continue;
            };
            let held = std::mem::take(&mut b.held);
            b.held_since = None;
            b.deferred = true;
            self.cx.counters.fanout_hold_expired += 1;
            for r in held {
                if let Some(set) = self.held_for.get_mut(&r.owner) {
                    set.remove(&batch);
                    if set.is_empty() {
                        self.held_for.remove(&r.owner);
                    }
                }
            }
            self.finish_batch_if_done(batch);
        }
        if !self.held_for.is_empty() {
            if self.inbox.needs_recheck(now.at) {
                self.read_inbox_backlog(now);
            }
            self.cx
                .timers
                .set(Timer::HeldCopies, now.at + BACKLOG_RECHECK);
        }
    }

    pub(super) fn fanout_anomaly(
        &mut self,
        delivery: DeliveryId,
        seq: u64,
        subject: &str,
        anomaly: FanoutAnomaly,
    ) {
        self.cx.counters.fanout_anomalies += 1;
        self.settle(delivery, AckKind::Term);
        self.emit(DeliveryEvent::FanoutTerminated {
            seq,
            subject: subject.to_owned(),
            anomaly,
        });
    }

    pub(super) fn count_stored(&mut self, owner: &AgentId, duplicate: bool) {
        if duplicate {
            self.cx.counters.copies_duplicate += 1;
            return;
        }
        self.cx.counters.copies_written += 1;
        let n = self.inbox.stored(owner);
        if n == OWNER_CAP {
            let backlog = n;
            self.cx.counters.cap_reached += 1;
            self.emit(DeliveryEvent::DinboxCapReached {
                owner: owner.clone(),
                backlog,
            });
        }
    }

    pub(super) fn count_settled(&mut self, owner: &AgentId) {
        if self.inbox.settled(owner) && !self.held_for.is_empty() {
            // A predecessor's entry: the legacy bounds every owner.
            self.release_all_held();
        }
        if self.inbox.admits(owner) {
            if self.held_for.contains_key(owner) {
                self.release_held(owner);
            }
            // The episode ends when nothing of the owner's is held any more.
            if !self.held_for.contains_key(owner) {
                self.backpressured.remove(owner);
            }
        }
    }

    /// Reads the reader consumer's unread total (at its bind, and when a hold may rest on an
    /// over-count).
    pub(super) fn read_inbox_backlog(&mut self, now: Now) {
        if !self.connected || self.stopped {
            return;
        }
        self.inbox.check_started(now.at);
        let op = self.op(Pending::InboxBacklog);
        let reader = ConsumerSpec::reader(
            &self.config.space,
            self.config.shard.index(),
            self.config.shard.shards(),
        );
        self.cx.commands.push_back(Command::ConsumerInfo {
            op,
            stream: reader.stream,
            consumer: reader.name,
        });
    }

    pub(super) fn on_inbox_backlog(&mut self, now: Now, outcome: Outcome<Reply>) {
        match outcome {
            Outcome::Success(Reply::ConsumerState(state)) => {
                self.inbox.clamp(state.unread());
                self.release_all_held();
                let (inbox, held_for) = (&self.inbox, &self.held_for);
                self.backpressured
                    .retain(|owner| !inbox.admits(owner) || held_for.contains_key(owner));
            }
            other => {
                self.inbox.check_failed();
                self.cx.counters.backlog_unverified += 1;
                self.emit(DeliveryEvent::BacklogUnverified {
                    owner: None,
                    detail: outcome_detail(&other),
                });
            }
        }
        if self.lease_held() {
            self.maybe_open_consumers(now);
        }
    }

    pub(super) fn on_fanout_publish(
        &mut self,
        batch: BatchId,
        owner: AgentId,
        generation: u64,
        outcome: Outcome<Reply>,
    ) {
        let ok = match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                self.count_stored(&owner, ack.duplicate);
                None
            }
            Outcome::Failed(f) => Some(Some(f)),
            _ => Some(None),
        };
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding = b.outstanding.saturating_sub(1);
        if let Some(failure) = ok {
            b.failed = true;
            let (channel, seq) = (b.channel.clone(), b.seq);
            self.cx.counters.writes_failed += 1;
            self.emit(DeliveryEvent::CopyWriteFailed {
                owner,
                channel,
                seq,
                generation,
                failure,
            });
        }
        self.finish_batch_if_done(batch);
    }

    /// Settles a fan-out batch's CHAT delivery once no copy is in flight or held: acked when
    /// every copy is stored, naked with backoff after a failed write (the msg-id collapses the
    /// copies already stored), naked with [`backpressure_delay`] after a hold gave up. A failed
    /// write ends the holds too (the redelivery writes everything again).
    pub(super) fn finish_batch_if_done(&mut self, batch: BatchId) {
        let Some(b) = self.batches.get(&batch) else {
            return;
        };
        if b.outstanding > 0 || (!b.held.is_empty() && !b.failed) {
            return;
        }
        let Some(b) = self.batches.remove(&batch) else {
            return;
        };
        for r in &b.held {
            if let Some(set) = self.held_for.get_mut(&r.owner) {
                set.remove(&batch);
                if set.is_empty() {
                    self.held_for.remove(&r.owner);
                }
            }
        }
        if b.failed {
            self.writes_failing = true;
            let attempt = u32::try_from(b.delivery_count.saturating_sub(1)).unwrap_or(u32::MAX);
            self.settle(
                b.delivery,
                AckKind::Nak {
                    delay: backoff(attempt),
                },
            );
        } else if b.deferred {
            self.writes_failing = false;
            self.settle(
                b.delivery,
                AckKind::Nak {
                    delay: backpressure_delay(b.delivery_count),
                },
            );
        } else {
            self.writes_failing = false;
            self.settle(b.delivery, AckKind::Ack);
        }
    }
}

/// The record fan-out routes `seq` by: the record itself when its current interval admits `seq`,
/// else a view of the closed generation whose interval does (G2 on the fan-out side).
///
/// Without it, a message that fan-out reaches only after its member left **and rejoined** would be
/// judged by the new generation's interval alone and never routed, although it lies in the old
/// generation's window (the reference loses it). The view carries the old generation, so the
/// entry's msg-id and the reader's check both use that generation.
fn routing_view(rec: &MembershipRecord, seq: u64) -> Cow<'_, MembershipRecord> {
    if crate::registry::durable_eligible(rec, seq) {
        return Cow::Borrowed(rec);
    }
    let closed = crate::registry::closed_intervals(rec)
        .into_iter()
        .find(|c| c.interval().contains(seq));
    match closed {
        Some(c) => {
            let mut view = rec.clone();
            view.generation = c.generation;
            view.join_cursor = c.join_cursor;
            view.leave_cursor = Some(c.leave_cursor);
            view.state = MemberState::LiveConfirmed;
            Cow::Owned(view)
        }
        None => Cow::Borrowed(rec),
    }
}
