//! The sharding seam (semantics §1.5 "Sharding seam", gap G36).
//!
//! The reference ships the pieces of N-way sharding but runs only N = 1: `SUBJ:partition` hashes a
//! key onto a shard, shard `i` holds the delivery lease `lease.<i>`, and the fan-out and reader
//! durables are named `fanout`/`reader` for N = 1 and `fanout_<i>`/`reader_<i>` for N > 1
//! (`SUBJ:fanoutDurable`, `SUBJ:readerDurable`). The daemon refuses any run with `shards ≠ 1`.
//!
//! This module keeps those names and the hash bit-for-bit, and adds [`ShardMap`], the owner → shard
//! mapping N daemons need to share a space with one lease per shard. With one shard everything
//! collapses to exactly what the reference uses today (`lease.0`, `fanout`, `reader`), so a space
//! can move to this crate without renaming a durable or losing an ack cursor.
//!
//! The key a map partitions on is the owner's [`AgentId`] (the owner of a membership, a dinbox
//! entry and a dlv copy). [`partition`] itself hashes any string.

use super::keys;
use super::token::AgentId;
use std::fmt;

/// FNV-1a 32-bit offset basis (`0x811c9dc5`), as `SUBJ:partition` uses it.
pub const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;

/// FNV-1a 32-bit prime (`0x01000193`), as `SUBJ:partition` uses it.
pub const FNV_PRIME: u32 = 0x0100_0193;

/// The fan-out durable on CHAT when there is one shard (`SUBJ:FANOUT_DURABLE`).
pub const FANOUT_DURABLE: &str = "fanout";

/// The trusted-reader durable on INBOX when there is one shard (`SUBJ:INBOX_READER_DURABLE`).
pub const INBOX_READER_DURABLE: &str = "reader";

/// FNV-1a 32-bit over the UTF-16 code units of `key`, as JavaScript's `charCodeAt` yields them.
///
/// Each step XORs a whole 16-bit code unit into the hash (not a byte) and multiplies by
/// [`FNV_PRIME`] modulo 2³² (`Math.imul`). For ASCII this equals the usual byte-wise FNV-1a; for
/// anything else it does not, and the reference's value is the one that matters on the wire. A
/// character outside the Basic Multilingual Plane contributes its two surrogate units.
pub fn fnv1a_utf16(key: &str) -> u32 {
    key.encode_utf16().fold(FNV_OFFSET_BASIS, |h, unit| {
        (h ^ u32::from(unit)).wrapping_mul(FNV_PRIME)
    })
}

/// The reference's `partition(n, key)`: [`fnv1a_utf16`]`(key) % n`, and 0 whenever `n ≤ 1`.
///
/// The result is always `< max(n, 1)`.
pub fn partition(n: u32, key: &str) -> u32 {
    if n <= 1 { 0 } else { fnv1a_utf16(key) % n }
}

/// The fan-out durable name for shard `shard` of `shards` (`SUBJ:fanoutDurable`).
///
/// `shards ≤ 1` gives the legacy name `fanout` whatever `shard` is; otherwise `fanout_<shard>`,
/// shard 0 included (the reference code; the constants table of the semantics reads "i>0", but
/// `fanoutDurable(0, 2)` is `fanout_0`).
pub fn fanout_durable(shard: u32, shards: u32) -> String {
    sharded_name(FANOUT_DURABLE, shard, shards)
}

/// The trusted-reader durable name for shard `shard` of `shards` (`SUBJ:readerDurable`):
/// `reader` when `shards ≤ 1`, otherwise `reader_<shard>`.
pub fn reader_durable(shard: u32, shards: u32) -> String {
    sharded_name(INBOX_READER_DURABLE, shard, shards)
}

/// The base name of the pinned short-lived consumer the daemon's DLV revocation sweep reads
/// through (a Cotal addition, not in the reference).
pub const DLV_SWEEP_READER: &str = "dlvsweep";

/// The DLV sweep reader name for shard `shard` of `shards`: `dlvsweep` when `shards ≤ 1`,
/// otherwise `dlvsweep_<shard>` ([`crate::delivery::revoke`]).
pub fn dlv_sweep_reader(shard: u32, shards: u32) -> String {
    sharded_name(DLV_SWEEP_READER, shard, shards)
}

fn sharded_name(base: &str, shard: u32, shards: u32) -> String {
    if shards <= 1 {
        base.to_owned()
    } else {
        format!("{base}_{shard}")
    }
}

/// Why a shard map or shard could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardError {
    /// A space needs at least one shard.
    ZeroShards,
    /// The shard index is not below the shard count.
    IndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// The number of shards in the map.
        shards: u32,
    },
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardError::ZeroShards => write!(f, "a shard map needs at least one shard"),
            ShardError::IndexOutOfRange { index, shards } => {
                write!(f, "shard {index} is out of range for {shards} shard(s)")
            }
        }
    }
}

impl std::error::Error for ShardError {}

/// How a space's owners are split across `N ≥ 1` delivery daemons, one lease per shard.
///
/// Owner `o` belongs to shard [`partition`]`(N, o)`. Every name a shard needs (its lease key, its
/// fan-out and reader durables) comes from here, so the daemons of one space agree on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardMap {
    shards: u32,
}

impl Default for ShardMap {
    fn default() -> Self {
        ShardMap::SINGLE
    }
}

impl ShardMap {
    /// One shard: the only layout the reference 0.6.0 runs.
    pub const SINGLE: ShardMap = ShardMap { shards: 1 };

    /// A map over `shards` shards.
    ///
    /// # Errors
    ///
    /// [`ShardError::ZeroShards`] when `shards` is 0.
    pub fn new(shards: u32) -> Result<Self, ShardError> {
        if shards == 0 {
            Err(ShardError::ZeroShards)
        } else {
            Ok(ShardMap { shards })
        }
    }

    /// The number of shards (at least 1).
    pub fn shards(self) -> u32 {
        self.shards
    }

    /// Shard `index` of this map.
    ///
    /// # Errors
    ///
    /// [`ShardError::IndexOutOfRange`] when `index ≥` [`ShardMap::shards`].
    pub fn shard(self, index: u32) -> Result<Shard, ShardError> {
        if index < self.shards {
            Ok(Shard {
                index,
                shards: self.shards,
            })
        } else {
            Err(ShardError::IndexOutOfRange {
                index,
                shards: self.shards,
            })
        }
    }

    /// The shard that owns `owner`'s deliveries.
    pub fn shard_of(self, owner: &AgentId) -> Shard {
        Shard {
            index: partition(self.shards, owner.as_str()),
            shards: self.shards,
        }
    }

    /// Every shard, in index order.
    pub fn iter(self) -> impl Iterator<Item = Shard> {
        (0..self.shards).map(move |index| Shard {
            index,
            shards: self.shards,
        })
    }
}

/// One shard of a [`ShardMap`]: what one delivery daemon holds a lease for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shard {
    index: u32,
    shards: u32,
}

impl Shard {
    /// The shard's index, `0 ≤ index < shards`.
    pub fn index(self) -> u32 {
        self.index
    }

    /// The number of shards in the map this shard belongs to.
    pub fn shards(self) -> u32 {
        self.shards
    }

    /// The shard's delivery-lease key in `cotal_delivery_<space>`: `lease.<index>`.
    pub fn lease_key(self) -> String {
        keys::lease_key(self.index)
    }

    /// The shard's fan-out durable on CHAT ([`fanout_durable`]).
    pub fn fanout_durable(self) -> String {
        fanout_durable(self.index, self.shards)
    }

    /// The shard's trusted-reader durable on INBOX ([`reader_durable`]).
    pub fn reader_durable(self) -> String {
        reader_durable(self.index, self.shards)
    }

    /// True when this shard is the one [`ShardMap::shard_of`] picks for `owner`.
    pub fn owns(self, owner: &AgentId) -> bool {
        partition(self.shards, owner.as_str()) == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn published_fnv1a_32_vectors() {
        // Vectors from the FNV reference test suite (ASCII, so UTF-16 units equal bytes).
        assert_eq!(fnv1a_utf16(""), 0x811c_9dc5);
        assert_eq!(fnv1a_utf16("a"), 0xe40c_292c);
        assert_eq!(fnv1a_utf16("foobar"), 0xbf9c_f968);
    }

    /// One FNV-1a step done independently of the code under test, in 64-bit arithmetic.
    fn step(h: u64, unit: u64) -> u64 {
        ((h ^ unit) * 0x0100_0193) & 0xffff_ffff
    }

    #[test]
    fn non_ascii_hashes_utf16_code_units_not_utf8_bytes() {
        // "é" is U+00E9: one UTF-16 unit 0x00E9, but two UTF-8 bytes C3 A9.
        // 0x811c9dc5 ^ 0xe9 = 0x811c9d2c; 0x811c9d2c * 0x01000193 mod 2^32 = 0x6c0b6c44.
        assert_eq!(0x811c_9dc5_u64 ^ 0xe9, 0x811c_9d2c);
        assert_eq!(step(0x811c_9dc5, 0xe9), 0x6c0b_6c44);
        assert_eq!(fnv1a_utf16("é"), 0x6c0b_6c44);
        let bytewise = step(step(0x811c_9dc5, 0xc3), 0xa9);
        assert_eq!(bytewise, 0x1e9d_e8c1);
        assert_ne!(u64::from(fnv1a_utf16("é")), bytewise);

        // "😀" is U+1F600, astral: UTF-16 surrogate pair D83D DE00 (two units, each XORed whole),
        // four UTF-8 bytes F0 9F 98 80.
        //   0x811c9dc5 ^ 0xd83d = 0x811c45f8 -> * prime = 0x37822568
        //   0x37822568 ^ 0xde00 = 0x3782fb68 -> * prime = 0xcb31c4b8
        assert_eq!(step(0x811c_9dc5, 0xd83d), 0x3782_2568);
        assert_eq!(step(0x3782_2568, 0xde00), 0xcb31_c4b8);
        assert_eq!(fnv1a_utf16("😀"), 0xcb31_c4b8);
        let bytewise = [0xf0, 0x9f, 0x98, 0x80]
            .iter()
            .fold(0x811c_9dc5, |h, b| step(h, *b));
        assert_eq!(bytewise, 0x33a2_9608);
        assert_ne!(u64::from(fnv1a_utf16("😀")), bytewise);

        // Mixed: "a😀" continues from the "a" vector.
        assert_eq!(step(step(0xe40c_292c, 0xd83d), 0xde00), 0x1c8e_cbf9);
        assert_eq!(fnv1a_utf16("a😀"), 0x1c8e_cbf9);
    }

    #[test]
    fn partition_matches_the_reference_rule() {
        // n ≤ 1 always gives 0, whatever the hash.
        assert_eq!(partition(0, "a"), 0);
        assert_eq!(partition(1, "a"), 0);
        // 0xe40c292c = 3826002220: mod 7 = 5, mod 3 = 1, mod 2 = 0.
        assert_eq!(partition(7, "a"), 5);
        assert_eq!(partition(3, "a"), 1);
        assert_eq!(partition(2, "a"), 0);
        // 0xcb31c4b8 = 3409036472: mod 3 = 2.
        assert_eq!(partition(3, "😀"), 2);
        // A real nkey from the fixtures: 0x66661699 = 1717966489, odd.
        let alice = "UDHQN2VXGF5T7O3GSPVKMV6VFFHD3XQTWFY3M5P7ELIK4ICOADTOEJ5S";
        assert_eq!(fnv1a_utf16(alice), 0x6666_1699);
        assert_eq!(partition(2, alice), 1);
    }

    #[test]
    fn one_shard_keeps_the_reference_names() {
        let map = ShardMap::default();
        assert_eq!(map, ShardMap::SINGLE);
        let only = map.shard(0).unwrap();
        assert_eq!(only.lease_key(), "lease.0");
        assert_eq!(only.fanout_durable(), "fanout");
        assert_eq!(only.reader_durable(), "reader");
        assert_eq!(map.iter().count(), 1);
        let owner =
            AgentId::new("UDHQN2VXGF5T7O3GSPVKMV6VFFHD3XQTWFY3M5P7ELIK4ICOADTOEJ5S").unwrap();
        assert_eq!(map.shard_of(&owner), only);
        assert!(only.owns(&owner));
    }

    #[test]
    fn several_shards_get_indexed_names_and_leases() {
        let map = ShardMap::new(3).unwrap();
        let names: Vec<_> = map
            .iter()
            .map(|s| (s.lease_key(), s.fanout_durable(), s.reader_durable()))
            .collect();
        assert_eq!(
            names,
            vec![
                (
                    "lease.0".to_owned(),
                    "fanout_0".to_owned(),
                    "reader_0".to_owned()
                ),
                (
                    "lease.1".to_owned(),
                    "fanout_1".to_owned(),
                    "reader_1".to_owned()
                ),
                (
                    "lease.2".to_owned(),
                    "fanout_2".to_owned(),
                    "reader_2".to_owned()
                ),
            ]
        );
        assert_eq!(fanout_durable(5, 1), "fanout");
        assert_eq!(reader_durable(0, 0), "reader");
        assert_eq!(
            map.shard(3),
            Err(ShardError::IndexOutOfRange {
                index: 3,
                shards: 3
            })
        );
        assert_eq!(ShardMap::new(0), Err(ShardError::ZeroShards));
        assert_eq!(
            ShardError::IndexOutOfRange {
                index: 3,
                shards: 3
            }
            .to_string(),
            "shard 3 is out of range for 3 shard(s)"
        );
    }

    proptest! {
        #[test]
        fn partition_is_always_below_n(n in 0u32..=u32::MAX, key in any::<String>()) {
            let p = partition(n, &key);
            prop_assert!(p < n.max(1));
        }

        #[test]
        fn exactly_one_shard_owns_each_owner(n in 1u32..64, id in "[A-Za-z0-9_-]{1,60}") {
            let owner = AgentId::new(id).unwrap();
            let map = ShardMap::new(n).unwrap();
            let owners: Vec<u32> = map.iter().filter(|s| s.owns(&owner)).map(Shard::index).collect();
            prop_assert_eq!(owners, vec![map.shard_of(&owner).index()]);
        }

        #[test]
        fn ascii_keys_hash_like_bytewise_fnv(key in "[ -~]{0,40}") {
            let bytewise = key.bytes().fold(FNV_OFFSET_BASIS, |h, b| (h ^ u32::from(b)).wrapping_mul(FNV_PRIME));
            prop_assert_eq!(fnv1a_utf16(&key), bytewise);
        }
    }
}
