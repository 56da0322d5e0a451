//! The virtual clock, the one source of choices, the fault knobs and the event queue.
//!
//! Nothing here reads a real clock or the OS: a run is a function of its [`SimConfig`] (one `u64`
//! seed plus knobs) and of the machines it hosts.
//!
//! - [`Clock`]: the monotonic [`Instant`] (starts at zero) and a simulated wall clock
//!   ([`UnixMillis`], a fixed epoch plus the monotonic time).
//! - [`Chooser`]: every nondeterministic decision, from independent sub-streams of the seed
//!   (event order, latencies, faults), so a draw added in one subsystem does not perturb the
//!   others (design rule R26).
//! - [`FaultConfig`]: each fault off by default, rates in parts per million; faults fire only in
//!   the fault phase (before [`SimConfig::fault_phase`]), the heal phase after it has none
//!   (R29).
//! - [`Queue`]: a time-ordered queue of events on *lanes*. A lane is FIFO (a client's upload
//!   path, a client's download path: one TCP connection each way): an event pushed on a lane is
//!   never scheduled before the lane's previous event. Among the events due at the same instant,
//!   the chooser picks which lane goes first.

use cotal_core::time::{Duration, Instant, Now, UnixMillis};
use std::collections::BTreeMap;

/// A seeded splitmix64 generator with the draws the simulator needs. The schedule's choices need
/// speed and reproducibility, not secrecy (the agents' ids come from `cotal_core::entropy`).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// True with probability `ppm / 1_000_000` (never draws for 0, so a disabled fault costs
    /// nothing and perturbs nothing).
    pub fn chance(&mut self, ppm: u32) -> bool {
        ppm != 0 && self.below(1_000_000) < u64::from(ppm)
    }

    /// A duration in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo, hi) = (lo.as_millis(), hi.as_millis().max(lo.as_millis()));
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The simulator's sub-streams of choices, all derived from one seed.
#[derive(Clone, Debug)]
pub struct Chooser {
    /// Which ready event happens next.
    pub order: Rng,
    /// Message and command latencies.
    pub latency: Rng,
    /// Whether and where faults fire.
    pub faults: Rng,
}

impl Chooser {
    /// The sub-streams of `seed`.
    pub fn new(seed: u64) -> Self {
        let derive = |salt: u64| Rng::new(Rng::new(seed ^ salt).next_u64());
        Chooser {
            order: derive(0x6f72_6465_7200_0001),
            latency: derive(0x6c61_7465_6e00_0002),
            faults: derive(0x6661_756c_7400_0003),
        }
    }
}

/// The simulated clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    at: Instant,
    wall_epoch: UnixMillis,
}

impl Clock {
    /// A clock at monotonic zero whose wall clock reads `wall_epoch` then.
    pub fn new(wall_epoch: UnixMillis) -> Self {
        Clock {
            at: Instant::ZERO,
            wall_epoch,
        }
    }

    /// Now.
    pub fn now(&self) -> Now {
        Now::new(
            self.at,
            UnixMillis(self.wall_epoch.0.saturating_add(self.at.as_millis())),
        )
    }

    /// Moves to `at`; never backwards.
    pub fn advance_to(&mut self, at: Instant) {
        if at > self.at {
            self.at = at;
        }
    }
}

/// Fault rates (parts per million per opportunity) and shapes. Everything is off by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultConfig {
    /// A core message (not a reply, refusal, delivery or KV change) is dropped on its way to a
    /// client.
    pub core_drop_ppm: u32,
    /// Mean time between connection losses of each client (`None`: never).
    pub connection_loss_every: Option<Duration>,
    /// How long a lost connection stays down.
    pub restore_after: (Duration, Duration),
    /// When a connection is lost, the chance that each command still travelling to the server had
    /// already reached it (its effect happens; its answer is lost).
    pub inflight_reached_ppm: u32,
    /// A durable delivery is held back by a slow consumer. The client's downlink is one ordered
    /// path, so everything queued behind the held delivery waits too (head-of-line blocking).
    pub slow_consumer_ppm: u32,
    /// How long a slow consumer holds a delivery back.
    pub slow_consumer_delay: (Duration, Duration),
    /// A conditional KV write races another writer (which rewrites the key) and so fails.
    pub kv_conflict_ppm: u32,
    /// A command's effect happens but its answer is lost: the completion is `Unknown`.
    pub ambiguous_ppm: u32,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            core_drop_ppm: 0,
            connection_loss_every: None,
            restore_after: (Duration::from_millis(50), Duration::from_millis(500)),
            inflight_reached_ppm: 500_000,
            slow_consumer_ppm: 0,
            slow_consumer_delay: (Duration::from_millis(100), Duration::from_millis(2_000)),
            kv_conflict_ppm: 0,
            ambiguous_ppm: 0,
        }
    }
}

impl FaultConfig {
    /// Every fault on at a moderate rate: a starting point for exploration.
    pub fn chaos() -> Self {
        FaultConfig {
            core_drop_ppm: 20_000,
            connection_loss_every: Some(Duration::from_secs(20)),
            slow_consumer_ppm: 20_000,
            kv_conflict_ppm: 50_000,
            ambiguous_ppm: 10_000,
            ..FaultConfig::default()
        }
    }
}

/// Everything a run depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The seed of every choice.
    pub seed: u64,
    /// One-way latency between a client and the server.
    pub latency: (Duration, Duration),
    /// The faults.
    pub faults: FaultConfig,
    /// Faults fire only before this instant; after it the run heals.
    pub fault_phase: Instant,
    /// The wall clock at monotonic zero.
    pub wall_epoch: UnixMillis,
}

impl SimConfig {
    /// A run of `seed` with 1–5 ms latency, no faults, and a wall clock starting at
    /// 2026-01-01T00:00:00Z.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            latency: (Duration::from_millis(1), Duration::from_millis(5)),
            faults: FaultConfig::default(),
            fault_phase: Instant::ZERO,
            wall_epoch: UnixMillis(1_767_225_600_000),
        }
    }

    /// The same run with these faults until `until`.
    pub fn with_faults(self, faults: FaultConfig, until: Instant) -> Self {
        SimConfig {
            faults,
            fault_phase: until,
            ..self
        }
    }
}

/// A FIFO path events travel on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Commands of a client to the server.
    Up(u32),
    /// Inputs of the server (and the client library) to a client.
    Down(u32),
    /// Scheduled faults and other control events (not FIFO-constrained).
    Control,
}

/// A time-ordered queue of events on FIFO lanes. See the module docs.
#[derive(Clone, Debug)]
pub struct Queue<E> {
    items: BTreeMap<(Instant, u64), (Lane, E)>,
    seq: u64,
    lane_last: BTreeMap<Lane, Instant>,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            items: BTreeMap::new(),
            seq: 0,
            lane_last: BTreeMap::new(),
        }
    }
}

impl<E> Queue<E> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `event` on `lane` at `at`, or later if the lane's previous event is later.
    /// Returns the instant it was scheduled at.
    pub fn push(&mut self, lane: Lane, at: Instant, event: E) -> Instant {
        let at = if lane == Lane::Control {
            at
        } else {
            let last = self.lane_last.entry(lane).or_insert(Instant::ZERO);
            let at = at.max(*last);
            *last = at;
            at
        };
        self.seq += 1;
        self.items.insert((at, self.seq), (lane, event));
        at
    }

    /// Forgets the FIFO bound of a lane (a new connection starts a fresh path).
    pub fn reset_lane(&mut self, lane: Lane) {
        self.lane_last.remove(&lane);
    }

    /// The earliest scheduled instant.
    pub fn next_time(&self) -> Option<Instant> {
        self.items.keys().next().map(|(at, _)| *at)
    }

    /// The keys of the events that may happen now: at the earliest instant (if it is `<= now`),
    /// the first event of each lane there (every control event counts on its own).
    pub fn ready(&self, now: Instant) -> Vec<(Instant, u64)> {
        let Some(first) = self.next_time().filter(|t| *t <= now) else {
            return Vec::new();
        };
        let mut seen = Vec::new();
        let mut keys = Vec::new();
        for ((at, seq), (lane, _)) in self.items.range((first, 0)..=(first, u64::MAX)) {
            if *lane == Lane::Control || !seen.contains(lane) {
                seen.push(*lane);
                keys.push((*at, *seq));
            }
        }
        keys
    }

    /// Removes and returns one event by key.
    pub fn take(&mut self, key: (Instant, u64)) -> Option<(Lane, E)> {
        self.items.remove(&key)
    }

    /// Removes and returns, in order, every event for which `pred` holds.
    pub fn drain_where(&mut self, mut pred: impl FnMut(&Lane, &E) -> bool) -> Vec<(Lane, E)> {
        let keys: Vec<(Instant, u64)> = self
            .items
            .iter()
            .filter(|(_, (lane, e))| pred(lane, e))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.items.remove(&k))
            .collect()
    }

    /// Removes and returns, in order and with their instants, every event of `lane`. The lane's
    /// FIFO bound is kept.
    pub fn drain_lane(&mut self, lane: Lane) -> Vec<(Instant, E)> {
        let keys: Vec<(Instant, u64)> = self
            .items
            .iter()
            .filter(|(_, (l, _))| *l == lane)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.items.remove(&k).map(|(_, e)| (k.0, e)))
            .collect()
    }

    /// How many events are scheduled.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_streams_are_reproducible_and_independent() {
        let mut a = Chooser::new(7);
        let mut b = Chooser::new(7);
        assert_eq!(a.order.next_u64(), b.order.next_u64());
        assert_ne!(a.latency.next_u64(), a.faults.next_u64());
        let mut c = Chooser::new(8);
        assert_ne!(Chooser::new(7).order.next_u64(), c.order.next_u64());
    }

    #[test]
    fn a_disabled_fault_never_draws() {
        let mut r = Rng::new(1);
        let before = r.clone().next_u64();
        assert!(!r.chance(0));
        assert_eq!(r.next_u64(), before);
        assert!(r.chance(1_000_000));
    }

    #[test]
    fn lanes_are_fifo_and_ready_offers_one_head_per_lane() {
        let mut q = Queue::new();
        q.push(Lane::Down(0), Instant::from_millis(10), "a");
        // Pushed for earlier but must follow "a" on the same lane.
        let at = q.push(Lane::Down(0), Instant::from_millis(3), "b");
        assert_eq!(at, Instant::from_millis(10));
        q.push(Lane::Down(1), Instant::from_millis(10), "c");
        let ready = q.ready(Instant::from_millis(10));
        assert_eq!(ready.len(), 2);
        let first = q.take(ready[0]).map(|(_, e)| e);
        assert_eq!(first, Some("a"));
        assert!(q.ready(Instant::from_millis(9)).is_empty());
    }
}
