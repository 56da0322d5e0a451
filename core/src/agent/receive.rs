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
}
