//! The in-memory views fed by the watches (members, ACL, channels, roster, presence) and the
//! orphaned-membership scan over them.

use super::*;

impl Delivery {
    pub(super) fn on_kv_change(&mut self, now: Now, feed: Feed, entry: &KvEntry) {
        match feed {
            Feed::Members => {
                self.members.apply(entry);
            }
            Feed::Acl if self.acls.apply(entry) => {
                // The reserved names may have moved: a presence can start squatting.
                for notice in self.roster.audit(&self.acls) {
                    self.presence_ignored(notice);
                }
                if let Ok(owner) = AgentId::new(entry.key.as_str())
                    && self.config.shard.owns(&owner)
                {
                    self.sweeper.request(owner);
                }
            }
            Feed::Channels => {
                let value = (entry.operation == KvOperation::Put && !entry.value.is_empty())
                    .then_some(&entry.value[..]);
                // Keys that are neither a channel nor `=defaults` are ignored.
                let _ = self.channels.apply(&entry.key, value);
            }
            Feed::Presence => {
                if let Some(notice) = self.roster.apply(entry, now.at, &self.acls) {
                    self.presence_ignored(notice);
                }
                self.presence_heartbeat(entry);
            }
            _ => {}
        }
    }

    /// A presence key started to be ignored for `@mention` resolution: counted and reported,
    /// once per episode ([`Roster::apply`]).
    pub(super) fn presence_ignored(&mut self, notice: PresenceIgnored) {
        self.cx.counters.presence_ignored += 1;
        self.emit(DeliveryEvent::PresenceIgnored(notice));
    }

    // ---- orphaned memberships (issue 15 item 7, G12) ----

    /// Records a presence heartbeat of the entry's key (the owner's id): a put whose status is
    /// not `offline`. Expiry (the bucket's TTL) sends nothing, so an owner is offline since its
    /// last heartbeat, however its record ended.
    pub(super) fn presence_heartbeat(&mut self, entry: &KvEntry) {
        let Some(now) = self.last_now else {
            return;
        };
        let Ok(owner) = AgentId::new(entry.key.as_str()) else {
            return;
        };
        let online = entry.operation == KvOperation::Put
            && json::decode::<crate::wire::message::Presence>(&entry.value)
                .is_ok_and(|p| p.status != crate::wire::message::PresenceStatus::Offline);
        if online {
            self.presence_seen.insert(owner, now);
        }
    }

    /// Finds the open memberships (of this shard's owners) whose owner has been offline longer
    /// than the retention; reports each new one, tombstones it when the operator opted in, and
    /// publishes the list in the lease record ([`ORPHANS_FIELD`]).
    pub(super) fn scan_orphans(&mut self, now: Now) {
        self.cx
            .timers
            .set(Timer::OrphanScan, now.at + self.orphan_scan_interval());
        if !self.serving() {
            return;
        }
        let since = self.watching_since.unwrap_or(now.at);
        let retention = self.config.orphan_retention;
        let mut found: BTreeMap<(AgentId, ConcreteChannel), (u64, Duration)> = BTreeMap::new();
        for r in self.members.open_records() {
            if !self.config.shard.owns(&r.owner) {
                continue;
            }
            let last = self
                .presence_seen
                .get(&r.owner)
                .copied()
                .unwrap_or(since)
                .max(since);
            let offline_for = now.at - last;
            if offline_for > retention {
                found.insert(
                    (r.owner.clone(), r.channel.clone()),
                    (r.generation, offline_for),
                );
            }
        }
        let reap = self.config.reap_orphans;
        for ((owner, channel), (generation, offline_for)) in &found {
            if self.orphans.get(&(owner.clone(), channel.clone())) == Some(generation) {
                continue;
            }
            self.cx.counters.orphans_found += 1;
            self.emit(DeliveryEvent::MembershipOrphaned {
                owner: owner.clone(),
                channel: channel.clone(),
                generation: *generation,
                offline_for: *offline_for,
                reaping: reap,
            });
        }
        if reap {
            for ((owner, channel), (generation, _)) in &found {
                let key = SerialKey::Membership {
                    owner: owner.clone(),
                    channel: channel.clone(),
                };
                if self.lanes.contains_key(&key) {
                    // A join or leave of this membership is running: it decides first; the next
                    // scan looks again.
                    continue;
                }
                self.cx.counters.orphans_reaped += 1;
                self.held_requests += 1;
                self.lanes
                    .entry(key.clone())
                    .or_default()
                    .queue
                    .push_back(Work::Leave(crate::delivery::control::LeaveWork {
                        owner: owner.clone(),
                        channel: channel.clone(),
                        generation: *generation,
                        reply_to: String::new(),
                    }));
                self.pump(now, &key);
            }
        }
        let orphans: BTreeMap<(AgentId, ConcreteChannel), u64> =
            found.iter().map(|(k, (g, _))| (k.clone(), *g)).collect();
        if orphans != self.orphans {
            self.orphans = orphans;
            self.lease
                .annotate(ORPHANS_FIELD, self.published_orphans(&found, now));
        }
    }

    /// The lease record's [`ORPHANS_FIELD`]: the retention, whether this daemon reaps, the count
    /// and the first [`MAX_PUBLISHED_ORPHANS`] orphans.
    pub(super) fn published_orphans(
        &self,
        found: &BTreeMap<(AgentId, ConcreteChannel), (u64, Duration)>,
        _now: Now,
    ) -> serde_json::Value {
        let list: Vec<serde_json::Value> = found
            .iter()
            .take(MAX_PUBLISHED_ORPHANS)
            .map(|((owner, channel), (generation, offline_for))| {
                serde_json::json!({
                    "owner": owner.as_str(),
                    "channel": channel.as_str(),
                    "generation": generation,
                    "offlineMs": offline_for.as_millis(),
                })
            })
            .collect();
        serde_json::json!({
            "retentionMs": self.config.orphan_retention.as_millis(),
            "reap": self.config.reap_orphans,
            "count": found.len(),
            "memberships": list,
        })
    }

    /// How often orphans are looked for: half the retention, within 1 s ..
    /// [`ORPHAN_SCAN_INTERVAL`].
    pub(super) fn orphan_scan_interval(&self) -> Duration {
        let half = self.config.orphan_retention.as_millis() / 2;
        Duration::from_millis(half.clamp(1_000, ORPHAN_SCAN_INTERVAL.as_millis()))
    }

    /// The orphaned memberships of the last scan, `(owner, channel)` → generation.
    pub fn orphans(&self) -> &BTreeMap<(AgentId, ConcreteChannel), u64> {
        &self.orphans
    }
}
