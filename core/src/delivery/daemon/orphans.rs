//! Orphaned memberships (issue 15 item 7, G12): the parent's glue between the views (who is
//! offline), the control jobs (a reaping leave, queued on the membership's lane) and the lease
//! record (the published list, [`ORPHANS_FIELD`]).
//!
//! The scan runs on [`Timer::OrphanScan`] while the daemon serves. Its state (the last scan's
//! orphans and when the watch started) is the parent's.

use super::*;

impl Delivery {
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
        let found = self
            .views
            .offline_memberships(now.at, since, retention, self.config.shard);
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
                let leave = crate::delivery::control::LeaveWork {
                    owner: owner.clone(),
                    channel: channel.clone(),
                    generation: *generation,
                    reply_to: String::new(),
                };
                // A join or leave of this membership running decides first; the next scan looks
                // again.
                self.with_jobs(now, |jobs, env| jobs.reap(env, now, key, leave));
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
