//! The reader: every dinbox entry authorized and transferred to DLV, the DLV backlog.

use super::*;

impl Delivery {
    pub(super) fn on_reader(
        &mut self,
        delivery: DeliveryId,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        let (owner, entry) = match decode_entry(subject, payload) {
            Ok(x) => x,
            Err(anomaly) => {
                self.cx.counters.terminated += 1;
                if let Ok(Subject::Dinbox { owner, .. }) = Subject::parse(subject) {
                    // Settled all the same: one fewer unread entry of that owner.
                    self.count_settled(&owner);
                }
                self.settle(delivery, AckKind::Term);
                return self.emit(DeliveryEvent::EntryTerminated {
                    subject: subject.to_owned(),
                    anomaly,
                });
            }
        };
        if !self.config.shard.owns(&owner) {
            // Another shard's reader (its own durable) handles this owner.
            return self.settle(delivery, AckKind::Ack);
        }
        let acl = self.views.acls.get(&owner).map(|v| &v.read);
        let record = self.views.members.get(&entry.channel, &owner);
        let mut decision = authorize(&entry, &owner, acl, record, delivery_count);
        if self.config.reference_gap_g2
            && entry.reason == Plane3Reason::DurableChannel
            && matches!(decision, Decision::Transfer { .. })
            && let Some(rec) = record
            && !durable_eligible(rec, entry.seq)
        {
            // The reference's reader: the current interval only (G2 switched back on).
            decision = Decision::Drop(match current_interval(rec) {
                Some(interval) => DropReason::OutsideInterval(interval),
                None => DropReason::InertGeneration {
                    generation: rec.generation,
                },
            });
        }
        self.apply_reader_decision(delivery, delivery_count, owner, entry, decision);
    }

    pub(super) fn apply_reader_decision(
        &mut self,
        delivery: DeliveryId,
        delivery_count: u64,
        owner: AgentId,
        entry: Plane3Entry,
        decision: Decision,
    ) {
        match decision {
            Decision::Transfer { msg_id } => {
                let (admit, _) = self.dlv.admit(&owner, &entry.msg.from.id, delivery);
                let dlv_owner = owner.clone();
                self.transfers.insert(
                    delivery,
                    Transfer {
                        delivery_count,
                        owner,
                        entry,
                        msg_id: msg_id.to_string(),
                    },
                );
                match admit {
                    DlvAdmit::Transfer => self.start_transfer(delivery),
                    DlvAdmit::Wait { read: false } => {}
                    DlvAdmit::Wait { read: true } => {
                        let consumer = ConsumerSpec::dlv(&self.config.space, &dlv_owner);
                        let transfers = &self.transfers;
                        let in_flight = self
                            .pending
                            .values()
                            .filter(|p| {
                                matches!(p, Pending::Transfer { delivery }
                                    if transfers.get(delivery).is_some_and(|t| t.owner == dlv_owner))
                            })
                            .count();
                        let op = self.op(Pending::DlvBacklog {
                            owner: dlv_owner,
                            in_flight: u64::try_from(in_flight).unwrap_or(u64::MAX),
                        });
                        self.cx.commands.push_back(Command::ConsumerInfo {
                            op,
                            stream: consumer.stream,
                            consumer: consumer.name,
                        });
                    }
                }
            }
            Decision::Drop(reason) => {
                self.cx.counters.dropped += 1;
                if reason.is_loss() {
                    self.cx.counters.lost += 1;
                    self.tell_loss(
                        &owner,
                        &entry.channel,
                        entry.seq,
                        LossReason::IntervalForgotten,
                    );
                }
                self.count_settled(&owner);
                self.settle(delivery, AckKind::Ack);
                self.emit(DeliveryEvent::EntryDropped {
                    owner,
                    channel: entry.channel,
                    seq: entry.seq,
                    generation: entry.generation,
                    reason,
                });
            }
            Decision::Defer { delay, .. } => {
                self.cx.counters.deferred += 1;
                self.settle(delivery, AckKind::Nak { delay });
            }
            Decision::GiveUp(g) => {
                self.cx.counters.terminated += 1;
                self.cx.counters.lost += 1;
                self.count_settled(&owner);
                self.settle(delivery, AckKind::Term);
                self.tell_loss(&g.owner, &g.channel, g.seq, LossReason::RedeliveryCeiling);
                self.emit(DeliveryEvent::EntryLost(g));
            }
            Decision::Terminate(anomaly) => {
                self.cx.counters.terminated += 1;
                self.count_settled(&owner);
                self.settle(delivery, AckKind::Term);
                self.emit(DeliveryEvent::EntryTerminated {
                    subject: Subject::Dinbox {
                        space: self.config.space.clone(),
                        owner,
                    }
                    .to_string(),
                    anomaly,
                });
            }
        }
    }

    /// Publishes an admitted transfer's DLV copy.
    pub(super) fn start_transfer(&mut self, delivery: DeliveryId) {
        let Some(t) = self.transfers.get(&delivery) else {
            return;
        };
        let subject = Subject::Dlv {
            space: self.config.space.clone(),
            owner: t.owner.clone(),
        }
        .to_string();
        let payload = dlv_payload(&t.entry);
        let msg_id = t.msg_id.clone();
        let op = self.op(Pending::Transfer { delivery });
        self.cx.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    pub(super) fn on_transfer(&mut self, delivery: DeliveryId, outcome: Outcome<Reply>) {
        let Some(t) = self.transfers.remove(&delivery) else {
            return;
        };
        self.sweep_if_revoked(&t.owner, &t.entry.channel);
        match outcome {
            Outcome::Success(Reply::PubAck(_)) => {
                self.cx.counters.transferred += 1;
                self.count_settled(&t.owner);
                self.settle(delivery, AckKind::Ack);
            }
            _ => {
                self.cx.counters.writes_failed += 1;
                self.dlv.unstored(&t.owner);
                let decision = after_transfer_failure(&t.entry, &t.owner, t.delivery_count);
                self.apply_reader_decision(delivery, t.delivery_count, t.owner, t.entry, decision);
            }
        }
    }
}
