//! The core's only clocks.
//!
//! The core never reads a clock. A driver passes `now` into every input as an [`Instant`]: milliseconds
//! on a monotonic clock counted from an epoch the driver chooses (the simulator starts at zero, the
//! tokio driver at process start). Deadlines are compared on this clock only.
//!
//! Wall-clock time is a separate input, [`UnixMillis`], used only to stamp records the reference
//! stamps (`updatedAt`, `ts`, `since`); it never decides a deadline or an eligibility, which stays
//! purely sequence-based as in the reference (design rules R4, R5).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// A point on the driver's monotonic clock, in milliseconds since the driver's epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Instant(u64);

impl Instant {
    /// The driver's epoch.
    pub const ZERO: Instant = Instant(0);

    /// An instant `ms` milliseconds after the driver's epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms)
    }

    /// Milliseconds since the driver's epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The time from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={}ms", self.0)
    }
}

/// A span of monotonic time in milliseconds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Duration(u64);

impl Duration {
    /// No time at all.
    pub const ZERO: Duration = Duration(0);

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(ms)
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Duration(s.saturating_mul(1000))
    }

    /// The length in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self * 2^exp`, saturating; used by the bounded exponential backoffs.
    pub fn saturating_mul_pow2(self, exp: u32) -> Duration {
        Duration(
            self.0
                .saturating_mul(1u64.checked_shl(exp).unwrap_or(u64::MAX)),
        )
    }

    /// The smaller of two durations.
    pub fn min(self, other: Duration) -> Duration {
        if self <= other { self } else { other }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, rhs: Duration) {
        *self = *self + rhs;
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    /// The time between two instants; zero if `rhs` is later (never panics).
    fn sub(self, rhs: Instant) -> Duration {
        self.saturating_since(rhs)
    }
}

impl Add for Duration {
    type Output = Duration;
    fn add(self, rhs: Duration) -> Duration {
        Duration(self.0.saturating_add(rhs.0))
    }
}

/// Wall-clock milliseconds since the Unix epoch, as the reference writes them (`Date.now()`).
///
/// Only for stamping and reading record fields; never for deadlines.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The current time: the core's monotonic clock for deadlines, and the wall clock for stamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time; every deadline of the machine is on this clock.
    pub at: Instant,
    /// Wall-clock time, only written into records (`since`, `acquiredAt`).
    pub wall: UnixMillis,
}

impl Now {
    /// A time pair.
    pub const fn new(at: Instant, wall: UnixMillis) -> Self {
        Now { at, wall }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        let t = Instant::from_millis(5);
        assert_eq!(t - Instant::from_millis(9), Duration::ZERO);
        assert_eq!(
            Instant::from_millis(u64::MAX) + Duration::from_millis(1),
            Instant::from_millis(u64::MAX)
        );
        assert_eq!(
            Duration::from_secs(1).saturating_mul_pow2(5),
            Duration::from_millis(32_000)
        );
        assert_eq!(
            Duration::from_secs(1).saturating_mul_pow2(200).as_millis(),
            u64::MAX
        );
    }

    #[test]
    fn instants_serialize_as_plain_numbers() {
        assert_eq!(
            serde_json::to_string(&Instant::from_millis(42)).unwrap(),
            "42"
        );
        assert_eq!(
            serde_json::from_str::<UnixMillis>("1710000000000").unwrap(),
            UnixMillis(1_710_000_000_000)
        );
    }
}
