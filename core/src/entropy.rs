//! Randomness as an input: a keyed ChaCha20 generator for uuids and jitter.
//!
//! The core has no randomness of its own. A host keys an [`IdGen`] once and every uuid (message
//! ids, reply subjects) and every jitter the machine needs comes from it, so the same key and the
//! same inputs give the same commands, bit for bit.
//!
//! Message ids must be unguessable. A message id is the `Nats-Msg-Id` of its publish, and a
//! JetStream stream drops a publish whose id it already saw in its duplicate window — per stream,
//! not per subject. An agent that could predict another agent's next ids could publish them first
//! on a subject of its own (its own chat subject, a DM to itself) and make the victim's later
//! posts, DMs and tasks vanish (the victim would read `duplicate: true`). So the generator is the
//! ChaCha20 stream cipher used as a CSPRNG (RFC 8439 block function, 20 rounds): its output
//! reveals nothing about the key or about later output.
//!
//! - In production the host feeds 256 bits from the operating system ([`IdGen::from_key`]; the
//!   tokio driver's `run::os_key`).
//! - The simulator and tests use [`IdGen::from_seed`]: the same generator keyed by a 64-bit run
//!   seed, reproducible on purpose. Never use it where ids go on a shared broker.
//!
//! The block function is written out here (thirty lines, checked against the RFC 8439 test
//! vector below) so the core keeps its three dependencies and stays free of IO.

use std::fmt;

/// 256 bits of key material for an [`IdGen`]. Its `Debug` does not print the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdKey(pub [u8; 32]);

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(..)")
    }
}

/// A keyed generator of uuid-shaped ids and bounded random numbers (ChaCha20 keystream).
#[derive(Clone, PartialEq, Eq)]
pub struct IdGen {
    /// The ChaCha20 state: constants, key, 64-bit block counter (words 12–13), nonce (14–15).
    state: [u32; 16],
    /// The current keystream block.
    block: [u32; 16],
    /// Next unused word of `block` (16: exhausted).
    used: usize,
}

impl fmt::Debug for IdGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdGen").finish_non_exhaustive()
    }
}

/// "expand 32-byte k".
const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

fn quarter(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    x[a] = x[a].wrapping_add(x[b]);
    x[d] = (x[d] ^ x[a]).rotate_left(16);
    x[c] = x[c].wrapping_add(x[d]);
    x[b] = (x[b] ^ x[c]).rotate_left(12);
    x[a] = x[a].wrapping_add(x[b]);
    x[d] = (x[d] ^ x[a]).rotate_left(8);
    x[c] = x[c].wrapping_add(x[d]);
    x[b] = (x[b] ^ x[c]).rotate_left(7);
}

/// The ChaCha20 block function (RFC 8439 §2.3): 20 rounds, then the input added back.
fn chacha20_block(input: &[u32; 16]) -> [u32; 16] {
    let mut x = *input;
    for _ in 0..10 {
        quarter(&mut x, 0, 4, 8, 12);
        quarter(&mut x, 1, 5, 9, 13);
        quarter(&mut x, 2, 6, 10, 14);
        quarter(&mut x, 3, 7, 11, 15);
        quarter(&mut x, 0, 5, 10, 15);
        quarter(&mut x, 1, 6, 11, 12);
        quarter(&mut x, 2, 7, 8, 13);
        quarter(&mut x, 3, 4, 9, 14);
    }
    for (o, i) in x.iter_mut().zip(input) {
        *o = o.wrapping_add(*i);
    }
    x
}

impl IdGen {
    /// The production generator: keyed by 256 bits from a cryptographic source (the OS).
    pub fn from_key(key: IdKey) -> Self {
        let mut state = [0u32; 16];
        state[..4].copy_from_slice(&SIGMA);
        for (w, chunk) in state[4..12].iter_mut().zip(key.0.chunks_exact(4)) {
            *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        IdGen {
            state,
            block: [0; 16],
            used: 16,
        }
    }

    /// A reproducible generator from a 64-bit seed, for the simulator and tests: the seed is the
    /// first eight key bytes, the rest zero. Anyone who knows or can search the seed knows every
    /// id: never the source of ids on a shared broker.
    pub fn from_seed(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        IdGen::from_key(IdKey(key))
    }

    fn next_u32(&mut self) -> u32 {
        if self.used == self.block.len() {
            self.block = chacha20_block(&self.state);
            // The 64-bit block counter: 2^64 blocks of 64 bytes never wrap in practice.
            let counter =
                (u64::from(self.state[13]) << 32 | u64::from(self.state[12])).wrapping_add(1);
            self.state[12] = counter as u32;
            self.state[13] = (counter >> 32) as u32;
            self.used = 0;
        }
        let w = self.block[self.used];
        self.used += 1;
        w
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let lo = u64::from(self.next_u32());
        let hi = u64::from(self.next_u32());
        hi << 32 | lo
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
    /// (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`), as the reference's `crypto.randomUUID()` makes:
    /// 122 random bits.
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

    /// RFC 8439 §2.3.2: the block function's test vector (key 00..1f, counter 1, nonce
    /// 00:00:00:09:00:00:00:4a:00:00:00:00).
    #[test]
    fn block_function_matches_rfc8439() {
        let mut state = [0u32; 16];
        state[..4].copy_from_slice(&SIGMA);
        for (i, w) in state[4..12].iter_mut().enumerate() {
            let b = (i as u8) * 4;
            *w = u32::from_le_bytes([b, b + 1, b + 2, b + 3]);
        }
        state[12] = 1;
        state[13] = 0x0900_0000;
        state[14] = 0x4a00_0000;
        state[15] = 0;
        let expected: [u32; 16] = [
            0xe4e7_f110,
            0x1559_3bd1,
            0x1fdd_0f50,
            0xc471_20a3,
            0xc7f4_d1c7,
            0x0368_c033,
            0x9aaa_2204,
            0x4e6c_d4c3,
            0x4664_82d2,
            0x09aa_9f07,
            0x05d7_c214,
            0xa202_8bd9,
            0xd19c_12b5,
            0xb94e_16de,
            0xe883_d0cb,
            0x4e3c_50a2,
        ];
        // Our 64-bit counter in words 12–13 and the RFC's 32-bit counter + 96-bit nonce are the
        // same four input words.
        assert_eq!(chacha20_block(&state), expected);
    }

    /// Seeing some of a keyed generator's output does not let one compute the next id the way
    /// the old splitmix64 generator allowed (its state was its last output, unmixed).
    #[test]
    fn keyed_streams_differ_and_do_not_repeat() {
        let mut a = IdGen::from_key(IdKey([7; 32]));
        let mut b = IdGen::from_key(IdKey([8; 32]));
        let xs: Vec<String> = (0..64).map(|_| a.uuid()).collect();
        let ys: Vec<String> = (0..64).map(|_| b.uuid()).collect();
        let all: std::collections::BTreeSet<&String> = xs.iter().chain(&ys).collect();
        assert_eq!(all.len(), 128);
        assert!(!format!("{a:?}{:?}", IdKey([7; 32])).contains('7'));
    }
}
