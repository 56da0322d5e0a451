//! The consumer budget of a space (issue 22): how many consumers each stream admits, sized for
//! the number of agents the operator provisions the space for, and how much room is left.
//!
//! Every agent holds consumers of its own: the provisioner's `dlv_<id>` on DLV and `dm_<id>` on
//! DM, its role's `svc_<role>` on TASK, its history reader `chathist_<id>` on CHAT, and the
//! watches of the presence and channels buckets. nats-server 2.15 caps a stream whose
//! `max_consumers` is −1 or 0 at `jetstream { limits { default_max_consumers } }`, 1,000 unless the
//! operator changes it: a space with the reference's configs stops admitting agents at about
//! 1,000, and says so only when a consumer create is refused (err 10026).
//!
//! So every stream that carries per-agent consumers gets an explicit cap from
//! [`ConsumerBudget::stream_cap`] / [`ConsumerBudget::bucket_cap`]: the consumers one agent may
//! hold there ([`per_agent_stream_consumers`], [`per_agent_bucket_consumers`]) times the agents
//! the space is sized for, plus [`SERVICE_CONSUMERS`] for the daemons and operators. The cap stays
//! finite on purpose: it is also the bound on what a hostile agent can create with its watch
//! grant. The streams without per-agent consumers (INBOX, and the members, acl, delivery and
//! loss buckets) keep the server's default.
//!
//! [`Headroom::judge`] is the one judgement of a stream's room, used by `cotal health`, the
//! provisioner (an agent is admitted only while each of its streams has room) and the daemon's
//! health.

use crate::wire::config::{KvBucketSpec, SpaceConfig, SpaceStream, StreamSpec};
use crate::wire::keys::KvBucket;
use crate::wire::token::Space;
use serde::Serialize;

/// Agents a space is sized for when the operator does not say (`cotal up --max-agents`).
pub const DEFAULT_MAX_AGENTS: u32 = 5_000;

/// Consumers a capped stream keeps beside the per-agent ones: the daemons' durables (a `fanout`
/// and `reader` per shard), the revocation sweep's reader, the daemons' and operators' KV
/// watches and inspection readers.
pub const SERVICE_CONSUMERS: u32 = 64;

/// A stream with less than this share of its cap free (in percent) has low headroom: `cotal
/// health` and the daemon's health report it.
pub const LOW_HEADROOM_PERCENT: u64 = 10;

/// nats-server 2.15's cap of a stream whose `max_consumers` is −1 or 0, unless the operator set
/// another `default_max_consumers` (older servers have none; the judgement then errs on the safe
/// side).
pub const SERVER_DEFAULT_MAX_CONSUMERS: u64 = 1_000;

/// Consumers one agent may hold on space stream `stream`.
///
/// - CHAT: its history reader `chathist_<id>`, and the daemon's catch-up reader
///   `cu_<id>_<generation>` of a join in flight (a named ephemeral, gone 30 s after use): 2.
/// - DM: its `dm_<id>`: 1.
/// - TASK: its role's `svc_<role>` (a role is shared, so there are never more roles than
///   agents): 1.
/// - DLV: its `dlv_<id>`: 1.
/// - INBOX: none (the daemons' `reader` only).
pub fn per_agent_stream_consumers(stream: SpaceStream) -> u32 {
    match stream {
        SpaceStream::Chat => 2,
        SpaceStream::Dm | SpaceStream::Task | SpaceStream::Dlv => 1,
        SpaceStream::Inbox => 0,
    }
}

/// Consumers one agent may hold on the stream of bucket `bucket`: on presence and channels, its
/// watch, and the one a reconnect leaves behind until the stream's inactivity limit removes it
/// (2); on the others none (only the daemons and operators watch them).
pub fn per_agent_bucket_consumers(bucket: KvBucket) -> u32 {
    match bucket {
        KvBucket::Presence | KvBucket::Channels => 2,
        KvBucket::Members | KvBucket::Acl | KvBucket::Delivery | KvBucket::Losses => 0,
    }
}

/// How many agents a space's streams admit consumers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConsumerBudget {
    max_agents: u32,
}

impl Default for ConsumerBudget {
    fn default() -> Self {
        ConsumerBudget::for_agents(DEFAULT_MAX_AGENTS)
    }
}

impl ConsumerBudget {
    /// A budget for `max_agents` agents (at least 1).
    pub fn for_agents(max_agents: u32) -> Self {
        ConsumerBudget {
            max_agents: max_agents.max(1),
        }
    }

    /// The agents the budget is sized for.
    pub fn max_agents(&self) -> u32 {
        self.max_agents
    }

    /// `max_consumers` of space stream `stream`, or `None` (the server's default) for a stream
    /// without per-agent consumers.
    pub fn stream_cap(&self, stream: SpaceStream) -> Option<i64> {
        self.cap(per_agent_stream_consumers(stream))
    }

    /// `max_consumers` of the stream of bucket `bucket`, or `None` (the server's default).
    pub fn bucket_cap(&self, bucket: KvBucket) -> Option<i64> {
        self.cap(per_agent_bucket_consumers(bucket))
    }

    /// The streams and buckets of `space` as `cotal up` creates them: the reference's
    /// ([`SpaceConfig::new`]) with each stream that carries per-agent consumers capped by this
    /// budget.
    pub fn space_config(&self, space: &Space) -> SpaceConfig {
        let reference = SpaceConfig::new(space);
        SpaceConfig {
            streams: reference
                .streams
                .into_iter()
                .zip(SpaceStream::ALL)
                .map(|(spec, kind)| StreamSpec {
                    max_consumers: self.stream_cap(kind),
                    ..spec
                })
                .collect(),
            kv_buckets: reference
                .kv_buckets
                .into_iter()
                .zip(KvBucket::ALL)
                .map(|(spec, kind)| KvBucketSpec {
                    max_consumers: self.bucket_cap(kind),
                    ..spec
                })
                .collect(),
        }
    }

    fn cap(&self, per_agent: u32) -> Option<i64> {
        (per_agent > 0).then(|| {
            i64::from(per_agent) * i64::from(self.max_agents) + i64::from(SERVICE_CONSUMERS)
        })
    }

    /// The agents a stream capped at `max_consumers` admits when each holds `per_agent` of them
    /// (the inverse of the sizing, for messages: "sized for N agents"); 0 when the cap is not
    /// even the service share.
    pub fn agents_admitted(max_consumers: u64, per_agent: u32) -> u64 {
        max_consumers.saturating_sub(u64::from(SERVICE_CONSUMERS)) / u64::from(per_agent.max(1))
    }
}

/// The room left on one stream, from its `max_consumers` and its consumer count (`STREAM.INFO`:
/// `config.max_consumers`, `state.consumer_count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Headroom {
    /// Consumers on the stream.
    pub consumers: u64,
    /// The cap in force: the stream's own, or [`SERVER_DEFAULT_MAX_CONSUMERS`] when it set none.
    pub cap: u64,
    /// The stream set no cap of its own (−1 or 0): `cap` is the server's default, assumed.
    pub server_default: bool,
}

impl Headroom {
    /// The headroom of a stream holding `consumers` consumers under `max_consumers`.
    pub fn judge(consumers: u64, max_consumers: i64) -> Self {
        match u64::try_from(max_consumers) {
            Ok(cap) if cap > 0 => Headroom {
                consumers,
                cap,
                server_default: false,
            },
            _ => Headroom {
                consumers,
                cap: SERVER_DEFAULT_MAX_CONSUMERS,
                server_default: true,
            },
        }
    }

    /// Consumers that can still be created.
    pub fn free(&self) -> u64 {
        self.cap.saturating_sub(self.consumers)
    }

    /// Whether `n` more consumers fit.
    pub fn admits(&self, n: u64) -> bool {
        self.free() >= n
    }

    /// Less than [`LOW_HEADROOM_PERCENT`] of the cap is free (a full stream included).
    pub fn is_low(&self) -> bool {
        self.free().saturating_mul(100) < self.cap.saturating_mul(LOW_HEADROOM_PERCENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caps_are_per_agent_consumers_times_agents_plus_the_service_share() {
        let b = ConsumerBudget::for_agents(5_000);
        assert_eq!(b.stream_cap(SpaceStream::Chat), Some(10_064));
        assert_eq!(b.stream_cap(SpaceStream::Dlv), Some(5_064));
        assert_eq!(b.stream_cap(SpaceStream::Dm), Some(5_064));
        assert_eq!(b.stream_cap(SpaceStream::Task), Some(5_064));
        assert_eq!(b.stream_cap(SpaceStream::Inbox), None);
        assert_eq!(b.bucket_cap(KvBucket::Presence), Some(10_064));
        assert_eq!(b.bucket_cap(KvBucket::Channels), Some(10_064));
        for k in [
            KvBucket::Members,
            KvBucket::Acl,
            KvBucket::Delivery,
            KvBucket::Losses,
        ] {
            assert_eq!(b.bucket_cap(k), None, "{k:?}");
        }
        assert_eq!(ConsumerBudget::default(), b);
        // Zero agents is one: a cap never falls to the service share alone.
        assert_eq!(ConsumerBudget::for_agents(0).max_agents(), 1);
        // No overflow at the top of the range.
        assert_eq!(
            ConsumerBudget::for_agents(u32::MAX).stream_cap(SpaceStream::Chat),
            Some(2 * i64::from(u32::MAX) + 64)
        );
    }

    #[test]
    fn agents_admitted_inverts_the_sizing() {
        for n in [1u32, 10, 999, 5_000, 100_000] {
            let b = ConsumerBudget::for_agents(n);
            for s in [SpaceStream::Chat, SpaceStream::Dlv] {
                let cap = u64::try_from(b.stream_cap(s).unwrap_or(0)).unwrap_or(0);
                assert_eq!(
                    ConsumerBudget::agents_admitted(cap, per_agent_stream_consumers(s)),
                    u64::from(n)
                );
            }
        }
        assert_eq!(ConsumerBudget::agents_admitted(50, 1), 0);
        assert_eq!(ConsumerBudget::agents_admitted(100, 1), 36);
    }

    #[test]
    fn headroom_is_low_under_ten_percent_and_full_admits_nothing() {
        let h = Headroom::judge(90, 100);
        assert_eq!(
            (h.free(), h.is_low(), h.admits(10), h.admits(11)),
            (10, false, true, false)
        );
        let h = Headroom::judge(91, 100);
        assert_eq!((h.free(), h.is_low()), (9, true));
        let h = Headroom::judge(100, 100);
        assert_eq!(
            (h.free(), h.is_low(), h.admits(1), h.admits(0)),
            (0, true, false, true)
        );
        // Past the cap (lowered under the count): nothing free, no underflow.
        assert_eq!(Headroom::judge(150, 100).free(), 0);
    }

    #[test]
    fn a_stream_without_a_cap_is_judged_against_the_server_default() {
        for unset in [-1, 0] {
            let h = Headroom::judge(950, unset);
            assert_eq!(
                (h.cap, h.server_default, h.free(), h.is_low()),
                (1_000, true, 50, true)
            );
        }
        assert!(!Headroom::judge(950, 5_256).server_default);
    }
}
