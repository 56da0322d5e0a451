//! The protocol's constants (semantics §5), typed.
//!
//! Each item names where the reference 0.6.0 defines it, with the shorthand of the semantics
//! document (`STRM` = `packages/core/src/streams.ts`, `EP` = `endpoint.ts`, `DMN` = the delivery
//! daemon, `AGT` = the connector's `MeshAgent`, `CHN` = `channels.ts`, `SUBJ` = `subjects.ts`,
//! `LEASE` = `lease.ts`, `MEM` = `members.ts`, `ACL` = `acls.ts`, `PROV` = `provision.ts`).
//! Times are [`Duration`]s (milliseconds). Names, keys and hash parameters that belong to one wire
//! module are defined there and re-exported here, and so are the channel registry's constants,
//! defined in [`policy`](crate::policy): each value has exactly one definition, and this module
//! imports from those modules, never the other way.

use crate::time::Duration;

pub use crate::wire::keys::{CHANNEL_DEFAULTS_KEY, LEASE_KEY_PREFIX};
pub use crate::wire::shard::{FANOUT_DURABLE, FNV_OFFSET_BASIS, FNV_PRIME, INBOX_READER_DURABLE};

// ---- Streams and consumers (`STRM`) ----

/// Per-subject message cap on CHAT (per sender/channel subject), INBOX and DLV (per owner), with
/// discard Old; also the focus-recall horizon (`STRM:MAX_MSGS_PER_SUBJECT`).
pub const MAX_MSGS_PER_SUBJECT: i64 = 1000;

/// `duplicate_window` of the INBOX and DLV streams: 2 h (`STRM:PLANE3_DEDUP_WINDOW_MS`). Two writes
/// of the same logical copy further apart than this both land.
pub const PLANE3_DEDUP_WINDOW: Duration = Duration::from_millis(7_200_000);

/// The duplicate window CHAT, DM and TASK get: the reference sets none, so the server default of
/// 120 s applies (`STRM`). Stated here so a checker can compare what a server reports.
pub const SERVER_DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_millis(120_000);

/// `max_ack_pending` of the trusted-reader consumer; it bounds the whole consumer, not each owner
/// (`STRM:DINBOX_MAX_ACK_PENDING`, gap G5).
pub const DINBOX_MAX_ACK_PENDING: i64 = 1000;

/// The `ack_wait` default of the dm, svc, dlv, fanout and reader consumers (`EP` constructor
/// `ackWaitMs`, `STRM` configs).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_millis(60_000);

/// The `inactive_threshold` default, used only by the open-mode DM self-create (`EP` constructor
/// `inactiveThresholdMs`).
pub const DEFAULT_INACTIVE_THRESHOLD: Duration = Duration::from_millis(600_000);

/// `inactive_threshold` of the `chathist_<id>` and `cu_<owner>_<gen>` history consumers
/// (`EP:collectHistoryInner`, `EP:catchupCopy`).
pub const HISTORY_INACTIVE_THRESHOLD: Duration = Duration::from_millis(30_000);

/// Largest batch of one history fetch; a fetch asks for `min(pending, 256)` (`EP:collectHistoryInner`,
/// `EP:catchupCopy`).
pub const HISTORY_FETCH_MAX_BATCH: u32 = 256;

/// `expires` of one history fetch (`EP:collectHistoryInner`, `EP:catchupCopy`).
pub const HISTORY_FETCH_EXPIRES: Duration = Duration::from_millis(5000);

// ---- KV buckets and the delivery lease (`STRM`, `DMN`, `LEASE`) ----

/// TTL of the `cotal_delivery_<space>` bucket, hence of an unrenewed lease (`STRM:LEASE_TTL_MS`).
pub const LEASE_TTL: Duration = Duration::from_millis(30_000);

/// The lease renew interval for a given TTL: `max(1000, floor(ttl / 2))` ms (`DMN`).
pub const fn lease_renew_interval(ttl: Duration) -> Duration {
    let half = ttl.as_millis() / 2;
    Duration::from_millis(if half > 1000 { half } else { 1000 })
}

/// The renew interval for [`LEASE_TTL`]: 15 000 ms (`DMN`).
pub const LEASE_RENEW_INTERVAL: Duration = lease_renew_interval(LEASE_TTL);

/// TTL of the presence bucket created at setup (`STRM:PRESENCE_TTL_MS`).
pub const PRESENCE_TTL: Duration = Duration::from_millis(6000);

/// `waitForDeliveryLease` gives up after this long (`LEASE`).
pub const WAIT_FOR_DELIVERY_LEASE_TIMEOUT: Duration = Duration::from_millis(8000);

/// `waitForDeliveryLease` polls the lease this often (`LEASE`).
pub const WAIT_FOR_DELIVERY_LEASE_POLL: Duration = Duration::from_millis(200);

/// `maxReconnectAttempts` of the `waitForDeliveryLease` connection (`LEASE`).
pub const WAIT_FOR_DELIVERY_LEASE_MAX_RECONNECT_ATTEMPTS: u32 = 5;

/// Attempts of one compare-and-set KV write before giving up ("members CAS exhausted retries")
/// (`MEM:commitMember`, `MEM:activateMember`, `ACL:commitAcl`).
pub const KV_CAS_ATTEMPTS: u32 = 5;

// ---- Presence and liveness (`EP`) ----

/// Presence heartbeat default (`EP` constructor `heartbeatMs`).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(2000);

/// Liveness window default, also the open-mode presence TTL (`EP` constructor `ttlMs`).
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_millis(6000);

/// The presence sweep interval for a liveness window: `max(500, floor(ttl / 3))` ms
/// (`EP:connectAndBind`).
pub const fn sweep_interval(ttl: Duration) -> Duration {
    let third = ttl.as_millis() / 3;
    Duration::from_millis(if third > 500 { third } else { 500 })
}

/// The sweep interval for [`DEFAULT_PRESENCE_TTL`]: 2000 ms.
pub const DEFAULT_SWEEP_INTERVAL: Duration = sweep_interval(DEFAULT_PRESENCE_TTL);

// ---- Trusted reader and fan-out (`EP`) ----

/// The reader terminates an entry once its `deliveryCount ≥ 10` (`EP:READER_MAX_REDELIVERIES`,
/// gap G3).
pub const READER_MAX_REDELIVERIES: u64 = 10;

/// The reader's nak delay for an unknown owner or a failed transfer (`EP:readerHandle`). Fan-out
/// and reader naks after an exception have no delay.
pub const READER_NAK_DELAY: Duration = Duration::from_millis(2000);

/// The nak delay after an exception in the fan-out or reader handler: none, the message is
/// redelivered at once (`EP:runFanout`, `EP:runReader`; gap G4).
pub const EXCEPTION_NAK_DELAY: Duration = Duration::ZERO;

/// The `generation` of a `live-mention` dinbox entry, and of its msg-id suffix
/// (`EP:fanOutMessage`).
pub const LIVE_MENTION_GENERATION: u64 = 0;

// ---- Requests, retries and backoff (`EP`, `AGT`, `DMN`) ----

/// How long `confirmChatSub` waits after `flush()` before it trusts a subscription
/// (`EP:confirmChatSub`).
pub const CONFIRM_SETTLE: Duration = Duration::from_millis(50);

/// Default timeout of a `requestControl` call (manager tiers) (`EP`).
pub const REQUEST_CONTROL_TIMEOUT: Duration = Duration::from_millis(5000);

/// Default timeout of a `requestDelivery` call (`durableLeave`, `listMemberships`) (`EP`).
pub const REQUEST_DELIVERY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Timeout of a `durableJoin` request, which may run an activation catch-up
/// (`EP:durableJoinChannel`).
pub const DURABLE_JOIN_TIMEOUT: Duration = Duration::from_millis(30_000);

/// How often an agent lists its memberships to re-validate its mirror (issue 15 item 4), besides
/// once at every ready connection. Slow on purpose: one `listMemberships` per agent per period.
pub const MEMBERSHIP_AUDIT_INTERVAL: Duration = Duration::from_millis(60_000);

/// Default retention of a membership whose owner is offline: past it the daemon reports the
/// membership as orphaned (and tombstones it when the operator opted in). Issue 15 item 7, G12.
pub const DEFAULT_ORPHAN_RETENTION: Duration = Duration::from_millis(7 * 24 * 3600 * 1000);

/// How often the daemon looks for orphaned memberships.
pub const ORPHAN_SCAN_INTERVAL: Duration = Duration::from_millis(60_000);

/// How often the daemon reads the consumer headroom of CHAT and DLV (issue 22,
/// [`crate::wire::capacity::Headroom`]).
pub const CONSUMER_HEADROOM_INTERVAL: Duration = Duration::from_millis(60_000);

/// First step of the refusal-close / boot-reconcile backoff (`EP:closeRefusedMembership`,
/// `EP:reconcileBootJoin`).
pub const BACKOFF_BASE: Duration = Duration::from_millis(1000);

/// Ceiling of the refusal-close / boot-reconcile backoff.
pub const BACKOFF_CAP: Duration = Duration::from_millis(30_000);

/// The refusal-close / boot-reconcile backoff before retry `attempt`:
/// `min(30 s, 1 s · 2^attempt)` (`EP:closeRefusedMembership`, `EP:reconcileBootJoin`).
///
/// Attempt 0 waits 1 s, 1 waits 2 s, … 4 waits 16 s, and every attempt from 5 on waits 30 s. It
/// saturates instead of overflowing for any `attempt`. Where the wait goes is the caller's business:
/// the close tries first and then backs off; the reconcile sleeps first.
pub fn backoff(attempt: u32) -> Duration {
    BACKOFF_BASE.saturating_mul_pow2(attempt).min(BACKOFF_CAP)
}

/// Delay between endpoint rebuild attempts (`EP` `retryMs`).
pub const ENDPOINT_REBUILD_RETRY: Duration = Duration::from_millis(3000);

/// Delay between `MeshAgent` connect attempts (`AGT` default `start(retryMs)`).
pub const AGENT_CONNECT_RETRY: Duration = Duration::from_millis(3000);

/// `isReachable` connect timeout (`EP:isReachable`).
pub const IS_REACHABLE_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The daemon exits once the broker has been unreachable this long (`DMN:BROKER_GONE_MS`,
/// overridable through [`BROKER_GONE_ENV`]).
pub const BROKER_GONE: Duration = Duration::from_millis(15_000);

/// The environment variable that overrides [`BROKER_GONE`], in milliseconds (`DMN`).
pub const BROKER_GONE_ENV: &str = "COTAL_DELIVERY_BROKER_GONE_MS";

/// How often the daemon polls the broker (`DMN`).
pub const BROKER_POLL: Duration = Duration::from_millis(2000);

/// The daemon's hard-exit fallback after a shutdown signal (`DMN`).
pub const SHUTDOWN_HARD_EXIT: Duration = Duration::from_millis(2000);

// ---- Receiver (`AGT`) ----

/// Capacity of the agent's inbox; an overflowing message is acked and dropped (`AGT:MAX_INBOX`).
pub const MAX_INBOX: usize = 200;

/// Size of one of the two rotating handled-id sets; dedup therefore remembers between 4096 and
/// 8192 ids (`AGT:markHandled`, gap G7).
pub const HANDLED_IDS_WINDOW: usize = 4096;

// ---- Channel registry (`CHN`) ----

// Defined in `policy`, which owns the channel registry, and re-exported here.
pub use crate::policy::{
    DEFAULT_DELIVERY_CLASS, DEFAULT_REPLAY, MAX_CHANNEL_DESCRIPTION, MAX_CHANNEL_INSTRUCTIONS,
    REPLAY_WINDOW_UNITS,
};

// ---- Naming and defaults (`EP`, `SUBJ`, `PROV`) ----

/// Prefix of an identity's private inbox, `_INBOX_<id>` (`EP:connectAndBind`).
pub const INBOX_PREFIX: &str = "_INBOX_";

/// The server an endpoint connects to by default (`EP:DEFAULT_SERVER`).
pub const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";

/// The space an endpoint joins by default (`EP:DEFAULT_SPACE`).
pub const DEFAULT_SPACE: &str = "main";

/// The channels an endpoint joins at boot by default (`EP`).
pub const DEFAULT_CHANNELS: [&str; 1] = ["general"];

/// The `ctl.<service>` control services (`SUBJ`).
pub const CONTROL_SERVICES: [&str; 4] = ["manager", "self", "admin", "delivery"];

/// The delivery daemon's control service, `ctl.delivery` (`SUBJ`).
pub const DELIVERY_CONTROL_SERVICE: &str = "delivery";

/// `max_control_line` of the rendered server config, large enough for rich agent JWTs
/// (`PROV:serverConfig`).
pub const MAX_CONTROL_LINE: u32 = 65_536;

/// The `protocolVersion` the reference still advertises on agent cards while it ships v0.3
/// semantics (SPEC §6/§11; seen as `"0.2"` in the presence fixtures).
pub const ADVERTISED_PROTOCOL_VERSION: &str = "0.2";

/// The protocol version whose semantics this crate implements.
pub const PROTOCOL_VERSION: &str = "0.3";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DeliveryClass;

    #[test]
    fn derived_intervals_match_the_table() {
        assert_eq!(LEASE_RENEW_INTERVAL, Duration::from_millis(15_000));
        assert_eq!(
            lease_renew_interval(Duration::from_millis(1500)),
            Duration::from_millis(1000)
        );
        assert_eq!(
            lease_renew_interval(Duration::from_millis(2003)),
            Duration::from_millis(1001)
        );
        assert_eq!(DEFAULT_SWEEP_INTERVAL, Duration::from_millis(2000));
        assert_eq!(
            sweep_interval(Duration::from_millis(900)),
            Duration::from_millis(500)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(7000)),
            Duration::from_millis(2333)
        );
    }

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_thirty() {
        let waits: Vec<u64> = (0..7).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(waits, vec![1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        assert_eq!(backoff(63), BACKOFF_CAP);
        assert_eq!(backoff(64), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn table_values() {
        assert_eq!(PLANE3_DEDUP_WINDOW.as_millis(), 2 * 60 * 60 * 1000);
        assert_eq!(CHANNEL_DEFAULTS_KEY, "=defaults");
        assert_eq!((FANOUT_DURABLE, INBOX_READER_DURABLE), ("fanout", "reader"));
        assert_eq!((FNV_OFFSET_BASIS, FNV_PRIME), (0x811c_9dc5, 0x0100_0193));
        assert_eq!(DEFAULT_DELIVERY_CLASS, DeliveryClass::Durable);
        let units: Vec<u64> = REPLAY_WINDOW_UNITS
            .iter()
            .map(|(_, d)| d.as_millis())
            .collect();
        assert_eq!(units, vec![1000, 60_000, 3_600_000, 86_400_000]);
        assert!(CONTROL_SERVICES.contains(&DELIVERY_CONTROL_SERVICE));
    }
}
