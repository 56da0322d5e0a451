//! The in-memory views the KV watches feed: the membership index, the ACL index, the channel
//! registry, the presence roster, and when each owner was last seen online.
//!
//! [`Views`] owns them and applies every watched change ([`Views::apply`]); it issues no command
//! and holds no op. The other children read the views through the parent, which lends them as
//! arguments: fan-out routes by `members`, `acls`, `channels` and `roster`, the reader
//! authorizes by `acls` and `members`, the jobs list memberships and put their own confirmed
//! writes into `members`, the loss notices find the members of an evicted range, and the
//! orphan scan asks [`Views::offline_memberships`].

use super::context::Ctx;
use super::events::{DeliveryEvent, Feed};
use super::index::{AclIndex, MemberIndex, PresenceIgnored, Roster};
use crate::io::{KvEntry, KvOperation};
use crate::policy::ChannelRegistry;
use crate::time::{Duration, Instant};
use crate::wire::json;
use crate::wire::shard::Shard;
use crate::wire::token::{AgentId, ConcreteChannel};
use std::collections::BTreeMap;

/// The views child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Views {
    /// Every membership record, by channel and owner (the watch and our own confirmed writes).
    pub(super) members: MemberIndex,
    /// Every owner's ACL.
    pub(super) acls: AclIndex,
    /// Every channel's policy (its delivery class).
    pub(super) channels: ChannelRegistry,
    /// The presence records, for `@mention` resolution.
    pub(super) roster: Roster,
    /// The last presence heartbeat (a put that is not `offline`) seen per owner key.
    presence_seen: BTreeMap<AgentId, Instant>,
}

impl Views {
    pub(super) fn new() -> Self {
        Views {
            members: MemberIndex::new(),
            acls: AclIndex::new(),
            channels: ChannelRegistry::default(),
            roster: Roster::new(),
            presence_seen: BTreeMap::new(),
        }
    }

    /// Applies a watched change of `feed` at `now`. Returns the owner (of this shard) whose ACL
    /// changed: its DLV copies are to be swept ([`crate::delivery::revoke`]).
    pub(super) fn apply(
        &mut self,
        cx: &mut Ctx,
        now: Instant,
        feed: Feed,
        entry: &KvEntry,
        shard: Shard,
    ) -> Option<AgentId> {
        match feed {
            Feed::Members => {
                self.members.apply(entry);
            }
            Feed::Acl if self.acls.apply(entry) => {
                // The reserved names may have moved: a presence can start squatting.
                for notice in self.roster.audit(&self.acls) {
                    presence_ignored(cx, notice);
                }
                if let Ok(owner) = AgentId::new(entry.key.as_str())
                    && shard.owns(&owner)
                {
                    return Some(owner);
                }
            }
            Feed::Channels => {
                let value = (entry.operation == KvOperation::Put && !entry.value.is_empty())
                    .then_some(&entry.value[..]);
                // Keys that are neither a channel nor `=defaults` are ignored.
                let _ = self.channels.apply(&entry.key, value);
            }
            Feed::Presence => {
                if let Some(notice) = self.roster.apply(entry, now, &self.acls) {
                    presence_ignored(cx, notice);
                }
                self.presence_heartbeat(now, entry);
            }
            _ => {}
        }
        None
    }

    /// Records a presence heartbeat of the entry's key (the owner's id): a put whose status is
    /// not `offline`. Expiry (the bucket's TTL) sends nothing, so an owner is offline since its
    /// last heartbeat, however its record ended.
    fn presence_heartbeat(&mut self, now: Instant, entry: &KvEntry) {
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

    /// The open memberships of `shard`'s owners whose owner has been offline (no heartbeat
    /// since `since`, the start of the watch, or later) longer than `retention`:
    /// `(owner, channel)` → (generation, offline for).
    pub(super) fn offline_memberships(
        &self,
        now: Instant,
        since: Instant,
        retention: Duration,
        shard: Shard,
    ) -> BTreeMap<(AgentId, ConcreteChannel), (u64, Duration)> {
        let mut found = BTreeMap::new();
        for r in self.members.open_records() {
            if !shard.owns(&r.owner) {
                continue;
            }
            let last = self
                .presence_seen
                .get(&r.owner)
                .copied()
                .unwrap_or(since)
                .max(since);
            let offline_for = now - last;
            if offline_for > retention {
                found.insert(
                    (r.owner.clone(), r.channel.clone()),
                    (r.generation, offline_for),
                );
            }
        }
        found
    }
}

/// A presence key started to be ignored for `@mention` resolution: counted and reported, once
/// per episode ([`Roster::apply`]).
fn presence_ignored(cx: &mut Ctx, notice: PresenceIgnored) {
    cx.counters.presence_ignored += 1;
    cx.emit(DeliveryEvent::PresenceIgnored(notice));
}
