//! Receiving: the authenticity filter and the ledger.

use super::*;

impl Agent {
    pub(super) fn ingest_stored(&mut self, now: Now, m: &StoredMessage) {
        self.ingest_chat(now, &m.subject, &m.payload, CopySource::Backfill);
    }

    /// The authenticity filter of the live and backfill paths, then the ledger.
    pub(super) fn ingest_chat(
        &mut self,
        now: Now,
        subject: &str,
        payload: &Bytes,
        source: CopySource,
    ) {
        let Ok(Subject::Chat {
            sender, channel, ..
        }) = Subject::parse(subject)
        else {
            // Not a chat subject: dropped silently, as the reference does.
            return;
        };
        let msg = match CotalMessage::decode(payload) {
            Ok(m) => m,
            Err(_) => {
                bump(&mut self.cx.counters.malformed);
                self.cx.events.push_back(AgentEvent::Anomaly {
                    subject: subject.to_owned(),
                    rejection: Rejection::Malformed,
                });
                return;
            }
        };
        if msg.from.id != sender {
            bump(&mut self.cx.counters.spoofed);
            self.cx.events.push_back(AgentEvent::Anomaly {
                subject: subject.to_owned(),
                rejection: Rejection::Spoofed,
            });
            return;
        }
        if sender == self.cx.config.me.id {
            bump(&mut self.cx.counters.own_echoes);
            return;
        }
        let historical = matches!(source, CopySource::Backfill);
        self.ingest(
            now,
            msg,
            Some(channel),
            (DeliveryKind::Channel, None),
            historical,
            source,
        );
    }

    pub(super) fn ingest(
        &mut self,
        now: Now,
        msg: CotalMessage,
        channel: Option<ConcreteChannel>,
        (kind, role): (DeliveryKind, Option<Role>),
        historical: bool,
        source: CopySource,
    ) {
        let me = self.cx.config.me.name.to_lowercase();
        let mentions_me = msg.mentions.contains(&me);
        let id = MessageId::new(msg.id.clone());
        // A live copy of a channel whose durable backstop is established has a durable twin on
        // its way (the membership interval starts at the watermark, and live copies lie above
        // it, I5): shedding it under overflow costs latency, not the message.
        let twin_coming = matches!(source, CopySource::Live)
            && channel
                .as_ref()
                .and_then(|c| self.channels.get(&c.as_channel()))
                .is_some_and(|e| matches!(e.backstop, BackstopState::Established { .. }));
        let shed_channel = channel.clone();
        let arrival = Arrival {
            message: msg,
            channel,
            historical,
            mentions_me,
            kind,
            role,
        };
        match self.ledger.ingest(now.at, id.clone(), source, arrival) {
            Ok(decision) => {
                if let Some(r) = decision.resolution() {
                    self.resolve(r);
                }
                if decision == Decision::OverflowLost {
                    match shed_channel.filter(|_| twin_coming) {
                        Some(channel) => {
                            bump(&mut self.cx.counters.live_copies_shed);
                            self.cx.events.push_back(AgentEvent::LiveCopyShed {
                                id: id.as_str().to_owned(),
                                channel,
                            });
                        }
                        None => self.cx.events.push_back(AgentEvent::Lost {
                            id: id.as_str().to_owned(),
                            reason: "receiver inbox full".into(),
                        }),
                    }
                }
                if decision.is_buffered() {
                    self.cx.events.push_back(AgentEvent::MessagesReady {
                        queued: self.ledger.queued_len(),
                    });
                }
            }
            Err(e) => {
                debug_assert!(false, "ledger misuse: {e}");
            }
        }
    }

    pub(super) fn on_delivery(&mut self, now: Now, d: DlvDelivery) {
        let durable = DurableDelivery::new(d.delivery)
            .with_stream_seq(d.stream_seq)
            .with_delivery_count(d.delivery_count);
        let msg = match CotalMessage::decode(&d.payload) {
            Ok(m) => m,
            Err(_) => {
                bump(&mut self.cx.counters.malformed);
                self.reject(now, d.delivery, &d.subject, Rejection::Malformed);
                return;
            }
        };
        if msg.from.id == self.cx.config.me.id {
            bump(&mut self.cx.counters.own_echoes);
            self.reject(now, d.delivery, &d.subject, Rejection::OwnEcho);
            return;
        }
        // DLV is written only by the daemon: trusted, no spoof check (§2(f)). The channel label
        // is the payload's route, which the daemon took from the authenticated subject.
        let channel = match &msg.route {
            Route::Channel(c) => Some(c.clone()),
            _ => None,
        };
        self.ingest(
            now,
            msg,
            channel,
            (DeliveryKind::Channel, None),
            false,
            CopySource::Durable(durable),
        );
    }

    /// A DM or TASK delivery (§2(f) `pump`): the kind and the sender come from the subject, and
    /// the subject must be the one this consumer's filter captures; bad JSON and a foreign
    /// subject are terminated as malformed, a spoof (`from.id` ≠ the subject's sender) is
    /// terminated, our own echo is acked; everything else goes to the ledger as a durable copy
    /// that is acked only once the application handled it.
    pub(super) fn on_direct_delivery(&mut self, now: Now, d: Direct, dd: DlvDelivery) {
        let expected = match (Subject::parse(&dd.subject), d) {
            (
                Ok(Subject::Unicast {
                    space,
                    target,
                    sender,
                }),
                Direct::Dm,
            ) if space == self.cx.config.space && target == self.cx.config.me.id => {
                Some((sender, DeliveryKind::Dm, None))
            }
            (
                Ok(Subject::Anycast {
                    space,
                    role,
                    sender,
                }),
                Direct::Svc(i),
            ) if space == self.cx.config.space && self.cx.config.roles.get(i) == Some(&role) => {
                Some((sender, DeliveryKind::Anycast, Some(role)))
            }
            _ => None,
        };
        let Some((sender, kind, role)) = expected else {
            // Our consumer's filter never captures this: nothing here can be authenticated.
            bump(&mut self.cx.counters.malformed);
            bump(&mut self.cx.counters.direct_malformed);
            self.reject(now, dd.delivery, &dd.subject, Rejection::Malformed);
            return;
        };
        let msg = match CotalMessage::decode(&dd.payload) {
            Ok(m) => m,
            Err(_) => {
                bump(&mut self.cx.counters.malformed);
                bump(&mut self.cx.counters.direct_malformed);
                self.reject(now, dd.delivery, &dd.subject, Rejection::Malformed);
                return;
            }
        };
        if msg.from.id != sender {
            bump(&mut self.cx.counters.spoofed);
            bump(&mut self.cx.counters.direct_spoofed);
            self.reject(now, dd.delivery, &dd.subject, Rejection::Spoofed);
            return;
        }
        if sender == self.cx.config.me.id {
            bump(&mut self.cx.counters.own_echoes);
            self.reject(now, dd.delivery, &dd.subject, Rejection::OwnEcho);
            return;
        }
        let durable = DurableDelivery::new(dd.delivery)
            .with_stream_seq(dd.stream_seq)
            .with_delivery_count(dd.delivery_count);
        self.ingest(
            now,
            msg,
            None,
            (kind, role),
            false,
            CopySource::Durable(durable),
        );
    }

    pub(super) fn reject(
        &mut self,
        now: Now,
        delivery: DeliveryId,
        subject: &str,
        rejection: Rejection,
    ) {
        let durable = DurableDelivery::new(delivery);
        match self
            .ledger
            .reject(now.at, CopySource::Durable(durable), rejection)
        {
            Ok(Some(r)) => self.resolve(r),
            Ok(None) => {}
            Err(e) => debug_assert!(false, "ledger misuse: {e}"),
        }
        if rejection != Rejection::OwnEcho {
            self.cx.events.push_back(AgentEvent::Anomaly {
                subject: subject.to_owned(),
                rejection,
            });
        }
    }
}
