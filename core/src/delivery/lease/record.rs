//! What a lease record says to those who read it: the extra fields this crate writes beside the
//! reference's `{holder, since, ready}` ([`ACQUIRED_AT_FIELD`], [`HEALTH_FIELD`],
//! [`ORPHANS_FIELD`]) and how an observer judges a shard's delivery from the record alone
//! ([`judge_health`], G40). Used by the [`Lease`](super::Lease) machine to write, and by
//! `cotal health` and agents to read.

use crate::time::{Duration, UnixMillis};
use crate::wire::records::DeliveryLease;
use serde_json::Value;

/// The extra record field carrying the acquisition time (wall-clock ms), written on every write
/// of this crate. The reference ignores unknown fields and preserves nothing, so it is harmless.
pub const ACQUIRED_AT_FIELD: &str = "acquiredAt";

/// The extra record field carrying the holder's delivery health (`{"state":"active"}` or
/// `{"state":"degraded","reasons":[…]}`), written by this crate's daemon with every renew so that
/// agents, who may read the lease key, can see it ([`judge_health`]). The reference ignores it.
pub const HEALTH_FIELD: &str = "health";

/// The extra record field carrying the holder's orphaned memberships (`{retentionMs, reap, count,
/// memberships:[{owner, channel, generation, offlineMs}]}`), for `cotal members --orphans`
/// (issue 15 item 7). The reference ignores it.
pub const ORPHANS_FIELD: &str = "orphans";

/// The extra record field carrying the consumer headroom of the streams the holder watches
/// (`{"<stream>": {consumers, cap, serverDefault, low}}`, issue 22), for `cotal health`. The
/// reference ignores it.
pub const CONSUMERS_FIELD: &str = "consumerHeadroom";

/// The acquisition time of a record: [`ACQUIRED_AT_FIELD`] when present and a whole number,
/// else `since` (a record written by the reference, whose `since` is its last write).
pub fn acquired_at_of(record: &DeliveryLease) -> UnixMillis {
    record
        .extra
        .get(ACQUIRED_AT_FIELD)
        .and_then(Value::as_u64)
        .map_or(record.since, UnixMillis)
}

/// How an observer judges a shard's delivery (G40, scenario D10).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseHealth {
    /// A holder is ready and wrote within one TTL.
    Active {
        /// The holder.
        holder: String,
    },
    /// No working holder can be shown.
    Degraded(DegradedReason),
}

/// Why a lease reads as degraded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DegradedReason {
    /// No lease record (absent, deleted, or undecodable): no daemon holds the shard.
    Absent,
    /// A daemon holds the lease but has not bound Plane-3 yet (`ready:false`).
    NotReady,
    /// The holder is ready but published its own health as degraded ([`HEALTH_FIELD`]).
    Reported {
        /// The holder's reasons, as it wrote them (`fanout-down`, `writes-failing` …).
        reasons: Vec<String>,
    },
    /// The last write is older than the TTL: the holder stopped renewing (crashed or stalled),
    /// and the record is only waiting for the bucket's `max_age` to remove it.
    Stale {
        /// `now − since`.
        age: Duration,
    },
}

/// Judges a lease record read by an observer at wall time `now`: active iff
/// `ready && now − since ≤ ttl`; a `since` in the future (clock skew) counts as age 0.
///
/// Unlike the reference's point-in-time check (G40), a crashed holder stops reading as active
/// one TTL after its last renewal.
pub fn judge_health(record: Option<&DeliveryLease>, now: UnixMillis, ttl: Duration) -> LeaseHealth {
    let Some(record) = record else {
        return LeaseHealth::Degraded(DegradedReason::Absent);
    };
    let age = Duration::from_millis(now.0.saturating_sub(record.since.0));
    if age > ttl {
        LeaseHealth::Degraded(DegradedReason::Stale { age })
    } else if !record.ready {
        LeaseHealth::Degraded(DegradedReason::NotReady)
    } else if let Some(reasons) = reported_degraded(record) {
        LeaseHealth::Degraded(DegradedReason::Reported { reasons })
    } else {
        LeaseHealth::Active {
            holder: record.holder.clone(),
        }
    }
}

/// The reasons of a record whose [`HEALTH_FIELD`] says `degraded`; `None` when the field is
/// absent (a reference daemon), says anything else, or does not parse.
fn reported_degraded(record: &DeliveryLease) -> Option<Vec<String>> {
    let health = record.extra.get(HEALTH_FIELD)?;
    if health.get("state").and_then(Value::as_str) != Some("degraded") {
        return None;
    }
    Some(
        health
            .get("reasons")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    )
}
