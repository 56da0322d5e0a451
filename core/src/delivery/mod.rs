//! The delivery daemon: its pure pieces (semantics §2j, §2k) and its machine (§2g–§2m).
//!
//! The daemon moves every durable-class CHAT message into a per-member store in two steps, and
//! both steps are decisions that need no IO once their inputs are read:
//!
//! 1. **Fan-out** ([`route()`]): for one CHAT message (channel taken from the subject, its stream
//!    sequence, the channel's effective class resolved fresh), which owners get a dinbox entry,
//!    with which reason and generation. Durable class: every member whose current interval
//!    admits the sequence ([`crate::registry::durable_eligible`]), never the sender. Live class:
//!    each `@mention` resolved to exactly one owner whose read ACL covers the channel.
//! 2. **The trusted reader** ([`authorize()`]): for one dinbox entry, whether to transfer it to the
//!    owner's DLV store, drop it, defer it, give up on it (an explicit, reportable loss, G3), or
//!    terminate it as a permanent anomaly (G32). A `durable-channel` entry is judged against the
//!    interval of **its own** generation (G2, [`crate::registry::generation_eligible`]).
//!
//! 3. **Sequence continuity** ([`gap`]): the fan-out is offered every CHAT sequence once; a jump
//!    is checked against CHAT, and what the stream evicted before fan-out saw it is a reported
//!    loss. What the consumer offered to a feed that is gone is read back when it is bound
//!    ([`stranded`]), not left to its `ack_wait`.
//! 4. **Per-owner caps** ([`backlog`]): INBOX and DLV keep 1000 entries per owner and discard
//!    the oldest. Fan-out holds an owner's copies while its dinbox backlog is high, and the
//!    reader sheds a copy (a reported loss) rather than push an unread DLV copy out.
//!
//! 4. **Revocation** ([`revoke`]): a read ACL narrowed after copies reached the owner's DLV
//!    store takes them back: the daemon sweeps the owner's DLV subject and deletes every copy the
//!    reader's rule ([`authorize::acl_admits`]) no longer admits.
//!
//! The registry transitions the daemon drives around these (join, leave, activation) are in
//! [`crate::registry`]; the control gate is [`control`] and the per-shard lease is [`lease`].
//! The state machine that reads KV, publishes, acks and retries is [`daemon::Delivery`]: it
//! composes all of these and is the only module here that holds state between calls (besides the
//! lease machine it wraps).

pub mod authorize;
pub mod backlog;
pub mod control;
pub mod daemon;
pub mod gap;
pub mod lease;
pub mod losses;
pub mod revoke;
pub mod route;
pub mod stranded;

pub use authorize::{Decision, authorize};
pub use route::{RouteDecision, Routed, route};
