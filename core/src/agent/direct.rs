//! The DLV binding and the direct (dm / anycast) feeds.

use super::*;

impl Agent {
    /// Binds the DLV consumer. Unlike the reference (G20), a failed bind or an ended consumer is
    /// retried with backoff and shows in [`AgentHealth::dlv_bound`] meanwhile.
    pub(super) fn bind_dlv(&mut self) {
        if let Some(old) = self.dlv.take() {
            self.feeds.remove(&old);
        }
        let sub = self.cx.subs.next_id();
        self.feeds.insert(sub, Feed::Dlv);
        self.dlv = Some(sub);
        let op = self.op(Pending::DlvConsume);
        self.cx.commands.push_back(Command::Consume {
            op,
            sub,
            consumer: ConsumerSpec::dlv(&self.cx.config.space, &self.cx.config.me.id),
            create: self.cx.config.create_dlv_consumer,
            max_in_flight: u32::try_from(self.cx.config.ledger.max_pending).unwrap_or(u32::MAX),
        });
    }

    pub(super) fn dlv_unbound(&mut self, now: Now) {
        self.dlv_bound = false;
        if let Some(old) = self.dlv.take() {
            self.feeds.remove(&old);
            // The bind may have happened all the same (an unknown outcome): stop that feed before
            // the retry binds another, or it keeps taking deliveries nobody settles.
            self.cx
                .commands
                .push_back(Command::StopConsume { sub: old });
        }
        bump(&mut self.cx.counters.dlv_bind_failures);
        self.timers
            .set(Timer::DlvBind, now.at + backoff(self.dlv_attempts));
        self.dlv_attempts = self.dlv_attempts.saturating_add(1);
    }

    /// The consumer spec of a direct feed.
    pub(super) fn direct_spec(&self, d: Direct) -> ConsumerSpec {
        match d {
            // Open-mode self-creation carries the endpoint's inactive_threshold, as the reference
            // agent's does: both create the same `dm_<id>`.
            Direct::Dm if self.cx.config.create_direct_consumers => {
                ConsumerSpec::dm(&self.cx.config.space, &self.cx.config.me.id)
                    .with_inactive_threshold(DEFAULT_INACTIVE_THRESHOLD)
            }
            Direct::Dm => ConsumerSpec::dm(&self.cx.config.space, &self.cx.config.me.id),
            Direct::Svc(i) => match self.cx.config.roles.get(i) {
                Some(role) => ConsumerSpec::svc(&self.cx.config.space, role),
                None => {
                    debug_assert!(false, "svc feed {i} without a role");
                    ConsumerSpec::dm(&self.cx.config.space, &self.cx.config.me.id)
                }
            },
        }
    }

    /// Binds (or, in open mode, creates and binds) one direct consumer.
    pub(super) fn bind_direct(&mut self, d: Direct) {
        let Some(old) = self.direct.get_mut(&d).map(|f| f.sub.take()) else {
            return;
        };
        if let Some(old) = old {
            self.feeds.remove(&old);
        }
        let sub = self.cx.subs.next_id();
        self.feeds.insert(sub, Feed::Direct(d));
        if let Some(feed) = self.direct.get_mut(&d) {
            feed.sub = Some(sub);
            feed.bound = false;
        }
        let op = self.op(Pending::DirectConsume { direct: d, sub });
        let consumer = self.direct_spec(d);
        self.cx.commands.push_back(Command::Consume {
            op,
            sub,
            consumer,
            create: self.cx.config.create_direct_consumers,
            max_in_flight: u32::try_from(self.cx.config.ledger.max_pending).unwrap_or(u32::MAX),
        });
    }

    /// A direct consumer's bind failed or its feed ended: stop it and retry after the backoff.
    /// The first failure in a row, and every fifth after it, is an [`AgentEvent::DirectUnbound`].
    pub(super) fn direct_unbound(&mut self, now: Now, d: Direct, detail: String) {
        let consumer = self.direct_spec(d).name;
        let Some(feed) = self.direct.get_mut(&d) else {
            return;
        };
        feed.bound = false;
        let old = feed.sub.take();
        let attempts = feed.attempts;
        feed.attempts = feed.attempts.saturating_add(1);
        if let Some(old) = old {
            self.feeds.remove(&old);
            // As for DLV: an unknown bind may have happened; stop it before the retry.
            self.cx
                .commands
                .push_back(Command::StopConsume { sub: old });
        }
        bump(&mut self.cx.counters.direct_bind_failures);
        if attempts.is_multiple_of(5) {
            self.cx.events.push_back(AgentEvent::DirectUnbound {
                consumer,
                attempts: attempts.saturating_add(1),
                detail,
            });
        }
        self.timers
            .set(Timer::DirectBind(d), now.at + backoff(attempts));
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
