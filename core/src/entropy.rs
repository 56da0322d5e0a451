//! Randomness as an input: a seeded generator for uuids and jitter.
//!
//! The core has no randomness of its own. A host seeds an [`IdGen`] once (from the OS in the tokio
//! driver, from the run's seed in the simulator, from a constant in a test), and every uuid
//! (reply subjects, message ids) and every jitter the machine needs comes from it, so the same
//! seed and the same inputs give the same commands, bit for bit.
//!
//! The generator is splitmix64: tiny, fast, and well distributed, which is all a reply token
//! needs. It is not a cryptographic generator; nothing in the protocol relies on unguessable ids
//! (authorization is by subject and ACL, never by knowing an id).

/// A seeded generator of uuid-shaped ids and bounded random numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdGen {
    state: u64,
}

impl IdGen {
    /// A generator from a seed.
    pub const fn from_seed(seed: u64) -> Self {
        IdGen { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`0` when `bound` is `0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for jitter, and never a panic.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A random version-4 uuid in the canonical lowercase form
    /// (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`), as the reference's `crypto.randomUUID()` makes.
    pub fn uuid(&mut self) -> String {
        let hi = self.next_u64();
        let lo = self.next_u64();
        let hi = (hi & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000;
        let lo = (lo & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_ids_and_uuids_are_v4_shaped() {
        let mut a = IdGen::from_seed(42);
        let mut b = IdGen::from_seed(42);
        let u = a.uuid();
        assert_eq!(u, b.uuid());
        assert_eq!(u.len(), 36);
        let parts: Vec<&str> = u.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert_ne!(a.uuid(), u);
        assert_ne!(IdGen::from_seed(43).uuid(), u);
    }

    #[test]
    fn below_stays_in_bounds() {
        let mut g = IdGen::from_seed(1);
        for bound in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(g.below(bound) < bound);
            }
        }
        assert_eq!(g.below(0), 0);
    }
}
