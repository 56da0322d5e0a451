//! The daemon's in-memory views of its KV buckets (gap G25: no KV scan per message).
//!
//! Each view is fed by a KV watch ([`crate::io::Command::KvWatch`]) and, for memberships, also by
//! the daemon's own confirmed writes. Every entry keeps the revision it was read at, and a view
//! only moves forward: a change at a revision not above the stored one is ignored, so a late
//! watch echo of our own write, or a confirmation that arrives after a newer watched change,
//! never rolls a record back. Deleted keys remember the revision of their delete marker for the
//! same reason.

use crate::acl::ReadAcl;
use crate::delivery::route::MentionResolution;
use crate::io::{KvEntry, KvOperation};
use crate::wire::control::MembershipSummary;
use crate::wire::json;
use crate::wire::keys::parse_member_key;
use crate::wire::message::{Extra, Presence};
use crate::wire::records::{AclRecord, MembershipRecord};
use crate::wire::token::{AgentId, Channel, ConcreteChannel};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot<T> {
    revision: u64,
    value: Option<T>,
}

/// Applies a revisioned change to a slot map; true when it moved the view.
fn apply_slot<K: Ord, T>(
    map: &mut BTreeMap<K, Slot<T>>,
    key: K,
    revision: u64,
    value: Option<T>,
) -> bool {
    match map.get(&key) {
        Some(slot) if slot.revision >= revision => false,
        _ => {
            map.insert(key, Slot { revision, value });
            true
        }
    }
}

/// Channel → owner → membership record (tombstones included), with revisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberIndex {
    by_channel: BTreeMap<ConcreteChannel, BTreeMap<AgentId, Slot<MembershipRecord>>>,
}

impl MemberIndex {
    /// An empty index.
    pub fn new() -> Self {
        MemberIndex::default()
    }

    /// Applies a confirmed write or a watched value of `record` at `revision`; true when the
    /// view changed.
    pub fn put(&mut self, record: MembershipRecord, revision: u64) -> bool {
        let channel = record.channel.clone();
        let owner = record.owner.clone();
        apply_slot(
            self.by_channel.entry(channel).or_default(),
            owner,
            revision,
            Some(record),
        )
    }

    /// Applies a delete (or purge, or an undecodable value) of `(channel, owner)` at `revision`.
    pub fn remove(&mut self, channel: &ConcreteChannel, owner: &AgentId, revision: u64) -> bool {
        apply_slot(
            self.by_channel.entry(channel.clone()).or_default(),
            owner.clone(),
            revision,
            None,
        )
    }

    /// Applies one watched entry of the members bucket. A key that is not `<channel>/<owner>` is
    /// ignored (`false`); a value that does not decode, or names another key, reads as absent
    /// (as `readMember` does).
    pub fn apply(&mut self, entry: &KvEntry) -> bool {
        let Ok(key) = parse_member_key(&entry.key) else {
            return false;
        };
        let record = match entry.operation {
            KvOperation::Put => MembershipRecord::from_kv(Some(&entry.value))
                .filter(|r| r.channel == key.channel && r.owner == key.owner),
            KvOperation::Delete | KvOperation::Purge => None,
        };
        match record {
            Some(r) => self.put(r, entry.revision),
            None => self.remove(&key.channel, &key.owner, entry.revision),
        }
    }

    /// The record of `(channel, owner)`.
    pub fn get(&self, channel: &ConcreteChannel, owner: &AgentId) -> Option<&MembershipRecord> {
        self.by_channel.get(channel)?.get(owner)?.value.as_ref()
    }

    /// The revision the index holds for `(channel, owner)` (also for a remembered delete).
    pub fn revision(&self, channel: &ConcreteChannel, owner: &AgentId) -> Option<u64> {
        Some(self.by_channel.get(channel)?.get(owner)?.revision)
    }

    /// Every record (tombstones included), in channel then owner order.
    pub fn records(&self) -> impl Iterator<Item = &MembershipRecord> {
        self.by_channel
            .values()
            .flat_map(|m| m.values())
            .filter_map(|s| s.value.as_ref())
    }

    /// Every record of `channel`, in owner order.
    pub fn channel(&self, channel: &ConcreteChannel) -> impl Iterator<Item = &MembershipRecord> {
        self.by_channel
            .get(channel)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|s| s.value.as_ref())
    }

    /// `ownerMemberships(owner)`: the owner's records with no leave cursor, in channel order.
    pub fn owner_memberships(&self, owner: &AgentId) -> Vec<MembershipSummary> {
        self.by_channel
            .values()
            .filter_map(|m| m.get(owner)?.value.as_ref())
            .filter(|r| r.leave_cursor.is_none())
            .map(|r| MembershipSummary {
                channel: r.channel.clone(),
                generation: r.generation,
                activated: r.is_activated(),
                extra: Extra::new(),
            })
            .collect()
    }

    /// How many records the index holds.
    pub fn len(&self) -> usize {
        self.by_channel
            .values()
            .flat_map(|m| m.values())
            .filter(|s| s.value.is_some())
            .count()
    }

    /// True when it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One owner's read ACL as the daemon holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclView {
    /// The record as stored.
    pub record: AclRecord,
    /// Its coverage: the `allowSubscribe` entries that are valid channel patterns (an invalid
    /// entry covers nothing, fail closed, as [`crate::delivery::control::gate_join`] reads it).
    pub read: ReadAcl,
}

/// Owner → read ACL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclIndex {
    by_owner: BTreeMap<AgentId, Slot<AclView>>,
}

impl AclIndex {
    /// An empty index.
    pub fn new() -> Self {
        AclIndex::default()
    }

    /// Applies one watched entry of the ACL bucket (key = the owner id). Absent or undecodable
    /// values ([`AclRecord::from_kv`]) remove the owner's ACL.
    pub fn apply(&mut self, entry: &KvEntry) -> bool {
        let Ok(owner) = AgentId::new(entry.key.as_str()) else {
            return false;
        };
        let record = match entry.operation {
            KvOperation::Put => AclRecord::from_kv(Some(&entry.value)),
            KvOperation::Delete | KvOperation::Purge => None,
        };
        let view = record.map(|record| AclView {
            read: ReadAcl::new(
                record
                    .allow_subscribe
                    .iter()
                    .filter_map(|e| Channel::new(e.as_str()).ok()),
            ),
            record,
        });
        apply_slot(&mut self.by_owner, owner, entry.revision, view)
    }

    /// The owner's ACL, if one is on record.
    pub fn get(&self, owner: &AgentId) -> Option<&AclView> {
        self.by_owner.get(owner)?.value.as_ref()
    }
}

/// The presence roster, for `@mention` resolution (G17, resolved as the reference does).
///
/// A name resolves by a case-insensitive exact match against `card.name` over **every** entry the
/// daemon has seen, offline ghosts included: exactly one owner resolves, several are ambiguous.
/// A presence key that expires or is deleted stays in the roster as a ghost (the reference keeps
/// offline entries too), so an authorized but offline target still resolves. Unlike the reference,
/// the roster is **not** cleared on reconnect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roster {
    /// presence key → (revision, lower-cased card name, card id).
    by_key: BTreeMap<String, (u64, String, AgentId)>,
}

impl Roster {
    /// An empty roster.
    pub fn new() -> Self {
        Roster::default()
    }

    /// Applies one watched entry of the presence bucket; deletes keep the ghost.
    pub fn apply(&mut self, entry: &KvEntry) -> bool {
        if entry.operation != KvOperation::Put {
            return false;
        }
        let Ok(presence) = json::decode::<Presence>(&entry.value) else {
            return false;
        };
        if self
            .by_key
            .get(&entry.key)
            .is_some_and(|(rev, _, _)| *rev >= entry.revision)
        {
            return false;
        }
        let name = presence.card.name.to_lowercase();
        self.by_key
            .insert(entry.key.clone(), (entry.revision, name, presence.card.id));
        true
    }

    /// Resolves a mentioned name (already normalized by the publisher; compared
    /// case-insensitively).
    pub fn resolve(&self, name: &str) -> MentionResolution {
        let wanted = name.to_lowercase();
        let mut found: Option<&AgentId> = None;
        for (_, n, id) in self.by_key.values() {
            if *n != wanted {
                continue;
            }
            match found {
                Some(f) if f != id => return MentionResolution::Ambiguous,
                _ => found = Some(id),
            }
        }
        found.map_or(MentionResolution::Unknown, |id| {
            MentionResolution::Owner(id.clone())
        })
    }

    /// How many entries (ghosts included) the roster holds.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}
