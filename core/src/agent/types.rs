//! The agent's public vocabulary: configuration, requests, reports, health, events.

use crate::constants::{DEFAULT_HEARTBEAT, MEMBERSHIP_AUDIT_INTERVAL};
use crate::delivery::losses::{LossLedger, LossOverflow, LossRange};
use crate::entropy::IdKey;
use crate::ledger::{LedgerConfig, LedgerCounters, LedgerError, Rejection};
use crate::time::Duration;
use crate::wire::message::{CotalMessage, Sender};
use crate::wire::subject::DeliveryKind;
use crate::wire::token::{Channel, ConcreteChannel, Role, Space};
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How an agent is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The space.
    pub space: Space,
    /// Who we are: `from` of everything we send, the sender token of our subjects.
    pub me: Sender,
    /// Channels joined at first connect (boot channels).
    pub channels: Vec<Channel>,
    /// Use the durable backstop (auth mode with a delivery daemon): durable joins, tombstones,
    /// the DLV consumer. Off, the agent is live-only (the reference's open mode).
    pub durable_backstop: bool,
    /// Create the DLV consumer if missing (open mode / privileged agent) rather than only bind.
    pub create_dlv_consumer: bool,
    /// Pump the unicast consumer `dm_<id>` on `DM_<space>` (§2(e) step 1): DMs addressed to us.
    /// Off by default so a host without the DM stream (the simulator) sees no bind retries.
    pub unicast: bool,
    /// The anycast roles served: one `svc_<role>` consumer on `TASK_<space>` is pumped for each
    /// (§2(e) step 6). `TASK` is a work queue, so each task reaches one server of the role.
    pub roles: Vec<Role>,
    /// Create `dm_<id>` / `svc_<role>` if missing (open mode) rather than only bind to them (auth
    /// mode: the provisioner creates them and agents hold no create grant, §1.10).
    ///
    /// Unlike the reference's open-mode self-creation, `dm_<id>` is created without an
    /// `inactive_threshold`: a DM consumer the server deleted after ten idle minutes would be
    /// recreated with deliver policy `all` and hand a restarted agent (whose ledger is new) every
    /// DM the stream still holds once more.
    pub create_direct_consumers: bool,
    /// Presence heartbeat interval; `None` disables presence.
    pub heartbeat: Option<Duration>,
    /// The receiver ledger's bounds.
    pub ledger: LedgerConfig,
    /// Seed of the agent's uuids (reply subjects, message ids) when [`AgentConfig::id_key`] is
    /// `None`: reproducible, for the simulator and tests only.
    pub seed: u64,
    /// 256 bits from the OS that key the agent's id generator (`entropy::IdGen::from_key`):
    /// message ids are the `Nats-Msg-Id` of their publishes, and a predictable one lets another
    /// agent publish it first and make ours vanish in the stream's duplicate window. Every host
    /// on a shared broker sets it (the tokio driver's `run::os_key`); when set, `seed` is unused.
    pub id_key: Option<IdKey>,
    /// Test-only: restores the reference behaviour of gap G10 so the simulator can prove the
    /// oracle sees it. A leave then resolves the class from a stale cache that reads `live` and
    /// skips the tombstone even when a membership is known: the agent unsubscribes, the
    /// membership stays open (semantics §4 G10, I15). Always `false` outside tests.
    #[doc(hidden)]
    pub reference_gap_g10: bool,
    /// How often the membership mirror is re-validated against `listMemberships` (besides once
    /// at every ready connection); `None` audits at connections only. Only with
    /// [`AgentConfig::durable_backstop`].
    pub membership_audit: Option<Duration>,
}

impl AgentConfig {
    /// A config with the defaults: durable backstop on, bind-only DLV, 2 s heartbeat.
    pub fn new(space: Space, me: Sender, channels: Vec<Channel>, seed: u64) -> Self {
        AgentConfig {
            space,
            me,
            channels,
            durable_backstop: true,
            create_dlv_consumer: false,
            unicast: false,
            roles: Vec::new(),
            create_direct_consumers: false,
            heartbeat: Some(DEFAULT_HEARTBEAT),
            ledger: LedgerConfig::default(),
            seed,
            id_key: None,
            reference_gap_g10: false,
            membership_audit: Some(MEMBERSHIP_AUDIT_INTERVAL),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Public vocabulary
// ---------------------------------------------------------------------------------------------

/// The id of one application request (join, leave, send); its result event carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req#{}", self.0)
    }
}

/// Why an application call was refused at once (nothing changed).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentError {
    /// Not connected, or the channel registry is not loaded yet: "reconnecting — try again
    /// shortly".
    NotReady,
    /// The agent was stopped.
    Stopped,
    /// The channel is not joined.
    NotJoined(Channel),
    /// A join or leave of this channel is in progress.
    Busy(Channel),
    /// A wildcard channel cannot be posted to.
    NotConcrete(Channel),
    /// The id given is not pending (not surfaced, or already settled).
    Ledger(LedgerError),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::NotReady => f.write_str("reconnecting — try again shortly"),
            AgentError::Stopped => f.write_str("endpoint stopped"),
            AgentError::NotJoined(c) => write!(f, "channel \"{c}\" is not joined"),
            AgentError::Busy(c) => write!(f, "a join or leave of \"{c}\" is in progress"),
            AgentError::NotConcrete(c) => {
                write!(f, "cannot publish to wildcard channel \"{c}\"")
            }
            AgentError::Ledger(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Why a join failed. Nothing of it is left behind (no subscription, no watermark).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinError {
    /// The broker refused the subscription: not within this agent's read ACL.
    Refused {
        /// The broker's words.
        detail: String,
    },
    /// The watermark, subscription or confirmation failed, or its outcome is unknown
    /// (connection lost mid-join).
    Unconfirmed {
        /// What failed.
        detail: String,
    },
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Refused { detail } => {
                write!(
                    f,
                    "not within this agent's read ACL (allowSubscribe): {detail}"
                )
            }
            JoinError::Unconfirmed { detail } => {
                write!(f, "live subscription could not be confirmed ({detail})")
            }
        }
    }
}

/// Why a leave failed. The channel stays joined; retry.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaveError {
    /// The memberships could not be listed (an error other than no responders).
    MembershipsUnknown {
        /// What failed.
        detail: String,
    },
    /// The tombstone was refused or failed.
    TombstoneFailed {
        /// What failed.
        detail: String,
    },
    /// The tombstone's outcome is unknown (timeout, connection lost).
    TombstoneUnknown,
}

impl fmt::Display for LeaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaveError::MembershipsUnknown { detail } => {
                write!(f, "durable memberships could not be listed: {detail}")
            }
            LeaveError::TombstoneFailed { detail } => write!(f, "tombstone failed: {detail}"),
            LeaveError::TombstoneUnknown => f.write_str("tombstone outcome unknown"),
        }
    }
}

/// The result of a join (the reference's `{joined, backfilled, durable, reason}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinReport {
    /// False when the channel was already joined (an idempotent no-op, scenario A4).
    pub joined: bool,
    /// The watermark armed before the subscription (`F`); `None` on a re-subscribe.
    pub watermark: Option<u64>,
    /// How many historical copies the backfill read (before dedup).
    pub backfilled: u64,
    /// Whether a durable backstop is established.
    pub durable: bool,
    /// The membership generation, when durable.
    pub generation: Option<u64>,
    /// Whether the daemon used our watermark as the join cursor (G1 fix): `Some(true)` when it
    /// echoed it, `Some(false)` when it used another, `None` when it did not say (an old daemon)
    /// or there was no durable join.
    pub cursor_honoured: Option<bool>,
    /// Why the backstop is not established, when the channel is durable and it is not; or why the
    /// backfill failed. Never absent when something is missing.
    pub reason: Option<String>,
}

/// Where a channel's durable backstop stands.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackstopState {
    /// The channel is live (or the backstop is off): nothing to establish.
    NotApplicable,
    /// Not decided yet (the join is in progress or the registry is loading).
    Pending,
    /// A durable join request is in flight.
    Requesting,
    /// Established with this generation.
    Established {
        /// The membership generation.
        generation: u64,
    },
    /// Not established; a reconcile retries after the backoff.
    Degraded {
        /// Why.
        reason: String,
        /// Reconcile attempts so far.
        attempts: u32,
    },
}

/// One joined channel in [`AgentHealth`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelHealth {
    /// The channel.
    pub channel: Channel,
    /// The live subscription is confirmed on the current connection.
    pub live: bool,
    /// The durable backstop.
    pub backstop: BackstopState,
}

/// A membership whose close is still pending after a refusal (the reference's `durableUnclosed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unclosed {
    /// The channel.
    pub channel: ConcreteChannel,
    /// The generation to tombstone; `None` when a durable join's outcome was unknown, so whether a
    /// membership exists (and its generation) is found by listing first.
    pub generation: Option<u64>,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
}

/// Monotone counters (saturating).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Copies dropped by the authenticity filter as spoofed.
    pub spoofed: u64,
    /// Copies dropped as malformed.
    pub malformed: u64,
    /// Own echoes dropped.
    pub own_echoes: u64,
    /// Settles (ack / nak / term) whose outcome was unknown or failed.
    pub settles_unconfirmed: u64,
    /// Late refusals of joined channels.
    pub late_refusals: u64,
    /// Backfill reads that failed.
    pub backfill_failures: u64,
    /// Durable join reconcile attempts.
    pub reconcile_attempts: u64,
    /// Refusal-close attempts that failed.
    pub close_failures: u64,
    /// Connection losses seen.
    pub connection_losses: u64,
    /// DLV consumer binds that failed, or consumers that ended (each retried with backoff).
    pub dlv_bind_failures: u64,
    /// Live copies a full ledger refused on a channel with an established backstop
    /// ([`AgentEvent::LiveCopyShed`]): delayed, not lost.
    pub live_copies_shed: u64,
    /// Durable copies a full ledger could not take at once: held unsettled in the receiver's
    /// waiting room, oldest first, until the application made room (no nak: their consumer
    /// waits, and acks stay in stream order).
    pub durable_copies_waited: u64,
    /// `dm_<id>` / `svc_<role>` binds that failed, or consumers that ended (each retried with
    /// backoff, unlike the reference's bind-once, G20).
    pub direct_bind_failures: u64,
    /// DM / TASK deliveries terminated as spoofed (`from.id` ≠ the subject's sender); also
    /// counted in `spoofed`.
    pub direct_spoofed: u64,
    /// DM / TASK deliveries terminated as malformed (bad JSON, or a subject that is not the
    /// consumer's); also counted in `malformed`.
    pub direct_malformed: u64,
    /// Membership audits answered (`listMemberships` on connect and periodically).
    pub membership_audits: u64,
    /// Membership audits that failed (no responders, timeout, error): the mirror stays unverified
    /// until the next one.
    pub membership_audit_failures: u64,
    /// Mirrored memberships found gone from the registry ([`AgentEvent::MembershipLost`]).
    pub memberships_lost: u64,
    /// Open memberships of channels this life does not join ([`AgentEvent::MembershipOrphaned`]).
    pub memberships_orphaned: u64,
    /// Fresh sends the stream answered `duplicate: true` (another publish already held the new
    /// id); each was republished under a new id ([`AgentEvent::MessageIdCollided`]).
    pub message_id_collisions: u64,
    /// Copies the daemon recorded as lost to us (the loss record's total, as last read;
    /// [`AgentEvent::CopiesLost`]).
    pub copies_lost: u64,
    /// Reads of our loss record that failed or were unknown (retried at the next poll).
    pub loss_reads_failed: u64,
    /// Loss records that did not decode (reported, ignored).
    pub loss_records_malformed: u64,
}

/// How many times a fresh send is republished under a new id after a `duplicate: true` PubAck
/// before it fails ([`AgentEvent::SendFailed`], not unknown). With unguessable ids one collision
/// is already an anomaly (someone published an id of ours first); several mean the ids are being
/// raced, and retrying forever would only feed the attacker.
pub const MAX_ID_COLLISIONS: u32 = 3;

/// One direct consumer (`dm_<id>` or `svc_<role>`) in [`AgentHealth`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectHealth {
    /// The consumer's name (`dm_<id>` / `svc_<role>`).
    pub consumer: String,
    /// The delivery kind it carries.
    pub kind: DeliveryKind,
    /// Bound on the current connection.
    pub bound: bool,
    /// Failed binds since the last success (the retry backoff's attempt count).
    pub attempts: u32,
}

/// What the agent can say about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentHealth {
    /// Connected and the registry loaded.
    pub ready: bool,
    /// The joined channels.
    pub channels: Vec<ChannelHealth>,
    /// Memberships still to close after a refusal.
    pub unclosed: Vec<Unclosed>,
    /// The DLV consumer is bound.
    pub dlv_bound: bool,
    /// The direct consumers: `dm_<id>` when [`AgentConfig::unicast`], then one `svc_<role>` per
    /// configured role.
    pub direct: Vec<DirectHealth>,
    /// The agent's counters.
    pub counters: AgentCounters,
    /// The ledger's counters.
    pub ledger: LedgerCounters,
    /// Durable copies waiting, unsettled, for room in the full ledger (the receiver's waiting
    /// room, at most the ledger's `max_pending`).
    pub waiting: usize,
    /// Our loss record as last read (`None` until one was read): every range of copies the
    /// daemon could not deliver to us ([`crate::delivery::losses`]).
    pub losses: Option<LossLedger>,
}

/// Where a received copy came from, as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The message.
    pub message: CotalMessage,
    /// The channel, from the subject (never the payload label, G18); `None` for a DLV copy whose
    /// payload route is not a channel.
    pub channel: Option<ConcreteChannel>,
    /// A historical (backfill) copy.
    pub historical: bool,
    /// Whether the message mentions us.
    pub mentions_me: bool,
    /// The delivery kind, from the delivering subject or path, never from the payload's routing
    /// field (SPEC §12 item 6): `channel` for live, backfill and DLV copies, `dm` for `inst`,
    /// `anycast` for `svc`.
    pub kind: DeliveryKind,
    /// The role an anycast was addressed to (from the subject); `None` for other kinds.
    pub role: Option<Role>,
}

/// What the application sees.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// Connected and ready (registry loaded). `first` on the first connect of this life.
    Connected {
        /// First connect.
        first: bool,
    },
    /// The connection is gone.
    Disconnected,
    /// A join completed (`request` is `None` for a boot channel).
    Joined {
        /// The application's request.
        request: Option<RequestId>,
        /// The channel.
        channel: Channel,
        /// The result.
        report: JoinReport,
    },
    /// A join failed; nothing was left behind.
    JoinFailed {
        /// The application's request.
        request: Option<RequestId>,
        /// The channel.
        channel: Channel,
        /// Why.
        error: JoinError,
    },
    /// A leave completed.
    Left {
        /// The application's request.
        request: RequestId,
        /// The channel.
        channel: Channel,
        /// The generation tombstoned, if any.
        tombstoned: Option<u64>,
    },
    /// A leave failed; the channel stays joined.
    LeaveFailed {
        /// The application's request.
        request: RequestId,
        /// The channel.
        channel: Channel,
        /// Why.
        error: LeaveError,
    },
    /// The broker refused the subscription of a joined channel: it is no longer joined.
    ChannelRefused {
        /// The channel.
        channel: Channel,
        /// The broker's words.
        detail: String,
        /// The membership generation being closed, if any.
        closing: Option<u64>,
    },
    /// A durable backstop was established (also after a reconcile).
    BackstopEstablished {
        /// The channel.
        channel: ConcreteChannel,
        /// Generation.
        generation: u64,
    },
    /// A durable backstop is not established: the channel is live-only for now.
    BackstopDegraded {
        /// The channel.
        channel: ConcreteChannel,
        /// Why.
        reason: String,
    },
    /// A membership left open by a refusal was tombstoned.
    MembershipClosed {
        /// The channel.
        channel: ConcreteChannel,
        /// Generation.
        generation: u64,
    },
    /// The membership audit found the mirrored membership gone (no open record of that
    /// generation: purged or tombstoned out of band). The backstop is degraded and being
    /// re-established; copies posted while the record was missing come from the new
    /// membership's catch-up.
    MembershipLost {
        /// The channel.
        channel: ConcreteChannel,
        /// The generation the mirror held.
        generation: u64,
    },
    /// The membership audit found an open membership of a channel this life does not join (an
    /// earlier life's, G12): it is being tombstoned (see [`AgentHealth::unclosed`]).
    MembershipOrphaned {
        /// The channel.
        channel: ConcreteChannel,
        /// Its generation.
        generation: u64,
    },
    /// A refusal close failed and will be retried (first failure, then every 5th).
    MembershipCloseRetrying {
        /// The channel.
        channel: ConcreteChannel,
        /// Generation, when known.
        generation: Option<u64>,
        /// Attempts so far.
        attempts: u32,
        /// The error.
        error: String,
    },
    /// A direct consumer (`dm_<id>` / `svc_<role>`) could not be bound, or its feed ended: no DM
    /// or task of it arrives until a retry (after the backoff) binds it again. Emitted for the
    /// first failure in a row and every fifth after it; [`AgentHealth::direct`] shows the state.
    DirectUnbound {
        /// The consumer's name.
        consumer: String,
        /// Failed binds in a row, this one included.
        attempts: u32,
        /// The driver's or the server's words.
        detail: String,
    },
    /// New messages wait in [`Agent::take_messages`](crate::agent::Agent::take_messages).
    MessagesReady {
        /// How many are queued.
        queued: usize,
    },
    /// A copy was refused before dedup (spoofed or malformed); durable copies were terminated.
    Anomaly {
        /// The subject it came on.
        subject: String,
        /// Why.
        rejection: Rejection,
    },
    /// A copy was lost (a live or backfill copy refused by a full ledger).
    Lost {
        /// The message id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The daemon recorded copies it could not deliver to us (our DLV was full, the redelivery
    /// ceiling, a forgotten interval; [`crate::delivery::losses`]): the ranges of our loss
    /// record not reported before in this life (a range that grew is reported again, whole).
    CopiesLost {
        /// The new or grown ranges: channel, CHAT sequences, copies, reason.
        ranges: Vec<LossRange>,
        /// Ranges the record pushed out, and the copies they counted ("and more").
        more: LossOverflow,
        /// Copies lost in all, per the record.
        total: u64,
    },
    /// A full ledger refused a live copy of a channel whose durable backstop is established: not
    /// a loss, the durable copy of the same id is still to come (and the ledger takes it once
    /// the application drains). Counted in [`AgentCounters::live_copies_shed`].
    LiveCopyShed {
        /// The message id.
        id: String,
        /// The channel.
        channel: ConcreteChannel,
    },
    /// The stream answered the first publish of a fresh send with `duplicate: true`: a message
    /// with our new id was already in its duplicate window (an id published ahead of us), so
    /// ours was not stored. The send goes on under the id `new`; its `Sent` or `SendFailed`
    /// carries the final id. A resend with a caller-chosen id (`send_with_id` and friends, after
    /// an unknown outcome) is not fresh: there `duplicate: true` means our own first attempt was
    /// stored, and it is a success. Counted in [`AgentCounters::message_id_collisions`].
    MessageIdCollided {
        /// The application's request.
        request: RequestId,
        /// The id the stream already held.
        old: String,
        /// The id the send is republished under.
        new: String,
    },
    /// A send was stored by the stream.
    Sent {
        /// The application's request.
        request: RequestId,
        /// The message id: the one the send returned, or the last `new` of a
        /// [`AgentEvent::MessageIdCollided`].
        id: String,
        /// Its stream sequence (CHAT for a post, DM for a unicast, TASK for an anycast).
        seq: u64,
        /// The stream had it already (only for a resend with a caller-chosen id).
        duplicate: bool,
    },
    /// A send failed, or its outcome is unknown (`unknown`: resend with the same id, the
    /// stream's duplicate window makes that safe).
    SendFailed {
        /// The application's request.
        request: RequestId,
        /// The message id.
        id: String,
        /// What happened.
        error: String,
        /// Whether the outcome is unknown rather than a refusal.
        unknown: bool,
    },
}
