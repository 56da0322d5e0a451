//! The daemon's in-memory views of its KV buckets (gap G25: no KV scan per message).
//!
//! Each view is fed by a KV watch ([`crate::io::Command::KvWatch`]) and, for memberships, also by
//! the daemon's own confirmed writes. Every entry keeps the revision it was read at, and a view
//! only moves forward: a change at a revision not above the stored one is ignored, so a late
//! watch echo of our own write, or a confirmation that arrives after a newer watched change,
//! never rolls a record back. Deleted keys remember the revision of their delete marker for the
//! same reason.

use crate::acl::ReadAcl;
use crate::constants::PRESENCE_TTL;
use crate::delivery::route::MentionResolution;
use crate::io::{KvEntry, KvOperation};
use crate::time::Instant;
use crate::wire::control::MembershipSummary;
use crate::wire::json;
use crate::wire::keys::parse_member_key;
use crate::wire::message::{Extra, Presence, PresenceStatus};
use crate::wire::records::{AclRecord, MembershipRecord};
use crate::wire::token::{AgentId, Channel, ConcreteChannel};
use std::collections::{BTreeMap, BTreeSet};

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

    /// Every open record (no leave cursor), in channel then owner order.
    pub fn open_records(&self) -> impl Iterator<Item = &MembershipRecord> {
        self.by_channel
            .values()
            .flat_map(|m| m.values())
            .filter_map(|s| s.value.as_ref())
            .filter(|r| r.leave_cursor.is_none())
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

/// Owner → read ACL, and the display names each ACL record reserves for its owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclIndex {
    by_owner: BTreeMap<AgentId, Slot<AclView>>,
    /// Lower-cased name → the provisioned owners it is reserved for ([`AclIndex::reserved`]).
    names: BTreeMap<String, BTreeSet<AgentId>>,
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
        let before = self.names_of(&owner);
        if !apply_slot(&mut self.by_owner, owner.clone(), entry.revision, view) {
            return false;
        }
        let after = self.names_of(&owner);
        for name in before.difference(&after) {
            if let Some(owners) = self.names.get_mut(name) {
                owners.remove(&owner);
                if owners.is_empty() {
                    self.names.remove(name);
                }
            }
        }
        for name in after {
            self.names.entry(name).or_default().insert(owner.clone());
        }
        true
    }

    /// The owner's ACL, if one is on record.
    pub fn get(&self, owner: &AgentId) -> Option<&AclView> {
        self.by_owner.get(owner)?.value.as_ref()
    }

    /// The names (lower-cased) an owner's ACL record reserves for it: its id and its
    /// provisioned `names`; none without a record.
    fn names_of(&self, owner: &AgentId) -> BTreeSet<String> {
        let Some(view) = self.get(owner) else {
            return BTreeSet::new();
        };
        std::iter::once(owner.as_str().to_lowercase())
            .chain(
                view.record
                    .provisioned_names()
                    .iter()
                    .map(|n| n.to_lowercase()),
            )
            .collect()
    }

    /// The provisioned owners a display name is reserved for (compared case-insensitively).
    ///
    /// **Name binding** (issue 21 item 2): an owner with an ACL record on file is a provisioned
    /// identity, and its record reserves its id and the display names of its `names` field. A
    /// reserved name belongs to its owners: nobody else's presence may claim it. In an open space
    /// (no ACL records) nothing is reserved.
    pub fn reserved(&self, name: &str) -> Option<&BTreeSet<AgentId>> {
        self.names.get(&name.to_lowercase())
    }

    /// Whether the owner's record names its display names explicitly (a non-empty `names`):
    /// then it may present only those (or its id).
    fn names_bound(&self, owner: &AgentId) -> bool {
        self.get(owner)
            .is_some_and(|v| !v.record.provisioned_names().is_empty())
    }
}

/// Why a presence record is left out of `@mention` resolution (issues 15 item 3, 21 item 2).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceFault {
    /// The record's `card.id` is not its KV key: a writer claims another identity.
    KeyMismatch {
        /// The `card.id` the record claims.
        claimed: AgentId,
    },
    /// The name is reserved for another provisioned identity (name squatting).
    NameReserved {
        /// The (first) owner the name is reserved for.
        owner: AgentId,
    },
    /// The owner's ACL record binds its display names and this is none of them.
    NameNotProvisioned,
}

/// A presence key that started to be ignored: one per episode (the key's records stay faulty
/// until one is clean again), for the daemon's event and counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceIgnored {
    /// The presence key (the writer's identity, as the broker authorized the write).
    pub key: String,
    /// The display name the record presents.
    pub name: String,
    /// Why it is ignored.
    pub fault: PresenceFault,
}

/// One presence key as the roster holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RosterEntry {
    revision: u64,
    /// `card.name` as written.
    name: String,
    /// `card.name`, lower-cased.
    folded: String,
    /// `card.id`.
    id: AgentId,
    /// Live until then: a put with an online status, seen at `t`, lives until `t +`
    /// [`PRESENCE_TTL`] (the bucket drops an unrefreshed key then, without a marker a watch
    /// would see). `None`: offline (an `offline` status, or a delete or purge marker).
    live_until: Option<Instant>,
    /// The fault of the current episode, if the entry is ignored.
    fault: Option<PresenceFault>,
}

/// The presence roster, for `@mention` resolution (G17, issues 15 item 3 and 21 item 2).
///
/// Every key the daemon has seen stays as an entry, offline ones included (a delete keeps the
/// name as an offline ghost; the roster is not cleared on reconnect). An entry is **ignored**
/// for resolution while it has a [`PresenceFault`]: its `card.id` is not its key, or its name
/// belongs to another provisioned identity ([`AclIndex::reserved`]), or its owner's ACL binds
/// its names and this is not one of them.
///
/// [`Roster::resolve`] (case-insensitive exact match of `card.name` over the entries not
/// ignored, by `card.id`):
///
/// 1. exactly one **live** owner resolves; two or more live owners are ambiguous;
/// 2. with no live match, exactly one offline owner resolves (it still gets its durable mention
///    copy); two or more are ambiguous;
/// 3. with no match at all, a name reserved for exactly one provisioned owner resolves to it
///    (the operator's binding is a directory that survives a daemon restart); reserved for
///    several, ambiguous; else unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roster {
    by_key: BTreeMap<String, RosterEntry>,
}

impl Roster {
    /// An empty roster.
    pub fn new() -> Self {
        Roster::default()
    }

    /// Applies one watched entry of the presence bucket seen at `now`; deletes keep the name as
    /// an offline ghost. Returns the notice of a key that starts to be ignored.
    pub fn apply(
        &mut self,
        entry: &KvEntry,
        now: Instant,
        acls: &AclIndex,
    ) -> Option<PresenceIgnored> {
        if self
            .by_key
            .get(&entry.key)
            .is_some_and(|e| e.revision >= entry.revision)
        {
            return None;
        }
        if entry.operation != KvOperation::Put {
            let e = self.by_key.get_mut(&entry.key)?;
            e.revision = entry.revision;
            e.live_until = None;
            return None;
        }
        // Undecodable: the previous record (if any) stands.
        let presence = json::decode::<Presence>(&entry.value).ok()?;
        let live_until = (presence.status != PresenceStatus::Offline).then_some(now + PRESENCE_TTL);
        let previous = self.by_key.remove(&entry.key).and_then(|e| e.fault);
        let mut e = RosterEntry {
            revision: entry.revision,
            folded: presence.card.name.to_lowercase(),
            name: presence.card.name,
            id: presence.card.id,
            live_until,
            fault: None,
        };
        let notice = Self::audit_entry(&entry.key, &mut e, previous, acls);
        self.by_key.insert(entry.key.clone(), e);
        notice
    }

    /// Re-checks every entry against the ACLs (after an ACL change moved the reserved names);
    /// returns the keys that start to be ignored.
    pub fn audit(&mut self, acls: &AclIndex) -> Vec<PresenceIgnored> {
        let mut out = Vec::new();
        for (key, e) in &mut self.by_key {
            let previous = e.fault.take();
            out.extend(Self::audit_entry(key, e, previous, acls));
        }
        out
    }

    /// Sets the entry's fault; a notice when it is new (or of another kind than `previous`).
    fn audit_entry(
        key: &str,
        e: &mut RosterEntry,
        previous: Option<PresenceFault>,
        acls: &AclIndex,
    ) -> Option<PresenceIgnored> {
        e.fault = Self::fault(key, e, acls);
        let fault = e.fault.clone()?;
        (previous.as_ref() != Some(&fault)).then(|| PresenceIgnored {
            key: key.to_owned(),
            name: e.name.clone(),
            fault,
        })
    }

    /// The presence identity rules, in one place.
    fn fault(key: &str, e: &RosterEntry, acls: &AclIndex) -> Option<PresenceFault> {
        if e.id.as_str() != key {
            return Some(PresenceFault::KeyMismatch {
                claimed: e.id.clone(),
            });
        }
        let reserved = acls.reserved(&e.folded);
        if let Some(owners) = reserved
            && !owners.contains(&e.id)
        {
            let owner = owners.iter().next()?.clone();
            return Some(PresenceFault::NameReserved { owner });
        }
        if acls.names_bound(&e.id) && reserved.is_none() {
            return Some(PresenceFault::NameNotProvisioned);
        }
        None
    }

    /// Resolves a mentioned name (already normalized by the publisher; compared
    /// case-insensitively) at `now`; the rules are on [`Roster`].
    pub fn resolve(&self, name: &str, now: Instant, acls: &AclIndex) -> MentionResolution {
        let wanted = name.to_lowercase();
        let mut live: BTreeSet<&AgentId> = BTreeSet::new();
        let mut offline: BTreeSet<&AgentId> = BTreeSet::new();
        for e in self.by_key.values() {
            if e.folded != wanted || e.fault.is_some() {
                continue;
            }
            if e.live_until.is_some_and(|until| now < until) {
                live.insert(&e.id);
            } else {
                offline.insert(&e.id);
            }
        }
        let offline: BTreeSet<&AgentId> = offline.difference(&live).copied().collect();
        let directory: BTreeSet<&AgentId> = acls.reserved(&wanted).into_iter().flatten().collect();
        for tier in [live, offline, directory] {
            let mut ids = tier.into_iter();
            match (ids.next(), ids.next()) {
                (Some(one), None) => return MentionResolution::Owner(one.clone()),
                (Some(_), Some(_)) => return MentionResolution::Ambiguous,
                _ => {}
            }
        }
        MentionResolution::Unknown
    }

    /// The reference's resolution (G17), for the simulator's mutation only: every entry ever
    /// seen counts by `card.id`, offline and ignored ones included; no directory.
    #[doc(hidden)]
    pub fn resolve_reference(&self, name: &str) -> MentionResolution {
        let wanted = name.to_lowercase();
        let ids: BTreeSet<&AgentId> = self
            .by_key
            .values()
            .filter(|e| e.folded == wanted)
            .map(|e| &e.id)
            .collect();
        let mut ids = ids.into_iter();
        match (ids.next(), ids.next()) {
            (Some(one), None) => MentionResolution::Owner(one.clone()),
            (Some(_), Some(_)) => MentionResolution::Ambiguous,
            _ => MentionResolution::Unknown,
        }
    }

    /// How many entries (offline ones and ignored ones included) the roster holds.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests;
