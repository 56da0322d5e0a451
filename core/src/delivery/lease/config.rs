//! The lease's timings ([`LeaseConfig`]): TTL, renew interval, safety margin, acquisition window,
//! checked against each other when built.

use crate::constants::{BACKOFF_BASE, LEASE_TTL, lease_renew_interval};
use crate::time::{Duration, Instant};
use std::fmt;

/// Why a [`LeaseConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseConfigError {
    /// The TTL is zero.
    ZeroTtl,
    /// The renew interval is zero.
    ZeroRenewInterval,
    /// `renew_interval + safety_margin` must stay below the TTL, or a healthy holder would lose
    /// its own fencing token before its first renewal.
    NoRoomToRenew {
        /// The TTL.
        ttl: Duration,
        /// The renew interval.
        renew_interval: Duration,
        /// The safety margin.
        safety_margin: Duration,
    },
}

impl fmt::Display for LeaseConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseConfigError::ZeroTtl => write!(f, "the lease TTL must be positive"),
            LeaseConfigError::ZeroRenewInterval => {
                write!(f, "the lease renew interval must be positive")
            }
            LeaseConfigError::NoRoomToRenew {
                ttl,
                renew_interval,
                safety_margin,
            } => write!(
                f,
                "renew interval {renew_interval} + safety margin {safety_margin} must be below the TTL {ttl}"
            ),
        }
    }
}

impl std::error::Error for LeaseConfigError {}

/// Timing of a [`Lease`](super::Lease).
///
/// The **safety margin** is how long before the broker could expire our last write we stop
/// trusting the lease. The broker measures the TTL from when it *stored* the write, which is no
/// earlier than when we *sent* it, so `sent + TTL` is already a lower bound of the expiry; the
/// margin covers what remains: the rate difference between our clock and the broker's over one
/// TTL, and the time a write fenced just before the deadline takes to reach the registry. The
/// default is `TTL / 6` (5 s for the 30 s TTL), leaving 10 s of one-second renew retries between
/// the renew interval (15 s) and the deadline (25 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    ttl: Duration,
    renew_interval: Duration,
    safety_margin: Duration,
    acquire_window: Duration,
    retry_step: Duration,
    reference_gap_g23: bool,
}

impl Default for LeaseConfig {
    /// The reference's timing: [`LEASE_TTL`] (30 s), renew every 15 s, 5 s margin, 31 s window.
    fn default() -> Self {
        LeaseConfig {
            ttl: LEASE_TTL,
            renew_interval: lease_renew_interval(LEASE_TTL),
            safety_margin: Duration::from_millis(LEASE_TTL.as_millis() / 6),
            acquire_window: LEASE_TTL + BACKOFF_BASE,
            retry_step: BACKOFF_BASE,
            reference_gap_g23: false,
        }
    }
}

impl LeaseConfig {
    /// The timing for a bucket whose TTL is `ttl`: renew at `max(1 s, ttl / 2)` (`DMN`), margin
    /// `ttl / 6`, acquisition window `ttl + 1 s`, renew retries every second.
    pub fn for_ttl(ttl: Duration) -> Result<Self, LeaseConfigError> {
        LeaseConfig::new(
            ttl,
            lease_renew_interval(ttl),
            Duration::from_millis(ttl.as_millis() / 6),
            ttl + BACKOFF_BASE,
        )
    }

    /// A timing with every value given; refused when a healthy holder could not renew before
    /// its own deadline.
    pub fn new(
        ttl: Duration,
        renew_interval: Duration,
        safety_margin: Duration,
        acquire_window: Duration,
    ) -> Result<Self, LeaseConfigError> {
        if ttl == Duration::ZERO {
            return Err(LeaseConfigError::ZeroTtl);
        }
        if renew_interval == Duration::ZERO {
            return Err(LeaseConfigError::ZeroRenewInterval);
        }
        if (renew_interval + safety_margin) >= ttl {
            return Err(LeaseConfigError::NoRoomToRenew {
                ttl,
                renew_interval,
                safety_margin,
            });
        }
        Ok(LeaseConfig {
            ttl,
            renew_interval,
            safety_margin,
            acquire_window,
            retry_step: BACKOFF_BASE.min(renew_interval),
            reference_gap_g23: false,
        })
    }

    /// The bucket TTL: an unrenewed write disappears this long after it was stored.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Time between renewals, counted from the send time of the last confirmed write.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval
    }

    /// How long before `last confirmed write + TTL` the fencing token is withdrawn.
    pub fn safety_margin(&self) -> Duration {
        self.safety_margin
    }

    /// How long acquisition keeps retrying a contended create before it gives up.
    pub fn acquire_window(&self) -> Duration {
        self.acquire_window
    }

    /// Delay before retrying a renewal or a re-read that failed transiently.
    pub fn retry_step(&self) -> Duration {
        self.retry_step
    }

    /// Test-only: the same timing with gap G23 restored, as the reference runs its lease: no
    /// deadline of our own, so the fencing token is never withdrawn by time and the lease is lost
    /// only when a renew CAS fails. The simulator uses it to prove its oracle sees a deposed
    /// daemon's writes. Never used outside tests.
    #[doc(hidden)]
    pub fn with_reference_gap_g23(self) -> Self {
        LeaseConfig {
            reference_gap_g23: true,
            ..self
        }
    }

    /// Whether gap G23 is restored ([`LeaseConfig::with_reference_gap_g23`]).
    pub(super) fn reference_gap_g23(&self) -> bool {
        self.reference_gap_g23
    }

    pub(super) fn deadline_after(&self, confirmed: Instant) -> Instant {
        if self.reference_gap_g23 {
            // No deadline: far past any run (about 31 years).
            return confirmed + Duration::from_secs(1_000_000_000);
        }
        confirmed + Duration::from_millis(self.ttl.as_millis() - self.safety_margin.as_millis())
    }
}
