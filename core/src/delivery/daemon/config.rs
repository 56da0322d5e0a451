//! The daemon's configuration and its tuning constants (re-exported by [`super`]).

use crate::constants::DEFAULT_ORPHAN_RETENTION;
use crate::delivery::lease::LeaseConfig;
use crate::time::Duration;
use crate::wire::shard::Shard;
use crate::wire::token::Space;

/// How many times catch-up publishes one dinbox copy before the join fails (G24).
pub const CATCHUP_PUBLISH_ATTEMPTS: u32 = 3;

/// Messages per catch-up stream read (the reference's history batch).
pub const DEFAULT_CATCHUP_PAGE: u32 = crate::constants::HISTORY_FETCH_MAX_BATCH;

/// Default flow-control window of the fan-out consumer (CHAT messages in flight at once).
pub const DEFAULT_FANOUT_WINDOW: u32 = 64;

pub use crate::delivery::backlog::DINBOX_HIGH_WATER;

/// The longest fan-out keeps a CHAT delivery unsettled while some of its copies are held back
/// (their owner's dinbox backlog is at [`DINBOX_HIGH_WATER`]): a third of the fan-out consumer's
/// `ack_wait` (60 s), so the server never redelivers a message the daemon still holds. Past it
/// the delivery is naked with [`backpressure_delay`] and its redelivery writes the held copies.
pub const FANOUT_HOLD_LIMIT: crate::time::Duration = crate::time::Duration::from_millis(20_000);

/// The first nak delay of a CHAT delivery whose hold gave up ([`FANOUT_HOLD_LIMIT`]); each
/// redelivery that gives up again doubles it, up to [`BACKPRESSURE_MAX_DELAY`]
/// ([`backpressure_delay`]).
pub const BACKPRESSURE_DELAY: crate::time::Duration = crate::time::Duration::from_millis(200);

/// The longest nak delay of a held-back CHAT delivery: a long hold costs one redelivery per
/// message every few seconds, not a hot loop.
pub const BACKPRESSURE_MAX_DELAY: crate::time::Duration = crate::time::Duration::from_millis(5000);

/// The nak delay of a CHAT delivery held back on its `delivery_count`-th delivery.
pub fn backpressure_delay(delivery_count: u64) -> crate::time::Duration {
    let doublings = u32::try_from(delivery_count.saturating_sub(1).min(5)).unwrap_or(5);
    let ms = BACKPRESSURE_DELAY
        .as_millis()
        .saturating_mul(1 << doublings);
    crate::time::Duration::from_millis(ms.min(BACKPRESSURE_MAX_DELAY.as_millis()))
}

/// Reads of a skipped CHAT range tried before it is reported as possibly lost
/// ([`DeliveryEvent::EvictedBeforeFanout`](super::DeliveryEvent::EvictedBeforeFanout) with `verified: false`).
pub const GAP_CHECK_ATTEMPTS: u32 = 3;

/// Default flow-control window of the reader consumer.
pub const DEFAULT_READER_WINDOW: u32 = 256;

/// The nak delay of a delivery a stopping daemon hands back (or one that arrives on a feed it
/// closed): long enough that the closed feed's own pull request is gone from the server, so the
/// redelivery goes to a successor rather than back into the dead pull (which would hold it for
/// the consumer's whole `ack_wait`); short next to that `ack_wait` (60 s).
pub const HAND_BACK_DELAY: crate::time::Duration = crate::time::Duration::from_millis(1000);

/// How long a daemon whose lease was lost (or could not be acquired) waits before it tries again
/// with a fresh lease ([`DeliveryConfig::reacquire_lease`]). The acquisition itself retries with
/// the shared backoff for one lease TTL; this only spaces the rounds.
pub const REACQUIRE_DELAY: crate::time::Duration = crate::time::Duration::from_millis(1000);

/// Default bound on control requests held at once (running and queued, R18). A request over it is
/// refused with an error reply.
pub const DEFAULT_MAX_REQUESTS: usize = 1024;

/// At most this many orphaned memberships are listed in the lease record (the count is exact).
pub const MAX_PUBLISHED_ORPHANS: usize = 100;

/// The configuration of one daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// The space served.
    pub space: Space,
    /// The shard held (default: shard 0 of 1).
    pub shard: Shard,
    /// The daemon id: the lease holder and every record's `writerIdentity`.
    pub daemon_id: String,
    /// Lease timing.
    pub lease: LeaseConfig,
    /// Messages per catch-up read.
    pub catchup_page: u32,
    /// Fan-out consumer window.
    pub fanout_window: u32,
    /// Reader consumer window.
    pub reader_window: u32,
    /// Bound on control requests held at once.
    pub max_requests: usize,
    /// Send every copy the reference's two hops: fan-out writes it to the owner's dinbox and the
    /// reader transfers it to DLV. Off by default: fan-out writes a copy it may transfer straight
    /// to DLV and spills only the rest (see `daemon/fanout.rs`). For comparisons (`cotal bench
    /// --two-hop`) and tests of the reader's path.
    pub two_hop: bool,
    /// Test-only: restores the reference behaviour of gap G2 so the simulator can prove the
    /// oracle sees it. The reader then judges a `durable-channel` entry by the record's
    /// **current** interval only, ignoring `entry.generation`: after a leave and a rejoin, the
    /// pending entries of the previous generation are dropped (semantics §4 G2, I18). Always
    /// `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g2: bool,
    /// Test-only: restores the reference behaviour of gap G23 so the simulator can prove the
    /// oracle sees it. The lease then keeps no deadline of its own
    /// ([`LeaseConfig::with_reference_gap_g23`]): a daemon that was stalled past the lease TTL
    /// keeps its fencing token and writes until a renew CAS fails (semantics §2(m), G23, I30).
    /// Always `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g23: bool,
    /// Test-only: switches the DLV revocation sweep off ([`crate::delivery::revoke`]), as the
    /// reference has none, so the simulator can prove the oracle sees copies of a narrowed
    /// channel left in DLV (issue 9). Always `false` outside tests.
    #[doc(hidden)]
    pub reference_no_dlv_sweep: bool,
    /// How long an owner may be offline (no presence heartbeat seen by this daemon) before its
    /// open memberships count as orphaned (issue 15 item 7, G12). They are reported
    /// ([`DeliveryEvent::MembershipOrphaned`](super::DeliveryEvent::MembershipOrphaned)) and published in the lease record's
    /// [`ORPHANS_FIELD`](crate::delivery::lease::ORPHANS_FIELD) either way.
    pub orphan_retention: Duration,
    /// Tombstone orphaned memberships (through the daemon's own leave, fenced as any leave).
    /// Off by default: only an operator opts in.
    pub reap_orphans: bool,
    /// Test-only: restores the reference's `@mention` resolution (G17) so the simulator can
    /// prove the oracle sees it: every presence entry ever seen counts, offline ghosts and
    /// mismatched keys included, and a name the roster never saw is unknown (no provisioned
    /// directory). Always `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g17: bool,
    /// Ride out a lost lease in process (issue 19). When the lease is lost (an outage longer
    /// than the lease window, a successor that took over) or cannot be acquired, the daemon stops
    /// every write at once, as before (its fencing token is gone), and [`REACQUIRE_DELAY`] later
    /// starts over as a new incarnation: a fresh lease with a new fencing token, the views
    /// reloaded, the feeds reopened. It never writes while another daemon holds the lease (I30):
    /// the new lease is a create-only write that succeeds only once the key is free. Loss notices
    /// still waiting are carried over. `false` ends the daemon at the loss, as the reference does
    /// (the embedding then restarts it).
    pub reacquire_lease: bool,
    /// Read the lease bucket's TTL (its stream's `max_age`) before every acquisition and time
    /// the lease by it ([`LeaseConfig::for_ttl`]), in place of [`DeliveryConfig::lease`]'s
    /// (default true). The TTL is the space's: `cotal up --lease-ttl` sets it, and a daemon
    /// that assumed a longer one than the bucket's would still trust its lease after the broker
    /// expired it, so a successor could write beside it. A bucket without a TTL keeps the
    /// configured timing.
    pub lease_ttl_from_bucket: bool,
    /// Read back what the fan-out and reader consumers offered to a feed that is gone, rather
    /// than wait for their redelivery after `ack_wait` ([`crate::delivery::stranded`]; default
    /// true). `false` is the reference's way: the simulator's G2 scenario needs a dinbox entry
    /// whose redelivery comes after a rejoin, as the reference's reader sees it.
    pub read_back_stranded: bool,
}

impl DeliveryConfig {
    /// The defaults for `shard` of `space`, run as `daemon_id`.
    pub fn new(space: Space, shard: Shard, daemon_id: impl Into<String>) -> Self {
        DeliveryConfig {
            space,
            shard,
            daemon_id: daemon_id.into(),
            lease: LeaseConfig::default(),
            catchup_page: DEFAULT_CATCHUP_PAGE,
            fanout_window: DEFAULT_FANOUT_WINDOW,
            reader_window: DEFAULT_READER_WINDOW,
            max_requests: DEFAULT_MAX_REQUESTS,
            two_hop: false,
            reference_gap_g2: false,
            reference_gap_g23: false,
            reference_no_dlv_sweep: false,
            orphan_retention: DEFAULT_ORPHAN_RETENTION,
            reap_orphans: false,
            reference_gap_g17: false,
            reacquire_lease: true,
            lease_ttl_from_bucket: true,
            read_back_stranded: true,
        }
    }
}
